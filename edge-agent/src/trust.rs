//! Manifest signatures: the agent accepts only manifests the control plane signed with one
//! of its trusted keys (`[trust] manifest_keys`), unless its owner lists none and opts out
//! (`[trust] allow_unsigned`). A refused manifest leaves the previous one in force, with the
//! reason in `status.lastRejection`.

use std::collections::BTreeMap;

use base64::Engine;
use fleetlet_protocol::{AgentManifest, signing};
use ring::signature::{ED25519, UnparsedPublicKey};

/// `Err((reason, message))`: `Unsigned`, `UnknownSigningKey` or `BadSignature`. With no
/// key listed, `allow_unsigned` says whether to accept manifests (they cannot be checked).
pub fn verify(
    keys: &BTreeMap<String, Vec<u8>>,
    allow_unsigned: bool,
    bytes: &[u8],
    manifest: &AgentManifest,
) -> Result<(), (&'static str, String)> {
    if keys.is_empty() {
        if allow_unsigned {
            return Ok(());
        }
        return Err((
            "Unsigned",
            "this device accepts only signed manifests and trusts no signing key: add the \
             control plane's key to [trust] manifest_keys (the device's enrolment Secret has \
             it), or set [trust] allow_unsigned = true"
                .to_string(),
        ));
    }
    let trusted = || keys.keys().cloned().collect::<Vec<_>>().join(", ");
    let sealed = match signing::open(bytes) {
        Some(Ok(s)) => s,
        Some(Err(e)) => return Err(("Malformed", format!("signed manifest envelope: {e}"))),
        None => {
            return Err((
                "Unsigned",
                format!(
                    "the manifest is not signed; this device accepts only manifests signed by: {}",
                    trusted()
                ),
            ));
        }
    };
    let key_id = manifest.signing_key.as_deref().ok_or_else(|| {
        (
            "Unsigned",
            "the signed manifest names no signing key".to_string(),
        )
    })?;
    let key = keys.get(key_id).ok_or_else(|| {
        (
            "UnknownSigningKey",
            format!(
                "signed with key {key_id:?}, which this device does not trust (trusted: {})",
                trusted()
            ),
        )
    })?;
    let signature = base64::engine::general_purpose::STANDARD
        .decode(sealed.signature.as_bytes())
        .map_err(|e| ("BadSignature", format!("signature is not base64: {e}")))?;
    UnparsedPublicKey::new(&ED25519, key)
        .verify(sealed.manifest.as_bytes(), &signature)
        .map_err(|_| {
            (
                "BadSignature",
                format!("the signature does not match the manifest for key {key_id:?}"),
            )
        })
}

/// The generation in a signed freshness floor, once it is signed by a trusted key, for this
/// device and this request's nonce.
pub fn verify_floor(
    keys: &BTreeMap<String, Vec<u8>>,
    bytes: &[u8],
    device: &fleetlet_protocol::DeviceId,
    nonce: &str,
) -> Result<u64, String> {
    let sealed: signing::SignedFloor =
        serde_json::from_slice(bytes).map_err(|e| format!("not a signed floor: {e}"))?;
    if sealed.kind != signing::FLOOR_KIND {
        return Err(format!("not a signed floor but {:?}", sealed.kind));
    }
    let floor: signing::Floor =
        serde_json::from_str(&sealed.floor).map_err(|e| format!("floor: {e}"))?;
    let key = keys.get(&floor.signing_key).ok_or_else(|| {
        format!(
            "signed with key {:?}, which this device does not trust",
            floor.signing_key
        )
    })?;
    let signature = base64::engine::general_purpose::STANDARD
        .decode(sealed.signature.as_bytes())
        .map_err(|e| format!("signature is not base64: {e}"))?;
    UnparsedPublicKey::new(&ED25519, key)
        .verify(sealed.floor.as_bytes(), &signature)
        .map_err(|_| "the signature does not match the floor".to_string())?;
    if &floor.device != device || floor.nonce != nonce {
        return Err("the floor is for another device or another request".into());
    }
    Ok(floor.generation)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use fleetlet_protocol::{DeviceId, decode, encode, signing::SignedManifest};
    use ring::{
        rand::SystemRandom,
        signature::{Ed25519KeyPair, KeyPair},
    };

    use super::*;

    fn key() -> Ed25519KeyPair {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
    }

    fn sealed(k: &Ed25519KeyPair, id: &str, generation: u64) -> (Vec<u8>, AgentManifest) {
        let mut m = AgentManifest::new(DeviceId::new("pi-1").unwrap(), generation);
        m.signing_key = Some(id.into());
        let text = String::from_utf8(encode(&m).unwrap()).unwrap();
        let sig = base64::engine::general_purpose::STANDARD.encode(k.sign(text.as_bytes()));
        (
            serde_json::to_vec(&SignedManifest::new(text, sig)).unwrap(),
            m,
        )
    }

    #[test]
    fn only_manifests_signed_by_a_trusted_key_pass() {
        let (k1, k2, stranger) = (key(), key(), key());
        let keys: BTreeMap<String, Vec<u8>> = [
            ("k1".to_string(), k1.public_key().as_ref().to_vec()),
            ("k2".to_string(), k2.public_key().as_ref().to_vec()),
        ]
        .into();
        for (k, id) in [(&k1, "k1"), (&k2, "k2")] {
            let (bytes, m) = sealed(k, id, 1);
            assert_eq!(decode::<AgentManifest>(&bytes).unwrap(), m);
            assert_eq!(verify(&keys, false, &bytes, &m), Ok(()));
        }
        let (bytes, m) = sealed(&stranger, "k1", 1);
        assert_eq!(
            verify(&keys, false, &bytes, &m).unwrap_err().0,
            "BadSignature"
        );
        let (bytes, m) = sealed(&stranger, "k9", 1);
        assert_eq!(
            verify(&keys, false, &bytes, &m).unwrap_err().0,
            "UnknownSigningKey"
        );
        let plain = AgentManifest::new(DeviceId::new("pi-1").unwrap(), 1);
        let bytes = encode(&plain).unwrap();
        assert_eq!(
            verify(&keys, false, &bytes, &plain).unwrap_err().0,
            "Unsigned"
        );
        // No key: refused unless the owner opted out.
        assert_eq!(
            verify(&BTreeMap::new(), false, &bytes, &plain)
                .unwrap_err()
                .0,
            "Unsigned"
        );
        assert_eq!(verify(&BTreeMap::new(), true, &bytes, &plain), Ok(()));
    }

    #[test]
    fn a_tampered_manifest_fails() {
        let k1 = key();
        let keys: BTreeMap<String, Vec<u8>> =
            [("k1".to_string(), k1.public_key().as_ref().to_vec())].into();
        let (bytes, _) = sealed(&k1, "k1", 1);
        let mut env: SignedManifest = serde_json::from_slice(&bytes).unwrap();
        env.manifest = env.manifest.replace("\"generation\":1", "\"generation\":2");
        let bytes = serde_json::to_vec(&env).unwrap();
        let m = decode::<AgentManifest>(&bytes).unwrap();
        assert_eq!(m.generation, 2);
        assert_eq!(
            verify(&keys, false, &bytes, &m).unwrap_err().0,
            "BadSignature"
        );
    }
}
