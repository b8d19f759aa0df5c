//! Requests a careless or hostile client could send, each against a running cluster of real
//! processes: every one gets a clear status naming what was wrong, no process dies, and no task
//! is left RUNNING or ASSIGNED.

use std::collections::HashMap;
use std::time::Duration;

use claudecluster_integration_tests::*;
use claudecluster_proto::v1::*;
use tonic::Code;

/// A selector no test worker carries: tasks with it wait, PENDING, without running.
fn parked(text: &str) -> TaskSpec {
    TaskSpec {
        worker_selector: HashMap::from([("parked".to_owned(), "true".to_owned())]),
        ..prompt(text)
    }
}

fn chain(length: usize, root: TaskSpec) -> Vec<BatchTask> {
    (0..length)
        .map(|index| BatchTask {
            key: format!("t{index}"),
            spec: Some(TaskSpec {
                depends_on: if index == 0 {
                    Vec::new()
                } else {
                    vec![format!("t{}", index - 1)]
                },
                ..if index == 0 {
                    root.clone()
                } else {
                    prompt("the next step of the chain, once the one before it completed")
                }
            }),
        })
        .collect()
}

#[tokio::test]
async fn a_deep_batch_at_the_limit_works_and_past_it_or_past_the_message_size_is_refused() {
    let mut cluster = TestCluster::start(vec![WorkerSpec::default()]).await;
    let mut driver = cluster.driver().await;

    // 100,000 tasks each depending on the next: about 7 MB, past the message limit.
    let huge = driver
        .submit_tasks(SubmitTasksRequest {
            tasks: chain(100_000, parked("root")),
        })
        .await
        .unwrap_err();
    assert_eq!(huge.code(), Code::OutOfRange, "{huge:?}");
    assert!(
        huge.message()
            .starts_with("Error, decoded message length too large: found 8")
            && huge.message().ends_with("the limit is: 4194304 bytes"),
        "{}",
        huge.message()
    );

    // One past driver.maxBatchSize.
    let past = driver
        .submit_tasks(SubmitTasksRequest {
            tasks: chain(1001, parked("root")),
        })
        .await
        .unwrap_err();
    assert_eq!(past.code(), Code::InvalidArgument);
    assert_eq!(
        past.message(),
        "tasks: 1001 tasks are more than a batch may hold (1000, `driver.maxBatchSize`)"
    );

    // At the limit: a chain 1000 deep is taken whole; cancelling its root cancels every task
    // after it.
    let started = std::time::Instant::now();
    let accepted = driver
        .submit_tasks(SubmitTasksRequest {
            tasks: chain(1000, parked("root")),
        })
        .await
        .unwrap()
        .into_inner()
        .tasks;
    eprintln!(
        "a chain of 1000 tasks accepted in {} ms",
        started.elapsed().as_millis()
    );
    assert_eq!(accepted.len(), 1000);
    driver
        .cancel_task(CancelTaskRequest {
            task_id: accepted[0].task_id.clone(),
            reason: "test".into(),
        })
        .await
        .unwrap();
    let last = &accepted[999].task_id;
    let (ended, _) = cluster.finish(last).await;
    assert_eq!(
        ended.status(),
        TaskStatus::Cancelled,
        "{}",
        ended.status_reason
    );
    let open: Vec<_> = cluster
        .all_tasks()
        .await
        .into_iter()
        .filter(|task| !task.status().is_terminal())
        .collect();
    assert!(open.is_empty(), "{} tasks did not end", open.len());

    // The cluster still runs a normal task.
    let normal = cluster.submit(prompt("hello")).await;
    assert_eq!(
        cluster.finish(&normal.task_id).await.0.status(),
        TaskStatus::Completed
    );
    cluster.assert_unharmed().await;
}

#[tokio::test]
async fn repository_schemes_outside_the_allow_list_are_refused_by_driver_and_worker() {
    let mut cluster = TestCluster::start(vec![WorkerSpec::default()]).await;
    let worker_id = cluster.worker_ids[0].clone();
    let mut driver = cluster.driver().await;
    for (url, scheme) in [
        ("http://git.example/org/app.git", "http"),
        ("git://git.example/app.git", "git"),
        ("file:///srv/app.git", "file"),
        ("/srv/app.git", "file"),
    ] {
        let refused = driver
            .submit_task(SubmitTaskRequest {
                spec: Some(TaskSpec {
                    repo_url: url.into(),
                    ..prompt("hello")
                }),
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{url}");
        assert_eq!(
            refused.message(),
            format!(
                "spec.repo_url: scheme `{scheme}` is not in worker.allowedRepoSchemes (https, ssh) on worker {worker_id}, and no registered worker (1) admits it"
            )
        );
    }
    // git's own transports for running commands never reach git.
    let helper = driver
        .submit_task(SubmitTaskRequest {
            spec: Some(TaskSpec {
                repo_url: "ext::sh".into(),
                ..prompt("hello")
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(helper.code(), Code::InvalidArgument);
    assert_eq!(
        helper.message(),
        "spec.repo_url: `ext::sh` names a git remote helper, which is not supported"
    );

    // The worker checks again what reaches it without a driver.
    let mut worker = cluster.worker_client(0);
    let direct = worker
        .execute_task(ExecuteTaskRequest {
            task_id: "direct-1".into(),
            attempt: 1,
            spec: Some(TaskSpec {
                repo_url: "http://git.example/org/app.git".into(),
                ..prompt("hello")
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(direct.code(), Code::InvalidArgument);
    assert_eq!(
        direct.message(),
        "spec.repo_url: scheme `http` is not in worker.allowedRepoSchemes (https, ssh)"
    );
    cluster.assert_unharmed().await;
}

#[tokio::test]
async fn a_worker_refuses_ids_that_would_leave_its_workspace_root() {
    let mut cluster = TestCluster::start(vec![WorkerSpec::default()]).await;
    let mut worker = cluster.worker_client(0);
    for (task_id, message) in [
        ("..", "task_id: must be letters, digits, '-' or '_'"),
        ("a/b", "task_id: must be letters, digits, '-' or '_'"),
        (
            "sessions",
            "task_id: `sessions` is a name the worker keeps for itself",
        ),
        ("", "task_id: must have 1 to 128 characters"),
    ] {
        let refused = worker
            .execute_task(ExecuteTaskRequest {
                task_id: task_id.into(),
                attempt: 1,
                spec: Some(prompt("hello")),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{task_id}");
        assert_eq!(refused.message(), message, "{task_id}");
    }
    let workspaces = cluster.workspaces(&cluster.worker_ids[0]);
    let made: Vec<_> = std::fs::read_dir(&workspaces)
        .map(|dir| dir.flatten().map(|entry| entry.file_name()).collect())
        .unwrap_or_default();
    assert!(
        made.iter()
            .all(|name| name.to_string_lossy().starts_with('.')),
        "the refused tasks made workspaces: {made:?}"
    );
    cluster.assert_unharmed().await;
}

#[tokio::test]
async fn limits_and_budgets_past_what_workers_allow_name_the_field_and_the_setting() {
    let worker = WorkerSpec {
        extra_yaml: "maxTaskLimits:\n  memory: 4GiB\n  budgetUsd: 5\n".into(),
        ..WorkerSpec::default()
    };
    let mut cluster = TestCluster::start(vec![worker]).await;
    let worker_id = cluster.worker_ids[0].clone();
    let mut driver = cluster.driver().await;
    let limits = |limits: ResourceLimits| TaskSpec {
        limits: Some(limits),
        ..prompt("hello")
    };
    let budget = |usd: f64| TaskSpec {
        agent: Some(AgentOptions {
            max_budget_usd: usd,
            ..Default::default()
        }),
        ..prompt("hello")
    };
    let beyond = |field: &str, asked: &str, allowed: &str, key: &str| {
        format!(
            "{field}: {asked} is more than the {allowed} of worker.maxTaskLimits.{key} on worker {worker_id}, and no registered worker (1) admits it"
        )
    };
    let cases = [
        (
            limits(ResourceLimits {
                memory_bytes: 1000,
                ..Default::default()
            }),
            "spec.limits.memory_bytes: is 1000; an agent needs at least 6291456 (0 means the worker's default)".to_owned(),
        ),
        (
            limits(ResourceLimits {
                memory_bytes: 1 << 40,
                ..Default::default()
            }),
            beyond("spec.limits.memory_bytes", "1099511627776", "4294967296", "memory"),
        ),
        (
            limits(ResourceLimits {
                cpus: -1.0,
                ..Default::default()
            }),
            "spec.limits.cpus: is -1; it must be 0 (the worker's default) or at least 0.01 cores"
                .to_owned(),
        ),
        (
            limits(ResourceLimits {
                cpus: f64::NAN,
                ..Default::default()
            }),
            "spec.limits.cpus: is NaN; it must be 0 (the worker's default) or at least 0.01 cores"
                .to_owned(),
        ),
        (
            limits(ResourceLimits {
                cpus: 1e9,
                ..Default::default()
            }),
            beyond("spec.limits.cpus", "1000000000", "16", "cpu"),
        ),
        (
            limits(ResourceLimits {
                pids: 1,
                ..Default::default()
            }),
            "spec.limits.pids: is 1; an agent needs at least 16 processes (0 means the worker's default)".to_owned(),
        ),
        (
            limits(ResourceLimits {
                timeout_seconds: u32::MAX,
                ..Default::default()
            }),
            beyond("spec.limits.timeout_seconds", "4294967295", "86400", "timeout"),
        ),
        (
            budget(-0.5),
            "spec.agent.max_budget_usd: is -0.5; it must be 0 (no budget) or more".to_owned(),
        ),
        (
            budget(f64::INFINITY),
            "spec.agent.max_budget_usd: is inf; it must be 0 (no budget) or more".to_owned(),
        ),
        (
            budget(5.01),
            beyond("spec.agent.max_budget_usd", "5.01", "5", "budgetUsd"),
        ),
    ];
    for (spec, message) in cases {
        let refused = driver
            .submit_task(SubmitTaskRequest { spec: Some(spec) })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{message}");
        assert_eq!(refused.message(), message);
    }
    // At the maximum, the task runs.
    let at = cluster
        .submit(TaskSpec {
            limits: Some(ResourceLimits {
                memory_bytes: 4 << 30,
                timeout_seconds: 86_400,
                ..Default::default()
            }),
            agent: Some(AgentOptions {
                max_budget_usd: 5.0,
                ..Default::default()
            }),
            ..prompt("hello")
        })
        .await;
    let (ended, _) = cluster.finish(&at.task_id).await;
    assert_eq!(
        ended.status(),
        TaskStatus::Completed,
        "{}",
        ended.status_reason
    );
    cluster.assert_unharmed().await;
}

#[tokio::test]
async fn a_list_page_always_fits_the_response_limit() {
    let mut cluster = TestCluster::start(vec![WorkerSpec::default()]).await;
    let mut driver = cluster.driver().await;
    // Tasks as large as they may be: a 512 KiB prompt and 64 labels of 1 KiB each. Ten of them
    // hold over 5 MB, more than one response carries.
    let labels: HashMap<String, String> = (0..64)
        .map(|index| (format!("label-{index}"), "v".repeat(1024)))
        .collect();
    let mut ids = Vec::new();
    for _ in 0..10 {
        let task = cluster
            .submit(TaskSpec {
                labels: labels.clone(),
                ..parked(&"p".repeat(512 << 10))
            })
            .await;
        ids.push(task.task_id);
    }
    let whole = cluster.task(&ids[0]).await;
    assert_eq!(whole.spec.as_ref().unwrap().prompt.len(), 512 << 10);
    assert!(!whole.shortened);

    let mut listed = Vec::new();
    let mut page_token = String::new();
    let mut pages = 0;
    loop {
        let page = driver
            .list_tasks(ListTasksRequest {
                page_size: 1000,
                page_token,
                ..Default::default()
            })
            .await
            .expect("every page fits")
            .into_inner();
        pages += 1;
        for task in &page.tasks {
            assert!(task.shortened, "a listed 512 KiB prompt is shortened");
            assert!(task.spec.as_ref().unwrap().prompt.len() <= 1024);
            assert_eq!(task.spec.as_ref().unwrap().labels.len(), 64);
        }
        listed.extend(page.tasks.into_iter().map(|task| task.task_id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(listed, ids, "every task listed once, in order");
    eprintln!("10 tasks of 576 KiB listed in {pages} pages");

    for task_id in ids {
        driver
            .cancel_task(CancelTaskRequest {
                task_id,
                reason: String::new(),
            })
            .await
            .unwrap();
    }
    cluster.assert_unharmed().await;
}

#[tokio::test]
async fn credentials_in_a_repository_url_reach_no_client() {
    let mut cluster = TestCluster::start(vec![WorkerSpec::default()]).await;
    // Nothing listens on port 1: the clone fails at once, and git names the URL it tried.
    let secret = "ghp_s3cretT0ken";
    let url = format!("https://deploy:{secret}@127.0.0.1:1/org/app.git");
    let task = cluster
        .submit(TaskSpec {
            repo_url: url.clone(),
            ..prompt("work on the repository")
        })
        .await;
    let (ended, events) = cluster.finish(&task.task_id).await;
    assert_eq!(ended.status(), TaskStatus::Failed);
    assert!(
        ended
            .status_reason
            .starts_with("cannot clone https://***@127.0.0.1:1/org/app.git: "),
        "{}",
        ended.status_reason
    );
    let listed = cluster.all_tasks().await;
    let mut everything = format!("{ended:?} {events:?} {listed:?}");
    // And no log line of any service.
    everything.push_str(&cluster.driver.log());
    everything.push_str(&cluster.scheduler.log());
    everything.push_str(&cluster.workers[0].log());
    assert!(
        cluster.workers[0].log().contains("cannot clone"),
        "the worker logs the failed clone"
    );
    assert!(!everything.contains(secret), "the credential leaked");
    cluster.assert_unharmed().await;
}

#[tokio::test]
async fn oversized_and_malformed_fields_are_refused_naming_them() {
    let mut cluster = TestCluster::start(vec![WorkerSpec::default()]).await;
    let mut driver = cluster.driver().await;
    let cases = [
        (
            TaskSpec {
                labels: (0..65).map(|i| (format!("k{i}"), "v".into())).collect(),
                ..prompt("hello")
            },
            "spec.labels: has 65 entries; at most 64 are accepted",
        ),
        (
            TaskSpec {
                environment: HashMap::from([("BIG".to_owned(), "x".repeat(70_000))]),
                ..prompt("hello")
            },
            "spec.environment: holds 70003 bytes; at most 65536 are accepted",
        ),
        (
            TaskSpec {
                environment: HashMap::from([(
                    "ANTHROPIC_BASE_URL".to_owned(),
                    "http://evil".to_owned(),
                )]),
                ..prompt("hello")
            },
            "spec.environment: `ANTHROPIC_BASE_URL` cannot be set by a task: the agent's API endpoint and credentials are the worker's",
        ),
        (
            TaskSpec {
                agent: Some(AgentOptions {
                    append_system_prompt: "s".repeat(70_000),
                    ..Default::default()
                }),
                ..prompt("hello")
            },
            "spec.agent.append_system_prompt: is 70000 bytes; at most 65536 are accepted",
        ),
        (
            TaskSpec {
                agent: Some(AgentOptions {
                    model: "--dangerously-skip-permissions".into(),
                    ..Default::default()
                }),
                ..prompt("hello")
            },
            "spec.agent.model: must not start with '-'",
        ),
        (
            TaskSpec {
                execution_mode: 99,
                ..prompt("hello")
            },
            "spec.execution_mode: 99 is not an execution mode",
        ),
        (
            prompt("nul \0 inside"),
            "spec.prompt: must not contain NUL characters",
        ),
    ];
    for (spec, message) in cases {
        let refused = driver
            .submit_task(SubmitTaskRequest { spec: Some(spec) })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{message}");
        assert_eq!(refused.message(), message);
    }
    for (task_id, code) in [
        ("", Code::InvalidArgument),
        ("../../etc/passwd", Code::InvalidArgument),
        ("no-such-task", Code::NotFound),
    ] {
        let status = driver
            .get_task(GetTaskRequest {
                task_id: task_id.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), code, "{task_id}: {}", status.message());
    }
    let huge_id = driver
        .get_task(GetTaskRequest {
            task_id: "x".repeat(1 << 20),
        })
        .await
        .unwrap_err();
    assert_eq!(huge_id.code(), Code::InvalidArgument);
    assert_eq!(huge_id.message(), "task_id: must have 1 to 128 characters");
    let bad_page = driver
        .list_tasks(ListTasksRequest {
            page_token: "-5".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_page.code(), Code::InvalidArgument);
    assert_eq!(
        bad_page.message(),
        "page_token: is not a token this server returned"
    );
    let session_text = driver
        .send_session_message(SendSessionMessageRequest {
            session_id: "nope".into(),
            text: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(session_text.code(), Code::NotFound);
    // Within every bound, a task still runs.
    tokio::time::timeout(Duration::from_secs(60), async {
        let task = cluster.submit(prompt("hello")).await;
        assert_eq!(
            cluster.finish(&task.task_id).await.0.status(),
            TaskStatus::Completed
        );
    })
    .await
    .unwrap();
    cluster.assert_unharmed().await;
}

#[tokio::test]
async fn variables_the_agent_or_its_credentials_depend_on_are_refused_by_driver_and_worker() {
    let worker = WorkerSpec {
        agent_yaml: "  allowedTaskEnv: [DEPLOY_TOKEN]\n".into(),
        ..WorkerSpec::default()
    };
    let mut cluster = TestCluster::start(vec![worker]).await;
    let mut driver = cluster.driver().await;
    for name in [
        "PATH",
        "HOME",
        "USER",
        "SHELL",
        "LD_PRELOAD",
        "NODE_OPTIONS",
        "NODE_TLS_REJECT_UNAUTHORIZED",
        "NPM_CONFIG_REGISTRY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "SSL_CERT_FILE",
        "GIT_SSH_COMMAND",
        "CLAUDE_CONFIG_DIR",
        "CLAUDE_CODE_OAUTH_TOKEN",
        "ANTHROPIC_API_KEY",
        "anthropic_base_url",
        "https_proxy",
        "Path",
    ] {
        let refused = driver
            .submit_task(SubmitTaskRequest {
                spec: Some(TaskSpec {
                    environment: HashMap::from([(name.to_owned(), "x".to_owned())]),
                    ..prompt("hello")
                }),
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{name}");
        assert!(
            refused
                .message()
                .starts_with(&format!("spec.environment: `{name}` ")),
            "{name}: {}",
            refused.message()
        );
        // The worker refuses it too, whoever sends it.
        let direct = cluster
            .worker_client(0)
            .execute_task(ExecuteTaskRequest {
                task_id: "direct-env".into(),
                attempt: 1,
                spec: Some(TaskSpec {
                    environment: HashMap::from([(name.to_owned(), "x".to_owned())]),
                    ..prompt("hello")
                }),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(direct.code(), Code::InvalidArgument, "{name}");
    }
    // In allow-list mode the worker takes only what it lists: the task fails at once, saying
    // so, and runs once.
    let other = cluster
        .submit(TaskSpec {
            environment: HashMap::from([("OTHER".to_owned(), "x".to_owned())]),
            ..prompt("hello")
        })
        .await;
    let (ended, _) = cluster.finish(&other.task_id).await;
    assert_eq!(ended.status(), TaskStatus::Failed);
    assert!(
        ended.status_reason.ends_with(
            "spec.environment: `OTHER` is not one of the variables this worker lets tasks set (worker.agent.allowedTaskEnv: DEPLOY_TOKEN)"
        ),
        "{}",
        ended.status_reason
    );
    assert_eq!(ended.attempt, 1);
    let listed = cluster
        .submit(TaskSpec {
            environment: HashMap::from([("DEPLOY_TOKEN".to_owned(), "x".to_owned())]),
            ..prompt("hello")
        })
        .await;
    let (ended, _) = cluster.finish(&listed.task_id).await;
    assert_eq!(
        ended.status(),
        TaskStatus::Completed,
        "{}",
        ended.status_reason
    );
    cluster.assert_unharmed().await;
}

#[tokio::test]
async fn agents_run_unrestricted_only_where_the_worker_permits_it() {
    let strict = WorkerSpec {
        agent_yaml: "  permits:\n    unrestrictedBash: false\n".into(),
        ..WorkerSpec::default()
    };
    let mut cluster = TestCluster::start(vec![strict]).await;
    let worker_id = cluster.worker_ids[0].clone();
    let mut driver = cluster.driver().await;
    let submit = |agent: AgentOptions| {
        let mut driver = driver.clone();
        async move {
            driver
                .submit_task(SubmitTaskRequest {
                    spec: Some(TaskSpec {
                        agent: Some(agent),
                        ..prompt("BASH echo hi")
                    }),
                })
                .await
        }
    };
    let bypass = submit(AgentOptions {
        permission_mode: "bypassPermissions".into(),
        ..Default::default()
    })
    .await
    .unwrap_err();
    assert_eq!(bypass.code(), Code::InvalidArgument);
    assert_eq!(
        bypass.message(),
        format!(
            "spec.agent.permission_mode: `bypassPermissions` is not permitted by worker.agent.permits.bypassPermissions on worker {worker_id}, and no registered worker (1) admits it"
        )
    );
    let bash = submit(AgentOptions {
        allowed_tools: vec!["Bash".into()],
        ..Default::default()
    })
    .await
    .unwrap_err();
    assert_eq!(bash.code(), Code::InvalidArgument);
    assert!(
        bash.message().starts_with(
            "spec.agent.allowed_tools: unrestricted `Bash` is not permitted by worker.agent.permits.unrestrictedBash"
        ),
        "{}",
        bash.message()
    );
    // Bash restricted to named commands is fine.
    let named = submit(AgentOptions {
        allowed_tools: vec!["Bash(echo:*)".into()],
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .task
    .unwrap();
    let (ended, _) = cluster.finish(&named.task_id).await;
    assert_eq!(
        ended.status(),
        TaskStatus::Completed,
        "{}",
        ended.status_reason
    );
    assert_eq!(ended.result.unwrap().text, "MOCK_DONE hi");
    let _ = &mut driver;
    cluster.assert_unharmed().await;
}
