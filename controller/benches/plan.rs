//! The planner alone, without servers: the CPU time of one [`plan`] pass over a fleet whose
//! desired state already holds the plan (a steady pass), and of a pass that moves every
//! device to a new generation of the fleet-wide manifest (a rollout's first pass).
//!
//! `cargo bench -p fleetlet-controller --bench plan` (or `scripts/bench plan`).
//! `FLEETLET_BENCH_DEVICES` sets the fleet sizes (default `1000,10000`): N devices in 100
//! groups, one File manifest per group and one selecting every device, as in the
//! controller's fleet bench. Results: stdout and `target/fleetlet-bench/plan.json`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed setup ends the benchmark

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Instant,
};

use fleetlet_controller::plan::{DeviceState, DeviceView, ManifestView, plan};
use fleetlet_crds::{LabelSelector, ResourceTemplate};
use fleetlet_protocol::{
    AgentManifest, DeviceId, DeviceLimits, FileContent, FileSpec, ResourceId, ResourceSpec,
};
use serde_json::json;

fn file(name: &str, text: &str) -> ResourceTemplate {
    ResourceTemplate {
        id: ResourceId::new(format!("{name}-cfg")).unwrap(),
        spec: ResourceSpec::File(FileSpec {
            path: format!("/etc/fleetlet/{name}.conf"),
            content: FileContent::Text(text.into()),
            mode: None,
            owner: None,
            group: None,
        }),
    }
}

fn manifest(
    name: &str,
    generation: i64,
    selector: BTreeMap<String, String>,
    text: &str,
) -> ManifestView {
    ManifestView {
        namespace: "bench".into(),
        name: name.into(),
        uid: Some(format!("uid-{name}")),
        generation,
        created: format!("2026-01-01T00:00:00Z{name}"),
        selector: Some(LabelSelector {
            match_labels: Some(selector),
            match_expressions: None,
        }),
        devices: Vec::new(),
        resources: vec![file(name, text)],
        deleting: false,
        max_unavailable: None,
        paused: false,
    }
}

/// Mean milliseconds of `runs` passes.
fn time_passes(
    runs: u32,
    devices: &[DeviceView<'_>],
    manifests: &[ManifestView],
    state: &HashMap<DeviceId, DeviceState>,
) -> f64 {
    let started = Instant::now();
    for _ in 0..runs {
        std::hint::black_box(plan(devices, manifests, state));
    }
    started.elapsed().as_secs_f64() * 1000.0 / f64::from(runs)
}

fn main() {
    // `cargo test --all-targets` runs benches too; only `cargo bench` passes `--bench`.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let sizes = fleetlet_testenv::bench::fleet_sizes("1000,10000");
    let mut results = Vec::new();
    for n in sizes {
        let labels: Vec<BTreeMap<String, String>> = (0..n)
            .map(|i| {
                BTreeMap::from([
                    ("fleet".to_owned(), "bench".to_owned()),
                    ("group".to_owned(), format!("g{}", i % 100)),
                ])
            })
            .collect();
        let devices: Vec<DeviceView<'_>> = labels
            .iter()
            .enumerate()
            .map(|(i, l)| DeviceView {
                id: DeviceId::new(format!("sim-{i}")).unwrap(),
                namespace: Cow::Borrowed("bench"),
                labels: Cow::Borrowed(l),
                paused: false,
                online: true,
                limits: DeviceLimits::default(),
            })
            .collect();
        let group = |g: usize| BTreeMap::from([("group".to_owned(), format!("g{g}"))]);
        let fleet = BTreeMap::from([("fleet".to_owned(), "bench".to_owned())]);
        let mut manifests: Vec<ManifestView> = (0..100)
            .map(|g| manifest(&format!("group-{g}"), 1, group(g), "group setting\n"))
            .collect();
        manifests.push(manifest("all", 1, fleet.clone(), "fleet-wide setting v1\n"));
        // The desired state the first plan gives, as the KV cache would hold it.
        let first = plan(&devices, &manifests, &HashMap::new());
        let state: HashMap<DeviceId, DeviceState> = first
            .devices
            .into_iter()
            .map(|(id, resources)| {
                let m = AgentManifest {
                    resources,
                    ..AgentManifest::new(id.clone(), 1)
                };
                let desired = Some(Arc::new(m));
                (
                    id,
                    DeviceState {
                        desired,
                        actual: None,
                    },
                )
            })
            .collect();
        let runs = if n >= 10_000 { 10 } else { 50 };
        let steady = time_passes(runs, &devices, &manifests, &state);
        if let Some(all) = manifests.last_mut() {
            *all = manifest("all", 2, fleet, "fleet-wide setting v2\n");
        }
        let rollout = time_passes(runs, &devices, &manifests, &state);
        println!(
            "{n} devices: steady pass {steady:.1} ms ({:.2} µs a device), rollout pass {rollout:.1} ms ({:.2} µs a device), mean of {runs}",
            steady * 1000.0 / n as f64,
            rollout * 1000.0 / n as f64
        );
        results.push(json!({ "devices": n, "runs": runs,
            "steadyPassMs": (steady * 100.0).round() / 100.0,
            "rolloutPassMs": (rollout * 100.0).round() / 100.0 }));
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fleetlet-bench");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(
        dir.join("plan.json"),
        serde_json::to_string_pretty(&json!({ "passes": results })).unwrap(),
    );
}
