//! Maps each resource kind to its reconciler, and says which kinds this device runs.

use std::{collections::BTreeSet, sync::Arc};

use fleetlet_protocol::{ResourceDetails, ResourceId, ResourceKind, ResourceSpec};
use tokio::time::Instant;

use crate::{
    config::Settings,
    container::ContainerReconciler,
    file::FileReconciler,
    network::NetworkReconciler,
    reconciler::{Deleted, Observation, ReconcileError, Reconciler},
    sealing::SealingKey,
    shelljob::ShellJobReconciler,
    systemd::SystemdReconciler,
    upgrade::UpgradeReconciler,
};

/// The reconcilers of this agent. Dispatch is a `match` on the spec: adding a kind is a
/// new field and a new arm, checked by the compiler.
#[derive(Debug, Clone)]
pub struct Registry {
    enabled: BTreeSet<ResourceKind>,
    file: FileReconciler,
    container: ContainerReconciler,
    systemd: SystemdReconciler,
    shell_job: ShellJobReconciler,
    network: NetworkReconciler,
    upgrade: UpgradeReconciler,
}

impl Registry {
    /// The reconcilers for `s`; sealed content (a Pod's Secret) opens with `sealing`.
    pub fn from_settings(s: &Settings, sealing: Arc<SealingKey>) -> Self {
        Self {
            enabled: s.enabled_kinds.clone(),
            file: FileReconciler::with_prefix(
                s.file_roots.clone(),
                s.max_file_bytes,
                s.file_prefix.clone(),
            )
            .with_fetch(s.fetch.clone())
            .with_sealing(sealing.clone()),
            container: ContainerReconciler::with_host_prefix(
                s.container.clone(),
                s.device.clone(),
                &s.state_dir,
                s.file_prefix.clone(),
            )
            .with_sealing(sealing),
            systemd: SystemdReconciler::new(s.systemd.clone(), s.device.clone()),
            upgrade: UpgradeReconciler::new(
                &s.upgrade,
                &s.state_dir,
                s.manifest_keys.clone(),
                s.fetch.clone(),
                SystemdReconciler::new(s.systemd.clone(), s.device.clone()),
                s.systemd.agent_unit.clone(),
            ),
            network: NetworkReconciler::new(
                s.network.clone(),
                s.systemd.bus_address.clone(),
                s.device.clone(),
                &s.state_dir,
            ),
            shell_job: ShellJobReconciler::new(s.shell_job.clone(), s.device.clone(), &s.state_dir),
        }
    }

    /// `Err(message)` when this agent will not run `spec`'s kind.
    pub fn supports(&self, spec: &ResourceSpec) -> Result<(), String> {
        use ResourceKind::{
            AgentUpgrade, Container, File, NetworkConfig, ShellJob, SystemdUnit, Unsupported,
        };
        let kind = spec.kind();
        let enabled = self.enabled.contains(&kind);
        match kind {
            Unsupported => Err(format!(
                "resource kind {:?} is unknown to agent {}",
                spec.kind_key(),
                crate::VERSION
            )),
            NetworkConfig if !enabled => Err(
                "networkConfig resources are disabled on this device; its owner enables them \
                 (for interfaces systemd-networkd manages) by adding \"networkConfig\" to \
                 reconcile.enabled_kinds in the agent's config file"
                    .into(),
            ),
            ShellJob if !enabled => Err(
                "shellJob resources are disabled on this device; only its owner can enable them, \
                 by adding \"shellJob\" to reconcile.enabled_kinds in the agent's config file"
                    .into(),
            ),
            Container | SystemdUnit | File | AgentUpgrade if !enabled => Err(format!(
                "{kind} resources are disabled on this device (reconcile.enabled_kinds)"
            )),
            Container | SystemdUnit | File | ShellJob | NetworkConfig | AgentUpgrade => Ok(()),
        }
    }

    /// Tells the reconcilers that check the control plane after a change (NetworkConfig,
    /// AgentUpgrade) how to reach it, once the agent is connected.
    pub fn set_uplink(&self, uplink: crate::network::Uplink) {
        self.network.set_uplink(uplink.clone());
        self.upgrade.set_uplink(uplink);
    }

    /// The Container reconciler (relay sessions use its podman client and ownership).
    pub fn containers(&self) -> ContainerReconciler {
        self.container.clone()
    }

    /// When a reconciler wants the resources looked at again (a readiness probe is due).
    pub fn next_wake(&self) -> Option<Instant> {
        [
            self.container.next_probe(),
            self.file.next_wake(),
            self.upgrade.next_wake(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    pub async fn observe(
        &self,
        id: &ResourceId,
        spec: &ResourceSpec,
    ) -> Result<Observation, ReconcileError> {
        match spec {
            ResourceSpec::File(s) => self.file.observe(id, s).await,
            ResourceSpec::Container(s) => self.container.observe(id, s).await,
            ResourceSpec::SystemdUnit(s) => self.systemd.observe(id, s).await,
            ResourceSpec::ShellJob(s) => self.shell_job.observe(id, s).await,
            ResourceSpec::NetworkConfig(s) => self.network.observe(id, s).await,
            ResourceSpec::AgentUpgrade(s) => self.upgrade.observe(id, s).await,
            ResourceSpec::Unsupported(_) => Err(unsupported(spec)),
        }
    }

    pub async fn reconcile(
        &self,
        id: &ResourceId,
        spec: &ResourceSpec,
    ) -> Result<ResourceDetails, ReconcileError> {
        match spec {
            ResourceSpec::File(s) => self.file.reconcile(id, s).await,
            ResourceSpec::Container(s) => self.container.reconcile(id, s).await,
            ResourceSpec::SystemdUnit(s) => self.systemd.reconcile(id, s).await,
            ResourceSpec::ShellJob(s) => self.shell_job.reconcile(id, s).await,
            ResourceSpec::NetworkConfig(s) => self.network.reconcile(id, s).await,
            ResourceSpec::AgentUpgrade(s) => self.upgrade.reconcile(id, s).await,
            ResourceSpec::Unsupported(_) => Err(unsupported(spec)),
        }
    }

    pub async fn delete(
        &self,
        id: &ResourceId,
        applied: &ResourceSpec,
    ) -> Result<Deleted, ReconcileError> {
        match applied {
            ResourceSpec::File(s) => self.file.delete(id, s).await,
            ResourceSpec::Container(s) => self.container.delete(id, s).await,
            ResourceSpec::SystemdUnit(s) => self.systemd.delete(id, s).await,
            ResourceSpec::ShellJob(s) => self.shell_job.delete(id, s).await,
            ResourceSpec::NetworkConfig(s) => self.network.delete(id, s).await,
            ResourceSpec::AgentUpgrade(s) => self.upgrade.delete(id, s).await,
            ResourceSpec::Unsupported(_) => Err(unsupported(applied)),
        }
    }

    /// Whether `new` addresses another object than `old` (so `old` must go first).
    pub fn moves(&self, old: &ResourceSpec, new: &ResourceSpec) -> bool {
        match (old, new) {
            (ResourceSpec::File(a), ResourceSpec::File(b)) => self.file.moves(a, b),
            (ResourceSpec::Container(a), ResourceSpec::Container(b)) => self.container.moves(a, b),
            (ResourceSpec::SystemdUnit(a), ResourceSpec::SystemdUnit(b)) => {
                self.systemd.moves(a, b)
            }
            (ResourceSpec::ShellJob(a), ResourceSpec::ShellJob(b)) => self.shell_job.moves(a, b),
            (ResourceSpec::NetworkConfig(a), ResourceSpec::NetworkConfig(b)) => {
                self.network.moves(a, b)
            }
            (ResourceSpec::AgentUpgrade(a), ResourceSpec::AgentUpgrade(b)) => {
                self.upgrade.moves(a, b)
            }
            // Another kind under the same id always moves; kinds without a reconciler
            // never reach a device, so they address nothing.
            (
                ResourceSpec::File(_)
                | ResourceSpec::Container(_)
                | ResourceSpec::SystemdUnit(_)
                | ResourceSpec::ShellJob(_)
                | ResourceSpec::NetworkConfig(_)
                | ResourceSpec::AgentUpgrade(_)
                | ResourceSpec::Unsupported(_),
                _,
            ) => old.kind() != new.kind(),
        }
    }
}

fn unsupported(spec: &ResourceSpec) -> ReconcileError {
    ReconcileError::Forbidden(format!("no reconciler for {}", spec.kind_key()))
}
