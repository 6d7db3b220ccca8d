//! `cargo xtask demo`: setup, build, then run the demo program of the test crate
//! (tests/src/bin/lb-demo.rs), which uses the namespace harness and the binaries just built.

use std::time::Instant;

use anyhow::{Result, bail};

use crate::build::{self, Profile};
use crate::{cmd, setup, workspace};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Leave the demo running and print how to use lbctl on it (Ctrl-C tears it down)
    #[arg(long)]
    pub keep: bool,
}

pub fn run(args: &DemoArgs) -> Result<()> {
    if !cmd::is_root() {
        bail!(
            "cargo xtask demo needs root: it attaches XDP programs and creates network namespaces; \
             run it as root (e.g. with sudo)"
        );
    }
    let start = Instant::now();
    cmd::phase("setup");
    setup::run()?;
    cmd::phase("build lbd, lbctl and the demo");
    let bin_dir = build::binaries(Profile::Debug)?;
    cmd::run(workspace::cargo().args(["build", "--bin", "lb-demo", "-p", "lb-tests"]))?;
    cmd::phase("demo");
    let mut demo = std::process::Command::new(bin_dir.join("lb-demo"));
    demo.env("LB_BIN_DIR", &bin_dir);
    if args.keep {
        demo.arg("--keep");
    }
    cmd::run(&mut demo)?;
    println!("demo: done ({})", cmd::secs(start.elapsed()));
    Ok(())
}
