//! The device event loop: one thread waits on every device's file descriptor and on the VM's exit
//! signal, and hands readiness to the device that owns the descriptor.

use std::os::fd::{AsRawFd, RawFd};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::exit::{ExitReason, ExitSignal};

/// Something with a file descriptor the loop should watch (level-triggered, readable).
pub trait EventSource: Send {
    fn fd(&self) -> RawFd;
    /// Called when `fd` is readable; must not block.
    fn on_ready(&mut self);
}

#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    #[error("cannot create or update the event loop's epoll set")]
    Epoll(#[source] std::io::Error),
}

const EXIT_TOKEN: u64 = u64::MAX;
const MAX_EVENTS: usize = 32;

pub struct EventLoop {
    epoll: Epoll,
    sources: Vec<Box<dyn EventSource>>,
}

impl EventLoop {
    pub fn new() -> Result<Self, EventLoopError> {
        Ok(Self {
            epoll: Epoll::new().map_err(EventLoopError::Epoll)?,
            sources: Vec::new(),
        })
    }

    pub fn add(&mut self, source: Box<dyn EventSource>) -> Result<(), EventLoopError> {
        let token = self.sources.len() as u64;
        self.epoll
            .ctl(
                ControlOperation::Add,
                source.fd(),
                EpollEvent::new(EventSet::IN, token),
            )
            .map_err(EventLoopError::Epoll)?;
        self.sources.push(source);
        Ok(())
    }

    /// Dispatches events until `exit` fires, and returns its reason.
    pub fn run(&mut self, exit: &ExitSignal) -> Result<ExitReason, EventLoopError> {
        self.epoll
            .ctl(
                ControlOperation::Add,
                exit.event().as_raw_fd(),
                EpollEvent::new(EventSet::IN, EXIT_TOKEN),
            )
            .map_err(EventLoopError::Epoll)?;
        let mut events = vec![EpollEvent::default(); MAX_EVENTS];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(EventLoopError::Epoll(e)),
            };
            for event in &events[..n] {
                match event.data() {
                    EXIT_TOKEN => {
                        if let Some(reason) = exit.reason() {
                            return Ok(reason);
                        }
                    }
                    token => {
                        if let Some(source) = self.sources.get_mut(token as usize) {
                            source.on_ready();
                        }
                    }
                }
            }
        }
    }
}
