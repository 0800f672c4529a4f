//! Signed manifests: the controller signs each AgentManifest with ed25519 and stores it in a
//! [`SignedManifest`] envelope; agents that hold the public key refuse anything else.
//!
//! The envelope carries the manifest as the exact JSON text that was signed, so verifying
//! never depends on re-serializing. The manifest names its key (`signingKey`), inside the
//! signed text. Cryptography lives in the controller and the agent; this module is the wire
//! format only.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `kind` of the envelope.
pub const KIND: &str = "SignedAgentManifest";

/// A signed AgentManifest, as stored in `desired-state.<device>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SignedManifest {
    pub api_version: String,
    /// Always [`KIND`].
    pub kind: String,
    /// The AgentManifest JSON text, exactly as signed.
    pub manifest: String,
    /// Standard base64 of the 64-byte ed25519 signature over `manifest`'s UTF-8 bytes, by
    /// the key the manifest's `signingKey` names.
    pub signature: String,
}

impl SignedManifest {
    pub fn new(manifest: String, signature: String) -> Self {
        Self {
            api_version: crate::API_VERSION.to_owned(),
            kind: KIND.to_owned(),
            manifest,
            signature,
        }
    }
}

/// `kind` of a signed freshness floor.
pub const FLOOR_KIND: &str = "SignedManifestFloor";

/// What a device that lost its state asks the controller (on
/// [`crate::access::floor_subject`]): a fresh random nonce, which the answer must carry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FloorRequest {
    pub nonce: String,
}

/// The lowest manifest generation `device` may accept: the newest the controller has
/// issued it. An old signed manifest replayed to a device that lost its state is refused
/// against it. Bound to one request by its nonce, so an old answer cannot be replayed
/// either.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Floor {
    pub api_version: String,
    pub device: crate::DeviceId,
    pub generation: u64,
    pub nonce: String,
    /// Id of the key that signed it.
    pub signing_key: String,
}

/// A [`Floor`] as the exact JSON text that was signed, and the signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SignedFloor {
    pub api_version: String,
    /// Always [`FLOOR_KIND`].
    pub kind: String,
    pub floor: String,
    /// Standard base64 of the ed25519 signature over `floor`'s UTF-8 bytes.
    pub signature: String,
}

/// Whether `s` is a nonce a device would send: 16 to 64 ASCII letters and digits.
pub fn valid_nonce(s: &str) -> bool {
    (16..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// The envelope in `bytes`: `None` if they are not one (a plain manifest), `Some(Err)` if
/// they claim to be one and are not valid.
pub fn open(bytes: &[u8]) -> Option<Result<SignedManifest, serde_json::Error>> {
    // Cheap test first; a plain manifest mentioning the kind in a file's text fails the
    // parse below and stays a plain manifest.
    let needle = KIND.as_bytes();
    if !bytes.windows(needle.len()).any(|w| w == needle) {
        return None;
    }
    // Not JSON, or JSON of another kind (a plain manifest): the caller parses it.
    let value = serde_json::from_slice::<serde_json::Value>(bytes).ok()?;
    if value.get("kind").and_then(|k| k.as_str()) != Some(KIND) {
        return None;
    }
    Some(serde_json::from_value(value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AgentManifest, DeviceId, decode, encode};

    #[test]
    fn an_envelope_decodes_to_its_manifest() {
        let mut m = AgentManifest::new(DeviceId::new("pi-1").unwrap(), 3);
        m.signing_key = Some("k1".into());
        let text = String::from_utf8(encode(&m).unwrap()).unwrap();
        let env = serde_json::to_vec(&SignedManifest::new(text, "c2ln".into())).unwrap();
        assert_eq!(decode::<AgentManifest>(&env).unwrap(), m);
        assert!(open(&encode(&m).unwrap()).is_none());
    }

    #[test]
    fn a_plain_manifest_mentioning_the_kind_stays_plain() {
        let m = AgentManifest::new(DeviceId::new("pi-1").unwrap(), 1);
        let mut v = serde_json::to_value(&m).unwrap();
        v["note"] = serde_json::json!("SignedAgentManifest");
        let bytes = serde_json::to_vec(&v).unwrap();
        assert!(open(&bytes).is_none());
        assert_eq!(decode::<AgentManifest>(&bytes).unwrap(), m);
    }

    #[test]
    fn a_broken_envelope_is_malformed() {
        let bytes = br#"{"apiVersion":"fleetlet.dev/v1alpha1","kind":"SignedAgentManifest","manifest":"{"}"#;
        assert!(matches!(open(bytes), Some(Err(_))));
        assert_eq!(
            decode::<AgentManifest>(bytes).unwrap_err().reason(),
            "Malformed"
        );
    }
}
