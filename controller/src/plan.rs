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
//! 5. Limits: a device's manifest stays within what the device accepts (resources and
//!    bytes, from its facts). In age order, a manifest whose resources would take a
//!    device over is left out there: the device keeps what it runs of that manifest if
//!    that still fits, else nothing of it. Older manifests keep flowing.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use fleetlet_crds::{IntOrString, LabelSelector, ResourceTemplate};
use fleetlet_protocol::{
    AgentManifest, AgentStatus, DeviceId, DeviceLimits, ManagedResource, Owner, OwnerKind,
    ResourceId, ResourceSpec, ResourceStatus,
};

use crate::selector;

/// An EdgeDevice as the planner sees it: its namespace and labels borrowed from the
/// stored object (a pass holds a view of every device at once, and a copied label map is
/// a whole B-tree node).
#[derive(Debug, Clone)]
pub struct DeviceView<'a> {
    pub id: DeviceId,
    pub namespace: Cow<'a, str>,
    pub labels: Cow<'a, BTreeMap<String, String>>,
    pub paused: bool,
    /// Heartbeat seen recently enough to count the device as online.
    pub online: bool,
    /// What the device accepts (from its facts, bounded; the defaults before it has one).
    pub limits: DeviceLimits,
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

    fn selects(&self, d: &DeviceView<'_>) -> bool {
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
    /// The AgentManifest currently stored for it (shared with the cache).
    pub desired: Option<std::sync::Arc<AgentManifest>>,
    /// Its last reported status.
    pub actual: Option<std::sync::Arc<AgentStatus>>,
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

/// A manifest (or pod) left out on a device because it would take the device over its limits.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct OverLimit {
    pub device: DeviceId,
    /// `namespace/name` of the manifest, or `pod namespace/name`.
    pub refused: String,
    /// Which limit, with the numbers: `513 resources, the device accepts 512`.
    pub limit: String,
    /// Whether the device keeps what it already ran of it.
    pub kept_previous: bool,
}

/// One resource failing on one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub device: DeviceId,
    pub resource: ResourceId,
    pub error: String,
    /// Only a new spec can change it.
    pub permanent: bool,
}

/// What a device's manifest holds so far, against its limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub resources: usize,
    pub bytes: u64,
}

/// Bytes the stored manifest spends besides its resources: the envelope, the signature,
/// the device id, generation and times. Generous, so an estimate never exceeds the limit.
pub const MANIFEST_OVERHEAD_BYTES: u64 = 2048;

/// What `r` adds to the stored manifest, in bytes: its JSON, escaped as it is inside a
/// signed envelope (a string holding the manifest's text), and a separator.
pub fn cost(r: &ManagedResource) -> u64 {
    let text = serde_json::to_string(r).unwrap_or_default();
    let escaped = serde_json::to_string(&text).map_or(text.len() * 2, |e| e.len());
    escaped as u64 + 1
}

impl Usage {
    /// Whether `rs` fits beside what is there, or else which limit it breaks.
    fn check<'r>(
        &self,
        rs: impl IntoIterator<Item = &'r ManagedResource>,
        limits: &DeviceLimits,
    ) -> Result<Usage, String> {
        let (count, added) = rs
            .into_iter()
            .fold((0, 0), |(n, b), r| (n + 1, b + cost(r)));
        self.add(count, added, limits)
    }

    /// Whether `count` resources of `added` bytes ([`cost`]) fit beside what is there, or
    /// else which limit they break.
    fn add(&self, count: usize, added: u64, limits: &DeviceLimits) -> Result<Usage, String> {
        let resources = self.resources + count;
        let bytes = self.bytes + added;
        if resources > limits.max_resources as usize {
            Err(format!(
                "{resources} resources, the device accepts {}",
                limits.max_resources
            ))
        } else if bytes + MANIFEST_OVERHEAD_BYTES > limits.max_manifest_bytes {
            Err(format!(
                "{} bytes of manifest, the device accepts {}",
                bytes + MANIFEST_OVERHEAD_BYTES,
                limits.max_manifest_bytes
            ))
        } else {
            Ok(Usage { resources, bytes })
        }
    }
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
    /// Devices where the manifest is left out: it would take them over their limits.
    pub over_limit: Vec<DeviceId>,
    /// Resources of this manifest failing on updated devices, by device then resource.
    pub failures: Vec<Failure>,
}

#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Desired resources per device, sorted by id. Paused devices are absent (left as is).
    pub devices: BTreeMap<DeviceId, Vec<ManagedResource>>,
    pub conflicts: Vec<Conflict>,
    pub over_limit: Vec<OverLimit>,
    pub progress: BTreeMap<String, Progress>,
    /// What each device's manifest holds, against its limits.
    pub usage: HashMap<DeviceId, Usage>,
    /// Each device's limits, for what is added after the plan (pods).
    pub limits: HashMap<DeviceId, DeviceLimits>,
}

fn identities(r: &ManagedResource) -> Vec<String> {
    let mut out = vec![format!("id {}", r.id)];
    // Every kind is listed, so a new kind has to say what two manifests can collide on.
    match &r.spec {
        ResourceSpec::File(f) => out.push(format!("file {}", f.path)),
        ResourceSpec::SystemdUnit(u) => out.push(format!("unit {}", u.name)),
        ResourceSpec::NetworkConfig(n) => {
            out.push(format!("interface {}", n.interface));
            // The VLAN device one interface declares (its .netdev); the VLAN's own
            // settings are another resource's `interface`.
            out.extend(n.vlans.iter().map(|v| format!("vlan {}", v.name)));
        }
        // A container is named after its id (covered above); a job only runs.
        // One agent binary per device.
        ResourceSpec::AgentUpgrade(_) => out.push("agent version".to_owned()),
        ResourceSpec::Container(_) | ResourceSpec::ShellJob(_) | ResourceSpec::Unsupported(_) => {}
    }
    out
}

/// Whether the device reports every resource of `ids` Ready, and those it reports failing.
fn ready_on(
    device: &DeviceId,
    state: Option<&DeviceState>,
    ids: &BTreeSet<ResourceId>,
) -> (bool, Vec<Failure>) {
    let Some(DeviceState {
        desired: Some(d),
        actual: Some(a),
    }) = state
    else {
        return (false, Vec::new());
    };
    if a.device != d.device {
        return (false, Vec::new());
    }
    let failures = ids
        .iter()
        .filter_map(|id| {
            let st = a.resources.get(id)?;
            let error = st.failure()?;
            Some(Failure {
                device: device.clone(),
                resource: id.clone(),
                error: error.to_owned(),
                permanent: st.is_permanent_failure(),
            })
        })
        .collect();
    let ready = a.observed_generation >= d.generation
        && ids
            .iter()
            .all(|id| a.resources.get(id).is_some_and(ResourceStatus::is_ready));
    (ready, failures)
}

/// Computes every device's resources, the conflicts, and each manifest's rollout progress.
pub fn plan(
    devices: &[DeviceView<'_>],
    manifests: &[ManifestView],
    state: &HashMap<DeviceId, DeviceState>,
) -> Plan {
    let mut ranked: Vec<&ManifestView> = manifests.iter().collect();
    ranked.sort_by(|a, b| {
        (&a.created, &a.namespace, &a.name).cmp(&(&b.created, &b.namespace, &b.name))
    });

    let mut out = Plan {
        limits: devices.iter().map(|d| (d.id.clone(), d.limits)).collect(),
        ..Plan::default()
    };
    let mut per_device: BTreeMap<&DeviceId, Vec<ManagedResource>> =
        devices.iter().map(|d| (&d.id, Vec::new())).collect();
    // Each manifest's resources are the same on every device it reaches: made once a pass,
    // with what each claims and costs. A manifest being deleted reaches none.
    let prepared: Vec<Vec<Prepared>> = ranked
        .iter()
        .map(|m| {
            if m.deleting {
                return Vec::new();
            }
            m.resources
                .iter()
                .map(|t| Prepared::new(m.managed(t)))
                .collect()
        })
        .collect();
    let keys: Vec<String> = ranked.iter().map(|m| m.key()).collect();
    let index = DeviceIndex::new(devices);
    // Identity → the rank of the manifest that holds it, per device: older manifests claim
    // first.
    let mut claims: HashMap<&DeviceId, Claims<'_>> = HashMap::new();
    let no_claims = Claims::new();

    for (rank, m) in ranked.iter().enumerate().filter(|(_, m)| !m.deleting) {
        let mkey = &keys[rank];
        let mut targets = index.selected_by(m);
        targets.sort_by(|a, b| a.id.cmp(&b.id));
        let mut progress = Progress {
            targeted: targets.len() as u32,
            ..Default::default()
        };
        // First: where each target stands.
        let rows: Vec<Target<'_>> = targets
            .into_iter()
            .map(|d| {
                let held = claims.get(&d.id).unwrap_or(&no_claims);
                let on = Claimed { held, keys: &keys };
                target(m, mkey, d, &prepared[rank], &on, state, &mut out)
            })
            .collect();
        // Then: spend the rollout budget.
        let unavailable = count_updated(&rows, state, &mut progress);
        let mut budget = m
            .budget(progress.targeted as usize)
            .saturating_sub(unavailable);
        for row in rows {
            let id = &row.device.id;
            let new_bytes = row.new_bytes;
            let new_is_prepared = row.new_is_prepared;
            let (chosen, is_new) = choose(row, m, &mut budget, &mut progress);
            let device_claims = claims.entry(id).or_default();
            if is_new && new_is_prepared {
                // Every prepared resource: their identities borrowed.
                for i in prepared[rank].iter().flat_map(|p| &p.identities) {
                    device_claims.insert(Cow::Borrowed(i.as_str()), rank);
                }
            } else {
                for r in &chosen {
                    for i in identities(r) {
                        device_claims.insert(Cow::Owned(i), rank);
                    }
                }
            }
            let usage = out.usage.entry(id.clone()).or_default();
            usage.resources += chosen.len();
            usage.bytes += if is_new {
                new_bytes
            } else {
                chosen.iter().map(cost).sum::<u64>()
            };
            if let Some(v) = per_device.get_mut(id) {
                v.reserve_exact(chosen.len());
                v.extend(chosen);
            }
        }
        out.progress.insert(mkey.clone(), progress);
    }

    for d in devices {
        if d.paused {
            continue;
        }
        let resources = per_device.remove(&d.id).unwrap_or_default();
        out.devices.insert(d.id.clone(), by_id(resources));
    }
    out.conflicts.sort();
    out.conflicts.dedup();
    out.over_limit.sort();
    out
}

/// Where one targeted device stands for one manifest.
struct Target<'a> {
    device: &'a DeviceView<'a>,
    /// What the manifest wants there now (less what older manifests hold).
    new: Vec<ManagedResource>,
    /// What `new` adds to the stored manifest, in bytes.
    new_bytes: u64,
    /// `new` is every resource of the manifest (none left out for a conflict or limits).
    new_is_prepared: bool,
    /// What the device's desired state holds of the manifest today (borrowed from it: a
    /// copy is made only where the pass keeps the old resources).
    old: Vec<&'a ManagedResource>,
    /// `new` is already what the device has.
    updated: bool,
    /// Left out for the device's limits; `new` holds what it keeps instead.
    over: bool,
}

/// A manifest's resource as every device gets it, with the identities it claims there and
/// what it adds to a stored manifest ([`cost`]).
struct Prepared {
    resource: ManagedResource,
    identities: Vec<String>,
    cost: u64,
}

impl Prepared {
    fn new(resource: ManagedResource) -> Self {
        Self {
            identities: identities(&resource),
            cost: cost(&resource),
            resource,
        }
    }
}

/// A device's claimed identities, each with the rank of the manifest that holds it.
type Claims<'p> = HashMap<Cow<'p, str>, usize>;

/// The identities older manifests hold on one device, and the manifests' keys by rank.
struct Claimed<'c, 'p> {
    held: &'c Claims<'p>,
    keys: &'c [String],
}

impl Claimed<'_, '_> {
    /// The key of the manifest holding `identity`, if one does.
    fn holder(&self, identity: &str) -> Option<&str> {
        self.held
            .get(identity)
            .and_then(|rank| self.keys.get(*rank))
            .map(String::as_str)
    }
}

/// The devices by namespace and label, so a manifest's selector looks at the devices that
/// carry one of its `matchLabels` pairs instead of at the whole fleet.
struct DeviceIndex<'d> {
    devices: &'d [DeviceView<'d>],
    by_label: HashMap<(&'d str, &'d str, &'d str), Vec<usize>>,
    /// By namespace and name, for the devices a manifest names outright.
    by_name: HashMap<(&'d str, &'d str), usize>,
}

impl<'d> DeviceIndex<'d> {
    fn new(devices: &'d [DeviceView<'d>]) -> Self {
        let mut by_label: HashMap<(&str, &str, &str), Vec<usize>> = HashMap::new();
        for (i, d) in devices.iter().enumerate() {
            for (k, v) in d.labels.iter() {
                by_label
                    .entry((d.namespace.as_ref(), k.as_str(), v.as_str()))
                    .or_default()
                    .push(i);
            }
        }
        let by_name = devices
            .iter()
            .enumerate()
            .map(|(i, d)| ((d.namespace.as_ref(), d.id.as_str()), i))
            .collect();
        Self {
            devices,
            by_label,
            by_name,
        }
    }

    /// The devices `m` selects, in no particular order.
    fn selected_by(&self, m: &ManifestView) -> Vec<&'d DeviceView<'d>> {
        let pairs = m
            .selector
            .as_ref()
            .and_then(|s| s.match_labels.as_ref())
            .filter(|l| !l.is_empty());
        let Some(pairs) = pairs else {
            // No label every selected device must carry: look at each one.
            return self.devices.iter().filter(|d| m.selects(d)).collect();
        };
        // Every device the selector matches carries each pair: the rarest is enough to
        // look at, with the devices named outright.
        let narrowest = pairs
            .iter()
            .map(|(k, v)| {
                self.by_label
                    .get(&(m.namespace.as_str(), k.as_str(), v.as_str()))
                    .map_or(&[][..], Vec::as_slice)
            })
            .min_by_key(|c| c.len())
            .unwrap_or_default();
        let select = |i: &usize| self.devices.get(*i).filter(|d| m.selects(d));
        if m.devices.is_empty() {
            // The label's list holds each device once.
            return narrowest.iter().filter_map(select).collect();
        }
        let named = m
            .devices
            .iter()
            .filter_map(|n| self.by_name.get(&(m.namespace.as_str(), n.as_str())));
        let mut seen = std::collections::HashSet::new();
        narrowest
            .iter()
            .chain(named)
            .filter(|i| seen.insert(**i))
            .filter_map(select)
            .collect()
    }
}

/// Manifest `m` on device `d`, given its resources as prepared for every device and the
/// identities older manifests hold there: conflicts and limit refusals are recorded in
/// `out`.
fn target<'a>(
    m: &ManifestView,
    mkey: &str,
    d: &'a DeviceView<'a>,
    prepared: &[Prepared],
    claimed: &Claimed<'_, '_>,
    state: &'a HashMap<DeviceId, DeviceState>,
    out: &mut Plan,
) -> Target<'a> {
    // Exact sizes: a pass holds one of these per device and manifest at once, and a
    // growing Vec would reserve room for four resources where most manifests have one.
    let mut new = Vec::with_capacity(prepared.len());
    let mut new_bytes = 0;
    for p in prepared {
        let clash = p
            .identities
            .iter()
            .find_map(|i| claimed.holder(i).map(|owner| (i, owner)));
        match clash {
            Some((identity, kept_by)) => out.conflicts.push(Conflict {
                device: d.id.clone(),
                identity: identity.clone(),
                kept_by: kept_by.to_owned(),
                refused: mkey.to_string(),
            }),
            None => {
                new.push(p.resource.clone());
                new_bytes += p.cost;
            }
        }
    }
    let mut new_is_prepared = new.len() == prepared.len();
    let old: Vec<&ManagedResource> = state
        .get(&d.id)
        .and_then(|s| s.desired.as_ref())
        .map(|cur| {
            cur.resources
                .iter()
                .filter(|r| m.owns(&r.owner))
                .filter(|r| {
                    claimed.held.is_empty()
                        || identities(r).iter().all(|i| claimed.holder(i).is_none())
                })
                .collect()
        })
        .unwrap_or_default();
    // Limits: what older manifests hold on the device is settled; this one gets the room
    // that is left, or keeps what it had if that still fits.
    let usage = out.usage.get(&d.id).copied().unwrap_or_default();
    let mut over = false;
    if let Err(limit) = usage.add(new.len(), new_bytes, &d.limits) {
        over = true;
        let kept_previous = !old.is_empty() && usage.check(old.iter().copied(), &d.limits).is_ok();
        out.over_limit.push(OverLimit {
            device: d.id.clone(),
            refused: mkey.to_string(),
            limit,
            kept_previous,
        });
        new = if kept_previous {
            copied(&old)
        } else {
            Vec::new()
        };
        new_bytes = new.iter().map(cost).sum();
        new_is_prepared = false;
    }
    let updated = !over && by_id(new.iter().collect::<Vec<_>>()) == by_id(old.clone());
    Target {
        device: d,
        new,
        new_bytes,
        new_is_prepared,
        old,
        updated,
        over,
    }
}

/// Counts the devices that already run the manifest's current resources into `progress`;
/// returns how many of them are online and not ready (they use the rollout budget).
fn count_updated(
    rows: &[Target<'_>],
    state: &HashMap<DeviceId, DeviceState>,
    progress: &mut Progress,
) -> usize {
    let ids_of = |rs: &[ManagedResource]| rs.iter().map(|r| r.id.clone()).collect::<BTreeSet<_>>();
    let mut unavailable = 0usize;
    for row in rows.iter().filter(|r| r.updated) {
        let (ready, failures) =
            ready_on(&row.device.id, state.get(&row.device.id), &ids_of(&row.new));
        progress.updated += 1;
        progress.ready += u32::from(ready);
        progress.failed += u32::from(!failures.is_empty());
        progress.failures.extend(failures);
        if !ready && row.device.online {
            unavailable += 1;
            progress.waiting_on.push(row.device.id.clone());
        }
    }
    unavailable
}

/// What one device gets of manifest `m` this pass: the new resources (true), or the old
/// ones while the rollout is paused or out of budget (false).
fn choose(
    row: Target<'_>,
    m: &ManifestView,
    budget: &mut usize,
    progress: &mut Progress,
) -> (Vec<ManagedResource>, bool) {
    let id = row.device.id.clone();
    if row.updated {
        (row.new, true)
    } else if row.over {
        progress.over_limit.push(id);
        (row.new, true)
    } else if row.old.is_empty() && !m.paused {
        // Nothing of this manifest there yet: adding it disrupts nothing.
        progress.updated += 1;
        if row.device.online {
            progress.waiting_on.push(id);
        }
        (row.new, true)
    } else if m.paused {
        progress.pending.push(id);
        (copied(&row.old), false)
    } else if !row.device.online {
        progress.updated += 1;
        (row.new, true)
    } else if *budget > 0 {
        *budget -= 1;
        progress.updated += 1;
        progress.waiting_on.push(id);
        (row.new, true)
    } else {
        progress.pending.push(id);
        (copied(&row.old), false)
    }
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
        let mut admitted = Vec::new();
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
                None => admitted.push(r.clone()),
            }
        }
        // A pod is all or nothing against the device's limits.
        let limits = p.limits.get(&pod.device).copied().unwrap_or_default();
        let usage = p.usage.entry(pod.device.clone()).or_default();
        match usage.check(&admitted, &limits) {
            Ok(u) => {
                *usage = u;
                resources.extend(admitted);
            }
            Err(limit) => p.over_limit.push(OverLimit {
                device: pod.device.clone(),
                refused: format!("pod {}", pod.key),
                limit,
                kept_previous: false,
            }),
        }
        resources.sort_by(|a, b| a.id.cmp(&b.id));
    }
}

/// `v` (resources or references to them) in order of resource id.
fn by_id<R: std::borrow::Borrow<ManagedResource>>(mut v: Vec<R>) -> Vec<R> {
    v.sort_by(|a, b| a.borrow().id.cmp(&b.borrow().id));
    v
}

fn copied(v: &[&ManagedResource]) -> Vec<ManagedResource> {
    v.iter().map(|r| (*r).clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetlet_protocol::{ConditionStatus, FileContent, FileSpec, ResourceDetails, Timestamp};

    fn dev(id: &str, labels: &[(&str, &str)]) -> DeviceView<'static> {
        DeviceView {
            id: DeviceId::new(id).unwrap(),
            namespace: "ns".into(),
            labels: Cow::Owned(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            paused: false,
            online: true,
            limits: DeviceLimits::default(),
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

    /// The index finds what a look at every device finds: label pairs, expressions, names,
    /// other namespaces, an empty `matchLabels`, no selector, a pair no device carries.
    #[test]
    fn the_device_index_selects_what_a_scan_of_the_fleet_selects() {
        use fleetlet_crds::k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;
        let mut devices = Vec::new();
        for i in 0..60 {
            let mut d = dev(
                &format!("d{i}"),
                &[
                    ("role", ["sensor", "camera", "gate"][i % 3]),
                    ("site", ["home", "office"][i % 2]),
                ],
            );
            if i % 5 == 0 {
                d.namespace = "other".into();
            }
            devices.push(d);
        }
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let with = |names: &[&str],
                    ml: Option<BTreeMap<String, String>>,
                    ex: Option<Vec<LabelSelectorRequirement>>| {
            let mut m = manifest("m", "t", None, names, vec![]);
            if ml.is_some() || ex.is_some() {
                m.selector = Some(LabelSelector {
                    match_labels: ml,
                    match_expressions: ex,
                });
            }
            m
        };
        let not_home = Some(vec![LabelSelectorRequirement {
            key: "site".into(),
            operator: "NotIn".into(),
            values: Some(vec!["home".into()]),
        }]);
        let cases = [
            with(&[], Some(labels(&[("role", "sensor")])), None),
            with(
                &[],
                Some(labels(&[("role", "camera"), ("site", "home")])),
                None,
            ),
            with(&["d1", "d5", "d7"], Some(labels(&[("role", "gate")])), None),
            with(&["d1", "d5", "nobody"], None, None),
            with(&[], Some(labels(&[("role", "sensor")])), not_home.clone()),
            with(&[], None, not_home),
            with(&[], Some(BTreeMap::new()), None),
            with(&["d2"], Some(labels(&[("role", "drone")])), None),
        ];
        let index = DeviceIndex::new(&devices);
        for (n, m) in cases.iter().enumerate() {
            let mut found: Vec<&str> = index.selected_by(m).iter().map(|d| d.id.as_str()).collect();
            found.sort_unstable();
            let mut scanned: Vec<&str> = devices
                .iter()
                .filter(|d| m.selects(d))
                .map(|d| d.id.as_str())
                .collect();
            scanned.sort_unstable();
            assert_eq!(found, scanned, "case {n}");
        }
        // Not vacuous: the cases select some devices and leave others out.
        let sizes: Vec<usize> = cases.iter().map(|m| index.selected_by(m).len()).collect();
        assert_eq!(sizes, [16, 8, 18, 1, 8, 24, 48, 1]);
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

    #[test]
    fn the_older_manifest_keeps_a_contested_network_interface() {
        let net = |id: &str, address: &str| ResourceTemplate {
            id: ResourceId::new(id).unwrap(),
            spec: ResourceSpec::NetworkConfig(fleetlet_protocol::NetworkConfigSpec {
                interface: "eth0".into(),
                addresses: vec![address.into()],
                ..Default::default()
            }),
        };
        let devices = [dev("a", &[("role", "sensor")])];
        let ms = [
            manifest(
                "young",
                "2026-02",
                Some("sensor"),
                &[],
                vec![net("young-net", "10.0.0.2/24")],
            ),
            manifest(
                "old",
                "2026-01",
                Some("sensor"),
                &[],
                vec![net("old-net", "10.0.0.1/24")],
            ),
        ];
        let p = plan(&devices, &ms, &HashMap::new());
        assert_eq!(p.conflicts.len(), 1, "{:?}", p.conflicts);
        assert_eq!(p.conflicts[0].identity, "interface eth0");
        assert_eq!(p.conflicts[0].kept_by, "ns/old");
        assert_eq!(ids(&p, "a"), ["old-net"]);
    }

    #[test]
    fn a_vlan_declared_twice_is_a_conflict_and_its_own_settings_are_not() {
        use fleetlet_protocol::{NetworkConfigSpec, VlanSpec};
        let net = |id: &str, interface: &str, vlan: Option<&str>| ResourceTemplate {
            id: ResourceId::new(id).unwrap(),
            spec: ResourceSpec::NetworkConfig(NetworkConfigSpec {
                interface: interface.into(),
                vlans: vlan
                    .map(|v| VlanSpec {
                        name: v.into(),
                        id: 30,
                    })
                    .into_iter()
                    .collect(),
                ..Default::default()
            }),
        };
        let devices = [dev("a", &[("role", "sensor")])];
        let ms = [
            manifest(
                "old",
                "2026-01",
                Some("sensor"),
                &[],
                vec![net("wired", "eth0", Some("eth0.30"))],
            ),
            manifest(
                "vlan-settings",
                "2026-02",
                Some("sensor"),
                &[],
                vec![net("cameras", "eth0.30", None)],
            ),
            manifest(
                "young",
                "2026-03",
                Some("sensor"),
                &[],
                vec![net("wireless", "wlan0", Some("eth0.30"))],
            ),
        ];
        let p = plan(&devices, &ms, &HashMap::new());
        assert_eq!(p.conflicts.len(), 1, "{:?}", p.conflicts);
        assert_eq!(p.conflicts[0].identity, "vlan eth0.30");
        assert_eq!(p.conflicts[0].kept_by, "ns/old");
        assert_eq!(ids(&p, "a"), ["cameras", "wired"]);
    }

    #[test]
    fn the_older_manifest_keeps_a_contested_unit_name() {
        use fleetlet_protocol::{SystemdUnitSpec, UnitState};
        let unit = |id: &str, contents: &str| ResourceTemplate {
            id: ResourceId::new(id).unwrap(),
            spec: ResourceSpec::SystemdUnit(SystemdUnitSpec {
                restart_on: Vec::new(),
                restart_digest: None,
                name: "app.service".into(),
                contents: Some(contents.into()),
                enabled: true,
                state: UnitState::Started,
            }),
        };
        let devices = [dev("a", &[("role", "sensor")])];
        let ms = [
            manifest(
                "young",
                "2026-02",
                Some("sensor"),
                &[],
                vec![unit("young-app", "[Service]\nExecStart=/young\n")],
            ),
            manifest(
                "old",
                "2026-01",
                Some("sensor"),
                &[],
                vec![unit("old-app", "[Service]\nExecStart=/old\n")],
            ),
        ];
        let p = plan(&devices, &ms, &HashMap::new());
        assert_eq!(
            p.conflicts,
            [Conflict {
                device: DeviceId::new("a").unwrap(),
                identity: "unit app.service".into(),
                kept_by: "ns/old".into(),
                refused: "ns/young".into(),
            }]
        );
        let a = &p.devices[&DeviceId::new("a").unwrap()];
        assert_eq!(ids(&p, "a"), ["old-app"]);
        let ResourceSpec::SystemdUnit(u) = &a[0].spec else {
            panic!("{a:?}")
        };
        assert_eq!(u.contents.as_deref(), Some("[Service]\nExecStart=/old\n"));
        assert_eq!(a[0].owner.name, "old");
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
                            ResourceStatus::ready(
                                Timestamp(1),
                                ResourceDetails::File {
                                    sha256: String::new(),
                                    size: 1,
                                },
                            )
                        } else {
                            ResourceStatus::Pending
                        },
                    );
                }
                actual.set_condition("Ready", ConditionStatus::True, "r", "", Timestamp(1));
                (
                    id,
                    DeviceState {
                        desired: Some(desired.into()),
                        actual: Some(actual.into()),
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

    fn files(prefix: &str, n: usize) -> Vec<ResourceTemplate> {
        (0..n)
            .map(|i| file(&format!("{prefix}{i}"), &format!("/etc/{prefix}/{i}")))
            .collect()
    }

    #[test]
    fn the_manifest_that_takes_a_device_over_its_resource_limit_is_left_out_there_alone() {
        let devices = [dev("a", &[("role", "s")]), dev("b", &[("role", "s")])];
        // Five manifests of 128 files for a; b gets only the newest one.
        let mut ms: Vec<ManifestView> = (0..5)
            .map(|i| {
                manifest(
                    &format!("m{i}"),
                    &format!("{i}"),
                    None,
                    &["a"],
                    files(&format!("m{i}-"), 128),
                )
            })
            .collect();
        ms[4].devices.push("b".into());
        let p = plan(&devices, &ms, &HashMap::new());
        assert_eq!(ids(&p, "a").len(), 512, "the four oldest fit exactly");
        assert!(ids(&p, "a").iter().all(|id| !id.starts_with("m4-")));
        assert_eq!(ids(&p, "b").len(), 128, "the newest still reaches b");
        assert_eq!(
            p.over_limit,
            [OverLimit {
                device: DeviceId::new("a").unwrap(),
                refused: "ns/m4".into(),
                limit: "640 resources, the device accepts 512".into(),
                kept_previous: false,
            }]
        );
        let pr = &p.progress["ns/m4"];
        assert_eq!((pr.targeted, pr.updated), (2, 1));
        assert_eq!(pr.over_limit, [DeviceId::new("a").unwrap()]);
        assert!(p.progress["ns/m0"].over_limit.is_empty());
    }

    #[test]
    fn bytes_count_against_the_limit_a_device_advertises() {
        let mut a = dev("a", &[]);
        a.limits.max_manifest_bytes = 64 * 1024;
        let big = |id: &str, n: usize| ResourceTemplate {
            id: ResourceId::new(id).unwrap(),
            spec: ResourceSpec::File(FileSpec {
                path: format!("/etc/{id}"),
                // Quotes double when escaped into the signed envelope.
                content: FileContent::Text("\"".repeat(n)),
                mode: None,
                owner: None,
                group: None,
            }),
        };
        let ms = [
            manifest("small", "1", None, &["a"], vec![big("s", 10_000)]),
            manifest("large", "2", None, &["a"], vec![big("l", 20_000)]),
        ];
        let p = plan(&[a], &ms, &HashMap::new());
        assert_eq!(ids(&p, "a"), ["s"]);
        assert_eq!(p.over_limit.len(), 1);
        assert!(
            p.over_limit[0].limit.contains("the device accepts 65536"),
            "{}",
            p.over_limit[0].limit
        );
        // Every estimate bounds what is really stored.
        let mut m = AgentManifest::new(DeviceId::new("a").unwrap(), u64::MAX);
        m.resources = p.devices[&DeviceId::new("a").unwrap()].clone();
        let text = serde_json::to_string(&m).unwrap();
        let stored = serde_json::to_string(&text).unwrap().len() as u64 + 200;
        assert!(stored <= p.usage[&DeviceId::new("a").unwrap()].bytes + MANIFEST_OVERHEAD_BYTES);
    }

    #[test]
    fn a_manifest_that_grows_past_the_limit_keeps_its_previous_version_on_the_device() {
        let a = dev("a", &[]);
        let mut m = manifest("m", "1", None, &["a"], files("f", 500));
        m.generation = 1;
        let first = plan(
            std::slice::from_ref(&a),
            std::slice::from_ref(&m),
            &HashMap::new(),
        );
        let mut am = AgentManifest::new(a.id.clone(), 1);
        am.resources = first.devices[&a.id].clone();
        let state = HashMap::from([(
            a.id.clone(),
            DeviceState {
                desired: Some(am.into()),
                actual: None,
            },
        )]);
        m.generation = 2;
        m.resources = files("f", 600);
        let p = plan(std::slice::from_ref(&a), &[m], &state);
        assert_eq!(ids(&p, "a").len(), 500);
        assert!(
            p.devices[&a.id].iter().all(|r| r.owner.generation == 1),
            "the previous generation stays"
        );
        assert!(p.over_limit[0].kept_previous);
        assert_eq!(p.progress["ns/m"].updated, 0);
    }

    #[test]
    fn a_pod_that_does_not_fit_is_left_out_whole() {
        let a = dev("a", &[]);
        let mut p = plan(
            std::slice::from_ref(&a),
            &[manifest("m", "1", None, &["a"], files("f", 510))],
            &HashMap::new(),
        );
        let pod = |key: &str, n: usize| PodView {
            device: a.id.clone(),
            key: key.into(),
            resources: (0..n)
                .map(|i| {
                    manifest("x", "9", None, &[], vec![])
                        .managed(&file(&format!("{key}-{i}"), &format!("/etc/{key}/{i}")))
                })
                .collect(),
        };
        add_pods(&mut p, &[pod("small", 2), pod("big", 3)]);
        assert_eq!(ids(&p, "a").len(), 512);
        assert_eq!(p.over_limit.len(), 1);
        assert_eq!(p.over_limit[0].refused, "pod big");
    }
}
