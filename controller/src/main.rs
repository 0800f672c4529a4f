//! fleetlet-controller binary.

use std::process::ExitCode;

use clap::Parser;
use fleetlet_controller::{Args, run};
use fleetlet_controller::{init_tracing, shutdown_signal};

// As in the bridge: jemalloc hands memory freed after a fleet-wide pass back to the OS.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    init_tracing();
    let args = Args::parse();
    if let Some(fleetlet_controller::Command::SigningKey { file, id }) = &args.command {
        use fleetlet_controller::signing::Signer;
        let signer = if file.exists() {
            Signer::from_file(file, id.clone())
        } else {
            Signer::generate(file, id.clone())
        };
        return match signer {
            Ok(s) => {
                println!("# agents: /etc/fleetlet/agent.toml");
                println!("[trust.manifest_keys]");
                println!("\"{}\" = \"{}\"", s.id, s.public_key_base64());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("fleetlet-controller: {e}");
                ExitCode::from(2)
            }
        };
    }
    if let Some(fleetlet_controller::Command::NatsInit { dir, resolver_dir }) = &args.command {
        return match nats_init(dir, resolver_dir.as_deref()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("fleetlet-controller: {e}");
                ExitCode::from(2)
            }
        };
    }
    match run(
        args,
        shutdown_signal(),
        |addr| tracing::info!(%addr, "serving /metrics, /healthz, /readyz"),
    )
    .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleetlet-controller: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Writes a new NATS authority, the server configuration for it and the bridge's credentials.
fn nats_init(dir: &std::path::Path, resolver_dir: Option<&std::path::Path>) -> anyhow::Result<()> {
    use anyhow::Context;
    use fleetlet_controller::identity::Authority;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let authority_path = dir.join("authority.json");
    let authority = Authority::generate();
    authority.write(&authority_path)?;
    let resolver = resolver_dir.map_or_else(|| dir.join("jwt"), std::path::Path::to_path_buf);
    let conf = dir.join("nats-auth.conf");
    std::fs::write(&conf, authority.server_config(&resolver)?)
        .with_context(|| format!("writing {}", conf.display()))?;
    let bridge =
        authority.issue_user("fleetlet-bridge", &fleetlet_protocol::permissions::bridge())?;
    let bridge_path = dir.join("bridge.creds");
    {
        use std::{io::Write, os::unix::fs::OpenOptionsExt};
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&bridge_path)
            .and_then(|mut f| f.write_all(bridge.creds.as_bytes()))
            .with_context(|| format!("writing {}", bridge_path.display()))?;
    }
    println!(
        "wrote {} (secret: the controller's --nats-authority)",
        authority_path.display()
    );
    println!(
        "wrote {} (add `include nats-auth.conf` to nats-server's configuration)",
        conf.display()
    );
    println!(
        "wrote {} (the bridge's --nats-creds)",
        bridge_path.display()
    );
    Ok(())
}
