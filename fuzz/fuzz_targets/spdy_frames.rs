#![no_main]

#[path = "../spdy_checks.rs"]
mod spdy_checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    spdy_checks::spdy_frames(data);
});
