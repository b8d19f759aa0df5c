//! Sessions: a long-lived agent in a container, message after message.
//!
//! Each session has a workspace and a Claude config directory on the worker, mounted into its
//! container at `/workspace` and `/claude-config`; they outlive the container. The agent is one
//! `claude -p --input-format stream-json` process that gets each message only after the
//! previous one's result. After the session's idle timeout the container is stopped; the next
//! message starts a new one that resumes the same conversation (`--resume`), with the same
//! files. Closing the session removes the container and both directories.
//!
//! One task (the session's actor) owns the agent and the driver's input, and handles one
//! input at a time, so turns never overlap.
//!
//! Like a task's run, a session belongs to the worker, not to the RunSession call: its events
//! go to a [`RunLog`] that callers follow and attach to again, and a call that ends or breaks
//! only leaves the session without input until a driver attaches again and hands it a new one.
//! A session nobody follows for `worker.driverLossTimeout`, or that the scheduler stops, has its
//! container stopped (its volumes stay) and ends here.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use claudecluster_agent_protocol::{ResultEvent, user_message_line};
use claudecluster_proto::v1::event::Kind;
use claudecluster_proto::v1::{self, Event, ExecutionMode, SessionSpec, SessionState};
use futures_util::{FutureExt, Stream, StreamExt};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::{Instant, sleep_until};

use crate::error::WorkerError;
use crate::execution::supervisor::{Cancellation, STDERR_TAIL, handle_line};
use crate::execution::{
    AgentControl, AgentExit, AgentHandle, AgentInput, AgentLaunch, AgentOptions, ExecutionProvider,
    Limits, OutputLine, warm_agent_args,
};
use crate::run_log::RunLog;
use crate::runs::{LiveSession, SessionRecord, WorkId};
use crate::runtime::{LogEnd, Runtime, Slot, check_position};

/// Where a session's agent finds its Claude state inside the container.
const CONFIG_MOUNT: &str = "/claude-config";

/// What a driver sends a session after opening or attaching to it.
#[derive(Debug)]
pub enum Input {
    Turn { turn: u32, text: String },
    Close,
}

/// A driver's input to a session, in the order it was sent; it ends when the driver's call does.
pub type Inputs = Pin<Box<dyn Stream<Item = Input> + Send>>;

/// Where a driver that attaches leaves its input for the session's actor, which reads it from
/// then on. Only the newest counts: one left unread is replaced.
#[derive(Default)]
pub struct InputHandover {
    next: Mutex<Option<Inputs>>,
    left: Notify,
}

impl InputHandover {
    fn hand_over(&self, inputs: Inputs) {
        *self.next.lock().unwrap_or_else(PoisonError::into_inner) = Some(inputs);
        self.left.notify_one();
    }

    /// The next input handed over.
    async fn next(&self) -> Inputs {
        loop {
            if let Some(inputs) = self
                .next
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take()
            {
                return inputs;
            }
            // A handover between the look and here left a permit: this completes at once.
            self.left.notified().await;
        }
    }
}

/// Where a session's events go: its log.
#[derive(Clone)]
struct SessionSink {
    log: Arc<RunLog>,
    session_id: String,
    worker_id: String,
}

impl SessionSink {
    fn event(&self, turn: u32, kind: Kind) -> Event {
        Event {
            session_id: self.session_id.clone(),
            turn,
            kind: Some(kind),
            ..Event::default()
        }
    }

    fn emit(&self, turn: u32, kind: Kind) {
        self.log.append(self.event(turn, kind));
    }

    fn state_event(
        &self,
        turn: u32,
        state: SessionState,
        reason: impl Into<String>,
        workspace: &str,
    ) -> Event {
        let change = v1::SessionStateChange {
            state: state as i32,
            reason: reason.into(),
            worker_id: self.worker_id.clone(),
            workspace: workspace.to_owned(),
        };
        self.event(turn, Kind::SessionState(change))
    }

    fn state(&self, turn: u32, state: SessionState, reason: impl Into<String>, workspace: &str) {
        self.log
            .append(self.state_event(turn, state, reason, workspace));
    }
}

/// The running agent of a session.
struct LiveAgent {
    output: mpsc::Receiver<OutputLine>,
    exit: oneshot::Receiver<AgentExit>,
    control: Box<dyn AgentControl>,
    input: mpsc::Sender<String>,
    /// The agent's token at the credential proxy, revoked with the agent.
    _grant: Option<crate::proxy::Grant>,
}

impl LiveAgent {
    fn new(handle: AgentHandle) -> Self {
        LiveAgent {
            output: handle.output,
            exit: handle.exit,
            control: handle.control,
            input: handle.input.expect("session agents read stdin"),
            _grant: handle.grant,
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
            // Revoked once this returns: the agent has ended.
            _grant,
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
    /// Stops the container (keeping the volumes) and ends the session here, even mid-turn.
    stop: Cancellation,
    workspace: PathBuf,
    config_dir: PathBuf,
    agent_session_id: Option<String>,
    /// Containers started so far, to name each one apart.
    incarnation: u32,
    /// The highest message (turn) taken: a driver that restarted sends the message it was
    /// answering again, and it is answered once.
    last_turn: u32,
}

impl Runtime {
    /// Opens a session on this worker, reading `inputs`, and returns its log. The session
    /// holds one of the worker's slots while it lives.
    pub async fn open_session(
        self: &Arc<Self>,
        session_id: String,
        spec: SessionSpec,
        inputs: Inputs,
    ) -> Result<Arc<RunLog>, WorkerError> {
        crate::runtime::check_id("session_id", &session_id)?;
        claudecluster_proto::validate::session_spec(&spec)?;
        let needs = claudecluster_proto::v1::TaskNeeds::of_session(&spec);
        if let Some(refusal) = self.admits().refusal(&needs) {
            return Err(refusal.into());
        }
        self.refuse_if_shutting_down()?;
        let provider = self
            .provider(ExecutionMode::ContainerAgentic)
            .ok_or_else(|| WorkerError::ModeNotRun {
                worker_id: self.worker_id.clone(),
                mode: ExecutionMode::ContainerAgentic.label(),
            })?;
        let permit = self.take_slot().await?;
        let handover = Arc::new(InputHandover::default());
        let stop = Cancellation::default();
        let log = self.new_log(
            format!("session {session_id}"),
            &format!("session-{session_id}"),
        );
        let slot = {
            let mut runs = self.runs();
            self.refuse_if_not_accepting(&runs)?;
            let record = SessionRecord {
                log: log.clone(),
                live: Some(LiveSession {
                    handover: handover.clone(),
                    stop: stop.clone(),
                }),
            };
            runs.open_session(&session_id, record)?;
            self.hold(&mut runs, WorkId::session(&session_id), permit)
        };
        let root = self.workspaces().root().join("sessions").join(&session_id);
        let sink = SessionSink {
            log: log.clone(),
            session_id: session_id.clone(),
            worker_id: self.worker_id.clone(),
        };
        let end = LogEnd::new(
            log.clone(),
            sink.state_event(
                0,
                SessionState::Failed,
                "the session stopped on the worker without an outcome",
                "",
            ),
        );
        let actor = Actor {
            runtime: self.clone(),
            provider,
            sink,
            stop,
            session_id,
            spec,
            workspace: root.join("workspace"),
            config_dir: root.join("claude"),
            agent_session_id: None,
            incarnation: 0,
            last_turn: 0,
        };
        tokio::spawn(actor.run(inputs, handover, end, slot));
        Ok(log)
    }

    /// The log of the session held here, to follow after `after_run_sequence`. A session that
    /// still runs reads `inputs` from now on, instead of the input of the driver before.
    pub fn attach_session(
        &self,
        session_id: &str,
        after_run_sequence: u64,
        inputs: Inputs,
    ) -> Result<Arc<RunLog>, WorkerError> {
        crate::runtime::check_id("session_id", session_id)?;
        let (log, handover) = {
            let mut runs = self.runs();
            self.sweep(&mut runs);
            let handover = runs
                .live_session(session_id)
                .map(|live| live.handover.clone());
            (runs.session_log(session_id), handover)
        };
        let log = log.ok_or_else(|| WorkerError::SessionNotHere(session_id.to_owned()))?;
        check_position(&log, after_run_sequence)?;
        // A session that ended takes no more input; its log still tells the driver how it ended.
        if let Some(handover) = handover {
            handover.hand_over(inputs);
        }
        tracing::info!(session = %session_id, after_run_sequence, "a driver attached");
        Ok(log)
    }

    /// Stops a session's container (its volumes stay) and ends it here. False when it is not
    /// open here.
    pub fn stop_session(&self, session_id: &str, reason: &str) -> bool {
        match self.runs().live_session(session_id) {
            Some(live) => {
                live.stop.cancel(reason);
                true
            }
            None => false,
        }
    }
}

impl Actor {
    /// What the session's agents run as, for the provider: `session-<id>`.
    fn agent_name(&self) -> String {
        format!("session-{}", self.session_id)
    }

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

    /// Serves the session until it is closed or stopped; a session nobody follows for
    /// `worker.driverLossTimeout` is stopped.
    async fn run(mut self, inputs: Inputs, handover: Arc<InputHandover>, end: LogEnd, slot: Slot) {
        let loss_timeout = self.runtime.config().driver_loss_timeout.get();
        let (log, stop) = (self.sink.log.clone(), self.stop.clone());
        let session_id = self.session_id.clone();
        let abandoned = async move {
            log.abandoned(loss_timeout).await;
            tracing::warn!(session = %session_id, "no driver attached; stopping the session");
            stop.cancel(format!(
                "no driver attached for {} s",
                loss_timeout.as_secs()
            ));
            std::future::pending::<Infallible>().await
        };
        tokio::select! {
            () = self.serve(inputs, &handover) => {}
            never = abandoned => match never {},
        }
        drop(slot);
        end.finish();
    }

    /// Reads one driver's input at a time: the one that opened the session, then that of each
    /// driver that attaches. Without one (its call ended) the session waits for the next.
    async fn serve(&mut self, inputs: Inputs, handover: &InputHandover) {
        let mut inputs = Some(inputs);
        let mut agent = match self.prepare().await {
            Ok(()) => match self.start_agent().await {
                Ok(agent) => Some(agent),
                Err(reason) => {
                    self.failed(0, reason);
                    None
                }
            },
            Err(reason) => {
                self.failed(0, reason);
                None
            }
        };
        let mut failed = agent.is_none();
        if !failed {
            let reason = format!("agent started: {}", self.describe());
            self.sink
                .state(0, SessionState::Ready, reason, &self.workspace_text());
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
            let input = async {
                match inputs.as_mut() {
                    Some(inputs) => inputs.next().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                input = input => match input {
                    Some(Input::Turn { turn, text }) => {
                        // A driver that attached again sends the turn it was answering once
                        // more: it is answered once.
                        if failed || turn <= self.last_turn {
                            continue;
                        }
                        if self.runtime.refuse_if_shutting_down().is_err() {
                            self.stopped(turn, agent.take(), "the worker is shutting down".into()).await;
                            break;
                        }
                        self.last_turn = turn;
                        let (live, end) = self.turn(agent.take(), turn, &text).await;
                        agent = live;
                        failed = self.after_turn(turn, end, &mut agent);
                        idle_deadline = Instant::now() + self.idle_timeout();
                        if self.stop.is_cancelled() {
                            // The turn was cut short by the stop, and said so.
                            break;
                        }
                    }
                    Some(Input::Close) => {
                        if let Some(live) = agent.take() {
                            live.stop(self.grace()).await;
                        }
                        let root = self.workspace.parent().map(PathBuf::from);
                        if let Some(root) = root {
                            let _ = tokio::fs::remove_dir_all(root).await;
                        }
                        self.provider.discard_session(&self.agent_name()).await;
                        self.sink.state(0, SessionState::Closed, "closed by a client; its container and volumes are removed", "");
                        break;
                    }
                    // The driver's call ended: the session goes on until one attaches again.
                    None => inputs = None,
                },
                next = handover.next() => {
                    // What the driver before sent and this one may not know of is read first.
                    let mut unread = Vec::new();
                    while let Some(Some(input)) = inputs.as_mut().and_then(|old| old.next().now_or_never()) {
                        unread.push(input);
                    }
                    inputs = Some(futures_util::stream::iter(unread).chain(next).boxed());
                }
                _ = sleep_until(idle_deadline), if has_agent => {
                    if let Some(live) = agent.take() {
                        live.stop(self.grace()).await;
                    }
                    let reason = format!(
                        "no message for {} s: its container is stopped; the workspace and the conversation are kept",
                        self.idle_timeout().as_secs()
                    );
                    self.sink.state(0, SessionState::Stopped, reason, "");
                }
                exit = exited => {
                    if let Some(live) = agent.take() {
                        live.control.release().await;
                    }
                    failed = true;
                    self.failed(0, format!("its agent's container {exit} while idle; the workspace is kept until the session is closed"));
                }
                reason = self.stop.cancelled() => {
                    self.stopped(0, agent.take(), reason).await;
                    break;
                }
                // Between turns nothing is lost by stopping at once.
                _ = self.runtime.shutting_down() => {
                    self.stopped(0, agent.take(), "the worker is shutting down".into()).await;
                    break;
                }
            }
        }
    }

    /// Stops the agent's container, keeping the volumes, and says so; with the turn it leaves
    /// unanswered, if any.
    async fn stopped(&self, turn: u32, agent: Option<LiveAgent>, reason: String) {
        if let Some(live) = agent {
            live.stop(self.grace()).await;
        }
        tracing::info!(session = %self.session_id, %reason, "session stopped");
        let reason = match turn {
            0 => format!("{reason}: its container is stopped; the workspace is kept"),
            turn => format!(
                "{reason}: message {turn} was not answered; its container is stopped and the workspace is kept"
            ),
        };
        self.sink.state(turn, SessionState::Stopped, reason, "");
    }

    fn failed(&self, turn: u32, reason: String) {
        tracing::warn!(session = %self.session_id, %reason, "session failed");
        self.sink.state(turn, SessionState::Failed, reason, "");
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
            self.runtime
                .workspaces()
                .clone_into(&self.spec.repo_url, &self.workspace)
                .await?;
        }
        // Recorded while the worker still owns what it cloned.
        self.runtime
            .results()
            .start_session(&self.session_id, &self.workspace)
            .await?;
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
        let (mut env, grant) = self
            .runtime
            .agent_environment([], &format!("session {}", self.session_id));
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
            task_id: self.agent_name(),
            attempt: self.incarnation,
            args,
            env,
            workspace: self.workspace.clone(),
            input: AgentInput::StreamJson,
            limits,
            mounts: vec![(self.config_dir.clone(), CONFIG_MOUNT.to_owned())],
            repo_url: None,
        };
        let mut handle = self.provider.launch(launch).await.map_err(|err| err.0)?;
        handle.grant = grant;
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
        self.sink.state(turn, SessionState::Busy, reason, "");
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
        let max_line_bytes = config.agent.max_line_bytes.0 as usize;
        let deadline = Instant::now() + timeout;
        let mut quiet_until = Instant::now() + silence;
        let mut result = None;
        let mut stderr_tail = VecDeque::with_capacity(STDERR_TAIL);
        let sink = self.sink.clone();
        let stop = self.stop.clone();
        loop {
            tokio::select! {
                line = agent.output.recv() => match line {
                    Some(line) => {
                        quiet_until = Instant::now() + silence;
                        handle_line(line, max_line_bytes, &mut result, &mut stderr_tail, &mut |kind| {
                            sink.emit(turn, kind);
                            std::future::ready(())
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
                reason = stop.cancelled() => {
                    agent.stop(self.grace()).await;
                    return (None, TurnEnd::Stopped(format!("{reason}: message {turn} was cut short; its container is stopped and the workspace is kept")));
                }
            }
        }
    }

    /// Reports how a turn ended; true when the session has failed.
    fn after_turn(&mut self, turn: u32, end: TurnEnd, agent: &mut Option<LiveAgent>) -> bool {
        match end {
            TurnEnd::Answered(result) => {
                let reason = match result.failure_reason() {
                    Some(reason) => format!("message {turn} failed: {reason}"),
                    None => format!("message {turn} answered"),
                };
                self.sink.state(turn, SessionState::Idle, reason, "");
                false
            }
            TurnEnd::Stopped(reason) => {
                debug_assert!(agent.is_none());
                self.sink.state(turn, SessionState::Stopped, reason, "");
                false
            }
            TurnEnd::Died(exit, stderr) => {
                let mut reason = format!("its agent's container {exit} answering message {turn}");
                if let Some(line) = stderr {
                    reason.push_str(": ");
                    reason.push_str(line.trim());
                }
                reason.push_str("; the workspace is kept until the session is closed");
                self.failed(turn, reason);
                true
            }
        }
    }
}
