//! fleetlet-controller binary.

use std::process::ExitCode;

use clap::Parser;
use fleetlet_controller::{Args, run};
use fleetlet_controller::{init_tracing, shutdown_signal};

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
