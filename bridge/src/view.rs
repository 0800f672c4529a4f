//! What Kubernetes should show for one device, computed from its EdgeDevice, its last
//! heartbeat and its last status. Pure: the mirror loop compares and writes.

use std::collections::BTreeMap;

use fleetlet_crds::{
    Condition, DeviceInfo, EdgeDevice, EdgeDeviceStatus, ResourceSummary, Time,
    k8s_openapi::{
        api::{
            coordination::v1::{Lease, LeaseSpec},
            core::v1::{
                DaemonEndpoint, Node, NodeAddress, NodeCondition, NodeDaemonEndpoints, NodeSpec,
                NodeStatus, NodeSystemInfo, Taint,
            },
        },
        apimachinery::pkg::{
            api::resource::Quantity,
            apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference},
        },
        jiff::Timestamp as KTime,
    },
};
use fleetlet_protocol::{
    AgentStatus, DeviceFacts, FactsReport, Heartbeat, ResourceStatus, Timestamp, facts_of,
};

/// Label on every Node the bridge manages, holding the device id.
pub use fleetlet_crds::naming::DEVICE_LABEL;
/// Prefix for the device's own labels copied onto its Node.
pub const DEVICE_LABEL_PREFIX: &str = "device.fleetlet.dev/";
/// The taint keeping ordinary Pods and DaemonSets off device nodes.
pub const TAINT_KEY: &str = "fleetlet.dev/edge";
/// The bridge's server-side-apply field manager.
pub const FIELD_MANAGER: &str = "fleetlet-bridge";

/// Liveness of a device, from its heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    NeverConnected,
    Alive,
    /// No heartbeat within the grace period.
    Silent,
}

pub fn liveness(hb: Option<&Heartbeat>, now: Timestamp, grace_ms: u64) -> Liveness {
    match hb {
        None => Liveness::NeverConnected,
        Some(h) if now.as_millis().saturating_sub(h.timestamp.as_millis()) <= grace_ms => {
            Liveness::Alive
        }
        Some(_) => Liveness::Silent,
    }
}

pub fn k8s_time(t: Timestamp) -> Time {
    Time(
        KTime::from_millisecond(i64::try_from(t.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(KTime::UNIX_EPOCH),
    )
}

/// The largest generation a status can hold (Kubernetes integers are signed 64-bit).
pub const MAX_STORED_GENERATION: u64 = i64::MAX as u64;

/// Condition with `lastTransitionTime` kept from `old` while the status does not change.
fn condition(
    old: &[Condition],
    type_: &str,
    status: &str,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let keep = old.iter().find(|c| c.type_ == type_ && c.status == status);
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: keep.map_or_else(|| now.clone(), |c| c.last_transition_time.clone()),
    }
}

/// The first few of `items`, and how many more there are: a condition message stays short.
fn summarize(items: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut text = items
        .iter()
        .take(SHOWN)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join("; ");
    if items.len() > SHOWN {
        text.push_str(&format!("; and {} more", items.len() - SHOWN));
    }
    text
}

/// One condition's verdict: status, reason and message.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Verdict {
    status: &'static str,
    reason: &'static str,
    message: String,
}

impl Verdict {
    fn new(status: &'static str, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            reason,
            message: message.into(),
        }
    }

    fn condition(
        self,
        old: &[Condition],
        type_: &str,
        generation: Option<i64>,
        now: &Time,
    ) -> Condition {
        condition(
            old,
            type_,
            self.status,
            self.reason,
            self.message,
            generation,
            now,
        )
    }
}

/// Ready, from liveness alone.
fn ready_verdict(live: Liveness) -> Verdict {
    match live {
        Liveness::Alive => Verdict::new("True", "HeartbeatFresh", ""),
        Liveness::Silent => Verdict::new(
            "Unknown",
            "HeartbeatMissed",
            "no heartbeat within the grace period",
        ),
        Liveness::NeverConnected => Verdict::new(
            "False",
            "NeverConnected",
            "the device's agent has never connected",
        ),
    }
}

/// One summary row per resource the device reports.
fn resource_summaries(st: Option<&AgentStatus>) -> Vec<ResourceSummary> {
    let Some(s) = st else {
        return Vec::new();
    };
    s.resources
        .iter()
        .map(|(id, r)| ResourceSummary {
            id: id.to_string(),
            kind: match r {
                ResourceStatus::Ready { details, .. } => details.kind().key().into(),
                ResourceStatus::Unsupported { kind, .. } => kind.clone(),
                _ => String::new(),
            },
            state: r.state_name().into(),
            message: match r {
                ResourceStatus::Failed { error, .. } => Some(error.clone()),
                ResourceStatus::Unsupported { message, .. } => Some(message.clone()),
                ResourceStatus::Reconciling { message, .. } => message.clone(),
                ResourceStatus::Ready { details, .. } if !details.probe_ready() => {
                    Some("readiness probe failing".into())
                }
                _ => None,
            },
            owner: None,
        })
        .collect()
}

/// Degraded: the failed resources, permanent ones marked.
fn degraded_verdict(st: Option<&AgentStatus>) -> Verdict {
    let failed: Vec<String> = st
        .iter()
        .flat_map(|s| &s.resources)
        .filter_map(|(id, r)| {
            r.failure().map(|e| {
                let permanent = if r.is_permanent_failure() {
                    ", permanent"
                } else {
                    ""
                };
                format!("{id} ({}{permanent}: {e})", r.state_name())
            })
        })
        .collect();
    if failed.is_empty() {
        Verdict::new("False", "NoFailures", "")
    } else {
        Verdict::new("True", "ResourcesFailed", summarize(&failed))
    }
}

/// Converged: the device runs the desired generation and every resource is ready.
/// `reported` is what the device says it runs (untrusted), `applied` the same when
/// Kubernetes can store it.
fn converged_verdict(
    st: Option<&AgentStatus>,
    reported: Option<u64>,
    applied: Option<u64>,
    desired: Option<u64>,
    resources: &[ResourceSummary],
) -> Verdict {
    let all_ready = st.is_some_and(|s| s.resources.values().all(ResourceStatus::is_ready));
    let rejection = st.and_then(|s| s.last_rejection.as_ref());
    // The controller records a generation only when the device is slow to apply it: one
    // the device reports applied was written for it, and covers any older record.
    let desired = match (applied, desired) {
        (Some(a), None) if a > 0 => Some(a),
        (_, d) => d,
    };
    match (applied, desired) {
        (None, _) if reported.is_some() => Verdict::new(
            "False",
            "GenerationOutOfRange",
            format!(
                "the device reports generation {}, which no manifest may have",
                reported.unwrap_or_default()
            ),
        ),
        (Some(a), Some(d)) if a >= d && all_ready => Verdict::new("True", "AllResourcesReady", ""),
        (Some(a), Some(d)) if a < d => match rejection {
            Some(r) if r.generation.is_none_or(|g| g > a) => Verdict::new(
                "False",
                "ManifestRejected",
                format!(
                    "device runs generation {a}, desired {d}; it refused {} ({}): {}",
                    r.generation
                        .map_or_else(|| "a manifest".into(), |g| format!("generation {g}")),
                    r.reason,
                    r.message,
                ),
            ),
            _ => Verdict::new(
                "False",
                "Applying",
                format!("device runs generation {a}, desired {d}"),
            ),
        },
        (None, _) => Verdict::new("False", "NoStatus", "the device has not reported a status"),
        _ if !all_ready => {
            let waiting: Vec<String> = resources
                .iter()
                .filter(|r| r.state != "Ready")
                .map(|r| match &r.message {
                    Some(m) => format!("{} ({}: {m})", r.id, r.state),
                    None => format!("{} ({})", r.id, r.state),
                })
                .collect();
            Verdict::new("False", "ResourcesNotReady", summarize(&waiting))
        }
        _ => Verdict::new(
            "Unknown",
            "NoDesiredState",
            "the controller has not written a manifest yet",
        ),
    }
}

/// The device's facts, from its heartbeat (where the mirror puts them; see
/// [`with_facts`]).
fn device_info(h: &Heartbeat) -> Option<DeviceInfo> {
    let h = h.facts.as_deref()?;
    Some(DeviceInfo {
        architecture: h.system.architecture.clone(),
        operating_system: h.system.operating_system.clone(),
        os_image: h.system.os_image.clone(),
        kernel_version: h.system.kernel_version.clone(),
        agent_version: h.agent_version.clone(),
        addresses: h.addresses.iter().map(|a| a.address.clone()).collect(),
    })
}

/// The device's heartbeat with its facts in it: its own report when it has stored one,
/// else what the heartbeat carried inline (an agent from before the `facts` bucket).
pub fn with_facts(hb: Option<Heartbeat>, report: Option<&FactsReport>) -> Option<Heartbeat> {
    hb.map(|mut h| {
        h.facts = facts_of(report, Some(&h)).cloned().map(Box::new);
        h
    })
}

/// The EdgeDevice status fields the bridge owns. `desiredGeneration` is the controller's.
pub fn device_status(
    dev: &EdgeDevice,
    hb: Option<&Heartbeat>,
    st: Option<&AgentStatus>,
    live: Liveness,
    now: Timestamp,
    report_every_ms: u64,
) -> EdgeDeviceStatus {
    let old = dev.status.clone().unwrap_or_default();
    let now_k = k8s_time(now);
    let generation = dev.metadata.generation;
    let resources = resource_summaries(st);
    // What a device reports is untrusted: a generation Kubernetes cannot store (it keeps
    // integers signed) is shown as such instead of blocking every status write.
    let reported = st.map(|s| s.observed_generation);
    let applied = reported.filter(|g| *g <= MAX_STORED_GENERATION);
    let converged = converged_verdict(st, reported, applied, old.desired_generation, &resources);
    let conditions = vec![
        ready_verdict(live).condition(&old.conditions, "Ready", generation, &now_k),
        converged.condition(&old.conditions, "Converged", generation, &now_k),
        degraded_verdict(st).condition(&old.conditions, "Degraded", generation, &now_k),
    ];
    let mut out = EdgeDeviceStatus {
        conditions,
        observed_generation: generation,
        desired_generation: None,
        applied_generation: applied,
        last_heartbeat_time: old.last_heartbeat_time.clone(),
        device: hb.and_then(device_info),
        resources,
        // The controller's field, not the bridge's.
        credentials: None,
    };
    // The heartbeat time is refreshed only with another change or every `report_every`:
    // liveness itself travels in the Lease, which is cheap to renew.
    if let Some(h) = hb {
        let stale = old.last_heartbeat_time.as_ref().is_none_or(|t| {
            (h.timestamp.as_millis() as i64).saturating_sub(t.0.as_millisecond())
                >= report_every_ms as i64
        });
        if stale || stored_status_digest(dev) != device_status_digest(&out) {
            out.last_heartbeat_time = Some(k8s_time(h.timestamp));
        }
    }
    out
}

fn quantity(n: u64) -> Quantity {
    Quantity(n.to_string())
}

/// Node labels: identity, platform, role, and the device's labels under a prefix.
pub fn node_labels(
    dev: &EdgeDevice,
    device_id: &str,
    hb: Option<&Heartbeat>,
) -> BTreeMap<String, String> {
    let mut l = BTreeMap::new();
    l.insert(DEVICE_LABEL.into(), device_id.into());
    l.insert("kubernetes.io/hostname".into(), device_id.into());
    l.insert("kubernetes.io/os".into(), "linux".into());
    if let Some(f) = hb.and_then(|h| h.facts.as_deref()) {
        l.insert("kubernetes.io/arch".into(), f.system.architecture.clone());
    }
    l.insert(
        "node.kubernetes.io/instance-type".into(),
        "fleetlet-edge".into(),
    );
    l.insert("node-role.kubernetes.io/edge".into(), String::new());
    l.insert("type".into(), "virtual-kubelet".into());
    for (k, v) in dev.metadata.labels.iter().flatten() {
        // Only label names that stay valid with the prefix.
        let name = k.rsplit('/').next().unwrap_or(k);
        if name.len() <= 63 {
            l.insert(format!("{DEVICE_LABEL_PREFIX}{name}"), v.clone());
        }
    }
    l
}

pub fn node_taints() -> Vec<Taint> {
    vec![Taint {
        key: TAINT_KEY.into(),
        value: Some("true".into()),
        effect: "NoSchedule".into(),
        time_added: None,
    }]
}

/// Node status: facts from the heartbeat and conditions from liveness and free resources.
/// `lastHeartbeatTime` on conditions follows the same refresh rule as the EdgeDevice's.
pub struct NodeStatusView {
    pub node_info: NodeSystemInfo,
    pub capacity: BTreeMap<String, Quantity>,
    pub addresses: Vec<NodeAddress>,
    pub conditions: Vec<NodeCondition>,
}

/// Where the apiserver reaches the kubelet API the bridge serves for every virtual node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeletEndpoint {
    /// The advertised address (the Nodes' InternalIP).
    pub address: String,
    pub port: u16,
    /// Declare `ExtendWebSocketsToKubelet` (else the apiserver speaks SPDY to it).
    pub websockets: bool,
}

impl NodeStatusView {
    /// The Node status to apply. With the kubelet API served, the apiserver reaches "the
    /// kubelet" (the bridge) at InternalIP; the device's own addresses stay in its
    /// EdgeDevice status and its pods' hostIP.
    pub fn into_status(self, kubelet: Option<&KubeletEndpoint>, device: &str) -> NodeStatus {
        let mut status = NodeStatus {
            node_info: Some(self.node_info),
            allocatable: Some(self.capacity.clone()),
            capacity: Some(self.capacity),
            addresses: Some(self.addresses),
            conditions: Some(self.conditions),
            ..Default::default()
        };
        if let Some(k) = kubelet {
            status.addresses = Some(vec![
                NodeAddress {
                    type_: "InternalIP".into(),
                    address: k.address.clone(),
                },
                NodeAddress {
                    type_: "Hostname".into(),
                    address: device.into(),
                },
            ]);
            status.daemon_endpoints = Some(NodeDaemonEndpoints {
                kubelet_endpoint: Some(DaemonEndpoint {
                    port: i32::from(k.port),
                }),
            });
            if k.websockets {
                status.declared_features = Some(vec!["ExtendWebSocketsToKubelet".into()]);
            }
        }
        status
    }
}

/// The part of a Node's status the bridge owns, in the shape
/// [`NodeStatusView::into_status`] builds, so the two compare equal when nothing changed.
fn owned_part(s: NodeStatus) -> NodeStatus {
    NodeStatus {
        node_info: s.node_info,
        capacity: s.capacity,
        allocatable: s.allocatable,
        addresses: s.addresses.filter(|a| !a.is_empty()).or(Some(Vec::new())),
        conditions: s.conditions,
        daemon_endpoints: s
            .daemon_endpoints
            .filter(|d| d.kubelet_endpoint.as_ref().is_some_and(|k| k.port != 0)),
        declared_features: s.declared_features.filter(|f| !f.is_empty()),
        ..Default::default()
    }
}

/// Annotation on an EdgeDevice as the bridge stores it (never on the apiserver's copy): a
/// digest of the status part the bridge owns, kept in place of that part (see
/// [`stored_device`]).
pub const OWNED_STATUS_DIGEST: &str = "fleetlet.dev/owned-status-digest";

/// A digest of a status: equal statuses give equal digests (their JSON is the same: maps
/// are ordered), so comparing digests decides a write as comparing statuses did.
fn digest<T: serde::Serialize>(status: &T) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    serde_json::to_vec(status).unwrap_or_default().hash(&mut h);
    h.finish()
}

/// A digest of a Node status (see [`StoredNode`]).
pub fn status_digest(status: &NodeStatus) -> u64 {
    digest(status)
}

/// The digest [`stored_device`] kept in place of a status.
fn kept_digest(meta: &ObjectMeta) -> Option<u64> {
    meta.annotations
        .as_ref()?
        .get(OWNED_STATUS_DIGEST)?
        .parse()
        .ok()
}

/// A digest of the bridge's part of an EdgeDevice status, without the heartbeat time (a
/// pass compares the rest with and without it, so [`stored_device`] keeps that apart).
pub fn device_status_digest(status: &EdgeDeviceStatus) -> u64 {
    let mut part = status.bridge_part();
    part.last_heartbeat_time = None;
    digest(&part)
}

/// The digest of the bridge's part of `dev`'s status: the one [`stored_device`] kept, or
/// its status's own when `dev` is whole.
fn stored_status_digest(dev: &EdgeDevice) -> u64 {
    kept_digest(&dev.metadata).unwrap_or_else(|| {
        dev.status.as_ref().map_or_else(
            || device_status_digest(&EdgeDeviceStatus::default()),
            device_status_digest,
        )
    })
}

/// Whether `dev`'s stored status already says what the bridge wants it to (`want`, the
/// bridge's part only): nothing to write.
pub fn device_status_is_current(dev: &EdgeDevice, want: &EdgeDeviceStatus) -> bool {
    let time = dev
        .status
        .as_ref()
        .and_then(|s| s.last_heartbeat_time.as_ref());
    time == want.last_heartbeat_time.as_ref()
        && stored_status_digest(dev) == device_status_digest(want)
}

/// What the bridge keeps of an EdgeDevice it watches: everything but the status, and of
/// the status what a pass reads: the recorded desired generation, the heartbeat time, and
/// its own conditions' types, statuses and transition times (a condition that keeps its
/// status keeps its time). For the rest of its part (messages, resource lines, device
/// info) only a digest, [`OWNED_STATUS_DIGEST`], decides whether a write is due.
pub fn stored_device(d: &mut EdgeDevice) {
    let Some(status) = d.status.take() else {
        return;
    };
    d.metadata.annotations.get_or_insert_default().insert(
        OWNED_STATUS_DIGEST.into(),
        device_status_digest(&status).to_string(),
    );
    let conditions = status
        .bridge_part()
        .conditions
        .into_iter()
        .map(|c| Condition {
            type_: c.type_,
            status: c.status,
            last_transition_time: c.last_transition_time,
            reason: String::new(),
            message: String::new(),
            observed_generation: None,
        })
        .collect();
    d.status = Some(EdgeDeviceStatus {
        conditions,
        desired_generation: status.desired_generation,
        last_heartbeat_time: status.last_heartbeat_time,
        ..Default::default()
    });
}

/// What the bridge keeps of a Node it watches, decoded from the whole Node: identity and
/// labels, the taints (compared with what it applies), the conditions (their transition
/// times carry over), the advertised kubelet port, and for the rest of its status only a
/// digest, which decides whether a write is due. The node info, capacity and addresses
/// were most of a stored Node, and a `Node` itself is 1.5 KB before any of them; no pass
/// reads them, only whether they changed.
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
#[serde(from = "Node")]
pub struct StoredNode {
    pub metadata: ObjectMeta,
    pub taints: Option<Vec<Taint>>,
    pub conditions: Vec<NodeCondition>,
    /// The port the Node advertises for its kubelet, if any.
    pub kubelet_port: Option<u16>,
    /// [`status_digest`] of the part of the status the bridge owns.
    pub owned_status_digest: Option<u64>,
}

impl From<Node> for StoredNode {
    fn from(n: Node) -> Self {
        let kubelet_port = crate::kubelet::ports::advertised_port(&n);
        let status = n.status.map(owned_part);
        let m = n.metadata;
        Self {
            metadata: ObjectMeta {
                name: m.name,
                uid: m.uid,
                resource_version: m.resource_version,
                deletion_timestamp: m.deletion_timestamp,
                labels: m.labels,
                ..Default::default()
            },
            taints: n.spec.and_then(|s| s.taints),
            owned_status_digest: status.as_ref().map(status_digest),
            conditions: status.and_then(|s| s.conditions).unwrap_or_default(),
            kubelet_port,
        }
    }
}

/// Watched and listed as Nodes; decoded as [`StoredNode`]s.
impl kube::Resource for StoredNode {
    type DynamicType = ();
    type Scope = kube::core::ClusterResourceScope;

    fn kind(_: &()) -> std::borrow::Cow<'_, str> {
        Node::kind(&())
    }
    fn group(_: &()) -> std::borrow::Cow<'_, str> {
        Node::group(&())
    }
    fn version(_: &()) -> std::borrow::Cow<'_, str> {
        Node::version(&())
    }
    fn plural(_: &()) -> std::borrow::Cow<'_, str> {
        Node::plural(&())
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The Node the bridge applies for a device (everything but its status): labels, the
/// taint, the providerID and a pointer back to the EdgeDevice.
pub fn node(name: &str, dev: &EdgeDevice, device_id: &str, hb: Option<&Heartbeat>) -> Node {
    let ns = dev.metadata.namespace.clone().unwrap_or_default();
    let dev_name = dev.metadata.name.clone().unwrap_or_default();
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(node_labels(dev, device_id, hb)),
            annotations: Some(BTreeMap::from([(
                "fleetlet.dev/edgedevice".to_string(),
                format!("{ns}/{dev_name}"),
            )])),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            taints: Some(node_taints()),
            provider_id: Some(format!("fleetlet://{ns}/{device_id}")),
            ..Default::default()
        }),
        status: None,
    }
}

/// Whether `have` already carries what [`node`] would apply (labels and taints; the rest
/// never changes for a device).
pub fn node_is_current(have: &StoredNode, want: &Node) -> bool {
    let labels = have.metadata.labels.as_ref();
    want.metadata
        .labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
        && have.taints.as_ref() == want.spec.as_ref().and_then(|s| s.taints.as_ref())
}

/// A Node's Lease, renewed at the heartbeat's own time and owned by the Node (deleting
/// the Node deletes it).
pub fn lease(name: &str, node_uid: &str, grace_ms: u64, hb: &Heartbeat) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(name.into()),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Node".into(),
                name: name.into(),
                uid: node_uid.into(),
                ..Default::default()
            }]),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(name.into()),
            lease_duration_seconds: Some(
                i32::try_from((grace_ms / 1000).max(1)).unwrap_or(i32::MAX),
            ),
            renew_time: Some(MicroTime(k8s_time(hb.timestamp).0)),
            ..Default::default()
        }),
    }
}

/// Whether `stored`, the Lease as a write of `written` left it, holds nothing but what the
/// bridge writes (no labels, annotations or finalizers; the same owners and spec): then
/// replacing it with the next [`lease`] at its version loses nothing anyone else set.
pub fn lease_is_plain(stored: &Lease, written: &Lease) -> bool {
    let m = &stored.metadata;
    m.labels.as_ref().is_none_or(BTreeMap::is_empty)
        && m.annotations.as_ref().is_none_or(BTreeMap::is_empty)
        && m.finalizers.as_ref().is_none_or(Vec::is_empty)
        && m.owner_references == written.metadata.owner_references
        && stored.spec == written.spec
}

/// Node capacity (and allocatable) from the heartbeat.
fn capacity(h: Option<&Heartbeat>) -> BTreeMap<String, Quantity> {
    let cap = facts(h).map(|f| f.capacity).unwrap_or_default();
    BTreeMap::from([
        ("cpu".into(), quantity(u64::from(cap.cpu_cores))),
        ("memory".into(), quantity(cap.memory_bytes)),
        ("ephemeral-storage".into(), quantity(cap.disk_bytes)),
        ("pods".into(), quantity(110)),
    ])
}

/// (type, status, reason) of Ready and the three pressure conditions.
fn node_condition_rows(h: Option<&Heartbeat>, live: Liveness) -> [(String, String, String); 4] {
    let cap = facts(h).map(|f| f.capacity).unwrap_or_default();
    let free = h.map(|h| h.free).unwrap_or_default();
    let pct = |free: u64, total: u64| free.saturating_mul(100).checked_div(total).unwrap_or(100);
    let pressure =
        |low: bool, type_: &str, reason_ok: &str, reason_low: &str| -> (String, String, String) {
            match live {
                Liveness::Alive if low => (type_.into(), "True".into(), reason_low.into()),
                Liveness::Alive => (type_.into(), "False".into(), reason_ok.into()),
                _ => (type_.into(), "Unknown".into(), "NodeStatusUnknown".into()),
            }
        };
    let ready = match live {
        Liveness::Alive => ("Ready".into(), "True".into(), "KubeletReady".into()),
        Liveness::Silent => ("Ready".into(), "Unknown".into(), "NodeStatusUnknown".into()),
        Liveness::NeverConnected => ("Ready".into(), "False".into(), "NeverConnected".into()),
    };
    [
        ready,
        pressure(
            cap.memory_bytes > 0 && pct(free.memory_bytes, cap.memory_bytes) < 5,
            "MemoryPressure",
            "KubeletHasSufficientMemory",
            "KubeletHasInsufficientMemory",
        ),
        pressure(
            cap.disk_bytes > 0 && pct(free.disk_bytes, cap.disk_bytes) < 10,
            "DiskPressure",
            "KubeletHasNoDiskPressure",
            "KubeletHasDiskPressure",
        ),
        pressure(
            cap.pids > 0 && pct(free.pids, cap.pids) < 5,
            "PIDPressure",
            "KubeletHasSufficientPID",
            "KubeletHasInsufficientPID",
        ),
    ]
}

/// One Node condition, keeping its times from `old` while it does not change (and the
/// heartbeat time until `report_every_ms` has passed).
fn node_condition(
    old: &[NodeCondition],
    (type_, status, reason): (String, String, String),
    hb_time: Option<&Time>,
    now: &Time,
    report_every_ms: u64,
) -> NodeCondition {
    let prev = old.iter().find(|c| c.type_ == type_);
    let same =
        prev.is_some_and(|p| p.status == status && p.reason.as_deref() == Some(reason.as_str()));
    let message = match (type_.as_str(), status.as_str()) {
        ("Ready", "True") => "fleetlet agent is posting heartbeats",
        ("Ready", "Unknown") | (_, "Unknown") => "Kubelet stopped posting node status.",
        ("Ready", _) => "the device's agent has never connected",
        _ => "",
    };
    let stale = prev
        .and_then(|p| p.last_heartbeat_time.as_ref())
        .zip(hb_time)
        .is_none_or(|(p, h)| {
            h.0.as_millisecond().saturating_sub(p.0.as_millisecond()) >= report_every_ms as i64
        });
    NodeCondition {
        last_heartbeat_time: if same && !stale {
            prev.and_then(|p| p.last_heartbeat_time.clone())
        } else {
            hb_time.cloned().or(Some(now.clone()))
        },
        last_transition_time: if same {
            prev.and_then(|p| p.last_transition_time.clone())
        } else {
            Some(now.clone())
        },
        message: (!message.is_empty()).then(|| message.to_string()),
        reason: Some(reason),
        status,
        type_,
    }
}

fn facts(h: Option<&Heartbeat>) -> Option<&DeviceFacts> {
    h.and_then(|h| h.facts.as_deref())
}

/// What the device runs, as a kubelet reports it.
fn node_info(h: Option<&Heartbeat>) -> NodeSystemInfo {
    let Some(h) = facts(h) else {
        return NodeSystemInfo {
            operating_system: "linux".into(),
            kubelet_version: "fleetlet-agent".into(),
            ..Default::default()
        };
    };
    NodeSystemInfo {
        architecture: h.system.architecture.clone(),
        operating_system: "linux".into(),
        os_image: h.system.os_image.clone(),
        kernel_version: h.system.kernel_version.clone(),
        kubelet_version: format!("fleetlet-agent/v{}", h.agent_version),
        // What the device says it runs: nothing when it runs no containers.
        container_runtime_version: h.container_runtime.clone().unwrap_or_default(),
        ..Default::default()
    }
}

pub fn node_status(
    old: &[NodeCondition],
    hb: Option<&Heartbeat>,
    live: Liveness,
    now: Timestamp,
    report_every_ms: u64,
) -> NodeStatusView {
    let now_k = k8s_time(now);
    let hb_time = hb.map(|h| k8s_time(h.timestamp));
    let conditions = node_condition_rows(hb, live)
        .into_iter()
        .map(|row| node_condition(old, row, hb_time.as_ref(), &now_k, report_every_ms))
        .collect();
    NodeStatusView {
        node_info: node_info(hb),
        addresses: facts(hb)
            .map(|h| {
                h.addresses
                    .iter()
                    .map(|a| NodeAddress {
                        type_: a.type_.clone(),
                        address: a.address.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        capacity: capacity(hb),
        conditions,
    }
}

#[cfg(test)]
mod tests {
    use fleetlet_crds::EdgeDeviceSpec;
    use fleetlet_protocol::{
        API_VERSION, Capacity, DeviceId, Free, ResourceId, ResourceStatus, SystemInfo,
    };

    use super::*;

    /// 2023-11-14T22:13:20Z, in milliseconds.
    const T0: u64 = 1_700_000_000_000;
    const REPORT_EVERY_MS: u64 = 300_000;

    #[test]
    fn a_lease_is_replaced_in_place_only_while_it_holds_what_the_bridge_wrote_alone() {
        let written = lease("pi", "uid-1", 90_000, &heartbeat(T0, 50, 50, 50));
        // As the apiserver hands it back: its own metadata added.
        let mut stored = written.clone();
        stored.metadata.resource_version = Some("42".into());
        stored.metadata.uid = Some("lease-uid".into());
        assert!(lease_is_plain(&stored, &written));

        let mut labelled = stored.clone();
        labelled.metadata.labels = Some(BTreeMap::from([("team".into(), "ops".into())]));
        assert!(!lease_is_plain(&labelled, &written));
        let mut annotated = stored.clone();
        annotated.metadata.annotations = Some(BTreeMap::from([("a".into(), "b".into())]));
        assert!(!lease_is_plain(&annotated, &written));
        let mut held = stored.clone();
        held.metadata.finalizers = Some(vec!["example.com/keep".into()]);
        assert!(!lease_is_plain(&held, &written));
        let mut taken = stored.clone();
        if let Some(spec) = taken.spec.as_mut() {
            spec.lease_transitions = Some(1);
        }
        assert!(!lease_is_plain(&taken, &written));
        let other_owner = lease("pi", "uid-2", 90_000, &heartbeat(T0, 50, 50, 50));
        assert!(!lease_is_plain(&other_owner, &written));
        // Empty label and annotation maps are no one's fields.
        let mut empty = stored;
        empty.metadata.labels = Some(BTreeMap::new());
        empty.metadata.annotations = Some(BTreeMap::new());
        assert!(lease_is_plain(&empty, &written));
    }

    /// A heartbeat at `at` from a device with 1 GB of memory, 1 TB of disk and 100000 PIDs,
    /// of which the given percentages are free.
    fn heartbeat(at: u64, mem_pct: u64, disk_pct: u64, pids_pct: u64) -> Heartbeat {
        let capacity = Capacity {
            cpu_cores: 4,
            memory_bytes: 1_000_000_000,
            disk_bytes: 1_000_000_000_000,
            pids: 100_000,
        };
        Heartbeat {
            api_version: API_VERSION.into(),
            device: DeviceId::new("pi").expect("valid"),
            sequence: 1,
            timestamp: Timestamp(at),
            interval_seconds: 10,
            free: Free {
                memory_bytes: capacity.memory_bytes / 100 * mem_pct,
                disk_bytes: capacity.disk_bytes / 100 * disk_pct,
                pids: capacity.pids / 100 * pids_pct,
            },
            facts: Some(Box::new(DeviceFacts {
                agent_version: "0.1.0".into(),
                system: SystemInfo {
                    operating_system: "linux".into(),
                    architecture: "arm64".into(),
                    ..Default::default()
                },
                capacity,
                addresses: vec![],
                sealing_key: None,
                limits: None,
                container_runtime: None,
            })),
        }
    }

    /// (type, status, reason) of each pressure condition, in order.
    fn pressures(v: &NodeStatusView) -> Vec<(String, String, String)> {
        ["MemoryPressure", "DiskPressure", "PIDPressure"]
            .iter()
            .map(|t| {
                let c = v
                    .conditions
                    .iter()
                    .find(|c| c.type_ == *t)
                    .unwrap_or_else(|| panic!("no {t} condition"));
                (
                    c.type_.clone(),
                    c.status.clone(),
                    c.reason.clone().unwrap_or_default(),
                )
            })
            .collect()
    }

    #[test]
    fn a_stored_edge_device_decides_status_writes_as_the_whole_one_did() {
        let hb = heartbeat(T0, 50, 50, 50);
        let reconciling = |message: &str| {
            let mut st = AgentStatus::new(DeviceId::new("pi").expect("valid"));
            st.observed_generation = 2;
            st.resources.insert(
                ResourceId::new("model").expect("valid"),
                ResourceStatus::Reconciling {
                    since: Timestamp(1),
                    message: Some(message.into()),
                },
            );
            st
        };
        let st = reconciling("downloading: 10%");
        let mut full = EdgeDevice::new("pi", EdgeDeviceSpec::default());
        full.metadata.generation = Some(4);
        // As the apiserver holds it: the bridge's last write and the controller's part.
        let mut status = device_status(
            &full,
            Some(&hb),
            Some(&st),
            Liveness::Alive,
            Timestamp(T0),
            REPORT_EVERY_MS,
        );
        status.desired_generation = Some(2);
        status.conditions.push(Condition {
            type_: fleetlet_crds::LIMIT_EXCEEDED.into(),
            status: "True".into(),
            reason: "Memory".into(),
            message: "too big".into(),
            observed_generation: None,
            last_transition_time: k8s_time(Timestamp(T0)),
        });
        full.status = Some(status);
        let mut stored = full.clone();
        stored_device(&mut stored);

        // The next pass, on inputs that change nothing, a message, liveness, a heartbeat
        // within and past the report interval: the same status, the same decision.
        let soon = heartbeat(T0 + 10_000, 50, 50, 50);
        let late = heartbeat(T0 + 301_000, 50, 50, 50);
        let moved = reconciling("downloading: 20%");
        let cases = [
            (&hb, &st, Liveness::Alive, T0, "nothing changed"),
            (&soon, &st, Liveness::Alive, T0 + 10_000, "a heartbeat"),
            (
                &late,
                &st,
                Liveness::Alive,
                T0 + 301_000,
                "the report interval",
            ),
            (&hb, &moved, Liveness::Alive, T0 + 1, "a resource message"),
            (&hb, &st, Liveness::Silent, T0 + 90_000, "silence"),
        ];
        let mut writes = 0;
        for (hb, st, live, now, what) in cases {
            let step = |dev: &EdgeDevice| {
                let want = device_status(
                    dev,
                    Some(hb),
                    Some(st),
                    live,
                    Timestamp(now),
                    REPORT_EVERY_MS,
                );
                let current = device_status_is_current(dev, &want);
                (want, current)
            };
            let (from_whole, from_stored) = (step(&full), step(&stored));
            assert_eq!(from_whole, from_stored, "{what}");
            writes += usize::from(!from_whole.1);
        }
        assert_eq!(
            writes, 3,
            "a heartbeat within the interval writes nothing either"
        );

        // What a pass reads survives; the rest of the bridge's part is a digest.
        let kept = stored.status.as_ref().expect("status");
        assert_eq!(kept.desired_generation, Some(2));
        assert_eq!(kept.last_heartbeat_time, Some(k8s_time(Timestamp(T0))));
        assert!(kept.resources.is_empty() && kept.device.is_none());
        assert_eq!(
            kept.conditions
                .iter()
                .map(|c| (c.type_.as_str(), c.message.as_str()))
                .collect::<Vec<_>>(),
            [("Ready", ""), ("Converged", ""), ("Degraded", "")]
        );
        assert!(kept.applied_generation.is_none() && kept.observed_generation.is_none());
    }

    #[test]
    fn a_stored_node_decides_status_writes_as_the_whole_node_did() {
        let hb = heartbeat(T0, 50, 50, 50);
        let endpoint = KubeletEndpoint {
            address: "127.0.0.1".into(),
            port: 10300,
            websockets: true,
        };
        let want = |hb: &Heartbeat| {
            node_status(
                &[],
                Some(hb),
                Liveness::Alive,
                Timestamp(T0),
                REPORT_EVERY_MS,
            )
            .into_status(Some(&endpoint), "pi")
        };
        let dev = EdgeDevice::new("pi", EdgeDeviceSpec::default());
        let applied = node("pi", &dev, "pi", Some(&hb));
        // The apiserver's copy: what the bridge applied and wrote, plus what others add.
        let mut full = applied.clone();
        full.metadata.uid = Some("u-1".into());
        full.metadata
            .annotations
            .get_or_insert_default()
            .insert("node.alpha.kubernetes.io/ttl".into(), "0".into());
        let mut status = want(&hb);
        status.volumes_in_use = Some(vec!["kubernetes.io/csi/x".into()]);
        full.status = Some(status);

        let stored: StoredNode =
            serde_json::from_value(serde_json::to_value(&full).expect("encodes")).expect("decodes");

        assert_eq!(
            stored.owned_status_digest,
            Some(status_digest(&want(&hb))),
            "the same wanted status writes nothing"
        );
        let mut lower = hb.clone();
        lower.free.memory_bytes = 1;
        assert_ne!(
            stored.owned_status_digest,
            Some(status_digest(&want(&lower))),
            "a changed condition is written"
        );
        let mut bigger = want(&hb);
        bigger
            .capacity
            .get_or_insert_default()
            .insert("pods".into(), Quantity("111".into()));
        assert_ne!(
            stored.owned_status_digest,
            Some(status_digest(&bigger)),
            "a changed capacity is written"
        );
        // What passes still read is there as it was.
        assert!(node_is_current(&stored, &applied));
        let mut relabelled = applied.clone();
        relabelled
            .metadata
            .labels
            .get_or_insert_default()
            .insert(format!("{DEVICE_LABEL_PREFIX}room"), "attic".into());
        assert!(
            !node_is_current(&stored, &relabelled),
            "a new label is applied"
        );
        assert_eq!(stored.metadata.uid.as_deref(), Some("u-1"));
        assert_eq!(stored.kubelet_port, Some(10300));
        assert_eq!(
            fleetlet_crds::naming::device_of(&stored.metadata).map(|d| d.to_string()),
            Some("pi".to_string())
        );
        assert_eq!(Some(stored.conditions.clone()), want(&hb).conditions);
        // And the rest is gone: a stored Node is a fraction of a Node.
        assert_eq!(stored.metadata.annotations, None);
        assert!(
            std::mem::size_of::<StoredNode>() * 2 < std::mem::size_of::<Node>(),
            "{} bytes against {}",
            std::mem::size_of::<StoredNode>(),
            std::mem::size_of::<Node>()
        );
        // Watched and listed at the Nodes' own address.
        assert_eq!(
            kube::core::ApiResource::erase::<StoredNode>(&()),
            kube::core::ApiResource::erase::<Node>(&())
        );
    }

    fn rows(r: [(&str, &str, &str); 3]) -> Vec<(String, String, String)> {
        r.iter()
            .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
            .collect()
    }

    #[test]
    fn low_free_memory_disk_and_pids_show_as_node_pressure() {
        let hb = heartbeat(T0, 1, 5, 1);
        let v = node_status(
            &[],
            Some(&hb),
            Liveness::Alive,
            Timestamp(T0),
            REPORT_EVERY_MS,
        );
        assert_eq!(
            pressures(&v),
            rows([
                ("MemoryPressure", "True", "KubeletHasInsufficientMemory"),
                ("DiskPressure", "True", "KubeletHasDiskPressure"),
                ("PIDPressure", "True", "KubeletHasInsufficientPID"),
            ])
        );

        // Exactly at the thresholds (5% memory, 10% disk, 5% PIDs) there is no pressure.
        let hb = heartbeat(T0, 5, 10, 5);
        let v = node_status(
            &[],
            Some(&hb),
            Liveness::Alive,
            Timestamp(T0),
            REPORT_EVERY_MS,
        );
        assert_eq!(
            pressures(&v),
            rows([
                ("MemoryPressure", "False", "KubeletHasSufficientMemory"),
                ("DiskPressure", "False", "KubeletHasNoDiskPressure"),
                ("PIDPressure", "False", "KubeletHasSufficientPID"),
            ])
        );

        // A silent device's pressure is not known, whatever its last heartbeat said.
        let hb = heartbeat(T0, 1, 5, 1);
        let v = node_status(
            &[],
            Some(&hb),
            Liveness::Silent,
            Timestamp(T0),
            REPORT_EVERY_MS,
        );
        assert_eq!(
            pressures(&v),
            rows([
                ("MemoryPressure", "Unknown", "NodeStatusUnknown"),
                ("DiskPressure", "Unknown", "NodeStatusUnknown"),
                ("PIDPressure", "Unknown", "NodeStatusUnknown"),
            ])
        );
    }

    #[test]
    fn heartbeat_times_are_written_at_most_every_report_interval() {
        let first = heartbeat(T0, 50, 50, 50);
        let mut dev = EdgeDevice::new("pi", EdgeDeviceSpec::default());
        let s0 = device_status(
            &dev,
            Some(&first),
            None,
            Liveness::Alive,
            Timestamp(T0),
            REPORT_EVERY_MS,
        );
        assert_eq!(s0.last_heartbeat_time, Some(k8s_time(Timestamp(T0))));
        dev.status = Some(s0);
        let n0 = node_status(
            &[],
            Some(&first),
            Liveness::Alive,
            Timestamp(T0),
            REPORT_EVERY_MS,
        );
        let node_times = |v: &NodeStatusView| {
            v.conditions
                .iter()
                .map(|c| (c.type_.clone(), c.last_heartbeat_time.clone()))
                .collect::<Vec<_>>()
        };
        let all_at = |t: u64| {
            ["Ready", "MemoryPressure", "DiskPressure", "PIDPressure"]
                .iter()
                .map(|c| (c.to_string(), Some(k8s_time(Timestamp(t)))))
                .collect::<Vec<_>>()
        };
        assert_eq!(node_times(&n0), all_at(T0));

        // Ten seconds later, nothing else changed: the times stay.
        let soon = T0 + 10_000;
        let hb = heartbeat(soon, 50, 50, 50);
        let s = device_status(
            &dev,
            Some(&hb),
            None,
            Liveness::Alive,
            Timestamp(soon),
            REPORT_EVERY_MS,
        );
        assert_eq!(s.last_heartbeat_time, Some(k8s_time(Timestamp(T0))));
        assert_eq!(&s, dev.status.as_ref().unwrap(), "nothing to write");
        let n = node_status(
            &n0.conditions,
            Some(&hb),
            Liveness::Alive,
            Timestamp(soon),
            REPORT_EVERY_MS,
        );
        assert_eq!(node_times(&n), all_at(T0));

        // Past the report interval, they move to the new heartbeat's time.
        let later = T0 + 301_000;
        let hb = heartbeat(later, 50, 50, 50);
        let s = device_status(
            &dev,
            Some(&hb),
            None,
            Liveness::Alive,
            Timestamp(later),
            REPORT_EVERY_MS,
        );
        assert_eq!(s.last_heartbeat_time, Some(k8s_time(Timestamp(later))));
        let ready = s.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(
            ready.last_transition_time,
            k8s_time(Timestamp(T0)),
            "the Ready condition did not change"
        );
        let n = node_status(
            &n0.conditions,
            Some(&hb),
            Liveness::Alive,
            Timestamp(later),
            REPORT_EVERY_MS,
        );
        assert_eq!(node_times(&n), all_at(later));
    }

    #[test]
    fn by_default_heartbeat_times_move_only_with_another_change() {
        let never = crate::mirror::Timing::report_every(0);
        let first = heartbeat(T0, 50, 50, 50);
        let mut dev = EdgeDevice::new("pi", EdgeDeviceSpec::default());
        let s0 = device_status(
            &dev,
            Some(&first),
            None,
            Liveness::Alive,
            Timestamp(T0),
            never,
        );
        dev.status = Some(s0);
        let n0 = node_status(&[], Some(&first), Liveness::Alive, Timestamp(T0), never);

        // A day of heartbeats later, nothing else changed: nothing to write.
        let day = T0 + 86_400_000;
        let hb = heartbeat(day, 50, 50, 50);
        let s = device_status(
            &dev,
            Some(&hb),
            None,
            Liveness::Alive,
            Timestamp(day),
            never,
        );
        assert_eq!(&s, dev.status.as_ref().unwrap(), "nothing to write");
        let n = node_status(
            &n0.conditions,
            Some(&hb),
            Liveness::Alive,
            Timestamp(day),
            never,
        );
        assert_eq!(n.conditions, n0.conditions, "nothing to write");

        // It goes quiet: the status changes and carries its final heartbeat's time.
        let quiet = day + 100_000;
        let s = device_status(
            &dev,
            Some(&hb),
            None,
            Liveness::Silent,
            Timestamp(quiet),
            never,
        );
        assert_eq!(s.last_heartbeat_time, Some(k8s_time(Timestamp(day))));
        let ready = s.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.status, "Unknown");
        let n = node_status(
            &n0.conditions,
            Some(&hb),
            Liveness::Silent,
            Timestamp(quiet),
            never,
        );
        let ready = n.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.last_heartbeat_time, Some(k8s_time(Timestamp(day))));
        // A period too long to count in milliseconds is no period at all.
        assert_eq!(crate::mirror::Timing::report_every(u64::MAX), never);
        assert_eq!(crate::mirror::Timing::report_every(300), 300_000);
    }

    #[test]
    fn a_download_in_progress_shows_its_progress_on_the_edge_device() {
        let dev = EdgeDevice::new("pi", EdgeDeviceSpec::default());
        let mut st = AgentStatus::new(DeviceId::new("pi").expect("valid"));
        st.resources.insert(
            ResourceId::new("model").expect("valid"),
            ResourceStatus::Reconciling {
                since: Timestamp(1),
                message: Some("downloading: 12.0 MiB of 50.0 MiB (24%), 3.9 MiB/s".into()),
            },
        );
        let s = device_status(&dev, None, Some(&st), Liveness::Alive, Timestamp(2), 1000);
        let r = &s.resources[0];
        assert_eq!((r.id.as_str(), r.state.as_str()), ("model", "Reconciling"));
        assert_eq!(
            r.message.as_deref(),
            Some("downloading: 12.0 MiB of 50.0 MiB (24%), 3.9 MiB/s")
        );
    }

    #[test]
    fn an_applied_generation_the_controller_did_not_record_counts_as_desired() {
        let converged = |applied: u64, desired: Option<u64>, ready: bool| {
            let mut dev = EdgeDevice::new("pi", EdgeDeviceSpec::default());
            dev.status = Some(EdgeDeviceStatus {
                desired_generation: desired,
                ..Default::default()
            });
            let mut st = AgentStatus::new(DeviceId::new("pi").expect("valid"));
            st.observed_generation = applied;
            st.manifest_generation = applied;
            if !ready {
                st.resources.insert(
                    ResourceId::new("motd").expect("valid"),
                    ResourceStatus::Reconciling {
                        since: Timestamp(1),
                        message: None,
                    },
                );
            }
            let s = device_status(&dev, None, Some(&st), Liveness::Alive, Timestamp(2), 1000);
            let c = s
                .conditions
                .iter()
                .find(|c| c.type_ == "Converged")
                .expect("a Converged condition");
            (c.status.clone(), c.reason.clone())
        };
        let row = |status: &str, reason: &str| (status.to_string(), reason.to_string());
        // A device that applies a generation before the controller records it.
        assert_eq!(converged(3, None, true), row("True", "AllResourcesReady"));
        assert_eq!(
            converged(3, Some(2), true),
            row("True", "AllResourcesReady")
        );
        assert_eq!(converged(3, None, false), row("False", "ResourcesNotReady"));
        // A recorded generation the device has not applied.
        assert_eq!(converged(2, Some(3), true), row("False", "Applying"));
        // Nothing written for the device yet.
        assert_eq!(converged(0, None, true), row("Unknown", "NoDesiredState"));
    }
}
