//! Dependency rules the code must keep: the edge agent runs on a Pi Zero and never links the
//! Kubernetes client stack, and the control plane crates share plumbing, not each other.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::process::Command;

use fleetlet_testenv::repo_root;

/// `cargo tree` of `package`: one `name version` line per crate (normal and build deps).
fn tree(package: &str) -> String {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "-p",
            package,
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
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn edge_agent_does_not_depend_on_kube_or_k8s_openapi() {
    let tree = tree("fleetlet-agent");
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

/// The workspace's crates that `package` depends on (normal and build dependencies).
fn fleetlet_dependencies(package: &str) -> Vec<String> {
    let mut names: Vec<String> = tree(package)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("fleetlet-") && *n != package)
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The control plane's graph: protocol ← crds ← plumbing ← {controller, bridge}; neither
/// the controller nor the bridge uses the other (docs/architecture.md).
#[test]
fn controller_and_bridge_share_plumbing_not_each_other() {
    assert_eq!(
        fleetlet_dependencies("fleetlet-protocol"),
        Vec::<String>::new()
    );
    assert_eq!(
        fleetlet_dependencies("fleetlet-crds"),
        ["fleetlet-protocol"]
    );
    assert_eq!(
        fleetlet_dependencies("fleetlet-plumbing"),
        ["fleetlet-crds", "fleetlet-protocol"]
    );
    // The SPDY framing stands alone; only the bridge (its kubelet API) uses it.
    assert_eq!(fleetlet_dependencies("fleetlet-spdy"), Vec::<String>::new());
    for (package, other, own) in [
        ("fleetlet-controller", "fleetlet-bridge", None),
        (
            "fleetlet-bridge",
            "fleetlet-controller",
            Some("fleetlet-spdy"),
        ),
    ] {
        let deps = fleetlet_dependencies(package);
        let mut expected = vec!["fleetlet-crds", "fleetlet-plumbing", "fleetlet-protocol"];
        expected.extend(own);
        expected.sort();
        assert_eq!(deps, expected, "{package} depends on {deps:?}, not {other}");
    }
    assert_eq!(
        fleetlet_dependencies("fleetlet-agent"),
        ["fleetlet-protocol"]
    );
}
