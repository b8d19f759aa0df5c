//! The seed's unified suite: the same tests against both execution modes, with real
//! processes and the real Claude Code CLI (in containers, for container mode) against the
//! stand-in Messages API. Container tests also check that no container is left behind.

use std::time::Duration;

use claudecluster_integration_tests::docker::assert_agent_containers_removed;
use claudecluster_integration_tests::*;
use claudecluster_proto::v1::event::Kind;
use claudecluster_proto::v1::*;

/// In container mode, the worker removed every agent container it made.
async fn assert_no_containers(cluster: &TestCluster, mode: Mode) {
    if mode == Mode::Container {
        for worker in &cluster.worker_ids {
            assert_agent_containers_removed(&format!("claudecluster.worker={worker}")).await;
        }
    }
}

macro_rules! in_both_modes {
    ($($test:ident),* $(,)?) => {
        mod process_pool {
            use super::*;
            $(#[tokio::test] async fn $test() { super::$test(Mode::ProcessPool).await })*
        }
        mod container_agentic {
            use super::*;
            $(#[tokio::test] async fn $test() { super::$test(Mode::Container).await })*
        }
    };
}

in_both_modes!(
    a_plain_prompt_streams_its_events_and_completes,
    a_tool_call_writes_a_file_into_the_task_workspace,
    an_api_error_fails_the_task_with_the_reason,
    a_hanging_agent_is_stopped_by_the_idle_watchdog,
    a_task_past_its_timeout_fails,
    a_running_task_is_cancelled,
    tasks_beyond_capacity_wait_and_all_finish,
    a_repository_is_cloned_into_the_workspace_and_a_bad_one_fails_the_task,
);

async fn a_plain_prompt_streams_its_events_and_completes(mode: Mode) {
    let cluster = TestCluster::start(vec![WorkerSpec::in_mode(mode)]).await;
    let submitted = cluster.submit(prompt("hello from the test")).await;
    assert_eq!(submitted.status(), TaskStatus::Pending);
    let (task, events) = cluster.finish(&submitted.task_id).await;

    assert_eq!(
        task.status(),
        TaskStatus::Completed,
        "{}",
        task.status_reason
    );
    assert_eq!(
        statuses(&events),
        vec![
            TaskStatus::Pending,
            TaskStatus::Assigned,
            TaskStatus::Running,
            TaskStatus::Completed
        ]
    );
    let sequences: Vec<u64> = events.iter().map(|e| e.sequence).collect();
    assert_eq!(
        sequences,
        (1..=events.len() as u64).collect::<Vec<_>>(),
        "no gaps, no repeats"
    );
    assert!(events.iter().any(|e| matches!(&e.kind, Some(Kind::Init(init)) if init.claude_code_version == CLAUDE_CODE_VERSION)));
    assert!(events.iter().any(|e| matches!(&e.kind, Some(Kind::Text(t)) if t.text == "MOCK_REPLY turn=1: hello from the test")));
    let result = task.result.expect("the result is recorded on the task");
    assert_eq!(result.text, "MOCK_REPLY turn=1: hello from the test");
    assert!(!result.is_error);
    assert_eq!(result.num_turns, 1);
    assert!(result.total_cost_usd > 0.0);
    assert!(result.usage.unwrap().input_tokens > 0);
    assert_eq!(task.worker_id, cluster.worker_ids[0]);
    assert!(task.start_time.is_some() && task.end_time.is_some());
    // The agent got the worker's API key and the prompt went to the stand-in.
    let requests = cluster.api.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.prompt().as_deref() == Some("hello from the test"))
    );
    assert!(
        requests
            .iter()
            .all(|r| r.api_key.as_deref() == Some("sk-ant-standin-secret"))
    );
    assert_no_containers(&cluster, mode).await;
}

async fn a_tool_call_writes_a_file_into_the_task_workspace(mode: Mode) {
    let cluster = TestCluster::start(vec![WorkerSpec::in_mode(mode)]).await;
    let submitted = cluster
        .submit(with_tools("WRITE notes/out.txt hello world", &["Write"]))
        .await;
    let (task, events) = cluster.finish(&submitted.task_id).await;

    assert_eq!(
        task.status(),
        TaskStatus::Completed,
        "{}",
        task.status_reason
    );
    let workspace = cluster
        .workspaces(&cluster.worker_ids[0])
        .join(&task.task_id);
    assert_eq!(task.workspace, workspace.display().to_string());
    let written =
        std::fs::read_to_string(workspace.join("notes/out.txt")).expect("the agent wrote the file");
    assert_eq!(written, "hello world\n");
    let tool_use = events.iter().find_map(|e| match &e.kind {
        Some(Kind::ToolUse(tool)) => Some(tool.clone()),
        _ => None,
    });
    let tool_use = tool_use.expect("a tool_use event");
    assert_eq!(tool_use.name, "Write");
    assert!(events.iter().any(|e| matches!(&e.kind,
        Some(Kind::ToolResult(r)) if r.tool_use_id == tool_use.tool_use_id && !r.is_error)));
    assert_eq!(task.result.unwrap().num_turns, 2);
    assert_no_containers(&cluster, mode).await;
}

async fn an_api_error_fails_the_task_with_the_reason(mode: Mode) {
    let cluster = TestCluster::start(vec![WorkerSpec::in_mode(mode)]).await;
    let submitted = cluster.submit(prompt("ERROR 529")).await;
    let (task, events) = cluster.finish(&submitted.task_id).await;
    assert_eq!(task.status(), TaskStatus::Failed);
    assert!(
        task.status_reason.contains("api error (status 529)"),
        "{}",
        task.status_reason
    );
    assert!(
        task.status_reason.contains("overloaded_error"),
        "{}",
        task.status_reason
    );
    assert!(events.iter().any(
        |e| matches!(&e.kind, Some(Kind::Result(r)) if r.is_error && r.api_error_status == 529)
    ));
    assert_no_containers(&cluster, mode).await;
}

async fn a_hanging_agent_is_stopped_by_the_idle_watchdog(mode: Mode) {
    let worker = WorkerSpec {
        idle_timeout: Duration::from_secs(2),
        grace_period: Duration::from_millis(500),
        ..WorkerSpec::in_mode(mode)
    };
    let cluster = TestCluster::start(vec![worker]).await;
    let submitted = cluster.submit(prompt("HANG")).await;
    let (task, events) = cluster.finish(&submitted.task_id).await;
    assert_eq!(task.status(), TaskStatus::Failed);
    assert!(
        task.status_reason.contains("printed nothing for 2 s")
            && task.status_reason.contains("idle watchdog"),
        "{}",
        task.status_reason
    );
    assert_eq!(*statuses(&events).last().unwrap(), TaskStatus::Failed);
    assert_no_containers(&cluster, mode).await;
}

async fn a_task_past_its_timeout_fails(mode: Mode) {
    let cluster = TestCluster::start(vec![WorkerSpec::in_mode(mode)]).await;
    let spec = TaskSpec {
        limits: Some(ResourceLimits {
            timeout_seconds: 1,
            ..Default::default()
        }),
        ..prompt("SLOW 40 100")
    };
    let submitted = cluster.submit(spec).await;
    let (task, _) = cluster.finish(&submitted.task_id).await;
    assert_eq!(task.status(), TaskStatus::Failed);
    assert_eq!(task.status_reason, "timed out after 1 s");
    assert_no_containers(&cluster, mode).await;
}

async fn a_running_task_is_cancelled(mode: Mode) {
    let cluster = TestCluster::start(vec![WorkerSpec::in_mode(mode)]).await;
    let submitted = cluster.submit(prompt("HANG")).await;
    // The CLI is up and waiting on the API.
    cluster.wait_for_agent(&submitted.task_id).await;
    let mut driver = cluster.driver().await;
    let cancelled = driver
        .cancel_task(CancelTaskRequest {
            task_id: submitted.task_id.clone(),
            reason: "no longer needed".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(cancelled.status(), TaskStatus::Cancelled);
    assert_eq!(cancelled.status_reason, "no longer needed");
    let (task, events) = cluster.finish(&submitted.task_id).await;
    assert_eq!(task.status(), TaskStatus::Cancelled);
    assert_eq!(statuses(&events).last(), Some(&TaskStatus::Cancelled));
    // The worker's slot is free again: a new task runs.
    let next = cluster.submit(prompt("after the cancel")).await;
    assert_eq!(
        cluster.finish(&next.task_id).await.0.status(),
        TaskStatus::Completed
    );
    assert_no_containers(&cluster, mode).await;
}

async fn tasks_beyond_capacity_wait_and_all_finish(mode: Mode) {
    let worker = WorkerSpec {
        capacity: 2,
        ..WorkerSpec::in_mode(mode)
    };
    let cluster = TestCluster::start(vec![worker]).await;
    // The worker's load as the scheduler places on it, sampled until every task has ended.
    // (The driver's event times cannot tell: it stamps a task's end and the next one's
    // placement as they reach it, over two connections.)
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let mut driver = cluster.driver().await;
        let done = std::sync::Arc::clone(&done);
        tokio::spawn(async move {
            let mut highest = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let status = driver
                    .get_cluster_status(GetClusterStatusRequest {})
                    .await
                    .unwrap()
                    .into_inner();
                highest = status
                    .workers
                    .iter()
                    .map(|w| w.load)
                    .max()
                    .unwrap_or(0)
                    .max(highest);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            highest
        })
    };
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            cluster
                .submit(prompt(&format!("SLOW 3 150 #{i}")))
                .await
                .task_id,
        );
    }
    for id in &ids {
        let (task, _) = cluster.finish(id).await;
        assert_eq!(
            task.status(),
            TaskStatus::Completed,
            "{}",
            task.status_reason
        );
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    // At no moment were more than two tasks on the worker, and two were.
    assert_eq!(sampler.await.unwrap(), 2, "the highest load of the worker");
    assert_no_containers(&cluster, mode).await;
}

async fn a_repository_is_cloned_into_the_workspace_and_a_bad_one_fails_the_task(mode: Mode) {
    let repos = tempfile::tempdir().unwrap();
    let source = repos.path().join("source");
    std::fs::create_dir(&source).unwrap();
    git(&["init", "-q", "-b", "main"], &source);
    std::fs::write(source.join("README.md"), "the repository readme\n").unwrap();
    git(&["add", "README.md"], &source);
    git(&["commit", "-q", "-m", "first"], &source);
    let bare = repos.path().join("app.git");
    git(
        &[
            "clone",
            "-q",
            "--bare",
            source.to_str().unwrap(),
            bare.to_str().unwrap(),
        ],
        repos.path(),
    );

    let worker = WorkerSpec {
        extra_yaml: "allowedRepoSchemes: [file]\n".into(),
        ..WorkerSpec::in_mode(mode)
    };
    let cluster = TestCluster::start(vec![worker]).await;
    let spec = TaskSpec {
        repo_url: format!("file://{}", bare.display()),
        ..with_tools("BASH cat README.md", &["Bash"])
    };
    let submitted = cluster.submit(spec).await;
    let (task, _) = cluster.finish(&submitted.task_id).await;
    assert_eq!(
        task.status(),
        TaskStatus::Completed,
        "{}",
        task.status_reason
    );
    assert_eq!(task.result.unwrap().text, "MOCK_DONE the repository readme");

    let spec = TaskSpec {
        repo_url: format!("file://{}/missing.git", repos.path().display()),
        ..prompt("hello")
    };
    let submitted = cluster.submit(spec).await;
    let (task, events) = cluster.finish(&submitted.task_id).await;
    assert_eq!(task.status(), TaskStatus::Failed);
    assert!(
        task.status_reason.starts_with("cannot clone file://"),
        "{}",
        task.status_reason
    );
    assert!(
        task.status_reason
            .contains("does not appear to be a git repository"),
        "{}",
        task.status_reason
    );
    assert!(
        !statuses(&events).contains(&TaskStatus::Running),
        "no agent started"
    );
    assert_no_containers(&cluster, mode).await;
}

fn git(args: &[&str], dir: &std::path::Path) {
    let status = std::process::Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "test")
        .env("GIT_AUTHOR_EMAIL", "test@example.invalid")
        .env("GIT_COMMITTER_NAME", "test")
        .env("GIT_COMMITTER_EMAIL", "test@example.invalid")
        .status()
        .unwrap();
    assert!(status.success(), "git {args:?}");
}
