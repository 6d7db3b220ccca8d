//! `cargo xtask setup`: installs what a fresh machine of this kind (Debian 12, rustup with
//! stable and nightly) lacks. Each step checks first and installs only what is missing, so a
//! machine that has everything costs a few seconds.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::cmd;
use crate::workspace;

/// A Debian package and why lb needs it.
struct AptPackage {
    name: &'static str,
    why: &'static str,
}

const BPF_LINKER_NEEDS: &str = "to build bpf-linker against LLVM 22";

const APT_PACKAGES: &[AptPackage] = &[
    AptPackage {
        name: "nftables",
        why: "`nft`: counters in the backends proving a denied client's packets never arrive \
              (filters_lbd test), and the kernel-balancer baseline of the benchmark",
    },
    AptPackage {
        name: "llvm-22-dev",
        why: BPF_LINKER_NEEDS,
    },
    AptPackage {
        name: "libpolly-22-dev",
        why: BPF_LINKER_NEEDS,
    },
    AptPackage {
        name: "libzstd-dev",
        why: BPF_LINKER_NEEDS,
    },
    AptPackage {
        name: "zlib1g-dev",
        why: BPF_LINKER_NEEDS,
    },
    AptPackage {
        name: "iproute2",
        why: "`ip`: network namespaces, veths and addresses for the tests and the demo",
    },
    AptPackage {
        name: "nginx-light",
        why: "the HTTP backends of the tests and the demo",
    },
    AptPackage {
        name: "curl",
        why: "the HTTP client of the tests and the demo",
    },
    AptPackage {
        name: "ethtool",
        why: "turns veth checksum offload off in the test harness",
    },
    AptPackage {
        name: "bpftool",
        why: "inspects the loaded XDP program and its maps",
    },
    AptPackage {
        name: "iputils-ping",
        why: "`ping` for reachability checks in the tests",
    },
    AptPackage {
        name: "tcpdump",
        why: "packet captures when a test needs debugging",
    },
    AptPackage {
        name: "bird2",
        why: "BGP with BFD between the multi-node tests' router and lb nodes (`bird`, `birdc`)",
    },
    AptPackage {
        name: "keepalived",
        why: "VRRP between two lb nodes holding a VIP in the multi-node tests",
    },
    AptPackage {
        name: "dpkg-dev",
        why: "dpkg-shlibdeps: the Debian package's library dependencies (cargo xtask package)",
    },
    AptPackage {
        name: "man-db",
        why: "`man`: the package test finds the installed man pages as systemd-analyze does",
    },
    AptPackage {
        name: "postgresql-15",
        why: "the `pgsql` health checks' tests, and the hosting-stack test's primary and streaming replicas, and `pgbench`",
    },
    AptPackage {
        name: "redis-server",
        why: "the `redis` health checks' tests, and the hosting-stack test's Redis",
    },
    AptPackage {
        name: "redis-tools",
        why: "`redis-benchmark` and `redis-cli` in the hosting-stack test",
    },
    AptPackage {
        name: "dnsmasq-base",
        why: "the DNS servers of the `dns` and `udp` health checks' tests and of the hosting-stack test",
    },
    AptPackage {
        name: "bind9-dnsutils",
        why: "`dig`: the health check tests wait until dnsmasq answers; the hosting-stack test asks through lb",
    },
    AptPackage {
        name: "openssl",
        why: "the test CA and certificate of the `https` health check tests",
    },
    AptPackage {
        name: "gunicorn",
        why: "the hosting-stack test's application servers",
    },
    AptPackage {
        name: "python3-flask",
        why: "the hosting-stack test's small web application",
    },
    AptPackage {
        name: "python3-psycopg2",
        why: "the hosting-stack test's application reads PostgreSQL with it",
    },
];

/// Daemons some packages above install as services (package, unit): the tests run their own
/// copies inside namespaces, so the host's must neither run nor start at boot. Right after
/// installing such a package, setup disables its unit (and stops it if systemd runs); a
/// package that was already installed is left as its owner configured it.
const HOST_SERVICES_OFF: &[(&str, &str)] = &[
    ("bird2", "bird"),
    ("keepalived", "keepalived"),
    ("nginx-light", "nginx"),
    ("haproxy", "haproxy"),
    ("postgresql-15", "postgresql"),
    ("redis-server", "redis-server"),
];

const LLVM_DIR: &str = "/usr/lib/llvm-22";
const BPFFS_DIR: &str = "/sys/fs/bpf";
const POLICY_RC: &str = "/usr/sbin/policy-rc.d";
const POLICY_RC_TEXT: &[u8] =
    b"#!/bin/sh\n# cargo xtask setup: start no service while it installs packages\nexit 101\n";

/// What one step did.
enum Outcome {
    Present,
    Installed(String),
    /// Left undone, with the reason; not an error.
    Skipped(String),
}

/// What only `cargo xtask bench` needs: the peers lb is measured against and the load tools.
const BENCH_PACKAGES: &[AptPackage] = &[
    AptPackage {
        name: "haproxy",
        why: "the HAProxy (mode tcp, balance source) baseline of the benchmark",
    },
    AptPackage {
        name: "wrk",
        why: "the HTTP load generator of the benchmark",
    },
];

pub fn run() -> Result<()> {
    run_with(&[])
}

/// Setup, plus the benchmark's packages.
pub fn run_for_bench() -> Result<()> {
    run_with(BENCH_PACKAGES)
}

fn run_with(extra: &'static [AptPackage]) -> Result<()> {
    let start = Instant::now();
    let outcomes = [
        ensure_apt_packages(APT_PACKAGES)?,
        ensure_apt_packages(extra)?,
        ensure_rust_src()?,
        ensure_bpf_linker()?,
        ensure_bpffs()?,
    ];
    let mut done = Vec::new();
    for outcome in outcomes {
        match outcome {
            Outcome::Present => {}
            Outcome::Installed(what) => done.push(what),
            Outcome::Skipped(why) => println!("setup: note: {why}"),
        }
    }
    let elapsed = cmd::secs(start.elapsed());
    if done.is_empty() {
        println!("setup: all present ({elapsed})");
    } else {
        println!("setup: {} ({elapsed})", done.join("; "));
    }
    Ok(())
}

fn need_root(to: &str) -> Result<()> {
    if cmd::is_root() {
        return Ok(());
    }
    bail!("setup needs root to {to}: run `cargo xtask setup` as root (e.g. with sudo)")
}

// ---- apt packages ----

fn ensure_apt_packages(packages: &'static [AptPackage]) -> Result<Outcome> {
    let missing = missing_apt_packages(packages)?;
    if missing.is_empty() {
        return Ok(Outcome::Present);
    }
    for package in &missing {
        println!("setup: missing {}: {}", package.name, package.why);
    }
    let names: Vec<&str> = missing.iter().map(|package| package.name).collect();
    need_root(&format!("install the apt packages {}", names.join(", ")))?;
    println!("setup: installing {}", names.join(" "));
    apt_install(&names)?;
    for (package, unit) in HOST_SERVICES_OFF {
        if names.contains(package) {
            quiet_service(unit)?;
        }
    }
    let still_missing = missing_apt_packages(packages)?;
    if !still_missing.is_empty() {
        let names: Vec<&str> = still_missing.iter().map(|package| package.name).collect();
        bail!(
            "apt-get install finished but these are still not installed: {}",
            names.join(", ")
        );
    }
    Ok(Outcome::Installed(format!(
        "installed apt packages {}",
        names.join(" ")
    )))
}

fn missing_apt_packages(packages: &'static [AptPackage]) -> Result<Vec<&'static AptPackage>> {
    let mut missing = Vec::new();
    for package in packages {
        if !dpkg_installed(package.name)? {
            missing.push(package);
        }
    }
    Ok(missing)
}

/// Whether dpkg has the package fully installed (not merely unpacked or half-configured).
fn dpkg_installed(package: &str) -> Result<bool> {
    let mut query = Command::new("dpkg-query");
    query.args(["-W", "-f=${Status}", package]);
    let output = cmd::capture(&mut query).context("setup expects a Debian machine (dpkg)")?;
    // dpkg-query exits 1 for a package it has never heard of.
    Ok(output.status.success() && output.stdout == b"install ok installed")
}

fn apt_install(names: &[&str]) -> Result<()> {
    // Installing a service (nginx) tries to start it; with no init system that fails and
    // would leave the package half-configured. A policy-rc.d that says "no" prevents it.
    let _no_service_starts = PolicyRcGuard::install(Path::new(POLICY_RC))?;
    // A half-finished earlier install makes apt-get refuse to work until this runs.
    run_apt(Command::new("dpkg").args(["--configure", "-a"]))?;
    run_apt(Command::new("apt-get").args(["-o", "DPkg::Lock::Timeout=300", "update"]))?;
    run_apt(
        Command::new("apt-get")
            .args(["-o", "DPkg::Lock::Timeout=300", "install", "-y"])
            .arg("--no-install-recommends")
            .args(names),
    )
}

/// Keeps the host's copy of service `unit` from running now or at boot: the policy-rc.d kept
/// the install from starting it, but Debian's maintainer scripts still enable it (a systemd
/// unit link, or sysv rc links).
fn quiet_service(unit: &str) -> Result<()> {
    let systemd_unit = ["/lib/systemd/system", "/usr/lib/systemd/system"]
        .iter()
        .any(|dir| Path::new(dir).join(format!("{unit}.service")).exists());
    let systemd_running = Path::new("/run/systemd/system").exists();
    if systemd_unit {
        // `systemctl disable` works without a running systemd (it edits links only).
        let mut disable = Command::new("systemctl");
        disable.args(["disable", "--quiet"]);
        if systemd_running {
            disable.arg("--now");
        }
        cmd::run(disable.arg(format!("{unit}.service")))?;
    }
    if Path::new("/etc/init.d").join(unit).exists() {
        if !systemd_running {
            // No systemd: the sysv script is what would start it. Stopping a daemon that is
            // not running fails harmlessly; the install itself started nothing.
            let _ = cmd::capture(Command::new("/etc/init.d/".to_owned() + unit).arg("stop"));
        }
        cmd::run(Command::new("update-rc.d").args([unit, "disable"]))?;
    }
    println!("setup: disabled the host's {unit} service (the tests run their own)");
    Ok(())
}

fn run_apt(command: &mut Command) -> Result<()> {
    command.env("DEBIAN_FRONTEND", "noninteractive");
    cmd::run(command)
}

/// Writes /usr/sbin/policy-rc.d (exit 101: start no service) for as long as it lives,
/// unless the file already exists, which it then leaves as it was.
struct PolicyRcGuard {
    path: PathBuf,
    created: bool,
}

impl PolicyRcGuard {
    fn install(path: &Path) -> Result<Self> {
        let path = path.to_path_buf();
        if fs::symlink_metadata(&path).is_ok() {
            // One of ours that an interrupted run left behind is removed this time.
            let created = fs::read(&path).is_ok_and(|text| text == POLICY_RC_TEXT);
            return Ok(Self { path, created });
        }
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o755)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        file.write_all(POLICY_RC_TEXT)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(Self {
            path,
            created: true,
        })
    }
}

impl Drop for PolicyRcGuard {
    fn drop(&mut self) {
        if self.created {
            if let Err(error) = fs::remove_file(&self.path) {
                let path = self.path.display();
                eprintln!("setup: warning: cannot remove {path}: {error}");
            }
        }
    }
}

// ---- Rust: nightly and rust-src ----

fn ensure_rust_src() -> Result<Outcome> {
    ensure_nightly()?;
    let installed = rustup(&["component", "list", "--toolchain", "nightly", "--installed"])?;
    if has_rust_src(&installed) {
        return Ok(Outcome::Present);
    }
    println!(
        "setup: installing rust-src for nightly: the eBPF program is built with -Z build-std=core"
    );
    cmd::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))?;
    Ok(Outcome::Installed("installed rust-src (nightly)".into()))
}

fn ensure_nightly() -> Result<()> {
    let toolchains = rustup(&["toolchain", "list"])?;
    if toolchains.lines().any(is_plain_nightly) {
        return Ok(());
    }
    bail!(
        "the Rust nightly toolchain is missing (`rustup toolchain list` shows none): the eBPF \
         program needs it (-Z build-std). Install it with \
         `rustup toolchain install nightly --component rust-src`"
    )
}

fn rustup(args: &[&str]) -> Result<String> {
    cmd::stdout_of(Command::new("rustup").args(args))
        .context("setup needs rustup, with the stable and nightly toolchains")
}

/// Whether a line of `rustup toolchain list` is the undated `nightly` (what `+nightly` means).
fn is_plain_nightly(line: &str) -> bool {
    let name = line.split_whitespace().next().unwrap_or("");
    match name.strip_prefix("nightly") {
        Some("") => true,
        Some(rest) => rest.starts_with('-') && !rest[1..].starts_with(|c: char| c.is_ascii_digit()),
        None => false,
    }
}

fn has_rust_src(installed_components: &str) -> bool {
    installed_components
        .lines()
        .map(str::trim)
        .any(|line| line == "rust-src" || line.starts_with("rust-src-"))
}

// ---- bpf-linker ----

fn ensure_bpf_linker() -> Result<Outcome> {
    let force = match cmd::which("bpf-linker") {
        Some(path) if runs(&path) => return Ok(Outcome::Present),
        Some(path) => {
            println!(
                "setup: {} is there but does not run (built against an LLVM that is gone?): \
                 reinstalling it",
                path.display()
            );
            true
        }
        None => {
            refuse_if_off_path()?;
            false
        }
    };
    println!(
        "setup: installing bpf-linker (links the eBPF program), built against LLVM 22; \
         about a minute"
    );
    install_bpf_linker(force)?;
    if cmd::which("bpf-linker").is_none() {
        refuse_if_off_path()?;
        bail!("`cargo install bpf-linker` succeeded but bpf-linker is not on PATH");
    }
    Ok(Outcome::Installed("installed bpf-linker".into()))
}

fn runs(bpf_linker: &Path) -> bool {
    Command::new(bpf_linker)
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success())
}

/// A bpf-linker that cargo installed but PATH misses would not be reinstalled by cargo,
/// and the eBPF build would not find it either: say how to fix PATH instead.
fn refuse_if_off_path() -> Result<()> {
    let installed = cargo_home().join("bin/bpf-linker");
    if cmd::is_executable(&installed) {
        bail!(
            "bpf-linker is installed at {} but its directory is not on PATH: add it \
             (e.g. `source ~/.cargo/env`) and run again",
            installed.display()
        );
    }
    Ok(())
}

fn install_bpf_linker(force: bool) -> Result<()> {
    let llvm = Path::new(LLVM_DIR);
    let mut install = Command::new(workspace::cargo_program());
    install
        .args(["install", "bpf-linker", "--version", "^0.13", "--locked"])
        .args(["--no-default-features", "--features", "llvm-22"])
        // Without LLVM's bin on PATH, llvm-sys finds no libLLVM and the link fails.
        .env("PATH", cmd::path_with(&llvm.join("bin"))?)
        .env("LLVM_SYS_221_PREFIX", llvm)
        // Away from the workspace, so its .cargo/config.toml does not apply.
        .current_dir(std::env::temp_dir());
    if force {
        install.arg("--force");
    }
    println!("setup: with PATH={LLVM_DIR}/bin:$PATH LLVM_SYS_221_PREFIX={LLVM_DIR}");
    cmd::run(&mut install)
}

fn cargo_home() -> PathBuf {
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        return home.into();
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cargo")
}

// ---- bpffs ----

fn ensure_bpffs() -> Result<Outcome> {
    let mounts = fs::read_to_string("/proc/mounts").context("cannot read /proc/mounts")?;
    if is_bpffs_mounted(&mounts, BPFFS_DIR) {
        return Ok(Outcome::Present);
    }
    if !cmd::is_root() {
        // Building needs no bpffs, and lbd mounts it itself when it starts as root.
        return Ok(Outcome::Skipped(format!(
            "no bpffs at {BPFFS_DIR}; mounting it needs root (lbd, run as root, mounts it itself)"
        )));
    }
    println!("setup: mounting bpffs at {BPFFS_DIR}: lbd pins its program and maps there");
    mount_bpffs()?;
    Ok(Outcome::Installed(format!("mounted bpffs at {BPFFS_DIR}")))
}

fn is_bpffs_mounted(proc_mounts: &str, dir: &str) -> bool {
    proc_mounts.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        matches!(fields.as_slice(), [_, mount_point, "bpf", ..] if *mount_point == dir)
    })
}

fn mount_bpffs() -> Result<()> {
    fs::create_dir_all(BPFFS_DIR).with_context(|| format!("cannot create {BPFFS_DIR}"))?;
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    let result = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c"/sys/fs/bpf".as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if result != 0 {
        let error = std::io::Error::last_os_error();
        bail!("`mount -t bpf bpf {BPFFS_DIR}` failed: {error}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_package_is_missing() {
        assert!(!dpkg_installed("no-such-package-xtask").unwrap());
    }

    #[test]
    fn installed_package_is_present() {
        // Every Debian machine has dpkg itself.
        assert!(dpkg_installed("dpkg").unwrap());
    }

    #[test]
    fn present_packages_need_nothing() {
        let present = &[AptPackage {
            name: "dpkg",
            why: "test",
        }];
        assert!(matches!(ensure_apt_packages(present), Ok(Outcome::Present)));
    }

    /// Meaningful only when the tests run without root (e.g. under `setpriv --reuid`).
    #[test]
    fn missing_package_needs_root() {
        if cmd::is_root() {
            return;
        }
        let missing = &[AptPackage {
            name: "no-such-package-xtask",
            why: "test",
        }];
        let error = ensure_apt_packages(missing).err().unwrap().to_string();
        assert!(
            error.starts_with("setup needs root to install the apt packages no-such-package-xtask"),
            "{error}"
        );
    }

    #[test]
    fn policy_rc_is_removed_only_if_ours() {
        let dir = std::env::temp_dir().join(format!("xtask-policy-rc-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("policy-rc.d");
        // Absent: written while the guard lives, then removed.
        let guard = PolicyRcGuard::install(&path).unwrap();
        assert_eq!(fs::read(&path).unwrap(), POLICY_RC_TEXT);
        drop(guard);
        assert!(!path.exists());
        // Someone else's: left as it was.
        fs::write(&path, "#!/bin/sh\nexit 101\n").unwrap();
        drop(PolicyRcGuard::install(&path).unwrap());
        assert_eq!(fs::read_to_string(&path).unwrap(), "#!/bin/sh\nexit 101\n");
        // Ours, left by an interrupted run: removed.
        fs::write(&path, POLICY_RC_TEXT).unwrap();
        drop(PolicyRcGuard::install(&path).unwrap());
        assert!(!path.exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn plain_nightly_only() {
        assert!(is_plain_nightly("nightly-x86_64-unknown-linux-gnu"));
        assert!(is_plain_nightly(
            "nightly-x86_64-unknown-linux-gnu (default)"
        ));
        assert!(is_plain_nightly("nightly"));
        assert!(!is_plain_nightly(
            "nightly-2026-05-19-x86_64-unknown-linux-gnu"
        ));
        assert!(!is_plain_nightly(
            "stable-x86_64-unknown-linux-gnu (active, default)"
        ));
        assert!(!is_plain_nightly("1.95.0-x86_64-unknown-linux-gnu"));
    }

    #[test]
    fn rust_src_detection() {
        assert!(has_rust_src(
            "cargo-x86_64-unknown-linux-gnu\nrust-src\nrustc-x86_64\n"
        ));
        assert!(has_rust_src("rust-src-x86_64-unknown-linux-gnu\n"));
        assert!(!has_rust_src(
            "cargo-x86_64-unknown-linux-gnu\nrust-std-x86_64\n"
        ));
    }

    #[test]
    fn bpffs_detection() {
        let mounts = "sysfs /sys sysfs rw 0 0\nbpf /sys/fs/bpf bpf rw,relatime 0 0\n";
        assert!(is_bpffs_mounted(mounts, "/sys/fs/bpf"));
        assert!(!is_bpffs_mounted(
            "sysfs /sys sysfs rw 0 0\n",
            "/sys/fs/bpf"
        ));
        assert!(!is_bpffs_mounted(
            "tmpfs /sys/fs/bpf tmpfs rw 0 0\n",
            "/sys/fs/bpf"
        ));
        assert!(!is_bpffs_mounted(
            "bpf /sys/fs/bpf/x bpf rw 0 0\n",
            "/sys/fs/bpf"
        ));
    }
}
