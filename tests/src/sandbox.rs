//! Device runtimes for tests: a real podman API service with a local OCI registry, and a
//! real systemd reached over D-Bus. Each is started by a script in `scripts/` (which a
//! developer can also run by hand) under the same watchdog as the servers, in its own
//! directory, and stopped and removed with it.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::{
    Error,
    bins::repo_root,
    process::{DirReaper, Service},
};

/// A script-started sandbox that prints `KEY=VALUE` lines and then `ready`.
struct ScriptSandbox {
    dir: PathBuf,
    values: BTreeMap<String, String>,
    // Drop order: the script (which cleans up after itself) before the directory.
    service: Service,
    reaper: Option<DirReaper>,
}

impl ScriptSandbox {
    async fn start(script: &str, env: &[(&str, String)], timeout: Duration) -> Result<Self, Error> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("fleetlet-{script}-"))
            .tempdir()?
            .keep();
        let program = repo_root().join("scripts").join(script);
        let log = dir.join(format!("{script}.log"));
        let mut service = Service::spawn_with_env(
            script,
            &program,
            &[dir.join("sbx").display().to_string()],
            env,
            log.clone(),
        )?;
        let reaper = DirReaper::spawn(&dir, &[service.pid()])?;
        let started = Instant::now();
        let values = loop {
            service.check_running()?;
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text
                .lines()
                .any(|l| l.trim() == "ready" || l.starts_with("ready "))
            {
                break text
                    .lines()
                    .flat_map(|l| l.strip_prefix("ready ").unwrap_or(l).split_whitespace())
                    .filter_map(|w| w.split_once('='))
                    .filter(|(k, _)| {
                        k.chars()
                            .all(|c| c.is_ascii_uppercase() || c == '_' || c.is_ascii_digit())
                    })
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect();
            }
            if started.elapsed() > timeout {
                return Err(Error::NotReady {
                    what: script.to_owned(),
                    waited: timeout,
                    last_error: "no `ready` line".into(),
                    log_tail: service.log_tail(40),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        tracing::debug!(
            script,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "sandbox ready"
        );
        Ok(Self {
            dir,
            values,
            service,
            reaper: Some(reaper),
        })
    }

    fn value(&self, key: &str) -> Result<String, Error> {
        self.values.get(key).cloned().ok_or_else(|| {
            Error::Setup(format!(
                "{} printed no {key}=; log:\n{}",
                self.service.name,
                self.service.log_tail(40)
            ))
        })
    }
}

impl Drop for ScriptSandbox {
    fn drop(&mut self) {
        self.service.stop();
        if let Some(mut r) = self.reaper.take() {
            r.reap();
        }
    }
}

/// podman's REST API on a private socket and storage, with a loopback OCI registry holding
/// two tags of a small busybox image (`IMAGE_1`, `IMAGE_2`, different digests).
pub struct PodmanSandbox {
    pub socket: PathBuf,
    /// `127.0.0.1:<port>`
    pub registry: String,
    pub image_1: String,
    pub image_2: String,
    /// The `CONTAINERS_*` settings, for running the podman CLI against the same storage.
    pub cli_env: Vec<(String, String)>,
    inner: ScriptSandbox,
}

impl PodmanSandbox {
    pub async fn start() -> Result<Self, Error> {
        let inner = ScriptSandbox::start("podman-sandbox", &[], Duration::from_secs(120)).await?;
        // The same settings the script gives its service; without them the CLI would use
        // the machine's own storage, so refuse to go on if any is missing.
        let conf = inner.dir.join("sbx").join("conf");
        let mut cli_env = Vec::new();
        for (key, file) in [
            ("CONTAINERS_CONF", "containers.conf"),
            ("CONTAINERS_STORAGE_CONF", "storage.conf"),
            ("CONTAINERS_REGISTRIES_CONF", "registries.conf"),
        ] {
            let path = conf.join(file);
            if !path.is_file() {
                return Err(Error::Setup(format!(
                    "podman-sandbox wrote no {}",
                    path.display()
                )));
            }
            cli_env.push((key.to_owned(), path.display().to_string()));
        }
        cli_env.push((
            "REGISTRY_AUTH_FILE".to_owned(),
            conf.join("auth.json").display().to_string(),
        ));
        Ok(Self {
            socket: PathBuf::from(inner.value("PODMAN_SOCKET")?),
            registry: inner.value("REGISTRY")?,
            image_1: inner.value("IMAGE_1")?,
            image_2: inner.value("IMAGE_2")?,
            cli_env,
            inner,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Runs the podman CLI against this sandbox's storage; returns stdout, or Err with stderr.
    pub fn podman(&self, args: &[&str]) -> Result<String, String> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut cmd = std::process::Command::new("podman");
            cmd.args(args)
                .envs(self.cli_env.iter().map(|(k, v)| (k, v)));
            match run(cmd) {
                // Sandboxes share the host's NETAVARK iptables chains (see
                // scripts/podman-sandbox): one removing its network's chain as its last
                // container goes can race another adding a rule to it. Asked again, the
                // second finds the chain recreated.
                Err(e) if attempt < 3 && e.contains("netavark") && e.contains("iptables") => {
                    eprintln!("podman {}: {}; asking again", args.join(" "), e.trim());
                    std::thread::sleep(Duration::from_millis(500));
                    // A `run` that failed there left its container created: clear the name.
                    if let Some(i) = args.iter().position(|a| *a == "--name")
                        && let Some(name) = args.get(i + 1)
                    {
                        let mut rm = std::process::Command::new("podman");
                        rm.args(["rm", "-f", name])
                            .envs(self.cli_env.iter().map(|(k, v)| (k, v)));
                        let _ = run(rm);
                    }
                }
                other => return other,
            }
        }
    }
}

/// systemd as PID 1 of private namespaces, with a minimal unit set, reached from outside
/// over its system bus socket.
pub struct SystemdSandbox {
    /// `unix:path=...` for `DBUS_SYSTEM_BUS_ADDRESS` or the agent's `systemd.bus_address`.
    pub bus_address: String,
    /// Host path of the sandbox's `/etc/systemd/system`, where the agent writes unit files.
    pub unit_dir: PathBuf,
    inner: ScriptSandbox,
}

impl SystemdSandbox {
    pub async fn start() -> Result<Self, Error> {
        let inner = ScriptSandbox::start("systemd-sandbox", &[], Duration::from_secs(30)).await?;
        Ok(Self {
            bus_address: inner.value("DBUS_SYSTEM_BUS_ADDRESS")?,
            unit_dir: inner.dir.join("sbx").join("units"),
            inner,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// `busctl` against this systemd; returns stdout, or Err with stderr.
    pub fn busctl(&self, args: &[&str]) -> Result<String, String> {
        let mut cmd = std::process::Command::new("busctl");
        cmd.arg(format!("--address={}", self.bus_address))
            .args(args);
        run(cmd)
    }
}

/// Runs a command: its stdout, or Err with its stderr.
fn run(mut cmd: std::process::Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}
