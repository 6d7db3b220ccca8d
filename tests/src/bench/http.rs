//! Benchmark part `http` (see BENCHMARKS.md). Not written yet.

use super::{Figure, Opts};

pub fn run(_opts: &Opts) -> anyhow::Result<Vec<Figure>> {
    Ok(vec![])
}
