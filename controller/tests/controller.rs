//! The controller binary against a real kube-apiserver and nats-server.
//!
//! Most tests share one environment and one controller (each test uses its own namespace
//! and device names, since device ids are cluster-wide). Where a test needs a device to
//! look online or Ready, it writes the heartbeat and status keys an agent would write.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::{
    cell::RefCell,
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_nats::jetstream::kv::Store;
use fleetlet_crds::{EdgeDevice, EdgeManifest};
use fleetlet_protocol::{
    API_VERSION, AgentManifest, AgentStatus, DeviceId, Free, Heartbeat, ResourceDetails,
    ResourceStatus, Timestamp, decode, encode,
    kv::{ACTUAL_STATE, DESIRED_STATE, HEARTBEAT},
};
use fleetlet_testenv::{
    DEFAULT_TIMEOUT, TestEnv, eventually,
    process::{Service, free_port},
    wait::until,
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use serde_json::json;

struct Controller {
    _service: Service,
    metrics_port: u16,
}

fn start_controller(env: &TestEnv, identity: &str, lease_ns: &str) -> Controller {
    start_controller_with(env, identity, lease_ns, &["--resync-seconds=1".into()])
}

/// [`start_controller`] with `extra` flags and no resync interval of its own.
fn start_controller_with(
    env: &TestEnv,
    identity: &str,
    lease_ns: &str,
    extra: &[String],
) -> Controller {
    let metrics_port = free_port().unwrap();
    let log = env.dir.join(format!("controller-{identity}.log"));
    let service = Service::spawn_with_env(
        "fleetlet-controller",
        Path::new(env!("CARGO_BIN_EXE_fleetlet-controller")),
        &[
            format!("--nats-url={}", env.nats_url().unwrap()),
            format!("--metrics-addr=127.0.0.1:{metrics_port}"),
            format!("--lease-namespace={lease_ns}"),
            format!("--identity={identity}"),
            "--lease-seconds=3".into(),
            "--offline-after-seconds=30".into(),
        ]
        .into_iter()
        .chain(extra.iter().cloned())
        .collect::<Vec<_>>(),
        &[
            (
                "KUBECONFIG",
                env.kubeconfig().unwrap().display().to_string(),
            ),
            ("RUST_LOG", "info,fleetlet_controller=debug".into()),
        ],
        log,
    )
    .unwrap();
    Controller {
        _service: service,
        metrics_port,
    }
}

/// The shared environment, with one controller running against it.
fn shared() -> (&'static TestEnv, &'static Controller) {
    static CONTROLLER: OnceLock<Controller> = OnceLock::new();
    let env = TestEnv::shared();
    let c = CONTROLLER.get_or_init(|| {
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let client = env.kube_client().await.unwrap();
                create_namespace(&client, "fleetlet-system").await;
            });
            start_controller(env, "shared", "fleetlet-system")
        })
        .join()
        .unwrap()
    });
    (env, c)
}

async fn create_namespace(client: &kube::Client, name: &str) {
    let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let ns = serde_json::from_value(json!({ "metadata": { "name": name } })).unwrap();
    let _ = api.create(&PostParams::default(), &ns).await;
}

async fn apply<K>(api: &Api<K>, body: serde_json::Value)
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + serde::Serialize,
{
    let name = body["metadata"]["name"].as_str().unwrap().to_owned();
    api.patch(
        &name,
        &PatchParams::apply("test").force(),
        &Patch::Apply(&body),
    )
    .await
    .unwrap();
}

fn device(name: &str, labels: serde_json::Value) -> serde_json::Value {
    json!({ "apiVersion": "fleetlet.dev/v1alpha1", "kind": "EdgeDevice",
            "metadata": { "name": name, "labels": labels }, "spec": {} })
}

fn manifest(name: &str, spec: serde_json::Value) -> serde_json::Value {
    json!({ "apiVersion": "fleetlet.dev/v1alpha1", "kind": "EdgeManifest", "metadata": { "name": name }, "spec": spec })
}

fn file(id: &str, path: &str, text: &str) -> serde_json::Value {
    json!({ "id": id, "file": { "path": path, "content": { "text": text } } })
}

struct Kv {
    desired: Store,
    actual: Store,
    heartbeat: Store,
}

async fn kv(env: &TestEnv) -> Kv {
    let js = env.jetstream().await.unwrap();
    Kv {
        desired: js.get_key_value(DESIRED_STATE.name).await.unwrap(),
        actual: js.get_key_value(ACTUAL_STATE.name).await.unwrap(),
        heartbeat: js.get_key_value(HEARTBEAT.name).await.unwrap(),
    }
}

async fn desired_of(kv: &Kv, dev: &str) -> Option<(AgentManifest, u64)> {
    let e = kv.desired.entry(dev).await.unwrap()?;
    if e.operation != async_nats::jetstream::kv::Operation::Put {
        return None;
    }
    Some((decode(&e.value).unwrap(), e.revision))
}

/// Waits until `dev`'s desired-state key holds a manifest `done` accepts; a timeout shows
/// the last one seen.
async fn wait_desired(
    kv: &Kv,
    dev: &str,
    what: &str,
    done: impl Fn(&AgentManifest) -> bool,
) -> (AgentManifest, u64) {
    until(
        &format!("{dev}'s desired state: {what}"),
        DEFAULT_TIMEOUT,
        || desired_of(kv, dev),
        |d| d.as_ref().is_some_and(|(m, _)| done(m)),
    )
    .await
    .unwrap()
}

/// Waits until EdgeManifest `name` has a status `done` accepts, and returns that status.
async fn wait_manifest_status(
    manifests: &Api<EdgeManifest>,
    name: &str,
    what: &str,
    done: impl Fn(&fleetlet_crds::EdgeManifestStatus) -> bool,
) -> fleetlet_crds::EdgeManifestStatus {
    eventually(
        &format!("EdgeManifest {name}: {what}"),
        DEFAULT_TIMEOUT,
        || async {
            let m = manifests.get(name).await.map_err(|e| e.to_string())?;
            match m.status {
                Some(s) if done(&s) => Ok(s),
                other => Err(format!("status {other:?}")),
            }
        },
    )
    .await
}

/// Waits until EdgeManifest `name` has a condition `type_` with `status`, and returns it.
async fn wait_condition(
    manifests: &Api<EdgeManifest>,
    name: &str,
    type_: &str,
    status: &str,
) -> fleetlet_crds::Condition {
    let s = wait_manifest_status(manifests, name, &format!("{type_}={status}"), |s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == type_ && c.status == status)
    })
    .await;
    s.conditions
        .into_iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .unwrap()
}

fn resource_ids(m: &AgentManifest) -> Vec<String> {
    m.resources.iter().map(|r| r.id.to_string()).collect()
}

/// Writes what an agent would: a heartbeat (online) and a status for its current manifest.
async fn simulate_agent(kv: &Kv, dev: &str, ready: bool) {
    simulate_agent_at(kv, dev, ready, Timestamp::now()).await;
}

/// Like [`simulate_agent`], with the heartbeat stamped `at` (a stale one: an offline device).
async fn simulate_agent_at(kv: &Kv, dev: &str, ready: bool, at: Timestamp) {
    let id = DeviceId::new(dev).unwrap();
    let hb = Heartbeat {
        api_version: API_VERSION.into(),
        device: id.clone(),
        sequence: 1,
        timestamp: at,
        interval_seconds: 10,
        free: Free::default(),
        facts: None,
    };
    kv.heartbeat
        .put(dev, encode(&hb).unwrap().into())
        .await
        .unwrap();
    let Some((m, _)) = desired_of(kv, dev).await else {
        return;
    };
    let mut s = AgentStatus::new(id);
    s.manifest_generation = m.generation;
    s.observed_generation = if ready {
        m.generation
    } else {
        m.generation.saturating_sub(1)
    };
    for r in &m.resources {
        s.resources.insert(
            r.id.clone(),
            if ready {
                ResourceStatus::ready(
                    Timestamp(1),
                    ResourceDetails::File {
                        sha256: String::new(),
                        size: 0,
                    },
                )
            } else {
                ResourceStatus::Reconciling {
                    since: Timestamp(1),
                    message: None,
                }
            },
        );
    }
    kv.actual
        .put(dev, encode(&s).unwrap().into())
        .await
        .unwrap();
}

#[tokio::test]
async fn selected_devices_get_the_union_of_every_manifest_that_selects_them() {
    let (env, _c) = shared();
    let ns = env.namespace("ctl-union").await.unwrap();
    let client = env.kube_client().await.unwrap();
    let kv = kv(env).await;
    let devices: Api<EdgeDevice> = Api::namespaced(client.clone(), &ns);
    let manifests: Api<EdgeManifest> = Api::namespaced(client.clone(), &ns);
    apply(&devices, device("u-a", json!({ "role": "sensor" }))).await;
    apply(&devices, device("u-b", json!({ "role": "gateway" }))).await;
    apply(
        &manifests,
        manifest(
            "sensors",
            json!({ "selector": { "matchLabels": { "role": "sensor" } },
        "resources": [file("cfg", "/etc/fleetlet/s.conf", "s")] }),
        ),
    )
    .await;
    apply(
        &manifests,
        manifest(
            "named",
            json!({ "devices": ["u-a", "u-b"],
        "resources": [file("motd", "/etc/fleetlet/motd", "hi")] }),
        ),
    )
    .await;

    let (a, _) = wait_desired(&kv, "u-a", "two resources", |m| m.resources.len() == 2).await;
    assert_eq!(resource_ids(&a), ["cfg", "motd"]);
    assert_eq!(a.resources[0].owner.name, "sensors");
    assert_eq!(a.resources[0].owner.namespace, ns);
    let (b, _) = wait_desired(&kv, "u-b", "any resource", |m| !m.resources.is_empty()).await;
    assert_eq!(resource_ids(&b), ["motd"]);

    // The controller records what it wrote, and the finalizer guards deletion.
    let obj = eventually("u-a's desiredGeneration", DEFAULT_TIMEOUT, || async {
        let d = devices.get("u-a").await.map_err(|e| e.to_string())?;
        let recorded = d.status.as_ref().and_then(|s| s.desired_generation);
        if recorded == Some(a.generation) {
            Ok(d)
        } else {
            Err(format!(
                "desiredGeneration {recorded:?}, want {}",
                a.generation
            ))
        }
    })
    .await;
    assert_eq!(obj.name_any(), "u-a");
    // The finalizer is added by the pass; desiredGeneration by a background writer.
    eventually("the finalizer on sensors", DEFAULT_TIMEOUT, || async {
        let m = manifests.get("sensors").await.map_err(|e| e.to_string())?;
        if m.finalizers()
            .iter()
            .any(|f| f == "fleetlet.dev/device-cleanup")
        {
            Ok(())
        } else {
            Err(format!("finalizers {:?}", m.finalizers()))
        }
    })
    .await;
    let st = wait_manifest_status(&manifests, "named", "2 targeted and updated", |s| {
        s.targeted == 2 && s.updated == 2
    })
    .await;
    assert_eq!(st.ready, 0, "no device reported Ready yet");
}

#[tokio::test]
async fn relabelling_a_device_moves_resources_on_and_off_it() {
    let (env, _c) = shared();
    let ns = env.namespace("ctl-relabel").await.unwrap();
    let client = env.kube_client().await.unwrap();
    let kv = kv(env).await;
    let devices: Api<EdgeDevice> = Api::namespaced(client.clone(), &ns);
    let manifests: Api<EdgeManifest> = Api::namespaced(client, &ns);
    apply(&devices, device("rl-a", json!({ "tier": "canary" }))).await;
    apply(
        &manifests,
        manifest(
            "canary",
            json!({ "selector": { "matchLabels": { "tier": "canary" } },
        "resources": [file("c", "/etc/fleetlet/c", "c")] }),
        ),
    )
    .await;
    let (g1, _) = wait_desired(&kv, "rl-a", "on", |m| m.resources.len() == 1).await;

    apply(&devices, device("rl-a", json!({ "tier": "stable" }))).await;
    let (g2, _) = wait_desired(&kv, "rl-a", "off", |m| m.resources.is_empty()).await;
    assert!(g2.generation > g1.generation);

    apply(&devices, device("rl-a", json!({ "tier": "canary" }))).await;
    let (g3, _) = wait_desired(&kv, "rl-a", "on again", |m| m.resources.len() == 1).await;
    assert!(g3.generation > g2.generation, "generations only go up");
}

#[tokio::test]
async fn conflicting_manifests_are_reported_on_both_and_the_older_one_keeps_the_resource() {
    let (env, _c) = shared();
    let ns = env.namespace("ctl-conflict").await.unwrap();
    let client = env.kube_client().await.unwrap();
    let kv = kv(env).await;
    let devices: Api<EdgeDevice> = Api::namespaced(client.clone(), &ns);
    let manifests: Api<EdgeManifest> = Api::namespaced(client.clone(), &ns);
    apply(&devices, device("cf-a", json!({}))).await;
    apply(&manifests, manifest("first", json!({ "devices": ["cf-a"], "resources": [file("cfg", "/etc/fleetlet/app.conf", "first")] }))).await;
    wait_desired(&kv, "cf-a", "first applied", |m| m.resources.len() == 1).await;
    // Creation timestamps have one-second resolution: make the second one clearly younger.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    apply(&manifests, manifest("second", json!({ "devices": ["cf-a"],
        "resources": [file("other-id", "/etc/fleetlet/app.conf", "second"), file("fine", "/etc/fleetlet/fine", "ok")] }))).await;

    let (m, _) = wait_desired(&kv, "cf-a", "merged", |m| m.resources.len() == 2).await;
    assert_eq!(
        resource_ids(&m),
        ["cfg", "fine"],
        "the contested path stays with the older manifest"
    );
    for name in ["first", "second"] {
        let cond = wait_condition(&manifests, name, "Conflict", "True").await;
        assert!(
            cond.message.contains("file /etc/fleetlet/app.conf on cf-a"),
            "{}",
            cond.message
        );
        assert!(
            cond.message.contains(&format!("kept by {ns}/first")),
            "{}",
            cond.message
        );
    }
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client, &ns);
    let found = eventually("two ResourceConflict events", DEFAULT_TIMEOUT, || async {
        let list = events
            .list(&Default::default())
            .await
            .map_err(|e| e.to_string())?;
        let n = list
            .items
            .iter()
            .filter(|e| e.reason.as_deref() == Some("ResourceConflict"))
            .count();
        if n >= 2 {
            Ok(n)
        } else {
            Err(format!("{n} ResourceConflict events"))
        }
    })
    .await;
    assert!(found >= 2);
}

#[tokio::test]
async fn nothing_is_rewritten_while_nothing_changes() {
    let (env, c) = shared();
    let ns = env.namespace("ctl-steady").await.unwrap();
    let client = env.kube_client().await.unwrap();
    let kv = kv(env).await;
    let devices: Api<EdgeDevice> = Api::namespaced(client.clone(), &ns);
    let manifests: Api<EdgeManifest> = Api::namespaced(client, &ns);
    apply(&devices, device("st-a", json!({}))).await;
    apply(
        &manifests,
        manifest(
            "m",
            json!({ "devices": ["st-a"], "resources": [file("f", "/etc/fleetlet/f", "f")] }),
        ),
    )
    .await;
    let (_, rev) = wait_desired(&kv, "st-a", "written", |m| m.resources.len() == 1).await;
    // Status traffic, an annotation and several passes later (counted, so a dead controller
    // cannot pass for a quiet one):
    simulate_agent(&kv, "st-a", true).await;
    devices
        .patch(
            "st-a",
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "annotations": { "note": "x" } } })),
        )
        .await
        .unwrap();
    wait_passes(c.metrics_port, 3).await;
    let (_, rev_after) = desired_of(&kv, "st-a").await.unwrap();
    assert_eq!(
        rev, rev_after,
        "the desired-state key was rewritten with nothing changed"
    );
}

#[tokio::test]
async fn a_generation_applied_in_time_costs_no_status_write_and_a_slow_one_is_recorded() {
    let (env, c) = shared();
    let ns = env.namespace("ctl-record").await.unwrap();
    let client = env.kube_client().await.unwrap();
    let kv = kv(env).await;
    let devices: Api<EdgeDevice> = Api::namespaced(client.clone(), &ns);
    let manifests: Api<EdgeManifest> = Api::namespaced(client, &ns);
    let unrecorded = || async {
        let text = get(c.metrics_port, "/metrics").await?;
        sample(&text, "fleetlet_controller_generations_unrecorded_total")
            .ok_or_else(|| format!("no generations_unrecorded_total in:\n{text}"))
    };
    let before = eventually("the controller's metrics", DEFAULT_TIMEOUT, unrecorded).await;
    apply(&devices, device("rec-fast", json!({ "record": "yes" }))).await;
    apply(&devices, device("rec-slow", json!({ "record": "yes" }))).await;
    apply(
        &manifests,
        manifest(
            "rec",
            json!({ "selector": { "matchLabels": { "record": "yes" } },
        "resources": [file("motd", "/etc/fleetlet/motd", "hi")] }),
        ),
    )
    .await;
    // One device reports the generation applied as soon as it is written, well within the
    // controller's 5 s; the other never reports.
    let (fast, _) =
        wait_desired(&kv, "rec-fast", "the manifest", |m| !m.resources.is_empty()).await;
    simulate_agent(&kv, "rec-fast", true).await;
    let fast_reported = std::time::Instant::now();
    let (slow, _) =
        wait_desired(&kv, "rec-slow", "the manifest", |m| !m.resources.is_empty()).await;
    let recorded = |name: &'static str| {
        let devices = devices.clone();
        async move {
            let d = devices.get(name).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(d.status.and_then(|s| s.desired_generation))
        }
    };
    eventually(
        "rec-slow's generation recorded",
        DEFAULT_TIMEOUT,
        || async {
            match recorded("rec-slow").await? {
                Some(g) if g == slow.generation => Ok(()),
                other => Err(format!(
                    "desiredGeneration {other:?}, want {}",
                    slow.generation
                )),
            }
        },
    )
    .await;
    // Long past the fast device's window, and some passes later: still no record of its
    // generation, and the skipped record is counted.
    tokio::time::sleep(Duration::from_secs(7).saturating_sub(fast_reported.elapsed())).await;
    wait_passes(c.metrics_port, 2).await;
    assert_eq!(
        recorded("rec-fast").await.unwrap(),
        None,
        "generation {} was recorded though the device reported it applied at once",
        fast.generation
    );
    let after = unrecorded().await.unwrap();
    assert!(
        after > before,
        "generations_unrecorded_total did not move: {before} then {after}"
    );
}

#[tokio::test]
async fn a_desired_state_key_deleted_by_hand_is_rewritten_with_a_newer_generation() {
    let (env, _c) = shared();
    let ns = env.namespace("ctl-lostkey").await.unwrap();
    let client = env.kube_client().await.unwrap();
    let kv = kv(env).await;
    apply(
        &Api::<EdgeDevice>::namespaced(client.clone(), &ns),
        device("lk-a", json!({})),
    )
    .await;
    apply(
        &Api::<EdgeManifest>::namespaced(client, &ns),
        manifest(
            "m",
            json!({ "devices": ["lk-a"], "resources": [file("f", "/etc/fleetlet/f", "f")] }),
        ),
    )
    .await;
    let (first, _) = wait_desired(&kv, "lk-a", "written", |m| m.resources.len() == 1).await;
    fleetlet_controller::remove_key(&kv.desired, "lk-a")
        .await
        .unwrap();
    let (again, _) = wait_desired(&kv, "lk-a", "rewritten", |_| true).await;
    assert_eq!(again.resources, first.resources);
    assert!(
        again.generation > first.generation,
        "a device that ran {} must not be sent {}",
        first.generation,
        again.generation
    );
}

#[tokio::test]
async fn a_device_reporting_an_impossible_generation_stalls_nothing() {
    let (env, c) = shared();
    let ns = env.namespace("ctl-hostile").await.unwrap();
    let client = env.kube_client().await.unwrap();
    let kv = kv(env).await;
    let devices: Api<EdgeDevice> = Api::namespaced(client.clone(), &ns);
    let manifests: Api<EdgeManifest> = Api::namespaced(client.clone(), &ns);
    apply(&devices, device("hg-evil", json!({ "site": "hg" }))).await;
    apply(&devices, device("hg-good", json!({ "site": "hg" }))).await;
    // The hostile device reports running the largest generation there is, before the
    // controller has written it anything (the controller's next generation would be
    // u64::MAX + 1).
    let mut s = AgentStatus::new(DeviceId::new("hg-evil").unwrap());
    s.manifest_generation = u64::MAX;
    s.observed_generation = u64::MAX;
    kv.actual
        .put("hg-evil", encode(&s).unwrap().into())
        .await
        .unwrap();
    apply(
        &manifests,
        manifest(
            "m",
            json!({ "selector": { "matchLabels": { "site": "hg" } },
                    "resources": [file("f", "/etc/fleetlet/f", "one")] }),
        ),
    )
    .await;
    // Both get a manifest with a generation Kubernetes can store; the controller runs on.
    for d in ["hg-good", "hg-evil"] {
        let (m, _) = wait_desired(&kv, d, "a manifest", |m| m.resources.len() == 1).await;
        assert!(m.generation <= i64::MAX as u64, "{d}: {}", m.generation);
    }
    wait_passes(c.metrics_port, 2).await;
    // A change still reaches the well-behaved device.
    apply(
        &manifests,
        manifest(
            "m",
            json!({ "selector": { "matchLabels": { "site": "hg" } },
                    "resources": [file("f", "/etc/fleetlet/f", "two")] }),
        ),
    )
    .await;
    wait_desired(&kv, "hg-good", "the change", |m| {
        matches!(&m.resources[0].spec, fleetlet_protocol::ResourceSpec::File(f)
            if f.content == fleetlet_protocol::FileContent::Text("two".into()))
    })
    .await;
    // The EdgeDevice says what happened.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client, &ns);
    fleetlet_testenv::wait::event(&events, "EdgeDevice", "hg-evil", "GenerationOutOfRange").await;
    // Recovery: the device's state is reset (it reports what it was sent); the condition
    // goes, and nothing else of its status is lost.
    let (m, _) = desired_of(&kv, "hg-evil").await.unwrap();
    let mut s = AgentStatus::new(DeviceId::new("hg-evil").unwrap());
    s.manifest_generation = m.generation;
    s.observed_generation = m.generation;
    kv.actual
        .put("hg-evil", encode(&s).unwrap().into())
        .await
        .unwrap();
    eventually("the condition cleared", DEFAULT_TIMEOUT, || async {
        let d = devices.get("hg-evil").await.map_err(|e| e.to_string())?;
        let conditions = d.status.map(|s| s.conditions).unwrap_or_default();
        (!conditions.iter().any(|c| c.type_ == "GenerationOutOfRange"))
            .then_some(())
            .ok_or(format!("{conditions:?}"))
    })
    .await;
}

#[tokio::test]
async fn deleting_a_manifest_removes_its_resources_from_devices_before_it_goes() {
    let (env, _c) = shared();
    let ns = env.namespace("ctl-delete").await.unwrap();
    let client = env.kube_client().await.unwrap();
    let kv = kv(env).await;
    let manifests: Api<EdgeManifest> = Api::namespaced(client.clone(), &ns);
    apply(
        &Api::<EdgeDevice>::namespaced(client.clone(), &ns),
        device("dl-a", json!({})),
    )
    .await;
    apply(
        &manifests,
        manifest(
            "keep",
            json!({ "devices": ["dl-a"], "resources": [file("k", "/etc/fleetlet/k", "k")] }),
        ),
    )
    .await;
    apply(
        &manifests,
        manifest(
            "gone",
            json!({ "devices": ["dl-a"], "resources": [file("g", "/etc/fleetlet/g", "g")] }),
        ),
    )
    .await;
    wait_desired(&kv, "dl-a", "both", |m| m.resources.len() == 2).await;
    eventually("a finalizer on gone", DEFAULT_TIMEOUT, || async {
        let m = manifests.get("gone").await.map_err(|e| e.to_string())?;
        if m.finalizers().is_empty() {
            Err("no finalizers".to_string())
        } else {
            Ok(())
        }
    })
    .await;

    manifests
        .delete("gone", &DeleteParams::default())
        .await
        .unwrap();
    let (m, _) = wait_desired(&kv, "dl-a", "removed from device", |m| {
        m.resources.len() == 1
    })
    .await;
    assert_eq!(resource_ids(&m), ["k"]);
    eventually(
        "EdgeManifest gone to be deleted",
        DEFAULT_TIMEOUT,
        || async {
            match manifests.get_opt("gone").await.map_err(|e| e.to_string())? {
                None => Ok(()),
                Some(m) => Err(format!("still there, finalizers {:?}", m.finalizers())),
            }
        },
    )
    .await;
}

/// A manifest whose selector matches no device is not "rolled out": Ready=False with its
/// own reason, until a device matches; then it rolls out as usual.
#[tokio::test]
async fn a_manifest_that_selects_no_device_says_so_instead_of_ready() {
    let (env, _c) = shared();
    let ns = env.namespace("ctl-nodevice").await.unwrap();
    let client = env.kube_client().await.unwrap();
    let kv = kv(env).await;
    let devices: Api<EdgeDevice> = Api::namespaced(client.clone(), &ns);
    let manifests: Api<EdgeManifest> = Api::namespaced(client, &ns);
    apply(
        &manifests,
        manifest(
            "typo",
            json!({ "selector": { "matchLabels": { "role": "sensr" } },
                    "resources": [file("f", "/etc/fleetlet/f", "f")] }),
        ),
    )
    .await;
    let ready = wait_condition(&manifests, "typo", "Ready", "False").await;
    assert_eq!(ready.reason, "NoDevicesSelected", "{ready:?}");
    let st = manifests.get("typo").await.unwrap().status.unwrap();
    assert_eq!(st.targeted, 0);
    assert!(
        st.conditions
            .iter()
            .any(|c| c.type_ == "Reconciling" && c.status == "False")
    );
    apply(&devices, device("nd-a", json!({ "role": "sensr" }))).await;
    wait_desired(&kv, "nd-a", "written", |m| m.resources.len() == 1).await;
    simulate_agent(&kv, "nd-a", true).await;
    let ready = wait_condition(&manifests, "typo", "Ready", "True").await;
    assert_ne!(ready.reason, "NoDevicesSelected");
}

/// A paused device gets no changes, but a deleted manifest's resources still leave it:
/// deletion is not held back by the pause (and the finalizer is released).
#[tokio::test]
async fn deleting_a_manifest_reaches_a_paused_device() {
    let (env, c) = shared();
    let ns = env.namespace("ctl-pausedel").await.unwrap();
    let client = env.kube_client().await.unwrap();
    let kv = kv(env).await;
    let devices: Api<EdgeDevice> = Api::namespaced(client.clone(), &ns);
    let manifests: Api<EdgeManifest> = Api::namespaced(client, &ns);
    apply(&devices, device("pd-a", json!({}))).await;
    let keep = |text: &str| {
        manifest(
            "keep",
            json!({ "devices": ["pd-a"], "resources": [file("k", "/etc/fleetlet/k", text)] }),
        )
    };
    apply(&manifests, keep("v1")).await;
    apply(
        &manifests,
        manifest(
            "gone",
            json!({ "devices": ["pd-a"], "resources": [file("g", "/etc/fleetlet/g", "g")] }),
        ),
    )
    .await;
    wait_desired(&kv, "pd-a", "both", |m| m.resources.len() == 2).await;
    eventually("a finalizer on gone", DEFAULT_TIMEOUT, || async {
        let m = manifests.get("gone").await.map_err(|e| e.to_string())?;
        (!m.finalizers().is_empty())
            .then_some(())
            .ok_or("no finalizers".to_string())
    })
    .await;

    apply(
        &devices,
        json!({ "apiVersion": "fleetlet.dev/v1alpha1", "kind": "EdgeDevice",
                "metadata": { "name": "pd-a" }, "spec": { "paused": true } }),
    )
    .await;
    // The pause holds a change back (passes counted, so a dead controller cannot pass).
    let (_, rev) = desired_of(&kv, "pd-a").await.unwrap();
    apply(&manifests, keep("v2")).await;
    wait_passes(c.metrics_port, 3).await;
    let (m, rev_paused) = desired_of(&kv, "pd-a").await.unwrap();
    assert_eq!(rev_paused, rev, "a paused device got a change");
    let text_of_k = |m: &AgentManifest| {
        m.resources
            .iter()
            .find(|r| r.id.as_str() == "k")
            .map(|r| serde_json::to_string(&r.spec).unwrap())
            .unwrap_or_default()
    };
    assert!(text_of_k(&m).contains("v1"), "{}", text_of_k(&m));

    manifests
        .delete("gone", &DeleteParams::default())
        .await
        .unwrap();
    let (m, _) = wait_desired(&kv, "pd-a", "gone's resource removed", |m| {
        m.resources.len() == 1
    })
    .await;
    assert_eq!(resource_ids(&m), ["k"]);
    assert!(
        text_of_k(&m).contains("v1"),
        "the held-back change stays held back: {}",
        text_of_k(&m)
    );
    eventually("gone deleted", DEFAULT_TIMEOUT, || async {
        match manifests.get_opt("gone").await.map_err(|e| e.to_string())? {
            None => Ok(()),
            Some(m) => Err(format!("still there, finalizers {:?}", m.finalizers())),
        }
    })
    .await;
}

/// The same device name in two namespaces: the older EdgeDevice is served, the younger is
/// ignored with a warning, and takes over once the older is deleted.
#[tokio::test]
async fn one_device_name_in_two_namespaces_is_served_from_the_older_object() {
    let (env, c) = shared();
    let client = env.kube_client().await.unwrap();
    let kv = kv(env).await;
    let ns1 = env.namespace("ctl-dup-one").await.unwrap();
    let ns2 = env.namespace("ctl-dup-two").await.unwrap();
    let devices1: Api<EdgeDevice> = Api::namespaced(client.clone(), &ns1);
    let devices2: Api<EdgeDevice> = Api::namespaced(client.clone(), &ns2);
    apply(&devices1, device("dup-a", json!({}))).await;
    apply(
        &Api::<EdgeManifest>::namespaced(client.clone(), &ns1),
        manifest(
            "m1",
            json!({ "devices": ["dup-a"], "resources": [file("one", "/etc/fleetlet/one", "1")] }),
        ),
    )
    .await;
    wait_desired(&kv, "dup-a", "ns1's manifest", |m| {
        resource_ids(m) == ["one"]
    })
    .await;
    // Creation timestamps have one-second resolution: make the second one clearly younger.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    apply(&devices2, device("dup-a", json!({}))).await;
    apply(
        &Api::<EdgeManifest>::namespaced(client, &ns2),
        manifest(
            "m2",
            json!({ "devices": ["dup-a"], "resources": [file("two", "/etc/fleetlet/two", "2")] }),
        ),
    )
    .await;
    wait_passes(c.metrics_port, 3).await;
    let (m, _) = desired_of(&kv, "dup-a").await.unwrap();
    assert_eq!(resource_ids(&m), ["one"], "the younger object is ignored");
    let log = std::fs::read_to_string(env.dir.join("controller-shared.log")).unwrap();
    assert!(
        log.contains("device id already used in another namespace"),
        "the conflict is logged"
    );

    devices1
        .delete("dup-a", &DeleteParams::default())
        .await
        .unwrap();
    wait_desired(
        &kv,
        "dup-a",
        "ns2's manifest after ns1's device left",
        |m| resource_ids(m) == ["two"],
    )
    .await;
}

/// A device whose last heartbeat is older than `--offline-after-seconds` (30 s here)
/// counts as offline from that age alone: it gets a new version at once, outside the
/// rollout's budget, while online devices move one at a time.
#[tokio::test]
async fn a_device_with_a_stale_heartbeat_is_offline_and_moves_outside_the_budget() {
    let (env, _c) = shared();
    let ns = env.namespace("ctl-stale").await.unwrap();
    let client = env.kube_client().await.unwrap();
    let kv = kv(env).await;
    let devices: Api<EdgeDevice> = Api::namespaced(client.clone(), &ns);
    let manifests: Api<EdgeManifest> = Api::namespaced(client, &ns);
    let names = ["os-a", "os-b", "os-stale"];
    for n in names {
        apply(&devices, device(n, json!({ "app": "os" }))).await;
    }
    let spec = |text: &str| {
        json!({ "selector": { "matchLabels": { "app": "os" } },
        "rollout": { "maxUnavailable": 1 },
        "resources": [file("f", "/etc/fleetlet/f", text)] })
    };
    apply(&manifests, manifest("app", spec("v1"))).await;
    for n in names {
        wait_desired(&kv, n, "v1", |m| m.resources.len() == 1).await;
    }
    simulate_agent(&kv, "os-a", true).await;
    simulate_agent(&kv, "os-b", true).await;
    // Ready on v1, but its last heartbeat is a minute old.
    simulate_agent_at(
        &kv,
        "os-stale",
        true,
        Timestamp(Timestamp::now().0.saturating_sub(60_000)),
    )
    .await;
    wait_manifest_status(&manifests, "app", "all ready", |s| s.ready == 3).await;

    apply(&manifests, manifest("app", spec("v2"))).await;
    let on_v2 = async |n: &str| {
        desired_of(&kv, n)
            .await
            .is_some_and(|(m, _)| m.resources[0].owner.generation == 2)
    };
    eventually("the first step", DEFAULT_TIMEOUT, || async {
        let mut moved = Vec::new();
        for n in names {
            if on_v2(n).await {
                moved.push(n);
            }
        }
        // Both moves land in one pass; wait for two before judging which.
        (moved.len() >= 2).then_some(()).ok_or(format!("{moved:?}"))
    })
    .await;
    assert!(on_v2("os-stale").await, "the offline device moved at once");
    let online_moved = [on_v2("os-a").await, on_v2("os-b").await];
    assert_eq!(
        online_moved.iter().filter(|m| **m).count(),
        1,
        "one online device within maxUnavailable 1: {online_moved:?}"
    );
}

#[tokio::test]
async fn deleting_a_device_removes_its_kv_keys() {
    let (env, _c) = shared();
    let ns = env.namespace("ctl-devdel").await.unwrap();
    let client = env.kube_client().await.unwrap();
    let kv = kv(env).await;
    let devices: Api<EdgeDevice> = Api::namespaced(client.clone(), &ns);
    for d in ["dd-a", "dd-b"] {
        apply(&devices, device(d, json!({}))).await;
    }
    apply(
        &Api::<EdgeManifest>::namespaced(client, &ns),
        manifest(
            "m",
            json!({ "devices": ["dd-a", "dd-b"], "resources": [file("f", "/etc/fleetlet/f", "f")] }),
        ),
    )
    .await;
    wait_desired(&kv, "dd-a", "written", |_| true).await;
    wait_desired(&kv, "dd-b", "written", |_| true).await;
    // dd-a has gone quiet (its last heartbeat is old); dd-b still beats.
    simulate_agent_at(&kv, "dd-a", true, Timestamp(1)).await;
    simulate_agent(&kv, "dd-b", true).await;

    for d in ["dd-a", "dd-b"] {
        devices.delete(d, &DeleteParams::default()).await.unwrap();
    }
    let left = async |d: &str| {
        let mut left = Vec::new();
        for (bucket, store) in [
            ("desired", &kv.desired),
            ("actual", &kv.actual),
            ("heartbeat", &kv.heartbeat),
        ] {
            let e = store.entry(d).await.map_err(|e| e.to_string())?;
            if e.is_some_and(|e| e.operation == async_nats::jetstream::kv::Operation::Put) {
                left.push(bucket);
            }
        }
        Ok::<_, String>(left)
    };
    eventually("dd-a's KV keys gone", DEFAULT_TIMEOUT, || async {
        let l = left("dd-a").await?;
        l.is_empty().then_some(()).ok_or(format!("still in {l:?}"))
    })
    .await;
    // A device that still beats keeps the heartbeat that shows it (and with it its facts,
    // which a running agent does not store again for up to an hour).
    eventually(
        "dd-b's manifest and status gone",
        DEFAULT_TIMEOUT,
        || async {
            let l = left("dd-b").await?;
            (l == ["heartbeat"])
                .then_some(())
                .ok_or(format!("left: {l:?}"))
        },
    )
    .await;
}

#[tokio::test]
async fn status_written_before_its_edgedevice_is_seen_is_kept() {
    let (env, c) = shared();
    let ns = env.namespace("ctl-early").await.unwrap();
    let client = env.kube_client().await.unwrap();
    let kv = kv(env).await;
    // An agent reports before its EdgeDevice exists (or reaches the controller's watch).
    let mut s = AgentStatus::new(DeviceId::new("ek-early").unwrap());
    s.manifest_generation = 7;
    s.observed_generation = 7;
    let written = kv
        .actual
        .put("ek-early", encode(&s).unwrap().into())
        .await
        .unwrap();
    wait_passes(c.metrics_port, 3).await;
    let entry = kv.actual.entry("ek-early").await.unwrap();
    assert!(
        entry
            .is_some_and(|e| e.revision == written
                && e.operation == async_nats::jetstream::kv::Operation::Put),
        "the status of a device not known yet was removed"
    );
    // Its EdgeDevice comes: the controller goes on from what the device reported.
    let devices: Api<EdgeDevice> = Api::namespaced(client, &ns);
    apply(&devices, device("ek-early", json!({}))).await;
    let (m, _) = wait_desired(&kv, "ek-early", "a manifest", |_| true).await;
    assert!(m.generation > 7, "sent generation {} after 7", m.generation);
    let kept = kv.actual.entry("ek-early").await.unwrap().unwrap();
    assert_eq!(kept.revision, written);
}

#[tokio::test]
async fn max_unavailable_moves_one_device_at_a_time_and_a_stuck_rollout_is_reported() {
    let (env, c) = shared();
    let ns = env.namespace("ctl-rollout").await.unwrap();
    let client = env.kube_client().await.unwrap();
    let kv = kv(env).await;
    let devices: Api<EdgeDevice> = Api::namespaced(client.clone(), &ns);
    let manifests: Api<EdgeManifest> = Api::namespaced(client, &ns);
    let names = ["ro-a", "ro-b", "ro-c"];
    for n in names {
        apply(&devices, device(n, json!({ "app": "ro" }))).await;
    }
    let spec = |text: &str| {
        json!({ "selector": { "matchLabels": { "app": "ro" } },
        "rollout": { "maxUnavailable": 1, "progressDeadlineSeconds": 3 },
        "resources": [file("f", "/etc/fleetlet/f", text)] })
    };
    apply(&manifests, manifest("app", spec("v1"))).await;
    for n in names {
        wait_desired(&kv, n, "v1", |m| m.resources.len() == 1).await;
        simulate_agent(&kv, n, true).await;
    }
    wait_manifest_status(&manifests, "app", "all ready", |s| s.ready == 3).await;

    // Sampled all through the rollout, not only at its first step: never more than one
    // device whose newest manifest it has not reported Ready.
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = tokio::spawn({
        let (desired, actual, on) = (kv.desired.clone(), kv.actual.clone(), sampling.clone());
        async move {
            let (mut samples, mut worst) = (0u32, Vec::new());
            while on.load(Ordering::SeqCst) {
                let now = unavailable(&desired, &actual, &names).await;
                if now.len() > worst.len() {
                    worst = now;
                }
                samples += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (samples, worst)
        }
    });
    apply(&manifests, manifest("app", spec("v2"))).await;
    let owner_gen = async |n: &str| {
        desired_of(&kv, n)
            .await
            .map(|(m, _)| m.resources[0].owner.generation)
            .unwrap_or(0)
    };
    let moved = eventually("one device moved", DEFAULT_TIMEOUT, || async {
        let mut moved = Vec::new();
        for n in names {
            if owner_gen(n).await == 2 {
                moved.push(n);
            }
        }
        if moved.is_empty() {
            Err("none moved".to_string())
        } else {
            Ok(moved)
        }
    })
    .await;
    assert_eq!(moved.len(), 1, "maxUnavailable 1 moved {moved:?}");
    // The moved device stays un-Ready: nothing else moves, and the deadline passes.
    simulate_agent(&kv, moved[0], false).await;
    let stuck = wait_condition(&manifests, "app", "Progressing", "False").await;
    assert_eq!(stuck.reason, "ProgressDeadlineExceeded");
    assert!(stuck.message.contains(moved[0]), "{}", stuck.message);
    let mut still_old = 0;
    for n in names {
        if owner_gen(n).await == 1 {
            still_old += 1;
        }
    }
    assert_eq!(still_old, 2);
    // The rollout gauges show it (at least: the controller is shared with other tests):
    // one rollout in progress, two devices still to move, one waited on to be Ready.
    eventually("the rollout gauges", DEFAULT_TIMEOUT, || async {
        let text = get(c.metrics_port, "/metrics").await?;
        let g = |name: &str| sample(&text, name).unwrap_or(0.0);
        let seen = (
            g("fleetlet_controller_rollouts_in_progress"),
            g("fleetlet_controller_devices_pending_rollout"),
            g("fleetlet_controller_devices_waiting_ready"),
        );
        (seen.0 >= 1.0 && seen.1 >= 2.0 && seen.2 >= 1.0)
            .then_some(())
            .ok_or(format!("{seen:?}"))
    })
    .await;

    // It becomes Ready: the next device moves, and so on to the end (each poll reports
    // every device Ready on whatever it was sent last).
    let done = eventually("rollout complete", DEFAULT_TIMEOUT, || async {
        for n in names {
            simulate_agent(&kv, n, true).await;
        }
        let m = manifests.get("app").await.map_err(|e| e.to_string())?;
        match m.status {
            Some(s) if s.updated == 3 && s.ready == 3 => Ok(s),
            other => Err(format!("status {other:?}")),
        }
    })
    .await;
    let p = done
        .conditions
        .iter()
        .find(|c| c.type_ == "Progressing")
        .unwrap();
    assert_eq!(
        (p.status.as_str(), p.reason.as_str()),
        ("True", "RolloutComplete")
    );
    sampling.store(false, Ordering::SeqCst);
    let (samples, worst) = sampler.await.unwrap();
    assert!(samples > 10, "{samples} samples");
    assert_eq!(
        worst.len(),
        1,
        "at most one device unavailable at any sample, and the sampler saw one: {worst:?}"
    );
}

/// The devices among `names` whose newest manifest they have not reported Ready.
async fn unavailable(desired: &Store, actual: &Store, names: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for n in names {
        let Some(m) = desired
            .entry(*n)
            .await
            .ok()
            .flatten()
            .and_then(|e| decode::<AgentManifest>(&e.value).ok())
        else {
            continue;
        };
        let ready = actual
            .entry(*n)
            .await
            .ok()
            .flatten()
            .and_then(|e| decode::<AgentStatus>(&e.value).ok())
            .is_some_and(|s| {
                s.observed_generation >= m.generation
                    && s.resources.values().all(ResourceStatus::is_ready)
            });
        if !ready {
            out.push(n.to_string());
        }
    }
    out
}

fn http_get(port: u16, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// The response to `GET path` from a controller's metrics listener (off the runtime's
/// threads); Err says why there is none, e.g. not listening yet.
async fn get(port: u16, path: &'static str) -> Result<String, String> {
    tokio::task::spawn_blocking(move || http_get(port, path))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

/// The value of the unlabelled sample `name` in a /metrics response.
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// `fleetlet_controller_passes_total` and `fleetlet_controller_leader` of the controller
/// on `port`.
async fn passes_and_leader(port: u16) -> Result<(f64, f64), String> {
    let text = get(port, "/metrics").await?;
    match (
        sample(&text, "fleetlet_controller_passes_total"),
        sample(&text, "fleetlet_controller_leader"),
    ) {
        (Some(p), Some(l)) => Ok((p, l)),
        _ => Err(format!("no passes_total or leader in:\n{text}")),
    }
}

/// Waits until the controller on `port` has finished `n` more passes, as leader, than when
/// called: proof it was alive and reconciling while a test watched for writes.
async fn wait_passes(port: u16, n: u32) {
    let (from, _) = eventually("the controller's metrics", DEFAULT_TIMEOUT, || {
        passes_and_leader(port)
    })
    .await;
    let want = from + f64::from(n);
    eventually(&format!("{n} more passes"), DEFAULT_TIMEOUT, || async {
        let (passes, leader) = passes_and_leader(port).await?;
        if passes >= want && leader == 1.0 {
            Ok(())
        } else {
            Err(format!("{passes} passes (want {want}), leader {leader}"))
        }
    })
    .await;
}

#[tokio::test]
async fn metrics_and_health_endpoints_answer() {
    let (env, c) = shared();
    let _ = env.namespace("ctl-metrics").await.unwrap();
    let port = c.metrics_port;
    let ready = eventually("/readyz to answer 200", DEFAULT_TIMEOUT, || async {
        let r = get(port, "/readyz").await?;
        if r.starts_with("HTTP/1.0 200") {
            Ok(r)
        } else {
            Err(r)
        }
    })
    .await;
    assert!(ready.ends_with("ready"));
    let health = get(port, "/healthz").await.unwrap();
    assert!(health.starts_with("HTTP/1.0 200"));
    // Ready does not wait for the lease: the leader gauge turns 1 a moment later.
    let metrics = eventually("/metrics to show leadership", DEFAULT_TIMEOUT, || async {
        let m = get(port, "/metrics").await?;
        if m.contains("fleetlet_controller_leader 1") {
            Ok(m)
        } else {
            Err(m)
        }
    })
    .await;
    // Every pass is timed: the histogram counts as many as the pass counter.
    let count = sample(&metrics, "fleetlet_controller_pass_duration_seconds_count");
    assert!(count.is_some_and(|c| c >= 1.0), "{metrics}");
    assert!(
        sample(&metrics, "fleetlet_controller_pass_duration_seconds_sum").is_some_and(|s| s > 0.0),
        "{metrics}"
    );
    wait_passes(port, 2).await;
    let later = get(port, "/metrics").await.unwrap();
    assert!(
        sample(&later, "fleetlet_controller_pass_duration_seconds_count") >= count.map(|c| c + 2.0),
        "{later}"
    );
    for name in [
        "fleetlet_controller_passes_total",
        "fleetlet_controller_devices",
        "fleetlet_controller_rollouts_in_progress",
        "fleetlet_controller_devices_pending_rollout",
        "fleetlet_controller_devices_waiting_ready",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
}

/// Every pass goes over the whole fleet, so a Lease renewal that changes nothing must not
/// start one. With a Lease of 3 s (renewed every second) and a resync an hour away, a
/// controller alone on its Lease, then one holding 2 shards (each in an environment of
/// its own), runs no pass through ten renewals; a device created starts one at once.
#[tokio::test]
async fn renewing_what_it_holds_starts_no_pass_until_something_changes() {
    for shards in [1u32, 2] {
        let env = TestEnv::builder().kube().nats().start().await.unwrap();
        let client = env.kube_client().await.unwrap();
        create_namespace(&client, "fleetlet-system").await;
        let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
            Api::namespaced(client.clone(), "fleetlet-system");
        let devices: Api<EdgeDevice> = Api::namespaced(client.clone(), "default");
        let identity = format!("rest-{shards}");
        let c = start_controller_with(
            &env,
            &identity,
            "fleetlet-system",
            &["--resync-seconds=3600".into(), format!("--shards={shards}")],
        );
        let held = |text: &str| sample(text, "fleetlet_controller_shards_held");
        eventually("every shard held", DEFAULT_TIMEOUT, || async {
            let text = get(c.metrics_port, "/metrics").await?;
            (held(&text) == Some(f64::from(shards)))
                .then_some(())
                .ok_or(format!("{:?} shards held", held(&text)))
        })
        .await;
        // The passes of taking the Lease(s) over and of the watches' first lists are done.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (before, _) = passes_and_leader(c.metrics_port).await.unwrap();
        // The Leases this controller holds, by name, and their renewTime.
        let renewals = || async {
            let mut out = std::collections::BTreeMap::new();
            for l in leases.list(&Default::default()).await.unwrap() {
                let spec = l.spec.unwrap_or_default();
                if spec.holder_identity.as_deref() == Some(identity.as_str()) {
                    out.insert(l.metadata.name.unwrap_or_default(), spec.renew_time);
                }
            }
            out
        };
        let renewed_from = renewals().await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        let renewed_to = renewals().await;
        let (after, leader) = passes_and_leader(c.metrics_port).await.unwrap();
        // The controller was renewing all along (every Lease it held moved on)...
        assert_eq!(leader, 1.0);
        assert_eq!(
            renewed_from.keys().collect::<Vec<_>>(),
            renewed_to.keys().collect::<Vec<_>>()
        );
        for (name, at) in &renewed_from {
            assert!(
                renewed_to[name].as_ref().map(|t| t.0) > at.as_ref().map(|t| t.0),
                "{name} was not renewed: {at:?} then {:?}",
                renewed_to[name]
            );
        }
        // ...and ran no pass for it.
        assert_eq!(after, before, "{shards} shard(s): passes at rest");

        // A change still starts one.
        let name = format!("rest-dev-{shards}");
        apply(&devices, device(&name, json!({}))).await;
        wait_passes(c.metrics_port, 1).await;
    }
}

#[tokio::test]
async fn leadership_moves_to_the_standby_and_a_restart_rewrites_nothing() {
    let env = TestEnv::builder().kube().nats().start().await.unwrap();
    let client = env.kube_client().await.unwrap();
    create_namespace(&client, "fleetlet-system").await;
    let kv = kv(&env).await;
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), "fleetlet-system");
    // The leader Lease's holder and renewTime; Err says what is there instead.
    let lease = || async {
        let spec = leases
            .get_opt("fleetlet-controller")
            .await
            .map_err(|e| e.to_string())?
            .ok_or("no Lease")?
            .spec
            .ok_or("no spec")?;
        match (spec.holder_identity, spec.renew_time) {
            (Some(h), Some(t)) => Ok((h, t)),
            other => Err(format!("holder and renewTime {other:?}")),
        }
    };
    let leads = async |who: &str| {
        eventually(
            &format!("{who} to hold the Lease"),
            DEFAULT_TIMEOUT,
            || async {
                let (h, t) = lease().await?;
                if h == who {
                    Ok(t)
                } else {
                    Err(format!("held by {h}"))
                }
            },
        )
        .await
    };

    let first = start_controller(&env, "one", "fleetlet-system");
    leads("one").await;
    let second = start_controller(&env, "two", "fleetlet-system");
    let renewed_from = leads("one").await;

    let devices: Api<EdgeDevice> = Api::namespaced(client.clone(), "default");
    let manifests: Api<EdgeManifest> = Api::namespaced(client.clone(), "default");
    apply(&devices, device("le-a", json!({}))).await;
    apply(
        &manifests,
        manifest(
            "m",
            json!({ "devices": ["le-a"], "resources": [file("f", "/etc/fleetlet/f", "1")] }),
        ),
    )
    .await;
    let (m1, rev1) = wait_desired(&kv, "le-a", "written", |m| m.resources.len() == 1).await;
    // A rollout waiting on a silent device: its progress clock is in its status.
    apply(&devices, device("le-quiet", json!({}))).await;
    apply(
        &manifests,
        manifest(
            "waiting",
            json!({ "devices": ["le-quiet"], "resources": [file("w", "/etc/fleetlet/w", "1")] }),
        ),
    )
    .await;
    let clock = wait_manifest_status(&manifests, "waiting", "a progress clock", |s| {
        s.targeted == 1 && s.last_progress_time.is_some()
    })
    .await
    .last_progress_time;
    // The standby does not take over a live lease: the leader renews it twice more while
    // the standby runs, and holds it throughout.
    let renewals = RefCell::new(vec![renewed_from]);
    eventually("two renewals by one", DEFAULT_TIMEOUT, || async {
        let (h, t) = lease().await?;
        assert_eq!(h, "one", "the standby took over a live lease");
        let mut seen = renewals.borrow_mut();
        if seen.last() != Some(&t) {
            seen.push(t);
        }
        if seen.len() > 2 {
            Ok(())
        } else {
            Err(format!("renewTimes {seen:?}"))
        }
    })
    .await;

    drop(first); // SIGTERM: the leader releases the lease.
    leads("two").await;
    // Passes by the new leader, counted: a correct key stays as it is.
    wait_passes(second.metrics_port, 2).await;
    let (_, rev_after) = desired_of(&kv, "le-a").await.unwrap();
    assert_eq!(rev_after, rev1, "the new leader rewrote a correct key");
    // ... and the waiting rollout's deadline is still measured from where it was.
    let after = manifests.get("waiting").await.unwrap().status.unwrap();
    assert_eq!(
        after.last_progress_time, clock,
        "the progress clock restarted with the new leader"
    );

    apply(
        &manifests,
        manifest(
            "m",
            json!({ "devices": ["le-a"], "resources": [file("f", "/etc/fleetlet/f", "2")] }),
        ),
    )
    .await;
    let (m2, _) = wait_desired(&kv, "le-a", "written by the new leader", |m| {
        m.resources[0].owner.generation == 2
    })
    .await;
    assert!(m2.generation > m1.generation);
    drop(second);
}

#[tokio::test]
async fn a_lost_bucket_is_recreated_and_every_device_key_rewritten() {
    // A private environment: deleting a bucket would disturb the other tests.
    let env = TestEnv::builder().kube().nats().start().await.unwrap();
    let client = env.kube_client().await.unwrap();
    create_namespace(&client, "fleetlet-system").await;
    let _controller = start_controller(&env, "solo", "fleetlet-system");
    let devices: Api<EdgeDevice> = Api::namespaced(client.clone(), "default");
    let manifests: Api<EdgeManifest> = Api::namespaced(client.clone(), "default");
    apply(&devices, device("lb-a", json!({}))).await;
    apply(
        &manifests,
        manifest(
            "m",
            json!({ "devices": ["lb-a"], "resources": [file("f", "/etc/fleetlet/f", "x")] }),
        ),
    )
    .await;
    let kv1 = kv(&env).await;
    let (before, _) = wait_desired(&kv1, "lb-a", "written", |m| m.resources.len() == 1).await;

    env.jetstream()
        .await
        .unwrap()
        .delete_key_value(DESIRED_STATE.name)
        .await
        .unwrap();
    let after = eventually(
        "lb-a rewritten into a new bucket",
        DEFAULT_TIMEOUT,
        || async {
            let js = env.jetstream().await.map_err(|e| e.to_string())?;
            let store = js
                .get_key_value(DESIRED_STATE.name)
                .await
                .map_err(|e| e.to_string())?;
            let e = store
                .entry("lb-a")
                .await
                .map_err(|e| e.to_string())?
                .ok_or("no key")?;
            decode::<AgentManifest>(&e.value).map_err(|e| e.to_string())
        },
    )
    .await;
    assert_eq!(after.resources, before.resources);
    assert!(
        after.generation > before.generation,
        "{} after {}",
        after.generation,
        before.generation
    );
}
