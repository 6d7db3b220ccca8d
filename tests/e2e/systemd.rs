//! lbd under systemd: the shipped unit (packaging/lbd.service) passes `systemd-analyze verify`,
//! and readiness, reload and stop are notified the way systemd (Type=notify) sees them: through
//! a unix datagram socket named by NOTIFY_SOCKET. systemd need not be PID 1 for either.
//! The readiness test needs root (fails loudly without it).

use std::{
    ffi::OsStr,
    os::unix::{fs::FileTypeExt, net::UnixDatagram},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use lb_tests::{
    Topology, TopologyOptions,
    lbd::{Lbd, LbdPaths, bin, spawn_lbd_with_env},
    require_root,
};

fn unit_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/lbd.service")
}

/// A folder of the test's own under the temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("lbsystemd-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating a temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// `systemd-analyze verify` on the shipped unit, with nothing installed: a copy of the unit whose
/// ExecStart is the lbd under test (verify insists that the binary exists), and the man pages
/// its `Documentation=` names generated from that lbd and lbctl into a temporary MANPATH.
/// Warnings (an unknown or misspelt key, say) fail the test too, not only errors.
#[test]
fn unit_passes_systemd_analyze_verify() {
    assert!(
        on_path("systemd-analyze"),
        "systemd-analyze is not installed (Debian package `systemd`): it is needed to check packaging/lbd.service"
    );
    let unit = std::fs::read_to_string(unit_path()).expect("reading packaging/lbd.service");
    // Absolute and normalized, with `%` escaped: systemd's rules for an ExecStart= path.
    let lbd = std::fs::canonicalize(bin("lbd")).expect("resolving the lbd under test");
    let shipped = "ExecStart=/usr/local/sbin/lbd --config /etc/lb/lb.toml";
    assert_eq!(
        unit.lines().filter(|l| *l == shipped).count(),
        1,
        "packaging/lbd.service should have exactly one line `{shipped}`"
    );
    for expected in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "RuntimeDirectory=lb",
        "StateDirectory=lb",
    ] {
        assert!(
            unit.lines().any(|l| l == expected),
            "packaging/lbd.service lacks `{expected}`"
        );
    }
    // Room for a health check's socket for every backend lbd can hold, and then some: without
    // LimitNOFILE systemd leaves 1,024.
    let nofile: u64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("LimitNOFILE="))
        .unwrap_or_else(|| panic!("packaging/lbd.service lacks LimitNOFILE="))
        .parse()
        .expect("LimitNOFILE= is a number");
    assert!(
        nofile >= 2 * u64::from(lb_common::MAX_BACKENDS),
        "LimitNOFILE={nofile} is less than twice the {} backends lbd may check",
        lb_common::MAX_BACKENDS
    );
    let copy = unit.replace(
        shipped,
        &format!(
            "ExecStart={} --config /etc/lb/lb.toml",
            lbd.display().to_string().replace('%', "%%")
        ),
    );

    let tmp = TempDir::new("verify");
    // The file name is the unit's name.
    let path = tmp.0.join("lbd.service");
    std::fs::write(&path, copy).unwrap();
    let mut verify = Command::new("systemd-analyze");
    verify.arg("verify");
    if on_path("man") {
        let man8 = tmp.0.join("man/man8");
        std::fs::create_dir_all(&man8).unwrap();
        for (name, args) in [("lbd", &["--man"][..]), ("lbctl", &["man"][..])] {
            let out = Command::new(bin(name)).args(args).output().unwrap();
            assert!(out.status.success(), "{name} {args:?} failed: {out:?}");
            std::fs::write(man8.join(format!("{name}.8")), out.stdout).unwrap();
        }
        verify.env("MANPATH", tmp.0.join("man"));
    } else {
        // Without man(1) systemd-analyze cannot look the pages up at all.
        verify.arg("--man=no");
    }
    let out = verify.arg(&path).output().expect("running systemd-analyze");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.trim().is_empty() && stderr.trim().is_empty(),
        "systemd-analyze verify {} ({}):\n{stdout}{stderr}",
        path.display(),
        out.status
    );
}

/// The datagrams lbd sends to its NOTIFY_SOCKET, read as systemd reads them.
struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
    /// Every message so far, for failure reports.
    seen: Vec<String>,
}

impl NotifySocket {
    fn bind(path: PathBuf) -> NotifySocket {
        let _ = std::fs::remove_file(&path);
        let sock =
            UnixDatagram::bind(&path).unwrap_or_else(|e| panic!("binding {}: {e}", path.display()));
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        NotifySocket {
            sock,
            path,
            seen: vec![],
        }
    }

    /// The next message, within `deadline`; fails early (with lbd's log) if lbd exits first.
    fn next(&mut self, t: &Topology, lbd: &Lbd, deadline: Duration) -> Result<String, String> {
        let end = Instant::now() + deadline;
        let mut buf = [0u8; 4096];
        loop {
            match self.sock.recv(&mut buf) {
                Ok(n) => {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    self.seen.push(msg.clone());
                    return Ok(msg);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(format!("reading {}: {e}", self.path.display())),
            }
            if let Ok(Some(st)) = t.try_wait(lbd.handle) {
                // It may have sent its last message just before exiting.
                if let Ok(n) = self.sock.recv(&mut buf) {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    self.seen.push(msg.clone());
                    return Ok(msg);
                }
                return Err(format!(
                    "lbd exited ({st}) with nothing more on NOTIFY_SOCKET (messages so far: {:?}); its log:\n{}",
                    self.seen,
                    lbd.log()
                ));
            }
            if Instant::now() >= end {
                return Err(format!(
                    "nothing on NOTIFY_SOCKET within {deadline:?} (messages so far: {:?}); lbd's log:\n{}",
                    self.seen,
                    lbd.log()
                ));
            }
        }
    }

    /// The next message must carry `state` (e.g. "READY=1") and no other state.
    fn expect(&mut self, t: &Topology, lbd: &Lbd, state: &str, deadline: Duration) {
        let msg = self.next(t, lbd, deadline).unwrap_or_else(|e| {
            panic!("waiting for {state}: {e}");
        });
        let states: Vec<&str> = msg.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(
            states,
            [state],
            "expected {state} on NOTIFY_SOCKET, got {msg:?} (all so far: {:?})",
            self.seen
        );
    }
}

const VIP: &str = "203.0.113.10";

fn config(paths: &LbdPaths, second_weight: u32) -> String {
    let mut c = paths.daemon_section("");
    c.push_str(&format!(
        r#"
[[service]]
name = "web"
vip = "{VIP}"
port = 80
protocol = "tcp"

[[service.backend]]
address = "192.0.2.11"

[[service.backend]]
address = "192.0.2.12"
weight = {second_weight}
"#
    ));
    c
}

fn xdp_attached(t: &Topology) -> bool {
    t.exec_ok(t.lb_ns(), &["ip", "link", "show", "eth0"])
        .map(|out| out.contains("xdp"))
        .unwrap_or(false)
}

/// What READY=1 promises, checked the moment it arrives: the control socket is there and
/// answers, the program is attached, every backend's MAC is resolved and the table chooses
/// among them.
fn assert_ready(t: &Topology, lbd: &Lbd) -> serde_json::Value {
    let meta = std::fs::metadata(&lbd.paths.socket).unwrap_or_else(|e| {
        panic!(
            "READY=1 arrived but the control socket {} is not there: {e}",
            lbd.paths.socket.display()
        )
    });
    assert!(meta.file_type().is_socket(), "{:?}", meta.file_type());
    let status = lbd.lbctl_json(&["status"]).unwrap_or_else(|e| {
        panic!(
            "lbctl status right after READY=1: {e:#}\nlbd's log:\n{}",
            lbd.log()
        )
    });
    assert_eq!(
        status["pid"].as_u64(),
        Some(u64::from(lbd.handle.pid())),
        "{status}"
    );
    assert!(status["program_id"].as_u64().unwrap_or(0) > 0, "{status}");
    assert_eq!(status["interfaces"][0]["name"], "eth0", "{status}");
    assert!(xdp_attached(t), "READY=1 but no XDP program on eth0");
    let backends = lbd.lbctl_json(&["backend", "list"]).unwrap();
    let list = backends.as_array().expect("backend list is an array");
    assert_eq!(list.len(), 2, "{backends}");
    for b in list {
        assert_eq!(b["state"], "up", "{backends}");
        assert!(
            b["mac"].is_string(),
            "MAC not resolved at READY=1: {backends}"
        );
    }
    let lookup = lbd.lbctl_json(&["lookup", "web", "198.51.100.7"]).unwrap();
    let chosen = lookup["backend"].as_str().unwrap_or_default();
    assert!(["192.0.2.11", "192.0.2.12"].contains(&chosen), "{lookup}");
    backends
}

#[test]
fn readiness_reload_and_stop_are_notified_as_systemd_sees_them() {
    require_root();
    let t = Topology::new(TopologyOptions {
        backends: 2,
        clients: 0,
        addresses_per_client: 0,
        vips: vec![],
        start_servers: false,
        ..Default::default()
    })
    .expect("building the namespace topology");
    let paths = LbdPaths::for_topology(&t);
    let mut notify = NotifySocket::bind(t.work_dir().join("notify.sock"));
    let socket_path = notify.path.clone();
    let lbd = spawn_lbd_with_env(
        &t,
        &config(&paths, 100),
        &[("NOTIFY_SOCKET", socket_path.as_os_str() as &OsStr)],
    )
    .expect("starting lbd");

    // Readiness: the first message is READY=1 (SPEC: never more than 10 s), and everything it
    // promises already holds.
    let started = Instant::now();
    notify.expect(&t, &lbd, "READY=1", Duration::from_secs(10));
    eprintln!("READY=1 after {:?}", started.elapsed());
    assert_ready(&t, &lbd);

    // Reload: RELOADING=1, then READY=1 once the new file is applied.
    std::fs::write(&paths.config, config(&paths, 50)).unwrap();
    t.signal(lbd.handle, libc::SIGHUP).unwrap();
    notify.expect(&t, &lbd, "RELOADING=1", Duration::from_secs(5));
    notify.expect(&t, &lbd, "READY=1", Duration::from_secs(10));
    let backends = assert_ready(&t, &lbd);
    let second = backends
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == "192.0.2.12")
        .unwrap_or_else(|| panic!("{backends}"));
    assert_eq!(
        second["weight"], 50,
        "READY=1 after SIGHUP, but the new weight is not applied: {backends}"
    );

    // Stop: STOPPING=1, exit 0, and the data path stays (a restart is hitless).
    t.signal(lbd.handle, libc::SIGTERM).unwrap();
    notify.expect(&t, &lbd, "STOPPING=1", Duration::from_secs(5));
    let st = t
        .wait_exit(lbd.handle, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{e:#}\nlbd's log:\n{}", lbd.log()));
    assert!(
        st.success(),
        "lbd exited with {st}; its log:\n{}",
        lbd.log()
    );
    assert!(
        xdp_attached(&t),
        "the XDP program left eth0 when lbd stopped; lbd's log:\n{}",
        lbd.log()
    );
    let mut buf = [0u8; 512];
    if let Ok(n) = notify.sock.recv(&mut buf) {
        panic!(
            "a message after STOPPING=1: {:?}",
            String::from_utf8_lossy(&buf[..n])
        );
    }
}
