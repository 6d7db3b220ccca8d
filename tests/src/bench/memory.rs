//! Benchmark part `memory`: what lb costs in memory.
//!
//! - Kernel memory of the maps at lbd's default sizes (connection table 1,048,576 entries): the
//!   program is loaded by lbd's own datapath code (`Datapath::open`) into a pin folder of its own,
//!   and bpftool's `bytes_memlock` (`bpftool map show -j`: what the kernel charges for each map)
//!   is reported for every map the program uses, plus one Maglev table as lbd makes it for each
//!   service (65,537 slots), and the totals.
//! - lbd's resident set (VmRSS of /proc/PID/status): the real lbd started in a network namespace
//!   of a small topology (one service, three backends, default connection table), read once it
//!   answers on its control socket; each repetition starts it afresh (`lbd --cleanup` between).
//!   Once, after `lbctl backend add` of 1,000 more backends, read again.
//!
//! lbd is not on the packet path (XDP forwards without it), so traffic does not change its
//! memory: no figure under load.

use std::{
    io::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use aya::{
    maps::{Array, IterableMap as _, MapData},
    programs::loaded_programs,
};
use lb_userspace::datapath::{self, Datapath};

use super::{Figure, Opts, thousands};
use crate::{ProcHandle, Topology, TopologyOptions, dpfixture, lbd::LbdPaths, retry_until};

const SECTION_MAPS: &str = "memory: maps (kernel memory, bpftool memlock)";
const SECTION_RSS: &str = "memory: lbd resident set";

/// lbd's default `conntrack_entries`.
const CONNTRACK_ENTRIES: u32 = 1_048_576;
/// lbd's Maglev table size (per service).
const TABLE: u32 = 65_537;
const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const SEED_HEX: &str = "5f0c1d2e3f4051627384950a1b2c3d4e";
/// Backends added with lbctl for the second RSS figure (fewer with --quick).
const ADDED: usize = 1_000;
const ADDED_QUICK: usize = 200;

pub fn run(opts: &Opts) -> Result<Vec<Figure>> {
    crate::require_root();
    let mut figures = maps().context("map memory")?;
    figures.extend(lbd_rss(opts).context("lbd's resident set")?);
    Ok(figures)
}

fn mib(bytes: u64) -> String {
    if bytes >= 1_048_576 {
        format!("{:.1} MiB", bytes as f64 / 1_048_576.0)
    } else {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    }
}

/// Removes a pin folder when dropped.
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = datapath::cleanup(&self.0);
    }
}

/// One map as bpftool shows it.
#[derive(Debug)]
struct MapRow {
    id: u64,
    name: String,
    kind: String,
    key: u64,
    value: u64,
    max_entries: u64,
    memlock: u64,
}

/// Every map, from `bpftool map show -j`.
fn bpftool_maps() -> Result<Vec<MapRow>> {
    let out = Command::new("bpftool")
        .args(["map", "show", "-j"])
        .output()
        .context("running bpftool map show")?;
    ensure!(
        out.status.success(),
        "bpftool map show failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> =
        serde_json::from_slice(&out.stdout).context("parsing bpftool's JSON")?;
    rows.iter()
        .map(|r| {
            let n = |k: &str| {
                r[k].as_u64()
                    .ok_or_else(|| anyhow!("map without `{k}`: {r}"))
            };
            Ok(MapRow {
                id: n("id")?,
                name: r["name"].as_str().unwrap_or("").to_string(),
                kind: r["type"].as_str().unwrap_or("?").to_string(),
                key: n("bytes_key")?,
                value: n("bytes_value")?,
                max_entries: n("max_entries")?,
                memlock: n("bytes_memlock")?,
            })
        })
        .collect()
}

fn maps() -> Result<Vec<Figure>> {
    let dir = dpfixture::pin_dir("bench-mem");
    let _pins = Pins(dir.clone());
    let dp = Datapath::open(&dir, CONNTRACK_ENTRIES, &[])?;
    let info = loaded_programs()
        .filter_map(|p| p.ok())
        .find(|p| p.id() == dp.program_id())
        .context("the loaded program is not listed")?;
    let ids = info
        .map_ids()
        .context("reading the program's map ids")?
        .context("this kernel does not list a program's maps")?;
    // One Maglev table, made as lbd makes one for each service (Datapath::swap_table).
    let table = Array::<MapData, u64>::create(
        2 * lb_common::slotstate::half_words(TABLE),
        lb_common::table_flags(TABLE),
    )
    .context("creating a Maglev table")?;
    let table_id = table.map().info()?.id() as u64;
    let all = bpftool_maps()?;
    let mut rows: Vec<&MapRow> = ids
        .iter()
        .map(|id| {
            all.iter()
                .find(|r| r.id == *id as u64)
                .ok_or_else(|| anyhow!("map {id} of the program is not in bpftool's list"))
        })
        .collect::<Result<_>>()?;
    rows.sort_by(|a, b| b.memlock.cmp(&a.memlock).then(a.name.cmp(&b.name)));
    let table_row = all
        .iter()
        .find(|r| r.id == table_id)
        .context("the Maglev table is not in bpftool's list")?;
    drop(table);

    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut figures = vec![];
    for r in &rows {
        let percpu = if r.kind.contains("percpu") {
            format!("; per-CPU: one value per possible CPU ({cpus} CPUs here)")
        } else {
            String::new()
        };
        figures.push(Figure::value(
            SECTION_MAPS,
            &format!(
                "map {}",
                if r.name.is_empty() {
                    "(unnamed)"
                } else {
                    &r.name
                }
            ),
            "bytes",
            r.memlock as f64,
            &format!(
                "{}, {} entries × ({} B key + {} B value) = {} ({}){percpu}",
                r.kind,
                thousands(r.max_entries),
                r.key,
                r.value,
                mib(r.memlock),
                if r.name.starts_with("CONNTRACK") {
                    format!(
                        "lbd's default conntrack_entries: {} sets of {} flows, 16 B each",
                        thousands(r.max_entries),
                        lb_common::FLOW_WAYS
                    )
                } else {
                    "fixed size".to_string()
                }
            ),
        ));
    }
    let total: u64 = rows.iter().map(|r| r.memlock).sum();
    figures.push(Figure::value(
        SECTION_MAPS,
        "all maps of the program, no service",
        "bytes",
        total as f64,
        &format!(
            "{} maps, {} in all (bytes_memlock; the kernel's accounting of each map's memory, deterministic for a given size)",
            rows.len(),
            mib(total)
        ),
    ));
    figures.push(Figure::value(
        SECTION_MAPS,
        "Maglev table, per service",
        "bytes",
        table_row.memlock as f64,
        &format!(
            "{}, {} elements × {} B values = {}: the inner map lbd makes for each service of the default 65,537 slots, its hot and side halves, four 16-bit slots to an element; 256 services (the most) would take {}",
            table_row.kind,
            thousands(table_row.max_entries),
            table_row.value,
            mib(table_row.memlock),
            mib(256 * table_row.memlock)
        ),
    ));
    figures.push(Figure::value(
        SECTION_MAPS,
        "all maps with one service",
        "bytes",
        (total + table_row.memlock) as f64,
        &mib(total + table_row.memlock),
    ));
    Ok(figures)
}

// ---- lbd ----

/// VmRSS, RssAnon and RssFile of a process, in bytes.
#[derive(Debug, Clone, Copy)]
struct Rss {
    total: u64,
    anon: u64,
    file: u64,
}

fn rss(pid: u32) -> Result<Rss> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kb = |key: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|k| k * 1024)
            .ok_or_else(|| anyhow!("no {key} in /proc/{pid}/status"))
    };
    Ok(Rss {
        total: kb("VmRSS:")?,
        anon: kb("RssAnon:")?,
        file: kb("RssFile:")?,
    })
}

fn config(paths: &LbdPaths) -> String {
    let mut c = format!(
        "[daemon]\ninterfaces = [\"eth0\"]\nsocket = \"{}\"\nbpffs_dir = \"{}\"\nstate_dir = \"{}\"\nconntrack_entries = {CONNTRACK_ENTRIES}\nhash_seed = \"{SEED_HEX}\"\n\n[[service]]\nname = \"web\"\nvip = \"{VIP}\"\nport = 80\nprotocol = \"tcp\"\n",
        paths.socket.display(),
        paths.bpffs_dir.display(),
        paths.state_dir.display()
    );
    for i in 1..=3 {
        c.push_str(&format!(
            "\n[[service.backend]]\naddress = \"192.0.2.{}\"\n",
            10 + i
        ));
    }
    c
}

/// Address of the `i`-th added backend: 10.98.0.0/16, on the LB's link.
fn added(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 98, 0, 10)) + i as u32)
}

struct Lbd<'t> {
    t: &'t Topology,
    handle: ProcHandle,
    lbctl: PathBuf,
    socket: PathBuf,
}

impl Lbd<'_> {
    fn lbctl(&self, args: &[&str]) -> Result<std::process::Output> {
        Command::new(&self.lbctl)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .context("running lbctl")
    }

    fn lbctl_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.lbctl(&all)?;
        ensure!(
            out.status.success(),
            "lbctl {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).with_context(|| format!("lbctl {args:?}: no JSON"))
    }
}

/// Starts lbd (from `bin_dir`) on the config at `paths.config` in the LB namespace and waits
/// until this very process answers `lbctl status`.
fn start<'t>(t: &'t Topology, bin_dir: &Path, paths: &LbdPaths) -> Result<Lbd<'t>> {
    let _ = std::fs::remove_file(&paths.socket);
    let mut cmd = Command::new(bin_dir.join("lbd"));
    cmd.arg("--config").arg(&paths.config);
    cmd.env("RUST_LOG", "warn");
    let handle = t.spawn_nsenter(t.lb_ns(), &cmd)?;
    let lbd = Lbd {
        t,
        handle,
        lbctl: bin_dir.join("lbctl"),
        socket: paths.socket.clone(),
    };
    let pid = u64::from(handle.pid());
    retry_until(Duration::from_secs(15), "lbd to answer", || {
        if let Ok(Some(st)) = t.try_wait(handle) {
            return Ok(Err(anyhow!(
                "lbd exited ({st}); its log:\n{}",
                t.log_of(handle)
            )));
        }
        if !paths.socket.exists() {
            bail!("no socket yet");
        }
        let status = lbd.lbctl_json(&["status"])?;
        ensure!(
            status["pid"].as_u64() == Some(pid),
            "another lbd answers: {status}"
        );
        Ok(Ok(()))
    })??;
    // The pid must be lbd itself (nsenter execs it), not a wrapper.
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", handle.pid())).unwrap_or_default();
    ensure!(
        comm.trim() == "lbd",
        "pid {} is `{}`, not lbd",
        handle.pid(),
        comm.trim()
    );
    Ok(lbd)
}

/// `lbd --cleanup`: detaches and unpins, so the next start loads afresh.
fn cleanup(bin_dir: &Path, paths: &LbdPaths) {
    let _ = Command::new(bin_dir.join("lbd"))
        .arg("--cleanup")
        .arg("--config")
        .arg(&paths.config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn lbd_rss(opts: &Opts) -> Result<Vec<Figure>> {
    let bin_dir = opts.bin_dir.clone();
    for b in ["lbd", "lbctl"] {
        ensure!(
            bin_dir.join(b).exists(),
            "{} does not exist: build it first",
            bin_dir.join(b).display()
        );
    }
    let t = Topology::new(TopologyOptions {
        backends: 3,
        clients: 0,
        addresses_per_client: 0,
        vips: vec![VIP.into()],
        start_servers: false,
        ..Default::default()
    })
    .context("building the namespace topology")?;
    let paths = LbdPaths::for_topology(&t);
    let original = config(&paths);
    std::fs::write(&paths.config, &original)
        .with_context(|| format!("writing {}", paths.config.display()))?;
    {
        let (bin_dir, paths) = (bin_dir.clone(), paths.clone());
        t.on_teardown(move || {
            cleanup(&bin_dir, &paths);
            let _ = std::fs::remove_dir_all(&paths.bpffs_dir);
        });
    }
    // The added backends' link: an address in 10.98.0.0/16 and a permanent neighbour entry
    // each, so lbd resolves them at once (nothing is sent to them).
    let mut batch = String::from("addr add 10.98.0.1/16 dev eth0\n");
    for i in 0..ADDED {
        let a = added(i);
        let o = a.octets();
        batch.push_str(&format!(
            "neigh replace {a} lladdr 02:98:00:00:{:02x}:{:02x} dev eth0 nud permanent\n",
            o[2], o[3]
        ));
    }
    let mut ip = Command::new("ip")
        .args(["-n", t.lb_ns(), "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running ip -batch")?;
    ip.stdin
        .take()
        .expect("piped")
        .write_all(batch.as_bytes())
        .context("writing to ip -batch")?;
    let out = ip.wait_with_output()?;
    ensure!(
        out.status.success(),
        "ip -batch failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let reps = opts.repetitions.max(1);
    let adds = if opts.quick { ADDED_QUICK } else { ADDED };
    let mut idle: Vec<Rss> = vec![];
    let mut grown: Option<(Rss, Vec<Duration>)> = None;
    for rep in 0..reps {
        std::fs::write(&paths.config, &original)?;
        let lbd = start(&t, &bin_dir, &paths)?;
        // Let the start settle (health, first neighbour refresh): readings a moment apart.
        std::thread::sleep(Duration::from_millis(500));
        idle.push(rss(lbd.handle.pid())?);
        if rep == 0 {
            let mut took = vec![];
            for i in 0..adds {
                let a = added(i).to_string();
                let began = Instant::now();
                let out = lbd.lbctl(&["backend", "add", "web", &a])?;
                took.push(began.elapsed());
                ensure!(
                    out.status.success(),
                    "lbctl backend add web {a} failed ({}): {}\nlbd's log:\n{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr),
                    t.log_of(lbd.handle)
                );
            }
            let list = lbd.lbctl_json(&["backend", "list", "web"])?;
            let (n, resolved) = count_backends(&list);
            ensure!(
                n == adds + 3 && resolved == n,
                "lbctl backend list shows {n} backends ({resolved} resolved), expected {}",
                adds + 3
            );
            std::thread::sleep(Duration::from_millis(500));
            grown = Some((rss(lbd.handle.pid())?, took));
        }
        let pid = lbd.handle.pid();
        let st = lbd.t.stop(lbd.handle, Duration::from_secs(5))?;
        ensure!(st.success(), "lbd (pid {pid}) exited with {st}");
        cleanup(&bin_dir, &paths);
    }

    let mut figures = vec![];
    let median_of = |v: &[Rss], f: fn(&Rss) -> u64| -> f64 {
        Figure::from_samples("", "", "", v.iter().map(|r| f(r) as f64).collect(), "").median
    };
    figures.push(Figure::from_samples(
        SECTION_RSS,
        "lbd idle: one service, 3 backends",
        "bytes",
        idle.iter().map(|r| r.total as f64).collect(),
        &format!(
            "VmRSS 0.5 s after lbd answered `lbctl status`, a fresh start each time (lbd --cleanup between), release build; of it anonymous {} and file-backed {} (medians). The file-backed part includes lbd's read-only mapping of the connection table ({} entries, {}): kernel memory, counted once among the maps above, mapped so the flows are counted by a scan of it without syscalls",
            mib(median_of(&idle, |r| r.anon) as u64),
            mib(median_of(&idle, |r| r.file) as u64),
            thousands(CONNTRACK_ENTRIES as u64),
            mib(CONNTRACK_ENTRIES as u64 * 16)
        ),
    ));
    if let Some((r, took)) = grown {
        let ms = |d: &[Duration]| {
            d.iter().map(Duration::as_secs_f64).sum::<f64>() * 1000.0 / d.len().max(1) as f64
        };
        let tenth = (took.len() / 10).max(1);
        let total: f64 = took.iter().map(Duration::as_secs_f64).sum();
        figures.push(Figure::value(
            SECTION_RSS,
            &format!("lbd after `lbctl backend add` of {} backends", thousands(adds as u64)),
            "bytes",
            r.total as f64,
            &format!(
                "one run (the first repetition), 0.5 s after the last add: {} backends in the service, every one resolved (lbctl backend list); anonymous {} and file-backed {}, {} over that run's idle reading; the adds took {:.1} s, {:.1} ms each on average (lbctl's process start included): {:.1} ms for the first {tenth}, {:.1} ms for the last {tenth}",
                adds + 3,
                mib(r.anon),
                mib(r.file),
                mib(r.total.saturating_sub(idle[0].total)),
                total,
                total * 1000.0 / took.len().max(1) as f64,
                ms(&took[..tenth]),
                ms(&took[took.len() - tenth..]),
            ),
        ));
    }
    Ok(figures)
}

/// (backends, of which resolved) in `lbctl --json backend list web`'s answer.
fn count_backends(v: &serde_json::Value) -> (usize, usize) {
    let list = v.as_array().map(Vec::as_slice).unwrap_or_default();
    let resolved = list.iter().filter(|b| b["mac"].is_string()).count();
    (list.len(), resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn added_backends_stay_in_their_block() {
        const { assert!(ADDED_QUICK <= ADDED) };
        assert_eq!(added(0), Ipv4Addr::new(10, 98, 0, 10));
        assert_eq!(added(ADDED - 1), Ipv4Addr::new(10, 98, 3, 241));
        assert_eq!(thousands(1_048_576), "1,048,576");
    }
}
