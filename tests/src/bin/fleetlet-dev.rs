//! `fleetlet-dev up`: a local fleetlet control plane on this machine, for trying it out.
//!
//! Starts a real etcd + kube-apiserver (with fleetlet's CRDs) and nats-server (with
//! fleetlet's buckets), applies the examples, shows the fleet with kubectl, and keeps
//! running until Ctrl-C. `--exit` tears down right after showing the fleet.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use fleetlet_testenv::{TestEnv, repo_root};

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
        /// Stop everything right after showing the fleet (for scripts and CI).
        #[arg(long)]
        exit: bool,
        /// Where to put the kubeconfig and connection details for other shells.
        #[arg(long, default_value = ".fleetlet-dev")]
        state_dir: PathBuf,
        /// YAML files to apply; defaults to the examples.
        #[arg(long = "apply")]
        files: Vec<PathBuf>,
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
    let Cmd::Up {
        exit,
        state_dir,
        files,
    } = cli.command;
    let files = if files.is_empty() {
        let ex = repo_root().join("examples");
        vec![ex.join("devices.yaml"), ex.join("manifest.yaml")]
    } else {
        files
    };

    eprintln!("starting etcd, kube-apiserver and nats-server ...");
    let started = std::time::Instant::now();
    let env = TestEnv::builder()
        .kube()
        .nats()
        .start()
        .await
        .context("starting the local control plane")?;
    eprintln!(
        "control plane ready in {:.1}s",
        started.elapsed().as_secs_f64()
    );

    let kubeconfig = publish_state(&env, &state_dir)?;

    for f in &files {
        kubectl(&env, &["apply", "-f", &f.display().to_string()])?;
    }
    println!();
    kubectl(&env, &["get", "edgedevices,edgemanifests", "-o", "wide"])?;
    println!();
    println!("KUBECONFIG={}", kubeconfig.display());
    println!("NATS_URL={}", env.nats_url()?);

    if exit {
        return Ok(());
    }
    println!();
    println!("The fleet is up. In another shell:");
    println!("  export KUBECONFIG={}", kubeconfig.display());
    println!("  kubectl get edgedevices,edgemanifests");
    println!("Press Ctrl-C to stop and remove everything.");
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    eprintln!("stopping ...");
    drop(env);
    let _ = std::fs::remove_dir_all(&state_dir);
    Ok(())
}

/// Copies the kubeconfig where other shells can find it; returns its absolute path.
fn publish_state(env: &TestEnv, state_dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    let dir = state_dir
        .canonicalize()
        .with_context(|| format!("resolving {}", state_dir.display()))?;
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
