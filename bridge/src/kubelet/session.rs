//! The requester's side of a relay session with a device's agent: the request goes out on
//! the device's subject, output frames come back through the [`FrameRouter`], control
//! frames (acknowledgements, stdin, resizes, cancel) go to the session's control subject.

use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use fleetlet_protocol::{
    DeviceId,
    relay::{
        self, ACK_INTERVAL_SECS, ControlKind, FRAME, FrameKind, MAX_CHUNK_BYTES, SEQ, WINDOW_BYTES,
    },
};
use futures::Stream;

use crate::frames::{FrameRouter, Registration};

/// A new session's id: random, so a device cannot guess another requester's session.
pub(super) fn session_id() -> String {
    format!("{:016x}{:08x}", fastrand::u64(..), fastrand::u32(..))
}

/// Why a session could not be opened.
#[derive(Debug, thiserror::Error)]
pub(super) enum OpenError {
    #[error("encoding the request: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("NATS: {0}")]
    Nats(#[from] async_nats::PublishError),
}

/// What a relay session delivers.
pub(super) enum Frame {
    /// Output of the given stream (stdout or stderr).
    Data(FrameKind, Bytes),
    Exit(i32),
    /// The session ended, with an error message if it failed.
    End(Option<String>),
    /// The agent passed on more input (port-forward): the input window may have reopened.
    Acked,
}

/// The requester's side of a relay session: reads frames, acknowledges, cancels on drop.
pub(super) struct Session {
    nats: async_nats::Client,
    control: String,
    frames: Registration,
    consumed: u64,
    acked_at: tokio::time::Instant,
    ended: bool,
    /// Input sent, and acknowledged by the agent (flow control of stdin and forwarded
    /// bytes).
    input_sent: u64,
    input_acked: u64,
    acks_seen: bool,
    window_full_since: Option<tokio::time::Instant>,
}

impl Session {
    pub(super) async fn open(
        frames: &std::sync::Arc<FrameRouter>,
        nats: &async_nats::Client,
        device: &DeviceId,
        subject: String,
        request: &impl serde::Serialize,
        session: &str,
    ) -> Result<Self, OpenError> {
        // Registered before the request goes out, so no frame can arrive unrouted.
        let frames = frames.register(device, session);
        let body = serde_json::to_vec(request)?;
        nats.publish(subject, body.into()).await?;
        Ok(Self {
            nats: nats.clone(),
            control: relay::control_subject(device, session),
            frames,
            consumed: 0,
            acked_at: tokio::time::Instant::now(),
            ended: false,
            input_sent: 0,
            input_acked: 0,
            acks_seen: false,
            window_full_since: None,
        })
    }

    pub(super) async fn send_control(&self, kind: ControlKind, payload: Bytes, seq: Option<u64>) {
        let mut h = HeaderMap::new();
        h.insert(FRAME, kind.as_str());
        if let Some(n) = seq {
            h.insert(SEQ, n.to_string().as_str());
        }
        let _ = self
            .nats
            .publish_with_headers(self.control.clone(), h, payload)
            .await;
    }

    /// The next frame; acknowledges as it goes. `None` when the device stays silent.
    pub(super) async fn next_frame(&mut self) -> Option<Frame> {
        if self.ended {
            return None;
        }
        loop {
            let wait = Duration::from_secs(ACK_INTERVAL_SECS);
            let msg = match tokio::time::timeout(wait, self.frames.recv()).await {
                Ok(Some(m)) => m,
                Ok(None) => return None,
                Err(_) => {
                    // Quiet stream (a follow with no new lines): keep the session alive,
                    // unless nothing ever came (the device is not answering).
                    if self.consumed == 0 && self.acked_at.elapsed() > Duration::from_secs(15) {
                        self.ended = true;
                        return Some(Frame::End(Some(
                            "the device did not answer (offline?)".into(),
                        )));
                    }
                    self.send_control(ControlKind::Ack, Bytes::new(), Some(self.consumed))
                        .await;
                    continue;
                }
            };
            let kind = msg
                .headers
                .as_ref()
                .and_then(|h| h.get(FRAME))
                .and_then(|v| FrameKind::parse(v.as_str()));
            match kind {
                Some(k @ (FrameKind::Stdout | FrameKind::Stderr)) => {
                    self.consumed += msg.payload.len() as u64;
                    if self.acked_at.elapsed() >= Duration::from_secs(1)
                        || self.consumed % (64 * 1024) < msg.payload.len() as u64
                    {
                        self.acked_at = tokio::time::Instant::now();
                        self.send_control(ControlKind::Ack, Bytes::new(), Some(self.consumed))
                            .await;
                    }
                    return Some(Frame::Data(k, msg.payload));
                }
                Some(FrameKind::Exit) => {
                    let code = msg
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(relay::EXIT_CODE))
                        .and_then(|v| v.as_str().parse().ok())
                        .unwrap_or(-1);
                    return Some(Frame::Exit(code));
                }
                Some(FrameKind::Ack) => {
                    let n = msg
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(SEQ))
                        .and_then(|v| v.as_str().parse::<u64>().ok());
                    if let Some(n) = n {
                        self.acks_seen = true;
                        self.input_acked = self.input_acked.max(n.min(self.input_sent));
                    }
                    return Some(Frame::Acked);
                }
                Some(FrameKind::End) => {
                    self.ended = true;
                    let err = String::from_utf8_lossy(&msg.payload).into_owned();
                    return Some(Frame::End(Some(err).filter(|e| !e.is_empty())));
                }
                None => continue,
            }
        }
    }

    /// Whether more input may be sent: less than [`WINDOW_BYTES`] unacknowledged.
    ///
    /// An agent older than input acknowledgements never sends one: once a full window has
    /// waited [`ACK_INTERVAL_SECS`] without a single acknowledgement, input is no longer held
    /// back for this session (as before acknowledgements existed).
    pub(super) fn input_window_open(&mut self) -> bool {
        if self.input_sent - self.input_acked < WINDOW_BYTES {
            self.window_full_since = None;
            return true;
        }
        if self.acks_seen {
            return false;
        }
        let since = *self
            .window_full_since
            .get_or_insert_with(tokio::time::Instant::now);
        since.elapsed() >= Duration::from_secs(ACK_INTERVAL_SECS)
    }

    /// Input (stdin, forwarded bytes), in chunks of at most [`MAX_CHUNK_BYTES`]; the
    /// caller keeps to [`Session::input_window_open`].
    pub(super) async fn send_input(&mut self, data: Bytes) {
        for chunk in data.chunks(MAX_CHUNK_BYTES) {
            self.input_sent += chunk.len() as u64;
            self.send_control(ControlKind::Stdin, data.slice_ref(chunk), None)
                .await;
        }
    }

    /// The remaining output as a body stream; the session is cancelled if the body is dropped.
    pub(super) fn into_stream(self) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send {
        let guard = CancelOnDrop(Some(self));
        futures::stream::unfold(guard, |mut g| async move {
            let s = g.0.as_mut()?;
            match s.next_frame().await {
                Some(Frame::Data(_, b)) => Some((Ok(b), g)),
                Some(Frame::Exit(_) | Frame::Acked) => Some((Ok(Bytes::new()), g)),
                Some(Frame::End(None)) | None => None,
                Some(Frame::End(Some(e))) => Some((Err(std::io::Error::other(e)), g)),
            }
        })
    }
}

/// Tells the agent to stop a session whose reader went away (a closed `kubectl logs -f`).
struct CancelOnDrop(Option<Session>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(s) = self.0.take()
            && !s.ended
        {
            tokio::spawn(async move {
                s.send_control(ControlKind::Cancel, Bytes::new(), None)
                    .await;
            });
        }
    }
}
