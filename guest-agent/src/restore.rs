//! What a guest agent does when it learns it runs from a snapshot: the kernel's random pool and
//! the wall clock are those of the moment it was saved, shared by every clone of it.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;

use agentos_protocol::MAX_RESTORE_ENTROPY;

/// `RNDADDENTROPY` (`_IOW('R', 0x03, int[2])`): adds bytes to the input pool, credited.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG` (`_IO('R', 0x07)`): reseeds the generator from the input pool now.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// `struct rand_pool_info` with room for the most entropy a message carries.
#[repr(C)]
struct PoolInfo {
    entropy_count: libc::c_int,
    buf_size: libc::c_int,
    buf: [u8; MAX_RESTORE_ENTROPY],
}

/// Mixes `entropy` (from the host) into the kernel's pool and reseeds it, then sets the wall
/// clock to `unix_time_ns`.
pub fn refresh(entropy: &[u8], unix_time_ns: u64) -> io::Result<()> {
    if entropy.is_empty() || entropy.len() > MAX_RESTORE_ENTROPY {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "entropy of {} bytes (1 to {MAX_RESTORE_ENTROPY})",
                entropy.len()
            ),
        ));
    }
    let random = OpenOptions::new().write(true).open("/dev/urandom")?;
    let mut info = PoolInfo {
        entropy_count: (entropy.len() * 8) as libc::c_int,
        buf_size: entropy.len() as libc::c_int,
        buf: [0; MAX_RESTORE_ENTROPY],
    };
    info.buf[..entropy.len()].copy_from_slice(entropy);
    // SAFETY: `info` is a valid rand_pool_info whose buffer holds `buf_size` bytes; the kernel
    // only reads it.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, &info) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let time = libc::timespec {
        tv_sec: (unix_time_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (unix_time_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `time` is a valid timespec, only read.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &time) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
