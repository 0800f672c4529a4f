//! Output frames of relay sessions. Each device sends the frames of all its sessions to its
//! own frames subject (`fleetlet.frames.<device>`, the session in a header); NATS accounts
//! let a device publish there and nowhere else, so the subject says who sent a frame. One
//! subscription for every device hands each frame to the session it belongs to.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use async_nats::Message;
use fleetlet_protocol::{DeviceId, relay};
use futures::StreamExt;
use tokio::sync::mpsc;
use tracing::{debug, warn};

type Key = (String, String);

/// Payload bytes a session may have waiting for its reader: the agent keeps at most
/// [`relay::WINDOW_BYTES`] unacknowledged, so an agent that keeps to the protocol never
/// comes near; one that does not loses its session, not the bridge's memory.
const MAX_WAITING_BYTES: usize = 4 * relay::WINDOW_BYTES as usize;
/// Frames a session may have waiting (a window of small writes is many frames).
const MAX_WAITING_FRAMES: usize = 16 * 1024;

/// A session's queue as the router sees it.
struct Route {
    tx: mpsc::Sender<Message>,
    waiting: Arc<AtomicUsize>,
}

/// Routes frames to open sessions by (device, session).
#[derive(Default)]
pub struct FrameRouter {
    sessions: Mutex<HashMap<Key, Route>>,
}

/// An open session's frames; the session is forgotten when this is dropped.
pub struct Registration {
    router: Arc<FrameRouter>,
    key: Key,
    frames: mpsc::Receiver<Message>,
    waiting: Arc<AtomicUsize>,
}

impl Registration {
    /// The next frame; `None` once the router is gone.
    pub async fn recv(&mut self) -> Option<Message> {
        let m = self.frames.recv().await?;
        self.waiting.fetch_sub(m.payload.len(), Ordering::Relaxed);
        Some(m)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut s) = self.router.sessions.lock() {
            s.remove(&self.key);
        }
    }
}

impl FrameRouter {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Starts receiving the frames of `session` with `device`.
    pub fn register(self: &Arc<Self>, device: &DeviceId, session: &str) -> Registration {
        let (tx, rx) = mpsc::channel(MAX_WAITING_FRAMES);
        let waiting = Arc::new(AtomicUsize::new(0));
        let key = (device.to_string(), session.to_owned());
        if let Ok(mut s) = self.sessions.lock() {
            let route = Route {
                tx,
                waiting: waiting.clone(),
            };
            s.insert(key.clone(), route);
        }
        Registration {
            router: self.clone(),
            key,
            frames: rx,
            waiting,
        }
    }

    /// Sessions open now.
    pub fn open_sessions(&self) -> usize {
        self.sessions.lock().map(|s| s.len()).unwrap_or_default()
    }

    fn route(&self, m: Message) {
        let Some(device) = relay::frames_device(m.subject.as_str()).map(str::to_owned) else {
            return;
        };
        let Some(session) = m
            .headers
            .as_ref()
            .and_then(|h| h.get(relay::SESSION))
            .map(|v| v.as_str().to_owned())
        else {
            debug!(%device, "a frame without a session; ignored");
            return;
        };
        let key = (device, session);
        let route = self
            .sessions
            .lock()
            .ok()
            .and_then(|s| s.get(&key).map(|r| (r.tx.clone(), r.waiting.clone())));
        let Some((tx, waiting)) = route else {
            return debug!(device = %key.0, session = %key.1, "a frame for no open session");
        };
        let len = m.payload.len();
        if waiting.fetch_add(len, Ordering::Relaxed) + len > MAX_WAITING_BYTES
            || tx.try_send(m).is_err()
        {
            // A stream with a hole in it is worth nothing: the session ends (its reader
            // gets what was queued, then no more), and later frames find no session.
            warn!(device = %key.0, session = %key.1, "a session's reader is far behind; the session is ended");
            if let Ok(mut s) = self.sessions.lock() {
                s.remove(&key);
            }
        }
    }

    /// Receives every device's frames until the client is closed.
    pub async fn run(self: Arc<Self>, nats: async_nats::Client) {
        loop {
            match nats.subscribe(relay::ALL_FRAMES).await {
                Ok(mut sub) => {
                    while let Some(m) = sub.next().await {
                        self.route(m);
                    }
                    warn!("the frames subscription ended; subscribing again");
                }
                Err(e) => warn!(error = %e, "subscribing to relay frames; retrying"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(device: &DeviceId, session: &str, bytes: usize) -> Message {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(relay::SESSION, session);
        Message {
            subject: relay::frames_subject(device).into(),
            reply: None,
            payload: vec![b'x'; bytes].into(),
            headers: Some(headers),
            status: None,
            description: None,
            length: bytes,
        }
    }

    #[tokio::test]
    async fn small_frames_queue_up_to_a_byte_limit_and_a_session_past_it_ends_whole() {
        let router = FrameRouter::new();
        let device = DeviceId::new("pi-frames").unwrap();
        let mut reg = router.register(&device, "s1");
        // A window's worth of 4 KiB writes: far more frames than a count limit of old.
        let window = relay::WINDOW_BYTES as usize / 4096;
        for _ in 0..window {
            router.route(frame(&device, "s1", 4096));
        }
        for _ in 0..window {
            assert_eq!(reg.recv().await.unwrap().payload.len(), 4096);
        }
        // Past the limit (an agent ignoring its window): the session ends, no hole in it.
        let limit = MAX_WAITING_BYTES / (64 * 1024);
        for _ in 0..limit + 2 {
            router.route(frame(&device, "s1", 64 * 1024));
        }
        let mut got = 0;
        while reg.recv().await.is_some() {
            got += 1;
        }
        assert_eq!(got, limit, "what fit was delivered, then the end");
        assert_eq!(router.open_sessions(), 0);
    }
}
