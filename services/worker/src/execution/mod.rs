//! Running agents, whatever runs them.
//!
//! An [`ExecutionProvider`] knows one way to start a `claude` process: as a local process
//! ([`ProcessPoolProvider`]) or in a container. It hands back an [`AgentHandle`]: the agent's
//! output lines, its exit, and a way to interrupt and kill it. Everything else (parsing the
//! stream-json output, streaming events, the wall-clock timeout, the idle watchdog, cancel,
//! and deciding the outcome from the result event) is shared, in [`supervisor`].

mod command;
mod container;
pub mod kubernetes;
mod output;
mod process;
mod signal;
mod spawner;
pub mod supervisor;
mod unified;
mod warm;

use std::fmt;
use std::path::PathBuf;

use async_trait::async_trait;
use claudecluster_proto::v1::ExecutionMode;
use tokio::sync::{mpsc, oneshot};

pub use command::{AgentOptions, agent_args, agent_env, warm_agent_args};
pub use container::{ContainerProvider, ContainerSettings};
pub use kubernetes::{KubernetesProvider, KubernetesSettings};
pub use output::{LineSplitter, OutputLine, OutputStream, forward_lines};
pub use process::{ProcessPoolProvider, stop_leftover_agents};
pub use unified::Providers;
pub use warm::{RefillTicket, WarmAgent, WarmPool, WarmTemplate};

/// Everything needed to start one agent, whatever runs it.
///
/// `env` holds secrets (API keys): never log its values.
#[derive(Clone)]
pub struct AgentLaunch {
    /// The task's id, or a name for an agent started ahead of any task.
    pub task_id: String,
    pub attempt: u32,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// The task's workspace on this host.
    pub workspace: PathBuf,
    /// Whether the agent reads stream-json messages on stdin (a warm or long-lived agent)
    /// or gets its prompt as an argument and `/dev/null` as stdin.
    pub input: AgentInput,
    /// Limits for providers that enforce them (containers).
    pub limits: Limits,
    /// Host directories mounted into the agent's container, with where they appear there.
    pub mounts: Vec<(PathBuf, String)>,
    /// A repository the agent's container clones into its workspace before the agent starts,
    /// for a provider whose workspace is not the worker's ([`ExecutionProvider::clones_in_agent`]).
    /// It may hold credentials: never log it.
    pub repo_url: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentInput {
    /// The prompt is an argument; stdin is `/dev/null`.
    None,
    /// Stream-json user messages are written to stdin through [`AgentHandle::input`].
    StreamJson,
}

/// Resource limits of one agent; zero means none.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Limits {
    pub memory_bytes: u64,
    pub cpus: f64,
    pub pids: u32,
}

impl fmt::Debug for AgentLaunch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let env_names: Vec<&str> = self.env.iter().map(|(name, _)| name.as_str()).collect();
        f.debug_struct("AgentLaunch")
            .field("task_id", &self.task_id)
            .field("attempt", &self.attempt)
            .field("args", &self.args)
            .field("env", &env_names)
            .field("workspace", &self.workspace)
            .field("input", &self.input)
            .field("limits", &self.limits)
            .finish()
    }
}

/// A started agent.
pub struct AgentHandle {
    /// Output lines; the channel closes when the agent closed stdout and stderr.
    pub output: mpsc::Receiver<OutputLine>,
    /// The agent's exit, once it happened.
    pub exit: oneshot::Receiver<AgentExit>,
    pub control: Box<dyn AgentControl>,
    /// Lines for the agent's stdin, for [`AgentInput::StreamJson`]; dropping it closes stdin.
    pub input: Option<mpsc::Sender<String>>,
    /// What runs the agent, for people: `process 1234`, `container … on network …`.
    pub description: String,
    /// The agent's token at the credential proxy: revoked when the handle is dropped, which
    /// is when the agent has ended.
    pub grant: Option<crate::proxy::Grant>,
}

/// Stopping an agent and releasing what it held.
#[async_trait]
pub trait AgentControl: Send + Sync {
    /// Asks the agent to stop (SIGINT), which makes the CLI end its turn with a result.
    async fn interrupt(&self) -> std::io::Result<()>;
    /// Stops the agent at once.
    async fn kill(&self) -> std::io::Result<()>;
    /// Releases what the agent held once it is gone; called exactly once.
    async fn release(&self) {}
}

/// How an agent ended.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AgentExit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// What the runtime knows besides the status, e.g. "out of memory".
    pub detail: Option<String>,
}

impl fmt::Display for AgentExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.code, self.signal) {
            (Some(code), _) => write!(f, "exited {code}")?,
            (None, Some(signal)) => write!(f, "was killed by signal {signal}")?,
            (None, None) => write!(f, "ended")?,
        }
        if let Some(detail) = &self.detail {
            write!(f, ": {detail}")?;
        }
        Ok(())
    }
}

/// Why an agent could not be started, in words for the task's failure reason.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LaunchError(pub String);

/// Whether a provider can take work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderHealth {
    Ready,
    Unavailable(String),
}

/// One way of running agents.
#[async_trait]
pub trait ExecutionProvider: Send + Sync + 'static {
    fn mode(&self) -> ExecutionMode;

    /// Starts the agent described by `launch`.
    async fn launch(&self, launch: AgentLaunch) -> Result<AgentHandle, LaunchError>;

    async fn health(&self) -> ProviderHealth {
        ProviderHealth::Ready
    }

    /// Prepares `workspace` for an agent of this provider (e.g. hands it to the container's
    /// user).
    async fn adopt_workspace(&self, _workspace: &std::path::Path) -> Result<(), LaunchError> {
        Ok(())
    }

    /// Whether a task's repository is cloned where the agent runs ([`AgentLaunch::repo_url`])
    /// rather than into the worker's workspace first.
    fn clones_in_agent(&self) -> bool {
        false
    }

    /// Removes what the provider keeps of a session between its agents (a volume claim),
    /// once the session whose agents run as `owner` has closed.
    async fn discard_session(&self, _owner: &str) {}

    /// Called once as the worker stops, after its agents have ended: a last try at what the
    /// provider could not clean up earlier (a container or network Docker would not remove).
    async fn shut_down(&self) {}
}
