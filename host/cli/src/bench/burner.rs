//! A CPU burner in a guest: what the scheduling and isolation benchmarks load agents with.

use agentos_core::agent::connection::ExecIo;
use agentos_core::agent::vm::AgentVm;
use agentos_protocol::{ExecRequest, Program};
use anyhow::bail;

/// Keeps the guest's CPU busy for `secs` seconds.
pub fn burn(vm: &mut AgentVm, secs: u64) -> anyhow::Result<()> {
    let request = ExecRequest {
        run: Program::new("/bin/sh").with_args([
            "-c".to_owned(),
            format!("timeout {secs} sh -c 'while :; do :; done'; true"),
        ]),
        ..Default::default()
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let status = vm.conn().exec(
        request,
        ExecIo {
            stdin: None,
            stdout: &mut out,
            stderr: &mut err,
        },
    )?;
    if status.shell_code() != 0 {
        bail!(
            "the CPU burner failed: {}",
            String::from_utf8_lossy(&err).trim()
        );
    }
    Ok(())
}
