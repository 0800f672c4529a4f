//! The remote command protocol over SPDY/3.1 (`v4.channel.k8s.io`), as the apiserver of
//! Kubernetes 1.34 and 1.35 speaks it to kubelets (and 1.36+ to nodes that do not declare
//! WebSockets): after an HTTP upgrade the client opens one stream per channel, named by its
//! `streamtype` header (`error`, `stdin`, `stdout`, `stderr`, `resize`), each answered with
//! a SYN_REPLY. The session's status goes on the error stream, which is then finished.

use std::{collections::HashMap, time::Duration};

use axum::{
    body::Body,
    extract::Request,
    http::{StatusCode, header},
    response::Response,
};
use bytes::Bytes;
use fleetlet_spdy::{Codec, Frame, Headers, StreamId, rst};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::mpsc,
};
use tracing::debug;

use super::{
    streams::{Input, Job, Output, Wanted, relay, take_resizes},
    text,
};

/// The remote command version served over SPDY; v4 carries exit codes.
const PROTOCOL: &str = "v4.channel.k8s.io";
const PROTOCOL_HEADER: &str = "x-stream-protocol-version";
/// How long a client has to open the streams it asked for (a kubelet's default).
const STREAM_CREATION: Duration = Duration::from_secs(30);
/// Output is sent in frames of at most this many bytes.
const CHUNK: usize = 32 * 1024;

/// The protocols a client offers (the header repeated, or comma-separated).
fn offered(request: &Request) -> Vec<String> {
    request
        .headers()
        .get_all(PROTOCOL_HEADER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect()
}

/// The connection an upgrade hands over.
pub(super) type Upgraded = hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>;

/// Answers an upgrade to SPDY/3.1 speaking `protocol` (101) and runs `serve` on the
/// upgraded connection. A client that does not offer `protocol` gets 403, as from a kubelet.
pub(super) fn upgrade<F, Fut>(mut request: Request, protocol: &'static str, serve: F) -> Response
where
    F: FnOnce(Conn<Upgraded>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let offered = offered(&request);
    if !offered.iter().any(|p| p == protocol) {
        return text(
            StatusCode::FORBIDDEN,
            format!(
                "unable to upgrade: unable to negotiate protocol: client supports {offered:?}, server accepts [\"{protocol}\"]"
            ),
        );
    }
    let upgraded = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        match upgraded.await {
            Ok(io) => serve(Conn::new(hyper_util::rt::TokioIo::new(io))).await,
            Err(e) => debug!(error = %e, "SPDY upgrade failed"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "SPDY/3.1")
        .header(PROTOCOL_HEADER, protocol)
        .body(Body::empty())
        .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "upgrade response"))
}

/// Exec or attach over SPDY (`v4.channel.k8s.io`).
pub(super) fn upgrade_streams(request: Request, job: Job) -> Response {
    upgrade(request, PROTOCOL, move |conn| serve_streams(conn, job))
}

/// Why a SPDY connection ended early.
#[derive(Debug, thiserror::Error)]
pub(super) enum ConnError {
    #[error(transparent)]
    Protocol(#[from] fleetlet_spdy::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// One upgraded connection: frames in and out. Pings are answered here.
pub(super) struct Conn<IO> {
    io: IO,
    codec: Codec,
    read: Vec<u8>,
    write: Vec<u8>,
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Conn<IO> {
    pub(super) fn new(io: IO) -> Self {
        Self {
            io,
            codec: Codec::new(),
            read: Vec::with_capacity(16 * 1024),
            write: Vec::new(),
        }
    }

    /// The next frame other than a PING; `None` when the client closed the connection.
    /// Cancel-safe: bytes read stay buffered for the next call.
    pub(super) async fn next(&mut self) -> Result<Option<Frame>, ConnError> {
        loop {
            match self.codec.decode(&mut self.read)? {
                Some(Frame::Ping { id }) => self.send(&Frame::Ping { id }).await?,
                Some(f) => return Ok(Some(f)),
                None => {
                    self.read.reserve(16 * 1024);
                    if self.io.read_buf(&mut self.read).await? == 0 {
                        return Ok(None);
                    }
                }
            }
        }
    }

    pub(super) async fn send(&mut self, frame: &Frame) -> Result<(), ConnError> {
        self.write.clear();
        self.codec.encode(frame, &mut self.write)?;
        self.io.write_all(&self.write).await?;
        Ok(())
    }

    /// `data` on `stream`, in frames of at most [`CHUNK`] bytes.
    pub(super) async fn data(
        &mut self,
        stream: StreamId,
        data: &[u8],
        fin: bool,
    ) -> Result<(), ConnError> {
        let mut chunks = data.chunks(CHUNK).peekable();
        if chunks.peek().is_none() {
            return self
                .send(&Frame::Data {
                    stream_id: stream,
                    fin,
                    data: Vec::new(),
                })
                .await;
        }
        while let Some(chunk) = chunks.next() {
            let last = chunks.peek().is_none();
            self.send(&Frame::Data {
                stream_id: stream,
                fin: fin && last,
                data: chunk.to_vec(),
            })
            .await?;
        }
        Ok(())
    }

    /// Accepts a stream the client opened.
    pub(super) async fn reply(&mut self, stream: StreamId) -> Result<(), ConnError> {
        self.send(&Frame::SynReply {
            stream_id: stream,
            fin: false,
            headers: Headers::new(),
        })
        .await
    }

    /// Waits (a while) for the client to close the connection after the last frame, then
    /// closes it: closing first could cut off what the client has not read yet.
    pub(super) async fn finish(mut self) {
        let _ = self.io.flush().await;
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            while let Ok(Some(_)) = self.next().await {}
        })
        .await;
        let _ = self.io.shutdown().await;
    }
}

/// A remote command channel, from a stream's `streamtype` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Channel {
    Error,
    Stdin,
    Stdout,
    Stderr,
    Resize,
}

impl Channel {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "error" => Self::Error,
            "stdin" => Self::Stdin,
            "stdout" => Self::Stdout,
            "stderr" => Self::Stderr,
            "resize" => Self::Resize,
            _ => return None,
        })
    }

    /// The channels a client with these flags opens (client-go's v4 rules).
    fn expected(w: Wanted) -> Vec<Self> {
        let mut v = vec![Self::Error];
        if w.stdin {
            v.push(Self::Stdin);
        }
        if w.stdout {
            v.push(Self::Stdout);
        }
        if w.stderr && !w.tty {
            v.push(Self::Stderr);
        }
        if w.tty {
            v.push(Self::Resize);
        }
        v
    }
}

/// The streams of a session, both ways.
#[derive(Default)]
struct Streams {
    by_id: HashMap<StreamId, Channel>,
    by_channel: HashMap<Channel, StreamId>,
}

impl Streams {
    fn add(&mut self, id: StreamId, ch: Channel) {
        self.by_id.insert(id, ch);
        self.by_channel.insert(ch, id);
    }
}

/// Accepts the streams the client opens until every expected one is there.
async fn open_streams<IO: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<IO>,
    wanted: Wanted,
) -> Result<Streams, String> {
    let expected = Channel::expected(wanted);
    let mut streams = Streams::default();
    let accept = async {
        while !expected.iter().all(|c| streams.by_channel.contains_key(c)) {
            match conn.next().await.map_err(|e| e.to_string())? {
                Some(Frame::SynStream {
                    stream_id, headers, ..
                }) => match headers.get("streamtype").and_then(Channel::parse) {
                    Some(ch) if !streams.by_channel.contains_key(&ch) => {
                        conn.reply(stream_id).await.map_err(|e| e.to_string())?;
                        streams.add(stream_id, ch);
                    }
                    _ => {
                        let refused = Frame::RstStream {
                            stream_id,
                            status: rst::REFUSED_STREAM,
                        };
                        conn.send(&refused).await.map_err(|e| e.to_string())?;
                    }
                },
                Some(_) => {}
                None => return Err("the client closed the connection".to_string()),
            }
        }
        Ok(())
    };
    match tokio::time::timeout(STREAM_CREATION, accept).await {
        Ok(Ok(())) => Ok(streams),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!(
            "timed out waiting for the client to open its streams ({} of {:?})",
            streams.by_id.len(),
            expected
        )),
    }
}

/// Runs an exec or attach session over an upgraded SPDY connection.
async fn serve_streams<IO: AsyncRead + AsyncWrite + Unpin>(mut conn: Conn<IO>, job: Job) {
    let streams = match open_streams(&mut conn, job.wanted).await {
        Ok(s) => s,
        Err(e) => return debug!(error = %e, "SPDY session not started"),
    };
    let (input, inputs) = mpsc::unbounded_channel();
    let (outputs, mut output) = mpsc::channel(16);
    tokio::spawn(relay(job, inputs, outputs));
    let stream_of = |ch: Channel| streams.by_channel.get(&ch).copied();
    let mut resizes = Vec::new();
    loop {
        tokio::select! {
            out = output.recv() => {
                let sent = match out {
                    // With a terminal, stderr is merged into stdout (there is no stderr stream).
                    Some(Output::Stdout(b)) => send_on(&mut conn, stream_of(Channel::Stdout), &b).await,
                    Some(Output::Stderr(b)) => {
                        let to = stream_of(Channel::Stderr).or(stream_of(Channel::Stdout));
                        send_on(&mut conn, to, &b).await
                    }
                    Some(Output::Status(status)) => {
                        let _ = end(&mut conn, &streams, &status).await;
                        return conn.finish().await;
                    }
                    None => return,
                };
                if sent.is_err() {
                    return;
                }
            }
            frame = conn.next() => {
                let inputs = match frame {
                    Ok(Some(Frame::Data { stream_id, fin, data })) => {
                        match streams.by_id.get(&stream_id) {
                            Some(Channel::Stdin) => {
                                let mut v = Vec::new();
                                if !data.is_empty() {
                                    v.push(Input::Stdin(Bytes::from(data)));
                                }
                                if fin {
                                    v.push(Input::StdinClose);
                                }
                                v
                            }
                            Some(Channel::Resize) => {
                                resizes.extend_from_slice(&data);
                                take_resizes(&mut resizes)
                            }
                            _ => Vec::new(),
                        }
                    }
                    Ok(Some(Frame::RstStream { stream_id, .. }))
                        if streams.by_id.get(&stream_id) == Some(&Channel::Stdin) =>
                    {
                        vec![Input::StdinClose]
                    }
                    Ok(Some(Frame::SynStream { stream_id, .. })) => {
                        let refused = Frame::RstStream { stream_id, status: rst::REFUSED_STREAM };
                        if conn.send(&refused).await.is_err() {
                            return;
                        }
                        Vec::new()
                    }
                    // Dropping `input` tells the relay the client is gone.
                    Ok(Some(Frame::GoAway { .. })) | Ok(None) => return,
                    Err(e) => {
                        debug!(error = %e, "SPDY session ended");
                        return;
                    }
                    Ok(Some(_)) => Vec::new(),
                };
                if inputs.into_iter().try_for_each(|i| input.send(i)).is_err() {
                    return;
                }
            }
        }
    }
}

async fn send_on<IO: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<IO>,
    stream: Option<StreamId>,
    data: &[u8],
) -> Result<(), ConnError> {
    match stream {
        Some(id) => conn.data(id, data, false).await,
        // The client did not ask for this output.
        None => Ok(()),
    }
}

/// The status on the error stream, then every stream finished from this side.
async fn end<IO: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<IO>,
    streams: &Streams,
    status: &[u8],
) -> Result<(), ConnError> {
    if let Some(&id) = streams.by_channel.get(&Channel::Error) {
        conn.data(id, status, true).await?;
    }
    for (&id, &ch) in &streams.by_id {
        if ch != Channel::Error {
            conn.data(id, &[], true).await?;
        }
    }
    conn.io.flush().await?;
    Ok(())
}
