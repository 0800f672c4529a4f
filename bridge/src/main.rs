//! fleetlet-bridge: mirrors device status into Kubernetes and keeps a virtual Node per device.
//! Not implemented yet; the binary exists so the workspace layout is final.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "fleetlet-bridge {}: not implemented yet",
        env!("CARGO_PKG_VERSION")
    );
    ExitCode::from(2)
}
