//! Sessions the control plane opens with one device's agent over NATS core: container
//! logs, exec, attach and port-forward, which is how `kubectl logs`, `exec`, `attach` and
//! `port-forward` reach a container on a device.
//!
//! A session starts with a request (JSON: [`LogsRequest`], [`ExecRequest`],
//! [`AttachRequest`], [`PortForwardRequest`] or [`StatsRequest`]) on the matching subject
//! ([`logs_subject`], [`exec_subject`], [`attach_subject`], [`portforward_subject`],
//! [`stats_subject`]). The agent answers on its
//! own [`frames_subject`] with output frames: raw bytes in the payload, the session
//! ([`SESSION`]) and what they are ([`FRAME`]) in headers, a sequence number, and a last
//! frame that says how the session ended. The requester sends control messages
//! (acknowledgements, stdin, resize, cancel) to [`control_subject`]. Frames never go to a
//! reply subject: the subject they arrive on names the device that sent them, which NATS
//! accounts enforce (see [`crate::access`]).
//!
//! Flow control: the agent keeps at most [`WINDOW_BYTES`] unacknowledged and stops a session
//! whose requester has sent nothing for [`IDLE_TIMEOUT_SECS`] (acknowledgements double as
//! keep-alives). Frames carry at most [`MAX_CHUNK_BYTES`]. Input (stdin, forwarded bytes)
//! flows the same way back: the requester keeps at most [`WINDOW_BYTES`] of it
//! unacknowledged ([`FrameKind::Ack`]).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::names::{DeviceId, ResourceId};

/// Largest payload of one output frame or stdin message.
pub const MAX_CHUNK_BYTES: usize = 32 * 1024;
/// Output the agent sends ahead of acknowledgements.
pub const WINDOW_BYTES: u64 = 256 * 1024;
/// A session whose requester is silent this long is ended by the agent.
pub const IDLE_TIMEOUT_SECS: u64 = 30;
/// The requester acknowledges (and so keeps the session alive) at least this often.
pub const ACK_INTERVAL_SECS: u64 = 5;

/// Header naming what a message is: an output frame's stream, or a control message's kind.
pub const FRAME: &str = "Fleetlet-Frame";
/// Header with the session an output frame belongs to.
pub const SESSION: &str = "Fleetlet-Session";
/// Header with an output frame's sequence number (from 0), or an ack's byte count.
pub const SEQ: &str = "Fleetlet-Seq";
/// Header with the exit code on an [`FrameKind::Exit`] frame.
pub const EXIT_CODE: &str = "Fleetlet-Exit-Code";

/// First tokens of every subject the requester sends a device (requests, control).
pub const SUBJECT_PREFIX: &str = "fleetlet.relay.";
/// First tokens of a device's frames subject.
pub const FRAMES_PREFIX: &str = "fleetlet.frames.";

/// Subject for log sessions with `device`'s agent.
pub fn logs_subject(device: &DeviceId) -> String {
    format!("{SUBJECT_PREFIX}{device}.logs")
}

/// Subject for exec sessions with `device`'s agent.
pub fn exec_subject(device: &DeviceId) -> String {
    format!("{SUBJECT_PREFIX}{device}.exec")
}

/// Subject for attach sessions (to a container's main process) with `device`'s agent.
pub fn attach_subject(device: &DeviceId) -> String {
    format!("{SUBJECT_PREFIX}{device}.attach")
}

/// Subject for port-forward sessions (one TCP connection to a port inside a container) with
/// `device`'s agent.
pub fn portforward_subject(device: &DeviceId) -> String {
    format!("{SUBJECT_PREFIX}{device}.portforward")
}

/// Subject for resource-usage requests to `device`'s agent ([`StatsRequest`]; the answer
/// is one [`crate::stats::DeviceStats`] document in output frames).
pub fn stats_subject(device: &DeviceId) -> String {
    format!("{SUBJECT_PREFIX}{device}.stats")
}

/// Every relay subject of `device` (what its agent subscribes to).
pub fn device_wildcard(device: &DeviceId) -> String {
    format!("{SUBJECT_PREFIX}{device}.>")
}

/// Subject `device`'s agent sends output frames to, for every session; the session is in
/// the [`SESSION`] header. One subject per device, so a device can only ever speak as itself.
pub fn frames_subject(device: &DeviceId) -> String {
    format!("{FRAMES_PREFIX}{device}")
}

/// Every device's frames (what the requester subscribes to).
pub const ALL_FRAMES: &str = "fleetlet.frames.*";

/// The device an output frame's subject names.
pub fn frames_device(subject: &str) -> Option<&str> {
    subject.strip_prefix(FRAMES_PREFIX)
}

/// Subject the requester sends control messages of `session` to.
pub fn control_subject(device: &DeviceId, session: &str) -> String {
    format!("{SUBJECT_PREFIX}{device}.session.{session}")
}

/// A session id: what the requester picks, checked so it is one subject token.
pub fn valid_session(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// Output frames, agent → requester.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    Stdout,
    Stderr,
    /// The session ended; the payload says why if it failed (UTF-8).
    End,
    /// An exec ended; the exit code is in [`EXIT_CODE`]. Followed by `End`.
    Exit,
    /// Input bytes the agent has passed on so far ([`SEQ`] carries the total): the
    /// requester keeps at most [`WINDOW_BYTES`] of input (stdin, forwarded bytes)
    /// unacknowledged.
    Ack,
}

/// Control messages, requester → agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlKind {
    /// Bytes consumed so far ([`SEQ`] carries the total); also a keep-alive.
    Ack,
    Stdin,
    /// No more stdin.
    StdinClose,
    /// Terminal size, payload `"<cols>x<rows>"`.
    Resize,
    Cancel,
}

macro_rules! header_names {
    ($t:ty { $($v:ident => $s:literal),* $(,)? }) => {
        impl $t {
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$v => $s),* }
            }
            pub fn parse(s: &str) -> Option<Self> {
                match s { $($s => Some(Self::$v),)* _ => None }
            }
        }
    };
}

header_names!(FrameKind {
    Stdout => "stdout",
    Stderr => "stderr",
    End => "end",
    Exit => "exit",
    Ack => "ack",
});
header_names!(ControlKind {
    Ack => "ack",
    Stdin => "stdin",
    StdinClose => "stdin-close",
    Resize => "resize",
    Cancel => "cancel",
});

/// `kubectl logs` for one container resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LogsRequest {
    /// The Container resource on the device (an id from its manifest).
    pub resource: ResourceId,
    pub session: String,
    #[serde(default)]
    pub follow: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail_lines: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_seconds: Option<u64>,
    #[serde(default)]
    pub timestamps: bool,
    /// Stop after this many bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_bytes: Option<u64>,
    /// The output of the container's previous runs (before it was last restarted) instead
    /// of its current one; refused if it has not restarted (`kubectl logs --previous`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub previous: bool,
}

/// `kubectl exec` in one container resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExecRequest {
    pub resource: ResourceId,
    pub session: String,
    pub command: Vec<String>,
    #[serde(default)]
    pub stdin: bool,
    #[serde(default = "yes")]
    pub stdout: bool,
    #[serde(default = "yes")]
    pub stderr: bool,
    #[serde(default)]
    pub tty: bool,
}

/// `kubectl attach` to one container resource's main process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AttachRequest {
    pub resource: ResourceId,
    pub session: String,
    #[serde(default)]
    pub stdin: bool,
    #[serde(default = "yes")]
    pub stdout: bool,
    #[serde(default = "yes")]
    pub stderr: bool,
    #[serde(default)]
    pub tty: bool,
}

/// `kubectl port-forward`: one TCP connection to `port` on the loopback interface of the
/// container resource's network namespace, its bytes both ways as stdin (control messages)
/// and stdout (frames). The agent acknowledges input with [`FrameKind::Ack`] frames;
/// [`ControlKind::StdinClose`] half-closes the connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortForwardRequest {
    pub resource: ResourceId,
    pub session: String,
    pub port: u16,
}

/// A sample of the device's and its containers' resource usage (`kubectl top`): answered
/// with one [`crate::stats::DeviceStats`] document, then the end frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StatsRequest {
    pub session: String,
}

fn yes() -> bool {
    true
}

/// Why an agent refuses a relay request it could decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Not one subject token of at most 64 letters, digits and '-': no answer can be
    /// addressed, so the request is dropped.
    #[error("invalid session id")]
    Session,
    #[error("empty command")]
    EmptyCommand,
    #[error("port 0 cannot be forwarded")]
    Port,
}

fn check_session(s: &str) -> Result<(), RequestError> {
    if valid_session(s) {
        Ok(())
    } else {
        Err(RequestError::Session)
    }
}

impl LogsRequest {
    pub fn validate(&self) -> Result<(), RequestError> {
        check_session(&self.session)
    }
}

impl StatsRequest {
    pub fn validate(&self) -> Result<(), RequestError> {
        check_session(&self.session)
    }
}

impl AttachRequest {
    pub fn validate(&self) -> Result<(), RequestError> {
        check_session(&self.session)
    }
}

impl PortForwardRequest {
    pub fn validate(&self) -> Result<(), RequestError> {
        check_session(&self.session)?;
        if self.port == 0 {
            return Err(RequestError::Port);
        }
        Ok(())
    }
}

impl ExecRequest {
    pub fn validate(&self) -> Result<(), RequestError> {
        check_session(&self.session)?;
        if self.command.is_empty() {
            return Err(RequestError::EmptyCommand);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_names_round_trip() {
        for k in [
            FrameKind::Stdout,
            FrameKind::Stderr,
            FrameKind::End,
            FrameKind::Exit,
            FrameKind::Ack,
        ] {
            assert_eq!(FrameKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(
            ControlKind::parse("stdin-close"),
            Some(ControlKind::StdinClose)
        );
        assert_eq!(ControlKind::parse("nope"), None);
    }

    #[test]
    fn sessions_are_one_subject_token() {
        assert!(valid_session("3f2a-99"));
        assert!(!valid_session("a.b"));
        assert!(!valid_session("a>"));
        assert!(!valid_session(""));
        assert!(!valid_session(&"x".repeat(65)));
    }
}
