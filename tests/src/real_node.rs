//! A real Kubernetes node for the tests (`scripts/real-node`): kubelet, containerd, runc and
//! a CNI bridge network, with a kube-apiserver, kube-controller-manager and kube-scheduler
//! of its own, all in namespaces the script makes and removes. Needs root.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use crate::{
    Error,
    process::{Service, free_port},
    repo_root,
};

/// The node's address inside its network namespace: Pods reach the host's forwarded ports
/// here (`FLEETLET_REAL_NODE_FORWARD`).
pub const NODE_IP: &str = "10.250.0.1";

/// A running node; stopped (and its namespaces removed) when dropped.
pub struct RealNode {
    pub kubeconfig: PathBuf,
    service: Service,
    // Last: removed after the node has stopped.
    pub dir: tempfile::TempDir,
}

impl RealNode {
    /// Starts the node and waits until it is Ready. `env` goes to the script
    /// (`FLEETLET_REAL_NODE_IMAGES`, `FLEETLET_REAL_NODE_FORWARD`,
    /// `FLEETLET_REAL_NODE_REGISTRY`).
    pub async fn start(env: &[(&str, String)]) -> Result<Self, Error> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let mut service = Service::spawn_with_env(
            "real-node",
            &repo_root().join("scripts/real-node"),
            &[dir.path().display().to_string(), port.to_string()],
            env,
            dir.path().join("real-node.log"),
        )?;
        // Up to a few minutes the first time: the script builds kubelet if it is not cached.
        for _ in 0..1200 {
            if dir.path().join("ready").exists() {
                return Ok(Self {
                    kubeconfig: dir.path().join("admin.kubeconfig"),
                    service,
                    dir,
                });
            }
            service.check_running()?;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Err(Error::Setup(format!(
            "the real node was not Ready in 5 minutes:\n{}",
            service.log_tail(40)
        )))
    }

    /// kubectl as the cluster's administrator.
    pub fn kubectl(&self) -> Kubectl {
        Kubectl(self.kubeconfig.clone())
    }

    /// The end of one of the node's logs (`kubelet.log`, `apiserver.log`, ...).
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        let text =
            std::fs::read_to_string(self.dir.path().join("logs").join(name)).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Stops the node and removes what it made on the host.
    pub fn stop(&mut self) {
        self.service.stop();
    }
}

/// `kubectl --kubeconfig FILE`, run to completion.
pub struct Kubectl(pub PathBuf);

impl Kubectl {
    /// stdout, or Err with the command and its stderr.
    pub fn run(&self, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        let mut child = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.0)
            .args(["--request-timeout=20s"])
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            use std::io::Write;
            pipe.write_all(text.as_bytes()).map_err(|e| e.to_string())?;
        }
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }
}
