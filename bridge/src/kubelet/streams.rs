//! `kubectl exec` and `kubectl attach`: the request is checked (certificate, pod on a
//! fleetlet node, `create` on its `nodes/proxy`), then upgraded to the streaming protocol the
//! apiserver asked for — WebSocket (`v5`/`v4.channel.k8s.io`, what 1.36+ sends a node that
//! declares `ExtendWebSocketsToKubelet`) or SPDY/3.1 (what 1.34 and 1.35 send, and 1.36+
//! for other nodes) — and relayed to the device's agent. [`relay`] does the relaying and
//! knows nothing of either protocol; [`super::websocket`] and [`super::spdy`] carry its
//! [`Input`] and [`Output`] over theirs.

use std::sync::Arc;

use axum::{
    Extension,
    extract::{FromRequestParts, Path, RawQuery, Request, State},
    http::{HeaderMap, StatusCode, header},
    response::Response,
};
use bytes::Bytes;
use fleetlet_protocol::{
    DeviceId, ResourceId,
    relay::{self, ControlKind, FrameKind},
};
use tokio::sync::mpsc;
use tracing::{debug, info};

use super::{
    Ctx, Identity, authorize,
    session::{Frame, Session, session_id},
    target, text,
};

/// What the client sends during a session.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Input {
    Stdin(Bytes),
    /// The client closed its stdin (EOF for the process).
    StdinClose,
    Resize {
        width: u16,
        height: u16,
    },
}

/// What the client receives. [`Output::Status`] is last: the v4 `metav1.Status` JSON the
/// error stream carries (success, a non-zero exit code, or why the session failed).
#[derive(Debug)]
pub(super) enum Output {
    Stdout(Bytes),
    Stderr(Bytes),
    Status(Vec<u8>),
}

/// The streams a request asked for (query flags, as kubelets read them).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Wanted {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

/// What the exec request's query says (repeated `command`, the stream flags).
#[derive(Debug, Default)]
struct StreamQuery {
    command: Vec<String>,
    wanted: Wanted,
}

fn stream_query(raw: Option<&str>) -> StreamQuery {
    let mut q = StreamQuery::default();
    let on = |v: &str| v.is_empty() || v == "1" || v == "true";
    for (k, v) in form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        match k.as_ref() {
            "command" => q.command.push(v.into_owned()),
            "input" | "stdin" => q.wanted.stdin = on(&v),
            "output" | "stdout" => q.wanted.stdout = on(&v),
            "error" | "stderr" => q.wanted.stderr = on(&v),
            "tty" => q.wanted.tty = on(&v),
            _ => {}
        }
    }
    q
}

/// One session to run once the connection is upgraded.
pub(super) struct Job {
    ctx: Ctx,
    device: DeviceId,
    subject: String,
    session: String,
    request: serde_json::Value,
    /// Ending without an exit code is a success (an attach left early).
    detachable: bool,
    pub wanted: Wanted,
}

/// Which streaming protocol a request asks to upgrade to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    WebSocket,
    Spdy,
}

fn protocol_of(headers: &HeaderMap) -> Option<Protocol> {
    let upgrade = headers.get(header::UPGRADE)?.to_str().ok()?;
    if upgrade.eq_ignore_ascii_case("websocket") {
        Some(Protocol::WebSocket)
    } else if upgrade.to_ascii_lowercase().contains("spdy/3.1") {
        Some(Protocol::Spdy)
    } else {
        None
    }
}

/// What exec and attach check before upgrading: a caller with a certificate, a container
/// on a fleetlet node, `create` on its `nodes/proxy`, and an upgrade this listener speaks.
async fn stream_target(
    ctx: &Ctx,
    id: &Identity,
    (namespace, pod, container): (String, String, String),
    headers: &HeaderMap,
    what: &str,
) -> Result<(DeviceId, ResourceId, Protocol), Response> {
    if id.user.is_none() {
        return Err(text(
            StatusCode::UNAUTHORIZED,
            "Unauthorized: a client certificate is required",
        ));
    }
    let (node, device, resource) = target(ctx, &namespace, &pod, &container).await?;
    authorize(ctx, id, "create", &node).await?;
    let protocol = protocol_of(headers).ok_or_else(|| {
        text(
            StatusCode::BAD_REQUEST,
            format!(
                "{what} needs an upgrade to WebSocket (v5.channel.k8s.io) or SPDY/3.1 (v4.channel.k8s.io)"
            ),
        )
    })?;
    let protocol_name = match protocol {
        Protocol::WebSocket => "websocket",
        Protocol::Spdy => "spdy",
    };
    ctx.metrics.stream(what, protocol_name);
    info!(%device, %resource, user = id.user.as_deref().unwrap_or_default(), what, protocol = protocol_name);
    Ok((device, resource, protocol))
}

/// Upgrades `request` to `protocol` and runs `job` over it.
async fn upgrade(request: Request, protocol: Protocol, job: Job) -> Response {
    match protocol {
        Protocol::WebSocket => {
            let (mut parts, _) = request.into_parts();
            match axum::extract::ws::WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
                Ok(ws) => ws
                    .protocols(["v5.channel.k8s.io", "v4.channel.k8s.io"])
                    .on_upgrade(move |socket| super::websocket::serve(socket, job)),
                Err(e) => text(StatusCode::BAD_REQUEST, e.to_string()),
            }
        }
        Protocol::Spdy => super::spdy::upgrade_streams(request, job),
    }
}

/// `kubectl exec`.
pub(super) async fn exec(
    State(ctx): State<Ctx>,
    Extension(id): Extension<Arc<Identity>>,
    Path(path): Path<(String, String, String)>,
    RawQuery(raw): RawQuery,
    request: Request,
) -> Response {
    let q = stream_query(raw.as_deref());
    if q.command.is_empty() {
        return text(StatusCode::BAD_REQUEST, "no command");
    }
    let (device, resource, protocol) =
        match stream_target(&ctx, &id, path, request.headers(), "exec").await {
            Ok(t) => t,
            Err(r) => return r,
        };
    let req = relay::ExecRequest {
        resource,
        session: session_id(),
        command: q.command,
        stdin: q.wanted.stdin,
        stdout: q.wanted.stdout,
        stderr: q.wanted.stderr,
        tty: q.wanted.tty,
    };
    debug!(argv = ?req.command, "exec command");
    let job = Job {
        subject: relay::exec_subject(&device),
        session: req.session.clone(),
        request: serde_json::to_value(&req).unwrap_or_default(),
        detachable: false,
        wanted: q.wanted,
        ctx,
        device,
    };
    upgrade(request, protocol, job).await
}

/// `kubectl attach`: the container's main process's output (and stdin, if the container
/// was started with it).
pub(super) async fn attach(
    State(ctx): State<Ctx>,
    Extension(id): Extension<Arc<Identity>>,
    Path(path): Path<(String, String, String)>,
    RawQuery(raw): RawQuery,
    request: Request,
) -> Response {
    let q = stream_query(raw.as_deref());
    let (device, resource, protocol) =
        match stream_target(&ctx, &id, path, request.headers(), "attach").await {
            Ok(t) => t,
            Err(r) => return r,
        };
    let req = relay::AttachRequest {
        resource,
        session: session_id(),
        stdin: q.wanted.stdin,
        stdout: q.wanted.stdout,
        stderr: q.wanted.stderr,
        tty: q.wanted.tty,
    };
    let job = Job {
        subject: relay::attach_subject(&device),
        session: req.session.clone(),
        request: serde_json::to_value(&req).unwrap_or_default(),
        detachable: true,
        wanted: q.wanted,
        ctx,
        device,
    };
    upgrade(request, protocol, job).await
}

/// The v4 `metav1.Status` that ends a session on the error stream.
pub(super) fn status_message(code: Option<i32>, error: Option<&str>) -> Vec<u8> {
    let status = match (code, error) {
        (Some(0), None) => serde_json::json!({ "metadata": {}, "status": "Success" }),
        (Some(code), None) => serde_json::json!({
            "metadata": {}, "status": "Failure",
            "message": format!("command terminated with non-zero exit code: {code}"),
            "reason": "NonZeroExitCode",
            "details": { "causes": [{ "reason": "ExitCode", "message": code.to_string() }] },
        }),
        (_, e) => serde_json::json!({
            "metadata": {}, "status": "Failure",
            "message": e.unwrap_or("the session ended without an exit code"),
        }),
    };
    serde_json::to_vec(&status).unwrap_or_default()
}

/// Relays one exec or attach session between a client's streams and the device's agent.
/// Ends with [`Output::Status`]; if `input` closes first (the client went away) the agent
/// is told to cancel and nothing more is sent.
pub(super) async fn relay(
    job: Job,
    mut input: mpsc::UnboundedReceiver<Input>,
    output: mpsc::Sender<Output>,
) {
    let opened = Session::open(
        &job.ctx.frames,
        &job.ctx.nats,
        &job.device,
        job.subject.clone(),
        &job.request,
        &job.session,
    )
    .await;
    let mut session = match opened {
        Ok(s) => s,
        Err(e) => {
            let message = format!("cannot reach the device: {e}");
            let _ = output
                .send(Output::Status(status_message(None, Some(&message))))
                .await;
            return;
        }
    };
    let mut code = None;
    let error = loop {
        tokio::select! {
            frame = session.next_frame() => match frame {
                Some(Frame::Data(kind, bytes)) => {
                    let out = if kind == FrameKind::Stderr {
                        Output::Stderr(bytes)
                    } else {
                        Output::Stdout(bytes)
                    };
                    if output.send(out).await.is_err() {
                        session.send_control(ControlKind::Cancel, Bytes::new(), None).await;
                        return;
                    }
                }
                Some(Frame::Exit(c)) => code = Some(c),
                Some(Frame::Acked) => {}
                Some(Frame::End(e)) => break e,
                None => break Some("the device stopped answering".into()),
            },
            msg = input.recv(), if session.input_window_open() => match msg {
                Some(Input::Stdin(b)) => session.send_input(b).await,
                Some(Input::Resize { width, height }) => {
                    let payload = Bytes::from(format!("{width}x{height}"));
                    session.send_control(ControlKind::Resize, payload, None).await;
                }
                Some(Input::StdinClose) => {
                    session.send_control(ControlKind::StdinClose, Bytes::new(), None).await;
                }
                None => {
                    session.send_control(ControlKind::Cancel, Bytes::new(), None).await;
                    return;
                }
            },
        }
    };
    if job.detachable && code.is_none() && error.is_none() {
        code = Some(0);
    }
    let _ = output
        .send(Output::Status(status_message(code, error.as_deref())))
        .await;
}

/// Terminal sizes as the remote command protocol sends them (`{"Width":80,"Height":24}`,
/// one JSON object after another). Takes the complete objects off the front of `buf`.
pub(super) fn take_resizes(buf: &mut Vec<u8>) -> Vec<Input> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Size {
        width: u16,
        height: u16,
    }
    let mut out = Vec::new();
    let mut stream = serde_json::Deserializer::from_slice(buf).into_iter::<Size>();
    let mut used = 0;
    loop {
        match stream.next() {
            Some(Ok(s)) => {
                used = stream.byte_offset();
                out.push(Input::Resize {
                    width: s.width,
                    height: s.height,
                });
            }
            // Incomplete: wait for more.
            Some(Err(e)) if e.is_eof() => break,
            // Garbage: drop what is there.
            Some(Err(_)) => {
                used = buf.len();
                break;
            }
            None => {
                used = buf.len();
                break;
            }
        }
    }
    buf.drain(..used);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_flags_read_as_kubelets_read_them() {
        let q = stream_query(Some(
            "command=sh&command=-c&command=echo+hi&input=1&output=true&tty",
        ));
        assert_eq!(q.command, ["sh", "-c", "echo hi"]);
        assert_eq!(
            q.wanted,
            Wanted {
                stdin: true,
                stdout: true,
                stderr: false,
                tty: true
            }
        );
    }

    #[test]
    fn resizes_split_across_frames_are_joined_and_garbage_is_dropped() {
        let mut buf = br#"{"Width":80,"Height":24}
{"Width":1"#
            .to_vec();
        assert_eq!(
            take_resizes(&mut buf),
            [Input::Resize {
                width: 80,
                height: 24
            }]
        );
        buf.extend_from_slice(b"20,\"Height\":40}\n");
        assert_eq!(
            take_resizes(&mut buf),
            [Input::Resize {
                width: 120,
                height: 40
            }]
        );
        assert!(buf.iter().all(u8::is_ascii_whitespace), "{buf:?}");
        buf.extend_from_slice(b"not json");
        assert!(take_resizes(&mut buf).is_empty());
        assert!(buf.is_empty());
    }

    #[test]
    fn exit_codes_become_v4_statuses() {
        let v: serde_json::Value = serde_json::from_slice(&status_message(Some(3), None)).unwrap();
        assert_eq!(v["reason"], "NonZeroExitCode");
        assert_eq!(v["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(v["details"]["causes"][0]["message"], "3");
        let v: serde_json::Value = serde_json::from_slice(&status_message(Some(0), None)).unwrap();
        assert_eq!(v["status"], "Success");
        let v: serde_json::Value =
            serde_json::from_slice(&status_message(None, Some("gone"))).unwrap();
        assert_eq!(
            (v["status"].as_str(), v["message"].as_str()),
            (Some("Failure"), Some("gone"))
        );
    }
}
