//! What every map holds, computed from the runtime state: the one function that decides map
//! contents. Pure: no kernel needed to test it.

use std::collections::BTreeMap;

use lb_common::{Backend, FilterData, filter_list, service_flags};

use super::model::ServiceRuntime;
use crate::{
    config::{Forwarding, HashMode},
    datapath::{self, Fill, FilterEntry},
    state,
};

/// What every map must hold for `services` (whose Maglev tables it brings up to date): their
/// keys, entries by id and tables, every resolved backend's entry (flagged down while its
/// checks fail), the VIP filter, the VIP-level entries that place fragments without ports,
/// every egress interface as a redirect target, and the services' client filters. The one function that decides map contents:
/// lbd fills the maps with it at start and after every change, so a running lbd's maps are
/// always those a fresh lbd with the same state would fill.
pub fn fill(config: lb_common::Config, seed: &[u64; 2], services: &mut [ServiceRuntime]) -> Fill {
    let mut f = Fill {
        config,
        ..Fill::default()
    };
    for s in services.iter_mut() {
        s.refresh_table(seed);
    }
    type VipGroup<'a> = (lb_common::VipKey, Vec<&'a ServiceRuntime>);
    let mut by_vip: BTreeMap<(lb_common::Addr, u8, u8), VipGroup> = BTreeMap::new();
    for s in services.iter() {
        let (key, value) = (s.key(), s.value());
        f.services.insert(key, value);
        f.service_by_id
            .insert(s.id, lb_common::ServiceEntry { key, value });
        f.maglev.insert(s.id, s.table.clone());
        for (list, prefixes) in [
            (filter_list::DENY, &s.cfg.deny),
            (filter_list::ALLOW, &s.cfg.allow),
        ] {
            f.filters.extend(prefixes.iter().map(|p| FilterEntry {
                data: FilterData {
                    service: s.id,
                    list,
                    _pad: [0; 3],
                    addr: state::to_addr(p.addr),
                },
                len: p.len,
            }));
        }
        for b in &s.backends {
            let entry = b.entry(s.id, s.nat_port(b));
            if entry != Backend::default() {
                f.backends.insert(b.id, entry);
            }
            if let Some(hop) = &b.hop {
                f.devmap.insert(hop.egress(), hop.egress());
            }
        }
        let vip = lb_common::VipKey {
            addr: state::to_addr(s.cfg.vip),
            proto: s.cfg.protocol.number(),
            family: state::family(s.cfg.vip),
            _pad: [0; 2],
        };
        by_vip
            .entry((vip.addr, vip.proto, vip.family))
            .or_insert((vip, vec![]))
            .1
            .push(s);
    }
    f.vip_filter = datapath::vip_filter_words(f.services.keys());
    // The reply path's pre-filter: every resolved NAT backend's address.
    f.nat_filter = datapath::address_filter_words(
        services
            .iter()
            .filter(|s| s.cfg.forwarding == Forwarding::Nat)
            .flat_map(|s| s.backends.iter())
            .map(|b| state::to_addr(b.cfg.address)),
    );
    for (_, (key, list)) in by_vip {
        // Named by the VIP's lowest service id, whatever the services' order.
        let first = list
            .iter()
            .min_by_key(|s| s.id)
            .expect("a group has a service");
        let mut value = first.value();
        // Only a VIP with one source-hashed service for the protocol can place a fragment
        // without ports.
        if list.len() != 1 || first.cfg.hash != HashMode::Source {
            value.flags |= service_flags::NO_LATE_FRAGMENTS;
        }
        f.vips.insert(key, value);
    }
    f
}

#[cfg(test)]
mod tests {
    //! `fill`, the one function that decides what the maps hold: no kernel needed.

    use std::{net::IpAddr, sync::Arc};

    use lb_common::backend_flags;

    use super::*;
    use crate::{
        config::{self, Forwarding, Protocol},
        daemon::{
            model::{BackendRuntime, Hop},
            testing::{backend, hop},
        },
        netlink::{ETH_P_8021Q, Vlan},
    };

    const SEED: [u64; 2] = [1, 2];

    fn service(
        id: u32,
        vip: &str,
        port: u16,
        protocol: Protocol,
        hash: HashMode,
        backends: Vec<BackendRuntime>,
    ) -> ServiceRuntime {
        ServiceRuntime::new(
            id,
            config::Service {
                name: format!("s{id}"),
                vip: vip.parse().unwrap(),
                port,
                protocol,
                forwarding: Forwarding::Dsr,
                hash,
                table_size: 251,
                tunnel_source: None,
                health: config::Health::default(),
                backends: vec![],
                allow: vec![],
                deny: vec![],
            },
            backends,
        )
    }

    fn vip_key(vip: &str, protocol: Protocol) -> lb_common::VipKey {
        let vip: IpAddr = vip.parse().unwrap();
        lb_common::VipKey {
            addr: state::to_addr(vip),
            proto: protocol.number(),
            family: state::family(vip),
            _pad: [0; 2],
        }
    }

    #[test]
    fn every_map_follows_the_services() {
        let mut services = vec![
            service(
                3,
                "203.0.113.10",
                80,
                Protocol::Tcp,
                HashMode::Source,
                vec![
                    backend(0, "192.0.2.11", 100, Some(hop(2)), true),
                    // Down: its entry says so (its flows leave it), and no slot is its.
                    backend(1, "192.0.2.12", 100, Some(hop(2)), false),
                    // Drained: a valid entry (its flows stay), no slot.
                    backend(2, "192.0.2.13", 0, Some(hop(2)), true),
                    // Unresolved: no entry at all.
                    backend(4, "192.0.2.14", 100, None, true),
                    // Behind another interface: a redirect target.
                    backend(5, "198.51.100.5", 100, Some(hop(7)), true),
                ],
            ),
            service(
                1,
                "203.0.113.10",
                53,
                Protocol::Udp,
                HashMode::Source,
                vec![backend(6, "192.0.2.11", 100, Some(hop(2)), true)],
            ),
        ];
        let f = fill(lb_common::Config::default(), &SEED, &mut services);

        assert_eq!(f.services.len(), 2);
        for s in &services {
            let (key, value) = (s.key(), s.value());
            assert_eq!(f.services[&key], value);
            assert_eq!(
                f.service_by_id[&s.id],
                lb_common::ServiceEntry { key, value }
            );
            assert_eq!(&*f.maglev[&s.id], &s.table_without(&SEED, None)[..]);
        }
        assert_eq!(f.service_by_id.len(), 2);
        let table = &services[0].table;
        assert!(table.contains(&0) && table.contains(&5));
        assert!(!table.contains(&1) && !table.contains(&2) && !table.contains(&4));

        assert_eq!(
            f.backends.keys().copied().collect::<Vec<_>>(),
            [0, 1, 2, 5, 6]
        );
        assert_eq!(
            f.backends[&1].flags,
            backend_flags::VALID | backend_flags::DOWN
        );
        assert_eq!(f.backends[&2].flags, backend_flags::VALID);
        assert_eq!(f.backends[&5].ifindex, 7);
        assert_eq!(f.backends[&6].service, 1);
        assert_eq!(
            f.devmap.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>(),
            [(2, 2), (7, 7)]
        );
        assert_eq!(
            f.vip_filter,
            datapath::vip_filter_words(services.iter().map(|s| s.key()).collect::<Vec<_>>().iter())
        );
        // One source-hashed service per VIP and protocol: later fragments can be placed.
        assert_eq!(f.vips.len(), 2);
        assert_eq!(
            f.vips[&vip_key("203.0.113.10", Protocol::Tcp)],
            services[0].value()
        );
        assert_eq!(
            f.vips[&vip_key("203.0.113.10", Protocol::Udp)],
            services[1].value()
        );
    }

    #[test]
    fn a_vip_with_several_services_or_a_5_tuple_hash_places_no_late_fragments() {
        let mut services = vec![
            service(
                4,
                "203.0.113.10",
                80,
                Protocol::Tcp,
                HashMode::Source,
                vec![],
            ),
            service(
                2,
                "203.0.113.10",
                443,
                Protocol::Tcp,
                HashMode::Source,
                vec![],
            ),
            service(
                0,
                "203.0.113.20",
                53,
                Protocol::Udp,
                HashMode::FiveTuple,
                vec![],
            ),
        ];
        let f = fill(lb_common::Config::default(), &SEED, &mut services);
        let shared = f.vips[&vip_key("203.0.113.10", Protocol::Tcp)];
        // Named by the VIP's lowest id, whatever the order of the services.
        assert_eq!(shared.id, 2);
        assert_ne!(shared.flags & service_flags::NO_LATE_FRAGMENTS, 0);
        let five = f.vips[&vip_key("203.0.113.20", Protocol::Udp)];
        assert_ne!(five.flags & service_flags::NO_LATE_FRAGMENTS, 0);
        services.reverse();
        assert_eq!(
            fill(lb_common::Config::default(), &SEED, &mut services),
            f,
            "the services' order does not matter"
        );
    }

    #[test]
    fn a_table_is_rebuilt_only_when_what_it_is_built_from_changes() {
        let mut services = vec![service(
            0,
            "203.0.113.10",
            80,
            Protocol::Tcp,
            HashMode::Source,
            vec![
                backend(0, "192.0.2.11", 100, Some(hop(2)), true),
                backend(1, "192.0.2.12", 100, Some(hop(2)), true),
            ],
        )];
        let first = fill(lb_common::Config::default(), &SEED, &mut services);
        let again = fill(lb_common::Config::default(), &SEED, &mut services);
        assert!(
            Arc::ptr_eq(&first.maglev[&0], &again.maglev[&0]),
            "not rebuilt"
        );
        services[0].backends[1].healthy = false;
        let down = fill(lb_common::Config::default(), &SEED, &mut services);
        assert!(!Arc::ptr_eq(&first.maglev[&0], &down.maglev[&0]));
        assert!(services[0].table.iter().all(|&id| id == 0));
        services[0].cfg.table_size = 257;
        let resized = fill(lb_common::Config::default(), &SEED, &mut services);
        assert_eq!(services[0].table.len(), 257);
        assert_eq!(resized.maglev[&0].len(), 257);
    }

    /// A service's lists become its prefixes in `FILTERS` (under its id, each list apart) and
    /// the flags that make the program read them; a service without lists has neither.
    #[test]
    fn client_filters_are_prefixes_under_the_service_id_and_its_flags() {
        let mut services = vec![
            service(
                5,
                "203.0.113.10",
                80,
                Protocol::Tcp,
                HashMode::Source,
                vec![],
            ),
            service(
                6,
                "2001:db8::10",
                80,
                Protocol::Tcp,
                HashMode::Source,
                vec![],
            ),
            service(
                7,
                "203.0.113.11",
                80,
                Protocol::Tcp,
                HashMode::Source,
                vec![],
            ),
        ];
        let p = |s: &str| s.parse::<crate::config::Cidr>().unwrap();
        services[0].cfg.allow = vec![p("198.51.100.0/24")];
        services[0].cfg.deny = vec![p("198.51.100.66/32")];
        services[1].cfg.deny = vec![p("2001:db8:bad::/48")];
        let f = fill(lb_common::Config::default(), &SEED, &mut services);
        let entries: Vec<(u32, u8, lb_common::Addr, u8)> = f
            .filters
            .iter()
            .map(|e| (e.data.service, e.data.list, e.data.addr, e.len))
            .collect();
        assert_eq!(
            entries,
            [
                (
                    5,
                    filter_list::DENY,
                    state::to_addr(p("198.51.100.66/32").addr),
                    32
                ),
                (
                    5,
                    filter_list::ALLOW,
                    state::to_addr(p("198.51.100.0/24").addr),
                    24
                ),
                (
                    6,
                    filter_list::DENY,
                    state::to_addr(p("2001:db8:bad::/48").addr),
                    48
                ),
            ]
        );
        let flags = |s: &ServiceRuntime| f.services[&s.key()].flags;
        let both = service_flags::HAS_ALLOW | service_flags::HAS_DENY;
        assert_eq!(flags(&services[0]) & both, both);
        assert_eq!(flags(&services[1]) & both, service_flags::HAS_DENY);
        assert_eq!(flags(&services[2]) & both, 0);
        // Later fragments are placed by the VIP's entry: it carries the flags too.
        assert_eq!(
            f.vips[&vip_key("203.0.113.10", Protocol::Tcp)].flags & both,
            both
        );
    }

    /// A backend whose route leaves by a VLAN device: its entry names the VLAN's parent as the
    /// egress (a VLAN device takes no XDP redirects) and the VLAN id as the tag to write.
    #[test]
    fn a_backend_behind_a_vlan_device_leaves_by_its_parent_with_its_tag() {
        let plain = Hop {
            ifindex: 7,
            vlan: None,
            mac: [2, 0, 0, 0, 0xb, 1],
            src_mac: [2, 0, 0, 0, 0xa, 2],
            mtu: 1500,
            tunnel_src: None,
            via: "203.0.113.130".parse().unwrap(),
        };
        let entry = backend(4, "203.0.113.130", 100, Some(plain.clone()), true).entry(3, 0);
        assert_eq!((entry.ifindex, entry.vlan, entry.service), (7, 0, 3));
        let tagged = Hop {
            vlan: Some(Vlan {
                id: 100,
                parent: 2,
                protocol: ETH_P_8021Q,
            }),
            ..plain
        };
        assert_eq!(tagged.egress(), 2);
        let entry = backend(4, "203.0.113.130", 100, Some(tagged), true).entry(3, 0);
        assert_eq!((entry.ifindex, entry.vlan), (2, 100));
        assert_eq!(entry.mac, [2, 0, 0, 0, 0xb, 1]);
        assert_eq!(entry.flags, backend_flags::VALID);
    }
}
