//! The Argo CD health checks fleetlet ships (examples/gitops/argocd-cm.yaml) give the right
//! verdict on EdgeManifests and EdgeDevices in each state the controller and the bridge
//! write. Live objects from a real rollout are checked in tests/helm.rs.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use fleetlet_testenv::gitops::{argocd_health, kstatus};
use serde_json::{Value, json};

fn cond(type_: &str, status: &str, reason: &str, message: &str) -> Value {
    json!({ "type": type_, "status": status, "reason": reason, "message": message,
            "observedGeneration": 2, "lastTransitionTime": "2026-11-27T08:00:00Z" })
}

fn manifest(generation: i64, observed: Option<i64>, paused: bool, conditions: Vec<Value>) -> Value {
    let mut m = json!({
        "apiVersion": "fleetlet.dev/v1alpha1", "kind": "EdgeManifest",
        "metadata": { "name": "sensor-stack", "namespace": "default", "generation": generation },
        "spec": { "selector": { "matchLabels": { "role": "sensor" } },
                  "rollout": { "maxUnavailable": 1, "paused": paused }, "resources": [] },
    });
    if let Some(o) = observed {
        m["status"] = json!({ "observedGeneration": o, "targeted": 3, "updated": 1, "ready": 1,
                              "failed": 0, "conditions": conditions });
    }
    m
}

fn verdict(obj: &Value) -> String {
    argocd_health(obj).unwrap().0
}

#[test]
fn edge_manifest_health_follows_its_conditions() {
    // No status yet, or a status for an older generation: the controller has not caught up.
    assert_eq!(verdict(&manifest(2, None, false, vec![])), "Progressing");
    // kstatus (Flux) reads no Ready condition and has nothing to go on without a status:
    // it counts such an object as Current (docs/gitops.md says so).
    assert_eq!(kstatus(&manifest(2, None, false, vec![])), "Current");
    let done = vec![
        cond(
            "Ready",
            "True",
            "RolloutComplete",
            "all 3 devices run generation 1 and are Ready",
        ),
        cond("Reconciling", "False", "RolloutComplete", ""),
        cond("Stalled", "False", "NotStalled", ""),
    ];
    assert_eq!(
        verdict(&manifest(2, Some(1), false, done.clone())),
        "Progressing"
    );
    assert_eq!(
        kstatus(&manifest(2, Some(1), false, done.clone())),
        "InProgress"
    );
    assert_eq!(
        kstatus(&manifest(2, Some(2), false, done.clone())),
        "Current"
    );
    assert_eq!(verdict(&manifest(2, Some(2), false, done)), "Healthy");

    let rolling = vec![
        cond(
            "Ready",
            "False",
            "RollingOut",
            "1 of 3 devices updated, 1 Ready",
        ),
        cond(
            "Reconciling",
            "True",
            "RollingOut",
            "1 of 3 devices updated, 1 Ready",
        ),
        cond("Stalled", "False", "NotStalled", ""),
    ];
    assert_eq!(
        kstatus(&manifest(2, Some(2), false, rolling.clone())),
        "InProgress"
    );
    let (status, message) = argocd_health(&manifest(2, Some(2), false, rolling)).unwrap();
    assert_eq!(status, "Progressing");
    assert!(message.contains("1 of 3 devices updated"), "{message}");

    let stuck = vec![
        cond(
            "Ready",
            "False",
            "ProgressDeadlineExceeded",
            "no device became Ready for more than 600s; waiting on: pi-office",
        ),
        cond("Reconciling", "False", "ProgressDeadlineExceeded", ""),
        cond(
            "Stalled",
            "True",
            "ProgressDeadlineExceeded",
            "no device became Ready for more than 600s; waiting on: pi-office",
        ),
    ];
    assert_eq!(
        kstatus(&manifest(2, Some(2), false, stuck.clone())),
        "Failed"
    );
    let (status, message) = argocd_health(&manifest(2, Some(2), false, stuck)).unwrap();
    assert_eq!(status, "Degraded");
    assert!(message.contains("pi-office"), "{message}");

    let lost = vec![
        cond(
            "Ready",
            "False",
            "ResourceConflict",
            "1 conflict(s): file /etc/x on pi-office",
        ),
        cond("Reconciling", "False", "RollingOut", ""),
        cond(
            "Stalled",
            "True",
            "ResourceConflict",
            "1 conflict(s): file /etc/x on pi-office",
        ),
    ];
    assert_eq!(
        kstatus(&manifest(2, Some(2), false, lost.clone())),
        "Failed"
    );
    assert_eq!(verdict(&manifest(2, Some(2), false, lost)), "Degraded");

    let paused = vec![
        cond(
            "Ready",
            "False",
            "RolloutPaused",
            "paused with 1 of 3 devices updated",
        ),
        cond("Reconciling", "False", "RolloutPaused", ""),
        cond("Stalled", "False", "NotStalled", ""),
    ];
    // A paused rollout is neither reconciling nor stalled: Current to Flux, which does not
    // wait for it (docs/gitops.md says so).
    assert_eq!(
        kstatus(&manifest(2, Some(2), true, paused.clone())),
        "Current"
    );
    assert_eq!(verdict(&manifest(2, Some(2), true, paused)), "Suspended");
}

fn device(conditions: Option<Vec<Value>>) -> Value {
    let mut d = json!({
        "apiVersion": "fleetlet.dev/v1alpha1", "kind": "EdgeDevice",
        "metadata": { "name": "pi-office", "namespace": "default", "generation": 1 },
        "spec": {},
    });
    if let Some(c) = conditions {
        d["status"] = json!({ "observedGeneration": 1, "conditions": c });
    }
    d
}

#[test]
fn edge_device_health_follows_heartbeats_and_convergence() {
    assert_eq!(verdict(&device(None)), "Progressing");
    let never = vec![cond(
        "Ready",
        "False",
        "NeverConnected",
        "the device's agent has never connected",
    )];
    assert_eq!(verdict(&device(Some(never))), "Progressing");
    let fine = vec![
        cond("Ready", "True", "HeartbeatFresh", ""),
        cond("Converged", "True", "AllResourcesReady", ""),
        cond("Degraded", "False", "NoFailures", ""),
    ];
    assert_eq!(verdict(&device(Some(fine))), "Healthy");
    let applying = vec![
        cond("Ready", "True", "HeartbeatFresh", ""),
        cond(
            "Converged",
            "False",
            "Applying",
            "device runs generation 1, desired 2",
        ),
        cond("Degraded", "False", "NoFailures", ""),
    ];
    assert_eq!(verdict(&device(Some(applying))), "Progressing");
    let failing = vec![
        cond("Ready", "True", "HeartbeatFresh", ""),
        cond("Converged", "False", "ResourcesNotReady", "collector"),
        cond("Degraded", "True", "ResourcesFailed", "collector"),
    ];
    let (status, message) = argocd_health(&device(Some(failing))).unwrap();
    assert_eq!(status, "Degraded");
    assert!(message.contains("collector"), "{message}");
    let silent = vec![
        cond(
            "Ready",
            "Unknown",
            "HeartbeatMissed",
            "no heartbeat within the grace period",
        ),
        cond("Converged", "True", "AllResourcesReady", ""),
    ];
    assert_eq!(verdict(&device(Some(silent.clone()))), "Degraded");

    // A status for an older spec (the bridge has not caught up), and a new object with the
    // CRD's status default: not yet judged.
    let mut stale = device(Some(silent.clone()));
    stale["metadata"]["generation"] = json!(2);
    let (status, message) = argocd_health(&stale).unwrap();
    assert_eq!(status, "Progressing", "{message}");
    let mut fresh = device(None);
    fresh["status"] = json!({ "observedGeneration": -1 });
    assert_eq!(verdict(&fresh), "Progressing");
    // Paused or revoked by its owner: Suspended, whatever its heartbeats say.
    for (field, word) in [("paused", "paused"), ("revoked", "revoked")] {
        let mut d = device(Some(silent.clone()));
        d["spec"][field] = json!(true);
        let (status, message) = argocd_health(&d).unwrap();
        assert_eq!(status, "Suspended", "{field}");
        assert!(message.contains(word), "{message}");
    }
    // Conditions without a reason (another writer, an older bridge) do not break the check.
    let bare = vec![json!({ "type": "Ready", "status": "False" })];
    assert_eq!(verdict(&device(Some(bare))), "Degraded");
}

#[test]
fn new_empty_and_reasonless_manifests_are_judged_without_errors() {
    // The CRD's status default: kstatus and Argo CD both see work not yet done.
    let fresh = manifest(1, Some(-1), false, vec![]);
    assert_eq!(kstatus(&fresh), "InProgress");
    assert_eq!(verdict(&fresh), "Progressing");
    // Selecting no device is not "rolled out".
    let none = vec![
        cond(
            "Ready",
            "False",
            "NoDevicesSelected",
            "no EdgeDevice in this namespace matches spec.selector or spec.devices",
        ),
        cond("Reconciling", "False", "NoDevicesSelected", ""),
        cond("Stalled", "False", "NotStalled", ""),
    ];
    let (status, message) = argocd_health(&manifest(1, Some(1), false, none.clone())).unwrap();
    assert_eq!(status, "Degraded");
    assert!(message.contains("NoDevicesSelected"), "{message}");
    assert_eq!(kstatus(&manifest(1, Some(1), false, none)), "Current");
    // A Stalled or Ready condition without a reason.
    let stalled = vec![json!({ "type": "Stalled", "status": "True", "message": "stuck" })];
    let (status, message) = argocd_health(&manifest(1, Some(1), false, stalled)).unwrap();
    assert_eq!(status, "Degraded");
    assert!(message.contains("stuck"), "{message}");
    let waiting = vec![json!({ "type": "Ready", "status": "False" })];
    assert_eq!(
        verdict(&manifest(1, Some(1), false, waiting)),
        "Progressing"
    );
}
