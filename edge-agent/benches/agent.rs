//! Agent footprint and latency against a real nats-server (a benchmark, not a test).
//!
//! `cargo bench -p fleetlet-agent --bench agent` (or `scripts/bench agent`) reports:
//! binary size, resident memory and CPU while idle with 50 managed files, the time from a KV
//! put of a 10-file manifest to the agent's status for it landing in KV, and then, with 20
//! resources of which one is a podman container and one a systemd unit (real podman and
//! systemd, in their sandboxes): resident memory, CPU and the bytes on the agent's NATS
//! connection per hour while idle.
//!
//! `FLEETLET_BENCH_AGENT_BIN` runs another agent binary than this build's (`scripts/bench
//! agent` passes the static device build it measured the size of).
//! Results go to stdout and to `target/fleetlet-bench/agent.json`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed setup ends the benchmark

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use fleetlet_protocol::{
    API_VERSION, AgentManifest, AgentStatus, ContainerSpec, DeviceId, FileContent, FileSpec,
    ManagedResource, Owner, OwnerKind, ResourceId, ResourceSpec, SystemdUnitSpec, UnitState,
    decode, encode,
    kv::{ACTUAL_STATE, DESIRED_STATE},
};
use fleetlet_testenv::{
    TestEnv,
    bench::nats_connection_bytes,
    sandbox::{PodmanSandbox, SystemdSandbox},
};
use futures::StreamExt;

fn manifest(
    dev: &DeviceId,
    root: &Path,
    generation: u64,
    files: usize,
    salt: u64,
) -> AgentManifest {
    AgentManifest {
        api_version: API_VERSION.into(),
        signing_key: None,
        issued_at: None,
        device: dev.clone(),
        generation,
        resources: (0..files)
            .map(|i| ManagedResource {
                id: ResourceId::new(format!("f{i}")).unwrap(),
                owner: Owner {
                    kind: OwnerKind::EdgeManifest,
                    namespace: "bench".into(),
                    name: "bench".into(),
                    generation: generation as i64,
                    uid: None,
                },
                spec: ResourceSpec::File(FileSpec {
                    path: root.join(format!("f{i}.conf")).display().to_string(),
                    content: FileContent::Text(format!(
                        "file {i}\nsalt {salt}\n{}",
                        "x".repeat(200)
                    )),
                    mode: None,
                    owner: None,
                    group: None,
                }),
            })
            .collect(),
    }
}

fn proc_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// utime + stime in clock ticks.
fn proc_cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

/// Watches process `pid` for `secs`: its largest RSS (KiB), its CPU use (% of a core) and
/// the seconds watched.
async fn watch_idle(pid: u32, secs: u64) -> (u64, f64, f64) {
    let ticks_per_sec = 100.0; // USER_HZ on Linux
    let cpu0 = proc_cpu_ticks(pid);
    let t0 = Instant::now();
    let mut rss_max = 0;
    while t0.elapsed() < Duration::from_secs(secs) {
        rss_max = rss_max.max(proc_rss_kib(pid));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let watched = t0.elapsed().as_secs_f64();
    let cpu = (proc_cpu_ticks(pid) - cpu0) as f64 / ticks_per_sec / watched * 100.0;
    (rss_max, cpu, watched)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing: run only for bench.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let iterations: usize = std::env::var("FLEETLET_BENCH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let idle_secs: u64 = std::env::var("FLEETLET_BENCH_IDLE_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);

    let idle_resources_secs: u64 = std::env::var("FLEETLET_BENCH_IDLE_RESOURCES_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150);

    let env = TestEnv::builder().nats().start().await.unwrap();
    let podman = PodmanSandbox::start().await.unwrap();
    let systemd = SystemdSandbox::start().await.unwrap();
    let js = env.jetstream().await.unwrap();
    let desired = js.get_key_value(DESIRED_STATE.name).await.unwrap();
    let actual = js.get_key_value(ACTUAL_STATE.name).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let dev = DeviceId::new("pi-bench").unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "device_id = \"pi-bench\"\nstate_dir = \"{}\"\n[nats]\nurls = [\"{}\"]\n[trust]\nallow_unsigned = true\n[file]\nallowed_roots = [\"{}\"]\n\
             [container]\nsocket = \"{}\"\nname_prefix = \"bench-\"\ninsecure_registries = [\"{}\"]\nstop_timeout_seconds = 1\n\
             [systemd]\nbus_address = \"{}\"\nunit_dir = \"{}\"\n",
            dir.path().join("state").display(),
            env.nats_url().unwrap(),
            root.display(),
            podman.socket.display(),
            podman.registry,
            systemd.bus_address,
            systemd.unit_dir.display(),
        ),
    )
    .unwrap();
    let bin = std::env::var("FLEETLET_BENCH_AGENT_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_fleetlet-agent").to_owned());
    let bin = bin.as_str();
    let agent = fleetlet_testenv::bench::Proc(
        Command::new(bin)
            .arg("--config")
            .arg(&config)
            .env("FLEETLET_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = agent.0.id();

    let mut watch = actual.watch(dev.as_str()).await.unwrap();
    let mut wait_for = async |generation: u64| loop {
        let e = tokio::time::timeout(Duration::from_secs(120), watch.next())
            .await
            .expect("status within 120 s")
            .unwrap()
            .unwrap();
        let s: AgentStatus = decode(&e.value).unwrap();
        if s.observed_generation >= generation && s.resources.values().all(|r| r.is_ready()) {
            return s;
        }
    };

    // Put-to-status latency, 10 files changed per generation. Generation 1 is a warm-up
    // (the agent is still connecting) and is reported apart.
    let warmup = Instant::now();
    desired
        .put(
            dev.as_str(),
            encode(&manifest(&dev, &root, 1, 10, 1)).unwrap().into(),
        )
        .await
        .unwrap();
    wait_for(1).await;
    let warmup_ms = warmup.elapsed().as_secs_f64() * 1000.0;
    let mut latencies = Vec::new();
    for i in 0..iterations {
        let generation = i as u64 + 2;
        let m = manifest(&dev, &root, generation, 10, generation);
        let bytes = encode(&m).unwrap();
        let t = Instant::now();
        desired.put(dev.as_str(), bytes.into()).await.unwrap();
        wait_for(generation).await;
        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    latencies.sort_by(f64::total_cmp);

    // Idle with 50 managed files (drift checks every 30 s, heartbeats every 10 s).
    let generation = iterations as u64 + 2;
    desired
        .put(
            dev.as_str(),
            encode(&manifest(&dev, &root, generation, 50, 0))
                .unwrap()
                .into(),
        )
        .await
        .unwrap();
    wait_for(generation).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss_max, cpu_pct, _) = watch_idle(pid, idle_secs).await;

    // Idle with 20 resources: 18 files, a container and a systemd unit.
    let generation = generation + 1;
    let mut m = manifest(&dev, &root, generation, 18, 0);
    let owner = m.resources[0].owner.clone();
    m.resources.push(ManagedResource {
        id: ResourceId::new("app").unwrap(),
        owner: owner.clone(),
        spec: ResourceSpec::Container(ContainerSpec {
            image: podman.image_1.clone(),
            ..Default::default()
        }),
    });
    m.resources.push(ManagedResource {
        id: ResourceId::new("unit").unwrap(),
        owner,
        spec: ResourceSpec::SystemdUnit(SystemdUnitSpec {
            restart_on: Vec::new(),
            restart_digest: None,
            name: "fleetlet-bench.service".into(),
            contents: Some(
                "[Service]\nExecStart=/bin/sleep 86400\n[Install]\nWantedBy=multi-user.target\n"
                    .into(),
            ),
            enabled: true,
            state: UnitState::Started,
        }),
    });
    desired
        .put(dev.as_str(), encode(&m).unwrap().into())
        .await
        .unwrap();
    let s = wait_for(generation).await;
    assert_eq!(s.resources.len(), 20, "{s:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let monitor = env.nats.as_ref().unwrap().monitor_port;
    let connection = "fleetlet-agent/pi-bench";
    let (n, bytes0) = nats_connection_bytes(monitor, connection);
    assert_eq!(n, 1, "one connection named {connection}");
    let (rss_resources, cpu_resources, idle) = watch_idle(pid, idle_resources_secs).await;
    let (_, bytes1) = nats_connection_bytes(monitor, connection);
    let bytes_per_hour = (bytes1 - bytes0) / idle * 3600.0;

    let binary_bytes = std::fs::metadata(bin).map(|m| m.len()).unwrap_or(0);

    let p = |q| percentile(&latencies, q);
    println!("fleetlet-agent benchmark (real nats-server on loopback)");
    println!(
        "  binary (this build, {}):        {:.2} MiB",
        std::env::consts::ARCH,
        binary_bytes as f64 / 1048576.0
    );
    println!(
        "  idle RSS, 50 files (max):           {:.2} MiB",
        rss_max as f64 / 1024.0
    );
    println!("  idle CPU over {idle_secs} s:                {cpu_pct:.3} %");
    println!(
        "  put→status, 10 files, n={iterations}:      p50 {:.1} ms  p90 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        p(0.5),
        p(0.9),
        p(0.99),
        latencies[latencies.len() - 1]
    );
    println!("  first manifest after agent start:    {warmup_ms:.1} ms (includes connecting)");
    println!(
        "  idle RSS, 20 resources (max):       {:.2} MiB (18 files, a container, a unit)",
        rss_resources as f64 / 1024.0
    );
    println!("  idle CPU over {idle_resources_secs} s:               {cpu_resources:.3} %");
    println!(
        "  idle NATS traffic:                  {:.1} KiB per hour (in and out of its connection)",
        bytes_per_hour / 1024.0
    );
    let json = serde_json::json!({
        "first_manifest_ms": warmup_ms,
        "benchmark": "agent",
        "arch": std::env::consts::ARCH,
        "binary_bytes": binary_bytes,
        "idle_rss_kib_max": rss_max,
        "idle_cpu_percent": cpu_pct,
        "idle_seconds": idle_secs,
        "idle_resources": {
            "resources": 20,
            "rss_kib_max": rss_resources,
            "cpu_percent": cpu_resources,
            "seconds": idle,
            "nats_bytes_per_hour": bytes_per_hour,
        },
        "binary": bin,
        "put_to_status_ms": { "n": iterations, "p50": p(0.5), "p90": p(0.9), "p99": p(0.99), "max": latencies[latencies.len() - 1] },
    });
    let out = fleetlet_testenv::repo_root().join("target/fleetlet-bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("agent.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
    println!("{json}");
}
