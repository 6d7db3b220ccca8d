//! Frames for the data-path tests, built with an independent packet library (etherparse):
//! Ethernet, optional 802.1Q, IPv4 and IPv6 (with extension headers), TCP, UDP and ICMP with
//! correct checksums; and [`verify`], which parses a frame the program left with etherparse and
//! checks every length and checksum in it. Nothing here shares code with the program.

use std::net::{Ipv4Addr, Ipv6Addr};

use etherparse::{
    EtherType, Ethernet2Header, IpFragOffset, IpHeaders, IpNumber, Ipv4Header, Ipv6FragmentHeader,
    Ipv6Header, Ipv6RawExtHeader, NetHeaders, PacketBuilder, PacketHeaders, SingleVlanHeader,
    TcpHeader, TransportHeader, VlanId,
};

/// A frame as it would arrive on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub bytes: Vec<u8>,
}

impl Frame {
    /// The same frame with an 802.1Q tag (VLAN `vid`) inserted after the MAC addresses.
    pub fn with_vlan(mut self, vid: u16) -> Frame {
        let tag = SingleVlanHeader {
            pcp: Default::default(),
            drop_eligible_indicator: false,
            vlan_id: VlanId::try_new(vid).expect("a 12-bit VLAN id"),
            ether_type: EtherType(u16::from_be_bytes([self.bytes[12], self.bytes[13]])),
        };
        let mut l2 = EtherType::VLAN_TAGGED_FRAME.0.to_be_bytes().to_vec();
        l2.extend_from_slice(&tag.to_bytes());
        self.bytes.splice(12..14, l2);
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

/// The IPv4 header every builder here starts from: identification 0x1234, don't fragment,
/// TTL 64.
fn ipv4_header(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload_len: usize) -> Ipv4Header {
    let mut h = Ipv4Header::new(
        payload_len as u16,
        64,
        IpNumber(proto),
        src.octets(),
        dst.octets(),
    )
    .expect("an IPv4 payload under 64 KiB");
    h.identification = 0x1234;
    h.dont_fragment = true;
    h
}

/// Ethernet, then `ip` (its checksum computed), then `payload` as it is.
fn l2_ipv4(src_mac: [u8; 6], dst_mac: [u8; 6], ip: &Ipv4Header, payload: &[u8]) -> Frame {
    let mut b = Vec::new();
    Ethernet2Header {
        source: src_mac,
        destination: dst_mac,
        ether_type: EtherType::IPV4,
    }
    .write(&mut b)
    .expect("writing to a Vec");
    ip.write(&mut b).expect("writing to a Vec");
    b.extend_from_slice(payload);
    Frame { bytes: b }
}

/// A TCP header with sequence number 1000, window 64240 and `flags` (0x02 = SYN, 0x10 = ACK).
fn tcp_header(sport: u16, dport: u16, flags: u8) -> TcpHeader {
    let mut t = TcpHeader::new(sport, dport, 1000, 64240);
    t.fin = flags & 0x01 != 0;
    t.syn = flags & 0x02 != 0;
    t.rst = flags & 0x04 != 0;
    t.psh = flags & 0x08 != 0;
    t.ack = flags & 0x10 != 0;
    t.urg = flags & 0x20 != 0;
    t.ece = flags & 0x40 != 0;
    t.cwr = flags & 0x80 != 0;
    t
}

/// Ethernet and an IPv4 header (see `ipv4_header`) in front of the transport layer.
fn ipv4_builder(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
) -> etherparse::PacketBuilderStep<IpHeaders> {
    PacketBuilder::ethernet2(src_mac, dst_mac).ip(IpHeaders::Ipv4(
        ipv4_header(src, dst, proto, 0),
        Default::default(),
    ))
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
    let mut b = Vec::new();
    ipv4_builder(src_mac, dst_mac, src, dst, 6)
        .tcp_header(tcp_header(sport, dport, flags))
        .write(&mut b, payload)
        .expect("a valid TCP segment");
    Frame { bytes: b }
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
    let mut b = Vec::new();
    ipv4_builder(src_mac, dst_mac, src, dst, 17)
        .udp(sport, dport)
        .write(&mut b, payload)
        .expect("a valid UDP datagram");
    Frame { bytes: b }
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
    let mut ip = ipv4_header(src, dst, proto, l4.len());
    ip.identification = id;
    ip.dont_fragment = frag_off & 0x4000 != 0;
    ip.more_fragments = frag_off & 0x2000 != 0;
    ip.fragment_offset = IpFragOffset::try_new(frag_off & 0x1fff).expect("13 bits");
    l2_ipv4(src_mac, dst_mac, &ip, l4)
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
    let [hi, lo] = mtu.to_be_bytes();
    let mut b = Vec::new();
    ipv4_builder(src_mac, dst_mac, router, dst, 1)
        .icmpv4_raw(3, 4, [0, 0, hi, lo])
        .write(&mut b, &quoted.bytes[14..14 + 20 + 8])
        .expect("a valid ICMP message");
    Frame { bytes: b }
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
    let mut payload = Vec::new();
    for (i, (_, bytes)) in ext.iter().enumerate() {
        let mut h = bytes.clone();
        h[0] = ext.get(i + 1).map(|(t, _)| *t).unwrap_or(next);
        payload.extend_from_slice(&h);
    }
    payload.extend_from_slice(upper);
    let mut b = Vec::new();
    Ethernet2Header {
        source: src_mac,
        destination: dst_mac,
        ether_type: EtherType::IPV6,
    }
    .write(&mut b)
    .expect("writing to a Vec");
    Ipv6Header {
        payload_length: payload.len() as u16,
        next_header: IpNumber(ext.first().map(|(t, _)| *t).unwrap_or(next)),
        hop_limit: 64,
        source: src.octets(),
        destination: dst.octets(),
        ..Default::default()
    }
    .write(&mut b)
    .expect("writing to a Vec");
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
    let mut t = tcp_header(sport, dport, flags);
    t.sequence_number = 0;
    t.checksum = t
        .calc_checksum_ipv6_raw(src.octets(), dst.octets(), &[])
        .expect("a short segment");
    ipv6(src_mac, dst_mac, src, dst, ext, 6, &t.to_bytes())
}
/// An 8-byte IPv6 extension header of type `kind` (hop-by-hop 0, routing 43, destination
/// options 60): padding only. Its next-header byte is filled in by `ipv6`.
pub fn ipv6_ext(kind: u8) -> (u8, Vec<u8>) {
    let payload = if kind == 43 {
        // Routing header, type 0 segments left 0: a no-op.
        [0u8; 6]
    } else {
        // PadN option filling the 6 bytes.
        [1, 4, 0, 0, 0, 0]
    };
    let h = Ipv6RawExtHeader::new_raw(IpNumber(0), &payload).expect("an 8-byte header");
    (kind, h.to_bytes().to_vec())
}

/// An IPv6 fragment header. Its next-header byte is filled in by `ipv6`.
pub fn ipv6_frag(offset_units: u16, more: bool, id: u32) -> (u8, Vec<u8>) {
    let offset = IpFragOffset::try_new(offset_units).expect("a 13-bit fragment offset");
    let h = Ipv6FragmentHeader::new(IpNumber(0), offset, more, id);
    (44, h.to_bytes().to_vec())
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
    let mut b = Vec::new();
    PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv6(router.octets(), dst.octets(), 64)
        .icmpv6_raw(2, 0, mtu.to_be_bytes())
        .write(&mut b, &quoted.bytes[14..])
        .expect("a valid ICMPv6 message");
    Frame { bytes: b }
}

/// A packet's source and destination addresses.
#[derive(Clone, Copy)]
enum Addrs {
    V4([u8; 4], [u8; 4]),
    V6([u8; 16], [u8; 16]),
}

/// Parses `frame` with etherparse and checks what a receiver would: the IPv4 header checksum,
/// the IP lengths against the frame, and the TCP, UDP (unless zero over IPv4), ICMP and ICMPv6
/// checksums. Returns what it found wrong.
pub fn verify(frame: &[u8]) -> Result<(), String> {
    let h = PacketHeaders::from_ethernet_slice(frame).map_err(|e| format!("unparsable: {e}"))?;
    let payload = h.payload.slice();
    let addrs = match &h.net {
        Some(NetHeaders::Ipv4(ip, _)) => {
            if ip.header_checksum != ip.calc_header_checksum() {
                return Err(format!(
                    "IPv4 header checksum {:#06x}, should be {:#06x}",
                    ip.header_checksum,
                    ip.calc_header_checksum()
                ));
            }
            Addrs::V4(ip.source, ip.destination)
        }
        Some(NetHeaders::Ipv6(ip, _)) => Addrs::V6(ip.source, ip.destination),
        _ => return Ok(()),
    };
    let err = |e: etherparse::err::ValueTooBigError<usize>| e.to_string();
    let want = match (&h.transport, addrs) {
        (Some(TransportHeader::Tcp(t)), Addrs::V4(s, d)) => Some((
            "TCP",
            t.checksum,
            t.calc_checksum_ipv4_raw(s, d, payload).map_err(err)?,
        )),
        (Some(TransportHeader::Tcp(t)), Addrs::V6(s, d)) => Some((
            "TCP",
            t.checksum,
            t.calc_checksum_ipv6_raw(s, d, payload).map_err(err)?,
        )),
        // Zero: no checksum, which only IPv4 allows.
        (Some(TransportHeader::Udp(u)), Addrs::V4(s, d)) if u.checksum != 0 => Some((
            "UDP",
            u.checksum,
            u.calc_checksum_ipv4_raw(s, d, payload).map_err(err)?,
        )),
        (Some(TransportHeader::Udp(u)), Addrs::V6(s, d)) => Some((
            "UDP",
            u.checksum,
            u.calc_checksum_ipv6_raw(s, d, payload).map_err(err)?,
        )),
        (Some(TransportHeader::Icmpv4(i)), _) => {
            Some(("ICMP", i.checksum, i.icmp_type.calc_checksum(payload)))
        }
        (Some(TransportHeader::Icmpv6(i)), Addrs::V6(s, d)) => Some((
            "ICMPv6",
            i.checksum,
            i.icmp_type.calc_checksum(s, d, payload).map_err(err)?,
        )),
        _ => None,
    };
    if let Some((what, got, want)) = want
        && got != want
    {
        return Err(format!("{what} checksum {got:#06x}, should be {want:#06x}"));
    }
    Ok(())
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
        assert_eq!(verify(&f.bytes), Ok(()));
        let v = f.with_vlan(42);
        assert_eq!(&v.bytes[12..18], &[0x81, 0, 0, 42, 0x08, 0x00]);
        assert_eq!(verify(&v.bytes), Ok(()));
    }

    #[test]
    fn verify_finds_broken_checksums() {
        let good = ipv4_udp(
            [2; 6],
            [4; 6],
            Ipv4Addr::new(198, 51, 100, 1),
            Ipv4Addr::new(203, 0, 113, 10),
            1,
            53,
            b"hello",
        );
        for (at, what) in [(24, "IPv4 header"), (40, "UDP"), (44, "UDP")] {
            let mut bad = good.bytes.clone();
            bad[at] ^= 0x10;
            let e = verify(&bad).expect_err(what);
            assert!(e.contains(what), "{what}: {e}");
        }
        let six = icmpv6_too_big(
            [2; 6],
            [4; 6],
            "2001:db8::1".parse().unwrap(),
            "2001:db8::10".parse().unwrap(),
            "2001:db8::10".parse().unwrap(),
            "2001:db8::2".parse().unwrap(),
            80,
            40000,
            1280,
        );
        assert_eq!(verify(&six.bytes), Ok(()));
        let mut bad = six.bytes.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(verify(&bad).unwrap_err().contains("ICMPv6"));
    }
}
