//! The first tier of scheduling: which availability zone takes a launch.
//!
//! Pure and synchronous: a snapshot of every zone in, a decision (with the reason each
//! zone was passed over) out. The cluster controller later picks the node inside the zone
//! with the same placement function, so a zone accepted here has room for the launch.

use canopy_common::placement::{HostSnapshot, Placement, place, place_all};
use canopy_common::{NodeId, Resources, ZoneName};

#[derive(Debug, Clone)]
pub struct ZoneSnapshot {
    pub zone: ZoneName,
    /// False while the zone's CC is not heartbeating.
    pub available: bool,
    /// The zone's nodes with what the CLC's own records allocate on each.
    pub hosts: Vec<HostSnapshot<NodeId>>,
    /// Instances in the zone not yet placed on a node, which will take room first.
    pub unplaced: Vec<Resources>,
}

impl ZoneSnapshot {
    /// Places the unplaced instances on the hosts (those that fit), as [`choose_zone`]
    /// does before it decides, so that deciding on the settled snapshot gives the same
    /// answer without placing them again.
    pub fn settle(&mut self) {
        for need in std::mem::take(&mut self.unplaced) {
            place(&mut self.hosts, &need);
        }
    }
}

#[derive(Debug, Clone)]
pub struct LaunchRequest {
    pub zone: Option<ZoneName>,
    pub per_instance: Resources,
    pub min_count: u32,
    pub max_count: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Launch { zone: ZoneName, count: u32 },
    NoCapacity { reasons: Vec<String> },
    UnknownZone(ZoneName),
}

/// Picks the zone for `req`: the named one, or the least loaded (most free memory) of the
/// zones that can take at least `min_count`. Launches as many as fit, up to `max_count`.
pub fn choose_zone(zones: &[ZoneSnapshot], req: &LaunchRequest) -> Decision {
    if let Some(want) = &req.zone
        && !zones.iter().any(|z| &z.zone == want)
    {
        return Decision::UnknownZone(want.clone());
    }
    let mut reasons = Vec::new();
    let mut best: Option<(ZoneName, u32, u64)> = None;
    for z in zones
        .iter()
        .filter(|z| req.zone.as_ref().is_none_or(|w| w == &z.zone))
    {
        if !z.available {
            reasons.push(format!("{}: zone is unavailable", z.zone));
            continue;
        }
        let (count, free_mem, why) = fit_count(z, req);
        if count < req.min_count {
            reasons.push(format!(
                "{}: room for {count} of {} ({why})",
                z.zone, req.min_count
            ));
            continue;
        }
        if best.as_ref().is_none_or(|(_, _, m)| free_mem > *m) {
            best = Some((z.zone.clone(), count, free_mem));
        }
    }
    match best {
        Some((zone, count, _)) => Decision::Launch { zone, count },
        None => {
            if reasons.is_empty() {
                reasons.push("no availability zone is registered".into());
            }
            Decision::NoCapacity { reasons }
        }
    }
}

/// Whether `node` of `zone` has room for an instance there to grow by `growth` (a stopped
/// instance whose type changes keeps its node: its disk lives there). `zones` is a settled
/// view. A node the snapshot does not list (its CC or the node itself not heard from yet)
/// is not refused here: the node's own accounting is the last guard.
pub fn room_to_grow(
    zones: &[ZoneSnapshot],
    zone: &ZoneName,
    node: &NodeId,
    growth: &Resources,
) -> Result<(), String> {
    let Some(host) = zones
        .iter()
        .filter(|z| &z.zone == zone)
        .flat_map(|z| &z.hosts)
        .find(|h| &h.key == node)
    else {
        return Ok(());
    };
    let free = host.free();
    if free.fits(growth) {
        Ok(())
    } else {
        Err(format!(
            "node {node} has not enough {}",
            free.shortfall(growth).join(", ")
        ))
    }
}

/// How many of the request fit in the zone, the zone's free memory after its unplaced
/// instances, and why placement stopped.
fn fit_count(z: &ZoneSnapshot, req: &LaunchRequest) -> (u32, u64, String) {
    let mut hosts = z.hosts.clone();
    place_all(&mut hosts, &z.unplaced);
    let free_mem = hosts
        .iter()
        .filter(|h| h.healthy)
        .map(|h| h.free().memory_mib)
        .sum();
    let wanted = vec![req.per_instance; req.max_count as usize];
    let mut count = 0;
    let mut why = String::from("fits");
    for p in place_all(&mut hosts, &wanted) {
        match p {
            Placement::Placed(_) => count += 1,
            Placement::NoCapacity(rejections) => {
                why = if rejections.is_empty() {
                    "no nodes".into()
                } else {
                    rejections
                        .iter()
                        .map(|r| format!("{}: {}", r.key, r.reason))
                        .collect::<Vec<_>>()
                        .join("; ")
                };
                break;
            }
        }
    }
    (count, free_mem, why)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone(name: &str, available: bool, nodes: &[(u32, u64, bool)]) -> ZoneSnapshot {
        ZoneSnapshot {
            zone: ZoneName::parse(name).unwrap(),
            available,
            hosts: nodes
                .iter()
                .enumerate()
                .map(|(i, (cpu, mem, healthy))| HostSnapshot {
                    key: NodeId::parse(&format!("n{i}")).unwrap(),
                    capacity: Resources::new(*cpu, *mem, 1000),
                    allocated: Resources::ZERO,
                    healthy: *healthy,
                })
                .collect(),
            unplaced: vec![],
        }
    }

    fn req(zone: Option<&str>, min: u32, max: u32) -> LaunchRequest {
        LaunchRequest {
            zone: zone.map(|z| ZoneName::parse(z).unwrap()),
            per_instance: Resources::new(1, 1024, 10),
            min_count: min,
            max_count: max,
        }
    }

    #[test]
    fn picks_the_least_loaded_zone() {
        let zones = [
            zone("a", true, &[(8, 4096, true)]),
            zone("b", true, &[(8, 8192, true)]),
        ];
        assert_eq!(
            choose_zone(&zones, &req(None, 1, 2)),
            Decision::Launch {
                zone: zones[1].zone.clone(),
                count: 2
            }
        );
    }

    #[test]
    fn honours_the_named_zone_and_refuses_unknown_ones() {
        let zones = [
            zone("a", true, &[(8, 4096, true)]),
            zone("b", true, &[(8, 8192, true)]),
        ];
        assert_eq!(
            choose_zone(&zones, &req(Some("a"), 1, 1)),
            Decision::Launch {
                zone: zones[0].zone.clone(),
                count: 1
            }
        );
        assert_eq!(
            choose_zone(&zones, &req(Some("c"), 1, 1)),
            Decision::UnknownZone(ZoneName::parse("c").unwrap())
        );
    }

    #[test]
    fn launches_between_min_and_max() {
        let zones = [zone("a", true, &[(3, 100_000, true)])];
        assert_eq!(
            choose_zone(&zones, &req(None, 2, 5)),
            Decision::Launch {
                zone: zones[0].zone.clone(),
                count: 3
            }
        );
        let Decision::NoCapacity { reasons } = choose_zone(&zones, &req(None, 4, 5)) else {
            panic!()
        };
        assert!(reasons[0].contains("room for 3 of 4"), "{reasons:?}");
        assert!(reasons[0].contains("not enough vcpus"), "{reasons:?}");
    }

    #[test]
    fn unplaced_instances_take_room_first() {
        let mut z = zone("a", true, &[(2, 100_000, true)]);
        z.unplaced = vec![Resources::new(1, 1024, 10)];
        assert_eq!(
            choose_zone(&[z], &req(None, 1, 5)),
            Decision::Launch {
                zone: ZoneName::parse("a").unwrap(),
                count: 1
            }
        );
    }

    #[test]
    fn a_settled_snapshot_decides_as_the_unsettled_one() {
        let mut a = zone("a", true, &[(4, 8192, true), (4, 4096, true)]);
        a.unplaced = vec![Resources::new(1, 1024, 10); 5];
        let b = zone("b", true, &[(8, 6144, true)]);
        let mut settled = [a.clone(), b.clone()];
        settled.iter_mut().for_each(ZoneSnapshot::settle);
        assert!(settled[0].unplaced.is_empty());
        assert_eq!(
            settled[0]
                .hosts
                .iter()
                .map(|h| h.allocated.vcpus)
                .sum::<u32>(),
            5
        );
        for r in [
            req(None, 1, 1),
            req(None, 2, 6),
            req(Some("a"), 1, 4),
            req(None, 9, 9),
        ] {
            assert_eq!(
                choose_zone(&settled, &r),
                choose_zone(&[a.clone(), b.clone()], &r),
                "{r:?}"
            );
        }
    }

    #[test]
    fn unavailable_zones_and_unhealthy_nodes_take_nothing() {
        let zones = [
            zone("a", false, &[(8, 8192, true)]),
            zone("b", true, &[(8, 8192, false)]),
        ];
        let Decision::NoCapacity { reasons } = choose_zone(&zones, &req(None, 1, 1)) else {
            panic!()
        };
        assert_eq!(reasons.len(), 2);
        assert!(reasons[0].contains("unavailable"));
        assert!(reasons[1].contains("not healthy"));
        let Decision::NoCapacity { reasons } = choose_zone(&[], &req(None, 1, 1)) else {
            panic!()
        };
        assert_eq!(
            reasons,
            vec!["no availability zone is registered".to_string()]
        );
    }

    #[test]
    fn an_instance_grows_only_where_its_node_has_room() {
        let mut z = zone("z1", true, &[(4, 8192, true), (4, 8192, true)]);
        z.hosts[0].allocated = Resources::new(2, 6144, 20);
        let zones = [z];
        let z1 = ZoneName::parse("z1").unwrap();
        let n0 = NodeId::parse("n0").unwrap();
        let n1 = NodeId::parse("n1").unwrap();
        assert_eq!(
            room_to_grow(&zones, &z1, &n0, &Resources::new(2, 2048, 10)),
            Ok(())
        );
        // The other node's free room does not help: the disk lives on n0.
        let err = room_to_grow(&zones, &z1, &n0, &Resources::new(1, 4096, 10)).unwrap_err();
        assert!(err.contains("n0") && err.contains("memory"), "{err}");
        assert_eq!(
            room_to_grow(&zones, &z1, &n1, &Resources::new(1, 4096, 10)),
            Ok(())
        );
        // A node not heard from is left to the node's own accounting.
        let unknown = NodeId::parse("n9").unwrap();
        assert_eq!(
            room_to_grow(&zones, &z1, &unknown, &Resources::new(64, 1 << 30, 10)),
            Ok(())
        );
    }
}
