//! Where the guest's serial console goes: a log file, optionally the terminal, and a bounded tail
//! kept in memory to explain a crash.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

/// Lines kept for crash reports, and the longest line kept whole.
const TAIL_LINES: usize = 64;
const MAX_LINE_BYTES: usize = 512;

#[derive(Default)]
struct ConsoleState {
    log: Option<File>,
    to_stdout: bool,
    /// The line being written, flushed to the sinks at each newline.
    line: Vec<u8>,
    tail: VecDeque<String>,
    seen_output: bool,
}

impl ConsoleState {
    fn end_line(&mut self) {
        if let Some(log) = self.log.as_mut() {
            // The console log is best effort: a full disk must not stop the guest.
            let _ = log.write_all(&self.line);
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
    fn splits_endless_lines() {
        let mut console = Console::new(None, false);
        console.write_all(&[b'x'; 5000]).unwrap();
        assert!(console.tail().iter().all(|l| l.len() <= MAX_LINE_BYTES));
    }

    fn tempfile_in_target() -> File {
        let path = std::env::temp_dir().join(format!("agentos-console-{}", std::process::id()));
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
