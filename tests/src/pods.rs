//! A control plane with one device whose agent runs pods in podman: what the
//! kubelet-facade tests (`tests/tests/pods.rs`) and benchmarks (`benches/kubelet.rs`) start.

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{Api, api::PostParams};
use serde_json::json;

use crate::{Error, TestEnv, components, process::Service, sandbox::PodmanSandbox};

/// The control plane and one device, as the kubelet-facade tests and benchmarks use them:
/// controller and bridge (with its kubelet API) under the Helm chart's ServiceAccounts, an
/// EdgeDevice, and its agent running containers in a [`PodmanSandbox`]. The binaries come
/// from [`components::bin_dir`] (debug for tests, release for benchmarks).
pub struct PodFleet {
    pub client: kube::Client,
    /// The test PKI (the apiserver's CA and client certificates).
    pub pki: std::path::PathBuf,
    pub nodes: Api<Node>,
    /// Logs and state (`agent/agent.log`, `agent/state`, the components' logs).
    pub dir: tempfile::TempDir,
    /// Agent, bridge, controller: stopped when dropped.
    pub services: Vec<Service>,
}

impl PodFleet {
    /// `csr`: the kubelet API gets its serving certificate from a CertificateSigningRequest
    /// (needs the controller-manager's signer) instead of files.
    /// `bridge_flags`: more flags for the bridge.
    pub async fn start(
        env: &TestEnv,
        pm: &PodmanSandbox,
        device: &str,
        csr: bool,
        bridge_flags: &[&str],
    ) -> Result<Self, Error> {
        let client = env.kube_client().await?;
        let dir = tempfile::tempdir()?;
        let bins = components::bin_dir()?;
        // The controller and the bridge run with the chart's ServiceAccounts and RBAC: what
        // they do here is what they may do when installed with `helm install`.
        let chart = env.install_chart("fleetlet", "fleetlet-system", &[])?;
        let controller = components::start_controller_as(
            env,
            &chart.controller_kubeconfig,
            &bins,
            dir.path(),
            &["--resync-seconds=2"],
        )?;
        let pki = env
            .kube
            .as_ref()
            .ok_or_else(|| {
                Error::Setup("a pod fleet needs the environment's kube-apiserver".into())
            })?
            .pki_dir
            .clone();
        let mut kubelet_flags = components::kubelet_flags(env, "127.0.0.1:0", csr)?;
        kubelet_flags.extend(bridge_flags.iter().map(|f| f.to_string()));
        let kubelet_flags: Vec<&str> = kubelet_flags.iter().map(String::as_str).collect();
        let bridge = components::start_bridge_as(
            env,
            &chart.bridge_kubeconfig,
            &bins,
            dir.path(),
            &kubelet_flags,
        )?;
        let edge: fleetlet_crds::EdgeDevice = serde_json::from_value(json!({
            "apiVersion": "fleetlet.dev/v1alpha1", "kind": "EdgeDevice",
            "metadata": { "name": device, "namespace": "default" }, "spec": {}
        }))
        .map_err(|e| Error::Setup(e.to_string()))?;
        Api::<fleetlet_crds::EdgeDevice>::namespaced(client.clone(), "default")
            .create(&PostParams::default(), &edge)
            .await?;
        let agent_dir = dir.path().join("agent");
        std::fs::create_dir_all(agent_dir.join("root"))?;
        let config = agent_dir.join("agent.toml");
        std::fs::write(
            &config,
            podman_agent_config(
                env.nats_url()?,
                &agent_dir,
                device,
                pm,
                components::UNSIGNED_OK,
            ),
        )?;
        let agent = Service::spawn(
            "fleetlet-agent",
            &bins.join("fleetlet-agent"),
            &["--config".into(), config.display().to_string()],
            agent_dir.join("agent.log"),
        )?;
        env.wait_node_ready(device).await;
        let nodes: Api<Node> = Api::all(client.clone());
        Ok(Self {
            client,
            pki,
            nodes,
            dir,
            services: vec![agent, bridge, controller],
        })
    }
}

/// An agent's config for `device` in `dir` that runs files (under `dir/root`, below
/// /opt/fleetlet) and containers with `pm`'s podman, pulling from its registry; quick
/// heartbeats, drift checks and retries. `trust` is its `[trust]` table.
pub fn podman_agent_config(
    nats_url: &str,
    dir: &std::path::Path,
    device: &str,
    pm: &PodmanSandbox,
    trust: &str,
) -> String {
    format!(
        "device_id = \"{device}\"\nstate_dir = \"{state}\"\n[nats]\nurls = [\"{nats_url}\"]\n\
         [reconcile]\ndrift_interval_seconds = 2\nheartbeat_interval_seconds = 1\nbackoff_initial_ms = 200\nbackoff_max_ms = 1000\n\
         {trust}\
         [file]\nallowed_roots = [\"/opt/fleetlet\"]\npath_prefix = \"{root}\"\n\
         [container]\nsocket = \"{socket}\"\nname_prefix = \"{device}-\"\ninsecure_registries = [\"{registry}\"]\nstop_timeout_seconds = 1\n",
        state = dir.join("state").display(),
        root = dir.join("root").display(),
        socket = pm.socket.display(),
        registry = pm.registry,
    )
}

/// A pod `pf` on `node` for port-forward checks and benchmarks: port 9000 answers the
/// sha256 of what it is sent (once the sender half-closes), port 9001 sends `mib` MiB of
/// random bytes (kept in `/tmp/blob`). Ready once both ports listen (writing the blob
/// comes first and takes a while on a busy machine).
pub fn port_forward_pod(image: &str, node: &str, mib: usize) -> Result<Pod, Error> {
    serde_json::from_value(json!({
        "metadata": { "name": "pf" },
        "spec": {
            "nodeName": node,
            "tolerations": [{ "key": "fleetlet.dev/edge", "operator": "Exists", "effect": "NoSchedule" }],
            "containers": [{
                "name": "main", "image": image,
                "command": ["/bin/sh", "-c", format!("head -c {} /dev/urandom > /tmp/blob; \
                    (while true; do nc -l -p 9001 -e cat /tmp/blob; done) & \
                    while true; do nc -l -p 9000 -e sha256sum; done", mib << 20)],
                "ports": [{ "containerPort": 9000 }, { "containerPort": 9001 }],
                "readinessProbe": {
                    "exec": { "command": ["/bin/sh", "-c",
                        "netstat -ltn | grep -q ':9000 ' && netstat -ltn | grep -q ':9001 '"] },
                    "periodSeconds": 1
                }
            }]
        }
    }))
    .map_err(|e| Error::Setup(e.to_string()))
}

/// How long one [`port_forward_transfer`] took each way.
#[derive(Debug, Clone, Copy)]
pub struct Transfer {
    pub up: std::time::Duration,
    pub down: std::time::Duration,
}

fn sha256_of(data: &[u8]) -> Result<String, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let path = dir.path().join("data");
    std::fs::write(&path, data).map_err(|e| e.to_string())?;
    let out = std::process::Command::new("sha256sum")
        .arg(&path)
        .output()
        .map_err(|e| format!("sha256sum: {e}"))?;
    Ok(first_word(&out.stdout))
}

fn first_word(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// `kubectl port-forward` to the [`port_forward_pod`] `pf` (made with the same `mib`):
/// `mib` MiB up, checked by the pod's sha256, then `mib` MiB down, checked against the
/// pod's file, each on a connection of its own. `spdy_client`: kubectl speaks SPDY to the
/// apiserver instead of WebSockets. `Err` says what did not arrive intact.
pub async fn port_forward_transfer(
    env: &TestEnv,
    spdy_client: bool,
    mib: usize,
) -> Result<Transfer, String> {
    use std::{
        io::{BufRead, Read, Write},
        time::{Duration, Instant},
    };
    // Not before the pod listens on both ports (its readiness probe says so).
    let pods: Api<Pod> = Api::namespaced(
        env.kube_client().await.map_err(|e| e.to_string())?,
        "default",
    );
    crate::eventually(
        "pod pf Ready (listening)",
        Duration::from_secs(60),
        || async {
            let p = pods.get("pf").await.map_err(|e| e.to_string())?;
            let ready = p
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            ready.then_some(()).ok_or_else(|| "not Ready".to_string())
        },
    )
    .await;
    let free = || crate::process::free_port().map_err(|e| e.to_string());
    let (up_port, down_port) = (free()?, free()?);
    let mut cmd = env.kubectl().map_err(|e| e.to_string())?;
    if spdy_client {
        cmd.env("KUBECTL_PORT_FORWARD_WEBSOCKETS", "false");
    }
    let mut forward = cmd
        .args([
            "port-forward",
            "--address=127.0.0.1",
            "pod/pf",
            &format!("{up_port}:9000"),
            &format!("{down_port}:9001"),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("kubectl port-forward: {e}"))?;
    // Both listeners are up once kubectl says so, twice.
    let stdout = forward.stdout.take().ok_or("no stdout")?;
    let started = tokio::task::spawn_blocking(move || {
        let mut lines = std::io::BufReader::new(stdout).lines();
        let mut forwarding = 0;
        while forwarding < 2 {
            match lines.next() {
                Some(Ok(l)) if l.starts_with("Forwarding from") => forwarding += 1,
                Some(Ok(_)) => {}
                _ => return Err("kubectl port-forward stopped before listening".to_string()),
            }
        }
        // Keep reading so kubectl never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Ok(())
    });
    let result = async {
        tokio::time::timeout(Duration::from_secs(30), started)
            .await
            .map_err(|_| "kubectl port-forward did not start in 30 s".to_string())?
            .map_err(|e| e.to_string())??;
        // Pseudo-random bytes (xorshift): nothing compresses or repeats.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let data: Vec<u8> = (0..mib << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let expected_up = sha256_of(&data)?;
        let io = |e: std::io::Error| e.to_string();
        let (answer, up) = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let mut s = std::net::TcpStream::connect(("127.0.0.1", up_port)).map_err(io)?;
            s.set_read_timeout(Some(Duration::from_secs(300)))
                .map_err(io)?;
            s.write_all(&data).map_err(io)?;
            s.shutdown(std::net::Shutdown::Write).map_err(io)?;
            let mut answer = Vec::new();
            s.read_to_end(&mut answer).map_err(io)?;
            Ok::<_, String>((answer, started.elapsed()))
        })
        .await
        .map_err(|e| e.to_string())??;
        if first_word(&answer) != expected_up {
            return Err(format!(
                "{mib} MiB up did not arrive intact: the pod saw {:?}",
                String::from_utf8_lossy(&answer)
            ));
        }
        let (got, down) = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let mut s = std::net::TcpStream::connect(("127.0.0.1", down_port)).map_err(io)?;
            s.set_read_timeout(Some(Duration::from_secs(300)))
                .map_err(io)?;
            let mut got = Vec::new();
            s.read_to_end(&mut got).map_err(io)?;
            Ok::<_, String>((got, started.elapsed()))
        })
        .await
        .map_err(|e| e.to_string())??;
        let out = env
            .kubectl()
            .map_err(|e| e.to_string())?
            .args(["exec", "pf", "--", "sha256sum", "/tmp/blob"])
            .output()
            .map_err(|e| e.to_string())?;
        if got.len() != mib << 20 || sha256_of(&got)? != first_word(&out.stdout) {
            return Err(format!(
                "{mib} MiB down did not arrive intact ({} bytes)",
                got.len()
            ));
        }
        Ok(Transfer { up, down })
    }
    .await;
    let _ = forward.kill();
    let _ = forward.wait();
    result
}

/// Waits (up to `timeout`) until pod `name` is in phase Running; panics otherwise (for tests
/// and benchmarks).
pub async fn wait_running(pods: &Api<Pod>, name: &str, timeout: std::time::Duration) {
    crate::eventually(&format!("pod {name} Running"), timeout, || async {
        let p = pods.get(name).await.map_err(|e| e.to_string())?;
        let phase = p.status.and_then(|s| s.phase);
        (phase.as_deref() == Some("Running"))
            .then_some(())
            .ok_or(format!("{phase:?}"))
    })
    .await;
}
