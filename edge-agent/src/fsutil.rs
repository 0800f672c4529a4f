//! Crash-safe file writes: temp file in the same directory, fsync, rename, fsync directory.

use std::{
    fs::{self, File, OpenOptions},
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::Path,
};

/// Ownership to apply to a written file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ownership {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// Replaces `path` with `bytes` atomically: readers see the old or the new file, never a
/// partial one, and a power cut leaves one of the two.
/// Removes the temp files [`write_atomic`] left beside `path` when it was killed before
/// the rename (`.<name>.fleetlet-<16 hex digits>`); returns how many.
pub fn remove_stale_temps(path: &Path) -> usize {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return 0;
    };
    let prefix = format!(".{}.fleetlet-", name.to_string_lossy());
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name().to_str().is_some_and(|n| {
                n.strip_prefix(&prefix)
                    .is_some_and(|h| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            })
        })
        .filter(|e| fs::remove_file(e.path()).is_ok())
        .count()
}

pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32, owner: Ownership) -> std::io::Result<()> {
    replace_with(path, true, |tmp| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(tmp)?;
        f.write_all(bytes)?;
        if owner.uid.is_some() || owner.gid.is_some() {
            std::os::unix::fs::fchown(&f, owner.uid, owner.gid)?;
        }
        // After chown: chown clears set-id bits.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()
    })
}

/// Replaces `path` with `bytes` (mode 0600) by a rename, without syncing: readers see the
/// old or the new file, never a partial one, but a power cut may leave either, or an empty
/// or partial file on file systems that do not order the data before the rename. For
/// records the agent can rebuild, where a flush to flash on every change costs more than
/// the record is worth.
pub fn write_replacing(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    replace_with(path, false, |tmp| {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(tmp)?
            .write_all(bytes)
    })
}

/// Writes a temp file beside `path` with `fill`, renames it over `path` and, if `sync`,
/// syncs the directory; the temp file goes if anything fails.
fn replace_with(
    path: &Path,
    sync: bool,
    fill: impl FnOnce(&Path) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let dir = path.parent().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "path has no parent directory",
        )
    })?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.fleetlet-{:016x}", fastrand::u64(..)));
    let result = fill(&tmp).and_then(|()| {
        fs::rename(&tmp, path)?;
        if sync {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Replaces `to` with a copy of `from` atomically, like [`write_atomic`] but streamed by
/// the kernel (an agent binary is not read into memory).
pub fn copy_atomic(from: &Path, to: &Path, mode: u32) -> std::io::Result<()> {
    replace_with(to, true, |tmp| {
        fs::copy(from, tmp)?;
        let f = OpenOptions::new().write(true).open(tmp)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()
    })
}

/// Removes `path`; one that is not there is already removed.
pub fn remove_if_exists(path: &Path) -> std::io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}
