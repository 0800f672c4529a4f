//! Resource usage of the device (from `/proc`) and of the containers the agent created
//! (from podman), sampled when the control plane asks (`kubectl top`, the kubelet
//! Summary API). See [`fleetlet_protocol::stats`].

use std::{collections::HashMap, sync::Mutex};

use fleetlet_protocol::{
    ResourceId,
    stats::{ContainerStats, DeviceStats, Usage},
};
use tracing::debug;

use crate::container::ContainerReconciler;

/// Clock ticks per second of `/proc/stat` (`USER_HZ`, 100 on every Linux architecture).
const USER_HZ: u64 = 100;

/// Busy CPU time in `/proc/stat`'s first line, in nanoseconds: user, nice, system, irq,
/// softirq and steal (not idle or iowait; guest time is already in user).
pub fn proc_stat_cpu_ns(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    let busy = [0usize, 1, 2, 5, 6, 7]
        .iter()
        .map(|&i| ticks.get(i).copied().unwrap_or(0))
        .fold(0u64, u64::saturating_add);
    Some(busy.saturating_mul(1_000_000_000 / USER_HZ))
}

/// Boot time from `/proc/stat` (`btime`, seconds since the Unix epoch).
pub fn proc_stat_boot_secs(text: &str) -> Option<i64> {
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

/// `MemTotal` and `MemAvailable` of `/proc/meminfo`, in bytes.
pub fn meminfo(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| -> Option<u64> {
        let rest = text.lines().find_map(|l| l.strip_prefix(name))?;
        let kib: u64 = rest
            .trim_start_matches(':')
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        Some(kib.saturating_mul(1024))
    };
    Some((field("MemTotal")?, field("MemAvailable")?))
}

/// Container id → (CPU nanoseconds, memory in use) from podman's
/// `/libpod/containers/stats?stream=false` answer.
pub fn podman_stats(answer: &serde_json::Value) -> HashMap<String, (u64, u64)> {
    answer
        .get("Stats")
        .and_then(|s| s.as_array())
        .into_iter()
        .flatten()
        .filter_map(|s| {
            let id = s.get("ContainerID")?.as_str()?.to_owned();
            let cpu = s.get("CPUNano").and_then(|v| v.as_u64()).unwrap_or(0);
            let mem = s.get("MemUsage").and_then(|v| v.as_u64()).unwrap_or(0);
            Some((id, (cpu, mem)))
        })
        .collect()
}

/// CPU use in billionths of a core between two cumulative readings `dt_ms` apart.
fn nano_cores(before: u64, after: u64, dt_ms: i64) -> Option<u64> {
    let dt = u64::try_from(dt_ms).ok().filter(|d| *d > 0)?;
    Some(after.checked_sub(before)?.saturating_mul(1000) / dt)
}

/// The previous sample, for rates.
#[derive(Debug, Default)]
struct Previous {
    time_ms: i64,
    node_cpu: u64,
    containers: HashMap<ResourceId, u64>,
}

/// Rates are only given over at least this long a gap (and at most [`MAX_GAP_MS`]).
const MIN_GAP_MS: i64 = 1_000;
const MAX_GAP_MS: i64 = 10 * 60 * 1_000;

/// Takes samples and remembers the last one.
#[derive(Debug, Default)]
pub struct Sampler {
    previous: Mutex<Option<Previous>>,
}

impl Sampler {
    /// One sample: the device from `/proc`, the agent's running containers from podman
    /// (left out, with a debug line, if podman does not answer).
    pub async fn sample(&self, containers: Option<&ContainerReconciler>) -> DeviceStats {
        let now = fleetlet_protocol::Timestamp::now().as_millis();
        let time_ms = i64::try_from(now).unwrap_or(i64::MAX);
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let node_cpu = proc_stat_cpu_ns(&stat).unwrap_or(0);
        let (total, available) = meminfo(&mem).unwrap_or((0, 0));
        let mut out = DeviceStats {
            time_ms,
            boot_time_ms: proc_stat_boot_secs(&stat).map(|s| s.saturating_mul(1000)),
            node: Usage {
                cpu_usage_core_nanoseconds: node_cpu,
                cpu_usage_nano_cores: None,
                memory_working_set_bytes: total.saturating_sub(available),
                memory_available_bytes: Some(available),
            },
            containers: Vec::new(),
        };
        if let Some(c) = containers {
            match container_usage(c).await {
                Ok(list) => out.containers = list,
                Err(e) => debug!(error = %e, "container usage unavailable"),
            }
        }
        self.add_rates(&mut out);
        out
    }

    /// Fills in CPU rates against the previous sample and keeps this one.
    fn add_rates(&self, s: &mut DeviceStats) {
        let Ok(mut prev) = self.previous.lock() else {
            return;
        };
        if let Some(p) = prev.as_ref() {
            let dt = s.time_ms - p.time_ms;
            if (MIN_GAP_MS..=MAX_GAP_MS).contains(&dt) {
                s.node.cpu_usage_nano_cores =
                    nano_cores(p.node_cpu, s.node.cpu_usage_core_nanoseconds, dt);
                for c in &mut s.containers {
                    if let Some(before) = p.containers.get(&c.resource) {
                        c.usage.cpu_usage_nano_cores =
                            nano_cores(*before, c.usage.cpu_usage_core_nanoseconds, dt);
                    }
                }
            } else if dt < MIN_GAP_MS {
                // Too close to the last one to say anything: keep the older sample.
                return;
            }
        }
        *prev = Some(Previous {
            time_ms: s.time_ms,
            node_cpu: s.node.cpu_usage_core_nanoseconds,
            containers: s
                .containers
                .iter()
                .map(|c| (c.resource.clone(), c.usage.cpu_usage_core_nanoseconds))
                .collect(),
        });
    }
}

async fn container_usage(
    containers: &ContainerReconciler,
) -> Result<Vec<ContainerStats>, crate::reconciler::ReconcileError> {
    let running = containers.running().await?;
    if running.is_empty() {
        return Ok(Vec::new());
    }
    let opts = podman_api::opts::ContainerStatsOpts::builder()
        .containers(running.iter().map(|(_, cid, _)| cid.clone()))
        .build();
    let answer = containers
        .podman()
        .containers()
        .stats(&opts)
        .await
        .map_err(|e| crate::reconciler::ReconcileError::Runtime(format!("podman stats: {e}")))?;
    let by_id = podman_stats(&answer);
    Ok(running
        .into_iter()
        .filter_map(|(resource, cid, started)| {
            let (cpu, mem) = by_id.get(&cid).copied()?;
            Some(ContainerStats {
                resource,
                start_time_ms: started.saturating_mul(1000),
                usage: Usage {
                    cpu_usage_core_nanoseconds: cpu,
                    cpu_usage_nano_cores: None,
                    memory_working_set_bytes: mem,
                    memory_available_bytes: None,
                },
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str =
        "cpu  100 5 50 1000 20 3 2 1 7 0\ncpu0 50 2 25 500 10 1 1 0 0 0\nbtime 1700000000\n";

    #[test]
    fn busy_time_counts_user_nice_system_irq_softirq_steal() {
        // 100 + 5 + 50 + 3 + 2 + 1 ticks of 10 ms.
        assert_eq!(proc_stat_cpu_ns(STAT), Some(161 * 10_000_000));
        assert_eq!(proc_stat_boot_secs(STAT), Some(1_700_000_000));
        assert_eq!(proc_stat_cpu_ns("cpu0 1 2 3\n"), None);
        assert_eq!(proc_stat_cpu_ns("cpu  1 x 3\n"), None);
    }

    #[test]
    fn meminfo_reads_total_and_available() {
        let m = "MemTotal:        1000 kB\nMemFree:  10 kB\nMemAvailable:     400 kB\n";
        assert_eq!(meminfo(m), Some((1_024_000, 409_600)));
        assert_eq!(meminfo("MemTotal: 1000 kB\n"), None);
    }

    #[test]
    fn podman_answer_is_read_by_container_id() {
        let v = serde_json::json!({"Error": null, "Stats": [
            {"ContainerID": "abc", "CPUNano": 3_084_635_285u64, "MemUsage": 528_384},
            {"Name": "no id"}
        ]});
        let m = podman_stats(&v);
        assert_eq!(m.len(), 1);
        assert_eq!(m["abc"], (3_084_635_285, 528_384));
        assert!(podman_stats(&serde_json::json!({"Stats": null})).is_empty());
    }

    #[test]
    fn rates_come_from_the_previous_sample_at_least_a_second_back() {
        let s = Sampler::default();
        let r: ResourceId = ResourceId::new("web".to_owned()).expect("id");
        let sample = |t: i64, node: u64, c: u64| DeviceStats {
            time_ms: t,
            node: Usage {
                cpu_usage_core_nanoseconds: node,
                ..Usage::default()
            },
            containers: vec![ContainerStats {
                resource: r.clone(),
                start_time_ms: 0,
                usage: Usage {
                    cpu_usage_core_nanoseconds: c,
                    ..Usage::default()
                },
            }],
            ..DeviceStats::default()
        };
        let mut a = sample(10_000, 1_000_000_000, 0);
        s.add_rates(&mut a);
        assert_eq!(a.node.cpu_usage_nano_cores, None);
        // 0.5 s later: too close, no rate, and the older sample stays the reference.
        let mut b = sample(10_500, 1_200_000_000, 100_000_000);
        s.add_rates(&mut b);
        assert_eq!(b.node.cpu_usage_nano_cores, None);
        // 2 s after the first: 3 s of CPU in 2 s is 1.5 cores; the container 0.25.
        let mut c = sample(12_000, 4_000_000_000, 500_000_000);
        s.add_rates(&mut c);
        assert_eq!(c.node.cpu_usage_nano_cores, Some(1_500_000_000));
        assert_eq!(
            c.containers[0].usage.cpu_usage_nano_cores,
            Some(250_000_000)
        );
        // A counter that went backwards (restart) gives no rate.
        let mut d = sample(14_000, 5_000_000_000, 0);
        s.add_rates(&mut d);
        assert_eq!(d.containers[0].usage.cpu_usage_nano_cores, None);
    }
}
