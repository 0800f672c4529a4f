//! Sealing a Pod's Secret contents to its device: a sealed box (X25519 + XSalsa20-Poly1305,
//! libsodium's `crypto_box_seal`) to the public key the device stores with its facts.
//! Only that device can open it; the desired-state bucket, its backups, and every identity
//! on NATS other than the device see ciphertext.
//!
//! A sealed box is normally random, and a new one on every pass would make every pass a new
//! manifest. So the box's ephemeral key comes from a generator seeded with a keyed hash of
//! (device key, plaintext): the same Secret sealed to the same device gives the same bytes,
//! on every pass, replica and restart that share the hash key (derived from the manifest
//! signing key). What that reveals is only whether a value sent to one device changed.

use base64::Engine;
use crypto_box::PublicKey;
use rand_chacha::{ChaCha20Rng, rand_core::SeedableRng};
use ring::hmac;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Why bytes could not be sealed to a device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("the device's sealing key is not the base64 of 32 bytes")]
    BadKey,
    #[error("sealing failed")]
    Seal,
}

/// Seals to devices' keys, deterministically for one hash key.
pub struct Sealer {
    key: hmac::Key,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer").finish_non_exhaustive()
    }
}

impl Sealer {
    /// A sealer whose boxes repeat for everyone holding `secret` (the signing key's bytes).
    pub fn from_secret(secret: &[u8]) -> Self {
        let derived = ring::digest::digest(
            &ring::digest::SHA256,
            &[b"fleetlet sealing v1\0".as_slice(), secret].concat(),
        );
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref()),
        }
    }

    /// A sealer with a key of its own: boxes repeat within this process only (a controller
    /// without a signing key re-seals once after a restart).
    pub fn random() -> Result<Self, SealError> {
        let mut secret = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
            .map_err(|_| SealError::Seal)?;
        Ok(Self::from_secret(&secret))
    }

    /// `plaintext` sealed to the device whose public key (standard base64) is `device_key`,
    /// as standard base64.
    pub fn seal(&self, device_key: &str, plaintext: &[u8]) -> Result<String, SealError> {
        let raw: [u8; 32] = B64
            .decode(device_key.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or(SealError::BadKey)?;
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(&raw);
        ctx.update(&(plaintext.len() as u64).to_be_bytes());
        ctx.update(plaintext);
        let tag = ctx.sign();
        let seed: [u8; 32] = tag.as_ref()[..32].try_into().map_err(|_| SealError::Seal)?;
        let mut rng = ChaCha20Rng::from_seed(seed);
        let sealed = PublicKey::from(raw)
            .seal(&mut rng, plaintext)
            .map_err(|_| SealError::Seal)?;
        Ok(B64.encode(sealed))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crypto_box::SecretKey;

    #[test]
    fn sealed_boxes_open_with_the_device_key_only_and_repeat_for_the_same_input() {
        let device = SecretKey::generate(&mut crypto_box::aead::OsRng);
        let public = B64.encode(device.public_key().as_bytes());
        let s = Sealer::from_secret(b"signing key bytes");
        let a = s.seal(&public, b"hunter2").unwrap();
        assert_eq!(a, s.seal(&public, b"hunter2").unwrap(), "deterministic");
        assert_eq!(
            a,
            Sealer::from_secret(b"signing key bytes")
                .seal(&public, b"hunter2")
                .unwrap(),
            "the same for another replica with the same key"
        );
        assert_ne!(a, s.seal(&public, b"hunter3").unwrap());
        assert!(!a.contains("hunter2"));
        let opened = device.unseal(&B64.decode(&a).unwrap()).unwrap();
        assert_eq!(opened, b"hunter2");
        let other = SecretKey::generate(&mut crypto_box::aead::OsRng);
        assert!(other.unseal(&B64.decode(&a).unwrap()).is_err());
        assert_eq!(s.seal("not a key", b"x"), Err(SealError::BadKey));
        let other_public = B64.encode(other.public_key().as_bytes());
        assert_ne!(a, s.seal(&other_public, b"hunter2").unwrap());
    }
}
