//! `agentos group ...`: run a group for one input, keep one up under the daemon, check a file.

use std::path::PathBuf;

/// `agentos group ...`
#[derive(clap::Subcommand, Debug)]
pub enum GroupCommand {
    /// Give a group's entry agent an input, print the results and the trace: in the group the
    /// daemon runs (`group up`), or else in agents booted for this input alone.
    #[command(
        after_help = "Example:\n  agentos group run examples/digest.toml --input examples/article.txt"
    )]
    Run(crate::group_run::GroupRunArgs),
    /// Start a group's agents under the daemon and keep them running; `group run` then gives
    /// them inputs.
    #[command(
        after_help = "Example:\n  agentos group up examples/digest.toml\n  agentos group run examples/digest.toml --input examples/article.txt\n  agentos group down digest"
    )]
    Up(crate::daemon::GroupUpArgs),
    /// Stop a group the daemon runs.
    Down(crate::daemon::GroupDownArgs),
    /// Check a group file and show its agents and channels, without starting anything.
    Check {
        /// The group file (TOML).
        file: PathBuf,
    },
}

pub fn run_command(cmd: &GroupCommand) -> anyhow::Result<i32> {
    match cmd {
        GroupCommand::Run(args) => crate::group_run::run(args),
        GroupCommand::Up(args) => crate::daemon::group_up(args),
        GroupCommand::Down(args) => crate::daemon::group_down(args),
        GroupCommand::Check { file: path } => {
            let spec = agentos::group::file::load(path)?;
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
