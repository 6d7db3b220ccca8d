//! End to end: every bad input — a malformed config (checked, at start, at SIGHUP), bad lbctl
//! arguments, unknown or duplicate services and backends, a non-root peer on the control
//! socket, no daemon at all — gets a clear error and a non-zero exit, and leaves the running
//! state exactly as it was. "Unchanged" is checked, not assumed: before and after each bad
//! input the test compares `lbctl --json backend list` and `service list` (less their clocks
//! and counters), the config file's bytes, and `lbctl --json lookup` for client addresses
//! chosen to cover every backend, each confirmed by real HTTP through the VIP.
//!
//! Needs root (fails loudly without it), except the tests that only run `lbd --check`, lbd's
//! argument parsing or lbctl without a daemon.

use std::{
    fs::Permissions,
    net::{IpAddr, SocketAddr},
    os::unix::{fs::MetadataExt as _, fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lb_tests::{
    Topology, TopologyOptions,
    lbd::{Lbd, LbdPaths, bin, check_config, lbctl_at, register_cleanup, spawn_lbd, start_lbd},
    require_root,
};
use serde_json::Value;

const VIP: &str = "203.0.113.10";
const SEED_HEX: &str = "5f0c1d2e3f4051627384950a1b2c3d4e";
/// The uid and gid of `nobody` on Debian.
const NOBODY: u32 = 65534;

// ---- the good config and the ways to break it ----------------------------------------------

/// The config every test starts from: the daemon section, then service "web" with three
/// backends (explicit weights, so a drain and undrain give the same bytes back).
fn good_config(daemon_section: &str) -> String {
    format!(
        r#"{daemon_section}
[[service]]
name = "web"
vip = "{VIP}"
port = 80
protocol = "tcp"

[[service.backend]]
address = "192.0.2.11"
weight = 100

[[service.backend]]
address = "192.0.2.12"
weight = 100

[[service.backend]]
address = "192.0.2.13"
weight = 100
"#
    )
}

/// The daemon section of a test lbd: its paths, and a fixed seed.
fn daemon_section(paths: &LbdPaths) -> String {
    paths.daemon_section(&format!("hash_seed = \"{SEED_HEX}\""))
}

enum Edit {
    /// Replace the first occurrence (which must exist).
    Replace(&'static str, &'static str),
    /// Append a table at the end.
    Append(&'static str),
}

/// One kind of malformed config.
struct Case {
    kind: &'static str,
    edit: Edit,
    /// A string whose first occurrence in the broken file is on the line the error must name.
    at: &'static str,
    /// The key the error must name (any one of these spellings); empty: no key to name (a
    /// TOML syntax error).
    keys: &'static [&'static str],
    /// What else the message must say (lower case), so the problem itself is named.
    detail: &'static str,
    /// The key is not named today (see `check_names_the_key_of_values_of_the_wrong_type`).
    key_bug: bool,
}

impl Case {
    fn apply(&self, good: &str) -> String {
        match self.edit {
            Edit::Replace(from, to) => {
                assert!(
                    good.contains(from),
                    "{}: {from:?} is not in the config",
                    self.kind
                );
                good.replacen(from, to, 1)
            }
            Edit::Append(table) => format!("{good}{table}"),
        }
    }

    /// The 1-based line of `at` in `bad`.
    fn line(&self, bad: &str) -> usize {
        let offset = bad
            .find(self.at)
            .unwrap_or_else(|| panic!("{}: {:?} is not in the broken config", self.kind, self.at));
        bad[..offset].matches('\n').count() + 1
    }

    /// What is wrong with `message` as the error about `bad` (None: nothing).
    fn judge(&self, bad: &str, message: &str, want_key: bool) -> Option<String> {
        let lower = message.to_lowercase();
        let line = self.line(bad);
        let mut missing = vec![];
        if !mentions_line(message, line) {
            missing.push(format!("`line {line}`"));
        }
        if want_key && !self.keys.is_empty() && !self.keys.iter().any(|k| message.contains(k)) {
            missing.push(format!("the key (one of {:?})", self.keys));
        }
        if !lower.contains(self.detail) {
            missing.push(format!("{:?}", self.detail));
        }
        (!missing.is_empty()).then(|| {
            format!(
                "{}: the error does not name {}:\n{message}",
                self.kind,
                missing.join(", ")
            )
        })
    }
}

/// Whether `text` says `line N` for exactly this N (not `line N0`).
fn mentions_line(text: &str, n: usize) -> bool {
    text.match_indices("line ").any(|(i, m)| {
        let digits: String = text[i + m.len()..]
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        digits.parse() == Ok(n)
    })
}

/// At least ten kinds of malformed config (sixteen), each with where and what the error names.
fn cases() -> Vec<Case> {
    vec![
        Case {
            kind: "TOML syntax error (unterminated string)",
            edit: Edit::Replace("protocol = \"tcp\"", "protocol = \"tcp"),
            at: "protocol = \"tcp",
            keys: &[],
            detail: "string",
            key_bug: false,
        },
        Case {
            kind: "unknown key",
            edit: Edit::Replace("port = 80\n", "port = 80\ncolour = \"blue\"\n"),
            at: "colour",
            keys: &["`colour`", "service[0].colour"],
            detail: "unknown",
            key_bug: false,
        },
        Case {
            kind: "missing required key (vip)",
            edit: Edit::Replace("vip = \"203.0.113.10\"\n", ""),
            at: "[[service]]",
            keys: &["`vip`", "service[0].vip"],
            detail: "missing",
            key_bug: false,
        },
        Case {
            kind: "wrong type (port = \"eighty\")",
            edit: Edit::Replace("port = 80\n", "port = \"eighty\"\n"),
            at: "port = \"eighty\"",
            keys: &["`port`", "service[0].port"],
            detail: "eighty",
            key_bug: true,
        },
        Case {
            kind: "port out of range (70000)",
            edit: Edit::Replace("port = 80\n", "port = 70000\n"),
            at: "port = 70000",
            keys: &["`port`", "service[0].port"],
            detail: "70000",
            key_bug: true,
        },
        Case {
            kind: "protocol \"sctp\"",
            edit: Edit::Replace("protocol = \"tcp\"", "protocol = \"sctp\""),
            at: "protocol = \"sctp\"",
            keys: &["`protocol`", "service[0].protocol"],
            detail: "sctp",
            key_bug: true,
        },
        Case {
            kind: "table_size not prime (65536)",
            edit: Edit::Replace(
                "protocol = \"tcp\"\n",
                "protocol = \"tcp\"\ntable_size = 65536\n",
            ),
            at: "table_size",
            keys: &["service[0].table_size"],
            detail: "prime",
            key_bug: false,
        },
        Case {
            kind: "table_size smaller than the backend count (2 < 3)",
            edit: Edit::Replace(
                "protocol = \"tcp\"\n",
                "protocol = \"tcp\"\ntable_size = 2\n",
            ),
            at: "table_size",
            keys: &["service[0].table_size"],
            detail: "smaller",
            key_bug: false,
        },
        Case {
            kind: "duplicate service name",
            edit: Edit::Append(
                "\n[[service]]\nname = \"web\" # the duplicate\nvip = \"203.0.113.20\"\nport = 80\nprotocol = \"tcp\"\n",
            ),
            at: "name = \"web\" # the duplicate",
            keys: &["service[1].name"],
            detail: "already",
            key_bug: false,
        },
        Case {
            kind: "duplicate vip/port/protocol",
            edit: Edit::Append(
                "\n[[service]]\nname = \"other\"\nvip = \"203.0.113.10\" # web's endpoint\nport = 80\nprotocol = \"tcp\"\n",
            ),
            at: "vip = \"203.0.113.10\" # web's endpoint",
            keys: &["service[1].vip"],
            detail: "already used",
            key_bug: false,
        },
        Case {
            kind: "IPv6 backend for an IPv4 VIP",
            edit: Edit::Replace("address = \"192.0.2.12\"", "address = \"2001:db8::12\""),
            at: "2001:db8::12",
            keys: &["service[0].backend[1].address"],
            detail: "family",
            key_bug: false,
        },
        Case {
            kind: "malformed hash_seed (21 hex digits)",
            edit: Edit::Replace(SEED_HEX, "5f0c1d2e3f40516273849"),
            at: "hash_seed",
            keys: &["daemon.hash_seed"],
            detail: "hex",
            key_bug: false,
        },
        Case {
            kind: "health timeout_ms > interval_ms",
            edit: Edit::Replace(
                "protocol = \"tcp\"\n",
                "protocol = \"tcp\"\n\n[service.health]\ncheck = \"tcp\"\ninterval_ms = 500\ntimeout_ms = 1000\n",
            ),
            at: "timeout_ms",
            keys: &["service[0].health.timeout_ms"],
            detail: "interval_ms",
            key_bug: false,
        },
        Case {
            kind: "negative weight (-1)",
            edit: Edit::Replace(
                "address = \"192.0.2.12\"\nweight = 100",
                "address = \"192.0.2.12\"\nweight = -1",
            ),
            at: "weight = -1",
            keys: &["`weight`", "service[0].backend[1].weight"],
            detail: "-1",
            key_bug: true,
        },
        Case {
            kind: "bad mac (five octets)",
            edit: Edit::Replace(
                "address = \"192.0.2.12\"\n",
                "address = \"192.0.2.12\"\nmac = \"02:00:00:00:0b\"\n",
            ),
            at: "mac =",
            keys: &["service[0].backend[1].mac"],
            detail: "mac address",
            key_bug: false,
        },
        Case {
            kind: "relative bpffs_dir",
            edit: Edit::Replace("bpffs_dir = \"/", "bpffs_dir = \""),
            at: "bpffs_dir",
            keys: &["daemon.bpffs_dir"],
            detail: "absolute",
            key_bug: false,
        },
    ]
}

// ---- the running state, and checking that it did not change ---------------------------------

fn topology() -> Topology {
    require_root();
    Topology::new(TopologyOptions {
        vips: vec![VIP.parse().unwrap()],
        ..Default::default()
    })
    .expect("building the namespace topology")
}

/// Starts lbd on the good config in `t`.
fn start(t: &Topology) -> Lbd<'_> {
    let paths = LbdPaths::for_topology(t);
    start_lbd(t, &good_config(&daemon_section(&paths))).expect("starting lbd")
}

fn vip80() -> SocketAddr {
    SocketAddr::new(VIP.parse().unwrap(), 80)
}

/// Everything a bad input must leave alone.
#[derive(Debug, Clone, PartialEq)]
struct Snapshot {
    /// `lbctl --json backend list`, less the clocks and counters.
    backends: Value,
    /// `lbctl --json service list`.
    services: Value,
    /// The config file's bytes.
    config: String,
    /// (client address, the backend `lbctl --json lookup web CLIENT` names).
    lookups: Vec<(IpAddr, Value)>,
}

/// What a backend list entry holds that does not move with time or traffic.
const STABLE_BACKEND_FIELDS: &[&str] = &[
    "service", "address", "weight", "state", "check", "mac", "problem",
];

fn stable_backends(list: Value) -> Value {
    let Value::Array(items) = list else {
        panic!("backend list is not an array: {list}")
    };
    Value::Array(
        items
            .into_iter()
            .map(|b| {
                let mut out = serde_json::Map::new();
                for k in STABLE_BACKEND_FIELDS {
                    out.insert(k.to_string(), b.get(*k).cloned().unwrap_or(Value::Null));
                }
                Value::Object(out)
            })
            .collect(),
    )
}

/// 1-based index of a backend address of the harness (192.0.2.(10+i)).
fn backend_index(address: &Value) -> usize {
    let a: IpAddr = address
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a backend address: {address}"));
    match a {
        IpAddr::V4(v4) if v4.octets()[..3] == [192, 0, 2] => v4.octets()[3] as usize - 10,
        _ => panic!("not a backend address of the harness: {a}"),
    }
}

/// The client addresses the snapshots follow: up to two per backend, in the order of the
/// clients' addresses, so every backend is covered.
fn choose_probes(t: &Topology, lbd: &Lbd) -> Vec<IpAddr> {
    let mut per = [0usize; 4];
    let mut probes = vec![];
    for src in t.all_client_sources() {
        let l = lbd
            .lbctl_json(&["lookup", "web", &src.to_string()])
            .expect("lbctl lookup");
        let i = backend_index(&l["backend"]);
        if per[i] < 2 {
            per[i] += 1;
            probes.push(src);
        }
        if per[1..].iter().all(|&n| n == 2) {
            break;
        }
    }
    assert!(
        per[1..].iter().all(|&n| n > 0),
        "no client address reaches some backend: {per:?}"
    );
    probes
}

/// The state now; also checks that real HTTP from every probe is served by the backend
/// `lookup` names.
fn snapshot(t: &Topology, lbd: &Lbd, probes: &[IpAddr]) -> Snapshot {
    assert!(
        t.is_running(lbd.handle),
        "lbd is not running; its log:\n{}",
        lbd.log()
    );
    let backends = stable_backends(lbd.lbctl_json(&["backend", "list"]).unwrap());
    let services = lbd.lbctl_json(&["service", "list"]).unwrap();
    let config = std::fs::read_to_string(&lbd.paths.config).unwrap();
    let mut lookups = vec![];
    for &src in probes {
        let l = lbd
            .lbctl_json(&["lookup", "web", &src.to_string()])
            .unwrap();
        let predicted = backend_index(&l["backend"]);
        let served = t
            .which_backend(src, vip80())
            .unwrap_or_else(|e| panic!("HTTP from {src}: {e:#}\nlbd log:\n{}", lbd.log()));
        assert_eq!(
            served, predicted,
            "HTTP from {src} was served by backend {served}, `lbctl lookup` says {}",
            l["backend"]
        );
        lookups.push((src, l["backend"].clone()));
    }
    Snapshot {
        backends,
        services,
        config,
        lookups,
    }
}

/// Panics, naming `after`, unless the state is `before`.
fn assert_unchanged(t: &Topology, lbd: &Lbd, probes: &[IpAddr], before: &Snapshot, after: &str) {
    let now = snapshot(t, lbd, probes);
    if now.backends != before.backends {
        panic!(
            "{after}: the backends changed:\nbefore {:#}\nafter  {:#}",
            before.backends, now.backends
        );
    }
    if now.services != before.services {
        panic!(
            "{after}: the services changed:\nbefore {:#}\nafter  {:#}",
            before.services, now.services
        );
    }
    if now.config != before.config {
        panic!(
            "{after}: the config file changed:\n--- before\n{}\n--- after\n{}",
            before.config, now.config
        );
    }
    assert_eq!(
        now.lookups, before.lookups,
        "{after}: clients moved to other backends"
    );
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn describe(what: &str, out: &Output) -> String {
    format!(
        "`{what}`: {}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// Checks that `out` is an error: non-zero exit, nothing on stdout, and a stderr that holds
/// every one of `expect` (compared in lower case). Returns the problem, if any.
fn judge_error(what: &str, out: &Output, expect: &[&str]) -> Option<String> {
    let err = text(&out.stderr).to_lowercase();
    let mut problems = vec![];
    if out.status.success() {
        problems.push("exited 0".to_string());
    }
    if !out.stdout.is_empty() {
        problems.push("printed on stdout".into());
    }
    for e in expect {
        if !err.contains(&e.to_lowercase()) {
            problems.push(format!("stderr does not say {e:?}"));
        }
    }
    (!problems.is_empty()).then(|| format!("{}: {}", problems.join(", "), describe(what, out)))
}

// ---- 1. malformed configs ---------------------------------------------------------------------

/// A work folder for the tests that need no topology; removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("lb-bad-input-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A daemon section for `lbd --check` whose paths must never be created.
fn check_only_daemon(dir: &Path) -> (String, Vec<PathBuf>) {
    let never = vec![
        dir.join("never/run/lbd.sock"),
        PathBuf::from(format!(
            "/sys/fs/bpf/lb-bad-input-never-{}",
            std::process::id()
        )),
        dir.join("never/state"),
    ];
    let section = format!(
        "[daemon]\ninterfaces = [\"eth0\"]\nsocket = \"{}\"\nbpffs_dir = \"{}\"\nstate_dir = \"{}\"\nhash_seed = \"{SEED_HEX}\"\n",
        never[0].display(),
        never[1].display(),
        never[2].display()
    );
    (section, never)
}

/// Runs `lbd --check` on every kind of malformed config for which `want_key` says Some (true:
/// the key must be named too) and returns the problems found; `tag` names the work folder.
fn check_each_case(tag: &str, want_key: impl Fn(&Case) -> Option<bool>) -> Vec<String> {
    let dir = TempDir::new(tag);
    let (section, never) = check_only_daemon(&dir.0);
    let good = good_config(&section);
    let good_path = dir.0.join("good.toml");
    std::fs::write(&good_path, &good).unwrap();
    let out = check_config(&good_path).unwrap();
    assert!(
        out.status.success(),
        "the good config is refused: {}",
        describe("lbd --check", &out)
    );

    let mut failures = vec![];
    for case in cases() {
        let Some(want_key) = want_key(&case) else {
            continue;
        };
        let bad = case.apply(&good);
        let path = dir.0.join("bad.toml");
        std::fs::write(&path, &bad).unwrap();
        let out = check_config(&path).unwrap();
        let what = format!("lbd --check --config bad.toml ({})", case.kind);
        if out.status.code() != Some(1) {
            failures.push(format!("exit status is not 1: {}", describe(&what, &out)));
            continue;
        }
        if let Some(p) = case.judge(&bad, &text(&out.stderr), want_key) {
            failures.push(p);
        }
    }
    for p in never {
        assert!(!p.exists(), "lbd --check created {}", p.display());
    }
    failures
}

#[test]
fn lbd_check_rejects_each_malformed_config_naming_line_and_problem() {
    // The key too, except for the kinds where it is not named today (the next test).
    let failures = check_each_case("check", |c| Some(!c.key_bug));
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn lbd_check_names_the_key_of_values_of_the_wrong_type() {
    let failures = check_each_case("check-keys", |c| c.key_bug.then_some(true));
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn sighup_with_a_malformed_config_is_refused_and_changes_nothing() {
    let t = topology();
    let lbd = start(&t);
    let probes = choose_probes(&t, &lbd);
    let before = snapshot(&t, &lbd, &probes);
    let good = before.config.clone();

    let mut failures = vec![];
    for case in cases() {
        let bad = case.apply(&good);
        std::fs::write(&lbd.paths.config, &bad).unwrap();
        let logged = lbd
            .reload(Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("{}: {e:#}", case.kind));
        if !logged.contains("ERROR") {
            failures.push(format!("{}: SIGHUP logged no error:\n{logged}", case.kind));
        } else if let Some(p) = case.judge(&bad, &logged, !case.key_bug) {
            failures.push(format!("SIGHUP: {p}"));
        }
        // Still the same state, with the broken file still in place...
        let mut expected = before.clone();
        expected.config = bad;
        assert_unchanged(
            &t,
            &lbd,
            &probes,
            &expected,
            &format!("SIGHUP with a config with a {}", case.kind),
        );
        // ...and after the good file is back and read again: nothing to change.
        std::fs::write(&lbd.paths.config, &good).unwrap();
        let logged = lbd.reload(Duration::from_secs(5)).unwrap();
        assert!(
            logged.contains("nothing changed"),
            "SIGHUP with the good file back after the {}: {logged}",
            case.kind
        );
        assert_unchanged(
            &t,
            &lbd,
            &probes,
            &before,
            &format!("SIGHUP with the good config back after the {}", case.kind),
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn lbd_does_not_start_on_a_malformed_config_or_a_missing_interface() {
    let t = topology();
    let lbd = start(&t);
    let probes = choose_probes(&t, &lbd);
    let before = snapshot(&t, &lbd, &probes);

    // A second lbd on each broken config, with the running lbd's own socket, pins and state:
    // it must give up at once, say why, and leave the running one alone.
    let mut second = lbd.paths.clone();
    second.config = t.work_dir().join("second.toml");
    let mut failures = vec![];
    for case in cases() {
        let bad = case.apply(&before.config);
        std::fs::write(&second.config, &bad).unwrap();
        let started = Instant::now();
        let other = spawn_lbd(&t, &second).unwrap();
        let status = t
            .wait_exit(other.handle, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("lbd on a config with a {}: {e:#}", case.kind));
        let log = other.log();
        if status.success() {
            failures.push(format!(
                "lbd on a config with a {} exited 0 after {:?}:\n{log}",
                case.kind,
                started.elapsed()
            ));
        } else if let Some(p) = case.judge(&bad, &log, !case.key_bug) {
            failures.push(format!("starting lbd: {p}"));
        }
        assert_unchanged(
            &t,
            &lbd,
            &probes,
            &before,
            &format!("starting a second lbd on a config with a {}", case.kind),
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));

    // A valid config naming an interface this namespace does not have, with paths of its own:
    // lbd exits non-zero naming the interface, and no socket appears.
    let noif = LbdPaths {
        config: t.work_dir().join("noif.toml"),
        socket: t.work_dir().join("run-noif/lbd.sock"),
        bpffs_dir: PathBuf::from(format!("/sys/fs/bpf/{}-noif", t.prefix())),
        state_dir: t.work_dir().join("state-noif"),
        interfaces: t.lb_interfaces(),
    };
    register_cleanup(&t, &noif);
    let section = daemon_section(&noif).replace("[\"eth0\"]", "[\"nosuch0\"]");
    assert!(section.contains("nosuch0"));
    std::fs::write(&noif.config, good_config(&section)).unwrap();
    let out = check_config(&noif.config).unwrap();
    assert!(
        out.status.success(),
        "a missing interface is not a file error: {}",
        describe("lbd --check", &out)
    );
    let other = spawn_lbd(&t, &noif).unwrap();
    let status = t
        .wait_exit(other.handle, Duration::from_secs(10))
        .expect("lbd on a missing interface");
    let log = other.log();
    assert!(
        !status.success(),
        "lbd on interface nosuch0 exited 0:\n{log}"
    );
    assert!(
        log.contains("nosuch0"),
        "lbd's message does not name the interface:\n{log}"
    );
    assert!(
        !noif.socket.exists(),
        "lbd on a missing interface made its socket {}",
        noif.socket.display()
    );
    assert_unchanged(
        &t,
        &lbd,
        &probes,
        &before,
        "starting an lbd on a missing interface",
    );
}

#[test]
fn lbd_refuses_unknown_flags_and_unreadable_configs() {
    let out = Command::new(bin("lbd"))
        .args(["--frobnicate", "--config", "/nonexistent/lb.toml"])
        .output()
        .unwrap();
    assert!(
        judge_error("lbd --frobnicate", &out, &["--frobnicate"]).is_none(),
        "{}",
        describe("lbd --frobnicate", &out)
    );

    let out = Command::new(bin("lbd"))
        .args(["--check", "--config", "/nonexistent/lb.toml"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        describe("lbd --check --config /nonexistent/lb.toml", &out)
    );
    assert!(
        text(&out.stderr).contains("/nonexistent/lb.toml"),
        "{}",
        describe("lbd --check --config /nonexistent/lb.toml", &out)
    );
}

// ---- 2-4. bad lbctl arguments, unknown things, duplicates ------------------------------------

/// An lbctl command that must fail, and what its stderr must say (compared in lower case).
struct Refused {
    args: &'static [&'static str],
    says: &'static [&'static str],
}

const fn refused(args: &'static [&'static str], says: &'static [&'static str]) -> Refused {
    Refused { args, says }
}

/// Bad arguments: lbctl's own parser refuses them, naming the value and pointing to `--help`.
const BAD_ARGUMENTS: &[Refused] = &[
    refused(&["frobnicate"], &["frobnicate", "--help"]),
    refused(
        &["backend", "add", "web", "not-an-ip"],
        &["not-an-ip", "--help"],
    ),
    refused(&["backend", "add", "web"], &["address", "--help"]),
    refused(
        &["backend", "weight", "web", "192.0.2.11", "abc"],
        &["abc", "--help"],
    ),
    refused(
        &["backend", "weight", "web", "192.0.2.11", "-1"],
        &["-1", "--help"],
    ),
    refused(
        &[
            "service",
            "add",
            "x",
            "--vip",
            "203.0.113.9",
            "--port",
            "99999",
            "--protocol",
            "tcp",
        ],
        &["99999", "--help"],
    ),
    refused(
        &[
            "service",
            "add",
            "x",
            "--vip",
            "203.0.113.9",
            "--port",
            "80",
            "--protocol",
            "sctp",
        ],
        &["sctp", "--help"],
    ),
    refused(
        &[
            "service",
            "add",
            "x",
            "--vip",
            "203.0.113",
            "--port",
            "80",
            "--protocol",
            "tcp",
        ],
        &["203.0.113", "--help"],
    ),
    refused(
        &[
            "service",
            "add",
            "x",
            "--vip",
            "203.0.113.9",
            "--port",
            "80",
            "--protocol",
            "tcp",
            "--forwarding",
            "gre",
        ],
        &["gre", "--help"],
    ),
    refused(
        &["lookup", "web", "198.51.100.1", "--port", "x"],
        &["--port", "--help"],
    ),
    refused(&["lookup", "web", "not-an-ip"], &["not-an-ip", "--help"]),
];

/// Arguments lbctl's parser takes but lbd refuses.
const BAD_VALUES: &[Refused] = &[
    // A dsr service cannot send a backend's packets to another port.
    refused(
        &["backend", "add", "web", "192.0.2.14", "--port", "8080"],
        &[
            "--port",
            "8080",
            "differs from the service's port 80",
            "nat",
        ],
    ),
    refused(
        &["backend", "weight", "web", "192.0.2.11", "2000000"],
        &["2000000", "maximum"],
    ),
    refused(
        &["backend", "add", "web", "192.0.2.14", "--weight", "2000000"],
        &["2000000", "maximum"],
    ),
    refused(&["backend", "weight", "web", "192.0.2.11", "0"], &["drain"]),
    refused(
        &[
            "service",
            "add",
            "bad!name",
            "--vip",
            "203.0.113.9",
            "--port",
            "80",
            "--protocol",
            "tcp",
        ],
        &["bad!name", "not a valid name"],
    ),
];

/// Unknown services and backends: the error names the missing thing.
const UNKNOWN: &[Refused] = &[
    refused(&["backend", "list", "nosuch"], &["nosuch"]),
    refused(&["--json", "backend", "list", "nosuch"], &["nosuch"]),
    refused(&["backend", "add", "nosuch", "192.0.2.14"], &["nosuch"]),
    refused(&["backend", "remove", "nosuch", "192.0.2.11"], &["nosuch"]),
    refused(&["backend", "remove", "web", "192.0.2.99"], &["192.0.2.99"]),
    refused(
        &["backend", "remove", "web", "192.0.2.99", "--dry-run"],
        &["192.0.2.99"],
    ),
    refused(&["backend", "drain", "web", "192.0.2.99"], &["192.0.2.99"]),
    refused(
        &["backend", "undrain", "web", "192.0.2.99"],
        &["192.0.2.99"],
    ),
    refused(
        &["backend", "weight", "web", "192.0.2.99", "50"],
        &["192.0.2.99"],
    ),
    refused(&["service", "remove", "nosuch"], &["nosuch"]),
    refused(&["lookup", "nosuch", "198.51.100.1"], &["nosuch"]),
    refused(&["stats", "nosuch"], &["nosuch"]),
];

/// Duplicates and the wrong address family.
const DUPLICATES: &[Refused] = &[
    refused(
        &["backend", "add", "web", "192.0.2.11"],
        &["192.0.2.11", "already"],
    ),
    refused(
        &[
            "service",
            "add",
            "web",
            "--vip",
            "203.0.113.20",
            "--port",
            "80",
            "--protocol",
            "tcp",
        ],
        &["web", "exists"],
    ),
    // Same VIP, port and protocol as web: the config validation refuses it.
    refused(
        &[
            "service",
            "add",
            "other",
            "--vip",
            "203.0.113.10",
            "--port",
            "80",
            "--protocol",
            "tcp",
        ],
        &["203.0.113.10", "already used", "web"],
    ),
    refused(
        &["backend", "undrain", "web", "192.0.2.11"],
        &["not drained"],
    ),
    refused(
        &["backend", "add", "web", "2001:db8::1"],
        &["2001:db8::1", "family"],
    ),
    refused(
        &["lookup", "web", "2001:db8::1"],
        &["2001:db8::1", "family"],
    ),
];

/// Runs every command of `cases`, each must fail as described and leave `before` as it was.
fn run_refused(
    t: &Topology,
    lbd: &Lbd,
    probes: &[IpAddr],
    before: &Snapshot,
    cases: &[Refused],
) -> Vec<String> {
    let mut failures = vec![];
    for c in cases {
        let what = format!("lbctl {}", c.args.join(" "));
        let out = lbd.lbctl(c.args).unwrap();
        if let Some(p) = judge_error(&what, &out, c.says) {
            failures.push(p);
        }
        assert_unchanged(t, lbd, probes, before, &what);
    }
    failures
}

#[test]
fn lbctl_refuses_bad_input_and_changes_nothing() {
    let t = topology();
    let lbd = start(&t);
    let probes = choose_probes(&t, &lbd);
    let before = snapshot(&t, &lbd, &probes);

    let mut failures = vec![];
    for cases in [BAD_ARGUMENTS, BAD_VALUES, UNKNOWN, DUPLICATES] {
        failures.extend(run_refused(&t, &lbd, &probes, &before, cases));
    }

    // A drain is refused the second time, and an undrain of a backend that is not drained.
    const DRAIN: &[&str] = &["backend", "drain", "web", "192.0.2.13"];
    let out = lbd.lbctl(DRAIN).unwrap();
    assert!(
        out.status.success(),
        "{}",
        describe("lbctl backend drain", &out)
    );
    let drained = snapshot(&t, &lbd, &probes);
    assert_ne!(
        drained.backends, before.backends,
        "the drain changed nothing"
    );
    failures.extend(run_refused(
        &t,
        &lbd,
        &probes,
        &drained,
        &[refused(DRAIN, &["192.0.2.13", "already drained"])],
    ));
    let out = lbd
        .lbctl(&["backend", "undrain", "web", "192.0.2.13"])
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        describe("lbctl backend undrain", &out)
    );
    assert_unchanged(&t, &lbd, &probes, &before, "drain, then undrain");
    failures.extend(run_refused(
        &t,
        &lbd,
        &probes,
        &before,
        &[refused(
            &["backend", "undrain", "web", "192.0.2.13"],
            &["192.0.2.13", "not drained"],
        )],
    ));
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn lbctl_service_names_only_ever_name_a_service() {
    // A service name ends up in a path segment or a query value of the API: whatever it
    // holds, it must only name a (here unknown) service. The case that changes the state
    // comes last.
    let t = topology();
    let lbd = start(&t);
    let probes = choose_probes(&t, &lbd);
    let before = snapshot(&t, &lbd, &probes);
    let failures = run_refused(
        &t,
        &lbd,
        &probes,
        &before,
        &[
            refused(&["service", "remove", "no such"], &["no such"]),
            refused(&["backend", "list", "no such"], &["no such"]),
            refused(&["stats", "nosuch&service=web"], &["nosuch"]),
            refused(&["backend", "list", "nosuch?service=web"], &["nosuch"]),
            refused(
                &["lookup", "nosuch&service=web", "198.51.100.1"],
                &["nosuch"],
            ),
            refused(
                &["service", "remove", "web/backends/192.0.2.11"],
                &["web/backends/192.0.2.11"],
            ),
        ],
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

// ---- 5. a non-root peer ---------------------------------------------------------------------

/// What a child running as nobody got from the control socket.
#[derive(Debug)]
enum AsNobody {
    /// Connected; the bytes the server sent back until it closed.
    Reply(Vec<u8>),
    /// connect(2) failed with this errno.
    ConnectFailed(i32),
}

/// Sends `request` to the unix socket `path` from a child process running as nobody (uid and
/// gid 65534; std's spawn drops the supplementary groups with them): `lb-unix-request`
/// (tests/src/bin), which connects, sends, reads the reply and prints what it got.
fn request_as_nobody(path: &Path, request: &[u8]) -> Result<AsNobody> {
    let hex: String = request.iter().map(|b| format!("{b:02x}")).collect();
    let out = Command::new(env!("CARGO_BIN_EXE_lb-unix-request"))
        .arg(path)
        .arg(hex)
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .context("running lb-unix-request as nobody")?;
    let stdout = text(&out.stdout);
    match stdout.trim().split_once(' ') {
        Some(("reply", bytes)) => Ok(AsNobody::Reply(
            (0..bytes.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&bytes[i..i + 2], 16))
                .collect::<Result<_, _>>()?,
        )),
        Some(("connect-failed", errno)) => Ok(AsNobody::ConnectFailed(errno.parse()?)),
        _ => bail!("{}", describe("lb-unix-request as nobody", &out)),
    }
}

/// Sets the socket's mode back to 0600 when dropped, also when a test fails.
struct RestoreMode<'a>(&'a Path);

impl Drop for RestoreMode<'_> {
    fn drop(&mut self) {
        let _ = std::fs::set_permissions(self.0, Permissions::from_mode(0o600));
    }
}

/// The real lbctl, run as nobody (uid and gid 65534, no supplementary groups).
fn lbctl_as_nobody(socket: &Path, args: &[&str]) -> Output {
    Command::new(bin("lbctl"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .expect("running lbctl as nobody")
}

/// The status code and the JSON body of a raw HTTP/1.1 reply.
fn parse_reply(raw: &[u8]) -> (u16, Value) {
    let s = text(raw);
    let code = s
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP reply: {s:?}"));
    let body = s.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    let json =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {s:?}"));
    (code, json)
}

#[test]
fn control_socket_refuses_non_root_peers() {
    let t = topology();
    let lbd = start(&t);
    let probes = choose_probes(&t, &lbd);
    let before = snapshot(&t, &lbd, &probes);
    let socket = lbd.paths.socket.clone();

    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o600, "the socket's mode");
    assert_eq!(meta.uid(), 0, "the socket's owner");

    let status = b"GET /v1/status HTTP/1.1\r\nhost: lbd\r\nconnection: close\r\n\r\n";
    let remove = b"DELETE /v1/services/web/backends/192.0.2.11 HTTP/1.1\r\nhost: lbd\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";

    // Mode 0600: the file permissions refuse the connection itself.
    match request_as_nobody(&socket, status).unwrap() {
        AsNobody::ConnectFailed(e) => assert_eq!(e, libc::EACCES, "connect as nobody at 0600"),
        AsNobody::Reply(r) => panic!("nobody connected to a 0600 socket: {}", text(&r)),
    }
    for args in [&["status"][..], &["backend", "remove", "web", "192.0.2.11"]] {
        let what = format!("lbctl {} as nobody, socket 0600", args.join(" "));
        let out = lbctl_as_nobody(&socket, args);
        if let Some(p) = judge_error(&what, &out, &["permission denied"]) {
            panic!("{p}");
        }
        assert_unchanged(&t, &lbd, &probes, &before, &what);
    }

    // Mode 0666: the connection is made, and lbd refuses the peer (SO_PEERCRED) with a 403.
    let _restore = RestoreMode(&socket);
    std::fs::set_permissions(&socket, Permissions::from_mode(0o666)).unwrap();
    for (name, request) in [
        ("GET /v1/status", &status[..]),
        ("DELETE a backend", &remove[..]),
    ] {
        let reply = match request_as_nobody(&socket, request).unwrap() {
            AsNobody::Reply(r) => r,
            AsNobody::ConnectFailed(e) => panic!(
                "{name} as nobody at 0666: connect failed: {}",
                std::io::Error::from_raw_os_error(e)
            ),
        };
        let (code, body) = parse_reply(&reply);
        assert_eq!(code, 403, "{name} as nobody: {}", text(&reply));
        let message = body["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{name} as nobody: no error message: {body}"))
            .to_lowercase();
        assert!(
            message.contains("root") && message.contains("permission"),
            "{name} as nobody: {message}"
        );
        assert_unchanged(&t, &lbd, &probes, &before, &format!("{name} as nobody"));
    }
    // lbctl is refused too (what it then says is the next test's business).
    for args in NON_ROOT_COMMANDS {
        let what = format!("lbctl {} as nobody, socket 0666", args.join(" "));
        let out = lbctl_as_nobody(&socket, args);
        if let Some(p) = judge_error(&what, &out, &[]) {
            panic!("{p}");
        }
        assert_unchanged(&t, &lbd, &probes, &before, &what);
    }

    drop(_restore);
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(
        meta.mode() & 0o7777,
        0o600,
        "the socket's mode once restored"
    );
    // Root is still served.
    let out = lbd.lbctl(&["status"]).unwrap();
    assert!(out.status.success(), "{}", describe("lbctl status", &out));
    assert_unchanged(&t, &lbd, &probes, &before, "the refused non-root peers");
}

/// What a non-root user tries through lbctl.
const NON_ROOT_COMMANDS: &[&[&str]] = &[
    &["status"],
    &["backend", "remove", "web", "192.0.2.11"],
    &["service", "remove", "web"],
];

#[test]
fn lbctl_as_non_root_reports_lbds_refusal() {
    let t = topology();
    let lbd = start(&t);
    let probes = choose_probes(&t, &lbd);
    let before = snapshot(&t, &lbd, &probes);
    let socket = lbd.paths.socket.clone();
    let _restore = RestoreMode(&socket);
    std::fs::set_permissions(&socket, Permissions::from_mode(0o666)).unwrap();
    let mut failures = vec![];
    for _ in 0..3 {
        for args in NON_ROOT_COMMANDS {
            let what = format!("lbctl {} as nobody, socket 0666", args.join(" "));
            let out = lbctl_as_nobody(&socket, args);
            failures.extend(judge_error(&what, &out, &["permission denied", "root"]));
            assert_unchanged(&t, &lbd, &probes, &before, &what);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

// ---- 6. no daemon -----------------------------------------------------------------------------

#[test]
fn lbctl_says_when_lbd_is_not_running() {
    let dir = TempDir::new("norun");
    let missing = dir.0.join("run/lbd.sock");
    let what = "lbctl --socket MISSING status";
    let out = lbctl_at(&missing, &["status"]).unwrap();
    if let Some(p) = judge_error(what, &out, &["not running"]) {
        panic!("{p}");
    }
    // The same through LB_SOCKET, for a change.
    let out = Command::new(bin("lbctl"))
        .env("LB_SOCKET", &missing)
        .args(["backend", "add", "web", "192.0.2.14"])
        .output()
        .unwrap();
    if let Some(p) = judge_error(
        "LB_SOCKET=MISSING lbctl backend add",
        &out,
        &["not running"],
    ) {
        panic!("{p}");
    }
    // A socket file left behind by a killed lbd: nobody listens.
    let stale = dir.0.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let out = lbctl_at(&stale, &["service", "list"]).unwrap();
    if let Some(p) = judge_error("lbctl --socket STALE service list", &out, &["not running"]) {
        panic!("{p}");
    }
}

// ---- a SIGHUP as soon as lbd is ready ----------------------------------------------------------

#[test]
fn sighup_as_soon_as_the_socket_appears_reloads() {
    let t = topology();
    let lbd = start(&t);
    lbd.stop().unwrap();
    for attempt in 1..=20 {
        // What a script does: wait for the socket (poll every 10 ms), then reload.
        let again = spawn_lbd(&t, &lbd.paths).unwrap();
        let start = Instant::now();
        while !again.paths.socket.exists() && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let logged = again.reload(Duration::from_secs(5));
        assert!(
            logged.is_ok() && t.is_running(again.handle),
            "start {attempt}: SIGHUP right after the socket appeared: {:?} ({:?}); log:\n{}",
            logged.err(),
            t.try_wait(again.handle),
            again.log()
        );
        again.stop().unwrap();
    }
}
