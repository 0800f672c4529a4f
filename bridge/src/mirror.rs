//! The mirror loop: device heartbeats and status → EdgeDevice status, Node, Lease.
//! Writes only what differs; a steady fleet costs Lease renewals and nothing else.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex},
};

use fleetlet_crds::{
    EdgeDevice,
    k8s_openapi::{
        api::{
            coordination::v1::Lease,
            core::v1::{Node, NodeStatus},
        },
        apimachinery::pkg::apis::meta::v1::MicroTime,
    },
    kube::{
        Api, Client, ResourceExt,
        api::{DeleteParams, Patch, PatchParams},
        runtime::reflector::{ObjectRef, Store as Reflector},
    },
};
use fleetlet_plumbing::KvCache;
use fleetlet_protocol::{AgentStatus, DeviceId, Heartbeat, Timestamp};
use futures::StreamExt;
use serde_json::json;
use tracing::{debug, info, instrument, warn};

use crate::{
    Metrics,
    view::{self, DEVICE_LABEL, FIELD_MANAGER, Liveness},
};

/// Namespace of node Leases, as for kubelets.
pub const LEASE_NAMESPACE: &str = "kube-node-lease";

pub struct Mirror {
    pub client: Client,
    pub devices: Reflector<EdgeDevice>,
    pub nodes: Reflector<Node>,
    pub actual: Arc<KvCache<AgentStatus>>,
    pub heartbeats: Arc<KvCache<Heartbeat>>,
    pub metrics: Arc<Metrics>,
    /// No heartbeat for this long: Ready=Unknown.
    pub grace_ms: u64,
    /// Refresh unchanged status (heartbeat times) this often.
    pub report_every_ms: u64,
    /// Renew a Lease at most this often (from heartbeats, never from a timer).
    pub lease_renew_ms: u64,
    /// Heartbeat timestamp last written to each device's Lease.
    renewed: Mutex<HashMap<DeviceId, u64>>,
    /// Devices whose id is taken by a Node fleetlet does not manage.
    collisions: Mutex<HashSet<DeviceId>>,
    /// The kubelet API every virtual node points at (advertised address, port), if served.
    pub kubelet_endpoint: Option<(String, u16)>,
}

/// Writes made by one pass.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Writes {
    pub device_status: u32,
    pub nodes: u32,
    pub node_status: u32,
    pub leases: u32,
    pub deletes: u32,
}

const CONCURRENCY: usize = 16;

impl Mirror {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        devices: Reflector<EdgeDevice>,
        nodes: Reflector<Node>,
        actual: Arc<KvCache<AgentStatus>>,
        heartbeats: Arc<KvCache<Heartbeat>>,
        metrics: Arc<Metrics>,
        grace_ms: u64,
        report_every_ms: u64,
        lease_renew_ms: u64,
    ) -> Self {
        Self {
            client,
            devices,
            nodes,
            actual,
            heartbeats,
            metrics,
            grace_ms,
            report_every_ms,
            lease_renew_ms,
            renewed: Mutex::new(HashMap::new()),
            collisions: Mutex::new(HashSet::new()),
            kubelet_endpoint: None,
        }
    }

    pub fn synced(&self) -> bool {
        self.actual.is_ready() && self.heartbeats.is_ready()
    }

    /// Devices by id (the older EdgeDevice wins an id claimed in two namespaces).
    /// With `only`, just those devices: every object of the same name is kept, so the
    /// namespace tie-break is the same as in a full pass, without sorting the whole fleet.
    /// The device's own grace period (spec.heartbeatGraceSeconds) or the bridge's.
    pub(crate) fn grace_ms_of(&self, dev: &EdgeDevice) -> u64 {
        dev.spec
            .heartbeat_grace_seconds
            .map_or(self.grace_ms, |s| u64::from(s) * 1000)
    }

    pub(crate) fn device_objects(
        &self,
        only: Option<&HashSet<DeviceId>>,
    ) -> BTreeMap<DeviceId, Arc<EdgeDevice>> {
        let mut all = self.devices.state();
        if let Some(only) = only {
            all.retain(|d| only.contains(d.name_any().as_str()));
        }
        all.sort_by_key(|d| {
            (
                d.metadata.creation_timestamp.as_ref().map(|t| t.0),
                d.namespace(),
                d.name_any(),
            )
        });
        let mut out = BTreeMap::new();
        for d in all {
            if let Ok(id) = DeviceId::new(d.name_any()) {
                out.entry(id).or_insert(d);
            }
        }
        out
    }

    /// The Node name for a device: its id, or `fleetlet-<id>` when a Node of that name
    /// exists that the bridge does not manage.
    fn node_name(&self, id: &DeviceId) -> String {
        let taken = self.collisions.lock().is_ok_and(|c| c.contains(id));
        if taken {
            format!("fleetlet-{id}")
        } else {
            id.to_string()
        }
    }

    /// Before creating a Node named after the device: is that name someone else's?
    async fn check_collision(&self, id: &DeviceId) -> bool {
        let nodes: Api<Node> = Api::all(self.client.clone());
        match nodes.get_opt(id.as_str()).await {
            Ok(Some(n))
                if n.labels().get(DEVICE_LABEL).map(String::as_str) != Some(id.as_str()) =>
            {
                warn!(device = %id, "a node with the device's name exists and is not fleetlet's; using fleetlet-{id}");
                if let Ok(mut c) = self.collisions.lock() {
                    c.insert(id.clone());
                }
                true
            }
            _ => false,
        }
    }

    /// Mirrors `only` (or every device when None), and removes Nodes of deleted devices.
    #[instrument(skip_all, fields(devices = only.as_ref().map(HashSet::len)))]
    pub async fn pass(&self, only: Option<HashSet<DeviceId>>) -> Writes {
        let now = Timestamp::now();
        let devices = self.device_objects(only.as_ref());
        let work: Vec<(DeviceId, Arc<EdgeDevice>)> = devices
            .iter()
            .map(|(id, d)| (id.clone(), d.clone()))
            .collect();
        let results: Vec<Writes> = futures::stream::iter(work)
            .map(|(id, dev)| {
                let node = self.nodes.get(&ObjectRef::new(&self.node_name(&id)));
                async move { self.mirror_device(&id, &dev, node.as_deref(), now).await }
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        let mut total = Writes::default();
        for w in results {
            total.device_status += w.device_status;
            total.nodes += w.nodes;
            total.node_status += w.node_status;
            total.leases += w.leases;
        }
        if only.is_none() {
            total.deletes += self.remove_orphans(&devices).await;
        }
        self.metrics.record(&total);
        if total != Writes::default() {
            debug!(?total, "pass wrote changes");
        }
        total
    }

    async fn mirror_device(
        &self,
        id: &DeviceId,
        dev: &EdgeDevice,
        node: Option<&Node>,
        now: Timestamp,
    ) -> Writes {
        let mut w = Writes::default();
        let hb = self.heartbeats.get(id).map(|v| v.value);
        let st = self.actual.get(id).map(|v| v.value);
        let grace_ms = self.grace_ms_of(dev);
        let live = view::liveness(hb.as_ref(), now, grace_ms);
        let ns = dev.namespace().unwrap_or_default();

        // EdgeDevice status (the bridge's fields only).
        let status = view::device_status(
            dev,
            hb.as_ref(),
            st.as_ref(),
            live,
            now,
            self.report_every_ms,
        );
        let current = dev.status.clone().unwrap_or_default().bridge_part();
        if current != status {
            let api: Api<EdgeDevice> = Api::namespaced(self.client.clone(), &ns);
            let mut body = serde_json::to_value(&status).unwrap_or_default();
            if let Some(o) = body.as_object_mut() {
                o.remove("desiredGeneration");
            }
            let patch = json!({ "apiVersion": "fleetlet.dev/v1alpha1", "kind": "EdgeDevice", "status": body });
            match api
                .patch_status(
                    &dev.name_any(),
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&patch),
                )
                .await
            {
                Ok(_) => w.device_status += 1,
                Err(e) => warn!(device = %id, error = %e, "patching EdgeDevice status failed"),
            }
        }

        // The Node: identity and taint, then status.
        let node = match node {
            None if self.node_name(id) == id.as_str() && self.check_collision(id).await => None,
            n => n,
        };
        let name = self.node_name(id);
        let nodes: Api<Node> = Api::all(self.client.clone());
        let labels = view::node_labels(dev, id.as_str(), hb.as_ref());
        let taints = view::node_taints();
        let has_spec = node.is_some_and(|n| {
            labels.iter().all(|(k, v)| n.labels().get(k) == Some(v))
                && n.spec.as_ref().and_then(|s| s.taints.as_ref()) == Some(&taints)
        });
        let mut node_uid = node.and_then(|n| n.uid());
        if !has_spec {
            let body = json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {
                    "name": name,
                    "labels": labels,
                    "annotations": { "fleetlet.dev/edgedevice": format!("{ns}/{}", dev.name_any()) },
                },
                "spec": { "taints": taints, "providerID": format!("fleetlet://{ns}/{id}") },
            });
            match nodes
                .patch(
                    &name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&body),
                )
                .await
            {
                Ok(n) => {
                    w.nodes += 1;
                    node_uid = n.uid();
                    info!(device = %id, node = %name, "node applied");
                }
                Err(e) => {
                    warn!(device = %id, error = %e, "applying node failed");
                    return w;
                }
            }
        }
        let old_conditions = node
            .and_then(|n| n.status.as_ref())
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default();
        let ns_view = view::node_status(
            &old_conditions,
            hb.as_ref(),
            live,
            now,
            self.report_every_ms,
        );
        let mut want = NodeStatus {
            node_info: Some(ns_view.node_info),
            capacity: Some(ns_view.capacity.clone()),
            allocatable: Some(ns_view.capacity),
            addresses: Some(ns_view.addresses),
            conditions: Some(ns_view.conditions),
            ..Default::default()
        };
        if let Some((address, port)) = &self.kubelet_endpoint {
            // The apiserver reaches "the kubelet" (the bridge) at InternalIP; the device's
            // own addresses stay in its EdgeDevice status and its pods' hostIP.
            want.addresses = Some(vec![
                k8s_openapi::api::core::v1::NodeAddress {
                    type_: "InternalIP".into(),
                    address: address.clone(),
                },
                k8s_openapi::api::core::v1::NodeAddress {
                    type_: "Hostname".into(),
                    address: id.to_string(),
                },
            ]);
            want.daemon_endpoints = Some(k8s_openapi::api::core::v1::NodeDaemonEndpoints {
                kubelet_endpoint: Some(k8s_openapi::api::core::v1::DaemonEndpoint {
                    port: i32::from(*port),
                }),
            });
            want.declared_features = Some(vec!["ExtendWebSocketsToKubelet".into()]);
        }
        let have = node.and_then(|n| n.status.clone()).map(|s| NodeStatus {
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
        });
        if have.as_ref() != Some(&want) {
            debug!(device = %id, have = ?have, want = ?want, "node status differs");
            let patch = json!({ "apiVersion": "v1", "kind": "Node", "status": want });
            match nodes
                .patch_status(
                    &name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&patch),
                )
                .await
            {
                Ok(_) => w.node_status += 1,
                Err(e) => warn!(device = %id, error = %e, "patching node status failed"),
            }
        }

        // The Lease, renewed from the heartbeat itself: a silent device's Lease expires.
        if let (Some(h), Liveness::Alive, Some(uid)) = (&hb, live, node_uid) {
            let beat = h.timestamp.as_millis();
            let last = self
                .renewed
                .lock()
                .map(|r| r.get(id).copied())
                .unwrap_or(None);
            // Renewals follow heartbeats: one up to half a heartbeat interval early still
            // counts, so a 30 s heartbeat renews a 30 s Lease on every beat, not every other.
            let early = u64::from(h.interval_seconds) * 500;
            if last.is_none_or(|l| beat.saturating_sub(l) + early >= self.lease_renew_ms) {
                let leases: Api<Lease> = Api::namespaced(self.client.clone(), LEASE_NAMESPACE);
                let renew = MicroTime(view::k8s_time(h.timestamp).0);
                let body = json!({
                    "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {
                        "name": name,
                        "ownerReferences": [{ "apiVersion": "v1", "kind": "Node", "name": name, "uid": uid }],
                    },
                    "spec": {
                        "holderIdentity": name,
                        "leaseDurationSeconds": (grace_ms / 1000).max(1),
                        "renewTime": renew,
                    },
                });
                match leases
                    .patch(
                        &name,
                        &PatchParams::apply(FIELD_MANAGER).force(),
                        &Patch::Apply(&body),
                    )
                    .await
                {
                    Ok(_) => {
                        w.leases += 1;
                        if let Ok(mut r) = self.renewed.lock() {
                            r.insert(id.clone(), beat);
                        }
                        self.metrics
                            .lease_latency(Timestamp::now().as_millis().saturating_sub(beat));
                    }
                    Err(e) => warn!(device = %id, error = %e, "renewing lease failed"),
                }
            }
        }
        w
    }

    /// Nodes (and their Leases) of devices that no longer exist. Workloads are the agent's
    /// business; only the Kubernetes view goes away.
    async fn remove_orphans(&self, devices: &BTreeMap<DeviceId, Arc<EdgeDevice>>) -> u32 {
        let nodes: HashMap<String, Arc<Node>> = self
            .nodes
            .state()
            .into_iter()
            .map(|n| (n.name_any(), n))
            .collect();
        let mut deleted = 0;
        let ids: HashSet<&str> = devices.keys().map(DeviceId::as_str).collect();
        for (name, n) in &nodes {
            let Some(dev) = n.labels().get(DEVICE_LABEL) else {
                continue;
            };
            if ids.contains(dev.as_str()) {
                continue;
            }
            let node_api: Api<Node> = Api::all(self.client.clone());
            let lease_api: Api<Lease> = Api::namespaced(self.client.clone(), LEASE_NAMESPACE);
            let _ = lease_api.delete(name, &DeleteParams::default()).await;
            match node_api.delete(name, &DeleteParams::default()).await {
                Ok(_) => {
                    info!(node = %name, device = %dev, "removed the node of a deleted device");
                    deleted += 1;
                    if let (Ok(id), Ok(mut r)) = (DeviceId::new(dev.as_str()), self.renewed.lock())
                    {
                        r.remove(&id);
                    }
                }
                Err(e) => warn!(node = %name, error = %e, "removing node failed"),
            }
        }
        deleted
    }
}
