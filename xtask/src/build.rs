//! `cargo xtask build`, and the binary builds that `test` and `demo` share.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};

use crate::{cmd, setup, workspace};

/// The binaries of lb-userspace; the eBPF object is embedded in `lbd` by its build script.
pub const BINARIES: [&str; 2] = ["lbd", "lbctl"];

#[derive(Clone, Copy)]
pub enum Profile {
    Debug,
    Release,
}

impl Profile {
    fn dir_name(self) -> &'static str {
        match self {
            Profile::Debug => "debug",
            Profile::Release => "release",
        }
    }
}

pub fn run() -> Result<()> {
    let start = Instant::now();
    cmd::phase("setup");
    setup::run()?;
    cmd::phase("build lbd and lbctl (release)");
    let dir = binaries(Profile::Release)?;
    println!();
    for name in BINARIES {
        println!("build: {}", dir.join(name).display());
    }
    println!(
        "build: done ({}); the eBPF program is inside lbd, so these two files are all a host needs",
        cmd::secs(start.elapsed())
    );
    Ok(())
}

/// Builds `lbd` and `lbctl` and returns the absolute directory that holds them.
pub fn binaries(profile: Profile) -> Result<PathBuf> {
    let mut build = workspace::cargo();
    build.args(["build", "--bins", "-p", "lb-userspace"]);
    if let Profile::Release = profile {
        build.arg("--release");
    }
    cmd::run(&mut build)?;
    let dir = workspace::target_dir()?.join(profile.dir_name());
    for name in BINARIES {
        if !cmd::is_executable(&dir.join(name)) {
            bail!(
                "the build succeeded but {} is missing",
                dir.join(name).display()
            );
        }
    }
    Ok(dir)
}
