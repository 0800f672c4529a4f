//! `fleetlet-sim`: many simulated devices in one process against a real NATS server.
//!
//! Each device is the real agent (engine, manifest watch, status writer with
//! compare-and-set, heartbeat) on a NATS connection of its own, optionally with its own
//! identity (`--creds-dir DIR` holding `<device>.creds`). Its one simulated part is the
//! device itself: File resources are written under a per-device directory
//! (`DIR/<device>/root`, the agent's `file.path_prefix`), and only the File kind is enabled;
//! containers and units are reported as disabled on these devices.
//!
//! Faults, as fractions of the fleet (assigned by device index, the same on every run):
//! `--offline` devices never connect, `--slow` devices see every manifest `--slow-ms` late,
//! `--failing` devices cannot write under `/etc` (their File resources fail).
//!
//! When every device is started it prints one JSON line on stdout, then runs until SIGTERM
//! or Ctrl-C.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Parser;
use fleetlet_agent::{Config, ServeOptions, nats};
use tokio::sync::watch;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Runs N simulated fleetlet devices against a real NATS server"
)]
struct Args {
    /// NATS server URL(s), comma-separated.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// How many devices.
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Device ids are PREFIX + index.
    #[arg(long, default_value = "sim-")]
    prefix: String,
    /// First index.
    #[arg(long, default_value_t = 0)]
    first: usize,
    /// Per-device state and file directories go under DIR.
    #[arg(long)]
    dir: PathBuf,
    /// `<device>.creds` per device (its own NATS identity).
    #[arg(long)]
    creds_dir: Option<PathBuf>,
    /// CA bundle of the NATS server (implies TLS).
    #[arg(long)]
    nats_ca: Option<PathBuf>,
    /// Seconds between heartbeats (the agent's default).
    #[arg(long, default_value_t = 30)]
    heartbeat_seconds: u32,
    #[arg(long, default_value_t = 300)]
    drift_seconds: u64,
    /// Fraction of devices that stay offline.
    #[arg(long, default_value_t = 0.0)]
    offline: f64,
    /// Fraction of devices that receive manifests late.
    #[arg(long, default_value_t = 0.0)]
    slow: f64,
    #[arg(long, default_value_t = 5000)]
    slow_ms: u64,
    /// Fraction of devices whose File resources fail.
    #[arg(long, default_value_t = 0.0)]
    failing: f64,
    /// Devices connecting at once while starting.
    #[arg(long, default_value_t = 100)]
    connect_parallel: usize,
    /// Threads for the devices' blocking file work (state files, File resources), shared
    /// by every simulated device.
    #[arg(long, default_value_t = 4)]
    blocking_threads: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Healthy,
    Offline,
    Slow,
    Failing,
}

/// The role of device `i` of `n`: a fixed spread over the fleet, so faulty devices are not
/// all at one end of it.
fn role(a: &Args, i: usize) -> Role {
    let n = a.devices.max(1);
    let pos = i.wrapping_mul(7919) % n;
    let count = |fraction: f64| (fraction.clamp(0.0, 1.0) * n as f64).round() as usize;
    let offline = count(a.offline);
    let slow = offline + count(a.slow);
    let failing = slow + count(a.failing);
    if pos < offline {
        Role::Offline
    } else if pos < slow {
        Role::Slow
    } else if pos < failing {
        Role::Failing
    } else {
        Role::Healthy
    }
}

fn settings(a: &Args, device: &str, dir: &Path) -> anyhow::Result<fleetlet_agent::Settings> {
    let mut c = Config::new(device, a.nats_url.split(',').map(str::to_owned).collect());
    // The simulator is sent whatever the test writes; it does not check signatures.
    c.trust.allow_unsigned = true;
    c.state_dir = dir.join("state");
    c.file.path_prefix = Some(dir.join("root"));
    c.file.allowed_roots = vec!["/etc/fleetlet".into()];
    c.reconcile.enabled_kinds = vec!["file".into()];
    c.reconcile.heartbeat_interval_seconds = a.heartbeat_seconds;
    c.reconcile.drift_interval_seconds = a.drift_seconds;
    c.nats.creds_file = a
        .creds_dir
        .as_ref()
        .map(|d| d.join(format!("{device}.creds")));
    c.nats.tls_ca.clone_from(&a.nats_ca);
    Ok(c.validate()?)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(args.blocking_threads.max(1))
        .build();
    let result = match runtime {
        Ok(rt) => rt.block_on(simulate(args)),
        Err(e) => Err(e.into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleetlet-sim: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn simulate(args: Args) -> anyhow::Result<()> {
    let args = Arc::new(args);
    let started = Instant::now();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut devices = tokio::task::JoinSet::new();
    let mut counts = [0usize; 4];
    let mut named: [Vec<String>; 4] = Default::default();
    let gate = Arc::new(tokio::sync::Semaphore::new(args.connect_parallel.max(1)));
    let mut connected = tokio::task::JoinSet::new();
    for i in args.first..args.first + args.devices {
        let r = role(&args, i - args.first);
        counts[r as usize] += 1;
        let device = format!("{}{i}", args.prefix);
        named[r as usize].push(device.clone());
        if r == Role::Offline {
            continue;
        }
        let dir = args.dir.join(&device);
        std::fs::create_dir_all(dir.join("root"))?;
        if r == Role::Failing {
            // A file where the device's /etc should be: nothing can be written below it.
            std::fs::write(dir.join("root/etc"), "not a directory\n")?;
        }
        let settings = Arc::new(settings(&args, &device, &dir)?);
        let gate = gate.clone();
        connected.spawn(async move {
            let _permit = gate.acquire_owned().await;
            let link = nats::connect(&settings).await;
            (settings, link, r)
        });
    }
    while let Some(joined) = connected.join_next().await {
        let (settings, link, r) = joined?;
        let link = link?;
        let options = ServeOptions {
            relay: false,
            manifest_delay: (r == Role::Slow).then(|| Duration::from_millis(args.slow_ms)),
        };
        let mut stop = stop_rx.clone();
        devices.spawn(async move {
            let device = settings.device.clone();
            let shutdown = async move {
                while !*stop.borrow_and_update() {
                    if stop.changed().await.is_err() {
                        return;
                    }
                }
            };
            if let Err(e) = fleetlet_agent::serve(settings, link, options, shutdown).await {
                tracing::error!(%device, error = %e, "device stopped");
            }
        });
    }
    println!(
        "{}",
        serde_json::json!({
            "devices": args.devices,
            "running": devices.len(),
            "offline": counts[Role::Offline as usize],
            "slow": counts[Role::Slow as usize],
            "failing": counts[Role::Failing as usize],
            "offlineDevices": named[Role::Offline as usize],
            "slowDevices": named[Role::Slow as usize],
            "failingDevices": named[Role::Failing as usize],
            "startSeconds": started.elapsed().as_secs_f64(),
        })
    );
    fleetlet_agent::shutdown_signal().await;
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(20), async {
        while devices.join_next().await.is_some() {}
    })
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_spread_in_the_given_fractions() {
        let a = Args::parse_from([
            "fleetlet-sim",
            "--dir=/tmp/x",
            "--devices=1000",
            "--offline=0.05",
            "--slow=0.1",
            "--failing=0.02",
        ]);
        let mut counts = [0usize; 4];
        for i in 0..1000 {
            counts[role(&a, i) as usize] += 1;
        }
        assert_eq!(counts, [830, 50, 100, 20]);
        // Not bunched at one end.
        assert!((0..100).any(|i| role(&a, i) == Role::Slow));
        assert!((900..1000).any(|i| role(&a, i) == Role::Slow));
    }
}
