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
// The bridge allocates all the time (every heartbeat): freed pages are kept a second for
// reuse, then handed back (handing them back at once cost it a fifth more CPU at 10,000
// devices and saved nothing measurable).
#[cfg(feature = "jemalloc")]
fleetlet_plumbing::jemalloc_options!("background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0");

#[tokio::main]
async fn main() -> ExitCode {
    init_tracing();
    let args = Args::parse();
    exit_code(
        "fleetlet-bridge",
        run(args, shutdown_signal(), log_serving).await,
    )
}
