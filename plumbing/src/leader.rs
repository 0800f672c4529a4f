//! Leader election on a coordination.k8s.io Lease, so `replicas: 2` is safe: only the
//! holder writes. KV compare-and-set still guards against a stale leader's last write.

use std::time::Duration;

use fleetlet_crds::{
    k8s_openapi::{
        api::coordination::v1::{Lease, LeaseSpec},
        apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
        jiff::Timestamp,
    },
    kube::{Api, Client, api::PostParams},
};
use tokio::sync::watch;
use tracing::{info, warn};

pub struct Election {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_every: Duration,
}

impl Election {
    /// An election for Lease `namespace/name`, held for `lease_seconds` and renewed three
    /// times in that span.
    pub fn new(namespace: &str, name: &str, identity: &str, lease_seconds: u64) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(lease_seconds),
            renew_every: Duration::from_secs((lease_seconds / 3).max(1)),
        }
    }

    /// Keeps trying to hold the lease; `leader` says whether we do. Releases it on stop.
    pub async fn run(
        self,
        client: Client,
        leader: watch::Sender<bool>,
        mut stop: watch::Receiver<bool>,
    ) {
        let api: Api<Lease> = Api::namespaced(client, &self.namespace);
        loop {
            let holding = match self.try_acquire(&api).await {
                Ok(h) => h,
                Err(e) => {
                    warn!(error = %e, "leader election: cannot reach the lease; stepping down");
                    false
                }
            };
            if *leader.borrow() != holding {
                info!(identity = %self.identity, leader = holding, "leadership changed");
            }
            leader.send_replace(holding);
            tokio::select! {
                _ = tokio::time::sleep(self.renew_every) => {}
                _ = crate::stopped(&mut stop) => break,
            }
        }
        if *leader.borrow() {
            leader.send_replace(false);
            let _ = self.release(&api).await;
        }
    }

    async fn try_acquire(&self, api: &Api<Lease>) -> Result<bool, fleetlet_crds::kube::Error> {
        let now = Timestamp::now();
        let secs = i32::try_from(self.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let Some(mut lease) = api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(fleetlet_crds::kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let ours = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
            (Some(renew), Some(d)) => {
                renew.0.as_millisecond() + i64::from(d) * 1000 < now.as_millisecond()
            }
            _ => true,
        };
        if !ours
            && !expired
            && spec
                .holder_identity
                .as_deref()
                .is_some_and(|h| !h.is_empty())
        {
            return Ok(false);
        }
        if !ours {
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.holder_identity = Some(self.identity.clone());
        spec.lease_duration_seconds = Some(secs);
        spec.renew_time = Some(MicroTime(now));
        // replace() sends resourceVersion: a concurrent taker makes this fail with 409.
        match api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(fleetlet_crds::kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the lease up so a standby takes over at its next try, not after expiry.
    async fn release(&self, api: &Api<Lease>) -> Result<(), fleetlet_crds::kube::Error> {
        if let Some(mut lease) = api.get_opt(&self.name).await?
            && let Some(spec) = lease.spec.as_mut()
            && spec.holder_identity.as_deref() == Some(self.identity.as_str())
        {
            spec.holder_identity = None;
            api.replace(&self.name, &PostParams::default(), &lease)
                .await?;
            info!(identity = %self.identity, "released the leader lease");
        }
        Ok(())
    }
}
