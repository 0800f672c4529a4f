//! The agent's side of NATS: connecting, watching its manifest, writing status with
//! compare-and-set, and heartbeats. Every loop here survives the server going away.

use std::{sync::Arc, time::Duration};

use async_nats::{
    ServerAddr,
    jetstream::{
        self,
        kv::{CreateErrorKind, Operation, Store, UpdateErrorKind},
    },
};
use fleetlet_protocol::{
    AgentStatus, DeviceId, decode, encode,
    kv::{ACTUAL_STATE, Bucket, DESIRED_STATE, HEARTBEAT},
};
use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, instrument, warn};

use crate::{
    config::Settings,
    engine::{Candidate, backoff_delay},
    facts::Facts,
};

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("invalid NATS URL {url:?}: {message}")]
    Url { url: String, message: String },
    #[error("reading NATS credentials {path}: {source}")]
    Credentials {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to NATS: {0}")]
    Connect(#[from] async_nats::ConnectError),
    #[error("{0}")]
    Kv(String),
}

/// Connects (or keeps trying in the background: the agent starts without NATS).
pub async fn connect(s: &Settings) -> Result<async_nats::Client, NatsError> {
    let addrs = s
        .nats
        .urls
        .iter()
        .map(|u| {
            u.parse::<ServerAddr>().map_err(|e| NatsError::Url {
                url: u.clone(),
                message: e.to_string(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut opts = async_nats::ConnectOptions::new()
        .name(format!("fleetlet-agent/{}", s.device))
        .custom_inbox_prefix(s.inbox_prefix())
        .retry_on_initial_connect()
        .max_reconnects(None)
        .reconnect_delay_callback(|attempts| {
            backoff_delay(
                attempts.min(16) as u32,
                Duration::from_millis(250),
                Duration::from_secs(30),
            )
        });
    let n = &s.nats;
    if let (Some(u), Some(p)) = (&n.user, &n.password) {
        opts = opts.user_and_password(u.clone(), p.clone());
    }
    if let Some(t) = &n.token {
        opts = opts.token(t.clone());
    }
    if let Some(path) = &n.nkey_seed_file {
        let seed = std::fs::read_to_string(path).map_err(|source| NatsError::Credentials {
            path: path.display().to_string(),
            source,
        })?;
        opts = opts.nkey(seed.trim().to_owned());
    }
    if let Some(path) = &n.creds_file {
        opts = opts
            .credentials_file(path)
            .await
            .map_err(|source| NatsError::Credentials {
                path: path.display().to_string(),
                source,
            })?;
    }
    if let Some(ca) = &n.tls_ca {
        opts = opts.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&n.tls_cert, &n.tls_key) {
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    Ok(opts.connect(addrs).await?)
}

async fn bind(js: &jetstream::Context, bucket: Bucket) -> Result<Store, NatsError> {
    js.get_key_value(bucket.name)
        .await
        .map_err(|e| NatsError::Kv(format!("binding bucket {}: {e}", bucket.name)))
}

/// Watches the device's desired-state key and forwards every value to the engine.
/// Resumes after the last revision seen; re-reads the current value on every (re)connect
/// so nothing is missed while away.
#[instrument(skip_all, fields(device = %device))]
pub async fn watch_manifest(
    client: async_nats::Client,
    device: DeviceId,
    mut last_seen: u64,
    tx: mpsc::Sender<Candidate>,
    mut stop: watch::Receiver<bool>,
) {
    let js = jetstream::new(client);
    let key = DESIRED_STATE.key(&device).to_owned();
    let mut attempt = 0u32;
    loop {
        let result = async {
            let kv = bind(&js, DESIRED_STATE).await?;
            let current = kv
                .entry(key.as_str())
                .await
                .map_err(|e| NatsError::Kv(format!("reading desired state: {e}")))?;
            if let Some(e) = current
                && e.revision != last_seen
            {
                last_seen = e.revision;
                let _ = tx.send(candidate(e.operation, e.revision, e.value)).await;
            }
            let mut w = watch_key(&js, &kv, &device, key.as_str(), last_seen + 1).await?;
            info!(from_revision = last_seen + 1, "watching desired state");
            attempt = 0;
            while let Some(entry) = w.next().await {
                let (operation, revision, value) = entry?;
                if revision <= last_seen {
                    continue;
                }
                last_seen = revision;
                if tx
                    .send(candidate(operation, revision, value))
                    .await
                    .is_err()
                {
                    return Ok(());
                }
            }
            Err(NatsError::Kv("watch ended".into()))
        };
        let outcome = tokio::select! {
            _ = crate::stopped(&mut stop) => return,
            r = result => r,
        };
        if let Err(e) = outcome {
            let delay = backoff_delay(attempt, Duration::from_millis(500), Duration::from_secs(30));
            attempt = attempt.saturating_add(1);
            warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "desired-state watch interrupted");
            tokio::select! {
                _ = crate::stopped(&mut stop) => return,
                _ = tokio::time::sleep(delay) => {}
            }
        } else {
            return;
        }
    }
}

/// Watches one key from `from_revision` on, needing NATS permission for that key only.
///
/// It is an ordered push consumer created with a name and the key as its filter subject,
/// so the JetStream API subject names the key
/// (`$JS.API.CONSUMER.CREATE.KV_<bucket>.<name>.$KV.<bucket>.<key>`) and the server refuses
/// a filter that differs from it. A device's permissions can therefore allow its own key and
/// nothing else. (A KV watch creates its consumer on `$JS.API.CONSUMER.CREATE.KV_<bucket>`
/// with the filter in the payload: allowing that would let a device read every key.)
async fn watch_key(
    js: &jetstream::Context,
    kv: &Store,
    device: &DeviceId,
    key: &str,
    from_revision: u64,
) -> Result<impl futures::Stream<Item = Result<(Operation, u64, bytes::Bytes), NatsError>>, NatsError>
{
    use jetstream::consumer::{DeliverPolicy, ReplayPolicy, push::OrderedConfig};
    let consumer = kv
        .stream
        .create_consumer(OrderedConfig {
            name: Some(format!("fleetlet_{device}_{:016x}", fastrand::u64(..))),
            deliver_subject: js.client().new_inbox(),
            description: Some(format!("fleetlet agent {device}: desired state")),
            filter_subject: format!("{}{key}", kv.prefix),
            replay_policy: ReplayPolicy::Instant,
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: from_revision.max(1),
            },
            ..Default::default()
        })
        .await
        .map_err(|e| NatsError::Kv(format!("watching desired state: {e}")))?;
    let messages = consumer
        .messages()
        .await
        .map_err(|e| NatsError::Kv(format!("watching desired state: {e}")))?;
    Ok(messages.map(|m| {
        let m = m.map_err(|e| NatsError::Kv(format!("watch: {e}")))?;
        let revision = m
            .info()
            .map_err(|e| NatsError::Kv(format!("watch: {e}")))?
            .stream_sequence;
        let header = |name: &str| {
            m.headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
        };
        let operation = match (header("KV-Operation"), header("Nats-Marker-Reason")) {
            (Some(op), _) if op == "DEL" => Operation::Delete,
            (Some(op), _) if op == "PURGE" => Operation::Purge,
            (None, Some(r)) if r == "Remove" => Operation::Delete,
            (None, Some(_)) => Operation::Purge,
            _ => Operation::Put,
        };
        Ok((operation, revision, m.payload.clone()))
    }))
}

fn candidate(op: Operation, revision: u64, value: bytes::Bytes) -> Candidate {
    match op {
        Operation::Put => Candidate::Put { revision, value },
        Operation::Delete | Operation::Purge => Candidate::Deleted { revision },
    }
}

/// Why a compare-and-set write gave up.
#[derive(Debug, thiserror::Error)]
pub enum CasError {
    #[error("{0}")]
    Nats(String),
    #[error("encoding: {0}")]
    Encode(#[from] fleetlet_protocol::EncodeError),
    #[error("gave up after {0} conflicting writes")]
    Contended(u32),
}

/// Read-modify-write of a status key with compare-and-set: `next` computes the new value
/// from the stored one (None when absent or unreadable), and the write only lands on top of
/// the revision it was computed from. Conflicts re-read and retry, so concurrent writers
/// never overwrite a value they have not seen.
pub async fn cas_update_status(
    kv: &Store,
    key: &str,
    mut next: impl FnMut(Option<AgentStatus>) -> AgentStatus,
) -> Result<u64, CasError> {
    const ATTEMPTS: u32 = 32;
    for _ in 0..ATTEMPTS {
        let entry = kv
            .entry(key)
            .await
            .map_err(|e| CasError::Nats(format!("reading {key}: {e}")))?;
        let (current, revision) = match entry {
            Some(e) if e.operation == Operation::Put => {
                (decode::<AgentStatus>(&e.value).ok(), Some(e.revision))
            }
            _ => (None, None),
        };
        let bytes = encode(&next(current))?;
        let result = match revision {
            Some(rev) => kv.update(key, bytes.into(), rev).await.map_err(|e| {
                if e.kind() == UpdateErrorKind::WrongLastRevision {
                    None
                } else {
                    Some(e.to_string())
                }
            }),
            None => kv.create(key, bytes.into()).await.map_err(|e| {
                if e.kind() == CreateErrorKind::AlreadyExists {
                    None
                } else {
                    Some(e.to_string())
                }
            }),
        };
        match result {
            Ok(rev) => return Ok(rev),
            Err(None) => {
                debug!(key, "status write conflicted; re-reading");
                tokio::time::sleep(Duration::from_millis(fastrand::u64(1..20))).await;
            }
            Err(Some(e)) => return Err(CasError::Nats(e)),
        }
    }
    Err(CasError::Contended(ATTEMPTS))
}

/// The agent's status as it should be written over whatever is stored: the agent owns
/// every field, but a drift count never goes backwards.
pub fn merge_own_status(ours: &AgentStatus, stored: Option<AgentStatus>) -> AgentStatus {
    let mut next = ours.clone();
    if let Some(s) = stored {
        next.drift_repairs = next.drift_repairs.max(s.drift_repairs);
    }
    next
}

/// Writes the newest status whenever it changes, retrying until NATS takes it.
/// On stop, makes one last attempt to flush what is pending.
#[instrument(skip_all, fields(device = %device))]
pub async fn write_status(
    client: async_nats::Client,
    device: DeviceId,
    mut rx: watch::Receiver<AgentStatus>,
    mut stop: watch::Receiver<bool>,
) {
    let js = jetstream::new(client);
    let key = ACTUAL_STATE.key(&device).to_owned();
    let mut kv: Option<Store> = None;
    let mut written: Option<AgentStatus> = None;
    let mut attempt = 0u32;
    loop {
        let pending = rx.borrow_and_update().clone();
        if written.as_ref() != Some(&pending) {
            let result = async {
                if kv.is_none() {
                    kv = Some(
                        bind(&js, ACTUAL_STATE)
                            .await
                            .map_err(|e| CasError::Nats(e.to_string()))?,
                    );
                }
                let store = kv
                    .as_ref()
                    .ok_or_else(|| CasError::Nats("not bound".into()))?;
                cas_update_status(store, &key, |stored| merge_own_status(&pending, stored)).await
            };
            let result = tokio::select! {
                r = result => Some(r),
                _ = crate::stopped(&mut stop), if written.is_some() || attempt > 0 => None,
            };
            match result {
                Some(Ok(revision)) => {
                    debug!(
                        revision,
                        generation = pending.observed_generation,
                        "status written"
                    );
                    written = Some(pending);
                    attempt = 0;
                }
                Some(Err(e)) => {
                    let delay =
                        backoff_delay(attempt, Duration::from_millis(500), Duration::from_secs(30));
                    attempt = attempt.saturating_add(1);
                    warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "status not written yet");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => continue,
                        _ = crate::stopped(&mut stop) => return,
                        _ = rx.changed() => continue,
                    }
                }
                None => return,
            }
        }
        tokio::select! {
            _ = crate::stopped(&mut stop) => {
                // A final status may have been published just before stop.
                if rx.has_changed().unwrap_or(false) && let Some(store) = &kv {
                    let last = rx.borrow_and_update().clone();
                    let _ = tokio::time::timeout(
                        Duration::from_secs(5),
                        cas_update_status(store, &key, |stored| merge_own_status(&last, stored)),
                    )
                    .await;
                }
                return;
            }
            r = rx.changed() => if r.is_err() { return },
        }
    }
}

/// Puts a heartbeat every interval, on its own task so reconciling never delays it.
#[instrument(skip_all, fields(device = %settings.device))]
pub async fn heartbeat(
    client: async_nats::Client,
    settings: Arc<Settings>,
    mut stop: watch::Receiver<bool>,
) {
    let js = jetstream::new(client);
    let key = HEARTBEAT.key(&settings.device).to_owned();
    let mut facts = Facts::new(settings.clone());
    let mut kv: Option<Store> = None;
    let mut tick = tokio::time::interval(settings.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = crate::stopped(&mut stop) => return,
            _ = tick.tick() => {}
        }
        let hb = facts.heartbeat();
        let bytes = match encode(&hb) {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "cannot encode heartbeat");
                continue;
            }
        };
        if kv.is_none() {
            kv = bind(&js, HEARTBEAT)
                .await
                .map_err(|e| debug!(error = %e, "heartbeat bucket not reachable"))
                .ok();
        }
        if let Some(store) = &kv
            && let Err(e) = store.put(key.as_str(), bytes.into()).await
        {
            debug!(error = %e, sequence = hb.sequence, "heartbeat not delivered");
        }
    }
}
