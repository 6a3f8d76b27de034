//! Byte streams to the host: vsock (dialled or accepted) or a virtio-serial port.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::ptr;
use std::thread;
use std::time::{Duration, Instant};

use agentos_protocol::HOST_CID;

/// The vsock device appears a moment after its modules load; retry this long before giving up.
const VSOCK_PATIENCE: Duration = Duration::from_secs(5);
/// Likewise for the virtio-serial port and its device node.
const SERIAL_PATIENCE: Duration = Duration::from_secs(5);
const RETRY_INTERVAL: Duration = Duration::from_millis(20);
/// How long one dial waits for the host's VMM to answer. The kernel's default (2 s) is short for
/// a host busy starting many VMs, and the VMM always answers: a connection or a refusal.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// `SO_VM_SOCKETS_CONNECT_TIMEOUT` (linux/vm_sockets.h; a `timeval`, at level `AF_VSOCK`).
const SO_VM_SOCKETS_CONNECT_TIMEOUT: libc::c_int = 6;
/// How often a serial port is checked for the host end while it is closed.
const HOST_POLL_INTERVAL: Duration = Duration::from_millis(50);
const LISTEN_BACKLOG: libc::c_int = 16;

const VIRTIO_PORTS: &str = "/sys/class/virtio-ports";

/// Linux vsock addresses carry 32-bit CIDs; the host's well-known CID fits.
const HOST_CID_32: u32 = HOST_CID as u32;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot connect to the host on vsock port {port}")]
    Connect {
        port: u32,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on vsock port {port}")]
    Listen {
        port: u32,
        #[source]
        source: io::Error,
    },
    #[error("no virtio-serial port named {name:?} in {VIRTIO_PORTS}")]
    SerialMissing { name: String },
    #[error("cannot open virtio-serial port {path}")]
    SerialOpen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// One byte stream to the host.
pub struct Connection {
    file: File,
    kind: Kind,
}

#[derive(Clone, Copy)]
enum Kind {
    Socket,
    SerialPort,
}

impl Connection {
    /// A connected stream socket of any family.
    pub fn socket(fd: OwnedFd) -> Self {
        Self {
            file: File::from(fd),
            kind: Kind::Socket,
        }
    }

    /// Another handle on the same stream, for a writer thread.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            file: self.file.try_clone()?,
            kind: self.kind,
        })
    }

    /// Ends the stream in both directions, for every handle, so that a writer blocked on a peer
    /// that stopped reading fails instead of hanging. A serial port cannot be shut down.
    pub fn shutdown(&self) {
        if let Kind::Socket = self.kind {
            // SAFETY: shutdown(2) takes no pointers; the descriptor is owned by `self.file`.
            unsafe { libc::shutdown(self.file.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }

    /// Waits until the host end of a serial port is open. While it is closed, reads return end of
    /// stream at once, and a session would end as soon as it began.
    pub fn wait_for_peer(&self) {
        if let Kind::Socket = self.kind {
            return;
        }
        loop {
            let mut poll = libc::pollfd {
                fd: self.file.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one live pollfd, and the count says one.
            let rc = unsafe { libc::poll(&mut poll, 1, 0) };
            if rc < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            if rc < 0 || poll.revents & libc::POLLHUP == 0 {
                return;
            }
            thread::sleep(HOST_POLL_INTERVAL);
        }
    }
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Dials the host, retrying while the vsock device comes up.
pub fn connect_vsock(port: u32) -> Result<Connection, TransportError> {
    let deadline = Instant::now() + VSOCK_PATIENCE;
    loop {
        match connect_once(port) {
            Ok(fd) => return Ok(Connection::socket(fd)),
            Err(source) if Instant::now() >= deadline => {
                return Err(TransportError::Connect { port, source });
            }
            Err(_) => thread::sleep(RETRY_INTERVAL),
        }
    }
}

fn connect_once(port: u32) -> io::Result<OwnedFd> {
    let fd = vsock_socket()?;
    let timeout = libc::timeval {
        tv_sec: CONNECT_TIMEOUT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    // SAFETY: `timeout` is a live timeval and the length passed is its size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::AF_VSOCK,
            SO_VM_SOCKETS_CONNECT_TIMEOUT,
            (&raw const timeout).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let addr = vsock_addr(HOST_CID_32, port);
    // SAFETY: `addr` is a live sockaddr_vm and the length passed is its size.
    let rc = unsafe { libc::connect(fd.as_raw_fd(), (&raw const addr).cast(), ADDR_LEN) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// A vsock port on which the host opens connections to the agent.
pub struct VsockListener(OwnedFd);

impl VsockListener {
    pub fn bind(port: u32) -> Result<Self, TransportError> {
        let listen = || -> io::Result<Self> {
            let fd = vsock_socket()?;
            let addr = vsock_addr(libc::VMADDR_CID_ANY, port);
            // SAFETY: `addr` is a live sockaddr_vm and the length passed is its size.
            let rc = unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), ADDR_LEN) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: listen(2) takes no pointers.
            if unsafe { libc::listen(fd.as_raw_fd(), LISTEN_BACKLOG) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(Self(fd))
        };
        listen().map_err(|source| TransportError::Listen { port, source })
    }

    pub fn accept(&self) -> io::Result<Connection> {
        // SAFETY: null address pointers ask accept4 not to report the peer's address.
        let fd = unsafe {
            libc::accept4(
                self.0.as_raw_fd(),
                ptr::null_mut(),
                ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: accept4 just returned this descriptor and nothing else owns it.
        Ok(Connection::socket(unsafe { OwnedFd::from_raw_fd(fd) }))
    }
}

const ADDR_LEN: libc::socklen_t = size_of::<libc::sockaddr_vm>() as libc::socklen_t;

fn vsock_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socket(2) just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    libc::sockaddr_vm {
        svm_family: libc::AF_VSOCK as libc::sa_family_t,
        svm_reserved1: 0,
        svm_port: port,
        svm_cid: cid,
        svm_zero: [0; 4],
    }
}

/// Opens the virtio-serial port called `name`, waiting briefly for it to appear.
pub fn open_serial(name: &str) -> Result<Connection, TransportError> {
    let deadline = Instant::now() + SERIAL_PATIENCE;
    loop {
        let opened = find_serial_port(name).map(|path| {
            let file = OpenOptions::new().read(true).write(true).open(&path);
            (path, file)
        });
        let gave_up = Instant::now() >= deadline;
        match opened {
            Some((_, Ok(file))) => {
                return Ok(Connection {
                    file,
                    kind: Kind::SerialPort,
                });
            }
            Some((path, Err(source))) if gave_up => {
                return Err(TransportError::SerialOpen { path, source });
            }
            None if gave_up => {
                return Err(TransportError::SerialMissing { name: name.into() });
            }
            _ => thread::sleep(RETRY_INTERVAL),
        }
    }
}

/// `/sys/class/virtio-ports/vport0p1/name` holds the name the VMM gave port `/dev/vport0p1`.
fn find_serial_port(name: &str) -> Option<PathBuf> {
    fs::read_dir(VIRTIO_PORTS)
        .ok()?
        .flatten()
        .find(|entry| {
            fs::read_to_string(entry.path().join("name"))
                .is_ok_and(|found| found.trim_end_matches('\n') == name)
        })
        .map(|entry| Path::new("/dev").join(entry.file_name()))
}
