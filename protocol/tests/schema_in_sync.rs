//! The JSON Schemas committed under docs/schema/ are what the types generate.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::path::Path;

#[test]
fn committed_json_schemas_match_the_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/schema");
    for (name, schema) in fleetlet_protocol::json_schemas() {
        let expected = serde_json::to_string_pretty(&schema).unwrap() + "\n";
        let committed = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        assert!(
            committed == expected,
            "docs/schema/{name} is out of date: run `cargo run -p fleetlet-protocol --bin fleetlet-schemagen`"
        );
    }
}
