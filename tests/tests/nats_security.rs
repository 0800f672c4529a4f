//! The adversarial suite: one compromised device (or the bridge's credentials) against a
//! real nats-server, with the accounts `fleetlet_protocol::access` describes, in both ways
//! they are deployed (static accounts with passwords over TLS, and operator mode with
//! JWTs as the controller issues them).
//!
//! The cases are generated from the permission sets: every subject an attacker may publish
//! to is sent a request whose reply subject aims at each class of target (another device's
//! keys, every JetStream API verb on every bucket, another device's relay, frames and inbox
//! subjects, the system account's subjects), with a payload the attacker controls (its own
//! status, crafted to be a damaging API request). After each case the suite checks the
//! effect, not the answer: the victim's keys, every stream's configuration and consumers,
//! the set of streams, and nothing delivered where it does not belong. A new allowed
//! subject is attacked automatically.
//!
//! The same suite run against the layout before accounts (one shared account, per-subject
//! permissions) finds the breaches that layout had: it can fail.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_nats::{Client, HeaderMap, jetstream};
use fleetlet_protocol::{
    DeviceId, access,
    kv::{ACTUAL_STATE, BUCKETS, Bucket, DESIRED_STATE, FACTS, HEARTBEAT},
    relay,
};
use fleetlet_testenv::{
    TestEnv, components, eventually,
    nats::{self, Operator, static_password},
    proxy::TcpProxy,
};
use futures::StreamExt;
use kube::Api;

const ATTACKER: &str = "pi-a";
const VICTIM: &str = "pi-b";

fn dev(name: &str) -> DeviceId {
    DeviceId::new(name).unwrap()
}

/// What the attacker stores as its own status: a value that is also a damaging body for
/// the JetStream API (a consumer over every manifest delivered to the attacker, a stream
/// capturing everything, a purge), so an answer landing on an API subject would act.
fn crafted() -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "apiVersion": "fleetlet.dev/v1alpha1", "device": ATTACKER,
        "stream_name": "KV_desired-state",
        "config": {
            "name": "evil", "durable_name": "evil", "deliver_subject": "evil.deliveries",
            "filter_subject": "$KV.desired-state.>", "ack_policy": "none",
            "subjects": ["$KV.>"],
        },
        "name": "KV_evil", "subjects": ["evil.>"],
        "filter": "$KV.desired-state.pi-b", "keep": 0,
        "seq": 1, "last_by_subj": "$KV.desired-state.pi-b",
        "subjects_filter": ">",
        "accounts": [],
    }))
    .unwrap()
}

/// Reply subjects aimed at each class of target.
fn targets() -> Vec<String> {
    let victim = dev(VICTIM);
    let mut t = vec![];
    for b in BUCKETS {
        t.push(b.subject(&victim));
        t.push(b.changes(&victim));
        let s = b.stream();
        for verb in [
            format!("STREAM.DELETE.{s}"),
            format!("STREAM.PURGE.{s}"),
            format!("STREAM.UPDATE.{s}"),
            format!("STREAM.INFO.{s}"),
            format!("STREAM.MSG.DELETE.{s}"),
            format!("STREAM.MSG.GET.{s}"),
            format!("CONSUMER.CREATE.{s}"),
            format!("CONSUMER.CREATE.{s}.evil"),
            format!("CONSUMER.CREATE.{s}.evil.{}", b.all_subjects()),
            format!("CONSUMER.DURABLE.CREATE.{s}.evil"),
            format!("CONSUMER.LIST.{s}"),
            format!("DIRECT.GET.{s}"),
            format!("DIRECT.GET.{s}.{}", b.subject(&victim)),
        ] {
            t.push(format!("$JS.API.{verb}"));
        }
    }
    for api in [
        "STREAM.CREATE.KV_evil",
        "STREAM.CREATE.evil",
        "INFO",
        "STREAM.LIST",
        "STREAM.NAMES",
    ] {
        t.push(format!("$JS.API.{api}"));
    }
    t.extend([
        relay::exec_subject(&victim),
        relay::control_subject(&victim, "s1"),
        relay::frames_subject(&victim),
        access::floor_subject(&victim),
        format!("_INBOX_{VICTIM}.evil"),
        "_INBOX.evil".into(),
        "$SYS.REQ.CLAIMS.UPDATE".into(),
        "$SYS.REQ.CLAIMS.DELETE".into(),
        "$SYS.REQ.SERVER.PING".into(),
        "$SYS.REQ.SERVER.PING.CONNZ".into(),
    ]);
    t
}

/// Whether NATS subject `pattern` (with `*` and `>`) matches `subject`.
fn matches(pattern: &str, subject: &str) -> bool {
    let (mut p, mut s) = (pattern.split('.'), subject.split('.'));
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// A concrete subject for each publish permission (wildcards aimed at the victim).
fn concrete(subject: &str) -> String {
    subject
        .replace(".*.", &format!(".{VICTIM}."))
        .replace(".>", ".exec")
}

/// The victim's records as the fleet account sees them, every stream's configuration,
/// state of the victim's subjects and consumers, and the set of streams.
#[derive(Debug, PartialEq)]
struct Snapshot {
    keys: BTreeMap<String, Option<(u64, Vec<u8>)>>,
    streams: BTreeMap<String, (serde_json::Value, usize)>,
}

async fn snapshot(js: &jetstream::Context) -> Snapshot {
    let victim = dev(VICTIM);
    let mut keys = BTreeMap::new();
    for b in BUCKETS {
        let kv = js.get_key_value(b.name).await.ok();
        let entry = match kv {
            Some(kv) => kv
                .entry(b.key(&victim))
                .await
                .ok()
                .flatten()
                .map(|e| (e.revision, e.value.to_vec())),
            None => None,
        };
        keys.insert(b.name.to_owned(), entry);
    }
    let mut streams = BTreeMap::new();
    let names: Vec<String> = js
        .stream_names()
        .map(|n| n.unwrap())
        .collect::<Vec<_>>()
        .await;
    for name in names {
        // A stream an attack deleted between the listing and here shows as gone.
        let Ok(mut s) = js.get_stream(&name).await else {
            streams.insert(name, (serde_json::Value::Null, 0));
            continue;
        };
        let Ok(info) = s.info().await else {
            streams.insert(name, (serde_json::Value::Null, 0));
            continue;
        };
        let config = serde_json::to_value(&info.config).unwrap();
        streams.insert(name, (config, info.state.consumer_count));
    }
    Snapshot { keys, streams }
}

/// One message a listener heard.
struct Heard {
    subject: String,
    reply: Option<String>,
    payload: Vec<u8>,
}

/// Messages heard by a listener.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<Heard>>>);

impl Seen {
    async fn listen(&self, client: &Client, subject: &str) {
        let mut sub = client.subscribe(subject.to_owned()).await.unwrap();
        let seen = self.0.clone();
        tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                seen.lock().unwrap().push(Heard {
                    subject: m.subject.to_string(),
                    reply: m.reply.map(|r| r.to_string()),
                    payload: m.payload.to_vec(),
                });
            }
        });
    }

    fn take(&self) -> Vec<Heard> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }

    fn has(&self, payload: &[u8]) -> bool {
        self.0.lock().unwrap().iter().any(|h| h.payload == payload)
    }
}

/// One attack: a message, and what would show that it worked.
struct Case {
    /// For the report: which class of attack this is.
    class: &'static str,
    subject: String,
    /// The reply subject aimed at a target; empty: the attacker's own inbox.
    reply: String,
    /// A subject whose arrival in the fleet account would be a breach (empty: none).
    watch: String,
    /// Said in the breach report (a header tried).
    note: String,
    body: Vec<u8>,
    headers: HeaderMap,
}

/// The class of an attack aimed at `target`.
fn class_of(target: &str) -> &'static str {
    if target.starts_with("$JS.API.") {
        "JetStream API verbs on every bucket"
    } else if target.starts_with("$KV.") || target.starts_with("fleetlet.kv.") {
        "another device's desired state, status and heartbeat keys"
    } else if target.starts_with("$SYS.") {
        "the system account ($SYS)"
    } else {
        "another device's relay, frames, floor and inbox subjects"
    }
}

/// One attacker: a connection and the subjects it may publish to.
struct Attacker {
    name: String,
    client: Client,
    allowed: Vec<String>,
    /// An acknowledged write of its own, proving the server processed what it sent
    /// before (`None`: the attacker has no write; a round trip is the barrier).
    barrier: Option<String>,
    /// It may read every device's status and heartbeat (the bridge), never a manifest.
    reads_status: bool,
}

/// Everything a case can affect, and how to see it.
struct World {
    admin: Client,
    js: jetstream::Context,
    /// Traffic in the fleet account on any subject.
    fleet_seen: Seen,
    /// What the victim's own connection receives (its inbox, relay and changes subjects).
    victim: Client,
    victim_seen: Seen,
    /// What the bridge's connection receives (frames, changes, its inbox).
    bridge: Client,
    bridge_seen: Seen,
    /// Whether the buckets accept rollup headers (the layout before accounts).
    rollup: bool,
}

impl World {
    /// Puts the buckets and every record back as they were before the suite, after a case
    /// changed them: one breach must not hide the next.
    async fn reset(&self) {
        for name in ["KV_evil", "evil"] {
            let _ = self.js.delete_stream(name).await;
        }
        for b in BUCKETS {
            let _ = self.js.delete_stream(b.stream()).await;
            let mut config = fleetlet_controller::bucket_stream(b, 1);
            config.allow_rollup = self.rollup;
            self.js.create_stream(config).await.unwrap();
        }
        let desired = self.js.get_key_value(DESIRED_STATE.name).await.unwrap();
        for d in [ATTACKER, VICTIM] {
            desired.put(d, manifest(d, d).into()).await.unwrap();
        }
        for b in [ACTUAL_STATE, HEARTBEAT, FACTS] {
            let kv = self.js.get_key_value(b.name).await.unwrap();
            kv.put(VICTIM, status(VICTIM).into()).await.unwrap();
            kv.put(ATTACKER, crafted().into()).await.unwrap();
        }
    }

    /// Proves that what was sent before has been delivered: a canary through each path.
    async fn settle(&self, n: u32) {
        let canary = format!("canary-{n}");
        // Bridge → victim (relay), victim → bridge (frames): each lands after anything
        // the server queued earlier for that connection.
        self.bridge
            .publish(
                relay::control_subject(&dev(VICTIM), &canary),
                canary.clone().into(),
            )
            .await
            .unwrap();
        let mut h = HeaderMap::new();
        h.insert(relay::SESSION, canary.as_str());
        self.victim
            .publish_with_headers(
                relay::frames_subject(&dev(VICTIM)),
                h,
                canary.clone().into(),
            )
            .await
            .unwrap();
        // A JetStream API round trip, after which earlier API requests were handled.
        // (An attack that deleted the stream shows in the snapshot.)
        let _ = self.js.get_stream(DESIRED_STATE.stream()).await;
        // Polled closely: this runs once per case, hundreds of times.
        for (who, seen) in [("victim", &self.victim_seen), ("bridge", &self.bridge_seen)] {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !seen.has(canary.as_bytes()) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the {who}'s canary {n} did not arrive in 10 s"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    }
}

/// The cases against `attacker`: every target published to directly and aimed at through
/// the reply subject of every subject it may publish, the headers that act on more than one
/// key, and bodies on direct gets that name their key in the subject.
fn cases(attacker: &Attacker) -> Vec<Case> {
    let payload = crafted();
    let mut cases = Vec::new();
    for target in targets() {
        cases.push(Case {
            class: class_of(&target),
            subject: target.clone(),
            reply: String::new(),
            watch: target,
            note: " (published directly)".into(),
            body: payload.clone(),
            headers: HeaderMap::new(),
        });
    }
    for subject in attacker.allowed.iter().map(|s| concrete(s)) {
        for target in targets() {
            cases.push(Case {
                class: class_of(&target),
                subject: subject.clone(),
                reply: target.clone(),
                watch: target,
                note: String::new(),
                body: payload.clone(),
                headers: HeaderMap::new(),
            });
        }
        for (k, v) in [
            ("Nats-Rollup", "all"),
            ("Nats-Rollup", "sub"),
            ("KV-Operation", "PURGE"),
            ("Nats-Expected-Stream", "KV_desired-state"),
            ("Nats-Expected-Last-Sequence", "0"),
            ("Nats-Msg-Id", "fleetlet"),
            ("Nats-TTL", "1s"),
        ] {
            let mut headers = HeaderMap::new();
            headers.insert(k, v);
            cases.push(Case {
                class: "rollup, purge, Nats-Expected-*, Msg-Id and TTL headers",
                subject: subject.clone(),
                reply: String::new(),
                watch: String::new(),
                note: format!(", header {k}: {v}"),
                body: payload.clone(),
                headers,
            });
        }
        if subject.starts_with("$JS.API.DIRECT.GET.") {
            for body in [
                r#"{"seq":1}"#,
                r#"{"last_by_subj":"$KV.desired-state.pi-b"}"#,
                r#"{"seq":1,"batch":100,"next_by_subj":">"}"#,
                r#"{"multi_last":[">"]}"#,
            ] {
                cases.push(Case {
                    class: "a body naming other keys on a direct get",
                    subject: subject.clone(),
                    reply: String::new(),
                    watch: String::new(),
                    note: format!(", body {body}"),
                    body: body.as_bytes().to_vec(),
                    headers: HeaderMap::new(),
                });
            }
        }
    }
    cases
}

/// Whether a stream still takes `subject` (a KV key's subject) as an administrator sees it.
async fn stream_of_subject_exists(js: &jetstream::Context, subject: &str) -> bool {
    use async_nats::jetstream::context::GetStreamByNameErrorKind;
    match js.stream_by_subject(subject).await {
        Ok(_) => true,
        // Only "no stream matches" counts as gone; a slow answer is not evidence.
        Err(e) => e.kind() != GetStreamByNameErrorKind::NotFound,
    }
}

/// Cases tried and cases with an effect, by class of attack.
type Tally = BTreeMap<&'static str, (usize, usize)>;

/// Runs every case against `attacker` and returns the breaches found, each naming the case
/// and what it changed or delivered.
async fn attack(
    world: &World,
    attacker: &Attacker,
    counter: &mut u32,
    tally: &mut Tally,
) -> Vec<String> {
    let mut breaches = Vec::new();
    // What the attacker may publish anyway: a message arriving there is no breach.
    let own = |subject: &str| attacker.allowed.iter().any(|p| matches(p, subject));
    let canary = |p: &[u8]| p.starts_with(b"canary-");
    let mut before = snapshot(&world.js).await;
    for case in cases(attacker) {
        *counter += 1;
        let found_before = breaches.len();
        let inbox = attacker.client.new_inbox();
        let mut answers = attacker.client.subscribe(inbox.clone()).await.unwrap();
        let reply = if case.reply.is_empty() {
            inbox
        } else {
            case.reply.clone()
        };
        attacker
            .client
            .publish_with_reply_and_headers(
                case.subject.clone(),
                reply,
                case.headers.clone(),
                case.body.clone().into(),
            )
            .await
            .unwrap();
        if let Some(own) = &attacker.barrier {
            // The attacker's own write, acknowledged: everything it sent before has been
            // handled. Retried on a timeout (a loaded machine), never on a refusal.
            // An attack can also take the write's stream away: JetStream handles API
            // requests in the background, so a stream deletion routed through a reply may
            // land before the write. Then nothing answers (the suite's own wildcard
            // listener hears the write), the deletion itself shows the attack was handled,
            // and the snapshot below reports it.
            let mut attempt = 0;
            let ack = loop {
                attempt += 1;
                match attacker.client.request(own.clone(), "{}".into()).await {
                    Ok(ack) => break Some(ack),
                    Err(e)
                        if e.kind() == async_nats::client::RequestErrorKind::TimedOut
                            && !stream_of_subject_exists(&world.js, own).await =>
                    {
                        eprintln!(
                            "{}: own write after {} ({}, reply {:?}): its stream is gone",
                            attacker.name, case.class, case.subject, case.reply
                        );
                        break None;
                    }
                    Err(e)
                        if attempt < 4
                            && e.kind() == async_nats::client::RequestErrorKind::TimedOut =>
                    {
                        eprintln!(
                            "{}: own write after {} ({}, reply {:?}) timed out; asking again",
                            attacker.name, case.class, case.subject, case.reply
                        );
                    }
                    Err(e) => panic!(
                        "{}'s own write after {} ({}, reply {:?}) got no answer in {attempt} tries: {e}",
                        attacker.name, case.class, case.subject, case.reply
                    ),
                }
            };
            if let Some(ack) = ack {
                assert!(
                    String::from_utf8_lossy(&ack.payload).contains("\"seq\""),
                    "{}'s own write is refused: {ack:?}",
                    attacker.name
                );
            }
        } else {
            attacker.client.flush().await.unwrap();
        }
        world.settle(*counter).await;
        let what = format!(
            "{} publishes {} (reply to {:?}{})",
            attacker.name, case.subject, case.reply, case.note
        );
        let after = snapshot(&world.js).await;
        if after != before {
            breaches.push(format!("{what}: changed {before:?} into {after:?}"));
            world.reset().await;
            before = snapshot(&world.js).await;
        } else {
            before = after;
        }
        // Nothing lands on the target where someone listens (the suite's own requests,
        // with the suite's reply subjects, aside), and nothing reaches the victim or the
        // bridge but the canaries.
        for (who, seen) in [
            ("the fleet account", world.fleet_seen.take()),
            ("the victim", world.victim_seen.take()),
            ("the bridge", world.bridge_seen.take()),
        ] {
            // What lands in the attacker's own account is its own business.
            if who == "the bridge" && attacker.name == "the bridge" {
                continue;
            }
            for h in seen {
                if canary(&h.payload) {
                    continue;
                }
                // The suite's own requests in the fleet account (answered to its inbox);
                // an attacker's request reaches that account only through an import, whose
                // reply subject the server rewrites.
                let ours = h.reply.as_deref().is_some_and(|r| r.starts_with("_INBOX."));
                let landed = who == "the fleet account"
                    && h.subject == case.watch
                    && !case.watch.is_empty()
                    && !own(&case.watch)
                    && !ours;
                // The victim hears nothing but canaries (and the relay requests the bridge
                // may send); the bridge hears nothing in the victim's name but the victim's
                // canaries (the attacker's own frames arrive in the attacker's name).
                let impersonated = match who {
                    "the victim" => !own(&h.subject),
                    "the bridge" => h.subject == relay::frames_subject(&dev(VICTIM)),
                    _ => false,
                };
                if landed || impersonated {
                    breaches.push(format!(
                        "{what}: {who} received {}: {}",
                        h.subject,
                        String::from_utf8_lossy(&h.payload)
                    ));
                }
            }
        }
        // What came back to the attacker must not be another device's record (for the
        // bridge: another device's manifest).
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(1), answers.next()).await
        {
            // The attacker's own status read back is the crafted request: not the victim's.
            if m.payload[..] == crafted()[..] {
                continue;
            }
            let text = String::from_utf8_lossy(&m.payload);
            let victims = text.contains(&format!("\"device\":\"{VICTIM}\""))
                || text.contains(&format!(".{VICTIM}\""));
            let manifest = text.contains("AgentManifest")
                || text.contains(&DESIRED_STATE.subject(&dev(VICTIM)));
            if victims && (!attacker.reads_status || manifest) {
                breaches.push(format!("{what}: read the victim's record {text}"));
            }
        }
        let entry = tally.entry(case.class).or_default();
        entry.0 += 1;
        entry.1 += usize::from(breaches.len() > found_before);
    }
    breaches
}

/// A message an identity may receive, sent after everything else: once it has arrived,
/// so has everything the server queued for that connection before.
struct Canary<'a> {
    /// Subscribed to by the attacker (a subject it may hear).
    subject: String,
    /// Who sends it (an identity that may publish there).
    sender: &'a Client,
}

/// Subscriptions that would see other devices' traffic. Returns the breaches and how many
/// of the eight subscriptions heard anything of the victim.
async fn subscribe_wide(
    world: &World,
    attacker: &Client,
    canary: Canary<'_>,
) -> (Vec<String>, usize) {
    let patterns = [
        ">".to_string(),
        "$KV.>".into(),
        "fleetlet.>".into(),
        "_INBOX.>".into(),
        format!("_INBOX_{VICTIM}.>"),
        relay::device_wildcard(&dev(VICTIM)),
        DESIRED_STATE.all_changes(),
        "$JS.>".into(),
    ];
    let mut seen = Vec::new();
    for p in &patterns {
        // Refused ones fail on the server side; the rest must stay silent.
        let s = Seen::default();
        s.listen(attacker, p).await;
        seen.push(s);
    }
    let arrived = Seen::default();
    arrived.listen(attacker, &canary.subject).await;
    attacker.flush().await.unwrap();
    // Traffic for the victim: a new manifest, a relay request, a status of its own.
    // (After a successful attack the bucket may be gone: that is reported already.)
    if let Ok(desired) = world.js.get_key_value(DESIRED_STATE.name).await {
        let _ = desired.put(VICTIM, manifest(VICTIM, "second").into()).await;
    }
    world
        .bridge
        .publish(relay::exec_subject(&dev(VICTIM)), "{}".into())
        .await
        .unwrap();
    let _ = world
        .victim
        .request(ACTUAL_STATE.subject(&dev(VICTIM)), status(VICTIM).into())
        .await;
    world.settle(u32::MAX).await;
    // Sent again every second until it arrives: one sent while the client is putting a
    // connection the server closed (an earlier attack) back together is lost, and any
    // arrival says the same.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut next_send = std::time::Instant::now();
    while !arrived.has(b"canary-wide") {
        let now = std::time::Instant::now();
        assert!(
            now < deadline,
            "the attacker's canary on {} did not arrive",
            canary.subject
        );
        if now >= next_send {
            let mut h = HeaderMap::new();
            h.insert(relay::SESSION, "wide-canary");
            canary
                .sender
                .publish_with_headers(canary.subject.clone(), h, "canary-wide".into())
                .await
                .unwrap();
            canary.sender.flush().await.unwrap();
            next_send = now + Duration::from_secs(1);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut breaches = Vec::new();
    let mut heard = 0;
    for (p, s) in patterns.iter().zip(&seen) {
        let about: Vec<String> = s
            .take()
            .into_iter()
            .filter(|h| h.subject.contains(VICTIM) || h.payload.windows(4).any(|w| w == b"pi-b"))
            .map(|h| {
                format!(
                    "a subscription to {p} received {}: {}",
                    h.subject,
                    String::from_utf8_lossy(&h.payload)
                )
            })
            .collect();
        heard += usize::from(!about.is_empty());
        breaches.extend(about);
    }
    (breaches, heard)
}

fn manifest(device: &str, text: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "apiVersion": "fleetlet.dev/v1alpha1", "kind": "AgentManifest",
        "device": device, "generation": 1,
        "resources": [{ "id": "f",
            "owner": { "kind": "EdgeManifest", "namespace": "default", "name": "m" },
            "file": { "path": "/etc/fleetlet/f", "content": { "text": text } } }]
    }))
    .unwrap()
}

fn status(device: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "apiVersion": "fleetlet.dev/v1alpha1", "device": device,
    }))
    .unwrap()
}

/// How the suite connects as a user of the environment.
type Connect<'a> = Box<dyn Fn(&str) -> futures::future::BoxFuture<'a, Client> + 'a>;

/// The whole suite against `env`: the device attacker, then the bridge's identity.
/// `rollup`: the buckets accept rollup headers. Returns every breach found and the tally.
async fn run_suite(env: &TestEnv, connect: Connect<'_>, rollup: bool) -> (Vec<String>, Tally) {
    let admin = env.nats_client().await.unwrap();
    let js = jetstream::new(admin.clone());
    // The victim's records, and the attacker's own status crafted as an API request.
    let desired = js.get_key_value(DESIRED_STATE.name).await.unwrap();
    for d in [ATTACKER, VICTIM] {
        desired.put(d, manifest(d, d).into()).await.unwrap();
    }
    let victim = connect(VICTIM).await;
    let attacker = connect(ATTACKER).await;
    let bridge = connect("bridge").await;
    for (c, d) in [(&victim, VICTIM), (&attacker, ATTACKER)] {
        for b in [ACTUAL_STATE, HEARTBEAT, FACTS] {
            let body = if d == ATTACKER { crafted() } else { status(d) };
            let ack = c.request(b.subject(&dev(d)), body.into()).await.unwrap();
            assert!(
                String::from_utf8_lossy(&ack.payload).contains("\"seq\""),
                "{d} cannot write its own {}: {ack:?}",
                b.name
            );
        }
    }
    let world = World {
        js,
        fleet_seen: Seen::default(),
        victim: victim.clone(),
        victim_seen: Seen::default(),
        bridge: bridge.clone(),
        bridge_seen: Seen::default(),
        admin: admin.clone(),
        rollup,
    };
    world.fleet_seen.listen(&world.admin, ">").await;
    for s in [
        "_INBOX.>".to_string(),
        relay::device_wildcard(&dev(VICTIM)),
        DESIRED_STATE.changes(&dev(VICTIM)),
    ] {
        world.victim_seen.listen(&victim, &s).await;
    }
    world.bridge_seen.listen(&bridge, relay::ALL_FRAMES).await;
    world.bridge_seen.listen(&bridge, "_INBOX.>").await;
    // A stand-in for the controller answering floor requests in the fleet account.
    {
        let mut floors = admin.subscribe("fleetlet.floor.*").await.unwrap();
        let admin = admin.clone();
        tokio::spawn(async move {
            while let Some(m) = floors.next().await {
                if let Some(r) = m.reply {
                    // What the controller answers: the asking device's own floor.
                    let answer = format!("{{\"floor\":\"{}\"}}", m.subject);
                    let _ = admin.publish(r, answer.into()).await;
                }
            }
        });
    }
    victim.flush().await.unwrap();
    bridge.flush().await.unwrap();
    admin.flush().await.unwrap();

    let mut counter = 0;
    let mut tally = Tally::new();
    let mut breaches = Vec::new();
    let device = Attacker {
        name: ATTACKER.into(),
        client: attacker.clone(),
        allowed: access::device(&dev(ATTACKER)).publish,
        barrier: Some(HEARTBEAT.subject(&dev(ATTACKER))),
        reads_status: false,
    };
    breaches.extend(attack(&world, &device, &mut counter, &mut tally).await);
    let bridge_attacker = Attacker {
        name: "the bridge".into(),
        client: bridge.clone(),
        allowed: access::bridge().publish,
        barrier: None,
        reads_status: true,
    };
    breaches.extend(attack(&world, &bridge_attacker, &mut counter, &mut tally).await);
    // The device hears its own relay subjects (the bridge sends there); the bridge hears
    // the attacker device's frames (the device sends there).
    let (wide_device, heard_device) = subscribe_wide(
        &world,
        &attacker,
        Canary {
            subject: format!("{}{ATTACKER}.wide-canary", relay::SUBJECT_PREFIX),
            sender: &bridge,
        },
    )
    .await;
    let (wide_bridge, heard_bridge) = subscribe_wide(
        &world,
        &bridge,
        Canary {
            subject: relay::frames_subject(&dev(ATTACKER)),
            sender: &attacker,
        },
    )
    .await;
    tally.insert(
        "wide subscriptions (>, $KV.>, _INBOX.>, another device's subjects)",
        (16, heard_device + heard_bridge),
    );
    let wide = [wide_device, wide_bridge].concat();
    breaches.extend(wide);
    (breaches, tally)
}

/// The tally as report rows: `mode` names the deployment.
fn report(mode: &str, tally: &Tally, expected: &str) {
    for (class, (cases, breaches)) in tally {
        fleetlet_testenv::report::record(
            fleetlet_testenv::report::Section::Security,
            &format!("{mode}: {class}"),
            expected,
            &format!("{cases} cases, {breaches} with an effect"),
        );
    }
}

/// The victim's and the bridge's clients still work after the suite, and no consumer was
/// left on any stream.
async fn still_working(env: &TestEnv, connect: &Connect<'_>) {
    let js = jetstream::new(env.nats_client().await.unwrap());
    for b in BUCKETS {
        let mut s = js.get_stream(b.stream()).await.unwrap();
        assert_eq!(
            s.info().await.unwrap().state.consumer_count,
            0,
            "{}",
            b.name
        );
    }
    let victim = connect(VICTIM).await;
    let m = victim
        .request(DESIRED_STATE.direct_get(&dev(VICTIM)), "".into())
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&m.payload).contains(VICTIM),
        "{m:?}"
    );
}

fn connect_static(env: &TestEnv) -> Connect<'_> {
    connect_static_with(env, false)
}

/// `device_inboxes`: devices use an inbox prefix of their own (`_INBOX_<device>`), as in
/// the layout before accounts.
fn connect_static_with(env: &TestEnv, device_inboxes: bool) -> Connect<'_> {
    Box::new(move |user: &str| {
        let user = user.to_owned();
        Box::pin(async move {
            let nats = env.nats.as_ref().unwrap();
            let mut opts = async_nats::ConnectOptions::with_user_and_password(
                user.clone(),
                static_password(&user),
            )
            .request_timeout(Some(Duration::from_secs(2)));
            if device_inboxes && user.starts_with("pi-") {
                opts = opts.custom_inbox_prefix(format!("_INBOX_{user}"));
            }
            if let Some(ca) = &nats.ca_file {
                opts = opts.add_root_certificates(ca.clone()).require_tls(true);
            }
            opts.connect(&nats.url).await.unwrap()
        })
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_or_the_bridge_with_static_accounts_reaches_nothing_but_its_own() {
    let env = TestEnv::builder()
        .nats_accounts(&[ATTACKER, VICTIM], true)
        .start()
        .await
        .unwrap();
    let connect = connect_static(&env);
    let (breaches, tally) = run_suite(&env, connect_static(&env), false).await;
    assert!(
        breaches.is_empty(),
        "{} breaches:\n{}",
        breaches.len(),
        breaches.join("\n")
    );
    report(
        "static accounts, one compromised device and the bridge's credentials",
        &tally,
        "no effect: other keys, streams and consumers unchanged, nothing delivered",
    );
    still_working(&env, &connect).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_or_the_bridge_in_operator_mode_reaches_nothing_but_its_own() {
    let resolver = tempfile::tempdir().unwrap();
    let operator = Operator::generate(resolver.path()).unwrap();
    let env = TestEnv::builder()
        .nats_operator(&operator.config, &operator.admin_creds, false)
        .start()
        .await
        .unwrap();
    let sys = operator
        .system_client(env.nats.as_ref().unwrap())
        .await
        .unwrap();
    let mut creds = BTreeMap::new();
    for d in [ATTACKER, VICTIM] {
        creds.insert(
            d.to_owned(),
            operator.enroll(&sys, d).await.unwrap().user.creds,
        );
    }
    creds.insert(
        "bridge".to_owned(),
        operator
            .authority
            .issue_bridge_user("bridge")
            .unwrap()
            .creds,
    );
    let creds = Arc::new(creds);
    let make = {
        let creds = creds.clone();
        let url = env.nats_url().unwrap().to_owned();
        move || -> Connect<'static> {
            let creds = creds.clone();
            let url = url.clone();
            Box::new(move |user: &str| {
                let text = creds[user].clone();
                let url = url.clone();
                Box::pin(async move {
                    async_nats::ConnectOptions::with_credentials(&text)
                        .unwrap()
                        .request_timeout(Some(Duration::from_secs(2)))
                        .connect(&url)
                        .await
                        .unwrap()
                })
            })
        }
    };
    let (breaches, tally) = run_suite(&env, make(), false).await;
    assert!(
        breaches.is_empty(),
        "{} breaches:\n{}",
        breaches.len(),
        breaches.join("\n")
    );
    report(
        "operator mode (JWTs), one compromised device and the bridge's credentials",
        &tally,
        "no effect: other keys, streams and consumers unchanged, nothing delivered",
    );
    still_working(&env, &make()).await;
}

/// A client of the site's leaf node for devices, of the central server for the bridge.
fn connect_at_site<'a>(env: &'a TestEnv, site: &'a nats::Site) -> Connect<'a> {
    Box::new(move |user: &str| {
        let user = user.to_owned();
        Box::pin(async move {
            let url = if user.starts_with("pi-") {
                site.leaf.url.clone()
            } else {
                env.nats_url().unwrap().to_owned()
            };
            async_nats::ConnectOptions::with_user_and_password(user.clone(), static_password(&user))
                .request_timeout(Some(Duration::from_secs(2)))
                .connect(&url)
                .await
                .unwrap()
        })
    })
}

/// Devices at a site connect to a leaf node of their own, linked to the central server by
/// the site's account: the whole suite, with both devices at the site, finds nothing, and
/// credentials of the site reach no device outside it.
#[tokio::test(flavor = "multi_thread")]
async fn devices_behind_a_site_leaf_node_reach_nothing_but_their_own() {
    const OUTSIDER: &str = "pi-c";
    let link = async |port: u16| TcpProxy::start(&format!("127.0.0.1:{port}")).await;
    let leafnodes = fleetlet_testenv::process::free_port().unwrap();
    let uplink = link(leafnodes).await.unwrap();
    let env = TestEnv::builder()
        .nats_site(
            &[ATTACKER, VICTIM, OUTSIDER],
            "shop",
            &[ATTACKER, VICTIM],
            &uplink,
        )
        .start()
        .await
        .unwrap();
    let bins = fleetlet_testenv::bins::Binaries::locate().unwrap();
    let site = nats::Site::start(
        &bins.nats_server,
        &env.dir.join("site"),
        "shop",
        &[ATTACKER, VICTIM],
        uplink,
    )
    .await
    .unwrap();
    site.wait_linked(true).await;
    // The central server's interest reaches the leaf node just after the link comes up.
    let probe = connect_at_site(&env, &site)(ATTACKER).await;
    eventually(
        "a write through the site's link",
        Duration::from_secs(20),
        || async {
            let ack = probe
                .request(HEARTBEAT.subject(&dev(ATTACKER)), status(ATTACKER).into())
                .await
                .map_err(|e| e.to_string())?;
            String::from_utf8_lossy(&ack.payload)
                .contains("\"seq\"")
                .then_some(())
                .ok_or_else(|| format!("{ack:?}"))
        },
    )
    .await;
    drop(probe);
    let (breaches, tally) = run_suite(&env, connect_at_site(&env, &site), false).await;
    assert!(
        breaches.is_empty(),
        "{} breaches:\n{}",
        breaches.len(),
        breaches.join("\n")
    );
    report(
        "a site behind a leaf node, one compromised device at the site and the bridge's credentials",
        &tally,
        "no effect: other keys, streams and consumers unchanged, nothing delivered",
    );
    still_working(&env, &connect_at_site(&env, &site)).await;

    // The site's credentials in the hands of an attacker, who runs a leaf node of their own
    // that claims a device of another site: nothing it sends for that device lands.
    let js = jetstream::new(env.nats_client().await.unwrap());
    let actual = js.get_key_value(ACTUAL_STATE.name).await.unwrap();
    let before = actual.entry(OUTSIDER).await.unwrap().map(|e| e.revision);
    let rogue = nats::Site::start(
        &bins.nats_server,
        &env.dir.join("rogue"),
        "shop",
        &[OUTSIDER, ATTACKER],
        link(leafnodes).await.unwrap(),
    )
    .await
    .unwrap();
    rogue.wait_linked(true).await;
    let outsider = rogue.connect(OUTSIDER).await.unwrap();
    // The same rogue link carries the site's own device: it works, so the outsider's
    // refusal is the site account's scope and not a dead link.
    let own = rogue.connect(ATTACKER).await.unwrap();
    let wrote = own
        .request(
            ACTUAL_STATE.subject(&dev(ATTACKER)),
            status(ATTACKER).into(),
        )
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&wrote.payload).contains("\"seq\""),
        "{wrote:?}"
    );
    let forged = outsider
        .request(
            ACTUAL_STATE.subject(&dev(OUTSIDER)),
            status(OUTSIDER).into(),
        )
        .await;
    assert!(
        forged.is_err(),
        "a write for another site's device was answered: {forged:?}"
    );
    let read = outsider
        .request(DESIRED_STATE.direct_get(&dev(OUTSIDER)), "".into())
        .await;
    assert!(
        read.is_err(),
        "another site's manifest was answered: {read:?}"
    );
    outsider.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = actual.entry(OUTSIDER).await.unwrap().map(|e| e.revision);
    assert_eq!(before, after, "another site's device's status changed");
}

/// The layout before accounts: every identity a user of one shared account, limited by
/// per-subject permissions. The suite must find what an attacker found there.
fn shared_account_config() -> String {
    let device = |d: &str| {
        let id = dev(d);
        let mut publish: Vec<String> = BUCKETS
            .iter()
            .map(|b| format!("$JS.API.STREAM.INFO.{}", b.stream()))
            .collect();
        for b in [DESIRED_STATE, ACTUAL_STATE] {
            publish.push(b.direct_get(&id));
        }
        publish.push(ACTUAL_STATE.subject(&id));
        publish.push(HEARTBEAT.subject(&id));
        publish.push(FACTS.subject(&id));
        publish.push(relay::frames_subject(&id));
        publish.push(access::floor_subject(&id));
        (
            publish,
            // Each device had an inbox prefix of its own.
            vec![
                format!("_INBOX_{d}.>"),
                relay::device_wildcard(&id),
                DESIRED_STATE.changes(&id),
            ],
        )
    };
    let quoted = |v: &[String]| {
        v.iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut users = format!(
        "  {{ user: \"admin\", password: \"{}\" }}\n",
        static_password("admin")
    );
    for d in [ATTACKER, VICTIM] {
        let (p, s) = device(d);
        users.push_str(&format!(
            "  {{ user: \"{d}\", password: \"{}\", permissions: {{ publish: {{ allow: [{}] }}, subscribe: {{ allow: [{}] }}, allow_responses: true }} }}\n",
            static_password(d),
            quoted(&p),
            quoted(&s)
        ));
    }
    let bridge_pub: Vec<String> = [ACTUAL_STATE, HEARTBEAT, FACTS]
        .iter()
        .map(|b: &Bucket| b.direct_get_api())
        .chain(["fleetlet.relay.>".to_string()])
        .collect();
    users.push_str(&format!(
        "  {{ user: \"bridge\", password: \"{}\", permissions: {{ publish: {{ allow: [{}] }}, subscribe: {{ allow: [\"_INBOX.>\", \"fleetlet.frames.*\"] }} }} }}\n",
        static_password("bridge"),
        quoted(&bridge_pub)
    ));
    format!("authorization {{\n users: [\n{users} ]\n}}\n")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_suite_finds_the_breaches_of_one_shared_account() {
    let env = TestEnv::builder()
        .nats_secured(
            &shared_account_config(),
            "admin",
            &static_password("admin"),
            false,
        )
        .start()
        .await
        .unwrap();
    // The buckets as they were then: rollup headers allowed.
    let js = jetstream::new(env.nats_client().await.unwrap());
    for b in [ACTUAL_STATE, HEARTBEAT, FACTS] {
        let mut config = fleetlet_controller::bucket_stream(b, 1);
        config.allow_rollup = true;
        js.update_stream(config).await.unwrap();
    }
    let (breaches, tally) = run_suite(&env, connect_static_with(&env, true), true).await;
    let found = |needle: &str| breaches.iter().any(|b| b.contains(needle));
    // What the review found: a device's answer written to another device's manifest, and
    // a rollup on its own key that purged everyone's.
    assert!(
        found(&format!("reply to \"$KV.desired-state.{VICTIM}\"")),
        "{breaches:#?}"
    );
    assert!(found("Nats-Rollup"), "{breaches:#?}");
    report(
        "control: the layout before accounts (one shared account, subject permissions)",
        &tally,
        "breaches found (shows the suite can fail)",
    );
}

#[tokio::test]
async fn device_limits_refuse_too_many_connections_subscriptions_and_oversized_messages() {
    let env = TestEnv::builder()
        .nats_accounts(&[ATTACKER, VICTIM], false)
        .start()
        .await
        .unwrap();
    let connect = connect_static(&env);
    let mut held = Vec::new();
    for _ in 0..access::DEVICE_LIMITS.connections {
        held.push(connect(ATTACKER).await);
    }
    let nats = env.nats.as_ref().unwrap();
    let extra = async_nats::ConnectOptions::with_user_and_password(
        ATTACKER.into(),
        static_password(ATTACKER),
    )
    .connection_timeout(Duration::from_secs(2));
    let refused = tokio::time::timeout(Duration::from_secs(5), extra.connect(&nats.url)).await;
    assert!(
        !matches!(refused, Ok(Ok(_))),
        "a connection beyond the account's limit was accepted"
    );
    // The victim connects as usual: one device's connections do not count against another.
    let victim = connect(VICTIM).await;
    let big = vec![b'x'; access::DEVICE_LIMITS.payload as usize + 1];
    let heartbeats = jetstream::new(env.nats_client().await.unwrap())
        .get_key_value(HEARTBEAT.name)
        .await
        .unwrap();
    let before = heartbeats
        .entry(ATTACKER)
        .await
        .unwrap()
        .map(|e| e.revision);
    let sent = held[0]
        .request(HEARTBEAT.subject(&dev(ATTACKER)), big.into())
        .await;
    assert!(sent.is_err(), "an oversized message was taken: {sent:?}");
    assert_eq!(
        heartbeats
            .entry(ATTACKER)
            .await
            .unwrap()
            .map(|e| e.revision),
        before
    );
    let ack = victim
        .request(HEARTBEAT.subject(&dev(VICTIM)), status(VICTIM).into())
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&ack.payload).contains("\"seq\""));

    // Subscriptions: forty on the device's own relay subjects, each sent a message by the
    // bridge; those past the account's limit hear nothing.
    let device = held[1].clone();
    let mut subs = Vec::new();
    for i in 0..40 {
        let subject = format!("{}{ATTACKER}.probe{i}", relay::SUBJECT_PREFIX);
        subs.push(device.subscribe(subject).await.unwrap());
    }
    device.flush().await.unwrap();
    let bridge = connect("bridge").await;
    for i in 0..40 {
        bridge
            .publish(
                format!("{}{ATTACKER}.probe{i}", relay::SUBJECT_PREFIX),
                "x".into(),
            )
            .await
            .unwrap();
    }
    bridge.flush().await.unwrap();
    let mut heard = 0;
    for sub in &mut subs {
        if tokio::time::timeout(Duration::from_millis(300), sub.next())
            .await
            .is_ok_and(|m| m.is_some())
        {
            heard += 1;
        }
    }
    assert!(heard > 0, "no subscription worked at all");
    assert!(
        heard <= access::DEVICE_LIMITS.subscriptions as usize,
        "{heard} of 40 subscriptions heard, above the limit of {}",
        access::DEVICE_LIMITS.subscriptions
    );
}

#[tokio::test]
async fn a_server_certificate_from_another_ca_is_refused() {
    let env = TestEnv::builder()
        .nats_accounts(&[ATTACKER], true)
        .start()
        .await
        .unwrap();
    let other = tempfile::tempdir().unwrap();
    fleetlet_testenv::pki::Pki::generate()
        .unwrap()
        .write(other.path())
        .unwrap();
    let nats = env.nats.as_ref().unwrap();
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        async_nats::ConnectOptions::with_user_and_password(
            ATTACKER.into(),
            static_password(ATTACKER),
        )
        .add_root_certificates(other.path().join("ca.crt"))
        .require_tls(true)
        .connect(&nats.url),
    )
    .await
    .expect("connect returned");
    let err = result.expect_err("connected to a server the CA did not sign");
    assert!(
        err.to_string().to_lowercase().contains("tls") || err.to_string().contains("certificate"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn controller_bridge_and_agent_run_with_their_own_accounts_over_tls() {
    let env = TestEnv::builder()
        .kube()
        .nats_accounts(&["pi-a"], true)
        .start()
        .await
        .unwrap();
    let nats = env.nats.as_ref().unwrap();
    let ca = nats.ca_file.clone().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bins = components::bin_dir().unwrap();
    let flags = |user: &str| {
        vec![
            format!("--nats-user={user}"),
            format!("--nats-password={}", static_password(user)),
            format!("--nats-ca={}", ca.display()),
        ]
    };
    let cflags = flags("controller");
    let bflags = flags("bridge");
    fn refs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    let _controller =
        components::start_controller(&env, &bins, dir.path(), &refs(&cflags)).unwrap();
    let _bridge = components::start_bridge(&env, &bins, dir.path(), &refs(&bflags)).unwrap();
    let root = dir.path().join("root");
    let _agent = components::start_agent(
        &bins,
        dir.path(),
        &components::file_agent_config(
            &nats.url,
            dir.path(),
            "pi-a",
            "/etc/fleetlet",
            &format!(
                "user = \"pi-a\"\npassword = \"{}\"\ntls_ca = \"{}\"",
                static_password("pi-a"),
                ca.display()
            ),
            "",
        ),
    )
    .unwrap();
    env.apply(
        r#"apiVersion: fleetlet.dev/v1alpha1
kind: EdgeDevice
metadata: { name: pi-a, namespace: default }
spec: {}
---
apiVersion: fleetlet.dev/v1alpha1
kind: EdgeManifest
metadata: { name: over-tls, namespace: default }
spec:
  devices: [pi-a]
  resources:
    - id: greeting
      file: { path: /etc/fleetlet/greeting, content: { text: "over TLS, as pi-a\n" } }
"#,
    )
    .unwrap();

    fleetlet_testenv::wait::file_content(
        &root.join("etc/fleetlet/greeting"),
        "over TLS, as pi-a\n",
        Duration::from_secs(60),
    )
    .await;
    let client = env.kube_client().await.unwrap();
    let manifests: Api<fleetlet_crds::EdgeManifest> = Api::namespaced(client.clone(), "default");
    eventually("the rollout complete", Duration::from_secs(60), || async {
        let m = manifests.get("over-tls").await.map_err(|e| e.to_string())?;
        let status = m.status.clone().unwrap_or_default();
        let ready = status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        (ready && status.ready == 1)
            .then_some(())
            .ok_or(format!("{status:?}"))
    })
    .await;
    env.wait_node_ready("pi-a").await;

    // A relay request from the bridge's account reaches the agent, and the agent's frames
    // come back on its own frames subject.
    let bridge = connect_static(&env)("bridge").await;
    let mut frames = bridge.subscribe(relay::ALL_FRAMES).await.unwrap();
    bridge.flush().await.unwrap();
    let request = serde_json::json!({ "resource": "no-such-container", "session": "s1" });
    bridge
        .publish(
            relay::logs_subject(&dev("pi-a")),
            serde_json::to_vec(&request).unwrap().into(),
        )
        .await
        .unwrap();
    let frame = tokio::time::timeout(Duration::from_secs(10), frames.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(frame.subject.as_str(), relay::frames_subject(&dev("pi-a")));
    let header = |k: &str| {
        frame
            .headers
            .as_ref()
            .and_then(|h| h.get(k))
            .map(|v| v.to_string())
    };
    assert_eq!(header(relay::FRAME).as_deref(), Some("end"), "{frame:?}");
    assert_eq!(header(relay::SESSION).as_deref(), Some("s1"), "{frame:?}");
}

/// `fleetlet-controller nats-accounts` writes the static configuration a user includes in
/// nats-server: with it, the controller runs the buckets, and each device reaches its own
/// keys and not another's.
#[tokio::test]
async fn nats_accounts_writes_a_configuration_that_isolates_devices_and_links_a_site() {
    let dir = tempfile::tempdir().unwrap();
    let bins = components::bin_dir().unwrap();
    let mut cmd = std::process::Command::new(bins.join("fleetlet-controller"));
    let leafnodes = fleetlet_testenv::process::free_port().unwrap();
    cmd.args(["nats-accounts"])
        .arg(dir.path())
        .args(["--device", "pi-a,pi-b", "--site", "shop=pi-b"])
        .arg(format!("--leafnode-url=nats-leaf://127.0.0.1:{leafnodes}"));
    fleetlet_testenv::chart::checked("nats-accounts", cmd).unwrap();
    let passwords: BTreeMap<String, String> =
        std::fs::read_to_string(dir.path().join("passwords.txt"))
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once(' '))
            .map(|(u, p)| (u.to_owned(), p.to_owned()))
            .collect();
    assert_eq!(passwords.len(), 5, "{passwords:?}");
    {
        use std::os::unix::fs::PermissionsExt;
        for f in ["passwords.txt", "accounts.conf", "site-shop.conf"] {
            let mode = std::fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
    }
    let config = std::fs::read_to_string(dir.path().join("accounts.conf")).unwrap()
        + &format!("leafnodes {{ listen: \"127.0.0.1:{leafnodes}\" }}\n");
    // The controller's user creates the buckets, as the controller does.
    let env = TestEnv::builder()
        .nats_secured(&config, "controller", &passwords["controller"], false)
        .start()
        .await
        .unwrap();
    let nats = env.nats.as_ref().unwrap();
    let as_user = |u: &str| {
        async_nats::ConnectOptions::with_user_and_password(u.into(), passwords[u].clone())
            .request_timeout(Some(Duration::from_secs(2)))
            .connect(nats.url.clone())
    };
    let a = as_user("pi-a").await.unwrap();
    // pi-b is at the site: it connects to the site's leaf node, started with the file
    // written for it.
    let leaf = fleetlet_testenv::nats::NatsServer::start_leaf(
        &fleetlet_testenv::bins::Binaries::locate()
            .unwrap()
            .nats_server,
        &dir.path().join("leaf"),
        &std::fs::read_to_string(dir.path().join("site-shop.conf")).unwrap(),
        nats::NatsAuth::Password("pi-b".into(), passwords["pi-b"].clone()),
    )
    .await
    .unwrap();
    let b = async_nats::ConnectOptions::with_user_and_password(
        "pi-b".into(),
        passwords["pi-b"].clone(),
    )
    .request_timeout(Some(Duration::from_secs(2)))
    .connect(leaf.url.clone())
    .await
    .unwrap();
    eventually("the site's link", Duration::from_secs(20), || async {
        b.request(HEARTBEAT.subject(&dev("pi-b")), status("pi-b").into())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .await;
    let ack = b
        .request(HEARTBEAT.subject(&dev("pi-b")), status("pi-b").into())
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&ack.payload).contains("\"seq\""),
        "{ack:?}"
    );
    let ack = a
        .request(HEARTBEAT.subject(&dev("pi-a")), status("pi-a").into())
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&ack.payload).contains("\"seq\""),
        "{ack:?}"
    );
    // pi-a's write to pi-b's heartbeat goes nowhere: after pi-a's own acknowledged write to
    // the same stream, pi-b's value is still pi-b's.
    a.publish(HEARTBEAT.subject(&dev("pi-b")), "{\"forged\":1}".into())
        .await
        .unwrap();
    a.request(HEARTBEAT.subject(&dev("pi-a")), status("pi-a").into())
        .await
        .unwrap();
    let stored = env
        .jetstream()
        .await
        .unwrap()
        .get_key_value(HEARTBEAT.name)
        .await
        .unwrap()
        .get("pi-b")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&stored[..], &status("pi-b")[..]);
}
