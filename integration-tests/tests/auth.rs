//! Services that trust only each other: without the cluster secret, a caller (an agent on the
//! same host, a rogue worker) reaches neither the scheduler's nor the workers' API.

use claudecluster_integration_tests::*;
use claudecluster_proto::v1::scheduler_service_client::SchedulerServiceClient;
use claudecluster_proto::v1::worker_service_client::WorkerServiceClient;
use claudecluster_proto::v1::*;
use tonic::Code;

const REFUSAL: &str = "this service takes calls only from the cluster's own services, which present the cluster secret";

#[tokio::test]
async fn without_the_cluster_secret_no_caller_reaches_the_scheduler_or_a_worker() {
    let mut cluster = TestCluster::start(vec![WorkerSpec::default()]).await;
    let plain = |address: &str| claudecluster_grpc::channel(address).unwrap();
    let mut scheduler = SchedulerServiceClient::new(plain(&cluster.scheduler.address));
    let mut worker = WorkerServiceClient::new(plain(&cluster.workers[0].address));

    // A rogue worker: valid protocol, no secret.
    let register = WorkerLinkRequest {
        message: Some(worker_link_request::Message::Register(RegisterWorker {
            worker_id: "rogue".into(),
            address: "127.0.0.1:1".into(),
            execution_mode: ExecutionMode::ProcessPool as i32,
            capacity: 8,
            ..Default::default()
        })),
    };
    let refused = scheduler
        .worker_link(tokio_stream::iter(vec![register]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert_eq!(refused.message(), REFUSAL);
    let refused = scheduler
        .list_workers(ListWorkersRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);

    // A direct ExecuteTask, skipping the driver, pointing the agent elsewhere.
    let refused = worker
        .execute_task(ExecuteTaskRequest {
            task_id: "direct".into(),
            attempt: 1,
            spec: Some(TaskSpec {
                environment: [("DEPLOY".to_owned(), "x".to_owned())].into(),
                ..prompt("hello")
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert_eq!(refused.message(), REFUSAL);
    for refused in [
        worker
            .switch_execution_mode(SwitchExecutionModeRequest {
                execution_mode: ExecutionMode::ContainerAgentic as i32,
            })
            .await
            .unwrap_err(),
        worker
            .get_worker_status(GetWorkerStatusRequest {})
            .await
            .unwrap_err(),
    ] {
        assert_eq!(refused.code(), Code::Unauthenticated);
    }
    // A wrong secret is no better than none.
    let wrong = claudecluster_grpc::ClusterSecret::resolve(
        Some("not-the-cluster-secret-at-all".into()),
        None,
        std::path::Path::new("/nonexistent"),
    )
    .unwrap();
    let mut guessing = WorkerServiceClient::new(
        claudecluster_grpc::cluster::cluster_channel(
            &cluster.workers[0].address,
            &claudecluster_grpc::ClusterIdentity {
                secret: wrong,
                tls: None,
            },
        )
        .unwrap(),
    );
    assert_eq!(
        guessing
            .get_worker_status(GetWorkerStatusRequest {})
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );

    // Health stays open to probes.
    for address in [&cluster.scheduler.address, &cluster.workers[0].address] {
        let mut health =
            claudecluster_grpc::tonic_health::pb::health_client::HealthClient::new(plain(address));
        let answer = health
            .check(claudecluster_grpc::tonic_health::pb::HealthCheckRequest::default())
            .await
            .expect("health answers without the secret")
            .into_inner();
        assert_eq!(answer.status, 1, "SERVING");
    }

    // The rogue never registered; the cluster's own services still work together.
    let workers = cluster
        .scheduler_client()
        .list_workers(ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert_eq!(workers.len(), 1);
    assert_eq!(workers[0].worker_id, cluster.worker_ids[0]);
    let task = cluster.submit(prompt("hello")).await;
    assert_eq!(
        cluster.finish(&task.task_id).await.0.status(),
        TaskStatus::Completed
    );
    cluster.assert_unharmed().await;
}

#[tokio::test]
async fn an_agent_never_sees_the_cluster_secret() {
    let secret = "s3cret-of-this-cluster-0123456789";
    let cluster = TestCluster::start_with_env(
        "",
        &[("CLAUDECLUSTER_CLUSTER_SECRET", secret)],
        vec![WorkerSpec::default()],
    )
    .await;
    let task = cluster
        .submit(with_tools(
            "BASH env | grep -c CLAUDECLUSTER_CLUSTER_SECRET || true",
            &["Bash"],
        ))
        .await;
    let (ended, events) = cluster.finish(&task.task_id).await;
    assert_eq!(
        ended.status(),
        TaskStatus::Completed,
        "{}",
        ended.status_reason
    );
    assert_eq!(ended.result.as_ref().unwrap().text, "MOCK_DONE 0");
    assert!(!format!("{ended:?} {events:?}").contains(secret));
    // The services use the variable's secret, not a file of their own.
    let mut scheduler = cluster.scheduler_client();
    assert!(scheduler.list_workers(ListWorkersRequest {}).await.is_ok());
}
