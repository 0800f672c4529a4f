//! etcd plus a real kube-apiserver, with client-certificate admin access and RBAC on.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use fleetlet_crds::k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api, Client, Config, ResourceExt,
    api::{Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::wait::{await_condition, conditions},
};

use crate::{
    Binaries, Error,
    pki::{CertPair, Pki},
    process::{Service, free_port, wait_until},
};

/// A running etcd + kube-apiserver pair.
pub struct KubeControlPlane {
    /// `https://127.0.0.1:<port>`
    pub url: String,
    /// An admin kubeconfig (client certificate in `system:masters`).
    pub kubeconfig: PathBuf,
    /// The CA that signed every certificate, for components that need it.
    pub pki_dir: PathBuf,
    // Dropped in field order: the apiserver before its etcd.
    pub(crate) apiserver: Service,
    pub(crate) etcd: Service,
    /// How to start the apiserver again: program, arguments, log directory.
    restart: (PathBuf, Vec<String>, PathBuf),
    starts: u32,
}

impl KubeControlPlane {
    /// The kube-apiserver's and etcd's own pids, once they have started (for benchmarks
    /// that account their CPU).
    pub fn program_pids(&self) -> (Option<u32>, Option<u32>) {
        (self.apiserver.program_pid(), self.etcd.program_pid())
    }

    pub async fn start(bins: &Binaries, dir: &Path) -> Result<Self, Error> {
        let pki_dir = dir.join("pki");
        let pki = Pki::generate()?;
        pki.write(&pki_dir)?;

        let (client_port, peer_port) = (free_port()?, free_port()?);
        let client_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd_args = vec![
            "--name=fleetlet-testenv".to_string(),
            format!("--data-dir={}", dir.join("etcd").display()),
            format!("--listen-client-urls={client_url}"),
            format!("--advertise-client-urls={client_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=fleetlet-testenv={peer_url}"),
            // Test data is thrown away; fsync only slows the suite down.
            "--unsafe-no-fsync".into(),
            "--log-level=warn".into(),
        ];
        let etcd = Service::spawn("etcd", &bins.etcd, &etcd_args, dir.join("etcd.log"))?;

        let port = free_port()?;
        let p = |f: &str| pki_dir.join(f).display().to_string();
        let args = vec![
            format!("--etcd-servers={client_url}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={port}"),
            format!("--cert-dir={}", dir.join("apiserver-certs").display()),
            format!("--tls-cert-file={}", p("apiserver.crt")),
            format!("--tls-private-key-file={}", p("apiserver.key")),
            format!("--client-ca-file={}", p("ca.crt")),
            "--authorization-mode=RBAC".into(),
            // Allocation only: nothing is ever sent to these addresses.
            "--service-cluster-ip-range=10.0.0.0/24".into(),
            "--service-account-issuer=https://fleetlet-testenv.invalid".into(),
            format!("--service-account-key-file={}", p("sa.pub")),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            "--disable-admission-plugins=ServiceAccount".into(),
            "--endpoint-reconciler-type=none".into(),
            "--allow-privileged=true".into(),
            // How the apiserver reaches kubelets (for fleetlet: the bridge's kubelet API) for
            // `kubectl logs` / `exec`: with the admin client certificate, verifying the
            // kubelet's serving certificate against the test CA, at the Node's InternalIP.
            format!("--kubelet-client-certificate={}", p("admin.crt")),
            format!("--kubelet-client-key={}", p("admin.key")),
            format!("--kubelet-certificate-authority={}", p("ca.crt")),
            "--kubelet-preferred-address-types=InternalIP".into(),
            // The aggregation layer (APIServices such as metrics-server's): requests proxied
            // to an extension apiserver carry the user in headers, trusted there because the
            // proxy's client certificate is signed by the front-proxy CA.
            format!("--requestheader-client-ca-file={}", p("front-proxy-ca.crt")),
            format!(
                "--requestheader-allowed-names={}",
                crate::pki::FRONT_PROXY_CLIENT
            ),
            "--requestheader-username-headers=X-Remote-User".into(),
            "--requestheader-group-headers=X-Remote-Group".into(),
            "--requestheader-extra-headers-prefix=X-Remote-Extra-".into(),
            format!("--proxy-client-cert-file={}", p("front-proxy-client.crt")),
            format!("--proxy-client-key-file={}", p("front-proxy-client.key")),
            "--v=1".into(),
        ];
        let mut args = args;
        // 1.36+: exec, attach and port-forward reach kubelets over WebSockets when the Node
        // declares support (before 1.36 the gates do not exist, and SPDY is spoken).
        if bins.kube_minor().is_none_or(|minor| minor >= 36) {
            args.push(
                "--feature-gates=ExtendWebSocketsToKubelet=true,NodeDeclaredFeatures=true".into(),
            );
        }
        let mut apiserver = Service::spawn(
            "kube-apiserver",
            &bins.kube_apiserver,
            &args,
            dir.join("kube-apiserver.log"),
        )?;

        let url = format!("https://127.0.0.1:{port}");
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            kubeconfig_yaml(&url, &pki.ca.cert_pem, "fleetlet-admin", &pki.admin),
        )?;
        wait_ready(&mut apiserver, &kubeconfig).await?;
        Ok(Self {
            url,
            kubeconfig,
            pki_dir,
            apiserver,
            etcd,
            restart: (bins.kube_apiserver.clone(), args, dir.to_path_buf()),
            starts: 1,
        })
    }

    /// Stops kube-apiserver (etcd keeps running): clients see connection errors until
    /// [`KubeControlPlane::start_apiserver`].
    pub fn stop_apiserver(&mut self) {
        self.apiserver.stop();
    }

    /// Starts kube-apiserver again on the same port and store, and waits until it is ready.
    pub async fn start_apiserver(&mut self) -> Result<(), Error> {
        self.starts += 1;
        let (program, args, dir) = &self.restart;
        let mut apiserver = Service::spawn(
            "kube-apiserver",
            program,
            args,
            dir.join(format!("kube-apiserver-{}.log", self.starts)),
        )?;
        wait_ready(&mut apiserver, &self.kubeconfig).await?;
        self.apiserver = apiserver;
        Ok(())
    }
}

/// Waits until the apiserver answers /readyz.
async fn wait_ready(apiserver: &mut Service, kubeconfig: &Path) -> Result<(), Error> {
    let client = client_for(kubeconfig).await?;
    wait_until(
        "kube-apiserver /readyz",
        apiserver,
        Duration::from_secs(90),
        || {
            let client = client.clone();
            async move {
                let req = http::Request::get("/readyz")
                    .body(Vec::new())
                    .map_err(|e| e.to_string())?;
                client
                    .request_text(req)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        },
    )
    .await
}

impl KubeControlPlane {
    pub async fn client(&self) -> Result<Client, Error> {
        client_for(&self.kubeconfig).await
    }

    /// Applies fleetlet's CRDs and waits until the apiserver serves them.
    pub async fn install_crds(&self) -> Result<(), Error> {
        let client = self.client().await?;
        let api: Api<CustomResourceDefinition> = Api::all(client);
        let pp = PatchParams::apply("fleetlet-testenv").force();
        for crd in fleetlet_crds::crds()? {
            let name = crd.name_any();
            api.patch(&name, &pp, &Patch::Apply(&crd)).await?;
            let established = await_condition(api.clone(), &name, conditions::is_crd_established());
            tokio::time::timeout(Duration::from_secs(30), established)
                .await
                .map_err(|_| Error::Setup(format!("CRD {name} not established within 30s")))?
                .map_err(|e| Error::Setup(format!("waiting for CRD {name}: {e}")))?;
        }
        Ok(())
    }

    /// Writes to `path` a kubeconfig for this apiserver that authenticates as `user` with
    /// the client certificate and key `<cert>.crt` / `<cert>.key` of the test PKI
    /// (e.g. `metrics-server-client`).
    pub fn write_kubeconfig(&self, path: &Path, user: &str, cert: &str) -> Result<(), Error> {
        let read = |f: String| {
            std::fs::read_to_string(self.pki_dir.join(&f))
                .map_err(|e| Error::Setup(format!("reading {f} of the test PKI: {e}")))
        };
        let pair = CertPair {
            cert_pem: read(format!("{cert}.crt"))?,
            key_pem: read(format!("{cert}.key"))?,
        };
        let ca = read("ca.crt".into())?;
        std::fs::write(path, kubeconfig_yaml(&self.url, &ca, user, &pair))?;
        Ok(())
    }

    /// The end of the apiserver's log, for failure messages.
    pub fn apiserver_log_tail(&self, lines: usize) -> String {
        self.apiserver.log_tail(lines)
    }

    pub(crate) fn pids(&self) -> Vec<u32> {
        vec![self.apiserver.pid(), self.etcd.pid()]
    }

    /// Starts kube-controller-manager (ReplicaSets, garbage collection, DaemonSets, node
    /// lifecycle, CSR signing with the test CA) and kube-scheduler against this apiserver.
    pub async fn start_controllers(
        &self,
        bins: &Binaries,
        dir: &Path,
    ) -> Result<Controllers, Error> {
        let p = |f: &str| self.pki_dir.join(f).display().to_string();
        let kc = self.kubeconfig.display().to_string();
        let common = |port: u16| {
            vec![
                format!("--kubeconfig={kc}"),
                format!("--authentication-kubeconfig={kc}"),
                format!("--authorization-kubeconfig={kc}"),
                "--leader-elect=false".to_string(),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={port}"),
                format!("--cert-dir={}", dir.join("controllers-certs").display()),
                "--v=1".into(),
            ]
        };
        let mut cm_args = common(free_port()?);
        cm_args.extend([
            format!("--service-account-private-key-file={}", p("sa.key")),
            format!("--root-ca-file={}", p("ca.crt")),
            format!("--cluster-signing-cert-file={}", p("ca.crt")),
            format!("--cluster-signing-key-file={}", p("ca.key")),
            "--use-service-account-credentials=false".into(),
            // Node lifecycle: a silent virtual node gets the usual taints and evictions.
            "--node-monitor-grace-period=40s".into(),
        ]);
        let mut controller_manager = Service::spawn(
            "kube-controller-manager",
            &bins.kube_controller_manager,
            &cm_args,
            dir.join("kube-controller-manager.log"),
        )?;
        let mut scheduler = Service::spawn(
            "kube-scheduler",
            &bins.kube_scheduler,
            &common(free_port()?),
            dir.join("kube-scheduler.log"),
        )?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        controller_manager.check_running()?;
        scheduler.check_running()?;
        Ok(Controllers {
            controller_manager,
            scheduler,
        })
    }
}

/// kube-controller-manager and kube-scheduler; stopped when dropped.
pub struct Controllers {
    pub controller_manager: Service,
    pub scheduler: Service,
}

impl Controllers {
    pub(crate) fn pids(&self) -> Vec<u32> {
        vec![self.controller_manager.pid(), self.scheduler.pid()]
    }
}

/// A kube client from a kubeconfig file.
pub async fn client_for(kubeconfig: &Path) -> Result<Client, Error> {
    let kc = Kubeconfig::read_from(kubeconfig)
        .map_err(|e| Error::Setup(format!("reading {}: {e}", kubeconfig.display())))?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| Error::Setup(format!("kubeconfig {}: {e}", kubeconfig.display())))?;
    Ok(Client::try_from(config)?)
}

fn kubeconfig_yaml(url: &str, ca_pem: &str, user: &str, client: &CertPair) -> String {
    let b = |s: &str| B64.encode(s.as_bytes());
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: fleetlet-testenv
  cluster:
    server: {url}
    certificate-authority-data: {ca}
users:
- name: {user}
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
contexts:
- name: fleetlet-testenv
  context:
    cluster: fleetlet-testenv
    user: {user}
    namespace: default
current-context: fleetlet-testenv
",
        ca = b(ca_pem),
        cert = b(&client.cert_pem),
        key = b(&client.key_pem),
    )
}
