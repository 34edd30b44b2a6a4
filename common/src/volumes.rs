//! Volumes as every tier sees them: what an instance has attached, and EC2's device names.

use serde::{Deserialize, Serialize};

use crate::{InstanceId, NodeId, Sha256Digest, SnapshotId, VolumeId};

/// A volume an instance should have attached, as the CLC sends it down to the node.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VolumeAttachment {
    pub volume_id: VolumeId,
    /// The EC2 device name the user asked for, e.g. `/dev/sdf`.
    pub device: String,
    pub size_gib: u64,
    /// A node has had it attached before: its bytes exist (on that node, or on storage
    /// the zone's nodes share), and must not be made anew.
    pub initialized: bool,
    /// The snapshot whose bytes the volume starts from (made from a snapshot); `None` for
    /// an empty volume. Only a node making the volume's bytes for the first time uses it.
    #[serde(default)]
    pub source: Option<SnapshotRef>,
}

/// A snapshot's bytes, as a node fetches them (by digest, like an image's).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SnapshotRef {
    pub snapshot_id: SnapshotId,
    pub sha256: Sha256Digest,
    pub size: u64,
}

/// A snapshot the zone's nodes are asked to take: the node that holds the disk's bytes
/// copies them and uploads the copy. Listed while the snapshot is `pending`; taking it twice
/// is harmless (the first upload completes it, later ones are ignored).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SnapshotRequest {
    pub snapshot_id: SnapshotId,
    pub source: SnapshotSource,
}

/// What a snapshot copies.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum SnapshotSource {
    /// A volume (CreateSnapshot): which node holds its bytes is not recorded, so every node
    /// of the zone is asked and the one that has them takes it.
    Volume(VolumeId),
    /// A stopped instance's root disk (CreateImage), flattened into one standalone image:
    /// on the node the instance lives on, which must not start or undefine the domain while
    /// the request is listed.
    Root {
        instance_id: InstanceId,
        node_id: NodeId,
    },
}

impl SnapshotRequest {
    /// The volume it copies, if it copies one.
    pub fn volume_id(&self) -> Option<&VolumeId> {
        match &self.source {
            SnapshotSource::Volume(v) => Some(v),
            SnapshotSource::Root { .. } => None,
        }
    }

    /// The instance whose root disk it copies, if it copies one.
    pub fn root_of(&self) -> Option<&InstanceId> {
        match &self.source {
            SnapshotSource::Root { instance_id, .. } => Some(instance_id),
            SnapshotSource::Volume(_) => None,
        }
    }
}

/// The attachment point an EC2 device name stands for, or `None` when the name is not one
/// a volume can take. `/dev/sdf`, `/dev/xvdf` and `/dev/vdf` are one point (`f`): Linux
/// names a disk by its bus, so EC2 treats them as the same. The root disk's point (`a`,
/// also written `/dev/sda1`) is never free. Letters run `b` to `z`, then `ba` to `zz`.
pub fn attachment_point(device: &str) -> Option<String> {
    let rest = device.strip_prefix("/dev/")?;
    let letters = ["xvd", "sd", "vd"]
        .iter()
        .find_map(|prefix| rest.strip_prefix(prefix))?;
    let ok = matches!(letters.len(), 1 | 2)
        && letters.bytes().all(|b| b.is_ascii_lowercase())
        && !letters.starts_with('a');
    ok.then(|| letters.to_owned())
}

/// The guest disk name (libvirt's target `dev`, virtio) for an attachment point.
pub fn guest_disk(point: &str) -> String {
    format!("vd{point}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_map_to_one_point_per_letter() {
        assert_eq!(attachment_point("/dev/sdf").as_deref(), Some("f"));
        assert_eq!(attachment_point("/dev/xvdf").as_deref(), Some("f"));
        assert_eq!(attachment_point("/dev/vdf").as_deref(), Some("f"));
        assert_eq!(attachment_point("/dev/xvdba").as_deref(), Some("ba"));
        assert_eq!(guest_disk("f"), "vdf");
    }

    #[test]
    fn the_root_and_malformed_names_are_refused() {
        for bad in [
            "/dev/sda",
            "/dev/sda1",
            "/dev/xvda",
            "/dev/sdf1",
            "sdf",
            "/dev/hdf",
            "/dev/sd",
            "/dev/sdF",
            "/dev/sdabc",
            "/dev/nvme1n1",
            "",
        ] {
            assert_eq!(attachment_point(bad), None, "{bad}");
        }
    }
}
