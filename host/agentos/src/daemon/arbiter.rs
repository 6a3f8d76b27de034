//! The daemon's CPU arbiter for priority classes: while an `interactive` agent uses the CPU,
//! every `batch` agent is frozen (its cgroup's freezer: no CPU at all), and once no interactive
//! agent has used the CPU for [`RESUME_AFTER`], the batch agents it froze run again. Weights
//! alone (see `docs/scheduler.md`) leave a batch agent a sliver of every contended CPU; freezing
//! takes even that, and costs the batch agents their progress while the interactive one works.
//! Agents without a class, and `idle` ones, are left to their weights. An agent paused by hand
//! (`agentos pause`) is never resumed here.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use agentos_core::cgroup::slice::PriorityClass;

/// How often the arbiter looks.
pub const TICK: Duration = Duration::from_millis(500);
/// CPUs an interactive agent must use to count as working (an idle guest uses a few percent).
const ACTIVE_SHARE: f64 = 0.2;
/// How long every interactive agent must have been quiet before batch agents run again.
const RESUME_AFTER: Duration = Duration::from_secs(1);

/// What the arbiter needs to know of an agent at one tick.
pub struct Seen {
    pub name: String,
    pub class: Option<PriorityClass>,
    /// CPU time of its VM so far; None while it has no VM (or no cgroup).
    pub cpu_usage_us: Option<u64>,
    pub frozen: bool,
}

/// What to do with an agent.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    Freeze { name: String, because: String },
    Thaw { name: String },
}

#[derive(Default)]
pub struct Arbiter {
    last_usage: BTreeMap<String, (u64, Instant)>,
    /// Batch agents this arbiter froze (and so may thaw).
    frozen: BTreeSet<String>,
    quiet_since: Option<Instant>,
}

impl Arbiter {
    /// Looks at `agents` at `now`; returns what to freeze and thaw.
    pub fn tick(&mut self, agents: &[Seen], now: Instant) -> Vec<Action> {
        let mut working = None;
        for agent in agents {
            let Some(usage) = agent.cpu_usage_us else {
                self.last_usage.remove(&agent.name);
                continue;
            };
            let previous = self.last_usage.insert(agent.name.clone(), (usage, now));
            if agent.class != Some(PriorityClass::Interactive) {
                continue;
            }
            if let Some((before, at)) = previous {
                let wall = now.saturating_duration_since(at).as_secs_f64();
                let share = usage.saturating_sub(before) as f64 / 1e6 / wall.max(1e-3);
                if share >= ACTIVE_SHARE && working.is_none() {
                    working = Some((agent.name.clone(), share));
                }
            }
        }
        let present: BTreeSet<&str> = agents.iter().map(|a| a.name.as_str()).collect();
        self.last_usage
            .retain(|name, _| present.contains(name.as_str()));
        self.frozen.retain(|name| present.contains(name.as_str()));

        let mut actions = Vec::new();
        if let Some((name, share)) = working {
            self.quiet_since = None;
            for agent in agents {
                if agent.class == Some(PriorityClass::Batch)
                    && agent.cpu_usage_us.is_some()
                    && !agent.frozen
                    && self.frozen.insert(agent.name.clone())
                {
                    actions.push(Action::Freeze {
                        name: agent.name.clone(),
                        because: format!("interactive agent `{name}` is using {share:.2} CPUs"),
                    });
                }
            }
        } else if !self.frozen.is_empty() {
            let since = *self.quiet_since.get_or_insert(now);
            if now.saturating_duration_since(since) >= RESUME_AFTER {
                actions.extend(
                    std::mem::take(&mut self.frozen)
                        .into_iter()
                        .map(|name| Action::Thaw { name }),
                );
                self.quiet_since = None;
            }
        }
        actions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(name: &str, class: Option<PriorityClass>, usage: u64, frozen: bool) -> Seen {
        Seen {
            name: name.into(),
            class,
            cpu_usage_us: Some(usage),
            frozen,
        }
    }

    #[test]
    fn batch_agents_freeze_while_an_interactive_one_works_and_thaw_after() {
        use PriorityClass::{Batch, Idle, Interactive};
        let mut arbiter = Arbiter::default();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let world = |fg: u64, paused: bool| {
            vec![
                seen("fg", Some(Interactive), fg, false),
                seen("bg", Some(Batch), 1_000, paused),
                seen("plain", None, 1_000, false),
                seen("low", Some(Idle), 1_000, false),
                seen("byhand", Some(Batch), 1_000, true),
            ]
        };
        assert!(arbiter.tick(&world(0, false), at(0)).is_empty());
        // fg used 0.4 CPUs over 500 ms: bg is frozen; the others are left alone, and one
        // frozen by hand is not taken over.
        let actions = arbiter.tick(&world(200_000, false), at(500));
        assert_eq!(actions.len(), 1, "{actions:?}");
        assert!(matches!(&actions[0], Action::Freeze { name, because }
            if name == "bg" && because.contains("`fg` is using 0.40 CPUs")));
        // Still working: nothing more to do.
        assert!(arbiter.tick(&world(400_000, true), at(1000)).is_empty());
        // Quiet (0.02 CPUs): bg stays frozen for RESUME_AFTER, then thaws; byhand does not.
        assert!(arbiter.tick(&world(410_000, true), at(1500)).is_empty());
        assert!(arbiter.tick(&world(410_000, true), at(2000)).is_empty());
        let actions = arbiter.tick(&world(410_000, true), at(2500));
        assert_eq!(actions, [Action::Thaw { name: "bg".into() }]);
        assert!(arbiter.tick(&world(410_000, false), at(3000)).is_empty());
    }

    #[test]
    fn an_agent_that_leaves_is_forgotten() {
        let mut arbiter = Arbiter::default();
        let t0 = Instant::now();
        let fg = |usage| seen("fg", Some(PriorityClass::Interactive), usage, false);
        let bg = seen("bg", Some(PriorityClass::Batch), 0, false);
        arbiter.tick(
            &[fg(0), seen("bg", Some(PriorityClass::Batch), 0, false)],
            t0,
        );
        let frozen = arbiter.tick(&[fg(500_000), bg], t0 + Duration::from_millis(500));
        assert_eq!(frozen.len(), 1);
        // bg was removed: nothing to thaw later.
        arbiter.tick(&[fg(500_000)], t0 + Duration::from_millis(1000));
        let later = arbiter.tick(&[fg(500_000)], t0 + Duration::from_secs(5));
        assert!(later.is_empty(), "{later:?}");
    }
}
