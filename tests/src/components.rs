//! The control plane's own components (controller, bridge) as processes against a
//! [`TestEnv`], for the demo and for end-to-end tests.

use std::path::{Path, PathBuf};

use crate::{
    Error, TestEnv,
    process::{Service, free_port},
};

/// Where cargo put the workspace's binaries: next to the running binary, or one level up
/// from a test binary in `deps/`.
pub fn bin_dir() -> Result<PathBuf, Error> {
    let exe = std::env::current_exe()?;
    let mut dir = exe
        .parent()
        .ok_or_else(|| Error::Setup("no directory for the current executable".into()))?
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    Ok(dir)
}

/// `fleetlet-controller` with its log in `dir/controller.log`; `extra` flags appended.
pub fn start_controller(
    env: &TestEnv,
    bin_dir: &Path,
    dir: &Path,
    extra: &[&str],
) -> Result<Service, Error> {
    start_controller_as(env, env.kubeconfig()?, bin_dir, dir, extra)
}

/// [`start_controller`] authenticating with `kubeconfig` instead of the admin's, e.g. a
/// ServiceAccount token from [`crate::chart::ChartInstall`].
pub fn start_controller_as(
    env: &TestEnv,
    kubeconfig: &Path,
    bin_dir: &Path,
    dir: &Path,
    extra: &[&str],
) -> Result<Service, Error> {
    start_component(
        "fleetlet-controller",
        "controller.log",
        env,
        kubeconfig,
        bin_dir,
        dir,
        &[],
        extra,
    )
}

/// The bridge's kubelet API on `listen`, trusting the environment's CA for clients (the
/// apiserver's kubelet client certificate): serving with a certificate issued through a
/// CSR when `csr`, else with the apiserver's own, which that CA signed.
pub fn kubelet_flags(env: &TestEnv, listen: &str, csr: bool) -> Result<Vec<String>, Error> {
    let pki = &env
        .kube
        .as_ref()
        .ok_or_else(|| {
            Error::Setup("the kubelet API needs the environment's kube-apiserver".into())
        })?
        .pki_dir;
    let file = |flag: &str, name: &str| format!("--{flag}={}", pki.join(name).display());
    let mut flags = vec![
        format!("--kubelet-listen={listen}"),
        file("kubelet-client-ca-file", "ca.crt"),
    ];
    if csr {
        flags.push("--kubelet-serving-csr".into());
    } else {
        flags.push(file("kubelet-tls-cert-file", "apiserver.crt"));
        flags.push(file("kubelet-tls-key-file", "apiserver.key"));
    }
    Ok(flags)
}

/// `fleetlet-bridge` with its log in `dir/bridge.log`; `extra` flags appended.
pub fn start_bridge(
    env: &TestEnv,
    bin_dir: &Path,
    dir: &Path,
    extra: &[&str],
) -> Result<Service, Error> {
    start_bridge_as(env, env.kubeconfig()?, bin_dir, dir, extra)
}

/// [`start_bridge`] authenticating with `kubeconfig`.
pub fn start_bridge_as(
    env: &TestEnv,
    kubeconfig: &Path,
    bin_dir: &Path,
    dir: &Path,
    extra: &[&str],
) -> Result<Service, Error> {
    let flags = [
        "--grace-seconds=20",
        "--lease-renew-seconds=10",
        "--resync-seconds=2",
    ];
    start_component(
        "fleetlet-bridge",
        "bridge.log",
        env,
        kubeconfig,
        bin_dir,
        dir,
        &flags,
        extra,
    )
}

/// A control-plane binary with the environment's NATS and `kubeconfig`.
#[allow(clippy::too_many_arguments)]
fn start_component(
    name: &str,
    log: &str,
    env: &TestEnv,
    kubeconfig: &Path,
    bin_dir: &Path,
    dir: &Path,
    flags: &[&str],
    extra: &[&str],
) -> Result<Service, Error> {
    let mut args = vec![
        format!("--nats-url={}", env.nats_url()?),
        "--lease-namespace=fleetlet-system".into(),
    ];
    let metrics = format!("--metrics-addr=127.0.0.1:{}", free_port()?);
    // Defaults in `flags` give way to the same flag in `extra`.
    let flag = |a: &str| a.split('=').next().unwrap_or_default().to_string();
    let overridden: Vec<String> = extra.iter().map(|a| flag(a)).collect();
    args.extend(
        flags
            .iter()
            .copied()
            .chain([metrics.as_str()])
            .filter(|f| !overridden.contains(&flag(f)))
            .chain(extra.iter().copied())
            .map(str::to_string),
    );
    // The leader-election Lease lives there.
    env.apply("apiVersion: v1\nkind: Namespace\nmetadata: { name: fleetlet-system }\n")?;
    Service::spawn_with_env(
        name,
        &bin_dir.join(name),
        &args,
        &[("KUBECONFIG", kubeconfig.display().to_string())],
        dir.join(log),
    )
}

/// `fleetlet-agent` with `config` (TOML) written to `dir/agent.toml` and its log in
/// `dir/agent.log`.
pub fn start_agent(bin_dir: &Path, dir: &Path, config: &str) -> Result<Service, Error> {
    let path = dir.join("agent.toml");
    std::fs::write(&path, config)?;
    Service::spawn(
        "fleetlet-agent",
        &bin_dir.join("fleetlet-agent"),
        &["--config".into(), path.display().to_string()],
        dir.join("agent.log"),
    )
}

/// What test agents that are sent unsigned manifests need in their config: a device owner
/// opting out of signatures. (A `[trust.manifest_keys]` table in a test's extra config
/// still makes the agent require signatures.)
pub const UNSIGNED_OK: &str = "[trust]\nallow_unsigned = true\n";

/// A files-only agent's config for `device` in `dir`: state in `dir/state`, files under
/// `dir/root` (`file.path_prefix`) and only below `allowed_root`, quick heartbeats, drift
/// checks and retries. `nats` is added to the `[nats]` table, `extra` at the end.
pub fn file_agent_config(
    nats_url: &str,
    dir: &Path,
    device: &str,
    allowed_root: &str,
    nats: &str,
    extra: &str,
) -> String {
    // One URL, or a cluster's comma-separated list.
    let urls = nats_url
        .split(',')
        .map(|u| format!("\"{u}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "device_id = \"{device}\"\nstate_dir = \"{state}\"\n[nats]\nurls = [{urls}]\n{nats}\n\
         [reconcile]\nenabled_kinds = [\"file\"]\nheartbeat_interval_seconds = 1\ndrift_interval_seconds = 2\n\
         backoff_initial_ms = 200\nbackoff_max_ms = 1000\n{UNSIGNED_OK}\
         [file]\nallowed_roots = [\"{allowed_root}\"]\npath_prefix = \"{root}\"\n{extra}",
        state = dir.join("state").display(),
        root = dir.join("root").display(),
    )
}

/// The `[trust.manifest_keys]` table an agent needs for the manifest signing key the
/// controller keeps in Secret `name` of `namespace` (`--manifest-signing-secret`), once the
/// controller has created it: what a device owner copies from the Secret.
pub async fn manifest_trust(env: &TestEnv, namespace: &str, name: &str) -> Result<String, Error> {
    manifest_trust_in(env.kube_client().await?, namespace, name).await
}

/// [`manifest_trust`] from the cluster `client` talks to.
pub async fn manifest_trust_in(
    client: kube::Client,
    namespace: &str,
    name: &str,
) -> Result<String, Error> {
    use k8s_openapi::api::core::v1::Secret;
    let api: kube::Api<Secret> = kube::Api::namespaced(client, namespace);
    let secret = crate::eventually(
        &format!("the manifest signing Secret {namespace}/{name}"),
        crate::DEFAULT_TIMEOUT,
        || async {
            api.get_opt(name)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| "not created yet".to_string())
        },
    )
    .await;
    let data = secret.data.unwrap_or_default();
    let text = |k: &str| {
        data.get(k)
            .map(|b| String::from_utf8_lossy(&b.0).trim().to_owned())
            .ok_or_else(|| Error::Setup(format!("Secret {namespace}/{name} has no {k}")))
    };
    Ok(format!(
        "[trust.manifest_keys]\n\"{}\" = \"{}\"\n",
        text(fleetlet_controller::signing::SECRET_KEY_ID)?,
        text(fleetlet_controller::signing::SECRET_PUBLIC_KEY)?,
    ))
}
