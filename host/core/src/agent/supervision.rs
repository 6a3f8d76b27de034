//! The rules a supervisor keeps an agent by, whoever supervises it (the daemon's agents, the
//! members of a group under the daemon or under `agentos group run`): when a VM that ended is
//! booted again ([`RestartPolicy`], a limit), how long it waits first ([`Backoff`]), and what
//! whoever started the agent hears of each VM ([`AgentHooks`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::vm::AgentVm;

/// When an agent is booted again after its VM ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Leave it ended.
    Never,
    /// After a crash or a hang, not after the guest powered off by itself.
    #[default]
    OnFailure,
    /// Whenever it ends, until it is stopped.
    Always,
}

impl RestartPolicy {
    /// Whether a VM that ended so (a failure or not) is booted again.
    pub fn restarts(self, failure: bool) -> bool {
        match self {
            Self::Never => false,
            Self::OnFailure => failure,
            Self::Always => true,
        }
    }
}

/// The pause before a restart: [`Backoff::FIRST`], doubling with each restart in a row up to
/// [`Backoff::MAX`]; a VM that ran [`Backoff::STABLE`] before it ended starts the row afresh.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backoff {
    in_row: u32,
}

impl Backoff {
    pub const FIRST: Duration = Duration::from_secs(1);
    pub const MAX: Duration = Duration::from_secs(30);
    pub const STABLE: Duration = Duration::from_secs(60);

    /// The pause before booting again a VM that ran for `ran`.
    pub fn next(&mut self, ran: Duration) -> Duration {
        if ran >= Self::STABLE {
            self.in_row = 0;
        }
        let pause = (Self::FIRST * 2u32.saturating_pow(self.in_row.min(8))).min(Self::MAX);
        self.in_row = self.in_row.saturating_add(1);
        pause
    }
}

/// What a supervisor tells whoever started an agent about each of its VMs. Called on the
/// supervisor's thread.
pub trait AgentHooks: Send + Sync {
    /// A VM of the agent is up, after `restarts` restarts; an error ends it as a failure.
    fn booted(&self, vm: &mut AgentVm, restarts: u32) -> Result<(), String>;
    /// A VM of the agent ended (`why`), after `restarts` restarts; `restart_in`: when the next
    /// one boots, if one does.
    fn ended(&self, why: &str, restarts: u32, restart_in: Option<Duration>);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_restart_what_they_say() {
        assert!(!RestartPolicy::Never.restarts(true));
        assert!(RestartPolicy::OnFailure.restarts(true));
        assert!(!RestartPolicy::OnFailure.restarts(false));
        assert!(RestartPolicy::Always.restarts(false));
        let parsed: RestartPolicy = serde_json::from_str("\"on-failure\"").unwrap();
        assert_eq!(parsed, RestartPolicy::OnFailure);
    }

    #[test]
    fn the_pause_doubles_to_its_cap_and_a_stable_run_starts_afresh() {
        let mut backoff = Backoff::default();
        let quick = Duration::from_secs(1);
        let pauses: Vec<u64> = (0..7).map(|_| backoff.next(quick).as_secs()).collect();
        assert_eq!(pauses, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(backoff.next(Backoff::STABLE), Backoff::FIRST);
        assert_eq!(backoff.next(quick).as_secs(), 2);
    }
}
