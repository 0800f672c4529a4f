//! Device enrollment and revocation with NATS decentralized auth on a real nats-server over
//! TLS: `fleetlet-controller nats-init` writes the keys and the server configuration, the
//! controller issues each EdgeDevice its own user in a Secret, agents run with nothing but
//! what that Secret holds, and revoking or deleting a device cuts its connection and its
//! credentials, which stay refused after the server restarts. Re-enrolling issues new ones.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::{path::Path, process::Command, time::Duration};

use async_nats::jetstream;
use fleetlet_controller::identity::{
    AGENT_CONFIG_KEY, Authority, CREDS_KEY, DEVICE_CREDS_PATH, decode_claims,
};
use fleetlet_crds::EdgeDevice;
use fleetlet_protocol::permissions::Permissions;
use fleetlet_testenv::{TestEnv, chart::checked, components, eventually};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams},
};

/// Connects as a device with a `.creds` text over TLS, once (no retries): the server's
/// answer. Devices have inboxes of their own.
async fn connect(env: &TestEnv, creds: &str, device: &str) -> Result<async_nats::Client, String> {
    let nats = env.nats.as_ref().unwrap();
    async_nats::ConnectOptions::with_credentials(creds)
        .map_err(|e| e.to_string())?
        .custom_inbox_prefix(format!("_INBOX_{device}"))
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
    let config = std::fs::read_to_string(keys.path().join("nats-auth.conf")).unwrap();
    let authority = Authority::from_file(&keys.path().join("authority.json")).unwrap();
    // The environment's own admin (it creates the buckets and reads them for the checks).
    let everything = Permissions {
        publish: vec![">".into()],
        subscribe: vec![">".into()],
        allow_responses: true,
    };
    let admin = authority.issue_user("admin", &everything).unwrap();
    let mut env = TestEnv::builder()
        .kube()
        .nats_operator(&config, &admin.creds, true)
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
        // The creds are for the user the status names, a user of the fleet account.
        let jwt = creds.lines().nth(1).unwrap();
        let claims = decode_claims(jwt).unwrap();
        assert_eq!(claims["sub"].as_str(), status.user.as_deref());
        assert_eq!(
            claims["nats"]["issuer_account"].as_str(),
            Some(authority.account_public_key().as_str())
        );

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
        issued.push((creds, status.user.unwrap()));
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

    // pi-a's identity reaches its own keys only.
    let a = connect(&env, &issued[0].0, "pi-a").await.unwrap();
    let js_a = {
        let mut js = jetstream::new(a);
        js.set_timeout(Duration::from_secs(2));
        js
    };
    let desired_a = js_a.get_key_value("desired-state").await.unwrap();
    assert!(desired_a.entry("pi-a").await.unwrap().is_some());
    assert!(!desired_a.entry("pi-b").await.is_ok_and(|e| e.is_some()));
    let actual_a = js_a.get_key_value("actual-state").await.unwrap();
    assert!(actual_a.put("pi-b", "{}".into()).await.is_err());

    // Revoke pi-b: its connection is closed, its credentials refused, its Secret deleted.
    let admin_js = env.jetstream().await.unwrap();
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
            match connect(&env, &issued[1].0, "pi-b").await {
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
            match connect(&env, &issued[0].0, "pi-a").await {
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
        let e = connect(&env, creds, "pi").await.err();
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
    connect(&env, &creds, "pi-b").await.unwrap();
    let e = connect(&env, &issued[1].0, "pi-b").await.err();
    assert!(e.as_deref().is_some_and(refused), "{e:?}");
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
