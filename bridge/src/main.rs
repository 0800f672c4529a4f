//! fleetlet-bridge binary.

use std::process::ExitCode;

use clap::Parser;
use fleetlet_bridge::{Args, run};
use fleetlet_plumbing::{exit_code, init_tracing, log_serving, shutdown_signal};

// jemalloc returns freed memory to the OS far better than glibc's malloc after the burst of
// a full pass over a large fleet, which keeps resident memory close to what is live.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    init_tracing();
    let args = Args::parse();
    exit_code(
        "fleetlet-bridge",
        run(args, shutdown_signal(), log_serving).await,
    )
}
