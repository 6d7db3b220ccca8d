//! Addresses and prefixes as the decapsulation program's maps key them: `Cidr` (`--allow`),
//! and the address map's keys.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::maps::lpm_trie::Key;
use lb_common::{
    FAMILY_V4, FAMILY_V6,
    decap::{AddrKey, AllowData, allow_prefix_len},
};

use crate::state;

/// A prefix of allowed tunnel sources (`--allow`): `192.0.2.0/24`, `2001:db8::/64`, or one
/// address (`/32` or `/128`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    fn max_len(addr: IpAddr) -> u8 {
        if addr.is_ipv4() { 32 } else { 128 }
    }

    /// The address with the bits past `len` cleared.
    fn network(addr: IpAddr, len: u8) -> IpAddr {
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

    pub(super) fn key(&self) -> Key<AllowData> {
        Key::new(
            allow_prefix_len(u32::from(self.len)),
            AllowData {
                family: state::family(self.addr),
                _pad: [0; 3],
                addr: state::to_addr(self.addr),
            },
        )
    }

    pub(super) fn of_key(key: &Key<AllowData>) -> Option<Cidr> {
        let data = key.data();
        let addr = key_addr(&AddrKey {
            addr: data.addr,
            family: data.family,
            _pad: [0; 3],
        })?;
        let len = key.prefix_len().checked_sub(allow_prefix_len(0))?;
        Some(Cidr {
            addr,
            len: u8::try_from(len).ok()?,
        })
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

/// The key of `addr` in the address map.
pub fn addr_key(addr: IpAddr) -> AddrKey {
    AddrKey {
        addr: state::to_addr(addr),
        family: state::family(addr),
        _pad: [0; 3],
    }
}

pub(super) fn key_addr(key: &AddrKey) -> Option<IpAddr> {
    let bytes: Vec<u8> = key.addr.iter().flat_map(|w| w.to_ne_bytes()).collect();
    match key.family {
        FAMILY_V4 => Some(IpAddr::V4(Ipv4Addr::new(
            bytes[0], bytes[1], bytes[2], bytes[3],
        ))),
        FAMILY_V6 => Some(IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(bytes).ok()?,
        ))),
        _ => None,
    }
}
