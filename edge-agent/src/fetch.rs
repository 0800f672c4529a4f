//! Downloads of fetched File content (`content.fetch`): HTTPS only, resumed with a `Range`
//! request after an interruption, checked against the manifest's size and SHA-256 before
//! the File reconciler installs it. A download runs in the background; the resource shows
//! its progress while it runs and the engine looks again when [`Fetcher::next_wake`] says.
//!
//! The partial download lives beside its target (`.<name>.<digest>.fleetlet-part`), on the
//! same filesystem, so installing it is a rename and a restart resumes it.

use std::{
    collections::HashMap,
    io::Read,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use fleetlet_protocol::FetchSource;
use hyper::{Body, Request, StatusCode, Uri, body::HttpBody, client::conn::http1, header};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::{io::AsyncWriteExt, net::TcpStream, time::Instant};
use tracing::{debug, info, warn};

/// How downloads behave on this device (the agent's `[file]` section).
#[derive(Debug, Clone)]
pub struct FetchSettings {
    /// Largest content a device fetches.
    pub max_bytes: u64,
    /// Free space a download must leave.
    pub reserve_bytes: u64,
    /// No bytes for this long cuts the connection (resumed later).
    pub stall: Duration,
    /// Extra trusted CAs (PEM), besides the system's.
    pub ca_file: Option<PathBuf>,
}

impl Default for FetchSettings {
    fn default() -> Self {
        Self {
            max_bytes: 4 << 30,
            reserve_bytes: 64 << 20,
            stall: Duration::from_secs(60),
            ca_file: None,
        }
    }
}

/// Why a download did not produce the content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub message: String,
    /// The server's content is not what the manifest names: fetching again cannot help,
    /// only a new spec (or new content on the server with a new spec) can.
    pub permanent: bool,
}

impl Failure {
    fn transient(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            permanent: false,
        }
    }
    fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            permanent: true,
        }
    }
}

/// Where a download stands, for the File reconciler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Poll {
    /// Nothing runs for this partial file.
    Idle,
    /// Running; the text says how far.
    Running(String),
    /// Finished and verified: the partial file holds exactly the content.
    Done,
    Failed(Failure),
}

#[derive(Debug, Default)]
struct JobState {
    /// Bytes in the partial file so far.
    done: u64,
    /// Where this run started (bytes kept from an earlier, interrupted run).
    resumed_from: u64,
    outcome: Option<Result<(), Failure>>,
}

#[derive(Debug)]
struct Job {
    target: PathBuf,
    total: u64,
    started: Instant,
    state: Arc<Mutex<JobState>>,
    task: tokio::task::AbortHandle,
}

/// The downloads of one agent, keyed by partial file.
#[derive(Debug)]
pub struct Fetcher {
    settings: FetchSettings,
    tls: OnceLock<Result<Arc<rustls::ClientConfig>, String>>,
    jobs: Mutex<HashMap<PathBuf, Job>>,
    /// Content refused for good (not what the manifest names), by partial file: reported
    /// again without downloading it again, until the spec changes or the agent restarts.
    refused: Mutex<HashMap<PathBuf, (PathBuf, Failure)>>,
}

/// How often a running download's progress is looked at.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(2);
/// Redirects followed before giving up.
const MAX_REDIRECTS: usize = 5;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// The partial file of `target`'s content `sha256`.
pub fn partial_path(target: &Path, sha256: &str) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let short = sha256.get(..16).unwrap_or(sha256);
    target.with_file_name(format!(".{name}.{short}.fleetlet-part"))
}

/// Whether `file` (a name in `target`'s directory) is a partial download of `target`.
pub fn is_partial_of(target: &Path, file: &str) -> bool {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    file.strip_prefix('.')
        .and_then(|f| f.strip_prefix(name.as_str()))
        .and_then(|f| f.strip_prefix('.'))
        .and_then(|f| f.strip_suffix(".fleetlet-part"))
        .is_some_and(|digest| digest.len() == 16 && digest.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

impl Fetcher {
    pub fn new(settings: FetchSettings) -> Self {
        Self {
            settings,
            tls: OnceLock::new(),
            jobs: Mutex::new(HashMap::new()),
            refused: Mutex::new(HashMap::new()),
        }
    }

    pub fn settings(&self) -> &FetchSettings {
        &self.settings
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Job>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where the download into `part` stands; a finished one is collected (reported once).
    pub fn poll(&self, part: &Path) -> Poll {
        if let Some((_, f)) = self.refused().get(part) {
            return Poll::Failed(f.clone());
        }
        let mut jobs = self.jobs();
        let Some(job) = jobs.get(part) else {
            return Poll::Idle;
        };
        let state = job.state.lock().unwrap_or_else(|p| p.into_inner());
        let report = match &state.outcome {
            None => {
                let secs = job.started.elapsed().as_secs_f64().max(0.001);
                let rate = (state.done - state.resumed_from) as f64 / secs;
                let pct = state.done.saturating_mul(100) / job.total.max(1);
                let resumed = if state.resumed_from > 0 {
                    format!(", resumed at {}", mib(state.resumed_from))
                } else {
                    String::new()
                };
                return Poll::Running(format!(
                    "downloading: {} of {} ({pct}%), {}/s{resumed}",
                    mib(state.done),
                    mib(job.total),
                    mib(rate as u64)
                ));
            }
            Some(Ok(())) => Poll::Done,
            Some(Err(f)) => Poll::Failed(f.clone()),
        };
        drop(state);
        if let (Some(job), Poll::Failed(f)) = (jobs.remove(part), &report)
            && f.permanent
        {
            self.refused()
                .insert(part.to_path_buf(), (job.target, f.clone()));
        }
        report
    }

    /// Starts downloading `src` into `part` for `target`, stopping any other download for
    /// the same target (an older spec's). Err: no TLS configuration to download with.
    pub fn start(&self, target: &Path, part: PathBuf, src: FetchSource) -> Result<(), String> {
        self.cancel(target);
        let tls = self.tls_config()?;
        let state = Arc::new(Mutex::new(JobState::default()));
        let run = Download {
            tls,
            stall: self.settings.stall,
            part: part.clone(),
            src: src.clone(),
            state: state.clone(),
        };
        let task = tokio::spawn(async move {
            let outcome = run.run().await;
            match &outcome {
                Ok(()) => info!(url = %run.src.url, bytes = run.src.size, "download verified"),
                Err(f) => {
                    warn!(url = %run.src.url, error = %f.message, permanent = f.permanent, "download failed")
                }
            }
            run.state.lock().unwrap_or_else(|p| p.into_inner()).outcome = Some(outcome);
        });
        self.jobs().insert(
            part,
            Job {
                target: target.to_path_buf(),
                total: src.size,
                started: Instant::now(),
                state,
                task: task.abort_handle(),
            },
        );
        Ok(())
    }

    fn refused(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, (PathBuf, Failure)>> {
        self.refused.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops every download for `target` and forgets its refusals; returns how many
    /// downloads were stopped.
    pub fn cancel(&self, target: &Path) -> usize {
        self.refused().retain(|_, (t, _)| t != target);
        let mut jobs = self.jobs();
        let before = jobs.len();
        jobs.retain(|part, job| {
            let keep = job.target != target;
            if !keep {
                debug!(part = %part.display(), "download stopped");
                job.task.abort();
            }
            keep
        });
        before - jobs.len()
    }

    /// When the engine should look at the resources again: while downloads run, often
    /// enough to show their progress and to install them soon after they finish.
    pub fn next_wake(&self) -> Option<Instant> {
        (!self.jobs().is_empty()).then(|| Instant::now() + PROGRESS_INTERVAL)
    }

    /// The TLS client configuration, built once: the system's CAs and the configured ones.
    fn tls_config(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        self.tls
            .get_or_init(|| build_tls(self.settings.ca_file.as_deref()).map(Arc::new))
            .clone()
    }
}

fn build_tls(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        debug!(error = %e, "a system CA certificate could not be loaded");
    }
    let (added, _) = roots.add_parsable_certificates(native.certs);
    let mut extra = 0;
    if let Some(path) = ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("file.fetch_ca_file {}: {e}", path.display()))?;
        for c in certs {
            roots
                .add(c)
                .map_err(|e| format!("file.fetch_ca_file {}: {e}", path.display()))?;
            extra += 1;
        }
    }
    if roots.is_empty() {
        return Err(
            "no trusted CA certificates: the system has none and file.fetch_ca_file is not set"
                .into(),
        );
    }
    debug!(
        system = added,
        configured = extra,
        "trusted CAs for downloads"
    );
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// One download, run as a task.
struct Download {
    tls: Arc<rustls::ClientConfig>,
    stall: Duration,
    part: PathBuf,
    src: FetchSource,
    state: Arc<Mutex<JobState>>,
}

impl Download {
    fn progress(&self, f: impl FnOnce(&mut JobState)) {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()));
    }

    async fn run(&self) -> Result<(), Failure> {
        let size = self.src.size;
        let mut offset = match tokio::fs::metadata(&self.part).await {
            Ok(m) if m.len() <= size => m.len(),
            // Longer than the content: not ours to trust, start over.
            Ok(_) => 0,
            Err(_) => 0,
        };
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .mode(0o600)
            .open(&self.part)
            .await
            .map_err(|e| Failure::transient(format!("opening {}: {e}", self.part.display())))?;
        file.set_len(offset)
            .await
            .map_err(|e| Failure::transient(format!("truncating {}: {e}", self.part.display())))?;
        self.progress(|s| {
            s.done = offset;
            s.resumed_from = offset;
        });
        if offset < size {
            if offset > 0 {
                info!(url = %self.src.url, offset, "resuming download");
            }
            offset = self.fetch(&mut file, offset).await?;
        }
        file.sync_all()
            .await
            .map_err(|e| Failure::transient(format!("syncing {}: {e}", self.part.display())))?;
        drop(file);
        if offset != size {
            return Err(Failure::transient(format!("got {offset} of {size} bytes")));
        }
        let part = self.part.clone();
        let digest = tokio::task::spawn_blocking(move || sha256_file(&part, size + 1))
            .await
            .map_err(|e| Failure::transient(format!("hashing task failed: {e}")))?
            .map_err(|e| Failure::transient(format!("hashing {}: {e}", self.part.display())))?;
        if digest != self.src.sha256 {
            let _ = tokio::fs::remove_file(&self.part).await;
            return Err(Failure::permanent(format!(
                "content from {} has sha256 {digest}, the manifest says {}; nothing was written",
                self.src.url, self.src.sha256
            )));
        }
        Ok(())
    }

    /// Downloads from `offset` to the end, following redirects; returns the bytes now in the
    /// partial file.
    async fn fetch(&self, file: &mut tokio::fs::File, mut offset: u64) -> Result<u64, Failure> {
        let size = self.src.size;
        let mut url: Uri = self
            .src
            .url
            .parse()
            .map_err(|e| Failure::permanent(format!("url {}: {e}", self.src.url)))?;
        for _ in 0..=MAX_REDIRECTS {
            let mut body = match self.request(&url, offset).await? {
                Response::Redirect(next) => {
                    debug!(from = %url, to = %next, "redirect");
                    url = next;
                    continue;
                }
                Response::Body { body, restart } => {
                    if restart && offset > 0 {
                        info!(url = %url, "server ignored the range; starting over");
                        offset = 0;
                        file.set_len(0).await.map_err(|e| {
                            Failure::transient(format!("truncating {}: {e}", self.part.display()))
                        })?;
                        self.progress(|s| {
                            s.done = 0;
                            s.resumed_from = 0;
                        });
                    }
                    body
                }
            };
            use tokio::io::AsyncSeekExt;
            file.seek(std::io::SeekFrom::Start(offset))
                .await
                .map_err(|e| Failure::transient(format!("seeking: {e}")))?;
            loop {
                let chunk = match tokio::time::timeout(self.stall, body.data()).await {
                    Err(_) => {
                        return Err(Failure::transient(format!(
                            "no data for {} s after {offset} of {size} bytes; will resume",
                            self.stall.as_secs()
                        )));
                    }
                    Ok(None) => break,
                    Ok(Some(Err(e))) => {
                        let _ = file.flush().await;
                        return Err(Failure::transient(format!(
                            "connection lost after {offset} of {size} bytes ({e}); will resume"
                        )));
                    }
                    Ok(Some(Ok(c))) => c,
                };
                let len = chunk.len() as u64;
                if offset + len > size {
                    let _ = tokio::fs::remove_file(&self.part).await;
                    return Err(Failure::permanent(format!(
                        "{url} sent more than the {size} bytes the manifest says"
                    )));
                }
                file.write_all(&chunk).await.map_err(|e| {
                    Failure::transient(format!("writing {}: {e}", self.part.display()))
                })?;
                offset += len;
                self.progress(|s| s.done = offset);
            }
            file.flush()
                .await
                .map_err(|e| Failure::transient(format!("writing {}: {e}", self.part.display())))?;
            if offset < size {
                return Err(Failure::transient(format!(
                    "connection closed after {offset} of {size} bytes; will resume"
                )));
            }
            return Ok(offset);
        }
        Err(Failure::transient(format!(
            "more than {MAX_REDIRECTS} redirects from {}",
            self.src.url
        )))
    }

    /// An HTTP/1.1 connection over TLS to `url`'s server.
    async fn connect(
        &self,
        url: &Uri,
    ) -> Result<(http1::SendRequest<Body>, hyper::http::uri::Authority), Failure> {
        if url.scheme_str() != Some("https") {
            return Err(Failure::permanent(format!(
                "{url}: only https:// is fetched"
            )));
        }
        let authority = url
            .authority()
            .ok_or_else(|| Failure::permanent(format!("{url}: no host")))?
            .clone();
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = authority.port_u16().unwrap_or(443);
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host, port)))
            .await
            .map_err(|_| Failure::transient(format!("connecting to {authority}: timed out")))?
            .map_err(|e| Failure::transient(format!("connecting to {authority}: {e}")))?;
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| Failure::permanent(format!("{url}: host {host:?}: {e}")))?;
        let tls = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio_rustls::TlsConnector::from(self.tls.clone()).connect(name, tcp),
        )
        .await
        .map_err(|_| Failure::transient(format!("TLS with {authority}: timed out")))?
        .map_err(|e| Failure::transient(format!("TLS with {authority}: {e}")))?;
        let (sender, conn) = http1::handshake::<_, Body>(tls)
            .await
            .map_err(|e| Failure::transient(format!("HTTP with {authority}: {e}")))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "download connection ended");
            }
        });
        Ok((sender, authority))
    }

    /// One GET from `offset`.
    async fn request(&self, url: &Uri, offset: u64) -> Result<Response, Failure> {
        let size = self.src.size;
        let (mut sender, authority) = self.connect(url).await?;
        let path = url.path_and_query().map_or("/", |p| p.as_str());
        let mut req = Request::get(path)
            .header(header::HOST, authority.as_str())
            .header(
                header::USER_AGENT,
                concat!("fleetlet-agent/", env!("CARGO_PKG_VERSION")),
            )
            .header(header::ACCEPT_ENCODING, "identity");
        if offset > 0 {
            req = req.header(header::RANGE, format!("bytes={offset}-"));
        }
        let req = req
            .body(Body::empty())
            .map_err(|e| Failure::permanent(format!("{url}: {e}")))?;
        let resp = tokio::time::timeout(self.stall, sender.send_request(req))
            .await
            .map_err(|_| Failure::transient(format!("{authority}: no response")))?
            .map_err(|e| Failure::transient(format!("{authority}: {e}")))?;
        let status = resp.status();
        let headers = resp.headers();
        let text = |h: header::HeaderName| {
            headers
                .get(h)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        if status.is_redirection() {
            let location = text(header::LOCATION)
                .ok_or_else(|| Failure::transient(format!("{url}: {status} without a Location")))?;
            return Ok(Response::Redirect(redirect(url, &location)?));
        }
        match status {
            StatusCode::OK => {
                if let Some(len) = text(header::CONTENT_LENGTH).and_then(|l| l.parse::<u64>().ok())
                    && len != size
                {
                    return Err(Failure::permanent(format!(
                        "{url} is {len} bytes, the manifest says {size}; nothing was written"
                    )));
                }
                Ok(Response::Body {
                    body: resp.into_body(),
                    restart: true,
                })
            }
            StatusCode::PARTIAL_CONTENT if offset > 0 => {
                let range = text(header::CONTENT_RANGE).unwrap_or_default();
                match parse_content_range(&range) {
                    Some((start, total)) if start == offset && total.is_none_or(|t| t == size) => {
                        Ok(Response::Body {
                            body: resp.into_body(),
                            restart: false,
                        })
                    }
                    Some((_, Some(total))) if total != size => Err(Failure::permanent(format!(
                        "{url} is {total} bytes, the manifest says {size}; nothing was written"
                    ))),
                    _ => Err(Failure::transient(format!(
                        "{url}: asked for bytes from {offset}, got range {range:?}"
                    ))),
                }
            }
            StatusCode::RANGE_NOT_SATISFIABLE => {
                // The partial file does not fit this content: start again next time.
                let _ = tokio::fs::remove_file(&self.part).await;
                Err(Failure::transient(format!(
                    "{url}: range from byte {offset} refused; starting over"
                )))
            }
            other => Err(Failure::transient(format!("{url}: HTTP {other}"))),
        }
    }
}

enum Response {
    Redirect(Uri),
    /// `restart`: the body starts at byte 0 whatever was asked for.
    Body {
        body: Body,
        restart: bool,
    },
}

/// The target of a redirect from `from`: absolute, or a path on the same server.
fn redirect(from: &Uri, location: &str) -> Result<Uri, Failure> {
    let next = if location.starts_with('/') {
        let authority = from.authority().map_or("", |a| a.as_str());
        format!("https://{authority}{location}")
    } else {
        location.to_owned()
    };
    let uri: Uri = next
        .parse()
        .map_err(|e| Failure::transient(format!("redirect to {location:?}: {e}")))?;
    if uri.scheme_str() != Some("https") {
        return Err(Failure::permanent(format!(
            "{from} redirects to {location}, which is not https://"
        )));
    }
    Ok(uri)
}

/// `bytes 100-199/1000` → (100, Some(1000)); `bytes 100-199/*` → (100, None).
fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _) = range.split_once('-')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((start.trim().parse().ok()?, total))
}

/// The SHA-256 of a file, read in blocks, reading at most `limit` bytes.
pub fn sha256_file(path: &Path, limit: u64) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    let mut f = std::fs::File::open(path)?.take(limit);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(crate::file::hex(&hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_names_are_recognised() {
        let t = Path::new("/opt/fleetlet/model.bin");
        let p = partial_path(t, &"ab".repeat(32));
        assert_eq!(
            p,
            Path::new("/opt/fleetlet/.model.bin.abababababababab.fleetlet-part")
        );
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        assert!(is_partial_of(t, name));
        assert!(!is_partial_of(Path::new("/opt/fleetlet/model"), name));
        assert!(!is_partial_of(t, ".model.bin.zzzz.fleetlet-part"));
        assert!(!is_partial_of(t, "model.bin"));
    }

    #[test]
    fn content_ranges_and_redirects() {
        assert_eq!(
            parse_content_range("bytes 100-199/1000"),
            Some((100, Some(1000)))
        );
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(parse_content_range("items 1-2/3"), None);
        let from: Uri = "https://a.example:8443/x/y?z".parse().unwrap_or_default();
        assert_eq!(
            redirect(&from, "/blobs/1").map(|u| u.to_string()),
            Ok("https://a.example:8443/blobs/1".into())
        );
        assert!(redirect(&from, "http://b.example/x").is_err_and(|f| f.permanent));
    }
}
