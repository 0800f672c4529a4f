//! Measuring helpers for benchmarks: process footprints, apiserver writes, NATS traffic,
//! quantiles.

use std::collections::BTreeMap;

/// A process's resident memory (MiB) and CPU time used so far (seconds).
pub fn proc_stat(pid: u32) -> (f64, f64) {
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0;
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

/// A process's proportional set size (MiB): shared pages split among their users.
pub fn pss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// apiserver_request_total of mutating verbs, by resource.
pub async fn apiserver_writes(client: &kube::Client) -> BTreeMap<String, f64> {
    let Ok(request) = http::Request::get("/metrics").body(Vec::new()) else {
        return BTreeMap::new();
    };
    let text = client.request_text(request).await.unwrap_or_default();
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
        *out.entry(res.to_owned()).or_default() += n;
    }
    out
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
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return serde_json::Value::Null;
    };
    let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_once("\r\n\r\n")
        .and_then(|(_, body)| serde_json::from_str(body).ok())
        .unwrap_or(serde_json::Value::Null)
}

/// Messages and bytes the server has received and sent: (in_msgs, out_msgs, in_bytes, out_bytes).
pub fn nats_traffic(port: u16) -> [f64; 4] {
    let v = nats_monitor(port, "/varz");
    ["in_msgs", "out_msgs", "in_bytes", "out_bytes"].map(|k| v[k].as_f64().unwrap_or(0.0))
}

/// Bytes in and out of every connection whose name starts with `prefix`, summed.
pub fn nats_connection_bytes(port: u16, prefix: &str) -> (usize, f64) {
    let v = nats_monitor(port, "/connz?limit=100000");
    let conns = v["connections"].as_array().cloned().unwrap_or_default();
    let mine: Vec<_> = conns
        .iter()
        .filter(|c| c["name"].as_str().is_some_and(|n| n.starts_with(prefix)))
        .collect();
    let bytes = mine
        .iter()
        .map(|c| c["in_bytes"].as_f64().unwrap_or(0.0) + c["out_bytes"].as_f64().unwrap_or(0.0))
        .sum();
    (mine.len(), bytes)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), Some(50.0));
        assert_eq!(quantile(&v, 0.99), Some(99.0));
        assert_eq!(quantile(&v, 1.0), Some(100.0));
        assert_eq!(quantile(&[], 0.5), None);
        assert_eq!(quantile(&[3.0], 0.99), Some(3.0));
    }
}
