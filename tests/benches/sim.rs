//! The devices' side of a rollout on its own (a benchmark, not a test): `scripts/bench sim`
//! (or `cargo bench -p fleetlet-testenv --bench sim` with release binaries in
//! `FLEETLET_BENCH_BIN_DIR`).
//!
//! `fleetlet-sim` runs N devices (`FLEETLET_BENCH_DEVICES`, default 10000; its state and
//! files on tmpfs, as in the fleet bench) against a real nats-server, with no control plane:
//! the benchmark writes each device's manifest itself, a new generation at a time, and
//! waits until every device reports it observed. For each generation it records the
//! simulator's CPU beyond its rate at rest, per device, and its context switches per
//! device. It does so for each simulator setting in `FLEETLET_BENCH_SIM_SETTINGS`
//! (`;`-separated argument lists, default `--blocking-threads=512;--blocking-threads=4`:
//! tokio's own blocking pool size against the simulator's default), one setting after the
//! other, `FLEETLET_BENCH_ROUNDS` times (default 3), so that both see the machine alike.
//! Results: stdout, and `target/fleetlet-bench/sim.json` (or under `FLEETLET_BENCH_OUT`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed setup ends the benchmark

use std::{
    collections::HashMap,
    io::BufRead,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use fleetlet_protocol::{AgentStatus, decode};
use fleetlet_testenv::{
    TestEnv,
    bench::{Proc, bin, fleet_sizes, out_dir, proc_stat, quantile},
};
use futures::StreamExt;
use serde_json::{Value, json};

const GENERATIONS: u64 = 4;

fn manifest(device: &str, generation: u64) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "fleetlet.dev/v1alpha1", "kind": "AgentManifest",
        "device": device, "generation": generation,
        "resources": [{ "id": "motd",
            "owner": { "kind": "EdgeManifest", "namespace": "default", "name": "bench" },
            "file": { "path": "/etc/fleetlet/motd",
                      "content": { "text": format!("generation {generation}\n") } } }]
    }))
    .unwrap()
}

/// Voluntary and involuntary context switches of every thread of `pid`.
fn switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .flat_map(|s| {
            s.lines()
                .filter_map(|l| {
                    l.strip_prefix("voluntary_ctxt_switches:")
                        .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                })
                .collect::<Vec<_>>()
        })
        .sum()
}

/// The revision the next write to `bucket` gets: a watch from it sees only this run's.
async fn next_revision(bucket: &async_nats::jetstream::kv::Store) -> u64 {
    let mut stream = bucket.stream.clone();
    stream.info().await.unwrap().state.last_sequence + 1
}

/// Reads the status watch until `n` devices have observed `generation`.
async fn until_observed(
    watch: &mut async_nats::jetstream::kv::Watch,
    seen: &mut HashMap<String, u64>,
    generation: u64,
    n: usize,
) {
    while seen.values().filter(|g| **g >= generation).count() < n {
        let entry = tokio::time::timeout(Duration::from_secs(300), watch.next())
            .await
            .expect("every device reports within 300 s")
            .expect("the status watch ends only with the server")
            .unwrap();
        if let Ok(s) = decode::<AgentStatus>(&entry.value) {
            seen.insert(entry.key, s.observed_generation);
        }
    }
}

/// One simulator run with `setting`: CPU-µs and context switches per device, per generation.
async fn measure(env: &TestEnv, run: usize, n: usize, setting: &str) -> Value {
    let js = env.jetstream().await.unwrap();
    let desired = js.get_key_value("desired-state").await.unwrap();
    let actual = js
        .get_key_value(fleetlet_protocol::kv::ACTUAL_STATE.name)
        .await
        .unwrap();
    let from = next_revision(&actual).await;
    // Each run's devices are new (the buckets keep what earlier runs wrote).
    let prefix = format!("r{run}-");
    let names: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
    for d in &names {
        desired.put(d, manifest(d, 1).into()).await.unwrap();
    }
    let dir = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap();
    let mut sim = Proc(
        Command::new(bin("fleetlet-sim"))
            .arg(format!("--nats-url={}", env.nats_url().unwrap()))
            .arg(format!("--devices={n}"))
            .arg(format!("--prefix={prefix}"))
            .arg(format!("--dir={}", dir.path().display()))
            .args(setting.split_whitespace())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let out = sim.0.stdout.take().unwrap();
    tokio::task::spawn_blocking(move || {
        let mut l = String::new();
        std::io::BufReader::new(out).read_line(&mut l).map(|_| l)
    })
    .await
    .unwrap()
    .unwrap();
    let pid = sim.pid();
    let mut watch = actual.watch_all_from_revision(from).await.unwrap();
    let mut seen = HashMap::new();
    until_observed(&mut watch, &mut seen, 1, n).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (_, c0) = proc_stat(pid);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let rest = (proc_stat(pid).1 - c0) / 10.0;
    let mut cpu_us = Vec::new();
    let mut switches_per_device = Vec::new();
    for generation in 2..=GENERATIONS + 1 {
        let (s0, (_, c0), t0) = (switches(pid), proc_stat(pid), Instant::now());
        for d in &names {
            desired
                .put(d, manifest(d, generation).into())
                .await
                .unwrap();
        }
        until_observed(&mut watch, &mut seen, generation, n).await;
        // Status writes to disk trail the reports a little.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let used = proc_stat(pid).1 - c0 - rest * t0.elapsed().as_secs_f64();
        cpu_us.push(used * 1e6 / n as f64);
        switches_per_device.push((switches(pid) - s0) as f64 / n as f64);
    }
    json!({
        "setting": setting, "devices": n, "restPercent": rest * 100.0,
        "cpuMicrosPerDevice": cpu_us, "switchesPerDevice": switches_per_device,
    })
}

#[tokio::main]
async fn main() {
    let n = fleet_sizes("10000").first().copied().unwrap_or(10_000);
    let settings: Vec<String> = std::env::var("FLEETLET_BENCH_SIM_SETTINGS")
        .unwrap_or_else(|_| "--blocking-threads=512;--blocking-threads=4".into())
        .split(';')
        .map(str::to_owned)
        .collect();
    let rounds: usize = std::env::var("FLEETLET_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let env = TestEnv::builder().nats().start().await.unwrap();
    let mut runs = Vec::new();
    for round in 0..rounds {
        for setting in &settings {
            let r = measure(&env, runs.len(), n, setting).await;
            eprintln!("== round {round}, {setting}: {r}");
            runs.push(r);
        }
    }
    let mut summary = Vec::new();
    for setting in &settings {
        let all = |key: &str| -> Vec<f64> {
            runs.iter()
                .filter(|r| r["setting"] == setting.as_str())
                .flat_map(|r| r[key].as_array().cloned().unwrap_or_default())
                .filter_map(|v| v.as_f64())
                .collect()
        };
        let (cpu, sw) = (all("cpuMicrosPerDevice"), all("switchesPerDevice"));
        let s = json!({
            "setting": setting,
            "rollouts": cpu.len(),
            "cpuMicrosPerDevice": { "p50": quantile(&cpu, 0.5), "min": quantile(&cpu, 0.0),
                                    "max": quantile(&cpu, 1.0) },
            "switchesPerDevice": { "p50": quantile(&sw, 0.5) },
        });
        println!("{s}");
        summary.push(s);
    }
    let out = out_dir();
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("sim.json"),
        serde_json::to_vec_pretty(&json!({ "devices": n, "summary": summary, "runs": runs }))
            .unwrap(),
    )
    .unwrap();
}
