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
