//! Docker Compose: the service images built offline from the binary under test, then
//! `deploy/compose.yaml` with the Phase 0 overlay (`deploy/compose-phase0.yaml`) brought up as
//! a project of the test's own with Debian's `docker-compose` (1.29). Through the published
//! ports only, as an operator would: a task on the process-pool worker, a task on the container
//! worker, a session of two messages, and a primary Claude Code that spawns a containerized
//! agent through the MCP server. Then `down -v`, after which nothing of the project is left.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use claudecluster_integration_tests::docker::{agent_image, containers_with_label, docker};
use claudecluster_integration_tests::*;
use claudecluster_proto::v1::driver_service_client::DriverServiceClient;
use claudecluster_proto::v1::event::Kind;
use claudecluster_proto::v1::*;
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Images of the test's own, so that the operator's `:0.1.0` images stay as they were built;
/// they share every layer but the service binary's with those.
const SERVICE_IMAGE: &str = "claudecluster/claudecluster:compose-test";
const WORKER_IMAGE: &str = "claudecluster/worker:compose-test";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests live in the workspace")
        .to_path_buf()
}

/// Runs `program` with `args` and `env`; its stdout, or a failure naming `what` with stderr.
async fn run(program: &str, args: &[&str], env: &[(String, String)], what: &str) -> String {
    let output = tokio::process::Command::new(program)
        .args(args)
        .envs(env.iter().cloned())
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap_or_else(|err| panic!("cannot run {program} ({what}): {err}"));
    assert!(
        output.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Docker and Debian's docker-compose answer; the test fails otherwise (it never skips).
async fn require_docker_and_compose() {
    let compose = tokio::process::Command::new("docker-compose")
        .arg("version")
        .output()
        .await;
    assert!(
        compose.is_ok_and(|output| output.status.success()),
        "docker-compose is missing: scripts/setup.sh installs Debian's docker-compose"
    );
    let daemon = tokio::process::Command::new("docker")
        .arg("info")
        .output()
        .await;
    assert!(
        daemon.is_ok_and(|output| output.status.success()),
        "no Docker daemon answers: scripts/setup.sh installs and starts one"
    );
    let image = agent_image();
    let agent = tokio::process::Command::new("docker")
        .args(["image", "inspect", &image])
        .output()
        .await
        .unwrap();
    assert!(
        agent.status.success(),
        "the agent image {image} is missing: deploy/agent-image/build-offline.sh (scripts/setup.sh) builds it"
    );
}

/// The host's address as containers reach it (`host.docker.internal` with `host-gateway`), and
/// so where the stand-in API must listen: asked of Docker itself, in a container. The default
/// bridge's IPAM gateway would say the same, but Docker leaves it out on some hosts.
async fn docker_host_address() -> String {
    let image = agent_image();
    let resolved = docker(&[
        "run",
        "--rm",
        "--network",
        "bridge",
        "--add-host",
        "gateway.probe:host-gateway",
        "--entrypoint",
        "getent",
        &image,
        "hosts",
        "gateway.probe",
    ])
    .await;
    let gateway = resolved.split_whitespace().next().unwrap_or_default();
    assert!(
        gateway.parse::<std::net::Ipv4Addr>().is_ok(),
        "Docker's host-gateway is no IPv4 address: `{resolved}`"
    );
    gateway.to_owned()
}

/// A port free on `ip` now (the services bind it a moment later).
fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn sha256_hex(text: &str) -> String {
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

/// A compose project of the test's own. Dropping it takes the project down (`down -v`) even
/// when an assertion failed, and removes whatever agent containers and networks its worker
/// left, after printing the services' logs if the test is failing.
struct ComposeProject {
    name: String,
    files: Vec<PathBuf>,
    env: Vec<(String, String)>,
    /// The container worker's workspace root, at the same path on the host.
    workspaces: PathBuf,
}

impl ComposeProject {
    fn args<'a>(&'a self, args: &[&'a str]) -> Vec<String> {
        let mut all = vec!["-p".to_owned(), self.name.clone()];
        for file in &self.files {
            all.push("-f".to_owned());
            all.push(file.display().to_string());
        }
        all.extend(args.iter().map(|arg| arg.to_string()));
        all
    }

    async fn compose(&self, args: &[&str]) -> String {
        let all = self.args(args);
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        run(
            "docker-compose",
            &all,
            &self.env,
            &format!("docker-compose {}", args.join(" ")),
        )
        .await
    }

    fn compose_blocking(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new("docker-compose")
            .args(self.args(args))
            .envs(self.env.iter().cloned())
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run docker-compose")
    }

    /// What carries the project's label: containers, networks or volumes (`kind`).
    async fn labelled(&self, kind: &str) -> Vec<String> {
        let filter = format!("label=com.docker.compose.project={}", self.name);
        let list = match kind {
            "containers" => docker(&["ps", "-aq", "--filter", &filter]).await,
            "networks" => docker(&["network", "ls", "-q", "--filter", &filter]).await,
            _ => docker(&["volume", "ls", "-q", "--filter", &filter]).await,
        };
        list.lines().map(str::to_owned).collect()
    }

    /// The containers and networks the container worker made: they carry its workspace root.
    /// While it runs, only agent containers count: it keeps the holders of its agents' network
    /// namespaces for its next agents.
    async fn agent_leftovers(&self, running: bool) -> (Vec<String>, Vec<String>) {
        let label = format!("claudecluster.home={}", self.workspaces.display());
        let containers = if running {
            docker(&[
                "ps",
                "-aq",
                "--filter",
                &format!("label={label}"),
                "--filter",
                "label=claudecluster.task",
            ])
            .await
            .lines()
            .map(str::to_owned)
            .collect()
        } else {
            containers_with_label(&label).await
        };
        let networks = docker(&["network", "ls", "-q", "--filter", &format!("label={label}")])
            .await
            .lines()
            .map(str::to_owned)
            .collect();
        (containers, networks)
    }
}

impl Drop for ComposeProject {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = self.compose_blocking(&["logs", "--no-color", "--tail", "200"]);
            eprintln!(
                "the project's logs:\n{}",
                String::from_utf8_lossy(&logs.stdout)
            );
        }
        // Idempotent: after the test's own `down -v` there is nothing left to remove.
        let _ = self.compose_blocking(&["down", "-v", "--remove-orphans", "-t", "10"]);
        let label = format!("label=claudecluster.home={}", self.workspaces.display());
        let _ = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "docker ps -aq --filter '{label}' | xargs -r docker rm -f; \
                 docker network ls -q --filter '{label}' | xargs -r docker network rm"
            ))
            .output();
    }
}

/// The reply of a session message: its result's text.
fn reply_text(events: &[Event]) -> String {
    events
        .iter()
        .find_map(|event| match &event.kind {
            Some(Kind::Result(result)) => Some(result.text.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no result in {events:?}"))
}

/// Runs `spec` to its end through `driver`; the final record.
async fn run_task(driver: &mut Driver, spec: TaskSpec) -> Task {
    let task = driver
        .submit_task(SubmitTaskRequest { spec: Some(spec) })
        .await
        .expect("submit")
        .into_inner()
        .task
        .unwrap();
    collect_events(driver, &task.task_id, 0).await;
    driver
        .get_task(GetTaskRequest {
            task_id: task.task_id,
        })
        .await
        .expect("get task")
        .into_inner()
        .task
        .unwrap()
}

/// The HTTP status line the MCP server answers a request without its key with, once it
/// answers at all (before, the published port takes the connection and closes it).
async fn mcp_status_line(port: u16) -> Option<String> {
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"compose-test","version":"1"}}}"#;
    let request = format!(
        "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n\
         Accept: application/json, text/event-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.ok()?;
        let answer = String::from_utf8_lossy(&answer).into_owned();
        answer.lines().next().map(str::to_owned)
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .ok()
        .flatten()
        .filter(|line| line.starts_with("HTTP/"))
}

#[tokio::test]
async fn the_compose_project_serves_both_workers_a_session_and_phase_zero_then_leaves_nothing() {
    require_docker_and_compose().await;
    let root = repo_root();

    // The images, from the binary under test; a second build with the same inputs does nothing.
    let build = root.join("deploy/docker/build-offline.sh");
    let images = [
        ("CLAUDECLUSTER_IMAGE".to_owned(), SERVICE_IMAGE.to_owned()),
        (
            "CLAUDECLUSTER_WORKER_IMAGE".to_owned(),
            WORKER_IMAGE.to_owned(),
        ),
    ];
    let binary = claudecluster_bin().display().to_string();
    let claude = claude_bin().display().to_string();
    let build_args = [binary.as_str(), claude.as_str()];
    let started = Instant::now();
    run(
        build.to_str().unwrap(),
        &build_args,
        &images,
        "deploy/docker/build-offline.sh",
    )
    .await;
    eprintln!("images built in {} ms", started.elapsed().as_millis());
    let again = tokio::process::Command::new(&build)
        .args(build_args)
        .envs(images.iter().cloned())
        .output()
        .await
        .unwrap();
    assert!(again.status.success());
    let again = String::from_utf8_lossy(&again.stderr);
    assert!(
        again.contains("up to date") && !again.contains("building"),
        "an unchanged build should do nothing: {again}"
    );
    for image in [SERVICE_IMAGE, WORKER_IMAGE] {
        let config = docker(&["image", "inspect", "-f", "{{json .Config}}", image]).await;
        let config: serde_json::Value = serde_json::from_str(&config).unwrap();
        assert_eq!(config["User"], "10001:10001", "{image}");
        assert_eq!(config["Entrypoint"], serde_json::json!(["claudecluster"]));
    }

    // The stand-in API where the workers' credential proxies reach it: the host, as
    // containers see it.
    let host_address = docker_host_address().await;
    let api = StandinApi::start_on(&host_address).await.unwrap();
    let key = format!("cck_compose_{}", uuid::Uuid::new_v4().simple());
    let driver_port = free_port("127.0.0.1");
    let http_port = free_port("127.0.0.1");
    let mcp_port = free_port("127.0.0.1");
    let workspaces = tempfile::Builder::new()
        .prefix("cc-compose-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let env: Vec<(String, String)> = [
        (
            "CLAUDECLUSTER_CLUSTER_SECRET",
            uuid::Uuid::new_v4().simple().to_string(),
        ),
        ("CLAUDECLUSTER_API_KEY_SHA256", sha256_hex(&key)),
        ("CLAUDECLUSTER_API_KEY", key.clone()),
        ("CLAUDECLUSTER_IMAGE", SERVICE_IMAGE.to_owned()),
        ("CLAUDECLUSTER_WORKER_IMAGE", WORKER_IMAGE.to_owned()),
        ("CLAUDECLUSTER_AGENT_IMAGE", agent_image()),
        ("CLAUDECLUSTER_DRIVER_PORT", driver_port.to_string()),
        ("CLAUDECLUSTER_HTTP_PORT", http_port.to_string()),
        ("CLAUDECLUSTER_MCP_PORT", mcp_port.to_string()),
        (
            "CLAUDECLUSTER_WORKSPACES",
            workspaces.path().display().to_string(),
        ),
        ("CLAUDECLUSTER_STORE_URL", String::new()),
        ("ANTHROPIC_API_KEY", "sk-ant-standin-secret".to_owned()),
        (
            "ANTHROPIC_BASE_URL",
            format!("http://host.docker.internal:{}", api.address().port()),
        ),
        // Whatever credentials the test's own environment holds stay out of the cluster.
        ("ANTHROPIC_AUTH_TOKEN", String::new()),
        ("CLAUDE_CODE_OAUTH_TOKEN", String::new()),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_owned(), value))
    .collect();
    let project = ComposeProject {
        name: format!(
            "cc-test-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..10]
        ),
        files: vec![
            root.join("deploy/compose.yaml"),
            root.join("deploy/compose-phase0.yaml"),
        ],
        env,
        workspaces: workspaces.path().to_path_buf(),
    };

    // The PostgreSQL profile cannot run here (its image would be pulled), but it must parse.
    let compose_file = root.join("deploy/compose.yaml").display().to_string();
    let services = run(
        "docker-compose",
        &[
            "-f",
            &compose_file,
            "--profile",
            "postgres",
            "config",
            "--services",
        ],
        &project.env,
        "docker-compose --profile postgres config",
    )
    .await;
    assert!(services.lines().any(|s| s == "postgres"), "{services}");

    let up = Instant::now();
    project.compose(&["up", "-d"]).await;
    let mut driver: Driver = DriverServiceClient::new(
        claudecluster_grpc::client_channel(
            &format!("127.0.0.1:{driver_port}"),
            claudecluster_grpc::Bearer::new(Some(&key), "the test").unwrap(),
            None,
        )
        .unwrap(),
    );
    let workers = wait_for(Duration::from_secs(90), || {
        let mut driver = driver.clone();
        async move {
            let status = driver
                .get_cluster_status(GetClusterStatusRequest {})
                .await
                .ok()?
                .into_inner();
            let healthy: Vec<WorkerInfo> = status
                .workers
                .into_iter()
                .filter(|worker| worker.healthy)
                .collect();
            (healthy.len() == 2).then_some(healthy)
        }
    })
    .await
    .expect("both workers registered and healthy within 90 s");
    let worker_of = |mode: ExecutionMode| {
        workers
            .iter()
            .find(|worker| worker.execution_mode() == mode)
            .unwrap_or_else(|| panic!("no {mode:?} worker in {workers:?}"))
            .worker_id
            .clone()
    };
    let (process_worker, container_worker) = (
        worker_of(ExecutionMode::ProcessPool),
        worker_of(ExecutionMode::ContainerAgentic),
    );
    // Nobody gets in without the key.
    let refused = driver_at(&format!("127.0.0.1:{driver_port}"))
        .get_cluster_status(GetClusterStatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    // The HTTP face is published too, behind the same key.
    let http = format!("http://127.0.0.1:{http_port}");
    let bearer = format!("Bearer {key}");
    let workers = claudecluster_integration_tests::http::request(
        "GET",
        &format!("{http}/workers"),
        &[("authorization", &bearer)],
        "",
    )
    .await;
    assert_eq!(workers.status, 200, "{}", workers.text());
    assert_eq!(
        workers.json()["workers"].as_array().map(Vec::len),
        Some(2),
        "{}",
        workers.text()
    );
    let anonymous = claudecluster_integration_tests::http::get(&format!("{http}/workers")).await;
    assert_eq!(anonymous.status, 401);

    // A task on the process-pool worker: a `claude` process inside the worker's container.
    let on_process_worker = run_task(
        &mut driver,
        TaskSpec {
            execution_mode: ExecutionMode::ProcessPool as i32,
            ..prompt("hello from the process worker")
        },
    )
    .await;
    eprintln!(
        "compose up to first task completed: {} ms",
        up.elapsed().as_millis()
    );
    assert_eq!(
        on_process_worker.status(),
        TaskStatus::Completed,
        "{}",
        on_process_worker.status_reason
    );
    assert_eq!(on_process_worker.worker_id, process_worker);
    assert_eq!(
        on_process_worker.result.unwrap().text,
        "MOCK_REPLY turn=1: hello from the process worker"
    );

    // A task on the container worker: an agent container next to the cluster's, whose
    // workspace is the same directory on the host and in the worker.
    let on_container_worker = run_task(
        &mut driver,
        TaskSpec {
            execution_mode: ExecutionMode::ContainerAgentic as i32,
            ..with_tools("WRITE note.txt written in a container", &["Write"])
        },
    )
    .await;
    assert_eq!(
        on_container_worker.status(),
        TaskStatus::Completed,
        "{}",
        on_container_worker.status_reason
    );
    assert_eq!(on_container_worker.worker_id, container_worker);
    assert!(
        on_container_worker
            .runner
            .starts_with("container claudecluster-"),
        "{}",
        on_container_worker.runner
    );
    assert_eq!(
        on_container_worker.result.unwrap().text,
        "MOCK_DONE wrote note.txt"
    );
    let note = workspaces
        .path()
        .join(&on_container_worker.task_id)
        .join("note.txt");
    assert_eq!(
        std::fs::read_to_string(&note).unwrap_or_else(|err| panic!("{}: {err}", note.display())),
        "written in a container\n"
    );
    // Agents reached the stand-in through the workers' credential proxies, which swap each
    // agent's token for the key the workers hold.
    assert!(
        api.requests()
            .iter()
            .all(|request| request.api_key.as_deref() == Some("sk-ant-standin-secret")),
        "the proxies forward with the workers' key"
    );

    // A session of two messages, on the container worker.
    let session = driver
        .create_session(CreateSessionRequest {
            spec: Some(SessionSpec::default()),
        })
        .await
        .expect("create a session")
        .into_inner()
        .session
        .unwrap();
    let first = reply_events(
        driver.clone(),
        session.session_id.clone(),
        "first message".into(),
    )
    .await;
    assert_eq!(reply_text(&first), "MOCK_REPLY turn=1: first message");
    let second = reply_events(
        driver.clone(),
        session.session_id.clone(),
        "second message".into(),
    )
    .await;
    assert_eq!(reply_text(&second), "MOCK_REPLY turn=2: second message");
    // The session's files, on the host, belong to the agent's user; the worker, root in its
    // container, removes them when the session closes.
    let session_dir = workspaces.path().join("sessions").join(&session.session_id);
    assert!(session_dir.is_dir(), "{}", session_dir.display());
    let closed = driver
        .close_session(CloseSessionRequest {
            session_id: session.session_id.clone(),
        })
        .await
        .expect("close the session")
        .into_inner()
        .session
        .unwrap();
    assert_eq!(closed.worker_id, container_worker);
    wait_until(Duration::from_secs(10), || async { !session_dir.exists() })
        .await
        .unwrap_or_else(|_| panic!("{} outlived its session", session_dir.display()));

    // Phase 0: a primary Claude Code on the host spawns a containerized agent through the
    // MCP server, which takes only clients that present the key.
    let unauthorized = wait_for(Duration::from_secs(30), || mcp_status_line(mcp_port))
        .await
        .expect("the MCP server answers on its published port");
    assert!(unauthorized.contains(" 401"), "{unauthorized}");
    let scratch = tempfile::tempdir().unwrap();
    let mcp_config = serde_json::json!({
        "mcpServers": {
            "claudecluster": {
                "type": "http",
                "url": format!("http://127.0.0.1:{mcp_port}/mcp"),
                "headers": {"Authorization": format!("Bearer {key}")},
            }
        }
    });
    let primary = tokio::process::Command::new(claude_bin())
        .args(["-p", "--output-format", "stream-json", "--verbose"])
        .args(["--mcp-config", &mcp_config.to_string()])
        .args([
            "--allowedTools",
            "mcp__claudecluster__spawn_claude_container,mcp__claudecluster__wait_for_task",
        ])
        .args(["--", "PHASE0 hello from the child"])
        .current_dir(scratch.path())
        .env("ANTHROPIC_BASE_URL", api.base_url())
        .env("ANTHROPIC_API_KEY", "sk-ant-standin-secret")
        .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
        .env("CLAUDE_CODE_MAX_RETRIES", "0")
        .env("CLAUDE_CONFIG_DIR", scratch.path().join("primary-config"))
        .stdin(std::process::Stdio::null())
        .output();
    let primary = tokio::time::timeout(Duration::from_secs(120), primary)
        .await
        .expect("the primary ended within 120 s")
        .expect("run the primary claude");
    let stdout = String::from_utf8_lossy(&primary.stdout);
    let result = stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|event| event["type"] == "result")
        .unwrap_or_else(|| panic!("the primary printed no result: {stdout}"));
    assert_eq!(
        result["result"], "PRIMARY DONE: MOCK_REPLY turn=1: hello from the child",
        "{result}"
    );

    // Everything the project made exists, so that finding none of it afterwards means
    // something.
    assert_eq!(project.labelled("containers").await.len(), 5);
    assert_eq!(project.labelled("networks").await.len(), 1);
    assert_eq!(project.labelled("volumes").await.len(), 3);
    // A task's end does not wait for its container's removal; the worker removes it just after.
    let removed = wait_until(Duration::from_secs(30), || async {
        project.agent_leftovers(true).await == (Vec::new(), Vec::new())
    })
    .await;
    assert!(
        removed.is_ok(),
        "agent containers outlived their tasks: {:?}",
        project.agent_leftovers(true).await
    );

    project.compose(&["down", "-v"]).await;
    for kind in ["containers", "networks", "volumes"] {
        let left = project.labelled(kind).await;
        assert!(left.is_empty(), "{kind} left by `down -v`: {left:?}");
    }
    let (containers, networks) = project.agent_leftovers(false).await;
    assert!(
        containers.is_empty() && networks.is_empty(),
        "agent containers {containers:?} and networks {networks:?} left"
    );
}
