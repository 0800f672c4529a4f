//! One device or one manifest must not stall the rest, and what fails on a device shows in
//! kubectl. A real controller, bridge and file agents against a real kube-apiserver and
//! nats-server; each test has its own namespace and devices.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
    time::Duration,
};

use fleetlet_crds::{EdgeDevice, EdgeManifest};
use fleetlet_protocol::{AgentManifest, DeviceId, encode};
use fleetlet_testenv::{DEFAULT_TIMEOUT, TestEnv, components, eventually, process::Service, wait};
use k8s_openapi::api::events::v1::Event;
use kube::Api;

/// The shared environment, with one controller and one bridge for every test here.
fn shared() -> (&'static TestEnv, &'static Path) {
    static PARTS: OnceLock<(tempfile::TempDir, Service, Service)> = OnceLock::new();
    let env = TestEnv::shared();
    let parts = PARTS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let bins = components::bin_dir().unwrap();
        let controller =
            components::start_controller(env, &bins, dir.path(), &["--resync-seconds=1"]).unwrap();
        let bridge = components::start_bridge(env, &bins, dir.path(), &[]).unwrap();
        (dir, controller, bridge)
    });
    (env, parts.0.path())
}

/// A files-only agent for `device`, its files under `<dir>/<device>/root` (returned with
/// it); `reconcile` lines are added to its `[reconcile]` table.
fn agent(env: &TestEnv, dir: &Path, device: &str, reconcile: &str) -> (Service, PathBuf) {
    let ddir = dir.join(device);
    std::fs::create_dir_all(&ddir).unwrap();
    let config = components::file_agent_config(
        env.nats_url().unwrap(),
        &ddir,
        device,
        "/etc/fleetlet",
        "",
        "",
    )
    .replace("[reconcile]\n", &format!("[reconcile]\n{reconcile}"));
    let agent = components::start_agent(&components::bin_dir().unwrap(), &ddir, &config).unwrap();
    (agent, ddir.join("root"))
}

fn device_yaml(ns: &str, name: &str) -> String {
    format!(
        "apiVersion: fleetlet.dev/v1alpha1\nkind: EdgeDevice\nmetadata: {{ name: {name}, namespace: {ns} }}\n---\n"
    )
}

/// An EdgeManifest for `devices` with `files` (id, path, text).
fn manifest_yaml(
    ns: &str,
    name: &str,
    devices: &[&str],
    files: &[(String, String, String)],
) -> String {
    let mut y = format!(
        "apiVersion: fleetlet.dev/v1alpha1\nkind: EdgeManifest\nmetadata: {{ name: {name}, namespace: {ns} }}\nspec:\n  devices: [{}]\n  resources:\n",
        devices.join(", ")
    );
    for (id, path, text) in files {
        y.push_str(&format!(
            "    - id: {id}\n      file: {{ path: {path}, content: {{ text: {text:?} }} }}\n"
        ));
    }
    y + "---\n"
}

/// Condition `type_` of a manifest or device as (status, reason, message).
fn condition(
    conditions: &[fleetlet_crds::Condition],
    type_: &str,
) -> Result<(String, String, String), String> {
    conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
        .ok_or_else(|| format!("no {type_} condition in {conditions:?}"))
}

/// Waits for condition `type_` of the object `name` in `api` to have `status` and
/// `reason`; its message. `conditions` reads an object's conditions.
async fn wait_condition<K>(
    api: &Api<K>,
    name: &str,
    conditions: impl Fn(K) -> Vec<fleetlet_crds::Condition>,
    (type_, status, reason): (&str, &str, &str),
) -> String
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
    K::DynamicType: Default,
{
    let kind = K::kind(&Default::default()).to_string();
    eventually(
        &format!("{kind} {name} {type_}={status} ({reason})"),
        DEFAULT_TIMEOUT,
        || async {
            let o = api.get(name).await.map_err(|e| e.to_string())?;
            let (s, r, msg) = condition(&conditions(o), type_)?;
            (s == status && r == reason)
                .then_some(msg.clone())
                .ok_or(format!("{s} {r}: {msg}"))
        },
    )
    .await
}

async fn manifest_condition(
    api: &Api<EdgeManifest>,
    name: &str,
    type_: &str,
    status: &str,
    reason: &str,
) -> String {
    let get = |m: EdgeManifest| m.status.map(|s| s.conditions).unwrap_or_default();
    wait_condition(api, name, get, (type_, status, reason)).await
}

async fn device_condition(
    api: &Api<EdgeDevice>,
    name: &str,
    type_: &str,
    status: &str,
    reason: &str,
) -> String {
    let get = |d: EdgeDevice| d.status.map(|s| s.conditions).unwrap_or_default();
    wait_condition(api, name, get, (type_, status, reason)).await
}

/// `n` small files for manifest `m`: ids `<m>-<i>`, under /etc/fleetlet/<m>/.
fn files(m: &str, n: usize) -> Vec<(String, String, String)> {
    (0..n)
        .map(|i| {
            (
                format!("{m}-{i}"),
                format!("/etc/fleetlet/{m}/{i}"),
                format!("{m} {i}"),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_manifest_that_would_take_a_device_over_its_limits_is_left_out_there_alone() {
    let (env, dir) = shared();
    let ns = env.namespace("hostile-limits").await.unwrap();
    let client = env.kube_client().await.unwrap();
    let manifests: Api<EdgeManifest> = Api::namespaced(client.clone(), &ns);
    let devices: Api<EdgeDevice> = Api::namespaced(client.clone(), &ns);
    let (_a, root_a) = agent(env, dir, "lim-a", "");
    let (_b, root_b) = agent(env, dir, "lim-b", "");
    env.apply(&(device_yaml(&ns, "lim-a") + &device_yaml(&ns, "lim-b")))
        .unwrap();
    // The agents' heartbeats carry their limits; wait for them, as the controller does.
    for d in ["lim-a", "lim-b"] {
        device_condition(&devices, d, "Ready", "True", "HeartbeatFresh").await;
    }
    // Five manifests of 128 files on lim-a (640 > 512); the newest also goes to lim-b.
    // Created one after the other, so their age order is their name order.
    for i in 0..5 {
        let targets: &[&str] = if i == 4 {
            &["lim-a", "lim-b"]
        } else {
            &["lim-a"]
        };
        env.apply(&manifest_yaml(
            &ns,
            &format!("m{i}"),
            targets,
            &files(&format!("m{i}"), 128),
        ))
        .unwrap();
    }
    // The four oldest reach lim-a and complete; the newest reaches lim-b and completes there.
    for i in 0..4 {
        manifest_condition(
            &manifests,
            &format!("m{i}"),
            "Ready",
            "True",
            "RolloutComplete",
        )
        .await;
        wait::file_content(
            &root_a.join(format!("etc/fleetlet/m{i}/127")),
            &format!("m{i} 127"),
            DEFAULT_TIMEOUT,
        )
        .await;
    }
    wait::file_content(
        &root_b.join("etc/fleetlet/m4/127"),
        "m4 127",
        DEFAULT_TIMEOUT,
    )
    .await;
    let msg = manifest_condition(&manifests, "m4", "Stalled", "True", "DeviceLimitExceeded").await;
    assert!(
        msg.contains("lim-a") && msg.contains("640 resources, the device accepts 512"),
        "{msg}"
    );
    assert!(!msg.contains("lim-b"), "lim-b took it: {msg}");
    eventually("m4 ready on lim-b alone", DEFAULT_TIMEOUT, || async {
        let m4 = manifests.get("m4").await.map_err(|e| e.to_string())?;
        let s = m4.status.ok_or("no status")?;
        let counts = (s.targeted, s.updated, s.ready);
        (counts == (2, 1, 1))
            .then_some(())
            .ok_or(format!("targeted, updated, ready = {counts:?}"))
    })
    .await;
    assert!(!root_a.join("etc/fleetlet/m4").exists(), "m4 reached lim-a");
    // lim-a's agent runs a manifest it accepted: the newest it was sent, all 512.
    let status = env.agent_status("lim-a").await.unwrap();
    assert_eq!(status.resources.len(), 512);
    assert!(
        status.last_rejection.is_none(),
        "{:?}",
        status.last_rejection
    );
    let msg = device_condition(
        &devices,
        "lim-a",
        "LimitExceeded",
        "True",
        "ManifestsLeftOut",
    )
    .await;
    assert!(msg.contains(&format!("{ns}/m4")), "{msg}");
    let events: Api<Event> = Api::namespaced(client, &ns);
    let note = wait::event(&events, "EdgeManifest", "m4", "DeviceLimitExceeded").await;
    assert!(note.contains("lim-a"), "{note}");
    wait::event(&events, "EdgeDevice", "lim-a", "DeviceLimitExceeded").await;

    // Room made: m4 follows on lim-a and the condition goes.
    manifests.delete("m0", &Default::default()).await.unwrap();
    wait::file_content(
        &root_a.join("etc/fleetlet/m4/127"),
        "m4 127",
        DEFAULT_TIMEOUT,
    )
    .await;
    wait::file_gone(&root_a.join("etc/fleetlet/m0/0"), DEFAULT_TIMEOUT).await;
    manifest_condition(&manifests, "m4", "Ready", "True", "RolloutComplete").await;
    eventually(
        "lim-a's LimitExceeded condition to go",
        DEFAULT_TIMEOUT,
        || async {
            let d = devices.get("lim-a").await.map_err(|e| e.to_string())?;
            let conditions = d.status.map(|s| s.conditions).unwrap_or_default();
            condition(&conditions, "LimitExceeded").map_or(Ok(()), |c| Err(format!("{c:?}")))
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_manifest_too_large_for_a_device_leaves_the_others_flowing() {
    let (env, dir) = shared();
    let ns = env.namespace("hostile-bytes").await.unwrap();
    let client = env.kube_client().await.unwrap();
    let manifests: Api<EdgeManifest> = Api::namespaced(client.clone(), &ns);
    let devices: Api<EdgeDevice> = Api::namespaced(client.clone(), &ns);
    // A small device: 32 KiB of manifest at most.
    let (_a, root) = agent(env, dir, "byte-a", "max_manifest_bytes = 32768\n");
    env.apply(&device_yaml(&ns, "byte-a")).unwrap();
    device_condition(&devices, "byte-a", "Ready", "True", "HeartbeatFresh").await;
    let text = |c: char, n: usize| std::iter::repeat_n(c, n).collect::<String>();
    env.apply(&manifest_yaml(
        &ns,
        "small",
        &["byte-a"],
        &[("s".into(), "/etc/fleetlet/small".into(), "small".into())],
    ))
    .unwrap();
    env.apply(&manifest_yaml(
        &ns,
        "big",
        &["byte-a"],
        &[("b".into(), "/etc/fleetlet/big".into(), text('x', 40_000))],
    ))
    .unwrap();
    env.apply(&manifest_yaml(
        &ns,
        "later",
        &["byte-a"],
        &[("l".into(), "/etc/fleetlet/later".into(), "later".into())],
    ))
    .unwrap();
    wait::file_content(&root.join("etc/fleetlet/small"), "small", DEFAULT_TIMEOUT).await;
    wait::file_content(&root.join("etc/fleetlet/later"), "later", DEFAULT_TIMEOUT).await;
    manifest_condition(&manifests, "later", "Ready", "True", "RolloutComplete").await;
    let msg = manifest_condition(&manifests, "big", "Stalled", "True", "DeviceLimitExceeded").await;
    assert!(msg.contains("the device accepts 32768"), "{msg}");
    let big = manifests.get("big").await.unwrap().status.unwrap();
    assert_ne!(
        big.conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .map(|c| c.status.as_str()),
        Some("True"),
        "a manifest left out is not Ready"
    );
    assert_eq!(big.updated, 0);
    assert!(!root.join("etc/fleetlet/big").exists());
    let status = env.agent_status("byte-a").await.unwrap();
    assert!(
        status.last_rejection.is_none(),
        "{:?}",
        status.last_rejection
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn what_fails_on_a_device_shows_in_kubectl() {
    let (env, dir) = shared();
    let ns = env.namespace("hostile-visible").await.unwrap();
    let client = env.kube_client().await.unwrap();
    let manifests: Api<EdgeManifest> = Api::namespaced(client.clone(), &ns);
    let devices: Api<EdgeDevice> = Api::namespaced(client.clone(), &ns);
    let events: Api<Event> = Api::namespaced(client, &ns);
    let (_a, root) = agent(env, dir, "vis-a", "");
    env.apply(&device_yaml(&ns, "vis-a")).unwrap();
    device_condition(&devices, "vis-a", "Ready", "True", "HeartbeatFresh").await;
    // One resource that can never succeed (outside the device's allowed roots), one fine.
    env.apply(&manifest_yaml(
        &ns,
        "mixed",
        &["vis-a"],
        &[
            ("good".into(), "/etc/fleetlet/good".into(), "good".into()),
            (
                "bad".into(),
                "/etc/cron.d/bad".into(),
                "* * * * * root true".into(),
            ),
        ],
    ))
    .unwrap();
    wait::file_content(&root.join("etc/fleetlet/good"), "good", DEFAULT_TIMEOUT).await;
    // Failed at once, not after the 10-minute deadline: the manifest is Stalled and names
    // the device, the resource and the reason.
    let msg = manifest_condition(&manifests, "mixed", "Stalled", "True", "PermanentFailure").await;
    assert!(
        msg.contains("vis-a/bad") && msg.contains("allowed roots"),
        "{msg}"
    );
    let msg = manifest_condition(&manifests, "mixed", "Degraded", "True", "ResourcesFailed").await;
    assert!(msg.contains("vis-a/bad"), "{msg}");
    manifest_condition(
        &manifests,
        "mixed",
        "Progressing",
        "False",
        "PermanentFailure",
    )
    .await;
    assert!(!root.join("etc/cron.d/bad").exists());
    // The device says which resource fails and that it is permanent.
    let msg = device_condition(&devices, "vis-a", "Degraded", "True", "ResourcesFailed").await;
    assert!(msg.contains("bad (Failed, permanent"), "{msg}");
    // Events on both.
    let note = wait::event(&events, "EdgeManifest", "mixed", "ResourceFailed").await;
    assert!(
        note.contains("bad on device vis-a") && note.contains("permanent"),
        "{note}"
    );
    wait::event(&events, "EdgeDevice", "vis-a", "ResourceFailed").await;

    // Drift: the good file changed behind the agent's back is put back, and said so.
    std::fs::write(root.join("etc/fleetlet/good"), "tampered").unwrap();
    wait::file_content(&root.join("etc/fleetlet/good"), "good", DEFAULT_TIMEOUT).await;
    let note = wait::event(&events, "EdgeDevice", "vis-a", "DriftRepaired").await;
    assert!(note.contains("good on device vis-a"), "{note}");
    wait::event(&events, "EdgeManifest", "mixed", "DriftRepaired").await;

    // A manifest the agent refuses, written straight into NATS: an Event on the device.
    let kv = env
        .jetstream()
        .await
        .unwrap()
        .get_key_value("desired-state")
        .await
        .unwrap();
    let forged = AgentManifest::new(DeviceId::new("someone-else").unwrap(), 1_000);
    kv.put("vis-a", encode(&forged).unwrap().into())
        .await
        .unwrap();
    let note = wait::event(&events, "EdgeDevice", "vis-a", "ManifestRejected").await;
    assert!(note.contains("WrongDevice"), "{note}");
    // The controller rewrites the device's manifest; the good file never went away.
    tokio::time::sleep(Duration::from_secs(2)).await;
    wait::file_content(&root.join("etc/fleetlet/good"), "good", DEFAULT_TIMEOUT).await;
}
