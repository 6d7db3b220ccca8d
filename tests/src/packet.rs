//! Hand-built frames for the data-path tests: Ethernet, optional 802.1Q, IPv4 with a correct
//! header checksum, TCP or UDP with correct checksums.

use std::net::Ipv4Addr;

/// A frame as it would arrive on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub bytes: Vec<u8>,
}

impl Frame {
    /// The same frame with an 802.1Q tag (VLAN `vid`) inserted after the MAC addresses.
    pub fn with_vlan(mut self, vid: u16) -> Frame {
        let tag = [0x81, 0x00, (vid >> 8) as u8 & 0x0f, vid as u8];
        self.bytes.splice(12..12, tag);
        self
    }
}

/// The Internet checksum (RFC 1071) of `data`, starting from a partial `sum`.
pub fn checksum(data: &[u8], mut sum: u32) -> u16 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    if let [last] = chunks.remainder() {
        sum += (*last as u32) << 8;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo_header_sum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    let mut sum = 0u32;
    for pair in src.octets().chunks(2).chain(dst.octets().chunks(2)) {
        sum += u16::from_be_bytes([pair[0], pair[1]]) as u32;
    }
    sum + proto as u32 + len as u32
}

fn ipv4(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    l4: Vec<u8>,
) -> Frame {
    let mut b = Vec::with_capacity(14 + 20 + l4.len());
    b.extend_from_slice(&dst_mac);
    b.extend_from_slice(&src_mac);
    b.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + l4.len()) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = checksum(&ip, 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    b.extend_from_slice(&ip);
    b.extend_from_slice(&l4);
    Frame { bytes: b }
}

/// A TCP segment with the given flags (0x02 = SYN, 0x10 = ACK) and payload.
#[allow(clippy::too_many_arguments)]
pub fn ipv4_tcp(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    flags: u8,
    payload: &[u8],
) -> Frame {
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&1000u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    tcp.extend_from_slice(payload);
    let c = checksum(&tcp, pseudo_header_sum(src, dst, 6, tcp.len()));
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    ipv4(src_mac, dst_mac, src, dst, 6, tcp)
}

pub fn ipv4_udp(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Frame {
    let len = 8 + payload.len();
    let mut udp = vec![0u8; 8];
    udp[0..2].copy_from_slice(&sport.to_be_bytes());
    udp[2..4].copy_from_slice(&dport.to_be_bytes());
    udp[4..6].copy_from_slice(&(len as u16).to_be_bytes());
    udp.extend_from_slice(payload);
    let c = checksum(&udp, pseudo_header_sum(src, dst, 17, len));
    udp[6..8].copy_from_slice(&(if c == 0 { 0xffff } else { c }).to_be_bytes());
    ipv4(src_mac, dst_mac, src, dst, 17, udp)
}

/// An IPv4 frame with its fields given whole: for fragments and odd headers. `l4` is placed as
/// is (no checksum touched); the IP header checksum is computed.
#[allow(clippy::too_many_arguments)]
pub fn ipv4_raw(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    id: u16,
    frag_off: u16,
    l4: &[u8],
) -> Frame {
    let mut f = ipv4(src_mac, dst_mac, src, dst, proto, l4.to_vec());
    f.bytes[18..20].copy_from_slice(&id.to_be_bytes());
    f.bytes[20..22].copy_from_slice(&frag_off.to_be_bytes());
    f.bytes[24..26].copy_from_slice(&[0, 0]);
    let c = checksum(&f.bytes[14..34], 0);
    f.bytes[24..26].copy_from_slice(&c.to_be_bytes());
    f
}

/// The 8-byte start of a TCP header (ports, sequence number) as an ICMP error quotes it.
pub fn tcp_ports(sport: u16, dport: u16) -> Vec<u8> {
    let mut t = vec![0u8; 8];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t
}

/// ICMP "fragmentation needed" from `router` to `dst` quoting a TCP packet `quoted_src` →
/// `quoted_dst` (its IP header and first 8 bytes), with next-hop MTU `mtu`.
#[allow(clippy::too_many_arguments)]
pub fn icmp_frag_needed(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    router: Ipv4Addr,
    dst: Ipv4Addr,
    quoted_src: Ipv4Addr,
    quoted_dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    mtu: u16,
) -> Frame {
    let quoted = ipv4_tcp(
        [0; 6], [0; 6], quoted_src, quoted_dst, sport, dport, 0x10, &[0; 1400],
    );
    let mut icmp = vec![3, 4, 0, 0, 0, 0];
    icmp.extend_from_slice(&mtu.to_be_bytes());
    icmp.extend_from_slice(&quoted.bytes[14..14 + 20 + 8]);
    let c = checksum(&icmp, 0);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    ipv4(src_mac, dst_mac, router, dst, 1, icmp)
}

use std::net::Ipv6Addr;

fn ipv6_pseudo_sum(src: Ipv6Addr, dst: Ipv6Addr, next: u8, len: usize) -> u32 {
    let mut sum = 0u32;
    for pair in src.octets().chunks(2).chain(dst.octets().chunks(2)) {
        sum += u16::from_be_bytes([pair[0], pair[1]]) as u32;
    }
    sum + len as u32 + next as u32
}

/// An IPv6 frame: `ext` is a chain of extension headers already encoded (each starting with
/// its next-header byte, which this fills in), followed by `next` (the upper protocol) and
/// `upper` (its bytes, checksum already set).
pub fn ipv6(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    ext: &[(u8, Vec<u8>)],
    next: u8,
    upper: &[u8],
) -> Frame {
    let mut b = Vec::new();
    b.extend_from_slice(&dst_mac);
    b.extend_from_slice(&src_mac);
    b.extend_from_slice(&[0x86, 0xdd]);
    let mut payload = Vec::new();
    for (i, (_, bytes)) in ext.iter().enumerate() {
        let mut h = bytes.clone();
        h[0] = ext.get(i + 1).map(|(t, _)| *t).unwrap_or(next);
        payload.extend_from_slice(&h);
    }
    payload.extend_from_slice(upper);
    b.extend_from_slice(&[0x60, 0, 0, 0]);
    b.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    b.push(ext.first().map(|(t, _)| *t).unwrap_or(next));
    b.push(64);
    b.extend_from_slice(&src.octets());
    b.extend_from_slice(&dst.octets());
    b.extend_from_slice(&payload);
    Frame { bytes: b }
}

/// A TCP segment over IPv6 with the given extension headers.
#[allow(clippy::too_many_arguments)]
pub fn ipv6_tcp(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    sport: u16,
    dport: u16,
    flags: u8,
    ext: &[(u8, Vec<u8>)],
) -> Frame {
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let c = checksum(&tcp, ipv6_pseudo_sum(src, dst, 6, tcp.len()));
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    ipv6(src_mac, dst_mac, src, dst, ext, 6, &tcp)
}

/// An 8-byte IPv6 extension header of type `kind` (hop-by-hop 0, routing 43, destination
/// options 60): padding only.
pub fn ipv6_ext(kind: u8) -> (u8, Vec<u8>) {
    let mut h = vec![0u8; 8];
    if kind == 43 {
        // Routing header, type 0 segments left 0: a no-op.
        h[2] = 0;
    } else {
        // PadN option filling the 6 bytes.
        h[2] = 1;
        h[3] = 4;
    }
    (kind, h)
}

/// An IPv6 fragment header.
pub fn ipv6_frag(offset_units: u16, more: bool, id: u32) -> (u8, Vec<u8>) {
    let mut h = vec![0u8; 8];
    let v = (offset_units << 3) | more as u16;
    h[2..4].copy_from_slice(&v.to_be_bytes());
    h[4..8].copy_from_slice(&id.to_be_bytes());
    (44, h)
}

/// ICMPv6 "packet too big" quoting a TCP packet `quoted_src` → `quoted_dst`.
#[allow(clippy::too_many_arguments)]
pub fn icmpv6_too_big(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    router: Ipv6Addr,
    dst: Ipv6Addr,
    quoted_src: Ipv6Addr,
    quoted_dst: Ipv6Addr,
    sport: u16,
    dport: u16,
    mtu: u32,
) -> Frame {
    let quoted = ipv6_tcp(
        [0; 6],
        [0; 6],
        quoted_src,
        quoted_dst,
        sport,
        dport,
        0x10,
        &[],
    );
    let mut icmp = vec![2, 0, 0, 0];
    icmp.extend_from_slice(&mtu.to_be_bytes());
    icmp.extend_from_slice(&quoted.bytes[14..]);
    let c = checksum(&icmp, ipv6_pseudo_sum(router, dst, 58, icmp.len()));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    ipv6(src_mac, dst_mac, router, dst, &[], 58, &icmp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_header_checksum_verifies() {
        let f = ipv4_tcp(
            [2; 6],
            [4; 6],
            Ipv4Addr::new(198, 51, 100, 1),
            Ipv4Addr::new(203, 0, 113, 10),
            1,
            80,
            2,
            b"",
        );
        assert_eq!(checksum(&f.bytes[14..34], 0), 0);
        assert_eq!(f.bytes.len(), 14 + 20 + 20);
        let v = f.with_vlan(42);
        assert_eq!(&v.bytes[12..18], &[0x81, 0, 0, 42, 0x08, 0x00]);
    }
}
