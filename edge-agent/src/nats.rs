//! The agent's side of NATS: connecting, watching its manifest, writing status with
//! compare-and-set, and heartbeats. Every loop here survives the server going away.
//!
//! The agent uses only subjects that name its own keys (see `fleetlet_protocol::access`):
//! direct gets of its manifest and status, publishes of its status and heartbeat (with
//! compare-and-set in a header), and the changes subject where JetStream republishes each
//! stored manifest. It never creates a consumer or asks about a stream.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_nats::ServerAddr;
use fleetlet_protocol::{
    AgentStatus, DeviceFacts, DeviceId, FactsReport, decode, encode,
    kv::{
        ACTUAL_STATE, Bucket, DESIRED_STATE, EXPECTED_LAST_SUBJECT_SEQUENCE, FACTS, HEARTBEAT,
        OPERATION_HEADER, SEQUENCE_HEADER,
    },
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

/// A NATS client and the count of connections it has made, which moves as each one is
/// made. What must act on a reconnect (read the manifest again, beat at once) waits on the
/// count instead of polling the client: an idle agent does not wake for nothing.
#[derive(Debug, Clone)]
pub struct Link {
    pub client: async_nats::Client,
    pub connects: watch::Receiver<u64>,
}

/// Connects (or keeps trying in the background: the agent starts without NATS).
pub async fn connect(s: &Settings) -> Result<Link, NatsError> {
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
    let (connected, connects) = watch::channel(0u64);
    let mut opts = async_nats::ConnectOptions::new()
        .event_callback(move |event| {
            if matches!(event, async_nats::Event::Connected) {
                connected.send_modify(|n| *n = n.wrapping_add(1));
            }
            std::future::ready(())
        })
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
    let client = opts.connect(addrs).await?;
    Ok(Link { client, connects })
}

/// One stored KV record of this device, as a direct get or a republished change returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The KV revision (the stream sequence).
    pub revision: u64,
    /// Whether it is a value or a delete / purge marker.
    pub deleted: bool,
    pub value: bytes::Bytes,
}

impl Entry {
    /// Reads an entry from a stored message's headers: `None` without a sequence.
    fn from_message(m: &async_nats::Message) -> Option<Self> {
        let header = |name: &str| {
            m.headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
        };
        let revision = header(SEQUENCE_HEADER)?.parse().ok()?;
        let deleted = matches!(header(OPERATION_HEADER).as_deref(), Some("DEL" | "PURGE"));
        Some(Self {
            revision,
            deleted,
            value: m.payload.clone(),
        })
    }
}

/// The device's latest record in `bucket`, by a direct get whose subject names the key (the
/// only kind of read a device's NATS account imports).
pub async fn get(
    client: &async_nats::Client,
    bucket: Bucket,
    device: &DeviceId,
) -> Result<Option<Entry>, NatsError> {
    let m = client
        .request(bucket.direct_get(device), bytes::Bytes::new())
        .await
        .map_err(|e| NatsError::Kv(format!("reading {}: {e}", bucket.name)))?;
    match m.status.map(|s| s.as_u16()) {
        Some(404) => Ok(None),
        Some(code) if code >= 300 => Err(NatsError::Kv(format!(
            "reading {}: status {code} {}",
            bucket.name,
            m.description.clone().unwrap_or_default()
        ))),
        _ => Entry::from_message(&m).map(Some).ok_or_else(|| {
            NatsError::Kv(format!(
                "reading {}: an answer without a sequence",
                bucket.name
            ))
        }),
    }
}

/// Why a write was not stored.
#[derive(Debug, thiserror::Error)]
pub enum PutError {
    /// The key's revision was not the expected one (compare-and-set lost).
    #[error("the stored revision changed")]
    Conflict,
    #[error("{0}")]
    Nats(String),
}

/// Stores `value` as the device's record in `bucket` and returns its revision. With
/// `expected`, only on top of that revision (`Some(0)`: only if the key has no value).
pub async fn put(
    client: &async_nats::Client,
    bucket: Bucket,
    device: &DeviceId,
    value: bytes::Bytes,
    expected: Option<u64>,
) -> Result<u64, PutError> {
    #[derive(serde::Deserialize)]
    struct Ack {
        seq: Option<u64>,
        error: Option<AckError>,
    }
    #[derive(serde::Deserialize)]
    struct AckError {
        err_code: Option<u64>,
        description: Option<String>,
    }
    /// JetStream's "wrong last sequence".
    const WRONG_LAST_SEQUENCE: u64 = 10071;
    let mut headers = async_nats::HeaderMap::new();
    if let Some(n) = expected {
        headers.insert(EXPECTED_LAST_SUBJECT_SEQUENCE, n.to_string().as_str());
    }
    let m = client
        .request_with_headers(bucket.subject(device), headers, value)
        .await
        .map_err(|e| PutError::Nats(format!("writing {}: {e}", bucket.name)))?;
    let ack: Ack = serde_json::from_slice(&m.payload).map_err(|e| {
        PutError::Nats(format!(
            "writing {}: unreadable acknowledgement: {e}",
            bucket.name
        ))
    })?;
    match (ack.seq, ack.error) {
        (_, Some(e)) if e.err_code == Some(WRONG_LAST_SEQUENCE) => Err(PutError::Conflict),
        (_, Some(e)) => Err(PutError::Nats(format!(
            "writing {}: {}",
            bucket.name,
            e.description.unwrap_or_default()
        ))),
        (Some(seq), None) if seq > 0 => Ok(seq),
        _ => Err(PutError::Nats(format!(
            "writing {}: an acknowledgement without a sequence",
            bucket.name
        ))),
    }
}

/// Watches the device's desired-state key and forwards every newer value to the engine.
///
/// JetStream republishes each stored manifest on the device's changes subject, which the
/// agent subscribes to; nothing is created on the server. Republished messages are not
/// replayed, so the current value is read with a direct get when the watch starts, after
/// every reconnect (`link.connects` moves) or return of the uplink (`uplink` changes), and
/// every `resync` in case a message was dropped on the way. Between those it sleeps until a
/// message or one of them comes.
#[instrument(skip_all, fields(device = %device))]
pub async fn watch_manifest(
    link: Link,
    device: DeviceId,
    mut last_seen: u64,
    resync: Duration,
    tx: mpsc::Sender<Candidate>,
    mut uplink: watch::Receiver<u64>,
    mut stop: watch::Receiver<bool>,
) {
    let Link {
        client,
        mut connects,
    } = link;
    let mut attempt = 0u32;
    loop {
        let result = async {
            // Whatever connection or return of the uplink came before this point, the direct
            // get below reads after it; any later one makes the watch read again.
            connects.borrow_and_update();
            uplink.borrow_and_update();
            let mut changes = client
                .subscribe(DESIRED_STATE.changes(&device))
                .await
                .map_err(|e| NatsError::Kv(format!("watching desired state: {e}")))?;
            let offer = |e: Entry, last_seen: &mut u64| {
                (e.revision > *last_seen).then(|| {
                    *last_seen = e.revision;
                    candidate(e)
                })
            };
            if let Some(c) = get(&client, DESIRED_STATE, &device)
                .await?
                .and_then(|e| offer(e, &mut last_seen))
                && tx.send(c).await.is_err()
            {
                return Ok(());
            }
            info!(after_revision = last_seen, "watching desired state");
            attempt = 0;
            let resync_at = tokio::time::sleep(resync);
            tokio::pin!(resync_at);
            // A new connection, or the leaf node's link back (see heartbeat). A sender gone
            // (the client closed) disables its branch, and the others still wake the loop.
            let reconnected = loop {
                tokio::select! {
                    m = changes.next() => {
                        let m = m.ok_or_else(|| NatsError::Kv("watch ended".into()))?;
                        let Some(e) = Entry::from_message(&m) else { continue };
                        if let Some(c) = offer(e, &mut last_seen)
                            && tx.send(c).await.is_err()
                        {
                            return Ok(());
                        }
                    }
                    Ok(()) = connects.changed() => break true,
                    Ok(()) = uplink.changed() => break true,
                    () = &mut resync_at => break false,
                }
            };
            debug!(reconnected, "reading desired state again");
            Err(NatsError::Kv(String::new()))
        };
        let outcome = tokio::select! {
            _ = crate::stopped(&mut stop) => return,
            r = result => r,
        };
        match outcome {
            Ok(()) => return,
            // A planned re-read: no delay.
            Err(NatsError::Kv(e)) if e.is_empty() => continue,
            Err(e) => {
                let delay =
                    backoff_delay(attempt, Duration::from_millis(500), Duration::from_secs(30));
                attempt = attempt.saturating_add(1);
                warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "desired-state watch interrupted");
                tokio::select! {
                    _ = crate::stopped(&mut stop) => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Asks the control plane for the device's freshness floor until a valid answer arrives
/// (signed by a trusted key, for this device and this request), and hands it to the engine.
#[instrument(skip_all, fields(device = %settings.device))]
pub async fn fetch_floor(
    client: async_nats::Client,
    settings: Arc<Settings>,
    tx: mpsc::Sender<Candidate>,
    mut stop: watch::Receiver<bool>,
) {
    let subject = fleetlet_protocol::access::floor_subject(&settings.device);
    let mut attempt = 0u32;
    loop {
        let nonce = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        let body = serde_json::to_vec(&fleetlet_protocol::signing::FloorRequest {
            nonce: nonce.clone(),
        })
        .unwrap_or_default();
        let answer = tokio::select! {
            _ = crate::stopped(&mut stop) => return,
            r = client.request(subject.clone(), body.into()) => r,
        };
        let outcome = answer.map_err(|e| e.to_string()).and_then(|m| {
            crate::trust::verify_floor(
                &settings.manifest_keys,
                &m.payload,
                &settings.device,
                &nonce,
            )
        });
        match outcome {
            Ok(generation) => {
                let _ = tx.send(Candidate::Floor { generation }).await;
                return;
            }
            Err(e) => {
                let delay =
                    backoff_delay(attempt, Duration::from_millis(500), Duration::from_secs(30));
                attempt = attempt.saturating_add(1);
                warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "no freshness floor yet");
                tokio::select! {
                    _ = crate::stopped(&mut stop) => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

fn candidate(e: Entry) -> Candidate {
    if e.deleted {
        Candidate::Deleted {
            revision: e.revision,
        }
    } else {
        Candidate::Put {
            revision: e.revision,
            value: e.value,
        }
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

/// Read-modify-write of the device's status with compare-and-set: `next` computes the new
/// value from the stored one (None when absent or unreadable), and the write only lands on
/// top of the revision it was computed from. Conflicts re-read and retry, so concurrent
/// writers never overwrite a value they have not seen.
pub async fn cas_update_status(
    client: &async_nats::Client,
    device: &DeviceId,
    next: impl FnMut(Option<AgentStatus>) -> AgentStatus,
) -> Result<u64, CasError> {
    cas_update_status_from(client, device, None, next)
        .await
        .map(|(revision, _)| revision)
}

/// [`cas_update_status`], starting from `known` (a revision and the value stored there,
/// as this writer left it) instead of a read when given: a write in one request while no
/// one else wrote. Returns the revision written and the value written there.
async fn cas_update_status_from(
    client: &async_nats::Client,
    device: &DeviceId,
    mut known: Option<(u64, AgentStatus)>,
    mut next: impl FnMut(Option<AgentStatus>) -> AgentStatus,
) -> Result<(u64, AgentStatus), CasError> {
    const ATTEMPTS: u32 = 32;
    let mut attempts = 0;
    while attempts < ATTEMPTS {
        let from_known = known.is_some();
        let (current, revision) = match known.take() {
            Some((revision, stored)) => (Some(stored), revision),
            None => {
                attempts += 1;
                let entry = get(client, ACTUAL_STATE, device)
                    .await
                    .map_err(|e| CasError::Nats(e.to_string()))?;
                match entry {
                    Some(e) if !e.deleted => (decode::<AgentStatus>(&e.value).ok(), e.revision),
                    // No value (or a delete marker): write on top of whatever revision is there.
                    Some(e) => (None, e.revision),
                    None => (None, 0),
                }
            }
        };
        let value = next(current);
        let bytes = encode(&value)?;
        match put(client, ACTUAL_STATE, device, bytes.into(), Some(revision)).await {
            Ok(rev) => return Ok((rev, value)),
            Err(PutError::Conflict) if from_known => {
                debug!(%device, "status changed since this agent wrote it; re-reading");
            }
            Err(PutError::Conflict) => {
                debug!(%device, "status write conflicted; re-reading");
                tokio::time::sleep(Duration::from_millis(fastrand::u64(1..20))).await;
            }
            Err(PutError::Nats(e)) => return Err(CasError::Nats(e)),
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

/// Writes `ours` over the device's stored status. When `known` holds the revision this
/// writer stored last and what it stored there, the write goes on top of that revision in
/// one request; only when something else wrote in between (a conflict) is the stored
/// value read back, as [`cas_update_status`] does. `known` is left with what was stored,
/// or empty when that is not certain.
pub async fn write_own_status(
    client: &async_nats::Client,
    device: &DeviceId,
    ours: &AgentStatus,
    known: &mut Option<(u64, AgentStatus)>,
) -> Result<u64, CasError> {
    let (revision, written) = cas_update_status_from(client, device, known.take(), |stored| {
        merge_own_status(ours, stored)
    })
    .await?;
    *known = Some((revision, written));
    Ok(revision)
}

/// Writes the newest status whenever it changes, retrying until NATS takes it.
/// On stop, makes one last attempt to flush what is pending.
#[instrument(skip_all, fields(device = %device))]
pub async fn write_status(
    client: async_nats::Client,
    device: DeviceId,
    mut rx: watch::Receiver<AgentStatus>,
    uplink: Arc<Uplink>,
    mut stop: watch::Receiver<bool>,
) {
    let mut written: Option<AgentStatus> = None;
    let mut known: Option<(u64, AgentStatus)> = None;
    let mut attempt = 0u32;
    loop {
        let pending = rx.borrow_and_update().clone();
        if written.as_ref() != Some(&pending) {
            let result = write_own_status(&client, &device, &pending, &mut known);
            let result = tokio::select! {
                r = result => Some(r),
                _ = crate::stopped(&mut stop), if written.is_some() || attempt > 0 => None,
            };
            if let Some(r) = &result {
                uplink.answered(!matches!(r, Err(CasError::Nats(_))));
            }
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
                if rx.has_changed().unwrap_or(false) {
                    let last = rx.borrow_and_update().clone();
                    let _ = tokio::time::timeout(
                        Duration::from_secs(5),
                        write_own_status(&client, &device, &last, &mut known),
                    )
                    .await;
                }
                return;
            }
            r = rx.changed() => if r.is_err() { return },
        }
    }
}

/// Stored facts are written again after this long even when nothing changed, so a record
/// lost on the server side (a bucket restored from an older backup, a key removed with its
/// EdgeDevice) comes back within it.
const FACTS_REFRESH: Duration = Duration::from_secs(3600);

/// Sends a heartbeat every interval and at once on each new connection, on its own task so
/// reconciling never delays it, and stores the device's facts before it whenever they
/// changed: on a new connection, and every [`FACTS_REFRESH`].
#[instrument(skip_all, fields(device = %settings.device))]
pub async fn heartbeat(
    link: Link,
    settings: Arc<Settings>,
    sealing_key: String,
    containers: Option<crate::container::ContainerReconciler>,
    uplink: Arc<Uplink>,
    mut stop: watch::Receiver<bool>,
) {
    let Link {
        client,
        mut connects,
    } = link;
    let mut probe = UplinkProbe::new(settings.nats.uplink_probe_seconds);
    let mut facts = Facts::new(settings.clone(), Some(sealing_key));
    // The runtime's version, asked again every few minutes (podman may be upgraded or
    // come up late); a heartbeat never waits long for it.
    let mut runtime: Option<String> = None;
    let mut runtime_asked: Option<tokio::time::Instant> = None;
    // The facts last acknowledged by JetStream, on which connection and when.
    let mut stored: Option<(DeviceFacts, u64, tokio::time::Instant)> = None;
    let mut tick = tokio::time::interval(settings.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A new connection (the first one included) beats at once instead of at the next tick:
    // a device that starts before its NATS link is up, or comes back after an outage, is
    // seen alive as soon as it can be. Until a beat is sent on the current connection (it
    // is not up yet, or a probe went unanswered while the uplink is lost), the agent looks
    // again every second; once one is, it sleeps until the next tick or connection.
    let mut look = tokio::time::interval(Duration::from_secs(1));
    look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut beaten_on: Option<u64> = None;
    loop {
        let current = || client.statistics().connects.load(Ordering::Relaxed);
        let unbeaten = beaten_on != Some(current());
        tokio::select! {
            _ = crate::stopped(&mut stop) => return,
            _ = tick.tick() => {}
            // A sender gone (the client closed) disables this branch; the tick still beats.
            Ok(()) = connects.changed(), if !unbeaten => continue,
            _ = look.tick(), if unbeaten => {
                if beaten_on == Some(current())
                    || client.connection_state() != async_nats::connection::State::Connected
                {
                    continue;
                }
            }
        }
        if let Some(c) = &containers
            && runtime_asked
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(300) || runtime.is_none())
        {
            runtime_asked = Some(tokio::time::Instant::now());
            runtime = tokio::time::timeout(Duration::from_secs(2), c.runtime_version())
                .await
                .ok()
                .flatten();
        }
        // While disconnected a beat would wait in the client's queue and arrive stale (and
        // queued beats would hold memory for as long as the link is down): skip it.
        if client.connection_state() != async_nats::connection::State::Connected {
            continue;
        }
        let now = facts.facts(runtime.clone());
        let connection = client.statistics().connects.load(Ordering::Relaxed);
        let due = stored.as_ref().is_none_or(|(f, conn, at)| {
            *f != now || *conn != connection || at.elapsed() >= FACTS_REFRESH
        });
        if due {
            stored = store_facts(&client, &settings.device, facts.report(now.clone()))
                .await
                .then(|| (now, connection, tokio::time::Instant::now()))
                .or(stored);
        }
        let hb = facts.heartbeat();
        let bytes = match encode(&hb) {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "cannot encode heartbeat");
                continue;
            }
        };
        if probe.due(uplink.lost()) {
            let acknowledged = tokio::time::timeout(
                Duration::from_secs(5),
                put(&client, HEARTBEAT, &settings.device, bytes.into(), None),
            )
            .await
            .is_ok_and(|r| r.is_ok());
            probe.asked();
            uplink.answered(acknowledged);
            if acknowledged {
                beaten_on = Some(connection);
                tick.reset();
            } else {
                debug!(
                    sequence = hb.sequence,
                    "heartbeat not acknowledged: no uplink"
                );
            }
            continue;
        }
        // Published without asking for JetStream's acknowledgement: the stream stores it all
        // the same, a lost beat is replaced by the next one, and an idle device's bytes on
        // the wire lose the acknowledgement and the reply subject of every beat.
        match client
            .publish(HEARTBEAT.subject(&settings.device), bytes.into())
            .await
        {
            Ok(()) => {
                beaten_on = Some(connection);
                tick.reset();
            }
            Err(e) => debug!(error = %e, sequence = hb.sequence, "heartbeat not sent"),
        }
    }
}

/// Whether JetStream answers the agent's writes. Connected to a site's leaf node, the
/// agent stays connected while the leaf node's own link to the central servers is down;
/// a write left unanswered (a status, or a heartbeat probe) marks the uplink lost, and the
/// first answered one after that is its return, which makes the manifest watch read the
/// desired state at once (a manifest stored meanwhile never reached the device).
#[derive(Debug)]
pub struct Uplink {
    lost: AtomicBool,
    back: watch::Sender<u64>,
}

impl Uplink {
    /// The uplink, and what the manifest watch listens to for its returns.
    pub fn new() -> (Arc<Self>, watch::Receiver<u64>) {
        let (back, returns) = watch::channel(0);
        (
            Arc::new(Self {
                lost: AtomicBool::new(false),
                back,
            }),
            returns,
        )
    }

    /// Records whether JetStream answered a write; true when the uplink is back.
    pub fn answered(&self, answered: bool) -> bool {
        if !answered {
            self.lost.store(true, Ordering::Relaxed);
            return false;
        }
        let back = self.lost.swap(false, Ordering::Relaxed);
        if back {
            info!("JetStream answers again: reading desired state");
            self.back.send_modify(|n| *n = n.wrapping_add(1));
        }
        back
    }

    fn lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }
}

/// When a heartbeat asks for JetStream's acknowledgement (`[nats] uplink_probe_seconds`):
/// every `every`, and on every beat while the uplink is lost.
#[derive(Debug)]
struct UplinkProbe {
    every: Option<Duration>,
    last: Option<tokio::time::Instant>,
}

impl UplinkProbe {
    fn new(seconds: u64) -> Self {
        Self {
            every: (seconds > 0).then(|| Duration::from_secs(seconds)),
            last: None,
        }
    }

    fn due(&self, lost: bool) -> bool {
        self.every
            .is_some_and(|every| lost || self.last.is_none_or(|t| t.elapsed() >= every))
    }

    fn asked(&mut self) {
        self.last = Some(tokio::time::Instant::now());
    }
}

/// Stores the device's facts with JetStream's acknowledgement; false when they were not
/// stored (tried again on the next beat).
async fn store_facts(client: &async_nats::Client, device: &DeviceId, report: FactsReport) -> bool {
    let bytes = match encode(&report) {
        Ok(b) => b,
        Err(e) => {
            warn!(error = %e, "cannot encode facts");
            return false;
        }
    };
    match tokio::time::timeout(
        Duration::from_secs(5),
        put(client, FACTS, device, bytes.into(), None),
    )
    .await
    {
        Ok(Ok(revision)) => {
            debug!(revision, "facts stored");
            true
        }
        Ok(Err(e)) => {
            warn!(error = %e, "facts not stored");
            false
        }
        Err(_) => {
            warn!("facts not stored: no acknowledgement within 5 s");
            false
        }
    }
}

#[cfg(test)]
mod uplink_tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_probe_asks_every_period_and_on_every_beat_while_the_uplink_is_lost() {
        assert!(!UplinkProbe::new(0).due(true), "off by default");
        let mut p = UplinkProbe::new(120);
        assert!(p.due(false), "the first beat asks");
        p.asked();
        assert!(!p.due(false));
        assert!(p.due(true), "every beat asks while the uplink is lost");
        tokio::time::advance(Duration::from_secs(119)).await;
        assert!(!p.due(false));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(p.due(false));
    }

    #[tokio::test]
    async fn the_first_answer_after_a_lost_one_is_the_return() {
        let (uplink, mut returns) = Uplink::new();
        assert!(!uplink.answered(true), "answers while nothing was lost");
        assert!(!returns.has_changed().unwrap());
        assert!(!uplink.answered(false));
        assert!(!uplink.answered(false));
        assert!(uplink.lost());
        assert!(uplink.answered(true), "the return");
        assert!(returns.has_changed().unwrap());
        returns.borrow_and_update();
        assert!(!uplink.answered(true), "once");
        assert!(!returns.has_changed().unwrap());
    }
}
