//! Where the workspace and its build outputs are.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::cmd;

/// The XDP program's crate: a workspace member that builds only for the BPF target.
pub const EBPF_PACKAGE: &str = "lb-ebpf";

/// The workspace root (the parent of this crate).
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
}

/// The cargo that runs this xtask (so `cargo +toolchain xtask` keeps its toolchain).
pub fn cargo_program() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// A `cargo` command run in the workspace root.
pub fn cargo() -> Command {
    let mut command = Command::new(cargo_program());
    command.current_dir(root());
    command
}

/// The workspace's version (`[workspace.package] version`, lb-userspace's).
pub fn version() -> Result<String> {
    let metadata = metadata()?;
    metadata["packages"]
        .as_array()
        .and_then(|packages| {
            packages
                .iter()
                .find(|p| p["name"] == "lb-userspace")
                .and_then(|p| p["version"].as_str())
        })
        .map(str::to_owned)
        .context("`cargo metadata` gave no version for lb-userspace")
}

fn metadata() -> Result<serde_json::Value> {
    let mut command = cargo();
    command.args(["metadata", "--format-version", "1", "--no-deps"]);
    let json = cmd::stdout_of(&mut command)?;
    serde_json::from_str(&json).context("cannot parse `cargo metadata` output")
}

/// The absolute target directory, wherever CARGO_TARGET_DIR or a config file puts it.
pub fn target_dir() -> Result<PathBuf> {
    let metadata = metadata()?;
    let dir = metadata["target_directory"]
        .as_str()
        .context("`cargo metadata` gave no target_directory")?;
    Ok(PathBuf::from(dir))
}
