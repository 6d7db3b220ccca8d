//! `cargo xtask bench`: setup (with the benchmark's packages), release builds, then the
//! benchmark program of the test crate (tests/src/bin/lb-bench.rs), which prints a markdown
//! table and writes the figures as JSON.

use std::time::Instant;

use anyhow::{Result, bail};

use crate::build::{self, Profile};
use crate::{cmd, setup, workspace};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Shorter runs, to try the benchmark out (not for publishing figures)
    #[arg(long)]
    pub quick: bool,
    /// Run only this part
    #[arg(long, value_name = "PART")]
    pub only: Option<String>,
}

pub fn run(args: &BenchArgs) -> Result<()> {
    if !cmd::is_root() {
        bail!(
            "cargo xtask bench needs root: it attaches XDP programs and creates network namespaces; \
             run it as root (e.g. with sudo)"
        );
    }
    let start = Instant::now();
    cmd::phase("setup");
    setup::run_for_bench()?;
    cmd::phase("build lbd, lbctl and the benchmark (release)");
    let bin_dir = build::binaries(Profile::Release)?;
    cmd::run(workspace::cargo().args([
        "build",
        "--release",
        "--bin",
        "lb-bench",
        "-p",
        "lb-tests",
    ]))?;
    cmd::phase("bench");
    let out = workspace::target_dir()?.join("bench/results.json");
    let mut bench = std::process::Command::new(bin_dir.join("lb-bench"));
    bench.env("LB_BIN_DIR", &bin_dir).arg("--out").arg(&out);
    if args.quick {
        bench.arg("--quick");
    }
    if let Some(part) = &args.only {
        bench.arg("--only").arg(part);
    }
    cmd::run(&mut bench)?;
    println!(
        "bench: figures in {} ({})",
        out.display(),
        cmd::secs(start.elapsed())
    );
    Ok(())
}
