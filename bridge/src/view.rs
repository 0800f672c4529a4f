//! What Kubernetes should show for one device, computed from its EdgeDevice, its last
//! heartbeat and its last status. Pure: the mirror loop compares and writes.

use std::collections::BTreeMap;

use fleetlet_crds::{
    Condition, DeviceInfo, EdgeDevice, EdgeDeviceStatus, ResourceSummary, Time,
    k8s_openapi::{
        api::core::v1::{NodeAddress, NodeCondition, NodeSystemInfo, Taint},
        apimachinery::pkg::api::resource::Quantity,
        jiff::Timestamp as KTime,
    },
};
use fleetlet_protocol::{AgentStatus, Heartbeat, ResourceStatus, Timestamp};

/// Label on every Node the bridge manages, holding the device id.
pub use fleetlet_crds::naming::DEVICE_LABEL;
/// Prefix for the device's own labels copied onto its Node.
pub const DEVICE_LABEL_PREFIX: &str = "device.fleetlet.dev/";
/// The taint keeping ordinary Pods and DaemonSets off device nodes.
pub const TAINT_KEY: &str = "fleetlet.dev/edge";
/// The bridge's server-side-apply field manager.
pub const FIELD_MANAGER: &str = "fleetlet-bridge";

/// Liveness of a device, from its heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    NeverConnected,
    Alive,
    /// No heartbeat within the grace period.
    Silent,
}

pub fn liveness(hb: Option<&Heartbeat>, now: Timestamp, grace_ms: u64) -> Liveness {
    match hb {
        None => Liveness::NeverConnected,
        Some(h) if now.as_millis().saturating_sub(h.timestamp.as_millis()) <= grace_ms => {
            Liveness::Alive
        }
        Some(_) => Liveness::Silent,
    }
}

pub fn k8s_time(t: Timestamp) -> Time {
    Time(
        KTime::from_millisecond(i64::try_from(t.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(KTime::UNIX_EPOCH),
    )
}

/// The largest generation a status can hold (Kubernetes integers are signed 64-bit).
pub const MAX_STORED_GENERATION: u64 = i64::MAX as u64;

/// Condition with `lastTransitionTime` kept from `old` while the status does not change.
fn condition(
    old: &[Condition],
    type_: &str,
    status: &str,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let keep = old.iter().find(|c| c.type_ == type_ && c.status == status);
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: keep.map_or_else(|| now.clone(), |c| c.last_transition_time.clone()),
    }
}

/// The first few of `items`, and how many more there are: a condition message stays short.
fn summarize(items: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut text = items
        .iter()
        .take(SHOWN)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join("; ");
    if items.len() > SHOWN {
        text.push_str(&format!("; and {} more", items.len() - SHOWN));
    }
    text
}

/// The EdgeDevice status fields the bridge owns. `desiredGeneration` is the controller's.
pub fn device_status(
    dev: &EdgeDevice,
    hb: Option<&Heartbeat>,
    st: Option<&AgentStatus>,
    live: Liveness,
    now: Timestamp,
    report_every_ms: u64,
) -> EdgeDeviceStatus {
    let old = dev.status.clone().unwrap_or_default();
    let now_k = k8s_time(now);
    let generation = dev.metadata.generation;
    let desired = old.desired_generation;
    let ready = match live {
        Liveness::Alive => ("True", "HeartbeatFresh", String::new()),
        Liveness::Silent => (
            "Unknown",
            "HeartbeatMissed",
            "no heartbeat within the grace period".into(),
        ),
        Liveness::NeverConnected => (
            "False",
            "NeverConnected",
            "the device's agent has never connected".into(),
        ),
    };
    let resources: Vec<ResourceSummary> = st
        .map(|s| {
            s.resources
                .iter()
                .map(|(id, r)| ResourceSummary {
                    id: id.to_string(),
                    kind: match r {
                        ResourceStatus::Ready { details, .. } => details.kind().key().into(),
                        ResourceStatus::Unsupported { kind, .. } => kind.clone(),
                        _ => String::new(),
                    },
                    state: r.state_name().into(),
                    message: match r {
                        ResourceStatus::Failed { error, .. } => Some(error.clone()),
                        ResourceStatus::Unsupported { message, .. } => Some(message.clone()),
                        ResourceStatus::Reconciling { message, .. } => message.clone(),
                        ResourceStatus::Ready { details, .. } if !details.probe_ready() => {
                            Some("readiness probe failing".into())
                        }
                        _ => None,
                    },
                    owner: None,
                })
                .collect()
        })
        .unwrap_or_default();
    let failed: Vec<String> = st
        .iter()
        .flat_map(|s| &s.resources)
        .filter_map(|(id, r)| {
            r.failure().map(|e| {
                let permanent = if r.is_permanent_failure() {
                    ", permanent"
                } else {
                    ""
                };
                format!("{id} ({}{permanent}: {e})", r.state_name())
            })
        })
        .collect();
    // What a device reports is untrusted: a generation Kubernetes cannot store (it keeps
    // integers signed) is shown as such instead of blocking every status write.
    let reported = st.map(|s| s.observed_generation);
    let applied = reported.filter(|g| *g <= MAX_STORED_GENERATION);
    let all_ready = st.is_some_and(|s| s.resources.values().all(ResourceStatus::is_ready));
    let converged = match (applied, desired) {
        (None, _) if reported.is_some() => (
            "False",
            "GenerationOutOfRange",
            format!(
                "the device reports generation {}, which no manifest may have",
                reported.unwrap_or_default()
            ),
        ),
        (Some(a), Some(d)) if a >= d && all_ready => ("True", "AllResourcesReady", String::new()),
        (Some(a), Some(d))
            if a < d
                && st
                    .and_then(|s| s.last_rejection.as_ref())
                    .is_some_and(|r| r.generation.is_none_or(|g| g > a)) =>
        {
            let r = st.and_then(|s| s.last_rejection.as_ref());
            (
                "False",
                "ManifestRejected",
                format!(
                    "device runs generation {a}, desired {d}; it refused {} ({}): {}",
                    r.and_then(|r| r.generation)
                        .map_or_else(|| "a manifest".into(), |g| format!("generation {g}")),
                    r.map(|r| r.reason.as_str()).unwrap_or_default(),
                    r.map(|r| r.message.as_str()).unwrap_or_default(),
                ),
            )
        }
        (Some(a), Some(d)) if a < d => (
            "False",
            "Applying",
            format!("device runs generation {a}, desired {d}"),
        ),
        (None, _) => (
            "False",
            "NoStatus",
            "the device has not reported a status".into(),
        ),
        _ if !all_ready => {
            let waiting: Vec<String> = resources
                .iter()
                .filter(|r| r.state != "Ready")
                .map(|r| match &r.message {
                    Some(m) => format!("{} ({}: {m})", r.id, r.state),
                    None => format!("{} ({})", r.id, r.state),
                })
                .collect();
            ("False", "ResourcesNotReady", summarize(&waiting))
        }
        _ => (
            "Unknown",
            "NoDesiredState",
            "the controller has not written a manifest yet".into(),
        ),
    };
    let degraded = if failed.is_empty() {
        ("False", "NoFailures", String::new())
    } else {
        ("True", "ResourcesFailed", summarize(&failed))
    };
    let conditions = vec![
        condition(
            &old.conditions,
            "Ready",
            ready.0,
            ready.1,
            ready.2,
            generation,
            &now_k,
        ),
        condition(
            &old.conditions,
            "Converged",
            converged.0,
            converged.1,
            converged.2,
            generation,
            &now_k,
        ),
        condition(
            &old.conditions,
            "Degraded",
            degraded.0,
            degraded.1,
            degraded.2,
            generation,
            &now_k,
        ),
    ];
    let device = hb.map(|h| DeviceInfo {
        architecture: h.system.architecture.clone(),
        operating_system: h.system.operating_system.clone(),
        os_image: h.system.os_image.clone(),
        kernel_version: h.system.kernel_version.clone(),
        agent_version: h.agent_version.clone(),
        addresses: h.addresses.iter().map(|a| a.address.clone()).collect(),
    });
    let mut out = EdgeDeviceStatus {
        conditions,
        observed_generation: generation,
        desired_generation: None,
        applied_generation: applied,
        last_heartbeat_time: old.last_heartbeat_time.clone(),
        device,
        resources,
        // The controller's field, not the bridge's.
        credentials: None,
    };
    // The heartbeat time is refreshed only with another change or every `report_every`:
    // liveness itself travels in the Lease, which is cheap to renew.
    if let Some(h) = hb {
        let stale = old.last_heartbeat_time.as_ref().is_none_or(|t| {
            (h.timestamp.as_millis() as i64).saturating_sub(t.0.as_millisecond())
                >= report_every_ms as i64
        });
        let mut without_time = old.bridge_part();
        without_time.last_heartbeat_time = out.last_heartbeat_time.clone();
        if stale || without_time != out {
            out.last_heartbeat_time = Some(k8s_time(h.timestamp));
        }
    }
    out
}

fn quantity(n: u64) -> Quantity {
    Quantity(n.to_string())
}

/// Node labels: identity, platform, role, and the device's labels under a prefix.
pub fn node_labels(
    dev: &EdgeDevice,
    device_id: &str,
    hb: Option<&Heartbeat>,
) -> BTreeMap<String, String> {
    let mut l = BTreeMap::new();
    l.insert(DEVICE_LABEL.into(), device_id.into());
    l.insert("kubernetes.io/hostname".into(), device_id.into());
    l.insert("kubernetes.io/os".into(), "linux".into());
    if let Some(h) = hb {
        l.insert("kubernetes.io/arch".into(), h.system.architecture.clone());
    }
    l.insert(
        "node.kubernetes.io/instance-type".into(),
        "fleetlet-edge".into(),
    );
    l.insert("node-role.kubernetes.io/edge".into(), String::new());
    l.insert("type".into(), "virtual-kubelet".into());
    for (k, v) in dev.metadata.labels.iter().flatten() {
        // Only label names that stay valid with the prefix.
        let name = k.rsplit('/').next().unwrap_or(k);
        if name.len() <= 63 {
            l.insert(format!("{DEVICE_LABEL_PREFIX}{name}"), v.clone());
        }
    }
    l
}

pub fn node_taints() -> Vec<Taint> {
    vec![Taint {
        key: TAINT_KEY.into(),
        value: Some("true".into()),
        effect: "NoSchedule".into(),
        time_added: None,
    }]
}

/// Node status: facts from the heartbeat and conditions from liveness and free resources.
/// `lastHeartbeatTime` on conditions follows the same refresh rule as the EdgeDevice's.
pub struct NodeStatusView {
    pub node_info: NodeSystemInfo,
    pub capacity: BTreeMap<String, Quantity>,
    pub addresses: Vec<NodeAddress>,
    pub conditions: Vec<NodeCondition>,
}

pub fn node_status(
    old: &[NodeCondition],
    hb: Option<&Heartbeat>,
    live: Liveness,
    now: Timestamp,
    report_every_ms: u64,
) -> NodeStatusView {
    let now_k = k8s_time(now);
    let h = hb.cloned();
    let cap = h.as_ref().map(|h| h.capacity).unwrap_or_default();
    let free = h.as_ref().map(|h| h.free).unwrap_or_default();
    let mut capacity = BTreeMap::new();
    capacity.insert("cpu".into(), quantity(u64::from(cap.cpu_cores)));
    capacity.insert("memory".into(), quantity(cap.memory_bytes));
    capacity.insert("ephemeral-storage".into(), quantity(cap.disk_bytes));
    capacity.insert("pods".into(), quantity(110));
    let pct = |free: u64, total: u64| free.saturating_mul(100).checked_div(total).unwrap_or(100);
    let pressure =
        |low: bool, type_: &str, reason_ok: &str, reason_low: &str| -> (String, String, String) {
            match live {
                Liveness::Alive if low => (type_.into(), "True".into(), reason_low.into()),
                Liveness::Alive => (type_.into(), "False".into(), reason_ok.into()),
                _ => (type_.into(), "Unknown".into(), "NodeStatusUnknown".into()),
            }
        };
    let ready = match live {
        Liveness::Alive => (
            "Ready".to_string(),
            "True".to_string(),
            "KubeletReady".to_string(),
        ),
        Liveness::Silent => ("Ready".into(), "Unknown".into(), "NodeStatusUnknown".into()),
        Liveness::NeverConnected => ("Ready".into(), "False".into(), "NeverConnected".into()),
    };
    let rows = [
        ready,
        pressure(
            cap.memory_bytes > 0 && pct(free.memory_bytes, cap.memory_bytes) < 5,
            "MemoryPressure",
            "KubeletHasSufficientMemory",
            "KubeletHasInsufficientMemory",
        ),
        pressure(
            cap.disk_bytes > 0 && pct(free.disk_bytes, cap.disk_bytes) < 10,
            "DiskPressure",
            "KubeletHasNoDiskPressure",
            "KubeletHasDiskPressure",
        ),
        pressure(
            cap.pids > 0 && pct(free.pids, cap.pids) < 5,
            "PIDPressure",
            "KubeletHasSufficientPID",
            "KubeletHasInsufficientPID",
        ),
    ];
    let hb_time = h.as_ref().map(|h| k8s_time(h.timestamp));
    let conditions = rows
        .into_iter()
        .map(|(type_, status, reason)| {
            let prev = old.iter().find(|c| c.type_ == type_);
            let same = prev.is_some_and(|p| {
                p.status == status && p.reason.as_deref() == Some(reason.as_str())
            });
            let message = match (type_.as_str(), status.as_str()) {
                ("Ready", "True") => "fleetlet agent is posting heartbeats".to_string(),
                ("Ready", "Unknown") | (_, "Unknown") => {
                    "Kubelet stopped posting node status.".to_string()
                }
                ("Ready", _) => "the device's agent has never connected".to_string(),
                _ => String::new(),
            };
            let stale = prev
                .and_then(|p| p.last_heartbeat_time.as_ref())
                .zip(hb_time.as_ref())
                .is_none_or(|(p, h)| {
                    h.0.as_millisecond().saturating_sub(p.0.as_millisecond())
                        >= report_every_ms as i64
                });
            NodeCondition {
                last_heartbeat_time: if same && !stale {
                    prev.and_then(|p| p.last_heartbeat_time.clone())
                } else {
                    hb_time.clone().or(Some(now_k.clone()))
                },
                last_transition_time: if same {
                    prev.and_then(|p| p.last_transition_time.clone())
                } else {
                    Some(now_k.clone())
                },
                message: (!message.is_empty()).then_some(message),
                reason: Some(reason),
                status,
                type_,
            }
        })
        .collect();
    NodeStatusView {
        node_info: NodeSystemInfo {
            architecture: h
                .as_ref()
                .map(|h| h.system.architecture.clone())
                .unwrap_or_default(),
            operating_system: "linux".into(),
            os_image: h
                .as_ref()
                .map(|h| h.system.os_image.clone())
                .unwrap_or_default(),
            kernel_version: h
                .as_ref()
                .map(|h| h.system.kernel_version.clone())
                .unwrap_or_default(),
            kubelet_version: h.as_ref().map_or_else(
                || "fleetlet-agent".into(),
                |h| format!("fleetlet-agent/v{}", h.agent_version),
            ),
            // What the device says it runs: nothing when it runs no containers.
            container_runtime_version: h
                .as_ref()
                .and_then(|h| h.container_runtime.clone())
                .unwrap_or_default(),
            ..Default::default()
        },
        addresses: h
            .map(|h| {
                h.addresses
                    .iter()
                    .map(|a| NodeAddress {
                        type_: a.type_.clone(),
                        address: a.address.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        capacity,
        conditions,
    }
}

#[cfg(test)]
mod tests {
    use fleetlet_crds::EdgeDeviceSpec;
    use fleetlet_protocol::{
        API_VERSION, Capacity, DeviceId, Free, ResourceId, ResourceStatus, SystemInfo,
    };

    use super::*;

    /// 2023-11-14T22:13:20Z, in milliseconds.
    const T0: u64 = 1_700_000_000_000;
    const REPORT_EVERY_MS: u64 = 300_000;

    /// A heartbeat at `at` from a device with 1 GB of memory, 1 TB of disk and 100000 PIDs,
    /// of which the given percentages are free.
    fn heartbeat(at: u64, mem_pct: u64, disk_pct: u64, pids_pct: u64) -> Heartbeat {
        let capacity = Capacity {
            cpu_cores: 4,
            memory_bytes: 1_000_000_000,
            disk_bytes: 1_000_000_000_000,
            pids: 100_000,
        };
        Heartbeat {
            api_version: API_VERSION.into(),
            device: DeviceId::new("pi").expect("valid"),
            sequence: 1,
            timestamp: Timestamp(at),
            interval_seconds: 10,
            agent_version: "0.1.0".into(),
            system: SystemInfo {
                operating_system: "linux".into(),
                architecture: "arm64".into(),
                ..Default::default()
            },
            capacity,
            free: Free {
                memory_bytes: capacity.memory_bytes / 100 * mem_pct,
                disk_bytes: capacity.disk_bytes / 100 * disk_pct,
                pids: capacity.pids / 100 * pids_pct,
            },
            addresses: vec![],
            sealing_key: None,
            limits: None,
            container_runtime: None,
        }
    }

    /// (type, status, reason) of each pressure condition, in order.
    fn pressures(v: &NodeStatusView) -> Vec<(String, String, String)> {
        ["MemoryPressure", "DiskPressure", "PIDPressure"]
            .iter()
            .map(|t| {
                let c = v
                    .conditions
                    .iter()
                    .find(|c| c.type_ == *t)
                    .unwrap_or_else(|| panic!("no {t} condition"));
                (
                    c.type_.clone(),
                    c.status.clone(),
                    c.reason.clone().unwrap_or_default(),
                )
            })
            .collect()
    }

    fn rows(r: [(&str, &str, &str); 3]) -> Vec<(String, String, String)> {
        r.iter()
            .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
            .collect()
    }

    #[test]
    fn low_free_memory_disk_and_pids_show_as_node_pressure() {
        let hb = heartbeat(T0, 1, 5, 1);
        let v = node_status(
            &[],
            Some(&hb),
            Liveness::Alive,
            Timestamp(T0),
            REPORT_EVERY_MS,
        );
        assert_eq!(
            pressures(&v),
            rows([
                ("MemoryPressure", "True", "KubeletHasInsufficientMemory"),
                ("DiskPressure", "True", "KubeletHasDiskPressure"),
                ("PIDPressure", "True", "KubeletHasInsufficientPID"),
            ])
        );

        // Exactly at the thresholds (5% memory, 10% disk, 5% PIDs) there is no pressure.
        let hb = heartbeat(T0, 5, 10, 5);
        let v = node_status(
            &[],
            Some(&hb),
            Liveness::Alive,
            Timestamp(T0),
            REPORT_EVERY_MS,
        );
        assert_eq!(
            pressures(&v),
            rows([
                ("MemoryPressure", "False", "KubeletHasSufficientMemory"),
                ("DiskPressure", "False", "KubeletHasNoDiskPressure"),
                ("PIDPressure", "False", "KubeletHasSufficientPID"),
            ])
        );

        // A silent device's pressure is not known, whatever its last heartbeat said.
        let hb = heartbeat(T0, 1, 5, 1);
        let v = node_status(
            &[],
            Some(&hb),
            Liveness::Silent,
            Timestamp(T0),
            REPORT_EVERY_MS,
        );
        assert_eq!(
            pressures(&v),
            rows([
                ("MemoryPressure", "Unknown", "NodeStatusUnknown"),
                ("DiskPressure", "Unknown", "NodeStatusUnknown"),
                ("PIDPressure", "Unknown", "NodeStatusUnknown"),
            ])
        );
    }

    #[test]
    fn heartbeat_times_are_written_at_most_every_report_interval() {
        let first = heartbeat(T0, 50, 50, 50);
        let mut dev = EdgeDevice::new("pi", EdgeDeviceSpec::default());
        let s0 = device_status(
            &dev,
            Some(&first),
            None,
            Liveness::Alive,
            Timestamp(T0),
            REPORT_EVERY_MS,
        );
        assert_eq!(s0.last_heartbeat_time, Some(k8s_time(Timestamp(T0))));
        dev.status = Some(s0);
        let n0 = node_status(
            &[],
            Some(&first),
            Liveness::Alive,
            Timestamp(T0),
            REPORT_EVERY_MS,
        );
        let node_times = |v: &NodeStatusView| {
            v.conditions
                .iter()
                .map(|c| (c.type_.clone(), c.last_heartbeat_time.clone()))
                .collect::<Vec<_>>()
        };
        let all_at = |t: u64| {
            ["Ready", "MemoryPressure", "DiskPressure", "PIDPressure"]
                .iter()
                .map(|c| (c.to_string(), Some(k8s_time(Timestamp(t)))))
                .collect::<Vec<_>>()
        };
        assert_eq!(node_times(&n0), all_at(T0));

        // Ten seconds later, nothing else changed: the times stay.
        let soon = T0 + 10_000;
        let hb = heartbeat(soon, 50, 50, 50);
        let s = device_status(
            &dev,
            Some(&hb),
            None,
            Liveness::Alive,
            Timestamp(soon),
            REPORT_EVERY_MS,
        );
        assert_eq!(s.last_heartbeat_time, Some(k8s_time(Timestamp(T0))));
        assert_eq!(&s, dev.status.as_ref().unwrap(), "nothing to write");
        let n = node_status(
            &n0.conditions,
            Some(&hb),
            Liveness::Alive,
            Timestamp(soon),
            REPORT_EVERY_MS,
        );
        assert_eq!(node_times(&n), all_at(T0));

        // Past the report interval, they move to the new heartbeat's time.
        let later = T0 + 301_000;
        let hb = heartbeat(later, 50, 50, 50);
        let s = device_status(
            &dev,
            Some(&hb),
            None,
            Liveness::Alive,
            Timestamp(later),
            REPORT_EVERY_MS,
        );
        assert_eq!(s.last_heartbeat_time, Some(k8s_time(Timestamp(later))));
        let ready = s.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(
            ready.last_transition_time,
            k8s_time(Timestamp(T0)),
            "the Ready condition did not change"
        );
        let n = node_status(
            &n0.conditions,
            Some(&hb),
            Liveness::Alive,
            Timestamp(later),
            REPORT_EVERY_MS,
        );
        assert_eq!(node_times(&n), all_at(later));
    }

    #[test]
    fn a_download_in_progress_shows_its_progress_on_the_edge_device() {
        let dev = EdgeDevice::new("pi", EdgeDeviceSpec::default());
        let mut st = AgentStatus::new(DeviceId::new("pi").expect("valid"));
        st.resources.insert(
            ResourceId::new("model").expect("valid"),
            ResourceStatus::Reconciling {
                since: Timestamp(1),
                message: Some("downloading: 12.0 MiB of 50.0 MiB (24%), 3.9 MiB/s".into()),
            },
        );
        let s = device_status(&dev, None, Some(&st), Liveness::Alive, Timestamp(2), 1000);
        let r = &s.resources[0];
        assert_eq!((r.id.as_str(), r.state.as_str()), ("model", "Reconciling"));
        assert_eq!(
            r.message.as_deref(),
            Some("downloading: 12.0 MiB of 50.0 MiB (24%), 3.9 MiB/s")
        );
    }
}
