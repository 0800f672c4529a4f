//! What every fuzz input must satisfy; shared by the fuzz targets and the corpus replay test
//! (`protocol/tests/fuzz_corpus.rs`). A panic here is a bug.

use fleetlet_protocol::{
    AgentManifest, AgentStatus, FactsReport, Heartbeat, decode, encode,
    relay::{
        AttachRequest, ExecRequest, LogsRequest, PortForwardRequest, RequestError, StatsRequest,
    },
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

/// Bytes from the actual-state, heartbeat and facts keys, as the control plane receives them.
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
    if let Ok(f) = decode::<FactsReport>(data)
        && let Ok(bytes) = encode(&f)
    {
        assert_eq!(decode::<FactsReport>(&bytes).expect("facts round trip"), f);
    }
}

/// What the agent does with one relay request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relay {
    /// Not a request of any kind.
    Undecodable,
    /// Decoded, then refused by validation.
    Refused,
    /// Decoded and valid: a session would start.
    Accepted,
}

/// A relay request (logs, exec, attach, port-forward), as an agent receives it from the bridge: decoded
/// and validated as the agent does. A refusal must have its reason in the request, an
/// accepted request must be one the agent can answer (a session id that is one subject
/// token), and it survives a round trip.
pub fn relay_request(data: &[u8]) -> Relay {
    if data.len() > fleetlet_protocol::kv::MAX_MANIFEST_BYTES {
        return Relay::Undecodable;
    }
    let mut outcome = Relay::Undecodable;
    // `problem`: what is wrong with the request besides its session, if anything.
    let mut note = |r: Result<(), RequestError>, session: &str, problem: Option<RequestError>| {
        let refused = r.is_err();
        match r {
            Ok(()) => {
                assert!(fleetlet_protocol::relay::valid_session(session));
                assert_eq!(problem, None, "accepted despite {problem:?}");
                outcome = Relay::Accepted;
            }
            Err(RequestError::Session) => {
                assert!(!fleetlet_protocol::relay::valid_session(session));
            }
            Err(e) => assert_eq!(Some(e), problem),
        }
        if refused && outcome == Relay::Undecodable {
            outcome = Relay::Refused;
        }
    };
    if let Ok(r) = serde_json::from_slice::<LogsRequest>(data) {
        note(r.validate(), &r.session, None);
        round_trip(&r);
    }
    if let Ok(r) = serde_json::from_slice::<ExecRequest>(data) {
        let problem = r.command.is_empty().then_some(RequestError::EmptyCommand);
        note(r.validate(), &r.session, problem);
        round_trip(&r);
    }
    if let Ok(r) = serde_json::from_slice::<AttachRequest>(data) {
        note(r.validate(), &r.session, None);
        round_trip(&r);
    }
    if let Ok(r) = serde_json::from_slice::<PortForwardRequest>(data) {
        note(
            r.validate(),
            &r.session,
            (r.port == 0).then_some(RequestError::Port),
        );
        round_trip(&r);
    }
    if let Ok(r) = serde_json::from_slice::<StatsRequest>(data) {
        note(r.validate(), &r.session, None);
        round_trip(&r);
    }
    outcome
}

fn round_trip<T>(r: &T)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let bytes = serde_json::to_vec(r).expect("a decoded request encodes");
    let again: T = serde_json::from_slice(&bytes).expect("a re-encoded request decodes");
    assert_eq!(&again, r, "round trip");
}
