//! `agentos cp`: a file into or out of a daemon's agent.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use agentos::daemon::SocketArg;
use agentos::daemon::api::{FileRequest, WriteFileRequest};
use agentos::daemon::client::Client;
use anyhow::Context;

#[derive(clap::Args, Debug)]
pub struct CpArgs {
    /// Where the file comes from: a local path (`-`: standard input) or AGENT:PATH.
    pub from: String,
    /// Where it goes: AGENT:PATH (a path ending in `/` is a directory to copy into) or a local
    /// path (an existing directory to copy into; `-`: standard output).
    pub to: String,
    /// Permission bits of the file in the agent, in octal (default: the local file's, or 644).
    #[arg(long, value_name = "OCTAL", value_parser = parse_mode)]
    pub mode: Option<u32>,
    /// The agent's account that owns the file if it is new, and the directories made for it
    /// (default: root; a replaced file keeps its owner).
    #[arg(long, short = 'u', value_name = "USER")]
    pub user: Option<String>,
    #[command(flatten)]
    pub socket: SocketArg,
}

fn parse_mode(text: &str) -> Result<u32, String> {
    u32::from_str_radix(text, 8)
        .ok()
        .filter(|mode| *mode <= 0o7777)
        .ok_or_else(|| format!("{text:?} is not octal permission bits (0 to 7777)"))
}

/// One side of a copy.
#[derive(Debug, PartialEq, Eq)]
enum End<'a> {
    Local(&'a str),
    Agent { name: &'a str, path: &'a str },
}

/// `AGENT:PATH` when what comes before the first `:` could be an agent's name; a local path
/// otherwise (`./a:b` stays local).
fn end(text: &str) -> End<'_> {
    match text.split_once(':') {
        Some((name, path))
            if !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
        {
            End::Agent { name, path }
        }
        _ => End::Local(text),
    }
}

/// The last part of `path`, for copying into a directory.
fn base_name(path: &str) -> anyhow::Result<&str> {
    path.rsplit('/')
        .next()
        .filter(|name| !name.is_empty() && *name != "." && *name != "..")
        .with_context(|| format!("{path:?} names no file"))
}

pub fn cp(args: &CpArgs) -> anyhow::Result<i32> {
    match (end(&args.from), end(&args.to)) {
        (End::Local(from), End::Agent { name, path }) => {
            into_agent(args, from, name, path)?;
        }
        (End::Agent { name, path }, End::Local(to)) => {
            if args.mode.is_some() || args.user.is_some() {
                anyhow::bail!("--mode and --user are for files copied into an agent");
            }
            out_of_agent(&args.socket, name, path, to)?;
        }
        (End::Agent { .. }, End::Agent { .. }) => {
            anyhow::bail!(
                "copy between two agents through a local file (one side of `cp` is local)"
            )
        }
        (End::Local(_), End::Local(_)) => {
            anyhow::bail!("one side of `cp` is an agent's file, written AGENT:PATH")
        }
    }
    Ok(0)
}

fn client(socket: &SocketArg) -> anyhow::Result<Client> {
    Ok(Client::connect(&socket.client_path()?)?)
}

fn into_agent(args: &CpArgs, from: &str, name: &str, path: &str) -> anyhow::Result<()> {
    let (source, mode): (Box<dyn io::Read + Send>, Option<u32>) = if from == "-" {
        (Box::new(io::stdin()), args.mode)
    } else {
        let file = File::open(from).with_context(|| format!("cannot open {from}"))?;
        let meta = file
            .metadata()
            .with_context(|| format!("cannot read {from}"))?;
        if meta.is_dir() {
            anyhow::bail!(
                "{from} is a directory; `cp` copies one file (pack a directory with tar and copy the archive)"
            );
        }
        let mode = args.mode.unwrap_or(meta.permissions().mode() & 0o7777);
        (Box::new(file), Some(mode))
    };
    let path = if path.ends_with('/') {
        if from == "-" {
            anyhow::bail!(
                "name the file to write from standard input (AGENT:PATH, not a directory)"
            );
        }
        format!("{path}{}", base_name(from)?)
    } else {
        path.to_owned()
    };
    client(&args.socket)?.upload(
        &WriteFileRequest {
            name: name.to_owned(),
            path,
            mode,
            user: args.user.clone(),
            in_place: false,
        },
        source,
    )?;
    Ok(())
}

fn out_of_agent(socket: &SocketArg, name: &str, path: &str, to: &str) -> anyhow::Result<()> {
    let request = FileRequest {
        name: name.to_owned(),
        path: path.to_owned(),
    };
    let mut client = client(socket)?;
    if to == "-" {
        let mut out = io::stdout().lock();
        client.download(&request, &mut out)?;
        out.flush()?;
        return Ok(());
    }
    let dest = if to.ends_with('/') || Path::new(to).is_dir() {
        Path::new(to).join(base_name(path)?)
    } else {
        PathBuf::from(to)
    };
    // Into a file beside the destination, which replaces it only once whole.
    let dir = dest.parent().filter(|d| !d.as_os_str().is_empty());
    let temp = dir.unwrap_or(Path::new(".")).join(format!(
        ".{}.agentos-cp-{}",
        dest.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&temp)
        .with_context(|| format!("cannot write {}", temp.display()))?;
    let copied = client
        .download(&request, &mut file)
        .map_err(anyhow::Error::from)
        .and_then(|_| file.sync_all().context("cannot write the file"))
        .and_then(|()| {
            fs::rename(&temp, &dest).with_context(|| format!("cannot write {}", dest.display()))
        });
    if copied.is_err() {
        let _ = fs::remove_file(&temp);
    }
    copied
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ends_are_told_apart() {
        assert_eq!(
            end("worker:/etc/hosts"),
            End::Agent {
                name: "worker",
                path: "/etc/hosts"
            }
        );
        assert_eq!(end("./a:b"), End::Local("./a:b"));
        assert_eq!(end("/tmp/x"), End::Local("/tmp/x"));
        assert_eq!(end(":x"), End::Local(":x"));
        assert_eq!(end("-"), End::Local("-"));
    }

    #[test]
    fn modes_are_octal() {
        assert_eq!(parse_mode("600"), Ok(0o600));
        assert!(parse_mode("8").is_err());
        assert!(parse_mode("17777").is_err());
    }

    #[test]
    fn base_names_name_a_file() {
        assert_eq!(base_name("/a/b.txt").unwrap(), "b.txt");
        assert!(base_name("/a/").is_err());
        assert!(base_name("..").is_err());
    }
}
