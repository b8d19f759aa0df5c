//! The whole path with real processes: driver, scheduler and process-pool workers running the
//! real Claude Code CLI against the stand-in Messages API.

use std::collections::BTreeMap;
use std::time::Duration;

use claudecluster_integration_tests::*;
use claudecluster_proto::v1::*;
use tonic::Code;

#[tokio::test]
async fn a_pending_task_is_cancelled_without_running() {
    // No worker at all: the task waits, with a reason.
    let cluster = TestCluster::start(vec![]).await;
    let submitted = cluster.submit(prompt("never runs")).await;
    let mut driver = cluster.driver().await;
    let waiting = cluster.task(&submitted.task_id).await;
    assert_eq!(waiting.status(), TaskStatus::Pending);
    assert_eq!(
        waiting.status_reason,
        "waiting for a worker: none is registered"
    );
    let cancelled = driver
        .cancel_task(CancelTaskRequest {
            task_id: submitted.task_id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(cancelled.status(), TaskStatus::Cancelled);
    assert_eq!(
        statuses(&cluster.finish(&submitted.task_id).await.1),
        vec![TaskStatus::Pending, TaskStatus::Cancelled]
    );
}

#[tokio::test]
async fn an_agent_that_exits_without_a_result_fails_with_the_exit() {
    let cluster = TestCluster::start(vec![WorkerSpec::default()]).await;
    // The agent's own Bash tool sends SIGTERM to the CLI, which then exits 143 without a result.
    let submitted = cluster
        .submit(with_tools("BASH kill -TERM $PPID", &["Bash"]))
        .await;
    let (task, _) = cluster.finish(&submitted.task_id).await;
    assert_eq!(task.status(), TaskStatus::Failed);
    assert_eq!(task.status_reason, "the agent exited 143 without a result");
}

#[tokio::test]
async fn a_missing_or_unexecutable_claude_binary_fails_the_task_with_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let not_executable = dir.path().join("claude");
    std::fs::write(&not_executable, "#!/bin/sh\n").unwrap();
    let worker = |kind: &str, path: std::path::PathBuf| WorkerSpec {
        claude_path: Some(path),
        labels: BTreeMap::from([("kind".to_owned(), kind.to_owned())]),
        ..WorkerSpec::default()
    };
    let cluster = TestCluster::start(vec![
        worker("missing", dir.path().join("no-such-claude")),
        worker("not-executable", not_executable.clone()),
    ])
    .await;
    for (kind, expected) in [
        (
            "missing",
            format!(
                "the claude CLI was not found at `{}`",
                dir.path().join("no-such-claude").display()
            ),
        ),
        (
            "not-executable",
            format!(
                "the claude CLI at `{}` is not executable",
                not_executable.display()
            ),
        ),
    ] {
        let spec = TaskSpec {
            worker_selector: [("kind".to_owned(), kind.to_owned())].into(),
            ..prompt("hello")
        };
        let submitted = cluster.submit(spec).await;
        let (task, _) = cluster.finish(&submitted.task_id).await;
        assert_eq!(task.status(), TaskStatus::Failed, "{kind}");
        assert!(
            task.status_reason.starts_with(&expected),
            "{kind}: {}",
            task.status_reason
        );
        assert!(
            task.status_reason
                .contains("worker.processPool.claudeCodePath"),
            "{}",
            task.status_reason
        );
    }
}

#[tokio::test]
async fn bad_requests_get_the_right_status_and_name_the_field() {
    let cluster = TestCluster::start(vec![]).await;
    let mut driver = cluster.driver().await;
    let submit = |spec: TaskSpec| {
        let mut driver = driver.clone();
        async move {
            driver
                .submit_task(SubmitTaskRequest { spec: Some(spec) })
                .await
                .unwrap_err()
        }
    };
    let empty = submit(prompt("   ")).await;
    assert_eq!(empty.code(), Code::InvalidArgument);
    assert_eq!(empty.message(), "spec.prompt: must not be empty");
    let bad_repo = submit(TaskSpec {
        repo_url: "ftp://example.invalid/repo".into(),
        ..prompt("hi")
    })
    .await;
    assert_eq!(bad_repo.code(), Code::InvalidArgument);
    assert!(
        bad_repo.message().starts_with("spec.repo_url: "),
        "{}",
        bad_repo.message()
    );
    let missing = driver
        .get_task(GetTaskRequest {
            task_id: "no-such-task".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(missing.message(), "task no-such-task not found");
    let missing = driver
        .stream_task_events(StreamTaskEventsRequest {
            task_id: "no-such-task".into(),
            after_sequence: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let token = driver
        .list_tasks(ListTasksRequest {
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(token.code(), Code::InvalidArgument);
    assert!(token.message().starts_with("page_token: "));
}

#[tokio::test]
async fn two_watchers_get_every_event_once_in_order_and_a_late_one_gets_the_rest() {
    let cluster = TestCluster::start(vec![WorkerSpec::default()]).await;
    let submitted = cluster.submit(prompt("SLOW 8 100")).await;
    let id = submitted.task_id.clone();
    let first = tokio::spawn({
        let mut driver = cluster.driver().await;
        let id = id.clone();
        async move { collect_events(&mut driver, &id, 0).await }
    });
    let second = tokio::spawn({
        let mut driver = cluster.driver().await;
        let id = id.clone();
        async move { collect_events(&mut driver, &id, 0).await }
    });
    let first = first.await.unwrap();
    let second = second.await.unwrap();
    assert_eq!(first, second, "both watchers saw the same log");
    let sequences: Vec<u64> = first.iter().map(|e| e.sequence).collect();
    assert_eq!(sequences, (1..=first.len() as u64).collect::<Vec<_>>());
    let late = collect_events(&mut cluster.driver().await, &id, 3).await;
    assert_eq!(
        late,
        first[3..].to_vec(),
        "a late watcher gets exactly what it missed"
    );
}

#[tokio::test]
async fn tasks_are_listed_by_status_in_pages() {
    let cluster = TestCluster::start(vec![WorkerSpec::default()]).await;
    let done = cluster.submit(prompt("one")).await;
    cluster.finish(&done.task_id).await;
    let labelled = TaskSpec {
        labels: [("team".to_owned(), "blue".to_owned())].into(),
        ..prompt("ERROR 500")
    };
    let failed = cluster.submit(labelled).await;
    cluster.finish(&failed.task_id).await;
    let done_too = cluster.submit(prompt("three")).await;
    cluster.finish(&done_too.task_id).await;
    let mut driver = cluster.driver().await;
    let page = |statuses: Vec<TaskStatus>, size: u32, token: String| {
        let mut driver = driver.clone();
        async move {
            driver
                .list_tasks(ListTasksRequest {
                    statuses: statuses.into_iter().map(|s| s as i32).collect(),
                    page_size: size,
                    page_token: token,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let first = page(vec![TaskStatus::Completed], 1, String::new()).await;
    assert_eq!(first.tasks.len(), 1);
    assert_eq!(first.tasks[0].task_id, done.task_id);
    assert!(!first.next_page_token.is_empty());
    let second = page(vec![TaskStatus::Completed], 1, first.next_page_token).await;
    assert_eq!(second.tasks[0].task_id, done_too.task_id);
    let failures = page(vec![TaskStatus::Failed], 10, String::new()).await;
    assert_eq!(
        failures
            .tasks
            .iter()
            .map(|t| t.task_id.clone())
            .collect::<Vec<_>>(),
        vec![failed.task_id.clone()]
    );
    let blue = driver
        .list_tasks(ListTasksRequest {
            label_selector: [("team".to_owned(), "blue".to_owned())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(blue.tasks.len(), 1);
    assert_eq!(blue.tasks[0].task_id, failed.task_id);
    let all = driver
        .list_tasks(ListTasksRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.tasks.len(), 3);
    assert!(all.next_page_token.is_empty());
}

#[tokio::test]
async fn a_worker_that_stops_its_heartbeat_gets_no_work_until_it_returns() {
    let cluster = TestCluster::start(vec![WorkerSpec::default()]).await;
    let pid = cluster.workers[0].pid();
    // A stopped process sends nothing: its heartbeats stop, as on a hung machine.
    send(pid, libc::SIGSTOP);
    let driver = cluster.driver().await;
    wait_until(Duration::from_secs(10), || {
        let mut driver = driver.clone();
        async move {
            let status = driver
                .get_cluster_status(GetClusterStatusRequest {})
                .await
                .unwrap()
                .into_inner();
            status
                .workers
                .iter()
                .all(|w| !w.healthy && w.health_reason == "missed its heartbeats")
        }
    })
    .await
    .expect("the silent worker is marked unhealthy");
    let submitted = cluster.submit(prompt("while the worker is silent")).await;
    let waiting = cluster.task(&submitted.task_id).await;
    assert_eq!(waiting.status(), TaskStatus::Pending);
    assert_eq!(
        waiting.status_reason,
        "waiting for a worker: none is healthy"
    );
    send(pid, libc::SIGCONT);
    let (task, _) = cluster.finish(&submitted.task_id).await;
    assert_eq!(
        task.status(),
        TaskStatus::Completed,
        "{}",
        task.status_reason
    );
}

#[allow(unsafe_code)]
fn send(pid: u32, signal: i32) {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0);
}

#[tokio::test]
async fn a_tasks_environment_reaches_its_agent_but_no_client_and_cannot_be_the_workers() {
    let cluster = TestCluster::start(vec![WorkerSpec::default()]).await;
    let spec = TaskSpec {
        environment: [("DEPLOY_TOKEN".to_owned(), "s3cret-value".to_owned())].into(),
        ..with_tools("BASH echo $DEPLOY_TOKEN", &["Bash"])
    };
    let submitted = cluster.submit(spec).await;
    let hidden = |task: &Task| task.spec.as_ref().unwrap().environment["DEPLOY_TOKEN"].clone();
    assert_eq!(hidden(&submitted), "(hidden)");
    let (task, _) = cluster.finish(&submitted.task_id).await;
    assert_eq!(
        task.result.as_ref().unwrap().text,
        "MOCK_DONE s3cret-value",
        "the agent got the value"
    );
    assert_eq!(hidden(&task), "(hidden)");
    let listed = cluster
        .driver()
        .await
        .list_tasks(ListTasksRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hidden(&listed.tasks[0]), "(hidden)");

    let redirect = TaskSpec {
        environment: [(
            "ANTHROPIC_BASE_URL".to_owned(),
            "http://127.0.0.1:9".to_owned(),
        )]
        .into(),
        ..prompt("send the key elsewhere")
    };
    let refused = cluster
        .driver()
        .await
        .submit_task(SubmitTaskRequest {
            spec: Some(redirect),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert_eq!(
        refused.message(),
        "spec.environment: `ANTHROPIC_BASE_URL` cannot be set by a task: the agent's API endpoint and credentials are the worker's"
    );
}

#[tokio::test]
async fn a_prompt_at_the_size_limit_reaches_the_agent_and_one_past_it_is_refused() {
    let cluster = TestCluster::start(vec![WorkerSpec::default()]).await;
    // 512 KiB in all: four times what Linux allows in one command-line argument.
    let limit = 512 * 1024;
    let prompt_text = format!("at the limit {}", "y".repeat(limit - 13));
    assert_eq!(prompt_text.len(), limit);
    let task = cluster.submit(prompt(&prompt_text)).await;
    let (ended, events) = cluster.finish(&task.task_id).await;
    assert_eq!(
        ended.status(),
        TaskStatus::Completed,
        "{}",
        ended.status_reason
    );
    let reply = ended.result.expect("a result").text;
    assert_eq!(
        reply,
        format!("MOCK_REPLY turn=1: {prompt_text}"),
        "the agent got the whole prompt"
    );
    assert!(
        cluster
            .api
            .requests()
            .iter()
            .any(|request| request.prompt().as_deref() == Some(prompt_text.as_str())),
        "the API saw the whole prompt"
    );
    assert!(events.len() > 3);

    let past = cluster
        .driver()
        .await
        .submit_task(SubmitTaskRequest {
            spec: Some(prompt(&format!("{prompt_text}!"))),
        })
        .await
        .unwrap_err();
    assert_eq!(past.code(), Code::InvalidArgument);
    assert_eq!(
        past.message(),
        format!(
            "spec.prompt: is {} bytes; at most {limit} are accepted (driver.maxPromptBytes)",
            limit + 1
        )
    );
}

#[tokio::test]
async fn a_clone_that_hangs_times_out_and_no_client_sees_the_urls_credentials() {
    let worker = WorkerSpec {
        extra_yaml: "cloneTimeout: 1\nallowedRepoSchemes: [https, http]\n".into(),
        ..WorkerSpec::default()
    };
    let cluster = TestCluster::start(vec![worker]).await;
    // A loopback server that accepts connections and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = silent.local_addr().unwrap();
    let holding = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((connection, _)) = silent.accept().await {
            held.push(connection);
        }
    });
    let secret = "s3cret-deploy-token";
    let task = cluster
        .submit(TaskSpec {
            repo_url: format!("http://deploy:{secret}@{address}/org/app.git"),
            ..prompt("work on the repository")
        })
        .await;
    let shown = format!("http://***@{address}/org/app.git");
    assert_eq!(task.spec.as_ref().unwrap().repo_url, shown);
    let (ended, events) = cluster.finish(&task.task_id).await;
    assert_eq!(ended.status(), TaskStatus::Failed);
    assert_eq!(
        ended.status_reason,
        format!("cannot clone {shown}: timed out after 1 s (`worker.cloneTimeout`)")
    );
    let listed = cluster
        .driver()
        .await
        .list_tasks(ListTasksRequest::default())
        .await
        .unwrap()
        .into_inner();
    let everything = format!("{ended:?} {events:?} {listed:?}");
    assert!(!everything.contains(secret), "the credential leaked");
    holding.abort();
}

#[tokio::test]
async fn an_agents_five_megabyte_line_is_cut_and_never_taken_for_a_lost_worker() {
    let cluster = TestCluster::start(vec![WorkerSpec::default()]).await;
    let task = cluster.submit(prompt("LARGE 5000000")).await;
    let (ended, events) = cluster.finish(&task.task_id).await;
    assert_eq!(ended.attempt, 1, "the worker was never counted lost");
    let cut: Vec<&OutputLine> = events
        .iter()
        .filter_map(|event| match &event.kind {
            Some(event::Kind::Output(line)) if line.cut_bytes > 0 => Some(line),
            _ => None,
        })
        .collect();
    assert!(!cut.is_empty(), "the long lines say they were cut");
    for line in &cut {
        assert!(line.line.len() < (1 << 20) + 100, "{}", line.line.len());
        assert!(
            line.line
                .ends_with("more bytes, past worker.agent.maxLineBytes]"),
            "{}",
            &line.line[line.line.len() - 80..]
        );
    }
    // Cut short, the agent's answer is no answer: the task failed at once, and said why.
    assert_eq!(
        ended.status(),
        TaskStatus::Failed,
        "{}",
        ended.status_reason
    );
    assert!(
        ended
            .status_reason
            .contains("longer than worker.agent.maxLineBytes (1048576)"),
        "{}",
        ended.status_reason
    );
    // The cluster goes on: the next task runs on the same worker.
    let next = cluster.submit(prompt("after the large one")).await;
    let (next, _) = cluster.finish(&next.task_id).await;
    assert_eq!(
        next.status(),
        TaskStatus::Completed,
        "{}",
        next.status_reason
    );
}
