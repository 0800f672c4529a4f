//! What ships, built the way a user builds it: `scripts/dist`'s static binaries and
//! `scripts/release` to an OCI registry.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use crate::{Binaries, Error, chart::checked, repo_root};

/// Builds the static binaries once per test binary with `scripts/dist --profile dist-check`
/// (unoptimised; release builds use the same targets and flags) in `target/dist-check/`,
/// and returns scripts/dist's output directory.
pub fn dist_check() -> Result<&'static Path, Error> {
    static OUT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let out = OUT.get_or_init(|| {
        let target = repo_root().join("target").join("dist-check");
        let out = target.join("out");
        let mut cmd = Command::new(repo_root().join("scripts/dist"));
        cmd.args(["--profile", "dist-check", "--out"])
            .arg(&out)
            .args(["--control-targets", "x86_64-unknown-linux-musl"])
            .env("CARGO_TARGET_DIR", &target);
        checked("scripts/dist", cmd)
            .map(|_| out)
            .map_err(|e| e.to_string())
    });
    out.as_deref().map_err(|e| Error::Setup(e.clone()))
}

/// `scripts/release --registry REGISTRY --plain-http --arch amd64 --version VERSION` from the
/// binaries in `dist`, with its artifacts in `out` and helm's state under `helm_home`;
/// `podman_env` points podman at the storage to build in. Returns what it printed.
pub fn release(
    registry: &str,
    version: &str,
    dist: &Path,
    out: &Path,
    helm_home: &Path,
    podman_env: &[(String, String)],
) -> Result<String, Error> {
    let mut release = Command::new(repo_root().join("scripts/release"));
    release
        .args(["--registry", registry, "--plain-http", "--arch", "amd64"])
        .args(["--version", version, "--dist"])
        .arg(dist)
        .arg("--out")
        .arg(out)
        .current_dir(repo_root())
        .envs(podman_env.iter().map(|(k, v)| (k, v)))
        .env("HELM", &Binaries::locate()?.helm)
        .env("HELM_CACHE_HOME", helm_home.join("cache"))
        .env("HELM_CONFIG_HOME", helm_home.join("config"))
        .env("HELM_DATA_HOME", helm_home.join("data"));
    let done = checked("scripts/release", release)?;
    Ok(String::from_utf8_lossy(&done.stdout).into_owned())
}
