//! `restartOn`: a Container or SystemdUnit restarted once when a resource it names (the
//! File it reads, typically) gets a new spec.
//!
//! Before planning a pass, the engine gives each such resource a digest of the specs it
//! names ([`with_restart_digests`]). The digest is part of its spec, so a change in what it
//! names is a change in it: the container reconciler makes a new container (the digest is in
//! its spec hash), the systemd reconciler writes the digest into the unit file it manages
//! and restarts the unit for the new file. Dependents are applied after what they name, in
//! the same pass (see [`Engine::work`](crate::engine)). Only direct dependencies count.

use std::{borrow::Cow, collections::HashMap};

use fleetlet_protocol::{AgentManifest, ResourceId};
use sha2::{Digest, Sha256};

/// `manifest` with the restart digest of every resource that has `restartOn` filled in,
/// and the resources whose `restartOn` cannot be resolved, with why (they are not applied:
/// what runs keeps running).
pub fn with_restart_digests(
    manifest: &AgentManifest,
) -> (Cow<'_, AgentManifest>, HashMap<ResourceId, String>) {
    let mut unresolved = HashMap::new();
    if manifest
        .resources
        .iter()
        .all(|r| r.spec.restart_on().is_empty())
    {
        return (Cow::Borrowed(manifest), unresolved);
    }
    let by_id: HashMap<&ResourceId, &fleetlet_protocol::ResourceSpec> = manifest
        .resources
        .iter()
        .map(|r| (&r.id, &r.spec))
        .collect();
    let mut out = manifest.clone();
    for r in &mut out.resources {
        let deps = r.spec.restart_on().to_vec();
        if deps.is_empty() {
            continue;
        }
        let mut hash = Sha256::new();
        let mut missing = Vec::new();
        for d in &deps {
            if *d == r.id {
                missing.push(format!("{d} (itself)"));
                continue;
            }
            match by_id.get(d) {
                Some(spec) => {
                    hash.update(d.as_str().as_bytes());
                    hash.update([0]);
                    hash.update(serde_json::to_vec(spec).unwrap_or_default());
                    hash.update([0]);
                }
                None => missing.push(d.to_string()),
            }
        }
        if missing.is_empty() {
            let digest: String = hash.finalize()[..8]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            r.spec.set_restart_digest(Some(digest));
        } else {
            unresolved.insert(
                r.id.clone(),
                format!(
                    "restartOn names {}, not a resource of this device's manifest",
                    missing.join(", ")
                ),
            );
        }
    }
    (Cow::Owned(out), unresolved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetlet_protocol::{
        ContainerSpec, DeviceId, FileContent, FileSpec, ManagedResource, Owner, OwnerKind,
        ResourceSpec,
    };

    fn id(s: &str) -> ResourceId {
        ResourceId::new(s.to_owned()).expect("id")
    }

    fn resource(name: &str, spec: ResourceSpec) -> ManagedResource {
        ManagedResource {
            id: id(name),
            owner: Owner {
                kind: OwnerKind::EdgeManifest,
                namespace: "default".into(),
                name: "m".into(),
                generation: 1,
                uid: None,
            },
            spec,
        }
    }

    fn file(text: &str) -> ResourceSpec {
        ResourceSpec::File(FileSpec {
            path: "/etc/app.conf".into(),
            content: FileContent::Text(text.into()),
            mode: None,
            owner: None,
            group: None,
        })
    }

    fn app(restart_on: &[&str]) -> ResourceSpec {
        ResourceSpec::Container(ContainerSpec {
            image: "app:1".into(),
            restart_on: restart_on.iter().map(|s| id(s)).collect(),
            ..Default::default()
        })
    }

    fn manifest(conf: &str, restart_on: &[&str]) -> AgentManifest {
        let mut m = AgentManifest::new(DeviceId::new("pi".to_owned()).expect("device"), 1);
        m.resources = vec![
            resource("conf", file(conf)),
            resource("other", file("x")),
            resource("app", app(restart_on)),
        ];
        m
    }

    fn digest(m: &AgentManifest) -> Option<String> {
        let (m, unresolved) = with_restart_digests(m);
        assert!(unresolved.is_empty(), "{unresolved:?}");
        match &m.resources[2].spec {
            ResourceSpec::Container(c) => c.restart_digest.clone(),
            _ => None,
        }
    }

    #[test]
    fn the_digest_follows_what_restart_on_names_and_nothing_else() {
        let a = digest(&manifest("v1", &["conf"]));
        assert!(a.is_some());
        assert_eq!(a, digest(&manifest("v1", &["conf"])), "stable");
        assert_ne!(a, digest(&manifest("v2", &["conf"])), "the file changed");
        let mut other = manifest("v1", &["conf"]);
        other.resources[1].spec = file("y");
        assert_eq!(a, digest(&other), "a file it does not name");
        assert_eq!(digest(&manifest("v1", &[])), None);
    }

    #[test]
    fn a_manifest_without_restart_on_is_not_copied() {
        let m = manifest("v1", &[]);
        assert!(matches!(with_restart_digests(&m).0, Cow::Borrowed(_)));
    }

    #[test]
    fn missing_ids_and_itself_are_reported_and_leave_no_digest() {
        let m = manifest("v1", &["nope", "app"]);
        let (out, unresolved) = with_restart_digests(&m);
        let why = &unresolved[&id("app")];
        assert!(
            why.contains("nope") && why.contains("app (itself)"),
            "{why}"
        );
        assert!(
            matches!(&out.resources[2].spec, ResourceSpec::Container(c) if c.restart_digest.is_none())
        );
    }
}
