//! The host end of a guest-agent connection: handshake, ping, exec with streamed standard I/O,
//! shutdown. The same client speaks to agents over vsock and to a carrier over virtio-serial.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use agentos_protocol::{
    ExecRequest, ExitStatus, FrameError, FrameReader, GuestMessage, Hello, HostMessage,
    PROTOCOL_VERSION, StreamData, write_frame,
};

/// Standard input is forwarded in chunks of this size.
const STDIN_CHUNK: usize = 32 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("the connection to the guest agent failed")]
    Frame(#[from] FrameError),
    #[error("the guest agent closed the connection")]
    Closed,
    #[error("the guest agent did not say hello first (got {0})")]
    NoHello(String),
    #[error(
        "the guest agent speaks protocol {guest}, this host speaks {PROTOCOL_VERSION}: rebuild the image with `agentos image build`"
    )]
    Version { guest: u32 },
    #[error("the guest agent refused the request: {0}")]
    Refused(String),
    #[error("cannot set a timeout on the agent connection")]
    Timeout(#[source] io::Error),
}

/// Where the output of a program goes, and where its input comes from.
pub struct ExecIo<'a> {
    pub stdin: Option<Box<dyn Read + Send>>,
    pub stdout: &'a mut dyn Write,
    pub stderr: &'a mut dyn Write,
}

pub struct AgentConnection {
    reader: FrameReader<UnixStream>,
    writer: Arc<Mutex<UnixStream>>,
    hello: Hello,
    next_id: u64,
}

impl AgentConnection {
    /// Reads the agent's hello (within `timeout`) and checks its protocol version.
    pub fn handshake(stream: UnixStream, timeout: Duration) -> Result<Self, ConnectionError> {
        let writer = stream.try_clone().map_err(FrameError::Io)?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(ConnectionError::Timeout)?;
        let mut reader = FrameReader::new(stream);
        let hello = match reader.read::<GuestMessage>()? {
            Some(GuestMessage::Hello(hello)) => hello,
            Some(other) => return Err(ConnectionError::NoHello(format!("{other:?}"))),
            None => return Err(ConnectionError::Closed),
        };
        if hello.protocol != PROTOCOL_VERSION {
            return Err(ConnectionError::Version {
                guest: hello.protocol,
            });
        }
        reader
            .get_ref()
            .set_read_timeout(None)
            .map_err(ConnectionError::Timeout)?;
        Ok(Self {
            reader,
            writer: Arc::new(Mutex::new(writer)),
            hello,
            next_id: 1,
        })
    }

    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    fn send(&self, msg: &HostMessage) -> Result<(), ConnectionError> {
        let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        write_frame(&mut *writer, msg).map_err(ConnectionError::from)
    }

    fn recv(&mut self) -> Result<GuestMessage, ConnectionError> {
        self.reader.read()?.ok_or(ConnectionError::Closed)
    }

    fn new_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Round trip time of a ping.
    pub fn ping(&mut self) -> Result<Duration, ConnectionError> {
        let id = self.new_id();
        let start = Instant::now();
        self.send(&HostMessage::Ping { id })?;
        loop {
            if let GuestMessage::Pong { id: got } = self.recv()?
                && got == id
            {
                return Ok(start.elapsed());
            }
        }
    }

    /// Runs a program to its end, streaming its output as it arrives.
    pub fn exec(
        &mut self,
        mut request: ExecRequest,
        io: ExecIo<'_>,
    ) -> Result<ExitStatus, ConnectionError> {
        let id = self.new_id();
        request.id = id;
        request.stdin = io.stdin.is_some();
        self.send(&HostMessage::Exec(request))?;
        if let Some(stdin) = io.stdin {
            let writer = self.writer.clone();
            // Detached: it ends at stdin EOF or when the connection goes away; the caller may
            // exit while it is blocked reading a terminal.
            thread::Builder::new()
                .name("stdin".into())
                .spawn(move || pump_stdin(id, stdin, &writer))
                .map_err(|e| ConnectionError::Frame(FrameError::Io(e)))?;
        }
        loop {
            match self.recv()? {
                GuestMessage::Stdout { id: got, data } if got == id => {
                    write_out(io.stdout, &data.0);
                }
                GuestMessage::Stderr { id: got, data } if got == id => {
                    write_out(io.stderr, &data.0);
                }
                GuestMessage::Exited { id: got, status } if got == id => return Ok(status),
                GuestMessage::Error { id: got, message } if got == id => {
                    return Err(ConnectionError::Refused(message));
                }
                _ => {}
            }
        }
    }

    /// Asks the agent to power the VM off; returns once it acknowledged (or the link dropped,
    /// which a powering-off guest may do first).
    pub fn shutdown(&mut self) -> Result<(), ConnectionError> {
        let id = self.new_id();
        self.send(&HostMessage::Shutdown { id })?;
        loop {
            match self.recv() {
                Ok(GuestMessage::ShuttingDown { id: got }) if got == id => return Ok(()),
                Ok(_) => {}
                Err(ConnectionError::Closed) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }
}

/// Output the caller cannot take (a closed pipe) is dropped: the program runs to its end.
fn write_out(sink: &mut dyn Write, data: &[u8]) {
    if sink.write_all(data).is_ok() {
        let _ = sink.flush();
    }
}

fn pump_stdin(id: u64, mut stdin: Box<dyn Read + Send>, writer: &Mutex<UnixStream>) {
    let mut buf = vec![0u8; STDIN_CHUNK];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => 0,
        };
        let msg = if n == 0 {
            HostMessage::CloseStdin { id }
        } else {
            HostMessage::Stdin {
                id,
                data: StreamData(buf[..n].to_vec()),
            }
        };
        let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
        if write_frame(&mut *w, &msg).is_err() || n == 0 {
            return;
        }
    }
}
