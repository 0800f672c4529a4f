//! `fleetlet-dev up`: a local fleetlet control plane on this machine, for trying it out.
//!
//! Starts a real etcd + kube-apiserver and nats-server (with fleetlet's buckets), installs
//! the Helm chart (CRDs, ServiceAccounts, RBAC), runs the controller and the bridge with the
//! chart's ServiceAccount tokens and one agent per example device, applies the examples,
//! shows the fleet with kubectl, changes a manifest and shows the rollout, and keeps running
//! until Ctrl-C. `--exit` tears down right after the rollout, and fails if the fleet did not
//! converge or the rollout did not complete.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use fleetlet_crds::{EdgeDevice, EdgeManifest};
use fleetlet_protocol::{AgentStatus, kv::ACTUAL_STATE};
use fleetlet_testenv::{
    TestEnv, components,
    process::Service,
    repo_root,
    sandbox::{NetworkSandbox, PodmanSandbox, SystemdSandbox},
};
use kube::{Api, ResourceExt};

#[derive(Parser)]
#[command(
    version,
    about = "Run a local fleetlet control plane for trying it out"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the control plane, apply the examples and show the fleet.
    Up {
        /// Stop everything right after showing the fleet (for scripts and CI). Exits
        /// non-zero, naming what is missing, if the fleet does not converge within 60 s or
        /// the rollout does not complete.
        #[arg(long)]
        exit: bool,
        /// Where to put the kubeconfig and connection details for other shells.
        #[arg(long, default_value = ".fleetlet-dev")]
        state_dir: PathBuf,
        /// YAML files to apply instead of the examples; every EdgeDevice in them gets an
        /// agent. Repeatable.
        #[arg(long = "apply")]
        files: Vec<PathBuf>,
        /// After the rollout, run this shell script (`bash -e`) from the directory holding
        /// the state directory, as a user would in another shell; its failure fails the
        /// demo. Repeatable (the docs check runs the guides' runnable blocks this way).
        #[arg(long = "then")]
        then: Vec<PathBuf>,
        /// Also run the "what to try next" commands the demo prints, as printed.
        #[arg(long)]
        check_try_next: bool,
    },
    /// Write docs/reliability.md from the records the fault tests left in
    /// target/fleetlet-reliability/ (run by scripts/reliability).
    ReliabilityReport {
        #[arg(long, default_value = "target/fleetlet-reliability")]
        from: PathBuf,
        #[arg(long, default_value = "docs/reliability.md")]
        out: PathBuf,
    },
    /// Write docs/performance.md from the benchmark results in target/fleetlet-bench/
    /// (run by scripts/bench all and scripts/bench report).
    PerformanceReport {
        #[arg(long, default_value = "target/fleetlet-bench")]
        from: PathBuf,
        #[arg(long, default_value = "docs/performance.md")]
        out: PathBuf,
        /// Rewrite only one section, keeping the rest of the page: `kubelet` (from
        /// kubelet.json), `agent` (the goals table and the agent's section, from agent.json
        /// and agent-sizes.json), `fleet` (the goals table and the runs by fleet size, from
        /// fleet*.json), `no-nodes` (the fleet without Node projection, from
        /// fleet-*-no-nodes.json), `sharding` (one and two replicas of each component, from
        /// sharding.json), `durability` (NATS sync settings, from durability.json) or
        /// `heap` (what the controller's and bridge's heaps hold, from heap-*.txt).
        #[arg(long, value_parser = ["kubelet", "agent", "fleet", "no-nodes", "durability", "heap", "sharding"])]
        only: Option<String>,
    },
    /// Write docs/compatibility.md from the runs scripts/compat left in `from`.
    CompatibilityReport {
        #[arg(long, default_value = "target/fleetlet-compat")]
        from: PathBuf,
        #[arg(long, default_value = "docs/compatibility.md")]
        out: PathBuf,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,kube_client::client::builder=off".into()),
        )
        .init();
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleetlet-dev: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let (exit, state_dir, files, then, check_try_next) = match cli.command {
        Cmd::Up {
            exit,
            state_dir,
            files,
            then,
            check_try_next,
        } => (exit, state_dir, files, then, check_try_next),
        Cmd::ReliabilityReport { from, out } => return reliability_report(&from, &out),
        Cmd::PerformanceReport { from, out, only } => {
            use fleetlet_testenv::report;
            return Ok(match only.as_deref() {
                Some("kubelet") => report::kubelet_report(&from, &out),
                Some("agent") => report::agent_report(&from, &out),
                Some("fleet") => report::fleet_report(&from, &out),
                Some("durability") => report::durability_report(&from, &out),
                Some("heap") => report::heap_report(&from, &out),
                Some("sharding") => report::sharding_report(&from, &out),
                Some(_) => report::no_nodes_report(&from, &out),
                None => report::performance(&from, &out),
            }?);
        }
        Cmd::CompatibilityReport { from, out } => {
            return Ok(fleetlet_testenv::compat::report(&from, &out)?);
        }
    };
    let files = if files.is_empty() {
        let ex = repo_root().join("examples");
        vec![
            ex.join("devices.yaml"),
            ex.join("manifest.yaml"),
            ex.join("pod.yaml"),
        ]
    } else {
        files
    };

    eprintln!("starting etcd, kube-apiserver and nats-server ...");
    let started = std::time::Instant::now();
    let env = TestEnv::builder()
        .kube_without_crds()
        .nats()
        .start()
        .await
        .context("starting the local control plane")?;
    eprintln!(
        "control plane ready in {:.1}s",
        started.elapsed().as_secs_f64()
    );

    let kubeconfig = publish_state(&env, &state_dir)?;
    let state_dir = state_dir.canonicalize()?;
    let bin_dir = std::env::current_exe()?
        .parent()
        .map(Path::to_path_buf)
        .context("locating the fleetlet binaries")?;
    for bin in ["fleetlet-controller", "fleetlet-bridge", "fleetlet-agent"] {
        if !bin_dir.join(bin).is_file() {
            bail!(
                "{bin} is not built next to fleetlet-dev in {}: run scripts/demo, or cargo build -p fleetlet-controller -p fleetlet-bridge -p fleetlet-agent",
                bin_dir.display()
            );
        }
    }
    // What a platform team does: the chart installs the CRDs, ServiceAccounts and RBAC. Its
    // Deployments cannot run here (no kubelet), so the same binaries run on this machine with
    // the chart's ServiceAccount tokens: exactly the rights an in-cluster install has.
    eprintln!("$ helm install fleetlet helm/fleetlet -n fleetlet-system --create-namespace");
    let chart = env
        .install_chart("fleetlet", "fleetlet-system", &[])
        .context("installing the Helm chart")?;
    wait_for_crds(&env).await?;
    let _controller = components::start_controller_as(
        &env,
        &chart.controller_kubeconfig,
        &bin_dir,
        &state_dir,
        // As the chart runs it: manifests signed with a key the controller keeps in a Secret.
        &[
            "--resync-seconds=5",
            "--manifest-signing-secret=fleetlet-manifest-signing",
        ],
    )?;
    // What a device owner copies to each device: the key its manifests are signed with.
    let trust =
        components::manifest_trust(&env, "fleetlet-system", "fleetlet-manifest-signing").await?;
    // The bridge also serves the nodes' kubelet API (kubectl logs / exec), with a serving
    // certificate from the local control plane's CA, which the apiserver trusts.
    let kubelet_flags = components::kubelet_flags(&env, "127.0.0.1:0", false)?;
    let kubelet_flags: Vec<&str> = kubelet_flags.iter().map(String::as_str).collect();
    let _bridge = components::start_bridge_as(
        &env,
        &chart.bridge_kubeconfig,
        &bin_dir,
        &state_dir,
        &kubelet_flags,
    )?;

    for f in &files {
        kubectl(&env, &["apply", "-f", &f.display().to_string()])?;
    }
    let client = env.kube_client().await?;
    let devices: Vec<EdgeDevice> = Api::<EdgeDevice>::all(client.clone())
        .list(&Default::default())
        .await?
        .items;
    let runtimes = Runtimes::start(devices.len()).await;
    let mut agents = Vec::new();
    for (i, d) in devices.iter().enumerate() {
        agents.push(start_agent(
            &env,
            &bin_dir,
            &state_dir,
            &d.name_any(),
            runtimes.for_device(i),
            &trust,
        )?);
    }
    eprintln!(
        "started the controller, the bridge and {} agents; waiting for the fleet to converge ...",
        agents.len()
    );
    // With --exit (scripts and tests), a fleet that does not converge is a failure; shown
    // interactively, the fleet is shown as it is.
    let settled = |r: anyhow::Result<()>| match r {
        Err(e) if exit => Err(e),
        Err(e) => {
            eprintln!("{e:#}; showing the fleet as it is");
            Ok(())
        }
        Ok(()) => Ok(()),
    };
    settled(wait_for_fleet(&env, &client, &devices).await)?;
    if runtimes.podman.is_some() {
        settled(wait_for_pods(&client).await)?;
    }

    println!();
    kubectl(&env, &["get", "nodes", "-o", "wide"])?;
    println!();
    kubectl(&env, &["get", "edgedevices,edgemanifests", "-o", "wide"])?;
    println!();
    kubectl(&env, &["get", "pods", "-o", "wide"])?;
    println!();
    print_device_status(&env, &devices).await?;
    println!();
    println!("KUBECONFIG={}", kubeconfig.display());
    println!("NATS_URL={}", env.nats_url()?);
    println!(
        "Files the agents manage are under {}/agents/<device>/root/",
        state_dir.display()
    );
    runtimes.describe();

    settled(show_rollout(&env, &client, &state_dir).await)?;

    let try_next = try_next(&state_dir, runtimes.podman.is_some());
    if check_try_next {
        let script = state_dir.join("try-next.sh");
        std::fs::write(&script, try_next.join("\n") + "\n")?;
        run_script(&script, &state_dir)?;
    }
    for script in &then {
        run_script(script, &state_dir)?;
    }
    if exit {
        return Ok(());
    }
    println!();
    println!("The fleet is up. What to try next, in another shell:");
    for line in &try_next {
        println!("  {line}");
    }
    println!(
        "Press Ctrl-C to stop; the logs stay in {}.",
        state_dir.display()
    );
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    eprintln!("stopping ...");
    let logs = state_dir.join("control-plane");
    copy_logs(&env.dir, &logs);
    drop(env);
    // What the agents wrote goes; every log (a panic's trace among them) stays.
    keep_only_logs(&state_dir);
    eprintln!("stopped; logs kept under {}", state_dir.display());
    Ok(())
}

/// What the demo suggests trying next, as shell lines that work as printed (the demo test
/// runs them). The Pod's commands need podman on this machine.
fn try_next(state_dir: &Path, podman: bool) -> Vec<String> {
    let mut lines = vec![
        format!("source {}/env", state_dir.display()),
        "kubectl get nodes".into(),
        "kubectl get edgedevices,edgemanifests -o wide".into(),
        "kubectl describe edgemanifest sensor-stack".into(),
    ];
    if podman {
        lines.push("kubectl logs hello-edge             # a Pod running in podman on pi-kitchen; -f follows".into());
        lines.push("kubectl exec hello-edge -- uname -a".into());
    }
    lines.push(format!(
        "cat {}/agents/pi-garage/root/etc/fleetlet-demo/motd   # edit it: the agent puts it back",
        state_dir.display()
    ));
    lines
}

/// Runs `script` with `bash -e` from the directory that holds `state_dir` (so the guides'
/// `.fleetlet-dev/...` paths resolve), printing what it prints.
fn run_script(script: &Path, state_dir: &Path) -> anyhow::Result<()> {
    let cwd = state_dir.parent().unwrap_or(state_dir);
    println!();
    println!("$ bash -e {}", script.display());
    let status = std::process::Command::new("bash")
        .arg("-e")
        .arg(script)
        .current_dir(cwd)
        .env_remove("KUBECONFIG")
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    if !status.success() {
        bail!("{} failed ({status})", script.display());
    }
    Ok(())
}

/// Copies every `*.log` below `from` into `to` (etcd, kube-apiserver, nats-server).
fn copy_logs(from: &Path, to: &Path) {
    let Ok(entries) = std::fs::read_dir(from) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.is_dir() {
            copy_logs(&path, to);
        } else if path.extension().is_some_and(|x| x == "log") {
            let _ = std::fs::create_dir_all(to);
            if let Some(name) = path.file_name() {
                let _ = std::fs::copy(&path, to.join(name));
            }
        }
    }
}

/// Removes everything under `dir` but `*.log` files and the directories holding them.
fn keep_only_logs(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let Ok(kind) = e.file_type() else { continue };
        if kind.is_dir() {
            keep_only_logs(&path);
            let _ = std::fs::remove_dir(&path); // only if nothing was kept in it
        } else if path.extension().is_none_or(|x| x != "log") {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// docs/reliability.md: one table row per fault scenario, from the tests' records.
fn reliability_report(from: &Path, out: &Path) -> anyhow::Result<()> {
    let mut rows: Vec<serde_json::Value> = Vec::new();
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(&path)?;
            rows.push(serde_json::from_str(&text).with_context(|| path.display().to_string())?);
        }
    }
    if rows.is_empty() {
        bail!("no records in {}: run scripts/reliability", from.display());
    }
    rows.sort_by_key(|r| r["scenario"].as_str().unwrap_or_default().to_owned());
    let cell = |v: &serde_json::Value| v.as_str().unwrap_or_default().replace('|', "\\|");
    let table = |section: &str| {
        let mut t = String::from("| scenario | expected | observed | run |\n|---|---|---|---|\n");
        for r in rows
            .iter()
            .filter(|r| r["section"].as_str().unwrap_or("fault") == section)
        {
            t.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                cell(&r["scenario"]),
                cell(&r["expected"]),
                cell(&r["observed"]),
                cell(&r["recorded"]),
            ));
        }
        t
    };
    let mut md = String::from(
        "# Reliability\n\n\
         Fault scenarios run against real servers on loopback (`tests/tests/faults.rs`), with what\n\
         each expected and what it observed on its last run. Generated by `scripts/reliability`;\n\
         do not edit by hand.\n\n",
    );
    md.push_str(&table("fault"));
    md.push_str(
        "\nAlso covered elsewhere: a lost KV bucket is recreated and every device key rewritten \
         (controller tests); an agent started without NATS converges from its stored manifest \
         and reports when NATS returns, and a running agent reconnects after NATS restarts \
         (agent tests); hostile manifests are refused with the previous one kept in force \
         (agent tests).\n",
    );
    md.push_str(
        "\n## Security\n\n\
         The adversarial suite (`tests/tests/nats_security.rs`) against a real nats-server: one \
         compromised device's credentials and the bridge's, in both deployments. Every subject \
         an identity may publish to is sent requests whose reply subject aims at each class of \
         target, every target is also published to directly, and each case checks the effect \
         (the other device's keys, every stream's configuration and consumers, what reached the \
         other device or the bridge), not an error message. The control row runs the same suite \
         against the layout before per-device accounts: it must find breaches.\n\n",
    );
    md.push_str(&table("security"));
    std::fs::write(out, md).with_context(|| format!("writing {}", out.display()))?;
    println!("wrote {} ({} scenarios)", out.display(), rows.len());
    Ok(())
}

/// Waits until the apiserver serves the CRDs the chart installed.
async fn wait_for_crds(env: &TestEnv) -> anyhow::Result<()> {
    let api: Api<EdgeManifest> = Api::all(env.kube_client().await?);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while api.list(&Default::default()).await.is_err() {
        if std::time::Instant::now() > deadline {
            bail!("the chart's CRDs are not served after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// Changes sensor-stack's config file and prints the rollout as it happens: with
/// `maxUnavailable: 1`, one device at a time.
async fn show_rollout(env: &TestEnv, client: &kube::Client, state: &Path) -> anyhow::Result<()> {
    let api: Api<EdgeManifest> = Api::namespaced(client.clone(), "default");
    let Some(before) = api.get_opt("sensor-stack").await? else {
        return Ok(());
    };
    let Some(i) = before
        .spec
        .resources
        .iter()
        .position(|r| r.id.as_str() == "sensor-config")
    else {
        return Ok(());
    };
    println!();
    println!("== changing a manifest: sensor-stack's sensor.toml, interval 15 s -> 30 s");
    let patch = serde_json::json!([{
        "op": "replace",
        "path": format!("/spec/resources/{i}/file/content/text"),
        "value": "interval_seconds = 30\nendpoint = \"http://127.0.0.1:8080/ingest\"\n",
    }])
    .to_string();
    println!("$ kubectl patch edgemanifest sensor-stack --type=json -p '{patch}'");
    kubectl(
        env,
        &[
            "patch",
            "edgemanifest",
            "sensor-stack",
            "--type=json",
            "-p",
            &patch,
        ],
    )?;
    let started = std::time::Instant::now();
    let mut last = String::new();
    let mut complete = false;
    while started.elapsed() < Duration::from_secs(60) {
        let m = api.get("sensor-stack").await?;
        let generation = m.metadata.generation.unwrap_or_default();
        if let Some(s) = m
            .status
            .as_ref()
            .filter(|s| s.observed_generation == Some(generation))
        {
            let reason = s
                .conditions
                .iter()
                .find(|c| c.type_ == "Ready")
                .map(|c| c.reason.clone())
                .unwrap_or_default();
            let line = format!(
                "generation {generation}: {}/{} devices updated, {} Ready ({reason})",
                s.updated, s.targeted, s.ready
            );
            if line != last {
                println!("  {:>5.1}s  {line}", started.elapsed().as_secs_f64());
                last = line;
            }
            if reason == "RolloutComplete" {
                complete = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "rollout {}",
        if complete {
            "complete"
        } else {
            "not complete after 60 s"
        }
    );
    kubectl(env, &["get", "edgemanifest", "sensor-stack"])?;
    if !complete {
        bail!("the rollout of sensor-stack did not complete within 60 s (last: {last})");
    }
    for device in ["pi-kitchen", "pi-office"] {
        let path = state.join(format!(
            "agents/{device}/root/etc/fleetlet-demo/sensor.toml"
        ));
        if let Ok(text) = std::fs::read_to_string(&path) {
            println!(
                "{device}: sensor.toml says {}",
                text.lines().next().unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// Waits (up to 60 s) for the example pods to run.
async fn wait_for_pods(client: &kube::Client) -> anyhow::Result<()> {
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), "default");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    while std::time::Instant::now() < deadline {
        match pods.list(&Default::default()).await {
            Ok(l) => {
                let waiting: Vec<String> = l
                    .items
                    .iter()
                    .filter_map(|p| {
                        let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
                        (phase != Some("Running"))
                            .then(|| format!("{} {}", p.name_any(), phase.unwrap_or("Pending")))
                    })
                    .collect();
                if waiting.is_empty() {
                    return Ok(());
                }
                last = waiting.join(", ");
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    bail!("the example pods are not Running after 60 s ({last}); see `kubectl describe pod`")
}

/// The image the example manifest runs, tagged into the demo's podman storage.
const DEMO_IMAGE: &str = "localhost/fleetlet-demo/busybox:latest";

/// The interface each demo device has in its network namespace, for networkConfig
/// resources (examples/network.yaml).
const DEMO_INTERFACE: &str = "eth0";

/// What the demo devices run containers, units and network settings with: one podman
/// shared by all (each device's containers are named after it), and a systemd with
/// systemd-networkd per device, in a network namespace of its own holding an interface
/// `eth0`. Both need root and the Debian packages the tests use (scripts/setup demo checks
/// both); without one, the agents do not enable those kinds and report their resources
/// Unsupported.
struct Runtimes {
    podman: Option<PodmanSandbox>,
    systemd: Vec<NetworkSandbox>,
    missing: Vec<String>,
}

impl Runtimes {
    async fn start(devices: usize) -> Self {
        let mut missing = Vec::new();
        let podman = match PodmanSandbox::start().await {
            Ok(p) => match p
                .podman(&["pull", &p.image_1])
                .and_then(|_| p.podman(&["tag", &p.image_1, DEMO_IMAGE]))
            {
                Ok(_) => Some(p),
                Err(e) => {
                    missing.push(format!("podman: preparing {DEMO_IMAGE}: {}", e.trim()));
                    None
                }
            },
            Err(e) => {
                missing.push(format!("podman: {e}"));
                None
            }
        };
        let mut systemd = Vec::new();
        for _ in 0..devices {
            let started = SystemdSandbox::start_with_network().await.and_then(|s| {
                s.ip(&["link", "add", DEMO_INTERFACE, "type", "ifb"])
                    .and_then(|_| s.ip(&["link", "set", DEMO_INTERFACE, "up"]))
                    .map_err(|e| {
                        fleetlet_testenv::Error::Setup(format!(
                            "adding {DEMO_INTERFACE}: {}",
                            e.trim()
                        ))
                    })?;
                Ok(s)
            });
            match started {
                Ok(s) => systemd.push(s),
                Err(e) => {
                    missing.push(format!("systemd: {e}"));
                    systemd.clear();
                    break;
                }
            }
        }
        // Said now, not only with the fleet: with --exit a fleet that cannot converge
        // without them fails before it is shown.
        for m in &missing {
            eprintln!("not available here, so the agents do not run it: {m}");
        }
        Self {
            podman,
            systemd,
            missing,
        }
    }

    /// The agent config sections and enabled kinds for device number `i`.
    fn for_device(&self, i: usize) -> (String, Vec<&'static str>) {
        let mut sections = String::new();
        let mut kinds = vec!["file"];
        if let Some(p) = &self.podman {
            kinds.push("container");
            sections.push_str(&format!(
                "[container]\nsocket = \"{}\"\nname_prefix = \"demo-{i}-\"\nstop_timeout_seconds = 2\n\n",
                p.socket.display()
            ));
        }
        if let Some(n) = self.systemd.get(i) {
            kinds.push("systemdUnit");
            kinds.push("networkConfig");
            sections.push_str(&format!(
                "[systemd]\nbus_address = \"{}\"\nunit_dir = \"{}\"\n\n[network]\ndir = \"{}\"\n",
                n.systemd.bus_address,
                n.systemd.unit_dir.display(),
                n.network_dir.display()
            ));
        }
        (sections, kinds)
    }

    fn describe(&self) {
        if let Some(p) = &self.podman {
            let env: Vec<String> = p.cli_env.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!(
                "Containers run in a private podman: {} podman ps",
                env.join(" ")
            );
        }
        if !self.systemd.is_empty() {
            println!(
                "Each device has its own systemd and systemd-networkd, in a network namespace \
                 with an interface {DEMO_INTERFACE}; for example:"
            );
            for n in self.systemd.iter().take(1) {
                let s = &n.systemd;
                println!(
                    "  busctl --address={} call org.freedesktop.systemd1 /org/freedesktop/systemd1 \
                     org.freedesktop.systemd1.Manager ListUnitsByPatterns asas 0 1 'fleetlet-*'",
                    s.bus_address
                );
                println!(
                    "  nsenter --net={} ip addr show {DEMO_INTERFACE}",
                    n.netns.display()
                );
            }
        }
        for m in &self.missing {
            println!("Not available here, so the agents do not run it: {m}");
        }
    }
}

/// One agent per device, each writing its files under its own directory.
fn start_agent(
    env: &TestEnv,
    bin_dir: &Path,
    state_dir: &Path,
    device: &str,
    (sections, kinds): (String, Vec<&'static str>),
    trust: &str,
) -> anyhow::Result<Service> {
    let dir = state_dir.join("agents").join(device);
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "device_id = \"{device}\"\nstate_dir = \"{state}\"\n\n[nats]\nurls = [\"{url}\"]\n\n\
             [reconcile]\ndrift_interval_seconds = 5\nheartbeat_interval_seconds = 5\n\
             enabled_kinds = {kinds:?}\n\n\
             [file]\nallowed_roots = [\"/etc/fleetlet-demo\", \"/opt/fleetlet\"]\npath_prefix = \"{root}\"\n\n{trust}\n{sections}",
            state = dir.join("state").display(),
            url = env.nats_url()?,
            root = dir.join("root").display(),
        ),
    )?;
    Ok(Service::spawn(
        &format!("agent-{device}"),
        &bin_dir.join("fleetlet-agent"),
        &["--config".into(), config.display().to_string()],
        dir.join("agent.log"),
    )?)
}

/// Waits (up to 60 s) until every EdgeManifest has rolled out to all the devices it targets
/// (Ready, RolloutComplete, for its current generation), every agent reports having worked
/// through the manifest it was sent, and every device is Converged with its Node Ready.
/// Err names what is still missing.
async fn wait_for_fleet(
    env: &TestEnv,
    client: &kube::Client,
    devices: &[EdgeDevice],
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut last = Vec::new();
    while std::time::Instant::now() < deadline {
        last = fleet_not_settled(env, client, devices).await?;
        if last.is_empty() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    bail!(
        "the fleet did not converge within 60 s: {}",
        last.join("; ")
    )
}

/// What keeps the fleet from being settled, one entry per object; empty when it is.
async fn fleet_not_settled(
    env: &TestEnv,
    client: &kube::Client,
    devices: &[EdgeDevice],
) -> anyhow::Result<Vec<String>> {
    // (status, reason, "reason: message" to show)
    let condition = |conditions: &[fleetlet_crds::Condition], type_: &str| {
        conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| {
                let why = if c.message.is_empty() {
                    c.reason.clone()
                } else {
                    format!("{}: {}", c.reason, c.message)
                };
                (c.status.clone(), c.reason.clone(), why)
            })
            .unwrap_or_default()
    };
    let mut pending = Vec::new();
    for m in Api::<EdgeManifest>::all(client.clone())
        .list(&Default::default())
        .await?
        .items
    {
        let s = m.status.clone().unwrap_or_default();
        let (ready, reason, why) = condition(&s.conditions, "Ready");
        if s.observed_generation != m.metadata.generation
            || s.updated != s.targeted
            || ready != "True"
            || reason != "RolloutComplete"
        {
            pending.push(format!(
                "edgemanifest {}: {}/{} updated, Ready={ready} ({why})",
                m.name_any(),
                s.updated,
                s.targeted
            ));
        }
    }
    let js = env.jetstream().await?;
    let desired = js
        .get_key_value(fleetlet_protocol::kv::DESIRED_STATE.name)
        .await?;
    let actual = js.get_key_value(ACTUAL_STATE.name).await?;
    for d in devices {
        let name = d.name_any();
        let want = match desired.entry(name.as_str()).await? {
            Some(e) => fleetlet_protocol::decode::<fleetlet_protocol::AgentManifest>(&e.value)
                .map_or(0, |m| m.generation),
            None => u64::MAX,
        };
        let have = match actual.entry(name.as_str()).await? {
            Some(e) => fleetlet_protocol::decode::<AgentStatus>(&e.value)
                .map_or(0, |s| s.observed_generation),
            None => 0,
        };
        if have < want {
            pending.push(format!(
                "agent {name}: worked through generation {have} of {want}"
            ));
        }
    }
    for d in Api::<EdgeDevice>::all(client.clone())
        .list(&Default::default())
        .await?
        .items
    {
        let s = d.status.clone().unwrap_or_default();
        let (ready, _, _) = condition(&s.conditions, "Ready");
        // Converged: every resource Ready. A container whose mount source another resource
        // creates may fail once and be retried.
        let (converged, _, why) = condition(&s.conditions, "Converged");
        if ready != "True"
            || converged != "True"
            || s.applied_generation.is_none_or(|a| a == 0)
            // The controller records a generation only if the device is slow to apply it.
            || s.applied_generation < s.desired_generation
        {
            pending.push(format!(
                "edgedevice {}: Ready={ready}, Converged={converged} ({why})",
                d.name_any()
            ));
        }
    }
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    for d in devices {
        let name = d.name_any();
        let ready = nodes.get_opt(&name).await?.is_some_and(|n| {
            n.status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        });
        if !ready {
            pending.push(format!("node {name}: not Ready"));
        }
    }
    Ok(pending)
}

/// What each agent reports in actual-state: generation and every resource's state.
async fn print_device_status(env: &TestEnv, devices: &[EdgeDevice]) -> anyhow::Result<()> {
    let kv = env
        .jetstream()
        .await?
        .get_key_value(ACTUAL_STATE.name)
        .await?;
    println!(
        "{:<14} {:>9} {:>9}  RESOURCES (as reported by the agent)",
        "DEVICE", "MANIFEST", "OBSERVED"
    );
    for d in devices {
        let name = d.name_any();
        let line = match kv.entry(name.as_str()).await? {
            Some(e) => match fleetlet_protocol::decode::<AgentStatus>(&e.value) {
                Ok(s) => {
                    let rs: Vec<String> = s
                        .resources
                        .iter()
                        .map(|(id, r)| format!("{id}={}", r.state_name()))
                        .collect();
                    format!(
                        "{:>9} {:>9}  {}",
                        s.manifest_generation,
                        s.observed_generation,
                        rs.join(" ")
                    )
                }
                Err(e) => format!("unreadable status: {e}"),
            },
            None => "no status yet".into(),
        };
        println!("{name:<14} {line}");
    }
    Ok(())
}

/// Copies the kubeconfig where other shells can find it; returns its absolute path.
fn publish_state(env: &TestEnv, state_dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    let dir = state_dir
        .canonicalize()
        .with_context(|| format!("resolving {}", state_dir.display()))?;
    // Every run starts a fresh control plane: agents must not remember an earlier one.
    let agents = dir.join("agents");
    if agents.exists() {
        std::fs::remove_dir_all(&agents)
            .with_context(|| format!("removing {}", agents.display()))?;
    }
    let kubeconfig = dir.join("kubeconfig");
    std::fs::copy(env.kubeconfig()?, &kubeconfig).context("copying the kubeconfig")?;
    std::fs::write(
        dir.join("env"),
        format!(
            "export KUBECONFIG={}\nexport NATS_URL={}\n",
            kubeconfig.display(),
            env.nats_url()?
        ),
    )?;
    Ok(kubeconfig)
}

fn kubectl(env: &TestEnv, args: &[&str]) -> anyhow::Result<()> {
    for attempt in 0..3 {
        let status = env
            .kubectl()?
            .args(args)
            .status()
            .context("running kubectl (is it installed and on PATH?)")?;
        if status.success() {
            return Ok(());
        }
        // A freshly established CRD can take a moment to appear in discovery.
        if attempt < 2 {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    bail!("kubectl {} failed", args.join(" "))
}
