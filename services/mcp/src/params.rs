//! Tool parameters. Their JSON schemas are generated from these types; unknown fields are a
//! malformed call.

use std::collections::{BTreeMap, HashMap};

use claudecluster_config::ByteSize;
use claudecluster_proto::v1::{AgentOptions, ExecutionMode, ResourceLimits, SessionSpec, TaskSpec};
use rmcp::schemars::JsonSchema;
use serde::Deserialize;

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SpawnParams {
    /// What the agent should do.
    pub task: String,
    /// A git repository to clone into the agent's workspace.
    pub repo_url: Option<String>,
    /// How long the agent may run, in seconds.
    pub session_timeout: Option<u32>,
    /// Memory limit of its container, such as "2GB".
    pub memory: Option<String>,
    /// CPU limit of its container, in cores.
    pub cpus: Option<f64>,
    /// Environment variables for the agent.
    pub environment: Option<BTreeMap<String, String>>,
    /// Tools the agent may use without asking, such as ["Write", "Bash"].
    pub allowed_tools: Option<Vec<String>>,
    /// The model the agent uses.
    pub model: Option<String>,
}

impl SpawnParams {
    pub fn into_spec(self, labels: HashMap<String, String>) -> Result<TaskSpec, String> {
        let memory_bytes = match &self.memory {
            Some(memory) => {
                ByteSize::parse(memory)
                    .map_err(|err| format!("memory: {err}"))?
                    .0
            }
            None => 0,
        };
        Ok(TaskSpec {
            prompt: self.task,
            repo_url: self.repo_url.unwrap_or_default(),
            execution_mode: ExecutionMode::ContainerAgentic as i32,
            limits: Some(ResourceLimits {
                memory_bytes,
                cpus: self.cpus.unwrap_or_default(),
                timeout_seconds: self.session_timeout.unwrap_or_default(),
                pids: 0,
            }),
            agent: Some(AgentOptions {
                allowed_tools: self.allowed_tools.unwrap_or_default(),
                model: self.model.unwrap_or_default(),
                ..Default::default()
            }),
            labels,
            environment: self.environment.unwrap_or_default().into_iter().collect(),
            ..Default::default()
        })
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TaskParams {
    pub task_id: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WaitParams {
    pub task_id: String,
    /// At most 50.
    pub timeout_seconds: Option<u32>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CancelParams {
    pub task_id: String,
    pub reason: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListParams {
    /// pending, assigned, running, completed, failed or cancelled.
    pub status: Option<String>,
    /// Only the tasks this primary Claude Code session spawned.
    pub mine: Option<bool>,
    /// Only the tasks spawned by this Claude Code session.
    pub parent_session_id: Option<String>,
    /// At most this many (default 50).
    pub limit: Option<u32>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateSessionParams {
    pub repo_url: Option<String>,
    /// Stop the container after this many seconds without a message.
    pub idle_timeout_seconds: Option<u32>,
    pub allowed_tools: Option<Vec<String>>,
    pub model: Option<String>,
}

impl CreateSessionParams {
    pub fn into_spec(self) -> SessionSpec {
        SessionSpec {
            repo_url: self.repo_url.unwrap_or_default(),
            idle_timeout_seconds: self.idle_timeout_seconds.unwrap_or_default(),
            agent: Some(AgentOptions {
                allowed_tools: self.allowed_tools.unwrap_or_default(),
                model: self.model.unwrap_or_default(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SendParams {
    pub session_id: String,
    pub text: String,
    /// At most 50.
    pub timeout_seconds: Option<u32>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReplyParams {
    pub session_id: String,
    /// The message's turn, as send_message returned it.
    pub turn: u32,
    /// At most 50.
    pub timeout_seconds: Option<u32>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SessionParams {
    pub session_id: String,
}
