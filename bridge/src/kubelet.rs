//! The kubelet API of every virtual node, on one HTTPS listener: what the apiserver calls
//! for `kubectl logs` (and, where it proxies WebSockets to kubelets, `kubectl exec`).
//!
//! Like a kubelet: clients authenticate with a certificate from the configured client CA
//! (the apiserver's `--kubelet-client-certificate`), and each request is authorized with a
//! SubjectAccessReview on `nodes/proxy` of the node it targets. A request is relayed to the
//! device's agent over NATS ([`fleetlet_protocol::relay`]), which serves it from podman for a
//! container it created, and nothing else.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use async_nats::HeaderMap;
use axum::{
    Extension, Router,
    body::Body,
    extract::{Path, Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use bytes::Bytes;
use fleetlet_crds::naming::container_id;
use fleetlet_protocol::{
    DeviceId,
    relay::{self, ACK_INTERVAL_SECS, ControlKind, FRAME, FrameKind, LogsRequest, SEQ},
};
use futures::{Stream, StreamExt};
use k8s_openapi::api::{
    authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
    core::v1::{Node, Pod},
};
use kube::{Api, Client, api::PostParams, runtime::reflector::Store};
use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::frames::{FrameRouter, Registration};

#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Tls(String),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Where the kubelet API listens and with which certificates.
#[derive(Debug, Clone)]
pub struct KubeletConfig {
    pub listen: SocketAddr,
    pub serving: crate::serving::ServingCert,
    /// CA of the client certificates accepted (the apiserver's kubelet client).
    pub client_ca_file: PathBuf,
}

/// Who is calling, from the verified client certificate.
#[derive(Debug, Clone, Default)]
struct Identity {
    user: Option<String>,
    groups: Vec<String>,
}

#[derive(Clone)]
struct Ctx {
    client: Client,
    nats: async_nats::Client,
    frames: Arc<FrameRouter>,
    nodes: Store<Node>,
}

fn read(path: &PathBuf) -> Result<Vec<u8>, KubeletError> {
    std::fs::read(path).map_err(|source| KubeletError::Read {
        path: path.clone(),
        source,
    })
}

fn tls_config(
    c: &KubeletConfig,
    certs: Arc<crate::serving::Resolver>,
) -> Result<ServerConfig, KubeletError> {
    let tls = |e: &dyn std::fmt::Display| KubeletError::Tls(e.to_string());
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&read(&c.client_ca_file)?) {
        roots.add(ca.map_err(|e| tls(&e))?).map_err(|e| tls(&e))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // Unauthenticated clients get through TLS so they can be told 401, as kubelets do.
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| tls(&e))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls(&e))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(certs);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

fn identity_of(certs: Option<&[CertificateDer<'_>]>) -> Identity {
    let Some(leaf) = certs.and_then(|c| c.first()) else {
        return Identity::default();
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf.as_ref()) else {
        return Identity::default();
    };
    let subject = cert.subject();
    Identity {
        user: subject
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned),
        groups: subject
            .iter_organization()
            .filter_map(|o| o.as_str().ok().map(str::to_owned))
            .collect(),
    }
}

/// Binds the listener (so callers know the port) and returns the server future.
pub async fn serve(
    config: KubeletConfig,
    client: Client,
    nats: async_nats::Client,
    nodes: Store<Node>,
) -> Result<(SocketAddr, impl Future<Output = ()>), KubeletError> {
    let (certs, renew) = crate::serving::start(config.serving.clone(), client.clone()).await?;
    let acceptor = TlsAcceptor::from(Arc::new(tls_config(&config, certs)?));
    let listener =
        TcpListener::bind(config.listen)
            .await
            .map_err(|source| KubeletError::Listen {
                addr: config.listen,
                source,
            })?;
    let addr = listener
        .local_addr()
        .map_err(|source| KubeletError::Listen {
            addr: config.listen,
            source,
        })?;
    let frames = FrameRouter::new();
    let router = Router::new()
        .route(
            "/containerLogs/{namespace}/{pod}/{container}",
            get(container_logs),
        )
        .route("/exec/{namespace}/{pod}/{container}", get(exec).post(exec))
        .route(
            "/attach/{namespace}/{pod}/{container}",
            get(attach).post(attach),
        )
        .route("/healthz", get(|| async { "ok" }))
        .with_state(Ctx {
            client,
            nats: nats.clone(),
            frames: frames.clone(),
            nodes,
        });
    info!(%addr, "kubelet API listening");
    let server = async move {
        if let Some(renew) = renew {
            tokio::spawn(renew);
        }
        tokio::spawn(frames.run(nats));
        loop {
            let Ok((tcp, peer)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let router = router.clone();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => return debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => return debug!(%peer, "TLS handshake timed out"),
                };
                let id = identity_of(tls.get_ref().1.peer_certificates());
                let service = hyper_util::service::TowerToHyperService::new(
                    router.layer(Extension(Arc::new(id))),
                );
                let io = hyper_util::rt::TokioIo::new(tls);
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .with_upgrades()
                    .await
                {
                    debug!(%peer, error = %e, "kubelet API connection ended");
                }
            });
        }
    };
    Ok((addr, server))
}

fn text(status: StatusCode, msg: impl Into<String>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        msg.into(),
    )
        .into_response()
}

/// The kubelet's check: may this caller use `verb` on `nodes/proxy` of `node`?
async fn authorize(ctx: &Ctx, id: &Identity, verb: &str, node: &str) -> Result<(), Response> {
    let Some(user) = &id.user else {
        return Err(text(
            StatusCode::UNAUTHORIZED,
            "Unauthorized: a client certificate is required",
        ));
    };
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.clone()),
            groups: Some(id.groups.clone()),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                resource: Some("nodes".into()),
                subresource: Some("proxy".into()),
                name: Some(node.into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let api: Api<SubjectAccessReview> = Api::all(ctx.client.clone());
    match api.create(&PostParams::default(), &review).await {
        Ok(r) if r.status.as_ref().is_some_and(|s| s.allowed) => Ok(()),
        Ok(_) => Err(text(
            StatusCode::FORBIDDEN,
            format!("Forbidden (user={user}, verb={verb}, resource=nodes, subresource=proxy)"),
        )),
        Err(e) => {
            warn!(error = %e, "SubjectAccessReview failed");
            Err(text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "authorization check failed",
            ))
        }
    }
}

/// The device and the container's resource id for `namespace/pod` container `container`.
async fn target(
    ctx: &Ctx,
    namespace: &str,
    pod: &str,
    container: &str,
) -> Result<(String, DeviceId, fleetlet_protocol::ResourceId), Response> {
    let p = Api::<Pod>::namespaced(ctx.client.clone(), namespace)
        .get_opt(pod)
        .await
        .map_err(|e| text(StatusCode::BAD_GATEWAY, e.to_string()))?
        .ok_or_else(|| {
            text(
                StatusCode::NOT_FOUND,
                format!("pod {namespace}/{pod} not found"),
            )
        })?;
    let node = p
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .ok_or_else(|| text(StatusCode::NOT_FOUND, "the pod is not bound to a node"))?;
    let device = fleetlet_crds::naming::node_devices(ctx.nodes.state().iter().map(|n| n.as_ref()));
    let device = device.get(&node).cloned().ok_or_else(|| {
        text(
            StatusCode::NOT_FOUND,
            format!("{node} is not a fleetlet node"),
        )
    })?;
    let index = p
        .spec
        .as_ref()
        .and_then(|s| s.containers.iter().position(|c| c.name == container))
        .ok_or_else(|| {
            text(
                StatusCode::NOT_FOUND,
                format!("container {container} is not in pod {pod}"),
            )
        })?;
    let id = container_id(namespace, pod, index, container)
        .ok_or_else(|| text(StatusCode::NOT_FOUND, "no resource id for this container"))?;
    Ok((node, device, id))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LogsQuery {
    #[serde(default)]
    follow: Option<String>,
    tail_lines: Option<u64>,
    since_seconds: Option<u64>,
    since_time: Option<String>,
    #[serde(default)]
    timestamps: Option<String>,
    limit_bytes: Option<u64>,
}

fn truthy(v: &Option<String>) -> bool {
    v.as_deref()
        .is_some_and(|s| s.is_empty() || s == "true" || s == "1")
}

fn session_id() -> String {
    format!("{:016x}{:08x}", fastrand::u64(..), fastrand::u32(..))
}

async fn container_logs(
    State(ctx): State<Ctx>,
    Extension(id): Extension<Arc<Identity>>,
    Path((namespace, pod, container)): Path<(String, String, String)>,
    Query(q): Query<LogsQuery>,
) -> Response {
    if id.user.is_none() {
        return text(
            StatusCode::UNAUTHORIZED,
            "Unauthorized: a client certificate is required",
        );
    }
    let (node, device, resource) = match target(&ctx, &namespace, &pod, &container).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    if let Err(r) = authorize(&ctx, &id, "get", &node).await {
        return r;
    }
    let since_seconds = q.since_seconds.or_else(|| {
        let t: k8s_openapi::jiff::Timestamp = q.since_time.as_deref()?.parse().ok()?;
        let now = k8s_openapi::jiff::Timestamp::now();
        u64::try_from(now.as_second() - t.as_second()).ok()
    });
    let req = LogsRequest {
        resource,
        session: session_id(),
        follow: truthy(&q.follow),
        tail_lines: q.tail_lines,
        since_seconds,
        timestamps: truthy(&q.timestamps),
        limit_bytes: q.limit_bytes,
    };
    debug!(%device, resource = %req.resource, follow = req.follow, "relaying logs");
    match Session::open(
        &ctx,
        &device,
        relay::logs_subject(&device),
        &req,
        &req.session,
    )
    .await
    {
        Ok(mut s) => {
            // The first frame tells a refusal (unknown container) from a log.
            match s.next_frame().await {
                Some(Frame::End(Some(err))) => text(StatusCode::NOT_FOUND, err),
                Some(Frame::End(None)) | None => text(StatusCode::OK, ""),
                Some(Frame::Data(_, first)) => {
                    let body = futures::stream::once(async move { Ok::<_, std::io::Error>(first) })
                        .chain(s.into_stream());
                    Response::builder()
                        .status(StatusCode::OK)
                        .header(header::CONTENT_TYPE, "text/plain")
                        .body(Body::from_stream(body))
                        .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "response"))
                }
                Some(Frame::Exit(_)) => text(StatusCode::OK, ""),
            }
        }
        Err(r) => r,
    }
}

/// What a relay session delivers.
enum Frame {
    /// Output of the given stream (stdout or stderr).
    Data(FrameKind, Bytes),
    Exit(i32),
    /// The session ended, with an error message if it failed.
    End(Option<String>),
}

/// The requester's side of a relay session: reads frames, acknowledges, cancels on drop.
struct Session {
    nats: async_nats::Client,
    control: String,
    frames: Registration,
    consumed: u64,
    acked_at: tokio::time::Instant,
    ended: bool,
}

impl Session {
    async fn open(
        ctx: &Ctx,
        device: &DeviceId,
        subject: String,
        request: &impl serde::Serialize,
        session: &str,
    ) -> Result<Self, Response> {
        // Registered before the request goes out, so no frame can arrive unrouted.
        let frames = ctx.frames.register(device, session);
        let body = serde_json::to_vec(request)
            .map_err(|e| text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        let nats = ctx.nats.clone();
        nats.publish(subject, body.into())
            .await
            .map_err(|e| text(StatusCode::BAD_GATEWAY, format!("NATS: {e}")))?;
        Ok(Self {
            nats,
            control: relay::control_subject(device, session),
            frames,
            consumed: 0,
            acked_at: tokio::time::Instant::now(),
            ended: false,
        })
    }

    async fn send_control(&self, kind: ControlKind, payload: Bytes, seq: Option<u64>) {
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
    async fn next_frame(&mut self) -> Option<Frame> {
        if self.ended {
            return None;
        }
        loop {
            let wait = Duration::from_secs(ACK_INTERVAL_SECS);
            let msg = match tokio::time::timeout(wait, self.frames.frames.recv()).await {
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
                Some(FrameKind::End) => {
                    self.ended = true;
                    let err = String::from_utf8_lossy(&msg.payload).into_owned();
                    return Some(Frame::End(Some(err).filter(|e| !e.is_empty())));
                }
                None => continue,
            }
        }
    }

    /// The remaining output as a body stream; the session is cancelled if the body is dropped.
    fn into_stream(self) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send {
        let guard = CancelOnDrop(Some(self));
        futures::stream::unfold(guard, |mut g| async move {
            let s = g.0.as_mut()?;
            match s.next_frame().await {
                Some(Frame::Data(_, b)) => Some((Ok(b), g)),
                Some(Frame::Exit(_)) => Some((Ok(Bytes::new()), g)),
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

/// What the exec request's query says (repeated `command`, kubelet's stream flags).
#[derive(Debug, Default)]
struct ExecQuery {
    command: Vec<String>,
    stdin: bool,
    stdout: bool,
    stderr: bool,
    tty: bool,
}

fn exec_query(raw: Option<&str>) -> ExecQuery {
    let mut q = ExecQuery::default();
    let on = |v: &str| v.is_empty() || v == "1" || v == "true";
    for (k, v) in form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        match k.as_ref() {
            "command" => q.command.push(v.into_owned()),
            "input" | "stdin" => q.stdin = on(&v),
            "output" | "stdout" => q.stdout = on(&v),
            "error" | "stderr" => q.stderr = on(&v),
            "tty" => q.tty = on(&v),
            _ => {}
        }
    }
    q
}

/// Channel bytes of the Kubernetes remote command WebSocket protocol (v4/v5.channel.k8s.io).
const CH_STDIN: u8 = 0;
const CH_STDOUT: u8 = 1;
const CH_STDERR: u8 = 2;
const CH_ERROR: u8 = 3;
const CH_RESIZE: u8 = 4;
const CH_CLOSE: u8 = 255;

type Upgrade = Result<
    axum::extract::ws::WebSocketUpgrade,
    axum::extract::ws::rejection::WebSocketUpgradeRejection,
>;

/// What exec and attach check before upgrading: a caller with a certificate, a container
/// on a fleetlet node, `create` on its `nodes/proxy`, and a WebSocket upgrade.
async fn stream_target(
    ctx: &Ctx,
    id: &Identity,
    (namespace, pod, container): (String, String, String),
    ws: Upgrade,
    what: &str,
) -> Result<
    (
        DeviceId,
        fleetlet_protocol::ResourceId,
        axum::extract::ws::WebSocketUpgrade,
    ),
    Response,
> {
    if id.user.is_none() {
        return Err(text(
            StatusCode::UNAUTHORIZED,
            "Unauthorized: a client certificate is required",
        ));
    }
    let (node, device, resource) = target(ctx, &namespace, &pod, &container).await?;
    authorize(ctx, id, "create", &node).await?;
    let ws = ws.map_err(|_| {
        text(
            StatusCode::BAD_REQUEST,
            format!("{what} needs a WebSocket upgrade (v5.channel.k8s.io); SPDY is not served"),
        )
    })?;
    info!(%device, %resource, user = id.user.as_deref().unwrap_or_default(), what);
    Ok((device, resource, ws))
}

/// `kubectl exec` over WebSockets (what the apiserver sends kubelets that declare
/// `ExtendWebSocketsToKubelet`).
async fn exec(
    State(ctx): State<Ctx>,
    Extension(id): Extension<Arc<Identity>>,
    Path(path): Path<(String, String, String)>,
    axum::extract::RawQuery(raw): axum::extract::RawQuery,
    ws: Upgrade,
) -> Response {
    let q = exec_query(raw.as_deref());
    if q.command.is_empty() {
        return text(StatusCode::BAD_REQUEST, "no command");
    }
    let (device, resource, ws) = match stream_target(&ctx, &id, path, ws, "exec").await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let req = fleetlet_protocol::relay::ExecRequest {
        resource,
        session: session_id(),
        command: q.command,
        stdin: q.stdin,
        stdout: q.stdout,
        stderr: q.stderr,
        tty: q.tty,
    };
    debug!(argv = ?req.command, "exec command");
    let subject = relay::exec_subject(&device);
    let session = req.session.clone();
    ws.protocols(["v5.channel.k8s.io", "v4.channel.k8s.io"])
        .on_upgrade(move |socket| stream_session(ctx, device, subject, session, req, false, socket))
}

/// `kubectl attach` over WebSockets: the container's main process's output (and stdin, if
/// the container was started with it).
async fn attach(
    State(ctx): State<Ctx>,
    Extension(id): Extension<Arc<Identity>>,
    Path(path): Path<(String, String, String)>,
    axum::extract::RawQuery(raw): axum::extract::RawQuery,
    ws: Upgrade,
) -> Response {
    let q = exec_query(raw.as_deref());
    let (device, resource, ws) = match stream_target(&ctx, &id, path, ws, "attach").await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let req = fleetlet_protocol::relay::AttachRequest {
        resource,
        session: session_id(),
        stdin: q.stdin,
        stdout: q.stdout,
        stderr: q.stderr,
        tty: q.tty,
    };
    let subject = relay::attach_subject(&device);
    let session = req.session.clone();
    ws.protocols(["v5.channel.k8s.io", "v4.channel.k8s.io"])
        .on_upgrade(move |socket| stream_session(ctx, device, subject, session, req, true, socket))
}

fn status_message(code: Option<i32>, error: Option<&str>) -> Vec<u8> {
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
    let mut out = vec![CH_ERROR];
    out.extend(serde_json::to_vec(&status).unwrap_or_default());
    out
}

/// Relays one exec or attach session between the apiserver's WebSocket and the agent.
/// `detachable`: ending without an exit code is a success (an attach left early).
async fn stream_session(
    ctx: Ctx,
    device: DeviceId,
    subject: String,
    session_id: String,
    req: impl serde::Serialize,
    detachable: bool,
    mut socket: axum::extract::ws::WebSocket,
) {
    use axum::extract::ws::Message;
    let mut session = match Session::open(&ctx, &device, subject, &req, &session_id).await {
        Ok(s) => s,
        Err(_) => {
            let _ = socket
                .send(Message::Binary(
                    status_message(None, Some("cannot reach NATS")).into(),
                ))
                .await;
            return;
        }
    };
    let mut code = None;
    let error = loop {
        tokio::select! {
            frame = session.next_frame() => match frame {
                Some(Frame::Data(kind, bytes)) => {
                    let ch = if kind == FrameKind::Stderr { CH_STDERR } else { CH_STDOUT };
                    let mut out = Vec::with_capacity(bytes.len() + 1);
                    out.push(ch);
                    out.extend_from_slice(&bytes);
                    if socket.send(Message::Binary(out.into())).await.is_err() {
                        break None;
                    }
                }
                Some(Frame::Exit(c)) => code = Some(c),
                Some(Frame::End(e)) => break e,
                None => break Some("the device stopped answering".into()),
            },
            msg = socket.recv() => match msg {
                Some(Ok(Message::Binary(b))) if !b.is_empty() => match b[0] {
                    CH_STDIN => session.send_control(ControlKind::Stdin, Bytes::copy_from_slice(&b[1..]), None).await,
                    CH_RESIZE => {
                        #[derive(Deserialize)]
                        #[serde(rename_all = "PascalCase")]
                        struct Size { width: u16, height: u16 }
                        if let Ok(sz) = serde_json::from_slice::<Size>(&b[1..]) {
                            let payload = Bytes::from(format!("{}x{}", sz.width, sz.height));
                            session.send_control(ControlKind::Resize, payload, None).await;
                        }
                    }
                    CH_CLOSE if b.get(1) == Some(&CH_STDIN) => {
                        session.send_control(ControlKind::StdinClose, Bytes::new(), None).await;
                    }
                    _ => {}
                },
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    session.send_control(ControlKind::Cancel, Bytes::new(), None).await;
                    return;
                }
                Some(Ok(_)) => {}
            },
        }
    };
    if detachable && code.is_none() && error.is_none() {
        code = Some(0);
    }
    let _ = socket
        .send(Message::Binary(
            status_message(code, error.as_deref()).into(),
        ))
        .await;
    let _ = socket
        .send(Message::Close(Some(axum::extract::ws::CloseFrame {
            code: axum::extract::ws::close_code::NORMAL,
            reason: "".into(),
        })))
        .await;
}
