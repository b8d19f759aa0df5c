//! Restarts and crashes of every service, done to real processes: `kill -9`, `SIGSTOP`,
//! `SIGTERM`. Nothing is lost and no task runs twice at the same time.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use claudecluster_integration_tests::*;
use claudecluster_proto::v1::event::Kind;
use claudecluster_proto::v1::*;
use prost::Message;

/// A file the tests' agents wait for: a task whose prompt is [`Gate::prompt`] runs (its agent
/// sits in a Bash tool call) until the gate opens.
struct Gate {
    path: std::path::PathBuf,
}

impl Gate {
    fn new(dir: &std::path::Path, name: &str) -> Self {
        Gate {
            path: dir.join(format!("{name}.open")),
        }
    }

    fn task(&self) -> TaskSpec {
        with_tools(
            &format!(
                "BASH while [ ! -e {} ]; do sleep 0.05; done; echo released",
                self.path.display()
            ),
            &["Bash"],
        )
    }

    fn open(&self) {
        std::fs::write(&self.path, "").unwrap();
    }
}

/// Whether the task's agent is in its tool call: it has printed the Bash tool use.
fn in_tool_call(events: &[Event]) -> bool {
    events
        .iter()
        .any(|event| matches!(&event.kind, Some(Kind::ToolUse(tool)) if tool.name == "Bash"))
}

/// Waits until every task's agent sits in its tool call (read from the driver's logs).
async fn wait_until_blocked(cluster: &TestCluster, tasks: &[String]) {
    for task_id in tasks {
        wait_for_tool_call(cluster, task_id, |_| true).await;
    }
}

/// Waits until the task's log has a tool call of an attempt `attempt` accepts.
async fn wait_for_tool_call(cluster: &TestCluster, task_id: &str, attempt: impl Fn(u32) -> bool) {
    let driver = cluster.driver().await;
    let attempt = &attempt;
    wait_until(Duration::from_secs(90), || {
        let mut driver = driver.clone();
        async move {
            events_so_far(&mut driver, task_id)
                .await
                .iter()
                .any(|event| {
                    attempt(event.attempt) && matches!(&event.kind, Some(Kind::ToolUse(_)))
                })
        }
    })
    .await
    .unwrap_or_else(|_| panic!("task {task_id} did not reach its tool call"));
}

/// The events the driver has for a task now, without waiting for its end.
async fn events_so_far(driver: &mut Driver, task_id: &str) -> Vec<Event> {
    let Ok(response) = driver
        .stream_task_events(StreamTaskEventsRequest {
            task_id: task_id.to_owned(),
            after_sequence: 0,
        })
        .await
    else {
        return Vec::new();
    };
    let mut stream = response.into_inner();
    let mut events = Vec::new();
    // What is there now arrives at once; the stream then waits for more.
    while let Ok(Ok(Some(response))) =
        tokio::time::timeout(Duration::from_millis(300), stream.message()).await
    {
        events.extend(response.event);
    }
    events
}

/// A client that follows one task's events and, whenever the stream breaks, opens it again after
/// the last event it saw: what every client of the public API does across a driver restart.
/// `seen` holds what it has read so far.
async fn follow_resuming(address: String, task_id: String, seen: Arc<Mutex<Vec<Event>>>) {
    let mut driver = driver_at(&address);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "task {task_id} did not end within 180 s"
        );
        let after = seen.lock().unwrap().last().map_or(0, |e| e.sequence);
        let request = StreamTaskEventsRequest {
            task_id: task_id.clone(),
            after_sequence: after,
        };
        let mut stream = match driver.stream_task_events(request).await {
            Ok(response) => response.into_inner(),
            Err(_) => {
                // The driver is away: try again shortly.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // A stream that ends or breaks before the task's end is opened again.
        while let Ok(Some(response)) = stream.message().await {
            let event = response.event.unwrap();
            let terminal =
                matches!(&event.kind, Some(Kind::StatusChange(c)) if c.status().is_terminal());
            seen.lock().unwrap().push(event);
            if terminal {
                return;
            }
        }
    }
}

fn sequences(events: &[Event]) -> Vec<u64> {
    events.iter().map(|event| event.sequence).collect()
}

#[tokio::test]
async fn a_driver_killed_while_tasks_run_and_clients_stream_loses_nothing() {
    let worker = WorkerSpec {
        capacity: 20,
        ..WorkerSpec::default()
    };
    let mut cluster = TestCluster::start(vec![worker]).await;
    let gate = Gate::new(cluster.dir.path(), "driver-restart");
    let mut tasks = Vec::new();
    for _ in 0..20 {
        tasks.push(cluster.submit(gate.task()).await.task_id);
    }
    // Five clients, each following every task.
    let mut clients = Vec::new();
    for _ in 0..5 {
        let mut logs = BTreeMap::new();
        for task_id in &tasks {
            let seen = Arc::new(Mutex::new(Vec::new()));
            let follower = tokio::spawn(follow_resuming(
                cluster.driver.address.clone(),
                task_id.clone(),
                seen.clone(),
            ));
            logs.insert(task_id.clone(), (seen, follower));
        }
        clients.push(logs);
    }
    wait_until_blocked(&cluster, &tasks).await;
    // Every client has read the tool call of every task before the driver dies.
    wait_until(Duration::from_secs(30), || {
        let ready = clients.iter().all(|logs| {
            logs.values()
                .all(|(seen, _)| in_tool_call(&seen.lock().unwrap()))
        });
        async move { ready }
    })
    .await
    .expect("the clients read the agents' tool calls");

    cluster.driver.kill().await;
    cluster.driver.restart().await;
    gate.open();

    for logs in clients.iter_mut() {
        for (_, follower) in logs.values_mut() {
            follower.await.unwrap();
        }
    }
    let mut driver = cluster.driver().await;
    for task_id in &tasks {
        let stored = collect_events(&mut driver, task_id, 0).await;
        let task = cluster.task(task_id).await;
        assert_eq!(
            task.status(),
            TaskStatus::Completed,
            "{task_id}: {}",
            task.status_reason
        );
        assert_eq!(task.attempt, 1, "the run went on through the restart");
        assert_eq!(
            sequences(&stored),
            (1..=stored.len() as u64).collect::<Vec<_>>()
        );
        let stored_bytes: Vec<Vec<u8>> = stored.iter().map(Message::encode_to_vec).collect();
        for logs in &clients {
            let seen = logs[task_id].0.lock().unwrap().clone();
            assert_eq!(
                sequences(&seen),
                sequences(&stored),
                "every sequence number once, in order"
            );
            let seen_bytes: Vec<Vec<u8>> = seen.iter().map(Message::encode_to_vec).collect();
            assert_eq!(
                seen_bytes, stored_bytes,
                "the client's log is the stored log"
            );
        }
        assert!(
            stored.iter().any(|event| matches!(&event.kind, Some(Kind::Result(r)) if r.text.contains("MOCK_DONE released"))),
            "{task_id}: the agent's own result was recorded"
        );
    }
}

#[tokio::test]
async fn a_restarted_scheduler_learns_what_runs_and_never_double_books() {
    let worker = WorkerSpec {
        capacity: 2,
        ..WorkerSpec::default()
    };
    let mut cluster = TestCluster::start(vec![worker]).await;
    let first_gate = Gate::new(cluster.dir.path(), "first");
    let second_gate = Gate::new(cluster.dir.path(), "second");
    let running: Vec<String> = [
        cluster.submit(first_gate.task()).await.task_id,
        cluster.submit(first_gate.task()).await.task_id,
    ]
    .into();
    wait_until_blocked(&cluster, &running).await;
    let mut queued = Vec::new();
    for _ in 0..3 {
        queued.push(cluster.submit(second_gate.task()).await.task_id);
    }

    cluster.scheduler.kill().await;
    cluster.scheduler.restart().await;
    cluster.wait_for_healthy_workers(1).await;
    // The new scheduler knows the worker is full: the queued tasks wait, none is refused.
    for task_id in &queued {
        let task = cluster.task(task_id).await;
        assert_eq!(task.status(), TaskStatus::Pending, "{}", task.status_reason);
        assert_eq!(task.attempt, 1);
    }
    first_gate.open();
    // Exactly `capacity` of the queued tasks start; the third waits for a slot.
    wait_until(Duration::from_secs(60), || {
        let cluster = &cluster;
        let queued = queued.clone();
        async move {
            let mut running = 0;
            for task_id in &queued {
                if cluster.task(task_id).await.status() == TaskStatus::Running {
                    running += 1;
                }
            }
            running == 2
        }
    })
    .await
    .expect("two queued tasks run");
    let mut statuses_now = Vec::new();
    for task_id in &queued {
        statuses_now.push(cluster.task(task_id).await.status());
    }
    assert_eq!(
        statuses_now
            .iter()
            .filter(|s| **s == TaskStatus::Running)
            .count(),
        2
    );
    assert!(
        statuses_now.contains(&TaskStatus::Pending),
        "{statuses_now:?}"
    );
    second_gate.open();
    for task_id in running.iter().chain(&queued) {
        let (task, events) = cluster.finish(task_id).await;
        assert_eq!(
            task.status(),
            TaskStatus::Completed,
            "{}",
            task.status_reason
        );
        assert_eq!(task.attempt, 1, "no refusal used up an attempt");
        assert!(
            events.iter().all(|event| !matches!(&event.kind, Some(Kind::StatusChange(c)) if c.reason.contains("at capacity"))),
            "{task_id} was never refused for capacity"
        );
    }
}

/// Process ids of the agents a task's RUNNING events name (`process 1234`).
fn agent_pids(events: &[Event]) -> Vec<i32> {
    events
        .iter()
        .filter_map(|event| match &event.kind {
            Some(Kind::StatusChange(change)) if change.status() == TaskStatus::Running => change
                .runner
                .strip_prefix("process ")
                .and_then(|pid| pid.parse().ok()),
            _ => None,
        })
        .collect()
}

/// The live children of process `parent`.
fn children(parent: i32) -> Vec<i32> {
    let mut members = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the command name: state, ppid, …
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        if fields.first() != Some(&"Z") && fields.get(1) == Some(&parent.to_string().as_str()) {
            members.push(pid);
        }
    }
    members
}

fn alive(pid: i32) -> bool {
    // A zombie has exited: only its entry is left until its parent reaps it.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            stat.rsplit(')')
                .next()
                .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

#[tokio::test]
async fn a_killed_workers_agents_die_with_it_and_its_task_runs_once_elsewhere() {
    let one = WorkerSpec {
        capacity: 1,
        ..WorkerSpec::default()
    };
    let mut cluster = TestCluster::start(vec![one.clone()]).await;
    let gate = Gate::new(cluster.dir.path(), "worker-kill");
    let task_id = cluster.submit(gate.task()).await.task_id;
    wait_until_blocked(&cluster, std::slice::from_ref(&task_id)).await;
    let before = events_so_far(&mut cluster.driver().await, &task_id).await;
    let pids = agent_pids(&before);
    assert_eq!(pids.len(), 1, "{before:?}");
    assert!(alive(pids[0]));
    cluster.add_worker(one).await;
    cluster.wait_for_healthy_workers(2).await;

    // The agent's Bash tool runs in a session of its own, outside the agent's process group.
    // Its tool call is printed before the tool starts: wait for the process.
    wait_until(Duration::from_secs(30), || async {
        !children(pids[0]).is_empty()
    })
    .await
    .expect("the agent's tool process");
    let tools = children(pids[0]);
    cluster.workers[0].kill().await;
    wait_until(Duration::from_secs(10), || async { !alive(pids[0]) })
        .await
        .expect("the agent died with its worker");
    // The task runs again, on the other worker.
    wait_for_tool_call(&cluster, &task_id, |attempt| attempt == 2).await;
    // The dead agent's tools lost their agent; the worker started again on that workspace
    // root stops them.
    cluster.workers[0].restart().await;
    wait_until(Duration::from_secs(10), || async {
        tools.iter().all(|pid| !alive(*pid))
    })
    .await
    .expect("nothing the killed agent started is left");
    gate.open();
    let (task, events) = cluster.finish(&task_id).await;
    assert_eq!(
        task.status(),
        TaskStatus::Completed,
        "{}",
        task.status_reason
    );
    assert_eq!(task.attempt, 2);
    assert_eq!(task.worker_id, cluster.worker_ids[1]);
    let results = events
        .iter()
        .filter(|event| matches!(event.kind, Some(Kind::Result(_))))
        .count();
    assert_eq!(results, 1, "one run reached its end");
}

#[tokio::test]
async fn a_worker_stopped_past_its_heartbeats_comes_back_and_stops_its_stale_run() {
    let one = WorkerSpec {
        capacity: 1,
        ..WorkerSpec::default()
    };
    let mut cluster = TestCluster::start(vec![one.clone()]).await;
    let gate = Gate::new(cluster.dir.path(), "sigstop");
    let task_id = cluster.submit(gate.task()).await.task_id;
    wait_until_blocked(&cluster, std::slice::from_ref(&task_id)).await;
    let stale_pid = agent_pids(&events_so_far(&mut cluster.driver().await, &task_id).await)[0];
    cluster.add_worker(one).await;
    cluster.wait_for_healthy_workers(2).await;

    cluster.workers[0].signal(libc::SIGSTOP);
    // The driver gives up on the stopped worker and the task runs again on the other one.
    wait_for_tool_call(&cluster, &task_id, |attempt| attempt == 2).await;
    cluster.workers[0].signal(libc::SIGCONT);
    // Told by the scheduler that its run was given away, the worker stops the stale agent.
    wait_until(Duration::from_secs(30), || async { !alive(stale_pid) })
        .await
        .expect("the stale agent was stopped");
    gate.open();
    let (task, events) = cluster.finish(&task_id).await;
    assert_eq!(
        task.status(),
        TaskStatus::Completed,
        "{}",
        task.status_reason
    );
    assert_eq!(task.attempt, 2);
    let requeued_at = events
        .iter()
        .position(|event| event.attempt == 2)
        .expect("the second attempt's events");
    assert!(
        events[requeued_at..].iter().all(|event| event.attempt == 2),
        "after the task was given to the second attempt, only its events are in the log"
    );
    let results: Vec<u32> = events
        .iter()
        .filter(|event| matches!(event.kind, Some(Kind::Result(_))))
        .map(|event| event.attempt)
        .collect();
    assert_eq!(results, vec![2]);
}

#[tokio::test]
async fn sigterm_with_followers_attached_ends_the_embedded_cluster_within_its_grace() {
    let dir = tempfile::tempdir().unwrap();
    let api = StandinApi::start().await.unwrap();
    let config = dir.path().join("up.yaml");
    std::fs::write(
        &config,
        format!(
            "driver:\n  listen: 127.0.0.1:0\n\
             scheduler:\n  listen: 127.0.0.1:0\n\
             worker:\n  listen: 127.0.0.1:0\n  workspaceRoot: {ws}\n  shutdownGrace: 2s\n  processPool:\n    maxProcesses: 2\n    claudeCodePath: {claude}\n  agent:\n    cancelGracePeriod: 1\n    env:\n      CLAUDE_CONFIG_DIR: {cfg}\n",
            ws = dir.path().join("workspaces").display(),
            claude = claude_bin().display(),
            cfg = dir.path().join("claude-config").display(),
        ),
    )
    .unwrap();
    let env = vec![
        ("ANTHROPIC_BASE_URL".to_owned(), api.base_url()),
        (
            "ANTHROPIC_API_KEY".to_owned(),
            "sk-ant-standin-secret".to_owned(),
        ),
        ("CLAUDE_CODE_MAX_RETRIES".to_owned(), "0".to_owned()),
    ];
    let mut up = ServiceProcess::start_up(&config, &env).await;
    let mut driver = driver_at(&up.address);
    let gate = Gate::new(dir.path(), "never");
    let task_id = driver
        .submit_task(SubmitTaskRequest {
            spec: Some(gate.task()),
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap()
        .task_id;
    let mut follower = driver
        .stream_task_events(StreamTaskEventsRequest {
            task_id: task_id.clone(),
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    // The follower is attached and the agent runs.
    loop {
        let event = follower.message().await.unwrap().unwrap().event.unwrap();
        if matches!(&event.kind, Some(Kind::ToolUse(_))) {
            break;
        }
    }
    let asked = std::time::Instant::now();
    up.signal(libc::SIGTERM);
    let status = up
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("`up` exited after SIGTERM");
    let took = asked.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(
        took < Duration::from_secs(10),
        "shutdownGrace 2 s and cancelGracePeriod 1 s, yet it took {took:?}"
    );
    // The follower's stream ended: with the task's end, or UNAVAILABLE so it reconnects.
    let mut ended = false;
    loop {
        match follower.message().await {
            Ok(Some(response)) => {
                if matches!(response.event.and_then(|e| e.kind), Some(Kind::StatusChange(c)) if c.status().is_terminal())
                {
                    ended = true;
                }
            }
            Ok(None) => break,
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                break;
            }
        }
    }
    // What the cluster recorded survives it: the worker gave the task back when it shut
    // down, and the task runs again when the cluster is back.
    up.restart().await;
    let mut driver = driver_at(&up.address);
    gate.open();
    let events = collect_events(&mut driver, &task_id, 0).await;
    let task = driver
        .get_task(GetTaskRequest {
            task_id: task_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(
        task.status(),
        TaskStatus::Completed,
        "{}",
        task.status_reason
    );
    assert_eq!(task.attempt, 2);
    let given_back = events
        .iter()
        .find_map(|event| match &event.kind {
            Some(Kind::StatusChange(c))
                if c.status() == TaskStatus::Pending && event.attempt == 2 =>
            {
                Some(c.reason.clone())
            }
            _ => None,
        })
        .expect("the task was queued again");
    assert!(
        given_back.contains("the worker is shutting down; it gives the task back"),
        "{given_back}"
    );
    assert!(!ended, "the task did not end: it was given back");
}

/// A prompt whose agent waits, in its tool call, for `go` to appear in its workspace.
const WAIT_IN_WORKSPACE: &str = "BASH while [ ! -e /workspace/go ]; do sleep 0.05; done; cat /workspace/notes.txt 2>/dev/null; echo released";

#[tokio::test]
async fn container_tasks_and_a_session_mid_conversation_go_on_through_a_driver_restart() {
    let worker = WorkerSpec {
        capacity: 3,
        ..WorkerSpec::in_mode(Mode::Container)
    };
    let mut cluster = TestCluster::start(vec![worker]).await;
    let mut tasks = Vec::new();
    for _ in 0..2 {
        tasks.push(
            cluster
                .submit(with_tools(WAIT_IN_WORKSPACE, &["Bash"]))
                .await
                .task_id,
        );
    }
    wait_until_blocked(&cluster, &tasks).await;

    let mut driver = cluster.driver().await;
    let session = driver
        .create_session(CreateSessionRequest {
            spec: Some(SessionSpec {
                agent: Some(AgentOptions {
                    allowed_tools: vec!["Write".into(), "Bash".into()],
                    ..Default::default()
                }),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    let session_id = session.session_id.clone();
    let first = cluster
        .send_message(&session_id, "WRITE notes.txt alpha")
        .await;
    assert!(
        first.iter().any(|e| matches!(&e.kind, Some(Kind::Result(r)) if r.text.contains("MOCK_DONE wrote notes.txt"))),
        "{first:?}"
    );
    // The second message is being answered (the agent waits in its tool call) when the driver
    // dies.
    let mut second = driver
        .send_session_message(SendSessionMessageRequest {
            session_id: session_id.clone(),
            text: WAIT_IN_WORKSPACE.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    loop {
        let event = second.message().await.unwrap().unwrap().event.unwrap();
        let in_tool = matches!(&event.kind, Some(Kind::ToolUse(_)));
        seen.push(event);
        if in_tool {
            break;
        }
    }
    let turn = seen.last().unwrap().turn;

    cluster.driver.kill().await;
    cluster.driver.restart().await;

    let mut driver = cluster.driver().await;
    for task_id in &tasks {
        let workspace = cluster.task(task_id).await.workspace;
        std::fs::write(std::path::Path::new(&workspace).join("go"), "").unwrap();
    }
    let session_workspace = cluster.session(&session_id).await.workspace;
    std::fs::write(std::path::Path::new(&session_workspace).join("go"), "").unwrap();

    // The reply resumes after the last event the client saw, and ends with the turn.
    let after = seen.last().unwrap().sequence;
    let mut stream = driver
        .stream_session_events(StreamSessionEventsRequest {
            session_id: session_id.clone(),
            after_sequence: after,
        })
        .await
        .unwrap()
        .into_inner();
    let mut rest = Vec::new();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(90), stream.message())
            .await
            .expect("the reply went on")
            .unwrap()
            .unwrap()
            .event
            .unwrap();
        let ends = event.turn == turn
            && matches!(&event.kind, Some(Kind::SessionState(c)) if c.state() == SessionState::Idle);
        rest.push(event);
        if ends {
            break;
        }
    }
    assert_eq!(
        rest.first().map(|e| e.sequence),
        Some(after + 1),
        "no gap after what the client saw"
    );
    assert!(
        rest.iter().any(
            |e| matches!(&e.kind, Some(Kind::Result(r)) if r.text.contains("MOCK_DONE alpha"))
        ),
        "the second message was answered in the same container, with the first one's file: {rest:?}"
    );
    let third = cluster.send_message(&session_id, "RECALL").await;
    assert!(
        third.iter().any(|e| matches!(&e.kind, Some(Kind::Result(r)) if r.text.starts_with("MOCK_RECALL n=2: WRITE notes.txt alpha | BASH"))),
        "the conversation kept its history: {third:?}"
    );
    for task_id in &tasks {
        let (task, _) = cluster.finish(task_id).await;
        assert_eq!(
            task.status(),
            TaskStatus::Completed,
            "{}",
            task.status_reason
        );
        assert_eq!(task.attempt, 1, "the container went on through the restart");
    }
    driver
        .close_session(CloseSessionRequest {
            session_id: session_id.clone(),
        })
        .await
        .unwrap();
}

/// A Python MCP client (the official SDK) over stdio: spawns a container agent on `argv[3]`,
/// prints its task id, then waits for it with `wait_for_task` until it has ended and prints the
/// final state. The driver restarts while it waits.
const MCP_WAITER: &str = r#"
import asyncio, json, sys
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
async def main():
    params = StdioServerParameters(command=sys.argv[1], args=["mcp", "--driver", sys.argv[2]])
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            spawned = await session.call_tool("spawn_claude_container", {"task": sys.argv[3], "allowedTools": ["Bash"]})
            task = json.loads(spawned.content[0].text)
            print(json.dumps({"taskId": task["taskId"]}), flush=True)
            for _ in range(10):
                result = await session.call_tool("wait_for_task", {"taskId": task["taskId"], "timeoutSeconds": 50})
                state = {"is_error": result.is_error, "text": result.content[0].text}
                if result.is_error or json.loads(state["text"])["status"] not in ("pending", "assigned", "running"):
                    print(json.dumps(state), flush=True)
                    return
            print(json.dumps({"is_error": True, "text": "still running"}), flush=True)
asyncio.run(main())
"#;

#[tokio::test]
async fn the_cli_and_the_mcp_server_resume_on_their_own_across_a_driver_restart() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let worker = WorkerSpec {
        capacity: 2,
        ..WorkerSpec::in_mode(Mode::Container)
    };
    let mut cluster = TestCluster::start(vec![worker]).await;
    let followed = cluster
        .submit(with_tools(WAIT_IN_WORKSPACE, &["Bash"]))
        .await
        .task_id;
    wait_until_blocked(&cluster, std::slice::from_ref(&followed)).await;
    let cli = tokio::process::Command::new(claudecluster_bin())
        .args(["tasks", "events", &followed])
        .env("CLAUDECLUSTER_DRIVER", &cluster.driver.address)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut mcp = tokio::process::Command::new(venv_tool("python"))
        .args([
            "-c",
            MCP_WAITER,
            claudecluster_bin().to_str().unwrap(),
            &cluster.driver.address,
            WAIT_IN_WORKSPACE,
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut mcp_lines = BufReader::new(mcp.stdout.take().unwrap()).lines();
    let spawned: serde_json::Value =
        serde_json::from_str(&mcp_lines.next_line().await.unwrap().expect("the task id")).unwrap();
    let spawned = spawned["taskId"].as_str().unwrap().to_owned();
    wait_until_blocked(&cluster, std::slice::from_ref(&spawned)).await;

    cluster.driver.kill().await;
    cluster.driver.restart().await;
    for task_id in [&followed, &spawned] {
        let workspace = cluster.task(task_id).await.workspace;
        std::fs::write(std::path::Path::new(&workspace).join("go"), "").unwrap();
    }

    let waited = tokio::time::timeout(Duration::from_secs(120), mcp_lines.next_line())
        .await
        .expect("the MCP client finished")
        .unwrap()
        .expect("the final state");
    let waited: serde_json::Value = serde_json::from_str(&waited).unwrap();
    assert_eq!(waited["is_error"], false, "{waited}");
    let state: serde_json::Value = serde_json::from_str(waited["text"].as_str().unwrap()).unwrap();
    assert_eq!(state["status"], "completed", "{state}");

    let output = tokio::time::timeout(Duration::from_secs(120), cli.wait_with_output())
        .await
        .expect("the CLI finished")
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("stream interrupted") && stderr.contains("resuming after event"),
        "the CLI said it resumed: {stderr}"
    );
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("released"),
        "the CLI printed the agent's text after the restart"
    );
}

/// A waiting task's reason is not stored on its own: a driver killed and started again shows it
/// again, as the scheduler tells it when the task is enqueued anew.
#[tokio::test]
async fn a_waiting_tasks_reason_comes_back_after_the_driver_is_killed() {
    let mut cluster = TestCluster::start(vec![WorkerSpec::default()]).await;
    let spec = TaskSpec {
        execution_mode: ExecutionMode::ContainerAgentic as i32,
        ..prompt("in a container")
    };
    let task = cluster.submit(spec).await;
    let reason = "waiting for a container_agentic worker: none is registered";
    assert_eq!(cluster.task(&task.task_id).await.status_reason, reason);

    cluster.driver.kill().await;
    cluster.driver.restart().await;
    let shown = wait_until(Duration::from_secs(30), || async {
        cluster.task(&task.task_id).await.status_reason == reason
    })
    .await;
    let after = cluster.task(&task.task_id).await;
    assert!(
        shown.is_ok(),
        "{:?}: {}",
        after.status(),
        after.status_reason
    );
    assert_eq!(after.status(), TaskStatus::Pending);
}
