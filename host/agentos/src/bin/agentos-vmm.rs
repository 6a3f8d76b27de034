//! `agentos-vmm`: runs one microVM, jailed and under seccomp, until it ends (see
//! `agentos_vmm_process` for its exit statuses and files). It uses nothing of the `agentos`
//! library, so none of the commands are linked into the process a guest talks to.

use std::process::ExitCode;
use std::time::Instant;

use agentos_vmm_process::VmmArgs;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "agentos-vmm",
    version,
    about = "Run one agentos microVM in this process, jailed and under seccomp filters (what `agentos run` and the daemon start, one per VM)",
    after_help = "Logs: AGENTOS_LOG=info|debug."
)]
struct Cli {
    #[command(flatten)]
    args: VmmArgs,
}

fn main() -> ExitCode {
    let started = Instant::now();
    let cli = Cli::parse();
    agentos_vmm_process::init_logging();
    match agentos_vmm_process::run(&cli.args, started) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("agentos-vmm: {}", agentos_protocol::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
