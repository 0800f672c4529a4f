//! What every device should get, computed from plain views of the cluster and of KV.
//!
//! No I/O here: the fleet loop builds the views, calls [`plan`], and writes the result.
//!
//! Rules, in the order they apply:
//! 1. An EdgeManifest selects the EdgeDevices of its namespace whose labels match its
//!    selector, plus those it names. One being deleted selects nothing.
//! 2. Manifests are ranked by age (creation time, then namespace/name). On each device, a
//!    resource whose id, file path or unit name is already claimed by an older manifest is
//!    a conflict: the older manifest keeps it and the newer one's resource is left out.
//! 3. Rollout: a device already running a manifest's previous generation moves to the new
//!    one only while fewer than `maxUnavailable` of the manifest's online devices are moved
//!    but not yet Ready. Offline devices move at once and never count against the budget
//!    (they pick the manifest up when they return), so they cannot stall a rollout.
//!    `paused` moves nobody. A device that never had the manifest gets it at once.
//! 4. A paused EdgeDevice keeps whatever it has.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use fleetlet_crds::{IntOrString, LabelSelector, ResourceTemplate};
use fleetlet_protocol::{
    AgentManifest, AgentStatus, DeviceId, ManagedResource, Owner, OwnerKind, ResourceId,
    ResourceSpec, ResourceStatus,
};

use crate::selector;

/// An EdgeDevice as the planner sees it.
#[derive(Debug, Clone)]
pub struct DeviceView {
    pub id: DeviceId,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub paused: bool,
    /// Heartbeat seen recently enough to count the device as online.
    pub online: bool,
}

/// An EdgeManifest as the planner sees it.
#[derive(Debug, Clone)]
pub struct ManifestView {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
    pub generation: i64,
    /// Sortable creation time (RFC 3339); oldest wins conflicts.
    pub created: String,
    pub selector: Option<LabelSelector>,
    pub devices: Vec<String>,
    pub resources: Vec<ResourceTemplate>,
    pub deleting: bool,
    pub max_unavailable: Option<IntOrString>,
    pub paused: bool,
}

impl ManifestView {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    fn selects(&self, d: &DeviceView) -> bool {
        !self.deleting
            && self.namespace == d.namespace
            && (self.devices.iter().any(|n| n == d.id.as_str())
                || self
                    .selector
                    .as_ref()
                    .is_some_and(|s| selector::matches(s, &d.labels)))
    }

    fn owns(&self, owner: &Owner) -> bool {
        owner.kind == OwnerKind::EdgeManifest
            && owner.namespace == self.namespace
            && owner.name == self.name
    }

    fn managed(&self, t: &ResourceTemplate) -> ManagedResource {
        ManagedResource {
            id: t.id.clone(),
            owner: Owner {
                kind: OwnerKind::EdgeManifest,
                namespace: self.namespace.clone(),
                name: self.name.clone(),
                generation: self.generation,
                uid: self.uid.clone(),
            },
            spec: t.spec.clone(),
        }
    }

    /// The rollout budget for `targeted` devices: at least one, so a rollout can always move.
    fn budget(&self, targeted: usize) -> usize {
        let n = match &self.max_unavailable {
            None => targeted,
            Some(IntOrString::Int(i)) => usize::try_from(*i).unwrap_or(0),
            Some(IntOrString::String(s)) => match s
                .strip_suffix('%')
                .and_then(|p| p.trim().parse::<f64>().ok())
            {
                Some(pct) => (targeted as f64 * pct.clamp(0.0, 100.0) / 100.0).floor() as usize,
                None => s.trim().parse().unwrap_or(1),
            },
        };
        n.max(1)
    }
}

/// What KV says about a device.
#[derive(Debug, Clone, Default)]
pub struct DeviceState {
    /// The AgentManifest currently stored for it.
    pub desired: Option<AgentManifest>,
    /// Its last reported status.
    pub actual: Option<AgentStatus>,
}

/// Two manifests want the same thing on one device.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Conflict {
    pub device: DeviceId,
    /// What collides: `id <x>`, `file <path>` or `unit <name>`.
    pub identity: String,
    /// The older manifest, which keeps the resource.
    pub kept_by: String,
    /// The newer manifest, whose resource is left out on this device.
    pub refused: String,
}

/// Rollout progress of one manifest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    pub targeted: u32,
    /// Devices whose planned manifest carries this generation.
    pub updated: u32,
    /// Updated devices that report every resource of this manifest Ready.
    pub ready: u32,
    /// Devices reporting a resource of this manifest Failed.
    pub failed: u32,
    /// Online devices at this generation that are not Ready yet (what holds the rollout).
    pub waiting_on: Vec<DeviceId>,
    /// Devices still at an older generation.
    pub pending: Vec<DeviceId>,
}

#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Desired resources per device, sorted by id. Paused devices are absent (left as is).
    pub devices: BTreeMap<DeviceId, Vec<ManagedResource>>,
    pub conflicts: Vec<Conflict>,
    pub progress: BTreeMap<String, Progress>,
}

fn identities(r: &ManagedResource) -> Vec<String> {
    let mut out = vec![format!("id {}", r.id)];
    match &r.spec {
        ResourceSpec::File(f) => out.push(format!("file {}", f.path)),
        ResourceSpec::SystemdUnit(u) => out.push(format!("unit {}", u.name)),
        _ => {}
    }
    out
}

fn ready_on(state: Option<&DeviceState>, ids: &BTreeSet<ResourceId>) -> (bool, bool) {
    let Some(DeviceState {
        desired: Some(d),
        actual: Some(a),
    }) = state
    else {
        return (false, false);
    };
    let failed = ids
        .iter()
        .any(|id| matches!(a.resources.get(id), Some(ResourceStatus::Failed { .. })));
    let ready = a.observed_generation >= d.generation
        && a.device == d.device
        && ids
            .iter()
            .all(|id| a.resources.get(id).is_some_and(ResourceStatus::is_ready));
    (ready, failed)
}

/// Computes every device's resources, the conflicts, and each manifest's rollout progress.
pub fn plan(
    devices: &[DeviceView],
    manifests: &[ManifestView],
    state: &HashMap<DeviceId, DeviceState>,
) -> Plan {
    let mut ranked: Vec<&ManifestView> = manifests.iter().collect();
    ranked.sort_by(|a, b| {
        (&a.created, &a.namespace, &a.name).cmp(&(&b.created, &b.namespace, &b.name))
    });

    let mut out = Plan::default();
    let mut per_device: BTreeMap<&DeviceId, Vec<ManagedResource>> =
        devices.iter().map(|d| (&d.id, Vec::new())).collect();
    let mut claims: HashMap<&DeviceId, HashMap<String, String>> = HashMap::new();

    for m in &ranked {
        let mkey = m.key();
        let mut targets: Vec<&DeviceView> = devices.iter().filter(|d| m.selects(d)).collect();
        targets.sort_by(|a, b| a.id.cmp(&b.id));
        if m.deleting {
            continue;
        }
        let mut progress = Progress {
            targeted: targets.len() as u32,
            ..Default::default()
        };

        // First pass: where each target stands.
        struct Target<'a> {
            device: &'a DeviceView,
            new: Vec<ManagedResource>,
            old: Vec<ManagedResource>,
            updated: bool,
        }
        let mut rows = Vec::with_capacity(targets.len());
        for d in targets {
            let device_claims = claims.entry(&d.id).or_default();
            let mut new = Vec::new();
            for t in &m.resources {
                let r = m.managed(t);
                let clash = identities(&r)
                    .into_iter()
                    .find_map(|i| device_claims.get(&i).map(|owner| (i, owner.clone())));
                match clash {
                    Some((identity, kept_by)) => out.conflicts.push(Conflict {
                        device: d.id.clone(),
                        identity,
                        kept_by,
                        refused: mkey.clone(),
                    }),
                    None => new.push(r),
                }
            }
            let old: Vec<ManagedResource> = state
                .get(&d.id)
                .and_then(|s| s.desired.as_ref())
                .map(|cur| {
                    cur.resources
                        .iter()
                        .filter(|r| m.owns(&r.owner))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            let old: Vec<ManagedResource> = old
                .into_iter()
                .filter(|r| identities(r).iter().all(|i| !device_claims.contains_key(i)))
                .collect();
            let updated = sorted(new.clone()) == sorted(old.clone());
            rows.push(Target {
                device: d,
                new,
                old,
                updated,
            });
        }

        // Second pass: spend the rollout budget.
        let ids_of =
            |rs: &[ManagedResource]| rs.iter().map(|r| r.id.clone()).collect::<BTreeSet<_>>();
        let mut unavailable = 0usize;
        for row in rows.iter().filter(|r| r.updated) {
            let (ready, failed) = ready_on(state.get(&row.device.id), &ids_of(&row.new));
            progress.updated += 1;
            progress.ready += u32::from(ready);
            progress.failed += u32::from(failed);
            if !ready && row.device.online {
                unavailable += 1;
                progress.waiting_on.push(row.device.id.clone());
            }
        }
        let mut budget = m
            .budget(progress.targeted as usize)
            .saturating_sub(unavailable);
        for row in rows {
            let chosen = if row.updated {
                row.new
            } else if row.old.is_empty() && !m.paused {
                // Nothing of this manifest there yet: adding it disrupts nothing.
                progress.updated += 1;
                if row.device.online {
                    progress.waiting_on.push(row.device.id.clone());
                }
                row.new
            } else if m.paused {
                progress.pending.push(row.device.id.clone());
                row.old
            } else if !row.device.online {
                progress.updated += 1;
                row.new
            } else if budget > 0 {
                budget -= 1;
                progress.updated += 1;
                progress.waiting_on.push(row.device.id.clone());
                row.new
            } else {
                progress.pending.push(row.device.id.clone());
                row.old
            };
            let device_claims = claims.entry(&row.device.id).or_default();
            for r in &chosen {
                for i in identities(r) {
                    device_claims.insert(i, mkey.clone());
                }
            }
            if let Some(v) = per_device.get_mut(&row.device.id) {
                v.extend(chosen);
            }
        }
        out.progress.insert(mkey, progress);
    }

    for d in devices {
        if d.paused {
            continue;
        }
        let resources = per_device.remove(&d.id).unwrap_or_default();
        out.devices.insert(d.id.clone(), sorted(resources));
    }
    out.conflicts.sort();
    out.conflicts.dedup();
    out
}

/// A Pod bound to a device's virtual node, already translated into resources.
#[derive(Debug, Clone)]
pub struct PodView {
    pub device: DeviceId,
    /// `namespace/name`, for conflicts.
    pub key: String,
    pub resources: Vec<ManagedResource>,
}

/// Adds pods' resources to their devices. Manifests keep what they claimed first: a pod
/// resource with the same id, file path or unit name is left out and reported.
pub fn add_pods(p: &mut Plan, pods: &[PodView]) {
    for pod in pods {
        let Some(resources) = p.devices.get_mut(&pod.device) else {
            continue; // unknown or paused device
        };
        let taken: HashMap<String, String> = resources
            .iter()
            .flat_map(|r| {
                let owner = format!("{}/{}", r.owner.namespace, r.owner.name);
                identities(r).into_iter().map(move |i| (i, owner.clone()))
            })
            .collect();
        for r in &pod.resources {
            match identities(r)
                .into_iter()
                .find_map(|i| taken.get(&i).map(|o| (i, o.clone())))
            {
                Some((identity, kept_by)) => p.conflicts.push(Conflict {
                    device: pod.device.clone(),
                    identity,
                    kept_by,
                    refused: format!("pod {}", pod.key),
                }),
                None => resources.push(r.clone()),
            }
        }
        resources.sort_by(|a, b| a.id.cmp(&b.id));
    }
}

fn sorted(mut v: Vec<ManagedResource>) -> Vec<ManagedResource> {
    v.sort_by(|a, b| a.id.cmp(&b.id));
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetlet_protocol::{ConditionStatus, FileContent, FileSpec, ResourceDetails, Timestamp};

    fn dev(id: &str, labels: &[(&str, &str)]) -> DeviceView {
        DeviceView {
            id: DeviceId::new(id).unwrap(),
            namespace: "ns".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            paused: false,
            online: true,
        }
    }

    fn file(id: &str, path: &str) -> ResourceTemplate {
        ResourceTemplate {
            id: ResourceId::new(id).unwrap(),
            spec: ResourceSpec::File(FileSpec {
                path: path.into(),
                content: FileContent::Text("x".into()),
                mode: None,
                owner: None,
                group: None,
            }),
        }
    }

    fn manifest(
        name: &str,
        created: &str,
        role: Option<&str>,
        names: &[&str],
        resources: Vec<ResourceTemplate>,
    ) -> ManifestView {
        ManifestView {
            namespace: "ns".into(),
            name: name.into(),
            uid: None,
            generation: 1,
            created: created.into(),
            selector: role.map(|r| LabelSelector {
                match_labels: Some([("role".to_string(), r.to_string())].into()),
                match_expressions: None,
            }),
            devices: names.iter().map(|n| n.to_string()).collect(),
            resources,
            deleting: false,
            max_unavailable: None,
            paused: false,
        }
    }

    fn ids(p: &Plan, d: &str) -> Vec<String> {
        p.devices[&DeviceId::new(d).unwrap()]
            .iter()
            .map(|r| r.id.to_string())
            .collect()
    }

    #[test]
    fn selection_by_labels_and_names_and_union_of_manifests() {
        let devices = [
            dev("a", &[("role", "sensor")]),
            dev("b", &[("role", "gw")]),
            dev("c", &[]),
        ];
        let ms = [
            manifest(
                "sensors",
                "1",
                Some("sensor"),
                &[],
                vec![file("s", "/etc/s")],
            ),
            manifest("named", "2", None, &["b", "a"], vec![file("n", "/etc/n")]),
        ];
        let p = plan(&devices, &ms, &HashMap::new());
        assert_eq!(ids(&p, "a"), ["n", "s"]);
        assert_eq!(ids(&p, "b"), ["n"]);
        assert!(
            ids(&p, "c").is_empty(),
            "an unselected device gets an empty manifest"
        );
        let owner = &p.devices[&DeviceId::new("a").unwrap()][1].owner;
        assert_eq!((owner.name.as_str(), owner.generation), ("sensors", 1));
        assert_eq!(p.progress["ns/sensors"].targeted, 1);
        assert_eq!(p.progress["ns/named"].targeted, 2);
    }

    #[test]
    fn other_namespaces_and_deleting_manifests_select_nothing() {
        let mut d = dev("a", &[("role", "sensor")]);
        d.namespace = "other".into();
        let mut m = manifest("m", "1", Some("sensor"), &["a"], vec![file("x", "/etc/x")]);
        assert!(plan(&[d.clone()], &[m.clone()], &HashMap::new()).devices[&d.id].is_empty());
        d.namespace = "ns".into();
        m.deleting = true;
        assert!(plan(&[d.clone()], &[m], &HashMap::new()).devices[&d.id].is_empty());
    }

    #[test]
    fn the_older_manifest_keeps_a_contested_id_or_path() {
        let devices = [dev("a", &[("role", "sensor")])];
        let ms = [
            manifest(
                "young",
                "2026-02",
                Some("sensor"),
                &[],
                vec![file("cfg", "/etc/y"), file("other", "/etc/shared")],
            ),
            manifest(
                "old",
                "2026-01",
                Some("sensor"),
                &[],
                vec![file("cfg", "/etc/o"), file("mine", "/etc/shared")],
            ),
        ];
        let p = plan(&devices, &ms, &HashMap::new());
        let a = &p.devices[&DeviceId::new("a").unwrap()];
        assert_eq!(a.len(), 2);
        assert!(a.iter().all(|r| r.owner.name == "old"));
        assert_eq!(
            p.conflicts
                .iter()
                .map(|c| (c.identity.as_str(), c.kept_by.as_str(), c.refused.as_str()))
                .collect::<Vec<_>>(),
            [
                ("file /etc/shared", "ns/old", "ns/young"),
                ("id cfg", "ns/old", "ns/young")
            ]
        );
    }

    fn state_at(
        devices: &[&str],
        m: &ManifestView,
        generation: i64,
        ready: bool,
    ) -> HashMap<DeviceId, DeviceState> {
        devices
            .iter()
            .map(|d| {
                let id = DeviceId::new(*d).unwrap();
                let mut mv = m.clone();
                mv.generation = generation;
                let resources: Vec<ManagedResource> =
                    mv.resources.iter().map(|t| mv.managed(t)).collect();
                let mut desired = AgentManifest::new(id.clone(), 7);
                desired.resources = resources.clone();
                let mut actual = AgentStatus::new(id.clone());
                actual.observed_generation = 7;
                for r in &resources {
                    actual.resources.insert(
                        r.id.clone(),
                        if ready {
                            ResourceStatus::Ready {
                                since: Timestamp(1),
                                details: ResourceDetails::File {
                                    sha256: String::new(),
                                    size: 1,
                                },
                            }
                        } else {
                            ResourceStatus::Pending
                        },
                    );
                }
                actual.set_condition("Ready", ConditionStatus::True, "r", "", Timestamp(1));
                (
                    id,
                    DeviceState {
                        desired: Some(desired),
                        actual: Some(actual),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn max_unavailable_moves_devices_a_few_at_a_time() {
        let devices = [
            dev("a", &[("role", "s")]),
            dev("b", &[("role", "s")]),
            dev("c", &[("role", "s")]),
        ];
        let mut m = manifest("m", "1", Some("s"), &[], vec![file("f", "/etc/f")]);
        let state = state_at(&["a", "b", "c"], &m, 1, true);
        m.generation = 2;
        m.max_unavailable = Some(IntOrString::Int(1));
        let p = plan(&devices, &[m.clone()], &state);
        let gens: Vec<i64> = ["a", "b", "c"]
            .iter()
            .map(|d| p.devices[&DeviceId::new(*d).unwrap()][0].owner.generation)
            .collect();
        assert_eq!(gens, [2, 1, 1], "one device moves, two wait");
        let pr = &p.progress["ns/m"];
        assert_eq!((pr.updated, pr.pending.len()), (1, 2));
        assert_eq!(pr.waiting_on, [DeviceId::new("a").unwrap()]);

        // While a is at generation 2 but not Ready, nobody else moves.
        let mut state2 = state.clone();
        state2.extend(state_at(&["a"], &m, 2, false));
        let p = plan(&devices, &[m.clone()], &state2);
        let gens: Vec<i64> = ["a", "b", "c"]
            .iter()
            .map(|d| p.devices[&DeviceId::new(*d).unwrap()][0].owner.generation)
            .collect();
        assert_eq!(gens, [2, 1, 1]);
        // Once a is Ready, the next one moves.
        state2.extend(state_at(&["a"], &m, 2, true));
        let p = plan(&devices, &[m.clone()], &state2);
        let gens: Vec<i64> = ["a", "b", "c"]
            .iter()
            .map(|d| p.devices[&DeviceId::new(*d).unwrap()][0].owner.generation)
            .collect();
        assert_eq!(gens, [2, 2, 1]);
        assert_eq!(p.progress["ns/m"].ready, 1);
    }

    #[test]
    fn offline_devices_move_at_once_and_paused_rollouts_move_nobody() {
        let mut devices = vec![dev("a", &[("role", "s")]), dev("b", &[("role", "s")])];
        devices[1].online = false;
        let mut m = manifest("m", "1", Some("s"), &[], vec![file("f", "/etc/f")]);
        let state = state_at(&["a", "b"], &m, 1, true);
        m.generation = 2;
        m.max_unavailable = Some(IntOrString::String("10%".into()));
        let p = plan(&devices, &[m.clone()], &state);
        let gens: Vec<i64> = ["a", "b"]
            .iter()
            .map(|d| p.devices[&DeviceId::new(*d).unwrap()][0].owner.generation)
            .collect();
        assert_eq!(
            gens,
            [2, 2],
            "10% of 2 rounds to the minimum of 1; the offline device does not count"
        );

        m.paused = true;
        let p = plan(&devices, &[m], &state);
        let gens: Vec<i64> = ["a", "b"]
            .iter()
            .map(|d| p.devices[&DeviceId::new(*d).unwrap()][0].owner.generation)
            .collect();
        assert_eq!(gens, [1, 1]);
        assert_eq!(p.progress["ns/m"].pending.len(), 2);
    }

    #[test]
    fn paused_devices_are_left_alone() {
        let mut d = dev("a", &[("role", "s")]);
        d.paused = true;
        let p = plan(
            &[d.clone()],
            &[manifest(
                "m",
                "1",
                Some("s"),
                &[],
                vec![file("f", "/etc/f")],
            )],
            &HashMap::new(),
        );
        assert!(!p.devices.contains_key(&d.id));
    }
}
