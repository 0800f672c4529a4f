//! Device identities on NATS: an operator, a system account and one fleet account (NATS
//! decentralized auth). The controller holds the keys (the "authority"), issues each device
//! a user JWT whose permissions are [`fleetlet_protocol::permissions::device`], stores the
//! credentials in a Secret next to the EdgeDevice, and revokes a device's key, by pushing a
//! new account JWT to the server, when the EdgeDevice is deleted or marked revoked. The
//! server then closes the device's connections and refuses its credentials.
//!
//! Which keys were issued and which are revoked is kept in a ConfigMap in the controller's
//! namespace, so a device deleted while the controller was down is still revoked when it
//! comes back.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use data_encoding::{BASE32_NOPAD, BASE64URL_NOPAD};
use fleetlet_crds::{DeviceCredentials, EdgeDevice};
use fleetlet_protocol::{DeviceId, permissions::Permissions};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams},
};
use nkeys::KeyPair;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tracing::{info, warn};

/// Name of the ConfigMap recording issued and revoked device keys.
pub const IDENTITIES_CONFIG_MAP: &str = "fleetlet-nats-identities";
/// Key of the `.creds` file in a device's credentials Secret.
pub const CREDS_KEY: &str = "nats.creds";
/// Key of the agent configuration fragment in a device's credentials Secret.
pub const AGENT_CONFIG_KEY: &str = "agent.toml";
/// Where the agent configuration fragment expects the `.creds` file.
pub const DEVICE_CREDS_PATH: &str = "/etc/fleetlet/nats.creds";
const REVOKED_PREFIX: &str = "revoked.";
const MANAGED_BY: &str = "fleetlet-controller";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("reading the NATS authority {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the NATS authority {path} is not valid: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("signing a NATS JWT: {0}")]
    Sign(String),
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    #[error("pushing the account JWT to NATS: {0}")]
    Push(String),
}

/// The seeds of the operator, the system account, the fleet account and the fleet
/// account's signing key. Secret: whoever has it can mint any identity.
#[derive(Serialize, Deserialize)]
struct AuthorityFile {
    operator: String,
    system_account: String,
    account: String,
    account_signing: String,
}

/// The keys that sign fleetlet's NATS identities.
pub struct Authority {
    operator: KeyPair,
    system: KeyPair,
    account: KeyPair,
    signing: KeyPair,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("operator", &self.operator.public_key())
            .field("account", &self.account.public_key())
            .finish_non_exhaustive()
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// Signs `claims` (with `iss`, `iat` and `jti` filled in) as a NATS JWT.
fn encode_jwt(issuer: &KeyPair, mut claims: Value) -> Result<String, IdentityError> {
    claims["iss"] = json!(issuer.public_key());
    claims["iat"] = json!(now());
    claims["jti"] = json!("");
    // The id is the hash of the claims without it, as NATS tools compute it.
    let body = serde_json::to_vec(&claims).map_err(|e| IdentityError::Sign(e.to_string()))?;
    let hash = ring::digest::digest(&ring::digest::SHA512_256, &body);
    claims["jti"] = json!(BASE32_NOPAD.encode(hash.as_ref()));
    let header = BASE64URL_NOPAD.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let body = serde_json::to_vec(&claims).map_err(|e| IdentityError::Sign(e.to_string()))?;
    let signing_input = format!("{header}.{}", BASE64URL_NOPAD.encode(&body));
    let signature = issuer
        .sign(signing_input.as_bytes())
        .map_err(|e| IdentityError::Sign(e.to_string()))?;
    Ok(format!(
        "{signing_input}.{}",
        BASE64URL_NOPAD.encode(&signature)
    ))
}

/// Reads the claims of a NATS JWT without checking its signature (for tests and tools).
pub fn decode_claims(jwt: &str) -> Option<Value> {
    let body = jwt.split('.').nth(1)?;
    serde_json::from_slice(&BASE64URL_NOPAD.decode(body.as_bytes()).ok()?).ok()
}

/// Limits meaning "no limit" for an account.
fn unlimited_account(jetstream: bool) -> Value {
    let mut limits = json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1,
    });
    if jetstream {
        for k in ["mem_storage", "disk_storage", "streams", "consumer"] {
            limits[k] = json!(-1);
        }
    }
    limits
}

/// The `.creds` file text for a user JWT and its seed.
fn creds_file(jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n"
    )
}

/// A user's credentials: its public key and its `.creds` file.
#[derive(Debug, Clone)]
pub struct UserCredentials {
    pub public_key: String,
    pub creds: String,
}

impl Authority {
    /// New random keys.
    pub fn generate() -> Self {
        Self {
            operator: KeyPair::new_operator(),
            system: KeyPair::new_account(),
            account: KeyPair::new_account(),
            signing: KeyPair::new_account(),
        }
    }

    pub fn from_file(path: &Path) -> Result<Self, IdentityError> {
        let text = std::fs::read_to_string(path).map_err(|source| IdentityError::Read {
            path: path.into(),
            source,
        })?;
        let invalid = |reason: String| IdentityError::Invalid {
            path: path.into(),
            reason,
        };
        let f: AuthorityFile = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        let key = |name: &str, seed: &str, want: char| {
            let kp = KeyPair::from_seed(seed).map_err(|e| invalid(format!("{name}: {e}")))?;
            if !kp.public_key().starts_with(want) {
                return Err(invalid(format!("{name} is not the right kind of key")));
            }
            Ok(kp)
        };
        Ok(Self {
            operator: key("operator", &f.operator, 'O')?,
            system: key("system_account", &f.system_account, 'A')?,
            account: key("account", &f.account, 'A')?,
            signing: key("account_signing", &f.account_signing, 'A')?,
        })
    }

    /// Writes the seeds to a new file readable by its owner only.
    pub fn write(&self, path: &Path) -> Result<(), IdentityError> {
        use std::{io::Write, os::unix::fs::OpenOptionsExt};
        let seed = |k: &KeyPair| k.seed().map_err(|e| IdentityError::Sign(e.to_string()));
        let f = AuthorityFile {
            operator: seed(&self.operator)?,
            system_account: seed(&self.system)?,
            account: seed(&self.account)?,
            account_signing: seed(&self.signing)?,
        };
        let text =
            serde_json::to_string_pretty(&f).map_err(|e| IdentityError::Sign(e.to_string()))?;
        let write_err = |source| IdentityError::Write {
            path: path.into(),
            source,
        };
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .and_then(|mut file| file.write_all(text.as_bytes()))
            .map_err(write_err)
    }

    /// The fleet account's public key.
    pub fn account_public_key(&self) -> String {
        self.account.public_key()
    }

    pub fn operator_jwt(&self) -> Result<String, IdentityError> {
        encode_jwt(
            &self.operator,
            json!({
                "name": "fleetlet", "sub": self.operator.public_key(),
                "nats": { "system_account": self.system.public_key(), "type": "operator", "version": 2 }
            }),
        )
    }

    fn system_account_jwt(&self) -> Result<String, IdentityError> {
        encode_jwt(
            &self.operator,
            json!({
                "name": "SYS", "sub": self.system.public_key(),
                "nats": { "limits": unlimited_account(false), "type": "account", "version": 2 }
            }),
        )
    }

    /// The fleet account's JWT with these revoked user keys (key → revoked-at, unix seconds).
    pub fn account_jwt(
        &self,
        revocations: &BTreeMap<String, i64>,
    ) -> Result<String, IdentityError> {
        let mut nats = json!({
            "limits": unlimited_account(true),
            "signing_keys": [self.signing.public_key()],
            "default_permissions": { "pub": {}, "sub": {} },
            "type": "account", "version": 2,
        });
        if !revocations.is_empty() {
            nats["revocations"] = json!(revocations);
        }
        encode_jwt(
            &self.operator,
            json!({ "name": "FLEET", "sub": self.account.public_key(), "nats": nats }),
        )
    }

    /// nats-server configuration for these keys: the operator, the system account, and a
    /// full account resolver in `resolver_dir` preloaded with both accounts.
    pub fn server_config(&self, resolver_dir: &Path) -> Result<String, IdentityError> {
        Ok(format!(
            "operator: \"{}\"\nsystem_account: \"{}\"\nresolver: {{\n  type: full\n  dir: \"{}\"\n  allow_delete: false\n  interval: \"2m\"\n}}\nresolver_preload: {{\n  {}: \"{}\"\n  {}: \"{}\"\n}}\n",
            self.operator_jwt()?,
            self.system.public_key(),
            resolver_dir.display(),
            self.system.public_key(),
            self.system_account_jwt()?,
            self.account.public_key(),
            self.account_jwt(&BTreeMap::new())?,
        ))
    }

    /// A new user of the fleet account with these permissions.
    pub fn issue_user(
        &self,
        name: &str,
        permissions: &Permissions,
    ) -> Result<UserCredentials, IdentityError> {
        let user = KeyPair::new_user();
        let mut nats = json!({
            "pub": { "allow": permissions.publish },
            "sub": { "allow": permissions.subscribe },
            "subs": -1, "data": -1, "payload": -1,
            "issuer_account": self.account.public_key(),
            "type": "user", "version": 2,
        });
        if permissions.allow_responses {
            // Any number of replies, each within an hour of its request (nanoseconds).
            nats["resp"] = json!({ "max": -1, "ttl": 3_600_000_000_000_i64 });
        }
        let jwt = encode_jwt(
            &self.signing,
            json!({ "name": name, "sub": user.public_key(), "nats": nats }),
        )?;
        let seed = user
            .seed()
            .map_err(|e| IdentityError::Sign(e.to_string()))?;
        Ok(UserCredentials {
            public_key: user.public_key(),
            creds: creds_file(&jwt, &seed),
        })
    }

    /// A user of the system account, which may update account JWTs on the server.
    pub fn system_user(&self) -> Result<String, IdentityError> {
        let user = KeyPair::new_user();
        let jwt = encode_jwt(
            &self.system,
            json!({ "name": "fleetlet-controller-system", "sub": user.public_key(),
                    "nats": { "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
                              "type": "user", "version": 2 } }),
        )?;
        let seed = user
            .seed()
            .map_err(|e| IdentityError::Sign(e.to_string()))?;
        Ok(creds_file(&jwt, &seed))
    }
}

/// Sends the fleet account's JWT to the server (through the system account); the server
/// stores it in its resolver and closes connections of users it now revokes.
pub async fn push_account_jwt(sys: &async_nats::Client, jwt: String) -> Result<(), IdentityError> {
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        sys.request("$SYS.REQ.CLAIMS.UPDATE", jwt.into()),
    )
    .await
    .map_err(|_| IdentityError::Push("no answer within 10 s".into()))?
    .map_err(|e| IdentityError::Push(e.to_string()))?;
    let answer: Value =
        serde_json::from_slice(&reply.payload).map_err(|e| IdentityError::Push(e.to_string()))?;
    if answer["data"]["code"] == json!(200) {
        return Ok(());
    }
    Err(IdentityError::Push(
        answer["error"]["description"]
            .as_str()
            .unwrap_or("the server refused the update")
            .to_string(),
    ))
}

/// The controller's record of issued and revoked keys.
#[derive(Debug, Clone, Default, PartialEq)]
struct Ledger {
    /// Device id → (namespace, public key).
    issued: BTreeMap<String, (String, String)>,
    /// Public key → revoked at (unix seconds).
    revoked: BTreeMap<String, i64>,
}

impl Ledger {
    fn from_config_map(cm: &ConfigMap) -> Self {
        let mut l = Ledger::default();
        for (k, v) in cm.data.iter().flatten() {
            if let Some(key) = k.strip_prefix(REVOKED_PREFIX) {
                l.revoked
                    .insert(key.to_string(), v.parse().unwrap_or_else(|_| now()));
            } else if let Some((ns, key)) = v.split_once('/') {
                l.issued.insert(k.clone(), (ns.into(), key.into()));
            }
        }
        l
    }

    fn data(&self) -> BTreeMap<String, String> {
        let issued = self
            .issued
            .iter()
            .map(|(d, (ns, key))| (d.clone(), format!("{ns}/{key}")));
        let revoked = self
            .revoked
            .iter()
            .map(|(key, at)| (format!("{REVOKED_PREFIX}{key}"), at.to_string()));
        issued.chain(revoked).collect()
    }
}

/// Issues and revokes device credentials; one pass per controller pass, on the leader.
pub struct Identities {
    authority: Arc<Authority>,
    client: Client,
    namespace: String,
    sys: async_nats::Client,
    /// `[nats] urls` written into each device's agent configuration fragment.
    device_nats_urls: Vec<String>,
    /// `[trust.manifest_keys]` lines for the fragment, when manifests are signed.
    trust: Option<(String, String)>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The ConfigMap as last read or written (`None`: read it).
    ledger: Option<(Ledger, Option<String>)>,
    /// Revocations the server has (`None`: push on the next pass).
    pushed: Option<BTreeMap<String, i64>>,
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IdentityPass {
    pub issued: u32,
    pub revoked: u32,
}

impl Identities {
    pub fn new(
        authority: Arc<Authority>,
        client: Client,
        namespace: String,
        sys: async_nats::Client,
    ) -> Self {
        Self {
            authority,
            client,
            namespace,
            sys,
            device_nats_urls: Vec::new(),
            trust: None,
            state: Mutex::new(State::default()),
        }
    }

    pub fn with_enrollment(mut self, urls: Vec<String>, trust: Option<(String, String)>) -> Self {
        self.device_nats_urls = urls;
        self.trust = trust;
        self
    }

    fn secret_name(device: &str) -> String {
        format!("{device}-nats")
    }

    async fn load(&self) -> Result<(Ledger, Option<String>), IdentityError> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
        Ok(match api.get_opt(IDENTITIES_CONFIG_MAP).await? {
            Some(cm) => (Ledger::from_config_map(&cm), cm.resource_version()),
            None => (Ledger::default(), None),
        })
    }

    /// Writes the ledger; fails on a concurrent change (the next pass re-reads).
    async fn store(
        &self,
        ledger: &Ledger,
        version: Option<String>,
    ) -> Result<Option<String>, IdentityError> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(IDENTITIES_CONFIG_MAP.into()),
                namespace: Some(self.namespace.clone()),
                resource_version: version.clone(),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".into(),
                    MANAGED_BY.into(),
                )])),
                ..Default::default()
            },
            data: Some(ledger.data()),
            ..Default::default()
        };
        let written = match version {
            Some(_) => {
                api.replace(IDENTITIES_CONFIG_MAP, &PostParams::default(), &cm)
                    .await?
            }
            None => api.create(&PostParams::default(), &cm).await?,
        };
        Ok(written.resource_version())
    }

    fn agent_config(&self, device: &str) -> String {
        let mut text = format!("device_id = \"{device}\"\n\n[nats]\n");
        if !self.device_nats_urls.is_empty() {
            let urls: Vec<String> = self
                .device_nats_urls
                .iter()
                .map(|u| format!("\"{u}\""))
                .collect();
            text.push_str(&format!("urls = [{}]\n", urls.join(", ")));
        }
        text.push_str(&format!("creds_file = \"{DEVICE_CREDS_PATH}\"\n"));
        if let Some((id, key)) = &self.trust {
            text.push_str(&format!("\n[trust.manifest_keys]\n\"{id}\" = \"{key}\"\n"));
        }
        text
    }

    async fn create_secret(
        &self,
        d: &EdgeDevice,
        id: &DeviceId,
        creds: &UserCredentials,
    ) -> Result<(), IdentityError> {
        let ns = d.namespace().unwrap_or_default();
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &ns);
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(Self::secret_name(id.as_str())),
                namespace: Some(ns),
                labels: Some(BTreeMap::from([
                    ("app.kubernetes.io/managed-by".into(), MANAGED_BY.into()),
                    ("fleetlet.dev/device".into(), id.as_str().into()),
                ])),
                annotations: Some(BTreeMap::from([(
                    "fleetlet.dev/nats-user".into(),
                    creds.public_key.clone(),
                )])),
                ..Default::default()
            },
            string_data: Some(BTreeMap::from([
                (CREDS_KEY.into(), creds.creds.clone()),
                (AGENT_CONFIG_KEY.into(), self.agent_config(id.as_str())),
            ])),
            type_: Some("Opaque".into()),
            ..Default::default()
        };
        let name = Self::secret_name(id.as_str());
        // A leftover Secret (a previous key) is replaced.
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
        api.create(&PostParams::default(), &secret).await?;
        Ok(())
    }

    async fn delete_secret(&self, ns: &str, device: &str) {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        match api
            .delete(&Self::secret_name(device), &DeleteParams::default())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.is_not_found() => {}
            Err(e) => {
                warn!(device, namespace = ns, error = %e, "deleting a revoked device's credentials")
            }
        }
    }

    async fn set_status(&self, d: &EdgeDevice, want: Option<DeviceCredentials>) {
        let have = d.status.as_ref().and_then(|s| s.credentials.clone());
        if have == want {
            return;
        }
        let api: Api<EdgeDevice> =
            Api::namespaced(self.client.clone(), &d.namespace().unwrap_or_default());
        let patch = json!({ "status": { "credentials": want } });
        if let Err(e) = api
            .patch_status(
                &d.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            warn!(device = %d.name_any(), error = %e, "recording credentials in status");
        }
    }

    /// Issues credentials to devices without them, revokes those of deleted or revoked
    /// devices, and makes sure the server knows every revocation.
    pub async fn reconcile(
        &self,
        devices: &BTreeMap<DeviceId, Arc<EdgeDevice>>,
    ) -> Result<IdentityPass, IdentityError> {
        let mut state = self.state.lock().await;
        let (mut ledger, mut version) = match state.ledger.take() {
            Some(l) => l,
            None => self.load().await?,
        };
        let before = ledger.clone();
        let mut pass = IdentityPass::default();
        let revoke_at = now();

        // Revoke first: a key is revoked on the server before its Secret goes.
        let mut to_delete = Vec::new();
        for (id, (ns, key)) in before.issued.iter() {
            let keep = DeviceId::new(id)
                .ok()
                .and_then(|id| devices.get(&id))
                .is_some_and(|d| {
                    !d.spec.revoked
                        && d.meta().deletion_timestamp.is_none()
                        && d.namespace().as_deref() == Some(ns.as_str())
                });
            if !keep {
                ledger.issued.remove(id);
                ledger.revoked.insert(key.clone(), revoke_at);
                to_delete.push((ns.clone(), id.clone()));
                pass.revoked += 1;
            }
        }
        if ledger != before {
            version = self.store(&ledger, version).await?;
        }
        if state.pushed.as_ref() != Some(&ledger.revoked) {
            push_account_jwt(&self.sys, self.authority.account_jwt(&ledger.revoked)?).await?;
            info!(
                revoked = ledger.revoked.len(),
                "fleet account JWT pushed to NATS"
            );
            state.pushed = Some(ledger.revoked.clone());
        }
        for (ns, id) in to_delete {
            info!(device = %id, namespace = %ns, "device credentials revoked");
            self.delete_secret(&ns, &id).await;
        }

        // New devices: mint every missing key, record them all in one write, then hand
        // them out. A crash in between leaves recorded keys that are revoked later, never
        // an unrecorded one.
        let mut minted = Vec::new();
        for (id, d) in devices {
            let wanted = d.meta().deletion_timestamp.is_none() && !d.spec.revoked;
            if wanted && !ledger.issued.contains_key(id.as_str()) {
                let creds = self.authority.issue_user(
                    &format!("device-{id}"),
                    &fleetlet_protocol::permissions::device(id, &format!("_INBOX_{id}")),
                )?;
                ledger.issued.insert(
                    id.to_string(),
                    (d.namespace().unwrap_or_default(), creds.public_key.clone()),
                );
                minted.push((id, d, creds));
            }
        }
        if !minted.is_empty() {
            version = self.store(&ledger, version).await?;
        }
        let mut failed = None;
        for (id, d, creds) in minted {
            if let Err(e) = self.create_secret(d, id, &creds).await {
                // Never handed out: revoke it, and the next pass issues another.
                warn!(device = %id, error = %e, "writing the credentials Secret");
                ledger.issued.remove(id.as_str());
                ledger.revoked.insert(creds.public_key, now());
                failed = Some(e);
                continue;
            }
            info!(device = %id, user = %creds.public_key, "device credentials issued");
            pass.issued += 1;
        }
        if let Some(e) = failed {
            let _ = self.store(&ledger, version).await;
            return Err(e);
        }

        for (id, d) in devices {
            if d.meta().deletion_timestamp.is_some() {
                continue;
            }
            let want = if d.spec.revoked {
                DeviceCredentials {
                    revoked: true,
                    ..Default::default()
                }
            } else {
                let Some((_, key)) = ledger.issued.get(id.as_str()) else {
                    continue;
                };
                DeviceCredentials {
                    secret_name: Some(Self::secret_name(id.as_str())),
                    user: Some(key.clone()),
                    revoked: false,
                }
            };
            self.set_status(d, Some(want)).await;
        }
        state.ledger = Some((ledger, version));
        Ok(pass)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn verify(jwt: &str, issuer: &str) -> bool {
        let (input, sig) = jwt.rsplit_once('.').unwrap();
        let sig = BASE64URL_NOPAD.decode(sig.as_bytes()).unwrap();
        KeyPair::from_public_key(issuer)
            .unwrap()
            .verify(input.as_bytes(), &sig)
            .is_ok()
    }

    #[test]
    fn users_are_signed_by_the_account_signing_key_with_their_permissions() {
        let a = Authority::generate();
        let d = DeviceId::new("pi-a").unwrap();
        let u = a
            .issue_user(
                "pi-a",
                &fleetlet_protocol::permissions::device(&d, "_INBOX_pi-a"),
            )
            .unwrap();
        let jwt = u.creds.lines().nth(1).unwrap();
        let c = decode_claims(jwt).unwrap();
        assert_eq!(c["sub"], json!(u.public_key));
        assert_eq!(c["iss"], json!(a.signing.public_key()));
        assert_eq!(c["nats"]["issuer_account"], json!(a.account_public_key()));
        assert!(verify(jwt, &a.signing.public_key()));
        assert!(!verify(jwt, &a.account.public_key()));
        assert_eq!(c["nats"]["sub"]["allow"][0], json!("_INBOX_pi-a.>"));
        assert!(u.creds.contains("-----BEGIN USER NKEY SEED-----\nSU"));
    }

    #[test]
    fn the_account_jwt_lists_revocations_and_is_signed_by_the_operator() {
        let a = Authority::generate();
        let revoked = BTreeMap::from([("UABC".to_string(), 17)]);
        let jwt = a.account_jwt(&revoked).unwrap();
        assert!(verify(&jwt, &a.operator.public_key()));
        let c = decode_claims(&jwt).unwrap();
        assert_eq!(c["nats"]["revocations"]["UABC"], json!(17));
        assert_eq!(c["nats"]["limits"]["disk_storage"], json!(-1));
        assert!(
            decode_claims(&a.account_jwt(&BTreeMap::new()).unwrap()).unwrap()["nats"]
                .get("revocations")
                .is_none()
        );
    }

    #[test]
    fn the_authority_file_round_trips_and_wrong_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("authority.json");
        let a = Authority::generate();
        a.write(&path).unwrap();
        assert!(matches!(a.write(&path), Err(IdentityError::Write { .. })));
        let b = Authority::from_file(&path).unwrap();
        assert_eq!(a.account_public_key(), b.account_public_key());
        let mut f: AuthorityFile =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        f.operator = f.account.clone();
        std::fs::write(&path, serde_json::to_string(&f).unwrap()).unwrap();
        let e = Authority::from_file(&path).unwrap_err().to_string();
        assert!(e.contains("operator is not the right kind of key"), "{e}");
        std::fs::write(&path, "{").unwrap();
        assert!(matches!(
            Authority::from_file(&path),
            Err(IdentityError::Invalid { .. })
        ));
    }

    #[test]
    fn the_ledger_round_trips_through_a_config_map() {
        let l = Ledger {
            issued: BTreeMap::from([("pi-a".into(), ("home".into(), "UKEY".into()))]),
            revoked: BTreeMap::from([("UOLD".into(), 5)]),
        };
        let cm = ConfigMap {
            data: Some(l.data()),
            ..Default::default()
        };
        assert_eq!(Ledger::from_config_map(&cm), l);
    }
}
