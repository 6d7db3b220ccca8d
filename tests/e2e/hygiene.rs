//! lbd's process hygiene, end to end: one lbd per pins, state and socket (a second one exits
//! naming the first); idle clients of the metrics port cannot take lbd's file descriptors from
//! its health checks; a health check that cannot run is lbd's error, not the backend's failure;
//! the hash seed of a running data path survives a lost `state_dir` and a config without a seed,
//! and is replaced only with `--reseed`; directories others may write are refused; bpffs is
//! mounted 0700; an upgrade that resizes the connection table never lets the old program index
//! its table with the new, bigger mask. Real lbd, real XDP, real nginx. Needs root.

use lb_tests::http::metric;
use std::{
    net::{SocketAddr, TcpStream},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use lb_tests::{
    Topology, TopologyOptions,
    lbd::{Lbd, LbdPaths, bin, prepare_lbd, spawn_lbd, spawn_lbd_with, start_lbd},
    require_root, retry_until, wait_until,
};
use serde_json::Value;

const VIP: &str = "203.0.113.10";
const SEED_HEX: &str = "5f0c1d2e3f4051627384950a1b2c3d4e";
const OTHER_SEED_HEX: &str = "00112233445566778899aabbccddeeff";
const METRICS_PORT: u16 = 9917;

fn topology(backends: usize) -> Topology {
    require_root();
    Topology::new(TopologyOptions {
        backends,
        clients: 1,
        addresses_per_client: 4,
        vips: vec![VIP.parse().unwrap()],
        ..Default::default()
    })
    .expect("building the namespace topology")
}

/// One service "web" on VIP:80 over backends 1..=n, checked over HTTP every 200 ms (down after
/// 3 failures); `daemon_extra` goes into `[daemon]`.
fn config(paths: &LbdPaths, daemon_extra: &str, backends: usize) -> String {
    let mut c = paths.daemon_section(daemon_extra);
    c.push_str(&format!(
        "\n[[service]]\nname = \"web\"\nvip = \"{VIP}\"\nport = 80\nprotocol = \"tcp\"\n\n[service.health]\ncheck = \"http\"\npath = \"/\"\ninterval_ms = 200\ntimeout_ms = 150\nrise = 2\nfall = 3\n\n"
    ));
    for i in 1..=backends {
        c.push_str(&format!(
            "[[service.backend]]\naddress = \"192.0.2.{}\"\n\n",
            10 + i
        ));
    }
    c
}

/// `config` with the fixed seed and metrics on the LB's address.
fn config_with_metrics(t: &Topology, paths: &LbdPaths, backends: usize) -> String {
    let extra = format!(
        "{}\nmetrics = \"{}:{METRICS_PORT}\"",
        seeded(SEED_HEX),
        t.lb_addr()
    );
    config(paths, &extra, backends)
}

fn seeded(seed: &str) -> String {
    format!("hash_seed = \"{seed}\"")
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn backend_list(lbd: &Lbd) -> Vec<Value> {
    lbd.lbctl_json(&["backend", "list"])
        .expect("lbctl backend list")
        .as_array()
        .expect("an array")
        .clone()
}

fn wait_all_up(lbd: &Lbd) {
    wait_until(Duration::from_secs(10), "every backend up, checked", || {
        backend_list(lbd)
            .iter()
            .all(|r| r["state"] == "up" && r["last_check_ok"] == true)
    })
    .unwrap_or_else(|e| panic!("{e:#}\nlbd log:\n{}", lbd.log_tail()));
}

/// Waits for `lbd` to exit (it must, within 10 s) and returns its status.
fn exits(t: &Topology, lbd: &Lbd, what: &str) -> std::process::ExitStatus {
    t.wait_exit(lbd.handle, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{what}: {e:#}\nits log:\n{}", lbd.log()))
}

/// `lbd ARGS` in the LB namespace, to completion.
fn lbd_once(t: &Topology, args: &[&str]) -> Output {
    let mut cmd = Command::new(bin("lbd"));
    cmd.args(args).env("RUST_LOG", "info");
    t.nsenter_output(t.lb_ns(), &cmd).expect("running lbd")
}

/// Open file descriptors of process `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The soft and hard limits of open files of process `pid`.
fn nofile_limits(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let n: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (n[0], n[1])
}

// ---- one lbd at a time ----------------------------------------------------------------------

/// The paths of a second lbd: pins and state of its own, the socket of `first`.
fn other_paths(t: &Topology, first: &LbdPaths) -> LbdPaths {
    let other = LbdPaths {
        config: t.work_dir().join("lb2.toml"),
        socket: first.socket.clone(),
        bpffs_dir: PathBuf::from(format!("/sys/fs/bpf/{}-2", t.prefix())),
        state_dir: t.work_dir().join("state2"),
        interfaces: first.interfaces.clone(),
    };
    let dir = other.bpffs_dir.clone();
    t.on_teardown(move || {
        let _ = std::fs::remove_dir_all(&dir);
    });
    other
}

#[test]
fn a_second_lbd_exits_naming_the_first_and_leaves_its_socket_alone() {
    let t = topology(1);
    let paths = LbdPaths::for_topology(&t);
    let first = start_lbd(&t, &config(&paths, &seeded(SEED_HEX), 1)).expect("starting lbd");
    let pid = first.handle.pid();
    first
        .wait_answering(Duration::from_secs(5))
        .expect("the first lbd answers");

    // The same config: the same pins, state and socket.
    let second = spawn_lbd(&t, &paths).unwrap();
    let st = exits(&t, &second, "a second lbd on the same pins");
    assert_eq!(st.code(), Some(1), "{st}\n{}", second.log());
    let log = second.log();
    assert!(
        log.contains(&format!("pid {pid}")),
        "the second lbd names the running one (pid {pid}): {log}"
    );
    let status = first
        .wait_answering(Duration::from_secs(2))
        .expect("the first lbd still answers on its socket");
    assert_eq!(status["pid"].as_u64(), Some(u64::from(pid)));

    // Pins and state of its own, the first one's socket: refused too, before touching anything.
    let other = other_paths(&t, &paths);
    write(&other.config, &config(&other, &seeded(SEED_HEX), 1));
    let third = spawn_lbd(&t, &other).unwrap();
    let st = exits(&t, &third, "a second lbd on the same socket");
    assert_eq!(st.code(), Some(1), "{st}\n{}", third.log());
    let log = third.log();
    assert!(
        log.contains(&format!("pid {pid}")) && log.contains(&paths.socket.display().to_string()),
        "the lbd on the same socket names it and the running lbd (pid {pid}): {log}"
    );
    assert!(
        !other.bpffs_dir.exists(),
        "the refused lbd made pins in {}",
        other.bpffs_dir.display()
    );
    first
        .wait_answering(Duration::from_secs(2))
        .expect("the first lbd still answers on its socket");

    // lbd --cleanup while lbd runs: refused, naming it; nothing removed.
    let out = lbd_once(
        &t,
        &["--cleanup", "--config", &paths.config.display().to_string()],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains(&format!("pid {pid}")),
        "{}",
        text(&out.stderr)
    );
    assert!(
        paths.bpffs_dir.join("link_eth0").exists(),
        "the link pin is gone"
    );
    first
        .wait_answering(Duration::from_secs(2))
        .expect("the first lbd still answers after the refused cleanup");

    // Once the first has exited, its socket is gone and a new lbd starts.
    assert!(first.stop().unwrap().success());
    assert!(!paths.socket.exists());
    let again = spawn_lbd(&t, &paths).unwrap();
    again
        .wait_answering(lb_tests::lbd::LBD_START)
        .expect("a new lbd after the first exited");
    assert!(again.stop().unwrap().success());
}

// ---- file descriptors -------------------------------------------------------------------------

#[test]
fn idle_metrics_connections_do_not_starve_the_health_checks() {
    let t = topology(3);
    let paths = LbdPaths::for_topology(&t);
    prepare_lbd(&t, &config_with_metrics(&t, &paths, 3)).unwrap();
    // As a shell or a service manager without LimitNOFILE leaves it.
    let lbd = spawn_lbd_with(&t, &paths, &[], Some(1024)).unwrap();
    lbd.wait_answering(lb_tests::lbd::LBD_START).unwrap();
    wait_all_up(&lbd);
    let pid = lbd.handle.pid();
    let (soft, hard) = nofile_limits(pid);
    eprintln!("lbd's open-files limits: soft {soft}, hard {hard}");

    // Up to a thousand idle clients of the metrics port. Those lbd does not serve wait in the
    // kernel's listen backlog (connected); once it is full, new ones are not answered at all,
    // and a few of those in a row end the attempt.
    let endpoint = SocketAddr::new(t.lb_addr(), METRICS_PORT);
    let idle: Vec<TcpStream> = t
        .in_netns(t.client_ns(1), || {
            let mut open = vec![];
            let mut unanswered = 0;
            while open.len() < 1000 && unanswered < 5 {
                match TcpStream::connect_timeout(&endpoint, Duration::from_millis(300)) {
                    Ok(s) => {
                        open.push(s);
                        unanswered = 0;
                    }
                    Err(_) => unanswered += 1,
                }
            }
            Ok(open)
        })
        .unwrap();
    // More than lbd serves at once (64): the rest wait in the backlog.
    assert!(idle.len() > 128, "only {} connections", idle.len());

    // Well past `fall` checks: every backend stays up, lbd's descriptors stay few.
    let until = Instant::now() + Duration::from_secs(3);
    let mut most = 0;
    while Instant::now() < until {
        most = most.max(open_fds(pid));
        let down: Vec<Value> = backend_list(&lbd)
            .into_iter()
            .filter(|r| r["state"] != "up")
            .collect();
        assert!(
            down.is_empty(),
            "with {} idle metrics connections: {down:?}\nlbd holds {} descriptors\nlbd log:\n{}",
            idle.len(),
            open_fds(pid),
            lbd.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "{} idle metrics connections: lbd held at most {most} descriptors",
        idle.len()
    );
    assert!(
        most < 300,
        "lbd held {most} descriptors for {} idle connections",
        idle.len()
    );
    assert!(!lbd.log().contains("Too many open files"), "{}", lbd.log());
    let (soft, hard) = nofile_limits(pid);
    assert_eq!(soft, hard, "lbd raised its soft limit of open files");

    // Once the idle clients are gone, a scrape is answered.
    drop(idle);
    retry_until(
        Duration::from_secs(15),
        "a scrape after the idle clients left",
        || {
            let r = t.http_get(t.client_ns(1), t.client_addr(1), endpoint, "/metrics")?;
            anyhow::ensure!(r.status == 200, "status {}", r.status);
            Ok(())
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\nlbd log:\n{}", lbd.log_tail()));
}

/// Sets the soft limit of open files of the running process `pid` (prlimit(1)).
fn set_soft_nofile(pid: u32, soft: u64) {
    let out = Command::new("prlimit")
        .arg("--pid")
        .arg(pid.to_string())
        .arg(format!("--nofile={soft}:"))
        .output()
        .expect("running prlimit");
    assert!(out.status.success(), "prlimit: {}", text(&out.stderr));
}

#[test]
fn a_health_check_without_descriptors_is_an_error_of_lbd_not_a_backend_failure() {
    let t = topology(2);
    let paths = LbdPaths::for_topology(&t);
    let lbd = start_lbd(&t, &config_with_metrics(&t, &paths, 2)).unwrap();
    wait_all_up(&lbd);
    let pid = lbd.handle.pid();
    let (soft, _) = nofile_limits(pid);

    // No descriptor can be opened for 2 s (10 intervals, over three times `fall`).
    let from = lbd.log().len();
    set_soft_nofile(pid, 3);
    std::thread::sleep(Duration::from_secs(2));
    set_soft_nofile(pid, soft);

    let log = lbd.log()[from..].to_string();
    assert!(
        !log.contains("is down"),
        "a check that could not run took a backend down:\n{log}"
    );
    assert!(
        log.contains("could not run") && log.contains("too many open files"),
        "lbd logs the checks it could not run as its own error:\n{log}"
    );
    wait_all_up(&lbd);
    for r in backend_list(&lbd) {
        assert!(
            r["since_s"].as_u64().unwrap() >= 2,
            "a backend changed state: {r}"
        );
    }
    let endpoint = SocketAddr::new(t.lb_addr(), METRICS_PORT);
    let scrape = retry_until(Duration::from_secs(5), "a scrape", || {
        let r = t.http_get(t.client_ns(1), t.client_addr(1), endpoint, "/metrics")?;
        anyhow::ensure!(r.status == 200, "status {}", r.status);
        Ok(r.text().into_owned())
    })
    .unwrap();
    for b in ["192.0.2.11", "192.0.2.12"] {
        let errors = metric(
            &scrape,
            &format!("lb_health_checks_total{{service=\"web\",backend=\"{b}\",result=\"error\"}}"),
        );
        assert!(
            errors.is_some_and(|n| n >= 3.0),
            "{b}: {errors:?}\n{scrape}"
        );
    }
}

// ---- the hash seed ------------------------------------------------------------------------------

/// The pinned CONFIG of the data path at `paths`.
fn pinned_config(paths: &LbdPaths) -> lb_common::Config {
    let pin = paths
        .bpffs_dir
        .join(format!("v{}", lb_common::LAYOUT_VERSION))
        .join(lb_common::maps::CONFIG);
    let map = aya::maps::MapData::from_pin(&pin).unwrap();
    let config: aya::maps::Array<_, lb_common::Config> =
        aya::maps::Array::try_from(aya::maps::Map::from_map_data(map).unwrap()).unwrap();
    config.get(&0, 0).unwrap()
}

fn pinned_seed(paths: &LbdPaths) -> String {
    lb_userspace::state::seed_hex(&pinned_config(paths).hash_key)
}

fn seed_file(paths: &LbdPaths) -> PathBuf {
    paths.state_dir.join("hash_seed")
}

/// Starts lbd on `config` (written first) with `extra` arguments and stops it again once it
/// answers.
fn run_once(t: &Topology, paths: &LbdPaths, config: &str, extra: &[&str]) -> String {
    write(&paths.config, config);
    let lbd = spawn_lbd_with(t, paths, extra, None).unwrap();
    lbd.wait_answering(lb_tests::lbd::LBD_START)
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(lbd.stop().unwrap().success());
    lbd.log()
}

/// Starts lbd on `config`, which must refuse to start: its log.
fn refused(t: &Topology, paths: &LbdPaths, config: &str, what: &str) -> String {
    write(&paths.config, config);
    let lbd = spawn_lbd(t, paths).unwrap();
    let st = exits(t, &lbd, what);
    assert_eq!(st.code(), Some(1), "{what}: {st}\n{}", lbd.log());
    lbd.log()
}

#[test]
fn the_running_seed_is_kept_and_replaced_only_with_reseed() {
    let t = topology(1);
    let paths = LbdPaths::for_topology(&t);
    let unseeded = config(&paths, "", 1);
    prepare_lbd(&t, &unseeded).unwrap();

    // A generated seed, kept in state_dir and in the data path.
    run_once(&t, &paths, &unseeded, &[]);
    let generated = std::fs::read_to_string(seed_file(&paths)).unwrap();
    let generated = generated.trim().to_string();
    assert_eq!(pinned_seed(&paths), generated);

    // state_dir lost: the running data path's seed is kept, and written back.
    std::fs::remove_dir_all(&paths.state_dir).unwrap();
    run_once(&t, &paths, &unseeded, &[]);
    assert_eq!(pinned_seed(&paths), generated, "the seed changed");
    assert_eq!(
        std::fs::read_to_string(seed_file(&paths)).unwrap().trim(),
        generated,
        "state_dir holds the running seed again"
    );

    // A configured seed that differs: refused without --reseed, nothing changes.
    let log = refused(
        &t,
        &paths,
        &config(&paths, &seeded(OTHER_SEED_HEX), 1),
        "another seed without --reseed",
    );
    assert!(
        log.contains("--reseed") && log.contains(&generated),
        "the refusal names the running seed and --reseed: {log}"
    );
    assert_eq!(pinned_seed(&paths), generated);

    // With --reseed it is applied, loudly.
    let log = run_once(
        &t,
        &paths,
        &config(&paths, &seeded(OTHER_SEED_HEX), 1),
        &["--reseed"],
    );
    assert_eq!(pinned_seed(&paths), OTHER_SEED_HEX);
    assert!(log.contains("WARN") && log.contains("reseed"), "{log}");

    // hash_seed removed from the config (state_dir still holds the generated one): the running
    // seed stays, and state_dir follows it.
    let log = run_once(&t, &paths, &unseeded, &[]);
    assert_eq!(pinned_seed(&paths), OTHER_SEED_HEX, "{log}");
    assert_eq!(
        std::fs::read_to_string(seed_file(&paths)).unwrap().trim(),
        OTHER_SEED_HEX
    );

    // A seed file a crash left empty is a clear error, never replaced.
    write(&seed_file(&paths), "");
    let log = refused(&t, &paths, &unseeded, "an empty seed file");
    assert!(
        log.contains(&seed_file(&paths).display().to_string()) && log.contains("32 hex digits"),
        "{log}"
    );
    assert_eq!(std::fs::read_to_string(seed_file(&paths)).unwrap(), "");
    assert_eq!(pinned_seed(&paths), OTHER_SEED_HEX);
}

// ---- directories ------------------------------------------------------------------------------

/// `lbd --config` of a config on `state_dir` and `bpffs_dir` with an interface that does not
/// exist: lbd checks its directories before it looks for the interface.
fn start_on_dirs(dir: &Path, state_dir: &Path, bpffs_dir: &Path) -> Output {
    let config = dir.join("lb.toml");
    write(
        &config,
        &format!(
            "[daemon]\ninterfaces = [\"lbtnoif0\"]\nsocket = \"{}\"\nstate_dir = \"{}\"\nbpffs_dir = \"{}\"\nhash_seed = \"{SEED_HEX}\"\n",
            dir.join("lbd.sock").display(),
            state_dir.display(),
            bpffs_dir.display()
        ),
    );
    Command::new(bin("lbd"))
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info")
        .output()
        .expect("running lbd")
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn directories_others_may_write_are_refused() {
    require_root();
    let dir = std::env::temp_dir().join(format!("lbt{}x0-dirs", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let bpffs_dir = PathBuf::from(format!("/sys/fs/bpf/lbt{}x0-dirs", std::process::id()));
    struct Cleanup(Vec<PathBuf>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            for d in &self.0 {
                let _ = std::fs::remove_dir_all(d);
            }
        }
    }
    let _cleanup = Cleanup(vec![dir.clone(), bpffs_dir.clone()]);
    let state_dir = dir.join("state");
    std::fs::create_dir(&state_dir).unwrap();
    std::fs::create_dir(&bpffs_dir).unwrap();

    // What is spoiled, which folder, how, and what the error must show.
    type Case<'a> = (&'a str, &'a Path, fn(&Path), &'a str);
    let cases: [Case; 4] = [
        (
            "state_dir mode 0777",
            &state_dir,
            |p| chmod(p, 0o777),
            "0777",
        ),
        (
            "state_dir mode 0770",
            &state_dir,
            |p| chmod(p, 0o770),
            "0770",
        ),
        (
            "state_dir owned by uid 65534",
            &state_dir,
            |p| std::os::unix::fs::chown(p, Some(65534), None).unwrap(),
            "65534",
        ),
        (
            "bpffs_dir mode 0777",
            &bpffs_dir,
            |p| chmod(p, 0o777),
            "0777",
        ),
    ];
    for (what, path, spoil, shown) in cases {
        chmod(&state_dir, 0o700);
        std::os::unix::fs::chown(&state_dir, Some(0), None).unwrap();
        chmod(&bpffs_dir, 0o700);
        spoil(path);
        let out = start_on_dirs(&dir, &state_dir, &bpffs_dir);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {err}");
        assert!(
            err.contains(&path.display().to_string()) && err.contains(shown),
            "{what}: the error names the directory and what is wrong: {err}"
        );
        assert!(
            !err.contains("lbtnoif0"),
            "{what}: lbd went on to look for the interface: {err}"
        );
    }
    // As they should be: lbd goes on, and stops at the missing interface.
    chmod(&state_dir, 0o700);
    std::os::unix::fs::chown(&state_dir, Some(0), None).unwrap();
    chmod(&bpffs_dir, 0o700);
    let out = start_on_dirs(&dir, &state_dir, &bpffs_dir);
    let err = text(&out.stderr);
    assert!(err.contains("lbtnoif0"), "{err}");
}

#[test]
fn lbd_mounts_bpffs_with_mode_0700() {
    require_root();
    let dir = std::env::temp_dir().join(format!("lbt{}x0-mount", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("lb.toml");
    write(
        &config,
        &format!(
            "[daemon]\ninterfaces = [\"lbtnoif0\"]\nsocket = \"{}\"\nstate_dir = \"{}\"\nbpffs_dir = \"/sys/fs/bpf/lb-mount-test\"\nhash_seed = \"{SEED_HEX}\"\n",
            dir.join("lbd.sock").display(),
            dir.join("state").display(),
        ),
    );
    // In a mount namespace of its own without a bpffs: lbd mounts one there (it and its folder
    // vanish with the namespace), then stops at the missing interface.
    let script = format!(
        "while mountpoint -q /sys/fs/bpf; do umount -l /sys/fs/bpf || exit 9; done; {} --config {} ; stat -c %a /sys/fs/bpf",
        bin("lbd").display(),
        config.display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .env("RUST_LOG", "info")
        .output()
        .expect("running unshare");
    let _ = std::fs::remove_dir_all(&dir);
    let err = text(&out.stderr);
    assert!(err.contains("mounting one"), "lbd mounted no bpffs: {err}");
    // bpffs always sets the sticky bit on its root (`stat` shows 1700): the permissions are
    // what matter.
    let mode = u32::from_str_radix(text(&out.stdout).trim(), 8)
        .unwrap_or_else(|e| panic!("stat printed {:?}: {e}\n{err}", text(&out.stdout)));
    assert_eq!(mode & 0o777, 0o700, "mode {mode:o}: {err}");
}

// ---- an upgrade that resizes the connection table ----------------------------------------------

#[test]
fn an_upgrade_that_grows_the_connection_table_keeps_the_old_program_in_its_table() {
    use lb_common::{Backend, ServiceKey, ServiceValue, backend_flags};
    use lb_tests::packet::ipv4_tcp;
    use lb_userspace::{
        config::XdpMode,
        datapath::{self, Datapath, Start},
        state::to_addr,
    };
    const XDP_TX: u32 = 3;
    const SEED: [u64; 2] = [0x0123_4567_89ab_cdef, 0x0fed_cba9_8765_4321];
    const SMALL: u32 = 1024;
    const BIG: u32 = 65536;

    require_root();
    let t = Topology::new(TopologyOptions {
        backends: 0,
        clients: 0,
        start_servers: false,
        ..Default::default()
    })
    .expect("topology");
    let dir = PathBuf::from(format!("/sys/fs/bpf/{}-grow", t.prefix()));
    let d = dir.clone();
    t.on_teardown(move || {
        let _ = datapath::cleanup(&d);
        let _ = std::fs::remove_dir_all(&d);
    });
    let vip: std::net::Ipv4Addr = VIP.parse().unwrap();
    let lb_mac = [0x02, 0, 0, 0, 0x0a, 0x02];
    let key = ServiceKey {
        addr: to_addr(vip.into()),
        port: 80u16.to_be(),
        proto: 6,
        family: 4,
    };
    let fill = |dp: &mut Datapath| {
        dp.set_config(SEED).unwrap();
        let backend = Backend {
            addr: to_addr("192.0.2.11".parse().unwrap()),
            mac: [0x02, 0, 0, 0, 0x0b, 1],
            src_mac: lb_mac,
            ifindex: 1,
            service: 0,
            family: 4,
            flags: backend_flags::VALID,
            mtu: 1500,
            ..Default::default()
        };
        dp.set_backend(0, &backend).unwrap();
        let value = ServiceValue {
            id: 0,
            flags: 0,
            table_size: 7,
            _pad: 0,
        };
        dp.set_service(&key, &value, &[0; 7]).unwrap();
    };
    let interfaces = vec!["eth0".to_string()];
    t.in_netns(t.lb_ns(), || {
        // SAFETY: a NUL-terminated name; the call only reads it.
        let ifindex = unsafe { libc::if_nametoindex(c"eth0".as_ptr()) };
        assert_ne!(ifindex, 0);
        let mut old = Datapath::open(&dir, SMALL, &interfaces).unwrap();
        fill(&mut old);
        old.attach("eth0", ifindex, XdpMode::Auto).unwrap();
        old.finish_start().unwrap();
        let small_sets = lb_common::conntrack_sets(SMALL);

        let mut new = Datapath::open(&dir, BIG, &interfaces).unwrap();
        assert_eq!(new.start, Start::Upgraded);
        fill(&mut new);
        // The maps are filled, the new program not yet in place: the old one still runs, on its
        // own small table. Each of these flows lies beyond it under the new mask.
        let mut beyond = 0;
        for port in 1000..1200u16 {
            let client = std::net::Ipv4Addr::new(198, 51, 100, (port % 200) as u8 + 1);
            let frame = ipv4_tcp(
                [0x02, 0, 0, 0, 0, 0x65],
                lb_mac,
                client,
                vip,
                port,
                80,
                0x10,
                b"",
            );
            let flow = lb_tests::dpfixture::flow_key(client.into(), vip.into(), port, 80, 6);
            let set = lb_common::hash::flow_hash(&SEED, &flow) as u32
                & (lb_common::conntrack_sets(BIG) - 1);
            if set < small_sets {
                continue;
            }
            beyond += 1;
            let (action, _) = old.test_run(&frame.bytes).unwrap();
            assert_eq!(
                action,
                XDP_TX,
                "flow {client}:{port} (set {set} of the new table, the old has {small_sets}): the old program did not forward it"
            );
        }
        assert!(beyond > 100, "{beyond} flows beyond the old table");
        new.attach("eth0", ifindex, XdpMode::Auto).unwrap();
        new.finish_start().unwrap();
        let mask = {
            let map = aya::maps::MapData::from_pin(
                datapath::maps_dir(&dir).join(lb_common::maps::CONFIG),
            )
            .unwrap();
            let config: aya::maps::Array<_, lb_common::Config> =
                aya::maps::Array::try_from(aya::maps::Map::from_map_data(map).unwrap()).unwrap();
            config.get(&0, 0).unwrap().flow_set_mask
        };
        assert_eq!(
            mask,
            lb_common::conntrack_sets(BIG) - 1,
            "the new mask once the new program is in place"
        );
        Ok(())
    })
    .unwrap();
}
