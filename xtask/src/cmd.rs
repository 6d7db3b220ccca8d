//! Running commands: their output streams to the terminal, and a failure names the command
//! and its exit status.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// The command line as one would type it, for messages; the program by its name only (cargo
/// runs as /root/.rustup/toolchains/.../bin/cargo).
pub fn describe(cmd: &Command) -> String {
    let program = Path::new(cmd.get_program());
    let name = program.file_name().unwrap_or(program.as_os_str());
    let mut words = vec![quote(&name.to_string_lossy())];
    words.extend(cmd.get_args().map(|arg| quote(&arg.to_string_lossy())));
    words.join(" ")
}

fn quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+^@%".contains(c));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Runs a command with its output going to the terminal; fails unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = describe(cmd);
    println!("$ {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{shown}`"))?;
    check(&shown, status)
}

/// Fails unless `status` is success, naming the command and how it ended.
pub fn check(shown: &str, status: ExitStatus) -> Result<()> {
    if status.success() {
        Ok(())
    } else {
        bail!("`{shown}` failed ({status})")
    }
}

/// Runs a command quietly and returns what it printed, whatever its exit status.
pub fn capture(cmd: &mut Command) -> Result<Output> {
    cmd.output()
        .with_context(|| format!("could not start `{}`", describe(cmd)))
}

/// Runs a command quietly and returns its standard output; fails (with its standard error)
/// unless it exits 0.
pub fn stdout_of(cmd: &mut Command) -> Result<String> {
    let output = capture(cmd)?;
    let shown = describe(cmd);
    let stderr = String::from_utf8_lossy(&output.stderr);
    check(&shown, output.status).with_context(|| stderr.trim().to_owned())?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The full path of an executable found on PATH, like `command -v`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// PATH with `dir` in front, for a child process.
pub fn path_with(dir: &Path) -> Result<OsString> {
    let mut dirs = vec![dir.to_path_buf()];
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(dirs).context("cannot build PATH")
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A duration the way the summaries print it: "12.3s".
pub fn secs(duration: Duration) -> String {
    format!("{:.1}s", duration.as_secs_f64())
}

/// A header separating the phases of a long task.
pub fn phase(title: &str) {
    println!("\n==> {title}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_quotes_only_what_needs_it() {
        let mut cmd = Command::new("/usr/bin/dpkg-query");
        cmd.args(["-W", "-f=${Status}", "two words", "it's"]);
        assert_eq!(
            describe(&cmd),
            r"dpkg-query -W '-f=${Status}' 'two words' 'it'\''s'"
        );
    }

    #[test]
    fn failure_names_command_and_status() {
        let error = run(&mut Command::new("false")).unwrap_err();
        assert_eq!(error.to_string(), "`false` failed (exit status: 1)");
    }

    #[test]
    fn missing_program_is_named() {
        let error = run(&mut Command::new("no-such-program-xtask")).unwrap_err();
        assert_eq!(error.to_string(), "could not start `no-such-program-xtask`");
    }

    #[test]
    fn which_finds_sh_only() {
        assert!(which("sh").is_some());
        assert!(which("no-such-program-xtask").is_none());
    }
}
