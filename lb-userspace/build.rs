//! Builds the XDP programs (every bin of lb-ebpf) with nightly and build-std, and leaves the
//! objects in OUT_DIR for `include_bytes_aligned!`.
//!
//! aya-build prints everything the eBPF cargo says (its progress lines included) as
//! `cargo:warning=` lines, which cargo shows on every build. So this script runs aya-build in a
//! child process (itself again, with `LB_AYA_BUILD_CHILD` set), passes the child's cargo
//! instructions through and its warnings only when the build fails.
//!
//! OUT_DIR is published to the crates that depend on this one (the `links` key): the tests
//! crate's build script embeds the tests' own programs (`lb-testgen`) from it.
use std::process::{Command, ExitCode};

const CHILD: &str = "LB_AYA_BUILD_CHILD";

fn build() -> anyhow::Result<()> {
    // aya-build watches lb-ebpf; the program also compiles lb-common's shared logic.
    println!("cargo:rerun-if-changed=../lb-common/src");
    let package = aya_build::Package {
        name: "lb-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}

fn main() -> ExitCode {
    if std::env::var_os(CHILD).is_some() {
        return match build() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                println!("cargo:warning=building the eBPF programs: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    match parent() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lb-userspace build script: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn parent() -> anyhow::Result<ExitCode> {
    use anyhow::Context as _;
    let out_dir = std::env::var("OUT_DIR")?;
    let me = std::env::current_exe().context("finding the build script's own path")?;
    let out = Command::new(&me)
        .env(CHILD, "1")
        .output()
        .with_context(|| format!("running {}", me.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ok = out.status.success();
    for line in stdout.lines() {
        // AYA_BUILD_SKIP's notice is worth a warning: the objects are then empty.
        let noise = line.starts_with("cargo:warning=") && !line.contains("AYA_BUILD_SKIP");
        if ok && noise {
            continue;
        }
        println!("{line}");
    }
    if !ok {
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        println!(
            "cargo:warning=building the eBPF programs failed ({})",
            out.status
        );
        return Ok(ExitCode::FAILURE);
    }
    // With AYA_BUILD_SKIP=1 (quick host-only builds) there is no object: leave an empty one so
    // the crate still compiles; lbd then refuses to load it with a clear message. The same for
    // the backends' decapsulation program (`lbd decap`) and the tests' programs.
    for name in ["lb", "lb-decap", "lb-testgen"] {
        let object = std::path::Path::new(&out_dir).join(name);
        if !object.exists() {
            std::fs::write(&object, [])?;
        }
    }
    println!("cargo::metadata=out_dir={out_dir}");
    Ok(ExitCode::SUCCESS)
}
