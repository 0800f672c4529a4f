//! The contract every resource kind implements.

use std::future::Future;

use fleetlet_protocol::{ResourceDetails, ResourceId};

/// What `observe` found.
#[derive(Debug, Clone, PartialEq)]
pub enum Observation {
    /// Exactly as specified.
    InSync(ResourceDetails),
    /// Present but different; the text says what differs (for logs and drift reports).
    Differs(String),
    /// Not there at all.
    Absent,
}

/// What `delete` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deleted {
    Removed,
    AlreadyGone,
    /// Changed by someone else since the agent wrote it, so left alone; says why.
    LeftInPlace(String),
}

/// Why a reconciler could not do its job. `category` is a bounded label for metrics.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The device's policy forbids it (path outside the allowed roots, kind disabled, ...).
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// The spec cannot be applied as written.
    #[error("invalid: {0}")]
    Invalid(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The runtime (podman, systemd, ...) refused or failed.
    #[error("{0}")]
    Runtime(String),
    /// A run-once resource ran and failed; only a new spec runs it again.
    #[error("{0}")]
    Finished(String),
    /// A change was undone because the device lost its control plane after it; only a
    /// new spec is tried.
    #[error("rolled back: {0}")]
    RolledBack(String),
    /// Not a failure: the work goes on in the background (a download) and the text says
    /// how far. The resource is Reconciling; the reconciler asks for the next look through
    /// its wake-up time.
    #[error("{0}")]
    InProgress(String),
}

impl ReconcileError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    pub fn category(&self) -> &'static str {
        match self {
            Self::Forbidden(_) => "forbidden",
            Self::Invalid(_) => "invalid",
            Self::Io { .. } => "io",
            Self::Runtime(_) => "runtime",
            Self::Finished(_) => "finished",
            Self::InProgress(_) => "in_progress",
            Self::RolledBack(_) => "rolled_back",
        }
    }

    /// Whether retrying the same spec can help. Policy and spec errors wait for a new spec.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Io { .. } | Self::Runtime(_))
    }
}

/// One resource kind. Implementations must make `reconcile` idempotent: calling it on a
/// resource that is already as specified changes nothing.
pub trait Reconciler: Send + Sync {
    type Spec: Send + Sync;

    /// Looks, never touches.
    fn observe(
        &self,
        id: &ResourceId,
        spec: &Self::Spec,
    ) -> impl Future<Output = Result<Observation, ReconcileError>> + Send;

    /// Makes the resource match `spec` and reports what it looks like afterwards.
    fn reconcile(
        &self,
        id: &ResourceId,
        spec: &Self::Spec,
    ) -> impl Future<Output = Result<ResourceDetails, ReconcileError>> + Send;

    /// Removes what the agent created for `applied` (the last spec it applied), and only that.
    fn delete(
        &self,
        id: &ResourceId,
        applied: &Self::Spec,
    ) -> impl Future<Output = Result<Deleted, ReconcileError>> + Send;

    /// Whether moving from `old` to `new` addresses a different object (a new file path, a
    /// new unit name), so the old one must be deleted first.
    fn moves(&self, old: &Self::Spec, new: &Self::Spec) -> bool;
}
