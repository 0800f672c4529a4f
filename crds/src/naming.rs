//! How devices map onto Kubernetes objects: the virtual Node's device label, and the
//! resource ids a Pod's containers get on its device. Shared by the controller (which
//! writes them) and the bridge (which reads them back to answer the kubelet API).

use std::{
    collections::{BTreeMap, btree_map::Entry},
    sync::Arc,
};

use fleetlet_protocol::{DeviceId, ResourceId};
use k8s_openapi::{
    api::core::v1::{Node, Pod},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

/// EdgeDevices by device id. Two EdgeDevices of one name in different namespaces are one
/// device id: the one created first has it (then the first namespace by name), and
/// `ignored` is told of each other one. One pass over `devices`, without sorting them: the
/// controller and the bridge run it over the whole fleet on every pass.
pub fn devices_by_id(
    devices: impl IntoIterator<Item = Arc<crate::EdgeDevice>>,
    mut ignored: impl FnMut(&crate::EdgeDevice),
) -> BTreeMap<DeviceId, Arc<crate::EdgeDevice>> {
    fn first(d: &crate::EdgeDevice) -> (Option<k8s_openapi::jiff::Timestamp>, Option<&str>) {
        (
            d.metadata.creation_timestamp.as_ref().map(|t| t.0),
            d.metadata.namespace.as_deref(),
        )
    }
    let mut out: BTreeMap<DeviceId, Arc<crate::EdgeDevice>> = BTreeMap::new();
    for d in devices {
        let Some(Ok(id)) = d.metadata.name.as_deref().map(DeviceId::new) else {
            continue;
        };
        match out.entry(id) {
            Entry::Vacant(e) => {
                e.insert(d);
            }
            Entry::Occupied(mut e) if first(&d) < first(e.get()) => ignored(&e.insert(d)),
            Entry::Occupied(_) => ignored(&d),
        }
    }
    out
}

/// Label on every virtual Node: the device id it stands for.
pub const DEVICE_LABEL: &str = "fleetlet.dev/device";

/// Prefix of `status.message` on Pods the controller refuses; the bridge leaves them be.
pub const REFUSED_PREFIX: &str = "fleetlet: ";

/// Whether the stored Pod already shows the controller's refusal (Failed, with
/// [`REFUSED_PREFIX`]): nothing more is written to it by either side.
pub fn shows_refusal(pod: &Pod) -> bool {
    pod.status.as_ref().is_some_and(|s| {
        s.phase.as_deref() == Some("Failed")
            && s.message
                .as_deref()
                .is_some_and(|m| m.starts_with(REFUSED_PREFIX))
    })
}

/// A short, stable tag for a pod (namespace/name), used in its resource ids.
pub fn pod_tag(namespace: &str, name: &str) -> String {
    // FNV-1a: stable across versions and platforms, no extra dependency.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in namespace.bytes().chain([b'/']).chain(name.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("p{:08x}", (h >> 32) as u32 ^ (h as u32))
}

/// The resource id of container `index` (`name`) of a pod.
pub fn container_id(namespace: &str, pod: &str, index: usize, name: &str) -> Option<ResourceId> {
    let tag = pod_tag(namespace, pod);
    ResourceId::new(format!("{tag}-{name}"))
        .or_else(|_| ResourceId::new(format!("{tag}-c{index}")))
        .ok()
}

/// The device a Node stands for, if it is one of fleetlet's virtual Nodes.
pub fn node_device(node: &Node) -> Option<DeviceId> {
    device_of(&node.metadata)
}

/// The device a Node with this metadata stands for.
pub fn device_of(node: &ObjectMeta) -> Option<DeviceId> {
    let id = node.labels.as_ref()?.get(DEVICE_LABEL)?;
    DeviceId::new(id.clone()).ok()
}

/// Node name → device, over the metadata of `nodes` (fleetlet's virtual Nodes; others are
/// left out).
pub fn node_devices<'a>(
    nodes: impl IntoIterator<Item = &'a ObjectMeta>,
) -> BTreeMap<String, DeviceId> {
    nodes
        .into_iter()
        .filter_map(|n| Some((n.name.clone()?, device_of(n)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(namespace: &str, name: &str, created: Option<&str>) -> Arc<crate::EdgeDevice> {
        let mut metadata = serde_json::json!({ "name": name, "namespace": namespace });
        if let Some(t) = created {
            metadata["creationTimestamp"] = serde_json::json!(t);
        }
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "apiVersion": "fleetlet.dev/v1alpha1",
                "kind": "EdgeDevice",
                "metadata": metadata,
                "spec": {},
            }))
            .expect("an EdgeDevice"),
        )
    }

    #[test]
    fn one_device_id_in_two_namespaces_goes_to_the_older_object() {
        let young = device("a", "pi", Some("2026-01-02T00:00:00Z"));
        let old = device("z", "pi", Some("2026-01-01T00:00:00Z"));
        let tie_b = device("b", "tie", Some("2026-01-01T00:00:00Z"));
        let tie_a = device("a", "tie", Some("2026-01-01T00:00:00Z"));
        let alone = device("a", "alone", None);
        let bad = device("a", "Not_A_Device", None);
        let mut ignored = Vec::new();
        let by_id = devices_by_id(
            [young, old, tie_b, tie_a, alone, bad],
            |d: &crate::EdgeDevice| {
                ignored.push(format!(
                    "{}/{}",
                    d.metadata.namespace.as_deref().unwrap_or_default(),
                    d.metadata.name.as_deref().unwrap_or_default()
                ));
            },
        );
        let served: Vec<String> = by_id
            .iter()
            .map(|(id, d)| {
                format!(
                    "{id}:{}",
                    d.metadata.namespace.as_deref().unwrap_or_default()
                )
            })
            .collect();
        assert_eq!(served, ["alone:a", "pi:z", "tie:a"]);
        ignored.sort();
        assert_eq!(ignored, ["a/pi", "b/tie"]);
    }

    #[test]
    fn pod_tags_are_stable_and_container_ids_fall_back_to_the_index() {
        // Written into devices' manifests: a change would recreate every Pod's containers.
        assert_eq!(pod_tag("default", "web"), pod_tag("default", "web"));
        assert_ne!(pod_tag("default", "web"), pod_tag("other", "web"));
        let tag = pod_tag("default", "web");
        assert_eq!(
            container_id("default", "web", 0, "httpd").map(|r| r.to_string()),
            Some(format!("{tag}-httpd"))
        );
        assert_eq!(
            container_id("default", "web", 2, "Not_A_Label").map(|r| r.to_string()),
            Some(format!("{tag}-c2"))
        );
    }
}
