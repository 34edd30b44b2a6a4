//! The edge between prost types and the agent's domain types. Input from the wire is
//! validated here (typed ids, known enum values, required fields); malformed input becomes
//! `NcError::InvalidArgument`, which the service maps to `INVALID_ARGUMENT`.

use std::collections::BTreeMap;

use canopy_common::{ImageId, InstanceId, InstanceState, NodeId, PowerState, Resources};
use canopy_proto::v1 as pb;

use crate::error::NcError;
use crate::model::{DesiredInstance, DesiredState, InstanceReport};

fn invalid(message: String) -> NcError {
    NcError::InvalidArgument(message)
}

/// Parses an instance id from the wire.
pub fn instance_id(value: &str) -> Result<InstanceId, NcError> {
    InstanceId::parse(value).map_err(|e| invalid(e.to_string()))
}

pub fn resources_from_proto(r: pb::Resources) -> Resources {
    Resources::new(r.vcpus, r.memory_mib, r.disk_gib)
}

pub fn resources_to_proto(r: Resources) -> pb::Resources {
    pb::Resources {
        vcpus: r.vcpus,
        memory_mib: r.memory_mib,
        disk_gib: r.disk_gib,
    }
}

fn power_state_from_proto(value: i32, id: &InstanceId) -> Result<PowerState, NcError> {
    match pb::PowerState::try_from(value) {
        Ok(pb::PowerState::Running) => Ok(PowerState::Running),
        Ok(pb::PowerState::Stopped) => Ok(PowerState::Stopped),
        Ok(pb::PowerState::Terminated) => Ok(PowerState::Terminated),
        Ok(pb::PowerState::Unspecified) | Err(_) => Err(invalid(format!(
            "instance {id}: desired power state {value} is not valid"
        ))),
    }
}

/// One instance of a desired-state document.
pub fn instance_from_proto(mut spec: pb::InstanceSpec) -> Result<DesiredInstance, NcError> {
    let id = instance_id(&spec.instance_id)?;
    let boot = canopy_proto::convert::boot_from_proto(&mut spec)
        .map_err(|e| invalid(format!("instance {id}: {e}")))?;
    let resources = spec
        .resources
        .map(resources_from_proto)
        .ok_or_else(|| invalid(format!("instance {id}: resources are missing")))?;
    let image_id =
        ImageId::parse(&spec.image_id).map_err(|e| invalid(format!("instance {id}: {e}")))?;
    let desired = power_state_from_proto(spec.desired, &id)?;
    let private_ip = if spec.private_ip.is_empty() {
        None
    } else {
        Some(spec.private_ip.parse().map_err(|_| {
            invalid(format!(
                "instance {id}: private_ip {:?} is not an IPv4 address",
                spec.private_ip
            ))
        })?)
    };
    let volumes = canopy_proto::convert::volumes_from_proto(spec.volumes)
        .map_err(|e| invalid(format!("instance {id}: {e}")))?;
    Ok(DesiredInstance {
        instance_id: id,
        instance_type: spec.instance_type,
        resources,
        image_id,
        user_data: spec.user_data,
        key_name: Some(spec.key_name).filter(|k| !k.is_empty()),
        desired,
        reboot_seq: spec.reboot_seq,
        start_seq: spec.start_seq,
        private_ip,
        metadata: canopy_proto::convert::metadata_from_proto(spec.metadata),
        volumes,
        boot,
    })
}

/// A node's desired-state document and the node it is addressed to (`None` when the
/// sender left `node_id` empty).
pub fn desired_state_from_proto(
    doc: pb::NodeDesiredState,
) -> Result<(Option<NodeId>, DesiredState), NcError> {
    let node = if doc.node_id.is_empty() {
        None
    } else {
        Some(NodeId::parse(&doc.node_id).map_err(|e| invalid(e.to_string()))?)
    };
    let mut instances = BTreeMap::new();
    for spec in doc.instances {
        let instance = instance_from_proto(spec)?;
        let id = instance.instance_id.clone();
        if instances.insert(id.clone(), instance).is_some() {
            return Err(invalid(format!("instance {id} appears twice")));
        }
    }
    Ok((
        node,
        DesiredState {
            generation: doc.generation,
            instances,
            deleted_volumes: canopy_proto::convert::volume_ids_from_proto(doc.deleted_volumes)
                .map_err(invalid)?,
            snapshots: canopy_proto::convert::snapshot_requests_from_proto(doc.snapshots)
                .map_err(invalid)?,
        },
    ))
}

pub fn observed_state_to_proto(state: InstanceState) -> pb::ObservedState {
    match state {
        InstanceState::Pending => pb::ObservedState::Pending,
        InstanceState::Running => pb::ObservedState::Running,
        InstanceState::Stopping => pb::ObservedState::Stopping,
        InstanceState::Stopped => pb::ObservedState::Stopped,
        InstanceState::ShuttingDown => pb::ObservedState::ShuttingDown,
        InstanceState::Terminated => pb::ObservedState::Terminated,
    }
}

pub fn report_to_proto(report: &InstanceReport, node_id: &NodeId) -> pb::InstanceReport {
    let (reason_code, reason_message) = match &report.reason {
        Some(r) => (r.code.to_owned(), r.message.clone()),
        None => (String::new(), String::new()),
    };
    pb::InstanceReport {
        instance_id: report.instance_id.to_string(),
        node_id: node_id.to_string(),
        state: observed_state_to_proto(report.state) as i32,
        reason_code,
        reason_message,
        reboot_seq: report.reboot_seq,
        // The CC sets it: addresses are the CC's.
        private_ip: String::new(),
        volumes: canopy_proto::convert::volume_ids_to_proto(&report.volumes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{StateReason, reason};

    const ID: &str = "i-0123456789abcdef0";
    const AMI: &str = "ami-0123456789abcdef0";

    fn spec() -> pb::InstanceSpec {
        pb::InstanceSpec {
            instance_id: ID.into(),
            instance_type: "t2.micro".into(),
            resources: Some(pb::Resources {
                vcpus: 1,
                memory_mib: 1024,
                disk_gib: 8,
            }),
            image_id: AMI.into(),
            user_data: b"#!/bin/sh\n".to_vec(),
            key_name: String::new(),
            desired: pb::PowerState::Running as i32,
            reboot_seq: 3,
            start_seq: 2,
            private_ip: "172.16.0.9".into(),
            metadata: Some(pb::InstanceMetadata {
                account_id: "123456789012".into(),
                public_key: "ssh-ed25519 AAAA k".into(),
                http_tokens_required: true,
                ..Default::default()
            }),
            node_id: "node-1".into(),
            image: Some(pb::ImageRef {
                image_id: AMI.into(),
                sha256: "ab".repeat(32),
                size: 42,
            }),
            kernel: None,
            ramdisk: None,
            volumes: vec![pb::VolumeAttachment {
                volume_id: "vol-0123456789abcdef0".into(),
                device: "/dev/sdf".into(),
                size_gib: 4,
                initialized: true,
                source: Some(pb::SnapshotRef {
                    snapshot_id: "snap-0123456789abcdef0".into(),
                    sha256: "ab".repeat(32),
                    size: 9,
                }),
            }],
        }
    }

    #[test]
    fn instance_spec_converts() {
        let d = instance_from_proto(spec()).unwrap();
        assert_eq!(d.instance_id.as_str(), ID);
        assert_eq!(d.resources, Resources::new(1, 1024, 8));
        assert_eq!(d.image_id.as_str(), AMI);
        assert_eq!(d.desired, PowerState::Running);
        assert_eq!(d.key_name, None);
        assert_eq!(d.reboot_seq, 3);
        assert_eq!(d.start_seq, 2);
        assert_eq!(d.private_ip, Some("172.16.0.9".parse().unwrap()));
        assert_eq!(d.metadata.account_id, "123456789012");
        assert_eq!(d.metadata.public_key.as_deref(), Some("ssh-ed25519 AAAA k"));
        assert_eq!(d.metadata.http_tokens, canopy_common::HttpTokens::Required);
        assert!(d.metadata.http_endpoint_enabled);
        assert_eq!(d.volumes.len(), 1);
        assert_eq!(d.volumes[0].device, "/dev/sdf");
        assert_eq!(d.volumes[0].size_gib, 4);
        assert!(d.volumes[0].initialized);
        assert_eq!(
            d.volumes[0]
                .source
                .as_ref()
                .map(|s| (s.snapshot_id.as_str(), s.size)),
            Some(("snap-0123456789abcdef0", 9))
        );
        let domain = d.domain_spec();
        assert_eq!(
            domain.kernel_cmdline_extra,
            format!("canopy.instance_id={ID}")
        );
        assert_eq!(domain.user_data, b"#!/bin/sh\n");
        let disk = domain.boot.disk.expect("the image's bytes");
        assert_eq!(
            (disk.sha256.as_str(), disk.size),
            ("ab".repeat(32).as_str(), 42)
        );
        assert_eq!(domain.boot.kernel, None);
    }

    #[test]
    fn malformed_specs_are_invalid_arguments() {
        let cases: Vec<(&str, pb::InstanceSpec)> = vec![
            (
                "instance",
                pb::InstanceSpec {
                    instance_id: "x-1".into(),
                    ..spec()
                },
            ),
            (
                "image",
                pb::InstanceSpec {
                    image_id: String::new(),
                    ..spec()
                },
            ),
            (
                "resources",
                pb::InstanceSpec {
                    resources: None,
                    ..spec()
                },
            ),
            (
                "sha256",
                pb::InstanceSpec {
                    kernel: Some(pb::ImageRef {
                        image_id: "eki-0123456789abcdef0".into(),
                        sha256: "not hex".into(),
                        size: 1,
                    }),
                    ..spec()
                },
            ),
            (
                "power state",
                pb::InstanceSpec {
                    desired: 0,
                    ..spec()
                },
            ),
            (
                "power state",
                pb::InstanceSpec {
                    desired: 42,
                    ..spec()
                },
            ),
        ];
        for (what, s) in cases {
            match instance_from_proto(s) {
                Err(NcError::InvalidArgument(m)) => assert!(m.contains(what), "{m}"),
                other => panic!("{what}: {other:?}"),
            }
        }
    }

    #[test]
    fn documents_reject_duplicates_and_bad_node_ids() {
        let doc = pb::NodeDesiredState {
            node_id: "node-1".into(),
            generation: 7,
            instances: vec![spec(), spec()],
            deleted_volumes: vec![],
            snapshots: vec![],
        };
        assert!(matches!(
            desired_state_from_proto(doc),
            Err(NcError::InvalidArgument(_))
        ));
        let doc = pb::NodeDesiredState {
            node_id: "no de".into(),
            generation: 7,
            instances: vec![],
            deleted_volumes: vec![],
            snapshots: vec![],
        };
        assert!(matches!(
            desired_state_from_proto(doc),
            Err(NcError::InvalidArgument(_))
        ));
        let doc = pb::NodeDesiredState {
            node_id: String::new(),
            generation: 7,
            instances: vec![spec()],
            deleted_volumes: vec!["vol-0123456789abcdef0".into()],
            snapshots: vec![],
        };
        let (node, d) = desired_state_from_proto(doc).unwrap();
        assert_eq!(node, None);
        assert_eq!(d.generation, 7);
        assert_eq!(d.instances.len(), 1);
        assert_eq!(d.deleted_volumes[0].as_str(), "vol-0123456789abcdef0");
        let bad = pb::NodeDesiredState {
            deleted_volumes: vec!["vol-nope".into()],
            ..Default::default()
        };
        assert!(matches!(
            desired_state_from_proto(bad),
            Err(NcError::InvalidArgument(_))
        ));
    }

    #[test]
    fn reports_convert() {
        let r = InstanceReport {
            instance_id: InstanceId::parse(ID).unwrap(),
            state: InstanceState::Stopped,
            reason: Some(StateReason::new(
                reason::USER_INITIATED_SHUTDOWN,
                "User initiated shutdown",
            )),
            reboot_seq: 2,
            volumes: vec![canopy_common::VolumeId::parse("vol-0123456789abcdef0").unwrap()],
        };
        let p = report_to_proto(&r, &NodeId::parse("node-1").unwrap());
        assert_eq!(p.volumes, vec!["vol-0123456789abcdef0".to_string()]);
        assert_eq!(p.state, pb::ObservedState::Stopped as i32);
        assert_eq!(p.reason_code, "Client.UserInitiatedShutdown");
        assert_eq!(p.node_id, "node-1");
        assert_eq!(p.reboot_seq, 2);
        for s in InstanceState::ALL {
            assert_ne!(observed_state_to_proto(s), pb::ObservedState::Unspecified);
        }
    }
}
