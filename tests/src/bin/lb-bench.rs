//! The benchmark behind `cargo xtask bench`: runs every part of tests/src/bench in one run,
//! prints a markdown table and writes the figures as JSON. Needs root.
//! `lb-bench [--out FILE] [--repetitions N] [--quick] [--only PART]`.

use std::{path::PathBuf, process::ExitCode, time::Instant};

use anyhow::Context as _;
use lb_tests::bench::{self, Figure, Opts};

type Part = (&'static str, fn(&Opts) -> anyhow::Result<Vec<Figure>>);

/// The parts, in the order they run.
const PARTS: &[Part] = &[
    ("control", bench::control::run),
    ("memory", bench::memory::run),
    ("cost", bench::cost::run),
    ("clients", bench::rate::run_clients),
    ("alternating", bench::rate::run_alternating),
    ("rate", bench::rate::run),
    ("flood", bench::rate::run_flood),
    ("http", bench::http::run),
    ("nat", bench::nat::run),
];

fn main() -> ExitCode {
    lb_tests::require_root();
    let mut out = PathBuf::from("target/bench/results.json");
    let mut opts = Opts {
        repetitions: 5,
        bin_dir: lb_tests::lbd::bin("lbd").parent().unwrap().to_owned(),
        quick: false,
    };
    let mut only: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--out" => out = PathBuf::from(args.next().expect("--out FILE")),
            "--repetitions" => {
                opts.repetitions = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .expect("--repetitions N")
            }
            "--quick" => opts.quick = true,
            "--only" => only = args.next(),
            other => {
                eprintln!("lb-bench: unknown argument {other:?}");
                return ExitCode::FAILURE;
            }
        }
    }
    opts.repetitions = opts.repetitions.max(if opts.quick { 1 } else { 5 });
    let started = Instant::now();
    let mut figures = vec![];
    let mut failed = false;
    for (name, run) in PARTS {
        if only.as_deref().is_some_and(|o| o != *name) {
            continue;
        }
        eprintln!("bench: {name}");
        let t = Instant::now();
        match run(&opts) {
            Ok(f) => figures.extend(f),
            Err(e) => {
                failed = true;
                eprintln!("bench: {name} failed: {e:#}");
            }
        }
        eprintln!("bench: {name} took {:.1}s", t.elapsed().as_secs_f64());
    }
    println!("{}", bench::markdown(&figures));
    let write = || -> anyhow::Result<()> {
        if let Some(dir) = out.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&out, serde_json::to_string_pretty(&figures)?)
            .with_context(|| format!("writing {}", out.display()))
    };
    if let Err(e) = write() {
        eprintln!("bench: {e:#}");
        return ExitCode::FAILURE;
    }
    eprintln!(
        "bench: {} figures in {:.0}s, written to {}",
        figures.len(),
        started.elapsed().as_secs_f64(),
        out.display()
    );
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
