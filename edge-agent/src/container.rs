//! The Container reconciler: podman containers through podman's libpod REST API.
//!
//! Ownership lives on the containers themselves, as labels (device, resource id, spec
//! hash), so it survives agent restarts and the agent never touches a container it did not
//! create. A changed spec replaces the container, pulling the new image first so a failed
//! pull leaves the old container running.

use std::{
    collections::{BTreeSet, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use fleetlet_protocol::{
    ContainerLimits, ContainerSpec, DeviceId, HostPathMount, PortProtocol, ProbeAction, PullPolicy,
    ResourceDetails, ResourceId, RestartPolicy, Timestamp,
};
use futures::StreamExt;
use podman_api::{
    Podman,
    models::{ContainerMount, InspectContainerData, ListContainer, PortMapping},
    opts::{
        ContainerCreateOpts, ContainerDeleteOpts, ContainerListFilter, ContainerListOpts,
        ContainerRestartPolicy, ExecCreateOpts, ExecStartOpts, PullOpts,
    },
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};
use tracing::{debug, info, warn};

use crate::{
    config::{ConfigError, invalid},
    file::sha256_hex,
    fsutil::{Ownership, write_atomic},
    reconciler::{Deleted, Observation, ReconcileError, Reconciler},
};

/// Labels on every container the agent creates.
pub const LABEL_DEVICE: &str = "dev.fleetlet.device";
pub const LABEL_RESOURCE: &str = "dev.fleetlet.resource";
pub const LABEL_SPEC: &str = "dev.fleetlet.spec-hash";

/// Images the agent pulled, remembered across restarts so only those are pruned.
const PULLED_FILE: &str = "pulled-images.json";

#[derive(Clone)]
pub struct ContainerReconciler {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ContainerReconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerReconciler")
            .field("socket", &self.inner.config.socket)
            .finish_non_exhaustive()
    }
}

struct Inner {
    podman: Podman,
    config: ContainerConfig,
    device: DeviceId,
    pulled_path: PathBuf,
    pulled: Mutex<BTreeSet<String>>,
    probes: Mutex<HashMap<ResourceId, ProbeState>>,
    /// Times the agent started an exited container again (by container id): restarts
    /// podman's own `RestartCount` does not see, when the agent got there first.
    restarts: Mutex<HashMap<String, u32>>,
    /// `file.path_prefix`: host paths of mounts move with the files written there.
    host_prefix: Option<PathBuf>,
    /// Opens sealed environment values (a Pod's Secret).
    sealing: Option<Arc<crate::sealing::SealingKey>>,
    /// Held shared from a pull until the container made from it exists, and exclusively by
    /// a prune: resources reconcile concurrently, and a prune between another resource's
    /// pull and its create would remove the image under it.
    image_use: tokio::sync::RwLock<()>,
}

/// Readiness of one container, as its probe last found it.
#[derive(Debug, Clone)]
struct ProbeState {
    container_id: String,
    due: Instant,
    failures: u32,
    ready: bool,
}

/// What identifies a container's configuration: everything that needs a new container
/// when it changes. The probe and the pull policy are the agent's business, not podman's.
pub fn spec_hash(spec: &ContainerSpec) -> String {
    let mut s = spec.clone();
    s.probe = None;
    s.image_pull_policy = PullPolicy::default();
    let bytes = serde_json::to_vec(&s).unwrap_or_default();
    sha256_hex(&bytes)[..32].to_owned()
}

fn label<'a>(c: &'a ListContainer, key: &str) -> Option<&'a str> {
    c.labels.as_ref()?.get(key).map(String::as_str)
}

/// The part of a podman error message worth showing in status.
fn short_reason(message: &str) -> String {
    let m = message.trim();
    let lower = m.to_ascii_lowercase();
    let known = [
        ("manifest unknown", "image not found in the registry"),
        ("name unknown", "image not found in the registry"),
        ("not found: manifest", "image not found in the registry"),
        ("address already in use", "host port already in use"),
        (
            "connection refused",
            "registry unreachable (connection refused)",
        ),
        ("no such host", "registry host unknown"),
        ("i/o timeout", "registry unreachable (timeout)"),
        ("no space left on device", "no space left on device"),
        (
            "executable file not found",
            "command not found in the image",
        ),
        (
            "no such file or directory",
            "a path in the spec does not exist",
        ),
    ];
    let mut short = m.chars().take(300).collect::<String>();
    if short.len() < m.len() {
        short.push('…');
    }
    match known.iter().find(|(needle, _)| lower.contains(needle)) {
        Some((_, what)) => format!("{what}: {short}"),
        None => short,
    }
}

fn podman_err(context: &str, e: podman_api::Error) -> ReconcileError {
    let message = match &e {
        podman_api::Error::Fault { code, message } => format!("{message} (HTTP {code})"),
        other => other.to_string(),
    };
    ReconcileError::Runtime(format!("{context}: {}", short_reason(&message)))
}

fn is_not_found(e: &podman_api::Error) -> bool {
    matches!(e, podman_api::Error::Fault { code, .. } if code.as_u16() == 404)
}

/// Whether a container in `state` is what `policy` wants.
fn state_ok(policy: RestartPolicy, state: &str, exit_code: Option<i32>) -> bool {
    let ended = matches!(state, "exited" | "stopped");
    match (state, policy) {
        ("running", _) => true,
        (_, RestartPolicy::Always) => false,
        (_, RestartPolicy::OnFailure) => ended && exit_code == Some(0),
        (_, RestartPolicy::Never) => ended,
    }
}

impl ContainerReconciler {
    /// `state_dir` holds the record of pulled images.
    pub fn new(config: ContainerConfig, device: DeviceId, state_dir: &std::path::Path) -> Self {
        Self::with_host_prefix(config, device, state_dir, None)
    }

    /// Like [`ContainerReconciler::new`], with mount host paths re-rooted under `prefix`
    /// (the agent's `file.path_prefix`, for several agents on one machine).
    pub fn with_host_prefix(
        config: ContainerConfig,
        device: DeviceId,
        state_dir: &std::path::Path,
        host_prefix: Option<PathBuf>,
    ) -> Self {
        let podman = Podman::unix(&config.socket);
        let pulled_path = state_dir.join(PULLED_FILE);
        let pulled = std::fs::read(&pulled_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Self {
            inner: Arc::new(Inner {
                podman,
                config,
                device,
                pulled_path,
                pulled: Mutex::new(pulled),
                probes: Mutex::new(HashMap::new()),
                restarts: Mutex::new(HashMap::new()),
                host_prefix,
                sealing: None,
                image_use: tokio::sync::RwLock::new(()),
            }),
        }
    }

    /// Opens sealed environment values with the device's key (at construction).
    pub fn with_sealing(mut self, key: Arc<crate::sealing::SealingKey>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.sealing = Some(key);
        }
        self
    }

    /// The environment as the container gets it: sealed values opened.
    fn environment(&self, spec: &ContainerSpec) -> Result<Vec<(String, String)>, ReconcileError> {
        spec.env
            .iter()
            .map(|e| match &e.sealed_value {
                None => Ok((e.name.clone(), e.value.clone())),
                Some(sealed) => {
                    let key = self.inner.sealing.as_ref().ok_or_else(|| {
                        ReconcileError::Invalid(format!(
                            "env {}: sealed, and no sealing key",
                            e.name
                        ))
                    })?;
                    let bytes = key
                        .open(sealed)
                        .map_err(|err| ReconcileError::Invalid(format!("env {}: {err}", e.name)))?;
                    Ok((e.name.clone(), String::from_utf8_lossy(&bytes).into_owned()))
                }
            })
            .collect()
    }

    /// The id of the container this agent created for resource `id`, if there is one.
    pub async fn owned_container(&self, id: &ResourceId) -> Result<Option<String>, ReconcileError> {
        Ok(self.find(id).await?.into_iter().find_map(|c| c.id))
    }

    /// Every running container this agent created: its resource, podman id and start time
    /// (seconds since the Unix epoch), for resource-usage reports.
    pub async fn running(&self) -> Result<Vec<(ResourceId, String, i64)>, ReconcileError> {
        Ok(self
            .owned(None)
            .await?
            .iter()
            .filter(|c| c.state.as_deref() == Some("running"))
            .filter_map(|c| {
                let id = ResourceId::new(label(c, LABEL_RESOURCE)?.to_owned()).ok()?;
                Some((id, c.id.clone()?, c.started_at.unwrap_or(0)))
            })
            .collect())
    }

    /// podman's version as `podman://<version>`, if podman answers.
    pub async fn runtime_version(&self) -> Option<String> {
        match self.inner.podman.version().await {
            Ok(v) => Some(format!(
                "podman://{}",
                v.version.unwrap_or_else(|| "unknown".into())
            )),
            Err(e) => {
                debug!(error = %e, "podman does not answer its version");
                None
            }
        }
    }

    /// How often container `cid` was restarted: podman's `RestartCount` (`podman`) and the
    /// agent's own starts of it after it exited (remembered while the agent runs).
    pub fn restart_count(&self, cid: &str, podman: Option<i32>) -> u32 {
        let podman = podman.and_then(|n| u32::try_from(n).ok()).unwrap_or(0);
        let ours = self
            .inner
            .restarts
            .lock()
            .ok()
            .and_then(|r| r.get(cid).copied())
            .unwrap_or(0);
        podman.saturating_add(ours)
    }

    /// The podman client (for logs and exec of owned containers).
    pub fn podman(&self) -> &Podman {
        &self.inner.podman
    }

    /// When the next readiness probe is due, if any container has one.
    pub fn next_probe(&self) -> Option<Instant> {
        let probes = self.inner.probes.lock().ok()?;
        probes.values().map(|p| p.due).min()
    }

    fn container_name(&self, id: &ResourceId) -> String {
        format!("{}{id}", self.inner.config.name_prefix)
    }

    /// The agent's containers for `id` (normally none or one).
    async fn find(&self, id: &ResourceId) -> Result<Vec<ListContainer>, ReconcileError> {
        self.owned(Some(id)).await
    }

    /// Every container (running or not) this agent created, or only those of `id`.
    async fn owned(&self, id: Option<&ResourceId>) -> Result<Vec<ListContainer>, ReconcileError> {
        let mut filters = vec![ContainerListFilter::LabelKeyVal(
            LABEL_DEVICE.into(),
            self.inner.device.to_string(),
        )];
        if let Some(id) = id {
            filters.push(ContainerListFilter::LabelKeyVal(
                LABEL_RESOURCE.into(),
                id.to_string(),
            ));
        }
        let opts = ContainerListOpts::builder()
            .all(true)
            .filter(filters)
            .build();
        let list = self
            .inner
            .podman
            .containers()
            .list(&opts)
            .await
            .map_err(|e| podman_err("listing containers", e))?;
        // Filter again here: ownership must not depend on how the server combines filters.
        Ok(list
            .into_iter()
            .filter(|c| {
                label(c, LABEL_DEVICE) == Some(self.inner.device.as_str())
                    && id.is_none_or(|id| label(c, LABEL_RESOURCE) == Some(id.as_str()))
            })
            .collect())
    }

    async fn inspect(&self, cid: &str) -> Result<InspectContainerData, ReconcileError> {
        self.inner
            .podman
            .containers()
            .get(cid)
            .inspect()
            .await
            .map_err(|e| podman_err("inspecting container", e))
    }

    /// Stops and removes one container; gone already is fine.
    async fn remove(&self, cid: &str) -> Result<(), ReconcileError> {
        let opts = ContainerDeleteOpts::builder()
            .force(true)
            .timeout(self.inner.config.stop_timeout_seconds as usize)
            .build();
        match self.inner.podman.containers().get(cid).delete(&opts).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(podman_err("removing container", e)),
        }
    }

    async fn start(&self, cid: &str) -> Result<(), ReconcileError> {
        self.inner
            .podman
            .containers()
            .get(cid)
            .start(None)
            .await
            .map_err(|e| podman_err("starting container", e))
    }

    fn registry_of(image: &str) -> &str {
        match image.split_once('/') {
            Some((host, _)) if host.contains(['.', ':']) || host == "localhost" => host,
            _ => "docker.io",
        }
    }

    /// Makes `spec.image` present, pulling it as the pull policy says.
    async fn ensure_image(&self, spec: &ContainerSpec) -> Result<(), ReconcileError> {
        let podman = &self.inner.podman;
        let present = podman
            .images()
            .get(&spec.image)
            .exists()
            .await
            .map_err(|e| podman_err("looking up image", e))?;
        if present && spec.image_pull_policy == PullPolicy::IfNotPresent {
            return Ok(());
        }
        self.check_disk().await?;
        let insecure = self
            .inner
            .config
            .insecure_registries
            .iter()
            .any(|r| r == Self::registry_of(&spec.image));
        let opts = PullOpts::builder()
            .reference(&spec.image)
            .tls_verify(!insecure)
            .quiet(true)
            .build();
        let started = std::time::Instant::now();
        let images = podman.images();
        let mut stream = images.pull(&opts);
        let mut pulled_id = None;
        while let Some(report) = stream.next().await {
            let report = report.map_err(|e| podman_err(&format!("pulling {}", spec.image), e))?;
            if let Some(error) = report.error.filter(|e| !e.is_empty()) {
                return Err(ReconcileError::Runtime(format!(
                    "pulling {}: {}",
                    spec.image,
                    short_reason(&error)
                )));
            }
            if let Some(id) = report.id {
                pulled_id = Some(id);
            }
        }
        if pulled_id.is_none() {
            return Err(ReconcileError::Runtime(format!(
                "pulling {}: podman reported no image",
                spec.image
            )));
        }
        info!(image = %spec.image, elapsed_ms = started.elapsed().as_millis() as u64, "image pulled");
        self.remember_pulled(&spec.image, true);
        Ok(())
    }

    fn remember_pulled(&self, image: &str, pulled: bool) {
        let Ok(mut set) = self.inner.pulled.lock() else {
            return;
        };
        let changed = if pulled {
            set.insert(image.to_owned())
        } else {
            set.remove(image)
        };
        if changed {
            let bytes = serde_json::to_vec(&*set).unwrap_or_default();
            if let Err(e) =
                write_atomic(&self.inner.pulled_path, &bytes, 0o600, Ownership::default())
            {
                warn!(error = %e, "could not record pulled images");
            }
        }
    }

    /// Refuses to pull when podman's storage is short of space.
    async fn check_disk(&self) -> Result<(), ReconcileError> {
        let floor = self
            .inner
            .config
            .min_free_disk_mib
            .saturating_mul(1024 * 1024);
        if floor == 0 {
            return Ok(());
        }
        let info = self
            .inner
            .podman
            .info()
            .await
            .map_err(|e| podman_err("asking podman for its storage", e))?;
        let Some(root) = info.store.and_then(|s| s.graph_root) else {
            return Ok(());
        };
        let stat = rustix::fs::statvfs(root.as_str())
            .map_err(|e| ReconcileError::io(format!("checking free space of {root}"), e.into()))?;
        let free = stat.f_bavail.saturating_mul(stat.f_frsize);
        if free < floor {
            return Err(ReconcileError::Runtime(format!(
                "disk guard: {} MiB free in {root}, below this device's floor of {} MiB; not pulling",
                free / (1024 * 1024),
                self.inner.config.min_free_disk_mib
            )));
        }
        Ok(())
    }

    /// Removes images the agent pulled that none of its containers use any more.
    async fn prune(&self) {
        if !self.inner.config.prune_images {
            return;
        }
        // Not while another resource is between its pull and its create.
        let _alone = self.inner.image_use.write().await;
        let candidates: Vec<String> = match self.inner.pulled.lock() {
            Ok(set) => set.iter().cloned().collect(),
            Err(_) => return,
        };
        if candidates.is_empty() {
            return;
        }
        let opts = ContainerListOpts::builder()
            .all(true)
            .filter([ContainerListFilter::LabelKey(LABEL_DEVICE.into())])
            .build();
        let Ok(ours) = self.inner.podman.containers().list(&opts).await else {
            return;
        };
        let in_use: BTreeSet<&str> = ours.iter().filter_map(|c| c.image.as_deref()).collect();
        for image in candidates {
            if in_use.contains(image.as_str()) {
                continue;
            }
            match self.inner.podman.images().get(&image).remove().await {
                Ok(()) => {
                    info!(%image, "pruned image no longer used");
                    self.remember_pulled(&image, false);
                }
                Err(e) if is_not_found(&e) => self.remember_pulled(&image, false),
                // Used by a container fleetlet does not manage: it is the owner's now.
                Err(podman_api::Error::Fault { code, .. }) if code.as_u16() == 409 => {
                    self.remember_pulled(&image, false)
                }
                Err(e) => debug!(%image, error = %e, "could not prune image"),
            }
        }
    }

    /// Where the host side of `m` really is, if the device's policy allows mounting it:
    /// at or below a `mount_roots` entry after following symbolic links, and read-write
    /// only below a `writable_mount_roots` entry. Missing directories are created.
    fn mount_source(&self, m: &HostPathMount) -> Result<String, ReconcileError> {
        let config = &self.inner.config;
        let host = Path::new(&m.host_path);
        if !host.is_absolute()
            || host
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(ReconcileError::Invalid(format!(
                "mount host path {} must be absolute, without ..",
                m.host_path
            )));
        }
        let prefix = self.inner.host_prefix.as_deref();
        let under = |roots: &[PathBuf], real: &Path| {
            roots.iter().any(|r| {
                on_host(prefix, r)
                    .canonicalize()
                    .is_ok_and(|root| real.starts_with(root))
            })
        };
        if !config.mount_roots.iter().any(|r| host.starts_with(r)) {
            return Err(ReconcileError::Forbidden(format!(
                "mounting {} is outside the roots containers may mount ({})",
                m.host_path,
                shown(&config.mount_roots)
            )));
        }
        let path = on_host(prefix, host);
        if !path.exists() {
            std::fs::create_dir_all(&path)
                .map_err(|e| ReconcileError::io(format!("creating {}", path.display()), e))?;
        }
        let real = path
            .canonicalize()
            .map_err(|e| ReconcileError::io(format!("resolving {}", path.display()), e))?;
        if !under(&config.mount_roots, &real) {
            return Err(ReconcileError::Forbidden(format!(
                "mounting {} resolves to {} through a symbolic link, outside the roots containers may mount ({})",
                m.host_path,
                real.display(),
                shown(&config.mount_roots)
            )));
        }
        if !m.read_only && !under(&config.writable_mount_roots, &real) {
            return Err(ReconcileError::Forbidden(format!(
                "mounting {} read-write; the device allows that only below {} (set readOnly)",
                m.host_path,
                if config.writable_mount_roots.is_empty() {
                    "no path".to_string()
                } else {
                    shown(&config.writable_mount_roots)
                }
            )));
        }
        Ok(real.display().to_string())
    }

    fn create_opts(
        &self,
        id: &ResourceId,
        spec: &ContainerSpec,
    ) -> Result<ContainerCreateOpts, ReconcileError> {
        let mut b = ContainerCreateOpts::builder()
            .name(self.container_name(id))
            .image(&spec.image)
            .labels([
                (LABEL_DEVICE, self.inner.device.to_string()),
                (LABEL_RESOURCE, id.to_string()),
                (LABEL_SPEC, spec_hash(spec)),
            ])
            .stop_timeout(u64::from(self.inner.config.stop_timeout_seconds))
            .restart_policy(restart_policy(spec.restart_policy));
        if !spec.command.is_empty() {
            b = b.entrypoint(&spec.command);
        }
        if !spec.args.is_empty() {
            b = b.command(&spec.args);
        }
        if !spec.env.is_empty() {
            b = b.env(self.environment(spec)?);
        }
        if !spec.ports.is_empty() {
            b = b.portmappings(spec.ports.iter().map(port_mapping));
        }
        if !spec.mounts.is_empty() {
            let sources = spec
                .mounts
                .iter()
                .map(|m| self.mount_source(m))
                .collect::<Result<Vec<String>, ReconcileError>>()?;
            b = b.mounts(
                spec.mounts
                    .iter()
                    .zip(sources)
                    .map(|(m, source)| bind_mount(m, source)),
            );
        }
        if let Some(limits) = &spec.limits {
            // The generated models have no constructors; every field is optional.
            match serde_json::from_value(resource_limits(limits)) {
                Ok(r) => b = b.resource_limits(r),
                Err(e) => warn!(error = %e, "could not express resource limits for podman"),
            }
        }
        Ok(b.build())
    }

    /// Creates and starts a new container for `spec`.
    async fn create(
        &self,
        id: &ResourceId,
        spec: &ContainerSpec,
    ) -> Result<String, ReconcileError> {
        let created = self
            .inner
            .podman
            .containers()
            .create(&self.create_opts(id, spec)?)
            .await
            .map_err(|e| match &e {
                // podman 4.3 answers 500 with this message; later versions 409.
                podman_api::Error::Fault { code, message }
                    if code.as_u16() == 409 || message.contains("name is already in use") =>
                {
                    ReconcileError::Runtime(format!(
                        "container name {:?} is taken by a container fleetlet did not create",
                        self.container_name(id)
                    ))
                }
                _ => podman_err("creating container", e),
            })?;
        let cid = created.id;
        info!(resource = %id, container = %short_id(&cid), image = %spec.image, "container created");
        self.start(&cid).await?;
        Ok(cid)
    }

    /// Status details of a container, running its probe if one is due.
    async fn details(
        &self,
        id: &ResourceId,
        spec: &ContainerSpec,
        info: &InspectContainerData,
    ) -> ResourceDetails {
        let state = info.state.as_ref();
        let status = state
            .and_then(|s| s.status.clone())
            .unwrap_or_else(|| "unknown".into());
        let running = status == "running";
        let cid = info.id.clone().unwrap_or_default();
        let probe_ready = match &spec.probe {
            Some(p) if !running => {
                if let Ok(mut probes) = self.inner.probes.lock() {
                    probes.insert(
                        id.clone(),
                        ProbeState {
                            container_id: cid.clone(),
                            due: Instant::now()
                                + Duration::from_secs(u64::from(p.period_seconds.max(1))),
                            failures: 0,
                            ready: false,
                        },
                    );
                }
                Some(false)
            }
            Some(_) => Some(self.probe(id, spec, &cid).await),
            None => None,
        };
        ResourceDetails::Container {
            container_id: short_id(&cid).to_owned(),
            image_digest: info.image_digest.clone(),
            state: status,
            restart_count: self.restart_count(&cid, info.restart_count),
            started_at: state
                .and_then(|s| s.started_at)
                .filter(|t| t.timestamp() > 0)
                .and_then(|t| u64::try_from(t.timestamp_millis()).ok())
                .map(Timestamp),
            exit_code: if running {
                None
            } else {
                state.and_then(|s| s.exit_code)
            },
            probe_ready,
        }
    }

    /// The probe's verdict for container `cid`, running it if due.
    async fn probe(&self, id: &ResourceId, spec: &ContainerSpec, cid: &str) -> bool {
        let Some(probe) = &spec.probe else {
            return true;
        };
        let now = Instant::now();
        let prev = self
            .inner
            .probes
            .lock()
            .ok()
            .and_then(|p| p.get(id).cloned())
            .filter(|p| p.container_id == cid);
        if let Some(p) = &prev
            && p.due > now
        {
            return p.ready;
        }
        let period = Duration::from_secs(u64::from(probe.period_seconds.max(1)));
        let timeout = period.min(Duration::from_secs(5));
        let ok = match tokio::time::timeout(timeout, self.run_probe(spec, &probe.action, cid)).await
        {
            Ok(Ok(())) => true,
            Ok(Err(why)) => {
                debug!(resource = %id, %why, "probe failed");
                false
            }
            Err(_) => {
                debug!(resource = %id, "probe timed out");
                false
            }
        };
        let (failures, was_ready) = prev.map_or((0, false), |p| (p.failures, p.ready));
        let failures = if ok { 0 } else { failures.saturating_add(1) };
        // A new container is not ready until its probe passes; a ready one turns not ready
        // after `failureThreshold` consecutive failures.
        let ready = ok || (was_ready && failures < probe.failure_threshold.max(1));
        if ready != was_ready {
            info!(resource = %id, ready, "readiness changed");
        }
        if let Ok(mut p) = self.inner.probes.lock() {
            p.insert(
                id.clone(),
                ProbeState {
                    container_id: cid.to_owned(),
                    due: now + period,
                    failures,
                    ready,
                },
            );
        }
        ready
    }

    async fn run_probe(
        &self,
        spec: &ContainerSpec,
        action: &ProbeAction,
        cid: &str,
    ) -> Result<(), String> {
        match action {
            ProbeAction::Exec { command } => self.exec_probe(command, cid).await,
            ProbeAction::Http { port, path } => http_probe(probe_addr(spec, *port), path).await,
            ProbeAction::Tcp { port } => TcpStream::connect(probe_addr(spec, *port))
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
        }
    }

    /// Runs `command` in container `cid`; passes when it exits with 0.
    async fn exec_probe(&self, command: &[String], cid: &str) -> Result<(), String> {
        let container = self.inner.podman.containers().get(cid);
        let exec = container
            .create_exec(
                &ExecCreateOpts::builder()
                    .command(command)
                    .attach_stdout(true)
                    .attach_stderr(true)
                    .build(),
            )
            .await
            .map_err(|e| e.to_string())?;
        if let Some(mut out) = exec
            .start(&ExecStartOpts::builder().build())
            .await
            .map_err(|e| e.to_string())?
        {
            while out.next().await.is_some() {}
        }
        let info = exec.inspect().await.map_err(|e| e.to_string())?;
        match info.get("ExitCode").and_then(serde_json::Value::as_i64) {
            Some(0) => Ok(()),
            Some(code) => Err(format!("exited with {code}")),
            None => Err("no exit code".into()),
        }
    }
}

/// GETs `path` from `addr`; passes on a 2xx or 3xx status.
async fn http_probe(addr: (String, u16), path: &str) -> Result<(), String> {
    let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    stream
        .write_all(probe_request(path).as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut head = [0u8; 64];
    let n = stream.read(&mut head).await.map_err(|e| e.to_string())?;
    http_verdict(&String::from_utf8_lossy(&head[..n]))
}

/// The request an HTTP probe sends for `path` (made absolute if it is not).
fn probe_request(path: &str) -> String {
    let path = if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    };
    format!("GET {path} HTTP/1.0\r\nHost: localhost\r\nUser-Agent: fleetlet-probe\r\n\r\n")
}

/// An HTTP probe's verdict on the start of the response (`line`, its status line first):
/// 2xx and 3xx pass.
fn http_verdict(line: &str) -> Result<(), String> {
    let code: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {line:?}"))?;
    if (200..400).contains(&code) {
        Ok(())
    } else {
        Err(format!("HTTP {code}"))
    }
}

/// podman's restart policy for `policy`.
fn restart_policy(policy: RestartPolicy) -> ContainerRestartPolicy {
    match policy {
        RestartPolicy::Always => ContainerRestartPolicy::Always,
        RestartPolicy::OnFailure => ContainerRestartPolicy::OnFailure,
        RestartPolicy::Never => ContainerRestartPolicy::No,
    }
}

/// podman's port mapping for `p`: the host port defaults to the container port.
fn port_mapping(p: &fleetlet_protocol::PortMapping) -> PortMapping {
    PortMapping {
        container_port: Some(p.container_port),
        host_port: Some(p.host_port.unwrap_or(p.container_port)),
        host_ip: p.host_ip.clone(),
        protocol: Some(
            match p.protocol {
                PortProtocol::TCP => "tcp",
                PortProtocol::UDP => "udp",
            }
            .into(),
        ),
        range: None,
    }
}

/// Where `path` is on this machine: re-rooted under `prefix` (the agent's
/// `file.path_prefix`) when there is one.
fn on_host(prefix: Option<&Path>, path: &Path) -> PathBuf {
    match prefix {
        Some(prefix) => prefix.join(path.strip_prefix("/").unwrap_or(path)),
        None => path.to_path_buf(),
    }
}

/// `roots` as a list for a message.
fn shown(roots: &[PathBuf]) -> String {
    roots
        .iter()
        .map(|r| r.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// podman's bind mount of `source` (the checked host path) for `m`.
fn bind_mount(m: &HostPathMount, source: String) -> ContainerMount {
    ContainerMount {
        destination: Some(m.container_path.clone()),
        source: Some(source),
        _type: Some("bind".into()),
        options: Some(vec![
            "rbind".into(),
            if m.read_only { "ro" } else { "rw" }.into(),
        ]),
        uid_mappings: None,
        gid_mappings: None,
    }
}

/// `limits` as podman's `resource_limits` JSON: a memory limit in bytes, and CPU as a
/// quota per 100 ms period (a millicore is 100 µs of it).
fn resource_limits(limits: &ContainerLimits) -> serde_json::Value {
    let mut resources = serde_json::Map::new();
    if let Some(bytes) = limits.memory_bytes {
        resources.insert("memory".into(), serde_json::json!({ "limit": bytes }));
    }
    if let Some(millis) = limits.cpu_millis {
        resources.insert(
            "cpu".into(),
            serde_json::json!({ "period": 100_000u64, "quota": u64::from(millis) * 100 }),
        );
    }
    serde_json::Value::Object(resources)
}

/// Where the device reaches a published port: its host IP if the spec binds one.
fn probe_addr(spec: &ContainerSpec, port: u16) -> (String, u16) {
    let ip = spec
        .ports
        .iter()
        .find(|p| p.host_port.unwrap_or(p.container_port) == port)
        .and_then(|p| p.host_ip.clone())
        .filter(|ip| ip != "0.0.0.0" && ip != "::")
        .unwrap_or_else(|| "127.0.0.1".into());
    (ip, port)
}

fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

impl Reconciler for ContainerReconciler {
    type Spec = ContainerSpec;

    async fn observe(
        &self,
        id: &ResourceId,
        spec: &ContainerSpec,
    ) -> Result<Observation, ReconcileError> {
        let found = self.find(id).await?;
        let c = match found.as_slice() {
            [] => return Ok(Observation::Absent),
            [c] => c,
            many => {
                return Ok(Observation::Differs(format!(
                    "{} containers carry this resource's labels",
                    many.len()
                )));
            }
        };
        if label(c, LABEL_SPEC) != Some(spec_hash(spec).as_str()) {
            return Ok(Observation::Differs(
                "container was created for another spec".into(),
            ));
        }
        let cid = c.id.clone().unwrap_or_default();
        let info = match self.inspect(&cid).await {
            Ok(info) => info,
            // Removed between list and inspect.
            Err(_)
                if !self
                    .inner
                    .podman
                    .containers()
                    .get(&cid)
                    .exists()
                    .await
                    .unwrap_or(true) =>
            {
                return Ok(Observation::Absent);
            }
            Err(e) => return Err(e),
        };
        let state = info.state.as_ref();
        let status = state.and_then(|s| s.status.as_deref()).unwrap_or("unknown");
        let exit_code = state.and_then(|s| s.exit_code);
        if !state_ok(spec.restart_policy, status, exit_code) {
            return Ok(Observation::Differs(format!(
                "container is {status} (exit code {})",
                exit_code.map_or("none".into(), |c| c.to_string())
            )));
        }
        Ok(Observation::InSync(self.details(id, spec, &info).await))
    }

    async fn reconcile(
        &self,
        id: &ResourceId,
        spec: &ContainerSpec,
    ) -> Result<ResourceDetails, ReconcileError> {
        let want = spec_hash(spec);
        let found = self.find(id).await?;
        let (current, stale): (Vec<_>, Vec<_>) = found
            .into_iter()
            .partition(|c| label(c, LABEL_SPEC) == Some(want.as_str()));
        if let ([c], []) = (current.as_slice(), stale.as_slice()) {
            let cid = c.id.clone().unwrap_or_default();
            let info = self.inspect(&cid).await?;
            let state = info.state.as_ref();
            let status = state.and_then(|s| s.status.as_deref()).unwrap_or("unknown");
            if !state_ok(spec.restart_policy, status, state.and_then(|s| s.exit_code)) {
                info!(resource = %id, container = %short_id(&cid), %status, "starting container");
                self.start(&cid).await?;
                if status != "created"
                    && let Ok(mut r) = self.inner.restarts.lock()
                {
                    *r.entry(cid.clone()).or_default() += 1;
                }
            }
            let info = self.inspect(&cid).await?;
            return Ok(self.details(id, spec, &info).await);
        }
        // The device's policy first: a spec it refuses costs no pull and touches nothing.
        for m in &spec.mounts {
            self.mount_source(m)?;
        }
        // A new container: image first, so a failed pull leaves the old one running.
        let created = {
            let _using = self.inner.image_use.read().await;
            self.ensure_image(spec).await?;
            for c in current.iter().chain(stale.iter()) {
                if let Some(cid) = &c.id {
                    info!(resource = %id, container = %short_id(cid), "removing container for a previous spec");
                    self.remove(cid).await?;
                }
            }
            self.create(id, spec).await
        };
        self.prune().await;
        let cid = created?;
        let info = self.inspect(&cid).await?;
        Ok(self.details(id, spec, &info).await)
    }

    async fn delete(
        &self,
        id: &ResourceId,
        _applied: &ContainerSpec,
    ) -> Result<Deleted, ReconcileError> {
        let found = self.find(id).await?;
        if let Ok(mut p) = self.inner.probes.lock() {
            p.remove(id);
        }
        if found.is_empty() {
            return Ok(Deleted::AlreadyGone);
        }
        for c in &found {
            if let Some(cid) = &c.id {
                self.remove(cid).await?;
            }
        }
        self.prune().await;
        Ok(Deleted::Removed)
    }

    fn moves(&self, _old: &ContainerSpec, _new: &ContainerSpec) -> bool {
        // Same resource id, same labels: a changed spec is replaced in `reconcile`.
        false
    }
}

// ---------------------------------------------------------------- configuration

/// Containers, through podman's REST API.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerConfig {
    /// podman's API socket: `/run/podman/podman.sock` for rootful podman (enable
    /// `podman.socket`), `$XDG_RUNTIME_DIR/podman/podman.sock` for rootless.
    #[serde(default = "default_podman_socket")]
    pub socket: PathBuf,
    /// Container names are this prefix plus the resource id.
    #[serde(default = "default_name_prefix")]
    pub name_prefix: String,
    /// No image is pulled while podman's storage has less free space than this.
    #[serde(default = "default_min_free_disk")]
    pub min_free_disk_mib: u64,
    /// Seconds a container gets to stop before it is killed.
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout_seconds: u32,
    /// Registries reached without TLS verification (`host:port`), e.g. a LAN mirror.
    #[serde(default)]
    pub insecure_registries: Vec<String>,
    /// Remove images the agent pulled once no container of its own uses them.
    #[serde(default = "default_true")]
    pub prune_images: bool,
    /// Host paths a container may mount: at or below one of these (after following
    /// symbolic links). Anything else, `/` included, is refused.
    #[serde(default = "default_mount_roots")]
    pub mount_roots: Vec<PathBuf>,
    /// Of those, where a mount may be read-write; elsewhere mounts must be `readOnly`.
    #[serde(default = "default_writable_mount_roots")]
    pub writable_mount_roots: Vec<PathBuf>,
}

fn default_podman_socket() -> PathBuf {
    PathBuf::from("/run/podman/podman.sock")
}

fn default_name_prefix() -> String {
    "fleetlet-".into()
}

fn default_min_free_disk() -> u64 {
    256
}

fn default_stop_timeout() -> u32 {
    10
}

fn default_true() -> bool {
    true
}

fn default_mount_roots() -> Vec<PathBuf> {
    ["/etc/fleetlet", "/opt/fleetlet", "/srv/fleetlet"]
        .map(PathBuf::from)
        .to_vec()
}

fn default_writable_mount_roots() -> Vec<PathBuf> {
    // Data directories, and the pods' emptyDir volumes.
    ["/srv/fleetlet", "/opt/fleetlet/pods"]
        .map(PathBuf::from)
        .to_vec()
}

impl Default for ContainerConfig {
    fn default() -> Self {
        Self {
            socket: default_podman_socket(),
            name_prefix: default_name_prefix(),
            min_free_disk_mib: default_min_free_disk(),
            stop_timeout_seconds: default_stop_timeout(),
            insecure_registries: Vec::new(),
            prune_images: true,
            mount_roots: default_mount_roots(),
            writable_mount_roots: default_writable_mount_roots(),
        }
    }
}

impl ContainerConfig {
    /// The socket path is absolute; the name prefix is valid in a container name.
    pub(crate) fn check(&self) -> Result<(), ConfigError> {
        if !self.socket.is_absolute() {
            return Err(invalid("container.socket", "must be an absolute path"));
        }
        if !self
            .name_prefix
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || "_.-".contains(ch))
        {
            return Err(invalid(
                "container.name_prefix",
                "letters, digits, '_', '.' and '-' only",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_hash_ignores_probe_and_pull_policy_only() {
        let a = ContainerSpec {
            image: "r/app:1".into(),
            ..Default::default()
        };
        let mut b = a.clone();
        b.image_pull_policy = PullPolicy::Always;
        b.probe = Some(fleetlet_protocol::Probe {
            action: ProbeAction::Tcp { port: 80 },
            period_seconds: 5,
            failure_threshold: 1,
        });
        assert_eq!(spec_hash(&a), spec_hash(&b));
        let mut c = a.clone();
        c.image = "r/app:2".into();
        assert_ne!(spec_hash(&a), spec_hash(&c));
        let mut d = a.clone();
        d.args = vec!["x".into()];
        assert_ne!(spec_hash(&a), spec_hash(&d));
    }

    #[test]
    fn restart_policy_decides_which_states_are_fine() {
        assert!(state_ok(RestartPolicy::Always, "running", None));
        assert!(!state_ok(RestartPolicy::Always, "exited", Some(0)));
        assert!(state_ok(RestartPolicy::OnFailure, "exited", Some(0)));
        assert!(!state_ok(RestartPolicy::OnFailure, "exited", Some(1)));
        assert!(state_ok(RestartPolicy::Never, "exited", Some(1)));
        assert!(!state_ok(RestartPolicy::Never, "created", None));
    }

    #[test]
    fn podman_errors_get_a_short_reason() {
        let r = short_reason(
            "initializing source docker://127.0.0.1:5000/x:9: reading manifest 9 in 127.0.0.1:5000/x: manifest unknown: manifest unknown",
        );
        assert!(r.starts_with("image not found in the registry"), "{r}");
        let r = short_reason("rootlessport listen tcp 0.0.0.0:8080: bind: address already in use");
        assert!(r.starts_with("host port already in use"), "{r}");
        assert_eq!(short_reason("something else"), "something else");
    }

    #[test]
    fn http_probe_sends_an_absolute_path_and_passes_2xx_and_3xx() {
        assert_eq!(
            probe_request("healthz"),
            "GET /healthz HTTP/1.0\r\nHost: localhost\r\nUser-Agent: fleetlet-probe\r\n\r\n"
        );
        assert!(probe_request("/ready?x=1").starts_with("GET /ready?x=1 HTTP/1.0\r\n"));
        assert_eq!(http_verdict("HTTP/1.1 204 No Content\r\n"), Ok(()));
        assert_eq!(http_verdict("HTTP/1.0 302 Found\r\n"), Ok(()));
        assert_eq!(
            http_verdict("HTTP/1.1 503 Service Unavailable"),
            Err("HTTP 503".into())
        );
        assert_eq!(
            http_verdict("SSH-2.0-OpenSSH_9.6"),
            Err("not an HTTP response: \"SSH-2.0-OpenSSH_9.6\"".into())
        );
    }

    #[test]
    fn ports_mounts_and_limits_map_to_podman() {
        let port = port_mapping(&fleetlet_protocol::PortMapping {
            container_port: 53,
            host_port: None,
            protocol: PortProtocol::UDP,
            host_ip: Some("10.0.0.2".into()),
        });
        assert_eq!(port.host_port, Some(53));
        assert_eq!(port.protocol.as_deref(), Some("udp"));
        assert_eq!(port.host_ip.as_deref(), Some("10.0.0.2"));
        let mount = HostPathMount {
            host_path: "/srv/data".into(),
            container_path: "/data".into(),
            read_only: true,
        };
        let bind = bind_mount(&mount, "/real/srv/data".into());
        assert_eq!(bind.source.as_deref(), Some("/real/srv/data"));
        assert_eq!(bind.destination.as_deref(), Some("/data"));
        assert_eq!(bind.options, Some(vec!["rbind".into(), "ro".into()]));
        let limits = ContainerLimits {
            memory_bytes: Some(64 << 20),
            cpu_millis: Some(250),
        };
        assert_eq!(
            resource_limits(&limits),
            serde_json::json!({
                "memory": { "limit": 64u64 << 20 },
                "cpu": { "period": 100_000, "quota": 25_000 },
            })
        );
        assert_eq!(
            resource_limits(&ContainerLimits::default()),
            serde_json::json!({})
        );
    }

    #[test]
    fn mount_paths_move_under_the_host_prefix() {
        let prefix = Path::new("/tmp/dev-1");
        assert_eq!(
            on_host(Some(prefix), Path::new("/srv/data")),
            Path::new("/tmp/dev-1/srv/data")
        );
        assert_eq!(
            on_host(None, Path::new("/srv/data")),
            Path::new("/srv/data")
        );
        assert_eq!(
            shown(&[PathBuf::from("/srv"), PathBuf::from("/var/lib/app")]),
            "/srv, /var/lib/app"
        );
    }

    #[test]
    fn registry_is_the_first_component_only_when_it_is_a_host() {
        assert_eq!(
            ContainerReconciler::registry_of("127.0.0.1:5000/a/b:1"),
            "127.0.0.1:5000"
        );
        assert_eq!(ContainerReconciler::registry_of("localhost/a"), "localhost");
        assert_eq!(
            ContainerReconciler::registry_of("library/busybox"),
            "docker.io"
        );
        assert_eq!(ContainerReconciler::registry_of("busybox"), "docker.io");
    }
}
