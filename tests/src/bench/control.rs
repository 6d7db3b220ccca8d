//! Benchmark part `control`: the control plane.
//!
//! - Maglev table build time (`lb_common::maglev::build_table`, in this process, release build)
//!   for 10 … 10,000 backends at table sizes 65,537 and 655,373.
//! - Disruption when one of N backends is removed (share of the table's slots, i.e. of the
//!   clients, that change backend, beside the ideal 1/N) and balance (max/mean slots of a
//!   backend), computed from the tables themselves.
//! - The time from `lbctl backend add` returning to the first packet reaching the new backend,
//!   in a namespace topology with the real lbd: a client address that lb-common (and `lbctl
//!   lookup`) place on the new backend sends TCP SYNs to the VIP in a paced loop, and a packet
//!   socket on the new backend's eth0 timestamps (kernel receive time) the first one that
//!   arrives.

use std::{
    hint::black_box,
    mem::{size_of, zeroed},
    net::{IpAddr, Ipv4Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result, bail};
use lb_common::{
    hash,
    maglev::{MaglevBackend, build_table},
    source_slot,
};
use lb_userspace::state::to_addr;

use super::{Figure, Opts};
use crate::{
    Topology, TopologyOptions,
    lbd::{Lbd, LbdPaths, start_lbd},
};

const SECTION_BUILD: &str = "control plane: Maglev table build";
const SECTION_DISRUPTION: &str = "control plane: Maglev disruption and balance";
const SECTION_ADD: &str = "control plane: lbctl backend add to first packet";

const SEED_HEX: &str = "5f0c1d2e3f4051627384950a1b2c3d4e";
const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const SMALL: u32 = 65_537;
const LARGE: u32 = 655_373;

pub fn run(opts: &Opts) -> Result<Vec<Figure>> {
    let mut figures = build_times(opts);
    figures.extend(disruption());
    figures.extend(add_to_first_packet(opts).context("lbctl backend add to first packet")?);
    Ok(figures)
}

fn seed() -> [u64; 2] {
    hash::parse_seed(SEED_HEX).expect("a valid seed")
}

/// `n` backends of weight 100 at 10.0.0.1, 10.0.0.2, …; id = index.
fn backends(n: usize) -> Vec<MaglevBackend> {
    (0..n)
        .map(|i| MaglevBackend {
            id: i as u32,
            addr: to_addr(IpAddr::V4(Ipv4Addr::from(0x0a00_0001u32 + i as u32))),
            salt: 0,
            weight: 100,
        })
        .collect()
}

fn is_prime(n: u32) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

// ---- build time -------------------------------------------------------------------------------

fn build_times(opts: &Opts) -> Vec<Figure> {
    let seed = seed();
    let mut figures = vec![];
    for m in [SMALL, LARGE] {
        assert!(is_prime(m), "{m} is not a prime");
        for n in [10usize, 100, 1_000, 10_000] {
            let bs = backends(n);
            // One build not counted: page faults of the first allocation of this size, caches.
            black_box(build_table(&seed, black_box(&bs), m));
            let samples: Vec<f64> = (0..opts.repetitions)
                .map(|_| {
                    let start = Instant::now();
                    let table = build_table(&seed, black_box(&bs), m);
                    let el = start.elapsed();
                    black_box(table);
                    el.as_secs_f64() * 1e3
                })
                .collect();
            let mut note = format!(
                "in-process, release build, one thread; {} runs after one not counted; {:.1} slots per backend",
                opts.repetitions,
                m as f64 / n as f64
            );
            if (m as usize) < 100 * n {
                note.push_str(" (below lbd's 100-per-backend recommendation)");
            }
            figures.push(Figure::from_samples(
                SECTION_BUILD,
                &format!("build_table, {n} backends, {m} slots"),
                "ms",
                samples,
                &note,
            ));
        }
    }
    figures
}

// ---- disruption and balance ------------------------------------------------------------------

fn disruption() -> Vec<Figure> {
    let seed = seed();
    let m = SMALL;
    let mut figures = vec![];
    for n in [3usize, 10, 100, 1_000] {
        let all = backends(n);
        let before = build_table(&seed, &all, m);

        // Balance: slots per backend.
        let mut counts = vec![0u64; n];
        for &id in &before {
            counts[id as usize] += 1;
        }
        let mean = m as f64 / n as f64;
        let max = *counts.iter().max().unwrap() as f64;
        let min = *counts.iter().min().unwrap() as f64;

        // Remove each of (up to) 10 backends spread over the address order, one at a time.
        let k = n.min(10);
        let mut moved = vec![];
        let mut collateral = vec![];
        for j in 0..k {
            let victim = (j * n / k) as u32;
            let rest: Vec<MaglevBackend> = all.iter().copied().filter(|b| b.id != victim).collect();
            let after = build_table(&seed, &rest, m);
            let changed = before.iter().zip(&after).filter(|(a, b)| a != b).count();
            let others = before
                .iter()
                .zip(&after)
                .filter(|(a, b)| **a != victim && a != b)
                .count();
            moved.push(100.0 * changed as f64 / m as f64);
            collateral.push(100.0 * others as f64 / m as f64);
        }
        let ideal = 100.0 / n as f64;
        let coll = Figure::from_samples("", "", "", collateral, "");
        figures.push(Figure::from_samples(
            SECTION_DISRUPTION,
            &format!("clients moved when 1 of {n} backends is removed, {m} slots"),
            "%",
            moved,
            &format!(
                "ideal 1/N = {ideal:.3}%; share of the table's slots that change backend (clients hash uniformly over slots); {k} different backends removed one at a time; of it, clients of surviving backends moved: median {:.4}% (max {:.4}%)",
                coll.median, coll.max
            ),
        ));
        figures.push(Figure::value(
            SECTION_DISRUPTION,
            &format!("max/mean backend share, {n} backends, {m} slots"),
            "ratio",
            max / mean,
            &format!(
                "slots per backend: mean {mean:.2}, max {max:.0}, min {min:.0} (min/mean {:.4}); equal weights",
                min / mean
            ),
        ));
    }
    figures
}

// ---- lbctl backend add to first packet -------------------------------------------------------

/// A pause between SYNs of the traffic loop (the measurement's resolution).
const PACE: Duration = Duration::from_micros(100);

fn baddr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, 10 + i as u8)
}

/// The backend (1-based) lb-common places `src` on among backends `among` (equal weights).
fn predicted(src: IpAddr, among: &[usize]) -> usize {
    let bs: Vec<MaglevBackend> = among
        .iter()
        .map(|&i| MaglevBackend {
            id: i as u32,
            addr: to_addr(IpAddr::V4(baddr(i))),
            salt: 0,
            weight: 100,
        })
        .collect();
    let table = build_table(&seed(), &bs, SMALL);
    table[source_slot(&seed(), SMALL, &to_addr(src)).unwrap() as usize] as usize
}

fn config(paths: &LbdPaths, backends: &[usize]) -> String {
    let mut c = paths.daemon_section(&format!("hash_seed = \"{SEED_HEX}\""));
    c.push_str(&format!(
        "\n[[service]]\nname = \"web\"\nvip = \"{VIP}\"\nport = 80\nprotocol = \"tcp\"\ntable_size = {SMALL}\n\n"
    ));
    for &i in backends {
        c.push_str(&format!(
            "[[service.backend]]\naddress = \"{}\"\n\n",
            baddr(i)
        ));
    }
    c
}

fn lbctl_ok(lbd: &Lbd, args: &[&str]) -> Result<()> {
    let out = lbd.lbctl(args)?;
    if !out.status.success() {
        bail!(
            "lbctl {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn add_to_first_packet(opts: &Opts) -> Result<Vec<Figure>> {
    let t = Topology::new(TopologyOptions {
        backends: 3,
        clients: 1,
        addresses_per_client: 40,
        vips: vec![IpAddr::V4(VIP)],
        start_servers: true,
        ..Default::default()
    })?;
    let paths = LbdPaths::for_topology(&t);
    let lbd = start_lbd(&t, &config(&paths, &[1, 2]))?;

    // A client address that moves to backend 3 when it is added.
    let src = t
        .client_sources(1)
        .into_iter()
        .find(|&s| predicted(s, &[1, 2, 3]) == 3)
        .context("no client address lands on backend 3")?;
    let IpAddr::V4(src4) = src else {
        bail!("{src} is not IPv4")
    };

    // The watcher: a packet socket on backend 3's eth0 (made inside its namespace).
    let sock = t.in_netns(t.backend_ns(3), || open_packet_socket("eth0"))?;

    let stop = AtomicBool::new(false);
    let sent = AtomicU64::new(0);
    let mut add_ms = vec![]; // lbctl returned → first packet
    let mut cmd_ms = vec![]; // lbctl's own duration
    let mut start_ms = vec![]; // lbctl started → first packet
    let mut first_add = String::new();
    let mut sender_secs = 0.0;
    let result: Result<()> = std::thread::scope(|s| {
        let sender = s.spawn(|| {
            t.in_netns(t.client_ns(1), || {
                let start = Instant::now();
                syn_loop(src4, &stop, &sent)?;
                Ok(start.elapsed().as_secs_f64())
            })
        });
        let measured = (|| -> Result<()> {
            // Warm-up (not counted): the first add also resolves backend 3's MAC; check that
            // lbctl lookup agrees with lb-common and that the packets do arrive.
            wait_quiet(sock.as_raw_fd())?;
            let (before, after) = timed_add(&lbd)?;
            let v = lbd.lbctl_json(&["lookup", "web", &src.to_string()])?;
            if v["backend"].as_str() != Some(&baddr(3).to_string()) {
                bail!(
                    "lbctl lookup places {src} on {}, expected {}",
                    v["backend"],
                    baddr(3)
                );
            }
            let first = wait_vip_packet(sock.as_raw_fd(), Duration::from_secs(5))?
                .context("no packet reached backend 3 within 5 s of the first add")?;
            first_add = format!(
                "the first add (backend 3's MAC not yet in the neighbour table; not counted): first packet {:.1} ms after lbctl started, lbctl took {:.1} ms",
                signed_ms(first, before),
                signed_ms(after, before)
            );
            lbctl_ok(&lbd, &["backend", "remove", "web", &baddr(3).to_string()])?;
            for _ in 0..opts.repetitions {
                wait_quiet(sock.as_raw_fd())?;
                let (before, after) = timed_add(&lbd)?;
                let first = wait_vip_packet(sock.as_raw_fd(), Duration::from_secs(5))?
                    .context("no packet reached backend 3 within 5 s of lbctl backend add")?;
                add_ms.push(signed_ms(first, after));
                start_ms.push(signed_ms(first, before));
                cmd_ms.push(signed_ms(after, before));
                lbctl_ok(&lbd, &["backend", "remove", "web", &baddr(3).to_string()])?;
            }
            Ok(())
        })();
        stop.store(true, Ordering::SeqCst);
        match sender.join() {
            Ok(Ok(secs)) => sender_secs = secs,
            Ok(Err(e)) => return Err(e.context("the SYN sender")),
            Err(p) => std::panic::resume_unwind(p),
        }
        measured
    });
    result.with_context(|| format!("lbd's log:\n{}", tail(&lbd.log(), 30)))?;

    let n = sent.load(Ordering::SeqCst);
    let gap_us = sender_secs * 1e6 / n.max(1) as f64;
    let note = format!(
        "lbd with 2 backends, no health checks; client {src} (lookup: backend 3 once added) sends a TCP SYN to {VIP}:80 every {gap_us:.0} µs on average (the resolution); first packet = kernel receive timestamp of a packet socket on backend 3's eth0; negative = arrived before lbctl returned; {} add/remove rounds; {first_add}",
        opts.repetitions
    );
    Ok(vec![
        Figure::from_samples(
            SECTION_ADD,
            "lbctl backend add returned → first packet at the new backend",
            "ms",
            add_ms,
            &note,
        ),
        Figure::from_samples(
            SECTION_ADD,
            "lbctl backend add started → first packet at the new backend",
            "ms",
            start_ms,
            "same rounds and packets as above, counted from the start of the lbctl process",
        ),
        Figure::from_samples(
            SECTION_ADD,
            "lbctl backend add, whole command",
            "ms",
            cmd_ms,
            "wall time of the lbctl process (start to exit), same rounds; lbd answers only after the whole reconcile (the new 65,537-slot table is built, filled through mmap and swapped in once) and the durable config write (fsync); the first packet follows the swap",
        ),
    ])
}

fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs `lbctl backend add web 192.0.2.13`; returns the wall-clock times it started and
/// returned at.
fn timed_add(lbd: &Lbd) -> Result<(SystemTime, SystemTime)> {
    let start = SystemTime::now();
    lbctl_ok(lbd, &["backend", "add", "web", &baddr(3).to_string()])?;
    Ok((start, SystemTime::now()))
}

/// `a - b` in milliseconds, negative when `a` is earlier.
fn signed_ms(a: SystemTime, b: SystemTime) -> f64 {
    match a.duration_since(b) {
        Ok(d) => d.as_secs_f64() * 1e3,
        Err(e) => -e.duration().as_secs_f64() * 1e3,
    }
}

fn last_os_error(what: &str) -> anyhow::Error {
    anyhow::Error::new(std::io::Error::last_os_error()).context(what.to_string())
}

/// Sends TCP SYNs from `src` to VIP:80 until `stop`: a non-blocking connect (which sends the
/// SYN at once), then close (a socket in SYN-SENT goes away silently; the client's stack answers
/// the SYN-ACK with a RST). Runs in the client's namespace.
fn syn_loop(src: Ipv4Addr, stop: &AtomicBool, sent: &AtomicU64) -> Result<()> {
    let sa = |ip: Ipv4Addr, port: u16| -> libc::sockaddr_in {
        let mut a: libc::sockaddr_in = unsafe { zeroed() };
        a.sin_family = libc::AF_INET as libc::sa_family_t;
        a.sin_port = port.to_be();
        a.sin_addr.s_addr = u32::from(ip).to_be();
        a
    };
    let local = sa(src, 0);
    let remote = sa(VIP, 80);
    let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: plain socket calls on a descriptor owned here.
        unsafe {
            let fd = libc::socket(
                libc::AF_INET,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            );
            if fd < 0 {
                return Err(last_os_error("socket"));
            }
            let fd = OwnedFd::from_raw_fd(fd);
            if libc::bind(
                fd.as_raw_fd(),
                &local as *const _ as *const libc::sockaddr,
                len,
            ) != 0
            {
                return Err(last_os_error(&format!("bind {src}")));
            }
            let r = libc::connect(
                fd.as_raw_fd(),
                &remote as *const _ as *const libc::sockaddr,
                len,
            );
            if r != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINPROGRESS) {
                return Err(last_os_error(&format!("connect {src} -> {VIP}:80")));
            }
        }
        sent.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(PACE);
    }
    Ok(())
}

/// A packet socket for IPv4 packets (no link header) on `ifname`, with kernel receive
/// timestamps. Call inside the namespace that holds `ifname`.
fn open_packet_socket(ifname: &str) -> Result<OwnedFd> {
    let proto = (libc::ETH_P_IP as u16).to_be();
    // SAFETY: plain socket calls on a descriptor owned here.
    unsafe {
        let fd = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            proto as i32,
        );
        if fd < 0 {
            return Err(last_os_error("socket(AF_PACKET)"));
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let name = std::ffi::CString::new(ifname)?;
        let ifindex = libc::if_nametoindex(name.as_ptr());
        if ifindex == 0 {
            return Err(last_os_error(&format!("ifindex of {ifname}")));
        }
        let mut sll: libc::sockaddr_ll = zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex as i32;
        if libc::bind(
            fd.as_raw_fd(),
            &sll as *const _ as *const libc::sockaddr,
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        ) != 0
        {
            return Err(last_os_error("bind(AF_PACKET)"));
        }
        let one: libc::c_int = 1;
        if libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            &one as *const _ as *const libc::c_void,
            size_of::<libc::c_int>() as libc::socklen_t,
        ) != 0
        {
            return Err(last_os_error("SO_TIMESTAMPNS"));
        }
        Ok(fd)
    }
}

enum Recv {
    /// Nothing queued (non-blocking) or the receive timeout passed.
    Nothing,
    /// Some other packet (not client → VIP:80/tcp, or an outgoing one).
    Other,
    /// A client packet to VIP:80/tcp, with its receive time.
    Vip(SystemTime),
}

/// Receives one packet from the packet socket: waits up to `wait` (none: non-blocking).
fn recv_one(fd: RawFd, wait: Option<Duration>) -> Result<Recv> {
    if let Some(w) = wait {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = w.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            return Err(last_os_error("poll"));
        }
        if r == 0 {
            return Ok(Recv::Nothing);
        }
    }
    let mut buf = [0u8; 128];
    let mut ctrl = [0u64; 16];
    // SAFETY: recvmsg into buffers owned here, sizes given.
    let (n, from, msg) = unsafe {
        let mut from: libc::sockaddr_ll = zeroed();
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        let mut msg: libc::msghdr = zeroed();
        msg.msg_name = &mut from as *mut _ as *mut libc::c_void;
        msg.msg_namelen = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = ctrl.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = size_of::<[u64; 16]>();
        let n = libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT | libc::MSG_TRUNC);
        (n, from, msg)
    };
    let now = SystemTime::now();
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::WouldBlock {
            return Ok(Recv::Nothing);
        }
        return Err(anyhow::Error::new(e).context("recvmsg(AF_PACKET)"));
    }
    if from.sll_pkttype == libc::PACKET_OUTGOING {
        return Ok(Recv::Other);
    }
    let p = &buf[..(n as usize).min(buf.len())];
    if p.len() < 24 || p[0] >> 4 != 4 || p[9] != libc::IPPROTO_TCP as u8 {
        return Ok(Recv::Other);
    }
    let ihl = (p[0] & 0x0f) as usize * 4;
    if p[16..20] != VIP.octets() || p.len() < ihl + 4 || p[ihl + 2..ihl + 4] != 80u16.to_be_bytes()
    {
        return Ok(Recv::Other);
    }
    // The kernel's receive timestamp, when there is one that makes sense.
    let mut when = now;
    // SAFETY: walking the control messages recvmsg filled in.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SO_TIMESTAMPNS {
                let ts: libc::timespec =
                    std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::timespec);
                let k = SystemTime::UNIX_EPOCH + Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
                if k <= now && now.duration_since(k).unwrap_or_default() < Duration::from_secs(10) {
                    when = k;
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(Recv::Vip(when))
}

/// Waits up to `deadline` for a client packet to VIP:80 on the packet socket.
fn wait_vip_packet(fd: RawFd, deadline: Duration) -> Result<Option<SystemTime>> {
    let start = Instant::now();
    while let Some(left) = deadline.checked_sub(start.elapsed()) {
        match recv_one(fd, Some(left))? {
            Recv::Vip(t) => return Ok(Some(t)),
            Recv::Other => {}
            Recv::Nothing => {
                if left < Duration::from_millis(2) {
                    break;
                }
            }
        }
    }
    Ok(None)
}

/// Drains the packet socket until no VIP packet has arrived for 200 ms (after a remove, SYNs
/// already on their way may still land); fails after 5 s.
fn wait_quiet(fd: RawFd) -> Result<()> {
    let start = Instant::now();
    let mut last = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        match recv_one(fd, Some(Duration::from_millis(20)))? {
            Recv::Vip(_) => last = Instant::now(),
            Recv::Other | Recv::Nothing => {}
        }
        if last.elapsed() >= Duration::from_millis(200) {
            return Ok(());
        }
    }
    bail!("backend 3 still receives VIP packets 5 s after its removal")
}
