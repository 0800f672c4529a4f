//! A real local control plane for fleetlet's tests and demo: etcd + kube-apiserver (with
//! fleetlet's CRDs) and nats-server with JetStream, on free loopback ports in a temp dir.
//!
//! ```no_run
//! # async fn t() -> Result<(), fleetlet_testenv::Error> {
//! // One environment per test binary, shared by its tests:
//! let env = fleetlet_testenv::TestEnv::shared();
//! let kube = env.kube_client().await?;
//! let nats = env.nats_client().await?;
//! // Or a private one, torn down when dropped:
//! let own = fleetlet_testenv::TestEnv::builder().nats().start().await?;
//! # Ok(()) }
//! ```
//!
//! Servers die with the test process however it ends (see [`process`]); temp dirs are
//! removed after them unless `FLEETLET_TESTENV_KEEP=1` is set.

pub mod bench;
pub mod bins;
pub mod chart;
pub mod compat;
pub mod components;
pub mod docs;
pub mod gitops;
pub mod https;
pub mod kube;
pub mod metrics_server;
pub mod nats;
pub mod pki;
pub mod pods;
pub mod process;
pub mod proxy;
pub mod real_node;
pub mod release;
pub mod report;
pub mod sandbox;
pub mod wait;

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::Duration,
};

pub use bins::{Binaries, repo_root};
pub use kube::KubeControlPlane;
pub use metrics_server::MetricsServer;
pub use nats::{NatsCluster, NatsServer, ensure_buckets};
use process::DirReaper;
pub use wait::{DEFAULT_TIMEOUT, eventually};

/// Why the environment could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("test environment setup: {0}")]
    Setup(String),
    #[error("cannot start {name}: {source}")]
    Spawn {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{name} exited ({status}); last log lines:\n{log_tail}")]
    Exited {
        name: String,
        status: String,
        log_tail: String,
    },
    #[error("{what} not ready after {waited:?}: {last_error}; last log lines:\n{log_tail}")]
    NotReady {
        what: String,
        waited: Duration,
        last_error: String,
        log_tail: String,
    },
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Cert(#[from] rcgen::Error),
    #[error(transparent)]
    Kube(#[from] ::kube::Error),
    #[error(transparent)]
    Crd(#[from] fleetlet_crds::CrdError),
    #[error("connecting to NATS: {0}")]
    Nats(#[from] async_nats::ConnectError),
}

/// Which servers to start.
#[derive(Debug, Clone, Default)]
pub struct Builder {
    kube: bool,
    crds: bool,
    controllers: bool,
    nats: bool,
    nats_args: Vec<String>,
    nats_secured: Option<SecuredNats>,
    nats_cluster: Option<(usize, String)>,
}

/// nats-server with a config file (users and permissions) and, optionally, TLS.
#[derive(Debug, Clone)]
struct SecuredNats {
    config: String,
    admin: nats::NatsAuth,
    tls: bool,
}

impl Builder {
    /// etcd + kube-apiserver, with fleetlet's CRDs installed.
    pub fn kube(mut self) -> Self {
        self.kube = true;
        self.crds = true;
        self
    }

    /// etcd + kube-apiserver without fleetlet's CRDs (for installing them some other way,
    /// e.g. with the Helm chart).
    pub fn kube_without_crds(mut self) -> Self {
        self.kube = true;
        self.crds = false;
        self
    }

    /// kube-controller-manager and kube-scheduler too (implies kube): Deployments,
    /// DaemonSets, scheduling, garbage collection, node lifecycle, CSR signing.
    pub fn controllers(mut self) -> Self {
        if !self.kube {
            self.crds = true;
        }
        self.kube = true;
        self.controllers = true;
        self
    }

    /// nats-server with JetStream and fleetlet's buckets.
    pub fn nats(mut self) -> Self {
        self.nats = true;
        self
    }

    /// A cluster of `size` nats-servers with JetStream (routes on loopback, a store each)
    /// and fleetlet's buckets at `size` replicas; [`TestEnv::nats_url`] lists every node.
    pub fn nats_cluster(self, size: usize) -> Self {
        self.nats_cluster_with(size, "")
    }

    /// [`Builder::nats_cluster`] with `config` in every node's configuration file.
    pub fn nats_cluster_with(mut self, size: usize, config: &str) -> Self {
        self.nats_cluster = Some((size, config.to_owned()));
        self
    }

    /// nats-server with JetStream and extra flags, e.g. `["--user", "u", "--pass", "p"]`.
    pub fn nats_with_args(mut self, args: &[&str]) -> Self {
        self.nats = true;
        self.nats_args = args.iter().map(|a| a.to_string()).collect();
        self
    }

    /// nats-server configured with `config` (e.g. an `authorization` block with
    /// per-user permissions), where `admin`/`password` is a user allowed everything (the
    /// environment creates the buckets with it). With `tls`, the server serves a certificate
    /// for 127.0.0.1 from a CA of its own ([`NatsServer::ca_file`]) and its URL is `tls://`.
    pub fn nats_secured(mut self, config: &str, admin: &str, password: &str, tls: bool) -> Self {
        self.nats = true;
        self.nats_secured = Some(SecuredNats {
            config: config.into(),
            admin: nats::NatsAuth::Password(admin.into(), password.into()),
            tls,
        });
        self
    }

    /// nats-server in decentralized-auth mode: `config` names the operator, the system
    /// account and the account resolver; `admin_creds` (a `.creds` text) is a user allowed
    /// everything. TLS as in [`Builder::nats_secured`].
    pub fn nats_operator(mut self, config: &str, admin_creds: &str, tls: bool) -> Self {
        self.nats = true;
        self.nats_secured = Some(SecuredNats {
            config: config.into(),
            admin: nats::NatsAuth::Creds(admin_creds.into()),
            tls,
        });
        self
    }

    /// nats-server with fleetlet's static accounts ([`fleetlet_protocol::access`]): the
    /// fleet account (with the controller, `controller`, and an administrator, `admin`),
    /// the bridge's (`bridge`), and one account per device in `devices` (its user named
    /// after it). Passwords are [`nats::static_password`] of the user's name.
    pub fn nats_accounts(self, devices: &[&str], tls: bool) -> Self {
        self.nats_static(devices, None, tls)
    }

    /// As [`Builder::nats_accounts`], plus site `name` holding `site_devices` (of
    /// `devices`), whose leaf node ([`nats::Site`]) connects as user `name` through `link`,
    /// a proxy to the leaf node listener (on the port the proxy forwards to).
    pub fn nats_site(
        self,
        devices: &[&str],
        name: &str,
        site_devices: &[&str],
        link: &proxy::TcpProxy,
    ) -> Self {
        self.nats_static(devices, Some((name, site_devices, link)), false)
    }

    fn nats_static(
        self,
        devices: &[&str],
        site: Option<(&str, &[&str], &proxy::TcpProxy)>,
        tls: bool,
    ) -> Self {
        use fleetlet_protocol::{
            DeviceId,
            access::{Site, StaticUsers, User, server_accounts},
        };
        let user = |name: &str| User::new(name, &nats::static_password(name));
        let ids = |names: &[&str]| -> Vec<DeviceId> {
            names
                .iter()
                .filter_map(|d| DeviceId::new(*d).ok())
                .collect()
        };
        let users = StaticUsers {
            controller: user("controller"),
            admin: Some(user("admin")),
            bridge: user("bridge"),
            devices: ids(devices)
                .into_iter()
                .map(|d| {
                    let u = user(d.as_str());
                    (d, u)
                })
                .collect(),
            sites: site
                .and_then(|(name, members, _)| {
                    Some(Site {
                        name: DeviceId::new(name).ok()?,
                        user: user(name),
                        devices: ids(members),
                    })
                })
                .into_iter()
                .collect(),
        };
        let mut config = server_accounts(&users);
        if let Some((_, _, link)) = site {
            // The listener advertises the proxy: a leaf node adds the advertised address to
            // the ones it tries, and would otherwise go around the link the tests cut.
            config.push_str(&format!(
                "leafnodes {{\n  listen: \"{}\"\n  advertise: \"{}\"\n}}\n",
                link.upstream(),
                link.addr()
            ));
        }
        self.nats_secured(&config, "admin", &nats::static_password("admin"), tls)
    }

    pub async fn start(self) -> Result<TestEnv, Error> {
        TestEnv::start_with(self).await
    }
}

/// Running servers; stopped (and their directory removed) when dropped.
pub struct TestEnv {
    pub dir: PathBuf,
    // Field order is drop order: servers first, then the directory.
    pub controllers: Option<kube::Controllers>,
    pub kube: Option<KubeControlPlane>,
    pub nats: Option<NatsServer>,
    pub nats_cluster: Option<NatsCluster>,
    reaper: Option<DirReaper>,
}

impl TestEnv {
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// A kube + NATS environment shared by every test in this test binary. Started on first
    /// use; stopped when the test process exits. Use a fresh namespace per test
    /// ([`TestEnv::namespace`]) and fresh clients per test (each test has its own runtime).
    pub fn shared() -> &'static TestEnv {
        static SHARED: OnceLock<Result<TestEnv, String>> = OnceLock::new();
        let env = SHARED.get_or_init(|| {
            // Start on a thread with its own runtime: callers are inside a test's runtime,
            // which cannot block on another future, and which dies with the test.
            std::thread::spawn(|| {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                rt.block_on(TestEnv::builder().kube().nats().start())
                    .map_err(|e| e.to_string())
            })
            .join()
            .unwrap_or_else(|_| Err("test environment startup panicked".into()))
        });
        match env {
            Ok(env) => env,
            Err(e) => panic!("shared test environment failed to start: {e}"),
        }
    }

    async fn start_with(opts: Builder) -> Result<Self, Error> {
        let bins = Binaries::locate()?;
        let dir = tempfile::Builder::new()
            .prefix("fleetlet-testenv-")
            .tempdir()?
            .keep();
        let mut env = TestEnv {
            dir: dir.clone(),
            controllers: None,
            kube: None,
            nats: None,
            nats_cluster: None,
            reaper: None,
        };
        if opts.kube {
            let kube = KubeControlPlane::start(bins, &dir).await?;
            if opts.crds {
                kube.install_crds().await?;
            }
            if opts.controllers {
                env.controllers = Some(kube.start_controllers(bins, &dir).await?);
            }
            env.kube = Some(kube);
        }
        if opts.nats {
            let nats = match &opts.nats_secured {
                None => {
                    NatsServer::start_with_args(&bins.nats_server, &dir, opts.nats_args.clone())
                        .await?
                }
                Some(sec) => {
                    let tls = if sec.tls {
                        let pki_dir = dir.join("nats-pki");
                        pki::Pki::generate()?.write(&pki_dir)?;
                        Some((
                            pki_dir.join("apiserver.crt"),
                            pki_dir.join("apiserver.key"),
                            pki_dir.join("ca.crt"),
                        ))
                    } else {
                        None
                    };
                    NatsServer::start_with_config(
                        &bins.nats_server,
                        &dir,
                        &sec.config,
                        sec.admin.clone(),
                        tls,
                    )
                    .await?
                }
            };
            ensure_buckets(nats.client().await?).await?;
            env.nats = Some(nats);
        }
        if let Some((size, config)) = &opts.nats_cluster {
            let size = *size;
            let cluster = NatsCluster::start_with(&bins.nats_server, &dir, size, config).await?;
            nats::ensure_buckets_with(cluster.client().await?, size).await?;
            env.nats_cluster = Some(cluster);
        }
        if std::env::var_os("FLEETLET_TESTENV_KEEP").is_none() {
            let mut pids = env
                .kube
                .as_ref()
                .map(KubeControlPlane::pids)
                .unwrap_or_default();
            pids.extend(env.nats.as_ref().and_then(NatsServer::pid));
            pids.extend(
                env.nats_cluster
                    .iter()
                    .flat_map(|c| c.nodes.iter().filter_map(NatsServer::pid)),
            );
            pids.extend(
                env.controllers
                    .as_ref()
                    .map(kube::Controllers::pids)
                    .unwrap_or_default(),
            );
            env.reaper = Some(DirReaper::spawn(&dir, &pids)?);
        } else {
            eprintln!("fleetlet-testenv: keeping {}", dir.display());
        }
        Ok(env)
    }

    fn kube_plane(&self) -> Result<&KubeControlPlane, Error> {
        self.kube
            .as_ref()
            .ok_or_else(|| Error::Setup("this environment was started without kube".into()))
    }

    fn nats_server(&self) -> Result<&NatsServer, Error> {
        self.nats
            .as_ref()
            .ok_or_else(|| Error::Setup("this environment was started without NATS".into()))
    }

    /// A new admin client (build one per test: clients belong to the runtime they ran in).
    pub async fn kube_client(&self) -> Result<::kube::Client, Error> {
        self.kube_plane()?.client().await
    }

    pub fn kubeconfig(&self) -> Result<&Path, Error> {
        Ok(&self.kube_plane()?.kubeconfig)
    }

    /// The server's URL, or every cluster node's, comma-separated.
    pub fn nats_url(&self) -> Result<&str, Error> {
        match &self.nats_cluster {
            Some(c) => Ok(&c.urls),
            None => Ok(&self.nats_server()?.url),
        }
    }

    pub async fn nats_client(&self) -> Result<async_nats::Client, Error> {
        match &self.nats_cluster {
            Some(c) => c.client().await,
            None => self.nats_server()?.client().await,
        }
    }

    /// A JetStream context on a new connection.
    pub async fn jetstream(&self) -> Result<async_nats::jetstream::Context, Error> {
        Ok(async_nats::jetstream::new(self.nats_client().await?))
    }

    /// The manifest stored for `device` in desired-state (opened from its signed envelope
    /// without checking the signature), or None when there is none.
    pub async fn desired_manifest(
        &self,
        device: &str,
    ) -> Result<Option<fleetlet_protocol::AgentManifest>, String> {
        let kv = self
            .jetstream()
            .await
            .map_err(|e| e.to_string())?
            .get_key_value(fleetlet_protocol::kv::DESIRED_STATE.name)
            .await
            .map_err(|e| e.to_string())?;
        let Some(entry) = kv.entry(device).await.map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        if entry.value.is_empty() {
            return Ok(None);
        }
        let text = match serde_json::from_slice::<fleetlet_protocol::signing::SignedManifest>(
            &entry.value,
        ) {
            Ok(env) => env.manifest.into_bytes(),
            Err(_) => entry.value.to_vec(),
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|e| format!("desired-state.{device} is not a manifest: {e}"))
    }

    /// `kubectl` pointed at this environment (it must be on PATH).
    pub fn kubectl(&self) -> Result<Command, Error> {
        let mut cmd = Command::new(std::env::var_os("KUBECTL").unwrap_or_else(|| "kubectl".into()));
        cmd.env("KUBECONFIG", self.kubeconfig()?);
        Ok(cmd)
    }

    /// Waits (up to 30 s) until Node `name` is `Ready=True`; panics otherwise (for tests).
    pub async fn wait_node_ready(&self, name: &str) {
        use k8s_openapi::api::core::v1::Node;
        let client = self.kube_client().await.expect("a kube client");
        let nodes: ::kube::Api<Node> = ::kube::Api::all(client);
        eventually(
            &format!("node {name} Ready"),
            std::time::Duration::from_secs(30),
            || async {
                let n = nodes.get(name).await.map_err(|e| e.to_string())?;
                let ready = n
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                ready.then_some(()).ok_or("not Ready".to_string())
            },
        )
        .await;
    }

    /// What `device`'s agent last wrote to `actual-state`, if anything readable.
    pub async fn agent_status(&self, device: &str) -> Option<fleetlet_protocol::AgentStatus> {
        let kv = self
            .jetstream()
            .await
            .ok()?
            .get_key_value(fleetlet_protocol::kv::ACTUAL_STATE.name)
            .await
            .ok()?;
        let e = kv.entry(device).await.ok()??;
        fleetlet_protocol::decode(&e.value).ok()
    }

    /// `kubectl apply -f` of `yaml`; Err with kubectl's output if it fails. While the
    /// apiserver's discovery does not list a kind yet (CRDs just established), it retries
    /// for up to 30 s, as a user would.
    pub fn apply(&self, yaml: &str) -> Result<(), Error> {
        let path = self.manifest_file(yaml)?;
        let deadline = std::time::Instant::now() + DEFAULT_TIMEOUT;
        loop {
            match chart::checked("kubectl apply", self.kubectl_apply(&path)?) {
                Err(Error::Setup(e))
                    if e.contains("no matches for kind")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(500));
                }
                other => return other.map(|_| ()),
            }
        }
    }

    /// `kubectl apply -f` of `yaml` as a command, for a caller that runs it itself (and
    /// does not wait on it, as [`TestEnv::apply`] does). `server_side` applies as GitOps
    /// tools do (`--server-side`: one request, no patch computed by kubectl).
    pub fn apply_command(&self, yaml: &str, server_side: bool) -> Result<Command, Error> {
        let mut cmd = self.kubectl_apply(&self.manifest_file(yaml)?)?;
        if server_side {
            cmd.arg("--server-side");
        }
        Ok(cmd)
    }

    /// `yaml` written to a file of its own under the environment's directory.
    fn manifest_file(&self, yaml: &str) -> Result<PathBuf, Error> {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = self.dir.join(format!("apply-{n}.yaml"));
        std::fs::write(&path, yaml)?;
        Ok(path)
    }

    fn kubectl_apply(&self, path: &Path) -> Result<Command, Error> {
        let mut cmd = self.kubectl()?;
        cmd.args(["apply", "-f"]).arg(path);
        Ok(cmd)
    }

    /// Creates a namespace with a unique name starting with `prefix`.
    pub async fn namespace(&self, prefix: &str) -> Result<String, Error> {
        use k8s_openapi::api::core::v1::Namespace;
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{prefix}-{}-{n}", std::process::id());
        let api: ::kube::Api<Namespace> = ::kube::Api::all(self.kube_client().await?);
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": { "name": name }
        }))
        .map_err(|e| Error::Setup(e.to_string()))?;
        api.create(&Default::default(), &ns).await?;
        Ok(name)
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        // Clients of the apiserver first, then the apiserver; the reaper waits for them all.
        self.controllers.take();
        self.kube.take();
        self.nats.take();
        self.nats_cluster.take();
        if let Some(mut r) = self.reaper.take() {
            r.reap();
        }
    }
}
