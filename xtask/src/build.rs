//! `cargo xtask build`, and the binary builds that `test` and `demo` share.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::{cmd, setup, workspace};

/// The binaries of lb-userspace; the eBPF object is embedded in `lbd` by its build script.
pub const BINARIES: [&str; 2] = ["lbd", "lbctl"];

#[derive(Clone, Copy)]
pub enum Profile {
    Debug,
    Release,
}

impl Profile {
    pub fn dir_name(self) -> &'static str {
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
    cmd::phase("man pages, shell completions and the systemd unit");
    let dist = dist(&dir)?;
    println!();
    for name in BINARIES {
        println!("build: {}", dir.join(name).display());
    }
    println!(
        "build: done ({}); the eBPF program is inside lbd, so these two files are all a host needs",
        cmd::secs(start.elapsed())
    );
    println!(
        "build: man pages, completions (bash, zsh, fish) and the systemd unit are in {}; docs/operations.md says where each goes",
        dist.display()
    );
    Ok(())
}

/// The shells completions are generated for.
const SHELLS: [&str; 3] = ["bash", "zsh", "fish"];

/// The file name of `name`'s completion script for `shell` (zsh needs `_NAME`).
pub fn completion_file(shell: &str, name: &str) -> String {
    match shell {
        "zsh" => format!("_{name}"),
        _ => format!("{name}.{shell}"),
    }
}

/// Files copied from packaging/ as they are.
const PACKAGING: [&str; 2] = ["lbd.service", "lb.sysusers.conf"];

/// Fills `BIN_DIR/dist` (emptied first) from the binaries in `bin_dir`: the man pages
/// `lbd.8`, `lbctl.8` and one per subcommand (`lbd --man-dir`, `lbctl man --dir`: `lbctl.8`
/// refers to `lbctl-backend(8)`, that one to `lbctl-backend-add(8)`, ...), completion scripts for bash, zsh and fish
/// (`lbd --completions SHELL`, `lbctl completions SHELL`), and packaging/'s systemd unit and
/// sysusers.d file. Prints each file and returns the folder.
pub fn dist(bin_dir: &Path) -> Result<PathBuf> {
    let dist = bin_dir.join("dist");
    if dist.exists() {
        std::fs::remove_dir_all(&dist)
            .with_context(|| format!("cannot empty {}", dist.display()))?;
    }
    std::fs::create_dir_all(&dist).with_context(|| format!("cannot create {}", dist.display()))?;
    let mut made = vec![];
    for name in BINARIES {
        let bin = bin_dir.join(name);
        let dir = dist.to_string_lossy().into_owned();
        let man_args: &[&str] = if name == "lbd" {
            &["--man-dir", &dir]
        } else {
            &["man", "--dir", &dir]
        };
        // Each page written, one a line.
        let pages = output_of(&bin, man_args)?;
        made.extend(pages.lines().map(PathBuf::from));
        for shell in SHELLS {
            let args: &[&str] = if name == "lbd" {
                &["--completions", shell]
            } else {
                &["completions", shell]
            };
            let script = output_of(&bin, args)?;
            made.push(write(
                &dist.join(completion_file(shell, name)),
                script.as_bytes(),
            )?);
        }
    }
    for file in PACKAGING {
        let from = crate::workspace::root().join("packaging").join(file);
        let to = dist.join(file);
        std::fs::copy(&from, &to)
            .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
        made.push(to);
    }
    for path in &made {
        println!("dist: {}", path.display());
    }
    Ok(dist)
}

/// What `bin ARGS` prints; fails (with its standard error) unless it exits 0 and prints something.
fn output_of(bin: &Path, args: &[&str]) -> Result<String> {
    let mut command = Command::new(bin);
    command.args(args);
    let text = cmd::stdout_of(&mut command)?;
    if text.trim().is_empty() {
        bail!("`{}` printed nothing", cmd::describe(&command));
    }
    Ok(text)
}

/// The man pages `dist` holds (`*.8`), sorted.
pub fn man_pages(dist: &Path) -> Result<Vec<PathBuf>> {
    let mut pages = vec![];
    for entry in
        std::fs::read_dir(dist).with_context(|| format!("cannot list {}", dist.display()))?
    {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "8") {
            pages.push(path);
        }
    }
    pages.sort();
    if pages.is_empty() {
        bail!("no man page in {}", dist.display());
    }
    Ok(pages)
}

fn write(path: &Path, contents: &[u8]) -> Result<PathBuf> {
    std::fs::write(path, contents).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path.to_owned())
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
