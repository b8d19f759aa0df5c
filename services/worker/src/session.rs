//! Sessions: a long-lived agent in a container, message after message.
//!
//! Each session has a workspace and a Claude config directory on the worker, mounted into its
//! container at `/workspace` and `/claude-config`; they outlive the container. The agent is one
//! `claude -p --input-format stream-json` process that gets each message only after the
//! previous one's result. After the session's idle timeout the container is stopped; the next
//! message starts a new one that resumes the same conversation (`--resume`), with the same
//! files. Closing the session removes the container and both directories.
//!
//! One task (the session's actor) owns the agent and handles one command at a time, so turns
//! never overlap.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use claudecluster_agent_protocol::{ResultEvent, user_message_line};
use claudecluster_proto::v1::event::Kind;
use claudecluster_proto::v1::{self, Event, ExecutionMode, SessionSpec, SessionState};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tokio::time::{Instant, sleep_until};

use crate::error::WorkerError;
use crate::execution::supervisor::{STDERR_TAIL, handle_line};
use crate::execution::{
    AgentControl, AgentExit, AgentHandle, AgentInput, AgentLaunch, AgentOptions, ExecutionProvider,
    Limits, OutputLine, agent_env, warm_agent_args,
};
use crate::runtime::Runtime;

/// Where a session's agent finds its Claude state inside the container.
const CONFIG_MOUNT: &str = "/claude-config";

pub enum Command {
    Turn { turn: u32, text: String },
    Close { done: oneshot::Sender<()> },
}

/// Where a session's events go: the RunSession stream.
#[derive(Clone)]
struct SessionSink {
    sender: mpsc::Sender<Event>,
    session_id: String,
    worker_id: String,
}

impl SessionSink {
    async fn emit(&self, turn: u32, kind: Kind) {
        let event = Event {
            session_id: self.session_id.clone(),
            turn,
            kind: Some(kind),
            ..Event::default()
        };
        let _ = self.sender.send(event).await;
    }

    async fn state(
        &self,
        turn: u32,
        state: SessionState,
        reason: impl Into<String>,
        workspace: &str,
    ) {
        let change = v1::SessionStateChange {
            state: state as i32,
            reason: reason.into(),
            worker_id: self.worker_id.clone(),
            workspace: workspace.to_owned(),
        };
        self.emit(turn, Kind::SessionState(change)).await
    }
}

/// The running agent of a session.
struct LiveAgent {
    output: mpsc::Receiver<OutputLine>,
    exit: oneshot::Receiver<AgentExit>,
    control: Box<dyn AgentControl>,
    input: mpsc::Sender<String>,
}

impl LiveAgent {
    fn new(handle: AgentHandle) -> Self {
        LiveAgent {
            output: handle.output,
            exit: handle.exit,
            control: handle.control,
            input: handle.input.expect("session agents read stdin"),
        }
    }

    /// Ends the agent: its input closes (it exits by itself), then it is killed after
    /// `grace`, and its container removed.
    async fn stop(self, grace: Duration) -> AgentExit {
        let LiveAgent {
            mut output,
            exit,
            control,
            input,
        } = self;
        drop(input);
        let drain = tokio::spawn(async move { while output.recv().await.is_some() {} });
        let exit = match tokio::time::timeout(grace, exit).await {
            Ok(exit) => exit.unwrap_or_default(),
            Err(_) => {
                let _ = control.kill().await;
                AgentExit::default()
            }
        };
        drain.abort();
        control.release().await;
        exit
    }
}

/// How a turn ended.
enum TurnEnd {
    Answered(ResultEvent),
    /// The agent died: its exit and last stderr line.
    Died(AgentExit, Option<String>),
    /// Stopped by the supervisor: why.
    Stopped(String),
}

struct Actor {
    runtime: Arc<Runtime>,
    provider: Arc<dyn ExecutionProvider>,
    session_id: String,
    spec: SessionSpec,
    sink: SessionSink,
    workspace: PathBuf,
    config_dir: PathBuf,
    agent_session_id: Option<String>,
    /// Containers started so far, to name each one apart.
    incarnation: u32,
}

impl Runtime {
    /// Opens a session on this worker; its events go to `events` until it is closed. The
    /// session holds one of the worker's slots while it lives.
    pub async fn open_session(
        self: &Arc<Self>,
        session_id: String,
        spec: SessionSpec,
        events: mpsc::Sender<Event>,
    ) -> Result<(), WorkerError> {
        let valid = !session_id.is_empty()
            && session_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid {
            return Err(WorkerError::InvalidArgument {
                field: "session_id",
                message: "must be letters, digits, '-' or '_'".into(),
            });
        }
        let provider = self
            .provider(ExecutionMode::ContainerAgentic)
            .ok_or_else(|| WorkerError::ModeNotRun {
                worker_id: self.worker_id.clone(),
                mode: ExecutionMode::ContainerAgentic.label(),
            })?;
        let permit = self.take_slot().await?;
        let (commands, receiver) = mpsc::channel(16);
        if !self.register_session(&session_id, commands) {
            return Err(WorkerError::AlreadyRunning(session_id));
        }
        let root = self.workspaces().root().join("sessions").join(&session_id);
        let actor = Actor {
            runtime: self.clone(),
            provider,
            sink: SessionSink {
                sender: events,
                session_id: session_id.clone(),
                worker_id: self.worker_id.clone(),
            },
            session_id,
            spec,
            workspace: root.join("workspace"),
            config_dir: root.join("claude"),
            agent_session_id: None,
            incarnation: 0,
        };
        tokio::spawn(actor.run(receiver, permit));
        Ok(())
    }
}

impl Actor {
    fn idle_timeout(&self) -> Duration {
        match self.spec.idle_timeout_seconds {
            0 => self.runtime.config().agent.session_idle_timeout.get(),
            seconds => Duration::from_secs(seconds.into()),
        }
    }

    fn grace(&self) -> Duration {
        self.runtime.config().agent.cancel_grace_period.get()
    }

    fn workspace_text(&self) -> String {
        self.workspace.display().to_string()
    }

    async fn run(mut self, mut commands: mpsc::Receiver<Command>, permit: OwnedSemaphorePermit) {
        let mut agent = match self.prepare().await {
            Ok(()) => match self.start_agent().await {
                Ok(agent) => Some(agent),
                Err(reason) => {
                    self.failed(0, reason).await;
                    None
                }
            },
            Err(reason) => {
                self.failed(0, reason).await;
                None
            }
        };
        let mut failed = agent.is_none();
        if !failed {
            let reason = format!("agent started: {}", self.describe());
            self.sink
                .state(0, SessionState::Ready, reason, &self.workspace_text())
                .await;
        }
        let mut idle_deadline = Instant::now() + self.idle_timeout();
        loop {
            let has_agent = agent.is_some();
            let exited = async {
                match agent.as_mut() {
                    Some(live) => (&mut live.exit).await.unwrap_or_default(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                command = commands.recv() => match command {
                    Some(Command::Turn { turn, text }) => {
                        if failed {
                            continue;
                        }
                        let (live, end) = self.turn(agent.take(), turn, &text).await;
                        agent = live;
                        failed = self.after_turn(turn, end, &mut agent).await;
                        idle_deadline = Instant::now() + self.idle_timeout();
                    }
                    Some(Command::Close { done }) => {
                        if let Some(live) = agent.take() {
                            live.stop(self.grace()).await;
                        }
                        let root = self.workspace.parent().map(PathBuf::from);
                        if let Some(root) = root {
                            let _ = tokio::fs::remove_dir_all(root).await;
                        }
                        self.sink.state(0, SessionState::Closed, "closed by a client; its container and volumes are removed", "").await;
                        let _ = done.send(());
                        break;
                    }
                    None => break,
                },
                _ = sleep_until(idle_deadline), if has_agent => {
                    if let Some(live) = agent.take() {
                        live.stop(self.grace()).await;
                    }
                    let reason = format!(
                        "no message for {} s: its container is stopped; the workspace and the conversation are kept",
                        self.idle_timeout().as_secs()
                    );
                    self.sink.state(0, SessionState::Stopped, reason, "").await;
                }
                exit = exited => {
                    if let Some(live) = agent.take() {
                        live.control.release().await;
                    }
                    failed = true;
                    self.failed(0, format!("its agent's container {exit} while idle; the workspace is kept until the session is closed")).await;
                }
                _ = self.sink.sender.closed() => {
                    // The driver went away: stop the container, keep the volumes.
                    if let Some(live) = agent.take() {
                        live.stop(self.grace()).await;
                    }
                    break;
                }
                _ = self.runtime.shutting_down() => {
                    if let Some(live) = agent.take() {
                        live.stop(self.grace()).await;
                    }
                    self.sink.state(0, SessionState::Stopped, "the worker is shutting down", "").await;
                    break;
                }
            }
        }
        self.runtime.unregister_session(&self.session_id);
        drop(permit);
    }

    async fn failed(&self, turn: u32, reason: String) {
        tracing::warn!(session = %self.session_id, %reason, "session failed");
        self.sink
            .state(turn, SessionState::Failed, reason, "")
            .await;
    }

    fn describe(&self) -> String {
        format!(
            "container claudecluster-session-{}-{}",
            self.session_id, self.incarnation
        )
    }

    /// Makes the session's directories, clones its repository, and hands them to the
    /// container's user.
    async fn prepare(&self) -> Result<(), String> {
        for dir in [&self.workspace, &self.config_dir] {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
        }
        if !self.spec.repo_url.is_empty() {
            crate::workspace::clone(&self.spec.repo_url, &self.workspace).await?;
        }
        for dir in [&self.workspace, &self.config_dir] {
            self.provider
                .adopt_workspace(dir)
                .await
                .map_err(|err| err.0)?;
        }
        Ok(())
    }

    /// Starts the session's agent, resuming its conversation when it has one.
    async fn start_agent(&mut self) -> Result<LiveAgent, String> {
        self.incarnation += 1;
        let config = self.runtime.config();
        let options = AgentOptions::resolve(self.spec.agent.as_ref(), &config.agent);
        let mut args = warm_agent_args(&options);
        if let Some(id) = &self.agent_session_id {
            args.push("--resume".to_owned());
            args.push(id.clone());
        }
        let mut env = agent_env(&config.agent, std::env::vars(), []);
        env.push(("CLAUDE_CONFIG_DIR".to_owned(), CONFIG_MOUNT.to_owned()));
        let limits = self
            .spec
            .limits
            .as_ref()
            .map(|l| Limits {
                memory_bytes: l.memory_bytes,
                cpus: l.cpus,
                pids: l.pids,
            })
            .unwrap_or_default();
        let launch = AgentLaunch {
            task_id: format!("session-{}", self.session_id),
            attempt: self.incarnation,
            args,
            env,
            workspace: self.workspace.clone(),
            input: AgentInput::StreamJson,
            limits,
            mounts: vec![(self.config_dir.clone(), CONFIG_MOUNT.to_owned())],
        };
        let handle = self.provider.launch(launch).await.map_err(|err| err.0)?;
        Ok(LiveAgent::new(handle))
    }

    /// Answers one message; starts the agent first when its container was stopped.
    async fn turn(
        &mut self,
        agent: Option<LiveAgent>,
        turn: u32,
        text: &str,
    ) -> (Option<LiveAgent>, TurnEnd) {
        let mut agent = match agent {
            Some(agent) => agent,
            None => match self.start_agent().await {
                Ok(agent) => agent,
                Err(reason) => return (None, TurnEnd::Stopped(reason)),
            },
        };
        let reason = format!("answering message {turn}: {}", self.describe());
        self.sink.state(turn, SessionState::Busy, reason, "").await;
        if agent.input.send(user_message_line(text)).await.is_err() {
            let exit = agent.stop(self.grace()).await;
            return (None, TurnEnd::Died(exit, None));
        }
        let config = self.runtime.config();
        let timeout = self
            .spec
            .limits
            .as_ref()
            .map(|l| l.timeout_seconds)
            .filter(|seconds| *seconds > 0)
            .map(|seconds| Duration::from_secs(seconds.into()))
            .unwrap_or_else(|| {
                config.default_task_timeout(
                    claudecluster_config::ExecutionModeSetting::ContainerAgentic,
                )
            });
        let silence = config.agent.idle_timeout.get();
        let deadline = Instant::now() + timeout;
        let mut quiet_until = Instant::now() + silence;
        let mut result = None;
        let mut stderr_tail = VecDeque::with_capacity(STDERR_TAIL);
        let sink = self.sink.clone();
        loop {
            tokio::select! {
                line = agent.output.recv() => match line {
                    Some(line) => {
                        quiet_until = Instant::now() + silence;
                        handle_line(line, &mut result, &mut stderr_tail, &mut |kind| {
                            let sink = sink.clone();
                            async move { sink.emit(turn, kind).await }
                        }).await;
                        if let Some(answer) = result.take() {
                            let answer: ResultEvent = answer;
                            if !answer.session_id.is_empty() {
                                self.agent_session_id = Some(answer.session_id.clone());
                            }
                            return (Some(agent), TurnEnd::Answered(answer));
                        }
                    }
                    None => {
                        let exit = agent.stop(self.grace()).await;
                        return (None, TurnEnd::Died(exit, stderr_tail.pop_back()));
                    }
                },
                _ = sleep_until(deadline) => {
                    agent.stop(self.grace()).await;
                    return (None, TurnEnd::Stopped(format!("message {turn} timed out after {} s; the agent was stopped", timeout.as_secs())));
                }
                _ = sleep_until(quiet_until) => {
                    agent.stop(self.grace()).await;
                    return (None, TurnEnd::Stopped(format!("the agent printed nothing for {} s answering message {turn} and was stopped", silence.as_secs())));
                }
            }
        }
    }

    /// Reports how a turn ended; true when the session has failed.
    async fn after_turn(&mut self, turn: u32, end: TurnEnd, agent: &mut Option<LiveAgent>) -> bool {
        match end {
            TurnEnd::Answered(result) => {
                let reason = match result.failure_reason() {
                    Some(reason) => format!("message {turn} failed: {reason}"),
                    None => format!("message {turn} answered"),
                };
                self.sink.state(turn, SessionState::Idle, reason, "").await;
                false
            }
            TurnEnd::Stopped(reason) => {
                debug_assert!(agent.is_none());
                self.sink
                    .state(turn, SessionState::Stopped, reason, "")
                    .await;
                false
            }
            TurnEnd::Died(exit, stderr) => {
                let mut reason = format!("its agent's container {exit} answering message {turn}");
                if let Some(line) = stderr {
                    reason.push_str(": ");
                    reason.push_str(line.trim());
                }
                reason.push_str("; the workspace is kept until the session is closed");
                self.failed(turn, reason).await;
                true
            }
        }
    }
}
