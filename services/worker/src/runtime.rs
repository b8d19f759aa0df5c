//! The worker's core: accepts tasks, runs them through its providers, keeps count.
//!
//! A task's run belongs to the worker, not to the call that started it: its events go to a
//! [`RunLog`] that callers follow and attach to again, and it is stopped only by a cancel, a
//! newer attempt, the scheduler, the worker's shutdown, or nobody attaching for
//! `worker.driverLossTimeout`. Whatever holds a slot holds it through a [`Slot`], which gives
//! it back when dropped, however the run ends.

use crate::metrics::mode_label;
use std::collections::HashMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tracing::Instrument;

use claudecluster_agent_protocol::user_message_line;
use claudecluster_config::{ExecutionModeSetting, WorkerConfig};
use claudecluster_proto::v1::event::Kind;
use claudecluster_proto::v1::{
    BranchResult, ChangeSummary, Event, ExecutionMode, RunningWork, TaskNeeds, TaskSpec,
    TaskStatus, TokenUsage, WorkerAdmits,
};
use claudecluster_proto::validate;
use futures_util::Stream;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::error::WorkerError;
use crate::events;
use crate::execution::supervisor::{self, Cancellation, Outcome, Supervision};
use crate::execution::{
    AgentHandle, AgentInput, AgentLaunch, AgentOptions, ExecutionProvider, Limits, ProviderHealth,
    Providers, RefillTicket, WarmPool, WarmTemplate, agent_env, warm_agent_args,
};
use crate::proxy::{CREDENTIAL_VARIABLES, CredentialProxy, Grant, Meter};
use crate::run_log::{LogBounds, RunLog};
use crate::runs::{Runs, TaskRun, WorkId};
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

/// Where spilled run logs go, under the workspace root.
const RUNS_DIR: &str = ".runs";

pub struct Runtime {
    pub worker_id: String,
    config: WorkerConfig,
    /// Where agents reach the Messages API, holding the real credentials; `None` when agents
    /// hold them themselves (`worker.credentialProxy.enabled: false`).
    proxy: Option<Arc<CredentialProxy>>,
    /// What each running attempt spent by the proxy's count, by task and attempt.
    meters: Mutex<HashMap<(String, u32), Arc<Meter>>>,
    /// Swapped whole when the worker switches modes.
    providers: std::sync::RwLock<Arc<Providers>>,
    warm_pools: Mutex<HashMap<ExecutionMode, Arc<WarmPool>>>,
    /// Asks the scheduler link to register again (with new modes) at once.
    reregister: Notify,
    /// Counts the scheduler's confirmations of this worker's registration.
    registrations: watch::Sender<u64>,
    /// Tasks and sessions at once: `maxConcurrentTasks`, or the default mode's pool size.
    capacity: AtomicU32,
    workspaces: Workspaces,
    /// The work agents left in their workspaces.
    results: Arc<crate::results::Results>,
    slots: Arc<Semaphore>,
    runs: Mutex<Runs>,
    /// How many runs hold a slot, for waiting until none does.
    busy: watch::Sender<usize>,
    log_bounds: LogBounds,
    /// The scheduler places nothing more here; the worker reports when nothing runs.
    draining: AtomicBool,
    shutting_down: Cancellation,
    /// Agents whose tasks have ended, still exiting or being removed: a task's terminal event
    /// does not wait for its container to go, but the worker does before it exits.
    endings: TaskTracker,
}

impl Runtime {
    /// A runtime whose agents reach the Messages API through `proxy`, when given.
    pub fn new(
        worker_id: String,
        config: WorkerConfig,
        providers: Providers,
        proxy: Option<Arc<CredentialProxy>>,
    ) -> Self {
        Self::with_log_bounds(worker_id, config, providers, LogBounds::default(), proxy)
    }

    pub(crate) fn with_log_bounds(
        worker_id: String,
        config: WorkerConfig,
        providers: Providers,
        log_bounds: LogBounds,
        proxy: Option<Arc<CredentialProxy>>,
    ) -> Self {
        let capacity = config.capacity();
        let workspaces = Workspaces::new(Workspaces::root_for(&config))
            .with_clone_timeout(config.clone_timeout.get());
        // Logs spilled by an earlier process belong to runs that died with it.
        let runs_dir = workspaces.root().join(RUNS_DIR);
        if let Err(err) = std::fs::remove_dir_all(&runs_dir)
            && err.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %runs_dir.display(), error = %err, "cannot clear old run logs");
        }
        let results = Arc::new(crate::results::Results::new(
            workspaces.root().to_path_buf(),
            worker_id.clone(),
            &config,
        ));
        let runtime = Runtime {
            results,
            worker_id,
            proxy,
            meters: Mutex::default(),
            slots: Arc::new(Semaphore::new(capacity as usize)),
            config,
            providers: std::sync::RwLock::new(Arc::new(providers)),
            warm_pools: Mutex::default(),
            reregister: Notify::new(),
            registrations: watch::Sender::new(0),
            capacity: AtomicU32::new(capacity),
            workspaces,
            runs: Mutex::default(),
            busy: watch::Sender::new(0),
            log_bounds,
            draining: AtomicBool::new(false),
            shutting_down: Cancellation::default(),
            endings: TaskTracker::new(),
        };
        runtime.start_warm_pools();
        runtime
    }

    /// Starts the warm pools the configuration asks for, one per provider.
    pub(crate) fn start_warm_pools(&self) {
        let options = AgentOptions::resolve(None, &self.config.agent);
        let template = WarmTemplate {
            args: warm_agent_args(&options),
            env: self.worker_env(agent_env(&self.config.agent, std::env::vars(), [])),
            options,
            proxy: self.proxy.clone(),
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

    pub(crate) async fn stop_warm_pools(&self) {
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

    /// Refuses a variable outside `worker.agent.allowedTaskEnv`, when that is set.
    fn check_task_environment(&self, spec: &TaskSpec) -> Result<(), WorkerError> {
        let Some(allowed) = &self.config.agent.allowed_task_env else {
            return Ok(());
        };
        match spec
            .environment
            .keys()
            .find(|name| !allowed.0.contains(name))
        {
            Some(name) => Err(WorkerError::InvalidArgument {
                field: "spec.environment",
                message: format!(
                    "`{name}` is not one of the variables this worker lets tasks set (worker.agent.allowedTaskEnv: {})",
                    allowed.0.join(", ")
                ),
            }),
            None => Ok(()),
        }
    }

    /// Counts what `execution` spends at the proxy, and holds it to the task's budget.
    fn meter(&self, execution: &Execution, meter: Arc<Meter>) {
        let budget = execution
            .spec
            .agent
            .as_ref()
            .map(|agent| agent.max_budget_usd);
        meter.set_budget(budget);
        self.meters
            .lock()
            .expect("meter lock poisoned")
            .insert((execution.task_id.clone(), execution.attempt), meter);
    }

    /// What the attempt spent by the proxy's count; its meter is let go.
    fn metered(&self, task_id: &str, attempt: u32) -> Option<(TokenUsage, f64)> {
        self.meters
            .lock()
            .expect("meter lock poisoned")
            .remove(&(task_id.to_owned(), attempt))
            .map(|meter| meter.usage())
    }

    /// `env` without the worker's own credentials when agents go through the proxy.
    fn worker_env(&self, mut env: Vec<(String, String)>) -> Vec<(String, String)> {
        if self.proxy.is_some() {
            env.retain(|(name, _)| !CREDENTIAL_VARIABLES.contains(&name.as_str()));
        }
        env
    }

    /// An agent's environment, and with the proxy the grant of its own token, which stands in
    /// for the worker's credentials; `holder` names the agent in the proxy's logs.
    pub(crate) fn agent_environment(
        &self,
        task_env: impl IntoIterator<Item = (String, String)>,
        holder: &str,
    ) -> (Vec<(String, String)>, Option<Grant>) {
        let mut env = self.worker_env(agent_env(&self.config.agent, std::env::vars(), task_env));
        let grant = self.proxy.as_ref().map(|proxy| proxy.grant(holder));
        if let Some(grant) = &grant {
            env.extend(grant.agent_env());
        }
        (env, grant)
    }

    /// What this worker accepts of a task: its repository schemes and largest limits.
    pub fn admits(&self) -> WorkerAdmits {
        admits(&self.config)
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

    /// Puts `providers` in place of the worker's; the ones they replace.
    pub(crate) fn set_providers(&self, providers: Providers) -> Arc<Providers> {
        std::mem::replace(
            &mut *self.providers.write().expect("provider lock poisoned"),
            Arc::new(providers),
        )
    }

    pub fn mode(&self) -> ExecutionMode {
        self.providers().default_mode()
    }

    pub fn modes(&self) -> Vec<ExecutionMode> {
        self.providers().modes()
    }

    pub fn capacity(&self) -> u32 {
        self.capacity.load(Ordering::SeqCst)
    }

    /// Takes `capacity` as the worker's number of slots. Called while nothing holds one; a
    /// smaller capacity waits for permits an admission that is being refused still holds.
    pub(crate) async fn resize(&self, capacity: u32) {
        let before = self.capacity.swap(capacity, Ordering::SeqCst);
        if capacity > before {
            self.slots.add_permits((capacity - before) as usize);
        } else if before > capacity
            && let Ok(permits) = self.slots.acquire_many(before - capacity).await
        {
            permits.forget();
        }
    }

    #[cfg(test)]
    pub fn free_slots(&self) -> usize {
        self.slots.available_permits()
    }

    /// Slots no run holds.
    pub(crate) fn available_slots(&self) -> usize {
        self.slots.available_permits()
    }

    pub(crate) fn idle_warm_agents_by_mode(&self) -> Vec<(ExecutionMode, usize)> {
        self.warm_pools
            .lock()
            .expect("warm pool lock poisoned")
            .iter()
            .map(|(mode, pool)| (*mode, pool.idle_count()))
            .collect()
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

    pub fn results(&self) -> &Arc<crate::results::Results> {
        &self.results
    }

    /// Why the worker cannot take work for lack of disk, if it cannot.
    fn low_on_disk(&self) -> Option<String> {
        let minimum = self.config.min_free_disk.0;
        let free = self.results.disk_free_bytes();
        (free < minimum).then(|| {
            format!(
                "low on disk: {} free where workspaces are made ({}), less than `worker.minFreeDisk` ({})",
                claudecluster_proto::human_bytes(free),
                self.results.root().display(),
                claudecluster_proto::human_bytes(minimum)
            )
        })
    }

    pub fn workspaces(&self) -> &Workspaces {
        &self.workspaces
    }

    /// The run table. A panic elsewhere never leaves it inconsistent (every change is one
    /// call), so a poisoned lock is taken as is: a `Slot` must be able to give its slot back
    /// while a panic unwinds.
    pub(crate) fn runs(&self) -> MutexGuard<'_, Runs> {
        self.runs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A log for a run named `name`, spilling to a file of its own.
    pub(crate) fn new_log(&self, name: String, file_stem: &str) -> Arc<RunLog> {
        let unique = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let path = self
            .workspaces
            .root()
            .join(RUNS_DIR)
            .join(format!("{file_stem}-{unique}.events"));
        RunLog::new(name, path, self.log_bounds)
    }

    /// Forgets runs ended longer than `worker.runRetention` ago.
    pub(crate) fn sweep(&self, runs: &mut Runs) {
        runs.sweep(Instant::now(), self.config.run_retention.get());
    }

    /// A slot for a task or session, if the worker has one free and can work.
    pub async fn take_slot(&self) -> Result<OwnedSemaphorePermit, WorkerError> {
        self.refuse_if_shutting_down()?;
        // Not `health()`: work placed just before a mode switch began still runs.
        if let ProviderHealth::Unavailable(reason) = self.providers().health().await {
            return Err(WorkerError::Unavailable {
                worker_id: self.worker_id.clone(),
                reason,
            });
        }
        if let Some(reason) = self.low_on_disk() {
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

    pub(crate) fn refuse_if_shutting_down(&self) -> Result<(), WorkerError> {
        if self.shutting_down.is_cancelled() {
            return Err(WorkerError::ShuttingDown(self.worker_id.clone()));
        }
        Ok(())
    }

    /// Refuses new work once a mode switch or a shutdown began. Checked under the run table's
    /// lock, which both take as they begin, right before the work is counted in
    /// ([`Runtime::hold`]): either they see the work, or it sees them.
    pub(crate) fn refuse_if_not_accepting(&self, runs: &Runs) -> Result<(), WorkerError> {
        self.refuse_if_shutting_down()?;
        if runs.switching {
            return Err(WorkerError::Unavailable {
                worker_id: self.worker_id.clone(),
                reason: "switching execution mode".into(),
            });
        }
        Ok(())
    }

    /// Counts `work` as holding `permit` until the returned [`Slot`] is dropped.
    pub(crate) fn hold(
        self: &Arc<Self>,
        runs: &mut Runs,
        work: WorkId,
        permit: OwnedSemaphorePermit,
    ) -> Slot {
        self.busy.send_replace(runs.hold(work.clone()));
        Slot {
            runtime: self.clone(),
            work,
            _permit: permit,
        }
    }

    /// Completes when the worker should register with the scheduler again.
    pub async fn reregistration_requested(&self) {
        self.reregister.notified().await
    }

    pub(crate) fn request_reregistration(&self) {
        self.reregister.notify_one();
    }

    /// The scheduler confirmed a registration of this worker.
    pub fn registered(&self) {
        let mut first = false;
        self.registrations.send_modify(|count| {
            *count += 1;
            first = *count == 1;
        });
        if first {
            give_back_freed_memory();
        }
    }

    pub(crate) fn registrations(&self) -> watch::Receiver<u64> {
        self.registrations.subscribe()
    }

    /// Waits up to `bound` for nothing to hold a slot; false when something still does.
    pub(crate) async fn wait_until_idle(&self, bound: Duration) -> bool {
        let mut busy = self.busy.subscribe();
        matches!(
            tokio::time::timeout(bound, busy.wait_for(|busy| *busy == 0)).await,
            Ok(Ok(_))
        )
    }

    /// The scheduler stopped placing work here. Work already placed still runs: the scheduler
    /// is the gate, so nothing placed before the drain is lost.
    pub fn start_draining(&self) {
        if !self.draining.swap(true, Ordering::SeqCst) {
            tracing::info!(worker = %self.worker_id, "draining");
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Draining, and no task or session runs any more.
    pub fn is_drained(&self) -> bool {
        self.is_draining() && *self.busy.borrow() == 0
    }

    /// Completes when the worker starts shutting down.
    pub async fn shutting_down(&self) {
        self.shutting_down.cancelled().await;
    }

    /// Every run holding a slot: tasks with their attempts, sessions with attempt 0.
    pub fn running_work(&self) -> Vec<RunningWork> {
        let mut runs = self.runs();
        self.sweep(&mut runs);
        runs.holding()
            .map(|work| RunningWork {
                id: work.id.clone(),
                attempt: work.attempt,
            })
            .collect()
    }

    pub fn running_task_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .runs()
            .holding()
            .filter(|work| !work.is_session())
            .map(|work| work.id.clone())
            .collect();
        ids.dedup();
        ids
    }

    pub async fn health(&self) -> ProviderHealth {
        if self.shutting_down.is_cancelled() {
            return ProviderHealth::Unavailable("shutting down".into());
        }
        if self.runs().switching {
            return ProviderHealth::Unavailable("switching execution mode".into());
        }
        if let Some(reason) = self.low_on_disk() {
            return ProviderHealth::Unavailable(reason);
        }
        self.providers().health().await
    }

    /// Asks every running attempt of a task to stop. False when none runs here.
    pub fn cancel(&self, task_id: &str, reason: &str) -> bool {
        let running = self.runs().running_attempts(task_id);
        for run in &running {
            run.cancel.cancel(reason);
        }
        !running.is_empty()
    }

    /// Stops the runs the scheduler names: a task's attempt (which is refused from then on),
    /// or a session (attempt 0), whose container stops and whose volumes stay.
    pub fn stop_runs(&self, works: &[RunningWork], reason: &str) {
        let reason = if reason.is_empty() {
            "stopped by the scheduler"
        } else {
            reason
        };
        for work in works {
            let found = if work.attempt == 0 {
                self.stop_session(&work.id, reason)
            } else {
                let run = self
                    .runs()
                    .stop_task(&work.id, work.attempt, reason, Instant::now());
                match run {
                    Some(run) if run.is_running() => {
                        run.cancel.cancel(reason);
                        true
                    }
                    _ => false,
                }
            };
            tracing::info!(id = %work.id, attempt = work.attempt, found, %reason, "the scheduler stopped a run");
        }
    }

    /// Stops taking work at once, lets what runs finish for `worker.shutdownGrace`, then
    /// cancels what is left and stops sessions' containers (their volumes stay). Every run's
    /// log ends with its terminal event.
    pub async fn shut_down(&self) {
        const REASON: &str = SHUTTING_DOWN;
        // Under the table's lock: an admission holding it either is in the table already
        // (and is waited for, then cancelled) or sees the shutdown and is refused.
        {
            let _runs = self.runs();
            self.shutting_down.cancel(REASON);
        }
        self.stop_warm_pools().await;
        let grace = self.config.shutdown_grace.get();
        if self.wait_until_idle(grace).await {
            self.wait_for_endings().await;
            self.providers().shut_down().await;
            return;
        }
        let (tasks, sessions) = {
            let runs = self.runs();
            let sessions: Vec<Cancellation> =
                runs.live_sessions().map(|live| live.stop.clone()).collect();
            (runs.all_running(), sessions)
        };
        tracing::info!(
            tasks = tasks.len(),
            sessions = sessions.len(),
            grace_seconds = grace.as_secs(),
            "work still running at the end of the shutdown grace; stopping it"
        );
        for run in tasks {
            run.cancel.cancel(REASON);
        }
        for stop in sessions {
            stop.cancel(REASON);
        }
        let bound = self.config.agent.cancel_grace_period.get() + Duration::from_secs(10);
        if !self.wait_until_idle(bound).await {
            tracing::warn!(
                running = ?self.running_work().iter().map(|work| &work.id).collect::<Vec<_>>(),
                "work still stopping at shutdown"
            );
        }
        self.wait_for_endings().await;
        self.providers().shut_down().await;
    }

    /// Stops the credential proxy: at the end of shutdown, once no agent is left to use it.
    pub fn stop_proxy(&self) {
        if let Some(proxy) = &self.proxy {
            proxy.stop();
        }
    }

    /// Waits for ended tasks' agents to be gone and released (bounded: an agent that will not
    /// exit is killed after the cancel grace period, and removals give up in seconds).
    async fn wait_for_endings(&self) {
        self.endings.close();
        let bound = self.config.agent.cancel_grace_period.get() + Duration::from_secs(30);
        if tokio::time::timeout(bound, self.endings.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                agents = self.endings.len(),
                "agents of ended tasks still ending at shutdown"
            );
        }
    }

    /// Accepts `execution`, or says why not. The returned [`Admission`] runs it.
    ///
    /// An attempt lower than one seen here is refused; a higher one stops the older attempts
    /// still running here first.
    pub async fn admit(self: &Arc<Self>, execution: Execution) -> Result<Admission, WorkerError> {
        check_id("task_id", &execution.task_id)?;
        // A request may come from anything that reaches this port, not only a driver that
        // checked it.
        validate::task_spec(&execution.spec, validate::PROMPT_BYTES_CEILING)?;
        self.check_task_environment(&execution.spec)?;
        if let Some(refusal) = self.admits().refusal(&TaskNeeds::of_task(&execution.spec)) {
            return Err(refusal.into());
        }
        self.refuse_if_shutting_down()?;
        let mode = execution.spec.execution_mode();
        // The provider checked here is the one the task runs on, whatever a mode switch does
        // meanwhile.
        let provider = self.provider(mode).ok_or_else(|| WorkerError::ModeNotRun {
            worker_id: self.worker_id.clone(),
            mode: mode.label(),
        })?;
        let (task_id, attempt) = (execution.task_id.clone(), execution.attempt);
        let superseded = {
            let mut runs = self.runs();
            self.sweep(&mut runs);
            runs.fence(&task_id, attempt, Instant::now())?
        };
        if !superseded.is_empty() {
            self.supersede(&task_id, attempt, &superseded).await;
        }
        let permit = self.take_slot().await?;
        let run = Arc::new(TaskRun {
            attempt,
            log: self.new_log(
                format!("task {task_id} attempt {attempt}"),
                &format!("task-{task_id}.{attempt}"),
            ),
            cancel: Cancellation::default(),
        });
        let slot = {
            let mut runs = self.runs();
            self.refuse_if_not_accepting(&runs)?;
            runs.insert_task(&task_id, run.clone(), Instant::now())?;
            self.hold(&mut runs, WorkId::task(&task_id, attempt), permit)
        };
        let end = LogEnd::new(
            run.log.clone(),
            task_event(
                &task_id,
                attempt,
                events::status_change(
                    TaskStatus::Failed,
                    "the run stopped on the worker without an outcome",
                    &self.worker_id,
                ),
            ),
        );
        Ok(Admission {
            slot,
            end,
            run,
            provider,
            execution,
        })
    }

    /// Cancels the older attempts `attempt` supersedes and waits (a bounded time) for them to
    /// give their slots back.
    async fn supersede(&self, task_id: &str, attempt: u32, older: &[Arc<TaskRun>]) {
        for run in older {
            tracing::info!(task = %task_id, attempt = run.attempt, newer = attempt, "superseded");
            run.cancel
                .cancel(format!("superseded by attempt {attempt}"));
        }
        let bound = self.config.agent.cancel_grace_period.get() + Duration::from_secs(10);
        let ended = futures_util::future::join_all(older.iter().map(|run| run.log.ended()));
        if tokio::time::timeout(bound, ended).await.is_err() {
            tracing::warn!(task = %task_id, "an older attempt is still stopping");
        }
    }

    /// The log of the run of `task_id`'s `attempt` held here, to follow after
    /// `after_run_sequence`.
    pub fn attach_task(
        &self,
        task_id: &str,
        attempt: u32,
        after_run_sequence: u64,
    ) -> Result<Arc<RunLog>, WorkerError> {
        check_id("task_id", task_id)?;
        let run = {
            let mut runs = self.runs();
            self.sweep(&mut runs);
            runs.task_run(task_id, attempt)
        };
        let run = run.ok_or_else(|| WorkerError::RunNotHere {
            task_id: task_id.to_owned(),
            attempt,
        })?;
        check_position(&run.log, after_run_sequence)?;
        tracing::info!(task = %task_id, attempt, after_run_sequence, "a driver attached");
        Ok(run.log.clone())
    }

    fn has_warm_pool(&self, mode: ExecutionMode) -> bool {
        self.warm_pools
            .lock()
            .expect("warm pool lock poisoned")
            .contains_key(&mode)
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
        provider: &Arc<dyn ExecutionProvider>,
        execution: &Execution,
        cancel: &Cancellation,
        events: &EventSink<'_>,
    ) -> (Outcome, Option<supervisor::Ending>) {
        let spec = &execution.spec;
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
            started = self.start_agent(provider, execution, &options, limits) => started,
            reason = cancel.cancelled() => return (Outcome {
                status: TaskStatus::Cancelled,
                reason,
                result: None,
            }, None),
        };
        // Held until the agent's turn has ended: its warm pool refills then.
        let (agent, workspace, how, _refill) = match started {
            Ok(started) => started,
            Err(reason) => return (Outcome::failed(reason), None),
        };
        tracing::info!(task = %execution.task_id, attempt = execution.attempt, mode = mode.label(), workspace = %workspace.display(), "{how}");
        events.emit(events::running(
            format!("{how} in {}: {}", workspace.display(), agent.description),
            &self.worker_id,
            &workspace,
            &agent.description,
        ));
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
            max_line_bytes: self.config.agent.max_line_bytes.0 as usize,
        };
        let spans = crate::trace::AgentSpans::start("agent run");
        let (outcome, ending) = supervisor::supervise_turn(agent, supervision, cancel, |kind| {
            spans.observe(&kind);
            events.emit(kind);
            std::future::ready(())
        })
        .await;
        (outcome, Some(ending))
    }

    /// Starts the task's agent: a warm one when one fits, otherwise a new one. Returns the
    /// agent, its workspace and how it was started.
    async fn start_agent(
        &self,
        provider: &Arc<dyn ExecutionProvider>,
        execution: &Execution,
        options: &AgentOptions,
        limits: Limits,
    ) -> Result<(AgentHandle, PathBuf, String, Option<RefillTicket>), String> {
        let spec = &execution.spec;
        let mode = provider.mode();
        let metrics = crate::metrics::metrics();
        metrics.runs.get_or_create(&mode_label(mode)).inc();
        // Where the agent's workspace is not the worker's, the agent's container clones the
        // repository itself, and a warm agent (started without one) cannot take it.
        let clones_in_agent = provider.clones_in_agent() && !spec.repo_url.is_empty();
        let warm = if clones_in_agent {
            None
        } else {
            self.warm_agent(mode, options, limits, spec)
        };
        if let Some(warm) = warm {
            let handed_out = std::time::Instant::now();
            // Not entered (it would be held across awaits): it lasts until the hand-out ends.
            let _handout =
                tracing::info_span!("agent.warm_handout", otel.name = "hand out a warm agent");
            if !spec.repo_url.is_empty() {
                self.workspaces
                    .clone_into(&spec.repo_url, &warm.workspace)
                    .await?;
            }
            // Recorded while the worker still owns what it cloned.
            self.results
                .start_task(&execution.task_id, execution.attempt, &warm.workspace)
                .await?;
            if !spec.repo_url.is_empty() {
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
            if let Some(grant) = &warm.handle.grant {
                self.meter(execution, grant.meter());
            }
            let elapsed = handed_out.elapsed();
            metrics.warm_hits.get_or_create(&mode_label(mode)).inc();
            metrics
                .warm_handout_latency
                .get_or_create(&mode_label(mode))
                .observe(elapsed.as_secs_f64());
            let how = format!(
                "warm agent handed out in {:.3} ms",
                elapsed.as_secs_f64() * 1000.0
            );
            return Ok((warm.handle, warm.workspace, how, warm.refill));
        }
        if self.has_warm_pool(mode) {
            metrics.warm_misses.get_or_create(&mode_label(mode)).inc();
        }
        let cloned_here = if clones_in_agent { "" } else { &spec.repo_url };
        let workspace = self
            .workspaces
            .prepare(&execution.task_id, execution.attempt, cloned_here)
            .instrument(tracing::info_span!(
                "agent.workspace",
                otel.name = "prepare the workspace"
            ))
            .await?;
        // Where the agent clones its repository into a workspace of its own, the worker holds
        // nothing of its work. Recorded while the worker still owns what it cloned.
        if !clones_in_agent {
            self.results
                .start_task(&execution.task_id, execution.attempt, &workspace)
                .await?;
        }
        provider
            .adopt_workspace(&workspace)
            .await
            .map_err(|err| err.0)?;
        // The prompt goes in on stdin, as a stream-json message, not on the command line: one
        // argument may not exceed 128 KiB on Linux, and a prompt may.
        let (env, grant) = self.agent_environment(
            spec.environment.clone(),
            &format!("task {} attempt {}", execution.task_id, execution.attempt),
        );
        let launch = AgentLaunch {
            task_id: execution.task_id.clone(),
            attempt: execution.attempt,
            args: warm_agent_args(options),
            env,
            workspace: workspace.clone(),
            input: AgentInput::StreamJson,
            limits,
            mounts: Vec::new(),
            repo_url: clones_in_agent.then(|| spec.repo_url.clone()),
        };
        if let Some(grant) = &grant {
            self.meter(execution, grant.meter());
        }
        let launching = std::time::Instant::now();
        let launch_span = match mode {
            ExecutionMode::ContainerAgentic => {
                tracing::info_span!("agent.launch", otel.name = "create and start the container")
            }
            _ => tracing::info_span!("agent.launch", otel.name = "spawn the agent process"),
        };
        let launched = provider
            .launch(launch)
            .instrument(launch_span.clone())
            .await;
        if let Err(err) = &launched {
            claudecluster_telemetry::propagation::record_error(&launch_span, &err.0);
        }
        drop(launch_span);
        let mut agent = launched.map_err(|err| err.0)?;
        metrics
            .launch_latency
            .get_or_create(&mode_label(mode))
            .observe(launching.elapsed().as_secs_f64());
        agent.grant = grant;
        let input = agent
            .input
            .as_ref()
            .expect("an agent started with stream-json input reads stdin");
        if input.send(user_message_line(&spec.prompt)).await.is_err() {
            // The agent is gone already: the supervisor reports how it ended.
            tracing::warn!(task = %execution.task_id, "the agent ended before it got its prompt");
        }
        Ok((agent, workspace, "agent started".to_owned(), None))
    }
}

/// What `config` accepts of a task, as the worker registers it.
pub fn admits(config: &WorkerConfig) -> WorkerAdmits {
    let max = &config.max_task_limits;
    WorkerAdmits {
        repo_schemes: config.allowed_repo_schemes.0.clone(),
        max_memory_bytes: max.memory.0,
        max_cpus: max.cpu,
        max_pids: max.pids,
        max_timeout_seconds: u32::try_from(max.timeout.get().as_secs()).unwrap_or(u32::MAX),
        max_budget_usd: max.budget_usd,
        max_turns: max.turns,
        bypass_permissions: config.agent.permits.bypass_permissions,
        unrestricted_bash: config.agent.permits.unrestricted_bash,
    }
}

/// Names in the workspace root that are the worker's own, not a task's.
const RESERVED_NAMES: &[&str] = &["sessions"];

/// Checks an id that becomes a directory name, a container name and a label: 1 to 128 letters,
/// digits, `-` or `_`, and not a name the worker keeps for itself.
pub(crate) fn check_id(field: &'static str, id: &str) -> Result<(), WorkerError> {
    validate::id(field, id)?;
    if RESERVED_NAMES.contains(&id) {
        return Err(WorkerError::InvalidArgument {
            field,
            message: format!("`{id}` is a name the worker keeps for itself"),
        });
    }
    Ok(())
}

/// Refuses a position past the end of `log`: the caller has seen events that never were.
pub(crate) fn check_position(log: &RunLog, after_run_sequence: u64) -> Result<(), WorkerError> {
    let last = log.last_sequence();
    if after_run_sequence > last {
        return Err(WorkerError::InvalidArgument {
            field: "after_run_sequence",
            message: format!("is {after_run_sequence}, but the run has {last} events"),
        });
    }
    Ok(())
}

/// A run's hold on one of the worker's slots: dropping it gives the slot back and takes the
/// run off the running work, however the run ends (its end, a panic, a dropped future).
pub struct Slot {
    runtime: Arc<Runtime>,
    work: WorkId,
    _permit: OwnedSemaphorePermit,
}

impl Slot {
    pub(crate) fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let holding = self.runtime.runs().release(&self.work);
        self.runtime.busy.send_replace(holding);
    }
}

/// Ends a run's log when the run could not (a panic, a dropped future), so that no follower
/// waits forever: with `fallback`, a failure.
pub(crate) struct LogEnd {
    log: Arc<RunLog>,
    fallback: Option<Event>,
}

impl LogEnd {
    pub(crate) fn new(log: Arc<RunLog>, fallback: Event) -> Self {
        LogEnd {
            log,
            fallback: Some(fallback),
        }
    }

    /// Appends the run's last event and ends the log.
    pub(crate) fn finish_with(mut self, last: Event) {
        self.fallback = None;
        self.log.finish_with(last);
    }

    /// Ends the log after what the run appended.
    pub(crate) fn finish(mut self) {
        self.fallback = None;
        self.log.finish();
    }
}

impl Drop for LogEnd {
    fn drop(&mut self) {
        if let Some(fallback) = self.fallback.take()
            && !self.log.is_finished()
        {
            self.log.finish_with(fallback);
        }
    }
}

fn task_event(task_id: &str, attempt: u32, kind: Kind) -> Event {
    Event {
        task_id: task_id.to_owned(),
        attempt,
        kind: Some(kind),
        ..Event::default()
    }
}

/// A task the worker accepted; [`Admission::run`] runs it to the end.
pub struct Admission {
    // Dropped first (fields drop in order): the slot is free before the log's last event
    // goes out.
    slot: Slot,
    end: LogEnd,
    run: Arc<TaskRun>,
    provider: Arc<dyn ExecutionProvider>,
    execution: Execution,
}

impl Admission {
    /// The run's events from the first, following until its end.
    pub fn follow(&self) -> impl Stream<Item = Result<(u64, Event), WorkerError>> + Send + 'static {
        self.run.log.follow(0)
    }

    /// Runs the task, appending its events to its log; ends with a terminal status event. A
    /// run nobody follows for `worker.driverLossTimeout` is cancelled.
    pub async fn run(self) {
        let (end, run, provider, execution) = (self.end, self.run, self.provider, self.execution);
        // Declared last, dropped first if the run is dropped: the slot is free before the
        // log's fallback end goes out.
        let slot = self.slot;
        let runtime = slot.runtime().clone();
        let loss_timeout = runtime.config.driver_loss_timeout.get();
        let abandoned = async {
            run.log.abandoned(loss_timeout).await;
            tracing::warn!(task = %execution.task_id, attempt = execution.attempt, "no driver attached; cancelling");
            run.cancel.cancel(format!(
                "no driver attached for {} s",
                loss_timeout.as_secs()
            ));
            std::future::pending::<Infallible>().await
        };
        let events = EventSink {
            log: &run.log,
            task_id: &execution.task_id,
            attempt: execution.attempt,
        };
        let (outcome, ending) = tokio::select! {
            ended = runtime.execute(&provider, &execution, &run.cancel, &events) => ended,
            never = abandoned => match never {},
        };
        // The agent exits and its container goes while the task's end is reported; the
        // worker waits for both before it exits.
        if let Some(ending) = ending {
            runtime.endings.spawn(ending.finish().in_current_span());
        }
        tracing::info!(task = %execution.task_id, attempt = execution.attempt, status = outcome.status.label(), reason = %outcome.reason, "task ended");
        // A task stopped because the worker shuts down is not the task's doing: the worker gives
        // it back (its last status is PENDING), and the driver queues it again.
        let given_back = outcome.status == TaskStatus::Cancelled
            && runtime.shutting_down.is_cancelled()
            && outcome.reason == SHUTTING_DOWN;
        let (status, reason) = if given_back {
            (
                TaskStatus::Pending,
                format!("{SHUTTING_DOWN}; it gives the task back"),
            )
        } else {
            (outcome.status, outcome.reason)
        };
        // What the agent changed, and its branch, are part of the run: the slot is held
        // meanwhile.
        let (changes, branch) = if given_back {
            (None, None)
        } else {
            runtime.conclude(&execution, status).await
        };
        runtime
            .results
            .task_ended(&execution.task_id, execution.attempt);
        // The slot is free before the terminal event goes out: whoever reacts to it by sending
        // the next task must find room.
        drop(slot);
        let mut kind = events::status_change(status, reason, &runtime.worker_id);
        if let Kind::StatusChange(change) = &mut kind {
            if let Some((usage, cost)) = runtime.metered(&execution.task_id, execution.attempt) {
                change.metered_usage = Some(usage);
                change.metered_cost_usd = cost;
            }
            change.changes = changes;
            change.branch = branch;
        }
        end.finish_with(events.event(kind));
    }
}

impl Runtime {
    /// What a task's agent changed, and, when the task asked for one and completed, the
    /// branch (and pull request) of its changes.
    async fn conclude(
        &self,
        execution: &Execution,
        status: TaskStatus,
    ) -> (Option<ChangeSummary>, Option<BranchResult>) {
        let (task_id, attempt) = (&execution.task_id, execution.attempt);
        let changes = self.results.summary_of_task(task_id, attempt).await;
        let spec = &execution.spec;
        let Some(asked) = spec
            .result
            .as_ref()
            .filter(|result| !result.branch.is_empty())
        else {
            return (changes, None);
        };
        let name = crate::results::publish::branch_name(&asked.branch, task_id, attempt);
        if status != TaskStatus::Completed {
            let branch = BranchResult {
                name,
                error: format!(
                    "the task did not complete ({}): nothing was pushed",
                    status.label()
                ),
                ..BranchResult::default()
            };
            return (changes, Some(branch));
        }
        let publication = crate::results::publish::Publication {
            task_id,
            attempt,
            prompt: &spec.prompt,
            repo_url: &spec.repo_url,
            result: asked,
        };
        let published = self
            .results
            .with_task(task_id, attempt, async |tracking| {
                crate::results::publish::publish(
                    tracking,
                    &publication,
                    changes.as_ref(),
                    &self.config.publish,
                    self.config.clone_timeout.get(),
                )
                .await
            })
            .await;
        let branch = published.unwrap_or_else(|| BranchResult {
            name,
            error: "the worker holds no workspace of the task to push".into(),
            ..BranchResult::default()
        });
        (changes, Some(branch))
    }
}

/// Returns the heap start-up allocated and freed (the configuration, Docker's answers while
/// cleaning up after an earlier run) to the system: an idle worker should hold only what it
/// uses, whichever providers it runs.
#[allow(unsafe_code)]
fn give_back_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of glibc's allocator; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Why a worker that shuts down stops what still runs after its grace.
const SHUTTING_DOWN: &str = "the worker is shutting down";

/// Where a task's events go: its run's log.
struct EventSink<'a> {
    log: &'a RunLog,
    task_id: &'a str,
    attempt: u32,
}

impl EventSink<'_> {
    fn event(&self, kind: Kind) -> Event {
        task_event(self.task_id, self.attempt, kind)
    }

    fn emit(&self, kind: Kind) {
        self.log.append(self.event(kind));
    }
}
