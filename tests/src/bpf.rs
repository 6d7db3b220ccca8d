//! The tests' and benchmarks' own XDP programs, loaded with aya: lb-ebpf's `lb-testgen` object
//! (lb-ebpf/src/testgen.rs: `generator`, `sink`, `floor`, `pass`, `dsr`, `toy`), embedded by this
//! crate's build script from lb-userspace's build (which builds every program of lb-ebpf).

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, PerCpuValues},
    programs::{TestRun as _, TestRunAttrs, TestRunOptions, Xdp, XdpMode, xdp::XdpLink},
};

/// The object (empty when built with AYA_BUILD_SKIP=1: loading then fails with a clear message).
static TESTGEN_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("LB_TESTGEN_OBJECT"));

/// One program of the object, loaded (not attached), with the object's maps.
pub struct TestProg {
    ebpf: Ebpf,
    name: &'static str,
}

impl TestProg {
    /// Loads program `name` of the object, with `globals` (name, bytes) set first.
    pub fn load(name: &'static str, globals: &[(&'static str, &[u8])]) -> Result<TestProg> {
        if TESTGEN_OBJECT.is_empty() {
            bail!(
                "the tests' XDP object is empty (built with AYA_BUILD_SKIP?): rebuild without it"
            );
        }
        let mut loader = EbpfLoader::new();
        for &(global, bytes) in globals {
            loader.override_global(global, bytes, true);
        }
        let mut ebpf = loader
            .load(TESTGEN_OBJECT)
            .with_context(|| format!("loading the tests' XDP object for {name}"))?;
        let prog: &mut Xdp = ebpf
            .program_mut(name)
            .with_context(|| format!("no program {name} in the tests' XDP object"))?
            .try_into()
            .with_context(|| format!("{name} is not an XDP program"))?;
        prog.load()
            .with_context(|| format!("loading the XDP program {name}"))?;
        Ok(TestProg { ebpf, name })
    }

    /// Swaps this program into the XDP link pinned at `pin` (lb's, in the benchmarks that
    /// alternate programs on one interface): its id.
    pub fn replace_in_link(&mut self, pin: &std::path::Path) -> Result<u32> {
        let name = self.name;
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("no program {name}"))?
            .try_into()
            .with_context(|| format!("{name} is not an XDP program"))?;
        lb_userspace::datapath::link::replace(prog, pin)
            .map_err(|e| anyhow::anyhow!("swapping {name} into {}: {e}", pin.display()))?;
        self.id()
    }

    /// `pass`: XDP_PASS and nothing else.
    pub fn pass() -> Result<TestProg> {
        TestProg::load("pass", &[])
    }

    /// `dsr`: frames to `vip` go back out with destination MAC `dst` and source MAC `src`.
    pub fn dsr(vip: IpAddr, dst: [u8; 6], src: [u8; 6]) -> Result<TestProg> {
        let (addr, family) = match vip {
            IpAddr::V4(a) => {
                let mut v = [0u8; 16];
                v[..4].copy_from_slice(&a.octets());
                (v, 4u32)
            }
            IpAddr::V6(a) => (a.octets(), 6),
        };
        TestProg::load(
            "dsr",
            &[
                ("FWD_VIP", &addr),
                ("FWD_FAMILY", &family.to_ne_bytes()),
                ("FWD_DST_MAC", &dst),
                ("FWD_SRC_MAC", &src),
            ],
        )
    }

    /// `toy`, the stateless toy balancer: TCP and UDP to `vip` go to one of `macs` (1 to 4) by
    /// a jhash of addresses and ports (seed `seed`), with source MAC `src`.
    pub fn toy(vip: Ipv4Addr, macs: &[[u8; 6]], src: [u8; 6], seed: u32) -> Result<TestProg> {
        if macs.is_empty() || macs.len() > 4 {
            bail!("the toy balancer takes 1 to 4 backends, not {}", macs.len());
        }
        let mut all = [0u8; 24];
        for (i, m) in macs.iter().enumerate() {
            all[i * 6..i * 6 + 6].copy_from_slice(m);
        }
        let mut prog = TestProg::load(
            "toy",
            &[
                ("TOY_MACS", &all),
                ("TOY_SRC_MAC", &src),
                ("TOY_SEED", &seed.to_ne_bytes()),
            ],
        )?;
        let m = prog
            .ebpf
            .map_mut("TOY_SERVICES")
            .context("no map TOY_SERVICES in the tests' XDP object")?;
        let mut services = HashMap::<_, u32, u32>::try_from(m)?;
        // The key is the address as the packet holds it (network order), read as a u32.
        services
            .insert(u32::from_ne_bytes(vip.octets()), macs.len() as u32, 0)
            .context("adding the toy balancer's service")?;
        Ok(prog)
    }

    fn xdp(&self) -> &Xdp {
        self.ebpf
            .program(self.name)
            .and_then(|p| <&Xdp>::try_from(p).ok())
            .expect("checked at load")
    }

    /// Attaches the program to interface `ifindex` of the calling thread's network namespace
    /// (the kernel's default mode: driver mode on veth) through a bpf_link; dropping the
    /// returned link detaches it, whether or not this `TestProg` is still there.
    pub fn attach(&mut self, ifindex: u32) -> Result<XdpLink> {
        let name = self.name;
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .and_then(|p| p.try_into().ok())
            .expect("checked at load");
        let id = prog
            .attach_to_if_index(ifindex, XdpMode::Default)
            .with_context(|| format!("attaching {name} to interface {ifindex}"))?;
        Ok(prog.take_link(id)?)
    }

    /// The program's id (for bpf_stats and `bpftool`).
    pub fn id(&self) -> Result<u32> {
        Ok(self.xdp().info()?.id())
    }

    /// The object's per-CPU array `map` (`SENT` or `SINK`).
    fn counters(&self, map: &str) -> Result<PerCpuArray<&MapData, u64>> {
        let m = self
            .ebpf
            .map(map)
            .with_context(|| format!("no map {map} in the tests' XDP object"))?;
        Ok(PerCpuArray::try_from(m)?)
    }

    /// The number of slots of per-CPU array `map`.
    pub fn slots(&self, map: &str) -> Result<u32> {
        Ok(self.counters(map)?.len())
    }

    /// Slot `key` of per-CPU array `map`, one value per possible CPU.
    pub fn per_cpu(&self, map: &str, key: u32) -> Result<Vec<u64>> {
        Ok(self
            .counters(map)?
            .get(&key, 0)
            .with_context(|| format!("reading slot {key} of {map}"))?
            .to_vec())
    }

    /// Slot `key` of per-CPU array `map`, summed over the CPUs.
    pub fn sum(&self, map: &str, key: u32) -> Result<u64> {
        Ok(self.per_cpu(map, key)?.iter().sum())
    }

    /// Sets slot `key` of per-CPU array `map` to `values` (one per possible CPU).
    pub fn set_per_cpu(&mut self, map: &str, key: u32, values: &[u64]) -> Result<()> {
        let m = self
            .ebpf
            .map_mut(map)
            .with_context(|| format!("no map {map} in the tests' XDP object"))?;
        let mut array = PerCpuArray::<_, u64>::try_from(m)?;
        let values = PerCpuValues::try_from(values.to_vec())
            .with_context(|| format!("{} values for slot {key} of {map}", values.len()))?;
        array
            .set(key, values, 0)
            .with_context(|| format!("writing slot {key} of {map}"))
    }

    /// Runs the program `repeat` times on `frame` in one BPF_PROG_TEST_RUN: the action of the
    /// last run and the kernel's mean duration per run.
    pub fn test_run(&self, frame: &[u8], repeat: u32) -> Result<(u32, Duration)> {
        let r = self
            .xdp()
            .test_run(TestRunOptions {
                data_in: Some(frame),
                repeat,
                ..Default::default()
            })
            .with_context(|| format!("BPF_PROG_TEST_RUN of {}", self.name))?;
        Ok((r.return_value, r.duration))
    }

    /// Runs the program once on `frame`: its action and the frame it left.
    pub fn test_run_once(&self, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        let mut out = vec![0u8; frame.len() + 256];
        let r = self
            .xdp()
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .with_context(|| format!("BPF_PROG_TEST_RUN of {}", self.name))?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value, out))
    }

    /// Runs the program `repeat` times in live-frames mode, `batch` frames at a time: every run
    /// starts from `frame` as its page was left (the page pool recycles pages without copying
    /// `frame` in again), and an XDP_TX transmits the frame out of interface `ifindex` of the
    /// calling thread's network namespace. Returns when every frame is sent.
    pub fn test_run_live(&self, frame: &[u8], ifindex: u32, repeat: u32, batch: u32) -> Result<()> {
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex (u32 each).
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
        ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
        self.xdp()
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ctx_in: Some(&ctx),
                repeat,
                attrs: TestRunAttrs::new().xdp_live_frames(batch),
                ..Default::default()
            })
            .with_context(|| format!("BPF_PROG_TEST_RUN of {} with live frames", self.name))?;
        Ok(())
    }
}
