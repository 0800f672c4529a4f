//! Bridge cost and latency with many heartbeating devices, against a real kube-apiserver and
//! nats-server (a benchmark, not a test).
//!
//! `cargo bench -p fleetlet-bridge --bench bridge` (or `scripts/bench bridge`). For each size
//! in `FLEETLET_BENCH_DEVICES` (default `1000,10000`): that many EdgeDevices, each sending a
//! heartbeat every 10 s (simulated, spread evenly), the bridge with its default intervals.
//! After every device has a Node, over `FLEETLET_BENCH_WINDOW_SECONDS` (default 60) it
//! measures apiserver writes/s by resource, bridge RSS and CPU, heartbeat-to-Lease latency
//! (the bridge's own histogram), then status-change-to-EdgeDevice latency for 50 devices.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed setup ends the benchmark

use std::{
    collections::BTreeMap,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use fleetlet_crds::EdgeDevice;
use fleetlet_protocol::{
    API_VERSION, AgentStatus, Capacity, DeviceFacts, DeviceId, FactsReport, Free, Heartbeat,
    SystemInfo, Timestamp, encode,
    kv::{ACTUAL_STATE, FACTS, HEARTBEAT},
};
use fleetlet_testenv::bench::{Proc, apiserver_writes, proc_stat};
use fleetlet_testenv::{TestEnv, process::free_port};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api,
    runtime::{WatchStreamExt, watcher},
};
use serde_json::json;

const LEASE_HIST: &str = "fleetlet_bridge_heartbeat_to_lease_ms";

/// A device's facts, stored once before its beats (as the agent does).
fn facts(dev: &str) -> Vec<u8> {
    encode(&FactsReport {
        api_version: API_VERSION.into(),
        device: DeviceId::new(dev).unwrap(),
        timestamp: Timestamp::now(),
        facts: DeviceFacts {
            agent_version: "0.1.0".into(),
            system: SystemInfo {
                operating_system: "linux".into(),
                architecture: "arm64".into(),
                os_image: "Debian GNU/Linux 12".into(),
                kernel_version: "6.6".into(),
                hostname: None,
                model: None,
            },
            capacity: Capacity {
                cpu_cores: 4,
                memory_bytes: 4 << 30,
                disk_bytes: 32 << 30,
                pids: 32768,
            },
            addresses: vec![],
            sealing_key: None,
            limits: None,
            container_runtime: None,
        },
    })
    .unwrap()
}

fn heartbeat(dev: &str, seq: u64) -> Vec<u8> {
    encode(&Heartbeat {
        api_version: API_VERSION.into(),
        device: DeviceId::new(dev).unwrap(),
        sequence: seq,
        timestamp: Timestamp::now(),
        interval_seconds: 10,
        free: Free {
            memory_bytes: 3 << 30,
            disk_bytes: 20 << 30,
            pids: 32000,
        },
        facts: None,
    })
    .unwrap()
}

/// A histogram's cumulative buckets (upper bound, count).
fn histogram(metrics: &str, name: &str) -> Vec<(f64, f64)> {
    let mut buckets: Vec<(f64, f64)> = metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}_bucket{{")))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// Quantile of what was observed between two scrapes (upper bound of its bucket).
fn window_quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let diff: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, c)| {
            (
                *le,
                c - before
                    .iter()
                    .find(|(l, _)| l == le)
                    .map_or(0.0, |(_, b)| *b),
            )
        })
        .collect();
    let total = diff.last()?.1;
    if total <= 0.0 {
        return None;
    }
    diff.into_iter()
        .find(|(_, c)| *c >= q * total)
        .map(|(le, _)| le)
}

fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

async fn run(n: usize, window: u64) -> serde_json::Value {
    eprintln!("== {n} devices");
    let env = TestEnv::builder().kube().nats().start().await.unwrap();
    let client = env.kube_client().await.unwrap();
    fleetlet_testenv::bench::create_namespaces(&client, &["fleet", "fleetlet-system"]).await;
    let devices: Api<EdgeDevice> = Api::namespaced(client.clone(), "fleet");
    fleetlet_testenv::bench::create_devices(
        &client,
        "fleet",
        n,
        |i| json!({ "name": format!("dev-{i:05}") }),
    )
    .await;

    // Heartbeats: every device every 10 s, spread evenly.
    let js = env.jetstream().await.unwrap();
    let hb_kv = js.get_key_value(HEARTBEAT.name).await.unwrap();
    let facts_kv = js.get_key_value(FACTS.name).await.unwrap();
    for i in 0..n {
        let dev = format!("dev-{i:05}");
        facts_kv
            .put(dev.as_str(), facts(&dev).into())
            .await
            .unwrap();
    }
    let beats = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(10) / n as u32);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        for k in 0u64.. {
            tick.tick().await;
            let i = (k as usize) % n;
            let dev = format!("dev-{i:05}");
            let _ = hb_kv
                .put(dev.as_str(), heartbeat(&dev, k / n as u64 + 1).into())
                .await;
        }
    });

    let metrics_port = free_port().unwrap();
    let bridge = Proc(
        Command::new(env!("CARGO_BIN_EXE_fleetlet-bridge"))
            .args([
                format!("--nats-url={}", env.nats_url().unwrap()),
                format!("--metrics-addr=127.0.0.1:{metrics_port}"),
                "--lease-namespace=fleetlet-system".into(),
            ])
            .env("KUBECONFIG", env.kubeconfig().unwrap())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = bridge.0.id();
    let nodes: Api<Node> = Api::all(client.clone());
    let t = Instant::now();
    loop {
        let count = nodes
            .list_metadata(&Default::default())
            .await
            .map(|l| l.items.len())
            .unwrap_or(0);
        if count >= n {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "only {count} nodes after 600 s"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let startup_s = t.elapsed().as_secs_f64();
    eprintln!("   {n} nodes in {startup_s:.1}s; settling 40 s (leases, first status)");
    tokio::time::sleep(Duration::from_secs(40)).await;

    let w0 = apiserver_writes(&client).await;
    let h0 = histogram(
        &tokio::task::spawn_blocking(move || scrape(metrics_port))
            .await
            .unwrap(),
        LEASE_HIST,
    );
    let (_, cpu0) = proc_stat(pid);
    let t0 = Instant::now();
    let mut rss_max: f64 = 0.0;
    while t0.elapsed() < Duration::from_secs(window) {
        rss_max = rss_max.max(proc_stat(pid).0);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let (_, cpu1) = proc_stat(pid);
    let w1 = apiserver_writes(&client).await;
    let rate =
        |r: &str| (w1.get(r).copied().unwrap_or(0.0) - w0.get(r).copied().unwrap_or(0.0)) / secs;
    let writes: BTreeMap<&str, f64> = ["leases", "nodes", "edgedevices"]
        .into_iter()
        .map(|r| (r, rate(r)))
        .collect();
    let cpu_cores = (cpu1 - cpu0) / secs;
    eprintln!(
        "   steady: writes/s {writes:?}, RSS max {rss_max:.1} MiB, CPU {:.1}% of a core",
        cpu_cores * 100.0
    );

    let h1 = histogram(
        &tokio::task::spawn_blocking(move || scrape(metrics_port))
            .await
            .unwrap(),
        LEASE_HIST,
    );
    let lease_p50 = window_quantile(&h0, &h1, 0.5);
    let lease_p99 = window_quantile(&h0, &h1, 0.99);

    // Status change → EdgeDevice.status.appliedGeneration, 50 devices one after another.
    let actual = js.get_key_value(ACTUAL_STATE.name).await.unwrap();
    let stream = watcher(devices.clone(), watcher::Config::default()).applied_objects();
    futures::pin_mut!(stream);
    let mut lat = Vec::new();
    for s in 0..50usize {
        let dev = format!("dev-{:05}", (s * 7919) % n);
        let generation = 1000 + s as u64;
        let mut st = AgentStatus::new(DeviceId::new(dev.clone()).unwrap());
        st.manifest_generation = generation;
        st.observed_generation = generation;
        let t = Instant::now();
        actual
            .put(dev.as_str(), encode(&st).unwrap().into())
            .await
            .unwrap();
        loop {
            let o = tokio::time::timeout(Duration::from_secs(30), stream.next())
                .await
                .expect("status within 30 s")
                .unwrap()
                .unwrap();
            if o.metadata.name.as_deref() == Some(dev.as_str())
                && o.status.as_ref().and_then(|s| s.applied_generation) == Some(generation)
            {
                break;
            }
        }
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    lat.sort_by(f64::total_cmp);
    let pct = |q: f64| lat[((lat.len() - 1) as f64 * q).round() as usize];
    eprintln!(
        "   status→CRD p50 {:.0} ms p99 {:.0} ms; heartbeat→lease p50 ≤{lease_p50:?} ms p99 ≤{lease_p99:?} ms",
        pct(0.5),
        pct(0.99)
    );
    beats.abort();
    drop(bridge);
    json!({
        "devices": n,
        "startup_seconds_to_all_nodes": startup_s,
        "window_seconds": secs,
        "apiserver_writes_per_second": writes,
        "bridge_rss_mib_max": rss_max,
        "bridge_cpu_cores": cpu_cores,
        "heartbeat_to_lease_ms_p50_le": lease_p50,
        "heartbeat_to_lease_ms_p99_le": lease_p99,
        "status_to_crd_ms": { "n": lat.len(), "p50": pct(0.5), "p99": pct(0.99), "max": lat[lat.len() - 1] },
    })
}

#[tokio::main]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let sizes = fleetlet_testenv::bench::fleet_sizes("1000,10000");
    let window: u64 = std::env::var("FLEETLET_BENCH_WINDOW_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let mut results = Vec::new();
    for n in sizes {
        results.push(run(n, window).await);
    }
    let out = fleetlet_testenv::repo_root().join("target/fleetlet-bench");
    std::fs::create_dir_all(&out).unwrap();
    let json = json!({ "benchmark": "bridge", "results": results });
    std::fs::write(
        out.join("bridge.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
    println!("{}", serde_json::to_string_pretty(&json).unwrap());
}
