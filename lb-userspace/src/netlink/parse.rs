//! Reading the kernel's messages: links (name, MAC, MTU, VLAN, XDP programs), addresses, and
//! the address forms of routes and neighbours.

use std::net::{IpAddr, Ipv6Addr};

use netlink_packet_route::{
    AddressFamily,
    address::AddressAttribute,
    link::{InfoData, InfoVlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage, LinkXdp},
    neighbour::NeighbourAddress,
    route::RouteAddress,
};

use super::{Interface, Vlan};

/// The host's own address in an address message: IFA_LOCAL is the interface's own address;
/// IFA_ADDRESS is the peer's on point-to-point links and the same as IFA_LOCAL elsewhere (IPv6
/// only has it).
pub(super) fn own_address(msg: &netlink_packet_route::address::AddressMessage) -> Option<IpAddr> {
    let local = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    let address = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    });
    local.or(address)
}

/// An Interface without its addresses.
pub(super) fn parse_link(link: &LinkMessage) -> Interface {
    let mut iface = Interface {
        index: link.header.index,
        name: String::new(),
        mac: [0; 6],
        mtu: 0,
        addrs: Vec::new(),
        up: link.header.flags.contains(LinkFlags::Up),
        vlan: None,
        xdp_programs: Vec::new(),
    };
    let mut parent = None;
    let mut vlan_info = None;
    for attr in &link.attributes {
        match attr {
            LinkAttribute::IfName(n) => iface.name = n.clone(),
            LinkAttribute::Xdp(nlas) => {
                for nla in nlas {
                    if let LinkXdp::ProgId(id)
                    | LinkXdp::DrvProgId(id)
                    | LinkXdp::SkbProgId(id)
                    | LinkXdp::HwProgId(id) = nla
                        && *id != 0
                        && !iface.xdp_programs.contains(id)
                    {
                        iface.xdp_programs.push(*id);
                    }
                }
            }
            LinkAttribute::Address(a) => {
                if let Ok(mac) = <[u8; 6]>::try_from(&a[..]) {
                    iface.mac = mac;
                }
            }
            LinkAttribute::Mtu(m) => iface.mtu = *m,
            LinkAttribute::Link(index) => parent = Some(*index),
            LinkAttribute::LinkInfo(infos) => {
                vlan_info = infos.iter().find_map(|i| match i {
                    LinkInfo::Data(InfoData::Vlan(v)) => Some(v),
                    _ => None,
                })
            }
            _ => {}
        }
    }
    if let (Some(parent), Some(info)) = (parent, vlan_info) {
        let id = info.iter().find_map(|v| match v {
            InfoVlan::Id(id) => Some(*id),
            _ => None,
        });
        let protocol = info
            .iter()
            .find_map(|v| match v {
                InfoVlan::Protocol(p) => Some(u16::from(*p)),
                _ => None,
            })
            .unwrap_or(ETH_P_8021Q);
        iface.vlan = id.map(|id| Vlan {
            id,
            parent,
            protocol,
        });
    }
    iface
}

/// The 802.1Q tag's protocol (TPID).
pub const ETH_P_8021Q: u16 = 0x8100;

pub(super) fn family(addr: IpAddr) -> AddressFamily {
    match addr {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

pub(super) fn neigh_addr(addr: IpAddr) -> NeighbourAddress {
    match addr {
        IpAddr::V4(a) => NeighbourAddress::Inet(a),
        IpAddr::V6(a) => NeighbourAddress::Inet6(a),
    }
}

pub(super) fn route_addr(addr: &RouteAddress) -> Option<IpAddr> {
    match addr {
        RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

pub(super) fn is_unicast_link_local(a: &Ipv6Addr) -> bool {
    a.segments()[0] & 0xffc0 == 0xfe80
}
