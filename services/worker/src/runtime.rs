//! The worker's core: accepts tasks, runs them through its providers, keeps count.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use claudecluster_agent_protocol::user_message_line;
use claudecluster_config::{ExecutionModeSetting, WorkerConfig};
use claudecluster_proto::v1::event::Kind;
use claudecluster_proto::v1::{Event, ExecutionMode, TaskSpec, TaskStatus};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::error::WorkerError;
use crate::events;
use crate::execution::supervisor::{self, Cancellation, Outcome, Supervision};
use crate::execution::{
    AgentHandle, AgentInput, AgentLaunch, AgentOptions, ExecutionProvider, Limits, ProviderHealth,
    Providers, WarmPool, WarmTemplate, agent_args, agent_env, warm_agent_args,
};
use crate::workspace::Workspaces;

/// A task accepted by the worker.
pub struct Execution {
    pub task_id: String,
    pub attempt: u32,
    pub spec: TaskSpec,
}

pub fn mode_setting(mode: ExecutionMode) -> ExecutionModeSetting {
    match mode {
        ExecutionMode::ContainerAgentic => ExecutionModeSetting::ContainerAgentic,
        _ => ExecutionModeSetting::ProcessPool,
    }
}

pub struct Runtime {
    pub worker_id: String,
    config: WorkerConfig,
    /// Swapped whole when the worker switches modes.
    providers: std::sync::RwLock<Arc<Providers>>,
    warm_pools: Mutex<HashMap<ExecutionMode, Arc<WarmPool>>>,
    /// Switching modes: the worker says it is unavailable so nothing new is placed.
    switching: std::sync::atomic::AtomicBool,
    /// Asks the scheduler link to register again (with new modes) at once.
    reregister: tokio::sync::Notify,
    /// Counts the scheduler's confirmations of this worker's registration.
    registrations: tokio::sync::watch::Sender<u64>,
    /// Tasks and sessions at once: `maxConcurrentTasks`, or the default mode's pool size.
    capacity: std::sync::atomic::AtomicU32,
    workspaces: Workspaces,
    slots: Arc<Semaphore>,
    running: Mutex<HashMap<String, Cancellation>>,
    sessions: Mutex<HashMap<String, mpsc::Sender<crate::session::Command>>>,
    /// Signalled whenever a session ends, for shutdown to wait on.
    session_ended: tokio::sync::Notify,
    /// The scheduler places nothing more here; the worker reports when nothing runs.
    draining: std::sync::atomic::AtomicBool,
    shutting_down: Cancellation,
}

impl Runtime {
    pub fn new(worker_id: String, config: WorkerConfig, providers: Providers) -> Self {
        let capacity = config.capacity();
        let workspaces = Workspaces::new(
            config
                .workspace_root
                .clone()
                .unwrap_or_else(Workspaces::default_root),
        );
        let runtime = Runtime {
            worker_id,
            slots: Arc::new(Semaphore::new(capacity as usize)),
            config,
            providers: std::sync::RwLock::new(Arc::new(providers)),
            warm_pools: Mutex::default(),
            switching: std::sync::atomic::AtomicBool::new(false),
            reregister: tokio::sync::Notify::new(),
            registrations: tokio::sync::watch::Sender::new(0),
            capacity: std::sync::atomic::AtomicU32::new(capacity),
            workspaces,
            running: Mutex::default(),
            sessions: Mutex::default(),
            session_ended: tokio::sync::Notify::new(),
            draining: std::sync::atomic::AtomicBool::new(false),
            shutting_down: Cancellation::default(),
        };
        runtime.start_warm_pools();
        runtime
    }

    /// Starts the warm pools the configuration asks for, one per provider.
    fn start_warm_pools(&self) {
        let options = AgentOptions::resolve(None, &self.config.agent);
        let template = WarmTemplate {
            args: warm_agent_args(&options),
            env: agent_env(&self.config.agent, std::env::vars(), []),
            options,
        };
        let providers = self.providers();
        let mut pools = self.warm_pools.lock().expect("warm pool lock poisoned");
        for mode in providers.modes() {
            let size = match mode_setting(mode) {
                ExecutionModeSetting::ProcessPool => self.config.process_pool.warm_pool_size,
                ExecutionModeSetting::ContainerAgentic => self.config.container.warm_pool_size,
            };
            let Some(provider) = providers.get(mode) else {
                continue;
            };
            if size > 0 {
                tracing::info!(mode = mode.label(), size, "keeping warm agents");
                let pool = WarmPool::start(
                    provider.clone(),
                    template.clone(),
                    self.workspaces.clone(),
                    size as usize,
                );
                pools.insert(mode, pool);
            }
        }
    }

    pub fn config(&self) -> &WorkerConfig {
        &self.config
    }

    fn providers(&self) -> Arc<Providers> {
        self.providers
            .read()
            .expect("provider lock poisoned")
            .clone()
    }

    pub fn mode(&self) -> ExecutionMode {
        self.providers().default_mode()
    }

    pub fn modes(&self) -> Vec<ExecutionMode> {
        self.providers().modes()
    }

    pub fn capacity(&self) -> u32 {
        self.capacity.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Takes `capacity` as the worker's number of slots. Called while nothing runs.
    fn resize(&self, capacity: u32) {
        let before = self
            .capacity
            .swap(capacity, std::sync::atomic::Ordering::SeqCst);
        if capacity > before {
            self.slots.add_permits((capacity - before) as usize);
        } else if before > capacity {
            self.slots.forget_permits((before - capacity) as usize);
        }
    }

    pub fn idle_warm_agents(&self) -> u32 {
        self.warm_pools
            .lock()
            .expect("warm pool lock poisoned")
            .values()
            .map(|pool| pool.idle_count() as u32)
            .sum()
    }

    pub fn provider(&self, mode: ExecutionMode) -> Option<Arc<dyn ExecutionProvider>> {
        self.providers().get(mode).cloned()
    }

    pub fn workspaces(&self) -> &Workspaces {
        &self.workspaces
    }

    /// A slot for a task or session, if the worker has one free and can work.
    pub async fn take_slot(&self) -> Result<OwnedSemaphorePermit, WorkerError> {
        if self.shutting_down.is_cancelled() {
            return Err(WorkerError::ShuttingDown(self.worker_id.clone()));
        }
        // Not `health()`: work placed just before a mode switch began still runs.
        if let ProviderHealth::Unavailable(reason) = self.providers().health().await {
            return Err(WorkerError::Unavailable {
                worker_id: self.worker_id.clone(),
                reason,
            });
        }
        self.slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| WorkerError::AtCapacity {
                worker_id: self.worker_id.clone(),
                capacity: self.capacity(),
            })
    }

    /// Records a session's command channel; false when the session is already open here.
    pub fn register_session(
        &self,
        session_id: &str,
        commands: mpsc::Sender<crate::session::Command>,
    ) -> bool {
        let mut sessions = self.sessions.lock().expect("session lock poisoned");
        if sessions.contains_key(session_id) {
            return false;
        }
        sessions.insert(session_id.to_owned(), commands);
        true
    }

    pub fn unregister_session(&self, session_id: &str) {
        self.sessions
            .lock()
            .expect("session lock poisoned")
            .remove(session_id);
        self.session_ended.notify_waiters();
    }

    async fn stop_warm_pools(&self) {
        let pools: Vec<Arc<WarmPool>> = self
            .warm_pools
            .lock()
            .expect("warm pool lock poisoned")
            .drain()
            .map(|(_, pool)| pool)
            .collect();
        for pool in pools {
            pool.shutdown().await;
        }
    }

    /// Completes when the worker should register with the scheduler again.
    pub async fn reregistration_requested(&self) {
        self.reregister.notified().await
    }

    /// The scheduler confirmed a registration of this worker.
    pub fn registered(&self) {
        self.registrations.send_modify(|count| *count += 1);
    }

    /// Makes `mode` the worker's default mode without restarting it: it reports itself
    /// unavailable (nothing new is placed), waits for what runs to finish, starts the new
    /// mode's providers and warm pools, and registers again. Returns the new modes, the drain
    /// time and the switch time after the drain.
    pub async fn switch_mode(
        &self,
        mode: ExecutionMode,
    ) -> Result<(Vec<ExecutionMode>, Duration, Duration), WorkerError> {
        if mode == ExecutionMode::Unspecified {
            return Err(WorkerError::InvalidArgument {
                field: "execution_mode",
                message: "must be process_pool or container_agentic".into(),
            });
        }
        if mode == self.mode() {
            return Ok((self.modes(), Duration::ZERO, Duration::ZERO));
        }
        if self
            .switching
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return Err(WorkerError::Switching(self.worker_id.clone()));
        }
        tracing::info!(to = mode.label(), "switching execution mode");
        let draining = Instant::now();
        while !(self.running().is_empty() && self.open_sessions() == 0) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let drain = draining.elapsed();
        let switching = Instant::now();
        let mut config = self.config.clone();
        config.execution_mode = mode_setting(mode);
        config.feature_flags.default_execution_mode = None;
        let built = Providers::for_config(&config, &self.worker_id).await;
        let providers = match built {
            Ok(providers) => providers,
            Err(reason) => {
                self.switching
                    .store(false, std::sync::atomic::Ordering::SeqCst);
                return Err(WorkerError::Unavailable {
                    worker_id: self.worker_id.clone(),
                    reason,
                });
            }
        };
        self.stop_warm_pools().await;
        *self.providers.write().expect("provider lock poisoned") = Arc::new(providers);
        self.resize(config.capacity());
        self.start_warm_pools();
        let mut confirmations = self.registrations.subscribe();
        confirmations.mark_unchanged();
        self.switching
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self.reregister.notify_one();
        let confirmed =
            tokio::time::timeout(Duration::from_secs(10), confirmations.changed()).await;
        if !matches!(confirmed, Ok(Ok(()))) {
            tracing::warn!("the scheduler did not confirm the new registration within 10 s");
        }
        let switched = switching.elapsed();
        tracing::info!(modes = ?self.modes().iter().map(|m| m.label()).collect::<Vec<_>>(), ?drain, ?switched, "execution mode switched");
        Ok((self.modes(), drain, switched))
    }

    /// The scheduler stopped placing work here. Work already placed still runs: the scheduler
    /// is the gate, so nothing placed before the drain is lost.
    pub fn start_draining(&self) {
        if !self
            .draining
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            tracing::info!(worker = %self.worker_id, "draining");
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Draining, and no task or session runs any more.
    pub fn is_drained(&self) -> bool {
        self.is_draining() && self.running().is_empty() && self.open_sessions() == 0
    }

    fn open_sessions(&self) -> usize {
        self.sessions.lock().expect("session lock poisoned").len()
    }

    /// Hands a command to an open session.
    pub async fn session_command(
        &self,
        session_id: &str,
        command: crate::session::Command,
    ) -> Result<(), WorkerError> {
        let commands = self
            .sessions
            .lock()
            .expect("session lock poisoned")
            .get(session_id)
            .cloned()
            .ok_or_else(|| WorkerError::SessionNotHere(session_id.to_owned()))?;
        commands
            .send(command)
            .await
            .map_err(|_| WorkerError::SessionNotHere(session_id.to_owned()))
    }

    /// Completes when the worker starts shutting down.
    pub async fn shutting_down(&self) {
        self.shutting_down.cancelled().await;
    }

    pub fn running_task_ids(&self) -> Vec<String> {
        let mut ids: Vec<_> = self.running().keys().cloned().collect();
        ids.sort();
        ids
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<String, Cancellation>> {
        self.running.lock().expect("running-task lock poisoned")
    }

    pub async fn health(&self) -> ProviderHealth {
        if self.shutting_down.is_cancelled() {
            return ProviderHealth::Unavailable("shutting down".into());
        }
        if self.switching.load(std::sync::atomic::Ordering::SeqCst) {
            return ProviderHealth::Unavailable("switching execution mode".into());
        }
        self.providers().health().await
    }

    /// Asks a running task to stop. False when it is not running here.
    pub fn cancel(&self, task_id: &str, reason: &str) -> bool {
        match self.running().get(task_id) {
            Some(cancel) => {
                cancel.cancel(reason);
                true
            }
            None => false,
        }
    }

    /// Stops every running task and idle agent; new tasks are refused.
    pub async fn shut_down(&self) {
        self.shutting_down.cancel("the worker is shutting down");
        for cancel in self.running().values() {
            cancel.cancel("the worker is shutting down");
        }
        self.stop_warm_pools().await;
        // Sessions stop their containers (keeping their volumes) before the worker goes.
        let bound = self.config.agent.cancel_grace_period.get() + Duration::from_secs(10);
        let all_ended = async {
            loop {
                let ended = self.session_ended.notified();
                if self.open_sessions() == 0 {
                    break;
                }
                ended.await;
            }
        };
        if tokio::time::timeout(bound, all_ended).await.is_err() {
            tracing::warn!(
                sessions = self.open_sessions(),
                "sessions still stopping at shutdown"
            );
        }
    }

    /// Accepts `execution`, or says why not. The returned [`Admission`] runs it.
    pub async fn admit(self: &Arc<Self>, execution: Execution) -> Result<Admission, WorkerError> {
        if execution.task_id.is_empty()
            || !execution
                .task_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(WorkerError::InvalidArgument {
                field: "task_id",
                message: "must be letters, digits, '-' or '_'".into(),
            });
        }
        if execution.spec.prompt.trim().is_empty() {
            return Err(WorkerError::InvalidArgument {
                field: "spec.prompt",
                message: "must not be empty".into(),
            });
        }
        let mode = execution.spec.execution_mode();
        if self.providers().get(mode).is_none() {
            return Err(WorkerError::ModeNotRun {
                worker_id: self.worker_id.clone(),
                mode: mode.label(),
            });
        }
        let permit = self.take_slot().await?;
        let cancel = Cancellation::default();
        {
            let mut running = self.running();
            if running.contains_key(&execution.task_id) {
                return Err(WorkerError::AlreadyRunning(execution.task_id));
            }
            running.insert(execution.task_id.clone(), cancel.clone());
        }
        Ok(Admission {
            runtime: self.clone(),
            execution,
            cancel,
            _permit: permit,
        })
    }

    /// A warm agent for a task of `mode` with `options` and `limits`, if one fits and is ready.
    fn warm_agent(
        &self,
        mode: ExecutionMode,
        options: &AgentOptions,
        limits: Limits,
        spec: &TaskSpec,
    ) -> Option<crate::execution::WarmAgent> {
        let pool = self
            .warm_pools
            .lock()
            .expect("warm pool lock poisoned")
            .get(&mode)?
            .clone();
        // A warm agent was started with the worker's defaults: options, limits, environment.
        if pool.options() != options || limits != Limits::default() || !spec.environment.is_empty()
        {
            return None;
        }
        pool.take()
    }

    async fn execute(
        &self,
        execution: &Execution,
        cancel: &Cancellation,
        events: &EventSink,
    ) -> Outcome {
        let spec = &execution.spec;
        let provider = self
            .providers()
            .get(spec.execution_mode())
            .cloned()
            .expect("admission checked the mode");
        let mode = provider.mode();
        let options = AgentOptions::resolve(spec.agent.as_ref(), &self.config.agent);
        let limits = spec
            .limits
            .as_ref()
            .map(|l| Limits {
                memory_bytes: l.memory_bytes,
                cpus: l.cpus,
                pids: l.pids,
            })
            .unwrap_or_default();
        let started = tokio::select! {
            started = self.start_agent(&provider, execution, &options, limits) => started,
            reason = cancel.cancelled() => return Outcome {
                status: TaskStatus::Cancelled,
                reason,
                result: None,
            },
        };
        let (agent, workspace, how) = match started {
            Ok(started) => started,
            Err(reason) => return Outcome::failed(reason),
        };
        tracing::info!(task = %execution.task_id, attempt = execution.attempt, mode = mode.label(), workspace = %workspace.display(), "{how}");
        events
            .emit(events::running(
                format!("{how} in {}: {}", workspace.display(), agent.description),
                &self.worker_id,
                &workspace,
                &agent.description,
            ))
            .await;
        let timeout = spec
            .limits
            .as_ref()
            .map(|limits| limits.timeout_seconds)
            .filter(|seconds| *seconds > 0)
            .map(|seconds| Duration::from_secs(seconds.into()))
            .unwrap_or_else(|| self.config.default_task_timeout(mode_setting(mode)));
        let supervision = Supervision {
            timeout,
            idle_timeout: self.config.agent.idle_timeout.get(),
            grace_period: self.config.agent.cancel_grace_period.get(),
        };
        supervisor::supervise(agent, supervision, cancel, |kind| events.emit(kind)).await
    }

    /// Starts the task's agent: a warm one when one fits, otherwise a new one. Returns the
    /// agent, its workspace and how it was started.
    async fn start_agent(
        &self,
        provider: &Arc<dyn ExecutionProvider>,
        execution: &Execution,
        options: &AgentOptions,
        limits: Limits,
    ) -> Result<(AgentHandle, PathBuf, String), String> {
        let spec = &execution.spec;
        if let Some(warm) = self.warm_agent(provider.mode(), options, limits, spec) {
            let handed_out = Instant::now();
            if !spec.repo_url.is_empty() {
                crate::workspace::clone(&spec.repo_url, &warm.workspace).await?;
                provider
                    .adopt_workspace(&warm.workspace)
                    .await
                    .map_err(|err| err.0)?;
            }
            let input = warm.handle.input.as_ref().expect("warm agents read stdin");
            input
                .send(user_message_line(&spec.prompt))
                .await
                .map_err(|_| "the warm agent went away before its task".to_owned())?;
            let how = format!(
                "warm agent handed out in {:.3} ms",
                handed_out.elapsed().as_secs_f64() * 1000.0
            );
            return Ok((warm.handle, warm.workspace, how));
        }
        let workspace = self
            .workspaces
            .prepare(&execution.task_id, execution.attempt, &spec.repo_url)
            .await?;
        provider
            .adopt_workspace(&workspace)
            .await
            .map_err(|err| err.0)?;
        let launch = AgentLaunch {
            task_id: execution.task_id.clone(),
            attempt: execution.attempt,
            args: agent_args(&spec.prompt, options),
            env: agent_env(
                &self.config.agent,
                std::env::vars(),
                spec.environment.clone(),
            ),
            workspace: workspace.clone(),
            input: AgentInput::None,
            limits,
            mounts: Vec::new(),
        };
        let agent = provider.launch(launch).await.map_err(|err| err.0)?;
        Ok((agent, workspace, "agent started".to_owned()))
    }
}

/// A task the worker accepted; [`Admission::run`] runs it to the end.
pub struct Admission {
    runtime: Arc<Runtime>,
    execution: Execution,
    cancel: Cancellation,
    _permit: OwnedSemaphorePermit,
}

impl Admission {
    /// Runs the task, sending its events to `events`; ends with a terminal status event.
    /// When `events` closes (the caller went away) the task is cancelled.
    pub async fn run(self, events: EventSink) {
        let Admission {
            runtime,
            execution,
            cancel,
            _permit: permit,
        } = self;
        let watcher = {
            let events = events.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move {
                events.closed().await;
                cancel.cancel("the driver went away");
            })
        };
        let outcome = runtime.execute(&execution, &cancel, &events).await;
        watcher.abort();
        tracing::info!(task = %execution.task_id, status = outcome.status.label(), reason = %outcome.reason, "task ended");
        // The slot is free before the terminal event goes out: whoever reacts to it by sending
        // the next task must find room.
        runtime.running().remove(&execution.task_id);
        drop(permit);
        events
            .emit(events::status_change(
                outcome.status,
                outcome.reason,
                &runtime.worker_id,
            ))
            .await;
    }
}

/// Where a task's events go: the ExecuteTask response stream.
#[derive(Clone)]
pub struct EventSink {
    sender: mpsc::Sender<Event>,
    task_id: String,
    attempt: u32,
}

impl EventSink {
    pub fn new(sender: mpsc::Sender<Event>, task_id: String, attempt: u32) -> Self {
        EventSink {
            sender,
            task_id,
            attempt,
        }
    }

    pub async fn emit(&self, kind: Kind) {
        let event = Event {
            task_id: self.task_id.clone(),
            attempt: self.attempt,
            kind: Some(kind),
            ..Event::default()
        };
        // A closed stream means the caller left; the watcher cancels the task.
        let _ = self.sender.send(event).await;
    }

    async fn closed(&self) {
        self.sender.closed().await
    }
}
