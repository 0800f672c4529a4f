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
            // Only a change is sent: every send wakes the holder's loop for a pass.
            if *leader.borrow() != holding {
                info!(identity = %self.identity, leader = holding, "leadership changed");
                leader.send_replace(holding);
            }
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
            let lease = new_lease(&self.name, None, &self.identity, secs, now);
            return write(api, &lease, true).await;
        };
        let holder = lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref());
        let ours = holder == Some(self.identity.as_str());
        if !ours && !expired(&lease, now) && holder.is_some_and(|h| !h.is_empty()) {
            return Ok(false);
        }
        hold(&mut lease, &self.identity, secs, now);
        write(api, &lease, false).await
    }

    /// Gives the lease up so a standby takes over at its next try, not after expiry.
    async fn release(&self, api: &Api<Lease>) -> Result<(), fleetlet_crds::kube::Error> {
        if release(api, &self.name, &self.identity).await? {
            info!(identity = %self.identity, "released the leader lease");
        }
        Ok(())
    }
}

/// A Lease named `name`, labelled `labels`, held by `identity` from `now` for `secs`.
pub(crate) fn new_lease(
    name: &str,
    labels: Option<std::collections::BTreeMap<String, String>>,
    identity: &str,
    secs: i32,
    now: Timestamp,
) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels,
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(identity.into()),
            lease_duration_seconds: Some(secs),
            acquire_time: Some(MicroTime(now)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(0),
            ..Default::default()
        }),
    }
}

/// Makes `lease` held by `identity` from `now` for `secs`: renewed if it was ours, taken
/// (a new acquire time, one more transition) if not.
pub(crate) fn hold(lease: &mut Lease, identity: &str, secs: i32, now: Timestamp) {
    let spec = lease.spec.get_or_insert_with(Default::default);
    if spec.holder_identity.as_deref() != Some(identity) {
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.holder_identity = Some(identity.into());
    spec.lease_duration_seconds = Some(secs);
    spec.renew_time = Some(MicroTime(now));
}

/// Whether `lease` ran out by `now` (or never said when it would).
pub(crate) fn expired(lease: &Lease, now: Timestamp) -> bool {
    match lease
        .spec
        .as_ref()
        .map(|s| (&s.renew_time, s.lease_duration_seconds))
    {
        Some((Some(renew), Some(d))) => {
            renew.0.as_millisecond() + i64::from(d) * 1000 < now.as_millisecond()
        }
        _ => true,
    }
}

/// Creates `lease`, or replaces it at the resourceVersion it was read with; `Ok(false)`
/// when another writer got there first (409).
pub(crate) async fn write(
    api: &Api<Lease>,
    lease: &Lease,
    create: bool,
) -> Result<bool, fleetlet_crds::kube::Error> {
    let result = if create {
        api.create(&PostParams::default(), lease).await
    } else {
        let name = lease.metadata.name.as_deref().unwrap_or_default();
        api.replace(name, &PostParams::default(), lease).await
    };
    match result {
        Ok(_) => Ok(true),
        Err(fleetlet_crds::kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Gives Lease `name` up if `identity` holds it; whether it did.
pub(crate) async fn release(
    api: &Api<Lease>,
    name: &str,
    identity: &str,
) -> Result<bool, fleetlet_crds::kube::Error> {
    if let Some(mut lease) = api.get_opt(name).await?
        && let Some(spec) = lease.spec.as_mut()
        && spec.holder_identity.as_deref() == Some(identity)
    {
        spec.holder_identity = None;
        api.replace(name, &PostParams::default(), &lease).await?;
        return Ok(true);
    }
    Ok(false)
}
