//! Pods on virtual nodes: their status from what the device reports, and their final
//! deletion once the device has removed their containers (what a kubelet does).

use std::{collections::HashSet, sync::Arc};

use fleetlet_crds::naming::{container_id, pod_tag, shows_refusal};
use fleetlet_protocol::{AgentStatus, DeviceId, ResourceDetails, ResourceStatus, Timestamp};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, Patch, PatchParams},
    runtime::reflector::ObjectRef,
};
use serde_json::{Value, json};
use tracing::{debug, info, warn};

fn rfc3339(t: Timestamp) -> String {
    k8s_openapi::jiff::Timestamp::from_millisecond(i64::try_from(t.as_millis()).unwrap_or(0))
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// The device as the pod status needs it.
pub struct DeviceSide<'a> {
    pub status: Option<&'a AgentStatus>,
    /// Heartbeat fresh.
    pub alive: bool,
    pub host_ip: Option<String>,
}

/// How a container runs, as the pod's phase counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    /// Not started by the device: being created, failing to be, or unsupported.
    Waiting,
    Running,
    /// Stopped; `failed` with a non-zero exit code.
    Exited {
        failed: bool,
    },
}

/// One container as its pod's status shows it, from what the device reports of it.
struct ContainerView {
    /// `running`, `terminated` or `waiting`, with their details.
    state: Value,
    ready: bool,
    restarts: u32,
    image_id: Option<String>,
    container_id: Option<String>,
    started: bool,
    run: Run,
    /// Since when the device has the container; `None` when it has none (yet).
    since: Option<Timestamp>,
}

impl ContainerView {
    /// A container the device does not run, with `state` saying why.
    fn waiting(state: Value) -> Self {
        Self {
            state,
            ready: false,
            restarts: 0,
            image_id: None,
            container_id: None,
            started: false,
            run: Run::Waiting,
            since: None,
        }
    }

    /// A container not reported as one yet.
    fn creating() -> Self {
        Self::waiting(json!({ "waiting": { "reason": "ContainerCreating" } }))
    }
}

/// What the pod status says of a container, from the device's report of it (`None`: not
/// reported yet). `image` is the spec's, which `imageID` pins to the digest that runs.
fn container_view(reported: Option<&ResourceStatus>, image: &str) -> ContainerView {
    match reported {
        Some(ResourceStatus::Ready { since, details }) => {
            let ResourceDetails::Container {
                container_id,
                image_digest,
                state,
                restart_count,
                started_at,
                exit_code,
                probe_ready,
            } = &**details
            else {
                return ContainerView::creating();
            };
            let (st, run) = if state == "running" {
                (
                    json!({ "running": { "startedAt": started_at.map(rfc3339) } }),
                    Run::Running,
                )
            } else {
                let code = exit_code.unwrap_or(0);
                (
                    json!({ "terminated": { "exitCode": code,
                        "reason": if code == 0 { "Completed" } else { "Error" },
                        "startedAt": started_at.map(rfc3339) } }),
                    Run::Exited { failed: code != 0 },
                )
            };
            ContainerView {
                state: st,
                ready: state == "running" && probe_ready.unwrap_or(true),
                restarts: *restart_count,
                image_id: image_digest.clone().map(|d| format!("{image}@{d}")),
                container_id: Some(format!("podman://{container_id}")),
                started: state == "running",
                run,
                since: Some(*since),
            }
        }
        Some(ResourceStatus::Failed { error, .. }) => {
            let reason = if error.contains("pulling") || error.contains("image not found") {
                "ErrImagePull"
            } else {
                "CreateContainerError"
            };
            ContainerView::waiting(json!({ "waiting": { "reason": reason, "message": error } }))
        }
        Some(ResourceStatus::Unsupported { message, .. }) => ContainerView::waiting(
            json!({ "waiting": { "reason": "Unsupported", "message": message } }),
        ),
        _ => ContainerView::creating(),
    }
}

/// A container's entry in `containerStatuses`.
fn container_status(name: &str, image: String, view: ContainerView) -> Value {
    let mut s = json!({
        "name": name, "image": image, "imageID": view.image_id.unwrap_or_default(),
        "ready": view.ready, "started": view.started, "restartCount": view.restarts,
        "state": view.state,
    });
    if let Some(cid) = view.container_id {
        s["containerID"] = json!(cid);
    }
    s
}

/// The pod's phase from how its containers run: done (Succeeded, or Failed if one exited
/// non-zero) only when all have stopped and none is restarted, as a kubelet would have it.
fn pod_phase(runs: &[Run], restart_always: bool) -> &'static str {
    let terminated = runs
        .iter()
        .filter(|r| matches!(r, Run::Exited { .. }))
        .count();
    if !runs.is_empty() && terminated == runs.len() && !restart_always {
        if runs.contains(&Run::Exited { failed: true }) {
            "Failed"
        } else {
            "Succeeded"
        }
    } else if runs.contains(&Run::Running) {
        "Running"
    } else {
        "Pending"
    }
}

/// `status` for a pod from its device's report; `None` when there is nothing to say yet.
pub fn pod_status(pod: &Pod, device: &DeviceSide<'_>) -> Option<Value> {
    let ns = pod.namespace().unwrap_or_default();
    let name = pod.name_any();
    let spec = pod.spec.as_ref()?;
    let restart_always = spec.restart_policy.as_deref().unwrap_or("Always") == "Always";
    let mut statuses = Vec::new();
    let mut runs = Vec::new();
    let mut all_ready = true;
    let mut start: Option<Timestamp> = None;
    for (i, c) in spec.containers.iter().enumerate() {
        let id = container_id(&ns, &name, i, &c.name)?;
        let reported = device.status.and_then(|s| s.resources.get(&id));
        let image = c.image.clone().unwrap_or_default();
        let view = container_view(reported, &image);
        if let Some(since) = view.since {
            start = Some(start.map_or(since, |s| s.min(since)));
        }
        all_ready &= view.ready;
        runs.push(view.run);
        statuses.push(container_status(&c.name, image, view));
    }
    let phase = pod_phase(&runs, restart_always);
    let ready = all_ready && device.alive && phase == "Running";
    let cond =
        |t: &str, ok: bool| json!({ "type": t, "status": if ok { "True" } else { "False" } });
    let mut status = json!({
        "phase": phase,
        "conditions": [
            cond("PodScheduled", true),
            cond("Initialized", true),
            cond("ContainersReady", all_ready && phase == "Running"),
            cond("Ready", ready),
        ],
        "containerStatuses": statuses,
    });
    if let Some(ip) = &device.host_ip {
        status["hostIP"] = json!(ip);
        status["hostIPs"] = json!([{ "ip": ip }]);
        status["podIP"] = json!(ip);
        status["podIPs"] = json!([{ "ip": ip }]);
    }
    if let Some(t) = start {
        status["startTime"] = json!(rfc3339(t));
    }
    Some(status)
}

/// What decides whether a pod's status needs a write: no timestamps (the apiserver keeps
/// seconds only) and no fields it fills in itself.
fn essence(v: &Value) -> Value {
    let conditions: Vec<Value> = v
        .get("conditions")
        .and_then(Value::as_array)
        .map(|cs| {
            cs.iter()
                .map(|c| json!([c.get("type"), c.get("status")]))
                .collect()
        })
        .unwrap_or_default();
    let containers: Vec<Value> = v
        .get("containerStatuses")
        .and_then(Value::as_array)
        .map(|cs| {
            cs.iter()
                .map(|c| {
                    let state = c.get("state").and_then(Value::as_object);
                    let (kind, detail) = state
                        .and_then(|s| s.iter().next())
                        .map(|(k, d)| {
                            (
                                k.clone(),
                                json!([d.get("reason"), d.get("exitCode"), d.get("message")]),
                            )
                        })
                        .unwrap_or_default();
                    json!([
                        c.get("name"),
                        c.get("ready"),
                        c.get("restartCount"),
                        c.get("imageID"),
                        c.get("containerID"),
                        kind,
                        detail
                    ])
                })
                .collect()
        })
        .unwrap_or_default();
    json!([
        v.get("phase"),
        conditions,
        containers,
        v.get("hostIP"),
        v.get("podIP")
    ])
}

/// Whether the pod's stored status already says what `want` says (so no write is needed).
fn same(pod: &Pod, want: &Value) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| serde_json::to_value(s).ok())
        .is_some_and(|have| essence(&have) == essence(want))
}

/// The status write for `want`, made only on the version of the pod it was decided from:
/// the bridge is not the pod's only status writer (the controller marks the pods a device
/// cannot run Failed), and a write from an older view would undo a newer one.
fn status_patch(pod: &Pod, want: Value) -> Value {
    json!({
        "metadata": { "resourceVersion": pod.metadata.resource_version },
        "status": want
    })
}

/// Writes a pod's status if it changed.
pub async fn mirror_status(client: &Client, pod: &Arc<Pod>, device: &DeviceSide<'_>) -> bool {
    if shows_refusal(pod) {
        return false;
    }
    let Some(want) = pod_status(pod, device) else {
        return false;
    };
    if same(pod, &want) {
        return false;
    }
    let api: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
    match api
        .patch_status(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&status_patch(pod, want)),
        )
        .await
    {
        Ok(_) => true,
        // The pod changed since this view of it (the controller refused it, say): the
        // next pass decides again from the newer one.
        Err(kube::Error::Api(s)) if s.code == 409 => {
            debug!(pod = %pod.name_any(), "pod changed since it was read; not written");
            false
        }
        Err(e) => {
            warn!(pod = %pod.name_any(), error = %e, "patching pod status failed");
            false
        }
    }
}

/// A pod being deleted whose containers the device no longer reports (or whose device is
/// gone): removed for good, as a kubelet does once it has stopped the containers.
pub async fn finalize(client: &Client, pod: &Arc<Pod>, device: Option<&AgentStatus>) -> bool {
    if pod.metadata.deletion_timestamp.is_none() {
        return false;
    }
    let tag = format!(
        "{}-",
        pod_tag(&pod.namespace().unwrap_or_default(), &pod.name_any())
    );
    if device.is_some_and(|s| s.resources.keys().any(|id| id.as_str().starts_with(&tag))) {
        return false;
    }
    let api: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: pod.uid().map(|uid| kube::api::Preconditions {
            uid: Some(uid),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api.delete(&pod.name_any(), &dp).await {
        Ok(_) => {
            info!(pod = %pod.name_any(), "pod removed from its device; deleted");
            true
        }
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => false,
        Err(e) => {
            warn!(pod = %pod.name_any(), error = %e, "final pod deletion failed");
            false
        }
    }
}

/// One pass over every pod bound to a virtual node: mirror status, finalize deletions.
pub async fn pass(
    mirror: &crate::mirror::Mirror,
    pods: &kube::runtime::reflector::Store<Pod>,
    own: &fleetlet_plumbing::shards::Ownership,
) -> (u32, u32) {
    // Runs on every burst of heartbeats: with no Pods bound anywhere it costs nothing, and
    // otherwise only what the bound Pods name.
    let bound: Vec<(Arc<Pod>, String, Option<DeviceId>)> = pods
        .state()
        .into_iter()
        .filter_map(|pod| {
            let node = pod.spec.as_ref()?.node_name.clone()?;
            let device = mirror
                .ctx
                .nodes
                .get(&ObjectRef::new(&node))
                .and_then(|n| fleetlet_crds::naming::device_of(&n.metadata));
            Some((pod, node, device))
        })
        .collect();
    if bound.is_empty() {
        return (0, 0);
    }
    let devices: HashSet<DeviceId> = bound.iter().filter_map(|(_, _, d)| d.clone()).collect();
    let objects = mirror.device_objects(Some(&devices));
    let now = Timestamp::now().as_millis();
    let (mut written, mut deleted) = (0, 0);
    for (pod, node, device) in bound {
        let Some(device) = device.as_ref() else {
            // Bound to a Node that is not (or no longer) one of ours; shard 0's holder
            // finishes its deletion.
            if own.holds_shard(0)
                && pod.metadata.deletion_timestamp.is_some()
                && node.starts_with("fleetlet-")
                && finalize(&mirror.ctx.client, &pod, None).await
            {
                deleted += 1;
            }
            continue;
        };
        if !own.holds(device.as_str()) {
            continue;
        }
        let status = mirror.ctx.actual.get(device).map(|v| v.value);
        if finalize(&mirror.ctx.client, &pod, status.as_deref()).await {
            deleted += 1;
            continue;
        }
        if pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let hb = mirror.heartbeat(device);
        // The same grace as the device's Node: its own, or the bridge's.
        let grace_ms = objects
            .get(device)
            .map_or(mirror.timing.grace_ms, |d| mirror.grace_ms_of(d));
        let side = DeviceSide {
            status: status.as_deref(),
            alive: hb
                .as_ref()
                .is_some_and(|h| now.saturating_sub(h.timestamp.as_millis()) < grace_ms),
            host_ip: hb
                .as_ref()
                .and_then(|h| h.facts.as_deref())
                .and_then(|f| f.addresses.iter().find(|a| a.type_ == "InternalIP"))
                .map(|a| a.address.clone()),
        };
        if mirror_status(&mirror.ctx.client, &pod, &side).await {
            written += 1;
        }
    }
    (written, deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(exit_code: Option<i32>, state: &str, probe_ready: Option<bool>) -> ResourceStatus {
        ResourceStatus::ready(
            Timestamp(1_700_000_000_000),
            ResourceDetails::Container {
                container_id: "abc".into(),
                image_digest: Some("sha256:1234".into()),
                state: state.into(),
                restart_count: 2,
                started_at: Some(Timestamp(1_700_000_000_000)),
                exit_code,
                probe_ready,
            },
        )
    }

    #[test]
    fn the_phase_is_done_only_when_every_container_stopped_and_none_restarts() {
        use Run::{Exited, Running, Waiting};
        assert_eq!(pod_phase(&[], false), "Pending");
        assert_eq!(pod_phase(&[Waiting, Running], false), "Running");
        assert_eq!(pod_phase(&[Waiting, Waiting], false), "Pending");
        assert_eq!(
            pod_phase(&[Exited { failed: false }, Exited { failed: false }], false),
            "Succeeded"
        );
        assert_eq!(
            pod_phase(&[Exited { failed: false }, Exited { failed: true }], false),
            "Failed"
        );
        // restartPolicy Always: stopped containers come back, the pod is not done.
        assert_eq!(pod_phase(&[Exited { failed: true }], true), "Pending");
        assert_eq!(
            pod_phase(&[Exited { failed: false }, Running], false),
            "Running"
        );
    }

    #[test]
    fn a_container_shows_as_a_kubelet_shows_it() {
        let v = container_view(Some(&running(None, "running", Some(false))), "busybox");
        assert_eq!(v.run, Run::Running);
        assert!(v.started && !v.ready, "running, readiness probe failing");
        assert_eq!(v.restarts, 2);
        assert_eq!(v.image_id.as_deref(), Some("busybox@sha256:1234"));
        assert_eq!(v.container_id.as_deref(), Some("podman://abc"));
        assert!(v.state.get("running").is_some(), "{}", v.state);

        let v = container_view(Some(&running(Some(3), "exited", None)), "busybox");
        assert_eq!(v.run, Run::Exited { failed: true });
        assert_eq!(v.state["terminated"]["exitCode"], 3);
        assert_eq!(v.state["terminated"]["reason"], "Error");

        let failed = ResourceStatus::Failed {
            since: Timestamp(1),
            error: "pulling busybox: manifest unknown".into(),
            retry_after: None,
            permanent: false,
        };
        let v = container_view(Some(&failed), "busybox");
        assert_eq!(v.run, Run::Waiting);
        assert_eq!(v.state["waiting"]["reason"], "ErrImagePull");

        let v = container_view(None, "busybox");
        assert_eq!(v.state["waiting"]["reason"], "ContainerCreating");
        assert!(v.since.is_none());
    }
}
