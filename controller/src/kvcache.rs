//! In-memory mirrors of a KV bucket (list-then-watch), one entry per device.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use async_nats::jetstream::{self, kv::Operation};
use fleetlet_protocol::{DeviceId, Record, decode, kv::Bucket};
use futures::StreamExt;
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

/// A decoded record and the KV revision it was read at.
#[derive(Debug, Clone)]
pub struct Versioned<T> {
    pub value: T,
    pub revision: u64,
}

/// The newest record of every device in one bucket. Values that do not decode are kept
/// out (and logged) so one bad key never hides the rest.
pub struct KvCache<T> {
    bucket: Bucket,
    entries: RwLock<HashMap<DeviceId, Versioned<T>>>,
    /// Revisions of keys whose last value did not decode; writes must still go on top.
    undecodable: RwLock<HashMap<DeviceId, u64>>,
    /// Keys changed since the last [`KvCache::take_dirty`].
    dirty: std::sync::Mutex<std::collections::HashSet<DeviceId>>,
    ready: watch::Sender<bool>,
    /// Notify on every update (false: only when a key appears or goes away).
    notify_updates: bool,
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
            dirty: std::sync::Mutex::new(std::collections::HashSet::new()),
            ready: watch::channel(false).0,
            notify_updates,
        })
    }

    pub fn get(&self, device: &DeviceId) -> Option<Versioned<T>> {
        self.entries.read().ok()?.get(device).cloned()
    }

    /// The revision to compare-and-set against: the latest value's, decodable or not.
    pub fn revision(&self, device: &DeviceId) -> Option<u64> {
        self.get(device)
            .map(|v| v.revision)
            .or_else(|| self.undecodable.read().ok()?.get(device).copied())
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
    pub fn take_dirty(&self) -> std::collections::HashSet<DeviceId> {
        self.dirty
            .lock()
            .map(|mut d| std::mem::take(&mut *d))
            .unwrap_or_default()
    }

    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Records a value this process just wrote, so the next pass sees it before the watch does.
    pub fn remember(&self, device: DeviceId, value: T, revision: u64) {
        if let Ok(mut e) = self.entries.write() {
            let newer = e.get(&device).is_none_or(|old| old.revision < revision);
            if newer {
                e.insert(device, Versioned { value, revision });
            }
        }
    }

    /// Applies one entry; true when a key appeared or went away.
    fn apply(&self, key: &str, op: Operation, revision: u64, bytes: &[u8]) -> bool {
        let Ok(device) = DeviceId::new(key) else {
            warn!(
                bucket = self.bucket.name,
                key, "ignoring a key that is not a device id"
            );
            return false;
        };
        let (Ok(mut entries), Ok(mut bad)) = (self.entries.write(), self.undecodable.write())
        else {
            return false;
        };
        if entries.get(&device).is_some_and(|e| e.revision > revision) {
            return false;
        }
        let had = entries.contains_key(&device);
        if let Ok(mut d) = self.dirty.lock() {
            d.insert(device.clone());
        }
        bad.remove(&device);
        match op {
            Operation::Put => match decode::<T>(bytes) {
                Ok(value) if value.device() == &device => {
                    entries.insert(device.clone(), Versioned { value, revision });
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
        let has = entries.contains_key(&device);
        had != has
    }

    /// Mirrors the bucket forever, re-listing after every interruption. `changed` is
    /// notified on every update (see [`KvCache::new_quiet`]).
    pub async fn run(self: Arc<Self>, client: async_nats::Client, changed: Arc<Notify>) {
        let js = jetstream::new(client);
        let mut attempt = 0u32;
        loop {
            let result: Result<(), String> = async {
                let kv = js
                    .get_key_value(self.bucket.name)
                    .await
                    .map_err(|e| e.to_string())?;
                // A re-list starts from nothing: the bucket may have been lost and recreated,
                // and stale entries would make every compare-and-set fail.
                self.ready.send_replace(false);
                if let (Ok(mut e), Ok(mut u)) = (self.entries.write(), self.undecodable.write()) {
                    e.clear();
                    u.clear();
                }
                let empty = kv.status().await.map_err(|e| e.to_string())?.values() == 0;
                let mut w = kv
                    .watch_with_history(">")
                    .await
                    .map_err(|e| e.to_string())?;
                if empty {
                    self.ready.send_replace(true);
                    changed.notify_one();
                }
                info!(bucket = self.bucket.name, "watching bucket");
                attempt = 0;
                while let Some(entry) = w.next().await {
                    let e = entry.map_err(|e| e.to_string())?;
                    let appeared_or_gone = self.apply(&e.key, e.operation, e.revision, &e.value);
                    let became_ready = (e.seen_current || e.delta == 0) && !self.is_ready();
                    if e.seen_current || e.delta == 0 {
                        self.ready.send_replace(true);
                    }
                    if self.is_ready() && (self.notify_updates || appeared_or_gone || became_ready)
                    {
                        changed.notify_one();
                    }
                }
                Err("watch ended".into())
            }
            .await;
            if let Err(e) = result {
                let delay = Duration::from_millis(250 * 2u64.pow(attempt.min(7)));
                attempt += 1;
                warn!(bucket = self.bucket.name, error = %e, retry_in_ms = delay.as_millis() as u64, "bucket watch interrupted");
                tokio::time::sleep(delay).await;
            }
            debug!(bucket = self.bucket.name, "re-listing bucket");
        }
    }
}
