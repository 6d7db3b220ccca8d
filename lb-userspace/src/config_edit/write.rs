//! Writing the file atomically, never over a file that changed since it was read.

use super::*;

pub(super) static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

pub(super) fn write_atomically(path: &Path, text: &str, expected: &str) -> Result<(), EditError> {
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| EditError::Io { path, source }
    };
    // Follow a symlink so the link itself stays in place.
    let target = match fs::canonicalize(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => path.to_owned(),
        Err(e) => return Err(io_err(path)(e)),
    };
    let meta = match fs::metadata(&target) {
        Ok(meta) => {
            let current = fs::read(&target).map_err(io_err(&target))?;
            if current == text.as_bytes() {
                return Ok(());
            }
            if current != expected.as_bytes() {
                return Err(EditError::Conflict(path.to_owned()));
            }
            Some(meta)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err(&target)(e)),
    };
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let file_name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "config".into());
    let tmp = dir.join(format!(
        ".{file_name}.{}.{}.tmp",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let mode = meta.as_ref().map_or(0o600, |m| m.mode() & 0o7777);
    let result = (|| -> io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        if let Some(m) = &meta {
            // Keep the owner where permitted (lbd runs as root; a non-root caller cannot).
            match std::os::unix::fs::fchown(&f, Some(m.uid()), Some(m.gid())) {
                Err(e) if e.kind() != io::ErrorKind::PermissionDenied => return Err(e),
                _ => {}
            }
        }
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, &target)?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(&target)(e));
    }
    // Make the rename itself durable.
    fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(&dir))?;
    Ok(())
}
