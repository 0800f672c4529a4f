//! What the device is and has, for heartbeats and facts: read from /proc, /etc and statvfs.

use std::{fs, net::Ipv4Addr, sync::Arc};

use fleetlet_protocol::{
    API_VERSION, Address, Capacity, DeviceFacts, DeviceLimits, FactsReport, Free, Heartbeat,
    SystemInfo, Timestamp, manifest::MAX_RESOURCES,
};

use crate::config::Settings;

pub struct Facts {
    settings: Arc<Settings>,
    system: SystemInfo,
    sequence: u64,
    sealing_key: Option<String>,
}

/// Kubernetes' name for this CPU architecture.
pub fn k8s_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        "riscv64" => "riscv64",
        other => other,
    }
}

impl Facts {
    /// `sealing_key`: the device's public sealing key, which its facts carry.
    pub fn new(settings: Arc<Settings>, sealing_key: Option<String>) -> Self {
        let uname = rustix::system::uname();
        let os_image = fs::read_to_string("/etc/os-release")
            .ok()
            .and_then(|t| {
                t.lines().find_map(|l| {
                    l.strip_prefix("PRETTY_NAME=")
                        .map(|v| v.trim_matches('"').to_owned())
                })
            })
            .unwrap_or_else(|| "Linux".into());
        let model = [
            "/proc/device-tree/model",
            "/sys/devices/virtual/dmi/id/product_name",
        ]
        .iter()
        .find_map(|p| fs::read_to_string(p).ok())
        .map(|m| m.trim_matches(['\0', '\n', ' ']).to_owned())
        .filter(|m| !m.is_empty());
        Self {
            system: SystemInfo {
                operating_system: "linux".into(),
                architecture: k8s_arch().into(),
                os_image,
                kernel_version: uname.release().to_string_lossy().into_owned(),
                hostname: Some(uname.nodename().to_string_lossy().into_owned()),
                model,
            },
            settings,
            sequence: 0,
            sealing_key,
        }
    }

    /// The next heartbeat: liveness and what is free now, without the facts.
    pub fn heartbeat(&mut self) -> Heartbeat {
        self.sequence += 1;
        let (_, mem_free) = meminfo();
        let (_, disk_free) = disk(&self.settings.state_dir);
        let pid_max = pid_max();
        let running = fs::read_dir("/proc")
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| {
                        e.file_name()
                            .to_string_lossy()
                            .bytes()
                            .all(|b| b.is_ascii_digit())
                    })
                    .count() as u64
            })
            .unwrap_or(0);
        Heartbeat {
            api_version: API_VERSION.into(),
            device: self.settings.device.clone(),
            sequence: self.sequence,
            timestamp: Timestamp::now(),
            interval_seconds: u32::try_from(self.settings.heartbeat_interval.as_secs())
                .unwrap_or(u32::MAX),
            free: Free {
                memory_bytes: mem_free,
                disk_bytes: disk_free,
                pids: pid_max.saturating_sub(running),
            },
            facts: None,
        }
    }

    /// What the device is and has now; `container_runtime` as last asked.
    pub fn facts(&self, container_runtime: Option<String>) -> DeviceFacts {
        let (mem_total, _) = meminfo();
        let (disk_total, _) = disk(&self.settings.state_dir);
        let mut addresses: Vec<Address> = local_ipv4()
            .into_iter()
            .map(|ip| Address {
                type_: "InternalIP".into(),
                address: ip.to_string(),
            })
            .collect();
        if let Some(h) = &self.system.hostname {
            addresses.push(Address {
                type_: "Hostname".into(),
                address: h.clone(),
            });
        }
        DeviceFacts {
            agent_version: crate::VERSION.into(),
            system: self.system.clone(),
            capacity: Capacity {
                cpu_cores: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
                memory_bytes: mem_total,
                disk_bytes: disk_total,
                pids: pid_max(),
            },
            addresses,
            sealing_key: self.sealing_key.clone(),
            limits: Some(DeviceLimits {
                max_resources: MAX_RESOURCES as u32,
                max_manifest_bytes: self.settings.max_manifest_bytes as u64,
                max_file_bytes: self.settings.max_file_bytes,
            }),
            container_runtime,
        }
    }

    /// `facts` as the record the agent stores in the `facts` bucket.
    pub fn report(&self, facts: DeviceFacts) -> FactsReport {
        FactsReport {
            api_version: API_VERSION.into(),
            device: self.settings.device.clone(),
            timestamp: Timestamp::now(),
            facts,
        }
    }
}

fn pid_max() -> u64 {
    fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0)
}

fn meminfo() -> (u64, u64) {
    let text = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

fn disk(path: &std::path::Path) -> (u64, u64) {
    match rustix::fs::statvfs(path) {
        Ok(s) => (s.f_blocks * s.f_frsize, s.f_bavail * s.f_frsize),
        Err(_) => (0, 0),
    }
}

/// The device's own IPv4 addresses (not loopback), from the kernel's routing table dump.
fn local_ipv4() -> Vec<Ipv4Addr> {
    let text = fs::read_to_string("/proc/net/fib_trie").unwrap_or_default();
    let mut out: Vec<Ipv4Addr> = Vec::new();
    let mut last: Option<Ipv4Addr> = None;
    for line in text.lines() {
        let t = line.trim_start();
        if let Some(ip) = t.strip_prefix("|-- ").and_then(|s| s.parse().ok()) {
            last = Some(ip);
        } else if t.starts_with("/32 host LOCAL")
            && let Some(ip) = last
            && !ip.is_loopback()
            && !out.contains(&ip)
        {
            out.push(ip);
        }
    }
    out
}
