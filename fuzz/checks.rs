//! What every fuzz input must satisfy; shared by the fuzz targets and the corpus replay test
//! (`protocol/tests/fuzz_corpus.rs`). A panic here is a bug.

use fleetlet_protocol::{
    AgentManifest, AgentStatus, Heartbeat, decode, encode,
    relay::{AttachRequest, ExecRequest, LogsRequest},
};

/// Bytes from the desired-state key, as an agent receives them (plain or signed envelope).
/// What decodes is valid, and survives a round trip unchanged.
pub fn manifest(data: &[u8]) {
    let Ok(m) = decode::<AgentManifest>(data) else {
        return;
    };
    assert!(m.validate().is_ok(), "a decoded manifest is valid");
    for r in &m.resources {
        // Validation of every kind runs on whatever the decoder let through.
        let _ = r.spec.validate();
    }
    if let Ok(bytes) = encode(&m) {
        let again = decode::<AgentManifest>(&bytes).expect("a re-encoded manifest decodes");
        assert_eq!(again, m, "round trip");
    }
}

/// Bytes from the actual-state and heartbeat keys, as the control plane receives them.
pub fn status(data: &[u8]) {
    if let Ok(s) = decode::<AgentStatus>(data)
        && let Ok(bytes) = encode(&s)
    {
        assert_eq!(decode::<AgentStatus>(&bytes).expect("status round trip"), s);
    }
    if let Ok(h) = decode::<Heartbeat>(data)
        && let Ok(bytes) = encode(&h)
    {
        assert_eq!(
            decode::<Heartbeat>(&bytes).expect("heartbeat round trip"),
            h
        );
    }
}

/// A relay request (logs, exec, attach), as an agent receives it from the bridge.
pub fn relay_request(data: &[u8]) {
    if data.len() > fleetlet_protocol::kv::MAX_MANIFEST_BYTES {
        return;
    }
    let _ = serde_json::from_slice::<LogsRequest>(data);
    let _ = serde_json::from_slice::<ExecRequest>(data);
    let _ = serde_json::from_slice::<AttachRequest>(data);
}
