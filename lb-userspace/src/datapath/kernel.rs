//! What the running kernel must offer lb, probed for real before lbd (or `lbd decap`) touches
//! anything: each map type, map flag, helper and attach type the programs use is tried with a
//! tiny object of its own (a one-entry map, a two-instruction program), never by the version
//! number alone, since distributions backport features and configurations leave them out. A
//! missing feature makes one error that lists everything missing and the oldest kernel that
//! has it all ([`MINIMUM`]). `lbd --check` does not come here: it reads only the file.
//!
//! Where each minimum comes from (kernel release that added it):
//! - the balancer: XDP programs (4.8), hash and array maps (3.19), per-CPU arrays (4.6), LRU
//!   hash (4.10: `FRAGS`), array of maps (4.12: `MAGLEV`), devmap hash (5.4: `DEVMAP`),
//!   `BPF_F_MMAPABLE` arrays (5.5: `CONNTRACK`, `SERVICE_INDEX`, `VIP_FILTER`, the Maglev
//!   tables, read and written by lbd through their memory), the BPF ring buffer (5.8:
//!   `SYNC_EVENTS`), XDP through a bpf_link (5.9: pinned links that outlive lbd, swapped with
//!   BPF_LINK_UPDATE), `BPF_F_INNER_MAP` (5.10: Maglev tables of different sizes in one
//!   array of maps), and helpers `bpf_xdp_adjust_head` (4.10), `bpf_redirect_map` (4.14),
//!   `bpf_xdp_adjust_tail` (4.18), `bpf_jiffies64` (5.5), `bpf_ringbuf_reserve`/`submit` (5.8);
//! - map memory charged to the memory cgroup instead of RLIMIT_MEMLOCK (5.11): before it, a
//!   1,048,576-entry connection table (16 MiB) is refused under the usual 8 MiB limit. On an
//!   older kernel an unlimited RLIMIT_MEMLOCK does as well (lbd raises its soft limit to the
//!   hard one when that is unlimited);
//! - global functions with pointer arguments (5.12): `nat`'s steps are global functions, which
//!   the verifier checks once, on their own (probed by loading lb-ebpf's `lb-probe`).
//!
//! Kernel BTF (/sys/kernel/btf/vmlinux) is not needed (the programs use no CO-RE), nor is
//! BPF_PROG_TEST_RUN (only the tests run programs that way).

use std::io;

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
};

use super::sys;

/// The oldest kernel that has every feature lb uses, (major, minor).
pub const MINIMUM: (u32, u32) = (5, 12);

/// Which program's needs to check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Needs {
    /// lbd itself: the balancer.
    Daemon,
    /// `lbd decap`: the backends' decapsulation program.
    Decap,
}

/// How one feature is probed.
#[derive(Clone, Copy, Debug)]
enum Probe {
    Program(ProgramType),
    Map(MapType),
    /// A helper called from an XDP program.
    Helper(BpfHelper),
    /// A BPF_F_MMAPABLE array, mapped read-only.
    MmapableArray,
    /// An array of maps whose template has BPF_F_INNER_MAP, given an inner map of another size.
    InnerMapSizes,
    /// BPF_LINK_CREATE knows BPF_XDP.
    XdpLink,
    /// Map memory not limited by RLIMIT_MEMLOCK.
    MemcgAccounting,
    /// A global function with a pointer argument, verified on its own (lb-ebpf's `lb-probe`).
    GlobalFunctionPointers,
}

/// One thing the kernel must offer: what it is, the release that added it, how to probe it.
#[derive(Clone, Copy, Debug)]
struct Feature {
    what: &'static str,
    since: (u32, u32),
    probe: Probe,
}

const fn feature(what: &'static str, since: (u32, u32), probe: Probe) -> Feature {
    Feature { what, since, probe }
}

const XDP: Feature = feature("XDP programs", (4, 8), Probe::Program(ProgramType::Xdp));
const XDP_LINK: Feature = feature(
    "XDP attached through a bpf_link (BPF_LINK_CREATE with BPF_XDP)",
    (5, 9),
    Probe::XdpLink,
);
const HASH: Feature = feature("hash maps", (3, 19), Probe::Map(MapType::Hash));
const PERCPU_ARRAY: Feature = feature(
    "per-CPU array maps",
    (4, 6),
    Probe::Map(MapType::PerCpuArray),
);
const LOOKUP: Feature = feature(
    "helper bpf_map_lookup_elem from XDP",
    (4, 8),
    Probe::Helper(BpfHelper::BPF_FUNC_map_lookup_elem),
);
const ADJUST_HEAD: Feature = feature(
    "helper bpf_xdp_adjust_head",
    (4, 10),
    Probe::Helper(BpfHelper::BPF_FUNC_xdp_adjust_head),
);
const MEMCG: Feature = feature(
    "map memory charged to the memory cgroup, not RLIMIT_MEMLOCK (or run lbd with an \
     unlimited RLIMIT_MEMLOCK: LimitMEMLOCK=infinity)",
    (5, 11),
    Probe::MemcgAccounting,
);

/// What the balancer uses, oldest first.
const DAEMON: &[Feature] = &[
    HASH,
    feature("array maps", (3, 19), Probe::Map(MapType::Array)),
    PERCPU_ARRAY,
    XDP,
    LOOKUP,
    feature(
        "helper bpf_csum_diff from XDP",
        (4, 8),
        Probe::Helper(BpfHelper::BPF_FUNC_csum_diff),
    ),
    feature(
        "helper bpf_ktime_get_ns from XDP",
        (4, 8),
        Probe::Helper(BpfHelper::BPF_FUNC_ktime_get_ns),
    ),
    feature(
        "helper bpf_map_update_elem from XDP",
        (4, 8),
        Probe::Helper(BpfHelper::BPF_FUNC_map_update_elem),
    ),
    feature("LRU hash maps", (4, 10), Probe::Map(MapType::LruHash)),
    ADJUST_HEAD,
    feature("arrays of maps", (4, 12), Probe::Map(MapType::ArrayOfMaps)),
    feature(
        "helper bpf_redirect_map",
        (4, 14),
        Probe::Helper(BpfHelper::BPF_FUNC_redirect_map),
    ),
    feature(
        "helper bpf_xdp_adjust_tail",
        (4, 18),
        Probe::Helper(BpfHelper::BPF_FUNC_xdp_adjust_tail),
    ),
    feature(
        "device maps by hash (BPF_MAP_TYPE_DEVMAP_HASH)",
        (5, 4),
        Probe::Map(MapType::DevMapHash),
    ),
    feature(
        "memory-mapped arrays (BPF_F_MMAPABLE)",
        (5, 5),
        Probe::MmapableArray,
    ),
    feature(
        "helper bpf_jiffies64",
        (5, 5),
        Probe::Helper(BpfHelper::BPF_FUNC_jiffies64),
    ),
    feature("BPF ring buffers", (5, 8), Probe::Map(MapType::RingBuf)),
    feature(
        "helper bpf_ringbuf_reserve from XDP",
        (5, 8),
        Probe::Helper(BpfHelper::BPF_FUNC_ringbuf_reserve),
    ),
    feature(
        "helper bpf_ringbuf_submit from XDP",
        (5, 8),
        Probe::Helper(BpfHelper::BPF_FUNC_ringbuf_submit),
    ),
    XDP_LINK,
    feature(
        "inner maps of different sizes in one array of maps (BPF_F_INNER_MAP)",
        (5, 10),
        Probe::InnerMapSizes,
    ),
    MEMCG,
    feature(
        "global BPF functions with pointer arguments (nat forwarding's steps)",
        (5, 12),
        Probe::GlobalFunctionPointers,
    ),
];

/// What `lbd decap` uses, oldest first.
const DECAP: &[Feature] = &[
    HASH,
    PERCPU_ARRAY,
    XDP,
    LOOKUP,
    ADJUST_HEAD,
    feature(
        "longest-prefix-match tries (BPF_MAP_TYPE_LPM_TRIE)",
        (4, 11),
        Probe::Map(MapType::LpmTrie),
    ),
    XDP_LINK,
    MEMCG,
];

fn features(needs: Needs) -> &'static [Feature] {
    match needs {
        Needs::Daemon => DAEMON,
        Needs::Decap => DECAP,
    }
}

/// A feature the kernel lacks, and the probe's own error when it failed unexpectedly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub what: &'static str,
    pub since: (u32, u32),
    pub error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// Features are missing: every one of them, and the kernel that has them all.
    #[error("{}", missing_message(.release, .missing))]
    Missing {
        release: String,
        missing: Vec<Missing>,
    },
    /// bpf(2) refused this process: a permission problem, not a missing feature.
    #[error(
        "cannot probe the kernel's BPF features: {what}: {cause}. lbd needs root, or the \
         capabilities CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (as packaging/lbd.service gives \
         them); check also kernel.unprivileged_bpf_disabled and any seccomp filter"
    )]
    NotPermitted { what: String, cause: String },
}

fn version(v: (u32, u32)) -> String {
    format!("Linux {}.{}", v.0, v.1)
}

/// The message of [`KernelError::Missing`]: one line, then one per missing feature.
fn missing_message(release: &str, missing: &[Missing]) -> String {
    let mut text = format!(
        "this kernel ({release}) lacks {} that lb needs; lb needs {} or later with BPF and XDP \
         enabled:",
        if missing.len() == 1 {
            "a feature".to_owned()
        } else {
            format!("{} features", missing.len())
        },
        version(MINIMUM)
    );
    for m in missing {
        text.push_str(&format!("\n  - {} (since {})", m.what, version(m.since)));
        if let Some(error) = &m.error {
            text.push_str(&format!(": the probe failed: {error}"));
        }
    }
    text
}

/// The (major, minor) of a release string such as "6.1.0-28-amd64" or "5.15.0-91-generic".
pub fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(['.', '-', '+', '_']);
    let major = parts.next()?.parse().ok()?;
    let minor: String = parts
        .next()?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    Some((major, minor.parse().ok()?))
}

/// What the check found when nothing is missing.
#[derive(Debug)]
pub struct Checked {
    /// `uname -r`.
    pub release: String,
    /// Everything is there, but the release is older than [`MINIMUM`] (a backporting
    /// distribution): worth a warning, not a refusal.
    pub older_than_minimum: bool,
    /// lbd raised its RLIMIT_MEMLOCK soft limit to the unlimited hard one (a kernel that still
    /// charges maps to it).
    pub raised_memlock: bool,
}

/// Probes every feature `needs` uses; an error lists all that are missing.
pub fn check(needs: Needs) -> Result<Checked, KernelError> {
    let release = sys::kernel_release().unwrap_or_else(|e| format!("unknown release: {e}"));
    // bpf(2) at all, and whether this process may use it: without that no probe means
    // anything.
    match sys::map_create(BPF_MAP_TYPE_ARRAY, 4, 8, 1, 0, None) {
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
            return Err(KernelError::Missing {
                release,
                missing: vec![Missing {
                    what: "the bpf(2) system call (CONFIG_BPF_SYSCALL)",
                    since: (3, 18),
                    error: None,
                }],
            });
        }
        Err(cause) => {
            return Err(KernelError::NotPermitted {
                what: "creating a one-entry test map".to_owned(),
                cause: cause.to_string(),
            });
        }
    }
    let mut missing = vec![];
    let mut raised_memlock = false;
    for f in features(needs) {
        let found = match f.probe {
            Probe::MemcgAccounting => memcg_accounting().map(|(ok, raised)| {
                raised_memlock = raised;
                ok
            }),
            other => probe(other),
        };
        match found {
            Ok(true) => {}
            Ok(false) => missing.push(Missing {
                what: f.what,
                since: f.since,
                error: None,
            }),
            // Refused for want of a privilege: no answer about the feature.
            Err(e) if e.denied => {
                return Err(KernelError::NotPermitted {
                    what: format!("probing {}", f.what),
                    cause: e.text,
                });
            }
            Err(e) => missing.push(Missing {
                what: f.what,
                since: f.since,
                error: Some(e.text),
            }),
        }
    }
    if !missing.is_empty() {
        return Err(KernelError::Missing { release, missing });
    }
    let older_than_minimum = parse_release(&release).is_some_and(|v| v < MINIMUM);
    Ok(Checked {
        release,
        older_than_minimum,
        raised_memlock,
    })
}

/// [`check`], then logs what it found (a warning for a release older than [`MINIMUM`] that
/// has everything, as a backporting distribution's may).
pub fn check_and_log(needs: Needs) -> Result<(), KernelError> {
    let start = std::time::Instant::now();
    let checked = check(needs)?;
    let took = start.elapsed().as_millis();
    let minimum = version(MINIMUM);
    if checked.older_than_minimum {
        log::warn!(
            "kernel {} is older than {minimum}, the oldest lb is meant for, but has every feature lb probes for: going on (probed in {took} ms)",
            checked.release
        );
    } else {
        log::info!(
            "kernel {}: every BPF and XDP feature lb uses is there (probed in {took} ms)",
            checked.release
        );
    }
    if checked.raised_memlock {
        log::info!(
            "this kernel charges BPF maps to RLIMIT_MEMLOCK: raised its soft limit to the unlimited hard one"
        );
    }
    Ok(())
}

const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;
const BPF_F_MMAPABLE: u32 = lb_common::BPF_F_MMAPABLE;
const BPF_F_INNER_MAP: u32 = lb_common::BPF_F_INNER_MAP;
/// `enum bpf_attach_type`'s BPF_XDP.
const BPF_XDP: u32 = 37;

/// A probe that got no answer: its error with every cause, and whether the kernel refused it
/// for want of a privilege (EPERM, EACCES) rather than for want of the feature.
#[derive(Debug, PartialEq, Eq)]
struct Failed {
    text: String,
    denied: bool,
}

fn failed(what: &str, e: &(dyn std::error::Error + 'static)) -> Failed {
    let mut parts = vec![];
    if !what.is_empty() {
        parts.push(what.to_owned());
    }
    let mut denied = false;
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<io::Error>() {
            denied |= matches!(io.raw_os_error(), Some(libc::EPERM | libc::EACCES));
        }
        parts.push(c.to_string());
        cause = c.source();
    }
    Failed {
        text: parts.join(": "),
        denied,
    }
}

/// Runs one probe: Ok(false) when the feature is absent, Err with the probe's error when the
/// answer was unexpected.
fn probe(p: Probe) -> Result<bool, Failed> {
    use std::os::fd::AsFd as _;
    match p {
        Probe::Program(t) => is_program_supported(t).map_err(|e| failed("", &e)),
        Probe::Map(t) => is_map_supported(t).map_err(|e| failed("", &e)),
        Probe::Helper(h) => is_helper_supported(ProgramType::Xdp, h).map_err(|e| failed("", &e)),
        Probe::MmapableArray => {
            // An unknown flag is EINVAL on a kernel without it.
            let map = match sys::map_create(BPF_MAP_TYPE_ARRAY, 4, 8, 1, BPF_F_MMAPABLE, None) {
                Ok(map) => map,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(false),
                Err(e) => return Err(failed("creating a BPF_F_MMAPABLE array", &e)),
            };
            sys::mmap_read_only(map.as_fd())
                .map(|()| true)
                .map_err(|e| failed("mapping a BPF_F_MMAPABLE array", &e))
        }
        Probe::InnerMapSizes => {
            // As lbd uses it: the template holds one entry, the table put in holds two.
            let flags = BPF_F_INNER_MAP | BPF_F_MMAPABLE;
            let template = match sys::map_create(BPF_MAP_TYPE_ARRAY, 4, 8, 1, flags, None) {
                Ok(map) => map,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(false),
                Err(e) => return Err(failed("creating an inner map template", &e)),
            };
            let outer = sys::map_create(
                BPF_MAP_TYPE_ARRAY_OF_MAPS,
                4,
                4,
                1,
                0,
                Some(template.as_fd()),
            )
            .map_err(|e| failed("creating an array of maps", &e))?;
            let table = sys::map_create(BPF_MAP_TYPE_ARRAY, 4, 8, 2, flags, None)
                .map_err(|e| failed("creating an inner map", &e))?;
            let fd = std::os::fd::AsRawFd::as_raw_fd(&table) as u32;
            match sys::map_update(outer.as_fd(), &0u32.to_ne_bytes(), &fd.to_ne_bytes()) {
                Ok(()) => Ok(true),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
                Err(e) => Err(failed("putting an inner map of another size", &e)),
            }
        }
        Probe::XdpLink => {
            // Before 5.7 the command is unknown (EINVAL). From 5.7 to 5.9 link_create() maps
            // the attach type to a program type first and refuses an unknown one (EINVAL: 5.7
            // and 5.8 have no BPF_XDP), then looks the program up and finds none (EBADF: 5.9).
            // From 5.10 it looks the program up first (EBADF), and every such kernel has XDP
            // links. Nothing is attached either way.
            let e = sys::link_create_without_program(BPF_XDP);
            match e.raw_os_error() {
                Some(libc::EBADF) => Ok(true),
                Some(libc::EINVAL) => Ok(false),
                _ => Err(failed("BPF_LINK_CREATE", &e)),
            }
        }
        Probe::MemcgAccounting => memcg_accounting().map(|(ok, _)| ok),
        Probe::GlobalFunctionPointers => global_function_pointers(),
    }
}

/// lb-ebpf's probe program, built by build.rs like the balancer.
static PROBE_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-probe"));

/// Whether the kernel verifies a global function with a pointer argument on its own: loads
/// `lb_probe` (never attached). A refusal by the verifier means no; one for want of privilege
/// is the probe's error.
fn global_function_pointers() -> Result<bool, Failed> {
    let mut ebpf =
        aya::Ebpf::load(PROBE_OBJECT).map_err(|e| failed("opening the probe program", &e))?;
    let program: &mut aya::programs::Xdp = ebpf
        .program_mut("lb_probe")
        .ok_or_else(|| Failed {
            text: "lb_probe missing from the probe object".into(),
            denied: false,
        })?
        .try_into()
        .map_err(|e| failed("the probe program", &e))?;
    match program.load() {
        Ok(()) => Ok(true),
        Err(aya::programs::ProgramError::LoadError { io_error, .. })
            if !matches!(io_error.raw_os_error(), Some(libc::EPERM | libc::EACCES)) =>
        {
            Ok(false)
        }
        Err(e) => Err(failed("loading the probe program", &e)),
    }
}

/// Whether maps can be made whatever RLIMIT_MEMLOCK says: a one-entry array made with the soft
/// limit at 0 is refused (EPERM) only by a kernel that charges maps to that limit (before
/// 5.11). On such a kernel, an unlimited hard limit is as good: the soft one is raised to it
/// (the second value says so).
fn memcg_accounting() -> Result<(bool, bool), Failed> {
    let (soft, hard) = sys::memlock_limit().map_err(|e| failed("getrlimit", &e))?;
    if soft == libc::RLIM_INFINITY {
        return Ok((true, false));
    }
    sys::set_memlock_soft_limit(0).map_err(|e| failed("setrlimit", &e))?;
    let made = sys::map_create(BPF_MAP_TYPE_ARRAY, 4, 8, 1, 0, None);
    sys::set_memlock_soft_limit(soft).map_err(|e| failed("setrlimit", &e))?;
    match made {
        Ok(_) => Ok((true, false)),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            if hard == libc::RLIM_INFINITY {
                sys::set_memlock_soft_limit(libc::RLIM_INFINITY)
                    .map_err(|e| failed("setrlimit", &e))?;
                Ok((true, true))
            } else {
                Ok((false, false))
            }
        }
        Err(e) => Err(failed("creating a map under RLIMIT_MEMLOCK 0", &e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_lists_every_missing_feature_and_the_minimum() {
        let e = KernelError::Missing {
            release: "5.4.0-150-generic".to_owned(),
            missing: vec![
                Missing {
                    what: "BPF ring buffers",
                    since: (5, 8),
                    error: None,
                },
                Missing {
                    what: "XDP attached through a bpf_link (BPF_LINK_CREATE with BPF_XDP)",
                    since: (5, 9),
                    error: Some("BPF_LINK_CREATE: Operation not supported (os error 95)".into()),
                },
            ],
        };
        assert_eq!(
            e.to_string(),
            "this kernel (5.4.0-150-generic) lacks 2 features that lb needs; lb needs Linux 5.12 \
             or later with BPF and XDP enabled:\n\
             \x20 - BPF ring buffers (since Linux 5.8)\n\
             \x20 - XDP attached through a bpf_link (BPF_LINK_CREATE with BPF_XDP) (since Linux \
             5.9): the probe failed: BPF_LINK_CREATE: Operation not supported (os error 95)"
        );
        let one = KernelError::Missing {
            release: "5.10.0-30-amd64".to_owned(),
            missing: vec![Missing {
                what: MEMCG.what,
                since: MEMCG.since,
                error: None,
            }],
        };
        let text = one.to_string();
        assert!(
            text.starts_with("this kernel (5.10.0-30-amd64) lacks a feature that lb needs;"),
            "{text}"
        );
        assert!(
            text.contains("LimitMEMLOCK=infinity) (since Linux 5.11)"),
            "{text}"
        );
    }

    #[test]
    fn releases_parse_to_major_and_minor() {
        assert_eq!(parse_release("6.18.0"), Some((6, 18)));
        assert_eq!(parse_release("6.1.0-28-amd64"), Some((6, 1)));
        assert_eq!(parse_release("5.15.0-91-generic"), Some((5, 15)));
        assert_eq!(parse_release("4.18.0-553.el8_10.x86_64"), Some((4, 18)));
        assert_eq!(parse_release("5.10rc1"), Some((5, 10)));
        assert_eq!(parse_release("6"), None);
        assert_eq!(parse_release("unknown release: x"), None);
    }

    /// The minimum is the newest feature's release, and the lists are in that order.
    #[test]
    fn the_minimum_is_the_newest_feature() {
        // `lbd decap` uses a subset: lb's minimum is the balancer's.
        assert_eq!(DAEMON.iter().map(|f| f.since).max(), Some(MINIMUM));
        assert!(DECAP.iter().all(|f| f.since <= MINIMUM));
        for list in [DAEMON, DECAP] {
            assert!(list.windows(2).all(|w| w[0].since <= w[1].since));
        }
    }

    /// The RLIMIT_MEMLOCK probe with a small finite limit (the usual case under systemd): this
    /// kernel charges maps to the memory cgroup, so it passes and leaves the limit as it was.
    #[test]
    fn memlock_probe_restores_the_limit() {
        let (soft, hard) = sys::memlock_limit().unwrap();
        sys::set_memlock_soft_limit(64 * 1024).unwrap();
        let found = memcg_accounting();
        let after = sys::memlock_limit().unwrap();
        sys::set_memlock_soft_limit(soft).unwrap();
        assert_eq!(found, Ok((true, false)));
        assert_eq!(after, (64 * 1024, hard));
    }

    /// A probe refused for want of a privilege is told apart from a missing feature, through
    /// the error's causes, and its message keeps every cause.
    #[test]
    fn a_refusal_is_not_a_missing_feature() {
        #[derive(Debug, thiserror::Error)]
        #[error("`bpf_prog_load` failed")]
        struct Wrapped(#[source] io::Error);
        let denied = failed("", &Wrapped(io::Error::from_raw_os_error(libc::EPERM)));
        assert!(denied.denied);
        assert_eq!(
            denied.text,
            "`bpf_prog_load` failed: Operation not permitted (os error 1)"
        );
        let other = failed("x", &io::Error::from_raw_os_error(libc::EINVAL));
        assert_eq!(
            other,
            Failed {
                text: "x: Invalid argument (os error 22)".to_owned(),
                denied: false
            }
        );
        let e = KernelError::NotPermitted {
            what: "probing XDP programs".to_owned(),
            cause: denied.text,
        };
        assert!(
            e.to_string().starts_with(
                "cannot probe the kernel's BPF features: probing XDP programs: `bpf_prog_load` \
                 failed: Operation not permitted (os error 1). lbd needs root, or the \
                 capabilities CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN"
            ),
            "{e}"
        );
    }

    /// A probe can say no: a helper XDP programs may not call.
    #[test]
    fn a_helper_xdp_may_not_call_is_reported_missing() {
        assert_eq!(
            probe(Probe::Helper(BpfHelper::BPF_FUNC_override_return)),
            Ok(false)
        );
    }

    /// This machine's kernel (6.18, root) has everything: every probe answers yes, none fails.
    #[test]
    fn this_kernel_has_every_feature() {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "probing BPF features needs root: run the tests as root (cargo xtask test)"
        );
        for needs in [Needs::Daemon, Needs::Decap] {
            let checked = check(needs).unwrap_or_else(|e| panic!("{needs:?}: {e}"));
            assert!(!checked.older_than_minimum, "{checked:?}");
        }
        // And each probe answers yes alone (not only as part of the list).
        for f in DAEMON {
            assert_eq!(probe(f.probe), Ok(true), "{}", f.what);
        }
    }
}
