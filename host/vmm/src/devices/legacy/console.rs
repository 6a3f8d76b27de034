//! Where the guest's serial console goes: a log file, optionally the terminal, and a bounded tail
//! kept in memory to explain a crash.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

/// Lines kept for crash reports, and the longest line kept whole.
const TAIL_LINES: usize = 64;
const MAX_LINE_BYTES: usize = 512;
/// What one VM may write to its console log; the rest is dropped (the guest controls how much
/// it prints, the host's disk is not its to fill).
const MAX_LOG_BYTES: u64 = 16 << 20;

#[derive(Default)]
struct ConsoleState {
    log: Option<File>,
    to_stdout: bool,
    /// The line being written, flushed to the sinks at each newline.
    line: Vec<u8>,
    tail: VecDeque<String>,
    seen_output: bool,
    /// Bytes written to the log so far.
    logged: u64,
}

impl ConsoleState {
    fn end_line(&mut self) {
        if let Some(log) = self.log.as_mut() {
            let len = self.line.len() as u64;
            if self.logged + len <= MAX_LOG_BYTES {
                // The console log is best effort: a full disk must not stop the guest.
                let _ = log.write_all(&self.line);
                self.logged += len;
            } else if self.logged < MAX_LOG_BYTES {
                let _ = log
                    .write_all(b"\n[console log full: the rest of this VM's output is not kept]\n");
                self.logged = MAX_LOG_BYTES;
                tracing::warn!("console log full; dropping further guest output");
            }
        }
        if self.to_stdout {
            let mut out = io::stdout().lock();
            let _ = out.write_all(&self.line);
            let _ = out.flush();
        }
        let text = String::from_utf8_lossy(&self.line);
        let text = text.trim_end_matches(['\r', '\n']);
        if !text.is_empty() {
            if self.tail.len() == TAIL_LINES {
                self.tail.pop_front();
            }
            self.tail.push_back(text.to_string());
        }
        self.line.clear();
    }
}

/// A cheap handle to the console; clones share it.
#[derive(Clone, Default)]
pub struct Console(Arc<Mutex<ConsoleState>>);

impl Console {
    pub fn new(log: Option<File>, to_stdout: bool) -> Self {
        Self(Arc::new(Mutex::new(ConsoleState {
            log,
            to_stdout,
            ..Default::default()
        })))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ConsoleState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The last lines the guest printed, oldest first (including an unfinished last line).
    pub fn tail(&self) -> Vec<String> {
        let state = self.state();
        let mut lines: Vec<String> = state.tail.iter().cloned().collect();
        if !state.line.is_empty() {
            lines.push(String::from_utf8_lossy(&state.line).trim_end().to_string());
        }
        lines
    }

    /// Writes out a pending partial line.
    pub fn flush_line(&self) {
        let mut state = self.state();
        if !state.line.is_empty() {
            state.end_line();
        }
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut state = self.state();
        if !state.seen_output {
            state.seen_output = true;
            tracing::info!("first console output");
        }
        for &byte in buf {
            state.line.push(byte);
            if byte == b'\n' || state.line.len() >= MAX_LINE_BYTES {
                state.end_line();
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn keeps_a_bounded_tail_and_writes_the_log() {
        let mut log = tempfile_in_target();
        let mut console = Console::new(Some(log.try_clone().unwrap()), false);
        for i in 0..100 {
            writeln!(console, "line {i}").unwrap();
        }
        console.write_all(b"partial").unwrap();
        let tail = console.tail();
        assert_eq!(tail.len(), TAIL_LINES + 1);
        assert_eq!(tail[0], "line 36");
        assert_eq!(tail.last().unwrap(), "partial");
        console.flush_line();
        let mut text = String::new();
        use std::io::Seek;
        log.seek(io::SeekFrom::Start(0)).unwrap();
        log.read_to_string(&mut text).unwrap();
        assert!(text.starts_with("line 0\n") && text.ends_with("line 99\npartial"));
    }

    #[test]
    fn the_log_stops_at_its_bound() {
        let mut log = tempfile_in_target();
        let mut console = Console::new(Some(log.try_clone().unwrap()), false);
        let line = [b'x'; MAX_LINE_BYTES];
        for _ in 0..(MAX_LOG_BYTES as usize / MAX_LINE_BYTES + 10) {
            console.write_all(&line).unwrap();
        }
        use std::io::Seek;
        let len = log.seek(io::SeekFrom::End(0)).unwrap();
        assert!(len <= MAX_LOG_BYTES + 100, "{len}");
        assert!(len >= MAX_LOG_BYTES - MAX_LINE_BYTES as u64);
        assert_eq!(console.tail().len(), TAIL_LINES);
    }

    #[test]
    fn splits_endless_lines() {
        let mut console = Console::new(None, false);
        console.write_all(&[b'x'; 5000]).unwrap();
        assert!(console.tail().iter().all(|l| l.len() <= MAX_LINE_BYTES));
    }

    fn tempfile_in_target() -> File {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("agentos-console-{}-{n}", std::process::id()));
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }
}
