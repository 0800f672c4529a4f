//! Replays the kept fuzz corpus of the `spdy_frames` target (`fuzz/corpus/spdy_frames/`) on
//! stable Rust, so every input a fuzzing run found interesting stays a regression test.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

#[path = "../../../fuzz/spdy_checks.rs"]
mod spdy_checks;

#[test]
fn the_spdy_frames_corpus_passes() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/spdy_frames");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| spdy_checks::spdy_frames(&bytes));
        assert!(outcome.is_ok(), "{} fails spdy_frames", path.display());
        n += 1;
    }
    assert!(n >= 10, "only {n} inputs in {}", dir.display());
}
