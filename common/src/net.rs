//! Private addressing: the IPv4 subnet a zone's instances take their addresses from.

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;

/// An IPv4 subnet, `a.b.c.d/n` with the host bits zero, /8 to /28 (an AWS subnet is at most
/// a /16; a private cloud's zone may hold more instances). Its network address, first three hosts (gateway, DNS, reserved) and broadcast address
/// are not given to instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Subnet {
    network: Ipv4Addr,
    prefix: u8,
}

/// Hosts at the start of a subnet that instances never get (AWS reserves the same).
const RESERVED_LOW: u32 = 3;

impl Ipv4Subnet {
    pub fn parse(s: &str) -> Result<Ipv4Subnet, String> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a CIDR block (a.b.c.d/n)"))?;
        let network: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("{s:?}: {addr:?} is not an IPv4 address"))?;
        let prefix: u8 = len
            .parse()
            .map_err(|_| format!("{s:?}: {len:?} is not a prefix length"))?;
        if !(8..=28).contains(&prefix) {
            return Err(format!("{s:?}: the prefix must be /8 to /28"));
        }
        let subnet = Ipv4Subnet { network, prefix };
        if u32::from(network) & !subnet.mask() != 0 {
            return Err(format!(
                "{s:?}: host bits are set (the network address is {}/{prefix})",
                Ipv4Addr::from(u32::from(network) & subnet.mask())
            ));
        }
        Ok(subnet)
    }

    fn mask(&self) -> u32 {
        u32::MAX << (32 - self.prefix)
    }

    fn size(&self) -> u32 {
        1 << (32 - self.prefix)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network)
    }

    /// The first host: the subnet's router.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// Whether instances may be given `ip`.
    pub fn is_assignable(&self, ip: Ipv4Addr) -> bool {
        let offset = u32::from(ip).wrapping_sub(u32::from(self.network));
        self.contains(ip) && offset > RESERVED_LOW && offset < self.size() - 1
    }

    /// How many addresses instances can be given.
    pub fn assignable_count(&self) -> u64 {
        u64::from(self.size() - RESERVED_LOW - 2)
    }

    /// The lowest assignable address not in `used`, if any is left.
    pub fn first_free(&self, used: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
        self.next_free(used, None)
    }

    /// The first assignable address after `after` (wrapping around) that is not in `used`:
    /// handing addresses out in a round from a cursor keeps each allocation cheap in a big,
    /// busy subnet, and a released address is not reused at once.
    pub fn next_free(
        &self,
        used: &BTreeSet<Ipv4Addr>,
        after: Option<Ipv4Addr>,
    ) -> Option<Ipv4Addr> {
        let base = u32::from(self.network);
        let (first, last) = (RESERVED_LOW + 1, self.size() - 2);
        let start = after
            .filter(|ip| self.is_assignable(*ip))
            .map_or(first, |ip| u32::from(ip) - base + 1);
        (start..=last)
            .chain(first..start.min(last + 1))
            .map(|offset| Ipv4Addr::from(base + offset))
            .find(|ip| !used.contains(ip))
    }
}

impl fmt::Display for Ipv4Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_parse_strictly_and_hand_out_hosts_past_the_reserved_ones() {
        let s = Ipv4Subnet::parse("10.1.0.0/28").unwrap();
        assert_eq!(s.to_string(), "10.1.0.0/28");
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 1, 0, 1));
        let mut used = BTreeSet::new();
        let mut got = Vec::new();
        while let Some(ip) = s.first_free(&used) {
            used.insert(ip);
            got.push(ip);
        }
        // 16 addresses: network, three reserved, broadcast are never given.
        assert_eq!(got.len(), 11);
        assert_eq!(s.assignable_count(), 11);
        assert_eq!(got[0], Ipv4Addr::new(10, 1, 0, 4));
        assert_eq!(*got.last().unwrap(), Ipv4Addr::new(10, 1, 0, 14));
        assert!(got.iter().all(|ip| s.is_assignable(*ip)));
        assert!(!s.is_assignable(Ipv4Addr::new(10, 1, 0, 15)));
        assert!(!s.is_assignable(Ipv4Addr::new(10, 1, 0, 1)));
        assert!(!s.is_assignable(Ipv4Addr::new(10, 1, 1, 5)));
        // A freed address is handed out again, lowest first.
        used.remove(&Ipv4Addr::new(10, 1, 0, 7));
        assert_eq!(s.first_free(&used), Some(Ipv4Addr::new(10, 1, 0, 7)));

        for bad in [
            "10.1.0.1/24",
            "10.1.0.0",
            "10.0.0.0/7",
            "10.1.0.0/30",
            "x/24",
            "10.1.0.0/x",
        ] {
            assert!(Ipv4Subnet::parse(bad).is_err(), "{bad}");
        }
    }
}
