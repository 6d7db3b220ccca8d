//! Addresses and prefixes as the decapsulation program's maps key them: `Cidr` (`--allow`,
//! `crate::cidr`'s), and the address map's keys.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::maps::lpm_trie::Key;
use lb_common::{
    FAMILY_V4, FAMILY_V6,
    decap::{AddrKey, AllowData, allow_prefix_len},
};

use crate::state;

pub use crate::cidr::Cidr;

/// A prefix of allowed tunnel sources (`--allow`) as the allow map keys it.
impl Cidr {
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
