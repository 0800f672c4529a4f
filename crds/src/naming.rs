//! How devices map onto Kubernetes objects: the virtual Node's device label, and the
//! resource ids a Pod's containers get on its device. Shared by the controller (which
//! writes them) and the bridge (which reads them back to answer the kubelet API).

use std::collections::BTreeMap;

use fleetlet_protocol::{DeviceId, ResourceId};
use k8s_openapi::{
    api::core::v1::{Node, Pod},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

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
