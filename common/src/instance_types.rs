//! The instance-type catalogue: EC2 names with the resources each takes on a node.

use crate::Resources;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstanceType {
    pub name: &'static str,
    pub resources: Resources,
}

const fn t(name: &'static str, vcpus: u32, memory_mib: u64, disk_gib: u64) -> InstanceType {
    InstanceType {
        name,
        resources: Resources::new(vcpus, memory_mib, disk_gib),
    }
}

/// Every instance type Canopy offers. `m1.small` is EC2's historical default and stays
/// the default when RunInstances names none.
pub const INSTANCE_TYPES: &[InstanceType] = &[
    t("t2.nano", 1, 512, 8),
    t("t2.micro", 1, 1024, 8),
    t("t2.small", 1, 2048, 10),
    t("t2.medium", 2, 4096, 20),
    t("t2.large", 2, 8192, 30),
    t("t3.nano", 2, 512, 8),
    t("t3.micro", 2, 1024, 8),
    t("t3.small", 2, 2048, 10),
    t("t3.medium", 2, 4096, 20),
    t("t3.large", 2, 8192, 30),
    t("m1.small", 1, 1740, 10),
    t("m5.large", 2, 8192, 30),
    t("m5.xlarge", 4, 16384, 50),
    t("c5.large", 2, 4096, 20),
    t("c5.xlarge", 4, 8192, 40),
];

pub const DEFAULT_INSTANCE_TYPE: &str = "m1.small";

impl InstanceType {
    pub fn lookup(name: &str) -> Option<&'static InstanceType> {
        INSTANCE_TYPES.iter().find(|t| t.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_type_exists_and_names_are_unique() {
        assert!(InstanceType::lookup(DEFAULT_INSTANCE_TYPE).is_some());
        let mut names: Vec<_> = INSTANCE_TYPES.iter().map(|t| t.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), INSTANCE_TYPES.len());
        assert!(InstanceType::lookup("x9.huge").is_none());
    }
}
