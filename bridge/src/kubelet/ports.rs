//! One kubelet port per virtual node, from a range (`--kubelet-node-ports`).
//!
//! A kubelet serves one node, so a scraper asks `https://<InternalIP>:<port>/metrics/resource`
//! with nothing in the request that names the node. Every virtual node advertises the
//! bridge's address; with a port of its own as well, the port says which node is meant.
//! Logs, exec, attach and port-forward name their pod and work on any port.
//!
//! The mirror hands out the ports ([`NodePorts`], kept stable: a Node keeps the port it
//! already advertises) and every bridge replica listens on the ports its Node store shows
//! ([`wanted`]).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    ops::RangeInclusive,
};

use fleetlet_crds::naming::device_of;
use fleetlet_protocol::DeviceId;
use k8s_openapi::api::core::v1::Node;

use crate::view::StoredNode;

/// Parses `START-END` (inclusive, both above 0).
pub fn parse_range(s: &str) -> Result<RangeInclusive<u16>, String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?}: expected START-END, e.g. 20000-29999"))?;
    let a: u16 = a.trim().parse().map_err(|e| format!("{s:?}: {e}"))?;
    let b: u16 = b.trim().parse().map_err(|e| format!("{s:?}: {e}"))?;
    if a == 0 || a > b {
        return Err(format!("{s:?}: START must be above 0 and at most END"));
    }
    Ok(a..=b)
}

/// The port a Node advertises for its kubelet, if any.
pub fn advertised_port(node: &Node) -> Option<u16> {
    let port = node
        .status
        .as_ref()?
        .daemon_endpoints
        .as_ref()?
        .kubelet_endpoint
        .as_ref()?
        .port;
    u16::try_from(port).ok().filter(|p| *p != 0)
}

/// Which device has which port of the range.
#[derive(Debug)]
pub struct NodePorts {
    range: RangeInclusive<u16>,
    by_device: HashMap<DeviceId, u16>,
    owner: HashMap<u16, DeviceId>,
    free: BTreeSet<u16>,
}

impl NodePorts {
    pub fn new(range: RangeInclusive<u16>) -> Self {
        Self {
            free: range.clone().collect(),
            range,
            by_device: HashMap::new(),
            owner: HashMap::new(),
        }
    }

    /// The port of `id`: the one it has, else `current` (what its Node advertises) when that
    /// is in the range and free, else the lowest free one; `None` when the range is used up.
    pub fn claim(&mut self, id: &DeviceId, current: Option<u16>) -> Option<u16> {
        if let Some(p) = self.by_device.get(id) {
            return Some(*p);
        }
        let port = current
            .filter(|p| self.range.contains(p) && self.free.contains(p))
            .or_else(|| self.free.first().copied())?;
        self.free.remove(&port);
        self.by_device.insert(id.clone(), port);
        self.owner.insert(port, id.clone());
        Some(port)
    }

    /// Gives back the ports of devices `keep` says are gone.
    pub fn retain(&mut self, keep: impl Fn(&DeviceId) -> bool) {
        let gone: Vec<DeviceId> = self
            .by_device
            .keys()
            .filter(|d| !keep(d))
            .cloned()
            .collect();
        for d in gone {
            if let Some(p) = self.by_device.remove(&d) {
                self.owner.remove(&p);
                self.free.insert(p);
            }
        }
    }
}

/// Port → Node name for every fleetlet Node whose advertised port is in `range`: the
/// listeners a replica keeps open. A port two Nodes advertise (only for a moment, while a
/// port moves) goes to neither.
pub fn wanted<'a>(
    nodes: impl IntoIterator<Item = &'a StoredNode>,
    range: &RangeInclusive<u16>,
) -> BTreeMap<u16, String> {
    let mut out: BTreeMap<u16, Option<String>> = BTreeMap::new();
    for n in nodes {
        let (Some(name), Some(_), Some(port)) = (
            n.metadata.name.clone(),
            device_of(&n.metadata),
            n.kubelet_port,
        ) else {
            continue;
        };
        if range.contains(&port) {
            out.entry(port)
                .and_modify(|v| *v = None)
                .or_insert(Some(name));
        }
    }
    out.into_iter().filter_map(|(p, n)| Some((p, n?))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{DaemonEndpoint, NodeDaemonEndpoints, NodeStatus};

    fn id(s: &str) -> DeviceId {
        DeviceId::new(s.to_owned()).expect("id")
    }

    fn node(name: &str, device: Option<&str>, port: i32) -> StoredNode {
        let mut n = Node::default();
        n.metadata.name = Some(name.into());
        n.metadata.labels =
            device.map(|d| [(fleetlet_crds::naming::DEVICE_LABEL.to_owned(), d.to_owned())].into());
        n.status = Some(NodeStatus {
            daemon_endpoints: Some(NodeDaemonEndpoints {
                kubelet_endpoint: Some(DaemonEndpoint { port }),
            }),
            ..Default::default()
        });
        StoredNode::from(n)
    }

    #[test]
    fn ranges_parse_with_their_errors() {
        assert_eq!(parse_range("20000-20009"), Ok(20000..=20009));
        assert!(parse_range("20009-20000").is_err());
        assert!(parse_range("0-10").is_err());
        assert!(parse_range("20000").is_err());
        assert!(parse_range("a-b").is_err());
    }

    #[test]
    fn ports_stay_with_their_device_and_come_back_when_it_goes() {
        let mut p = NodePorts::new(100..=102);
        // A Node already advertising 102 keeps it; the next device gets the lowest free.
        assert_eq!(p.claim(&id("a"), Some(102)), Some(102));
        assert_eq!(p.claim(&id("b"), None), Some(100));
        // Asked again, with whatever the Node says meanwhile: the same port.
        assert_eq!(p.claim(&id("b"), Some(101)), Some(100));
        // Outside the range or taken: not kept.
        assert_eq!(p.claim(&id("c"), Some(102)), Some(101));
        assert_eq!(p.claim(&id("d"), Some(100)), None, "range used up");
        p.retain(|d| d.as_str() != "a");
        assert_eq!(p.claim(&id("d"), Some(9999)), Some(102));
    }

    #[test]
    fn listeners_follow_fleetlet_nodes_in_the_range_only() {
        let nodes = [
            node("pi-1", Some("pi-1"), 100),
            node("pi-2", Some("pi-2"), 10250),
            node("worker", None, 101),
            node("pi-3", Some("pi-3"), 102),
            node("pi-4", Some("pi-4"), 102),
        ];
        let w = wanted(&nodes, &(100..=102));
        assert_eq!(w, BTreeMap::from([(100, "pi-1".to_owned())]));
    }
}
