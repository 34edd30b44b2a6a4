//! What the zone scheduler counts as taken, without holding a lock across a commit.
//!
//! Launches commit through the replicated log, which takes milliseconds; serializing them
//! (schedule, commit, next) would cap RunInstances at one commit latency each. Instead the
//! leader keeps a [`LaunchLedger`]: a recent copy of the committed allocations (an SQL
//! aggregate, refreshed every [`REFRESH`] at most) plus every launch scheduled since that
//! copy was read — in flight, or committed after the read began. Choosing a zone and
//! recording the launch happen in one critical section without I/O, so two concurrent
//! launches can never both take the same free room, and many commit together.
//!
//! The ledger also keeps the zones as the scheduler last saw them, with everything it
//! counts already placed on their nodes ([`ZoneSnapshot::settle`]). A launch is decided on
//! that view and then placed into it, so scheduling costs the launch's own instances rather
//! than re-placing every instance not yet on a node each time. The view is rebuilt when the
//! committed copy is re-read, when a counted launch is forgotten, when the zones' live state
//! changes (a heartbeat), and at least every [`VIEW_MAX_AGE`] (a zone that stops
//! heartbeating becomes unavailable by time alone).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use canopy_common::{Resources, ZoneName};

use crate::scheduler::ZoneSnapshot;
use crate::state::{AllocationGroup, StateError, Store};

/// How old the copy of the committed allocations may get. Launches made since are counted
/// from the ledger, so this only bounds how late freed room (terminations) is seen.
const REFRESH: Duration = Duration::from_millis(200);
/// The copy is also kept at least this many times as long as reading it took: the read is
/// an aggregate over every live instance, and must stay a small share of the CPU.
const REFRESH_FACTOR: u32 = 20;
/// The longest the scheduler's view of the zones is reused.
const VIEW_MAX_AGE: Duration = Duration::from_millis(250);

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
    /// The zones with everything above placed, while still valid.
    view: Option<View>,
}

struct View {
    /// What the view was built from, besides the ledger: the caller's version of the zones'
    /// live state and the registered zones.
    version: u64,
    zone_names: Vec<ZoneName>,
    built: Instant,
    zones: Vec<ZoneSnapshot>,
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
            let mut l = self.ledger.lock();
            l.recent.remove(&self.id);
            // Its instances are placed in the view: build it again without them.
            l.view = None;
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
        l.view = None;
        Ok(())
    }

    /// Runs `decide` over the zones with everything allocated placed on their nodes —
    /// committed, or launched by this replica and not yet in the copy — and records the
    /// launch it chooses, `(zone, per-instance resources, count)`, in the same critical
    /// section. `build` makes the zones' snapshots from the allocations when the view must
    /// be rebuilt; `version` changes whenever what `build` reads besides them changes.
    pub fn schedule<T>(
        &self,
        version: u64,
        zone_names: &[ZoneName],
        build: impl FnOnce(&[AllocationGroup]) -> Vec<ZoneSnapshot>,
        decide: impl FnOnce(&[ZoneSnapshot]) -> (T, Option<(ZoneName, Resources, u64)>),
    ) -> (T, Option<Ticket<'_>>) {
        let mut l = self.lock();
        let l = &mut *l;
        let stale = l.view.as_ref().is_none_or(|v| {
            v.version != version || v.zone_names != zone_names || v.built.elapsed() > VIEW_MAX_AGE
        });
        if stale {
            let mut all = l.committed.clone();
            all.extend(l.recent.values().map(|r| AllocationGroup {
                zone: r.zone.clone(),
                node_id: None,
                resources: r.resources,
                count: r.count,
            }));
            let mut zones = build(&all);
            zones.iter_mut().for_each(ZoneSnapshot::settle);
            l.view = Some(View {
                version,
                zone_names: zone_names.to_vec(),
                built: Instant::now(),
                zones,
            });
        }
        let view = l.view.as_mut().expect("built above");
        let (decision, launch) = decide(&view.zones);
        let ticket = launch.map(|(zone, resources, count)| {
            if let Some(z) = view.zones.iter_mut().find(|z| z.zone == zone) {
                z.unplaced
                    .extend(std::iter::repeat_n(resources, count as usize));
                z.settle();
            }
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
        l.view = None;
    }

    #[cfg(test)]
    fn commits(&self) -> u64 {
        self.lock().commits
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use canopy_common::NodeId;
    use canopy_common::placement::HostSnapshot;

    fn zone() -> ZoneName {
        ZoneName::parse("z-1a").unwrap()
    }

    fn small() -> Resources {
        Resources::new(1, 512, 1)
    }

    /// The zone as the tests' scheduler sees it: one node with room for a million.
    fn build(all: &[AllocationGroup]) -> Vec<ZoneSnapshot> {
        vec![ZoneSnapshot {
            zone: zone(),
            available: true,
            hosts: vec![HostSnapshot {
                key: NodeId::parse("n1").unwrap(),
                capacity: Resources::new(1_000_000, 1 << 40, 1 << 40),
                allocated: Resources::ZERO,
                healthy: true,
            }],
            unplaced: all
                .iter()
                .flat_map(|a| std::iter::repeat_n(a.resources, a.count as usize))
                .collect(),
        }]
    }

    /// Total instances the ledger shows for the zone (each takes one vCPU).
    fn seen(ledger: &LaunchLedger) -> u64 {
        seen_at(ledger, 0)
    }

    fn seen_at(ledger: &LaunchLedger, version: u64) -> u64 {
        ledger
            .schedule(version, &[zone()], build, |zones| {
                (u64::from(zones[0].hosts[0].allocated.vcpus), None)
            })
            .0
    }

    fn launch(ledger: &LaunchLedger, count: u64) -> Ticket<'_> {
        ledger
            .schedule(0, &[zone()], build, |_| {
                ((), Some((zone(), small(), count)))
            })
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
    fn the_view_is_rebuilt_when_what_it_was_built_from_changes() {
        let ledger = LaunchLedger::default();
        let builds = std::cell::Cell::new(0);
        let counting = |all: &[AllocationGroup]| {
            builds.set(builds.get() + 1);
            build(all)
        };
        let look = |version| {
            ledger
                .schedule(version, &[zone()], counting, |zones| {
                    (u64::from(zones[0].hosts[0].allocated.vcpus), None)
                })
                .0
        };
        assert_eq!(look(0), 0);
        let _a = launch(&ledger, 2);
        // Placed into the view as it was recorded: no rebuild.
        assert_eq!(look(0), 2);
        assert_eq!(builds.get(), 1);
        // The zones' live state changed: rebuilt, and the launch is still counted.
        assert_eq!(look(1), 2);
        assert_eq!(builds.get(), 2);
        // A forgotten launch leaves the view.
        drop(launch(&ledger, 3));
        assert_eq!(look(1), 2);
        assert_eq!(builds.get(), 3);
        // A new committed copy: rebuilt from it.
        ledger.install(committed_copy(7), ledger.commits());
        assert_eq!(look(1), 9);
        assert_eq!(builds.get(), 4);
    }

    #[test]
    fn deciding_and_recording_are_one_step() {
        // Room for 3: the first launch of 2 fits, the second sees it and does not.
        let ledger = LaunchLedger::default();
        let room = 3;
        let try_launch = |n: u64| {
            ledger.schedule(0, &[zone()], build, |zones| {
                let used = u64::from(zones[0].hosts[0].allocated.vcpus);
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
