//! The kubelet API of every virtual node, on one HTTPS listener: what the apiserver calls
//! for `kubectl logs`, `exec` and `attach` (over WebSockets or SPDY/3.1, whichever the
//! apiserver speaks).
//!
//! Like a kubelet: clients authenticate with a certificate from the configured client CA
//! (the apiserver's `--kubelet-client-certificate`) or a bearer token the apiserver accepts
//! (a TokenReview, as `--authentication-token-webhook` does), and each request is
//! authorized with a SubjectAccessReview on `nodes/proxy` of the node it targets. A request is relayed to the
//! device's agent over NATS ([`fleetlet_protocol::relay`]), which serves it from podman for a
//! container it created, and nothing else.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use axum::{
    Extension, Router,
    body::Body,
    extract::{Path, Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use fleetlet_crds::naming::container_id;
use fleetlet_protocol::{
    DeviceId,
    relay::{self, LogsRequest},
};
use futures::StreamExt;
use k8s_openapi::api::{
    authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
    core::v1::Pod,
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

use crate::{frames::FrameRouter, metrics::Metrics};

mod auth;
mod portforward;
pub mod ports;
mod session;
mod spdy;
mod streams;
pub mod usage;
mod websocket;

use session::{Frame, Session, session_id};

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
    /// Ports handed to the Nodes one each (see [`ports`]), on the listener's address.
    pub node_ports: Option<std::ops::RangeInclusive<u16>>,
}

/// The Node a listener serves alone (a node port), or `None` on the shared port.
#[derive(Debug, Clone, Default)]
pub(crate) struct ServedNode(pub Option<String>);

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
    nodes: Store<crate::view::StoredNode>,
    pods: Store<Pod>,
    metrics: Arc<Metrics>,
    tokens: Arc<auth::TokenCache>,
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
    nodes: Store<crate::view::StoredNode>,
    pods: Store<Pod>,
    metrics: Arc<Metrics>,
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
        .route(
            "/exec/{namespace}/{pod}/{container}",
            get(streams::exec).post(streams::exec),
        )
        .route(
            "/attach/{namespace}/{pod}/{container}",
            get(streams::attach).post(streams::attach),
        )
        .route(
            "/portForward/{namespace}/{pod}",
            get(portforward::portforward).post(portforward::portforward),
        )
        .route("/metrics/resource", get(usage::metrics_resource))
        .route("/stats/summary", get(usage::stats_summary))
        .route("/healthz", get(|| async { "ok" }));
    let ctx = Ctx {
        client,
        nats: nats.clone(),
        frames: frames.clone(),
        nodes,
        pods,
        metrics,
        tokens: Arc::default(),
    };
    // Callers without a client certificate may present a bearer token (checked by a
    // TokenReview), as to a kubelet run with --authentication-token-webhook.
    let node_store = ctx.nodes.clone();
    let router = router
        .route_layer(axum::middleware::from_fn_with_state(
            ctx.clone(),
            auth::bearer,
        ))
        .with_state(ctx);
    info!(%addr, "kubelet API listening");
    let server = async move {
        if let Some(renew) = renew {
            tokio::spawn(renew);
        }
        tokio::spawn(frames.run(nats));
        if let Some(range) = config.node_ports.clone() {
            let node_listeners = NodeListeners {
                ip: addr.ip(),
                range,
                acceptor: acceptor.clone(),
                router: router.clone(),
                nodes: node_store,
            };
            tokio::spawn(node_listeners.run());
        }
        accept(listener, acceptor, router, ServedNode(None)).await;
    };
    Ok((addr, server))
}

/// Serves connections on `listener` for `served` until the task is dropped.
async fn accept(listener: TcpListener, acceptor: TlsAcceptor, router: Router, served: ServedNode) {
    let served = Arc::new(served);
    loop {
        let Ok((tcp, peer)) = listener.accept().await else {
            continue;
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        let served = served.clone();
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => return debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => return debug!(%peer, "TLS handshake timed out"),
                };
            let id = identity_of(tls.get_ref().1.peer_certificates());
            let service = hyper_util::service::TowerToHyperService::new(
                router
                    .layer(Extension(Arc::new(id)))
                    .layer(Extension(served)),
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
}

/// The per-node listeners: one per port the Nodes advertise within the range, opened and
/// closed as the Node store changes.
struct NodeListeners {
    ip: std::net::IpAddr,
    range: std::ops::RangeInclusive<u16>,
    acceptor: TlsAcceptor,
    router: Router,
    nodes: Store<crate::view::StoredNode>,
}

impl NodeListeners {
    async fn run(self) {
        let mut open: std::collections::HashMap<u16, (String, tokio::task::AbortHandle)> =
            std::collections::HashMap::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let nodes = self.nodes.state();
            let wanted = ports::wanted(nodes.iter().map(|n| n.as_ref()), &self.range);
            open.retain(|port, (node, task)| {
                let keep = wanted.get(port) == Some(node);
                if !keep {
                    task.abort();
                    debug!(port, %node, "node port closed");
                }
                keep
            });
            for (port, node) in wanted {
                if open.contains_key(&port) {
                    continue;
                }
                let addr = SocketAddr::new(self.ip, port);
                match TcpListener::bind(addr).await {
                    Ok(l) => {
                        debug!(%addr, %node, "node port open");
                        let task = tokio::spawn(accept(
                            l,
                            self.acceptor.clone(),
                            self.router.clone(),
                            ServedNode(Some(node.clone())),
                        ));
                        open.insert(port, (node, task.abort_handle()));
                    }
                    // Tried again on the next tick.
                    Err(e) => warn!(%addr, %node, error = %e, "cannot listen on the node's port"),
                }
            }
        }
    }
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
    authorize_on(ctx, id, verb, node, "proxy").await
}

/// May this caller use `verb` on `nodes/<subresource>` of `node` (`proxy`, or `metrics` and
/// `stats` for the figures, as a kubelet asks)?
async fn authorize_on(
    ctx: &Ctx,
    id: &Identity,
    verb: &str,
    node: &str,
    subresource: &str,
) -> Result<(), Response> {
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
                subresource: Some(subresource.into()),
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
            format!(
                "Forbidden (user={user}, verb={verb}, resource=nodes, subresource={subresource})"
            ),
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

/// The pod `namespace/pod`, its node and the node's device: the pod must be bound to a
/// fleetlet node.
async fn pod_target(
    ctx: &Ctx,
    namespace: &str,
    pod: &str,
) -> Result<(Pod, String, DeviceId), Response> {
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
    let device = node_device(ctx, &node).ok_or_else(|| not_a_fleetlet_node(&node))?;
    Ok((p, node, device))
}

/// The device of fleetlet Node `node`, from the Node store (one lookup, not a map of the
/// fleet per request).
fn node_device(ctx: &Ctx, node: &str) -> Option<DeviceId> {
    ctx.nodes
        .get(&kube::runtime::reflector::ObjectRef::new(node))
        .and_then(|n| fleetlet_crds::naming::device_of(&n.metadata))
}

fn not_a_fleetlet_node(node: &str) -> Response {
    text(
        StatusCode::NOT_FOUND,
        format!("{node} is not a fleetlet node"),
    )
}

/// The device and the container's resource id for `namespace/pod` container `container`.
async fn target(
    ctx: &Ctx,
    namespace: &str,
    pod: &str,
    container: &str,
) -> Result<(String, DeviceId, fleetlet_protocol::ResourceId), Response> {
    let (p, node, device) = pod_target(ctx, namespace, pod).await?;
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
    #[serde(default)]
    previous: Option<String>,
}

fn truthy(v: &Option<String>) -> bool {
    v.as_deref()
        .is_some_and(|s| s.is_empty() || s == "true" || s == "1")
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
        previous: truthy(&q.previous),
    };
    debug!(%device, resource = %req.resource, follow = req.follow, "relaying logs");
    match Session::open(
        &ctx.frames,
        &ctx.nats,
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
                // As from a kubelet: no previous run is a bad request, the rest not found.
                Some(Frame::End(Some(err))) if req.previous => text(
                    StatusCode::BAD_REQUEST,
                    format!("container \"{container}\" in pod \"{pod}\": {err}"),
                ),
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
                Some(Frame::Exit(_) | Frame::Acked) => text(StatusCode::OK, ""),
            }
        }
        Err(e) => text(StatusCode::BAD_GATEWAY, e.to_string()),
    }
}
