//! Files whose content the device downloads (`content.fetch`): the real agent against a
//! real nats-server and an HTTPS server the test starts, with its own CA.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod common;

use std::{path::Path, time::Duration};

use common::*;
use fleetlet_agent::file::sha256_hex;
use fleetlet_protocol::{FetchSource, FileContent, ManagedResource, ResourceSpec, ResourceStatus};
use fleetlet_testenv::{TestEnv, https::FileServer};

const MIB: u64 = 1024 * 1024;

fn random_bytes(len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(len as u64);
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(&rng.u64(..).to_le_bytes());
    }
    v.truncate(len);
    v
}

fn fetched(
    dev: &Device,
    id: &str,
    name: &str,
    url: String,
    sha256: String,
    size: u64,
) -> ManagedResource {
    let mut r = dev.file_resource(id, name, "");
    if let ResourceSpec::File(f) = &mut r.spec {
        f.content = FileContent::Fetch(FetchSource { url, sha256, size });
    }
    r
}

/// A File whose content is `content`, served by `server` at `path`.
fn fetch_of(
    dev: &Device,
    id: &str,
    name: &str,
    server: &FileServer,
    path: &str,
    content: &[u8],
) -> ManagedResource {
    let (url, sha) = (server.url(path), sha256_hex(content));
    fetched(dev, id, name, url, sha, content.len() as u64)
}

/// A device that trusts `server`'s CA for downloads, with `extra` lines in its `[file]`.
fn device(id: &str, server: &FileServer, extra: &str) -> Device {
    let mut dev = Device::new(id);
    let ca = dev.dir.path().join("fetch-ca.pem");
    server.write_ca(&ca).unwrap();
    dev.sections = format!("fetch_ca_file = \"{}\"\n{extra}", ca.display());
    dev
}

/// Partial downloads left beside `dir`'s files.
fn partials(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".fleetlet-part"))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn a_50_mib_file_is_downloaded_with_progress_resumed_after_a_cut_and_verified() {
    let env = TestEnv::builder().nats().start().await.unwrap();
    let (desired, actual, _) = buckets(&env).await;
    let server = FileServer::start().await.unwrap();
    let data = random_bytes((50 * MIB) as usize);
    let sha = sha256_hex(&data);
    server.put("/models/model.bin", data.clone());
    server.limit_rate("/models/model.bin", 8 * MIB);
    server.cut_once("/models/model.bin", 20 * MIB);
    let dev = device("pi-fetch", &server, "");
    let _agent = dev.start(env.nats_url().unwrap(), "");

    put(
        &desired,
        &dev.manifest(
            1,
            vec![
                fetch_of(
                    &dev,
                    "model",
                    "models/model.bin",
                    &server,
                    "/models/model.bin",
                    &data,
                ),
                dev.file_resource("small", "small.conf", "x=1\n"),
            ],
        ),
    )
    .await;

    // While it downloads, the resource says how far it is and the generation is not
    // observed yet; the inline file beside it is not held up.
    let s = wait_status(&actual, &dev.id, "download progress in status", |s| {
        matches!(
            s.resources.get("model"),
            Some(ResourceStatus::Reconciling { message: Some(m), .. }) if m.starts_with("downloading: ") && m.contains(" of 50.0 MiB (")
        )
    })
    .await;
    assert_eq!(s.observed_generation, 0, "not observed while downloading");
    assert!(
        s.resources["small"].is_ready(),
        "{:?}",
        s.resources["small"]
    );
    assert!(
        !dev.file("models/model.bin").exists(),
        "nothing installed before it is verified"
    );

    let s = wait_status(&actual, &dev.id, "downloaded and ready", |s| {
        all_ready(s, 1, 2)
    })
    .await;
    match s.resources["model"].details() {
        Some(fleetlet_protocol::ResourceDetails::File { sha256, size }) => {
            assert_eq!(sha256, &sha);
            assert_eq!(*size, 50 * MIB);
        }
        _ => panic!("{:?}", s.resources["model"]),
    }
    let written = std::fs::read(dev.file("models/model.bin")).unwrap();
    assert!(written == data, "the file holds exactly the served bytes");
    assert!(
        partials(&dev.file("models")).is_empty(),
        "no partial download left"
    );

    // Resumed, not restarted: the second request asked for the rest, and the server sent
    // the file's bytes once in all.
    let served = server.served();
    assert_eq!(served.len(), 2, "{served:?}");
    assert_eq!(
        (served[0].status, served[0].range_start, served[0].bytes),
        (200, None, 20 * MIB)
    );
    assert_eq!(
        (served[1].status, served[1].range_start, served[1].bytes),
        (206, Some(20 * MIB), 30 * MIB)
    );
}

#[tokio::test]
async fn a_download_cut_by_an_agent_restart_resumes_from_what_is_on_disk() {
    let env = TestEnv::builder().nats().start().await.unwrap();
    let (desired, actual, _) = buckets(&env).await;
    let server = FileServer::start().await.unwrap();
    let data = random_bytes((16 * MIB) as usize);
    server.put("/fw.img", data.clone());
    server.limit_rate("/fw.img", 2 * MIB);
    let dev = device("pi-fetch-restart", &server, "");
    let mut agent = dev.start(env.nats_url().unwrap(), "");
    put(
        &desired,
        &dev.manifest(
            1,
            vec![fetch_of(&dev, "fw", "fw.img", &server, "/fw.img", &data)],
        ),
    )
    .await;
    wait_status(&actual, &dev.id, "a quarter downloaded", |s| {
        matches!(
            s.resources.get("fw"),
            Some(ResourceStatus::Reconciling { message: Some(m), .. })
                if m.split(['(', '%']).nth(1).and_then(|p| p.parse::<u32>().ok()).is_some_and(|p| p >= 25)
        )
    })
    .await;
    agent.stop();
    let on_disk: Vec<u64> = partials(dev.root().as_path())
        .iter()
        .map(|n| std::fs::metadata(dev.root().join(n)).unwrap().len())
        .collect();
    assert_eq!(
        on_disk.len(),
        1,
        "one partial download kept across the restart"
    );
    assert!(on_disk[0] >= 4 * MIB, "{on_disk:?}");

    server.limit_rate("/fw.img", 64 * MIB);
    let _agent = dev.start(env.nats_url().unwrap(), "");
    wait_status(&actual, &dev.id, "ready after the restart", |s| {
        all_ready(s, 1, 1)
    })
    .await;
    assert!(std::fs::read(dev.file("fw.img")).unwrap() == data);
    let served = server.served();
    let last = served.last().unwrap();
    assert_eq!(
        (last.status, last.range_start),
        (206, Some(on_disk[0])),
        "{served:?}"
    );
    assert_eq!(last.bytes, 16 * MIB - on_disk[0]);
}

#[tokio::test]
async fn content_that_does_not_match_its_digest_is_refused_and_the_old_file_stays() {
    let env = TestEnv::builder().nats().start().await.unwrap();
    let (desired, actual, _) = buckets(&env).await;
    let server = FileServer::start().await.unwrap();
    let served_bytes = random_bytes(3 * MIB as usize);
    let mut expected = served_bytes.clone();
    expected[MIB as usize] ^= 1; // one bit differs: what a tampered or stale server sends
    server.put("/config.tar", served_bytes);
    let dev = device("pi-fetch-digest", &server, "");
    let _agent = dev.start(env.nats_url().unwrap(), "");

    put(
        &desired,
        &dev.manifest(
            1,
            vec![dev.file_resource("cfg", "config.tar", "previous version\n")],
        ),
    )
    .await;
    wait_status(&actual, &dev.id, "inline version ready", |s| {
        all_ready(s, 1, 1)
    })
    .await;

    put(
        &desired,
        &dev.manifest(
            2,
            vec![fetch_of(
                &dev,
                "cfg",
                "config.tar",
                &server,
                "/config.tar",
                &expected,
            )],
        ),
    )
    .await;
    let s = wait_status(&actual, &dev.id, "refused for good", |s| {
        s.observed_generation == 2 && s.resources["cfg"].is_permanent_failure()
    })
    .await;
    let error = s.resources["cfg"].failure().unwrap();
    assert!(
        error.contains(&format!("the manifest says {}", sha256_hex(&expected)))
            && error.contains("nothing was written"),
        "{error}"
    );
    assert_eq!(
        read(&dev.file("config.tar")),
        "previous version\n",
        "the old file is untouched"
    );
    assert!(
        partials(&dev.root()).is_empty(),
        "the refused bytes are not kept"
    );

    // Refused content is not downloaded again on every pass (the agent looks every second).
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(server.served().len(), 1, "{:?}", server.served());

    // A corrected spec is fetched and installed.
    let right = {
        let mut b = expected.clone();
        b[MIB as usize] ^= 1;
        b
    };
    put(
        &desired,
        &dev.manifest(
            3,
            vec![fetch_of(
                &dev,
                "cfg",
                "config.tar",
                &server,
                "/config.tar",
                &right,
            )],
        ),
    )
    .await;
    wait_status(&actual, &dev.id, "corrected spec ready", |s| {
        all_ready(s, 3, 1)
    })
    .await;
    assert!(std::fs::read(dev.file("config.tar")).unwrap() == right);
}

#[tokio::test]
async fn size_limits_and_free_space_are_checked_before_anything_is_downloaded() {
    let env = TestEnv::builder().nats().start().await.unwrap();
    let (desired, actual, _) = buckets(&env).await;
    let server = FileServer::start().await.unwrap();
    server.put("/big", vec![0; 1024]);
    // The device fetches up to 1 TiB; its disk has far less free.
    let dev = device(
        "pi-fetch-limits",
        &server,
        &format!("max_fetch_bytes = {}\n", 1u64 << 40),
    );
    let _agent = dev.start(env.nats_url().unwrap(), "");
    let sha = "0".repeat(64);
    put(
        &desired,
        &dev.manifest(
            1,
            vec![
                fetched(
                    &dev,
                    "no-room",
                    "no-room.bin",
                    server.url("/big"),
                    sha.clone(),
                    1 << 40,
                ),
                fetched(
                    &dev,
                    "too-big",
                    "too-big.bin",
                    server.url("/big"),
                    sha,
                    (1 << 40) + 1,
                ),
                dev.file_resource("ok", "ok.conf", "fine\n"),
            ],
        ),
    )
    .await;
    let s = wait_status(&actual, &dev.id, "both refused, the rest ready", |s| {
        s.resources
            .get("no-room")
            .and_then(ResourceStatus::failure)
            .is_some()
            && s.resources
                .get("too-big")
                .and_then(ResourceStatus::failure)
                .is_some()
            && s.resources.get("ok").is_some_and(ResourceStatus::is_ready)
    })
    .await;
    let no_room = s.resources["no-room"].failure().unwrap();
    assert!(no_room.starts_with("not enough disk space"), "{no_room}");
    assert!(
        !s.resources["no-room"].is_permanent_failure(),
        "retried: space may be freed"
    );
    // Above the protocol's own bound: refused by the spec check before policy.
    let too_big = s.resources["too-big"].failure().unwrap();
    assert!(too_big.contains("file.content.fetch.size"), "{too_big}");
    assert!(s.resources["too-big"].is_permanent_failure());
    assert!(
        server.served().is_empty(),
        "nothing was requested: {:?}",
        server.served()
    );
    assert!(partials(&dev.root()).is_empty());
    assert!(!dev.file("no-room.bin").exists() && !dev.file("too-big.bin").exists());
}

#[tokio::test]
async fn a_file_above_the_devices_fetch_limit_is_forbidden() {
    let env = TestEnv::builder().nats().start().await.unwrap();
    let (desired, actual, _) = buckets(&env).await;
    let server = FileServer::start().await.unwrap();
    server.put("/x", vec![1; 2048]);
    let dev = device("pi-fetch-policy", &server, "max_fetch_bytes = 1024\n");
    let _agent = dev.start(env.nats_url().unwrap(), "");
    put(
        &desired,
        &dev.manifest(
            1,
            vec![fetch_of(&dev, "x", "x.bin", &server, "/x", &[1; 2048])],
        ),
    )
    .await;
    let s = wait_status(&actual, &dev.id, "settled", |s| s.observed_generation == 1).await;
    assert_forbidden(&s, "x", "fetches at most 1024 (file.max_fetch_bytes)");
    assert!(server.served().is_empty(), "{:?}", server.served());
    assert!(!dev.file("x.bin").exists());
}
