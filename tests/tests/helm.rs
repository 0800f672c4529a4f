//! The Helm chart (`helm/fleetlet`): it lints, renders least-privilege objects, rejects bad
//! values, and installs, upgrades and uninstalls against a real kube-apiserver. The
//! controller and the bridge then run out of cluster with the chart's ServiceAccount tokens:
//! the chart's RBAC is enough for them to do their whole job (tests/pods.rs runs the kubelet
//! facade, logs, exec and its certificate request the same way).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::{
    collections::{BTreeMap, BTreeSet},
    process::Command,
    time::Duration,
};

use fleetlet_testenv::{
    TestEnv,
    chart::{chart_dir, checked, helm_command},
    components, eventually,
    gitops::{argocd_health, kstatus},
    wait,
};
use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        coordination::v1::Lease,
        core::v1::{Node, Pod},
        rbac::v1::ClusterRole,
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api,
    api::{DeleteParams, ListParams},
};
use serde_json::{Value, json};

/// Waits until `name` no longer exists.
async fn gone<K>(api: &Api<K>, name: &str)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    eventually(&format!("{name} gone"), Duration::from_secs(30), || async {
        match api.get_opt(name).await.map_err(|e| e.to_string())? {
            None => Ok(()),
            Some(_) => Err("still there".to_string()),
        }
    })
    .await;
}

fn helm() -> Command {
    helm_command(&std::env::temp_dir().join(format!("fleetlet-helm-{}", std::process::id())))
        .unwrap()
}

/// `helm template` with `--set` values: every rendered object, or helm's error output.
fn render(values: &[&str]) -> Result<Vec<Value>, String> {
    render_as("fleetlet", "1.36.3", values)
}

/// [`render`] as release `release` for a cluster of Kubernetes `kube_version`.
fn render_as(release: &str, kube_version: &str, values: &[&str]) -> Result<Vec<Value>, String> {
    let mut cmd = helm();
    cmd.args(["template", release]).arg(chart_dir()).args([
        "--namespace",
        "fleetlet-system",
        "--kube-version",
        kube_version,
    ]);
    for v in values {
        cmd.args(["--set", v]);
    }
    let out = cmd.output().unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8(out.stdout).unwrap();
    let mut objects = Vec::new();
    for doc in serde_norway::Deserializer::from_str(&text) {
        let v: Value = serde::Deserialize::deserialize(doc).unwrap();
        if !v.is_null() {
            objects.push(v);
        }
    }
    Ok(objects)
}

fn of_kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn named<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

/// Every (apiGroup, resource, verb) a role grants, resource names appended as `resource/name`.
fn grants(role: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let strs = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    };
    for rule in role["rules"].as_array().unwrap() {
        let names = strs(&rule["resourceNames"]);
        for g in strs(&rule["apiGroups"]) {
            for r in strs(&rule["resources"]) {
                for v in strs(&rule["verbs"]) {
                    if names.is_empty() {
                        out.insert(format!("{g}:{r}:{v}"));
                    }
                    for n in &names {
                        out.insert(format!("{g}:{r}/{n}:{v}"));
                    }
                }
            }
        }
    }
    out
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

const CONTROLLER_GRANTS: &[&str] = &[
    "fleetlet.dev:edgedevices:get",
    "fleetlet.dev:edgedevices:list",
    "fleetlet.dev:edgedevices:watch",
    "fleetlet.dev:edgemanifests:get",
    "fleetlet.dev:edgemanifests:list",
    "fleetlet.dev:edgemanifests:watch",
    "fleetlet.dev:edgemanifests:patch",
    "fleetlet.dev:edgedevices/status:get",
    "fleetlet.dev:edgedevices/status:patch",
    "fleetlet.dev:edgemanifests/status:get",
    "fleetlet.dev:edgemanifests/status:patch",
    "events.k8s.io:events:create",
    "events.k8s.io:events:patch",
];

const CONTROLLER_POD_GRANTS: &[&str] = &[
    ":pods:get",
    ":pods:list",
    ":pods:watch",
    ":nodes:get",
    ":nodes:list",
    ":nodes:watch",
    ":configmaps:get",
    ":configmaps:list",
    ":configmaps:watch",
    ":secrets:get",
    ":secrets:list",
    ":secrets:watch",
    ":pods/status:patch",
];

const BRIDGE_GRANTS: &[&str] = &[
    "fleetlet.dev:edgedevices:get",
    "fleetlet.dev:edgedevices:list",
    "fleetlet.dev:edgedevices:watch",
    "fleetlet.dev:edgedevices/status:get",
    "fleetlet.dev:edgedevices/status:patch",
    ":nodes:get",
    ":nodes:list",
    ":nodes:watch",
    ":nodes:create",
    ":nodes:patch",
    ":nodes:delete",
    ":nodes/status:patch",
    ":pods:get",
    ":pods:list",
    ":pods:watch",
    ":pods:delete",
    ":pods/status:patch",
];

const BRIDGE_KUBELET_GRANTS: &[&str] = &[
    "authorization.k8s.io:subjectaccessreviews:create",
    "authentication.k8s.io:tokenreviews:create",
    "certificates.k8s.io:certificatesigningrequests:create",
    "certificates.k8s.io:certificatesigningrequests:get",
    "certificates.k8s.io:certificatesigningrequests/approval:patch",
    "certificates.k8s.io:signers/kubernetes.io/kubelet-serving:approve",
];

#[test]
fn chart_lints_and_renders_least_privilege_rbac_and_hardened_pods() {
    let out = helm()
        .args(["lint", "--strict"])
        .arg(chart_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm lint: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let objects = render(&[]).unwrap();
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for o in &objects {
        *kinds.entry(o["kind"].as_str().unwrap()).or_default() += 1;
    }
    let expected: BTreeMap<&str, usize> = [
        ("ClusterRole", 2),
        ("ClusterRoleBinding", 2),
        ("Deployment", 2),
        ("Role", 3),
        ("RoleBinding", 3),
        ("Service", 2),
        ("ServiceAccount", 2),
    ]
    .into();
    assert_eq!(kinds, expected);

    // Exactly these permissions, cluster-wide; no wildcard anywhere.
    let controller = named(&objects, "ClusterRole", "fleetlet-controller");
    let mut want = set(CONTROLLER_GRANTS);
    want.extend(set(CONTROLLER_POD_GRANTS));
    assert_eq!(grants(controller), want);
    let bridge = named(&objects, "ClusterRole", "fleetlet-bridge");
    let mut want = set(BRIDGE_GRANTS);
    want.extend(set(BRIDGE_KUBELET_GRANTS));
    assert_eq!(grants(bridge), want);
    for role in of_kind(&objects, "ClusterRole")
        .into_iter()
        .chain(of_kind(&objects, "Role"))
    {
        assert!(
            !grants(role).iter().any(|g| g.contains('*')),
            "wildcard in {role}"
        );
    }
    // Namespaced: leader-election Leases by name, node Leases only in kube-node-lease.
    // The controller also keeps the manifest signing key in a Secret it creates.
    for (component, extra) in [
        (
            "controller",
            &[":secrets:create", ":secrets/fleetlet-manifest-signing:get"][..],
        ),
        ("bridge", &[][..]),
    ] {
        let name = format!("fleetlet-{component}-leader");
        let role = named(&objects, "Role", &name);
        assert_eq!(role["metadata"]["namespace"], "fleetlet-system");
        let mut want = vec![
            "coordination.k8s.io:leases:create".to_string(),
            format!("coordination.k8s.io:leases/fleetlet-{component}:get"),
            format!("coordination.k8s.io:leases/fleetlet-{component}:update"),
        ];
        want.extend(extra.iter().map(|s| s.to_string()));
        let want: Vec<&str> = want.iter().map(String::as_str).collect();
        assert_eq!(grants(role), set(&want));
    }
    let node_leases = named(&objects, "Role", "fleetlet-bridge-node-leases");
    assert_eq!(node_leases["metadata"]["namespace"], "kube-node-lease");
    assert_eq!(
        grants(node_leases),
        set(&[
            "coordination.k8s.io:leases:get",
            "coordination.k8s.io:leases:create",
            "coordination.k8s.io:leases:patch",
            "coordination.k8s.io:leases:delete",
        ])
    );
    // Every binding points at the chart's own roles and ServiceAccounts.
    for b in of_kind(&objects, "ClusterRoleBinding")
        .into_iter()
        .chain(of_kind(&objects, "RoleBinding"))
    {
        let role = b["roleRef"]["name"].as_str().unwrap();
        assert!(role.starts_with("fleetlet-"), "binding to {role}");
        for s in b["subjects"].as_array().unwrap() {
            assert_eq!(s["kind"], "ServiceAccount");
            assert_eq!(s["namespace"], "fleetlet-system");
        }
    }

    for d in of_kind(&objects, "Deployment") {
        let pod = &d["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        let c = &pod["containers"][0];
        let sc = &c["securityContext"];
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{d}");
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{d}");
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{d}");
        assert!(c["resources"]["requests"]["memory"].is_string(), "{d}");
        assert!(c["resources"]["limits"]["memory"].is_string(), "{d}");
        for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
            assert_eq!(c[probe]["httpGet"]["port"], "metrics", "{probe} in {d}");
        }
        let image = c["image"].as_str().unwrap();
        assert!(image.ends_with(":0.1.0"), "{image}");
        assert!(
            c["args"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a.as_str().unwrap().starts_with("--lease-name=")),
            "{d}"
        );
    }

    // Without Pods, the controller cannot read Secrets, ConfigMaps or Pods; without the
    // kubelet API, the bridge cannot create certificate requests or access reviews.
    let objects = render(&["controller.pods=false", "bridge.kubelet.enabled=false"]).unwrap();
    assert_eq!(
        grants(named(&objects, "ClusterRole", "fleetlet-controller")),
        set(CONTROLLER_GRANTS)
    );
    assert_eq!(
        grants(named(&objects, "ClusterRole", "fleetlet-bridge")),
        set(BRIDGE_GRANTS)
    );

    // NATS credentials and CA come from Secrets; two replicas get a disruption budget.
    let objects = render(&[
        "nats.url=tls://nats.example.net:4222",
        "nats.credentials.secretName=fleetlet-nats",
        "bridge.natsCredentialsSecretName=bridge-nats",
        "nats.tls.caSecretName=nats-ca",
        "controller.replicas=2",
        "bridge.kubelet.servingCert=secret",
        "bridge.kubelet.servingSecretName=bridge-tls",
    ])
    .unwrap();
    let controller = named(&objects, "Deployment", "fleetlet-controller");
    let env = controller["spec"]["template"]["spec"]["containers"][0]["env"].to_string();
    assert!(env.contains("tls://nats.example.net:4222"), "{env}");
    assert!(env.contains("/etc/fleetlet/nats/nats.creds"), "{env}");
    assert!(env.contains("/etc/fleetlet/nats-ca/ca.crt"), "{env}");
    let volumes = controller["spec"]["template"]["spec"]["volumes"].to_string();
    assert!(
        volumes.contains("fleetlet-nats") && volumes.contains("nats-ca"),
        "{volumes}"
    );
    assert_eq!(of_kind(&objects, "PodDisruptionBudget").len(), 1);
    let bridge = named(&objects, "Deployment", "fleetlet-bridge");
    assert!(bridge.to_string().contains("bridge-tls"), "{bridge}");
    // The bridge has a NATS identity of its own; the controller uses the shared one.
    let bridge_volumes = bridge["spec"]["template"]["spec"]["volumes"].to_string();
    assert!(
        bridge_volumes.contains("bridge-nats") && !bridge_volumes.contains("fleetlet-nats"),
        "{bridge_volumes}"
    );
    assert!(
        !grants(named(&objects, "ClusterRole", "fleetlet-bridge"))
            .iter()
            .any(|g| g.contains("certificates")),
        "no certificate rights without servingCert=csr"
    );

    // Bad values fail before anything reaches the cluster, naming the value.
    for (value, says) in [
        ("nats.url=http://nats:4222", "/nats/url"),
        ("controller.replicas=two", "/controller/replicas"),
        ("controller.kvReplicas=7", "/controller/kvReplicas"),
        (
            "bridge.kubelet.servingCert=maybe",
            "/bridge/kubelet/servingCert",
        ),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("contoller.replicas=2", "contoller"),
        ("bridge.kubelet.servingCert=secret", "servingSecretName"),
    ] {
        let err = render(&[value]).expect_err(value);
        assert!(err.contains(says), "{value}: {err}");
    }
}

/// The knobs users expect from a well-kept chart, each rendered where it belongs, and the
/// combinations that cannot work refused with a message naming the value.
#[test]
fn chart_knobs_render_where_they_belong() {
    let digest = format!("sha256:{}", "ab".repeat(32));
    let objects = render_as(
        "edge",
        "1.36.3",
        &[
            "priorityClassName=fleetlet-critical",
            "controller.podLabels.team=edge",
            &format!("bridge.imageDigest={digest}"),
            "controller.extraEnv[0].name=HTTPS_PROXY",
            "controller.extraEnv[0].value=http://proxy:3128",
            "bridge.extraVolumes[0].name=scratch",
            "bridge.extraVolumes[0].emptyDir.medium=Memory",
            "bridge.extraVolumeMounts[0].name=scratch",
            "bridge.extraVolumeMounts[0].mountPath=/scratch",
            "bridge.topologySpreadConstraints[0].maxSkew=1",
            "bridge.topologySpreadConstraints[0].topologyKey=topology.kubernetes.io/zone",
            "bridge.topologySpreadConstraints[0].whenUnsatisfiable=ScheduleAnyway",
            "controller.deviceIdentities.authoritySecretName=nats-authority",
            "bridge.nodeProjection=Disabled",
        ],
    )
    .unwrap();
    let pod = |name: &str| named(&objects, "Deployment", name)["spec"]["template"].clone();
    let (controller, bridge) = (pod("edge-fleetlet-controller"), pod("edge-fleetlet-bridge"));
    for p in [&controller, &bridge] {
        assert_eq!(p["spec"]["priorityClassName"], "fleetlet-critical");
    }
    assert_eq!(controller["metadata"]["labels"]["team"], "edge");
    assert!(bridge["metadata"]["labels"].get("team").is_none());
    // Extra pod labels stay off the selector, which cannot change after install.
    let selector = &named(&objects, "Deployment", "edge-fleetlet-controller")["spec"]["selector"];
    assert!(selector["matchLabels"].get("team").is_none(), "{selector}");
    assert_eq!(
        bridge["spec"]["containers"][0]["image"],
        format!("ghcr.io/fleetlet/fleetlet-bridge@{digest}")
    );
    assert_eq!(
        controller["spec"]["containers"][0]["image"],
        "ghcr.io/fleetlet/fleetlet-controller:0.1.0"
    );
    let env = &controller["spec"]["containers"][0]["env"];
    assert!(
        env.as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "HTTPS_PROXY" && e["value"] == "http://proxy:3128"),
        "{env}"
    );
    assert!(
        bridge["spec"]["volumes"]
            .to_string()
            .contains("\"medium\":\"Memory\"")
    );
    assert!(
        bridge["spec"]["containers"][0]["volumeMounts"]
            .to_string()
            .contains("/scratch")
    );
    assert_eq!(
        bridge["spec"]["topologySpreadConstraints"][0]["topologyKey"],
        "topology.kubernetes.io/zone"
    );
    assert!(
        controller["spec"]
            .get("topologySpreadConstraints")
            .is_none()
    );
    let bridge_args = bridge["spec"]["containers"][0]["args"].to_string();
    assert!(
        bridge_args.contains("--node-projection=Disabled"),
        "{bridge_args}"
    );
    // The NATS identities ConfigMap is named after the release, in the flag and the RBAC.
    let args = controller["spec"]["containers"][0]["args"].to_string();
    assert!(
        args.contains("--nats-identities-config-map=edge-fleetlet-nats-identities"),
        "{args}"
    );
    assert!(
        grants(named(&objects, "Role", "edge-fleetlet-controller-leader"))
            .contains(":configmaps/edge-fleetlet-nats-identities:update"),
        "{:?}",
        grants(named(&objects, "Role", "edge-fleetlet-controller-leader"))
    );

    // Pods only from some namespaces: ConfigMaps and Secrets are read there, nowhere else.
    let objects = render(&["controller.podNamespaces={apps,shop}"]).unwrap();
    let cluster = grants(named(&objects, "ClusterRole", "fleetlet-controller"));
    assert!(
        !cluster
            .iter()
            .any(|g| g.contains(":secrets:") || g.contains(":configmaps:")),
        "{cluster:?}"
    );
    for ns in ["apps", "shop"] {
        let role = of_kind(&objects, "Role")
            .into_iter()
            .find(|r| r["metadata"]["namespace"] == ns)
            .unwrap_or_else(|| panic!("no Role in {ns}"));
        assert_eq!(
            grants(role),
            set(&[
                ":configmaps:get",
                ":configmaps:list",
                ":configmaps:watch",
                ":secrets:get",
                ":secrets:list",
                ":secrets:watch",
            ])
        );
    }
    let args = named(&objects, "Deployment", "fleetlet-controller")["spec"]["template"]["spec"]
        ["containers"][0]["args"]
        .to_string();
    assert!(args.contains("--pod-namespaces=apps,shop"), "{args}");

    // ServiceAccounts made elsewhere: named, not created, and bound by the chart's RBAC.
    let objects = render(&[
        "serviceAccount.create=false",
        "serviceAccount.names.controller=ops-controller",
        "serviceAccount.names.bridge=ops-bridge",
    ])
    .unwrap();
    assert!(of_kind(&objects, "ServiceAccount").is_empty());
    let sa = |d: &str| {
        named(&objects, "Deployment", d)["spec"]["template"]["spec"]["serviceAccountName"].clone()
    };
    assert_eq!(sa("fleetlet-controller"), "ops-controller");
    assert_eq!(sa("fleetlet-bridge"), "ops-bridge");
    let subjects: BTreeSet<String> = of_kind(&objects, "ClusterRoleBinding")
        .into_iter()
        .flat_map(|b| b["subjects"].as_array().cloned().unwrap_or_default())
        .map(|s| s["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(subjects, set(&["ops-controller", "ops-bridge"]));

    for (values, says) in [
        (
            &["serviceAccount.create=false"][..],
            "serviceAccount.names.controller is required",
        ),
        (
            &[
                "metrics.serviceMonitor.enabled=true",
                "metrics.service.enabled=false",
            ][..],
            "needs metrics.service.enabled",
        ),
        (&["bridge.imageDigest=latest"][..], "/bridge/imageDigest"),
        (&["priorityClassName=5"][..], "priorityClassName"),
        (&["bridge.nodeProjection=Off"][..], "/bridge/nodeProjection"),
    ] {
        let err = render(values).expect_err(says);
        assert!(err.contains(says), "{values:?}: {err}");
    }
    // kubeVersion: older clusters are told, before anything is installed.
    let err = render_as("fleetlet", "1.33.0", &[]).expect_err("1.33");
    assert!(err.contains("kubeVersion"), "{err}");
}

fn kubectl_as(env: &TestEnv, kubeconfig: &std::path::Path, args: &[&str]) -> String {
    let out = run_as(env, kubeconfig, args);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `kubectl ARGS` authenticating with `kubeconfig` (a ServiceAccount's, from the chart).
fn run_as(env: &TestEnv, kubeconfig: &std::path::Path, args: &[&str]) -> std::process::Output {
    env.kubectl()
        .unwrap()
        .env("KUBECONFIG", kubeconfig)
        .args(args)
        .output()
        .unwrap()
}

/// Waits until `kubectl auth can-i VERB WHAT -A` with `kubeconfig` answers `want`.
async fn can_i_becomes(
    env: &TestEnv,
    kubeconfig: &std::path::Path,
    verb: &str,
    what: &str,
    want: &str,
) {
    eventually(
        &format!("`can-i {verb} {what}` to answer {want}"),
        Duration::from_secs(30),
        || async {
            let got = kubectl_as(env, kubeconfig, &["auth", "can-i", verb, what, "-A"]);
            (got == want).then_some(()).ok_or(got)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn helm_install_upgrade_uninstall_and_the_charts_rbac_runs_the_control_plane() {
    // The chart, not the test environment, installs the CRDs.
    let env = TestEnv::builder()
        .kube_without_crds()
        .nats()
        .start()
        .await
        .unwrap();
    let client = env.kube_client().await.unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    assert!(
        crds.get_opt("edgedevices.fleetlet.dev")
            .await
            .unwrap()
            .is_none()
    );

    let chart = env
        .install_chart("fleetlet", "fleetlet-system", &[])
        .unwrap();
    eventually("the CRDs established", Duration::from_secs(30), || {
        established(&crds)
    })
    .await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "fleetlet-system");
    for name in ["fleetlet-controller", "fleetlet-bridge"] {
        let d = deployments.get(name).await.unwrap();
        assert_eq!(d.spec.unwrap().replicas, Some(1));
    }

    // The ServiceAccounts can do what the roles say and nothing else.
    let can = |kc: &std::path::Path, verb: &str, what: &str| {
        kubectl_as(&env, kc, &["auth", "can-i", verb, what, "-A"])
    };
    // The authorizer learns of new bindings through its informers: wait for each grant
    // first, which also shows the refusals after it are answered with the bindings in place.
    let (ckc, bkc) = (&chart.controller_kubeconfig, &chart.bridge_kubeconfig);
    can_i_becomes(&env, ckc, "patch", "edgemanifests.fleetlet.dev", "yes").await;
    assert_eq!(can(ckc, "delete", "edgemanifests.fleetlet.dev"), "no");
    assert_eq!(can(ckc, "create", "deployments.apps"), "no");
    assert_eq!(can(ckc, "create", "nodes"), "no");
    can_i_becomes(&env, bkc, "create", "nodes", "yes").await;
    assert_eq!(can(bkc, "get", "secrets"), "no");
    assert_eq!(can(bkc, "patch", "edgemanifests.fleetlet.dev"), "no");
    assert_eq!(
        kubectl_as(
            &env,
            bkc,
            &["auth", "can-i", "create", "leases", "-n", "default"]
        ),
        "no"
    );

    // Out of cluster with those tokens: the controller, the bridge and one files-only agent.
    let dir = tempfile::tempdir().unwrap();
    let bins = components::bin_dir().unwrap();
    let controller = components::start_controller_as(
        &env,
        &chart.controller_kubeconfig,
        &bins,
        dir.path(),
        // As the chart's Deployment runs it (a signing key kept in a Secret it creates,
        // which only the chart's RBAC lets it do).
        &[
            "--resync-seconds=2",
            "--manifest-signing-secret=fleetlet-manifest-signing",
        ],
    )
    .unwrap();
    let trust = components::manifest_trust(&env, "fleetlet-system", "fleetlet-manifest-signing")
        .await
        .unwrap();
    let bridge =
        components::start_bridge_as(&env, &chart.bridge_kubeconfig, &bins, dir.path(), &[])
            .unwrap();
    let root = dir.path().join("root");
    let _agent = components::start_agent(
        &bins,
        dir.path(),
        &components::file_agent_config(
            env.nats_url().unwrap(),
            dir.path(),
            "pi-helm",
            "/etc/fleetlet-helm",
            "",
            &trust,
        ),
    )
    .unwrap();
    env.apply(
        r#"apiVersion: fleetlet.dev/v1alpha1
kind: EdgeDevice
metadata: { name: pi-helm, namespace: default, labels: { role: sensor } }
spec: {}
---
apiVersion: fleetlet.dev/v1alpha1
kind: EdgeManifest
metadata: { name: helm-check, namespace: default }
spec:
  selector: { matchLabels: { role: sensor } }
  resources:
    - id: greeting
      file: { path: /etc/fleetlet-helm/greeting, content: { text: "installed with helm\n" } }
"#,
    )
    .unwrap();

    // Controller: desired state, manifest status and finalizer. Bridge: Node, Lease, device status.
    let manifests: Api<fleetlet_crds::EdgeManifest> = Api::namespaced(client.clone(), "default");
    // Ready with the device counted: a manifest seen before its device is briefly Ready
    // with nothing targeted.
    let live = eventually(
        "the manifest rolled out to pi-helm",
        Duration::from_secs(60),
        || async {
            let m = manifests
                .get("helm-check")
                .await
                .map_err(|e| e.to_string())?;
            let status = m.status.clone().unwrap_or_default();
            let ready = status
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            (ready && status.targeted == 1 && status.ready == 1)
                .then_some(m)
                .ok_or(format!("{status:?}"))
        },
    )
    .await;
    assert!(
        live.metadata
            .finalizers
            .unwrap_or_default()
            .iter()
            .any(|f| f.contains("fleetlet"))
    );
    let greeting = root.join("etc/fleetlet-helm/greeting");
    wait::file_content(&greeting, "installed with helm\n", wait::DEFAULT_TIMEOUT).await;
    let live: Value = serde_json::to_value(manifests.get("helm-check").await.unwrap()).unwrap();
    assert_eq!(argocd_health(&live).unwrap().0, "Healthy", "{live}");
    assert_eq!(kstatus(&live), "Current", "{live}");
    let nodes: Api<Node> = Api::all(client.clone());
    env.wait_node_ready("pi-helm").await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    eventually("the node's Lease", wait::DEFAULT_TIMEOUT, || async {
        leases
            .get_opt("pi-helm")
            .await
            .map_err(|e| e.to_string())?
            .map(|_| ())
            .ok_or("no Lease kube-node-lease/pi-helm".to_string())
    })
    .await;
    let devices: Api<fleetlet_crds::EdgeDevice> = Api::namespaced(client.clone(), "default");
    let live = eventually("the device converged", Duration::from_secs(30), || async {
        let d = devices.get("pi-helm").await.map_err(|e| e.to_string())?;
        let v = serde_json::to_value(&d).map_err(|e| e.to_string())?;
        let (health, message) = argocd_health(&v).map_err(|e| e.to_string())?;
        (health == "Healthy")
            .then_some(d)
            .ok_or(format!("{health}: {message}"))
    })
    .await;
    assert!(live.status.is_some());

    // A manifest the device refuses (a path outside its allowed roots): `kubectl describe`
    // tells the operator why it is not converging, and Argo CD calls it Degraded. The
    // failure is permanent, so the manifest is Stalled at once, long before its deadline.
    env.apply(
        r#"apiVersion: fleetlet.dev/v1alpha1
kind: EdgeManifest
metadata: { name: outside-roots, namespace: default }
spec:
  devices: [pi-helm]
  resources:
    - id: sneaky
      file: { path: /etc/cron.d/sneaky, content: { text: "* * * * * root true\n" } }
"#,
    )
    .unwrap();
    let describe = |what: &str| {
        let mut cmd = env.kubectl().unwrap();
        cmd.args(["describe", what]);
        String::from_utf8_lossy(&checked("kubectl describe", cmd).unwrap().stdout).into_owned()
    };
    let text = eventually("the manifest stalled", Duration::from_secs(60), || async {
        let text = describe("edgemanifest/outside-roots");
        (text.contains("PermanentFailure") && text.contains("Stalled"))
            .then_some(text.clone())
            .ok_or(text)
    })
    .await;
    assert!(
        text.contains("pi-helm/sneaky") && text.contains("outside"),
        "names the failing device and resource, and why: {text}"
    );
    assert!(
        !text.contains("ProgressDeadlineExceeded"),
        "stalled by the failure, not by waiting out a deadline: {text}"
    );
    // And an Event on the manifest says the same, where `kubectl describe` lists them.
    eventually(
        "a ResourceFailed event on the manifest",
        wait::DEFAULT_TIMEOUT,
        || async {
            let text = describe("edgemanifest/outside-roots");
            (text.contains("ResourceFailed") && text.contains("sneaky on device pi-helm"))
                .then_some(())
                .ok_or(text)
        },
    )
    .await;
    // The device's own report reaches its EdgeDevice independently of the deadline.
    eventually(
        "kubectl describe edgedevice to say which resource fails and why",
        wait::DEFAULT_TIMEOUT,
        || async {
            let text = describe("edgedevice/pi-helm");
            (text.contains("ResourcesFailed")
                && text.contains("sneaky")
                && text.contains("outside"))
            .then_some(())
            .ok_or(text)
        },
    )
    .await;
    let live: Value = serde_json::to_value(manifests.get("outside-roots").await.unwrap()).unwrap();
    assert_eq!(argocd_health(&live).unwrap().0, "Degraded", "{live}");
    assert_eq!(kstatus(&live), "Failed", "Flux fails fast on it: {live}");
    // And the file is not there: not where this agent writes /etc (its path prefix, where
    // the greeting landed) and not in the machine's own /etc.
    assert!(greeting.exists());
    assert!(!root.join("etc/cron.d/sneaky").exists());
    assert!(!std::path::Path::new("/etc/cron.d/sneaky").exists());
    manifests
        .delete("outside-roots", &DeleteParams::default())
        .await
        .unwrap();

    // A Pod the device cannot run: the controller reads it and marks it Failed, with an Event.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": "needs-a-pvc" },
        "spec": {
            "nodeName": "pi-helm",
            "tolerations": [{ "key": "fleetlet.dev/edge", "operator": "Exists" }],
            "containers": [{ "name": "c", "image": "busybox",
                             "volumeMounts": [{ "name": "data", "mountPath": "/data" }] }],
            "volumes": [{ "name": "data", "persistentVolumeClaim": { "claimName": "data" } }]
        }
    }))
    .unwrap();
    pods.create(&Default::default(), &pod).await.unwrap();
    eventually("the pod refused", Duration::from_secs(30), || async {
        let p = pods.get("needs-a-pvc").await.map_err(|e| e.to_string())?;
        let phase = p.status.and_then(|s| s.phase).unwrap_or_default();
        (phase == "Failed").then_some(()).ok_or(phase)
    })
    .await;
    // The bridge, as the node's kubelet, confirms the deletion.
    pods.delete("needs-a-pvc", &DeleteParams::default())
        .await
        .unwrap();
    gone(&pods, "needs-a-pvc").await;

    // Cleanup through the finalizer (controller) and the node's removal (bridge).
    manifests
        .delete("helm-check", &DeleteParams::default())
        .await
        .unwrap();
    gone(&manifests, "helm-check").await;
    // The finalizer goes once desired state no longer holds the file; the device removes
    // it after that.
    wait::file_gone(&greeting, wait::DEFAULT_TIMEOUT).await;
    devices
        .delete("pi-helm", &DeleteParams::default())
        .await
        .unwrap();
    gone(&nodes, "pi-helm").await;

    // Upgrade: two sharded replicas of each and no kubelet API.
    let leases_here = ["auth", "can-i", "list", "leases", "-n", "fleetlet-system"];
    assert_eq!(kubectl_as(&env, ckc, &leases_here), "no");
    assert_eq!(kubectl_as(&env, bkc, &leases_here), "no");
    let mut upgrade = env.helm().unwrap();
    upgrade
        .args(["upgrade", "fleetlet"])
        .arg(chart_dir())
        .args(["-n", "fleetlet-system", "--set", "controller.replicas=2"])
        .args(["--set", "controller.shards=4", "--set", "bridge.shards=4"])
        .args(["--set", "bridge.kubelet.enabled=false"]);
    checked("helm upgrade", upgrade).unwrap();
    for name in ["fleetlet-controller", "fleetlet-bridge"] {
        let spec = deployments.get(name).await.unwrap().spec.unwrap();
        if name == "fleetlet-controller" {
            assert_eq!(spec.replicas, Some(2));
        }
        let args = spec.template.spec.unwrap().containers[0]
            .args
            .clone()
            .unwrap_or_default();
        assert!(args.contains(&"--shards=4".to_string()), "{name}: {args:?}");
    }
    // A sharded replica of each with the chart's token takes every shard's Lease and its
    // member Lease: the upgraded Roles are enough, and reach no other namespace.
    for kc in [ckc, bkc] {
        eventually(
            "the Role to grant listing Leases",
            Duration::from_secs(30),
            || async {
                let got = kubectl_as(&env, kc, &leases_here);
                (got == "yes").then_some(()).ok_or(got)
            },
        )
        .await;
        let elsewhere = ["auth", "can-i", "update", "leases", "-n", "default"];
        assert_eq!(kubectl_as(&env, kc, &elsewhere), "no");
    }
    drop(controller);
    drop(bridge);
    let sharded = dir.path().join("sharded");
    std::fs::create_dir_all(&sharded).unwrap();
    let flags = ["--shards=4", "--identity=sharded-0"];
    let _sharded_controller =
        components::start_controller_as(&env, ckc, &bins, &sharded, &flags).unwrap();
    let _sharded_bridge = components::start_bridge_as(&env, bkc, &bins, &sharded, &flags).unwrap();
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), "fleetlet-system");
    for group in ["fleetlet-controller", "fleetlet-bridge"] {
        eventually(
            &format!("the sharded {group} holds every Lease of its group"),
            wait::DEFAULT_TIMEOUT,
            || async {
                let list = leases
                    .list(
                        &ListParams::default().labels(&format!("fleetlet.dev/lease-group={group}")),
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                let held: Vec<String> = list
                    .items
                    .iter()
                    .filter(|l| {
                        l.spec.as_ref().and_then(|s| s.holder_identity.as_deref())
                            == Some("sharded-0")
                    })
                    .filter_map(|l| l.metadata.name.clone())
                    .collect();
                let member = format!("{group}-member-sharded-0");
                (held.len() == 5 && held.contains(&member))
                    .then_some(())
                    .ok_or(format!("{held:?}"))
            },
        )
        .await;
    }
    let roles: Api<ClusterRole> = Api::all(client.clone());
    let bridge_role = serde_json::to_value(roles.get("fleetlet-bridge").await.unwrap()).unwrap();
    assert!(
        !grants(&bridge_role)
            .iter()
            .any(|g| g.contains("certificates"))
    );

    // Uninstall removes what the chart made and keeps the CRDs (and users' objects).
    let mut uninstall = env.helm().unwrap();
    uninstall.args(["uninstall", "fleetlet", "-n", "fleetlet-system", "--wait"]);
    checked("helm uninstall", uninstall).unwrap();
    for name in ["fleetlet-controller", "fleetlet-bridge"] {
        assert!(deployments.get_opt(name).await.unwrap().is_none());
        assert!(roles.get_opt(name).await.unwrap().is_none());
    }
    assert!(
        crds.get_opt("edgemanifests.fleetlet.dev")
            .await
            .unwrap()
            .is_some()
    );
    eventually(
        "the controller's grant to go with the chart",
        wait::DEFAULT_TIMEOUT,
        || async {
            let got = can(ckc, "list", "edgemanifests.fleetlet.dev");
            (got != "yes").then_some(()).ok_or(got)
        },
    )
    .await;
}

/// `bridge.nodePolicy.enabled`: the bridge's ServiceAccount, whose RBAC on Nodes is
/// cluster-wide, can change fleetlet's virtual Nodes and no other Node. Checked on the
/// Nodes themselves after each attempt.
#[tokio::test]
async fn the_node_policy_confines_the_bridge_to_fleetlet_nodes() {
    let env = TestEnv::builder().kube().start().await.unwrap();
    let chart = env
        .install_chart(
            "fleetlet",
            "fleetlet-system",
            &["bridge.nodePolicy.enabled=true"],
        )
        .unwrap();
    let nodes: Api<Node> = Api::all(env.kube_client().await.unwrap());
    let node = |name: &str, labels: Value| -> Node {
        serde_json::from_value(json!({ "metadata": { "name": name, "labels": labels } })).unwrap()
    };
    let pp = kube::api::PostParams::default();
    nodes
        .create(&pp, &node("worker-1", json!({ "role": "worker" })))
        .await
        .unwrap();
    nodes
        .create(
            &pp,
            &node("pi-policy", json!({ "fleetlet.dev/device": "pi-policy" })),
        )
        .await
        .unwrap();
    let as_bridge = |args: &[&str]| {
        let out = run_as(&env, &chart.bridge_kubeconfig, args);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // The policy is read by the apiserver a moment after it is created: wait on a dry run,
    // which goes through admission and changes nothing.
    eventually("the policy in force", Duration::from_secs(30), || async {
        match as_bridge(&["label", "node", "worker-1", "probe=1", "--dry-run=server"]) {
            (false, err) if err.contains("fleetlet.dev/device") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let labels = |n: Node| n.metadata.labels.unwrap_or_default();

    let (ok, err) = as_bridge(&["label", "node", "worker-1", "taken=yes"]);
    assert!(!ok, "labelling a foreign node");
    assert!(err.contains("may change only Nodes labelled"), "{err}");
    assert!(!labels(nodes.get("worker-1").await.unwrap()).contains_key("taken"));
    let (ok, _) = as_bridge(&[
        "patch",
        "node",
        "worker-1",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"conditions":[{"type":"Ready","status":"False","reason":"Taken","message":"x"}]}}"#,
    ]);
    assert!(!ok, "its status");
    let status = nodes
        .get("worker-1")
        .await
        .unwrap()
        .status
        .unwrap_or_default();
    assert!(status.conditions.unwrap_or_default().is_empty());
    // Labelling it as a fleetlet node does not make it one: the Node before the change counts.
    let (ok, _) = as_bridge(&["label", "node", "worker-1", "fleetlet.dev/device=worker-1"]);
    assert!(!ok, "claiming a foreign node");
    assert!(!labels(nodes.get("worker-1").await.unwrap()).contains_key("fleetlet.dev/device"));
    let (ok, _) = as_bridge(&["delete", "node", "worker-1"]);
    assert!(!ok, "deleting a foreign node");
    assert!(nodes.get_opt("worker-1").await.unwrap().is_some());
    // A Node it creates must be labelled as fleetlet's.
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, labels: Value| {
        let path = dir.path().join(format!("{name}.json"));
        let n = json!({ "apiVersion": "v1", "kind": "Node",
                        "metadata": { "name": name, "labels": labels } });
        std::fs::write(&path, n.to_string()).unwrap();
        path.display().to_string()
    };
    let (ok, _) = as_bridge(&["create", "-f", &file("worker-2", json!({}))]);
    assert!(!ok, "creating an unlabelled node");
    assert!(nodes.get_opt("worker-2").await.unwrap().is_none());
    let created = file("pi-new", json!({ "fleetlet.dev/device": "pi-new" }));
    let (ok, err) = as_bridge(&["create", "-f", &created]);
    assert!(ok, "{err}");
    assert!(nodes.get_opt("pi-new").await.unwrap().is_some());

    // Its own Nodes it changes, creates and deletes as before.
    let (ok, err) = as_bridge(&["label", "node", "pi-policy", "site=home"]);
    assert!(ok, "{err}");
    assert_eq!(
        labels(nodes.get("pi-policy").await.unwrap())
            .get("site")
            .map(String::as_str),
        Some("home")
    );
    let (ok, err) = as_bridge(&["delete", "node", "pi-policy"]);
    assert!(ok, "{err}");
    wait::until(
        "pi-policy deleted",
        Duration::from_secs(30),
        || async {
            nodes
                .get_opt("pi-policy")
                .await
                .map(|n| n.is_some())
                .unwrap_or(true)
        },
        |present| !present,
    )
    .await;
}

/// `controller.podNamespaces`: the controller's ServiceAccount may read ConfigMaps and
/// Secrets only in those namespaces (a Secret elsewhere is refused, its data never
/// returned), and the controller run with that RBAC and `--pod-namespaces` syncs and serves.
#[tokio::test]
async fn the_controller_reads_config_only_where_device_pods_may_live() {
    let env = TestEnv::builder().kube().nats().start().await.unwrap();
    env.apply(
        r#"apiVersion: v1
kind: Namespace
metadata: { name: apps }
---
apiVersion: v1
kind: Namespace
metadata: { name: payroll }
---
apiVersion: v1
kind: Secret
metadata: { name: app-token, namespace: apps }
stringData: { token: app-5f3a }
---
apiVersion: v1
kind: Secret
metadata: { name: bank-key, namespace: payroll }
stringData: { key: payroll-9c1e }
"#,
    )
    .unwrap();
    let chart = env
        .install_chart(
            "fleetlet",
            "fleetlet-system",
            &["controller.podNamespaces={apps}"],
        )
        .unwrap();
    let as_controller = |args: &[&str]| {
        let out = run_as(&env, &chart.controller_kubeconfig, args);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // RBAC takes a moment to reach the authorizer: wait for the allowed read.
    eventually(
        "the controller reads Secrets in apps",
        Duration::from_secs(30),
        || async {
            match as_controller(&["get", "secret", "app-token", "-n", "apps", "-o", "json"]) {
                (true, out, _) if out.contains("app-token") => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    for args in [
        &["get", "secret", "bank-key", "-n", "payroll", "-o", "json"][..],
        &["get", "secrets", "-A", "-o", "json"][..],
        &["get", "configmaps", "-n", "payroll"][..],
    ] {
        let (ok, out, err) = as_controller(args);
        assert!(!ok, "{args:?} allowed: {out}");
        assert!(err.contains("forbidden"), "{args:?}: {err}");
        assert!(!out.contains("payroll-9c1e") && !out.contains("cGF5cm9sbC05YzFl"));
    }

    // The controller with exactly that RBAC: its watches list only where it may, so it syncs.
    let dir = tempfile::tempdir().unwrap();
    let port = fleetlet_testenv::process::free_port().unwrap();
    let metrics = format!("--metrics-addr=127.0.0.1:{port}");
    let _controller = components::start_controller_as(
        &env,
        &chart.controller_kubeconfig,
        &components::bin_dir().unwrap(),
        dir.path(),
        &[
            "--pod-namespaces=apps",
            "--manifest-signing-secret=fleetlet-manifest-signing",
            &metrics,
        ],
    )
    .unwrap();
    eventually("the controller ready", Duration::from_secs(60), || async {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
        s.write_all(b"GET /readyz HTTP/1.0\r\n\r\n")
            .map_err(|e| e.to_string())?;
        let mut r = String::new();
        s.read_to_string(&mut r).map_err(|e| e.to_string())?;
        r.starts_with("HTTP/1.0 200").then_some(()).ok_or_else(|| {
            format!(
                "{r}\n{}",
                std::fs::read_to_string(dir.path().join("controller.log")).unwrap_or_default()
            )
        })
    })
    .await;
    let log = std::fs::read_to_string(dir.path().join("controller.log")).unwrap();
    assert!(!log.contains("forbidden"), "{log}");
}

/// Whether both fleetlet CRDs are Established; Err names the first that is not.
async fn established(crds: &Api<CustomResourceDefinition>) -> Result<(), String> {
    for name in ["edgedevices.fleetlet.dev", "edgemanifests.fleetlet.dev"] {
        let crd = crds.get(name).await.map_err(|e| e.to_string())?;
        let ok = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        if !ok {
            return Err(format!("{name} not established"));
        }
    }
    Ok(())
}

/// The CRD upgrade path docs/gitops.md gives: a release installed with older CRDs (here the
/// EdgeDevice schema without `spec.nodeProjection`, which kubectl then refuses), then
/// `kubectl apply --server-side --force-conflicts` of the chart's CRDs over the ones Helm
/// created (Helm owns their fields: without forcing, the changed schema conflicts), then `helm
/// upgrade`. The new field is accepted and stored afterwards, Helm's upgrade leaves the new
/// CRDs alone, and every stored object stays as it was (same uid, nothing rewritten).
#[tokio::test]
async fn crds_upgrade_server_side_over_helms_before_helm_upgrade_and_keep_every_object() {
    let env = TestEnv::builder()
        .kube_without_crds()
        .start()
        .await
        .unwrap();
    let client = env.kube_client().await.unwrap();

    // The previous release: this chart, its EdgeDevice CRD one field short.
    let old = tempfile::tempdir().unwrap();
    let status = Command::new("cp")
        .arg("-r")
        .arg(chart_dir())
        .arg(old.path())
        .status()
        .unwrap();
    assert!(status.success());
    let old_chart = old.path().join(chart_dir().file_name().unwrap());
    let mut stream = String::new();
    for crd in fleetlet_crds::crds().unwrap() {
        let mut v = serde_json::to_value(&crd).unwrap();
        if v["spec"]["names"]["kind"] == "EdgeDevice" {
            for version in v["spec"]["versions"].as_array_mut().unwrap() {
                let spec = &mut version["schema"]["openAPIV3Schema"]["properties"]["spec"];
                let removed = spec["properties"]
                    .as_object_mut()
                    .unwrap()
                    .remove("nodeProjection");
                assert!(removed.is_some(), "the field to leave out is in the schema");
            }
        }
        // JSON is YAML: one document per CRD.
        stream.push_str(&format!("---\n{v}\n"));
    }
    std::fs::write(old_chart.join("crds/fleetlet.dev.yaml"), stream).unwrap();
    let mut install = env.helm().unwrap();
    install.args(["install", "fleetlet"]).arg(&old_chart).args([
        "-n",
        "fleetlet-system",
        "--create-namespace",
    ]);
    checked("helm install (older CRDs)", install).unwrap();

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    eventually("the older CRDs", Duration::from_secs(30), || {
        established(&crds)
    })
    .await;
    let device = |spec: &str| {
        format!(
            "apiVersion: fleetlet.dev/v1alpha1\nkind: EdgeDevice\n\
             metadata: {{ name: pi-crd, namespace: default, labels: {{ role: sensor }} }}\n\
             spec: {spec}\n"
        )
    };
    let with_field = old.path().join("with-field.yaml");
    std::fs::write(&with_field, device("{ nodeProjection: Disabled }")).unwrap();
    // One `kubectl apply` of the device with the new field: its output and whether it worked.
    let apply_with_field = || {
        let out = env
            .kubectl()
            .unwrap()
            .args(["apply", "-f"])
            .arg(&with_field)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    env.apply(&format!(
        "{}---\napiVersion: fleetlet.dev/v1alpha1\nkind: EdgeManifest\n\
         metadata: {{ name: crd-check, namespace: default }}\nspec:\n  \
         selector: {{ matchLabels: {{ role: sensor }} }}\n  resources:\n    - id: motd\n      \
         file: {{ path: /etc/fleetlet/motd, content: {{ text: \"hi\\n\" }} }}\n",
        device("{}")
    ))
    .unwrap();
    // The older schema does not know the field: kubectl's strict validation says so.
    let (ok, text) = apply_with_field();
    assert!(!ok && text.contains("unknown field"), "{text}");
    let devices: Api<fleetlet_crds::EdgeDevice> = Api::namespaced(client.clone(), "default");
    let manifests: Api<fleetlet_crds::EdgeManifest> = Api::namespaced(client.clone(), "default");
    let before = devices.get("pi-crd").await.unwrap();
    assert_eq!(before.spec.node_projection, None);
    let manifest_before = manifests.get("crd-check").await.unwrap();

    // The new CRDs, server-side, over the ones Helm created.
    let out = env
        .kubectl()
        .unwrap()
        .args(["apply", "--server-side", "--force-conflicts", "-f"])
        .arg(chart_dir().join("crds"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl apply --server-side --force-conflicts: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut upgrade = env.helm().unwrap();
    upgrade
        .args(["upgrade", "fleetlet"])
        .arg(chart_dir())
        .args(["-n", "fleetlet-system"]);
    checked("helm upgrade", upgrade).unwrap();
    eventually("the new CRDs", Duration::from_secs(30), || {
        established(&crds)
    })
    .await;

    // The new field is stored now (Helm's upgrade did not put the older CRDs back); the
    // objects are the same ones, the manifest not even rewritten.
    eventually(
        "spec.nodeProjection kept",
        Duration::from_secs(30),
        || async {
            let (ok, text) = apply_with_field();
            if !ok {
                return Err(text);
            }
            let d = devices.get("pi-crd").await.map_err(|e| e.to_string())?;
            match d.spec.node_projection {
                Some(p) => Ok(p),
                None => Err("not stored".to_string()),
            }
        },
    )
    .await;
    let after = devices.get("pi-crd").await.unwrap();
    assert_eq!(after.metadata.uid, before.metadata.uid);
    assert_eq!(after.metadata.labels, before.metadata.labels);
    let manifest_after = manifests.get("crd-check").await.unwrap();
    assert_eq!(manifest_after.metadata.uid, manifest_before.metadata.uid);
    assert_eq!(
        manifest_after.metadata.resource_version, manifest_before.metadata.resource_version,
        "the EdgeManifest was rewritten"
    );
}
