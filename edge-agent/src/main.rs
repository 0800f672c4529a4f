//! fleetlet-agent: the mini-kubelet on each device.

use std::{io::Write, path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand};
use fleetlet_agent::{Config, Settings};

/// Runs the workloads the fleetlet control plane assigns to this device, and reports on them.
///
/// Settings come from the config file, then FLEETLET_* environment variables, then flags.
#[derive(Parser)]
#[command(version = fleetlet_agent::VERSION, about, long_about)]
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
    /// Put the previous agent binary back after an upgrade that does not stay up, and start
    /// the agent again (run by the unit's OnFailure=, from the kept binary).
    Rollback,
    /// Install this binary as a systemd service: copy it to --bin-path, write the config
    /// (with the NATS credentials and CA next to it) and the unit, then enable and start it.
    Install(InstallArgs),
    /// Stop and disable the service and remove its unit and binary (--purge: also the config
    /// and state). Containers, units and files the agent manages stay as they are.
    Uninstall(LayoutArgs),
}

#[derive(clap::Args)]
struct LayoutArgs {
    #[arg(long, default_value = "/usr/local/bin/fleetlet-agent")]
    bin_path: PathBuf,
    #[arg(long, default_value = "/etc/fleetlet")]
    config_dir: PathBuf,
    /// Where systemd reads the agent's unit (and the units the agent manages).
    #[arg(long, default_value = "/etc/systemd/system")]
    unit_dir: PathBuf,
    #[arg(long, default_value = "/var/lib/fleetlet")]
    state_dir: PathBuf,
    /// systemd's D-Bus address (default: the system bus).
    #[arg(long)]
    bus_address: Option<String>,
    /// Uninstall only: remove the config and the state directory too.
    #[arg(long)]
    purge: bool,
}

#[derive(clap::Args)]
struct InstallArgs {
    /// This device's id: the name of its EdgeDevice.
    #[arg(long)]
    device_id: String,
    /// NATS server URL(s), comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    nats_url: Vec<String>,
    /// This device's NATS credentials file (.creds); copied next to the config, mode 0600.
    #[arg(long)]
    nats_creds: Option<PathBuf>,
    /// CA bundle of the NATS server (implies TLS); copied next to the config.
    #[arg(long)]
    nats_ca: Option<PathBuf>,
    /// Resource kinds this device runs, comma-separated (default: file, container,
    /// systemdUnit, agentUpgrade; add networkConfig if systemd-networkd manages the
    /// interfaces, shellJob only if the device should run commands).
    #[arg(long, value_delimiter = ',')]
    enable_kinds: Vec<String>,
    /// A trusted manifest signing key, `ID=BASE64` (the line the controller's signing key
    /// Secret and each device's enrolment Secret give); repeat for a rotation.
    #[arg(long = "manifest-key", value_name = "ID=BASE64")]
    manifest_keys: Vec<String>,
    /// Accept unsigned manifests (no key): for a lab or a test bench only.
    #[arg(long, conflicts_with = "manifest_keys")]
    allow_unsigned: bool,
    /// Replace an existing installation's config.
    #[arg(long)]
    force: bool,
    /// Only write the files; do not enable or start the service.
    #[arg(long)]
    no_start: bool,
    #[command(flatten)]
    layout: LayoutArgs,
}

impl LayoutArgs {
    fn layout(&self) -> fleetlet_agent::install::Layout {
        fleetlet_agent::install::Layout {
            bin_path: self.bin_path.clone(),
            config_dir: self.config_dir.clone(),
            unit_dir: self.unit_dir.clone(),
            state_dir: self.state_dir.clone(),
            bus_address: self.bus_address.clone(),
        }
    }
}

/// The agent's single-threaded runtime (a Pi Zero has one core).
fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("fleetlet-agent: cannot start runtime: {e}");
            ExitCode::FAILURE
        })
}

/// `install` and `uninstall`: they need no configuration (they write it).
fn setup(cmd: &Cmd) -> Option<ExitCode> {
    use fleetlet_agent::install;
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return Some(code),
    };
    let result = match cmd {
        Cmd::CheckConfig | Cmd::Rollback => return None,
        Cmd::Install(a) => {
            let opts = install::InstallOptions {
                device_id: a.device_id.clone(),
                nats_urls: a.nats_url.clone(),
                nats_creds: a.nats_creds.clone(),
                nats_ca: a.nats_ca.clone(),
                enabled_kinds: a.enable_kinds.clone(),
                manifest_keys: a.manifest_keys.clone(),
                allow_unsigned: a.allow_unsigned,
                force: a.force,
                start: !a.no_start,
            };
            rt.block_on(install::install(&opts, &a.layout.layout()))
                .map(|done| {
                    for f in &done.files {
                        println!("wrote {}", f.display());
                    }
                    if done.started {
                        println!("{} enabled and started", install::UNIT_NAME);
                    } else {
                        println!(
                            "start it with: systemctl enable --now {}",
                            install::UNIT_NAME
                        );
                    }
                })
        }
        Cmd::Uninstall(a) => rt
            .block_on(install::uninstall(&a.layout(), a.purge))
            .map(|removed| {
                for f in &removed {
                    println!("removed {}", f.display());
                }
                println!("{} stopped and disabled", install::UNIT_NAME);
            }),
    };
    Some(match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ install::InstallError::Invalid { .. })
        | Err(e @ install::InstallError::AlreadyInstalled(_))
        | Err(e @ install::InstallError::Config(_)) => {
            eprintln!("fleetlet-agent: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("fleetlet-agent: {e}");
            ExitCode::FAILURE
        }
    })
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

/// Log lines on stderr: coloured only on a terminal; under systemd (its journal adds the
/// time) without a timestamp of their own.
fn init_logging() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLEETLET_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A build that answers --version and then cannot start, for the upgrade tests (never
    // set in a release).
    if option_env!("FLEETLET_AGENT_EXIT_AT_START").is_some() {
        eprintln!("fleetlet-agent: this build exits at start");
        return ExitCode::from(3);
    }
    init_logging();
    if let Some(code) = cli.command.as_ref().and_then(setup) {
        return code;
    }
    let settings = match settings(&cli) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("fleetlet-agent: invalid configuration: {e:#}");
            return ExitCode::from(2);
        }
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
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
    if let Some(Cmd::Rollback) = cli.command {
        let paths = fleetlet_agent::upgrade::Paths {
            binary: settings
                .upgrade
                .binary_path()
                .map_err(|e| anyhow::anyhow!(e))?,
            state: settings.state_dir.join("upgrade"),
        };
        let systemd = fleetlet_agent::systemd::SystemdReconciler::new(
            settings.systemd.clone(),
            settings.device.clone(),
        );
        let rolled = fleetlet_agent::upgrade::rollback_after_failure(
            &paths,
            &systemd,
            &settings.systemd.agent_unit,
        )
        .await?;
        println!(
            "{}",
            if rolled {
                "previous agent put back and started"
            } else {
                "no upgrade pending: nothing to roll back"
            }
        );
        return Ok(ExitCode::SUCCESS);
    }
    if cli.once {
        let manifest = match &cli.manifest {
            Some(path) => {
                Some(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?)
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
    fleetlet_agent::run(settings, fleetlet_agent::shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}
