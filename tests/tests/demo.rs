//! The README's first command keeps working: the demo brings the fleet up and shows it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::process::Command;

#[test]
fn demo_brings_up_the_control_plane_and_shows_the_example_fleet() {
    let state = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fleetlet-dev"))
        .args(["up", "--exit", "--state-dir"])
        .arg(state.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for device in ["pi-kitchen", "pi-garage", "pi-office"] {
        assert!(
            stdout.contains(&format!("edgedevice.fleetlet.dev/{device}")),
            "{stdout}"
        );
    }
    for manifest in ["sensor-stack", "garage-motd"] {
        assert!(
            stdout.contains(&format!("edgemanifest.fleetlet.dev/{manifest}")),
            "{stdout}"
        );
    }
    // The bridge shows every device as a Ready node, and its EdgeDevice as Ready.
    for device in ["pi-kitchen", "pi-garage", "pi-office"] {
        let node = stdout
            .lines()
            .find(|l| l.starts_with(&format!("{device} ")))
            .unwrap_or_default();
        assert!(
            node.contains(" Ready ") && node.contains("edge"),
            "{device} node: {stdout}"
        );
        // The table's line, not `kubectl apply`'s "... created".
        let edev = stdout
            .lines()
            .rev()
            .find(|l| l.starts_with(&format!("edgedevice.fleetlet.dev/{device} ")))
            .unwrap_or_default();
        assert!(
            edev.contains("True"),
            "{device} EdgeDevice not Ready: {stdout}"
        );
    }
    // The controller delivered the manifests and the agents applied them.
    let garage = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with("pi-garage "))
        .unwrap_or_default();
    assert!(garage.contains("motd=Ready"), "{stdout}");
    // The example Pod runs on pi-kitchen through the kubelet facade.
    let pod = stdout
        .lines()
        .find(|l| l.starts_with("hello-edge "))
        .unwrap_or_default();
    assert!(
        pod.contains("Running") && pod.contains("pi-kitchen"),
        "{stdout}"
    );
    // The example's container and systemd unit really run (podman and systemd sandboxes).
    for device in ["pi-kitchen", "pi-office"] {
        let line = stdout
            .lines()
            .rev()
            .find(|l| l.starts_with(&format!("{device} ")))
            .unwrap_or_default();
        assert!(
            line.contains("collector=Ready") && line.contains("sensor-reader=Ready"),
            "{device}: {stdout}"
        );
    }
    let kitchen = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with("pi-kitchen "))
        .unwrap_or_default();
    assert!(kitchen.contains("sensor-config=Ready"), "{stdout}");
    let motd = state
        .path()
        .join("agents/pi-garage/root/etc/fleetlet-demo/motd");
    assert_eq!(
        std::fs::read_to_string(&motd).unwrap(),
        "Managed by fleetlet. Edits here are reverted.\n"
    );
    assert!(
        !state
            .path()
            .join("agents/pi-kitchen/root/etc/fleetlet-demo/motd")
            .exists(),
        "pi-kitchen is not selected by garage-motd"
    );
    let env_file = std::fs::read_to_string(state.path().join("env")).unwrap();
    assert!(env_file.contains("KUBECONFIG=") && env_file.contains("NATS_URL=nats://127.0.0.1:"));
    // The demo changes sensor-stack and shows the rollout reach both sensors.
    assert!(stdout.contains("rollout complete"), "{stdout}");
    for device in ["pi-kitchen", "pi-office"] {
        assert!(
            stdout.contains(&format!("{device}: sensor.toml says interval_seconds = 30")),
            "{stdout}"
        );
    }
}
