//! Runtime state for the layers' unit tests.

use std::time::SystemTime;

use super::model::{BackendRuntime, Hop};
use crate::config;

/// A hop out of interface `ifindex`, to a MAC ending in it.
pub fn hop(ifindex: u32) -> Hop {
    Hop {
        ifindex,
        vlan: None,
        mac: [2, 0, 0, 0, 0, ifindex as u8],
        src_mac: [2, 0, 0, 0, 1, 1],
        mtu: 1500,
        tunnel_src: None,
        via: "192.0.2.1".parse().unwrap(),
    }
}

pub fn backend(
    id: u32,
    address: &str,
    weight: u32,
    hop: Option<Hop>,
    healthy: bool,
) -> BackendRuntime {
    BackendRuntime {
        id,
        cfg: config::Backend {
            address: address.parse().unwrap(),
            weight,
            mac: None,
            port: None,
        },
        hop,
        hop_error: None,
        healthy,
        last: None,
        since: SystemTime::UNIX_EPOCH,
    }
}
