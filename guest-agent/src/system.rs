//! Facts about the guest that the agent reports in its `hello`.

use std::fs;
use std::io;

/// Milliseconds since the kernel started, from `/proc/uptime` (`"12.34 56.78"`).
pub fn uptime_ms() -> io::Result<u64> {
    parse_uptime_ms(&fs::read_to_string("/proc/uptime")?)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unreadable /proc/uptime"))
}

/// Integer arithmetic, because the kernel prints exactly two decimals and a float would round.
fn parse_uptime_ms(text: &str) -> Option<u64> {
    let seconds = text.split_whitespace().next()?;
    let (whole, fraction) = seconds.split_once('.').unwrap_or((seconds, "0"));
    let whole: u64 = whole.parse().ok()?;
    let hundredths: u64 = format!("{fraction:0<2}").get(..2)?.parse().ok()?;
    whole.checked_mul(1000)?.checked_add(hundredths * 10)
}

/// The kernel release, as `uname -r` prints it.
pub fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|release| release.trim_end().to_owned())
        .unwrap_or_default()
}

/// Online CPUs; 0 when the kernel will not say.
pub fn online_cpus() -> u32 {
    // SAFETY: sysconf takes no pointers and only reads system configuration.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    u32::try_from(cpus).unwrap_or(0)
}

/// `MemTotal` from `/proc/meminfo`; 0 when unreadable.
pub fn memory_kib() -> u64 {
    fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| parse_mem_total(&text))
        .unwrap_or(0)
}

fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|line| line.starts_with("MemTotal:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_uptime_to_milliseconds() {
        assert_eq!(parse_uptime_ms("12.34 56.78\n"), Some(12_340));
        assert_eq!(parse_uptime_ms("0.05 0.00\n"), Some(50));
        assert_eq!(parse_uptime_ms("7 1"), Some(7_000));
        assert_eq!(parse_uptime_ms("x"), None);
        assert!(uptime_ms().unwrap() > 0);
    }

    #[test]
    fn parses_mem_total() {
        let meminfo = "MemTotal:        2035464 kB\nMemFree:          123 kB\n";
        assert_eq!(parse_mem_total(meminfo), Some(2_035_464));
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
        assert!(memory_kib() > 0);
        assert!(online_cpus() > 0);
        assert!(!kernel_release().is_empty());
    }
}
