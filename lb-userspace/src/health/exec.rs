//! The `exec` check: runs `command` as `user` (its uid and primary gid, no supplementary
//! groups), in a process group of its own, with stdin from /dev/null, in `/`, with a clean
//! environment: `PATH`, `LB_BACKEND_ADDRESS`, `LB_BACKEND_PORT` and `LB_SERVICE`. Exit 0 is
//! healthy; another exit is down with "exit N" and the first line it wrote (stderr first);
//! at `timeout_ms` its whole process group is killed (SIGKILL): down, "killed after N ms".
//! Everything is asynchronous (the user lookup, which may ask NSS, runs on a blocking thread).

use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt as _;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Pid, User};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

use super::check::{Failed, describe};
use crate::config::Health;

/// The PATH a check runs with.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Output kept of each stream (the rest is read and dropped, so the check never blocks on a
/// full pipe).
const KEPT: usize = 4096;
/// How long the output is still read after the check exited (a child it left may hold it open).
const OUTPUT_GRACE: Duration = Duration::from_millis(100);

/// Kills the check's process group when dropped, unless its leader was reaped (then the group
/// id may already name another group). The leader, unreaped, keeps the id from being reused.
struct Group {
    pgid: Option<Pid>,
}

impl Group {
    fn kill(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn user_ids(name: &str) -> Result<(u32, u32), Failed> {
    let owned = name.to_string();
    let found = tokio::task::spawn_blocking(move || User::from_name(&owned))
        .await
        .map_err(|e| Failed::lbd(format!("looking up user {name:?}: {e}")))?;
    match found {
        Ok(Some(u)) => Ok((u.uid.as_raw(), u.gid.as_raw())),
        Ok(None) => Err(Failed::lbd(format!("no user {name:?} on this host"))),
        Err(e) => Err(Failed::lbd(format!("looking up user {name:?}: {e}"))),
    }
}

/// Reads a stream to its end, keeping its first `KEPT` bytes.
async fn read_kept(mut r: impl AsyncRead + Unpin) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut chunk = [0u8; 4096];
    while let Ok(n) = r.read(&mut chunk).await {
        if n == 0 {
            break;
        }
        let room = KEPT.saturating_sub(kept.len());
        kept.extend_from_slice(&chunk[..n.min(room)]);
    }
    kept
}

/// The first non-empty line of the output, stderr first, at most 200 characters.
pub(super) fn first_line(stderr: &[u8], stdout: &[u8]) -> Option<String> {
    [stderr, stdout].into_iter().find_map(|out| {
        String::from_utf8_lossy(out)
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(|l| l.chars().take(200).collect())
    })
}

pub(super) async fn exec_check(
    service: &str,
    addr: SocketAddr,
    spec: &Health,
) -> Result<String, Failed> {
    let Some((program, args)) = spec.command.split_first() else {
        return Err(Failed::lbd("exec check without a command"));
    };
    let (uid, gid) = user_ids(&spec.user).await?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("PATH", PATH)
        .env("LB_BACKEND_ADDRESS", addr.ip().to_string())
        .env("LB_BACKEND_PORT", addr.port().to_string())
        .env("LB_SERVICE", service)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // std clears the supplementary groups (setgroups(0)) when it sets the uid.
        .uid(uid)
        .gid(gid)
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| Failed::lbd(format!("{program}: {}", describe(e))))?;
    let mut group = Group {
        pgid: child.id().map(|id| Pid::from_raw(id as i32)),
    };
    let stdout = tokio::spawn(read_kept(child.stdout.take().expect("piped stdout")));
    let stderr = tokio::spawn(read_kept(child.stderr.take().expect("piped stderr")));
    let timeout = Duration::from_millis(spec.timeout_ms);
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => {
            // Reaped: the group id is no longer ours to signal.
            group.pgid = None;
            status
        }
        Ok(Err(e)) => {
            group.kill();
            return Err(Failed::lbd(format!(
                "waiting for {program}: {}",
                describe(e)
            )));
        }
        Err(_) => {
            group.kill();
            let _ = child.wait().await;
            stdout.abort();
            stderr.abort();
            return Err(Failed::backend(format!(
                "killed after {} ms",
                spec.timeout_ms
            )));
        }
    };
    let (mut stdout, mut stderr) = (stdout, stderr);
    let output = async {
        (
            (&mut stdout).await.unwrap_or_default(),
            (&mut stderr).await.unwrap_or_default(),
        )
    };
    let (out, err) = tokio::time::timeout(OUTPUT_GRACE, output)
        .await
        .unwrap_or_default();
    // A process the check left behind may hold its output open: stop reading it.
    stdout.abort();
    stderr.abort();
    match (status.code(), status.signal()) {
        (Some(0), _) => Ok("exit 0".into()),
        (Some(code), _) => Err(Failed::backend(match first_line(&err, &out) {
            Some(line) => format!("exit {code}: {line}"),
            None => format!("exit {code}"),
        })),
        (None, Some(sig)) => Err(Failed::backend(format!("killed by signal {sig}"))),
        (None, None) => Err(Failed::backend("ended without an exit status")),
    }
}
