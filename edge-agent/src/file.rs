//! The File reconciler: regular files with exact contents, under allowed roots only.
//! Content is inline in the manifest, or fetched by the device ([`crate::fetch`]).

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt,
    path::{Component, Path, PathBuf},
    sync::{Arc, Mutex},
};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use fleetlet_protocol::{FetchSource, FileContent, FileSpec, ResourceDetails, ResourceId};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::{
    config::{ConfigError, invalid},
    fetch::{FetchSettings, Fetcher, Poll, is_partial_of, partial_path, sha256_file},
    fsutil::{Ownership, remove_stale_temps, write_atomic},
    reconciler::{Deleted, Observation, ReconcileError, Reconciler},
};

/// Mode used when a File resource does not set one.
pub const DEFAULT_MODE: u32 = 0o644;

#[derive(Debug, Clone)]
pub struct FileReconciler {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    roots: Vec<PathBuf>,
    max_bytes: u64,
    prefix: Option<PathBuf>,
    /// Opens sealed content (a Pod's Secret); without it, sealed content fails.
    sealing: Option<Arc<crate::sealing::SealingKey>>,
    fetcher: Fetcher,
    /// Digests of files already read, by path, valid while the file's inode, size and
    /// times are unchanged: a large fetched file is not read again on every pass.
    digests: Mutex<HashMap<PathBuf, (Stamp, String)>>,
}

/// What identifies one version of a file's bytes without reading them (`ctime` changes on
/// every write and cannot be set back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(md: &fs::Metadata) -> Self {
        Self {
            dev: md.dev(),
            ino: md.ino(),
            size: md.len(),
            mtime: (md.mtime(), md.mtime_nsec()),
            ctime: (md.ctime(), md.ctime_nsec()),
        }
    }
}

/// Where a File's bytes come from.
enum Content {
    Inline(Vec<u8>),
    Fetch(FetchSource),
}

/// A File spec checked against policy and ready to act on.
struct Target {
    /// The path with every existing directory resolved (no symlinks left above the file).
    path: PathBuf,
    content: Content,
    size: u64,
    sha256: String,
    mode: u32,
    owner: Ownership,
}

/// `path` (absolute) re-rooted under `prefix`.
fn under(prefix: &Path, path: &Path) -> PathBuf {
    prefix.join(path.strip_prefix("/").unwrap_or(path))
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

impl FileReconciler {
    pub fn new(roots: Vec<PathBuf>, max_bytes: u64) -> Self {
        Self::with_prefix(roots, max_bytes, None)
    }

    /// With a prefix, `/etc/x` is written at `<prefix>/etc/x` and the roots move with it.
    pub fn with_prefix(roots: Vec<PathBuf>, max_bytes: u64, prefix: Option<PathBuf>) -> Self {
        let roots = match &prefix {
            Some(p) => roots.iter().map(|r| under(p, r)).collect(),
            None => roots,
        };
        Self {
            inner: Arc::new(Inner {
                roots,
                max_bytes,
                prefix,
                sealing: None,
                fetcher: Fetcher::new(FetchSettings::default()),
                digests: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// How fetched content is downloaded (at construction, before it is shared).
    pub fn with_fetch(mut self, settings: FetchSettings) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.fetcher = Fetcher::new(settings);
        }
        self
    }

    /// When a download in progress wants the resources looked at again.
    pub fn next_wake(&self) -> Option<Instant> {
        self.inner.fetcher.next_wake()
    }

    /// Opens sealed content with the device's key (at construction, before it is shared).
    pub fn with_sealing(mut self, key: Arc<crate::sealing::SealingKey>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.sealing = Some(key);
        }
        self
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, ReconcileError> + Send + 'static,
    ) -> Result<T, ReconcileError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| ReconcileError::Runtime(format!("file task failed: {e}")))?
    }

    /// Brings fetched content in: starts its download, reports its progress, or installs
    /// it once verified.
    async fn fetch(&self, t: Target, src: FetchSource) -> Result<ResourceDetails, ReconcileError> {
        let part = partial_path(&t.path, &t.sha256);
        match self.inner.fetcher.poll(&part) {
            Poll::Running(progress) => Err(ReconcileError::InProgress(progress)),
            Poll::Done => self.blocking(move |inner| inner.install(&t, &part)).await,
            Poll::Failed(f) if f.permanent => Err(ReconcileError::Invalid(f.message)),
            Poll::Failed(f) => Err(ReconcileError::Runtime(f.message)),
            Poll::Idle => {
                let path = t.path.clone();
                let check = part.clone();
                self.blocking(move |inner| inner.prepare_fetch(&t, &check))
                    .await?;
                self.inner
                    .fetcher
                    .start(&path, part, src)
                    .map_err(ReconcileError::Runtime)?;
                Err(ReconcileError::InProgress("download starting".into()))
            }
        }
    }
}

/// What reconciling a File leaves to do after looking at it.
enum Next {
    /// In sync, or written: nothing more.
    Done(ResourceDetails),
    /// Content to download.
    Fetch(Target, FetchSource),
}

impl Inner {
    fn target(&self, spec: &FileSpec) -> Result<Target, ReconcileError> {
        spec.validate()
            .map_err(|e| ReconcileError::Invalid(e.to_string()))?;
        let bytes = match &spec.content {
            FileContent::Fetch(src) => {
                let max = self.fetcher.settings().max_bytes;
                if src.size > max {
                    return Err(ReconcileError::Forbidden(format!(
                        "fetched file is {} bytes; this device fetches at most {max} \
                         (file.max_fetch_bytes)",
                        src.size
                    )));
                }
                return self.finish_target(spec, Content::Fetch(src.clone()));
            }
            FileContent::Text(t) => t.as_bytes().to_vec(),
            FileContent::Base64(b) => B64
                .decode(b.trim())
                .map_err(|e| ReconcileError::Invalid(format!("file.content.base64: {e}")))?,
            FileContent::Sealed(b) => self
                .sealing
                .as_ref()
                .ok_or_else(|| {
                    ReconcileError::Invalid("sealed content, and no sealing key".into())
                })?
                .open(b)
                .map_err(|e| ReconcileError::Invalid(format!("file.content.sealed: {e}")))?,
        };
        if bytes.len() as u64 > self.max_bytes {
            return Err(ReconcileError::Invalid(format!(
                "file is {} bytes; this device allows at most {}",
                bytes.len(),
                self.max_bytes
            )));
        }
        self.finish_target(spec, Content::Inline(bytes))
    }

    fn finish_target(&self, spec: &FileSpec, content: Content) -> Result<Target, ReconcileError> {
        let path = match &self.prefix {
            Some(p) => self.resolve(&under(p, Path::new(&spec.path)))?,
            None => self.resolve(Path::new(&spec.path))?,
        };
        let (size, sha256) = match &content {
            Content::Inline(b) => (b.len() as u64, sha256_hex(b)),
            Content::Fetch(src) => (src.size, src.sha256.clone()),
        };
        Ok(Target {
            sha256,
            size,
            content,
            path,
            mode: spec.mode.unwrap_or(DEFAULT_MODE),
            owner: Ownership {
                uid: spec
                    .owner
                    .as_deref()
                    .map(|o| lookup_id(o, "/etc/passwd"))
                    .transpose()?,
                gid: spec
                    .group
                    .as_deref()
                    .map(|g| lookup_id(g, "/etc/group"))
                    .transpose()?,
            },
        })
    }

    /// Checks that `path` lies under an allowed root even after following every symlink
    /// that exists on the way, and returns it with those directories resolved.
    fn resolve(&self, path: &Path) -> Result<PathBuf, ReconcileError> {
        let roots = || {
            self.roots
                .iter()
                .map(|r| r.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let root = self
            .roots
            .iter()
            .find(|r| path.starts_with(r) && path != r.as_path())
            .ok_or_else(|| {
                ReconcileError::Forbidden(format!(
                    "{} is outside the allowed roots ({})",
                    path.display(),
                    roots()
                ))
            })?;
        fs::create_dir_all(root)
            .map_err(|e| ReconcileError::io(format!("creating root {}", root.display()), e))?;
        let real_root = root
            .canonicalize()
            .map_err(|e| ReconcileError::io(format!("resolving root {}", root.display()), e))?;
        let parent = path.parent().unwrap_or(root);
        let file_name = path
            .file_name()
            .ok_or_else(|| ReconcileError::Invalid(format!("{} names no file", path.display())))?;

        // The deepest directory that exists, resolved; the rest will be created inside it.
        let mut existing = parent;
        let mut missing: Vec<&std::ffi::OsStr> = Vec::new();
        while fs::symlink_metadata(existing).is_err() {
            match (existing.parent(), existing.components().next_back()) {
                (Some(up), Some(Component::Normal(name))) => {
                    missing.push(name);
                    existing = up;
                }
                _ => break,
            }
        }
        let real = existing
            .canonicalize()
            .map_err(|e| ReconcileError::io(format!("resolving {}", existing.display()), e))?;
        if !real.starts_with(&real_root) {
            return Err(ReconcileError::Forbidden(format!(
                "{} resolves to {} through a symbolic link, outside the allowed roots ({})",
                path.display(),
                real.display(),
                roots()
            )));
        }
        let mut out = real;
        out.extend(missing.iter().rev());
        out.push(file_name);
        Ok(out)
    }

    fn observe(&self, t: &Target) -> Result<Observation, ReconcileError> {
        let md = match fs::symlink_metadata(&t.path) {
            Ok(md) => md,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Observation::Absent),
            Err(e) => {
                return Err(ReconcileError::io(
                    format!("inspecting {}", t.path.display()),
                    e,
                ));
            }
        };
        if md.file_type().is_symlink() {
            return Ok(Observation::Differs("is a symbolic link".into()));
        }
        if !md.is_file() {
            return Ok(Observation::Differs("is not a regular file".into()));
        }
        if md.len() != t.size {
            return Ok(Observation::Differs(format!(
                "size is {} bytes, want {}",
                md.len(),
                t.size
            )));
        }
        if self.digest(&t.path, &md)? != t.sha256 {
            return Ok(Observation::Differs("content changed".into()));
        }
        if md.mode() & 0o7777 != t.mode {
            return Ok(Observation::Differs(format!(
                "mode is {:o}, want {:o}",
                md.mode() & 0o7777,
                t.mode
            )));
        }
        if t.owner.uid.is_some_and(|u| u != md.uid()) || t.owner.gid.is_some_and(|g| g != md.gid())
        {
            return Ok(Observation::Differs(format!(
                "owner is {}:{}",
                md.uid(),
                md.gid()
            )));
        }
        Ok(Observation::InSync(details(t)))
    }

    /// The SHA-256 of the file at `path` whose metadata is `md`, read again only when the
    /// file changed since it was last read.
    fn digest(&self, path: &Path, md: &fs::Metadata) -> Result<String, ReconcileError> {
        let stamp = Stamp::of(md);
        let mut digests = self.digests.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((s, d)) = digests.get(path)
            && *s == stamp
        {
            return Ok(d.clone());
        }
        let d = sha256_file(path, stamp.size.saturating_add(1))
            .map_err(|e| ReconcileError::io(format!("reading {}", path.display()), e))?;
        digests.insert(path.to_path_buf(), (stamp, d.clone()));
        Ok(d)
    }

    /// Checks what a download needs before it starts: its directory, no leftovers of an
    /// older spec's download, and free space for the rest of it.
    fn prepare_fetch(&self, t: &Target, part: &Path) -> Result<(), ReconcileError> {
        let dir = t.path.parent().ok_or_else(|| {
            ReconcileError::Invalid(format!("{} names no file", t.path.display()))
        })?;
        fs::create_dir_all(dir)
            .map_err(|e| ReconcileError::io(format!("creating {}", dir.display()), e))?;
        remove_partials(&t.path, Some(part));
        let have = fs::metadata(part).map(|m| m.len()).unwrap_or(0).min(t.size);
        let need = t.size - have;
        let vfs = rustix::fs::statvfs(dir).map_err(|e| {
            ReconcileError::io(format!("free space of {}", dir.display()), e.into())
        })?;
        let free = vfs.f_bavail.saturating_mul(vfs.f_frsize);
        let reserve = self.fetcher.settings().reserve_bytes;
        if free < need.saturating_add(reserve) {
            return Err(ReconcileError::Runtime(format!(
                "not enough disk space for {}: {need} more bytes needed, {free} free on {}, \
                 {reserve} kept in reserve (file.fetch_reserve_bytes)",
                t.path.display(),
                dir.display()
            )));
        }
        Ok(())
    }

    /// Moves a verified download into place with the spec's mode and owner.
    fn install(&self, t: &Target, part: &Path) -> Result<ResourceDetails, ReconcileError> {
        let io = |what: &str, e| ReconcileError::io(format!("{what} {}", part.display()), e);
        let f = fs::File::open(part).map_err(|e| io("opening", e))?;
        let md = f.metadata().map_err(|e| io("inspecting", e))?;
        if md.len() != t.size {
            let _ = fs::remove_file(part);
            return Err(ReconcileError::Runtime(format!(
                "{} changed after it was verified; downloading again",
                part.display()
            )));
        }
        if t.owner.uid.is_some() || t.owner.gid.is_some() {
            std::os::unix::fs::fchown(&f, t.owner.uid, t.owner.gid).map_err(|e| io("chown", e))?;
        }
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(t.mode))
            .map_err(|e| io("chmod", e))?;
        f.sync_all().map_err(|e| io("syncing", e))?;
        fs::rename(part, &t.path).map_err(|e| io("installing", e))?;
        if let Some(dir) = t.path.parent()
            && let Ok(d) = fs::File::open(dir)
        {
            let _ = d.sync_all();
        }
        Ok(details(t))
    }
}

/// Removes partial downloads of `target`, except `keep`.
fn remove_partials(target: &Path, keep: Option<&Path>) {
    let Some(dir) = target.parent() else { return };
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if Some(path.as_path()) != keep
            && e.file_name()
                .to_str()
                .is_some_and(|n| is_partial_of(target, n))
        {
            let _ = fs::remove_file(&path);
        }
    }
}

fn details(t: &Target) -> ResourceDetails {
    ResourceDetails::File {
        sha256: t.sha256.clone(),
        size: t.size,
    }
}

/// A user or group given by number or by name (looked up in `/etc/passwd` / `/etc/group`).
fn lookup_id(name: &str, db: &str) -> Result<u32, ReconcileError> {
    if let Ok(n) = name.parse::<u32>() {
        return Ok(n);
    }
    let text =
        fs::read_to_string(db).map_err(|e| ReconcileError::io(format!("reading {db}"), e))?;
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let n = f.next()?;
            let id = f.nth(1)?.parse::<u32>().ok()?;
            (n == name).then_some(id)
        })
        .next()
        .ok_or_else(|| {
            ReconcileError::Invalid(format!(
                "no such {} {name:?} on this device",
                if db.ends_with("group") {
                    "group"
                } else {
                    "user"
                }
            ))
        })
}

impl Reconciler for FileReconciler {
    type Spec = FileSpec;

    async fn observe(
        &self,
        _id: &ResourceId,
        spec: &FileSpec,
    ) -> Result<Observation, ReconcileError> {
        let spec = spec.clone();
        self.blocking(move |inner| inner.observe(&inner.target(&spec)?))
            .await
    }

    async fn reconcile(
        &self,
        _id: &ResourceId,
        spec: &FileSpec,
    ) -> Result<ResourceDetails, ReconcileError> {
        let spec = spec.clone();
        let next = self
            .blocking(move |inner| {
                let t = inner.target(&spec)?;
                if let Observation::InSync(d) = inner.observe(&t)? {
                    return Ok(Next::Done(d));
                }
                let bytes = match &t.content {
                    Content::Fetch(src) => {
                        let src = src.clone();
                        return Ok(Next::Fetch(t, src));
                    }
                    Content::Inline(bytes) => bytes,
                };
                if let Some(dir) = t.path.parent() {
                    fs::create_dir_all(dir).map_err(|e| {
                        ReconcileError::io(format!("creating {}", dir.display()), e)
                    })?;
                }
                let stale = remove_stale_temps(&t.path);
                if stale > 0 {
                    tracing::info!(path = %t.path.display(), stale, "removed an interrupted write's temp file");
                }
                write_atomic(&t.path, bytes, t.mode, t.owner)
                    .map_err(|e| ReconcileError::io(format!("writing {}", t.path.display()), e))?;
                Ok(Next::Done(details(&t)))
            })
            .await?;
        match next {
            Next::Done(d) => Ok(d),
            Next::Fetch(t, src) => self.fetch(t, src).await,
        }
    }

    async fn delete(
        &self,
        _id: &ResourceId,
        applied: &FileSpec,
    ) -> Result<Deleted, ReconcileError> {
        let spec = applied.clone();
        self.blocking(move |inner| {
            let t = match inner.target(&spec) {
                Ok(t) => t,
                // Never delete something policy would not let us write.
                Err(e) => return Ok(Deleted::LeftInPlace(e.to_string())),
            };
            if matches!(t.content, Content::Fetch(_)) {
                inner.fetcher.cancel(&t.path);
                remove_partials(&t.path, None);
            }
            match fs::symlink_metadata(&t.path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Ok(Deleted::AlreadyGone);
                }
                Err(e) => {
                    return Err(ReconcileError::io(
                        format!("inspecting {}", t.path.display()),
                        e,
                    ));
                }
                Ok(md) if !md.is_file() => {
                    return Ok(Deleted::LeftInPlace(format!(
                        "{} is no longer a regular file",
                        t.path.display()
                    )));
                }
                Ok(_) => {}
            }
            let md = fs::symlink_metadata(&t.path)
                .map_err(|e| ReconcileError::io(format!("inspecting {}", t.path.display()), e))?;
            if inner.digest(&t.path, &md)? != t.sha256 {
                return Ok(Deleted::LeftInPlace(format!(
                    "{} was changed since fleetlet wrote it",
                    t.path.display()
                )));
            }
            fs::remove_file(&t.path)
                .map_err(|e| ReconcileError::io(format!("removing {}", t.path.display()), e))?;
            if let Some(dir) = t.path.parent()
                && let Ok(d) = fs::File::open(dir)
            {
                let _ = d.sync_all();
            }
            Ok(Deleted::Removed)
        })
        .await
    }

    fn moves(&self, old: &FileSpec, new: &FileSpec) -> bool {
        old.path != new.path
    }
}

// ---------------------------------------------------------------- configuration

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// File resources may only be written under these directories.
    #[serde(default = "default_roots")]
    pub allowed_roots: Vec<PathBuf>,
    /// Largest file a File resource may hold, in bytes.
    #[serde(default = "default_max_file")]
    pub max_file_bytes: u64,
    /// Write every File resource under this directory instead of `/` (its path and the
    /// allowed roots are taken relative to it). For running several agents on one machine:
    /// demos, tests and the fleet simulator.
    #[serde(default)]
    pub path_prefix: Option<PathBuf>,
    /// Largest File fetched by URL (`content.fetch`), in bytes.
    #[serde(default = "default_max_fetch")]
    pub max_fetch_bytes: u64,
    /// Free space a download must leave on the filesystem it writes to, in bytes.
    #[serde(default = "default_fetch_reserve")]
    pub fetch_reserve_bytes: u64,
    /// A download that receives nothing for this long is cut, and resumed on the next try.
    #[serde(default = "default_fetch_stall")]
    pub fetch_stall_seconds: u64,
    /// PEM certificates trusted for fetched content besides the system's CAs.
    #[serde(default)]
    pub fetch_ca_file: Option<PathBuf>,
}

fn default_roots() -> Vec<PathBuf> {
    vec![
        PathBuf::from("/etc/fleetlet"),
        PathBuf::from("/opt/fleetlet"),
    ]
}

fn default_max_file() -> u64 {
    fleetlet_protocol::DEFAULT_MAX_FILE_BYTES
}

fn default_max_fetch() -> u64 {
    4 << 30
}

fn default_fetch_reserve() -> u64 {
    64 << 20
}

fn default_fetch_stall() -> u64 {
    60
}

impl Default for FileConfig {
    fn default() -> Self {
        Self {
            allowed_roots: default_roots(),
            max_file_bytes: default_max_file(),
            path_prefix: None,
            max_fetch_bytes: default_max_fetch(),
            fetch_reserve_bytes: default_fetch_reserve(),
            fetch_stall_seconds: default_fetch_stall(),
            fetch_ca_file: None,
        }
    }
}

impl FileConfig {
    /// Allowed roots are specific absolute directories; paths are absolute.
    pub(crate) fn check(&self) -> Result<(), ConfigError> {
        for root in &self.allowed_roots {
            if !root.is_absolute()
                || root
                    .components()
                    .any(|c| matches!(c, std::path::Component::ParentDir))
            {
                return Err(invalid(
                    "file.allowed_roots",
                    format!("{} must be an absolute path without '..'", root.display()),
                ));
            }
            if root == Path::new("/") {
                return Err(invalid(
                    "file.allowed_roots",
                    "'/' would let manifests overwrite any file; name specific directories",
                ));
            }
        }
        if let Some(p) = &self.path_prefix
            && !p.is_absolute()
        {
            return Err(invalid("file.path_prefix", "must be an absolute path"));
        }
        if self.fetch_stall_seconds == 0 {
            return Err(invalid("file.fetch_stall_seconds", "must be at least 1"));
        }
        if let Some(ca) = &self.fetch_ca_file
            && !ca.is_absolute()
        {
            return Err(invalid("file.fetch_ca_file", "must be an absolute path"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(path: &Path, text: &str) -> FileSpec {
        FileSpec {
            path: path.display().to_string(),
            content: FileContent::Text(text.into()),
            mode: None,
            owner: None,
            group: None,
        }
    }

    fn id() -> ResourceId {
        ResourceId::new("f").unwrap()
    }

    #[tokio::test]
    async fn writes_once_and_reports_in_sync_after() {
        let root = tempfile::tempdir().unwrap();
        let r = FileReconciler::new(vec![root.path().to_path_buf()], 1 << 20);
        let s = spec(&root.path().join("a/b/c.conf"), "x = 1\n");
        assert_eq!(r.observe(&id(), &s).await.unwrap(), Observation::Absent);
        let d = r.reconcile(&id(), &s).await.unwrap();
        assert_eq!(
            fs::read_to_string(root.path().join("a/b/c.conf")).unwrap(),
            "x = 1\n"
        );
        let ino = fs::metadata(root.path().join("a/b/c.conf")).unwrap().ino();
        // Idempotent: the second call does not rewrite (same inode, not a new temp file).
        assert_eq!(r.reconcile(&id(), &s).await.unwrap(), d);
        assert_eq!(
            fs::metadata(root.path().join("a/b/c.conf")).unwrap().ino(),
            ino
        );
        assert!(matches!(
            r.observe(&id(), &s).await.unwrap(),
            Observation::InSync(_)
        ));
        let mode = fs::metadata(root.path().join("a/b/c.conf")).unwrap().mode() & 0o7777;
        assert_eq!(mode, DEFAULT_MODE);
    }

    #[tokio::test]
    async fn refuses_paths_outside_roots_and_symlink_escapes() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let r = FileReconciler::new(vec![root.path().to_path_buf()], 1 << 20);
        let err = r
            .reconcile(&id(), &spec(&outside.path().join("x"), ""))
            .await
            .unwrap_err();
        assert!(matches!(err, ReconcileError::Forbidden(_)), "{err}");
        std::os::unix::fs::symlink(outside.path(), root.path().join("escape")).unwrap();
        let err = r
            .reconcile(&id(), &spec(&root.path().join("escape/x"), ""))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert!(!outside.path().join("x").exists());
        let err = r
            .reconcile(&id(), &spec(Path::new("/etc/../x"), ""))
            .await
            .unwrap_err();
        assert!(matches!(err, ReconcileError::Invalid(_)), "{err}");
    }

    #[tokio::test]
    async fn replaces_a_planted_symlink_instead_of_writing_through_it() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("victim"), "keep").unwrap();
        std::os::unix::fs::symlink(outside.path().join("victim"), root.path().join("f")).unwrap();
        let r = FileReconciler::new(vec![root.path().to_path_buf()], 1 << 20);
        let s = spec(&root.path().join("f"), "new");
        assert!(matches!(
            r.observe(&id(), &s).await.unwrap(),
            Observation::Differs(_)
        ));
        r.reconcile(&id(), &s).await.unwrap();
        assert_eq!(
            fs::read_to_string(outside.path().join("victim")).unwrap(),
            "keep"
        );
        assert!(
            !fs::symlink_metadata(root.path().join("f"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }

    #[tokio::test]
    async fn a_temp_file_left_by_a_killed_write_is_removed_when_the_file_is_written() {
        let root = tempfile::tempdir().unwrap();
        let stale = root.path().join(".f.fleetlet-0123456789abcdef");
        let other = root.path().join(".g.fleetlet-0123456789abcdef");
        fs::write(&stale, "half").unwrap();
        fs::write(&other, "another file's").unwrap();
        let r = FileReconciler::new(vec![root.path().to_path_buf()], 1 << 20);
        r.reconcile(&id(), &spec(&root.path().join("f"), "whole"))
            .await
            .unwrap();
        assert_eq!(fs::read_to_string(root.path().join("f")).unwrap(), "whole");
        assert!(!stale.exists());
        assert!(other.exists(), "only the written file's temp files go");
    }

    #[tokio::test]
    async fn owner_and_group_are_applied_by_name_and_kept() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: changing a file's owner needs root");
            return;
        }
        let root = tempfile::tempdir().unwrap();
        let r = FileReconciler::new(vec![root.path().to_path_buf()], 1 << 20);
        let path = root.path().join("owned");
        let mut s = spec(&path, "x");
        s.owner = Some("nobody".into());
        s.group = Some("65534".into());
        r.reconcile(&id(), &s).await.unwrap();
        let md = fs::metadata(&path).unwrap();
        assert_eq!((md.uid(), md.gid()), (65534, 65534));
        // Changed by hand: seen as drift, and put back.
        std::os::unix::fs::chown(&path, Some(0), Some(0)).unwrap();
        match r.observe(&id(), &s).await.unwrap() {
            Observation::Differs(why) => assert_eq!(why, "owner is 0:0"),
            other => panic!("{other:?}"),
        }
        r.reconcile(&id(), &s).await.unwrap();
        let md = fs::metadata(&path).unwrap();
        assert_eq!((md.uid(), md.gid()), (65534, 65534));
        // A user the device does not have fails, and leaves the file alone.
        s.owner = Some("no-such-user-here".into());
        assert!(matches!(
            r.reconcile(&id(), &s).await,
            Err(ReconcileError::Invalid(m)) if m.contains("no such user")
        ));
        assert_eq!(fs::metadata(&path).unwrap().uid(), 65534);
    }

    #[tokio::test]
    async fn deletes_only_what_it_wrote() {
        let root = tempfile::tempdir().unwrap();
        let r = FileReconciler::new(vec![root.path().to_path_buf()], 1 << 20);
        let s = spec(&root.path().join("f"), "mine");
        r.reconcile(&id(), &s).await.unwrap();
        fs::write(root.path().join("f"), "edited by hand").unwrap();
        assert!(matches!(
            r.delete(&id(), &s).await.unwrap(),
            Deleted::LeftInPlace(_)
        ));
        assert!(root.path().join("f").exists());
        r.reconcile(&id(), &s).await.unwrap();
        assert_eq!(r.delete(&id(), &s).await.unwrap(), Deleted::Removed);
        assert_eq!(r.delete(&id(), &s).await.unwrap(), Deleted::AlreadyGone);
    }

    #[tokio::test]
    async fn a_path_prefix_re_roots_paths_and_roots() {
        let prefix = tempfile::tempdir().unwrap();
        let r = FileReconciler::with_prefix(
            vec![PathBuf::from("/etc/app")],
            1 << 20,
            Some(prefix.path().to_path_buf()),
        );
        r.reconcile(&id(), &spec(Path::new("/etc/app/x.conf"), "x"))
            .await
            .unwrap();
        assert_eq!(
            fs::read_to_string(prefix.path().join("etc/app/x.conf")).unwrap(),
            "x"
        );
        let err = r
            .reconcile(&id(), &spec(Path::new("/etc/other"), "x"))
            .await
            .unwrap_err();
        assert!(matches!(err, ReconcileError::Forbidden(_)), "{err}");
    }

    #[tokio::test]
    async fn base64_mode_and_size_limits() {
        let root = tempfile::tempdir().unwrap();
        let r = FileReconciler::new(vec![root.path().to_path_buf()], 4);
        let mut s = spec(&root.path().join("bin"), "");
        s.content = FileContent::Base64("AAEC/w==".into());
        s.mode = Some(0o600);
        r.reconcile(&id(), &s).await.unwrap();
        assert_eq!(fs::read(root.path().join("bin")).unwrap(), [0, 1, 2, 255]);
        assert_eq!(
            fs::metadata(root.path().join("bin")).unwrap().mode() & 0o7777,
            0o600
        );
        s.content = FileContent::Base64("not base64!".into());
        assert!(matches!(
            r.reconcile(&id(), &s).await,
            Err(ReconcileError::Invalid(_))
        ));
        assert_eq!(fs::read(root.path().join("bin")).unwrap(), [0, 1, 2, 255]);
        s.content = FileContent::Text("12345".into());
        assert!(matches!(
            r.reconcile(&id(), &s).await,
            Err(ReconcileError::Invalid(_))
        ));
        assert_eq!(
            fs::read(root.path().join("bin")).unwrap(),
            [0, 1, 2, 255],
            "refused content leaves the file as it was"
        );
    }
}
