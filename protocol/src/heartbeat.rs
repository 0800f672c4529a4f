//! Liveness and device facts, written by the agent every heartbeat interval.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{names::DeviceId, time::Timestamp};

/// One heartbeat: the device is alive, and what it looks like right now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Heartbeat {
    pub api_version: String,
    pub device: DeviceId,
    /// Increases by one per heartbeat since the agent started; restarts at 1.
    pub sequence: u64,
    pub timestamp: Timestamp,
    /// Seconds until the next heartbeat; lets readers judge staleness without configuration.
    pub interval_seconds: u32,
    pub agent_version: String,
    pub system: SystemInfo,
    pub capacity: Capacity,
    pub free: Free,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<Address>,
    /// The device's X25519 public key (standard base64 of 32 bytes), which the controller
    /// seals Secret contents to. The private half never leaves the device's state directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealing_key: Option<String>,
}

/// The device's operating system and hardware.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SystemInfo {
    /// `linux`.
    pub operating_system: String,
    /// Kubernetes-style architecture: `amd64`, `arm64`, `arm`.
    pub architecture: String,
    /// e.g. `Debian GNU/Linux 12 (bookworm)`.
    pub os_image: String,
    pub kernel_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Board model when known, e.g. `Raspberry Pi 4 Model B Rev 1.4`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

/// What the device has in total.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Capacity {
    pub cpu_cores: u32,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    #[serde(default)]
    pub pids: u64,
}

/// What the device has free now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Free {
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    #[serde(default)]
    pub pids: u64,
}

/// An address the device can be reached at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Address {
    /// Kubernetes node address type: `InternalIP`, `ExternalIP` or `Hostname`.
    #[serde(rename = "type")]
    pub type_: String,
    pub address: String,
}
