//! The end of a log file a VM writes (its console, the VMM's stderr), read without holding the
//! whole file: a guest decides how much of its console there is.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

/// At most the last `max_bytes` of the file at `path`, as text (invalid UTF-8 replaced).
pub fn read_tail(path: &Path, max_bytes: u64) -> io::Result<String> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(max_bytes)))?;
    let mut bytes = Vec::new();
    file.take(max_bytes).read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The last `n` lines of `text`.
pub fn last_lines(text: &str, n: usize) -> Vec<&str> {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_end_of_a_long_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let text: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, &text).unwrap();
        let tail = read_tail(&path, 20).unwrap();
        assert_eq!(tail.len(), 20);
        assert!(text.ends_with(&tail));
        assert_eq!(last_lines(&tail, 2), ["line 998", "line 999"]);
        assert_eq!(read_tail(&path, 1 << 20).unwrap(), text);
        assert_eq!(last_lines("", 3), Vec::<&str>::new());
    }
}
