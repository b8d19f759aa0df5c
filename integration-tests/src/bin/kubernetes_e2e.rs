//! The kubernetes orchestrator against a real cluster, for a machine that has one (kind, or
//! any cluster `KUBECONFIG` names); no cluster runs where the test suite runs.
//!
//!     kind create cluster && kind load docker-image claudecluster/agent:2.1.328
//!     CLAUDECLUSTER_E2E_PROXY_HOST=172.18.0.1 \
//!       cargo run -p claudecluster-integration-tests --bin kubernetes-e2e
//!
//! `CLAUDECLUSTER_E2E_PROXY_HOST` is an address of this machine that the cluster's pods reach
//! (for kind, the gateway of its Docker network: `docker network inspect kind`);
//! `CLAUDECLUSTER_E2E_NAMESPACE` (default `default`) is where agent pods go. It starts a
//! cluster of real processes here, with a worker whose agents run in pods, runs a task that
//! writes a file and a session of two messages against the stand-in API, and checks that no
//! pod or volume claim of the worker is left. Exits non-zero on any failure.

use std::time::Duration;

use claudecluster_integration_tests::*;
use claudecluster_proto::v1::*;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::ListParams;

#[tokio::main]
async fn main() {
    if std::env::var_os("KUBECONFIG").is_none()
        && std::env::var_os("KUBERNETES_SERVICE_HOST").is_none()
    {
        eprintln!("kubernetes-e2e: set KUBECONFIG to the cluster to run agents on");
        std::process::exit(2);
    }
    let proxy_host = std::env::var("CLAUDECLUSTER_E2E_PROXY_HOST").unwrap_or_else(|_| {
        eprintln!(
            "kubernetes-e2e: set CLAUDECLUSTER_E2E_PROXY_HOST to an address of this machine the cluster's pods reach"
        );
        std::process::exit(2);
    });
    let namespace =
        std::env::var("CLAUDECLUSTER_E2E_NAMESPACE").unwrap_or_else(|_| "default".to_owned());
    let cluster = TestCluster::start(vec![WorkerSpec {
        container_yaml: "  orchestrator: kubernetes\n".to_owned(),
        extra_yaml: format!(
            "kubernetes:\n  namespace: {namespace}\n  proxyHost: {proxy_host}\n  startTimeout: 5m\n"
        ),
        ..WorkerSpec::in_mode(Mode::Container)
    }])
    .await;
    let worker_id = cluster.worker_ids[0].clone();

    let written = cluster
        .completed_text(TaskSpec {
            execution_mode: ExecutionMode::ContainerAgentic as i32,
            ..with_tools("WRITE hello.txt hello from a pod", &["Write"])
        })
        .await;
    assert_eq!(written, "MOCK_DONE wrote hello.txt", "the task's answer");
    println!("task: {written}");

    let mut driver = cluster.driver().await;
    let session = driver
        .create_session(CreateSessionRequest {
            spec: Some(SessionSpec::default()),
        })
        .await
        .expect("create a session")
        .into_inner()
        .session
        .unwrap();
    for (turn, text) in ["first", "RECALL"].into_iter().enumerate() {
        let events = reply_events(driver.clone(), session.session_id.clone(), text.into()).await;
        let answer = events
            .iter()
            .find_map(|event| match &event.kind {
                Some(event::Kind::Result(result)) => Some(result.text.clone()),
                _ => None,
            })
            .expect("the session answered");
        println!("session turn {}: {answer}", turn + 1);
        if text == "RECALL" {
            assert!(
                answer.contains("first"),
                "the conversation carried over: {answer}"
            );
        }
    }
    driver
        .close_session(CloseSessionRequest {
            session_id: session.session_id.clone(),
        })
        .await
        .expect("close the session");

    // Nothing of the worker's is left in the cluster.
    let client = kube::Client::try_default()
        .await
        .expect("reach the cluster");
    let selector = ListParams::default().labels(&format!("claudecluster.worker={worker_id}"));
    let left = wait_until(Duration::from_secs(60), || {
        let client = client.clone();
        let (namespace, selector) = (namespace.clone(), selector.clone());
        async move {
            let pods = kube::Api::<Pod>::namespaced(client.clone(), &namespace)
                .list(&selector)
                .await
                .map(|list| list.items.len())
                .unwrap_or(usize::MAX);
            let claims = kube::Api::<PersistentVolumeClaim>::namespaced(client, &namespace)
                .list(&selector)
                .await
                .map(|list| list.items.len())
                .unwrap_or(usize::MAX);
            pods == 0 && claims == 0
        }
    })
    .await;
    assert!(
        left.is_ok(),
        "pods or volume claims of the worker were left behind"
    );
    println!("kubernetes-e2e: passed; nothing left in namespace {namespace}");
}
