//! The fleet loop: one level-triggered pass computes every device's manifest from the
//! reflector stores and the KV mirrors, and writes only what differs.

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use async_nats::jetstream::kv::{CreateErrorKind, Store, UpdateErrorKind};
use fleetlet_crds::{
    EdgeDevice, EdgeManifest, Time,
    k8s_openapi::jiff::Timestamp as KTime,
    kube::{
        Api, Client, Resource, ResourceExt,
        api::{Patch, PatchParams},
        runtime::{
            events::{Event, EventType, Recorder},
            reflector::Store as Reflector,
        },
    },
};
use fleetlet_plumbing::shards::Ownership;
use fleetlet_protocol::{
    AgentManifest, AgentStatus, DeviceFacts, DeviceId, FactsReport, Heartbeat, OwnerKind,
    Timestamp, encode, facts_of,
    kv::{ACTUAL_STATE, DESIRED_STATE, FACTS, HEARTBEAT},
};
use futures::StreamExt;
use serde_json::json;
use tokio::sync::mpsc;
use tracing::{debug, info, instrument, warn};

use crate::{
    Error, FIELD_MANAGER, FINALIZER,
    kvcache::{KvCache, Versioned},
    metrics::Metrics,
    plan::{
        Conflict, DeviceState, DeviceView, ManifestView, OverLimit, Plan, PodView, add_pods, plan,
    },
    pods::{PodWatch, Refusal, translate},
};

/// KV writes in flight at once (each waits for a JetStream acknowledgement).
const KV_WRITE_CONCURRENCY: usize = 64;
/// Status patches in flight at once: enough to keep up, few enough to be a polite client.
const STATUS_PATCH_CONCURRENCY: usize = 16;
/// Which generations written to desired state are recorded in EdgeDevice status
/// (`desiredGeneration`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recording {
    /// Every one, at once: signed freshness floors are served from this record, which an
    /// attacker who can write the buckets cannot lower.
    Every,
    /// Only those the device has not reported applied `after` they were written: a device
    /// that applies at once costs one status write per rollout (the bridge's), not two.
    Unapplied { after: Duration },
}

impl Recording {
    /// [`Recording::Unapplied`] after `after`; [`Recording::Every`] for zero.
    pub fn after(after: Duration) -> Self {
        if after.is_zero() {
            Self::Every
        } else {
            Self::Unapplied { after }
        }
    }

    /// Whether `generation` needs no record for `id`: the device reports it applied, and
    /// only unapplied generations are recorded.
    fn covered(self, actual: &KvCache<AgentStatus>, id: &DeviceId, generation: u64) -> bool {
        matches!(self, Self::Unapplied { .. }) && applied(actual, id) >= generation
    }
}

/// A generation written to desired state, waiting to be recorded in EdgeDevice status:
/// the device, the generation and when it was queued.
pub type QueuedGeneration = (Arc<EdgeDevice>, u64, tokio::time::Instant);

/// The KV buckets a pass writes, bound once.
pub struct Buckets {
    pub desired: Store,
    pub actual: Store,
    pub heartbeat: Store,
    pub facts: Store,
}

/// What the fleet loop reads and writes through.
pub struct Context {
    pub client: Client,
    pub devices: Reflector<EdgeDevice>,
    pub manifests: Reflector<EdgeManifest>,
    pub desired: Arc<KvCache<AgentManifest>>,
    pub actual: Arc<KvCache<AgentStatus>>,
    pub heartbeats: Arc<KvCache<Heartbeat>>,
    pub facts: Arc<KvCache<FactsReport>>,
    pub stores: Buckets,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
}

/// The fleet loop's clocks.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    /// A device whose last heartbeat is older than this is offline for rollouts.
    pub offline_after: Duration,
    /// Default progress deadline when a manifest sets none.
    pub progress_deadline: Duration,
}

/// Everything a pass reads and writes.
pub struct Fleet {
    pub ctx: Context,
    pub deadlines: Deadlines,
    /// Rate-limited Events on devices and manifests.
    events: crate::events::Events,
    reported_conflicts: Mutex<BTreeSet<Conflict>>,
    reported_over_limit: Mutex<BTreeSet<OverLimit>>,
    /// What devices last reported, for Events on what changes.
    reports: Mutex<crate::reports::Reports>,
    /// Generation last queued for each device's status, so a patch is sent once.
    queued_generations: Arc<Mutex<HashMap<DeviceId, u64>>>,
    status_queue: mpsc::UnboundedSender<QueuedGeneration>,
    recording: Recording,
    /// Pods on virtual nodes, when the kubelet facade is on.
    pods: Option<PodWatch>,
    /// Refusals already reported, by pod uid: reported once, not every pass.
    refusals: Mutex<HashMap<String, &'static str>>,
    /// Device problems whose Warning Event did not go out (rate limit, API error): tried
    /// again on each pass while the problem lasts, so each new problem is announced once.
    unannounced: Mutex<BTreeSet<(DeviceId, &'static str)>>,
    /// Tells a deleted device's keys from those of a device not known yet.
    orphans: Mutex<crate::orphans::Orphans>,
    /// Signs every manifest written, when set.
    signer: Option<Arc<crate::signing::Signer>>,
    /// Seals Pods' Secrets to their devices.
    sealer: Arc<crate::sealing::Sealer>,
}

/// What one pass did, for logs, metrics and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PassSummary {
    pub kv_writes: u32,
    pub kv_conflicts: u32,
    pub kv_deletes: u32,
    pub status_patches: u32,
}

fn rfc3339(t: Option<&Time>) -> String {
    t.map(|t| t.0.to_string()).unwrap_or_default()
}

impl Fleet {
    pub fn new(
        ctx: Context,
        deadlines: Deadlines,
        status_queue: mpsc::UnboundedSender<QueuedGeneration>,
    ) -> Self {
        Self {
            events: crate::events::Events::new(ctx.recorder.clone()),
            ctx,
            deadlines,
            reported_conflicts: Mutex::new(BTreeSet::new()),
            reported_over_limit: Mutex::new(BTreeSet::new()),
            reports: Mutex::new(crate::reports::Reports::default()),
            queued_generations: Arc::new(Mutex::new(HashMap::new())),
            status_queue,
            recording: Recording::Every,
            pods: None,
            refusals: Mutex::new(HashMap::new()),
            unannounced: Mutex::new(BTreeSet::new()),
            orphans: Mutex::default(),
            signer: None,
            sealer: Arc::new(
                crate::sealing::Sealer::random()
                    .unwrap_or_else(|_| crate::sealing::Sealer::from_secret(b"")),
            ),
        }
    }

    /// Signs every manifest with `signer`; manifests signed with another key (or none) are
    /// rewritten, so a key rotation reaches every device. Every generation is then
    /// recorded ([`Recording::Every`]).
    pub fn with_signer(mut self, signer: Arc<crate::signing::Signer>) -> Self {
        self.sealer = Arc::new(signer.sealer());
        self.signer = Some(signer);
        self
    }

    /// Which generations [`Fleet::write_device_statuses`] records (unless signing, which
    /// records every one).
    pub fn with_recording(mut self, recording: Recording) -> Self {
        self.recording = recording;
        self
    }

    /// Which generations [`Fleet::write_device_statuses`] records: every one when signing.
    pub fn recording(&self) -> Recording {
        if self.signer.is_some() {
            Recording::Every
        } else {
            self.recording
        }
    }

    /// Runs Pods bound to virtual nodes on their devices.
    pub fn with_pods(mut self, pods: PodWatch) -> Self {
        self.pods = Some(pods);
        self
    }

    /// Pods on virtual nodes as resources per device; refusals reported once each, for the
    /// devices `own` holds.
    async fn pod_views(&self, own: &Ownership) -> Vec<PodView> {
        let Some(watch) = &self.pods else {
            return Vec::new();
        };
        let mut views = Vec::new();
        let mut refused = Vec::new();
        let mut present = HashSet::new();
        for (pod, device) in watch.bound() {
            present.extend(pod.uid());
            let key = format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any());
            if fleetlet_crds::naming::shows_refusal(&pod) {
                continue;
            }
            let seal = DeviceSeal {
                sealer: &self.sealer,
                key: self.device_facts(&device).and_then(|f| f.sealing_key),
            };
            match translate(&pod, watch, &seal) {
                Ok(resources) => views.push(PodView {
                    device,
                    key,
                    resources,
                }),
                Err(r) if own.holds(device.as_str()) => refused.push((pod, r)),
                Err(_) => {}
            }
        }
        for (pod, r) in &refused {
            self.report_refusal(pod, r).await;
        }
        // Refusals of pods that are gone are forgotten.
        self.refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|uid, _| present.contains(uid));
        views
    }

    /// Sets the controller's conditions on a device to `want` (type, reason, message; each
    /// True while it lasts, absent otherwise), under a field manager of its own so the
    /// bridge's conditions are left alone.
    async fn set_device_conditions(&self, obj: &Arc<EdgeDevice>, want: &[DeviceProblem]) {
        let api: Api<EdgeDevice> = Api::namespaced(
            self.ctx.client.clone(),
            &obj.namespace().unwrap_or_default(),
        );
        let old = obj
            .status
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default();
        let conditions: Vec<serde_json::Value> = want
            .iter()
            .map(|p| {
                let since = old
                    .iter()
                    .find(|c| c.type_ == p.type_ && c.status == "True")
                    .map_or_else(|| Time(KTime::now()), |c| c.last_transition_time.clone());
                json!({
                    "type": p.type_,
                    "status": "True",
                    "reason": p.reason,
                    "message": p.message,
                    "lastTransitionTime": since,
                })
            })
            .collect();
        let patch = json!({
            "apiVersion": "fleetlet.dev/v1alpha1",
            "kind": "EdgeDevice",
            "status": { "conditions": conditions },
        });
        if let Err(e) = api
            .patch_status(
                &obj.name_any(),
                &PatchParams::apply(DEVICE_CONDITION_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
        {
            warn!(device = %obj.name_any(), error = %e, "recording the device's conditions failed");
        }
    }

    /// What the controller alone knows is wrong with a device: a generation out of range,
    /// manifests left out for its limits.
    fn device_problems(&self, id: &DeviceId, reported: u64, p: &Plan) -> Vec<DeviceProblem> {
        let mut out = Vec::new();
        if reported > MAX_GENERATION {
            out.push(DeviceProblem {
                type_: fleetlet_crds::GENERATION_OUT_OF_RANGE,
                reason: "DeviceReportedGeneration",
                message: format!(
                    "the device reports running generation {reported}, beyond the largest a manifest may have ({MAX_GENERATION}); \
                     the value is ignored and the device is sent generations above what the control plane issued. \
                     If the device really runs such a manifest, reset its agent's state directory"
                ),
            });
        }
        let left: Vec<String> = p
            .over_limit
            .iter()
            .filter(|o| o.device == *id)
            .map(|o| {
                format!(
                    "{} ({}; {})",
                    o.refused,
                    o.limit,
                    if o.kept_previous {
                        "its previous version stays"
                    } else {
                        "nothing of it is sent"
                    }
                )
            })
            .collect();
        if !left.is_empty() {
            out.push(DeviceProblem {
                type_: fleetlet_crds::LIMIT_EXCEEDED,
                reason: "ManifestsLeftOut",
                message: format!(
                    "left out, newest first, to keep the device's manifest within its limits: {}",
                    left.join("; ")
                ),
            });
        }
        out
    }

    /// A Warning Event on `object`, within its rate limit.
    /// A Warning Event; whether it went out.
    async fn warn_on(
        &self,
        object: &k8s_openapi::api::core::v1::ObjectReference,
        reason: &str,
        note: &str,
        action: &str,
    ) -> bool {
        self.events
            .publish(object, true, reason, note, action)
            .await
    }

    /// A refused pod: an Event (once per reason), and its status saying so (Failed, or
    /// Pending with the reason while it may resolve by itself). The status is written
    /// again whenever the stored pod no longer says it, as after a writer with an older
    /// view of the pod overwrote it.
    async fn report_refusal(&self, pod: &Arc<k8s_openapi::api::core::v1::Pod>, r: &Refusal) {
        let uid = pod.uid().unwrap_or_default();
        let first = self
            .refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(uid, r.reason)
            != Some(r.reason);
        if first {
            info!(pod = %pod.name_any(), reason = r.reason, message = %r.message, "pod cannot run on its device");
            let event = Event {
                type_: EventType::Warning,
                reason: r.reason.into(),
                note: Some(r.message.clone()),
                action: "Admit".into(),
                secondary: None,
            };
            if let Err(e) = self
                .ctx
                .recorder
                .publish(&event, &pod.object_ref(&()))
                .await
            {
                warn!(error = %e, "publishing pod event failed");
            }
        }
        let Some(status) = crate::pods::refusal_status(pod, r) else {
            return;
        };
        let ns = pod.namespace().unwrap_or_default();
        let api: Api<k8s_openapi::api::core::v1::Pod> =
            Api::namespaced(self.ctx.client.clone(), &ns);
        if let Err(e) = api
            .patch_status(
                &pod.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&status),
            )
            .await
        {
            warn!(pod = %pod.name_any(), error = %e, "patching refused pod status failed");
        }
    }

    fn queue_generation(&self, obj: &Arc<EdgeDevice>, generation: u64) {
        let Ok(id) = DeviceId::new(obj.name_any()) else {
            return;
        };
        let mut queued = self
            .queued_generations
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if !raise_queued(&mut queued, id, generation) {
            return;
        }
        let _ = self
            .status_queue
            .send((obj.clone(), generation, tokio::time::Instant::now()));
    }

    /// What [`Fleet::write_device_statuses`] shares with the passes.
    pub fn queued_generations(&self) -> Arc<Mutex<HashMap<DeviceId, u64>>> {
        self.queued_generations.clone()
    }

    /// Records queued generations in EdgeDevice status (`desiredGeneration`), a few
    /// patches at a time, as `recording` says: with [`Recording::Unapplied`], each one
    /// `after` it was queued and only if the device has not reported it applied by then.
    /// A generation a newer one has superseded is not recorded. A failed patch is
    /// forgotten, so the next pass queues it again.
    pub async fn write_device_statuses(
        client: Client,
        queued: Arc<Mutex<HashMap<DeviceId, u64>>>,
        mut rx: mpsc::UnboundedReceiver<QueuedGeneration>,
        actual: Arc<KvCache<AgentStatus>>,
        recording: Recording,
        metrics: Arc<Metrics>,
    ) {
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
            .for_each_concurrent(STATUS_PATCH_CONCURRENCY, |(obj, generation, at)| {
                let (client, queued, actual, metrics) = (
                    client.clone(),
                    queued.clone(),
                    actual.clone(),
                    metrics.clone(),
                );
                async move {
                    if let Recording::Unapplied { after } = recording {
                        // Every entry waits as long, so the queue stays in order of due time.
                        tokio::time::sleep_until(at + after).await;
                    }
                    let Ok(id) = DeviceId::new(obj.name_any()) else {
                        return;
                    };
                    let current = queued
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get(&id)
                        .copied();
                    if current != Some(generation) {
                        return;
                    }
                    if recording.covered(&actual, &id, generation) {
                        debug!(device = %id, generation, "applied in time; not recorded");
                        metrics.status_skipped();
                        return;
                    }
                    if patch_device_generation(&client, &obj, generation)
                        .await
                        .is_ok()
                    {
                        metrics.status_patched();
                    } else {
                        let mut q = queued.lock().unwrap_or_else(|e| e.into_inner());
                        if q.get(&id) == Some(&generation) {
                            q.remove(&id);
                        }
                    }
                }
            })
            .await;
    }

    /// Whether every input has been listed once (acting earlier could delete real state).
    pub fn synced(&self) -> bool {
        self.ctx.desired.is_ready()
            && self.ctx.actual.is_ready()
            && self.ctx.heartbeats.is_ready()
            && self.ctx.facts.is_ready()
    }

    /// Those of `ids` whose last heartbeat is not within the offline threshold.
    fn quiet(&self, ids: Vec<DeviceId>) -> Vec<DeviceId> {
        ids.into_iter().filter(|id| !self.beating(id)).collect()
    }

    /// Whether `device`'s last heartbeat is within the offline threshold.
    fn beating(&self, device: &DeviceId) -> bool {
        self.ctx
            .heartbeats
            .get(device)
            .is_some_and(|h| fresh(&h.value, Timestamp::now(), self.deadlines.offline_after))
    }

    /// A device's facts: its report, or what an older agent's heartbeat carries.
    fn device_facts(&self, device: &DeviceId) -> Option<DeviceFacts> {
        let report = self.ctx.facts.get(device).map(|v| v.value);
        let beat = self.ctx.heartbeats.get(device).map(|v| v.value);
        facts_of(report.as_deref(), beat.as_deref()).cloned()
    }

    /// Devices by id; when two namespaces claim one id, the older EdgeDevice has it (see
    /// [`fleetlet_crds::naming::devices_by_id`]) and the other is reported.
    pub fn device_objects(&self) -> BTreeMap<DeviceId, Arc<EdgeDevice>> {
        fleetlet_crds::naming::devices_by_id(self.ctx.devices.state(), |d| {
            warn!(device = %d.name_any(), namespace = d.namespace().unwrap_or_default(), "device id already used in another namespace; ignored");
        })
    }

    /// One full pass. Every replica plans the whole fleet, so rollout budgets count every
    /// device; it writes only what `own` holds: the desired state and status of the
    /// devices of its shards, and the status and Events of the manifests of its shards.
    #[instrument(skip_all, fields(shards = ?own.held()))]
    pub async fn reconcile(&self, own: &Ownership) -> Result<PassSummary, Error> {
        let started = std::time::Instant::now();
        let mut summary = PassSummary::default();
        let devices = self.device_objects();
        let owned_devices = owned(&devices, own);
        let devices_here: &BTreeMap<DeviceId, Arc<EdgeDevice>> = &owned_devices;
        let views = device_views(
            &devices,
            &self.ctx.heartbeats.snapshot(),
            &self.ctx.facts.snapshot(),
            Timestamp::now(),
            self.deadlines.offline_after,
        );
        let manifests: Vec<Arc<EdgeManifest>> = self.ctx.manifests.state();
        let manifests_here: Vec<Arc<EdgeManifest>> = manifests
            .iter()
            .filter(|m| {
                own.is_whole()
                    || own.holds(&format!(
                        "{}/{}",
                        m.namespace().unwrap_or_default(),
                        m.name_any()
                    ))
            })
            .cloned()
            .collect();
        let mviews: Vec<ManifestView> = manifests.iter().map(|m| manifest_view(m)).collect();
        let desired = self.ctx.desired.snapshot();
        let actual = self.ctx.actual.snapshot();
        let state: HashMap<DeviceId, DeviceState> = devices
            .keys()
            .map(|id| {
                (
                    id.clone(),
                    DeviceState {
                        desired: desired.get(id).map(|v| v.value.clone()),
                        actual: actual.get(id).map(|v| v.value.clone()),
                    },
                )
            })
            .collect();
        let deleting: HashSet<String> = mviews
            .iter()
            .filter(|m| m.deleting)
            .map(ManifestView::key)
            .collect();
        let mut p = plan(&views, &mviews, &state);
        add_pods(&mut p, &self.pod_views(own).await);

        let writes = self.manifests_to_write(
            // Moved out of the plan: nothing after this reads the devices' resources, and
            // a copy of every device's resources is what a rollout's pass would hold twice.
            device_resources(std::mem::take(&mut p.devices), &state, &views, &deleting),
            devices_here,
            &desired,
            &actual,
        );
        self.write_manifests(writes, &mut summary).await;
        debug!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            kv_writes = summary.kv_writes,
            "desired state written"
        );
        summary.status_patches += self.mark_device_problems(devices_here, &actual, &p).await;
        for (id, obj) in devices_here {
            let written = desired.get(id).map(|c| c.value.generation);
            let recorded = obj.status.as_ref().and_then(|s| s.desired_generation);
            if let Some(g) = written
                && recorded != Some(g)
                && !self.recording().covered(&self.ctx.actual, id, g)
            {
                self.queue_generation(obj, g);
            }
        }

        summary.kv_deletes += self.remove_orphans(&devices, own).await;
        summary.status_patches += self.finish_manifests(&manifests_here, &p).await;
        let keys: HashSet<String> = manifests_here
            .iter()
            .map(|m| format!("{}/{}", m.namespace().unwrap_or_default(), m.name_any()))
            .collect();
        self.ctx.metrics.record_rollouts(
            p.progress
                .iter()
                .filter(|(k, _)| keys.contains(*k))
                .map(|(_, v)| v),
        );
        self.report_conflicts(&manifests_here, &p.conflicts).await;
        self.report_over_limits(&manifests_here, devices_here, &p.over_limit)
            .await;
        self.report_devices(&manifests_here, devices_here, &actual, &desired)
            .await;

        let took = started.elapsed();
        self.ctx.metrics.record_pass(
            devices.len(),
            manifests.len(),
            p.conflicts.len(),
            &summary,
            took,
        );
        if summary != PassSummary::default() {
            info!(
                ?summary,
                elapsed_ms = took.as_millis() as u64,
                "pass wrote changes"
            );
        }
        Ok(summary)
    }

    /// The manifests to write: for each device whose resources (or signing key) differ
    /// from what desired state holds, the next generation with the new resources.
    fn manifests_to_write(
        &self,
        wanted: Vec<(DeviceId, Vec<fleetlet_protocol::ManagedResource>)>,
        devices: &BTreeMap<DeviceId, Arc<EdgeDevice>>,
        desired: &HashMap<DeviceId, Versioned<AgentManifest>>,
        actual: &HashMap<DeviceId, Versioned<AgentStatus>>,
    ) -> Vec<(Arc<EdgeDevice>, AgentManifest)> {
        let key = self.signer.as_ref().map(|s| s.id.clone());
        let mut writes = Vec::new();
        for (id, resources) in wanted {
            let Some(obj) = devices.get(&id) else {
                continue;
            };
            let current = desired.get(&id);
            if current.is_some_and(|c| c.value.resources == resources && c.value.signing_key == key)
            {
                continue;
            }
            let reported = actual.get(&id).map_or(0, |a| a.value.manifest_generation);
            // A generation written but not recorded yet (see [`Recording`]) counts as
            // issued too: the key may have gone before the device reported it.
            let queued = self
                .queued_generations
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&id)
                .copied()
                .unwrap_or(0);
            let generation = match next_generation(
                current.map_or(0, |c| c.value.generation).max(queued),
                obj.status
                    .as_ref()
                    .and_then(|s| s.desired_generation)
                    .unwrap_or(0),
                reported,
            ) {
                Ok(g) => g,
                Err(e) => {
                    warn!(device = %id, error = %e, "no new manifest for the device");
                    continue;
                }
            };
            let mut m = AgentManifest::new(id.clone(), generation);
            m.resources = resources;
            m.signing_key = key.clone();
            m.issued_at = Some(fleetlet_protocol::Timestamp::now());
            writes.push((obj.clone(), m));
        }
        writes
    }

    /// Writes desired state, many devices at a time, and queues the generations written
    /// for EdgeDevice status.
    async fn write_manifests(
        &self,
        writes: Vec<(Arc<EdgeDevice>, AgentManifest)>,
        summary: &mut PassSummary,
    ) {
        let results: Vec<(Arc<EdgeDevice>, u64, Result<bool, Error>)> =
            futures::stream::iter(writes)
                .map(|(obj, m)| async move {
                    let r = self.write_desired(&m.device, &m).await;
                    (obj, m.generation, r)
                })
                .buffer_unordered(KV_WRITE_CONCURRENCY)
                .collect()
                .await;
        let mut generations: Vec<(Arc<EdgeDevice>, u64)> = Vec::new();
        for (obj, generation, r) in results {
            match r {
                Ok(true) => {
                    summary.kv_writes += 1;
                    generations.push((obj, generation));
                }
                Ok(false) => summary.kv_conflicts += 1,
                Err(e) => {
                    warn!(device = obj.name_any(), error = %e, "writing desired state failed")
                }
            }
        }
        // Record generations in EdgeDevice status off the pass's critical path: a fleet-wide
        // change means one patch per device, and the next change should not wait for them.
        for (obj, generation) in generations {
            self.queue_generation(&obj, generation);
        }
    }

    /// What only the controller knows about a device (a generation out of range, a
    /// manifest left out for its limits): a condition while it lasts, and a Warning Event
    /// when it appears, so `kubectl describe` says why. Returns the status patches made.
    async fn mark_device_problems(
        &self,
        devices: &BTreeMap<DeviceId, Arc<EdgeDevice>>,
        actual: &HashMap<DeviceId, Versioned<AgentStatus>>,
        p: &Plan,
    ) -> u32 {
        let mut patches = 0;
        self.unannounced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(d, _)| devices.contains_key(d));
        for (id, obj) in devices {
            let reported = actual.get(id).map_or(0, |a| a.value.manifest_generation);
            let want = self.device_problems(id, reported, p);
            let have: Vec<(&str, &str, &str)> = obj
                .status
                .iter()
                .flat_map(|s| &s.conditions)
                .filter(|c| fleetlet_crds::CONTROLLER_CONDITIONS.contains(&c.type_.as_str()))
                .map(|c| (c.type_.as_str(), c.reason.as_str(), c.message.as_str()))
                .collect();
            let wanted: Vec<(&str, &str, &str)> = want
                .iter()
                .map(|p| (p.type_, p.reason, p.message.as_str()))
                .collect();
            self.announce_problems(id, obj, &want, &have).await;
            if have == wanted {
                continue;
            }
            self.set_device_conditions(obj, &want).await;
            patches += 1;
        }
        patches
    }

    /// A Warning Event for each problem of `id` that is new (not among the conditions it
    /// `had`) or whose Event has not gone out yet; forgets problems that are over.
    async fn announce_problems(
        &self,
        id: &DeviceId,
        obj: &EdgeDevice,
        want: &[DeviceProblem],
        had: &[(&str, &str, &str)],
    ) {
        let owed: BTreeSet<&'static str> = {
            let mut u = self.unannounced.lock().unwrap_or_else(|e| e.into_inner());
            u.retain(|(d, t)| d != id || want.iter().any(|p| p.type_ == *t));
            u.iter().filter(|(d, _)| d == id).map(|(_, t)| *t).collect()
        };
        for problem in want
            .iter()
            .filter(|p| owed.contains(p.type_) || !had.iter().any(|h| h.0 == p.type_))
        {
            if !owed.contains(problem.type_) {
                warn!(device = %id, condition = problem.type_, message = %problem.message, "device problem");
            }
            let sent = self
                .warn_on(
                    &obj.object_ref(&()),
                    problem.type_,
                    &problem.message,
                    "Reconcile",
                )
                .await;
            let mut u = self.unannounced.lock().unwrap_or_else(|e| e.into_inner());
            if sent {
                u.remove(&(id.clone(), problem.type_));
            } else {
                u.insert((id.clone(), problem.type_));
            }
        }
    }

    /// Compare-and-set write; Ok(false) when someone else wrote first (the next pass sees it).
    async fn write_desired(&self, id: &DeviceId, m: &AgentManifest) -> Result<bool, Error> {
        let bytes = match &self.signer {
            Some(s) => s.seal(m)?,
            None => encode(m).map_err(|e| Error::Encode(e.to_string()))?,
        };
        let key = DESIRED_STATE.key(id);
        let result = match self.ctx.desired.revision(id) {
            Some(rev) => self
                .ctx
                .stores
                .desired
                .update(key, bytes.into(), rev)
                .await
                .map_err(|e| {
                    (
                        e.kind() == UpdateErrorKind::WrongLastRevision,
                        e.to_string(),
                    )
                }),
            None => self
                .ctx
                .stores
                .desired
                .create(key, bytes.into())
                .await
                .map_err(|e| (e.kind() == CreateErrorKind::AlreadyExists, e.to_string())),
        };
        match result {
            Ok(revision) => {
                debug!(device = %id, generation = m.generation, revision, "desired state written");
                self.ctx.desired.remember(id.clone(), m.clone(), revision);
                self.ctx.metrics.kv_write("ok");
                Ok(true)
            }
            Err((true, _)) => {
                self.ctx.metrics.kv_write("conflict");
                Ok(false)
            }
            Err((false, e)) => {
                self.ctx.metrics.kv_write("error");
                Err(Error::Kv(e))
            }
        }
    }

    /// Deletes the KV keys of devices that no longer have an EdgeDevice (see
    /// [`crate::orphans`]: a device not known yet keeps its keys for a while).
    async fn remove_orphans(
        &self,
        devices: &BTreeMap<DeviceId, Arc<EdgeDevice>>,
        own: &Ownership,
    ) -> u32 {
        let mut deleted = 0;
        let buckets: [(&Store, Vec<DeviceId>, &str); 4] = [
            (
                &self.ctx.stores.desired,
                self.ctx.desired.devices(),
                DESIRED_STATE.name,
            ),
            (
                &self.ctx.stores.actual,
                self.ctx.actual.devices(),
                ACTUAL_STATE.name,
            ),
            // A running agent stores its facts once (then on change, a new connection or
            // hourly): removing them, or the heartbeat that shows it is running, while it
            // still beats (it may have started before its EdgeDevice was created) would
            // leave the device without facts for up to an hour. Both go once it is quiet.
            (
                &self.ctx.stores.heartbeat,
                self.quiet(self.ctx.heartbeats.devices()),
                HEARTBEAT.name,
            ),
            (
                &self.ctx.stores.facts,
                self.quiet(self.ctx.facts.devices()),
                FACTS.name,
            ),
        ];
        let gone = self
            .orphans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .sweep(
                buckets.iter().flat_map(|(_, ids, _)| ids),
                devices,
                std::time::Instant::now(),
            );
        for (store, ids, bucket) in buckets {
            for id in ids
                .into_iter()
                .filter(|id| gone.contains(id) && own.holds(id.as_str()))
            {
                match crate::remove_key(store, id.as_str()).await {
                    Ok(()) => {
                        info!(device = %id, bucket, "removed the key of a deleted device");
                        deleted += 1;
                    }
                    Err(e) => warn!(device = %id, bucket, error = %e, "could not remove key"),
                }
            }
        }
        deleted
    }

    /// Finalizers and status for every manifest.
    async fn finish_manifests(&self, manifests: &[Arc<EdgeManifest>], p: &Plan) -> u32 {
        let mut patches = 0;
        let desired = self.ctx.desired.snapshot();
        for m in manifests {
            let (ns, name) = (m.namespace().unwrap_or_default(), m.name_any());
            let api: Api<EdgeManifest> = Api::namespaced(self.ctx.client.clone(), &ns);
            let has_finalizer = m.finalizers().iter().any(|f| f == FINALIZER);
            if m.metadata.deletion_timestamp.is_some() {
                let still_on_devices = desired.values().any(|d| {
                    d.value.resources.iter().any(|r| {
                        r.owner.kind == OwnerKind::EdgeManifest
                            && r.owner.namespace == ns
                            && r.owner.name == name
                    })
                });
                if has_finalizer && !still_on_devices {
                    let rest: Vec<&String> =
                        m.finalizers().iter().filter(|f| *f != FINALIZER).collect();
                    let patch = json!({ "metadata": { "finalizers": rest, "resourceVersion": m.resource_version() } });
                    match api
                        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                    {
                        Ok(_) => {
                            info!(manifest = %format!("{ns}/{name}"), "resources removed from every device; finalizer released")
                        }
                        Err(e) => {
                            warn!(manifest = %format!("{ns}/{name}"), error = %e, "releasing finalizer failed")
                        }
                    }
                }
                continue;
            }
            if !has_finalizer {
                let mut all: Vec<String> = m.finalizers().to_vec();
                all.push(FINALIZER.into());
                let patch = json!({ "metadata": { "finalizers": all, "resourceVersion": m.resource_version() } });
                if let Err(e) = api
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    warn!(manifest = %format!("{ns}/{name}"), error = %e, "adding finalizer failed");
                }
            }
            let key = format!("{ns}/{name}");
            let progress = p.progress.get(&key).cloned().unwrap_or_default();
            let status = crate::status::manifest_status(&crate::status::Inputs {
                manifest: m,
                key: &key,
                progress: &progress,
                conflicts: &p.conflicts,
                over_limit: &p.over_limit,
                default_deadline: self.deadlines.progress_deadline,
                now: KTime::now(),
            });
            if m.status.as_ref() != Some(&status) {
                let patch = json!({ "apiVersion": "fleetlet.dev/v1alpha1", "kind": "EdgeManifest", "status": status });
                match api
                    .patch_status(
                        &name,
                        &PatchParams::apply(FIELD_MANAGER).force(),
                        &Patch::Apply(&patch),
                    )
                    .await
                {
                    Ok(_) => patches += 1,
                    Err(e) => {
                        warn!(manifest = %key, error = %e, "patching EdgeManifest status failed")
                    }
                }
            }
        }
        patches
    }

    /// A Warning Event on the manifest and the device of each new [`OverLimit`].
    async fn report_over_limits(
        &self,
        manifests: &[Arc<EdgeManifest>],
        devices: &BTreeMap<DeviceId, Arc<EdgeDevice>>,
        over: &[OverLimit],
    ) {
        let fresh: Vec<OverLimit> = {
            let mut seen = self
                .reported_over_limit
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let now: BTreeSet<OverLimit> = over.iter().cloned().collect();
            let fresh = now.difference(&seen).cloned().collect();
            *seen = now;
            fresh
        };
        for o in fresh {
            let note = format!(
                "{} is left out on device {}: {}; {}",
                o.refused,
                o.device,
                o.limit,
                if o.kept_previous {
                    "the device keeps its previous version"
                } else {
                    "nothing of it is sent to the device"
                }
            );
            warn!(device = %o.device, refused = %o.refused, limit = %o.limit, "left out for the device's limits");
            if let Some(m) = find_manifest(manifests, &o.refused) {
                self.warn_on(&m.object_ref(&()), "DeviceLimitExceeded", &note, "Plan")
                    .await;
            }
            if let Some(d) = devices.get(&o.device) {
                self.warn_on(&d.object_ref(&()), "DeviceLimitExceeded", &note, "Plan")
                    .await;
            }
        }
    }

    /// Events for what devices report anew: refused manifests, failing resources, drift
    /// repaired; on the EdgeDevice and on the EdgeManifest the resource belongs to.
    async fn report_devices(
        &self,
        manifests: &[Arc<EdgeManifest>],
        devices: &BTreeMap<DeviceId, Arc<EdgeDevice>>,
        actual: &HashMap<DeviceId, crate::kvcache::Versioned<AgentStatus>>,
        desired: &HashMap<DeviceId, crate::kvcache::Versioned<AgentManifest>>,
    ) {
        let reports = {
            let mut r = self.reports.lock().unwrap_or_else(|e| e.into_inner());
            let found = r.changes(
                actual
                    .iter()
                    .filter(|(id, _)| devices.contains_key(*id))
                    .map(|(id, v)| (id, v.revision, &*v.value)),
                |id| desired.get(id).map(|v| &*v.value),
            );
            r.retain(|id| devices.contains_key(id));
            found
        };
        for r in reports {
            if let Some(d) = devices.get(&r.device) {
                self.events
                    .publish(&d.object_ref(&()), r.warning, r.reason, &r.note, "Report")
                    .await;
            }
            for key in &r.manifests {
                if let Some(m) = find_manifest(manifests, key) {
                    self.events
                        .publish(&m.object_ref(&()), r.warning, r.reason, &r.note, "Report")
                        .await;
                }
            }
        }
    }

    /// A Warning Event on both manifests of each conflict, once per conflict.
    async fn report_conflicts(&self, manifests: &[Arc<EdgeManifest>], conflicts: &[Conflict]) {
        let fresh: Vec<Conflict> = {
            let mut seen = self
                .reported_conflicts
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let now: BTreeSet<Conflict> = conflicts.iter().cloned().collect();
            let fresh = now.difference(&seen).cloned().collect();
            *seen = now;
            fresh
        };
        for c in fresh {
            let note = format!(
                "{} on device {}: {} keeps it (older), {} does not get it",
                c.identity, c.device, c.kept_by, c.refused
            );
            for key in [&c.kept_by, &c.refused] {
                let Some(m) = manifests.iter().find(|m| {
                    format!("{}/{}", m.namespace().unwrap_or_default(), m.name_any()) == *key
                }) else {
                    continue;
                };
                let event = Event {
                    type_: EventType::Warning,
                    reason: "ResourceConflict".into(),
                    note: Some(note.clone()),
                    action: "Plan".into(),
                    secondary: None,
                };
                if let Err(e) = self.ctx.recorder.publish(&event, &m.object_ref(&())).await {
                    warn!(error = %e, "publishing conflict event failed");
                }
            }
        }
    }
}

/// The devices of `devices` whose shard `own` holds (all of them, borrowed, when it holds
/// every shard).
fn owned<'a>(
    devices: &'a BTreeMap<DeviceId, Arc<EdgeDevice>>,
    own: &Ownership,
) -> std::borrow::Cow<'a, BTreeMap<DeviceId, Arc<EdgeDevice>>> {
    if own.is_whole() {
        return std::borrow::Cow::Borrowed(devices);
    }
    std::borrow::Cow::Owned(
        devices
            .iter()
            .filter(|(id, _)| own.holds(id.as_str()))
            .map(|(id, d)| (id.clone(), d.clone()))
            .collect(),
    )
}

/// The manifest `namespace/name` among `manifests`.
fn find_manifest<'a>(
    manifests: &'a [Arc<EdgeManifest>],
    key: &str,
) -> Option<&'a Arc<EdgeManifest>> {
    let (ns, name) = key.split_once('/')?;
    manifests
        .iter()
        .find(|m| m.namespace().as_deref() == Some(ns) && m.name_any() == name)
}

/// The generation `id` reports applied (every resource reconciled once), 0 without a status.
fn applied(actual: &KvCache<AgentStatus>, id: &DeviceId) -> u64 {
    actual.get(id).map_or(0, |a| a.value.observed_generation)
}

async fn patch_device_generation(
    client: &Client,
    obj: &EdgeDevice,
    generation: u64,
) -> Result<(), Error> {
    let api: Api<EdgeDevice> =
        Api::namespaced(client.clone(), &obj.namespace().unwrap_or_default());
    let patch = json!({
        "apiVersion": "fleetlet.dev/v1alpha1",
        "kind": "EdgeDevice",
        "status": { "desiredGeneration": generation },
    });
    api.patch_status(
        &obj.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map(|_| ())
    .map_err(|e| {
        warn!(device = obj.name_any(), error = %e, "patching EdgeDevice status failed");
        Error::Kube(e)
    })
}

/// What each device should hold: the plan, plus removals on paused devices (deleting a
/// manifest overrides a device's pause, or the manifest could never go away).
fn device_resources(
    planned: BTreeMap<DeviceId, Vec<fleetlet_protocol::ManagedResource>>,
    state: &HashMap<DeviceId, DeviceState>,
    views: &[DeviceView<'_>],
    deleting: &HashSet<String>,
) -> Vec<(DeviceId, Vec<fleetlet_protocol::ManagedResource>)> {
    let mut out: Vec<_> = planned.into_iter().collect();
    for v in views.iter().filter(|v| v.paused) {
        let Some(current) = state.get(&v.id).and_then(|s| s.desired.as_ref()) else {
            continue;
        };
        let kept: Vec<_> = current
            .resources
            .iter()
            .filter(|r| !deleting.contains(&format!("{}/{}", r.owner.namespace, r.owner.name)))
            .cloned()
            .collect();
        if kept.len() != current.resources.len() {
            out.push((v.id.clone(), kept));
        }
    }
    out
}

/// Seals to one device's key, once its facts have brought it.
struct DeviceSeal<'a> {
    sealer: &'a crate::sealing::Sealer,
    key: Option<String>,
}

impl crate::pods::Seal for DeviceSeal<'_> {
    fn seal(&self, bytes: &[u8]) -> Result<String, Refusal> {
        let key = self.key.as_deref().ok_or_else(|| Refusal {
            reason: "DeviceKeyUnknown",
            message: "the device has not sent its sealing key yet (it comes with its facts); \
                      the pod's Secrets go to the device only sealed to that key"
                .into(),
            transient: true,
        })?;
        self.sealer.seal(key, bytes).map_err(|e| Refusal {
            reason: "DeviceKeyInvalid",
            message: format!("cannot seal the pod's Secrets to the device: {e}"),
            transient: true,
        })
    }
}

/// The largest generation a manifest may have: Kubernetes keeps generations in signed
/// 64-bit integers (`EdgeDevice.status.desiredGeneration`).
pub const MAX_GENERATION: u64 = i64::MAX as u64;

/// Why a device gets no new manifest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GenerationError {
    #[error("generation {floor} leaves no room for a next one below {MAX_GENERATION}")]
    Exhausted { floor: u64 },
}

/// Records `generation` as the newest one issued to `id` and not yet recorded; false
/// (nothing to record) when that one or a newer one is already there. A pass that read
/// desired state before writing a newer manifest must not lower it: the next manifest's
/// generation is computed from it when the key is gone, and could repeat one issued.
fn raise_queued(queued: &mut HashMap<DeviceId, u64>, id: DeviceId, generation: u64) -> bool {
    match queued.get(&id) {
        Some(q) if *q >= generation => false,
        _ => {
            queued.insert(id, generation);
            true
        }
    }
}

/// The generation of a device's next manifest: one above the highest it may have seen
/// (the stored manifest's, the one recorded in its EdgeDevice, and the one it reports
/// running). What a device reports is untrusted input: a value beyond [`MAX_GENERATION`]
/// is ignored rather than allowed to exhaust the device's generations.
pub fn next_generation(stored: u64, recorded: u64, reported: u64) -> Result<u64, GenerationError> {
    let reported = if reported > MAX_GENERATION {
        0
    } else {
        reported
    };
    let floor = stored.max(recorded).max(reported);
    floor
        .checked_add(1)
        .filter(|g| *g <= MAX_GENERATION)
        .ok_or(GenerationError::Exhausted { floor })
}

/// One of the controller's conditions on an EdgeDevice.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DeviceProblem {
    type_: &'static str,
    reason: &'static str,
    message: String,
}

/// The field manager of the controller's conditions on EdgeDevices.
const DEVICE_CONDITION_MANAGER: &str = "fleetlet-controller-conditions";

/// Whether heartbeat `h` is younger than `offline_after` at `now`.
fn fresh(h: &Heartbeat, now: Timestamp, offline_after: Duration) -> bool {
    now.as_millis().saturating_sub(h.timestamp.as_millis()) < offline_after.as_millis() as u64
}

/// What the planner needs of each device: identity, labels, pause, whether it is online
/// (a heartbeat within `offline_after`) and the limits it reported.
fn device_views<'a>(
    devices: &'a BTreeMap<DeviceId, Arc<EdgeDevice>>,
    heartbeats: &HashMap<DeviceId, Versioned<Heartbeat>>,
    facts: &HashMap<DeviceId, Versioned<FactsReport>>,
    now: Timestamp,
    offline_after: Duration,
) -> Vec<DeviceView<'a>> {
    devices
        .iter()
        .map(|(id, d)| DeviceView {
            id: id.clone(),
            namespace: Cow::Borrowed(d.metadata.namespace.as_deref().unwrap_or_default()),
            labels: Cow::Borrowed(d.labels()),
            paused: d.spec.paused,
            online: heartbeats
                .get(id)
                .is_some_and(|h| fresh(&h.value, now, offline_after)),
            limits: facts_of(
                facts.get(id).map(|f| &*f.value),
                heartbeats.get(id).map(|h| &*h.value),
            )
            .and_then(|f| f.limits)
            .unwrap_or_default()
            .bounded(),
        })
        .collect()
}

/// What the planner needs of an EdgeManifest.
fn manifest_view(m: &EdgeManifest) -> ManifestView {
    ManifestView {
        namespace: m.namespace().unwrap_or_default(),
        name: m.name_any(),
        uid: m.uid(),
        generation: m.metadata.generation.unwrap_or(0),
        created: rfc3339(m.metadata.creation_timestamp.as_ref()),
        selector: m.spec.selector.clone(),
        devices: m.spec.devices.clone(),
        resources: m.spec.resources.clone(),
        deleting: m.metadata.deletion_timestamp.is_some(),
        max_unavailable: m
            .spec
            .rollout
            .as_ref()
            .and_then(|r| r.max_unavailable.clone()),
        paused: m.spec.rollout.as_ref().is_some_and(|r| r.paused),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queued_generation_is_never_lowered() {
        let mut q = HashMap::new();
        let id = DeviceId::new("d").unwrap();
        assert!(raise_queued(&mut q, id.clone(), 2));
        // A pass that read desired state before generation 2 was written queues 1 again.
        assert!(!raise_queued(&mut q, id.clone(), 1));
        assert!(!raise_queued(&mut q, id.clone(), 2));
        assert_eq!(q.get(&id), Some(&2));
        assert!(raise_queued(&mut q, id.clone(), 3));
        assert_eq!(q.get(&id), Some(&3));
    }

    #[test]
    fn the_next_generation_is_one_above_what_the_device_may_have_seen() {
        assert_eq!(next_generation(0, 0, 0), Ok(1));
        assert_eq!(next_generation(4, 7, 5), Ok(8));
        assert_eq!(next_generation(4, 2, 9), Ok(10));
    }

    #[test]
    fn a_generation_reported_out_of_range_neither_wraps_nor_panics() {
        // What a hostile device can send: ignored, the others decide.
        assert_eq!(next_generation(3, 3, u64::MAX), Ok(4));
        assert_eq!(next_generation(3, 3, MAX_GENERATION + 1), Ok(4));
        assert_eq!(
            next_generation(3, 3, MAX_GENERATION - 1),
            Ok(MAX_GENERATION)
        );
        assert_eq!(
            next_generation(MAX_GENERATION, 0, 0),
            Err(GenerationError::Exhausted {
                floor: MAX_GENERATION
            })
        );
        assert_eq!(
            next_generation(u64::MAX, 0, 0),
            Err(GenerationError::Exhausted { floor: u64::MAX })
        );
    }
}
