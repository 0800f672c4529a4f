//! Who can reach what on NATS: isolation by NATS accounts, not by subject lists.
//!
//! NATS checks a publisher's permission on a message's subject, never on its reply subject,
//! and JetStream answers requests (direct gets, publish acknowledgements, API responses) on
//! that reply subject from inside the account holding the streams. In one shared account,
//! any request a client may send would therefore let it write JetStream's answer to any
//! subject of the account: another device's keys, or a JetStream API verb. So:
//!
//! * The streams live in the [`FLEET`] account, with the controller (and nothing else).
//! * Each device has an account of its own (named after its id) that holds no streams and
//!   has JetStream off. It reaches exactly its own keys through *service imports* of
//!   subjects that name its key, and receives its manifest and relay requests through
//!   *stream imports* of its own subjects. An answer to a request made through a service
//!   import is delivered back into the importing account, so whatever reply subject a
//!   device picks, the answer lands among its own subjects.
//! * The bridge has the [`BRIDGE`] account: it reads status and heartbeats through
//!   imports (direct gets with a body, and the republished changes), and exports relay
//!   requests and output frames to each device, one device's subjects to that device only.
//!
//! No one but the controller can create a consumer or touch a stream. Device-written
//! buckets refuse rollup headers (a rollup would purge every device's key), and device
//! accounts carry connection, subscription and payload limits ([`DEVICE_LIMITS`]).
//!
//! The same description renders a nats-server configuration with static accounts
//! ([`server_accounts`]) and the account JWTs the controller issues in operator mode.

use std::collections::BTreeMap;

use crate::{
    DeviceId,
    kv::{ACTUAL_STATE, Bucket, DESIRED_STATE, FACTS, HEARTBEAT, MAX_STATUS_BYTES},
    relay,
};

/// The account holding the streams; the controller's.
pub const FLEET: &str = "FLEET";
/// The bridge's account.
pub const BRIDGE: &str = "BRIDGE";

/// A service (requests, answered back into the requester's account) or a stream (messages
/// flowing one way into the importer's account).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Service,
    Stream,
}

/// Which account offers an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exporter {
    Fleet,
    Bridge,
}

impl Exporter {
    pub fn account(self) -> &'static str {
        match self {
            Self::Fleet => FLEET,
            Self::Bridge => BRIDGE,
        }
    }
}

/// An exported subject: either one subject per device (`<prefix><device><suffix>`, imported
/// by that device's account only) or a fixed subject imported by the bridge only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportSubject {
    PerDevice {
        prefix: String,
        suffix: &'static str,
    },
    Bridge(String),
}

impl ExportSubject {
    /// The subject for `device` (per-device exports) or the fixed subject.
    pub fn for_device(&self, device: &DeviceId) -> String {
        match self {
            Self::PerDevice { prefix, suffix } => format!("{prefix}{device}{suffix}"),
            Self::Bridge(s) => s.clone(),
        }
    }

    /// The subject as exported in operator mode: `*` in place of the device.
    pub fn wildcard(&self) -> String {
        match self {
            Self::PerDevice { prefix, suffix } => format!("{prefix}*{suffix}"),
            Self::Bridge(s) => s.clone(),
        }
    }
}

/// One export of [`FLEET`] or [`BRIDGE`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    pub from: Exporter,
    pub kind: Kind,
    pub subject: ExportSubject,
    /// A service answering with several messages (a batch direct get).
    pub streamed_responses: bool,
}

/// One import, in the importing account: the exporter's subject, used under the same name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Import {
    pub from: Exporter,
    pub kind: Kind,
    pub subject: String,
}

fn per_device(prefix: String, suffix: &'static str) -> ExportSubject {
    ExportSubject::PerDevice { prefix, suffix }
}

/// Every export, in a fixed order.
pub fn exports() -> Vec<Export> {
    let device_service = |b: Bucket, direct: bool| Export {
        from: Exporter::Fleet,
        kind: Kind::Service,
        subject: if direct {
            per_device(format!("{}.$KV.{}.", b.direct_get_api(), b.name), "")
        } else {
            per_device(format!("$KV.{}.", b.name), "")
        },
        streamed_responses: false,
    };
    let mut all = vec![
        // A device reads its manifest and its status back (for compare-and-set) ...
        device_service(DESIRED_STATE, true),
        device_service(ACTUAL_STATE, true),
        // ... writes its status, heartbeat and facts (compare-and-set is a header) ...
        device_service(ACTUAL_STATE, false),
        device_service(HEARTBEAT, false),
        device_service(FACTS, false),
        // ... and hears of each new manifest once it is stored.
        Export {
            from: Exporter::Fleet,
            kind: Kind::Stream,
            subject: per_device(
                format!("{}.{}.", crate::kv::CHANGES_PREFIX, DESIRED_STATE.name),
                "",
            ),
            streamed_responses: false,
        },
    ];
    // The bridge reads every device's status, heartbeat and facts: batches of direct gets,
    // and the changes as they are stored.
    for b in [ACTUAL_STATE, HEARTBEAT, FACTS] {
        all.push(Export {
            from: Exporter::Fleet,
            kind: Kind::Service,
            subject: ExportSubject::Bridge(b.direct_get_api()),
            streamed_responses: true,
        });
        all.push(Export {
            from: Exporter::Fleet,
            kind: Kind::Stream,
            subject: ExportSubject::Bridge(b.all_changes()),
            streamed_responses: false,
        });
    }
    // Relay sessions: requests and control messages to one device, its output frames back.
    all.push(Export {
        from: Exporter::Bridge,
        kind: Kind::Stream,
        subject: per_device(relay::SUBJECT_PREFIX.to_owned(), ".>"),
        streamed_responses: false,
    });
    all.push(Export {
        from: Exporter::Bridge,
        kind: Kind::Service,
        subject: per_device(relay::FRAMES_PREFIX.to_owned(), ""),
        streamed_responses: false,
    });
    // A device that lost its state asks the controller for its freshness floor.
    all.push(Export {
        from: Exporter::Fleet,
        kind: Kind::Service,
        subject: per_device(FLOOR_PREFIX.to_owned(), ""),
        streamed_responses: false,
    });
    all
}

/// What `device`'s account imports: its own subjects of every per-device export.
pub fn device_imports(device: &DeviceId) -> Vec<Import> {
    exports()
        .into_iter()
        .filter(|e| matches!(e.subject, ExportSubject::PerDevice { .. }))
        .map(|e| Import {
            from: e.from,
            kind: e.kind,
            subject: e.subject.for_device(device),
        })
        .collect()
}

/// What the bridge's account imports.
pub fn bridge_imports() -> Vec<Import> {
    exports()
        .into_iter()
        .filter(|e| matches!(e.subject, ExportSubject::Bridge(_)))
        .map(|e| Import {
            from: e.from,
            kind: e.kind,
            subject: e.subject.wildcard(),
        })
        .collect()
}

/// Limits on each device account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections at once (a restarted agent may overlap its old, not yet timed-out one).
    pub connections: i64,
    /// Subscriptions across its connections (the agent uses three).
    pub subscriptions: i64,
    /// Largest message it may publish: a status, with room for headers.
    pub payload: i64,
}

/// What a device account may use.
pub const DEVICE_LIMITS: Limits = Limits {
    connections: 4,
    subscriptions: 32,
    payload: (MAX_STATUS_BYTES + 8 * 1024) as i64,
};

/// Subjects a user may publish to and subscribe to inside its account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
    /// Whether it may publish replies to requests it received.
    pub allow_responses: bool,
}

/// A device user's permissions inside its own account: the subjects of its service
/// imports, and subscriptions to its inbox and its stream imports. The account boundary is
/// what isolates devices; these only keep a device from the server's own subjects.
pub fn device(device: &DeviceId) -> Permissions {
    let imports = device_imports(device);
    let of = |kind: Kind| {
        imports
            .iter()
            .filter(|i| i.kind == kind)
            .map(|i| i.subject.clone())
            .collect::<Vec<_>>()
    };
    let mut subscribe = vec!["_INBOX.>".to_owned()];
    subscribe.extend(of(Kind::Stream));
    Permissions {
        publish: of(Kind::Service),
        subscribe,
        allow_responses: false,
    }
}

/// The controller's, in [`FLEET`]: it creates the buckets, writes desired state, removes a
/// deleted device's keys and reads status and heartbeats.
pub fn controller() -> Permissions {
    Permissions {
        publish: vec![
            "$JS.API.>".into(),
            DESIRED_STATE.all_subjects(),
            ACTUAL_STATE.all_subjects(),
            HEARTBEAT.all_subjects(),
            FACTS.all_subjects(),
            // Freshness floors answered to devices (see the agent's manifest checks).
            FLOOR_WILDCARD.into(),
        ],
        subscribe: vec![
            "_INBOX.>".into(),
            DESIRED_STATE.all_changes(),
            ACTUAL_STATE.all_changes(),
            HEARTBEAT.all_changes(),
            FACTS.all_changes(),
            FLOOR_WILDCARD.into(),
        ],
        allow_responses: true,
    }
}

/// The bridge's, in [`BRIDGE`]: its imports, relay requests to devices and their frames.
pub fn bridge() -> Permissions {
    let imports = bridge_imports();
    let mut publish: Vec<String> = imports
        .iter()
        .filter(|i| i.kind == Kind::Service)
        .map(|i| i.subject.clone())
        .collect();
    publish.push(format!("{}*.>", relay::SUBJECT_PREFIX));
    let mut subscribe = vec!["_INBOX.>".to_owned(), relay::ALL_FRAMES.to_owned()];
    subscribe.extend(
        imports
            .iter()
            .filter(|i| i.kind == Kind::Stream)
            .map(|i| i.subject.clone()),
    );
    Permissions {
        publish,
        subscribe,
        allow_responses: false,
    }
}

/// Subject a device asks the controller on for its freshness floor (see
/// [`crate::signing::Floor`]); the controller answers in [`FLEET`].
pub fn floor_subject(device: &DeviceId) -> String {
    format!("{FLOOR_PREFIX}{device}")
}

const FLOOR_PREFIX: &str = "fleetlet.floor.";
/// Every device's floor requests (what the controller answers).
pub const FLOOR_WILDCARD: &str = "fleetlet.floor.*";

/// A user of a static configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    /// Plain text or a bcrypt hash.
    pub password: String,
}

impl User {
    pub fn new(name: &str, password: &str) -> Self {
        Self {
            name: name.to_owned(),
            password: password.to_owned(),
        }
    }
}

/// Who connects: the controller (and optionally an administrator with every right) in
/// [`FLEET`], the bridge, and one user per device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticUsers {
    pub controller: User,
    pub admin: Option<User>,
    pub bridge: User,
    pub devices: Vec<(DeviceId, User)>,
    /// Sites whose devices connect to a leaf node ([`site_accounts`]).
    pub sites: Vec<Site>,
}

/// Devices at one site, behind a nats-server leaf node of their own.
///
/// The central servers hold an account for the site ([`Site::account`]) that imports
/// exactly its devices' subjects, the union of what their own accounts import; the leaf
/// node binds its local [`LEAF_SITE`] account to it with the site's user, over one
/// connection. On the leaf node each device again has an account of its own, importing
/// its subjects from [`LEAF_SITE`], so devices at a site are isolated from one another by
/// the leaf node as they are from the fleet by the central servers, and the site's
/// credentials reach no device of another site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    /// A name with a device id's rules (it names the central account).
    pub name: DeviceId,
    /// The leaf node's user on the central servers (leaf node connections only).
    pub user: User,
    pub devices: Vec<DeviceId>,
}

impl Site {
    /// The site's account on the central servers: `SITE_<name>` (no device id has an
    /// underscore or capitals).
    pub fn account(&self) -> String {
        format!("SITE_{}", self.name)
    }
}

/// The leaf node's account bound to the site's central account.
pub const LEAF_SITE: &str = "SITE";

/// How many leaf node connections a site's account takes at once (a reconnecting leaf
/// node may overlap its old connection for a moment).
const SITE_LEAFNODES: i64 = 2;

fn quoted(v: &[String]) -> String {
    v.iter()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

fn user_entry(user: &User, permissions: Option<&Permissions>) -> String {
    let mut entry = format!(
        "      {{ user: \"{}\", password: \"{}\"",
        user.name, user.password
    );
    if let Some(p) = permissions {
        let responses = if p.allow_responses {
            ", allow_responses: { max: -1, expires: \"1h\" }"
        } else {
            ""
        };
        entry.push_str(&format!(
            ", permissions: {{ publish: {{ allow: [{}] }}, subscribe: {{ allow: [{}] }}{responses} }}",
            quoted(&p.publish),
            quoted(&p.subscribe)
        ));
    }
    entry.push_str(" }\n");
    entry
}

/// An import of `i`'s kind: `subject` of account `from`, used in the importing account as
/// `local`.
fn import_entry(i: &Import, from: &str, subject: &str, local: &str) -> String {
    let kind = match i.kind {
        Kind::Service => "service",
        Kind::Stream => "stream",
    };
    let to = if subject == local {
        String::new()
    } else {
        format!(", to: \"{local}\"")
    };
    format!("      {{ {kind}: {{ account: \"{from}\", subject: \"{subject}\" }}{to} }}\n")
}

/// The subject a device's `subject` travels under between a leaf node and the central
/// servers. nats-server keeps `$JS.API.>` and `$KV.>` off leaf node links (they belong to
/// each side's own JetStream), so those go over as `fleetlet.site.JS.API...` and
/// `fleetlet.site.KV...`, and each end maps them back; other subjects keep their names.
pub fn site_subject(subject: &str) -> String {
    match subject.strip_prefix('$') {
        Some(rest) => format!("{SITE_PREFIX}{rest}"),
        None => subject.to_owned(),
    }
}

const SITE_PREFIX: &str = "fleetlet.site.";

fn export_entry(e: &Export, subject: &str, to: &[&str]) -> String {
    let kind = match e.kind {
        Kind::Service => "service",
        Kind::Stream => "stream",
    };
    let response = if e.streamed_responses {
        ", response_type: \"stream\""
    } else {
        ""
    };
    let to: Vec<String> = to.iter().map(|a| (*a).to_owned()).collect();
    format!(
        "      {{ {kind}: \"{subject}\", accounts: [{}]{response} }}\n",
        quoted(&to)
    )
}

/// A device's account: its user, its imports from `from` (`None`: from their exporters)
/// and [`DEVICE_LIMITS`].
fn device_account(d: &DeviceId, user: &User, from: Option<&str>) -> String {
    let imports: String = device_imports(d)
        .iter()
        .map(|i| match from {
            Some(site) => import_entry(i, site, &site_subject(&i.subject), &i.subject),
            None => import_entry(i, i.from.account(), &i.subject, &i.subject),
        })
        .collect();
    let l = DEVICE_LIMITS;
    format!(
        "  \"{d}\" {{\n    users: [\n{}    ]\n    imports: [\n{imports}    ]\n    limits: {{ max_connections: {}, max_subscriptions: {}, max_payload: {}, max_leafnodes: 0 }}\n  }}\n",
        user_entry(user, Some(&device(d))),
        l.connections,
        l.subscriptions,
        l.payload,
    )
}

/// The `accounts { ... }` block of a nats-server configuration (no operator, no JWTs) for
/// these users: [`FLEET`] with JetStream, [`BRIDGE`], one account per device with
/// [`DEVICE_LIMITS`], and one per site. Each per-device export is listed once per device,
/// for that device's account and the accounts of the sites holding it only.
pub fn server_accounts(users: &StaticUsers) -> String {
    // The accounts each device's subjects are exported to: its own, then its sites'.
    let mut export_to: BTreeMap<&DeviceId, Vec<String>> = users
        .devices
        .iter()
        .map(|(d, _)| (d, vec![d.as_str().to_owned()]))
        .collect();
    for site in &users.sites {
        for d in &site.devices {
            if let Some(to) = export_to.get_mut(d) {
                to.push(site.account());
            }
        }
    }
    let mut fleet_exports = String::new();
    let mut bridge_exports = String::new();
    for e in &exports() {
        let out = match e.from {
            Exporter::Fleet => &mut fleet_exports,
            Exporter::Bridge => &mut bridge_exports,
        };
        match &e.subject {
            ExportSubject::Bridge(s) => out.push_str(&export_entry(e, s, &[BRIDGE])),
            ExportSubject::PerDevice { .. } => {
                for (d, _) in &users.devices {
                    let to: Vec<&str> = export_to
                        .get(d)
                        .into_iter()
                        .flatten()
                        .map(String::as_str)
                        .collect();
                    out.push_str(&export_entry(e, &e.subject.for_device(d), &to));
                }
            }
        }
    }
    let mut text = String::from("accounts {\n");
    let mut fleet_users = user_entry(&users.controller, Some(&controller()));
    if let Some(admin) = &users.admin {
        fleet_users.push_str(&user_entry(admin, None));
    }
    text.push_str(&format!(
        "  {FLEET} {{\n    jetstream: enabled\n    users: [\n{fleet_users}    ]\n    exports: [\n{fleet_exports}    ]\n  }}\n"
    ));
    let bridge_imports: String = bridge_imports()
        .iter()
        .map(|i| import_entry(i, i.from.account(), &i.subject, &i.subject))
        .collect();
    text.push_str(&format!(
        "  {BRIDGE} {{\n    users: [\n{}    ]\n    imports: [\n{bridge_imports}    ]\n    exports: [\n{bridge_exports}    ]\n  }}\n",
        user_entry(&users.bridge, Some(&bridge()))
    ));
    for (d, user) in &users.devices {
        text.push_str(&device_account(d, user, None));
    }
    for site in &users.sites {
        // Only the devices the configuration also has accounts for: an export to the site
        // exists for those alone.
        let imports: String = site
            .devices
            .iter()
            .filter(|d| export_to.contains_key(d))
            .flat_map(device_imports)
            // Imported from the exporter under its name, used here under the name it
            // crosses the leaf node link with.
            .map(|i| import_entry(&i, i.from.account(), &i.subject, &site_subject(&i.subject)))
            .collect();
        text.push_str(&format!(
            "  \"{}\" {{\n    users: [\n      {{ user: \"{}\", password: \"{}\", allowed_connection_types: [\"LEAFNODE\"] }}\n    ]\n    imports: [\n{imports}    ]\n    limits: {{ max_connections: 0, max_leafnodes: {SITE_LEAFNODES} }}\n  }}\n",
            site.account(),
            site.user.name,
            site.user.password,
        ));
    }
    text.push_str("}\n");
    text
}

/// The `accounts { ... }` block of a site's leaf node: [`LEAF_SITE`], which the leaf node
/// binds to the site's central account ([`site_leafnode`]) and which exports each device's
/// subjects to that device only, and one account per device, importing them from it.
/// JetStream stays off: requests reach the central servers' streams through the link.
pub fn site_accounts(devices: &[(DeviceId, User)]) -> String {
    let mut site_exports = String::new();
    for e in &exports() {
        if matches!(e.subject, ExportSubject::PerDevice { .. }) {
            for (d, _) in devices {
                let subject = site_subject(&e.subject.for_device(d));
                site_exports.push_str(&export_entry(e, &subject, &[d.as_str()]));
            }
        }
    }
    let mut text =
        format!("accounts {{\n  {LEAF_SITE} {{\n    exports: [\n{site_exports}    ]\n  }}\n");
    for (d, user) in devices {
        text.push_str(&device_account(d, user, Some(LEAF_SITE)));
    }
    text.push_str("}\n");
    text
}

/// The leaf node's link to the central servers: `urls` are their leaf node listeners
/// (`nats-leaf://host:7422`, or `tls://host:7422`), and the site's `user` signs in on each
/// (its name and password go into the URLs, percent-encoded).
pub fn site_leafnode(urls: &[String], user: &User) -> String {
    let encode = |s: &str| -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    char::from(b).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    };
    let signed: Vec<String> = urls
        .iter()
        .map(|u| {
            let (scheme, rest) = u.split_once("://").unwrap_or(("nats-leaf", u));
            format!(
                "{scheme}://{}:{}@{rest}",
                encode(&user.name),
                encode(&user.password)
            )
        })
        .collect();
    format!(
        "leafnodes {{\n  remotes: [\n    {{ urls: [{}], account: \"{LEAF_SITE}\" }}\n  ]\n}}\n",
        quoted(&signed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pi(name: &str) -> DeviceId {
        DeviceId::new(name).unwrap()
    }

    #[test]
    fn a_device_imports_only_subjects_naming_itself() {
        let d = pi("pi-a");
        for i in device_imports(&d) {
            let tokens: Vec<&str> = i.subject.split('.').collect();
            assert!(tokens.contains(&"pi-a"), "{i:?}");
            // Services are single subjects (an import of a wildcard service is refused in
            // operator mode); only relay requests are a subtree of its own.
            match i.kind {
                Kind::Service => assert!(!i.subject.contains('*') && !i.subject.contains('>')),
                Kind::Stream => assert!(!i.subject.contains('*'), "{i:?}"),
            }
        }
        let p = device(&d);
        assert!(p.publish.iter().all(|s| s.contains("pi-a")), "{p:?}");
        assert!(!p.allow_responses);
    }

    #[test]
    fn the_bridge_reaches_no_desired_state_and_writes_no_key() {
        let p = bridge();
        for s in p.publish.iter().chain(&p.subscribe) {
            assert!(!s.contains("desired-state"), "{s}");
            assert!(!s.starts_with("$KV."), "{s}");
        }
        for i in bridge_imports() {
            assert!(!i.subject.contains("desired-state"), "{i:?}");
        }
    }

    #[test]
    fn the_static_configuration_lists_each_device_export_for_that_device_only() {
        let users = StaticUsers {
            controller: User::new("controller", "c"),
            admin: None,
            bridge: User::new("bridge", "b"),
            devices: vec![(pi("pi-a"), User::new("pi-a", "a"))],
            sites: Vec::new(),
        };
        let text = server_accounts(&users);
        assert!(text.contains("{ service: \"$KV.actual-state.pi-a\", accounts: [\"pi-a\"] }"));
        assert!(text.contains("max_connections: 4"));
        assert!(!text.contains("$KV.actual-state.*"));
    }

    #[test]
    fn a_site_account_imports_its_own_devices_subjects_and_takes_leaf_nodes_only() {
        let site = Site {
            name: pi("shop"),
            user: User::new("shop", "s"),
            devices: vec![pi("pi-a"), pi("pi-z")],
        };
        let users = StaticUsers {
            controller: User::new("controller", "c"),
            admin: None,
            bridge: User::new("bridge", "b"),
            devices: vec![
                (pi("pi-a"), User::new("pi-a", "a")),
                (pi("pi-b"), User::new("pi-b", "b")),
            ],
            sites: vec![site.clone()],
        };
        let text = server_accounts(&users);
        assert!(text.contains(
            "{ service: \"$KV.actual-state.pi-a\", accounts: [\"pi-a\", \"SITE_shop\"] }"
        ));
        assert!(text.contains("{ service: \"$KV.actual-state.pi-b\", accounts: [\"pi-b\"] }"));
        let account = &text[text.find("\"SITE_shop\" {").unwrap()..];
        assert!(account.contains("allowed_connection_types: [\"LEAFNODE\"]"));
        assert!(account.contains("max_connections: 0"));
        // Its devices' subjects, not another's, and not a device it has no account for.
        assert!(account.contains("\"$KV.actual-state.pi-a\""));
        assert!(!account.contains("pi-b"));
        assert!(!account.contains("pi-z"));

        let leaf = site_accounts(&[(pi("pi-a"), User::new("pi-a", "a"))]);
        // Subjects nats-server keeps off leaf node links cross it under other names.
        assert!(leaf.contains(
            "{ service: { account: \"SITE\", subject: \"fleetlet.site.KV.actual-state.pi-a\" }, to: \"$KV.actual-state.pi-a\" }"
        ));
        assert!(account.contains(
            "{ service: { account: \"FLEET\", subject: \"$KV.actual-state.pi-a\" }, to: \"fleetlet.site.KV.actual-state.pi-a\" }"
        ));
        assert!(leaf.contains(
            "{ stream: { account: \"SITE\", subject: \"fleetlet.kv.desired-state.pi-a\" } }"
        ));
        assert!(!leaf.contains("jetstream"));
        let link = site_leafnode(
            &["nats-leaf://127.0.0.1:7422".into()],
            &User::new("shop", "p@ss/word"),
        );
        assert!(
            link.contains("\"nats-leaf://shop:p%40ss%2Fword@127.0.0.1:7422\""),
            "{link}"
        );
    }
}
