//! Proto ↔ domain conversion at the gRPC edge. Everything coming in is validated here, so
//! the core only ever sees well-formed typed values; malformed input becomes
//! [`CcError::InvalidArgument`] / [`CcError::MalformedId`] (both INVALID_ARGUMENT).

use std::collections::BTreeSet;

use canopy_common::{ImageId, InstanceId, InstanceState, NodeId, PowerState, Resources, ZoneName};
use canopy_proto::v1 as pb;

use crate::error::CcError;
use crate::model::{
    InstanceReport, InstanceSpec, NodeDesired, NodeRegistration, NodeSummary, StateReason,
    ZoneDesired,
};

/// A non-empty string as `Some`, the proto3 empty default as `None`.
fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// Parses a required node id.
pub fn node_id(s: &str) -> Result<NodeId, CcError> {
    Ok(NodeId::parse(s)?)
}

/// Parses a required instance id.
pub fn instance_id(s: &str) -> Result<InstanceId, CcError> {
    Ok(InstanceId::parse(s)?)
}

/// Parses an optional node id (empty = none).
fn opt_node_id(s: &str) -> Result<Option<NodeId>, CcError> {
    if s.is_empty() {
        Ok(None)
    } else {
        node_id(s).map(Some)
    }
}

/// Resources from the wire (every value is valid).
pub fn resources_from_proto(r: pb::Resources) -> Resources {
    Resources::new(r.vcpus, r.memory_mib, r.disk_gib)
}

/// Resources for the wire.
pub fn resources_to_proto(r: Resources) -> pb::Resources {
    pb::Resources {
        vcpus: r.vcpus,
        memory_mib: r.memory_mib,
        disk_gib: r.disk_gib,
    }
}

fn power_from_proto(v: i32) -> Result<PowerState, CcError> {
    match pb::PowerState::try_from(v) {
        Ok(pb::PowerState::Running) => Ok(PowerState::Running),
        Ok(pb::PowerState::Stopped) => Ok(PowerState::Stopped),
        Ok(pb::PowerState::Terminated) => Ok(PowerState::Terminated),
        Ok(pb::PowerState::Unspecified) | Err(_) => Err(CcError::InvalidArgument(format!(
            "desired power state {v} is not one of running, stopped, terminated"
        ))),
    }
}

fn power_to_proto(p: PowerState) -> pb::PowerState {
    match p {
        PowerState::Running => pb::PowerState::Running,
        PowerState::Stopped => pb::PowerState::Stopped,
        PowerState::Terminated => pb::PowerState::Terminated,
    }
}

fn observed_from_proto(v: i32) -> Result<InstanceState, CcError> {
    use pb::ObservedState as O;
    match O::try_from(v) {
        Ok(O::Pending) => Ok(InstanceState::Pending),
        Ok(O::Running) => Ok(InstanceState::Running),
        Ok(O::Stopping) => Ok(InstanceState::Stopping),
        Ok(O::Stopped) => Ok(InstanceState::Stopped),
        Ok(O::ShuttingDown) => Ok(InstanceState::ShuttingDown),
        Ok(O::Terminated) => Ok(InstanceState::Terminated),
        Ok(O::Unspecified) | Err(_) => Err(CcError::InvalidArgument(format!(
            "observed state {v} is not an instance state"
        ))),
    }
}

fn observed_to_proto(s: InstanceState) -> pb::ObservedState {
    use pb::ObservedState as O;
    match s {
        InstanceState::Pending => O::Pending,
        InstanceState::Running => O::Running,
        InstanceState::Stopping => O::Stopping,
        InstanceState::Stopped => O::Stopped,
        InstanceState::ShuttingDown => O::ShuttingDown,
        InstanceState::Terminated => O::Terminated,
    }
}

/// An instance spec from the CLC. Missing resources are taken from the instance-type
/// catalogue; an unknown type without resources cannot be placed and is refused.
pub fn instance_spec_from_proto(mut s: pb::InstanceSpec) -> Result<InstanceSpec, CcError> {
    let id = instance_id(&s.instance_id)?;
    let boot = canopy_proto::convert::boot_from_proto(&mut s)
        .map_err(|e| CcError::InvalidArgument(format!("instance {id}: {e}")))?;
    let resources = match s.resources {
        Some(r) => resources_from_proto(r),
        None => canopy_common::InstanceType::lookup(&s.instance_type)
            .map(|t| t.resources)
            .ok_or_else(|| {
                CcError::InvalidArgument(format!(
                    "instance {id} has no resources and instance type {:?} is unknown",
                    s.instance_type
                ))
            })?,
    };
    let image = if s.image_id.is_empty() {
        None
    } else {
        Some(ImageId::parse(&s.image_id)?)
    };
    Ok(InstanceSpec {
        resources,
        image,
        desired: power_from_proto(s.desired)?,
        node: opt_node_id(&s.node_id)?,
        instance_type: s.instance_type,
        user_data: s.user_data,
        key_name: non_empty(s.key_name),
        reboot_seq: s.reboot_seq,
        start_seq: s.start_seq,
        private_ip: opt_ip(&s.private_ip)?,
        metadata: canopy_proto::convert::metadata_from_proto(s.metadata),
        volumes: canopy_proto::convert::volumes_from_proto(s.volumes)
            .map_err(|e| CcError::InvalidArgument(format!("instance {id}: {e}")))?,
        id,
        boot,
    })
}

/// An instance spec for the wire (node documents).
pub fn instance_spec_to_proto(s: &InstanceSpec) -> pb::InstanceSpec {
    let mut spec = pb::InstanceSpec {
        instance_id: s.id.to_string(),
        instance_type: s.instance_type.clone(),
        resources: Some(resources_to_proto(s.resources)),
        image_id: s
            .image
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        user_data: s.user_data.clone(),
        key_name: s.key_name.clone().unwrap_or_default(),
        desired: power_to_proto(s.desired).into(),
        reboot_seq: s.reboot_seq,
        start_seq: s.start_seq,
        private_ip: s.private_ip.map(|ip| ip.to_string()).unwrap_or_default(),
        metadata: Some(canopy_proto::convert::metadata_to_proto(&s.metadata)),
        node_id: s.node.as_ref().map(ToString::to_string).unwrap_or_default(),
        volumes: canopy_proto::convert::volumes_to_proto(&s.volumes),
        ..Default::default()
    };
    canopy_proto::convert::boot_to_proto(&s.boot, &mut spec);
    spec
}

/// The CLC's zone document. Duplicate instance ids are refused: which one would win?
pub fn zone_desired_from_proto(d: pb::ZoneDesiredState) -> Result<ZoneDesired, CcError> {
    let zone = ZoneName::parse(&d.zone)?;
    let instances = d
        .instances
        .into_iter()
        .map(instance_spec_from_proto)
        .collect::<Result<Vec<_>, _>>()?;
    let mut seen = BTreeSet::new();
    for s in &instances {
        if !seen.insert(&s.id) {
            return Err(CcError::InvalidArgument(format!(
                "instance {} appears twice in the zone document",
                s.id
            )));
        }
    }
    Ok(ZoneDesired {
        zone,
        generation: d.generation,
        instances,
        deleted_volumes: canopy_proto::convert::volume_ids_from_proto(d.deleted_volumes)
            .map_err(CcError::InvalidArgument)?,
        snapshots: canopy_proto::convert::snapshot_requests_from_proto(d.snapshots)
            .map_err(CcError::InvalidArgument)?,
    })
}

/// A node document for `NodeController.PutNodeState`.
pub fn node_desired_to_proto(d: &NodeDesired) -> pb::NodeDesiredState {
    pb::NodeDesiredState {
        node_id: d.node.to_string(),
        generation: d.generation,
        instances: d.instances.iter().map(instance_spec_to_proto).collect(),
        deleted_volumes: canopy_proto::convert::volume_ids_to_proto(&d.deleted_volumes),
        snapshots: canopy_proto::convert::snapshot_requests_to_proto(&d.snapshots),
    }
}

/// A report from a node. Its `node_id` is ignored: the envelope says who reports.
pub fn report_from_proto(r: pb::InstanceReport) -> Result<InstanceReport, CcError> {
    let reason =
        (!r.reason_code.is_empty() || !r.reason_message.is_empty()).then_some(StateReason {
            code: r.reason_code,
            message: r.reason_message,
        });
    Ok(InstanceReport {
        instance: instance_id(&r.instance_id)?,
        node: None,
        state: observed_from_proto(r.state)?,
        reason,
        reboot_seq: r.reboot_seq,
        // The CC decides addresses; a node's word on it is not taken.
        private_ip: None,
        volumes: canopy_proto::convert::volume_ids_from_proto(r.volumes)
            .map_err(CcError::InvalidArgument)?,
    })
}

/// A report for `CloudController.ReportInstances`.
pub fn report_to_proto(r: &InstanceReport) -> pb::InstanceReport {
    pb::InstanceReport {
        instance_id: r.instance.to_string(),
        node_id: r.node.as_ref().map(ToString::to_string).unwrap_or_default(),
        state: observed_to_proto(r.state).into(),
        reason_code: r
            .reason
            .as_ref()
            .map(|x| x.code.clone())
            .unwrap_or_default(),
        reason_message: r
            .reason
            .as_ref()
            .map(|x| x.message.clone())
            .unwrap_or_default(),
        reboot_seq: r.reboot_seq,
        private_ip: r.private_ip.map(|ip| ip.to_string()).unwrap_or_default(),
        volumes: canopy_proto::convert::volume_ids_to_proto(&r.volumes),
    }
}

/// An optional IPv4 address: empty is none.
fn opt_ip(s: &str) -> Result<Option<std::net::Ipv4Addr>, CcError> {
    if s.is_empty() {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|_| CcError::InvalidArgument(format!("private_ip: {s:?} is not an IPv4 address")))
}

/// Reports from a node, with the reporting node's id.
pub fn node_reports_from_proto(
    r: pb::NodeInstanceReports,
) -> Result<(NodeId, Vec<InstanceReport>), CcError> {
    let node = node_id(&r.node_id)?;
    let reports = r
        .reports
        .into_iter()
        .map(report_from_proto)
        .collect::<Result<_, _>>()?;
    Ok((node, reports))
}

/// A node registration. The endpoint must be a URI we can dial; the capacity is required.
pub fn registration_from_proto(r: pb::RegisterNodeRequest) -> Result<NodeRegistration, CcError> {
    let node = node_id(&r.node_id)?;
    if tonic::transport::Endpoint::from_shared(r.endpoint.clone()).is_err() || r.endpoint.is_empty()
    {
        return Err(CcError::InvalidArgument(format!(
            "node {node} endpoint {:?} is not a URI",
            r.endpoint
        )));
    }
    let capacity = r.capacity.map(resources_from_proto).ok_or_else(|| {
        CcError::InvalidArgument(format!("node {node} registered without a capacity"))
    })?;
    Ok(NodeRegistration {
        instances: r
            .instances
            .into_iter()
            .map(report_from_proto)
            .collect::<Result<_, _>>()?,
        node,
        endpoint: r.endpoint,
        capacity,
        hypervisor: r.hypervisor,
        hypervisor_detail: r.hypervisor_detail,
    })
}

/// A node summary for the zone heartbeat.
pub fn summary_to_proto(s: &NodeSummary) -> pb::NodeSummary {
    pb::NodeSummary {
        node_id: s.node.to_string(),
        hypervisor: s.hypervisor.clone(),
        hypervisor_detail: s.hypervisor_detail.clone(),
        capacity: Some(resources_to_proto(s.capacity)),
        allocated: Some(resources_to_proto(s.allocated)),
        healthy: s.healthy,
        last_heartbeat_ms: s.last_heartbeat_unix_ms,
        instance_count: s.instance_count,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> pb::InstanceSpec {
        pb::InstanceSpec {
            instance_id: "i-0123456789abcdef0".into(),
            instance_type: "t2.micro".into(),
            resources: None,
            image_id: "ami-0123456789abcdef0".into(),
            desired: pb::PowerState::Running.into(),
            ..Default::default()
        }
    }

    #[test]
    fn spec_round_trips_and_fills_resources_from_the_type() {
        let s = instance_spec_from_proto(spec()).expect("valid");
        assert_eq!(s.resources, Resources::new(1, 1024, 8));
        assert_eq!(s.node, None);
        let back = instance_spec_to_proto(&s);
        assert_eq!(
            back.resources,
            Some(pb::Resources {
                vcpus: 1,
                memory_mib: 1024,
                disk_gib: 8
            })
        );
        assert_eq!(instance_spec_from_proto(back).expect("valid"), s);
    }

    #[test]
    fn malformed_input_is_invalid_argument() {
        let bad_id = pb::InstanceSpec {
            instance_id: "x-1".into(),
            ..spec()
        };
        let no_power = pb::InstanceSpec {
            desired: 0,
            ..spec()
        };
        let bad_hint = pb::InstanceSpec {
            node_id: "a b".into(),
            ..spec()
        };
        let unknown_type = pb::InstanceSpec {
            instance_type: "z9.huge".into(),
            ..spec()
        };
        for s in [bad_id, no_power, bad_hint, unknown_type] {
            let err = instance_spec_from_proto(s).expect_err("must be refused");
            assert_eq!(
                tonic::Status::from(err).code(),
                tonic::Code::InvalidArgument
            );
        }
        let dup = pb::ZoneDesiredState {
            zone: "z-1".into(),
            generation: 1,
            instances: vec![spec(), spec()],
            deleted_volumes: vec![],
            snapshots: vec![],
        };
        assert!(matches!(
            zone_desired_from_proto(dup),
            Err(CcError::InvalidArgument(_))
        ));
        let report = pb::InstanceReport {
            instance_id: "i-0123abcd".into(),
            state: 0,
            ..Default::default()
        };
        assert!(matches!(
            report_from_proto(report),
            Err(CcError::InvalidArgument(_))
        ));
        let reg = pb::RegisterNodeRequest {
            node_id: "n1".into(),
            endpoint: "http://h:1".into(),
            ..Default::default()
        };
        assert!(matches!(
            registration_from_proto(reg),
            Err(CcError::InvalidArgument(_))
        ));
    }
}
