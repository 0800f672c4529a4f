//! Per-identity NATS permissions (`fleetlet_protocol::permissions`) on a real nats-server
//! with TLS: a device reaches its own keys and nothing else, every other attempt fails with
//! the server's permission error and changes nothing; the controller, the bridge and an agent
//! each run with their own identity, over TLS, and the fleet converges.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use async_nats::jetstream;
use fleetlet_protocol::{DeviceId, permissions, relay};
use fleetlet_testenv::{TestEnv, components, eventually};
use kube::Api;

const DEVICES: [&str; 2] = ["pi-a", "pi-b"];

fn password(user: &str) -> String {
    format!("{user}-secret")
}

/// The server's users: an admin for the test's setup, two devices, the controller, the bridge.
fn server_config() -> String {
    let mut users = format!(
        "  {{ user: \"admin\", password: \"{}\" }}\n",
        password("admin")
    );
    for d in DEVICES {
        let id = DeviceId::new(d).unwrap();
        users.push_str(
            &permissions::device(&id, &format!("_INBOX_{d}")).server_user(d, &password(d)),
        );
    }
    users.push_str(&permissions::controller().server_user("controller", &password("controller")));
    users.push_str(&permissions::bridge().server_user("bridge", &password("bridge")));
    format!("authorization {{\n users: [\n{users} ]\n}}\n")
}

async fn secured_env(kube: bool) -> TestEnv {
    let b = TestEnv::builder();
    let b = if kube { b.kube() } else { b };
    b.nats_secured(&server_config(), "admin", &password("admin"), true)
        .start()
        .await
        .unwrap()
}

/// A client for `user` over TLS, recording the server's error messages.
async fn connect_as(env: &TestEnv, user: &str) -> (async_nats::Client, Arc<Mutex<Vec<String>>>) {
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = errors.clone();
    let nats = env.nats.as_ref().unwrap();
    let mut opts = async_nats::ConnectOptions::with_user_and_password(user.into(), password(user))
        .add_root_certificates(nats.ca_file.clone().unwrap())
        .require_tls(true)
        .request_timeout(Some(Duration::from_secs(2)))
        .event_callback(move |event| {
            let seen = seen.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    seen.lock().unwrap().push(e.to_string());
                }
            }
        });
    // Devices have inboxes of their own; the control plane uses the default one.
    if DEVICES.contains(&user) {
        opts = opts.custom_inbox_prefix(format!("_INBOX_{user}"));
    }
    let client = opts.connect(&nats.url).await.unwrap();
    (client, errors)
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

#[tokio::test]
async fn a_device_identity_reaches_its_own_keys_and_nothing_else() {
    let env = secured_env(false).await;
    let admin = env.jetstream().await.unwrap();
    let store = |js: jetstream::Context, name: &'static str| async move {
        js.get_key_value(name).await.unwrap()
    };
    let desired = store(admin.clone(), "desired-state").await;
    for d in DEVICES {
        desired.put(d, manifest(d, d).into()).await.unwrap();
    }
    let actual = store(admin.clone(), "actual-state").await;
    let b_status = actual.put("pi-b", "{}".into()).await.unwrap();
    let b_desired = desired.entry("pi-b").await.unwrap().unwrap().revision;

    let (client, errors) = connect_as(&env, "pi-a").await;
    let mut js = jetstream::new(client.clone());
    js.set_timeout(Duration::from_secs(2));
    // Its own: read desired state, write status and heartbeat.
    let my_desired = js.get_key_value("desired-state").await.unwrap();
    let mine = my_desired.entry("pi-a").await.unwrap().unwrap();
    assert_eq!(&mine.value[..], &manifest("pi-a", "pi-a")[..]);
    let my_actual = js.get_key_value("actual-state").await.unwrap();
    my_actual.put("pi-a", "{}".into()).await.unwrap();
    assert!(my_actual.entry("pi-a").await.unwrap().is_some());
    js.get_key_value("heartbeat")
        .await
        .unwrap()
        .put("pi-a", "{}".into())
        .await
        .unwrap();
    assert!(
        errors.lock().unwrap().is_empty(),
        "{:?}",
        errors.lock().unwrap()
    );

    // Everything else fails, and the server says it is a permission error.
    let denied = |what: &str, ok: bool| {
        assert!(!ok, "{what} succeeded");
    };
    denied(
        "reading pi-b's desired state",
        my_desired.entry("pi-b").await.is_ok_and(|e| e.is_some()),
    );
    denied(
        "writing pi-b's status",
        my_actual.put("pi-b", "{\"x\":1}".into()).await.is_ok(),
    );
    denied(
        "writing pi-b's heartbeat",
        js.get_key_value("heartbeat")
            .await
            .unwrap()
            .put("pi-b", "{}".into())
            .await
            .is_ok(),
    );
    denied(
        "writing its own desired state",
        my_desired.put("pi-a", "{}".into()).await.is_ok(),
    );
    denied(
        "watching every device",
        my_desired.watch_all().await.is_ok(),
    );
    denied("watching pi-b", my_desired.watch("pi-b").await.is_ok());
    denied(
        "creating a bucket",
        js.create_stream(jetstream::stream::Config {
            name: "KV_mine".into(),
            subjects: vec!["$KV.mine.>".into()],
            ..Default::default()
        })
        .await
        .is_ok(),
    );
    denied(
        "deleting a bucket",
        js.delete_key_value("heartbeat").await.is_ok(),
    );
    // Subscriptions to others' records and relay sessions are refused by the server.
    let _sneak = client.subscribe("$KV.desired-state.pi-b").await.unwrap();
    let _relay = client
        .subscribe(relay::device_wildcard(&DeviceId::new("pi-b").unwrap()))
        .await
        .unwrap();
    client.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let errors = errors.lock().unwrap().clone();
    for subject in [
        "$JS.API.DIRECT.GET.KV_desired-state.$KV.desired-state.pi-b",
        "$KV.actual-state.pi-b",
        "$KV.heartbeat.pi-b",
        "$KV.desired-state.pi-a",
        "$JS.API.CONSUMER.CREATE.KV_desired-state",
        "$JS.API.STREAM.CREATE.KV_mine",
        "$JS.API.STREAM.DELETE.KV_heartbeat",
        "Subscription to \"$KV.desired-state.pi-b\"",
        "Subscription to \"fleetlet.relay.pi-b.>\"",
    ] {
        assert!(
            errors
                .iter()
                .any(|e| e.contains("Permissions Violation") && e.contains(subject)),
            "no permission error naming {subject}: {errors:#?}"
        );
    }

    // Nothing changed.
    assert_eq!(
        desired.entry("pi-b").await.unwrap().unwrap().revision,
        b_desired
    );
    assert_eq!(
        actual.entry("pi-b").await.unwrap().unwrap().revision,
        b_status
    );
    assert!(admin.get_key_value("heartbeat").await.is_ok());
    assert!(admin.get_key_value("mine").await.is_err());
    assert!(
        store(admin.clone(), "heartbeat")
            .await
            .entry("pi-b")
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn a_server_certificate_from_another_ca_is_refused() {
    let env = secured_env(false).await;
    let other = tempfile::tempdir().unwrap();
    fleetlet_testenv::pki::Pki::generate()
        .unwrap()
        .write(other.path())
        .unwrap();
    let nats = env.nats.as_ref().unwrap();
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        async_nats::ConnectOptions::with_user_and_password("pi-a".into(), password("pi-a"))
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
async fn controller_bridge_and_agent_run_with_their_own_identities_over_tls() {
    let env = secured_env(true).await;
    let nats = env.nats.as_ref().unwrap();
    let ca = nats.ca_file.clone().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bins = components::bin_dir().unwrap();
    let flags = |user: &str| {
        vec![
            format!("--nats-user={user}"),
            format!("--nats-password={}", password(user)),
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
                "user = \"pi-a\"
password = \"{}\"
tls_ca = \"{}\"",
                password("pi-a"),
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

    let file = root.join("etc/fleetlet/greeting");
    eventually(
        "the agent applied the manifest",
        Duration::from_secs(60),
        || async { std::fs::read_to_string(&file).map_err(|e| e.to_string()) },
    )
    .await;
    let client = env.kube_client().await.unwrap();
    let manifests: Api<fleetlet_crds::EdgeManifest> = Api::namespaced(client.clone(), "default");
    eventually("the rollout complete", Duration::from_secs(60), || async {
        let m = manifests.get("over-tls").await.map_err(|e| e.to_string())?;
        let ready = m.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        });
        ready.then_some(()).ok_or("not Ready".to_string())
    })
    .await;
    env.wait_node_ready("pi-a").await;

    // A relay request from the bridge's identity reaches the agent, and the agent's answer
    // (to the bridge's inbox, allowed as a response) comes back.
    let (bridge, errors) = connect_as(&env, "bridge").await;
    let request = serde_json::json!({ "resource": "no-such-container", "session": "s1" });
    let reply = bridge
        .request(
            relay::logs_subject(&DeviceId::new("pi-a").unwrap()),
            serde_json::to_vec(&request).unwrap().into(),
        )
        .await
        .unwrap();
    let frame = reply
        .headers
        .as_ref()
        .and_then(|h| h.get(relay::FRAME))
        .map(|v| v.to_string());
    assert_eq!(frame.as_deref(), Some("end"), "{reply:?}");
    assert!(
        errors.lock().unwrap().is_empty(),
        "{:?}",
        errors.lock().unwrap()
    );
}
