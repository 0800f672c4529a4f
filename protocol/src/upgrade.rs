//! AgentUpgrade: which agent version a device runs, and where it gets the binary.
//!
//! Every binary is signed with a key the device already trusts for manifests
//! (`[trust] manifest_keys`). The signature covers [`binary_statement`]: the version, the
//! architecture and the SHA-256 of the binary, under a domain string of their own, so a
//! manifest signature can never pass for a binary's and the reverse.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::manifest::{FetchSource, SpecError, invalid};

/// Shortest and longest wait for a new version to reconnect and report (`healthSeconds`).
pub const HEALTH_SECONDS: std::ops::RangeInclusive<u32> = 10..=3600;

/// The agent version the device should run. When it runs another, it downloads the binary
/// for its architecture, checks its signature and checksum, swaps it in (keeping the
/// previous one) and restarts through systemd; a new version that does not reconnect and
/// report within `healthSeconds`, or does not start, is replaced by the previous one and
/// the upgrade reported Failed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentUpgradeSpec {
    /// The version, as `fleetlet-agent --version` prints it (e.g. `0.2.0`).
    #[schemars(
        length(min = 1, max = 64),
        regex(pattern = r"^[0-9A-Za-z][0-9A-Za-z.+_-]*$")
    )]
    pub version: String,
    /// One signed binary per CPU architecture (`x86_64`, `aarch64`, `arm`).
    #[schemars(length(min = 1, max = 8))]
    pub binaries: Vec<AgentBinary>,
    /// Seconds the new version has to reconnect and report before the previous one is put
    /// back (default 120).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 3600))]
    pub health_seconds: Option<u32>,
}

/// The agent binary for one architecture.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentBinary {
    /// `x86_64`, `aarch64` or `arm` (Rust's `std::env::consts::ARCH`).
    pub arch: String,
    /// Where to download it, its SHA-256 and size.
    pub fetch: FetchSource,
    /// The id of the trusted key that signed it (as in `[trust] manifest_keys`).
    pub key_id: String,
    /// Base64 ed25519 signature of `fleetlet-agent-binary/v1\n<version>\n<arch>\n<sha256>\n`.
    pub signature: String,
}

/// The bytes a binary's signature covers.
pub fn binary_statement(version: &str, arch: &str, sha256: &str) -> Vec<u8> {
    format!("fleetlet-agent-binary/v1\n{version}\n{arch}\n{sha256}\n").into_bytes()
}

/// Architectures an agent is built for.
pub const ARCHES: [&str; 3] = ["x86_64", "aarch64", "arm"];

impl AgentUpgradeSpec {
    pub fn validate(&self) -> Result<(), SpecError> {
        let v = &self.version;
        let ok = (1..=64).contains(&v.len())
            && v.starts_with(|c: char| c.is_ascii_alphanumeric())
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || ".+_-".contains(c));
        if !ok {
            return Err(invalid(
                "agentUpgrade.version",
                format!("{v:?} is not a version (letters, digits and '.+_-', up to 64)"),
            ));
        }
        if self.binaries.is_empty() || self.binaries.len() > ARCHES.len() {
            return Err(invalid(
                "agentUpgrade.binaries",
                format!("one binary per architecture, 1 to {}", ARCHES.len()),
            ));
        }
        let mut seen = Vec::new();
        for (i, b) in self.binaries.iter().enumerate() {
            let field = format!("agentUpgrade.binaries[{i}]");
            if !ARCHES.contains(&b.arch.as_str()) {
                return Err(invalid(
                    format!("{field}.arch"),
                    format!("{:?} is not one of {}", b.arch, ARCHES.join(", ")),
                ));
            }
            if seen.contains(&b.arch.as_str()) {
                return Err(invalid(
                    format!("{field}.arch"),
                    format!("{} is listed twice", b.arch),
                ));
            }
            seen.push(b.arch.as_str());
            b.fetch.validate().map_err(|e| match e {
                SpecError::Invalid { field: f, message } => invalid(
                    format!("{field}.{}", f.replace("file.content.", "")),
                    message,
                ),
            })?;
            if b.key_id.is_empty() || b.signature.is_empty() {
                return Err(invalid(
                    format!("{field}.signature"),
                    "every binary is signed: keyId and signature are required",
                ));
            }
        }
        if let Some(s) = self.health_seconds
            && !HEALTH_SECONDS.contains(&s)
        {
            return Err(invalid(
                "agentUpgrade.healthSeconds",
                format!(
                    "{s} is outside {} to {}",
                    HEALTH_SECONDS.start(),
                    HEALTH_SECONDS.end()
                ),
            ));
        }
        Ok(())
    }

    /// The binary for `arch`, if the spec has one.
    pub fn binary_for(&self, arch: &str) -> Option<&AgentBinary> {
        self.binaries.iter().find(|b| b.arch == arch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> AgentUpgradeSpec {
        AgentUpgradeSpec {
            version: "0.2.0".into(),
            binaries: vec![AgentBinary {
                arch: "aarch64".into(),
                fetch: FetchSource {
                    url: "https://releases.example.net/fleetlet-agent".into(),
                    sha256: "ab".repeat(32),
                    size: 9_000_000,
                },
                key_id: "ed25519-1".into(),
                signature: "c2ln".into(),
            }],
            health_seconds: None,
        }
    }

    #[test]
    fn checks_version_arch_fetch_and_signature() {
        spec().validate().unwrap();
        let field = |s: AgentUpgradeSpec| match s.validate() {
            Err(SpecError::Invalid { field, .. }) => field,
            Ok(()) => panic!("accepted"),
        };
        let mut s = spec();
        s.version = "0.2.0\n".into();
        assert_eq!(field(s), "agentUpgrade.version");
        let mut s = spec();
        s.binaries[0].arch = "riscv64".into();
        assert_eq!(field(s), "agentUpgrade.binaries[0].arch");
        let mut s = spec();
        s.binaries.push(s.binaries[0].clone());
        assert_eq!(field(s), "agentUpgrade.binaries[1].arch");
        let mut s = spec();
        s.binaries[0].fetch.url = "http://plain".into();
        assert!(field(s).starts_with("agentUpgrade.binaries[0]."));
        let mut s = spec();
        s.binaries[0].signature.clear();
        assert_eq!(field(s), "agentUpgrade.binaries[0].signature");
        let mut s = spec();
        s.health_seconds = Some(1);
        assert_eq!(field(s), "agentUpgrade.healthSeconds");
        assert_eq!(spec().binary_for("aarch64").unwrap().arch, "aarch64");
        assert!(spec().binary_for("x86_64").is_none());
    }

    #[test]
    fn the_statement_names_version_arch_and_digest() {
        assert_eq!(
            binary_statement("1", "arm", "ff"),
            b"fleetlet-agent-binary/v1\n1\narm\nff\n"
        );
    }
}
