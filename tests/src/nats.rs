//! A real nats-server with JetStream, restartable on the same port and store.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use async_nats::jetstream;

use crate::{
    Error,
    process::{Service, free_port, wait_until},
};

pub struct NatsServer {
    /// `nats://127.0.0.1:<port>`
    pub url: String,
    pub port: u16,
    pub monitor_port: u16,
    program: PathBuf,
    dir: PathBuf,
    extra_args: Vec<String>,
    /// Credentials the readiness check (and [`NatsServer::client`]) uses, when the server
    /// has an authorization block in its config file.
    admin: Option<NatsAuth>,
    /// CA that signed the server's certificate, when it serves TLS.
    pub ca_file: Option<PathBuf>,
    service: Option<Service>,
    starts: u32,
    /// `--server_name`; unique per node in a cluster.
    server_name: String,
    /// JetStream on (every server but a site's leaf node).
    jetstream: bool,
}

impl NatsServer {
    pub async fn start(program: &Path, dir: &Path) -> Result<Self, Error> {
        Self::start_with_args(program, dir, Vec::new()).await
    }

    /// Starts with extra command-line flags (e.g. `--user`/`--pass`); the readiness check
    /// then needs [`NatsServer::connect_options`] to match.
    pub async fn start_with_args(
        program: &Path,
        dir: &Path,
        extra_args: Vec<String>,
    ) -> Result<Self, Error> {
        let mut server = Self {
            extra_args,
            admin: None,
            ca_file: None,
            port: free_port()?,
            monitor_port: free_port()?,
            url: String::new(),
            program: program.to_path_buf(),
            dir: dir.to_path_buf(),
            service: None,
            starts: 0,
            server_name: "fleetlet-testenv".into(),
            jetstream: true,
        };
        server.url = format!("nats://127.0.0.1:{}", server.port);
        server.start_again().await?;
        Ok(server)
    }

    /// Starts with a config file (`config`: nats-server configuration text, e.g. an
    /// `authorization` block with per-user permissions). `admin` is a user of that config
    /// allowed everything; `tls`: serve TLS with `(cert, key, ca)` PEM files, and clients
    /// connect with `tls://`.
    pub async fn start_with_config(
        program: &Path,
        dir: &Path,
        config: &str,
        admin: NatsAuth,
        tls: Option<(PathBuf, PathBuf, PathBuf)>,
    ) -> Result<Self, Error> {
        let mut text = config.to_string();
        let mut ca_file = None;
        if let Some((cert, key, ca)) = tls {
            text.push_str(&format!(
                "\ntls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n}}\n",
                cert.display(),
                key.display()
            ));
            ca_file = Some(ca);
        }
        let path = dir.join("nats.conf");
        std::fs::write(&path, text)?;
        let port = free_port()?;
        let scheme = if ca_file.is_some() { "tls" } else { "nats" };
        let mut server = Self {
            extra_args: vec!["-c".into(), path.display().to_string()],
            admin: Some(admin),
            ca_file,
            port,
            monitor_port: free_port()?,
            url: format!("{scheme}://127.0.0.1:{port}"),
            program: program.to_path_buf(),
            dir: dir.to_path_buf(),
            service: None,
            starts: 0,
            server_name: "fleetlet-testenv".into(),
            jetstream: true,
        };
        server.start_again().await?;
        Ok(server)
    }

    /// A site's leaf node: `config` (the site's accounts and its link to the central
    /// servers), no JetStream; ready once `probe` (a device at the site) can connect.
    pub async fn start_leaf(
        program: &Path,
        dir: &Path,
        config: &str,
        probe: NatsAuth,
    ) -> Result<Self, Error> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("leaf.conf");
        std::fs::write(&path, config)?;
        let port = free_port()?;
        let mut server = Self {
            extra_args: vec!["-c".into(), path.display().to_string()],
            admin: Some(probe),
            ca_file: None,
            port,
            monitor_port: free_port()?,
            url: format!("nats://127.0.0.1:{port}"),
            program: program.to_path_buf(),
            dir: dir.to_path_buf(),
            service: None,
            starts: 0,
            server_name: "fleetlet-site".into(),
            jetstream: false,
        };
        server.start_again().await?;
        Ok(server)
    }

    /// Starts the server (again) on the same port with the same JetStream store.
    pub async fn start_again(&mut self) -> Result<(), Error> {
        if self.service.is_some() {
            return Ok(());
        }
        let service = self.spawn()?;
        self.wait_ready(service).await
    }

    /// Starts the process without waiting for it (a cluster node answers only once enough
    /// of its peers are up).
    fn spawn(&mut self) -> Result<Service, Error> {
        self.starts += 1;
        if self.starts > 1 {
            // Nothing holds on to the monitoring port across a restart, and another test may
            // have taken it while the server was down.
            self.monitor_port = free_port()?;
        }
        let store = if self.jetstream {
            vec![
                "-js".to_string(),
                "-sd".into(),
                self.dir.join("jetstream").display().to_string(),
            ]
        } else {
            Vec::new()
        };
        let args = vec![
            "-a".to_string(),
            "127.0.0.1".into(),
            "-p".into(),
            self.port.to_string(),
            "-m".into(),
            self.monitor_port.to_string(),
            "--server_name".into(),
            self.server_name.clone(),
        ];
        let args = [store, args, self.extra_args.clone()].concat();
        let log = self.dir.join(format!("nats-{}.log", self.starts));
        Service::spawn("nats-server", &self.program, &args, log)
    }

    /// Waits until `service` answers JetStream requests, then keeps it.
    async fn wait_ready(&mut self, mut service: Service) -> Result<(), Error> {
        let url = self.url.clone();
        let auth = self.auth();
        let ca = self.ca_file.clone();
        let jetstream = self.jetstream;
        wait_until("nats-server", &mut service, Duration::from_secs(30), || {
            let url = url.clone();
            let auth = auth.clone();
            let ca = ca.clone();
            async move {
                let client = connect_options(auth, ca)
                    .connect(&url)
                    .await
                    .map_err(|e| e.to_string())?;
                if !jetstream {
                    return Ok(());
                }
                // JetStream answers once the store is recovered.
                jetstream::new(client)
                    .query_account()
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        })
        .await?;
        self.service = Some(service);
        Ok(())
    }

    /// SIGKILLs the server, as a power cut would. [`NatsServer::start_again`] brings it back.
    pub fn kill(&mut self) -> Result<(), Error> {
        match self.service.take() {
            Some(mut s) => s.kill_program(),
            None => Ok(()),
        }
    }

    /// Stops the server; clients see a disconnect. [`NatsServer::start_again`] brings it back.
    pub fn stop(&mut self) {
        if let Some(mut s) = self.service.take() {
            s.stop();
        }
    }

    pub fn is_running(&self) -> bool {
        self.service.is_some()
    }

    pub async fn client(&self) -> Result<async_nats::Client, Error> {
        Ok(connect_options(self.auth(), self.ca_file.clone())
            .connect(&self.url)
            .await?)
    }

    /// The admin's credentials, or `--user`/`--pass` given to the server, if any.
    fn auth(&self) -> Option<NatsAuth> {
        if self.admin.is_some() {
            return self.admin.clone();
        }
        let flag = |name: &str| {
            self.extra_args
                .iter()
                .position(|a| a == name)
                .and_then(|i| self.extra_args.get(i + 1).cloned())
        };
        Some(NatsAuth::Password(flag("--user")?, flag("--pass")?))
    }

    /// nats-server's own pid (for measuring it).
    pub fn program_pid(&self) -> Option<u32> {
        self.service.as_ref().and_then(Service::program_pid)
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.service.as_ref().map(Service::pid)
    }
}

/// The password of `user` in [`crate::Builder::nats_accounts`] environments.
pub fn static_password(user: &str) -> String {
    format!("{user}-secret")
}

/// How the environment's admin client authenticates.
#[derive(Debug, Clone)]
pub enum NatsAuth {
    Password(String, String),
    /// A `.creds` file's text (decentralized auth: operator, accounts, user JWTs).
    Creds(String),
}

fn connect_options(auth: Option<NatsAuth>, ca: Option<PathBuf>) -> async_nats::ConnectOptions {
    let opts = match auth {
        Some(NatsAuth::Password(u, p)) => async_nats::ConnectOptions::with_user_and_password(u, p),
        // An unreadable creds text fails the connection, which the caller reports.
        Some(NatsAuth::Creds(c)) => async_nats::ConnectOptions::with_credentials(&c)
            .unwrap_or_else(|_| async_nats::ConnectOptions::new()),
        None => async_nats::ConnectOptions::new(),
    };
    match ca {
        Some(ca) => opts.add_root_certificates(ca).require_tls(true),
        None => opts,
    }
}

/// Creates fleetlet's KV buckets (idempotent, as the controller does) and returns the
/// JetStream context.
pub async fn ensure_buckets(client: async_nats::Client) -> Result<jetstream::Context, Error> {
    ensure_buckets_with(client, 1).await
}

/// [`ensure_buckets`] with `replicas` copies of each bucket (a cluster).
pub async fn ensure_buckets_with(
    client: async_nats::Client,
    replicas: usize,
) -> Result<jetstream::Context, Error> {
    let js = jetstream::new(client);
    fleetlet_controller::ensure_buckets(&js, replicas)
        .await
        .map_err(|e| Error::Setup(e.to_string()))?;
    Ok(js)
}

/// nats-servers with JetStream clustered over routes on loopback, one store each.
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
    /// Every node's client URL, comma-separated: what fleetlet's `--nats-url` takes.
    pub urls: String,
}

impl NatsCluster {
    /// Starts `size` nodes named `fleetlet-0`, `fleetlet-1`, … under `dir/nats-<i>`.
    pub async fn start(program: &Path, dir: &Path, size: usize) -> Result<Self, Error> {
        Self::start_with(program, dir, size, "").await
    }

    /// [`NatsCluster::start`] with `config` (nats-server configuration text, e.g. a
    /// `jetstream { sync_interval: always }` block) in every node's config file; the
    /// command line still sets ports, routes and store.
    pub async fn start_with(
        program: &Path,
        dir: &Path,
        size: usize,
        config: &str,
    ) -> Result<Self, Error> {
        let routes: Vec<u16> = (0..size).map(|_| free_port()).collect::<Result<_, _>>()?;
        let mut nodes = Vec::new();
        let mut spawned = Vec::new();
        for (i, own) in routes.iter().enumerate() {
            let node_dir = dir.join(format!("nats-{i}"));
            std::fs::create_dir_all(&node_dir)?;
            let peers: Vec<String> = routes
                .iter()
                .filter(|p| *p != own)
                .map(|p| format!("nats://127.0.0.1:{p}"))
                .collect();
            let port = free_port()?;
            let conf = node_dir.join("nats.conf");
            std::fs::write(&conf, config)?;
            let mut node = NatsServer {
                extra_args: vec![
                    "-c".into(),
                    conf.display().to_string(),
                    "--cluster_name".into(),
                    "fleetlet".into(),
                    "--cluster".into(),
                    format!("nats://127.0.0.1:{own}"),
                    "--routes".into(),
                    peers.join(","),
                ],
                admin: None,
                ca_file: None,
                port,
                monitor_port: free_port()?,
                url: format!("nats://127.0.0.1:{port}"),
                program: program.to_path_buf(),
                dir: node_dir,
                service: None,
                starts: 0,
                server_name: format!("fleetlet-{i}"),
                jetstream: true,
            };
            spawned.push(node.spawn()?);
            nodes.push(node);
        }
        for (node, service) in nodes.iter_mut().zip(spawned) {
            node.wait_ready(service).await?;
        }
        let urls = nodes
            .iter()
            .map(|n| n.url.clone())
            .collect::<Vec<_>>()
            .join(",");
        Ok(Self { nodes, urls })
    }

    /// A client that knows every node (and fails over between them).
    pub async fn client(&self) -> Result<async_nats::Client, Error> {
        let addrs = self
            .nodes
            .iter()
            .map(|n| n.url.parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Setup(e.to_string()))?;
        Ok(async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(addrs)
            .await?)
    }

    /// Where `stream` lives in the cluster now: its leader and replicas.
    async fn placement(&self, stream: &str) -> Result<jetstream::stream::ClusterInfo, Error> {
        let js = jetstream::new(self.client().await?);
        let mut stream = js
            .get_stream(stream)
            .await
            .map_err(|e| Error::Setup(e.to_string()))?;
        let info = stream
            .info()
            .await
            .map_err(|e| Error::Setup(e.to_string()))?;
        Ok(info.cluster.clone().unwrap_or_default())
    }

    /// The index of the node that leads `stream` now.
    pub async fn leader_of(&self, stream: &str) -> Result<usize, Error> {
        let leader = self
            .placement(stream)
            .await?
            .leader
            .ok_or_else(|| Error::Setup(format!("{stream} has no leader")))?;
        self.nodes
            .iter()
            .position(|n| n.server_name == leader)
            .ok_or_else(|| Error::Setup(format!("{stream} is led by unknown {leader}")))
    }

    /// Whether every replica of `stream` is current (none lagging or offline).
    pub async fn replicas_current(&self, stream: &str) -> Result<bool, Error> {
        let replicas = self.placement(stream).await?.replicas;
        Ok(replicas.len() + 1 == self.nodes.len()
            && replicas.iter().all(|r| r.current && !r.offline))
    }

    /// Starts every stopped node again, all at once (a quorum must form before any answers).
    pub async fn start_all(&mut self) -> Result<(), Error> {
        let mut spawned = Vec::new();
        for (i, n) in self.nodes.iter_mut().enumerate() {
            if n.service.is_none() {
                spawned.push((i, n.spawn()?));
            }
        }
        for (i, service) in spawned {
            self.nodes[i].wait_ready(service).await?;
        }
        Ok(())
    }
}

/// Decentralized auth for a test server, as `fleetlet-controller nats-init` sets it up: the
/// operator, system, fleet and bridge accounts, and an administrator of the fleet account
/// allowed everything (what the environment creates the buckets with).
pub struct Operator {
    pub authority: fleetlet_controller::identity::Authority,
    /// The server configuration (`nats-auth.conf`).
    pub config: String,
    /// The administrator's `.creds` text.
    pub admin_creds: String,
}

impl Operator {
    /// New keys; the resolver keeps account JWTs in `resolver_dir`.
    pub fn generate(resolver_dir: &Path) -> Result<Self, Error> {
        let authority = fleetlet_controller::identity::Authority::generate();
        Self::from_authority(authority, resolver_dir)
    }

    /// The keys `fleetlet-controller nats-init` wrote to `keys` (`authority.json`,
    /// `nats-auth.conf`).
    pub fn from_dir(keys: &Path) -> Result<Self, Error> {
        let authority =
            fleetlet_controller::identity::Authority::from_file(&keys.join("authority.json"))
                .map_err(|e| Error::Setup(e.to_string()))?;
        let config = std::fs::read_to_string(keys.join("nats-auth.conf"))?;
        let admin_creds = authority
            .issue_fleet_user("admin", None)
            .map_err(|e| Error::Setup(e.to_string()))?
            .creds;
        Ok(Self {
            authority,
            config,
            admin_creds,
        })
    }

    fn from_authority(
        authority: fleetlet_controller::identity::Authority,
        resolver_dir: &Path,
    ) -> Result<Self, Error> {
        let setup = |e: fleetlet_controller::identity::IdentityError| Error::Setup(e.to_string());
        let config = authority.server_config(resolver_dir).map_err(setup)?;
        let admin_creds = authority
            .issue_fleet_user("admin", None)
            .map_err(setup)?
            .creds;
        Ok(Self {
            authority,
            config,
            admin_creds,
        })
    }

    /// A connection of the system account to `server` (it may push account JWTs).
    pub async fn system_client(&self, server: &NatsServer) -> Result<async_nats::Client, Error> {
        let creds = self
            .authority
            .system_user()
            .map_err(|e| Error::Setup(e.to_string()))?;
        Ok(
            connect_options(Some(NatsAuth::Creds(creds)), server.ca_file.clone())
                .connect(&server.url)
                .await?,
        )
    }

    /// Enrols `device` as the controller does: a new account of its own, pushed through
    /// `sys` (a [`Operator::system_client`]). Returns the device's identity (its `.creds`
    /// in `user.creds`).
    pub async fn enroll(
        &self,
        sys: &async_nats::Client,
        device: &str,
    ) -> Result<fleetlet_controller::identity::DeviceIdentity, Error> {
        let id =
            fleetlet_protocol::DeviceId::new(device).map_err(|e| Error::Setup(e.to_string()))?;
        let identity = self
            .authority
            .issue_device(&id)
            .map_err(|e| Error::Setup(e.to_string()))?;
        fleetlet_controller::identity::push_account_jwt(sys, identity.account_jwt.clone())
            .await
            .map_err(|e| Error::Setup(e.to_string()))?;
        Ok(identity)
    }
}

/// A site: devices at one place connected to a leaf node of their own, whose one link to
/// the central server runs through a proxy the test can cut (the site's uplink).
pub struct Site {
    pub leaf: NatsServer,
    pub uplink: crate::proxy::TcpProxy,
}

impl Site {
    /// Starts the leaf node for `devices` (each a user named after it, with
    /// [`static_password`]), linked as site `name` to the central server through `uplink`
    /// (see [`crate::Builder::nats_site`]).
    pub async fn start(
        program: &Path,
        dir: &Path,
        name: &str,
        devices: &[&str],
        uplink: crate::proxy::TcpProxy,
    ) -> Result<Self, Error> {
        use fleetlet_protocol::access::{User, site_accounts, site_leafnode};
        let users: Vec<_> = devices
            .iter()
            .filter_map(|d| {
                Some((
                    fleetlet_protocol::DeviceId::new(*d).ok()?,
                    User::new(d, &static_password(d)),
                ))
            })
            .collect();
        let link = uplink.nats_url().replacen("nats://", "nats-leaf://", 1);
        let config = format!(
            "{}{}",
            site_accounts(&users),
            site_leafnode(&[link], &User::new(name, &static_password(name)))
        );
        let probe = devices
            .first()
            .ok_or_else(|| Error::Setup("a site needs a device".into()))?;
        let leaf = NatsServer::start_leaf(
            program,
            dir,
            &config,
            NatsAuth::Password((*probe).to_owned(), static_password(probe)),
        )
        .await?;
        Ok(Self { leaf, uplink })
    }

    /// Whether the leaf node's link to the central server is up (its monitoring port).
    pub fn linked(&self) -> bool {
        crate::bench::nats_monitor(self.leaf.monitor_port, "/leafz")["leafnodes"]
            .as_u64()
            .is_some_and(|n| n > 0)
    }

    /// Waits until the link is up (`up`) or down.
    pub async fn wait_linked(&self, up: bool) {
        let what = if up {
            "the leaf node's link up"
        } else {
            "the leaf node's link down"
        };
        crate::eventually(what, Duration::from_secs(30), || async {
            (self.linked() == up)
                .then_some(())
                .ok_or_else(|| format!("linked: {}", self.linked()))
        })
        .await;
    }

    /// A client of the leaf node as device `user` (password [`static_password`]).
    pub async fn connect(&self, user: &str) -> Result<async_nats::Client, Error> {
        Ok(
            async_nats::ConnectOptions::with_user_and_password(user.into(), static_password(user))
                .request_timeout(Some(Duration::from_secs(2)))
                .connect(&self.leaf.url)
                .await?,
        )
    }
}
