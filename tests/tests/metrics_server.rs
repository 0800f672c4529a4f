//! A real metrics-server behind the apiserver's aggregation layer: the APIService becomes
//! Available and the apiserver proxies `metrics.k8s.io` to it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use fleetlet_testenv::{Binaries, MetricsServer, TestEnv, metrics_server};
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
use kube::Api;

#[tokio::test]
async fn metrics_server_is_served_through_the_aggregation_layer() {
    let env = TestEnv::builder()
        .kube_without_crds()
        .start()
        .await
        .unwrap();
    let kube = env.kube.as_ref().unwrap();
    let metrics = MetricsServer::start(Binaries::locate().unwrap(), kube, &env.dir)
        .await
        .unwrap_or_else(|e| panic!("metrics-server did not start: {e}"));

    // -v=6 logs each request with its status.
    let out = env
        .kubectl()
        .unwrap()
        .args(["get", "--raw", "/apis/metrics.k8s.io/v1beta1/nodes", "-v=6"])
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    let context = || {
        format!(
            "stdout: {stdout}\nstderr: {stderr}\nmetrics-server log:\n{}",
            metrics.log_tail(30)
        )
    };
    assert!(
        out.status.success(),
        "kubectl get --raw failed\n{}",
        context()
    );
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("/apis/metrics.k8s.io/v1beta1/nodes") && l.contains(" 200 OK")),
        "no 200 OK for the request\n{}",
        context()
    );
    let list: serde_json::Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON: {e}\n{}", context()));
    assert_eq!(list["kind"], "NodeMetricsList", "{}", context());
    assert_eq!(
        list["apiVersion"],
        "metrics.k8s.io/v1beta1",
        "{}",
        context()
    );
    // No nodes in this environment.
    assert_eq!(list["items"], serde_json::json!([]), "{}", context());

    // Dropping it unregisters it: discovery no longer names an unavailable group.
    drop(metrics);
    let api_services: Api<APIService> = Api::all(env.kube_client().await.unwrap());
    assert!(
        api_services
            .get_opt(metrics_server::API_SERVICE)
            .await
            .unwrap()
            .is_none(),
        "the APIService outlived its metrics-server"
    );
}
