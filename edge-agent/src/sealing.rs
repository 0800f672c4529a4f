//! The device's own key for Secret contents: an X25519 key pair whose private half lives in
//! the state directory (`sealing.key`, mode 0600) and never leaves the device. The public
//! half goes out with every heartbeat; the controller seals a Pod's Secret to it (a sealed
//! box), so the desired-state bucket, its backups and anyone on the way see only ciphertext.
//! A device whose state directory is lost makes a new key, and the controller seals anew.

use std::{path::Path, sync::Arc};

use base64::Engine;
use crypto_box::SecretKey;

const FILE: &str = "sealing.key";
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Why sealed content could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SealingError {
    #[error("sealing key {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("sealing key {0} is not 32 bytes")]
    Corrupt(String),
    #[error("sealed content is not base64: {0}")]
    Base64(String),
    #[error(
        "sealed content does not open with this device's key (sealed to another key, or altered)"
    )]
    Open,
}

/// The device's sealing key.
pub struct SealingKey {
    secret: SecretKey,
}

impl std::fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealingKey")
            .field("public", &self.public_base64())
            .finish_non_exhaustive()
    }
}

impl SealingKey {
    /// The key in `state_dir`, made (and stored) on first use.
    pub fn load_or_create(state_dir: &Path) -> Result<Arc<Self>, SealingError> {
        let path = state_dir.join(FILE);
        let io = |source| SealingError::Io {
            path: path.display().to_string(),
            source,
        };
        match std::fs::read(&path) {
            Ok(bytes) => {
                let raw: [u8; 32] = bytes
                    .try_into()
                    .map_err(|_| SealingError::Corrupt(path.display().to_string()))?;
                Ok(Arc::new(Self {
                    secret: SecretKey::from(raw),
                }))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let secret = SecretKey::generate(&mut crypto_box::aead::OsRng);
                std::fs::create_dir_all(state_dir).map_err(io)?;
                crate::fsutil::write_atomic(&path, &secret.to_bytes(), 0o600, Default::default())
                    .map_err(io)?;
                Ok(Arc::new(Self { secret }))
            }
            Err(e) => Err(io(e)),
        }
    }

    /// The public half, as heartbeats carry it.
    pub fn public_base64(&self) -> String {
        B64.encode(self.secret.public_key().as_bytes())
    }

    /// Opens content the controller sealed to this device.
    pub fn open(&self, sealed: &str) -> Result<Vec<u8>, SealingError> {
        let bytes = B64
            .decode(sealed.trim())
            .map_err(|e| SealingError::Base64(e.to_string()))?;
        self.secret.unseal(&bytes).map_err(|_| SealingError::Open)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_key_is_made_once_kept_private_and_opens_what_was_sealed_to_it() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = SealingKey::load_or_create(dir.path()).unwrap();
        let again = SealingKey::load_or_create(dir.path()).unwrap();
        assert_eq!(key.public_base64(), again.public_base64());
        let mode = std::fs::metadata(dir.path().join(FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let public: [u8; 32] = B64.decode(key.public_base64()).unwrap().try_into().unwrap();
        let sealed = crypto_box::PublicKey::from(public)
            .seal(&mut crypto_box::aead::OsRng, b"s3cret")
            .unwrap();
        assert_eq!(again.open(&B64.encode(&sealed)).unwrap(), b"s3cret");
        // Another device's key does not open it.
        let other = tempfile::tempdir().unwrap();
        let stranger = SealingKey::load_or_create(other.path()).unwrap();
        assert!(matches!(
            stranger.open(&B64.encode(&sealed)),
            Err(SealingError::Open)
        ));
        assert!(matches!(key.open("%%%"), Err(SealingError::Base64(_))));
    }
}
