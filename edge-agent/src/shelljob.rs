//! The ShellJob escape hatch: a command run once per spec, on devices whose owner enabled it.
//!
//! Nothing the control plane sends can enable it: the kind must be listed in the device's
//! own `reconcile.enabled_kinds`. The command is an argv run without a shell (unless argv[0]
//! is one), at most once per (resource id, spec): the run is recorded before it starts, so
//! an agent that dies mid-run does not run it again. Each run is written to an append-only
//! audit log and logged under the `fleetlet::audit` target.

use std::{
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use fleetlet_protocol::{DeviceId, ResourceDetails, ResourceId, ShellJobSpec, Timestamp};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncRead, AsyncReadExt},
    process::Child,
    task::JoinHandle,
    time::error::Elapsed,
};
use tracing::{info, warn};

use crate::{
    config::{ConfigError, invalid},
    file::sha256_hex,
    fsutil::{Ownership, write_atomic},
    reconciler::{Deleted, Observation, ReconcileError, Reconciler},
};

/// What the agent remembers about a job's run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RunRecord {
    spec_hash: String,
    started_at: Timestamp,
    /// Absent while running, or if the agent stopped before the job finished.
    finished_at: Option<Timestamp>,
    exit_code: Option<i32>,
    timed_out: bool,
    output: String,
    output_truncated: bool,
}

impl RunRecord {
    /// A run starting now.
    fn starting(spec_hash: String) -> Self {
        Self {
            spec_hash,
            started_at: Timestamp::now(),
            finished_at: None,
            exit_code: None,
            timed_out: false,
            output: String::new(),
            output_truncated: false,
        }
    }
    fn details(&self) -> ResourceDetails {
        ResourceDetails::ShellJob {
            spec_hash: self.spec_hash.clone(),
            exit_code: self.exit_code,
            timed_out: self.timed_out,
            started_at: self.started_at,
            finished_at: self.finished_at.unwrap_or(self.started_at),
            output: self.output.clone(),
            output_truncated: self.output_truncated,
        }
    }

    /// Ready when the job exited 0; otherwise a failure that stays until the spec changes.
    fn verdict(&self) -> Result<ResourceDetails, ReconcileError> {
        let tail = |s: &str| {
            let t: String = s
                .chars()
                .rev()
                .take(200)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            if t.is_empty() {
                String::new()
            } else {
                format!(": {}", t.trim())
            }
        };
        match (self.finished_at, self.exit_code, self.timed_out) {
            (Some(_), Some(0), false) => Ok(self.details()),
            (None, _, _) => Err(ReconcileError::Finished(
                "the agent stopped while this job ran; its outcome is unknown and it is not run again for this spec".into(),
            )),
            (Some(_), _, true) => Err(ReconcileError::Finished(format!(
                "timed out and was killed{}",
                tail(&self.output)
            ))),
            (Some(_), Some(code), _) => Err(ReconcileError::Finished(format!(
                "exited with code {code}{}",
                tail(&self.output)
            ))),
            (Some(_), None, _) => Err(ReconcileError::Finished(format!(
                "killed by a signal{}",
                tail(&self.output)
            ))),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ShellJobReconciler {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: ShellJobConfig,
    device: DeviceId,
    dir: PathBuf,
    audit: PathBuf,
    audit_lock: Mutex<()>,
}

pub fn spec_hash(spec: &ShellJobSpec) -> String {
    sha256_hex(&serde_json::to_vec(spec).unwrap_or_default())[..32].to_owned()
}

/// Collects output up to `limit` bytes and keeps draining (so the child never blocks).
async fn drain(mut r: impl AsyncRead + Unpin, buf: Arc<Mutex<(Vec<u8>, bool)>>, limit: usize) {
    let mut chunk = [0u8; 4096];
    loop {
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if let Ok(mut b) = buf.lock() {
                    let room = limit.saturating_sub(b.0.len());
                    if n > room {
                        b.1 = true;
                    }
                    let take = n.min(room);
                    b.0.extend_from_slice(&chunk[..take]);
                }
            }
        }
    }
}

impl ShellJobReconciler {
    pub fn new(config: ShellJobConfig, device: DeviceId, state_dir: &Path) -> Self {
        let audit = config
            .audit_log
            .clone()
            .unwrap_or_else(|| state_dir.join("shell-jobs.log"));
        Self {
            inner: Arc::new(Inner {
                config,
                device,
                dir: state_dir.join("shell-jobs"),
                audit,
                audit_lock: Mutex::new(()),
            }),
        }
    }

    fn record_path(&self, id: &ResourceId) -> PathBuf {
        self.inner.dir.join(format!("{id}.json"))
    }

    fn load(&self, id: &ResourceId) -> Option<RunRecord> {
        let bytes = std::fs::read(self.record_path(id)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn save(&self, id: &ResourceId, r: &RunRecord) -> Result<(), ReconcileError> {
        std::fs::create_dir_all(&self.inner.dir)
            .map_err(|e| ReconcileError::io("creating the job record directory", e))?;
        let bytes = serde_json::to_vec(r)
            .map_err(|e| ReconcileError::Runtime(format!("encoding job record: {e}")))?;
        write_atomic(&self.record_path(id), &bytes, 0o600, Ownership::default())
            .map_err(|e| ReconcileError::io("writing the job record", e))
    }

    fn audit(&self, line: serde_json::Value) {
        let _guard = self.inner.audit_lock.lock();
        let result = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.inner.audit)
            .and_then(|mut f| {
                let mut bytes = serde_json::to_vec(&line).unwrap_or_default();
                bytes.push(b'\n');
                f.write_all(&bytes)?;
                f.sync_data()
            });
        if let Err(e) = result {
            warn!(path = %self.inner.audit.display(), error = %e, "could not write the shell job audit log");
        }
    }

    fn timeout(&self, spec: &ShellJobSpec) -> Result<Duration, ReconcileError> {
        let c = &self.inner.config;
        let secs = spec.timeout_seconds.unwrap_or(c.default_timeout_seconds);
        if secs == 0 || secs > c.max_timeout_seconds {
            return Err(ReconcileError::Invalid(format!(
                "timeoutSeconds {secs}: this device allows 1 to {}",
                c.max_timeout_seconds
            )));
        }
        Ok(Duration::from_secs(u64::from(secs)))
    }

    /// Runs the job once, recording the run before it starts and its outcome after, and
    /// auditing both.
    async fn run(
        &self,
        id: &ResourceId,
        spec: &ShellJobSpec,
        hash: String,
    ) -> Result<RunRecord, ReconcileError> {
        let timeout = self.timeout(spec)?;
        let (program, args) = argv(spec)?;
        let mut record = RunRecord::starting(hash);
        // Recorded before it starts: at most once, even across a crash.
        self.save(id, &record)?;
        info!(
            target: "fleetlet::audit",
            device = %self.inner.device,
            resource = %id,
            argv = ?spec.command,
            spec_hash = %record.spec_hash,
            "shell job starting"
        );
        let started = std::time::Instant::now();
        let status = self.execute(program, args, timeout, &mut record).await;
        record.exit_code = status.and_then(|s| s.code());
        record.finished_at = Some(Timestamp::now());
        self.save(id, &record)?;
        self.report(id, spec, &record, started);
        Ok(record)
    }

    /// Runs the command in a process group of its own, its output going to `record`.
    /// `None` when it could not start, timed out or could not be waited for.
    async fn execute(
        &self,
        program: &str,
        args: &[String],
        timeout: Duration,
        record: &mut RunRecord,
    ) -> Option<ExitStatus> {
        let spawned = tokio::process::Command::new(program)
            .args(args)
            .current_dir(&self.inner.config.working_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0)
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                record.output = format!("could not start {program:?}: {e}");
                return None;
            }
        };
        let output = OutputReaders::start(&mut child, self.inner.config.max_output_bytes);
        let status = match wait_or_kill(&mut child, timeout).await {
            Ok(status) => status,
            Err(_) => {
                record.timed_out = true;
                None
            }
        };
        output.finish(record).await;
        status
    }

    /// Logs the finished run under `fleetlet::audit` and appends it to the audit log.
    fn report(
        &self,
        id: &ResourceId,
        spec: &ShellJobSpec,
        record: &RunRecord,
        started: std::time::Instant,
    ) {
        let elapsed_ms = started.elapsed().as_millis() as u64;
        info!(
            target: "fleetlet::audit",
            device = %self.inner.device,
            resource = %id,
            exit_code = record.exit_code,
            timed_out = record.timed_out,
            elapsed_ms,
            "shell job finished"
        );
        self.audit(serde_json::json!({
            "at": record.started_at,
            "device": self.inner.device,
            "resource": id,
            "argv": spec.command,
            "specHash": record.spec_hash,
            "exitCode": record.exit_code,
            "timedOut": record.timed_out,
            "durationMs": elapsed_ms,
            "outputBytes": record.output.len(),
            "outputTruncated": record.output_truncated,
        }));
    }
}

/// The program to run and its arguments; an empty program or a NUL byte is refused.
fn argv(spec: &ShellJobSpec) -> Result<(&String, &[String]), ReconcileError> {
    let Some((program, args)) = spec.command.split_first() else {
        return Err(ReconcileError::Invalid("shellJob.command is empty".into()));
    };
    if program.is_empty() || spec.command.iter().any(|a| a.contains('\0')) {
        return Err(ReconcileError::Invalid(
            "shellJob.command has an empty program or a NUL byte".into(),
        ));
    }
    Ok((program, args))
}

/// Waits for `child` up to `timeout`; past it, kills its whole process group (the children
/// it left running too). `Ok(None)` when waiting failed.
async fn wait_or_kill(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>, Elapsed> {
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(s) => Ok(s.ok()),
        Err(elapsed) => {
            if let Some(pid) = child
                .id()
                .and_then(|p| rustix::process::Pid::from_raw(p as i32))
            {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
            let _ = child.kill().await;
            Err(elapsed)
        }
    }
}

/// A job's stdout and stderr, read together into one buffer of at most `limit` bytes.
struct OutputReaders {
    buf: Arc<Mutex<(Vec<u8>, bool)>>,
    readers: Vec<JoinHandle<()>>,
}

impl OutputReaders {
    fn start(child: &mut Child, limit: usize) -> Self {
        let buf = Arc::new(Mutex::new((Vec::new(), false)));
        let out = child
            .stdout
            .take()
            .map(|r| tokio::spawn(drain(r, buf.clone(), limit)));
        let err = child
            .stderr
            .take()
            .map(|r| tokio::spawn(drain(r, buf.clone(), limit)));
        Self {
            buf,
            readers: [out, err].into_iter().flatten().collect(),
        }
    }

    /// Puts what was read in `record`, once the readers end: when every process holding
    /// the pipes has gone, or after 2 seconds each.
    async fn finish(self, record: &mut RunRecord) {
        for t in self.readers {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
        if let Ok(b) = self.buf.lock() {
            record.output = String::from_utf8_lossy(&b.0).into_owned();
            record.output_truncated = b.1;
        }
    }
}

impl Reconciler for ShellJobReconciler {
    type Spec = ShellJobSpec;

    async fn observe(
        &self,
        id: &ResourceId,
        spec: &ShellJobSpec,
    ) -> Result<Observation, ReconcileError> {
        let hash = spec_hash(spec);
        match self.load(id) {
            Some(r) if r.spec_hash == hash => r.verdict().map(Observation::InSync),
            _ => Ok(Observation::Absent),
        }
    }

    async fn reconcile(
        &self,
        id: &ResourceId,
        spec: &ShellJobSpec,
    ) -> Result<ResourceDetails, ReconcileError> {
        let hash = spec_hash(spec);
        if let Some(r) = self.load(id).filter(|r| r.spec_hash == hash) {
            return r.verdict();
        }
        self.run(id, spec, hash).await?.verdict()
    }

    async fn delete(
        &self,
        id: &ResourceId,
        _applied: &ShellJobSpec,
    ) -> Result<Deleted, ReconcileError> {
        // A job's effects cannot be undone; forgetting the record lets a re-added job run.
        match std::fs::remove_file(self.record_path(id)) {
            Ok(()) => Ok(Deleted::Removed),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Deleted::AlreadyGone),
            Err(e) => Err(ReconcileError::io("removing the job record", e)),
        }
    }

    fn moves(&self, _old: &ShellJobSpec, _new: &ShellJobSpec) -> bool {
        false
    }
}

// ---------------------------------------------------------------- configuration

/// The ShellJob escape hatch. It runs only when the device owner adds `shellJob` to
/// `reconcile.enabled_kinds`; nothing the control plane sends can turn it on.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShellJobConfig {
    /// Used when a job sets no timeout.
    #[serde(default = "default_job_run_timeout")]
    pub default_timeout_seconds: u32,
    /// A job asking for more is refused.
    #[serde(default = "default_job_max_timeout")]
    pub max_timeout_seconds: u32,
    /// Output kept in status (stdout and stderr together); the rest is cut.
    #[serde(default = "default_job_output")]
    pub max_output_bytes: usize,
    /// Working directory of jobs.
    #[serde(default = "default_job_dir")]
    pub working_dir: PathBuf,
    /// Append-only audit log, one JSON line per run; default `<state_dir>/shell-jobs.log`.
    #[serde(default)]
    pub audit_log: Option<PathBuf>,
}

fn default_job_run_timeout() -> u32 {
    300
}

fn default_job_max_timeout() -> u32 {
    3600
}

fn default_job_output() -> usize {
    2048
}

fn default_job_dir() -> PathBuf {
    PathBuf::from("/")
}

impl Default for ShellJobConfig {
    fn default() -> Self {
        Self {
            default_timeout_seconds: default_job_run_timeout(),
            max_timeout_seconds: default_job_max_timeout(),
            max_output_bytes: default_job_output(),
            working_dir: default_job_dir(),
            audit_log: None,
        }
    }
}

impl ShellJobConfig {
    /// Timeouts are ordered, output fits in a status, the working directory is absolute.
    pub(crate) fn check(&self) -> Result<(), ConfigError> {
        if self.default_timeout_seconds == 0
            || self.max_timeout_seconds < self.default_timeout_seconds
        {
            return Err(invalid(
                "shell_job.default_timeout_seconds",
                "must be at least 1 and at most max_timeout_seconds",
            ));
        }
        if self.max_output_bytes > 16 * 1024 {
            return Err(invalid(
                "shell_job.max_output_bytes",
                "at most 16384: output travels in the device's status",
            ));
        }
        if !self.working_dir.is_absolute() {
            return Err(invalid("shell_job.working_dir", "must be an absolute path"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn reconciler(dir: &Path, max_output: usize) -> ShellJobReconciler {
        let config = ShellJobConfig {
            max_output_bytes: max_output,
            max_timeout_seconds: 5,
            default_timeout_seconds: 5,
            ..Default::default()
        };
        ShellJobReconciler::new(config, DeviceId::new("pi-1").unwrap(), dir)
    }

    fn job(argv: &[&str], timeout: Option<u32>) -> ShellJobSpec {
        ShellJobSpec {
            command: argv.iter().map(|s| s.to_string()).collect(),
            timeout_seconds: timeout,
        }
    }

    #[tokio::test]
    async fn runs_once_per_spec_and_reports_output() {
        let dir = tempfile::tempdir().unwrap();
        let r = reconciler(dir.path(), 2048);
        let id = ResourceId::new("count").unwrap();
        let counter = dir.path().join("runs");
        let script = format!(
            "echo run >> {}; echo hello; echo oops >&2",
            counter.display()
        );
        let spec = job(&["/bin/sh", "-c", &script], None);
        assert_eq!(r.observe(&id, &spec).await.unwrap(), Observation::Absent);
        let d = r.reconcile(&id, &spec).await.unwrap();
        let ResourceDetails::ShellJob {
            exit_code, output, ..
        } = &d
        else {
            panic!("{d:?}")
        };
        assert_eq!(*exit_code, Some(0));
        assert!(
            output.contains("hello") && output.contains("oops"),
            "{output:?}"
        );
        // Reconciling and observing again does not run it again.
        r.reconcile(&id, &spec).await.unwrap();
        assert!(matches!(
            r.observe(&id, &spec).await.unwrap(),
            Observation::InSync(_)
        ));
        assert_eq!(std::fs::read_to_string(&counter).unwrap(), "run\n");
        // A new spec runs again.
        let spec2 = job(&["/bin/sh", "-c", &format!("{script}; true")], None);
        assert_eq!(r.observe(&id, &spec2).await.unwrap(), Observation::Absent);
        r.reconcile(&id, &spec2).await.unwrap();
        assert_eq!(std::fs::read_to_string(&counter).unwrap(), "run\nrun\n");
        let audit = std::fs::read_to_string(dir.path().join("shell-jobs.log")).unwrap();
        assert_eq!(audit.lines().count(), 2, "{audit}");
        assert!(audit.contains("\"exitCode\":0"), "{audit}");
    }

    #[tokio::test]
    async fn failure_timeout_and_truncation_are_reported_and_not_retried() {
        let dir = tempfile::tempdir().unwrap();
        let r = reconciler(dir.path(), 16);
        let id = ResourceId::new("j").unwrap();
        let fail = job(&["/bin/sh", "-c", "echo 0123456789abcdefXYZ; exit 3"], None);
        let e = r.reconcile(&id, &fail).await.unwrap_err();
        assert!(!e.is_retryable());
        assert!(e.to_string().contains("exited with code 3"), "{e}");
        let rec = r.load(&id).unwrap();
        assert!(rec.output_truncated);
        assert_eq!(rec.output, "0123456789abcdef");
        assert!(
            r.observe(&id, &fail).await.is_err(),
            "a failed run stays failed"
        );

        // The whole process group is killed: the shell and the child it left running.
        let pidfile = dir.path().join("bg.pid");
        let script = format!("sleep 30 & echo $! > {}; sleep 30", pidfile.display());
        let slow = job(&["/bin/sh", "-c", &script], Some(1));
        let started = std::time::Instant::now();
        let e = r.reconcile(&id, &slow).await.unwrap_err();
        assert!(e.to_string().contains("timed out"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(10));
        let pid: u32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // Gone, or a zombie waiting for whoever adopted it to reap it: not running.
        let running = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    let state = s.rsplit_once(") ")?.1.chars().next()?;
                    Some(state != 'Z' && state != 'X')
                })
                .unwrap_or(false)
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while running() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(!running(), "the background child {pid} still runs");

        let too_long = job(&["/bin/true"], Some(3600));
        assert!(matches!(
            r.reconcile(&id, &too_long).await.unwrap_err(),
            ReconcileError::Invalid(_)
        ));
        let missing = job(&["/nonexistent/program"], None);
        let e = r.reconcile(&id, &missing).await.unwrap_err();
        assert!(e.to_string().contains("could not start"), "{e}");
    }

    #[tokio::test]
    async fn a_run_cut_short_by_a_crash_is_not_repeated() {
        let dir = tempfile::tempdir().unwrap();
        let r = reconciler(dir.path(), 64);
        let id = ResourceId::new("j").unwrap();
        let counter = dir.path().join("runs");
        let script = format!("echo run >> {}", counter.display());
        let spec = job(&["/bin/sh", "-c", &script], None);
        let half = RunRecord {
            spec_hash: spec_hash(&spec),
            started_at: Timestamp::now(),
            finished_at: None,
            exit_code: None,
            timed_out: false,
            output: String::new(),
            output_truncated: false,
        };
        r.save(&id, &half).unwrap();
        let e = r.reconcile(&id, &spec).await.unwrap_err();
        assert!(e.to_string().contains("outcome is unknown"), "{e}");
        r.reconcile(&id, &spec).await.unwrap_err();
        assert!(!counter.exists(), "the command did not run again");
        // The same command under a new spec runs, once: the side effect is visible.
        let spec2 = job(&["/bin/sh", "-c", &format!("{script}; true")], None);
        r.reconcile(&id, &spec2).await.unwrap();
        assert_eq!(std::fs::read_to_string(&counter).unwrap(), "run\n");
    }
}
