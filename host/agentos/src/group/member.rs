//! A member of a running group, as its supervisor sees it: each VM of it joins the group once
//! it is up, and the group's trace tells when it crashed and when it came back.

use std::sync::Arc;
use std::time::Duration;

use agentos_core::agent::connection::ConnectionError;
use agentos_core::agent::supervision::AgentHooks;
use agentos_core::agent::vm::AgentVm;
use agentos_protocol::peer::{JoinRequest, PEER_PORT};

use super::file::{GroupSpec, MAX_RESTARTS};
use super::router::Router;
use super::trace::EventKind;

/// The name of a group's member among agents (`GROUP/MEMBER`): the label of its VMM.
pub fn member_name(group: &str, member: &str) -> String {
    format!("{group}/{member}")
}

/// The hooks of member `member` of a group whose agents are supervised (under the daemon or
/// `agentos group run`).
pub struct MemberHooks {
    pub spec: Arc<GroupSpec>,
    pub router: Arc<Router>,
    pub member: String,
}

impl AgentHooks for MemberHooks {
    fn booted(&self, vm: &mut AgentVm, restarts: u32) -> Result<(), String> {
        join_member(&self.spec, &self.router, &self.member, vm)
            .map_err(|e| agentos_protocol::error_chain(&e))?;
        if restarts > 0 {
            self.router.note(
                &self.member,
                EventKind::Restarted,
                format!(
                    "restart {restarts} of {MAX_RESTARTS}, booted in {:.1} s",
                    vm.boot_time().as_secs_f64()
                ),
            );
        }
        Ok(())
    }

    fn ended(&self, why: &str, restarts: u32, restart_in: Option<Duration>) {
        self.router
            .note(&self.member, EventKind::Crashed, why.to_owned());
        if restart_in.is_none() {
            self.router.note(
                &self.member,
                EventKind::Crashed,
                format!("not restarted ({restarts} restarts so far)"),
            );
        }
    }
}

/// Why a member did not join its group.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("cannot listen for agent `{0}`")]
    Listen(String, #[source] std::io::Error),
    #[error("agent `{0}` left the group")]
    Left(String),
    #[error("agent `{0}` did not join the group")]
    Join(String, #[source] ConnectionError),
}

/// Labels member `name`'s VM, attaches it to the router, then tells it to join.
pub fn join_member(
    spec: &GroupSpec,
    router: &Router,
    name: &str,
    vm: &mut AgentVm,
) -> Result<(), JoinError> {
    let _ = vm.set_label(&member_name(&spec.name, name));
    router
        .attach(name, &vm.host_socket(PEER_PORT))
        .map_err(|e| JoinError::Listen(name.to_owned(), e))?;
    let agent = spec
        .agent_of(name)
        .ok_or_else(|| JoinError::Left(name.to_owned()))?;
    vm.conn()
        .join(JoinRequest {
            id: 0,
            group: spec.name.clone(),
            name: name.to_owned(),
            handler: agent.handler.clone(),
            outputs: spec.outputs_of(&agent.name),
        })
        .map_err(|e| JoinError::Join(name.to_owned(), e))?;
    Ok(())
}
