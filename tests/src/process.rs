//! Child processes that cannot outlive the test process.
//!
//! Each server runs under a tiny `sh` watchdog that holds the read end of a pipe from us.
//! When we drop the pipe, or the test process dies in any way (panic, abort, SIGKILL), the
//! pipe closes and the watchdog stops the server: SIGTERM, then SIGKILL after a grace period.
//! This needs no unsafe code and no cooperation from the test harness, which never drops
//! statics (shared environments are statics).

use std::{
    fs::File,
    io::{Read, Seek, SeekFrom},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    time::Duration,
};

use crate::Error;

/// Watchdog: fd 3 is our pipe; the server's exit status becomes the watchdog's. The reader
/// ignores INT/TERM/HUP (the server does not: only the reader's disposition changes), so a
/// signal to the whole process group cannot leave a server without its watchdog.
const WATCHDOG: &str = r#"exec 3<&0
"$@" </dev/null 3<&- &
child=$!
{ trap '' INT TERM HUP; read -r _ <&3; kill -TERM "$child" 2>/dev/null; i=0
  while kill -0 "$child" 2>/dev/null && [ "$i" -lt 50 ]; do sleep 0.1; i=$((i+1)); done
  kill -KILL "$child" 2>/dev/null; } &
reader=$!
exec 3<&-
wait "$child"; rc=$?
kill "$reader" 2>/dev/null
exit "$rc"
"#;

/// Removes a directory once our pipe closes and the given processes have exited.
const DIR_REAPER: &str = r#"trap '' INT TERM HUP
read -r _ || true
shift
for p in "$@"; do while kill -0 "$p" 2>/dev/null; do sleep 0.1; done; done
rm -rf "$0"
"#;

/// A server process under a watchdog, with its output in a log file.
pub struct Service {
    pub name: String,
    pub log: PathBuf,
    child: Child,
    pipe: Option<ChildStdin>,
}

impl Service {
    /// Starts `program args...` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, program: &Path, args: &[String], log: PathBuf) -> Result<Self, Error> {
        Self::spawn_with_env(name, program, args, &[], log)
    }

    /// Like [`Service::spawn`], with extra environment variables for the program.
    pub fn spawn_with_env(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, String)],
        log: PathBuf,
    ) -> Result<Self, Error> {
        let out = File::create(&log)?;
        let err = out.try_clone()?;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG)
            .arg(format!("fleetlet-watchdog-{name}"))
            .arg(program)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| Error::Spawn {
                name: name.to_owned(),
                source: e,
            })?;
        let pipe = child.stdin.take();
        tracing::debug!(name, pid = child.id(), "started");
        Ok(Self {
            name: name.to_owned(),
            log,
            child,
            pipe,
        })
    }

    /// The watchdog's pid (the server is its child).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Err if the server has already exited, with the end of its log.
    pub fn check_running(&mut self) -> Result<(), Error> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => Err(Error::Exited {
                name: self.name.clone(),
                status: status.to_string(),
                log_tail: self.log_tail(40),
            }),
        }
    }

    /// The last `lines` lines of the server's log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    /// The program's own pid (the watchdog's child), once it has started.
    pub fn program_pid(&self) -> Option<u32> {
        let w = self.child.id();
        std::fs::read_to_string(format!("/proc/{w}/task/{w}/children"))
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// SIGKILLs the program (not its watchdog), as a power cut or the OOM killer would, and
    /// waits for the wrapper to notice.
    pub fn kill_program(&mut self) -> Result<(), Error> {
        let program = std::path::Path::new(&self.name)
            .file_name()
            .map(|n| n.to_string_lossy().chars().take(15).collect::<String>())
            .unwrap_or_default();
        let status = std::process::Command::new("pkill")
            .args(["-KILL", "-P", &self.child.id().to_string(), "-x", &program])
            .status()?;
        if !status.success() {
            return Err(Error::Setup(format!("no {program} process to kill")));
        }
        self.pipe.take();
        let _ = self.child.wait();
        Ok(())
    }

    /// Stops the server and waits for it.
    pub fn stop(&mut self) {
        self.pipe.take();
        let _ = self.child.wait();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop();
        // A failing test shows what each of its processes said last: a failure on a CI
        // machine is then read from its output, not reproduced.
        if std::thread::panicking() {
            eprintln!(
                "--- last lines of {} ({}):\n{}",
                self.name,
                self.log.display(),
                self.log_tail(30)
            );
        }
    }
}

/// Watches a directory and removes it once the test process is gone or [`DirReaper::reap`]
/// is called, after the listed processes have exited.
pub struct DirReaper {
    child: Child,
    pipe: Option<ChildStdin>,
}

impl DirReaper {
    pub fn spawn(dir: &Path, after: &[u32]) -> Result<Self, Error> {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(DIR_REAPER)
            .arg(dir)
            .arg("--")
            .args(after.iter().map(u32::to_string))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| Error::Spawn {
                name: "dir-reaper".into(),
                source: e,
            })?;
        let pipe = child.stdin.take();
        Ok(Self { child, pipe })
    }

    /// Removes the directory now (once the processes have exited) and waits for that.
    pub fn reap(&mut self) {
        self.pipe.take();
        let _ = self.child.wait();
    }
}

impl Drop for DirReaper {
    fn drop(&mut self) {
        self.reap();
    }
}

pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut bytes = Vec::new();
    let _ = f.read_to_end(&mut bytes);
    let s = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A free TCP port on 127.0.0.1 for a server a test starts (bound, read, released).
///
/// Ports come from below the kernel's ephemeral range, never from it: a port the kernel
/// hands out for `bind(0)` or an outgoing connection can be taken by any other test between
/// this check and the server's own bind (or while a server is stopped to be restarted on
/// the same port). Within one process no port is handed out twice.
pub fn free_port() -> Result<u16, Error> {
    use std::sync::{Mutex, OnceLock};
    static NEXT: OnceLock<Mutex<u32>> = OnceLock::new();
    let (low, high) = port_pool();
    let span = u32::from(high - low);
    let next = NEXT.get_or_init(|| {
        // Processes running side by side start at different places in the pool.
        let seed = std::process::id().wrapping_mul(7919)
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
        Mutex::new(seed % span)
    });
    let mut next = next.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..span {
        let port = low + (*next % span) as u16;
        *next = (*next + 1) % span;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    // The pool is exhausted: fall back to the kernel's choice.
    let l = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    Ok(l.local_addr()?.port())
}

/// The ports [`free_port`] hands out: the 8192 below the ephemeral range (Linux default
/// 32768–60999, `net.ipv4.ip_local_port_range`).
fn port_pool() -> (u16, u16) {
    let low_ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .filter(|p| *p > 10_000)
        .unwrap_or(32_768);
    (low_ephemeral - 8192, low_ephemeral)
}

/// Waits until `check` succeeds, the service dies, or `timeout` passes.
pub async fn wait_until<F, Fut>(
    what: &str,
    service: &mut Service,
    timeout: Duration,
    mut check: F,
) -> Result<(), Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        service.check_running()?;
        let last = match check().await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::NotReady {
                what: what.to_owned(),
                waited: timeout,
                last_error: last,
                log_tail: service.log_tail(40),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
