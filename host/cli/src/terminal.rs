//! The local terminal, for `agentos exec --tty`: its size, and raw mode while a remote program
//! owns it.

use std::io;
use std::os::fd::RawFd;

use agentos_protocol::PtySize;

/// The size of the terminal on `fd`, if it is one.
pub fn size(fd: RawFd) -> Option<PtySize> {
    // SAFETY: an all-zero winsize is a valid value for the ioctl to overwrite.
    let mut winsize: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one winsize, which lives across the call.
    let got = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut winsize) };
    (got == 0 && winsize.ws_col > 0 && winsize.ws_row > 0).then_some(PtySize {
        cols: winsize.ws_col,
        rows: winsize.ws_row,
    })
}

/// Raw mode on a terminal (keys go through as typed, nothing echoed locally) until dropped.
pub struct RawMode {
    fd: RawFd,
    saved: libc::termios,
}

impl RawMode {
    /// Raw mode on `fd`; `None` when it is not a terminal.
    pub fn enter(fd: RawFd) -> io::Result<Option<Self>> {
        // SAFETY: isatty takes no pointers.
        if unsafe { libc::isatty(fd) } != 1 {
            return Ok(None);
        }
        // SAFETY: an all-zero termios is a valid value for tcgetattr to overwrite.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr writes one termios, which lives across the call.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw changes the termios it is given, a valid one.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: tcsetattr reads one valid termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Some(Self { fd, saved }))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: tcsetattr reads the termios saved when raw mode began.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}
