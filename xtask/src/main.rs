//! `cargo xtask`: the project's own tasks (setup, build, test, demo).
//!
//! Every subcommand runs `setup` first, which installs only what the machine lacks, so a fresh
//! machine needs nothing but Rust (rustup with the stable and nightly toolchains) to start.

mod bench;
mod build;
mod cmd;
mod demo;
mod netns;
mod package;
mod setup;
mod test;
mod workspace;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Tasks of the lb project: setup, build, package, test, demo, bench"
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what this machine lacks (apt packages, rust-src, bpf-linker) and mount bpffs;
    /// takes seconds when everything is present
    Setup,
    /// Setup, then build the release binaries target/release/lbd and target/release/lbctl
    Build,
    /// Setup, release build, then the Debian package target/debian/lb_VERSION_ARCH.deb
    Package(package::PackageArgs),
    /// Setup, then run every test: unit, data-path and end-to-end (needs root)
    Test(test::TestArgs),
    /// Setup, build, and show lb balancing HTTP across namespaced backends (needs root)
    Demo(demo::DemoArgs),
    /// Setup, release builds, then every benchmark of BENCHMARKS.md (needs root)
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Setup => setup::run(),
        Task::Build => build::run(),
        Task::Package(args) => package::run(&args),
        Task::Test(args) => test::run(&args),
        Task::Demo(args) => demo::run(&args),
        Task::Bench(args) => bench::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            report(&error);
            ExitCode::FAILURE
        }
    }
}

/// Prints an error and its causes, one a line.
fn report(error: &anyhow::Error) {
    eprintln!("error: {error}");
    for cause in error.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
}
