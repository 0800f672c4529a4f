//! Device enrollment and revocation with NATS decentralized auth on a real nats-server over
//! TLS: `fleetlet-controller nats-init` writes the keys and the server configuration, the
//! controller issues each EdgeDevice an account of its own and its one user in a Secret,
//! agents run with nothing but
//! what that Secret holds, and revoking or deleting a device cuts its connection and its
//! credentials, which stay refused after the server restarts. Re-enrolling issues new ones.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::{path::Path, process::Command, time::Duration};

use async_nats::jetstream;
use fleetlet_controller::identity::{
    AGENT_CONFIG_KEY, CREDS_KEY, DEVICE_CREDS_PATH, decode_claims,
};
use fleetlet_crds::EdgeDevice;
use fleetlet_protocol::{
    DeviceId,
    kv::{ACTUAL_STATE, DESIRED_STATE},
};
use fleetlet_testenv::{TestEnv, chart::checked, components, eventually, nats::Operator};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams},
};

/// Connects as a device with a `.creds` text over TLS, once (no retries): the server's
/// answer.
async fn connect(env: &TestEnv, creds: &str) -> Result<async_nats::Client, String> {
    let nats = env.nats.as_ref().unwrap();
    async_nats::ConnectOptions::with_credentials(creds)
        .map_err(|e| e.to_string())?
        .add_root_certificates(nats.ca_file.clone().unwrap())
        .require_tls(true)
        .connection_timeout(Duration::from_secs(3))
        .connect(&nats.url)
        .await
        .map_err(|e| e.to_string())
}

async fn creds_secret(secrets: &Api<Secret>, name: &str) -> Result<(String, String), String> {
    let s = secrets
        .get_opt(name)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("no Secret yet")?;
    let data = s.data.unwrap_or_default();
    let text = |k: &str| {
        data.get(k)
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .ok_or(format!("no {k}"))
    };
    Ok((text(CREDS_KEY)?, text(AGENT_CONFIG_KEY)?))
}

/// The server refused the credentials (not a timeout or a network error).
fn refused(error: &str) -> bool {
    error.to_lowercase().contains("authorization")
}

/// The heartbeat key's revision: it moves while the agent is connected.
async fn heartbeat_revision(js: &jetstream::Context, device: &str) -> u64 {
    let kv = js.get_key_value("heartbeat").await.unwrap();
    kv.entry(device).await.unwrap().map_or(0, |e| e.revision)
}

#[tokio::test(flavor = "multi_thread")]
async fn devices_are_enrolled_with_their_own_identity_and_revoking_cuts_them_off() {
    let keys = tempfile::tempdir().unwrap();
    let bins = components::bin_dir().unwrap();
    let mut cmd = Command::new(bins.join("fleetlet-controller"));
    cmd.arg("nats-init").arg(keys.path());
    checked("nats-init", cmd).unwrap();
    // The environment's own admin (it creates the buckets and reads them for the checks).
    let operator = Operator::from_dir(keys.path()).unwrap();
    let authority = &operator.authority;
    let mut env = TestEnv::builder()
        .kube()
        .nats_operator(&operator.config, &operator.admin_creds, true)
        .start()
        .await
        .unwrap();
    let ca = env.nats.as_ref().unwrap().ca_file.clone().unwrap();
    let url = env.nats_url().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let controller_flags = [
        "--resync-seconds=1".to_string(),
        format!(
            "--nats-authority={}",
            keys.path().join("authority.json").display()
        ),
        format!("--nats-ca={}", ca.display()),
        format!("--device-nats-url={url}"),
    ];
    let flags: Vec<&str> = controller_flags.iter().map(String::as_str).collect();
    let mut controller = components::start_controller(&env, &bins, dir.path(), &flags).unwrap();
    let _bridge = components::start_bridge(
        &env,
        &bins,
        dir.path(),
        &[
            &format!(
                "--nats-creds={}",
                keys.path().join("bridge.creds").display()
            ),
            &format!("--nats-ca={}", ca.display()),
        ],
    )
    .unwrap();

    let ns = env.namespace("enroll").await.unwrap();
    env.apply(&format!(
        r#"apiVersion: fleetlet.dev/v1alpha1
kind: EdgeDevice
metadata: {{ name: pi-a, namespace: {ns}, labels: {{ site: lab }} }}
spec: {{}}
---
apiVersion: fleetlet.dev/v1alpha1
kind: EdgeDevice
metadata: {{ name: pi-b, namespace: {ns}, labels: {{ site: lab }} }}
spec: {{}}
---
apiVersion: fleetlet.dev/v1alpha1
kind: EdgeManifest
metadata: {{ name: motd, namespace: {ns} }}
spec:
  selector: {{ matchLabels: {{ site: lab }} }}
  resources:
    - id: motd
      file: {{ path: /etc/fleetlet/motd, content: {{ text: "enrolled\n" }} }}
"#
    ))
    .unwrap();

    let client = env.kube_client().await.unwrap();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let devices: Api<EdgeDevice> = Api::namespaced(client.clone(), &ns);
    let mut agents = Vec::new();
    let mut issued = Vec::new();
    for d in ["pi-a", "pi-b"] {
        let (creds, fragment) = eventually(
            &format!("{d}'s credentials Secret"),
            Duration::from_secs(60),
            || async { creds_secret(&secrets, &format!("{d}-nats")).await },
        )
        .await;
        // What the operator copies to the device: the creds and an agent.toml fragment.
        assert!(
            fragment.contains(&format!("device_id = \"{d}\"")),
            "{fragment}"
        );
        assert!(
            fragment.contains(&format!("urls = [\"{url}\"]")),
            "{fragment}"
        );
        assert!(
            fragment.contains(&format!("creds_file = \"{DEVICE_CREDS_PATH}\"")),
            "{fragment}"
        );
        let status = eventually("credentials in status", Duration::from_secs(30), || async {
            let dev = devices.get(d).await.map_err(|e| e.to_string())?;
            dev.status
                .and_then(|s| s.credentials)
                .ok_or("no credentials in status".to_string())
        })
        .await;
        assert_eq!(
            status.secret_name.as_deref(),
            Some(format!("{d}-nats").as_str())
        );
        assert!(!status.revoked);
        // The creds are for a user of the device's own account, the one the status names,
        // which is neither the fleet's nor the bridge's.
        let jwt = creds.lines().nth(1).unwrap();
        let claims = decode_claims(jwt).unwrap();
        let account = status.account.clone().unwrap();
        assert_eq!(claims["iss"].as_str(), Some(account.as_str()));
        assert_ne!(account, authority.account_public_key());
        assert_ne!(account, authority.bridge_public_key());

        let agent_dir = dir.path().join(d);
        std::fs::create_dir_all(&agent_dir).unwrap();
        let creds_path = agent_dir.join("nats.creds");
        std::fs::write(&creds_path, &creds).unwrap();
        let nats = format!(
            "creds_file = \"{}\"\ntls_ca = \"{}\"",
            creds_path.display(),
            ca.display()
        );
        agents.push(
            components::start_agent(
                &bins,
                &agent_dir,
                &components::file_agent_config(&url, &agent_dir, d, "/etc/fleetlet", &nats, ""),
            )
            .unwrap(),
        );
        issued.push((creds, status.account.unwrap()));
    }
    assert_ne!(issued[0].1, issued[1].1, "one identity per device");
    for d in ["pi-a", "pi-b"] {
        let motd = dir.path().join(d).join("root/etc/fleetlet/motd");
        eventually(
            &format!("{d} applies the manifest with its own identity"),
            Duration::from_secs(60),
            || async { std::fs::read_to_string(&motd).map_err(|e| e.to_string()) },
        )
        .await;
        env.wait_node_ready(d).await;
    }

    // pi-a's identity reaches its own keys only (the adversarial suite in nats_security.rs
    // tries everything else).
    let a = connect(&env, &issued[0].0).await.unwrap();
    let get = |device: &str| {
        let a = a.clone();
        let subject = DESIRED_STATE.direct_get(&DeviceId::new(device).unwrap());
        async move { tokio::time::timeout(Duration::from_secs(2), a.request(subject, "".into())).await }
    };
    let own = get("pi-a").await.unwrap().unwrap();
    assert!(own.payload.len() > 10, "{own:?}");
    assert!(!matches!(get("pi-b").await, Ok(Ok(m)) if !m.payload.is_empty()));
    let admin_js = env.jetstream().await.unwrap();
    let b_status = admin_js.get_key_value("actual-state").await.unwrap();
    let before = b_status.entry("pi-b").await.unwrap().map(|e| e.revision);
    a.publish(
        ACTUAL_STATE.subject(&DeviceId::new("pi-b").unwrap()),
        "{}".into(),
    )
    .await
    .unwrap();
    // A write of its own to the same stream, acknowledged after the attempt was processed.
    let ack = a
        .request(
            ACTUAL_STATE.subject(&DeviceId::new("pi-a").unwrap()),
            "{\"own\":1}".into(),
        )
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&ack.payload).contains("\"seq\""),
        "{ack:?}"
    );
    let after = b_status.entry("pi-b").await.unwrap();
    assert!(
        after.as_ref().is_none_or(|e| &e.value[..] != b"{}"),
        "pi-a wrote pi-b's status (revision {before:?} -> {:?})",
        after.map(|e| e.revision)
    );

    // A Secret named like a device's credentials but not the controller's is never
    // replaced or deleted: the device gets no credentials and its status says why.
    let foreign: Secret = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "pi-c-nats", "namespace": ns },
        "stringData": { "note": "someone else's" }
    }))
    .unwrap();
    secrets
        .create(&kube::api::PostParams::default(), &foreign)
        .await
        .unwrap();
    let foreign_version = secrets
        .get("pi-c-nats")
        .await
        .unwrap()
        .metadata
        .resource_version;
    env.apply(&format!(
        "apiVersion: fleetlet.dev/v1alpha1\nkind: EdgeDevice\nmetadata: {{ name: pi-c, namespace: {ns} }}\nspec: {{}}\n"
    ))
    .unwrap();
    eventually(
        "pi-c's status to name the Secret in the way",
        Duration::from_secs(30),
        || async {
            let d = devices.get("pi-c").await.map_err(|e| e.to_string())?;
            let c = d.status.and_then(|s| s.credentials);
            c.as_ref()
                .and_then(|c| c.message.as_deref())
                .is_some_and(|m| m.contains("pi-c-nats") && m.contains("not managed"))
                .then_some(())
                .ok_or(format!("{c:?}"))
        },
    )
    .await;
    assert_eq!(
        secrets
            .get("pi-c-nats")
            .await
            .unwrap()
            .metadata
            .resource_version,
        foreign_version,
        "a Secret the controller does not own was replaced"
    );
    // Deleted too: the foreign Secret is checked again at the end, after the revocations
    // below have shown many of the controller's passes.
    devices
        .delete("pi-c", &DeleteParams::default())
        .await
        .unwrap();

    // Revoke pi-b: its connection is closed, its credentials refused, its Secret deleted.
    devices
        .patch(
            "pi-b",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "spec": { "revoked": true } })),
        )
        .await
        .unwrap();
    eventually(
        "pi-b's credentials refused",
        Duration::from_secs(30),
        || async {
            match connect(&env, &issued[1].0).await {
                Ok(_) => Err("still accepted".to_string()),
                Err(e) if refused(&e) => Ok(e),
                Err(e) => Err(e),
            }
        },
    )
    .await;
    eventually("pi-b's Secret deleted", Duration::from_secs(30), || async {
        match secrets.get_opt("pi-b-nats").await {
            Ok(None) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    eventually(
        "pi-b's EdgeDevice to say it is revoked",
        Duration::from_secs(30),
        || async {
            let d = devices.get("pi-b").await.map_err(|e| e.to_string())?;
            let credentials = d.status.and_then(|s| s.credentials);
            credentials
                .as_ref()
                .is_some_and(|c| c.revoked)
                .then_some(())
                .ok_or(format!("{credentials:?}"))
        },
    )
    .await;
    // The agent was connected (heartbeats every second) and is no longer: while pi-a,
    // beating at the same rate, writes two new heartbeats, pi-b writes none.
    let before = heartbeat_revision(&admin_js, "pi-b").await;
    let a_seen = std::cell::RefCell::new(vec![heartbeat_revision(&admin_js, "pi-a").await]);
    eventually(
        "two new heartbeats from pi-a",
        Duration::from_secs(15),
        || async {
            let now = heartbeat_revision(&admin_js, "pi-a").await;
            let mut seen = a_seen.borrow_mut();
            if seen.last() != Some(&now) {
                seen.push(now);
            }
            (seen.len() >= 3)
                .then_some(())
                .ok_or(format!("pi-a revisions {seen:?}"))
        },
    )
    .await;
    assert_eq!(
        heartbeat_revision(&admin_js, "pi-b").await,
        before,
        "pi-b still heartbeats"
    );

    // Deleting an EdgeDevice revokes it too, also while the controller is down.
    controller.stop();
    devices
        .delete("pi-a", &DeleteParams::default())
        .await
        .unwrap();
    let mut controller = components::start_controller(&env, &bins, dir.path(), &flags).unwrap();
    eventually(
        "pi-a's credentials refused",
        Duration::from_secs(30),
        || async {
            match connect(&env, &issued[0].0).await {
                Ok(_) => Err("still accepted".to_string()),
                Err(e) if refused(&e) => Ok(e),
                Err(e) => Err(e),
            }
        },
    )
    .await;

    // Revocations survive a server restart (the resolver keeps the account JWT).
    controller.stop();
    let nats = env.nats.as_mut().unwrap();
    nats.stop();
    nats.start_again().await.unwrap();
    for (creds, _) in &issued {
        let e = connect(&env, creds).await.err();
        assert!(
            e.as_deref().is_some_and(refused),
            "a revoked identity after a restart: {e:?}"
        );
    }

    // Re-enrolling pi-b issues a new identity that works; the old one stays refused.
    let _controller = components::start_controller(&env, &bins, dir.path(), &flags).unwrap();
    devices
        .patch(
            "pi-b",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "spec": { "revoked": false } })),
        )
        .await
        .unwrap();
    let (creds, _) = eventually("pi-b's new Secret", Duration::from_secs(60), || {
        creds_secret(&secrets, "pi-b-nats")
    })
    .await;
    assert_ne!(creds, issued[1].0);
    connect(&env, &creds).await.unwrap();
    let e = connect(&env, &issued[1].0).await.err();
    assert!(e.as_deref().is_some_and(refused), "{e:?}");
    assert_eq!(
        secrets
            .get("pi-c-nats")
            .await
            .unwrap()
            .metadata
            .resource_version,
        foreign_version,
        "a Secret the controller does not own was touched"
    );
    drop(agents);
}

/// `nats-init` refuses to overwrite existing keys.
#[test]
fn nats_init_keeps_existing_keys() {
    let keys = tempfile::tempdir().unwrap();
    let bins = components::bin_dir().unwrap();
    let run = |dir: &Path| {
        Command::new(bins.join("fleetlet-controller"))
            .arg("nats-init")
            .arg(dir)
            .output()
            .unwrap()
    };
    assert!(run(keys.path()).status.success());
    let before = std::fs::read(keys.path().join("authority.json")).unwrap();
    let again = run(keys.path());
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("authority.json"));
    assert_eq!(
        std::fs::read(keys.path().join("authority.json")).unwrap(),
        before
    );
}

/// Revocation leaves nothing behind to grow: twenty thousand enrolled devices, each an
/// account on the server, are revoked by deleting their accounts in batches; afterwards
/// the resolver holds only the fleet's own accounts again and every revoked identity is
/// refused. (Before per-device accounts, every revocation stayed in one account JWT for
/// good, and twenty thousand of them passed NATS's 1 MiB message limit.)
#[tokio::test(flavor = "multi_thread")]
async fn twenty_thousand_revoked_devices_leave_nothing_behind() {
    use fleetlet_controller::identity::{delete_accounts, push_account_jwt};
    use futures::StreamExt;
    let devices: usize = std::env::var("FLEETLET_REVOCATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let resolver = tempfile::tempdir().unwrap();
    let operator = Operator::generate(resolver.path()).unwrap();
    let env = TestEnv::builder()
        .nats_operator(&operator.config, &operator.admin_creds, false)
        .start()
        .await
        .unwrap();
    let nats = env.nats.as_ref().unwrap();
    let sys = operator.system_client(nats).await.unwrap();
    let jwts = || {
        std::fs::read_dir(resolver.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "jwt"))
            })
            .count()
    };
    let base = jwts();

    let started = std::time::Instant::now();
    // Minted on every core, as the signatures are the slow part.
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let identities: Vec<_> = std::thread::scope(|s| {
        let authority = &operator.authority;
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    (t..devices)
                        .step_by(threads)
                        .map(|i| {
                            authority
                                .issue_device(&DeviceId::new(format!("d-{i}")).unwrap())
                                .unwrap()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let minted = started.elapsed();
    let pushed: Vec<_> = futures::stream::iter(identities.iter())
        .map(|id| push_account_jwt(&sys, id.account_jwt.clone()))
        .buffer_unordered(32)
        .collect()
        .await;
    assert!(
        pushed.iter().all(Result::is_ok),
        "{:?}",
        pushed.iter().find(|r| r.is_err())
    );
    let enrolled = started.elapsed();
    assert_eq!(
        jwts(),
        base + devices,
        "one account per device on the server"
    );
    // Every tenth of them works before revocation.
    let sample: Vec<_> = identities
        .iter()
        .step_by(devices.div_ceil(10).max(1))
        .collect();
    for id in &sample {
        connect_plain(&env, &id.user.creds).await.unwrap();
    }

    let revoking = std::time::Instant::now();
    let accounts: Vec<String> = identities.iter().map(|i| i.account.clone()).collect();
    delete_accounts(&sys, &operator.authority, &accounts)
        .await
        .unwrap();
    let revoked = revoking.elapsed();
    assert_eq!(
        jwts(),
        base,
        "the resolver keeps nothing of revoked devices"
    );
    for id in &sample {
        let e = connect_plain(&env, &id.user.creds).await.err();
        assert!(
            e.as_deref().is_some_and(refused),
            "a revoked identity: {e:?}"
        );
    }
    // Still so after a server restart.
    let mut env = env;
    let nats = env.nats.as_mut().unwrap();
    nats.stop();
    nats.start_again().await.unwrap();
    assert_eq!(jwts(), base);
    for id in sample.iter().take(3) {
        let e = connect_plain(&env, &id.user.creds).await.err();
        assert!(e.as_deref().is_some_and(refused), "after a restart: {e:?}");
    }
    fleetlet_testenv::report::record(
        fleetlet_testenv::report::Section::Security,
        &format!("{devices} device identities revoked"),
        "every revoked identity refused, also after a restart; nothing of them left on the server",
        &format!(
            "minted in {:.1} s, accounts pushed in {:.1} s; revoked in {:.2} s ({} delete requests); \
             resolver back to {base} account JWTs; sampled identities refused, also after a restart",
            minted.as_secs_f64(),
            (enrolled - minted).as_secs_f64(),
            revoked.as_secs_f64(),
            devices.div_ceil(500),
        ),
    );
}

/// Connects with a `.creds` text without TLS, once.
async fn connect_plain(env: &TestEnv, creds: &str) -> Result<async_nats::Client, String> {
    async_nats::ConnectOptions::with_credentials(creds)
        .map_err(|e| e.to_string())?
        .connection_timeout(Duration::from_secs(3))
        .connect(env.nats_url().unwrap())
        .await
        .map_err(|e| e.to_string())
}
