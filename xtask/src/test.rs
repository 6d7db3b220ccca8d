//! `cargo xtask test`: setup, the debug binaries the end-to-end tests start (and a Debian
//! package of them, `LB_DEB`, for tests/e2e/package.rs), then every test
//! of the workspace, and a check that the tests removed the namespaces they made.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::build::{self, Profile};
use crate::{cmd, netns, package, setup, workspace};

/// How long the output of cargo test may stay open after cargo test exits.
const RELAY_GRACE: Duration = Duration::from_secs(3);

#[derive(clap::Args)]
pub struct TestArgs {
    /// Arguments for `cargo test` itself, e.g. `--test forwarding` or `-p lb-common`
    #[arg(value_name = "CARGO_TEST_ARGS", allow_hyphen_values = true)]
    cargo_args: Vec<String>,
    /// Arguments for the test binaries, e.g. a test name filter, `--nocapture` or `--list`
    #[arg(value_name = "TEST_ARGS", last = true)]
    test_args: Vec<String>,
}

pub fn run(args: &TestArgs) -> Result<()> {
    require_root()?;
    let start = Instant::now();

    cmd::phase("[1/5] setup");
    setup::run()?;

    cmd::phase("[2/5] network namespaces before the tests");
    let before = netns::list()?;
    report_existing(&before);

    cmd::phase(
        "[3/5] build lbd and lbctl (debug) and their Debian package for the end-to-end tests",
    );
    let bin_dir = build::binaries(Profile::Debug)?;
    let deb = package::make(&bin_dir, Profile::Debug)?;

    cmd::phase("[4/5] cargo test");
    let tests = cargo_test(args, &bin_dir, &deb)?;

    cmd::phase("[5/5] network namespaces the tests left behind");
    let leftovers = remove_leftovers(&before)?;

    conclude(&tests, &leftovers, start)
}

fn require_root() -> Result<()> {
    if cmd::is_root() {
        return Ok(());
    }
    bail!(
        "cargo xtask test needs root: it attaches XDP programs and creates network namespaces; \
         run it as root (e.g. with sudo)"
    )
}

fn report_existing(names: &BTreeSet<String>) {
    if names.is_empty() {
        println!("test: no `{}*` namespaces", netns::PREFIX);
        return;
    }
    println!(
        "test: found {}, from an interrupted or a concurrent run: {}",
        count(names.len(), &format!("`{}*` namespace", netns::PREFIX)),
        join(names)
    );
    println!(
        "test: leaving them alone; with no test running, remove them with `ip netns delete NAME`"
    );
}

// ---- cargo test ----

struct TestRun {
    shown: String,
    status: ExitStatus,
    totals: Option<Totals>,
}

fn cargo_test(args: &TestArgs, bin_dir: &Path, deb: &Path) -> Result<TestRun> {
    let mut test = cargo_test_command(args, bin_dir);
    test.env("LB_DEB", deb);
    let shown = cmd::describe(&test);
    println!(
        "$ LB_BIN_DIR={} LB_DEB={} {shown}",
        bin_dir.display(),
        deb.display()
    );
    let mut child = test
        .spawn()
        .with_context(|| format!("could not start `{shown}`"))?;
    let stdout = child
        .stdout
        .take()
        .context("cargo test's stdout was not piped")?;
    let totals = Arc::new(Mutex::new(None));
    let relay = {
        let totals = Arc::clone(&totals);
        thread::spawn(move || relay_and_count(stdout, std::io::stdout(), &totals))
    };
    let status = child
        .wait()
        .with_context(|| format!("lost track of `{shown}`"))?;
    wait_for_relay(relay);
    let totals = totals.lock().unwrap_or_else(PoisonError::into_inner).take();
    Ok(TestRun {
        shown,
        status,
        totals,
    })
}

/// Lets the relay finish what cargo test printed; but a process the tests leaked (a daemon
/// that inherited the output) keeps the pipe open for ever, and must not hang the run.
fn wait_for_relay(relay: JoinHandle<Result<()>>) {
    let deadline = Instant::now() + RELAY_GRACE;
    while !relay.is_finished() {
        if Instant::now() > deadline {
            println!(
                "test: warning: a process the tests started still holds their output open \
                 (a leaked daemon?); not waiting for it"
            );
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    match relay.join() {
        Ok(Ok(())) => {}
        Ok(Err(error)) => println!("test: warning: {error:#}"),
        Err(_) => println!("test: warning: relaying cargo test's output failed"),
    }
}

/// `cargo test` over the workspace, its standard output piped (to count results).
fn cargo_test_command(args: &TestArgs, bin_dir: &Path) -> Command {
    let mut test = workspace::cargo();
    test.arg("test");
    if !selects_packages(&args.cargo_args) {
        // `--workspace` overrides default-members, which leaves the eBPF crate out because it
        // builds only for the BPF target (lb-userspace's build script builds it).
        test.args(["--workspace", "--exclude", workspace::EBPF_PACKAGE]);
    }
    test.arg("--no-fail-fast").args(&args.cargo_args);
    if !args.test_args.is_empty() {
        test.arg("--").args(&args.test_args);
    }
    test.env("LB_BIN_DIR", bin_dir).stdout(Stdio::piped());
    test
}

/// Whether cargo test arguments name packages, which `--workspace` would contradict.
fn selects_packages(cargo_args: &[String]) -> bool {
    cargo_args
        .iter()
        .any(|arg| arg == "--package" || arg.starts_with("--package=") || arg.starts_with("-p"))
}

/// Copies cargo test's output to ours as it comes (partial lines too, so a slow test shows
/// its name while it runs) and adds up its "test result:" lines into `totals`.
fn relay_and_count(
    mut from: impl Read,
    mut to: impl Write,
    totals: &Mutex<Option<Totals>>,
) -> Result<()> {
    let mut line = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let read = from
            .read(&mut chunk)
            .context("cannot read cargo test's output")?;
        if read == 0 {
            break;
        }
        to.write_all(&chunk[..read])?;
        to.flush()?;
        for &byte in &chunk[..read] {
            if byte != b'\n' {
                line.push(byte);
                continue;
            }
            if let Some(result) = Totals::parse(&String::from_utf8_lossy(&line)) {
                let mut totals = totals.lock().unwrap_or_else(PoisonError::into_inner);
                totals.get_or_insert_with(Totals::default).add(&result);
            }
            line.clear();
        }
    }
    Ok(())
}

/// Test counts, from one "test result:" line or added up over all of them.
#[derive(Default, Debug, PartialEq)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Totals {
    /// Reads "test result: ok. 5 passed; 0 failed; 1 ignored; 0 measured; ...".
    fn parse(line: &str) -> Option<Totals> {
        let rest = line.trim().strip_prefix("test result: ")?;
        let (_verdict, counts) = rest.split_once(". ")?;
        let mut totals = Totals::default();
        for part in counts.split(';') {
            let mut words = part.split_whitespace();
            let (Some(number), Some(what)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(number) = number.parse::<u64>() else {
                continue;
            };
            match what {
                "passed" => totals.passed = number,
                "failed" => totals.failed = number,
                "ignored" => totals.ignored = number,
                _ => {}
            }
        }
        Some(totals)
    }

    fn add(&mut self, other: &Totals) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.ignored += other.ignored;
    }
}

// ---- namespaces left behind ----

/// Deletes the harness namespaces that appeared during the run, and returns their names.
fn remove_leftovers(before: &BTreeSet<String>) -> Result<BTreeSet<String>> {
    // A namespace named after a process that still runs belongs to a concurrent run (another
    // checkout's tests): its own harness removes it. Ours are named after test processes that
    // have all exited by now.
    let (concurrent, leftovers): (BTreeSet<String>, BTreeSet<String>) = netns::list()?
        .difference(before)
        .cloned()
        .partition(|name| netns::owner_runs(name));
    if !concurrent.is_empty() {
        println!(
            "test: leaving alone {} of running processes (a concurrent run): {}",
            count(concurrent.len(), "namespace"),
            join(&concurrent)
        );
    }
    if leftovers.is_empty() {
        println!("test: none: every namespace the tests made is gone");
    }
    for name in &leftovers {
        let pids = netns::pids(name);
        if pids.is_empty() {
            println!("test: left behind: {name}");
        } else {
            println!(
                "test: left behind: {name}, with processes still in it: {}",
                pids.join(" ")
            );
        }
        if let Err(error) = netns::delete(name) {
            println!("test: warning: {error:#}");
        }
    }
    Ok(leftovers)
}

// ---- the verdict ----

fn conclude(tests: &TestRun, leftovers: &BTreeSet<String>, start: Instant) -> Result<()> {
    let mut problems = Vec::new();
    if let Err(error) = cmd::check(&tests.shown, tests.status) {
        problems.push(format!("tests failed: {error}"));
    }
    if !leftovers.is_empty() {
        problems.push(format!(
            "the tests left {} behind (a teardown bug; deleted now): {}",
            count(leftovers.len(), "network namespace"),
            join(leftovers)
        ));
    }
    let verdict = if problems.is_empty() {
        "passed"
    } else {
        "FAILED"
    };
    println!("\ntest: {verdict} in {}", cmd::secs(start.elapsed()));
    if let Some(totals) = &tests.totals {
        println!(
            "tests: {} passed, {} failed, {} skipped",
            totals.passed, totals.failed, totals.ignored
        );
    }
    if problems.is_empty() {
        Ok(())
    } else {
        bail!("{}", problems.join("; "))
    }
}

/// "1 namespace", "2 namespaces".
fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

fn join(names: &BTreeSet<String>) -> String {
    names
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_result_line() {
        let line = "test result: FAILED. 5 passed; 2 failed; 1 ignored; 0 measured; \
                    3 filtered out; finished in 0.52s";
        let totals = Totals::parse(line).unwrap();
        assert_eq!(
            totals,
            Totals {
                passed: 5,
                failed: 2,
                ignored: 1
            }
        );
        assert_eq!(Totals::parse("test foo ... ok"), None);
    }

    #[test]
    fn relays_and_adds_up() {
        let output = "running 2 tests\ntest a ... ok\n\
                      test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s\n\
                      test result: FAILED. 1 passed; 1 failed; 3 ignored; 0 measured; 0 filtered out; finished in 0.00s\n";
        let mut relayed = Vec::new();
        let totals = Mutex::new(None);
        relay_and_count(output.as_bytes(), &mut relayed, &totals).unwrap();
        assert_eq!(relayed, output.as_bytes());
        let totals = totals.into_inner().unwrap().unwrap();
        assert_eq!(
            totals,
            Totals {
                passed: 3,
                failed: 1,
                ignored: 3
            }
        );
        let none = Mutex::new(None);
        relay_and_count("no results\n".as_bytes(), std::io::sink(), &none).unwrap();
        assert_eq!(none.into_inner().unwrap(), None);
    }

    fn command_for(argv: &[&str]) -> String {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: TestArgs,
        }
        let cli = Cli::try_parse_from(std::iter::once("test").chain(argv.iter().copied())).unwrap();
        let command = cargo_test_command(&cli.args, Path::new("/t/debug"));
        let lb_bin_dir = command.get_envs().find(|(key, _)| *key == "LB_BIN_DIR");
        assert_eq!(lb_bin_dir.unwrap().1.unwrap(), "/t/debug");
        let shown = cmd::describe(&command);
        shown.split_once(" test ").unwrap().1.to_owned()
    }

    #[test]
    fn passes_arguments_through() {
        assert_eq!(
            command_for(&[]),
            "--workspace --exclude lb-ebpf --no-fail-fast"
        );
        assert_eq!(
            command_for(&["--", "forwarding"]),
            "--workspace --exclude lb-ebpf --no-fail-fast -- forwarding"
        );
        assert_eq!(
            command_for(&["--", "--list"]),
            "--workspace --exclude lb-ebpf --no-fail-fast -- --list"
        );
        assert_eq!(
            command_for(&["--test", "forwarding", "--", "--nocapture", "x"]),
            "--workspace --exclude lb-ebpf --no-fail-fast --test forwarding -- --nocapture x"
        );
        assert_eq!(
            command_for(&["-p", "lb-common"]),
            "--no-fail-fast -p lb-common"
        );
    }

    #[test]
    fn package_selection() {
        let args = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(selects_packages(&args(&["-p", "lb-common"])));
        assert!(selects_packages(&args(&["-plb-common"])));
        assert!(selects_packages(&args(&["--package=lb-common"])));
        assert!(!selects_packages(&args(&["--test", "forwarding"])));
    }
}
