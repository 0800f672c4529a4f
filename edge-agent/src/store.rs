//! What the agent must not forget across restarts, in its state directory: the manifest in
//! force and what it has applied (ownership), each written atomically and synced before the
//! agent acts on it; and its last status, a record the agent can rebuild by observing, so
//! written by a rename without a sync (a flush to flash on every status change is not
//! worth it) and dropped with a warning if a power cut left it unreadable.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use fleetlet_protocol::{AgentManifest, AgentStatus, ResourceId, ResourceSpec};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::fsutil::{Ownership, write_atomic, write_replacing};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// The manifest in force and the KV revision it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredManifest {
    pub revision: u64,
    pub manifest: AgentManifest,
}

/// Resources this agent has applied, with the spec it applied: what garbage collection may
/// delete, and how to recognise what it wrote.
pub type Owned = BTreeMap<ResourceId, ResourceSpec>;

#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
}

const MANIFEST: &str = "manifest.json";
const OWNED: &str = "owned.json";
const STATUS: &str = "status.json";

impl StateStore {
    /// Opens (creating, mode 0700) the state directory.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| StoreError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn load<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, StoreError> {
        let path = self.dir.join(name);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| StoreError::Corrupt { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Io { path, source }),
        }
    }

    fn save<T: Serialize>(&self, name: &str, value: &T) -> Result<(), StoreError> {
        let (path, bytes) = self.encode(name, value)?;
        write_state(path, bytes)
    }

    /// Like `save`, with the write and its fsyncs on the blocking pool instead of the
    /// runtime's only thread (relay sessions and NATS keep being served meanwhile).
    async fn save_off_runtime<T: Serialize>(
        &self,
        name: &str,
        value: &T,
        durable: bool,
    ) -> Result<(), StoreError> {
        let (path, bytes) = self.encode(name, value)?;
        let at = path.clone();
        tokio::task::spawn_blocking(move || {
            if durable {
                write_state(path, bytes)
            } else {
                write_replacing(&path, &bytes).map_err(|source| StoreError::Io { path, source })
            }
        })
        .await
        .unwrap_or_else(|e| {
            Err(StoreError::Io {
                path: at,
                source: std::io::Error::other(e.to_string()),
            })
        })
    }

    fn encode<T: Serialize>(
        &self,
        name: &str,
        value: &T,
    ) -> Result<(PathBuf, Vec<u8>), StoreError> {
        let path = self.dir.join(name);
        let bytes = serde_json::to_vec(value).map_err(|source| StoreError::Corrupt {
            path: path.clone(),
            source,
        })?;
        Ok((path, bytes))
    }

    pub fn load_manifest(&self) -> Result<Option<StoredManifest>, StoreError> {
        self.load(MANIFEST)
    }

    pub fn save_manifest(&self, m: &StoredManifest) -> Result<(), StoreError> {
        self.save(MANIFEST, m)
    }

    pub fn load_owned(&self) -> Result<Owned, StoreError> {
        Ok(self.load(OWNED)?.unwrap_or_default())
    }

    pub async fn save_owned(&self, owned: &Owned) -> Result<(), StoreError> {
        self.save_off_runtime(OWNED, owned, true).await
    }

    /// The last status written, if readable. One that is not (a power cut right after an
    /// unsynced write) is left behind with a warning: the agent rebuilds it by observing.
    pub fn load_status(&self) -> Result<Option<AgentStatus>, StoreError> {
        match self.load(STATUS) {
            Err(StoreError::Corrupt { path, source }) => {
                tracing::warn!(path = %path.display(), error = %source, "last status unreadable; starting from a fresh one");
                Ok(None)
            }
            other => other,
        }
    }

    pub async fn save_status(&self, status: &AgentStatus) -> Result<(), StoreError> {
        self.save_off_runtime(STATUS, status, false).await
    }

    /// Keeps the last status on disk: each value `status` takes is written after the one
    /// before (a newer one replaces any not yet written), and the last is written before
    /// this returns, once the sender is gone.
    pub async fn persist_status(self, mut status: tokio::sync::watch::Receiver<AgentStatus>) {
        while status.changed().await.is_ok() {
            let s = status.borrow_and_update().clone();
            if let Err(e) = self.save_status(&s).await {
                tracing::warn!(error = %e, "could not persist status");
            }
        }
    }
}

fn write_state(path: PathBuf, bytes: Vec<u8>) -> Result<(), StoreError> {
    write_atomic(&path, &bytes, 0o600, Ownership::default())
        .map_err(|source| StoreError::Io { path, source })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a panic is a failed test

    use super::*;

    #[tokio::test]
    async fn an_unreadable_status_is_dropped_but_an_unreadable_manifest_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let mut status = AgentStatus::new("dev-1".parse().unwrap());
        status.drift_repairs = 3;
        store.save_status(&status).await.unwrap();
        assert_eq!(store.load_status().unwrap(), Some(status));
        // No temp file is left beside it.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [STATUS]);

        // What a power cut can leave of an unsynced write: an empty or partial file.
        for torn in ["", "{\"apiVersion\":\"fleetlet.dev/v1al"] {
            std::fs::write(dir.path().join(STATUS), torn).unwrap();
            assert_eq!(store.load_status().unwrap(), None, "{torn:?}");
        }
        // The manifest is synced before it is acted on; a corrupt one is not guessed at.
        std::fs::write(dir.path().join(MANIFEST), "{").unwrap();
        assert!(matches!(
            store.load_manifest(),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
