//! Apertium bundles: a rule-based translator run as the pipeline its mode file describes.
//!
//! The bundle holds the programs in `bin/`, the language pair's data in `data/`, and
//! `<mode>.mode`: one shell-style pipeline (`prog 'data/file' | prog -b 'data/file' | ...`) whose
//! relative paths are taken from the bundle, and `locale/` with a UTF-8 locale (the programs need
//! one). No shell runs it: each stage is a process of its
//! own, its standard output piped to the next one's input, between Apertium's plain-text
//! deformatter and reformatter.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::Instant;

use agentos_protocol::bundle::BundleManifest;
use agentos_protocol::{InferRequest, InferResult, InferTimings};

use crate::backend::{Backend, InferError, Results, micros};

const DEFORMAT: &str = "apertium-destxt";
const REFORMAT: &str = "apertium-retxt";
/// Stages a mode may have.
const MAX_STAGES: usize = 32;
/// Bytes of translation read back per input; far above what the input limit can produce.
const MAX_OUTPUT: u64 = 4 << 20;
/// Bytes of the stages' error output quoted when one fails.
const MAX_STDERR: u64 = 1024;

pub struct Translator {
    manifest: BundleManifest,
    dir: PathBuf,
    stages: Vec<Vec<String>>,
}

impl Translator {
    pub fn load(dir: &Path, manifest: BundleManifest) -> Result<Self, InferError> {
        let mode = manifest.mode.clone().unwrap_or_default();
        let error = |detail: String| InferError::Translate {
            model: manifest.name.clone(),
            detail,
        };
        let path = dir.join(format!("{mode}.mode"));
        let text = std::fs::read_to_string(&path)
            .map_err(|e| error(format!("cannot read {}: {e}", path.display())))?;
        let mut stages = vec![vec![DEFORMAT.to_owned()]];
        for stage in parse_pipeline(&text).map_err(error)? {
            stages.push(stage);
        }
        stages.push(vec![REFORMAT.to_owned()]);
        if stages.len() > MAX_STAGES {
            return Err(error(format!("its mode has more than {MAX_STAGES} stages")));
        }
        for stage in &stages {
            let program = dir.join("bin").join(&stage[0]);
            if !program.is_file() {
                return Err(error(format!("{} is not in the bundle", program.display())));
            }
        }
        Ok(Self {
            manifest,
            dir: dir.to_owned(),
            stages,
        })
    }

    fn translate(&self, text: &str) -> Result<String, String> {
        // What the stages say on stderr, for the error when one fails.
        let mut stderr = tempfile()?;
        let mut children: Vec<Child> = Vec::with_capacity(self.stages.len());
        let mut previous: Option<Stdio> = Some(Stdio::piped());
        let last = self.stages.len() - 1;
        for (i, stage) in self.stages.iter().enumerate() {
            let mut command = Command::new(self.dir.join("bin").join(&stage[0]));
            command
                .args(&stage[1..])
                .current_dir(&self.dir)
                // The guest has no locales; the bundle brings glibc's C.UTF-8.
                .env("LOCPATH", self.dir.join("locale"))
                .env("LC_ALL", "C.UTF-8")
                .stdin(previous.take().unwrap_or_else(Stdio::null))
                .stdout(Stdio::piped())
                .stderr(
                    stderr
                        .try_clone()
                        .map(Stdio::from)
                        .unwrap_or_else(|_| Stdio::null()),
                );
            let mut child = match command.spawn() {
                Ok(child) => child,
                Err(e) => {
                    kill_all(&mut children);
                    return Err(format!("cannot start {}: {e}", stage[0]));
                }
            };
            if i < last {
                previous = child.stdout.take().map(Stdio::from);
            }
            children.push(child);
        }
        let mut input = children[0].stdin.take();
        let text = format!("{text}\n");
        let writer = thread::spawn(move || {
            if let Some(stdin) = input.as_mut() {
                let _ = stdin.write_all(text.as_bytes());
            }
        });
        let mut output = Vec::new();
        let read = match children[last].stdout.take() {
            Some(stdout) => stdout
                .take(MAX_OUTPUT)
                .read_to_end(&mut output)
                .map(drop)
                .map_err(|e| format!("cannot read the translation: {e}")),
            None => Err("the last stage has no output".to_owned()),
        };
        let _ = writer.join();
        // A stage that fails makes the ones before it die of SIGPIPE: report the last failure.
        let mut failed = None;
        for (child, stage) in children.iter_mut().zip(&self.stages) {
            match child.wait() {
                Ok(status) if status.success() => {}
                Ok(status) => failed = Some(format!("{} ended with {status}", stage[0])),
                Err(e) => failed = Some(format!("cannot wait for {}: {e}", stage[0])),
            }
        }
        if let Some(failed) = failed {
            let mut said = String::new();
            let _ = stderr.seek(SeekFrom::Start(0));
            let _ = (&mut stderr).take(MAX_STDERR).read_to_string(&mut said);
            let said = said.split_whitespace().collect::<Vec<_>>().join(" ");
            return Err(if said.is_empty() {
                failed
            } else {
                format!("{failed}: {said}")
            });
        }
        read?;
        let output = String::from_utf8_lossy(&output);
        Ok(output.split_whitespace().collect::<Vec<_>>().join(" "))
    }
}

impl Backend for Translator {
    fn manifest(&self) -> &BundleManifest {
        &self.manifest
    }

    fn run(
        &mut self,
        req: &InferRequest,
        timings: &mut InferTimings,
    ) -> Result<Results, InferError> {
        let started = Instant::now();
        let mut results = Vec::with_capacity(req.inputs.len());
        for text in &req.inputs {
            let translated = self
                .translate(text)
                .map_err(|detail| InferError::Translate {
                    model: self.manifest.name.clone(),
                    detail,
                })?;
            results.push(InferResult::Translation { text: translated });
        }
        timings.run_us += micros(started);
        Ok(results)
    }
}

/// An unnamed file in the temporary directory.
fn tempfile() -> Result<std::fs::File, String> {
    let dir = std::env::temp_dir();
    let path = dir.join(format!(
        ".apertium-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| format!("cannot create a file in {}: {e}", dir.display()))?;
    let _ = std::fs::remove_file(&path);
    Ok(file)
}

fn kill_all(children: &mut [Child]) {
    for child in children {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Splits a mode's pipeline into stages of words. Words are separated by spaces; single quotes
/// group; `$1` is the generator's mode (`-g`) and `$2` the tagger's extra option (none).
fn parse_pipeline(text: &str) -> Result<Vec<Vec<String>>, String> {
    let mut stages = Vec::new();
    for stage in text.trim().split('|') {
        let mut words = Vec::new();
        let mut word = String::new();
        let mut quoted = false;
        let mut in_word = false;
        for c in stage.chars() {
            match c {
                '\'' => {
                    quoted = !quoted;
                    in_word = true;
                }
                c if c.is_whitespace() && !quoted => {
                    if in_word {
                        words.push(std::mem::take(&mut word));
                        in_word = false;
                    }
                }
                c => {
                    word.push(c);
                    in_word = true;
                }
            }
        }
        if quoted {
            return Err("its mode file has an unclosed quote".to_owned());
        }
        if in_word {
            words.push(word);
        }
        let words: Vec<String> = words
            .into_iter()
            .filter_map(|w| match w.as_str() {
                "$1" => Some("-g".to_owned()),
                "$2" => None,
                _ => Some(w),
            })
            .collect();
        let Some(program) = words.first() else {
            return Err("its mode file has an empty stage".to_owned());
        };
        if program.contains('/') || program.starts_with('.') {
            return Err(format!("stage program `{program}` must be a name in bin/"));
        }
        for arg in &words[1..] {
            if arg.starts_with('/') || arg.split('/').any(|part| part == "..") {
                return Err(format!("argument `{arg}` must be a path inside the bundle"));
            }
        }
        stages.push(words);
    }
    Ok(stages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mode_becomes_stages_with_its_options() {
        let stages = parse_pipeline(
            "lt-proc 'data/a.bin' | apertium-tagger -g $2 'data/p' | lt-proc $1 'data/g.bin'\n",
        )
        .unwrap();
        assert_eq!(
            stages,
            [
                vec!["lt-proc", "data/a.bin"],
                vec!["apertium-tagger", "-g", "data/p"],
                vec!["lt-proc", "-g", "data/g.bin"],
            ]
        );
    }

    #[test]
    fn a_mode_cannot_reach_outside_its_bundle() {
        assert!(parse_pipeline("lt-proc '/etc/shadow'").is_err());
        assert!(parse_pipeline("/bin/sh -c x").is_err());
        assert!(parse_pipeline("lt-proc data/../../x").is_err());
        assert!(parse_pipeline("lt-proc 'open").is_err());
        assert!(parse_pipeline("a | | b").is_err());
    }
}
