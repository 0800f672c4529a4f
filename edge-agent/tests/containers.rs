//! The agent's Container reconciler against a real podman (REST API, `scripts/podman-sandbox`)
//! pulling from a real OCI registry on loopback, driven through real NATS.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod common;

use std::{
    io::{Read, Write},
    time::Duration,
};

use common::*;
use fleetlet_protocol::{
    AgentStatus, ContainerLimits, ContainerSpec, ManagedResource, PortMapping, Probe, ProbeAction,
    PullPolicy, ResourceDetails, ResourceSpec, ResourceStatus,
};
use fleetlet_testenv::{TestEnv, process::free_port, sandbox::PodmanSandbox};

fn device(name: &str, pm: &PodmanSandbox, extra: &str) -> Device {
    let mut dev = Device::new(name);
    dev.sections = format!(
        "[container]\nsocket = \"{}\"\nname_prefix = \"{name}-\"\ninsecure_registries = [\"{}\"]\nstop_timeout_seconds = 1\n{extra}\n",
        pm.socket.display(),
        pm.registry
    );
    dev
}

fn container(id: &str, spec: ContainerSpec) -> ManagedResource {
    let mut r = file_at(id, "/unused", "");
    r.spec = ResourceSpec::Container(spec);
    r
}

/// busybox httpd serving `/www` on 8080 inside, published on `port` on loopback.
fn web(image: &str, port: u16) -> ContainerSpec {
    ContainerSpec {
        image: image.into(),
        command: vec!["/bin/sh".into(), "-c".into()],
        args: vec![
            "mkdir -p /www && cat /etc/fleetlet-version > /www/index.html && echo \"$GREETING\" >> /www/index.html && exec httpd -f -p 8080 -h /www".into(),
        ],
        env: vec![fleetlet_protocol::EnvVar {
            name: "GREETING".into(),
            value: "hello from fleetlet".into(),
            sealed_value: None,
        }],
        ports: vec![PortMapping {
            container_port: 8080,
            host_port: Some(port),
            protocol: Default::default(),
            host_ip: Some("127.0.0.1".into()),
        }],
        limits: Some(ContainerLimits {
            memory_bytes: Some(64 * 1024 * 1024),
            cpu_millis: Some(500),
        }),
        probe: Some(Probe {
            action: ProbeAction::Http {
                port,
                path: "/".into(),
            },
            period_seconds: 1,
            failure_threshold: 2,
        }),
        ..Default::default()
    }
}

/// GET / on loopback, body only.
fn http_get(port: u16) -> Result<String, String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    Ok(out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned())
}

struct Seen {
    id: String,
    digest: Option<String>,
    state: String,
    probe_ready: Option<bool>,
    restarts: u32,
}

fn seen(s: &AgentStatus, id: &str) -> Seen {
    match &s.resources[id] {
        ResourceStatus::Ready {
            details:
                ResourceDetails::Container {
                    container_id,
                    image_digest,
                    state,
                    probe_ready,
                    restart_count,
                    ..
                },
            ..
        } => Seen {
            id: container_id.clone(),
            digest: image_digest.clone(),
            state: state.clone(),
            probe_ready: *probe_ready,
            restarts: *restart_count,
        },
        other => panic!("{id}: {other:?}"),
    }
}

fn ready_container(s: &AgentStatus, id: &str) -> bool {
    s.resources.get(id).is_some_and(ResourceStatus::is_ready)
}

/// Images in the sandbox's storage, as `repository:tag`.
fn images(pm: &PodmanSandbox) -> Vec<String> {
    pm.podman(&["images", "--format", "{{.Repository}}:{{.Tag}}"])
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Names of containers in the sandbox carrying fleetlet's device label.
fn ours(pm: &PodmanSandbox, device: &str) -> Vec<String> {
    pm.podman(&[
        "ps",
        "-a",
        "--filter",
        &format!("label=dev.fleetlet.device={device}"),
        "--format",
        "{{.Names}}",
    ])
    .unwrap()
    .lines()
    .map(|name| {
        let state = pm
            .podman(&["inspect", name, "--format", "{{.State.Status}}"])
            .unwrap();
        format!("{name} {}", state.trim())
    })
    .collect()
}

#[tokio::test]
async fn containers_are_pulled_created_updated_and_deleted_and_a_failed_pull_keeps_the_old_one() {
    let env = TestEnv::builder().nats().start().await.unwrap();
    let pm = PodmanSandbox::start().await.unwrap();
    let (desired, actual, _) = buckets(&env).await;
    let dev = device("pi-web", &pm, "");
    let _agent = dev.start(env.nats_url().unwrap(), "");
    let port = free_port().unwrap();

    put(
        &desired,
        &dev.manifest(1, vec![container("web", web(&pm.image_1, port))]),
    )
    .await;
    let s = wait_status(&actual, &dev.id, "web ready", |s| all_ready(s, 1, 1)).await;
    let v1 = seen(&s, "web");
    assert_eq!(v1.state, "running");
    assert_eq!(v1.probe_ready, Some(true));
    assert!(
        v1.digest
            .as_deref()
            .is_some_and(|d| d.starts_with("sha256:")),
        "{:?}",
        v1.digest
    );
    let body = http_get(port).unwrap();
    assert!(
        body.starts_with('1') && body.contains("hello from fleetlet"),
        "{body:?}"
    );
    assert_eq!(ours(&pm, "pi-web"), vec!["pi-web-web running".to_string()]);
    let inspect = pm
        .podman(&[
            "inspect",
            "pi-web-web",
            "--format",
            "{{.HostConfig.Memory}} {{.HostConfig.CpuQuota}} {{.HostConfig.RestartPolicy.Name}}",
        ])
        .unwrap();
    assert_eq!(inspect.trim(), "67108864 50000 always");

    // A new tag: pulled, then the container is replaced.
    put(
        &desired,
        &dev.manifest(2, vec![container("web", web(&pm.image_2, port))]),
    )
    .await;
    let s = wait_status(&actual, &dev.id, "web on image 2", |s| all_ready(s, 2, 1)).await;
    let v2 = seen(&s, "web");
    assert_ne!(v2.id, v1.id);
    assert_ne!(v2.digest, v1.digest);
    assert!(http_get(port).unwrap().starts_with('2'));
    assert_eq!(ours(&pm, "pi-web").len(), 1);
    // The first image was pulled by the agent and is no longer used: pruned.
    let present = images(&pm);
    assert!(!present.contains(&pm.image_1), "{present:?}");
    assert!(present.contains(&pm.image_2), "{present:?}");

    // A tag that does not exist: the pull fails, the running container stays.
    let missing = format!("{}/fleetlet/busybox:does-not-exist", pm.registry);
    put(
        &desired,
        &dev.manifest(3, vec![container("web", web(&missing, port))]),
    )
    .await;
    let s = wait_status(&actual, &dev.id, "pull failure reported", |s| {
        s.observed_generation == 3 && matches!(s.resources["web"], ResourceStatus::Failed { .. })
    })
    .await;
    let ResourceStatus::Failed {
        error, retry_after, ..
    } = &s.resources["web"]
    else {
        unreachable!()
    };
    assert!(error.contains("image not found"), "{error}");
    assert!(retry_after.is_some());
    assert_eq!(ours(&pm, "pi-web"), vec!["pi-web-web running".to_string()]);
    assert!(
        http_get(port).unwrap().starts_with('2'),
        "the old container still serves"
    );

    // Removed from the manifest: container gone, its image pruned.
    put(&desired, &dev.manifest(4, vec![])).await;
    wait_status(&actual, &dev.id, "web deleted", |s| {
        s.observed_generation == 4 && s.resources.is_empty()
    })
    .await;
    assert!(ours(&pm, "pi-web").is_empty());
    assert!(images(&pm).is_empty(), "{:?}", images(&pm));
}

#[tokio::test]
async fn containers_stopped_or_removed_by_hand_come_back_and_the_drift_is_counted() {
    let env = TestEnv::builder().nats().start().await.unwrap();
    let pm = PodmanSandbox::start().await.unwrap();
    let (desired, actual, _) = buckets(&env).await;
    let dev = device("pi-drift", &pm, "");
    let mut agent = dev.start(env.nats_url().unwrap(), "");
    let sleeper = ContainerSpec {
        image: pm.image_1.clone(),
        image_pull_policy: PullPolicy::Always,
        ..Default::default()
    };
    put(&desired, &dev.manifest(1, vec![container("app", sleeper)])).await;
    let s = wait_status(&actual, &dev.id, "app ready", |s| all_ready(s, 1, 1)).await;
    let first = seen(&s, "app").id;

    pm.podman(&["stop", "-t", "0", "pi-drift-app"]).unwrap();
    let s = wait_status(&actual, &dev.id, "restarted", |s| {
        s.drift_repairs >= 1 && ready_container(s, "app")
    })
    .await;
    assert_eq!(
        seen(&s, "app").id,
        first,
        "a stopped container is started, not replaced"
    );
    let drift = s.last_drift.unwrap();
    assert!(
        drift.reason.contains("exited") || drift.reason.contains("stopped"),
        "{}",
        drift.reason
    );

    pm.podman(&["rm", "-f", "-t", "0", "pi-drift-app"]).unwrap();
    let s = wait_status(&actual, &dev.id, "recreated", |s| {
        s.drift_repairs >= 2 && ready_container(s, "app")
    })
    .await;
    let second = seen(&s, "app").id;
    assert_ne!(second, first);
    assert_eq!(s.last_drift.unwrap().reason, "absent");

    // An agent restart keeps the container: ownership is on the container's labels.
    agent.stop();
    let agent = dev.start(env.nats_url().unwrap(), "");
    // Compare what the restarted agent saw in its first pass, not the status it left.
    fleetlet_testenv::wait::file_contains(
        &agent.log,
        "pass done trigger=\"start\"",
        fleetlet_testenv::DEFAULT_TIMEOUT,
    )
    .await;
    let s = wait_status(&actual, &dev.id, "after restart", |s| {
        ready_container(s, "app")
    })
    .await;
    assert_eq!(seen(&s, "app").id, second);
    assert_eq!(seen(&s, "app").restarts, 0);
    assert_eq!(ours(&pm, "pi-drift").len(), 1);
}

#[tokio::test]
async fn foreign_containers_busy_ports_failing_probes_and_the_disk_guard() {
    let env = TestEnv::builder().nats().start().await.unwrap();
    let pm = PodmanSandbox::start().await.unwrap();
    let (desired, actual, _) = buckets(&env).await;

    // A container the agent did not create, under the name it would use.
    pm.podman(&["pull", "--tls-verify=false", &pm.image_1])
        .unwrap();
    pm.podman(&["run", "-d", "--name", "pi-guard-taken", &pm.image_1])
        .unwrap();
    // A host port someone else holds.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port();
    let probe_port = free_port().unwrap();

    let dev = device("pi-guard", &pm, "");
    let _agent = dev.start(env.nats_url().unwrap(), "");
    let mut failing_probe = web(&pm.image_1, probe_port);
    failing_probe.probe = Some(Probe {
        action: ProbeAction::Exec {
            command: vec!["/bin/false".into()],
        },
        period_seconds: 1,
        failure_threshold: 1,
    });
    put(
        &desired,
        &dev.manifest(
            1,
            vec![
                container(
                    "taken",
                    ContainerSpec {
                        image: pm.image_1.clone(),
                        ..Default::default()
                    },
                ),
                container("busy", web(&pm.image_1, busy_port)),
                container("probed", failing_probe),
            ],
        ),
    )
    .await;
    let s = wait_status(&actual, &dev.id, "settled", |s| {
        s.observed_generation == 1
            && matches!(s.resources["taken"], ResourceStatus::Failed { .. })
            && matches!(s.resources["busy"], ResourceStatus::Failed { .. })
    })
    .await;
    let err = |id: &str| match &s.resources[id] {
        ResourceStatus::Failed { error, .. } => error.clone(),
        other => panic!("{id}: {other:?}"),
    };
    assert!(
        err("taken").contains("fleetlet did not create"),
        "{}",
        err("taken")
    );
    assert!(
        err("busy").contains("host port already in use"),
        "{}",
        err("busy")
    );
    let probed = seen(&s, "probed");
    assert_eq!(probed.state, "running");
    assert_eq!(probed.probe_ready, Some(false));
    assert!(!s.resources["probed"].is_ready());
    let ready = s.condition("Ready").unwrap();
    assert!(ready.message.contains("probed"), "{}", ready.message);
    // The foreign container is untouched, even after the manifest drops everything.
    put(&desired, &dev.manifest(2, vec![])).await;
    wait_status(&actual, &dev.id, "dropped", |s| s.observed_generation == 2).await;
    let foreign = pm.podman(&["ps", "--format", "{{.Names}}"]).unwrap();
    assert_eq!(foreign.trim(), "pi-guard-taken");
    drop(busy);

    // The disk guard: a floor above the free space refuses to pull and says why.
    let dev2 = device("pi-full", &pm, "min_free_disk_mib = 1000000000");
    let _agent2 = dev2.start(env.nats_url().unwrap(), "");
    put(
        &desired,
        &dev2.manifest(
            1,
            vec![container(
                "app",
                ContainerSpec {
                    image: pm.image_2.clone(),
                    ..Default::default()
                },
            )],
        ),
    )
    .await;
    let s = wait_status(&actual, &dev2.id, "disk guard", |s| {
        matches!(&s.resources.get("app"), Some(ResourceStatus::Failed { error, .. }) if error.contains("disk guard"))
    })
    .await;
    assert!(s.resources["app"].is_settled());
    assert!(
        !images(&pm).contains(&pm.image_2),
        "nothing was pulled: {:?}",
        images(&pm)
    );
}

/// The device owner's mount policy: a container mounts host paths only at or below the
/// roots the owner allows (after following symbolic links), and read-write only below the
/// writable ones. Refused mounts fail for good and no container is created for them.
#[tokio::test]
async fn container_mounts_stay_inside_the_roots_the_device_owner_allows() {
    let env = TestEnv::builder().nats().start().await.unwrap();
    let pm = PodmanSandbox::start().await.unwrap();
    let (desired, actual, _) = buckets(&env).await;
    let mut dev = device("pi-mounts", &pm, "");
    let share = dev.root().join("share");
    let data = dev.root().join("data");
    dev.sections.push_str(&format!(
        "mount_roots = [\"{}\", \"{}\"]\nwritable_mount_roots = [\"{}\"]\n",
        share.display(),
        data.display(),
        data.display()
    ));
    std::fs::create_dir_all(&share).unwrap();
    std::fs::write(share.join("in"), "from the host\n").unwrap();
    std::os::unix::fs::symlink("/etc", share.join("escape")).unwrap();
    let _agent = dev.start(env.nats_url().unwrap(), "");

    let with_mounts = |mounts: Vec<(String, &str, bool)>| ContainerSpec {
        image: pm.image_1.clone(),
        command: vec!["/bin/sh".into(), "-c".into()],
        args: vec!["cat /share/in > /data/out 2>/dev/null; exec sleep 3600".into()],
        mounts: mounts
            .into_iter()
            .map(
                |(host, inside, read_only)| fleetlet_protocol::HostPathMount {
                    host_path: host,
                    container_path: inside.into(),
                    read_only,
                },
            )
            .collect(),
        ..Default::default()
    };
    let s = |p: &std::path::Path| p.display().to_string();
    put(
        &desired,
        &dev.manifest(
            1,
            vec![
                container("root", with_mounts(vec![("/".into(), "/host", false)])),
                container("etc", with_mounts(vec![("/etc".into(), "/host-etc", true)])),
                container("rwshare", with_mounts(vec![(s(&share), "/share", false)])),
                container(
                    "escape",
                    with_mounts(vec![(s(&share.join("escape")), "/share", true)]),
                ),
                container(
                    "ok",
                    with_mounts(vec![
                        (s(&share), "/share", true),
                        (s(&data), "/data", false),
                    ]),
                ),
            ],
        ),
    )
    .await;
    let status = wait_status(&actual, &dev.id, "settled", |s| s.observed_generation == 1).await;
    for (id, why) in [
        ("root", "outside the roots containers may mount"),
        ("etc", "outside the roots containers may mount"),
        ("rwshare", "read-write"),
        ("escape", "through a symbolic link"),
    ] {
        assert_forbidden(&status, id, why);
    }
    assert!(
        ready_container(&status, "ok"),
        "{:?}",
        status.resources["ok"]
    );
    // The allowed mounts work: the container copied the read-only file into the data root.
    fleetlet_testenv::wait::file_content(
        &data.join("out"),
        "from the host\n",
        fleetlet_testenv::DEFAULT_TIMEOUT,
    )
    .await;
    // And nothing was created for the refused ones.
    let names = ours(&pm, "pi-mounts");
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(names[0].starts_with("pi-mounts-ok "), "{names:?}");
}
