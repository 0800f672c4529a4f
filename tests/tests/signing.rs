//! Signed manifests end to end: the controller signs with an ed25519 key from
//! `fleetlet-controller signing-key`, an agent that trusts it applies the manifests, refuses
//! an unsigned or forged one written straight into NATS (keeping what it runs), and a key
//! rotation (agent trusts old and new, controller switches) re-signs and reaches the device.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::{path::Path, process::Command, time::Duration};

use fleetlet_protocol::{AgentManifest, decode, encode, signing};
use fleetlet_testenv::{TestEnv, chart::checked, components, eventually};

/// Creates a key with the controller's CLI; returns (key id, public key) from the line it prints.
fn signing_key(bins: &Path, file: &Path) -> (String, String) {
    let mut cmd = Command::new(bins.join("fleetlet-controller"));
    cmd.arg("signing-key").arg(file);
    let out = String::from_utf8(checked("signing-key", cmd).unwrap().stdout).unwrap();
    let line = out
        .lines()
        .find(|l| l.starts_with('"'))
        .expect(&out)
        .to_string();
    let (id, key) = line.split_once(" = ").unwrap();
    (id.trim_matches('"').into(), key.trim_matches('"').into())
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_apply_only_manifests_signed_by_a_trusted_key_through_a_rotation() {
    let env = TestEnv::builder().kube().nats().start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bins = components::bin_dir().unwrap();
    let (k1_id, k1_pub) = signing_key(&bins, &dir.path().join("k1.pem"));
    let (k2_id, k2_pub) = signing_key(&bins, &dir.path().join("k2.pem"));
    assert_ne!(k1_id, k2_id);
    // Printing the line again for an existing key does not change it.
    assert_eq!(
        signing_key(&bins, &dir.path().join("k1.pem")),
        (k1_id.clone(), k1_pub.clone())
    );

    let controller_with = |key: &str| {
        components::start_controller(
            &env,
            &bins,
            dir.path(),
            &[
                "--resync-seconds=1",
                &format!("--manifest-signing-key={}", dir.path().join(key).display()),
            ],
        )
        .unwrap()
    };
    let mut controller = controller_with("k1.pem");

    let root = dir.path().join("root");
    let _agent = components::start_agent(
        &bins,
        dir.path(),
        &components::file_agent_config(
            env.nats_url().unwrap(),
            dir.path(),
            "pi-signed",
            "/etc/fleetlet",
            "",
            &format!(
                "[trust.manifest_keys]
\"{k1_id}\" = \"{k1_pub}\"
\"{k2_id}\" = \"{k2_pub}\"
"
            ),
        ),
    )
    .unwrap();
    env.apply(
        r#"apiVersion: fleetlet.dev/v1alpha1
kind: EdgeDevice
metadata: { name: pi-signed, namespace: default }
spec: {}
---
apiVersion: fleetlet.dev/v1alpha1
kind: EdgeManifest
metadata: { name: signed, namespace: default }
spec:
  devices: [pi-signed]
  resources:
    - id: motd
      file: { path: /etc/fleetlet/motd, content: { text: "signed by the control plane\n" } }
"#,
    )
    .unwrap();
    let motd = root.join("etc/fleetlet/motd");
    eventually(
        "the signed manifest applied",
        Duration::from_secs(60),
        || async { std::fs::read_to_string(&motd).map_err(|e| e.to_string()) },
    )
    .await;

    // What the controller stores is a signed envelope naming k1.
    let desired = env
        .jetstream()
        .await
        .unwrap()
        .get_key_value("desired-state")
        .await
        .unwrap();
    let stored = desired.entry("pi-signed").await.unwrap().unwrap();
    assert!(signing::open(&stored.value).is_some_and(|s| s.is_ok()));
    let m = decode::<AgentManifest>(&stored.value).unwrap();
    assert_eq!(m.signing_key.as_deref(), Some(k1_id.as_str()));
    let signed_generation = m.generation;

    // Someone with write access to NATS (but not the key) tries to change the device.
    controller.stop();
    let mut forged = m.clone();
    forged.generation += 1;
    forged.signing_key = None;
    if let fleetlet_protocol::ResourceSpec::File(f) = &mut forged.resources[0].spec {
        f.content = fleetlet_protocol::FileContent::Text("owned\n".into());
    }
    desired
        .put("pi-signed", encode(&forged).unwrap().into())
        .await
        .unwrap();
    let rejected = eventually(
        "the unsigned manifest refused",
        Duration::from_secs(30),
        || async {
            let s = env.agent_status("pi-signed").await.ok_or("no status")?;
            let r = s.last_rejection.ok_or("no rejection yet")?;
            (r.generation == Some(forged.generation))
                .then_some(r)
                .ok_or("older rejection".to_string())
        },
    )
    .await;
    assert_eq!(rejected.reason, "Unsigned", "{rejected:?}");
    // An envelope naming k1 whose signature is not k1's: refused as a bad signature.
    let mut cmd_key = forged.clone();
    cmd_key.generation += 1;
    cmd_key.signing_key = Some(k1_id.clone());
    let text = String::from_utf8(encode(&cmd_key).unwrap()).unwrap();
    let envelope = signing::SignedManifest::new(text, "AAAA".repeat(22) + "AA==");
    desired
        .put("pi-signed", serde_json::to_vec(&envelope).unwrap().into())
        .await
        .unwrap();
    let rejected = eventually(
        "the forged manifest refused",
        Duration::from_secs(30),
        || async {
            let s = env.agent_status("pi-signed").await.ok_or("no status")?;
            let r = s.last_rejection.ok_or("no rejection")?;
            (r.generation == Some(cmd_key.generation))
                .then_some(r)
                .ok_or("older rejection".to_string())
        },
    )
    .await;
    assert_eq!(rejected.reason, "BadSignature", "{rejected:?}");
    let s = env.agent_status("pi-signed").await.unwrap();
    assert_eq!(
        s.manifest_generation, signed_generation,
        "the signed manifest stays in force"
    );
    assert_eq!(
        std::fs::read_to_string(&motd).unwrap(),
        "signed by the control plane\n"
    );

    // Rotation: the controller now signs with k2 and rewrites every device's manifest.
    controller = controller_with("k2.pem");
    let rotated = eventually(
        "the manifest re-signed with k2",
        Duration::from_secs(60),
        || async {
            let e = desired
                .entry("pi-signed")
                .await
                .map_err(|e| e.to_string())?
                .ok_or("gone")?;
            let m = decode::<AgentManifest>(&e.value).map_err(|e| e.to_string())?;
            (m.signing_key.as_deref() == Some(k2_id.as_str()))
                .then_some(m)
                .ok_or("not yet".to_string())
        },
    )
    .await;
    assert!(
        rotated.generation > cmd_key.generation,
        "never reuses a refused generation"
    );
    eventually(
        "the device runs the re-signed manifest",
        Duration::from_secs(30),
        || async {
            let s = env.agent_status("pi-signed").await.ok_or("no status")?;
            (s.observed_generation == rotated.generation)
                .then_some(())
                .ok_or(format!("observed {}", s.observed_generation))
        },
    )
    .await;
    assert_eq!(
        std::fs::read_to_string(&motd).unwrap(),
        "signed by the control plane\n"
    );
    drop(controller);
}

/// Freshness: a device that lost its state directory would take any old signed manifest as
/// new. It asks the controller for its floor (the newest generation issued to it, signed)
/// and refuses a replayed older manifest; it applies nothing until the floor arrives.
#[tokio::test(flavor = "multi_thread")]
async fn a_device_that_lost_its_state_refuses_a_replayed_old_signed_manifest() {
    let env = TestEnv::builder().kube().nats().start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bins = components::bin_dir().unwrap();
    let (id, public) = signing_key(&bins, &dir.path().join("k.pem"));
    let key_flag = format!(
        "--manifest-signing-key={}",
        dir.path().join("k.pem").display()
    );
    // A long leader lease: a controller killed without releasing it keeps its successor a
    // standby for a while (standbys answer floors; only the leader writes).
    let flags = [
        "--resync-seconds=1",
        "--lease-seconds=30",
        key_flag.as_str(),
    ];
    let mut controller = components::start_controller(&env, &bins, dir.path(), &flags).unwrap();
    let config = components::file_agent_config(
        env.nats_url().unwrap(),
        dir.path(),
        "pi-fresh",
        "/etc/fleetlet",
        "",
        &format!("[trust.manifest_keys]\n\"{id}\" = \"{public}\"\n"),
    );
    let mut agent = components::start_agent(&bins, dir.path(), &config).unwrap();
    let manifest = |text: &str| {
        format!(
            r#"apiVersion: fleetlet.dev/v1alpha1
kind: EdgeDevice
metadata: {{ name: pi-fresh, namespace: default }}
spec: {{}}
---
apiVersion: fleetlet.dev/v1alpha1
kind: EdgeManifest
metadata: {{ name: fresh, namespace: default }}
spec:
  devices: [pi-fresh]
  resources:
    - id: motd
      file: {{ path: /etc/fleetlet/motd, content: {{ text: "{text}" }} }}
"#
        )
    };
    let motd = dir.path().join("root/etc/fleetlet/motd");
    let desired = env
        .jetstream()
        .await
        .unwrap()
        .get_key_value("desired-state")
        .await
        .unwrap();
    // Two generations, each applied; the first one's signed bytes are kept for the replay.
    env.apply(&manifest("old")).unwrap();
    fleetlet_testenv::wait::file_content(&motd, "old", Duration::from_secs(60)).await;
    let old = desired.entry("pi-fresh").await.unwrap().unwrap().value;
    env.apply(&manifest("new")).unwrap();
    fleetlet_testenv::wait::file_content(&motd, "new", Duration::from_secs(60)).await;
    let newest = decode::<AgentManifest>(&desired.entry("pi-fresh").await.unwrap().unwrap().value)
        .unwrap()
        .generation;
    // The controller records what it issued in the EdgeDevice before we go on.
    let devices: kube::Api<fleetlet_crds::EdgeDevice> =
        kube::Api::namespaced(env.kube_client().await.unwrap(), "default");
    eventually(
        "desiredGeneration recorded",
        Duration::from_secs(30),
        || async {
            let d = devices.get("pi-fresh").await.map_err(|e| e.to_string())?;
            let g = d.status.and_then(|s| s.desired_generation);
            (g == Some(newest)).then_some(()).ok_or(format!("{g:?}"))
        },
    )
    .await;

    // The device loses its state; meanwhile someone with write access to the bucket puts
    // the old, validly signed manifest back.
    agent.stop();
    controller.kill_program().unwrap();
    std::fs::remove_dir_all(dir.path().join("state")).unwrap();
    // Watches the file closely from here on: the old content must never come back.
    let watch = {
        let motd = motd.clone();
        tokio::spawn(async move {
            loop {
                if std::fs::read_to_string(&motd).is_ok_and(|t| t == "old") {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    desired.put("pi-fresh", old.clone()).await.unwrap();
    let _agent = components::start_agent(&bins, dir.path(), &config).unwrap();
    // Without the controller there is no floor: nothing is applied, and it says why.
    let waiting = eventually("FreshnessUnverified", Duration::from_secs(30), || async {
        let s = env.agent_status("pi-fresh").await.ok_or("no status")?;
        let r = s.last_rejection.clone().ok_or("no rejection yet")?;
        (r.reason == "FreshnessUnverified")
            .then_some(s)
            .ok_or(format!("{r:?}"))
    })
    .await;
    assert_eq!(waiting.observed_generation, 0, "{waiting:?}");
    // A controller answers the floor (as a standby: the killed leader's lease has not run
    // out, so nothing repairs the bucket yet): the replayed manifest is refused as stale.
    // Once it leads, it writes a newer generation, which is applied.
    let _controller = components::start_controller(&env, &bins, dir.path(), &flags).unwrap();
    let stale = eventually("the replay refused", Duration::from_secs(60), || async {
        let s = env.agent_status("pi-fresh").await.ok_or("no status")?;
        let r = s.last_rejection.clone().ok_or("no rejection yet")?;
        if r.reason == "StaleGeneration" {
            Ok(r)
        } else {
            Err(format!("{r:?}"))
        }
    })
    .await;
    assert!(stale.message.contains(&newest.to_string()), "{stale:?}");
    eventually(
        "a newer generation applied",
        Duration::from_secs(60),
        || async {
            let s = env.agent_status("pi-fresh").await.ok_or("no status")?;
            (s.observed_generation > newest)
                .then_some(())
                .ok_or(format!("observed {}", s.observed_generation))
        },
    )
    .await;
    assert_eq!(std::fs::read_to_string(&motd).unwrap(), "new");
    // The old content never came back while the replay sat in the bucket.
    assert!(!watch.is_finished(), "the replayed manifest was applied");
    watch.abort();
}
