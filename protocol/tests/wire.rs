//! Round trips of every record, and typed refusals of malformed and hostile input.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use fleetlet_protocol::{
    API_VERSION, Address, AgentManifest, AgentStatus, Capacity, ConditionStatus, ContainerLimits,
    ContainerSpec, DecodeError, DeviceFacts, DeviceId, EnvVar, FactsReport, FetchSource,
    FileContent, FileSpec, Free, Heartbeat, ManagedResource, ManifestError, Owner, OwnerKind,
    PortMapping, PortProtocol, ResourceDetails, ResourceId, ResourceKind, ResourceSpec,
    ResourceStatus, RestartPolicy, SystemInfo, SystemdUnitSpec, Timestamp, UnitState,
    UnsupportedSpec, decode, encode, facts_of, kv,
};
use proptest::prelude::*;
use serde_json::json;

const LABEL: &str = "[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?";

fn device_id() -> impl Strategy<Value = DeviceId> {
    LABEL.prop_map(|s| DeviceId::new(s).unwrap())
}

fn resource_id() -> impl Strategy<Value = ResourceId> {
    LABEL.prop_map(|s| ResourceId::new(s).unwrap())
}

fn file_spec() -> impl Strategy<Value = FileSpec> {
    (
        "(/[a-z0-9_-]{1,8}){1,4}",
        prop_oneof![
            any::<String>().prop_map(FileContent::Text),
            "[A-Za-z0-9+/]{0,16}".prop_map(FileContent::Base64),
            (
                "https://[a-z]{1,8}/[a-z0-9/]{0,16}",
                "[0-9a-f]{64}",
                1u64..=1 << 40
            )
                .prop_map(|(url, sha256, size)| FileContent::Fetch(FetchSource {
                    url,
                    sha256,
                    size
                }))
        ],
        proptest::option::of(0u32..=0o7777),
        proptest::option::of("[a-z]{1,8}"),
    )
        .prop_map(|(path, content, mode, owner)| FileSpec {
            path,
            content,
            mode,
            owner: owner.clone(),
            group: owner,
        })
}

fn container_spec() -> impl Strategy<Value = ContainerSpec> {
    (
        "[a-z0-9./:-]{1,30}",
        proptest::collection::vec(any::<String>(), 0..3),
        proptest::collection::vec(("[A-Z_]{1,8}", any::<String>()), 0..3),
        proptest::collection::vec((1u16.., proptest::option::of(1u16..)), 0..3),
        prop_oneof![
            Just(RestartPolicy::Always),
            Just(RestartPolicy::OnFailure),
            Just(RestartPolicy::Never)
        ],
        proptest::option::of((
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<u32>()),
        )),
    )
        .prop_map(
            |(image, args, env, ports, restart_policy, limits)| ContainerSpec {
                image,
                args,
                env: env
                    .into_iter()
                    .map(|(name, value)| EnvVar {
                        name,
                        value,
                        sealed_value: None,
                    })
                    .collect(),
                ports: ports
                    .into_iter()
                    .map(|(container_port, host_port)| PortMapping {
                        container_port,
                        host_port,
                        protocol: PortProtocol::TCP,
                        host_ip: None,
                    })
                    .collect(),
                restart_policy,
                limits: limits.map(|(memory_bytes, cpu_millis)| ContainerLimits {
                    memory_bytes,
                    cpu_millis,
                }),
                ..Default::default()
            },
        )
}

fn unit_spec() -> impl Strategy<Value = SystemdUnitSpec> {
    (
        "[a-z][a-z0-9-]{0,10}\\.(service|timer|socket)",
        proptest::option::of(any::<String>()),
        any::<bool>(),
        prop_oneof![Just(UnitState::Started), Just(UnitState::Stopped)],
    )
        .prop_map(|(name, contents, enabled, state)| SystemdUnitSpec {
            restart_on: Vec::new(),
            restart_digest: None,
            name,
            contents,
            enabled,
            state,
        })
}

fn unsupported_spec() -> impl Strategy<Value = UnsupportedSpec> {
    ("[a-z][a-zA-Z]{2,12}", any::<String>(), any::<i64>())
        .prop_filter("not a known kind", |(k, _, _)| {
            !ResourceKind::KNOWN.iter().any(|known| known.key() == k)
        })
        .prop_map(|(kind, s, n)| UnsupportedSpec {
            kind,
            spec: json!({ "field": s, "n": n, "nested": { "list": [1, 2, 3] } }),
        })
}

fn resource_spec() -> impl Strategy<Value = ResourceSpec> {
    prop_oneof![
        file_spec().prop_map(ResourceSpec::File),
        container_spec().prop_map(ResourceSpec::Container),
        unit_spec().prop_map(ResourceSpec::SystemdUnit),
        unsupported_spec().prop_map(ResourceSpec::Unsupported),
    ]
}

fn owner() -> impl Strategy<Value = Owner> {
    (
        prop_oneof![Just(OwnerKind::EdgeManifest), Just(OwnerKind::Pod)],
        LABEL,
        LABEL,
        any::<i64>(),
    )
        .prop_map(|(kind, namespace, name, generation)| Owner {
            kind,
            namespace,
            name,
            generation,
            uid: None,
        })
}

fn manifest() -> impl Strategy<Value = AgentManifest> {
    (
        device_id(),
        any::<u64>(),
        proptest::collection::btree_map(resource_id(), (owner(), resource_spec()), 0..6),
    )
        .prop_map(|(device, generation, resources)| AgentManifest {
            api_version: API_VERSION.into(),
            signing_key: None,
            issued_at: None,
            device,
            generation,
            resources: resources
                .into_iter()
                .map(|(id, (owner, spec))| ManagedResource { id, owner, spec })
                .collect(),
        })
}

fn resource_status() -> impl Strategy<Value = ResourceStatus> {
    let ts = any::<u64>().prop_map(Timestamp);
    prop_oneof![
        Just(ResourceStatus::Pending),
        (ts.clone(), proptest::option::of(".{0,40}"))
            .prop_map(|(since, message)| ResourceStatus::Reconciling { since, message }),
        (ts.clone(), "[0-9a-f]{64}", any::<u64>()).prop_map(|(since, sha256, size)| {
            ResourceStatus::ready(since, ResourceDetails::File { sha256, size })
        }),
        (
            ts.clone(),
            "[a-z0-9]{12}",
            any::<u32>(),
            proptest::option::of(any::<i32>())
        )
            .prop_map(|(since, container_id, restart_count, exit_code)| {
                ResourceStatus::ready(
                    since,
                    ResourceDetails::Container {
                        container_id,
                        image_digest: Some("sha256:00".into()),
                        state: "running".into(),
                        restart_count,
                        started_at: Some(since),
                        exit_code,
                        probe_ready: Some(true),
                    },
                )
            }),
        (
            ts.clone(),
            any::<String>(),
            proptest::option::of(ts),
            any::<bool>()
        )
            .prop_map(
                |(since, error, retry_after, permanent)| ResourceStatus::Failed {
                    since,
                    error,
                    retry_after,
                    permanent,
                }
            ),
        ("[a-z]{1,10}", any::<String>())
            .prop_map(|(kind, message)| ResourceStatus::Unsupported { kind, message }),
    ]
}

fn status() -> impl Strategy<Value = AgentStatus> {
    (
        device_id(),
        any::<u64>(),
        any::<u64>(),
        proptest::collection::btree_map(resource_id(), resource_status(), 0..6),
        any::<u64>(),
    )
        .prop_map(
            |(device, manifest_generation, observed, resources, drift)| {
                let mut s = AgentStatus::new(device);
                s.manifest_generation = manifest_generation;
                s.observed_generation = observed;
                s.resources = resources;
                s.drift_repairs = drift;
                s.set_condition(
                    "Ready",
                    ConditionStatus::True,
                    "Reconciled",
                    "",
                    Timestamp(5),
                );
                s
            },
        )
}

fn facts(mem: u64) -> DeviceFacts {
    DeviceFacts {
        agent_version: "0.1.0".into(),
        system: SystemInfo {
            operating_system: "linux".into(),
            architecture: "arm64".into(),
            os_image: "Debian GNU/Linux 12 (bookworm)".into(),
            kernel_version: "6.6.0".into(),
            hostname: Some("pi".into()),
            model: None,
        },
        capacity: Capacity {
            cpu_cores: 4,
            memory_bytes: mem,
            disk_bytes: mem,
            pids: 32768,
        },
        addresses: vec![Address {
            type_: "InternalIP".into(),
            address: "127.0.0.1".into(),
        }],
        sealing_key: None,
        limits: None,
        container_runtime: None,
    }
}

/// Heartbeats of this agent (no facts) and of older agents (facts inline).
fn heartbeat() -> impl Strategy<Value = Heartbeat> {
    (
        device_id(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<bool>(),
    )
        .prop_map(|(device, seq, ts, mem, inline)| Heartbeat {
            api_version: API_VERSION.into(),
            device,
            sequence: seq,
            timestamp: Timestamp(ts),
            interval_seconds: 10,
            free: Free {
                memory_bytes: mem / 2,
                disk_bytes: mem / 3,
                pids: 100,
            },
            facts: inline.then(|| Box::new(facts(mem))),
        })
}

fn facts_report() -> impl Strategy<Value = FactsReport> {
    (device_id(), any::<u64>(), any::<u64>()).prop_map(|(device, ts, mem)| FactsReport {
        api_version: API_VERSION.into(),
        device,
        timestamp: Timestamp(ts),
        facts: facts(mem),
    })
}

proptest! {
    #[test]
    fn manifests_round_trip(m in manifest()) {
        let bytes = encode(&m).unwrap();
        prop_assert_eq!(decode::<AgentManifest>(&bytes).unwrap(), m);
    }

    #[test]
    fn statuses_round_trip(s in status()) {
        let bytes = encode(&s).unwrap();
        prop_assert_eq!(decode::<AgentStatus>(&bytes).unwrap(), s);
    }

    #[test]
    fn heartbeats_round_trip(h in heartbeat()) {
        let bytes = encode(&h).unwrap();
        prop_assert_eq!(decode::<Heartbeat>(&bytes).unwrap(), h);
    }

    #[test]
    fn facts_reports_round_trip(f in facts_report()) {
        let bytes = encode(&f).unwrap();
        prop_assert_eq!(decode::<FactsReport>(&bytes).unwrap(), f);
    }

    /// Whatever bytes arrive, decoding returns (never panics).
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode::<AgentManifest>(&bytes);
        let _ = decode::<AgentStatus>(&bytes);
        let _ = decode::<Heartbeat>(&bytes);
        let _ = decode::<FactsReport>(&bytes);
    }

    /// Valid manifests with bytes overwritten or cut short, plain or inside a signed
    /// envelope: decoding returns an error or a manifest, never panics.
    #[test]
    fn mutated_manifests_never_panic(
        m in manifest(),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in any::<usize>(),
    ) {
        let mut bytes = encode(&m).unwrap();
        for (i, v) in edits {
            let i = i % bytes.len();
            bytes[i] = v;
        }
        bytes.truncate(cut % (bytes.len() + 1));
        let _ = decode::<AgentManifest>(&bytes);
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let sealed = fleetlet_protocol::signing::SignedManifest::new(text, "AAAA".into());
        let _ = decode::<AgentManifest>(&serde_json::to_vec(&sealed).unwrap());
        let _ = fleetlet_protocol::signing::open(&bytes);
    }
}

fn manifest_json(resources: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": API_VERSION,
        "device": "pi-1",
        "generation": 3,
        "resources": resources,
    }))
    .unwrap()
}

fn owner_json() -> serde_json::Value {
    json!({ "kind": "EdgeManifest", "namespace": "default", "name": "m", "generation": 1 })
}

#[test]
fn unknown_kind_becomes_unsupported_and_the_rest_still_parses() {
    let bytes = manifest_json(json!([
        { "id": "a", "owner": owner_json(), "file": { "path": "/etc/a", "content": { "text": "a" } } },
        { "id": "b", "owner": owner_json(), "gpuDriver": { "version": "550", "options": [1, 2] } },
    ]));
    let m = decode::<AgentManifest>(&bytes).unwrap();
    assert_eq!(m.resources.len(), 2);
    assert_eq!(m.resources[0].spec.kind(), ResourceKind::File);
    match &m.resources[1].spec {
        ResourceSpec::Unsupported(u) => {
            assert_eq!(u.kind, "gpuDriver");
            assert_eq!(u.spec, json!({ "version": "550", "options": [1, 2] }));
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
    // And it is written back unchanged, so nothing from the newer control plane is lost.
    let again = decode::<AgentManifest>(&encode(&m).unwrap()).unwrap();
    assert_eq!(again, m);
}

#[test]
fn placeholders_parse_as_their_own_kinds() {
    let bytes = manifest_json(json!([
        { "id": "n", "owner": owner_json(), "networkConfig": { "interface": "eth0", "dhcp": true } },
        { "id": "s", "owner": owner_json(), "shellJob": { "command": ["/bin/true"] } },
    ]));
    let m = decode::<AgentManifest>(&bytes).unwrap();
    assert_eq!(m.resources[0].spec.kind(), ResourceKind::NetworkConfig);
    assert_eq!(m.resources[1].spec.kind(), ResourceKind::ShellJob);
}

fn malformed_message(bytes: &[u8]) -> String {
    match decode::<AgentManifest>(bytes) {
        Err(e @ DecodeError::Malformed { .. }) => e.to_string(),
        other => panic!("expected Malformed, got {other:?}"),
    }
}

#[test]
fn malformed_manifests_get_typed_errors_that_say_what_is_wrong() {
    let two_kinds = manifest_json(json!([{ "id": "a", "owner": owner_json(),
        "file": { "path": "/etc/a", "content": { "text": "a" } }, "container": { "image": "x" } }]));
    let msg = malformed_message(&two_kinds);
    assert!(msg.contains("two kinds"), "{msg}");

    let no_kind = manifest_json(json!([{ "id": "a", "owner": owner_json() }]));
    assert!(malformed_message(&no_kind).contains("no kind"));

    let bad_device = br#"{"apiVersion":"fleetlet.dev/v1alpha1","device":"Pi.1","generation":1}"#;
    let msg = malformed_message(bad_device);
    assert!(msg.contains("device id") && msg.contains("Pi.1"), "{msg}");

    let bad_id = manifest_json(json!([{ "id": "a/../b", "owner": owner_json(),
        "file": { "path": "/etc/a", "content": { "text": "a" } } }]));
    assert!(malformed_message(&bad_id).contains("resource id"));

    let negative_generation =
        br#"{"apiVersion":"fleetlet.dev/v1alpha1","device":"pi-1","generation":-1}"#;
    malformed_message(negative_generation);

    let bad_known_kind = manifest_json(json!([{ "id": "a", "owner": owner_json(),
        "file": { "path": 7 } }]));
    malformed_message(&bad_known_kind);

    for junk in [
        &b""[..],
        b"null",
        b"[]",
        b"{",
        b"\xff\xfe",
        b"{\"apiVersion\":1}",
    ] {
        malformed_message(junk);
    }
}

#[test]
fn deeply_nested_json_is_refused_without_overflowing_the_stack() {
    let depth = 100_000;
    let mut s = String::from(
        r#"{"apiVersion":"fleetlet.dev/v1alpha1","device":"pi-1","generation":1,"resources":[{"id":"a","owner":{"kind":"Pod","namespace":"n","name":"p"},"future":"#,
    );
    s.push_str(&"[".repeat(depth));
    s.push_str(&"]".repeat(depth));
    s.push_str("}]}");
    let err = decode::<AgentManifest>(s.as_bytes()).unwrap_err();
    assert_eq!(err.reason(), "Malformed", "{err}");
}

#[test]
fn oversized_records_are_refused_before_parsing() {
    let big = vec![b' '; kv::MAX_MANIFEST_BYTES + 1];
    match decode::<AgentManifest>(&big) {
        Err(DecodeError::TooLarge { size, limit, .. }) => {
            assert_eq!(size, kv::MAX_MANIFEST_BYTES + 1);
            assert_eq!(limit, kv::MAX_MANIFEST_BYTES);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    // Encoding refuses what the other side would refuse.
    let mut m = AgentManifest::new(DeviceId::new("pi-1").unwrap(), 1);
    m.resources.push(ManagedResource {
        id: ResourceId::new("huge").unwrap(),
        owner: Owner {
            kind: OwnerKind::EdgeManifest,
            namespace: "n".into(),
            name: "m".into(),
            generation: 1,
            uid: None,
        },
        spec: ResourceSpec::File(FileSpec {
            path: "/etc/huge".into(),
            content: FileContent::Text("x".repeat(kv::MAX_MANIFEST_BYTES)),
            mode: None,
            owner: None,
            group: None,
        }),
    });
    assert!(matches!(
        encode(&m),
        Err(fleetlet_protocol::EncodeError::TooLarge { .. })
    ));
}

#[test]
fn other_api_versions_and_duplicate_ids_are_refused() {
    let v2 = br#"{"apiVersion":"fleetlet.dev/v2","device":"pi-1","generation":1}"#;
    assert!(matches!(
        decode::<AgentManifest>(v2),
        Err(DecodeError::UnsupportedApiVersion { found, .. }) if found == "fleetlet.dev/v2"
    ));
    let file = json!({ "path": "/etc/a", "content": { "text": "a" } });
    let dup = manifest_json(json!([
        { "id": "a", "owner": owner_json(), "file": file },
        { "id": "a", "owner": owner_json(), "file": file },
    ]));
    assert!(matches!(
        decode::<AgentManifest>(&dup),
        Err(DecodeError::Invalid(ManifestError::DuplicateResourceId(id))) if id == "a"
    ));
}

#[test]
fn per_resource_validation_fails_only_that_resource() {
    let file = |path: &str| {
        ResourceSpec::File(FileSpec {
            path: path.into(),
            content: FileContent::Text(String::new()),
            mode: None,
            owner: None,
            group: None,
        })
    };
    assert!(file("/etc/ok").validate().is_ok());
    for bad in [
        "relative/path",
        "/etc/../shadow",
        "/etc/./x",
        "/etc/dir/",
        "/etc/nul\0",
    ] {
        let err = file(bad).validate().unwrap_err().to_string();
        assert!(err.starts_with("file.path"), "{bad}: {err}");
    }
    let fetch = |url: &str, sha256: &str, size: u64| {
        ResourceSpec::File(FileSpec {
            path: "/opt/m.bin".into(),
            content: FileContent::Fetch(FetchSource {
                url: url.into(),
                sha256: sha256.into(),
                size,
            }),
            mode: None,
            owner: None,
            group: None,
        })
    };
    let sha = "0f".repeat(32);
    assert!(fetch("https://h.example/m.bin", &sha, 1).validate().is_ok());
    assert!(
        fetch(
            "https://[::1]:8443/m",
            &sha,
            fleetlet_protocol::MAX_FETCH_BYTES
        )
        .validate()
        .is_ok()
    );
    for (url, sha256, size, field) in [
        ("http://h.example/m", sha.as_str(), 1, "fetch.url"),
        ("https:///m", &sha, 1, "fetch.url"),
        ("https://h.example/a b", &sha, 1, "fetch.url"),
        ("https://h.example/m", &sha[..63], 1, "fetch.sha256"),
        (
            "https://h.example/m",
            &sha.to_uppercase(),
            1,
            "fetch.sha256",
        ),
        ("https://h.example/m", &sha, 0, "fetch.size"),
        (
            "https://h.example/m",
            &sha,
            fleetlet_protocol::MAX_FETCH_BYTES + 1,
            "fetch.size",
        ),
    ] {
        let err = fetch(url, sha256, size).validate().unwrap_err().to_string();
        assert!(err.contains(field), "{url} {sha256} {size}: {err}");
    }
    let unit = |name: &str| {
        ResourceSpec::SystemdUnit(SystemdUnitSpec {
            restart_on: Vec::new(),
            restart_digest: None,
            name: name.into(),
            contents: None,
            enabled: false,
            state: UnitState::Started,
        })
    };
    assert!(unit("hello.service").validate().is_ok());
    assert!(unit("getty@tty1.service").validate().is_ok());
    for bad in ["hello", ".service", "../x.service", "a b.service", "x.exe"] {
        assert!(unit(bad).validate().is_err(), "{bad}");
    }
    let container = |ports: Vec<(u16, Option<u16>)>| {
        ResourceSpec::Container(ContainerSpec {
            image: "localhost/app:1".into(),
            ports: ports
                .into_iter()
                .map(|(c, h)| PortMapping {
                    container_port: c,
                    host_port: h,
                    protocol: PortProtocol::TCP,
                    host_ip: None,
                })
                .collect(),
            ..Default::default()
        })
    };
    assert!(
        container(vec![(80, Some(8080)), (81, None)])
            .validate()
            .is_ok()
    );
    let err = container(vec![(80, Some(8080)), (81, Some(8080))])
        .validate()
        .unwrap_err();
    assert!(err.to_string().contains("published twice"), "{err}");
}

/// An agent from before the `facts` bucket sends its facts inside every heartbeat: they
/// still read, and [`facts_of`] prefers the device's own report when it has one.
#[test]
fn older_heartbeats_carry_their_facts_inline_and_a_report_takes_precedence() {
    let old = json!({
        "apiVersion": API_VERSION, "device": "pi-old", "sequence": 7,
        "timestamp": 1_764_496_800_000u64, "intervalSeconds": 30,
        "agentVersion": "0.9.0",
        "system": { "operatingSystem": "linux", "architecture": "arm64",
                    "osImage": "Raspbian", "kernelVersion": "6.1.0" },
        "capacity": { "cpuCores": 4, "memoryBytes": 4096, "diskBytes": 8192 },
        "free": { "memoryBytes": 1024, "diskBytes": 2048 },
        "sealingKey": "AAAA",
    });
    let h = decode::<Heartbeat>(&serde_json::to_vec(&old).unwrap()).unwrap();
    let inline = h.facts.as_deref().expect("inline facts");
    assert_eq!(inline.agent_version, "0.9.0");
    assert_eq!(inline.system.architecture, "arm64");
    assert_eq!(inline.sealing_key.as_deref(), Some("AAAA"));
    assert_eq!(h.free.memory_bytes, 1024);
    assert_eq!(facts_of(None, Some(&h)), Some(inline));

    let report = FactsReport {
        api_version: API_VERSION.into(),
        device: DeviceId::new("pi-old").unwrap(),
        timestamp: Timestamp(1),
        facts: facts(1 << 30),
    };
    assert_eq!(facts_of(Some(&report), Some(&h)), Some(&report.facts));
    assert_eq!(facts_of(None, None), None);

    // This agent's beats leave the facts out, and decode without them.
    let mut beat = h.clone();
    beat.facts = None;
    let bytes = encode(&beat).unwrap();
    let text = String::from_utf8(bytes.clone()).unwrap();
    assert!(
        !text.contains("agentVersion") && !text.contains("system"),
        "{text}"
    );
    assert_eq!(decode::<Heartbeat>(&bytes).unwrap(), beat);
    // A half-written set of inline facts is no facts, not a refused heartbeat.
    let partial = json!({
        "apiVersion": API_VERSION, "device": "pi-x", "sequence": 1,
        "timestamp": 1_764_496_800_000u64, "intervalSeconds": 30,
        "free": { "memoryBytes": 1, "diskBytes": 1 }, "agentVersion": "1.0",
    });
    let h = decode::<Heartbeat>(&serde_json::to_vec(&partial).unwrap()).unwrap();
    assert_eq!(h.facts, None);
}

#[test]
fn conditions_keep_their_transition_time_until_the_status_flips() {
    let mut s = AgentStatus::new(DeviceId::new("pi-1").unwrap());
    s.set_condition("Ready", ConditionStatus::True, "A", "", Timestamp(1));
    s.set_condition("Ready", ConditionStatus::True, "B", "m", Timestamp(2));
    let c = s.condition("Ready").unwrap();
    assert_eq!(c.last_transition_time, Timestamp(1));
    assert_eq!(c.reason, "B");
    s.set_condition("Ready", ConditionStatus::False, "C", "", Timestamp(3));
    assert_eq!(
        s.condition("Ready").unwrap().last_transition_time,
        Timestamp(3)
    );
    assert_eq!(s.conditions.len(), 1);
}

/// Writes seeds for the fuzz corpus (`fuzz/corpus/`) from the generators above, plain and
/// in signed envelopes: `cargo test -p fleetlet-protocol --test wire -- --ignored`.
#[test]
#[ignore = "writes files; run by hand to reseed the fuzz corpus"]
fn write_fuzz_seeds() {
    use proptest::{
        strategy::{Strategy, ValueTree},
        test_runner::TestRunner,
    };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let mut runner = TestRunner::deterministic();
    let write = |target: &str, name: String, bytes: Vec<u8>| {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    };
    for i in 0..16 {
        let m = manifest().new_tree(&mut runner).unwrap().current();
        let plain = encode(&m).unwrap();
        let envelope = serde_json::to_vec(&fleetlet_protocol::signing::SignedManifest::new(
            String::from_utf8(plain.clone()).unwrap(),
            "AAAA".into(),
        ))
        .unwrap();
        write("manifest", format!("seed-{i}"), plain);
        write("manifest", format!("seed-signed-{i}"), envelope);
        let s = status().new_tree(&mut runner).unwrap().current();
        write("status", format!("seed-status-{i}"), encode(&s).unwrap());
        let h = heartbeat().new_tree(&mut runner).unwrap().current();
        write("status", format!("seed-heartbeat-{i}"), encode(&h).unwrap());
    }
    for (i, req) in [
        json!({ "resource": "web", "session": "s1", "follow": true, "tailLines": 10, "limitBytes": 4096 }),
        json!({ "resource": "web", "session": "s2", "command": ["sh", "-c", "echo hi"], "stdin": true, "stdout": true }),
        json!({ "resource": "web", "session": "s3", "stdin": true, "tty": true }),
    ]
    .iter()
    .enumerate()
    {
        write("relay_request", format!("seed-{i}"), serde_json::to_vec(req).unwrap());
    }
}
