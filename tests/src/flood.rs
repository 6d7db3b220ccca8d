//! A spoofed-source flood generator for end-to-end tests: IPv4 TCP SYNs or UDP datagrams from
//! random sources in 198.18.0.0/15 (RFC 2544's benchmarking block) and random source ports,
//! written as whole Ethernet frames to one interface through an AF_PACKET socket (qdisc
//! bypassed, `sendmmsg` in batches), as fast as the sending thread goes, for a bounded time.
//! Run it on a thread inside the namespace that holds the interface (`Topology::in_netns`).

use std::io;
use std::mem;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// What a flood sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloodKind {
    /// TCP SYNs (every one a new connection).
    Syn,
    /// UDP datagrams of 18 bytes (every one a new flow).
    Udp,
}

/// Where a flood goes.
#[derive(Debug, Clone, Copy)]
pub struct FloodSpec {
    /// The interface the frames leave by, in the calling thread's namespace.
    pub ifindex: u32,
    pub src_mac: [u8; 6],
    /// The next hop's MAC (the load balancer's).
    pub dst_mac: [u8; 6],
    pub dst: Ipv4Addr,
    pub dport: u16,
    pub kind: FloodKind,
    /// Seed of the sources, ports and sequence numbers.
    pub seed: u64,
    /// Most frames per second (0: as fast as the kernel takes them).
    pub max_pps: u64,
}

/// What a flood sent.
#[derive(Debug, Clone, Copy, Default)]
pub struct FloodReport {
    /// Frames the kernel took.
    pub packets: u64,
    /// From the first send to the last.
    pub elapsed: Duration,
}

impl FloodReport {
    /// Packets per second over the flood.
    pub fn rate(&self) -> f64 {
        self.packets as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Frames per `sendmmsg`.
const BATCH: usize = 64;
/// Room for the longest frame (UDP: 14 + 20 + 8 + 18 = 60 bytes, a 64-byte frame on the wire).
const FRAME_MAX: usize = 64;
const UDP_PAYLOAD: usize = 18;
/// The benchmarking block, 198.18.0.0/15.
const SPOOF_NET: u32 = 0xc612_0000;
const SPOOF_MASK: u32 = 0x0001_ffff;

/// The one's-complement sum of big-endian 16-bit words, folded (not complemented).
fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

fn sum_be(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum()
}

/// xorshift64*: cheap, and good enough for spreading sources over a hash.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Writes one frame of `spec` from `src:sport` (sequence number `seq` for a SYN) into `f`;
/// returns its length. Checksums are complete (the balancer and the backends see valid
/// packets).
fn frame(spec: &FloodSpec, src: Ipv4Addr, sport: u16, seq: u32, f: &mut [u8; FRAME_MAX]) -> usize {
    let l4_len = match spec.kind {
        FloodKind::Syn => 20,
        FloodKind::Udp => 8 + UDP_PAYLOAD,
    };
    let ip_len = 20 + l4_len;
    *f = [0; FRAME_MAX];
    f[0..6].copy_from_slice(&spec.dst_mac);
    f[6..12].copy_from_slice(&spec.src_mac);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    {
        let ip = &mut f[14..34];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&(ip_len as u16).to_be_bytes());
        ip[4..6].copy_from_slice(&(seq as u16).to_be_bytes());
        ip[6..8].copy_from_slice(&0x4000u16.to_be_bytes()); // DF
        ip[8] = 64;
        ip[9] = if spec.kind == FloodKind::Syn { 6 } else { 17 };
        ip[12..16].copy_from_slice(&src.octets());
        ip[16..20].copy_from_slice(&spec.dst.octets());
        let c = !fold(sum_be(ip));
        ip[10..12].copy_from_slice(&c.to_be_bytes());
    }
    let l4 = &mut f[34..34 + l4_len];
    l4[0..2].copy_from_slice(&sport.to_be_bytes());
    l4[2..4].copy_from_slice(&spec.dport.to_be_bytes());
    match spec.kind {
        FloodKind::Syn => {
            l4[4..8].copy_from_slice(&seq.to_be_bytes());
            l4[12] = 0x50; // data offset 5
            l4[13] = 0x02; // SYN
            l4[14..16].copy_from_slice(&64_240u16.to_be_bytes());
            let pseudo = sum_be(&src.octets()) + sum_be(&spec.dst.octets()) + 6 + l4_len as u32;
            let c = !fold(pseudo + sum_be(l4));
            l4[16..18].copy_from_slice(&c.to_be_bytes());
        }
        FloodKind::Udp => {
            l4[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
            l4[8..].fill(0x5a);
            // Checksum 0: none (valid for UDP over IPv4).
        }
    }
    14 + ip_len
}

/// An AF_PACKET raw socket bound to `ifindex` (protocol 0: it receives nothing), qdisc
/// bypassed.
fn packet_socket(ifindex: u32) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket(2) and is owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: valid fd, pointer to a c_int with its length.
    if unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            &one as *const _ as *const libc::c_void,
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: sockaddr_ll is plain data (all-zero valid); bind reads it within its length.
    let rc = unsafe {
        let mut sll: libc::sockaddr_ll = mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = ifindex as i32;
        libc::bind(
            sock.as_raw_fd(),
            &sll as *const _ as *const libc::sockaddr,
            mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

/// Sends `frames` (each `lens[i]` bytes long) in one `sendmmsg` on the bound socket; returns
/// how many the kernel took.
fn send_batch(
    sock: &OwnedFd,
    frames: &mut [[u8; FRAME_MAX]; BATCH],
    lens: &[usize; BATCH],
) -> io::Result<usize> {
    // SAFETY: iovec and mmsghdr are plain data (all-zero valid); each iovec points into
    // `frames`, which outlives the call, with a length within its frame; msg_name is null (the
    // socket is bound), so the kernel reads only the iovecs.
    let n = unsafe {
        let mut iov: [libc::iovec; BATCH] = mem::zeroed();
        let mut msgs: [libc::mmsghdr; BATCH] = mem::zeroed();
        for i in 0..BATCH {
            iov[i].iov_base = frames[i].as_mut_ptr() as *mut libc::c_void;
            iov[i].iov_len = lens[i];
            msgs[i].msg_hdr.msg_iov = &mut iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0)
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Floods as `spec` says for `duration`, or until `stop` is set, from the calling thread (in
/// the namespace of `spec.ifindex`). Fails when the socket cannot be made or a send fails for
/// another reason than a full queue.
pub fn flood(spec: &FloodSpec, duration: Duration, stop: &AtomicBool) -> Result<FloodReport> {
    let sock = packet_socket(spec.ifindex)
        .with_context(|| format!("opening an AF_PACKET socket on ifindex {}", spec.ifindex))?;
    let mut rng = Rng(spec.seed | 1);
    let mut frames = [[0u8; FRAME_MAX]; BATCH];
    let mut lens = [0usize; BATCH];
    let mut packets = 0u64;
    let began = Instant::now();
    let mut batches = 0u64;
    loop {
        // The clock and the stop flag every 16 batches (1,024 frames).
        if batches.is_multiple_of(16)
            && (began.elapsed() >= duration || stop.load(Ordering::Relaxed))
        {
            break;
        }
        batches += 1;
        for (f, len) in frames.iter_mut().zip(lens.iter_mut()) {
            let r = rng.next();
            let src = Ipv4Addr::from(SPOOF_NET | (r as u32 & SPOOF_MASK));
            let sport = 1024 + ((r >> 17) as u16 % (65_535 - 1024));
            *len = frame(spec, src, sport, (r >> 33) as u32, f);
        }
        match send_batch(&sock, &mut frames, &lens) {
            Ok(n) => packets += n as u64,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOBUFS | libc::EAGAIN)) => {}
            Err(e) => bail!("sending a {:?} flood: {e}", spec.kind),
        }
        if spec.max_pps > 0 {
            let due = Duration::from_secs_f64(packets as f64 / spec.max_pps as f64);
            if let Some(ahead) = due.checked_sub(began.elapsed()) {
                std::thread::sleep(ahead.min(Duration::from_millis(50)));
            }
        }
    }
    Ok(FloodReport {
        packets,
        elapsed: began.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: FloodKind) -> FloodSpec {
        FloodSpec {
            ifindex: 1,
            src_mac: [2, 0, 0, 0, 0x0f, 1],
            dst_mac: [2, 0, 0, 0, 0x0a, 2],
            dst: Ipv4Addr::new(203, 0, 113, 10),
            dport: 80,
            kind,
            seed: 7,
            max_pps: 0,
        }
    }

    #[test]
    fn frames_are_valid_packets_of_their_kind() {
        use etherparse::{NetHeaders, PacketHeaders, TransportHeader};
        for kind in [FloodKind::Syn, FloodKind::Udp] {
            let mut f = [0u8; FRAME_MAX];
            let src = Ipv4Addr::new(198, 19, 1, 2);
            let n = frame(&spec(kind), src, 4321, 0xdead_beef, &mut f);
            crate::packet::verify(&f[..n]).unwrap_or_else(|e| panic!("{kind:?}: {e}"));
            let h = PacketHeaders::from_ethernet_slice(&f[..n]).expect("parses");
            let Some(NetHeaders::Ipv4(ip, _)) = &h.net else {
                panic!("{kind:?}: not IPv4");
            };
            assert_eq!(ip.source, src.octets());
            assert_eq!(ip.destination, [203, 0, 113, 10]);
            match (kind, &h.transport) {
                (FloodKind::Syn, Some(TransportHeader::Tcp(t))) => {
                    assert!(t.syn && !t.ack);
                    assert_eq!((t.source_port, t.destination_port), (4321, 80));
                    assert_eq!(t.sequence_number, 0xdead_beef);
                    assert_ne!(t.checksum, 0);
                }
                (FloodKind::Udp, Some(TransportHeader::Udp(u))) => {
                    assert_eq!((u.source_port, u.destination_port), (4321, 80));
                    assert_eq!(h.payload.slice().len(), UDP_PAYLOAD);
                    assert_eq!(n, 60);
                }
                (k, t) => panic!("{k:?}: {t:?}"),
            }
        }
    }
}
