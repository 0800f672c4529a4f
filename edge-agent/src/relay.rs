//! Logs, exec, attach, port-forward and resource-usage sessions for the control plane
//! (`kubectl logs`, `exec`, `attach`, `port-forward`, `top`), served from podman for containers this agent created,
//! and only those: a request names a resource id, and the container is found by the
//! agent's own labels.
//!
//! The protocol (subjects, frames, flow control) is in [`fleetlet_protocol::relay`].

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_nats::{Client, HeaderMap, Message};
use bytes::Bytes;
use fleetlet_protocol::{
    DeviceId,
    relay::{
        self, AttachRequest, ControlKind, EXIT_CODE, ExecRequest, FRAME, FrameKind,
        IDLE_TIMEOUT_SECS, LogsRequest, MAX_CHUNK_BYTES, PortForwardRequest, SEQ, StatsRequest,
        WINDOW_BYTES,
    },
};
use futures::AsyncWriteExt;
use futures::StreamExt;
use podman_api::{
    conn::{Multiplexer, TtyChunk},
    opts::{ContainerAttachOpts, ContainerLogsOpts, ExecCreateOpts, ExecStartOpts},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    sync::mpsc,
    time::Instant,
};
use tracing::{debug, info, warn};

use crate::container::ContainerReconciler;

type Sessions = Arc<Mutex<HashMap<String, mpsc::Sender<Message>>>>;

/// Serves relay sessions until `stop` turns true.
pub async fn serve(
    client: Client,
    device: DeviceId,
    containers: ContainerReconciler,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut sub = loop {
        match client.subscribe(relay::device_wildcard(&device)).await {
            Ok(s) => break s,
            Err(e) => {
                warn!(error = %e, "subscribing to relay sessions; retrying");
                tokio::select! {
                    _ = crate::stopped(&mut stop) => return,
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            }
        }
    };
    let sessions: Sessions = Arc::default();
    let logs = relay::logs_subject(&device);
    let exec = relay::exec_subject(&device);
    let attach = relay::attach_subject(&device);
    let portforward = relay::portforward_subject(&device);
    let stats = relay::stats_subject(&device);
    let sampler = Arc::new(crate::stats::Sampler::default());
    let control_prefix = relay::control_subject(&device, "");
    let frames = relay::frames_subject(&device);
    loop {
        let msg = tokio::select! {
            _ = crate::stopped(&mut stop) => break,
            m = sub.next() => match m { Some(m) => m, None => break },
        };
        let subject = msg.subject.as_str();
        if let Some(session) = subject.strip_prefix(&control_prefix) {
            let tx = sessions.lock().ok().and_then(|s| s.get(session).cloned());
            if let Some(tx) = tx {
                // A full queue means a requester far ahead of us: drop, it will resend acks.
                let _ = tx.try_send(msg);
            }
            continue;
        }
        let out = Output::new(client.clone(), frames.clone());
        let (c, ss) = (containers.clone(), sessions.clone());
        if subject == logs {
            start::<LogsRequest, _, _>(&msg.payload, out, ss, c, logs_session).await;
        } else if subject == attach {
            start::<AttachRequest, _, _>(&msg.payload, out, ss, c, attach_session).await;
        } else if subject == exec {
            start::<ExecRequest, _, _>(&msg.payload, out, ss, c, exec_session).await;
        } else if subject == portforward {
            start::<PortForwardRequest, _, _>(&msg.payload, out, ss, c, portforward_session).await;
        } else if subject == stats {
            stats_session(&msg.payload, out, c, sampler.clone());
        }
    }
}

/// What every session request has.
trait SessionRequest: serde::de::DeserializeOwned + Send + 'static {
    const KIND: &'static str;
    fn session(&self) -> &str;
    fn resource(&self) -> &fleetlet_protocol::ResourceId;
    fn check(&self) -> Result<(), relay::RequestError>;
}

/// The three session requests share their shape: a session, a resource, a validation.
macro_rules! session_requests {
    ($($request:ty => $kind:literal),* $(,)?) => {$(
        impl SessionRequest for $request {
            const KIND: &'static str = $kind;
            fn session(&self) -> &str {
                &self.session
            }
            fn resource(&self) -> &fleetlet_protocol::ResourceId {
                &self.resource
            }
            fn check(&self) -> Result<(), relay::RequestError> {
                self.validate()
            }
        }
    )*};
}

session_requests!(
    LogsRequest => "logs",
    AttachRequest => "attach",
    ExecRequest => "exec",
    PortForwardRequest => "portforward",
);

/// Checks a request, finds the container it names (only one this agent created), and runs
/// the session on its own task.
async fn start<R, F, Fut>(
    payload: &[u8],
    out: Output,
    sessions: Sessions,
    containers: ContainerReconciler,
    run: F,
) where
    R: SessionRequest,
    F: FnOnce(ContainerReconciler, String, R, Output, mpsc::Receiver<Message>) -> Fut
        + Send
        + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let mut out = out;
    let req = match serde_json::from_slice::<R>(payload) {
        Ok(r) => r,
        Err(e) => {
            // Answer on the session the request names, if it names a valid one.
            let session = serde_json::from_slice::<serde_json::Value>(payload)
                .ok()
                .and_then(|v| v.get("session")?.as_str().map(str::to_owned))
                .filter(|s| relay::valid_session(s));
            let Some(session) = session else {
                warn!(kind = R::KIND, error = %e, "relay request without a valid session; ignored");
                return;
            };
            out.session = session;
            return out
                .end(Some(&format!("malformed {} request: {e}", R::KIND)))
                .await;
        }
    };
    if !relay::valid_session(req.session()) {
        warn!(
            kind = R::KIND,
            "relay request with an invalid session id; ignored"
        );
        return;
    }
    out.session = req.session().to_owned();
    if let Err(why) = req.check() {
        return out.end(Some(&why.to_string())).await;
    }
    let session = req.session().to_owned();
    let rx = register(&sessions, &session);
    tokio::spawn(async move {
        match containers.owned_container(req.resource()).await {
            Ok(Some(cid)) => run(containers, cid, req, out, rx).await,
            Ok(None) => {
                let why = format!("no container of resource {} on this device", req.resource());
                out.end(Some(&why)).await;
            }
            Err(e) => out.end(Some(&e.to_string())).await,
        }
        unregister(&sessions, &session);
    });
}

/// Answers a [`StatsRequest`]: one sample as a JSON document, then the end frame. Needs no
/// session state (nothing comes back from the requester).
fn stats_session(
    payload: &[u8],
    mut out: Output,
    containers: ContainerReconciler,
    sampler: Arc<crate::stats::Sampler>,
) {
    let req = match serde_json::from_slice::<StatsRequest>(payload) {
        Ok(r) if r.validate().is_ok() => r,
        Ok(_) | Err(_) => {
            warn!("stats request without a valid session; ignored");
            return;
        }
    };
    out.session = req.session;
    tokio::spawn(async move {
        let sample = sampler.sample(Some(&containers)).await;
        match serde_json::to_vec(&sample) {
            Ok(doc) => {
                for chunk in doc.chunks(MAX_CHUNK_BYTES) {
                    if !out
                        .frame(FrameKind::Stdout, Bytes::copy_from_slice(chunk), None)
                        .await
                    {
                        return;
                    }
                }
                out.end(None).await;
            }
            Err(e) => out.end(Some(&format!("encoding stats: {e}"))).await,
        }
    });
}

fn register(sessions: &Sessions, id: &str) -> mpsc::Receiver<Message> {
    let (tx, rx) = mpsc::channel(64);
    if let Ok(mut s) = sessions.lock() {
        s.insert(id.to_owned(), tx);
    }
    rx
}

fn unregister(sessions: &Sessions, id: &str) {
    if let Ok(mut s) = sessions.lock() {
        s.remove(id);
    }
}

/// The sending side of a session, with its flow-control window.
struct Output {
    client: Client,
    /// The device's frames subject.
    subject: String,
    session: String,
    seq: u64,
    sent: u64,
    acked: u64,
    last_heard: Instant,
    /// Input (stdin, forwarded bytes) passed on, and how much of it was acknowledged.
    input_consumed: u64,
    input_acked: u64,
}

enum Control {
    Continue,
    Stdin(Bytes),
    StdinClose,
    Resize(usize, usize),
    Stop,
}

impl Output {
    fn new(client: Client, subject: String) -> Self {
        Self {
            client,
            subject,
            session: String::new(),
            seq: 0,
            sent: 0,
            acked: 0,
            last_heard: Instant::now(),
            input_consumed: 0,
            input_acked: 0,
        }
    }

    async fn frame(
        &mut self,
        kind: FrameKind,
        payload: Bytes,
        extra: Option<(&str, String)>,
    ) -> bool {
        let mut h = HeaderMap::new();
        h.insert(relay::SESSION, self.session.as_str());
        h.insert(FRAME, kind.as_str());
        h.insert(SEQ, self.seq.to_string().as_str());
        if let Some((k, v)) = extra {
            h.insert(k, v.as_str());
        }
        self.seq += 1;
        self.sent += payload.len() as u64;
        self.client
            .publish_with_headers(self.subject.clone(), h, payload)
            .await
            .is_ok()
    }

    /// Sends output in chunks, waiting for acknowledgements when the window is full.
    async fn data(
        &mut self,
        kind: FrameKind,
        bytes: &[u8],
        control: &mut mpsc::Receiver<Message>,
        pending: &mut Vec<Control>,
    ) -> bool {
        for chunk in bytes.chunks(MAX_CHUNK_BYTES) {
            while self.sent.saturating_sub(self.acked) > WINDOW_BYTES {
                match self.next_control(control).await {
                    Control::Continue => {}
                    Control::Stop => return false,
                    other => pending.push(other),
                }
            }
            if !self.frame(kind, Bytes::copy_from_slice(chunk), None).await {
                return false;
            }
        }
        true
    }

    /// Waits for the next control message; `Stop` on cancel or an idle requester.
    async fn next_control(&mut self, control: &mut mpsc::Receiver<Message>) -> Control {
        let idle = Duration::from_secs(IDLE_TIMEOUT_SECS);
        match tokio::time::timeout_at(self.last_heard + idle, control.recv()).await {
            Ok(Some(m)) => self.handle(&m),
            Ok(None) | Err(_) => {
                debug!(session = %self.session, "requester went quiet; ending the session");
                Control::Stop
            }
        }
    }

    fn handle(&mut self, m: &Message) -> Control {
        self.last_heard = Instant::now();
        let header = |name: &str| {
            m.headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
        };
        match header(FRAME).as_deref().and_then(ControlKind::parse) {
            Some(ControlKind::Ack) => {
                if let Some(n) = header(SEQ).and_then(|s| s.parse::<u64>().ok()) {
                    self.acked = self.acked.max(n);
                }
                Control::Continue
            }
            Some(ControlKind::Stdin) => Control::Stdin(m.payload.clone()),
            Some(ControlKind::StdinClose) => Control::StdinClose,
            Some(ControlKind::Resize) => {
                let size = String::from_utf8_lossy(&m.payload).into_owned();
                match size.split_once('x').map(|(w, h)| (w.parse(), h.parse())) {
                    Some((Ok(w), Ok(h))) => Control::Resize(w, h),
                    _ => Control::Continue,
                }
            }
            Some(ControlKind::Cancel) => Control::Stop,
            None => Control::Continue,
        }
    }

    /// Counts `n` more bytes of input passed on; acknowledges them once a quarter window has
    /// gathered. `false` if the acknowledgement could not be sent.
    async fn consumed(&mut self, n: usize) -> bool {
        self.input_consumed += n as u64;
        self.input_consumed - self.input_acked < INPUT_ACK_BYTES || self.ack_input().await
    }

    /// Acknowledges every byte of input passed on so far, if any is not yet: the requester's
    /// window reopens. `false` if the acknowledgement could not be sent.
    async fn ack_input(&mut self) -> bool {
        if self.input_consumed == self.input_acked {
            return true;
        }
        self.input_acked = self.input_consumed;
        let mut h = HeaderMap::new();
        h.insert(relay::SESSION, self.session.as_str());
        h.insert(FRAME, FrameKind::Ack.as_str());
        h.insert(SEQ, self.input_acked.to_string().as_str());
        self.client
            .publish_with_headers(self.subject.clone(), h, Bytes::new())
            .await
            .is_ok()
    }

    async fn end(mut self, error: Option<&str>) {
        let payload = Bytes::from(error.unwrap_or_default().to_owned());
        self.frame(FrameKind::End, payload, None).await;
        let _ = self.client.flush().await;
    }

    /// Ends a session whose process may have exited: its exit code first, when known.
    async fn exit(mut self, code: Option<i64>, error: Option<&str>) {
        if let Some(code) = code {
            self.frame(
                FrameKind::Exit,
                Bytes::new(),
                Some((EXIT_CODE, code.to_string())),
            )
            .await;
        }
        self.end(error).await;
    }
}

async fn logs_session(
    containers: ContainerReconciler,
    cid: String,
    req: LogsRequest,
    mut out: Output,
    mut control: mpsc::Receiver<Message>,
) {
    debug!(resource = %req.resource, follow = req.follow, previous = req.previous, "logs session");
    let podman = containers.podman();
    let container = podman.containers().get(&cid);
    let mut opts = ContainerLogsOpts::builder()
        .stdout(true)
        .stderr(true)
        .follow(req.follow && !req.previous)
        .timestamps(req.timestamps)
        .tail(
            req.tail_lines
                .map_or_else(|| "all".to_owned(), |n| n.to_string()),
        );
    if let Some(s) = req.since_seconds {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        opts = opts.since(now.saturating_sub(s).to_string());
    }
    if req.previous {
        return previous_logs(containers, cid, req, out, control).await;
    }
    let opts = opts.build();
    let mut stream = container.logs(&opts);
    let mut budget = req.limit_bytes.unwrap_or(u64::MAX);
    let mut pending = Vec::new();
    let error = loop {
        tokio::select! {
            chunk = stream.next() => match chunk {
                None => break None,
                Some(Err(e)) => break Some(e.to_string()),
                Some(Ok(c)) => {
                    let (kind, mut bytes): (FrameKind, Vec<u8>) = match c {
                        TtyChunk::StdErr(b) => (FrameKind::Stderr, b),
                        TtyChunk::StdOut(b) | TtyChunk::StdIn(b) => (FrameKind::Stdout, b),
                    };
                    bytes.truncate(usize::try_from(budget).unwrap_or(usize::MAX));
                    budget -= bytes.len() as u64;
                    if !out.data(kind, &bytes, &mut control, &mut pending).await {
                        break None;
                    }
                    if budget == 0 {
                        break None;
                    }
                }
            },
            c = out.next_control(&mut control) => {
                if matches!(c, Control::Stop) {
                    break None;
                }
            }
        }
    };
    out.end(error.as_deref()).await;
}

async fn exec_session(
    containers: ContainerReconciler,
    cid: String,
    req: ExecRequest,
    mut out: Output,
    mut control: mpsc::Receiver<Message>,
) {
    info!(target: "fleetlet::audit", resource = %req.resource, argv = ?req.command, tty = req.tty, "exec session");
    let podman = containers.podman();
    let container = podman.containers().get(&cid);
    let exec = match container
        .create_exec(
            &ExecCreateOpts::builder()
                .command(&req.command)
                .attach_stdin(req.stdin)
                .attach_stdout(req.stdout)
                .attach_stderr(req.stderr)
                .tty(req.tty)
                .build(),
        )
        .await
    {
        Ok(e) => e,
        Err(e) => return out.end(Some(&format!("exec: {e}"))).await,
    };
    let mut start_opts = ExecStartOpts::builder().tty(req.tty);
    let mut early = Vec::new();
    if req.tty {
        // The client sends its terminal's size first thing: start with it, so the command
        // sees its size from the start (`stty size`, a full-screen program's first frame).
        match first_size(&mut out, &mut control, &mut early).await {
            Some((w, h)) => start_opts = start_opts.width(w).height(h),
            None if matches!(early.last(), Some(Control::Stop)) => return out.end(None).await,
            None => {}
        }
    }
    let start_opts = start_opts.build();
    let mux = match exec.start(&start_opts).await {
        Ok(Some(m)) => m,
        Ok(None) => return out.end(Some("exec: podman returned no stream")).await,
        Err(e) => return out.end(Some(&format!("exec: {e}"))).await,
    };
    let exec_ref = &exec;
    let error = pump(mux, &mut out, &mut control, early, |w, h| async move {
        let _ = exec_ref.resize(w, h).await;
    })
    .await;
    // The exit code lands shortly after the stream ends.
    let mut code = None;
    for _ in 0..20 {
        if let Ok(info) = exec.inspect().await
            && info.get("Running").and_then(serde_json::Value::as_bool) == Some(false)
        {
            code = info.get("ExitCode").and_then(serde_json::Value::as_i64);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    out.exit(code, error.as_deref()).await;
}

/// Waits (up to a second) for a terminal session's first size; what else comes meanwhile
/// is kept in `early`, in order.
async fn first_size(
    out: &mut Output,
    control: &mut mpsc::Receiver<Message>,
    early: &mut Vec<Control>,
) -> Option<(usize, usize)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    loop {
        match tokio::time::timeout_at(deadline, out.next_control(control)).await {
            Ok(Control::Resize(w, h)) => return Some((w, h)),
            Ok(Control::Continue) => {}
            Ok(Control::Stop) => {
                early.push(Control::Stop);
                return None;
            }
            Ok(other) => early.push(other),
            Err(_) => return None,
        }
    }
}

/// Moves a podman stream both ways: output to frames, stdin/resize/cancel from control
/// messages (after those in `pending`, which came before the stream). Returns the stream's
/// error, if it failed.
async fn pump<F, Fut>(
    mux: Multiplexer,
    out: &mut Output,
    control: &mut mpsc::Receiver<Message>,
    mut pending: Vec<Control>,
    resize: F,
) -> Option<String>
where
    F: Fn(usize, usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let (mut reader, writer) = mux.split();
    let mut writer = Some(Box::pin(writer));
    let mut error = None;
    'session: loop {
        for c in std::mem::take(&mut pending) {
            match c {
                Control::Stdin(b) => {
                    if let Some(w) = writer.as_mut()
                        && w.write_all(&b).await.is_err()
                    {
                        writer = None;
                    }
                    // Input for a closed stdin is consumed too: dropped, as a pipe would.
                    if !out.consumed(b.len()).await {
                        break 'session;
                    }
                }
                Control::StdinClose => {
                    if let Some(mut w) = writer.take() {
                        let _ = w.close().await;
                    }
                }
                Control::Resize(w, h) => resize(w, h).await,
                Control::Stop => break 'session,
                Control::Continue => {}
            }
        }
        if !out.ack_input().await {
            break;
        }
        tokio::select! {
            chunk = reader.next() => match chunk {
                None => break,
                Some(Err(e)) => { error = Some(e.to_string()); break }
                Some(Ok(c)) => {
                    let (kind, bytes) = match c {
                        TtyChunk::StdErr(b) => (FrameKind::Stderr, b),
                        TtyChunk::StdOut(b) | TtyChunk::StdIn(b) => (FrameKind::Stdout, b),
                    };
                    if !out.data(kind, &bytes, control, &mut pending).await {
                        break;
                    }
                }
            },
            c = out.next_control(control) => pending.push(c),
        }
    }
    error
}

async fn attach_session(
    containers: ContainerReconciler,
    cid: String,
    req: AttachRequest,
    mut out: Output,
    mut control: mpsc::Receiver<Message>,
) {
    info!(target: "fleetlet::audit", resource = %req.resource, stdin = req.stdin, "attach session");
    let podman = containers.podman();
    let container = podman.containers().get(&cid);
    let opts = ContainerAttachOpts::builder()
        .stdin(req.stdin)
        .stdout(req.stdout)
        .stderr(req.stderr)
        .build();
    let mux = match container.attach(&opts).await {
        Ok(m) => m,
        Err(e) => return out.end(Some(&format!("attach: {e}"))).await,
    };
    let container_ref = &container;
    let error = pump(mux, &mut out, &mut control, Vec::new(), |w, h| async move {
        let _ = container_ref.resize(w, h).await;
    })
    .await;
    // The stream ends when the main process does (or the requester leaves).
    let code = match container.inspect().await {
        Ok(info) => info
            .state
            .filter(|state| state.running == Some(false))
            .and_then(|state| state.exit_code)
            .map(i64::from),
        Err(_) => None,
    };
    out.exit(code, error.as_deref()).await;
}

/// Input is acknowledged at least every this many bytes (a quarter of the window).
const INPUT_ACK_BYTES: u64 = WINDOW_BYTES / 4;

/// One forwarded TCP connection: to `port` on the loopback interface inside the
/// container's network namespace, as a kubelet's runtime connects. Ends when the container
/// side closes the connection or the requester cancels.
async fn portforward_session(
    containers: ContainerReconciler,
    cid: String,
    req: PortForwardRequest,
    mut out: Output,
    mut control: mpsc::Receiver<Message>,
) {
    info!(target: "fleetlet::audit", resource = %req.resource, port = req.port, "port-forward session");
    let container = containers.podman().containers().get(&cid);
    let pid = match container.inspect().await {
        Ok(info) => info.state.and_then(|s| s.pid).filter(|p| *p > 0),
        Err(e) => {
            return out
                .end(Some(&format!("inspecting the container: {e}")))
                .await;
        }
    };
    let Some(pid) = pid else {
        return out.end(Some("the container is not running")).await;
    };
    let port = req.port;
    let stream = match connect_in_netns(pid, port).await {
        Ok(s) => s,
        Err(e) => {
            let why = format!("connecting to port {port} in the container: {e}");
            return out.end(Some(&why)).await;
        }
    };
    let (mut from_pod, mut to_pod) = stream.into_split();
    let mut buf = vec![0u8; MAX_CHUNK_BYTES];
    let mut pending: Vec<Control> = Vec::new();
    let mut error = None;
    'session: loop {
        for c in std::mem::take(&mut pending) {
            match c {
                Control::Stdin(b) => {
                    if let Err(e) = to_pod.write_all(&b).await {
                        error = Some(format!("writing to port {port}: {e}"));
                        break 'session;
                    }
                    if !out.consumed(b.len()).await {
                        break 'session;
                    }
                }
                Control::StdinClose => {
                    let _ = to_pod.shutdown().await;
                }
                Control::Stop => break 'session,
                Control::Resize(..) | Control::Continue => {}
            }
        }
        // Everything queued is passed on: say so, so the requester's window reopens.
        if !out.ack_input().await {
            break;
        }
        tokio::select! {
            n = from_pod.read(&mut buf) => match n {
                Ok(0) => break,
                Ok(n) => {
                    if !out.data(FrameKind::Stdout, &buf[..n], &mut control, &mut pending).await {
                        break;
                    }
                }
                Err(e) => {
                    error = Some(format!("reading from port {port}: {e}"));
                    break;
                }
            },
            c = out.next_control(&mut control) => pending.push(c),
        }
    }
    out.end(error.as_deref()).await;
}

/// A TCP connection to `127.0.0.1:port` in the network namespace of process `pid`. The
/// connecting thread is a new one that ends right after: a thread that changed its network
/// namespace is never reused for anything else.
async fn connect_in_netns(pid: i64, port: u16) -> std::io::Result<tokio::net::TcpStream> {
    use std::os::fd::AsFd;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let connect = || -> std::io::Result<std::net::TcpStream> {
            let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
            rustix::thread::move_into_link_name_space(
                ns.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )?;
            let addr = std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port));
            let stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            stream.set_nonblocking(true)?;
            Ok(stream)
        };
        let _ = tx.send(connect());
    });
    let stream = rx
        .await
        .map_err(|_| std::io::Error::other("the connecting thread ended early"))??;
    tokio::net::TcpStream::from_std(stream)
}

/// `kubectl logs --previous`: podman restarts a container in place and keeps one log, so
/// the previous runs are the lines logged before the last run ended. Lines are told
/// apart by their timestamps: from podman's log file (`k8s-file`, nanoseconds) where there is
/// one, else from its API (whole seconds: a run that crashed within the second it started
/// may be counted as the previous one).
async fn previous_logs(
    containers: ContainerReconciler,
    cid: String,
    req: LogsRequest,
    mut out: Output,
    mut control: mpsc::Receiver<Message>,
) {
    let container = containers.podman().containers().get(&cid);
    let info = match container.inspect().await {
        Ok(i) => i,
        Err(e) => {
            return out
                .end(Some(&format!("inspecting the container: {e}")))
                .await;
        }
    };
    // Neither recorded time is an exact boundary in the log: conmon stamps a line when it
    // reads it, so the previous run's last lines can be stamped just after its recorded
    // exit, and the current run's first lines just before its recorded start. Between the
    // two lies the restart itself (a reconcile pass or podman's restart handling): the
    // middle of that gap divides the runs.
    let state = info.state.as_ref();
    let finished = state
        .and_then(|s| s.finished_at)
        .filter(|t| t.timestamp() > 0);
    let current = state
        .and_then(|s| s.started_at)
        .filter(|t| t.timestamp() > 0);
    let ended = match (finished, current) {
        (Some(f), Some(c)) if c > f => Some(f + (c - f) / 2),
        (f, c) => f.or(c),
    };
    let started = match (containers.restart_count(&cid, info.restart_count), ended) {
        (n, Some(t)) if n > 0 => t,
        _ => {
            let why = "previous terminated container not found: it has not restarted";
            return out.end(Some(why)).await;
        }
    };
    let log_file = info
        .host_config
        .as_ref()
        .and_then(|h| h.log_config.as_ref())
        .filter(|l| l.type_.as_deref() == Some("k8s-file"))
        .and_then(|l| l.path.clone());
    info!(resource = %req.resource, %started, log_file = ?log_file, "previous logs");
    let lines = match log_file {
        Some(path) => match tokio::fs::read(&path).await {
            Ok(bytes) => Ok(k8s_file_lines(&bytes)),
            Err(e) => Err(format!("reading the log {path}: {e}")),
        },
        None => api_log_lines(&container).await,
    };
    let lines = match lines {
        Ok(l) => l,
        Err(e) => return out.end(Some(&e)).await,
    };
    let tail = req.tail_lines.and_then(|n| usize::try_from(n).ok());
    let mut kept: std::collections::VecDeque<LogLine> =
        lines.into_iter().take_while(|l| l.at <= started).collect();
    while tail.is_some_and(|n| kept.len() > n) {
        kept.pop_front();
    }
    let mut budget = req.limit_bytes.unwrap_or(u64::MAX);
    let mut pending = Vec::new();
    for l in kept {
        let mut bytes = if req.timestamps {
            let mut b =
                l.at.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
                    .into_bytes();
            b.push(b' ');
            b.extend_from_slice(&l.text);
            b
        } else {
            l.text
        };
        bytes.truncate(usize::try_from(budget).unwrap_or(usize::MAX));
        budget -= bytes.len() as u64;
        if !out.data(l.kind, &bytes, &mut control, &mut pending).await || budget == 0 {
            break;
        }
    }
    out.end(None).await;
}

/// One line of a container's log, with its newline.
struct LogLine {
    at: chrono::DateTime<chrono::FixedOffset>,
    kind: FrameKind,
    text: Vec<u8>,
}

/// The lines of a `k8s-file` log: `<RFC 3339 time> <stdout|stderr> <F|P> <text>`, where `P`
/// marks a part of a line continued by the next record.
fn k8s_file_lines(bytes: &[u8]) -> Vec<LogLine> {
    let mut lines = Vec::new();
    let mut partial: Option<LogLine> = None;
    for record in bytes.split(|b| *b == b'\n').filter(|r| !r.is_empty()) {
        let mut fields = record.splitn(4, |b| *b == b' ');
        let (Some(at), Some(stream), Some(tag)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let text = fields.next().unwrap_or_default();
        let Some(at) = std::str::from_utf8(at)
            .ok()
            .and_then(|a| chrono::DateTime::parse_from_rfc3339(a).ok())
        else {
            continue;
        };
        let kind = if stream == b"stderr" {
            FrameKind::Stderr
        } else {
            FrameKind::Stdout
        };
        let line = partial.get_or_insert_with(|| LogLine {
            at,
            kind,
            text: Vec::new(),
        });
        line.text.extend_from_slice(text);
        if tag != b"P"
            && let Some(mut done) = partial.take()
        {
            done.text.push(b'\n');
            lines.push(done);
        }
    }
    lines
}

/// The log's lines from podman's API, with timestamps (whole seconds).
async fn api_log_lines(container: &podman_api::api::Container) -> Result<Vec<LogLine>, String> {
    let opts = ContainerLogsOpts::builder()
        .stdout(true)
        .stderr(true)
        .timestamps(true)
        .build();
    let mut stream = container.logs(&opts);
    let mut lines = Vec::new();
    while let Some(chunk) = stream.next().await {
        let (kind, bytes) = match chunk.map_err(|e| e.to_string())? {
            TtyChunk::StdErr(b) => (FrameKind::Stderr, b),
            TtyChunk::StdOut(b) | TtyChunk::StdIn(b) => (FrameKind::Stdout, b),
        };
        // One line per chunk: "<RFC 3339 time> <line>".
        let Some(space) = bytes.iter().position(|b| *b == b' ') else {
            continue;
        };
        let Some(at) = std::str::from_utf8(&bytes[..space])
            .ok()
            .and_then(|a| chrono::DateTime::parse_from_rfc3339(a).ok())
        else {
            continue;
        };
        lines.push(LogLine {
            at,
            kind,
            text: bytes[space + 1..].to_vec(),
        });
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k8s_file_records_join_partial_lines_and_keep_their_stream_and_time() {
        let log = b"2026-11-30T01:26:35.812345678+00:00 stdout F run-1\n\
                    2026-11-30T01:26:35.95+00:00 stderr P half \n\
                    2026-11-30T01:26:35.96+00:00 stderr F and half\n\
                    not a record\n\
                    2026-11-30T01:26:36Z stdout F \n";
        let lines = k8s_file_lines(log);
        let texts: Vec<&[u8]> = lines.iter().map(|l| l.text.as_slice()).collect();
        assert_eq!(texts, [&b"run-1\n"[..], b"half and half\n", b"\n"]);
        assert_eq!(lines[1].kind, FrameKind::Stderr);
        assert_eq!(lines[0].at.timestamp_subsec_nanos(), 812_345_678);
        // A joined line has the time of its first part.
        assert_eq!(lines[1].at.timestamp_subsec_millis(), 950);
    }
}
