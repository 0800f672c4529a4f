//! The edge agent runs on a Pi Zero: it must never link the Kubernetes client stack.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::process::Command;

use fleetlet_testenv::repo_root;

#[test]
fn edge_agent_does_not_depend_on_kube_or_k8s_openapi() {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "-p",
            "fleetlet-agent",
            "-e",
            "normal,build",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .current_dir(repo_root())
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(
        tree.contains("fleetlet-protocol"),
        "unexpected tree:\n{tree}"
    );
    let forbidden: Vec<&str> = tree
        .lines()
        .filter(|l| {
            let name = l.split_whitespace().next().unwrap_or("");
            name == "kube" || name.starts_with("kube-") || name == "k8s-openapi"
        })
        .collect();
    assert!(
        forbidden.is_empty(),
        "fleetlet-agent pulls in {forbidden:?}"
    );
}
