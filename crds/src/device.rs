use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One device of the fleet. `metadata.name` is the device id; `metadata.labels` are what
/// EdgeManifests select on.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "fleetlet.dev",
    version = "v1alpha1",
    kind = "EdgeDevice",
    plural = "edgedevices",
    singular = "edgedevice",
    shortname = "edev",
    shortname = "ed",
    category = "fleetlet",
    namespaced,
    status = "EdgeDeviceStatus",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Converged","type":"string","jsonPath":".status.conditions[?(@.type==\"Converged\")].status"}"#,
    printcolumn = r#"{"name":"Applied","type":"integer","jsonPath":".status.appliedGeneration","description":"Manifest generation the device has applied"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason","priority":1,"description":"Why the device is or is not Ready"}"#,
    printcolumn = r#"{"name":"Arch","type":"string","jsonPath":".status.device.architecture","priority":1}"#,
    printcolumn = r#"{"name":"Agent","type":"string","jsonPath":".status.device.agentVersion","priority":1}"#,
    printcolumn = r#"{"name":"Last-Heartbeat","type":"date","jsonPath":".status.lastHeartbeatTime","priority":1}"#,
    printcolumn = r#"{"name":"Credentials","type":"string","jsonPath":".status.credentials.secretName","priority":1}"#,
    printcolumn = r#"{"name":"Revoked","type":"boolean","jsonPath":".spec.revoked","priority":1}"#,
    printcolumn = r#"{"name":"Paused","type":"boolean","jsonPath":".spec.paused","priority":1}"#,
    printcolumn = r#"{"name":"Message","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].message","priority":1,"description":"Why the device is not Ready, in words"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct EdgeDeviceSpec {
    /// A human name, e.g. "Kitchen Pi".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub display_name: Option<String>,
    /// Where the device is, free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub location: Option<String>,
    /// Freeze the device: the controller writes no new manifest generations to it.
    #[serde(default)]
    pub paused: bool,
    /// Cut the device off: the controller revokes its NATS credentials (the server closes
    /// its connections) and deletes their Secret. Setting it back to false enrolls the
    /// device anew, with new credentials. Deleting the EdgeDevice revokes them too.
    #[serde(default)]
    pub revoked: bool,
    /// Seconds without a heartbeat before the device's node turns Ready=Unknown; overrides
    /// the bridge default for devices on slow or intermittent links.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 86400))]
    pub heartbeat_grace_seconds: Option<u32>,
    /// Whether the device appears in Kubernetes as a Node (with a Lease), which Pods can be
    /// scheduled to. `Disabled`: no Node and no Lease, and no apiserver write while nothing
    /// about the device changes; its EdgeDevice status is kept all the same (the heartbeat
    /// time in it then moves only with another change). Unset: the bridge's
    /// `--node-projection` (`Enabled` unless the operator chose otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_projection: Option<NodeProjection>,
}

/// Whether a device is projected as a Node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum NodeProjection {
    Enabled,
    Disabled,
}

impl std::str::FromStr for NodeProjection {
    type Err = String;

    /// `Enabled` or `Disabled`, as written in the spec.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "Enabled" => Ok(Self::Enabled),
            "Disabled" => Ok(Self::Disabled),
            other => Err(format!("{other:?} is neither Enabled nor Disabled")),
        }
    }
}

/// What the control plane knows of the device, mirrored from its heartbeats and status.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EdgeDeviceStatus {
    /// Ready (heartbeat fresh), Converged (desired generation applied, every resource
    /// Ready), Degraded (some resource failing), from the bridge; GenerationOutOfRange
    /// (the device reports running a generation no manifest may have) and LimitExceeded (a
    /// manifest is left out because the device could not take it), from the controller.
    /// One entry per type, each owned by the component that writes it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// `metadata.generation` of this EdgeDevice last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Manifest generation the controller wrote for the device and recorded because the
    /// device had not reported it applied within `--record-generation-after-seconds`
    /// (every generation with manifest signing). A device that applies at once moves only
    /// `appliedGeneration`, so this may be older than it, or unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_generation: Option<u64>,
    /// Manifest generation the device reports as applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_generation: Option<u64>,
    /// When the device's latest heartbeat was sent, as of the last change to this status (a
    /// device that goes quiet keeps its final one); refreshed on a timer only if the bridge
    /// runs with `--status-report-seconds`. Liveness itself is the Ready condition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceInfo>,
    /// One line per resource on the device.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<ResourceSummary>,
    /// The device's NATS identity, when the controller issues them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<DeviceCredentials>,
}

/// The condition the controller sets while a device reports a generation beyond what a
/// manifest may have (its value is ignored).
pub const GENERATION_OUT_OF_RANGE: &str = "GenerationOutOfRange";

/// The condition the controller sets while a manifest (or pod) is left out on a device
/// because it would take the device over its limits.
pub const LIMIT_EXCEEDED: &str = "LimitExceeded";

/// The condition types the controller owns on an EdgeDevice (the bridge owns the rest).
pub const CONTROLLER_CONDITIONS: [&str; 2] = [GENERATION_OUT_OF_RANGE, LIMIT_EXCEEDED];

impl EdgeDeviceStatus {
    /// The fields the bridge writes: without the controller's (`desiredGeneration`,
    /// `credentials`, its conditions). What the bridge compares its own view with.
    pub fn bridge_part(&self) -> Self {
        let mut s = self.clone();
        s.desired_generation = None;
        s.credentials = None;
        s.conditions
            .retain(|c| !CONTROLLER_CONDITIONS.contains(&c.type_.as_str()));
        s
    }

    /// The fields the controller writes (`desiredGeneration`, `credentials`, its
    /// conditions), without the bridge's.
    pub fn into_controller_part(self) -> Self {
        Self {
            conditions: self
                .conditions
                .into_iter()
                .filter(|c| CONTROLLER_CONDITIONS.contains(&c.type_.as_str()))
                .collect(),
            desired_generation: self.desired_generation,
            credentials: self.credentials,
            ..Self::default()
        }
    }
}

/// A device's NATS identity as issued by the controller.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceCredentials {
    /// Secret in the EdgeDevice's namespace holding `nats.creds` and an `agent.toml`
    /// fragment to install on the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// The device's own NATS account (public key); its one user's credentials are in the
    /// Secret. The account holds nothing but imports of the device's own subjects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// The device's credentials are revoked (its account is deleted from the servers).
    #[serde(default)]
    pub revoked: bool,
    /// Why the device has no credentials yet, when something is in the way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Facts the device reports about itself.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceInfo {
    /// CPU architecture, e.g. `arm64`.
    pub architecture: String,
    /// Operating system, e.g. `linux`.
    pub operating_system: String,
    /// Distribution and version, e.g. `Debian GNU/Linux 12 (bookworm)`.
    pub os_image: String,
    /// Kernel release.
    pub kernel_version: String,
    /// Version of fleetlet-agent on the device.
    pub agent_version: String,
    /// The device's IP addresses, as it reports them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
}

/// One resource's state on the device.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceSummary {
    /// The resource's id in the device's manifest.
    pub id: String,
    /// Its kind (`file`, `container`, ...), when the device reported it.
    pub kind: String,
    /// Pending, Reconciling, Ready, Failed or Unsupported.
    pub state: String,
    /// Why it is not Ready (the error, or a download's progress).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// `namespace/name` of the EdgeManifest or Pod that asked for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn condition(type_: &str) -> Condition {
        Condition {
            type_: type_.into(),
            status: "True".into(),
            reason: "Because".into(),
            message: String::new(),
            last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
            observed_generation: None,
        }
    }

    #[test]
    fn the_controller_part_and_the_bridge_part_split_a_status() {
        let status = EdgeDeviceStatus {
            conditions: vec![
                condition("Ready"),
                condition(GENERATION_OUT_OF_RANGE),
                condition("Converged"),
                condition(LIMIT_EXCEEDED),
            ],
            observed_generation: Some(3),
            desired_generation: Some(7),
            applied_generation: Some(6),
            last_heartbeat_time: Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)),
            device: Some(DeviceInfo::default()),
            resources: vec![ResourceSummary {
                id: "motd".into(),
                kind: "file".into(),
                state: "Ready".into(),
                message: None,
                owner: None,
            }],
            credentials: Some(DeviceCredentials {
                secret_name: Some("pi-nats".into()),
                ..Default::default()
            }),
        };
        let controller = status.clone().into_controller_part();
        let types: Vec<&str> = controller
            .conditions
            .iter()
            .map(|c| c.type_.as_str())
            .collect();
        assert_eq!(types, [GENERATION_OUT_OF_RANGE, LIMIT_EXCEEDED]);
        assert_eq!(controller.desired_generation, Some(7));
        assert_eq!(controller.credentials, status.credentials);
        assert_eq!(controller.resources, []);
        assert_eq!(controller.device, None);
        assert_eq!(controller.applied_generation, None);
        assert_eq!(controller.last_heartbeat_time, None);

        // Together the two parts hold every condition once, and nothing the bridge
        // writes is in the controller's.
        let bridge = status.bridge_part();
        assert_eq!(
            bridge.conditions.len() + controller.conditions.len(),
            status.conditions.len()
        );
        assert!(
            controller
                .conditions
                .iter()
                .all(|c| !bridge.conditions.contains(c))
        );
    }
}
