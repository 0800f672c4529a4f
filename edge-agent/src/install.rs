//! `fleetlet-agent install` / `uninstall`: put the agent on a device as a systemd service.
//!
//! Install copies the running binary into place, writes the config (and the NATS
//! credentials and CA next to it, readable by root only), writes the unit from
//! `examples/agent/fleetlet-agent.service` with this install's paths, and enables and starts
//! it through systemd's D-Bus API. Uninstall stops and disables the unit and removes what
//! install wrote; the workloads the agent started are left alone.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use fleetlet_protocol::DeviceId;

use crate::{
    Config,
    config::SystemdConfig,
    fsutil::{Ownership, write_atomic},
    systemd::SystemdReconciler,
};

/// The unit every install writes, from the example shipped with the agent.
pub const UNIT_NAME: &str = "fleetlet-agent.service";
const UNIT_TEMPLATE: &str = include_str!("../../examples/agent/fleetlet-agent.service");
const DEFAULT_EXEC: &str = "/usr/local/bin/fleetlet-agent --config /etc/fleetlet/agent.toml";
/// The unit that puts the previous binary back after an upgrade that does not stay up.
pub const ROLLBACK_UNIT_NAME: &str = "fleetlet-agent-rollback.service";
const ROLLBACK_TEMPLATE: &str =
    include_str!("../../examples/agent/fleetlet-agent-rollback.service");
const DEFAULT_ROLLBACK_EXEC: &str =
    "/usr/local/bin/fleetlet-agent.previous --config /etc/fleetlet/agent.toml rollback";
const DEFAULT_STATE_DIR: &str = "/var/lib/fleetlet";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{0} exists: pass --force to replace it")]
    AlreadyInstalled(PathBuf),
    #[error("invalid {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the generated configuration does not validate: {0}")]
    Config(#[from] crate::ConfigError),
    #[error("systemd: {0}")]
    Systemd(String),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> InstallError {
    let context = context.into();
    move |source| InstallError::Io { context, source }
}

/// Where things go; the defaults are a device's standard paths.
#[derive(Debug, Clone)]
pub struct Layout {
    pub bin_path: PathBuf,
    pub config_dir: PathBuf,
    pub unit_dir: PathBuf,
    pub state_dir: PathBuf,
    /// systemd's bus (default: the system bus).
    pub bus_address: Option<String>,
}

impl Layout {
    pub fn config_path(&self) -> PathBuf {
        self.config_dir.join("agent.toml")
    }

    pub fn unit_path(&self) -> PathBuf {
        self.unit_dir.join(UNIT_NAME)
    }

    fn systemd(&self, device: DeviceId) -> SystemdReconciler {
        let config = SystemdConfig {
            bus_address: self.bus_address.clone(),
            unit_dir: self.unit_dir.clone(),
            ..SystemdConfig::default()
        };
        SystemdReconciler::new(config, device)
    }
}

/// What this device's agent is and connects to.
#[derive(Debug, Clone)]
pub struct InstallOptions {
    pub device_id: String,
    pub nats_urls: Vec<String>,
    pub nats_creds: Option<PathBuf>,
    pub nats_ca: Option<PathBuf>,
    /// Resource kinds the device runs (`file`, `container`, `systemdUnit`, `shellJob`).
    pub enabled_kinds: Vec<String>,
    /// Trusted manifest signing keys, `ID=BASE64`.
    pub manifest_keys: Vec<String>,
    /// Accept unsigned manifests (no keys).
    pub allow_unsigned: bool,
    /// Replace an existing config.
    pub force: bool,
    /// Enable and start the unit (otherwise only write files).
    pub start: bool,
}

/// What install wrote.
#[derive(Debug, Clone)]
pub struct Installed {
    pub files: Vec<PathBuf>,
    pub started: bool,
}

fn absolute(field: &'static str, p: &Path) -> Result<(), InstallError> {
    if p.is_absolute() {
        Ok(())
    } else {
        Err(InstallError::Invalid {
            field,
            message: format!("{} is not an absolute path", p.display()),
        })
    }
}

/// The agent's config for this install, validated as the agent will read it.
fn render_config(opts: &InstallOptions, layout: &Layout) -> Result<String, InstallError> {
    let mut config = Config::new(&opts.device_id, opts.nats_urls.clone());
    config.state_dir.clone_from(&layout.state_dir);
    config.nats.creds_file = opts
        .nats_creds
        .as_ref()
        .map(|_| layout.config_dir.join("nats.creds"));
    config.nats.tls_ca = opts
        .nats_ca
        .as_ref()
        .map(|_| layout.config_dir.join("nats-ca.pem"));
    if !opts.enabled_kinds.is_empty() {
        config
            .reconcile
            .enabled_kinds
            .clone_from(&opts.enabled_kinds);
    }
    config.systemd.unit_dir.clone_from(&layout.unit_dir);
    config.systemd.bus_address = None;
    for key in &opts.manifest_keys {
        let (id, value) = key.split_once('=').ok_or_else(|| InstallError::Invalid {
            field: "--manifest-key",
            message: format!("{key:?} is not ID=BASE64"),
        })?;
        config
            .trust
            .manifest_keys
            .insert(id.trim().to_owned(), value.trim().to_owned());
    }
    config.trust.allow_unsigned = opts.allow_unsigned;
    // Validated as the agent will read it, with the given files standing in for their
    // copies (which do not exist yet).
    let mut check = config.clone();
    check.nats.creds_file.clone_from(&opts.nats_creds);
    check.nats.tls_ca.clone_from(&opts.nats_ca);
    check.validate()?;
    let body = toml::to_string(&config).map_err(|e| InstallError::Invalid {
        field: "config",
        message: e.to_string(),
    })?;
    Ok(format!(
        "# fleetlet agent configuration, written by `fleetlet-agent install` with every setting\n\
         # at its default unless given. After editing: `fleetlet-agent check-config`, then\n\
         # `systemctl restart fleetlet-agent`.\n{body}"
    ))
}

/// The example unit with this install's binary, config and state paths.
pub fn render_unit(layout: &Layout) -> String {
    let exec = format!(
        "{} --config {}",
        layout.bin_path.display(),
        layout.config_path().display()
    );
    let default_state = layout.state_dir == Path::new(DEFAULT_STATE_DIR);
    UNIT_TEMPLATE
        .replace(DEFAULT_EXEC, &exec)
        .lines()
        // StateDirectory= makes systemd create /var/lib/fleetlet; elsewhere the agent
        // creates its own state directory.
        .filter(|l| default_state || !l.starts_with("StateDirectory"))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The rollback unit with this install's binary and config.
pub fn render_rollback_unit(layout: &Layout) -> String {
    let exec = format!(
        "{}.previous --config {} rollback",
        layout.bin_path.display(),
        layout.config_path().display()
    );
    ROLLBACK_TEMPLATE.replace(DEFAULT_ROLLBACK_EXEC, &exec)
}

fn copy_private(from: &Path, to: &Path, mode: u32) -> Result<(), InstallError> {
    let bytes = std::fs::read(from).map_err(io(format!("reading {}", from.display())))?;
    write_atomic(to, &bytes, mode, Ownership::default())
        .map_err(io(format!("writing {}", to.display())))
}

/// Installs (or, with `force`, reinstalls) the agent.
pub async fn install(opts: &InstallOptions, layout: &Layout) -> Result<Installed, InstallError> {
    let device = DeviceId::new(opts.device_id.clone()).map_err(|e| InstallError::Invalid {
        field: "device id",
        message: e.to_string(),
    })?;
    absolute("--bin-path", &layout.bin_path)?;
    absolute("--config-dir", &layout.config_dir)?;
    absolute("--unit-dir", &layout.unit_dir)?;
    absolute("--state-dir", &layout.state_dir)?;
    for f in opts.nats_creds.iter().chain(&opts.nats_ca) {
        if !f.is_file() {
            return Err(InstallError::Invalid {
                field: "NATS file",
                message: format!("{} is not a readable file", f.display()),
            });
        }
    }
    let config_path = layout.config_path();
    if config_path.exists() && !opts.force {
        return Err(InstallError::AlreadyInstalled(config_path));
    }
    // Everything is checked before the first write.
    let config = render_config(opts, layout)?;
    let unit = render_unit(layout);
    let rollback_unit = render_rollback_unit(layout);

    let mut files = Vec::new();
    std::fs::create_dir_all(&layout.config_dir)
        .map_err(io(format!("creating {}", layout.config_dir.display())))?;
    std::fs::set_permissions(&layout.config_dir, std::fs::Permissions::from_mode(0o755)).map_err(
        io(format!(
            "setting the mode of {}",
            layout.config_dir.display()
        )),
    )?;
    if let Some(c) = &opts.nats_creds {
        let to = layout.config_dir.join("nats.creds");
        copy_private(c, &to, 0o600)?;
        files.push(to);
    }
    if let Some(c) = &opts.nats_ca {
        let to = layout.config_dir.join("nats-ca.pem");
        copy_private(c, &to, 0o644)?;
        files.push(to);
    }
    write_atomic(&config_path, config.as_bytes(), 0o600, Ownership::default())
        .map_err(io(format!("writing {}", config_path.display())))?;
    files.push(config_path);

    let exe = std::env::current_exe().map_err(io("finding this binary"))?;
    let same = match (exe.canonicalize(), layout.bin_path.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if !same {
        if let Some(dir) = layout.bin_path.parent() {
            std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        }
        copy_private(&exe, &layout.bin_path, 0o755)?;
    }
    files.push(layout.bin_path.clone());

    std::fs::create_dir_all(&layout.unit_dir)
        .map_err(io(format!("creating {}", layout.unit_dir.display())))?;
    let unit_path = layout.unit_path();
    write_atomic(&unit_path, unit.as_bytes(), 0o644, Ownership::default())
        .map_err(io(format!("writing {}", unit_path.display())))?;
    files.push(unit_path);
    let rollback_path = layout.unit_dir.join(ROLLBACK_UNIT_NAME);
    write_atomic(
        &rollback_path,
        rollback_unit.as_bytes(),
        0o644,
        Ownership::default(),
    )
    .map_err(io(format!("writing {}", rollback_path.display())))?;
    files.push(rollback_path);

    if opts.start {
        layout
            .systemd(device)
            .enable_and_restart(UNIT_NAME)
            .await
            .map_err(|e| InstallError::Systemd(e.to_string()))?;
    }
    Ok(Installed {
        files,
        started: opts.start,
    })
}

/// Stops and disables the unit, removes it and the binary; with `purge`, the config and
/// the state directory too. Returns what was removed.
pub async fn uninstall(layout: &Layout, purge: bool) -> Result<Vec<PathBuf>, InstallError> {
    let device = DeviceId::new("uninstall").map_err(|e| InstallError::Invalid {
        field: "device id",
        message: e.to_string(),
    })?;
    let systemd = layout.systemd(device);
    systemd
        .stop_and_disable(UNIT_NAME)
        .await
        .map_err(|e| InstallError::Systemd(e.to_string()))?;
    let mut removed = Vec::new();
    let mut previous = layout.bin_path.clone().into_os_string();
    previous.push(".previous");
    for f in [
        layout.unit_path(),
        layout.unit_dir.join(ROLLBACK_UNIT_NAME),
        layout.bin_path.clone(),
        PathBuf::from(previous),
    ] {
        match std::fs::remove_file(&f) {
            Ok(()) => removed.push(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(format!("removing {}", f.display()))(e)),
        }
    }
    // The unit file is gone: let systemd forget it.
    systemd
        .daemon_reload()
        .await
        .map_err(|e| InstallError::Systemd(e.to_string()))?;
    if purge {
        for d in [&layout.config_dir, &layout.state_dir] {
            match std::fs::remove_dir_all(d) {
                Ok(()) => removed.push(d.clone()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(format!("removing {}", d.display()))(e)),
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn layout(root: &Path) -> Layout {
        Layout {
            bin_path: root.join("bin/fleetlet-agent"),
            config_dir: root.join("etc"),
            unit_dir: root.join("units"),
            state_dir: root.join("state"),
            bus_address: None,
        }
    }

    #[test]
    fn the_default_layout_keeps_the_example_unit_as_is() {
        let l = Layout {
            bin_path: "/usr/local/bin/fleetlet-agent".into(),
            config_dir: "/etc/fleetlet".into(),
            unit_dir: "/etc/systemd/system".into(),
            state_dir: DEFAULT_STATE_DIR.into(),
            bus_address: None,
        };
        assert_eq!(render_unit(&l), UNIT_TEMPLATE);
    }

    #[test]
    fn another_layout_points_the_unit_at_its_paths() {
        let unit = render_unit(&layout(Path::new("/x")));
        assert!(unit.contains("ExecStart=/x/bin/fleetlet-agent --config /x/etc/agent.toml\n"));
        assert!(!unit.contains("StateDirectory"));
        assert!(unit.contains("KillMode=process"));
    }

    #[test]
    fn the_config_names_the_copied_credentials_and_validates() {
        let creds = tempfile::NamedTempFile::new().unwrap();
        let opts = InstallOptions {
            device_id: "pi-kitchen".into(),
            nats_urls: vec!["tls://nats.example.net:4222".into()],
            nats_creds: Some(creds.path().to_path_buf()),
            nats_ca: None,
            enabled_kinds: vec!["file".into(), "systemdUnit".into()],
            manifest_keys: vec![
                "ed25519-0123456789ab=AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=".into(),
            ],
            allow_unsigned: false,
            force: false,
            start: false,
        };
        let text = render_config(&opts, &layout(Path::new("/x"))).unwrap();
        let mut config: Config = toml::from_str(&text).unwrap();
        assert_eq!(
            config.nats.creds_file,
            Some(PathBuf::from("/x/etc/nats.creds"))
        );
        assert_eq!(config.nats.tls_ca, None);
        assert_eq!(config.systemd.unit_dir, PathBuf::from("/x/units"));
        config.nats.creds_file = Some(creds.path().to_path_buf());
        let s = config.validate().unwrap();
        assert_eq!(s.device.as_str(), "pi-kitchen");
        assert_eq!(s.enabled_kinds.len(), 2);
        // The signing key, padding and all, so the agent accepts signed manifests only.
        assert_eq!(s.manifest_keys["ed25519-0123456789ab"].len(), 32);
        assert!(!s.allow_unsigned);
    }
}
