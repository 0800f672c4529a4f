//! The level-triggered core: manifest in force + what is on the device → actions → status.
//!
//! Every pass looks at every resource, whatever woke it (a new manifest, the resync timer,
//! a retry): added and changed resources are applied, unchanged ones re-observed (drift is
//! repaired and counted), and resources the manifest no longer holds are deleted if this
//! agent created them.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use fleetlet_protocol::{
    AgentManifest, AgentStatus, ConditionStatus, DecodeError, DriftEvent, ManagedResource,
    Rejection, ResourceId, ResourceSpec, ResourceStatus, Timestamp, decode,
};
use futures::StreamExt;
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};
use tracing::{debug, info, instrument, warn};

use crate::{
    config::Settings,
    reconciler::{Deleted, Observation, ReconcileError},
    registry::Registry,
    store::{Owned, StateStore, StoreError, StoredManifest},
};

/// A value seen on the device's desired-state key.
#[derive(Debug, Clone)]
pub enum Candidate {
    Put {
        revision: u64,
        value: Bytes,
    },
    Deleted {
        revision: u64,
    },
    /// The lowest generation the control plane says this device may run, checked against
    /// the trusted keys (for a device that lost its state).
    Floor {
        generation: u64,
    },
}

struct Backoff {
    attempts: u32,
    until: Instant,
}

/// The outcome of working on one resource in a pass.
struct Outcome {
    id: ResourceId,
    status: ResourceStatus,
    drift: Option<String>,
    /// A retryable failure: back off before trying again.
    retry: bool,
}

/// Why a manifest is refused: what `status.lastRejection` says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {message}")]
struct Refusal {
    /// A CamelCase word for machines (`WrongDevice`, `StaleGeneration`, ...).
    reason: &'static str,
    message: String,
    /// The refused manifest's generation, once it decoded.
    generation: Option<u64>,
}

impl Refusal {
    fn new(reason: &'static str, message: String, generation: Option<u64>) -> Self {
        Self {
            reason,
            message,
            generation,
        }
    }

    /// The rejection to report for the value seen at `revision`, dated now.
    fn rejection(self, revision: u64) -> Box<Rejection> {
        Box::new(Rejection {
            generation: self.generation,
            revision,
            reason: self.reason.to_owned(),
            message: self.message,
            at: Timestamp::now(),
        })
    }
}

/// A manifest that passed the checks.
#[derive(Debug, Clone, PartialEq)]
enum Checked {
    /// The manifest in force, sent again: nothing to do.
    InForce,
    /// A newer manifest, to store and put in force.
    New(AgentManifest),
}

/// What a pass does with each resource, worked out from the manifest and the ownership
/// records alone, before anything on the device is touched.
#[derive(Debug, Clone, PartialEq)]
struct Plan<'m> {
    /// Every resource of the manifest, in its order, with what to do with it.
    apply: Vec<Entry<'m>>,
    /// What this agent applied and the manifest no longer holds, in id order: deleted.
    remove: Vec<Removal>,
}

/// One resource of the manifest and what the pass does with it.
#[derive(Debug, Clone, PartialEq)]
struct Entry<'m> {
    resource: &'m ManagedResource,
    step: Step,
}

/// What a pass does with one resource of the manifest.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    /// Never applied (or its ownership record was lost): applied.
    Add,
    /// Applied with another spec for the same object: applied over it.
    Change,
    /// Applied with another spec that addresses another object (a File's new path, a kind
    /// change): the previous object, `applied`, is deleted first, then the new one applied.
    Move { applied: Box<ResourceSpec> },
    /// Applied exactly as specified: observed again, and repaired if it drifted.
    Keep,
}

/// A resource to delete, with the spec this agent applied for it.
#[derive(Debug, Clone, PartialEq)]
struct Removal {
    id: ResourceId,
    applied: ResourceSpec,
}

impl<'m> Plan<'m> {
    /// The plan to go from `owned` (what this agent applied) to `manifest`. `moves(old, new)`
    /// says whether `new` addresses another object than `old` ([`Registry::moves`]).
    fn new(
        manifest: &'m AgentManifest,
        owned: &Owned,
        moves: impl Fn(&ResourceSpec, &ResourceSpec) -> bool,
    ) -> Self {
        let desired: HashSet<&ResourceId> = manifest.resources.iter().map(|r| &r.id).collect();
        let remove = owned
            .iter()
            .filter(|(id, _)| !desired.contains(id))
            .map(|(id, applied)| Removal {
                id: id.clone(),
                applied: applied.clone(),
            })
            .collect();
        let apply = manifest
            .resources
            .iter()
            .map(|resource| {
                let step = match owned.get(&resource.id) {
                    None => Step::Add,
                    Some(applied) if *applied == resource.spec => Step::Keep,
                    Some(applied) if moves(applied, &resource.spec) => Step::Move {
                        applied: Box::new(applied.clone()),
                    },
                    Some(_) => Step::Change,
                };
                Entry { resource, step }
            })
            .collect();
        Self { apply, remove }
    }
}

pub struct Engine {
    settings: Arc<Settings>,
    registry: Registry,
    store: StateStore,
    current: Option<StoredManifest>,
    owned: Owned,
    status: AgentStatus,
    backoff: HashMap<ResourceId, Backoff>,
    last_seen_revision: u64,
    /// An accepted manifest the state directory could not take (full, read-only): it is
    /// not applied until it is on disk, and is tried again every drift interval.
    unpersisted: Option<(u64, bytes::Bytes)>,
    /// The freshness floor the control plane sent, once it did.
    floor: Option<u64>,
    /// The newest manifest seen while waiting for the floor: offered again when it comes.
    unverified: Option<(u64, bytes::Bytes)>,
}

/// The condition saying whether the state directory takes writes.
pub const STATE_WRITABLE: &str = "StateWritable";
/// The trigger of the first pass after the agent starts, logged at info when it is done
/// ("pass done trigger=\"start\"").
pub const START_TRIGGER: &str = "start";

impl Engine {
    /// The reconcilers this engine runs.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Loads what the state directory remembers: the manifest in force, ownership, status.
    pub fn new(
        settings: Arc<Settings>,
        registry: Registry,
        store: StateStore,
    ) -> Result<Self, StoreError> {
        let current = store.load_manifest()?;
        let owned = store.load_owned()?;
        let mut status = store
            .load_status()?
            .filter(|s| s.device == settings.device)
            .unwrap_or_else(|| AgentStatus::new(settings.device.clone()));
        if let Some(c) = &current {
            status.manifest_generation = c.manifest.generation;
        }
        let last_seen_revision = current.as_ref().map_or(0, |c| c.revision);
        Ok(Self {
            settings,
            registry,
            store,
            current,
            owned,
            status,
            backoff: HashMap::new(),
            last_seen_revision,
            unpersisted: None,
            floor: None,
            unverified: None,
        })
    }

    /// Whether the engine waits for a freshness floor before accepting a manifest: it
    /// checks signatures and remembers no manifest (first start, or its state was lost),
    /// so an old signed manifest replayed now would look new to it.
    pub fn needs_floor(&self) -> bool {
        self.current.is_none() && !self.settings.manifest_keys.is_empty() && self.floor.is_none()
    }

    pub fn status(&self) -> &AgentStatus {
        &self.status
    }

    pub fn manifest(&self) -> Option<&AgentManifest> {
        self.current.as_ref().map(|c| &c.manifest)
    }

    /// The KV revision of the newest value seen; watching resumes after it.
    pub fn last_seen_revision(&self) -> u64 {
        self.last_seen_revision
    }

    /// Considers a value from the desired-state key. Returns true when it became the
    /// manifest in force; a refused value leaves the previous one in force and is recorded
    /// in `status.lastRejection`.
    pub fn offer(&mut self, candidate: Candidate) -> bool {
        match candidate {
            Candidate::Deleted { revision } => {
                self.desired_state_deleted(revision);
                false
            }
            Candidate::Floor { generation } => self.floor_set(generation),
            Candidate::Put { revision, value } => self.offer_value(revision, value),
        }
    }

    /// Keeps the manifest in force when the desired-state key is deleted, and says so:
    /// removing a device from the fleet is not an instruction to destroy its workloads.
    fn desired_state_deleted(&mut self, revision: u64) {
        self.last_seen_revision = revision;
        warn!(
            revision,
            "desired state was deleted; keeping the last manifest in force"
        );
        self.status.set_condition(
            "DesiredStateDeleted",
            ConditionStatus::True,
            "KeyDeleted",
            "the desired-state key was deleted; the last manifest stays in force",
            Timestamp::now(),
        );
    }

    /// Records the freshness floor and offers the manifest that waited for it.
    fn floor_set(&mut self, generation: u64) -> bool {
        info!(generation, "freshness floor set");
        self.floor = Some(generation);
        match self.unverified.take() {
            Some((revision, value)) => self.offer(Candidate::Put { revision, value }),
            None => false,
        }
    }

    /// Checks a new value of the desired-state key and, if it passes, puts it in force.
    fn offer_value(&mut self, revision: u64, value: Bytes) -> bool {
        self.last_seen_revision = revision;
        if self.needs_floor() {
            self.wait_for_floor(revision, value);
            return false;
        }
        match self.check(&value) {
            Ok(Checked::InForce) => false,
            Ok(Checked::New(manifest)) => self.put_in_force(revision, value, manifest),
            Err(refusal) => {
                let Refusal {
                    reason, message, ..
                } = &refusal;
                warn!(revision, reason, %message, "manifest refused");
                self.status.last_rejection = Some(refusal.rejection(revision));
                false
            }
        }
    }

    /// Holds a value until the freshness floor comes, and says why it is not applied yet.
    fn wait_for_floor(&mut self, revision: u64, value: Bytes) {
        let message = "the device remembers no manifest and waits for the control \
                       plane's freshness floor before accepting one"
            .to_string();
        if self.unverified.is_none() {
            warn!(revision, "{message}");
        }
        let refusal = Refusal::new("FreshnessUnverified", message, None);
        self.status.last_rejection = Some(refusal.rejection(revision));
        self.unverified = Some((revision, value));
    }

    /// Stores an accepted manifest and makes it the one in force. What runs is what is on
    /// disk: a manifest that cannot be stored is not applied (a restart would bring back the
    /// old one while its resources stayed), and the last good state stays in force.
    fn put_in_force(&mut self, revision: u64, value: Bytes, manifest: AgentManifest) -> bool {
        info!(
            generation = manifest.generation,
            revision,
            resources = manifest.resources.len(),
            "manifest accepted"
        );
        let generation = manifest.generation;
        let stored = StoredManifest { revision, manifest };
        if let Err(e) = self.store.save_manifest(&stored) {
            let message = format!("the manifest could not be stored: {e}");
            warn!(generation, revision, error = %e, "state directory refused the manifest; keeping the last one");
            self.state_unwritable(&e);
            let refusal = Refusal::new("StateNotWritable", message, Some(generation));
            self.status.last_rejection = Some(refusal.rejection(revision));
            self.unpersisted = Some((revision, value));
            return false;
        }
        self.unpersisted = None;
        self.state_writable();
        self.status.manifest_generation = stored.manifest.generation;
        self.status
            .conditions
            .retain(|c| c.type_ != "DesiredStateDeleted" && c.type_ != "OrphansLeft");
        self.current = Some(stored);
        true
    }

    /// Records that the state directory refused a write.
    fn state_unwritable(&mut self, e: &StoreError) {
        let full = matches!(e, StoreError::Io { source, .. }
            if matches!(source.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded));
        self.status.set_condition(
            STATE_WRITABLE,
            ConditionStatus::False,
            if full { "StorageFull" } else { "WriteFailed" },
            &e.to_string(),
            Timestamp::now(),
        );
    }

    /// Records that the state directory took a write again.
    fn state_writable(&mut self) {
        if self
            .status
            .condition(STATE_WRITABLE)
            .is_some_and(|c| c.status != ConditionStatus::True)
        {
            info!("the state directory takes writes again");
            self.status.set_condition(
                STATE_WRITABLE,
                ConditionStatus::True,
                "Writable",
                "the state directory takes writes",
                Timestamp::now(),
            );
        }
    }

    /// Offers the manifest the state directory refused again; true when it is now in force.
    fn retry_unpersisted(&mut self) -> bool {
        match self.unpersisted.take() {
            Some((revision, value)) if revision >= self.last_seen_revision => {
                self.offer(Candidate::Put { revision, value })
            }
            _ => false,
        }
    }

    /// Whether `value` may become the manifest in force: size, encoding, signature, device,
    /// then generation.
    fn check(&self, value: &[u8]) -> Result<Checked, Refusal> {
        if value.len() > self.settings.max_manifest_bytes {
            let e = DecodeError::TooLarge {
                what: "AgentManifest",
                size: value.len(),
                limit: self.settings.max_manifest_bytes,
            };
            return Err(Refusal::new(e.reason(), e.to_string(), None));
        }
        let m = decode::<AgentManifest>(value)
            .map_err(|e| Refusal::new(e.reason(), e.to_string(), None))?;
        let generation = Some(m.generation);
        crate::trust::verify(
            &self.settings.manifest_keys,
            self.settings.allow_unsigned,
            value,
            &m,
        )
        .map_err(|(reason, message)| Refusal::new(reason, message, generation))?;
        if m.device != self.settings.device {
            return Err(Refusal::new(
                "WrongDevice",
                format!(
                    "manifest is for device {:?}, this is {:?}",
                    m.device.as_str(),
                    self.settings.device.as_str()
                ),
                generation,
            ));
        }
        self.check_generation(m)
    }

    /// Refuses a generation older than the floor or the manifest in force, or one already in
    /// force with other contents.
    fn check_generation(&self, m: AgentManifest) -> Result<Checked, Refusal> {
        let generation = Some(m.generation);
        if let Some(floor) = self.floor
            && self.current.is_none()
            && m.generation < floor
        {
            return Err(Refusal::new(
                "StaleGeneration",
                format!(
                    "generation {} is older than generation {floor}, the newest the control plane issued this device",
                    m.generation
                ),
                generation,
            ));
        }
        if let Some(cur) = &self.current {
            let have = cur.manifest.generation;
            if m.generation < have {
                return Err(Refusal::new(
                    "StaleGeneration",
                    format!(
                        "generation {} is older than generation {have} in force",
                        m.generation
                    ),
                    generation,
                ));
            }
            if m.generation == have {
                if m == cur.manifest {
                    return Ok(Checked::InForce);
                }
                return Err(Refusal::new(
                    "GenerationReused",
                    format!("generation {have} is already in force with different contents"),
                    generation,
                ));
            }
        }
        Ok(Checked::New(m))
    }

    /// Earliest time a backed-off resource may be retried.
    pub fn next_retry(&self) -> Option<Instant> {
        self.backoff.values().map(|b| b.until).min()
    }

    /// One full pass over every resource: work out the plan, delete what is gone, move,
    /// record ownership, work on every resource, then report.
    #[instrument(skip(self), fields(device = %self.settings.device, generation = self.status.manifest_generation))]
    pub async fn pass(&mut self, trigger: &'static str) {
        let started = std::time::Instant::now();
        let Some(current) = self.current.clone() else {
            debug!("no manifest yet");
            return;
        };
        let (manifest, unresolved) = crate::dependencies::with_restart_digests(&current.manifest);
        let manifest: &AgentManifest = &manifest;
        let now = Timestamp::now();
        let plan = Plan::new(manifest, &self.owned, |old, new| {
            self.registry.moves(old, new)
        });
        let mut resources: BTreeMap<ResourceId, ResourceStatus> = BTreeMap::new();
        let mut orphans = Vec::new();
        self.remove_gone(&plan.remove, now, &mut resources, &mut orphans)
            .await;
        let mut blocked = self.move_out(&plan, &mut orphans).await;
        blocked.extend(unresolved);
        self.record_ownership(&plan, &blocked).await;
        let instant_now = Instant::now();
        for o in self.work(&plan, &blocked, now, instant_now).await {
            let (id, status) = self.settle(o, now, instant_now);
            resources.insert(id, status);
        }
        self.update_status(manifest, resources, orphans, now);
        log_pass_done(trigger, started, manifest);
    }

    /// Deletes what this agent applied and the manifest no longer holds. What was changed
    /// outside fleetlet is left in place and listed in `orphans`; a failed delete is
    /// reported in `resources`.
    async fn remove_gone(
        &mut self,
        gone: &[Removal],
        now: Timestamp,
        resources: &mut BTreeMap<ResourceId, ResourceStatus>,
        orphans: &mut Vec<String>,
    ) {
        for Removal { id, applied } in gone {
            match self.registry.delete(id, applied).await {
                Ok(outcome) => {
                    match &outcome {
                        Deleted::LeftInPlace(why) => {
                            warn!(resource = %id, %why, "not deleting a resource changed outside fleetlet");
                            orphans.push(format!("{id}: {why}"));
                        }
                        _ => {
                            info!(resource = %id, ?outcome, "deleted resource no longer in the manifest")
                        }
                    }
                    self.owned.remove(id);
                    self.backoff.remove(id);
                }
                Err(e) => {
                    warn!(resource = %id, error = %e, "could not delete resource no longer in the manifest");
                    resources.insert(
                        id.clone(),
                        ResourceStatus::Failed {
                            since: now,
                            error: format!("deleting: {e}"),
                            retry_after: None,
                            permanent: false,
                        },
                    );
                }
            }
        }
    }

    /// Deletes the previous object of every moved resource, first. Returns the resources
    /// whose previous object could not be deleted, with why: they are not applied this pass.
    async fn move_out(
        &mut self,
        plan: &Plan<'_>,
        orphans: &mut Vec<String>,
    ) -> HashMap<ResourceId, String> {
        let mut blocked = HashMap::new();
        for entry in &plan.apply {
            let Step::Move { applied } = &entry.step else {
                continue;
            };
            let id = &entry.resource.id;
            match self.registry.delete(id, applied).await {
                Ok(d) => {
                    if let Deleted::LeftInPlace(why) = d {
                        orphans.push(format!("{id}: {why}"));
                    }
                    self.owned.remove(id);
                }
                Err(e) => {
                    blocked.insert(id.clone(), format!("removing the previous version: {e}"));
                }
            }
        }
        blocked
    }

    /// Records ownership of every resource about to be applied before acting, so a crash
    /// mid-apply still lets garbage collection find it.
    async fn record_ownership(&mut self, plan: &Plan<'_>, blocked: &HashMap<ResourceId, String>) {
        let mut owned_changed = false;
        for entry in &plan.apply {
            let r = entry.resource;
            if entry.step != Step::Keep
                && self.registry.supports(&r.spec).is_ok()
                && r.spec.validate().is_ok()
                && !blocked.contains_key(&r.id)
            {
                self.owned.insert(r.id.clone(), r.spec.clone());
                owned_changed = true;
                self.backoff.remove(&r.id);
            }
        }
        if owned_changed {
            match self.store.save_owned(&self.owned).await {
                Ok(()) => self.state_writable(),
                Err(e) => {
                    warn!(error = %e, "could not persist ownership records");
                    self.state_unwritable(&e);
                }
            }
        }
    }

    /// Works on every resource of the manifest, `concurrency` at a time: kept ones are
    /// observed (unless backing off), the others applied, blocked ones reported failed.
    /// A resource whose `restartOn` names one applied this pass goes after the rest.
    async fn work(
        &self,
        plan: &Plan<'_>,
        blocked: &HashMap<ResourceId, String>,
        now: Timestamp,
        instant_now: Instant,
    ) -> Vec<Outcome> {
        let items: Vec<WorkItem> = plan
            .apply
            .iter()
            .map(|entry| {
                let r = entry.resource;
                let unchanged = entry.step == Step::Keep;
                WorkItem {
                    resource: r.clone(),
                    prev: self.status.resources.get(&r.id).cloned(),
                    unchanged,
                    backing_off: unchanged
                        && self
                            .backoff
                            .get(&r.id)
                            .is_some_and(|b| b.until > instant_now),
                    blocked: blocked.get(&r.id).cloned(),
                }
            })
            .collect();
        let applied: HashSet<&ResourceId> = plan
            .apply
            .iter()
            .filter(|e| e.step != Step::Keep)
            .map(|e| &e.resource.id)
            .collect();
        let (first, after): (Vec<WorkItem>, Vec<WorkItem>) = items.into_iter().partition(|i| {
            !i.resource
                .spec
                .restart_on()
                .iter()
                .any(|d| applied.contains(d))
        });
        let mut out = Vec::with_capacity(first.len() + after.len());
        for wave in [first, after] {
            let registry = self.registry.clone();
            let done: Vec<Outcome> = futures::stream::iter(wave)
                .map(move |item| {
                    let registry = registry.clone();
                    async move { item.run(&registry, now).await }
                })
                .buffer_unordered(self.settings.concurrency)
                .collect()
                .await;
            out.extend(done);
        }
        out
    }

    /// Turns one resource's outcome into the status to report: counts a repaired drift,
    /// backs off a retryable failure, and forgets the backoff of a resource now Ready.
    fn settle(
        &mut self,
        o: Outcome,
        now: Timestamp,
        instant_now: Instant,
    ) -> (ResourceId, ResourceStatus) {
        if let Some(reason) = &o.drift {
            warn!(resource = %o.id, %reason, "drift repaired");
            self.status.drift_repairs += 1;
            self.status.last_drift = Some(Box::new(DriftEvent {
                resource: o.id.clone(),
                reason: reason.clone(),
                at: now,
            }));
        }
        let status = if o.retry {
            self.back_off(&o.id, o.status, now, instant_now)
        } else {
            if matches!(o.status, ResourceStatus::Ready { .. }) {
                self.backoff.remove(&o.id);
            }
            o.status
        };
        (o.id, status)
    }

    /// Delays the next try of a failed resource, longer after each failure, and puts when
    /// in its status.
    fn back_off(
        &mut self,
        id: &ResourceId,
        status: ResourceStatus,
        now: Timestamp,
        instant_now: Instant,
    ) -> ResourceStatus {
        let b = self.backoff.entry(id.clone()).or_insert(Backoff {
            attempts: 0,
            until: instant_now,
        });
        let delay = backoff_delay(
            b.attempts,
            self.settings.backoff_initial,
            self.settings.backoff_max,
        );
        b.attempts = b.attempts.saturating_add(1);
        b.until = instant_now + delay;
        match status {
            ResourceStatus::Failed { since, error, .. } => ResourceStatus::Failed {
                since,
                error,
                retry_after: Some(now.after(delay)),
                permanent: false,
            },
            other => other,
        }
    }

    fn update_status(
        &mut self,
        manifest: &AgentManifest,
        resources: BTreeMap<ResourceId, ResourceStatus>,
        orphans: Vec<String>,
        now: Timestamp,
    ) {
        let s = &mut self.status;
        s.manifest_generation = manifest.generation;
        let settled = manifest
            .resources
            .iter()
            .all(|r| resources.get(&r.id).is_some_and(ResourceStatus::is_settled));
        if settled {
            s.observed_generation = manifest.generation;
        }
        let not_ready: Vec<String> = resources
            .iter()
            .filter(|(_, st)| !st.is_ready())
            .map(|(id, st)| format!("{id} ({})", st.state_name()))
            .collect();
        let failed: Vec<String> = resources
            .iter()
            .filter(|(_, st)| matches!(st, ResourceStatus::Failed { .. }))
            .map(|(id, _)| id.to_string())
            .collect();
        s.resources = resources;
        if not_ready.is_empty() {
            s.set_condition("Ready", ConditionStatus::True, "AllResourcesReady", "", now);
        } else {
            s.set_condition(
                "Ready",
                ConditionStatus::False,
                "ResourcesNotReady",
                &not_ready.join(", "),
                now,
            );
        }
        if failed.is_empty() {
            s.set_condition("Degraded", ConditionStatus::False, "NoFailures", "", now);
        } else {
            s.set_condition(
                "Degraded",
                ConditionStatus::True,
                "ResourcesFailed",
                &failed.join(", "),
                now,
            );
        }
        if !orphans.is_empty() {
            s.set_condition(
                "OrphansLeft",
                ConditionStatus::True,
                "ChangedOutsideFleetlet",
                &orphans.join("; "),
                now,
            );
        }
    }

    /// Hands the status, if it changed, to the writer and to the state directory's
    /// [`StateStore::persist_status`].
    pub fn publish(&self, tx: &watch::Sender<AgentStatus>) {
        tx.send_if_modified(|s| {
            if *s == self.status {
                false
            } else {
                s.clone_from(&self.status);
                true
            }
        });
    }

    pub fn store(&self) -> &StateStore {
        &self.store
    }

    /// Runs passes until `stop` turns true: on start, on every accepted manifest, every
    /// drift interval, and when a backed-off resource is due.
    pub async fn run(
        mut self,
        mut candidates: mpsc::Receiver<Candidate>,
        status: watch::Sender<AgentStatus>,
        mut stop: watch::Receiver<bool>,
    ) -> Self {
        self.pass(START_TRIGGER).await;
        self.publish(&status);
        let drift = self.settings.drift_interval;
        let mut resync = tokio::time::interval_at(Instant::now() + drift, drift);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let retry_at = self
                .next_retry()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            // At most one probe-triggered pass a second, whatever the probes ask for.
            let probe_at = self
                .registry
                .next_wake()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))
                .max(Instant::now() + Duration::from_secs(1));
            tokio::select! {
                _ = crate::stopped(&mut stop) => break,
                c = candidates.recv() => {
                    let Some(c) = c else { break };
                    if self.offer(c) {
                        self.pass("manifest").await;
                    }
                }
                _ = resync.tick() => {
                    let reason = if self.retry_unpersisted() { "manifest" } else { "resync" };
                    self.pass(reason).await;
                }
                _ = tokio::time::sleep_until(retry_at) => self.pass("retry").await,
                _ = tokio::time::sleep_until(probe_at) => self.pass("probe").await,
            }
            self.publish(&status);
        }
        self
    }
}

/// Logs the end of a pass: at info once per start (the device has looked at everything it
/// runs), at debug otherwise.
fn log_pass_done(trigger: &'static str, started: std::time::Instant, manifest: &AgentManifest) {
    let elapsed_ms = started.elapsed().as_millis() as u64;
    if trigger == START_TRIGGER {
        info!(
            trigger,
            elapsed_ms,
            generation = manifest.generation,
            resources = manifest.resources.len(),
            "pass done"
        );
    } else {
        debug!(trigger, elapsed_ms, "pass done");
    }
}

fn failed(
    prev: Option<&ResourceStatus>,
    now: Timestamp,
    error: String,
    permanent: bool,
) -> ResourceStatus {
    let since = match prev {
        Some(ResourceStatus::Failed {
            since, error: e, ..
        }) if *e == error => *since,
        _ => now,
    };
    ResourceStatus::Failed {
        since,
        error,
        retry_after: None,
        permanent,
    }
}

fn ready(
    prev: Option<&ResourceStatus>,
    now: Timestamp,
    details: fleetlet_protocol::ResourceDetails,
) -> ResourceStatus {
    let since = match prev {
        Some(ResourceStatus::Ready { since, details: d }) if **d == details => *since,
        _ => now,
    };
    ResourceStatus::ready(since, details)
}

/// One resource's work in a pass, with everything it needs owned (it runs concurrently).
struct WorkItem {
    resource: ManagedResource,
    prev: Option<ResourceStatus>,
    unchanged: bool,
    backing_off: bool,
    blocked: Option<String>,
}

impl WorkItem {
    async fn run(self, registry: &Registry, now: Timestamp) -> Outcome {
        let prev = self.prev.as_ref();
        if let Some(error) = self.blocked {
            return Outcome {
                id: self.resource.id,
                status: failed(prev, now, error, false),
                drift: None,
                retry: true,
            };
        }
        if self.backing_off
            && let Some(prev) = self.prev
        {
            return Outcome {
                id: self.resource.id,
                status: prev,
                drift: None,
                retry: false,
            };
        }
        work_on(registry, &self.resource, prev, self.unchanged, now).await
    }
}

/// Works on one resource: observe if unchanged, apply if needed, report.
async fn work_on(
    registry: &Registry,
    r: &ManagedResource,
    prev: Option<&ResourceStatus>,
    unchanged: bool,
    now: Timestamp,
) -> Outcome {
    let id = r.id.clone();
    if let Err(message) = registry.supports(&r.spec) {
        let kind = r.spec.kind_key().to_owned();
        return Outcome {
            id,
            status: ResourceStatus::Unsupported { kind, message },
            drift: None,
            retry: false,
        };
    }
    if let Err(e) = r.spec.validate() {
        return Outcome {
            id,
            status: failed(prev, now, format!("invalid: {e}"), true),
            drift: None,
            retry: false,
        };
    }
    let mut drift = None;
    if unchanged {
        match registry.observe(&id, &r.spec).await {
            Ok(Observation::InSync(details)) => {
                return Outcome {
                    id,
                    status: ready(prev, now, details),
                    drift: None,
                    retry: false,
                };
            }
            Ok(found) => {
                // Only something that was Ready has drifted; otherwise it never converged.
                if prev.is_some_and(ResourceStatus::is_ready) {
                    drift = Some(match found {
                        Observation::Differs(why) => why,
                        _ => "absent".into(),
                    });
                }
            }
            Err(e) => return fail(id, prev, now, e),
        }
    }
    match registry.reconcile(&id, &r.spec).await {
        Ok(details) => Outcome {
            id,
            status: ready(prev, now, details),
            drift,
            retry: false,
        },
        Err(e) => {
            let mut o = fail(id, prev, now, e);
            o.drift = drift;
            o
        }
    }
}

fn fail(
    id: ResourceId,
    prev: Option<&ResourceStatus>,
    now: Timestamp,
    e: ReconcileError,
) -> Outcome {
    if let ReconcileError::InProgress(message) = e {
        let since = match prev {
            Some(ResourceStatus::Reconciling { since, .. }) => *since,
            _ => now,
        };
        return Outcome {
            id,
            status: ResourceStatus::Reconciling {
                since,
                message: Some(message),
            },
            drift: None,
            retry: false,
        };
    }
    let retry = e.is_retryable();
    debug!(resource = %id, category = e.category(), error = %e, "resource failed");
    Outcome {
        id,
        status: failed(prev, now, e.to_string(), !retry),
        drift: None,
        retry,
    }
}

/// Exponential backoff with ±20% jitter, capped.
pub fn backoff_delay(attempts: u32, initial: Duration, max: Duration) -> Duration {
    let base = initial.saturating_mul(1u32 << attempts.min(20)).min(max);
    let jitter = 0.8 + fastrand::f64() * 0.4;
    base.mul_f64(jitter).min(max)
}

#[cfg(test)]
mod tests {
    use fleetlet_protocol::{
        DeviceId, FileContent, FileSpec, Owner, OwnerKind, ShellJobSpec, encode,
    };

    use super::*;
    use crate::config::Config;

    fn file(path: &str, text: &str) -> ResourceSpec {
        ResourceSpec::File(FileSpec {
            path: path.into(),
            content: FileContent::Text(text.into()),
            mode: None,
            owner: None,
            group: None,
        })
    }

    fn resource(id: &str, spec: ResourceSpec) -> ManagedResource {
        ManagedResource {
            id: ResourceId::new(id).unwrap(),
            owner: Owner {
                kind: OwnerKind::EdgeManifest,
                namespace: "default".into(),
                name: "m".into(),
                generation: 1,
                uid: None,
            },
            spec,
        }
    }

    fn manifest(device: &str, generation: u64, resources: Vec<ManagedResource>) -> AgentManifest {
        let mut m = AgentManifest::new(DeviceId::new(device).unwrap(), generation);
        m.resources = resources;
        m
    }

    fn owned(entries: &[(&str, ResourceSpec)]) -> Owned {
        entries
            .iter()
            .map(|(id, spec)| (ResourceId::new(*id).unwrap(), spec.clone()))
            .collect()
    }

    /// As the reconcilers decide: a File moves with its path, and any kind change moves.
    fn moves(old: &ResourceSpec, new: &ResourceSpec) -> bool {
        match (old, new) {
            (ResourceSpec::File(a), ResourceSpec::File(b)) => a.path != b.path,
            (a, b) => a.kind() != b.kind(),
        }
    }

    fn steps<'p>(plan: &'p Plan<'_>) -> Vec<(&'p str, &'p Step)> {
        plan.apply
            .iter()
            .map(|e| (e.resource.id.as_str(), &e.step))
            .collect()
    }

    fn removed<'p>(plan: &'p Plan<'_>) -> Vec<(&'p str, &'p ResourceSpec)> {
        plan.remove
            .iter()
            .map(|r| (r.id.as_str(), &r.applied))
            .collect()
    }

    #[test]
    fn the_plan_adds_changes_moves_keeps_and_removes() {
        let applied = owned(&[
            ("zz-gone", file("/etc/fleetlet/zz", "1")),
            ("keep", file("/etc/fleetlet/keep", "1")),
            ("change", file("/etc/fleetlet/change", "1")),
            ("moved", file("/etc/fleetlet/old", "1")),
            ("a-gone", file("/etc/fleetlet/a", "1")),
        ]);
        let m = manifest(
            "pi-1",
            2,
            vec![
                resource("moved", file("/etc/fleetlet/new", "1")),
                resource("add", file("/etc/fleetlet/add", "1")),
                resource("keep", file("/etc/fleetlet/keep", "1")),
                resource("change", file("/etc/fleetlet/change", "2")),
            ],
        );
        let plan = Plan::new(&m, &applied, moves);
        // In the manifest's order.
        assert_eq!(
            steps(&plan),
            [
                (
                    "moved",
                    &Step::Move {
                        applied: Box::new(file("/etc/fleetlet/old", "1"))
                    }
                ),
                ("add", &Step::Add),
                ("keep", &Step::Keep),
                ("change", &Step::Change),
            ]
        );
        // In id order, each with the spec to delete.
        assert_eq!(
            removed(&plan),
            [
                ("a-gone", &file("/etc/fleetlet/a", "1")),
                ("zz-gone", &file("/etc/fleetlet/zz", "1")),
            ]
        );
    }

    #[test]
    fn a_kind_change_under_the_same_id_is_a_move() {
        let applied = owned(&[("job", file("/etc/fleetlet/job", "1"))]);
        let job = ResourceSpec::ShellJob(ShellJobSpec {
            command: vec!["/bin/true".into()],
            timeout_seconds: None,
        });
        let m = manifest("pi-1", 2, vec![resource("job", job)]);
        let plan = Plan::new(&m, &applied, moves);
        assert_eq!(
            steps(&plan),
            [(
                "job",
                &Step::Move {
                    applied: Box::new(file("/etc/fleetlet/job", "1"))
                }
            )]
        );
        assert!(plan.remove.is_empty());
    }

    #[test]
    fn only_a_changed_spec_asks_whether_it_moves() {
        let applied = owned(&[
            ("same", file("/etc/fleetlet/same", "1")),
            ("other", file("/etc/fleetlet/other", "1")),
        ]);
        let m = manifest(
            "pi-1",
            2,
            vec![
                resource("same", file("/etc/fleetlet/same", "1")),
                resource("other", file("/etc/fleetlet/other", "2")),
            ],
        );
        let always = Plan::new(&m, &applied, |_, _| true);
        assert_eq!(
            steps(&always),
            [
                ("same", &Step::Keep),
                (
                    "other",
                    &Step::Move {
                        applied: Box::new(file("/etc/fleetlet/other", "1"))
                    }
                ),
            ]
        );
        let never = Plan::new(&m, &applied, |_, _| false);
        assert_eq!(
            steps(&never),
            [("same", &Step::Keep), ("other", &Step::Change)]
        );
    }

    #[test]
    fn an_empty_manifest_removes_all_and_nothing_owned_adds_all() {
        let applied = owned(&[("a", file("/etc/fleetlet/a", "1"))]);
        let empty = manifest("pi-1", 2, Vec::new());
        let plan = Plan::new(&empty, &applied, moves);
        assert!(plan.apply.is_empty());
        assert_eq!(removed(&plan), [("a", &file("/etc/fleetlet/a", "1"))]);

        let m = manifest("pi-1", 2, vec![resource("a", file("/etc/fleetlet/a", "1"))]);
        let plan = Plan::new(&m, &Owned::new(), moves);
        assert_eq!(steps(&plan), [("a", &Step::Add)]);
        assert!(plan.remove.is_empty());
    }

    fn engine(dir: &std::path::Path) -> Engine {
        let mut c = Config::new("pi-1", vec!["nats://127.0.0.1:4222".into()]);
        c.state_dir = dir.to_path_buf();
        c.trust.allow_unsigned = true;
        let settings = Arc::new(c.validate().unwrap());
        let sealing = crate::sealing::SealingKey::load_or_create(dir).unwrap();
        let registry = Registry::from_settings(&settings, sealing);
        Engine::new(settings, registry, StateStore::open(dir).unwrap()).unwrap()
    }

    fn refusal(e: &Engine, m: &AgentManifest) -> (&'static str, Option<u64>) {
        let err = e.check(&encode(m).unwrap()).unwrap_err();
        (err.reason, err.generation)
    }

    #[test]
    fn check_says_why_a_manifest_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut e = engine(dir.path());
        let err = e.check(b"{not json").unwrap_err();
        assert_eq!(err.generation, None, "{err}");
        let (reason, generation) = refusal(&e, &manifest("pi-2", 3, Vec::new()));
        assert_eq!((reason, generation), ("WrongDevice", Some(3)));

        let m = manifest("pi-1", 3, vec![resource("a", file("/etc/fleetlet/a", "1"))]);
        let value = Bytes::from(encode(&m).unwrap());
        assert_eq!(e.check(&value).unwrap(), Checked::New(m.clone()));
        assert!(e.offer(Candidate::Put { revision: 1, value }));
        assert_eq!(e.check(&encode(&m).unwrap()).unwrap(), Checked::InForce);
        let reused = manifest("pi-1", 3, Vec::new());
        assert_eq!(refusal(&e, &reused), ("GenerationReused", Some(3)));
        let stale = manifest("pi-1", 2, Vec::new());
        assert_eq!(refusal(&e, &stale), ("StaleGeneration", Some(2)));
        assert!(!e.offer(Candidate::Put {
            revision: 2,
            value: encode(&stale).unwrap().into(),
        }));
        let rejection = e.status().last_rejection.clone().unwrap();
        assert_eq!(
            (
                rejection.reason.as_str(),
                rejection.generation,
                rejection.revision
            ),
            ("StaleGeneration", Some(2), 2)
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let (i, m) = (Duration::from_secs(1), Duration::from_secs(60));
        let d0 = backoff_delay(0, i, m);
        assert!(
            d0 >= Duration::from_millis(800) && d0 <= Duration::from_millis(1200),
            "{d0:?}"
        );
        let d3 = backoff_delay(3, i, m);
        assert!(
            d3 >= Duration::from_millis(6400) && d3 <= Duration::from_millis(9600),
            "{d3:?}"
        );
        assert!(backoff_delay(30, i, m) <= m);
    }
}
