//! Replays the kept fuzz corpus (`fuzz/corpus/<target>/`) through the fuzz targets' checks
//! on stable Rust, so every input a fuzzing run found interesting stays a regression test.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

#[path = "../../fuzz/checks.rs"]
mod checks;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| check(&bytes));
        assert!(outcome.is_ok(), "{} fails {target}", path.display());
        n += 1;
    }
    assert!(n >= 10, "{target}: only {n} inputs in {}", dir.display());
}

#[test]
fn the_manifest_corpus_passes() {
    replay("manifest", checks::manifest);
}

#[test]
fn the_status_corpus_passes() {
    replay("status", checks::status);
}

#[test]
fn the_relay_request_corpus_passes() {
    replay("relay_request", checks::relay_request);
}
