//! The scheduler under failure and load: retries after a worker is lost.

use claudecluster_integration_tests::*;
use claudecluster_proto::v1::event::Kind;
use claudecluster_proto::v1::*;

#[tokio::test]
async fn a_task_whose_worker_is_killed_runs_again_on_another_worker() {
    let one = WorkerSpec {
        capacity: 1,
        ..WorkerSpec::default()
    };
    let mut cluster = TestCluster::start(vec![one.clone()]).await;
    let task = cluster.submit(prompt("SLOW 20 100")).await;
    cluster.wait_for_agent(&task.task_id).await;
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
    cluster.wait_for_agent(&task.task_id).await;
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
    cluster.wait_for_agent(&blocker.task_id).await;
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

#[tokio::test]
async fn a_drained_worker_gets_no_new_work_and_loses_none() {
    let two = WorkerSpec {
        capacity: 2,
        ..WorkerSpec::default()
    };
    let cluster = TestCluster::start(vec![two.clone(), two]).await;
    let (drained, other) = (cluster.worker_ids[0].clone(), cluster.worker_ids[1].clone());
    // One long task on each worker (placement spreads by load).
    let long: Vec<String> =
        futures_util::future::join_all((0..2).map(|_| cluster.submit(prompt("SLOW 20 100"))))
            .await
            .into_iter()
            .map(|t| t.task_id)
            .collect();
    for id in &long {
        cluster.wait_for_agent(id).await;
    }
    let on_drained = {
        let mut found = None;
        for id in &long {
            if cluster.task(id).await.worker_id == drained {
                found = Some(id.clone());
            }
        }
        found.expect("one long task on each worker")
    };
    let mut scheduler = cluster.scheduler_client();
    let answer = scheduler
        .drain_worker(DrainWorkerRequest {
            worker_id: drained.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let info = answer.worker.unwrap();
    assert!(info.draining && !info.drained, "still running its task");
    let missing = scheduler
        .drain_worker(DrainWorkerRequest {
            worker_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);

    let mut quick = Vec::new();
    for i in 0..4 {
        quick.push(cluster.submit(prompt(&format!("quick {i}"))).await.task_id);
    }
    for id in &quick {
        let (task, _) = cluster.finish(id).await;
        assert_eq!(task.status(), TaskStatus::Completed);
        assert_eq!(
            task.worker_id, other,
            "nothing new lands on a draining worker"
        );
    }
    let (task, _) = cluster.finish(&on_drained).await;
    assert_eq!(
        task.status(),
        TaskStatus::Completed,
        "its running work finishes"
    );
    assert_eq!(task.worker_id, drained);
    wait_until(std::time::Duration::from_secs(10), || {
        let mut scheduler = scheduler.clone();
        let drained = drained.clone();
        async move {
            let workers = scheduler
                .list_workers(ListWorkersRequest {})
                .await
                .unwrap()
                .into_inner()
                .workers;
            workers
                .iter()
                .any(|w| w.worker_id == drained && w.draining && w.drained)
        }
    })
    .await
    .expect("the worker reports drained");
}

#[tokio::test]
async fn placement_follows_labels_and_spreads_by_load_within_capacity() {
    let worker = |capacity: u32, labels: &[(&str, &str)]| WorkerSpec {
        capacity,
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..WorkerSpec::default()
    };
    let cluster = TestCluster::start(vec![
        worker(1, &[("zone", "eu")]),
        worker(2, &[("zone", "us")]),
        worker(1, &[("zone", "eu"), ("gpu", "yes")]),
    ])
    .await;
    let ids = &cluster.worker_ids;
    let selected = |text: &str, labels: &[(&str, &str)]| TaskSpec {
        worker_selector: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..prompt(text)
    };
    // Four slow tasks without a selector fill the four slots: two on the worker with two.
    let mut spread = Vec::new();
    for i in 0..4 {
        spread.push(
            cluster
                .submit(prompt(&format!("SLOW 10 100 #{i}")))
                .await
                .task_id,
        );
    }
    // Selected tasks wait for a slot on a matching worker only.
    let gpu = cluster
        .submit(selected("needs a gpu", &[("gpu", "yes")]))
        .await
        .task_id;
    let eu = cluster
        .submit(selected("in the eu", &[("zone", "eu")]))
        .await
        .task_id;
    assert_eq!(
        cluster.task(&gpu).await.status_reason,
        "waiting for a free slot on a worker with labels gpu=yes"
    );
    let mut per_worker = std::collections::HashMap::new();
    for id in &spread {
        let (task, _) = cluster.finish(id).await;
        *per_worker.entry(task.worker_id).or_insert(0) += 1;
    }
    assert_eq!(per_worker.get(&ids[0]), Some(&1));
    assert_eq!(per_worker.get(&ids[1]), Some(&2));
    assert_eq!(per_worker.get(&ids[2]), Some(&1));
    assert_eq!(cluster.finish(&gpu).await.0.worker_id, ids[2]);
    let eu_worker = cluster.finish(&eu).await.0.worker_id;
    assert!(eu_worker == ids[0] || eu_worker == ids[2], "{eu_worker}");
    let nowhere = cluster
        .submit(selected("on mars", &[("zone", "mars")]))
        .await
        .task_id;
    assert_eq!(
        cluster.task(&nowhere).await.status_reason,
        "waiting for a worker with labels zone=mars: none is registered"
    );
}

#[tokio::test]
async fn a_worker_switches_its_execution_mode_without_restarting() {
    // Its containers, once it runs them, reach the stand-in API on the host's loopback.
    let worker = WorkerSpec {
        capacity: 1,
        extra_yaml: "container:\n  network: host\n".to_owned(),
        ..WorkerSpec::default()
    };
    let cluster = TestCluster::start(vec![worker]).await;
    let worker_id = cluster.worker_ids[0].clone();
    let pid = cluster.workers[0].pid();
    let mut worker = cluster.worker_client(0);
    let running = cluster.submit(prompt("SLOW 10 100")).await;
    cluster.wait_for_agent(&running.task_id).await;

    let switched = worker
        .switch_execution_mode(SwitchExecutionModeRequest {
            execution_mode: ExecutionMode::ContainerAgentic as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        switched.execution_modes,
        vec![ExecutionMode::ContainerAgentic as i32]
    );
    assert!(switched.drain_millis > 0, "it waited for the running task");
    eprintln!(
        "mode switch: drain {} ms, switch {} ms",
        switched.drain_millis, switched.switch_millis
    );
    // The task that was running finished on the old provider.
    let (before, _) = cluster.finish(&running.task_id).await;
    assert_eq!(before.status(), TaskStatus::Completed);
    assert!(before.runner.starts_with("process "), "{}", before.runner);

    // The scheduler knows the new mode: a container task lands on the same worker.
    let status = cluster
        .driver()
        .await
        .get_cluster_status(GetClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.workers[0].execution_modes,
        vec![ExecutionMode::ContainerAgentic as i32]
    );
    // Its capacity is now container mode's (`container.maxContainers`, 4 by default), not the
    // one process slot it started with.
    assert_eq!(status.workers[0].capacity, 4);
    let spec = TaskSpec {
        execution_mode: ExecutionMode::ContainerAgentic as i32,
        ..prompt("in a container now")
    };
    let (after, _) = cluster.finish(&cluster.submit(spec).await.task_id).await;
    assert_eq!(
        after.status(),
        TaskStatus::Completed,
        "{}",
        after.status_reason
    );
    assert_eq!(after.worker_id, worker_id);
    assert!(after.runner.starts_with("container "), "{}", after.runner);
    assert_eq!(cluster.workers[0].pid(), pid, "the same process");

    let back = worker
        .switch_execution_mode(SwitchExecutionModeRequest {
            execution_mode: ExecutionMode::ProcessPool as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        back.execution_modes,
        vec![ExecutionMode::ProcessPool as i32]
    );
    let (again, _) = cluster
        .finish(&cluster.submit(prompt("back in a process")).await.task_id)
        .await;
    assert!(again.runner.starts_with("process "), "{}", again.runner);
    let refused = worker
        .switch_execution_mode(SwitchExecutionModeRequest {
            execution_mode: ExecutionMode::Unspecified as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn the_workers_commands_of_the_cli() {
    let worker = WorkerSpec {
        extra_yaml: "container:\n  network: host\n".to_owned(),
        ..WorkerSpec::default()
    };
    let cluster = TestCluster::start(vec![worker]).await;
    // The operator's CLI runs where the services do, and presents the secret they share.
    let data = cluster.dir.path().join("data");
    let data = &data;
    let run = |args: Vec<String>| async move {
        let output = tokio::process::Command::new(claudecluster_bin())
            .args(&args)
            .env("XDG_DATA_HOME", data)
            .output()
            .await
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let scheduler = cluster.scheduler.address.clone();
    let worker_id = cluster.worker_ids[0].clone();
    let (ok, listed, _) = run(vec![
        "workers".into(),
        "list".into(),
        "--scheduler".into(),
        scheduler.clone(),
    ])
    .await;
    assert!(ok);
    assert!(
        listed.lines().any(|l| l.starts_with(&worker_id)
            && l.contains("process_pool")
            && l.contains(" yes ")),
        "{listed}"
    );
    let (ok, switched, err) = run(vec![
        "workers".into(),
        "switch".into(),
        cluster.workers[0].address.clone(),
        "container_agentic".into(),
    ])
    .await;
    assert!(ok, "{err}");
    assert!(
        switched.starts_with("now container_agentic (drained in "),
        "{switched}"
    );
    let (ok, drained, _) = run(vec![
        "workers".into(),
        "drain".into(),
        worker_id.clone(),
        "--scheduler".into(),
        scheduler.clone(),
    ])
    .await;
    assert!(ok);
    assert_eq!(drained.trim(), format!("{worker_id}: draining"));
    let (ok, _, err) = run(vec![
        "workers".into(),
        "drain".into(),
        "nope".into(),
        "--scheduler".into(),
        scheduler,
    ])
    .await;
    assert!(!ok);
    assert!(err.contains("NotFound: worker nope not found"), "{err}");
}
