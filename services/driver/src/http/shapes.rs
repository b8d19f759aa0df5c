//! The original ClaudeCluster's JSON shapes, mapped to and from the driver's messages. Field
//! names and enum values are the original's; what the original did not have (cost, tokens,
//! sequence numbers, ...) comes as extra fields.

use std::collections::{BTreeMap, HashMap};

use claudecluster_proto::v1::event::Kind;
use claudecluster_proto::v1::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::ApiError;

/// Labels the HTTP face keeps its mapping in: the client's own task id, the title and the
/// category given, which the driver's task has no field for.
pub const ID_LABEL: &str = "http.id";
pub const TITLE_LABEL: &str = "http.title";
pub const CATEGORY_LABEL: &str = "http.category";
/// The longest title derived from a prompt's first line.
const TITLE_CHARS: usize = 80;

pub const CATEGORIES: &[&str] = &[
    "coding",
    "analysis",
    "refactoring",
    "testing",
    "documentation",
];

/// Every refusal: the HTTP status's reason and what was wrong.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// The HTTP status's reason phrase, e.g. `Not Found`.
    pub error: String,
    pub message: String,
}

/// A task as the original API took it: its text (the prompt), or a task object.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum TaskInput {
    Text(String),
    Object(TaskObject),
}

/// No text: a base that a batch's own tasks fill in (a body without `task` is still refused).
impl Default for TaskInput {
    fn default() -> Self {
        TaskInput::Text(String::new())
    }
}

/// The original task object. Fields it had that a submission does not use (`status`,
/// `createdAt`, ...) are ignored.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskObject {
    /// The client's own id: the task is found by it too, and submitting it again returns the
    /// existing task. Letters, digits, `-` and `_`.
    pub id: Option<String>,
    pub title: Option<String>,
    /// The prompt; with a title too, the prompt is the title, a blank line and this.
    pub description: Option<String>,
    /// `coding` (default), `analysis`, `refactoring`, `testing` or `documentation`.
    pub category: Option<String>,
    pub priority: Option<String>,
    /// Ids of tasks that must complete first (in a batch, also ids of the batch's tasks).
    #[serde(default)]
    pub dependencies: Vec<String>,
    #[schema(value_type = Object)]
    pub metadata: Option<serde_json::Map<String, Value>>,
}

/// `POST /tasks`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SubmitBody {
    pub task: TaskInput,
    /// `critical`, `high`, `normal` (default), `low` or `background` (kept as low); `medium`
    /// is normal.
    pub priority: Option<String>,
    /// Wall-clock limit in milliseconds, as the original took it (rounded up to seconds).
    pub timeout: Option<u64>,
    /// Kept as the task's labels: strings, numbers and booleans (as text); nested values are
    /// refused.
    #[schema(value_type = Object)]
    pub metadata: Option<serde_json::Map<String, Value>>,
    /// Ours: a git repository cloned into the workspace.
    pub repo_url: Option<String>,
    /// Ours: the model the agent runs.
    pub model: Option<String>,
    /// Ours: tools the agent may use without asking (`Bash`, `Write`, `Bash(git:*)`, ...).
    #[serde(default)]
    pub allowed_tools: Vec<String>,
    /// Ours: `process_pool` or `container_agentic`; any when unset.
    pub execution_mode: Option<String>,
}

/// `POST /tasks` answers 202 with this.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Submitted {
    pub message: String,
    /// The id to ask for the task by: the client's, when it gave one.
    pub task_id: String,
    /// `pending`.
    pub status: String,
    /// Ours: the task as accepted.
    pub task: TaskJson,
}

/// `POST /tasks/batch`. All or none: one task the driver refuses refuses the batch.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchBody {
    pub tasks: Vec<TaskInput>,
    /// `false` runs the tasks one after another, in order (each depends on the one before);
    /// `true` (default) lets them run side by side, after their own dependencies.
    pub parallel: Option<bool>,
    /// For the tasks that name none.
    pub priority: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchResult {
    pub task_id: String,
    pub status: String,
}

/// `POST /tasks/batch` answers 202 with this.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchSubmitted {
    pub message: String,
    /// In the order of the request.
    pub results: Vec<BatchResult>,
    /// Ours: the tasks as accepted.
    pub tasks: Vec<TaskJson>,
}

/// What the agent's run came to.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskResultJson {
    /// The agent's final text.
    pub output: String,
    /// Why it failed or was cancelled.
    pub error: Option<String>,
    /// 0 when the task completed, 1 when it failed or was cancelled.
    pub exit_code: Option<i32>,
    pub started_at: Option<String>,
    pub completed_at: Option<String>,
    /// Ours.
    pub cost_usd: f64,
    pub tokens: Option<TokensJson>,
    pub num_turns: u32,
    pub duration_ms: u64,
    /// `success`, `error_during_execution`, `error_max_turns`, ...
    pub subtype: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokensJson {
    pub input: u64,
    pub output: u64,
    pub cache_creation_input: u64,
    pub cache_read_input: u64,
}

/// A task in the original's field names, and ours beside them.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskJson {
    /// The client's id when it gave one, else the driver's.
    pub id: String,
    /// The title given, else the prompt's first line (cut).
    pub title: String,
    /// The prompt.
    pub description: String,
    pub category: String,
    /// `critical`, `high`, `normal` or `low`.
    pub priority: String,
    /// `pending` (also while placed on a worker), `running`, `completed`, `failed`,
    /// `cancelled`.
    pub status: String,
    pub dependencies: Vec<String>,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
    pub assigned_worker_id: Option<String>,
    /// Once the task ended.
    pub result: Option<TaskResultJson>,
    /// The task's labels, less the HTTP face's own.
    pub metadata: BTreeMap<String, String>,
    /// Ours: the driver's id of the task (what gRPC clients use).
    pub cluster_task_id: String,
    /// Ours: the driver's status, with `assigned`.
    pub cluster_status: String,
    pub status_reason: String,
    pub attempt: u32,
    pub cost_usd: f64,
    pub tokens: Option<TokensJson>,
    /// The sequence number of the task's latest event.
    pub last_sequence: u64,
    pub model: String,
    pub last_tool: String,
    pub repo_url: String,
    /// The wall-clock limit in milliseconds; 0 is the worker's default.
    pub timeout: u64,
    /// The key that submitted it.
    pub owner: String,
    /// Long fields were cut to fit a list; `GET /tasks/{taskId}` has them whole.
    pub shortened: bool,
}

/// `GET /tasks/{taskId}`: the task, and the original status answer's fields beside it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskStatusJson {
    #[serde(flatten)]
    pub task: TaskJson,
    pub task_id: String,
    /// 0 until the task ended, then 100: an agent's progress cannot be known ahead.
    pub progress: u32,
    pub start_time: Option<String>,
    pub current_step: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskSummary {
    pub total: u64,
    pub running: u64,
    pub completed: u64,
    pub failed: u64,
    pub queued: u64,
    pub cancelled: u64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunningTask {
    pub task_id: String,
    pub worker_id: String,
    pub status: String,
    pub progress: u32,
    pub start_time: Option<String>,
}

/// `GET /tasks`: the original's summary and running tasks, and the tasks themselves.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskList {
    pub summary: TaskSummary,
    /// The running tasks of this page.
    pub running_tasks: Vec<RunningTask>,
    /// Ours: a page of tasks, oldest first.
    pub tasks: Vec<TaskJson>,
    /// Ours: pass as `pageToken` for the next page; empty on the last.
    pub next_page_token: String,
}

/// `GET /tasks/{taskId}/progress`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProgressJson {
    pub task_id: String,
    pub status: String,
    /// 0 until the task ended, then 100.
    pub progress: u32,
    pub start_time: Option<String>,
    /// What the agent did last, in words.
    pub current_step: String,
    /// Ours: events so far (the latest's sequence number), and the latest.
    pub events: u64,
    pub last_event: Option<EventJson>,
    pub cost_usd: f64,
}

/// One entry of a task's or a session's event log.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventJson {
    /// From 1, without gaps: resume after it with `?after=`.
    pub sequence: u64,
    pub time: Option<String>,
    /// `status`, `init`, `text`, `toolUse`, `toolResult`, `retry`, `permissionDenied`,
    /// `result`, `output`, `sessionState` or `other`.
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub turn: Option<u32>,
    /// The text of `text`, the line of `output`, the content of `toolResult`, the final text
    /// of `result`, the message of `permissionDenied` or `retry`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// `status`: the task's, by the driver's names (`assigned` too); `sessionState`: the
    /// session's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<String>,
    /// `toolUse`, `permissionDenied`: the tool.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_use_id: Option<String>,
    /// `toolUse`: the tool's input as JSON text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub is_error: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thinking: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    /// `output`: `stdout` or `stderr`; `result`, `other`: the subtype.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subtype: Option<String>,
    /// In `progress` frames, the original's progress fields: 0, or 100 with the final status.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<u32>,
    /// In `progress` frames: what the agent did, in words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_step: Option<String>,
}

/// A WebSocket frame: `progress` (data: an event), `completed` (data: the result),
/// `failed` (data: the result, with `status` `failed` or `cancelled`), `stats` (data: the
/// stats), `error` (data: `{error, message}`).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Frame {
    #[serde(rename = "type")]
    pub kind: String,
    #[schema(value_type = Object)]
    pub data: Value,
}

/// What `completed` and `failed` frames carry.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Outcome {
    pub task_id: String,
    /// `completed`, `failed` or `cancelled`.
    pub status: String,
    pub error: Option<String>,
    pub result: Option<TaskResultJson>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerHealthJson {
    /// `healthy` or `unhealthy`.
    pub status: String,
    pub healthy: bool,
    pub reason: String,
    pub last_heartbeat: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CapabilitiesJson {
    /// Every mode it runs tasks in, the default first.
    pub modes: Vec<String>,
    pub max_concurrent_tasks: u32,
    pub labels: BTreeMap<String, String>,
}

/// A worker in the original's field names, and ours beside them.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerJson {
    pub id: String,
    pub name: String,
    /// `idle`, `busy` (full), `draining`, `offline` (drained) or `error` (unhealthy).
    pub status: String,
    pub endpoint: String,
    pub capabilities: CapabilitiesJson,
    pub health: WorkerHealthJson,
    /// Tasks placed on it.
    pub current_tasks: u32,
    /// Ours.
    pub mode: String,
    pub capacity: u32,
    pub load: u32,
    pub draining: bool,
    pub drained: bool,
    pub idle_warm_agents: u32,
    pub version: String,
    pub last_seen: Option<String>,
}

/// `GET /workers`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WorkerList {
    pub workers: Vec<WorkerJson>,
}

/// `GET /workers/{workerId}/health`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerHealthAnswer {
    pub worker_id: String,
    pub health: WorkerHealthJson,
    pub status: String,
    pub last_seen: Option<String>,
}

/// `GET /stats` and the `stats` frames: the original's counters, and ours.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StatsJson {
    pub total_tasks: u64,
    pub pending_tasks: u64,
    pub running_tasks: u64,
    pub completed_tasks: u64,
    pub failed_tasks: u64,
    pub cancelled_tasks: u64,
    /// Waiting in the scheduler's queue.
    pub queued_tasks: u64,
    pub total_workers: u64,
    /// Healthy and not draining.
    pub active_workers: u64,
    pub healthy_workers: u64,
    /// Milliseconds since this driver started.
    pub uptime: u64,
    pub timestamp: String,
    /// Ours.
    pub version: String,
    /// By the driver's status names (`assigned` apart from `pending`).
    pub tasks_by_status: BTreeMap<String, u64>,
    /// `low`, `normal`, `high`, `critical`.
    pub queued_by_priority: BTreeMap<String, u64>,
    pub workers: Vec<WorkerJson>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerCounts {
    pub total: u64,
    pub active: u64,
    pub healthy: u64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DriverHealthJson {
    pub id: String,
    /// `running`, or `standby`.
    pub status: String,
}

/// `GET /health`: 200 when this driver leads and reaches its scheduler, else 503.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthJson {
    /// `healthy` or `unhealthy`.
    pub status: String,
    pub timestamp: String,
    /// Milliseconds since this driver started.
    pub uptime: u64,
    pub version: String,
    pub driver: DriverHealthJson,
    pub workers: WorkerCounts,
    /// Why it is unhealthy.
    pub reason: Option<String>,
}

/// `GET /health/ready`: 200 when it takes tasks (leads, reaches its scheduler), else 503.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ReadyJson {
    pub ready: bool,
    /// Healthy workers.
    pub workers: u64,
    pub timestamp: String,
}

/// `GET /health/live`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LiveJson {
    pub alive: bool,
    pub timestamp: String,
    pub uptime: u64,
}

/// `DELETE /tasks/{taskId}` and `POST /tasks/{taskId}/cancel`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Removed {
    pub message: String,
    pub task_id: String,
    /// The task as it is after the cancel, or as it was before its removal.
    pub task: TaskJson,
    /// Ours: whether the task was removed (it had ended) rather than cancelled.
    pub deleted: bool,
    pub workspace_removed: bool,
}

/// `POST /tasks/{taskId}/cancel`.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct CancelBody {
    pub reason: Option<String>,
}

/// A session (ours: the original had none).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionJson {
    pub id: String,
    /// `creating`, `ready`, `busy`, `idle`, `stopped`, `closed`, `failed`, `lost`.
    pub state: String,
    pub state_reason: String,
    pub worker_id: String,
    pub created_at: Option<String>,
    pub last_activity_at: Option<String>,
    pub turns: u32,
    pub queued_messages: u32,
    pub cost_usd: f64,
    pub tokens: Option<TokensJson>,
    pub model: String,
    pub repo_url: String,
    pub labels: BTreeMap<String, String>,
    pub last_sequence: u64,
    pub owner: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionList {
    pub sessions: Vec<SessionJson>,
    pub next_page_token: String,
}

/// `GET /sessions/{sessionId}`: the session and its conversation so far.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionDetail {
    pub session: SessionJson,
    pub events: Vec<EventJson>,
}

/// `GET /tasks/{taskId}/events`: the log so far (it does not wait for more).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EventList {
    pub events: Vec<EventJson>,
}

// --- mapping ---

pub fn time(timestamp: Option<&claudecluster_proto::Timestamp>) -> Option<String> {
    timestamp.map(ToString::to_string)
}

pub fn now() -> String {
    claudecluster_proto::Timestamp::from(std::time::SystemTime::now()).to_string()
}

/// The original's name of a status: a task placed on a worker and not started is `pending`.
pub fn status_name(status: TaskStatus) -> &'static str {
    match status {
        TaskStatus::Unspecified | TaskStatus::Pending | TaskStatus::Assigned => "pending",
        other => other.label(),
    }
}

/// The statuses an original name stands for.
pub fn statuses_named(name: &str) -> Result<Vec<TaskStatus>, ApiError> {
    match name {
        "pending" => Ok(vec![TaskStatus::Pending, TaskStatus::Assigned]),
        other => TaskStatus::from_label(other)
            .map(|status| vec![status])
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "status: `{}` is not one of pending, running, completed, failed, cancelled",
                    cut(other, 64)
                ))
            }),
    }
}

pub fn priority_name(priority: Priority) -> &'static str {
    match priority {
        Priority::Low => "low",
        Priority::Unspecified | Priority::Normal => "normal",
        Priority::High => "high",
        Priority::Critical => "critical",
    }
}

pub fn parse_priority(field: &str, name: &str) -> Result<Priority, ApiError> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "critical" => Priority::Critical,
        "high" => Priority::High,
        "normal" | "medium" => Priority::Normal,
        "low" | "background" => Priority::Low,
        _ => {
            return Err(ApiError::bad_request(format!(
                "{field}: `{}` is not one of critical, high, normal, low, background",
                cut(name, 64)
            )));
        }
    })
}

fn cut(text: &str, chars: usize) -> String {
    text.chars().take(chars).collect()
}

fn tokens(usage: Option<&TokenUsage>) -> Option<TokensJson> {
    usage.map(|usage| TokensJson {
        input: usage.input_tokens,
        output: usage.output_tokens,
        cache_creation_input: usage.cache_creation_input_tokens,
        cache_read_input: usage.cache_read_input_tokens,
    })
}

/// The labels `metadata` becomes: strings as they are, numbers and booleans as text.
fn metadata_labels(
    field: &str,
    metadata: &serde_json::Map<String, Value>,
    labels: &mut HashMap<String, String>,
) -> Result<(), ApiError> {
    for (key, value) in metadata {
        let text = match value {
            Value::String(text) => text.clone(),
            Value::Number(number) => number.to_string(),
            Value::Bool(flag) => flag.to_string(),
            Value::Null => continue,
            Value::Array(_) | Value::Object(_) => {
                return Err(ApiError::bad_request(format!(
                    "{field}.{}: must be a string, a number or a boolean (metadata becomes the task's labels)",
                    cut(key, 64)
                )));
            }
        };
        labels.insert(key.clone(), text);
    }
    Ok(())
}

/// The spec of a submitted task. `defaults` holds the body's own fields; `field` names the
/// task in errors (`task`, `tasks[2]`).
pub fn task_spec(
    field: &str,
    input: &TaskInput,
    defaults: &SubmitBody,
) -> Result<(TaskSpec, Option<String>), ApiError> {
    let object;
    let task = match input {
        TaskInput::Text(text) => {
            object = TaskObject {
                description: Some(text.clone()),
                ..TaskObject::default()
            };
            &object
        }
        TaskInput::Object(task) => task,
    };
    let title = task.title.as_deref().map(str::trim).unwrap_or_default();
    let description = task.description.as_deref().unwrap_or_default();
    let prompt = match (title.is_empty(), description.trim().is_empty()) {
        (true, true) => {
            return Err(ApiError::bad_request(format!(
                "{field}: needs a prompt: the task's text, or a task object with a title or a description"
            )));
        }
        (false, true) => title.to_owned(),
        (true, false) => description.to_owned(),
        (false, false) if description.starts_with(title) => description.to_owned(),
        (false, false) => format!("{title}\n\n{description}"),
    };
    let mut labels = HashMap::new();
    if let Some(metadata) = &defaults.metadata {
        metadata_labels("metadata", metadata, &mut labels)?;
    }
    if let Some(metadata) = &task.metadata {
        metadata_labels(&format!("{field}.metadata"), metadata, &mut labels)?;
    }
    if !title.is_empty() {
        labels.insert(TITLE_LABEL.to_owned(), cut(title, 256));
    }
    if let Some(category) = &task.category {
        if !CATEGORIES.contains(&category.as_str()) {
            return Err(ApiError::bad_request(format!(
                "{field}.category: `{}` is not one of {}",
                cut(category, 64),
                CATEGORIES.join(", ")
            )));
        }
        labels.insert(CATEGORY_LABEL.to_owned(), category.clone());
    }
    let client_id = task.id.clone().filter(|id| !id.is_empty());
    let mut idempotency_key = String::new();
    if let Some(id) = &client_id {
        claudecluster_proto::validate::id("id", id)
            .map_err(|invalid| ApiError::bad_request(format!("{field}.id: {}", invalid.message)))?;
        labels.insert(ID_LABEL.to_owned(), id.clone());
        // Submitting the same id again returns the task it made.
        idempotency_key = format!("http:{id}");
    }
    let priority = match task.priority.as_deref().or(defaults.priority.as_deref()) {
        Some(name) => parse_priority(&format!("{field}.priority"), name)?,
        None => Priority::Normal,
    };
    let timeout_seconds = match defaults.timeout {
        Some(millis) => u32::try_from(millis.div_ceil(1000))
            .map_err(|_| ApiError::bad_request("timeout: too long (milliseconds)"))?,
        None => 0,
    };
    let execution_mode = match defaults.execution_mode.as_deref() {
        None | Some("") | Some("any") => ExecutionMode::Unspecified,
        Some(mode) => ExecutionMode::from_label(mode).ok_or_else(|| {
            ApiError::bad_request(format!(
                "executionMode: `{}` is not one of process_pool, container_agentic",
                cut(mode, 64)
            ))
        })?,
    };
    let agent = AgentOptions {
        model: defaults.model.clone().unwrap_or_default(),
        allowed_tools: defaults.allowed_tools.clone(),
        ..AgentOptions::default()
    };
    let spec = TaskSpec {
        prompt,
        repo_url: defaults.repo_url.clone().unwrap_or_default(),
        execution_mode: execution_mode as i32,
        limits: (timeout_seconds > 0).then_some(ResourceLimits {
            timeout_seconds,
            ..ResourceLimits::default()
        }),
        priority: priority as i32,
        agent: (agent != AgentOptions::default()).then_some(agent),
        labels,
        idempotency_key,
        depends_on: task.dependencies.clone(),
        ..TaskSpec::default()
    };
    Ok((spec, client_id))
}

/// The task's result in the original's shape, once it ended.
pub fn task_result(task: &Task) -> Option<TaskResultJson> {
    let status = task.status();
    if !status.is_terminal() {
        return None;
    }
    let result = task.result.as_ref();
    Some(TaskResultJson {
        output: result.map(|r| r.text.clone()).unwrap_or_default(),
        error: (status != TaskStatus::Completed).then(|| task.status_reason.clone()),
        exit_code: Some(if status == TaskStatus::Completed {
            0
        } else {
            1
        }),
        started_at: time(task.start_time.as_ref()),
        completed_at: time(task.end_time.as_ref()),
        cost_usd: result.map_or(0.0, |r| r.total_cost_usd),
        tokens: tokens(result.and_then(|r| r.usage.as_ref())),
        num_turns: result.map_or(0, |r| r.num_turns),
        duration_ms: result.map_or(0, |r| r.duration_ms),
        subtype: result.map(|r| r.subtype.clone()),
    })
}

/// The id a client knows the task by: its own, when it gave one.
pub fn public_id(task: &Task) -> String {
    task.spec
        .as_ref()
        .and_then(|spec| spec.labels.get(ID_LABEL))
        .cloned()
        .unwrap_or_else(|| task.task_id.clone())
}

pub fn task_json(task: &Task) -> TaskJson {
    let spec = task.spec.clone().unwrap_or_default();
    let labels = &spec.labels;
    let title = labels.get(TITLE_LABEL).cloned().unwrap_or_else(|| {
        let line = spec.prompt.lines().next().unwrap_or_default().trim();
        if line.chars().count() > TITLE_CHARS {
            format!("{}…", cut(line, TITLE_CHARS - 1))
        } else {
            line.to_owned()
        }
    });
    let updated = task
        .end_time
        .as_ref()
        .or(task.start_time.as_ref())
        .or(task.create_time.as_ref());
    TaskJson {
        id: public_id(task),
        title,
        description: spec.prompt.clone(),
        category: labels
            .get(CATEGORY_LABEL)
            .cloned()
            .unwrap_or_else(|| "coding".to_owned()),
        priority: priority_name(spec.priority()).to_owned(),
        status: status_name(task.status()).to_owned(),
        dependencies: spec.depends_on.clone(),
        created_at: time(task.create_time.as_ref()),
        updated_at: time(updated),
        assigned_worker_id: Some(task.worker_id.clone()).filter(|id| !id.is_empty()),
        result: task_result(task),
        metadata: labels
            .iter()
            .filter(|(key, _)| !key.starts_with("http."))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect(),
        cluster_task_id: task.task_id.clone(),
        cluster_status: task.status().label().to_owned(),
        status_reason: task.status_reason.clone(),
        attempt: task.attempt,
        cost_usd: task.result.as_ref().map_or(0.0, |r| r.total_cost_usd),
        tokens: tokens(task.result.as_ref().and_then(|r| r.usage.as_ref())),
        last_sequence: task.last_sequence,
        model: task.model.clone(),
        last_tool: task.last_tool.clone(),
        repo_url: spec.repo_url.clone(),
        timeout: spec
            .limits
            .as_ref()
            .map_or(0, |limits| u64::from(limits.timeout_seconds) * 1000),
        owner: task.owner.clone(),
        shortened: task.shortened,
    }
}

/// What the agent did last, in words, from its latest event.
pub fn current_step(task: &Task, last: Option<&EventJson>) -> String {
    match last {
        Some(event) => step_of(event),
        None => status_name(task.status()).to_owned(),
    }
}

/// What `event` says the agent is doing, in words.
pub fn step_of(event: &EventJson) -> String {
    match event.kind.as_str() {
        "text" => "writing".to_owned(),
        "toolUse" => format!("calling {}", event.tool.as_deref().unwrap_or("a tool")),
        "toolResult" => "reading a tool's result".to_owned(),
        "init" => "started".to_owned(),
        "status" => event.status.clone().unwrap_or_default(),
        other => other.to_owned(),
    }
}

pub fn event_json(event: &Event) -> EventJson {
    let mut json = EventJson {
        sequence: event.sequence,
        time: time(event.time.as_ref()),
        task_id: Some(event.task_id.clone()).filter(|id| !id.is_empty()),
        session_id: Some(event.session_id.clone()).filter(|id| !id.is_empty()),
        turn: Some(event.turn).filter(|turn| *turn > 0),
        ..EventJson::default()
    };
    let kind = match &event.kind {
        Some(Kind::StatusChange(change)) => {
            json.status = Some(change.status().label().to_owned());
            json.reason = Some(change.reason.clone()).filter(|r| !r.is_empty());
            json.worker_id = Some(change.worker_id.clone()).filter(|w| !w.is_empty());
            "status"
        }
        Some(Kind::Init(init)) => {
            json.model = Some(init.model.clone());
            "init"
        }
        Some(Kind::Text(text)) => {
            json.text = Some(text.text.clone());
            json.thinking = Some(text.thinking);
            "text"
        }
        Some(Kind::ToolUse(tool)) => {
            json.tool = Some(tool.name.clone());
            json.tool_use_id = Some(tool.tool_use_id.clone());
            json.input = Some(tool.input_json.clone());
            "toolUse"
        }
        Some(Kind::ToolResult(result)) => {
            json.tool_use_id = Some(result.tool_use_id.clone());
            json.text = Some(result.content.clone());
            json.is_error = Some(result.is_error);
            "toolResult"
        }
        Some(Kind::ApiRetry(retry)) => {
            json.text = Some(retry.error.clone());
            "retry"
        }
        Some(Kind::PermissionDenied(denied)) => {
            json.tool = Some(denied.tool_name.clone());
            json.text = Some(denied.message.clone());
            "permissionDenied"
        }
        Some(Kind::Result(result)) => {
            json.text = Some(result.text.clone());
            json.is_error = Some(result.is_error);
            json.cost_usd = Some(result.total_cost_usd);
            json.subtype = Some(result.subtype.clone());
            "result"
        }
        Some(Kind::Output(line)) => {
            json.text = Some(line.line.clone());
            json.subtype = Some(
                match line.stream() {
                    output_line::Stream::Stderr => "stderr",
                    _ => "stdout",
                }
                .to_owned(),
            );
            "output"
        }
        Some(Kind::SessionState(change)) => {
            json.status = Some(change.state().label().to_owned());
            json.reason = Some(change.reason.clone()).filter(|r| !r.is_empty());
            json.worker_id = Some(change.worker_id.clone()).filter(|w| !w.is_empty());
            "sessionState"
        }
        Some(Kind::Other(other)) => {
            json.subtype = Some(format!("{}/{}", other.r#type, other.subtype));
            "other"
        }
        None => "other",
    };
    json.kind = kind.to_owned();
    json
}

/// Whether `event` is the task's final status change.
pub fn ends_task(event: &Event) -> Option<TaskStatus> {
    match &event.kind {
        Some(Kind::StatusChange(change)) if change.status().is_terminal() => Some(change.status()),
        _ => None,
    }
}

pub fn worker_json(worker: &WorkerInfo) -> WorkerJson {
    let status = if !worker.healthy {
        "error"
    } else if worker.drained {
        "offline"
    } else if worker.draining {
        "draining"
    } else if worker.capacity > 0 && worker.load >= worker.capacity {
        "busy"
    } else {
        "idle"
    };
    let mut modes: Vec<String> = worker
        .execution_modes()
        .map(|mode| mode.label().to_owned())
        .collect();
    if modes.is_empty() {
        modes.push(worker.execution_mode().label().to_owned());
    }
    let last_seen = time(worker.last_heartbeat_time.as_ref());
    WorkerJson {
        id: worker.worker_id.clone(),
        name: worker.worker_id.clone(),
        status: status.to_owned(),
        endpoint: worker.address.clone(),
        capabilities: CapabilitiesJson {
            modes,
            max_concurrent_tasks: worker.capacity,
            labels: worker.labels.clone().into_iter().collect(),
        },
        health: WorkerHealthJson {
            status: if worker.healthy {
                "healthy"
            } else {
                "unhealthy"
            }
            .to_owned(),
            healthy: worker.healthy,
            reason: worker.health_reason.clone(),
            last_heartbeat: last_seen.clone(),
        },
        current_tasks: worker.load,
        mode: worker.execution_mode().label().to_owned(),
        capacity: worker.capacity,
        load: worker.load,
        draining: worker.draining,
        drained: worker.drained,
        idle_warm_agents: worker.idle_warm_agents,
        version: worker.version.clone(),
        last_seen,
    }
}

pub fn stats_json(status: &GetClusterStatusResponse, uptime_ms: u64) -> StatsJson {
    let count = |name: &str| status.tasks_by_status.get(name).copied().unwrap_or(0);
    let healthy = status.workers.iter().filter(|w| w.healthy).count() as u64;
    let active = status
        .workers
        .iter()
        .filter(|w| w.healthy && !w.draining)
        .count() as u64;
    StatsJson {
        total_tasks: status.tasks_by_status.values().sum(),
        pending_tasks: count("pending") + count("assigned"),
        running_tasks: count("running"),
        completed_tasks: count("completed"),
        failed_tasks: count("failed"),
        cancelled_tasks: count("cancelled"),
        queued_tasks: status.queued_tasks,
        total_workers: status.workers.len() as u64,
        active_workers: active,
        healthy_workers: healthy,
        uptime: uptime_ms,
        timestamp: now(),
        version: status.version.clone(),
        tasks_by_status: status
            .tasks_by_status
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect(),
        queued_by_priority: status
            .queued_by_priority
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect(),
        workers: status.workers.iter().map(worker_json).collect(),
    }
}

pub fn session_json(session: &Session) -> SessionJson {
    let spec = session.spec.clone().unwrap_or_default();
    SessionJson {
        id: session.session_id.clone(),
        state: session.state().label().to_owned(),
        state_reason: session.state_reason.clone(),
        worker_id: session.worker_id.clone(),
        created_at: time(session.create_time.as_ref()),
        last_activity_at: time(session.last_activity_time.as_ref()),
        turns: session.turns,
        queued_messages: session.queued_messages,
        cost_usd: session.total_cost_usd,
        tokens: tokens(session.usage.as_ref()),
        model: session.model.clone(),
        repo_url: spec.repo_url,
        labels: spec.labels.into_iter().collect(),
        last_sequence: session.last_sequence,
        owner: session.owner.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(task: TaskInput) -> SubmitBody {
        SubmitBody {
            task,
            ..SubmitBody::default()
        }
    }

    #[test]
    fn a_task_object_maps_to_a_spec_and_back() {
        let input: SubmitBody = serde_json::from_value(serde_json::json!({
            "task": {"id": "t-1", "title": "Fix the bug", "description": "in parser.rs",
                     "category": "testing", "dependencies": ["t-0"], "status": "pending"},
            "priority": "background",
            "timeout": 1500,
            "metadata": {"team": "blue", "attempts": 3, "urgent": true}
        }))
        .unwrap();
        let (spec, client_id) = task_spec("task", &input.task, &input).unwrap();
        assert_eq!(client_id.as_deref(), Some("t-1"));
        assert_eq!(spec.prompt, "Fix the bug\n\nin parser.rs");
        assert_eq!(spec.priority(), Priority::Low);
        assert_eq!(spec.limits.as_ref().unwrap().timeout_seconds, 2);
        assert_eq!(spec.depends_on, vec!["t-0".to_owned()]);
        assert_eq!(spec.labels["attempts"], "3");
        assert_eq!(spec.labels["urgent"], "true");
        assert_eq!(spec.idempotency_key, "http:t-1");
        let task = Task {
            task_id: "abc".into(),
            spec: Some(spec),
            status: TaskStatus::Assigned as i32,
            ..Task::default()
        };
        let json = task_json(&task);
        assert_eq!(json.id, "t-1");
        assert_eq!(json.cluster_task_id, "abc");
        assert_eq!(json.title, "Fix the bug");
        assert_eq!(json.category, "testing");
        assert_eq!(json.priority, "low");
        assert_eq!(json.status, "pending");
        assert_eq!(json.cluster_status, "assigned");
        assert_eq!(json.timeout, 2000);
        assert_eq!(json.metadata.get("team").map(String::as_str), Some("blue"));
        assert!(!json.metadata.contains_key(ID_LABEL));
        assert!(json.result.is_none());
    }

    #[test]
    fn bad_task_input_names_the_field() {
        let nested = body(TaskInput::Object(TaskObject {
            title: Some("x".into()),
            metadata: Some(
                serde_json::json!({"deep": {"a": 1}})
                    .as_object()
                    .unwrap()
                    .clone(),
            ),
            ..TaskObject::default()
        }));
        let err = task_spec("task", &nested.task, &nested).unwrap_err();
        assert_eq!(err.status, axum::http::StatusCode::BAD_REQUEST);
        assert!(
            err.message.starts_with("task.metadata.deep:"),
            "{}",
            err.message
        );
        let empty = body(TaskInput::Text("  ".into()));
        assert!(task_spec("task", &empty.task, &empty).is_err());
        let category = body(TaskInput::Object(TaskObject {
            title: Some("x".into()),
            category: Some("poetry".into()),
            ..TaskObject::default()
        }));
        let err = task_spec("task", &category.task, &category).unwrap_err();
        assert!(err.message.starts_with("task.category:"), "{}", err.message);
        assert!(parse_priority("priority", "urgent").is_err());
    }

    #[test]
    fn statuses_map_to_the_original_names() {
        assert_eq!(status_name(TaskStatus::Assigned), "pending");
        assert_eq!(status_name(TaskStatus::Running), "running");
        assert_eq!(status_name(TaskStatus::Cancelled), "cancelled");
        assert_eq!(
            statuses_named("pending").unwrap(),
            vec![TaskStatus::Pending, TaskStatus::Assigned]
        );
        assert!(statuses_named("sleeping").is_err());
    }
}
