//! Which KV keys belong to devices that are gone.
//!
//! A key whose device has no EdgeDevice is either a deleted device's (remove it) or a new
//! device's whose EdgeDevice the controller has not seen yet: its agent can write status
//! the moment it connects, while the EdgeDevice is still on its way through the watch.
//! So a device a pass knew and the next does not is gone at once; a device no pass has
//! known is gone only once it stays unknown for [`ORPHAN_GRACE`] (after a restart, the
//! devices deleted while the controller was down go that way).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    hash::{DefaultHasher, Hash, Hasher},
    time::{Duration, Instant},
};

use fleetlet_protocol::DeviceId;

/// How long keys of a device the controller has never known are kept.
pub const ORPHAN_GRACE: Duration = Duration::from_secs(60);

/// What the passes remember to tell the two kinds of orphan apart.
#[derive(Debug, Default)]
pub struct Orphans {
    /// The devices of the last pass, by a hash of the id (a collision only removes a
    /// never-known device's keys early, as if it had been known).
    known: HashSet<u64>,
    /// When each never-known device with keys was first found.
    unknown_since: HashMap<DeviceId, Instant>,
}

fn id_hash(id: &DeviceId) -> u64 {
    let mut h = DefaultHasher::new();
    id.as_str().hash(&mut h);
    h.finish()
}

impl Orphans {
    /// Of the devices that hold keys (`holders`), those whose keys go now, given the
    /// devices that exist (`devices`); then remembers `devices` for the next pass.
    /// Only orphans are copied: the holders are mostly devices that exist.
    pub fn sweep<'a, V>(
        &mut self,
        holders: impl IntoIterator<Item = &'a DeviceId>,
        devices: &BTreeMap<DeviceId, V>,
        now: Instant,
    ) -> HashSet<DeviceId> {
        let mut gone = HashSet::new();
        let mut still_unknown = HashMap::new();
        for id in holders {
            if devices.contains_key(id) || gone.contains(id) || still_unknown.contains_key(id) {
                continue;
            }
            if self.known.contains(&id_hash(id)) {
                gone.insert(id.clone());
                continue;
            }
            let since = self.unknown_since.get(id).copied().unwrap_or(now);
            if now.saturating_duration_since(since) >= ORPHAN_GRACE {
                gone.insert(id.clone());
            } else {
                still_unknown.insert(id.clone(), since);
            }
        }
        self.unknown_since = still_unknown;
        self.known = devices.keys().map(id_hash).collect();
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> DeviceId {
        DeviceId::new(s).unwrap()
    }

    fn devices(ids: &[&str]) -> BTreeMap<DeviceId, ()> {
        ids.iter().map(|d| (id(d), ())).collect()
    }

    #[test]
    fn a_device_that_was_known_loses_its_keys_at_once() {
        let mut o = Orphans::default();
        let t = Instant::now();
        assert!(
            o.sweep(&[id("a"), id("b")], &devices(&["a", "b"]), t)
                .is_empty()
        );
        let gone = o.sweep(&[id("a"), id("b")], &devices(&["a"]), t);
        assert_eq!(gone, HashSet::from([id("b")]));
    }

    #[test]
    fn keys_written_before_the_device_is_known_are_kept_until_the_grace_runs_out() {
        let mut o = Orphans::default();
        let t = Instant::now();
        // Status arrives before the EdgeDevice: kept, pass after pass.
        assert!(o.sweep(&[id("new")], &devices(&[]), t).is_empty());
        let later = t + ORPHAN_GRACE - Duration::from_secs(1);
        assert!(o.sweep(&[id("new")], &devices(&[]), later).is_empty());
        // Its EdgeDevice shows up: the device is known, and the clock is forgotten.
        assert!(o.sweep(&[id("new")], &devices(&["new"]), later).is_empty());
        assert!(o.unknown_since.is_empty());
        // A device that never shows up goes once the grace has run out.
        assert!(o.sweep(&[id("never")], &devices(&["new"]), t).is_empty());
        let gone = o.sweep(&[id("never")], &devices(&["new"]), t + ORPHAN_GRACE);
        assert_eq!(gone, HashSet::from([id("never")]));
    }

    #[test]
    fn the_grace_clock_starts_again_for_a_device_whose_keys_went_away() {
        let mut o = Orphans::default();
        let t = Instant::now();
        assert!(o.sweep(&[id("x")], &devices(&[]), t).is_empty());
        // Its keys are gone (removed by hand): nothing is remembered of it.
        assert!(o.sweep(&[], &devices(&[]), t + ORPHAN_GRACE).is_empty());
        assert!(
            o.sweep(&[id("x")], &devices(&[]), t + ORPHAN_GRACE)
                .is_empty()
        );
    }
}
