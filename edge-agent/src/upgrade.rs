//! The AgentUpgrade reconciler: the agent replaces its own binary, with a way back.
//!
//! 1. The binary for this device's architecture must be signed by a key in `[trust]
//!    manifest_keys` (over [`binary_statement`]); otherwise nothing is downloaded.
//! 2. It is downloaded like a fetched File (HTTPS, the device's CAs, resumable, size and
//!    SHA-256 checked), then run once with `--version`, which must print the spec's version.
//! 3. The running binary is kept as `<binary>.previous`, a record of the change is written
//!    (`<state_dir>/upgrade/pending.json`), the new binary replaces `<binary>` in one
//!    rename, and systemd restarts the agent's unit.
//! 4. The new version must reach its control plane (a read of its own desired-state key)
//!    within `healthSeconds`, or it puts `<binary>.previous` back and restarts again. A
//!    version that does not even start is put back by `fleetlet-agent rollback`, which the
//!    unit's `OnFailure=` runs from the kept binary once systemd gives up restarting it.
//!    Either way the device reports the upgrade Failed and does not try that spec again.
//!
//! A power cut at any point leaves a whole binary at `<binary>` (the swap is a rename), and
//! the record says what to confirm or undo on the next start.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;
use fleetlet_protocol::{
    AgentBinary, AgentUpgradeSpec, ResourceDetails, ResourceId, upgrade::binary_statement,
};
use ring::signature::{ED25519, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{
    config::{ConfigError, invalid},
    fetch::{self, Fetcher, Poll},
    fsutil::{Ownership, copy_atomic, write_atomic},
    network::Uplink,
    reconciler::{Deleted, Observation, ReconcileError, Reconciler},
    systemd::SystemdReconciler,
};

/// The version this agent reports; a build may set another with `FLEETLET_AGENT_VERSION`.
pub const VERSION: &str = match option_env!("FLEETLET_AGENT_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

/// The `[upgrade]` section of the agent's config file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpgradeConfig {
    /// The binary systemd starts (default: the running one).
    #[serde(default)]
    pub binary: Option<PathBuf>,
    /// How long a new version has to reach its control plane when the spec does not say
    /// (default 120 s).
    #[serde(default)]
    pub health_seconds: Option<u32>,
}

impl UpgradeConfig {
    pub fn check(&self) -> Result<(), ConfigError> {
        if let Some(b) = &self.binary
            && !b.is_absolute()
        {
            return Err(invalid("upgrade.binary", "must be an absolute path"));
        }
        if let Some(s) = self.health_seconds
            && !fleetlet_protocol::upgrade::HEALTH_SECONDS.contains(&s)
        {
            return Err(invalid(
                "upgrade.health_seconds",
                "must be between 10 and 3600",
            ));
        }
        Ok(())
    }

    /// The binary to replace: the configured one, else the running one (without the
    /// `.previous` suffix it has when `fleetlet-agent rollback` runs from the kept copy).
    pub fn binary_path(&self) -> Result<PathBuf, String> {
        if let Some(b) = &self.binary {
            return Ok(b.clone());
        }
        let exe =
            std::env::current_exe().map_err(|e| format!("finding the agent's binary: {e}"))?;
        let s = exe.to_string_lossy();
        Ok(match s.strip_suffix(".previous") {
            Some(main) => PathBuf::from(main),
            None => exe,
        })
    }
}

/// An upgrade swapped in and not yet confirmed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Pending {
    from: String,
    to: String,
    digest: String,
    /// Seconds since the epoch when the new binary was put in place.
    started: u64,
    health_seconds: u32,
}

/// An upgrade that was undone, so its spec is not tried again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Failed {
    digest: String,
    version: String,
    reason: String,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Files of the upgrade machinery, next to the binary and in the state directory.
#[derive(Debug, Clone)]
pub struct Paths {
    pub binary: PathBuf,
    /// `<state_dir>/upgrade`.
    pub state: PathBuf,
}

impl Paths {
    pub fn previous(&self) -> PathBuf {
        let mut s = self.binary.clone().into_os_string();
        s.push(".previous");
        PathBuf::from(s)
    }
    /// The version of the kept binary.
    fn previous_version(&self) -> PathBuf {
        self.state.join("previous-version")
    }
    fn pending(&self) -> PathBuf {
        self.state.join("pending.json")
    }
    fn failed(&self) -> PathBuf {
        self.state.join("failed.json")
    }
    fn download(&self, version: &str) -> PathBuf {
        self.state.join(format!("fleetlet-agent-{version}"))
    }

    fn load<T: for<'de> Deserialize<'de>>(&self, path: &Path) -> Option<T> {
        let text = std::fs::read(path).ok()?;
        match serde_json::from_slice(&text) {
            Ok(v) => Some(v),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "unreadable upgrade record, ignored");
                None
            }
        }
    }

    fn store<T: Serialize>(&self, path: &Path, value: &T) -> Result<(), ReconcileError> {
        std::fs::create_dir_all(&self.state)
            .map_err(|e| ReconcileError::io(format!("creating {}", self.state.display()), e))?;
        let bytes = serde_json::to_vec(value)
            .map_err(|e| ReconcileError::Runtime(format!("encoding an upgrade record: {e}")))?;
        write_atomic(path, &bytes, 0o600, Ownership::default())
            .map_err(|e| ReconcileError::io(format!("writing {}", path.display()), e))
    }

    fn forget(path: &Path) -> Result<(), ReconcileError> {
        crate::fsutil::remove_if_exists(path)
            .map_err(|e| ReconcileError::io(format!("removing {}", path.display()), e))
    }

    /// Puts the kept binary back at `binary` (one rename) and records why, so the spec is
    /// not tried again; the pending record goes.
    fn put_back(&self, pending: &Pending, reason: String) -> Result<(), ReconcileError> {
        copy_atomic(&self.previous(), &self.binary, 0o755)
            .map_err(|e| ReconcileError::io(format!("restoring {}", self.binary.display()), e))?;
        self.store(
            &self.failed(),
            &Failed {
                digest: pending.digest.clone(),
                version: pending.to.clone(),
                reason,
            },
        )?;
        Self::forget(&self.pending())
    }
}

/// What `fleetlet-agent rollback` does (run by the unit's `OnFailure=` from the kept
/// binary): if an upgrade is pending, the kept binary goes back in place and the upgrade
/// is recorded as failed; then the agent's unit is started again. `Ok(false)`: nothing was
/// pending.
pub async fn rollback_after_failure(
    paths: &Paths,
    systemd: &SystemdReconciler,
    unit: &str,
) -> Result<bool, ReconcileError> {
    let Some(pending) = paths.load::<Pending>(&paths.pending()) else {
        return Ok(false);
    };
    warn!(from = %pending.to, to = %pending.from, "the new agent did not stay up; putting the previous one back");
    paths.put_back(
        &pending,
        format!(
            "fleetlet-agent {} did not stay up (systemd stopped restarting it); {} was put back",
            pending.to, pending.from
        ),
    )?;
    systemd.reset_and_start(unit).await?;
    Ok(true)
}

#[derive(Debug, Clone)]
pub struct UpgradeReconciler {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    paths: Result<Paths, String>,
    keys: BTreeMap<String, Vec<u8>>,
    default_health: u32,
    fetcher: Fetcher,
    systemd: SystemdReconciler,
    unit: String,
    uplink: std::sync::OnceLock<Uplink>,
}

impl UpgradeReconciler {
    pub fn new(
        config: &UpgradeConfig,
        state_dir: &Path,
        keys: BTreeMap<String, Vec<u8>>,
        fetch: fetch::FetchSettings,
        systemd: SystemdReconciler,
        unit: String,
    ) -> Self {
        let paths = config.binary_path().map(|binary| Paths {
            binary,
            state: state_dir.join("upgrade"),
        });
        Self {
            inner: Arc::new(Inner {
                paths,
                keys,
                default_health: config.health_seconds.unwrap_or(120),
                fetcher: Fetcher::new(fetch),
                systemd,
                unit,
                uplink: std::sync::OnceLock::new(),
            }),
        }
    }

    pub fn set_uplink(&self, uplink: Uplink) {
        let _ = self.inner.uplink.set(uplink);
    }

    /// When a download is running: when to look at it again.
    pub fn next_wake(&self) -> Option<tokio::time::Instant> {
        self.inner.fetcher.next_wake()
    }

    fn paths(&self) -> Result<&Paths, ReconcileError> {
        self.inner
            .paths
            .as_ref()
            .map_err(|e| ReconcileError::Runtime(e.clone()))
    }

    /// The binary for this device, once its signature checks out with a trusted key.
    fn verified<'s>(&self, spec: &'s AgentUpgradeSpec) -> Result<&'s AgentBinary, ReconcileError> {
        spec.validate()
            .map_err(|e| ReconcileError::Invalid(e.to_string()))?;
        let arch = std::env::consts::ARCH;
        let bin = spec.binary_for(arch).ok_or_else(|| {
            ReconcileError::Invalid(format!(
                "no binary for this device's architecture ({arch}) in agentUpgrade.binaries"
            ))
        })?;
        if self.inner.keys.is_empty() {
            return Err(ReconcileError::Forbidden(
                "this device trusts no signing key, so it cannot check an agent binary: add \
                 the key that signs them to [trust] manifest_keys"
                    .into(),
            ));
        }
        let key = self.inner.keys.get(&bin.key_id).ok_or_else(|| {
            ReconcileError::Forbidden(format!(
                "the binary is signed with key {:?}, which this device does not trust",
                bin.key_id
            ))
        })?;
        let signature = base64::engine::general_purpose::STANDARD
            .decode(bin.signature.as_bytes())
            .map_err(|e| ReconcileError::Forbidden(format!("signature is not base64: {e}")))?;
        UnparsedPublicKey::new(&ED25519, key)
            .verify(
                &binary_statement(&spec.version, arch, &bin.fetch.sha256),
                &signature,
            )
            .map_err(|_| {
                ReconcileError::Forbidden(format!(
                    "the signature does not match version {} for {arch} with SHA-256 {} \
                     (key {:?}): refused before downloading",
                    spec.version, bin.fetch.sha256, bin.key_id
                ))
            })?;
        Ok(bin)
    }

    fn digest(spec: &AgentUpgradeSpec, bin: &AgentBinary) -> String {
        format!("{}/{}", spec.version, bin.fetch.sha256)
    }

    fn details(&self) -> ResourceDetails {
        let previous = self
            .paths()
            .ok()
            .filter(|p| p.previous().exists())
            .and_then(|p| std::fs::read_to_string(p.previous_version()).ok())
            .map(|v| v.trim().to_owned());
        ResourceDetails::AgentUpgrade {
            version: VERSION.to_owned(),
            previous,
        }
    }

    /// Waits for the control plane until the pending upgrade's deadline.
    async fn healthy(&self, pending: &Pending) -> bool {
        let Some(uplink) = self.inner.uplink.get() else {
            return true;
        };
        let deadline = pending.started + u64::from(pending.health_seconds);
        loop {
            if uplink.reachable().await {
                return true;
            }
            if now_secs() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Restarts the agent's unit in a moment (after this pass has reported).
    fn restart_soon(&self) {
        let systemd = self.inner.systemd.clone();
        let unit = self.inner.unit.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            info!(unit, "restarting the agent");
            if let Err(e) = systemd.restart_detached(&unit).await {
                warn!(unit, error = %e, "restarting the agent failed");
            }
        });
    }

    /// The downloaded, verified binary for `bin`, or why not yet.
    fn downloaded(
        &self,
        spec: &AgentUpgradeSpec,
        bin: &AgentBinary,
    ) -> Result<PathBuf, ReconcileError> {
        let paths = self.paths()?;
        let target = paths.download(&spec.version);
        let part = fetch::partial_path(&target, &bin.fetch.sha256);
        match self.inner.fetcher.poll(&part) {
            Poll::Running(progress) => return Err(ReconcileError::InProgress(progress)),
            Poll::Failed(f) if f.permanent => {
                return Err(ReconcileError::Invalid(format!(
                    "the binary is not the one signed: {}",
                    f.message
                )));
            }
            Poll::Failed(f) => return Err(ReconcileError::Runtime(f.message)),
            Poll::Done => {
                std::fs::rename(&part, &target).map_err(|e| {
                    ReconcileError::io(format!("moving {} into place", target.display()), e)
                })?;
            }
            Poll::Idle => {}
        }
        let good =
            fetch::sha256_file(&target, bin.fetch.size).is_ok_and(|sha| sha == bin.fetch.sha256);
        if good {
            return Ok(target);
        }
        let _ = std::fs::remove_file(&target);
        std::fs::create_dir_all(&paths.state)
            .map_err(|e| ReconcileError::io(format!("creating {}", paths.state.display()), e))?;
        self.inner
            .fetcher
            .start(&target, part, bin.fetch.clone())
            .map_err(ReconcileError::Runtime)?;
        Err(ReconcileError::InProgress(format!(
            "downloading fleetlet-agent {}",
            spec.version
        )))
    }
}

/// What `binary --version` says its version is, run for at most 10 s.
fn version_of(binary: &Path) -> Result<String, String> {
    let out = std::process::Command::new(binary)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("running {} --version: {e}", binary.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .strip_prefix("fleetlet-agent ")
        .map(str::to_owned)
        .filter(|_| out.status.success())
        .ok_or_else(|| {
            format!(
                "{} --version printed {:?} (exit {:?})",
                binary.display(),
                text.trim(),
                out.status.code()
            )
        })
}

impl Reconciler for UpgradeReconciler {
    type Spec = AgentUpgradeSpec;

    async fn observe(
        &self,
        _id: &ResourceId,
        spec: &AgentUpgradeSpec,
    ) -> Result<Observation, ReconcileError> {
        let bin = self.verified(spec)?;
        let paths = self.paths()?;
        if let Some(f) = paths.load::<Failed>(&paths.failed())
            && f.digest == Self::digest(spec, bin)
        {
            return Err(ReconcileError::RolledBack(f.reason));
        }
        if paths.load::<Pending>(&paths.pending()).is_some() {
            return Ok(Observation::Differs(
                "an upgrade awaits confirmation".into(),
            ));
        }
        if VERSION == spec.version {
            Ok(Observation::InSync(self.details()))
        } else {
            Ok(Observation::Differs(format!(
                "running {VERSION}, not {}",
                spec.version
            )))
        }
    }

    async fn reconcile(
        &self,
        _id: &ResourceId,
        spec: &AgentUpgradeSpec,
    ) -> Result<ResourceDetails, ReconcileError> {
        let bin = self.verified(spec)?;
        let paths = self.paths()?.clone();
        let digest = Self::digest(spec, bin);
        if let Some(f) = paths.load::<Failed>(&paths.failed())
            && f.digest == digest
        {
            return Err(ReconcileError::RolledBack(f.reason));
        }
        let pending = paths.load::<Pending>(&paths.pending());
        if VERSION == spec.version {
            if let Some(p) = pending.filter(|p| p.to == VERSION) {
                if self.healthy(&p).await {
                    info!(version = VERSION, from = %p.from, "upgrade confirmed");
                    Paths::forget(&paths.pending())?;
                } else {
                    let reason = format!(
                        "fleetlet-agent {} did not reach its control plane within {} s; {} was put back",
                        p.to, p.health_seconds, p.from
                    );
                    warn!(%reason, "rolling back the upgrade");
                    paths.put_back(&p, reason)?;
                    self.restart_soon();
                    return Err(ReconcileError::InProgress(format!(
                        "rolling back to {}",
                        p.from
                    )));
                }
            }
            return Ok(self.details());
        }
        if let Some(p) = pending {
            let swapped = p.from == VERSION
                && p.to == spec.version
                && fetch::sha256_file(&paths.binary, bin.fetch.size)
                    .is_ok_and(|sha| sha == bin.fetch.sha256);
            if swapped {
                // The new binary is in place and this process waits for systemd to restart
                // it; asked again if that has not happened after a while.
                if now_secs() >= p.started + 20 {
                    self.restart_soon();
                }
                return Err(ReconcileError::InProgress(format!(
                    "restarting into fleetlet-agent {}",
                    spec.version
                )));
            }
            // A swap that did not complete (a crash before the rename), or for another
            // spec: start over.
            Paths::forget(&paths.pending())?;
        }
        let target = self.downloaded(spec, bin)?;
        std::fs::set_permissions(&target, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .map_err(|e| {
                ReconcileError::io(format!("making {} executable", target.display()), e)
            })?;
        let reported = tokio::task::spawn_blocking({
            let target = target.clone();
            move || version_of(&target)
        })
        .await
        .map_err(|e| ReconcileError::Runtime(format!("checking the new binary: {e}")))?;
        match reported {
            Ok(v) if v == spec.version => {}
            Ok(v) => {
                return Err(ReconcileError::Invalid(format!(
                    "the signed binary reports version {v}, not {}",
                    spec.version
                )));
            }
            Err(e) => return Err(ReconcileError::Invalid(format!("the new binary: {e}"))),
        }
        copy_atomic(&paths.binary, &paths.previous(), 0o755).map_err(|e| {
            ReconcileError::io(format!("keeping {}", paths.previous().display()), e)
        })?;
        write_atomic(
            &paths.previous_version(),
            VERSION.as_bytes(),
            0o644,
            Ownership::default(),
        )
        .map_err(|e| ReconcileError::io("recording the kept version".to_owned(), e))?;
        let health_seconds = spec.health_seconds.unwrap_or(self.inner.default_health);
        paths.store(
            &paths.pending(),
            &Pending {
                from: VERSION.to_owned(),
                to: spec.version.clone(),
                digest,
                started: now_secs(),
                health_seconds,
            },
        )?;
        copy_atomic(&target, &paths.binary, 0o755)
            .map_err(|e| ReconcileError::io(format!("replacing {}", paths.binary.display()), e))?;
        let _ = std::fs::remove_file(&target);
        info!(from = VERSION, to = %spec.version, "new agent binary in place; restarting");
        self.restart_soon();
        Err(ReconcileError::InProgress(format!(
            "restarting into fleetlet-agent {}",
            spec.version
        )))
    }

    async fn delete(
        &self,
        _id: &ResourceId,
        _applied: &AgentUpgradeSpec,
    ) -> Result<Deleted, ReconcileError> {
        // The agent keeps the version it runs; only the records of this spec go.
        let paths = self.paths()?;
        Paths::forget(&paths.failed())?;
        Ok(Deleted::Removed)
    }

    fn moves(&self, _old: &AgentUpgradeSpec, _new: &AgentUpgradeSpec) -> bool {
        false
    }
}
