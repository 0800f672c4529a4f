//! What fleetlet's controller and bridge share, and nothing of either: how to reach NATS,
//! mirrors of the KV buckets ([`KvCache`]), leader election on a Lease ([`leader`]), the
//! `/metrics`, `/healthz` and `/readyz` endpoints, reflector watches that wake a pass only
//! for changes that matter, tracing set-up and shutdown signals.
//!
//! The dependency graph: protocol ← crds ← plumbing ← {controller, bridge}; the agent
//! depends on protocol only.

/// Sets jemalloc's start-up options in a binary that uses it as its global allocator (a
/// library's definition would not be linked in). `_RJEM_MALLOC_CONF` in the environment
/// still overrides them. `background_thread` purges freed pages on jemalloc's own thread,
/// so memory goes back to the OS after a burst even when nothing allocates afterwards;
/// the decay times say how long freed pages are kept for reuse first.
#[macro_export]
macro_rules! jemalloc_options {
    ($options:literal) => {
        #[allow(non_upper_case_globals)]
        #[unsafe(export_name = "_rjem_malloc_conf")]
        pub static malloc_conf: &[u8] = concat!($options, "\0").as_bytes();
    };
}

pub mod kvcache;
pub mod leader;
pub mod shards;

use std::{
    collections::HashMap,
    future::Future,
    hash::{DefaultHasher, Hash, Hasher},
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use fleetlet_crds::kube::{
    Api, Client, Resource,
    runtime::{WatchStreamExt, reflector, watcher},
};
use futures::StreamExt;
use tokio::{
    sync::{Notify, watch},
    time::Instant,
};
use tracing::{info, warn};

pub use kvcache::KvCache;

/// Why the shared plumbing failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connecting to NATS: {0}")]
    NatsConnect(#[from] async_nats::ConnectError),
    #[error("NATS credentials: {0}")]
    Credentials(String),
    #[error("serving metrics on {addr}: {source}")]
    Http {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// How to reach NATS (shared by the controller and the bridge).
#[derive(Debug, Clone, clap::Args)]
pub struct NatsArgs {
    /// NATS server URL(s), comma-separated.
    #[arg(
        long,
        env = "FLEETLET_NATS_URL",
        value_delimiter = ',',
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats_url: Vec<String>,
    /// NATS credentials file (.creds).
    #[arg(long, env = "FLEETLET_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    #[arg(long, env = "FLEETLET_NATS_USER")]
    pub nats_user: Option<String>,
    #[arg(long, env = "FLEETLET_NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,
    /// CA bundle to verify the NATS server (implies TLS).
    #[arg(long, env = "FLEETLET_NATS_CA")]
    pub nats_ca: Option<PathBuf>,
}

impl NatsArgs {
    /// Connects, retrying in the background until the server is reachable.
    pub async fn connect(&self, name: &str) -> Result<async_nats::Client, Error> {
        self.connect_with(name, None).await
    }

    /// Connects with these `.creds` (text) instead of the configured credentials.
    pub async fn connect_with(
        &self,
        name: &str,
        creds: Option<&str>,
    ) -> Result<async_nats::Client, Error> {
        let mut opts = async_nats::ConnectOptions::new()
            .name(name)
            .retry_on_initial_connect()
            .max_reconnects(None);
        if let (Some(u), Some(p)) = (&self.nats_user, &self.nats_password) {
            opts = opts.user_and_password(u.clone(), p.clone());
        }
        if let Some(creds) = creds {
            opts = opts
                .credentials(creds)
                .map_err(|e| Error::Credentials(e.to_string()))?;
        } else if let Some(c) = &self.nats_creds {
            opts = opts
                .credentials_file(c)
                .await
                .map_err(|e| Error::Credentials(format!("reading {}: {e}", c.display())))?;
        }
        if let Some(ca) = &self.nats_ca {
            opts = opts.add_root_certificates(ca.clone()).require_tls(true);
        }
        // Each URL on its own: async-nats reads one string as one URL, so a joined list
        // would be refused as a malformed port.
        Ok(opts.connect(self.nats_url.as_slice()).await?)
    }
}

/// `given`, or the pod name / hostname plus pid, for leader election.
pub fn default_identity(given: Option<&str>) -> String {
    given.map(str::to_owned).unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap_or_else(|_| "fleetlet".into());
        format!("{}-{}", host.trim(), std::process::id())
    })
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// What a component's binary says once its endpoints listen.
pub fn log_serving(addr: SocketAddr) {
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
}

/// A component binary's exit: success, or the error on stderr and a failure status.
pub fn exit_code<E: std::fmt::Display>(
    component: &str,
    result: Result<(), E>,
) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{component}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Logs to stderr with a `RUST_LOG`-style filter (default `info`).
pub fn init_tracing() {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

/// Resolves once `stop` holds true (or its sender is gone).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        if stop.changed().await.is_err() {
            return;
        }
    }
}

/// Drops what no pass reads before an object enters a store: managed fields and the
/// last-applied annotation are most of an object's size at fleet scale.
pub fn slim<K: Resource>(o: &mut K) {
    o.meta_mut().managed_fields = None;
    if let Some(a) = o.meta_mut().annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// What makes an object worth a new pass: not its status (our own writes land there).
pub fn fingerprint<K: Resource>(o: &K) -> u64 {
    let mut h = DefaultHasher::new();
    o.meta().generation.hash(&mut h);
    o.meta().labels.hash(&mut h);
    o.meta().deletion_timestamp.is_some().hash(&mut h);
    o.meta().finalizers.hash(&mut h);
    h.finish()
}

/// What a reflector watch can hold: a typed Kubernetes object.
pub trait Watched:
    Resource<DynamicType = ()>
    + Clone
    + std::fmt::Debug
    + serde::de::DeserializeOwned
    + Send
    + Sync
    + 'static
{
}

impl<K> Watched for K where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static
{
}

/// Mirrors one CRD into a reflector store and pokes `changed` when something that matters
/// changes (spec, labels, deletion), never for status-only updates.
pub fn watch_crd<K>(
    api: Api<K>,
    changed: Arc<Notify>,
    synced: Arc<AtomicBool>,
) -> (reflector::Store<K>, impl Future<Output = ()>)
where
    K: Watched,
{
    watch_objects(
        api,
        watcher::Config::default(),
        changed,
        synced,
        fingerprint,
        keep_all,
    )
}

/// Keeps the whole object (after [`slim`]).
pub fn keep_all<K>(_: &mut K) {}

/// Any change at all (objects without a generation: ConfigMaps, Secrets, Nodes, Pods).
pub fn any_change<K: Resource>(o: &K) -> u64 {
    let mut h = DefaultHasher::new();
    o.meta().resource_version.hash(&mut h);
    o.meta().deletion_timestamp.is_some().hash(&mut h);
    h.finish()
}

/// Mirrors objects into a reflector store and pokes `changed` when `fp` changes. `trim`
/// drops what the store's readers never look at before the object is stored (and before
/// `fp` sees it).
pub fn watch_objects<K>(
    api: Api<K>,
    config: watcher::Config,
    changed: Arc<Notify>,
    synced: Arc<AtomicBool>,
    fp: fn(&K) -> u64,
    trim: fn(&mut K),
) -> (reflector::Store<K>, impl Future<Output = ()>)
where
    K: Watched,
{
    watch_objects_with(api, config, changed, synced, fp, trim, |_: &K| {})
}

/// Like [`watch_crd`], stores each object as `trim` leaves it, and calls `on_change` with
/// each object whose fingerprint changed (the bridge marks that device for its next
/// partial pass).
pub fn watch_crd_with<K>(
    api: Api<K>,
    changed: Arc<Notify>,
    synced: Arc<AtomicBool>,
    trim: fn(&mut K),
    on_change: impl FnMut(&K) + Send + 'static,
) -> (reflector::Store<K>, impl Future<Output = ()>)
where
    K: Watched,
{
    watch_objects_with(
        api,
        watcher::Config::default(),
        changed,
        synced,
        fingerprint,
        trim,
        on_change,
    )
}

fn watch_objects_with<K>(
    api: Api<K>,
    config: watcher::Config,
    changed: Arc<Notify>,
    synced: Arc<AtomicBool>,
    fp: fn(&K) -> u64,
    trim: fn(&mut K),
    mut on_change: impl FnMut(&K) + Send + 'static,
) -> (reflector::Store<K>, impl Future<Output = ()>)
where
    K: Watched,
{
    let (reader, writer) = reflector::store();
    // Stored without what no reader uses (field managers, kubectl's last applied copy): at
    // 10,000 EdgeDevices written by three managers that is most of each cached object.
    let stream = watcher(api, config)
        .default_backoff()
        .modify(move |o| {
            slim(o);
            trim(o);
        })
        .reflect(writer);
    let task = async move {
        // Keyed by a hash of the uid: at 10,000 objects per watch the uid strings
        // themselves would be most of the map.
        let mut seen: HashMap<u64, u64> = HashMap::new();
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                    let fp = fp(&o);
                    if seen.insert(identity(&o), fp) != Some(fp) {
                        on_change(&o);
                        if synced.load(Ordering::Relaxed) {
                            changed.notify_one();
                        }
                    }
                }
                Ok(watcher::Event::Delete(o)) => {
                    seen.remove(&identity(&o));
                    changed.notify_one();
                }
                Ok(watcher::Event::InitDone) => {
                    synced.store(true, Ordering::Relaxed);
                    changed.notify_one();
                }
                Ok(watcher::Event::Init) => {}
                Err(e) => warn!(error = %e, "watch error; retrying"),
            }
        }
    };
    (reader, task)
}

/// Which object a watch event is about: a hash of its uid (its name when it has none).
fn identity<K: Resource>(o: &K) -> u64 {
    let mut h = DefaultHasher::new();
    match &o.meta().uid {
        Some(uid) => uid.hash(&mut h),
        None => o.meta().name.hash(&mut h),
    }
    h.finish()
}

/// How a replica finds out what it may work on: one Lease for the whole fleet, or a
/// Lease per shard ([`shards`]).
pub enum Elector {
    Single(leader::Election),
    Sharded(shards::ShardElection),
}

impl Elector {
    /// A single leader on Lease `namespace/name` when `shards` is 1, else the shard group
    /// `name` of `shards` shards; Leases held for `lease_seconds`.
    pub fn new(
        namespace: &str,
        name: &str,
        identity: &str,
        shards: u32,
        lease_seconds: u64,
    ) -> Self {
        if shards > 1 {
            Self::Sharded(shards::ShardElection::new(
                namespace,
                name,
                identity,
                shards,
                lease_seconds,
            ))
        } else {
            Self::Single(leader::Election::new(
                namespace,
                name,
                identity,
                lease_seconds,
            ))
        }
    }

    async fn run(
        self,
        client: Client,
        owned: watch::Sender<shards::Ownership>,
        stop: watch::Receiver<bool>,
    ) {
        match self {
            Self::Sharded(e) => e.run(client, owned, stop).await,
            Self::Single(e) => {
                let (leader, mut leading) = watch::channel(false);
                let election = tokio::spawn(e.run(client, leader, stop));
                while leading.changed().await.is_ok() {
                    let whole = *leading.borrow_and_update();
                    owned.send_replace(if whole {
                        shards::Ownership::whole(1)
                    } else {
                        shards::Ownership::none(1)
                    });
                }
                let _ = election.await;
            }
        }
    }
}

/// The main loop both binaries run: wake on a change, at the deadline the last step gave,
/// or when what this instance holds changes; let a burst of changes settle; run one step
/// with what it holds. Ends on `shutdown`, releasing the Lease(s).
pub struct LeaderGated {
    pub client: Client,
    pub election: Elector,
    pub changed: Arc<Notify>,
    /// How long a burst of changes may settle into one step.
    pub settle: Duration,
    /// Let changes settle at least as long as the last step took, too: while changes keep
    /// coming, steps take at most half the time, and each takes in more of them.
    pub pace: bool,
    /// What this instance holds, for work that runs beside the steps
    /// ([`watch::Sender::subscribe`]); the election sets it.
    pub owned: watch::Sender<shards::Ownership>,
}

impl LeaderGated {
    /// Runs `step(held)` on every wake-up until `shutdown`; each step returns when the
    /// next one is due if nothing changes before.
    pub async fn run<F>(self, shutdown: impl Future<Output = ()>, mut step: F)
    where
        F: AsyncFnMut(&shards::Ownership) -> Instant,
    {
        let (stop_tx, stop_rx) = watch::channel(false);
        let owned_rx = self.owned.subscribe();
        let election = tokio::spawn(self.election.run(self.client, self.owned, stop_rx));
        tokio::select! {
            _ = gate(&self.changed, owned_rx, self.settle, self.pace, &mut step) => {}
            _ = shutdown => info!("shutting down"),
        }
        let _ = stop_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), election).await;
    }
}

/// [`LeaderGated`]'s loop: a first step at once, then one on every wake-up, `settle`
/// (or, with `pace`, as long as the last step took if that is longer) after it. What is
/// held sent again unchanged wakes nothing.
async fn gate<F>(
    changed: &Notify,
    mut owned: watch::Receiver<shards::Ownership>,
    settle: Duration,
    pace: bool,
    step: &mut F,
) where
    F: AsyncFnMut(&shards::Ownership) -> Instant,
{
    let mut next = Instant::now();
    let mut last = Duration::ZERO;
    let mut stepped_with: Option<shards::Ownership> = None;
    loop {
        tokio::select! {
            _ = changed.notified() => {}
            _ = tokio::time::sleep_until(next) => {}
            Ok(()) = owned.changed() => {
                if stepped_with.as_ref() == Some(&*owned.borrow()) {
                    continue;
                }
            }
        }
        let settle = if pace { settle.max(last) } else { settle };
        tokio::time::sleep(settle).await;
        let held = owned.borrow_and_update().clone();
        let started = Instant::now();
        next = step(&held).await;
        last = started.elapsed();
        stepped_with = Some(held);
    }
}

/// What the HTTP endpoints read: the metrics text and whether the component is ready.
#[derive(Clone)]
pub struct HttpState {
    pub metrics: Arc<dyn Fn() -> String + Send + Sync>,
    pub ready: Arc<AtomicBool>,
}

impl HttpState {
    /// Serves `encode()` as the metrics text; `ready` starts false.
    pub fn new(encode: impl Fn() -> String + Send + Sync + 'static) -> Self {
        Self {
            metrics: Arc::new(encode),
            ready: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// A component's metrics, served as Prometheus text.
pub trait Registered: Send + Sync + 'static {
    fn registry(&self) -> &prometheus_client::registry::Registry;

    /// The text exposition format.
    fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, self.registry());
        out
    }
}

/// Serves `/metrics` (from `metrics`), `/healthz` and `/readyz` on a task of `tasks`;
/// returns the bound address and the readiness flag `/readyz` reports.
pub async fn serve_metrics(
    addr: SocketAddr,
    metrics: Arc<impl Registered>,
    tasks: &mut tokio::task::JoinSet<()>,
) -> Result<(SocketAddr, Arc<AtomicBool>), Error> {
    let http = HttpState::new(move || metrics.encode());
    let ready = http.ready.clone();
    let (bound, server) = serve(addr, http).await?;
    tasks.spawn(server);
    Ok((bound, ready))
}

/// Serves `/metrics`, `/healthz` and `/readyz`; returns the bound address and the server.
pub async fn serve(
    addr: SocketAddr,
    state: HttpState,
) -> Result<(SocketAddr, impl Future<Output = ()>), Error> {
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(s): State<HttpState>| async move { (s.metrics)() }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(s): State<HttpState>| async move {
                if s.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "syncing")
                }
            }),
        )
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Http { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| Error::Http { addr, source })?;
    Ok((bound, async move {
        if let Err(e) = axum::serve(listener, app).await {
            warn!(error = %e, "metrics server stopped");
        }
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a panic is a failed test

    use super::*;
    use fleetlet_crds::k8s_openapi::api::core::v1::ConfigMap;
    use fleetlet_crds::kube::api::ObjectMeta;

    fn object(name: &str, uid: Option<&str>) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                uid: uid.map(Into::into),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn a_watch_tells_objects_apart_by_uid_and_a_recreated_one_is_new() {
        let a = object("a", Some("0b5e7c1e-1"));
        assert_eq!(identity(&a), identity(&object("a", Some("0b5e7c1e-1"))));
        // Deleted and created again under the same name: another object.
        assert_ne!(identity(&a), identity(&object("a", Some("0b5e7c1e-2"))));
        assert_ne!(identity(&a), identity(&object("b", Some("0b5e7c1e-3"))));
        assert_eq!(identity(&object("a", None)), identity(&object("a", None)));
        assert_ne!(identity(&object("a", None)), identity(&object("b", None)));
    }

    /// When each step of a [`gate`] started (time paused, from the call) and with what
    /// held, while `drive` runs beside it. Each step takes `takes` and asks for the next
    /// one an hour later.
    async fn steps(
        changed: &Notify,
        owned: watch::Receiver<shards::Ownership>,
        pace: bool,
        takes: Duration,
        drive: impl Future<Output = ()>,
    ) -> Vec<(Duration, shards::Ownership)> {
        let t0 = Instant::now();
        let mut started = Vec::new();
        let mut step = async |held: &shards::Ownership| {
            started.push((t0.elapsed(), held.clone()));
            tokio::time::sleep(takes).await;
            Instant::now() + Duration::from_secs(3600)
        };
        tokio::select! {
            _ = gate(changed, owned, Duration::from_millis(50), pace, &mut step) => {}
            _ = drive => {}
        }
        started
    }

    const MS: Duration = Duration::from_millis(1);

    #[tokio::test(start_paused = true)]
    async fn a_gate_steps_at_once_on_a_change_and_when_due_but_not_for_the_same_shards_sent_again()
    {
        let changed = Notify::new();
        let (owned, rx) = watch::channel(shards::Ownership::none(2));
        let started = steps(&changed, rx, false, Duration::ZERO, async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            owned.send_replace(shards::Ownership::of(2, [1]));
            // An election renewing what it holds, round after round.
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                owned.send_replace(shards::Ownership::of(2, [1]));
            }
            changed.notify_one();
            tokio::time::sleep(Duration::from_secs(3700)).await;
        })
        .await;
        let at: Vec<_> = started
            .iter()
            .map(|(t, h)| (*t, h.held().clone()))
            .collect();
        assert_eq!(
            at,
            [
                // At once, then each wake-up after the 50 ms settle.
                (50 * MS, [].into()),
                (1050 * MS, [1].into()),
                // The notification after the ten renewals (none of them stepped).
                (11050 * MS, [1].into()),
                // Due an hour after the last step, and settled too.
                (3_611_100 * MS, [1].into()),
            ]
        );
    }

    /// Notifies `changed` every 10 ms for `d`.
    async fn changes_for(changed: &Notify, d: Duration) {
        let keep_changing = async {
            loop {
                changed.notify_one();
                tokio::time::sleep(10 * MS).await;
            }
        };
        let _ = tokio::time::timeout(d, keep_changing).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_paced_gate_lets_changes_that_keep_coming_settle_as_long_as_the_last_step_took() {
        let changed = Notify::new();
        let (_owned, rx) = watch::channel(shards::Ownership::whole(1));
        // Steps of 400 ms: paced, 400 ms of settling follow each; unpaced, the 50 ms.
        for (pace, gap, at_least) in [(true, 800 * MS, 3), (false, 450 * MS, 6)] {
            let four_seconds = changes_for(&changed, Duration::from_secs(4));
            let started = steps(&changed, rx.clone(), pace, 400 * MS, four_seconds).await;
            let gaps: Vec<Duration> = started.windows(2).map(|w| w[1].0 - w[0].0).collect();
            assert!(gaps.len() >= at_least, "{started:?}");
            assert!(gaps.iter().all(|g| *g == gap), "pace {pace}: {gaps:?}");
        }
    }
}
