//! Desired state: the typed manifest the controller writes for one device.

use std::{collections::BTreeSet, fmt, path::Component, path::Path};

use schemars::JsonSchema;
use serde::{
    Deserialize, Deserializer, Serialize, Serializer,
    de::{self, MapAccess, Visitor},
    ser::SerializeMap,
};

use crate::names::{DeviceId, ResourceId};
use crate::network::NetworkConfigSpec;
use crate::upgrade::AgentUpgradeSpec;

/// The most resources one device's manifest may hold.
pub const MAX_RESOURCES: usize = 512;

/// Everything one device should run, as of one generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentManifest {
    /// Always [`crate::API_VERSION`] for this version of the protocol.
    pub api_version: String,
    /// The device this manifest is for; an agent refuses a manifest for another device.
    pub device: DeviceId,
    /// Strictly increasing per device; an agent refuses a generation older than the one it runs.
    pub generation: u64,
    /// The resources; ids are unique within the manifest.
    #[serde(default)]
    pub resources: Vec<ManagedResource>,
    /// Id of the key that signs this manifest, when the control plane signs manifests (see
    /// [`crate::signing`]); part of what is signed, so it cannot be swapped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key: Option<String>,
    /// When the controller issued this generation. An agent refuses a manifest issued
    /// before the one it runs (with the generation, inside what is signed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_at: Option<crate::Timestamp>,
}

/// One resource on a device, with the object that asked for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ManagedResource {
    pub id: ResourceId,
    /// Which Kubernetes object contributed this resource.
    pub owner: Owner,
    /// What to run: exactly one kind key (`container`, `systemdUnit`, `file`, ...).
    #[serde(flatten)]
    pub spec: ResourceSpec,
}

/// The Kubernetes object a resource came from.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct Owner {
    pub kind: OwnerKind,
    pub namespace: String,
    pub name: String,
    /// `metadata.generation` of the owner when it contributed this resource.
    #[serde(default)]
    pub generation: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
pub enum OwnerKind {
    EdgeManifest,
    Pod,
    /// An owner kind from a newer control plane.
    #[serde(other)]
    Other,
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} {}/{} (generation {})",
            self.kind, self.namespace, self.name, self.generation
        )
    }
}

/// What a resource is. On the wire and in YAML a resource carries exactly one kind key:
///
/// ```yaml
/// - id: motd
///   file: { path: /etc/motd, content: { text: "hello" } }
/// ```
///
/// A kind this version does not know (from a newer control plane) is kept as
/// [`ResourceSpec::Unsupported`] so the rest of the manifest still applies.
#[derive(Debug, Clone, PartialEq, JsonSchema)]
#[schemars(rename_all = "camelCase")]
pub enum ResourceSpec {
    Container(ContainerSpec),
    SystemdUnit(SystemdUnitSpec),
    File(FileSpec),
    /// One interface's settings through systemd-networkd, rolled back when the device
    /// loses its control plane; only where the device owner enables it.
    NetworkConfig(NetworkConfigSpec),
    /// An audited escape hatch: runs only where the device owner enables it.
    ShellJob(ShellJobSpec),
    /// The agent version the device runs: a signed binary, swapped in with a way back.
    AgentUpgrade(AgentUpgradeSpec),
    /// A kind this version does not know, kept verbatim.
    #[schemars(skip)]
    Unsupported(UnsupportedSpec),
}

/// A resource kind unknown to this version, kept as sent.
#[derive(Debug, Clone, PartialEq)]
pub struct UnsupportedSpec {
    pub kind: String,
    pub spec: serde_json::Value,
}

/// The kinds of resource, for registries, metrics labels and messages.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
pub enum ResourceKind {
    Container,
    SystemdUnit,
    File,
    NetworkConfig,
    ShellJob,
    AgentUpgrade,
    Unsupported,
}

impl ResourceKind {
    /// The key that names this kind in a resource.
    pub const fn key(self) -> &'static str {
        match self {
            Self::Container => "container",
            Self::SystemdUnit => "systemdUnit",
            Self::File => "file",
            Self::NetworkConfig => "networkConfig",
            Self::ShellJob => "shellJob",
            Self::AgentUpgrade => "agentUpgrade",
            Self::Unsupported => "unsupported",
        }
    }

    /// Every kind a manifest may hold, in the order messages list them.
    pub const KNOWN: [ResourceKind; 6] = [
        Self::Container,
        Self::SystemdUnit,
        Self::File,
        Self::NetworkConfig,
        Self::ShellJob,
        Self::AgentUpgrade,
    ];

    /// The known kind named `key` (None for a key this version does not know).
    pub fn from_key(key: &str) -> Option<Self> {
        Self::KNOWN.into_iter().find(|k| k.key() == key)
    }

    /// The known kind keys, comma-separated, for messages.
    pub fn known_keys() -> String {
        Self::KNOWN.map(Self::key).join(", ")
    }
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

impl ResourceSpec {
    pub fn kind(&self) -> ResourceKind {
        match self {
            Self::Container(_) => ResourceKind::Container,
            Self::SystemdUnit(_) => ResourceKind::SystemdUnit,
            Self::File(_) => ResourceKind::File,
            Self::NetworkConfig(_) => ResourceKind::NetworkConfig,
            Self::ShellJob(_) => ResourceKind::ShellJob,
            Self::AgentUpgrade(_) => ResourceKind::AgentUpgrade,
            Self::Unsupported(_) => ResourceKind::Unsupported,
        }
    }

    /// The kind key as written on the wire (the unknown key itself for unsupported kinds).
    pub fn kind_key(&self) -> &str {
        match self {
            Self::Unsupported(u) => &u.kind,
            other => other.kind().key(),
        }
    }

    /// Checks what can be checked without the device: well-formed paths, names, ports.
    /// Device policy (allowed roots, enabled kinds) is the agent's to check.
    pub fn validate(&self) -> Result<(), SpecError> {
        match self {
            Self::Container(c) => c.validate(),
            Self::SystemdUnit(u) => u.validate(),
            Self::File(f) => f.validate(),
            Self::NetworkConfig(n) => n.validate(),
            Self::AgentUpgrade(u) => u.validate(),
            Self::ShellJob(_) | Self::Unsupported(_) => Ok(()),
        }
    }
}

impl Serialize for ResourceSpec {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(1))?;
        match self {
            Self::Container(s) => map.serialize_entry(self.kind_key(), s)?,
            Self::SystemdUnit(s) => map.serialize_entry(self.kind_key(), s)?,
            Self::File(s) => map.serialize_entry(self.kind_key(), s)?,
            Self::NetworkConfig(s) => map.serialize_entry(self.kind_key(), s)?,
            Self::ShellJob(s) => map.serialize_entry(self.kind_key(), s)?,
            Self::AgentUpgrade(s) => map.serialize_entry(self.kind_key(), s)?,
            Self::Unsupported(u) => map.serialize_entry(&u.kind, &u.spec)?,
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for ResourceSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SpecVisitor;

        impl<'de> Visitor<'de> for SpecVisitor {
            type Value = ResourceSpec;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(
                    f,
                    "a resource with exactly one kind key ({})",
                    ResourceKind::known_keys()
                )
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ResourceSpec, A::Error> {
                let Some(kind) = map.next_key::<String>()? else {
                    return Err(de::Error::custom(format_args!(
                        "resource has no kind: expected one of {}",
                        ResourceKind::known_keys()
                    )));
                };
                let spec = match ResourceKind::from_key(&kind) {
                    Some(ResourceKind::Container) => ResourceSpec::Container(map.next_value()?),
                    Some(ResourceKind::SystemdUnit) => ResourceSpec::SystemdUnit(map.next_value()?),
                    Some(ResourceKind::File) => ResourceSpec::File(map.next_value()?),
                    Some(ResourceKind::NetworkConfig) => {
                        ResourceSpec::NetworkConfig(map.next_value()?)
                    }
                    Some(ResourceKind::ShellJob) => ResourceSpec::ShellJob(map.next_value()?),
                    Some(ResourceKind::AgentUpgrade) => {
                        ResourceSpec::AgentUpgrade(map.next_value()?)
                    }
                    Some(ResourceKind::Unsupported) | None => {
                        ResourceSpec::Unsupported(UnsupportedSpec {
                            spec: map.next_value()?,
                            kind,
                        })
                    }
                };
                if let Some(second) = map.next_key::<String>()? {
                    return Err(de::Error::custom(format_args!(
                        "resource has two kinds, {:?} and {second:?}: exactly one is allowed",
                        spec.kind_key()
                    )));
                }
                Ok(spec)
            }
        }

        deserializer.deserialize_map(SpecVisitor)
    }
}

/// Why a resource spec is not well-formed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

pub(crate) fn invalid(field: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// An absolute path with no `.`/`..` components or NUL bytes.
fn check_absolute_path(field: &str, path: &str) -> Result<(), SpecError> {
    if path.contains('\0') {
        return Err(invalid(field, "path contains a NUL byte"));
    }
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(invalid(field, format!("{path:?} is not an absolute path")));
    }
    if p.components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
        || path.split('/').any(|s| s == "." || s == "..")
    {
        return Err(invalid(
            field,
            format!("{path:?} contains '.' or '..' components"),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------- Container

/// A container run through podman.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContainerSpec {
    /// Image reference, e.g. `registry.local:5000/app:1.2`.
    pub image: String,
    /// When to pull the image: `IfNotPresent` (default) or `Always`.
    #[serde(default)]
    pub image_pull_policy: PullPolicy,
    /// Replaces the image's entrypoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Replaces the image's default arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Environment variables of the container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Container ports published on the device.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortMapping>,
    /// Host directories mounted into the container (only under the device owner's `[container] mount_roots`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<HostPathMount>,
    /// `Always` (default), `OnFailure` or `Never`.
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// Memory and CPU limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<ContainerLimits>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<Probe>,
    /// Resources (ids on the same device, e.g. the File it reads) whose spec changing
    /// restarts this container once, after they are applied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub restart_on: Vec<ResourceId>,
    /// Set by the agent, never sent: a digest of the specs of `restart_on`, so a change in
    /// them is a change in this spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(skip)]
    pub restart_digest: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PullPolicy {
    #[default]
    IfNotPresent,
    Always,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RestartPolicy {
    #[default]
    Always,
    OnFailure,
    Never,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnvVar {
    /// The variable's name.
    pub name: String,
    /// Its value, as is.
    #[serde(default)]
    pub value: String,
    /// The value sealed to the device's own key (see [`FileContent::Sealed`]), in place of
    /// `value`: a Pod's Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_value: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    /// Port inside the container.
    #[schemars(range(min = 1, max = 65535))]
    pub container_port: u16,
    /// Port on the device; defaults to `containerPort`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub host_port: Option<u16>,
    /// `TCP` (default) or `UDP`.
    #[serde(default)]
    pub protocol: PortProtocol,
    /// Device address to bind; all addresses when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[allow(clippy::upper_case_acronyms)]
pub enum PortProtocol {
    #[default]
    TCP,
    UDP,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostPathMount {
    /// Absolute path on the device; must lie under one of the device's mount roots.
    #[schemars(length(min = 1, max = 1024))]
    pub host_path: String,
    /// Absolute path inside the container.
    pub container_path: String,
    /// Mount read-only (read-write needs `[container] writable_mount_roots` on the device).
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContainerLimits {
    /// Memory limit in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// CPU limit in thousandths of a core (500 = half a core).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_millis: Option<u32>,
}

/// A readiness check run on the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Probe {
    /// What to check: `exec`, `http` or `tcp`.
    pub action: ProbeAction,
    /// Seconds between checks.
    #[serde(default = "default_probe_period")]
    pub period_seconds: u32,
    /// Consecutive failures before the container is reported not ready.
    #[serde(default = "default_probe_failures")]
    pub failure_threshold: u32,
}

fn default_probe_period() -> u32 {
    10
}
fn default_probe_failures() -> u32 {
    3
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ProbeAction {
    /// Run a command in the container; exit status 0 means ready.
    Exec {
        /// argv, run without a shell unless argv[0] is one.
        command: Vec<String>,
    },
    /// HTTP GET on the device's published port; 2xx/3xx means ready.
    Http {
        /// The published (host) port.
        #[schemars(range(min = 1))]
        port: u16,
        /// The path to GET, e.g. `/healthz`.
        path: String,
    },
    /// A TCP connect to the device's published port.
    Tcp {
        /// The published (host) port.
        #[schemars(range(min = 1))]
        port: u16,
    },
}

/// Most resources one `restartOn` may name.
pub const MAX_RESTART_ON: usize = 16;

/// A `restartOn` list: at most [`MAX_RESTART_ON`] ids, none twice.
fn check_restart_on(field: &str, ids: &[ResourceId]) -> Result<(), SpecError> {
    if ids.len() > MAX_RESTART_ON {
        return Err(invalid(
            field,
            format!("{} ids; at most {MAX_RESTART_ON}", ids.len()),
        ));
    }
    let mut seen = BTreeSet::new();
    for id in ids {
        if !seen.insert(id) {
            return Err(invalid(field, format!("{id} appears twice")));
        }
    }
    Ok(())
}

impl ResourceSpec {
    /// The resources this one restarts after (Container and SystemdUnit `restartOn`).
    pub fn restart_on(&self) -> &[ResourceId] {
        match self {
            Self::Container(c) => &c.restart_on,
            Self::SystemdUnit(u) => &u.restart_on,
            Self::File(_)
            | Self::NetworkConfig(_)
            | Self::ShellJob(_)
            | Self::AgentUpgrade(_)
            | Self::Unsupported(_) => &[],
        }
    }

    /// Sets the digest of what `restartOn` names (the agent's doing; see
    /// [`ContainerSpec::restart_digest`]).
    pub fn set_restart_digest(&mut self, digest: Option<String>) {
        match self {
            Self::Container(c) => c.restart_digest = digest,
            Self::SystemdUnit(u) => u.restart_digest = digest,
            Self::File(_)
            | Self::NetworkConfig(_)
            | Self::ShellJob(_)
            | Self::AgentUpgrade(_)
            | Self::Unsupported(_) => {}
        }
    }
}

impl ContainerSpec {
    pub fn validate(&self) -> Result<(), SpecError> {
        check_restart_on("container.restartOn", &self.restart_on)?;
        if self.image.trim().is_empty() || self.image.chars().any(char::is_whitespace) {
            return Err(invalid(
                "container.image",
                format!("{:?} is not an image reference", self.image),
            ));
        }
        for (i, e) in self.env.iter().enumerate() {
            if e.name.is_empty() || e.name.contains('=') || e.name.contains('\0') {
                return Err(invalid(
                    format!("container.env[{i}].name"),
                    format!("{:?} is not a valid variable name", e.name),
                ));
            }
        }
        let mut host_ports = BTreeSet::new();
        for (i, p) in self.ports.iter().enumerate() {
            if p.container_port == 0 || p.host_port == Some(0) {
                return Err(invalid(
                    format!("container.ports[{i}]"),
                    "ports must be between 1 and 65535",
                ));
            }
            let host = p.host_port.unwrap_or(p.container_port);
            if !host_ports.insert((host, p.protocol as u8)) {
                return Err(invalid(
                    format!("container.ports[{i}].hostPort"),
                    format!("host port {host} is published twice"),
                ));
            }
        }
        for (i, m) in self.mounts.iter().enumerate() {
            check_absolute_path(&format!("container.mounts[{i}].hostPath"), &m.host_path)?;
            check_absolute_path(
                &format!("container.mounts[{i}].containerPath"),
                &m.container_path,
            )?;
        }
        if let Some(probe) = &self.probe {
            match &probe.action {
                ProbeAction::Exec { command } if command.is_empty() => {
                    return Err(invalid("container.probe.exec.command", "must not be empty"));
                }
                ProbeAction::Http { port, .. } | ProbeAction::Tcp { port } if *port == 0 => {
                    return Err(invalid(
                        "container.probe",
                        "port must be between 1 and 65535",
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- SystemdUnit

/// A systemd unit, managed over D-Bus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(self.restartOn) || size(self.restartOn) == 0 || has(self.contents)",
    "message": "systemdUnit.restartOn needs contents: fleetlet restarts units whose file it writes"
}]))]
pub struct SystemdUnitSpec {
    /// Unit name with its type suffix, e.g. `hello.service`.
    #[schemars(
        length(min = 1, max = 255),
        extend("x-kubernetes-validations" = [{
            "rule": r"self.matches('^[A-Za-z0-9:_@\\\\-][A-Za-z0-9:_.@\\\\-]*[.](service|socket|timer|path|mount|target)$')",
            "message": "systemdUnit.name must be a unit name: letters, digits and ':-_.\\@', no '/', ending in .service, .socket, .timer, .path, .mount or .target"
        }])
    )]
    pub name: String,
    /// Unit file contents; when unset the unit must already exist on the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contents: Option<String>,
    /// Enable the unit so it starts at boot.
    #[serde(default)]
    pub enabled: bool,
    #[serde(default)]
    pub state: UnitState,
    /// Resources (ids on the same device, e.g. the File it reads) whose spec changing
    /// restarts this unit once, after they are applied. Needs `contents`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub restart_on: Vec<ResourceId>,
    /// Set by the agent, never sent: a digest of the specs of `restart_on`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(skip)]
    pub restart_digest: Option<String>,
}

/// The active state a unit should be kept in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum UnitState {
    #[default]
    Started,
    Stopped,
}

/// Unit types fleetlet manages.
pub const UNIT_SUFFIXES: [&str; 6] = [
    ".service", ".socket", ".timer", ".path", ".mount", ".target",
];

impl SystemdUnitSpec {
    pub fn validate(&self) -> Result<(), SpecError> {
        let n = &self.name;
        let ok_chars = n
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ":-_.\\@".contains(c));
        let stem = UNIT_SUFFIXES
            .iter()
            .find_map(|s| n.strip_suffix(s))
            .unwrap_or("");
        if n.len() > 255 || !ok_chars || stem.is_empty() || stem.starts_with('.') {
            return Err(invalid(
                "systemdUnit.name",
                format!(
                    "{n:?} is not a unit name: letters, digits and ':-_.\\@' followed by one of {}",
                    UNIT_SUFFIXES.join(" ")
                ),
            ));
        }
        if !self.restart_on.is_empty() && self.contents.is_none() {
            return Err(invalid(
                "systemdUnit.restartOn",
                "needs contents: fleetlet restarts units whose file it writes",
            ));
        }
        check_restart_on("systemdUnit.restartOn", &self.restart_on)
    }
}

// ---------------------------------------------------------------- File

/// A regular file with exact contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FileSpec {
    /// Absolute path; must lie under one of the device's allowed roots.
    #[schemars(
        length(min = 2, max = 1024),
        extend("x-kubernetes-validations" = [{
            "rule": r"self.startsWith('/') && !self.endsWith('/') && !self.matches('(^|/)[.][.]?(/|$)')",
            "message": "file.path must be an absolute path to a file, without '.' or '..' components"
        }])
    )]
    pub path: String,
    pub content: FileContent,
    /// Permission bits, e.g. 420 (0644). Defaults to 0644.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 4095))]
    pub mode: Option<u32>,
    /// Owner user name or numeric uid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Owner group name or numeric gid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// File contents: inline, or fetched by the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum FileContent {
    /// UTF-8 text, written as is.
    Text(String),
    /// Arbitrary bytes, base64-encoded (standard alphabet, padded).
    Base64(String),
    /// Bytes sealed to the device's own key (an X25519 sealed box, standard base64; the key
    /// is in the device's heartbeat): how the controller sends a Pod's Secret, so neither
    /// the bucket, a backup of it, nor anyone between can read it. Only that device can
    /// open it.
    Sealed(String),
    /// Downloaded by the device over HTTPS, for content too large for a manifest (models,
    /// firmware, datasets). Written only once every byte matches `sha256`; an interrupted
    /// download resumes where it stopped.
    Fetch(FetchSource),
}

/// Where a fetched File's content comes from, and what it must be.
///
/// The manifest carries the digest and is signed, so the content is bound to the signing
/// key even though the server that serves it is not trusted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FetchSource {
    /// An `https://` URL. Redirects are followed (up to five), to HTTPS only.
    #[schemars(
        length(min = 9, max = 2048),
        extend("x-kubernetes-validations" = [{
            "rule": r"self.startsWith('https://') && !self.contains(' ')",
            "message": "file.content.fetch.url must be an https:// URL"
        }])
    )]
    pub url: String,
    /// SHA-256 of the content: 64 lowercase hex digits.
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub sha256: String,
    /// Size of the content in bytes: checked against the device's limit and its free disk
    /// space before the download starts, and against what the server sends.
    #[schemars(range(min = 1, max = MAX_FETCH_BYTES))]
    pub size: u64,
}

/// Largest `size` of a fetched File a manifest may name (the device sets its own lower limit).
pub const MAX_FETCH_BYTES: u64 = 1 << 40;

impl FetchSource {
    pub fn validate(&self) -> Result<(), SpecError> {
        let rest = self.url.strip_prefix("https://").ok_or_else(|| {
            invalid(
                "file.content.fetch.url",
                "must be an https:// URL (the content travels outside the signed manifest)",
            )
        })?;
        let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
        if host.is_empty()
            || self.url.len() > 2048
            || self
                .url
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(invalid(
                "file.content.fetch.url",
                "must name a host, be at most 2048 characters and hold no spaces",
            ));
        }
        if self.sha256.len() != 64
            || !self
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(invalid(
                "file.content.fetch.sha256",
                "must be 64 lowercase hex digits",
            ));
        }
        if self.size == 0 || self.size > MAX_FETCH_BYTES {
            return Err(invalid(
                "file.content.fetch.size",
                format!("must be between 1 and {MAX_FETCH_BYTES}"),
            ));
        }
        Ok(())
    }
}

impl FileSpec {
    pub fn validate(&self) -> Result<(), SpecError> {
        check_absolute_path("file.path", &self.path)?;
        if self.path.ends_with('/') {
            return Err(invalid("file.path", "names a directory, not a file"));
        }
        if let Some(mode) = self.mode
            && mode > 0o7777
        {
            return Err(invalid("file.mode", format!("{mode:#o} is above 0o7777")));
        }
        if let FileContent::Fetch(f) = &self.content {
            f.validate()?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- ShellJob

/// A command run once per spec change, only where the device owner enabled ShellJobs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShellJobSpec {
    /// argv; no shell is involved unless argv[0] is one.
    pub command: Vec<String>,
    /// Seconds before the command is killed (default and maximum: the device owner's `[shell_job]` settings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u32>,
}

// ---------------------------------------------------------------- manifest checks

/// Why a manifest as a whole is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("resource id {0:?} appears more than once")]
    DuplicateResourceId(String),
    #[error("{count} resources; the limit is {MAX_RESOURCES}")]
    TooManyResources { count: usize },
}

impl AgentManifest {
    /// An empty manifest for `device` at `generation`.
    pub fn new(device: DeviceId, generation: u64) -> Self {
        Self {
            api_version: crate::API_VERSION.to_owned(),
            device,
            generation,
            resources: Vec::new(),
            signing_key: None,
            issued_at: None,
        }
    }

    /// Manifest-wide checks; per-resource checks are [`ResourceSpec::validate`], so one bad
    /// resource fails alone.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.resources.len() > MAX_RESOURCES {
            return Err(ManifestError::TooManyResources {
                count: self.resources.len(),
            });
        }
        let mut seen = BTreeSet::new();
        for r in &self.resources {
            if !seen.insert(r.id.as_str()) {
                return Err(ManifestError::DuplicateResourceId(r.id.to_string()));
            }
        }
        Ok(())
    }

    pub fn resource(&self, id: &str) -> Option<&ManagedResource> {
        self.resources.iter().find(|r| r.id.as_str() == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_on_is_checked_and_never_sends_the_agents_digest() {
        let id = |s: &str| ResourceId::new(s.to_owned()).expect("id");
        let mut unit = SystemdUnitSpec {
            name: "app.service".into(),
            contents: None,
            enabled: false,
            state: UnitState::Started,
            restart_on: vec![id("conf")],
            restart_digest: None,
        };
        let err = unit.validate().expect_err("no contents");
        assert!(err.to_string().contains("needs contents"), "{err}");
        unit.contents = Some("[Service]\nExecStart=/bin/true\n".into());
        assert!(unit.validate().is_ok());
        unit.restart_on.push(id("conf"));
        assert!(
            unit.validate()
                .expect_err("twice")
                .to_string()
                .contains("twice")
        );
        let c = ContainerSpec {
            image: "app:1".into(),
            restart_on: (0..=MAX_RESTART_ON).map(|i| id(&format!("f{i}"))).collect(),
            ..Default::default()
        };
        assert!(c.validate().is_err(), "more than {MAX_RESTART_ON}");
        // The digest is the agent's: absent from the schema users and the API server see.
        let schema = serde_json::to_string(&schemars::schema_for!(ResourceSpec)).unwrap();
        assert!(schema.contains("restartOn") && !schema.contains("restartDigest"));
    }

    #[test]
    fn every_known_kind_is_named_by_one_key_both_ways() {
        for kind in ResourceKind::KNOWN {
            assert_eq!(ResourceKind::from_key(kind.key()), Some(kind));
        }
        assert_eq!(ResourceKind::from_key("unsupported"), None);
        assert_eq!(ResourceKind::from_key("Container"), None, "keys are exact");
    }

    #[test]
    fn the_schema_and_the_wire_use_the_same_kind_keys() {
        // The schema is derived from the enum; the wire format is written by hand from
        // ResourceKind::key. A kind added to one and not the other fails here.
        let schema = serde_json::to_value(schemars::schema_for!(ResourceSpec)).unwrap();
        let mut in_schema: Vec<String> = schema["oneOf"]
            .as_array()
            .expect("one schema per kind")
            .iter()
            .flat_map(|v| v["required"].as_array().cloned().unwrap_or_default())
            .filter_map(|k| k.as_str().map(str::to_owned))
            .collect();
        in_schema.sort();
        let mut known: Vec<String> = ResourceKind::KNOWN.map(|k| k.key().to_owned()).to_vec();
        known.sort();
        assert_eq!(in_schema, known);

        let spec: ResourceSpec =
            serde_json::from_str(r#"{"systemdUnit":{"name":"a.service"}}"#).unwrap();
        assert_eq!(spec.kind(), ResourceKind::SystemdUnit);
        let written = serde_json::to_value(&spec).unwrap();
        assert!(
            written.get(ResourceKind::SystemdUnit.key()).is_some(),
            "{written}"
        );
    }
}
