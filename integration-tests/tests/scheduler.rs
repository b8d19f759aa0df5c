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

fn with_priority(text: &str, priority: Priority) -> TaskSpec {
    TaskSpec {
        priority: priority as i32,
        ..prompt(text)
    }
}

#[tokio::test]
async fn queued_tasks_start_by_priority_then_in_order() {
    let one = WorkerSpec {
        capacity: 1,
        ..WorkerSpec::default()
    };
    let cluster = TestCluster::start(vec![one]).await;
    let blocker = cluster.submit(prompt("SLOW 15 100")).await;
    wait_for_agent(&cluster, &blocker.task_id).await;
    let mut ids = Vec::new();
    for (name, priority) in [
        ("low", Priority::Low),
        ("normal-1", Priority::Normal),
        ("critical", Priority::Critical),
        ("normal-2", Priority::Unspecified),
        ("high", Priority::High),
    ] {
        ids.push((
            name,
            cluster.submit(with_priority(name, priority)).await.task_id,
        ));
    }
    let status = cluster
        .driver()
        .await
        .get_cluster_status(GetClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.queued_tasks, 5);
    assert_eq!(status.queued_by_priority.get("normal"), Some(&2));
    assert_eq!(status.queued_by_priority.get("low"), Some(&1));
    let mut started = Vec::new();
    for (name, id) in &ids {
        let (task, events) = cluster.finish(id).await;
        assert_eq!(task.status(), TaskStatus::Completed);
        started.push((status_time(&events, TaskStatus::Assigned).unwrap(), *name));
    }
    started.sort_by(|a, b| a.0.total_cmp(&b.0));
    let order: Vec<&str> = started.iter().map(|(_, name)| *name).collect();
    assert_eq!(
        order,
        vec!["critical", "high", "normal-1", "normal-2", "low"]
    );
}

async fn submit_batch(
    cluster: &TestCluster,
    tasks: Vec<(&str, &str, &[&str])>,
) -> Result<Vec<Task>, tonic::Status> {
    let tasks = tasks
        .into_iter()
        .map(|(key, text, depends_on)| BatchTask {
            key: key.to_owned(),
            spec: Some(TaskSpec {
                depends_on: depends_on.iter().map(|d| d.to_string()).collect(),
                ..prompt(text)
            }),
        })
        .collect();
    cluster
        .driver()
        .await
        .submit_tasks(SubmitTasksRequest { tasks })
        .await
        .map(|response| response.into_inner().tasks)
}

#[tokio::test]
async fn a_diamond_of_dependencies_runs_each_task_after_all_it_depends_on() {
    let cluster = TestCluster::start(vec![WorkerSpec {
        capacity: 3,
        ..WorkerSpec::default()
    }])
    .await;
    let tasks = submit_batch(
        &cluster,
        vec![
            ("a", "SLOW 3 100", &[]),
            ("b", "SLOW 4 100", &["a"]),
            ("c", "quick c", &["a"]),
            ("d", "quick d", &["b", "c"]),
        ],
    )
    .await
    .unwrap();
    assert_eq!(
        tasks[3].status_reason,
        format!(
            "waiting for tasks {}, {}",
            tasks[1].task_id, tasks[2].task_id
        )
    );
    let mut ran = Vec::new();
    for task in &tasks {
        let (ended, events) = cluster.finish(&task.task_id).await;
        assert_eq!(
            ended.status(),
            TaskStatus::Completed,
            "{}",
            ended.status_reason
        );
        ran.push((
            status_time(&events, TaskStatus::Assigned).unwrap(),
            status_time(&events, TaskStatus::Completed).unwrap(),
        ));
    }
    let (a, b, c, d) = (ran[0], ran[1], ran[2], ran[3]);
    assert!(b.0 >= a.1 && c.0 >= a.1, "b and c start after a completed");
    assert!(d.0 >= b.1 && d.0 >= c.1, "d starts after b and c completed");
}

#[tokio::test]
async fn when_a_middle_task_fails_its_dependants_are_cancelled_naming_it() {
    let cluster = TestCluster::start(vec![WorkerSpec::default()]).await;
    let tasks = submit_batch(
        &cluster,
        vec![
            ("first", "quick first", &[]),
            ("middle", "ERROR 500", &["first"]),
            ("last", "never runs", &["middle"]),
            ("after-last", "never runs either", &["last"]),
        ],
    )
    .await
    .unwrap();
    let status = |i: usize| {
        let id = tasks[i].task_id.clone();
        let cluster = &cluster;
        async move { cluster.finish(&id).await }
    };
    assert_eq!(status(0).await.0.status(), TaskStatus::Completed);
    assert_eq!(status(1).await.0.status(), TaskStatus::Failed);
    let (last, events) = status(2).await;
    assert_eq!(last.status(), TaskStatus::Cancelled);
    assert!(
        last.status_reason
            .starts_with(&format!("dependency {} failed: ", tasks[1].task_id)),
        "{}",
        last.status_reason
    );
    assert_eq!(
        statuses(&events),
        vec![TaskStatus::Pending, TaskStatus::Cancelled],
        "it never ran"
    );
    let (after, _) = status(3).await;
    assert_eq!(after.status(), TaskStatus::Cancelled);
    assert!(
        after.status_reason.starts_with(&format!(
            "dependency {} cancelled: dependency {} failed",
            tasks[2].task_id, tasks[1].task_id
        )),
        "{}",
        after.status_reason
    );
}

#[tokio::test]
async fn cycles_and_unknown_dependencies_are_refused_at_submission() {
    let cluster = TestCluster::start(vec![]).await;
    let cycle = submit_batch(&cluster, vec![("a", "a", &["b"]), ("b", "b", &["a"])])
        .await
        .unwrap_err();
    assert_eq!(cycle.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        cycle.message(),
        "tasks: the dependencies form a cycle: a -> b -> a"
    );
    let unknown = cluster
        .driver()
        .await
        .submit_task(SubmitTaskRequest {
            spec: Some(TaskSpec {
                depends_on: vec!["no-such-task".into()],
                ..prompt("x")
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        unknown.message(),
        "spec.depends_on: task no-such-task not found"
    );
    let listed = cluster
        .driver()
        .await
        .list_tasks(ListTasksRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed.tasks.is_empty(),
        "nothing of a refused batch was kept"
    );
}
