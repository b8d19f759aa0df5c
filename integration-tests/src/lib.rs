//! Test support for whole-cluster tests: real `claudecluster` processes on free loopback
//! ports, the real Claude Code CLI, and the stand-in Messages API.
//!
//! Every component a test needs is required: when one is missing the test fails with a
//! message saying how to install it (`scripts/setup.sh`), it never passes by skipping.

pub mod bench_report;
pub mod browser;
pub mod docker;
pub mod forge;
pub mod http;
pub mod otlp;
pub mod postgres;
pub mod standin;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use claudecluster_proto::v1::driver_service_client::DriverServiceClient;
use claudecluster_proto::v1::event::Kind;
use claudecluster_proto::v1::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub use standin::StandinApi;

/// The pinned Claude Code version the tests run.
pub const CLAUDE_CODE_VERSION: &str = "2.1.328";

fn cache_dir() -> PathBuf {
    std::env::var_os("CLAUDECLUSTER_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let base = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")
                });
            base.join("claudecluster")
        })
}

fn required(path: PathBuf, what: &str) -> PathBuf {
    assert!(
        path.exists(),
        "{what} is missing at {}: run scripts/setup.sh (it installs every component the tests need)",
        path.display()
    );
    path
}

/// The `claudecluster` binary built alongside the tests.
pub fn claudecluster_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("CLAUDECLUSTER_BIN") {
        return required(PathBuf::from(path), "the claudecluster binary");
    }
    required(
        build_dir().join("claudecluster"),
        "the claudecluster binary (cargo build --bins)",
    )
}

/// A binary of this crate (`standin-api`, `scripted-agent`), built alongside the tests.
pub fn test_bin(name: &str) -> PathBuf {
    required(
        build_dir().join(name),
        &format!("the {name} binary (cargo build --bins)"),
    )
}

/// `target/<profile>`: where cargo put the binaries built with the running test or benchmark
/// (tests run from `target/<profile>/deps`).
fn build_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the running executable's path");
    let dir = exe.parent().expect("an executable lives in a directory");
    if dir.ends_with("deps") {
        dir.parent()
            .expect("deps lies in target/<profile>")
            .to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// The pinned Claude Code CLI.
pub fn claude_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("CLAUDE_BIN") {
        return required(PathBuf::from(path), "the Claude Code CLI");
    }
    required(
        cache_dir().join(format!(
            "claude-code-{CLAUDE_CODE_VERSION}/node_modules/.bin/claude"
        )),
        "the Claude Code CLI",
    )
}

/// A command-line tool installed by the setup script into its Python venv (grpcurl, buf, python).
pub fn venv_tool(name: &str) -> PathBuf {
    required(cache_dir().join("venv/bin").join(name), name)
}

/// A `claudecluster` service process, stopped with SIGTERM when dropped: a worker then stops
/// its agents and removes its containers by itself, after the test has ended.
pub struct ServiceProcess {
    pub name: String,
    pub address: String,
    /// Where it serves `/metrics`, when `telemetry.metricsListen` is set.
    pub metrics: Option<String>,
    /// A driver's HTTP face (REST, WebSockets, console), when it serves one.
    pub http: Option<String>,
    child: Child,
    /// Everything the process wrote to stderr (its logs), also passed on to the test's stderr.
    log: std::sync::Arc<std::sync::Mutex<String>>,
    config: PathBuf,
    env: Vec<(String, String)>,
}

impl ServiceProcess {
    /// Starts `claudecluster <subcommand> --config <config>` and waits for its address. Its
    /// data directory (the driver's store) is `data` beside the config file unless `env` sets
    /// `XDG_DATA_HOME`.
    pub async fn start(subcommand: &str, config: &Path, env: &[(String, String)]) -> Self {
        let log = std::sync::Arc::default();
        let (child, address, metrics, http) = Self::spawn(subcommand, config, env, &log).await;
        ServiceProcess {
            name: subcommand.to_owned(),
            address,
            metrics,
            http,
            child,
            log,
            config: config.to_owned(),
            env: env.to_vec(),
        }
    }

    async fn spawn(
        subcommand: &str,
        config: &Path,
        env: &[(String, String)],
        log: &std::sync::Arc<std::sync::Mutex<String>>,
    ) -> (Child, String, Option<String>, Option<String>) {
        let data = config
            .parent()
            .expect("a config file lies in a directory")
            .join("data");
        let mut child = Command::new(claudecluster_bin())
            .arg(subcommand)
            .arg("--config")
            .arg(config)
            .env("XDG_DATA_HOME", data)
            // A driver's HTTP face on a free port: tests run side by side, and 3000 is one port.
            .env("CLAUDECLUSTER_DRIVER__HTTP__LISTEN", "127.0.0.1:0")
            .envs(env.iter().cloned())
            .env(
                "CLAUDECLUSTER_LOG",
                std::env::var("CLAUDECLUSTER_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start claudecluster {subcommand}: {err}"));
        let stderr = child.stderr.take().unwrap();
        let log = log.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("{line}");
                let mut log = log.lock().unwrap();
                // Enough for any test to search; a long fuzz run keeps its first 64 MiB.
                if log.len() < 64 << 20 {
                    log.push_str(&line);
                    log.push('\n');
                }
            }
        });
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        // `up` runs every service; its address is the driver's.
        let service = if subcommand == "up" {
            "driver"
        } else {
            subcommand
        };
        let marker = format!("claudecluster: {service} listening on ");
        let mut metrics = None;
        let mut http = None;
        let address = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(address) = line.strip_prefix(&marker) {
                    return address.to_owned();
                }
                if let Some(address) = line.strip_prefix("claudecluster: metrics listening on ") {
                    metrics = Some(address.to_owned());
                }
                if let Some(address) = line.strip_prefix("claudecluster: http listening on ") {
                    http = Some(address.to_owned());
                }
            }
            panic!("claudecluster {subcommand} exited before listening")
        })
        .await
        .unwrap_or_else(|_| panic!("claudecluster {subcommand} did not listen within 60 s"));
        // Keep reading stdout so the process never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        (child, address, metrics, http)
    }

    /// Starts `claudecluster up --config <config>`; its address is the driver's.
    pub async fn start_up(config: &Path, env: &[(String, String)]) -> Self {
        Self::start("up", config, env).await
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("the service is running")
    }

    /// Kills the process at once (SIGKILL), as a crash would, and waits until it is gone.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Sends `signal` (libc::SIGSTOP, SIGCONT, SIGTERM, …) to the process.
    pub fn signal(&self, signal: i32) {
        send_signal(self.pid(), signal);
    }

    /// What the process has logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Whether the process still runs.
    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `limit` for the process to exit; its exit status, or `None` if it still runs.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .ok()
            .map(|status| status.expect("wait for the service"))
    }

    /// Starts the service again, after it was killed, on the same address and with the same
    /// configuration and data.
    pub async fn restart(&mut self) {
        let config = std::fs::read_to_string(&self.config).unwrap();
        let pinned = config.replacen(
            "listen: 127.0.0.1:0",
            &format!("listen: {}", self.address),
            1,
        );
        std::fs::write(&self.config, pinned).unwrap();
        let (child, address, metrics, http) =
            Self::spawn(&self.name, &self.config, &self.env, &self.log).await;
        self.metrics = metrics;
        self.http = http;
        assert_eq!(address, self.address, "restarted on the same address");
        self.child = child;
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        // SIGTERM lets a worker stop its agents; the process finishes that on its own.
        if let Ok(None) = self.child.try_wait()
            && let Some(pid) = self.child.id()
        {
            send_signal(pid, libc::SIGTERM);
        }
    }
}

#[allow(unsafe_code)]
pub fn send_signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

#[allow(unsafe_code)]
pub fn send_signal_to_group(pgid: u32, signal: i32) {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours; a negative pid
    // names the process group the test started.
    unsafe {
        libc::kill(-(pgid as i32), signal);
    }
}

/// How a test worker runs agents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    ProcessPool,
    /// Containers on the host's network, so that agents reach the stand-in API on loopback.
    Container,
}

/// A client of the driver as the tests make it.
pub type Driver = DriverServiceClient<claudecluster_grpc::ClientChannel>;

/// A client of the driver at `address`, presenting no API key.
pub fn driver_at(address: &str) -> Driver {
    DriverServiceClient::new(
        claudecluster_grpc::client_channel(
            address,
            claudecluster_grpc::Bearer::new(None, "").unwrap(),
            None,
        )
        .unwrap(),
    )
}

/// How one worker of a test cluster is set up.
#[derive(Clone)]
pub struct WorkerSpec {
    pub mode: Mode,
    pub capacity: u32,
    pub labels: BTreeMap<String, String>,
    pub idle_timeout: Duration,
    pub grace_period: Duration,
    /// The agent executable; the real CLI unless a test says otherwise.
    pub claude_path: Option<PathBuf>,
    /// Extra YAML appended to the worker's configuration.
    pub extra_yaml: String,
    /// Extra keys of the worker's `agent:` section, each line indented by two spaces.
    pub agent_yaml: String,
    /// Extra keys of the worker's `processPool:` section, each line indented by two spaces.
    pub pool_yaml: String,
    /// Extra keys of the worker's `container:` section, each line indented by two spaces.
    pub container_yaml: String,
    /// Container mode: the image, the network, the Docker socket, the warm pool.
    pub image: Option<String>,
    pub network: String,
    pub docker_socket: Option<PathBuf>,
    pub warm_pool_size: u32,
}

impl Default for WorkerSpec {
    fn default() -> Self {
        WorkerSpec {
            mode: Mode::ProcessPool,
            capacity: 2,
            labels: BTreeMap::new(),
            idle_timeout: Duration::from_secs(60),
            grace_period: Duration::from_secs(3),
            claude_path: None,
            extra_yaml: String::new(),
            agent_yaml: String::new(),
            pool_yaml: String::new(),
            container_yaml: String::new(),
            image: None,
            network: "host".to_owned(),
            docker_socket: None,
            warm_pool_size: 0,
        }
    }
}

impl WorkerSpec {
    pub fn in_mode(mode: Mode) -> Self {
        WorkerSpec {
            mode,
            ..WorkerSpec::default()
        }
    }
}

/// A cluster of real processes: scheduler, driver and workers, with a stand-in API.
pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub api: StandinApi,
    pub scheduler: ServiceProcess,
    pub driver: ServiceProcess,
    pub workers: Vec<ServiceProcess>,
    /// The workers' ids, unique to this test (container labels name them).
    pub worker_ids: Vec<String>,
    env: Vec<(String, String)>,
    /// With TLS: the directory of the cluster's certificates.
    pub certs: Option<PathBuf>,
}

impl TestCluster {
    pub async fn start(workers: Vec<WorkerSpec>) -> Self {
        Self::start_with_driver("", workers).await
    }

    /// A cluster whose driver gets `driver_yaml` added to its configuration.
    pub async fn start_with_driver(driver_yaml: &str, workers: Vec<WorkerSpec>) -> Self {
        Self::start_with_env(driver_yaml, &[], workers).await
    }

    /// A cluster whose services also get the variables `extra_env`.
    pub async fn start_with_env(
        driver_yaml: &str,
        extra_env: &[(&str, &str)],
        workers: Vec<WorkerSpec>,
    ) -> Self {
        Self::start_with_tls(driver_yaml, extra_env, None, workers).await
    }

    /// A cluster whose services speak TLS with the certificates in `certs` (as `claudecluster
    /// certs init` makes them), when given; the test's clients then do too.
    pub async fn start_with_tls(
        driver_yaml: &str,
        extra_env: &[(&str, &str)],
        certs: Option<&Path>,
        workers: Vec<WorkerSpec>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let tls_yaml = |role: &str| match certs {
            Some(certs) => format!(
                "tls:\n  ca: {}\n  cert: {}\n  key: {}\n",
                certs.join("ca.pem").display(),
                certs.join(format!("{role}.pem")).display(),
                certs.join(format!("{role}.key")).display()
            ),
            None => String::new(),
        };
        let api = StandinApi::start().await.unwrap();
        let mut env = vec![
            ("ANTHROPIC_BASE_URL".to_owned(), api.base_url()),
            (
                "ANTHROPIC_API_KEY".to_owned(),
                "sk-ant-standin-secret".to_owned(),
            ),
            // A failing API must fail the run at once, not after minutes of retries.
            ("CLAUDE_CODE_MAX_RETRIES".to_owned(), "0".to_owned()),
        ];
        env.extend(
            extra_env
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_string())),
        );
        let scheduler_config = dir.path().join("scheduler.yaml");
        std::fs::write(
            &scheduler_config,
            format!(
                "listen: 127.0.0.1:0\nheartbeatInterval: 200ms\nheartbeatTimeout: 1s\n{}",
                tls_yaml("scheduler")
            ),
        )
        .unwrap();
        let scheduler = ServiceProcess::start("scheduler", &scheduler_config, &env).await;
        let driver_config = dir.path().join("driver.yaml");
        std::fs::write(
            &driver_config,
            format!(
                "listen: 127.0.0.1:0\nschedulerAddress: {}\n{}{driver_yaml}",
                scheduler.address,
                tls_yaml("driver")
            ),
        )
        .unwrap();
        let driver = ServiceProcess::start("driver", &driver_config, &env).await;
        let mut cluster = TestCluster {
            dir,
            api,
            scheduler,
            driver,
            workers: Vec::new(),
            worker_ids: Vec::new(),
            env,
            certs: certs.map(Path::to_path_buf),
        };
        let count = workers.len();
        for spec in workers {
            cluster.add_worker(spec).await;
        }
        cluster.wait_for_healthy_workers(count).await;
        cluster
    }

    /// Starts another driver process with the first one's configuration (on a port of its
    /// own): on a shared PostgreSQL store, a standby.
    pub async fn start_another_driver(&self) -> ServiceProcess {
        // A file of its own: a restart pins the address it listens on in it.
        let config = self
            .dir
            .path()
            .join(format!("driver-{}.yaml", uuid::Uuid::new_v4().simple()));
        std::fs::copy(&self.driver.config, &config).unwrap();
        ServiceProcess::start("driver", &config, &self.env).await
    }

    /// Starts one more worker process; its id is added to `worker_ids`.
    pub async fn add_worker(&mut self, spec: WorkerSpec) -> String {
        let worker_id = format!(
            "w{}-{}",
            self.worker_ids.len(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        self.add_worker_named(&worker_id, spec).await;
        worker_id
    }

    /// Starts one more worker process with id `worker_id`.
    pub async fn add_worker_named(&mut self, worker_id: &str, spec: WorkerSpec) {
        let root = self.dir.path().join(worker_id);
        std::fs::create_dir_all(root.join("claude-config")).unwrap();
        let mut labels = String::new();
        for (key, value) in &spec.labels {
            labels.push_str(&format!("  {key}: \"{value}\"\n"));
        }
        let mode = match spec.mode {
            Mode::ProcessPool => format!(
                "executionMode: process_pool\n\
                 processPool:\n  maxProcesses: {capacity}\n  claudeCodePath: {claude}\n  warmPoolSize: {warm}\n{pool}",
                capacity = spec.capacity,
                claude = spec
                    .claude_path
                    .clone()
                    .unwrap_or_else(claude_bin)
                    .display(),
                warm = spec.warm_pool_size,
                pool = spec.pool_yaml,
            ),
            Mode::Container => format!(
                "executionMode: container_agentic\n\
                 container:\n  image: {image}\n  maxContainers: {capacity}\n  network: {network}\n  warmPoolSize: {warm}\n{socket}{container_extra}",
                image = spec.image.clone().unwrap_or_else(docker::agent_image),
                capacity = spec.capacity,
                network = spec.network,
                warm = spec.warm_pool_size,
                container_extra = spec.container_yaml,
                socket = spec
                    .docker_socket
                    .as_ref()
                    .map(|path| format!("  dockerHost: {}\n", path.display()))
                    .unwrap_or_default(),
            ),
        };
        // A process agent keeps its CLI state in the test's directory; a container agent has
        // its own home in its container.
        let config_dir = match spec.mode {
            Mode::ProcessPool => format!(
                "    CLAUDE_CONFIG_DIR: {}\n",
                root.join("claude-config").display()
            ),
            Mode::Container => String::new(),
        };
        let config = format!(
            "listen: 127.0.0.1:0\n\
             schedulerAddress: {scheduler}\n\
             workerId: {worker_id}\n\
             workspaceRoot: {workspaces}\n\
             shutdownGrace: 1\n\
             labels:\n{labels}\
             {mode}\
             agent:\n  idleTimeout: {idle}ms\n  cancelGracePeriod: {grace}ms\n{agent_extra}  env:\n{config_dir}    DISABLE_TELEMETRY: \"1\"\n\
             {tls}{extra}",
            tls = match &self.certs {
                Some(certs) => format!(
                    "tls:\n  ca: {}\n  cert: {}\n  key: {}\n",
                    certs.join("ca.pem").display(),
                    certs.join("worker.pem").display(),
                    certs.join("worker.key").display()
                ),
                None => String::new(),
            },
            scheduler = self.scheduler.address,
            workspaces = root.join("workspaces").display(),
            labels = if labels.is_empty() {
                "  {}\n".to_owned()
            } else {
                labels
            },
            idle = spec.idle_timeout.as_millis(),
            agent_extra = spec.agent_yaml,
            grace = spec.grace_period.as_millis(),
            extra = spec.extra_yaml,
        );
        let config_path = self.dir.path().join(format!("{worker_id}.yaml"));
        std::fs::write(&config_path, config).unwrap();
        let worker = ServiceProcess::start("worker", &config_path, &self.env).await;
        self.workers.push(worker);
        self.worker_ids.push(worker_id.to_owned());
    }

    /// A client of the driver, presenting the cluster's `CLAUDECLUSTER_API_KEY` when it was
    /// started with one (see [`TestCluster::start_with_env`]).
    pub async fn driver(&self) -> Driver {
        let key = self
            .env
            .iter()
            .find(|(name, _)| name == "CLAUDECLUSTER_API_KEY")
            .map(|(_, key)| key.as_str());
        let bearer = claudecluster_grpc::Bearer::new(key, "the test").unwrap();
        let tls = self.certs.as_ref().map(|certs| {
            claudecluster_grpc::tls::Tls::from_files(&certs.join("ca.pem"), None, None).unwrap()
        });
        DriverServiceClient::new(
            claudecluster_grpc::client_channel(&self.driver.address, bearer, tls.as_ref()).unwrap(),
        )
    }

    /// The base URL of the driver's HTTP face (`http://127.0.0.1:<port>`).
    pub fn http_url(&self) -> String {
        format!(
            "http://{}",
            self.driver
                .http
                .as_deref()
                .expect("the driver serves HTTP (driver.http.listen)")
        )
    }

    /// Waits until the scheduler reports `count` healthy workers.
    pub async fn wait_for_healthy_workers(&self, count: usize) {
        let mut driver = self.driver().await;
        wait_until(Duration::from_secs(20), || {
            let mut driver = driver.clone();
            async move {
                driver
                    .get_cluster_status(GetClusterStatusRequest {})
                    .await
                    .map(|r| r.into_inner().workers.iter().filter(|w| w.healthy).count() >= count)
                    .unwrap_or(false)
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{count} workers did not become healthy"));
        let _ = &mut driver;
    }

    /// Submits a task and returns its record.
    pub async fn submit(&self, spec: TaskSpec) -> Task {
        self.driver()
            .await
            .submit_task(SubmitTaskRequest { spec: Some(spec) })
            .await
            .expect("submit")
            .into_inner()
            .task
            .unwrap()
    }

    /// Waits until the task's agent has printed its init event: it is up and running.
    pub async fn wait_for_agent(&self, task_id: &str) {
        let request = StreamTaskEventsRequest {
            task_id: task_id.to_owned(),
            after_sequence: 0,
        };
        let mut stream = self
            .driver()
            .await
            .stream_task_events(request)
            .await
            .expect("stream the task's events")
            .into_inner();
        while let Some(response) = stream.message().await.expect("the event stream") {
            if matches!(response.event.and_then(|e| e.kind), Some(Kind::Init(_))) {
                return;
            }
        }
        panic!("task {task_id} ended before its agent started");
    }

    /// Runs `spec` to its end, which must be COMPLETED, and returns the agent's result text.
    pub async fn completed_text(&self, spec: TaskSpec) -> String {
        let task = self.submit(spec).await;
        let ended = self.finish_completed(&task.task_id).await;
        ended.result.expect("a completed task has a result").text
    }

    /// Streams the task's events until it ends, which must be COMPLETED; returns its record.
    pub async fn finish_completed(&self, task_id: &str) -> Task {
        let (ended, _) = self.finish(task_id).await;
        assert_eq!(
            ended.status(),
            TaskStatus::Completed,
            "{}",
            ended.status_reason
        );
        ended
    }

    /// Cancels the task, giving no reason.
    pub async fn cancel(&self, task_id: &str) {
        self.driver()
            .await
            .cancel_task(CancelTaskRequest {
                task_id: task_id.to_owned(),
                reason: String::new(),
            })
            .await
            .expect("cancel task");
    }

    /// The task's current record.
    pub async fn task(&self, task_id: &str) -> Task {
        self.driver()
            .await
            .get_task(GetTaskRequest {
                task_id: task_id.to_owned(),
            })
            .await
            .expect("get task")
            .into_inner()
            .task
            .unwrap()
    }

    /// Streams the task's events until it ends; returns the final record and the events.
    pub async fn finish(&self, task_id: &str) -> (Task, Vec<Event>) {
        let events = collect_events(&mut self.driver().await, task_id, 0).await;
        (self.task(task_id).await, events)
    }

    /// Sends a message to a session and collects the events of its reply (at most 90 s).
    pub async fn send_message(&self, session_id: &str, text: &str) -> Vec<Event> {
        let reply = reply_events(self.driver().await, session_id.to_owned(), text.to_owned());
        tokio::time::timeout(Duration::from_secs(90), reply)
            .await
            .expect("the reply ended")
    }

    /// The session's current record.
    pub async fn session(&self, session_id: &str) -> Session {
        self.driver()
            .await
            .get_session(GetSessionRequest {
                session_id: session_id.to_owned(),
            })
            .await
            .expect("get session")
            .into_inner()
            .session
            .unwrap()
    }

    /// The secret the cluster's services share: the file they made in the test's data
    /// directory.
    pub fn secret(&self) -> claudecluster_grpc::ClusterSecret {
        let from_env = self
            .env
            .iter()
            .find(|(name, _)| name == claudecluster_grpc::cluster::SECRET_VARIABLE)
            .map(|(_, value)| value.clone());
        claudecluster_grpc::ClusterSecret::resolve(
            from_env,
            None,
            &self.dir.path().join("data/claudecluster"),
        )
        .unwrap()
    }

    /// What the test's own clients present to the scheduler and workers: the secret, and with
    /// TLS an admin's certificate.
    pub fn identity(&self) -> claudecluster_grpc::ClusterIdentity {
        claudecluster_grpc::ClusterIdentity {
            secret: self.secret(),
            tls: self.certs.as_ref().map(|certs| {
                claudecluster_grpc::tls::Tls::from_files(
                    &certs.join("ca.pem"),
                    Some(&certs.join("admin.pem")),
                    Some(&certs.join("admin.key")),
                )
                .unwrap()
            }),
        }
    }

    /// A client of the scheduler that presents the cluster secret, as the driver does.
    pub fn scheduler_client(
        &self,
    ) -> claudecluster_proto::v1::scheduler_service_client::SchedulerServiceClient<
        claudecluster_grpc::ClusterChannel,
    > {
        claudecluster_proto::v1::scheduler_service_client::SchedulerServiceClient::new(
            claudecluster_grpc::cluster::cluster_channel(&self.scheduler.address, &self.identity())
                .unwrap(),
        )
    }

    /// A client of worker `index` that presents the cluster secret, as the driver does.
    pub fn worker_client(
        &self,
        index: usize,
    ) -> claudecluster_proto::v1::worker_service_client::WorkerServiceClient<
        claudecluster_grpc::ClusterChannel,
    > {
        claudecluster_proto::v1::worker_service_client::WorkerServiceClient::new(
            claudecluster_grpc::cluster::cluster_channel(
                &self.workers[index].address,
                &self.identity(),
            )
            .unwrap(),
        )
    }

    /// Every task the driver holds, page by page.
    pub async fn all_tasks(&self) -> Vec<Task> {
        let mut driver = self.driver().await;
        let mut tasks = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = driver
                .list_tasks(ListTasksRequest {
                    page_size: 1000,
                    page_token,
                    ..Default::default()
                })
                .await
                .expect("list tasks")
                .into_inner();
            tasks.extend(page.tasks);
            if page.next_page_token.is_empty() {
                return tasks;
            }
            page_token = page.next_page_token;
        }
    }

    /// Asserts that every service process still runs and that no task is left RUNNING or
    /// ASSIGNED: what a bad request must never cause.
    pub async fn assert_unharmed(&mut self) {
        assert!(self.driver.is_alive(), "the driver died");
        assert!(self.scheduler.is_alive(), "the scheduler died");
        for worker in &mut self.workers {
            assert!(worker.is_alive(), "worker {} died", worker.address);
        }
        let stuck: Vec<_> = self
            .all_tasks()
            .await
            .into_iter()
            .filter(|task| matches!(task.status(), TaskStatus::Running | TaskStatus::Assigned))
            .map(|task| (task.task_id, task.status_reason))
            .collect();
        assert!(stuck.is_empty(), "tasks left running: {stuck:?}");
    }

    /// The workspace root of a worker started by this cluster.
    pub fn workspaces(&self, worker_id: &str) -> PathBuf {
        self.dir.path().join(worker_id).join("workspaces")
    }
}

/// Sends a message on its own client, so it can run in the background, and collects the events
/// of its reply until the stream ends.
pub async fn reply_events(mut driver: Driver, session_id: String, text: String) -> Vec<Event> {
    let request = SendSessionMessageRequest { session_id, text };
    let mut stream = driver
        .send_session_message(request)
        .await
        .expect("send")
        .into_inner();
    let mut events = Vec::new();
    while let Some(response) = stream.message().await.unwrap() {
        events.push(response.event.unwrap());
    }
    events
}

/// All events of a task after `after`, until the stream ends (after the terminal status).
pub async fn collect_events(driver: &mut Driver, task_id: &str, after: u64) -> Vec<Event> {
    let request = StreamTaskEventsRequest {
        task_id: task_id.to_owned(),
        after_sequence: after,
    };
    let mut stream = driver
        .stream_task_events(request)
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    let collecting = async {
        while let Some(response) = stream.message().await.unwrap() {
            events.push(response.event.unwrap());
        }
    };
    tokio::time::timeout(Duration::from_secs(120), collecting)
        .await
        .expect("the task did not end within 120 s");
    events
}

/// Runs `claudecluster ARGS` against the driver at `driver`: whether it succeeded, its
/// stdout and its stderr.
pub async fn cli(driver: &str, args: &[&str]) -> (bool, String, String) {
    let output = tokio::process::Command::new(claudecluster_bin())
        .args(args)
        .env("CLAUDECLUSTER_DRIVER", driver)
        .output()
        .await
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A task spec that is just `text` as the prompt.
pub fn prompt(text: &str) -> TaskSpec {
    TaskSpec {
        prompt: text.to_owned(),
        ..TaskSpec::default()
    }
}

/// A task spec whose agent may use `tools` without asking.
pub fn with_tools(text: &str, tools: &[&str]) -> TaskSpec {
    TaskSpec {
        agent: Some(AgentOptions {
            allowed_tools: tools.iter().map(|tool| tool.to_string()).collect(),
            ..Default::default()
        }),
        ..prompt(text)
    }
}

/// The statuses a task went through, from its events.
pub fn statuses(events: &[Event]) -> Vec<TaskStatus> {
    events
        .iter()
        .filter_map(|event| match &event.kind {
            Some(Kind::StatusChange(change)) => Some(change.status()),
            _ => None,
        })
        .collect()
}

/// When the task first entered `status`, in seconds since the epoch, from its events.
pub fn status_time(events: &[Event], status: TaskStatus) -> Option<f64> {
    events
        .iter()
        .find(|event| matches!(&event.kind, Some(Kind::StatusChange(c)) if c.status() == status))
        .and_then(|event| event.time)
        .map(|time| time.seconds as f64 + f64::from(time.nanos) / 1e9)
}

/// Follows a task's events to its end through `driver`, opening the stream again after the
/// last event seen whenever it breaks, as clients do. Returns the sequences seen.
pub async fn follow_resuming(driver: Driver, task_id: String) -> Vec<u64> {
    let mut seen: Vec<u64> = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "task {task_id} did not end: {seen:?}"
        );
        let after = seen.last().copied().unwrap_or(0);
        let opened = driver
            .clone()
            .stream_task_events(StreamTaskEventsRequest {
                task_id: task_id.clone(),
                after_sequence: after,
            })
            .await;
        let mut stream = match opened {
            Ok(response) => response.into_inner(),
            // The driver went away under the call (a reset connection reads as UNKNOWN), or a
            // standby answered: try again, as the CLI does.
            Err(status) => {
                assert!(
                    matches!(
                        status.code(),
                        tonic::Code::Unavailable
                            | tonic::Code::Unknown
                            | tonic::Code::Cancelled
                            | tonic::Code::Aborted
                    ),
                    "{status:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Until the stream breaks (the leader's end); then it is opened again after the last
        // event seen.
        while let Ok(Some(response)) = stream.message().await {
            let event = response.event.unwrap();
            seen.push(event.sequence);
            if let Some(event::Kind::StatusChange(change)) = &event.kind
                && change.status().is_terminal()
            {
                return seen;
            }
        }
    }
}

/// A request presenting the API key `key` (none when empty), whatever the client presents.
pub fn with_key<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if !key.is_empty() {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
    }
    request
}

/// Polls `found` until it yields a value, for at most `limit`.
pub async fn wait_for<T, F, Fut>(limit: Duration, mut found: F) -> Result<T, ()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if let Some(value) = found().await {
            return Ok(value);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(())
}

/// Polls `condition` every 20 ms until it holds or `limit` passes.
pub async fn wait_until<F, Fut>(limit: Duration, mut condition: F) -> Result<(), ()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if condition().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(())
}

/// Runs the venv's Python with `args`: a client that prints one JSON object per line, each
/// with the `step` it reports on. Returns them by step; fails the test if the client fails.
pub async fn python_steps(args: &[&str]) -> std::collections::HashMap<String, serde_json::Value> {
    let output = Command::new(venv_tool("python"))
        .args(args)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            (value["step"].as_str().unwrap().to_owned(), value)
        })
        .collect()
}

/// Generates the Python gRPC stubs of the project's protos into `out` with grpcio-tools.
pub async fn python_stubs(out: &Path) {
    let proto_root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let mut command = Command::new(venv_tool("python"));
    command
        .args(["-m", "grpc_tools.protoc"])
        .arg(format!("-I{}", proto_root.display()))
        .arg(format!("--python_out={}", out.display()))
        .arg(format!("--grpc_python_out={}", out.display()));
    for name in ["types", "driver", "scheduler", "worker"] {
        command.arg(format!("claudecluster/v1/{name}.proto"));
    }
    let output = command.output().await.unwrap();
    assert!(
        output.status.success(),
        "grpc_tools.protoc failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `claudecluster mcp --http` on a free loopback port, talking to the driver at `driver`, with
/// `args` and `env` added; returns the process (killed when dropped) and the address it
/// announced.
pub async fn start_mcp_http(
    driver: &str,
    args: &[&std::ffi::OsStr],
    env: &[(&str, &std::ffi::OsStr)],
) -> (Child, String) {
    let mut server = Command::new(claudecluster_bin())
        .args([
            "mcp",
            "--http",
            "--listen",
            "127.0.0.1:0",
            "--driver",
            driver,
        ])
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    let line = lines
        .next_line()
        .await
        .unwrap()
        .expect("the MCP server announces its address");
    let address = line
        .strip_prefix("claudecluster: mcp listening on ")
        .unwrap_or_else(|| panic!("{line}"))
        .to_owned();
    (server, address)
}
