//! An HTTPS file server for download tests: serves files from memory with `Range`
//! support, on a loopback port, with its own CA. It can slow a file down, cut a transfer
//! after a given number of bytes (once), and records every request it answered.

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use rcgen::ExtendedKeyUsagePurpose;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    task::JoinHandle,
};
use tokio_rustls::{
    TlsAcceptor, rustls,
    rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
};

use crate::{Error, pki::Pki};

/// One request the server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    pub path: String,
    /// The first byte asked for with `Range: bytes=N-`.
    pub range_start: Option<u64>,
    pub status: u16,
    /// Body bytes written to the connection.
    pub bytes: u64,
}

#[derive(Default)]
struct State {
    files: HashMap<String, Arc<Vec<u8>>>,
    /// Cut the next transfer of a path after this many body bytes.
    cut: HashMap<String, u64>,
    /// Bytes per second, per path.
    rate: HashMap<String, u64>,
    log: Vec<Served>,
}

pub struct FileServer {
    base: String,
    ca_pem: String,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FileServer {
    /// Listens on a free loopback port with a certificate for 127.0.0.1 from a new CA.
    pub async fn start() -> Result<Self, Error> {
        let (issuer, ca) = Pki::ca("fleetlet-file-server-ca")?;
        let leaf = Pki::leaf(
            &issuer,
            "fleetlet-file-server",
            None,
            &["localhost"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        let certs = CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Setup(format!("server certificate: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes())
            .map_err(|e| Error::Setup(format!("server key: {e}")))?;
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Setup(format!("TLS: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| Error::Setup(format!("TLS: {e}")))?;
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let state = shared.clone();
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        serve(tls, state).await;
                    }
                });
            }
        });
        Ok(Self {
            base: format!("https://127.0.0.1:{}", addr.port()),
            ca_pem: ca.cert_pem,
            state,
            task,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The URL of `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Writes the CA certificate that clients must trust.
    pub fn write_ca(&self, to: &Path) -> Result<(), Error> {
        Ok(std::fs::write(to, &self.ca_pem)?)
    }

    pub fn put(&self, path: &str, bytes: Vec<u8>) {
        self.state().files.insert(path.into(), Arc::new(bytes));
    }

    /// The next transfer of `path` stops after `bytes` body bytes, connection closed.
    pub fn cut_once(&self, path: &str, bytes: u64) {
        self.state().cut.insert(path.into(), bytes);
    }

    /// Sends `path` at about `bytes_per_second`.
    pub fn limit_rate(&self, path: &str, bytes_per_second: u64) {
        self.state().rate.insert(path.into(), bytes_per_second);
    }

    /// Every request answered so far, oldest first.
    pub fn served(&self) -> Vec<Served> {
        self.state().log.clone()
    }
}

const CHUNK: usize = 64 * 1024;

async fn serve<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut io: S,
    state: Arc<Mutex<State>>,
) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match io.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 16 * 1024 {
            return;
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let path = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or("/")
        .to_owned();
    let range_start = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("range"))
        .and_then(|(_, v)| {
            v.trim()
                .strip_prefix("bytes=")?
                .strip_suffix('-')?
                .parse()
                .ok()
        });
    let (file, cut, rate) = {
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        (
            s.files.get(&path).cloned(),
            s.cut.remove(&path),
            s.rate.get(&path).copied(),
        )
    };
    let record = |status: u16, bytes: u64| {
        state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .log
            .push(Served {
                path: path.clone(),
                range_start,
                status,
                bytes,
            });
    };
    let Some(file) = file else {
        let _ = io
            .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            .await;
        record(404, 0);
        return;
    };
    let total = file.len() as u64;
    let start = range_start.unwrap_or(0);
    if start >= total && range_start.is_some() {
        let _ = io
            .write_all(
                format!(
                    "HTTP/1.1 416 Range Not Satisfiable\r\ncontent-range: bytes */{total}\r\n\
                     content-length: 0\r\nconnection: close\r\n\r\n"
                )
                .as_bytes(),
            )
            .await;
        record(416, 0);
        return;
    }
    let (status, head) = match range_start {
        Some(s) => (
            206,
            format!(
                "HTTP/1.1 206 Partial Content\r\ncontent-range: bytes {s}-{}/{total}\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n",
                total - 1,
                total - s
            ),
        ),
        None => (
            200,
            format!("HTTP/1.1 200 OK\r\ncontent-length: {total}\r\nconnection: close\r\n\r\n"),
        ),
    };
    if io.write_all(head.as_bytes()).await.is_err() {
        record(status, 0);
        return;
    }
    let body = &file[start as usize..];
    let limit = cut.map_or(body.len(), |c| (c as usize).min(body.len()));
    let mut sent = 0usize;
    let started = tokio::time::Instant::now();
    while sent < limit {
        let end = (sent + CHUNK).min(limit);
        if io.write_all(&body[sent..end]).await.is_err() {
            break;
        }
        sent = end;
        if let Some(rate) = rate {
            let due = started + Duration::from_secs_f64(sent as f64 / rate.max(1) as f64);
            tokio::time::sleep_until(due).await;
        }
    }
    let _ = io.flush().await;
    record(status, sent as u64);
    // A cut transfer ends without a TLS close_notify: the client sees the connection drop.
    if cut.is_none() {
        let _ = io.shutdown().await;
    }
}
