//! Address prefixes as operators write them (`192.0.2.0/24`, `2001:db8::/64`, or one address):
//! parsed strictly (no bits past the prefix length: the error says which prefix was meant) and
//! printed the same way. Used by the services' client filters and by `lbd decap --allow`.
//! Depends on nothing of lbd.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A prefix: an address with no bits set past `len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    /// The bits of an address of `addr`'s family.
    pub fn max_len(addr: IpAddr) -> u8 {
        if addr.is_ipv4() { 32 } else { 128 }
    }

    /// The address with the bits past `len` cleared.
    pub fn network(addr: IpAddr, len: u8) -> IpAddr {
        match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        }
    }

    /// Whether `addr` lies in this prefix (an address of the other family never does).
    pub fn contains(&self, addr: IpAddr) -> bool {
        addr.is_ipv4() == self.addr.is_ipv4() && Cidr::network(addr, self.len) == self.addr
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let (a, len) = match s.split_once('/') {
            Some((a, len)) => (a, Some(len)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| {
            format!("{s:?} is not an address or a prefix such as 192.0.2.0/24 or 2001:db8::/64")
        })?;
        let max = Cidr::max_len(addr);
        let len = match len {
            None => max,
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {max}"))?,
        };
        let network = Cidr::network(addr, len);
        if network != addr {
            return Err(format!(
                "{s:?} has bits set past its prefix length: did you mean {network}/{len}?"
            ));
        }
        Ok(Cidr { addr, len })
    }
}

impl serde::Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Cidr, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_holds_the_addresses_of_its_family_under_it() {
        let c: Cidr = "198.51.100.0/24".parse().unwrap();
        assert!(c.contains("198.51.100.66".parse().unwrap()));
        assert!(!c.contains("198.51.101.1".parse().unwrap()));
        assert!(!c.contains("::ffff:198.51.100.1".parse().unwrap()));
        let all: Cidr = "::/0".parse().unwrap();
        assert!(all.contains("2001:db8::1".parse().unwrap()));
        assert!(!all.contains("192.0.2.1".parse().unwrap()));
        let one: Cidr = "2001:db8::66".parse().unwrap();
        assert_eq!(one.len, 128);
        assert!(one.contains("2001:db8::66".parse().unwrap()));
        assert!(!one.contains("2001:db8::67".parse().unwrap()));
    }
}
