//! One lbd at a time: the exclusive hold an lbd takes on what it owns before it touches any of
//! it. Two lbds on the same pins would each undo the other's changes, on the same state each
//! overwrite the other's files, on the same socket one would remove the other's.
//!
//! - the pins: `flock` on the `bpffs_dir` folder itself (bpffs holds no regular files, and a
//!   lock on the folder goes with it when `lbd --cleanup` removes it);
//! - the state: `flock` on `lbd.lock` in `state_dir` (which also holds the pid, for people);
//! - the control socket: a socket that answers is never removed; a process answering there is
//!   named and lbd stops.
//!
//! The pins and the state are locked separately because two configs may share one and not the
//! other. Locks are advisory and released by the kernel when the process dies, so a killed lbd
//! never leaves one behind. The holder of a lock is found in /proc/locks and named by its pid.

use std::{
    fs::{self, File},
    io::{self, Write as _},
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::{config, datapath, state};

/// The name of the lock file in `state_dir`.
pub const STATE_LOCK_FILE: &str = "lbd.lock";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{path} ({what}) is held by {holder}: {advice}")]
    Held {
        what: &'static str,
        path: String,
        holder: String,
        advice: &'static str,
    },
    #[error("another lbd ({holder}) answers on the control socket {path}: {advice}")]
    SocketAnswers {
        path: String,
        holder: String,
        advice: &'static str,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: io::Error,
    },
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error(transparent)]
    Datapath(#[from] datapath::DatapathError),
}

const RUN_ADVICE: &str = "only one lbd may run on the same pins, state and socket; stop that one first, or give this one its own daemon.bpffs_dir, daemon.state_dir and daemon.socket";
const CLEANUP_ADVICE: &str = "lbd is running on this config: stop it first (e.g. systemctl stop lbd), then run lbd --cleanup";
const DECAP_ADVICE: &str =
    "another lbd works on these pins: wait for it, or give lbd decap its own --bpffs-dir";

/// The locks this process holds; dropping it releases them.
#[derive(Debug)]
pub struct Lock {
    _held: Vec<File>,
}

/// "lbd pid N", or why the holder cannot be named.
fn holder_name(pid: Option<u32>) -> String {
    match pid {
        Some(pid) => {
            let name = fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|c| c.trim().to_string())
                .unwrap_or_else(|_| "a process".into());
            format!("{name} pid {pid}")
        }
        None => "another process (not listed in /proc/locks)".into(),
    }
}

/// The process holding a `flock` on the file `f` refers to, from /proc/locks ("1: FLOCK
/// ADVISORY WRITE PID MAJ:MIN:INODE 0 EOF"; waiters are listed with "->" and skipped).
fn flock_holder(f: &File) -> Option<u32> {
    let meta = f.metadata().ok()?;
    let id = format!(
        "{:02x}:{:02x}:{}",
        libc::major(meta.dev()),
        libc::minor(meta.dev()),
        meta.ino()
    );
    fs::read_to_string("/proc/locks")
        .ok()?
        .lines()
        .find_map(|line| {
            let w: Vec<&str> = line.split_whitespace().collect();
            (w.len() > 5 && w[1] == "FLOCK" && w[5] == id)
                .then(|| w[4].parse().ok())
                .flatten()
        })
}

/// Takes an exclusive `flock` on `f` without waiting: `Ok(true)` when taken, `Ok(false)`
/// when another holds it.
fn try_flock(f: &File) -> io::Result<bool> {
    // SAFETY: flock on a descriptor this function borrows; no memory is involved.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Locks `f` (opened from `path`), waiting up to `wait` for its holder; names the holder when
/// it does not let go (from /proc/locks, else from what `pid_file` says, for a /proc that hides
/// it as systemd's `ProcSubset=pid` does).
fn lock(
    f: File,
    path: &Path,
    what: &'static str,
    wait: Duration,
    advice: &'static str,
    pid_file: Option<&Path>,
) -> Result<File, LockError> {
    let until = Instant::now() + wait;
    loop {
        let taken = try_flock(&f).map_err(|source| LockError::Io {
            what: "locking",
            path: path.display().to_string(),
            source,
        })?;
        if taken {
            return Ok(f);
        }
        if Instant::now() >= until {
            return Err(LockError::Held {
                what,
                path: path.display().to_string(),
                holder: holder_name(
                    flock_holder(&f)
                        .or_else(|| fs::read_to_string(pid_file?).ok()?.trim().parse().ok()),
                ),
                advice,
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn open_dir(dir: &Path) -> Result<File, LockError> {
    File::open(dir).map_err(|source| LockError::Io {
        what: "opening",
        path: dir.display().to_string(),
        source,
    })
}

/// The pins under `bpffs_dir` (prepared first: mounted, created, checked), waiting up to `wait`
/// for another holder.
pub fn pins(bpffs_dir: &Path, wait: Duration, advice: &'static str) -> Result<File, LockError> {
    datapath::prepare_bpffs(bpffs_dir)?;
    lock(open_dir(bpffs_dir)?, bpffs_dir, "pins", wait, advice, None)
}

/// The state in `state_dir` (created and checked first); the lock file then holds this pid.
pub fn state(state_dir: &Path) -> Result<File, LockError> {
    state::prepare_state_dir(state_dir)?;
    let path: PathBuf = state_dir.join(STATE_LOCK_FILE);
    let io_err = |what| {
        let path = path.display().to_string();
        move |source| LockError::Io { what, path, source }
    };
    let f = {
        use std::os::unix::fs::OpenOptionsExt as _;
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io_err("opening"))?
    };
    let mut f = lock(f, &path, "state", Duration::ZERO, RUN_ADVICE, Some(&path))?;
    f.set_len(0)
        .and_then(|()| writeln!(f, "{}", std::process::id()))
        .map_err(io_err("writing"))?;
    Ok(f)
}

/// Whether some process answers on the unix socket at `path`: `Some` with its pid (as the
/// kernel recorded it when the socket was bound, SO_PEERCRED) when a connection is accepted or
/// the backlog is full, `None` when nothing listens there (no file, not a socket, or a stale
/// socket file a killed process left).
pub fn socket_answers(path: &Path) -> Option<Option<u32>> {
    use std::os::unix::ffi::OsStrExt as _;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: a zeroed sockaddr_un is valid; the path is copied in below within its bounds.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return None;
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments; the descriptor is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd was just returned by socket(2) and is owned by nobody else.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    use std::os::fd::AsRawFd as _;
    // SAFETY: a valid descriptor and a sockaddr_un of the size given.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        // EAGAIN: a listener whose backlog is full (alive, but busy).
        return (std::io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN))
            .then_some(None);
    }
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: a valid descriptor, a ucred buffer and its length, both ours.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    Some((rc == 0 && cred.pid > 0).then_some(cred.pid as u32))
}

/// Refuses a control socket some process answers on.
fn socket_free(socket: &Path, advice: &'static str) -> Result<(), LockError> {
    match socket_answers(socket) {
        Some(pid) => Err(LockError::SocketAnswers {
            path: socket.display().to_string(),
            holder: holder_name(pid),
            advice,
        }),
        None => Ok(()),
    }
}

/// Everything lbd owns, taken before it touches any of it: nobody answers on the control
/// socket, then the state and the pins are locked.
pub fn daemon(d: &config::Daemon) -> Result<Lock, LockError> {
    socket_free(&d.socket, RUN_ADVICE)?;
    let state = state(&d.state_dir)?;
    let pins = pins(&d.bpffs_dir, Duration::ZERO, RUN_ADVICE)?;
    Ok(Lock {
        _held: vec![state, pins],
    })
}

/// For `lbd --cleanup`: refuses while an lbd runs on this config (it answers on the socket, or
/// holds the pins), and holds the pins while they are removed.
pub fn cleanup(d: &config::Daemon) -> Result<Lock, LockError> {
    socket_free(&d.socket, CLEANUP_ADVICE)?;
    let mut held = vec![];
    if d.bpffs_dir.is_dir() {
        held.push(lock(
            open_dir(&d.bpffs_dir)?,
            &d.bpffs_dir,
            "pins",
            Duration::ZERO,
            CLEANUP_ADVICE,
            None,
        )?);
    }
    Ok(Lock { _held: held })
}

/// For `lbd decap`: the pins under its `bpffs_dir`, waiting a little for another `lbd decap`
/// working there (e.g. one per interface, started together).
pub fn decap(bpffs_dir: &Path) -> Result<Lock, LockError> {
    Ok(Lock {
        _held: vec![pins(bpffs_dir, Duration::from_secs(10), DECAP_ADVICE)?],
    })
}

/// For `lbd decap --remove`: like [`decap`], when the folder exists.
pub fn decap_existing(bpffs_dir: &Path) -> Result<Lock, LockError> {
    let mut held = vec![];
    if bpffs_dir.is_dir() {
        held.push(lock(
            open_dir(bpffs_dir)?,
            bpffs_dir,
            "pins",
            Duration::from_secs(10),
            DECAP_ADVICE,
            None,
        )?);
    }
    Ok(Lock { _held: held })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_names_its_holder() {
        let dir = std::env::temp_dir().join(format!("lb-lock-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let first = state(&dir).unwrap();
        assert_eq!(
            fs::read_to_string(dir.join(STATE_LOCK_FILE))
                .unwrap()
                .trim(),
            std::process::id().to_string()
        );
        // flock locks belong to open files: a second open in this process conflicts too.
        let e = state(&dir).unwrap_err().to_string();
        assert!(
            e.contains(&format!("pid {}", std::process::id())) && e.contains("only one lbd"),
            "{e}"
        );
        drop(first);
        let again = state(&dir).unwrap();
        drop(again);
        fs::remove_dir_all(&dir).unwrap();
    }
}
