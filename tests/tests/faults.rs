//! Faults, each bounded in time and on loopback only: the NATS server restarted in the
//! middle of a rollout, a 3-node NATS cluster losing its stream leader, one node and then
//! all three, an agent SIGKILLed in the middle of a reconcile, a device offline for longer
//! than the grace period, a site's leaf node losing its link to the central server. Each test records what it expected and what it saw in
//! `target/fleetlet-reliability/`; `fleetlet-dev reliability-report` turns the records into
//! docs/reliability.md (`scripts/reliability` does both).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::time::{Duration, Instant};

use fleetlet_protocol::decode;
use fleetlet_testenv::{TestEnv, components, eventually, process::Service, proxy::TcpProxy, wait};
use k8s_openapi::api::core::v1::Node;
use kube::Api;

/// Writes this scenario's row for the reliability report.
fn record(scenario: &str, expected: &str, observed: &str) {
    fleetlet_testenv::report::record(
        fleetlet_testenv::report::Section::Fault,
        scenario,
        expected,
        observed,
    );
}

/// Waits until every device in `devices` reports the generation in force at `min` or
/// above and has refused no manifest (which a lost or reordered write would cause);
/// returns their generations.
async fn agents_caught_up(env: &TestEnv, devices: &[&str], min: u64) -> Vec<u64> {
    let mut generations = Vec::new();
    for d in devices {
        let s = eventually("status", Duration::from_secs(30), || async {
            let s = env.agent_status(d).await.ok_or("no status")?;
            (s.observed_generation == s.manifest_generation && s.observed_generation >= min)
                .then_some(s)
                .ok_or("not caught up".to_string())
        })
        .await;
        assert!(s.last_rejection.is_none(), "{d}: {:?}", s.last_rejection);
        generations.push(s.observed_generation);
    }
    generations
}

fn device_yaml(name: &str) -> String {
    format!(
        "apiVersion: fleetlet.dev/v1alpha1\nkind: EdgeDevice\nmetadata: {{ name: {name}, namespace: default, labels: {{ fault: test }} }}\nspec: {{}}\n---\n"
    )
}

fn file_manifest(name: &str, files: &[(String, String)], extra_spec: &str) -> String {
    let mut y = format!(
        "apiVersion: fleetlet.dev/v1alpha1\nkind: EdgeManifest\nmetadata: {{ name: {name}, namespace: default }}\nspec:\n  selector: {{ matchLabels: {{ fault: test }} }}\n{extra_spec}  resources:\n"
    );
    for (i, (path, text)) in files.iter().enumerate() {
        y.push_str(&format!(
            "    - id: f{i}\n      file: {{ path: {path}, content: {{ text: \"{text}\" }} }}\n"
        ));
    }
    y
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_restarted_in_the_middle_of_a_rollout() {
    let mut env = TestEnv::builder().kube().nats().start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bins = components::bin_dir().unwrap();
    let _controller =
        components::start_controller(&env, &bins, dir.path(), &["--resync-seconds=1"]).unwrap();
    let devices = ["nr-1", "nr-2", "nr-3"];
    let mut agents = Vec::new();
    for d in devices {
        let ddir = dir.path().join(d);
        std::fs::create_dir_all(&ddir).unwrap();
        agents.push(
            components::start_agent(
                &bins,
                &ddir,
                &components::file_agent_config(
                    env.nats_url().unwrap(),
                    &ddir,
                    d,
                    "/etc/fleetlet",
                    "",
                    "",
                ),
            )
            .unwrap(),
        );
    }
    let yaml = |text: &str| {
        devices.iter().map(|d| device_yaml(d)).collect::<String>()
            + &file_manifest(
                "rollout",
                &[("/etc/fleetlet/version".into(), text.into())],
                "  rollout: { maxUnavailable: 1 }\n",
            )
    };
    let content = |d: &str| {
        std::fs::read_to_string(dir.path().join(d).join("root/etc/fleetlet/version"))
            .unwrap_or_default()
    };
    env.apply(&yaml("v1")).unwrap();
    eventually("v1 everywhere", Duration::from_secs(60), || async {
        devices
            .iter()
            .all(|d| content(d) == "v1")
            .then_some(())
            .ok_or("not yet".to_string())
    })
    .await;

    // Stop NATS the moment the controller writes the first device's new manifest: with
    // maxUnavailable 1 the other two are still waiting their turn.
    let desired = env
        .jetstream()
        .await
        .unwrap()
        .get_key_value("desired-state")
        .await
        .unwrap();
    let mut watch = desired.watch_all().await.unwrap();
    env.apply(&yaml("v2")).unwrap();
    let first = tokio::time::timeout(Duration::from_secs(30), async {
        use futures::StreamExt;
        while let Some(Ok(e)) = watch.next().await {
            // The first manifest that holds v2 (not merely a newer generation: a device's
            // manifest may be past generation 1 already with v1 in it).
            if let Ok(m) = decode::<fleetlet_protocol::AgentManifest>(&e.value)
                && m.resources
                    .iter()
                    .any(|r| serde_json::to_string(&r.spec).is_ok_and(|s| s.contains("\"v2\"")))
            {
                return e.key;
            }
        }
        String::new()
    })
    .await
    .unwrap();
    env.nats.as_mut().unwrap().stop();
    let written_before = first;
    let updated_before = devices.iter().filter(|d| content(d) == "v2").count();
    assert!(
        !written_before.is_empty(),
        "a v2 manifest was written before the stop"
    );
    assert!(
        updated_before < 3,
        "NATS stopped in the middle of the rollout: {updated_before} of 3 on v2"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    env.nats.as_mut().unwrap().start_again().await.unwrap();
    let restarted = Instant::now();
    eventually("v2 everywhere", Duration::from_secs(90), || async {
        devices
            .iter()
            .all(|d| content(d) == "v2")
            .then_some(())
            .ok_or("not yet".to_string())
    })
    .await;
    let converged = restarted.elapsed();
    let mut written = 0;
    for d in devices {
        let e = desired.entry(d).await.unwrap().unwrap();
        written += usize::from(
            decode::<fleetlet_protocol::AgentManifest>(&e.value)
                .unwrap()
                .generation
                >= 2,
        );
    }
    assert_eq!(written, 3);
    // Every agent reports the final generation, and none refused a manifest as stale or
    // reused (which a lost or reordered write would cause).
    let generations: Vec<String> = agents_caught_up(&env, &devices, 2)
        .await
        .iter()
        .zip(devices)
        .map(|(g, d)| format!("{d} gen {g}"))
        .collect();
    drop(agents);
    record(
        "nats-server killed and restarted in the middle of a rollout (3 devices, maxUnavailable 1, down 3 s)",
        "no manifest lost or applied out of order; agents and controller reconnect; the rollout completes",
        &format!(
            "NATS stopped as the controller wrote {written_before}'s new manifest ({updated_before} of 3 devices had v2 on disk); all 3 on v2 {:.1} s after the restart; no manifest refused ({})",
            converged.as_secs_f64(),
            generations.join(", ")
        ),
    );
}

/// Devices of the cluster scenarios: simulated in one process, each running the agent's own
/// code with its own NATS connection.
/// `n` simulated devices, `<prefix><i>`, heart-beating every 2 s, their state and files
/// under `dir/sim`; `extra` flags for the simulator.
struct SimFleet {
    names: Vec<String>,
    dir: std::path::PathBuf,
    _sim: Service,
}

impl SimFleet {
    fn start(env: &TestEnv, dir: &std::path::Path, prefix: &str, n: usize, extra: &[&str]) -> Self {
        let sim_dir = dir.join("sim");
        let mut args = vec![
            format!("--nats-url={}", env.nats_url().unwrap()),
            format!("--devices={n}"),
            format!("--prefix={prefix}"),
            format!("--dir={}", sim_dir.display()),
            "--heartbeat-seconds=2".into(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let sim = Service::spawn(
            "fleetlet-sim",
            &components::bin_dir().unwrap().join("fleetlet-sim"),
            &args,
            dir.join("sim.log"),
        )
        .unwrap();
        Self {
            names: (0..n).map(|i| format!("{prefix}{i}")).collect(),
            dir: sim_dir,
            _sim: sim,
        }
    }

    /// How many devices hold `text` in /etc/fleetlet/version on disk.
    fn on(&self, text: &str) -> usize {
        self.names
            .iter()
            .filter(|d| {
                std::fs::read_to_string(self.dir.join(d).join("root/etc/fleetlet/version"))
                    .is_ok_and(|c| c == text)
            })
            .count()
    }

    /// Waits up to `timeout` for every device to hold `text`.
    async fn everywhere(&self, text: &str, timeout: Duration) {
        let n = self.names.len();
        eventually(&format!("{text} on every device"), timeout, || async {
            let on = self.on(text);
            (on == n).then_some(()).ok_or(format!("{on} of {n}"))
        })
        .await
    }
}

const CLUSTER_DEVICES: usize = 100;

/// Waits for the first manifest written to desired-state that holds `text`; its key.
async fn first_holding(mut watch: async_nats::jetstream::kv::Watch, text: &str) -> Option<String> {
    use futures::StreamExt;
    let needle = format!("\"{text}\"");
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(Ok(e)) = watch.next().await {
            if let Ok(m) = decode::<fleetlet_protocol::AgentManifest>(&e.value)
                && m.resources
                    .iter()
                    .any(|r| serde_json::to_string(&r.spec).is_ok_and(|s| s.contains(&needle)))
            {
                return Some(e.key);
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
}

/// Every device's keys against the controller's record of them: the manifest in
/// desired-state holds `text` at a generation no lower than the one the controller recorded
/// as written (EdgeDevice `status.desiredGeneration`, set after JetStream acknowledged the
/// write; the controller must run with `--record-generation-after-seconds=0`), and the device's status in actual-state reports that generation applied, every
/// resource Ready, and no manifest refused (a lost or reordered write shows as a refusal).
/// Returns the highest generation seen.
async fn check_keys(env: &TestEnv, names: &[String], text: &str) -> Result<u64, String> {
    use fleetlet_crds::EdgeDevice;
    let client = env.kube_client().await.map_err(|e| e.to_string())?;
    let devices: Api<EdgeDevice> = Api::namespaced(client, "default");
    let needle = format!("\"{text}\"");
    let mut highest = 0;
    for d in names {
        let recorded = devices
            .get(d)
            .await
            .map_err(|e| e.to_string())?
            .status
            .and_then(|s| s.desired_generation)
            .unwrap_or(0);
        let m = env
            .desired_manifest(d)
            .await?
            .ok_or(format!("{d}: no manifest"))?;
        if m.generation < recorded {
            return Err(format!(
                "{d}: desired-state holds generation {} below the acknowledged {recorded}",
                m.generation
            ));
        }
        if !serde_json::to_string(&m.resources)
            .unwrap_or_default()
            .contains(&needle)
        {
            return Err(format!("{d}: the stored manifest does not hold {text}"));
        }
        let s = env.agent_status(d).await.ok_or(format!("{d}: no status"))?;
        if let Some(r) = &s.last_rejection {
            return Err(format!("{d}: a manifest was refused: {r:?}"));
        }
        if s.observed_generation != m.generation {
            return Err(format!(
                "{d}: status at generation {}, desired-state at {}",
                s.observed_generation, m.generation
            ));
        }
        if !s
            .resources
            .values()
            .all(|r| matches!(r, fleetlet_protocol::ResourceStatus::Ready { .. }))
        {
            return Err(format!("{d}: not every resource Ready: {:?}", s.resources));
        }
        highest = highest.max(m.generation);
    }
    Ok(highest)
}

/// [`check_keys`] until it holds (a status may trail the file on disk by a moment).
async fn keys_hold(env: &TestEnv, names: &[String], text: &str) -> u64 {
    eventually(
        &format!("every key checked at {text}"),
        Duration::from_secs(60),
        || check_keys(env, names, text),
    )
    .await
}

/// Waits until every replica of every bucket's stream is current (none behind or offline).
async fn caught_up(cluster: &fleetlet_testenv::NatsCluster, what: &str) {
    let streams = fleetlet_protocol::kv::BUCKETS.map(|b| b.stream());
    eventually(what, Duration::from_secs(60), || async {
        for s in &streams {
            if !cluster
                .replicas_current(s)
                .await
                .map_err(|e| e.to_string())?
            {
                return Err(format!("{s} has a replica behind"));
            }
        }
        Ok(())
    })
    .await
}

/// A 3-node JetStream cluster with the buckets at 3 replicas, the controller and 100
/// simulated devices given every node's URL; three faults in turn, each followed by a check
/// of every key against the controller's record.
#[tokio::test(flavor = "multi_thread")]
async fn a_three_node_nats_cluster_loses_nothing_to_a_dead_leader_a_cut_off_node_or_a_power_cut() {
    let mut env = TestEnv::builder()
        .kube()
        .nats_cluster(3)
        .start()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bins = components::bin_dir().unwrap();
    let _controller = components::start_controller(
        &env,
        &bins,
        dir.path(),
        // Every generation recorded at once: the EdgeDevices then hold a full record of
        // what JetStream acknowledged, which the checks below hold the keys to.
        &[
            "--resync-seconds=1",
            "--kv-replicas=3",
            "--record-generation-after-seconds=0",
        ],
    )
    .unwrap();
    let sim = SimFleet::start(&env, dir.path(), "nc-", CLUSTER_DEVICES, &[]);
    let names = sim.names.clone();
    let devices_yaml: String = names.iter().map(|d| device_yaml(d)).collect();
    let yaml = |text: &str| {
        devices_yaml.clone()
            + &file_manifest(
                "rollout",
                &[("/etc/fleetlet/version".into(), text.into())],
                "  rollout: { maxUnavailable: 20 }\n",
            )
    };
    let on = |text: &str| sim.on(text);
    let everywhere = async |text: &str| sim.everywhere(text, Duration::from_secs(180)).await;
    env.apply(&yaml("v1")).unwrap();
    everywhere("v1").await;
    // Nothing the servers hold on a reader's behalf: a consumer lives on one node, and
    // after that node dies its recreation can be placed there again and fail until it
    // returns (an ordered consumer's did, and the rollout below stalled with it).
    let js = env.jetstream().await.unwrap();
    for b in fleetlet_protocol::kv::BUCKETS {
        let mut stream = js.get_stream(b.stream()).await.unwrap();
        let consumers = stream.info().await.unwrap().state.consumer_count;
        assert_eq!(consumers, 0, "{} holds {consumers} consumers", b.stream());
    }

    // 1. The server leading the desired-state stream is SIGKILLed as the controller writes
    //    the first v2 manifest, and stays down.
    let watch = env
        .jetstream()
        .await
        .unwrap()
        .get_key_value("desired-state")
        .await
        .unwrap()
        .watch_all()
        .await
        .unwrap();
    env.apply(&yaml("v2")).unwrap();
    let first = first_holding(watch, "v2").await.expect("a v2 manifest");
    let cluster = env.nats_cluster.as_mut().unwrap();
    let leader = cluster.leader_of("KV_desired-state").await.unwrap();
    cluster.nodes[leader].kill().unwrap();
    let killed = Instant::now();
    let before = on("v2");
    assert!(
        before < CLUSTER_DEVICES,
        "the rollout was over before the kill"
    );
    everywhere("v2").await;
    let after_kill = killed.elapsed();
    let cluster = env.nats_cluster.as_ref().unwrap();
    let new_leader = cluster.leader_of("KV_desired-state").await.unwrap();
    assert_ne!(new_leader, leader);
    let gen_v2 = keys_hold(&env, &names, "v2").await;
    record(
        "3-node NATS cluster (buckets at 3 replicas): the desired-state stream's leader SIGKILLed in the middle of a rollout (100 simulated devices, maxUnavailable 20)",
        "the rollout completes on the other two; every device on the newest generation; no acknowledged write lost, none applied out of order",
        &format!(
            "killed fleetlet-{leader} as the controller wrote {first}'s v2 manifest ({before} of {CLUSTER_DEVICES} devices had v2 on disk); fleetlet-{new_leader} took the stream over; all {CLUSTER_DEVICES} on v2 {:.1} s after the kill, the node still down; every desired-state key at or above the generation the controller recorded, every status at it (up to generation {gen_v2}), no manifest refused",
            after_kill.as_secs_f64()
        ),
    );

    // 2. The dead node returns and catches up; then the node leading actual-state is cut off
    //    (stopped) while a rollout writes through the other two, and heals.
    let cluster = env.nats_cluster.as_mut().unwrap();
    cluster.nodes[leader].start_again().await.unwrap();
    let cluster = env.nats_cluster.as_ref().unwrap();
    let back = Instant::now();
    caught_up(cluster, "the returned node current on every stream").await;
    let rejoined = back.elapsed();
    let cut = cluster.leader_of("KV_actual-state").await.unwrap();
    env.nats_cluster.as_mut().unwrap().nodes[cut].stop();
    let cut_at = Instant::now();
    env.apply(&yaml("v3")).unwrap();
    everywhere("v3").await;
    let during_cut = cut_at.elapsed();
    env.nats_cluster.as_mut().unwrap().nodes[cut]
        .start_again()
        .await
        .unwrap();
    let healed = Instant::now();
    let cluster = env.nats_cluster.as_ref().unwrap();
    caught_up(cluster, "the healed node current on every stream").await;
    let heal = healed.elapsed();
    let gen_v3 = keys_hold(&env, &names, "v3").await;
    record(
        "3-node NATS cluster: one node (the actual-state leader) cut off (stopped) while a rollout writes through the other two, then healed",
        "the rollout completes; the node catches up on return; no acknowledged write lost, none applied out of order",
        &format!(
            "the node SIGKILLed before was current on every stream {:.1} s after its return; fleetlet-{cut} cut off; all {CLUSTER_DEVICES} on v3 {:.1} s after the cut; the healed node current on every stream {:.1} s after it returned; every key checked as above (up to generation {gen_v3}), no manifest refused",
            rejoined.as_secs_f64(),
            during_cut.as_secs_f64(),
            heal.as_secs_f64()
        ),
    );

    // 3. Every node SIGKILLed at once (what a power cut does to the processes; the page
    //    cache survives here). Devices keep what they run; the cluster comes back from its
    //    stores and the next rollout reaches everyone.
    for n in &mut env.nats_cluster.as_mut().unwrap().nodes {
        n.kill().unwrap();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let kept = on("v3");
    assert_eq!(
        kept, CLUSTER_DEVICES,
        "devices kept their manifest while NATS was gone"
    );
    let restart = Instant::now();
    env.nats_cluster
        .as_mut()
        .unwrap()
        .start_all()
        .await
        .unwrap();
    let up = restart.elapsed();
    let gen_kept = keys_hold(&env, &names, "v3").await;
    assert_eq!(
        gen_kept, gen_v3,
        "the stores came back with what was acknowledged"
    );
    env.apply(&yaml("v4")).unwrap();
    everywhere("v4").await;
    let reconverged = restart.elapsed();
    let gen_v4 = keys_hold(&env, &names, "v4").await;
    record(
        "3-node NATS cluster: every node SIGKILLed at once, restarted after 3 s (all three crash together; the kernel's page cache survives, as it would not in a real power cut)",
        "devices keep running their last manifest; every acknowledged key is back after the restart; the fleet reconverges",
        &format!(
            "all {kept} devices kept v3 on disk with NATS gone; the cluster answered {:.1} s after the restart with every key as acknowledged (up to generation {gen_kept}); a v4 rollout reached all {CLUSTER_DEVICES} {:.1} s after the restart (up to generation {gen_v4}), no manifest refused",
            up.as_secs_f64(),
            reconverged.as_secs_f64()
        ),
    );
}

/// Files in one device's first pass: three manifests of 100 (an EdgeManifest holds at most
/// 128 resources).
const BIG_PASS: usize = 300;

/// A controller, and device `device` whose three manifests (`many-0..2`) hold 300 files,
/// all in desired state before its agent starts, so the agent's first pass writes them all.
struct BigPass {
    env: TestEnv,
    _dir: tempfile::TempDir,
    _controller: Service,
    bins: std::path::PathBuf,
    ddir: std::path::PathBuf,
    config: String,
    many: std::path::PathBuf,
}

impl BigPass {
    async fn start(device: &str) -> Self {
        let env = TestEnv::builder().kube().nats().start().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let bins = components::bin_dir().unwrap();
        let controller =
            components::start_controller(&env, &bins, dir.path(), &["--resync-seconds=1"]).unwrap();
        let ddir = dir.path().join("agent");
        std::fs::create_dir_all(&ddir).unwrap();
        let config = components::file_agent_config(
            env.nats_url().unwrap(),
            &ddir,
            device,
            "/etc/fleetlet",
            "",
            "",
        );
        let yaml: String = (0..3)
            .map(|p| {
                let files: Vec<(String, String)> = (p * 100..(p + 1) * 100)
                    .map(|i| (format!("/etc/fleetlet/many/f{i}"), format!("file {i}")))
                    .collect();
                file_manifest(&format!("many-{p}"), &files, "")
                    .replace("id: f", &format!("id: p{p}f"))
                    + "---\n"
            })
            .collect();
        env.apply(&(device_yaml(device) + &yaml)).unwrap();
        eventually(
            "all 300 files in desired state",
            Duration::from_secs(60),
            || async {
                let m = env.desired_manifest(device).await?.ok_or("no manifest")?;
                (m.resources.len() == BIG_PASS)
                    .then_some(())
                    .ok_or(format!("{} resources", m.resources.len()))
            },
        )
        .await;
        let many = ddir.join("root/etc/fleetlet/many");
        Self {
            env,
            _dir: dir,
            _controller: controller,
            bins,
            ddir,
            config,
            many,
        }
    }

    /// Files in place (not the temp files a write goes through).
    fn count(&self) -> usize {
        std::fs::read_dir(&self.many)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with('f'))
                    .count()
            })
            .unwrap_or(0)
    }

    /// Starts the agent (with `env` added) and returns as soon as its first file is there.
    fn start_agent(&self, env: &[(&str, String)]) -> Service {
        let config_path = self.ddir.join("agent.toml");
        std::fs::write(&config_path, &self.config).unwrap();
        let agent = Service::spawn_with_env(
            "fleetlet-agent",
            &self.bins.join("fleetlet-agent"),
            &["--config".into(), config_path.display().to_string()],
            env,
            self.ddir.join("agent.log"),
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.count() == 0 {
            assert!(Instant::now() < deadline, "no file written in 60 s");
            std::thread::sleep(Duration::from_millis(1));
        }
        agent
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_killed_in_the_middle_of_a_reconcile() {
    let big = BigPass::start("kill-1").await;
    let (env, many) = (&big.env, &big.many);
    let mut agent = big.start_agent(&[]);
    agent.kill_program().unwrap();
    let at_kill = big.count();
    assert!(
        0 < at_kill && at_kill < BIG_PASS,
        "the kill landed inside the pass: {at_kill} of {BIG_PASS} files written"
    );
    let _agent = big.start_agent(&[]);
    let restarted = Instant::now();
    eventually("every file written", Duration::from_secs(60), || async {
        let s = env.agent_status("kill-1").await.ok_or("no status")?;
        let ready = s.resources.len() == BIG_PASS && s.resources.values().all(|r| r.is_ready());
        ready
            .then_some(())
            .ok_or(format!("{} resources reported", s.resources.len()))
    })
    .await;
    let converged = restarted.elapsed();
    // Exactly the manifest's files, with their contents: nothing duplicated or half-written
    // left behind.
    let mut names: Vec<String> = std::fs::read_dir(many)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), BIG_PASS, "stray files: {names:?}");
    for i in 0..BIG_PASS {
        assert_eq!(
            std::fs::read_to_string(many.join(format!("f{i}"))).unwrap(),
            format!("file {i}")
        );
    }
    // Deleting one of the manifests removes exactly its 100 files.
    let mut delete = env.kubectl().unwrap();
    delete.args(["delete", "edgemanifest", "many-2", "--wait=false"]);
    fleetlet_testenv::chart::checked("kubectl delete", delete).unwrap();
    eventually(
        "the dropped files removed",
        Duration::from_secs(60),
        || async {
            let n = big.count();
            (n == 200).then_some(()).ok_or(format!("{n} files"))
        },
    )
    .await;
    for i in 0..200 {
        assert!(many.join(format!("f{i}")).exists(), "f{i} should stay");
    }
    record(
        "agent SIGKILLed in the middle of a reconcile (300 files), then restarted",
        "converges; no duplicate or half-written files; nothing deleted that should stay",
        &format!(
            "killed with {at_kill} of 300 files written; all 300 Ready {:.1} s after the restart, 300 files and no strays; deleting one of its three manifests removed exactly its 100 files",
            converged.as_secs_f64()
        ),
    );
}

/// SIGTERM in the middle of a pass: the agent finishes the pass, publishes its status, and
/// only then exits (workloads left running).
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_stopped_in_the_middle_of_a_reconcile_finishes_the_pass() {
    let big = BigPass::start("term-1").await;
    let mut agent =
        big.start_agent(&[("FLEETLET_LOG", "info,fleetlet_agent::engine=debug".into())]);
    // SIGTERM (SIGKILL only if it has not exited 5 s later).
    agent.stop();
    let text = std::fs::read_to_string(big.ddir.join("agent.log")).unwrap();
    let stopping = text
        .find("shutting down")
        .expect("the agent logged the SIGTERM");
    let pass = text
        .find("pass done trigger=\"manifest\"")
        .expect("the pass was logged done");
    assert!(
        stopping < pass,
        "SIGTERM arrived inside the pass, which was then finished:\n{text}"
    );
    assert_eq!(
        big.count(),
        BIG_PASS,
        "every file of the pass in flight written"
    );
    let status: fleetlet_protocol::AgentStatus =
        decode(&std::fs::read(big.ddir.join("state/status.json")).unwrap()).unwrap();
    assert_eq!(status.resources.len(), BIG_PASS);
    assert!(status.resources.values().all(|r| r.is_ready()));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_offline_for_longer_than_the_grace_period() {
    let env = TestEnv::builder().kube().nats().start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bins = components::bin_dir().unwrap();
    let _controller =
        components::start_controller(&env, &bins, dir.path(), &["--resync-seconds=1"]).unwrap();
    let _bridge =
        components::start_bridge(&env, &bins, dir.path(), &["--grace-seconds=3"]).unwrap();
    // The device reaches NATS through a proxy the test cuts: its network goes away while
    // its agent keeps running.
    let upstream = env
        .nats_url()
        .unwrap()
        .trim_start_matches("nats://")
        .to_owned();
    let link = TcpProxy::start(&upstream).await.unwrap();
    let ddir = dir.path().join("agent");
    std::fs::create_dir_all(&ddir).unwrap();
    let config =
        components::file_agent_config(&link.nats_url(), &ddir, "off-1", "/etc/fleetlet", "", "");
    let _agent: Service = components::start_agent(&bins, &ddir, &config).unwrap();
    env.apply(
        &(device_yaml("off-1")
            + &file_manifest(
                "keep",
                &[
                    ("/etc/fleetlet/keep".into(), "kept".into()),
                    ("/etc/fleetlet/probe".into(), "as specified".into()),
                ],
                "",
            )),
    )
    .unwrap();
    let file = ddir.join("root/etc/fleetlet/keep");
    let probe = ddir.join("root/etc/fleetlet/probe");
    wait::file_content(&file, "kept", Duration::from_secs(60)).await;
    wait::file_content(&probe, "as specified", Duration::from_secs(60)).await;
    env.wait_node_ready("off-1").await;
    let before = std::fs::metadata(&file).unwrap().modified().unwrap();
    let repairs_before = env.agent_status("off-1").await.unwrap().drift_repairs;

    link.cut();
    let cut = Instant::now();
    let nodes: Api<Node> = Api::all(env.kube_client().await.unwrap());
    let ready = |n: Node| {
        n.status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .map(|c| c.status)
            .unwrap_or_default()
    };
    eventually("the node Unknown", Duration::from_secs(30), || async {
        let n = nodes.get("off-1").await.map_err(|e| e.to_string())?;
        let s = ready(n);
        (s == "Unknown").then_some(()).ok_or(s)
    })
    .await;
    let unknown_after = cut.elapsed();
    // Offline, the agent goes on running its last manifest: a file edited by hand is put
    // back (so the agent is alive and reconciling), and the other is left as it is.
    std::fs::write(&probe, "edited while offline").unwrap();
    wait::file_content(&probe, "as specified", wait::DEFAULT_TIMEOUT).await;
    let repaired_offline = cut.elapsed();
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "kept");
    assert_eq!(
        std::fs::metadata(&file).unwrap().modified().unwrap(),
        before,
        "not rewritten while offline"
    );
    let last_beat = heartbeat_sequence(&env, "off-1").await;

    link.heal();
    let back = Instant::now();
    env.wait_node_ready("off-1").await;
    let ready_after = back.elapsed();
    // A heartbeat sent after the link came back, and the status that says what the agent
    // did while it was away, before anything is compared.
    eventually(
        "a heartbeat after the link is back",
        wait::DEFAULT_TIMEOUT,
        || async {
            let seq = heartbeat_sequence(&env, "off-1").await;
            (seq > last_beat).then_some(()).ok_or(format!(
                "sequence {seq}, {last_beat} before the outage ended"
            ))
        },
    )
    .await;
    let s = eventually(
        "the offline repair reported",
        wait::DEFAULT_TIMEOUT,
        || async {
            let s = env.agent_status("off-1").await.ok_or("no status")?;
            (s.drift_repairs > repairs_before)
                .then_some(s.clone())
                .ok_or(format!("{} drift repairs", s.drift_repairs))
        },
    )
    .await;
    assert_eq!(s.drift_repairs, repairs_before + 1, "only the edited file");
    assert_eq!(
        s.last_drift.as_ref().map(|d| d.resource.as_str()),
        Some("f1"),
        "{:?}",
        s.last_drift
    );
    assert_eq!(
        std::fs::metadata(&file).unwrap().modified().unwrap(),
        before,
        "the file was not rewritten"
    );
    record(
        "device cut off from NATS (agent running) longer than the grace period (3 s), then back",
        "node NotReady/Unknown; workloads kept and repaired offline; Ready again on return with no redeploy",
        &format!(
            "node Ready=Unknown {:.1} s after the cut; a file edited by hand repaired {:.1} s after the cut, offline; the other file untouched; node Ready {:.1} s after the link came back; 1 drift repair reported, nothing rewritten",
            unknown_after.as_secs_f64(),
            repaired_offline.as_secs_f64(),
            ready_after.as_secs_f64()
        ),
    );
}

/// The sequence number of the device's latest heartbeat (0 when there is none).
async fn heartbeat_sequence(env: &TestEnv, device: &str) -> u64 {
    let kv = env
        .jetstream()
        .await
        .unwrap()
        .get_key_value(fleetlet_protocol::kv::HEARTBEAT.name)
        .await
        .unwrap();
    match kv.entry(device).await.unwrap() {
        Some(e) => decode::<fleetlet_protocol::Heartbeat>(&e.value)
            .map(|h| h.sequence)
            .unwrap_or(0),
        None => 0,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kube_apiserver_unavailable_for_a_while() {
    let mut env = TestEnv::builder().kube().nats().start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bins = components::bin_dir().unwrap();
    let mut controller =
        components::start_controller(&env, &bins, dir.path(), &["--resync-seconds=1"]).unwrap();
    let mut bridge = components::start_bridge(&env, &bins, dir.path(), &[]).unwrap();
    let ddir = dir.path().join("agent");
    std::fs::create_dir_all(&ddir).unwrap();
    let _agent = components::start_agent(
        &bins,
        &ddir,
        &components::file_agent_config(
            env.nats_url().unwrap(),
            &ddir,
            "api-1",
            "/etc/fleetlet",
            "",
            "",
        ),
    )
    .unwrap();
    let manifest = |text: &str| {
        device_yaml("api-1")
            + &file_manifest(
                "outage",
                &[("/etc/fleetlet/outage".into(), text.into())],
                "",
            )
    };
    env.apply(&manifest("before")).unwrap();
    let file = ddir.join("root/etc/fleetlet/outage");
    let content = || std::fs::read_to_string(&file).unwrap_or_default();
    eventually("the file", Duration::from_secs(60), || async {
        (content() == "before")
            .then_some(())
            .ok_or("not yet".to_string())
    })
    .await;
    env.wait_node_ready("api-1").await;
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(env.kube_client().await.unwrap(), "kube-node-lease");
    // When the node's Lease was last renewed, in Unix milliseconds.
    let renewed = || async {
        leases
            .get_opt("api-1")
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec?.renew_time)
            .map(|t| t.0.as_millisecond())
    };

    const DOWN: Duration = Duration::from_secs(15);
    let stopped_at = fleetlet_protocol::Timestamp::now().as_millis() as i64;
    env.kube.as_mut().unwrap().stop_apiserver();
    let beats_before = env
        .agent_status("api-1")
        .await
        .map(|s| s.observed_generation);
    tokio::time::sleep(DOWN).await;
    // Devices run on, and the control plane waits instead of exiting.
    assert_eq!(content(), "before");
    controller.check_running().unwrap();
    bridge.check_running().unwrap();
    env.kube.as_mut().unwrap().start_apiserver().await.unwrap();
    let back = Instant::now();

    // Without restarts, both pick up where they were: a change reaches the device, the node
    // stays (or turns again) Ready.
    eventually("a change accepted", Duration::from_secs(60), || async {
        env.apply(&manifest("after")).map_err(|e| e.to_string())
    })
    .await;
    eventually(
        "the change on the device",
        Duration::from_secs(90),
        || async { (content() == "after").then_some(()).ok_or(content()) },
    )
    .await;
    let changed_after = back.elapsed();
    // The bridge renews the node's Lease again (it was Ready before the outage, so Ready
    // alone would show nothing new).
    eventually(
        "a Lease renewal after the apiserver returned",
        wait::DEFAULT_TIMEOUT,
        || async {
            let now = renewed().await;
            (now.is_some_and(|t| t > stopped_at))
                .then_some(())
                .ok_or(format!(
                    "renewed at {now:?}, the outage began at {stopped_at}"
                ))
        },
    )
    .await;
    env.wait_node_ready("api-1").await;
    controller.check_running().unwrap();
    bridge.check_running().unwrap();
    record(
        "kube-apiserver down for 15 s (etcd kept), then back",
        "controller and bridge back off and recover without a restart; devices keep running",
        &format!(
            "the device kept its file and its manifest (generation {}) while the apiserver was down; controller and bridge kept running; a manifest change reached the device {:.1} s after the apiserver returned; the node Ready again",
            beats_before.unwrap_or_default(),
            changed_after.as_secs_f64()
        ),
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_device_state_directory_full() {
    let env = TestEnv::builder().kube().nats().start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bins = components::bin_dir().unwrap();
    let _controller =
        components::start_controller(&env, &bins, dir.path(), &["--resync-seconds=1"]).unwrap();
    let ddir = dir.path().join("agent");
    let state = ddir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let config = components::file_agent_config(
        env.nats_url().unwrap(),
        &ddir,
        "full-1",
        "/etc/fleetlet",
        "",
        "",
    );
    let config_path = ddir.join("agent.toml");
    std::fs::write(&config_path, config).unwrap();
    // The state directory is a 256 KiB tmpfs in a mount namespace of the agent's own: it
    // disappears with the agent, and the host's mounts are never touched.
    let script = format!(
        "mount -t tmpfs -o size=256k fleetlet-state '{}' && exec '{}' --config '{}'",
        state.display(),
        bins.join("fleetlet-agent").display(),
        config_path.display()
    );
    let agent = Service::spawn(
        "fleetlet-agent",
        std::path::Path::new("unshare"),
        &[
            "--mount".into(),
            "--propagation".into(),
            "private".into(),
            "sh".into(),
            "-c".into(),
            script,
        ],
        ddir.join("agent.log"),
    )
    .unwrap();
    // The agent's view of its state directory (the tmpfs), from outside its namespace.
    let agent_pid = eventually("the agent's pid", Duration::from_secs(10), || async {
        agent.program_pid().ok_or("not started yet".to_string())
    })
    .await;
    let agent_state = std::path::PathBuf::from(format!("/proc/{agent_pid}/root"))
        .join(state.strip_prefix("/").unwrap());
    let file = ddir.join("root/etc/fleetlet/motd");
    env.apply(
        &(device_yaml("full-1")
            + &file_manifest("motd", &[("/etc/fleetlet/motd".into(), "one".into())], "")),
    )
    .unwrap();
    eventually(
        "the first manifest applied",
        Duration::from_secs(60),
        || async {
            let text = std::fs::read_to_string(&file).map_err(|e| e.to_string())?;
            (text == "one").then_some(()).ok_or(text)
        },
    )
    .await;
    // The status of that pass (written after the file, by the agent's status writer).
    let first = eventually(
        "the status of the first manifest",
        wait::DEFAULT_TIMEOUT,
        || async {
            let s = env.agent_status("full-1").await.ok_or("no status")?;
            (s.manifest_generation >= 1 && s.observed_generation == s.manifest_generation)
                .then_some(s.manifest_generation)
                .ok_or(format!(
                    "manifest {} observed {}",
                    s.manifest_generation, s.observed_generation
                ))
        },
    )
    .await;
    let stored_first = std::fs::read(agent_state.join("manifest.json")).unwrap();
    assert!(
        stored_first.len() > 50,
        "the manifest is stored on the tmpfs"
    );

    // Fill the state directory until the kernel says no.
    {
        use std::io::Write;
        let mut filler = std::fs::File::create(agent_state.join("filler")).unwrap();
        let chunk = vec![0u8; 4096];
        let e = loop {
            if let Err(e) = filler.write_all(&chunk).and_then(|()| filler.sync_all()) {
                break e;
            }
        };
        assert_eq!(e.kind(), std::io::ErrorKind::StorageFull, "{e}");
    }
    env.apply(&file_manifest(
        "motd",
        &[("/etc/fleetlet/motd".into(), "two".into())],
        "",
    ))
    .unwrap();
    let full_at = Instant::now();
    let status = eventually(
        "the agent reports the full state directory",
        Duration::from_secs(30),
        || async {
            let s = env.agent_status("full-1").await.ok_or("no status")?;
            let c = s
                .condition("StateWritable")
                .ok_or("no StateWritable condition")?;
            (c.status == fleetlet_protocol::ConditionStatus::False)
                .then_some(s.clone())
                .ok_or(format!("{c:?}"))
        },
    )
    .await;
    let reported_after = full_at.elapsed();
    let c = status.condition("StateWritable").unwrap();
    assert_eq!(c.reason, "StorageFull", "{c:?}");
    let r = status.last_rejection.clone().unwrap();
    assert_eq!(r.reason, "StateNotWritable", "{r:?}");
    assert!(r.generation.unwrap() > first);
    assert_eq!(
        status.manifest_generation, first,
        "the last good manifest stays in force"
    );
    // Nothing changed on the device while it could not store the new manifest, over two
    // more attempts to store it (one per drift tick).
    let log = ddir.join("agent.log");
    let refusals = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("state directory refused the manifest")
            .count()
    };
    let seen = refusals();
    eventually(
        "two more attempts to store the manifest",
        wait::DEFAULT_TIMEOUT,
        || async {
            let n = refusals();
            (n >= seen + 2)
                .then_some(())
                .ok_or(format!("{n} refusals logged, {seen} before"))
        },
    )
    .await;
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "one");
    assert_eq!(
        std::fs::read(agent_state.join("manifest.json")).unwrap(),
        stored_first,
        "the stored manifest is intact"
    );

    // Space again: the agent stores and applies the new manifest by itself.
    std::fs::remove_file(agent_state.join("filler")).unwrap();
    let freed = Instant::now();
    eventually(
        "the new manifest applied",
        Duration::from_secs(30),
        || async {
            let text = std::fs::read_to_string(&file).map_err(|e| e.to_string())?;
            (text == "two").then_some(()).ok_or(text)
        },
    )
    .await;
    let applied_after = freed.elapsed();
    let s = eventually("StateWritable=True", Duration::from_secs(30), || async {
        let s = env.agent_status("full-1").await.ok_or("no status")?;
        let ok = s
            .condition("StateWritable")
            .is_some_and(|c| c.status == fleetlet_protocol::ConditionStatus::True);
        ok.then_some(s).ok_or("not yet".to_string())
    })
    .await;
    assert_eq!(s.manifest_generation, r.generation.unwrap());
    let stored: serde_json::Value =
        serde_json::from_slice(&std::fs::read(agent_state.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(
        stored["manifest"]["generation"],
        serde_json::json!(s.manifest_generation)
    );
    drop(agent);
    record(
        "device state directory full (256 KiB tmpfs filled up)",
        "the agent reports it and keeps the last good state",
        &format!(
            "StateWritable=False (StorageFull) and the new generation refused as StateNotWritable {:.1} s after the change; the file and the stored manifest unchanged; {:.1} s after space was freed the new manifest was stored and applied, StateWritable=True",
            reported_after.as_secs_f64(),
            applied_after.as_secs_f64()
        ),
    );
}

const SHARDED_DEVICES: usize = 16;
const SHARDS: u32 = 4;
const SHARD_LEASE_SECONDS: u64 = 6;

/// Live holders of the controller's shard Leases: shard → identity.
async fn shard_holders(env: &TestEnv) -> std::collections::BTreeMap<u32, String> {
    group_holders(env, "fleetlet-controller").await
}

/// Live holders of the shard Leases of `group`: shard → identity.
async fn group_holders(env: &TestEnv, group: &str) -> std::collections::BTreeMap<u32, String> {
    use k8s_openapi::api::coordination::v1::Lease;
    let Ok(client) = env.kube_client().await else {
        return Default::default();
    };
    let leases: Api<Lease> = Api::namespaced(client, "fleetlet-system");
    let selector = format!("fleetlet.dev/lease-group={group},fleetlet.dev/lease-role=shard");
    let Ok(list) = leases
        .list(&kube::api::ListParams::default().labels(&selector))
        .await
    else {
        return Default::default();
    };
    let now = k8s_openapi::jiff::Timestamp::now().as_millisecond();
    list.items
        .into_iter()
        .filter_map(|l| {
            let k = l
                .metadata
                .name
                .as_deref()?
                .strip_prefix(&format!("{group}-shard-"))?;
            let spec = l.spec?;
            let renewed = spec.renew_time?.0.as_millisecond();
            let live = renewed + i64::from(spec.lease_duration_seconds?) * 1000 >= now;
            Some((k.parse().ok()?, spec.holder_identity.filter(|_| live)?))
        })
        .collect()
}

/// How many shards `identity` holds.
fn holding(holders: &std::collections::BTreeMap<u32, String>, identity: &str) -> usize {
    holders.values().filter(|h| *h == identity).count()
}

/// A sharded controller replica: `--shards`, a short Lease, its own identity and metrics
/// port.
fn start_replica(env: &TestEnv, dir: &std::path::Path, identity: &str, port: u16) -> Service {
    let dir = dir.join(identity);
    std::fs::create_dir_all(&dir).unwrap();
    components::start_controller(
        env,
        &components::bin_dir().unwrap(),
        &dir,
        &[
            "--resync-seconds=1",
            &format!("--shards={SHARDS}"),
            &format!("--lease-seconds={SHARD_LEASE_SECONDS}"),
            &format!("--identity={identity}"),
            &format!("--metrics-addr=127.0.0.1:{port}"),
        ],
    )
    .unwrap()
}

/// desired-state writes a replica counted as stored.
fn kv_writes(port: u16) -> u64 {
    fleetlet_testenv::bench::local_get(port, "/metrics")
        .lines()
        .find(|l| l.starts_with("fleetlet_controller_kv_writes_total{result=\"ok\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

/// One KV entry as a watcher saw it: bucket, key, when the server stored it (ns), value.
type Seen = (&'static str, String, i128, Vec<u8>);

/// Everything written to desired-state and actual-state until `stop` is set.
fn record_entries(
    js: async_nats::jetstream::Context,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Seen>> {
    use futures::StreamExt;
    tokio::spawn(async move {
        let mut seen = Vec::new();
        let desired = js.get_key_value("desired-state").await.unwrap();
        let actual = js.get_key_value("actual-state").await.unwrap();
        let d = desired.watch_all().await.unwrap().map(|e| ("desired", e));
        let a = actual.watch_all().await.unwrap().map(|e| ("actual", e));
        let mut both = futures::stream::select(d, a);
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok(Some((bucket, Ok(e)))) =
                tokio::time::timeout(Duration::from_millis(200), both.next()).await
            {
                seen.push((
                    bucket,
                    e.key,
                    e.created.unix_timestamp_nanos(),
                    e.value.to_vec(),
                ));
            }
        }
        seen
    })
}

/// The most devices that were, at one moment, given the manifest holding `text` and not
/// yet Ready on it, by the server's store times: from the desired-state write that first
/// holds `text` to the first status at that generation with every resource Ready.
fn most_unready_at_once(seen: &[Seen], text: &str) -> usize {
    let needle = format!("\"{text}\"");
    let mut written: std::collections::HashMap<&str, (i128, u64)> = Default::default();
    for (bucket, key, at, value) in seen {
        if *bucket == "desired"
            && !written.contains_key(key.as_str())
            && let Ok(m) = decode::<fleetlet_protocol::AgentManifest>(value)
            && serde_json::to_string(&m.resources).is_ok_and(|s| s.contains(&needle))
        {
            written.insert(key, (*at, m.generation));
        }
    }
    let mut edges = Vec::new();
    for (key, (from, generation)) in &written {
        let ready = seen
            .iter()
            .filter(|(b, k, at, _)| *b == "actual" && k == key && at >= from)
            .filter_map(|(_, _, at, v)| {
                Some((*at, decode::<fleetlet_protocol::AgentStatus>(v).ok()?))
            })
            .find(|(_, s)| {
                s.observed_generation >= *generation
                    && s.resources
                        .values()
                        .all(|r| matches!(r, fleetlet_protocol::ResourceStatus::Ready { .. }))
            })
            .map_or(i128::MAX, |(at, _)| at);
        edges.push((*from, 1i32));
        edges.push((ready, -1));
    }
    // At a tie, a device turning Ready frees its slot before the next one takes it.
    edges.sort();
    let (mut now, mut most) = (0i32, 0i32);
    for (_, step) in edges {
        now += step;
        most = most.max(now);
    }
    usize::try_from(most).unwrap_or(0)
}

/// Two controller replicas split 4 shards of 16 simulated devices; a rollout with
/// maxUnavailable 2 over devices of every shard keeps one budget; a replica SIGKILLed has
/// its shards taken over once their Leases run out; a new replica gets its share back.
#[tokio::test(flavor = "multi_thread")]
async fn sharded_controller_replicas_split_the_fleet_keep_one_rollout_budget_and_take_over_a_dead_ones_shards()
 {
    use fleetlet_plumbing::shards::shard_of;
    use fleetlet_testenv::process::free_port;
    let env = TestEnv::builder().kube().nats().start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ports = [
        free_port().unwrap(),
        free_port().unwrap(),
        free_port().unwrap(),
    ];
    let mut a = start_replica(&env, dir.path(), "replica-a", ports[0]);
    let _b = start_replica(&env, dir.path(), "replica-b", ports[1]);
    let split = eventually(
        "the shards split 2 and 2",
        Duration::from_secs(60),
        || async {
            let h = shard_holders(&env).await;
            (h.len() == SHARDS as usize
                && holding(&h, "replica-a") == 2
                && holding(&h, "replica-b") == 2)
                .then_some(h.clone())
                .ok_or(format!("{h:?}"))
        },
    )
    .await;

    // Every device takes a while to apply, so the budget is what paces the rollout.
    let sim = SimFleet::start(
        &env,
        dir.path(),
        "sh-",
        SHARDED_DEVICES,
        &["--slow=1.0", "--slow-ms=1000"],
    );
    let names = sim.names.clone();
    let of = |who: &str, h: &std::collections::BTreeMap<u32, String>| {
        names
            .iter()
            .filter(|d| h.get(&shard_of(d, SHARDS)).is_some_and(|x| x == who))
            .count()
    };
    let (on_a, on_b) = (of("replica-a", &split), of("replica-b", &split));
    assert!(
        on_a > 0 && on_b > 0,
        "the devices fall in one replica's shards: {on_a} / {on_b}"
    );
    let devices_yaml: String = names.iter().map(|d| device_yaml(d)).collect();
    let yaml = |text: &str| {
        devices_yaml.clone()
            + &file_manifest(
                "sharded",
                &[("/etc/fleetlet/version".into(), text.into())],
                "  rollout: { maxUnavailable: 2 }\n",
            )
    };
    let everywhere = async |text: &str| sim.everywhere(text, Duration::from_secs(120)).await;
    env.apply(&yaml("v1")).unwrap();
    everywhere("v1").await;
    keys_hold(&env, &names, "v1").await;

    // 1. A rollout over both replicas' devices, budget 2.
    let before = [kv_writes(ports[0]), kv_writes(ports[1])];
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let recorder = record_entries(env.jetstream().await.unwrap(), stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    env.apply(&yaml("v2")).unwrap();
    everywhere("v2").await;
    keys_hold(&env, &names, "v2").await;
    let rollout = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = recorder.await.unwrap();
    let most = most_unready_at_once(&seen, "v2");
    assert!(
        most <= 2,
        "{most} devices were moving at once with maxUnavailable 2"
    );
    assert_eq!(most, 2, "the rollout never used its budget of 2");
    let wrote = [
        kv_writes(ports[0]) - before[0],
        kv_writes(ports[1]) - before[1],
    ];
    assert_eq!(
        shard_holders(&env).await,
        split,
        "the shards moved during the rollout"
    );
    assert_eq!(
        wrote,
        [on_a as u64, on_b as u64],
        "each replica writes the manifests of its own shards' devices"
    );

    // 2. Replica a SIGKILLed (it cannot give its Leases up); a change applied at once.
    a.kill_program().unwrap();
    let killed = Instant::now();
    env.apply(&yaml("v3")).unwrap();
    let took_over = eventually(
        "replica-b holds every shard",
        Duration::from_secs(60),
        || async {
            let h = shard_holders(&env).await;
            (holding(&h, "replica-b") == SHARDS as usize)
                .then_some(killed.elapsed())
                .ok_or(format!("{h:?}"))
        },
    )
    .await;
    everywhere("v3").await;
    keys_hold(&env, &names, "v3").await;
    let all_v3 = killed.elapsed();
    // Its Leases run out after their duration; the survivor looks every third of it.
    let bound = Duration::from_secs(SHARD_LEASE_SECONDS + SHARD_LEASE_SECONDS / 3 + 3);
    assert!(
        took_over <= bound,
        "the dead replica's shards were taken over after {took_over:?} (bound {bound:?})"
    );

    // 3. A new replica joins and gets a fair share back; both then work.
    let _c = start_replica(&env, dir.path(), "replica-c", ports[2]);
    let joined = Instant::now();
    eventually(
        "the shards split 2 and 2 again",
        Duration::from_secs(60),
        || async {
            let h = shard_holders(&env).await;
            (holding(&h, "replica-b") == 2 && holding(&h, "replica-c") == 2)
                .then_some(())
                .ok_or(format!("{h:?}"))
        },
    )
    .await;
    let rebalanced = joined.elapsed();
    let before_c = kv_writes(ports[2]);
    env.apply(&yaml("v4")).unwrap();
    everywhere("v4").await;
    keys_hold(&env, &names, "v4").await;
    let split = shard_holders(&env).await;
    assert_eq!(
        kv_writes(ports[2]) - before_c,
        of("replica-c", &split) as u64,
        "the new replica writes its shards' devices"
    );
    record(
        "Controller with 2 replicas and 4 shards (16 simulated devices); a rollout with maxUnavailable 2, then one replica SIGKILLed",
        "each replica writes only its shards' devices; never more than 2 devices moving at once across both; the dead replica's shards taken over once their Leases (6 s) run out; a new replica gets a fair share back",
        &format!(
            "the replicas wrote {} and {} of the 16 manifests, exactly their shards' devices; at most {most} devices moving at once (by nats-server's store times), v2 everywhere in {:.1} s; after the SIGKILL the other replica held all 4 shards in {:.1} s and every device had the change {:.1} s after the kill; a new replica held 2 shards {:.1} s after it started",
            wrote[0],
            wrote[1],
            rollout.as_secs_f64(),
            took_over.as_secs_f64(),
            all_v3.as_secs_f64(),
            rebalanced.as_secs_f64(),
        ),
    );
}

/// A sharded bridge replica with a kubelet API of its own on `kubelet_port`: its Nodes
/// advertise that port.
fn start_bridge_replica(
    env: &TestEnv,
    dir: &std::path::Path,
    identity: &str,
    kubelet_port: u16,
) -> Service {
    let dir = dir.join(identity);
    std::fs::create_dir_all(&dir).unwrap();
    let flags = [
        format!("--shards={SHARDS}"),
        format!("--lease-seconds={SHARD_LEASE_SECONDS}"),
        format!("--identity={identity}"),
        // Device Leases renewed often, so a takeover's gap shows against the grace period.
        "--lease-renew-seconds=4".into(),
    ];
    let flags: Vec<String> = flags
        .into_iter()
        .chain(components::kubelet_flags(env, &format!("127.0.0.1:{kubelet_port}"), false).unwrap())
        .collect();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    components::start_bridge(env, &components::bin_dir().unwrap(), &dir, &flags).unwrap()
}

/// Each device Node's advertised kubelet port, and its Lease's age in ms (None without
/// a Lease).
async fn node_ports_and_lease_ages(
    env: &TestEnv,
) -> std::collections::BTreeMap<String, (Option<i32>, Option<i64>)> {
    use k8s_openapi::api::coordination::v1::Lease;
    let Ok(client) = env.kube_client().await else {
        return Default::default();
    };
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client, "kube-node-lease");
    let Ok(nodes) = nodes.list(&Default::default()).await else {
        return Default::default();
    };
    let Ok(leases) = leases.list(&Default::default()).await else {
        return Default::default();
    };
    let now = k8s_openapi::jiff::Timestamp::now().as_millisecond();
    nodes
        .items
        .into_iter()
        .filter_map(|n| {
            let name = n.metadata.name.clone()?;
            let port = n
                .status
                .and_then(|s| s.daemon_endpoints?.kubelet_endpoint)
                .map(|k| k.port);
            let age = leases
                .items
                .iter()
                .find(|l| l.metadata.name.as_deref() == Some(name.as_str()))
                .and_then(|l| l.spec.as_ref()?.renew_time.as_ref())
                .map(|t| now - t.0.as_millisecond());
            Some((name, (port, age)))
        })
        .collect()
}

/// Two bridge replicas split 4 shards of 16 simulated devices: each device's Node
/// advertises the kubelet API of the replica holding its shard, and both renew Leases.
/// One replica SIGKILLed: the other takes its shards over and its Nodes, advertises its
/// own kubelet API on them, and no device Lease goes older than the grace period.
#[tokio::test(flavor = "multi_thread")]
async fn sharded_bridge_replicas_split_the_nodes_and_take_over_a_dead_ones_within_the_grace_period()
{
    use fleetlet_plumbing::shards::shard_of;
    use fleetlet_testenv::process::free_port;
    const GRACE_MS: i64 = 20_000;
    let env = TestEnv::builder().kube().nats().start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bins = components::bin_dir().unwrap();
    let _controller =
        components::start_controller(&env, &bins, dir.path(), &["--resync-seconds=1"]).unwrap();
    let ports = [free_port().unwrap(), free_port().unwrap()];
    let mut a = start_bridge_replica(&env, dir.path(), "bridge-a", ports[0]);
    let _b = start_bridge_replica(&env, dir.path(), "bridge-b", ports[1]);
    let split = eventually(
        "the shards split 2 and 2",
        Duration::from_secs(60),
        || async {
            let h = group_holders(&env, "fleetlet-bridge").await;
            (h.len() == SHARDS as usize
                && holding(&h, "bridge-a") == 2
                && holding(&h, "bridge-b") == 2)
                .then_some(h.clone())
                .ok_or(format!("{h:?}"))
        },
    )
    .await;
    let sim = SimFleet::start(&env, dir.path(), "bs-", SHARDED_DEVICES, &[]);
    let names = sim.names.clone();
    let port_of = |id: &str, h: &std::collections::BTreeMap<u32, String>| match h
        .get(&shard_of(id, SHARDS))
        .map(String::as_str)
    {
        Some("bridge-a") => Some(i32::from(ports[0])),
        Some("bridge-b") => Some(i32::from(ports[1])),
        _ => None,
    };
    let on_a = names
        .iter()
        .filter(|d| port_of(d, &split) == Some(i32::from(ports[0])))
        .count();
    assert!(
        on_a > 0 && on_a < SHARDED_DEVICES,
        "the devices fall in one replica's shards"
    );
    env.apply(&names.iter().map(|d| device_yaml(d)).collect::<String>())
        .unwrap();
    // Every Node advertises its shard holder's kubelet API.
    let advertised = async |holders: &std::collections::BTreeMap<u32, String>, what: &str| {
        eventually(what, Duration::from_secs(60), || async {
            let seen = node_ports_and_lease_ages(&env).await;
            let wrong: Vec<String> = names
                .iter()
                .filter(|d| {
                    seen.get(*d)
                        .is_none_or(|(p, age)| *p != port_of(d, holders) || age.is_none())
                })
                .cloned()
                .collect();
            wrong
                .is_empty()
                .then_some(())
                .ok_or(format!("{wrong:?} of {seen:?}"))
        })
        .await
    };
    advertised(&split, "every Node on its shard holder's kubelet port").await;
    // Watch every device Lease's age through the takeover.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let oldest = {
        let (stop, env_nodes) = (stop.clone(), names.clone());
        let client = env.kube_client().await.unwrap();
        tokio::spawn(async move {
            let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
                Api::namespaced(client, "kube-node-lease");
            let mut oldest = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(list) = leases.list(&Default::default()).await {
                    let now = k8s_openapi::jiff::Timestamp::now().as_millisecond();
                    for l in list.items {
                        if env_nodes
                            .iter()
                            .any(|n| l.metadata.name.as_deref() == Some(n))
                            && let Some(t) = l.spec.and_then(|s| s.renew_time)
                        {
                            oldest = oldest.max(now - t.0.as_millisecond());
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            oldest
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    a.kill_program().unwrap();
    let killed = Instant::now();
    let took_over = eventually(
        "bridge-b holds every shard",
        Duration::from_secs(60),
        || async {
            let h = group_holders(&env, "fleetlet-bridge").await;
            (holding(&h, "bridge-b") == SHARDS as usize)
                .then_some(killed.elapsed())
                .ok_or(format!("{h:?}"))
        },
    )
    .await;
    let all_b = group_holders(&env, "fleetlet-bridge").await;
    advertised(&all_b, "every Node on the survivor's kubelet port").await;
    let moved = killed.elapsed();
    // A few renewals past the takeover.
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let oldest = oldest.await.unwrap();
    let bound = Duration::from_secs(SHARD_LEASE_SECONDS + SHARD_LEASE_SECONDS / 3 + 3);
    assert!(
        took_over <= bound,
        "the dead replica's shards were taken over after {took_over:?} (bound {bound:?})"
    );
    assert!(
        oldest < GRACE_MS,
        "a device Lease was {oldest} ms old during the takeover (grace {GRACE_MS} ms)"
    );
    record(
        "Bridge with 2 replicas and 4 shards (16 simulated devices, device Leases renewed every 4 s, grace 20 s); one replica SIGKILLed",
        "each Node advertises the kubelet API of the replica holding its shard; the dead replica's shards and Nodes taken over once their Leases (6 s) run out; no device Lease older than the grace period",
        &format!(
            "{on_a} and {} Nodes on the two replicas' kubelet ports; after the SIGKILL the other replica held all 4 shards in {:.1} s and every Node advertised its kubelet API {:.1} s after the kill; the oldest device Lease seen was {:.1} s old",
            SHARDED_DEVICES - on_a,
            took_over.as_secs_f64(),
            moved.as_secs_f64(),
            oldest as f64 / 1000.0,
        ),
    );
}

/// Three devices at a site, connected to the site's leaf node, which reaches the central
/// server over one link (through a proxy the test cuts). With the link down the devices
/// keep running their last manifest (a file changed by hand is put back); a change stored
/// meanwhile reaches every device once the link is back, well before the agents' own
/// periodic read of their desired state (15 minutes).
#[tokio::test(flavor = "multi_thread")]
async fn a_site_behind_a_leaf_node_keeps_running_without_its_uplink_and_catches_up_when_it_returns()
{
    let devices = ["site-1", "site-2", "site-3"];
    let leafnodes = fleetlet_testenv::process::free_port().unwrap();
    let uplink = TcpProxy::start(&format!("127.0.0.1:{leafnodes}"))
        .await
        .unwrap();
    let env = TestEnv::builder()
        .kube()
        .nats_site(&devices, "shop", &devices, &uplink)
        .start()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bins = components::bin_dir().unwrap();
    let password = fleetlet_testenv::nats::static_password;
    let _controller = components::start_controller(
        &env,
        &bins,
        dir.path(),
        &[
            "--nats-user=controller",
            &format!("--nats-password={}", password("controller")),
        ],
    )
    .unwrap();
    let site = fleetlet_testenv::nats::Site::start(
        &fleetlet_testenv::bins::Binaries::locate()
            .unwrap()
            .nats_server,
        &dir.path().join("leaf"),
        "shop",
        &devices,
        uplink,
    )
    .await
    .unwrap();
    let mut agents = Vec::new();
    for d in devices {
        let ddir = dir.path().join(d);
        std::fs::create_dir_all(&ddir).unwrap();
        let nats = format!(
            "user = \"{d}\"\npassword = \"{}\"\nuplink_probe_seconds = 2",
            password(d)
        );
        agents.push(
            components::start_agent(
                &bins,
                &ddir,
                &components::file_agent_config(
                    &site.leaf.url,
                    &ddir,
                    d,
                    "/etc/fleetlet",
                    &nats,
                    "",
                ),
            )
            .unwrap(),
        );
    }
    let path = |d: &str| dir.path().join(d).join("root/etc/fleetlet/version");
    let content = |d: &str| std::fs::read_to_string(path(d)).unwrap_or_default();
    let everywhere = |text: &'static str| {
        let content = &content;
        move || async move {
            let on: Vec<String> = devices.iter().map(|d| content(d)).collect();
            on.iter()
                .all(|c| c == text)
                .then_some(())
                .ok_or(format!("{on:?}"))
        }
    };
    let yaml = |text: &str| {
        devices.iter().map(|d| device_yaml(d)).collect::<String>()
            + &file_manifest(
                "site",
                &[("/etc/fleetlet/version".into(), text.into())],
                "  rollout: { maxUnavailable: 3 }\n",
            )
    };
    env.apply(&yaml("v1")).unwrap();
    eventually("v1 at the site", Duration::from_secs(60), everywhere("v1")).await;

    site.uplink.cut();
    site.wait_linked(false).await;
    let cut = Instant::now();
    env.apply(&yaml("v2")).unwrap();
    let desired = env
        .jetstream()
        .await
        .unwrap()
        .get_key_value("desired-state")
        .await
        .unwrap();
    eventually(
        "v2 stored for every device at the site",
        Duration::from_secs(30),
        || async {
            let mut stored = 0;
            for d in devices {
                let e = desired.entry(d).await.map_err(|e| e.to_string())?;
                stored += usize::from(
                    e.is_some_and(|e| String::from_utf8_lossy(&e.value).contains("\"v2\"")),
                );
            }
            (stored == devices.len())
                .then_some(())
                .ok_or(format!("{stored} stored"))
        },
    )
    .await;
    // Offline, each agent still holds its last manifest: a file changed by hand goes back.
    std::fs::write(path(devices[0]), "changed by hand").unwrap();
    eventually(
        "the hand-made change undone without the uplink",
        Duration::from_secs(30),
        everywhere("v1"),
    )
    .await;
    // Down for several probe periods: a heartbeat goes unanswered on every device.
    tokio::time::sleep(Duration::from_secs(8).saturating_sub(cut.elapsed())).await;
    let offline = cut.elapsed();
    assert!(!site.linked(), "the link stayed down through the change");

    site.uplink.heal();
    let healed = Instant::now();
    site.wait_linked(true).await;
    let linked = healed.elapsed();
    eventually("v2 at the site", Duration::from_secs(90), everywhere("v2")).await;
    let caught_up = healed.elapsed();
    let generations = agents_caught_up(&env, &devices, 2).await;
    drop(agents);
    record(
        "a site's leaf node loses its link to the central server (3 devices on the leaf node, a change stored while it is down)",
        "devices keep running their last manifest; the change reaches every device once the link is back, well within the agents' 15-minute resync",
        &format!(
            "offline {:.1} s, a file changed by hand restored meanwhile; link back {:.1} s after the heal; every device on v2 {:.1} s after the heal (uplink_probe_seconds = 2, heartbeat 1 s); generations {generations:?}, no rejection",
            offline.as_secs_f64(),
            linked.as_secs_f64(),
            caught_up.as_secs_f64()
        ),
    );
}
