//! fleetlet-agent: the mini-kubelet on each device.
//! Not implemented yet; the binary exists so the workspace layout is final.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("fleetlet-agent {}: not implemented yet", env!("CARGO_PKG_VERSION"));
    ExitCode::from(2)
}
