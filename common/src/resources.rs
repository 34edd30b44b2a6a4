//! Host resources: what a node offers and what an instance takes.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
}

impl Resources {
    pub const ZERO: Resources = Resources {
        vcpus: 0,
        memory_mib: 0,
        disk_gib: 0,
    };

    pub const fn new(vcpus: u32, memory_mib: u64, disk_gib: u64) -> Self {
        Self {
            vcpus,
            memory_mib,
            disk_gib,
        }
    }

    /// True when `need` fits in `self` on every axis.
    pub fn fits(&self, need: &Resources) -> bool {
        need.vcpus <= self.vcpus
            && need.memory_mib <= self.memory_mib
            && need.disk_gib <= self.disk_gib
    }

    pub fn saturating_sub(&self, other: &Resources) -> Resources {
        Resources {
            vcpus: self.vcpus.saturating_sub(other.vcpus),
            memory_mib: self.memory_mib.saturating_sub(other.memory_mib),
            disk_gib: self.disk_gib.saturating_sub(other.disk_gib),
        }
    }

    pub fn saturating_add(&self, other: &Resources) -> Resources {
        Resources {
            vcpus: self.vcpus.saturating_add(other.vcpus),
            memory_mib: self.memory_mib.saturating_add(other.memory_mib),
            disk_gib: self.disk_gib.saturating_add(other.disk_gib),
        }
    }

    /// What `count` of these take together.
    pub fn saturating_times(&self, count: u64) -> Resources {
        Resources {
            vcpus: u32::try_from(u64::from(self.vcpus).saturating_mul(count)).unwrap_or(u32::MAX),
            memory_mib: self.memory_mib.saturating_mul(count),
            disk_gib: self.disk_gib.saturating_mul(count),
        }
    }

    /// Which axes of `need` do not fit in `self`, for "no capacity" explanations.
    pub fn shortfall(&self, need: &Resources) -> Vec<&'static str> {
        let mut out = Vec::new();
        if need.vcpus > self.vcpus {
            out.push("vcpus");
        }
        if need.memory_mib > self.memory_mib {
            out.push("memory");
        }
        if need.disk_gib > self.disk_gib {
            out.push("disk");
        }
        out
    }
}

impl std::iter::Sum for Resources {
    fn sum<I: Iterator<Item = Resources>>(iter: I) -> Self {
        iter.fold(Resources::ZERO, |acc, r| acc.saturating_add(&r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_is_repeated_addition_and_saturates() {
        let r = Resources::new(2, 512, 8);
        assert_eq!(r.saturating_times(3), std::iter::repeat_n(r, 3).sum());
        assert_eq!(r.saturating_times(0), Resources::ZERO);
        assert_eq!(r.saturating_times(u64::MAX).vcpus, u32::MAX);
        assert_eq!(r.saturating_times(u64::MAX).memory_mib, u64::MAX);
    }

    #[test]
    fn fits_checks_every_axis() {
        let host = Resources::new(4, 8192, 100);
        assert!(host.fits(&Resources::new(4, 8192, 100)));
        assert!(!host.fits(&Resources::new(5, 1, 1)));
        assert!(!host.fits(&Resources::new(1, 8193, 1)));
        assert!(!host.fits(&Resources::new(1, 1, 101)));
        assert_eq!(
            host.shortfall(&Resources::new(5, 9000, 1)),
            vec!["vcpus", "memory"]
        );
    }

    #[test]
    fn arithmetic_saturates() {
        let a = Resources::new(1, 10, 1);
        let b = Resources::new(2, 5, 0);
        assert_eq!(a.saturating_sub(&b), Resources::new(0, 5, 1));
        assert_eq!(
            [a, b].into_iter().sum::<Resources>(),
            Resources::new(3, 15, 1)
        );
    }
}
