//! The instance lifecycle: one state type, one event type, one `transition` function.
//!
//! Requests (from the EC2 API) and observations (reported by the node that runs the
//! instance) are both events. A request that is illegal in the current state becomes an
//! `IncorrectInstanceState` error at the API edge; an observation that is illegal is a
//! stale or reordered report and is ignored by the state machine's caller.

use std::fmt;

use serde::{Deserialize, Serialize};

/// EC2's six instance states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceState {
    Pending,
    Running,
    ShuttingDown,
    Terminated,
    Stopping,
    Stopped,
}

impl InstanceState {
    pub const ALL: [InstanceState; 6] = [
        InstanceState::Pending,
        InstanceState::Running,
        InstanceState::ShuttingDown,
        InstanceState::Terminated,
        InstanceState::Stopping,
        InstanceState::Stopped,
    ];

    /// EC2's state name, as DescribeInstances prints it.
    pub fn name(self) -> &'static str {
        match self {
            InstanceState::Pending => "pending",
            InstanceState::Running => "running",
            InstanceState::ShuttingDown => "shutting-down",
            InstanceState::Terminated => "terminated",
            InstanceState::Stopping => "stopping",
            InstanceState::Stopped => "stopped",
        }
    }

    /// EC2's state code (the low byte of `instanceState.code`).
    pub fn code(self) -> u16 {
        match self {
            InstanceState::Pending => 0,
            InstanceState::Running => 16,
            InstanceState::ShuttingDown => 32,
            InstanceState::Terminated => 48,
            InstanceState::Stopping => 64,
            InstanceState::Stopped => 80,
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// True while the instance holds resources on a node.
    pub fn holds_capacity(self) -> bool {
        self != InstanceState::Terminated
    }
}

impl fmt::Display for InstanceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The power state a user asked for; what the nodes converge to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PowerState {
    Running,
    Stopped,
    Terminated,
}

impl PowerState {
    pub fn name(self) -> &'static str {
        match self {
            PowerState::Running => "running",
            PowerState::Stopped => "stopped",
            PowerState::Terminated => "terminated",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [
            PowerState::Running,
            PowerState::Stopped,
            PowerState::Terminated,
        ]
        .into_iter()
        .find(|s| s.name() == name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LifecycleEvent {
    /// StopInstances.
    StopRequested,
    /// StartInstances.
    StartRequested,
    /// TerminateInstances.
    TerminateRequested,
    /// RebootInstances: legal only while running; the state does not change.
    RebootRequested,
    /// The node reports what it sees.
    Observed(InstanceState),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cannot apply {event:?} to an instance that is {from}")]
pub struct IllegalTransition {
    pub from: InstanceState,
    pub event: LifecycleEvent,
}

/// The whole lifecycle. Returns the next state or why the event cannot happen now.
pub fn transition(
    from: InstanceState,
    event: LifecycleEvent,
) -> Result<InstanceState, IllegalTransition> {
    use InstanceState::*;
    use LifecycleEvent::*;
    let illegal = Err(IllegalTransition { from, event });
    let next = match (from, event) {
        // Requests.
        (Pending | Running | Stopping, StopRequested) => Stopping,
        (Stopped, StopRequested) => Stopped,
        (ShuttingDown | Terminated, StopRequested) => return illegal,

        (Stopped | Pending, StartRequested) => Pending,
        (Running, StartRequested) => Running,
        (Stopping | ShuttingDown | Terminated, StartRequested) => return illegal,

        (Terminated, TerminateRequested) => Terminated,
        (_, TerminateRequested) => ShuttingDown,

        (Running, RebootRequested) => Running,
        (_, RebootRequested) => return illegal,

        // Observations. Terminated is final; anything may end there.
        (Terminated, Observed(Terminated)) => Terminated,
        (Terminated, Observed(_)) => return illegal,
        (_, Observed(Terminated)) => Terminated,
        // The node began tearing the instance down on its own (e.g. a failed launch).
        (_, Observed(ShuttingDown)) => ShuttingDown,
        (ShuttingDown, Observed(_)) => return illegal,

        (Pending, Observed(Pending)) => Pending,
        (Pending | Running, Observed(Running)) => Running,
        // The guest powered itself off, or a stop we asked for is under way / done.
        (Running | Stopping, Observed(Stopping)) => Stopping,
        (Running | Stopping | Stopped, Observed(Stopped)) => Stopped,
        // A report from before a request that has not reached the node yet.
        (_, Observed(_)) => return illegal,
    };
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::InstanceState::*;
    use super::LifecycleEvent::*;
    use super::*;

    fn all_events() -> Vec<LifecycleEvent> {
        let mut v = vec![
            StopRequested,
            StartRequested,
            TerminateRequested,
            RebootRequested,
        ];
        v.extend(InstanceState::ALL.into_iter().map(Observed));
        v
    }

    /// Every (state, event) pair, written out: `None` is illegal.
    fn expected(from: InstanceState, event: LifecycleEvent) -> Option<InstanceState> {
        let table: &[(InstanceState, LifecycleEvent, Option<InstanceState>)] = &[
            (Pending, StopRequested, Some(Stopping)),
            (Pending, StartRequested, Some(Pending)),
            (Pending, TerminateRequested, Some(ShuttingDown)),
            (Pending, RebootRequested, None),
            (Pending, Observed(Pending), Some(Pending)),
            (Pending, Observed(Running), Some(Running)),
            (Pending, Observed(Stopping), None),
            (Pending, Observed(Stopped), None),
            (Pending, Observed(ShuttingDown), Some(ShuttingDown)),
            (Pending, Observed(Terminated), Some(Terminated)),
            (Running, StopRequested, Some(Stopping)),
            (Running, StartRequested, Some(Running)),
            (Running, TerminateRequested, Some(ShuttingDown)),
            (Running, RebootRequested, Some(Running)),
            (Running, Observed(Pending), None),
            (Running, Observed(Running), Some(Running)),
            (Running, Observed(Stopping), Some(Stopping)),
            (Running, Observed(Stopped), Some(Stopped)),
            (Running, Observed(ShuttingDown), Some(ShuttingDown)),
            (Running, Observed(Terminated), Some(Terminated)),
            (Stopping, StopRequested, Some(Stopping)),
            (Stopping, StartRequested, None),
            (Stopping, TerminateRequested, Some(ShuttingDown)),
            (Stopping, RebootRequested, None),
            (Stopping, Observed(Pending), None),
            (Stopping, Observed(Running), None),
            (Stopping, Observed(Stopping), Some(Stopping)),
            (Stopping, Observed(Stopped), Some(Stopped)),
            (Stopping, Observed(ShuttingDown), Some(ShuttingDown)),
            (Stopping, Observed(Terminated), Some(Terminated)),
            (Stopped, StopRequested, Some(Stopped)),
            (Stopped, StartRequested, Some(Pending)),
            (Stopped, TerminateRequested, Some(ShuttingDown)),
            (Stopped, RebootRequested, None),
            (Stopped, Observed(Pending), None),
            (Stopped, Observed(Running), None),
            (Stopped, Observed(Stopping), None),
            (Stopped, Observed(Stopped), Some(Stopped)),
            (Stopped, Observed(ShuttingDown), Some(ShuttingDown)),
            (Stopped, Observed(Terminated), Some(Terminated)),
            (ShuttingDown, StopRequested, None),
            (ShuttingDown, StartRequested, None),
            (ShuttingDown, TerminateRequested, Some(ShuttingDown)),
            (ShuttingDown, RebootRequested, None),
            (ShuttingDown, Observed(Pending), None),
            (ShuttingDown, Observed(Running), None),
            (ShuttingDown, Observed(Stopping), None),
            (ShuttingDown, Observed(Stopped), None),
            (ShuttingDown, Observed(ShuttingDown), Some(ShuttingDown)),
            (ShuttingDown, Observed(Terminated), Some(Terminated)),
            (Terminated, StopRequested, None),
            (Terminated, StartRequested, None),
            (Terminated, TerminateRequested, Some(Terminated)),
            (Terminated, RebootRequested, None),
            (Terminated, Observed(Pending), None),
            (Terminated, Observed(Running), None),
            (Terminated, Observed(Stopping), None),
            (Terminated, Observed(Stopped), None),
            (Terminated, Observed(ShuttingDown), None),
            (Terminated, Observed(Terminated), Some(Terminated)),
        ];
        table
            .iter()
            .find(|(f, e, _)| *f == from && *e == event)
            .map(|(_, _, to)| *to)
            .unwrap_or_else(|| panic!("table misses ({from:?}, {event:?})"))
    }

    #[test]
    fn every_transition_matches_the_table() {
        let mut checked = 0;
        for from in InstanceState::ALL {
            for event in all_events() {
                let got = transition(from, event).ok();
                assert_eq!(got, expected(from, event), "({from:?}, {event:?})");
                if got.is_none() {
                    assert_eq!(
                        transition(from, event),
                        Err(IllegalTransition { from, event })
                    );
                }
                checked += 1;
            }
        }
        assert_eq!(checked, 60);
    }

    #[test]
    fn terminated_is_final() {
        for event in all_events() {
            if let Ok(next) = transition(Terminated, event) {
                assert_eq!(next, Terminated);
            }
        }
    }

    #[test]
    fn names_and_codes_are_ec2s() {
        let pairs: Vec<_> = InstanceState::ALL
            .iter()
            .map(|s| (s.name(), s.code()))
            .collect();
        assert_eq!(
            pairs,
            vec![
                ("pending", 0),
                ("running", 16),
                ("shutting-down", 32),
                ("terminated", 48),
                ("stopping", 64),
                ("stopped", 80)
            ]
        );
        for s in InstanceState::ALL {
            assert_eq!(InstanceState::from_name(s.name()), Some(s));
        }
    }
}
