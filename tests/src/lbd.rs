//! Driving lbd and lbctl as a user would: a config file in the topology's work folder, the
//! real binaries, lbd in the load balancer's network namespace (keeping the root's bpffs).

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::{ProcHandle, Topology, wait_until};

/// Where the binaries under test are: `LB_BIN_DIR` (set by `cargo xtask test`), else the
/// workspace's target/debug.
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("LB_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"));
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} does not exist: build it first (`cargo build --bins -p lb-userspace`, which `cargo xtask test` does)",
        path.display()
    );
    path
}

/// The paths a test's lbd uses: all inside the run's work folder, pins in a bpffs folder of
/// the run's own.
#[derive(Debug, Clone)]
pub struct LbdPaths {
    pub config: PathBuf,
    pub socket: PathBuf,
    pub bpffs_dir: PathBuf,
    pub state_dir: PathBuf,
    /// The LB's interfaces lbd attaches to (`Topology::lb_interfaces`).
    pub interfaces: Vec<String>,
}

impl LbdPaths {
    pub fn for_topology(t: &Topology) -> LbdPaths {
        LbdPaths {
            config: t.work_dir().join("lb.toml"),
            socket: t.work_dir().join("run/lbd.sock"),
            bpffs_dir: PathBuf::from(format!("/sys/fs/bpf/{}", t.prefix())),
            state_dir: t.work_dir().join("state"),
            interfaces: t.lb_interfaces(),
        }
    }

    /// The `[daemon]` table for these paths on the LB namespace's interfaces (eth0, and eth1
    /// with a backend side on a second interface), small tables (a 65,536-entry connection
    /// table, 16,384-flow NAT tables: tests run many lbds at once), plus `extra` lines.
    pub fn daemon_section(&self, extra: &str) -> String {
        let interfaces: Vec<String> = self.interfaces.iter().map(|i| format!("{i:?}")).collect();
        format!(
            "[daemon]\ninterfaces = [{}]\nsocket = \"{}\"\nbpffs_dir = \"{}\"\nstate_dir = \"{}\"\nconntrack_entries = 65536\nnat_entries = 16384\n{extra}\n",
            interfaces.join(", "),
            self.socket.display(),
            self.bpffs_dir.display(),
            self.state_dir.display()
        )
    }
}

/// How long an lbctl command may take before the harness gives up on lbd answering.
pub const LBCTL_DEADLINE: Duration = Duration::from_secs(30);

/// A running lbd.
pub struct Lbd<'t> {
    t: &'t Topology,
    pub paths: LbdPaths,
    pub handle: ProcHandle,
}

/// How long a test waits for an lbd it started to answer. A debug lbd's start is mostly the
/// kernel verifying the program (about 800,000 instructions: a few seconds alone, several
/// times that while other tests load theirs on this machine's two CPUs).
pub const LBD_START: Duration = Duration::from_secs(30);

/// Writes `config` and starts lbd on it in the LB namespace; returns once the control socket
/// is there (lbd's readiness signal). At teardown `lbd --cleanup` runs and the pins go.
pub fn start_lbd<'t>(t: &'t Topology, config: &str) -> Result<Lbd<'t>> {
    let paths = prepare_lbd(t, config)?;
    let lbd = spawn_lbd(t, &paths)?;
    lbd.wait_ready(LBD_START)?;
    Ok(lbd)
}

/// Writes `config` for the topology's lbd and registers the teardown cleanup of
/// [`start_lbd`] (`lbd --cleanup`, the pins removed), without starting anything.
pub fn prepare_lbd(t: &Topology, config: &str) -> Result<LbdPaths> {
    let paths = LbdPaths::for_topology(t);
    std::fs::write(&paths.config, config)
        .with_context(|| format!("writing {}", paths.config.display()))?;
    register_cleanup(t, &paths);
    Ok(paths)
}

/// Writes `config` at `paths.config` and registers the teardown cleanup of [`start_lbd`] for
/// those paths: for an lbd of its own in another namespace of the topology (one node of
/// several), started with [`spawn_lbd_in`].
pub fn prepare_lbd_at(t: &Topology, paths: &LbdPaths, config: &str) -> Result<()> {
    if let Some(dir) = paths.config.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&paths.config, config)
        .with_context(|| format!("writing {}", paths.config.display()))?;
    register_cleanup(t, paths);
    Ok(())
}

/// Runs `lbd --cleanup` on `paths`' config in the LB's namespace, as an operator takes lb out of
/// the path.
pub fn cleanup_lbd(t: &Topology, paths: &LbdPaths) -> Result<Output> {
    t.nsenter_output(
        t.lb_ns(),
        Command::new(bin("lbd"))
            .args(["--cleanup", "--config"])
            .arg(&paths.config),
    )
}

/// Has the topology's teardown run `lbd --cleanup` on `paths` and remove its pin folder, also
/// when a test fails.
pub fn register_cleanup(t: &Topology, paths: &LbdPaths) {
    let config = paths.config.clone();
    let bpffs_dir = paths.bpffs_dir.clone();
    t.on_teardown(move || {
        let _ = Command::new(bin("lbd"))
            .arg("--cleanup")
            .arg("--config")
            .arg(&config)
            .output();
        let _ = std::fs::remove_dir_all(&bpffs_dir);
    });
}

/// Starts (another) lbd on the config already written at `paths.config`, without waiting.
pub fn spawn_lbd<'t>(t: &'t Topology, paths: &LbdPaths) -> Result<Lbd<'t>> {
    spawn(t, t.lb_ns(), paths, &[], None)
}

/// Like [`spawn_lbd`], in network namespace `ns` of the topology instead of the LB's.
pub fn spawn_lbd_in<'t>(t: &'t Topology, ns: &str, paths: &LbdPaths) -> Result<Lbd<'t>> {
    spawn(t, ns, paths, &[], None)
}

/// Like [`spawn_lbd`], with `extra` arguments after `--config FILE`, and with lbd's soft limit
/// of open files set to `soft_nofile` first when given (`ulimit -Sn N`, as a shell or a
/// service manager would leave it).
pub fn spawn_lbd_with<'t>(
    t: &'t Topology,
    paths: &LbdPaths,
    extra: &[&str],
    soft_nofile: Option<u64>,
) -> Result<Lbd<'t>> {
    spawn(t, t.lb_ns(), paths, extra, soft_nofile)
}

fn spawn<'t>(
    t: &'t Topology,
    ns: &str,
    paths: &LbdPaths,
    extra: &[&str],
    soft_nofile: Option<u64>,
) -> Result<Lbd<'t>> {
    let mut cmd = match soft_nofile {
        Some(n) => {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(format!("ulimit -Sn {n} && exec \"$0\" \"$@\""))
                .arg(bin("lbd"));
            c
        }
        None => Command::new(bin("lbd")),
    };
    cmd.arg("--config").arg(&paths.config).args(extra);
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    let handle = t.spawn_nsenter(ns, &cmd)?;
    Ok(Lbd {
        t,
        paths: paths.clone(),
        handle,
    })
}

impl<'t> Lbd<'t> {
    /// The lbd of `t` running as `handle` on `paths` (one started earlier, e.g. kept by a
    /// structure that owns `t` and so cannot hold an `Lbd` itself).
    pub fn adopt(t: &'t Topology, paths: LbdPaths, handle: ProcHandle) -> Lbd<'t> {
        Lbd { t, paths, handle }
    }
}

impl Lbd<'_> {
    /// Waits for the control socket; fails at once (with lbd's log) if lbd exits first.
    pub fn wait_ready(&self, deadline: Duration) -> Result<()> {
        let mut exited = None;
        let ready = wait_until(deadline, "lbd's control socket", || {
            if let Ok(Some(st)) = self.t.try_wait(self.handle) {
                exited = Some(st);
                return true;
            }
            self.paths.socket.exists()
        });
        if let Some(st) = exited {
            bail!(
                "lbd exited ({st}) before it was ready; its log:\n{}",
                self.log()
            );
        }
        ready.with_context(|| format!("lbd's log:\n{}", self.log()))
    }

    pub fn log(&self) -> String {
        self.t.log_of(self.handle)
    }

    /// The last 30 lines of lbd's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Runs `lbctl ARGS`, which must succeed (else panics with lbctl's stderr and lbd's log);
    /// returns stdout.
    pub fn lbctl_ok(&self, args: &[&str]) -> String {
        let out = self.lbctl(args).expect("running lbctl");
        assert!(
            out.status.success(),
            "lbctl {args:?} failed ({}): {}\nlbd log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `lbctl --socket SOCKET ARGS...` (the socket is a file: any namespace reaches it);
    /// an error when lbctl has not exited within 30 s (lbd does not answer).
    pub fn lbctl(&self, args: &[&str]) -> Result<Output> {
        crate::netns::run_output_within(
            Command::new(bin("lbctl"))
                .arg("--socket")
                .arg(&self.paths.socket)
                .args(args),
            LBCTL_DEADLINE,
        )
        .with_context(|| format!("lbctl {args:?}; lbd's log:\n{}", self.log_tail()))
    }

    /// `lbctl --json ARGS...`, which must succeed, parsed.
    pub fn lbctl_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.lbctl(&all)?;
        if !out.status.success() {
            bail!(
                "lbctl {args:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "lbctl {args:?} printed no JSON: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// SIGTERM, then the exit status (lbd must exit within 5 s).
    pub fn stop(&self) -> Result<std::process::ExitStatus> {
        self.t.stop(self.handle, Duration::from_secs(5))
    }
}

impl Lbd<'_> {
    /// Waits until this very lbd answers on the control socket (`lbctl --json status` gives
    /// its pid) and returns that status. Unlike `wait_ready`, not fooled by the stale socket
    /// file a killed lbd leaves behind; fails at once (with lbd's log) if lbd exits first.
    pub fn wait_answering(&self, deadline: Duration) -> Result<serde_json::Value> {
        let pid = u64::from(self.handle.pid());
        crate::retry_until(deadline, "lbd to answer on its control socket", || {
            if let Ok(Some(st)) = self.t.try_wait(self.handle) {
                return Ok(Err(anyhow::anyhow!(
                    "lbd exited ({st}) before it answered; its log:\n{}",
                    self.log()
                )));
            }
            let status = self.lbctl_json(&["status"])?;
            if status["pid"].as_u64() != Some(pid) {
                bail!("another lbd answers: {status}");
            }
            Ok(Ok(status))
        })?
    }
}

impl Lbd<'_> {
    /// Waits up to `deadline` until `lbctl backend list SERVICE` shows `mac` for `address`.
    pub fn wait_backend_mac(
        &self,
        service: &str,
        address: &str,
        mac: &str,
        deadline: Duration,
    ) -> Result<()> {
        crate::retry_until(
            deadline,
            &format!("lbd to reach {address} at {mac}"),
            || {
                let list = self.lbctl_json(&["backend", "list", service])?;
                let shown = list
                    .as_array()
                    .and_then(|l| l.iter().find(|b| b["address"] == address))
                    .and_then(|b| b["mac"].as_str().map(str::to_owned));
                match shown.as_deref() {
                    Some(m) if m == mac => Ok(()),
                    other => bail!("backend list shows {other:?}"),
                }
            },
        )
    }
}

/// `lbd --check --config FILE` (touches nothing, needs no namespace): its output whatever the
/// exit status.
pub fn check_config(config: &Path) -> Result<Output> {
    Command::new(bin("lbd"))
        .arg("--check")
        .arg("--config")
        .arg(config)
        .output()
        .context("running lbd --check")
}

/// `lbctl --socket SOCKET ARGS...` for any socket, e.g. one that no lbd serves: its output
/// whatever the exit status.
pub fn lbctl_at(socket: &Path, args: &[&str]) -> Result<Output> {
    Command::new(bin("lbctl"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .context("running lbctl")
}

impl Lbd<'_> {
    /// Sends SIGHUP (re-read the config) and waits up to `deadline` for lbd to log the
    /// outcome: returns what lbd logged from the signal on, up to and including its
    /// `SIGHUP: ...` line(s). Fails if lbd exits.
    pub fn reload(&self, deadline: Duration) -> Result<String> {
        let from = self.log().len();
        self.t.signal(self.handle, libc::SIGHUP)?;
        let mut exited = None;
        let mut tail = String::new();
        let done = wait_until(deadline, "lbd to log the outcome of SIGHUP", || {
            if let Ok(Some(st)) = self.t.try_wait(self.handle) {
                exited = Some(st);
                return true;
            }
            let log = self.log();
            tail = log.get(from..).unwrap_or_default().to_string();
            // A record is written whole; wait for the end of its line.
            tail.contains("SIGHUP") && tail.ends_with('\n')
        });
        if let Some(st) = exited {
            bail!("lbd exited ({st}) after SIGHUP; its log:\n{}", self.log());
        }
        done.with_context(|| format!("lbd's log:\n{}", self.log()))?;
        Ok(tail)
    }
}

/// Like [`start_lbd`] (writes `config`, registers the same teardown cleanup), but starts lbd
/// with `env` added to its environment and does not wait for the control socket: for tests that
/// watch readiness another way, e.g. through `NOTIFY_SOCKET` as systemd does.
pub fn spawn_lbd_with_env<'t>(
    t: &'t Topology,
    config: &str,
    env: &[(&str, &std::ffi::OsStr)],
) -> Result<Lbd<'t>> {
    let paths = prepare_lbd(t, config)?;
    let mut cmd = Command::new(bin("lbd"));
    cmd.arg("--config").arg(&paths.config);
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let handle = t.spawn_nsenter(t.lb_ns(), &cmd)?;
    Ok(Lbd { t, paths, handle })
}

/// `lbd decap --interface eth0 --bpffs-dir DIR EXTRA…` in namespace `ns`, as run there.
pub fn lbd_decap(t: &Topology, ns: &str, dir: &Path, extra: &[&str]) -> Output {
    let mut cmd = Command::new(bin("lbd"));
    cmd.args(["decap", "--interface", "eth0", "--bpffs-dir"])
        .arg(dir)
        .args(extra);
    t.nsenter_output(ns, &cmd).expect("running lbd decap")
}

/// The pin folder of backend `i`'s `lbd decap`, removed at teardown (removing the link pin
/// detaches the program; the namespace goes right after).
pub fn decap_dir(t: &Topology, i: usize) -> PathBuf {
    let dir = PathBuf::from(format!("/sys/fs/bpf/{}-decap-b{i}", t.prefix()));
    let d = dir.clone();
    t.on_teardown(move || {
        let _ = std::fs::remove_dir_all(&d);
    });
    dir
}

/// Backend `i` strips lb's tunnel with `lbd decap`, allowing tunnel packets from `allow`
/// (the LB's tunnel sources); panics with lbd's output when that fails.
pub fn decapsulate_on(t: &Topology, i: usize, allow: &[std::net::IpAddr]) {
    let mut args = vec![];
    for a in allow {
        args.push("--allow".to_string());
        args.push(format!("{a}/{}", if a.is_ipv4() { 32 } else { 128 }));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = lbd_decap(t, t.backend_ns(i), &decap_dir(t, i), &args);
    assert!(
        out.status.success(),
        "lbd decap on backend {i}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
