//! fleetlet-bridge binary.

use std::process::ExitCode;

use clap::Parser;
use fleetlet_bridge::{Args, run};
use fleetlet_controller::{init_tracing, shutdown_signal};

#[tokio::main]
async fn main() -> ExitCode {
    init_tracing();
    let args = Args::parse();
    match run(
        args,
        shutdown_signal(),
        |addr| tracing::info!(%addr, "serving /metrics, /healthz, /readyz"),
    )
    .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleetlet-bridge: {e}");
            ExitCode::FAILURE
        }
    }
}
