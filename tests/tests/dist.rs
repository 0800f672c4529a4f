//! What ships: static agent binaries for each device architecture (x86_64, aarch64 and
//! armv7; the ARM ones run here under qemu-user-static, doing a real reconcile), and the
//! controller and bridge images, built offline by `scripts/images` from `FROM scratch`
//! Containerfiles and run with podman.
//!
//! The binaries come from `scripts/dist --profile dist-check` (unoptimised; release builds
//! use the same targets and flags) in `target/dist-check/`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::{path::Path, process::Command};

use fleetlet_testenv::{chart::checked, repo_root, sandbox::PodmanSandbox};

fn dist() -> &'static Path {
    fleetlet_testenv::release::dist_check().unwrap()
}

/// (e_machine, has a PT_INTERP program header) of an ELF file.
fn elf_facts(path: &Path) -> (u16, bool) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..4], b"\x7fELF", "{} is not ELF", path.display());
    let is64 = b[4] == 2;
    assert_eq!(b[5], 1, "little-endian");
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let machine = u16_at(18);
    let (phoff, phentsize, phnum) = if is64 {
        (
            u64_at(32) as usize,
            u16_at(54) as usize,
            u16_at(56) as usize,
        )
    } else {
        (
            u32_at(28) as usize,
            u16_at(42) as usize,
            u16_at(44) as usize,
        )
    };
    const PT_INTERP: u32 = 3;
    let interp = (0..phnum).any(|i| u32_at(phoff + i * phentsize) == PT_INTERP);
    (machine, interp)
}

#[test]
fn agent_binaries_are_static_and_reconcile_on_each_device_architecture() {
    let out = dist();
    let armv7 = std::fs::read_dir(out)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("armv7-"))
        .expect("an armv7 build");
    for (target, machine, runner) in [
        ("x86_64-unknown-linux-musl", 0x3e, None),
        (
            "aarch64-unknown-linux-musl",
            0xb7,
            Some("qemu-aarch64-static"),
        ),
        (armv7.as_str(), 0x28, Some("qemu-arm-static")),
    ] {
        let bin = out.join(target).join("fleetlet-agent");
        let (m, interp) = elf_facts(&bin);
        assert_eq!(m, machine, "{target}: ELF machine");
        assert!(!interp, "{target}: dynamically linked (has an interpreter)");
        let run = |args: &[&str]| {
            let mut cmd = match runner {
                Some(r) => {
                    let mut c = Command::new(r);
                    c.arg(&bin);
                    c
                }
                None => Command::new(&bin),
            };
            cmd.args(args).env("FLEETLET_LOG", "warn");
            cmd.output().unwrap()
        };
        let version = run(&["--version"]);
        assert!(
            String::from_utf8_lossy(&version.stdout).starts_with("fleetlet-agent 0.1.0"),
            "{target}: {version:?}"
        );

        // A real reconcile under emulation: one file, through the agent's File reconciler.
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "device_id = \"pi-{m}\"\nstate_dir = \"{state}\"\n[nats]\nurls = [\"nats://127.0.0.1:1\"]\n\
                 [reconcile]\nenabled_kinds = [\"file\"]\n[trust]\nallow_unsigned = true\n[file]\nallowed_roots = [\"/etc/fleetlet\"]\npath_prefix = \"{root}\"\n",
                state = dir.path().join("state").display(),
                root = dir.path().join("root").display(),
            ),
        )
        .unwrap();
        let manifest = dir.path().join("manifest.json");
        std::fs::write(
            &manifest,
            serde_json::json!({
                "apiVersion": "fleetlet.dev/v1alpha1", "kind": "AgentManifest",
                "device": format!("pi-{m}"), "generation": 1,
                "resources": [{ "id": "hello",
                    "owner": { "kind": "EdgeManifest", "namespace": "default", "name": "hello" },
                    "file": {
                    "path": "/etc/fleetlet/hello", "content": { "text": format!("hello from {target}\n") } } }]
            })
            .to_string(),
        )
        .unwrap();
        let once = run(&[
            "--config",
            config.to_str().unwrap(),
            "--once",
            "--manifest",
            manifest.to_str().unwrap(),
        ]);
        assert!(once.status.success(), "{target}: {once:?}");
        let status: serde_json::Value = serde_json::from_slice(&once.stdout).unwrap();
        assert_eq!(status["observedGeneration"], 1, "{target}: {status}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("root/etc/fleetlet/hello")).unwrap(),
            format!("hello from {target}\n")
        );
    }
}

#[tokio::test]
async fn control_plane_images_build_offline_from_scratch_and_run() {
    let out = dist();
    let pm = PodmanSandbox::start().await.unwrap();
    let mut images = Command::new(repo_root().join("scripts/images"));
    images
        .args(["--arch", "amd64", "--tag", "test", "--dist"])
        .arg(out)
        .current_dir(repo_root())
        .envs(pm.cli_env.iter().map(|(k, v)| (k, v)));
    let built = checked("scripts/images", images).unwrap();
    let listing = String::from_utf8_lossy(&built.stdout);
    for component in ["controller", "bridge"] {
        let image = format!("localhost/fleetlet/fleetlet-{component}:test-amd64");
        assert!(listing.contains(&image), "{listing}");
        let version = pm
            .podman(&["run", "--rm", "--network", "none", &image, "--version"])
            .unwrap();
        assert!(
            version.starts_with(&format!("fleetlet-{component} 0.1.0")),
            "{version}"
        );
        // Non-root, two layers (trust store and binary), nothing else: not even a shell.
        let facts = pm
            .podman(&[
                "image",
                "inspect",
                "--format",
                "{{.Config.User}} {{len .RootFS.Layers}} {{.Architecture}}",
                &image,
            ])
            .unwrap();
        assert_eq!(facts.trim(), "65532:65532 2 amd64");
        assert!(
            pm.podman(&[
                "run",
                "--rm",
                "--network",
                "none",
                "--entrypoint",
                "/bin/sh",
                &image,
                "-c",
                "true"
            ])
            .is_err(),
            "the image has a shell"
        );
        // The manifest list for multi-arch pushes.
        let list = pm
            .podman(&[
                "manifest",
                "inspect",
                &format!("localhost/fleetlet/fleetlet-{component}:test"),
            ])
            .unwrap();
        assert!(list.contains("amd64"), "{list}");
    }
}

/// `scripts/release` to a registry: each component's image as a manifest list, the agent
/// binaries with checksums that verify, and the chart as an OCI artifact whose defaults
/// point at those images; then `helm install` from the registry, as a user would.
#[tokio::test]
async fn release_pushes_images_and_a_chart_that_helm_installs_from_the_registry() {
    let out = dist();
    let pm = PodmanSandbox::start().await.unwrap();
    let env = fleetlet_testenv::TestEnv::builder()
        .kube()
        .start()
        .await
        .unwrap();
    let work = tempfile::tempdir().unwrap();
    let registry = format!("{}/fleetlet-release", pm.registry);
    let artifacts = work.path().join("out");
    let helm_home = work.path().join("helm");
    let printed = fleetlet_testenv::release::release(
        &registry,
        "0.1.0",
        out,
        &artifacts,
        &helm_home,
        &pm.cli_env,
    )
    .unwrap();
    assert!(
        printed.contains(&format!("oci://{registry}/charts/fleetlet --version 0.1.0")),
        "{printed}"
    );

    // The agent binaries, one per device architecture, and checksums that verify.
    let sums = std::fs::read_to_string(artifacts.join("SHA256SUMS")).unwrap();
    for target in ["x86_64-unknown-linux-musl", "aarch64-unknown-linux-musl"] {
        assert!(
            sums.contains(&format!("fleetlet-agent-0.1.0-{target}")),
            "{sums}"
        );
    }
    assert!(sums.contains("fleetlet-agent-0.1.0-armv7"), "{sums}");
    let check = Command::new("sha256sum")
        .args(["-c", "SHA256SUMS"])
        .current_dir(&artifacts)
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");

    // Both images in the registry, as manifest lists (asked over the registry's HTTP API).
    let (host, repo) = registry.split_once('/').unwrap();
    for component in ["controller", "bridge"] {
        let out = Command::new("curl")
            .args(["-sf", "-H"])
            .arg(
                "Accept: application/vnd.oci.image.index.v1+json, \
                 application/vnd.docker.distribution.manifest.list.v2+json",
            )
            .arg(format!(
                "http://{host}/v2/{repo}/fleetlet-{component}/manifests/0.1.0"
            ))
            .output()
            .unwrap();
        let list: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{component}: {e}: {out:?}"));
        let arches: Vec<&str> = list["manifests"]
            .as_array()
            .unwrap_or_else(|| panic!("not a manifest list: {list}"))
            .iter()
            .filter_map(|m| m["platform"]["architecture"].as_str())
            .collect();
        assert_eq!(arches, ["amd64"], "{list}");
    }

    // helm install from the registry: the chart's images are the pushed ones.
    let mut install = env.helm().unwrap();
    install
        .args(["install", "fleetlet"])
        .arg(format!("oci://{registry}/charts/fleetlet"))
        .args(["--version", "0.1.0", "--plain-http"])
        .args(["-n", "fleetlet-system", "--create-namespace"]);
    checked("helm install from the registry", install).unwrap();
    let deployments: kube::Api<k8s_openapi::api::apps::v1::Deployment> =
        kube::Api::namespaced(env.kube_client().await.unwrap(), "fleetlet-system");
    for component in ["controller", "bridge"] {
        let d = deployments
            .get(&format!("fleetlet-{component}"))
            .await
            .unwrap();
        let image = d.spec.unwrap().template.spec.unwrap().containers[0]
            .image
            .clone()
            .unwrap();
        assert_eq!(image, format!("{registry}/fleetlet-{component}:0.1.0"));
    }
}
