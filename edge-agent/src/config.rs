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
//! # uplink_probe_seconds = 120   # behind a site's leaf node (see docs/operations.md)
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
//! [network]              # used only if "networkConfig" is in reconcile.enabled_kinds
//! dir = "/etc/systemd/network"
//! confirm_seconds = 60   # no control plane this long after a change: rolled back
//! interfaces = ["eth*"]  # which interfaces manifests may configure (default: all but lo)
//!
//! [upgrade]              # agentUpgrade: binaries signed by a [trust] manifest_keys key
//! health_seconds = 120   # a new version that cannot reach NATS this long is put back
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

// Each kind's section lives next to its reconciler.
pub use crate::{
    container::ContainerConfig, file::FileConfig, network::NetworkConfig, shelljob::ShellJobConfig,
    systemd::SystemdConfig, upgrade::UpgradeConfig,
};

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

pub(crate) fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
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
    pub network: NetworkConfig,
    #[serde(default)]
    pub upgrade: UpgradeConfig,
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
    /// For a device connected to a site's leaf node: every this many seconds one
    /// heartbeat asks for JetStream's acknowledgement (0, the default: never). A leaf node
    /// keeps the device connected while its own link to the central servers is down, so
    /// nothing else tells the agent that manifests stored meanwhile never reached it. With
    /// no acknowledgement every heartbeat asks, and the first acknowledged one makes the
    /// agent read its desired state at once.
    #[serde(default)]
    pub uplink_probe_seconds: u64,
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
/// The kinds an agent manages unless its owner lists others (ShellJob only when enabled).
fn default_kinds() -> Vec<String> {
    [
        ResourceKind::File,
        ResourceKind::Container,
        ResourceKind::SystemdUnit,
        ResourceKind::AgentUpgrade,
    ]
    .map(|k| k.key().to_owned())
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
    pub network: NetworkConfig,
    pub upgrade: UpgradeConfig,
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
            network: NetworkConfig::default(),
            upgrade: UpgradeConfig::default(),
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
        self.network.check()?;
        self.upgrade.check()?;
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
            network: self.network,
            upgrade: self.upgrade,
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
            let kind = ResourceKind::from_key(k).ok_or_else(|| {
                invalid(
                    "reconcile.enabled_kinds",
                    format!("unknown kind {k:?}; known: {}", ResourceKind::known_keys()),
                )
            })?;
            enabled_kinds.insert(kind);
        }
        Ok(enabled_kinds)
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
