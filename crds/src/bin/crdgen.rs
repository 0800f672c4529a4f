//! Prints the fleetlet CRDs as YAML, or writes them to a file.
//!
//! `cargo run -p fleetlet-crds --bin fleetlet-crdgen [-- crds/fleetlet.dev.yaml]`

use std::process::ExitCode;

fn main() -> ExitCode {
    let yaml = match fleetlet_crds::crds_yaml() {
        Ok(y) => y,
        Err(e) => {
            eprintln!("fleetlet-crdgen: {e}");
            return ExitCode::FAILURE;
        }
    };
    match std::env::args().nth(1) {
        Some(path) => match std::fs::write(&path, yaml) {
            Ok(()) => {
                println!("wrote {path}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("fleetlet-crdgen: cannot write {path}: {e}");
                ExitCode::FAILURE
            }
        },
        None => {
            print!("{yaml}");
            ExitCode::SUCCESS
        }
    }
}
