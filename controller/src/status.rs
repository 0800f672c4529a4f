//! The EdgeManifest status rules, as pure code: from a manifest, its rollout progress,
//! the conflicts and device limits of the plan, and the time, to the status the controller
//! writes. No I/O and no clock of its own, so each rule is tested like [`crate::plan`].
//!
//! The conditions follow kstatus (Ready, Reconciling, Stalled, read by Flux and Argo CD),
//! then Progressing, Available, Conflict and Degraded. Messages are deterministic: an
//! unchanged rollout gives an unchanged status, so nothing is rewritten.

use std::{collections::BTreeSet, time::Duration};

use fleetlet_crds::{
    Condition, EdgeManifest, EdgeManifestStatus, Time, k8s_openapi::jiff::Timestamp as KTime,
};
use fleetlet_protocol::DeviceId;

use crate::plan::{Conflict, Failure, OverLimit, Progress};

/// What one manifest's status is computed from.
pub struct Inputs<'a> {
    pub manifest: &'a EdgeManifest,
    /// `namespace/name`.
    pub key: &'a str,
    pub progress: &'a Progress,
    pub conflicts: &'a [Conflict],
    pub over_limit: &'a [OverLimit],
    /// The progress deadline when the manifest sets none.
    pub default_deadline: Duration,
    pub now: KTime,
}

/// A condition's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    True,
    False,
    Unknown,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::True => "True",
            Self::False => "False",
            Self::Unknown => "Unknown",
        }
    }
}

/// A condition before it is stamped with its type, generation and transition time.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cond {
    state: State,
    reason: &'static str,
    message: String,
}

impl Cond {
    fn new(state: State, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            state,
            reason,
            message: message.into(),
        }
    }
}

/// The status to write for `i.manifest`.
pub fn manifest_status(i: &Inputs<'_>) -> EdgeManifestStatus {
    let (m, key, pr, conflicts, over_limit) =
        (i.manifest, i.key, i.progress, i.conflicts, i.over_limit);
    let generation = m.metadata.generation.unwrap_or(0);
    let old = m.status.clone().unwrap_or_default();
    let complete = pr.updated == pr.targeted && pr.ready == pr.targeted;
    let deadline = m
        .spec
        .rollout
        .as_ref()
        .and_then(|r| r.progress_deadline_seconds)
        .map_or(i.default_deadline, |s| Duration::from_secs(u64::from(s)));
    // The progress clock lives in the status (lastProgressTime), so it survives a
    // controller restart or a change of leader: it restarts only when the generation or
    // the number of Ready devices changes.
    let now = i.now;
    let last_progress = match &old.last_progress_time {
        Some(t) if old.observed_generation == Some(generation) && old.ready == pr.ready => t.0,
        _ => now,
    };
    let stalled_for = Duration::try_from(now.duration_since(last_progress)).unwrap_or_default();
    let paused = m.spec.rollout.as_ref().is_some_and(|r| r.paused);
    // Failing resources, named: the first few, permanent ones first.
    let mut failures: Vec<&Failure> = pr.failures.iter().collect();
    failures.sort_by_key(|f| !f.permanent);
    let permanent: Vec<&Failure> = failures.iter().copied().filter(|f| f.permanent).collect();
    let stuck_devices: BTreeSet<&DeviceId> = permanent.iter().map(|f| &f.device).collect();
    // Nothing left that can move without a new spec: every device still waited on
    // fails permanently.
    let nothing_moves = !permanent.is_empty()
        && pr.pending.is_empty()
        && pr.waiting_on.iter().all(|d| stuck_devices.contains(d));
    let over = over_limit_message(over_limit, key);
    let stuck = stalled_for > deadline;
    let progressing = progressing(
        pr,
        generation,
        (complete, paused, nothing_moves, stuck),
        &permanent,
        over.as_deref(),
        deadline,
    );
    let conflict = conflict_condition(conflicts, key);
    let available = if pr.ready == pr.targeted {
        Cond::new(State::True, "AllDevicesReady", String::new())
    } else {
        Cond::new(
            State::False,
            "DevicesNotReady",
            format!("{} of {} devices Ready", pr.ready, pr.targeted),
        )
    };
    let (ready, reconciling, stalled) = kstatus(
        &Facts {
            complete,
            paused,
            targeted: pr.targeted,
            over: over.as_deref(),
            permanent: &permanent,
            lost_conflict: conflicts.iter().any(|c| c.refused == key),
        },
        &progressing,
        &conflict,
    );
    let cond = |type_: &str, c: Cond| stamp(&old, type_, c, generation, now);
    EdgeManifestStatus {
        observed_generation: Some(generation),
        last_progress_time: Some(Time(last_progress)),
        targeted: pr.targeted,
        updated: pr.updated,
        ready: pr.ready,
        failed: pr.failed,
        conditions: vec![
            cond("Ready", ready),
            cond("Reconciling", reconciling),
            cond("Stalled", stalled),
            cond("Progressing", progressing),
            cond("Available", available),
            cond("Conflict", conflict),
            cond(
                "Degraded",
                if failures.is_empty() {
                    Cond::new(State::False, "NoFailures", String::new())
                } else {
                    Cond::new(State::True, "ResourcesFailed", name_failures(&failures))
                },
            ),
        ],
    }
}

/// The Progressing condition: complete, paused, blocked for good, over device limits,
/// past its deadline, or rolling out. `(complete, paused, nothing_moves, stuck)`.
fn progressing(
    pr: &Progress,
    generation: i64,
    (complete, paused, nothing_moves, stuck): (bool, bool, bool, bool),
    permanent: &[&Failure],
    over: Option<&str>,
    deadline: Duration,
) -> Cond {
    if complete {
        Cond::new(
            State::True,
            "RolloutComplete",
            format!(
                "all {} devices run generation {generation} and are Ready",
                pr.targeted
            ),
        )
    } else if paused {
        Cond::new(
            State::Unknown,
            "RolloutPaused",
            format!(
                "paused with {} of {} devices updated",
                pr.updated, pr.targeted
            ),
        )
    } else if nothing_moves {
        Cond::new(State::False, "PermanentFailure", name_failures(permanent))
    } else if let Some(msg) = over.filter(|_| pr.pending.is_empty() && pr.waiting_on.is_empty()) {
        Cond::new(State::False, "DeviceLimitExceeded", msg)
    } else if stuck {
        Cond::new(
            State::False,
            "ProgressDeadlineExceeded",
            format!(
                "no device became Ready for more than {}s; waiting on: {}",
                deadline.as_secs(),
                waiting_on(pr)
            ),
        )
    } else {
        Cond::new(
            State::True,
            "RollingOut",
            format!(
                "{} of {} devices updated, {} Ready",
                pr.updated, pr.targeted, pr.ready
            ),
        )
    }
}

/// What the kstatus conditions are decided on, besides Progressing and Conflict.
struct Facts<'a> {
    complete: bool,
    paused: bool,
    targeted: u32,
    /// Where the manifest is left out for device limits.
    over: Option<&'a str>,
    permanent: &'a [&'a Failure],
    /// The manifest is the newer side of a conflict: its resource is left out.
    lost_conflict: bool,
}

/// kstatus's conditions, `(Ready, Reconciling, Stalled)`: what Flux and Argo CD read.
fn kstatus(f: &Facts<'_>, progressing: &Cond, conflict: &Cond) -> (Cond, Cond, Cond) {
    // kstatus's conditions (what Flux and Argo CD read): Ready once the rollout is
    // complete without conflicts, Reconciling while it moves, Stalled when it cannot
    // move without someone's help.
    let stalled = if progressing.reason == "ProgressDeadlineExceeded" {
        Cond::new(
            State::True,
            "ProgressDeadlineExceeded",
            progressing.message.clone(),
        )
    } else if let Some(msg) = f.over {
        Cond::new(State::True, "DeviceLimitExceeded", msg)
    } else if !f.permanent.is_empty() {
        // A resource that cannot succeed as written: waiting longer changes nothing.
        Cond::new(State::True, "PermanentFailure", name_failures(f.permanent))
    } else if f.lost_conflict {
        // Only the side that lost: the older manifest keeps its resources and works.
        Cond::new(State::True, "ResourceConflict", conflict.message.clone())
    } else {
        Cond::new(State::False, "NotStalled", String::new())
    };
    let reconciling = if f.complete || f.paused || stalled.state == State::True {
        Cond::new(State::False, progressing.reason, String::new())
    } else {
        Cond::new(State::True, progressing.reason, progressing.message.clone())
    };
    let ready = if stalled.state == State::True {
        Cond::new(State::False, stalled.reason, stalled.message.clone())
    } else if f.complete {
        Cond::new(State::True, progressing.reason, progressing.message.clone())
    } else {
        Cond::new(
            State::False,
            progressing.reason,
            progressing.message.clone(),
        )
    };
    // Nothing selected (a new manifest before its devices, or a selector with a typo):
    // not Ready, and said so, rather than "complete" across zero devices.
    let (ready, reconciling) = if f.targeted == 0 && stalled.state != State::True {
        (
            Cond::new(
                State::False,
                "NoDevicesSelected",
                "no EdgeDevice in this namespace matches spec.selector or spec.devices".to_string(),
            ),
            Cond::new(State::False, "NoDevicesSelected", String::new()),
        )
    } else {
        (ready, reconciling)
    };
    (ready, reconciling, stalled)
}

/// Names failing resources: how many, on how many devices, the first five.
fn name_failures(fs: &[&Failure]) -> String {
    let devices: BTreeSet<&DeviceId> = fs.iter().map(|f| &f.device).collect();
    let shown: Vec<String> = fs
        .iter()
        .take(5)
        .map(|f| {
            format!(
                "{}/{}: {}{}",
                f.device,
                f.resource,
                f.error,
                if f.permanent { " (permanent)" } else { "" }
            )
        })
        .collect();
    format!(
        "{} resource(s) failing on {} device(s): {}{}",
        fs.len(),
        devices.len(),
        shown.join("; "),
        if fs.len() > shown.len() { "; …" } else { "" }
    )
}

/// The devices a rollout waits on (at most twenty), for messages.
fn waiting_on(pr: &Progress) -> String {
    let mut names: Vec<&str> = pr
        .waiting_on
        .iter()
        .chain(&pr.pending)
        .map(|d| d.as_str())
        .collect();
    names.truncate(20);
    names.join(", ")
}

/// Where manifest `key` is left out for a device's limits, if anywhere.
fn over_limit_message(over_limit: &[OverLimit], key: &str) -> Option<String> {
    let mine: Vec<String> = over_limit
        .iter()
        .filter(|o| o.refused == key)
        .map(|o| format!("{} ({})", o.device, o.limit))
        .collect();
    (!mine.is_empty()).then(|| {
        let mut shown = mine.clone();
        shown.truncate(10);
        format!(
            "left out on {} device(s) it would take over their limits: {}",
            mine.len(),
            shown.join(", ")
        )
    })
}

/// The Conflict condition: the first ten conflicts manifest `key` is part of.
fn conflict_condition(conflicts: &[Conflict], key: &str) -> Cond {
    let mine: Vec<String> = conflicts
        .iter()
        .filter(|c| c.kept_by == key || c.refused == key)
        .map(|c| {
            format!(
                "{} on {}: kept by {}, refused for {}",
                c.identity, c.device, c.kept_by, c.refused
            )
        })
        .collect();
    if mine.is_empty() {
        Cond::new(State::False, "NoConflicts", String::new())
    } else {
        let mut msg = mine.clone();
        msg.truncate(10);
        Cond::new(
            State::True,
            "ResourceConflict",
            format!("{} conflict(s): {}", mine.len(), msg.join("; ")),
        )
    }
}

/// `c` as a Condition of `type_`, keeping the old transition time while its status holds.
fn stamp(old: &EdgeManifestStatus, type_: &str, c: Cond, generation: i64, now: KTime) -> Condition {
    let status = c.state.as_str();
    let keep = old
        .conditions
        .iter()
        .find(|o| o.type_ == type_ && o.status == status);
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: c.reason.into(),
        message: c.message,
        observed_generation: Some(generation),
        last_transition_time: keep
            .map(|o| o.last_transition_time.clone())
            .unwrap_or(Time(now)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use fleetlet_protocol::ResourceId;

    use super::*;

    fn manifest(generation: i64, rollout: serde_json::Value) -> EdgeManifest {
        let mut m: EdgeManifest = serde_json::from_value(serde_json::json!({
            "apiVersion": "fleetlet.dev/v1alpha1", "kind": "EdgeManifest",
            "metadata": { "name": "app", "namespace": "ns", "generation": generation },
            "spec": { "devices": ["pi-a", "pi-b"], "rollout": rollout },
        }))
        .unwrap();
        m.status = None;
        m
    }

    fn at(secs: i64) -> KTime {
        KTime::from_second(1_800_000_000 + secs).unwrap()
    }

    fn dev(n: &str) -> DeviceId {
        DeviceId::new(n).unwrap()
    }

    fn status_at(m: &EdgeManifest, p: &Progress, now: KTime) -> EdgeManifestStatus {
        manifest_status(&Inputs {
            manifest: m,
            key: "ns/app",
            progress: p,
            conflicts: &[],
            over_limit: &[],
            default_deadline: Duration::from_secs(600),
            now,
        })
    }

    fn cond<'a>(s: &'a EdgeManifestStatus, t: &str) -> (&'a str, &'a str, &'a str) {
        let c = s.conditions.iter().find(|c| c.type_ == t).unwrap();
        (c.status.as_str(), c.reason.as_str(), c.message.as_str())
    }

    fn rolling(ready: u32) -> Progress {
        Progress {
            targeted: 2,
            updated: 2,
            ready,
            waiting_on: vec![dev("pi-b")],
            ..Default::default()
        }
    }

    #[test]
    fn a_complete_rollout_is_ready_and_nothing_else() {
        let m = manifest(3, serde_json::json!({}));
        let p = Progress {
            targeted: 2,
            updated: 2,
            ready: 2,
            ..Default::default()
        };
        let s = status_at(&m, &p, at(0));
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!(cond(&s, "Ready").0, "True");
        assert_eq!(cond(&s, "Ready").1, "RolloutComplete");
        assert_eq!(cond(&s, "Reconciling").0, "False");
        assert_eq!(cond(&s, "Stalled").0, "False");
        assert_eq!(cond(&s, "Available").0, "True");
        assert_eq!(s.last_progress_time, Some(Time(at(0))));
    }

    #[test]
    fn the_deadline_is_measured_from_the_status_and_its_message_does_not_tick() {
        let mut m = manifest(1, serde_json::json!({}));
        let s = status_at(&m, &rolling(1), at(0));
        assert_eq!(cond(&s, "Reconciling").0, "True");
        m.status = Some(s.clone());
        // Nothing moved for 599 s: still rolling, and the same status (nothing to write).
        assert_eq!(status_at(&m, &rolling(1), at(599)), s);
        // Past the deadline: stalled, naming who it waits on; later, the very same status.
        let stuck = status_at(&m, &rolling(1), at(601));
        assert_eq!(
            cond(&stuck, "Stalled"),
            (
                "True",
                "ProgressDeadlineExceeded",
                "no device became Ready for more than 600s; waiting on: pi-b"
            )
        );
        assert_eq!(cond(&stuck, "Ready").0, "False");
        assert_eq!(cond(&stuck, "Reconciling").0, "False");
        m.status = Some(stuck.clone());
        assert_eq!(status_at(&m, &rolling(1), at(3600)), stuck);
        // Progress (one more device Ready) restarts the clock.
        let moved = status_at(&m, &rolling(2), at(3601));
        assert_eq!(moved.last_progress_time, Some(Time(at(3601))));
        assert_eq!(cond(&moved, "Stalled").0, "False");
    }

    #[test]
    fn a_manifests_own_deadline_wins_and_a_new_generation_restarts_the_clock() {
        let mut m = manifest(1, serde_json::json!({ "progressDeadlineSeconds": 10 }));
        m.status = Some(status_at(&m, &rolling(1), at(0)));
        assert_eq!(
            cond(&status_at(&m, &rolling(1), at(11)), "Stalled").1,
            "ProgressDeadlineExceeded"
        );
        m.metadata.generation = Some(2);
        let s = status_at(&m, &rolling(1), at(11));
        assert_eq!(cond(&s, "Stalled").0, "False");
        assert_eq!(s.last_progress_time, Some(Time(at(11))));
    }

    #[test]
    fn nothing_selected_paused_and_permanent_failures_have_their_own_reasons() {
        let m = manifest(1, serde_json::json!({}));
        let none = status_at(&m, &Progress::default(), at(0));
        assert_eq!(cond(&none, "Ready").0, "False");
        assert_eq!(cond(&none, "Ready").1, "NoDevicesSelected");
        assert_eq!(cond(&none, "Reconciling").0, "False");

        let paused = manifest(1, serde_json::json!({ "paused": true }));
        let p = Progress {
            targeted: 2,
            updated: 1,
            ready: 1,
            pending: vec![dev("pi-b")],
            ..Default::default()
        };
        let s = status_at(&paused, &p, at(0));
        assert_eq!(
            cond(&s, "Progressing"),
            (
                "Unknown",
                "RolloutPaused",
                "paused with 1 of 2 devices updated"
            )
        );
        assert_eq!(cond(&s, "Reconciling").0, "False");
        assert_eq!(cond(&s, "Stalled").0, "False");

        let p = Progress {
            failures: vec![Failure {
                device: dev("pi-b"),
                resource: ResourceId::new("cfg").unwrap(),
                error: "forbidden: outside the allowed roots".into(),
                permanent: true,
            }],
            failed: 1,
            ..rolling(1)
        };
        let s = status_at(&m, &p, at(0));
        let (st, reason, message) = cond(&s, "Stalled");
        assert_eq!((st, reason), ("True", "PermanentFailure"));
        assert!(message.contains("pi-b/cfg: forbidden"), "{message}");
        assert_eq!(cond(&s, "Degraded").0, "True");
    }

    #[test]
    fn transition_times_stay_while_a_condition_keeps_its_status() {
        let mut m = manifest(1, serde_json::json!({}));
        let first = status_at(&m, &rolling(1), at(0));
        m.status = Some(first.clone());
        let later = status_at(&m, &rolling(1), at(100));
        let time = |s: &EdgeManifestStatus| {
            s.conditions
                .iter()
                .find(|c| c.type_ == "Reconciling")
                .map(|c| c.last_transition_time.clone())
        };
        assert_eq!(time(&later), time(&first));
        m.status = Some(later);
        let done = status_at(
            &m,
            &Progress {
                targeted: 2,
                updated: 2,
                ready: 2,
                ..Default::default()
            },
            at(200),
        );
        assert_eq!(time(&done), Some(Time(at(200))));
    }
}
