//! Writes the JSON Schemas of the wire records into a directory (default `docs/schema`).
//!
//! `cargo run -p fleetlet-protocol --bin fleetlet-schemagen [-- DIR]`

use std::{fs, path::PathBuf, process::ExitCode};

fn main() -> ExitCode {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "docs/schema".into()),
    );
    if let Err(e) = fs::create_dir_all(&dir) {
        eprintln!("cannot create {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    for (name, schema) in fleetlet_protocol::json_schemas() {
        let path = dir.join(name);
        let text = match serde_json::to_string_pretty(&schema) {
            Ok(t) => t + "\n",
            Err(e) => {
                eprintln!("cannot serialize {name}: {e}");
                return ExitCode::FAILURE;
            }
        };
        if let Err(e) = fs::write(&path, text) {
            eprintln!("cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("wrote {}", path.display());
    }
    ExitCode::SUCCESS
}
