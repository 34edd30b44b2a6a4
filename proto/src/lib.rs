//! Generated gRPC types and services for Canopy's tier-to-tier contracts.
//!
//! Only the edges (the `convert` modules of each controller) use these types; the domain
//! code works with the typed values of `canopy-common`.
#![allow(clippy::all, rust_2018_idioms)]

pub mod v1 {
    tonic::include_proto!("canopy.v1");
}

/// Conversions every tier shares for messages that carry only `canopy-common` types.
pub mod convert {
    use canopy_common::{
        BootImages, HttpTokens, ImageId, ImageRef, InstanceId, InstanceMetadata, NodeId,
        Sha256Digest, SnapshotId, SnapshotRef, SnapshotRequest, SnapshotSource, VolumeAttachment,
        VolumeId,
    };

    use crate::v1 as pb;

    pub fn image_ref_to_proto(r: &ImageRef) -> pb::ImageRef {
        pb::ImageRef {
            image_id: r.image_id.to_string(),
            sha256: r.sha256.to_string(),
            size: r.size,
        }
    }

    /// Errors name the field, for the receiver's `INVALID_ARGUMENT`.
    pub fn image_ref_from_proto(r: pb::ImageRef) -> Result<ImageRef, String> {
        Ok(ImageRef {
            image_id: ImageId::parse(&r.image_id).map_err(|e| format!("image ref: {e}"))?,
            sha256: Sha256Digest::parse(&r.sha256).map_err(|e| format!("image ref: {e}"))?,
            size: r.size,
        })
    }

    /// The `image`, `kernel` and `ramdisk` fields of an `InstanceSpec`.
    pub fn boot_from_proto(spec: &mut pb::InstanceSpec) -> Result<BootImages, String> {
        let take = |r: Option<pb::ImageRef>| r.map(image_ref_from_proto).transpose();
        Ok(BootImages {
            disk: take(spec.image.take())?,
            kernel: take(spec.kernel.take())?,
            ramdisk: take(spec.ramdisk.take())?,
        })
    }

    pub fn metadata_to_proto(m: &InstanceMetadata) -> pb::InstanceMetadata {
        pb::InstanceMetadata {
            account_id: m.account_id.clone(),
            reservation_id: m.reservation_id.clone(),
            launch_index: m.launch_index,
            zone: m.zone.clone(),
            region: m.region.clone(),
            public_key: m.public_key.clone().unwrap_or_default(),
            security_groups: m.security_groups.clone(),
            launch_time: m.launch_time.clone(),
            kernel_id: m.kernel_id.clone().unwrap_or_default(),
            ramdisk_id: m.ramdisk_id.clone().unwrap_or_default(),
            http_tokens_required: m.http_tokens == HttpTokens::Required,
            http_endpoint_disabled: !m.http_endpoint_enabled,
            public_ip: m.public_ip.clone().unwrap_or_default(),
        }
    }

    /// An absent message is the default: no extra metadata, IMDSv1 allowed, service on.
    pub fn metadata_from_proto(m: Option<pb::InstanceMetadata>) -> InstanceMetadata {
        let m = m.unwrap_or_default();
        let some = |s: String| Some(s).filter(|s| !s.is_empty());
        InstanceMetadata {
            account_id: m.account_id,
            reservation_id: m.reservation_id,
            launch_index: m.launch_index,
            zone: m.zone,
            region: m.region,
            public_key: some(m.public_key),
            security_groups: m.security_groups,
            launch_time: m.launch_time,
            kernel_id: some(m.kernel_id),
            ramdisk_id: some(m.ramdisk_id),
            http_tokens: if m.http_tokens_required {
                HttpTokens::Required
            } else {
                HttpTokens::Optional
            },
            http_endpoint_enabled: !m.http_endpoint_disabled,
            public_ip: some(m.public_ip),
        }
    }

    pub fn volumes_to_proto(v: &[VolumeAttachment]) -> Vec<pb::VolumeAttachment> {
        v.iter()
            .map(|v| pb::VolumeAttachment {
                volume_id: v.volume_id.to_string(),
                device: v.device.clone(),
                size_gib: v.size_gib,
                initialized: v.initialized,
                source: v.source.as_ref().map(|s| pb::SnapshotRef {
                    snapshot_id: s.snapshot_id.to_string(),
                    sha256: s.sha256.to_string(),
                    size: s.size,
                }),
            })
            .collect()
    }

    pub fn volumes_from_proto(
        v: Vec<pb::VolumeAttachment>,
    ) -> Result<Vec<VolumeAttachment>, String> {
        v.into_iter()
            .map(|v| {
                Ok(VolumeAttachment {
                    volume_id: VolumeId::parse(&v.volume_id)
                        .map_err(|e| format!("volumes: {e}"))?,
                    device: v.device,
                    size_gib: v.size_gib,
                    initialized: v.initialized,
                    source: v
                        .source
                        .map(|s| {
                            Ok::<_, String>(SnapshotRef {
                                snapshot_id: SnapshotId::parse(&s.snapshot_id)
                                    .map_err(|e| format!("volume source: {e}"))?,
                                sha256: Sha256Digest::parse(&s.sha256)
                                    .map_err(|e| format!("volume source: {e}"))?,
                                size: s.size,
                            })
                        })
                        .transpose()?,
                })
            })
            .collect()
    }

    pub fn snapshot_requests_to_proto(v: &[SnapshotRequest]) -> Vec<pb::SnapshotRequest> {
        v.iter()
            .map(|r| {
                let mut out = pb::SnapshotRequest {
                    snapshot_id: r.snapshot_id.to_string(),
                    ..Default::default()
                };
                match &r.source {
                    SnapshotSource::Volume(v) => out.volume_id = v.to_string(),
                    SnapshotSource::Root {
                        instance_id,
                        node_id,
                    } => {
                        out.instance_id = instance_id.to_string();
                        out.node_id = node_id.to_string();
                    }
                }
                out
            })
            .collect()
    }

    pub fn snapshot_requests_from_proto(
        v: Vec<pb::SnapshotRequest>,
    ) -> Result<Vec<SnapshotRequest>, String> {
        v.into_iter()
            .map(|r| {
                let bad = |e: canopy_common::IdError| format!("snapshots: {e}");
                let source = if r.instance_id.is_empty() {
                    SnapshotSource::Volume(VolumeId::parse(&r.volume_id).map_err(bad)?)
                } else {
                    SnapshotSource::Root {
                        instance_id: InstanceId::parse(&r.instance_id).map_err(bad)?,
                        node_id: NodeId::parse(&r.node_id).map_err(bad)?,
                    }
                };
                Ok(SnapshotRequest {
                    snapshot_id: SnapshotId::parse(&r.snapshot_id).map_err(bad)?,
                    source,
                })
            })
            .collect()
    }

    /// A list of volume ids (`InstanceReport.volumes`, `deleted_volumes`).
    pub fn volume_ids_from_proto(v: Vec<String>) -> Result<Vec<VolumeId>, String> {
        v.iter()
            .map(|id| VolumeId::parse(id).map_err(|e| format!("volume ids: {e}")))
            .collect()
    }

    pub fn volume_ids_to_proto(v: &[VolumeId]) -> Vec<String> {
        v.iter().map(ToString::to_string).collect()
    }

    /// Sets the `image`, `kernel` and `ramdisk` fields of an `InstanceSpec`.
    pub fn boot_to_proto(boot: &BootImages, spec: &mut pb::InstanceSpec) {
        spec.image = boot.disk.as_ref().map(image_ref_to_proto);
        spec.kernel = boot.kernel.as_ref().map(image_ref_to_proto);
        spec.ramdisk = boot.ramdisk.as_ref().map(image_ref_to_proto);
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn snapshot_requests_of_volumes_and_of_roots_travel_intact() {
            let requests = vec![
                SnapshotRequest {
                    snapshot_id: SnapshotId::parse("snap-0123456789abcdef0").unwrap(),
                    source: SnapshotSource::Volume(
                        VolumeId::parse("vol-0123456789abcdef0").unwrap(),
                    ),
                },
                SnapshotRequest {
                    snapshot_id: SnapshotId::parse("snap-0123456789abcdef1").unwrap(),
                    source: SnapshotSource::Root {
                        instance_id: InstanceId::parse("i-0123456789abcdef0").unwrap(),
                        node_id: NodeId::parse("hv-1").unwrap(),
                    },
                },
            ];
            let wire = snapshot_requests_to_proto(&requests);
            assert_eq!(
                (wire[0].volume_id.as_str(), wire[0].instance_id.as_str()),
                ("vol-0123456789abcdef0", "")
            );
            assert_eq!(
                (
                    wire[1].volume_id.as_str(),
                    wire[1].instance_id.as_str(),
                    wire[1].node_id.as_str()
                ),
                ("", "i-0123456789abcdef0", "hv-1")
            );
            assert_eq!(snapshot_requests_from_proto(wire.clone()), Ok(requests));
            let mut bad = wire;
            bad[1].node_id = "no/such node".into();
            assert!(snapshot_requests_from_proto(bad).is_err());
        }
    }
}

/// The connections a gRPC server accepts on `listener`, with Nagle's algorithm off.
///
/// tonic sets `TCP_NODELAY` only on listeners it binds itself; on one handed to it, a small
/// reply can wait for the peer's delayed ACK (40 ms on Linux) before it leaves.
pub fn incoming_nodelay(
    listener: tokio::net::TcpListener,
) -> impl futures_core::Stream<Item = std::io::Result<tokio::net::TcpStream>> + Send + 'static {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|accepted| {
        let stream = accepted?;
        stream.set_nodelay(true)?;
        Ok(stream)
    })
}
