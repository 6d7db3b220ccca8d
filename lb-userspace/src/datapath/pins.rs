//! The pin folder: making sure it is a private folder on a bpffs, where each layout's map pins
//! live, the seed a pinned data path hashes with, and removing everything pinned there.

use std::{
    fs, io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use lb_common::{LAYOUT_VERSION, maps};
use log::info;

use super::{
    error::{DatapathError, Result, io_err},
    sys,
};

/// The folder of this layout's map pins.
pub fn maps_dir(bpffs_dir: &Path) -> PathBuf {
    bpffs_dir.join(format!("v{LAYOUT_VERSION}"))
}

/// Makes sure `bpffs_dir` exists on a bpffs: mounts one at /sys/fs/bpf (mode 0700: pins are
/// root's business) when the folder lies under it and nothing is mounted there (SPEC), creates
/// the folder (mode 0700), and refuses a folder elsewhere that is not on a bpffs, or one that
/// others could change (whoever may write there can remove or replace the pins).
pub fn prepare_bpffs(bpffs_dir: &Path) -> Result<()> {
    let root = Path::new("/sys/fs/bpf");
    if bpffs_dir.starts_with(root) && !sys::on_bpffs(root).unwrap_or(false) {
        info!("no bpffs mounted at /sys/fs/bpf: mounting one (mode 0700)");
        sys::mount_bpffs().map_err(|e| DatapathError::Io {
            what: "mounting bpffs at /sys/fs/bpf".into(),
            cause: e.to_string(),
        })?;
    }
    if !bpffs_dir.exists() {
        fs::create_dir_all(bpffs_dir)
            .map_err(io_err(format!("creating {}", bpffs_dir.display())))?;
        fs::set_permissions(bpffs_dir, fs::Permissions::from_mode(0o700)).map_err(io_err(
            format!("setting the mode of {}", bpffs_dir.display()),
        ))?;
    }
    if !sys::on_bpffs(bpffs_dir).map_err(io_err(format!("inspecting {}", bpffs_dir.display())))? {
        return Err(DatapathError::Other(format!(
            "daemon.bpffs_dir {} is not on a bpf filesystem: use a folder under /sys/fs/bpf or mount a bpffs there",
            bpffs_dir.display()
        )));
    }
    crate::state::check_private_dir("the pin folder", "pins", bpffs_dir)
        .map_err(|e| DatapathError::Other(e.to_string()))
}

/// The hash seed of the data path pinned under `bpffs_dir`, if one is pinned and filled: the
/// seed its clients are placed by. Read from this layout's `CONFIG`, else from another
/// layout's (the seed is the first 16 bytes of `CONFIG[0]` in every layout), before anything is
/// loaded or replaced.
pub fn pinned_seed(bpffs_dir: &Path) -> Option<[u64; 2]> {
    let mut dirs = vec![maps_dir(bpffs_dir)];
    let mut others = other_layouts(bpffs_dir);
    others.sort();
    dirs.extend(others.into_iter().rev());
    dirs.iter()
        .filter_map(|d| sys::read_first_value(&d.join(maps::CONFIG)))
        .find_map(|v| {
            let word = |i: usize| -> Option<u64> {
                Some(u64::from_ne_bytes(v[i * 8..i * 8 + 8].try_into().ok()?))
            };
            let seed: [u64; 2] = [word(0)?, word(1)?];
            (seed != [0, 0]).then_some(seed)
        })
}

/// Folders of map pins of other layouts than this lbd's.
pub(super) fn other_layouts(bpffs_dir: &Path) -> Vec<PathBuf> {
    let own = maps_dir(bpffs_dir);
    let Ok(entries) = fs::read_dir(bpffs_dir) else {
        return vec![];
    };
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && *p != own
                && p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                    n.len() > 1 && n.starts_with('v') && n[1..].bytes().all(|b| b.is_ascii_digit())
                })
        })
        .collect()
}

/// Takes lb out of the path: removes every link pin under `bpffs_dir` (which detaches the
/// program) and every map pin, then the folders. Missing pins are not an error.
pub fn cleanup(bpffs_dir: &Path) -> Result<Vec<String>> {
    let mut removed = vec![];
    let entries = match fs::read_dir(bpffs_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(io_err(format!("reading {}", bpffs_dir.display()))(e)),
    };
    // Links first, so the program stops before its maps go.
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort_by_key(|p| {
        !p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("link_"))
    });
    for path in paths {
        if path.is_dir() {
            fs::remove_dir_all(&path).map_err(io_err(format!("removing {}", path.display())))?;
        } else {
            fs::remove_file(&path).map_err(io_err(format!("removing {}", path.display())))?;
        }
        removed.push(path.display().to_string());
    }
    match fs::remove_dir(bpffs_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(format!("removing {}", bpffs_dir.display()))(e)),
    }
    Ok(removed)
}
