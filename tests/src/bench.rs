//! Measuring helpers for benchmarks: process footprints, apiserver writes, NATS traffic,
//! quantiles.

use std::{collections::BTreeMap, path::PathBuf};

use crate::repo_root;

/// Where results go: `target/fleetlet-bench`, or `FLEETLET_BENCH_OUT` (a run that must
/// not replace them, such as scripts/heap-profile's).
pub fn out_dir() -> PathBuf {
    std::env::var_os("FLEETLET_BENCH_OUT")
        .map_or_else(|| repo_root().join("target/fleetlet-bench"), PathBuf::from)
}

/// The release binary `name`: in `FLEETLET_BENCH_BIN_DIR`, or `target/release`.
pub fn bin(name: &str) -> PathBuf {
    std::env::var_os("FLEETLET_BENCH_BIN_DIR")
        .map_or_else(|| repo_root().join("target/release"), PathBuf::from)
        .join(name)
}

/// A process's resident memory (MiB) and CPU time used so far (seconds).
pub fn proc_stat(pid: u32) -> (f64, f64) {
    let rss = proc_mib(pid, "status", "VmRSS:");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime, in clock ticks (100 per second on Linux).
    (rss, (field(11) + field(12)) / 100.0)
}

/// The most a process has had resident since it started (MiB, `VmHWM`): what a host must
/// have for it, whenever a sample of its current size happens to be taken.
pub fn peak_rss_mib(pid: u32) -> f64 {
    proc_mib(pid, "status", "VmHWM:")
}

/// A process's proportional set size (MiB): shared pages split among their users.
pub fn pss_mib(pid: u32) -> f64 {
    proc_mib(pid, "smaps_rollup", "Pss:")
}

/// The `<field> N kB` line of `/proc/<pid>/<file>`, in MiB (0 when the process or the
/// line is not there).
fn proc_mib(pid: u32, file: &str, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// apiserver_request_total of mutating verbs, by resource. Requests the apiserver answered
/// with an error (a 429 from its flow control, a conflict, a timeout) changed nothing: they
/// are counted apart, as `<resource> refused (<code>)`; see [`accepted`].
pub async fn apiserver_writes(client: &kube::Client) -> BTreeMap<String, f64> {
    let Ok(request) = http::Request::get("/metrics").body(Vec::new()) else {
        return BTreeMap::new();
    };
    let text = client.request_text(request).await.unwrap_or_default();
    writes_in(&text)
}

/// [`apiserver_writes`] from the text of the apiserver's `/metrics`.
fn writes_in(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for l in text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        if !["APPLY", "PATCH", "PUT", "POST", "DELETE"]
            .iter()
            .any(|v| l.contains(&format!("verb=\"{v}\"")))
        {
            continue;
        }
        let Some(res) = l
            .split("resource=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
        else {
            continue;
        };
        let n: f64 = l
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let code = l
            .split("code=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or("");
        let key = if code.starts_with('2') {
            res.to_owned()
        } else {
            format!("{res} refused ({code})")
        };
        *out.entry(key).or_default() += n;
    }
    out
}

/// Whether a key of [`apiserver_writes`] counts writes the apiserver made, not refusals.
pub fn accepted(key: &str) -> bool {
    !key.contains(" refused (")
}

/// Per-key difference of two counter snapshots.
pub fn delta(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v > 0.0)
        .collect()
}

/// A JSON document from nats-server's monitoring port (`/varz`, `/connz?...`).
pub fn nats_monitor(port: u16, path: &str) -> serde_json::Value {
    serde_json::from_str(&local_get(port, path)).unwrap_or(serde_json::Value::Null)
}

/// The body of an HTTP GET of `path` on a local port (empty when it cannot be had).
pub fn local_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}

/// Messages and bytes the server has received and sent: (in_msgs, out_msgs, in_bytes, out_bytes).
pub fn nats_traffic(port: u16) -> [f64; 4] {
    let v = nats_monitor(port, "/varz");
    ["in_msgs", "out_msgs", "in_bytes", "out_bytes"].map(|k| v[k].as_f64().unwrap_or(0.0))
}

/// Every connection whose name starts with `prefix`, as nats-server's `/connz` shows it.
fn nats_connections(port: u16, prefix: &str) -> Vec<serde_json::Value> {
    let mut v = nats_monitor(port, "/connz?limit=100000");
    let conns = v["connections"].take();
    let serde_json::Value::Array(conns) = conns else {
        return Vec::new();
    };
    conns
        .into_iter()
        .filter(|c| c["name"].as_str().is_some_and(|n| n.starts_with(prefix)))
        .collect()
}

/// Bytes in and out of every connection whose name starts with `prefix`, summed.
pub fn nats_connection_bytes(port: u16, prefix: &str) -> (usize, f64) {
    let mine = nats_connections(port, prefix);
    let bytes = mine
        .iter()
        .map(|c| c["in_bytes"].as_f64().unwrap_or(0.0) + c["out_bytes"].as_f64().unwrap_or(0.0))
        .sum();
    (mine.len(), bytes)
}

/// Messages each connection whose name starts with `prefix` has sent the server, by its
/// connection id.
pub fn nats_connection_msgs(port: u16, prefix: &str) -> BTreeMap<u64, f64> {
    nats_connections(port, prefix)
        .iter()
        .filter_map(|c| Some((c["cid"].as_u64()?, c["in_msgs"].as_f64().unwrap_or(0.0))))
        .collect()
}

/// The `q` quantile (0..=1) of `values` (nearest rank), or None when empty.
pub fn quantile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v.get(rank - 1).copied()
}

/// The fleet sizes to measure: `FLEETLET_BENCH_DEVICES` (comma-separated), else `default`.
pub fn fleet_sizes(default: &str) -> Vec<usize> {
    std::env::var("FLEETLET_BENCH_DEVICES")
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

/// A server process a benchmark started, killed and reaped when dropped.
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

/// Creates each of `names` (benchmarks start from an empty apiserver). Panics on failure:
/// a benchmark cannot go on without them.
pub async fn create_namespaces(client: &kube::Client, names: &[&str]) {
    let api: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(client.clone());
    for name in names {
        let ns = serde_json::from_value(serde_json::json!({ "metadata": { "name": name } }))
            .expect("a namespace object");
        api.create(&kube::api::PostParams::default(), &ns)
            .await
            .expect("creating a namespace");
    }
}

/// Creates `n` EdgeDevices in `namespace`, device `i` with `metadata` (name, labels) from
/// `metadata(i)`, 32 requests at a time; returns the seconds it took.
pub async fn create_devices(
    client: &kube::Client,
    namespace: &str,
    n: usize,
    metadata: impl Fn(usize) -> serde_json::Value,
) -> f64 {
    use futures::StreamExt;
    let api: kube::Api<fleetlet_crds::EdgeDevice> =
        kube::Api::namespaced(client.clone(), namespace);
    let started = std::time::Instant::now();
    let objects: Vec<fleetlet_crds::EdgeDevice> = (0..n)
        .map(|i| {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "fleetlet.dev/v1alpha1", "kind": "EdgeDevice",
                "metadata": metadata(i), "spec": {}
            }))
            .expect("an EdgeDevice")
        })
        .collect();
    futures::stream::iter(objects)
        .map(|d| {
            let api = api.clone();
            async move {
                api.create(&kube::api::PostParams::default(), &d)
                    .await
                    .expect("creating an EdgeDevice");
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    started.elapsed().as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_apiserver_refused_are_counted_apart() {
        let text = r#"apiserver_request_total{code="200",component="apiserver",dry_run="",group="coordination.k8s.io",resource="leases",scope="namespace",subresource="",verb="APPLY",version="v1"} 40
apiserver_request_total{code="201",component="apiserver",dry_run="",group="coordination.k8s.io",resource="leases",scope="namespace",subresource="",verb="APPLY",version="v1"} 2
apiserver_request_total{code="429",component="apiserver",dry_run="",group="coordination.k8s.io",resource="leases",scope="namespace",subresource="",verb="APPLY",version="v1"} 5
apiserver_request_total{code="200",component="apiserver",dry_run="",group="coordination.k8s.io",resource="leases",scope="namespace",subresource="",verb="GET",version="v1"} 900
apiserver_request_total{code="200",component="apiserver",dry_run="",group="",resource="nodes",scope="resource",subresource="status",verb="PATCH",version="v1"} 7"#;
        let w = writes_in(text);
        assert_eq!(
            w,
            [
                ("leases".to_owned(), 42.0),
                ("leases refused (429)".to_owned(), 5.0),
                ("nodes".to_owned(), 7.0)
            ]
            .into()
        );
        let accepted: f64 = w.iter().filter(|(k, _)| accepted(k)).map(|(_, v)| v).sum();
        assert_eq!(accepted, 49.0);
    }

    #[test]
    fn quantiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), Some(50.0));
        assert_eq!(quantile(&v, 0.99), Some(99.0));
        assert_eq!(quantile(&v, 1.0), Some(100.0));
        assert_eq!(quantile(&[], 0.5), None);
        assert_eq!(quantile(&[3.0], 0.99), Some(3.0));
    }

    #[test]
    fn this_process_has_resident_memory_and_its_peak_is_no_lower() {
        let me = std::process::id();
        // Touch 64 MiB so the peak is at least that, whatever was resident before.
        let block = vec![1u8; 64 << 20];
        assert!(block.iter().step_by(4096).all(|b| *b == 1));
        let (rss, _) = proc_stat(me);
        let peak = peak_rss_mib(me);
        assert!(rss >= 64.0, "{rss}");
        assert!(peak >= rss, "{peak} < {rss}");
        assert!(pss_mib(me) > 0.0);
        drop(block);
        // The peak remembers the block once it is gone.
        assert!(peak_rss_mib(me) >= 64.0);
        // No such process: 0, not a panic.
        assert_eq!(peak_rss_mib(u32::MAX), 0.0);
    }
}
