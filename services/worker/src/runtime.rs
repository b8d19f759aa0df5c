//! The worker's core: accepts tasks, runs them through its provider, keeps count.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use claudecluster_config::WorkerConfig;
use claudecluster_proto::v1::event::Kind;
use claudecluster_proto::v1::{Event, ExecutionMode, TaskSpec, TaskStatus};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::error::WorkerError;
use crate::events;
use crate::execution::supervisor::{self, Cancellation, Outcome, Supervision};
use crate::execution::{
    AgentLaunch, AgentOptions, ExecutionProvider, ProviderHealth, agent_args, agent_env,
};
use crate::workspace::Workspaces;

/// A task accepted by the worker.
pub struct Execution {
    pub task_id: String,
    pub attempt: u32,
    pub spec: TaskSpec,
}

pub struct Runtime {
    pub worker_id: String,
    config: WorkerConfig,
    provider: Arc<dyn ExecutionProvider>,
    workspaces: Workspaces,
    slots: Arc<Semaphore>,
    running: Mutex<HashMap<String, Cancellation>>,
    shutting_down: Cancellation,
}

impl Runtime {
    pub fn new(
        worker_id: String,
        config: WorkerConfig,
        provider: Arc<dyn ExecutionProvider>,
    ) -> Self {
        let workspaces = Workspaces::new(
            config
                .workspace_root
                .clone()
                .unwrap_or_else(Workspaces::default_root),
        );
        Runtime {
            worker_id,
            slots: Arc::new(Semaphore::new(config.capacity() as usize)),
            config,
            provider,
            workspaces,
            running: Mutex::default(),
            shutting_down: Cancellation::default(),
        }
    }

    pub fn config(&self) -> &WorkerConfig {
        &self.config
    }

    pub fn mode(&self) -> ExecutionMode {
        self.provider.mode()
    }

    pub fn capacity(&self) -> u32 {
        self.config.capacity()
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
        self.provider.health().await
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

    /// Stops every running task; new ones are refused.
    pub fn shut_down(&self) {
        self.shutting_down.cancel("the worker is shutting down");
        for cancel in self.running().values() {
            cancel.cancel("the worker is shutting down");
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
        if self.shutting_down.is_cancelled() {
            return Err(WorkerError::ShuttingDown(self.worker_id.clone()));
        }
        if let ProviderHealth::Unavailable(reason) = self.provider.health().await {
            return Err(WorkerError::Unavailable {
                worker_id: self.worker_id.clone(),
                reason,
            });
        }
        let permit =
            self.slots
                .clone()
                .try_acquire_owned()
                .map_err(|_| WorkerError::AtCapacity {
                    worker_id: self.worker_id.clone(),
                    capacity: self.capacity(),
                })?;
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

    async fn execute(
        &self,
        execution: &Execution,
        cancel: &Cancellation,
        events: &EventSink,
    ) -> Outcome {
        let spec = &execution.spec;
        let workspace = tokio::select! {
            prepared = self.workspaces.prepare(&execution.task_id, execution.attempt, &spec.repo_url) => {
                match prepared {
                    Ok(dir) => dir,
                    Err(reason) => return Outcome::failed(reason),
                }
            }
            reason = cancel.cancelled() => return Outcome {
                status: TaskStatus::Cancelled,
                reason,
                result: None,
            },
        };
        let options = AgentOptions::resolve(spec.agent.as_ref(), &self.config.agent);
        let launch = AgentLaunch {
            task_id: execution.task_id.clone(),
            attempt: execution.attempt,
            args: agent_args(&spec.prompt, &options),
            env: agent_env(&self.config.agent, std::env::vars()),
            workspace: workspace.clone(),
        };
        tracing::info!(task = %execution.task_id, attempt = execution.attempt, workspace = %workspace.display(), "starting agent");
        let agent = match self.provider.launch(launch).await {
            Ok(agent) => agent,
            Err(err) => return Outcome::failed(err.0),
        };
        events
            .emit(events::status_change(
                TaskStatus::Running,
                format!("agent started in {}", workspace.display()),
                &self.worker_id,
            ))
            .await;
        let timeout = spec
            .limits
            .as_ref()
            .map(|limits| limits.timeout_seconds)
            .filter(|seconds| *seconds > 0)
            .map(|seconds| Duration::from_secs(seconds.into()))
            .unwrap_or_else(|| self.config.default_task_timeout());
        let supervision = Supervision {
            timeout,
            idle_timeout: self.config.agent.idle_timeout.get(),
            grace_period: self.config.agent.cancel_grace_period.get(),
        };
        supervisor::supervise(agent, supervision, cancel, |kind| events.emit(kind)).await
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
