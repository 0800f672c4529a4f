//! Agent configuration: a TOML file, overridden by environment variables and flags.
//!
//! ```toml
//! device_id = "pi-kitchen"
//! state_dir = "/var/lib/fleetlet"
//!
//! [nats]
//! urls = ["tls://nats.example.net:4222"]
//! creds_file = "/etc/fleetlet/nats.creds"
//! tls_ca = "/etc/fleetlet/nats-ca.pem"
//!
//! [reconcile]
//! drift_interval_seconds = 30
//! heartbeat_interval_seconds = 30
//! enabled_kinds = ["file", "container", "systemdUnit"]
//!
//! [file]
//! allowed_roots = ["/etc/fleetlet", "/opt/fleetlet"]
//! fetch_ca_file = "/etc/fleetlet/fetch-ca.pem"   # besides the system's CAs
//!
//! [container]
//! socket = "/run/podman/podman.sock"
//! min_free_disk_mib = 256
//!
//! [systemd]
//! unit_dir = "/etc/systemd/system"
//!
//! [shell_job]            # runs only if "shellJob" is in reconcile.enabled_kinds
//! max_timeout_seconds = 600
//! ```

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::Duration,
};

use fleetlet_protocol::{DeviceId, ResourceKind, kv::MAX_MANIFEST_BYTES};
use serde::{Deserialize, Serialize};

/// Why the configuration cannot be used. The agent exits before touching anything.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML for the agent: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("device_id: {0}")]
    DeviceId(#[from] fleetlet_protocol::NameError),
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        message: message.into(),
    }
}

/// The whole configuration, as read from the file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub device_id: String,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default)]
    pub nats: NatsConfig,
    #[serde(default)]
    pub reconcile: ReconcileConfig,
    #[serde(default)]
    pub file: FileConfig,
    #[serde(default)]
    pub container: ContainerConfig,
    #[serde(default)]
    pub systemd: SystemdConfig,
    #[serde(default)]
    pub shell_job: ShellJobConfig,
    #[serde(default)]
    pub trust: TrustConfig,
}

/// Which manifests this device accepts.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustConfig {
    /// ed25519 public keys (standard base64 of the 32-byte key) by key id, as printed by
    /// `fleetlet-controller signing-key`. With any key here the agent accepts only manifests
    /// signed by one of them; list the old and the new key while rotating.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub manifest_keys: std::collections::BTreeMap<String, String>,
    /// Accept manifests nobody signed, when no key is listed. Off by default: a device
    /// that trusts no key refuses every manifest and says why, until its owner adds the
    /// control plane's key or opts out here (a lab, a test bench).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_unsigned: bool,
}

/// Containers, through podman's REST API.
#[derive(Debug, Clone, Serialize, Deserialize)]
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

/// systemd units, through systemd's D-Bus API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemdConfig {
    /// D-Bus address of the system bus; default `$DBUS_SYSTEM_BUS_ADDRESS`, else the
    /// standard system bus socket.
    #[serde(default)]
    pub bus_address: Option<String>,
    /// Where unit files from manifests are written.
    #[serde(default = "default_unit_dir")]
    pub unit_dir: PathBuf,
    /// Longest wait for a start/stop/restart job to finish.
    #[serde(default = "default_job_timeout")]
    pub job_timeout_seconds: u32,
    /// Units fleetlet did not write that manifests may still start, stop, enable or
    /// replace, by name (a trailing `*` matches any rest: `mosquitto*`). Every other unit
    /// fleetlet did not write is left alone.
    #[serde(default)]
    pub foreign_units: Vec<String>,
    /// The agent's own unit, which no manifest may touch.
    #[serde(default = "default_agent_unit")]
    pub agent_unit: String,
    /// Let `foreign_units` name login services (ssh, gettys, user sessions). Off: a manifest
    /// can never lock the owner out of the device.
    #[serde(default)]
    pub allow_login_units: bool,
}

/// The ShellJob escape hatch. It runs only when the device owner adds `shellJob` to
/// `reconcile.enabled_kinds`; nothing the control plane sends can turn it on.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShellJobConfig {
    /// Used when a job sets no timeout.
    #[serde(default = "default_job_run_timeout")]
    pub default_timeout_seconds: u32,
    /// A job asking for more is refused.
    #[serde(default = "default_job_max_timeout")]
    pub max_timeout_seconds: u32,
    /// Output kept in status (stdout and stderr together); the rest is cut.
    #[serde(default = "default_job_output")]
    pub max_output_bytes: usize,
    /// Working directory of jobs.
    #[serde(default = "default_job_dir")]
    pub working_dir: PathBuf,
    /// Append-only audit log, one JSON line per run; default `<state_dir>/shell-jobs.log`.
    #[serde(default)]
    pub audit_log: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URLs (`nats://`, `tls://`); tried in turn.
    #[serde(default)]
    pub urls: Vec<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub token: Option<String>,
    /// File holding an NKey seed (`SU...`).
    #[serde(default)]
    pub nkey_seed_file: Option<PathBuf>,
    /// A `.creds` file (JWT + NKey seed).
    #[serde(default)]
    pub creds_file: Option<PathBuf>,
    /// CA bundle to verify the server; setting it requires TLS.
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key for mutual TLS.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Reply subjects start with this (default `_INBOX`). Each device has a NATS account
    /// of its own, so no other device can see its replies; the identities the controller
    /// issues allow `_INBOX.>` only.
    #[serde(default)]
    pub inbox_prefix: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconcileConfig {
    /// Seconds between full re-observations of every resource (drift detection).
    #[serde(default = "default_drift")]
    pub drift_interval_seconds: u64,
    #[serde(default = "default_heartbeat")]
    pub heartbeat_interval_seconds: u32,
    /// Seconds between reads of the desired state while connected. New manifests arrive as
    /// they are stored, and the agent reads again after every reconnect; this read only
    /// catches one dropped on the way.
    #[serde(default = "default_manifest_resync")]
    pub manifest_resync_seconds: u64,
    /// Resource kinds this device runs; others are reported Unsupported.
    /// `shellJob` runs commands as the agent: enable it only on purpose.
    #[serde(default = "default_kinds")]
    pub enabled_kinds: Vec<String>,
    /// Largest manifest accepted, in bytes.
    #[serde(default = "default_max_manifest")]
    pub max_manifest_bytes: usize,
    /// Resources reconciled at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// First retry delay after a failure, in milliseconds; doubles up to the maximum.
    #[serde(default = "default_backoff_initial")]
    pub backoff_initial_ms: u64,
    #[serde(default = "default_backoff_max")]
    pub backoff_max_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
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

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/fleetlet")
}
fn default_drift() -> u64 {
    30
}
fn default_heartbeat() -> u32 {
    30
}
fn default_manifest_resync() -> u64 {
    900
}
fn default_kinds() -> Vec<String> {
    ["file", "container", "systemdUnit"]
        .map(String::from)
        .to_vec()
}
fn default_max_manifest() -> usize {
    MAX_MANIFEST_BYTES
}
fn default_concurrency() -> usize {
    4
}
fn default_backoff_initial() -> u64 {
    1_000
}
fn default_backoff_max() -> u64 {
    300_000
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
fn default_unit_dir() -> PathBuf {
    PathBuf::from("/etc/systemd/system")
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
fn default_agent_unit() -> String {
    "fleetlet-agent.service".into()
}
fn default_job_timeout() -> u32 {
    90
}
fn default_job_run_timeout() -> u32 {
    300
}
fn default_job_max_timeout() -> u32 {
    3600
}
fn default_job_output() -> usize {
    2048
}
fn default_job_dir() -> PathBuf {
    PathBuf::from("/")
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

impl Default for SystemdConfig {
    fn default() -> Self {
        Self {
            bus_address: None,
            unit_dir: default_unit_dir(),
            job_timeout_seconds: default_job_timeout(),
            foreign_units: Vec::new(),
            agent_unit: default_agent_unit(),
            allow_login_units: false,
        }
    }
}

impl Default for ShellJobConfig {
    fn default() -> Self {
        Self {
            default_timeout_seconds: default_job_run_timeout(),
            max_timeout_seconds: default_job_max_timeout(),
            max_output_bytes: default_job_output(),
            working_dir: default_job_dir(),
            audit_log: None,
        }
    }
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        Self {
            drift_interval_seconds: default_drift(),
            heartbeat_interval_seconds: default_heartbeat(),
            manifest_resync_seconds: default_manifest_resync(),
            enabled_kinds: default_kinds(),
            max_manifest_bytes: default_max_manifest(),
            concurrency: default_concurrency(),
            backoff_initial_ms: default_backoff_initial(),
            backoff_max_ms: default_backoff_max(),
        }
    }
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

/// A checked configuration, ready to run with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub device: DeviceId,
    pub state_dir: PathBuf,
    pub nats: NatsConfig,
    pub drift_interval: Duration,
    pub manifest_resync: Duration,
    pub heartbeat_interval: Duration,
    pub enabled_kinds: BTreeSet<ResourceKind>,
    pub max_manifest_bytes: usize,
    pub concurrency: usize,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub file_roots: Vec<PathBuf>,
    pub max_file_bytes: u64,
    pub file_prefix: Option<PathBuf>,
    pub fetch: crate::fetch::FetchSettings,
    pub container: ContainerConfig,
    pub systemd: SystemdConfig,
    pub shell_job: ShellJobConfig,
    /// Trusted manifest signing keys (32-byte ed25519 public keys) by id.
    pub manifest_keys: std::collections::BTreeMap<String, Vec<u8>>,
    /// With no key listed: accept unsigned manifests instead of refusing them.
    pub allow_unsigned: bool,
}

impl Config {
    /// Reads a config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    /// A config with defaults for everything but the device id and servers.
    pub fn new(device_id: &str, urls: Vec<String>) -> Self {
        Self {
            device_id: device_id.to_owned(),
            state_dir: default_state_dir(),
            nats: NatsConfig {
                urls,
                ..Default::default()
            },
            reconcile: ReconcileConfig::default(),
            file: FileConfig::default(),
            container: ContainerConfig::default(),
            systemd: SystemdConfig::default(),
            shell_job: ShellJobConfig::default(),
            trust: TrustConfig::default(),
        }
    }

    /// Checks everything that can be checked before starting, section by section.
    pub fn validate(mut self) -> Result<Settings, ConfigError> {
        let device = DeviceId::new(self.device_id.clone())?;
        if !self.state_dir.is_absolute() {
            return Err(invalid("state_dir", "must be an absolute path"));
        }
        self.nats.check()?;
        self.reconcile.check()?;
        let enabled_kinds = self.reconcile.kinds()?;
        self.file.check()?;
        self.container.check()?;
        self.systemd.check()?;
        self.shell_job.check()?;
        if self.shell_job.audit_log.is_none() {
            self.shell_job.audit_log = Some(self.state_dir.join("shell-jobs.log"));
        }
        let manifest_keys = self.trust.keys()?;
        let r = &self.reconcile;
        Ok(Settings {
            device,
            state_dir: self.state_dir,
            nats: self.nats,
            drift_interval: Duration::from_secs(r.drift_interval_seconds),
            manifest_resync: Duration::from_secs(r.manifest_resync_seconds.max(1)),
            heartbeat_interval: Duration::from_secs(u64::from(r.heartbeat_interval_seconds)),
            enabled_kinds,
            max_manifest_bytes: r.max_manifest_bytes,
            concurrency: r.concurrency,
            backoff_initial: Duration::from_millis(r.backoff_initial_ms),
            backoff_max: Duration::from_millis(r.backoff_max_ms),
            file_roots: self.file.allowed_roots,
            max_file_bytes: self.file.max_file_bytes,
            file_prefix: self.file.path_prefix,
            fetch: crate::fetch::FetchSettings {
                max_bytes: self.file.max_fetch_bytes,
                reserve_bytes: self.file.fetch_reserve_bytes,
                stall: Duration::from_secs(self.file.fetch_stall_seconds),
                ca_file: self.file.fetch_ca_file,
            },
            container: self.container,
            systemd: self.systemd,
            shell_job: self.shell_job,
            manifest_keys,
            allow_unsigned: self.trust.allow_unsigned,
        })
    }
}

impl NatsConfig {
    /// Server URLs, then authentication, then the files it names, then the inbox prefix.
    fn check(&self) -> Result<(), ConfigError> {
        if self.urls.is_empty() {
            return Err(invalid("nats.urls", "at least one server URL is required"));
        }
        for url in &self.urls {
            let ok = ["nats://", "tls://", "ws://", "wss://"]
                .iter()
                .any(|s| url.starts_with(s) && url.len() > s.len());
            if !ok {
                return Err(invalid(
                    "nats.urls",
                    format!("{url:?} is not a nats://, tls://, ws:// or wss:// URL"),
                ));
            }
        }
        self.check_auth()?;
        self.check_files()?;
        if let Some(prefix) = &self.inbox_prefix
            && (prefix.is_empty() || prefix.contains(['*', '>', ' ']))
        {
            return Err(invalid(
                "nats.inbox_prefix",
                "must be a plain subject prefix",
            ));
        }
        Ok(())
    }

    /// At most one authentication method, and the settings that go in pairs, paired.
    fn check_auth(&self) -> Result<(), ConfigError> {
        let methods = [
            self.user.is_some() || self.password.is_some(),
            self.token.is_some(),
            self.nkey_seed_file.is_some(),
            self.creds_file.is_some(),
        ];
        if methods.iter().filter(|m| **m).count() > 1 {
            return Err(invalid(
                "nats",
                "choose one of user/password, token, nkey_seed_file, creds_file",
            ));
        }
        if self.user.is_some() != self.password.is_some() {
            return Err(invalid("nats", "user and password go together"));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(invalid("nats", "tls_cert and tls_key go together"));
        }
        Ok(())
    }

    /// Every credential and TLS file named can be opened now, not at the first connection.
    fn check_files(&self) -> Result<(), ConfigError> {
        for (field, path) in [
            ("nats.nkey_seed_file", &self.nkey_seed_file),
            ("nats.creds_file", &self.creds_file),
            ("nats.tls_ca", &self.tls_ca),
            ("nats.tls_cert", &self.tls_cert),
            ("nats.tls_key", &self.tls_key),
        ] {
            if let Some(p) = path
                && let Err(e) = std::fs::File::open(p)
            {
                return Err(invalid(field, format!("cannot read {}: {e}", p.display())));
            }
        }
        Ok(())
    }
}

impl ReconcileConfig {
    /// Intervals, concurrency, the manifest size limit and backoff are usable.
    fn check(&self) -> Result<(), ConfigError> {
        if self.drift_interval_seconds == 0 {
            return Err(invalid(
                "reconcile.drift_interval_seconds",
                "must be at least 1",
            ));
        }
        if self.heartbeat_interval_seconds == 0 {
            return Err(invalid(
                "reconcile.heartbeat_interval_seconds",
                "must be at least 1",
            ));
        }
        if self.concurrency == 0 {
            return Err(invalid("reconcile.concurrency", "must be at least 1"));
        }
        if self.max_manifest_bytes == 0 || self.max_manifest_bytes > MAX_MANIFEST_BYTES {
            return Err(invalid(
                "reconcile.max_manifest_bytes",
                format!("must be between 1 and {MAX_MANIFEST_BYTES}"),
            ));
        }
        if self.backoff_initial_ms == 0 || self.backoff_max_ms < self.backoff_initial_ms {
            return Err(invalid(
                "reconcile.backoff_initial_ms",
                "must be at least 1 and at most backoff_max_ms",
            ));
        }
        Ok(())
    }

    /// The enabled kinds, each a kind this agent knows.
    fn kinds(&self) -> Result<BTreeSet<ResourceKind>, ConfigError> {
        let mut enabled_kinds = BTreeSet::new();
        for k in &self.enabled_kinds {
            let kind = ResourceKind::KNOWN
                .into_iter()
                .find(|known| known.key() == k)
                .ok_or_else(|| {
                    invalid(
                        "reconcile.enabled_kinds",
                        format!(
                            "unknown kind {k:?}; known: {}",
                            ResourceKind::KNOWN.map(|k| k.key()).join(", ")
                        ),
                    )
                })?;
            enabled_kinds.insert(kind);
        }
        Ok(enabled_kinds)
    }
}

impl FileConfig {
    /// Allowed roots are specific absolute directories; paths are absolute.
    fn check(&self) -> Result<(), ConfigError> {
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

impl ContainerConfig {
    /// The socket path is absolute; the name prefix is valid in a container name.
    fn check(&self) -> Result<(), ConfigError> {
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

impl SystemdConfig {
    /// The unit directory is absolute; jobs get some time to finish.
    fn check(&self) -> Result<(), ConfigError> {
        if !self.unit_dir.is_absolute() {
            return Err(invalid("systemd.unit_dir", "must be an absolute path"));
        }
        if self.job_timeout_seconds == 0 {
            return Err(invalid("systemd.job_timeout_seconds", "must be at least 1"));
        }
        Ok(())
    }
}

impl ShellJobConfig {
    /// Timeouts are ordered, output fits in a status, the working directory is absolute.
    fn check(&self) -> Result<(), ConfigError> {
        if self.default_timeout_seconds == 0
            || self.max_timeout_seconds < self.default_timeout_seconds
        {
            return Err(invalid(
                "shell_job.default_timeout_seconds",
                "must be at least 1 and at most max_timeout_seconds",
            ));
        }
        if self.max_output_bytes > 16 * 1024 {
            return Err(invalid(
                "shell_job.max_output_bytes",
                "at most 16384: output travels in the device's status",
            ));
        }
        if !self.working_dir.is_absolute() {
            return Err(invalid("shell_job.working_dir", "must be an absolute path"));
        }
        Ok(())
    }
}

impl TrustConfig {
    /// The manifest signing keys, decoded: each the base64 of a 32-byte ed25519 key.
    fn keys(&self) -> Result<std::collections::BTreeMap<String, Vec<u8>>, ConfigError> {
        use base64::Engine;
        let mut manifest_keys = std::collections::BTreeMap::new();
        for (id, key) in &self.manifest_keys {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(key.trim())
                .ok()
                .filter(|b| b.len() == 32)
                .ok_or_else(|| {
                    invalid(
                        "trust.manifest_keys",
                        format!("key {id:?} is not the base64 of a 32-byte ed25519 public key"),
                    )
                })?;
            manifest_keys.insert(id.clone(), bytes);
        }
        Ok(manifest_keys)
    }
}

impl Settings {
    pub fn inbox_prefix(&self) -> String {
        self.nats
            .inbox_prefix
            .clone()
            .unwrap_or_else(|| "_INBOX".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Settings, ConfigError> {
        toml::from_str::<Config>(s)
            .map_err(|source| ConfigError::Parse {
                path: "test.toml".into(),
                source,
            })?
            .validate()
    }

    #[test]
    fn minimal_config_gets_safe_defaults() {
        let s =
            parse("device_id = \"pi-1\"\n[nats]\nurls = [\"nats://127.0.0.1:4222\"]\n").unwrap();
        assert_eq!(s.device.as_str(), "pi-1");
        assert_eq!(s.drift_interval, Duration::from_secs(30));
        assert_eq!(s.heartbeat_interval, Duration::from_secs(30));
        assert!(s.enabled_kinds.contains(&ResourceKind::File));
        assert!(
            !s.enabled_kinds.contains(&ResourceKind::ShellJob),
            "ShellJob is off unless enabled"
        );
        assert_eq!(s.inbox_prefix(), "_INBOX");
    }

    #[test]
    fn the_example_config_is_valid() {
        let text = include_str!("../../examples/agent/agent.toml");
        let mut c: Config = toml::from_str(text).unwrap();
        // Its credential files exist only on a device.
        assert!(c.nats.creds_file.take().is_some() && c.nats.tls_ca.take().is_some());
        let s = c.validate().unwrap();
        assert_eq!(s.container.socket, PathBuf::from("/run/podman/podman.sock"));
        assert!(!s.enabled_kinds.contains(&ResourceKind::ShellJob));
        assert_eq!(
            s.shell_job.audit_log,
            Some(PathBuf::from("/var/lib/fleetlet/shell-jobs.log"))
        );
    }

    #[test]
    fn each_mistake_gets_a_message_naming_the_field() {
        let base = "[nats]\nurls = [\"nats://127.0.0.1:4222\"]\n";
        let cases = [
            (format!("device_id = \"Pi.1\"\n{base}"), "device id"),
            ("device_id = \"pi\"\n".to_string(), "nats.urls"),
            ("device_id = \"pi\"\n[nats]\nurls = [\"http://x\"]\n".into(), "nats.urls"),
            (format!("device_id = \"pi\"\nstate_dir = \"rel\"\n{base}"), "state_dir"),
            (format!("device_id = \"pi\"\n{base}[reconcile]\nenabled_kinds = [\"vm\"]\n"), "unknown kind \"vm\""),
            (format!("device_id = \"pi\"\n{base}[reconcile]\ndrift_interval_seconds = 0\n"), "drift_interval_seconds"),
            (format!("device_id = \"pi\"\n{base}[file]\nallowed_roots = [\"/\"]\n"), "allowed_roots"),
            (format!("device_id = \"pi\"\n{base}[file]\nallowed_roots = [\"/etc/../\"]\n"), "allowed_roots"),
            ("device_id = \"pi\"\n[nats]\nurls = [\"nats://a\"]\ntoken = \"t\"\nuser = \"u\"\npassword = \"p\"\n".into(), "choose one"),
            ("device_id = \"pi\"\n[nats]\nurls = [\"nats://a\"]\ncreds_file = \"/nonexistent/x.creds\"\n".into(), "nats.creds_file"),
            (format!("device_id = \"pi\"\ntypo = 1\n{base}"), "unknown field"),
            (format!("device_id = \"pi\"\n{base}[container]\nsocket = \"podman.sock\"\n"), "container.socket"),
            (format!("device_id = \"pi\"\n{base}[container]\nname_prefix = \"a/b\"\n"), "container.name_prefix"),
            (format!("device_id = \"pi\"\n{base}[systemd]\nunit_dir = \"units\"\n"), "systemd.unit_dir"),
            (format!("device_id = \"pi\"\n{base}[shell_job]\nmax_output_bytes = 1000000\n"), "shell_job.max_output_bytes"),
            (format!("device_id = \"pi\"\n{base}[shell_job]\ndefault_timeout_seconds = 9000\n"), "shell_job.default_timeout_seconds"),
        ];
        for (text, expected) in cases {
            let err = parse(&text).unwrap_err().to_string();
            assert!(
                err.contains(expected),
                "{text:?}: expected {expected:?} in {err:?}"
            );
        }
    }
}
