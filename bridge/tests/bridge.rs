//! The bridge binary against a real kube-apiserver, nats-server and kubectl.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::{path::Path, sync::OnceLock, time::Duration};

use async_nats::jetstream::kv::Store;
use fleetlet_crds::EdgeDevice;
use fleetlet_protocol::{
    API_VERSION, Address, Capacity, DeviceFacts, DeviceId, FactsReport, Free, Heartbeat,
    SystemInfo, Timestamp, encode,
    kv::{ACTUAL_STATE, FACTS, HEARTBEAT},
};
use fleetlet_testenv::{
    DEFAULT_TIMEOUT, TestEnv, eventually,
    process::{Service, free_port},
};
use k8s_openapi::{
    api::{coordination::v1::Lease, core::v1::Node},
    apimachinery::pkg::apis::meta::v1::MicroTime,
};
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use serde_json::json;

fn start_bridge(env: &TestEnv, identity: &str) -> Service {
    start_bridge_with(env, identity, &[])
}

fn start_bridge_with(env: &TestEnv, identity: &str, extra: &[&str]) -> Service {
    let mut args = vec![
        format!("--nats-url={}", env.nats_url().unwrap()),
        format!("--metrics-addr=127.0.0.1:{}", free_port().unwrap()),
        "--lease-namespace=fleetlet-system".into(),
        format!("--identity={identity}"),
        "--grace-seconds=3".into(),
        "--lease-renew-seconds=1".into(),
        "--resync-seconds=1".into(),
        "--lease-seconds=3".into(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    Service::spawn_with_env(
        "fleetlet-bridge",
        Path::new(env!("CARGO_BIN_EXE_fleetlet-bridge")),
        &args,
        &[
            (
                "KUBECONFIG",
                env.kubeconfig().unwrap().display().to_string(),
            ),
            ("RUST_LOG", "info,fleetlet_bridge=debug".into()),
        ],
        env.dir.join(format!("bridge-{identity}.log")),
    )
    .unwrap()
}

fn start_controller(env: &TestEnv) -> Service {
    Service::spawn_with_env(
        "fleetlet-controller",
        &Path::new(env!("CARGO_BIN_EXE_fleetlet-bridge")).with_file_name("fleetlet-controller"),
        &[
            format!("--nats-url={}", env.nats_url().unwrap()),
            format!("--metrics-addr=127.0.0.1:{}", free_port().unwrap()),
            "--lease-namespace=fleetlet-system".into(),
            "--resync-seconds=1".into(),
        ],
        &[(
            "KUBECONFIG",
            env.kubeconfig().unwrap().display().to_string(),
        )],
        env.dir.join("controller.log"),
    )
    .unwrap()
}

async fn system_namespace(env: &TestEnv) {
    let api: Api<k8s_openapi::api::core::v1::Namespace> =
        Api::all(env.kube_client().await.unwrap());
    let _ = api
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": { "name": "fleetlet-system" } })).unwrap(),
        )
        .await;
}

/// The shared environment with one bridge (3 s grace) running against it.
fn shared() -> &'static TestEnv {
    static BRIDGE: OnceLock<Service> = OnceLock::new();
    let env = TestEnv::shared();
    BRIDGE.get_or_init(|| {
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(system_namespace(env));
            start_bridge(env, "shared")
        })
        .join()
        .unwrap()
    });
    env
}

async fn add_device(env: &TestEnv, ns: &str, name: &str) -> Api<EdgeDevice> {
    let api: Api<EdgeDevice> = Api::namespaced(env.kube_client().await.unwrap(), ns);
    let body = json!({ "apiVersion": "fleetlet.dev/v1alpha1", "kind": "EdgeDevice",
        "metadata": { "name": name, "labels": { "site": "lab" } }, "spec": {} });
    api.patch(
        name,
        &PatchParams::apply("test").force(),
        &Patch::Apply(&body),
    )
    .await
    .unwrap();
    api
}

/// Where a test device writes: its heartbeats and its facts.
#[derive(Clone)]
struct Beats {
    hb: Store,
    facts: Store,
}

async fn buckets(env: &TestEnv) -> (Beats, Store) {
    let js = env.jetstream().await.unwrap();
    (
        Beats {
            hb: js.get_key_value(HEARTBEAT.name).await.unwrap(),
            facts: js.get_key_value(FACTS.name).await.unwrap(),
        },
        js.get_key_value(ACTUAL_STATE.name).await.unwrap(),
    )
}

fn facts(dev: &str) -> DeviceFacts {
    DeviceFacts {
        agent_version: "0.1.0".into(),
        system: SystemInfo {
            operating_system: "linux".into(),
            architecture: "arm64".into(),
            os_image: "Debian GNU/Linux 12 (bookworm)".into(),
            kernel_version: "6.6.51-v8+".into(),
            hostname: Some(dev.into()),
            model: Some("Raspberry Pi 4 Model B".into()),
        },
        capacity: Capacity {
            cpu_cores: 4,
            memory_bytes: 4 << 30,
            disk_bytes: 32 << 30,
            pids: 32768,
        },
        addresses: vec![Address {
            type_: "InternalIP".into(),
            address: "127.0.0.2".into(),
        }],
        sealing_key: None,
        limits: None,
        container_runtime: None,
    }
}

/// One heartbeat, as this agent sends it: the facts stored first (on the first beat), then
/// a beat without them.
async fn beat(b: &Beats, dev: &str, seq: u64) {
    if seq == 1 {
        let report = FactsReport {
            api_version: API_VERSION.into(),
            device: DeviceId::new(dev).unwrap(),
            timestamp: Timestamp::now(),
            facts: facts(dev),
        };
        b.facts
            .put(dev, encode(&report).unwrap().into())
            .await
            .unwrap();
    }
    let h = Heartbeat {
        facts: None,
        sequence: seq,
        ..sample(dev)
    };
    b.hb.put(dev, encode(&h).unwrap().into()).await.unwrap();
}

/// Heartbeats once a second until dropped.
fn keep_beating(hb: Beats, dev: &'static str) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for seq in 1.. {
            beat(&hb, dev, seq).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
}

/// Node `name`'s Ready condition as (status, reason); Err says what is there instead.
async fn node_ready(env: &TestEnv, name: &str) -> Result<(String, String), String> {
    let nodes: Api<Node> = Api::all(env.kube_client().await.map_err(|e| e.to_string())?);
    let n = nodes
        .get_opt(name)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("no such Node")?;
    let c = n
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .ok_or("no Ready condition")?;
    Ok((c.status, c.reason.unwrap_or_default()))
}

/// Waits until Node `name` is Ready=`status`, and returns the condition's reason.
async fn wait_node(env: &TestEnv, name: &str, status: &str) -> String {
    eventually(
        &format!("Node {name} Ready={status}"),
        DEFAULT_TIMEOUT,
        || async {
            let (s, reason) = node_ready(env, name).await?;
            if s == status {
                Ok(reason)
            } else {
                Err(format!("Ready={s} ({reason})"))
            }
        },
    )
    .await
}

/// Lease `name`; Err says why there is none.
async fn lease_of(leases: &Api<Lease>, name: &str) -> Result<Lease, String> {
    leases
        .get_opt(name)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("no Lease {name}"))
}

/// Lease `name` once its renew time has moved twice past `from` (the first time seen, when
/// None).
async fn renewed_twice(leases: &Api<Lease>, name: &str, from: Option<MicroTime>) -> Lease {
    let seen = std::sync::Mutex::new(Vec::from_iter(from.map(Some)));
    eventually(
        &format!("{name}'s Lease renewed twice"),
        DEFAULT_TIMEOUT,
        || async {
            let l = lease_of(leases, name).await?;
            let t = l.spec.as_ref().and_then(|s| s.renew_time.clone());
            let mut seen = seen.lock().unwrap();
            if seen.last() != Some(&t) {
                seen.push(t);
            }
            (seen.len() > 2).then_some(l).ok_or(format!("{seen:?}"))
        },
    )
    .await
}

/// Waits until `api` has no object `name`.
async fn wait_gone<K>(api: &Api<K>, name: &str)
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
    K::DynamicType: Default,
{
    eventually(
        &format!("{} {name} to be deleted", K::kind(&Default::default())),
        DEFAULT_TIMEOUT,
        || async {
            match api.get_opt(name).await.map_err(|e| e.to_string())? {
                None => Ok(()),
                Some(o) => Err(format!(
                    "still there, deletionTimestamp {:?}",
                    o.meta().deletion_timestamp
                )),
            }
        },
    )
    .await
}

#[tokio::test]
async fn kubectl_get_nodes_shows_each_device_with_status_role_and_version() {
    let env = shared();
    let ns = env.namespace("br-nodes").await.unwrap();
    let (hb, _) = buckets(env).await;
    add_device(env, &ns, "bn-pi").await;
    let _beats = keep_beating(hb, "bn-pi");
    wait_node(env, "bn-pi", "True").await;

    // Run beside the beats: a blocking kubectl would stop this runtime's heartbeat task
    // for as long as it runs, past the 3 s grace on a busy machine.
    let mut get = env.kubectl().unwrap();
    get.args(["get", "nodes", "bn-pi", "-o", "wide", "--no-headers"]);
    let out = tokio::process::Command::from(get).output().await.unwrap();
    let line = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cols: Vec<&str> = line.split_whitespace().collect();
    // NAME STATUS ROLES AGE VERSION INTERNAL-IP EXTERNAL-IP OS-IMAGE... KERNEL CONTAINER-RUNTIME
    assert_eq!(cols[0], "bn-pi", "{line}");
    assert_eq!(cols[1], "Ready", "{line}");
    assert_eq!(cols[2], "edge", "{line}");
    assert_eq!(cols[4], "fleetlet-agent/v0.1.0", "{line}");
    assert_eq!(cols[5], "127.0.0.2", "{line}");
    assert!(
        line.contains("6.6.51-v8+") && line.contains("Debian GNU/Linux 12"),
        "{line}"
    );

    let node: Node = Api::all(env.kube_client().await.unwrap())
        .get("bn-pi")
        .await
        .unwrap();
    let labels = node.metadata.labels.unwrap();
    assert_eq!(labels["kubernetes.io/arch"], "arm64");
    assert_eq!(labels["type"], "virtual-kubelet");
    assert_eq!(labels["device.fleetlet.dev/site"], "lab");
    let spec = node.spec.unwrap();
    let taint = &spec.taints.unwrap()[0];
    assert_eq!(
        (taint.key.as_str(), taint.effect.as_str()),
        ("fleetlet.dev/edge", "NoSchedule")
    );
    let status = node.status.unwrap();
    assert_eq!(status.capacity.unwrap()["cpu"].0, "4");
    let kinds: Vec<String> = status
        .conditions
        .unwrap()
        .into_iter()
        .map(|c| format!("{}={}", c.type_, c.status))
        .collect();
    assert_eq!(
        kinds,
        [
            "Ready=True",
            "MemoryPressure=False",
            "DiskPressure=False",
            "PIDPressure=False"
        ]
    );
    // The Lease is written right after the Node's status.
    let leases: Api<Lease> = Api::namespaced(env.kube_client().await.unwrap(), "kube-node-lease");
    let lease = eventually("bn-pi's Lease", DEFAULT_TIMEOUT, || {
        lease_of(&leases, "bn-pi")
    })
    .await;
    assert_eq!(
        lease.spec.unwrap().holder_identity.as_deref(),
        Some("bn-pi")
    );
}

/// Waits until Node `name` shows `[arch label, kubelet version, its one address]`.
async fn shows(nodes: &Api<Node>, name: &str, want: [&str; 3]) {
    eventually(
        &format!("{name}'s facts {want:?} on its Node"),
        DEFAULT_TIMEOUT,
        || async {
            let n = nodes
                .get_opt(name)
                .await
                .map_err(|e| e.to_string())?
                .ok_or("no Node")?;
            let labels = n.metadata.labels.unwrap_or_default();
            let status = n.status.unwrap_or_default();
            let kubelet = status
                .node_info
                .map(|i| i.kubelet_version)
                .unwrap_or_default();
            let addresses: Vec<String> = status
                .addresses
                .unwrap_or_default()
                .into_iter()
                .map(|a| a.address)
                .collect();
            let arch = labels
                .get("kubernetes.io/arch")
                .cloned()
                .unwrap_or_default();
            if [arch.as_str(), kubelet.as_str()] == want[..2] && addresses == [want[2]] {
                Ok(())
            } else {
                Err(format!("{arch}, {kubelet}, {addresses:?}"))
            }
        },
    )
    .await
}

/// A device's Node and EdgeDevice show its stored facts, and follow them when they change
/// between heartbeats; an older agent's facts, sent inside every heartbeat, show as well.
#[tokio::test]
async fn facts_reach_the_node_from_their_bucket_or_inline_from_an_older_agent() {
    let env = shared();
    let ns = env.namespace("br-facts").await.unwrap();
    let (b, _) = buckets(env).await;
    let devices = add_device(env, &ns, "bf-new").await;
    add_device(env, &ns, "bf-old").await;
    let _new = keep_beating(b.clone(), "bf-new");
    let old = b.hb.clone();
    let _old = tokio::spawn(async move {
        for seq in 1.. {
            let mut f = facts("bf-old");
            f.system.architecture = "arm".into();
            f.agent_version = "0.9.0".into();
            let h = Heartbeat {
                facts: Some(Box::new(f)),
                sequence: seq,
                ..sample("bf-old")
            };
            old.put("bf-old", encode(&h).unwrap().into()).await.unwrap();
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let nodes: Api<Node> = Api::all(env.kube_client().await.unwrap());
    shows(
        &nodes,
        "bf-old",
        ["arm", "fleetlet-agent/v0.9.0", "127.0.0.2"],
    )
    .await;
    shows(
        &nodes,
        "bf-new",
        ["arm64", "fleetlet-agent/v0.1.0", "127.0.0.2"],
    )
    .await;

    // New facts, while the beats go on without any: the Node and the EdgeDevice follow.
    let mut f = facts("bf-new");
    f.agent_version = "0.2.0".into();
    f.addresses[0].address = "127.0.0.3".into();
    let report = FactsReport {
        api_version: API_VERSION.into(),
        device: DeviceId::new("bf-new").unwrap(),
        timestamp: Timestamp::now(),
        facts: f,
    };
    b.facts
        .put("bf-new", encode(&report).unwrap().into())
        .await
        .unwrap();
    shows(
        &nodes,
        "bf-new",
        ["arm64", "fleetlet-agent/v0.2.0", "127.0.0.3"],
    )
    .await;
    let dev = devices.get("bf-new").await.unwrap();
    let info = dev.status.unwrap().device.unwrap();
    assert_eq!(
        (info.agent_version.as_str(), info.addresses),
        ("0.2.0", vec!["127.0.0.3".to_owned()])
    );
}

#[tokio::test]
async fn a_silent_device_turns_unknown_after_the_grace_period_and_ready_when_it_returns() {
    let env = shared();
    let ns = env.namespace("br-grace").await.unwrap();
    let (hb, _) = buckets(env).await;
    let devices = add_device(env, &ns, "bg-pi").await;
    let beats = keep_beating(hb.clone(), "bg-pi");
    wait_node(env, "bg-pi", "True").await;
    let client = env.kube_client().await.unwrap();
    wait_lease(&client, "bg-pi").await;

    beats.abort();
    let reason = wait_node(env, "bg-pi", "Unknown").await;
    assert_eq!(reason, "NodeStatusUnknown");
    let dev = devices.get("bg-pi").await.unwrap();
    let ready = dev
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("Unknown", "HeartbeatMissed")
    );
    assert!(
        Api::<Node>::all(env.kube_client().await.unwrap())
            .get_opt("bg-pi")
            .await
            .unwrap()
            .is_some(),
        "the node stays"
    );
    // Its Lease is no longer renewed, while the bridge renews a live device's: watched
    // until that one has moved twice.
    add_device(env, &ns, "bg-live").await;
    let live = keep_beating(hb.clone(), "bg-live");
    wait_node(env, "bg-live", "True").await;
    wait_lease(&client, "bg-live").await;
    let silent_at = node_lease_renewed(&client, "bg-pi").await;
    assert!(silent_at.is_some());
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    renewed_twice(&leases, "bg-live", None).await;
    assert_eq!(
        node_lease_renewed(&client, "bg-pi").await,
        silent_at,
        "a silent device's Lease is not renewed"
    );
    live.abort();

    let _beats = keep_beating(hb, "bg-pi");
    wait_node(env, "bg-pi", "True").await;
    eventually("bg-pi's Lease renewed again", DEFAULT_TIMEOUT, || async {
        let t = node_lease_renewed(&client, "bg-pi").await;
        (t != silent_at).then_some(()).ok_or(format!("{t:?}"))
    })
    .await;
}

/// Renewals after the first are plain updates at the version the bridge wrote (as a
/// kubelet renews), and a Lease someone else changed is taken back by an apply that keeps
/// what they added: a label put on it stays through the renewals that follow.
#[tokio::test]
async fn leases_are_renewed_by_updates_and_what_another_writer_added_stays() {
    let env = shared();
    let ns = env.namespace("br-renew").await.unwrap();
    let (hb, _) = buckets(env).await;
    add_device(env, &ns, "bl-pi").await;
    let _beats = keep_beating(hb, "bl-pi");
    let client = env.kube_client().await.unwrap();
    wait_lease(&client, "bl-pi").await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    // Which operations the bridge's writes were, from the Lease's own field records.
    let operations = |l: &Lease| -> Vec<String> {
        l.metadata
            .managed_fields
            .iter()
            .flatten()
            .filter(|m| m.manager.as_deref() == Some("fleetlet-bridge"))
            .filter_map(|m| m.operation.clone())
            .collect()
    };
    let updated = eventually(
        "bl-pi's Lease renewed by an update",
        DEFAULT_TIMEOUT,
        || async {
            let l = lease_of(&leases, "bl-pi").await?;
            let ops = operations(&l);
            ops.iter()
                .any(|o| o == "Update")
                .then_some(l.clone())
                .ok_or(format!("operations {ops:?}"))
        },
    )
    .await;
    let renewed = updated.spec.and_then(|s| s.renew_time);

    // Another writer labels the Lease; the next renewals still move it and keep the label.
    leases
        .patch(
            "bl-pi",
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "labels": { "team": "ops" } } })),
        )
        .await
        .unwrap();
    let after = renewed_twice(&leases, "bl-pi", renewed).await;
    assert_eq!(
        after
            .metadata
            .labels
            .unwrap_or_default()
            .get("team")
            .map(String::as_str),
        Some("ops"),
        "the label another writer put on the Lease"
    );
    assert_eq!(
        after.spec.and_then(|s| s.holder_identity).as_deref(),
        Some("bl-pi")
    );
}

/// `spec.heartbeatGraceSeconds` gives one device a longer grace period than the bridge's
/// (3 s here): its node stays Ready while a default device's turns Unknown, and its Lease
/// lasts as long.
#[tokio::test]
async fn a_device_with_its_own_grace_period_stays_ready_longer() {
    let env = shared();
    let ns = env.namespace("br-owngrace").await.unwrap();
    let (hb, _) = buckets(env).await;
    add_device(env, &ns, "bo-short").await;
    let api = add_device(env, &ns, "bo-long").await;
    let body = json!({ "apiVersion": "fleetlet.dev/v1alpha1", "kind": "EdgeDevice",
        "metadata": { "name": "bo-long" }, "spec": { "heartbeatGraceSeconds": 20 } });
    api.patch(
        "bo-long",
        &PatchParams::apply("test").force(),
        &Patch::Apply(&body),
    )
    .await
    .unwrap();
    let short = keep_beating(hb.clone(), "bo-short");
    let long = keep_beating(hb.clone(), "bo-long");
    for d in ["bo-short", "bo-long"] {
        wait_node(env, d, "True").await;
    }
    // The Lease may first be written before the bridge sees the patched spec.
    let leases: Api<Lease> = Api::namespaced(env.kube_client().await.unwrap(), "kube-node-lease");
    let duration = eventually("bo-long's Lease to last 20 s", DEFAULT_TIMEOUT, || async {
        let d = lease_of(&leases, "bo-long")
            .await?
            .spec
            .and_then(|s| s.lease_duration_seconds);
        match d {
            Some(20) => Ok(20),
            other => Err(format!("leaseDurationSeconds {other:?}")),
        }
    })
    .await;
    assert_eq!(duration, 20);

    short.abort();
    long.abort();
    let silent = std::time::Instant::now();
    wait_node(env, "bo-short", "Unknown").await;
    let (status, _) = node_ready(env, "bo-long").await.unwrap();
    assert_eq!(
        status, "True",
        "the device's own 20 s grace has not run out"
    );
    // ... and then it does: the long grace ends like the short one.
    eventually(
        "bo-long Unknown after its 20 s",
        Duration::from_secs(40),
        || async {
            let (status, _) = node_ready(env, "bo-long").await?;
            (status == "Unknown").then_some(()).ok_or(status)
        },
    )
    .await;
    let waited = silent.elapsed();
    assert!(
        waited >= Duration::from_secs(15),
        "Unknown {waited:?} after the last heartbeat, before its 20 s grace"
    );
}

/// A Node fleetlet did not create already has the device's name: the device's Node is
/// `fleetlet-<id>` (with its own Lease), and the other Node is never written to.
#[tokio::test]
async fn a_device_whose_name_a_node_already_has_gets_a_prefixed_node_and_the_other_is_left_alone() {
    let env = shared();
    let ns = env.namespace("br-taken").await.unwrap();
    let client = env.kube_client().await.unwrap();
    let nodes: Api<Node> = Api::all(client.clone());
    let foreign: Node = serde_json::from_value(json!({ "apiVersion": "v1", "kind": "Node",
        "metadata": { "name": "bc-taken", "labels": { "owner": "someone-else" } } }))
    .unwrap();
    nodes
        .create(&PostParams::default(), &foreign)
        .await
        .unwrap();
    let version = nodes
        .get("bc-taken")
        .await
        .unwrap()
        .metadata
        .resource_version;

    let (hb, _) = buckets(env).await;
    let devices = add_device(env, &ns, "bc-taken").await;
    let beats = keep_beating(hb, "bc-taken");
    wait_node(env, "fleetlet-bc-taken", "True").await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    wait_lease(&client, "fleetlet-bc-taken").await;
    assert!(leases.get_opt("bc-taken").await.unwrap().is_none());
    assert_eq!(
        nodes
            .get("bc-taken")
            .await
            .unwrap()
            .metadata
            .resource_version,
        version,
        "the other Node is untouched"
    );

    beats.abort();
    devices
        .delete("bc-taken", &DeleteParams::default())
        .await
        .unwrap();
    wait_gone(&nodes, "fleetlet-bc-taken").await;
    assert_eq!(
        nodes
            .get("bc-taken")
            .await
            .unwrap()
            .metadata
            .resource_version,
        version,
        "deleting the device leaves the other Node alone"
    );
    nodes
        .delete("bc-taken", &DeleteParams::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_device_that_never_connected_is_not_ready_with_that_reason() {
    let env = shared();
    let ns = env.namespace("br-never").await.unwrap();
    let devices = add_device(env, &ns, "bv-pi").await;
    let (_, reason) =
        eventually("bv-pi's Node", DEFAULT_TIMEOUT, || node_ready(env, "bv-pi")).await;
    assert_eq!(reason, "NeverConnected");
    let ready = eventually("bv-pi's Ready condition", DEFAULT_TIMEOUT, || async {
        let d = devices.get("bv-pi").await.map_err(|e| e.to_string())?;
        let status = d.status.ok_or("no status")?;
        status
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .ok_or_else(|| "no Ready condition".to_string())
    })
    .await;
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "NeverConnected")
    );
}

#[tokio::test]
async fn a_device_reporting_a_generation_kubernetes_cannot_store_still_gets_its_status() {
    let env = shared();
    let ns = env.namespace("br-hugegen").await.unwrap();
    let (hb, actual) = buckets(env).await;
    let devices = add_device(env, &ns, "bh-pi").await;
    let _beats = keep_beating(hb, "bh-pi");
    // The device claims to run generation 2^64 - 1: above what a Kubernetes integer holds.
    let mut s = fleetlet_protocol::AgentStatus::new(DeviceId::new("bh-pi").unwrap());
    s.manifest_generation = u64::MAX;
    s.observed_generation = u64::MAX;
    actual
        .put("bh-pi", encode(&s).unwrap().into())
        .await
        .unwrap();
    // Its status is still written: Ready from the heartbeats, Converged False saying why.
    let converged = eventually("bh-pi's status", DEFAULT_TIMEOUT, || async {
        let d = devices.get("bh-pi").await.map_err(|e| e.to_string())?;
        let status = d.status.ok_or("no status")?;
        let get = |t: &str| status.conditions.iter().find(|c| c.type_ == t).cloned();
        match (get("Ready"), get("Converged")) {
            (Some(r), Some(c)) if r.status == "True" && c.reason == "GenerationOutOfRange" => Ok(c),
            (r, c) => Err(format!("Ready {r:?}, Converged {c:?}")),
        }
    })
    .await;
    assert_eq!(converged.status, "False");
    assert!(
        converged.message.contains(&u64::MAX.to_string()),
        "{}",
        converged.message
    );
    // A sane report afterwards replaces it.
    let mut s = fleetlet_protocol::AgentStatus::new(DeviceId::new("bh-pi").unwrap());
    s.manifest_generation = 0;
    s.observed_generation = 0;
    actual
        .put("bh-pi", encode(&s).unwrap().into())
        .await
        .unwrap();
    eventually(
        "bh-pi's Converged reason to change",
        DEFAULT_TIMEOUT,
        || async {
            let d = devices.get("bh-pi").await.map_err(|e| e.to_string())?;
            let status = d.status.ok_or("no status")?;
            let c = status
                .conditions
                .iter()
                .find(|c| c.type_ == "Converged")
                .ok_or("no Converged")?;
            (c.reason != "GenerationOutOfRange")
                .then_some(())
                .ok_or(c.message.clone())
        },
    )
    .await;
}

#[tokio::test]
async fn deleting_a_device_removes_its_node_and_lease() {
    let env = shared();
    let ns = env.namespace("br-delete").await.unwrap();
    let (hb, _) = buckets(env).await;
    let devices = add_device(env, &ns, "bd-pi").await;
    let beats = keep_beating(hb, "bd-pi");
    let client = env.kube_client().await.unwrap();
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    eventually("bd-pi's Lease", DEFAULT_TIMEOUT, || {
        lease_of(&leases, "bd-pi")
    })
    .await;
    beats.abort();
    devices
        .delete("bd-pi", &DeleteParams::default())
        .await
        .unwrap();
    wait_gone(&Api::<Node>::all(client), "bd-pi").await;
    wait_gone(&leases, "bd-pi").await;
}

/// Sets `spec.nodeProjection` of EdgeDevice `name` (None: unset).
async fn project(devices: &Api<EdgeDevice>, name: &str, projection: Option<&str>) {
    let body = json!({ "apiVersion": "fleetlet.dev/v1alpha1", "kind": "EdgeDevice",
        "metadata": { "name": name, "labels": { "site": "lab" } },
        "spec": projection.map_or(json!({}), |p| json!({ "nodeProjection": p })) });
    devices
        .patch(
            name,
            &PatchParams::apply("test").force(),
            &Patch::Apply(&body),
        )
        .await
        .unwrap();
}

/// EdgeDevice `name`'s resourceVersion once its status says Ready=True.
async fn ready_device(devices: &Api<EdgeDevice>, name: &str) -> String {
    eventually(
        &format!("EdgeDevice {name} Ready"),
        DEFAULT_TIMEOUT,
        || async {
            let d = devices.get(name).await.map_err(|e| e.to_string())?;
            let ready = d
                .status
                .as_ref()
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
                .map(|c| c.status.clone());
            match ready.as_deref() {
                Some("True") => Ok(d.metadata.resource_version.unwrap_or_default()),
                other => Err(format!("Ready={other:?}")),
            }
        },
    )
    .await
}

#[tokio::test]
async fn a_device_without_node_projection_keeps_its_status_and_has_no_node_lease_or_idle_writes() {
    // A private environment and a bridge whose default is no Node, refreshing unchanged
    // status every 2 s (so a projected device's EdgeDevice is written while idle).
    let env = TestEnv::builder().kube().nats().start().await.unwrap();
    system_namespace(&env).await;
    let client = env.kube_client().await.unwrap();
    let _bridge = start_bridge_with(
        &env,
        "projection",
        &["--node-projection=Disabled", "--status-report-seconds=2"],
    );
    let (hb, _) = buckets(&env).await;
    let devices = add_device(&env, "default", "np-off").await;
    add_device(&env, "default", "np-on").await;
    project(&devices, "np-on", Some("Enabled")).await;
    let beats = [
        keep_beating(hb.clone(), "np-off"),
        keep_beating(hb, "np-on"),
    ];
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");

    // The device that asks for a Node gets one (and its Lease); the other only its status.
    wait_node(&env, "np-on", "True").await;
    eventually("np-on's Lease", DEFAULT_TIMEOUT, || {
        lease_of(&leases, "np-on")
    })
    .await;
    let on = ready_device(&devices, "np-on").await;
    let off = ready_device(&devices, "np-off").await;
    let status = devices.get("np-off").await.unwrap().status.unwrap();
    let info = status.device.expect("device facts in the status");
    assert_eq!(info.architecture, "arm64");
    assert!(status.last_heartbeat_time.is_some());
    // Six seconds of heartbeats: nothing is written for np-off (the projected device's
    // heartbeat time is refreshed meanwhile), and it never had a Node or a Lease.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let now = |name: &'static str| {
        let devices = devices.clone();
        async move {
            devices
                .get(name)
                .await
                .unwrap()
                .metadata
                .resource_version
                .unwrap()
        }
    };
    assert_eq!(
        now("np-off").await,
        off,
        "np-off's EdgeDevice was written while idle"
    );
    assert_ne!(
        now("np-on").await,
        on,
        "np-on's heartbeat time was not refreshed"
    );
    assert!(nodes.get_opt("np-off").await.unwrap().is_none());
    assert!(leases.get_opt("np-off").await.unwrap().is_none());

    // Turned off for the projected device: its Node and Lease go, its status stays Ready.
    project(&devices, "np-on", Some("Disabled")).await;
    wait_gone(&nodes, "np-on").await;
    wait_gone(&leases, "np-on").await;
    ready_device(&devices, "np-on").await;
    // A device of the Node-less default that asks for a Node gets one.
    project(&devices, "np-off", Some("Enabled")).await;
    wait_node(&env, "np-off", "True").await;
    eventually("np-off's Lease", DEFAULT_TIMEOUT, || {
        lease_of(&leases, "np-off")
    })
    .await;
    for b in beats {
        b.abort();
    }
}

#[tokio::test]
async fn bad_payloads_are_ignored_with_a_logged_reason_and_the_bridge_keeps_working() {
    let env = shared();
    let ns = env.namespace("br-bad").await.unwrap();
    let (hb, actual) = buckets(env).await;
    add_device(env, &ns, "bb-bad").await;
    // The device whose key it is, and the device its heartbeat claims to be.
    add_device(env, &ns, "bb-other-name").await;
    add_device(env, &ns, "bb-someone").await;
    hb.hb.put("bb-bad", "{ not json".into()).await.unwrap();
    actual.put("bb-bad", vec![0xff; 64].into()).await.unwrap();
    hb.hb
        .put(
            "bb-other-name",
            encode(&Heartbeat {
                device: DeviceId::new("bb-someone").unwrap(),
                ..sample("bb-someone")
            })
            .unwrap()
            .into(),
        )
        .await
        .unwrap();

    add_device(env, &ns, "bb-good").await;
    let _beats = keep_beating(hb, "bb-good");
    wait_node(env, "bb-good", "True").await;
    let (_, reason) = eventually("bb-bad's Node", DEFAULT_TIMEOUT, || {
        node_ready(env, "bb-bad")
    })
    .await;
    assert_eq!(
        reason, "NeverConnected",
        "a garbled heartbeat is not a heartbeat"
    );
    // bb-good's heartbeat, put after the spoofed one, made its Node Ready: the spoofed one
    // has been read, and neither the key's owner nor the device it names is connected.
    for d in ["bb-other-name", "bb-someone"] {
        let (status, reason) = eventually(&format!("{d}'s Node"), DEFAULT_TIMEOUT, || {
            node_ready(env, d)
        })
        .await;
        assert_ne!(status, "True", "{d}");
        assert_eq!(reason, "NeverConnected", "{d}");
    }
    let log = std::fs::read_to_string(env.dir.join("bridge-shared.log")).unwrap();
    assert!(
        log.contains("undecodable record; ignored") && log.contains("bb-bad"),
        "no logged reason"
    );
}

fn sample(dev: &str) -> Heartbeat {
    Heartbeat {
        api_version: API_VERSION.into(),
        device: DeviceId::new(dev).unwrap(),
        sequence: 1,
        timestamp: Timestamp::now(),
        interval_seconds: 1,
        free: Free {
            memory_bytes: 3 << 30,
            disk_bytes: 20 << 30,
            pids: 32000,
        },
        facts: None,
    }
}

/// apiserver_request_total for mutating verbs on `resource`, summed.
async fn writes(client: &kube::Client, resource: &str) -> f64 {
    let text = client
        .request_text(http::Request::get("/metrics").body(Vec::new()).unwrap())
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter(|l| l.contains(&format!("resource=\"{resource}\"")))
        .filter(|l| {
            ["APPLY", "PATCH", "PUT", "POST", "CREATE", "UPDATE"]
                .iter()
                .any(|v| l.contains(&format!("verb=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Mutating requests so far on (edgedevices, nodes, leases).
async fn write_counts(client: &kube::Client) -> (f64, f64, f64) {
    (
        writes(client, "edgedevices").await,
        writes(client, "nodes").await,
        writes(client, "leases").await,
    )
}

/// When `name`'s Lease in kube-node-lease was last renewed (None: no Lease yet).
async fn node_lease_renewed(client: &kube::Client, name: &str) -> Option<MicroTime> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    leases.get_opt(name).await.unwrap()?.spec?.renew_time
}

/// Waits until `name`'s Lease has been renewed once: the lease loop writes it apart from
/// the Node, so a Node seen Ready may not have its Lease yet.
async fn wait_lease(client: &kube::Client, name: &str) -> MicroTime {
    eventually(&format!("{name}'s Lease"), DEFAULT_TIMEOUT, || async {
        node_lease_renewed(client, name)
            .await
            .ok_or_else(|| "no Lease renewed yet".to_string())
    })
    .await
}

#[tokio::test]
async fn a_steady_fleet_causes_no_writes_but_lease_renewals_and_a_real_agent_converges() {
    // A private environment: the apiserver's request counters see only this test.
    let env = TestEnv::builder().kube().nats().start().await.unwrap();
    system_namespace(&env).await;
    let client = env.kube_client().await.unwrap();
    let _bridge = start_bridge(&env, "steady");
    let _controller = start_controller(&env);

    // A real agent on this machine, writing under a temp dir.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "device_id = \"st-pi\"\nstate_dir = \"{}\"\n[nats]\nurls = [\"{}\"]\n[reconcile]\nheartbeat_interval_seconds = 1\n[trust]\nallow_unsigned = true\n[file]\nallowed_roots = [\"/etc/fleetlet\"]\npath_prefix = \"{}\"\n",
            dir.path().join("state").display(),
            env.nats_url().unwrap(),
            dir.path().join("root").display()
        ),
    )
    .unwrap();
    let _agent = Service::spawn(
        "fleetlet-agent",
        &Path::new(env!("CARGO_BIN_EXE_fleetlet-bridge")).with_file_name("fleetlet-agent"),
        &["--config".into(), config.display().to_string()],
        dir.path().join("agent.log"),
    )
    .unwrap();
    let manifests: Api<fleetlet_crds::EdgeManifest> = Api::namespaced(client.clone(), "default");
    let body = json!({ "apiVersion": "fleetlet.dev/v1alpha1", "kind": "EdgeManifest", "metadata": { "name": "motd" },
        "spec": { "devices": ["st-pi"], "resources": [{ "id": "motd", "file": { "path": "/etc/fleetlet/motd", "content": { "text": "hi\n" } } }] } });
    manifests
        .patch(
            "motd",
            &PatchParams::apply("test").force(),
            &Patch::Apply(&body),
        )
        .await
        .unwrap();
    // The manifest exists before the device, so the device's first generation already
    // carries it (an empty first generation could satisfy Converged for a moment).
    add_device(&env, "default", "st-pi").await;

    let mut wait = env.kubectl().unwrap();
    wait.args([
        "wait",
        "--for=condition=Converged",
        "edgedevice/st-pi",
        "-n",
        "default",
        "--timeout=60s",
    ]);
    let out = tokio::process::Command::from(wait).output().await.unwrap();
    assert!(
        out.status.success(),
        "kubectl wait: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Converged can hold for a moment on a first generation the controller computed before
    // its EdgeManifest watch delivered `motd` (the two watches are separate streams): the
    // file, the device facts (from heartbeats, a moment later) and the resource follow.
    let motd = dir.path().join("root/etc/fleetlet/motd");
    eventually("the agent to write motd", DEFAULT_TIMEOUT, || async {
        match std::fs::read_to_string(&motd) {
            Ok(text) if text == "hi\n" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let edevs: Api<EdgeDevice> = Api::namespaced(client.clone(), "default");
    let st = eventually("st-pi's device facts", DEFAULT_TIMEOUT, || async {
        let d = edevs.get("st-pi").await.map_err(|e| e.to_string())?;
        match d.status {
            Some(s)
                if s.device.is_some()
                    && !s.resources.is_empty()
                    && covers(s.applied_generation, s.desired_generation) =>
            {
                Ok(s)
            }
            other => Err(format!("status {other:?}")),
        }
    })
    .await;
    // The controller records a generation only if the device is slow to apply it.
    assert!(covers(st.applied_generation, st.desired_generation));
    assert_eq!(st.resources[0].state, "Ready");
    assert_eq!(st.device.unwrap().agent_version, env!("CARGO_PKG_VERSION"));

    // Steady state: heartbeats keep flowing, nothing else changes. Settled once a second
    // passes without an EdgeDevice or Node write (status patches trail convergence).
    eventually(
        "EdgeDevice and Node writes to stop",
        DEFAULT_TIMEOUT,
        || async {
            let a = write_counts(&client).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let b = write_counts(&client).await;
            if (a.0, a.1) == (b.0, b.1) {
                Ok(())
            } else {
                Err(format!(
                    "(edgedevices, nodes, leases) writes {a:?} → {b:?} in 1 s"
                ))
            }
        },
    )
    .await;
    let before = write_counts(&client).await;
    let renewed_before = node_lease_renewed(&client, "st-pi").await;
    // A claim of no writes needs a window; 6 s is several heartbeats and resyncs.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let after = write_counts(&client).await;
    let renewed_after = node_lease_renewed(&client, "st-pi").await;
    assert_eq!(after.0, before.0, "EdgeDevice writes in a steady state");
    assert_eq!(after.1, before.1, "Node writes in a steady state");
    assert!(
        after.2 > before.2,
        "leases are renewed from heartbeats ({before:?} → {after:?})"
    );
    // The bridge was alive in the window: only it renews the device's node Lease.
    assert!(
        renewed_after > renewed_before,
        "st-pi's Lease renewed in the window ({renewed_before:?} → {renewed_after:?})"
    );
}

/// Whether a device's applied generation covers what the controller recorded for it (the
/// controller records a generation only when the device is slow to apply it).
fn covers(applied: Option<u64>, recorded: Option<u64>) -> bool {
    applied.is_some_and(|a| a > 0 && recorded.is_none_or(|d| a >= d))
}

#[tokio::test]
async fn a_pod_status_decided_from_an_older_view_does_not_undo_a_newer_write() {
    use fleetlet_bridge::pods::{DeviceSide, mirror_status};
    use k8s_openapi::api::core::v1::Pod;
    use std::sync::Arc;
    let env = shared();
    let ns = env.namespace("br-stale").await.unwrap();
    let client = env.kube_client().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod = |name: &str| -> Pod {
        serde_json::from_value(json!({
            "metadata": { "name": name },
            "spec": { "nodeName": "br-stale-pi",
                      "containers": [{ "name": "c", "image": "busybox" }] }
        }))
        .unwrap()
    };
    let device = DeviceSide {
        status: None,
        alive: true,
        host_ip: None,
    };
    // From the current view the bridge writes the pod's status.
    pods.create(&PostParams::default(), &pod("fresh"))
        .await
        .unwrap();
    let fresh = Arc::new(pods.get("fresh").await.unwrap());
    assert!(mirror_status(&client, &fresh, &device).await);
    let written = pods.get("fresh").await.unwrap().status.unwrap();
    assert_eq!(written.phase.as_deref(), Some("Pending"));
    assert!(
        written
            .conditions
            .unwrap()
            .iter()
            .any(|c| c.type_ == "Ready")
    );

    // The controller refuses a pod after the bridge read it: the bridge's write from the
    // older view is refused by the apiserver, and the refusal stays.
    pods.create(&PostParams::default(), &pod("refused"))
        .await
        .unwrap();
    let before = Arc::new(pods.get("refused").await.unwrap());
    pods.patch_status(
        "refused",
        &PatchParams::default(),
        &Patch::Merge(
            json!({ "status": { "phase": "Failed", "reason": "PersistentVolumeClaimUnsupported",
            "message": format!("{}no PVCs on devices", fleetlet_crds::naming::REFUSED_PREFIX) } }),
        ),
    )
    .await
    .unwrap();
    assert!(!mirror_status(&client, &before, &device).await);
    let after = pods.get("refused").await.unwrap().status.unwrap();
    assert_eq!(after.phase.as_deref(), Some("Failed"));
    assert_eq!(
        after.reason.as_deref(),
        Some("PersistentVolumeClaimUnsupported")
    );
}

/// A TLS endpoint that never answers: it accepts connections and holds them open, so an
/// admission webhook pointed at it makes the apiserver wait its full timeout. Stops (and
/// closes what it holds) on drop.
struct SilentEndpoint {
    port: u16,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl SilentEndpoint {
    fn start() -> Self {
        use std::sync::{
            Arc,
            atomic::{AtomicBool, AtomicUsize, Ordering},
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, stopped) = (accepted.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut held = Vec::new();
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        count.fetch_add(1, Ordering::Relaxed);
                        held.push(conn);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        });
        Self {
            port,
            accepted,
            stop,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for SilentEndpoint {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The apiserver's CA (base64 PEM), from the environment's kubeconfig.
fn cluster_ca(env: &TestEnv) -> String {
    std::fs::read_to_string(env.kubeconfig().unwrap())
        .unwrap()
        .lines()
        .find_map(|l| l.trim().strip_prefix("certificate-authority-data:"))
        .expect("the kubeconfig holds its CA")
        .trim()
        .to_owned()
}

#[tokio::test]
async fn leases_stay_renewed_while_status_writes_hang() {
    // A private environment: the webhook below slows this apiserver down.
    let env = TestEnv::builder().kube().nats().start().await.unwrap();
    system_namespace(&env).await;
    let client = env.kube_client().await.unwrap();
    let _bridge = start_bridge(&env, "hang");
    let (hb, _) = buckets(&env).await;
    let devices: Api<EdgeDevice> = Api::namespaced(client.clone(), "default");
    let device = |name: &str, labels: serde_json::Value, grace: u32| {
        json!({ "apiVersion": "fleetlet.dev/v1alpha1", "kind": "EdgeDevice",
            "metadata": { "name": name, "labels": labels },
            "spec": { "heartbeatGraceSeconds": grace } })
    };
    // A steady device whose Lease expires 10 s after its last renewal.
    devices
        .patch(
            "lh-steady",
            &PatchParams::apply("test").force(),
            &Patch::Apply(device("lh-steady", json!({}), 10)),
        )
        .await
        .unwrap();
    let _steady = keep_beating(hb.clone(), "lh-steady");
    wait_node(&env, "lh-steady", "True").await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let renewed = |l: &Lease| {
        l.spec
            .as_ref()
            .and_then(|s| s.renew_time.as_ref())
            .map(|t| t.0.as_millisecond())
            .unwrap_or_default()
    };
    let first = eventually("lh-steady's Lease", DEFAULT_TIMEOUT, || {
        lease_of(&leases, "lh-steady")
    })
    .await;

    // Every status write of a device labelled `hang` now waits 25 s on a webhook that
    // never answers (then goes through: the webhook's failure is ignored).
    let silent = SilentEndpoint::start();
    let webhooks: Api<k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration> =
        Api::all(client.clone());
    let hook = json!({ "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": { "name": "hang-device-status" },
        "webhooks": [{
            "name": "hang.fleetlet.test",
            "clientConfig": { "url": format!("https://127.0.0.1:{}/", silent.port),
                              "caBundle": cluster_ca(&env) },
            "rules": [{ "apiGroups": ["fleetlet.dev"], "apiVersions": ["*"],
                        "operations": ["CREATE", "UPDATE"],
                        "resources": ["edgedevices/status"] }],
            "objectSelector": { "matchLabels": { "hang": "yes" } },
            "failurePolicy": "Ignore", "sideEffects": "None",
            "admissionReviewVersions": ["v1"], "timeoutSeconds": 25 }] });
    webhooks
        .patch(
            "hang-device-status",
            &PatchParams::apply("test").force(),
            &Patch::Apply(&hook),
        )
        .await
        .unwrap();
    // A new device: the bridge's first status writes for it hang.
    devices
        .patch(
            "lh-slow",
            &PatchParams::apply("test").force(),
            &Patch::Apply(device("lh-slow", json!({ "hang": "yes" }), 10)),
        )
        .await
        .unwrap();
    let _slow = keep_beating(hb, "lh-slow");

    // For 30 s the steady device's Lease never expires (what a node lifecycle controller
    // would read as a dead node).
    let watched = std::time::Instant::now();
    let mut last = renewed(&first);
    while watched.elapsed() < Duration::from_secs(30) {
        let lease = lease_of(&leases, "lh-steady").await.unwrap();
        let spec = lease.spec.clone().unwrap_or_default();
        let expires = renewed(&lease) + i64::from(spec.lease_duration_seconds.unwrap_or(0)) * 1000;
        let now = Timestamp::now().as_millis() as i64;
        assert!(
            expires >= now,
            "lh-steady's Lease expired {} ms ago while another device's status write hung",
            now - expires
        );
        last = renewed(&lease);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        last >= renewed(&first) + 20_000,
        "the Lease was renewed during the 30 s (renew time moved {} ms)",
        last - renewed(&first)
    );
    // The webhook was asked: status writes did hang meanwhile.
    assert!(
        silent.accepted() > 0,
        "the apiserver never called the webhook"
    );
    webhooks
        .delete("hang-device-status", &DeleteParams::default())
        .await
        .unwrap();
}
