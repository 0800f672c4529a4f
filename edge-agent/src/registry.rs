//! Maps each resource kind to its reconciler, and says which kinds this device runs.

use std::collections::BTreeSet;

use fleetlet_protocol::{ResourceDetails, ResourceId, ResourceKind, ResourceSpec};

use crate::{
    config::Settings,
    file::FileReconciler,
    reconciler::{Deleted, Observation, ReconcileError, Reconciler},
};

/// The reconcilers of this agent. Dispatch is a `match` on the spec: adding a kind is a
/// new field and a new arm, checked by the compiler.
#[derive(Debug, Clone)]
pub struct Registry {
    enabled: BTreeSet<ResourceKind>,
    file: FileReconciler,
}

impl Registry {
    pub fn from_settings(s: &Settings) -> Self {
        Self {
            enabled: s.enabled_kinds.clone(),
            file: FileReconciler::with_prefix(
                s.file_roots.clone(),
                s.max_file_bytes,
                s.file_prefix.clone(),
            ),
        }
    }

    /// `Err(message)` when this agent will not run `spec`'s kind.
    pub fn supports(&self, spec: &ResourceSpec) -> Result<(), String> {
        let kind = spec.kind();
        match kind {
            ResourceKind::Unsupported => Err(format!(
                "resource kind {:?} is unknown to agent {}",
                spec.kind_key(),
                env!("CARGO_PKG_VERSION")
            )),
            ResourceKind::NetworkConfig
            | ResourceKind::ShellJob
            | ResourceKind::Container
            | ResourceKind::SystemdUnit
                if !self.implemented(kind) =>
            {
                Err(format!(
                    "{kind} resources are not supported by agent {} yet",
                    env!("CARGO_PKG_VERSION")
                ))
            }
            _ if !self.enabled.contains(&kind) => Err(format!(
                "{kind} resources are disabled on this device (reconcile.enabled_kinds)"
            )),
            _ => Ok(()),
        }
    }

    fn implemented(&self, kind: ResourceKind) -> bool {
        matches!(kind, ResourceKind::File)
    }

    pub async fn observe(
        &self,
        id: &ResourceId,
        spec: &ResourceSpec,
    ) -> Result<Observation, ReconcileError> {
        match spec {
            ResourceSpec::File(s) => self.file.observe(id, s).await,
            other => Err(unsupported(other)),
        }
    }

    pub async fn reconcile(
        &self,
        id: &ResourceId,
        spec: &ResourceSpec,
    ) -> Result<ResourceDetails, ReconcileError> {
        match spec {
            ResourceSpec::File(s) => self.file.reconcile(id, s).await,
            other => Err(unsupported(other)),
        }
    }

    pub async fn delete(
        &self,
        id: &ResourceId,
        applied: &ResourceSpec,
    ) -> Result<Deleted, ReconcileError> {
        match applied {
            ResourceSpec::File(s) => self.file.delete(id, s).await,
            other => Err(unsupported(other)),
        }
    }

    /// Whether `new` addresses another object than `old` (so `old` must go first).
    pub fn moves(&self, old: &ResourceSpec, new: &ResourceSpec) -> bool {
        match (old, new) {
            (ResourceSpec::File(a), ResourceSpec::File(b)) => self.file.moves(a, b),
            (a, b) => a.kind() != b.kind(),
        }
    }
}

fn unsupported(spec: &ResourceSpec) -> ReconcileError {
    ReconcileError::Forbidden(format!("no reconciler for {}", spec.kind_key()))
}
