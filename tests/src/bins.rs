//! Where the server binaries are: `FLEETLET_<NAME>` environment variables, or else
//! `scripts/testbin`, which builds them once from the Go module proxy and caches them.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use crate::Error;

/// Paths of the real servers.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub kube_apiserver: PathBuf,
    pub kube_controller_manager: PathBuf,
    pub kube_scheduler: PathBuf,
    pub etcd: PathBuf,
    pub nats_server: PathBuf,
    pub helm: PathBuf,
}

/// The repository root (where `scripts/` is).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

const NAMES: [&str; 6] = [
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "etcd",
    "nats-server",
    "helm",
];

fn env_name(bin: &str) -> String {
    format!("FLEETLET_{}", bin.to_uppercase().replace('-', "_"))
}

impl Binaries {
    /// The Kubernetes minor version of the apiserver (`kube-apiserver --version`), e.g. 35
    /// for v1.35.4; `None` if it cannot be told. Cached for the process.
    pub fn kube_minor(&self) -> Option<u32> {
        static MINOR: OnceLock<Option<u32>> = OnceLock::new();
        *MINOR.get_or_init(|| {
            let out = Command::new(&self.kube_apiserver)
                .arg("--version")
                .output()
                .ok()?;
            // "Kubernetes v1.35.4"
            let text = String::from_utf8_lossy(&out.stdout);
            let version = text.split_whitespace().last()?.trim_start_matches('v');
            version.split('.').nth(1)?.parse().ok()
        })
    }

    /// metrics-server (sigs.k8s.io/metrics-server), for the aggregation layer and `kubectl
    /// top`: `FLEETLET_METRICS_SERVER`, or else built by `scripts/testbin` on first use (only
    /// the tests that need it pay for its build). Cached for the process.
    pub fn metrics_server(&self) -> Result<PathBuf, Error> {
        static PATH: OnceLock<Result<PathBuf, String>> = OnceLock::new();
        PATH.get_or_init(|| {
            if let Some(p) = std::env::var_os(env_name("metrics-server")) {
                return Ok(PathBuf::from(p));
            }
            let script = repo_root().join("scripts/testbin");
            let out = Command::new(&script)
                .args(["path", "metrics-server"])
                .output()
                .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
            let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if out.status.success() && path.is_file() {
                Ok(path)
            } else {
                Err(format!(
                    "{} path metrics-server failed: {}",
                    script.display(),
                    String::from_utf8_lossy(&out.stderr)
                ))
            }
        })
        .clone()
        .map_err(Error::Setup)
    }

    /// Finds (and on first use builds) every binary. Cached for the process.
    pub fn locate() -> Result<&'static Binaries, Error> {
        static BINS: OnceLock<Result<Binaries, String>> = OnceLock::new();
        BINS.get_or_init(|| Self::find().map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| Error::Setup(e.clone()))
    }

    fn find() -> Result<Binaries, Error> {
        let mut paths: HashMap<&str, PathBuf> = NAMES
            .iter()
            .filter_map(|n| std::env::var_os(env_name(n)).map(|p| (*n, PathBuf::from(p))))
            .collect();
        let missing: Vec<&str> = NAMES
            .iter()
            .copied()
            .filter(|n| !paths.contains_key(n))
            .collect();
        if !missing.is_empty() {
            let script = repo_root().join("scripts/testbin");
            let out = Command::new(&script)
                .arg("env")
                .args(&missing)
                .output()
                .map_err(|e| Error::Setup(format!("cannot run {}: {e}", script.display())))?;
            if !out.status.success() {
                return Err(Error::Setup(format!(
                    "{} env {} failed: {}",
                    script.display(),
                    missing.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                )));
            }
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let Some((var, path)) =
                    line.strip_prefix("export ").and_then(|l| l.split_once('='))
                else {
                    continue;
                };
                if let Some(n) = NAMES.iter().find(|n| env_name(n) == var) {
                    paths.insert(n, PathBuf::from(path));
                }
            }
        }
        let mut take = |n: &str| {
            paths.remove(n).filter(|p| p.is_file()).ok_or_else(|| {
                Error::Setup(format!(
                    "{n} not found (set {} or run scripts/testbin)",
                    env_name(n)
                ))
            })
        };
        Ok(Binaries {
            kube_apiserver: take("kube-apiserver")?,
            kube_controller_manager: take("kube-controller-manager")?,
            kube_scheduler: take("kube-scheduler")?,
            etcd: take("etcd")?,
            nats_server: take("nats-server")?,
            helm: take("helm")?,
        })
    }
}
