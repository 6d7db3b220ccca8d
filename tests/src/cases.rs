//! Data-path fixtures as data: a case is an input frame, what the program must do with it and
//! a description; one driver runs a table of them through BPF_PROG_TEST_RUN and reports every
//! case that deviates, not only the first. A deviating case's frames (input, what came out,
//! what was expected) are written as a pcap for Wireshark or tcpdump (`tcpdump -r FILE -e
//! -vv`), under target/test-pcaps/ (or `LB_TEST_PCAP_DIR`); the failure message names the file.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pcap_file::pcap::{PcapPacket, PcapWriter};

use crate::packet::verify;

pub const XDP_PASS: u32 = 2;

/// What a case expects of the program.
#[derive(Clone, Debug)]
pub enum Expect {
    /// XDP_PASS with the frame byte for byte as it came in.
    PassUnchanged,
    /// This action and exactly this frame, whose lengths and checksums must also verify
    /// (etherparse, `packet::verify`).
    Frame(u32, Vec<u8>),
}

/// One fixture: an input frame, what must become of it, and what it is.
#[derive(Clone, Debug)]
pub struct Case {
    pub description: String,
    pub input: Vec<u8>,
    pub expect: Expect,
}

impl Case {
    /// A frame that is not the program's: passed, unchanged.
    pub fn passes(description: impl Into<String>, input: impl Into<Vec<u8>>) -> Case {
        Case {
            description: description.into(),
            input: input.into(),
            expect: Expect::PassUnchanged,
        }
    }

    /// A frame the program must turn into `output` with `action`.
    pub fn gives(
        description: impl Into<String>,
        input: impl Into<Vec<u8>>,
        action: u32,
        output: impl Into<Vec<u8>>,
    ) -> Case {
        Case {
            description: description.into(),
            input: input.into(),
            expect: Expect::Frame(action, output.into()),
        }
    }
}

/// Where failing cases' pcaps go.
pub fn pcap_dir() -> PathBuf {
    std::env::var_os("LB_TEST_PCAP_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent();
            workspace
                .map_or_else(|| PathBuf::from("target"), |w| w.join("target"))
                .join("test-pcaps")
        })
}

/// Writes `frames` to `path` as a pcap (Ethernet), one a microsecond apart.
pub fn write_pcap(path: &Path, frames: &[&[u8]]) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut w = PcapWriter::new(File::create(path)?)?;
    for (i, f) in frames.iter().enumerate() {
        w.write_packet(&PcapPacket::new(
            Duration::from_micros(i as u64),
            f.len() as u32,
            f,
        ))?;
    }
    Ok(())
}

/// A file name's worth of `s`.
fn slug(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    out.truncate(60);
    out
}

/// What `case` got wrong, given the program's action and output, or None.
fn deviation(case: &Case, action: u32, out: &[u8]) -> Option<String> {
    let (want_action, want) = match &case.expect {
        Expect::PassUnchanged => (XDP_PASS, &case.input),
        Expect::Frame(a, f) => (*a, f),
    };
    if action != want_action {
        return Some(format!("action {action}, expected {want_action}"));
    }
    if out != &want[..] {
        let at = out.iter().zip(want.iter()).position(|(a, b)| a != b);
        return Some(match at {
            Some(i) => format!(
                "frame differs from byte {i} on ({} bytes, expected {})",
                out.len(),
                want.len()
            ),
            None => format!("{} bytes, expected {}", out.len(), want.len()),
        });
    }
    if let Expect::Frame(..) = case.expect
        && let Err(e) = verify(out)
    {
        return Some(format!("the output does not verify: {e}"));
    }
    None
}

/// Runs every case of `cases` through `run` (the program's action and output frame for an
/// input) and panics listing each deviating case, with the pcap written for it. `test` names
/// the table (the pcaps' folder).
pub fn run_cases(test: &str, cases: &[Case], run: impl Fn(&[u8]) -> (u32, Vec<u8>)) {
    run_cases_in(&pcap_dir(), test, cases, run)
}

fn run_cases_in(pcaps: &Path, test: &str, cases: &[Case], run: impl Fn(&[u8]) -> (u32, Vec<u8>)) {
    assert!(!cases.is_empty(), "{test}: no cases");
    let mut failures = vec![];
    for (i, case) in cases.iter().enumerate() {
        let (action, out) = run(&case.input);
        let Some(why) = deviation(case, action, &out) else {
            continue;
        };
        let path = pcaps
            .join(test)
            .join(format!("{i:03}-{}.pcap", slug(&case.description)));
        let want = match &case.expect {
            Expect::PassUnchanged => &case.input,
            Expect::Frame(_, f) => f,
        };
        let saved = match write_pcap(&path, &[&case.input, &out, want]) {
            Ok(()) => format!("input, output and expected frames in {}", path.display()),
            Err(e) => format!("writing {} failed: {e:#}", path.display()),
        };
        failures.push(format!("case {i} ({}): {why}; {saved}", case.description));
    }
    assert!(
        failures.is_empty(),
        "{test}: {} of {} cases deviate:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The driver reports a deviating case with its pcap, and the pcap holds the three frames.
    #[test]
    fn a_deviating_case_is_reported_with_its_pcap() {
        let dir = std::env::temp_dir().join(format!("lbt-cases-{}", std::process::id()));
        let frame = crate::packet::ipv4_udp(
            [2; 6],
            [4; 6],
            "198.51.100.1".parse().unwrap(),
            "203.0.113.10".parse().unwrap(),
            1,
            53,
            b"x",
        )
        .bytes;
        let case = Case::passes("a frame the fake program rewrites", frame.clone());
        let mut changed = frame.clone();
        changed[0] ^= 1;
        assert!(deviation(&case, XDP_PASS, &frame).is_none());
        let why = deviation(&case, XDP_PASS, &changed).expect("a changed frame deviates");
        assert!(why.contains("byte 0"), "{why}");
        assert!(deviation(&case, 3, &frame).unwrap().contains("action 3"));
        let path = dir.join("t.pcap");
        write_pcap(&path, &[&frame, &changed, &frame]).unwrap();
        let mut r = pcap_file::pcap::PcapReader::new(File::open(&path).unwrap()).unwrap();
        let mut got = vec![];
        while let Some(p) = r.next_packet() {
            got.push(p.unwrap().data.into_owned());
        }
        assert_eq!(got, vec![frame.clone(), changed.clone(), frame.clone()]);
        // Through the driver: the message names the pcap, which holds the case's frames.
        let fake = |f: &[u8]| {
            let mut out = f.to_vec();
            out[0] ^= 1;
            (XDP_PASS, out)
        };
        let cases = [case];
        let panic = std::panic::catch_unwind(|| run_cases_in(&dir, "driver", &cases, fake))
            .expect_err("a deviating case fails the table");
        let msg = panic.downcast_ref::<String>().expect("a message");
        let pcap = dir.join("driver/000-a-frame-the-fake-program-rewrites.pcap");
        assert!(msg.contains(&pcap.display().to_string()), "{msg}");
        assert!(pcap.exists(), "{msg}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
