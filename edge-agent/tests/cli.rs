//! The operator-facing commands: `check-config` and `--once`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::process::Command;

use fleetlet_protocol::{AgentStatus, ResourceStatus};

fn agent() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fleetlet-agent"));
    c.env_remove("FLEETLET_CONFIG").env("FLEETLET_LOG", "warn");
    c
}

fn config(dir: &std::path::Path, body: &str) -> std::path::PathBuf {
    let p = dir.join("agent.toml");
    std::fs::write(&p, body).unwrap();
    p
}

#[test]
fn check_config_explains_what_is_wrong_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        "device_id = \"Kitchen.Pi\"\n[nats]\nurls = [\"nats://127.0.0.1:4222\"]\n",
    );
    let out = agent()
        .arg("--config")
        .arg(&cfg)
        .arg("check-config")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid configuration") && err.contains("device id"),
        "{err}"
    );

    let out = agent()
        .arg("--config")
        .arg(dir.path().join("missing.toml"))
        .arg("check-config")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read config file"));
}

#[test]
fn check_config_prints_the_effective_settings_with_overrides() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        &format!(
            "device_id = \"pi-1\"\nstate_dir = \"{}\"\n[nats]\nurls = [\"nats://127.0.0.1:4222\"]\n",
            dir.path().display()
        ),
    );
    let out = agent()
        .arg("--config")
        .arg(&cfg)
        .args(["--device-id", "pi-2", "check-config"])
        .env(
            "FLEETLET_NATS_URL",
            "nats://127.0.0.1:5222,nats://127.0.0.2:5222",
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("configuration OK"));
    assert!(text.contains("device:          pi-2"), "{text}");
    assert!(
        text.contains("nats://127.0.0.1:5222, nats://127.0.0.2:5222"),
        "{text}"
    );
}

#[test]
fn once_applies_a_manifest_file_without_nats_and_prints_the_status() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let cfg = config(
        dir.path(),
        &format!(
            "device_id = \"pi-once\"\nstate_dir = \"{}\"\n[nats]\nurls = [\"nats://127.0.0.1:1\"]\n[trust]\nallow_unsigned = true\n[file]\nallowed_roots = [\"{}\"]\n",
            dir.path().join("state").display(),
            root.display()
        ),
    );
    let manifest = dir.path().join("manifest.json");
    std::fs::write(
        &manifest,
        serde_json::to_vec(&serde_json::json!({
            "apiVersion": "fleetlet.dev/v1alpha1", "device": "pi-once", "generation": 3,
            "resources": [{ "id": "hello", "owner": { "kind": "EdgeManifest", "namespace": "n", "name": "m" },
                            "file": { "path": root.join("hello.txt").display().to_string(), "content": { "text": "hi\n" } } }]
        }))
        .unwrap(),
    )
    .unwrap();
    let out = agent()
        .arg("--config")
        .arg(&cfg)
        .arg("--once")
        .arg("--manifest")
        .arg(&manifest)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: AgentStatus = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status.observed_generation, 3);
    assert!(matches!(
        status.resources["hello"],
        ResourceStatus::Ready { .. }
    ));
    assert_eq!(
        std::fs::read_to_string(root.join("hello.txt")).unwrap(),
        "hi\n"
    );

    // Without --manifest, --once re-applies the stored one (repairing a hand edit).
    std::fs::write(root.join("hello.txt"), "changed").unwrap();
    let out = agent()
        .arg("--config")
        .arg(&cfg)
        .arg("--once")
        .output()
        .unwrap();
    assert!(out.status.success());
    let status: AgentStatus = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status.drift_repairs, 1);
    assert_eq!(
        std::fs::read_to_string(root.join("hello.txt")).unwrap(),
        "hi\n"
    );
}

#[test]
fn logs_written_to_a_file_or_the_journal_carry_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        &format!(
            "device_id = \"pi-log\"\nstate_dir = \"{}\"\n[nats]\nurls = [\"nats://127.0.0.1:1\"]\n[trust]\nallow_unsigned = true\n",
            dir.path().join("state").display()
        ),
    );
    let manifest = dir.path().join("manifest.json");
    std::fs::write(
        &manifest,
        r#"{"apiVersion":"fleetlet.dev/v1alpha1","device":"pi-log","generation":1,"resources":[]}"#,
    )
    .unwrap();
    // stderr is a pipe here, as it is for `fleetlet-agent > agent.log 2>&1` and under
    // systemd: the log must be plain text.
    let run = |journal: bool| {
        let mut c = agent();
        c.env("FLEETLET_LOG", "info")
            .arg("--config")
            .arg(&cfg)
            .arg("--once")
            .arg("--manifest")
            .arg(&manifest);
        if journal {
            c.env("JOURNAL_STREAM", "8:12345");
        } else {
            c.env_remove("JOURNAL_STREAM");
        }
        let out = c.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stderr).unwrap()
    };
    let file = run(false);
    assert!(file.contains("INFO"), "no log lines to check: {file}");
    assert!(
        !file.contains('\x1b'),
        "colour codes in a log file: {file:?}"
    );
    // Each line starts with its own timestamp, e.g. 2026-11-29T22:38:11.123456Z.
    assert!(file.lines().all(|l| l.starts_with("20")), "{file}");
    // Under systemd the journal adds the time: lines start with the level.
    let journal = run(true);
    assert!(!journal.contains('\x1b'), "{journal:?}");
    assert!(
        journal.lines().all(|l| l.trim_start().starts_with("INFO")
            || l.trim_start().starts_with("WARN")
            || l.trim_start().starts_with("ERROR")),
        "{journal}"
    );
}

#[test]
fn once_takes_a_signed_manifest_as_stored_and_refuses_a_forged_one() {
    use fleetlet_controller::signing::Signer;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let signer = Signer::generate(&dir.path().join("key.pem"), None).unwrap();
    let cfg = config(
        dir.path(),
        &format!(
            "device_id = \"pi-signed\"\nstate_dir = \"{}\"\n[nats]\nurls = [\"nats://127.0.0.1:1\"]\n\
             [trust.manifest_keys]\n\"{}\" = \"{}\"\n[file]\nallowed_roots = [\"{}\"]\n",
            dir.path().join("state").display(),
            signer.id,
            signer.public_key_base64(),
            root.display()
        ),
    );
    let file = root.join("signed.txt");
    let mut m = fleetlet_protocol::AgentManifest::new(
        fleetlet_protocol::DeviceId::new("pi-signed").unwrap(),
        2,
    );
    m.resources.push(
        serde_json::from_value(serde_json::json!({
            "id": "signed", "owner": { "kind": "EdgeManifest", "namespace": "n", "name": "m" },
            "file": { "path": file.display().to_string(), "content": { "text": "signed\n" } }
        }))
        .unwrap(),
    );
    let run = |bytes: &[u8]| {
        let path = dir.path().join("manifest.json");
        std::fs::write(&path, bytes).unwrap();
        agent()
            .arg("--config")
            .arg(&cfg)
            .arg("--once")
            .arg("--manifest")
            .arg(&path)
            .output()
            .unwrap()
    };

    // A forged envelope (the text changed after signing) is refused, and nothing is written.
    let sealed = signer.seal(&m).unwrap();
    let forged = String::from_utf8(sealed.clone())
        .unwrap()
        .replace("signed\\\\n", "forged\\\\n");
    assert_ne!(
        forged.as_bytes(),
        &sealed[..],
        "the forgery changed something"
    );
    let out = run(forged.as_bytes());
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("BadSignature"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!file.exists(), "nothing is applied from a forged manifest");

    // The signed manifest as the controller stores it, envelope and all, is applied.
    let out = run(&sealed);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "signed\n");
}
