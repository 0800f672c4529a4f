//! A real node: kubelet with containerd, runc and a CNI bridge network, registered with a
//! kube-apiserver of its own (scripts/real-node). What the chart's Pods will run on; here
//! the node itself is checked, as a user of a cluster would: it turns Ready, runs a Pod
//! from an image loaded into containerd, and answers `kubectl logs` and `kubectl exec`
//! through the apiserver. And it leaves the host as it found it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::{path::Path, process::Command, time::Duration};

use fleetlet_testenv::{eventually, real_node::RealNode};

/// The kernel settings kubelet sets on a node of its own; here they must stay the host's.
const SYSCTLS: [&str; 4] = [
    "kernel/panic",
    "kernel/panic_on_oops",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
];

fn sysctls() -> Vec<String> {
    SYSCTLS
        .iter()
        .map(|k| std::fs::read_to_string(Path::new("/proc/sys").join(k)).unwrap())
        .collect()
}

/// What the node may leave on the host: its network namespaces and cgroups.
fn leftovers() -> Vec<String> {
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let mut out: Vec<String> = String::from_utf8_lossy(&netns.stdout)
        .lines()
        .filter(|l| l.starts_with("fleetlet-node-"))
        .map(str::to_owned)
        .collect();
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        for c in std::fs::read_dir(hierarchy.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if c.file_name()
                .to_string_lossy()
                .starts_with("fleetlet-node-")
            {
                out.push(c.path().display().to_string());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_kubelet_runs_a_pod_that_kubectl_logs_and_exec_reach() {
    let before = sysctls();
    let paths_before = host_paths();
    assert_eq!(
        leftovers(),
        Vec::<String>::new(),
        "a node of an earlier run"
    );
    let mut node = RealNode::start(&[]).await.unwrap();
    let kubectl = node.kubectl();

    // The node, as kubelet registered it.
    let nodes = kubectl
        .run(
            &[
                "get",
                "node",
                "real-node",
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status} {.status.nodeInfo.containerRuntimeVersion} {.status.nodeInfo.kubeletVersion}",
            ],
            None,
        )
        .unwrap();
    let fields: Vec<&str> = nodes.split_whitespace().collect();
    assert_eq!(fields.first(), Some(&"True"), "{nodes}");
    assert!(
        fields
            .get(1)
            .is_some_and(|r| r.starts_with("containerd://")),
        "{nodes}"
    );
    assert!(
        fields.get(2).is_some_and(|v| v.starts_with("v1.")),
        "{nodes}"
    );

    // A Pod from the image loaded into containerd (nothing is pulled).
    let pod = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"hello","namespace":"default"},
      "spec":{"nodeName":"real-node","automountServiceAccountToken":false,"terminationGracePeriodSeconds":1,
        "containers":[{"name":"hello","image":"fleetlet.local/busybox:1","imagePullPolicy":"Never",
          "command":["sh","-c","echo hello from a real node; exec sleep 3600"]}]}}"#;
    let file = node.dir.path().join("pod.json");
    std::fs::write(&file, pod).unwrap();
    kubectl
        .run(&["apply", "-f", &file.display().to_string()], None)
        .unwrap();
    let ip = eventually("the Pod Running", Duration::from_secs(60), || async {
        let out = kubectl.run(
            &[
                "get",
                "pod",
                "hello",
                "-o",
                "jsonpath={.status.phase} {.status.podIP}",
            ],
            None,
        )?;
        match out.split_whitespace().collect::<Vec<_>>()[..] {
            ["Running", ip] => Ok(ip.to_owned()),
            _ => Err(out),
        }
    })
    .await;
    // On the node's Pod network, not the host's.
    assert!(ip.starts_with("10.244.0."), "{ip}");

    // The apiserver reaches the kubelet for logs and exec (with and without stdin).
    let logs = eventually("kubectl logs", Duration::from_secs(30), || async {
        let out = kubectl.run(&["logs", "hello"], None)?;
        out.contains("hello from a real node")
            .then_some(out.clone())
            .ok_or(out)
    })
    .await;
    assert_eq!(logs.trim(), "hello from a real node");
    let exec = kubectl
        .run(
            &[
                "exec",
                "hello",
                "--",
                "sh",
                "-c",
                "echo $((6 * 7)); hostname",
            ],
            None,
        )
        .unwrap();
    assert_eq!(exec.lines().collect::<Vec<_>>(), ["42", "hello"], "{exec}");
    let echoed = kubectl
        .run(
            &["exec", "-i", "hello", "--", "cat"],
            Some("through stdin\n"),
        )
        .unwrap();
    assert_eq!(echoed, "through stdin\n");

    // Deleted, the kubelet stops it and confirms: the Pod is gone.
    kubectl
        .run(
            &["delete", "pod", "hello", "--wait=true", "--timeout=60s"],
            None,
        )
        .unwrap();
    let left = kubectl.run(&["get", "pods", "-o", "name"], None).unwrap();
    assert_eq!(left.trim(), "", "{left}");

    // Stopped, it leaves the host as it found it.
    node.stop();
    assert_eq!(leftovers(), Vec::<String>::new());
    assert_eq!(sysctls(), before);
    assert_eq!(
        host_paths(),
        paths_before,
        "paths that containerd, runc and kubelet write"
    );
}

/// Whether each of the fixed paths containerd, CNI and kubelet write exists on the host.
/// (`/run/runc` is podman's too: the podman tests' sandboxes may still be removing their
/// containers when this test starts.)
fn host_paths() -> Vec<(&'static str, bool)> {
    [
        "/run/containerd",
        "/var/lib/kubelet",
        "/var/lib/cni/results",
    ]
    .into_iter()
    .map(|p| (p, Path::new(p).exists()))
    .collect()
}
