//! The kubelet facade end to end: a Pod bound to a virtual node runs on the device through
//! the real controller, bridge, agent and podman, reports its status, and is deleted the way
//! a kubelet deletes pods. Pods a device cannot run are refused with a reason.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::{
    io::{Read, Write},
    time::{Duration, Instant},
};

use fleetlet_testenv::{
    TestEnv, compat, components, eventually,
    pods::{PodFleet, port_forward_pod, port_forward_transfer, wait_running},
    process::{Service, free_port},
    sandbox::PodmanSandbox,
};
use k8s_openapi::api::core::v1::{ConfigMap, Event, Pod};
use kube::{Api, api::PostParams};
use serde_json::json;

fn http_get(port: u16, path: &str) -> Result<String, String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\n\r\n").map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    Ok(out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned())
}

/// The protocols the bridge counted for `subresource` (`fleetlet_bridge_kubelet_streams`):
/// "WebSocket", "SPDY", both, or "none".
fn protocols_used(metrics_port: u16, subresource: &str) -> String {
    let text = http_get(metrics_port, "/metrics").unwrap_or_default();
    let used = |protocol: &str| {
        text.lines().any(|l| {
            l.starts_with("fleetlet_bridge_kubelet_streams_total{")
                && l.contains(&format!("subresource=\"{subresource}\""))
                && l.contains(&format!("protocol=\"{protocol}\""))
                && !l.ends_with(" 0")
        })
    };
    match (used("websocket"), used("spdy")) {
        (true, true) => "WebSocket and SPDY".into(),
        (true, false) => "WebSocket".into(),
        (false, true) => "SPDY".into(),
        (false, false) => "none".into(),
    }
}

/// A child's stdout and stderr, as chunks arrive.
fn output_of(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let streams: Vec<Box<dyn Read + Send>> = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .collect();
    for mut r in streams {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = r.read(&mut buf) {
                if n == 0
                    || tx
                        .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                        .is_err()
                {
                    break;
                }
            }
        });
    }
    rx
}

fn pod(name: &str, node: &str, spec: serde_json::Value) -> Pod {
    let mut spec = spec;
    spec["nodeName"] = json!(node);
    spec["tolerations"] =
        json!([{ "key": "fleetlet.dev/edge", "operator": "Exists", "effect": "NoSchedule" }]);
    serde_json::from_value(json!({ "metadata": { "name": name }, "spec": spec })).unwrap()
}

#[tokio::test]
async fn pods_on_a_virtual_node_run_on_the_device_report_status_and_are_deleted_like_a_kubelet_does()
 {
    let env = TestEnv::builder().kube().nats().start().await.unwrap();
    let pm = PodmanSandbox::start().await.unwrap();
    let metrics_port = free_port().unwrap();
    let metrics_flag = format!("--metrics-addr=127.0.0.1:{metrics_port}");
    let fleet = PodFleet::start(&env, &pm, "pi-pods", false, &[&metrics_flag])
        .await
        .unwrap();
    let (client, pki, nodes) = (fleet.client.clone(), fleet.pki.clone(), fleet.nodes.clone());
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "metadata": { "name": "web-content" },
            "data": { "index.html": "served from a ConfigMap\n", "greeting": "hello" }
        }))
        .unwrap(),
    )
    .await
    .unwrap();
    // A Secret, which must reach the device sealed to its key: never in clear in NATS.
    const TOKEN: &str = "s3cr3t-token-7f3a";
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), "default")
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": { "name": "web-secret" },
                "stringData": { "token": TOKEN }
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let port = free_port().unwrap();
    let web = pod(
        "web",
        "pi-pods",
        json!({
            "containers": [{
                "name": "httpd",
                "image": pm.image_1,
                "command": ["/bin/sh", "-c", "echo \"$GREETING from $POD\" | tee /tmp/who && exec httpd -f -vv -p 8080 -h /www"],
                "env": [
                    { "name": "GREETING", "valueFrom": { "configMapKeyRef": { "name": "web-content", "key": "greeting" } } },
                    { "name": "POD", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } },
                    { "name": "TOKEN", "valueFrom": { "secretKeyRef": { "name": "web-secret", "key": "token" } } }
                ],
                "ports": [{ "containerPort": 8080, "hostPort": port, "hostIP": "127.0.0.1" }],
                "volumeMounts": [{ "name": "content", "mountPath": "/www" }, { "name": "scratch", "mountPath": "/scratch" },
                                 { "name": "secret", "mountPath": "/secret" }],
                "readinessProbe": { "httpGet": { "port": 8080, "path": "/index.html" }, "periodSeconds": 1 },
                "resources": { "limits": { "memory": "64Mi", "cpu": "500m" } }
            }],
            "volumes": [
                { "name": "content", "configMap": { "name": "web-content" } },
                { "name": "scratch", "emptyDir": {} },
                { "name": "secret", "secret": { "secretName": "web-secret", "defaultMode": 256 } }
            ]
        }),
    );
    pods.create(&PostParams::default(), &web).await.unwrap();
    let running = eventually(
        "the pod Running and Ready",
        Duration::from_secs(60),
        || async {
            let p = pods.get("web").await.map_err(|e| e.to_string())?;
            let st = p.status.clone().unwrap_or_default();
            let ready = st
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            if st.phase.as_deref() == Some("Running") && ready {
                Ok(p)
            } else {
                Err(format!("{st:?}"))
            }
        },
    )
    .await;
    let st = running.status.unwrap();
    let cs = &st.container_statuses.unwrap()[0];
    assert_eq!(cs.name, "httpd");
    assert!(cs.ready);
    assert!(cs.image_id.contains("@sha256:"), "{}", cs.image_id);
    assert!(
        cs.container_id
            .as_deref()
            .is_some_and(|c| c.starts_with("podman://"))
    );
    assert!(cs.state.as_ref().unwrap().running.is_some());
    assert!(st.host_ip.is_some());
    assert_eq!(
        http_get(port, "/index.html").unwrap(),
        "served from a ConfigMap\n"
    );
    let name = pm
        .podman(&[
            "ps",
            "--filter",
            "label=dev.fleetlet.device=pi-pods",
            "--format",
            "{{.Names}}",
        ])
        .unwrap();
    let name = name.trim();
    assert_eq!(
        pm.podman(&["exec", name, "cat", "/tmp/who"]).unwrap(),
        "hello from web\n"
    );
    assert!(
        pm.podman(&["exec", name, "ls", "/scratch"]).is_ok(),
        "emptyDir mounted"
    );
    let memory = pm
        .podman(&["inspect", name, "--format", "{{.HostConfig.Memory}}"])
        .unwrap();
    assert_eq!(memory.trim(), "67108864");
    // The Secret arrived: in the container's environment and as a file with the volume's
    // mode (0400) ...
    assert_eq!(
        pm.podman(&["exec", name, "sh", "-c", "echo \"$TOKEN\""])
            .unwrap(),
        format!("{TOKEN}\n")
    );
    assert_eq!(
        pm.podman(&["exec", name, "cat", "/secret/token"]).unwrap(),
        TOKEN
    );
    let listing = pm
        .podman(&["exec", name, "ls", "-l", "/secret/token"])
        .unwrap();
    assert!(listing.starts_with("-r--------"), "{listing}");
    // ... and what NATS holds for the device is sealed: the bytes never show the value.
    let raw = env
        .jetstream()
        .await
        .unwrap()
        .get_key_value("desired-state")
        .await
        .unwrap()
        .entry("pi-pods")
        .await
        .unwrap()
        .unwrap()
        .value;
    let raw = String::from_utf8_lossy(&raw);
    assert!(raw.contains("\"sealed\""), "{raw}");
    assert!(raw.contains("sealedValue"), "{raw}");
    assert!(
        !raw.contains(TOKEN),
        "the Secret in clear in desired state: {raw}"
    );
    use base64::Engine;
    for encoding in [
        base64::engine::general_purpose::STANDARD.encode(TOKEN),
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(TOKEN),
    ] {
        assert!(
            !raw.contains(&encoding),
            "the Secret base64-encoded in desired state"
        );
    }

    // kubectl logs and exec, through the apiserver, the bridge's kubelet API and NATS.
    let kubectl = |args: &[&str]| {
        let out = env.kubectl().unwrap().args(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, logs, err) = kubectl(&["logs", "web"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(logs.starts_with("hello from web\n"), "{logs:?}");
    let (code, tail, _) = kubectl(&["logs", "web", "--tail=1", "--timestamps"]);
    assert_eq!(code, Some(0));
    assert_eq!(tail.lines().count(), 1, "{tail:?}");
    assert!(tail.starts_with("20"), "a timestamp first: {tail:?}");
    // -f streams lines written after it started.
    let mut follow = env
        .kubectl()
        .unwrap()
        .args(["logs", "-f", "web"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let rx = output_of(&mut follow);
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    // busybox httpd -v logs each response; only these requests are answered 404.
    while !seen.contains("response:404") {
        assert!(
            Instant::now() < deadline,
            "no new line through logs -f: {seen:?}"
        );
        let _ = http_get(port, "/followed");
        while let Ok(chunk) = rx.recv_timeout(Duration::from_millis(300)) {
            seen.push_str(&chunk);
        }
    }
    let _ = follow.kill();
    let _ = follow.wait();
    // attach: the main process's output, live.
    let mut attached = env
        .kubectl()
        .unwrap()
        .args(["attach", "web", "-c", "httpd"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let rx = output_of(&mut attached);
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    // httpd -vv logs each request's path: one no other step requests must come through.
    let path = format!("/attached-{}", std::process::id());
    while !seen.contains(&format!("url:{path}\n")) {
        assert!(
            Instant::now() < deadline,
            "{path} not seen through attach: {seen:?}"
        );
        let _ = http_get(port, &path);
        while let Ok(chunk) = rx.recv_timeout(Duration::from_millis(300)) {
            seen.push_str(&chunk);
        }
    }
    let _ = attached.kill();
    let _ = attached.wait();
    let (code, out, err) = kubectl(&["exec", "web", "--", "echo", "hi"]);
    assert_eq!((code, out.as_str()), (Some(0), "hi\n"), "{err}");
    let mut cat = env
        .kubectl()
        .unwrap()
        .args(["exec", "-i", "web", "--", "cat"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    cat.stdin
        .take()
        .unwrap()
        .write_all(b"through stdin\n")
        .unwrap();
    let out = cat.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "through stdin\n");
    let (code, _, _) = kubectl(&["exec", "web", "--", "sh", "-c", "exit 3"]);
    assert_eq!(code, Some(3), "the command's exit code comes back");
    compat::passed(
        "exec (output, `-i`, exit code)",
        &protocols_used(metrics_port, "exec"),
    );
    compat::passed("attach", &protocols_used(metrics_port, "attach"));
    // port-forward: the apiserver proxies kubectl's WebSocket (SPDY tunnelled in it) to a
    // node that declares WebSockets.
    pods.create(
        &PostParams::default(),
        &port_forward_pod(&pm.image_1, "pi-pods", 20).unwrap(),
    )
    .await
    .unwrap();
    wait_running(&pods, "pf", Duration::from_secs(60)).await;
    let (up, down) = port_forward_both_ways(&env, false).await;
    eprintln!("port-forward tunnelled in a WebSocket: {up:.1} MiB/s up, {down:.1} MiB/s down");
    // 1.36+ proxies the WebSocket to a node that declares it; older apiservers speak SPDY.
    let websockets = fleetlet_testenv::bins::Binaries::locate()
        .unwrap()
        .kube_minor()
        .is_none_or(|minor| minor >= 36);
    let expected = if websockets { "WebSocket" } else { "SPDY" };
    assert_eq!(protocols_used(metrics_port, "portforward"), expected);
    compat::passed("port-forward (20 MiB each way, checksums)", expected);
    pods.delete("pf", &Default::default()).await.unwrap();
    eventually(
        "the port-forward pod gone",
        Duration::from_secs(60),
        || async {
            match pods.get_opt("pf").await.map_err(|e| e.to_string())? {
                None => Ok(()),
                Some(_) => Err("still there".to_string()),
            }
        },
    )
    .await;
    // The kubelet API itself: a client certificate is required, and nodes/proxy permission.
    let node = nodes.get("pi-pods").await.unwrap();
    let kport = node
        .status
        .unwrap()
        .daemon_endpoints
        .unwrap()
        .kubelet_endpoint
        .unwrap()
        .port;
    let url = format!("https://127.0.0.1:{kport}/containerLogs/default/web/httpd");
    let curl = |extra: &[String]| {
        let out = std::process::Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
            .arg(pki.join("ca.crt"))
            .args(extra)
            .arg(&url)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let cert = |name: &str| {
        vec![
            "--cert".to_string(),
            pki.join(format!("{name}.crt")).display().to_string(),
            "--key".to_string(),
            pki.join(format!("{name}.key")).display().to_string(),
        ]
    };
    assert_eq!(curl(&[]), "401");
    assert_eq!(curl(&cert("nobody")), "403");
    assert_eq!(curl(&cert("admin")), "200");
    // `get` on nodes/proxy reads logs; exec takes `create` too, as documented.
    env.apply(
        r#"apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: { name: fleetlet-test-proxy-get }
rules: [{ apiGroups: [""], resources: ["nodes/proxy"], verbs: ["get"] }]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: { name: fleetlet-test-proxy-get }
roleRef: { apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: fleetlet-test-proxy-get }
subjects:
  - { apiGroup: rbac.authorization.k8s.io, kind: User, name: fleetlet-nobody }
  - { kind: ServiceAccount, name: log-reader, namespace: default }
---
apiVersion: v1
kind: ServiceAccount
metadata: { name: log-reader, namespace: default }
---
apiVersion: v1
kind: ServiceAccount
metadata: { name: stranger, namespace: default }
"#,
    )
    .unwrap();
    eventually(
        "logs with get on nodes/proxy",
        Duration::from_secs(20),
        || async {
            let code = curl(&cert("nobody"));
            (code == "200").then_some(()).ok_or(code)
        },
    )
    .await;
    // A bearer token instead of a certificate (a ServiceAccount's, as metrics-server or
    // Prometheus present to kubelets): checked by a TokenReview, then authorized the same.
    let bearer = |account: &str| {
        let out = env
            .kubectl()
            .unwrap()
            .args(["create", "token", account, "-n", "default"])
            .output()
            .unwrap();
        let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(
            !token.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        vec!["-H".to_string(), format!("Authorization: Bearer {token}")]
    };
    eventually(
        "logs with a ServiceAccount token",
        Duration::from_secs(20),
        || async {
            let code = curl(&bearer("log-reader"));
            (code == "200").then_some(()).ok_or(code)
        },
    )
    .await;
    assert_eq!(
        curl(&bearer("stranger")),
        "403",
        "a token without nodes/proxy"
    );
    let forged = vec![
        "-H".to_string(),
        "Authorization: Bearer not-a-token".to_string(),
    ];
    assert_eq!(
        curl(&forged),
        "401",
        "a token the apiserver does not accept"
    );
    let exec_url =
        format!("https://127.0.0.1:{kport}/exec/default/web/httpd?command=true&output=1");
    let curl_at = |url: &str, extra: &[String]| {
        let out = std::process::Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
            .arg(pki.join("ca.crt"))
            .args(extra)
            .arg(url)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(
        curl_at(&exec_url, &cert("nobody")),
        "403",
        "exec without create"
    );
    let admin = curl_at(&exec_url, &cert("admin"));
    assert!(
        admin != "401" && admin != "403",
        "the admin passes authorization (then needs a stream upgrade): {admin}"
    );

    // Logs options and a terminal, as kubectl sends them.
    let (code, five, err) = kubectl(&["logs", "web", "--limit-bytes=5"]);
    assert_eq!((code, five.as_str()), (Some(0), "hello"), "{err}");
    compat::passed("logs (`-f`, `--tail`, `--timestamps`, `--limit-bytes`)", "");
    std::thread::sleep(Duration::from_millis(1100));
    let since = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .unwrap();
    let since = String::from_utf8_lossy(&since.stdout).trim().to_owned();
    std::thread::sleep(Duration::from_millis(1100));
    let marker = format!("/after-{}", std::process::id());
    let _ = http_get(port, &marker);
    let recent = eventually(
        "a line after --since-time",
        Duration::from_secs(20),
        || async {
            let (_, out, _) = kubectl(&["logs", "web", &format!("--since-time={since}")]);
            out.contains(&marker).then_some(out.clone()).ok_or(out)
        },
    )
    .await;
    assert!(!recent.contains("hello from web"), "{recent}");
    let (_, recent, _) = kubectl(&["logs", "web", "--since=2s"]);
    assert!(!recent.contains("hello from web"), "{recent}");
    let kubectl_bin = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let terminal = |flags: &str| {
        let out = std::process::Command::new("script")
            .args([
                "-qec",
                &format!(
                    "{kubectl_bin} exec {flags} web -- sh -c '[ -t 1 ] && echo is-a-tty || echo not-a-tty'"
                ),
                "/dev/null",
            ])
            .env("KUBECONFIG", env.kubeconfig().unwrap())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(terminal("-it").contains("is-a-tty"), "{}", terminal("-it"));
    assert!(terminal("-i").contains("not-a-tty"), "{}", terminal("-i"));
    compat::passed("logs `--since`, `--since-time`", "");
    compat::passed(
        "exec `-it` (a terminal)",
        &protocols_used(metrics_port, "exec"),
    );
    // Every exec and attach is in the device's audit log.
    let agent_log = std::fs::read_to_string(fleet.dir.path().join("agent/agent.log")).unwrap();
    assert!(
        agent_log.lines().any(|l| l.contains("fleetlet::audit")
            && l.contains("exec session")
            && l.contains("is-a-tty")),
        "no audit line for the exec"
    );

    // A pod the device cannot run: refused with a reason and an Event, nothing started.
    let pvc = pod(
        "needs-pvc",
        "pi-pods",
        json!({
            "containers": [{ "name": "app", "image": pm.image_1 }],
            "volumes": [{ "name": "data", "persistentVolumeClaim": { "claimName": "data" } }]
        }),
    );
    pods.create(&PostParams::default(), &pvc).await.unwrap();
    eventually("the PVC pod refused", Duration::from_secs(30), || async {
        let p = pods.get("needs-pvc").await.map_err(|e| e.to_string())?;
        let st = p.status.unwrap_or_default();
        if st.phase.as_deref() == Some("Failed")
            && st.reason.as_deref() == Some("PersistentVolumeClaimUnsupported")
            && st
                .message
                .as_deref()
                .is_some_and(|m| m.contains("PersistentVolumeClaims"))
        {
            Ok(())
        } else {
            Err(format!("{st:?}"))
        }
    })
    .await;
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    eventually("the refusal Event", Duration::from_secs(10), || async {
        let list = events
            .list(&Default::default())
            .await
            .map_err(|e| e.to_string())?;
        list.items
            .iter()
            .find(|e| {
                e.involved_object.name.as_deref() == Some("needs-pvc")
                    && e.reason.as_deref() == Some("PersistentVolumeClaimUnsupported")
            })
            .map(drop)
            .ok_or_else(|| format!("{} events", list.items.len()))
    })
    .await;
    // A writer with an older view of the pod (a kubelet's status write decided before the
    // refusal) overwrites it: the controller writes the refusal again.
    pods.patch_status(
        "needs-pvc",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(json!({ "status": { "phase": "Pending", "reason": null,
            "message": null, "conditions": [{ "type": "Ready", "status": "False" }] } })),
    )
    .await
    .unwrap();
    eventually(
        "the refusal written again",
        Duration::from_secs(30),
        || async {
            let p = pods.get("needs-pvc").await.map_err(|e| e.to_string())?;
            let st = p.status.unwrap_or_default();
            (st.phase.as_deref() == Some("Failed")
                && st.reason.as_deref() == Some("PersistentVolumeClaimUnsupported"))
            .then_some(())
            .ok_or_else(|| format!("{st:?}"))
        },
    )
    .await;
    // Nothing of it reached the device: no resource in its manifest (where web's are) and
    // no container in podman (where web's is).
    let m = env.desired_manifest("pi-pods").await.unwrap().unwrap();
    let owners: Vec<&str> = m.resources.iter().map(|r| r.owner.name.as_str()).collect();
    assert!(owners.contains(&"web"), "{owners:?}");
    assert!(!owners.contains(&"needs-pvc"), "{owners:?}");
    // Every container on the device belongs to a resource of that manifest.
    let resources: Vec<String> = m.resources.iter().map(|r| r.id.to_string()).collect();
    let containers = pm
        .podman(&[
            "ps",
            "-a",
            "--filter",
            "label=dev.fleetlet.device=pi-pods",
            "--format",
            "{{index .Labels \"dev.fleetlet.resource\"}}",
        ])
        .unwrap();
    assert!(!containers.trim().is_empty(), "web's container is there");
    for c in containers.lines() {
        assert!(resources.iter().any(|r| r == c), "{c} not in {resources:?}");
    }

    // The device goes silent (its own grace: 10 s): its Pod turns Ready=False and stays
    // Running there; deleted, it stays Terminating until the device has removed it.
    Api::<fleetlet_crds::EdgeDevice>::namespaced(client.clone(), "default")
        .patch(
            "pi-pods",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({ "spec": { "heartbeatGraceSeconds": 10 } })),
        )
        .await
        .unwrap();
    let mut fleet = fleet;
    fleet.services[0].stop();
    let unready = eventually("web Ready=False", Duration::from_secs(30), || async {
        let p = pods.get("web").await.map_err(|e| e.to_string())?;
        let st = p.status.clone().unwrap_or_default();
        let cond = st
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "Ready")
            .map(|c| c.status.clone());
        (cond.as_deref() == Some("False"))
            .then_some(st)
            .ok_or(format!("{cond:?}"))
    })
    .await;
    assert_eq!(unready.phase.as_deref(), Some("Running"));
    let running = pm
        .podman(&[
            "ps",
            "-q",
            "--filter",
            "label=dev.fleetlet.device=pi-pods",
            "--filter",
            "status=running",
        ])
        .unwrap();
    assert!(!running.trim().is_empty(), "the container runs on");
    pods.delete("web", &Default::default()).await.unwrap();
    // The bridge keeps working meanwhile (it wrote Ready=False above, and the Node's
    // Unknown); the Pod waits for the device.
    eventually("the Node Unknown", Duration::from_secs(30), || async {
        let n = nodes.get("pi-pods").await.map_err(|e| e.to_string())?;
        let ready = n
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .map(|c| c.status)
            .unwrap_or_default();
        (ready == "Unknown").then_some(()).ok_or(ready)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let waiting = pods.get("web").await.unwrap();
    assert!(waiting.metadata.deletion_timestamp.is_some(), "Terminating");
    let agent_dir = fleet.dir.path().join("agent");
    let _agent = Service::spawn(
        "fleetlet-agent",
        &components::bin_dir().unwrap().join("fleetlet-agent"),
        &[
            "--config".into(),
            agent_dir.join("agent.toml").display().to_string(),
        ],
        agent_dir.join("agent-restarted.log"),
    )
    .unwrap();

    // Back, the device removes the container, then the bridge removes the pod object.
    eventually(
        "the pod gone from the apiserver",
        Duration::from_secs(60),
        || async {
            match pods.get_opt("web").await.map_err(|e| e.to_string())? {
                None => Ok(()),
                Some(p) => Err(format!("still there: {:?}", p.metadata.deletion_timestamp)),
            }
        },
    )
    .await;
    let left = pm
        .podman(&[
            "ps",
            "-a",
            "--filter",
            "label=dev.fleetlet.device=pi-pods",
            "--format",
            "{{.Names}}",
        ])
        .unwrap();
    assert_eq!(left.trim(), "", "the container is gone from the device");
}

/// `kubectl exec` and `attach` where the apiserver speaks SPDY/3.1 to the kubelet API, as
/// 1.34 and 1.35 always do and 1.36+ does for a node that does not declare WebSockets: both
/// when the apiserver translates kubectl's WebSocket into SPDY and when kubectl itself
/// speaks SPDY (proxied through). Output, stdin, stderr, exit codes, a terminal and its
/// size, and a megabyte of output intact.
#[tokio::test]
async fn exec_and_attach_speak_spdy_to_an_apiserver_that_does_not_proxy_websockets() {
    let env = TestEnv::builder().kube().nats().start().await.unwrap();
    let pm = PodmanSandbox::start().await.unwrap();
    let metrics_port = free_port().unwrap();
    let metrics_flag = format!("--metrics-addr=127.0.0.1:{metrics_port}");
    let fleet = PodFleet::start(
        &env,
        &pm,
        "pi-spdy",
        false,
        &["--kubelet-websockets=false", &metrics_flag],
    )
    .await
    .unwrap();
    let node = fleet.nodes.get("pi-spdy").await.unwrap();
    assert_eq!(
        node.status.unwrap().declared_features.unwrap_or_default(),
        Vec::<String>::new(),
        "the node must not declare WebSockets, or the apiserver would not speak SPDY"
    );
    let pods: Api<Pod> = Api::namespaced(fleet.client.clone(), "default");
    let ticker = pod(
        "ticker",
        "pi-spdy",
        json!({ "containers": [{
            "name": "main", "image": pm.image_1,
            "command": ["/bin/sh", "-c", "echo main > /tmp/me; i=0; while true; do echo tick $i; i=$((i+1)); sleep 1; done"]
        }, {
            "name": "side", "image": pm.image_1,
            "command": ["/bin/sh", "-c", "echo side > /tmp/me; exec sleep 3600"]
        }] }),
    );
    pods.create(&PostParams::default(), &ticker).await.unwrap();
    // Restarts once: its first run exits 1, the second stays up.
    let crasher = pod(
        "crasher",
        "pi-spdy",
        json!({ "restartPolicy": "Always", "containers": [{
            "name": "main", "image": pm.image_1,
            "command": ["/bin/sh", "-c", "n=$(( $(cat /tmp/n 2>/dev/null || echo 0) + 1 )); echo $n > /tmp/n; echo run-$n; [ $n -ge 2 ] || exit 1; exec sleep 3600"]
        }] }),
    );
    pods.create(&PostParams::default(), &crasher).await.unwrap();
    wait_running(&pods, "ticker", Duration::from_secs(60)).await;

    let spdy_count = |subresource: &str| {
        let text = http_get(metrics_port, "/metrics").unwrap_or_default();
        let metric = |protocol: &str| {
            text.lines()
                .find(|l| {
                    l.starts_with("fleetlet_bridge_kubelet_streams_total{")
                        && l.contains(&format!("subresource=\"{subresource}\""))
                        && l.contains(&format!("protocol=\"{protocol}\""))
                })
                .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .unwrap_or(0)
        };
        (metric("spdy"), metric("websocket"))
    };
    // kubectl's default (WebSocket to the apiserver, translated), then SPDY all the way.
    for (how, kubectl_spdy) in [("translated", false), ("proxied", true)] {
        let kubectl = |args: &[&str], stdin: Option<&[u8]>| {
            let mut cmd = env.kubectl().unwrap();
            if kubectl_spdy {
                cmd.env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false");
            }
            let mut child = cmd
                .args(args)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let mut input = child.stdin.take().unwrap();
            if let Some(bytes) = stdin {
                input.write_all(bytes).unwrap();
            }
            drop(input);
            let out = child.wait_with_output().unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        };
        let before = spdy_count("exec");
        let (code, out, err) = kubectl(&["exec", "ticker", "--", "echo", "hi"], None);
        assert_eq!((code, out.as_str()), (Some(0), "hi\n"), "{how}: {err}");
        let (code, out, err) = kubectl(
            &[
                "exec",
                "ticker",
                "--",
                "sh",
                "-c",
                "echo out; echo err >&2; exit 3",
            ],
            None,
        );
        assert_eq!(code, Some(3), "{how}: the exit code comes back: {err}");
        assert_eq!(out, "out\n", "{how}");
        assert!(
            err.contains("err\n"),
            "{how}: stderr on its own stream: {err}"
        );
        let (code, out, err) = kubectl(
            &["exec", "-i", "ticker", "--", "sh", "-c", "cat; echo done"],
            Some(b"through stdin\n"),
        );
        assert_eq!(
            (code, out.as_str()),
            (Some(0), "through stdin\ndone\n"),
            "{how}: stdin, then its end: {err}"
        );
        let (code, out, err) = kubectl(&["exec", "ticker", "--", "seq", "1", "200000"], None);
        let expected: String = (1..=200_000).map(|i| format!("{i}\n")).collect();
        assert_eq!(code, Some(0), "{how}: {err}");
        assert!(out.len() > 1 << 20, "{}", out.len());
        assert!(
            out == expected,
            "{how}: {} bytes of output, not as sent",
            out.len()
        );
        let after = spdy_count("exec");
        assert_eq!(after.0 - before.0, 4, "{how}: four exec sessions over SPDY");
        assert_eq!(after.1, 0, "{how}: none over WebSockets");
        compat::passed(
            &format!("SPDY, {how}: exec (stdout, stderr, stdin, exit code, 1.3 MB intact)"),
            "",
        );

        // A terminal, sized by the client.
        let kubectl_bin = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
        let mut out = std::process::Command::new("script")
            .args([
                "-qec",
                &format!("stty cols 97 rows 31; {kubectl_bin} exec -it ticker -- sh -c '[ -t 1 ] && stty size'"),
                "/dev/null",
            ])
            .env("KUBECONFIG", env.kubeconfig().unwrap())
            .env(
                "KUBECTL_REMOTE_COMMAND_WEBSOCKETS",
                if kubectl_spdy { "false" } else { "true" },
            )
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The terminal's input stays open until the command is done, as a person's would:
        // an input that ends at once sends ^D into a command that may already be gone.
        let input = out.stdin.take();
        let mut text = String::new();
        out.stdout
            .take()
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        let _ = out.wait();
        drop(input);
        let out = text;
        assert!(
            out.contains("31 97"),
            "{how}: a terminal of the client's size: {out:?}"
        );
        compat::passed(
            &format!("SPDY, {how}: exec `-it` with the terminal's size"),
            "",
        );

        // attach: the main process's output, live.
        let mut cmd = env.kubectl().unwrap();
        if kubectl_spdy {
            cmd.env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false");
        }
        let mut attached = cmd
            .args(["attach", "ticker"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let rx = output_of(&mut attached);
        let mut seen = String::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while seen.matches("tick ").count() < 2 {
            assert!(
                Instant::now() < deadline,
                "{how}: no ticks through attach: {seen:?}"
            );
            if let Ok(chunk) = rx.recv_timeout(Duration::from_millis(300)) {
                seen.push_str(&chunk);
            }
        }
        let _ = attached.kill();
        let _ = attached.wait();
        assert!(spdy_count("attach").0 >= 1, "{how}: attach over SPDY");
        compat::passed(&format!("SPDY, {how}: attach"), "");
    }

    // A named container, and the default one (the first).
    let kubectl_out = |args: &[&str]| {
        let out = env.kubectl().unwrap().args(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (_, me, err) = kubectl_out(&["exec", "ticker", "-c", "side", "--", "cat", "/tmp/me"]);
    assert_eq!(me, "side\n", "{err}");
    let (_, me, err) = kubectl_out(&["exec", "ticker", "--", "cat", "/tmp/me"]);
    assert_eq!(me, "main\n", "{err}");
    compat::passed("exec `-c` (a named container)", "");
    // kubectl cp both ways (tar through exec).
    let dir = tempfile::tempdir().unwrap();
    let sent: Vec<u8> = (0..4u32 << 20)
        .flat_map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes())
        .collect();
    std::fs::write(dir.path().join("up.bin"), &sent).unwrap();
    let up = dir.path().join("up.bin").display().to_string();
    let (code, _, err) = kubectl_out(&["cp", &up, "ticker:/tmp/up.bin", "-c", "side"]);
    assert_eq!(code, Some(0), "kubectl cp to the pod: {err}");
    let down = dir.path().join("down.bin").display().to_string();
    let (code, _, err) = kubectl_out(&["cp", "ticker:/tmp/up.bin", &down, "-c", "side"]);
    assert_eq!(code, Some(0), "kubectl cp from the pod: {err}");
    assert!(
        std::fs::read(&down).unwrap() == sent,
        "16 MiB copied there and back intact"
    );
    compat::passed("cp (16 MiB there and back)", "");
    // logs --previous: refused before a restart, the earlier run's output after one.
    let (code, _, err) = kubectl_out(&["logs", "ticker", "--previous"]);
    assert_ne!(code, Some(0));
    assert!(err.contains("previous terminated container"), "{err}");
    eventually(
        "crasher restarted once",
        Duration::from_secs(60),
        || async {
            let p = pods.get("crasher").await.map_err(|e| e.to_string())?;
            let st = p.status.unwrap_or_default();
            let restarts = st
                .container_statuses
                .iter()
                .flatten()
                .map(|c| c.restart_count)
                .sum::<i32>();
            (restarts >= 1 && st.phase.as_deref() == Some("Running"))
                .then_some(())
                .ok_or(format!("{restarts} restarts, {:?}", st.phase))
        },
    )
    .await;
    let all = eventually("both runs logged", Duration::from_secs(30), || async {
        let (_, all, _) = kubectl_out(&["logs", "crasher"]);
        (all.lines().count() == 2).then_some(all.clone()).ok_or(all)
    })
    .await;
    let (code, previous, err) = kubectl_out(&["logs", "crasher", "--previous"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(all, "run-1\nrun-2\n");
    let agent_log = std::fs::read_to_string(fleet.dir.path().join("agent/agent.log")).unwrap();
    let context: Vec<&str> = agent_log
        .lines()
        .filter(|l| l.contains("previous logs") || l.contains("starting container"))
        .collect();
    let podman_log: Vec<String> = context
        .iter()
        .filter_map(|l| l.split("log_file=Some(\"").nth(1)?.split('"').next())
        .map(|path| std::fs::read_to_string(path).unwrap_or_default())
        .collect();
    assert_eq!(
        previous, "run-1\n",
        "the first run only: {context:#?} {podman_log:#?}"
    );
    compat::passed("logs `--previous`", "");

    // port-forward, translated from kubectl's WebSocket and with kubectl speaking SPDY.
    pods.create(
        &PostParams::default(),
        &port_forward_pod(&pm.image_1, "pi-spdy", 20).unwrap(),
    )
    .await
    .unwrap();
    wait_running(&pods, "pf", Duration::from_secs(60)).await;
    for spdy_client in [false, true] {
        let before = spdy_count("portforward");
        let (up, down) = port_forward_both_ways(&env, spdy_client).await;
        eprintln!(
            "port-forward over SPDY (kubectl SPDY: {spdy_client}): {up:.1} MiB/s up, {down:.1} MiB/s down"
        );
        let after = spdy_count("portforward");
        assert!(after.0 > before.0, "port-forward over SPDY");
        assert_eq!(after.1, 0, "none over WebSockets");
        let how = if spdy_client { "proxied" } else { "translated" };
        compat::passed(
            &format!("SPDY, {how}: port-forward (20 MiB each way, checksums)"),
            "",
        );
    }
}

/// `kubectl port-forward` to the pod `pf`: 20 MiB each way, checked; MiB/s up and down.
async fn port_forward_both_ways(env: &TestEnv, spdy_client: bool) -> (f64, f64) {
    let t = port_forward_transfer(env, spdy_client, 20).await.unwrap();
    let mib_s = |d: Duration| 20.0 / d.as_secs_f64();
    (mib_s(t.up), mib_s(t.down))
}

fn ready(p: &Pod) -> bool {
    p.status.as_ref().is_some_and(|s| {
        s.phase.as_deref() == Some("Running")
            && s.conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

/// Deployments and DaemonSets as users write them: the scheduler places the pod on the
/// virtual node (toleration + nodeSelector), it runs on the device, and deleting the
/// Deployment removes it there. DaemonSets without the toleration place nothing.
#[tokio::test]
async fn deployments_run_on_devices_and_daemonsets_without_the_toleration_stay_off() {
    use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
    let env = TestEnv::builder()
        .controllers()
        .nats()
        .start()
        .await
        .unwrap();
    let pm = PodmanSandbox::start().await.unwrap();
    let fleet = PodFleet::start(&env, &pm, "pi-work", true, &[])
        .await
        .unwrap();
    let client = fleet.client.clone();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let template = |app: &str, tolerate: bool| {
        let mut spec = json!({
            "containers": [{
                "name": "main", "image": pm.image_1,
                "readinessProbe": { "exec": { "command": ["true"] }, "periodSeconds": 1 }
            }],
        });
        if tolerate {
            spec["tolerations"] = json!([{ "key": "fleetlet.dev/edge", "operator": "Exists" }]);
            spec["nodeSelector"] = json!({ "fleetlet.dev/device": "pi-work" });
        }
        json!({ "metadata": { "labels": { "app": app } }, "spec": spec })
    };
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    deployments
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": { "name": "hello" },
                "spec": { "replicas": 1, "selector": { "matchLabels": { "app": "hello" } },
                          "template": template("hello", true) }
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let by_app = |app: &'static str| {
        let pods = pods.clone();
        async move {
            pods.list(&kube::api::ListParams::default().labels(&format!("app={app}")))
                .await
                .map(|l| l.items)
                .map_err(|e| e.to_string())
        }
    };
    let hello = eventually(
        "the Deployment's pod Ready on pi-work",
        Duration::from_secs(90),
        || async {
            let list = by_app("hello").await?;
            match list.as_slice() {
                [p] if ready(p) => Ok(p.clone()),
                other => Err(format!(
                    "{:?}",
                    other
                        .iter()
                        .map(|p| (&p.spec.as_ref().unwrap().node_name, &p.status))
                        .collect::<Vec<_>>()
                )),
            }
        },
    )
    .await;
    assert_eq!(
        hello.spec.as_ref().unwrap().node_name.as_deref(),
        Some("pi-work")
    );
    let running = pm
        .podman(&[
            "ps",
            "--filter",
            "label=dev.fleetlet.device=pi-work",
            "--format",
            "{{.Names}}",
        ])
        .unwrap();
    assert_eq!(running.lines().count(), 1, "{running}");
    compat::passed("Deployment scheduled onto a virtual node", "");
    // The kubelet API's certificate came from a CSR the bridge filed and approved and the
    // controller-manager signed; the apiserver verified it to relay this exec.
    let out = env
        .kubectl()
        .unwrap()
        .args([
            "exec",
            &hello.metadata.name.clone().unwrap(),
            "--",
            "cat",
            "/etc/fleetlet-version",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "1\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    compat::passed("kubelet serving certificate from a CSR", "");
    let csrs: Api<k8s_openapi::api::certificates::v1::CertificateSigningRequest> =
        Api::all(client.clone());
    let issued = csrs.list(&Default::default()).await.unwrap().items;
    assert!(
        issued
            .iter()
            .any(|c| c.spec.signer_name == "kubernetes.io/kubelet-serving"
                && c.status.as_ref().is_some_and(|s| s.certificate.is_some())),
        "{issued:?}"
    );

    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), "default");
    for (name, tolerate) in [("plain", false), ("edge", true)] {
        let mut t = template(name, tolerate);
        if tolerate {
            t["spec"].as_object_mut().unwrap().remove("nodeSelector");
        }
        daemonsets
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "metadata": { "name": name },
                    "spec": { "selector": { "matchLabels": { "app": name } }, "template": t }
                }))
                .unwrap(),
            )
            .await
            .unwrap();
    }
    // The tolerating DaemonSet lands on the virtual node and runs on the device ...
    eventually(
        "the tolerating DaemonSet's pod Ready",
        Duration::from_secs(60),
        || async {
            let list = by_app("edge").await?;
            match list.as_slice() {
                [p] if ready(p) => Ok(()),
                other => Err(format!("{} pods", other.len())),
            }
        },
    )
    .await;
    // ... while the other, synced by the same controller, places nothing there.
    let plain = eventually(
        "the plain DaemonSet synced",
        Duration::from_secs(30),
        || async {
            let ds = daemonsets.get("plain").await.map_err(|e| e.to_string())?;
            let st = ds.status.clone().unwrap_or_default();
            if st.observed_generation == Some(1) {
                Ok(st)
            } else {
                Err(format!("{st:?}"))
            }
        },
    )
    .await;
    assert_eq!(plain.desired_number_scheduled, 0);
    assert!(by_app("plain").await.unwrap().is_empty());

    // Deleting the Deployment: garbage collection deletes the pod, the device removes the
    // container, and the bridge lets the pod go.
    deployments
        .delete("hello", &kube::api::DeleteParams::background())
        .await
        .unwrap();
    eventually(
        "the Deployment's pod gone",
        Duration::from_secs(90),
        || async {
            let list = by_app("hello").await?;
            if list.is_empty() {
                Ok(())
            } else {
                Err(format!("{} left", list.len()))
            }
        },
    )
    .await;
    let left = pm
        .podman(&[
            "ps",
            "-a",
            "--filter",
            "label=dev.fleetlet.device=pi-work",
            "--format",
            "{{.Names}}",
        ])
        .unwrap();
    assert_eq!(
        left.lines().count(),
        1,
        "only the DaemonSet's container remains: {left}"
    );
}

/// `kubectl top node` and `kubectl top pod` for a fleetlet node, through a real
/// metrics-server registered with the apiserver's aggregation layer: it scrapes the node's
/// own kubelet port on the bridge, which asks the device's agent (podman for the
/// containers, /proc for the device).
#[tokio::test]
async fn kubectl_top_shows_the_device_and_its_pods_through_a_real_metrics_server() {
    let env = TestEnv::builder()
        .controllers()
        .nats()
        .start()
        .await
        .unwrap();
    let pm = PodmanSandbox::start().await.unwrap();
    let node_port = free_port().unwrap();
    let ports_flag = format!("--kubelet-node-ports={node_port}-{node_port}");
    let mut fleet = PodFleet::start(&env, &pm, "pi-top", false, &[ports_flag.as_str()])
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(fleet.client.clone(), "default");
    pods.create(
        &PostParams::default(),
        &pod(
            "burner",
            "pi-top",
            json!({ "containers": [
                { "name": "burn", "image": pm.image_1, "command": ["sh", "-c", "while :; do :; done"] },
                { "name": "idle", "image": pm.image_1 }
            ]}),
        ),
    )
    .await
    .unwrap();
    wait_running(&pods, "burner", Duration::from_secs(90)).await;
    // The Node advertises its own port, and the bridge serves it.
    let node = fleet.nodes.get("pi-top").await.unwrap();
    let advertised = node
        .status
        .and_then(|s| s.daemon_endpoints)
        .and_then(|d| d.kubelet_endpoint)
        .map(|k| k.port);
    assert_eq!(advertised, Some(i32::from(node_port)));

    // The figures themselves, as a kubelet serves them: nodes/metrics decides who may read.
    let pki = fleet.pki.clone();
    let curl = |path: &str, user: &str| {
        let out = std::process::Command::new("curl")
            .args(["-s", "-w", "\n%{http_code}", "--cacert"])
            .arg(pki.join("ca.crt"))
            .arg("--cert")
            .arg(pki.join(format!("{user}.crt")))
            .arg("--key")
            .arg(pki.join(format!("{user}.key")))
            .arg(format!("https://127.0.0.1:{node_port}{path}"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", ""));
        (code.to_owned(), body.to_owned())
    };
    let (code, body) = curl("/metrics/resource", "nobody");
    assert_eq!(code, "403", "{body}");
    assert!(!body.contains("node_cpu_usage_seconds_total"), "{body}");
    let (code, body) = curl("/stats/summary", "nobody");
    assert_eq!(code, "403", "{body}");
    let (code, body) = curl("/metrics/resource", "admin");
    assert_eq!(code, "200", "{body}");
    let value = |name: &str| -> f64 {
        body.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{body}"))
    };
    assert!(value("node_cpu_usage_seconds_total ") > 0.0);
    assert!(value("node_memory_working_set_bytes ") > 0.0);
    let burn = "container_cpu_usage_seconds_total{container=\"burn\",namespace=\"default\",pod=\"burner\"}";
    assert!(value(burn) > 0.0);
    // The Summary API (the apiserver's node proxy refuses loopback addresses, so asked
    // directly, as the apiserver would).
    let (code, body_summary) = curl("/stats/summary", "admin");
    assert_eq!(code, "200", "{body_summary}");
    let summary: serde_json::Value = serde_json::from_str(&body_summary).unwrap();
    assert_eq!(summary["node"]["nodeName"], "pi-top");
    let burner = summary["pods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["podRef"]["name"] == "burner")
        .unwrap_or_else(|| panic!("no burner in {summary}"));
    assert_eq!(burner["containers"].as_array().unwrap().len(), 2);

    // A real metrics-server, registered through the aggregation layer.
    let bins = fleetlet_testenv::Binaries::locate().unwrap();
    let ms = fleetlet_testenv::metrics_server::MetricsServer::start(
        bins,
        env.kube.as_ref().unwrap(),
        &fleet.dir.path().join("metrics-server"),
    )
    .await
    .unwrap();
    let top = |args: &[&str]| {
        let out = env
            .kubectl()
            .unwrap()
            .arg("top")
            .args(args)
            .arg("--no-headers")
            .output()
            .unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    };
    // "pi-top   1003m   50%   312Mi   1%"
    let millicores = |cell: &str| -> u64 {
        cell.strip_suffix('m')
            .map(|m| m.parse().unwrap())
            .unwrap_or_else(|| cell.parse::<u64>().unwrap() * 1000)
    };
    let node_row = eventually(
        "kubectl top node pi-top",
        Duration::from_secs(90),
        || async { top(&["node", "pi-top"]) },
    )
    .await;
    let cells: Vec<&str> = node_row.split_whitespace().collect();
    assert_eq!(cells.first(), Some(&"pi-top"), "{node_row}");
    assert!(millicores(cells[1]) > 0, "{node_row}");
    assert!(
        cells[3].ends_with("Mi") || cells[3].ends_with("Gi"),
        "{node_row}"
    );
    // The busy container shows its CPU; the idle one next to it does not.
    let rows = eventually(
        "kubectl top pod burner --containers with the busy loop's CPU",
        Duration::from_secs(90),
        || async {
            let rows = top(&["pod", "burner", "--containers"])?;
            let cpu = |c: &str| {
                rows.lines()
                    .map(|l| l.split_whitespace().collect::<Vec<_>>())
                    .find(|cells| cells.get(1) == Some(&c))
                    .map(|cells| millicores(cells[2]))
            };
            match (cpu("burn"), cpu("idle")) {
                (Some(b), Some(i)) if b >= 200 && i < 50 => Ok(rows),
                _ => Err(rows),
            }
        },
    )
    .await;
    assert!(rows.contains("burner"), "{rows}");
    compat::passed("top node, top pod (metrics-server)", "");
    // The figures are sampled on each request: the busy loop has used more CPU since.
    let before = value(burn);
    let (_, later) = curl("/metrics/resource", "admin");
    let after: f64 = later
        .lines()
        .find(|l| l.starts_with(burn))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(after > before, "{before} → {after}");
    eprintln!("kubectl top node:\n{node_row}kubectl top pod --containers:\n{rows}");
    // With the device gone quiet, a scrape gets a clear answer, not a hang.
    drop(fleet.services.remove(0)); // the agent
    let started = Instant::now();
    let (code, body) = curl("/metrics/resource", "admin");
    assert_eq!(code, "503", "{body}");
    assert!(body.contains("did not answer"), "{body}");
    assert!(started.elapsed() < Duration::from_secs(15));
    drop(ms);
}
