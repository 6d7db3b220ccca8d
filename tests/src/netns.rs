//! Network-namespace primitives: running code on a thread inside a namespace, sysctls, finding
//! the processes that live in a namespace, and checked command execution.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result, anyhow, bail};

use aya::programs::xdp::XdpLink;

use crate::bpf::TestProg;
use crate::sys;

/// `/run/netns/NAME`, where `ip netns add` mounts a named namespace.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

/// Runs `f` on a fresh thread that has entered network namespace `ns` (a name under
/// /run/netns) and returns its result. Only that thread changes namespace, so this is safe to
/// call from many threads at once. Sockets created inside `f` stay in `ns` and may be returned
/// and used from any thread. A panic inside `f` is propagated to the caller.
pub fn in_netns<R: Send>(ns: &str, f: impl FnOnce() -> Result<R> + Send) -> Result<R> {
    let path = netns_path(ns);
    let file = File::open(&path)
        .with_context(|| format!("opening network namespace {}", path.display()))?;
    std::thread::scope(|s| {
        let handle = std::thread::Builder::new()
            .name(format!("netns-{ns}"))
            .spawn_scoped(s, move || -> Result<R> {
                sys::setns_net(file.as_fd())
                    .with_context(|| format!("setns into network namespace {ns}"))?;
                f()
            })
            .with_context(|| format!("spawning a thread for network namespace {ns}"))?;
        match handle.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Writes `value` to sysctl `key` (dotted form, e.g. `net.ipv4.conf.all.rp_filter`) in the
/// calling thread's network namespace (/proc/sys/net follows the thread's namespace).
pub fn write_sysctl(key: &str, value: &str) -> Result<()> {
    let path = sysctl_path(key);
    std::fs::write(&path, value).with_context(|| format!("setting sysctl {key}={value}"))
}

/// The /proc/sys file of a dotted sysctl key.
pub fn sysctl_path(key: &str) -> PathBuf {
    Path::new("/proc/sys").join(key.replace('.', "/"))
}

/// Sets several sysctls inside namespace `ns`. Keys whose file does not exist are an error
/// unless `optional` is set, in which case they are skipped.
pub fn set_sysctls(ns: &str, kvs: &[(String, String)], optional: bool) -> Result<()> {
    in_netns(ns, || {
        for (k, v) in kvs {
            if optional && !sysctl_path(k).exists() {
                continue;
            }
            write_sysctl(k, v).with_context(|| format!("in namespace {ns}"))?;
        }
        Ok(())
    })
}

/// Attaches `prog` in driver mode to interface `ifname` of namespace `ns` through a bpf_link;
/// the program stays attached as long as the returned link lives. With `pass` (XDP_PASS) this
/// is what makes a veth accept XDP_TX/XDP_REDIRECT frames.
pub fn attach_xdp(ns: &str, ifname: &str, prog: &mut TestProg) -> Result<XdpLink> {
    in_netns(ns, || {
        let idx = sys::if_nametoindex(ifname)
            .with_context(|| format!("ifindex of {ifname} in namespace {ns}"))?;
        prog.attach(idx)
            .with_context(|| format!("attaching XDP to {ifname} in namespace {ns}"))
    })
}

/// Pids (thread-group ids) of every process whose network namespace is `ns`, except this
/// process itself.
pub fn pids_in_netns(ns: &str) -> Result<Vec<u32>> {
    let path = netns_path(ns);
    let ino = std::fs::metadata(&path)
        .with_context(|| format!("stat {}", path.display()))?
        .ino();
    let want = format!("net:[{ino}]");
    let me = std::process::id();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").context("reading /proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        // Processes may vanish while we look: ignore every error.
        if let Ok(link) = std::fs::read_link(entry.path().join("ns/net")) {
            if link.to_str() == Some(want.as_str()) {
                pids.push(pid);
            }
        }
    }
    Ok(pids)
}

/// `cmd` with only its network namespace changed to `ns`: `nsenter --net=/run/netns/NS --
/// PROGRAM ARGS...` (so it keeps the root's mount namespace, /sys and bpffs), with `cmd`'s
/// environment and working directory.
pub fn nsenter_command(ns: &str, cmd: &Command) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={}", netns_path(ns).display()))
        .arg("--")
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    if let Some(d) = cmd.get_current_dir() {
        c.current_dir(d);
    }
    c
}

/// Human-readable form of a command line, for error messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` (optionally feeding `stdin`), and fails unless it exits 0; the error names the
/// command line, its exit status and its stderr. Returns stdout.
pub fn run_checked(cmd: &mut Command, stdin: Option<&str>) -> Result<String> {
    let out = run_output(cmd, stdin)?;
    if !out.status.success() {
        let mut msg = format!(
            "command `{}` failed ({}): {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        if let Some(input) = stdin {
            msg.push_str(&format!("\n--- its stdin ---\n{input}"));
        }
        bail!(msg);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd` (optionally feeding `stdin`) and returns its output whatever the exit status;
/// fails only when the program cannot be started.
pub fn run_output(cmd: &mut Command, stdin: Option<&str>) -> Result<Output> {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting `{}`", describe(cmd)))?;
    if let Some(input) = stdin {
        let mut pipe = child
            .stdin
            .take()
            .ok_or_else(|| anyhow!("no stdin pipe for `{}`", describe(cmd)))?;
        pipe.write_all(input.as_bytes())
            .with_context(|| format!("writing stdin of `{}`", describe(cmd)))?;
    }
    child
        .wait_with_output()
        .with_context(|| format!("waiting for `{}`", describe(cmd)))
}

/// Runs `cmd` and returns its output whatever the exit status, like [`run_output`], but kills
/// it when it has not exited within `deadline` (an error then, naming the command and what it
/// printed so far): for clients of a daemon that might never answer.
pub fn run_output_within(cmd: &mut Command, deadline: std::time::Duration) -> Result<Output> {
    use std::io::Read;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting `{}`", describe(cmd)))?;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child
            .try_wait()
            .with_context(|| format!("waiting for `{}`", describe(cmd)))?
        {
            break Some(st);
        }
        if start.elapsed() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    match status {
        Some(status) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        None => bail!(
            "`{}` did not exit within {deadline:?} (killed); its stderr: {}",
            describe(cmd),
            String::from_utf8_lossy(&stderr).trim()
        ),
    }
}
