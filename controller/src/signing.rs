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

/// Keys of the signing key's Secret ([`Signer::from_secret`]).
pub const SECRET_KEY: &str = "key.pem";
pub const SECRET_KEY_ID: &str = "key-id";
pub const SECRET_PUBLIC_KEY: &str = "public-key";

/// The controller's manifest signing key and the id agents know it by.
pub struct Signer {
    key: Ed25519KeyPair,
    pub id: String,
    /// A digest of the private key: what replicas sharing the key derive shared secrets
    /// from (see [`crate::sealing::Sealer`]).
    secret_digest: [u8; 32],
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
        Self::from_bytes(&raw, id, &path.display().to_string())
    }

    /// A key from PKCS#8 bytes (PEM or DER); `what` names where they came from in errors.
    pub fn from_bytes(raw: &[u8], id: Option<String>, what: &str) -> Result<Self, Error> {
        let der = match std::str::from_utf8(raw) {
            Ok(text) if text.contains("-----BEGIN") => {
                let body: String = text
                    .lines()
                    .filter(|l| !l.starts_with("-----"))
                    .map(str::trim)
                    .collect();
                B64.decode(body)
                    .map_err(|e| config(format!("{what}: not PEM: {e}")))?
            }
            _ => raw.to_vec(),
        };
        let key = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
            .map_err(|e| config(format!("{what}: not a PKCS#8 ed25519 private key: {e}")))?;
        let id = id.unwrap_or_else(|| default_id(key.public_key().as_ref()));
        let mut secret_digest = [0u8; 32];
        secret_digest.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, &der).as_ref());
        Ok(Self {
            key,
            id,
            secret_digest,
        })
    }

    /// A new key and its PKCS#8 PEM text.
    pub fn new_pem() -> Result<String, Error> {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|e| config(format!("generating a key: {e}")))?;
        let b64 = B64.encode(pkcs8.as_ref());
        let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            pem.push_str(&String::from_utf8_lossy(chunk));
            pem.push('\n');
        }
        pem.push_str("-----END PRIVATE KEY-----\n");
        Ok(pem)
    }

    /// The key kept in Secret `name` of `namespace` (`key.pem`, and `key-id`), created with
    /// a new key the first time: what the Helm chart uses, so a signing key exists without
    /// a step by hand and survives reinstalls and GitOps re-renders. The public half is in
    /// the Secret too (`public-key`) and in every device's enrolment Secret.
    pub async fn from_secret(
        client: &kube::Client,
        namespace: &str,
        name: &str,
    ) -> Result<Self, Error> {
        use k8s_openapi::{ByteString, api::core::v1::Secret};
        use kube::api::{Api, ObjectMeta, PostParams};
        let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
        for _ in 0..3 {
            if let Some(secret) = api.get_opt(name).await? {
                let data = secret.data.unwrap_or_default();
                let key = data.get(SECRET_KEY).ok_or_else(|| {
                    config(format!("Secret {namespace}/{name} has no {SECRET_KEY}"))
                })?;
                let id = data
                    .get(SECRET_KEY_ID)
                    .map(|b| String::from_utf8_lossy(&b.0).trim().to_owned())
                    .filter(|s| !s.is_empty());
                return Self::from_bytes(&key.0, id, &format!("Secret {namespace}/{name}"));
            }
            let pem = Self::new_pem()?;
            let signer = Self::from_bytes(pem.as_bytes(), None, "a new key")?;
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    namespace: Some(namespace.into()),
                    labels: Some(
                        [(
                            crate::identity::MANAGED_BY_LABEL.to_owned(),
                            "fleetlet-controller".to_owned(),
                        )]
                        .into(),
                    ),
                    ..Default::default()
                },
                data: Some(
                    [
                        (SECRET_KEY.to_owned(), ByteString(pem.into_bytes())),
                        (
                            SECRET_KEY_ID.to_owned(),
                            ByteString(signer.id.clone().into_bytes()),
                        ),
                        (
                            SECRET_PUBLIC_KEY.to_owned(),
                            ByteString(signer.public_key_base64().into_bytes()),
                        ),
                    ]
                    .into(),
                ),
                type_: Some("Opaque".into()),
                ..Default::default()
            };
            match api.create(&PostParams::default(), &secret).await {
                Ok(_) => {
                    tracing::info!(secret = name, key = %signer.id, "created the manifest signing key");
                    return Ok(signer);
                }
                // Another replica made it first: read theirs.
                Err(kube::Error::Api(e)) if e.code == 409 => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(config(format!(
            "Secret {namespace}/{name}: could neither read nor create it"
        )))
    }

    /// The sealer every replica with this key shares.
    pub fn sealer(&self) -> crate::sealing::Sealer {
        crate::sealing::Sealer::from_secret(&self.secret_digest)
    }

    /// Standard base64 of the signature of `bytes`.
    pub fn sign_base64(&self, bytes: &[u8]) -> String {
        B64.encode(self.key.sign(bytes))
    }

    /// Writes a new key to `path` (PEM, mode 0600) and returns it.
    pub fn generate(path: &Path, id: Option<String>) -> Result<Self, Error> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let pem = Self::new_pem()?;
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

/// Answers devices that ask for their freshness floor (a device that lost its state): the
/// newest generation issued to the device (`floor_of`; `None` while the caches are not
/// synced, and then no answer), signed, with the request's nonce. Every replica answers
/// from its own view (one per request, as a queue group); a replica that is behind gives a
/// lower floor, never a higher one.
pub async fn serve_floors(
    nats: async_nats::Client,
    signer: std::sync::Arc<Signer>,
    floor_of: impl Fn(&fleetlet_protocol::DeviceId) -> Option<u64> + Send + Sync + 'static,
) {
    use fleetlet_protocol::{
        DeviceId,
        signing::{FLOOR_KIND, Floor, FloorRequest, SignedFloor, valid_nonce},
    };
    use futures::StreamExt;
    let wildcard = fleetlet_protocol::access::FLOOR_WILDCARD.to_owned();
    loop {
        let mut requests = match nats
            .queue_subscribe(wildcard.clone(), "fleetlet-controller".into())
            .await
        {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "subscribing to freshness floor requests; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                continue;
            }
        };
        while let Some(m) = requests.next().await {
            let Some(reply) = m.reply.clone() else {
                continue;
            };
            let device = m
                .subject
                .rsplit('.')
                .next()
                .and_then(|d| DeviceId::new(d).ok());
            let request = serde_json::from_slice::<FloorRequest>(&m.payload)
                .ok()
                .filter(|r| valid_nonce(&r.nonce));
            let (Some(device), Some(request)) = (device, request) else {
                tracing::debug!(subject = %m.subject, "a malformed floor request; ignored");
                continue;
            };
            let Some(generation) = floor_of(&device) else {
                continue;
            };
            let floor = Floor {
                api_version: fleetlet_protocol::API_VERSION.to_owned(),
                generation,
                device,
                nonce: request.nonce,
                signing_key: signer.id.clone(),
            };
            let Ok(text) = serde_json::to_string(&floor) else {
                continue;
            };
            let signed = SignedFloor {
                api_version: fleetlet_protocol::API_VERSION.to_owned(),
                kind: FLOOR_KIND.to_owned(),
                signature: signer.sign_base64(text.as_bytes()),
                floor: text,
            };
            if let Ok(body) = serde_json::to_vec(&signed) {
                let _ = nats.publish(reply, body.into()).await;
            }
        }
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
