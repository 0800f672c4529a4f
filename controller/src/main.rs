//! fleetlet-controller: turns EdgeManifests and EdgeDevices into per-device AgentManifests.
//! Not implemented yet; the binary exists so the workspace layout is final.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "fleetlet-controller {}: not implemented yet",
        env!("CARGO_PKG_VERSION")
    );
    ExitCode::from(2)
}
