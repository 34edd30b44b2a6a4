//! Volumes as every tier sees them: what an instance has attached, and EC2's device names.

use serde::{Deserialize, Serialize};

use crate::VolumeId;

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
