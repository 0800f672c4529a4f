//! The kubelet API's serving certificate: from files (a mounted Secret), or issued by the
//! cluster through a CertificateSigningRequest for the `kubernetes.io/kubelet-serving`
//! signer and renewed before it expires.

use std::{
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use k8s_openapi::{ByteString, api::certificates::v1::CertificateSigningRequest};
use kube::{
    Api, Client, ResourceExt,
    api::{Patch, PatchParams, PostParams},
};
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use serde_json::json;
use tracing::{info, warn};

use crate::kubelet::KubeletError;

/// Where the serving certificate comes from.
#[derive(Debug, Clone)]
pub enum ServingCert {
    /// PEM files, e.g. a mounted `kubernetes.io/tls` Secret.
    Files { cert: PathBuf, key: PathBuf },
    /// A CSR for `kubernetes.io/kubelet-serving`, as `system:node:<name>` in `system:nodes`,
    /// naming these addresses.
    Csr {
        name: String,
        ips: Vec<IpAddr>,
        dns: Vec<String>,
    },
}

pub const SIGNER: &str = "kubernetes.io/kubelet-serving";

/// Hands the current certificate to each TLS handshake; swapped on renewal.
#[derive(Debug, Default)]
pub struct Resolver(RwLock<Option<Arc<CertifiedKey>>>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.read().ok()?.clone()
    }
}

impl Resolver {
    fn set(&self, key: CertifiedKey) {
        if let Ok(mut k) = self.0.write() {
            *k = Some(Arc::new(key));
        }
    }
}

fn tls(e: impl std::fmt::Display) -> KubeletError {
    KubeletError::Tls(e.to_string())
}

fn certified(
    cert_pem: &[u8],
    key: &PrivateKeyDer<'_>,
) -> Result<(CertifiedKey, SystemTime), KubeletError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(tls)?;
    let leaf = certs
        .first()
        .ok_or_else(|| tls("no certificate in the PEM data"))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(tls)?;
    let not_after = SystemTime::UNIX_EPOCH
        + Duration::from_secs(u64::try_from(parsed.validity().not_after.timestamp()).unwrap_or(0));
    let signer = rustls::crypto::ring::sign::any_supported_type(key).map_err(tls)?;
    Ok((CertifiedKey::new(certs, signer), not_after))
}

/// Loads the certificate now and keeps it current: files are read once; a CSR-issued
/// certificate is requested (this waits for approval and signing) and renewed at 80 % of
/// its lifetime.
pub async fn start(
    source: ServingCert,
    client: Client,
) -> Result<(Arc<Resolver>, Option<impl Future<Output = ()>>), KubeletError> {
    let resolver = Arc::new(Resolver::default());
    match source {
        ServingCert::Files { cert, key } => {
            let read = |p: &PathBuf| {
                std::fs::read(p).map_err(|source| KubeletError::Read {
                    path: p.clone(),
                    source,
                })
            };
            let key = PrivateKeyDer::from_pem_slice(&read(&key)?).map_err(tls)?;
            let (ck, _) = certified(&read(&cert)?, &key)?;
            resolver.set(ck);
            Ok((resolver, None))
        }
        ServingCert::Csr { name, ips, dns } => {
            let (ck, not_after) = issue(&client, &name, &ips, &dns).await?;
            resolver.set(ck);
            let r = resolver.clone();
            let renew = async move {
                let mut not_after = not_after;
                loop {
                    let now = SystemTime::now();
                    let left = not_after.duration_since(now).unwrap_or_default();
                    tokio::time::sleep((left * 4 / 5).max(Duration::from_secs(30))).await;
                    match issue(&client, &name, &ips, &dns).await {
                        Ok((ck, na)) => {
                            r.set(ck);
                            not_after = na;
                            info!("kubelet API serving certificate renewed");
                        }
                        Err(e) => {
                            warn!(error = %e, "renewing the kubelet API serving certificate; retrying in a minute");
                            not_after = SystemTime::now() + Duration::from_secs(300);
                        }
                    }
                }
            };
            Ok((resolver, Some(renew)))
        }
    }
}

/// Requests, approves (if this identity may) and waits for a kubelet-serving certificate.
async fn issue(
    client: &Client,
    name: &str,
    ips: &[IpAddr],
    dns: &[String],
) -> Result<(CertifiedKey, SystemTime), KubeletError> {
    let key = rcgen::KeyPair::generate().map_err(tls)?;
    let mut params = rcgen::CertificateParams::new(dns.to_vec()).map_err(tls)?;
    params
        .subject_alt_names
        .extend(ips.iter().map(|ip| rcgen::SanType::IpAddress(*ip)));
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, format!("system:node:{name}"));
    dn.push(rcgen::DnType::OrganizationName, "system:nodes");
    params.distinguished_name = dn;
    let request = params
        .serialize_request(&key)
        .map_err(tls)?
        .pem()
        .map_err(tls)?;
    let csr: CertificateSigningRequest = serde_json::from_value(json!({
        "metadata": { "generateName": format!("fleetlet-{name}-") },
        "spec": {
            "request": ByteString(request.into_bytes()),
            "signerName": SIGNER,
            "usages": ["digital signature", "server auth"],
        }
    }))
    .map_err(tls)?;
    let api: Api<CertificateSigningRequest> = Api::all(client.clone());
    let created = api
        .create(&PostParams::default(), &csr)
        .await
        .map_err(|e| tls(format!("creating a CertificateSigningRequest: {e}")))?;
    let csr_name = created.name_any();
    let approval = json!({ "status": { "conditions": [{
        "type": "Approved", "status": "True", "reason": "FleetletBridge",
        "message": "serving certificate of fleetlet's kubelet API, approved by the bridge",
    }] } });
    match api
        .patch_approval(&csr_name, &PatchParams::default(), &Patch::Merge(&approval))
        .await
    {
        Ok(_) => info!(csr = %csr_name, "approved the kubelet API's certificate request"),
        Err(e) => warn!(
            csr = %csr_name, error = %e,
            "cannot approve my own certificate request; waiting for `kubectl certificate approve {csr_name}`"
        ),
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    loop {
        let c = api.get(&csr_name).await.map_err(tls)?;
        let status = c.status.unwrap_or_default();
        if let Some(cert) = status.certificate.filter(|c| !c.0.is_empty()) {
            let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
            let (ck, not_after) = certified(&cert.0, &der)?;
            info!(csr = %csr_name, "kubelet API serving certificate issued");
            return Ok((ck, not_after));
        }
        if let Some(c) = status
            .conditions
            .iter()
            .flatten()
            .find(|c| (c.type_ == "Denied" || c.type_ == "Failed") && c.status == "True")
        {
            return Err(tls(format!(
                "certificate request {csr_name} {}: {}",
                c.type_,
                c.message.clone().unwrap_or_default()
            )));
        }
        if tokio::time::Instant::now() > deadline {
            return Err(tls(format!(
                "certificate request {csr_name} not signed within 10 minutes"
            )));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
