//! A real nats-server with JetStream, restartable on the same port and store.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use async_nats::jetstream;

use crate::{
    Error,
    process::{Service, free_port, wait_until},
};

pub struct NatsServer {
    /// `nats://127.0.0.1:<port>`
    pub url: String,
    pub port: u16,
    pub monitor_port: u16,
    program: PathBuf,
    dir: PathBuf,
    extra_args: Vec<String>,
    service: Option<Service>,
    starts: u32,
}

impl NatsServer {
    pub async fn start(program: &Path, dir: &Path) -> Result<Self, Error> {
        Self::start_with_args(program, dir, Vec::new()).await
    }

    /// Starts with extra command-line flags (e.g. `--user`/`--pass`); the readiness check
    /// then needs [`NatsServer::connect_options`] to match.
    pub async fn start_with_args(
        program: &Path,
        dir: &Path,
        extra_args: Vec<String>,
    ) -> Result<Self, Error> {
        let mut server = Self {
            extra_args,
            port: free_port()?,
            monitor_port: free_port()?,
            url: String::new(),
            program: program.to_path_buf(),
            dir: dir.to_path_buf(),
            service: None,
            starts: 0,
        };
        server.url = format!("nats://127.0.0.1:{}", server.port);
        server.start_again().await?;
        Ok(server)
    }

    /// Starts the server (again) on the same port with the same JetStream store.
    pub async fn start_again(&mut self) -> Result<(), Error> {
        if self.service.is_some() {
            return Ok(());
        }
        self.starts += 1;
        let args = vec![
            "-js".to_string(),
            "-sd".into(),
            self.dir.join("jetstream").display().to_string(),
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            self.port.to_string(),
            "-m".into(),
            self.monitor_port.to_string(),
            "--server_name".into(),
            "fleetlet-testenv".into(),
        ];
        let args = [args, self.extra_args.clone()].concat();
        let log = self.dir.join(format!("nats-{}.log", self.starts));
        let mut service = Service::spawn("nats-server", &self.program, &args, log)?;
        let url = self.url.clone();
        let auth = self.auth();
        wait_until("nats-server", &mut service, Duration::from_secs(20), || {
            let url = url.clone();
            let auth = auth.clone();
            async move {
                let client = connect_options(auth)
                    .connect(&url)
                    .await
                    .map_err(|e| e.to_string())?;
                // JetStream answers once the store is recovered.
                jetstream::new(client)
                    .query_account()
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        })
        .await?;
        self.service = Some(service);
        Ok(())
    }

    /// Stops the server; clients see a disconnect. [`NatsServer::start_again`] brings it back.
    pub fn stop(&mut self) {
        if let Some(mut s) = self.service.take() {
            s.stop();
        }
    }

    pub fn is_running(&self) -> bool {
        self.service.is_some()
    }

    pub async fn client(&self) -> Result<async_nats::Client, Error> {
        Ok(connect_options(self.auth()).connect(&self.url).await?)
    }

    /// `--user`/`--pass` given to the server, if any.
    fn auth(&self) -> Option<(String, String)> {
        let flag = |name: &str| {
            self.extra_args
                .iter()
                .position(|a| a == name)
                .and_then(|i| self.extra_args.get(i + 1).cloned())
        };
        Some((flag("--user")?, flag("--pass")?))
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.service.as_ref().map(Service::pid)
    }
}

fn connect_options(auth: Option<(String, String)>) -> async_nats::ConnectOptions {
    match auth {
        Some((u, p)) => async_nats::ConnectOptions::with_user_and_password(u, p),
        None => async_nats::ConnectOptions::new(),
    }
}

/// Creates fleetlet's KV buckets (idempotent, as the controller does) and returns the
/// JetStream context.
pub async fn ensure_buckets(client: async_nats::Client) -> Result<jetstream::Context, Error> {
    let js = jetstream::new(client);
    fleetlet_controller::ensure_buckets(&js, 1)
        .await
        .map_err(|e| Error::Setup(e.to_string()))?;
    Ok(js)
}
