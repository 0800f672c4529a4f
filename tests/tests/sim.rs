//! `fleetlet-sim` against a real nats-server in decentralized-auth mode: every simulated
//! device connects with its own identity, takes its manifest from its own key and reports
//! its own status; the injected faults show as they should (offline devices never report,
//! failing devices report the resource Failed, slow devices apply late).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::{
    io::BufRead,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use fleetlet_protocol::ResourceStatus;
use fleetlet_testenv::{TestEnv, components, eventually, nats::Operator};

const DEVICES: usize = 10;

fn manifest(device: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "apiVersion": "fleetlet.dev/v1alpha1", "kind": "AgentManifest",
        "device": device, "generation": 1,
        "resources": [{ "id": "motd",
            "owner": { "kind": "EdgeManifest", "namespace": "default", "name": "m" },
            "file": { "path": "/etc/fleetlet/motd", "content": { "text": "simulated\n" } } }]
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn simulated_devices_run_the_real_agent_with_their_own_identities_and_faults() {
    let keys = tempfile::tempdir().unwrap();
    let bins = components::bin_dir().unwrap();
    let mut cmd = Command::new(bins.join("fleetlet-controller"));
    cmd.arg("nats-init").arg(keys.path());
    fleetlet_testenv::chart::checked("nats-init", cmd).unwrap();
    let operator = Operator::from_dir(keys.path()).unwrap();
    let env = TestEnv::builder()
        .nats_operator(&operator.config, &operator.admin_creds, false)
        .start()
        .await
        .unwrap();

    // One identity per device: an account of its own, reaching its own keys only.
    let creds_dir = keys.path().join("devices");
    std::fs::create_dir_all(&creds_dir).unwrap();
    let js = env.jetstream().await.unwrap();
    let desired = js.get_key_value("desired-state").await.unwrap();
    let sys = operator
        .system_client(env.nats.as_ref().unwrap())
        .await
        .unwrap();
    for i in 0..DEVICES {
        let d = format!("sim-{i}");
        let identity = operator.enroll(&sys, &d).await.unwrap();
        std::fs::write(creds_dir.join(format!("{d}.creds")), identity.user.creds).unwrap();
        desired.put(&d, manifest(&d).into()).await.unwrap();
    }

    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let mut sim = Command::new(bins.join("fleetlet-sim"))
        .args([
            format!("--nats-url={}", env.nats_url().unwrap()),
            format!("--devices={DEVICES}"),
            format!("--dir={}", dir.path().display()),
            format!("--creds-dir={}", creds_dir.display()),
            "--heartbeat-seconds=1".into(),
            "--offline=0.2".into(),
            "--slow=0.2".into(),
            "--slow-ms=3000".into(),
            "--failing=0.2".into(),
        ])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.path().join("sim.log")).unwrap())
        .spawn()
        .unwrap();
    let out = sim.stdout.take().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(out).read_line(&mut line).unwrap();
    let report: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(report["running"], serde_json::json!(8), "{report}");
    assert_eq!(report["offline"], serde_json::json!(2), "{report}");

    let names = |key: &str| -> Vec<String> {
        let mut v: Vec<String> = serde_json::from_value(report[key].clone()).unwrap();
        v.sort();
        v
    };
    let (slow, failing, offline) = (
        names("slowDevices"),
        names("failingDevices"),
        names("offlineDevices"),
    );
    assert_eq!(
        (slow.len(), failing.len(), offline.len()),
        (2, 2, 2),
        "{report}"
    );

    // Everyone but the offline devices reports; failing ones report the file Failed. Each
    // device's first Ready is timed when a poll first sees it.
    let first_ready = std::sync::Mutex::new(std::collections::BTreeMap::new());
    let statuses = eventually(
        "every online device reports",
        Duration::from_secs(60),
        || async {
            let mut ready = Vec::new();
            let mut failed = Vec::new();
            for i in 0..DEVICES {
                let d = format!("sim-{i}");
                let Some(s) = env.agent_status(&d).await else {
                    continue;
                };
                match s.resources.values().next() {
                    Some(ResourceStatus::Ready { .. }) => {
                        first_ready
                            .lock()
                            .unwrap()
                            .entry(d.clone())
                            .or_insert_with(|| started.elapsed());
                        ready.push(d);
                    }
                    Some(ResourceStatus::Failed { .. }) => failed.push(d),
                    _ => {}
                }
            }
            if ready.len() + failed.len() == 8 {
                Ok((ready, failed))
            } else {
                Err(format!("{} ready, {} failed", ready.len(), failed.len()))
            }
        },
    )
    .await;
    let (ready, mut failed) = statuses;
    failed.sort();
    assert_eq!(ready.len(), 6, "{ready:?}");
    assert_eq!(failed, failing, "exactly the failing devices report Failed");
    for d in &ready {
        let file = dir.path().join(d).join("root/etc/fleetlet/motd");
        assert_eq!(std::fs::read_to_string(file).unwrap(), "simulated\n");
    }
    // Every slow device applied its manifest at least 3 s after the simulator started.
    let first_ready = first_ready.into_inner().unwrap();
    for d in &slow {
        let t = first_ready[d];
        assert!(
            t >= Duration::from_secs(3),
            "{d} ready after {t:?}: {first_ready:?}"
        );
    }
    // Offline devices never connected: no status, no heartbeat.
    let heartbeats = js.get_key_value("heartbeat").await.unwrap();
    let mut silent = 0;
    for i in 0..DEVICES {
        let d = format!("sim-{i}");
        if env.agent_status(&d).await.is_none() {
            assert!(heartbeats.entry(&d).await.unwrap().is_none(), "{d}");
            silent += 1;
        }
    }
    assert_eq!(silent, 2);
    for d in &offline {
        assert!(env.agent_status(d).await.is_none(), "{d}");
    }
    let _ = sim.kill();
    let _ = sim.wait();
}
