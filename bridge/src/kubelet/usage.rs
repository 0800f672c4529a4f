//! `/metrics/resource` and `/stats/summary`: a device's resource usage as a kubelet reports
//! it, so metrics-server (and so `kubectl top node` / `kubectl top pod`) sees fleetlet
//! nodes. Served on a node's own port only (see [`super::ports`]): the request does not
//! say which node it is for. The figures come from the device's agent on request
//! ([`fleetlet_protocol::stats`]); Pods are matched to its containers by resource id.

use std::{fmt::Write as _, sync::Arc, time::Duration};

use axum::{
    Extension,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use fleetlet_crds::naming::container_id;
use fleetlet_protocol::{
    relay::{self, StatsRequest},
    stats::{DeviceStats, MAX_STATS_BYTES, Usage},
};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use serde_json::{Value, json};

use super::{
    Ctx, Identity, ServedNode, authorize_on, node_device, not_a_fleetlet_node,
    session::{Frame, Session, session_id},
    text,
};

/// How long a scrape waits for the device: less than the shortest scrape timeout
/// metrics-server accepts with its shortest resolution (5 s), so the scraper hears why.
const DEVICE_TIMEOUT: Duration = Duration::from_secs(4);

/// One container of a Pod on the node, with its figures.
pub struct PodUsage<'a> {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub containers: Vec<(String, &'a fleetlet_protocol::stats::ContainerStats)>,
}

/// The Pods bound to `node` whose containers the sample has figures for.
pub fn pods_on<'a>(pods: &[Arc<Pod>], node: &str, stats: &'a DeviceStats) -> Vec<PodUsage<'a>> {
    let mut out: Vec<PodUsage<'a>> = pods
        .iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
        .filter_map(|p| {
            let (ns, name) = (p.namespace().unwrap_or_default(), p.name_any());
            let containers: Vec<_> = p
                .spec
                .as_ref()?
                .containers
                .iter()
                .enumerate()
                .filter_map(|(i, c)| {
                    let id = container_id(&ns, &name, i, &c.name)?;
                    let s = stats.containers.iter().find(|s| s.resource == id)?;
                    Some((c.name.clone(), s))
                })
                .collect();
            (!containers.is_empty()).then(|| PodUsage {
                uid: p.uid().unwrap_or_default(),
                namespace: ns,
                name,
                containers,
            })
        })
        .collect();
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out
}

fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// One metric family of `/metrics/resource`: its name, type, help and samples (labels,
/// value).
struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    samples: Vec<(String, String)>,
}

/// The kubelet's `/metrics/resource` (Prometheus text format 0.0.4), with the sample's
/// time as every point's timestamp, as a kubelet gives it.
pub fn resource_metrics(stats: &DeviceStats, pods: &[PodUsage<'_>]) -> String {
    let node = |v: String| vec![(String::new(), v)];
    let per_container = |f: &dyn Fn(&fleetlet_protocol::stats::ContainerStats) -> String| {
        pods.iter()
            .flat_map(|p| {
                p.containers.iter().map(move |(c, s)| {
                    let labels = format!(
                        "{{container=\"{}\",namespace=\"{}\",pod=\"{}\"}}",
                        escape(c),
                        escape(&p.namespace),
                        escape(&p.name)
                    );
                    (labels, f(s))
                })
            })
            .collect::<Vec<_>>()
    };
    let per_pod = |f: fn(&Usage) -> u64, show: fn(u64) -> String| {
        pods.iter()
            .map(|p| {
                let labels = format!(
                    "{{namespace=\"{}\",pod=\"{}\"}}",
                    escape(&p.namespace),
                    escape(&p.name)
                );
                let total = p.containers.iter().map(|(_, s)| f(&s.usage)).sum();
                (labels, show(total))
            })
            .collect::<Vec<_>>()
    };
    let secs = |ns: u64| seconds(ns).to_string();
    let families = [
        Family {
            name: "node_cpu_usage_seconds_total",
            kind: "counter",
            help: "Cumulative cpu time consumed by the node in core-seconds",
            samples: node(secs(stats.node.cpu_usage_core_nanoseconds)),
        },
        Family {
            name: "node_memory_working_set_bytes",
            kind: "gauge",
            help: "Current working set of the node in bytes",
            samples: node(stats.node.memory_working_set_bytes.to_string()),
        },
        Family {
            name: "container_cpu_usage_seconds_total",
            kind: "counter",
            help: "Cumulative cpu time consumed by the container in core-seconds",
            samples: per_container(&|s| secs(s.usage.cpu_usage_core_nanoseconds)),
        },
        Family {
            name: "container_memory_working_set_bytes",
            kind: "gauge",
            help: "Current working set of the container in bytes",
            samples: per_container(&|s| s.usage.memory_working_set_bytes.to_string()),
        },
        Family {
            name: "container_start_time_seconds",
            kind: "gauge",
            help: "Start time of the container since unix epoch in seconds",
            samples: per_container(&|s| (s.start_time_ms as f64 / 1e3).to_string()),
        },
        Family {
            name: "pod_cpu_usage_seconds_total",
            kind: "counter",
            help: "Cumulative cpu time consumed by the pod in core-seconds",
            samples: per_pod(
                |u| u.cpu_usage_core_nanoseconds,
                |ns| seconds(ns).to_string(),
            ),
        },
        Family {
            name: "pod_memory_working_set_bytes",
            kind: "gauge",
            help: "Current working set of the pod in bytes",
            samples: per_pod(|u| u.memory_working_set_bytes, |b| b.to_string()),
        },
    ];
    let t = stats.time_ms;
    let mut o = String::new();
    for f in families {
        let _ = writeln!(
            o,
            "# HELP {} {}\n# TYPE {} {}",
            f.name, f.help, f.name, f.kind
        );
        for (labels, value) in f.samples {
            let _ = writeln!(o, "{}{labels} {value} {t}", f.name);
        }
    }
    o.push_str("# HELP scrape_error 1 if there was an error while getting container metrics, 0 otherwise\n# TYPE scrape_error gauge\nscrape_error 0\n");
    o
}

fn time(ms: i64) -> String {
    k8s_openapi::jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

fn cpu(u: &Usage, t: &str) -> Value {
    let mut v = json!({ "time": t, "usageCoreNanoSeconds": u.cpu_usage_core_nanoseconds });
    if let Some(n) = u.cpu_usage_nano_cores {
        v["usageNanoCores"] = json!(n);
    }
    v
}

fn memory(u: &Usage, t: &str) -> Value {
    let mut v = json!({ "time": t, "workingSetBytes": u.memory_working_set_bytes, "usageBytes": u.memory_working_set_bytes });
    if let Some(a) = u.memory_available_bytes {
        v["availableBytes"] = json!(a);
    }
    v
}

/// The kubelet Summary API (`/stats/summary`, `stats/v1alpha1`): CPU and memory of the node,
/// its Pods and their containers.
pub fn summary(node: &str, stats: &DeviceStats, pods: &[PodUsage<'_>]) -> Value {
    let t = time(stats.time_ms);
    let mut n = json!({
        "nodeName": node,
        "cpu": cpu(&stats.node, &t),
        "memory": memory(&stats.node, &t),
    });
    if let Some(b) = stats.boot_time_ms {
        n["startTime"] = json!(time(b));
    }
    let pods: Vec<Value> = pods
        .iter()
        .map(|p| {
            let mut total = Usage::default();
            let mut rates = Some(0u64);
            let containers: Vec<Value> = p
                .containers
                .iter()
                .map(|(name, s)| {
                    total.cpu_usage_core_nanoseconds += s.usage.cpu_usage_core_nanoseconds;
                    total.memory_working_set_bytes += s.usage.memory_working_set_bytes;
                    rates = rates.zip(s.usage.cpu_usage_nano_cores).map(|(a, b)| a + b);
                    json!({
                        "name": name,
                        "startTime": time(s.start_time_ms),
                        "cpu": cpu(&s.usage, &t),
                        "memory": memory(&s.usage, &t),
                    })
                })
                .collect();
            total.cpu_usage_nano_cores = rates;
            let start = p
                .containers
                .iter()
                .map(|(_, s)| s.start_time_ms)
                .min()
                .unwrap_or(0);
            json!({
                "podRef": { "name": p.name, "namespace": p.namespace, "uid": p.uid },
                "startTime": time(start),
                "containers": containers,
                "cpu": cpu(&total, &t),
                "memory": memory(&total, &t),
            })
        })
        .collect();
    json!({ "node": n, "pods": pods })
}

/// Asks the device for a sample.
async fn sample(ctx: &Ctx, device: &fleetlet_protocol::DeviceId) -> Result<DeviceStats, Response> {
    let req = StatsRequest {
        session: session_id(),
    };
    let unavailable = |m: String| text(StatusCode::SERVICE_UNAVAILABLE, m);
    let mut s = Session::open(
        &ctx.frames,
        &ctx.nats,
        device,
        relay::stats_subject(device),
        &req,
        &req.session,
    )
    .await
    .map_err(|e| text(StatusCode::BAD_GATEWAY, e.to_string()))?;
    let collect = async {
        let mut doc = Vec::new();
        loop {
            match s.next_frame().await {
                Some(Frame::Data(_, b)) => {
                    if doc.len() + b.len() > MAX_STATS_BYTES {
                        return Err(format!("the device's stats exceed {MAX_STATS_BYTES} bytes"));
                    }
                    doc.extend_from_slice(&b);
                }
                Some(Frame::End(None)) | None => break,
                Some(Frame::End(Some(e))) => return Err(e),
                Some(Frame::Exit(_) | Frame::Acked) => {}
            }
        }
        serde_json::from_slice::<DeviceStats>(&doc).map_err(|e| format!("the device's stats: {e}"))
    };
    match tokio::time::timeout(DEVICE_TIMEOUT, collect).await {
        Ok(r) => r.map_err(unavailable),
        Err(_) => Err(unavailable(format!(
            "device {device} did not answer within {} s",
            DEVICE_TIMEOUT.as_secs()
        ))),
    }
}

/// The node this port serves, authorized for `subresource`, and a fresh sample of its device.
async fn node_sample(
    ctx: &Ctx,
    id: &Identity,
    served: &ServedNode,
    subresource: &str,
) -> Result<(String, DeviceStats), Response> {
    let Some(node) = served.0.clone() else {
        return Err(text(
            StatusCode::NOT_FOUND,
            format!(
                "/{subresource}: this port serves every fleetlet node; each node's own port (--kubelet-node-ports) serves its figures"
            ),
        ));
    };
    authorize_on(ctx, id, "get", &node, subresource).await?;
    let device = node_device(ctx, &node).ok_or_else(|| not_a_fleetlet_node(&node))?;
    let stats = sample(ctx, &device).await?;
    Ok((node, stats))
}

pub(super) async fn metrics_resource(
    State(ctx): State<Ctx>,
    Extension(id): Extension<Arc<Identity>>,
    Extension(served): Extension<Arc<ServedNode>>,
) -> Response {
    let (node, stats) = match node_sample(&ctx, &id, &served, "metrics").await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let pods = ctx.pods.state();
    let body = resource_metrics(&stats, &pods_on(&pods, &node, &stats));
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

pub(super) async fn stats_summary(
    State(ctx): State<Ctx>,
    Extension(id): Extension<Arc<Identity>>,
    Extension(served): Extension<Arc<ServedNode>>,
) -> Response {
    let (node, stats) = match node_sample(&ctx, &id, &served, "stats").await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let pods = ctx.pods.state();
    let body = summary(&node, &stats, &pods_on(&pods, &node, &stats));
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetlet_protocol::stats::ContainerStats;
    use k8s_openapi::api::core::v1::{Container, PodSpec};

    fn pod(ns: &str, name: &str, node: &str, containers: &[&str]) -> Arc<Pod> {
        let mut p = Pod::default();
        p.metadata.namespace = Some(ns.into());
        p.metadata.name = Some(name.into());
        p.metadata.uid = Some(format!("uid-{name}"));
        p.spec = Some(PodSpec {
            node_name: Some(node.into()),
            containers: containers
                .iter()
                .map(|c| Container {
                    name: (*c).into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        });
        Arc::new(p)
    }

    fn usage(cpu: u64, mem: u64) -> Usage {
        Usage {
            cpu_usage_core_nanoseconds: cpu,
            memory_working_set_bytes: mem,
            ..Usage::default()
        }
    }

    fn sample() -> DeviceStats {
        let c = |ns: &str, pod: &str, i: usize, name: &str, cpu: u64, mem: u64| ContainerStats {
            resource: container_id(ns, pod, i, name).expect("id"),
            start_time_ms: 1_700_000_000_000,
            usage: usage(cpu, mem),
        };
        DeviceStats {
            time_ms: 1_700_000_100_500,
            boot_time_ms: None,
            node: usage(12_500_000_000, 300 << 20),
            containers: vec![
                c("shop", "web", 0, "nginx", 1_500_000_000, 4 << 20),
                c("shop", "web", 1, "sidecar", 500_000_000, 1 << 20),
                c("shop", "elsewhere", 0, "x", 1, 1),
            ],
        }
    }

    #[test]
    fn pods_are_matched_to_containers_on_their_node_only() {
        let s = sample();
        let pods = [
            pod("shop", "web", "pi-1", &["nginx", "sidecar", "not-running"]),
            pod("shop", "elsewhere", "pi-2", &["x"]),
            pod("shop", "idle", "pi-1", &["y"]),
        ];
        let on = pods_on(&pods, "pi-1", &s);
        assert_eq!(on.len(), 1, "only the pod with figures on pi-1");
        let names: Vec<&str> = on[0].containers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["nginx", "sidecar"]);
    }

    #[test]
    fn resource_metrics_carry_what_metrics_server_reads() {
        let s = sample();
        let pods = [pod("shop", "web", "pi-1", &["nginx", "sidecar"])];
        let text = resource_metrics(&s, &pods_on(&pods, "pi-1", &s));
        let has = |line: &str| {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            )
        };
        has("node_cpu_usage_seconds_total 12.5 1700000100500");
        has("node_memory_working_set_bytes 314572800 1700000100500");
        has(
            "container_cpu_usage_seconds_total{container=\"nginx\",namespace=\"shop\",pod=\"web\"} 1.5 1700000100500",
        );
        has(
            "container_memory_working_set_bytes{container=\"sidecar\",namespace=\"shop\",pod=\"web\"} 1048576 1700000100500",
        );
        has(
            "container_start_time_seconds{container=\"nginx\",namespace=\"shop\",pod=\"web\"} 1700000000 1700000100500",
        );
        has("pod_cpu_usage_seconds_total{namespace=\"shop\",pod=\"web\"} 2 1700000100500");
        has("pod_memory_working_set_bytes{namespace=\"shop\",pod=\"web\"} 5242880 1700000100500");
        assert!(!text.contains("elsewhere"));
    }

    #[test]
    fn summary_adds_up_pods_and_keeps_rates_only_when_every_container_has_one() {
        let mut s = sample();
        s.containers[0].usage.cpu_usage_nano_cores = Some(250_000_000);
        let pods = [pod("shop", "web", "pi-1", &["nginx", "sidecar"])];
        let v = summary("pi-1", &s, &pods_on(&pods, "pi-1", &s));
        assert_eq!(v["node"]["nodeName"], "pi-1");
        assert_eq!(v["node"]["cpu"]["usageCoreNanoSeconds"], 12_500_000_000u64);
        let p = &v["pods"][0];
        assert_eq!(p["podRef"]["uid"], "uid-web");
        assert_eq!(p["cpu"]["usageCoreNanoSeconds"], 2_000_000_000u64);
        assert_eq!(p["memory"]["workingSetBytes"], 5u64 << 20);
        assert!(
            p["cpu"].get("usageNanoCores").is_none(),
            "the sidecar has no rate"
        );
        assert_eq!(p["containers"][0]["cpu"]["usageNanoCores"], 250_000_000u64);
        assert_eq!(p["containers"][0]["startTime"], "2023-11-14T22:13:20Z");
    }
}
