//! fleetlet-controller: EdgeManifests + EdgeDevices → one AgentManifest per device in NATS.
//!
//! A single level-triggered fleet loop (see [`fleet`]) recomputes every device's manifest
//! from reflector stores of the CRDs and mirrors of the KV buckets, and writes only what
//! differs, with compare-and-set. [`plan`] holds the rules (selection, conflicts, rollout)
//! as pure code.

pub mod events;
pub mod fleet;
pub mod identity;
pub mod metrics;
pub mod orphans;
pub mod plan;
pub mod pods;
pub mod reports;
pub mod sealing;
pub mod selector;
pub mod signing;
pub mod status;

use std::{
    future::Future,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_nats::jetstream;
use fleetlet_crds::{
    EdgeDevice, EdgeDeviceStatus, EdgeManifest,
    kube::{
        self, Api, Client,
        runtime::{
            events::{Recorder, Reporter},
            watcher,
        },
    },
};
use fleetlet_protocol::kv::{ACTUAL_STATE, BUCKETS, DESIRED_STATE, FACTS, HEARTBEAT};
use tokio::sync::Notify;
use tracing::{info, warn};

pub use fleet::{Fleet, PassSummary};
// The shared plumbing, under the names the controller's modules use.
pub use fleetlet_plumbing::{
    Elector, KvCache, LeaderGated, NatsArgs, any_change, default_identity, fingerprint,
    init_tracing, keep_all, kvcache, leader, serve_metrics, shards, shutdown_signal, slim, stopped,
    watch_crd, watch_objects,
};
pub use metrics::Metrics;

/// Field manager for every server-side apply the controller makes.
pub const FIELD_MANAGER: &str = "fleetlet-controller";
/// Held on every EdgeManifest until its resources are off every device.
pub const FINALIZER: &str = "fleetlet.dev/device-cleanup";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    #[error("connecting to NATS: {0}")]
    NatsConnect(#[from] async_nats::ConnectError),
    #[error("NATS KV: {0}")]
    Kv(String),
    #[error("encoding: {0}")]
    Encode(String),
    #[error("configuration: {0}")]
    Config(String),
    #[error("serving metrics on {addr}: {source}")]
    Http {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl From<fleetlet_plumbing::Error> for Error {
    fn from(e: fleetlet_plumbing::Error) -> Self {
        match e {
            fleetlet_plumbing::Error::NatsConnect(e) => Self::NatsConnect(e),
            fleetlet_plumbing::Error::Credentials(m) => Self::Config(m),
            fleetlet_plumbing::Error::Http { addr, source } => Self::Http { addr, source },
        }
    }
}

impl Error {
    /// A bounded label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Kube(_) => "kube",
            Self::NatsConnect(_) | Self::Kv(_) => "nats",
            Self::Encode(_) => "encode",
            Self::Http { .. } => "http",
            Self::Config(_) => "config",
        }
    }
}

/// Command-line settings (each also from the environment).
#[derive(Debug, Clone, clap::Parser)]
#[command(
    version,
    about = "Turns EdgeManifests and EdgeDevices into per-device manifests in NATS"
)]
pub struct Args {
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Replicas for the KV buckets the controller creates (3 in production clusters).
    #[arg(long, env = "FLEETLET_KV_REPLICAS", default_value_t = 1)]
    pub kv_replicas: usize,
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, env = "FLEETLET_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "fleetlet-system")]
    pub lease_namespace: String,
    #[arg(
        long,
        env = "FLEETLET_LEASE_NAME",
        default_value = "fleetlet-controller"
    )]
    pub lease_name: String,
    /// Shards the fleet is split into between replicas, each held through a Lease of its
    /// own (`<lease-name>-shard-<k>`); 1 is a single leader on `--lease-name`. Every
    /// replica of one controller must be given the same number.
    #[arg(long, env = "FLEETLET_SHARDS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub shards: u32,
    /// This instance's name in the Lease; defaults to the pod name or hostname and pid.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    #[arg(long, env = "FLEETLET_LEASE_SECONDS", default_value_t = 15)]
    pub lease_seconds: u64,
    /// Seconds without a heartbeat after which a device no longer holds a rollout back.
    #[arg(long, env = "FLEETLET_OFFLINE_AFTER_SECONDS", default_value_t = 120)]
    pub offline_after_seconds: u64,
    /// Default seconds a rollout may go without progress before Progressing=False.
    #[arg(
        long,
        env = "FLEETLET_PROGRESS_DEADLINE_SECONDS",
        default_value_t = 600
    )]
    pub progress_deadline_seconds: u64,
    /// Seconds a written manifest generation waits before the controller records it in the
    /// EdgeDevice's `status.desiredGeneration`: a device that reports it applied by then
    /// needs no record (its `appliedGeneration` covers it), which saves one status write
    /// per device and rollout. 0 records every generation at once; so does manifest
    /// signing, whose freshness floors are served from this record.
    #[arg(
        long,
        env = "FLEETLET_RECORD_GENERATION_AFTER_SECONDS",
        default_value_t = 5
    )]
    pub record_generation_after_seconds: u64,
    /// Seconds between passes when nothing changes (deadlines, offline detection).
    #[arg(long, env = "FLEETLET_RESYNC_SECONDS", default_value_t = 30)]
    pub resync_seconds: u64,
    /// Run Pods bound to virtual nodes on their devices (watches Pods and Nodes cluster-wide,
    /// and ConfigMaps and Secrets cluster-wide or in `--pod-namespaces`).
    #[arg(long, env = "FLEETLET_PODS", default_value_t = true, action = clap::ArgAction::Set)]
    pub pods: bool,
    /// Namespaces whose Pods may run on devices: the controller reads (and needs RBAC for)
    /// ConfigMaps and Secrets only there, and refuses Pods elsewhere. Empty: every namespace.
    #[arg(long, env = "FLEETLET_POD_NAMESPACES", value_delimiter = ',')]
    pub pod_namespaces: Vec<String>,
    /// Sign every manifest with this ed25519 key (PKCS#8, PEM or DER); agents that list its
    /// public key in `[trust] manifest_keys` accept nothing else.
    #[arg(long, env = "FLEETLET_MANIFEST_SIGNING_KEY")]
    pub manifest_signing_key: Option<PathBuf>,
    /// The key's id in manifests and agents' configs (default: derived from the public key).
    #[arg(
        long,
        env = "FLEETLET_MANIFEST_SIGNING_KEY_ID",
        requires = "manifest_signing_key"
    )]
    pub manifest_signing_key_id: Option<String>,
    /// Sign every manifest with the key in this Secret of the controller's namespace
    /// (`--lease-namespace`), creating it with a new key the first time (what the Helm
    /// chart does). Agents list its public key (`public-key` in the Secret, and in every
    /// device's enrolment Secret) in `[trust] manifest_keys`.
    #[arg(
        long,
        env = "FLEETLET_MANIFEST_SIGNING_SECRET",
        conflicts_with = "manifest_signing_key"
    )]
    pub manifest_signing_secret: Option<String>,
    /// Issue each device its own NATS identity with these keys (written by
    /// `fleetlet-controller nats-init`): credentials go to a Secret `<device>-nats` next to
    /// the EdgeDevice, and deleting or revoking the device revokes them on the server. The
    /// controller also connects with an identity of its own from these keys unless
    /// `--nats-creds` or `--nats-user` is given.
    #[arg(long, env = "FLEETLET_NATS_AUTHORITY")]
    pub nats_authority: Option<PathBuf>,
    /// NATS URL(s) devices use, written into the agent configuration of each device's
    /// credentials Secret.
    #[arg(long, env = "FLEETLET_DEVICE_NATS_URL", value_delimiter = ',')]
    pub device_nats_url: Vec<String>,
    /// The ConfigMap (in the controller's namespace) recording which device has which NATS
    /// identity. The Helm chart names it after the release.
    #[arg(
        long,
        env = "FLEETLET_NATS_IDENTITIES_CONFIG_MAP",
        default_value = identity::IDENTITIES_CONFIG_MAP
    )]
    pub nats_identities_config_map: String,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// One-off tasks instead of running the controller.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Write a new manifest signing key (PKCS#8 PEM, mode 0600) and print the line agents
    /// need in `[trust] manifest_keys`; with an existing FILE, print that line only.
    SigningKey {
        file: PathBuf,
        #[arg(long)]
        id: Option<String>,
    },
    /// Sign an agent binary for `agentUpgrade` with the manifest signing key in KEY, and
    /// print the `binaries` entry for it (add the URL the devices download it from).
    SignAgentBinary {
        /// The signing key (as for `signing-key`).
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        id: Option<String>,
        /// The version the binary reports (`fleetlet-agent --version`).
        #[arg(long)]
        version: String,
        /// `x86_64`, `aarch64` or `arm`.
        #[arg(long)]
        arch: String,
        /// Where devices will download it (https://).
        #[arg(long)]
        url: String,
        binary: PathBuf,
    },
    /// Create the keys of fleetlet's NATS identities in DIR: `authority.json` (secret; for
    /// `--nats-authority`), `nats-auth.conf` (include it in nats-server's configuration)
    /// and `bridge.creds` (the bridge's identity).
    NatsInit {
        dir: PathBuf,
        /// Where nats-server keeps account JWTs (default: DIR/jwt).
        #[arg(long)]
        resolver_dir: Option<PathBuf>,
    },
    /// Write a static nats-server configuration (no operator) in DIR: `accounts.conf`,
    /// the fleet's accounts with one account per device (include it in nats-server's
    /// configuration), and `passwords.txt` with the new random password of every user
    /// (controller, bridge, each device). Both mode 0600; existing files are kept.
    ///
    /// With `--site`, also one account per site on the central servers (enable their leaf
    /// node listener) and `site-NAME.conf` for the site's own nats-server, a leaf node:
    /// its devices' accounts and its link to `--leafnode-url`.
    NatsAccounts {
        dir: PathBuf,
        /// Device ids, comma-separated or repeated.
        #[arg(long = "device", value_delimiter = ',', required = true)]
        devices: Vec<String>,
        /// A site behind a leaf node: NAME=DEVICE[,DEVICE...] (devices among --device);
        /// repeat for more sites.
        #[arg(long = "site")]
        sites: Vec<String>,
        /// The central servers' leaf node listeners the sites connect to
        /// (`nats-leaf://host:7422` or `tls://host:7422`); comma-separated or repeated.
        #[arg(long = "leafnode-url", value_delimiter = ',')]
        leafnode_urls: Vec<String>,
    },
}

impl Args {
    fn identity(&self) -> String {
        self.identity.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .unwrap_or_else(|_| "controller".into());
            format!("{}-{}", host.trim(), std::process::id())
        })
    }
}

/// Creates (or updates the settings of) fleetlet's KV buckets; the controller owns them.
/// Returns each stream's information, in [`BUCKETS`] order.
pub async fn ensure_buckets(
    js: &jetstream::Context,
    replicas: usize,
) -> Result<Vec<jetstream::stream::Info>, Error> {
    let mut infos = Vec::with_capacity(BUCKETS.len());
    for b in BUCKETS {
        let info = js
            .create_or_update_stream(bucket_stream(b, replicas))
            .await
            .map_err(|e| Error::Kv(format!("creating bucket {}: {e}", b.name)))?;
        infos.push(info);
    }
    Ok(infos)
}

/// Removes `key` from a bucket: a delete marker first, which readers see on the changes
/// subject, then a purge of everything stored for the key (the marker too). The buckets
/// refuse rollup headers, so a KV purge is not available.
pub async fn remove_key(store: &jetstream::kv::Store, key: &str) -> Result<(), Error> {
    store
        .delete(key)
        .await
        .map_err(|e| Error::Kv(format!("deleting {key}: {e}")))?;
    store
        .stream
        .purge()
        .filter(format!("{}{key}", store.prefix))
        .await
        .map_err(|e| Error::Kv(format!("purging {key}: {e}")))?;
    Ok(())
}

/// The stream behind bucket `b`: what a KV bucket is (one subject per key, direct gets,
/// deletes as markers), with every stored record republished on its changes subject
/// (readers subscribe there instead of creating consumers) and rollup headers refused (a
/// rollup on one key would purge every device's key; the controller removes keys with a
/// filtered purge instead).
pub fn bucket_stream(
    b: fleetlet_protocol::kv::Bucket,
    replicas: usize,
) -> jetstream::stream::Config {
    use jetstream::stream::{Config, DiscardPolicy, Republish};
    Config {
        name: b.stream(),
        description: Some(b.description.into()),
        subjects: vec![b.all_subjects()],
        max_messages_per_subject: b.history,
        max_message_size: b.max_value_size,
        num_replicas: replicas.max(1),
        republish: Some(Republish {
            source: b.all_subjects(),
            destination: format!("{}.{}.>", fleetlet_protocol::kv::CHANGES_PREFIX, b.name),
            headers_only: false,
        }),
        allow_rollup: false,
        deny_delete: true,
        deny_purge: false,
        allow_direct: true,
        discard: DiscardPolicy::New,
        ..Default::default()
    }
}

/// Runs the controller until `shutdown` resolves. `on_ready` receives the metrics address.
pub async fn run(
    args: Args,
    shutdown: impl Future<Output = ()>,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<(), Error> {
    let wiring = Wiring::connect(&args).await?;
    let (client, nats) = (wiring.client.clone(), wiring.nats.clone());
    let js = jetstream::new(nats.clone());
    let created = ensure_buckets(&js, args.kv_replicas).await?;
    let stores = bind_buckets(&js).await?;
    let changed = Arc::new(Notify::new());
    let mut tasks = tokio::task::JoinSet::new();
    let mut watches = Watches::start(
        &client,
        &changed,
        args.pods.then_some(args.pod_namespaces.as_slice()),
        &mut tasks,
    );
    const RELIST: Duration = Duration::from_secs(600);
    let desired = KvCache::new(DESIRED_STATE);
    let actual = KvCache::new(ACTUAL_STATE);
    let heartbeats = KvCache::new_quiet(HEARTBEAT);
    // Quiet too: a device's first facts start a pass (its sealing key has come), a refresh
    // of the same facts does not.
    let facts = KvCache::new_quiet(FACTS);
    // Mirrored from the records JetStream republishes once stored, after a listing by
    // direct gets: no consumer, so nothing on the servers to place, lose with a node or
    // recreate after a failover (an ordered consumer's recreation can be placed on a dead
    // node and then fail until that node returns).
    // In BUCKETS order, for keep_buckets to ask for a listing of a bucket it recreated.
    let relists = [
        desired.spawn_republished(&mut tasks, &nats, &changed, RELIST),
        actual.spawn_republished(&mut tasks, &nats, &changed, RELIST),
        heartbeats.spawn_republished(&mut tasks, &nats, &changed, RELIST),
        facts.spawn_republished(&mut tasks, &nats, &changed, RELIST),
    ];
    let metrics = Arc::new(Metrics::default());
    let (metrics_addr, ready) =
        serve_metrics(args.metrics_addr, metrics.clone(), &mut tasks).await?;
    let identity = args.identity();
    let reporter = Reporter {
        controller: FIELD_MANAGER.into(),
        instance: Some(identity.clone()),
    };
    let (status_tx, status_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut fleet = Fleet::new(
        fleet::Context {
            client: client.clone(),
            devices: watches.devices.clone(),
            manifests: watches.manifests.clone(),
            desired: desired.clone(),
            actual,
            heartbeats,
            facts,
            stores,
            recorder: Recorder::new(client.clone(), reporter),
            metrics: metrics.clone(),
        },
        fleet::Deadlines {
            offline_after: Duration::from_secs(args.offline_after_seconds),
            progress_deadline: Duration::from_secs(args.progress_deadline_seconds),
        },
        status_tx,
    )
    .with_recording(fleet::Recording::after(Duration::from_secs(
        args.record_generation_after_seconds,
    )));
    if let Some(pods) = watches.pods.take() {
        fleet = fleet.with_pods(pods);
    }
    if let Some(signer) = wiring.signer {
        info!(key = %signer.id, "signing manifests");
        let signer = Arc::new(signer);
        fleet = fleet.with_signer(signer.clone());
        let floor_of = generation_floor(watches.devices.clone(), desired, ready.clone());
        tasks.spawn(signing::serve_floors(nats.clone(), signer, floor_of));
    }
    tasks.spawn(keep_buckets(js.clone(), args.kv_replicas, created, relists));
    tasks.spawn(Fleet::write_device_statuses(
        client.clone(),
        fleet.queued_generations(),
        status_rx,
        fleet.ctx.actual.clone(),
        fleet.recording(),
        metrics.clone(),
    ));
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
        // Let a burst of changes settle into one pass. During a rollout, device statuses
        // come all the time: a pass waits as long as the last one took, so fleet-wide
        // passes do not run back to back.
        settle: Duration::from_millis(50),
        pace: true,
        owned: tokio::sync::watch::Sender::new(shards::Ownership::none(args.shards)),
    };
    info!(%identity, %metrics_addr, "controller started");
    on_ready(metrics_addr);

    let resync = Duration::from_secs(args.resync_seconds.max(1));
    let identities = wiring.identities;
    gate.run(shutdown, async |held| {
        metrics.set_held(held);
        let synced = watches.synced() && fleet.synced();
        ready.store(synced, Ordering::Relaxed);
        if held.any() && synced {
            pass(&fleet, identities.as_ref(), held).await;
        }
        tokio::time::Instant::now() + resync
    })
    .await;
    tasks.abort_all();
    Ok(())
}

/// One pass over what this instance holds: device identities first (a deleted device
/// loses access before anything else), then the fleet. Identities are one record (the
/// ledger, written compare-and-set), kept by the holder of shard 0.
async fn pass(fleet: &Fleet, identities: Option<&identity::Identities>, held: &shards::Ownership) {
    if let Some(ids) = identities
        && held.holds_shard(0)
        && let Err(e) = ids.reconcile(&fleet.device_objects()).await
    {
        fleet.ctx.metrics.error("identity");
        warn!(error = %e, "device identities");
    }
    if let Err(e) = fleet.reconcile(held).await {
        fleet.ctx.metrics.error(e.category());
        warn!(error = %e, category = e.category(), "pass failed");
    }
}

/// The KV buckets the fleet loop writes.
async fn bind_buckets(js: &jetstream::Context) -> Result<fleet::Buckets, Error> {
    let bind = async |name: &str| {
        js.get_key_value(name)
            .await
            .map_err(|e| Error::Kv(e.to_string()))
    };
    Ok(fleet::Buckets {
        desired: bind(DESIRED_STATE.name).await?,
        actual: bind(ACTUAL_STATE.name).await?,
        heartbeat: bind(HEARTBEAT.name).await?,
        facts: bind(FACTS.name).await?,
    })
}

/// The controller's connections and keys, made before anything runs: a bad key or
/// authority file is a configuration error at start.
struct Wiring {
    client: Client,
    nats: async_nats::Client,
    signer: Option<signing::Signer>,
    /// Per-device NATS identities, when the controller holds the authority's keys.
    identities: Option<identity::Identities>,
}

impl Wiring {
    async fn connect(args: &Args) -> Result<Self, Error> {
        let signer = args
            .manifest_signing_key
            .as_deref()
            .map(|path| signing::Signer::from_file(path, args.manifest_signing_key_id.clone()))
            .transpose()?;
        let authority = args
            .nats_authority
            .as_deref()
            .map(identity::Authority::from_file)
            .transpose()
            .map_err(|e| Error::Config(e.to_string()))?
            .map(Arc::new);
        let client = Client::try_default().await?;
        let signer = match (signer, &args.manifest_signing_secret) {
            (None, Some(name)) => {
                Some(signing::Signer::from_secret(&client, &args.lease_namespace, name).await?)
            }
            (signer, _) => signer,
        };
        let own_creds = match &authority {
            Some(a) if args.nats.nats_creds.is_none() && args.nats.nats_user.is_none() => Some(
                a.issue_fleet_user(
                    "fleetlet-controller",
                    Some(&fleetlet_protocol::access::controller()),
                )
                .map_err(|e| Error::Config(e.to_string()))?
                .creds,
            ),
            _ => None,
        };
        let nats = args
            .nats
            .connect_with("fleetlet-controller", own_creds.as_deref())
            .await?;
        let identities = match &authority {
            Some(a) => Some(Self::identities(args, a, &client, signer.as_ref()).await?),
            None => None,
        };
        Ok(Self {
            client,
            nats,
            signer,
            identities,
        })
    }

    /// Device identities issued from `authority`, revoked through a system-account
    /// connection, with enrolment Secrets that carry the manifest key to trust.
    async fn identities(
        args: &Args,
        authority: &Arc<identity::Authority>,
        client: &Client,
        signer: Option<&signing::Signer>,
    ) -> Result<identity::Identities, Error> {
        let creds = authority
            .system_user()
            .map_err(|e| Error::Config(e.to_string()))?;
        let sys = args
            .nats
            .connect_with("fleetlet-controller-system", Some(&creds))
            .await?;
        let trust = signer.map(|s| (s.id.clone(), s.public_key_base64()));
        Ok(identity::Identities::new(
            authority.clone(),
            client.clone(),
            args.lease_namespace.clone(),
            sys,
        )
        .with_enrollment(args.device_nats_url.clone(), trust)
        .with_config_map(args.nats_identities_config_map.clone()))
    }
}

/// The controller's reflectors: EdgeDevices and EdgeManifests, and with the kubelet
/// facade on, Pods bound to nodes, the virtual Nodes, ConfigMaps and Secrets.
struct Watches {
    devices: kube::runtime::reflector::Store<EdgeDevice>,
    manifests: kube::runtime::reflector::Store<EdgeManifest>,
    pods: Option<pods::PodWatch>,
    synced: Vec<Arc<AtomicBool>>,
}

impl Watches {
    fn start(
        client: &Client,
        changed: &Arc<Notify>,
        pod_namespaces: Option<&[String]>,
        tasks: &mut tokio::task::JoinSet<()>,
    ) -> Self {
        let mut synced = Vec::new();
        let mut flag = || {
            let f = Arc::new(AtomicBool::new(false));
            synced.push(f.clone());
            f
        };
        // Of a device's status only what the controller wrote itself is read; the bridge's
        // part (a line per resource, the device's facts) is most of it.
        let devices = spawn_watch(
            client,
            watcher::Config::default(),
            (fingerprint, controller_view),
            changed,
            flag(),
            tasks,
        );
        let (manifests, t) = watch_crd(Api::all(client.clone()), changed.clone(), flag());
        tasks.spawn(t);
        let pods = pod_namespaces.map(|namespaces| pods::PodWatch {
            pods: spawn_watch(
                client,
                watcher::Config::default().fields("spec.nodeName!="),
                (any_change, keep_all),
                changed,
                flag(),
                tasks,
            ),
            // Only which device a Node stands for is read: its name and labels. Watched as
            // metadata (an `Api` of `PartialObjectMeta` asks for nothing else), so the
            // bridge's status writes are neither sent nor decoded, and a stored Node is its
            // metadata alone.
            nodes: spawn_watch(
                client,
                watcher::Config::default().labels(pods::DEVICE_LABEL),
                (fingerprint, pods::node_identity),
                changed,
                flag(),
                tasks,
            ),
            config_maps: scoped(client, namespaces, changed, &mut flag, tasks),
            secrets: scoped(client, namespaces, changed, &mut flag, tasks),
        });
        Self {
            devices,
            manifests,
            pods,
            synced,
        }
    }

    /// Every reflector has listed once.
    fn synced(&self) -> bool {
        self.synced.iter().all(|f| f.load(Ordering::Relaxed))
    }
}

/// Watches every `K` cluster-wide (no `namespaces`) or in each of `namespaces`.
fn scoped<K>(
    client: &Client,
    namespaces: &[String],
    changed: &Arc<Notify>,
    flag: &mut impl FnMut() -> Arc<AtomicBool>,
    tasks: &mut tokio::task::JoinSet<()>,
) -> pods::Scoped<K>
where
    K: fleetlet_plumbing::Watched
        + kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    let mut watch = |api: Api<K>| {
        let (store, task) = watch_objects(
            api,
            watcher::Config::default(),
            changed.clone(),
            flag(),
            any_change,
            keep_all,
        );
        tasks.spawn(task);
        store
    };
    let stores = if namespaces.is_empty() {
        vec![(None, watch(Api::all(client.clone())))]
    } else {
        namespaces
            .iter()
            .map(|ns| (Some(ns.clone()), watch(Api::namespaced(client.clone(), ns))))
            .collect()
    };
    pods::Scoped { stores }
}

/// What the controller keeps of an EdgeDevice: all but the bridge's part of its status.
fn controller_view(d: &mut EdgeDevice) {
    d.status = d.status.take().map(EdgeDeviceStatus::into_controller_part);
}

/// What wakes a pass (a fingerprint) and what is stored (a trim) of a watched `K`.
type Keep<K> = (fn(&K) -> u64, fn(&mut K));

/// Watches every `K` matching `config` into a store, kept as `trim` leaves it; a change
/// of `fingerprint` wakes a pass.
fn spawn_watch<K>(
    client: &Client,
    config: watcher::Config,
    (fingerprint, trim): Keep<K>,
    changed: &Arc<Notify>,
    synced: Arc<AtomicBool>,
    tasks: &mut tokio::task::JoinSet<()>,
) -> kube::runtime::reflector::Store<K>
where
    K: fleetlet_plumbing::Watched,
{
    let (store, task) = watch_objects(
        Api::all(client.clone()),
        config,
        changed.clone(),
        synced,
        fingerprint,
        trim,
    );
    tasks.spawn(task);
    store
}

/// The lowest generation a device may be sent, for signed floors: the newest generation
/// recorded in Kubernetes (which only the controller writes) or in desired state,
/// whichever is higher; what is in the bucket alone could have been replaced with an
/// older manifest. Nothing until the controller has synced, nor while the desired-state
/// mirror lists the bucket again (it starts empty, and a floor from the record alone
/// could be lower than a generation already sent).
fn generation_floor(
    devices: kube::runtime::reflector::Store<EdgeDevice>,
    desired: Arc<KvCache<fleetlet_protocol::AgentManifest>>,
    ready: Arc<AtomicBool>,
) -> impl Fn(&fleetlet_protocol::DeviceId) -> Option<u64> + Send + Sync + 'static {
    move |id| {
        if !ready.load(Ordering::Relaxed) || !desired.is_ready() {
            return None;
        }
        let recorded = devices
            .state()
            .iter()
            .filter(|d| d.metadata.name.as_deref() == Some(id.as_str()))
            .filter_map(|d| d.status.as_ref()?.desired_generation)
            .max()
            .unwrap_or(0);
        Some(recorded.max(desired.get(id).map_or(0, |v| v.value.generation)))
    }
}

/// Buckets can disappear (a NATS restart without persistence, an operator's mistake):
/// recreate them, and the mirrors re-list and the passes rewrite every key. A stream whose
/// creation time changed is a new one: its mirror (`relists`, in [`BUCKETS`] order) lists
/// it again, as nothing is republished when a stream goes away.
async fn keep_buckets(
    js: jetstream::Context,
    replicas: usize,
    mut created: Vec<jetstream::stream::Info>,
    relists: [Arc<Notify>; BUCKETS.len()],
) {
    loop {
        tokio::time::sleep(Duration::from_secs(10)).await;
        match ensure_buckets(&js, replicas).await {
            Ok(now) => {
                for ((b, (old, new)), relist) in
                    BUCKETS.iter().zip(created.iter().zip(&now)).zip(&relists)
                {
                    if old.created != new.created {
                        warn!(bucket = b.name, "bucket was recreated; listing it again");
                        relist.notify_one();
                    }
                }
                created = now;
            }
            Err(e) => warn!(error = %e, "ensuring buckets"),
        }
    }
}
