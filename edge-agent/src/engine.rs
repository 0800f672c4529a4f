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
                self.last_seen_revision = revision;
                // Removing a device from the fleet is not an instruction to destroy its
                // workloads: keep running the last manifest and say so.
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
                false
            }
            Candidate::Floor { generation } => {
                info!(generation, "freshness floor set");
                self.floor = Some(generation);
                match self.unverified.take() {
                    Some((revision, value)) => self.offer(Candidate::Put { revision, value }),
                    None => false,
                }
            }
            Candidate::Put { revision, value } => {
                self.last_seen_revision = revision;
                if self.needs_floor() {
                    let message = "the device remembers no manifest and waits for the control \
                                   plane's freshness floor before accepting one"
                        .to_string();
                    if self.unverified.is_none() {
                        warn!(revision, "{message}");
                    }
                    self.status.last_rejection = Some(Rejection {
                        generation: None,
                        revision,
                        reason: "FreshnessUnverified".to_owned(),
                        message,
                        at: Timestamp::now(),
                    });
                    self.unverified = Some((revision, value));
                    return false;
                }
                match self.check(&value) {
                    Ok(None) => false,
                    Ok(Some(manifest)) => {
                        info!(
                            generation = manifest.generation,
                            revision,
                            resources = manifest.resources.len(),
                            "manifest accepted"
                        );
                        let generation = manifest.generation;
                        let stored = StoredManifest { revision, manifest };
                        // What runs is what is on disk: a manifest that cannot be stored
                        // is not applied (a restart would bring back the old one while
                        // its resources stayed), and the last good state stays in force.
                        if let Err(e) = self.store.save_manifest(&stored) {
                            let message = format!("the manifest could not be stored: {e}");
                            warn!(generation, revision, error = %e, "state directory refused the manifest; keeping the last one");
                            self.state_unwritable(&e);
                            self.status.last_rejection = Some(Rejection {
                                generation: Some(generation),
                                revision,
                                reason: "StateNotWritable".to_owned(),
                                message,
                                at: Timestamp::now(),
                            });
                            self.unpersisted = Some((revision, value));
                            return false;
                        }
                        self.unpersisted = None;
                        self.state_writable();
                        self.status.manifest_generation = stored.manifest.generation;
                        self.status.conditions.retain(|c| {
                            c.type_ != "DesiredStateDeleted" && c.type_ != "OrphansLeft"
                        });
                        self.current = Some(stored);
                        true
                    }
                    Err((reason, message, generation)) => {
                        warn!(revision, reason, %message, "manifest refused");
                        self.status.last_rejection = Some(Rejection {
                            generation,
                            revision,
                            reason: reason.to_owned(),
                            message,
                            at: Timestamp::now(),
                        });
                        false
                    }
                }
            }
        }
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

    /// `Ok(None)`: already in force. `Err((reason, message, generation))`: refused.
    #[allow(clippy::type_complexity)]
    fn check(
        &self,
        value: &[u8],
    ) -> Result<Option<AgentManifest>, (&'static str, String, Option<u64>)> {
        if value.len() > self.settings.max_manifest_bytes {
            let e = DecodeError::TooLarge {
                what: "AgentManifest",
                size: value.len(),
                limit: self.settings.max_manifest_bytes,
            };
            return Err((e.reason(), e.to_string(), None));
        }
        let m = decode::<AgentManifest>(value).map_err(|e| (e.reason(), e.to_string(), None))?;
        let generation = Some(m.generation);
        crate::trust::verify(
            &self.settings.manifest_keys,
            self.settings.allow_unsigned,
            value,
            &m,
        )
        .map_err(|(reason, message)| (reason, message, generation))?;
        if m.device != self.settings.device {
            return Err((
                "WrongDevice",
                format!(
                    "manifest is for device {:?}, this is {:?}",
                    m.device.as_str(),
                    self.settings.device.as_str()
                ),
                generation,
            ));
        }
        if let Some(floor) = self.floor
            && self.current.is_none()
            && m.generation < floor
        {
            return Err((
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
                return Err((
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
                    return Ok(None);
                }
                return Err((
                    "GenerationReused",
                    format!("generation {have} is already in force with different contents"),
                    generation,
                ));
            }
        }
        Ok(Some(m))
    }

    /// Earliest time a backed-off resource may be retried.
    pub fn next_retry(&self) -> Option<Instant> {
        self.backoff.values().map(|b| b.until).min()
    }

    /// One full pass over every resource.
    #[instrument(skip(self), fields(device = %self.settings.device, generation = self.status.manifest_generation))]
    pub async fn pass(&mut self, trigger: &'static str) {
        let started = std::time::Instant::now();
        let Some(current) = self.current.clone() else {
            debug!("no manifest yet");
            return;
        };
        let manifest = &current.manifest;
        let now = Timestamp::now();
        let mut resources: BTreeMap<ResourceId, ResourceStatus> = BTreeMap::new();
        let mut orphans = Vec::new();

        // Garbage collection: what this agent applied and the manifest no longer holds.
        let desired_ids: HashSet<&ResourceId> = manifest.resources.iter().map(|r| &r.id).collect();
        let gone: Vec<(ResourceId, ResourceSpec)> = self
            .owned
            .iter()
            .filter(|(id, _)| !desired_ids.contains(id))
            .map(|(id, s)| (id.clone(), s.clone()))
            .collect();
        for (id, applied) in gone {
            match self.registry.delete(&id, &applied).await {
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
                    self.owned.remove(&id);
                    self.backoff.remove(&id);
                }
                Err(e) => {
                    warn!(resource = %id, error = %e, "could not delete resource no longer in the manifest");
                    resources.insert(
                        id,
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

        // Moves (a File's new path, a kind change): the old object goes first.
        let mut blocked: HashMap<ResourceId, String> = HashMap::new();
        for r in &manifest.resources {
            let Some(old) = self.owned.get(&r.id).cloned() else {
                continue;
            };
            if old == r.spec || !self.registry.moves(&old, &r.spec) {
                continue;
            }
            match self.registry.delete(&r.id, &old).await {
                Ok(d) => {
                    if let Deleted::LeftInPlace(why) = d {
                        orphans.push(format!("{}: {why}", r.id));
                    }
                    self.owned.remove(&r.id);
                }
                Err(e) => {
                    blocked.insert(r.id.clone(), format!("removing the previous version: {e}"));
                }
            }
        }

        // Record ownership before acting, so a crash mid-apply still lets GC find it.
        let mut unchanged: HashSet<ResourceId> = HashSet::new();
        let mut owned_changed = false;
        for r in &manifest.resources {
            if self.owned.get(&r.id) == Some(&r.spec) {
                unchanged.insert(r.id.clone());
            } else if self.registry.supports(&r.spec).is_ok()
                && r.spec.validate().is_ok()
                && !blocked.contains_key(&r.id)
            {
                self.owned.insert(r.id.clone(), r.spec.clone());
                owned_changed = true;
                self.backoff.remove(&r.id);
            }
        }
        if owned_changed {
            match self.store.save_owned(&self.owned) {
                Ok(()) => self.state_writable(),
                Err(e) => {
                    warn!(error = %e, "could not persist ownership records");
                    self.state_unwritable(&e);
                }
            }
        }

        let instant_now = Instant::now();
        let items: Vec<WorkItem> = manifest
            .resources
            .iter()
            .map(|r| {
                let unchanged = unchanged.contains(&r.id);
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
        let registry = self.registry.clone();
        let outcomes: Vec<Outcome> = futures::stream::iter(items)
            .map(move |item| {
                let registry = registry.clone();
                async move { item.run(&registry, now).await }
            })
            .buffer_unordered(self.settings.concurrency)
            .collect()
            .await;

        for o in outcomes {
            if let Some(reason) = &o.drift {
                warn!(resource = %o.id, %reason, "drift repaired");
                self.status.drift_repairs += 1;
                self.status.last_drift = Some(DriftEvent {
                    resource: o.id.clone(),
                    reason: reason.clone(),
                    at: now,
                });
            }
            let status = if o.retry {
                let b = self.backoff.entry(o.id.clone()).or_insert(Backoff {
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
                match o.status {
                    ResourceStatus::Failed { since, error, .. } => ResourceStatus::Failed {
                        since,
                        error,
                        retry_after: Some(now.after(delay)),
                        permanent: false,
                    },
                    other => other,
                }
            } else {
                if matches!(o.status, ResourceStatus::Ready { .. }) {
                    self.backoff.remove(&o.id);
                }
                o.status
            };
            resources.insert(o.id, status);
        }

        self.update_status(manifest, resources, orphans, now);
        let elapsed_ms = started.elapsed().as_millis() as u64;
        if trigger == START_TRIGGER {
            // Once per start: the device has looked at everything it runs.
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

    /// Persists the status if it changed and hands it to the writer.
    pub fn publish(&self, tx: &watch::Sender<AgentStatus>) {
        let changed = tx.send_if_modified(|s| {
            if *s == self.status {
                false
            } else {
                s.clone_from(&self.status);
                true
            }
        });
        if changed && let Err(e) = self.store.save_status(&self.status) {
            warn!(error = %e, "could not persist status");
        }
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
        Some(ResourceStatus::Ready { since, details: d }) if *d == details => *since,
        _ => now,
    };
    ResourceStatus::Ready { since, details }
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
    use super::*;

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
