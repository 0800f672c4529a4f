//! fleetlet-agent: the mini-kubelet on each device.

use std::{io::Write, path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand};
use fleetlet_agent::{Config, Settings};
use fleetlet_protocol::AgentManifest;

/// Runs the workloads the fleetlet control plane assigns to this device, and reports on them.
///
/// Settings come from the config file, then FLEETLET_* environment variables, then flags.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// Config file (TOML). See the README for every setting.
    #[arg(
        long,
        short,
        env = "FLEETLET_CONFIG",
        default_value = "/etc/fleetlet/agent.toml"
    )]
    config: PathBuf,
    /// Device id (overrides the config file).
    #[arg(long, env = "FLEETLET_DEVICE_ID")]
    device_id: Option<String>,
    /// NATS server URL(s), comma-separated (override the config file).
    #[arg(long, env = "FLEETLET_NATS_URL", value_delimiter = ',')]
    nats_url: Vec<String>,
    /// State directory (overrides the config file).
    #[arg(long, env = "FLEETLET_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Reconcile once (the stored manifest, or --manifest) without NATS, print the status as
    /// JSON and exit; exit status 1 if a resource is not Ready.
    #[arg(long)]
    once: bool,
    /// With --once: a manifest file (JSON) to apply instead of the stored one.
    #[arg(long, requires = "once")]
    manifest: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check the configuration and print it as the agent would use it.
    CheckConfig,
}

fn settings(cli: &Cli) -> anyhow::Result<Settings> {
    let mut config = if cli.config.exists() || cli.device_id.is_none() {
        Config::from_file(&cli.config)?
    } else {
        Config::new("", Vec::new())
    };
    if let Some(d) = &cli.device_id {
        config.device_id.clone_from(d);
    }
    if !cli.nats_url.is_empty() {
        config.nats.urls.clone_from(&cli.nats_url);
    }
    if let Some(s) = &cli.state_dir {
        config.state_dir.clone_from(s);
    }
    Ok(config.validate()?)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLEETLET_LOG")
                .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let settings = match settings(&cli) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("fleetlet-agent: invalid configuration: {e:#}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fleetlet-agent: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli, settings)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fleetlet-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, settings: Settings) -> anyhow::Result<ExitCode> {
    if let Some(Cmd::CheckConfig) = cli.command {
        println!("configuration OK");
        println!("device:          {}", settings.device);
        println!("nats:            {}", settings.nats.urls.join(", "));
        println!("state dir:       {}", settings.state_dir.display());
        println!("drift interval:  {:?}", settings.drift_interval);
        println!("heartbeat:       {:?}", settings.heartbeat_interval);
        let kinds: Vec<&str> = settings.enabled_kinds.iter().map(|k| k.key()).collect();
        println!("enabled kinds:   {}", kinds.join(", "));
        let roots: Vec<String> = settings
            .file_roots
            .iter()
            .map(|r| r.display().to_string())
            .collect();
        println!("file roots:      {}", roots.join(", "));
        return Ok(ExitCode::SUCCESS);
    }
    if cli.once {
        let manifest = match &cli.manifest {
            Some(path) => {
                let bytes =
                    std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
                Some(
                    fleetlet_protocol::decode::<AgentManifest>(&bytes)
                        .with_context(|| format!("parsing {}", path.display()))?,
                )
            }
            None => None,
        };
        let status = fleetlet_agent::once(settings, manifest).await?;
        let mut out = std::io::stdout().lock();
        // A closed pipe (`| head`) is the reader's choice, not an agent failure.
        let _ = writeln!(out, "{}", serde_json::to_string_pretty(&status)?);
        let all_ready = status.resources.values().all(|r| r.is_ready());
        return Ok(if all_ready {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        });
    }
    fleetlet_agent::run(settings, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
