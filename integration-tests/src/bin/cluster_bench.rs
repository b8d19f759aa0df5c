//! Figures for the cluster's costs, each against a baseline measured in the same run:
//!
//! - overhead per task: a one-turn task through driver, scheduler and a process-pool worker,
//!   against the same `claude -p` command run directly (real CLI, stand-in API), as a ratio
//!   of medians;
//! - events per second the driver streams to a client, from a fast scripted agent;
//! - scheduler placement time, and submit-to-start latency on an idle cluster.
//!
//! Run with `scripts/bench.sh` (release build). Prints a Markdown table.

use std::time::Instant;

use claudecluster_integration_tests::*;
use claudecluster_proto::v1::event::Kind;
use claudecluster_proto::v1::scheduler_service_client::SchedulerServiceClient;
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

async fn streaming_throughput() -> (usize, f64) {
    let worker = WorkerSpec {
        capacity: 1,
        claude_path: Some(test_bin("scripted-agent")),
        ..WorkerSpec::default()
    };
    let cluster = TestCluster::start(vec![worker]).await;
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
    let mut scheduler = SchedulerServiceClient::new(
        claudecluster_grpc::channel(&cluster.scheduler.address).unwrap(),
    );
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

#[tokio::main]
async fn main() {
    println!("| figure | baseline | value |");
    println!("|---|---|---|");
    let (direct, through_cluster, ratio) = overhead().await;
    println!(
        "| one-turn task through the cluster (median of {RUNS}) | direct `claude -p`: {:.0} ms | {:.0} ms, ratio {ratio:.3} |",
        direct * 1000.0,
        through_cluster * 1000.0
    );
    let (events, rate) = streaming_throughput().await;
    println!(
        "| events streamed live, agent to client | {events} text events | {rate:.0} events/s |"
    );
    let (decision_us, p50, p99) = placement().await;
    println!("| scheduler placement decision (mean) | 2 workers | {decision_us:.1} µs |");
    println!(
        "| submit to RUNNING on an idle cluster (200 tasks) | p50 {p50:.1} ms | p99 {p99:.1} ms |"
    );
}
