//! The Debian package (`cargo xtask package`), installed on this machine and removed again: what
//! it installs and where, the unit as `systemd-analyze verify` sees it with the man pages man(1)
//! finds, the example config that `lbd --check` passes (also as the user `lb`, as the unit
//! runs it) and that refuses to start without touching an interface, the conffile kept by
//! `dpkg -r` and removed by `dpkg -P`, and no stray file left behind.
//!
//! `cargo xtask test` builds the package from the debug binaries and names it in `LB_DEB`.
//! Needs root and dpkg; refuses to run (fails) when an `lb` package it did not install is
//! present, or anything the package's scripts would touch already exists (/etc/lb,
//! /var/lib/lb, /sys/fs/bpf/lb, a unit named lbd.service): its purge would remove them.

use std::{
    collections::BTreeSet,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Command, Output},
};

use lb_tests::require_root;

/// What the package's scripts would create or remove: none may exist before the test.
const OWNED: &[&str] = &[
    "/etc/lb",
    "/var/lib/lb",
    "/sys/fs/bpf/lb",
    "/lib/systemd/system/lbd.service",
    "/etc/systemd/system/lbd.service",
    "/usr/sbin/lbd",
    "/usr/sbin/lbctl",
];

/// Folders whose listings must be the same before the install and after the purge: every
/// place the package puts a file, dpkg's records of it, and what lbd and its scripts create.
/// (Recursively, except where noted.)
const WATCHED: &[(&str, bool)] = &[
    ("/etc/lb", true),
    ("/etc/systemd/system", true),
    ("/lib/systemd/system", false),
    ("/usr/lib/sysusers.d", false),
    ("/usr/sbin", false),
    ("/usr/bin", false),
    ("/usr/share/man/man8", false),
    ("/usr/share/bash-completion/completions", false),
    ("/usr/share/zsh/vendor-completions", false),
    ("/usr/share/fish/vendor_completions.d", false),
    ("/usr/share/doc", false),
    ("/var/lib", false),
    ("/var/lib/dpkg/info", false),
];

/// Folders other tests change while this one runs (their pins, their namespaces): only the
/// entries named like lb's own (/run/lb, /sys/fs/bpf/lb) are watched there.
const SHARED: &[&str] = &["/run", "/sys/fs/bpf"];

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e} (is it installed?)"))
}

/// Runs and fails the test unless it exits 0; returns standard output.
fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "`{program} {}` failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// dpkg's status of the package `lb`, e.g. "install ok installed"; None when dpkg knows
/// nothing of it.
fn status() -> Option<String> {
    let out = run("dpkg-query", &["-W", "-f=${Status}", "lb"]);
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && !text.is_empty() && !text.ends_with("not-installed")).then_some(text)
}

fn user_exists(name: &str) -> bool {
    run("getent", &["passwd", name]).status.success()
}

/// Every path under the watched folders.
fn listing() -> BTreeSet<PathBuf> {
    fn walk(dir: &Path, deep: bool, out: &mut BTreeSet<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            out.insert(path.clone());
            if deep && is_dir {
                walk(&path, deep, out);
            }
        }
    }
    let mut out = BTreeSet::new();
    for (dir, deep) in WATCHED {
        walk(Path::new(dir), *deep, &mut out);
    }
    for dir in SHARED {
        let lb = Path::new(dir).join("lb");
        if lb.exists() {
            out.insert(lb.clone());
            walk(&lb, true, &mut out);
        }
    }
    out
}

/// Puts the machine back if the test stops half-way: the package purged, what its scripts
/// made removed, the user `lb` deleted if the test made it.
struct Cleanup {
    made_user: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if status().is_some() {
            let _ = run("dpkg", &["--purge", "lb"]);
        }
        for path in ["/etc/lb", "/var/lib/lb", "/run/lb"] {
            let _ = std::fs::remove_dir_all(path);
        }
        // Pins of an lbd started with the example config (none are made, but a failure
        // elsewhere could leave its folder).
        let _ = std::fs::remove_dir_all("/sys/fs/bpf/lb");
        if self.made_user && user_exists("lb") {
            let _ = run("userdel", &["lb"]);
            let _ = run("groupdel", &["lb"]);
        }
    }
}

fn the_package() -> PathBuf {
    let deb = std::env::var_os("LB_DEB").map(PathBuf::from).unwrap_or_else(|| {
        panic!(
            "LB_DEB is not set: run this test through `cargo xtask test -p lb-tests --test package`, \
             which builds the package, or set LB_DEB to a package made by `cargo xtask package`"
        )
    });
    assert!(deb.is_file(), "LB_DEB={} is no file", deb.display());
    deb
}

/// The (NAME) of every `NAME(8)` reference in a man page's roff, e.g. `lbctl-backend-add`.
fn references(roff: &str) -> BTreeSet<String> {
    let text = roff.replace("\\-", "-");
    let mut names = BTreeSet::new();
    for (at, _) in text.match_indices("(8)") {
        let name: String = text[..at]
            .chars()
            .rev()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        if name.starts_with("lb") {
            names.insert(name);
        }
    }
    names
}

fn zcat(path: &str) -> String {
    run_ok("gzip", &["-dc", path])
}

fn mode_and_owner(path: &str) -> (u32, String) {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let owner = run_ok("id", &["-nu", &meta.uid().to_string()]);
    (meta.permissions().mode() & 0o7777, owner.trim().to_owned())
}

#[test]
fn the_package_installs_verifies_and_goes_without_a_trace() {
    require_root();
    for tool in [
        "dpkg",
        "dpkg-query",
        "systemd-analyze",
        "man",
        "readelf",
        "setpriv",
    ] {
        assert!(
            run("sh", &["-c", &format!("command -v {tool}")])
                .status
                .success(),
            "`{tool}` is missing: this test needs dpkg, systemd, man-db, binutils and util-linux (`cargo xtask setup` installs them)"
        );
    }
    let deb = the_package();
    if let Some(st) = status() {
        panic!(
            "an lb package is already installed here ({st}): this test installs and purges its \
             own, which would remove that one and its configuration. Remove it first \
             (dpkg --purge lb) or run the test elsewhere."
        );
    }
    for path in OWNED {
        assert!(
            std::fs::symlink_metadata(path).is_err(),
            "{path} exists: the package's purge would remove it (or its lbd --cleanup detach \
             what it pins). Move it away before running this test."
        );
    }
    let _cleanup = Cleanup {
        made_user: !user_exists("lb"),
    };
    let before = listing();

    // Install.
    let out = run_ok("dpkg", &["--install", &deb.display().to_string()]);
    eprintln!("dpkg --install:\n{out}");
    assert_eq!(status().as_deref(), Some("install ok installed"));

    // What is where.
    for (path, mode) in [
        ("/usr/sbin/lbd", 0o755),
        ("/usr/sbin/lbctl", 0o755),
        ("/lib/systemd/system/lbd.service", 0o644),
        ("/usr/lib/sysusers.d/lb.conf", 0o644),
        ("/usr/share/man/man8/lbd.8.gz", 0o644),
        ("/usr/share/man/man8/lbctl.8.gz", 0o644),
        ("/usr/share/bash-completion/completions/lbd", 0o644),
        ("/usr/share/bash-completion/completions/lbctl", 0o644),
        ("/usr/share/zsh/vendor-completions/_lbd", 0o644),
        ("/usr/share/zsh/vendor-completions/_lbctl", 0o644),
        ("/usr/share/fish/vendor_completions.d/lbd.fish", 0o644),
        ("/usr/share/fish/vendor_completions.d/lbctl.fish", 0o644),
        ("/usr/share/doc/lb/copyright", 0o644),
        ("/usr/share/doc/lb/README.md.gz", 0o644),
        ("/usr/share/doc/lb/changelog.gz", 0o644),
    ] {
        let (m, owner) = mode_and_owner(path);
        assert_eq!((m, owner.as_str()), (mode, "root"), "{path}");
    }
    let version = run_ok("/usr/sbin/lbd", &["--version"]);
    assert!(version.starts_with("lbd "), "{version}");
    for bin in ["/usr/sbin/lbd", "/usr/sbin/lbctl"] {
        let sections = run_ok("readelf", &["-S", "-W", bin]);
        for section in [".symtab", ".debug_info"] {
            assert!(
                !sections.contains(section),
                "{bin} is not stripped: it has {section}"
            );
        }
    }
    let unit = std::fs::read_to_string("/lib/systemd/system/lbd.service").unwrap();
    assert_eq!(
        unit.lines()
            .filter(|l| l.starts_with("ExecStart="))
            .collect::<Vec<_>>(),
        ["ExecStart=/usr/sbin/lbd --config /etc/lb/lb.toml"]
    );
    // Not enabled: nothing links to the unit.
    assert!(
        !Path::new("/etc/systemd/system/multi-user.target.wants/lbd.service").exists(),
        "the package enabled lbd.service"
    );

    // Man pages: man(1) finds lbd(8) and lbctl(8) (as systemd-analyze will), and every page a
    // page refers to is there.
    for name in ["lbd", "lbctl"] {
        let found = run_ok("man", &["-w", &format!("{name}.8")]);
        assert_eq!(
            found.trim(),
            format!("/usr/share/man/man8/{name}.8.gz"),
            "man -w {name}.8"
        );
    }
    let mut pages = BTreeSet::new();
    let mut referenced = BTreeSet::new();
    for entry in std::fs::read_dir("/usr/share/man/man8").unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if let Some(page) = name
            .strip_suffix(".8.gz")
            .filter(|n| n.starts_with("lbd") || n.starts_with("lbctl"))
        {
            pages.insert(page.to_owned());
            referenced.extend(references(&zcat(&path.display().to_string())));
        }
    }
    for page in [
        "lbd-decap",
        "lbctl-backend",
        "lbctl-backend-add",
        "lbctl-node-check",
    ] {
        assert!(pages.contains(page), "no {page}(8): {pages:?}");
    }
    let dangling: Vec<_> = referenced.difference(&pages).collect();
    assert!(
        dangling.is_empty(),
        "pages referred to but not installed: {dangling:?}"
    );
    // Completions name the commands they complete.
    let bash = std::fs::read_to_string("/usr/share/bash-completion/completions/lbctl").unwrap();
    assert!(
        bash.contains("complete") && bash.contains("lbctl"),
        "{bash}"
    );

    // The user lb and its config folder.
    assert!(user_exists("lb"), "postinst did not create the user lb");
    assert_eq!(mode_and_owner("/etc/lb"), (0o750, "lb".to_owned()));
    assert_eq!(mode_and_owner("/etc/lb/lb.toml"), (0o640, "lb".to_owned()));

    // The unit, as systemd sees it (the man pages of its Documentation= looked up by man).
    let out = run(
        "systemd-analyze",
        &["verify", "/lib/systemd/system/lbd.service"],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.trim().is_empty(),
        "systemd-analyze verify /lib/systemd/system/lbd.service ({}):\n{text}",
        out.status
    );

    // The example config passes the check, as root and as the user the unit runs lbd as.
    let summary = run_ok("/usr/sbin/lbd", &["--check", "--config", "/etc/lb/lb.toml"]);
    assert!(summary.starts_with("config OK"), "{summary}");
    let as_lb = run_ok(
        "setpriv",
        &[
            "--reuid=lb",
            "--regid=lb",
            "--clear-groups",
            "/usr/sbin/lbd",
            "--check",
            "--config",
            "/etc/lb/lb.toml",
        ],
    );
    assert!(as_lb.starts_with("config OK"), "{as_lb}");
    // Every key it shows commented out is valid once uncommented.
    let example = std::fs::read_to_string("/etc/lb/lb.toml").unwrap();
    let full: String = example
        .lines()
        .filter_map(|l| {
            let l = l.strip_prefix("# ").unwrap_or(l);
            let key = l.split('=').next().unwrap_or("").trim();
            let is_key = !key.is_empty()
                && l.contains('=')
                && key.chars().all(|c| c.is_ascii_lowercase() || c == '_');
            (l.starts_with('[') || is_key).then(|| l.replace("EDIT-ME", "eth0") + "\n")
        })
        .collect();
    let full_path =
        std::env::temp_dir().join(format!("lb-package-example-{}.toml", std::process::id()));
    std::fs::write(&full_path, &full).unwrap();
    let checked = run(
        "/usr/sbin/lbd",
        &["--check", "--config", &full_path.display().to_string()],
    );
    let _ = std::fs::remove_file(&full_path);
    assert!(
        checked.status.success()
            && String::from_utf8_lossy(&checked.stdout).contains("1 service(s), 2 backend(s)"),
        "the example with its commented keys uncommented:\n{full}\n{checked:?}"
    );

    // Started as is, lbd probes the kernel, then refuses the example's interface, attaching
    // nothing.
    let started = run("/usr/sbin/lbd", &["--config", "/etc/lb/lb.toml"]);
    let log = String::from_utf8_lossy(&started.stderr);
    assert_eq!(started.status.code(), Some(1), "{log}");
    assert!(
        log.contains("every BPF and XDP feature lb uses is there"),
        "no kernel check in lbd's log:\n{log}"
    );
    assert!(
        log.contains("there is no interface \"EDIT-ME\""),
        "lbd should refuse the example's interface:\n{log}"
    );
    let links = run_ok("ip", &["-d", "link", "show"]);
    assert!(
        !links.contains("lb_xdp"),
        "an XDP program of lb is attached:\n{links}"
    );

    // An edited conffile (as lbctl writes it: a new file renamed over the old one) survives
    // an upgrade (here a reinstall: prerm upgrade, postinst configure with the old version),
    // and stays lb's.
    let edited = format!("{example}# edited by the package test\n");
    std::fs::write("/etc/lb/lb.toml.new", &edited).unwrap();
    std::fs::rename("/etc/lb/lb.toml.new", "/etc/lb/lb.toml").unwrap();
    let out = run_ok(
        "dpkg",
        &["--force-confold", "--install", &deb.display().to_string()],
    );
    eprintln!("dpkg --install (again):\n{out}");
    assert_eq!(status().as_deref(), Some("install ok installed"));
    assert_eq!(
        std::fs::read_to_string("/etc/lb/lb.toml").ok().as_deref(),
        Some(edited.as_str()),
        "a reinstall should keep the edited /etc/lb/lb.toml"
    );
    assert_eq!(mode_and_owner("/etc/lb/lb.toml"), (0o640, "lb".to_owned()));

    // Remove: the edited conffile stays, everything else goes.
    let out = run_ok("dpkg", &["--remove", "lb"]);
    eprintln!("dpkg --remove:\n{out}");
    assert_eq!(status().as_deref(), Some("deinstall ok config-files"));
    assert_eq!(
        std::fs::read_to_string("/etc/lb/lb.toml").ok().as_deref(),
        Some(edited.as_str()),
        "dpkg --remove should keep the edited /etc/lb/lb.toml"
    );
    for path in [
        "/usr/sbin/lbd",
        "/usr/sbin/lbctl",
        "/lib/systemd/system/lbd.service",
    ] {
        assert!(
            !Path::new(path).exists(),
            "{path} is still there after dpkg --remove"
        );
    }
    assert!(
        !Path::new("/sys/fs/bpf/lb").exists(),
        "prerm's lbd --cleanup left /sys/fs/bpf/lb"
    );

    // Purge: the conffile and lbd's state go too, and nothing is left.
    let out = run_ok("dpkg", &["--purge", "lb"]);
    eprintln!("dpkg --purge:\n{out}");
    assert_eq!(status(), None);
    for path in ["/etc/lb", "/var/lib/lb"] {
        assert!(
            !Path::new(path).exists(),
            "{path} is still there after dpkg --purge"
        );
    }
    let after = listing();
    let left: Vec<_> = after.difference(&before).collect();
    let lost: Vec<_> = before.difference(&after).collect();
    assert!(
        left.is_empty() && lost.is_empty(),
        "install, remove and purge changed the system: left behind {left:?}, gone {lost:?}"
    );
}

#[test]
fn references_are_read_from_roff() {
    let roff = ".TP\nlbctl\\-backend\\-add(8)\nAdd\n.TP\nlbd\\-decap(8)\nsee systemd(1) and man(8)";
    assert_eq!(
        references(roff).into_iter().collect::<Vec<_>>(),
        ["lbctl-backend-add", "lbd-decap"]
    );
}
