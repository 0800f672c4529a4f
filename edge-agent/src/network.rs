//! The NetworkConfig reconciler: systemd-networkd's `.network` / `.netdev` files, plus
//! networkd's D-Bus API (`org.freedesktop.network1`) to reload them and to look at links.
//!
//! Every file the agent writes starts with a marker line naming the device and resource;
//! only files with this resource's marker are ever replaced or removed.
//!
//! A change is applied as a router's "confirm or revert": before writing, the files it
//! replaces are saved in the state directory (`network/<interface>.pending`); after
//! networkd has applied the change the agent must reach its control plane (a NATS
//! round trip) within the confirm deadline, or it restores the saved files, reloads
//! networkd and reports the resource Failed. A pending record that outlives the agent (a
//! crash or power cut in the window) is confirmed or rolled back on the next pass. A
//! rolled-back spec is remembered and not applied again; only a new spec is.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use fleetlet_protocol::{Cidr, DeviceId, NetworkConfigSpec, ResourceDetails, ResourceId};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;
use tracing::{info, warn};
use zbus::{Connection, OwnedObjectPath};

use crate::{
    config::{ConfigError, invalid},
    fsutil::{Ownership, write_atomic},
    reconciler::{Deleted, Observation, ReconcileError, Reconciler},
    systemd::bus_err,
};

#[zbus::proxy(
    interface = "org.freedesktop.network1.Manager",
    default_service = "org.freedesktop.network1",
    default_path = "/org/freedesktop/network1"
)]
trait NetworkManager {
    fn reload(&self) -> zbus::Result<()>;
    fn get_link_by_name(&self, name: &str) -> zbus::Result<(i32, OwnedObjectPath)>;
}

#[zbus::proxy(
    interface = "org.freedesktop.network1.Link",
    default_service = "org.freedesktop.network1"
)]
trait Link {
    #[zbus(property)]
    fn operational_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn administrative_state(&self) -> zbus::Result<String>;
    fn reconfigure(&self) -> zbus::Result<()>;
    fn describe(&self) -> zbus::Result<String>;
}

/// The `[network]` section of the agent's config file. NetworkConfig resources run only
/// where the owner adds `"networkConfig"` to `reconcile.enabled_kinds`: the device must
/// use systemd-networkd for the interfaces manifests configure.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// Where `.network` and `.netdev` files are written.
    #[serde(default = "default_dir")]
    pub dir: PathBuf,
    /// How long the device may go without reaching its control plane after a change
    /// before the change is rolled back (a resource's `confirmSeconds` overrides it).
    #[serde(default = "default_confirm")]
    pub confirm_seconds: u32,
    /// Longest wait for networkd to configure a link after a change.
    #[serde(default = "default_settle")]
    pub settle_seconds: u32,
    /// Interfaces manifests may configure, by name (a trailing `*` matches any rest:
    /// `eth*`). Empty: every interface but `lo`.
    #[serde(default)]
    pub interfaces: Vec<String>,
}

fn default_dir() -> PathBuf {
    PathBuf::from("/etc/systemd/network")
}
fn default_confirm() -> u32 {
    60
}
fn default_settle() -> u32 {
    20
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            dir: default_dir(),
            confirm_seconds: default_confirm(),
            settle_seconds: default_settle(),
            interfaces: Vec::new(),
        }
    }
}

impl NetworkConfig {
    pub fn check(&self) -> Result<(), ConfigError> {
        if !self.dir.is_absolute() {
            return Err(invalid("network.dir", "must be an absolute path"));
        }
        if !fleetlet_protocol::network::CONFIRM_SECONDS.contains(&self.confirm_seconds) {
            return Err(invalid(
                "network.confirm_seconds",
                "must be between 5 and 3600",
            ));
        }
        if !(1..=600).contains(&self.settle_seconds) {
            return Err(invalid(
                "network.settle_seconds",
                "must be between 1 and 600",
            ));
        }
        Ok(())
    }

    /// Why the owner's policy keeps manifests off `interface`, if it does.
    fn refuses(&self, interface: &str) -> Option<String> {
        let allowed = self.interfaces.is_empty()
            || self.interfaces.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => interface.starts_with(prefix),
                None => p == interface,
            });
        (!allowed).then(|| {
            format!(
                "interface {interface} is not one this device lets manifests configure \
                 ([network] interfaces = {:?})",
                self.interfaces
            )
        })
    }
}

/// Whether the device reaches its control plane: checked after a network change.
#[derive(Clone)]
pub struct Uplink(Arc<dyn Fn() -> BoxFuture<'static, bool> + Send + Sync>);

impl std::fmt::Debug for Uplink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Uplink")
    }
}

impl Uplink {
    /// A read of the device's own desired-state key within 3 s: a round trip through the
    /// NATS server to JetStream (a client-side flush only proves the bytes reached the
    /// socket).
    pub fn nats(client: async_nats::Client, device: DeviceId) -> Self {
        Self(Arc::new(move || {
            let (client, device) = (client.clone(), device.clone());
            Box::pin(async move {
                let read = crate::nats::get(&client, fleetlet_protocol::kv::DESIRED_STATE, &device);
                matches!(
                    tokio::time::timeout(Duration::from_secs(3), read).await,
                    Ok(Ok(_))
                )
            })
        }))
    }

    /// An uplink decided by `check` (tests).
    pub fn from_fn(check: impl Fn() -> BoxFuture<'static, bool> + Send + Sync + 'static) -> Self {
        Self(Arc::new(check))
    }

    pub(crate) async fn reachable(&self) -> bool {
        (self.0)().await
    }
}

/// A file as it was before a change: its bytes, or `None` when it did not exist.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Saved {
    path: PathBuf,
    contents: Option<String>,
}

/// A change applied and not yet confirmed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Pending {
    /// Digest of the files the change wrote (see [`Rendered::digest`]).
    digest: String,
    previous: Vec<Saved>,
}

/// The files one spec asks for.
#[derive(Debug, Clone, PartialEq)]
struct Rendered {
    files: Vec<(PathBuf, String)>,
}

impl Rendered {
    fn digest(&self) -> String {
        let mut h = Sha256::new();
        for (path, text) in &self.files {
            h.update(path.as_os_str().as_encoded_bytes());
            h.update([0]);
            h.update(text.as_bytes());
            h.update([0]);
        }
        crate::file::hex(&h.finalize())
    }
}

/// What networkd and the kernel say about one link.
#[derive(Debug, Clone, PartialEq)]
struct LinkView {
    operational: String,
    administrative: String,
    addresses: Vec<Cidr>,
    /// The `.network` file networkd applied to the link, if any.
    network_file: Option<PathBuf>,
}

impl LinkView {
    fn details(&self) -> ResourceDetails {
        ResourceDetails::NetworkConfig {
            operational_state: self.operational.clone(),
            administrative_state: self.administrative.clone(),
            addresses: self.addresses.iter().map(ToString::to_string).collect(),
        }
    }
}

/// The addresses and `.network` file in networkd's JSON description of a link
/// (`Link.Describe`): `Addresses[].Address` is an array of bytes (4 or 16) with
/// `PrefixLength` beside it.
fn parse_description(json: &str) -> Result<(Vec<Cidr>, Option<PathBuf>), String> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("networkd's link description: {e}"))?;
    let mut addresses = Vec::new();
    for a in v["Addresses"].as_array().into_iter().flatten() {
        let bytes: Vec<u8> = a["Address"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
            .collect();
        let addr = match bytes.len() {
            4 => std::net::IpAddr::from(<[u8; 4]>::try_from(bytes.as_slice()).map_err(|_| "")?),
            16 => std::net::IpAddr::from(<[u8; 16]>::try_from(bytes.as_slice()).map_err(|_| "")?),
            _ => continue,
        };
        let Some(prefix) = a["PrefixLength"]
            .as_u64()
            .and_then(|p| u8::try_from(p).ok())
        else {
            continue;
        };
        addresses.push(Cidr { addr, prefix });
    }
    addresses.sort();
    addresses.dedup();
    let file = v["NetworkFile"].as_str().map(PathBuf::from);
    Ok((addresses, file))
}

#[derive(Debug, Clone)]
pub struct NetworkReconciler {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: NetworkConfig,
    bus_address: Option<String>,
    device: DeviceId,
    /// `<state_dir>/network`: pending and rolled-back records.
    state: PathBuf,
    conn: Mutex<Option<Connection>>,
    uplink: std::sync::OnceLock<Uplink>,
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> ReconcileError {
    move |e| ReconcileError::io(context, e)
}

/// Reads `path`, `None` when it does not exist.
fn read_optional(path: &Path) -> Result<Option<String>, ReconcileError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ReconcileError::io(format!("reading {}", path.display()), e)),
    }
}

impl NetworkReconciler {
    pub fn new(
        config: NetworkConfig,
        bus_address: Option<String>,
        device: DeviceId,
        state_dir: &Path,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                bus_address,
                device,
                state: state_dir.join("network"),
                conn: Mutex::new(None),
                uplink: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Checks the control plane is reachable after each change (set once, when the agent
    /// is connected); without one, changes are not confirmed.
    pub fn set_uplink(&self, uplink: Uplink) {
        let _ = self.inner.uplink.set(uplink);
    }

    fn marker(&self, id: &ResourceId) -> String {
        format!(
            "# Managed by fleetlet (device {}, resource {id}); local edits are replaced.\n",
            self.inner.device
        )
    }

    fn network_path(&self, interface: &str) -> PathBuf {
        self.inner
            .config
            .dir
            .join(format!("10-fleetlet-{interface}.network"))
    }

    fn netdev_path(&self, vlan: &str) -> PathBuf {
        self.inner
            .config
            .dir
            .join(format!("10-fleetlet-{vlan}.netdev"))
    }

    /// The `.network` file for `spec` and a `.netdev` per VLAN it carries.
    fn render(&self, id: &ResourceId, spec: &NetworkConfigSpec) -> Rendered {
        let marker = self.marker(id);
        let mut n = format!("{marker}[Match]\nName={}\n", spec.interface);
        if let Some(mtu) = spec.mtu {
            n.push_str(&format!("\n[Link]\nMTUBytes={mtu}\n"));
        }
        n.push_str(&format!(
            "\n[Network]\nDHCP={}\n",
            if spec.dhcp { "yes" } else { "no" }
        ));
        for a in &spec.addresses {
            n.push_str(&format!("Address={a}\n"));
        }
        if let Some(g) = &spec.gateway {
            n.push_str(&format!("Gateway={g}\n"));
        }
        for d in &spec.dns {
            n.push_str(&format!("DNS={d}\n"));
        }
        if !spec.domains.is_empty() {
            n.push_str(&format!("Domains={}\n", spec.domains.join(" ")));
        }
        for v in &spec.vlans {
            n.push_str(&format!("VLAN={}\n", v.name));
        }
        for r in &spec.routes {
            n.push_str(&format!("\n[Route]\nDestination={}\n", r.destination));
            if let Some(g) = &r.gateway {
                n.push_str(&format!("Gateway={g}\n"));
            }
            if let Some(m) = r.metric {
                n.push_str(&format!("Metric={m}\n"));
            }
        }
        let mut files = vec![(self.network_path(&spec.interface), n)];
        for v in &spec.vlans {
            files.push((
                self.netdev_path(&v.name),
                format!(
                    "{marker}[NetDev]\nName={}\nKind=vlan\n\n[VLAN]\nId={}\n",
                    v.name, v.id
                ),
            ));
        }
        Rendered { files }
    }

    /// Refuses what the spec or the owner's policy does not allow, and files another
    /// resource (or the owner) wrote.
    fn check(
        &self,
        id: &ResourceId,
        spec: &NetworkConfigSpec,
        rendered: &Rendered,
    ) -> Result<(), ReconcileError> {
        spec.validate()
            .map_err(|e| ReconcileError::Invalid(e.to_string()))?;
        let c = &self.inner.config;
        for name in std::iter::once(&spec.interface).chain(spec.vlans.iter().map(|v| &v.name)) {
            if let Some(why) = c.refuses(name) {
                return Err(ReconcileError::Forbidden(why));
            }
        }
        let ours = self.marker(id);
        for (path, _) in &rendered.files {
            if let Some(text) = read_optional(path)?
                && !text.starts_with(&ours)
            {
                let first = text.lines().next().unwrap_or_default();
                return Err(ReconcileError::Forbidden(
                    if first.starts_with("# Managed by fleetlet") {
                        format!("{} is another resource's: {first}", path.display())
                    } else {
                        format!("{} exists and was not written by fleetlet", path.display())
                    },
                ));
            }
        }
        Ok(())
    }

    /// Files in the directory with this resource's marker that `rendered` no longer holds
    /// (a VLAN dropped from the spec, the old interface's file).
    fn stale(&self, id: &ResourceId, rendered: &Rendered) -> Vec<PathBuf> {
        let ours = self.marker(id);
        let wanted: BTreeSet<&PathBuf> = rendered.files.iter().map(|(p, _)| p).collect();
        let Ok(entries) = std::fs::read_dir(&self.inner.config.dir) else {
            return Vec::new();
        };
        let mut out: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("10-fleetlet-"))
                    && !wanted.contains(p)
                    && std::fs::read_to_string(p).is_ok_and(|t| t.starts_with(&ours))
            })
            .collect();
        out.sort();
        out
    }

    fn record_path(&self, interface: &str, what: &str) -> PathBuf {
        self.inner.state.join(format!("{interface}.{what}"))
    }

    fn load<T: for<'de> Deserialize<'de>>(&self, path: &Path) -> Result<Option<T>, ReconcileError> {
        match read_optional(path)? {
            None => Ok(None),
            Some(text) => match serde_json::from_str(&text) {
                Ok(v) => Ok(Some(v)),
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "unreadable network record, ignored");
                    Ok(None)
                }
            },
        }
    }

    fn store<T: Serialize>(&self, path: &Path, value: &T) -> Result<(), ReconcileError> {
        std::fs::create_dir_all(&self.inner.state)
            .map_err(io(format!("creating {}", self.inner.state.display())))?;
        let bytes = serde_json::to_vec(value)
            .map_err(|e| ReconcileError::Runtime(format!("encoding a network record: {e}")))?;
        write_atomic(path, &bytes, 0o600, Ownership::default())
            .map_err(io(format!("writing {}", path.display())))
    }

    fn forget(&self, path: &Path) -> Result<(), ReconcileError> {
        crate::fsutil::remove_if_exists(path)
            .map_err(|e| ReconcileError::io(format!("removing {}", path.display()), e))
    }

    async fn connection(&self) -> Result<Connection, ReconcileError> {
        let mut guard = self.inner.conn.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let address = self
            .inner
            .bus_address
            .clone()
            .or_else(|| std::env::var("DBUS_SYSTEM_BUS_ADDRESS").ok());
        let builder = match &address {
            Some(a) => zbus::connection::Builder::address(a.as_str()),
            None => zbus::connection::Builder::system(),
        };
        let conn = builder
            .build()
            .await
            .map_err(|e| bus_err("connecting to the system bus", e))?;
        *guard = Some(conn.clone());
        Ok(conn)
    }

    /// Runs `f` on networkd's manager; a broken connection is dropped for the next call.
    async fn manager(&self) -> Result<NetworkManagerProxy<'static>, ReconcileError> {
        let conn = self.connection().await?;
        NetworkManagerProxy::new(&conn)
            .await
            .map_err(|e| bus_err("systemd-networkd", e))
    }

    async fn reload(&self) -> Result<(), ReconcileError> {
        let m = self.manager().await?;
        if let Err(e) = m.reload().await {
            *self.inner.conn.lock().await = None;
            return Err(bus_err(
                "asking systemd-networkd to reload (is it running?)",
                e,
            ));
        }
        Ok(())
    }

    /// The link's proxy, `None` when the kernel has no such interface.
    async fn link(&self, interface: &str) -> Result<Option<LinkProxy<'static>>, ReconcileError> {
        let m = self.manager().await?;
        let path = match m.get_link_by_name(interface).await {
            Ok((_, path)) => path,
            Err(zbus::Error::MethodError(name, _, _))
                if name.as_str().ends_with("NoSuchLink")
                    || name.as_str().ends_with("UnknownObject") =>
            {
                return Ok(None);
            }
            Err(e) => {
                *self.inner.conn.lock().await = None;
                return Err(bus_err(&format!("looking up {interface}"), e));
            }
        };
        let conn = self.connection().await?;
        let link = LinkProxy::builder(&conn)
            .path(path)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .map_err(|e| bus_err("link", e))?;
        Ok(Some(link))
    }

    async fn view(&self, interface: &str) -> Result<Option<LinkView>, ReconcileError> {
        let Some(link) = self.link(interface).await? else {
            return Ok(None);
        };
        let ctx = |what: &str| format!("reading {interface}'s {what}");
        let operational = link
            .operational_state()
            .await
            .map_err(|e| bus_err(&ctx("operational state"), e))?;
        let administrative = link
            .administrative_state()
            .await
            .map_err(|e| bus_err(&ctx("administrative state"), e))?;
        let json = link
            .describe()
            .await
            .map_err(|e| bus_err(&ctx("description"), e))?;
        let (addresses, network_file) = parse_description(&json)
            .map_err(|e| ReconcileError::Runtime(format!("{interface}: {e}")))?;
        Ok(Some(LinkView {
            operational,
            administrative,
            addresses,
            network_file,
        }))
    }

    /// Waits until networkd is done with `interface` (configured, failed, unmanaged) or
    /// the settle time is over; the last view, `None` if the link is not there (after a
    /// change, `changed`, waited for a few seconds: another resource's `.netdev` may be
    /// creating it).
    async fn settle(
        &self,
        spec: &NetworkConfigSpec,
        changed: bool,
    ) -> Result<Option<LinkView>, ReconcileError> {
        let start = tokio::time::Instant::now();
        let deadline = start + Duration::from_secs(u64::from(self.inner.config.settle_seconds));
        let absent_deadline = start + Duration::from_secs(if changed { 3 } else { 0 });
        loop {
            let view = self.view(&spec.interface).await?;
            let done = view.as_ref().is_some_and(|v| {
                // "configuring" lasts while networkd waits for a router advertisement
                // (about 12 s when none comes); static addresses are in place before.
                !matches!(v.administrative.as_str(), "pending" | "initialized")
                    && missing(spec, v).is_none()
            });
            let now = tokio::time::Instant::now();
            if done || (view.is_none() && now >= absent_deadline) || now >= deadline {
                return Ok(view);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Whether the control plane answers now (`true` without an uplink to ask).
    async fn reachable_now(&self) -> bool {
        match self.inner.uplink.get() {
            Some(u) => u.reachable().await,
            None => true,
        }
    }

    /// Waits for the control plane for the spec's confirm time; `true` when it answered.
    async fn confirmed(&self, spec: &NetworkConfigSpec) -> bool {
        let Some(uplink) = self.inner.uplink.get() else {
            return true;
        };
        let seconds = spec
            .confirm_seconds
            .unwrap_or(self.inner.config.confirm_seconds);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(u64::from(seconds));
        // A moment for the old path to go: an address being removed can still carry
        // the first round trip.
        tokio::time::sleep(Duration::from_secs(1)).await;
        loop {
            if uplink.reachable().await {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// The files writing `rendered` and removing `stale` would replace, as they are now;
    /// `None` when nothing would change.
    fn previous_of(
        &self,
        rendered: &Rendered,
        stale: &[PathBuf],
    ) -> Result<Option<Vec<Saved>>, ReconcileError> {
        let mut previous = Vec::new();
        for (path, text) in &rendered.files {
            let before = read_optional(path)?;
            if before.as_deref() != Some(text.as_str()) {
                previous.push(Saved {
                    path: path.clone(),
                    contents: before,
                });
            }
        }
        for path in stale {
            previous.push(Saved {
                path: path.clone(),
                contents: read_optional(path)?,
            });
        }
        if previous.is_empty() {
            return Ok(None);
        }
        Ok(Some(previous))
    }

    fn apply_files(&self, rendered: &Rendered, stale: &[PathBuf]) -> Result<(), ReconcileError> {
        std::fs::create_dir_all(&self.inner.config.dir)
            .map_err(io(format!("creating {}", self.inner.config.dir.display())))?;
        for (path, text) in &rendered.files {
            if read_optional(path)?.as_deref() != Some(text.as_str()) {
                write_atomic(path, text.as_bytes(), 0o644, Ownership::default())
                    .map_err(io(format!("writing {}", path.display())))?;
            }
        }
        for path in stale {
            self.forget(path)?;
        }
        Ok(())
    }

    /// Puts back the files a change replaced.
    fn restore(&self, previous: &[Saved]) -> Result<(), ReconcileError> {
        for s in previous {
            match &s.contents {
                Some(text) => write_atomic(&s.path, text.as_bytes(), 0o644, Ownership::default())
                    .map_err(io(format!("restoring {}", s.path.display())))?,
                None => self.forget(&s.path)?,
            }
        }
        Ok(())
    }

    /// Refuses the files `digest` names on `interface` when they were rolled back: only a
    /// new spec is applied after that.
    fn refuse_rolled_back(&self, interface: &str, digest: &str) -> Result<(), ReconcileError> {
        let rolled_back: Option<String> = self.load(&self.record_path(interface, "rolled-back"))?;
        if rolled_back.as_deref() == Some(digest) {
            return Err(ReconcileError::RolledBack(format!(
                "this configuration of {interface} was rolled back (the device lost its control \
                 plane); only a new spec is applied"
            )));
        }
        Ok(())
    }

    /// Confirms the pending change on `interface` or rolls it back.
    async fn confirm_or_revert(
        &self,
        spec: &NetworkConfigSpec,
        pending: Pending,
    ) -> Result<(), ReconcileError> {
        let interface = &spec.interface;
        let pending_path = self.record_path(interface, "pending");
        if self.confirmed(spec).await {
            return self.forget(&pending_path);
        }
        let seconds = spec
            .confirm_seconds
            .unwrap_or(self.inner.config.confirm_seconds);
        warn!(
            interface,
            "control plane unreachable after a network change; rolling back"
        );
        self.restore(&pending.previous)?;
        self.store(&self.record_path(interface, "rolled-back"), &pending.digest)?;
        self.forget(&pending_path)?;
        self.reload().await?;
        Err(ReconcileError::RolledBack(format!(
            "the device did not reach its control plane within {seconds} s of applying this \
             configuration to {interface}; the previous configuration was restored"
        )))
    }
}

/// What `view` lacks of `spec`, if anything.
fn missing(spec: &NetworkConfigSpec, view: &LinkView) -> Option<String> {
    let absent: Vec<&String> = spec
        .addresses
        .iter()
        .filter(|a| {
            a.parse::<Cidr>()
                .map(|c| !view.addresses.contains(&c))
                .unwrap_or(true)
        })
        .collect();
    (!absent.is_empty()).then(|| {
        format!(
            "{} lacks {}",
            spec.interface,
            absent
                .iter()
                .map(|a| a.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

impl NetworkReconciler {
    /// Ready details for a settled link, or why it is not as specified.
    fn outcome(
        &self,
        spec: &NetworkConfigSpec,
        view: Option<LinkView>,
    ) -> Result<ResourceDetails, ReconcileError> {
        let interface = &spec.interface;
        let Some(view) = view else {
            return Err(ReconcileError::Runtime(format!(
                "interface {interface} does not exist on this device; its configuration is in \
                 place for when it appears"
            )));
        };
        let ours = self.network_path(interface);
        match &view.network_file {
            Some(f) if *f != ours => {
                return Err(ReconcileError::Runtime(format!(
                    "systemd-networkd configures {interface} from {}, which comes before {}",
                    f.display(),
                    ours.display()
                )));
            }
            _ => {}
        }
        if view.administrative == "failed" {
            return Err(ReconcileError::Runtime(format!(
                "systemd-networkd failed to configure {interface} (see its journal)"
            )));
        }
        if let Some(why) = missing(spec, &view) {
            return Err(ReconcileError::Runtime(why));
        }
        Ok(view.details())
    }
}

impl Reconciler for NetworkReconciler {
    type Spec = NetworkConfigSpec;

    async fn observe(
        &self,
        id: &ResourceId,
        spec: &NetworkConfigSpec,
    ) -> Result<Observation, ReconcileError> {
        let rendered = self.render(id, spec);
        self.check(id, spec, &rendered)?;
        let iface = &spec.interface;
        self.refuse_rolled_back(iface, &rendered.digest())?;
        if self
            .load::<Pending>(&self.record_path(iface, "pending"))?
            .is_some()
        {
            return Ok(Observation::Differs(format!(
                "a change to {iface} awaits confirmation"
            )));
        }
        for (path, text) in &rendered.files {
            if read_optional(path)?.as_deref() != Some(text.as_str()) {
                return Ok(Observation::Differs(format!("{} differs", path.display())));
            }
        }
        if let Some(p) = self.stale(id, &rendered).first() {
            return Ok(Observation::Differs(format!(
                "{} is left over",
                p.display()
            )));
        }
        let Some(view) = self.view(iface).await? else {
            return Ok(Observation::Absent);
        };
        if let Some(why) = missing(spec, &view) {
            return Ok(Observation::Differs(why));
        }
        if !matches!(view.administrative.as_str(), "configured" | "configuring") {
            return Ok(Observation::Differs(format!(
                "{iface} is {} to systemd-networkd",
                view.administrative
            )));
        }
        Ok(Observation::InSync(view.details()))
    }

    async fn reconcile(
        &self,
        id: &ResourceId,
        spec: &NetworkConfigSpec,
    ) -> Result<ResourceDetails, ReconcileError> {
        let rendered = self.render(id, spec);
        self.check(id, spec, &rendered)?;
        let iface = &spec.interface;
        let digest = rendered.digest();
        self.refuse_rolled_back(iface, &digest)?;
        let pending_path = self.record_path(iface, "pending");
        let stale = self.stale(id, &rendered);
        // A change still unconfirmed keeps the files from before it as the ones to go
        // back to.
        let mut pending: Option<Pending> = self.load(&pending_path)?;
        if let Some(previous) = self.previous_of(&rendered, &stale)? {
            let record = match pending.take() {
                Some(p) => Some(Pending { digest, ..p }),
                // A change made while the control plane is already out of reach cannot
                // be judged by it: applied without a confirm window (a device that is
                // offline keeps its manifest in force).
                None if !self.reachable_now().await => {
                    warn!(interface = %iface, "control plane unreachable before this change: applied without confirmation");
                    None
                }
                None => Some(Pending { digest, previous }),
            };
            if let Some(r) = &record {
                self.store(&pending_path, r)?;
            }
            self.apply_files(&rendered, &stale)?;
            info!(interface = %iface, resource = %id, "network configuration written; reloading systemd-networkd");
            self.reload().await?;
            pending = record;
        } else if pending.is_none()
            && let Some(link) = self.link(iface).await?
        {
            // Files as specified; the link drifted (an address removed by hand).
            link.reconfigure()
                .await
                .map_err(|e| bus_err(&format!("reconfiguring {iface}"), e))?;
        }
        let view = self.settle(spec, pending.is_some()).await?;
        if let Some(p) = pending {
            self.confirm_or_revert(spec, p).await?;
        }
        self.forget(&self.record_path(iface, "rolled-back"))?;
        self.outcome(spec, view)
    }

    async fn delete(
        &self,
        id: &ResourceId,
        applied: &NetworkConfigSpec,
    ) -> Result<Deleted, ReconcileError> {
        let ours = self.marker(id);
        let rendered = self.render(id, applied);
        let mut removed = 0;
        let mut foreign = Vec::new();
        let paths: Vec<PathBuf> = rendered
            .files
            .iter()
            .map(|(p, _)| p.clone())
            .chain(self.stale(id, &rendered))
            .collect();
        for path in &paths {
            match read_optional(path)? {
                None => {}
                Some(text) if text.starts_with(&ours) => {
                    self.forget(path)?;
                    removed += 1;
                }
                Some(_) => foreign.push(path.display().to_string()),
            }
        }
        let iface = &applied.interface;
        self.forget(&self.record_path(iface, "pending"))?;
        self.forget(&self.record_path(iface, "rolled-back"))?;
        if removed > 0 {
            // networkd drops what it had set on the link (addresses, routes).
            self.reload().await?;
            return Ok(Deleted::Removed);
        }
        if !foreign.is_empty() {
            return Ok(Deleted::LeftInPlace(format!(
                "{} changed by someone else",
                foreign.join(", ")
            )));
        }
        Ok(Deleted::AlreadyGone)
    }

    fn moves(&self, old: &NetworkConfigSpec, new: &NetworkConfigSpec) -> bool {
        old.interface != new.interface
    }
}

#[cfg(test)]
mod tests {
    use fleetlet_protocol::{RouteSpec, VlanSpec};

    use super::*;

    fn reconciler(dir: &Path) -> NetworkReconciler {
        NetworkReconciler::new(
            NetworkConfig {
                dir: dir.join("network"),
                ..Default::default()
            },
            Some("unix:path=/nonexistent".into()),
            DeviceId::new("pi").unwrap(),
            &dir.join("state"),
        )
    }

    fn spec() -> NetworkConfigSpec {
        NetworkConfigSpec {
            interface: "eth0".into(),
            addresses: vec!["10.1.0.2/24".into()],
            gateway: Some("10.1.0.1".into()),
            routes: vec![RouteSpec {
                destination: "10.9.0.0/16".into(),
                gateway: Some("10.1.0.254".into()),
                metric: Some(50),
            }],
            dns: vec!["10.1.0.53".into()],
            domains: vec!["home.arpa".into()],
            mtu: Some(1400),
            vlans: vec![VlanSpec {
                name: "eth0.7".into(),
                id: 7,
            }],
            ..Default::default()
        }
    }

    #[test]
    fn renders_networkd_files_with_the_marker() {
        let dir = tempfile::tempdir().unwrap();
        let r = reconciler(dir.path());
        let id = ResourceId::new("net").unwrap();
        let out = r.render(&id, &spec());
        assert_eq!(out.files.len(), 2);
        let (path, network) = &out.files[0];
        assert!(path.ends_with("network/10-fleetlet-eth0.network"));
        assert!(network.starts_with("# Managed by fleetlet (device pi, resource net)"));
        for line in [
            "Name=eth0",
            "MTUBytes=1400",
            "DHCP=no",
            "Address=10.1.0.2/24",
            "Gateway=10.1.0.1",
            "DNS=10.1.0.53",
            "Domains=home.arpa",
            "VLAN=eth0.7",
            "Destination=10.9.0.0/16",
            "Gateway=10.1.0.254",
            "Metric=50",
        ] {
            assert!(network.lines().any(|l| l == line), "{line} in\n{network}");
        }
        let (path, netdev) = &out.files[1];
        assert!(path.ends_with("10-fleetlet-eth0.7.netdev"));
        assert!(netdev.contains("Name=eth0.7\nKind=vlan\n\n[VLAN]\nId=7\n"));
        // A different spec is a different digest.
        let mut other = spec();
        other.mtu = None;
        assert_ne!(r.render(&id, &other).digest(), out.digest());
    }

    #[test]
    fn refuses_files_it_did_not_write_and_interfaces_the_owner_did_not_allow() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = reconciler(dir.path());
        let id = ResourceId::new("net").unwrap();
        let rendered = r.render(&id, &spec());
        std::fs::create_dir_all(dir.path().join("network")).unwrap();
        std::fs::write(&rendered.files[0].0, "[Match]\nName=eth0\n").unwrap();
        let e = r.check(&id, &spec(), &rendered).unwrap_err();
        assert!(matches!(e, ReconcileError::Forbidden(_)), "{e}");
        let other = ResourceId::new("other").unwrap();
        std::fs::write(
            &rendered.files[0].0,
            r.render(&other, &spec()).files[0].1.clone(),
        )
        .unwrap();
        let e = r.check(&id, &spec(), &rendered).unwrap_err();
        assert!(e.to_string().contains("another resource's"), "{e}");
        std::fs::remove_file(&rendered.files[0].0).unwrap();
        r.check(&id, &spec(), &rendered).unwrap();

        Arc::get_mut(&mut r.inner).unwrap().config.interfaces = vec!["wlan*".into()];
        let e = r.check(&id, &spec(), &rendered).unwrap_err();
        assert!(e.to_string().contains("interface eth0 is not one"), "{e}");
        let mut bad = spec();
        bad.addresses.push("10.0.0.1/40".into());
        let e = r.check(&id, &bad, &r.render(&id, &bad)).unwrap_err();
        assert!(matches!(e, ReconcileError::Invalid(_)), "{e}");
    }

    #[test]
    fn reads_addresses_and_the_network_file_from_networkds_description() {
        let json = r#"{"Index":3,"Name":"dum0","NetworkFile":"/etc/systemd/network/10-fleetlet-dum0.network",
            "Addresses":[{"Family":2,"Address":[10,123,0,2],"PrefixLength":24,"ConfigSource":"static"},
                         {"Family":10,"Address":[254,128,0,0,0,0,0,0,0,0,0,0,0,0,0,1],"PrefixLength":64}]}"#;
        let (addresses, file) = parse_description(json).unwrap();
        let shown: Vec<String> = addresses.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["10.123.0.2/24", "fe80::1/64"]);
        assert_eq!(
            file.unwrap(),
            PathBuf::from("/etc/systemd/network/10-fleetlet-dum0.network")
        );
        assert!(parse_description("not json").is_err());
        assert_eq!(parse_description("{}").unwrap(), (vec![], None));
    }

    #[tokio::test]
    async fn a_change_made_while_offline_is_applied_without_a_confirm_window() {
        let dir = tempfile::tempdir().unwrap();
        let r = reconciler(dir.path());
        r.set_uplink(Uplink::from_fn(|| Box::pin(async { false })));
        let id = ResourceId::new("net").unwrap();
        // No networkd here: the reload fails after the files are written.
        let e = r.reconcile(&id, &spec()).await.unwrap_err();
        assert!(e.to_string().contains("system bus"), "{e}");
        let rendered = r.render(&id, &spec());
        assert_eq!(
            std::fs::read_to_string(&rendered.files[0].0).unwrap(),
            rendered.files[0].1
        );
        assert!(
            !r.record_path("eth0", "pending").exists(),
            "nothing to confirm"
        );
    }

    #[tokio::test]
    async fn a_change_without_its_control_plane_is_rolled_back_and_not_retried() {
        let dir = tempfile::tempdir().unwrap();
        let r = reconciler(dir.path());
        r.set_uplink(Uplink::from_fn(|| Box::pin(async { false })));
        let id = ResourceId::new("net").unwrap();
        let mut s = spec();
        s.confirm_seconds = Some(5);
        let rendered = r.render(&id, &s);
        std::fs::create_dir_all(dir.path().join("network")).unwrap();
        let before = r.render(
            &id,
            &NetworkConfigSpec {
                interface: "eth0".into(),
                dhcp: true,
                ..Default::default()
            },
        );
        std::fs::write(&before.files[0].0, &before.files[0].1).unwrap();
        let previous = r.previous_of(&rendered, &[]).unwrap().unwrap();
        r.apply_files(&rendered, &[]).unwrap();
        let pending = Pending {
            digest: rendered.digest(),
            previous,
        };
        r.store(&r.record_path("eth0", "pending"), &pending)
            .unwrap();
        // No networkd here: the reload fails after the files are back.
        let e = r.confirm_or_revert(&s, pending).await.unwrap_err();
        assert!(e.to_string().contains("system bus"), "{e}");
        assert!(!r.record_path("eth0", "pending").exists());
        // The spec that was rolled back is refused from now on, before anything is written.
        let e = r.reconcile(&id, &s).await.unwrap_err();
        assert!(matches!(e, ReconcileError::RolledBack(_)), "{e}");
        assert_eq!(
            std::fs::read_to_string(&before.files[0].0).unwrap(),
            before.files[0].1,
            "the previous file is back"
        );
        assert!(!rendered.files[1].0.exists(), "the new netdev is gone");
    }
}
