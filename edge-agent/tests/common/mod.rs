//! Helpers shared by the agent's integration tests: a device with its own directory and
//! config, manifests, and waits on the status the agent publishes.

#![allow(dead_code)] // each test file uses its own subset

use std::path::{Path, PathBuf};

use async_nats::jetstream::kv::Store;
use fleetlet_protocol::{
    API_VERSION, AgentManifest, AgentStatus, DeviceId, FileContent, FileSpec, ManagedResource,
    Owner, OwnerKind, ResourceId, ResourceSpec, ResourceStatus, decode, encode,
    kv::{ACTUAL_STATE, DESIRED_STATE, HEARTBEAT},
};
use fleetlet_testenv::{DEFAULT_TIMEOUT, TestEnv, eventually, process::Service};

pub struct Device {
    pub id: DeviceId,
    pub dir: tempfile::TempDir,
    /// Extra config sections (`[container]`, `[systemd]`, ...) appended to the file.
    pub sections: String,
    /// Extra environment for the agent, e.g. `FLEETLET_LOG` for debug lines in its log.
    pub env: Vec<(&'static str, String)>,
}

impl Device {
    pub fn new(id: &str) -> Self {
        Self {
            id: DeviceId::new(id).unwrap(),
            dir: tempfile::tempdir().unwrap(),
            sections: String::new(),
            env: Vec::new(),
        }
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.root().join(name)
    }

    pub fn write_config(&self, nats_url: &str, extra: &str, nats_extra: &str) -> PathBuf {
        let path = self.dir.path().join("agent.toml");
        std::fs::write(
            &path,
            format!(
                "device_id = \"{}\"\nstate_dir = \"{}\"\n[nats]\nurls = [\"{nats_url}\"]\n{nats_extra}\n\
                 [reconcile]\ndrift_interval_seconds = 1\nheartbeat_interval_seconds = 1\n\
                 backoff_initial_ms = 200\nbackoff_max_ms = 1000\n{extra}\n\
                 {}\
                 [file]\nallowed_roots = [\"{}\"]\n{}\n",
                self.id,
                self.dir.path().join("state").display(),
                fleetlet_testenv::components::UNSIGNED_OK,
                self.root().display(),
                self.sections,
            ),
        )
        .unwrap();
        path
    }

    /// Starts the agent binary; it dies with the test process.
    pub fn start(&self, nats_url: &str, extra: &str) -> Service {
        self.spawn(self.write_config(nats_url, extra, ""))
    }

    /// Starts the agent with extra `[nats]` settings (credentials).
    pub fn start_with_nats_extra(&self, nats_url: &str, nats_extra: &str) -> Service {
        self.spawn(self.write_config(nats_url, "", nats_extra))
    }

    pub fn spawn(&self, config: PathBuf) -> Service {
        let log = self
            .dir
            .path()
            .join(format!("agent-{}.log", fastrand_suffix()));
        std::fs::create_dir_all(self.root()).unwrap();
        Service::spawn_with_env(
            "fleetlet-agent",
            Path::new(env!("CARGO_BIN_EXE_fleetlet-agent")),
            &["--config".into(), config.display().to_string()],
            &self.env,
            log,
        )
        .unwrap()
    }

    pub fn file_resource(&self, id: &str, name: &str, text: &str) -> ManagedResource {
        file_at(id, &self.file(name).display().to_string(), text)
    }

    pub fn manifest(&self, generation: u64, resources: Vec<ManagedResource>) -> AgentManifest {
        AgentManifest {
            api_version: API_VERSION.into(),
            device: self.id.clone(),
            generation,
            resources,
            signing_key: None,
            issued_at: None,
        }
    }
}

pub fn fastrand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

pub fn file_at(id: &str, path: &str, text: &str) -> ManagedResource {
    ManagedResource {
        id: ResourceId::new(id).unwrap(),
        owner: Owner {
            kind: OwnerKind::EdgeManifest,
            namespace: "default".into(),
            name: "test".into(),
            generation: 1,
            uid: None,
        },
        spec: ResourceSpec::File(FileSpec {
            path: path.into(),
            content: FileContent::Text(text.into()),
            mode: None,
            owner: None,
            group: None,
        }),
    }
}

pub async fn buckets(env: &TestEnv) -> (Store, Store, Store) {
    let js = env.jetstream().await.unwrap();
    (
        js.get_key_value(DESIRED_STATE.name).await.unwrap(),
        js.get_key_value(ACTUAL_STATE.name).await.unwrap(),
        js.get_key_value(HEARTBEAT.name).await.unwrap(),
    )
}

pub async fn put(desired: &Store, m: &AgentManifest) {
    desired
        .put(m.device.as_str(), encode(m).unwrap().into())
        .await
        .unwrap();
}

/// Polls the device's status until `pred` holds; after 30 s panics with the last status
/// (or why there was none).
pub async fn wait_status(
    actual: &Store,
    dev: &DeviceId,
    what: &str,
    pred: impl Fn(&AgentStatus) -> bool,
) -> AgentStatus {
    eventually(&format!("{dev}: {what}"), DEFAULT_TIMEOUT, || async {
        let e = actual
            .entry(dev.as_str())
            .await
            .map_err(|e| format!("reading the status: {e}"))?
            .ok_or("no status yet")?;
        let s = decode::<AgentStatus>(&e.value).map_err(|e| format!("undecodable status: {e}"))?;
        if pred(&s) {
            Ok(s)
        } else {
            Err(format!("{s:#?}"))
        }
    })
    .await
}

pub fn all_ready(s: &AgentStatus, generation: u64, count: usize) -> bool {
    s.observed_generation == generation
        && s.resources.len() == count
        && s.resources.values().all(ResourceStatus::is_ready)
}

pub fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap()
}

/// Asserts that resource `id` failed for good with a `forbidden:` error mentioning `why`:
/// what a device-owner policy refusal looks like.
pub fn assert_forbidden(s: &AgentStatus, id: &str, why: &str) {
    match &s.resources[id] {
        ResourceStatus::Failed {
            error, permanent, ..
        } => {
            assert!(
                error.starts_with("forbidden:") && error.contains(why),
                "{id}: {error}"
            );
            assert!(permanent, "{id}: a policy refusal waits for a new spec");
        }
        other => panic!("{id}: {other:?}"),
    }
}
