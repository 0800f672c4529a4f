//! The wire protocol between fleetlet's control plane and its edge agents.
//!
//! Everything here is plain data (serde + schemars): the agent links this crate and nothing
//! from Kubernetes. Records travel as JSON through NATS JetStream KV; [`kv`] says where.
//!
//! Decoding goes through [`decode`], which checks size, syntax, `apiVersion` and names and
//! returns a typed [`DecodeError`] instead of panicking on hostile input.

pub mod access;
pub mod heartbeat;
pub mod kv;
pub mod manifest;
pub mod names;
pub mod network;
pub mod relay;
pub mod signing;
pub mod stats;
pub mod status;
pub mod time;
pub mod upgrade;

pub use heartbeat::{
    Address, Capacity, DEFAULT_MAX_FILE_BYTES, DeviceFacts, DeviceLimits, FactsReport, Free,
    Heartbeat, SystemInfo, facts_of,
};
pub use manifest::{
    AgentManifest, ContainerLimits, ContainerSpec, EnvVar, FetchSource, FileContent, FileSpec,
    HostPathMount, MAX_FETCH_BYTES, ManagedResource, ManifestError, Owner, OwnerKind, PortMapping,
    PortProtocol, Probe, ProbeAction, PullPolicy, ResourceKind, ResourceSpec, RestartPolicy,
    ShellJobSpec, SpecError, SystemdUnitSpec, UnitState, UnsupportedSpec,
};
pub use names::{DeviceId, NameError, ResourceId};
pub use network::{Cidr, NetworkConfigSpec, RouteSpec, VlanSpec};
pub use status::{
    AgentStatus, Condition, ConditionStatus, DriftEvent, Rejection, ResourceDetails, ResourceStatus,
};
pub use time::Timestamp;
pub use upgrade::{AgentBinary, AgentUpgradeSpec};

use serde::{Serialize, de::DeserializeOwned};

/// The `apiVersion` every record of this protocol version carries.
pub const API_VERSION: &str = "fleetlet.dev/v1alpha1";

/// A record stored in one of fleetlet's KV buckets.
pub trait Record: Serialize + DeserializeOwned {
    /// What the record is called in messages.
    const WHAT: &'static str;
    /// Largest encoded size accepted.
    const MAX_BYTES: usize;
    fn api_version(&self) -> &str;
    fn device(&self) -> &DeviceId;
    /// Record-specific checks beyond the types themselves.
    fn check(&self) -> Result<(), DecodeError> {
        Ok(())
    }
    /// Parses the stored bytes (a manifest may come in a signed envelope).
    fn from_wire(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

impl Record for AgentManifest {
    const WHAT: &'static str = "AgentManifest";
    const MAX_BYTES: usize = kv::MAX_MANIFEST_BYTES;
    fn api_version(&self) -> &str {
        &self.api_version
    }
    fn device(&self) -> &DeviceId {
        &self.device
    }
    fn check(&self) -> Result<(), DecodeError> {
        self.validate().map_err(DecodeError::Invalid)
    }
    fn from_wire(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        match signing::open(bytes) {
            Some(Ok(sealed)) => serde_json::from_str(&sealed.manifest),
            _ => serde_json::from_slice(bytes),
        }
    }
}

impl Record for AgentStatus {
    const WHAT: &'static str = "AgentStatus";
    const MAX_BYTES: usize = kv::MAX_STATUS_BYTES;
    fn api_version(&self) -> &str {
        &self.api_version
    }
    fn device(&self) -> &DeviceId {
        &self.device
    }
}

impl Record for FactsReport {
    const WHAT: &'static str = "FactsReport";
    const MAX_BYTES: usize = kv::MAX_FACTS_BYTES;
    fn api_version(&self) -> &str {
        &self.api_version
    }
    fn device(&self) -> &DeviceId {
        &self.device
    }
}

impl Record for Heartbeat {
    const WHAT: &'static str = "Heartbeat";
    const MAX_BYTES: usize = kv::MAX_HEARTBEAT_BYTES;
    fn api_version(&self) -> &str {
        &self.api_version
    }
    fn device(&self) -> &DeviceId {
        &self.device
    }
}

/// Why bytes from the wire are not a usable record.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("{what} is {size} bytes; the limit is {limit}")]
    TooLarge {
        what: &'static str,
        size: usize,
        limit: usize,
    },
    #[error("{what} is not valid: {source}")]
    Malformed {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{what} has apiVersion {found:?}; this version understands {API_VERSION:?}")]
    UnsupportedApiVersion { what: &'static str, found: String },
    #[error(transparent)]
    Invalid(#[from] ManifestError),
}

impl DecodeError {
    /// A short, stable reason for status fields and metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "TooLarge",
            Self::Malformed { .. } => "Malformed",
            Self::UnsupportedApiVersion { .. } => "UnsupportedApiVersion",
            Self::Invalid(_) => "Invalid",
        }
    }
}

/// Why a record could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("{what} would be {size} bytes; the limit is {limit}")]
    TooLarge {
        what: &'static str,
        size: usize,
        limit: usize,
    },
    #[error("could not serialize {what}: {source}")]
    Serialize {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

/// Parses and checks one record.
pub fn decode<R: Record>(bytes: &[u8]) -> Result<R, DecodeError> {
    if bytes.len() > R::MAX_BYTES {
        return Err(DecodeError::TooLarge {
            what: R::WHAT,
            size: bytes.len(),
            limit: R::MAX_BYTES,
        });
    }
    let record: R = R::from_wire(bytes).map_err(|source| DecodeError::Malformed {
        what: R::WHAT,
        source,
    })?;
    if record.api_version() != API_VERSION {
        return Err(DecodeError::UnsupportedApiVersion {
            what: R::WHAT,
            found: record.api_version().to_owned(),
        });
    }
    record.check()?;
    Ok(record)
}

/// Serializes one record, refusing anything the other side would refuse for size.
pub fn encode<R: Record>(record: &R) -> Result<Vec<u8>, EncodeError> {
    let bytes = serde_json::to_vec(record).map_err(|source| EncodeError::Serialize {
        what: R::WHAT,
        source,
    })?;
    if bytes.len() > R::MAX_BYTES {
        return Err(EncodeError::TooLarge {
            what: R::WHAT,
            size: bytes.len(),
            limit: R::MAX_BYTES,
        });
    }
    Ok(bytes)
}

/// JSON Schemas of the records, by file name, as committed under `docs/schema/`.
pub fn json_schemas() -> Vec<(&'static str, schemars::Schema)> {
    vec![
        (
            "agent-manifest.schema.json",
            schemars::schema_for!(AgentManifest),
        ),
        (
            "agent-status.schema.json",
            schemars::schema_for!(AgentStatus),
        ),
        ("heartbeat.schema.json", schemars::schema_for!(Heartbeat)),
        (
            "facts-report.schema.json",
            schemars::schema_for!(FactsReport),
        ),
        (
            "signed-agent-manifest.schema.json",
            schemars::schema_for!(signing::SignedManifest),
        ),
        (
            "manifest-floor-request.schema.json",
            schemars::schema_for!(signing::FloorRequest),
        ),
        (
            "signed-manifest-floor.schema.json",
            schemars::schema_for!(signing::SignedFloor),
        ),
        (
            "manifest-floor.schema.json",
            schemars::schema_for!(signing::Floor),
        ),
        (
            "relay-logs-request.schema.json",
            schemars::schema_for!(relay::LogsRequest),
        ),
        (
            "relay-exec-request.schema.json",
            schemars::schema_for!(relay::ExecRequest),
        ),
        (
            "relay-attach-request.schema.json",
            schemars::schema_for!(relay::AttachRequest),
        ),
        (
            "relay-portforward-request.schema.json",
            schemars::schema_for!(relay::PortForwardRequest),
        ),
        (
            "relay-stats-request.schema.json",
            schemars::schema_for!(relay::StatsRequest),
        ),
        (
            "device-stats.schema.json",
            schemars::schema_for!(stats::DeviceStats),
        ),
    ]
}
