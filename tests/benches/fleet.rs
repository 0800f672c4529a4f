//! The fleet at scale, end to end, against a real kube-apiserver and nats-server (a
//! benchmark, not a test): `scripts/bench fleet` (or `cargo bench -p fleetlet-testenv --bench
//! fleet` with release binaries in `FLEETLET_BENCH_BIN_DIR`).
//!
//! For each fleet size in `FLEETLET_BENCH_DEVICES` (default `100,1000,10000`): N EdgeDevices,
//! the release controller and bridge, and `fleetlet-sim` running N devices (real agent engine,
//! File resources under per-device temp dirs, one NATS connection each). Measures:
//! * fleet start: every virtual Node Ready;
//! * steady state over `FLEETLET_BENCH_WINDOW` seconds (default 60, rounded up to whole 30 s
//!   heartbeat intervals, so each device's beats count the same): apiserver writes/s by
//!   resource, NATS messages/s, bytes on the wire per device per hour (the devices' own
//!   connections, both directions), CPU of each process;
//! * apply→converged for an EdgeManifest selecting every device, created then changed: per
//!   device, the time from `kubectl apply` until its desired state holds the change (fan-out)
//!   and until its status reports the resource Ready (p50, p99, max; each key timed by when
//!   nats-server stored it), until the EdgeManifest's status counts every device Ready, and
//!   how long `kubectl apply` itself took (its caches warmed by a server-side dry run first);
//! * footprints: controller, bridge and simulator resident memory.
//!
//! With `FLEETLET_BENCH_NODE_PROJECTION=Disabled` the bridge projects no device as a Node
//! (`--node-projection=Disabled`): the fleet start waits for every EdgeDevice Ready instead,
//! and the results go to `fleet-no-nodes.json` and `fleet-<N>-no-nodes.json`.
//!
//! With `FLEETLET_BENCH_VK=N` (default 100) the same environment then runs N
//! virtual-kubelet mock nodes (`scripts/virtual-kubelet`, one process per node) in place of
//! fleetlet for N virtual nodes, measured over the same window. Results: stdout, and
//! `target/fleetlet-bench/fleet.json` (or under `FLEETLET_BENCH_OUT`).
//!
//! With `FLEETLET_BENCH_REPLICAS=1,2` (`scripts/bench sharding`) it runs each size once per
//! replica count, with that many controllers and bridges splitting the fleet into 8
//! shards (one replica: a single leader each), and writes `sharding.json`.
//!
//! `FLEETLET_BENCH_LOG` sets `RUST_LOG` of the controller and bridge (default `warn`) and
//! keeps their logs in `target/fleetlet-bench/logs/`.
//!
//! With `FLEETLET_BENCH_DURABILITY=N` (`scripts/bench durability`) it measures only what
//! NATS's durability settings cost: N devices against a 3-node cluster with the buckets at
//! 3 replicas, once with JetStream's default sync and once with `sync_interval: always`, a
//! manifest created and changed three times in each (`durability.json`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed setup ends the benchmark

use std::{
    collections::HashMap,
    io::BufRead,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use async_nats::jetstream::kv::Operation;
use fleetlet_crds::EdgeManifest;
use fleetlet_protocol::{AgentManifest, AgentStatus, ResourceStatus, decode};
use fleetlet_testenv::{
    TestEnv,
    bench::{
        Proc, apiserver_writes, bin, delta, nats_connection_bytes, nats_connection_msgs,
        nats_traffic, out_dir, peak_rss_mib, proc_stat, pss_mib, quantile,
    },
    process::free_port,
};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::{Api, api::ListParams};
use serde_json::{Value, json};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn spawn(program: &PathBuf, args: &[String], kubeconfig: &str, log: PathBuf) -> Proc {
    spawn_with(program, args, &[("KUBECONFIG", kubeconfig.into())], log)
}

fn spawn_with(program: &PathBuf, args: &[String], env: &[(&str, String)], log: PathBuf) -> Proc {
    Proc(
        Command::new(program)
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env(
                "RUST_LOG",
                std::env::var("FLEETLET_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", program.display())),
    )
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round()
}

fn summary(mut v: Vec<f64>) -> Value {
    v.sort_by(f64::total_cmp);
    json!({
        "count": v.len(),
        "p50Ms": quantile(&v, 0.5),
        "p99Ms": quantile(&v, 0.99),
        "maxMs": v.last(),
    })
}

/// Nodes matching `selector` whose name starts with `prefix` and that are Ready.
async fn ready_nodes(nodes: &Api<Node>, selector: &str, prefix: &str) -> usize {
    let Ok(list) = nodes.list(&ListParams::default().labels(selector)).await else {
        return 0;
    };
    list.items
        .iter()
        .filter(|n| {
            n.metadata
                .name
                .as_deref()
                .is_some_and(|m| m.starts_with(prefix))
        })
        .filter(|n| {
            n.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .count()
}

/// EdgeDevices in `namespace` whose status says Ready=True.
async fn ready_devices(client: &kube::Client, namespace: &str) -> usize {
    let api: Api<fleetlet_crds::EdgeDevice> = Api::namespaced(client.clone(), namespace);
    let Ok(list) = api.list(&ListParams::default()).await else {
        return 0;
    };
    list.items
        .iter()
        .filter(|d| {
            d.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            })
        })
        .count()
}

/// CPU seconds and RSS of each named process over a window; returns per-process JSON and
/// the wall time.
struct Window {
    started: Instant,
    cpu: Vec<(String, u32, f64)>,
    writes: std::collections::BTreeMap<String, f64>,
    /// When the apiserver's counters were read: the middle of the request, which at 10,000
    /// devices takes seconds (its `/metrics` is megabytes, made on a busy machine).
    writes_read: Instant,
    traffic: [f64; 4],
    device_bytes: f64,
}

impl Window {
    /// Reads every counter in the same order [`Window::close`] does, so that each one is
    /// counted over the same span however long the apiserver takes to answer.
    async fn open(client: &kube::Client, monitor: u16, procs: &[(&str, u32)]) -> Self {
        let started = Instant::now();
        let traffic = nats_traffic(monitor);
        let device_bytes = nats_connection_bytes(monitor, DEVICE_CONNECTIONS).1;
        let cpu = procs
            .iter()
            .map(|(n, pid)| (n.to_string(), *pid, proc_stat(*pid).1))
            .collect();
        let (writes, writes_read) = timed_writes(client).await;
        Self {
            started,
            cpu,
            writes,
            writes_read,
            traffic,
            device_bytes,
        }
    }

    /// Sleeps until `seconds` after the window opened. Give it a whole number of heartbeat
    /// intervals: every device is then counted the same number of times whatever the phase
    /// of its heartbeats, which keep the phases their connections had and so are not spread
    /// evenly over an interval.
    async fn wait(&self, seconds: u64) {
        tokio::time::sleep_until((self.started + Duration::from_secs(seconds)).into()).await;
    }

    async fn close(self, client: &kube::Client, monitor: u16, nodes: usize) -> Value {
        let secs = self.started.elapsed().as_secs_f64();
        let traffic = nats_traffic(monitor);
        let (conns, device_bytes) = nats_connection_bytes(monitor, DEVICE_CONNECTIONS);
        let stats: Vec<(f64, f64)> = self.cpu.iter().map(|(_, pid, _)| proc_stat(*pid)).collect();
        let (after, after_read) = timed_writes(client).await;
        // Writes are counted between the two reads of the apiserver's counters, not over
        // the window's nominal length.
        let write_secs = after_read.duration_since(self.writes_read).as_secs_f64();
        let writes = delta(&self.writes, &after);
        let total: f64 = writes
            .iter()
            .filter(|(k, _)| fleetlet_testenv::bench::accepted(k))
            .map(|(_, v)| v)
            .sum();
        let per_s = |i: usize| (traffic[i] - self.traffic[i]) / secs;
        let processes: serde_json::Map<String, Value> = self
            .cpu
            .iter()
            .zip(stats)
            .map(|((name, _, cpu0), (rss, cpu1))| {
                (
                    name.clone(),
                    json!({ "rssMiB": (rss * 10.0).round() / 10.0,
                            "cpuPercent": ((cpu1 - cpu0) / secs * 1000.0).round() / 10.0,
                            "cpuSeconds": cpu1 - cpu0 }),
                )
            })
            .collect();
        let wire = if conns > 0 {
            Some((device_bytes - self.device_bytes) / conns as f64 * 3600.0 / secs)
        } else {
            None
        };
        json!({
            "seconds": secs.round(),
            "apiserverWritesSeconds": (write_secs * 10.0).round() / 10.0,
            "apiserverWritesPerSecond": (total / write_secs * 100.0).round() / 100.0,
            "apiserverWritesPerNodePerMinute": (total / write_secs * 60.0 / nodes.max(1) as f64 * 100.0).round() / 100.0,
            "apiserverWritesByResource": writes.iter().map(|(k, v)| (k.clone(), json!((v / write_secs * 100.0).round() / 100.0))).collect::<serde_json::Map<_, _>>(),
            "natsMessagesInPerSecond": per_s(0).round(),
            "natsMessagesOutPerSecond": per_s(1).round(),
            "natsBytesInPerSecond": per_s(2).round(),
            "natsBytesOutPerSecond": per_s(3).round(),
            "deviceConnections": conns,
            "bytesPerDevicePerHour": wire.map(f64::round),
            "processes": processes,
        })
    }
}

/// [`apiserver_writes`] and when the counters were read (the middle of the request).
async fn timed_writes(client: &kube::Client) -> (std::collections::BTreeMap<String, f64>, Instant) {
    let asked = Instant::now();
    let writes = apiserver_writes(client).await;
    (writes, asked + asked.elapsed() / 2)
}

/// The bridge's count of its apiserver writes of `kind`, from its metrics endpoint.
fn bridge_writes(port: u16, kind: &str) -> f64 {
    let label = format!("kind=\"{kind}\"");
    fleetlet_testenv::bench::local_get(port, "/metrics")
        .lines()
        .filter(|l| l.starts_with("fleetlet_bridge_apiserver_writes_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// From the bridge's `heartbeat_to_lease_ms` histogram, over its whole run: renewals made,
/// those written more than 30 s (one Lease interval) after their heartbeat, and those more
/// than 90 s after it (the grace period: an observer could have seen the Lease expire).
fn lease_lag(port: u16) -> Value {
    let text = fleetlet_testenv::bench::local_get(port, "/metrics");
    let bucket = |le: &str| -> f64 {
        let prefix = format!("fleetlet_bridge_heartbeat_to_lease_ms_bucket{{le=\"{le}\"}}");
        text.lines()
            .filter(|l| l.starts_with(&prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let all = bucket("+Inf");
    json!({
        "renewals": all,
        "laterThan30s": all - bucket("30000.0"),
        "laterThan90s": all - bucket("90000.0"),
    })
}

/// How the name of every device's NATS connection starts (the agent names it after its
/// device), which tells the devices' connections from the control plane's.
const DEVICE_CONNECTIONS: &str = "fleetlet-agent/";

/// The devices' heartbeat interval: the agent's default, which the simulator keeps.
const HEARTBEAT_SECONDS: u64 = 30;

/// The steady window: `FLEETLET_BENCH_WINDOW` seconds (default 60), rounded up to a whole
/// number of heartbeat intervals (see [`Window::wait`]).
fn window_seconds() -> u64 {
    let asked: u64 = env_or("FLEETLET_BENCH_WINDOW", 60);
    asked.div_ceil(HEARTBEAT_SECONDS).max(1) * HEARTBEAT_SECONDS
}

/// Waits until start-up's writes are done: at least 20 s, then until 10 s pass with under
/// one apiserver write a second besides Lease renewals (the steady state's own writes),
/// Lease writes no faster than `leases_per_second` (one per device heartbeat) with 5 a
/// second (leader and shard Leases) to spare, and no device sending the server more than
/// one message (its heartbeat, every 30 s): renewals still catching up on a backlog, and
/// devices still writing status or facts after start-up or a rollout, are not steady state.
/// The devices are counted one by one, not by their rate: their heartbeats keep the phases
/// their connections had, so 10 s of a settled fleet may hold more than a third of its
/// beats. At most 10 minutes. Returns the seconds waited.
async fn settle(client: &kube::Client, monitor: u16, leases_per_second: f64) -> f64 {
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    loop {
        let (before, from) = timed_writes(client).await;
        let sent = nats_connection_msgs(monitor, DEVICE_CONNECTIONS);
        tokio::time::sleep(Duration::from_secs(10)).await;
        let (after, to) = timed_writes(client).await;
        let busy = nats_connection_msgs(monitor, DEVICE_CONNECTIONS)
            .iter()
            .filter(|(cid, n)| **n - sent.get(cid).copied().unwrap_or(0.0) > 1.0)
            .count();
        let span = to.duration_since(from).as_secs_f64();
        let (mut leases, mut others) = (0.0, 0.0);
        for (resource, n) in delta(&before, &after) {
            if resource.starts_with("leases") {
                leases += n;
            } else {
                others += n;
            }
        }
        let leases_steady = leases <= (leases_per_second + 5.0) * span;
        if (others < 10.0 && leases_steady && busy == 0)
            || started.elapsed() > Duration::from_secs(600)
        {
            return started.elapsed().as_secs_f64();
        }
        eprintln!(
            "   not settled: {others} writes besides Leases, {:.1} Lease writes/s, \
             {busy} devices sent more than one message in {span:.0}s",
            leases / span
        );
    }
}

/// The controllers' counters a rollout moves, summed over the replicas whose metrics are
/// served on `ports`: fleet passes, status patches (EdgeManifest status and EdgeDevice
/// `desiredGeneration`) and generations left unrecorded because the device applied them in
/// time.
fn controller_counters(ports: &[u16]) -> [f64; 3] {
    let mut out = [0.0; 3];
    for port in ports {
        let text = fleetlet_testenv::bench::local_get(*port, "/metrics");
        for (i, name) in ["passes", "status_patches", "generations_unrecorded"]
            .iter()
            .enumerate()
        {
            let prefix = format!("fleetlet_controller_{name}_total ");
            out[i] += text
                .lines()
                .filter_map(|l| l.strip_prefix(&prefix)?.trim().parse::<f64>().ok())
                .sum::<f64>();
        }
    }
    out
}

/// How far the controllers' counters moved from `before` to `after`.
fn counters_moved(before: [f64; 3], after: [f64; 3]) -> Value {
    let d = |i: usize| after[i] - before[i];
    json!({ "passes": d(0), "statusPatches": d(1), "generationsUnrecorded": d(2) })
}

/// Applies an EdgeManifest selecting every device and measures, per device, fan-out and
/// convergence, and the time until its status counts every device Ready; the CPU time each
/// of `procs` took from the apply until the last device converged; the apiserver's writes
/// from the apply until the EdgeManifest counted every device Ready; and the controllers'
/// counters (metrics on `controller_ports`) until convergence and once every generation
/// the rollout wrote is due to be recorded.
async fn rollout(
    env: &TestEnv,
    n: usize,
    text: &str,
    procs: &[(&str, u32)],
    controller_ports: &[u16],
) -> Value {
    let js = env.jetstream().await.unwrap();
    let desired = js.get_key_value("desired-state").await.unwrap();
    let actual = js.get_key_value("actual-state").await.unwrap();
    let mut desired_w = desired.watch_all().await.unwrap();
    let mut actual_w = actual.watch_all().await.unwrap();
    let client = env.kube_client().await.unwrap();
    let manifests: Api<EdgeManifest> = Api::namespaced(client.clone(), "bench");
    let before = manifests
        .get_opt("rollout")
        .await
        .unwrap()
        .and_then(|m| m.metadata.generation)
        .unwrap_or(0);
    let target = before + 1;
    let yaml = format!(
        "apiVersion: fleetlet.dev/v1alpha1\nkind: EdgeManifest\nmetadata: {{ name: rollout, namespace: bench }}\nspec:\n  selector: {{ matchLabels: {{ fleet: bench }} }}\n  resources:\n    - id: motd\n      file: {{ path: /etc/fleetlet/motd, content: {{ text: \"{text}\" }} }}\n"
    );
    // kubectl's caches are warm first, as on the machine of an operator who has run it
    // before: with a cold discovery cache the first apply of a run took kubectl 1.2 to
    // 1.9 s where a warm one took 0.06 to 0.3 s. A server-side dry run of the same apply
    // stores nothing.
    let mut warm = env.apply_command(&yaml, true).unwrap();
    warm.arg("--dry-run=server");
    let out = tokio::process::Command::from(warm).output().await.unwrap();
    assert!(
        out.status.success(),
        "kubectl apply --dry-run=server: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Read everything already in the buckets first, so only new entries count.
    let drain = async |w: &mut async_nats::jetstream::kv::Watch| {
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(300), w.next()).await {}
    };
    drain(&mut desired_w).await;
    drain(&mut actual_w).await;
    // kubectl runs beside the watches: a key is timed by when the server stored it, not by
    // when this loop gets to read it, and kubectl's own time is recorded apart.
    // Server-side, as GitOps tools apply: kubectl sends one request. A client-side apply
    // computes its patch first; for a change that took kubectl itself 1.1 s at 1,000
    // devices and 2.2 s at 10,000 on these machines.
    let cmd = env.apply_command(&yaml, true).unwrap();
    let since_epoch = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128)
    };
    // Read before the clock starts: at 10,000 devices the apiserver takes seconds to answer.
    let writes_before = apiserver_writes(&client).await;
    let counters_before = controller_counters(controller_ports);
    let cpu_now = || -> Vec<f64> { procs.iter().map(|(_, pid)| proc_stat(*pid).1).collect() };
    let t0 = since_epoch(std::time::SystemTime::now());
    let cpu_before = cpu_now();
    let mut cpu_converged: Option<(Duration, Vec<f64>)> = None;
    let mut counters_converged = None;
    let applied = Instant::now();
    let mut apply = Box::pin(tokio::process::Command::from(cmd).output());
    let mut kubectl: Option<Duration> = None;
    let stored_at = |created: i128| Duration::from_nanos(u64::try_from(created - t0).unwrap_or(0));
    // Per device: the agent-manifest generation carrying the change, and when it was
    // written; when its status first reported the resource Ready at that generation.
    let mut carried: HashMap<String, (u64, Duration)> = HashMap::new();
    let mut ready: HashMap<String, Duration> = HashMap::new();
    let mut pending_status: HashMap<String, (AgentStatus, Duration)> = HashMap::new();
    let mut status_done: Option<Duration> = None;
    let deadline = applied + Duration::from_secs(600);
    let mut poll = tokio::time::interval(Duration::from_millis(200));
    let check = |s: &AgentStatus, g: u64| {
        s.observed_generation >= g
            && s.resources
                .iter()
                .any(|(id, r)| id.as_str() == "motd" && matches!(r, ResourceStatus::Ready { .. }))
    };
    while Instant::now() < deadline
        && (ready.len() < n || status_done.is_none() || kubectl.is_none())
    {
        if ready.len() >= n && cpu_converged.is_none() {
            cpu_converged = Some((applied.elapsed(), cpu_now()));
            counters_converged = Some(controller_counters(controller_ports));
        }
        tokio::select! {
            out = &mut apply, if kubectl.is_none() => {
                let out = out.unwrap();
                assert!(out.status.success(), "kubectl apply: {}", String::from_utf8_lossy(&out.stderr));
                kubectl = Some(applied.elapsed());
            }
            Some(Ok(e)) = desired_w.next() => {
                if e.operation != Operation::Put { continue }
                let Ok(m) = decode::<AgentManifest>(&e.value) else { continue };
                let has = m.resources.iter().any(|r| r.id.as_str() == "motd"
                    && r.owner.name == "rollout" && r.owner.generation == target);
                if has && !carried.contains_key(&e.key) {
                    carried.insert(e.key.clone(), (m.generation, stored_at(e.created.unix_timestamp_nanos())));
                    if let Some((s, at)) = pending_status.remove(&e.key)
                        && check(&s, m.generation) {
                        ready.insert(e.key.clone(), at);
                    }
                }
            }
            Some(Ok(e)) = actual_w.next() => {
                if e.operation != Operation::Put || ready.contains_key(&e.key) { continue }
                let Ok(s) = decode::<AgentStatus>(&e.value) else { continue };
                let at = stored_at(e.created.unix_timestamp_nanos());
                match carried.get(&e.key) {
                    Some((g, _)) if check(&s, *g) => { ready.insert(e.key.clone(), at); }
                    Some(_) => {}
                    None => { pending_status.insert(e.key.clone(), (s, at)); }
                }
            }
            _ = poll.tick() => {
                if status_done.is_none()
                    && let Ok(m) = manifests.get_status("rollout").await
                    && let Some(s) = m.status
                    && s.observed_generation == Some(target)
                    && s.ready as usize >= n
                {
                    status_done = Some(applied.elapsed());
                }
            }
        }
    }
    if ready.len() >= n && cpu_converged.is_none() {
        cpu_converged = Some((applied.elapsed(), cpu_now()));
        counters_converged = Some(controller_counters(controller_ports));
    }
    let writes = delta(&writes_before, &apiserver_writes(&client).await);
    // Generations are recorded the controller's `--record-generation-after-seconds` (5 by
    // default) after they were written: by then every one this rollout wrote is due.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let counters_after = controller_counters(controller_ports);
    // The CPU each process took while the rollout converged, and the cores there were.
    let cpu = cpu_converged.map(|(span, after)| {
        let by: serde_json::Map<String, Value> = procs
            .iter()
            .zip(after.iter().zip(&cpu_before))
            .map(|((name, _), (a, b))| (name.to_string(), json!(((a - b) * 100.0).round() / 100.0)))
            .collect();
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        json!({ "spanMs": ms(span), "cores": cores, "byProcess": by })
    });
    // Each device's own part: from its key being stored to its status being stored.
    let device_side = ready
        .iter()
        .filter_map(|(k, at)| Some(ms(at.saturating_sub(carried.get(k)?.1))))
        .collect();
    json!({
        "generation": target,
        "fanOut": summary(carried.values().map(|(_, t)| ms(*t)).collect()),
        "deviceSide": summary(device_side),
        "cpuSeconds": cpu,
        "apiserverWrites": writes,
        "controllerUntilConverged": counters_converged.map(|c| counters_moved(counters_before, c)),
        "controllerUntilRecordsDue": counters_moved(counters_before, counters_after),
        "converged": summary(ready.values().map(|t| ms(*t)).collect()),
        "edgeManifestReadyMs": status_done.map(ms),
        "kubectlApplyMs": kubectl.map(ms),
        "devices": n,
    })
}

/// Shards when a phase runs more than one replica of each component.
const BENCH_SHARDS: u32 = 8;

async fn fleet_phase(
    n: usize,
    window: u64,
    vk: usize,
    profile: bool,
    nodes_on: bool,
    replicas: usize,
) -> Value {
    eprintln!(
        "== {n} devices{}",
        if nodes_on { "" } else { ", without Nodes" }
    );
    let env = TestEnv::builder().kube().nats().start().await.unwrap();
    let client = env.kube_client().await.unwrap();
    let kubeconfig = env.kubeconfig().unwrap().display().to_string();
    let monitor = env.nats.as_ref().unwrap().monitor_port;
    fleetlet_testenv::bench::create_namespaces(&client, &["bench", "fleetlet-system"]).await;
    let created = fleetlet_testenv::bench::create_devices(&client, "bench", n, |i| {
        json!({ "name": format!("sim-{i}"), "labels": { "fleet": "bench", "group": format!("g{}", i % 100) } })
    })
    .await;
    eprintln!("   {n} EdgeDevices in {created:.1}s");

    // The simulated devices' state and files live in memory when it can: each real device
    // syncs its own storage, while thousands of simulated ones syncing one disk would
    // measure that disk.
    let dir = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap();
    let url = env.nats_url().unwrap().to_string();
    let common = |metrics: u16, extra: &[&str]| {
        let mut a = vec![
            format!("--nats-url={url}"),
            format!("--metrics-addr=127.0.0.1:{metrics}"),
            "--lease-namespace=fleetlet-system".into(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    // With more than one replica, each component splits the fleet into shards.
    let sharding = |name: &str, k: usize| -> Vec<String> {
        if replicas > 1 {
            vec![
                format!("--shards={BENCH_SHARDS}"),
                format!("--identity={name}-{k}"),
            ]
        } else {
            Vec::new()
        }
    };
    let log_name = |name: &str, k: usize| {
        if k == 0 {
            format!("{name}.log")
        } else {
            format!("{name}-{k}.log")
        }
    };
    let controller_ports: Vec<u16> = (0..replicas).map(|_| free_port().unwrap()).collect();
    let controllers: Vec<Proc> = controller_ports
        .iter()
        .enumerate()
        .map(|(k, port)| {
            let extra = sharding("controller", k);
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            spawn(
                &bin("fleetlet-controller"),
                &common(*port, &extra),
                &kubeconfig,
                dir.path().join(log_name("controller", k)),
            )
        })
        .collect();
    let projection = format!(
        "--node-projection={}",
        if nodes_on { "Enabled" } else { "Disabled" }
    );
    let bridge_ports: Vec<u16> = (0..replicas).map(|_| free_port().unwrap()).collect();
    let bridges: Vec<Proc> = bridge_ports
        .iter()
        .enumerate()
        .map(|(k, port)| {
            let mut extra = sharding("bridge", k);
            extra.push(projection.clone());
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            spawn(
                &bin("fleetlet-bridge"),
                &common(*port, &extra),
                &kubeconfig,
                dir.path().join(log_name("bridge", k)),
            )
        })
        .collect();
    let bridge_metrics = bridge_ports[0];
    let sim_started = Instant::now();
    let mut sim = Proc(
        Command::new(bin("fleetlet-sim"))
            .args([
                format!("--nats-url={url}"),
                format!("--devices={n}"),
                format!("--dir={}", dir.path().join("sim").display()),
            ])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.path().join("sim.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let out = sim.0.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut l = String::new();
        std::io::BufReader::new(out).read_line(&mut l).map(|_| l)
    })
    .await
    .unwrap()
    .unwrap();
    let sim_report: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
    eprintln!("   simulator: {}", line.trim());
    let nodes: Api<Node> = Api::all(client.clone());
    let selector = "fleetlet.dev/device";
    let what = if nodes_on { "nodes" } else { "EdgeDevices" };
    loop {
        let r = if nodes_on {
            ready_nodes(&nodes, selector, "sim-").await
        } else {
            ready_devices(&client, "bench").await
        };
        if r >= n {
            break;
        }
        assert!(
            sim_started.elapsed() < Duration::from_secs(900),
            "only {r} of {n} {what} Ready after 15 minutes"
        );
        tokio::time::sleep(Duration::from_secs(if nodes_on { 1 } else { 5 })).await;
    }
    let fleet_ready = sim_started.elapsed();
    eprintln!(
        "   {n} {what} Ready {:.1}s after the simulator started; settling",
        fleet_ready.as_secs_f64()
    );
    // The agent's default heartbeat, one Lease renewal each where Nodes are projected.
    let beats = if nodes_on {
        n as f64 / HEARTBEAT_SECONDS as f64
    } else {
        0.0
    };
    let settled = settle(&client, monitor, beats).await;
    eprintln!("   settled {settled:.0}s later");

    // One replica is "controller" and "bridge"; several are "controller-0", "controller-1"...
    let named = |name: &str, k: usize| {
        if replicas == 1 {
            name.to_string()
        } else {
            format!("{name}-{k}")
        }
    };
    let mut procs: Vec<(String, u32)> = Vec::new();
    for (k, c) in controllers.iter().enumerate() {
        procs.push((named("controller", k), c.pid()));
    }
    for (k, b) in bridges.iter().enumerate() {
        procs.push((named("bridge", k), b.pid()));
    }
    procs.push(("simulator".into(), sim.pid()));
    procs.push((
        "nats-server".into(),
        env.nats.as_ref().unwrap().program_pid().unwrap_or(0),
    ));
    // The apiserver and etcd too: the fleet's Lease renewals cost them CPU whether anything
    // rolls out or not.
    let (apiserver, etcd) = env.kube.as_ref().map_or((None, None), |k| k.program_pids());
    procs.extend([
        ("kube-apiserver".into(), apiserver.unwrap_or(0)),
        ("etcd".into(), etcd.unwrap_or(0)),
    ]);
    let procs: Vec<(&str, u32)> = procs.iter().map(|(n, p)| (n.as_str(), *p)).collect();
    // The bridges' own count of the Lease renewals they made, beside the apiserver's count,
    // read just before the window's counters open and close, over a span of its own
    // (reading the apiserver's metrics takes seconds at this size).
    let renewals_now = || -> f64 {
        bridge_ports
            .iter()
            .map(|p| bridge_writes(*p, "lease"))
            .sum()
    };
    let (renewed, counted) = (renewals_now(), Instant::now());
    let w = Window::open(&client, monitor, &procs).await;
    w.wait(window).await;
    let renewals = renewals_now() - renewed;
    let span = counted.elapsed().as_secs_f64();
    let mut steady = w.close(&client, monitor, n).await;
    steady["bridgeLeaseRenewalsPerSecond"] = json!((renewals / span * 100.0).round() / 100.0);
    eprintln!("   steady state: {steady}");

    // At the largest size, profile the whole machine while the first rollout runs.
    let perf_data = dir.path().join("perf.data");
    let mut perf = profile.then(|| {
        Command::new("perf")
            .args(["record", "-a", "-g", "-F", "199", "-o"])
            .arg(&perf_data)
            .args(["--", "sleep", "25"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
    });
    // The rollouts' CPU also counts this process (which reads both buckets' watches).
    let mut rollout_procs = procs.clone();
    rollout_procs.push(("bench", std::process::id()));
    let create = rollout(&env, n, "first", &rollout_procs, &controller_ports).await;
    if let Some(Ok(p)) = perf.as_mut() {
        let _ = p.wait();
        write_profile(&perf_data, &procs);
    }
    eprintln!("   rollout (create): {create}");
    // The change comes to a settled fleet, as the first rollout did: not into the status
    // writes that follow the first one (each device's resource lines and conditions).
    let settled_before_change = settle(&client, monitor, beats).await;
    eprintln!("   settled {settled_before_change:.0}s after the first rollout");
    let update = rollout(&env, n, "second", &rollout_procs, &controller_ports).await;
    eprintln!("   rollout (update): {update}");
    let footprint = |pid: u32| (proc_stat(pid).0 * 10.0).round() / 10.0;
    let peak = |pid: u32| (peak_rss_mib(pid) * 10.0).round() / 10.0;
    // Each component's figure is the sum over its replicas; by replica beside it.
    let each = |ps: &[Proc], f: &dyn Fn(u32) -> f64| -> Vec<f64> {
        ps.iter().map(|p| f(p.pid())).collect()
    };
    let sum = |v: &[f64]| (v.iter().sum::<f64>() * 10.0).round() / 10.0;
    let (c_rss, b_rss) = (each(&controllers, &footprint), each(&bridges, &footprint));
    let (c_peak, b_peak) = (each(&controllers, &peak), each(&bridges, &peak));
    let footprints = json!({
        "controllerRssMiB": sum(&c_rss),
        "bridgeRssMiB": sum(&b_rss),
        "controllerPeakRssMiB": sum(&c_peak),
        "bridgePeakRssMiB": sum(&b_peak),
        "controllerRssMiBByReplica": c_rss,
        "bridgeRssMiBByReplica": b_rss,
        "simulatorRssMiB": footprint(sim.pid()),
        "simulatorRssKiBPerDevice": (proc_stat(sim.pid()).0 * 1024.0 / n as f64).round(),
    });
    eprintln!("   footprints: {footprints}");

    let node_count = nodes
        .list(&ListParams::default().labels(selector))
        .await
        .map_or(0, |l| l.items.len());
    let mut result = json!({
        "devices": n,
        "replicas": replicas,
        "shards": if replicas > 1 { BENCH_SHARDS } else { 1 },
        "nodeProjection": if nodes_on { "Enabled" } else { "Disabled" },
        "nodes": node_count,
        "simulator": sim_report,
        "nodesReadySeconds": (fleet_ready.as_secs_f64() * 10.0).round() / 10.0,
        "settledSeconds": settled.round(),
        "settledBeforeChangeSeconds": settled_before_change.round(),
        "steadyState": steady,
        "rolloutCreate": create,
        "rolloutUpdate": update,
        "footprints": footprints,
        "leaseLag": if nodes_on && replicas == 1 { lease_lag(bridge_metrics) } else { Value::Null },
    });
    keep_logs(dir.path(), &format!("fleet-{n}"));
    if vk > 0 {
        drop(sim);
        drop(bridges);
        drop(controllers);
        result["virtualKubelet"] = virtual_kubelet(&env, vk, window, dir.path()).await;
    }
    result
}

/// With `FLEETLET_BENCH_LOG` set, the controller's and bridge's logs of a phase are copied to
/// `target/fleetlet-bench/logs/<phase>/` (the phase's own directory goes with it).
fn keep_logs(dir: &std::path::Path, phase: &str) {
    if std::env::var_os("FLEETLET_BENCH_LOG").is_none() {
        return;
    }
    let to = out_dir().join("logs").join(phase);
    std::fs::create_dir_all(&to).unwrap();
    for name in ["controller.log", "bridge.log"] {
        let _ = std::fs::copy(dir.join(name), to.join(name));
    }
    eprintln!("   logs kept in {}", to.display());
}

/// A port for mock node `i`'s kubelet listener (on every interface): below the ephemeral
/// range, so no outgoing connection takes it between choosing and binding, and free now.
fn vk_port(i: usize) -> u16 {
    let mut port = 21000 + (i as u16) * 7;
    while std::net::TcpListener::bind(("0.0.0.0", port)).is_err() {
        port += 1;
    }
    port
}

/// N virtual-kubelet mock nodes against the same apiserver, measured like fleetlet.
async fn virtual_kubelet(env: &TestEnv, n: usize, window: u64, dir: &std::path::Path) -> Value {
    let Ok(program) = std::env::var("FLEETLET_BENCH_VIRTUAL_KUBELET") else {
        eprintln!("   virtual-kubelet: FLEETLET_BENCH_VIRTUAL_KUBELET not set; skipped");
        return Value::Null;
    };
    eprintln!("== {n} virtual-kubelet mock nodes");
    let client = env.kube_client().await.unwrap();
    let kubeconfig = env.kubeconfig().unwrap().display().to_string();
    let monitor = env.nats.as_ref().unwrap().monitor_port;
    // Every node serves the kubelet API (any certificate will do) and reads its capacity
    // from one provider config.
    let pki = dir.join("vk-pki");
    fleetlet_testenv::pki::Pki::generate()
        .unwrap()
        .write(&pki)
        .unwrap();
    let config: serde_json::Map<String, Value> = (0..n)
        .map(|i| {
            (
                format!("vk-{i}"),
                json!({ "cpu": "4", "memory": "8Gi", "pods": "110" }),
            )
        })
        .collect();
    let config_path = dir.join("vk-mock.json");
    std::fs::write(&config_path, Value::Object(config).to_string()).unwrap();
    let started = Instant::now();
    let mut procs = Vec::new();
    for i in 0..n {
        let args = vec![
            "--provider=mock".to_string(),
            format!("--provider-config={}", config_path.display()),
            format!("--nodename=vk-{i}"),
            format!("--kubeconfig={kubeconfig}"),
            "--log-level=warn".into(),
        ];
        let env = [
            ("KUBELET_PORT", vk_port(i).to_string()),
            ("VKUBELET_POD_IP", "127.0.0.1".into()),
            (
                "APISERVER_CERT_LOCATION",
                pki.join("apiserver.crt").display().to_string(),
            ),
            (
                "APISERVER_KEY_LOCATION",
                pki.join("apiserver.key").display().to_string(),
            ),
        ];
        procs.push(spawn_with(
            &PathBuf::from(&program),
            &args,
            &env,
            dir.join(format!("vk-{i}.log")),
        ));
    }
    let nodes: Api<Node> = Api::all(client.clone());
    let mut up = 0;
    while started.elapsed() < Duration::from_secs(180) {
        up = ready_nodes(&nodes, "", "vk-").await;
        if up >= n {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    if up < n {
        // Say why, from the logs of the processes that gave up.
        for (i, p) in procs.iter_mut().enumerate() {
            if let Ok(Some(status)) = p.0.try_wait() {
                let log =
                    std::fs::read_to_string(dir.join(format!("vk-{i}.log"))).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(3).collect();
                eprintln!("   vk-{i} exited ({status}): {tail:?}");
            }
        }
        eprintln!("   only {up} of {n} virtual-kubelet nodes Ready after 180 s; measuring those");
    }
    let ready = started.elapsed();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let pids: Vec<(String, u32)> = procs
        .iter()
        .enumerate()
        .map(|(i, p)| (format!("vk-{i}"), p.pid()))
        .collect();
    let named: Vec<(&str, u32)> = pids.iter().map(|(n, p)| (n.as_str(), *p)).collect();
    let w = Window::open(&client, monitor, &named).await;
    w.wait(window).await;
    let mut steady = w.close(&client, monitor, up).await;
    // Sum the per-process figures: one process per node. The copies share the binary's
    // pages, so proportional set size (PSS) is what they cost together.
    let (mut rss, mut cpu) = (0.0, 0.0);
    if let Some(m) = steady["processes"].as_object() {
        for v in m.values() {
            rss += v["rssMiB"].as_f64().unwrap_or(0.0);
            cpu += v["cpuSeconds"].as_f64().unwrap_or(0.0);
        }
    }
    let pss: f64 = procs.iter().map(|p| pss_mib(p.pid())).sum();
    steady["processes"] = json!({ "virtual-kubelet (all)": {
        "rssMiB": (rss * 10.0).round() / 10.0,
        "cpuPercent": (cpu / steady["seconds"].as_f64().unwrap_or(1.0).max(1.0) * 1000.0).round() / 10.0,
        "rssMiBPerNode": (rss / up.max(1) as f64 * 10.0).round() / 10.0,
        "pssMiB": (pss * 10.0).round() / 10.0,
        "pssMiBPerNode": (pss / up.max(1) as f64 * 10.0).round() / 10.0 } });
    // Nodes and Leases stay behind when virtual-kubelet stops; the environment goes anyway.
    drop(procs);
    eprintln!("   virtual-kubelet steady state: {steady}");
    json!({ "nodes": n, "nodesReady": up, "nodesReadySeconds": (ready.as_secs_f64() * 10.0).round() / 10.0, "steadyState": steady })
}

/// CPU by process, and the hottest functions of each process of `procs` that took at least
/// 5 % of the samples, from a `perf record -a`, into `target/fleetlet-bench/profile.txt`.
/// Processes are told apart by pid: the Rust ones all name their threads alike.
fn write_profile(data: &std::path::Path, procs: &[(&str, u32)]) {
    let report = |args: &[&str]| {
        Command::new("perf")
            .args(["report", "--stdio", "-g", "none", "-i"])
            .arg(data)
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let lines = |text: String, max: usize| -> Vec<String> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .take(max)
            .map(|l| l.trim_end().to_string())
            .collect()
    };
    let by_comm = lines(report(&["--sort", "comm", "--percent-limit", "1"]), 12);
    // Each process's share: perf's `pid` key is per thread, so the threads are summed.
    let mut shares: Vec<(&str, u32, f64)> = procs.iter().map(|(n, p)| (*n, *p, 0.0)).collect();
    // Lines are `<children %> <self %> <tid>:<comm>`; a comm may hold spaces.
    let by_thread = report(&["--no-children", "--sort", "pid", "--percent-limit", "0.01"]);
    for l in by_thread.lines().filter(|l| !l.starts_with('#')) {
        let mut words = l.split_whitespace();
        let (Some(pct), Some(thread)) = (words.next(), words.next()) else {
            continue;
        };
        let Some(pct) = pct.strip_suffix('%').and_then(|p| p.parse::<f64>().ok()) else {
            continue;
        };
        let Some(tid) = thread.split(':').next().and_then(|t| t.parse::<u32>().ok()) else {
            continue;
        };
        let tgid = std::fs::read_to_string(format!("/proc/{tid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Tgid:"))
                    .and_then(|v| v.trim().parse::<u32>().ok())
            });
        if let Some(share) = shares.iter_mut().find(|(_, p, _)| Some(*p) == tgid) {
            share.2 += pct;
        }
    }
    shares.sort_by(|a, b| b.2.total_cmp(&a.2));
    let mut text = format!(
        "CPU by process (perf record -a -g, 199 Hz, 25 s from the start of the largest rollout):\n{}\n",
        by_comm.join("\n"),
    );
    for (name, pid, share) in shares.iter().filter(|(_, _, s)| *s >= 5.0) {
        let symbols = lines(
            report(&[
                "--no-children",
                "--pid",
                &pid.to_string(),
                "--percentage",
                "relative",
                "--sort",
                "dso,sym",
                "--percent-limit",
                "1.5",
            ]),
            15,
        );
        text.push_str(&format!(
            "\nHottest functions of {name} ({share:.1} % of the samples; percentages of its own):\n{}\n",
            symbols.join("\n")
        ));
    }
    let dir = out_dir();
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("profile.txt"), text);
}

/// One durability setting: a 3-node NATS cluster (buckets at 3 replicas, stores on this
/// machine's disk), the release controller and `n` simulated devices; a manifest created,
/// then changed three times. `sync_always`: every node runs `sync_interval: always`.
async fn durability_phase(n: usize, sync_always: bool) -> Value {
    let sync = if sync_always { "always" } else { "default" };
    eprintln!("== durability: {n} devices, 3-node NATS cluster, sync {sync}");
    let config = if sync_always {
        "jetstream { sync_interval: always }\n"
    } else {
        ""
    };
    let env = TestEnv::builder()
        .kube()
        .nats_cluster_with(3, config)
        .start()
        .await
        .unwrap();
    let client = env.kube_client().await.unwrap();
    let kubeconfig = env.kubeconfig().unwrap().display().to_string();
    fleetlet_testenv::bench::create_namespaces(&client, &["bench", "fleetlet-system"]).await;
    fleetlet_testenv::bench::create_devices(
        &client,
        "bench",
        n,
        |i| json!({ "name": format!("sim-{i}"), "labels": { "fleet": "bench" } }),
    )
    .await;
    // The devices' own state in memory (each real device syncs its own storage); the NATS
    // stores stay on disk, which is what this measures.
    let dir = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap();
    let url = env.nats_url().unwrap().to_string();
    let controller_port = free_port().unwrap();
    let _controller = spawn(
        &bin("fleetlet-controller"),
        &[
            format!("--nats-url={url}"),
            format!("--metrics-addr=127.0.0.1:{controller_port}"),
            "--lease-namespace=fleetlet-system".into(),
            "--kv-replicas=3".into(),
        ],
        &kubeconfig,
        dir.path().join("controller.log"),
    );
    let _sim = Proc(
        Command::new(bin("fleetlet-sim"))
            .args([
                format!("--nats-url={url}"),
                format!("--devices={n}"),
                format!("--dir={}", dir.path().join("sim").display()),
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("sim.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let create = rollout(&env, n, "created", &[], &[controller_port]).await;
    eprintln!("   created: {}", create["converged"]);
    let mut updates = Vec::new();
    for i in 1..=3 {
        let r = rollout(&env, n, &format!("changed {i}"), &[], &[controller_port]).await;
        eprintln!("   change {i}: {}", r["converged"]);
        updates.push(r);
    }
    json!({ "sync": sync, "devices": n, "replicas": 3, "rolloutCreate": create, "rolloutUpdates": updates })
}

/// `FLEETLET_BENCH_REPLICAS=1,2`: each size of `FLEETLET_BENCH_DEVICES` (default 1000) with
/// each number of replicas of the controller and the bridge, one after the other in one
/// run, Nodes projected; written to `sharding.json`.
async fn sharding(list: &str) {
    let replicas: Vec<usize> = list
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .filter(|r| *r > 0)
        .collect();
    let sizes = fleetlet_testenv::bench::fleet_sizes("1000");
    let window = window_seconds();
    let mut runs = Vec::new();
    for n in sizes {
        for r in &replicas {
            let mut run = fleet_phase(n, window, 0, false, true, *r).await;
            run["windowSeconds"] = json!(window);
            runs.push(run);
        }
    }
    let out = json!({ "runs": runs, "windowSeconds": window });
    let dir = out_dir();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("sharding.json"),
        serde_json::to_string_pretty(&out).unwrap(),
    )
    .unwrap();
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
}

#[tokio::main]
async fn main() {
    if std::env::var_os("FLEETLET_BENCH_DURABILITY").is_some() {
        let n: usize = env_or("FLEETLET_BENCH_DURABILITY", 1000);
        let runs = vec![
            durability_phase(n, false).await,
            durability_phase(n, true).await,
        ];
        let out = json!({ "runs": runs });
        let dir = out_dir();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("durability.json"),
            serde_json::to_string_pretty(&out).unwrap(),
        )
        .unwrap();
        println!("{}", serde_json::to_string_pretty(&out).unwrap());
        return;
    }
    if let Ok(list) = std::env::var("FLEETLET_BENCH_REPLICAS") {
        sharding(&list).await;
        return;
    }
    let sizes = fleetlet_testenv::bench::fleet_sizes("100,1000,10000");
    let window = window_seconds();
    let nodes_on = std::env::var("FLEETLET_BENCH_NODE_PROJECTION").as_deref() != Ok("Disabled");
    let suffix = if nodes_on { "" } else { "-no-nodes" };
    let vk: usize = if nodes_on {
        env_or("FLEETLET_BENCH_VK", 100)
    } else {
        0
    };
    let mut runs = Vec::new();
    let largest = sizes.iter().copied().max().unwrap_or(0);
    let perf = Command::new("perf")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    for n in sizes {
        // The side-by-side runs in the phase whose fleet has the same number of nodes.
        let vk_here = if n == vk { vk } else { 0 };
        let mut run = fleet_phase(
            n,
            window,
            vk_here,
            perf && n == largest && nodes_on,
            nodes_on,
            1,
        )
        .await;
        run["windowSeconds"] = json!(window);
        // Each size on its own too: a later run of one size replaces only its own results.
        let dir = out_dir();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join(format!("fleet-{n}{suffix}.json")),
            serde_json::to_string_pretty(&run).unwrap(),
        )
        .unwrap();
        runs.push(run);
    }
    let out = json!({ "runs": runs, "windowSeconds": window });
    let dir = out_dir();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join(format!("fleet{suffix}.json")),
        serde_json::to_string_pretty(&out).unwrap(),
    )
    .unwrap();
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
}
