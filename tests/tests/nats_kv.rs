//! The wire records in a real JetStream KV: the bucket layout, list-then-watch, and
//! compare-and-set, as every component will use them.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::time::Duration;

use async_nats::jetstream::kv::{Operation, UpdateErrorKind};
use bytes::Bytes;
use fleetlet_protocol::{
    AgentManifest, AgentStatus, DeviceId, FileContent, FileSpec, ManagedResource, Owner, OwnerKind,
    ResourceId, ResourceSpec, ResourceStatus, Timestamp, decode, encode,
    kv::{ACTUAL_STATE, DESIRED_STATE, HEARTBEAT},
};
use fleetlet_testenv::TestEnv;
use futures::StreamExt;

fn manifest(device: &DeviceId, generation: u64, text: &str) -> AgentManifest {
    let mut m = AgentManifest::new(device.clone(), generation);
    m.resources.push(ManagedResource {
        id: ResourceId::new("motd").unwrap(),
        owner: Owner {
            kind: OwnerKind::EdgeManifest,
            namespace: "default".into(),
            name: "motd".into(),
            generation: generation as i64,
            uid: None,
        },
        spec: ResourceSpec::File(FileSpec {
            path: "/etc/motd".into(),
            content: FileContent::Text(text.into()),
            mode: Some(0o644),
            owner: None,
            group: None,
        }),
    });
    m
}

#[tokio::test]
async fn buckets_exist_with_the_layout_the_protocol_defines() {
    let env = TestEnv::builder().nats().start().await.unwrap();
    let js = env.jetstream().await.unwrap();
    for bucket in [DESIRED_STATE, ACTUAL_STATE, HEARTBEAT] {
        let mut stream = js.get_stream(bucket.stream()).await.unwrap();
        let info = stream.info().await.unwrap();
        assert_eq!(info.config.subjects, vec![bucket.all_subjects()]);
        assert_eq!(info.config.max_messages_per_subject, bucket.history);
        assert_eq!(info.config.max_message_size, bucket.max_value_size);
    }
}

#[tokio::test]
async fn manifest_is_put_read_back_and_watched_from_a_real_bucket() {
    let env = TestEnv::builder().nats().start().await.unwrap();
    let js = env.jetstream().await.unwrap();
    let kv = js.get_key_value(DESIRED_STATE.name).await.unwrap();
    let dev = DeviceId::new("pi-1").unwrap();

    let gen1 = manifest(&dev, 1, "one\n");
    let rev1 = kv
        .create(DESIRED_STATE.key(&dev), encode(&gen1).unwrap().into())
        .await
        .unwrap();
    let entry = kv.entry(DESIRED_STATE.key(&dev)).await.unwrap().unwrap();
    assert_eq!(entry.revision, rev1);
    assert_eq!(decode::<AgentManifest>(&entry.value).unwrap(), gen1);

    // List-then-watch: the history watch yields the current value first, then changes.
    let mut watch = kv
        .watch_with_history(DESIRED_STATE.key(&dev))
        .await
        .unwrap();
    let first = watch.next().await.unwrap().unwrap();
    assert_eq!(first.revision, rev1);
    assert_eq!(first.operation, Operation::Put);

    let gen2 = manifest(&dev, 2, "two\n");
    let rev2 = kv
        .update(DESIRED_STATE.key(&dev), encode(&gen2).unwrap().into(), rev1)
        .await
        .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("watch delivers the update")
        .unwrap()
        .unwrap();
    assert_eq!(next.revision, rev2);
    assert_eq!(decode::<AgentManifest>(&next.value).unwrap(), gen2);
}

#[tokio::test]
async fn plain_watch_delivers_only_future_changes() {
    // The trap the protocol docs warn about: a watcher started with `watch()` never sees
    // the value that was already there.
    let env = TestEnv::builder().nats().start().await.unwrap();
    let kv = env
        .jetstream()
        .await
        .unwrap()
        .get_key_value(DESIRED_STATE.name)
        .await
        .unwrap();
    let dev = DeviceId::new("pi-2").unwrap();
    kv.put(
        dev.as_str(),
        encode(&manifest(&dev, 1, "x")).unwrap().into(),
    )
    .await
    .unwrap();
    let mut watch = kv.watch(dev.as_str()).await.unwrap();
    let nothing = tokio::time::timeout(Duration::from_millis(500), watch.next()).await;
    assert!(nothing.is_err(), "watch() delivered an existing value");
    kv.put(
        dev.as_str(),
        encode(&manifest(&dev, 2, "y")).unwrap().into(),
    )
    .await
    .unwrap();
    let entry = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(decode::<AgentManifest>(&entry.value).unwrap().generation, 2);
}

#[tokio::test]
async fn status_compare_and_set_refuses_a_stale_revision_and_keeps_the_newer_value() {
    let env = TestEnv::builder().nats().start().await.unwrap();
    let kv = env
        .jetstream()
        .await
        .unwrap()
        .get_key_value(ACTUAL_STATE.name)
        .await
        .unwrap();
    let dev = DeviceId::new("pi-3").unwrap();
    let mut status = AgentStatus::new(dev.clone());
    let rev1 = kv
        .create(dev.as_str(), encode(&status).unwrap().into())
        .await
        .unwrap();

    // A second create of the same key is refused: `create` is the first write only.
    let again = kv
        .create(dev.as_str(), encode(&status).unwrap().into())
        .await
        .unwrap_err();
    assert_eq!(
        again.kind(),
        async_nats::jetstream::kv::CreateErrorKind::AlreadyExists
    );

    status.observed_generation = 1;
    status.resources.insert(
        ResourceId::new("motd").unwrap(),
        ResourceStatus::Reconciling {
            since: Timestamp(1),
            message: None,
        },
    );
    let rev2 = kv
        .update(dev.as_str(), encode(&status).unwrap().into(), rev1)
        .await
        .unwrap();

    // A writer still holding rev1 loses, and what rev2 wrote survives.
    let stale = AgentStatus::new(dev.clone());
    let err = kv
        .update(dev.as_str(), encode(&stale).unwrap().into(), rev1)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), UpdateErrorKind::WrongLastRevision);
    let stored = kv.entry(dev.as_str()).await.unwrap().unwrap();
    assert_eq!(stored.revision, rev2);
    assert_eq!(decode::<AgentStatus>(&stored.value).unwrap(), status);
}

#[tokio::test]
async fn buckets_refuse_values_over_their_size_limit() {
    let env = TestEnv::builder().nats().start().await.unwrap();
    let kv = env
        .jetstream()
        .await
        .unwrap()
        .get_key_value(HEARTBEAT.name)
        .await
        .unwrap();
    let too_big = Bytes::from(vec![b'x'; HEARTBEAT.max_value_size as usize + 1]);
    assert!(kv.put("pi-4", too_big).await.is_err());
    assert!(kv.entry("pi-4").await.unwrap().is_none(), "nothing stored");
}
