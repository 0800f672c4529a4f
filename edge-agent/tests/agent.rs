//! The real agent binary against a real nats-server: files, drift, partial failure,
//! garbage collection, offline autonomy, hostile input, compare-and-set, heartbeats.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod common;

use std::{sync::atomic::Ordering, time::Duration};

use common::*;
use fleetlet_protocol::{
    API_VERSION, AgentStatus, DeviceId, FactsReport, Heartbeat, ResourceStatus, decode, encode,
    kv::FACTS,
};
use fleetlet_testenv::{DEFAULT_TIMEOUT, TestEnv, eventually, wait::file_contains};

#[tokio::test]
async fn files_are_written_changed_and_garbage_collected_across_generations() {
    let env = TestEnv::builder().nats().start().await.unwrap();
    let (desired, actual, _) = buckets(&env).await;
    let dev = Device::new("pi-files");
    let mut agent = dev.start(env.nats_url().unwrap(), "");

    let gen1 = dev.manifest(
        1,
        vec![
            dev.file_resource("a", "a.conf", "a=1\n"),
            dev.file_resource("b", "sub/b.conf", "b=1\n"),
            dev.file_resource("c", "c.conf", "c=1\n"),
        ],
    );
    put(&desired, &gen1).await;
    let s = wait_status(&actual, &dev.id, "gen 1 ready", |s| all_ready(s, 1, 3)).await;
    assert_eq!(s.manifest_generation, 1);
    assert_eq!(read(&dev.file("a.conf")), "a=1\n");
    assert_eq!(read(&dev.file("sub/b.conf")), "b=1\n");
    assert_eq!(read(&dev.file("c.conf")), "c=1\n");
    let ready = s.condition("Ready").unwrap();
    assert_eq!(ready.status, fleetlet_protocol::ConditionStatus::True);

    // Generation 2 changes b and drops c.
    let gen2 = dev.manifest(
        2,
        vec![
            dev.file_resource("a", "a.conf", "a=1\n"),
            dev.file_resource("b", "sub/b.conf", "b=2\n"),
        ],
    );
    put(&desired, &gen2).await;
    let s = wait_status(&actual, &dev.id, "gen 2 ready", |s| all_ready(s, 2, 2)).await;
    assert_eq!(read(&dev.file("sub/b.conf")), "b=2\n");
    assert!(!dev.file("c.conf").exists(), "dropped file was deleted");
    assert!(!s.resources.contains_key("c"));
    assert_eq!(s.drift_repairs, 0, "no drift in an ordinary update");

    // The desired-state key deleted: the device keeps running what it has and says so.
    desired.delete(dev.id.as_str()).await.unwrap();
    let s = wait_status(&actual, &dev.id, "DesiredStateDeleted", |s| {
        s.condition("DesiredStateDeleted")
            .is_some_and(|c| c.status == fleetlet_protocol::ConditionStatus::True)
    })
    .await;
    assert_eq!(
        s.condition("DesiredStateDeleted").unwrap().reason,
        "KeyDeleted"
    );
    assert_eq!(s.manifest_generation, 2, "the manifest stays in force");
    assert_eq!(read(&dev.file("a.conf")), "a=1\n");
    assert_eq!(read(&dev.file("sub/b.conf")), "b=2\n");
    // The next manifest clears it.
    let gen3 = dev.manifest(
        3,
        vec![
            dev.file_resource("a", "a.conf", "a=1\n"),
            dev.file_resource("b", "sub/b.conf", "b=2\n"),
        ],
    );
    put(&desired, &gen3).await;
    let s = wait_status(&actual, &dev.id, "gen 3 ready", |s| all_ready(s, 3, 2)).await;
    assert!(
        s.condition("DesiredStateDeleted")
            .is_none_or(|c| c.status != fleetlet_protocol::ConditionStatus::True),
        "{:?}",
        s.conditions
    );

    // SIGTERM: the agent exits cleanly and leaves what it manages in place.
    agent.stop();
    assert!(dev.file("a.conf").exists() && dev.file("sub/b.conf").exists());
    assert!(
        std::fs::read_to_string(&agent.log)
            .unwrap()
            .contains("shutting down")
    );
}

#[tokio::test]
async fn files_edited_or_deleted_by_hand_are_restored_and_the_drift_is_reported() {
    let env = TestEnv::builder().nats().start().await.unwrap();
    let (desired, actual, _) = buckets(&env).await;
    let dev = Device::new("pi-drift");
    let _agent = dev.start(env.nats_url().unwrap(), "");
    put(
        &desired,
        &dev.manifest(
            1,
            vec![
                dev.file_resource("motd", "motd", "managed\n"),
                dev.file_resource("x", "x", "x\n"),
            ],
        ),
    )
    .await;
    wait_status(&actual, &dev.id, "ready", |s| all_ready(s, 1, 2)).await;

    std::fs::write(dev.file("motd"), "edited by hand\n").unwrap();
    let s = wait_status(&actual, &dev.id, "edit repaired", |s| s.drift_repairs >= 1).await;
    assert_eq!(read(&dev.file("motd")), "managed\n");
    let drift = s.last_drift.unwrap();
    assert_eq!(drift.resource.as_str(), "motd");
    assert_eq!(drift.reason, "size is 15 bytes, want 8");

    std::fs::remove_file(dev.file("x")).unwrap();
    let s = wait_status(&actual, &dev.id, "delete repaired", |s| {
        s.drift_repairs >= 2
    })
    .await;
    assert_eq!(read(&dev.file("x")), "x\n");
    assert_eq!(s.last_drift.unwrap().reason, "absent");
}

#[tokio::test]
async fn a_file_outside_the_allowed_roots_fails_alone() {
    let env = TestEnv::builder().nats().start().await.unwrap();
    let (desired, actual, _) = buckets(&env).await;
    let dev = Device::new("pi-partial");
    let _agent = dev.start(env.nats_url().unwrap(), "");
    let outside = tempfile::tempdir().unwrap();
    let forbidden = outside.path().join("passwd");
    put(
        &desired,
        &dev.manifest(
            1,
            vec![
                dev.file_resource("ok-1", "ok-1", "1"),
                file_at(
                    "evil",
                    &forbidden.display().to_string(),
                    "root::0:0::/:/bin/sh\n",
                ),
                dev.file_resource("ok-2", "ok-2", "2"),
            ],
        ),
    )
    .await;
    let s = wait_status(&actual, &dev.id, "settled", |s| s.observed_generation == 1).await;
    assert!(s.resources["ok-1"].is_ready() && s.resources["ok-2"].is_ready());
    match &s.resources["evil"] {
        ResourceStatus::Failed { error, .. } => {
            assert!(error.contains("outside the allowed roots"), "{error}");
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    assert!(!forbidden.exists());
    let degraded = s.condition("Degraded").unwrap();
    assert_eq!(degraded.status, fleetlet_protocol::ConditionStatus::True);
    assert_eq!(degraded.message, "evil");
}

#[tokio::test]
async fn unknown_and_disabled_kinds_are_unsupported_without_blocking_the_rest() {
    let env = TestEnv::builder().nats().start().await.unwrap();
    let (desired, actual, _) = buckets(&env).await;
    let dev = Device::new("pi-kinds");
    let _agent = dev.start(env.nats_url().unwrap(), "enabled_kinds = [\"file\"]");
    // Written as raw JSON, the way a newer control plane would send a kind we don't know.
    let raw = serde_json::json!({
        "apiVersion": API_VERSION, "device": "pi-kinds", "generation": 1,
        "resources": [
            { "id": "f", "owner": { "kind": "EdgeManifest", "namespace": "n", "name": "m" },
              "file": { "path": dev.file("f").display().to_string(), "content": { "text": "f" } } },
            { "id": "gpu", "owner": { "kind": "EdgeManifest", "namespace": "n", "name": "m" },
              "gpuDriver": { "version": "550" } },
            { "id": "job", "owner": { "kind": "EdgeManifest", "namespace": "n", "name": "m" },
              "shellJob": { "command": ["/bin/sh", "-c", "touch /tmp/pwned"] } }
        ]
    });
    desired
        .put("pi-kinds", serde_json::to_vec(&raw).unwrap().into())
        .await
        .unwrap();
    let s = wait_status(&actual, &dev.id, "settled", |s| s.observed_generation == 1).await;
    assert!(s.resources["f"].is_ready());
    assert!(
        matches!(&s.resources["gpu"], ResourceStatus::Unsupported { kind, .. } if kind == "gpuDriver")
    );
    assert!(
        matches!(&s.resources["job"], ResourceStatus::Unsupported { kind, message } if kind == "shellJob" && message.contains("reconcile.enabled_kinds")),
        "the message says how the owner enables it: {:?}",
        s.resources["job"]
    );
    assert!(!std::path::Path::new("/tmp/pwned").exists());
}

#[tokio::test]
async fn shell_jobs_run_once_per_spec_where_the_owner_enabled_them_and_are_audited() {
    let env = TestEnv::builder().nats().start().await.unwrap();
    let (desired, actual, _) = buckets(&env).await;
    let mut dev = Device::new("pi-jobs");
    dev.sections = "[shell_job]\nmax_output_bytes = 64\n".into();
    // Drift passes are logged at debug; the test counts them.
    dev.env
        .push(("FLEETLET_LOG", "info,fleetlet_agent::engine=debug".into()));
    let agent = dev.start(
        env.nats_url().unwrap(),
        "enabled_kinds = [\"file\", \"shellJob\"]",
    );
    let runs = dev.dir.path().join("runs");
    let job = |id: &str, script: String| {
        let mut r = dev.file_resource(id, "unused", "");
        r.spec = fleetlet_protocol::ResourceSpec::ShellJob(fleetlet_protocol::ShellJobSpec {
            command: vec!["/bin/sh".into(), "-c".into(), script],
            timeout_seconds: Some(5),
        });
        r
    };
    let ok = job("ok", format!("echo ran >> {}; echo done", runs.display()));
    let bad = job("bad", "echo broken >&2; exit 7".into());
    put(&desired, &dev.manifest(1, vec![ok.clone(), bad.clone()])).await;
    let s = wait_status(&actual, &dev.id, "jobs settled", |s| {
        s.observed_generation == 1
    })
    .await;
    match s.resources["ok"].details() {
        Some(fleetlet_protocol::ResourceDetails::ShellJob {
            exit_code, output, ..
        }) => {
            assert_eq!(*exit_code, Some(0));
            assert_eq!(output, "done\n");
        }
        _ => panic!("ok: {:?}", s.resources["ok"]),
    }
    match &s.resources["bad"] {
        ResourceStatus::Failed {
            error, retry_after, ..
        } => {
            assert!(
                error.contains("exited with code 7") && error.contains("broken"),
                "{error}"
            );
            assert!(retry_after.is_none(), "a failed run waits for a new spec");
        }
        other => panic!("bad: {other:?}"),
    }
    // New generations and drift passes do not run an unchanged job again.
    let extra = dev.file_resource("f", "f.conf", "x");
    put(&desired, &dev.manifest(2, vec![ok.clone(), bad, extra])).await;
    wait_status(&actual, &dev.id, "gen 2", |s| s.observed_generation == 2).await;
    let drift_passes = || {
        read(&agent.log)
            .lines()
            .filter(|l| l.contains("pass done") && l.contains("\"resync\""))
            .count()
    };
    let from = drift_passes();
    eventually("two drift passes after gen 2", DEFAULT_TIMEOUT, || async {
        match drift_passes() {
            n if n >= from + 2 => Ok(()),
            n => Err(format!("{} drift passes since gen 2", n - from)),
        }
    })
    .await;
    assert_eq!(read(&runs), "ran\n");
    // A changed spec runs again; dropping a job does not undo it.
    let ok2 = job("ok", format!("echo ran-again >> {}", runs.display()));
    put(&desired, &dev.manifest(3, vec![ok2])).await;
    wait_status(&actual, &dev.id, "gen 3", |s| all_ready(s, 3, 1)).await;
    assert_eq!(read(&runs), "ran\nran-again\n");

    let audit = read(&dev.dir.path().join("state/shell-jobs.log"));
    let lines: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{audit}");
    assert!(
        lines
            .iter()
            .all(|l| l["device"] == "pi-jobs" && l["argv"][0] == "/bin/sh")
    );
    assert_eq!(
        lines.iter().filter(|l| l["exitCode"] == 7).count(),
        1,
        "{audit}"
    );
}

#[tokio::test]
async fn hostile_manifests_are_refused_with_a_reason_and_the_previous_one_stays_in_force() {
    let env = TestEnv::builder().nats().start().await.unwrap();
    let (desired, actual, _) = buckets(&env).await;
    let dev = Device::new("pi-hostile");
    let _agent = dev.start(env.nats_url().unwrap(), "max_manifest_bytes = 4096");
    put(
        &desired,
        &dev.manifest(5, vec![dev.file_resource("keep", "keep", "v5")]),
    )
    .await;
    wait_status(&actual, &dev.id, "gen 5", |s| all_ready(s, 5, 1)).await;

    let big = dev.manifest(
        6,
        vec![dev.file_resource("keep", "keep", &"x".repeat(8192))],
    );
    let mut other = dev.manifest(7, vec![]);
    other.device = DeviceId::new("pi-someone-else").unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "Malformed",
            b"{\"apiVersion\": \"fleetlet.dev/v1alpha1\", \"device\": ".to_vec(),
        ),
        ("Malformed", b"\xff\x00 not json".to_vec()),
        (
            "UnsupportedApiVersion",
            br#"{"apiVersion":"fleetlet.dev/v9","device":"pi-hostile","generation":9}"#.to_vec(),
        ),
        ("WrongDevice", encode(&other).unwrap()),
        ("StaleGeneration", encode(&dev.manifest(4, vec![])).unwrap()),
        (
            "GenerationReused",
            encode(&dev.manifest(5, vec![])).unwrap(),
        ),
        ("TooLarge", encode(&big).unwrap()),
    ];
    for (reason, bytes) in cases {
        let rev = desired.put("pi-hostile", bytes.into()).await.unwrap();
        let s = wait_status(&actual, &dev.id, reason, |s| {
            s.last_rejection.as_ref().is_some_and(|r| r.revision == rev)
        })
        .await;
        let rejection = s.last_rejection.clone().unwrap();
        assert_eq!(rejection.reason, reason, "{rejection:?}");
        assert!(!rejection.message.is_empty());
        // Nothing lost: generation 5 is still in force and its file untouched.
        assert_eq!(s.manifest_generation, 5);
        assert!(s.resources["keep"].is_ready());
        assert_eq!(read(&dev.file("keep")), "v5");
    }
    // A valid next generation is still accepted afterwards.
    put(
        &desired,
        &dev.manifest(6, vec![dev.file_resource("keep", "keep", "v6")]),
    )
    .await;
    wait_status(&actual, &dev.id, "gen 6", |s| all_ready(s, 6, 1)).await;
    assert_eq!(read(&dev.file("keep")), "v6");
}

#[tokio::test]
async fn offline_agent_converges_from_its_stored_manifest_and_reports_when_nats_returns() {
    let mut env = TestEnv::builder().nats().start().await.unwrap();
    let url = env.nats_url().unwrap().to_owned();
    let dev = Device::new("pi-offline");
    {
        let (desired, actual, _) = buckets(&env).await;
        let mut agent = dev.start(&url, "");
        put(
            &desired,
            &dev.manifest(1, vec![dev.file_resource("cfg", "cfg", "online\n")]),
        )
        .await;
        wait_status(&actual, &dev.id, "ready", |s| all_ready(s, 1, 1)).await;
        agent.stop();
    }

    // NATS goes away; the agent restarts without it and still repairs drift.
    env.nats.as_mut().unwrap().stop();
    let _agent = dev.start(&url, "");
    std::fs::write(dev.file("cfg"), "tampered while offline\n").unwrap();
    fleetlet_testenv::wait::file_content(&dev.file("cfg"), "online\n", DEFAULT_TIMEOUT).await;
    assert!(dev.file("cfg").exists(), "the restart deleted nothing");

    // NATS returns: the status accumulated offline arrives.
    env.nats.as_mut().unwrap().start_again().await.unwrap();
    let (_, actual, _) = buckets(&env).await;
    let s = wait_status(&actual, &dev.id, "offline drift reported", |s| {
        s.drift_repairs >= 1
    })
    .await;
    assert_eq!(s.last_drift.unwrap().resource.as_str(), "cfg");
    assert!(s.resources["cfg"].is_ready());
}

#[tokio::test]
async fn concurrent_status_writers_do_not_lose_updates() {
    let env = TestEnv::builder().nats().start().await.unwrap();
    let (_, actual, _) = buckets(&env).await;
    let dev = DeviceId::new("pi-cas").unwrap();
    let writers = (0..2).map(|_| {
        let env_url = env.nats_url().unwrap().to_owned();
        let dev = dev.clone();
        tokio::spawn(async move {
            // Each writer on a connection of its own, as two agents would be.
            let client = async_nats::connect(env_url).await.unwrap();
            for _ in 0..25 {
                fleetlet_agent::nats::cas_update_status(&client, &dev, |stored| {
                    let mut s = stored.unwrap_or_else(|| AgentStatus::new(dev.clone()));
                    s.drift_repairs += 1;
                    s
                })
                .await
                .unwrap();
            }
        })
    });
    for w in writers.collect::<Vec<_>>() {
        w.await.unwrap();
    }
    let e = actual.entry(dev.as_str()).await.unwrap().unwrap();
    assert_eq!(decode::<AgentStatus>(&e.value).unwrap().drift_repairs, 50);
}

/// A status write is one request while this agent is the only writer, and a write from
/// anything else in between is read back and kept, not overwritten.
#[tokio::test]
async fn status_writes_go_on_top_of_the_agents_own_revision_and_keep_another_writers() {
    let env = TestEnv::builder().nats().start().await.unwrap();
    let (_, actual, _) = buckets(&env).await;
    let dev = DeviceId::new("pi-own-revision").unwrap();
    let client = async_nats::connect(env.nats_url().unwrap()).await.unwrap();
    let (tx, rx) = tokio::sync::watch::channel(AgentStatus::new(dev.clone()));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let writer = tokio::spawn(fleetlet_agent::nats::write_status(
        client.clone(),
        dev.clone(),
        rx,
        fleetlet_agent::nats::Uplink::new().0,
        stopped,
    ));
    let stored = || async {
        let e = actual
            .entry(dev.as_str())
            .await
            .map_err(|e| e.to_string())?
            .ok_or("no status yet")?;
        Ok::<_, String>(decode::<AgentStatus>(&e.value).unwrap())
    };
    let at_generation = async |g: u64| {
        eventually("the status written", DEFAULT_TIMEOUT, || async {
            let s = stored().await?;
            if s.observed_generation == g {
                Ok(s)
            } else {
                Err(format!("generation {}", s.observed_generation))
            }
        })
        .await
    };
    at_generation(0).await;
    let sent = || client.statistics().out_messages.load(Ordering::Relaxed);

    // Alone: each change is one message from the agent, the write itself.
    let mut ours = AgentStatus::new(dev.clone());
    for g in 1..=3 {
        let before = sent();
        ours.observed_generation = g;
        tx.send(ours.clone()).unwrap();
        at_generation(g).await;
        assert_eq!(
            sent() - before,
            1,
            "generation {g}: no read before the write"
        );
    }

    // Something else writes in between (here a drift count the agent has not seen).
    let mut other = stored().await.unwrap();
    other.drift_repairs = 7;
    actual
        .put(dev.as_str(), encode(&other).unwrap().into())
        .await
        .unwrap();
    let before = sent();
    ours.observed_generation = 4;
    tx.send(ours.clone()).unwrap();
    let s = at_generation(4).await;
    assert_eq!(s.drift_repairs, 7, "the other writer's count is kept");
    assert!(sent() - before > 1, "the conflict was read back");

    // And the next write is one message again.
    let before = sent();
    ours.observed_generation = 5;
    tx.send(ours.clone()).unwrap();
    assert_eq!(at_generation(5).await.drift_repairs, 7);
    assert_eq!(sent() - before, 1);
    stop.send(true).unwrap();
    writer.await.unwrap();
}

/// Heartbeats carry liveness and what is free; the facts are stored apart, once, and not
/// again with every beat. A connection that is new stores them again, so a record lost on
/// the server comes back.
#[tokio::test]
async fn heartbeats_stay_small_and_facts_are_stored_once_and_again_on_a_new_connection() {
    let mut env = TestEnv::builder().nats().start().await.unwrap();
    let (_, _, heartbeat) = buckets(&env).await;
    let facts = env
        .jetstream()
        .await
        .unwrap()
        .get_key_value(FACTS.name)
        .await
        .unwrap();
    let dev = Device::new("pi-heartbeat");
    let _agent = dev.start(env.nats_url().unwrap(), "");
    let latest = || async {
        let e = heartbeat
            .entry("pi-heartbeat")
            .await
            .map_err(|e| e.to_string())?
            .ok_or("no heartbeat yet")?;
        Ok::<_, String>((decode::<Heartbeat>(&e.value).unwrap(), e.value.len()))
    };
    let after = async |seq: u64| {
        eventually("a later heartbeat", DEFAULT_TIMEOUT, || async {
            let (hb, size) = latest().await?;
            if hb.sequence > seq {
                Ok((hb, size))
            } else {
                Err(format!("sequence {} again", hb.sequence))
            }
        })
        .await
    };
    let (first, _) = eventually("a heartbeat", DEFAULT_TIMEOUT, latest).await;
    let (hb, size) = after(first.sequence).await;
    assert_eq!(hb.device, dev.id);
    assert_eq!(hb.interval_seconds, 1);
    assert_eq!(hb.facts, None, "a beat carries no facts");
    assert!(size < 256, "a heartbeat of {size} bytes");

    let stored = facts.entry("pi-heartbeat").await.unwrap().expect("facts");
    let report = decode::<FactsReport>(&stored.value).unwrap();
    let f = &report.facts;
    assert_eq!(report.device, dev.id);
    assert_eq!(f.system.operating_system, "linux");
    assert_eq!(f.system.architecture, "amd64");
    assert!(!f.system.kernel_version.is_empty());
    assert!(f.capacity.memory_bytes > 0 && f.capacity.cpu_cores > 0 && f.capacity.disk_bytes > 0);
    assert!(hb.free.memory_bytes <= f.capacity.memory_bytes);
    assert!(f.sealing_key.is_some() && f.limits.is_some());

    // Three more beats: the stored facts are the same record.
    let (later, _) = after(hb.sequence + 2).await;
    assert!(later.sequence >= hb.sequence + 3);
    let again = facts.entry("pi-heartbeat").await.unwrap().expect("facts");
    assert_eq!(
        again.revision, stored.revision,
        "facts rewritten with a beat"
    );

    // The record is lost on the server; the agent's next connection stores it again.
    facts.delete("pi-heartbeat").await.unwrap();
    assert!(facts.get("pi-heartbeat").await.unwrap().is_none());
    let nats = env.nats.as_mut().unwrap();
    nats.stop();
    tokio::time::sleep(Duration::from_secs(1)).await;
    nats.start_again().await.unwrap();
    let facts = env
        .jetstream()
        .await
        .unwrap()
        .get_key_value(FACTS.name)
        .await
        .unwrap();
    let back = eventually("the facts stored again", DEFAULT_TIMEOUT, || async {
        let v = facts
            .get("pi-heartbeat")
            .await
            .map_err(|e| e.to_string())?
            .ok_or("no facts")?;
        Ok::<_, String>(decode::<FactsReport>(&v).unwrap())
    })
    .await;
    assert_eq!(back.facts, report.facts);
}

#[tokio::test]
async fn a_device_beats_as_soon_as_it_connects_not_one_interval_later() {
    let mut env = TestEnv::builder().nats().start().await.unwrap();
    buckets(&env).await;
    let dev = Device::new("pi-first-beat");
    // A minute between beats: a beat within the 20 s waited below came with a connection.
    let config = dev.write_config(env.nats_url().unwrap(), "", "");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "heartbeat_interval_seconds = 1\n",
        "heartbeat_interval_seconds = 60\n",
    );
    std::fs::write(&config, text).unwrap();
    let within = Duration::from_secs(20);
    let sequence = async |env: &TestEnv| {
        let (_, _, heartbeat) = buckets(env).await;
        let e = heartbeat
            .entry("pi-first-beat")
            .await
            .map_err(|e| e.to_string())?
            .ok_or("no heartbeat yet")?;
        Ok::<_, String>(decode::<Heartbeat>(&e.value).unwrap().sequence)
    };

    // The device starts while its NATS server is down.
    env.nats.as_mut().unwrap().stop();
    let _agent = dev.spawn(config);
    tokio::time::sleep(Duration::from_secs(3)).await;
    env.nats.as_mut().unwrap().start_again().await.unwrap();
    let first = eventually("the first heartbeat", within, || sequence(&env)).await;

    // The server restarts: the device beats on its new connection, not at its next tick.
    let nats = env.nats.as_mut().unwrap();
    nats.stop();
    tokio::time::sleep(Duration::from_secs(1)).await;
    nats.start_again().await.unwrap();
    eventually("a heartbeat on the new connection", within, || async {
        match sequence(&env).await? {
            s if s > first => Ok(()),
            s => Err(format!("sequence {s} again")),
        }
    })
    .await;
}

/// Puts generation `generation` of a manifest holding one file, `v`, whose text is the
/// generation, and waits until the device has applied it and reports it Ready.
async fn apply_v(env: &TestEnv, dev: &Device, generation: u64) {
    let (desired, actual, _) = buckets(env).await;
    let text = generation.to_string();
    put(
        &desired,
        &dev.manifest(generation, vec![dev.file_resource("v", "v", &text)]),
    )
    .await;
    wait_status(&actual, &dev.id, &format!("gen {generation}"), |s| {
        all_ready(s, generation, 1)
    })
    .await;
    assert_eq!(read(&dev.file("v")), text);
}

/// How many times the program's runtime thread (the agent runs on one) has been switched
/// out: each time it went to sleep or was preempted.
fn runtime_switches(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/status")).unwrap();
    status
        .lines()
        .filter(|l| l.contains("ctxt_switches:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

#[tokio::test]
async fn an_idle_agent_sleeps_until_something_is_due() {
    let env = TestEnv::builder().nats().start().await.unwrap();
    let dev = Device::new("pi-idle");
    // Nothing is due for a minute: no beat, no drift check.
    let config = dev.write_config(env.nats_url().unwrap(), "", "");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(
            "heartbeat_interval_seconds = 1\n",
            "heartbeat_interval_seconds = 60\n",
        )
        .replace(
            "drift_interval_seconds = 1\n",
            "drift_interval_seconds = 3600\n",
        );
    std::fs::write(&config, text).unwrap();
    let agent = dev.spawn(config);
    apply_v(&env, &dev, 1).await;
    let pid = agent.program_pid().expect("the agent runs");
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Connected, with its manifest applied and its first beat sent, the agent has nothing
    // to do for 10 s. It used to look at its connection twice a second (the manifest watch
    // and the heartbeat, for a reconnect): 41 switches in that window when it did.
    let before = runtime_switches(pid);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let woke = runtime_switches(pid) - before;
    eprintln!("idle agent: its thread switched out {woke} times in 10 s");
    assert!(
        woke <= 4,
        "the idle agent's thread was switched out {woke} times in 10 s"
    );

    // Asleep is not deaf: a new generation still arrives.
    apply_v(&env, &dev, 2).await;
}

#[tokio::test]
async fn a_running_agent_reconnects_after_nats_restarts_and_takes_new_generations() {
    let mut env = TestEnv::builder().nats().start().await.unwrap();
    let dev = Device::new("pi-reconnect");
    let _agent = dev.start(env.nats_url().unwrap(), "");
    apply_v(&env, &dev, 1).await;
    let nats = env.nats.as_mut().unwrap();
    nats.stop();
    tokio::time::sleep(Duration::from_secs(1)).await;
    nats.start_again().await.unwrap();
    // After the reconnect.
    apply_v(&env, &dev, 2).await;
}

#[tokio::test]
async fn a_failing_resource_is_retried_with_backoff_and_recovers_without_a_new_manifest() {
    let env = TestEnv::builder().nats().start().await.unwrap();
    let (desired, actual, _) = buckets(&env).await;
    let dev = Device::new("pi-backoff");
    let _agent = dev.start(env.nats_url().unwrap(), "");
    // A regular file where the resource needs a directory: an I/O failure, retryable.
    std::fs::create_dir_all(dev.root()).unwrap();
    std::fs::write(dev.file("blocker"), "not a directory").unwrap();
    put(
        &desired,
        &dev.manifest(
            1,
            vec![
                dev.file_resource("inner", "blocker/inner.conf", "x"),
                dev.file_resource("ok", "ok", "ok"),
            ],
        ),
    )
    .await;
    let s = wait_status(&actual, &dev.id, "failed with retry", |s| {
        matches!(
            s.resources.get("inner"),
            Some(ResourceStatus::Failed {
                retry_after: Some(_),
                ..
            })
        )
    })
    .await;
    assert!(
        s.resources["ok"].is_ready(),
        "the healthy resource is not held back"
    );
    let ResourceStatus::Failed {
        since,
        retry_after: Some(retry),
        error,
        permanent: false,
    } = &s.resources["inner"]
    else {
        unreachable!()
    };
    assert!(retry > since, "retry is scheduled after the failure");
    assert!(error.contains("blocker"), "{error}");

    // Clear the obstacle: the next retry succeeds, with no change to the manifest.
    std::fs::remove_file(dev.file("blocker")).unwrap();
    wait_status(&actual, &dev.id, "recovered", |s| all_ready(s, 1, 2)).await;
    assert_eq!(read(&dev.file("blocker/inner.conf")), "x");
}

#[tokio::test]
async fn credentials_from_the_config_reach_an_authenticated_server() {
    let env = TestEnv::builder()
        .nats_with_args(&["--user", "pi-auth", "--pass", "s3cret"])
        .start()
        .await
        .unwrap();
    let (desired, actual, _) = buckets(&env).await;
    let url = env.nats_url().unwrap().to_owned();

    // Wrong password: the agent keeps retrying and never gets its manifest.
    let wrong = Device::new("pi-auth");
    let bad = wrong.start_with_nats_extra(&url, "user = \"pi-auth\"\npassword = \"wrong\"");
    put(
        &desired,
        &wrong.manifest(1, vec![wrong.file_resource("f", "f", "x")]),
    )
    .await;
    // It ran and tried: the server turned its password away.
    file_contains(&bad.log, "authorization violation", DEFAULT_TIMEOUT).await;
    assert!(!wrong.file("f").exists());
    drop(bad);

    let good = Device::new("pi-auth");
    let _agent = good.start_with_nats_extra(&url, "user = \"pi-auth\"\npassword = \"s3cret\"");
    put(
        &desired,
        &good.manifest(2, vec![good.file_resource("f", "f", "x")]),
    )
    .await;
    wait_status(&actual, &good.id, "ready with credentials", |s| {
        all_ready(s, 2, 1)
    })
    .await;
}
