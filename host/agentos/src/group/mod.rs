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
    /// Boot a group's agents, give its entry agent an input, print the results and the trace,
    /// stop the agents.
    #[command(
        after_help = "Example:\n  agentos group run examples/digest.toml --input examples/article.txt"
    )]
    Run(run::GroupRunArgs),
    /// Check a group file and show its agents and channels, without starting anything.
    Check {
        /// The group file (TOML).
        file: PathBuf,
    },
}

pub fn run_command(cmd: &GroupCommand) -> anyhow::Result<i32> {
    match cmd {
        GroupCommand::Run(args) => run::run(args),
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
                println!("  agent {:<12} {does}", agent.name);
            }
            for (from, to) in &spec.channels {
                println!("  channel {from} -> {to}");
            }
            Ok(0)
        }
    }
}
