//! fleetlet-agent: the mini-kubelet on each device.
//!
//! It watches its manifest in NATS (`desired-state.<device>`), reconciles every resource
//! with the reconciler for its kind, garbage-collects what it created and the manifest no
//! longer holds, repairs drift, and reports `AgentStatus` (compare-and-set) and heartbeats.
//! The manifest in force and the ownership records live in the state directory, so the
//! agent keeps converging with NATS out of reach and never tears workloads down for it.

pub mod config;
pub mod container;
pub mod dependencies;
pub mod engine;
pub mod facts;
pub mod fetch;
pub mod file;
pub mod fsutil;
pub mod install;
pub mod nats;
pub mod network;
pub mod reconciler;
pub mod registry;
pub mod relay;
pub mod sealing;
pub mod shelljob;
pub mod stats;
pub mod store;
pub mod systemd;
pub mod trust;
pub mod upgrade;

use std::{future::Future, sync::Arc, time::Duration};

use fleetlet_protocol::AgentStatus;
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tracing::info;

use container::ContainerReconciler;
use sealing::SealingKey;

pub use config::{Config, ConfigError, Settings};
pub use engine::{Candidate, Engine};
pub use registry::Registry;
pub use store::{StateStore, StoreError, StoredManifest};
pub use upgrade::VERSION;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Nats(#[from] nats::NatsError),
    #[error("manifest file: {0}")]
    Manifest(String),
    #[error(transparent)]
    Sealing(#[from] sealing::SealingError),
}

/// Resolves once `stop` holds true (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        if stop.changed().await.is_err() {
            return;
        }
    }
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

/// Runs the agent until `shutdown` resolves. Workloads are left running on shutdown.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    let settings = Arc::new(settings);
    let link = nats::connect(&settings).await?;
    serve(
        settings,
        link,
        ServeOptions {
            relay: true,
            ..Default::default()
        },
        shutdown,
    )
    .await
}

/// What [`serve`] runs beyond the engine, the manifest watch, the status writer and the
/// heartbeat.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// Answer logs, exec and attach sessions.
    pub relay: bool,
    /// Hold every manifest this long before the engine sees it (the fleet simulator's slow
    /// devices).
    pub manifest_delay: Option<Duration>,
}

/// Runs one device on `link` until `shutdown` resolves.
pub async fn serve(
    settings: Arc<Settings>,
    link: nats::Link,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let client = link.client.clone();
    let (engine, sealing, containers) = open_engine(&settings)?;
    engine.registry().set_uplink(network::Uplink::nats(
        client.clone(),
        settings.device.clone(),
    ));

    let (candidate_tx, mut candidate_rx) = mpsc::channel(16);
    let (status_tx, status_rx) = watch::channel(engine.status().clone());
    let (stop_tx, stop_rx) = watch::channel(false);

    let (uplink, uplink_rx) = nats::Uplink::new();
    let (floor, watcher) = spawn_feed(&link, &settings, &engine, candidate_tx, uplink_rx, &stop_rx);
    if let Some(delay) = options.manifest_delay {
        candidate_rx = delay_candidates(candidate_rx, delay);
    }
    let heartbeat = tokio::spawn(nats::heartbeat(
        link,
        settings.clone(),
        sealing.public_base64(),
        heartbeat_containers(&settings, &containers),
        uplink.clone(),
        stop_rx.clone(),
    ));
    let writer = tokio::spawn(nats::write_status(
        client.clone(),
        settings.device.clone(),
        status_rx,
        uplink,
        stop_rx.clone(),
    ));
    let relay = options.relay.then(|| {
        tokio::spawn(relay::serve(
            client.clone(),
            settings.device.clone(),
            containers,
            stop_rx.clone(),
        ))
    });
    let persist = tokio::spawn(engine.store().clone().persist_status(status_tx.subscribe()));
    let engine = tokio::spawn(engine.run(candidate_rx, status_tx, stop_rx));

    shutdown.await;
    info!("shutting down: finishing the pass in flight; workloads keep running");
    let _ = stop_tx.send(true);
    let _ = engine.await;
    // The engine is gone with its sender: the last status reaches the disk, then NATS.
    let _ = persist.await;
    let _ = tokio::time::timeout(Duration::from_secs(10), writer).await;
    let _ = watcher.await;
    if let Some(floor) = floor {
        let _ = floor.await;
    }
    let _ = heartbeat.await;
    if let Some(relay) = relay {
        let _ = relay.await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
    Ok(())
}

/// Opens the device's state directory and sealing key and builds its engine over them,
/// logging the start; the key and the container reconciler are returned too, for the
/// heartbeat and the relay.
fn open_engine(
    settings: &Arc<Settings>,
) -> Result<(Engine, Arc<SealingKey>, ContainerReconciler), AgentError> {
    let store = StateStore::open(&settings.state_dir)?;
    let sealing = sealing::SealingKey::load_or_create(&settings.state_dir)?;
    let registry = Registry::from_settings(settings, sealing.clone());
    let containers = registry.containers();
    let engine = Engine::new(settings.clone(), registry, store)?;
    info!(
        device = %settings.device,
        generation = engine.manifest().map(|m| m.generation),
        "agent starting"
    );
    Ok((engine, sealing, containers))
}

/// Starts the tasks that bring the engine its manifests: the fetch of the generation floor
/// (only while the engine has none) and the watch on the device's manifest key.
fn spawn_feed(
    link: &nats::Link,
    settings: &Arc<Settings>,
    engine: &Engine,
    candidates: mpsc::Sender<Candidate>,
    uplink: watch::Receiver<u64>,
    stop: &watch::Receiver<bool>,
) -> (Option<JoinHandle<()>>, JoinHandle<()>) {
    let floor = engine.needs_floor().then(|| {
        tokio::spawn(nats::fetch_floor(
            link.client.clone(),
            settings.clone(),
            candidates.clone(),
            stop.clone(),
        ))
    });
    let watcher = tokio::spawn(nats::watch_manifest(
        link.clone(),
        settings.device.clone(),
        engine.last_seen_revision(),
        settings.manifest_resync,
        candidates,
        uplink,
        stop.clone(),
    ));
    (floor, watcher)
}

/// Holds every candidate `delay` before passing it on (the fleet simulator's slow devices);
/// the returned receiver is what the engine reads.
fn delay_candidates(
    mut candidates: mpsc::Receiver<Candidate>,
    delay: Duration,
) -> mpsc::Receiver<Candidate> {
    let (delayed_tx, delayed_rx) = mpsc::channel(16);
    tokio::spawn(async move {
        while let Some(c) = candidates.recv().await {
            tokio::time::sleep(delay).await;
            if delayed_tx.send(c).await.is_err() {
                return;
            }
        }
    });
    delayed_rx
}

/// The container reconciler the heartbeat asks for the runtime's version: only when the
/// device runs containers at all.
fn heartbeat_containers(
    settings: &Settings,
    containers: &ContainerReconciler,
) -> Option<ContainerReconciler> {
    settings
        .enabled_kinds
        .contains(&fleetlet_protocol::ResourceKind::Container)
        .then(|| containers.clone())
}

/// One pass over `manifest` (or the stored one), without NATS: for `fleetlet-agent --once`.
/// `manifest` is what would be in the device's desired-state key, signed envelope and all:
/// it passes the same checks (signature, device, generation) or the pass does not run.
pub async fn once(
    settings: Settings,
    manifest: Option<Vec<u8>>,
) -> Result<AgentStatus, AgentError> {
    let settings = Arc::new(settings);
    let store = StateStore::open(&settings.state_dir)?;
    let sealing = sealing::SealingKey::load_or_create(&settings.state_dir)?;
    let mut engine = Engine::new(
        settings.clone(),
        Registry::from_settings(&settings, sealing),
        store,
    )?;
    if let Some(bytes) = manifest {
        // The device owner hands this manifest over in person: it is as fresh as they say,
        // and needs no floor from the control plane (signatures are still checked).
        engine.offer(Candidate::Floor { generation: 0 });
        let revision = engine.last_seen_revision();
        let before = engine.status().last_rejection.clone();
        engine.offer(Candidate::Put {
            revision,
            value: bytes.into(),
        });
        if let Some(r) = &engine.status().last_rejection
            && Some(r) != before.as_ref()
        {
            return Err(AgentError::Manifest(format!("{}: {}", r.reason, r.message)));
        }
    }
    engine.pass("once").await;
    if let Err(e) = engine.store().save_status(engine.status()).await {
        tracing::warn!(error = %e, "could not persist status");
    }
    Ok(engine.status().clone())
}
