//! Pure placement: which host takes each of a list of requests.
//!
//! The cluster controller uses it to pick a node for an instance; the cloud controller
//! uses the same function over a zone's nodes to decide whether the zone can take a
//! launch at all, so the two tiers never disagree about what fits.

use crate::Resources;

/// A host as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSnapshot<K> {
    pub key: K,
    pub capacity: Resources,
    pub allocated: Resources,
    /// An unhealthy host takes nothing.
    pub healthy: bool,
}

impl<K> HostSnapshot<K> {
    pub fn free(&self) -> Resources {
        self.capacity.saturating_sub(&self.allocated)
    }
}

/// Why a host was not chosen for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection<K> {
    pub key: K,
    pub reason: String,
}

/// The outcome for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement<K> {
    Placed(K),
    NoCapacity(Vec<Rejection<K>>),
}

/// Places `requests` one after another. Each goes to the healthy host with the most free
/// memory that fits it (spreading load, ties broken by the host order given), and the
/// host's allocation grows before the next request is placed.
pub fn place_all<K: Clone>(
    hosts: &mut [HostSnapshot<K>],
    requests: &[Resources],
) -> Vec<Placement<K>> {
    requests.iter().map(|need| place_one(hosts, need)).collect()
}

fn place_one<K: Clone>(hosts: &mut [HostSnapshot<K>], need: &Resources) -> Placement<K> {
    match place(hosts, need) {
        Some(i) => Placement::Placed(hosts[i].key.clone()),
        None => Placement::NoCapacity(
            hosts
                .iter()
                .map(|host| Rejection {
                    key: host.key.clone(),
                    reason: if host.healthy {
                        format!("not enough {}", host.free().shortfall(need).join(", "))
                    } else {
                        "host is not healthy".into()
                    },
                })
                .collect(),
        ),
    }
}

/// Places one request as [`place_all`] does and returns the index of the host that took
/// it, or `None` when none can (without saying why, which costs more than placing).
pub fn place<K>(hosts: &mut [HostSnapshot<K>], need: &Resources) -> Option<usize> {
    let mut best: Option<(usize, u64)> = None;
    for (i, host) in hosts.iter().enumerate() {
        if !host.healthy {
            continue;
        }
        let free = host.free();
        if free.fits(need) && best.is_none_or(|(_, m)| free.memory_mib > m) {
            best = Some((i, free.memory_mib));
        }
    }
    let (i, _) = best?;
    hosts[i].allocated = hosts[i].allocated.saturating_add(need);
    Some(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(key: &'static str, vcpus: u32, mem: u64, healthy: bool) -> HostSnapshot<&'static str> {
        HostSnapshot {
            key,
            capacity: Resources::new(vcpus, mem, 100),
            allocated: Resources::ZERO,
            healthy,
        }
    }

    #[test]
    fn spreads_to_the_host_with_most_free_memory() {
        let mut hosts = vec![host("a", 4, 4096, true), host("b", 4, 8192, true)];
        let need = Resources::new(1, 2048, 10);
        let got = place_all(&mut hosts, &[need, need, need]);
        assert_eq!(
            got,
            vec![
                Placement::Placed("b"),
                Placement::Placed("b"),
                Placement::Placed("a")
            ]
        );
        assert_eq!(hosts[1].allocated, Resources::new(2, 4096, 20));
    }

    #[test]
    fn explains_every_rejection() {
        let mut hosts = vec![host("sick", 8, 8192, false), host("small", 1, 512, true)];
        let got = place_all(&mut hosts, &[Resources::new(2, 1024, 1)]);
        let Placement::NoCapacity(rej) = &got[0] else {
            panic!("placed: {got:?}")
        };
        assert_eq!(rej.len(), 2);
        assert_eq!(rej[0].reason, "host is not healthy");
        assert_eq!(rej[1].reason, "not enough vcpus, memory");
    }

    #[test]
    fn allocation_is_respected_until_full() {
        let mut hosts = vec![host("a", 2, 2048, true)];
        let need = Resources::new(1, 1024, 10);
        let got = place_all(&mut hosts, &[need, need, need]);
        assert!(matches!(got[2], Placement::NoCapacity(_)));
        assert!(matches!(got[1], Placement::Placed("a")));
    }
}
