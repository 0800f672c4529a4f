//! The fleet split between replicas: each device belongs to one of `shards` shards by
//! consistent hashing of its id ([`shard_of`]), and each shard is held by one replica
//! through a coordination.k8s.io Lease of its own (`<group>-shard-<k>`).
//!
//! Every replica also renews a member Lease (`<group>-member-<identity>`), so each knows
//! how many replicas are alive and holds a fair share of the shards: `ceil(shards /
//! members)`. A replica over its share gives the extra shards up (it stops working on a
//! shard before it releases its Lease); one under it takes shards that are free or whose
//! holder stopped renewing. A replica that dies stops renewing: its Leases expire after
//! their duration and the others take its shards at their next round. Work on a shard is
//! safe against a holder that has not noticed its loss yet in the same way as the single
//! leader's: KV writes are compare-and-set.

use std::{collections::BTreeSet, time::Duration};

use fleetlet_crds::{
    k8s_openapi::{api::coordination::v1::Lease, jiff::Timestamp},
    kube::{
        Api, Client,
        api::{DeleteParams, ListParams},
    },
};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::leader;

/// The label every Lease of a shard group carries, with the group's name as value.
pub const GROUP_LABEL: &str = "fleetlet.dev/lease-group";
/// `shard` or `member`.
pub const ROLE_LABEL: &str = "fleetlet.dev/lease-role";

/// The shard, of `shards`, that `key` (a device id, a manifest's `namespace/name`)
/// belongs to: jump consistent hashing (Lamping and Veach) of a 64-bit FNV-1a digest,
/// so going from `n` to `n + 1` shards moves only the keys the new shard takes.
pub fn shard_of(key: &str, shards: u32) -> u32 {
    if shards <= 1 {
        return 0;
    }
    let mut h = digest(key);
    let (mut b, mut j) = (-1i64, 0i64);
    while j < i64::from(shards) {
        b = j;
        h = h.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((h >> 33) + 1) as f64)) as i64;
    }
    u32::try_from(b).unwrap_or(0)
}

/// A stable 64-bit digest of `key`: FNV-1a, whose low bits mix poorly for ids that differ
/// in their last character, then a splitmix64 finaliser.
fn digest(key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Which shards this replica holds right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ownership {
    shards: u32,
    held: BTreeSet<u32>,
}

impl Ownership {
    /// Nothing held, of `shards`.
    pub fn none(shards: u32) -> Self {
        Self {
            shards: shards.max(1),
            held: BTreeSet::new(),
        }
    }

    /// Every shard: a single leader's view.
    pub fn whole(shards: u32) -> Self {
        let shards = shards.max(1);
        Self {
            shards,
            held: (0..shards).collect(),
        }
    }

    /// `held` of `shards` (shards out of range are ignored).
    pub fn of(shards: u32, held: impl IntoIterator<Item = u32>) -> Self {
        let shards = shards.max(1);
        Self {
            shards,
            held: held.into_iter().filter(|k| *k < shards).collect(),
        }
    }

    /// Whether the shard `key` belongs to is held here.
    pub fn holds(&self, key: &str) -> bool {
        self.held.contains(&shard_of(key, self.shards))
    }

    /// Whether shard `k` is held here.
    pub fn holds_shard(&self, k: u32) -> bool {
        self.held.contains(&k)
    }

    /// Whether anything is held.
    pub fn any(&self) -> bool {
        !self.held.is_empty()
    }

    /// Whether every shard is held (nothing to filter).
    pub fn is_whole(&self) -> bool {
        self.held.len() as u64 == u64::from(self.shards)
    }

    pub fn shards(&self) -> u32 {
        self.shards
    }

    pub fn held(&self) -> &BTreeSet<u32> {
        &self.held
    }
}

/// One replica's part in a shard group.
pub struct ShardElection {
    pub namespace: String,
    /// The Leases' name prefix, e.g. `fleetlet-controller`.
    pub group: String,
    pub identity: String,
    pub shards: u32,
    pub lease_duration: Duration,
    pub renew_every: Duration,
}

/// Where one shard's Lease stands, as a round found it.
enum Slot {
    Missing,
    Mine(Box<Lease>),
    Free(Box<Lease>),
    Taken,
}

impl ShardElection {
    /// `shards` shards of group `group` in `namespace`, each Lease held for
    /// `lease_seconds` and renewed three times in that span.
    pub fn new(
        namespace: &str,
        group: &str,
        identity: &str,
        shards: u32,
        lease_seconds: u64,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            group: group.into(),
            identity: identity.into(),
            shards: shards.max(1),
            lease_duration: Duration::from_secs(lease_seconds),
            renew_every: Duration::from_secs((lease_seconds / 3).max(1)),
        }
    }

    fn shard_lease(&self, k: u32) -> String {
        format!("{}-shard-{k}", self.group)
    }

    fn member_lease(&self) -> String {
        format!("{}-member-{}", self.group, name_part(&self.identity))
    }

    /// Keeps a fair share of the shards; `owned` says which are held. Releases them all
    /// on stop.
    pub async fn run(
        self,
        client: Client,
        owned: watch::Sender<Ownership>,
        mut stop: watch::Receiver<bool>,
    ) {
        let api: Api<Lease> = Api::namespaced(client, &self.namespace);
        loop {
            let held = match self.round(&api, &owned).await {
                Ok(h) => h,
                Err(e) => {
                    warn!(error = %e, "shard leases unreachable; giving every shard up");
                    Ownership::none(self.shards)
                }
            };
            // Only a change is sent: every send wakes the holder's loop for a pass.
            if *owned.borrow() != held {
                info!(identity = %self.identity, held = ?held.held(), shards = self.shards, "shards changed");
                owned.send_replace(held);
            }
            tokio::select! {
                _ = tokio::time::sleep(self.renew_every) => {}
                _ = crate::stopped(&mut stop) => break,
            }
        }
        let held = owned.send_replace(Ownership::none(self.shards));
        for k in held.held() {
            let _ = self.release(&api, &self.shard_lease(*k)).await;
        }
        let _ = self.release(&api, &self.member_lease()).await;
        info!(identity = %self.identity, "released the shard leases");
    }

    /// One round: renew membership, count the live members, give up what is over the
    /// fair share, renew the rest and take free shards up to it.
    async fn round(
        &self,
        api: &Api<Lease>,
        owned: &watch::Sender<Ownership>,
    ) -> Result<Ownership, fleetlet_crds::kube::Error> {
        let now = Timestamp::now();
        let listed = api
            .list(&ListParams::default().labels(&format!("{GROUP_LABEL}={}", self.group)))
            .await?;
        let member = self.member_lease();
        let mut members = 1u32;
        let mut slots: Vec<Slot> = (0..self.shards).map(|_| Slot::Missing).collect();
        let mut my_member = None;
        for lease in listed.items {
            let name = lease.metadata.name.clone().unwrap_or_default();
            if name == member {
                my_member = Some(lease);
                continue;
            }
            let holder = holder(&lease);
            let live = holder.is_some() && !leader::expired(&lease, now);
            if role(&lease) == Some("member") {
                members += u32::from(live);
                // A member gone for an hour is forgotten.
                if !live && stale_for(&lease, now) > Duration::from_secs(3600) {
                    let _ = api.delete(&name, &DeleteParams::default()).await;
                }
                continue;
            }
            let Some(k) = name
                .strip_prefix(&format!("{}-shard-", self.group))
                .and_then(|k| k.parse::<u32>().ok())
                .filter(|k| *k < self.shards)
            else {
                continue;
            };
            slots[k as usize] = if holder.as_deref() == Some(self.identity.as_str()) {
                Slot::Mine(Box::new(lease))
            } else if live {
                Slot::Taken
            } else {
                Slot::Free(Box::new(lease))
            };
        }
        self.hold(api, &member, my_member, "member", now).await?;

        let fair = self.shards.div_ceil(members) as usize;
        let mine: Vec<u32> = (0..self.shards)
            .filter(|k| matches!(slots[*k as usize], Slot::Mine(_)))
            .collect();
        // Over the share: stop working on the extra shards first, then give them up.
        let extra: Vec<u32> = mine.iter().skip(fair).copied().collect();
        if !extra.is_empty() {
            let keep = owned.borrow().held().clone();
            owned.send_replace(Ownership::of(
                self.shards,
                keep.into_iter().filter(|k| !extra.contains(k)),
            ));
            for k in &extra {
                let _ = self.release(api, &self.shard_lease(*k)).await;
            }
            info!(identity = %self.identity, released = ?extra, members, "shards over the fair share given up");
        }
        let mut held = BTreeSet::new();
        for k in mine.into_iter().take(fair) {
            let Slot::Mine(lease) = std::mem::replace(&mut slots[k as usize], Slot::Taken) else {
                continue;
            };
            if self
                .hold(api, &self.shard_lease(k), Some(*lease), "shard", now)
                .await
                .unwrap_or(false)
            {
                held.insert(k);
            }
        }
        // Under the share: take free shards, starting at a point of our own so replicas
        // that start together try different ones first.
        let start = shard_of(&self.identity, self.shards);
        for k in (0..self.shards).map(|i| (start + i) % self.shards) {
            if held.len() >= fair {
                break;
            }
            let found = match std::mem::replace(&mut slots[k as usize], Slot::Taken) {
                Slot::Missing => None,
                Slot::Free(lease) => Some(*lease),
                Slot::Mine(_) | Slot::Taken => continue,
            };
            if self
                .hold(api, &self.shard_lease(k), found, "shard", now)
                .await
                .unwrap_or(false)
            {
                held.insert(k);
            }
        }
        Ok(Ownership::of(self.shards, held))
    }

    /// Creates `name` held by us, or takes or renews `lease` (found in this round's
    /// listing, so written at its resourceVersion); `Ok(false)` when another replica got
    /// there first.
    async fn hold(
        &self,
        api: &Api<Lease>,
        name: &str,
        lease: Option<Lease>,
        role: &str,
        now: Timestamp,
    ) -> Result<bool, fleetlet_crds::kube::Error> {
        let secs = i32::try_from(self.lease_duration.as_secs()).unwrap_or(i32::MAX);
        match lease {
            None => {
                let labels = [
                    (GROUP_LABEL.to_string(), self.group.clone()),
                    (ROLE_LABEL.to_string(), role.to_string()),
                ];
                let lease = leader::new_lease(name, Some(labels.into()), &self.identity, secs, now);
                leader::write(api, &lease, true).await
            }
            Some(mut lease) => {
                leader::hold(&mut lease, &self.identity, secs, now);
                leader::write(api, &lease, false).await
            }
        }
    }

    /// Gives `name` up if we hold it, so another replica takes it at its next round.
    async fn release(
        &self,
        api: &Api<Lease>,
        name: &str,
    ) -> Result<bool, fleetlet_crds::kube::Error> {
        leader::release(api, name, &self.identity).await
    }
}

fn holder(lease: &Lease) -> Option<String> {
    lease
        .spec
        .as_ref()?
        .holder_identity
        .clone()
        .filter(|h| !h.is_empty())
}

fn role(lease: &Lease) -> Option<&str> {
    lease
        .metadata
        .labels
        .as_ref()?
        .get(ROLE_LABEL)
        .map(String::as_str)
}

/// How long ago `lease` ran out (zero while it runs).
fn stale_for(lease: &Lease, now: Timestamp) -> Duration {
    let Some(spec) = &lease.spec else {
        return Duration::MAX;
    };
    match (&spec.renew_time, spec.lease_duration_seconds) {
        (Some(renew), Some(d)) => {
            let end = renew.0.as_millisecond() + i64::from(d) * 1000;
            Duration::from_millis(u64::try_from(now.as_millisecond() - end).unwrap_or(0))
        }
        _ => Duration::MAX,
    }
}

/// `identity` as part of an object name: lower case, `[a-z0-9-]`, at most 40 characters
/// (a longer one ends in a digest of the whole, so two long names stay apart).
fn name_part(identity: &str) -> String {
    let clean: String = identity
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() { c } else { '-' }
        })
        .collect();
    let clean = clean.trim_matches('-').to_string();
    if clean.len() <= 40 && !clean.is_empty() {
        return clean;
    }
    format!(
        "{}-{:08x}",
        clean
            .chars()
            .take(31)
            .collect::<String>()
            .trim_end_matches('-'),
        digest(identity) as u32
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_shard_holds_everything() {
        assert_eq!(shard_of("kitchen", 1), 0);
        assert_eq!(shard_of("kitchen", 0), 0);
        assert!(Ownership::whole(1).holds("anything"));
        assert!(!Ownership::none(4).holds("anything"));
    }

    #[test]
    fn devices_spread_evenly_and_stay_put_when_a_shard_is_added() {
        let ids: Vec<String> = (0..10_000).map(|i| format!("sim-{i}")).collect();
        let mut counts = [0u32; 8];
        for id in &ids {
            counts[shard_of(id, 8) as usize] += 1;
        }
        // 1,250 each if perfectly even.
        assert!(
            counts.iter().all(|c| (1100..1400).contains(c)),
            "{counts:?}"
        );
        // From 8 to 9 shards only keys the new shard takes move (about a ninth).
        let moved: Vec<&String> = ids
            .iter()
            .filter(|id| shard_of(id, 8) != shard_of(id, 9))
            .collect();
        assert!(moved.iter().all(|id| shard_of(id, 9) == 8));
        assert!((900..1400).contains(&moved.len()), "{}", moved.len());
    }

    #[test]
    fn ownership_answers_for_the_shards_it_holds() {
        let o = Ownership::of(4, [1, 3, 9]);
        assert_eq!(o.held().iter().copied().collect::<Vec<_>>(), vec![1, 3]);
        assert!(!o.is_whole() && o.any());
        let ids: Vec<String> = (0..100).map(|i| format!("d-{i}")).collect();
        for id in &ids {
            assert_eq!(o.holds(id), [1, 3].contains(&shard_of(id, 4)));
        }
        assert!(Ownership::whole(4).is_whole());
    }

    #[test]
    fn identities_become_lease_names() {
        assert_eq!(
            name_part("fleetlet-controller-7d9f-x2"),
            "fleetlet-controller-7d9f-x2"
        );
        assert_eq!(name_part("Host_Name 42"), "host-name-42");
        let long = "a".repeat(80);
        let n = name_part(&long);
        assert!(n.len() <= 40, "{n}");
        assert_ne!(n, name_part(&"a".repeat(81)));
    }
}
