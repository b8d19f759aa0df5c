//! The web console in a real headless browser (Debian's chromium over the DevTools protocol),
//! against a running cluster with the real Claude Code CLI: it loads without errors, lists
//! the worker, submits a task through its form, shows the task's text while it still runs,
//! then shows it completed. A screenshot is kept as an artifact.

use std::path::PathBuf;
use std::time::Duration;

use claudecluster_integration_tests::browser::Browser;
use claudecluster_integration_tests::http;
use claudecluster_integration_tests::*;
use claudecluster_proto::v1::*;
use serde_json::json;

/// Where test artifacts go: `$CARGO_TARGET_DIR/test-artifacts` (or the system's temp dir).
fn artifacts() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join("test-artifacts")
}

/// The text of the element `selector`.
fn text_of(selector: &str) -> String {
    format!("(document.querySelector({selector:?}) || {{}}).textContent || ''")
}

#[tokio::test]
async fn the_console_lists_workers_submits_a_task_and_streams_it_live() {
    let cluster = TestCluster::start_with_driver(
        "http:\n  statsInterval: 200ms\n",
        vec![WorkerSpec::default()],
    )
    .await;
    let browser = Browser::start().await;
    browser.open(&format!("{}/", cluster.http_url())).await;

    // The worker, from the stats WebSocket.
    let worker_id = cluster.worker_ids[0].clone();
    wait_until(Duration::from_secs(20), || async {
        let workers = browser.eval(&text_of("#workers tbody")).await;
        workers.as_str().unwrap_or_default().contains(&worker_id)
    })
    .await
    .unwrap_or_else(|_| panic!("the console lists worker {worker_id}"));
    let row = browser.eval(&text_of("#workers tbody tr")).await;
    let row = row.as_str().unwrap();
    assert!(
        row.contains("process_pool") && row.contains("healthy") && row.contains("0 / 2"),
        "{row}"
    );

    // Submit through the form: the agent says something, then runs a tool for a while, so
    // that its text is on the page well before the task completes.
    let marker = "console-finished";
    browser
        .eval(&format!(
            "document.querySelector('#prompt').value = {prompt};\
             document.querySelector('#tools').value = 'Bash';\
             document.querySelector('#submit').click(); true",
            prompt = json!(format!("BASH sleep 4 && echo {marker}"))
        ))
        .await;
    let seen_running = wait_for(Duration::from_secs(60), || async {
        let events = browser.eval(&text_of("#events")).await;
        let events = events.as_str().unwrap_or_default().to_owned();
        if !events.contains("I'll run it.") || !events.contains("→ Bash") {
            return None;
        }
        // The text and the tool call are there: the task must still be running.
        let tasks = cluster.all_tasks().await;
        Some((events, tasks))
    })
    .await
    .expect("the agent's text appears in the live view");
    let (events, tasks) = seen_running;
    assert_eq!(tasks.len(), 1, "the form submitted one task");
    assert_eq!(
        tasks[0].status(),
        TaskStatus::Running,
        "the text showed while the task ran: {events}"
    );
    assert!(
        events.contains("→ Bash"),
        "the tool call is shown live: {events}"
    );

    wait_until(Duration::from_secs(60), || async {
        browser.eval(&text_of("#live-status")).await == json!("completed")
    })
    .await
    .expect("the live view shows the task completed");
    let events = browser.eval(&text_of("#events")).await;
    let events = events.as_str().unwrap();
    assert!(
        events.contains(&format!("← {marker}")),
        "the tool's result: {events}"
    );
    assert!(events.contains(&format!("MOCK_DONE {marker}")), "{events}");
    let task = cluster.task(&tasks[0].task_id).await;
    assert_eq!(task.status(), TaskStatus::Completed);
    // The task list shows it completed too (it refreshes every 2 s).
    wait_until(Duration::from_secs(10), || async {
        let listed = browser.eval(&text_of("#tasks tbody")).await;
        listed.as_str().unwrap_or_default().contains("completed")
    })
    .await
    .expect("the task list shows the task completed");

    let shot = artifacts().join("console.png");
    browser.screenshot(&shot).await;
    let size = std::fs::metadata(&shot).unwrap().len();
    assert!(size > 10_000, "a real screenshot: {size} bytes");
    println!("console screenshot: {}", shot.display());
    let errors = browser.errors();
    assert!(errors.is_empty(), "the page logged errors: {errors:#?}");
}

#[tokio::test]
async fn sessions_and_their_conversation_over_http_and_in_the_console() {
    let cluster = TestCluster::start(vec![WorkerSpec::in_mode(Mode::Container)]).await;
    let session = cluster
        .driver()
        .await
        .create_session(CreateSessionRequest {
            spec: Some(SessionSpec::default()),
        })
        .await
        .expect("create a session")
        .into_inner()
        .session
        .unwrap();
    let id = session.session_id.clone();
    let reply = cluster.send_message(&id, "hello over http").await;
    assert!(
        reply.iter().any(|e| matches!(&e.kind,
            Some(event::Kind::Text(t)) if t.text == "MOCK_REPLY turn=1: hello over http")),
        "{reply:?}"
    );

    let base = cluster.http_url();
    let listed = http::get(&format!("{base}/sessions")).await;
    assert_eq!(listed.status, 200, "{}", listed.text());
    let listed = listed.json();
    assert_eq!(listed["sessions"][0]["id"], id.as_str(), "{listed}");
    assert_eq!(listed["sessions"][0]["turns"], 1);
    let idle = http::get(&format!("{base}/sessions?state=idle"))
        .await
        .json();
    assert_eq!(idle["sessions"][0]["id"], id.as_str(), "{idle}");
    let detail = http::get(&format!("{base}/sessions/{id}")).await;
    assert_eq!(detail.status, 200, "{}", detail.text());
    let detail = detail.json();
    assert_eq!(detail["session"]["state"], "idle");
    let events = detail["events"].as_array().unwrap();
    assert!(
        events.iter().any(|e| e["kind"] == "text"
            && e["turn"] == 1
            && e["text"] == "MOCK_REPLY turn=1: hello over http"),
        "{detail}"
    );
    assert_eq!(
        events.last().unwrap()["sequence"],
        detail["session"]["lastSequence"],
        "the whole conversation so far"
    );

    // The console shows the session, and its conversation once clicked.
    let browser = Browser::start().await;
    browser.open(&format!("{base}/")).await;
    wait_until(Duration::from_secs(20), || async {
        browser
            .eval("document.querySelectorAll('#sessions tbody tr').length === 1")
            .await
            == json!(true)
    })
    .await
    .expect("the console lists the session");
    browser
        .eval("document.querySelector('#sessions tbody tr').click(); true")
        .await;
    wait_until(Duration::from_secs(20), || async {
        let conversation = browser.eval(&text_of("#conversation")).await;
        conversation
            .as_str()
            .unwrap_or_default()
            .contains("MOCK_REPLY turn=1: hello over http")
    })
    .await
    .expect("the console shows the session's conversation");
    let shot = artifacts().join("console-session.png");
    browser.screenshot(&shot).await;
    println!("console screenshot: {}", shot.display());
    let errors = browser.errors();
    assert!(errors.is_empty(), "the page logged errors: {errors:#?}");
    let _ = cluster
        .driver()
        .await
        .close_session(CloseSessionRequest { session_id: id })
        .await;
}
