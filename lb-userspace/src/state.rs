//! The desired state lbd works towards, and what it keeps on disk between runs.

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Write},
    net::IpAddr,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::Path,
};

use lb_common::Addr;

/// The seed file in `daemon.state_dir`.
pub const SEED_FILE: &str = "hash_seed";
/// The weights drained backends had before their drain, in `daemon.state_dir`.
pub const DRAINED_FILE: &str = "drained.json";
/// Whether this node is drained (`lbctl node drain`), in `daemon.state_dir`.
pub const NODE_FILE: &str = "node.json";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: io::Error,
    },
    #[error(
        "{path} does not hold a hash seed of 32 hex digits (a crash or an edit left it so): write the seed in use back into it, or delete it ({when_deleted})"
    )]
    BadSeed {
        path: String,
        when_deleted: &'static str,
    },
    #[error(
        "daemon.hash_seed ({configured}) differs from the seed the running data path uses ({pinned}): applying it moves nearly every client to another backend and resets established connections. To apply it, start lbd once with --reseed; to keep the running one, set hash_seed = \"{pinned}\" or remove hash_seed from the config"
    )]
    SeedDiffers { configured: String, pinned: String },
    #[error(
        "{key} {path} is owned by uid {uid} with mode {mode:04o}: lbd keeps its {what} there, so it must belong to root or to lbd's user (uid {euid}) and be writable by its owner alone (e.g. chown {euid} {path} && chmod 0700 {path})"
    )]
    UnsafeDir {
        key: &'static str,
        what: &'static str,
        path: String,
        uid: u32,
        mode: u32,
        euid: u32,
    },
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StateError {
    let path = path.display().to_string();
    move |source| StateError::Io { what, path, source }
}

/// Refuses a directory others could change: `dir` (the config's `key`, holding lbd's `what`)
/// must be owned by root or by this process's user, and writable by its owner alone. Whoever
/// may write there could replace lbd's pins or its seed.
pub fn check_private_dir(
    key: &'static str,
    what: &'static str,
    dir: &Path,
) -> Result<(), StateError> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = fs::metadata(dir).map_err(io_error("inspecting", dir))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let mode = meta.mode() & 0o7777;
    if (meta.uid() != 0 && meta.uid() != euid) || mode & 0o022 != 0 {
        return Err(StateError::UnsafeDir {
            key,
            what,
            path: dir.display().to_string(),
            uid: meta.uid(),
            mode,
            euid,
        });
    }
    Ok(())
}

/// Creates `state_dir` (mode 0700) when it is missing, and refuses one others could change.
pub fn prepare_state_dir(state_dir: &Path) -> Result<(), StateError> {
    if !state_dir.exists() {
        fs::create_dir_all(state_dir).map_err(io_error("creating", state_dir))?;
        fs::set_permissions(state_dir, fs::Permissions::from_mode(0o700))
            .map_err(io_error("setting the mode of", state_dir))?;
    }
    check_private_dir(
        "daemon.state_dir",
        "hash seed and drained weights",
        state_dir,
    )
}

/// Writes `contents` to `path` so that a crash leaves either the old file or the new one, never
/// a part: a temporary file beside it (mode 0600) is written and flushed to disk, then renamed
/// over `path`, and the folder is flushed so the rename itself survives a power loss. Every
/// file lbd keeps is written this way.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), StateError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_error("creating", &tmp))?;
    f.write_all(contents)
        .and_then(|()| f.sync_all())
        .map_err(io_error("writing", &tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io_error("renaming a new version over", path))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("flushing", dir))
}

/// The seed kept in `path`, if the file exists; a file that does not hold one is an error
/// (never silently replaced: clients would move).
fn read_seed(path: &Path, when_deleted: &'static str) -> Result<Option<[u64; 2]>, StateError> {
    match fs::read_to_string(path) {
        Ok(text) => lb_common::hash::parse_seed(text.trim())
            .map(Some)
            .ok_or(StateError::BadSeed {
                path: path.display().to_string(),
                when_deleted,
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(io_error("reading", path)(source)),
    }
}

fn write_seed(path: &Path, seed: &[u64; 2]) -> Result<(), StateError> {
    write_atomic(path, format!("{}\n", seed_hex(seed)).as_bytes())
}

/// The hash seed lbd runs with, and the seed file kept in `state_dir` in step with it.
///
/// Without a pinned data path (`pinned` is None): the config's seed, else the one kept in
/// `state_dir`, else a new random one, then kept there (so restarts keep every client on its
/// backend).
///
/// With a pinned data path, its seed is what clients are placed by now, and it stays unless
/// `reseed` says otherwise: a configured seed that differs from it is an error
/// ([`StateError::SeedDiffers`]); without a configured seed the pinned one is kept and written
/// to `state_dir` (which may have been lost, or hold another seed). With `reseed`, the seed lbd
/// would choose without a pinned data path replaces the pinned one, logged as a warning.
pub fn hash_seed(
    configured: Option<[u64; 2]>,
    state_dir: &Path,
    pinned: Option<[u64; 2]>,
    reseed: bool,
) -> Result<[u64; 2], StateError> {
    prepare_state_dir(state_dir)?;
    let path = state_dir.join(SEED_FILE);
    let Some(pinned) = pinned else {
        if reseed {
            log::info!("--reseed: no data path is pinned yet, so no seed is replaced");
        }
        if let Some(seed) = configured {
            return Ok(seed);
        }
        if let Some(seed) = read_seed(&path, "a new seed is then generated: clients move once")? {
            return Ok(seed);
        }
        let seed: [u64; 2] = [rand::random(), rand::random()];
        write_seed(&path, &seed)?;
        return Ok(seed);
    };
    let kept = || read_seed(&path, "lbd then keeps the running data path's seed");
    let chosen = match configured {
        Some(seed) if seed == pinned => return Ok(seed),
        Some(seed) if !reseed => {
            return Err(StateError::SeedDiffers {
                configured: seed_hex(&seed),
                pinned: seed_hex(&pinned),
            });
        }
        Some(seed) => seed,
        None => {
            let file = kept()?;
            if !reseed || file == Some(pinned) {
                if file != Some(pinned) {
                    if let Some(other) = file {
                        log::warn!(
                            "{} holds the seed {}, the running data path uses {}: keeping the running one (clients stay where they are) and writing it there",
                            path.display(),
                            seed_hex(&other),
                            seed_hex(&pinned)
                        );
                    } else {
                        log::info!(
                            "{} is missing: keeping the running data path's seed and writing it there",
                            path.display()
                        );
                    }
                    write_seed(&path, &pinned)?;
                }
                return Ok(pinned);
            }
            let seed = file.unwrap_or_else(|| [rand::random(), rand::random()]);
            write_seed(&path, &seed)?;
            seed
        }
    };
    log::warn!(
        "--reseed: replacing the running data path's hash seed {} with {}: nearly every client moves to another backend and established connections are reset",
        seed_hex(&pinned),
        seed_hex(&chosen)
    );
    Ok(chosen)
}

/// The weights drained backends had before their drain ("service address" → weight, or
/// "service address:port" for a backend with a port of its own), as kept in `state_dir`;
/// nothing when the file is missing or unreadable (logged).
pub fn load_drained(state_dir: &Path) -> BTreeMap<String, u32> {
    let path = state_dir.join(DRAINED_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).unwrap_or_else(|e| {
            log::warn!(
                "{} is not a map of drained weights ({e}): undrain then restores the default weight",
                path.display()
            );
            BTreeMap::new()
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeMap::new(),
        Err(e) => {
            log::warn!("cannot read {}: {e}", path.display());
            BTreeMap::new()
        }
    }
}

/// Keeps the drained weights in `state_dir` (atomically).
pub fn save_drained(state_dir: &Path, drained: &BTreeMap<String, u32>) -> Result<(), StateError> {
    let text = serde_json::to_string_pretty(drained).unwrap_or_default();
    write_atomic(&state_dir.join(DRAINED_FILE), text.as_bytes())
}

/// What lbd keeps about the node itself (`state_dir/node.json`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeState {
    /// `lbctl node drain`: no VIP is announced until `lbctl node undrain`.
    pub drained: bool,
}

/// The node's state as kept in `state_dir`: not drained when the file is missing. A file that
/// cannot be read or understood counts as drained (logged, naming the file and the way out):
/// an operator drained the node to take it out of the routing, and a damaged file must not
/// bring it back unasked; `lbctl node undrain` writes a good file.
pub fn load_node(state_dir: &Path) -> NodeState {
    let path = state_dir.join(NODE_FILE);
    let damaged = |why: String| {
        log::warn!(
            "{}: {why}; the node stays drained (no VIP is announced) until `lbctl node undrain`",
            path.display()
        );
        NodeState { drained: true }
    };
    match fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).unwrap_or_else(|e| {
            damaged(format!("not a node state like {{\"drained\": true}} ({e})"))
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => NodeState::default(),
        Err(e) => damaged(format!("cannot be read ({e})")),
    }
}

/// Keeps the node's state in `state_dir` (atomically).
pub fn save_node(state_dir: &Path, node: &NodeState) -> Result<(), StateError> {
    let text = serde_json::to_string(node).unwrap_or_default() + "\n";
    write_atomic(&state_dir.join(NODE_FILE), text.as_bytes())
}

pub fn seed_hex(seed: &[u64; 2]) -> String {
    format!("{:016x}{:016x}", seed[0], seed[1])
}

/// An address as the data path stores it: wire-order words, IPv4 in the first.
pub fn to_addr(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
        IpAddr::V6(v6) => {
            let o = v6.octets();
            core::array::from_fn(|i| {
                u32::from_ne_bytes([o[i * 4], o[i * 4 + 1], o[i * 4 + 2], o[i * 4 + 3]])
            })
        }
    }
}

/// An address as the data path stores it (`to_addr`), back as an `IpAddr` of `family`.
pub fn from_addr(addr: &Addr, family: u8) -> IpAddr {
    if family == lb_common::FAMILY_V6 {
        let mut o = [0u8; 16];
        for (i, w) in addr.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::from(o)
    } else {
        IpAddr::from(addr[0].to_ne_bytes())
    }
}

pub fn family(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        lb_common::FAMILY_V4
    } else {
        lb_common::FAMILY_V6
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh folder under the temp dir, removed on drop.
    struct TempDir(std::path::PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "lb-state-test-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&dir);
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn seed_is_generated_once_and_kept() {
        let dir = TempDir::new("gen");
        let a = hash_seed(None, &dir.0, None, false).unwrap();
        let b = hash_seed(None, &dir.0, None, false).unwrap();
        assert_eq!(a, b);
        assert_eq!(mode(&dir.0), 0o700);
        assert_eq!(mode(&dir.0.join(SEED_FILE)), 0o600);
        assert_eq!(
            hash_seed(Some([1, 2]), &dir.0, None, false).unwrap(),
            [1, 2]
        );
        fs::write(dir.0.join(SEED_FILE), "nonsense").unwrap();
        assert!(hash_seed(None, &dir.0, None, false).is_err());
    }

    #[test]
    fn the_pinned_seed_is_kept_and_written_back() {
        let dir = TempDir::new("pinned");
        let file = dir.0.join(SEED_FILE);
        // state_dir lost, no seed in the config.
        assert_eq!(
            hash_seed(None, &dir.0, Some([7, 8]), false).unwrap(),
            [7, 8]
        );
        assert_eq!(fs::read_to_string(&file).unwrap().trim(), seed_hex(&[7, 8]));
        // state_dir holding another seed: the running one wins and is written there.
        write_seed(&file, &[1, 1]).unwrap();
        assert_eq!(
            hash_seed(None, &dir.0, Some([7, 8]), false).unwrap(),
            [7, 8]
        );
        assert_eq!(fs::read_to_string(&file).unwrap().trim(), seed_hex(&[7, 8]));
        // The same seed configured: nothing to say.
        assert_eq!(
            hash_seed(Some([7, 8]), &dir.0, Some([7, 8]), false).unwrap(),
            [7, 8]
        );
    }

    #[test]
    fn another_configured_seed_needs_reseed() {
        let dir = TempDir::new("reseed");
        prepare_state_dir(&dir.0).unwrap();
        let file = dir.0.join(SEED_FILE);
        write_seed(&file, &[7, 8]).unwrap();
        let e = hash_seed(Some([1, 2]), &dir.0, Some([7, 8]), false).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("--reseed") && text.contains(&seed_hex(&[7, 8])),
            "{text}"
        );
        assert_eq!(
            hash_seed(Some([1, 2]), &dir.0, Some([7, 8]), true).unwrap(),
            [1, 2]
        );
        // Without a configured seed, --reseed applies state_dir's, or a new one.
        write_seed(&file, &[3, 4]).unwrap();
        assert_eq!(hash_seed(None, &dir.0, Some([7, 8]), true).unwrap(), [3, 4]);
        fs::remove_file(&file).unwrap();
        let fresh = hash_seed(None, &dir.0, Some([7, 8]), true).unwrap();
        assert_ne!(fresh, [7, 8]);
        assert_eq!(fs::read_to_string(&file).unwrap().trim(), seed_hex(&fresh));
    }

    #[test]
    fn an_empty_or_cut_seed_file_is_an_error_and_stays() {
        let dir = TempDir::new("cut");
        prepare_state_dir(&dir.0).unwrap();
        let file = dir.0.join(SEED_FILE);
        for (text, pinned) in [
            ("", None),
            ("", Some([7, 8])),
            ("5f0c1d2e3f40516273", None),
            ("5f0c1d2e3f40516273", Some([7, 8])),
        ] {
            fs::write(&file, text).unwrap();
            let e = hash_seed(None, &dir.0, pinned, false).unwrap_err();
            assert!(
                matches!(e, StateError::BadSeed { .. }),
                "{text:?}, {pinned:?}: {e}"
            );
            assert!(e.to_string().contains("32 hex digits"), "{e}");
            assert_eq!(
                fs::read_to_string(&file).unwrap(),
                text,
                "the file was replaced"
            );
        }
    }

    #[test]
    fn atomic_writes_replace_whole_files() {
        let dir = TempDir::new("atomic");
        prepare_state_dir(&dir.0).unwrap();
        let path = dir.0.join("f");
        // A temporary file a crash left behind changes nothing.
        fs::write(dir.0.join(".f.tmp"), "half").unwrap();
        write_atomic(&path, b"one").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"one");
        write_atomic(&path, b"two, longer").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two, longer");
        assert_eq!(mode(&path), 0o600);
        let names: Vec<String> = fs::read_dir(&dir.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["f".to_string()], "nothing but the file is left");
        // Drained weights go through it too.
        let drained = BTreeMap::from([("web 192.0.2.11".to_string(), 70)]);
        save_drained(&dir.0, &drained).unwrap();
        assert_eq!(load_drained(&dir.0), drained);
    }

    #[test]
    fn the_node_state_is_kept_and_a_damaged_file_means_drained() {
        let dir = TempDir::new("node");
        prepare_state_dir(&dir.0).unwrap();
        assert_eq!(load_node(&dir.0), NodeState { drained: false });
        save_node(&dir.0, &NodeState { drained: true }).unwrap();
        assert_eq!(load_node(&dir.0), NodeState { drained: true });
        assert_eq!(mode(&dir.0.join(NODE_FILE)), 0o600);
        save_node(&dir.0, &NodeState { drained: false }).unwrap();
        assert_eq!(load_node(&dir.0), NodeState { drained: false });
        fs::write(dir.0.join(NODE_FILE), "{\"drained\": tru").unwrap();
        assert_eq!(load_node(&dir.0), NodeState { drained: true });
    }

    #[test]
    fn folders_others_may_change_are_refused() {
        let dir = TempDir::new("modes");
        prepare_state_dir(&dir.0).unwrap();
        check_private_dir("daemon.state_dir", "state", &dir.0).unwrap();
        for m in [0o777, 0o770, 0o702, 0o1777] {
            fs::set_permissions(&dir.0, fs::Permissions::from_mode(m)).unwrap();
            let e = check_private_dir("daemon.state_dir", "state", &dir.0).unwrap_err();
            let text = e.to_string();
            assert!(
                text.contains(&format!("{m:04o}")) && text.contains("chmod 0700"),
                "{text}"
            );
            assert!(prepare_state_dir(&dir.0).is_err(), "{m:o}");
        }
        fs::set_permissions(&dir.0, fs::Permissions::from_mode(0o755)).unwrap();
        check_private_dir("daemon.state_dir", "state", &dir.0).unwrap();
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            std::os::unix::fs::chown(&dir.0, Some(65534), None).unwrap();
            let text = check_private_dir("daemon.state_dir", "state", &dir.0)
                .unwrap_err()
                .to_string();
            assert!(text.contains("uid 65534"), "{text}");
        }
    }

    #[test]
    fn addresses_are_wire_words() {
        let a = to_addr("192.0.2.1".parse().unwrap());
        assert_eq!(a[0].to_ne_bytes(), [192, 0, 2, 1]);
        let b = to_addr("2001:db8::1".parse().unwrap());
        assert_eq!(b[0].to_ne_bytes(), [0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(b[3].to_ne_bytes(), [0, 0, 0, 1]);
        for ip in ["192.0.2.1", "2001:db8::1", "::ffff:192.0.2.9"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(from_addr(&to_addr(ip), family(ip)), ip);
        }
    }
}
