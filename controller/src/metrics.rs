//! Prometheus metrics with bounded labels (outcome, result), never object names.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::fleet::PassSummary;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CategoryLabel {
    category: String,
}

pub struct Metrics {
    registry: Registry,
    passes: Counter,
    pass_duration: Histogram,
    kv_writes: Family<ResultLabel, Counter>,
    kv_deletes: Counter,
    status_patches: Counter,
    generations_unrecorded: Counter,
    devices: Gauge,
    manifests: Gauge,
    conflicts: Gauge,
    errors: Family<CategoryLabel, Counter>,
    rollouts_in_progress: Gauge,
    devices_pending_rollout: Gauge,
    devices_waiting_ready: Gauge,
    leader: Gauge<i64, AtomicI64>,
    shards_held: Gauge<i64, AtomicI64>,
}

type AtomicI64 = std::sync::atomic::AtomicI64;

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("fleetlet_controller");
        let m = Self {
            passes: Counter::default(),
            // 5 ms to about 80 s.
            pass_duration: Histogram::new(exponential_buckets(0.005, 2.0, 15)),
            kv_writes: Family::default(),
            kv_deletes: Counter::default(),
            status_patches: Counter::default(),
            generations_unrecorded: Counter::default(),
            devices: Gauge::default(),
            manifests: Gauge::default(),
            conflicts: Gauge::default(),
            errors: Family::default(),
            rollouts_in_progress: Gauge::default(),
            devices_pending_rollout: Gauge::default(),
            devices_waiting_ready: Gauge::default(),
            leader: Gauge::default(),
            shards_held: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("passes", "Fleet reconcile passes", m.passes.clone());
        registry.register(
            "pass_duration_seconds",
            "How long a fleet pass took, from reading the caches to its last write",
            m.pass_duration.clone(),
        );
        registry.register(
            "kv_writes",
            "desired-state writes by result (ok, conflict, error)",
            m.kv_writes.clone(),
        );
        registry.register(
            "generations_unrecorded",
            "Generations written to desired state and not recorded in EdgeDevice status, \
             because the device reported them applied in time",
            m.generations_unrecorded.clone(),
        );
        registry.register(
            "kv_deletes",
            "KV keys removed for deleted devices",
            m.kv_deletes.clone(),
        );
        registry.register(
            "status_patches",
            "EdgeManifest/EdgeDevice status patches",
            m.status_patches.clone(),
        );
        registry.register("devices", "EdgeDevices known", m.devices.clone());
        registry.register("manifests", "EdgeManifests known", m.manifests.clone());
        registry.register(
            "conflicts",
            "Resource conflicts between manifests",
            m.conflicts.clone(),
        );
        registry.register(
            "leader",
            "1 while this instance holds the leader lease (with --shards, any shard)",
            m.leader.clone(),
        );
        registry.register(
            "shards_held",
            "Shards of the fleet this instance holds (1 of 1 for a single leader)",
            m.shards_held.clone(),
        );
        registry.register(
            "errors",
            "Errors by category (kube, nats, encode, http, config)",
            m.errors.clone(),
        );
        registry.register(
            "rollouts_in_progress",
            "EdgeManifests whose rollout is not complete",
            m.rollouts_in_progress.clone(),
        );
        registry.register(
            "devices_pending_rollout",
            "Devices waiting for their turn in a rollout",
            m.devices_pending_rollout.clone(),
        );
        registry.register(
            "devices_waiting_ready",
            "Updated devices not yet Ready",
            m.devices_waiting_ready.clone(),
        );
        Self { registry, ..m }
    }
}

impl Metrics {
    pub fn kv_write(&self, result: &str) {
        self.kv_writes
            .get_or_create(&ResultLabel {
                result: result.to_owned(),
            })
            .inc();
    }

    pub fn record_pass(
        &self,
        devices: usize,
        manifests: usize,
        conflicts: usize,
        s: &PassSummary,
        took: std::time::Duration,
    ) {
        self.passes.inc();
        self.pass_duration.observe(took.as_secs_f64());
        self.devices.set(devices as i64);
        self.manifests.set(manifests as i64);
        self.conflicts.set(conflicts as i64);
        self.kv_deletes.inc_by(u64::from(s.kv_deletes));
        self.status_patches.inc_by(u64::from(s.status_patches));
    }

    pub fn status_patched(&self) {
        self.status_patches.inc();
    }

    pub fn status_skipped(&self) {
        self.generations_unrecorded.inc();
    }

    pub fn error(&self, category: &str) {
        self.errors
            .get_or_create(&CategoryLabel {
                category: category.to_owned(),
            })
            .inc();
    }

    /// Rollout totals across every manifest (no per-object labels).
    pub fn record_rollouts<'a>(&self, progress: impl Iterator<Item = &'a crate::plan::Progress>) {
        let (mut in_progress, mut pending, mut waiting) = (0, 0, 0);
        for p in progress {
            if p.updated != p.targeted || p.ready != p.targeted {
                in_progress += 1;
            }
            pending += p.pending.len() as i64;
            waiting += p.waiting_on.len() as i64;
        }
        self.rollouts_in_progress.set(in_progress);
        self.devices_pending_rollout.set(pending);
        self.devices_waiting_ready.set(waiting);
    }

    /// The leader gauge (1 while any shard is held) and the shards held.
    pub fn set_held(&self, held: &fleetlet_plumbing::shards::Ownership) {
        self.leader.set(i64::from(held.any()));
        self.shards_held.set(held.held().len() as i64);
    }
}

impl fleetlet_plumbing::Registered for Metrics {
    fn registry(&self) -> &prometheus_client::registry::Registry {
        &self.registry
    }
}
