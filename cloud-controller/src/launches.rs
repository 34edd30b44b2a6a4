//! What the zone scheduler counts as taken, without holding a lock across a commit.
//!
//! Launches commit through the replicated log, which takes milliseconds; serializing them
//! (schedule, commit, next) would cap RunInstances at one commit latency each. Instead the
//! leader keeps a [`LaunchLedger`]: a recent copy of the committed allocations (an SQL
//! aggregate, refreshed every [`REFRESH`] at most) plus every launch scheduled since that
//! copy was read — in flight, or committed after the read began. Choosing a zone and
//! recording the launch happen in one critical section without I/O, so two concurrent
//! launches can never both take the same free room, and many commit together.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use canopy_common::{Resources, ZoneName};

use crate::state::{AllocationGroup, StateError, Store};

/// How old the copy of the committed allocations may get. Launches made since are counted
/// from the ledger, so this only bounds how late freed room (terminations) is seen.
const REFRESH: Duration = Duration::from_millis(200);
/// The copy is also kept at least this many times as long as reading it took: the read is
/// an aggregate over every live instance, and must stay a small share of the CPU.
const REFRESH_FACTOR: u32 = 20;

/// Launches scheduled by this replica and not yet in its copy of the committed allocations.
#[derive(Default)]
pub struct LaunchLedger {
    inner: Mutex<Ledger>,
}

#[derive(Default)]
struct Ledger {
    /// The committed allocations as last read, when, and how long until the next read.
    committed: Vec<AllocationGroup>,
    read_at: Option<Instant>,
    keep: Duration,
    /// A refresh is reading: the others go on with the current copy.
    reading: bool,
    /// Counts commits of recorded launches; a launch committed at `n` is in every copy whose
    /// read began when the counter was already `n` or more.
    commits: u64,
    next_ticket: u64,
    recent: HashMap<u64, Recent>,
}

struct Recent {
    zone: ZoneName,
    resources: Resources,
    count: u64,
    /// The commit counter once the launch committed.
    committed_at: Option<u64>,
}

/// A launch recorded in the ledger. Dropped without [`Ticket::committed`], the launch is
/// forgotten (it failed, or the request was cancelled).
pub struct Ticket<'a> {
    ledger: &'a LaunchLedger,
    id: u64,
    done: bool,
}

impl Ticket<'_> {
    /// The launch committed (this replica has applied it).
    pub fn committed(mut self) {
        let mut l = self.ledger.lock();
        l.commits += 1;
        let at = l.commits;
        if let Some(r) = l.recent.get_mut(&self.id) {
            r.committed_at = Some(at);
        }
        self.done = true;
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.ledger.lock().recent.remove(&self.id);
        }
    }
}

impl LaunchLedger {
    fn lock(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Re-reads the committed allocations when the copy is older than [`REFRESH`]. One
    /// caller reads at a time; while it does, the others go on with the current copy (once
    /// there is one), which the ledger's recent launches keep safe to schedule against.
    pub async fn refresh(&self, store: &Store) -> Result<(), StateError> {
        let began = {
            let mut l = self.lock();
            if l.read_at.is_some_and(|t| t.elapsed() < l.keep.max(REFRESH)) {
                return Ok(());
            }
            if l.reading && l.read_at.is_some() {
                return Ok(());
            }
            l.reading = true;
            l.commits
        };
        // Cleared however the read ends (an error, or the request dropped mid-read).
        struct Reading<'a>(&'a LaunchLedger);
        impl Drop for Reading<'_> {
            fn drop(&mut self) {
                self.0.lock().reading = false;
            }
        }
        let _reading = Reading(self);
        let read_at = Instant::now();
        let committed = store.allocations().await?;
        let mut l = self.lock();
        // A concurrent refresh may have installed a newer copy meanwhile.
        if l.read_at.is_some_and(|t| t >= read_at) {
            return Ok(());
        }
        l.committed = committed;
        l.read_at = Some(read_at);
        l.keep = read_at.elapsed() * REFRESH_FACTOR;
        l.recent
            .retain(|_, r| r.committed_at.is_none_or(|at| at > began));
        Ok(())
    }

    /// Runs `decide` over everything allocated — committed, or launched by this replica and
    /// not yet in the copy (counted as not placed on a node yet) — and records the launch it
    /// chooses, `(zone, per-instance resources, count)`, in the same critical section.
    pub fn schedule<T>(
        &self,
        decide: impl FnOnce(&[AllocationGroup]) -> (T, Option<(ZoneName, Resources, u64)>),
    ) -> (T, Option<Ticket<'_>>) {
        let mut l = self.lock();
        let mut all = l.committed.clone();
        all.extend(l.recent.values().map(|r| AllocationGroup {
            zone: r.zone.clone(),
            node_id: None,
            resources: r.resources,
            count: r.count,
        }));
        let (decision, launch) = decide(&all);
        let ticket = launch.map(|(zone, resources, count)| {
            l.next_ticket += 1;
            let id = l.next_ticket;
            l.recent.insert(
                id,
                Recent {
                    zone,
                    resources,
                    count,
                    committed_at: None,
                },
            );
            Ticket {
                ledger: self,
                id,
                done: false,
            }
        });
        (decision, ticket)
    }

    #[cfg(test)]
    fn install(&self, committed: Vec<AllocationGroup>, began: u64) {
        let mut l = self.lock();
        l.committed = committed;
        l.read_at = Some(Instant::now());
        l.recent
            .retain(|_, r| r.committed_at.is_none_or(|at| at > began));
    }

    #[cfg(test)]
    fn commits(&self) -> u64 {
        self.lock().commits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone() -> ZoneName {
        ZoneName::parse("z-1a").unwrap()
    }

    fn small() -> Resources {
        Resources::new(1, 512, 1)
    }

    /// Total instances the ledger shows for the zone.
    fn seen(ledger: &LaunchLedger) -> u64 {
        ledger
            .schedule(|all| (all.iter().map(|a| a.count).sum::<u64>(), None))
            .0
    }

    fn launch(ledger: &LaunchLedger, count: u64) -> Ticket<'_> {
        ledger
            .schedule(|_| ((), Some((zone(), small(), count))))
            .1
            .unwrap()
    }

    fn committed_copy(count: u64) -> Vec<AllocationGroup> {
        vec![AllocationGroup {
            zone: zone(),
            node_id: None,
            resources: small(),
            count,
        }]
    }

    #[test]
    fn launches_count_until_a_copy_read_after_their_commit_includes_them() {
        let ledger = LaunchLedger::default();
        let a = launch(&ledger, 2);
        let b = launch(&ledger, 3);
        assert_eq!(seen(&ledger), 5, "in-flight launches count");
        a.committed();
        // A copy whose read began before `a` committed does not include it: `a` stays.
        ledger.install(Vec::new(), 0);
        assert_eq!(seen(&ledger), 5);
        // A copy read after it (which therefore holds its 2 instances) replaces it.
        let began = ledger.commits();
        ledger.install(committed_copy(2), began);
        assert_eq!(seen(&ledger), 5, "b still in flight, a now in the copy");
        b.committed();
        let began = ledger.commits();
        ledger.install(committed_copy(5), began);
        assert_eq!(seen(&ledger), 5);
    }

    #[tokio::test]
    async fn one_refresh_reads_at_a_time_and_the_others_use_the_copy() {
        let store = Store::in_memory().await.unwrap();
        let ledger = LaunchLedger::default();
        ledger.refresh(&store).await.unwrap();
        let first = ledger.lock().read_at;
        assert!(first.is_some());
        // Stale, but another caller is reading: no second read.
        ledger.lock().read_at = Some(Instant::now() - 2 * REFRESH);
        ledger.lock().reading = true;
        let stale = ledger.lock().read_at;
        ledger.refresh(&store).await.unwrap();
        assert_eq!(ledger.lock().read_at, stale);
        // Once that read is over, the next caller reads.
        ledger.lock().reading = false;
        ledger.refresh(&store).await.unwrap();
        assert!(ledger.lock().read_at > stale);
        assert!(!ledger.lock().reading, "cleared after the read");
    }

    #[test]
    fn a_failed_or_cancelled_launch_is_forgotten() {
        let ledger = LaunchLedger::default();
        let t = launch(&ledger, 4);
        assert_eq!(seen(&ledger), 4);
        drop(t);
        assert_eq!(seen(&ledger), 0);
    }

    #[test]
    fn deciding_and_recording_are_one_step() {
        // Room for 3: the first launch of 2 fits, the second sees it and does not.
        let ledger = LaunchLedger::default();
        let room = 3;
        let try_launch = |n: u64| {
            ledger.schedule(|all| {
                let used: u64 = all.iter().map(|a| a.count).sum();
                let fits = used + n <= room;
                (fits, fits.then(|| (zone(), small(), n)))
            })
        };
        let (first, t1) = try_launch(2);
        let (second, t2) = try_launch(2);
        assert!(first && t1.is_some());
        assert!(!second && t2.is_none());
    }
}
