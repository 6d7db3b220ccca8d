//! The XDP programs of lb's tests and benchmarks (not part of lb, never loaded by lbd): a traffic
//! generator and a sink for the benchmarks' live-frames rig, the MAC-swapping floor program, an
//! XDP_PASS program (what makes a veth accept XDP_TX frames, and the "empty program" of the cost
//! benchmark), a one-VIP L2 DSR forwarder for the harness's own tests and a stateless toy
//! balancer (the rate benchmark's second reference). The tests crate loads
//! this object with aya (tests/src/bpf.rs); configuration comes in as globals set at load time.
#![no_std]
#![no_main]

mod runtime;

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{HashMap, PerCpuArray},
    macros::{btf_map, xdp},
    programs::XdpContext,
};

/// Bytes the generator writes: a 64-byte frame on the wire with its FCS.
const FRAME: usize = 60;
/// The sink's slots: 0 counts every frame, 1 + (last two bytes of the destination MAC & 1023)
/// each destination.
const SINK_SLOTS: usize = 1025;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

// ---- configuration, set by the loader (aya's `EbpfLoader::set_global`) ----------------------

/// The generator's frame, whole (the first `FRAME` bytes are used), with its variable fields
/// (client address bytes 3 and 4, TCP source port, checksums) zero.
#[unsafe(no_mangle)]
static GEN_FRAME: [u64; 8] = [0; 8];
/// Folded one's-complement sums of the IPv4 header and of the TCP pseudo-header and header
/// without their variable fields (little-endian words).
#[unsafe(no_mangle)]
static GEN_IP_BASE: u32 = 0;
#[unsafe(no_mangle)]
static GEN_L4_BASE: u32 = 0;
/// Non-zero: the flow is the counter modulo this (established flows, round robin); zero: the
/// counter's low 16 bits (a 65,536-address walk).
#[unsafe(no_mangle)]
static GEN_FLOWS: u32 = 0;
/// Non-zero: a TCP SYN, whose source port (and checksum) changes with every completed walk.
#[unsafe(no_mangle)]
static GEN_SYN: u32 = 0;
/// Non-zero: the counter's word goes into the destination address's last two bytes instead of
/// the source's (replies to the walk's clients, e.g. of NAT flows).
#[unsafe(no_mangle)]
static GEN_DST: u32 = 0;

/// The forwarder's VIP (IPv4: the first 4 bytes), its family (4 or 6) and the MACs it writes.
#[unsafe(no_mangle)]
static FWD_VIP: [u8; 16] = [0; 16];
#[unsafe(no_mangle)]
static FWD_FAMILY: u32 = 0;
#[unsafe(no_mangle)]
static FWD_DST_MAC: [u8; 6] = [0; 6];
#[unsafe(no_mangle)]
static FWD_SRC_MAC: [u8; 6] = [0; 6];

/// The toy balancer's backends' MACs (it uses the first `n` of them, `n` from `TOY_SERVICES`)
/// and the source MAC it writes.
#[unsafe(no_mangle)]
static TOY_MACS: [[u8; 6]; 4] = [[0; 6]; 4];
#[unsafe(no_mangle)]
static TOY_SRC_MAC: [u8; 6] = [0; 6];
/// The toy's jhash seed.
#[unsafe(no_mangle)]
static TOY_SEED: u32 = 0;

/// The toy balancer's services: IPv4 destination address (as in the packet) -> number of
/// backends (1 to 4).
#[btf_map]
static TOY_SERVICES: HashMap<u32, u32, 16> = HashMap::new();

/// Frames the generator made (slot 0, per CPU); its value is also the next frame's number.
#[btf_map]
static SENT: PerCpuArray<u64, 1> = PerCpuArray::new();

/// Frames the sink counted (see `SINK_SLOTS`).
#[btf_map]
static SINK: PerCpuArray<u64, SINK_SLOTS> = PerCpuArray::new();

/// A global as the loader set it (a volatile read, so the compiler does not fold the default).
#[inline(always)]
fn config<T: Copy>(global: &T) -> T {
    // SAFETY: a reference to a static is valid and aligned.
    unsafe { core::ptr::read_volatile(global) }
}

/// The packet's start if at least `len` bytes lie inside it.
#[inline(always)]
fn packet(ctx: &XdpContext, len: usize) -> Option<*mut u8> {
    let start = ctx.data();
    if start + len > ctx.data_end() {
        return None;
    }
    Some(start as *mut u8)
}

/// `~fold(sum)` for a sum of at most three 16-bit words.
#[inline(always)]
fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Writes the whole frame (a page comes back from the page pool with whatever the path under
/// test wrote into it, so nothing of the previous run may survive), then the variable fields
/// from the frame's number: the client address's last two bytes (a little-endian u16 over
/// 198.18.0.0; the source's, or with `GEN_DST` the destination's), for SYNs the source port (1024 + completed walks of `GEN_FLOWS` or 65,536
/// addresses, stored little-endian), and
/// the checksums fixed from their bases. Returns XDP_TX.
#[xdp]
pub fn generator(ctx: XdpContext) -> u32 {
    let Some(p) = packet(&ctx, FRAME) else {
        return xdp_action::XDP_DROP;
    };
    let Some(sent) = SENT.get_ptr_mut(0) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: a pointer from a map lookup is valid for this run; per-CPU, so no other writer.
    let n = unsafe {
        let n = *sent;
        *sent = n + 1;
        n
    };
    let frame = p as *mut u64;
    // SAFETY: `packet` checked that FRAME bytes lie inside the packet; a frame starts 8-byte
    // aligned (XDP headroom), and every field written below is at an even offset.
    unsafe {
        for i in 0..FRAME / 8 {
            *frame.add(i) = config(&GEN_FRAME[i]);
        }
        *(frame.add(FRAME / 8) as *mut u32) = config(&GEN_FRAME[FRAME / 8]) as u32;
        let flows = config(&GEN_FLOWS) as u64;
        let w = if flows != 0 { n % flows } else { n & 0xffff };
        if config(&GEN_DST) != 0 {
            *(p.add(32) as *mut u16) = w as u16;
        } else {
            *(p.add(28) as *mut u16) = w as u16;
        }
        *(p.add(24) as *mut u16) = fold(w + config(&GEN_IP_BASE) as u64);
        if config(&GEN_SYN) != 0 {
            // The source port changes with every completed walk.
            let walks = if flows != 0 { n / flows } else { n >> 16 };
            let sport = (walks & 0x7fff) + 1024;
            *(p.add(34) as *mut u16) = sport as u16;
            *(p.add(50) as *mut u16) = fold(w + sport + config(&GEN_L4_BASE) as u64);
        }
    }
    xdp_action::XDP_TX
}

/// Adds one to slot `slot` of the sink.
#[inline(always)]
fn count(slot: u32) {
    if let Some(c) = SINK.get_ptr_mut(slot) {
        // SAFETY: a pointer from a map lookup is valid for this run; per-CPU, so no other writer.
        unsafe { *c += 1 };
    }
}

/// Counts IPv4 TCP, UDP and IP-in-IP frames (slot 0, and the slot of the destination MAC) and
/// drops every frame.
#[xdp]
pub fn sink(ctx: XdpContext) -> u32 {
    let Some(p) = packet(&ctx, 34) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: `packet` checked that 34 bytes lie inside the packet.
    let (ether_type, proto, mac) = unsafe {
        (
            u16::from_be_bytes([*p.add(12), *p.add(13)]),
            *p.add(23),
            u16::from_be_bytes([*p.add(4), *p.add(5)]),
        )
    };
    if ether_type == ETH_P_IP && matches!(proto, 6 | 17 | 4) {
        count(0);
        count(1 + (mac & 1023) as u32);
    }
    xdp_action::XDP_DROP
}

/// Swaps the source and destination MACs, for a frame at least an Ethernet header long.
#[inline(always)]
fn swap_macs(p: *mut u8) {
    // SAFETY: callers checked that 14 bytes lie inside the packet.
    unsafe {
        let dst = core::ptr::read_unaligned(p as *const [u8; 6]);
        let src = core::ptr::read_unaligned(p.add(6) as *const [u8; 6]);
        core::ptr::write_unaligned(p as *mut [u8; 6], src);
        core::ptr::write_unaligned(p.add(6) as *mut [u8; 6], dst);
    }
}

/// The floor of the rate benchmark: swaps the MACs and sends the frame back out of the
/// interface it came in on (frames shorter than an Ethernet header pass).
#[xdp]
pub fn floor(ctx: XdpContext) -> u32 {
    let Some(p) = packet(&ctx, 14) else {
        return xdp_action::XDP_PASS;
    };
    swap_macs(p);
    xdp_action::XDP_TX
}

/// XDP_PASS, and nothing else.
#[xdp]
pub fn pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// A one-VIP L2 direct-server-return forwarder: a frame to `FWD_VIP` (of `FWD_FAMILY`) goes
/// back out with destination MAC `FWD_DST_MAC` and source `FWD_SRC_MAC`; everything else passes.
#[xdp]
pub fn dsr(ctx: XdpContext) -> u32 {
    if config(&FWD_FAMILY) == 6 {
        forward::<16>(&ctx, ETH_P_IPV6, 14 + 24)
    } else {
        forward::<4>(&ctx, ETH_P_IP, 14 + 16)
    }
}

/// `dsr` for one family: its ethertype, and its destination address of `N` bytes at `at`.
#[inline(always)]
fn forward<const N: usize>(ctx: &XdpContext, ether_type: u16, at: usize) -> u32 {
    let Some(p) = packet(ctx, at + N) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: `packet` checked that the bytes up to the end of the address lie in the packet.
    unsafe {
        if u16::from_be_bytes([*p.add(12), *p.add(13)]) != ether_type {
            return xdp_action::XDP_PASS;
        }
        for i in 0..N {
            if *p.add(at + i) != config(&FWD_VIP[i]) {
                return xdp_action::XDP_PASS;
            }
        }
        core::ptr::write_unaligned(p as *mut [u8; 6], config(&FWD_DST_MAC));
        core::ptr::write_unaligned(p.add(6) as *mut [u8; 6], config(&FWD_SRC_MAC));
    }
    xdp_action::XDP_TX
}

/// Bob Jenkins' final mix of three words (the kernel's `jhash_3words`).
#[inline(always)]
fn jhash_3words(a: u32, b: u32, c: u32, seed: u32) -> u32 {
    let init = seed.wrapping_add(0xdead_beef).wrapping_add(3 << 2);
    let (mut a, mut b, mut c) = (
        a.wrapping_add(init),
        b.wrapping_add(init),
        c.wrapping_add(init),
    );
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(14));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(11));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(25));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(16));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(4));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(14));
    c ^= b;
    c.wrapping_sub(b.rotate_left(24))
}

/// A stateless toy balancer, the rate benchmark's second reference (what a balancer without a
/// connection table costs): an IPv4 TCP or UDP packet (no IP options) whose destination is in
/// `TOY_SERVICES` goes to backend `jhash(source, destination, ports) % n`: destination MAC
/// `TOY_MACS[i]`, source `TOY_SRC_MAC`, XDP_TX. Everything else passes.
#[xdp]
pub fn toy(ctx: XdpContext) -> u32 {
    let Some(p) = packet(&ctx, 14 + 20 + 4) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: `packet` checked that the Ethernet and IPv4 headers and the ports lie inside it.
    unsafe {
        if u16::from_be_bytes([*p.add(12), *p.add(13)]) != ETH_P_IP
            || *p.add(14) != 0x45
            || !matches!(*p.add(23), 6 | 17)
        {
            return xdp_action::XDP_PASS;
        }
        let dst = core::ptr::read_unaligned(p.add(30) as *const u32);
        let Some(n) = TOY_SERVICES.get_ptr(dst) else {
            return xdp_action::XDP_PASS;
        };
        let n = *n;
        if n == 0 || n > 4 {
            return xdp_action::XDP_PASS;
        }
        let src = core::ptr::read_unaligned(p.add(26) as *const u32);
        let ports = core::ptr::read_unaligned(p.add(34) as *const u32);
        // A constant index each (the verifier does not bound a `%` by a map value).
        let mac = match jhash_3words(src, dst, ports, config(&TOY_SEED)) % n {
            0 => config(&TOY_MACS[0]),
            1 => config(&TOY_MACS[1]),
            2 => config(&TOY_MACS[2]),
            _ => config(&TOY_MACS[3]),
        };
        core::ptr::write_unaligned(p as *mut [u8; 6], mac);
        core::ptr::write_unaligned(p.add(6) as *mut [u8; 6], config(&TOY_SRC_MAC));
    }
    xdp_action::XDP_TX
}
