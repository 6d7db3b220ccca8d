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
fn completion_file(shell: &str, name: &str) -> String {
    match shell {
        "zsh" => format!("_{name}"),
        _ => format!("{name}.{shell}"),
    }
}

/// Files copied from packaging/ as they are.
const PACKAGING: [&str; 2] = ["lbd.service", "lb.sysusers.conf"];

/// Fills `BIN_DIR/dist` (emptied first) from the binaries in `bin_dir`: the man pages
/// `lbd.8` and `lbctl.8` (`lbd --man`, `lbctl man`), completion scripts for bash, zsh and fish
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
        let man_args: &[&str] = if name == "lbd" { &["--man"] } else { &["man"] };
        let page = man_section_8(&output_of(&bin, man_args)?);
        made.push(write(&dist.join(format!("{name}.8")), page.as_bytes())?);
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

/// The page in section 8 (system administration), where lbd and lbctl belong and where the
/// unit's `Documentation=man:lbd(8) man:lbctl(8)` looks: clap_mangen titles a page section 1
/// unless told otherwise, so the section field of its `.TH` line is set to 8.
fn man_section_8(page: &str) -> String {
    page.lines()
        .map(|line| match line.strip_prefix(".TH ") {
            Some(rest) => {
                let mut fields: Vec<&str> = rest.splitn(3, ' ').collect();
                if fields.len() >= 2 {
                    fields[1] = "8";
                }
                format!(".TH {}", fields.join(" "))
            }
            None => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn man_pages_go_to_section_8() {
        let page = ".ie \\n(.g .ds Aq \\(aq\n.TH lbd 1  \"lbd 0.1.0\" \n.SH NAME\nlbd\n";
        assert_eq!(
            man_section_8(page),
            ".ie \\n(.g .ds Aq \\(aq\n.TH lbd 8  \"lbd 0.1.0\" \n.SH NAME\nlbd\n"
        );
        // Already section 8: unchanged.
        assert_eq!(man_section_8(&man_section_8(page)), man_section_8(page));
    }
}
