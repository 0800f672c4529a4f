//! crds/fleetlet.dev.yaml is what the types generate.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::path::Path;

#[test]
fn committed_crd_yaml_matches_the_types() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fleetlet.dev.yaml");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    let generated = fleetlet_crds::crds_yaml().unwrap();
    assert!(
        committed == generated,
        "crds/fleetlet.dev.yaml is out of date: run `cargo run -p fleetlet-crds --bin fleetlet-crdgen -- crds/fleetlet.dev.yaml`"
    );
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
