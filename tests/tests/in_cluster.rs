//! The control plane installed the way a user installs it, and run where a user runs it:
//! `scripts/release` pushes the images and the chart to an OCI registry, `helm install
//! oci://...` installs them into a cluster whose node is a real kubelet with containerd
//! (`scripts/real-node`), and the controller and bridge run there as Pods, two replicas
//! each, with their in-cluster ServiceAccount tokens. Devices are agents on this machine.
//! Then what an operator does to it: kill the leaders, upgrade, uninstall, install again.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::{
    collections::BTreeMap,
    path::Path,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use fleetlet_testenv::{
    TestEnv,
    chart::{checked, helm_command},
    components, eventually,
    pods::podman_agent_config,
    real_node::{Kubectl, NODE_IP, RealNode},
    release, repo_root,
    sandbox::PodmanSandbox,
    wait,
};
use serde_json::Value;

const NS: &str = "fleetlet-system";
/// The devices of examples/devices.yaml.
const DEVICES: [&str; 3] = ["pi-garage", "pi-kitchen", "pi-office"];
/// The device whose agent runs containers (with podman): examples/pod.yaml's Pod goes there.
const POD_DEVICE: &str = "pi-kitchen";

/// The blocks of docs/getting-started.md this test runs, in order: the install from the
/// registry and the example devices; the manifest signing key's `[trust.manifest_keys]`
/// line; the example Pod, its logs and an exec.
fn guide_blocks() -> Vec<String> {
    let blocks: Vec<String> = fleetlet_testenv::docs::marked_blocks(
        &repo_root().join("docs/getting-started.md"),
        "<!-- in-cluster:",
    )
    .into_iter()
    .map(|(_, block)| block)
    .collect();
    assert_eq!(blocks.len(), 3, "{blocks:#?}");
    blocks
}

/// Runs a guide's block with bash (`-euo pipefail`) from the checkout, as a reader would,
/// with `helm` (on PATH, its state under the test's directory), the cluster's kubeconfig
/// and `vars`; returns what it printed.
fn run_block(block: &str, helm: &Command, kubeconfig: &Path, vars: &[(&str, &str)]) -> String {
    let mut cmd = Command::new("bash");
    cmd.args(["-euo", "pipefail", "-c", block])
        .current_dir(repo_root())
        .env("KUBECONFIG", kubeconfig)
        .envs(vars.iter().copied());
    for (k, v) in helm.get_envs() {
        if let Some(v) = v {
            cmd.env(k, v);
        }
    }
    let helm_dir = Path::new(helm.get_program()).parent().unwrap();
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![helm_dir.to_path_buf()];
    dirs.extend(std::env::split_paths(&path));
    cmd.env("PATH", std::env::join_paths(dirs).unwrap());
    let out = checked(&format!("the guide's block\n{block}"), cmd).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("$ {}{text}", block.replace('\n', "\n$ "));
    text
}

/// SIGKILLs the fleetlet process of Pod `pod` (found by the Pod's cgroup), so it cannot
/// hand its Lease over, then deletes the Pod at once so it does not come back under the
/// same name.
fn kill_pod(kubectl: &Kubectl, pod: &str) {
    let uid = kubectl
        .run(
            &[
                "get",
                "pod",
                pod,
                "-n",
                NS,
                "-o",
                "jsonpath={.metadata.uid}",
            ],
            None,
        )
        .unwrap();
    let mut killed = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cgroup = std::fs::read_to_string(entry.path().join("cgroup")).unwrap_or_default();
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if cgroup.contains(&format!("pod{uid}")) && comm.starts_with("fleetlet-") {
            let status = Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status()
                .unwrap();
            assert!(status.success());
            killed += 1;
        }
    }
    assert_eq!(killed, 1, "the process of Pod {pod} ({uid})");
    kubectl
        .run(
            &[
                "delete",
                "pod",
                pod,
                "-n",
                NS,
                "--grace-period=0",
                "--force",
                "--wait=false",
            ],
            None,
        )
        .unwrap();
}

fn json(kubectl: &Kubectl, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    serde_json::from_str(&kubectl.run(&all, None).unwrap()).unwrap()
}

/// The chart's Pods: name → (image, Running and Ready).
fn chart_pods(kubectl: &Kubectl) -> BTreeMap<String, (String, bool)> {
    let list = json(
        kubectl,
        &[
            "get",
            "pods",
            "-n",
            NS,
            "-l",
            "app.kubernetes.io/instance=fleetlet",
        ],
    );
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .map(|p| {
            let ready = p["status"]["phase"] == "Running"
                && p["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True");
            (
                p["metadata"]["name"].as_str().unwrap().to_owned(),
                (
                    p["spec"]["containers"][0]["image"]
                        .as_str()
                        .unwrap()
                        .to_owned(),
                    ready,
                ),
            )
        })
        .collect()
}

/// Waits until the chart runs `replicas` Ready Pods of each component, all of `image_tag`,
/// and no others; returns their names.
async fn wait_chart_pods(kubectl: &Kubectl, image_tag: &str, node: &RealNode) -> Vec<String> {
    let tag = format!(":{image_tag}");
    let got = tokio::time::timeout(Duration::from_secs(240), async {
        loop {
            let pods = chart_pods(kubectl);
            let ready = pods
                .values()
                .filter(|(image, ready)| *ready && image.ends_with(&tag))
                .count();
            if ready == 4 && pods.len() == 4 {
                return pods.into_keys().collect::<Vec<_>>();
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
    .await;
    got.unwrap_or_else(|_| {
        panic!(
            "the chart's Pods were not all Ready on {image_tag}: {:?}\n{}\nkubelet:\n{}",
            chart_pods(kubectl),
            kubectl
                .run(&["describe", "pods", "-n", NS], None)
                .unwrap_or_else(|e| e),
            node.log_tail("kubelet.log", 30)
        )
    })
}

/// A field of the leader-election Lease `name` in the release namespace (`holderIdentity`,
/// `leaseDurationSeconds`).
fn lease_field(kubectl: &Kubectl, name: &str, field: &str) -> Result<String, String> {
    let path = format!("jsonpath={{.spec.{field}}}");
    kubectl.run(&["get", "lease", name, "-n", NS, "-o", &path], None)
}

/// The holder of the leader-election Lease `name`, if any.
fn holder(kubectl: &Kubectl, name: &str) -> Option<String> {
    lease_field(kubectl, name, "holderIdentity")
        .ok()
        .filter(|h| !h.is_empty())
}

/// Waits until one of `pods` holds the `component`'s leader-election Lease; returns it.
async fn leader(kubectl: &Kubectl, component: &str, pods: &[String]) -> String {
    let name = format!("fleetlet-{component}");
    eventually(
        &format!("a {component} Pod of {pods:?} holding {name}"),
        Duration::from_secs(60),
        || async {
            match holder(kubectl, &name) {
                Some(h) if pods.contains(&h) => Ok(h),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await
}

fn lease_seconds(kubectl: &Kubectl, name: &str) -> u64 {
    lease_field(kubectl, name, "leaseDurationSeconds")
        .unwrap()
        .parse()
        .unwrap()
}

/// Each device's desired-state entry: (KV revision, manifest generation). A revision that
/// does not move means nothing rewrote the device's manifest.
async fn desired(env: &TestEnv) -> BTreeMap<String, (u64, u64)> {
    let kv = env
        .jetstream()
        .await
        .unwrap()
        .get_key_value(fleetlet_protocol::kv::DESIRED_STATE.name)
        .await
        .unwrap();
    let mut out = BTreeMap::new();
    for device in DEVICES {
        let entry = kv.entry(device).await.unwrap().unwrap();
        let generation = env
            .desired_manifest(device)
            .await
            .unwrap()
            .unwrap()
            .generation;
        out.insert(device.to_owned(), (entry.revision, generation));
    }
    out
}

/// Watches the device Nodes' Ready condition every 250 ms until stopped; what it saw that
/// was not `True` (node and status).
struct NodeWatch {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl NodeWatch {
    fn start(kubeconfig: &Path) -> Self {
        let kubectl = Kubectl(kubeconfig.to_path_buf());
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (s, n) = (stop.clone(), seen.clone());
        let task = tokio::task::spawn_blocking(move || {
            while !s.load(Ordering::Relaxed) {
                let out = kubectl.run(
                    &[
                        "get",
                        "nodes",
                        "-l",
                        "fleetlet.dev/device",
                        "-o",
                        "jsonpath={range .items[*]}{.metadata.name}={.status.conditions[?(@.type==\"Ready\")].status} {end}",
                    ],
                    None,
                );
                match out {
                    Ok(text) => {
                        let found = text.split_whitespace().count();
                        for pair in text.split_whitespace() {
                            if !pair.ends_with("=True") {
                                n.lock().unwrap().push(pair.to_owned());
                            }
                        }
                        if found != DEVICES.len() {
                            n.lock()
                                .unwrap()
                                .push(format!("{found} device nodes: {text}"));
                        }
                    }
                    // The apiserver is up throughout; a failed read is worth seeing too.
                    Err(e) => n.lock().unwrap().push(e),
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        });
        Self { stop, seen, task }
    }

    async fn finish(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        self.seen.lock().unwrap().clone()
    }
}

fn greeting_manifest(text: &str) -> String {
    format!(
        r#"apiVersion: fleetlet.dev/v1alpha1
kind: EdgeManifest
metadata: {{ name: greeting, namespace: default }}
spec:
  devices: [pi-garage, pi-kitchen, pi-office]
  resources:
    - id: greeting
      file: {{ path: /opt/fleetlet/greeting, content: {{ text: "{text}\n" }} }}
"#
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_chart_from_a_registry_runs_on_a_real_node_hands_over_upgrades_and_reinstalls() {
    let blocks = guide_blocks();
    let dist = release::dist_check().unwrap();
    let pm = PodmanSandbox::start().await.unwrap();
    let env = TestEnv::builder().nats().start().await.unwrap();
    let nats_url = env.nats_url().unwrap().to_owned();
    let nats_port = nats_url.rsplit(':').next().unwrap().to_owned();
    let work = tempfile::tempdir().unwrap();
    let helm_home = work.path().join("helm");

    // Two releases in the registry, as `scripts/release` makes them.
    let registry = format!("{}/fleetlet", pm.registry);
    for version in ["0.1.0", "0.1.1"] {
        release::release(
            &registry,
            version,
            dist,
            &work.path().join(version),
            &helm_home,
            &pm.cli_env,
        )
        .unwrap();
    }

    // A cluster with one real node that pulls from that registry and reaches NATS at the
    // node's address.
    let mut node = RealNode::start(&[
        ("FLEETLET_REAL_NODE_FORWARD", nats_port.clone()),
        ("FLEETLET_REAL_NODE_REGISTRY", pm.registry.clone()),
    ])
    .await
    .unwrap();
    let kubectl = node.kubectl();
    let helm = |args: &[&str]| {
        let mut cmd: Command = helm_command(&helm_home).unwrap();
        cmd.env("KUBECONFIG", &node.kubeconfig).args(args);
        cmd
    };
    let chart = format!("oci://{registry}/charts/fleetlet");
    let nats_in_cluster_url = format!("nats://{NODE_IP}:{nats_port}");
    let nats_in_cluster = format!("nats.url={nats_in_cluster_url}");
    let install = |version: &str| {
        helm(&[
            "install",
            "fleetlet",
            &chart,
            "--version",
            version,
            "--plain-http",
            "-n",
            NS,
            "--create-namespace",
            "--set",
            &nats_in_cluster,
            "--set",
            "controller.replicas=2",
            "--set",
            "bridge.replicas=2",
        ])
    };

    // The guide's install from the registry: both Deployments' Pods Running and Ready
    // (probes passing, read-only root, non-root user), one leader each, and that leader is
    // a Pod. The example devices are created.
    let vars = [
        ("REGISTRY", registry.as_str()),
        ("VERSION", "0.1.0"),
        ("PLAIN_HTTP", "--plain-http"),
        ("NATS_URL", nats_in_cluster_url.as_str()),
    ];
    let helm_env = helm(&[]);
    let started = Instant::now();
    run_block(&blocks[0], &helm_env, &node.kubeconfig, &vars);
    let pods = wait_chart_pods(&kubectl, "0.1.0", &node).await;
    println!(
        "helm install -> 4 Pods Ready: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let controller_leader = leader(&kubectl, "controller", &pods).await;
    let bridge_leader = leader(&kubectl, "bridge", &pods).await;
    for pod in [&controller_leader, &bridge_leader] {
        let p = json(&kubectl, &["get", "pod", pod, "-n", NS]);
        assert_eq!(p["spec"]["nodeName"], "real-node", "{p}");
        assert!(
            p["status"]["podIP"]
                .as_str()
                .is_some_and(|ip| ip.starts_with("10.244.0.")),
            "{p}"
        );
    }

    // Three devices: agents on this machine that trust the key the in-cluster controller
    // made, as the guide's command prints it; pi-kitchen runs containers.
    let client = fleetlet_testenv::kube::client_for(&node.kubeconfig)
        .await
        .unwrap();
    let trust = components::manifest_trust_in(client.clone(), NS, "fleetlet-manifest-signing")
        .await
        .unwrap();
    let printed = run_block(&blocks[1], &helm_env, &node.kubeconfig, &vars);
    assert_eq!(format!("[trust.manifest_keys]\n{printed}"), trust);
    let trust = format!("[trust.manifest_keys]\n{printed}");
    let bins = components::bin_dir().unwrap();
    let mut agents = Vec::new();
    for device in DEVICES {
        let dir = work.path().join(device);
        std::fs::create_dir_all(&dir).unwrap();
        let config = if device == POD_DEVICE {
            podman_agent_config(&nats_url, &dir, device, &pm, &trust)
        } else {
            components::file_agent_config(&nats_url, &dir, device, "/opt/fleetlet", "", &trust)
        };
        agents.push(components::start_agent(&bins, &dir, &config).unwrap());
    }
    let greeting = |device: &str| work.path().join(device).join("root/opt/fleetlet/greeting");
    kubectl
        .run(
            &["apply", "-f", "-"],
            Some(&greeting_manifest("hello from the cluster")),
        )
        .unwrap();
    for device in DEVICES {
        wait::file_content(
            &greeting(device),
            "hello from the cluster\n",
            Duration::from_secs(60),
        )
        .await;
    }
    // The guide's Pod on pi-kitchen (examples/pod.yaml, whose image is the demo's local
    // one: here the registry's busybox under that name), its logs and an exec: apiserver ->
    // the bridge leader's Pod address -> NATS -> the agent -> podman.
    pm.podman(&["pull", "-q", "--tls-verify=false", &pm.image_1])
        .unwrap();
    pm.podman(&["tag", &pm.image_1, "localhost/fleetlet-demo/busybox:latest"])
        .unwrap();
    let shown = run_block(&blocks[2], &helm_env, &node.kubeconfig, &vars);
    assert!(shown.contains("hello from the kitchen #1"), "{shown}");
    assert!(shown.contains("Linux"), "uname -a: {shown}");
    let logs_and_exec = || async {
        eventually(
            "kubectl logs through the in-cluster bridge",
            Duration::from_secs(90),
            || async {
                let out = kubectl.run(&["logs", "hello-edge"], None)?;
                out.contains("hello from the kitchen")
                    .then_some(())
                    .ok_or(out)
            },
        )
        .await;
        let exec = eventually(
            "kubectl exec through the in-cluster bridge",
            Duration::from_secs(30),
            || async {
                kubectl.run(
                    &["exec", "hello-edge", "--", "sh", "-c", "echo $((6 * 7))"],
                    None,
                )
            },
        )
        .await;
        assert_eq!(exec.trim(), "42");
    };
    logs_and_exec().await;
    let kubelet_endpoint = || {
        kubectl
            .run(
                &[
                    "get",
                    "node",
                    POD_DEVICE,
                    "-o",
                    "jsonpath={.status.addresses[?(@.type==\"InternalIP\")].address}",
                ],
                None,
            )
            .unwrap()
    };
    let bridge_ip = kubectl
        .run(
            &[
                "get",
                "pod",
                &bridge_leader,
                "-n",
                NS,
                "-o",
                "jsonpath={.status.podIP}",
            ],
            None,
        )
        .unwrap();
    assert_eq!(
        kubelet_endpoint(),
        bridge_ip,
        "the node's kubelet is the bridge Pod"
    );

    // Kill both leaders: SIGKILL, so neither hands its Lease over, and their Pods deleted.
    // The standbys take over within the Lease duration, and a manifest change made
    // meanwhile reaches every device.
    let before = desired(&env).await;
    let killed = Instant::now();
    kill_pod(&kubectl, &controller_leader);
    kill_pod(&kubectl, &bridge_leader);
    kubectl
        .run(
            &["apply", "-f", "-"],
            Some(&greeting_manifest("changed during the hand-over")),
        )
        .unwrap();
    for (component, old) in [
        ("controller", &controller_leader),
        ("bridge", &bridge_leader),
    ] {
        let name = format!("fleetlet-{component}");
        let duration = lease_seconds(&kubectl, &name);
        let new = eventually(
            &format!("a new {component} leader"),
            // The Lease runs out at most `duration` after the kill; a standby tries every
            // 2 s; the rest is slack for a busy machine.
            Duration::from_secs(duration + 8),
            || async {
                match holder(&kubectl, &name) {
                    Some(h) if &h != old => Ok(h),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await;
        println!(
            "{component}: {old} killed, {new} leads after {:.1} s (Lease duration {duration} s)",
            killed.elapsed().as_secs_f64()
        );
    }
    for device in DEVICES {
        wait::file_content(
            &greeting(device),
            "changed during the hand-over\n",
            Duration::from_secs(60),
        )
        .await;
    }
    println!(
        "kill -> change on all three devices: {:.1} s",
        killed.elapsed().as_secs_f64()
    );
    let after = desired(&env).await;
    for device in DEVICES {
        assert!(
            after[device].1 > before[device].1,
            "{device}: the change is a new generation: {before:?} -> {after:?}"
        );
    }
    wait_chart_pods(&kubectl, "0.1.0", &node).await;
    // The new bridge leader serves the device's kubelet API.
    eventually(
        "the node's kubelet address on the new bridge leader",
        Duration::from_secs(60),
        || async {
            let leader = holder(&kubectl, "fleetlet-bridge").unwrap_or_default();
            let ip = kubectl.run(
                &[
                    "get",
                    "pod",
                    &leader,
                    "-n",
                    NS,
                    "-o",
                    "jsonpath={.status.podIP}",
                ],
                None,
            )?;
            (kubelet_endpoint() == ip).then_some(()).ok_or(ip)
        },
    )
    .await;
    logs_and_exec().await;

    // helm upgrade to a new image tag: both Deployments roll, no device's manifest is
    // rewritten (its desired-state entry keeps its revision) and no device node leaves Ready.
    let before = desired(&env).await;
    let watch = NodeWatch::start(&node.kubeconfig);
    let started = Instant::now();
    checked(
        "helm upgrade",
        helm(&[
            "upgrade",
            "fleetlet",
            &chart,
            "--version",
            "0.1.1",
            "--plain-http",
            "-n",
            NS,
            "--reuse-values",
        ]),
    )
    .unwrap();
    let new_pods = wait_chart_pods(&kubectl, "0.1.1", &node).await;
    println!(
        "helm upgrade -> 4 new Pods Ready: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    for component in ["controller", "bridge"] {
        leader(&kubectl, component, &new_pods).await;
    }
    // A full resync of the new leaders (they rebuild their view and compare) before looking.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let flaps = watch.finish().await;
    assert_eq!(
        flaps,
        Vec::<String>::new(),
        "device nodes during the upgrade"
    );
    assert_eq!(
        desired(&env).await,
        before,
        "manifests rewritten by the upgrade"
    );
    for device in DEVICES {
        assert_eq!(
            std::fs::read_to_string(greeting(device)).unwrap(),
            "changed during the hand-over\n"
        );
    }
    logs_and_exec().await;

    // helm uninstall: workloads and RBAC go; the CRDs and every user object stay.
    checked(
        "helm uninstall",
        helm(&["uninstall", "fleetlet", "-n", NS, "--wait"]),
    )
    .unwrap();
    // helm waits for the Deployments to go; their Pods are then removed by the garbage
    // collector and stop within their grace period.
    eventually(
        "the chart's Deployments and Pods gone",
        Duration::from_secs(90),
        || async {
            let left = kubectl.run(
                &[
                    "get",
                    "deployments,pods",
                    "-n",
                    NS,
                    "-l",
                    "app.kubernetes.io/instance=fleetlet",
                    "-o",
                    "name",
                ],
                None,
            )?;
            left.trim().is_empty().then_some(()).ok_or(left)
        },
    )
    .await;
    for role in ["fleetlet-controller", "fleetlet-bridge"] {
        assert!(
            kubectl.run(&["get", "clusterrole", role], None).is_err(),
            "{role} kept"
        );
    }
    let kept = kubectl
        .run(
            &[
                "get",
                "edgedevices,edgemanifests",
                "-n",
                "default",
                "-o",
                "name",
            ],
            None,
        )
        .unwrap();
    let mut kept: Vec<&str> = kept.lines().collect();
    kept.sort_unstable();
    assert_eq!(
        kept,
        [
            "edgedevice.fleetlet.dev/pi-garage",
            "edgedevice.fleetlet.dev/pi-kitchen",
            "edgedevice.fleetlet.dev/pi-office",
            "edgemanifest.fleetlet.dev/greeting"
        ]
    );

    // Installed again, it picks them up with nothing rewritten, and the nodes are Ready.
    checked("helm install again", install("0.1.1")).unwrap();
    let again = wait_chart_pods(&kubectl, "0.1.1", &node).await;
    for component in ["controller", "bridge"] {
        leader(&kubectl, component, &again).await;
    }
    eventually(
        "the manifest Ready under the reinstalled controller",
        Duration::from_secs(60),
        || async {
            let m = json(&kubectl, &["get", "edgemanifest", "greeting"]);
            let ready = m["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            (ready && m["status"]["ready"] == 3)
                .then_some(())
                .ok_or(m["status"].to_string())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        desired(&env).await,
        before,
        "manifests rewritten by the reinstall"
    );
    logs_and_exec().await;

    kubectl
        .run(
            &[
                "delete",
                "pod",
                "hello-edge",
                "--wait=true",
                "--timeout=60s",
            ],
            None,
        )
        .unwrap();
    drop(agents);
    node.stop();
}
