//! The agent's SystemdUnit reconciler against a real systemd (PID 1 of private namespaces,
//! started by `scripts/systemd-sandbox`) over its D-Bus API, driven through real NATS.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod common;

use common::*;
use fleetlet_protocol::{
    ConditionStatus, ManagedResource, ResourceDetails, ResourceSpec, ResourceStatus,
    SystemdUnitSpec, UnitState,
};
use fleetlet_testenv::{
    DEFAULT_TIMEOUT, TestEnv, process::Service, sandbox::SystemdSandbox, wait::until,
};

fn unit(
    id: &str,
    name: &str,
    contents: Option<String>,
    enabled: bool,
    state: UnitState,
) -> ManagedResource {
    let mut r = file_at(id, "/unused", "");
    r.spec = ResourceSpec::SystemdUnit(SystemdUnitSpec {
        restart_on: Vec::new(),
        restart_digest: None,
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

/// Waits until `unit`'s ActiveState is `want` (as busctl prints it, e.g. `s "inactive"`).
async fn wait_active_state(sd: &SystemdSandbox, unit: &str, want: &str) {
    until(
        &format!("{unit} ActiveState {want}"),
        DEFAULT_TIMEOUT,
        || async { prop(sd, unit, "Unit", "ActiveState") },
        |s| s == want,
    )
    .await;
}

/// Sends `signal` (STOP, CONT) to the agent process itself, not its watchdog.
fn signal(agent: &Service, signal: &str) {
    let pid = agent.program_pid().expect("the agent's pid");
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
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
    match s.resources[id].details() {
        Some(ResourceDetails::SystemdUnit {
            active_state,
            sub_state,
            unit_file_state,
            ..
        }) => (
            active_state.clone(),
            sub_state.clone(),
            unit_file_state.clone(),
        ),
        _ => panic!("{id}: {:?}", s.resources[id]),
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
    let agent = dev.start(env.nats_url().unwrap(), "");
    let r = unit(
        "web",
        "drift.service",
        service("/bin/sleep 4002", ""),
        true,
        UnitState::Started,
    );
    put(&desired, &dev.manifest(1, vec![r])).await;
    wait_status(&actual, &dev.id, "started", |s| all_ready(s, 1, 1)).await;

    // StopUnit returns once the job is queued. The agent is paused until the stop is done,
    // so its next drift pass sees the unit inactive, not deactivating (or already back).
    signal(&agent, "STOP");
    manager(&sd, "StopUnit", "ss", &["drift.service", "replace"]);
    wait_active_state(&sd, "drift.service", "s \"inactive\"").await;
    signal(&agent, "CONT");
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
    let mut dev = device("pi-unit-own", &sd);
    // The owner lets manifests manage these two although fleetlet did not write them.
    dev.sections
        .push_str("foreign_units = [\"theirs.service\", \"ghost*\"]\n");
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
            error,
            retry_after,
            permanent,
            ..
        } => {
            assert!(error.contains("broken.service"), "{error}");
            assert!(retry_after.is_some(), "a failed start is retried");
            assert!(!permanent, "a failed start is transient");
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
            error,
            retry_after,
            permanent,
            ..
        } => {
            assert!(error.contains("no [Install] section"), "{error}");
            assert!(retry_after.is_none(), "a spec error waits for a new spec");
            assert!(permanent, "a spec error is reported permanent");
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
}

/// The device owner's policy: a manifest cannot stop D-Bus or systemd's own units, touch
/// the agent's own unit or a login service, or manage (or overwrite) a unit fleetlet did not
/// write unless the owner lists it. Each is refused for good, and the unit is untouched.
#[tokio::test]
async fn units_the_device_owner_did_not_hand_over_are_never_touched() {
    let env = TestEnv::builder().nats().start().await.unwrap();
    let sd = SystemdSandbox::start().await.unwrap();
    let (desired, actual, _) = buckets(&env).await;
    let dev = device("pi-unit-policy", &sd);
    let _agent = dev.start(env.nats_url().unwrap(), "");
    // A unit the owner runs, not written by fleetlet and not listed.
    let theirs = sd.unit_dir.join("owners.service");
    let original = "[Service]\nExecStart=/bin/sleep 4010\n";
    std::fs::write(&theirs, original).unwrap();
    // And one of theirs on disk only.
    let theirs_too = sd.unit_dir.join("owners-too.service");
    std::fs::write(&theirs_too, original).unwrap();
    manager(&sd, "Reload", "", &[]);
    manager(&sd, "StartUnit", "ss", &["owners.service", "replace"]);
    wait_active_state(&sd, "owners.service", "s \"active\"").await;
    wait_active_state(&sd, "dbus.service", "s \"active\"").await;

    let stop = |id: &str, name: &str| unit(id, name, None, false, UnitState::Stopped);
    put(
        &desired,
        &dev.manifest(
            1,
            vec![
                stop("dbus", "dbus.service"),
                stop("journal", "systemd-journald.service"),
                stop("owners", "owners.service"),
                unit(
                    "replace",
                    "owners-too.service",
                    service("/bin/sleep 4011", ""),
                    true,
                    UnitState::Started,
                ),
                unit(
                    "agent",
                    "fleetlet-agent.service",
                    service("/bin/false", ""),
                    false,
                    UnitState::Started,
                ),
                stop("ssh", "ssh.service"),
                // Still allowed: a unit of fleetlet's own.
                unit(
                    "mine",
                    "mine.service",
                    service("/bin/sleep 4012", ""),
                    false,
                    UnitState::Started,
                ),
            ],
        ),
    )
    .await;
    let s = wait_status(&actual, &dev.id, "settled", |s| s.observed_generation == 1).await;
    for (id, why) in [
        ("dbus", "belongs to the system"),
        ("journal", "belongs to the system"),
        ("owners", "was not created by fleetlet"),
        ("replace", "exists and was not written by fleetlet"),
        ("agent", "the agent's own unit"),
        ("ssh", "login service"),
    ] {
        assert_forbidden(&s, id, why);
    }
    assert!(s.resources["mine"].is_ready(), "{:?}", s.resources["mine"]);
    // What was refused is untouched: D-Bus and the owner's unit run, its file is theirs.
    assert_eq!(
        prop(&sd, "dbus.service", "Unit", "ActiveState"),
        "s \"active\""
    );
    assert_eq!(
        prop(&sd, "systemd-journald.service", "Unit", "ActiveState"),
        "s \"active\""
    );
    assert_eq!(
        prop(&sd, "owners.service", "Unit", "ActiveState"),
        "s \"active\""
    );
    assert_eq!(std::fs::read_to_string(&theirs).unwrap(), original);
    assert_eq!(std::fs::read_to_string(&theirs_too).unwrap(), original);
    assert!(!sd.unit_dir.join("fleetlet-agent.service").exists());
}

/// `fleetlet-agent install` under a real systemd: it copies the binary, writes the config
/// and the unit (the example unit with this install's paths), and enables and starts it over
/// D-Bus. The installed agent reaches systemd on the standard bus path, manages a unit next to
/// itself, and stopping the agent leaves that unit running. `uninstall --purge` then removes
/// the agent and its files, and still leaves the workload alone.
#[tokio::test]
async fn the_agent_installs_itself_as_a_systemd_service_and_uninstalls() {
    let env = TestEnv::builder().nats().start().await.unwrap();
    let sd = SystemdSandbox::start().await.unwrap();
    let (desired, actual, _) = buckets(&env).await;
    let dev = Device::new("pi-installed");
    let root = tempfile::tempdir().unwrap();
    let creds = root.path().join("given.creds");
    std::fs::write(&creds, "not used by this server\n").unwrap();
    let bus = sd.bus_address.clone();
    let layout = |extra: &[&str]| {
        let mut args: Vec<String> = vec![
            format!(
                "--bin-path={}",
                root.path().join("bin/fleetlet-agent").display()
            ),
            format!("--config-dir={}", root.path().join("etc").display()),
            format!("--unit-dir={}", sd.unit_dir.display()),
            format!("--state-dir={}", root.path().join("state").display()),
            format!("--bus-address={bus}"),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let agent = |args: Vec<String>| {
        std::process::Command::new(env!("CARGO_BIN_EXE_fleetlet-agent"))
            .args(args)
            .output()
            .unwrap()
    };
    let mut install = vec!["install".to_string()];
    install.extend(layout(&[
        "--device-id=pi-installed",
        &format!("--nats-url={}", env.nats_url().unwrap()),
        &format!("--nats-creds={}", creds.display()),
        "--enable-kinds=file,systemdUnit",
        // This test writes unsigned manifests (signed ones: tests/tests/signing.rs).
        "--allow-unsigned",
    ]));
    // The given creds are copied privately and named in the config; this test's server
    // takes no credentials, so the line is dropped below before the agent connects.
    let out = agent(install.clone());
    assert!(out.status.success(), "install: {out:?}");
    let copied = root.path().join("etc/nats.creds");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&copied).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let config = root.path().join("etc/agent.toml");
    assert_eq!(
        std::fs::metadata(&config).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let unit_text = read(&sd.unit_dir.join("fleetlet-agent.service"));
    assert!(unit_text.contains(&format!(
        "ExecStart={} --config {}",
        root.path().join("bin/fleetlet-agent").display(),
        config.display()
    )));
    assert!(unit_text.contains("KillMode=process"));
    assert_eq!(
        prop(&sd, "fleetlet-agent.service", "Unit", "UnitFileState"),
        "s \"enabled\""
    );

    // A second install without --force refuses and changes nothing.
    let before = read(&config);
    let again = agent(install.clone());
    assert_eq!(again.status.code(), Some(2), "{again:?}");
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    assert_eq!(read(&config), before);
    // A bad device id is refused before anything is written, even with --force (which
    // would replace this installation's config and unit).
    let unit_file = sd.unit_dir.join("fleetlet-agent.service");
    let unit_before = read(&unit_file);
    let bad: Vec<String> = install
        .iter()
        .map(|a| {
            if a.starts_with("--device-id=") {
                "--device-id=Not_A_Name".to_string()
            } else {
                a.clone()
            }
        })
        .chain(["--force".to_string()])
        .collect();
    assert_ne!(bad, install, "the device id argument was replaced");
    let out = agent(bad);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("device id"), "{stderr}");
    assert_eq!(read(&config), before, "config untouched");
    assert_eq!(read(&unit_file), unit_before, "unit untouched");

    // The installed agent runs; without the creds line it connects to this open server.
    let text = read(&config).replace(&format!("creds_file = \"{}\"\n", copied.display()), "");
    std::fs::write(&config, text).unwrap();
    manager(
        &sd,
        "RestartUnit",
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

    manager(
        &sd,
        "StopUnit",
        "ss",
        &["fleetlet-agent.service", "replace"],
    );
    wait_active_state(&sd, "fleetlet-agent.service", "s \"inactive\"").await;
    assert_eq!(
        prop(&sd, "sidecar.service", "Unit", "ActiveState"),
        "s \"active\"",
        "stopping the agent leaves its workloads running"
    );

    let mut uninstall = vec!["uninstall".to_string()];
    uninstall.extend(layout(&["--purge"]));
    let out = agent(uninstall);
    assert!(out.status.success(), "uninstall: {out:?}");
    assert!(!sd.unit_dir.join("fleetlet-agent.service").exists());
    assert!(!root.path().join("bin/fleetlet-agent").exists());
    assert!(!root.path().join("etc").exists());
    assert_ne!(
        prop(&sd, "fleetlet-agent.service", "Unit", "UnitFileState"),
        "s \"enabled\""
    );
    assert_eq!(
        prop(&sd, "sidecar.service", "Unit", "ActiveState"),
        "s \"active\"",
        "uninstalling the agent leaves its workloads running"
    );
}

/// `restartOn`: a unit that reads a File is restarted once when the File's spec changes,
/// after the File is written, and not for anything else; a `restartOn` naming no resource
/// of the manifest fails that unit alone and leaves it running as it was.
#[tokio::test]
async fn a_unit_restarts_once_when_the_file_it_reads_changes() {
    let env = TestEnv::builder().nats().start().await.unwrap();
    let sd = SystemdSandbox::start().await.unwrap();
    let (desired, actual, _) = buckets(&env).await;
    let dev = device("pi-restart-on", &sd);
    let _agent = dev.start(env.nats_url().unwrap(), "");
    let conf = dev.file("app.conf");
    let seen = dev.file("seen.log");
    // The unit prints its config file where the test can read it, once per start.
    let reader = |restart_on: &[&str]| {
        let mut r = unit(
            "app",
            "app.service",
            service(
                &format!(
                    "/bin/sh -c 'cat {} >> {}; exec /bin/sleep 4005'",
                    conf.display(),
                    seen.display()
                ),
                "",
            ),
            false,
            UnitState::Started,
        );
        if let ResourceSpec::SystemdUnit(u) = &mut r.spec {
            u.restart_on = restart_on
                .iter()
                .map(|s| fleetlet_protocol::ResourceId::new(*s).unwrap())
                .collect();
        }
        r
    };
    let manifest = |generation, text: &str, other: &str, restart_on: &[&str]| {
        dev.manifest(
            generation,
            vec![
                // The unit comes first in the manifest: the File is still applied first.
                reader(restart_on),
                dev.file_resource("conf", "app.conf", text),
                dev.file_resource("other", "other.conf", other),
            ],
        )
    };
    let seen_is = |want: &'static str| {
        let seen = seen.clone();
        async move {
            until(
                &format!("the unit to have printed {want:?}"),
                DEFAULT_TIMEOUT,
                || async { std::fs::read_to_string(&seen).unwrap_or_default() },
                |s| s == want,
            )
            .await;
        }
    };

    put(&desired, &manifest(1, "v1\n", "x", &["conf"])).await;
    wait_status(&actual, &dev.id, "all applied", |s| all_ready(s, 1, 3)).await;
    seen_is("v1\n").await;
    let pid1 = prop(&sd, "app.service", "Service", "MainPID");

    // The file it reads changes: written, then the unit restarted once, reading the new one.
    put(&desired, &manifest(2, "v2\n", "x", &["conf"])).await;
    wait_status(&actual, &dev.id, "v2 applied", |s| all_ready(s, 2, 3)).await;
    seen_is("v1\nv2\n").await;
    let pid2 = prop(&sd, "app.service", "Service", "MainPID");
    assert_ne!(pid1, pid2);
    assert!(read(&sd.unit_dir.join("app.service")).contains("# Restarted when conf change"));

    // A file it does not name changes: no restart, through several drift passes.
    put(&desired, &manifest(3, "v2\n", "y", &["conf"])).await;
    wait_status(&actual, &dev.id, "other applied", |s| all_ready(s, 3, 3)).await;
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(read(&seen), "v1\nv2\n");
    assert_eq!(prop(&sd, "app.service", "Service", "MainPID"), pid2);

    // restartOn names nothing on the device: the unit fails alone, still running as it was.
    put(&desired, &manifest(4, "v3\n", "y", &["missing"])).await;
    let s = wait_status(&actual, &dev.id, "the unit refused", |s| {
        s.observed_generation == 4
            && matches!(s.resources.get("app"), Some(ResourceStatus::Failed { .. }))
            && matches!(s.resources.get("conf"), Some(ResourceStatus::Ready { .. }))
    })
    .await;
    match &s.resources["app"] {
        ResourceStatus::Failed { error, .. } => {
            assert!(error.contains("restartOn names missing"), "{error}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(prop(&sd, "app.service", "Service", "MainPID"), pid2);
    assert_eq!(
        read(&seen),
        "v1\nv2\n",
        "not restarted for the refused spec"
    );
}
