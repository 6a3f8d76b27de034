//! The agent's side of one connection: `hello` first, then the host's requests, until the host
//! leaves, breaks the protocol, or asks for a shutdown.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use agentos_protocol::files::FsOp;
use agentos_protocol::process::{Control, Selector};
use agentos_protocol::{
    BootTimings, ExecRequest, FrameError, FrameReader, GuestMessage, Hello, HostMessage,
    InferRequest, PROTOCOL_VERSION, status, write_frame,
};

use crate::exec;
use crate::files::{self, Reads, Writes};
use crate::infer::Inference;
use crate::outbox::{Outbox, Writer, WriterGone};
use crate::peer::{HandlerEnv, Membership};
use crate::processes::{Finish, Process, Processes, Watcher};
use crate::reaper::Reaper;
use crate::stdin::{StdinError, StdinQueue};
use crate::transport::Connection;
use crate::watch::Watches;
use crate::{describe, init, lock, system};

/// Programs one connection may run at once; each costs threads, pipes and queued output.
const MAX_EXECS: usize = 64;

/// How long the last frames of a connection (`shutting_down` above all) may take to leave.
const DRAIN_PATIENCE: Duration = Duration::from_secs(2);

/// What every connection of the agent shares.
pub struct Context {
    pid1: bool,
    /// Environment of every program, before the request's own variables.
    base_env: BTreeMap<String, String>,
    reaper: Arc<Reaper>,
    init_ms: u64,
    /// Made for the first connection and sent on every one: its boot timings describe the boot,
    /// and the machine it describes (kernel, vCPUs, memory) stays as it is for the VM's life and
    /// its clones' (a snapshot restores onto the same machine only). Reading it again from
    /// `/proc` would cost each connection's hello, a restored VM's first above all.
    hello: OnceLock<Hello>,
    /// The inference worker, shared by every connection.
    inference: Arc<Inference>,
    /// The group the agent joined, and what its handler needs.
    membership: Membership,
    handler_env: Arc<HandlerEnv>,
    /// Every program started for the host, by any connection.
    processes: Arc<Processes>,
}

impl Context {
    pub fn new(
        pid1: bool,
        base_env: BTreeMap<String, String>,
        reaper: Arc<Reaper>,
        init_ms: u64,
    ) -> Self {
        let inference = Arc::new(Inference::new(
            Arc::clone(&reaper),
            system::online_cpus() as usize,
        ));
        let handler_env = Arc::new(HandlerEnv {
            inference: Arc::clone(&inference),
            reaper: Arc::clone(&reaper),
            base_env: base_env.clone(),
        });
        Self {
            pid1,
            base_env,
            inference,
            membership: Membership::default(),
            handler_env,
            reaper,
            init_ms,
            hello: OnceLock::new(),
            processes: Arc::default(),
        }
    }

    fn hello(&self) -> &Hello {
        self.hello.get_or_init(|| Hello {
            protocol: PROTOCOL_VERSION,
            agent: format!("agentos-guest {}", env!("CARGO_PKG_VERSION")),
            kernel: system::kernel_release(),
            vcpus: system::online_cpus(),
            memory_kib: system::memory_kib(),
            boot: BootTimings {
                init_ms: self.init_ms,
                ready_ms: system::uptime_ms().unwrap_or(0),
            },
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The connection the agent opened itself (dialled vsock, or the serial port): its `hello`
    /// means the agent is ready.
    Control,
    /// A connection the host opened to the agent's listening port.
    Accepted,
}

/// Why a connection ended.
#[derive(Debug)]
pub enum Ended {
    HostClosed,
    /// The stream failed or carried something that is not a frame; the connection was dropped.
    Broken(FrameError),
    /// Frames could no longer be written.
    WriterGone,
    /// The host asked for a shutdown and has been answered.
    Shutdown,
    /// The agent was restored from a snapshot and could not refresh its random state: the VM
    /// powers off.
    Unrefreshed,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot duplicate the connection")]
    Clone(#[source] io::Error),
    #[error("cannot send hello")]
    Hello(#[source] FrameError),
    #[error("cannot start the connection's writer")]
    Writer(#[source] io::Error),
}

/// Serves one connection until it ends. Programs still running then are killed: nobody would
/// receive their output.
pub fn serve(conn: Connection, ctx: &Context, role: Role) -> Result<Ended, ServeError> {
    let mut writer = conn.try_clone().map_err(ServeError::Clone)?;
    write_frame(&mut writer, &GuestMessage::Hello(ctx.hello().clone()))
        .map_err(ServeError::Hello)?;
    if role == Role::Control && ctx.pid1 {
        init::report(status::READY);
    }
    let (outbox, writer) = Writer::start(writer).map_err(ServeError::Writer)?;
    let session = Session {
        ctx,
        outbox,
        execs: Arc::default(),
        reads: Reads::default(),
        writes: Mutex::default(),
        watches: Watches::default(),
    };
    let mut frames = FrameReader::new(conn);
    let ended = session.run(&mut frames);
    // What a restored VM sees first: its vsock transport was reset, every connection with it.
    let reset = matches!(
        &ended,
        Ended::Broken(FrameError::Io(e)) if e.kind() == io::ErrorKind::ConnectionReset
    );
    if let Ended::Broken(err) = &ended
        && !reset
    {
        console!("dropping a connection: {}", describe(err));
    }
    session.release_all();
    // A reset connection has no writer to unblock: writes to it fail at once. (Shutting it down
    // anyway cost a restored VM's reconnection 20 ms in the carrier.)
    if !reset && !matches!(ended, Ended::Shutdown | Ended::Unrefreshed) {
        // Unblocks a writer stuck on a host that stopped reading.
        frames.get_ref().shutdown();
    }
    // Nothing queued can reach a peer that reset the connection: the writer is told to stop and
    // not waited for.
    writer.finish(if reset {
        Duration::ZERO
    } else {
        DRAIN_PATIENCE
    });
    Ok(ended)
}

/// A program a connection follows, by the id of the request that started or attached it.
struct Running {
    process: Arc<Process>,
    /// Its watcher of this connection.
    watcher: u64,
    /// This connection started it (and ends it, unless it was kept, when it closes).
    owner: bool,
}

type Execs = Arc<Mutex<HashMap<u64, Running>>>;

struct Session<'a> {
    ctx: &'a Context,
    outbox: Outbox,
    execs: Execs,
    reads: Reads,
    /// Files being written; those not finished when the connection ends are removed.
    writes: Mutex<Writes>,
    /// Directories watched; the watches end with the connection.
    watches: Watches,
}

enum Flow {
    Continue,
    Shutdown,
    /// A restored agent could not take fresh entropy: it must not run anything.
    Unrefreshed,
}

impl Session<'_> {
    fn run(&self, frames: &mut FrameReader<Connection>) -> Ended {
        loop {
            let msg = match frames.read::<HostMessage>() {
                Ok(Some(msg)) => msg,
                Ok(None) => return Ended::HostClosed,
                Err(err) => return Ended::Broken(err),
            };
            match self.handle(msg) {
                Ok(Flow::Continue) => {}
                Ok(Flow::Shutdown) => return Ended::Shutdown,
                Ok(Flow::Unrefreshed) => return Ended::Unrefreshed,
                Err(WriterGone) => return Ended::WriterGone,
            }
        }
    }

    fn handle(&self, msg: HostMessage) -> Result<Flow, WriterGone> {
        match msg {
            HostMessage::Ping { id } => self.outbox.send(GuestMessage::Pong { id })?,
            HostMessage::Exec(req) => self.exec(req)?,
            HostMessage::Stdin { id, data } => self.stdin(id, data.0)?,
            HostMessage::CloseStdin { id } => self.close_stdin(id)?,
            HostMessage::Signal { id, signal } => self.signal(id, signal)?,
            HostMessage::Infer(req) => self.infer(req)?,
            HostMessage::Join(req) => {
                let id = req.id;
                match self
                    .ctx
                    .membership
                    .join(req, Arc::clone(&self.ctx.handler_env))
                {
                    Ok(()) => self.outbox.send(GuestMessage::Joined { id })?,
                    Err(message) => self.error(id, message)?,
                }
            }
            HostMessage::Restored {
                id,
                entropy,
                unix_time_ns,
            } => match crate::restore::refresh(&entropy.0, unix_time_ns) {
                Ok(()) => self.outbox.send(GuestMessage::Restored { id })?,
                Err(e) => {
                    // The host sends its next requests without waiting for this answer: the
                    // agent goes down before it could run any of them with a clone's random
                    // state.
                    let message = format!("cannot refresh the restored guest: {e}");
                    console!("{message}; powering off");
                    self.error(id, message)?;
                    return Ok(Flow::Unrefreshed);
                }
            },
            HostMessage::ReadFile { id, path } => {
                if let Err(failure) = self.reads.start(id, &path, &self.outbox) {
                    self.outbox.send(failure.into_message(id))?;
                }
            }
            HostMessage::WriteFile {
                id,
                path,
                mode,
                user,
                in_place,
            } => {
                let begun = lock(&self.writes).begin(id, &path, mode, user.as_deref(), in_place);
                self.file_answer(id, begun.map(|()| None))?;
            }
            HostMessage::FileChunk { id, data } => {
                let written = lock(&self.writes).write(id, &data.0);
                self.file_answer(id, written.map(|()| None))?;
            }
            HostMessage::FileEnd { id } => {
                let ended = lock(&self.writes).end(id);
                crate::watch::settle();
                self.file_answer(
                    id,
                    ended.map(|size| size.map(|size| GuestMessage::FileWritten { id, size })),
                )?;
            }
            HostMessage::Fs { id, fs } => self.fs(id, &fs)?,
            HostMessage::Attach { id, process } => self.attach(id, &process)?,
            HostMessage::Watch {
                id,
                path,
                recursive,
            } => {
                if let Err(failure) = self.watches.start(id, &path, recursive, &self.outbox) {
                    self.outbox.send(failure.into_message(id))?;
                }
            }
            HostMessage::ListProcesses { id } => self.outbox.send(GuestMessage::Processes {
                id,
                processes: self.ctx.processes.list(),
            })?,
            HostMessage::Control { id, pid, control } => self.control(id, pid, control)?,
            HostMessage::Shutdown { id } => {
                // The VM goes down whether or not the host still reads; the answer is best effort.
                let _ = self
                    .outbox
                    .send_within(GuestMessage::ShuttingDown { id }, DRAIN_PATIENCE);
                return Ok(Flow::Shutdown);
            }
        }
        Ok(Flow::Continue)
    }

    /// Sends `answer`'s frame, if it has one, or its failure.
    fn file_answer(
        &self,
        id: u64,
        answer: Result<Option<GuestMessage>, files::Failure>,
    ) -> Result<(), WriterGone> {
        match answer {
            Ok(Some(msg)) => self.outbox.send(msg),
            Ok(None) => Ok(()),
            Err(failure) => self.outbox.send(failure.into_message(id)),
        }
    }

    fn fs(&self, id: u64, op: &FsOp) -> Result<(), WriterGone> {
        if let FsOp::List { path, depth } = op {
            let listed = files::list(path, *depth, |entries, last| {
                self.outbox.send(GuestMessage::Listed { id, entries, last })
            })?;
            return self.file_answer(id, listed.map(|()| None));
        }
        let done = files::apply(op).map(|entry| Some(GuestMessage::FsDone { id, entry }));
        if !matches!(op, FsOp::Stat { .. }) {
            crate::watch::settle();
        }
        self.file_answer(id, done)
    }

    fn infer(&self, req: InferRequest) -> Result<(), WriterGone> {
        let id = req.id;
        match self.ctx.inference.submit(req, &self.outbox) {
            Ok(()) => Ok(()),
            Err(message) => self.error(id, message),
        }
    }

    fn exec(&self, req: ExecRequest) -> Result<(), WriterGone> {
        let id = req.id;
        // Held while starting, so that a program that ends at once finds itself in the table.
        let execs = lock(&self.execs);
        let started = self.room_for(id, &execs).and_then(|()| {
            let watcher = Watcher::new(id, self.outbox.clone(), self.finisher(id));
            let key = watcher.key();
            exec::start(
                &req,
                &self.ctx.base_env,
                &self.ctx.reaper,
                &self.ctx.processes,
                watcher,
            )
            .map(|process| (process, key))
            .map_err(|err| describe(&err))
        });
        self.follow(id, execs, started, true)
    }

    /// Records that request `id` follows the program it started (`owner`) or attached to, or
    /// answers with why it does not.
    fn follow(
        &self,
        id: u64,
        mut execs: std::sync::MutexGuard<'_, HashMap<u64, Running>>,
        followed: Result<(Arc<Process>, u64), String>,
        owner: bool,
    ) -> Result<(), WriterGone> {
        match followed {
            Ok((process, watcher)) => {
                execs.insert(
                    id,
                    Running {
                        process,
                        watcher,
                        owner,
                    },
                );
                Ok(())
            }
            Err(message) => {
                drop(execs);
                self.error(id, message)
            }
        }
    }

    /// Refuses a request id in use, or one program too many.
    fn room_for(&self, id: u64, execs: &HashMap<u64, Running>) -> Result<(), String> {
        if execs.contains_key(&id) {
            Err(format!("request {id} is already running"))
        } else if execs.len() >= MAX_EXECS {
            Err(format!(
                "{MAX_EXECS} programs are already followed on this connection"
            ))
        } else {
            Ok(())
        }
    }

    /// Follows a running program from now on as request `id`.
    fn attach(&self, id: u64, selector: &Selector) -> Result<(), WriterGone> {
        let execs = lock(&self.execs);
        let attached = self.room_for(id, &execs).and_then(|()| {
            let process = self
                .ctx
                .processes
                .find(selector)
                .ok_or_else(|| no_such_process(selector))?;
            let watcher = Watcher::new(id, self.outbox.clone(), self.finisher(id));
            let key = watcher.key();
            process.watch(watcher).map(|()| (process, key))
        });
        self.follow(id, execs, attached, false)
    }

    fn control(&self, id: u64, pid: u32, control: Control) -> Result<(), WriterGone> {
        let Some(process) = self.ctx.processes.find(&Selector::Pid(pid)) else {
            return self.error(id, no_such_process(&Selector::Pid(pid)));
        };
        let done = match control {
            Control::Stdin { data } => match process.stdin() {
                None => Err(format!("process {pid} was not started with stdin")),
                Some(queue) => queue
                    .push(data.0)
                    .map_err(|e| format!("process {pid}: {e}")),
            },
            Control::CloseStdin => match process.stdin() {
                None => Err(format!("process {pid} was not started with stdin")),
                Some(queue) => queue.close().map_err(|e| format!("process {pid}: {e}")),
            },
            Control::Resize { cols, rows } => {
                exec::resize(&process, cols, rows).map_err(|e| format!("cannot resize: {e}"))
            }
            Control::Signal { signal } if signal <= 0 => Err(format!("{signal} is not a signal")),
            Control::Signal { signal } => match exec::signal(&process, signal) {
                Err(err) if err.raw_os_error() != Some(libc::ESRCH) => {
                    Err(format!("cannot send signal {signal}: {err}"))
                }
                _ => Ok(()),
            },
        };
        match done {
            Ok(()) => self.outbox.send(GuestMessage::Done { id }),
            Err(message) => self.error(id, message),
        }
    }

    /// Reports the end of program `id` and forgets it.
    fn finisher(&self, id: u64) -> Finish {
        let execs = Arc::clone(&self.execs);
        let outbox = self.outbox.clone();
        Box::new(move |status| {
            // Under the table lock, so that a host that reuses the id as soon as it reads
            // `exited` never finds it still taken.
            let mut execs = lock(&execs);
            let _ = outbox.send(GuestMessage::Exited { id, status });
            execs.remove(&id);
        })
    }

    fn stdin(&self, id: u64, data: Vec<u8>) -> Result<(), WriterGone> {
        let queue = match self.stdin_of(id) {
            Ok(queue) => queue,
            Err(message) => return self.error(id, message),
        };
        // Waits while the program's queue is full: the host's writes then block, which is the
        // only flow control the protocol has.
        match queue.push(data) {
            Ok(()) => Ok(()),
            Err(StdinError::Stalled) => {
                console!(
                    "killing request {id}: {}; its connection cannot wait longer",
                    StdinError::Stalled
                );
                self.kill(id);
                Ok(())
            }
            Err(err) => self.error(id, format!("request {id}: {err}")),
        }
    }

    fn close_stdin(&self, id: u64) -> Result<(), WriterGone> {
        match self
            .stdin_of(id)
            .and_then(|queue| queue.close().map_err(|err| format!("request {id}: {err}")))
        {
            Ok(()) => Ok(()),
            Err(message) => self.error(id, message),
        }
    }

    fn stdin_of(&self, id: u64) -> Result<Arc<StdinQueue>, String> {
        let execs = lock(&self.execs);
        let running = execs.get(&id).ok_or_else(|| no_such_program(id))?;
        running
            .process
            .stdin()
            .cloned()
            .ok_or_else(|| format!("request {id} did not ask for standard input"))
    }

    fn signal(&self, id: u64, signal: i32) -> Result<(), WriterGone> {
        if signal <= 0 {
            return self.error(id, format!("{signal} is not a signal"));
        }
        let sent = lock(&self.execs)
            .get(&id)
            .map(|running| exec::signal(&running.process, signal));
        match sent {
            None => self.error(id, no_such_program(id)),
            Some(Ok(())) => Ok(()),
            // The whole group has exited; its `exited` frame is on its way.
            Some(Err(err)) if err.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            Some(Err(err)) => self.error(id, format!("cannot send signal {signal}: {err}")),
        }
    }

    fn kill(&self, id: u64) {
        if let Some(running) = lock(&self.execs).get(&id) {
            let _ = exec::signal(&running.process, libc::SIGKILL);
        }
    }

    /// The connection ends: the programs it started are killed, but those kept; it stops
    /// following the others.
    fn release_all(&self) {
        self.watches.stop();
        for running in lock(&self.execs).values() {
            if running.owner && !running.process.info().keep {
                let _ = exec::signal(&running.process, libc::SIGKILL);
            } else {
                running.process.unwatch(running.watcher);
            }
        }
    }

    fn error(&self, id: u64, message: String) -> Result<(), WriterGone> {
        self.outbox.send(GuestMessage::Error { id, message })
    }
}

fn no_such_process(selector: &Selector) -> String {
    match selector {
        Selector::Pid(pid) => format!("no process {pid} runs in the guest"),
        Selector::Tag(tag) => format!("no running process is tagged {:?}", crate::clip(tag)),
    }
}

fn no_such_program(id: u64) -> String {
    format!("no program is running for request {id}")
}

#[cfg(test)]
mod tests;
