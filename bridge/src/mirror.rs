//! The mirror loop: device heartbeats and status → EdgeDevice status, Node, Lease.
//! Writes only what differs; a steady fleet costs Lease renewals and nothing else.
//!
//! Passes decide which Lease each device has (its Node's name and uid, its grace period);
//! [`Mirror::renew_leases`] renews them on a clock of its own, like a kubelet's lease
//! controller beside its status loop, so a long pass (a rollout's status writes across a
//! large fleet) does not hold renewals back past the grace period.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex},
};

use fleetlet_crds::{
    EdgeDevice, EdgeDeviceStatus, NodeProjection,
    k8s_openapi::api::{
        coordination::v1::Lease,
        core::v1::{Node, NodeStatus},
    },
    kube::{
        Api, Client, ResourceExt,
        api::{DeleteParams, Patch, PatchParams, PostParams},
        runtime::reflector::{ObjectRef, Store as Reflector},
    },
};
use fleetlet_plumbing::{KvCache, shards::Ownership};
use fleetlet_protocol::{AgentStatus, DeviceId, FactsReport, Heartbeat, Timestamp};
use futures::StreamExt;
use serde_json::json;
use tracing::{debug, info, instrument, warn};

use crate::{
    Metrics,
    kubelet::ports::NodePorts,
    view::{self, FIELD_MANAGER, Liveness},
};

/// Namespace of node Leases, as for kubelets.
pub const LEASE_NAMESPACE: &str = "kube-node-lease";

pub struct Mirror {
    pub ctx: Context,
    pub timing: Timing,
    /// The Lease of each device projected as a Node, as the last pass saw it.
    leases: Mutex<HashMap<DeviceId, HeldLease>>,
    /// Devices the next round of renewals looks at even without a new heartbeat: a Lease
    /// just recorded or changed, a renewal that failed.
    lease_pending: Mutex<HashSet<DeviceId>>,
    /// Held while Leases are written or deleted, so a renewal in flight cannot bring back
    /// a Lease a pass just removed.
    lease_writes: tokio::sync::Mutex<()>,
    /// Devices whose id is taken by a Node fleetlet does not manage.
    collisions: Mutex<HashSet<DeviceId>>,
    /// The kubelet API every virtual node points at (advertised address, port), if served.
    pub kubelet_endpoint: Option<view::KubeletEndpoint>,
    /// With `--kubelet-node-ports`: the port each Node advertises instead of the shared one.
    pub node_ports: Option<Mutex<NodePorts>>,
    /// Whether a device whose EdgeDevice does not say is projected as a Node.
    pub node_projection: NodeProjection,
}

/// Writes made by one pass.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Writes {
    pub device_status: u32,
    pub nodes: u32,
    pub node_status: u32,
    pub deletes: u32,
}

const CONCURRENCY: usize = 16;

/// Lease renewals in flight at once. A renewal is one small apply; at 10,000 devices and
/// 30 s Leases, about 333 are due a second.
const LEASE_CONCURRENCY: usize = 32;

/// A device's Lease: which Node holds it, for how long, and the heartbeat last written.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HeldLease {
    node: String,
    node_uid: String,
    grace_ms: u64,
    /// Timestamp (ms) of the heartbeat last written to the Lease.
    renewed: Option<u64>,
    /// The Lease's `resourceVersion` after the bridge's last write, when the Lease held
    /// nothing but what the bridge writes: the next renewal replaces it at that version (one
    /// plain update, as a kubelet renews) instead of a server-side apply.
    version: Option<Box<str>>,
}

/// Whether a heartbeat at `beat` (ms) renews a Lease last renewed from `renewed`: a newer
/// beat, at least `renew_ms` after the last one written, or up to half its interval early
/// (so a 30 s heartbeat renews a 30 s Lease on every beat, not every other).
fn lease_due(renewed: Option<u64>, beat: u64, interval_seconds: u32, renew_ms: u64) -> bool {
    let early = u64::from(interval_seconds) * 500;
    renewed.is_none_or(|last| beat > last && (beat - last).saturating_add(early) >= renew_ms)
}

/// What the mirror reads and writes through.
pub struct Context {
    pub client: Client,
    pub devices: Reflector<EdgeDevice>,
    pub nodes: Reflector<view::StoredNode>,
    pub actual: Arc<KvCache<AgentStatus>>,
    pub heartbeats: Arc<KvCache<Heartbeat>>,
    pub facts: Arc<KvCache<FactsReport>>,
    pub metrics: Arc<Metrics>,
}

/// The mirror's clocks, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// No heartbeat for this long: Ready=Unknown (a device may set its own).
    pub grace_ms: u64,
    /// Refresh unchanged status (heartbeat times) this often ([`Timing::NEVER`]: only with
    /// another change).
    pub report_every_ms: u64,
    /// Renew a Lease at most this often.
    pub lease_renew_ms: u64,
}

impl Timing {
    /// A refresh period that never comes (it still compares as a signed millisecond count).
    pub const NEVER: u64 = i64::MAX as u64;

    /// `report_every_ms` from `--status-report-seconds` (0: never on a timer).
    pub fn report_every(seconds: u64) -> u64 {
        match seconds {
            0 => Self::NEVER,
            s => s.saturating_mul(1000).min(Self::NEVER),
        }
    }
}

impl Mirror {
    pub fn new(ctx: Context, timing: Timing) -> Self {
        Self {
            ctx,
            timing,
            leases: Mutex::new(HashMap::new()),
            lease_pending: Mutex::new(HashSet::new()),
            lease_writes: tokio::sync::Mutex::new(()),
            collisions: Mutex::new(HashSet::new()),
            kubelet_endpoint: None,
            node_ports: None,
            node_projection: NodeProjection::Enabled,
        }
    }

    /// Whether `dev` appears as a Node: its own choice, else the bridge's.
    pub fn projected(&self, dev: &EdgeDevice) -> bool {
        dev.spec.node_projection.unwrap_or(self.node_projection) == NodeProjection::Enabled
    }

    pub fn synced(&self) -> bool {
        self.ctx.actual.is_ready() && self.ctx.heartbeats.is_ready() && self.ctx.facts.is_ready()
    }

    /// Devices by id (the older EdgeDevice wins an id claimed in two namespaces).
    /// With `only`, just those devices: every object of the same name is kept, so the
    /// namespace tie-break is the same as in a full pass, without sorting the whole fleet.
    /// The device's own grace period (spec.heartbeatGraceSeconds) or the bridge's.
    pub(crate) fn grace_ms_of(&self, dev: &EdgeDevice) -> u64 {
        dev.spec
            .heartbeat_grace_seconds
            .map_or(self.timing.grace_ms, |s| u64::from(s) * 1000)
    }

    /// The EdgeDevice of each device (of those in `only`, if given), by
    /// [`fleetlet_crds::naming::devices_by_id`]. It copies nothing of the devices it skips:
    /// passes run it for every burst of heartbeats.
    pub(crate) fn device_objects(
        &self,
        only: Option<&HashSet<DeviceId>>,
    ) -> BTreeMap<DeviceId, Arc<EdgeDevice>> {
        let wanted = |d: &Arc<EdgeDevice>| {
            only.is_none_or(|only| d.metadata.name.as_deref().is_some_and(|n| only.contains(n)))
        };
        fleetlet_crds::naming::devices_by_id(
            self.ctx.devices.state().into_iter().filter(wanted),
            |_| {},
        )
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
        let nodes: Api<Node> = Api::all(self.ctx.client.clone());
        match nodes.get_opt(id.as_str()).await {
            Ok(Some(n)) if fleetlet_crds::naming::node_device(&n).as_ref() != Some(id) => {
                warn!(device = %id, "a node with the device's name exists and is not fleetlet's; using fleetlet-{id}");
                if let Ok(mut c) = self.collisions.lock() {
                    c.insert(id.clone());
                }
                true
            }
            _ => false,
        }
    }

    /// Mirrors `only` (or every device when None) of the shards `own` holds, and removes
    /// their Nodes of deleted devices.
    #[instrument(skip_all, fields(devices = only.as_ref().map(HashSet::len)))]
    pub async fn pass(&self, only: Option<HashSet<DeviceId>>, own: &Ownership) -> Writes {
        let now = Timestamp::now();
        let devices = self.device_objects(only.as_ref());
        if only.is_none() {
            self.keep_node_ports(&devices);
        }
        let work: Vec<(DeviceId, Arc<EdgeDevice>)> = devices
            .iter()
            .filter(|(id, _)| own.holds(id.as_str()))
            .map(|(id, d)| (id.clone(), d.clone()))
            .collect();
        let results: Vec<Writes> = futures::stream::iter(work)
            .map(|(id, dev)| {
                let node = self.ctx.nodes.get(&ObjectRef::new(&self.node_name(&id)));
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
        }
        if only.is_none() {
            total.deletes += self.remove_orphans(&devices, own).await;
        }
        self.ctx.metrics.record(&total);
        if total != Writes::default() {
            debug!(?total, "pass wrote changes");
        }
        total
    }

    /// The device's last heartbeat, with its facts in it.
    pub fn heartbeat(&self, id: &DeviceId) -> Option<Heartbeat> {
        let report = self.ctx.facts.get(id).map(|v| v.value);
        view::with_facts(
            self.ctx
                .heartbeats
                .get(id)
                .map(|v| Arc::unwrap_or_clone(v.value)),
            report.as_deref(),
        )
    }

    /// One device: its EdgeDevice status, its Node, the Node's status and its Lease.
    async fn mirror_device(
        &self,
        id: &DeviceId,
        dev: &EdgeDevice,
        node: Option<&view::StoredNode>,
        now: Timestamp,
    ) -> Writes {
        let mut w = Writes::default();
        let hb = self.heartbeat(id);
        let st = self.ctx.actual.get(id).map(|v| v.value);
        let grace_ms = self.grace_ms_of(dev);
        let live = view::liveness(hb.as_ref(), now, grace_ms);
        let projected = self.projected(dev);
        let status = view::device_status(
            dev,
            hb.as_ref(),
            st.as_deref(),
            live,
            now,
            // Without a Node nothing refreshes the heartbeat time on its own: no write
            // while nothing changes (liveness is in the Ready condition).
            if projected {
                self.timing.report_every_ms
            } else {
                Timing::NEVER
            },
        );
        w.device_status = self.write_device_status(id, dev, status).await;
        if !projected {
            // Its Node, if it had one, goes in the next full pass; its Lease is not renewed.
            self.drop_lease(id);
            return w;
        }
        let node = match node {
            None if self.node_name(id) == id.as_str() && self.check_collision(id).await => None,
            n => n,
        };
        let name = self.node_name(id);
        let Some(node_uid) = self
            .apply_node(id, &name, dev, node, hb.as_ref(), &mut w)
            .await
        else {
            return w;
        };
        let old_conditions = node.map(|n| n.conditions.as_slice()).unwrap_or_default();
        let want = view::node_status(
            old_conditions,
            hb.as_ref(),
            live,
            now,
            self.timing.report_every_ms,
        )
        .into_status(self.endpoint_of(id, node).as_ref(), id.as_str());
        w.node_status = self.write_node_status(id, &name, node, want).await;
        // From here on the lease loop renews the Node's Lease.
        if let Some(node_uid) = node_uid {
            self.hold_lease(id, name, node_uid, grace_ms);
        }
        w
    }

    /// Records the Lease `id`'s Node holds. A Lease new or changed (another Node, uid or
    /// grace) is written on the next round from the device's latest heartbeat.
    fn hold_lease(&self, id: &DeviceId, node: String, node_uid: String, grace_ms: u64) {
        let Ok(mut held) = self.leases.lock() else {
            return;
        };
        let same = held
            .get(id)
            .is_some_and(|l| l.node == node && l.node_uid == node_uid && l.grace_ms == grace_ms);
        if same {
            return;
        }
        held.insert(
            id.clone(),
            HeldLease {
                node,
                node_uid,
                grace_ms,
                renewed: None,
                version: None,
            },
        );
        drop(held);
        self.look_again(id.clone());
    }

    /// Has the next round of renewals look at `id` whether or not it beats.
    fn look_again(&self, id: DeviceId) {
        if let Ok(mut pending) = self.lease_pending.lock() {
            pending.insert(id);
        }
    }

    fn drop_lease(&self, id: &DeviceId) {
        if let Ok(mut held) = self.leases.lock() {
            held.remove(id);
        }
    }

    /// Forgets the Leases of devices outside the shards `own` holds (given up: their next
    /// holder renews them).
    pub fn keep_leases(&self, own: &Ownership) {
        if own.is_whole() {
            return;
        }
        if let Ok(mut held) = self.leases.lock() {
            held.retain(|id, _| own.holds(id.as_str()));
        }
        if let Ok(mut pending) = self.lease_pending.lock() {
            pending.retain(|id| own.holds(id.as_str()));
        }
    }

    /// Forgets every Lease (on losing leadership: the next leader's passes decide again).
    pub fn forget_leases(&self) {
        if let Ok(mut held) = self.leases.lock() {
            held.clear();
        }
        if let Ok(mut pending) = self.lease_pending.lock() {
            pending.clear();
        }
    }

    /// Renews the Lease of each device in `beat` (those whose heartbeat changed since the
    /// last round) and of each the passes or a failed renewal asked to look at again, when
    /// the device is alive and its latest heartbeat is due: longest-unrenewed first,
    /// [`LEASE_CONCURRENCY`] at a time. A round costs what beat, not the size of the fleet.
    /// The heartbeat itself is the renewal time, so a silent device's Lease expires.
    /// Returns the renewals made.
    pub async fn renew_leases(&self, beat: HashSet<DeviceId>) -> u32 {
        let _writing = self.lease_writes.lock().await;
        let mut look = beat;
        if let Ok(mut pending) = self.lease_pending.lock() {
            look.extend(pending.drain());
        }
        let now = Timestamp::now();
        let mut due: Vec<(DeviceId, HeldLease, Arc<Heartbeat>)> = {
            let Ok(held) = self.leases.lock() else {
                return 0;
            };
            look.into_iter()
                .filter_map(|id| {
                    let lease = held.get(&id)?;
                    let h = self.ctx.heartbeats.get(&id)?.value;
                    let alive = view::liveness(Some(&h), now, lease.grace_ms) == Liveness::Alive;
                    let due = lease_due(
                        lease.renewed,
                        h.timestamp.as_millis(),
                        h.interval_seconds,
                        self.timing.lease_renew_ms,
                    );
                    (alive && due).then(|| (id, lease.clone(), h))
                })
                .collect()
        };
        due.sort_by_key(|(_, lease, _)| lease.renewed);
        futures::stream::iter(due)
            .map(|(id, lease, h)| async move { self.renew_lease(&id, &lease, &h).await })
            .buffer_unordered(LEASE_CONCURRENCY)
            .fold(0, |n, w| futures::future::ready(n + w))
            .await
    }

    /// Where `id`'s Node reaches its kubelet: its own port when node ports are handed out
    /// (and one is left), else the shared endpoint.
    fn endpoint_of(
        &self,
        id: &DeviceId,
        node: Option<&view::StoredNode>,
    ) -> Option<view::KubeletEndpoint> {
        let mut k = self.kubelet_endpoint.clone()?;
        if let Some(ports) = &self.node_ports
            && let Ok(mut p) = ports.lock()
        {
            match p.claim(id, node.and_then(|n| n.kubelet_port)) {
                Some(port) => k.port = port,
                None => debug!(device = %id, "no node port left; the shared port is advertised"),
            }
        }
        Some(k)
    }

    /// Before a full pass: the ports the Nodes already advertise stay theirs (so a new
    /// leader hands out the same ones), and ports of deleted devices are free again.
    fn keep_node_ports(&self, devices: &BTreeMap<DeviceId, Arc<EdgeDevice>>) {
        let Some(Ok(mut p)) = self.node_ports.as_ref().map(Mutex::lock) else {
            return;
        };
        p.retain(|d| devices.get(d).is_some_and(|dev| self.projected(dev)));
        for n in self.ctx.nodes.state() {
            if let (Some(d), Some(port)) = (
                fleetlet_crds::naming::device_of(&n.metadata),
                n.kubelet_port,
            ) && devices.get(&d).is_some_and(|dev| self.projected(dev))
            {
                p.claim(&d, Some(port));
            }
        }
    }

    /// Applies the bridge's part of the EdgeDevice status when it differs; 1 if written.
    async fn write_device_status(
        &self,
        id: &DeviceId,
        dev: &EdgeDevice,
        status: EdgeDeviceStatus,
    ) -> u32 {
        if view::device_status_is_current(dev, &status) {
            return 0;
        }
        let ns = dev.namespace().unwrap_or_default();
        let api: Api<EdgeDevice> = Api::namespaced(self.ctx.client.clone(), &ns);
        let mut body = serde_json::to_value(&status).unwrap_or_default();
        if let Some(o) = body.as_object_mut() {
            o.remove("desiredGeneration");
        }
        let patch =
            json!({ "apiVersion": "fleetlet.dev/v1alpha1", "kind": "EdgeDevice", "status": body });
        apply_status(&api, &dev.name_any(), &patch, id, "EdgeDevice").await
    }

    /// Applies the Node (identity, labels, taint) unless it is current. `None` when the
    /// apply failed (nothing more to do for the device this pass), else the Node's uid.
    async fn apply_node(
        &self,
        id: &DeviceId,
        name: &str,
        dev: &EdgeDevice,
        node: Option<&view::StoredNode>,
        hb: Option<&Heartbeat>,
        w: &mut Writes,
    ) -> Option<Option<String>> {
        let want = view::node(name, dev, id.as_str(), hb);
        if let Some(n) = node.filter(|n| view::node_is_current(n, &want)) {
            return Some(n.uid());
        }
        let nodes: Api<Node> = Api::all(self.ctx.client.clone());
        match apply(&nodes, name, &want).await {
            Ok(n) => {
                w.nodes += 1;
                info!(device = %id, node = %name, "node applied");
                Some(n.uid())
            }
            Err(e) => {
                warn!(device = %id, error = %e, "applying node failed");
                None
            }
        }
    }

    /// Applies the Node's status when it differs from `want`; 1 if written.
    async fn write_node_status(
        &self,
        id: &DeviceId,
        name: &str,
        node: Option<&view::StoredNode>,
        want: NodeStatus,
    ) -> u32 {
        let have = node.and_then(|n| n.owned_status_digest);
        if have == Some(view::status_digest(&want)) {
            return 0;
        }
        debug!(device = %id, want = ?want, "node status differs");
        let nodes: Api<Node> = Api::all(self.ctx.client.clone());
        let patch = json!({ "apiVersion": "v1", "kind": "Node", "status": want });
        apply_status(&nodes, name, &patch, id, "node").await
    }

    /// Writes `lease` from heartbeat `h`; 1 if written.
    async fn renew_lease(&self, id: &DeviceId, lease: &HeldLease, h: &Heartbeat) -> u32 {
        let beat = h.timestamp.as_millis();
        let api: Api<Lease> = Api::namespaced(self.ctx.client.clone(), LEASE_NAMESPACE);
        let mut body = view::lease(&lease.node, &lease.node_uid, lease.grace_ms, h);
        // At the version the bridge left, a replace changes the renewal time alone; anything
        // else (the Lease changed by another writer, or gone) is a conflict, and the apply
        // below takes the Lease back whatever it holds.
        let replaced = match &lease.version {
            Some(v) => {
                body.metadata.resource_version = Some(v.to_string());
                let params = PostParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..PostParams::default()
                };
                let r = api.replace(&lease.node, &params, &body).await;
                body.metadata.resource_version = None;
                match r {
                    Err(fleetlet_crds::kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {
                        debug!(device = %id, code = e.code, "lease changed elsewhere; applying it");
                        None
                    }
                    r => Some(r),
                }
            }
            None => None,
        };
        let written = match replaced {
            Some(r) => r,
            None => apply(&api, &lease.node, &body).await,
        };
        match written {
            Ok(stored) => {
                debug!(device = %id, beat, previous = ?lease.renewed, "lease renewed");
                let version = view::lease_is_plain(&stored, &body)
                    .then(|| stored.metadata.resource_version.map(String::into_boxed_str))
                    .flatten();
                if let Ok(mut held) = self.leases.lock()
                    && let Some(l) = held.get_mut(id)
                    && l.node == lease.node
                    && l.node_uid == lease.node_uid
                {
                    l.renewed = Some(beat);
                    l.version = version;
                }
                self.ctx
                    .metrics
                    .lease_renewed(Timestamp::now().as_millis().saturating_sub(beat));
                1
            }
            Err(e) => {
                warn!(device = %id, error = %e, "renewing lease failed");
                self.look_again(id.clone());
                0
            }
        }
    }

    /// Nodes (and their Leases) of devices that no longer exist or are no longer projected.
    /// Workloads are the agent's business; only the Kubernetes view goes away.
    async fn remove_orphans(
        &self,
        devices: &BTreeMap<DeviceId, Arc<EdgeDevice>>,
        own: &Ownership,
    ) -> u32 {
        let nodes: HashMap<String, Arc<view::StoredNode>> = self
            .ctx
            .nodes
            .state()
            .into_iter()
            .map(|n| (n.name_any(), n))
            .collect();
        let mut deleted = 0;
        let ids: HashSet<&str> = devices
            .iter()
            .filter(|(_, d)| self.projected(d))
            .map(|(id, _)| id.as_str())
            .collect();
        let _writing = self.lease_writes.lock().await;
        if let Ok(mut held) = self.leases.lock() {
            held.retain(|id, _| ids.contains(id.as_str()) && own.holds(id.as_str()));
        }
        for (name, n) in &nodes {
            let Some(dev) = fleetlet_crds::naming::device_of(&n.metadata) else {
                continue;
            };
            if ids.contains(dev.as_str()) || !own.holds(dev.as_str()) {
                continue;
            }
            let node_api: Api<Node> = Api::all(self.ctx.client.clone());
            let lease_api: Api<Lease> = Api::namespaced(self.ctx.client.clone(), LEASE_NAMESPACE);
            let _ = lease_api.delete(name, &DeleteParams::default()).await;
            match node_api.delete(name, &DeleteParams::default()).await {
                Ok(_) => {
                    info!(node = %name, device = %dev, "removed the node of a device deleted or no longer projected");
                    deleted += 1;
                }
                Err(e) => warn!(node = %name, error = %e, "removing node failed"),
            }
        }
        deleted
    }
}

/// Server-side applies `body` to `name` as the bridge, taking over fields another manager set.
async fn apply<K>(api: &Api<K>, name: &str, body: &K) -> Result<K, kube::Error>
where
    K: Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(body),
    )
    .await
}

/// Server-side applies `patch` to the status of `name` as the bridge; 1 if written (a
/// failure is logged and retried by a later pass).
async fn apply_status<K>(
    api: &Api<K>,
    name: &str,
    patch: &serde_json::Value,
    device: &DeviceId,
    what: &str,
) -> u32
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api
        .patch_status(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(patch),
        )
        .await
    {
        Ok(_) => 1,
        Err(e) => {
            warn!(device = %device, error = %e, "patching {what} status failed");
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::lease_due;

    #[test]
    fn a_lease_is_renewed_once_per_beat_and_never_without_a_new_one() {
        // Never renewed: the first beat renews.
        assert!(lease_due(None, 1_000, 30, 30_000));
        // 30 s beats, 30 s renewals: every beat, even one that comes a little early.
        assert!(lease_due(Some(0), 30_000, 30, 30_000));
        assert!(lease_due(Some(0), 28_000, 30, 30_000));
        // 10 s beats, 30 s renewals: every third beat.
        assert!(!lease_due(Some(0), 10_000, 10, 30_000));
        assert!(!lease_due(Some(0), 20_000, 10, 30_000));
        assert!(lease_due(Some(0), 30_000, 10, 30_000));
        // A slow heartbeat (the half interval it may come early exceeds the renewal period)
        // renews on each new beat, not again on every look at the same one.
        assert!(lease_due(Some(0), 120_000, 120, 30_000));
        assert!(!lease_due(Some(120_000), 120_000, 120, 30_000));
        // A beat older than the one written (a stale read) renews nothing.
        assert!(!lease_due(Some(120_000), 90_000, 120, 30_000));
    }
}
