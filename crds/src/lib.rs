//! fleetlet's custom resources, and the Kubernetes types the control plane shares.
//!
//! * [`EdgeDevice`]: one device of the fleet. Its name is the device id (a DNS-1123 label,
//!   unique across the cluster because it is also the device's NATS key).
//! * [`EdgeManifest`]: resources to run on the devices it selects.
//!
//! Resources use the wire protocol's [`ResourceSpec`], so one schema describes what users
//! write and what devices receive. `fleetlet-crdgen` writes the CRD YAML under `crds/`.

mod device;
mod manifest;
pub mod naming;

pub use device::{
    CONTROLLER_CONDITIONS, DeviceCredentials, DeviceInfo, EdgeDevice, EdgeDeviceSpec,
    EdgeDeviceStatus, GENERATION_OUT_OF_RANGE, LIMIT_EXCEEDED, NodeProjection, ResourceSummary,
};
pub use manifest::{
    EdgeManifest, EdgeManifestSpec, EdgeManifestStatus, ResourceTemplate, RolloutStrategy,
};

pub use fleetlet_protocol as protocol;
pub use fleetlet_protocol::ResourceSpec;
pub use k8s_openapi;
pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
pub use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
pub use kube;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, ValidationRule,
};
use kube::CustomResourceExt;

/// API group of every fleetlet resource.
pub const GROUP: &str = "fleetlet.dev";
/// The served and stored version.
pub const VERSION: &str = "v1alpha1";

/// Errors from producing the CRD documents.
#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    #[error("the generated {crd} CRD has no schema at {path}")]
    MissingSchema {
        crd: &'static str,
        path: &'static str,
    },
    #[error("cannot render CRD as YAML: {0}")]
    Yaml(#[from] serde_norway::Error),
}

/// The CustomResourceDefinitions, ready to apply, with the rules the derive cannot express.
pub fn crds() -> Result<Vec<CustomResourceDefinition>, CrdError> {
    let mut device = EdgeDevice::crd();
    // The device id doubles as a NATS subject token and a podman/virtual-node name, so it
    // must be a DNS-1123 label, stricter than Kubernetes' own rule for object names.
    add_root_rule(
        &mut device,
        "EdgeDevice",
        ValidationRule {
            rule: "self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$') && size(self.metadata.name) <= 63".into(),
            message: Some("EdgeDevice name is the device id: a DNS-1123 label (lowercase letters, digits and '-', at most 63 characters, no dots)".into()),
            ..Default::default()
        },
    )?;
    optional_spec(&mut device, "EdgeDevice")?;
    let mut manifest = EdgeManifest::crd();
    for (crd, name, text) in [
        (
            &mut device,
            "EdgeDevice",
            "One device of the fleet. Its name is the device id (also its NATS key and its \
             Node's name); its labels are what EdgeManifests select. The bridge mirrors its \
             heartbeats and status here and keeps a virtual Node for it.",
        ),
        (
            &mut manifest,
            "EdgeManifest",
            "Resources (files, containers, systemd units, ...) to run on the EdgeDevices it \
             selects in its namespace, rolled out generation by generation. Its status \
             follows kstatus conventions (Ready, Reconciling, Stalled) for GitOps tools.",
        ),
    ] {
        root_schema(crd, name)?.description = Some(text.into());
        status_default(crd, name)?;
    }
    Ok(vec![device, manifest])
}

/// New objects read back with `status.observedGeneration: -1` until their controller writes
/// a status, so GitOps tools (kstatus: observedGeneration behind generation) see them as in
/// progress, never as done before anything acted on them.
fn status_default(crd: &mut CustomResourceDefinition, name: &'static str) -> Result<(), CrdError> {
    let status = root_schema(crd, name)?
        .properties
        .as_mut()
        .and_then(|p| p.get_mut("status"))
        .ok_or(CrdError::MissingSchema {
            crd: name,
            path: "openAPIV3Schema.properties.status",
        })?;
    status.default = Some(
        k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSON(
            serde_json::json!({ "observedGeneration": -1 }),
        ),
    );
    Ok(())
}

/// Makes `spec` optional: every field of it is, so `kubectl apply` of a bare EdgeDevice
/// works. The API server defaults a missing spec to `{}`, so stored objects always have one.
fn optional_spec(crd: &mut CustomResourceDefinition, name: &'static str) -> Result<(), CrdError> {
    let schema = root_schema(crd, name)?;
    if let Some(required) = schema.required.as_mut() {
        required.retain(|r| r != "spec");
        if required.is_empty() {
            schema.required = None;
        }
    }
    let spec = schema
        .properties
        .as_mut()
        .and_then(|p| p.get_mut("spec"))
        .ok_or(CrdError::MissingSchema {
            crd: name,
            path: "openAPIV3Schema.properties.spec",
        })?;
    spec.default = Some(
        k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSON(
            serde_json::json!({}),
        ),
    );
    Ok(())
}

/// The CRD's root schema (`spec.versions[0].schema.openAPIV3Schema`).
fn root_schema<'a>(
    crd: &'a mut CustomResourceDefinition,
    name: &'static str,
) -> Result<&'a mut JSONSchemaProps, CrdError> {
    crd.spec
        .versions
        .first_mut()
        .and_then(|v| v.schema.as_mut())
        .and_then(|s| s.open_api_v3_schema.as_mut())
        .ok_or(CrdError::MissingSchema {
            crd: name,
            path: "spec.versions[0].schema.openAPIV3Schema",
        })
}

fn add_root_rule(
    crd: &mut CustomResourceDefinition,
    name: &'static str,
    rule: ValidationRule,
) -> Result<(), CrdError> {
    let schema = root_schema(crd, name)?;
    schema
        .x_kubernetes_validations
        .get_or_insert_with(Vec::new)
        .push(rule);
    Ok(())
}

/// All CRDs as one multi-document YAML stream, as committed in `crds/fleetlet.dev.yaml`.
pub fn crds_yaml() -> Result<String, CrdError> {
    let mut out = String::from(
        "# Generated by `cargo run -p fleetlet-crds --bin fleetlet-crdgen`; do not edit.\n",
    );
    for crd in crds()? {
        out.push_str("---\n");
        out.push_str(&serde_norway::to_string(&crd)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every field a user sets or reads has a description (what `kubectl explain` shows),
    /// its own rather than its type's.
    #[test]
    fn every_field_is_described() {
        fn walk(s: &JSONSchemaProps, path: &str, missing: &mut Vec<String>) {
            let alts = s.one_of.iter().chain(s.any_of.iter()).flatten();
            for (k, v) in s.properties.iter().flatten() {
                let p = format!("{path}.{k}");
                if v.description.as_deref().is_none_or(str::is_empty)
                    && !p.starts_with(".metadata")
                    && p != ".apiVersion"
                    && p != ".kind"
                {
                    missing.push(p.clone());
                }
                walk(v, &p, missing);
                if let Some(
                    k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrArray::Schema(items),
                ) = &v.items
                {
                    walk(items, &format!("{p}[]"), missing);
                }
            }
            for a in alts {
                walk(a, path, missing);
            }
        }
        for mut crd in crds().expect("crds") {
            let name = crd.spec.names.kind.clone();
            let root = root_schema(&mut crd, "crd").expect("schema").clone();
            let text = root.description.clone().unwrap_or_default();
            assert!(!text.starts_with("Auto-generated"), "{name}: {text}");
            let mut missing = Vec::new();
            walk(&root, "", &mut missing);
            assert!(
                missing.is_empty(),
                "{name}: fields without a description: {missing:?}"
            );
        }
    }
}
