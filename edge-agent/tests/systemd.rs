//! The agent's SystemdUnit reconciler against a real systemd (PID 1 of private namespaces,
//! started by `scripts/systemd-sandbox`) over its D-Bus API, driven through real NATS.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod common;

use std::time::Duration;

use common::*;
use fleetlet_protocol::{
    ConditionStatus, ManagedResource, ResourceDetails, ResourceSpec, ResourceStatus,
    SystemdUnitSpec, UnitState,
};
use fleetlet_testenv::{TestEnv, sandbox::SystemdSandbox};

fn unit(
    id: &str,
    name: &str,
    contents: Option<String>,
    enabled: bool,
    state: UnitState,
) -> ManagedResource {
    let mut r = file_at(id, "/unused", "");
    r.spec = ResourceSpec::SystemdUnit(SystemdUnitSpec {
        name: name.into(),
        contents,
        enabled,
        state,
    });
    r
}

fn service(exec: &str, extra: &str) -> Option<String> {
    Some(format!(
        "[Unit]\nDescription=fleetlet test\n[Service]\nExecStart={exec}\n{extra}\n[Install]\nWantedBy=multi-user.target\n"
    ))
}

fn device(name: &str, sd: &SystemdSandbox) -> Device {
    let mut dev = Device::new(name);
    dev.sections = format!(
        "[systemd]\nbus_address = \"{}\"\nunit_dir = \"{}\"\njob_timeout_seconds = 20\n",
        sd.bus_address,
        sd.unit_dir.display()
    );
    dev
}

/// A property of a unit, as `busctl get-property` prints it (e.g. `s "active"`).
fn prop(sd: &SystemdSandbox, unit: &str, iface: &str, name: &str) -> String {
    let path = sd
        .busctl(&[
            "call",
            "org.freedesktop.systemd1",
            "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager",
            "LoadUnit",
            "s",
            unit,
        ])
        .unwrap();
    let path = path
        .trim()
        .trim_start_matches("o ")
        .trim_matches('"')
        .to_owned();
    sd.busctl(&[
        "get-property",
        "org.freedesktop.systemd1",
        &path,
        &format!("org.freedesktop.systemd1.{iface}"),
        name,
    ])
    .unwrap()
    .trim()
    .to_owned()
}

fn manager(sd: &SystemdSandbox, method: &str, sig: &str, args: &[&str]) -> String {
    let mut a = vec![
        "call",
        "org.freedesktop.systemd1",
        "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager",
        method,
        sig,
    ];
    a.extend_from_slice(args);
    sd.busctl(&a).unwrap()
}

fn unit_details(s: &fleetlet_protocol::AgentStatus, id: &str) -> (String, String, Option<String>) {
    match &s.resources[id] {
        ResourceStatus::Ready {
            details:
                ResourceDetails::SystemdUnit {
                    active_state,
                    sub_state,
                    unit_file_state,
                    ..
                },
            ..
        } => (
            active_state.clone(),
            sub_state.clone(),
            unit_file_state.clone(),
        ),
        other => panic!("{id}: {other:?}"),
    }
}

#[tokio::test]
async fn units_are_written_enabled_started_restarted_stopped_and_removed() {
    let env = TestEnv::builder().nats().start().await.unwrap();
    let sd = SystemdSandbox::start().await.unwrap();
    let (desired, actual, _) = buckets(&env).await;
    let dev = device("pi-units", &sd);
    let _agent = dev.start(env.nats_url().unwrap(), "");
    let file = sd.unit_dir.join("hello.service");
    let wants = sd.unit_dir.join("multi-user.target.wants/hello.service");

    let v1 = service("/bin/sleep 4001", "Environment=V=1");
    put(
        &desired,
        &dev.manifest(
            1,
            vec![unit("hello", "hello.service", v1, true, UnitState::Started)],
        ),
    )
    .await;
    let s = wait_status(&actual, &dev.id, "unit started", |s| all_ready(s, 1, 1)).await;
    assert_eq!(
        unit_details(&s, "hello"),
        ("active".into(), "running".into(), Some("enabled".into()))
    );
    assert!(read(&file).starts_with("# Managed by fleetlet (device pi-units, resource hello)"));
    assert!(
        wants.symlink_metadata().is_ok(),
        "enabled: {} exists",
        wants.display()
    );
    assert_eq!(
        prop(&sd, "hello.service", "Unit", "ActiveState"),
        "s \"active\""
    );
    let pid1 = prop(&sd, "hello.service", "Service", "MainPID");
    assert_ne!(pid1, "u 0");

    // A changed unit file restarts the service.
    let v2 = service("/bin/sleep 4001", "Environment=V=2");
    put(
        &desired,
        &dev.manifest(
            2,
            vec![unit("hello", "hello.service", v2, true, UnitState::Started)],
        ),
    )
    .await;
    wait_status(&actual, &dev.id, "unit restarted", |s| all_ready(s, 2, 1)).await;
    assert!(read(&file).contains("V=2"));
    let pid2 = prop(&sd, "hello.service", "Service", "MainPID");
    assert_ne!(pid1, pid2, "the service was restarted for its new file");
    assert_eq!(
        prop(&sd, "hello.service", "Unit", "ActiveState"),
        "s \"active\""
    );

    // Stopped and disabled.
    let v2 = service("/bin/sleep 4001", "Environment=V=2");
    put(
        &desired,
        &dev.manifest(
            3,
            vec![unit(
                "hello",
                "hello.service",
                v2,
                false,
                UnitState::Stopped,
            )],
        ),
    )
    .await;
    let s = wait_status(&actual, &dev.id, "unit stopped", |s| all_ready(s, 3, 1)).await;
    let (active, _, file_state) = unit_details(&s, "hello");
    assert_eq!(active, "inactive");
    assert_eq!(file_state.as_deref(), Some("disabled"));
    assert!(wants.symlink_metadata().is_err());

    // Dropped from the manifest: stopped, disabled, file removed, systemd forgets it.
    let v4 = service("/bin/sleep 4001", "");
    put(
        &desired,
        &dev.manifest(
            4,
            vec![unit("hello", "hello.service", v4, true, UnitState::Started)],
        ),
    )
    .await;
    wait_status(&actual, &dev.id, "started again", |s| all_ready(s, 4, 1)).await;
    put(&desired, &dev.manifest(5, vec![])).await;
    wait_status(&actual, &dev.id, "removed", |s| {
        s.observed_generation == 5 && s.resources.is_empty()
    })
    .await;
    assert!(!file.exists());
    assert!(wants.symlink_metadata().is_err());
    assert_eq!(
        prop(&sd, "hello.service", "Unit", "LoadState"),
        "s \"not-found\""
    );
}

#[tokio::test]
async fn units_stopped_or_disabled_by_hand_are_brought_back_and_the_drift_is_counted() {
    let env = TestEnv::builder().nats().start().await.unwrap();
    let sd = SystemdSandbox::start().await.unwrap();
    let (desired, actual, _) = buckets(&env).await;
    let dev = device("pi-unit-drift", &sd);
    let _agent = dev.start(env.nats_url().unwrap(), "");
    let r = unit(
        "web",
        "drift.service",
        service("/bin/sleep 4002", ""),
        true,
        UnitState::Started,
    );
    put(&desired, &dev.manifest(1, vec![r])).await;
    wait_status(&actual, &dev.id, "started", |s| all_ready(s, 1, 1)).await;

    manager(&sd, "StopUnit", "ss", &["drift.service", "replace"]);
    let s = wait_status(&actual, &dev.id, "restarted after a manual stop", |s| {
        s.drift_repairs >= 1 && all_ready(s, 1, 1)
    })
    .await;
    let drift = s.last_drift.unwrap();
    assert_eq!(drift.resource.as_str(), "web");
    assert!(drift.reason.contains("inactive"), "{}", drift.reason);
    assert_eq!(
        prop(&sd, "drift.service", "Unit", "ActiveState"),
        "s \"active\""
    );

    manager(
        &sd,
        "DisableUnitFiles",
        "asb",
        &["1", "drift.service", "false"],
    );
    manager(&sd, "Reload", "", &[]);
    let s = wait_status(&actual, &dev.id, "re-enabled", |s| {
        s.drift_repairs >= 2 && all_ready(s, 1, 1)
    })
    .await;
    assert_eq!(unit_details(&s, "web").2.as_deref(), Some("enabled"));

    // The unit file edited by hand is rewritten (and the service restarted).
    let path = sd.unit_dir.join("drift.service");
    std::fs::write(&path, "[Service]\nExecStart=/bin/sleep 9\n").unwrap();
    wait_status(&actual, &dev.id, "file restored", |s| {
        s.drift_repairs >= 3 && all_ready(s, 1, 1)
    })
    .await;
    assert!(read(&path).contains("sleep 4002"));
}

#[tokio::test]
async fn a_failing_unit_is_reported_and_units_fleetlet_did_not_write_are_never_removed() {
    let env = TestEnv::builder().nats().start().await.unwrap();
    let sd = SystemdSandbox::start().await.unwrap();
    let (desired, actual, _) = buckets(&env).await;
    let dev = device("pi-unit-own", &sd);
    let _agent = dev.start(env.nats_url().unwrap(), "");
    // A unit that was on the device before fleetlet: the manifest only asks it to run.
    let theirs = sd.unit_dir.join("theirs.service");
    std::fs::write(&theirs, "[Service]\nExecStart=/bin/sleep 4003\n").unwrap();
    manager(&sd, "Reload", "", &[]);

    let failing = unit(
        "broken",
        "broken.service",
        service(
            "/bin/sh -c 'echo nope; exit 3'",
            "Type=oneshot\nRemainAfterExit=yes",
        ),
        false,
        UnitState::Started,
    );
    let existing = unit("theirs", "theirs.service", None, false, UnitState::Started);
    let missing = unit("ghost", "ghost.service", None, false, UnitState::Started);
    let no_install = unit(
        "static",
        "static.service",
        Some("[Service]\nExecStart=/bin/sleep 4004\n".into()),
        true,
        UnitState::Started,
    );
    put(
        &desired,
        &dev.manifest(1, vec![failing, existing, missing, no_install]),
    )
    .await;
    let s = wait_status(&actual, &dev.id, "settled", |s| s.observed_generation == 1).await;
    match &s.resources["broken"] {
        ResourceStatus::Failed {
            error, retry_after, ..
        } => {
            assert!(error.contains("broken.service"), "{error}");
            assert!(retry_after.is_some(), "a failed start is retried");
        }
        other => panic!("broken: {other:?}"),
    }
    assert!(
        s.resources["theirs"].is_ready(),
        "{:?}",
        s.resources["theirs"]
    );
    match &s.resources["ghost"] {
        ResourceStatus::Failed { error, .. } => assert!(error.contains("not-found"), "{error}"),
        other => panic!("ghost: {other:?}"),
    }
    match &s.resources["static"] {
        ResourceStatus::Failed {
            error, retry_after, ..
        } => {
            assert!(error.contains("no [Install] section"), "{error}");
            assert!(retry_after.is_none(), "a spec error waits for a new spec");
        }
        other => panic!("static: {other:?}"),
    }

    // Dropping them: the unit fleetlet did not write keeps running and keeps its file.
    put(&desired, &dev.manifest(2, vec![])).await;
    let s = wait_status(&actual, &dev.id, "dropped", |s| s.observed_generation == 2).await;
    assert!(theirs.exists());
    assert_eq!(
        prop(&sd, "theirs.service", "Unit", "ActiveState"),
        "s \"active\""
    );
    let orphans = s.condition("OrphansLeft").expect("OrphansLeft condition");
    assert_eq!(orphans.status, ConditionStatus::True);
    assert!(orphans.message.contains("theirs"), "{}", orphans.message);
    assert!(!sd.unit_dir.join("broken.service").exists());
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// The agent installed the way the README says, as `examples/agent/fleetlet-agent.service`
/// under a real systemd: it reaches systemd on the standard bus path, manages a unit next to
/// itself, and stopping the agent leaves that unit running.
#[tokio::test]
async fn the_agent_runs_as_a_systemd_service_from_the_example_unit() {
    let env = TestEnv::builder().nats().start().await.unwrap();
    let sd = SystemdSandbox::start().await.unwrap();
    let (desired, actual, _) = buckets(&env).await;
    let dev = Device::new("pi-installed");
    let config = dev.write_config(env.nats_url().unwrap(), "", "");
    std::fs::create_dir_all(dev.root()).unwrap();
    let example =
        read(&fleetlet_testenv::repo_root().join("examples/agent/fleetlet-agent.service"));
    assert!(
        example
            .contains("ExecStart=/usr/local/bin/fleetlet-agent --config /etc/fleetlet/agent.toml")
    );
    // Only the paths differ from a device: this build's binary, the test's config and state.
    let unit_text: String = example
        .replace(
            "/usr/local/bin/fleetlet-agent --config /etc/fleetlet/agent.toml",
            &format!(
                "{} --config {}",
                env!("CARGO_BIN_EXE_fleetlet-agent"),
                config.display()
            ),
        )
        .lines()
        .filter(|l| !l.starts_with("StateDirectory"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(sd.unit_dir.join("fleetlet-agent.service"), unit_text).unwrap();
    manager(&sd, "Reload", "", &[]);
    manager(
        &sd,
        "EnableUnitFiles",
        "asbb",
        &["1", "fleetlet-agent.service", "false", "true"],
    );
    manager(
        &sd,
        "StartUnit",
        "ss",
        &["fleetlet-agent.service", "replace"],
    );

    let job = unit(
        "sidecar",
        "sidecar.service",
        service("/bin/sleep 4005", ""),
        true,
        UnitState::Started,
    );
    put(&desired, &dev.manifest(1, vec![job])).await;
    wait_status(
        &actual,
        &dev.id,
        "sidecar started by the installed agent",
        |s| all_ready(s, 1, 1),
    )
    .await;
    assert_eq!(
        prop(&sd, "fleetlet-agent.service", "Unit", "ActiveState"),
        "s \"active\""
    );
    assert_eq!(
        prop(&sd, "fleetlet-agent.service", "Unit", "UnitFileState"),
        "s \"enabled\""
    );

    manager(
        &sd,
        "StopUnit",
        "ss",
        &["fleetlet-agent.service", "replace"],
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        prop(&sd, "fleetlet-agent.service", "Unit", "ActiveState"),
        "s \"inactive\""
    );
    assert_eq!(
        prop(&sd, "sidecar.service", "Unit", "ActiveState"),
        "s \"active\"",
        "stopping the agent leaves its workloads running"
    );
}
