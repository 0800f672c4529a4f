//! crds/fleetlet.dev.yaml and the Helm chart's copy are what the types generate.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::path::Path;

/// Both copies: `crds/` for `kubectl apply`, and the Helm chart's `crds/`.
#[test]
fn committed_crd_yaml_matches_the_types() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let generated = fleetlet_crds::crds_yaml().unwrap();
    for path in [
        root.join("fleetlet.dev.yaml"),
        root.join("../helm/fleetlet/crds/fleetlet.dev.yaml"),
    ] {
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "{} is out of date: run `cargo run -p fleetlet-crds --bin fleetlet-crdgen -- crds/fleetlet.dev.yaml helm/fleetlet/crds/fleetlet.dev.yaml`",
            path.display()
        );
    }
}

#[test]
fn both_crds_are_namespaced_with_status_and_short_names() {
    for crd in fleetlet_crds::crds().unwrap() {
        assert_eq!(crd.spec.group, "fleetlet.dev");
        assert_eq!(crd.spec.scope, "Namespaced");
        let v = &crd.spec.versions[0];
        assert!(v.served && v.storage);
        assert!(v.subresources.as_ref().unwrap().status.is_some());
        assert!(
            !crd.spec
                .names
                .short_names
                .clone()
                .unwrap_or_default()
                .is_empty()
        );
        assert!(
            v.additional_printer_columns
                .as_ref()
                .is_some_and(|c| c.len() >= 3)
        );
    }
}
