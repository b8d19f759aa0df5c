//! Traces, metrics, usage roll-ups, budgets and webhooks, against real service processes and
//! the real CLI: an OTLP/gRPC receiver built from `opentelemetry-proto`, `/metrics` read with a
//! Prometheus text parser, and an HTTP receiver of the webhooks.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use claudecluster_integration_tests::otlp::{OtlpReceiver, ReceivedSpan};
use claudecluster_integration_tests::*;
use claudecluster_proto::v1::event::Kind;
use claudecluster_proto::v1::*;
use hmac::Mac;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

#[tokio::test]
async fn one_trace_holds_a_task_from_the_client_through_every_service_to_each_tool_call() {
    let receiver = OtlpReceiver::start().await;
    let endpoint = receiver.endpoint.clone();
    let cluster = TestCluster::start_with_env(
        "",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("CLAUDECLUSTER_TELEMETRY__LOG_FORMAT", "json"),
            // The agent retries an API error once, announcing it.
            ("CLAUDE_CODE_MAX_RETRIES", "1"),
        ],
        vec![WorkerSpec::in_mode(Mode::ProcessPool)],
    )
    .await;
    // The client's own span: the trace is continued from it.
    let trace_id = TRACE_ID;
    let client_span = "00f067aa0ba902b7";
    let mut request = tonic::Request::new(SubmitTaskRequest {
        spec: Some(with_tools("WRITE traced.txt hello", &["Write"])),
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{client_span}-01").parse().unwrap(),
    );
    let task = cluster
        .driver()
        .await
        .submit_task(request)
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    let (ended, _) = cluster.finish(&task.task_id).await;
    assert_eq!(
        ended.status(),
        TaskStatus::Completed,
        "{}",
        ended.status_reason
    );

    // Spans arrive in batches, each when it ends; wait until all are in.
    const EXPECTED: &[(&str, &str)] = &[
        ("claudecluster-driver", "DriverService/SubmitTask"),
        ("claudecluster-driver", "run task"),
        ("claudecluster-scheduler", "SchedulerService/EnqueueTask"),
        ("claudecluster-scheduler", "queue and place"),
        ("claudecluster-worker", "WorkerService/ExecuteTask"),
        ("claudecluster-worker", "execute task"),
        ("claudecluster-worker", "prepare the workspace"),
        ("claudecluster-worker", "spawn the agent process"),
        ("claudecluster-worker", "agent run"),
        ("claudecluster-worker", "tool Write"),
    ];
    let spans = wait_for(Duration::from_secs(30), || {
        let receiver = receiver.clone();
        async move {
            let spans = receiver.spans();
            EXPECTED
                .iter()
                .all(|(service, name)| {
                    spans
                        .iter()
                        .any(|s| s.service == *service && s.name == *name && s.trace_id == TRACE_ID)
                })
                .then_some(spans)
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the spans did not arrive: {:#?}", receiver.spans()));
    let in_trace: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.trace_id == trace_id).collect();
    let find = |service: &str, name: &str| -> &ReceivedSpan {
        in_trace
            .iter()
            .find(|s| s.service == service && s.name == name)
            .unwrap_or_else(|| {
                panic!("no {name} span of {service} in the client's trace: {in_trace:#?}")
            })
    };
    let submit = find("claudecluster-driver", "DriverService/SubmitTask");
    assert_eq!(
        submit.parent_span_id, client_span,
        "the client's trace goes on"
    );
    let enqueue = find("claudecluster-scheduler", "SchedulerService/EnqueueTask");
    assert_eq!(enqueue.parent_span_id, submit.span_id);
    let queued = find("claudecluster-scheduler", "queue and place");
    assert_eq!(queued.parent_span_id, enqueue.span_id);
    assert!(
        queued.attributes["worker.id"].starts_with('w'),
        "{queued:?}"
    );
    let run = find("claudecluster-driver", "run task");
    assert_eq!(run.parent_span_id, submit.span_id);
    let execute_call = find("claudecluster-worker", "WorkerService/ExecuteTask");
    assert_eq!(execute_call.parent_span_id, run.span_id);
    let execute = find("claudecluster-worker", "execute task");
    assert_eq!(execute.parent_span_id, execute_call.span_id);
    let spawn = find("claudecluster-worker", "spawn the agent process");
    assert_eq!(spawn.parent_span_id, execute.span_id);
    let workspace = find("claudecluster-worker", "prepare the workspace");
    assert_eq!(workspace.parent_span_id, execute.span_id);
    let agent = find("claudecluster-worker", "agent run");
    assert_eq!(agent.parent_span_id, execute.span_id);
    assert!(!ended.model.is_empty());
    assert_eq!(agent.attributes["agent.model"], ended.model);
    let tools: Vec<&&ReceivedSpan> = in_trace
        .iter()
        .filter(|s| s.name.starts_with("tool "))
        .collect();
    assert_eq!(tools.len(), 1, "one span per tool call: {tools:#?}");
    assert_eq!(tools[0].parent_span_id, agent.span_id);
    assert_eq!(tools[0].attributes["tool.name"], "Write");
    assert_eq!(tools[0].attributes["tool.error"], "false");

    // An API error the agent retries: one span for the retry, under the agent's run.
    let failing = cluster.submit(prompt("ERROR 529")).await;
    let (failed, _) = cluster.finish(&failing.task_id).await;
    assert_eq!(
        failed.status(),
        TaskStatus::Failed,
        "{}",
        failed.status_reason
    );
    let (agent, retries) = wait_for(Duration::from_secs(30), || {
        let receiver = receiver.clone();
        let task_id = failing.task_id.clone();
        async move {
            let spans = receiver.spans();
            let execute = spans.iter().find(|s| {
                s.name == "execute task"
                    && s.attributes.get("task.id").map(String::as_str) == Some(task_id.as_str())
            })?;
            let agent = spans
                .iter()
                .find(|s| s.name == "agent run" && s.parent_span_id == execute.span_id)?
                .clone();
            let retries: Vec<ReceivedSpan> = spans
                .iter()
                .filter(|s| s.name == "API retry" && s.trace_id == agent.trace_id)
                .cloned()
                .collect();
            (!retries.is_empty()).then_some((agent, retries))
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no API retry span: {:#?}", receiver.spans()));
    assert_eq!(retries.len(), 1, "{retries:#?}");
    assert_eq!(retries[0].parent_span_id, agent.span_id);
    assert_eq!(retries[0].attributes["http.response.status_code"], "529");
    assert_eq!(retries[0].attributes["retry.attempt"], "1");

    // The JSON log lines lead to the trace.
    let submitted = cluster
        .driver
        .log()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|line| line["message"] == "task submitted")
        .expect("a JSON log line for the submission");
    assert_eq!(submitted["trace_id"], trace_id);
    assert_eq!(submitted["span_id"], submit.span_id.as_str());
    assert_eq!(submitted["fields"]["task"], task.task_id.as_str());
}

/// GETs `/metrics` and parses it as Prometheus does.
async fn scrape(address: &str) -> prometheus_parse::Scrape {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream
        .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    prometheus_parse::Scrape::parse(body.lines().map(|line| Ok(line.to_owned()))).unwrap()
}

fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let matching: Vec<f64> = scrape
        .samples
        .iter()
        .filter(|sample| sample.metric == name)
        .filter(|sample| {
            labels
                .iter()
                .all(|(key, value)| sample.labels.get(key) == Some(value))
        })
        .map(|sample| match sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("{name} is not a number: {other:?}"),
        })
        .collect();
    matching.iter().sum()
}

fn histogram_count(scrape: &prometheus_parse::Scrape, name: &str) -> u64 {
    scrape
        .samples
        .iter()
        .filter(|sample| sample.metric == name)
        .map(|sample| match &sample.value {
            prometheus_parse::Value::Histogram(buckets) => {
                buckets.last().map_or(0, |bucket| bucket.count as u64)
            }
            other => panic!("{name} is not a histogram: {other:?}"),
        })
        .sum()
}

#[tokio::test]
async fn each_service_counts_known_work_on_its_metrics_endpoint() {
    let cluster = TestCluster::start_with_env(
        "",
        &[("CLAUDECLUSTER_TELEMETRY__METRICS_LISTEN", "127.0.0.1:0")],
        vec![WorkerSpec {
            capacity: 3,
            ..WorkerSpec::in_mode(Mode::ProcessPool)
        }],
    )
    .await;
    let writing = cluster
        .submit(with_tools("WRITE counted.txt one", &["Write"]))
        .await;
    let (writing, events) = cluster.finish(&writing.task_id).await;
    assert_eq!(writing.status(), TaskStatus::Completed);
    // The tool calls the agent reported: one, unless the CLI sent its request again (it falls
    // back from a stream that stalls under load, and the stand-in answers with the call again).
    let writes = events
        .iter()
        .filter(|event| matches!(&event.kind, Some(Kind::ToolUse(tool)) if tool.name == "Write"))
        .count();
    assert!(writes >= 1);
    let plain = cluster.submit(prompt("plain")).await;
    let (plain, _) = cluster.finish(&plain.task_id).await;
    assert_eq!(plain.status(), TaskStatus::Completed);
    let model = plain.model.as_str();

    let driver = scrape(cluster.driver.metrics.as_deref().expect("driver metrics")).await;
    assert_eq!(
        value(
            &driver,
            "claudecluster_driver_tasks_ended_total",
            &[("state", "completed")]
        ),
        2.0
    );
    assert_eq!(
        value(
            &driver,
            "claudecluster_driver_tool_calls_total",
            &[("tool", "Write")]
        ),
        writes as f64
    );
    assert_eq!(
        value(
            &driver,
            "claudecluster_driver_tasks",
            &[("state", "running")]
        ),
        0.0
    );
    assert!(
        value(
            &driver,
            "claudecluster_driver_cost_usd_total",
            &[("model", model)]
        ) > 0.0
    );
    assert!(
        value(
            &driver,
            "claudecluster_driver_tokens_total",
            &[("model", model), ("kind", "output")]
        ) > 0.0
    );
    assert_eq!(
        histogram_count(&driver, "claudecluster_driver_first_event_latency_seconds"),
        2
    );
    assert!(histogram_count(&driver, "claudecluster_driver_store_latency_seconds") > 0);

    let scheduler = scrape(
        cluster
            .scheduler
            .metrics
            .as_deref()
            .expect("scheduler metrics"),
    )
    .await;
    assert_eq!(
        value(&scheduler, "claudecluster_scheduler_placements_total", &[]),
        2.0
    );
    assert_eq!(
        histogram_count(
            &scheduler,
            "claudecluster_scheduler_placement_latency_seconds"
        ),
        2
    );
    assert_eq!(
        value(
            &scheduler,
            "claudecluster_scheduler_queue_depth",
            &[("priority", "normal")]
        ),
        0.0
    );
    assert_eq!(
        value(
            &scheduler,
            "claudecluster_scheduler_workers",
            &[("health", "healthy")]
        ),
        1.0
    );

    let worker = scrape(
        cluster.workers[0]
            .metrics
            .as_deref()
            .expect("worker metrics"),
    )
    .await;
    assert_eq!(
        histogram_count(&worker, "claudecluster_worker_launch_latency_seconds"),
        2,
        "two agents spawned"
    );
    assert_eq!(
        value(&worker, "claudecluster_worker_slots", &[("state", "free")]),
        3.0
    );
    assert_eq!(
        value(&worker, "claudecluster_worker_slots", &[("state", "used")]),
        0.0
    );
}

/// A webhook receiver that refuses the first delivery of each kind, and keeps the rest with
/// whether their signature was right.
#[derive(Clone, Default)]
struct Webhooks {
    refused: Arc<Mutex<Vec<String>>>,
    received: Arc<Mutex<Vec<(String, bool, serde_json::Value)>>>,
}

const WEBHOOK_SECRET: &str = "whsec-test-secret";

async fn start_webhooks() -> (Webhooks, String) {
    use axum::http::{HeaderMap, StatusCode};
    let hooks = Webhooks::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let state = hooks.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: bytes::Bytes| {
            let state = state.clone();
            async move {
                let event = headers["x-claudecluster-event"]
                    .to_str()
                    .unwrap()
                    .to_owned();
                let mut refused = state.refused.lock().unwrap();
                if !refused.contains(&event) {
                    refused.push(event);
                    return StatusCode::SERVICE_UNAVAILABLE;
                }
                let mut mac =
                    hmac::Hmac::<sha2::Sha256>::new_from_slice(WEBHOOK_SECRET.as_bytes()).unwrap();
                mac.update(&body);
                let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
                let signed = headers["x-claudecluster-signature"] == expected.as_str();
                let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
                state.received.lock().unwrap().push((event, signed, json));
                StatusCode::NO_CONTENT
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (hooks, format!("http://{address}/hook"))
}

impl Webhooks {
    async fn wait_for(&self, event: &str) -> serde_json::Value {
        self.wait_for_where(event, |_| true).await
    }

    /// The first `event` notification whose body `wanted` accepts.
    async fn wait_for_where(
        &self,
        event: &str,
        wanted: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let received = self.received.clone();
        wait_for(Duration::from_secs(30), || {
            let found = received
                .lock()
                .unwrap()
                .iter()
                .find(|(kind, _, json)| kind == event && wanted(json))
                .cloned();
            async move { found }
        })
        .await
        .map(|(_, signed, json)| {
            assert!(signed, "{event} carries a valid signature");
            assert_eq!(json["event"], event);
            json
        })
        .unwrap_or_else(|_| {
            panic!(
                "no {event} notification: {:?}",
                self.received.lock().unwrap()
            )
        })
    }
}

#[tokio::test]
async fn a_spent_budget_refuses_new_work_and_each_notification_arrives_signed_after_a_refusal() {
    let (hooks, url) = start_webhooks().await;
    let mut cluster = TestCluster::start_with_driver(
        &format!(
            "budget:\n  usdPerDay: 0.000001\nnotifications:\n  webhooks:\n    - url: {url}\n      secret: {WEBHOOK_SECRET}\n"
        ),
        vec![WorkerSpec::in_mode(Mode::ProcessPool)],
    )
    .await;
    // A task that never runs (no worker matches it), cancelled: it finished too.
    let parked = cluster
        .submit(TaskSpec {
            worker_selector: [("pool".to_owned(), "nowhere".to_owned())].into(),
            ..prompt("parked")
        })
        .await;
    cluster
        .driver()
        .await
        .cancel_task(CancelTaskRequest {
            task_id: parked.task_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let cancelled = hooks
        .wait_for_where("task.finished", |json| {
            json["data"]["taskId"] == parked.task_id
        })
        .await;
    assert_eq!(cancelled["data"]["status"], "cancelled");

    // Asks for a tool it was not allowed: the agent's permission is denied.
    let task = cluster.submit(prompt("WRITE denied.txt nope")).await;
    let (ended, _) = cluster.finish(&task.task_id).await;
    assert_eq!(
        ended.status(),
        TaskStatus::Completed,
        "{}",
        ended.status_reason
    );
    let cost = ended.result.as_ref().unwrap().total_cost_usd;
    assert!(cost > 0.000001, "the run cost {cost}");

    let refused = cluster
        .driver()
        .await
        .submit_task(SubmitTaskRequest {
            spec: Some(prompt("one more")),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert!(
        refused.message().contains("budget `cluster`") && refused.message().contains("per day"),
        "{}",
        refused.message()
    );

    let finished = hooks
        .wait_for_where("task.finished", |json| {
            json["data"]["taskId"] == task.task_id
        })
        .await;
    assert_eq!(finished["data"]["status"], "completed");
    let denied = hooks.wait_for("task.permission_denied").await;
    assert_eq!(denied["data"]["taskId"], task.task_id);
    assert_eq!(denied["data"]["tool"], "Write");
    let budget = hooks.wait_for("budget.reached").await;
    assert_eq!(budget["data"]["budget"], "cluster");
    assert_eq!(budget["data"]["period"], "day");

    // A worker that stops answering turns unhealthy.
    cluster.workers[0].signal(libc::SIGSTOP);
    let unhealthy = hooks.wait_for("worker.unhealthy").await;
    cluster.workers[0].signal(libc::SIGCONT);
    assert_eq!(unhealthy["data"]["workerId"], cluster.worker_ids[0]);
    let refused = hooks.refused.lock().unwrap().clone();
    for event in [
        "task.finished",
        "task.permission_denied",
        "budget.reached",
        "worker.unhealthy",
    ] {
        assert!(
            refused.iter().any(|e| e == event),
            "{event} was refused once first"
        );
    }
    let _ = &mut cluster;
}

#[tokio::test]
async fn usage_rolls_up_over_a_task_tree_and_a_session_to_the_sum_of_their_results() {
    let (hooks, url) = start_webhooks().await;
    let cluster = TestCluster::start_with_driver(
        &format!(
            "notifications:\n  webhooks:\n    - url: {url}\n      secret: {WEBHOOK_SECRET}\n      events: [session.replied]\n"
        ),
        vec![
            WorkerSpec::in_mode(Mode::ProcessPool),
            WorkerSpec::in_mode(Mode::Container),
        ],
    )
    .await;
    // A tree of three: the root, a child spawned by the root's agent and a grandchild spawned
    // by the child's, tied as the MCP server ties them: by the spawning agent's session id.
    let root = cluster.submit(prompt("root work")).await;
    let (root, _) = cluster.finish(&root.task_id).await;
    let mut parent = root.clone();
    let mut tree = vec![root.clone()];
    for name in ["child", "grandchild"] {
        let mut spec = prompt(&format!("{name} work"));
        spec.labels.insert(
            "claudecluster.parent_session".into(),
            parent.result.as_ref().unwrap().agent_session_id.clone(),
        );
        let task = cluster.submit(spec).await;
        let (task, _) = cluster.finish(&task.task_id).await;
        assert_eq!(
            task.status(),
            TaskStatus::Completed,
            "{}",
            task.status_reason
        );
        tree.push(task.clone());
        parent = task;
    }
    // A task outside the tree.
    let other = cluster.submit(prompt("other work")).await;
    let (other, _) = cluster.finish(&other.task_id).await;

    let mut driver = cluster.driver().await;
    let session = driver
        .create_session(CreateSessionRequest {
            spec: Some(SessionSpec::default()),
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    for text in ["first message", "second message"] {
        let events = reply_events(driver.clone(), session.session_id.clone(), text.into()).await;
        assert!(
            events
                .iter()
                .any(|e| matches!(e.kind, Some(event::Kind::Result(_)))),
            "answered"
        );
    }
    let session = driver
        .get_session(GetSessionRequest {
            session_id: session.session_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();

    let usage = driver
        .get_usage(GetUsageRequest::default())
        .await
        .unwrap()
        .into_inner();
    let cost = |task: &Task| task.result.as_ref().unwrap().total_cost_usd;
    let output = |task: &Task| {
        task.result
            .as_ref()
            .unwrap()
            .usage
            .unwrap_or_default()
            .output_tokens
    };
    let rollup = |group: &[UsageRollup], key: &str| -> Usage {
        group
            .iter()
            .find(|r| r.key == key)
            .unwrap_or_else(|| panic!("no roll-up {key} in {group:?}"))
            .usage
            .unwrap()
    };
    let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
    let tree_usage = rollup(&usage.task_trees, &root.task_id);
    assert_eq!(tree_usage.runs, 3);
    assert!(
        close(tree_usage.cost_usd, tree.iter().map(cost).sum()),
        "{tree_usage:?}"
    );
    assert_eq!(
        tree_usage.tokens.unwrap().output_tokens,
        tree.iter().map(output).sum::<u64>()
    );
    assert!(tree_usage.metered_cost_usd >= 0.0);
    let other_usage = rollup(&usage.task_trees, &other.task_id);
    assert_eq!(other_usage.runs, 1);
    assert!(close(other_usage.cost_usd, cost(&other)));
    let session_usage = rollup(&usage.sessions, &session.session_id);
    assert_eq!(session_usage.runs, 2);
    assert!(
        close(session_usage.cost_usd, session.total_cost_usd),
        "{session_usage:?} vs {}",
        session.total_cost_usd
    );
    assert_eq!(
        session_usage.tokens.unwrap().output_tokens,
        session.usage.unwrap_or_default().output_tokens
    );
    let cluster_usage = usage.cluster.unwrap();
    assert_eq!(cluster_usage.runs, 6);
    assert!(close(
        cluster_usage.cost_usd,
        tree.iter().map(cost).sum::<f64>() + cost(&other) + session.total_cost_usd
    ));
    assert!(!root.model.is_empty());
    let model = rollup(&usage.models, &root.model);
    assert!(close(model.cost_usd, cluster_usage.cost_usd));
    let by_worker: f64 = usage
        .workers
        .iter()
        .map(|r| r.usage.as_ref().unwrap().cost_usd)
        .sum();
    assert!(close(by_worker, cluster_usage.cost_usd));

    // A window that ended before any of it holds none of it.
    let before = driver
        .get_usage(GetUsageRequest {
            start_time: None,
            end_time: Some(prost_types_timestamp(
                root.create_time.unwrap().seconds - 3600,
            )),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(before.cluster.unwrap().runs, 0);

    let replied = hooks.wait_for("session.replied").await;
    assert_eq!(replied["data"]["sessionId"], session.session_id);
}

fn prost_types_timestamp(seconds: i64) -> claudecluster_proto::Timestamp {
    claudecluster_proto::Timestamp { seconds, nanos: 0 }
}

const ALICE: &str = "cck_alice_0123456789abcdef0123456789";
const BOB: &str = "cck_bob_0123456789abcdef0123456789ab";
const ADMIN: &str = "cck_admin_0123456789abcdef012345678";

async fn submit_as(driver: &mut Driver, key: &str, spec: TaskSpec) -> Result<Task, tonic::Status> {
    driver
        .submit_task(with_key(SubmitTaskRequest { spec: Some(spec) }, key))
        .await
        .map(|response| response.into_inner().task.unwrap())
}

async fn task_as(driver: &mut Driver, key: &str, task_id: &str) -> Task {
    driver
        .get_task(with_key(
            GetTaskRequest {
                task_id: task_id.to_owned(),
            },
            key,
        ))
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap()
}

async fn wait_for_status(driver: &Driver, key: &str, task_id: &str, status: TaskStatus) -> Task {
    wait_for(Duration::from_secs(60), || {
        let mut driver = driver.clone();
        async move {
            let task = task_as(&mut driver, key, task_id).await;
            (task.status() == status).then_some(task)
        }
    })
    .await
    .unwrap_or_else(|_| panic!("task {task_id} did not become {status:?}"))
}

#[tokio::test]
async fn a_spent_key_budget_stops_that_keys_running_work_and_refuses_its_next_task() {
    use sha2::Digest;
    let sha256 = |key: &str| hex::encode(sha2::Sha256::digest(key.as_bytes()));
    let cluster = TestCluster::start_with_env(
        &format!(
            "budget:\n  whenSpent: stop\nauth:\n  apiKeys:\n\
             \x20   - {{id: alice, sha256: {}, scopes: [tasks:read, tasks:write], quotas: {{budgetUsdPerMonth: 0.000001}}}}\n\
             \x20   - {{id: bob, sha256: {}, scopes: [tasks:read, tasks:write]}}\n\
             \x20   - {{id: admin, sha256: {}, scopes: [admin]}}\n",
            sha256(ALICE),
            sha256(BOB),
            sha256(ADMIN),
        ),
        &[("CLAUDECLUSTER_API_KEY", ADMIN)],
        vec![WorkerSpec {
            capacity: 3,
            ..WorkerSpec::in_mode(Mode::ProcessPool)
        }],
    )
    .await;
    let mut driver = cluster.driver().await;
    let long = || prompt("SLOW 240 250");
    let alices_long = submit_as(&mut driver, ALICE, long()).await.unwrap();
    let bobs_long = submit_as(&mut driver, BOB, long()).await.unwrap();
    wait_for_status(&driver, ALICE, &alices_long.task_id, TaskStatus::Running).await;
    wait_for_status(&driver, BOB, &bobs_long.task_id, TaskStatus::Running).await;

    // Alice's quick task is admitted (nothing is spent yet) and spends her budget.
    let quick = submit_as(&mut driver, ALICE, prompt("quick"))
        .await
        .unwrap();
    wait_for_status(&driver, ALICE, &quick.task_id, TaskStatus::Completed).await;
    let stopped =
        wait_for_status(&driver, ALICE, &alices_long.task_id, TaskStatus::Cancelled).await;
    assert!(
        stopped.status_reason.contains("budget"),
        "{}",
        stopped.status_reason
    );
    assert_eq!(
        task_as(&mut driver, BOB, &bobs_long.task_id).await.status(),
        TaskStatus::Running,
        "another key's work goes on"
    );

    let refused = submit_as(&mut driver, ALICE, prompt("more"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert!(
        refused.message().contains("budget `key:alice`") && refused.message().contains("per month"),
        "{}",
        refused.message()
    );
    submit_as(&mut driver, BOB, prompt("bob goes on"))
        .await
        .expect("bob has no budget");

    // Alice sees her own usage and budget only.
    let usage = driver
        .get_usage(with_key(GetUsageRequest::default(), ALICE))
        .await
        .unwrap()
        .into_inner();
    assert!(
        usage.api_keys.iter().all(|r| r.key == "alice"),
        "{:?}",
        usage.api_keys
    );
    let budget = usage
        .budgets
        .iter()
        .find(|b| b.budget == "key:alice" && b.period == "month")
        .unwrap_or_else(|| panic!("{:?}", usage.budgets));
    assert!(budget.spent && budget.spent_usd > budget.limit_usd);
    driver
        .cancel_task(with_key(
            CancelTaskRequest {
                task_id: bobs_long.task_id.clone(),
                ..Default::default()
            },
            BOB,
        ))
        .await
        .unwrap();
}
