//! fleetlet's CRDs in a real kube-apiserver: stored, listed, validated, status subresource.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use fleetlet_crds::{EdgeDevice, EdgeDeviceSpec, EdgeDeviceStatus, EdgeManifest};
use fleetlet_testenv::{TestEnv, repo_root};
use kube::{
    Api,
    api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams},
};
use serde_json::json;

fn device(name: &str, labels: serde_json::Value) -> EdgeDevice {
    serde_json::from_value(json!({
        "apiVersion": "fleetlet.dev/v1alpha1",
        "kind": "EdgeDevice",
        "metadata": { "name": name, "labels": labels },
        "spec": { "displayName": format!("Device {name}") }
    }))
    .unwrap()
}

/// Sends raw JSON so that the apiserver, not our types, does the validating.
async fn create_raw_manifest(
    env: &TestEnv,
    ns: &str,
    body: serde_json::Value,
) -> Result<EdgeManifest, kube::Error> {
    let ar = ApiResource::erase::<EdgeManifest>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(env.kube_client().await.unwrap(), ns, &ar);
    let obj: DynamicObject = serde_json::from_value(body).unwrap();
    let created = api.create(&PostParams::default(), &obj).await?;
    Ok(serde_json::from_value(serde_json::to_value(created).unwrap()).unwrap())
}

fn rejection_message(err: kube::Error) -> String {
    match err {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 422, "expected a validation failure, got {s:?}");
            s.message
        }
        other => panic!("expected an API rejection, got {other}"),
    }
}

#[tokio::test]
async fn edge_device_round_trips_and_status_is_a_subresource() {
    let env = TestEnv::shared();
    let ns = env.namespace("crd-device").await.unwrap();
    let api: Api<EdgeDevice> = Api::namespaced(env.kube_client().await.unwrap(), &ns);

    let created = api
        .create(
            &PostParams::default(),
            &device("pi-1", json!({"site": "home"})),
        )
        .await
        .unwrap();
    assert_eq!(created.spec.display_name.as_deref(), Some("Device pi-1"));
    assert!(!created.spec.paused, "paused defaults to false");

    // Status goes through /status and does not touch spec or bump generation.
    let status = EdgeDeviceStatus {
        applied_generation: Some(7),
        desired_generation: Some(7),
        ..Default::default()
    };
    let patched = api
        .patch_status(
            "pi-1",
            &PatchParams::apply("fleetlet-test").force(),
            &Patch::Apply(json!({
                "apiVersion": "fleetlet.dev/v1alpha1",
                "kind": "EdgeDevice",
                "status": status,
            })),
        )
        .await
        .unwrap();
    assert_eq!(patched.status.unwrap().applied_generation, Some(7));
    assert_eq!(patched.metadata.generation, created.metadata.generation);

    // A status field sent through the main resource is ignored.
    let mut with_status = api.get("pi-1").await.unwrap();
    with_status.spec = EdgeDeviceSpec {
        paused: true,
        ..with_status.spec
    };
    with_status.status = Some(EdgeDeviceStatus {
        applied_generation: Some(99),
        ..Default::default()
    });
    let replaced = api
        .replace("pi-1", &PostParams::default(), &with_status)
        .await
        .unwrap();
    assert!(replaced.spec.paused);
    assert_eq!(replaced.status.unwrap().applied_generation, Some(7));
}

#[tokio::test]
async fn device_name_that_is_not_a_dns_label_is_rejected_with_a_clear_message() {
    let env = TestEnv::shared();
    let ns = env.namespace("crd-devname").await.unwrap();
    let api: Api<EdgeDevice> = Api::namespaced(env.kube_client().await.unwrap(), &ns);
    // A valid Kubernetes object name, but dots would split the device's NATS subject.
    let err = api
        .create(&PostParams::default(), &device("kitchen.pi", json!({})))
        .await
        .unwrap_err();
    let msg = rejection_message(err);
    assert!(msg.contains("device id"), "{msg}");
    assert!(msg.contains("DNS-1123 label"), "{msg}");
}

#[tokio::test]
async fn edge_manifest_with_every_resource_kind_is_stored_as_typed() {
    let env = TestEnv::shared();
    let ns = env.namespace("crd-manifest").await.unwrap();
    let created = create_raw_manifest(
        env,
        &ns,
        json!({
            "apiVersion": "fleetlet.dev/v1alpha1",
            "kind": "EdgeManifest",
            "metadata": { "name": "stack" },
            "spec": {
                "selector": { "matchLabels": { "role": "sensor" } },
                "devices": ["pi-extra"],
                "rollout": { "maxUnavailable": "25%" },
                "resources": [
                    { "id": "cfg", "file": { "path": "/etc/app.toml", "mode": 420, "content": { "text": "a = 1\n" } } },
                    { "id": "bin", "file": { "path": "/opt/app/blob", "content": { "base64": "AAEC" } } },
                    { "id": "svc", "systemdUnit": { "name": "app.service", "enabled": true, "state": "Started", "contents": "[Service]\nExecStart=/bin/true\n" } },
                    { "id": "web", "container": {
                        "image": "localhost/app:1",
                        "ports": [{ "containerPort": 80, "hostPort": 8080 }],
                        "limits": { "memoryBytes": 1048576 },
                        "probe": { "action": { "http": { "port": 8080, "path": "/healthz" } } }
                    } },
                    { "id": "net", "networkConfig": { "interface": "eth0", "dhcp": true } },
                    { "id": "job", "shellJob": { "command": ["/bin/true"] } }
                ]
            }
        }),
    )
    .await
    .unwrap();

    let kinds: Vec<&str> = created
        .spec
        .resources
        .iter()
        .map(|r| r.spec.kind_key())
        .collect();
    assert_eq!(
        kinds,
        [
            "file",
            "file",
            "systemdUnit",
            "container",
            "networkConfig",
            "shellJob"
        ]
    );
    // Defaults from the schema are applied by the apiserver.
    let web = created
        .spec
        .resources
        .iter()
        .find(|r| r.id.as_str() == "web")
        .unwrap();
    let fleetlet_crds::ResourceSpec::Container(c) = &web.spec else {
        panic!("web is not a container: {web:?}");
    };
    assert_eq!(c.restart_policy, fleetlet_protocol::RestartPolicy::Always);
    assert_eq!(
        c.image_pull_policy,
        fleetlet_protocol::PullPolicy::IfNotPresent
    );
    assert_eq!(c.probe.as_ref().unwrap().period_seconds, 10);
}

#[tokio::test]
async fn invalid_edge_manifests_are_rejected_by_the_apiserver_with_readable_messages() {
    let env = TestEnv::shared();
    let ns = env.namespace("crd-invalid").await.unwrap();
    let manifest = |spec: serde_json::Value| {
        json!({
            "apiVersion": "fleetlet.dev/v1alpha1",
            "kind": "EdgeManifest",
            "metadata": { "name": "bad" },
            "spec": spec,
        })
    };
    let file =
        |id: &str| json!({ "id": id, "file": { "path": "/etc/x", "content": { "text": "" } } });

    let cases = [
        (
            "selects nothing",
            manifest(json!({ "resources": [file("a")] })),
            "must select devices",
        ),
        (
            "duplicate ids",
            manifest(json!({ "devices": ["pi-1"], "resources": [file("a"), file("a")] })),
            "resource ids must be unique",
        ),
        (
            "two kinds in one resource",
            manifest(json!({ "devices": ["pi-1"], "resources": [{
                "id": "a",
                "file": { "path": "/etc/x", "content": { "text": "" } },
                "container": { "image": "x" }
            }] })),
            "oneOf",
        ),
        (
            "no kind at all",
            manifest(json!({ "devices": ["pi-1"], "resources": [{ "id": "a" }] })),
            "oneOf",
        ),
        (
            "resource id with a dot",
            manifest(json!({ "devices": ["pi-1"], "resources": [file("a.b")] })),
            "spec.resources[0].id",
        ),
        (
            "device name with capitals",
            manifest(json!({ "devices": ["Pi-1"], "resources": [file("a")] })),
            "spec.devices[0]",
        ),
        (
            "file mode above 07777",
            manifest(
                json!({ "devices": ["pi-1"], "resources": [{ "id": "a", "file": {
                "path": "/etc/x", "mode": 4096, "content": { "text": "" } } }] }),
            ),
            "spec.resources[0].file.mode",
        ),
        (
            "unknown restart policy",
            manifest(
                json!({ "devices": ["pi-1"], "resources": [{ "id": "a", "container": {
                "image": "x", "restartPolicy": "Sometimes" } }] }),
            ),
            "Unsupported value: \"Sometimes\"",
        ),
        (
            "file path climbing out of its root",
            manifest(
                json!({ "devices": ["pi-1"], "resources": [{ "id": "a", "file": {
                "path": "/etc/fleetlet/../../etc/shadow", "content": { "text": "" } } }] }),
            ),
            "file.path must be an absolute path to a file",
        ),
        (
            "relative file path",
            manifest(
                json!({ "devices": ["pi-1"], "resources": [{ "id": "a", "file": {
                "path": "../../etc/shadow", "content": { "text": "" } } }] }),
            ),
            "file.path must be an absolute path to a file",
        ),
        (
            "maxUnavailable that is neither a count nor a percentage",
            manifest(
                json!({ "devices": ["pi-1"], "rollout": { "maxUnavailable": "abc" },
                "resources": [file("a")] }),
            ),
            "rollout.maxUnavailable must be a count of at least 1 or a percentage",
        ),
        (
            "maxUnavailable above 100%",
            manifest(
                json!({ "devices": ["pi-1"], "rollout": { "maxUnavailable": "150%" },
                "resources": [file("a")] }),
            ),
            "rollout.maxUnavailable must be a count of at least 1 or a percentage",
        ),
        (
            "selector operator in the wrong case",
            manifest(json!({ "selector": { "matchExpressions": [
                { "key": "role", "operator": "in", "values": ["sensor"] }] },
                "resources": [file("a")] })),
            "operator must be In, NotIn, Exists or DoesNotExist",
        ),
        (
            "restartOn on a unit whose file fleetlet does not write",
            manifest(
                json!({ "devices": ["pi-1"], "resources": [file("conf"), { "id": "a", "systemdUnit": {
                "name": "app.service", "restartOn": ["conf"] } }] }),
            ),
            "systemdUnit.restartOn needs contents",
        ),
        (
            "probe on port 0",
            manifest(
                json!({ "devices": ["pi-1"], "resources": [{ "id": "a", "container": {
                "image": "x", "probe": { "action": { "tcp": { "port": 0 } } } } }] }),
            ),
            "spec.resources[0].container.probe.action.tcp.port in body should be greater than or equal to 1",
        ),
        (
            "fetched content over plain http",
            manifest(
                json!({ "devices": ["pi-1"], "resources": [{ "id": "a", "file": {
                "path": "/opt/fleetlet/model.bin", "content": { "fetch": {
                "url": "http://models.example/m.bin", "sha256": "a".repeat(64), "size": 10 } } } }] }),
            ),
            "file.content.fetch.url must be an https:// URL",
        ),
        (
            "fetched content with a short digest",
            manifest(
                json!({ "devices": ["pi-1"], "resources": [{ "id": "a", "file": {
                "path": "/opt/fleetlet/model.bin", "content": { "fetch": {
                "url": "https://models.example/m.bin", "sha256": "abc", "size": 10 } } } }] }),
            ),
            "file.content.fetch.sha256",
        ),
        (
            "unit name with a path in it",
            manifest(
                json!({ "devices": ["pi-1"], "resources": [{ "id": "a", "systemdUnit": {
                "name": "../../x.service" } }] }),
            ),
            "systemdUnit.name must be a unit name",
        ),
        (
            "unit name without a type",
            manifest(
                json!({ "devices": ["pi-1"], "resources": [{ "id": "a", "systemdUnit": {
                "name": "sshd" } }] }),
            ),
            "systemdUnit.name must be a unit name",
        ),
    ];
    for (what, body, expected) in cases {
        let err = create_raw_manifest(env, &ns, body).await.unwrap_err();
        let msg = rejection_message(err);
        assert!(
            msg.contains(expected),
            "{what}: expected {expected:?} in the rejection, got: {msg}"
        );
    }
}

/// `kubectl apply -f -` of `yaml` in `ns`: (success, stderr).
fn kubectl_apply(env: &TestEnv, ns: &str, yaml: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = env
        .kubectl()
        .unwrap()
        .args(["apply", "-n", ns, "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kubectl on PATH");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn invalid_edge_manifests_applied_with_kubectl_are_refused_and_not_stored() {
    let env = TestEnv::shared();
    let ns = env.namespace("crd-kubectl-invalid").await.unwrap();
    let api: Api<EdgeManifest> = Api::namespaced(env.kube_client().await.unwrap(), &ns);
    let manifest = |name: &str, spec: &str| {
        format!(
            "apiVersion: fleetlet.dev/v1alpha1\nkind: EdgeManifest\nmetadata:\n  name: {name}\nspec:\n{spec}"
        )
    };
    let file = "  resources:\n    - id: a\n      file: { path: /etc/fleetlet/x, content: { text: \"\" } }\n";
    let cases = [
        (
            "bad-max-unavailable",
            manifest(
                "bad-max-unavailable",
                &format!("  devices: [pi-1]\n  rollout:\n    maxUnavailable: \"abc\"\n{file}"),
            ),
            "rollout.maxUnavailable must be a count of at least 1 or a percentage",
        ),
        (
            "bad-operator",
            manifest(
                "bad-operator",
                &format!(
                    "  selector:\n    matchExpressions:\n      - {{ key: role, operator: in, values: [sensor] }}\n{file}"
                ),
            ),
            "operator must be In, NotIn, Exists or DoesNotExist",
        ),
        (
            "bad-relative-path",
            manifest(
                "bad-relative-path",
                "  devices: [pi-1]\n  resources:\n    - id: a\n      file: { path: etc/fleetlet/x, content: { text: \"\" } }\n",
            ),
            "file.path must be an absolute path to a file",
        ),
        (
            "bad-probe-port",
            manifest(
                "bad-probe-port",
                "  devices: [pi-1]\n  resources:\n    - id: a\n      container:\n        image: localhost/app:1\n        probe: { action: { tcp: { port: 0 } } }\n",
            ),
            "spec.resources[0].container.probe.action.tcp.port in body should be greater than or equal to 1",
        ),
    ];
    for (name, yaml, expected) in cases {
        let (ok, stderr) = kubectl_apply(env, &ns, &yaml);
        assert!(!ok, "{name}: kubectl apply succeeded:\n{yaml}");
        assert!(
            stderr.contains(expected),
            "{name}: expected {expected:?} in kubectl's error, got: {stderr}"
        );
        assert!(
            api.get_opt(name).await.unwrap().is_none(),
            "{name}: stored although kubectl reported an error"
        );
    }
    // The same documents, made valid, are stored: what failed above was the field.
    let (ok, stderr) = kubectl_apply(
        env,
        &ns,
        &manifest(
            "good",
            &format!("  devices: [pi-1]\n  rollout:\n    maxUnavailable: \"25%\"\n{file}"),
        ),
    );
    assert!(ok, "{stderr}");
    assert!(api.get_opt("good").await.unwrap().is_some());
}

/// The cell of `column` in `name`'s row of a `kubectl get` table, located by the header's
/// column offsets.
fn table_cell(table: &str, name: &str, column: &str) -> Option<String> {
    let mut lines = table.lines();
    let header = lines.next()?;
    let starts: Vec<usize> = header
        .char_indices()
        .filter(|&(i, c)| c != ' ' && (i == 0 || header.as_bytes()[i - 1] == b' '))
        .map(|(i, _)| i)
        .collect();
    let at = header
        .find(&format!(" {column} "))
        .map(|i| i + 1)
        .or_else(|| {
            header
                .ends_with(&format!(" {column}"))
                .then(|| header.len() - column.len())
        })?;
    let next = starts.iter().copied().find(|&s| s > at);
    let row = lines.find(|l| l.split_whitespace().next() == Some(name))?;
    let end = next.unwrap_or(row.len()).min(row.len());
    row.get(at..end).map(|c| c.trim().to_owned())
}

#[tokio::test]
async fn wide_listing_shows_why_a_device_or_a_manifest_is_not_ready() {
    let env = TestEnv::shared();
    let ns = env.namespace("crd-wide").await.unwrap();
    let client = env.kube_client().await.unwrap();
    env.apply(&format!(
        "apiVersion: fleetlet.dev/v1alpha1\nkind: EdgeDevice\nmetadata: {{ name: pi-wide, namespace: {ns} }}\n---\n\
         apiVersion: fleetlet.dev/v1alpha1\nkind: EdgeManifest\nmetadata: {{ name: stack-wide, namespace: {ns} }}\n\
         spec:\n  devices: [pi-wide]\n  resources:\n    - id: a\n      file: {{ path: /etc/fleetlet/x, content: {{ text: \"\" }} }}\n"
    ))
    .unwrap();
    // The statuses the bridge and the controller write for a silent device and a rollout
    // held up by it.
    let condition = |reason: &str, message: &str| {
        json!({ "type": "Ready", "status": "False", "reason": reason, "message": message,
                "lastTransitionTime": "2025-01-01T00:00:00Z", "observedGeneration": 1 })
    };
    let device_message = "no heartbeat within the grace period";
    let manifest_message = "no device became Ready for more than 600s; waiting on: pi-wide";
    let params = PatchParams::apply("fleetlet-test").force();
    Api::<EdgeDevice>::namespaced(client.clone(), &ns)
        .patch_status(
            "pi-wide",
            &params,
            &Patch::Apply(json!({
                "apiVersion": "fleetlet.dev/v1alpha1", "kind": "EdgeDevice",
                "status": { "observedGeneration": 1,
                            "conditions": [condition("HeartbeatMissed", device_message)] },
            })),
        )
        .await
        .unwrap();
    Api::<EdgeManifest>::namespaced(client, &ns)
        .patch_status(
            "stack-wide",
            &params,
            &Patch::Apply(json!({
                "apiVersion": "fleetlet.dev/v1alpha1", "kind": "EdgeManifest",
                "status": { "observedGeneration": 1, "targeted": 1,
                            "conditions": [condition("ProgressDeadlineExceeded", manifest_message)] },
            })),
        )
        .await
        .unwrap();

    let get = |args: &[&str]| {
        let out = env
            .kubectl()
            .unwrap()
            .args(["get", "-n", &ns])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let devices = get(&["edgedevices", "-o", "wide"]);
    assert_eq!(
        table_cell(&devices, "pi-wide", "REASON").as_deref(),
        Some("HeartbeatMissed"),
        "{devices}"
    );
    assert_eq!(
        table_cell(&devices, "pi-wide", "MESSAGE").as_deref(),
        Some(device_message),
        "{devices}"
    );
    let manifests = get(&["edgemanifests", "-o", "wide"]);
    assert_eq!(
        table_cell(&manifests, "stack-wide", "STATUS").as_deref(),
        Some("ProgressDeadlineExceeded"),
        "{manifests}"
    );
    assert_eq!(
        table_cell(&manifests, "stack-wide", "MESSAGE").as_deref(),
        Some(manifest_message),
        "{manifests}"
    );
    // Without -o wide the reason and message columns stay out of the way.
    for (kind, name) in [("edgedevices", "pi-wide"), ("edgemanifests", "stack-wide")] {
        let narrow = get(&[kind]);
        assert_eq!(table_cell(&narrow, name, "MESSAGE"), None, "{narrow}");
        assert!(!narrow.contains("grace period") && !narrow.contains("waiting on"));
    }
}

#[tokio::test]
async fn unit_names_and_paths_users_really_write_are_accepted_and_a_device_needs_no_spec() {
    let env = TestEnv::shared();
    let ns = env.namespace("crd-valid").await.unwrap();
    let body = json!({
        "apiVersion": "fleetlet.dev/v1alpha1",
        "kind": "EdgeManifest",
        "metadata": { "name": "fine" },
        "spec": { "devices": ["pi-1"], "resources": [
            { "id": "a", "systemdUnit": { "name": "mnt-data\\x2dstore.mount" } },
            { "id": "b", "systemdUnit": { "name": "getty@tty1.service" } },
            { "id": "c", "file": { "path": "/etc/fleetlet/..hidden/x.conf", "content": { "text": "" } } },
            { "id": "d", "file": { "path": "/opt/fleetlet/model.bin", "content": { "fetch": {
                "url": "https://models.example:8443/v2/m.bin?sig=x", "sha256": "0a".repeat(32), "size": 52428800 } } } },
        ] },
    });
    create_raw_manifest(env, &ns, body).await.unwrap();
    // Every field of an EdgeDevice's spec is optional, so is the spec.
    env.apply(&format!(
        "apiVersion: fleetlet.dev/v1alpha1\nkind: EdgeDevice\nmetadata: {{ name: pi-nospec, namespace: {ns} }}\n"
    ))
    .unwrap();
    let devices: kube::Api<fleetlet_crds::EdgeDevice> =
        kube::Api::namespaced(env.kube_client().await.unwrap(), &ns);
    let d = devices.get("pi-nospec").await.unwrap();
    assert_eq!(d.spec, Default::default());
    // No controller or bridge runs here: new objects read back with the status default,
    // which GitOps tools read as not yet acted on.
    assert_eq!(d.status.unwrap().observed_generation, Some(-1));
    let manifests: kube::Api<EdgeManifest> =
        kube::Api::namespaced(env.kube_client().await.unwrap(), &ns);
    let m = manifests.get("fine").await.unwrap();
    assert_eq!(m.status.unwrap().observed_generation, Some(-1));
    assert_eq!(
        fleetlet_testenv::gitops::kstatus(
            &serde_json::to_value(manifests.get("fine").await.unwrap()).unwrap()
        ),
        "InProgress"
    );
    // `kubectl explain` describes both kinds and the fields users read.
    for (what, expected) in [
        ("edgedevice", "One device of the fleet"),
        (
            "edgemanifest",
            "Resources (files, containers, systemd units",
        ),
        ("edgedevice.status.lastHeartbeatTime", "latest heartbeat"),
    ] {
        let out = env
            .kubectl()
            .unwrap()
            .args(["explain", what])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(expected), "{what}: {text}");
        assert!(!text.contains("Auto-generated"), "{what}: {text}");
    }
}

#[tokio::test]
async fn kubectl_applies_the_examples_and_lists_them_with_printer_columns() {
    let env = TestEnv::shared();
    let ns = env.namespace("crd-kubectl").await.unwrap();
    let examples = repo_root().join("examples");
    let out = env
        .kubectl()
        .unwrap()
        .args(["apply", "-n", &ns, "-f"])
        .arg(examples.join("devices.yaml"))
        .arg("-f")
        .arg(examples.join("manifest.yaml"))
        .output()
        .expect("kubectl on PATH");
    assert!(
        out.status.success(),
        "kubectl apply failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = env
        .kubectl()
        .unwrap()
        .args(["get", "-n", &ns, "edgedevices,edgemanifests"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "READY",
        "CONVERGED",
        "APPLIED",
        "TARGETED",
        "pi-kitchen",
        "pi-garage",
        "pi-office",
        "sensor-stack",
        "garage-motd",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }

    // Short names and the category work too.
    let out = env
        .kubectl()
        .unwrap()
        .args(["get", "-n", &ns, "fleetlet", "-o", "name"])
        .output()
        .unwrap();
    let names = String::from_utf8_lossy(&out.stdout);
    assert_eq!(names.lines().count(), 5, "{names}");
    let out = env
        .kubectl()
        .unwrap()
        .args([
            "get",
            "-n",
            &ns,
            "em",
            "sensor-stack",
            "-o",
            "jsonpath={.spec.resources[*].id}",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "sensor-config sensor-reader collector"
    );
}
