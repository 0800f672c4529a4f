//! The SystemdUnit reconciler: unit files plus systemd's Manager API over D-Bus.
//!
//! Unit files the agent writes start with a marker line naming the device and resource;
//! only those units are ever stopped, disabled or removed when a manifest drops them.
//! Start, stop and restart follow the systemd job to its end (the `JobRemoved` signal)
//! instead of sleeping.

use std::{path::PathBuf, sync::Arc, time::Duration};

use fleetlet_protocol::{DeviceId, ResourceDetails, ResourceId, SystemdUnitSpec, UnitState};
use futures::StreamExt;
use tokio::sync::Mutex;
use tracing::{debug, info, warn};
use zbus::{Connection, OwnedObjectPath, proxy::CacheProperties};

use crate::{
    config::{ConfigError, invalid},
    fsutil::{Ownership, write_atomic},
    reconciler::{Deleted, Observation, ReconcileError, Reconciler},
};

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
trait Manager {
    fn subscribe(&self) -> zbus::Result<()>;
    fn reload(&self) -> zbus::Result<()>;
    fn load_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    fn start_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn stop_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn restart_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn reset_failed_unit(&self, name: &str) -> zbus::Result<()>;
    fn get_unit_file_state(&self, file: &str) -> zbus::Result<String>;
    fn enable_unit_files(
        &self,
        files: &[&str],
        runtime: bool,
        force: bool,
    ) -> zbus::Result<(bool, Vec<(String, String, String)>)>;
    fn disable_unit_files(
        &self,
        files: &[&str],
        runtime: bool,
    ) -> zbus::Result<Vec<(String, String, String)>>;
    #[zbus(signal)]
    fn job_removed(
        &self,
        id: u32,
        job: OwnedObjectPath,
        unit: String,
        result: String,
    ) -> zbus::Result<()>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Unit",
    default_service = "org.freedesktop.systemd1"
)]
trait Unit {
    #[zbus(property)]
    fn active_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn sub_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn load_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn load_error(&self) -> zbus::Result<(String, String)>;
    #[zbus(property)]
    fn need_daemon_reload(&self) -> zbus::Result<bool>;
    #[zbus(property)]
    fn fragment_path(&self) -> zbus::Result<String>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Service",
    default_service = "org.freedesktop.systemd1"
)]
trait Service {
    #[zbus(property, name = "NRestarts")]
    fn n_restarts(&self) -> zbus::Result<u32>;
}

/// Units no manifest may touch, whatever the device's policy lists: the bus the agent
/// talks to systemd over, systemd's own units and the system's core targets.
const PROTECTED: [&str; 22] = [
    "dbus.service",
    "dbus.socket",
    "dbus-broker.service",
    "init.scope",
    "-.mount",
    "-.slice",
    "system.slice",
    "user.slice",
    "basic.target",
    "sysinit.target",
    "sockets.target",
    "local-fs.target",
    "default.target",
    "multi-user.target",
    "graphical.target",
    "rescue.target",
    "emergency.target",
    "shutdown.target",
    "reboot.target",
    "poweroff.target",
    "halt.target",
    "network.target",
];

/// Login services: touched only when the owner allows it (`allow_login_units`) and lists
/// them, so a manifest cannot lock the owner out.
const LOGIN: [&str; 8] = [
    "ssh.service",
    "ssh.socket",
    "sshd.service",
    "sshd.socket",
    "dropbear.service",
    "getty@*",
    "serial-getty@*",
    "user@*",
];

/// `name` against `pattern`: equal, or a prefix when the pattern ends with `*`.
fn matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

/// Why the device's policy keeps a manifest off `name`, if it does (before looking at
/// whether fleetlet wrote the unit).
fn protected(config: &SystemdConfig, name: &str) -> Option<String> {
    if name == config.agent_unit || name == crate::install::ROLLBACK_UNIT_NAME {
        return Some(format!("{name} is the agent's own unit"));
    }
    if PROTECTED.contains(&name) || name.starts_with("systemd-") {
        return Some(format!(
            "{name} belongs to the system (D-Bus, systemd's own units and core targets are never managed)"
        ));
    }
    if !config.allow_login_units && LOGIN.iter().any(|p| matches(p, name)) {
        return Some(format!(
            "{name} is a login service; the device owner allows those with [systemd] allow_login_units"
        ));
    }
    None
}

/// Whether the owner lets manifests manage `name` although fleetlet did not write it.
fn listed(config: &SystemdConfig, name: &str) -> bool {
    config.foreign_units.iter().any(|p| matches(p, name))
}

/// The active states that count as started.
fn is_up(active: &str) -> bool {
    matches!(active, "active" | "reloading")
}

/// Whether `spec` wants the unit's enablement changed, given its unit file state:
/// `Some(true)` to enable, `Some(false)` to disable. Only units fleetlet wrote are ever
/// disabled; a foreign unit left enabled stays so.
fn enablement_change(spec: &SystemdUnitSpec, file_state: &str) -> Option<bool> {
    let enabled = file_state.starts_with("enabled");
    if spec.enabled && !enabled {
        Some(true)
    } else if !spec.enabled && enabled && spec.contents.is_some() {
        Some(false)
    } else {
        None
    }
}

/// The job (a [`SystemdReconciler::job`] verb) that takes a unit in `active` to `want`, if
/// one is needed: a started unit whose file just `changed` is restarted to run the new file.
fn job_for(want: UnitState, active: &str, changed: bool) -> Option<&'static str> {
    let up_or_coming = is_up(active) || active == "activating";
    match want {
        UnitState::Started if changed && up_or_coming => Some("restart"),
        UnitState::Started if !is_up(active) => Some("start"),
        UnitState::Stopped if up_or_coming => Some("stop"),
        _ => None,
    }
}

/// Why systemd could not load `name`, if it did not: its load state and load error.
fn load_failure(name: &str, v: &UnitView) -> Option<String> {
    (v.load_state != "loaded").then(|| {
        format!(
            "{name} is {}{}",
            v.load_state,
            v.load_error
                .as_ref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        )
    })
}

/// Why `name` is not up after it was started, if it is not; its restart count, when not
/// zero, tells a crash loop apart from a unit that never came up.
fn not_started(name: &str, v: &UnitView) -> Option<String> {
    (!is_up(&v.active)).then(|| {
        format!(
            "{name} is {} ({}) after starting{}",
            v.active,
            v.sub,
            v.restarts
                .filter(|n| *n > 0)
                .map(|n| format!(", {n} restarts"))
                .unwrap_or_default()
        )
    })
}

/// What one unit looks like to systemd right now.
#[derive(Debug, Clone)]
struct UnitView {
    load_state: String,
    load_error: Option<String>,
    active: String,
    sub: String,
    file_state: String,
    restarts: Option<u32>,
    need_reload: bool,
    /// The unit file systemd loaded it from (empty for units without one).
    fragment: String,
}

impl UnitView {
    fn details(&self) -> ResourceDetails {
        ResourceDetails::SystemdUnit {
            active_state: self.active.clone(),
            sub_state: self.sub.clone(),
            unit_file_state: Some(self.file_state.clone()).filter(|s| !s.is_empty()),
            restarts: self.restarts,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SystemdReconciler {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: SystemdConfig,
    device: DeviceId,
    conn: Mutex<Option<Connection>>,
    /// Units this agent wrote (or found with its marker) since it started: an edit by hand
    /// that dropped the marker is drift on one of these, not someone else's unit.
    written: Mutex<std::collections::HashSet<String>>,
}

/// A D-Bus failure as a runtime error: the method error's text when there is one.
pub(crate) fn bus_err(context: &str, e: zbus::Error) -> ReconcileError {
    let message = match &e {
        zbus::Error::MethodError(name, detail, _) => match detail {
            Some(d) => format!("{d} ({name})"),
            None => name.to_string(),
        },
        other => other.to_string(),
    };
    ReconcileError::Runtime(format!("{context}: {message}"))
}

impl SystemdReconciler {
    pub fn new(config: SystemdConfig, device: DeviceId) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                device,
                conn: Mutex::new(None),
                written: Mutex::new(std::collections::HashSet::new()),
            }),
        }
    }

    /// Reloads systemd, enables `name` and (re)starts it, following the job to its end:
    /// what `fleetlet-agent install` does with its own unit.
    pub async fn enable_and_restart(&self, name: &str) -> Result<(), ReconcileError> {
        let m = self.manager().await?;
        self.reload(&m).await?;
        m.enable_unit_files(&[name], false, true)
            .await
            .map_err(|e| bus_err(&format!("enabling {name}"), e))?;
        self.job(&m, "restart", name).await
    }

    /// Stops and disables `name` if systemd knows it, then reloads: what
    /// `fleetlet-agent uninstall` does before removing the unit file.
    pub async fn stop_and_disable(&self, name: &str) -> Result<(), ReconcileError> {
        let m = self.manager().await?;
        let view = self.view(&m, name).await?;
        if view.load_state == "not-found" {
            return Ok(());
        }
        if view.active != "inactive" && view.active != "failed" {
            self.job(&m, "stop", name).await?;
        }
        m.disable_unit_files(&[name], false)
            .await
            .map_err(|e| bus_err(&format!("disabling {name}"), e))?;
        self.reload(&m).await
    }

    /// Asks systemd to restart `name` without waiting for the job: what the agent does to
    /// itself after an upgrade (the job ends this process).
    pub async fn restart_detached(&self, name: &str) -> Result<(), ReconcileError> {
        let m = self.manager().await?;
        m.restart_unit(name, "replace")
            .await
            .map(drop)
            .map_err(|e| bus_err(&format!("restarting {name}"), e))
    }

    /// Clears `name`'s failed state and start limit, then starts it (after a rollback).
    pub async fn reset_and_start(&self, name: &str) -> Result<(), ReconcileError> {
        let m = self.manager().await?;
        m.reset_failed_unit(name)
            .await
            .map_err(|e| bus_err(&format!("resetting {name}"), e))?;
        m.start_unit(name, "replace")
            .await
            .map(drop)
            .map_err(|e| bus_err(&format!("starting {name}"), e))
    }

    /// Reloads systemd's unit files (after a unit file was removed).
    pub async fn daemon_reload(&self) -> Result<(), ReconcileError> {
        let m = self.manager().await?;
        self.reload(&m).await
    }

    /// The first line of every unit file the agent writes.
    fn marker(&self, id: &ResourceId) -> String {
        format!(
            "# Managed by fleetlet (device {}, resource {id}); local edits are replaced.\n",
            self.inner.device
        )
    }

    /// The unit file for `spec`: the marker, the state of what it restarts on (so a change
    /// there is a new file, and a running unit is restarted for it), then its contents.
    fn file_bytes(&self, id: &ResourceId, contents: &str, spec: &SystemdUnitSpec) -> Vec<u8> {
        let mut s = self.marker(id);
        if let Some(d) = &spec.restart_digest {
            s.push_str(&format!(
                "# Restarted when {} change (state {d}).\n",
                spec.restart_on
                    .iter()
                    .map(|r| r.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        s.push_str(contents);
        if !s.ends_with('\n') {
            s.push('\n');
        }
        s.into_bytes()
    }

    fn unit_path(&self, name: &str) -> PathBuf {
        self.inner.config.unit_dir.join(name)
    }

    /// The bus connection, made (and subscribed to job signals) on first use and after a
    /// failure, so the agent starts even while systemd is out of reach.
    async fn manager(&self) -> Result<ManagerProxy<'static>, ReconcileError> {
        let mut guard = self.inner.conn.lock().await;
        let conn = match guard.as_ref() {
            Some(c) => c.clone(),
            None => {
                let address = self
                    .inner
                    .config
                    .bus_address
                    .clone()
                    .or_else(|| std::env::var("DBUS_SYSTEM_BUS_ADDRESS").ok());
                let builder = match &address {
                    Some(a) => zbus::connection::Builder::address(a.as_str()),
                    None => zbus::connection::Builder::system(),
                };
                let conn = builder.build().await.map_err(|e| {
                    bus_err(
                        &format!(
                            "connecting to the system bus{}",
                            address.map(|a| format!(" at {a}")).unwrap_or_default()
                        ),
                        e,
                    )
                })?;
                let m = ManagerProxy::new(&conn)
                    .await
                    .map_err(|e| bus_err("systemd manager", e))?;
                m.subscribe()
                    .await
                    .map_err(|e| bus_err("subscribing to systemd jobs", e))?;
                debug!("connected to systemd");
                *guard = Some(conn.clone());
                conn
            }
        };
        drop(guard);
        ManagerProxy::new(&conn)
            .await
            .map_err(|e| bus_err("systemd manager", e))
    }

    /// Forgets the connection after a transport failure; the next call reconnects.
    async fn on_error(&self, e: &ReconcileError) {
        if let ReconcileError::Runtime(m) = e
            && (m.contains("I/O error") || m.contains("connection") || m.contains("Broken pipe"))
        {
            *self.inner.conn.lock().await = None;
        }
    }

    async fn view(&self, m: &ManagerProxy<'_>, name: &str) -> Result<UnitView, ReconcileError> {
        let path = m
            .load_unit(name)
            .await
            .map_err(|e| bus_err(&format!("loading {name}"), e))?;
        let unit = UnitProxy::builder(m.inner().connection())
            .path(path.clone())
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(|e| bus_err("unit proxy", e))?;
        let ctx = |what: &str| format!("reading {what} of {name}");
        let load_state = unit
            .load_state()
            .await
            .map_err(|e| bus_err(&ctx("LoadState"), e))?;
        let load_error = match load_state.as_str() {
            "loaded" => None,
            _ => unit
                .load_error()
                .await
                .ok()
                .map(|(n, msg)| if msg.is_empty() { n } else { msg }),
        };
        let restarts = if name.ends_with(".service") {
            match ServiceProxy::builder(m.inner().connection())
                .path(path)
                .cache_properties(CacheProperties::No)
                .build()
                .await
            {
                Ok(service) => service.n_restarts().await.ok(),
                Err(_) => None,
            }
        } else {
            None
        };
        Ok(UnitView {
            active: unit
                .active_state()
                .await
                .map_err(|e| bus_err(&ctx("ActiveState"), e))?,
            sub: unit
                .sub_state()
                .await
                .map_err(|e| bus_err(&ctx("SubState"), e))?,
            need_reload: unit.need_daemon_reload().await.unwrap_or(false),
            fragment: unit.fragment_path().await.unwrap_or_default(),
            file_state: m.get_unit_file_state(name).await.unwrap_or_default(),
            load_state,
            load_error,
            restarts,
        })
    }

    /// Runs a start/stop/restart and waits for its job to finish.
    async fn job(
        &self,
        m: &ManagerProxy<'_>,
        verb: &str,
        name: &str,
    ) -> Result<(), ReconcileError> {
        // Listen before asking, so a fast job cannot finish unseen.
        let mut removed = m
            .receive_job_removed()
            .await
            .map_err(|e| bus_err("watching systemd jobs", e))?;
        let call = match verb {
            "start" => m.start_unit(name, "replace").await,
            "stop" => m.stop_unit(name, "replace").await,
            _ => m.restart_unit(name, "replace").await,
        };
        let job = call.map_err(|e| bus_err(&format!("{verb} {name}"), e))?;
        let timeout = Duration::from_secs(u64::from(self.inner.config.job_timeout_seconds));
        let wait = async {
            while let Some(signal) = removed.next().await {
                if let Ok(args) = signal.args()
                    && args.job == job
                {
                    return Some(args.result.to_owned());
                }
            }
            None
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(Some(result)) if result == "done" => Ok(()),
            Ok(Some(result)) => Err(ReconcileError::Runtime(format!(
                "{verb} {name}: systemd job ended with {result:?}"
            ))),
            Ok(None) => Err(ReconcileError::Runtime(format!(
                "{verb} {name}: lost the connection to systemd"
            ))),
            Err(_) => Err(ReconcileError::Runtime(format!(
                "{verb} {name}: job still running after {}s",
                timeout.as_secs()
            ))),
        }
    }

    async fn reload(&self, m: &ManagerProxy<'_>) -> Result<(), ReconcileError> {
        m.reload()
            .await
            .map_err(|e| bus_err("reloading systemd", e))
    }

    async fn write_unit(&self, path: PathBuf, bytes: Vec<u8>) -> Result<(), ReconcileError> {
        let shown = path.display().to_string();
        tokio::task::spawn_blocking(move || {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            write_atomic(&path, &bytes, 0o644, Ownership::default())
        })
        .await
        .map_err(|e| ReconcileError::Runtime(format!("unit file task failed: {e}")))?
        .map_err(|e| ReconcileError::io(format!("writing {shown}"), e))
    }

    /// The device owner's policy for `spec`: protected units never, units fleetlet did not
    /// write only when listed in `foreign_units`.
    async fn check_policy(
        &self,
        id: &ResourceId,
        spec: &SystemdUnitSpec,
    ) -> Result<(), ReconcileError> {
        let name = spec.name.as_str();
        let config = &self.inner.config;
        if let Some(why) = protected(config, name) {
            return Err(ReconcileError::Forbidden(why));
        }
        if listed(config, name) {
            return Ok(());
        }
        let unlisted = |what: &str| {
            ReconcileError::Forbidden(format!(
                "{name} {what}; the device owner lists the units manifests may manage anyway in [systemd] foreign_units"
            ))
        };
        if spec.contents.is_none() {
            return Err(unlisted("was not created by fleetlet"));
        }
        let known = self.inner.written.lock().await.contains(name);
        match tokio::fs::read(self.unit_path(name)).await {
            Ok(b) if b.starts_with(self.marker(id).as_bytes()) => {
                self.inner.written.lock().await.insert(name.to_owned());
                Ok(())
            }
            Ok(b) if b.starts_with(b"# Managed by fleetlet") => Err(ReconcileError::Forbidden(
                format!("{name} is another fleetlet resource's unit"),
            )),
            // Ours, edited by hand since: drift, put back.
            Ok(_) if known => Ok(()),
            Ok(_) => Err(unlisted("exists and was not written by fleetlet")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Not in the unit directory: a unit systemd loads from elsewhere (a vendor
                // unit in /usr/lib/systemd/system) would be overridden by writing it.
                let m = self.manager().await?;
                let v = self.view(&m, name).await?;
                let ours = std::path::Path::new(&v.fragment) == self.unit_path(name);
                if v.load_state == "loaded" && !v.fragment.is_empty() && !ours {
                    Err(unlisted(&format!("is installed at {}", v.fragment)))
                } else {
                    Ok(())
                }
            }
            Err(e) => Err(ReconcileError::io("reading unit file", e)),
        }
    }

    async fn observe_inner(
        &self,
        id: &ResourceId,
        spec: &SystemdUnitSpec,
    ) -> Result<Observation, ReconcileError> {
        self.check_policy(id, spec).await?;
        if let Some(contents) = &spec.contents {
            match tokio::fs::read(self.unit_path(&spec.name)).await {
                Ok(b) if b == self.file_bytes(id, contents, spec) => {}
                Ok(_) => return Ok(Observation::Differs("unit file changed on disk".into())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Ok(Observation::Absent);
                }
                Err(e) => return Err(ReconcileError::io("reading unit file", e)),
            }
        }
        let m = self.manager().await?;
        let v = self.view(&m, &spec.name).await?;
        if v.load_state != "loaded" {
            return Ok(Observation::Differs(format!("unit is {}", v.load_state)));
        }
        if v.need_reload {
            return Ok(Observation::Differs(
                "systemd has not loaded the current unit file".into(),
            ));
        }
        let enabled = v.file_state.starts_with("enabled");
        if spec.enabled && !enabled {
            return Ok(Observation::Differs(format!("unit is {}", v.file_state)));
        }
        if !spec.enabled && enabled && spec.contents.is_some() {
            return Ok(Observation::Differs("unit is enabled".into()));
        }
        let up = is_up(&v.active);
        match spec.state {
            UnitState::Started if !up => Ok(Observation::Differs(format!(
                "unit is {} ({})",
                v.active, v.sub
            ))),
            UnitState::Stopped if up || v.active == "activating" => Ok(Observation::Differs(
                format!("unit is {} ({})", v.active, v.sub),
            )),
            _ => Ok(Observation::InSync(v.details())),
        }
    }

    async fn reconcile_inner(
        &self,
        id: &ResourceId,
        spec: &SystemdUnitSpec,
    ) -> Result<ResourceDetails, ReconcileError> {
        spec.validate()
            .map_err(|e| ReconcileError::Invalid(e.to_string()))?;
        self.check_policy(id, spec).await?;
        let name = spec.name.as_str();
        let m = self.manager().await?;
        let changed = self.put_unit_file(id, spec).await?;
        let mut v = self.view(&m, name).await?;
        if changed || v.need_reload {
            self.reload(&m).await?;
            v = self.view(&m, name).await?;
        }
        if let Some(why) = load_failure(name, &v) {
            return Err(ReconcileError::Runtime(why));
        }
        self.converge_enablement(&m, id, spec, &v).await?;
        self.converge_state(&m, id, spec, &v, changed).await?;
        let v = self.view(&m, name).await?;
        if spec.state == UnitState::Started
            && let Some(why) = not_started(name, &v)
        {
            return Err(ReconcileError::Runtime(why));
        }
        Ok(v.details())
    }

    /// Writes `spec`'s unit file when the one on disk differs (or is missing); whether it
    /// wrote, since a new file means a reload and a restart of a running unit.
    async fn put_unit_file(
        &self,
        id: &ResourceId,
        spec: &SystemdUnitSpec,
    ) -> Result<bool, ReconcileError> {
        let Some(contents) = &spec.contents else {
            return Ok(false);
        };
        let name = spec.name.as_str();
        let path = self.unit_path(name);
        let want = self.file_bytes(id, contents, spec);
        let have = tokio::fs::read(&path).await.ok();
        if have.as_deref() == Some(want.as_slice()) {
            return Ok(false);
        }
        self.write_unit(path, want).await?;
        self.inner.written.lock().await.insert(name.to_owned());
        info!(resource = %id, unit = name, "unit file written");
        Ok(true)
    }

    /// Enables or disables the unit as `spec` says, given what systemd reported in `v`.
    async fn converge_enablement(
        &self,
        m: &ManagerProxy<'_>,
        id: &ResourceId,
        spec: &SystemdUnitSpec,
        v: &UnitView,
    ) -> Result<(), ReconcileError> {
        let name = spec.name.as_str();
        match enablement_change(spec, &v.file_state) {
            Some(true) => {
                let (has_install, _) = m
                    .enable_unit_files(&[name], false, true)
                    .await
                    .map_err(|e| bus_err(&format!("enabling {name}"), e))?;
                if !has_install {
                    return Err(ReconcileError::Invalid(format!(
                        "{name} has no [Install] section, so it cannot be enabled"
                    )));
                }
                self.reload(m).await?;
                info!(resource = %id, unit = name, "unit enabled");
            }
            Some(false) => {
                m.disable_unit_files(&[name], false)
                    .await
                    .map_err(|e| bus_err(&format!("disabling {name}"), e))?;
                self.reload(m).await?;
                info!(resource = %id, unit = name, "unit disabled");
            }
            None => {}
        }
        Ok(())
    }

    /// Starts, restarts or stops the unit as `spec` says, given what systemd reported in
    /// `v` (before any enabling) and whether its unit file was just `changed`.
    async fn converge_state(
        &self,
        m: &ManagerProxy<'_>,
        id: &ResourceId,
        spec: &SystemdUnitSpec,
        v: &UnitView,
        changed: bool,
    ) -> Result<(), ReconcileError> {
        let name = spec.name.as_str();
        if spec.state == UnitState::Started && v.active == "failed" {
            let _ = m.reset_failed_unit(name).await;
        }
        let Some(verb) = job_for(spec.state, &v.active, changed) else {
            return Ok(());
        };
        self.job(m, verb, name).await?;
        match verb {
            "restart" => info!(resource = %id, unit = name, "unit restarted for its new file"),
            "start" => info!(resource = %id, unit = name, "unit started"),
            _ => info!(resource = %id, unit = name, "unit stopped"),
        }
        Ok(())
    }

    async fn delete_inner(
        &self,
        id: &ResourceId,
        applied: &SystemdUnitSpec,
    ) -> Result<Deleted, ReconcileError> {
        if applied.contents.is_none() {
            return Ok(Deleted::LeftInPlace(format!(
                "{} was not created by fleetlet; left as it is",
                applied.name
            )));
        }
        let name = applied.name.as_str();
        let path = self.unit_path(name);
        match tokio::fs::read(&path).await {
            Ok(b) if b.starts_with(self.marker(id).as_bytes()) => {}
            Ok(_) => {
                return Ok(Deleted::LeftInPlace(format!(
                    "{} was rewritten outside fleetlet; left in place",
                    path.display()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Deleted::AlreadyGone),
            Err(e) => return Err(ReconcileError::io("reading unit file", e)),
        }
        let m = self.manager().await?;
        let v = self.view(&m, name).await?;
        if is_up(&v.active) || v.active == "activating" {
            self.job(&m, "stop", name).await?;
        }
        if v.file_state.starts_with("enabled") {
            m.disable_unit_files(&[name], false)
                .await
                .map_err(|e| bus_err(&format!("disabling {name}"), e))?;
        }
        match tokio::fs::remove_file(&path).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ReconcileError::io("removing unit file", e)),
        }
        self.reload(&m).await?;
        if let Err(e) = m.reset_failed_unit(name).await {
            debug!(unit = name, error = %e, "reset-failed after removal");
        }
        info!(resource = %id, unit = name, "unit stopped and removed");
        Ok(Deleted::Removed)
    }
}

impl Reconciler for SystemdReconciler {
    type Spec = SystemdUnitSpec;

    async fn observe(
        &self,
        id: &ResourceId,
        spec: &SystemdUnitSpec,
    ) -> Result<Observation, ReconcileError> {
        let r = self.observe_inner(id, spec).await;
        if let Err(e) = &r {
            self.on_error(e).await;
        }
        r
    }

    async fn reconcile(
        &self,
        id: &ResourceId,
        spec: &SystemdUnitSpec,
    ) -> Result<ResourceDetails, ReconcileError> {
        let r = self.reconcile_inner(id, spec).await;
        if let Err(e) = &r {
            warn!(resource = %id, unit = %spec.name, error = %e, "unit not reconciled");
            self.on_error(e).await;
        }
        r
    }

    async fn delete(
        &self,
        id: &ResourceId,
        applied: &SystemdUnitSpec,
    ) -> Result<Deleted, ReconcileError> {
        let r = self.delete_inner(id, applied).await;
        if let Err(e) = &r {
            self.on_error(e).await;
        }
        r
    }

    fn moves(&self, old: &SystemdUnitSpec, new: &SystemdUnitSpec) -> bool {
        old.name != new.name
    }
}

// ---------------------------------------------------------------- configuration

/// systemd units, through systemd's D-Bus API.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemdConfig {
    /// D-Bus address of the system bus; default `$DBUS_SYSTEM_BUS_ADDRESS`, else the
    /// standard system bus socket.
    #[serde(default)]
    pub bus_address: Option<String>,
    /// Where unit files from manifests are written.
    #[serde(default = "default_unit_dir")]
    pub unit_dir: PathBuf,
    /// Longest wait for a start/stop/restart job to finish.
    #[serde(default = "default_job_timeout")]
    pub job_timeout_seconds: u32,
    /// Units fleetlet did not write that manifests may still start, stop, enable or
    /// replace, by name (a trailing `*` matches any rest: `mosquitto*`). Every other unit
    /// fleetlet did not write is left alone.
    #[serde(default)]
    pub foreign_units: Vec<String>,
    /// The agent's own unit, which no manifest may touch.
    #[serde(default = "default_agent_unit")]
    pub agent_unit: String,
    /// Let `foreign_units` name login services (ssh, gettys, user sessions). Off: a manifest
    /// can never lock the owner out of the device.
    #[serde(default)]
    pub allow_login_units: bool,
}

fn default_unit_dir() -> PathBuf {
    PathBuf::from("/etc/systemd/system")
}

fn default_job_timeout() -> u32 {
    90
}

fn default_agent_unit() -> String {
    "fleetlet-agent.service".into()
}

impl Default for SystemdConfig {
    fn default() -> Self {
        Self {
            bus_address: None,
            unit_dir: default_unit_dir(),
            job_timeout_seconds: default_job_timeout(),
            foreign_units: Vec::new(),
            agent_unit: default_agent_unit(),
            allow_login_units: false,
        }
    }
}

impl SystemdConfig {
    /// The unit directory is absolute; jobs get some time to finish.
    pub(crate) fn check(&self) -> Result<(), ConfigError> {
        if !self.unit_dir.is_absolute() {
            return Err(invalid("systemd.unit_dir", "must be an absolute path"));
        }
        if self.job_timeout_seconds == 0 {
            return Err(invalid("systemd.job_timeout_seconds", "must be at least 1"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(enabled: bool, contents: bool) -> SystemdUnitSpec {
        SystemdUnitSpec {
            restart_on: Vec::new(),
            restart_digest: None,
            name: "hello.service".into(),
            contents: contents.then(|| "[Service]\nExecStart=/bin/true\n".into()),
            enabled,
            state: UnitState::Started,
        }
    }

    fn view(load: &str, active: &str, sub: &str, restarts: Option<u32>) -> UnitView {
        UnitView {
            load_state: load.into(),
            load_error: (load != "loaded").then(|| "Unit hello.service not found.".into()),
            active: active.into(),
            sub: sub.into(),
            file_state: String::new(),
            restarts,
            need_reload: false,
            fragment: String::new(),
        }
    }

    #[test]
    fn enablement_changes_only_what_the_spec_asks_and_never_disables_a_foreign_unit() {
        assert_eq!(enablement_change(&unit(true, true), "disabled"), Some(true));
        assert_eq!(enablement_change(&unit(true, false), ""), Some(true));
        assert_eq!(enablement_change(&unit(true, true), "enabled"), None);
        assert_eq!(
            enablement_change(&unit(true, true), "enabled-runtime"),
            None
        );
        assert_eq!(
            enablement_change(&unit(false, true), "enabled"),
            Some(false)
        );
        // A unit fleetlet did not write (no contents) stays enabled.
        assert_eq!(enablement_change(&unit(false, false), "enabled"), None);
        assert_eq!(enablement_change(&unit(false, true), "disabled"), None);
    }

    #[test]
    fn the_job_takes_the_unit_to_its_wanted_state_and_restarts_it_for_a_new_file() {
        use UnitState::{Started, Stopped};
        assert_eq!(job_for(Started, "inactive", false), Some("start"));
        assert_eq!(job_for(Started, "failed", false), Some("start"));
        assert_eq!(job_for(Started, "active", false), None);
        assert_eq!(job_for(Started, "active", true), Some("restart"));
        assert_eq!(job_for(Started, "activating", true), Some("restart"));
        // Coming up with the same file: a start job joins the one under way.
        assert_eq!(job_for(Started, "activating", false), Some("start"));
        assert_eq!(job_for(Stopped, "active", false), Some("stop"));
        assert_eq!(job_for(Stopped, "activating", true), Some("stop"));
        assert_eq!(job_for(Stopped, "inactive", true), None);
    }

    #[test]
    fn failures_say_what_systemd_says() {
        assert_eq!(
            load_failure(
                "hello.service",
                &view("not-found", "inactive", "dead", None)
            ),
            Some("hello.service is not-found: Unit hello.service not found.".into())
        );
        assert_eq!(
            load_failure("hello.service", &view("loaded", "active", "running", None)),
            None
        );
        assert_eq!(
            not_started(
                "hello.service",
                &view("loaded", "failed", "failed", Some(3))
            ),
            Some("hello.service is failed (failed) after starting, 3 restarts".into())
        );
        assert_eq!(
            not_started(
                "hello.service",
                &view("loaded", "inactive", "dead", Some(0))
            ),
            Some("hello.service is inactive (dead) after starting".into())
        );
        assert_eq!(
            not_started(
                "hello.service",
                &view("loaded", "reloading", "reload", None)
            ),
            None
        );
    }
}
