//! Tiny XDP programs of the tests and benchmarks, written as raw eBPF instructions and loaded
//! with bpf(2) (no eBPF crate of their own): a small assembler with labels, per-CPU array maps,
//! program loading with the verifier's log on failure, and BPF_PROG_TEST_RUN (plain and in
//! live-frames mode). The raw bpf(2) calls of the test crate live here.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use anyhow::{Context, Result, bail};

// ---- instructions ----------------------------------------------------------------------------

/// eBPF registers.
pub const R0: u8 = 0;
pub const R1: u8 = 1;
pub const R2: u8 = 2;
pub const R3: u8 = 3;
pub const R4: u8 = 4;
pub const R5: u8 = 5;
pub const R6: u8 = 6;
pub const R7: u8 = 7;
pub const R8: u8 = 8;
pub const R9: u8 = 9;
pub const R10: u8 = 10;

/// Access sizes (the size bits of BPF_LDX/BPF_STX/BPF_ST).
#[derive(Clone, Copy)]
pub enum Size {
    W = 0x00,
    H = 0x08,
    B = 0x10,
    DW = 0x18,
}

/// ALU64 operations (the op bits).
#[derive(Clone, Copy)]
pub enum Alu {
    Add = 0x00,
    Or = 0x40,
    And = 0x50,
    Lsh = 0x60,
    Rsh = 0x70,
    Mod = 0x90,
    Xor = 0xa0,
    Mov = 0xb0,
}

/// Conditional jumps (the op bits of BPF_JMP).
#[derive(Clone, Copy)]
pub enum Cond {
    Eq = 0x10,
    Gt = 0x20,
    Ne = 0x50,
}

const BPF_LD: u8 = 0x00;
const BPF_LDX: u8 = 0x01;
const BPF_ST: u8 = 0x02;
const BPF_STX: u8 = 0x03;
const BPF_JMP: u8 = 0x05;
const BPF_ALU64: u8 = 0x07;
const BPF_K: u8 = 0x00;
const BPF_X: u8 = 0x08;
const BPF_MEM: u8 = 0x60;
const BPF_IMM: u8 = 0x00;
const BPF_CALL: u8 = 0x80;
const BPF_EXIT: u8 = 0x90;
const BPF_PSEUDO_MAP_FD: u8 = 1;
const HELPER_MAP_LOOKUP_ELEM: i32 = 1;

fn raw(op: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    op as u64
        | ((dst as u64 | (src as u64) << 4) << 8)
        | (off as u16 as u64) << 16
        | (imm as u32 as u64) << 32
}

/// A program under construction: instructions plus jumps to named labels, resolved by `finish`.
#[derive(Default)]
pub struct Asm {
    insns: Vec<u64>,
    /// (instruction index, label) of every jump to patch.
    jumps: Vec<(usize, &'static str)>,
    labels: Vec<(&'static str, usize)>,
}

impl Asm {
    pub fn new() -> Asm {
        Asm::default()
    }

    /// `dst op= imm`.
    pub fn alu_imm(&mut self, op: Alu, dst: u8, imm: i32) -> &mut Self {
        self.insns
            .push(raw(BPF_ALU64 | BPF_K | op as u8, dst, 0, 0, imm));
        self
    }

    /// `dst op= src`.
    pub fn alu_reg(&mut self, op: Alu, dst: u8, src: u8) -> &mut Self {
        self.insns
            .push(raw(BPF_ALU64 | BPF_X | op as u8, dst, src, 0, 0));
        self
    }

    /// `dst = imm` (64 bits, two instruction slots).
    pub fn ld_imm64(&mut self, dst: u8, imm: u64) -> &mut Self {
        self.insns.push(raw(
            BPF_LD | BPF_DW_BITS | BPF_IMM,
            dst,
            0,
            0,
            imm as u32 as i32,
        ));
        self.insns.push(raw(0, 0, 0, 0, (imm >> 32) as u32 as i32));
        self
    }

    /// `dst = the map with this fd` (a map pointer for helper calls).
    pub fn ld_map(&mut self, dst: u8, map: &OwnedFd) -> &mut Self {
        self.insns.push(raw(
            BPF_LD | BPF_DW_BITS | BPF_IMM,
            dst,
            BPF_PSEUDO_MAP_FD,
            0,
            map.as_raw_fd(),
        ));
        self.insns.push(0);
        self
    }

    /// `dst = *(size *)(src + off)`.
    pub fn ldx(&mut self, size: Size, dst: u8, src: u8, off: i16) -> &mut Self {
        self.insns
            .push(raw(BPF_LDX | BPF_MEM | size as u8, dst, src, off, 0));
        self
    }

    /// `*(size *)(dst + off) = src`.
    pub fn stx(&mut self, size: Size, dst: u8, off: i16, src: u8) -> &mut Self {
        self.insns
            .push(raw(BPF_STX | BPF_MEM | size as u8, dst, src, off, 0));
        self
    }

    /// `*(size *)(dst + off) = imm`.
    pub fn st(&mut self, size: Size, dst: u8, off: i16, imm: i32) -> &mut Self {
        self.insns
            .push(raw(BPF_ST | BPF_MEM | size as u8, dst, 0, off, imm));
        self
    }

    /// `if dst cond imm goto label`.
    pub fn jmp_imm(&mut self, cond: Cond, dst: u8, imm: i32, label: &'static str) -> &mut Self {
        self.jumps.push((self.insns.len(), label));
        self.insns
            .push(raw(BPF_JMP | BPF_K | cond as u8, dst, 0, 0, imm));
        self
    }

    /// `if dst cond src goto label`.
    pub fn jmp_reg(&mut self, cond: Cond, dst: u8, src: u8, label: &'static str) -> &mut Self {
        self.jumps.push((self.insns.len(), label));
        self.insns
            .push(raw(BPF_JMP | BPF_X | cond as u8, dst, src, 0, 0));
        self
    }

    /// `goto label`.
    pub fn ja(&mut self, label: &'static str) -> &mut Self {
        self.jumps.push((self.insns.len(), label));
        self.insns.push(raw(BPF_JMP, 0, 0, 0, 0));
        self
    }

    pub fn label(&mut self, name: &'static str) -> &mut Self {
        self.labels.push((name, self.insns.len()));
        self
    }

    /// `r0 = bpf_map_lookup_elem(r1, r2)`.
    pub fn call_map_lookup(&mut self) -> &mut Self {
        self.insns
            .push(raw(BPF_JMP | BPF_CALL, 0, 0, 0, HELPER_MAP_LOOKUP_ELEM));
        self
    }

    pub fn exit(&mut self) -> &mut Self {
        self.insns.push(raw(BPF_JMP | BPF_EXIT, 0, 0, 0, 0));
        self
    }

    /// `*(u64 *)lookup(map, &key)++` for a per-CPU array slot `key` held in register `key_reg`
    /// (clobbers r1–r5 and r0, uses the stack at r10-8); jumps to `missing` when the lookup
    /// fails.
    pub fn count_slot(&mut self, map: &OwnedFd, key_reg: u8, missing: &'static str) -> &mut Self {
        self.stx(Size::W, R10, -8, key_reg)
            .ld_map(R1, map)
            .alu_reg(Alu::Mov, R2, R10)
            .alu_imm(Alu::Add, R2, -8)
            .call_map_lookup()
            .jmp_imm(Cond::Eq, R0, 0, missing)
            .ldx(Size::DW, R1, R0, 0)
            .alu_imm(Alu::Add, R1, 1)
            .stx(Size::DW, R0, 0, R1)
    }

    /// The instructions, with every jump resolved.
    pub fn finish(&self) -> Result<Vec<u64>> {
        let mut insns = self.insns.clone();
        for &(at, label) in &self.jumps {
            let Some(&(_, target)) = self.labels.iter().find(|(l, _)| *l == label) else {
                bail!("jump to the unknown label {label}");
            };
            let off = target as i64 - at as i64 - 1;
            let off = i16::try_from(off).context("jump too far")?;
            insns[at] = (insns[at] & !(0xffff << 16)) | (off as u16 as u64) << 16;
        }
        Ok(insns)
    }
}

const BPF_DW_BITS: u8 = Size::DW as u8;

// ---- bpf(2) ------------------------------------------------------------------------------

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;

fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` points to a live, initialised `repr(C)` struct whose size is passed along;
    // the kernel reads (and for some commands writes) only within that size and treats the
    // missing tail of `union bpf_attr` as zero. Pointers inside the struct are set by callers to
    // buffers that outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn new_fd(rc: libc::c_long) -> io::Result<OwnedFd> {
    let fd = libc::c_int::try_from(rc)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bpf returned a huge fd"))?;
    // SAFETY: the kernel just created this fd for us and nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
}

#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    /// The rest of `union bpf_attr` (152 bytes in all), zero.
    _zero: [u32; 19],
}

/// `struct xdp_md`, the context of an XDP test run.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

fn name16(name: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    let n = name.len().min(15);
    out[..n].copy_from_slice(&name.as_bytes()[..n]);
    out
}

/// The number of possible CPUs (the kernel's per-CPU value count).
pub fn possible_cpus() -> Result<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .context("reading /sys/devices/system/cpu/possible")?;
    let mut n = 0;
    for part in text.trim().split(',') {
        n += match part.split_once('-') {
            Some((a, b)) => b.parse::<usize>()? - a.parse::<usize>()? + 1,
            None => 1,
        };
    }
    Ok(n)
}

/// A per-CPU array of u64 counters.
pub struct Counters {
    pub fd: OwnedFd,
    cpus: usize,
}

impl Counters {
    pub fn create(name: &str, entries: u32) -> Result<Counters> {
        let mut attr = MapCreateAttr {
            map_type: BPF_MAP_TYPE_PERCPU_ARRAY,
            key_size: 4,
            value_size: 8,
            max_entries: entries,
            map_name: name16(name),
            ..Default::default()
        };
        let fd = sys_bpf(BPF_MAP_CREATE, &mut attr)
            .and_then(new_fd)
            .with_context(|| format!("creating the per-CPU array {name}"))?;
        Ok(Counters {
            fd,
            cpus: possible_cpus()?,
        })
    }

    /// Slot `key`, one value per CPU.
    pub fn per_cpu(&self, key: u32) -> Result<Vec<u64>> {
        let mut values = vec![0u64; self.cpus];
        let mut attr = MapElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            key: &key as *const u32 as u64,
            value: values.as_mut_ptr() as u64,
            ..Default::default()
        };
        sys_bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).context("reading a per-CPU counter")?;
        Ok(values)
    }

    /// Sets slot `key` to `values` (one per CPU).
    pub fn set(&self, key: u32, values: &[u64]) -> Result<()> {
        if values.len() != self.cpus {
            bail!("{} values for {} CPUs", values.len(), self.cpus);
        }
        let mut attr = MapElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            key: &key as *const u32 as u64,
            value: values.as_ptr() as u64,
            ..Default::default()
        };
        sys_bpf(BPF_MAP_UPDATE_ELEM, &mut attr).context("writing a per-CPU counter")?;
        Ok(())
    }

    /// Slot `key`, summed over the CPUs.
    pub fn sum(&self, key: u32) -> Result<u64> {
        Ok(self.per_cpu(key)?.iter().sum())
    }
}

/// Loads `insns` as an XDP program named `name`; a rejection carries the verifier's log.
pub fn load_xdp(insns: &[u64], name: &str) -> Result<OwnedFd> {
    let license = c"GPL";
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name: name16(name),
        expected_attach_type: BPF_XDP,
        ..Default::default()
    };
    match sys_bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(rc) => Ok(new_fd(rc)?),
        Err(first) => {
            let mut log = vec![0u8; 1 << 20];
            attr.log_level = 1;
            attr.log_size = log.len() as u32;
            attr.log_buf = log.as_mut_ptr() as u64;
            let _ = sys_bpf(BPF_PROG_LOAD, &mut attr);
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            bail!(
                "loading the XDP program {name}: {first}\n{}",
                String::from_utf8_lossy(&log[..end])
            )
        }
    }
}

/// Runs XDP program `prog` `repeat` times in live-frames mode: every run starts from `frame`
/// as its page was left (the page pool recycles pages without copying `frame` in again), and an
/// XDP_TX transmits the frame out of interface `ifindex` of the calling thread's network
/// namespace. Returns when every frame is sent.
pub fn test_run_live(
    prog: &OwnedFd,
    frame: &[u8],
    ifindex: u32,
    repeat: u32,
    batch: u32,
) -> Result<()> {
    let ctx = XdpMd {
        data: 0,
        data_end: frame.len() as u32,
        ingress_ifindex: ifindex,
        ..Default::default()
    };
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: frame.len() as u32,
        data_in: frame.as_ptr() as u64,
        repeat,
        ctx_size_in: mem::size_of::<XdpMd>() as u32,
        ctx_in: &ctx as *const XdpMd as u64,
        flags: BPF_F_TEST_XDP_LIVE_FRAMES,
        batch_size: batch,
        ..Default::default()
    };
    sys_bpf(BPF_PROG_TEST_RUN, &mut attr).context("BPF_PROG_TEST_RUN with live frames")?;
    Ok(())
}

/// Pins the calling thread to CPU `cpu`.
pub fn pin_thread(cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data (all-zero is the empty set); CPU_SET writes inside it;
    // sched_setaffinity(0, ...) affects only the calling thread and reads the set we own.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("pinning to CPU {cpu}"));
    }
    Ok(())
}

/// Sets the calling thread's nice value (Linux: per thread), so other work on its CPU takes
/// less of it during a measurement.
pub fn nice_thread(nice: i32) -> Result<()> {
    // SAFETY: gettid has no preconditions; setpriority on our own thread id reads nothing.
    let rc = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, nice)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("setting nice {nice}"));
    }
    Ok(())
}

/// Pins the calling thread to one CPU until dropped, then gives it back the CPUs it had.
pub struct Pinned {
    before: libc::cpu_set_t,
}

impl Pinned {
    pub fn to(cpu: usize) -> Result<Pinned> {
        // SAFETY: cpu_set_t is plain data; sched_getaffinity(0, ...) fills the set we own for
        // the calling thread.
        let before = unsafe {
            let mut set: libc::cpu_set_t = mem::zeroed();
            if libc::sched_getaffinity(0, mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
                return Err(io::Error::last_os_error()).context("reading the CPU affinity");
            }
            set
        };
        pin_thread(cpu)?;
        Ok(Pinned { before })
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // SAFETY: restores the calling thread's affinity from the set saved in `to`.
        unsafe {
            libc::sched_setaffinity(0, mem::size_of::<libc::cpu_set_t>(), &self.before);
        }
    }
}

/// Runs XDP program `prog` once on `frame` (an ordinary test run, no live frames) and returns
/// its action and the frame it left.
/// Runs `prog` `repeat` times on `frame` in one BPF_PROG_TEST_RUN: the XDP action of the last
/// run and the kernel's mean duration per run in ns.
pub fn test_run(prog: BorrowedFd<'_>, frame: &[u8], repeat: u32) -> io::Result<(u32, u32)> {
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: frame.len() as u32,
        data_in: frame.as_ptr() as u64,
        repeat,
        ..Default::default()
    };
    sys_bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    Ok((attr.retval, attr.duration))
}

pub fn test_run_once(prog: &OwnedFd, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
    let mut out = vec![0u8; frame.len() + 256];
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: frame.len() as u32,
        data_in: frame.as_ptr() as u64,
        data_size_out: out.len() as u32,
        data_out: out.as_mut_ptr() as u64,
        repeat: 1,
        ..Default::default()
    };
    sys_bpf(BPF_PROG_TEST_RUN, &mut attr).context("BPF_PROG_TEST_RUN")?;
    out.truncate(attr.data_size_out as usize);
    Ok((attr.retval, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_run_attr_matches_the_kernel_layout() {
        // union bpf_attr's `test` struct (15 fields, 76 bytes), zeros to 152.
        assert_eq!(mem::size_of::<TestRunAttr>(), 152);
        let a = TestRunAttr::default();
        let base = &a as *const TestRunAttr as usize;
        assert_eq!(&a.data_in as *const u64 as usize - base, 16);
        assert_eq!(&a.ctx_in as *const u64 as usize - base, 48);
        assert_eq!(&a.batch_size as *const u32 as usize - base, 72);
    }
}
