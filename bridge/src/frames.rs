//! Output frames of relay sessions. Each device sends the frames of all its sessions to its
//! own frames subject (`fleetlet.frames.<device>`, the session in a header); NATS accounts
//! let a device publish there and nowhere else, so the subject says who sent a frame. One
//! subscription for every device hands each frame to the session it belongs to.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_nats::Message;
use fleetlet_protocol::{DeviceId, relay};
use futures::StreamExt;
use tokio::sync::mpsc;
use tracing::{debug, warn};

type Key = (String, String);

/// Routes frames to open sessions by (device, session).
#[derive(Default)]
pub struct FrameRouter {
    sessions: Mutex<HashMap<Key, mpsc::Sender<Message>>>,
}

/// An open session's frames; the session is forgotten when this is dropped.
pub struct Registration {
    router: Arc<FrameRouter>,
    key: Key,
    pub frames: mpsc::Receiver<Message>,
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
        // The agent keeps at most a window of unacknowledged output in flight, a few
        // frames; the rest is room for control frames.
        let (tx, rx) = mpsc::channel(64);
        let key = (device.to_string(), session.to_owned());
        if let Ok(mut s) = self.sessions.lock() {
            s.insert(key.clone(), tx);
        }
        Registration {
            router: self.clone(),
            key,
            frames: rx,
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
        let tx = self.sessions.lock().ok().and_then(|s| s.get(&key).cloned());
        match tx {
            Some(tx) => {
                if tx.try_send(m).is_err() {
                    warn!(device = %key.0, session = %key.1, "a session's reader is far behind; frame dropped");
                }
            }
            None => debug!(device = %key.0, session = %key.1, "a frame for no open session"),
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
