//! Figures for the cluster's costs, each against a baseline measured in the same run:
//!
//! - overhead per task: a one-turn task through driver, scheduler and a process-pool worker,
//!   against the same `claude -p` command run directly (real CLI, stand-in API), as a ratio
//!   of medians;
//! - events per second the driver streams to a client, from a fast scripted agent;
//! - scheduler placement time, and submit-to-start latency on an idle cluster;
//! - the largest prompt, batch and output line that work, against small ones (`limits`).
//!
//! Run with `scripts/bench.sh` (release build). Prints a Markdown table.

use std::collections::HashMap;
use std::time::Instant;

use claudecluster_integration_tests::*;
use claudecluster_proto::v1::event::Kind;
use claudecluster_proto::v1::*;

const RUNS: usize = 15;

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    let index = ((values.len() as f64 - 1.0) * p).round() as usize;
    values[index]
}

/// Wall time of `claude -p PROMPT` run directly, as the worker would run it.
async fn direct_run(
    api: &StandinApi,
    workspace: &std::path::Path,
    config_dir: &std::path::Path,
) -> f64 {
    let started = Instant::now();
    let output = tokio::process::Command::new(claude_bin())
        .args([
            "-p",
            "--output-format",
            "stream-json",
            "--verbose",
            "--",
            "hello bench",
        ])
        .current_dir(workspace)
        .env("ANTHROPIC_BASE_URL", api.base_url())
        .env("ANTHROPIC_API_KEY", "sk-ant-standin-secret")
        .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
        .env("DISABLE_AUTOUPDATER", "1")
        .env("DISABLE_TELEMETRY", "1")
        .env("CLAUDE_CONFIG_DIR", config_dir)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("run claude");
    let elapsed = started.elapsed().as_secs_f64();
    assert!(
        String::from_utf8_lossy(&output.stdout).contains(r#""subtype":"success""#),
        "direct run failed"
    );
    elapsed
}

/// Wall time from submit until the client has seen the task's terminal event.
async fn cluster_run(cluster: &TestCluster, spec: TaskSpec) -> (f64, Vec<Event>) {
    let started = Instant::now();
    let task = cluster.submit(spec).await;
    let events = collect_events(&mut cluster.driver().await, &task.task_id, 0).await;
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(
        statuses(&events).last(),
        Some(&TaskStatus::Completed),
        "cluster run failed"
    );
    (elapsed, events)
}

async fn overhead() -> (f64, f64, f64) {
    let cluster = TestCluster::start(vec![WorkerSpec {
        capacity: 1,
        ..WorkerSpec::default()
    }])
    .await;
    let scratch = tempfile::tempdir().unwrap();
    let config_dir = scratch.path().join("claude-config");
    std::fs::create_dir_all(&config_dir).unwrap();
    // Warm both paths once (page cache, first-run files).
    direct_run(&cluster.api, scratch.path(), &config_dir).await;
    cluster_run(&cluster, prompt("hello bench")).await;
    let (mut direct, mut through_cluster) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        // Interleaved, so that drift of the machine affects both alike.
        direct.push(direct_run(&cluster.api, scratch.path(), &config_dir).await);
        through_cluster.push(cluster_run(&cluster, prompt("hello bench")).await.0);
    }
    let direct = median(&mut direct);
    let through_cluster = median(&mut through_cluster);
    (direct, through_cluster, through_cluster / direct)
}

/// Events per second from a fast scripted agent to a client following live, with the driver's
/// store in `data_dir` (its own test directory when `None`).
async fn streaming_throughput(data_dir: Option<&std::path::Path>) -> (usize, f64) {
    let worker = WorkerSpec {
        capacity: 1,
        claude_path: Some(test_bin("scripted-agent")),
        ..WorkerSpec::default()
    };
    let driver_yaml = data_dir
        .map(|dir| format!("dataDir: {}\n", dir.display()))
        .unwrap_or_default();
    let cluster = TestCluster::start_with_driver(&driver_yaml, vec![worker]).await;
    let count = 50_000;
    let task = cluster.submit(prompt(&format!("EVENTS {count}"))).await;
    // Follow live from the start: the rate is that of the whole path, agent to client.
    let mut driver = cluster.driver().await;
    let mut stream = driver
        .stream_task_events(StreamTaskEventsRequest {
            task_id: task.task_id.clone(),
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut first_text = None;
    let mut texts = 0;
    while let Some(response) = stream.message().await.unwrap() {
        if matches!(response.event.and_then(|e| e.kind), Some(Kind::Text(_))) {
            first_text.get_or_insert_with(Instant::now);
            texts += 1;
        }
    }
    let elapsed = first_text.expect("text events").elapsed().as_secs_f64();
    assert_eq!(texts, count);
    // Replaying a finished log is the driver alone.
    let started = Instant::now();
    let replayed = collect_events(&mut driver, &task.task_id, 0).await.len();
    let replay_rate = replayed as f64 / started.elapsed().as_secs_f64();
    println!("| driver replay of a finished log | {replayed} events | {replay_rate:.0} events/s |");
    (texts, texts as f64 / elapsed)
}

async fn placement() -> (f64, f64, f64) {
    let worker = WorkerSpec {
        capacity: 4,
        claude_path: Some(test_bin("scripted-agent")),
        ..WorkerSpec::default()
    };
    let cluster = TestCluster::start(vec![worker.clone(), worker]).await;
    let mut latencies = Vec::new();
    for _ in 0..200 {
        let (_, events) = cluster_run(&cluster, prompt("hello")).await;
        let time = |status| status_time(&events, status).unwrap();
        latencies.push((time(TaskStatus::Running) - time(TaskStatus::Pending)) * 1000.0);
    }
    let mut scheduler = cluster.scheduler_client();
    let stats = scheduler
        .get_queue_stats(GetQueueStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    let decision_us = stats.placement_nanos_total as f64 / stats.placements.max(1) as f64 / 1000.0;
    let p50 = percentile(&mut latencies, 0.5);
    let p99 = percentile(&mut latencies, 0.99);
    (decision_us, p50, p99)
}

/// Wall time of `docker run` of the agent image with the same command the worker runs.
async fn bare_docker_run(api: &StandinApi) -> f64 {
    let started = Instant::now();
    let output = tokio::process::Command::new("docker")
        .args(["run", "--rm", "--network", "host", "--user", "1000:1000"])
        .args(["-e", &format!("ANTHROPIC_BASE_URL={}", api.base_url())])
        .args(["-e", "ANTHROPIC_API_KEY=sk-ant-standin-secret"])
        .args([
            "-e",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1",
            "-e",
            "DISABLE_AUTOUPDATER=1",
        ])
        .arg(claudecluster_integration_tests::docker::agent_image())
        .args([
            "claude",
            "-p",
            "--output-format",
            "stream-json",
            "--verbose",
            "--",
            "hello bench",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("run docker");
    let elapsed = started.elapsed().as_secs_f64();
    assert!(
        String::from_utf8_lossy(&output.stdout).contains(r#""subtype":"success""#),
        "bare docker run failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    elapsed
}

fn running_reason(events: &[Event]) -> String {
    events
        .iter()
        .find_map(|e| match &e.kind {
            Some(Kind::StatusChange(c)) if c.status() == TaskStatus::Running => {
                Some(c.reason.clone())
            }
            _ => None,
        })
        .unwrap_or_default()
}

/// The hand-out time a warm task's RUNNING event reports, in ms.
fn hand_out_ms(events: &[Event]) -> Option<f64> {
    let reason = running_reason(events);
    let rest = reason.strip_prefix("warm agent handed out in ")?;
    rest.split(' ').next()?.parse().ok()
}

async fn container_mode() {
    let cold_worker = WorkerSpec {
        mode: Mode::Container,
        capacity: 1,
        ..WorkerSpec::default()
    };
    let cluster = TestCluster::start(vec![cold_worker]).await;
    bare_docker_run(&cluster.api).await;
    cluster_run(&cluster, prompt("hello bench")).await;
    let (mut bare, mut cold, mut starts) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..RUNS {
        bare.push(bare_docker_run(&cluster.api).await);
        let (elapsed, events) = cluster_run(&cluster, prompt("hello bench")).await;
        cold.push(elapsed);
        let start = status_time(&events, TaskStatus::Running).unwrap()
            - status_time(&events, TaskStatus::Assigned).unwrap();
        starts.push(start * 1000.0);
    }
    drop(cluster);
    let warm_worker = WorkerSpec {
        mode: Mode::Container,
        capacity: 1,
        warm_pool_size: 1,
        ..WorkerSpec::default()
    };
    let cluster = TestCluster::start(vec![warm_worker]).await;
    let (mut warm, mut hand_outs) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        wait_for_warm_agent(&cluster).await;
        let (elapsed, events) = cluster_run(&cluster, prompt("hello bench")).await;
        warm.push(elapsed);
        hand_outs.push(hand_out_ms(&events).expect("a warm agent took the task"));
    }
    let bare = median(&mut bare);
    let cold = median(&mut cold);
    let warm = median(&mut warm);
    println!(
        "| container task, cold (median of {RUNS}) | bare `docker run`: {:.0} ms | {:.0} ms, ratio {:.3} |",
        bare * 1000.0,
        cold * 1000.0,
        cold / bare
    );
    println!(
        "| container task from the warm pool (median of {RUNS}) | bare `docker run`: {:.0} ms | {:.0} ms, ratio {:.3} |",
        bare * 1000.0,
        warm * 1000.0,
        warm / bare
    );
    println!(
        "| cold container start: ASSIGNED to RUNNING (median) | | {:.0} ms |",
        median(&mut starts)
    );
    println!(
        "| warm-pool hand-out (median, max of {RUNS}) | | {:.3} ms, max {:.3} ms |",
        median(&mut hand_outs),
        hand_outs.iter().cloned().fold(0.0, f64::max)
    );
}

/// Seconds since the epoch, as event times are given.
fn now_epoch() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn event_epoch(event: &Event) -> Option<f64> {
    event
        .time
        .map(|time| time.seconds as f64 + f64::from(time.nanos) / 1e9)
}

/// Where a warm run's time goes, in ms: submit to RUNNING, RUNNING to the result event,
/// result to the terminal event, terminal event to the client.
async fn warm_phases(cluster: &TestCluster, runs: usize) -> Vec<[f64; 5]> {
    let mut phases = Vec::new();
    for _ in 0..runs {
        wait_for_warm_agent(cluster).await;
        let submitted = now_epoch();
        let (elapsed, events) = cluster_run(cluster, prompt("hello bench")).await;
        let received = submitted + elapsed;
        let running = status_time(&events, TaskStatus::Running).unwrap();
        let result = events
            .iter()
            .find(|e| matches!(e.kind, Some(Kind::Result(_))))
            .and_then(event_epoch)
            .unwrap();
        let end = events.last().and_then(event_epoch).unwrap();
        phases.push([
            (running - submitted) * 1000.0,
            (result - running) * 1000.0,
            (end - result) * 1000.0,
            (received - end) * 1000.0,
            elapsed * 1000.0,
        ]);
    }
    phases
}

async fn profile() {
    for mode in [Mode::ProcessPool, Mode::Container] {
        let cluster = TestCluster::start(vec![WorkerSpec {
            mode,
            capacity: 1,
            warm_pool_size: 1,
            ..WorkerSpec::default()
        }])
        .await;
        let phases = warm_phases(&cluster, 10).await;
        for (i, name) in [
            "submit→running",
            "running→result",
            "result→end",
            "end→client",
            "total",
        ]
        .iter()
        .enumerate()
        {
            let mut values: Vec<f64> = phases.iter().map(|p| p[i]).collect();
            println!(
                "{mode:?} {name}: median {:.1} ms, max {:.1}",
                median(&mut values),
                values.iter().cloned().fold(0.0, f64::max)
            );
        }
    }
}

async fn wait_for_warm_agent(cluster: &TestCluster) {
    let driver = cluster.driver().await;
    wait_until(std::time::Duration::from_secs(60), || {
        let mut driver = driver.clone();
        async move {
            driver
                .get_cluster_status(GetClusterStatusRequest {})
                .await
                .unwrap()
                .into_inner()
                .workers
                .iter()
                .any(|w| w.idle_warm_agents > 0)
        }
    })
    .await
    .expect("a warm agent is ready");
}

/// Resident memory of a process, from /proc, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

async fn worker_memory() {
    let mut single = Vec::new();
    let mut dual = Vec::new();
    for _ in 0..5 {
        let cluster = TestCluster::start(vec![WorkerSpec::default()]).await;
        single.push(rss_kib(cluster.workers[0].pid()) as f64);
        drop(cluster);
        let both = WorkerSpec {
            mode: Mode::Container,
            extra_yaml: "featureFlags:\n  enableContainerMode: true\n  allowModeOverride: true\n"
                .to_owned(),
            ..WorkerSpec::default()
        };
        let cluster = TestCluster::start(vec![both]).await;
        let status = cluster
            .driver()
            .await
            .get_cluster_status(GetClusterStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            status.workers[0].execution_modes.len(),
            2,
            "both providers configured"
        );
        dual.push(rss_kib(cluster.workers[0].pid()) as f64);
    }
    let single = median(&mut single);
    let dual = median(&mut dual);
    println!(
        "| idle worker memory (RSS), both providers | one provider: {single:.0} KiB | {dual:.0} KiB, ratio {:.3} |",
        dual / single
    );
}

async fn send_message(cluster: &TestCluster, session_id: &str, text: &str) -> f64 {
    let started = Instant::now();
    let request = SendSessionMessageRequest {
        session_id: session_id.to_owned(),
        text: text.to_owned(),
    };
    let mut stream = cluster
        .driver()
        .await
        .send_session_message(request)
        .await
        .unwrap()
        .into_inner();
    let mut answered = false;
    while let Some(response) = stream.message().await.unwrap() {
        if let Some(Kind::Result(result)) = response.event.and_then(|e| e.kind) {
            answered = !result.is_error;
        }
    }
    assert!(answered, "the session answered");
    started.elapsed().as_secs_f64()
}

async fn create_session(cluster: &TestCluster) -> String {
    cluster
        .driver()
        .await
        .create_session(CreateSessionRequest {
            spec: Some(SessionSpec::default()),
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap()
        .session_id
}

/// Memory a container uses now, from `docker stats`, in MiB.
async fn container_memory_mib(id: &str) -> f64 {
    let text = claudecluster_integration_tests::docker::docker(&[
        "stats",
        "--no-stream",
        "--format",
        "{{.MemUsage}}",
        id,
    ])
    .await;
    let used = text.split('/').next().unwrap().trim();
    let (number, unit) = used.split_at(used.find(|c: char| c.is_alphabetic()).unwrap());
    let number: f64 = number.parse().unwrap();
    match unit {
        "GiB" => number * 1024.0,
        "MiB" => number,
        "KiB" => number / 1024.0,
        _ => number / (1024.0 * 1024.0),
    }
}

async fn sessions() {
    let worker = WorkerSpec {
        mode: Mode::Container,
        capacity: 12,
        ..WorkerSpec::default()
    };
    let cluster = TestCluster::start(vec![worker]).await;
    let session = create_session(&cluster).await;
    send_message(&cluster, &session, "hello bench").await;
    cluster_run(&cluster, prompt("hello bench")).await;
    let (mut in_session, mut one_shot) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        in_session.push(send_message(&cluster, &session, "hello bench").await);
        one_shot.push(cluster_run(&cluster, prompt("hello bench")).await.0);
    }
    let in_session = median(&mut in_session);
    let one_shot = median(&mut one_shot);
    println!(
        "| message in a warm session (median of {RUNS}) | fresh one-shot container task: {:.0} ms | {:.0} ms, ratio {:.3} |",
        one_shot * 1000.0,
        in_session * 1000.0,
        in_session / one_shot
    );
    // Ten more idle sessions with their agents running: what one costs.
    let worker_before = rss_kib(cluster.workers[0].pid());
    let mut ids = vec![session];
    for _ in 0..10 {
        let id = create_session(&cluster).await;
        send_message(&cluster, &id, "hello bench").await;
        ids.push(id);
    }
    let mut memory = Vec::new();
    for id in &ids {
        let containers = claudecluster_integration_tests::docker::containers_with_label(&format!(
            "claudecluster.task=session-{id}"
        ))
        .await;
        memory.push(container_memory_mib(&containers[0]).await);
    }
    let worker_growth =
        (rss_kib(cluster.workers[0].pid()) as f64 - worker_before as f64) / 1024.0 / 10.0;
    let per_session = median(&mut memory);
    let total_mib = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<f64>().ok())
        .unwrap()
        / 1024.0;
    println!(
        "| idle session with its agent running (median of {}) | | {per_session:.0} MiB in its container, {worker_growth:.2} MiB in the worker; about {:.0} fit in this machine's {:.0} GiB |",
        ids.len(),
        total_mib / (per_session + worker_growth),
        total_mib / 1024.0
    );
}

async fn mode_switch() {
    let worker = WorkerSpec {
        extra_yaml: "container:\n  network: host\n".to_owned(),
        ..WorkerSpec::default()
    };
    let cluster = TestCluster::start(vec![worker]).await;
    let mut client = cluster.worker_client(0);
    let mut switches = Vec::new();
    for round in 0..10 {
        let mode = if round % 2 == 0 {
            ExecutionMode::ContainerAgentic
        } else {
            ExecutionMode::ProcessPool
        };
        let answer = client
            .switch_execution_mode(SwitchExecutionModeRequest {
                execution_mode: mode as i32,
            })
            .await
            .unwrap()
            .into_inner();
        switches.push(answer.switch_millis as f64);
    }
    let max = switches.iter().cloned().fold(0.0, f64::max);
    println!(
        "| execution mode switch, drain excluded (median of 10, both ways) | | {:.0} ms, max {max:.0} ms |",
        median(&mut switches)
    );
}

fn placement_at_scale() {
    use claudecluster_scheduler::benchmark::{PlacementRound, placement_round};
    let rate = |round: &PlacementRound| round.placed as f64 / round.elapsed.as_secs_f64();
    // 100,000 queued tasks, and room for all of them however many workers share it.
    let at = |workers: usize| placement_round(workers, (150_000 / workers) as u32, 100_000);
    let baseline = at(10);
    for workers in [100, 1_000, 10_000] {
        let round = at(workers);
        println!(
            "| placement decisions, {workers} workers and 100,000 queued tasks | 10 workers: {:.0}/s | {:.0}/s ({} placed in {:.2} s), ratio {:.2} |",
            rate(&baseline),
            rate(&round),
            round.placed,
            round.elapsed.as_secs_f64(),
            rate(&round) / rate(&baseline)
        );
    }
}

async fn mcp() {
    let cluster = TestCluster::start(vec![WorkerSpec {
        mode: Mode::Container,
        capacity: 2,
        ..WorkerSpec::default()
    }])
    .await;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let stubs = tempfile::tempdir().unwrap();
    let python = venv_tool("python");
    let generated = tokio::process::Command::new(&python)
        .args(["-m", "grpc_tools.protoc"])
        .arg(format!("-I{}", root.join("proto").display()))
        .arg(format!("--python_out={}", stubs.path().display()))
        .arg(format!("--grpc_python_out={}", stubs.path().display()))
        .args([
            "claudecluster/v1/types.proto",
            "claudecluster/v1/driver.proto",
        ])
        .status()
        .await
        .unwrap();
    assert!(generated.success());
    let output = tokio::process::Command::new(&python)
        .arg(root.join("integration-tests/python/mcp_bench.py"))
        .arg(claudecluster_bin())
        .arg(&cluster.driver.address)
        .arg(stubs.path())
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let figures: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let (mcp_ms, direct_ms) = (
        figures["mcp_call_ms"].as_f64().unwrap(),
        figures["direct_call_ms"].as_f64().unwrap(),
    );
    println!(
        "| spawn_claude_container until the child container runs (median of 10) | | {:.0} ms |",
        figures["spawn_ms"].as_f64().unwrap()
    );
    println!(
        "| get_task_status through MCP (median of 200) | GetTask on the driver: {direct_ms:.2} ms | {mcp_ms:.2} ms, {:.2} ms added |",
        mcp_ms - direct_ms
    );
}

/// Starts a driver on the store in `dir` (its data directory) and returns it with the time from
/// spawn to serving.
/// Wall time from submit until the client has seen the task's terminal event, and its status.
async fn run_to_end(cluster: &TestCluster, spec: TaskSpec) -> (f64, TaskStatus) {
    let started = Instant::now();
    let task = cluster.submit(spec).await;
    let events = collect_events(&mut cluster.driver().await, &task.task_id, 0).await;
    let status = *statuses(&events).last().expect("a terminal status");
    (started.elapsed().as_secs_f64(), status)
}

/// Median of `runs` runs of `spec`, whose tasks must end as `expected`.
async fn median_run(cluster: &TestCluster, spec: &TaskSpec, expected: TaskStatus) -> f64 {
    let mut times = Vec::new();
    for _ in 0..5 {
        let (time, status) = run_to_end(cluster, spec.clone()).await;
        assert_eq!(status, expected, "{:.60}", spec.prompt);
        times.push(time);
    }
    median(&mut times)
}

/// The largest prompt, batch and output line that work, each against a small one.
async fn limits() {
    let cluster = TestCluster::start(vec![WorkerSpec {
        capacity: 1,
        ..WorkerSpec::default()
    }])
    .await;
    run_to_end(&cluster, prompt("hello")).await;
    let small = median_run(&cluster, &prompt("hello"), TaskStatus::Completed).await;
    let largest = prompt(&"p".repeat(512 << 10));
    let large = median_run(&cluster, &largest, TaskStatus::Completed).await;
    println!(
        "| task with the largest prompt (512 KiB, `driver.maxPromptBytes`), median of 5 | 5-byte prompt: {:.0} ms | {:.0} ms, ratio {:.2} |",
        small * 1000.0,
        large * 1000.0,
        large / small
    );
    let whole = median_run(&cluster, &prompt("LARGE 1000000"), TaskStatus::Completed).await;
    let cut = median_run(&cluster, &prompt("LARGE 5000000"), TaskStatus::Failed).await;
    println!(
        "| agent printing a 1 MB line (kept whole) / a 5 MB line (cut at 1 MiB, task fails saying so), median of 5 | 5-byte reply: {:.0} ms | {:.0} ms / {:.0} ms |",
        small * 1000.0,
        whole * 1000.0,
        cut * 1000.0
    );

    let mut driver = cluster.driver().await;
    let parked = || HashMap::from([("parked".to_owned(), "true".to_owned())]);
    let batch = |chained: bool| -> Vec<BatchTask> {
        (0..1000)
            .map(|index| BatchTask {
                key: format!("t{index}"),
                spec: Some(TaskSpec {
                    worker_selector: parked(),
                    depends_on: if chained && index > 0 {
                        vec![format!("t{}", index - 1)]
                    } else {
                        Vec::new()
                    },
                    ..prompt("a step of the batch")
                }),
            })
            .collect()
    };
    let mut timed_submit = async |tasks: Vec<BatchTask>| {
        let started = Instant::now();
        let accepted = driver
            .submit_tasks(SubmitTasksRequest { tasks })
            .await
            .expect("the batch is accepted")
            .into_inner()
            .tasks;
        (started.elapsed().as_secs_f64(), accepted)
    };
    let (independent, _) = timed_submit(batch(false)).await;
    let (chain, accepted) = timed_submit(batch(true)).await;
    println!(
        "| the largest batch (1000 tasks, `driver.maxBatchSize`), each depending on the one before | 1000 independent tasks: {:.0} ms | {:.0} ms, ratio {:.2} |",
        independent * 1000.0,
        chain * 1000.0,
        chain / independent
    );
    let started = Instant::now();
    cluster
        .driver()
        .await
        .cancel_task(CancelTaskRequest {
            task_id: accepted[0].task_id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap();
    let (last, _) = cluster.finish(&accepted[999].task_id).await;
    assert_eq!(last.status(), TaskStatus::Cancelled);
    println!(
        "| cancelling the root of that chain, until its last task is CANCELLED | | {:.0} ms |",
        started.elapsed().as_secs_f64() * 1000.0
    );
}

/// GetTask and a one-turn task with TLS (mutual between the services) and API keys on,
/// against the same cluster with both off, interleaved in one run.
async fn security() {
    use sha2::Digest;
    const KEY: &str = "cck_bench_0123456789abcdef0123456789abcdef";
    let plain = TestCluster::start(vec![WorkerSpec {
        capacity: 1,
        ..WorkerSpec::default()
    }])
    .await;
    let certs = tempfile::tempdir().unwrap();
    claudecluster_grpc::tls::make_certificates(certs.path(), &[]).unwrap();
    let keys = format!(
        "auth:\n  apiKeys:\n    - {{id: bench, sha256: {}, scopes: [admin]}}\n",
        hex::encode(sha2::Sha256::digest(KEY.as_bytes()))
    );
    let secured = TestCluster::start_with_tls(
        &keys,
        &[("CLAUDECLUSTER_API_KEY", KEY)],
        Some(certs.path()),
        vec![WorkerSpec {
            capacity: 1,
            ..WorkerSpec::default()
        }],
    )
    .await;
    let plain_task = cluster_run(&plain, prompt("hello bench")).await;
    let secured_task = cluster_run(&secured, prompt("hello bench")).await;
    let _ = (plain_task, secured_task);
    let (mut plain_get, mut secured_get) = (Vec::new(), Vec::new());
    let task_ids = [
        plain.submit(prompt("hello")).await.task_id,
        secured.submit(prompt("hello")).await.task_id,
    ];
    let mut plain_driver = plain.driver().await;
    let mut secured_driver = secured.driver().await;
    for _ in 0..1000 {
        let started = Instant::now();
        plain_driver
            .get_task(GetTaskRequest {
                task_id: task_ids[0].clone(),
            })
            .await
            .unwrap();
        plain_get.push(started.elapsed().as_secs_f64() * 1000.0);
        let started = Instant::now();
        secured_driver
            .get_task(GetTaskRequest {
                task_id: task_ids[1].clone(),
            })
            .await
            .unwrap();
        secured_get.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let (plain_p50, secured_p50) = (median(&mut plain_get), median(&mut secured_get));
    let (plain_p99, secured_p99) = (
        percentile(&mut plain_get, 0.99),
        percentile(&mut secured_get, 0.99),
    );
    println!(
        "| GetTask, TLS and API keys on (1000 calls, one connection) | off: p50 {plain_p50:.3} ms, p99 {plain_p99:.3} ms | p50 {secured_p50:.3} ms, p99 {secured_p99:.3} ms, ratio of p50 {:.2} |",
        secured_p50 / plain_p50
    );
    let (mut plain_runs, mut secured_runs) = (Vec::new(), Vec::new());
    for _ in 0..9 {
        plain_runs.push(cluster_run(&plain, prompt("hello bench")).await.0);
        secured_runs.push(cluster_run(&secured, prompt("hello bench")).await.0);
    }
    let (plain_run, secured_run) = (median(&mut plain_runs), median(&mut secured_runs));
    println!(
        "| one-turn task, TLS and API keys on (median of 9, interleaved) | off: {:.0} ms | {:.0} ms, ratio {:.3} |",
        plain_run * 1000.0,
        secured_run * 1000.0,
        secured_run / plain_run
    );
}

/// Tasks with the credential proxy against the CLI talking to the stand-in directly
/// (`credentialProxy.enabled: false`), interleaved in one run.
async fn proxy() {
    let worker = |yaml: &str| WorkerSpec {
        capacity: 1,
        extra_yaml: yaml.to_owned(),
        ..WorkerSpec::default()
    };
    let direct = TestCluster::start(vec![worker("credentialProxy:\n  enabled: false\n")]).await;
    let proxied = TestCluster::start(vec![worker("")]).await;
    cluster_run(&direct, prompt("hello bench")).await;
    cluster_run(&proxied, prompt("hello bench")).await;
    let (mut direct_runs, mut proxied_runs) = (Vec::new(), Vec::new());
    for _ in 0..9 {
        direct_runs.push(cluster_run(&direct, prompt("hello bench")).await.0);
        proxied_runs.push(cluster_run(&proxied, prompt("hello bench")).await.0);
    }
    let (direct_run, proxied_run) = (median(&mut direct_runs), median(&mut proxied_runs));
    println!(
        "| one-turn task through the credential proxy (median of 9, interleaved) | CLI to the stand-in directly: {:.0} ms | {:.0} ms, ratio {:.3} |",
        direct_run * 1000.0,
        proxied_run * 1000.0,
        proxied_run / direct_run
    );
    // One answer streamed as 20,000 text deltas (a token each), as fast as the stand-in sends.
    const DELTAS: f64 = 20_000.0;
    let (mut direct_rates, mut proxied_rates) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let (time, _) = cluster_run(&direct, prompt("SLOW 20000 0")).await;
        direct_rates.push(DELTAS / time);
        let (time, _) = cluster_run(&proxied, prompt("SLOW 20000 0")).await;
        proxied_rates.push(DELTAS / time);
    }
    let (direct_rate, proxied_rate) = (median(&mut direct_rates), median(&mut proxied_rates));
    println!(
        "| streamed tokens through the proxy, one answer of 20,000 deltas (median of 3) | directly: {direct_rate:.0} tokens/s | {proxied_rate:.0} tokens/s, ratio {:.3} |",
        proxied_rate / direct_rate
    );
}

async fn timed_driver(dir: &std::path::Path) -> (ServiceProcess, f64) {
    let config = dir.join("driver.yaml");
    if !config.exists() {
        std::fs::write(
            &config,
            "listen: 127.0.0.1:0\nschedulerAddress: 127.0.0.1:9\n",
        )
        .unwrap();
    }
    let started = Instant::now();
    let driver = ServiceProcess::start("driver", &config, &[]).await;
    (driver, started.elapsed().as_secs_f64())
}

/// Pages through every task with `ListTasks`; how many there are.
async fn list_every_task(
    client: &mut claudecluster_proto::v1::driver_service_client::DriverServiceClient<
        tonic::transport::Channel,
    >,
) -> usize {
    let mut token = String::new();
    let mut listed = 0;
    loop {
        let page = client
            .list_tasks(ListTasksRequest {
                page_size: 1000,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        listed += page.tasks.len();
        if page.next_page_token.is_empty() {
            return listed;
        }
        token = page.next_page_token;
    }
}

/// The driver's store: recovery after `kill -9` at scale, and memory with many finished tasks.
async fn store() {
    let empty = tempfile::tempdir().unwrap();
    let (mut baseline, _) = timed_driver(empty.path()).await;
    baseline.kill().await;
    let (mut baseline, empty_start) = timed_driver(empty.path()).await;
    let empty_rss = rss_kib(baseline.pid());
    baseline.kill().await;

    let big = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}",
        big.path().join("data/claudecluster/driver.db").display()
    );
    let filling = Instant::now();
    let events = claudecluster_driver::benchmark::fill_store(&url, 10_000, 100, 10, "127.0.0.1:9")
        .await
        .unwrap();
    let fill_s = filling.elapsed().as_secs_f64();
    let (mut driver, _) = timed_driver(big.path()).await;
    driver.kill().await;
    let (mut driver, recovery) = timed_driver(big.path()).await;
    driver.kill().await;
    println!(
        "| driver start after `kill -9`, 10,000 tasks (1,000 unfinished) and {events} events stored | empty store: {:.0} ms | {:.0} ms (store written in {fill_s:.1} s) |",
        empty_start * 1000.0,
        recovery * 1000.0
    );

    let many = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}",
        many.path().join("data/claudecluster/driver.db").display()
    );
    claudecluster_driver::benchmark::fill_store(&url, 100_000, 4, 0, "")
        .await
        .unwrap();
    let (driver, _) = timed_driver(many.path()).await;
    let at_start = rss_kib(driver.pid());
    // Reading every task once (a client paging through them all) must not keep them in memory.
    let mut client = claudecluster_proto::v1::driver_service_client::DriverServiceClient::new(
        claudecluster_grpc::channel(&driver.address).unwrap(),
    );
    let listed = list_every_task(&mut client).await;
    let after_listing = rss_kib(driver.pid());
    // A second pass: what the first one added is caches that stay their size, not tasks.
    list_every_task(&mut client).await;
    let after_second = rss_kib(driver.pid());
    println!(
        "| driver memory with 100,000 finished tasks stored | empty store: {:.1} MiB | {:.1} MiB at start, {:.1} MiB after listing all {listed}, {:.1} MiB after listing them again |",
        empty_rss as f64 / 1024.0,
        at_start as f64 / 1024.0,
        after_listing as f64 / 1024.0,
        after_second as f64 / 1024.0
    );
}

/// One k6 run of `k6/submit_get.js` at `rate` iterations (SubmitTask + GetTask) per second
/// against `driver`: p99 of a request in ms, and the iterations k6 could not start in time.
async fn k6_run(driver: &str, rate: u32) -> (f64, f64) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let summary = tempfile::NamedTempFile::new().unwrap();
    let output = tokio::process::Command::new(venv_tool("k6"))
        .arg("run")
        .arg("--no-usage-report")
        .arg("--quiet")
        .arg("--summary-export")
        .arg(summary.path())
        .arg(root.join("k6/submit_get.js"))
        .env("DRIVER", driver)
        .env("RATE", rate.to_string())
        .env("DURATION", "5s")
        .env("PROTO_DIR", root.join("../proto"))
        .output()
        .await
        .expect("k6 is installed (scripts/setup.sh)");
    assert!(
        output.status.success(),
        "k6 failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(summary.path()).unwrap()).unwrap();
    let p99 = report["metrics"]["grpc_req_duration"]["p(99)"]
        .as_f64()
        .unwrap_or(f64::INFINITY);
    let dropped = report["metrics"]["dropped_iterations"]["count"]
        .as_f64()
        .unwrap_or(0.0);
    (p99, dropped)
}

/// Requests per second the driver answers with p99 under 10 ms, SubmitTask + GetTask at rising
/// rates, with its store at `driver_yaml`. No worker runs the tasks (they wait in the
/// scheduler's queue): starting hundreds of agent processes a second on the same two cores
/// would measure the process spawns, not the driver.
async fn driver_throughput(name: &str, driver_yaml: &str) {
    let cluster = TestCluster::start_with_driver(driver_yaml, vec![]).await;
    let mut best = 0;
    let mut tried = Vec::new();
    for rate in [250, 500, 1000, 2000, 3000, 4000, 6000] {
        let (p99, dropped) = k6_run(&cluster.driver.address, rate).await;
        tried.push(format!("{} req/s: p99 {p99:.1} ms", rate * 2));
        if p99 < 10.0 && dropped == 0.0 {
            best = rate * 2;
        } else {
            break;
        }
    }
    println!(
        "| SubmitTask + GetTask at p99 under 10 ms, store on {name} (k6, 5 s a rate) | {} | {best} requests/s |",
        tried.join("; ")
    );
}

/// Failover of the driver: two drivers on one PostgreSQL, three tasks streaming to a client
/// given both addresses, `kill -9` of the leader; the time until the standby serves, and the
/// events the client did not get. The killed driver comes back as the next standby.
/// Seconds `command` takes in `sh`, which must succeed.
async fn shell_seconds(command: &str) -> f64 {
    let started = Instant::now();
    let status = tokio::process::Command::new("sh")
        .args(["-c", command])
        .status()
        .await
        .unwrap();
    assert!(status.success(), "{command}");
    started.elapsed().as_secs_f64()
}

/// Getting the work back: a 100 MB workspace downloaded through driver and worker against a
/// local `tar` of the same files, and the diff of a 10,000-file repository against `git`
/// run in the workspace itself.
async fn results() {
    const ROUNDS: usize = 5;
    let origin = tempfile::tempdir().unwrap();
    let setup = format!(
        "cd {} && git init -q -b main && for d in $(seq 0 99); do mkdir d$d; for f in $(seq 0 99); do printf 'line one of %s/%s\\nline two\\n' $d $f > d$d/f$f.txt; done; done && git add -A && git -c user.name=b -c user.email=b@b commit -qm start",
        origin.path().display()
    );
    shell_seconds(&setup).await;
    let cluster = TestCluster::start(vec![WorkerSpec {
        extra_yaml: "allowedRepoSchemes: [file]\n".into(),
        ..WorkerSpec::default()
    }])
    .await;
    let mut driver = cluster.driver().await;

    // 100 files of 1 MB each, random so that nothing compresses them on the way.
    let big = cluster
        .submit(with_tools(
            "BASH for i in $(seq 1 100); do head -c 1000000 /dev/urandom > f$i.bin; done && echo written",
            &["Bash"],
        ))
        .await;
    let (big, _) = cluster.finish(&big.task_id).await;
    assert_eq!(big.status(), TaskStatus::Completed, "{}", big.status_reason);
    let (mut through, mut local) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let started = Instant::now();
        let mut stream = driver
            .download_task_files(DownloadTaskFilesRequest {
                task_id: big.task_id.clone(),
                ..DownloadTaskFilesRequest::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut bytes = 0;
        while let Some(chunk) = stream.message().await.unwrap() {
            bytes += chunk.chunk.len();
        }
        through.push(started.elapsed().as_secs_f64());
        assert!(bytes > 100_000_000, "{bytes}");
        local.push(
            shell_seconds(&format!(
                "tar -cf - -C {} . | wc -c > /dev/null",
                big.workspace
            ))
            .await,
        );
    }
    let (through, local) = (median(&mut through), median(&mut local));
    println!(
        "| download of a 100 MB workspace (100 files) through driver and worker, median of {ROUNDS} | local `tar` of the same files: {:.0} ms | {:.0} ms ({:.0} MB/s), ratio {:.1} |",
        local * 1000.0,
        through * 1000.0,
        100.0 / through,
        through / local
    );

    // Ten files changed and one added in a repository of 10,000.
    let repo = cluster
        .submit(TaskSpec {
            repo_url: format!("file://{}", origin.path().display()),
            ..with_tools(
                "BASH for d in $(seq 0 9); do echo changed >> d$d/f0.txt; done && echo new > added.txt && echo ok",
                &["Bash"],
            )
        })
        .await;
    let (repo, _) = cluster.finish(&repo.task_id).await;
    assert_eq!(
        repo.status(),
        TaskStatus::Completed,
        "{}",
        repo.status_reason
    );
    assert_eq!(repo.changes.as_ref().unwrap().files_changed, 11);
    let (mut diffs, mut lists, mut plain) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let started = Instant::now();
        let diff = driver
            .get_task_diff(GetTaskDiffRequest {
                task_id: repo.task_id.clone(),
                ..GetTaskDiffRequest::default()
            })
            .await
            .unwrap()
            .into_inner();
        diffs.push(started.elapsed().as_secs_f64());
        assert_eq!(diff.summary.unwrap().files_changed, 11);
        let started = Instant::now();
        let mut page_token = String::new();
        loop {
            let page = driver
                .list_task_files(ListTaskFilesRequest {
                    task_id: repo.task_id.clone(),
                    page_size: 10_000,
                    page_token,
                    ..ListTaskFilesRequest::default()
                })
                .await
                .unwrap()
                .into_inner();
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        lists.push(started.elapsed().as_secs_f64());
        plain.push(
            shell_seconds(&format!(
                "cd {} && git status --porcelain > /dev/null && git diff HEAD > /dev/null",
                repo.workspace
            ))
            .await,
        );
    }
    let plain = median(&mut plain);
    let diff = median(&mut diffs);
    let list = median(&mut lists);
    println!(
        "| `GetTaskDiff` of 11 changed files in a 10,000-file repository, median of {ROUNDS} | `git status` + `git diff HEAD` in the workspace: {:.0} ms | {:.0} ms, ratio {:.1} |",
        plain * 1000.0,
        diff * 1000.0,
        diff / plain
    );
    println!(
        "| `ListTaskFiles` of the same 10,001 files, median of {ROUNDS} | the same git commands: {:.0} ms | {:.0} ms, ratio {:.1} |",
        plain * 1000.0,
        list * 1000.0,
        list / plain
    );
}

async fn failover() {
    const ROUNDS: usize = 5;
    let postgres = claudecluster_integration_tests::postgres::TestPostgres::start();
    let mut cluster = TestCluster::start_with_driver(
        &format!("store:\n  url: {}\n", postgres.url()),
        vec![WorkerSpec {
            capacity: 3,
            ..WorkerSpec::default()
        }],
    )
    .await;
    let mut standby = cluster.start_another_driver().await;
    let (mut times, mut events, mut lost) = (Vec::new(), 0, 0);
    for round in 0..ROUNDS {
        let both = driver_at(&format!("{},{}", cluster.driver.address, standby.address));
        let mut followers = Vec::new();
        for index in 0..3 {
            let task = both
                .clone()
                .submit_task(SubmitTaskRequest {
                    spec: Some(prompt(&format!("SLOW 20 100 round {round} task {index}"))),
                })
                .await
                .unwrap()
                .into_inner()
                .task
                .unwrap();
            cluster.wait_for_agent(&task.task_id).await;
            followers.push((
                task.task_id.clone(),
                tokio::spawn(follow_resuming(both.clone(), task.task_id)),
            ));
        }
        cluster.driver.kill().await;
        let killed = Instant::now();
        let address = standby.address.clone();
        wait_until(std::time::Duration::from_secs(30), || {
            let mut driver = driver_at(&address);
            async move {
                driver
                    .get_cluster_status(GetClusterStatusRequest {})
                    .await
                    .is_ok()
            }
        })
        .await
        .expect("the standby took over");
        times.push(killed.elapsed().as_secs_f64() * 1000.0);
        for (task_id, follower) in followers {
            let seen = follower.await.unwrap();
            let task = driver_at(&address)
                .get_task(GetTaskRequest { task_id })
                .await
                .unwrap()
                .into_inner()
                .task
                .unwrap();
            assert_eq!(task.status(), TaskStatus::Completed);
            events += task.last_sequence;
            lost += (1..=task.last_sequence)
                .filter(|sequence| !seen.contains(sequence))
                .count();
        }
        // The killed driver comes back, now as the standby.
        cluster.driver.restart().await;
        std::mem::swap(&mut cluster.driver, &mut standby);
    }
    let max = times.iter().copied().fold(0.0, f64::max);
    println!(
        "| driver failover: `kill -9` of the leader to the standby serving, 3 tasks streaming (median of {ROUNDS}) | max {max:.0} ms | median {:.0} ms; events lost: {lost} of {events} |",
        median(&mut times)
    );
}

/// Tasks a second for `count` one-turn tasks submitted at once.
async fn task_rate(cluster: &TestCluster, count: usize) -> f64 {
    let started = Instant::now();
    let mut runs = Vec::new();
    for index in 0..count {
        let spec = prompt(&format!("throughput {index}"));
        runs.push(async move { run_to_end(cluster, spec).await });
    }
    for (_, status) in futures_util::future::join_all(runs).await {
        assert_eq!(status, TaskStatus::Completed);
    }
    count as f64 / started.elapsed().as_secs_f64()
}

/// Latencies in ms of `count` GetTask calls one after another.
async fn get_task_latencies(cluster: &TestCluster, task_id: &str, count: usize) -> Vec<f64> {
    let mut driver = cluster.driver().await;
    let mut latencies = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        driver
            .get_task(GetTaskRequest {
                task_id: task_id.to_owned(),
            })
            .await
            .unwrap();
        latencies.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    latencies
}

/// Reads every `/metrics` of `addresses` once a second, as Prometheus would, until aborted.
fn scrape_every_second(addresses: Vec<String>) -> tokio::task::JoinHandle<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tokio::spawn(async move {
        loop {
            for address in &addresses {
                if let Ok(mut stream) = tokio::net::TcpStream::connect(address).await {
                    let _ = stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await;
                    let mut body = Vec::new();
                    let _ = stream.read_to_end(&mut body).await;
                }
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    })
}

/// Task throughput and GetTask latency with traces (exported to an OTLP receiver on loopback)
/// and metrics (scraped every second) on, against a cluster with both off, in one run: the
/// two clusters take turns.
async fn telemetry() {
    const TASKS: usize = 24;
    const ROUNDS: usize = 3;
    const GETS: usize = 1000;
    let worker = || WorkerSpec {
        capacity: 4,
        ..WorkerSpec::default()
    };
    let receiver = claudecluster_integration_tests::otlp::OtlpReceiver::start().await;
    let off = TestCluster::start(vec![worker()]).await;
    let on = TestCluster::start_with_env(
        "",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint),
            ("CLAUDECLUSTER_TELEMETRY__METRICS_LISTEN", "127.0.0.1:0"),
        ],
        vec![worker()],
    )
    .await;
    let scraper = scrape_every_second(
        [&on.driver, &on.scheduler, &on.workers[0]]
            .iter()
            .filter_map(|service| service.metrics.clone())
            .collect(),
    );
    // Warm both up: the first run of the CLI pays for its own start-up caches.
    task_rate(&off, 4).await;
    task_rate(&on, 4).await;
    let (mut rate_off, mut rate_on) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        rate_off.push(task_rate(&off, TASKS).await);
        rate_on.push(task_rate(&on, TASKS).await);
    }
    let finished_off = off.submit(prompt("read me")).await;
    off.finish(&finished_off.task_id).await;
    let finished_on = on.submit(prompt("read me")).await;
    on.finish(&finished_on.task_id).await;
    let (mut get_off, mut get_on) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        get_off.extend(get_task_latencies(&off, &finished_off.task_id, GETS).await);
        get_on.extend(get_task_latencies(&on, &finished_on.task_id, GETS).await);
    }
    scraper.abort();
    assert!(
        receiver.spans().len() > ROUNDS * TASKS,
        "the cluster with traces on exported them"
    );
    let (rate_off, rate_on) = (median(&mut rate_off), median(&mut rate_on));
    println!(
        "| task throughput, traces and metrics on ({TASKS} one-turn tasks at once, median of {ROUNDS}; {} spans received) | off: {rate_off:.2} tasks/s | {rate_on:.2} tasks/s, ratio {:.3} |",
        receiver.spans().len(),
        rate_on / rate_off
    );
    println!(
        "| GetTask latency, traces and metrics on ({} calls each) | off: p50 {:.3} ms, p99 {:.3} ms | p50 {:.3} ms, p99 {:.3} ms |",
        ROUNDS * GETS,
        percentile(&mut get_off, 0.5),
        percentile(&mut get_off, 0.99),
        percentile(&mut get_on, 0.5),
        percentile(&mut get_on, 0.99),
    );
}

#[tokio::main]
async fn main() {
    let only: Option<String> = std::env::args().nth(1);
    let wants = |section: &str| only.as_deref().is_none_or(|only| only == section);
    println!("| figure | baseline | value |");
    println!("|---|---|---|");
    if wants("container") {
        container_mode().await;
        worker_memory().await;
    }
    if only.as_deref() == Some("profile") {
        profile().await;
        return;
    }
    if wants("sessions") {
        sessions().await;
    }
    if wants("mcp") {
        mcp().await;
    }
    if wants("store") {
        store().await;
        driver_throughput("SQLite", "").await;
        let postgres = claudecluster_integration_tests::postgres::TestPostgres::start();
        driver_throughput(
            "PostgreSQL",
            &format!("store:\n  url: {}\n", postgres.url()),
        )
        .await;
    }
    if wants("limits") {
        limits().await;
    }
    if wants("security") {
        security().await;
    }
    if wants("proxy") {
        proxy().await;
    }
    if wants("telemetry") {
        telemetry().await;
    }
    if wants("failover") {
        failover().await;
    }
    if wants("results") {
        results().await;
    }
    if wants("scheduler") {
        placement_at_scale();
        mode_switch().await;
    }
    if !wants("process") {
        return;
    }
    let (direct, through_cluster, ratio) = overhead().await;
    println!(
        "| one-turn task through the cluster (median of {RUNS}) | direct `claude -p`: {:.0} ms | {:.0} ms, ratio {ratio:.3} |",
        direct * 1000.0,
        through_cluster * 1000.0
    );
    // The same path with the store in memory (tmpfs): what the disk costs.
    let in_memory = tempfile::tempdir_in("/dev/shm").unwrap();
    let (_, memory_rate) = streaming_throughput(Some(in_memory.path())).await;
    let (events, rate) = streaming_throughput(None).await;
    println!(
        "| events streamed live, agent to client, store on disk | store on tmpfs: {memory_rate:.0} events/s | {events} text events: {rate:.0} events/s, ratio {:.2} |",
        rate / memory_rate
    );
    let (decision_us, p50, p99) = placement().await;
    println!("| scheduler placement decision (mean) | 2 workers | {decision_us:.1} µs |");
    println!(
        "| submit to RUNNING on an idle cluster (200 tasks) | p50 {p50:.1} ms | p99 {p99:.1} ms |"
    );
}
