use fleetlet_protocol::{ResourceId, ResourceSpec};
use k8s_openapi::apimachinery::pkg::{
    apis::meta::v1::{Condition, LabelSelector},
    util::intstr::IntOrString,
};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Resources to run on a set of devices in the same namespace.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "fleetlet.dev",
    version = "v1alpha1",
    kind = "EdgeManifest",
    plural = "edgemanifests",
    singular = "edgemanifest",
    shortname = "em",
    category = "fleetlet",
    namespaced,
    status = "EdgeManifestStatus",
    printcolumn = r#"{"name":"Targeted","type":"integer","jsonPath":".status.targeted"}"#,
    printcolumn = r#"{"name":"Updated","type":"integer","jsonPath":".status.updated"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.ready"}"#,
    printcolumn = r#"{"name":"Failed","type":"integer","jsonPath":".status.failed"}"#,
    printcolumn = r#"{"name":"Status","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Paused","type":"boolean","jsonPath":".spec.rollout.paused","priority":1}"#,
    printcolumn = r#"{"name":"Message","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].message","priority":1,"description":"What the rollout waits on, or why it is stalled"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.selector) || (has(self.devices) && size(self.devices) > 0)",
        "message": "an EdgeManifest must select devices: set selector, devices, or both"
    },
    {
        "rule": "!has(self.resources) || self.resources.all(r, self.resources.exists_one(o, o.id == r.id))",
        "message": "resource ids must be unique within an EdgeManifest"
    }
]))]
pub struct EdgeManifestSpec {
    /// Devices (EdgeDevices in this namespace) whose labels match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "!has(self.matchExpressions) || self.matchExpressions.all(e, e.operator in ['In', 'NotIn', 'Exists', 'DoesNotExist'])",
        "message": "selector.matchExpressions operator must be In, NotIn, Exists or DoesNotExist (case matters)"
    }]))]
    pub selector: Option<LabelSelector>,
    /// Devices selected by name, in addition to the selector.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 1000),
        inner(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(max = 63))
    )]
    pub devices: Vec<String>,
    /// What to run on each selected device.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 128))]
    pub resources: Vec<ResourceTemplate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStrategy>,
}

/// One resource as users write it: an id and exactly one kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ResourceTemplate {
    /// Unique on each device this manifest reaches.
    pub id: ResourceId,
    #[serde(flatten)]
    pub spec: ResourceSpec,
}

/// How a new generation of the manifest moves across its devices.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStrategy {
    /// Most devices updating at once: a count or a percentage of the targeted devices.
    /// Default: all at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "type(self) == int ? self >= 1 : self.matches('^[0-9]+%$') && int(self.replace('%', '')) >= 1 && int(self.replace('%', '')) <= 100",
        "message": "rollout.maxUnavailable must be a count of at least 1 or a percentage such as \"25%\" (1% to 100%)"
    }]))]
    pub max_unavailable: Option<IntOrString>,
    /// Stop moving devices to new generations.
    #[serde(default)]
    pub paused: bool,
    /// Seconds a rollout may go without progress before it is reported stuck.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub progress_deadline_seconds: Option<u32>,
}

/// Rollout progress across the selected devices.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EdgeManifestStatus {
    /// `metadata.generation` the controller last acted on (-1 until it first writes a status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Devices selected.
    #[serde(default)]
    pub targeted: u32,
    /// Devices whose manifest carries this generation.
    #[serde(default)]
    pub updated: u32,
    /// Devices running this generation with every resource of it Ready.
    #[serde(default)]
    pub ready: u32,
    /// Devices reporting a resource of this manifest Failed.
    #[serde(default)]
    pub failed: u32,
    /// When the rollout last made progress (a new generation, or a change in the number of
    /// Ready devices): what `progressDeadlineSeconds` is measured from, across controller
    /// restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_progress_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// Ready, Reconciling and Stalled (kstatus conventions, read by Flux and Argo CD), then
    /// Progressing, Available, Conflict and Degraded (naming the first failing devices and
    /// resources). Stalled is True at once for a permanent failure (a resource that cannot
    /// succeed as written) and for devices the manifest would take over their limits.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
