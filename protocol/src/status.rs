//! Actual state: what a device reports about the manifest it runs.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{names::DeviceId, names::ResourceId, time::Timestamp};

/// A device's report on its manifest, written with compare-and-set to `actual-state`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    pub api_version: String,
    pub device: DeviceId,
    /// Newest manifest generation the agent has accepted.
    pub manifest_generation: u64,
    /// Generation whose every resource has been reconciled at least once (Ready, Failed or
    /// Unsupported). Equal to `manifestGeneration` once the agent has caught up.
    pub observed_generation: u64,
    #[serde(default)]
    pub resources: BTreeMap<ResourceId, ResourceStatus>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// How many times drift (a change made outside fleetlet) was found and repaired.
    #[serde(default)]
    pub drift_repairs: u64,
    /// The most recent drift found.
    // Boxed (here and below): the controller and the bridge each keep every device's last
    // status, and most devices have neither.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_drift: Option<Box<DriftEvent>>,
    /// The last manifest the agent refused, and why; the previous one stays in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rejection: Option<Box<Rejection>>,
}

/// A resource found changed outside fleetlet, and put back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DriftEvent {
    pub resource: ResourceId,
    /// What was found, e.g. `content changed`, `absent`.
    pub reason: String,
    pub at: Timestamp,
}

/// A manifest the agent would not apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rejection {
    /// Generation of the refused manifest, when it could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// KV revision of the refused value.
    pub revision: u64,
    /// A machine-readable reason, e.g. `Malformed`, `WrongDevice`, `StaleGeneration`.
    pub reason: String,
    pub message: String,
    pub at: Timestamp,
}

/// Where one resource stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "state")]
pub enum ResourceStatus {
    /// Accepted, not yet worked on.
    Pending,
    /// Being brought to its desired state; `message` says how far (a download's progress).
    Reconciling {
        since: Timestamp,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
    /// In its desired state.
    // The details are boxed: a status map holds every state at the size of its largest,
    // and the control plane keeps one map per device in memory.
    Ready {
        since: Timestamp,
        details: Box<ResourceDetails>,
    },
    /// Could not be brought to its desired state. A transient failure (the runtime, I/O) is
    /// retried after `retryAfter`; a `permanent` one (an invalid spec, a path or unit the
    /// device's policy forbids, a run-once job that failed) waits for a new spec.
    #[serde(rename_all = "camelCase")]
    Failed {
        since: Timestamp,
        error: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after: Option<Timestamp>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        permanent: bool,
    },
    /// A kind this agent does not run (unknown, a placeholder, or disabled by the owner).
    Unsupported { kind: String, message: String },
}

impl ResourceStatus {
    /// Ready since `since`, looking like `details`.
    pub fn ready(since: Timestamp, details: ResourceDetails) -> Self {
        Self::Ready {
            since,
            details: Box::new(details),
        }
    }

    /// What the resource looks like on the device, when it is Ready.
    pub fn details(&self) -> Option<&ResourceDetails> {
        match self {
            Self::Ready { details, .. } => Some(details),
            _ => None,
        }
    }

    /// Ready and, for workloads with a readiness probe, passing it.
    pub fn is_ready(&self) -> bool {
        matches!(self, Self::Ready { details, .. } if details.probe_ready())
    }

    /// True once the resource has been worked on, whatever the outcome.
    pub fn is_settled(&self) -> bool {
        matches!(
            self,
            Self::Ready { .. } | Self::Failed { .. } | Self::Unsupported { .. }
        )
    }

    /// Failed in a way only a new spec can change (or a kind this device does not run).
    pub fn is_permanent_failure(&self) -> bool {
        matches!(
            self,
            Self::Failed {
                permanent: true,
                ..
            } | Self::Unsupported { .. }
        )
    }

    /// The failure's message, for a Failed or Unsupported resource.
    pub fn failure(&self) -> Option<&str> {
        match self {
            Self::Failed { error, .. } => Some(error),
            Self::Unsupported { message, .. } => Some(message),
            _ => None,
        }
    }

    /// A short name of the state, for summaries and metrics labels.
    pub fn state_name(&self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Reconciling { .. } => "Reconciling",
            Self::Ready { .. } => "Ready",
            Self::Failed { .. } => "Failed",
            Self::Unsupported { .. } => "Unsupported",
        }
    }
}

/// What a Ready resource looks like on the device, per kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum ResourceDetails {
    #[serde(rename_all = "camelCase")]
    Container {
        container_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        image_digest: Option<String>,
        /// podman's state, e.g. `running`, `exited`.
        state: String,
        #[serde(default)]
        restart_count: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        started_at: Option<Timestamp>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exit_code: Option<i32>,
        /// Probe result; absent when the container has no probe.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        probe_ready: Option<bool>,
    },
    #[serde(rename_all = "camelCase")]
    SystemdUnit {
        active_state: String,
        sub_state: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        unit_file_state: Option<String>,
        /// Automatic restarts of a service since it was started (`NRestarts`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        restarts: Option<u32>,
    },
    File {
        sha256: String,
        size: u64,
    },
    /// An interface as systemd-networkd and the kernel report it.
    #[serde(rename_all = "camelCase")]
    NetworkConfig {
        /// networkd's operational state: `routable`, `degraded`, `carrier`, `no-carrier`, ...
        operational_state: String,
        /// networkd's administrative state: `configured`, `configuring`, `failed`, ...
        administrative_state: String,
        /// The addresses the interface has, with prefix length (static and from DHCP).
        #[serde(default)]
        addresses: Vec<String>,
    },
    /// The agent version running, and the one kept to go back to.
    #[serde(rename_all = "camelCase")]
    AgentUpgrade {
        version: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        previous: Option<String>,
    },
    /// The run of a ShellJob for the current spec (a job runs once per spec).
    #[serde(rename_all = "camelCase")]
    ShellJob {
        /// Which spec this run was for.
        spec_hash: String,
        /// Absent when the command was killed (timeout, signal).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exit_code: Option<i32>,
        #[serde(default)]
        timed_out: bool,
        started_at: Timestamp,
        finished_at: Timestamp,
        /// stdout and stderr interleaved, cut to the device's limit.
        #[serde(default)]
        output: String,
        #[serde(default)]
        output_truncated: bool,
    },
}

impl ResourceDetails {
    pub fn kind(&self) -> crate::ResourceKind {
        match self {
            Self::Container { .. } => crate::ResourceKind::Container,
            Self::SystemdUnit { .. } => crate::ResourceKind::SystemdUnit,
            Self::File { .. } => crate::ResourceKind::File,
            Self::ShellJob { .. } => crate::ResourceKind::ShellJob,
            Self::NetworkConfig { .. } => crate::ResourceKind::NetworkConfig,
            Self::AgentUpgrade { .. } => crate::ResourceKind::AgentUpgrade,
        }
    }

    /// False when a readiness probe says the workload is not serving.
    pub fn probe_ready(&self) -> bool {
        !matches!(
            self,
            Self::Container {
                probe_ready: Some(false),
                ..
            }
        )
    }
}

/// A Kubernetes-style condition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: ConditionStatus,
    pub reason: String,
    #[serde(default)]
    pub message: String,
    pub last_transition_time: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

impl AgentStatus {
    /// A fresh status for `device` with nothing observed yet.
    pub fn new(device: DeviceId) -> Self {
        Self {
            api_version: crate::API_VERSION.to_owned(),
            device,
            manifest_generation: 0,
            observed_generation: 0,
            resources: BTreeMap::new(),
            conditions: Vec::new(),
            drift_repairs: 0,
            last_drift: None,
            last_rejection: None,
        }
    }

    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }

    /// Sets a condition, keeping `lastTransitionTime` unless the status flips, so an
    /// unchanged condition serializes identically and causes no write downstream.
    pub fn set_condition(
        &mut self,
        type_: &str,
        status: ConditionStatus,
        reason: &str,
        message: &str,
        now: Timestamp,
    ) {
        let observed_generation = Some(self.manifest_generation);
        match self.conditions.iter_mut().find(|c| c.type_ == type_) {
            Some(c) => {
                if c.status != status {
                    c.last_transition_time = now;
                }
                c.status = status;
                reason.clone_into(&mut c.reason);
                message.clone_into(&mut c.message);
                c.observed_generation = observed_generation;
            }
            None => self.conditions.push(Condition {
                type_: type_.to_owned(),
                status,
                reason: reason.to_owned(),
                message: message.to_owned(),
                last_transition_time: now,
                observed_generation,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ready_status_is_small_in_a_map_and_reads_as_before() {
        // Every entry of a status map takes the room of the largest state: Ready's details
        // are boxed so that is a failure's, not a container's.
        assert!(
            std::mem::size_of::<ResourceStatus>() <= 64,
            "{} bytes",
            std::mem::size_of::<ResourceStatus>()
        );
        // The wire form is the unboxed one.
        let json =
            r#"{"state":"Ready","since":5,"details":{"kind":"file","sha256":"ab","size":3}}"#;
        let s: ResourceStatus = serde_json::from_str(json).expect("decodes");
        assert_eq!(
            s.details(),
            Some(&ResourceDetails::File {
                sha256: "ab".into(),
                size: 3
            })
        );
        assert_eq!(serde_json::to_string(&s).expect("encodes"), json);
        assert_eq!(ResourceStatus::Pending.details(), None);
    }

    #[test]
    fn a_status_keeps_its_rare_records_out_of_line_and_reads_as_before() {
        // One is kept per device by the controller and by the bridge: the drift and the
        // rejection most devices never have take a pointer each, not their whole size.
        assert!(
            std::mem::size_of::<AgentStatus>() <= 160,
            "{} bytes",
            std::mem::size_of::<AgentStatus>()
        );
        let json = r#"{"apiVersion":"fleetlet.dev/v1alpha1","device":"pi","manifestGeneration":2,"observedGeneration":2,"resources":{},"conditions":[],"driftRepairs":1,"lastDrift":{"resource":"f","reason":"absent","at":7},"lastRejection":{"revision":3,"reason":"Malformed","message":"bad","at":8}}"#;
        let s: AgentStatus = serde_json::from_str(json).expect("decodes");
        assert_eq!(
            s.last_drift.as_ref().map(|d| d.reason.as_str()),
            Some("absent")
        );
        assert_eq!(s.last_rejection.as_ref().map(|r| r.revision), Some(3));
        assert_eq!(serde_json::to_string(&s).expect("encodes"), json);
    }
}
