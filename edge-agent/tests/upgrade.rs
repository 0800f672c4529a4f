//! The agent upgrading itself under a real systemd (the sandbox), installed with
//! `fleetlet-agent install`, with three real builds of the agent: this one (A), B (another
//! version) and C (a version that exits at start). Binaries come from an HTTPS server the
//! device trusts by its CA file, signed with the key that signs its manifests; a real
//! controller signing key answers the device's freshness floor. The device reaches NATS
//! through a proxy the test can cut.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod common;

use std::{path::PathBuf, process::Command, sync::Arc, time::Duration};

use common::*;
use fleetlet_agent::file::sha256_hex;
use fleetlet_controller::signing::Signer;
use fleetlet_protocol::{
    AgentBinary, AgentUpgradeSpec, FactsReport, FetchSource, ManagedResource, ResourceDetails,
    ResourceSpec, ResourceStatus, decode, upgrade::binary_statement,
};
use fleetlet_testenv::{
    TestEnv, eventually, https::FileServer, proxy::TcpProxy, repo_root, sandbox::SystemdSandbox,
};

const ARCH: &str = std::env::consts::ARCH;
const WAIT: Duration = Duration::from_secs(120);

/// A build of this agent reporting `version`, optionally one that exits at start; built
/// in a target directory of its own so the test binaries' agent stays as it is.
fn build(version: &str, exit_at_start: bool) -> Vec<u8> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| repo_root().join("target"), PathBuf::from)
        .join("upgrade-builds");
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args([
        "build",
        "-q",
        "-p",
        "fleetlet-agent",
        "--bin",
        "fleetlet-agent",
    ])
    .arg("-j")
    .arg(std::env::var("CARGO_BUILD_JOBS").unwrap_or_else(|_| "2".into()))
    .current_dir(repo_root())
    .env("CARGO_TARGET_DIR", &target)
    .env("FLEETLET_AGENT_VERSION", version)
    .env_remove("FLEETLET_AGENT_EXIT_AT_START");
    if exit_at_start {
        cmd.env("FLEETLET_AGENT_EXIT_AT_START", "1");
    }
    let status = cmd.status().unwrap();
    assert!(status.success(), "building agent {version}");
    std::fs::read(target.join("debug/fleetlet-agent")).unwrap()
}

struct Release<'a> {
    signer: &'a Signer,
    files: &'a FileServer,
}

impl Release<'_> {
    /// A resource upgrading to `version`, whose binary is served at `path` with `bytes`
    /// and signed for `signed_sha` (the real digest unless a test lies).
    fn upgrade(
        &self,
        version: &str,
        path: &str,
        bytes: &[u8],
        signed_sha: &str,
    ) -> ManagedResource {
        let sha = sha256_hex(bytes);
        self.files.put(path, bytes.to_vec());
        let mut r = file_at("agent", "/unused", "");
        r.spec = ResourceSpec::AgentUpgrade(AgentUpgradeSpec {
            version: version.into(),
            binaries: vec![AgentBinary {
                arch: ARCH.into(),
                fetch: FetchSource {
                    url: self.files.url(path),
                    sha256: sha,
                    size: bytes.len() as u64,
                },
                key_id: self.signer.id.clone(),
                signature: self
                    .signer
                    .sign_base64(&binary_statement(version, ARCH, signed_sha)),
            }],
            health_seconds: Some(30),
        });
        r
    }
}

#[tokio::test]
async fn the_agent_upgrades_itself_and_comes_back_from_a_version_that_does_not_start() {
    let b = build("0.1.0-b", false);
    let c = build("0.1.0-c", true);
    let a = std::fs::read(env!("CARGO_BIN_EXE_fleetlet-agent")).unwrap();
    assert!(a != b && b != c, "three different builds");

    let env = TestEnv::builder().nats().start().await.unwrap();
    let sd = SystemdSandbox::start().await.unwrap();
    let (desired, actual, _) = buckets(&env).await;
    // The version a device runs is in the facts it stores on start (before its first beat).
    let facts = env
        .jetstream()
        .await
        .unwrap()
        .get_key_value(fleetlet_protocol::kv::FACTS.name)
        .await
        .unwrap();
    let root = tempfile::tempdir().unwrap();
    let signer = Signer::generate(&root.path().join("key.pem"), None).unwrap();
    let floors = Signer::from_file(&root.path().join("key.pem"), None).unwrap();
    tokio::spawn(fleetlet_controller::signing::serve_floors(
        env.nats_client().await.unwrap(),
        Arc::new(floors),
        |_| Some(0),
    ));
    // The device reaches NATS through a link the test can cut.
    let link = TcpProxy::start(env.nats_url().unwrap().trim_start_matches("nats://"))
        .await
        .unwrap();
    let files = FileServer::start().await.unwrap();
    let ca = root.path().join("fetch-ca.pem");
    files.write_ca(&ca).unwrap();
    let release = Release {
        signer: &signer,
        files: &files,
    };

    // A is installed as the device's systemd service, trusting the signing key.
    let bin = root.path().join("bin/fleetlet-agent");
    let previous = root.path().join("bin/fleetlet-agent.previous");
    let out = Command::new(env!("CARGO_BIN_EXE_fleetlet-agent"))
        .arg("install")
        .arg(format!("--bin-path={}", bin.display()))
        .arg(format!(
            "--config-dir={}",
            root.path().join("etc").display()
        ))
        .arg(format!("--unit-dir={}", sd.unit_dir.display()))
        .arg(format!(
            "--state-dir={}",
            root.path().join("state").display()
        ))
        .arg(format!("--bus-address={}", sd.bus_address))
        .arg("--device-id=pi-upgrade")
        .arg(format!("--nats-url={}", link.nats_url()))
        .arg("--enable-kinds=file,agentUpgrade")
        .arg(format!(
            "--manifest-key={}={}",
            signer.id,
            signer.public_key_base64()
        ))
        .arg("--no-start")
        .output()
        .unwrap();
    assert!(out.status.success(), "install: {out:?}");
    let config_path = root.path().join("etc/agent.toml");
    let mut config = fleetlet_agent::Config::from_file(&config_path).unwrap();
    config.file.fetch_ca_file = Some(ca.clone());
    config.reconcile.heartbeat_interval_seconds = 1;
    config.reconcile.drift_interval_seconds = 2;
    std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();
    assert!(
        read(&sd.unit_dir.join("fleetlet-agent.service"))
            .contains("OnFailure=fleetlet-agent-rollback.service")
    );
    assert!(
        read(&sd.unit_dir.join("fleetlet-agent-rollback.service")).contains(&format!(
            "ExecStart={}.previous --config {} rollback",
            bin.display(),
            config_path.display()
        ))
    );
    sd.busctl(&[
        "call",
        "org.freedesktop.systemd1",
        "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager",
        "StartUnit",
        "ss",
        "fleetlet-agent.service",
        "replace",
    ])
    .unwrap();

    let dev = Device::new("pi-upgrade");
    let put_signed = |generation: u64, resources: Vec<ManagedResource>| {
        let sealed = signer.seal(&dev.manifest(generation, resources)).unwrap();
        let desired = desired.clone();
        async move {
            desired.put("pi-upgrade", sealed.into()).await.unwrap();
        }
    };
    let version = || {
        let facts = facts.clone();
        async move {
            let e = facts
                .entry("pi-upgrade")
                .await
                .map_err(|e| e.to_string())?
                .ok_or("no facts")?;
            let f: FactsReport = decode(&e.value).map_err(|e| e.to_string())?;
            Ok::<String, String>(f.facts.agent_version)
        }
    };
    let journal = || {
        let out = Command::new("journalctl")
            .arg("-D")
            .arg(sd.dir().join("sbx/run/log/journal"))
            .args(["--no-pager", "-n", "60"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let console = std::fs::read_to_string(sd.dir().join("sbx/console.log")).unwrap_or_default();
        let tail: Vec<&str> = console.lines().rev().take(40).collect();
        format!(
            "{out}\nconsole:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    };
    let status_of = |what: &'static str, pred: fn(&fleetlet_protocol::AgentStatus) -> bool| {
        let actual = actual.clone();
        async move {
            let deadline = tokio::time::Instant::now() + WAIT;
            let mut last = String::new();
            loop {
                if let Ok(Some(e)) = actual.entry("pi-upgrade").await
                    && let Ok(s) = decode::<fleetlet_protocol::AgentStatus>(&e.value)
                {
                    if pred(&s) {
                        return s;
                    }
                    last = format!("{s:#?}");
                }
                if tokio::time::Instant::now() >= deadline {
                    panic!(
                        "timed out waiting for {what}; last status: {last}\njournal:\n{}",
                        journal()
                    );
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    // The version the device's facts report, once they report `want`.
    let running = |want: &'static str| async move {
        eventually(&format!("facts from {want}"), WAIT, || async {
            version()
                .await
                .and_then(|v| (v == want).then_some(()).ok_or(format!("running {v}")))
        })
        .await
    };
    eventually("A reports", WAIT, || async {
        version().await.and_then(|v| {
            (v == env!("CARGO_PKG_VERSION"))
                .then_some(())
                .ok_or(format!("running {v}"))
        })
    })
    .await;

    // A → B: downloaded, checked, swapped in, restarted into, confirmed.
    put_signed(
        1,
        vec![release.upgrade("0.1.0-b", "/b", &b, &sha256_hex(&b))],
    )
    .await;
    let s = status_of("upgraded to B", |s| {
        s.observed_generation == 1 && s.resources.get("agent").is_some_and(|r| r.is_ready())
    })
    .await;
    match s.resources["agent"].details() {
        Some(ResourceDetails::AgentUpgrade { version, previous }) => {
            assert_eq!(version, "0.1.0-b");
            assert_eq!(previous.as_deref(), Some(env!("CARGO_PKG_VERSION")));
        }
        _ => panic!("{:?}", s.resources["agent"]),
    }
    running("0.1.0-b").await;
    assert!(std::fs::read(&bin).unwrap() == b, "B is in place");
    assert!(std::fs::read(&previous).unwrap() == a, "A is kept");

    // Tampered: the server's bytes are not the signed ones. Refused after the download,
    // before anything is written in place.
    let mut tampered = b.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 0xff;
    let forged = release.upgrade("0.1.0-x", "/x", &b, &sha256_hex(&b));
    files.put("/x", tampered);
    put_signed(2, vec![forged]).await;
    let s = status_of("tampered download refused", |s| {
        s.observed_generation == 2
            && matches!(
                s.resources.get("agent"),
                Some(ResourceStatus::Failed {
                    permanent: true,
                    ..
                })
            )
    })
    .await;
    let error = format!("{:?}", s.resources["agent"]);
    assert!(error.contains("not the one signed"), "{error}");
    assert!(std::fs::read(&bin).unwrap() == b, "B still in place");

    // A signature over another digest: refused before anything is downloaded.
    let before = files.served().len();
    put_signed(
        3,
        vec![release.upgrade("0.1.0-c", "/c-unsigned", &c, &sha256_hex(&b))],
    )
    .await;
    let s = status_of("bad signature refused", |s| {
        s.observed_generation == 3
            && matches!(
                s.resources.get("agent"),
                Some(ResourceStatus::Failed {
                    permanent: true,
                    ..
                })
            )
    })
    .await;
    let error = format!("{:?}", s.resources["agent"]);
    assert!(error.contains("signature does not match"), "{error}");
    assert!(
        files.served()[before..]
            .iter()
            .all(|r| r.path != "/c-unsigned"),
        "nothing downloaded"
    );
    assert!(std::fs::read(&bin).unwrap() == b);

    // B → A with the device's link cut right after the swap: A cannot reach its control
    // plane within healthSeconds, puts B back and restarts it; B reports the upgrade
    // Failed once the link is back.
    let is = |want: &[u8]| std::fs::read(&bin).is_ok_and(|x| x == want);
    let mut to_a = release.upgrade(env!("CARGO_PKG_VERSION"), "/a", &a, &sha256_hex(&a));
    if let ResourceSpec::AgentUpgrade(u) = &mut to_a.spec {
        u.health_seconds = Some(10);
    }
    let served_before = files.served().len();
    put_signed(4, vec![to_a]).await;
    // Cut once A is downloaded: B swaps it in and restarts without NATS, so A never
    // reaches it.
    eventually("A downloaded", WAIT, || async {
        files.served()[served_before..]
            .iter()
            .any(|r| r.path == "/a" && r.status == 200)
            .then_some(())
            .ok_or("not yet".to_owned())
    })
    .await;
    link.cut();
    eventually("A swapped in", WAIT, || async {
        is(&a).then_some(()).ok_or("not yet".to_owned())
    })
    .await;
    eventually("B put back by A", WAIT, || async {
        is(&b).then_some(()).ok_or("not yet".to_owned())
    })
    .await;
    link.heal();
    let s = status_of("A rolled back", |s| {
        s.observed_generation == 4
            && matches!(s.resources.get("agent"), Some(ResourceStatus::Failed { error, .. }) if error.contains("did not reach its control plane within 10 s"))
    })
    .await;
    assert!(
        format!("{:?}", s.resources["agent"]).contains("0.1.0-b was put back"),
        "{s:#?}"
    );
    running("0.1.0-b").await;

    // B → C, which exits at start: systemd gives up on it, the rollback unit puts B back
    // and starts it, and B reports the upgrade Failed.
    put_signed(
        5,
        vec![release.upgrade("0.1.0-c", "/c", &c, &sha256_hex(&c))],
    )
    .await;
    let s = status_of("C rolled back", |s| {
        s.observed_generation == 5
            && matches!(s.resources.get("agent"), Some(ResourceStatus::Failed { error, .. }) if error.contains("did not stay up"))
    })
    .await;
    assert!(
        format!("{:?}", s.resources["agent"]).contains("0.1.0-b was put back"),
        "{s:#?}"
    );
    running("0.1.0-b").await;
    assert!(std::fs::read(&bin).unwrap() == b, "B is back in place");
    assert!(
        files
            .served()
            .iter()
            .any(|r| r.path == "/c" && r.status == 200),
        "C was downloaded"
    );
}
