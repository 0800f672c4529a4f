//! Controller fan-out and footprint with many devices, against a real kube-apiserver and
//! nats-server (a benchmark, not a test).
//!
//! `cargo bench -p fleetlet-controller --bench fleet` (or `scripts/bench controller`).
//! For each fleet size in `FLEETLET_BENCH_DEVICES` (default `1000,10000`): N EdgeDevices in
//! 100 groups, 100 EdgeManifests (one per group) plus one selecting every device. Measures
//! the initial fan-out, then the time for one change of the fleet-wide manifest to reach all
//! N desired-state keys, the KV writes it caused, the same for a one-group manifest, and the
//! controller's resident memory. Results: stdout and `target/fleetlet-bench/controller.json`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed setup ends the benchmark

use std::{
    collections::HashSet,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use fleetlet_crds::EdgeManifest;
use fleetlet_protocol::{AgentManifest, decode, kv::DESIRED_STATE};
use fleetlet_testenv::bench::{Proc, proc_stat};
use fleetlet_testenv::{TestEnv, process::free_port};
use futures::StreamExt;
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;

fn manifest(name: &str, selector: serde_json::Value, text: &str) -> EdgeManifest {
    serde_json::from_value(json!({
        "apiVersion": "fleetlet.dev/v1alpha1", "kind": "EdgeManifest",
        "metadata": { "name": name },
        "spec": { "selector": { "matchLabels": selector },
                  "resources": [{ "id": format!("{name}-cfg"), "file": { "path": format!("/etc/fleetlet/{name}.conf"), "content": { "text": text } } }] }
    }))
    .unwrap()
}

/// Waits until `expect` distinct devices have a desired manifest satisfying `done`;
/// returns (seconds, KV entries seen).
async fn fan_out(
    watch: &mut async_nats::jetstream::kv::Watch,
    expect: usize,
    started: Instant,
    done: impl Fn(&AgentManifest) -> bool,
) -> (f64, usize) {
    let mut devices = HashSet::new();
    let mut entries = 0;
    while devices.len() < expect {
        let e = tokio::time::timeout(Duration::from_secs(300), watch.next())
            .await
            .expect("fan-out within 300 s")
            .unwrap()
            .unwrap();
        entries += 1;
        if let Ok(m) = decode::<AgentManifest>(&e.value)
            && done(&m)
        {
            devices.insert(m.device.to_string());
        }
    }
    (started.elapsed().as_secs_f64(), entries)
}

async fn run(n: usize) -> serde_json::Value {
    eprintln!("== {n} devices");
    let env = TestEnv::builder().kube().nats().start().await.unwrap();
    let client = env.kube_client().await.unwrap();
    fleetlet_testenv::bench::create_namespaces(&client, &["fleet", "fleetlet-system"]).await;
    let manifests: Api<EdgeManifest> = Api::namespaced(client.clone(), "fleet");
    let t = Instant::now();
    fleetlet_testenv::bench::create_devices(&client, "fleet", n, |i| {
        json!({ "name": format!("dev-{i:05}"), "labels": { "group": format!("g{}", i % 100), "fleet": "all" } })
    })
    .await;
    for g in 0..100 {
        manifests
            .create(
                &PostParams::default(),
                &manifest(
                    &format!("group-{g}"),
                    json!({ "group": format!("g{g}") }),
                    "v1",
                ),
            )
            .await
            .unwrap();
    }
    manifests
        .create(
            &PostParams::default(),
            &manifest("fleetwide", json!({ "fleet": "all" }), "v1"),
        )
        .await
        .unwrap();
    eprintln!(
        "   created {n} devices and 101 manifests in {:.1}s",
        t.elapsed().as_secs_f64()
    );

    let kv = env
        .jetstream()
        .await
        .unwrap()
        .get_key_value(DESIRED_STATE.name)
        .await
        .unwrap();
    let mut watch = kv.watch_all().await.unwrap();
    let metrics_port = free_port().unwrap();
    let controller = Proc(
        Command::new(env!("CARGO_BIN_EXE_fleetlet-controller"))
            .args([
                format!("--nats-url={}", env.nats_url().unwrap()),
                format!("--metrics-addr=127.0.0.1:{metrics_port}"),
                "--lease-namespace=fleetlet-system".into(),
                "--identity=bench".into(),
            ])
            .env("KUBECONFIG", env.kubeconfig().unwrap())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = controller.0.id();
    let started = Instant::now();
    let (initial_s, initial_writes) =
        fan_out(&mut watch, n, started, |m| m.resources.len() == 2).await;
    eprintln!("   initial fan-out: {initial_s:.2}s, {initial_writes} KV writes");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_settled = proc_stat(pid).0;

    let pp = PatchParams::apply("bench").force();
    let change = |name: &str, selector: serde_json::Value, text: &str| {
        let mut m = manifest(name, selector, text);
        m.metadata.managed_fields = None;
        serde_json::to_value(m).unwrap()
    };
    let t = Instant::now();
    manifests
        .patch(
            "fleetwide",
            &pp,
            &Patch::Apply(change("fleetwide", json!({ "fleet": "all" }), "v2")),
        )
        .await
        .unwrap();
    let (fleet_s, fleet_writes) = fan_out(&mut watch, n, t, |m| {
        m.resources
            .iter()
            .any(|r| r.owner.name == "fleetwide" && r.owner.generation == 2)
    })
    .await;
    eprintln!("   fleet-wide change: {fleet_s:.2}s to all {n} keys, {fleet_writes} KV writes");
    let rss_peak = proc_stat(pid).0;

    let t = Instant::now();
    manifests
        .patch(
            "group-7",
            &pp,
            &Patch::Apply(change("group-7", json!({ "group": "g7" }), "v2")),
        )
        .await
        .unwrap();
    let group_n = n / 100;
    let (group_s, _) = fan_out(&mut watch, group_n, t, |m| {
        m.resources
            .iter()
            .any(|r| r.owner.name == "group-7" && r.owner.generation == 2)
    })
    .await;
    // Any write beyond the group would show up now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut extra = 0;
    while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_millis(200), watch.next()).await
    {
        extra += 1;
    }
    let group_writes = group_n + extra;
    eprintln!("   one-group change: {group_s:.2}s to {group_n} keys, {group_writes} KV writes");
    json!({
        "devices": n,
        "manifests": 101,
        "initial_fan_out_seconds": initial_s,
        "initial_kv_writes": initial_writes,
        "fleetwide_change_seconds": fleet_s,
        "fleetwide_change_kv_writes": fleet_writes,
        "fleetwide_devices_per_second": n as f64 / fleet_s,
        "group_change_seconds": group_s,
        "group_change_kv_writes": group_writes,
        "group_change_devices": group_n,
        "controller_rss_mib_settled": rss_settled,
        "controller_rss_mib_after_change": rss_peak,
    })
}

#[tokio::main]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let sizes = fleetlet_testenv::bench::fleet_sizes("1000,10000");
    let mut results = Vec::new();
    for n in sizes {
        results.push(run(n).await);
    }
    println!("fleetlet-controller benchmark (real kube-apiserver + nats-server on loopback)");
    println!(
        "{:>8} {:>12} {:>14} {:>12} {:>10} {:>12} {:>10} {:>9}",
        "devices",
        "initial s",
        "fleet change s",
        "kv writes",
        "dev/s",
        "group chg s",
        "kv writes",
        "RSS MiB"
    );
    for r in &results {
        println!(
            "{:>8} {:>12.2} {:>14.2} {:>12} {:>10.0} {:>12.2} {:>10} {:>9.1}",
            r["devices"],
            r["initial_fan_out_seconds"].as_f64().unwrap_or(0.0),
            r["fleetwide_change_seconds"].as_f64().unwrap_or(0.0),
            r["fleetwide_change_kv_writes"],
            r["fleetwide_devices_per_second"].as_f64().unwrap_or(0.0),
            r["group_change_seconds"].as_f64().unwrap_or(0.0),
            r["group_change_kv_writes"],
            r["controller_rss_mib_after_change"].as_f64().unwrap_or(0.0)
        );
    }
    let out = fleetlet_testenv::repo_root().join("target/fleetlet-bench");
    std::fs::create_dir_all(&out).unwrap();
    let json = json!({ "benchmark": "controller", "results": results });
    std::fs::write(
        out.join("controller.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
    println!("{json}");
}
