//! Bridge metrics: writes by kind, heartbeat-to-Lease latency, fleet size.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::mirror::Writes;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamLabel {
    subresource: String,
    protocol: String,
}

pub struct Metrics {
    registry: Registry,
    streams: Family<StreamLabel, Counter>,
    writes: Family<KindLabel, Counter>,
    passes: Counter,
    lease_latency: Histogram,
    devices: Gauge,
    leader: Gauge,
    shards_held: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("fleetlet_bridge");
        let writes = Family::<KindLabel, Counter>::default();
        let passes = Counter::default();
        let lease_latency = Histogram::new([
            5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
            60000.0, 90000.0,
        ]);
        let devices = Gauge::default();
        let leader = Gauge::default();
        let shards_held = Gauge::default();
        let streams = Family::<StreamLabel, Counter>::default();
        registry.register(
            "kubelet_streams",
            "Streaming sessions (exec, attach, portforward) the kubelet API started, by protocol (websocket, spdy)",
            streams.clone(),
        );
        registry.register(
            "apiserver_writes",
            "Writes to the apiserver by kind (device_status, node, node_status, lease, delete)",
            writes.clone(),
        );
        registry.register("passes", "Mirror passes", passes.clone());
        registry.register(
            "heartbeat_to_lease_ms",
            "Milliseconds from a heartbeat's timestamp to its Lease renewal",
            lease_latency.clone(),
        );
        registry.register("devices", "EdgeDevices known", devices.clone());
        registry.register(
            "leader",
            "1 while this instance holds the leader lease (with --shards, any shard)",
            leader.clone(),
        );
        registry.register(
            "shards_held",
            "Shards of the fleet this instance holds (1 of 1 for a single leader)",
            shards_held.clone(),
        );
        Self {
            registry,
            streams,
            writes,
            passes,
            lease_latency,
            devices,
            leader,
            shards_held,
        }
    }
}

impl Metrics {
    pub fn record(&self, w: &Writes) {
        self.passes.inc();
        for (kind, n) in [
            ("device_status", w.device_status),
            ("node", w.nodes),
            ("node_status", w.node_status),
            ("delete", w.deletes),
        ] {
            if n > 0 {
                self.writes
                    .get_or_create(&KindLabel { kind: kind.into() })
                    .inc_by(u64::from(n));
            }
        }
    }

    /// A Lease renewed by the lease loop (counted apart from [`Metrics::record`], which
    /// counts a pass's writes at its end), with its latency from the heartbeat.
    pub fn lease_renewed(&self, ms: u64) {
        self.writes
            .get_or_create(&KindLabel {
                kind: "lease".into(),
            })
            .inc();
        self.lease_latency.observe(ms as f64);
    }

    pub fn set_devices(&self, n: usize) {
        self.devices.set(n as i64);
    }

    /// A streaming session of the kubelet API was accepted.
    pub fn stream(&self, subresource: &str, protocol: &str) {
        self.streams
            .get_or_create(&StreamLabel {
                subresource: subresource.into(),
                protocol: protocol.into(),
            })
            .inc();
    }

    /// The leader gauge (1 while any shard is held) and the shards held.
    pub fn set_held(&self, held: &fleetlet_plumbing::shards::Ownership) {
        self.leader.set(i64::from(held.any()));
        self.shards_held.set(held.held().len() as i64);
    }
}

impl fleetlet_plumbing::Registered for Metrics {
    fn registry(&self) -> &prometheus_client::registry::Registry {
        &self.registry
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetlet_plumbing::Registered;

    fn lease_writes(m: &Metrics) -> Option<u64> {
        m.encode()
            .lines()
            .find(|l| l.starts_with("fleetlet_bridge_apiserver_writes_total{kind=\"lease\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    #[test]
    fn lease_renewals_count_as_they_are_written_not_at_the_end_of_a_pass() {
        let m = Metrics::default();
        assert_eq!(lease_writes(&m), None);
        m.lease_renewed(120);
        m.lease_renewed(80);
        assert_eq!(lease_writes(&m), Some(2));
        // A pass's own record adds nothing to them.
        m.record(&Writes {
            node_status: 1,
            ..Default::default()
        });
        assert_eq!(lease_writes(&m), Some(2));
    }
}
