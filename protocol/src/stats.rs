//! Resource usage of a device and of its containers, as the kubelet API reports it
//! (`/metrics/resource`, `/stats/summary`, and so `kubectl top`).
//!
//! The requester opens a relay session on [`crate::relay::stats_subject`] with a
//! [`crate::relay::StatsRequest`]; the agent answers with one [`DeviceStats`] document (JSON)
//! in output frames, then the end frame. Counters are cumulative, so the reader computes
//! rates from two samples as it does for a kubelet; the agent adds a rate when it has a
//! sample of its own to compare with.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::names::ResourceId;

/// Largest stats document a requester needs to accept (a device with hundreds of
/// containers stays far below it).
pub const MAX_STATS_BYTES: usize = 1024 * 1024;

/// One sample of the device and of every running container the agent created.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceStats {
    /// When the sample was taken: milliseconds since the Unix epoch, by the device's clock.
    pub time_ms: i64,
    /// When the device booted (milliseconds since the Unix epoch), if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_time_ms: Option<i64>,
    /// The whole device.
    pub node: Usage,
    /// Running containers created by the agent, by resource id.
    #[serde(default)]
    pub containers: Vec<ContainerStats>,
}

/// CPU and memory of the device or of one container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    /// CPU time used, all cores together, in nanoseconds (cumulative).
    pub cpu_usage_core_nanoseconds: u64,
    /// CPU use in billionths of a core, averaged since the agent's previous sample, when it
    /// has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_usage_nano_cores: Option<u64>,
    /// Memory in use that cannot be reclaimed at once (what the kubelet calls the working
    /// set), in bytes.
    pub memory_working_set_bytes: u64,
    /// Memory the device could still hand out, in bytes (device only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_available_bytes: Option<u64>,
}

/// One running container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContainerStats {
    /// The Container resource of the manifest this container runs.
    pub resource: ResourceId,
    /// When the container started (milliseconds since the Unix epoch).
    pub start_time_ms: i64,
    #[serde(flatten)]
    pub usage: Usage,
}
