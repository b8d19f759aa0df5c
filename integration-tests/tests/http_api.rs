//! The original REST and WebSocket API, served by the driver over HTTP, against a running
//! cluster with the real Claude Code CLI: every endpoint, the original shapes, bad input with
//! the right statuses, and keys, scopes and quotas as gRPC has them.

use std::time::Duration;

use claudecluster_integration_tests::http::{self, Answer, next_frame, post_json, websocket};
use claudecluster_integration_tests::*;
use claudecluster_proto::v1::*;
use serde_json::{Value, json};
use sha2::Digest;

const FRAME: Duration = Duration::from_secs(90);

fn ws_url(base: &str, path: &str) -> String {
    format!("{}{path}", base.replacen("http://", "ws://", 1))
}

fn assert_status(answer: &Answer, status: u16, what: &str) {
    assert_eq!(answer.status, status, "{what}: {}", answer.text());
}

/// A refusal: the status, and `{error, message}` with the status's reason.
fn assert_refused(answer: &Answer, status: u16, reason: &str, what: &str) -> String {
    assert_status(answer, status, what);
    let body = answer.json();
    assert_eq!(body["error"], reason, "{what}: {body}");
    let message = body["message"].as_str().unwrap_or_default().to_owned();
    assert!(!message.is_empty(), "{what}: {body}");
    message
}

/// Validates `value` against the component `schema` of the OpenAPI document `spec`, with the
/// venv's Python `jsonschema` (JSON Schema 2020-12, which OpenAPI 3.1 uses).
async fn assert_matches_schema(spec: &Value, schema: &str, value: &Value) {
    let dir = tempfile::tempdir().unwrap();
    let schema_file = dir.path().join("schema.json");
    let value_file = dir.path().join("value.json");
    let document = json!({
        "$ref": format!("#/components/schemas/{schema}"),
        "components": spec["components"],
    });
    std::fs::write(&schema_file, document.to_string()).unwrap();
    std::fs::write(&value_file, value.to_string()).unwrap();
    let script = "import json, sys, jsonschema\n\
        schema = json.load(open(sys.argv[1]))\n\
        jsonschema.Draft202012Validator.check_schema(schema)\n\
        jsonschema.Draft202012Validator(schema).validate(json.load(open(sys.argv[2])))\n";
    let output = tokio::process::Command::new(venv_tool("python"))
        .args(["-c", script])
        .arg(&schema_file)
        .arg(&value_file)
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{schema} does not describe {value}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// An event of a `progress` frame without what only frames carry (the original's `progress`
/// and `currentStep`), as `/events` and `/progress` show it.
fn logged(event: &Value) -> Value {
    let mut event = event.clone();
    let fields = event.as_object_mut().unwrap();
    fields.remove("progress");
    fields.remove("currentStep");
    event
}

/// Reads a task's progress WebSocket to its end: the `progress` frames' events, and the
/// final frame.
async fn follow(base: &str, task_id: &str, query: &str) -> (Vec<Value>, Value) {
    let url = ws_url(base, &format!("/ws/tasks/{task_id}/progress{query}"));
    let mut socket = websocket(&url).await.expect("the progress socket opens");
    let mut events = Vec::new();
    loop {
        let frame = next_frame(&mut socket, FRAME)
            .await
            .expect("the socket stays open until the task ends");
        match frame["type"].as_str() {
            Some("progress") => events.push(frame["data"].clone()),
            Some("completed" | "failed") => {
                assert_eq!(
                    next_frame(&mut socket, FRAME).await,
                    None,
                    "the socket closes after the final frame"
                );
                return (events, frame);
            }
            other => panic!("unexpected frame {other:?}: {frame}"),
        }
    }
}

#[tokio::test]
async fn the_original_api_runs_a_task_from_submit_to_delete() {
    let cluster = TestCluster::start_with_driver(
        "http:\n  statsInterval: 200ms\n",
        vec![WorkerSpec::default()],
    )
    .await;
    let base = cluster.http_url();
    let worker_id = cluster.worker_ids[0].clone();
    let spec = http::get(&format!("{base}/openapi.json")).await;
    assert_status(&spec, 200, "the OpenAPI document");
    assert!(spec.content_type().starts_with("application/json"));
    let spec = spec.json();
    for path in [
        "/health",
        "/health/ready",
        "/health/live",
        "/stats",
        "/tasks",
        "/tasks/batch",
        "/tasks/{taskId}",
        "/tasks/{taskId}/result",
        "/tasks/{taskId}/progress",
        "/tasks/{taskId}/events",
        "/tasks/{taskId}/cancel",
        "/workers",
        "/workers/{workerId}",
        "/workers/{workerId}/health",
        "/sessions",
        "/sessions/{sessionId}",
        "/ws/tasks/{taskId}/progress",
        "/ws/stats",
    ] {
        assert!(
            spec["paths"][path].is_object(),
            "{path} is in the OpenAPI document"
        );
    }

    // Probes.
    let health = http::get(&format!("{base}/health")).await;
    assert_status(&health, 200, "health");
    let health = health.json();
    assert_eq!(health["status"], "healthy");
    assert_eq!(health["workers"]["healthy"], 1);
    assert_matches_schema(&spec, "HealthJson", &health).await;
    let ready = http::get(&format!("{base}/health/ready")).await.json();
    assert_eq!(ready["ready"], true);
    let live = http::get(&format!("{base}/health/live")).await.json();
    assert_eq!(live["alive"], true);

    // Workers.
    let workers = http::get(&format!("{base}/workers")).await;
    assert_status(&workers, 200, "workers");
    let workers = workers.json();
    let worker = &workers["workers"][0];
    assert_eq!(worker["id"], worker_id.as_str());
    assert_eq!(worker["mode"], "process_pool");
    assert_eq!(worker["health"]["status"], "healthy");
    assert_eq!(worker["draining"], false);
    assert_matches_schema(&spec, "WorkerJson", worker).await;
    let one = http::get(&format!("{base}/workers/{worker_id}")).await;
    assert_status(&one, 200, "one worker");
    assert_eq!(one.json()["capabilities"]["maxConcurrentTasks"], 2);
    let health = http::get(&format!("{base}/workers/{worker_id}/health")).await;
    assert_eq!(health.json()["health"]["healthy"], true);
    let missing = http::get(&format!("{base}/workers/no-such-worker")).await;
    assert_refused(&missing, 404, "Not Found", "an unknown worker");

    // Submit, then follow its progress over the WebSocket to the end.
    let submitted = post_json(
        &format!("{base}/tasks"),
        &json!({"task": "SLOW 5 100", "priority": "high", "timeout": 60000,
                "metadata": {"team": "blue", "attempt": 2}}),
    )
    .await;
    assert_status(&submitted, 202, "submit");
    let submitted = submitted.json();
    assert_eq!(submitted["message"], "Task submitted successfully");
    assert_eq!(submitted["status"], "pending");
    let task_id = submitted["taskId"].as_str().unwrap().to_owned();
    let (events, last) = follow(&base, &task_id, "").await;
    let sequences: Vec<u64> = events
        .iter()
        .map(|e| e["sequence"].as_u64().unwrap())
        .collect();
    assert_eq!(
        sequences,
        (1..=events.len() as u64).collect::<Vec<_>>(),
        "every event once, in order"
    );
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "text" && e["text"].as_str().unwrap().contains("chunk 5")),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "status" && e["status"] == "running")
    );
    // The original's progress fields ride along.
    assert_eq!(events[0]["progress"], 0);
    assert_eq!(events[events.len() - 1]["progress"], 100);
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "text" && e["currentStep"] == "writing")
    );
    assert_eq!(last["type"], "completed", "{last}");
    assert_eq!(last["data"]["status"], "completed");
    assert!(
        last["data"]["result"]["output"]
            .as_str()
            .unwrap()
            .contains("chunk 1")
    );
    assert_matches_schema(&spec, "Outcome", &last["data"]).await;
    assert_matches_schema(&spec, "EventJson", &events[0]).await;

    // A reconnecting client resumes after the last event it saw.
    let (rest, _) = follow(&base, &task_id, "?after=2").await;
    assert_eq!(rest, events[2..].to_vec());

    // The task in the original's shape.
    let task = http::get(&format!("{base}/tasks/{task_id}")).await;
    assert_status(&task, 200, "the task");
    let task = task.json();
    assert_eq!(task["id"], task_id.as_str());
    assert_eq!(task["taskId"], task_id.as_str());
    assert_eq!(task["status"], "completed");
    assert_eq!(task["priority"], "high");
    assert_eq!(task["category"], "coding");
    assert_eq!(task["title"], "SLOW 5 100");
    assert_eq!(task["description"], "SLOW 5 100");
    assert_eq!(task["timeout"], 60000);
    assert_eq!(task["metadata"], json!({"team": "blue", "attempt": "2"}));
    assert_eq!(task["assignedWorkerId"], worker_id.as_str());
    assert_eq!(task["result"]["exitCode"], 0);
    assert_eq!(task["progress"], 100);
    assert_eq!(task["lastSequence"], events.len());
    assert!(task["costUsd"].as_f64().unwrap() > 0.0, "{task}");
    assert_matches_schema(&spec, "TaskStatusJson", &task).await;
    let record = cluster.task(&task_id).await;
    assert_eq!(
        record.spec.unwrap().priority(),
        Priority::High,
        "the same task over gRPC"
    );

    let result = http::get(&format!("{base}/tasks/{task_id}/result")).await;
    assert_status(&result, 200, "the result");
    let result = result.json();
    assert!(result["output"].as_str().unwrap().contains("chunk 5"));
    assert!(result["completedAt"].is_string());
    let progress = http::get(&format!("{base}/tasks/{task_id}/progress")).await;
    assert_status(&progress, 200, "the progress");
    let progress = progress.json();
    assert_eq!(progress["status"], "completed");
    assert_eq!(progress["events"], events.len());
    assert_eq!(progress["lastEvent"], logged(&events[events.len() - 1]));
    let read = http::get(&format!("{base}/tasks/{task_id}/events?after=1")).await;
    assert_eq!(
        read.json()["events"],
        json!(events[1..].iter().map(logged).collect::<Vec<_>>())
    );

    // Lists and stats.
    let list = http::get(&format!("{base}/tasks")).await;
    assert_status(&list, 200, "the list");
    let list = list.json();
    assert!(
        list["summary"]["completed"].as_u64().unwrap() >= 1,
        "{list}"
    );
    assert!(
        list["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["id"] == task_id.as_str())
    );
    assert_matches_schema(&spec, "TaskList", &list).await;
    let running = http::get(&format!("{base}/tasks?status=running"))
        .await
        .json();
    assert_eq!(running["tasks"], json!([]));
    let stats = http::get(&format!("{base}/stats")).await;
    assert_status(&stats, 200, "stats");
    let stats = stats.json();
    assert_eq!(stats["completedTasks"], 1);
    assert_eq!(stats["totalWorkers"], 1);
    assert_matches_schema(&spec, "StatsJson", &stats).await;
    let mut socket = websocket(&ws_url(&base, "/ws/stats")).await.unwrap();
    let first = next_frame(&mut socket, FRAME).await.unwrap();
    assert_eq!(first["type"], "stats");
    assert_eq!(first["data"]["workers"][0]["id"], worker_id.as_str());
    let second = next_frame(&mut socket, FRAME).await.unwrap();
    assert_eq!(second["type"], "stats", "stats come again periodically");
    drop(socket);

    // DELETE of a task that has ended removes it.
    let deleted = http::request("DELETE", &format!("{base}/tasks/{task_id}"), &[], "").await;
    assert_status(&deleted, 200, "delete");
    assert_eq!(deleted.json()["deleted"], true);
    let gone = http::get(&format!("{base}/tasks/{task_id}")).await;
    assert_refused(&gone, 404, "Not Found", "a deleted task");

    // DELETE of one that runs cancels it, as the original did; its socket ends `failed`.
    let hanging = post_json(&format!("{base}/tasks"), &json!({"task": "HANG"})).await;
    let hanging = hanging.json()["taskId"].as_str().unwrap().to_owned();
    cluster.wait_for_agent(&hanging).await;
    let cancelled = http::request("DELETE", &format!("{base}/tasks/{hanging}"), &[], "").await;
    assert_status(&cancelled, 200, "cancel by DELETE");
    let cancelled = cancelled.json();
    assert_eq!(cancelled["deleted"], false);
    assert_eq!(cancelled["task"]["status"], "cancelled");
    let (_, last) = follow(&base, &hanging, "").await;
    assert_eq!(last["type"], "failed");
    assert_eq!(last["data"]["status"], "cancelled");
    assert_eq!(last["data"]["result"]["exitCode"], 1);
}

#[tokio::test]
async fn a_batch_with_dependencies_runs_in_order_and_client_ids_name_tasks() {
    let cluster = TestCluster::start(vec![WorkerSpec::default()]).await;
    let base = cluster.http_url();
    let batch = post_json(
        &format!("{base}/tasks/batch"),
        &json!({
            "tasks": [
                {"id": "build", "title": "Build it", "description": "SLOW 3 100", "category": "coding"},
                {"id": "check", "title": "Check it", "dependencies": ["build"], "category": "testing",
                 "priority": "critical"},
            ],
            "priority": "low",
        }),
    )
    .await;
    assert_status(&batch, 202, "the batch");
    let batch = batch.json();
    assert_eq!(batch["message"], "Batch task submission completed");
    assert_eq!(
        batch["results"],
        json!([{"taskId": "build", "status": "pending"}, {"taskId": "check", "status": "pending"}])
    );
    let (_, last) = follow(&base, "check", "").await;
    assert_eq!(last["type"], "completed", "{last}");
    let build = http::get(&format!("{base}/tasks/build")).await.json();
    let check = http::get(&format!("{base}/tasks/check")).await.json();
    assert_eq!(build["priority"], "low", "the batch's priority");
    assert_eq!(check["priority"], "critical", "the task's own");
    assert_eq!(check["category"], "testing");
    assert_eq!(check["title"], "Check it");
    assert_eq!(check["dependencies"], json!([build["clusterTaskId"]]));
    let build_record = cluster.task(build["clusterTaskId"].as_str().unwrap()).await;
    let check_record = cluster.task(check["clusterTaskId"].as_str().unwrap()).await;
    let end = build_record.end_time.unwrap();
    let start = check_record.start_time.unwrap();
    assert!(
        (start.seconds, start.nanos) >= (end.seconds, end.nanos),
        "the dependent task started after its dependency ended"
    );

    // The same client id again is the same task.
    let again = post_json(
        &format!("{base}/tasks"),
        &json!({"task": {"id": "build", "description": "SLOW 3 100"}}),
    )
    .await;
    assert_status(&again, 202, "a resubmission");
    let again = again.json();
    assert_eq!(again["taskId"], "build");
    assert_eq!(again["task"]["clusterTaskId"], build["clusterTaskId"]);

    // Not parallel: one after another.
    let serial = post_json(
        &format!("{base}/tasks/batch"),
        &json!({"tasks": ["first", "second"], "parallel": false}),
    )
    .await;
    assert_status(&serial, 202, "a serial batch");
    let serial = serial.json();
    let first = &serial["tasks"][0];
    let second = &serial["tasks"][1];
    assert_eq!(second["dependencies"], json!([first["clusterTaskId"]]));
    let (_, last) = follow(&base, second["id"].as_str().unwrap(), "").await;
    assert_eq!(last["type"], "completed");
    assert_eq!(
        last["data"]["result"]["output"],
        "MOCK_REPLY turn=1: second"
    );

    // A dependency that names no task refuses the whole batch.
    let unknown = post_json(
        &format!("{base}/tasks/batch"),
        &json!({"tasks": [{"title": "x", "dependencies": ["no-such-task"]}]}),
    )
    .await;
    let message = assert_refused(&unknown, 400, "Bad Request", "an unknown dependency");
    assert!(message.contains("no-such-task"), "{message}");
}

#[tokio::test]
async fn bad_input_is_answered_with_the_right_status() {
    let mut cluster = TestCluster::start(vec![WorkerSpec::default()]).await;
    let base = cluster.http_url();
    let tasks = format!("{base}/tasks");
    let json_header = [("content-type", "application/json")];
    for (body, hint, case) in [
        ("{not json", "JSON", "malformed JSON"),
        ("", "no JSON body", "no body"),
        ("{}", "missing field `task`", "no task"),
        (
            "{\"task\": \"x\", \"priority\": \"urgent\"}",
            "priority",
            "an unknown priority",
        ),
        (
            "{\"task\": \"x\", \"metadata\": {\"deep\": {\"a\": 1}}}",
            "metadata.deep",
            "nested metadata",
        ),
        (
            "{\"task\": {\"title\": \"x\", \"category\": \"poetry\"}}",
            "task.category",
            "an unknown category",
        ),
        (
            "{\"task\": {\"id\": \"has space\", \"title\": \"x\"}}",
            "task.id",
            "a bad client id",
        ),
        ("{\"task\": \"   \"}", "needs a prompt", "an empty prompt"),
        (
            "{\"tasks\": []}",
            "missing field `task`",
            "a batch sent to /tasks",
        ),
    ] {
        let answer = http::request("POST", &tasks, &json_header, body).await;
        let message = assert_refused(&answer, 400, "Bad Request", case);
        assert!(message.contains(hint), "{case}: {message}");
    }
    // The service's own validation, through the same code as gRPC.
    let huge = "x".repeat(600 << 10);
    let answer = post_json(&tasks, &json!({ "task": huge })).await;
    let message = assert_refused(&answer, 400, "Bad Request", "a prompt past the limit");
    assert!(message.contains("prompt"), "{message}");
    let larger_than_a_message = "x".repeat(5 << 20);
    let answer = post_json(&tasks, &json!({ "task": larger_than_a_message })).await;
    assert_refused(&answer, 413, "Payload Too Large", "a body past 4 MiB");

    for (path, status, reason) in [
        ("/tasks/no-such-task", 404, "Not Found"),
        ("/tasks/no-such-task/result", 404, "Not Found"),
        ("/tasks/no-such-task/progress", 404, "Not Found"),
        ("/tasks/bad.id", 400, "Bad Request"),
        ("/tasks?status=sleeping", 400, "Bad Request"),
        ("/tasks?limit=many", 400, "Bad Request"),
        ("/sessions/no-such-session", 404, "Not Found"),
        ("/no-such-route", 404, "Not Found"),
        ("/ws/stats", 426, "Upgrade Required"),
    ] {
        let answer = http::get(&format!("{base}{path}")).await;
        assert_refused(&answer, status, reason, path);
    }
    let unknown = http::request("DELETE", &format!("{base}/tasks/no-such-task"), &[], "").await;
    assert_refused(&unknown, 404, "Not Found", "DELETE of an unknown task");
    assert_eq!(
        websocket(&ws_url(&base, "/ws/tasks/no-such-task/progress"))
            .await
            .err(),
        Some(404),
        "a WebSocket of an unknown task is refused at the handshake"
    );

    // What a page of another site could make a browser send is refused: a request from
    // another origin (forgery, or a WebSocket opened there), and a name other than loopback's
    // (DNS rebinding).
    let forged = http::request(
        "POST",
        &tasks,
        &[
            ("origin", "http://evil.example"),
            ("content-type", "text/plain"),
        ],
        "{\"task\": \"BASH echo owned\"}",
    )
    .await;
    assert_refused(&forged, 403, "Forbidden", "a request from another origin");
    let hijack = http::request(
        "GET",
        &format!("{base}/ws/stats"),
        &[("origin", "http://evil.example")],
        "",
    )
    .await;
    assert_refused(&hijack, 403, "Forbidden", "a WebSocket from another origin");
    let rebound = http::request(
        "GET",
        &format!("{base}/tasks"),
        &[("host", "evil.example:3000")],
        "",
    )
    .await;
    let message = assert_refused(&rebound, 403, "Forbidden", "a name other than loopback's");
    assert!(message.contains("loopback"), "{message}");
    let own = base.trim_start_matches("http://");
    let same = http::request("GET", &format!("{base}/tasks"), &[("origin", &base)], "").await;
    assert_status(
        &same,
        200,
        &format!("a request from the console's own origin {own}"),
    );
    assert!(
        cluster.all_tasks().await.iter().all(|t| !t
            .spec
            .as_ref()
            .unwrap()
            .prompt
            .contains("owned")),
        "the forged task was not submitted"
    );

    // A task still running cannot be deleted twice over: the first DELETE cancels it, the
    // second removes it.
    let submitted = post_json(&tasks, &json!({"task": "HANG"})).await.json();
    let id = submitted["taskId"].as_str().unwrap().to_owned();
    let first = http::request("DELETE", &format!("{base}/tasks/{id}"), &[], "").await;
    assert_eq!(first.json()["deleted"], false);
    let second = http::request("DELETE", &format!("{base}/tasks/{id}"), &[], "").await;
    assert_eq!(second.json()["deleted"], true);
    cluster.assert_unharmed().await;

    // Without its scheduler the driver cannot say what the cluster holds: 503, and the
    // probes say so.
    cluster.scheduler.kill().await;
    let stats = format!("{base}/stats");
    let unavailable = wait_for(Duration::from_secs(30), || async {
        let answer = http::get(&stats).await;
        (answer.status == 503).then_some(answer)
    })
    .await
    .expect("stats are unavailable without the scheduler");
    assert_refused(&unavailable, 503, "Service Unavailable", "no scheduler");
    let health = http::get(&format!("{base}/health")).await;
    assert_status(&health, 503, "health without the scheduler");
    assert_eq!(health.json()["status"], "unhealthy");
    assert_status(
        &http::get(&format!("{base}/health/live")).await,
        200,
        "the driver itself lives",
    );
}

fn sha256(key: &str) -> String {
    hex::encode(sha2::Sha256::digest(key.as_bytes()))
}

#[tokio::test]
async fn keys_scopes_and_quotas_are_the_ones_grpc_has() {
    const WRITER: &str = "cck_writer_0123456789abcdef012345678";
    const READER: &str = "cck_reader_0123456789abcdef01234567";
    const TIGHT: &str = "cck_tight_0123456789abcdef012345678";
    let keys = format!(
        "auth:\n  apiKeys:\n\
         \x20   - {{id: writer, sha256: {}, scopes: [tasks:read, tasks:write]}}\n\
         \x20   - {{id: reader, sha256: {}, scopes: [tasks:read]}}\n\
         \x20   - {{id: tight, sha256: {}, scopes: [tasks:read], quotas: {{requestsPerSecond: 1}}}}\n",
        sha256(WRITER),
        sha256(READER),
        sha256(TIGHT),
    );
    let cluster = TestCluster::start_with_env(
        &keys,
        &[("CLAUDECLUSTER_API_KEY", WRITER)],
        vec![WorkerSpec::default()],
    )
    .await;
    let base = cluster.http_url();
    let bearer = |key: &str| format!("Bearer {key}");

    // Probes need no key; everything else does.
    assert_status(&http::get(&format!("{base}/health")).await, 200, "health");
    assert_status(
        &http::get(&format!("{base}/")).await,
        200,
        "the console page",
    );
    assert_refused(
        &http::get(&format!("{base}/tasks")).await,
        401,
        "Unauthorized",
        "no key",
    );
    let wrong = bearer("cck_wrong_0123456789abcdef0123456789");
    assert_refused(
        &http::request(
            "GET",
            &format!("{base}/stats"),
            &[("authorization", &wrong)],
            "",
        )
        .await,
        401,
        "Unauthorized",
        "an unknown key",
    );
    assert_eq!(
        websocket(&ws_url(&base, "/ws/stats")).await.err(),
        Some(401),
        "a WebSocket without a key"
    );

    // A reader may read, not write.
    let body = json!({"task": "hello"}).to_string();
    let reader = bearer(READER);
    let refused = http::request(
        "POST",
        &format!("{base}/tasks"),
        &[("authorization", &reader)],
        &body,
    )
    .await;
    let message = assert_refused(&refused, 403, "Forbidden", "a reader submitting");
    assert!(message.contains("tasks:write"), "{message}");

    // The writer, by either header; the WebSocket by the query.
    let submitted = http::request(
        "POST",
        &format!("{base}/tasks"),
        &[("x-api-key", WRITER)],
        &body,
    )
    .await;
    assert_status(&submitted, 202, "a writer submitting with X-API-Key");
    let task_id = submitted.json()["taskId"].as_str().unwrap().to_owned();
    let (_, last) = follow(&base, &task_id, &format!("?key={WRITER}")).await;
    assert_eq!(last["type"], "completed", "{last}");
    let read = http::request(
        "GET",
        &format!("{base}/tasks/{task_id}"),
        &[("authorization", &bearer(WRITER))],
        "",
    )
    .await;
    assert_eq!(read.json()["owner"], "writer");
    // Another key's task is not found, as over gRPC.
    let hidden = http::request(
        "GET",
        &format!("{base}/tasks/{task_id}"),
        &[("authorization", &reader)],
        "",
    )
    .await;
    assert_refused(&hidden, 404, "Not Found", "another key's task");

    // Past its rate: 429.
    let tight = bearer(TIGHT);
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let answer = http::request(
            "GET",
            &format!("{base}/tasks?status=running"),
            &[("authorization", &tight)],
            "",
        )
        .await;
        statuses.push(answer.status);
    }
    assert!(statuses.contains(&429), "{statuses:?}");
}

#[tokio::test]
async fn without_keys_http_is_served_on_loopback_only_unless_told_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("driver.yaml");
    std::fs::write(&config, "listen: 127.0.0.1:0\n").unwrap();
    let output = tokio::process::Command::new(claudecluster_bin())
        .args(["driver", "--config"])
        .arg(&config)
        .env("XDG_DATA_HOME", dir.path().join("data"))
        .env("CLAUDECLUSTER_DRIVER__HTTP__LISTEN", "0.0.0.0:0")
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("refusing to serve HTTP on 0.0.0.0:")
            && stderr.contains("`driver.http.listen`"),
        "{stderr}"
    );
    // Turned off, the driver serves gRPC alone.
    std::fs::write(&config, "listen: 127.0.0.1:0\n").unwrap();
    let driver = ServiceProcess::start(
        "driver",
        &config,
        &[(
            "CLAUDECLUSTER_DRIVER__HTTP__LISTEN".to_owned(),
            String::new(),
        )],
    )
    .await;
    assert_eq!(driver.http, None, "an empty address turns HTTP off");
}
