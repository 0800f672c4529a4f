//! Waiting for what lands asynchronously: files an agent writes, statuses, Nodes, Leases,
//! Events, KV keys, podman and systemd state. A test never reads such state once after an
//! action; it polls with a bound, and when the bound passes it says what it waited for and
//! what it saw last, so a failure explains itself.

use std::{future::Future, path::Path, time::Duration};

/// The bound most waits use: long enough for a loaded two-core machine, short enough that a
/// broken feature fails the test in reasonable time.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

const INTERVAL: Duration = Duration::from_millis(200);

/// Polls `f` every 200 ms until it returns `Ok`, and returns that value. `Err` carries what
/// the poll saw instead; after `timeout` the test panics with `what` and the last of those.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let started = std::time::Instant::now();
    loop {
        match f().await {
            Ok(v) => return v,
            Err(seen) if started.elapsed() > timeout => {
                panic!("timed out after {timeout:?} waiting for {what}; last seen: {seen}")
            }
            Err(_) => tokio::time::sleep(INTERVAL).await,
        }
    }
}

/// Like [`eventually`] for a check that returns what it saw and whether that is what the
/// test waits for: `Ok(seen)` once `done(&seen)` holds.
pub async fn until<T, F, Fut>(
    what: &str,
    timeout: Duration,
    mut f: F,
    done: impl Fn(&T) -> bool,
) -> T
where
    T: std::fmt::Debug,
    F: FnMut() -> Fut,
    Fut: Future<Output = T>,
{
    eventually(what, timeout, || {
        let seen = f();
        let done = &done;
        async move {
            let seen = seen.await;
            if done(&seen) {
                Ok(seen)
            } else {
                Err(format!("{seen:?}"))
            }
        }
    })
    .await
}

/// Waits until the file at `path` holds exactly `want`.
pub async fn file_content(path: &Path, want: &str, timeout: Duration) {
    eventually(
        &format!("{} to hold {want:?}", path.display()),
        timeout,
        || async {
            match std::fs::read_to_string(path) {
                Ok(text) if text == want => Ok(()),
                Ok(text) => Err(format!("content {text:?}")),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await
}

/// Waits until nothing is at `path`.
pub async fn file_gone(path: &Path, timeout: Duration) {
    eventually(
        &format!("{} to be removed", path.display()),
        timeout,
        || async {
            match std::fs::symlink_metadata(path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e.to_string()),
                Ok(m) => Err(format!("still there ({} bytes)", m.len())),
            }
        },
    )
    .await
}

/// Waits until the text of the file at `path` (a log, say) contains `needle`.
pub async fn file_contains(path: &Path, needle: &str, timeout: Duration) -> String {
    eventually(
        &format!("{} to contain {needle:?}", path.display()),
        timeout,
        || async {
            let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
            if text.contains(needle) {
                Ok(text)
            } else {
                let tail: String = text.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
                Err(format!("last lines (newest first): {tail}"))
            }
        },
    )
    .await
}

/// Waits for an Event (events.k8s.io) with `reason` on the object of `kind` and `name`,
/// and returns its note; on timeout, says which events there were.
pub async fn event(
    events: &kube::Api<k8s_openapi::api::events::v1::Event>,
    kind: &str,
    name: &str,
    reason: &str,
) -> String {
    eventually(
        &format!("a {reason} event on {kind} {name}"),
        DEFAULT_TIMEOUT,
        || async {
            let list = events
                .list(&Default::default())
                .await
                .map_err(|e| e.to_string())?;
            list.items
                .iter()
                .find(|e| {
                    e.reason.as_deref() == Some(reason)
                        && e.regarding.as_ref().is_some_and(|r| {
                            r.kind.as_deref() == Some(kind) && r.name.as_deref() == Some(name)
                        })
                })
                .map(|e| e.note.clone().unwrap_or_default())
                .ok_or_else(|| {
                    format!(
                        "events: {:?}",
                        list.items
                            .iter()
                            .map(|e| (
                                e.reason.clone(),
                                e.regarding.as_ref().and_then(|r| r.name.clone())
                            ))
                            .collect::<Vec<_>>()
                    )
                })
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn the_timeout_message_names_what_was_awaited_and_what_was_seen() {
        let outcome = tokio::spawn(async {
            eventually("the answer", Duration::from_millis(300), || async {
                Err::<(), _>("41".to_string())
            })
            .await
        })
        .await;
        let panic = outcome.unwrap_err().into_panic();
        let message = panic.downcast_ref::<String>().unwrap();
        assert!(message.contains("waiting for the answer"), "{message}");
        assert!(message.contains("last seen: 41"), "{message}");
    }

    #[tokio::test]
    async fn a_file_written_later_is_awaited() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let writer = {
            let path = path.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(400)).await;
                std::fs::write(path, "done").unwrap();
            })
        };
        file_content(&path, "done", Duration::from_secs(5)).await;
        writer.await.unwrap();
        std::fs::remove_file(&path).unwrap();
        file_gone(&path, Duration::from_secs(1)).await;
    }
}
