//! The schema. Keys are camelCase, as in the seed's `config/worker.yaml` examples.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::units::{ByteSize, Millis, Seconds, StringList};

/// Every service's settings. `claudecluster up` reads all three sections from one file;
/// `claudecluster worker --config worker.yaml` reads a file that holds the worker section alone.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ClusterConfig {
    pub driver: DriverConfig,
    pub scheduler: SchedulerConfig,
    pub worker: WorkerConfig,
    pub mcp: McpConfig,
    pub cluster: ClusterAuthConfig,
    /// Logs, traces and metrics of the process. A service's own file (`claudecluster worker
    /// --config worker.yaml`) may hold this section beside its keys.
    pub telemetry: TelemetryConfig,
}

/// Where and how a worker with `container.orchestrator: kubernetes` makes its agents' pods.
/// The worker reaches the API as `kubectl` would: in a pod, with its service account; outside,
/// with `KUBECONFIG`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// The namespace of the agents' pods; default: the worker's own (in a pod), or the
    /// kubeconfig's.
    pub namespace: Option<String>,
    /// How agent pods reach the worker's credential proxy: the worker pod's IP (`POD_IP`) by
    /// default.
    pub proxy_host: Option<String>,
    /// How long an agent's pod may take to start (image pull included).
    pub start_timeout: Seconds,
    /// `IfNotPresent`, `Always` or `Never`.
    pub image_pull_policy: String,
    /// The size of each session's volume claim (its workspace and conversation).
    pub session_storage: ByteSize,
    /// The storage class of sessions' claims; unset: the cluster's default.
    pub storage_class: Option<String>,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            namespace: None,
            proxy_host: None,
            start_timeout: Seconds(Duration::from_secs(300)),
            image_pull_policy: "IfNotPresent".into(),
            session_storage: ByteSize(1 << 30),
            storage_class: None,
        }
    }
}

/// Logs, traces and metrics of one process.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// `text` (default) or `json`: one JSON object a line, carrying the trace and span ids.
    pub log_format: LogFormat,
    /// The OTLP/gRPC collector spans are exported to (`http://collector:4317`); when unset,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`; when both are unset, spans are not exported.
    pub otlp_endpoint: Option<String>,
    /// Where Prometheus text is served on `/metrics` (host:port); unset: not served.
    pub metrics_listen: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// TLS files of one service (make them with `claudecluster certs init`): the cluster CA, and
/// the service's own certificate and key. The driver serves its clients over TLS with them;
/// between the services it is mutual TLS.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct TlsConfig {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// How the services know each other.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ClusterAuthConfig {
    /// A file holding the secret the services present to each other; when unset (and
    /// `CLAUDECLUSTER_CLUSTER_SECRET` is not), the services of one host share one made under
    /// the user's data directory.
    pub secret_file: Option<PathBuf>,
}

/// The MCP server: a client of the driver.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct McpConfig {
    /// Where the streamable HTTP transport listens (path `/mcp`).
    pub listen: String,
    /// The driver, as host:port.
    pub driver_address: String,
    /// Serve HTTP beyond loopback with no API key: anyone who reaches it may use the tools.
    /// Refused unless set.
    pub insecure: bool,
    /// Serve HTTPS with this certificate and key (`ca` is not used).
    pub tls: TlsConfig,
}

impl Default for McpConfig {
    fn default() -> Self {
        McpConfig {
            listen: "127.0.0.1:50054".into(),
            driver_address: "127.0.0.1:50051".into(),
            insecure: false,
            tls: TlsConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DriverConfig {
    /// Address the DriverService listens on.
    pub listen: String,
    /// The scheduler, as host:port.
    pub scheduler_address: String,
    /// Messages a session holds while it answers another; more are refused.
    pub session_queue_limit: u32,
    /// Attempts a task gets when its worker refuses it or is lost while running it.
    pub max_attempts: u32,
    /// Tasks one `SubmitTasks` request may hold.
    pub max_batch_size: u32,
    /// The largest prompt or session message accepted (at most 1 MiB, so that a task record
    /// always fits in one message).
    pub max_prompt_bytes: ByteSize,
    /// Where the embedded store keeps its file (`driver.db`); defaults to `claudecluster`
    /// under the user's data directory.
    pub data_dir: Option<PathBuf>,
    pub store: StoreConfig,
    pub auth: AuthConfig,
    pub tls: TlsConfig,
    /// Serve on an address other than loopback with no API keys: anyone who reaches it may do
    /// anything. Refused unless set.
    pub insecure: bool,
    /// What the whole cluster may spend; each key's own budget is in its quotas.
    pub budget: BudgetConfig,
    /// Webhooks told of finished tasks, answered session messages, denied permissions,
    /// unhealthy workers and spent budgets.
    pub notifications: NotificationsConfig,
    /// The original REST and WebSocket API, and the web console.
    pub http: HttpConfig,
}

/// The driver's HTTP face: the original system's REST and WebSocket API (port 3000) and the
/// web console, over the same service code, keys, scopes and quotas as gRPC. Plain HTTP: put
/// a TLS-terminating proxy in front of it beyond one machine.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Where it listens, host:port; an empty string turns it off.
    pub listen: String,
    /// How often `/ws/stats` sends the cluster's stats.
    pub stats_interval: Seconds,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:3000".into(),
            stats_interval: Seconds(Duration::from_secs(2)),
        }
    }
}

impl HttpConfig {
    /// The address to listen on, unless turned off.
    pub fn listen(&self) -> Option<&str> {
        Some(self.listen.trim()).filter(|listen| !listen.is_empty())
    }
}

/// A spending limit in USD, per UTC day and per UTC month (0: none), over the cost agents
/// report for tasks and session messages that ended in the period.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct BudgetConfig {
    pub usd_per_day: f64,
    pub usd_per_month: f64,
    /// What happens to running work when the budget is spent: `finish` (it runs to its end;
    /// only new tasks and messages are refused) or `stop` (it is cancelled).
    pub when_spent: WhenSpent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenSpent {
    #[default]
    Finish,
    Stop,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct NotificationsConfig {
    pub webhooks: Vec<WebhookConfig>,
}

/// One receiver of notifications: each is POSTed as JSON, signed with HMAC-SHA256 of the body
/// under `secret` (header `X-ClaudeCluster-Signature: sha256=<hex>`), and retried with back-off.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://` or `https://`.
    pub url: String,
    /// Which events it gets (`task.finished`, `session.replied`, `task.permission_denied`,
    /// `worker.unhealthy`, `budget.reached`); empty: all.
    #[serde(default)]
    pub events: StringList,
    /// The signing secret; unset: bodies are not signed.
    #[serde(default)]
    pub secret: Option<String>,
}

/// Who may call the driver. With no key here and none created (CreateApiKey), the driver takes
/// every caller, and listens on loopback only.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AuthConfig {
    pub api_keys: Vec<ApiKeyConfig>,
    /// What each key may use unless it says otherwise.
    pub quotas: QuotaConfig,
}

/// The scopes a key may hold.
pub const SCOPES: &[&str] = &[
    "tasks:read",
    "tasks:write",
    "sessions",
    "unrestricted",
    "admin",
];

/// A key of a static setup: its id, the hex SHA-256 of the key itself, and its scopes.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApiKeyConfig {
    pub id: String,
    pub sha256: String,
    pub scopes: StringList,
    #[serde(default)]
    pub quotas: Option<QuotaConfig>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct QuotaConfig {
    /// Requests a second, with bursts of as many.
    pub requests_per_second: f64,
    /// Tasks submitted and not yet ended.
    pub running_tasks: u32,
    /// Sessions created and not yet closed.
    pub open_sessions: u32,
    /// What the key may spend in USD per UTC day and per UTC month (0: no limit).
    pub budget_usd_per_day: f64,
    pub budget_usd_per_month: f64,
}

impl Default for QuotaConfig {
    fn default() -> Self {
        QuotaConfig {
            requests_per_second: 1000.0,
            running_tasks: 10_000,
            open_sessions: 64,
            budget_usd_per_day: 0.0,
            budget_usd_per_month: 0.0,
        }
    }
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            listen: "127.0.0.1:50051".into(),
            scheduler_address: "127.0.0.1:50052".into(),
            session_queue_limit: 16,
            max_attempts: 3,
            max_batch_size: 1000,
            max_prompt_bytes: ByteSize(512 << 10),
            data_dir: None,
            store: StoreConfig::default(),
            auth: AuthConfig::default(),
            tls: TlsConfig::default(),
            insecure: false,
            budget: BudgetConfig::default(),
            notifications: NotificationsConfig::default(),
            http: HttpConfig::default(),
        }
    }
}

impl DriverConfig {
    /// The data directory: `dataDir`, or `claudecluster` under `XDG_DATA_HOME` (or
    /// `~/.local/share`).
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(default_data_dir)
    }
}

/// `claudecluster` under the user's data directory.
pub fn default_data_dir() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/share")))
        .unwrap_or_else(std::env::temp_dir)
        .join("claudecluster")
}

/// Where the driver keeps tasks, sessions and event logs, and for how long.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct StoreConfig {
    /// A PostgreSQL URL (`postgres://user:password@host:port/db`) or `sqlite://PATH`; when
    /// unset, SQLite in `dataDir/driver.db`.
    pub url: Option<String>,
    /// Finished tasks keep their event logs this long (a bare number is seconds); after that the
    /// log is compacted away and the task record (status, result, cost) stays.
    pub event_retention: Seconds,
    /// At most this many finished tasks keep their event logs; older ones are compacted first.
    pub event_retention_count: u64,
    /// Connections to the database.
    pub max_connections: u32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            url: None,
            event_retention: Seconds(Duration::from_secs(7 * 24 * 3600)),
            event_retention_count: 10_000,
            max_connections: 8,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct SchedulerConfig {
    pub listen: String,
    /// How often workers send a heartbeat (a bare number is milliseconds).
    pub heartbeat_interval: Millis,
    /// A worker silent this long is unhealthy and gets no new work.
    pub heartbeat_timeout: Millis,
    /// A queued task rises one priority level for every interval it waits (a bare number is
    /// milliseconds): a low-priority task is served as critical after three.
    pub aging_interval: Millis,
    pub tls: TlsConfig,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            listen: "127.0.0.1:50052".into(),
            heartbeat_interval: Millis(Duration::from_secs(1)),
            heartbeat_timeout: Millis(Duration::from_secs(5)),
            aging_interval: Millis(Duration::from_secs(60)),
            tls: TlsConfig::default(),
        }
    }
}

/// How a worker runs agents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecutionModeSetting {
    #[default]
    ProcessPool,
    ContainerAgentic,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Address the WorkerService listens on.
    pub listen: String,
    /// Address the driver uses to reach this worker; defaults to the address bound.
    pub advertise_address: Option<String>,
    /// The scheduler, as host:port.
    pub scheduler_address: String,
    /// Stable name of this worker; a random one is made when unset.
    pub worker_id: Option<String>,
    /// Labels that tasks can select this worker by.
    pub labels: BTreeMap<String, String>,
    /// Concurrent tasks; defaults to `processPool.maxProcesses` or `container.maxContainers`.
    pub max_concurrent_tasks: Option<u32>,
    pub execution_mode: ExecutionModeSetting,
    pub feature_flags: FeatureFlags,
    pub process_pool: ProcessPoolConfig,
    pub container: ContainerConfig,
    pub agent: AgentConfig,
    /// Where task workspaces are made; defaults to a `claudecluster/workspaces` directory
    /// under the user's data directory.
    pub workspace_root: Option<PathBuf>,
    /// A run whose driver went away keeps running this long (a bare number is seconds) for a
    /// driver to attach again; then it is stopped.
    pub driver_loss_timeout: Seconds,
    /// A run that ended is kept this long (a bare number is seconds), with its events, for a
    /// driver that restarted to collect.
    pub run_retention: Seconds,
    /// On SIGTERM, running work may finish for this long (a bare number is seconds); then it is
    /// stopped.
    pub shutdown_grace: Seconds,
    /// A task's `repo_url` must be cloned within this long (a bare number is seconds).
    pub clone_timeout: Seconds,
    /// The `repo_url` schemes this worker clones: `https`, `ssh` (also `user@host:path`),
    /// `http`, `git`, `file` (also absolute paths).
    pub allowed_repo_schemes: StringList,
    /// The largest limits and budgets a task may ask of this worker.
    pub max_task_limits: MaxTaskLimits,
    pub tls: TlsConfig,
    pub credential_proxy: CredentialProxyConfig,
    /// Container mode on Kubernetes (`container.orchestrator: kubernetes`).
    pub kubernetes: KubernetesConfig,
    /// A task's workspace is removed this long after the task ended (a bare number is
    /// seconds, `7d` is a week); `0` keeps it until the task is deleted.
    pub workspace_retention: Seconds,
    /// With less free space than this on the workspace root's filesystem, the worker takes no
    /// new work and says why, rather than fail a task midway.
    pub min_free_disk: ByteSize,
    /// Bounds on what clients fetch of workspaces.
    pub results: ResultsConfig,
    /// How a task's changes are pushed as a branch and proposed as a pull request
    /// (`result.branch` of a task).
    pub publish: PublishConfig,
}

/// Bounds on downloads and diffs of workspaces.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ResultsConfig {
    /// The most file content one download may carry.
    pub max_download_bytes: ByteSize,
    /// A diff longer than this is cut there (and says so).
    pub max_diff_bytes: ByteSize,
}

impl Default for ResultsConfig {
    fn default() -> Self {
        ResultsConfig {
            max_download_bytes: ByteSize(1 << 30),
            max_diff_bytes: ByteSize(2 << 20),
        }
    }
}

/// The worker's credential for pushing branches and opening pull requests. The agent never
/// sees it: the worker pushes after the agent has ended.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct PublishConfig {
    /// A token for HTTPS pushes (as the password) and for the forge's REST API.
    pub token: Option<String>,
    /// A file holding the token, read at each push.
    pub token_file: Option<PathBuf>,
    /// The user name presented with the token on pushes.
    pub username: String,
    /// The forge's REST API: GitHub's, or a GitHub Enterprise or compatible one
    /// (`https://github.example.com/api/v3`).
    pub api_url: String,
    /// The author and committer of result commits.
    pub author_name: String,
    pub author_email: String,
}

impl Default for PublishConfig {
    fn default() -> Self {
        PublishConfig {
            token: None,
            token_file: None,
            username: "x-access-token".into(),
            api_url: "https://api.github.com".into(),
            author_name: "ClaudeCluster".into(),
            author_email: "claudecluster@localhost".into(),
        }
    }
}

/// The worker's credential proxy: agents get a token of their own and the proxy's address; the
/// real credentials stay with the worker.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct CredentialProxyConfig {
    /// Off, agents get the worker's credentials themselves (as `agent.passEnv` passes them).
    pub enabled: bool,
    /// Where the proxy listens; by default a free port on every address, where containers
    /// reach it at their network's gateway (its tokens guard it).
    pub listen: Option<String>,
    /// Where requests go; defaults to the worker's `ANTHROPIC_BASE_URL`, else Anthropic's API.
    pub upstream: Option<String>,
    /// API keys (`x-api-key`), used in turn; the worker's `ANTHROPIC_API_KEY` when none.
    pub api_keys: StringList,
    /// Auth or Claude subscription tokens (`authorization: Bearer`); the worker's
    /// `ANTHROPIC_AUTH_TOKEN` and `CLAUDE_CODE_OAUTH_TOKEN` when none.
    pub auth_tokens: StringList,
    /// Files holding one credential each (an API key unless it starts with `bearer:`).
    pub credential_files: Vec<PathBuf>,
    /// A credential the upstream answered 429 or 529 rests this long (a bare number is
    /// seconds).
    pub cool_down: Seconds,
    /// Dollars per million tokens, by model name prefix (the longest that matches), for the
    /// proxy's count of what a run spent; models matching none are priced as `default`.
    pub prices: BTreeMap<String, ModelPrice>,
}

/// Dollars per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ModelPrice {
    pub input: f64,
    pub output: f64,
    pub cache_write: f64,
    pub cache_read: f64,
}

/// Anthropic's list prices (dollars per million tokens) as of this release.
pub fn default_prices() -> BTreeMap<String, ModelPrice> {
    let price = |input: f64, output: f64| ModelPrice {
        input,
        output,
        cache_write: input * 1.25,
        cache_read: input * 0.1,
    };
    BTreeMap::from([
        ("claude-opus".to_owned(), price(15.0, 75.0)),
        ("claude-sonnet".to_owned(), price(3.0, 15.0)),
        ("claude-haiku".to_owned(), price(1.0, 5.0)),
        ("default".to_owned(), price(15.0, 75.0)),
    ])
}

impl Default for CredentialProxyConfig {
    fn default() -> Self {
        CredentialProxyConfig {
            enabled: true,
            listen: None,
            upstream: None,
            api_keys: StringList::default(),
            auth_tokens: StringList::default(),
            credential_files: Vec::new(),
            cool_down: Seconds(Duration::from_secs(60)),
            prices: default_prices(),
        }
    }
}

/// Every `repo_url` scheme `worker.allowedRepoSchemes` may list.
pub const REPO_SCHEMES: &[&str] = &["https", "ssh", "http", "git", "file"];

/// The most a task may ask of a worker; more is refused with INVALID_ARGUMENT naming the field.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct MaxTaskLimits {
    pub memory: ByteSize,
    /// CPU cores.
    pub cpu: f64,
    pub pids: u32,
    /// Wall-clock limit of a task, and of a session's message (a bare number is seconds).
    pub timeout: Seconds,
    /// `agent.max_budget_usd`.
    pub budget_usd: f64,
    /// `agent.max_turns`.
    pub turns: u32,
}

impl Default for MaxTaskLimits {
    fn default() -> Self {
        MaxTaskLimits {
            memory: ByteSize(16 << 30),
            cpu: 16.0,
            pids: 32_768,
            timeout: Seconds(Duration::from_secs(24 * 3600)),
            budget_usd: 1000.0,
            turns: 10_000,
        }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            listen: "127.0.0.1:50053".into(),
            advertise_address: None,
            scheduler_address: "127.0.0.1:50052".into(),
            worker_id: None,
            labels: BTreeMap::new(),
            max_concurrent_tasks: None,
            execution_mode: ExecutionModeSetting::default(),
            feature_flags: FeatureFlags::default(),
            process_pool: ProcessPoolConfig::default(),
            container: ContainerConfig::default(),
            agent: AgentConfig::default(),
            workspace_root: None,
            driver_loss_timeout: Seconds(Duration::from_secs(300)),
            run_retention: Seconds(Duration::from_secs(600)),
            shutdown_grace: Seconds(Duration::from_secs(30)),
            clone_timeout: Seconds(Duration::from_secs(300)),
            allowed_repo_schemes: StringList(vec!["https".into(), "ssh".into()]),
            max_task_limits: MaxTaskLimits::default(),
            tls: TlsConfig::default(),
            credential_proxy: CredentialProxyConfig::default(),
            kubernetes: KubernetesConfig::default(),
            workspace_retention: Seconds(Duration::from_secs(7 * 24 * 3600)),
            min_free_disk: ByteSize(1 << 30),
            results: ResultsConfig::default(),
            publish: PublishConfig::default(),
        }
    }
}

impl WorkerConfig {
    /// The mode of tasks that ask for none: `featureFlags.defaultExecutionMode` when set,
    /// otherwise `executionMode`.
    pub fn default_mode(&self) -> ExecutionModeSetting {
        self.feature_flags
            .default_execution_mode
            .unwrap_or(self.execution_mode)
    }

    /// Every mode this worker runs, the default first. With `featureFlags.allowModeOverride`
    /// a task may pick the other mode too: process pool always, container mode only with
    /// `featureFlags.enableContainerMode`.
    pub fn modes(&self) -> Vec<ExecutionModeSetting> {
        let default = self.default_mode();
        let mut modes = vec![default];
        let flags = &self.feature_flags;
        if flags.allow_mode_override {
            match default {
                ExecutionModeSetting::ContainerAgentic => {
                    modes.push(ExecutionModeSetting::ProcessPool)
                }
                ExecutionModeSetting::ProcessPool if flags.enable_container_mode => {
                    modes.push(ExecutionModeSetting::ContainerAgentic)
                }
                ExecutionModeSetting::ProcessPool => {}
            }
        }
        modes
    }

    /// Tasks this worker runs at once.
    pub fn capacity(&self) -> u32 {
        self.max_concurrent_tasks
            .unwrap_or(match self.default_mode() {
                ExecutionModeSetting::ProcessPool => self.process_pool.max_processes,
                ExecutionModeSetting::ContainerAgentic => self.container.max_containers,
            })
    }

    /// The wall-clock limit of a task in `mode` that sets none.
    pub fn default_task_timeout(&self, mode: ExecutionModeSetting) -> Duration {
        match mode {
            ExecutionModeSetting::ProcessPool => self.process_pool.process_timeout.get(),
            ExecutionModeSetting::ContainerAgentic => self.container.resource_limits.timeout.get(),
        }
    }
}

/// The seed's feature flags.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct FeatureFlags {
    pub enable_container_mode: bool,
    pub default_execution_mode: Option<ExecutionModeSetting>,
    /// Whether tasks may ask for the worker's other execution mode (see [`WorkerConfig::modes`]).
    pub allow_mode_override: bool,
    pub container_providers: StringList,
}

impl Default for FeatureFlags {
    fn default() -> Self {
        FeatureFlags {
            enable_container_mode: false,
            default_execution_mode: None,
            allow_mode_override: false,
            container_providers: StringList(vec!["docker".into()]),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ProcessPoolConfig {
    /// Concurrent `claude` processes.
    pub max_processes: u32,
    /// Wall-clock limit of a task that sets none (a bare number is milliseconds).
    pub process_timeout: Millis,
    /// The `claude` executable: a path, or a name looked up on PATH.
    pub claude_code_path: String,
    /// Agents kept started and waiting for a task (0: none).
    pub warm_pool_size: u32,
    /// Run each agent as a uid of its own from this range (the worker must run as root), so
    /// that agents can read neither the worker's files nor each other's.
    pub run_as: Option<RunAs>,
}

/// `count` uids from `uid` on, their groups of the same numbers.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RunAs {
    pub uid: u32,
    pub count: u32,
}

impl Default for ProcessPoolConfig {
    fn default() -> Self {
        ProcessPoolConfig {
            max_processes: 4,
            process_timeout: Millis(Duration::from_secs(3600)),
            claude_code_path: "claude".into(),
            warm_pool_size: 0,
            run_as: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ContainerConfig {
    /// Only `docker` is implemented.
    pub orchestrator: String,
    pub image: String,
    pub registry: Option<String>,
    /// Concurrent containers.
    pub max_containers: u32,
    pub resource_limits: ContainerLimits,
    /// `bridge` (Docker's default), `host`, `none`, `per_task` (a network of its own for each
    /// task, removed with it), or the name of an existing network.
    pub network: String,
    /// The user agents run as in the container (never root).
    pub user: String,
    /// The Docker socket: a path or `unix://` URL; defaults to `DOCKER_HOST` or
    /// `/var/run/docker.sock`.
    pub docker_host: Option<String>,
    /// Containers kept started, with their agent booted and waiting for a task (0: none).
    pub warm_pool_size: u32,
    /// A Docker runtime other than the default, such as `runsc` (gVisor).
    pub runtime: Option<String>,
    /// What agent containers may reach.
    pub egress: Egress,
    /// Hosts agents may reach through the worker's proxy (HTTP CONNECT), for package
    /// registries and git hosts; `.example.com` allows every host under it.
    pub egress_allow: StringList,
    /// A network namespace kept for agent containers (`egress: proxy-only`) that no agent
    /// used for this long is removed (a bare number is seconds).
    pub namespace_idle_timeout: Seconds,
}

/// What an agent container may reach over the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Egress {
    /// No network but the worker's credential proxy, through its Unix socket.
    #[default]
    ProxyOnly,
    /// No network at all (the agent cannot reach the API either).
    None,
    /// `container.network` decides, as Docker does.
    Open,
}

impl Default for ContainerConfig {
    fn default() -> Self {
        ContainerConfig {
            orchestrator: "docker".into(),
            image: "claudecluster/agent:latest".into(),
            registry: None,
            max_containers: 4,
            resource_limits: ContainerLimits::default(),
            network: "bridge".into(),
            user: "1000:1000".into(),
            docker_host: None,
            warm_pool_size: 0,
            runtime: None,
            egress: Egress::default(),
            egress_allow: StringList::default(),
            namespace_idle_timeout: Seconds(Duration::from_secs(300)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ContainerLimits {
    pub memory: ByteSize,
    /// CPU cores.
    pub cpu: f64,
    /// Wall-clock limit of a task that sets none (a bare number is seconds).
    pub timeout: Seconds,
    pub pids: u32,
}

impl Default for ContainerLimits {
    fn default() -> Self {
        ContainerLimits {
            memory: ByteSize(2 << 30),
            cpu: 1.0,
            timeout: Seconds(Duration::from_secs(3600)),
            pids: 512,
        }
    }
}

/// How agents are started and watched, whatever the execution mode.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AgentConfig {
    /// An agent that prints nothing for this long is killed and its task fails (a bare number
    /// is seconds).
    pub idle_timeout: Seconds,
    /// After SIGINT, how long an agent has to stop before it is killed.
    pub cancel_grace_period: Seconds,
    /// A session without a message for this long has its container stopped (its workspace
    /// and conversation are kept) unless the session sets its own.
    pub session_idle_timeout: Seconds,
    /// Defaults for tasks that set no agent options.
    pub model: Option<String>,
    pub permission_mode: Option<String>,
    pub allowed_tools: StringList,
    pub disallowed_tools: StringList,
    pub append_system_prompt: Option<String>,
    /// Prefixes of the worker's environment variables passed to agents.
    pub pass_env: StringList,
    /// Variables set for every agent, after the passed ones.
    pub env: BTreeMap<String, String>,
    /// When set, a task's `environment` may name only these variables (on top of the rules
    /// every worker applies).
    pub allowed_task_env: Option<StringList>,
    /// What agents of this worker may be let do.
    pub permits: Permits,
    /// An output line longer than this is cut, with a marker, so that no event outgrows what
    /// the services' links carry.
    pub max_line_bytes: ByteSize,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            idle_timeout: Seconds(Duration::from_secs(600)),
            cancel_grace_period: Seconds(Duration::from_secs(5)),
            session_idle_timeout: Seconds(Duration::from_secs(600)),
            model: None,
            permission_mode: None,
            allowed_tools: StringList::default(),
            disallowed_tools: StringList::default(),
            append_system_prompt: None,
            pass_env: StringList(vec!["ANTHROPIC_".into(), "CLAUDE_CODE_".into()]),
            env: BTreeMap::new(),
            allowed_task_env: None,
            permits: Permits::default(),
            max_line_bytes: ByteSize(1 << 20),
        }
    }
}

/// What a task may let its agent do on this worker.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Permits {
    /// `permission_mode: bypassPermissions`: the agent asks for nothing.
    pub bypass_permissions: bool,
    /// `Bash` with no pattern in `allowed_tools`: any command.
    pub unrestricted_bash: bool,
}

impl Default for Permits {
    fn default() -> Self {
        Permits {
            bypass_permissions: false,
            unrestricted_bash: true,
        }
    }
}

/// A problem found by [`ClusterConfig::validate`]: the key (dotted, from the root) and what is
/// wrong with it.
pub(crate) struct Violation {
    pub key: &'static str,
    pub message: String,
}

impl ClusterConfig {
    pub(crate) fn violations(&self) -> Vec<Violation> {
        let mut found = Vec::new();
        let mut check = |ok: bool, key: &'static str, message: &str| {
            if !ok {
                found.push(Violation {
                    key,
                    message: message.to_owned(),
                });
            }
        };
        let addresses = [
            ("driver.listen", &self.driver.listen),
            ("driver.schedulerAddress", &self.driver.scheduler_address),
            ("scheduler.listen", &self.scheduler.listen),
            ("worker.listen", &self.worker.listen),
            ("worker.schedulerAddress", &self.worker.scheduler_address),
            ("mcp.listen", &self.mcp.listen),
            ("mcp.driverAddress", &self.mcp.driver_address),
        ];
        for (key, address) in addresses {
            check(
                is_host_port(address),
                key,
                &format!("`{address}` is not an address of the form host:port"),
            );
        }
        if let Some(listen) = self.driver.http.listen() {
            check(
                is_host_port(listen),
                "driver.http.listen",
                &format!(
                    "`{listen}` is not an address of the form host:port (an empty string turns HTTP off)"
                ),
            );
        }
        check(
            !self.driver.http.stats_interval.get().is_zero(),
            "driver.http.statsInterval",
            "must be longer than zero",
        );
        check(
            self.driver.store.max_connections >= 1,
            "driver.store.maxConnections",
            "must be at least 1",
        );
        if let Some(url) = &self.driver.store.url {
            check(
                ["postgres://", "postgresql://", "sqlite://", "sqlite:"]
                    .iter()
                    .any(|scheme| url.starts_with(scheme)),
                "driver.store.url",
                "must start with postgres://, postgresql:// or sqlite://",
            );
        }
        check(
            (1024..=(2 << 20)).contains(&self.worker.agent.max_line_bytes.0),
            "worker.agent.maxLineBytes",
            "must be from 1KiB to 2MiB: a longer line would not fit in a message between services",
        );
        check(
            !self.worker.clone_timeout.get().is_zero(),
            "worker.cloneTimeout",
            "must be longer than zero",
        );
        check(
            !self.worker.driver_loss_timeout.get().is_zero(),
            "worker.driverLossTimeout",
            "must be longer than zero",
        );
        check(
            (1..=(1 << 20)).contains(&self.driver.max_prompt_bytes.0),
            "driver.maxPromptBytes",
            "must be from 1 byte to 1MiB: a longer prompt would not fit in a message between services",
        );
        // The variable holding the cluster secret must never reach an agent.
        let leaking = self
            .worker
            .agent
            .pass_env
            .0
            .iter()
            .find(|prefix| "CLAUDECLUSTER_CLUSTER_SECRET".starts_with(prefix.as_str()));
        check(
            leaking.is_none(),
            "worker.agent.passEnv",
            &format!(
                "`{}` would pass CLAUDECLUSTER_CLUSTER_SECRET to agents",
                leaking.map(String::as_str).unwrap_or_default()
            ),
        );
        if let Some(run_as) = &self.worker.process_pool.run_as {
            check(
                run_as.uid > 0,
                "worker.processPool.runAs.uid",
                "must not be root's (0)",
            );
            check(
                run_as.count >= self.worker.capacity() + self.worker.process_pool.warm_pool_size,
                "worker.processPool.runAs.count",
                "must cover every agent at once: the worker's capacity and its warm pool",
            );
        }
        let mut key_ids = std::collections::HashSet::new();
        for key in &self.driver.auth.api_keys {
            let valid_id = (1..=64).contains(&key.id.len())
                && key
                    .id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            check(
                valid_id,
                "driver.auth.apiKeys.id",
                &format!("`{}` must be 1 to 64 letters, digits, '-' or '_'", key.id),
            );
            check(
                key_ids.insert(key.id.as_str()),
                "driver.auth.apiKeys.id",
                &format!("`{}` names two keys", key.id),
            );
            check(
                key.sha256.len() == 64
                    && key
                        .sha256
                        .chars()
                        .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)),
                "driver.auth.apiKeys.sha256",
                &format!(
                    "of key `{}` must be the 64 lowercase hex digits of the key's SHA-256 (`printf %s KEY | sha256sum`)",
                    key.id
                ),
            );
            let unknown = key
                .scopes
                .0
                .iter()
                .find(|scope| !SCOPES.contains(&scope.as_str()));
            check(
                unknown.is_none() && !key.scopes.0.is_empty(),
                "driver.auth.apiKeys.scopes",
                &format!(
                    "of key `{}` must list some of {}{}",
                    key.id,
                    SCOPES.join(", "),
                    unknown
                        .map(|scope| format!("; `{scope}` is not one"))
                        .unwrap_or_default()
                ),
            );
        }
        for (key, quotas) in std::iter::once(("driver.auth.quotas", &self.driver.auth.quotas))
            .chain(self.driver.auth.api_keys.iter().filter_map(|key| {
                key.quotas
                    .as_ref()
                    .map(|q| ("driver.auth.apiKeys.quotas", q))
            }))
        {
            check(
                quotas.requests_per_second.is_finite() && quotas.requests_per_second > 0.0,
                key,
                "requestsPerSecond must be above zero",
            );
        }
        let unknown_scheme = self
            .worker
            .allowed_repo_schemes
            .0
            .iter()
            .find(|scheme| !REPO_SCHEMES.contains(&scheme.as_str()));
        check(
            unknown_scheme.is_none(),
            "worker.allowedRepoSchemes",
            &format!(
                "`{}` is not a scheme; use {}",
                unknown_scheme.map(String::as_str).unwrap_or_default(),
                REPO_SCHEMES.join(", ")
            ),
        );
        // The id names the worker's containers, labels and files, and the scheduler takes no
        // other.
        check(
            self.worker.worker_id.as_deref().is_none_or(|id| {
                (1..=128).contains(&id.len())
                    && id
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            }),
            "worker.workerId",
            "must be 1 to 128 letters, digits, '-', '_' or '.'",
        );
        let max = &self.worker.max_task_limits;
        let limits = &self.worker.container.resource_limits;
        check(
            max.cpu.is_finite() && max.cpu > 0.0,
            "worker.maxTaskLimits.cpu",
            "must be a number of cores above zero",
        );
        check(
            max.budget_usd.is_finite() && max.budget_usd >= 0.0,
            "worker.maxTaskLimits.budgetUsd",
            "must be zero or more",
        );
        check(
            limits.memory.0 <= max.memory.0,
            "worker.container.resourceLimits.memory",
            "must not be more than worker.maxTaskLimits.memory",
        );
        // NaN is left to the check of the value itself, below.
        check(
            limits.cpu.is_nan() || limits.cpu <= max.cpu,
            "worker.container.resourceLimits.cpu",
            "must not be more than worker.maxTaskLimits.cpu",
        );
        check(
            limits.pids <= max.pids,
            "worker.container.resourceLimits.pids",
            "must not be more than worker.maxTaskLimits.pids",
        );
        check(
            limits.timeout.get() <= max.timeout.get()
                && self.worker.process_pool.process_timeout.get() <= max.timeout.get(),
            "worker.maxTaskLimits.timeout",
            "must not be less than worker.container.resourceLimits.timeout or worker.processPool.processTimeout",
        );
        check(
            self.driver.max_batch_size >= 1,
            "driver.maxBatchSize",
            "must be at least 1",
        );
        check(
            self.driver.max_attempts >= 1,
            "driver.maxAttempts",
            "must be at least 1",
        );
        let worker = &self.worker;
        check(
            worker.process_pool.max_processes >= 1,
            "worker.processPool.maxProcesses",
            "must be at least 1",
        );
        check(
            worker.container.max_containers >= 1,
            "worker.container.maxContainers",
            "must be at least 1",
        );
        check(
            worker.max_concurrent_tasks != Some(0),
            "worker.maxConcurrentTasks",
            "must be at least 1",
        );
        check(
            !worker.process_pool.claude_code_path.trim().is_empty(),
            "worker.processPool.claudeCodePath",
            "must name the claude executable",
        );
        check(
            matches!(
                worker.container.orchestrator.as_str(),
                "docker" | "kubernetes"
            ),
            "worker.container.orchestrator",
            &format!(
                "`{}` is not supported: `docker` or `kubernetes`",
                worker.container.orchestrator
            ),
        );
        check(
            !worker.container.image.trim().is_empty(),
            "worker.container.image",
            "must name the agent image",
        );
        check(
            !matches!(
                worker.container.user.trim(),
                "" | "0" | "root" | "0:0" | "root:root"
            ),
            "worker.container.user",
            "must be a non-root user, such as 1000:1000",
        );
        check(
            !worker.container.network.trim().is_empty(),
            "worker.container.network",
            "must be bridge, host, none, per_task or a network name",
        );
        check(
            worker.container.resource_limits.cpu.is_finite()
                && worker.container.resource_limits.cpu >= 0.0,
            "worker.container.resourceLimits.cpu",
            "must be a number of cores, zero or more",
        );
        check(
            !worker.agent.idle_timeout.get().is_zero(),
            "worker.agent.idleTimeout",
            "must be longer than zero",
        );
        check(
            !worker.container.namespace_idle_timeout.get().is_zero(),
            "worker.container.namespaceIdleTimeout",
            "must be longer than zero",
        );
        check(
            self.scheduler.heartbeat_timeout.get() > self.scheduler.heartbeat_interval.get(),
            "scheduler.heartbeatTimeout",
            "must be longer than scheduler.heartbeatInterval",
        );
        found
    }
}

fn is_host_port(address: &str) -> bool {
    match address.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok(),
        None => false,
    }
}
