//! The TOML files users write (group files, eval cases): read with a bound, parsed with errors
//! that name the line they are on.

use std::io::{self, Read};
use std::ops::Range;
use std::path::Path;

use serde::de::DeserializeOwned;

/// The largest such file read; anything beyond is cut off (and then fails to parse).
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// The text of `path`, at most [`MAX_FILE_BYTES`] of it.
pub fn read(path: &Path) -> io::Result<String> {
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_FILE_BYTES)
        .read_to_string(&mut text)?;
    Ok(text)
}

/// The line (from 1) where `span` starts in `text`. Counted in bytes: a span is never trusted
/// to fall on a character boundary.
pub fn line_of(text: &str, span: Range<usize>) -> usize {
    let before = &text.as_bytes()[..span.start.min(text.len())];
    before.iter().filter(|b| **b == b'\n').count() + 1
}

/// Parses `text`; an error is its line and a one-line message.
pub fn parse<T: DeserializeOwned>(text: &str) -> Result<T, (usize, String)> {
    toml::from_str(text).map_err(|e: toml::de::Error| {
        let line = e.span().map_or(1, |span| line_of(text, span));
        (line, e.message().trim_end().replace('\n', " "))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_their_line_in_one_line() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct Doc {
            a: u32,
        }
        let (line, message) = parse::<Doc>("# one\n\na = \"x\"\n").unwrap_err();
        assert_eq!(line, 3);
        assert!(!message.contains('\n'), "{message}");
        assert_eq!(line_of("ab\ncd", 100..101), 2);
    }
}
