//! The README's first command keeps working: the demo brings the fleet up and shows it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::{path::Path, process::Command};

/// The shell blocks of a Markdown document marked runnable (an HTML comment starting
/// `<!-- runnable` on the line before the fence).
fn runnable_blocks(doc: &Path) -> Vec<String> {
    fleetlet_testenv::docs::marked_blocks(doc, "<!-- runnable")
        .into_iter()
        .map(|(_, block)| block)
        .collect()
}

/// One demo at a time: each runs a whole control plane, and the convergence checks have
/// deadlines.
static ONE_DEMO: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn demo_brings_up_the_control_plane_and_shows_the_example_fleet() {
    let _one = ONE_DEMO
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // The guides' runnable blocks run against the demo as a reader would run them, from
    // the directory holding `.fleetlet-dev`; so do the "what to try next" lines it prints.
    let work = tempfile::tempdir().unwrap();
    let state = work.path().join(".fleetlet-dev");
    std::fs::create_dir(&state).unwrap();
    let state = state.as_path();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut scripts = Vec::new();
    for doc in ["docs/getting-started.md", "README.md"] {
        let blocks = runnable_blocks(&root.join(doc));
        assert!(!blocks.is_empty(), "{doc} has no runnable block");
        for (i, block) in blocks.iter().enumerate() {
            let file = work
                .path()
                .join(format!("{}-{i}.sh", doc.replace('/', "-")));
            std::fs::write(&file, block).unwrap();
            scripts.push(file);
        }
    }
    let mut demo = Command::new(env!("CARGO_BIN_EXE_fleetlet-dev"));
    demo.args(["up", "--exit", "--check-try-next", "--state-dir"])
        .arg(state);
    for s in &scripts {
        demo.arg("--then").arg(s);
    }
    let out = demo.output().unwrap();
    let all = String::from_utf8_lossy(&out.stdout);
    // What the demo shows, before the scripts that run after it (they change the fleet).
    let stdout = all.split("$ bash -e ").next().unwrap_or_default();
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
    // Every runnable block and the printed "what to try next" ran (and passed: a failing
    // one fails the demo).
    for s in &scripts {
        assert!(
            all.contains(&format!("$ bash -e {}", s.display())),
            "{} did not run: {all}",
            s.display()
        );
    }
    assert!(all.contains("try-next.sh"), "{all}");
    // The guide's block printed the file the agent wrote (before editing it by hand), and
    // the Pod answered `kubectl exec`.
    assert!(
        all.contains("Managed by fleetlet. Edits here are reverted."),
        "{all}"
    );
    assert!(
        all.contains(&format!("{} GNU/Linux", std::env::consts::ARCH)),
        "{all}"
    );
    assert!(
        !state
            .join("agents/pi-kitchen/root/etc/fleetlet-demo/motd")
            .exists(),
        "pi-kitchen is not selected by garage-motd"
    );
    let env_file = std::fs::read_to_string(state.join("env")).unwrap();
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

/// A fleet that cannot converge: one manifest writes a file outside the roots the demo
/// agents allow (`/etc/fleetlet-demo`, `/opt/fleetlet`), which its agent refuses, while
/// another manifest on another device is fine.
const STUCK_FLEET: &str = "\
apiVersion: fleetlet.dev/v1alpha1
kind: EdgeDevice
metadata: { name: pi-stuck }
---
apiVersion: fleetlet.dev/v1alpha1
kind: EdgeDevice
metadata: { name: pi-fine }
---
apiVersion: fleetlet.dev/v1alpha1
kind: EdgeManifest
metadata: { name: outside-roots }
spec:
  devices: [pi-stuck]
  resources:
    - id: conf
      file: { path: /etc/outside-the-demo-roots.conf, content: { text: \"x = 1\\n\" } }
---
apiVersion: fleetlet.dev/v1alpha1
kind: EdgeManifest
metadata: { name: fine-motd }
spec:
  devices: [pi-fine]
  resources:
    - id: motd
      file: { path: /etc/fleetlet-demo/motd, content: { text: \"fine\\n\" } }
";

#[test]
fn demo_exit_fails_and_names_what_did_not_converge() {
    let _one = ONE_DEMO
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let work = tempfile::tempdir().unwrap();
    let state = work.path().join(".fleetlet-dev");
    let fleet = work.path().join("stuck-fleet.yaml");
    std::fs::write(&fleet, STUCK_FLEET).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fleetlet-dev"))
        .args(["up", "--exit", "--state-dir"])
        .arg(&state)
        .arg("--apply")
        .arg(&fleet)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let both = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        !out.status.success(),
        "the demo exited 0 with a fleet that cannot converge:\n{both}"
    );
    assert_ne!(out.status.code(), None, "killed by a signal:\n{both}");
    // The fleet really ran: the healthy device got its file, so the failure is the
    // convergence check's, not a start-up error.
    assert_eq!(
        std::fs::read_to_string(state.join("agents/pi-fine/root/etc/fleetlet-demo/motd"))
            .unwrap_or_default(),
        "fine\n",
        "{both}"
    );
    // The error names the manifest, the device and the resource that did not converge (from
    // the manifest's condition), and nothing else.
    let error = stderr
        .lines()
        .find(|l| l.starts_with("fleetlet-dev: "))
        .unwrap_or_default();
    assert!(error.contains("did not converge"), "{both}");
    assert!(error.contains("edgemanifest outside-roots:"), "{both}");
    assert!(error.contains("edgedevice pi-stuck:"), "{both}");
    assert!(error.contains("pi-stuck/conf"), "{both}");
    assert!(
        !error.contains("fine-motd") && !error.contains("pi-fine"),
        "{both}"
    );
    // It stops before showing the fleet as if it were up.
    assert!(!stdout.contains("KUBECONFIG="), "{both}");
}
