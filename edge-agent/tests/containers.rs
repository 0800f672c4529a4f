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

/// A device whose containers may mount `<root>/share` (read-only) and `<root>/data`
/// (read-write), both created empty.
fn device_with_mount_roots(
    name: &str,
    pm: &PodmanSandbox,
) -> (Device, std::path::PathBuf, std::path::PathBuf) {
    let mut dev = device(name, pm, "");
    let share = dev.root().join("share");
    let data = dev.root().join("data");
    dev.sections.push_str(&format!(
        "mount_roots = [\"{}\", \"{}\"]\nwritable_mount_roots = [\"{}\"]\n",
        share.display(),
        data.display(),
        data.display()
    ));
    std::fs::create_dir_all(&share).unwrap();
    std::fs::create_dir_all(&data).unwrap();
    (dev, share, data)
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
    match s.resources[id].details() {
        Some(ResourceDetails::Container {
            container_id,
            image_digest,
            state,
            probe_ready,
            restart_count,
            ..
        }) => Seen {
            id: container_id.clone(),
            digest: image_digest.clone(),
            state: state.clone(),
            probe_ready: *probe_ready,
            restarts: *restart_count,
        },
        _ => panic!("{id}: {:?}", s.resources[id]),
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
    let started_at = || {
        pm.podman(&[
            "inspect",
            "--format",
            "{{.State.StartedAt}}",
            "pi-drift-app",
        ])
        .unwrap()
    };
    let started_before = started_at();
    agent.stop();
    let _agent = dev.start(env.nats_url().unwrap(), "");
    // A new generation with the same container: its status can only come from the
    // restarted agent, after it has looked at the container.
    let sleeper = ContainerSpec {
        image: pm.image_1.clone(),
        image_pull_policy: PullPolicy::Always,
        ..Default::default()
    };
    put(&desired, &dev.manifest(2, vec![container("app", sleeper)])).await;
    let s = wait_status(&actual, &dev.id, "generation 2 after the restart", |s| {
        all_ready(s, 2, 1)
    })
    .await;
    assert_eq!(seen(&s, "app").id, second);
    assert_eq!(seen(&s, "app").restarts, 0);
    assert_eq!(started_at(), started_before, "not restarted");
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
    let foreign_id = pm
        .podman(&["run", "-d", "--name", "pi-guard-taken", &pm.image_1])
        .unwrap()
        .trim()
        .to_owned();
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
    let all = pm
        .podman(&["ps", "-a", "--no-trunc", "--format", "{{.ID}} {{.Names}}"])
        .unwrap();
    assert_eq!(
        all.trim(),
        format!("{foreign_id} pi-guard-taken"),
        "the same container, and nothing else"
    );
    let running = pm
        .podman(&["inspect", "--format", "{{.State.Running}}", &foreign_id])
        .unwrap();
    assert_eq!(running.trim(), "true", "still running");
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
    let (dev, share, data) = device_with_mount_roots("pi-mounts", &pm);
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

/// What one relay session sent back: its output bytes and how it ended.
#[derive(Debug, Default)]
struct Session {
    output: Vec<u8>,
    ended: Option<String>,
}

/// Reads `session`'s frames from `frames` until it ends or nothing comes for `quiet`.
async fn read_session(
    frames: &mut async_nats::Subscriber,
    session: &str,
    quiet: Duration,
    into: &mut Session,
) {
    use fleetlet_protocol::relay::{FRAME, SESSION};
    use futures::StreamExt;
    while into.ended.is_none() {
        let Ok(Some(m)) = tokio::time::timeout(quiet, frames.next()).await else {
            return;
        };
        let h = |k: &str| {
            m.headers
                .as_ref()
                .and_then(|h| h.get(k))
                .map(|v| v.as_str().to_owned())
        };
        if h(SESSION).as_deref() != Some(session) {
            continue;
        }
        match h(FRAME).as_deref() {
            Some("stdout") | Some("stderr") => into.output.extend_from_slice(&m.payload),
            Some("end") => into.ended = Some(String::from_utf8_lossy(&m.payload).into_owned()),
            _ => {}
        }
    }
}

/// The relay (what `kubectl logs/exec/attach` reach through the bridge) serves only the
/// containers this agent created, found by its labels, and never sends more than its
/// 256 KiB window (plus one 32 KiB chunk) ahead of what the requester acknowledged.
#[tokio::test]
async fn relay_sessions_reach_only_the_devices_own_containers_and_wait_for_acks() {
    use fleetlet_protocol::relay::{self, FRAME, MAX_CHUNK_BYTES, SEQ, WINDOW_BYTES};
    let env = TestEnv::builder().nats().start().await.unwrap();
    let pm = PodmanSandbox::start().await.unwrap();
    let (desired, actual, _) = buckets(&env).await;
    // A container under the name the agent would use, which it did not create.
    pm.podman(&["pull", "--tls-verify=false", &pm.image_1])
        .unwrap();
    pm.podman(&[
        "run",
        "-d",
        "--name",
        "pi-relay-taken",
        &pm.image_1,
        "sh",
        "-c",
        "echo foreign-output; exec sleep 3600",
    ])
    .unwrap();
    let dev = device("pi-relay", &pm, "");
    let _agent = dev.start(env.nats_url().unwrap(), "");
    const MIB: usize = 1 << 20;
    let chatty = ContainerSpec {
        image: pm.image_1.clone(),
        command: vec!["/bin/sh".into(), "-c".into()],
        args: vec![format!(
            "head -c {MIB} /dev/zero | tr '\\0' x; exec sleep 3600"
        )],
        ..Default::default()
    };
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
                container("chatty", chatty),
            ],
        ),
    )
    .await;
    wait_status(&actual, &dev.id, "chatty running, taken refused", |s| {
        ready_container(s, "chatty")
            && matches!(
                s.resources.get("taken"),
                Some(ResourceStatus::Failed { .. })
            )
    })
    .await;
    let client = env.nats_client().await.unwrap();
    let mut frames = client
        .subscribe(relay::frames_subject(&dev.id))
        .await
        .unwrap();
    client.flush().await.unwrap();
    let ask = async |resource: &str, session: &str| {
        let req = serde_json::json!({ "resource": resource, "session": session });
        client
            .publish(
                relay::logs_subject(&dev.id),
                serde_json::to_vec(&req).unwrap().into(),
            )
            .await
            .unwrap();
        client.flush().await.unwrap();
    };

    // The foreign container's logs are not served.
    ask("taken", "foreign").await;
    let mut s = Session::default();
    read_session(&mut frames, "foreign", Duration::from_secs(10), &mut s).await;
    let why = s.ended.expect("the session ended");
    assert!(why.contains("no container of resource taken"), "{why}");
    assert!(
        s.output.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&s.output)
    );

    // The window: without acknowledgements the agent stops at 256 KiB (+ one chunk).
    let want = MIB;
    eventually_output(&pm, "pi-relay-chatty", want).await;
    ask("chatty", "window").await;
    let mut s = Session::default();
    read_session(&mut frames, "window", Duration::from_secs(2), &mut s).await;
    let held = s.output.len();
    assert!(
        s.ended.is_none(),
        "ended before the window was acknowledged"
    );
    assert!(
        held as u64 >= WINDOW_BYTES && held as u64 <= WINDOW_BYTES + MAX_CHUNK_BYTES as u64,
        "{held} bytes sent without an acknowledgement"
    );
    // Acknowledged as it arrives, the rest comes, and the session ends.
    while s.ended.is_none() {
        let mut h = async_nats::HeaderMap::new();
        h.insert(FRAME, "ack");
        h.insert(SEQ, s.output.len().to_string().as_str());
        client
            .publish_with_headers(relay::control_subject(&dev.id, "window"), h, "".into())
            .await
            .unwrap();
        let before = s.output.len();
        read_session(&mut frames, "window", Duration::from_secs(2), &mut s).await;
        assert!(
            s.output.len() > before || s.ended.is_some(),
            "an acknowledgement released nothing at {before} bytes"
        );
    }
    let xs = s.output.iter().filter(|b| **b == b'x').count();
    assert_eq!(xs, want, "every byte, once");
    assert!(s.output.iter().all(|b| *b == b'x' || *b == b'\n'));
}

/// Waits until podman has `bytes` of output in `name`'s log.
async fn eventually_output(pm: &PodmanSandbox, name: &str, bytes: usize) {
    fleetlet_testenv::eventually(
        &format!("{bytes} bytes of {name}'s output"),
        fleetlet_testenv::DEFAULT_TIMEOUT,
        || async {
            let n = pm
                .podman(&["logs", name])
                .map(|o| o.bytes().filter(|b| *b == b'x').count())
                .unwrap_or(0);
            (n >= bytes).then_some(()).ok_or(format!("{n} bytes"))
        },
    )
    .await;
}

/// `restartOn`: a container that mounts a File is made anew once when the File's spec
/// changes (after the File is written, so the new container reads the new file), and not
/// when anything else changes.
#[tokio::test]
async fn a_container_restarts_once_when_a_file_it_mounts_changes() {
    let env = TestEnv::builder().nats().start().await.unwrap();
    let pm = PodmanSandbox::start().await.unwrap();
    let (desired, actual, _) = buckets(&env).await;
    let (dev, share, data) = device_with_mount_roots("pi-restart-c", &pm);
    let _agent = dev.start(env.nats_url().unwrap(), "");
    let s = |p: &std::path::Path| p.display().to_string();
    let app = ContainerSpec {
        image: pm.image_1.clone(),
        command: vec!["/bin/sh".into(), "-c".into()],
        args: vec!["cat /share/app.conf >> /data/seen; exec sleep 3600".into()],
        mounts: vec![
            fleetlet_protocol::HostPathMount {
                host_path: s(&share),
                container_path: "/share".into(),
                read_only: true,
            },
            fleetlet_protocol::HostPathMount {
                host_path: s(&data),
                container_path: "/data".into(),
                read_only: false,
            },
        ],
        restart_on: vec![fleetlet_protocol::ResourceId::new("conf").unwrap()],
        ..Default::default()
    };
    let manifest = |generation, text: &str, other: &str| {
        dev.manifest(
            generation,
            vec![
                container("app", app.clone()),
                dev.file_resource("conf", "share/app.conf", text),
                dev.file_resource("other", "share/other.conf", other),
            ],
        )
    };
    let seen = data.join("seen");
    let id_of = || {
        pm.podman(&[
            "ps",
            "-q",
            "--no-trunc",
            "--filter",
            "name=pi-restart-c-app",
        ])
        .unwrap()
        .trim()
        .to_owned()
    };

    put(&desired, &manifest(1, "v1\n", "x")).await;
    wait_status(&actual, &dev.id, "all applied", |s| all_ready(s, 1, 3)).await;
    fleetlet_testenv::wait::file_content(&seen, "v1\n", fleetlet_testenv::DEFAULT_TIMEOUT).await;
    let first = id_of();

    put(&desired, &manifest(2, "v2\n", "x")).await;
    wait_status(&actual, &dev.id, "v2 applied", |s| all_ready(s, 2, 3)).await;
    fleetlet_testenv::wait::file_content(&seen, "v1\nv2\n", fleetlet_testenv::DEFAULT_TIMEOUT)
        .await;
    let second = id_of();
    assert_ne!(first, second, "a new container for the new file");

    put(&desired, &manifest(3, "v2\n", "y")).await;
    wait_status(&actual, &dev.id, "other applied", |s| all_ready(s, 3, 3)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(read(&seen), "v1\nv2\n");
    assert_eq!(id_of(), second);
}
