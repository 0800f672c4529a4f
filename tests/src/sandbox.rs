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
    async fn start(
        script: &str,
        options: &[&str],
        env: &[(&str, String)],
        timeout: Duration,
    ) -> Result<Self, Error> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("fleetlet-{script}-"))
            .tempdir()?
            .keep();
        let program = repo_root().join("scripts").join(script);
        let log = dir.join(format!("{script}.log"));
        let service = Service::spawn_with_env(
            script,
            &program,
            &options
                .iter()
                .map(|o| o.to_string())
                .chain([dir.join("sbx").display().to_string()])
                .collect::<Vec<_>>(),
            env,
            log.clone(),
        )?;
        let reaper = DirReaper::spawn(&dir, &[service.pid()])?;
        // Owned by the sandbox at once, so that a start that fails stops the script before
        // the reaper waits for it (dropped the other way round, the reaper would wait for a
        // script nobody stops, or for an exited one nobody reaps, forever).
        let mut sandbox = Self {
            dir,
            values: BTreeMap::new(),
            service,
            reaper: Some(reaper),
        };
        let service = &mut sandbox.service;
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
        sandbox.values = values;
        Ok(sandbox)
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
        let inner =
            ScriptSandbox::start("podman-sandbox", &[], &[], Duration::from_secs(120)).await?;
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
        Self::start_with(&[]).await
    }

    /// With systemd-networkd, in a network namespace of its own holding only `lo`
    /// (`scripts/systemd-sandbox --network`): see [`NetworkSandbox`].
    pub async fn start_with_network() -> Result<NetworkSandbox, Error> {
        let systemd = Self::start_with(&["--network"]).await?;
        let pid = systemd.inner.value("NETNS_PID")?;
        Ok(NetworkSandbox {
            netns: PathBuf::from(format!("/proc/{pid}/ns/net")),
            network_dir: systemd.inner.dir.join("sbx").join("network"),
            systemd,
        })
    }

    async fn start_with(options: &[&str]) -> Result<Self, Error> {
        let inner =
            ScriptSandbox::start("systemd-sandbox", options, &[], Duration::from_secs(30)).await?;
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

/// A [`SystemdSandbox`] running systemd-networkd in a network namespace of its own: tests
/// add interfaces there (`ip link add ... type ifb`) and run processes in it
/// ([`NetworkSandbox::command`]); the namespace and its interfaces go with the sandbox.
pub struct NetworkSandbox {
    pub systemd: SystemdSandbox,
    /// `/proc/<pid>/ns/net` of the sandbox's systemd.
    pub netns: PathBuf,
    /// Host path of the sandbox's `/etc/systemd/network`.
    pub network_dir: PathBuf,
}

impl NetworkSandbox {
    /// `program args...` to run in the sandbox's network namespace (through `nsenter`,
    /// which execs it: the child's PID is the program's).
    pub fn command(&self, program: &Path, args: &[String]) -> (PathBuf, Vec<String>) {
        let mut all = vec![
            format!("--net={}", self.netns.display()),
            "--".to_owned(),
            program.display().to_string(),
        ];
        all.extend(args.iter().cloned());
        (PathBuf::from("/usr/bin/nsenter"), all)
    }

    /// `ip ARGS` in the sandbox's network namespace: stdout, or Err with stderr.
    pub fn ip(&self, args: &[&str]) -> Result<String, String> {
        let mut cmd = std::process::Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns.display()))
            .arg("--")
            .arg("ip")
            .args(args);
        run(cmd)
    }

    /// The addresses of `interface` with prefix length (`10.0.0.2/24`), from the kernel.
    pub fn addresses(&self, interface: &str) -> Result<Vec<String>, String> {
        let out = self.ip(&["-j", "addr", "show", "dev", interface])?;
        let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
            .filter_map(|a| {
                Some(format!(
                    "{}/{}",
                    a["local"].as_str()?,
                    a["prefixlen"].as_u64()?
                ))
            })
            .collect())
    }

    /// The destinations of the kernel's IPv4 routes (`10.124.0.0/24`, `default`).
    pub fn routes(&self) -> Result<Vec<String>, String> {
        let out = self.ip(&["-j", "-4", "route", "show"])?;
        let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["dst"].as_str().map(str::to_owned))
            .collect())
    }

    /// Asks this sandbox's networkd to reload its files.
    pub fn reload(&self) -> Result<(), String> {
        self.systemd
            .busctl(&[
                "call",
                "org.freedesktop.network1",
                "/org/freedesktop/network1",
                "org.freedesktop.network1.Manager",
                "Reload",
            ])
            .map(drop)
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
