//! Generated requests, valid and not, for every RPC of the driver, the scheduler and the
//! worker, sent to a running cluster of real processes: every reply is a proper status, no
//! process dies, and the cluster still runs a normal task afterwards.
//!
//! `CLAUDECLUSTER_FUZZ_CASES` sets the number of cases (default 300); a longer run:
//!
//!     CLAUDECLUSTER_FUZZ_CASES=20000 cargo nextest run -p claudecluster-integration-tests --test fuzz_rpc --no-capture

use std::collections::HashMap;
use std::time::{Duration, Instant};

use claudecluster_grpc::ClusterChannel;
use claudecluster_integration_tests::*;
use claudecluster_proto::v1::scheduler_service_client::SchedulerServiceClient;
use claudecluster_proto::v1::worker_service_client::WorkerServiceClient;
use claudecluster_proto::v1::*;
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use tonic::Code;

/// Text a client could send: empty, ordinary, any unicode (control characters included),
/// names that mean something to a file system, and sizes up to past the message limit.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z0-9_-]{1,16}",
        3 => any::<String>(),
        2 => prop::collection::vec(any::<char>(), 0..300).prop_map(String::from_iter),
        1 => Just(String::new()),
        1 => prop::sample::select(vec!["..", "sessions", "a/b", "/etc/passwd", "\0", "-rf", "ext::sh", "${HOME}"])
            .prop_map(str::to_owned),
        1 => (0usize..800_000).prop_map(|n| "x".repeat(n)),
        1 => Just("y".repeat(5 << 20)),
    ]
}

fn short_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9_]{1,12}",
        any::<String>(),
        Just(String::new()),
        (0usize..3000).prop_map(|n| "k".repeat(n)),
    ]
}

fn map() -> impl Strategy<Value = HashMap<String, String>> {
    prop_oneof![
        3 => Just(HashMap::new()),
        2 => prop::collection::hash_map(short_text(), short_text(), 0..8),
        1 => prop::collection::hash_map("[A-Z_]{1,12}", short_text(), 0..300),
    ]
}

fn number() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(0.0),
        0.0..64.0,
        any::<f64>(),
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(-1.0),
    ]
}

fn big() -> impl Strategy<Value = u64> {
    prop_oneof![Just(0), 0u64..(64 << 30), any::<u64>()]
}

fn enum_value() -> impl Strategy<Value = i32> {
    prop_oneof![3 => 0i32..5, 1 => any::<i32>()]
}

fn repo_url() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just(String::new()),
        1 => prop::sample::select(vec![
            "https://user:tok@127.0.0.1:1/org/app.git",
            "http://127.0.0.1:1/app.git",
            "git@127.0.0.1:app.git",
            "file:///nonexistent.git",
            "/nonexistent.git",
            "ext::sh -c id",
            "--upload-pack=id",
            "fd::3",
        ])
        .prop_map(str::to_owned),
        1 => text(),
    ]
}

fn limits() -> impl Strategy<Value = Option<ResourceLimits>> {
    prop_oneof![
        2 => Just(None),
        1 => (big(), number(), any::<u32>(), any::<u32>()).prop_map(|(memory_bytes, cpus, timeout_seconds, pids)| {
            Some(ResourceLimits { memory_bytes, cpus, timeout_seconds, pids })
        }),
    ]
}

fn agent() -> impl Strategy<Value = Option<AgentOptions>> {
    prop_oneof![
        2 => Just(None),
        1 => (short_text(), prop::collection::vec(short_text(), 0..4), short_text(), any::<u32>(), number(), text())
            .prop_map(|(model, allowed_tools, permission_mode, max_turns, max_budget_usd, append_system_prompt)| {
                Some(AgentOptions {
                    model,
                    allowed_tools,
                    disallowed_tools: Vec::new(),
                    permission_mode,
                    max_turns,
                    max_budget_usd,
                    append_system_prompt,
                })
            }),
    ]
}

/// What a task asks of its result: branch names and templates, good and bad.
fn result() -> impl Strategy<Value = Option<ResultSpec>> {
    prop_oneof![
        3 => Just(None),
        1 => (short_text(), any::<bool>(), short_text(), text()).prop_map(
            |(branch, pull_request, pull_request_base, commit_message)| {
                Some(ResultSpec {
                    branch,
                    pull_request,
                    pull_request_base,
                    commit_message,
                })
            }
        ),
    ]
}

/// A task spec; about a third are plain valid tasks that run.
fn task_spec() -> impl Strategy<Value = TaskSpec> {
    let valid = "[a-z ]{1,40}".prop_map(|text| prompt(&format!("fuzz {text}")));
    let wild = (
        (text(), repo_url(), enum_value(), map(), limits()),
        (enum_value(), agent(), map(), short_text(), map()),
        (prop::collection::vec(short_text(), 0..5), result()),
    )
        .prop_map(
            |(
                (prompt, repo_url, execution_mode, worker_selector, limits),
                (priority, agent, labels, idempotency_key, environment),
                (depends_on, result),
            )| TaskSpec {
                prompt,
                repo_url,
                execution_mode,
                worker_selector,
                limits,
                priority,
                agent,
                labels,
                idempotency_key,
                environment,
                depends_on,
                result,
            },
        );
    prop_oneof![1 => valid, 2 => wild]
}

/// A batch: a random graph over random keys, or a deep chain (with, at times, a cycle).
fn batch() -> impl Strategy<Value = Vec<BatchTask>> {
    let graph = prop::collection::vec(
        (
            short_text(),
            task_spec(),
            prop::collection::vec(0usize..20, 0..3),
        ),
        0..20,
    )
    .prop_map(|tasks| {
        let keys: Vec<String> = tasks.iter().map(|(key, _, _)| key.clone()).collect();
        tasks
            .into_iter()
            .map(|(key, mut spec, edges)| {
                spec.depends_on = edges
                    .into_iter()
                    .filter_map(|edge| keys.get(edge).cloned())
                    .collect();
                BatchTask {
                    key,
                    spec: Some(spec),
                }
            })
            .collect()
    });
    let chain = (1usize..3000, any::<bool>()).prop_map(|(length, looped)| {
        (0..length)
            .map(|index| BatchTask {
                key: format!("k{index}"),
                spec: Some(TaskSpec {
                    depends_on: match (index, looped) {
                        (0, true) => vec![format!("k{}", length - 1)],
                        (0, false) => Vec::new(),
                        _ => vec![format!("k{}", index - 1)],
                    },
                    worker_selector: HashMap::from([("parked".into(), "yes".into())]),
                    ..prompt("link")
                }),
            })
            .collect()
    });
    prop_oneof![3 => graph, 1 => chain]
}

/// One request to one RPC.
#[derive(Debug, Clone)]
enum Call {
    SubmitTask(TaskSpec),
    SubmitTasks(Vec<BatchTask>),
    GetTask(String),
    ListTasks(Vec<i32>, u32, String, HashMap<String, String>),
    CancelTask(String, String),
    StreamTaskEvents(String, u64),
    ClusterStatus,
    CreateSession(SessionSpec),
    GetSession(String),
    ListSessions(Vec<i32>, u32, String),
    SendSessionMessage(String, String),
    StreamSessionEvents(String, u64),
    CloseSession(String),
    RegisterWorker(RegisterWorker, Vec<WorkerHeartbeat>),
    EnqueueTask(String, u32, i32, HashMap<String, String>, i32),
    DequeueTask(String),
    ReleaseTask(String, u32),
    ListWorkers,
    DrainWorker(String),
    QueueStats,
    ExecuteTask(String, u32, Option<TaskSpec>, bool, u64),
    CancelExecution(String, String),
    WorkerStatus,
    RunSession(String, SessionSpec, bool, u64, Vec<(u32, String)>),
    SwitchExecutionMode(i32),
    ListTaskFiles(String, String, Vec<String>, bool, u32, String),
    DownloadTaskFiles(String, String, Vec<String>, bool, u64),
    GetTaskDiff(String, String, Vec<String>),
    DeleteTask(String),
    WorkspaceFiles(WorkspaceRef, Vec<String>, u64),
}

/// Mostly nothing: a files call names a task or a session, and both is refused.
fn empty_or_text() -> impl Strategy<Value = String> {
    prop_oneof![3 => Just(String::new()), 1 => text()]
}

/// Paths in a workspace, good and bad: plain, `..`, absolute, empty, odd bytes.
fn paths() -> impl Strategy<Value = Vec<String>> {
    let path = prop_oneof![
        2 => "[a-z]{1,8}(/[a-z.]{1,8}){0,3}",
        1 => Just("../../etc/passwd".to_owned()),
        1 => Just("/etc/passwd".to_owned()),
        1 => Just(String::new()),
        1 => text(),
    ];
    prop::collection::vec(path, 0..4)
}

fn session_spec() -> impl Strategy<Value = SessionSpec> {
    (repo_url(), map(), map(), limits(), any::<u32>(), agent()).prop_map(
        |(repo_url, worker_selector, labels, limits, idle_timeout_seconds, agent)| SessionSpec {
            repo_url,
            worker_selector,
            labels,
            limits,
            idle_timeout_seconds,
            agent,
        },
    )
}

/// A request to any RPC; the files calls name `known`, a task that ran, half of the time.
fn call(known: String) -> impl Strategy<Value = Call> {
    let task = move || prop_oneof![Just(known.clone()), text()];
    let heartbeat = (any::<u32>(), any::<bool>(), short_text(), any::<bool>()).prop_map(
        |(running_tasks, healthy, health_reason, drained)| WorkerHeartbeat {
            running_tasks,
            healthy,
            health_reason,
            drained,
            ..Default::default()
        },
    );
    let register = (
        short_text(),
        short_text(),
        enum_value(),
        any::<u32>(),
        map(),
        prop::collection::vec(enum_value(), 0..3),
        prop::collection::vec((short_text(), any::<u32>()), 0..4),
    )
        .prop_map(
            |(worker_id, address, execution_mode, capacity, labels, execution_modes, running)| {
                RegisterWorker {
                    // Never the id of the cluster's own worker.
                    worker_id: format!("fuzz-{worker_id}"),
                    address,
                    execution_mode,
                    capacity,
                    labels,
                    version: String::new(),
                    execution_modes,
                    running: running
                        .into_iter()
                        .map(|(id, attempt)| RunningWork { id, attempt })
                        .collect(),
                    admits: None,
                }
            },
        );
    prop_oneof![
        6 => task_spec().prop_map(Call::SubmitTask),
        3 => batch().prop_map(Call::SubmitTasks),
        2 => text().prop_map(Call::GetTask),
        2 => (prop::collection::vec(enum_value(), 0..3), any::<u32>(), short_text(), map())
            .prop_map(|(s, n, t, l)| Call::ListTasks(s, n, t, l)),
        2 => (text(), text()).prop_map(|(id, reason)| Call::CancelTask(id, reason)),
        2 => (text(), big()).prop_map(|(id, after)| Call::StreamTaskEvents(id, after)),
        1 => Just(Call::ClusterStatus),
        1 => session_spec().prop_map(Call::CreateSession),
        1 => text().prop_map(Call::GetSession),
        1 => (prop::collection::vec(enum_value(), 0..3), any::<u32>(), short_text())
            .prop_map(|(s, n, t)| Call::ListSessions(s, n, t)),
        1 => (text(), text()).prop_map(|(id, text)| Call::SendSessionMessage(id, text)),
        1 => (text(), big()).prop_map(|(id, after)| Call::StreamSessionEvents(id, after)),
        1 => text().prop_map(Call::CloseSession),
        2 => (register, prop::collection::vec(heartbeat, 0..3))
            .prop_map(|(register, beats)| Call::RegisterWorker(register, beats)),
        1 => (text(), any::<u32>(), enum_value(), map(), enum_value())
            .prop_map(|(id, attempt, mode, selector, priority)| Call::EnqueueTask(id, attempt, mode, selector, priority)),
        1 => text().prop_map(Call::DequeueTask),
        1 => (text(), any::<u32>()).prop_map(|(id, attempt)| Call::ReleaseTask(id, attempt)),
        1 => Just(Call::ListWorkers),
        1 => short_text().prop_map(|id| Call::DrainWorker(format!("fuzz-{id}"))),
        1 => Just(Call::QueueStats),
        3 => (text(), any::<u32>(), prop::option::of(task_spec()), any::<bool>(), big())
            .prop_map(|(id, attempt, spec, attach, after)| Call::ExecuteTask(id, attempt, spec, attach, after)),
        1 => (text(), text()).prop_map(|(id, reason)| Call::CancelExecution(id, reason)),
        1 => Just(Call::WorkerStatus),
        1 => (text(), session_spec(), any::<bool>(), big(), prop::collection::vec((any::<u32>(), text()), 0..3))
            .prop_map(|(id, spec, attach, after, turns)| Call::RunSession(id, spec, attach, after, turns)),
        // Only modes the worker cannot switch to: a switch would change the cluster under test.
        1 => prop_oneof![Just(0), 3i32..1000, i32::MIN..0].prop_map(Call::SwitchExecutionMode),
        2 => (task(), empty_or_text(), paths(), any::<bool>(), any::<u32>(), short_text())
            .prop_map(|(t, s, p, g, n, token)| Call::ListTaskFiles(t, s, p, g, n, token)),
        2 => (task(), empty_or_text(), paths(), any::<bool>(), big())
            .prop_map(|(t, s, p, g, max)| Call::DownloadTaskFiles(t, s, p, g, max)),
        2 => (task(), empty_or_text(), paths()).prop_map(|(t, s, p)| Call::GetTaskDiff(t, s, p)),
        1 => text().prop_map(Call::DeleteTask),
        1 => (task(), 0u32..3, empty_or_text(), paths(), big()).prop_map(|(task_id, attempt, session_id, p, max)| {
            Call::WorkspaceFiles(WorkspaceRef { task_id, attempt, session_id }, p, max)
        }),
    ]
}

#[derive(Clone)]
struct Clients {
    driver: Driver,
    scheduler: SchedulerServiceClient<ClusterChannel>,
    worker: WorkerServiceClient<ClusterChannel>,
}

/// Codes a request may be answered with. UNKNOWN, INTERNAL, CANCELLED or a broken connection
/// would mean a handler panicked or a process died.
fn proper(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        Code::InvalidArgument
            | Code::NotFound
            | Code::FailedPrecondition
            | Code::ResourceExhausted
            | Code::OutOfRange
            | Code::AlreadyExists
            | Code::Unavailable
            | Code::DataLoss
    ) && !status.message().contains("transport error")
}

/// Reads a few messages of a stream, then lets it go.
async fn sample<T>(stream: &mut tonic::Streaming<T>) -> Result<(), tonic::Status> {
    for _ in 0..3 {
        match tokio::time::timeout(Duration::from_millis(200), stream.message()).await {
            Ok(Ok(Some(_))) => {}
            Ok(Ok(None)) | Err(_) => return Ok(()),
            Ok(Err(status)) => return Err(status),
        }
    }
    Ok(())
}

async fn send(clients: &mut Clients, call: Call) -> Result<(), tonic::Status> {
    let Clients {
        driver,
        scheduler,
        worker,
    } = clients;
    match call {
        Call::SubmitTask(spec) => {
            driver
                .submit_task(SubmitTaskRequest { spec: Some(spec) })
                .await?;
        }
        Call::SubmitTasks(tasks) => {
            driver.submit_tasks(SubmitTasksRequest { tasks }).await?;
        }
        Call::GetTask(task_id) => {
            driver.get_task(GetTaskRequest { task_id }).await?;
        }
        Call::ListTasks(statuses, page_size, page_token, label_selector) => {
            driver
                .list_tasks(ListTasksRequest {
                    statuses,
                    page_size,
                    page_token,
                    label_selector,
                })
                .await?;
        }
        Call::CancelTask(task_id, reason) => {
            driver
                .cancel_task(CancelTaskRequest { task_id, reason })
                .await?;
        }
        Call::StreamTaskEvents(task_id, after_sequence) => {
            let mut stream = driver
                .stream_task_events(StreamTaskEventsRequest {
                    task_id,
                    after_sequence,
                })
                .await?
                .into_inner();
            sample(&mut stream).await?;
        }
        Call::ClusterStatus => {
            driver
                .get_cluster_status(GetClusterStatusRequest {})
                .await?;
        }
        Call::CreateSession(spec) => {
            driver
                .create_session(CreateSessionRequest { spec: Some(spec) })
                .await?;
        }
        Call::GetSession(session_id) => {
            driver.get_session(GetSessionRequest { session_id }).await?;
        }
        Call::ListSessions(states, page_size, page_token) => {
            driver
                .list_sessions(ListSessionsRequest {
                    states,
                    page_size,
                    page_token,
                })
                .await?;
        }
        Call::SendSessionMessage(session_id, text) => {
            let mut stream = driver
                .send_session_message(SendSessionMessageRequest { session_id, text })
                .await?
                .into_inner();
            sample(&mut stream).await?;
        }
        Call::StreamSessionEvents(session_id, after_sequence) => {
            let mut stream = driver
                .stream_session_events(StreamSessionEventsRequest {
                    session_id,
                    after_sequence,
                })
                .await?
                .into_inner();
            sample(&mut stream).await?;
        }
        Call::CloseSession(session_id) => {
            driver
                .close_session(CloseSessionRequest { session_id })
                .await?;
        }
        Call::RegisterWorker(register, beats) => {
            use worker_link_request::Message;
            let mut messages = vec![WorkerLinkRequest {
                message: Some(Message::Register(register)),
            }];
            messages.extend(beats.into_iter().map(|beat| WorkerLinkRequest {
                message: Some(Message::Heartbeat(beat)),
            }));
            let mut link = scheduler
                .worker_link(tokio_stream::iter(messages))
                .await?
                .into_inner();
            sample(&mut link).await?;
        }
        Call::EnqueueTask(task_id, attempt, execution_mode, worker_selector, priority) => {
            scheduler
                .enqueue_task(EnqueueTaskRequest {
                    task_id,
                    attempt,
                    execution_mode,
                    worker_selector,
                    priority,
                    needs: None,
                })
                .await?;
        }
        Call::DequeueTask(task_id) => {
            scheduler
                .dequeue_task(DequeueTaskRequest { task_id })
                .await?;
        }
        Call::ReleaseTask(task_id, attempt) => {
            scheduler
                .release_task(ReleaseTaskRequest { task_id, attempt })
                .await?;
        }
        Call::ListWorkers => {
            scheduler.list_workers(ListWorkersRequest {}).await?;
        }
        Call::DrainWorker(worker_id) => {
            scheduler
                .drain_worker(DrainWorkerRequest { worker_id })
                .await?;
        }
        Call::QueueStats => {
            scheduler.get_queue_stats(GetQueueStatsRequest {}).await?;
        }
        Call::ExecuteTask(task_id, attempt, spec, attach, after_run_sequence) => {
            let mut stream = worker
                .execute_task(ExecuteTaskRequest {
                    task_id,
                    attempt,
                    spec,
                    attach,
                    after_run_sequence,
                })
                .await?
                .into_inner();
            sample(&mut stream).await?;
        }
        Call::CancelExecution(task_id, reason) => {
            worker
                .cancel_execution(CancelExecutionRequest { task_id, reason })
                .await?;
        }
        Call::WorkerStatus => {
            worker.get_worker_status(GetWorkerStatusRequest {}).await?;
        }
        Call::RunSession(session_id, spec, attach, after_run_sequence, turns) => {
            use run_session_request::Message;
            let mut messages = vec![RunSessionRequest {
                message: Some(Message::Open(SessionOpen {
                    session_id,
                    spec: Some(spec),
                    attach,
                    after_run_sequence,
                })),
            }];
            messages.extend(turns.into_iter().map(|(turn, text)| RunSessionRequest {
                message: Some(Message::Turn(SessionTurn { turn, text })),
            }));
            let mut stream = worker
                .run_session(tokio_stream::iter(messages))
                .await?
                .into_inner();
            sample(&mut stream).await?;
        }
        Call::SwitchExecutionMode(execution_mode) => {
            worker
                .switch_execution_mode(SwitchExecutionModeRequest { execution_mode })
                .await?;
        }
        Call::ListTaskFiles(task_id, session_id, paths, include_git, page_size, page_token) => {
            driver
                .list_task_files(ListTaskFilesRequest {
                    task_id,
                    session_id,
                    paths,
                    include_git,
                    page_size,
                    page_token,
                })
                .await?;
        }
        Call::DownloadTaskFiles(task_id, session_id, paths, include_git, max_bytes) => {
            let mut stream = driver
                .download_task_files(DownloadTaskFilesRequest {
                    task_id,
                    session_id,
                    paths,
                    include_git,
                    max_bytes,
                })
                .await?
                .into_inner();
            sample(&mut stream).await?;
        }
        Call::GetTaskDiff(task_id, session_id, paths) => {
            driver
                .get_task_diff(GetTaskDiffRequest {
                    task_id,
                    session_id,
                    paths,
                })
                .await?;
        }
        Call::DeleteTask(task_id) => {
            driver.delete_task(DeleteTaskRequest { task_id }).await?;
        }
        Call::WorkspaceFiles(workspace, paths, max_bytes) => {
            let result = worker
                .list_workspace_files(ListWorkspaceFilesRequest {
                    workspace: Some(workspace.clone()),
                    query: Some(ListTaskFilesRequest {
                        paths: paths.clone(),
                        ..Default::default()
                    }),
                })
                .await;
            result?;
            worker
                .get_workspace_diff(GetWorkspaceDiffRequest {
                    workspace: Some(workspace.clone()),
                    query: Some(GetTaskDiffRequest {
                        paths: paths.clone(),
                        ..Default::default()
                    }),
                })
                .await?;
            let mut stream = worker
                .download_workspace(DownloadWorkspaceRequest {
                    workspace: Some(workspace.clone()),
                    query: Some(DownloadTaskFilesRequest {
                        paths,
                        max_bytes,
                        ..Default::default()
                    }),
                })
                .await?
                .into_inner();
            sample(&mut stream).await?;
            worker
                .remove_workspace(RemoveWorkspaceRequest {
                    workspace: Some(workspace),
                })
                .await?;
        }
    }
    Ok(())
}

#[test]
fn generated_requests_to_every_rpc_get_proper_statuses_and_hurt_nothing() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let worker = WorkerSpec {
        claude_path: Some(test_bin("scripted-agent")),
        capacity: 4,
        ..WorkerSpec::default()
    };
    // Channels connect lazily, on the runtime they were made in.
    let _entered = runtime.enter();
    let mut cluster = runtime.block_on(TestCluster::start(vec![worker]));
    let clients = Clients {
        driver: cluster_driver(&runtime, &cluster),
        scheduler: cluster.scheduler_client(),
        worker: cluster.worker_client(0),
    };

    // A task that ran, whose workspace the files calls read.
    let known = runtime.block_on(async {
        let task = cluster
            .submit(prompt("a task to read the workspace of"))
            .await;
        cluster.finish(&task.task_id).await.0.task_id
    });
    let cases = claudecluster_fuzzing::cases(300);
    let mut runner = TestRunner::new(claudecluster_fuzzing::config(cases));
    let started = Instant::now();
    let codes: std::sync::Mutex<HashMap<String, u32>> = Default::default();
    // Generated requests nest deeply (tuples of strategies of large messages): in a debug
    // build their trees need more stack than a test thread's 2 MiB.
    let generating = std::thread::Builder::new().stack_size(64 << 20);
    let outcome = std::thread::scope(|scope| {
        generating
            .spawn_scoped(scope, || {
                runner
                    .run(&call(known), |call| {
                        let shown: String = format!("{call:?}").chars().take(300).collect();
                        let reply = runtime.block_on(async {
                            tokio::time::timeout(
                                Duration::from_secs(30),
                                send(&mut clients.clone(), call),
                            )
                            .await
                            .map_err(|_| {
                                tonic::Status::deadline_exceeded("no answer within 30 s")
                            })?
                        });
                        if let Err(status) = &reply {
                            *codes
                                .lock()
                                .unwrap()
                                .entry(format!("{:?}", status.code()))
                                .or_default() += 1;
                            prop_assert!(
                                proper(status),
                                "{shown} got {:?}: {}",
                                status.code(),
                                status.message().chars().take(300).collect::<String>()
                            );
                        } else {
                            *codes.lock().unwrap().entry("Ok".into()).or_default() += 1;
                        }
                        Ok(())
                    })
                    // The failure, with its minimal case, as text: it is large.
                    .map_err(|failure| failure.to_string())
            })
            .expect("a thread for the generated requests")
            .join()
            .expect("the generated requests' thread panicked")
    });
    let elapsed = started.elapsed();
    eprintln!(
        "{cases} generated requests in {:.1} s: {:.0} cases/s; answers {:?}",
        elapsed.as_secs_f64(),
        f64::from(cases) / elapsed.as_secs_f64(),
        codes.lock().unwrap()
    );
    outcome.unwrap();

    runtime.block_on(async {
        // What the requests started ends: whatever is still open is cancelled and must end.
        let mut driver = cluster.driver().await;
        for task in cluster.all_tasks().await {
            if !task.status().is_terminal() {
                driver
                    .cancel_task(CancelTaskRequest {
                        task_id: task.task_id,
                        reason: "end of the fuzz run".into(),
                    })
                    .await
                    .expect("cancel");
            }
        }
        wait_until(Duration::from_secs(60), || async {
            cluster
                .all_tasks()
                .await
                .iter()
                .all(|task| task.status().is_terminal())
        })
        .await
        .expect("every task ended");
        let normal = cluster.submit(prompt("after the fuzz run")).await;
        let (ended, _) = cluster.finish(&normal.task_id).await;
        assert_eq!(
            ended.status(),
            TaskStatus::Completed,
            "{}",
            ended.status_reason
        );
        cluster.assert_unharmed().await;
    });
}

fn cluster_driver(runtime: &tokio::runtime::Runtime, cluster: &TestCluster) -> Driver {
    runtime.block_on(cluster.driver())
}
