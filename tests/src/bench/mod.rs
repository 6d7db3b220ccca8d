//! `cargo xtask bench`: every measurement of BENCHMARKS.md, in one run so ratios compare. Each
//! part is a module with `run(&Opts) -> Result<Vec<Figure>>`; the `lb-bench` binary runs them
//! in order, prints a markdown table and writes the same figures as JSON.
//!
//! A benchmark reports figures; it never passes or fails on a wall-clock bound.

use serde::Serialize;

pub mod control;
pub mod cost;
pub mod http;
pub mod memory;
pub mod nat;
pub mod rate;

/// What every part gets.
#[derive(Debug, Clone)]
pub struct Opts {
    /// Repetitions per figure (each figure is the median of them); at least 5.
    pub repetitions: usize,
    /// Where the binaries under test are (lbd, lbctl).
    pub bin_dir: std::path::PathBuf,
    /// Shorter runs (for trying the benchmark out, not for publishing figures).
    pub quick: bool,
}

/// One reported figure: the median of its samples, with min and max.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// The part of BENCHMARKS.md it belongs to, e.g. "packet rate".
    pub section: String,
    /// What was measured, e.g. "lb dsr, 3 backends, UDP established".
    pub name: String,
    /// e.g. "Mpps", "ns/packet", "req/s", "ms", "bytes".
    pub unit: String,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub samples: Vec<f64>,
    /// Anything a reader needs to read the figure right (CPU sharing, counts, proofs).
    pub note: String,
}

impl Figure {
    /// A figure from its samples (median, min, max computed here).
    pub fn from_samples(
        section: &str,
        name: &str,
        unit: &str,
        samples: Vec<f64>,
        note: &str,
    ) -> Figure {
        let mut sorted = samples.clone();
        sorted.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        let median = if sorted.is_empty() {
            f64::NAN
        } else if sorted.len() % 2 == 1 {
            sorted[sorted.len() / 2]
        } else {
            (sorted[sorted.len() / 2 - 1] + sorted[sorted.len() / 2]) / 2.0
        };
        Figure {
            section: section.into(),
            name: name.into(),
            unit: unit.into(),
            median,
            min: sorted.first().copied().unwrap_or(f64::NAN),
            max: sorted.last().copied().unwrap_or(f64::NAN),
            samples,
            note: note.into(),
        }
    }

    /// A single derived value (a ratio of medians, a count): median = min = max.
    pub fn value(section: &str, name: &str, unit: &str, value: f64, note: &str) -> Figure {
        Figure::from_samples(section, name, unit, vec![value], note)
    }
}

/// The markdown table of `figures`, grouped by section in order of first appearance.
pub fn markdown(figures: &[Figure]) -> String {
    let mut out = String::new();
    let mut sections: Vec<&str> = vec![];
    for f in figures {
        if !sections.contains(&f.section.as_str()) {
            sections.push(&f.section);
        }
    }
    for s in sections {
        out.push_str(&format!("\n### {s}\n\n| measurement | median | min | max | unit | note |\n|---|---:|---:|---:|---|---|\n"));
        for f in figures.iter().filter(|f| f.section == s) {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                f.name,
                fmt(f.median),
                fmt(f.min),
                fmt(f.max),
                f.unit,
                f.note
            ));
        }
    }
    out
}

/// `n` with a comma every three digits: 1234567 → "1,234,567".
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn fmt(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_min_max() {
        let f = Figure::from_samples("s", "n", "u", vec![3.0, 1.0, 2.0, 5.0, 4.0], "");
        assert_eq!((f.median, f.min, f.max), (3.0, 1.0, 5.0));
        let f = Figure::from_samples("s", "n", "u", vec![4.0, 1.0], "");
        assert_eq!(f.median, 2.5);
        assert!(markdown(&[f]).contains("| n | 2.500 | 1.000 | 4.000 | u |  |"));
    }
}
