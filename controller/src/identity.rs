//! Device identities on NATS (decentralized auth): an operator, a system account, the
//! [`FLEET`] account holding the streams (the controller's), the [`BRIDGE`] account, and one
//! account per device. The layout of imports and exports is
//! [`fleetlet_protocol::access`]; this module signs it.
//!
//! For each EdgeDevice the controller creates a new account whose only contents are
//! imports of that device's own subjects (each with an activation token from the exporting
//! account, so no other account can import them), pushes its JWT to the servers, issues one
//! user of it, and hands the `.creds` out in a Secret next to the EdgeDevice. The account's
//! own key is not kept: nothing more is ever issued by it.
//!
//! Revoking a device (EdgeDevice deleted or `spec.revoked`) deletes its account from the
//! servers' resolvers: its connections are closed and its credentials refused, and nothing
//! is left behind to grow (no revocation list). Which device has which account is kept in a
//! ConfigMap in the controller's namespace, so a device deleted while the controller was
//! down is still revoked when it comes back.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use data_encoding::{BASE32_NOPAD, BASE64URL_NOPAD};
use fleetlet_crds::{DeviceCredentials, EdgeDevice};
use fleetlet_protocol::{
    DeviceId,
    access::{self, BRIDGE, DEVICE_LIMITS, Export, Exporter, FLEET, Import, Kind, Permissions},
};
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

/// Name of the ConfigMap recording which account each device has.
pub const IDENTITIES_CONFIG_MAP: &str = "fleetlet-nats-identities";
/// Key of the `.creds` file in a device's credentials Secret.
pub const CREDS_KEY: &str = "nats.creds";
/// Key of the agent configuration fragment in a device's credentials Secret.
pub const AGENT_CONFIG_KEY: &str = "agent.toml";
/// Where the agent configuration fragment expects the `.creds` file.
pub const DEVICE_CREDS_PATH: &str = "/etc/fleetlet/nats.creds";
/// Label on what the controller creates and alone may delete.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
const MANAGED_BY: &str = "fleetlet-controller";
/// Label naming the device a credentials Secret is for.
use fleetlet_crds::naming::DEVICE_LABEL;
/// Accounts deleted from the resolvers with one request.
const DELETE_BATCH: usize = 500;

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
    #[error("pushing account JWTs to NATS: {0}")]
    Push(String),
}

/// The seeds of the operator, the system account, the fleet account and its signing key,
/// and the bridge account. Secret: whoever has it can mint any identity.
#[derive(Serialize, Deserialize)]
struct AuthorityFile {
    operator: String,
    system_account: String,
    account: String,
    account_signing: String,
    bridge_account: Option<String>,
}

/// The keys that sign fleetlet's NATS identities.
pub struct Authority {
    operator: KeyPair,
    system: KeyPair,
    account: KeyPair,
    signing: KeyPair,
    bridge: KeyPair,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("operator", &self.operator.public_key())
            .field("account", &self.account.public_key())
            .field("bridge", &self.bridge.public_key())
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

/// A device account's limits: [`DEVICE_LIMITS`], no leaf nodes, no JetStream of its own.
fn device_account_limits() -> Value {
    let l = DEVICE_LIMITS;
    json!({
        "subs": l.subscriptions, "data": -1, "payload": l.payload,
        "imports": -1, "exports": 0, "wildcards": true, "conn": l.connections, "leaf": 0,
        "mem_storage": 0, "disk_storage": 0, "streams": 0, "consumer": 0,
    })
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

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Service => "service",
        Kind::Stream => "stream",
    }
}

/// A user's credentials: its public key and its `.creds` file.
#[derive(Debug, Clone)]
pub struct UserCredentials {
    pub public_key: String,
    pub creds: String,
}

/// A device's new identity: its account (whose JWT the servers must have before the device
/// connects) and the one user of it.
#[derive(Debug, Clone)]
pub struct DeviceIdentity {
    pub account: String,
    pub account_jwt: String,
    pub user: UserCredentials,
}

fn seed_of(k: &KeyPair) -> Result<String, IdentityError> {
    k.seed().map_err(|e| IdentityError::Sign(e.to_string()))
}

/// A user JWT issued by `issuer` (an account key, or a signing key of `issuer_account`).
fn user_creds(
    issuer: &KeyPair,
    issuer_account: Option<&str>,
    name: &str,
    permissions: Option<&Permissions>,
) -> Result<UserCredentials, IdentityError> {
    let user = KeyPair::new_user();
    let mut nats = json!({
        "pub": {}, "sub": {},
        "subs": -1, "data": -1, "payload": -1,
        "type": "user", "version": 2,
    });
    if let Some(p) = permissions {
        nats["pub"] = json!({ "allow": p.publish });
        nats["sub"] = json!({ "allow": p.subscribe });
        if p.allow_responses {
            // Any number of replies, each within an hour of its request (nanoseconds).
            nats["resp"] = json!({ "max": -1, "ttl": 3_600_000_000_000_i64 });
        }
    }
    if let Some(a) = issuer_account {
        nats["issuer_account"] = json!(a);
    }
    let jwt = encode_jwt(
        issuer,
        json!({ "name": name, "sub": user.public_key(), "nats": nats }),
    )?;
    Ok(UserCredentials {
        public_key: user.public_key(),
        creds: creds_file(&jwt, &seed_of(&user)?),
    })
}

impl Authority {
    /// New random keys.
    pub fn generate() -> Self {
        Self {
            operator: KeyPair::new_operator(),
            system: KeyPair::new_account(),
            account: KeyPair::new_account(),
            signing: KeyPair::new_account(),
            bridge: KeyPair::new_account(),
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
        let bridge = f.bridge_account.as_deref().ok_or_else(|| {
            invalid(
                "it has no bridge_account: it was written by an older fleetlet-controller nats-init, \
                 whose single shared account let devices reach each other's keys; create a new \
                 authority with `fleetlet-controller nats-init` and enrol the devices again"
                    .into(),
            )
        })?;
        Ok(Self {
            operator: key("operator", &f.operator, 'O')?,
            system: key("system_account", &f.system_account, 'A')?,
            account: key("account", &f.account, 'A')?,
            signing: key("account_signing", &f.account_signing, 'A')?,
            bridge: key("bridge_account", bridge, 'A')?,
        })
    }

    /// Writes the seeds to a new file readable by its owner only.
    pub fn write(&self, path: &Path) -> Result<(), IdentityError> {
        use std::{io::Write, os::unix::fs::OpenOptionsExt};
        let f = AuthorityFile {
            operator: seed_of(&self.operator)?,
            system_account: seed_of(&self.system)?,
            account: seed_of(&self.account)?,
            account_signing: seed_of(&self.signing)?,
            bridge_account: Some(seed_of(&self.bridge)?),
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

    /// The bridge account's public key.
    pub fn bridge_public_key(&self) -> String {
        self.bridge.public_key()
    }

    fn exporter(&self, e: Exporter) -> &KeyPair {
        match e {
            Exporter::Fleet => &self.account,
            Exporter::Bridge => &self.bridge,
        }
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

    /// The exports of `from`: every one needs an activation token, which only the
    /// authority issues (per device for per-device subjects, to the bridge for the rest).
    fn exports_of(from: Exporter) -> Vec<Value> {
        access::exports()
            .into_iter()
            .filter(|e| e.from == from)
            .map(|e: Export| {
                let mut x = json!({
                    "name": e.subject.wildcard(),
                    "subject": e.subject.wildcard(),
                    "type": kind_name(e.kind),
                    "token_req": true,
                });
                if e.streamed_responses {
                    x["response_type"] = json!("Stream");
                }
                x
            })
            .collect()
    }

    /// An activation token letting `importer` import `import`.
    fn activation(&self, importer: &str, import: &Import) -> Result<String, IdentityError> {
        encode_jwt(
            self.exporter(import.from),
            json!({
                "name": import.subject, "sub": importer,
                "nats": { "subject": import.subject, "kind": kind_name(import.kind),
                          "type": "activation", "version": 2 }
            }),
        )
    }

    fn imports_for(&self, importer: &str, imports: &[Import]) -> Result<Vec<Value>, IdentityError> {
        imports
            .iter()
            .map(|i| {
                Ok(json!({
                    "name": i.subject,
                    "subject": i.subject,
                    "account": self.exporter(i.from).public_key(),
                    "token": self.activation(importer, i)?,
                    "type": kind_name(i.kind),
                }))
            })
            .collect()
    }

    /// The fleet account's JWT: JetStream, the controller's users (signed by its signing
    /// key), and the exports devices and the bridge import.
    pub fn account_jwt(&self) -> Result<String, IdentityError> {
        encode_jwt(
            &self.operator,
            json!({ "name": FLEET, "sub": self.account.public_key(), "nats": {
                "limits": unlimited_account(true),
                "signing_keys": [self.signing.public_key()],
                "exports": Self::exports_of(Exporter::Fleet),
                "default_permissions": { "pub": {}, "sub": {} },
                "type": "account", "version": 2,
            }}),
        )
    }

    /// The bridge account's JWT: no JetStream, its imports from the fleet account, and the
    /// relay subjects it exports to devices.
    pub fn bridge_account_jwt(&self) -> Result<String, IdentityError> {
        let me = self.bridge.public_key();
        encode_jwt(
            &self.operator,
            json!({ "name": BRIDGE, "sub": me, "nats": {
                "limits": unlimited_account(false),
                "imports": self.imports_for(&me, &access::bridge_imports())?,
                "exports": Self::exports_of(Exporter::Bridge),
                "default_permissions": { "pub": {}, "sub": {} },
                "type": "account", "version": 2,
            }}),
        )
    }

    /// nats-server configuration for these keys: the operator, the system account, and a
    /// full account resolver in `resolver_dir` (deletes allowed: that is how a device is
    /// revoked) preloaded with the system, fleet and bridge accounts.
    pub fn server_config(&self, resolver_dir: &Path) -> Result<String, IdentityError> {
        Ok(format!(
            "operator: \"{}\"\nsystem_account: \"{}\"\nresolver: {{\n  type: full\n  dir: \"{}\"\n  allow_delete: true\n  hard_delete: true\n  interval: \"2m\"\n}}\nresolver_preload: {{\n  {}: \"{}\"\n  {}: \"{}\"\n  {}: \"{}\"\n}}\n",
            self.operator_jwt()?,
            self.system.public_key(),
            resolver_dir.display(),
            self.system.public_key(),
            self.system_account_jwt()?,
            self.account.public_key(),
            self.account_jwt()?,
            self.bridge.public_key(),
            self.bridge_account_jwt()?,
        ))
    }

    /// A new user of the fleet account (the controller's own identity, or an administrator
    /// with `None`: every right).
    pub fn issue_fleet_user(
        &self,
        name: &str,
        permissions: Option<&Permissions>,
    ) -> Result<UserCredentials, IdentityError> {
        user_creds(
            &self.signing,
            Some(&self.account.public_key()),
            name,
            permissions,
        )
    }

    /// A new user of the bridge account with the bridge's permissions.
    pub fn issue_bridge_user(&self, name: &str) -> Result<UserCredentials, IdentityError> {
        user_creds(&self.bridge, None, name, Some(&access::bridge()))
    }

    /// A new account for `device`, and its one user.
    pub fn issue_device(&self, device: &DeviceId) -> Result<DeviceIdentity, IdentityError> {
        let account = KeyPair::new_account();
        let me = account.public_key();
        let account_jwt = encode_jwt(
            &self.operator,
            json!({ "name": format!("device-{device}"), "sub": me, "nats": {
                "limits": device_account_limits(),
                "imports": self.imports_for(&me, &access::device_imports(device))?,
                "default_permissions": { "pub": {}, "sub": {} },
                "type": "account", "version": 2,
            }}),
        )?;
        let user = user_creds(
            &account,
            None,
            &format!("device-{device}"),
            Some(&access::device(device)),
        )?;
        Ok(DeviceIdentity {
            account: me,
            account_jwt,
            user,
        })
    }

    /// The request that deletes `accounts` from the servers' resolvers (signed by the
    /// operator, as the servers require).
    pub fn delete_accounts_request(&self, accounts: &[String]) -> Result<String, IdentityError> {
        encode_jwt(
            &self.operator,
            json!({ "sub": self.operator.public_key(), "nats": { "accounts": accounts } }),
        )
    }

    /// A user of the system account, which may update account JWTs on the server.
    pub fn system_user(&self) -> Result<String, IdentityError> {
        Ok(user_creds(&self.system, None, "fleetlet-controller-system", None)?.creds)
    }
}

/// A request to the servers' account resolver (through the system account); Ok when the
/// server answers 200.
async fn claims_request(
    sys: &async_nats::Client,
    subject: &'static str,
    jwt: String,
) -> Result<(), IdentityError> {
    let reply = tokio::time::timeout(Duration::from_secs(10), sys.request(subject, jwt.into()))
        .await
        .map_err(|_| IdentityError::Push(format!("no answer to {subject} within 10 s")))?
        .map_err(|e| IdentityError::Push(e.to_string()))?;
    let answer: Value =
        serde_json::from_slice(&reply.payload).map_err(|e| IdentityError::Push(e.to_string()))?;
    if answer["data"]["code"] == json!(200) {
        return Ok(());
    }
    Err(IdentityError::Push(
        answer["error"]["description"]
            .as_str()
            .unwrap_or("the server refused the request")
            .to_string(),
    ))
}

/// Sends an account JWT to the servers, which store it in their resolvers.
pub async fn push_account_jwt(sys: &async_nats::Client, jwt: String) -> Result<(), IdentityError> {
    claims_request(sys, "$SYS.REQ.CLAIMS.UPDATE", jwt).await
}

/// Deletes accounts from the servers' resolvers: their connections are closed and their
/// users refused from then on. Deleting an account the servers do not have succeeds.
pub async fn delete_accounts(
    sys: &async_nats::Client,
    authority: &Authority,
    accounts: &[String],
) -> Result<(), IdentityError> {
    for batch in accounts.chunks(DELETE_BATCH) {
        let request = authority.delete_accounts_request(batch)?;
        claims_request(sys, "$SYS.REQ.CLAIMS.DELETE", request).await?;
    }
    Ok(())
}

/// The controller's record of which account each device has.
#[derive(Debug, Clone, Default, PartialEq)]
struct Ledger {
    /// Device id → (namespace, account public key).
    issued: BTreeMap<String, (String, String)>,
}

impl Ledger {
    fn from_config_map(cm: &ConfigMap) -> Self {
        let mut l = Ledger::default();
        for (k, v) in cm.data.iter().flatten() {
            // Only `<device>: <namespace>/<account>`; an older controller's entries (users of
            // the shared account, and their revocations) mean nothing with this authority.
            if let (Ok(_), Some((ns, key))) = (DeviceId::new(k.as_str()), v.split_once('/'))
                && key.starts_with('A')
            {
                l.issued.insert(k.clone(), (ns.into(), key.into()));
            }
        }
        l
    }

    fn data(&self) -> BTreeMap<String, String> {
        self.issued
            .iter()
            .map(|(d, (ns, key))| (d.clone(), format!("{ns}/{key}")))
            .collect()
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
    /// The ConfigMap recording which device has which identity.
    config_map: String,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The ConfigMap as last read or written (`None`: read it).
    ledger: Option<(Ledger, Option<String>)>,
    /// Whether the fleet and bridge account JWTs went to the servers in this run (the
    /// preloaded ones may be an older version's).
    accounts_pushed: bool,
    /// Whether the Secrets of recorded devices were checked in this run: an identity that
    /// was recorded but never handed out (a crash in between) is replaced.
    secrets_checked: bool,
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IdentityPass {
    pub issued: u32,
    pub revoked: u32,
}

/// Whether a credentials Secret is one this controller made for `device`.
fn ours(secret: &Secret, device: &str) -> bool {
    let labels = secret.metadata.labels.clone().unwrap_or_default();
    labels.get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY)
        && labels.get(DEVICE_LABEL).map(String::as_str) == Some(device)
}

/// The NATS account a credentials Secret is for.
fn account_of(secret: &Secret) -> Option<String> {
    secret
        .metadata
        .annotations
        .as_ref()?
        .get(ACCOUNT_ANNOTATION)
        .cloned()
}

const ACCOUNT_ANNOTATION: &str = "fleetlet.dev/nats-account";
const USER_ANNOTATION: &str = "fleetlet.dev/nats-user";

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
            config_map: IDENTITIES_CONFIG_MAP.to_owned(),
            state: Mutex::new(State::default()),
        }
    }

    pub fn with_enrollment(mut self, urls: Vec<String>, trust: Option<(String, String)>) -> Self {
        self.device_nats_urls = urls;
        self.trust = trust;
        self
    }

    /// Records the identities in ConfigMap `name` instead of [`IDENTITIES_CONFIG_MAP`].
    pub fn with_config_map(mut self, name: String) -> Self {
        self.config_map = name;
        self
    }

    fn secret_name(device: &str) -> String {
        format!("{device}-nats")
    }

    async fn load(&self) -> Result<(Ledger, Option<String>), IdentityError> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
        Ok(match api.get_opt(&self.config_map).await? {
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
                name: Some(self.config_map.clone()),
                namespace: Some(self.namespace.clone()),
                resource_version: version.clone(),
                labels: Some(BTreeMap::from([(
                    MANAGED_BY_LABEL.into(),
                    MANAGED_BY.into(),
                )])),
                ..Default::default()
            },
            data: Some(ledger.data()),
            ..Default::default()
        };
        let written = match version {
            Some(_) => {
                api.replace(&self.config_map, &PostParams::default(), &cm)
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

    /// Writes `device`'s credentials Secret, replacing an older one of ours. A Secret of
    /// that name that is not ours is left alone: Err with why.
    async fn create_secret(
        &self,
        d: &EdgeDevice,
        id: &DeviceId,
        identity: &DeviceIdentity,
    ) -> Result<(), String> {
        let ns = d.namespace().unwrap_or_default();
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &ns);
        let name = Self::secret_name(id.as_str());
        match api.get_opt(&name).await {
            Ok(Some(existing)) if !ours(&existing, id.as_str()) => {
                return Err(format!(
                    "Secret {ns}/{name} exists and is not managed by fleetlet-controller; \
                     move it away to receive the device's credentials"
                ));
            }
            Ok(Some(_)) => {
                api.delete(&name, &DeleteParams::default())
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok(None) => {}
            Err(e) => return Err(e.to_string()),
        }
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name),
                namespace: Some(ns),
                labels: Some(BTreeMap::from([
                    (MANAGED_BY_LABEL.into(), MANAGED_BY.into()),
                    (DEVICE_LABEL.into(), id.as_str().into()),
                ])),
                annotations: Some(BTreeMap::from([
                    (USER_ANNOTATION.into(), identity.user.public_key.clone()),
                    (ACCOUNT_ANNOTATION.into(), identity.account.clone()),
                ])),
                // Goes with its EdgeDevice (garbage collection), which the controller also
                // does itself when it revokes.
                owner_references: d.controller_owner_ref(&()).map(|r| vec![r]),
                ..Default::default()
            },
            string_data: Some(BTreeMap::from([
                (CREDS_KEY.into(), identity.user.creds.clone()),
                (AGENT_CONFIG_KEY.into(), self.agent_config(id.as_str())),
            ])),
            type_: Some("Opaque".into()),
            ..Default::default()
        };
        api.create(&PostParams::default(), &secret)
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Deletes the credentials Secret of `account` for `device`, if it is ours and still
    /// that account's (a device enrolled again has a new one).
    async fn delete_secret(&self, ns: &str, device: &str, account: &str) {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        let name = Self::secret_name(device);
        let existing = match api.get_opt(&name).await {
            Ok(Some(s)) => s,
            Ok(None) => return,
            Err(e) => {
                warn!(device, namespace = ns, error = %e, "reading a revoked device's credentials");
                return;
            }
        };
        if !ours(&existing, device) || account_of(&existing).as_deref() != Some(account) {
            info!(
                device,
                namespace = ns,
                "credentials Secret is not this account's; left alone"
            );
            return;
        }
        match api.delete(&name, &DeleteParams::default()).await {
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

    /// Why `device`'s credentials Secret cannot be written: a Secret of that name that this
    /// controller did not make (it is never replaced or deleted).
    async fn secret_in_the_way(&self, d: &EdgeDevice, id: &DeviceId) -> Option<String> {
        let ns = d.namespace().unwrap_or_default();
        let name = Self::secret_name(id.as_str());
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &ns);
        match api.get_opt(&name).await {
            Ok(Some(existing)) if !ours(&existing, id.as_str()) => Some(format!(
                "Secret {ns}/{name} exists and is not managed by fleetlet-controller; \
                 move it away to receive the device's credentials"
            )),
            _ => None,
        }
    }

    /// Recorded devices whose Secret is missing or holds another account: identities that
    /// were recorded but never handed out.
    async fn undelivered(&self, ledger: &Ledger) -> Result<Vec<String>, IdentityError> {
        let api: Api<Secret> = Api::all(self.client.clone());
        let params = kube::api::ListParams::default()
            .labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY},{DEVICE_LABEL}"));
        let mut delivered = std::collections::BTreeSet::new();
        for s in api.list_metadata(&params).await?.items {
            let ns = s.metadata.namespace.clone().unwrap_or_default();
            let labels = s.metadata.labels.clone().unwrap_or_default();
            let account = s
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ACCOUNT_ANNOTATION))
                .cloned();
            if let (Some(d), Some(a)) = (labels.get(DEVICE_LABEL), account) {
                delivered.insert((d.clone(), ns, a));
            }
        }
        Ok(ledger
            .issued
            .iter()
            .filter(|(d, (ns, a))| !delivered.contains(&((*d).clone(), ns.clone(), a.clone())))
            .map(|(d, _)| d.clone())
            .collect())
    }

    /// Revokes the identities in `revoke` (device, namespace, account): their accounts
    /// go from the servers first, then each leaves the ledger and loses its Secret.
    async fn revoke(
        &self,
        ledger: &mut Ledger,
        revoke: &[(String, String, String)],
        pass: &mut IdentityPass,
    ) -> Result<(), IdentityError> {
        let accounts: Vec<String> = revoke.iter().map(|(_, _, a)| a.clone()).collect();
        delete_accounts(&self.sys, &self.authority, &accounts).await?;
        for (id, ns, account) in revoke {
            ledger.issued.remove(id);
            info!(device = %id, namespace = %ns, account = %account, "device identity revoked");
            self.delete_secret(ns, id, account).await;
            pass.revoked += 1;
        }
        Ok(())
    }

    /// Mints an identity for each device that should have one and has none, recording it
    /// in `ledger`; a device whose Secret name is taken gets a problem instead.
    async fn mint<'d>(
        &self,
        devices: &'d BTreeMap<DeviceId, Arc<EdgeDevice>>,
        ledger: &mut Ledger,
        problems: &mut BTreeMap<String, String>,
    ) -> Result<Vec<Minted<'d>>, IdentityError> {
        let mut minted = Vec::new();
        for (id, d) in devices {
            let wanted = d.meta().deletion_timestamp.is_none() && !d.spec.revoked;
            if wanted && !ledger.issued.contains_key(id.as_str()) {
                if let Some(why) = self.secret_in_the_way(d, id).await {
                    problems.insert(id.to_string(), why);
                    continue;
                }
                let identity = self.authority.issue_device(id)?;
                ledger.issued.insert(
                    id.to_string(),
                    (d.namespace().unwrap_or_default(), identity.account.clone()),
                );
                minted.push((id, d, identity));
            }
        }
        Ok(minted)
    }

    /// Pushes each minted account and hands out its Secret. One not delivered is forgotten
    /// (the next pass issues another), with why in `problems`; returns their accounts, to
    /// delete in case they reached the servers.
    async fn deliver(
        &self,
        minted: Vec<Minted<'_>>,
        ledger: &mut Ledger,
        problems: &mut BTreeMap<String, String>,
        pass: &mut IdentityPass,
    ) -> Vec<String> {
        let mut failed = Vec::new();
        for (id, d, identity) in minted {
            let delivered = match push_account_jwt(&self.sys, identity.account_jwt.clone()).await {
                Ok(()) => self.create_secret(d, id, &identity).await,
                Err(e) => Err(e.to_string()),
            };
            if let Err(why) = delivered {
                // Never handed out: forget it (and delete it, in case it reached the
                // servers); the next pass issues another.
                warn!(device = %id, error = %why, "device identity not delivered");
                ledger.issued.remove(id.as_str());
                failed.push(identity.account);
                problems.insert(id.to_string(), why);
                continue;
            }
            info!(device = %id, account = %identity.account, user = %identity.user.public_key, "device identity issued");
            pass.issued += 1;
        }
        failed
    }

    /// Issues identities to devices without them, revokes those of deleted or revoked
    /// devices, and keeps the fleet and bridge accounts current on the servers.
    pub async fn reconcile(
        &self,
        devices: &BTreeMap<DeviceId, Arc<EdgeDevice>>,
    ) -> Result<IdentityPass, IdentityError> {
        let mut state = self.state.lock().await;
        if !state.accounts_pushed {
            push_account_jwt(&self.sys, self.authority.account_jwt()?).await?;
            push_account_jwt(&self.sys, self.authority.bridge_account_jwt()?).await?;
            state.accounts_pushed = true;
        }
        let (mut ledger, mut version) = match state.ledger.take() {
            Some(l) => l,
            None => self.load().await?,
        };
        let mut pass = IdentityPass::default();

        // Revoke first: an account is gone from the servers before its Secret goes and
        // before the ledger forgets it (a crash in between deletes it again).
        let undelivered = if state.secrets_checked {
            Vec::new()
        } else {
            self.undelivered(&ledger).await?
        };
        let revoke = revocations(&ledger, devices, &undelivered);
        if !revoke.is_empty() {
            self.revoke(&mut ledger, &revoke, &mut pass).await?;
            version = self.store(&ledger, version).await?;
        }
        state.secrets_checked = true;

        // New devices: mint every missing identity, record them all in one write, then
        // push and hand them out. A crash in between leaves recorded identities without a
        // Secret, which the first pass of the next run replaces; never an unrecorded one.
        let mut problems: BTreeMap<String, String> = BTreeMap::new();
        let minted = self.mint(devices, &mut ledger, &mut problems).await?;
        if !minted.is_empty() {
            version = self.store(&ledger, version).await?;
        }
        let failed = self
            .deliver(minted, &mut ledger, &mut problems, &mut pass)
            .await;
        if !failed.is_empty() {
            delete_accounts(&self.sys, &self.authority, &failed).await?;
            version = self.store(&ledger, version).await?;
        }

        for (id, d) in devices {
            if let Some(want) = credentials_status(id, d, &ledger, &problems) {
                self.set_status(d, Some(want)).await;
            }
        }
        state.ledger = Some((ledger, version));
        Ok(pass)
    }
}

/// A device minted an identity in this pass, to be handed out.
type Minted<'d> = (&'d DeviceId, &'d Arc<EdgeDevice>, DeviceIdentity);

/// The recorded identities to revoke, as (device, namespace, account) in ledger order:
/// those of devices gone, revoked, being deleted or moved to another namespace, and the
/// `undelivered` ones.
fn revocations(
    ledger: &Ledger,
    devices: &BTreeMap<DeviceId, Arc<EdgeDevice>>,
    undelivered: &[String],
) -> Vec<(String, String, String)> {
    let mut revoke = Vec::new();
    for (id, (ns, account)) in &ledger.issued {
        let keep = DeviceId::new(id)
            .ok()
            .and_then(|id| devices.get(&id))
            .is_some_and(|d| {
                !d.spec.revoked
                    && d.meta().deletion_timestamp.is_none()
                    && d.namespace().as_deref() == Some(ns.as_str())
            });
        if !keep || undelivered.contains(id) {
            revoke.push((id.clone(), ns.clone(), account.clone()));
        }
    }
    revoke
}

/// What `status.credentials` of device `id` should say after a pass: revoked, why it has
/// none (`problems`), or where its credentials are (`ledger`); `None` to leave it as is
/// (the device is being deleted, or has no identity yet).
fn credentials_status(
    id: &DeviceId,
    d: &EdgeDevice,
    ledger: &Ledger,
    problems: &BTreeMap<String, String>,
) -> Option<DeviceCredentials> {
    if d.meta().deletion_timestamp.is_some() {
        return None;
    }
    Some(if d.spec.revoked {
        DeviceCredentials {
            revoked: true,
            ..Default::default()
        }
    } else if let Some(why) = problems.get(id.as_str()) {
        DeviceCredentials {
            message: Some(why.clone()),
            ..Default::default()
        }
    } else {
        let (_, account) = ledger.issued.get(id.as_str())?;
        DeviceCredentials {
            secret_name: Some(Identities::secret_name(id.as_str())),
            account: Some(account.clone()),
            ..Default::default()
        }
    })
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
    fn a_device_gets_an_account_of_its_own_with_activated_imports_and_limits() {
        let a = Authority::generate();
        let d = DeviceId::new("pi-a").unwrap();
        let id = a.issue_device(&d).unwrap();
        let account = decode_claims(&id.account_jwt).unwrap();
        assert_eq!(account["sub"], json!(id.account));
        assert!(verify(&id.account_jwt, &a.operator.public_key()));
        assert_eq!(
            account["nats"]["limits"]["conn"],
            json!(DEVICE_LIMITS.connections)
        );
        assert_eq!(account["nats"]["limits"]["disk_storage"], json!(0));
        let imports = account["nats"]["imports"].as_array().unwrap();
        assert_eq!(imports.len(), access::device_imports(&d).len());
        for i in imports {
            assert!(i["subject"].as_str().unwrap().contains("pi-a"), "{i}");
            // Each import carries a token from its exporter, for this account only.
            let token = i["token"].as_str().unwrap();
            let act = decode_claims(token).unwrap();
            assert_eq!(act["sub"], json!(id.account));
            assert_eq!(act["nats"]["subject"], i["subject"]);
            assert!(verify(token, i["account"].as_str().unwrap()));
        }
        // The user is issued by the device's account, with that device's permissions.
        let jwt = id.user.creds.lines().nth(1).unwrap();
        let user = decode_claims(jwt).unwrap();
        assert_eq!(user["iss"], json!(id.account));
        assert!(verify(jwt, &id.account));
        assert!(
            user["nats"]["pub"]["allow"]
                .as_array()
                .unwrap()
                .iter()
                .all(|s| s.as_str().unwrap().contains("pi-a"))
        );
        // Another device gets another account.
        assert_ne!(a.issue_device(&d).unwrap().account, id.account);
    }

    #[test]
    fn exports_need_activation_and_the_bridge_is_a_separate_account() {
        let a = Authority::generate();
        let fleet = decode_claims(&a.account_jwt().unwrap()).unwrap();
        let exports = fleet["nats"]["exports"].as_array().unwrap();
        assert!(!exports.is_empty());
        assert!(exports.iter().all(|e| e["token_req"] == json!(true)));
        assert!(fleet["nats"].get("revocations").is_none());
        let bridge = decode_claims(&a.bridge_account_jwt().unwrap()).unwrap();
        assert_eq!(bridge["sub"], json!(a.bridge_public_key()));
        assert_eq!(bridge["nats"]["limits"].get("disk_storage"), None);
        let user = a.issue_bridge_user("b").unwrap();
        let jwt = user.creds.lines().nth(1).unwrap();
        assert_eq!(
            decode_claims(jwt).unwrap()["iss"],
            json!(a.bridge_public_key())
        );
        let delete =
            decode_claims(&a.delete_accounts_request(&["AABC".to_string()]).unwrap()).unwrap();
        assert_eq!(delete["sub"], delete["iss"]);
        assert_eq!(delete["nats"]["accounts"], json!(["AABC"]));
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
        assert_eq!(a.bridge_public_key(), b.bridge_public_key());
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
    fn the_ledger_round_trips_through_a_config_map_and_forgets_older_entries() {
        let l = Ledger {
            issued: BTreeMap::from([("pi-a".into(), ("home".into(), "AKEY".into()))]),
        };
        let mut data = l.data();
        let cm = ConfigMap {
            data: Some(data.clone()),
            ..Default::default()
        };
        assert_eq!(Ledger::from_config_map(&cm), l);
        // An older controller's users of the shared account and its revocations.
        data.insert("pi-b".into(), "home/UOLDUSER".into());
        data.insert("revoked.UOLD".into(), "5".into());
        let cm = ConfigMap {
            data: Some(data),
            ..Default::default()
        };
        assert_eq!(Ledger::from_config_map(&cm), l);
    }

    fn device(name: &str, ns: &str) -> Arc<EdgeDevice> {
        let mut d = EdgeDevice::new(name, Default::default());
        d.metadata.namespace = Some(ns.into());
        Arc::new(d)
    }

    fn deleting(mut d: Arc<EdgeDevice>) -> Arc<EdgeDevice> {
        Arc::make_mut(&mut d).metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        d
    }

    fn revoked(mut d: Arc<EdgeDevice>) -> Arc<EdgeDevice> {
        Arc::make_mut(&mut d).spec.revoked = true;
        d
    }

    #[test]
    fn identities_of_devices_gone_revoked_moved_or_undelivered_are_revoked() {
        let issued = ["kept", "gone", "revoked", "deleting", "moved", "lost"]
            .map(|d| (d.to_string(), ("home".to_string(), format!("A{d}"))));
        let ledger = Ledger {
            issued: BTreeMap::from(issued),
        };
        let devices = BTreeMap::from(
            [
                device("kept", "home"),
                revoked(device("revoked", "home")),
                deleting(device("deleting", "home")),
                device("moved", "away"),
                device("lost", "home"),
            ]
            .map(|d| (DeviceId::new(d.name_any()).unwrap(), d)),
        );
        let got = revocations(&ledger, &devices, &["lost".to_string()]);
        let got: Vec<&str> = got.iter().map(|(d, _, _)| d.as_str()).collect();
        // In ledger (name) order.
        assert_eq!(got, ["deleting", "gone", "lost", "moved", "revoked"]);
        assert_eq!(
            revocations(&ledger, &devices, &[])[0],
            ("deleting".into(), "home".into(), "Adeleting".into())
        );
    }

    #[test]
    fn the_credentials_status_says_revoked_why_not_or_where() {
        let ledger = Ledger {
            issued: BTreeMap::from([("pi-a".into(), ("home".into(), "AKEY".into()))]),
        };
        let problems = BTreeMap::from([("pi-b".to_string(), "in the way".to_string())]);
        let status = |name: &str, d: Arc<EdgeDevice>| {
            credentials_status(&DeviceId::new(name).unwrap(), &d, &ledger, &problems)
        };
        assert_eq!(
            status("pi-a", device("pi-a", "home")),
            Some(DeviceCredentials {
                secret_name: Some("pi-a-nats".into()),
                account: Some("AKEY".into()),
                ..Default::default()
            })
        );
        assert_eq!(
            status("pi-a", revoked(device("pi-a", "home"))),
            Some(DeviceCredentials {
                revoked: true,
                ..Default::default()
            })
        );
        assert_eq!(
            status("pi-b", device("pi-b", "home")),
            Some(DeviceCredentials {
                message: Some("in the way".into()),
                ..Default::default()
            })
        );
        assert_eq!(status("pi-a", deleting(device("pi-a", "home"))), None);
        assert_eq!(status("pi-c", device("pi-c", "home")), None);
    }
}
