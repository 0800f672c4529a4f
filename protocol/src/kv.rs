//! Where things live in NATS JetStream: one KV bucket per kind of record, keyed by device id.
//!
//! A record for device `pi-1` is the KV key `pi-1` in bucket `desired-state`, which JetStream
//! stores on the subject `$KV.desired-state.pi-1`. Keeping the device id as the last, whole
//! subject token is what lets a device's NATS permissions name exactly its own keys; see
//! `docs/architecture.md` ("KV layout and permissions") for the reasoning.

use crate::names::DeviceId;

/// A JetStream KV bucket fleetlet uses, with the settings it is created with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    /// Bucket name; the backing stream is `KV_<name>`.
    pub name: &'static str,
    /// What the bucket holds.
    pub description: &'static str,
    /// Revisions kept per key (1 keeps only the latest).
    pub history: i64,
    /// Largest value accepted, in bytes.
    pub max_value_size: i32,
}

/// Largest AgentManifest the control plane may write and the agent will accept (bytes of JSON).
/// NATS's default `max_payload` is 1 MiB; stay under it with room for headers.
pub const MAX_MANIFEST_BYTES: usize = 1024 * 1024 - 4096;

/// Largest AgentStatus an agent writes (bytes of JSON).
pub const MAX_STATUS_BYTES: usize = 256 * 1024;

/// Largest Heartbeat (bytes of JSON). Room for the facts an older agent sends inline.
pub const MAX_HEARTBEAT_BYTES: usize = 16 * 1024;

/// Largest FactsReport (bytes of JSON).
pub const MAX_FACTS_BYTES: usize = 16 * 1024;

/// Desired state: one [`AgentManifest`](crate::AgentManifest) per device, written by the
/// controller, read by the device. A short history keeps the last few generations for audit.
pub const DESIRED_STATE: Bucket = Bucket {
    name: "desired-state",
    description: "fleetlet: AgentManifest per device (written by the controller)",
    history: 5,
    max_value_size: MAX_MANIFEST_BYTES as i32,
};

/// Actual state: one [`AgentStatus`](crate::AgentStatus) per device, written by the device
/// with compare-and-set, read by the bridge and the controller.
pub const ACTUAL_STATE: Bucket = Bucket {
    name: "actual-state",
    description: "fleetlet: AgentStatus per device (written by the device)",
    history: 1,
    max_value_size: MAX_STATUS_BYTES as i32,
};

/// Liveness: one [`Heartbeat`](crate::Heartbeat) per device, overwritten every interval.
/// Kept apart from status so liveness traffic never contends with status compare-and-set.
pub const HEARTBEAT: Bucket = Bucket {
    name: "heartbeat",
    description: "fleetlet: Heartbeat per device (written by the device)",
    history: 1,
    max_value_size: MAX_HEARTBEAT_BYTES as i32,
};

/// Facts: one [`FactsReport`](crate::FactsReport) per device, written by the device when
/// its facts change. Kept apart from heartbeats so a beat carries only liveness.
pub const FACTS: Bucket = Bucket {
    name: "facts",
    description: "fleetlet: FactsReport per device (written by the device)",
    history: 1,
    max_value_size: MAX_FACTS_BYTES as i32,
};

/// Every bucket, in the order they are created.
pub const BUCKETS: [Bucket; 4] = [DESIRED_STATE, ACTUAL_STATE, HEARTBEAT, FACTS];

impl Bucket {
    /// The KV key of `device` in this bucket.
    pub fn key(self, device: &DeviceId) -> &str {
        device.as_str()
    }

    /// The JetStream stream backing this bucket.
    pub fn stream(self) -> String {
        format!("KV_{}", self.name)
    }

    /// The subject a device's record is stored on; what NATS permissions are written against.
    pub fn subject(self, device: &DeviceId) -> String {
        format!("$KV.{}.{}", self.name, device)
    }

    /// Subject matching every device's record in this bucket.
    pub fn all_subjects(self) -> String {
        format!("$KV.{}.>", self.name)
    }

    /// Where JetStream republishes each record of `device` once it is stored, with its
    /// sequence (the KV revision) in the `Nats-Sequence` header: what readers subscribe to.
    /// Only stored records appear here, in the order they were stored; a write JetStream
    /// refused (a failed compare-and-set) never does.
    pub fn changes(self, device: &DeviceId) -> String {
        format!("{CHANGES_PREFIX}.{}.{}", self.name, device)
    }

    /// Every device's changes in this bucket.
    pub fn all_changes(self) -> String {
        format!("{CHANGES_PREFIX}.{}.>", self.name)
    }

    /// Direct get of `device`'s latest record: the request names the key in its subject, so
    /// a grant of this subject is a grant of that one key (a body is refused).
    pub fn direct_get(self, device: &DeviceId) -> String {
        format!("{}.{}", self.direct_get_api(), self.subject(device))
    }

    /// Direct get with the query in the body (any key, batches): for readers of the whole
    /// bucket only.
    pub fn direct_get_api(self) -> String {
        format!("$JS.API.DIRECT.GET.{}", self.stream())
    }
}

/// First tokens of the subjects records are republished on ([`Bucket::changes`]).
pub const CHANGES_PREFIX: &str = "fleetlet.kv";

/// The JetStream message header with a stored message's sequence (a KV revision).
pub const SEQUENCE_HEADER: &str = "Nats-Sequence";
/// The header marking a KV delete (`DEL`) or purge (`PURGE`) instead of a value.
pub const OPERATION_HEADER: &str = "KV-Operation";
/// Compare-and-set on a write: the subject's last sequence must be this (0: no value yet).
pub const EXPECTED_LAST_SUBJECT_SEQUENCE: &str = "Nats-Expected-Last-Subject-Sequence";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_records_are_whole_subject_tokens() {
        let dev = DeviceId::new("pi-1").unwrap();
        assert_eq!(DESIRED_STATE.subject(&dev), "$KV.desired-state.pi-1");
        assert_eq!(ACTUAL_STATE.subject(&dev), "$KV.actual-state.pi-1");
        assert_eq!(HEARTBEAT.stream(), "KV_heartbeat");
        assert_eq!(HEARTBEAT.key(&dev), "pi-1");
        assert_eq!(
            DESIRED_STATE.direct_get(&dev),
            "$JS.API.DIRECT.GET.KV_desired-state.$KV.desired-state.pi-1"
        );
        assert_eq!(
            DESIRED_STATE.changes(&dev),
            "fleetlet.kv.desired-state.pi-1"
        );
    }

    #[test]
    fn bucket_names_are_valid_for_jetstream() {
        for b in BUCKETS {
            assert!(
                b.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
                "{}",
                b.name
            );
            assert!(b.max_value_size > 0);
        }
    }
}
