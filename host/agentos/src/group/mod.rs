//! Process groups: agents declared together in a file, each in its own microVM, exchanging
//! messages through a router that knows every sender, allows only declared channels and writes
//! a trace of how each result was made.

pub mod file;
pub mod router;
pub mod run;
pub mod trace;

use std::path::PathBuf;

/// `agentos group ...`
#[derive(clap::Subcommand, Debug)]
pub enum GroupCommand {
    /// Give a group's entry agent an input, print the results and the trace: in the group the
    /// daemon runs (`group up`), or else in agents booted for this input alone.
    #[command(
        after_help = "Example:\n  agentos group run examples/digest.toml --input examples/article.txt"
    )]
    Run(run::GroupRunArgs),
    /// Start a group's agents under the daemon and keep them running; `group run` then gives
    /// them inputs.
    #[command(
        after_help = "Example:\n  agentos group up examples/digest.toml\n  agentos group run examples/digest.toml --input examples/article.txt\n  agentos group down digest"
    )]
    Up(crate::daemon::cli::GroupUpArgs),
    /// Stop a group the daemon runs.
    Down(crate::daemon::cli::GroupDownArgs),
    /// Check a group file and show its agents and channels, without starting anything.
    Check {
        /// The group file (TOML).
        file: PathBuf,
    },
}

pub fn run_command(cmd: &GroupCommand) -> anyhow::Result<i32> {
    match cmd {
        GroupCommand::Run(args) => run::run(args),
        GroupCommand::Up(args) => crate::daemon::cli::group_up(args),
        GroupCommand::Down(args) => crate::daemon::cli::group_down(args),
        GroupCommand::Check { file: path } => {
            let spec = file::load(path)?;
            println!("group {}: entry {}", spec.name, spec.entry());
            for agent in &spec.agents {
                let does = match &agent.handler {
                    Some(agentos_protocol::peer::Handler::Infer { model, task, .. }) => {
                        format!("{task} with {model}")
                    }
                    Some(agentos_protocol::peer::Handler::Exec { program, .. }) => {
                        format!("runs {program}")
                    }
                    Some(agentos_protocol::peer::Handler::Echo) => "echoes".to_owned(),
                    None => "sends only".to_owned(),
                };
                if agent.count > 1 {
                    println!(
                        "  agent {:<12} {does}, {} replicas",
                        agent.name, agent.count
                    );
                } else {
                    println!("  agent {:<12} {does}", agent.name);
                }
            }
            for (from, to) in &spec.channels {
                println!("  channel {from} -> {to}");
            }
            Ok(0)
        }
    }
}
