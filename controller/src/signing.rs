//! Signs each AgentManifest with ed25519 (see `fleetlet_protocol::signing` for the wire
//! format). The key is a PKCS#8 file, PEM or DER, as written by
//! `fleetlet-controller signing-key` or `openssl genpkey -algorithm ed25519`.

use std::path::Path;

use base64::Engine;
use fleetlet_protocol::{AgentManifest, encode, signing::SignedManifest};
use ring::{
    rand::SystemRandom,
    signature::{Ed25519KeyPair, KeyPair},
};

use crate::Error;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The controller's manifest signing key and the id agents know it by.
pub struct Signer {
    key: Ed25519KeyPair,
    pub id: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").field("id", &self.id).finish()
    }
}

fn config(message: String) -> Error {
    Error::Config(message)
}

impl Signer {
    /// Reads a PKCS#8 ed25519 key (PEM `PRIVATE KEY` or DER). `id` defaults to one derived
    /// from the public key.
    pub fn from_file(path: &Path, id: Option<String>) -> Result<Self, Error> {
        let raw = std::fs::read(path)
            .map_err(|e| config(format!("reading signing key {}: {e}", path.display())))?;
        let der = match std::str::from_utf8(&raw) {
            Ok(text) if text.contains("-----BEGIN") => {
                let body: String = text
                    .lines()
                    .filter(|l| !l.starts_with("-----"))
                    .map(str::trim)
                    .collect();
                B64.decode(body)
                    .map_err(|e| config(format!("{}: not PEM: {e}", path.display())))?
            }
            _ => raw,
        };
        let key = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der).map_err(|e| {
            config(format!(
                "{}: not a PKCS#8 ed25519 private key: {e}",
                path.display()
            ))
        })?;
        let id = id.unwrap_or_else(|| default_id(key.public_key().as_ref()));
        Ok(Self { key, id })
    }

    /// Writes a new key to `path` (PEM, mode 0600) and returns it.
    pub fn generate(path: &Path, id: Option<String>) -> Result<Self, Error> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|e| config(format!("generating a key: {e}")))?;
        let b64 = B64.encode(pkcs8.as_ref());
        let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            pem.push_str(&String::from_utf8_lossy(chunk));
            pem.push('\n');
        }
        pem.push_str("-----END PRIVATE KEY-----\n");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| config(format!("creating {}: {e}", path.display())))?;
        f.write_all(pem.as_bytes())
            .map_err(|e| config(format!("writing {}: {e}", path.display())))?;
        Self::from_file(path, id)
    }

    /// The public key as agents list it in `[trust] manifest_keys`.
    pub fn public_key_base64(&self) -> String {
        B64.encode(self.key.public_key().as_ref())
    }

    /// `m` with this key's id, encoded, signed and sealed in its envelope.
    pub fn seal(&self, m: &AgentManifest) -> Result<Vec<u8>, Error> {
        let mut m = m.clone();
        m.signing_key = Some(self.id.clone());
        let bytes = encode(&m).map_err(|e| Error::Encode(e.to_string()))?;
        let text = String::from_utf8(bytes).map_err(|e| Error::Encode(e.to_string()))?;
        let signature = B64.encode(self.key.sign(text.as_bytes()));
        serde_json::to_vec(&SignedManifest::new(text, signature))
            .map_err(|e| Error::Encode(e.to_string()))
    }
}

/// `ed25519-` and the first 12 hex digits of the public key.
fn default_id(public: &[u8]) -> String {
    let hex: String = public.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("ed25519-{hex}")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use fleetlet_protocol::{DeviceId, decode, signing};
    use ring::signature::{ED25519, UnparsedPublicKey};

    use super::*;

    #[test]
    fn a_generated_key_signs_what_agents_verify() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        let s = Signer::generate(&path, None).unwrap();
        assert!(s.id.starts_with("ed25519-"));
        let again = Signer::from_file(&path, None).unwrap();
        assert_eq!(again.public_key_base64(), s.public_key_base64());
        assert!(
            Signer::generate(&path, None).is_err(),
            "never overwrites a key"
        );

        let m = AgentManifest::new(DeviceId::new("pi-1").unwrap(), 4);
        let bytes = s.seal(&m).unwrap();
        let decoded = decode::<AgentManifest>(&bytes).unwrap();
        assert_eq!(decoded.signing_key.as_deref(), Some(s.id.as_str()));
        let sealed = signing::open(&bytes).unwrap().unwrap();
        let public = B64.decode(s.public_key_base64()).unwrap();
        UnparsedPublicKey::new(&ED25519, public)
            .verify(
                sealed.manifest.as_bytes(),
                &B64.decode(sealed.signature).unwrap(),
            )
            .unwrap();
    }
}
