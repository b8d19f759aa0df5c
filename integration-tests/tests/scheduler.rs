//! The scheduler under failure and load: retries after a worker is lost.

use claudecluster_integration_tests::*;
use claudecluster_proto::v1::event::Kind;
use claudecluster_proto::v1::*;

/// Waits until the task's agent has printed its init event.
async fn wait_for_agent(cluster: &TestCluster, task_id: &str) {
    let request = StreamTaskEventsRequest {
        task_id: task_id.to_owned(),
        after_sequence: 0,
    };
    let mut stream = cluster
        .driver()
        .await
        .stream_task_events(request)
        .await
        .unwrap()
        .into_inner();
    while let Some(response) = stream.message().await.unwrap() {
        if matches!(response.event.unwrap().kind, Some(Kind::Init(_))) {
            return;
        }
    }
    panic!("the task ended before its agent started");
}

#[tokio::test]
async fn a_task_whose_worker_is_killed_runs_again_on_another_worker() {
    let one = WorkerSpec {
        capacity: 1,
        ..WorkerSpec::default()
    };
    let mut cluster = TestCluster::start(vec![one.clone()]).await;
    let task = cluster.submit(prompt("SLOW 20 100")).await;
    wait_for_agent(&cluster, &task.task_id).await;
    let first = cluster.worker_ids[0].clone();
    let second = cluster.add_worker(one).await;
    cluster.wait_for_healthy_workers(2).await;
    cluster.workers[0].kill().await;

    let (ended, events) = cluster.finish(&task.task_id).await;
    assert_eq!(
        ended.status(),
        TaskStatus::Completed,
        "{}",
        ended.status_reason
    );
    assert_eq!(ended.worker_id, second);
    assert_eq!(ended.attempt, 2);
    assert_eq!(
        statuses(&events),
        vec![
            TaskStatus::Pending,
            TaskStatus::Assigned,
            TaskStatus::Running,
            TaskStatus::Pending,
            TaskStatus::Assigned,
            TaskStatus::Running,
            TaskStatus::Completed,
        ]
    );
    let requeued = events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(Kind::StatusChange(c)) if c.status() == TaskStatus::Pending && e.attempt == 2 => {
                Some(c.reason.clone())
            }
            _ => None,
        })
        .next()
        .expect("the second attempt's PENDING event");
    assert!(
        requeued.starts_with(&format!("lost worker {first}")),
        "{requeued}"
    );
    assert!(
        requeued.ends_with("queued again (attempt 2 of 3)"),
        "{requeued}"
    );
    // Every event says which attempt it belongs to.
    assert!(
        events
            .iter()
            .filter(|e| matches!(e.kind, Some(Kind::Result(_))))
            .all(|e| e.attempt == 2)
    );
}

#[tokio::test]
async fn with_its_attempts_used_up_a_task_whose_worker_is_killed_fails_and_says_why() {
    let cluster =
        TestCluster::start_with_driver("maxAttempts: 1\n", vec![WorkerSpec::default()]).await;
    let mut cluster = cluster;
    let task = cluster.submit(prompt("SLOW 20 100")).await;
    wait_for_agent(&cluster, &task.task_id).await;
    let worker = cluster.worker_ids[0].clone();
    cluster.workers[0].kill().await;
    let (ended, _) = cluster.finish(&task.task_id).await;
    assert_eq!(ended.status(), TaskStatus::Failed);
    assert!(
        ended
            .status_reason
            .starts_with(&format!("lost worker {worker}")),
        "{}",
        ended.status_reason
    );
    assert!(
        ended.status_reason.ends_with("(attempt 1 of 1)"),
        "{}",
        ended.status_reason
    );
}
