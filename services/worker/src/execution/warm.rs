//! Warm agents: started ahead of their tasks, booted and waiting for a first message.
//!
//! Most of a short task is the CLI's start-up; an agent started in advance in stream-json
//! input mode answers its first message without it. A pool keeps `size` such agents per
//! provider, hands one to a task whose agent options are the ones the pool's agents were
//! started with, and starts a replacement in the background once that task's turn has ended
//! (or after [`REFILL_DELAY`]): starting an agent takes a core for a moment, which the task
//! just handed out would otherwise wait for. It is the same for every
//! provider: for the process pool a warm agent is a process, for container mode a container
//! with its agent running.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{AgentHandle, AgentInput, AgentLaunch, AgentOptions, ExecutionProvider, Limits};
use crate::workspace::Workspaces;

/// The longest a pool waits for the turn of the task it served to end before it starts a
/// replacement.
pub const REFILL_DELAY: Duration = Duration::from_secs(1);

/// An idle agent and the workspace it was started in.
pub struct WarmAgent {
    pub handle: AgentHandle,
    pub workspace: PathBuf,
    /// Dropped when the agent's task no longer needs the cores to itself: the pool then
    /// starts a replacement.
    pub refill: Option<RefillTicket>,
}

/// Held while a task handed a warm agent runs its turn; dropping it lets the pool refill.
pub struct RefillTicket {
    _turn: tokio::sync::oneshot::Sender<()>,
}

impl WarmAgent {
    fn is_alive(&mut self) -> bool {
        matches!(
            self.handle.exit.try_recv(),
            Err(tokio::sync::oneshot::error::TryRecvError::Empty)
        )
    }

    async fn discard(self) {
        let _ = self.handle.control.kill().await;
        self.handle.control.release().await;
        let _ = tokio::fs::remove_dir_all(&self.workspace).await;
    }
}

/// How the pool's agents are started.
#[derive(Clone)]
pub struct WarmTemplate {
    pub options: AgentOptions,
    pub args: Vec<String>,
    /// Holds secrets: never log values.
    pub env: Vec<(String, String)>,
    /// Each agent gets a token of its own here, when the worker runs a credential proxy.
    pub proxy: Option<Arc<crate::proxy::CredentialProxy>>,
}

pub struct WarmPool {
    provider: Arc<dyn ExecutionProvider>,
    template: WarmTemplate,
    workspaces: Workspaces,
    size: usize,
    idle: Mutex<VecDeque<WarmAgent>>,
    wanted: Notify,
    stop: CancellationToken,
}

impl WarmPool {
    /// Starts a pool of `size` agents and keeps it full until [`WarmPool::shutdown`].
    pub fn start(
        provider: Arc<dyn ExecutionProvider>,
        template: WarmTemplate,
        workspaces: Workspaces,
        size: usize,
    ) -> Arc<Self> {
        let pool = Arc::new(WarmPool {
            provider,
            template,
            workspaces,
            size,
            idle: Mutex::default(),
            wanted: Notify::new(),
            stop: CancellationToken::new(),
        });
        tokio::spawn(pool.clone().keep_full());
        pool
    }

    /// The agent options the pool's agents run with; only tasks with these options fit.
    pub fn options(&self) -> &AgentOptions {
        &self.template.options
    }

    pub fn idle_count(&self) -> usize {
        self.idle.lock().unwrap().len()
    }

    /// A started agent, if one is ready. A replacement is started in the background when the
    /// agent's [`RefillTicket`] is dropped, or after [`REFILL_DELAY`].
    pub fn take(self: &Arc<Self>) -> Option<WarmAgent> {
        let mut idle = self.idle.lock().unwrap();
        while let Some(mut agent) = idle.pop_front() {
            if agent.is_alive() {
                let (ticket, turn_ended) = tokio::sync::oneshot::channel::<()>();
                let pool = self.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(REFILL_DELAY, turn_ended).await;
                    pool.wanted.notify_one();
                });
                agent.refill = Some(RefillTicket { _turn: ticket });
                return Some(agent);
            }
            self.wanted.notify_one();
            tracing::warn!(workspace = %agent.workspace.display(), "a warm agent died while idle");
            tokio::spawn(agent.discard());
        }
        None
    }

    async fn keep_full(self: Arc<Self>) {
        let mut failures = 0u32;
        loop {
            while self.idle_count() < self.size && !self.stop.is_cancelled() {
                match self.start_one().await {
                    Ok(agent) => {
                        failures = 0;
                        if self.stop.is_cancelled() {
                            agent.discard().await;
                            return;
                        }
                        self.idle.lock().unwrap().push_back(agent);
                    }
                    Err(reason) => {
                        failures += 1;
                        if failures == 1 {
                            tracing::warn!(%reason, "cannot start a warm agent; retrying");
                        }
                        let backoff = Duration::from_millis(200 * u64::from(failures.min(25)));
                        tokio::select! {
                            _ = self.stop.cancelled() => return,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                    }
                }
            }
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = self.wanted.notified() => {}
            }
        }
    }

    async fn start_one(&self) -> Result<WarmAgent, String> {
        let name = format!("warm-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let workspace = self.workspaces.prepare(&name, 1, "").await?;
        self.provider
            .adopt_workspace(&workspace)
            .await
            .map_err(|err| err.0)?;
        let grant = self.template.proxy.as_ref().map(|proxy| proxy.grant(&name));
        let mut env = self.template.env.clone();
        if let Some(grant) = &grant {
            env.extend(grant.agent_env());
        }
        let launch = AgentLaunch {
            task_id: name,
            attempt: 0,
            args: self.template.args.clone(),
            env,
            workspace: workspace.clone(),
            input: AgentInput::StreamJson,
            limits: Limits::default(),
            mounts: Vec::new(),
            repo_url: None,
        };
        let mut handle = self.provider.launch(launch).await.map_err(|err| err.0)?;
        handle.grant = grant;
        Ok(WarmAgent {
            handle,
            workspace,
            refill: None,
        })
    }

    /// Stops refilling and ends every idle agent.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        let idle: Vec<WarmAgent> = self.idle.lock().unwrap().drain(..).collect();
        for agent in idle {
            agent.discard().await;
        }
    }
}
