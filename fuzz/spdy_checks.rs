//! What every SPDY fuzz input must satisfy; shared by the `spdy_frames` fuzz target and the
//! corpus replay test (`bridge/spdy/tests/fuzz_corpus.rs`). A panic here is a bug.

use fleetlet_spdy::{Codec, Frame};

/// Bytes from an apiserver's SPDY connection to the kubelet listener. Decoding stops at
/// the first error, as a session does; every frame that decodes survives a round trip
/// through a fresh pair of codecs unchanged.
pub fn spdy_frames(data: &[u8]) {
    let mut buf = data.to_vec();
    let mut reader = Codec::new();
    let mut frames = Vec::new();
    while let Ok(Some(frame)) = reader.decode(&mut buf) {
        frames.push(frame);
    }
    let (mut writer, mut again) = (Codec::new(), Codec::new());
    for frame in frames
        .iter()
        .filter(|f| !matches!(f, Frame::Unknown { .. }))
    {
        let mut bytes = Vec::new();
        writer
            .encode(frame, &mut bytes)
            .expect("a decoded frame encodes");
        let decoded = again
            .decode(&mut bytes)
            .expect("a re-encoded frame decodes")
            .expect("a re-encoded frame is whole");
        assert_eq!(&decoded, frame, "round trip");
        assert!(bytes.is_empty(), "one frame, nothing after it");
    }
}
