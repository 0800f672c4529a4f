//! The kubelet facade's streaming paths against real servers (a benchmark, not a test):
//! `scripts/bench kubelet` (or `cargo bench -p fleetlet-testenv --bench kubelet` with release
//! binaries in target/release).
//!
//! One device with a pod, the release controller, bridge and agent, and a 1.36 apiserver
//! (which proxies WebSockets to the bridge's nodes). Measures, for kubectl's WebSocket path
//! and for kubectl speaking SPDY (which the apiserver passes through):
//! * `kubectl exec pf -- true`: wall time per call (p50, p90 of `FLEETLET_BENCH_EXECS`,
//!   default 20), next to `podman exec` of the same container on the device (the floor: the
//!   same container runtime call without the apiserver, the bridge and NATS);
//! * `kubectl port-forward`: `FLEETLET_BENCH_FORWARD_MIB` (default 64) MiB up and down,
//!   checksummed, in MiB/s, next to the same download over a direct connection inside the
//!   container's network namespace (`nsenter`).
//!
//! Results: stdout, and `target/fleetlet-bench/kubelet.json`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed setup ends the benchmark

use std::{
    process::Command,
    time::{Duration, Instant},
};

use fleetlet_testenv::{
    TestEnv,
    bench::quantile,
    eventually,
    pods::{PodFleet, port_forward_pod, port_forward_transfer, wait_running},
    repo_root,
    sandbox::PodmanSandbox,
};
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, api::PostParams};
use serde_json::json;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Wall milliseconds of `runs` runs of `cmd()`, each required to succeed.
fn timed(runs: usize, mut cmd: impl FnMut() -> Command) -> Vec<f64> {
    (0..runs)
        .map(|_| {
            let started = Instant::now();
            let out = cmd().output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            started.elapsed().as_secs_f64() * 1000.0
        })
        .collect()
}

fn summary(ms: &[f64]) -> serde_json::Value {
    json!({ "p50_ms": quantile(ms, 0.5), "p90_ms": quantile(ms, 0.9), "runs": ms.len() })
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let runs: usize = env_or("FLEETLET_BENCH_EXECS", 20);
    let mib: usize = env_or("FLEETLET_BENCH_FORWARD_MIB", 64);
    let env = TestEnv::builder().kube().nats().start().await.unwrap();
    let pm = PodmanSandbox::start().await.unwrap();
    let fleet = PodFleet::start(&env, &pm, "pi-bench", false, &[])
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(fleet.client.clone(), "default");
    pods.create(
        &PostParams::default(),
        &port_forward_pod(&pm.image_1, "pi-bench", mib).unwrap(),
    )
    .await
    .unwrap();
    wait_running(&pods, "pf", Duration::from_secs(120)).await;
    let container = pm
        .podman(&[
            "ps",
            "--filter",
            "label=dev.fleetlet.device=pi-bench",
            "--format",
            "{{.Names}}",
        ])
        .unwrap()
        .trim()
        .to_owned();
    // The blob is written at start: wait until it is whole.
    eventually("the pod's blob", Duration::from_secs(60), || async {
        let out = env
            .kubectl()
            .unwrap()
            .args(["exec", "pf", "--", "stat", "-c", "%s", "/tmp/blob"])
            .output()
            .unwrap();
        let size = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        (size == (mib << 20).to_string()).then_some(()).ok_or(size)
    })
    .await;

    let podman_exec: Vec<f64> = (0..runs)
        .map(|_| {
            let started = Instant::now();
            pm.podman(&["exec", &container, "true"]).unwrap();
            started.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    let kubectl_exec = |spdy: bool| {
        timed(runs, || {
            let mut c = env.kubectl().unwrap();
            c.env(
                "KUBECTL_REMOTE_COMMAND_WEBSOCKETS",
                if spdy { "false" } else { "true" },
            )
            .args(["exec", "pf", "--", "true"]);
            c
        })
    };
    let exec_ws = kubectl_exec(false);
    let exec_spdy = kubectl_exec(true);

    let mib_s = |d: Duration| mib as f64 / d.as_secs_f64();
    let forward_ws = port_forward_transfer(&env, false, mib).await.unwrap();
    let forward_spdy = port_forward_transfer(&env, true, mib).await.unwrap();
    // The floor: the same download on a direct connection in the container's namespace.
    let pid = pm
        .podman(&["inspect", "--format", "{{.State.Pid}}", &container])
        .unwrap()
        .trim()
        .to_owned();
    let started = Instant::now();
    let out = Command::new("nsenter")
        .args(["-t", &pid, "-n", "bash", "-c"])
        .arg("exec 3<>/dev/tcp/127.0.0.1/9001; cat <&3 | wc -c")
        .output()
        .unwrap();
    let direct = started.elapsed();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        (mib << 20).to_string(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let p50 = |v: &[f64]| quantile(v, 0.5).unwrap_or(f64::NAN);
    println!("kubelet facade, one device, release binaries, {runs} runs each:");
    println!(
        "  podman exec (floor)          p50 {:7.1} ms",
        p50(&podman_exec)
    );
    for (name, v) in [
        ("kubectl exec, WebSocket", &exec_ws),
        ("kubectl exec, SPDY", &exec_spdy),
    ] {
        println!(
            "  {name:<28} p50 {:7.1} ms  p90 {:7.1} ms  ({:.2}x podman exec)",
            p50(v),
            quantile(v, 0.9).unwrap_or(f64::NAN),
            p50(v) / p50(&podman_exec)
        );
    }
    println!(
        "  direct download in the pod's namespace (floor): {:7.1} MiB/s",
        mib_s(direct)
    );
    for (name, t) in [
        ("port-forward, WebSocket", forward_ws),
        ("port-forward, SPDY", forward_spdy),
    ] {
        println!(
            "  {name:<28} {mib} MiB up {:7.1} MiB/s, down {:7.1} MiB/s ({:.2}x the direct download)",
            mib_s(t.up),
            mib_s(t.down),
            mib_s(t.down) / mib_s(direct)
        );
    }
    let result = json!({
        "exec": {
            "podman": summary(&podman_exec),
            "websocket": summary(&exec_ws),
            "spdy": summary(&exec_spdy),
        },
        "port_forward": {
            "mib": mib,
            "direct_down_mib_s": mib_s(direct),
            "websocket": { "up_mib_s": mib_s(forward_ws.up), "down_mib_s": mib_s(forward_ws.down) },
            "spdy": { "up_mib_s": mib_s(forward_spdy.up), "down_mib_s": mib_s(forward_spdy.down) },
        },
    });
    let dir = repo_root().join("target/fleetlet-bench");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("kubelet.json"),
        serde_json::to_string_pretty(&result).unwrap(),
    )
    .unwrap();
    drop(fleet);
}
