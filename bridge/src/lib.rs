//! fleetlet-bridge: makes the fleet visible in Kubernetes.
//!
//! From each device's heartbeats and status in NATS it keeps the EdgeDevice's status
//! (conditions Ready / Converged / Degraded, device facts, per-resource summary), one
//! virtual `Node` per device, and that Node's `Lease` in `kube-node-lease`, renewed from
//! the device's own heartbeats. Writes happen only when something changed; a steady fleet
//! costs Lease renewals, at most one per device per `--lease-renew-seconds`.

pub mod frames;
pub mod kubelet;
pub mod metrics;
pub mod mirror;
pub mod pods;
pub mod serving;
pub mod view;

use std::{
    collections::HashSet,
    future::Future,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use fleetlet_crds::{
    EdgeDevice,
    k8s_openapi::api::core::v1::Pod,
    kube::{
        Api, Client, ResourceExt,
        runtime::{WatchStreamExt, reflector, watcher},
    },
};
use fleetlet_plumbing::{
    Elector, KvCache, LeaderGated, NatsArgs, kvcache::ChangedKeys, shards::Ownership,
};
use fleetlet_protocol::{
    DeviceId, Heartbeat,
    kv::{ACTUAL_STATE, FACTS, HEARTBEAT},
};
use futures::StreamExt;
use tokio::{sync::Notify, time::Instant};
use tracing::{info, warn};

pub use metrics::Metrics;
pub use mirror::{Mirror, Writes};

#[derive(Debug, Clone, clap::Parser)]
#[command(
    version,
    about = "Mirrors device heartbeats and status into Kubernetes: EdgeDevice status, a Node and a Lease per device"
)]
pub struct Args {
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, env = "FLEETLET_METRICS_ADDR", default_value = "0.0.0.0:8081")]
    pub metrics_addr: SocketAddr,
    /// Seconds without a heartbeat before a device's node turns Ready=Unknown. Keep the
    /// kube-controller-manager's --node-monitor-grace-period at least this long.
    #[arg(long, env = "FLEETLET_GRACE_SECONDS", default_value_t = 90)]
    pub grace_seconds: u64,
    /// Renew a device's Lease at most this often (from its heartbeats). At 10,000 devices,
    /// 30 s is about 333 writes/s; it must stay well under the grace period.
    #[arg(long, env = "FLEETLET_LEASE_RENEW_SECONDS", default_value_t = 30)]
    pub lease_renew_seconds: u64,
    /// Refresh heartbeat times in EdgeDevice and Node status this often when nothing else
    /// changed. 0 (the default): never on a timer, only with another change; liveness is in
    /// the Lease and the Ready condition, so a steady device costs one write per renewal.
    /// 300 is kubelet's node status report frequency, at two writes per device per 5 min.
    #[arg(long, env = "FLEETLET_STATUS_REPORT_SECONDS", default_value_t = 0)]
    pub status_report_seconds: u64,
    /// Whether devices whose EdgeDevice does not set `spec.nodeProjection` appear as Nodes
    /// (`Enabled`) or only as EdgeDevices (`Disabled`: no Node, no Lease, no Pods).
    #[arg(long, env = "FLEETLET_NODE_PROJECTION", default_value = "Enabled")]
    pub node_projection: fleetlet_crds::NodeProjection,
    /// Seconds between full passes (grace timeouts are noticed on these).
    #[arg(long, env = "FLEETLET_RESYNC_SECONDS", default_value_t = 10)]
    pub resync_seconds: u64,
    #[arg(long, env = "POD_NAMESPACE", default_value = "fleetlet-system")]
    pub lease_namespace: String,
    #[arg(long, env = "FLEETLET_LEASE_NAME", default_value = "fleetlet-bridge")]
    pub lease_name: String,
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    #[arg(long, env = "FLEETLET_LEASE_SECONDS", default_value_t = 15)]
    pub lease_seconds: u64,
    /// Shards the fleet is split into between replicas, each held through a Lease of its
    /// own (`<lease-name>-shard-<k>`); 1 is a single leader on `--lease-name`. Every
    /// replica must be given the same number. Each replica writes the Nodes, Leases and
    /// status of its shards' devices and advertises its own kubelet endpoint on them.
    #[arg(long, env = "FLEETLET_SHARDS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub shards: u32,
    /// Serve the kubelet API (for `kubectl logs` / `exec`) of every virtual node here.
    #[arg(long, env = "FLEETLET_KUBELET_LISTEN")]
    pub kubelet_listen: Option<SocketAddr>,
    /// Address the apiserver reaches the kubelet API at (the Nodes' InternalIP); default:
    /// the listen address.
    #[arg(long, env = "FLEETLET_KUBELET_ADVERTISE_ADDRESS")]
    pub kubelet_advertise_address: Option<std::net::IpAddr>,
    /// Serving certificate and key of the kubelet API (PEM), e.g. from a mounted
    /// `kubernetes.io/tls` Secret.
    #[arg(
        long,
        env = "FLEETLET_KUBELET_TLS_CERT_FILE",
        requires = "kubelet_listen"
    )]
    pub kubelet_tls_cert_file: Option<std::path::PathBuf>,
    #[arg(
        long,
        env = "FLEETLET_KUBELET_TLS_KEY_FILE",
        requires = "kubelet_listen"
    )]
    pub kubelet_tls_key_file: Option<std::path::PathBuf>,
    /// Instead of files: get the serving certificate from the cluster with a
    /// CertificateSigningRequest for `kubernetes.io/kubelet-serving` (approved by the bridge
    /// if its RBAC allows, else by an administrator), renewed before it expires.
    #[arg(
        long,
        env = "FLEETLET_KUBELET_SERVING_CSR",
        requires = "kubelet_listen",
        conflicts_with = "kubelet_tls_cert_file"
    )]
    pub kubelet_serving_csr: bool,
    /// DNS names the CSR-issued certificate carries (besides the advertised address).
    #[arg(long, env = "FLEETLET_KUBELET_SERVING_DNS", value_delimiter = ',')]
    pub kubelet_serving_dns: Vec<String>,
    /// CA of accepted client certificates: the one that signed the apiserver's
    /// `--kubelet-client-certificate`.
    #[arg(
        long,
        env = "FLEETLET_KUBELET_CLIENT_CA_FILE",
        requires = "kubelet_listen"
    )]
    pub kubelet_client_ca_file: Option<std::path::PathBuf>,
    /// Declare `ExtendWebSocketsToKubelet` on the Nodes, so an apiserver of 1.36 or later
    /// proxies `exec`, `attach` and `port-forward` to the kubelet API as WebSockets. With
    /// `false` (and on 1.34 and 1.35 whatever it says) the apiserver speaks SPDY/3.1 to it,
    /// which it serves too.
    #[arg(
        long,
        env = "FLEETLET_KUBELET_WEBSOCKETS",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub kubelet_websockets: bool,
    /// Give every virtual node a port of its own from this range (`START-END`), on the
    /// kubelet API's address. Needed for `kubectl top` (metrics-server asks each node's
    /// address and port for its figures, with nothing naming the node); nodes past the end
    /// of the range keep the shared port.
    #[arg(
        long,
        env = "FLEETLET_KUBELET_NODE_PORTS",
        value_parser = kubelet::ports::parse_range,
        requires = "kubelet_listen"
    )]
    pub kubelet_node_ports: Option<std::ops::RangeInclusive<u16>>,
}

/// Why the bridge stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Plumbing(#[from] fleetlet_plumbing::Error),
    #[error("kubelet API: {0}")]
    Kubelet(#[from] kubelet::KubeletError),
    #[error("configuration: {0}")]
    Config(String),
}

/// Runs the bridge until `shutdown` resolves; `on_ready` gets the metrics address.
pub async fn run(
    args: Args,
    shutdown: impl Future<Output = ()>,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<(), Error> {
    let client = Client::try_default().await?;
    let nats = args.nats.connect("fleetlet-bridge").await?;
    let changed = Arc::new(Notify::new());
    let mut tasks = tokio::task::JoinSet::new();
    let watches = Watches::start(&client, &changed, &mut tasks);
    let actual = KvCache::new(ACTUAL_STATE);
    let heartbeats = KvCache::new(HEARTBEAT);
    let facts = KvCache::new(FACTS);
    // The bridge reads buckets without consumers (its NATS account may not create any):
    // the records JetStream republishes, after a listing by direct gets.
    const RELIST: Duration = Duration::from_secs(600);
    actual.spawn_republished(&mut tasks, &nats, &changed, RELIST);
    facts.spawn_republished(&mut tasks, &nats, &changed, RELIST);
    // A heartbeat wakes the passes and the lease loop.
    let beat = Arc::new(Notify::new());
    let lease_due = Arc::new(Notify::new());
    let beaten = heartbeats.changed_keys();
    heartbeats.spawn_republished(&mut tasks, &nats, &beat, RELIST);
    tasks.spawn({
        let (changed, lease_due) = (changed.clone(), lease_due.clone());
        async move {
            loop {
                beat.notified().await;
                changed.notify_one();
                lease_due.notify_one();
            }
        }
    });
    let metrics = Arc::new(Metrics::default());
    let (addr, ready) =
        fleetlet_plumbing::serve_metrics(args.metrics_addr, metrics.clone(), &mut tasks).await?;
    let mut mirror = Mirror::new(
        mirror::Context {
            client: client.clone(),
            devices: watches.devices.clone(),
            nodes: watches.nodes.clone(),
            actual: actual.clone(),
            heartbeats: heartbeats.clone(),
            facts: facts.clone(),
            metrics: metrics.clone(),
        },
        mirror::Timing {
            grace_ms: args.grace_seconds * 1000,
            report_every_ms: mirror::Timing::report_every(args.status_report_seconds),
            lease_renew_ms: args.lease_renew_seconds * 1000,
        },
    );
    mirror.node_projection = args.node_projection;
    if let Some(listen) = args.kubelet_listen {
        let (endpoint, server) =
            start_kubelet(&args, listen, &client, &nats, &mirror.ctx, &watches.pods).await?;
        mirror.kubelet_endpoint = Some(endpoint);
        mirror.node_ports = args
            .kubelet_node_ports
            .clone()
            .map(|r| std::sync::Mutex::new(kubelet::ports::NodePorts::new(r)));
        tasks.spawn(server);
    }
    let identity = fleetlet_plumbing::default_identity(args.identity.as_deref());
    let gate = LeaderGated {
        client,
        election: Elector::new(
            &args.lease_namespace,
            &args.lease_name,
            &identity,
            args.shards,
            args.lease_seconds,
        ),
        changed,
        settle: Duration::from_millis(20),
        // A step mirrors only the devices whose records changed: it stays prompt.
        pace: false,
        owned: tokio::sync::watch::Sender::new(Ownership::none(args.shards)),
    };
    let mirror = Arc::new(mirror);
    tasks.spawn(renew_leases(
        mirror.clone(),
        gate.owned.subscribe(),
        lease_due,
        beaten,
    ));
    info!(%identity, %addr, "bridge started");
    on_ready(addr);

    let resync = Duration::from_secs(args.resync_seconds.max(1));
    let mut next_full = Instant::now();
    let mut last_held = Ownership::none(args.shards);
    gate.run(shutdown, async |held| {
        let leader = held.any();
        metrics.set_held(held);
        if *held != last_held {
            // Shards gained or lost: a full pass takes the new ones' devices over.
            next_full = Instant::now();
            last_held = held.clone();
        }
        let is_synced = watches.synced.load(Ordering::Relaxed) && mirror.synced();
        ready.store(is_synced, Ordering::Relaxed);
        if leader && is_synced {
            let dirty = [
                actual.take_dirty(),
                heartbeats.take_dirty(),
                facts.take_dirty(),
                watches.take_dirty(),
            ];
            next_full = step(&mirror, &watches.pods, dirty, next_full, resync, held).await;
        }
        next_full
    })
    .await;
    tasks.abort_all();
    Ok(())
}

/// How often the lease loop looks at the Leases a pass just recorded or a renewal failed
/// to write, without being woken.
const LEASE_TICK: Duration = Duration::from_secs(1);
/// How long a burst of heartbeats may gather into one round of renewals.
const LEASE_SETTLE: Duration = Duration::from_millis(50);

/// The lease loop: while this instance leads, renews the Lease of every device of its
/// shards that beat since the last renewal (`beaten`), on its own clock (passes only say
/// which Leases there are). Woken by heartbeats (`due`) and once a [`LEASE_TICK`].
async fn renew_leases(
    mirror: Arc<Mirror>,
    mut leader: tokio::sync::watch::Receiver<Ownership>,
    due: Arc<Notify>,
    beaten: ChangedKeys<Heartbeat>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(LEASE_TICK) => {}
            _ = due.notified() => tokio::time::sleep(LEASE_SETTLE).await,
            Ok(()) = leader.changed() => {}
        }
        let beat = beaten.take();
        let held = leader.borrow_and_update().clone();
        if held.any() {
            // A shard given up: its devices' Leases are the next holder's.
            mirror.keep_leases(&held);
            mirror.renew_leases(beat).await;
        } else {
            mirror.forget_leases();
        }
    }
}

/// One leader pass: Pods on virtual nodes, then every device when the full pass is due
/// (at `next_full`), else the devices marked `dirty`. Returns when the next full pass is.
async fn step(
    mirror: &Mirror,
    pods: &reflector::Store<Pod>,
    dirty: [HashSet<DeviceId>; 4],
    next_full: Instant,
    resync: Duration,
    held: &Ownership,
) -> Instant {
    let (pod_status, pod_deletes) = pods::pass(mirror, pods, held).await;
    if pod_status + pod_deletes > 0 {
        tracing::debug!(pod_status, pod_deletes, "pods mirrored");
    }
    if Instant::now() >= next_full {
        // What is marked is covered by the full pass.
        mirror.pass(None, held).await;
        mirror
            .ctx
            .metrics
            .set_devices(mirror.ctx.devices.state().len());
        return Instant::now() + resync;
    }
    let only: HashSet<DeviceId> = dirty.into_iter().flatten().collect();
    if !only.is_empty() {
        mirror.pass(Some(only), held).await;
    }
    next_full
}

/// The bridge's reflectors: EdgeDevices (as [`view::stored_device`] keeps them; spec, label
/// and deletion changes mark the device for the next pass), its own Nodes (as
/// [`view::StoredNode`] keeps them), and Pods
/// bound to any node (the pass keeps those on its Nodes).
struct Watches {
    devices: reflector::Store<EdgeDevice>,
    nodes: reflector::Store<view::StoredNode>,
    pods: reflector::Store<Pod>,
    dirty: Arc<Mutex<HashSet<DeviceId>>>,
    synced: Arc<AtomicBool>,
}

impl Watches {
    fn start(client: &Client, changed: &Arc<Notify>, tasks: &mut tokio::task::JoinSet<()>) -> Self {
        let dirty: Arc<Mutex<HashSet<DeviceId>>> = Arc::default();
        let synced = Arc::new(AtomicBool::new(false));
        let mark = {
            let dirty = dirty.clone();
            move |d: &EdgeDevice| {
                if let (Ok(id), Ok(mut set)) = (DeviceId::new(d.name_any()), dirty.lock()) {
                    set.insert(id);
                }
            }
        };
        let (devices, device_task) = fleetlet_plumbing::watch_crd_with(
            Api::<EdgeDevice>::all(client.clone()),
            changed.clone(),
            synced.clone(),
            view::stored_device,
            mark,
        );
        let (nodes, node_writer) = reflector::store::<view::StoredNode>();
        let node_stream = watcher(
            Api::<view::StoredNode>::all(client.clone()),
            watcher::Config::default().labels(view::DEVICE_LABEL),
        )
        .default_backoff()
        .reflect(node_writer)
        .for_each(|_| futures::future::ready(()));
        let (pods, pod_writer) = reflector::store::<Pod>();
        let pod_stream = {
            let changed = changed.clone();
            watcher(
                Api::<Pod>::all(client.clone()),
                watcher::Config::default().fields("spec.nodeName!="),
            )
            .default_backoff()
            .reflect(pod_writer)
            .for_each(move |_| {
                changed.notify_one();
                futures::future::ready(())
            })
        };
        tasks.spawn(device_task);
        tasks.spawn(node_stream);
        tasks.spawn(pod_stream);
        Self {
            devices,
            nodes,
            pods,
            dirty,
            synced,
        }
    }

    /// Devices whose EdgeDevice changed since the last call.
    fn take_dirty(&self) -> HashSet<DeviceId> {
        self.dirty
            .lock()
            .map(|mut d| std::mem::take(&mut *d))
            .unwrap_or_default()
    }
}

/// Whether this apiserver knows `ExtendWebSocketsToKubelet` (1.36+). Older ones speak
/// SPDY to kubelets whatever a Node says, and on 1.34 a Node whose status declared it
/// never became Ready (`declaredFeatures` is newer than 1.34).
async fn declares_websockets(client: &Client) -> bool {
    match client.apiserver_version().await {
        Ok(info) => {
            let minor: String = info
                .minor
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            let known = info.major == "1" && minor.parse::<u32>().is_ok_and(|m| m >= 36)
                || info.major.parse::<u32>().is_ok_and(|m| m > 1);
            if !known {
                info!(version = %info.git_version, "this apiserver speaks SPDY to kubelets: the Nodes do not declare WebSockets");
            }
            known
        }
        Err(e) => {
            warn!(error = %e, "apiserver version unknown; declaring WebSockets on the Nodes");
            true
        }
    }
}

/// Starts the kubelet API every virtual node points at; returns the endpoint the Nodes
/// advertise and the server.
async fn start_kubelet(
    args: &Args,
    listen: SocketAddr,
    client: &Client,
    nats: &async_nats::Client,
    ctx: &mirror::Context,
    pods: &reflector::Store<Pod>,
) -> Result<(view::KubeletEndpoint, impl Future<Output = ()> + use<>), Error> {
    let advertise = args.kubelet_advertise_address.unwrap_or(listen.ip());
    let serving = match (
        args.kubelet_serving_csr,
        args.kubelet_tls_cert_file.clone(),
        args.kubelet_tls_key_file.clone(),
    ) {
        (true, _, _) => serving::ServingCert::Csr {
            name: args.lease_name.clone(),
            ips: vec![advertise],
            dns: args.kubelet_serving_dns.clone(),
        },
        (false, Some(cert), Some(key)) => serving::ServingCert::Files { cert, key },
        _ => {
            return Err(Error::Config(
                "--kubelet-listen needs --kubelet-tls-cert-file and --kubelet-tls-key-file, or --kubelet-serving-csr".into(),
            ));
        }
    };
    let Some(client_ca_file) = args.kubelet_client_ca_file.clone() else {
        return Err(Error::Config(
            "--kubelet-listen needs --kubelet-client-ca-file (the CA of the apiserver's kubelet client certificate)".into(),
        ));
    };
    let config = kubelet::KubeletConfig {
        listen,
        serving,
        client_ca_file,
        node_ports: args.kubelet_node_ports.clone(),
    };
    let (addr, server) = kubelet::serve(
        config,
        client.clone(),
        nats.clone(),
        ctx.nodes.clone(),
        pods.clone(),
        ctx.metrics.clone(),
    )
    .await?;
    let advertise = if advertise.is_unspecified() {
        addr.ip()
    } else {
        advertise
    };
    let endpoint = view::KubeletEndpoint {
        address: advertise.to_string(),
        port: addr.port(),
        websockets: args.kubelet_websockets && declares_websockets(client).await,
    };
    Ok((endpoint, server))
}
