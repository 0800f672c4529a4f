//! `kubectl port-forward`: SPDY/3.1 with `portforward.k8s.io`, either on an upgraded HTTP
//! connection (what apiservers send kubelets) or tunnelled in a WebSocket
//! (`SPDY/3.1+portforward.k8s.io`, what 1.36+ proxies to nodes that declare
//! `ExtendWebSocketsToKubelet`). For each forwarded connection the client opens two
//! streams with the same `requestid`: `error` and `data`, with the `port`. Each pair
//! becomes one relay session with the agent, which connects to the port inside the
//! container; the data stream carries the bytes, the error stream says why it failed.

use std::{collections::HashMap, sync::Arc};

use axum::{
    Extension,
    extract::{FromRequestParts, Path, Request, State, ws::Message, ws::WebSocket},
    http::{StatusCode, header},
    response::Response,
};
use bytes::Bytes;
use fleetlet_crds::naming::container_id;
use fleetlet_protocol::{
    DeviceId, ResourceId,
    relay::{self, ControlKind, PortForwardRequest},
};
use fleetlet_spdy::{Frame, Headers, StreamId, goaway, rst};
use k8s_openapi::api::core::v1::Pod;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::mpsc,
};
use tracing::{debug, info};

use super::{
    Ctx, Identity, authorize, pod_target,
    session::{Frame as RelayFrame, Session, session_id},
    spdy::{self, Conn},
    streams::Input,
    text,
};

const PROTOCOL: &str = "portforward.k8s.io";
/// The WebSocket subprotocol of SPDY tunnelled in a WebSocket.
const TUNNEL_PROTOCOL: &str = "SPDY/3.1+portforward.k8s.io";
/// Streams a connection may have open or half-opened before it is refused more.
const MAX_STREAMS: usize = 256;

/// What every forwarded connection of one request shares.
struct Target {
    ctx: Ctx,
    device: DeviceId,
    namespace: String,
    name: String,
    pod: Pod,
}

impl Target {
    /// The container a port is forwarded to: the one that declares it as a `containerPort`,
    /// else the first (each container of a fleetlet pod has its own network namespace).
    fn resource_for(&self, port: u16) -> Option<ResourceId> {
        let containers = &self.pod.spec.as_ref()?.containers;
        let index = containers
            .iter()
            .position(|c| {
                c.ports
                    .iter()
                    .flatten()
                    .any(|p| p.container_port == i32::from(port))
            })
            .unwrap_or(0);
        let c = containers.get(index)?;
        container_id(&self.namespace, &self.name, index, &c.name)
    }
}

/// `/portForward/{namespace}/{pod}`.
pub(super) async fn portforward(
    State(ctx): State<Ctx>,
    Extension(id): Extension<Arc<Identity>>,
    Path((namespace, name)): Path<(String, String)>,
    request: Request,
) -> Response {
    if id.user.is_none() {
        return text(
            StatusCode::UNAUTHORIZED,
            "Unauthorized: a client certificate is required",
        );
    }
    let (pod, node, device) = match pod_target(&ctx, &namespace, &name).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    if let Err(r) = authorize(&ctx, &id, "create", &node).await {
        return r;
    }
    let upgrade = request
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let websocket = upgrade == "websocket";
    if !websocket && !upgrade.contains("spdy/3.1") {
        return text(
            StatusCode::BAD_REQUEST,
            "port-forward needs an upgrade to SPDY/3.1 (portforward.k8s.io), or a WebSocket tunnelling it",
        );
    }
    let protocol = if websocket { "websocket" } else { "spdy" };
    ctx.metrics.stream("portforward", protocol);
    info!(%device, pod = %format!("{namespace}/{name}"), user = id.user.as_deref().unwrap_or_default(), protocol, "port-forward");
    let target = Arc::new(Target {
        ctx,
        device,
        namespace,
        name,
        pod,
    });
    if !websocket {
        return spdy::upgrade(request, PROTOCOL, move |conn| serve(conn, target));
    }
    let offers_tunnel = request
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == TUNNEL_PROTOCOL);
    if !offers_tunnel {
        return text(
            StatusCode::BAD_REQUEST,
            format!("a port-forward WebSocket must offer the {TUNNEL_PROTOCOL} subprotocol"),
        );
    }
    let (mut parts, _) = request.into_parts();
    match axum::extract::ws::WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(ws) => ws
            .protocols([TUNNEL_PROTOCOL])
            .on_upgrade(move |socket| tunnel(socket, target)),
        Err(e) => text(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

/// SPDY in a WebSocket: binary messages carry the SPDY connection's bytes both ways.
async fn tunnel(mut socket: WebSocket, target: Arc<Target>) {
    let (inner, outer) = tokio::io::duplex(256 * 1024);
    let session = tokio::spawn(serve(Conn::new(inner), target));
    let (mut from_spdy, mut to_spdy) = tokio::io::split(outer);
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        tokio::select! {
            msg = socket.recv() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    if to_spdy.write_all(&b).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            n = from_spdy.read(&mut buf) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let out = Message::Binary(Bytes::copy_from_slice(&buf[..n]));
                    if socket.send(out).await.is_err() {
                        break;
                    }
                }
            },
        }
    }
    // Closing our end ends the SPDY session, which cancels its relays.
    drop((from_spdy, to_spdy));
    let _ = session.await;
}

/// What a forwarded connection's relay sends back to the SPDY connection.
enum Back {
    Data(StreamId, Bytes),
    /// The connection ended: the error (if any) on the error stream, both streams finished.
    Close {
        data: StreamId,
        error: StreamId,
        message: Option<String>,
    },
}

/// The two streams of one forwarded connection, as they arrive.
#[derive(Default)]
struct Pair {
    error: Option<StreamId>,
    data: Option<StreamId>,
}

/// A stream the client opened, from its headers.
struct Opened {
    data: bool,
    port: u16,
    request: String,
}

fn opened(stream_id: StreamId, headers: &Headers) -> Option<Opened> {
    let data = match headers.get("streamtype")? {
        "data" => true,
        "error" => false,
        _ => return None,
    };
    let port = headers
        .get("port")?
        .parse::<u16>()
        .ok()
        .filter(|p| *p > 0)?;
    // Clients older than request ids open the error stream, then the data stream.
    let request = match headers.get("requestid") {
        Some(id) => id.to_owned(),
        None if data => stream_id.saturating_sub(2).to_string(),
        None => stream_id.to_string(),
    };
    Some(Opened {
        data,
        port,
        request,
    })
}

/// Runs one port-forward SPDY connection until the client closes it.
async fn serve<IO: AsyncRead + AsyncWrite + Unpin>(mut conn: Conn<IO>, target: Arc<Target>) {
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    let mut inputs: HashMap<StreamId, mpsc::UnboundedSender<Input>> = HashMap::new();
    let (back, mut backs) = mpsc::channel::<Back>(32);
    loop {
        tokio::select! {
            b = backs.recv() => {
                let sent = match b {
                    Some(Back::Data(id, bytes)) => conn.data(id, &bytes, false).await,
                    Some(Back::Close { data, error, message }) => {
                        inputs.remove(&data);
                        let m = message.unwrap_or_default();
                        match conn.data(error, m.as_bytes(), true).await {
                            Ok(()) => conn.data(data, &[], true).await,
                            Err(e) => Err(e),
                        }
                    }
                    None => return,
                };
                if sent.is_err() {
                    return;
                }
            }
            frame = conn.next() => match frame {
                Ok(Some(Frame::SynStream { stream_id, headers, .. })) => {
                    let Some(o) = opened(stream_id, &headers).filter(|_| pairs.len() + inputs.len() < MAX_STREAMS) else {
                        let refused = Frame::RstStream { stream_id, status: rst::REFUSED_STREAM };
                        if conn.send(&refused).await.is_err() {
                            return;
                        }
                        continue;
                    };
                    if conn.reply(stream_id).await.is_err() {
                        return;
                    }
                    let pair = pairs.entry(o.request.clone()).or_default();
                    if o.data {
                        pair.data = Some(stream_id);
                    } else {
                        pair.error = Some(stream_id);
                    }
                    if let (Some(error), Some(data)) = (pair.error, pair.data) {
                        pairs.remove(&o.request);
                        let (input, inputs_rx) = mpsc::unbounded_channel();
                        inputs.insert(data, input);
                        let streams = (data, error);
                        tokio::spawn(forward(target.clone(), o.port, streams, inputs_rx, back.clone()));
                    }
                }
                Ok(Some(Frame::Data { stream_id, fin, data })) => {
                    if let Some(input) = inputs.get(&stream_id) {
                        if !data.is_empty() {
                            let _ = input.send(Input::Stdin(Bytes::from(data)));
                        }
                        if fin {
                            let _ = input.send(Input::StdinClose);
                        }
                    }
                }
                // Dropping the input cancels that connection's relay.
                Ok(Some(Frame::RstStream { stream_id, .. })) => {
                    inputs.remove(&stream_id);
                }
                Ok(Some(Frame::GoAway { .. })) | Ok(None) => return,
                Ok(Some(_)) => {}
                Err(e) => {
                    debug!(error = %e, "port-forward session ended");
                    let bye = Frame::GoAway { last_good_stream_id: 0, status: goaway::PROTOCOL_ERROR };
                    let _ = conn.send(&bye).await;
                    return;
                }
            },
        }
    }
}

/// One forwarded connection: a relay session with the agent for `port`.
async fn forward(
    target: Arc<Target>,
    port: u16,
    (data, error): (StreamId, StreamId),
    mut input: mpsc::UnboundedReceiver<Input>,
    back: mpsc::Sender<Back>,
) {
    let fail = |why: String| Back::Close {
        data,
        error,
        message: Some(format!(
            "error forwarding port {port} to pod {}/{}: {why}",
            target.namespace, target.name
        )),
    };
    let Some(resource) = target.resource_for(port) else {
        let _ = back.send(fail("the pod has no container".into())).await;
        return;
    };
    let req = PortForwardRequest {
        resource,
        session: session_id(),
        port,
    };
    let opened = Session::open(
        &target.ctx.frames,
        &target.ctx.nats,
        &target.device,
        relay::portforward_subject(&target.device),
        &req,
        &req.session,
    )
    .await;
    let mut session = match opened {
        Ok(s) => s,
        Err(e) => {
            let _ = back
                .send(fail(format!("cannot reach the device: {e}")))
                .await;
            return;
        }
    };
    let ended = loop {
        tokio::select! {
            frame = session.next_frame() => match frame {
                Some(RelayFrame::Data(_, bytes)) => {
                    if back.send(Back::Data(data, bytes)).await.is_err() {
                        session.send_control(ControlKind::Cancel, Bytes::new(), None).await;
                        return;
                    }
                }
                Some(RelayFrame::Acked | RelayFrame::Exit(_)) => {}
                Some(RelayFrame::End(e)) => break e,
                None => break Some("the device stopped answering".into()),
            },
            msg = input.recv(), if session.input_window_open() => match msg {
                Some(Input::Stdin(b)) => session.send_input(b).await,
                Some(Input::StdinClose) => {
                    session.send_control(ControlKind::StdinClose, Bytes::new(), None).await;
                }
                Some(Input::Resize { .. }) => {}
                None => {
                    session.send_control(ControlKind::Cancel, Bytes::new(), None).await;
                    return;
                }
            },
        }
    };
    let close = match ended {
        Some(why) => fail(why),
        None => Back::Close {
            data,
            error,
            message: None,
        },
    };
    let _ = back.send(close).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_pair_by_request_id_or_by_order_for_old_clients() {
        let h = |pairs: &[(&str, &str)]| {
            let mut h = Headers::new();
            for (n, v) in pairs {
                h.add(n, *v);
            }
            h
        };
        let o = opened(
            7,
            &h(&[("streamtype", "data"), ("port", "80"), ("requestid", "3")]),
        )
        .unwrap();
        assert_eq!((o.data, o.port, o.request.as_str()), (true, 80, "3"));
        let e = opened(1, &h(&[("streamtype", "error"), ("port", "80")])).unwrap();
        let d = opened(3, &h(&[("streamtype", "data"), ("port", "80")])).unwrap();
        assert_eq!(e.request, d.request);
        assert!(opened(5, &h(&[("streamtype", "data"), ("port", "0")])).is_none());
        assert!(opened(5, &h(&[("streamtype", "data"), ("port", "x")])).is_none());
        assert!(opened(5, &h(&[("streamtype", "stdin"), ("port", "80")])).is_none());
    }
}
