//! A real metrics-server behind the apiserver's aggregation layer, so that
//! `kubectl top node` / `kubectl top pod` (the `metrics.k8s.io` API) can be tested.
//!
//! metrics-server runs on a loopback port with a serving certificate from the test CA, as
//! user `fleetlet-metrics-server` (a client certificate from the test CA, which the
//! apiserver and the bridge's kubelet API both accept), with the RBAC upstream's manifests
//! give it. The apiserver reaches it through an `ExternalName` Service named
//! `metrics-server` in `kube-system` pointing at `localhost` (Endpoints cannot hold loopback
//! addresses), registered as APIService `v1beta1.metrics.k8s.io` with the test CA as its
//! CA bundle.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use k8s_openapi::{
    api::{
        core::v1::{ConfigMap, Service as KubeService},
        rbac::v1::{ClusterRole, ClusterRoleBinding, RoleBinding},
    },
    kube_aggregator::pkg::apis::apiregistration::v1::APIService,
};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::json;

use crate::{
    Binaries, Error, KubeControlPlane,
    kube::client_for,
    pki::METRICS_SERVER_USER,
    process::{Service, free_port, wait_until},
};

/// The APIService metrics-server is registered as.
pub const API_SERVICE: &str = "v1beta1.metrics.k8s.io";

/// Namespace and name of the Service the APIService points at.
pub const NAMESPACE: &str = "kube-system";
pub const SERVICE: &str = "metrics-server";

/// The ClusterRole with what metrics-server reads (upstream's `system:metrics-server`).
pub const CLUSTER_ROLE: &str = "fleetlet:metrics-server";

/// How long metrics-server may take to become Available.
const AVAILABLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A running metrics-server registered with the apiserver; stopped, and its APIService
/// deleted, when dropped.
pub struct MetricsServer {
    /// The loopback port it serves on (https).
    pub port: u16,
    /// Its kubeconfig (user `fleetlet-metrics-server`).
    pub kubeconfig: PathBuf,
    /// The admin kubeconfig, to delete the APIService when dropped.
    admin_kubeconfig: PathBuf,
    service: Service,
}

impl MetricsServer {
    /// Creates metrics-server's RBAC, starts it (log in `dir/metrics-server.log`), registers
    /// it as APIService [`API_SERVICE`] and waits (up to 60 s) until that is Available.
    /// Idempotent towards the apiserver: everything is server-side applied.
    pub async fn start(
        bins: &Binaries,
        kube: &KubeControlPlane,
        dir: &Path,
    ) -> Result<Self, Error> {
        std::fs::create_dir_all(dir)?;
        let admin = kube.client().await?;
        apply_rbac(&admin).await?;

        let kubeconfig = dir.join("metrics-server.kubeconfig");
        kube.write_kubeconfig(&kubeconfig, METRICS_SERVER_USER, "metrics-server-client")?;
        // metrics-server exits at once if it cannot read the request-header configuration;
        // wait until its user may (RBAC just applied).
        wait_authentication_readable(&kubeconfig).await?;

        let port = free_port()?;
        let p = |f: &str| kube.pki_dir.join(f).display().to_string();
        let kc = kubeconfig.display().to_string();
        let args = vec![
            format!("--secure-port={port}"),
            "--bind-address=127.0.0.1".to_string(),
            format!("--cert-dir={}", dir.join("metrics-server-certs").display()),
            format!("--tls-cert-file={}", p("metrics-server.crt")),
            format!("--tls-private-key-file={}", p("metrics-server.key")),
            format!("--kubeconfig={kc}"),
            format!("--authentication-kubeconfig={kc}"),
            format!("--authorization-kubeconfig={kc}"),
            // Towards kubelets (for fleetlet: the bridge's kubelet API, whose serving
            // certificate the test CA signed, from files or a CSR): the same client
            // certificate, at the Node's InternalIP and kubelet endpoint port.
            "--kubelet-use-node-status-port".into(),
            "--kubelet-preferred-address-types=InternalIP".into(),
            format!("--kubelet-certificate-authority={}", p("ca.crt")),
            format!(
                "--kubelet-client-certificate={}",
                p("metrics-server-client.crt")
            ),
            format!("--kubelet-client-key={}", p("metrics-server-client.key")),
            // Its minimum, which must exceed the kubelet request timeout by 10 % (that
            // defaults to 10 s).
            "--metric-resolution=10s".into(),
            "--kubelet-request-timeout=5s".into(),
            "--v=2".into(),
        ];
        let program = bins.metrics_server()?;
        let mut service = Service::spawn(
            "metrics-server",
            &program,
            &args,
            dir.join("metrics-server.log"),
        )?;

        let ca = std::fs::read_to_string(kube.pki_dir.join("ca.crt"))?;
        register(&admin, port, &ca).await?;

        let api_services: Api<APIService> = Api::all(admin);
        wait_until(
            &format!("APIService {API_SERVICE} Available"),
            &mut service,
            AVAILABLE_TIMEOUT,
            || {
                let api = api_services.clone();
                async move { available(&api).await }
            },
        )
        .await?;

        Ok(Self {
            port,
            kubeconfig,
            admin_kubeconfig: kube.kubeconfig.clone(),
            service,
        })
    }

    /// The last `lines` lines of metrics-server's log.
    pub fn log_tail(&self, lines: usize) -> String {
        self.service.log_tail(lines)
    }

    /// metrics-server's log file.
    pub fn log(&self) -> &Path {
        &self.service.log
    }

    /// The watchdog's pid (metrics-server is its child).
    pub fn pid(&self) -> u32 {
        self.service.pid()
    }
}

impl Drop for MetricsServer {
    /// Unregisters the APIService (else the apiserver's discovery keeps reporting
    /// `metrics.k8s.io` unavailable), best effort, then stops the process.
    fn drop(&mut self) {
        let kubeconfig = self.admin_kubeconfig.clone();
        // Its own thread and runtime: drop may run inside (or outside) any runtime.
        let unregister = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let delete = async {
                    let client = client_for(&kubeconfig).await.ok()?;
                    Api::<APIService>::all(client)
                        .delete(API_SERVICE, &DeleteParams::default())
                        .await
                        .ok()
                };
                let _ = tokio::time::timeout(Duration::from_secs(5), delete).await;
            });
        });
        let _ = unregister.join();
        self.service.stop();
    }
}

/// `Ok` once the APIService's Available condition is True; else what it says.
async fn available(api: &Api<APIService>) -> Result<(), String> {
    let svc = api.get(API_SERVICE).await.map_err(|e| e.to_string())?;
    let conditions = svc.status.and_then(|s| s.conditions).unwrap_or_default();
    match conditions.iter().find(|c| c.type_ == "Available") {
        Some(c) if c.status == "True" => Ok(()),
        Some(c) => Err(format!(
            "Available={} ({}: {})",
            c.status,
            c.reason.as_deref().unwrap_or_default(),
            c.message.as_deref().unwrap_or_default()
        )),
        None => Err("no Available condition yet".into()),
    }
}

/// Waits (up to 10 s) until metrics-server's user can read the request-header
/// configuration the apiserver publishes in kube-system.
async fn wait_authentication_readable(kubeconfig: &Path) -> Result<(), Error> {
    let client = client_for(kubeconfig).await?;
    let api: Api<ConfigMap> = Api::namespaced(client, NAMESPACE);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let err = match api.get("extension-apiserver-authentication").await {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Setup(format!(
                "{METRICS_SERVER_USER} cannot read {NAMESPACE}/extension-apiserver-authentication: {err}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A typed object from JSON (the shapes below are fixed; a failure is a bug here).
fn object<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, Error> {
    serde_json::from_value(value).map_err(|e| Error::Setup(format!("building an object: {e}")))
}

/// Server-side applies `obj` (named `name`) through `api`.
async fn apply<T>(api: &Api<T>, name: &str, obj: &T) -> Result<(), Error>
where
    T: kube::Resource + Clone + std::fmt::Debug + Serialize + DeserializeOwned,
{
    let pp = PatchParams::apply("fleetlet-testenv").force();
    api.patch(name, &pp, &Patch::Apply(obj)).await?;
    Ok(())
}

/// What upstream's manifests grant metrics-server: reading nodes, pods and the kubelets'
/// metrics; delegated authentication and authorization; the request-header configuration.
async fn apply_rbac(client: &Client) -> Result<(), Error> {
    let user = json!([{
        "kind": "User",
        "apiGroup": "rbac.authorization.k8s.io",
        "name": METRICS_SERVER_USER,
    }]);
    let role: ClusterRole = object(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": { "name": CLUSTER_ROLE },
        "rules": [
            { "apiGroups": [""], "resources": ["nodes/metrics"], "verbs": ["get"] },
            { "apiGroups": [""], "resources": ["pods", "nodes"], "verbs": ["get", "list", "watch"] },
        ],
    }))?;
    apply(&Api::all(client.clone()), CLUSTER_ROLE, &role).await?;
    let bindings = [
        (CLUSTER_ROLE.to_string(), CLUSTER_ROLE),
        (
            format!("{CLUSTER_ROLE}:auth-delegator"),
            "system:auth-delegator",
        ),
    ];
    for (name, role) in bindings {
        let binding: ClusterRoleBinding = object(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": { "name": name },
            "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role },
            "subjects": user,
        }))?;
        apply(&Api::all(client.clone()), &name, &binding).await?;
    }
    let name = format!("{CLUSTER_ROLE}:auth-reader");
    let binding: RoleBinding = object(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": { "name": name, "namespace": NAMESPACE },
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
            "name": "extension-apiserver-authentication-reader",
        },
        "subjects": user,
    }))?;
    apply(&Api::namespaced(client.clone(), NAMESPACE), &name, &binding).await
}

/// The ExternalName Service (`localhost:port`) and the APIService pointing at it.
async fn register(client: &Client, port: u16, ca_pem: &str) -> Result<(), Error> {
    let service: KubeService = object(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": SERVICE, "namespace": NAMESPACE },
        "spec": {
            "type": "ExternalName",
            "externalName": "localhost",
            "ports": [{ "name": "https", "port": port, "protocol": "TCP" }],
        },
    }))?;
    apply(
        &Api::namespaced(client.clone(), NAMESPACE),
        SERVICE,
        &service,
    )
    .await?;
    let mut api_service: APIService = object(json!({
        "apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
        "metadata": { "name": API_SERVICE },
        "spec": {
            "group": "metrics.k8s.io",
            "version": "v1beta1",
            "groupPriorityMinimum": 100,
            "versionPriority": 100,
            "service": { "namespace": NAMESPACE, "name": SERVICE, "port": port },
        },
    }))?;
    if let Some(spec) = api_service.spec.as_mut() {
        spec.ca_bundle = Some(k8s_openapi::ByteString(ca_pem.as_bytes().to_vec()));
    }
    apply(&Api::all(client.clone()), API_SERVICE, &api_service).await
}
