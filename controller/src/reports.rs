//! What changed in the devices' reports since the last pass, as Events to publish: a
//! manifest the agent refused, a resource that started failing, drift found and repaired.
//!
//! Pure: [`Reports::changes`] compares each device's newest status with what it saw last
//! and returns what is new. The fleet loop publishes them (rate-limited) on the EdgeDevice
//! and on the EdgeManifest that owns the resource.

use std::collections::{BTreeMap, HashMap};

use fleetlet_protocol::{AgentManifest, AgentStatus, DeviceId, OwnerKind, ResourceId};

/// One thing a device reported that is worth an Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub device: DeviceId,
    /// The EdgeManifests (`namespace/name`) it concerns; empty for the device alone.
    pub manifests: Vec<String>,
    /// Event reason: `ManifestRejected`, `ResourceFailed` or `DriftRepaired`.
    pub reason: &'static str,
    pub warning: bool,
    pub note: String,
}

#[derive(Debug, Clone, Default)]
struct Seen {
    revision: u64,
    rejection: Option<(u64, String)>,
    drift_repairs: u64,
    failing: BTreeMap<ResourceId, String>,
}

/// What was last seen of each device.
#[derive(Debug, Default)]
pub struct Reports {
    seen: HashMap<DeviceId, Seen>,
    /// False until the first call: what devices reported before the controller started is
    /// taken as known, so a restart does not replay a fleet's worth of Events.
    primed: bool,
}

impl Seen {
    /// What is compared from one pass to the next of a device's status `s`.
    fn of(revision: u64, s: &AgentStatus) -> Self {
        Seen {
            revision,
            rejection: s
                .last_rejection
                .as_ref()
                .map(|r| (r.revision, r.reason.clone())),
            drift_repairs: s.drift_repairs,
            failing: s
                .resources
                .iter()
                .filter_map(|(id, st)| st.failure().map(|e| (id.clone(), e.to_owned())))
                .collect(),
        }
    }
}

fn owner_of(desired: Option<&AgentManifest>, id: &ResourceId) -> Vec<String> {
    desired
        .and_then(|m| m.resource(id.as_str()))
        .filter(|r| r.owner.kind == OwnerKind::EdgeManifest)
        .map(|r| vec![format!("{}/{}", r.owner.namespace, r.owner.name)])
        .unwrap_or_default()
}

/// Every EdgeManifest (`namespace/name`, sorted, once each) with a resource in `desired`:
/// a refused manifest concerns them all.
fn manifests_of(desired: Option<&AgentManifest>) -> Vec<String> {
    desired
        .map(|m| {
            let mut v: Vec<String> = m
                .resources
                .iter()
                .filter(|r| r.owner.kind == OwnerKind::EdgeManifest)
                .map(|r| format!("{}/{}", r.owner.namespace, r.owner.name))
                .collect();
            v.sort();
            v.dedup();
            v
        })
        .unwrap_or_default()
}

/// `ManifestRejected` when `s` carries a refusal other than the one seen `before`.
fn rejection_report(
    device: &DeviceId,
    s: &AgentStatus,
    before: &Seen,
    now: &Seen,
    desired: Option<&AgentManifest>,
) -> Option<Report> {
    let r = s.last_rejection.as_ref()?;
    if before.rejection == now.rejection {
        return None;
    }
    Some(Report {
        device: device.clone(),
        manifests: manifests_of(desired),
        reason: "ManifestRejected",
        warning: true,
        note: format!(
            "device {device} refused manifest{} ({}): {}; it keeps running what it had",
            r.generation
                .map(|g| format!(" generation {g}"))
                .unwrap_or_default(),
            r.reason,
            r.message
        ),
    })
}

/// `ResourceFailed` for each resource failing `now` that was not, or with another error,
/// `before`.
fn failure_reports(
    device: &DeviceId,
    s: &AgentStatus,
    before: &Seen,
    now: &Seen,
    desired: Option<&AgentManifest>,
) -> Vec<Report> {
    now.failing
        .iter()
        .filter(|(id, error)| before.failing.get(*id) != Some(*error))
        .map(|(id, error)| {
            let permanent = s
                .resources
                .get(id)
                .is_some_and(|st| st.is_permanent_failure());
            Report {
                device: device.clone(),
                manifests: owner_of(desired, id),
                reason: "ResourceFailed",
                warning: true,
                note: format!(
                    "{id} on device {device}: {error} ({})",
                    if permanent {
                        "permanent: waits for a new spec"
                    } else {
                        "retried"
                    }
                ),
            }
        })
        .collect()
}

/// `DriftRepaired` when the device repaired drift since `before`, naming the last one.
fn drift_report(
    device: &DeviceId,
    s: &AgentStatus,
    before: &Seen,
    now: &Seen,
    desired: Option<&AgentManifest>,
) -> Option<Report> {
    let drift = s.last_drift.as_ref()?;
    if now.drift_repairs <= before.drift_repairs {
        return None;
    }
    Some(Report {
        device: device.clone(),
        manifests: owner_of(desired, &drift.resource),
        reason: "DriftRepaired",
        warning: false,
        note: format!(
            "{} on device {device} was changed outside fleetlet ({}) and put back; {} repair(s) in all",
            drift.resource, drift.reason, now.drift_repairs
        ),
    })
}

impl Reports {
    /// What is new in `statuses` (revision and value per device) since the last call.
    pub fn changes<'a, 'b>(
        &mut self,
        statuses: impl Iterator<Item = (&'a DeviceId, u64, &'a AgentStatus)>,
        desired: impl Fn(&DeviceId) -> Option<&'b AgentManifest>,
    ) -> Vec<Report> {
        let mut out = Vec::new();
        let primed = std::mem::replace(&mut self.primed, true);
        for (device, revision, s) in statuses {
            let now = Seen::of(revision, s);
            let before = self.seen.get(device);
            if before.is_some_and(|b| b.revision == revision) {
                continue;
            }
            if !primed {
                self.seen.insert(device.clone(), now);
                continue;
            }
            let before = before.cloned().unwrap_or_default();
            let d = desired(device);
            out.extend(rejection_report(device, s, &before, &now, d));
            out.extend(failure_reports(device, s, &before, &now, d));
            out.extend(drift_report(device, s, &before, &now, d));
            self.seen.insert(device.clone(), now);
        }
        out
    }

    /// Forgets devices that are gone.
    pub fn retain(&mut self, keep: impl Fn(&DeviceId) -> bool) {
        self.seen.retain(|d, _| keep(d));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetlet_protocol::{
        DriftEvent, FileContent, FileSpec, ManagedResource, Owner, Rejection, ResourceSpec,
        ResourceStatus, Timestamp,
    };

    fn id(s: &str) -> DeviceId {
        DeviceId::new(s).unwrap()
    }

    fn desired() -> HashMap<DeviceId, AgentManifest> {
        let mut m = AgentManifest::new(id("a"), 1);
        m.resources.push(ManagedResource {
            id: ResourceId::new("f").unwrap(),
            owner: Owner {
                kind: OwnerKind::EdgeManifest,
                namespace: "ns".into(),
                name: "m".into(),
                generation: 1,
                uid: None,
            },
            spec: ResourceSpec::File(FileSpec {
                path: "/etc/f".into(),
                content: FileContent::Text("x".into()),
                mode: None,
                owner: None,
                group: None,
            }),
        });
        HashMap::from([(id("a"), m)])
    }

    #[test]
    fn only_what_is_new_is_reported_and_a_restart_replays_nothing() {
        let d = desired();
        let a = id("a");
        let mut r = Reports::default();
        let mut s = AgentStatus::new(a.clone());
        s.resources.insert(
            ResourceId::new("f").unwrap(),
            ResourceStatus::Failed {
                since: Timestamp::now(),
                error: "forbidden: outside the allowed roots".into(),
                retry_after: None,
                permanent: true,
            },
        );
        // What was there before the first pass is known already.
        assert!(
            r.changes([(&a, 1, &s)].into_iter(), |x| d.get(x))
                .is_empty()
        );
        // Same revision, or a new revision with the same failure: nothing.
        assert!(
            r.changes([(&a, 1, &s)].into_iter(), |x| d.get(x))
                .is_empty()
        );
        assert!(
            r.changes([(&a, 2, &s)].into_iter(), |x| d.get(x))
                .is_empty()
        );
        // A different error, a refusal and a drift repair: three reports.
        s.resources.insert(
            ResourceId::new("f").unwrap(),
            ResourceStatus::Failed {
                since: Timestamp::now(),
                error: "disk full".into(),
                retry_after: Some(Timestamp::now()),
                permanent: false,
            },
        );
        s.last_rejection = Some(Box::new(Rejection {
            generation: Some(9),
            revision: 7,
            reason: "WrongDevice".into(),
            message: "for b".into(),
            at: Timestamp::now(),
        }));
        s.drift_repairs = 1;
        s.last_drift = Some(Box::new(DriftEvent {
            resource: ResourceId::new("f").unwrap(),
            reason: "content changed".into(),
            at: Timestamp::now(),
        }));
        let got = r.changes([(&a, 3, &s)].into_iter(), |x| d.get(x));
        let reasons: Vec<&str> = got.iter().map(|g| g.reason).collect();
        assert_eq!(
            reasons,
            ["ManifestRejected", "ResourceFailed", "DriftRepaired"]
        );
        assert!(got.iter().all(|g| g.manifests == ["ns/m"]));
        assert!(got[1].note.contains("disk full") && got[1].note.contains("retried"));
        assert!(
            r.changes([(&a, 4, &s)].into_iter(), |x| d.get(x))
                .is_empty()
        );
    }

    #[test]
    fn a_refusal_concerns_each_edge_manifest_of_the_device_once() {
        let mut d = desired().remove(&id("a")).unwrap();
        let mut other = d.resources[0].clone();
        other.owner.namespace = "alpha".into();
        d.resources.push(other.clone());
        d.resources.push(other.clone());
        other.owner.kind = OwnerKind::Pod;
        other.owner.namespace = "pods".into();
        d.resources.push(other);
        assert_eq!(manifests_of(Some(&d)), ["alpha/m", "ns/m"]);
        assert!(manifests_of(None).is_empty());
    }

    #[test]
    fn each_report_says_what_is_new_and_nothing_once_seen() {
        let d = desired();
        let a = id("a");
        let mut s = AgentStatus::new(a.clone());
        s.resources.insert(
            ResourceId::new("f").unwrap(),
            ResourceStatus::Failed {
                since: Timestamp::now(),
                error: "forbidden".into(),
                retry_after: None,
                permanent: true,
            },
        );
        s.last_rejection = Some(Box::new(Rejection {
            generation: None,
            revision: 7,
            reason: "Malformed".into(),
            message: "bad json".into(),
            at: Timestamp::now(),
        }));
        s.drift_repairs = 2;
        s.last_drift = Some(Box::new(DriftEvent {
            resource: ResourceId::new("f").unwrap(),
            reason: "content changed".into(),
            at: Timestamp::now(),
        }));
        let now = Seen::of(5, &s);
        assert_eq!(now.rejection, Some((7, "Malformed".to_string())));
        let before = Seen::default();
        let m = d.get(&a);
        let r = rejection_report(&a, &s, &before, &now, m).unwrap();
        assert_eq!(
            r.note,
            "device a refused manifest (Malformed): bad json; it keeps running what it had"
        );
        assert_eq!(r.manifests, ["ns/m"]);
        let f = failure_reports(&a, &s, &before, &now, m);
        assert_eq!(f.len(), 1);
        assert_eq!(
            f[0].note,
            "f on device a: forbidden (permanent: waits for a new spec)"
        );
        let r = drift_report(&a, &s, &before, &now, m).unwrap();
        assert_eq!(
            r.note,
            "f on device a was changed outside fleetlet (content changed) and put back; 2 repair(s) in all"
        );
        assert!(!r.warning);
        assert!(rejection_report(&a, &s, &now, &now, m).is_none());
        assert!(failure_reports(&a, &s, &now, &now, m).is_empty());
        assert!(drift_report(&a, &s, &now, &now, m).is_none());
    }
}
