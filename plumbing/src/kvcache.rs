//! In-memory mirrors of a KV bucket (list-then-watch), one entry per device.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, RwLock, atomic::Ordering},
    time::Duration,
};

use async_nats::jetstream::kv::Operation;
use fleetlet_protocol::{
    DeviceId, Record, decode,
    kv::{Bucket, OPERATION_HEADER, SEQUENCE_HEADER},
};
use futures::StreamExt;
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

/// A decoded record and the KV revision it was read at. The record is shared: a pass
/// over 10,000 devices takes the whole cache without copying any of it.
#[derive(Debug)]
pub struct Versioned<T> {
    pub value: Arc<T>,
    pub revision: u64,
}

impl<T> Clone for Versioned<T> {
    fn clone(&self) -> Self {
        Self {
            value: self.value.clone(),
            revision: self.revision,
        }
    }
}

/// The devices whose key changed since this reader last asked ([`KvCache::changed_keys`]).
pub struct ChangedKeys<T> {
    cache: Arc<KvCache<T>>,
    slot: usize,
}

impl<T: Record + Clone + Send + Sync + 'static> ChangedKeys<T> {
    pub fn take(&self) -> HashSet<DeviceId> {
        self.cache.take_slot(self.slot)
    }
}

/// What applying one entry to the cache did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Applied {
    /// Nothing: the revision is older than the cache's, or the very one it holds (a record
    /// this process wrote and remembered, coming back through the watch: not decoded again).
    Known,
    /// The key's value changed.
    Changed,
    /// The key appeared or went away.
    Keys,
}

/// The newest record of every device in one bucket. Values that do not decode are kept
/// out (and logged) so one bad key never hides the rest.
pub struct KvCache<T> {
    bucket: Bucket,
    entries: RwLock<HashMap<DeviceId, Versioned<T>>>,
    /// Revisions of keys whose last value did not decode; writes must still go on top.
    undecodable: RwLock<HashMap<DeviceId, u64>>,
    /// Keys changed since each reader last took them: the first set is
    /// [`KvCache::take_dirty`]'s, the others belong to [`ChangedKeys`] readers.
    dirty: std::sync::Mutex<Vec<HashSet<DeviceId>>>,
    ready: watch::Sender<bool>,
    /// Notify on every update (false: only when a key appears or goes away).
    notify_updates: bool,
    /// Asks [`KvCache::run_republished`] to list the bucket again now.
    relist: Arc<Notify>,
}

impl<T: Record + Clone + Send + Sync + 'static> KvCache<T> {
    pub fn new(bucket: Bucket) -> Arc<Self> {
        Self::with_notify(bucket, true)
    }

    /// A cache whose updates do not ask for a pass, only new and removed keys do: for
    /// heartbeats, whose every beat would otherwise run a fleet-wide pass (at 10,000 devices
    /// that is hundreds a second). Time-based changes (a device going offline) are noticed
    /// by the periodic pass.
    pub fn new_quiet(bucket: Bucket) -> Arc<Self> {
        Self::with_notify(bucket, false)
    }

    fn with_notify(bucket: Bucket, notify_updates: bool) -> Arc<Self> {
        Arc::new(Self {
            bucket,
            entries: RwLock::new(HashMap::new()),
            undecodable: RwLock::new(HashMap::new()),
            dirty: std::sync::Mutex::new(vec![HashSet::new()]),
            ready: watch::channel(false).0,
            notify_updates,
            relist: Arc::new(Notify::new()),
        })
    }

    pub fn get(&self, device: &DeviceId) -> Option<Versioned<T>> {
        self.entries.read().ok()?.get(device).cloned()
    }

    /// The revision to compare-and-set against: the latest value's, decodable or not.
    pub fn revision(&self, device: &DeviceId) -> Option<u64> {
        let stored = self.entries.read().ok()?.get(device).map(|v| v.revision);
        stored.or_else(|| self.undecodable.read().ok()?.get(device).copied())
    }

    pub fn snapshot(&self) -> HashMap<DeviceId, Versioned<T>> {
        self.entries.read().map(|e| e.clone()).unwrap_or_default()
    }

    pub fn devices(&self) -> Vec<DeviceId> {
        let mut ids: Vec<DeviceId> = self
            .entries
            .read()
            .map(|e| e.keys().cloned().collect())
            .unwrap_or_default();
        if let Ok(u) = self.undecodable.read() {
            ids.extend(u.keys().cloned());
        }
        ids
    }

    /// The devices whose key changed since the previous call.
    pub fn take_dirty(&self) -> HashSet<DeviceId> {
        self.take_slot(0)
    }

    /// A reader of changed keys of its own, beside [`KvCache::take_dirty`]'s: it sees every
    /// key that changes from now on.
    pub fn changed_keys(self: &Arc<Self>) -> ChangedKeys<T> {
        let slot = self
            .dirty
            .lock()
            .map(|mut d| {
                d.push(HashSet::new());
                d.len() - 1
            })
            .unwrap_or(0);
        ChangedKeys {
            cache: self.clone(),
            slot,
        }
    }

    fn take_slot(&self, slot: usize) -> HashSet<DeviceId> {
        self.dirty
            .lock()
            .ok()
            .and_then(|mut d| d.get_mut(slot).map(std::mem::take))
            .unwrap_or_default()
    }

    /// Notifying it makes the mirror list the bucket again (it was recreated, and a
    /// stream's end is not republished).
    pub fn relist_signal(&self) -> Arc<Notify> {
        self.relist.clone()
    }

    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Records a value this process just wrote, so the next pass sees it before the watch does
    /// (the watch then skips it). An undecodable record it was written over is gone.
    pub fn remember(&self, device: DeviceId, value: impl Into<Arc<T>>, revision: u64) {
        let (Ok(mut e), Ok(mut bad)) = (self.entries.write(), self.undecodable.write()) else {
            return;
        };
        if bad.get(&device).is_some_and(|r| *r < revision) {
            bad.remove(&device);
        }
        let newer = e.get(&device).is_none_or(|old| old.revision < revision);
        if newer {
            e.insert(
                device,
                Versioned {
                    value: value.into(),
                    revision,
                },
            );
        }
    }

    /// Applies one entry.
    fn apply(&self, key: &str, op: Operation, revision: u64, bytes: &[u8]) -> Applied {
        let Ok(device) = DeviceId::new(key) else {
            warn!(
                bucket = self.bucket.name,
                key, "ignoring a key that is not a device id"
            );
            return Applied::Known;
        };
        let (Ok(mut entries), Ok(mut bad)) = (self.entries.write(), self.undecodable.write())
        else {
            return Applied::Known;
        };
        if entries.get(&device).is_some_and(|e| e.revision >= revision) {
            return Applied::Known;
        }
        let had = entries.contains_key(&device);
        if let Ok(mut d) = self.dirty.lock() {
            for set in d.iter_mut() {
                set.insert(device.clone());
            }
        }
        bad.remove(&device);
        match op {
            Operation::Put => match decode::<T>(bytes) {
                Ok(value) if value.device() == &device => {
                    entries.insert(
                        device.clone(),
                        Versioned {
                            value: Arc::new(value),
                            revision,
                        },
                    );
                }
                Ok(_) => {
                    warn!(
                        bucket = self.bucket.name,
                        key, "record names another device; ignored"
                    );
                    entries.remove(&device);
                    bad.insert(device.clone(), revision);
                }
                Err(e) => {
                    warn!(bucket = self.bucket.name, key, reason = e.reason(), error = %e, "undecodable record; ignored");
                    entries.remove(&device);
                    bad.insert(device.clone(), revision);
                }
            },
            Operation::Delete | Operation::Purge => {
                entries.remove(&device);
            }
        }
        if had == entries.contains_key(&device) {
            Applied::Changed
        } else {
            Applied::Keys
        }
    }

    /// Clears everything and marks the cache not ready: a re-list starts from nothing (the
    /// bucket may have been lost and recreated, and stale entries would make every
    /// compare-and-set fail).
    fn reset(&self) {
        self.ready.send_replace(false);
        if let (Ok(mut e), Ok(mut u)) = (self.entries.write(), self.undecodable.write()) {
            e.clear();
            u.clear();
        }
    }

    /// Applies one message of the bucket (a direct get's answer or a republished record):
    /// its key is the last token of `subject`.
    fn apply_message(&self, subject: &str, m: &async_nats::Message) -> Applied {
        let header = |name: &str| {
            m.headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
        };
        let Some(revision) = header(SEQUENCE_HEADER).and_then(|s| s.parse::<u64>().ok()) else {
            debug!(
                bucket = self.bucket.name,
                subject, "message without a sequence; ignored"
            );
            return Applied::Known;
        };
        let key = subject.rsplit('.').next().unwrap_or_default();
        let op = match header(OPERATION_HEADER).as_deref() {
            Some("DEL") => Operation::Delete,
            Some("PURGE") => Operation::Purge,
            _ => Operation::Put,
        };
        self.apply(key, op, revision, &m.payload)
    }

    /// Reads every record of the bucket with batched direct gets (no consumer), in stream
    /// order. For buckets that keep one revision per key, that is the latest of each key.
    async fn list_direct(&self, client: &async_nats::Client) -> Result<u64, String> {
        const BATCH: u64 = 512;
        let mut next = 1u64;
        let mut count = 0u64;
        loop {
            let inbox = client.new_inbox();
            let mut answers = client
                .subscribe(inbox.clone())
                .await
                .map_err(|e| e.to_string())?;
            let request = serde_json::json!({
                "seq": next, "batch": BATCH, "next_by_subj": self.bucket.all_subjects(),
            });
            client
                .publish_with_reply(
                    self.bucket.direct_get_api(),
                    inbox,
                    request.to_string().into(),
                )
                .await
                .map_err(|e| e.to_string())?;
            let mut got = 0u64;
            let more = loop {
                let m = tokio::time::timeout(Duration::from_secs(10), answers.next())
                    .await
                    .map_err(|_| "no answer to a direct get within 10 s".to_string())?
                    .ok_or("direct get subscription closed")?;
                if let Some(status) = m.status {
                    // 204: end of this batch (with what is pending); 404: nothing (more).
                    let pending = m
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("Nats-Num-Pending"))
                        .and_then(|v| v.as_str().parse::<u64>().ok())
                        .unwrap_or(0);
                    match status.as_u16() {
                        204 => break pending > 0,
                        404 => break false,
                        other => {
                            return Err(format!(
                                "direct get of {}: status {other} {}",
                                self.bucket.name,
                                m.description.unwrap_or_default()
                            ));
                        }
                    }
                }
                let subject = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Nats-Subject"))
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_default();
                if let Some(seq) = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(SEQUENCE_HEADER))
                    .and_then(|v| v.as_str().parse::<u64>().ok())
                {
                    next = seq + 1;
                }
                self.apply_message(&subject, &m);
                got += 1;
            };
            count += got;
            if !more || got == 0 {
                return Ok(count);
            }
        }
    }

    /// Starts [`KvCache::run_republished`] in `tasks`; returns the signal that makes it
    /// list the bucket again (see [`KvCache::relist_signal`]).
    pub fn spawn_republished(
        self: &Arc<Self>,
        tasks: &mut tokio::task::JoinSet<()>,
        client: &async_nats::Client,
        changed: &Arc<Notify>,
        relist: Duration,
    ) -> Arc<Notify> {
        tasks.spawn(
            self.clone()
                .run_republished(client.clone(), changed.clone(), relist),
        );
        self.relist_signal()
    }

    /// Mirrors the bucket without JetStream consumers: the records as JetStream republishes
    /// them once stored, after a listing by batched direct gets (of every revision a bucket
    /// keeps; older ones are ignored when applied). It lists again after a reconnect
    /// (republished records are not replayed) and every `relist` as a safety net: a record a
    /// stream leader stored but died before republishing is never sent, though the writer's
    /// retry of a write it saw no answer to stores (and republishes) it again.
    pub async fn run_republished(
        self: Arc<Self>,
        client: async_nats::Client,
        changed: Arc<Notify>,
        relist: Duration,
    ) {
        let mut attempt = 0u32;
        loop {
            let result: Result<(), String> = async {
                // Subscribe first: what is stored while listing arrives here as well, and
                // older revisions are ignored when applied.
                let mut changes = client
                    .subscribe(self.bucket.all_changes())
                    .await
                    .map_err(|e| e.to_string())?;
                let connects = client.statistics().connects.load(Ordering::Relaxed);
                self.reset();
                let listed = self.list_direct(&client).await?;
                self.ready.send_replace(true);
                changed.notify_one();
                info!(
                    bucket = self.bucket.name,
                    listed, "following bucket changes"
                );
                attempt = 0;
                let relist_at = tokio::time::Instant::now() + relist;
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        m = changes.next() => {
                            let m = m.ok_or("changes subscription closed")?;
                            let subject = m.subject.to_string();
                            let applied = self.apply_message(&subject, &m);
                            if applied == Applied::Keys
                                || (applied == Applied::Changed && self.notify_updates)
                            {
                                changed.notify_one();
                            }
                        }
                        _ = self.relist.notified() => {
                            return Err("asked to list again".into());
                        }
                        _ = tick.tick() => {
                            if client.statistics().connects.load(Ordering::Relaxed) != connects {
                                return Err("reconnected; listing again".into());
                            }
                            if tokio::time::Instant::now() >= relist_at {
                                return Ok(());
                            }
                        }
                    }
                }
            }
            .await;
            if let Err(e) = result {
                let delay = Duration::from_millis(250 * 2u64.pow(attempt.min(7)));
                attempt += 1;
                warn!(bucket = self.bucket.name, error = %e, retry_in_ms = delay.as_millis() as u64, "bucket changes interrupted");
                tokio::time::sleep(delay).await;
            }
            debug!(bucket = self.bucket.name, "re-listing bucket");
        }
    }
}

#[cfg(test)]
mod tests {
    use fleetlet_protocol::{API_VERSION, Free, Heartbeat, Timestamp, encode, kv::HEARTBEAT};

    use super::*;

    fn beat(device: &str, at: u64) -> Vec<u8> {
        let hb = Heartbeat {
            api_version: API_VERSION.into(),
            device: DeviceId::new(device).expect("valid"),
            sequence: 1,
            timestamp: Timestamp(at),
            interval_seconds: 30,
            free: Free {
                memory_bytes: 1,
                disk_bytes: 1,
                pids: 1,
            },
            facts: None,
        };
        encode(&hb).expect("encodes")
    }

    fn ids(set: HashSet<DeviceId>) -> Vec<String> {
        let mut v: Vec<String> = set.into_iter().map(|d| d.as_str().to_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn each_reader_of_changed_keys_takes_its_own() {
        let cache = KvCache::<Heartbeat>::new(HEARTBEAT);
        cache.apply("early", Operation::Put, 1, &beat("early", 1));
        let reader = cache.changed_keys();
        cache.apply("a", Operation::Put, 2, &beat("a", 2));
        cache.apply("b", Operation::Put, 3, &beat("b", 3));
        // The reader starts with what changes after it was made.
        assert_eq!(ids(reader.take()), ["a", "b"]);
        assert!(reader.take().is_empty(), "taken once");
        // take_dirty still sees everything, taking the reader's keys away from nobody.
        assert_eq!(ids(cache.take_dirty()), ["a", "b", "early"]);
        cache.apply("a", Operation::Put, 4, &beat("a", 4));
        assert_eq!(ids(cache.take_dirty()), ["a"]);
        assert_eq!(ids(reader.take()), ["a"]);
        // An older revision changes nothing, for any reader.
        cache.apply("b", Operation::Put, 1, &beat("b", 1));
        assert!(reader.take().is_empty() && cache.take_dirty().is_empty());
    }

    #[test]
    fn a_remembered_write_coming_back_through_the_watch_is_not_applied_again() {
        let cache = KvCache::<Heartbeat>::new(HEARTBEAT);
        let a = DeviceId::new("a").expect("valid");
        let b = DeviceId::new("b").expect("valid");
        assert_eq!(
            cache.apply("a", Operation::Put, 1, &beat("a", 1)),
            Applied::Keys
        );
        assert_eq!(
            cache.apply("a", Operation::Put, 2, &beat("a", 2)),
            Applied::Changed
        );
        cache.take_dirty();
        // This process wrote revision 3 and remembered it; the watch then brings it back.
        let written = decode::<Heartbeat>(&beat("a", 3)).expect("decodes");
        cache.remember(a.clone(), written, 3);
        // Bytes that would not decode show that the echo is not decoded at all: before, they
        // replaced the remembered record with nothing and marked the key undecodable.
        assert_eq!(cache.apply("a", Operation::Put, 3, b"{"), Applied::Known);
        let held = cache.get(&a).expect("still held");
        assert_eq!((held.revision, held.value.timestamp), (3, Timestamp(3)));
        assert!(cache.take_dirty().is_empty(), "nothing changed");
        // A newer revision is applied as before, and so is a delete.
        assert_eq!(cache.apply("a", Operation::Put, 4, b"{"), Applied::Keys);
        assert!(cache.get(&a).is_none());
        assert_eq!(
            cache.apply("b", Operation::Put, 5, &beat("b", 5)),
            Applied::Keys
        );
        assert_eq!(cache.apply("b", Operation::Delete, 6, b""), Applied::Keys);
        assert!(cache.get(&b).is_none());
        // "a" is undecodable at 4; this process writes over it at 7, and the echo is skipped:
        // the key is listed once, at the revision written.
        let written = decode::<Heartbeat>(&beat("a", 7)).expect("decodes");
        cache.remember(a.clone(), written, 7);
        assert_eq!(
            cache.apply("a", Operation::Put, 7, &beat("a", 7)),
            Applied::Known
        );
        assert_eq!(cache.devices(), vec![a.clone()]);
        assert_eq!(cache.revision(&a), Some(7));
    }
}
