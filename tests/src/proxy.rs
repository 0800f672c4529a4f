//! A TCP proxy on a loopback port that a test can cut and heal: one device's network going
//! away while everything else (the device's agent included) keeps running.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use tokio::{net::TcpListener, task::JoinHandle};

use crate::Error;

pub struct TcpProxy {
    addr: SocketAddr,
    upstream: String,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    task: JoinHandle<()>,
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.drop_connections();
    }
}

impl TcpProxy {
    /// Forwards a free loopback port to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Result<Self, Error> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let cut = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let target = upstream.to_owned();
        let upstream = target.clone();
        let (c, list) = (cut.clone(), conns.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                if c.load(Ordering::SeqCst) {
                    continue; // dropped: the connection is refused by closing it
                }
                let upstream = upstream.clone();
                let conn = tokio::spawn(async move {
                    if let Ok(mut up) = tokio::net::TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
                list.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(conn.abort_handle());
            }
        });
        Ok(Self {
            addr,
            upstream: target,
            cut,
            conns,
            task,
        })
    }

    /// The proxy's own address (`127.0.0.1:port`).
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Where it forwards to.
    pub fn upstream(&self) -> &str {
        &self.upstream
    }

    /// `nats://` URL of the proxy.
    pub fn nats_url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    fn drop_connections(&self) {
        for c in self
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            c.abort();
        }
    }

    /// Closes every connection through the proxy and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.drop_connections();
    }

    /// Lets connections through again.
    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}
