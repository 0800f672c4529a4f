//! Every example in `examples/` is applied with `kubectl apply -f` to a real control plane
//! (through `fleetlet-dev`, which runs the controller, the bridge and one agent per device
//! with podman and systemd sandboxes) and checked on the devices. `examples/manifest.yaml`
//! and `examples/pod.yaml` are the demo's, checked in tests/demo.rs; the GitOps snippets in
//! tests/gitops.rs and tests/helm.rs; the agent's unit and config in the agent's tests.
//! `examples/agent-upgrade.yaml` names binaries no server here has: it is applied to a real
//! apiserver and checked as a device checks it before downloading (the upgrade itself is
//! edge-agent/tests/upgrade.rs).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::process::Command;

use fleetlet_testenv::repo_root;

fn line<'a>(stdout: &'a str, prefix: &str) -> &'a str {
    stdout
        .lines()
        .rev()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_default()
}

#[test]
fn container_systemd_file_canary_and_network_examples_converge_on_the_devices() {
    let state = tempfile::tempdir().unwrap();
    let ex = repo_root().join("examples");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fleetlet-dev"));
    cmd.args(["up", "--exit", "--state-dir"]).arg(state.path());
    for f in [
        "devices.yaml",
        "container.yaml",
        "systemd-and-file.yaml",
        "canary.yaml",
        "network.yaml",
    ] {
        cmd.arg("--apply").arg(ex.join(f));
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fleetlet-dev failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Each manifest rolled out to every device it selects.
    for m in [
        "gateway-status-page",
        "home-heartbeat",
        "sensor-firmware-stable",
        "sensor-firmware-canary",
        "gateway-lan",
    ] {
        let l = line(&stdout, &format!("edgemanifest.fleetlet.dev/{m} "));
        assert!(l.contains("RolloutComplete"), "{m}: {l}\n{stdout}");
    }
    // What each agent reports, resource by resource.
    let garage = line(&stdout, "pi-garage ");
    for r in [
        "status-page=Ready",
        "status-page-html=Ready",
        "heartbeat-config=Ready",
        "heartbeat-service=Ready",
        // Ready only once networkd reports the address on the gateway's eth0.
        "lan=Ready",
    ] {
        assert!(garage.contains(r), "pi-garage lacks {r}: {stdout}");
    }
    let kitchen = line(&stdout, "pi-kitchen ");
    for r in ["heartbeat-service=Ready", "firmware-version=Ready"] {
        assert!(kitchen.contains(r), "pi-kitchen lacks {r}: {stdout}");
    }
    let office = line(&stdout, "pi-office ");
    assert!(office.contains("firmware-version=Ready"), "{stdout}");
    assert!(
        !office.contains("heartbeat"),
        "pi-office is not at home: {stdout}"
    );
    assert!(
        !office.contains("lan=") && !kitchen.contains("lan="),
        "only the gateway gets the network example: {stdout}"
    );

    // The canary device runs v2, the other sensor v1.
    let firmware = |device: &str| {
        std::fs::read_to_string(state.path().join(format!(
            "agents/{device}/root/opt/fleetlet/sensor/firmware-version"
        )))
        .unwrap()
    };
    assert_eq!(firmware("pi-office"), "v2\n");
    assert_eq!(firmware("pi-kitchen"), "v1\n");
    let page = state
        .path()
        .join("agents/pi-garage/root/opt/fleetlet/status-page/index.html");
    assert_eq!(
        std::fs::read_to_string(page).unwrap(),
        "<h1>gateway up</h1>\n"
    );
}

/// examples/agent-upgrade.yaml as a user applies it: the apiserver takes it, and every
/// resource passes the checks the agent makes before it downloads anything (the signature
/// is the example's, so a device would refuse it as not made by its key).
#[tokio::test]
async fn the_agent_upgrade_example_is_accepted_and_well_formed() {
    let env = fleetlet_testenv::TestEnv::builder()
        .kube()
        .start()
        .await
        .unwrap();
    let out = env
        .kubectl()
        .unwrap()
        .args(["apply", "-n", "default", "-f"])
        .arg(repo_root().join("examples/agent-upgrade.yaml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "kubectl apply: {out:?}");
    let api: kube::Api<fleetlet_crds::EdgeManifest> =
        kube::Api::namespaced(env.kube_client().await.unwrap(), "default");
    let m = api.get("agent-0.2.0-canary").await.unwrap();
    assert_eq!(m.spec.resources.len(), 1);
    for r in &m.spec.resources {
        let fleetlet_crds::ResourceSpec::AgentUpgrade(u) = &r.spec else {
            panic!("{:?}", r.spec);
        };
        u.validate().unwrap();
        assert_eq!(u.binaries.len(), 2);
    }
}
