//! A throwaway certificate authority for the test control plane: the apiserver's serving
//! certificate, an admin client certificate, and the service-account signing key; and for
//! the aggregation layer a front-proxy CA with the apiserver's proxy client certificate, and
//! metrics-server's serving and client certificates.

use std::{fs, net::IpAddr, path::Path};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

use crate::Error;

/// PEM-encoded certificate and key.
#[derive(Clone)]
pub struct CertPair {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The files the control plane is started with.
pub struct Pki {
    pub ca: CertPair,
    pub serving: CertPair,
    pub admin: CertPair,
    /// A client certificate of a user with no permissions (`fleetlet-nobody`).
    pub nobody: CertPair,
    pub service_account_key_pem: String,
    pub service_account_pub_pem: String,
    /// The aggregation layer's own CA (`--requestheader-client-ca-file`): extension
    /// apiservers trust the user headers of requests whose client certificate it signed.
    pub front_proxy_ca: CertPair,
    /// The certificate the apiserver proxies to extension apiservers with
    /// (`front-proxy-client`, signed by the front-proxy CA).
    pub front_proxy_client: CertPair,
    /// metrics-server's serving certificate (signed by the test CA): `localhost`, 127.0.0.1,
    /// and `metrics-server.kube-system.svc`, the name the aggregator verifies.
    pub metrics_server_serving: CertPair,
    /// metrics-server's client certificate towards the apiserver and kubelets
    /// (`fleetlet-metrics-server`, signed by the test CA).
    pub metrics_server_client: CertPair,
}

/// The CN of the front-proxy client certificate (`--requestheader-allowed-names`).
pub const FRONT_PROXY_CLIENT: &str = "front-proxy-client";

/// The user metrics-server authenticates as (its client certificate's CN).
pub const METRICS_SERVER_USER: &str = "fleetlet-metrics-server";

fn dn(common_name: &str, organization: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    if let Some(o) = organization {
        dn.push(DnType::OrganizationName, o);
    }
    dn
}

impl Pki {
    /// A new certificate authority named `common_name`.
    pub fn ca(common_name: &str) -> Result<(CertifiedIssuer<'static, KeyPair>, CertPair), Error> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name = dn(common_name, None);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key_pem = ca_key.serialize_pem();
        let ca = CertifiedIssuer::self_signed(ca_params, ca_key)?;
        let pair = CertPair {
            cert_pem: ca.pem(),
            key_pem: ca_key_pem,
        };
        Ok((ca, pair))
    }

    pub fn generate() -> Result<Self, Error> {
        let (ca, ca_pair) = Self::ca("fleetlet-testenv-ca")?;

        let serving = Self::leaf(
            &ca,
            "kube-apiserver",
            None,
            &["localhost", "kubernetes", "kubernetes.default"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        let admin = Self::leaf(
            &ca,
            "fleetlet-admin",
            Some("system:masters"),
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        let nobody = Self::leaf(
            &ca,
            "fleetlet-nobody",
            None,
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        let (front_proxy, front_proxy_ca) = Self::ca("fleetlet-testenv-front-proxy-ca")?;
        let front_proxy_client = Self::leaf(
            &front_proxy,
            FRONT_PROXY_CLIENT,
            None,
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        let metrics_server_serving = Self::leaf(
            &ca,
            "metrics-server",
            None,
            &["localhost", "metrics-server.kube-system.svc"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        let metrics_server_client = Self::leaf(
            &ca,
            METRICS_SERVER_USER,
            None,
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        let sa = KeyPair::generate()?;
        Ok(Self {
            ca: ca_pair,
            serving,
            admin,
            nobody,
            service_account_key_pem: sa.serialize_pem(),
            service_account_pub_pem: sa.public_key_pem(),
            front_proxy_ca,
            front_proxy_client,
            metrics_server_serving,
            metrics_server_client,
        })
    }

    /// A certificate signed by `ca`; server certificates also name 127.0.0.1 and ::1.
    pub fn leaf(
        ca: &CertifiedIssuer<'_, KeyPair>,
        common_name: &str,
        organization: Option<&str>,
        dns_names: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<CertPair, Error> {
        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(dns_names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name = dn(common_name, organization);
        if usage == ExtendedKeyUsagePurpose::ServerAuth {
            for ip in ["127.0.0.1", "::1"] {
                let ip: IpAddr = ip
                    .parse()
                    .map_err(|_| Error::Setup(format!("bad IP literal {ip}")))?;
                params.subject_alt_names.push(SanType::IpAddress(ip));
            }
        }
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, ca)?;
        Ok(CertPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Writes every file under `dir` with the names the apiserver flags use.
    pub fn write(&self, dir: &Path) -> Result<(), Error> {
        fs::create_dir_all(dir)?;
        let files = [
            ("ca.crt", &self.ca.cert_pem),
            ("ca.key", &self.ca.key_pem),
            ("apiserver.crt", &self.serving.cert_pem),
            ("apiserver.key", &self.serving.key_pem),
            ("admin.crt", &self.admin.cert_pem),
            ("admin.key", &self.admin.key_pem),
            ("nobody.crt", &self.nobody.cert_pem),
            ("nobody.key", &self.nobody.key_pem),
            ("sa.key", &self.service_account_key_pem),
            ("sa.pub", &self.service_account_pub_pem),
            ("front-proxy-ca.crt", &self.front_proxy_ca.cert_pem),
            ("front-proxy-ca.key", &self.front_proxy_ca.key_pem),
            ("front-proxy-client.crt", &self.front_proxy_client.cert_pem),
            ("front-proxy-client.key", &self.front_proxy_client.key_pem),
            ("metrics-server.crt", &self.metrics_server_serving.cert_pem),
            ("metrics-server.key", &self.metrics_server_serving.key_pem),
            (
                "metrics-server-client.crt",
                &self.metrics_server_client.cert_pem,
            ),
            (
                "metrics-server-client.key",
                &self.metrics_server_client.key_pem,
            ),
        ];
        for (name, pem) in files {
            fs::write(dir.join(name), pem)?;
        }
        Ok(())
    }
}
