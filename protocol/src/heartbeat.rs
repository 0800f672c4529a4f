//! What a device sends about itself: a small heartbeat every interval (liveness and what
//! is free now), and its facts (what it is and has), written only when they change.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{names::DeviceId, time::Timestamp};

/// One heartbeat: the device is alive, and what it has free right now. Its facts are kept
/// apart, in [`FactsReport`], so an idle device does not send them every interval.
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
    pub free: Free,
    /// The facts, inline: how agents before the `facts` bucket send them. Readers use the
    /// device's [`FactsReport`] when there is one, and these otherwise (see [`facts_of`]).
    // Boxed: current agents send none, and the control plane keeps one heartbeat per
    // device in memory.
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub facts: Option<Box<DeviceFacts>>,
}

/// What a device is and has: written by the agent when any of it changes (and again now and
/// then), in the `facts` bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FactsReport {
    pub api_version: String,
    pub device: DeviceId,
    /// When the agent wrote these facts.
    pub timestamp: Timestamp,
    #[serde(flatten)]
    pub facts: DeviceFacts,
}

/// A device's facts: what changes rarely, if ever, while the agent runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceFacts {
    pub agent_version: String,
    pub system: SystemInfo,
    pub capacity: Capacity,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<Address>,
    /// The device's X25519 public key (standard base64 of 32 bytes), which the controller
    /// seals Secret contents to. The private half never leaves the device's state directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealing_key: Option<String>,
    /// What the device accepts, so the controller keeps each manifest within it. Absent
    /// from older agents: [`DeviceLimits::default`] then applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<DeviceLimits>,
    /// The container runtime the device runs, as `<name>://<version>` (`podman://4.9.3`);
    /// absent when containers are disabled or the runtime does not answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_runtime: Option<String>,
}

/// A device's facts: its own report when it has written one, else what its heartbeat
/// carries (an agent from before the `facts` bucket).
pub fn facts_of<'a>(
    report: Option<&'a FactsReport>,
    heartbeat: Option<&'a Heartbeat>,
) -> Option<&'a DeviceFacts> {
    report
        .map(|r| &r.facts)
        .or_else(|| heartbeat.and_then(|h| h.facts.as_deref()))
}

/// The largest manifest a device accepts. A manifest over any of these is refused whole by
/// the agent, so the controller leaves out the resources of the newest manifest that would
/// push a device over them instead of writing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceLimits {
    /// Resources per manifest; never above [`crate::manifest::MAX_RESOURCES`].
    pub max_resources: u32,
    /// Bytes of the stored manifest (signed envelope included); never above
    /// [`crate::kv::MAX_MANIFEST_BYTES`].
    pub max_manifest_bytes: u64,
    /// Bytes of one File's content.
    pub max_file_bytes: u64,
}

impl Default for DeviceLimits {
    fn default() -> Self {
        Self {
            max_resources: crate::manifest::MAX_RESOURCES as u32,
            max_manifest_bytes: crate::kv::MAX_MANIFEST_BYTES as u64,
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
        }
    }
}

/// The agent's default largest File content.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 512 * 1024;

impl DeviceLimits {
    /// The limits with what no device may exceed applied: a device advertising more than
    /// the protocol allows gets the protocol's bound, and zero is read as "not given".
    pub fn bounded(self) -> Self {
        let d = Self::default();
        let pick = |v: u64, max: u64| if v == 0 { max } else { v.min(max) };
        Self {
            max_resources: pick(u64::from(self.max_resources), u64::from(d.max_resources)) as u32,
            max_manifest_bytes: pick(self.max_manifest_bytes, d.max_manifest_bytes),
            max_file_bytes: if self.max_file_bytes == 0 {
                d.max_file_bytes
            } else {
                self.max_file_bytes
            },
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_without_facts_takes_no_room_for_them() {
        // The control plane keeps every device's last heartbeat; current agents send their
        // facts apart, so the inline facts are boxed.
        let size = std::mem::size_of::<Heartbeat>();
        assert!(size <= 128, "{size} bytes");
    }
}
