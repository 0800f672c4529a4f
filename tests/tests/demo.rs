//! The README's first command keeps working: the demo brings the fleet up and shows it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::{path::Path, process::Command};

/// The shell blocks of a Markdown document marked runnable (an HTML comment starting
/// `<!-- runnable` on the line before the fence).
fn runnable_blocks(doc: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(doc).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut blocks = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if !line.trim_start().starts_with("<!-- runnable") {
            continue;
        }
        let fence = lines.get(i + 1).copied().unwrap_or_default();
        assert_eq!(
            fence.trim(),
            "```sh",
            "{}:{}: a runnable marker must precede a sh block",
            doc.display(),
            i + 1
        );
        let body: Vec<&str> = lines[i + 2..]
            .iter()
            .take_while(|l| l.trim() != "```")
            .copied()
            .collect();
        blocks.push(body.join("\n") + "\n");
    }
    blocks
}

#[test]
fn demo_brings_up_the_control_plane_and_shows_the_example_fleet() {
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
