//! Prints the fleetlet CRDs as YAML, or writes them to a file.
//!
//! `cargo run -p fleetlet-crds --bin fleetlet-crdgen [-- crds/fleetlet.dev.yaml helm/fleetlet/crds/fleetlet.dev.yaml]`

use std::process::ExitCode;

fn main() -> ExitCode {
    let yaml = match fleetlet_crds::crds_yaml() {
        Ok(y) => y,
        Err(e) => {
            eprintln!("fleetlet-crdgen: {e}");
            return ExitCode::FAILURE;
        }
    };
    let paths: Vec<String> = std::env::args().skip(1).collect();
    if paths.is_empty() {
        print!("{yaml}");
        return ExitCode::SUCCESS;
    }
    for path in paths {
        if let Err(e) = std::fs::write(&path, &yaml) {
            eprintln!("fleetlet-crdgen: cannot write {path}: {e}");
            return ExitCode::FAILURE;
        }
        println!("wrote {path}");
    }
    ExitCode::SUCCESS
}
