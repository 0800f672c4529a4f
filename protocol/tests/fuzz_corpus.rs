//! Replays the kept fuzz corpus (`fuzz/corpus/<target>/`) through the fuzz targets' checks
//! on stable Rust, so every input a fuzzing run found interesting stays a regression test.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

#[path = "../../fuzz/checks.rs"]
mod checks;

fn replay(target: &str, check: impl Fn(&[u8]) + std::panic::RefUnwindSafe) {
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
fn the_relay_request_corpus_passes_and_holds_refused_and_accepted_requests() {
    let outcomes = std::sync::Mutex::new(Vec::new());
    replay("relay_request", |bytes| {
        let o = checks::relay_request(bytes);
        outcomes.lock().unwrap().push(o);
    });
    let outcomes = outcomes.into_inner().unwrap();
    let count = |o| outcomes.iter().filter(|x| **x == o).count();
    // The checks ran on both sides: requests the agent refuses and ones it serves.
    assert!(count(checks::Relay::Refused) > 0, "{outcomes:?}");
    assert!(count(checks::Relay::Accepted) > 0, "{outcomes:?}");
}
