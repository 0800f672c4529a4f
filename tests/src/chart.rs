//! The Helm chart (`helm/fleetlet`) installed with the real `helm` into a [`TestEnv`], and
//! kubeconfigs carrying the chart's ServiceAccount tokens, so the controller and the bridge
//! can run out of cluster with exactly the RBAC the chart grants.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use crate::{Binaries, Error, TestEnv, repo_root};

/// The chart's directory in this checkout.
pub fn chart_dir() -> PathBuf {
    repo_root().join("helm").join("fleetlet")
}

/// `helm` with its cache, config and data under `home` (never the user's own).
pub fn helm_command(home: &Path) -> Result<Command, Error> {
    let mut cmd = Command::new(&Binaries::locate()?.helm);
    cmd.env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"));
    Ok(cmd)
}

/// What `helm install` set up, and credentials for its two ServiceAccounts.
#[derive(Debug, Clone)]
pub struct ChartInstall {
    pub release: String,
    pub namespace: String,
    /// A kubeconfig authenticating as the controller's ServiceAccount.
    pub controller_kubeconfig: PathBuf,
    /// A kubeconfig authenticating as the bridge's ServiceAccount.
    pub bridge_kubeconfig: PathBuf,
}

/// The output of a command, or an error with its stderr when it failed.
pub fn checked(what: &str, mut cmd: Command) -> Result<Output, Error> {
    let out = cmd.output()?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(Error::Setup(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

impl TestEnv {
    /// `helm` pointed at this environment, with its cache and config under the
    /// environment's directory.
    pub fn helm(&self) -> Result<Command, Error> {
        let mut cmd = helm_command(&self.dir.join("helm"))?;
        cmd.env("KUBECONFIG", self.kubeconfig()?);
        Ok(cmd)
    }

    /// `helm install RELEASE helm/fleetlet -n NAMESPACE --create-namespace` with `values`
    /// (`key=value` pairs for `--set`), then a token for each of the chart's
    /// ServiceAccounts.
    pub fn install_chart(
        &self,
        release: &str,
        namespace: &str,
        values: &[&str],
    ) -> Result<ChartInstall, Error> {
        let mut helm = self.helm()?;
        helm.args(["install", release]).arg(chart_dir()).args([
            "--namespace",
            namespace,
            "--create-namespace",
        ]);
        for v in values {
            helm.args(["--set", v]);
        }
        checked("helm install", helm)?;
        let dir = self.dir.join(format!("chart-{namespace}-{release}"));
        std::fs::create_dir_all(&dir)?;
        let fullname = if release.contains("fleetlet") {
            release.to_string()
        } else {
            format!("{release}-fleetlet")
        };
        let kubeconfig = |component: &str| {
            self.service_account_kubeconfig(
                namespace,
                &format!("{fullname}-{component}"),
                &dir.join(format!("{component}.kubeconfig")),
            )
        };
        Ok(ChartInstall {
            release: release.into(),
            namespace: namespace.into(),
            controller_kubeconfig: kubeconfig("controller")?,
            bridge_kubeconfig: kubeconfig("bridge")?,
        })
    }

    /// A kubeconfig for ServiceAccount `namespace/name`: this environment's server and CA,
    /// and a bound token (TokenRequest, valid for a day) instead of the admin certificate.
    pub fn service_account_kubeconfig(
        &self,
        namespace: &str,
        name: &str,
        out: &Path,
    ) -> Result<PathBuf, Error> {
        let mut kubectl = self.kubectl()?;
        kubectl.args(["create", "token", name, "-n", namespace, "--duration=24h"]);
        let token = String::from_utf8_lossy(&checked("kubectl create token", kubectl)?.stdout)
            .trim()
            .to_string();
        let admin = std::fs::read_to_string(self.kubeconfig()?)?;
        let mut config: serde_json::Value =
            serde_norway::from_str(&admin).map_err(|e| Error::Setup(e.to_string()))?;
        config["users"] = serde_json::json!([{
            "name": format!("system:serviceaccount:{namespace}:{name}"),
            "user": { "token": token },
        }]);
        config["contexts"][0]["context"]["user"] =
            format!("system:serviceaccount:{namespace}:{name}").into();
        let yaml = serde_norway::to_string(&config).map_err(|e| Error::Setup(e.to_string()))?;
        std::fs::write(out, yaml)?;
        Ok(out.to_path_buf())
    }
}
