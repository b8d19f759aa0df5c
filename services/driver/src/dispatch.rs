//! Between the scheduler and the workers: enqueues pending tasks, follows the scheduler's
//! placements, runs each placed task on its worker and records everything the worker streams.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use claudecluster_grpc::{ClusterChannel as Channel, ClusterIdentity};
use claudecluster_proto::v1::event::Kind;
use claudecluster_proto::v1::run_session_request::Message as SessionMessage;
use claudecluster_proto::v1::scheduler_service_client::SchedulerServiceClient;
use claudecluster_proto::v1::worker_service_client::WorkerServiceClient;
use claudecluster_proto::v1::{
    CancelExecutionRequest, DequeueTaskRequest, EnqueueTaskRequest, ExecuteTaskRequest,
    ExecutionMode, Priority, ReleaseTaskRequest, RunSessionRequest, RunSessionResponse,
    SessionClose, SessionOpen, SessionState, SessionTurn, StreamPlacementsRequest,
    StreamPlacementsResponse, TaskStatus,
};
use claudecluster_telemetry::propagation::TraceParent;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
use tracing::Instrument;

use crate::metrics::{metrics, mode_label};
use crate::notify::{self, Notifier};
use crate::sessions::{SessionEntry, SessionStore};
use crate::store::{CancelAction, TaskEntry, TaskStore};
use crate::usage::Usage;

/// After asking a worker to cancel, how long its stream may take to end before the driver
/// ends the task itself.
const CANCEL_DEADLINE: Duration = Duration::from_secs(30);
/// A task a worker did not take waits this long before it is queued again, so that the
/// scheduler hears of the worker's real load and health first.
const REFUSED_PAUSE: Duration = Duration::from_millis(200);

/// How often the driver pings each worker's connection, and how long an answer may take
/// before the worker counts as lost.
const WORKER_PING_INTERVAL: Duration = Duration::from_secs(2);
const WORKER_PING_TIMEOUT: Duration = Duration::from_secs(3);

/// How long the driver tries to attach again to a run whose stream broke before it counts the
/// worker as lost.
const REATTACH_PATIENCE: Duration = Duration::from_secs(5);
/// Messages a session's stream holds on their way out: the first, one turn and a close.
const SESSION_INPUT_BUFFER: usize = 4;
/// How often the driver looks at the workers' health for notifications.
const WORKER_WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// How a run ended without an outcome.
enum RunEnd {
    /// The worker did not take the task (no free slot, or it cannot run tasks just now): the
    /// attempt is not used up.
    NotStarted(String),
    /// The worker refused the task, could not be reached or was lost: the attempt is used up.
    Lost(String),
    /// The worker stopped the run because it shuts down: the task runs again, whatever
    /// attempts it has left.
    GivenBack(String),
    /// The task itself is at fault (the worker refused it as invalid, or it made an event
    /// too large to carry): another attempt would end the same way.
    Failed(String),
}

/// Whether a stream broke on a message too large to carry (which says nothing of the worker's
/// health) rather than a lost connection.
fn is_oversized(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::OutOfRange | tonic::Code::ResourceExhausted | tonic::Code::Internal
    ) && status.message().contains("message length too large")
}

pub struct Dispatcher {
    /// Attempts a task gets when workers refuse it or are lost while running it.
    max_attempts: u32,
    /// What the driver presents to the scheduler and the workers.
    identity: ClusterIdentity,
    store: Arc<TaskStore>,
    sessions: Arc<SessionStore>,
    scheduler: SchedulerServiceClient<Channel>,
    pub scheduler_address: String,
    workers: Mutex<HashMap<String, WorkerServiceClient<Channel>>>,
    /// The streams of the sessions followed here, by session, for closing them.
    session_links: Mutex<HashMap<String, Arc<SessionLink>>>,
    usage: Arc<Usage>,
    notifier: Arc<Notifier>,
}

impl Dispatcher {
    pub fn new(
        store: Arc<TaskStore>,
        sessions: Arc<SessionStore>,
        scheduler_address: String,
        max_attempts: u32,
        identity: ClusterIdentity,
        usage: Arc<Usage>,
        notifier: Arc<Notifier>,
    ) -> Result<Self, tonic::transport::Error> {
        let channel = claudecluster_grpc::cluster::cluster_channel(&scheduler_address, &identity)?;
        Ok(Dispatcher {
            max_attempts,
            identity,
            store,
            sessions,
            scheduler: SchedulerServiceClient::new(channel)
                .max_decoding_message_size(claudecluster_proto::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(claudecluster_proto::MAX_MESSAGE_BYTES),
            scheduler_address,
            workers: Mutex::default(),
            session_links: Mutex::default(),
            usage,
            notifier,
        })
    }

    pub fn scheduler(&self) -> SchedulerServiceClient<Channel> {
        self.scheduler.clone()
    }

    pub(crate) fn worker(
        &self,
        address: &str,
    ) -> Result<WorkerServiceClient<Channel>, tonic::transport::Error> {
        let mut workers = self.workers.lock().expect("worker client lock poisoned");
        if let Some(client) = workers.get(address) {
            return Ok(client.clone());
        }
        // A worker that stops answering (SIGSTOP, a dead host) fails its runs' streams within
        // seconds, so that its tasks can go to another worker.
        let channel = claudecluster_grpc::cluster::cluster_channel_watched(
            address,
            &self.identity,
            WORKER_PING_INTERVAL,
            WORKER_PING_TIMEOUT,
        )?;
        let client = WorkerServiceClient::new(channel)
            .max_decoding_message_size(claudecluster_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(claudecluster_proto::MAX_MESSAGE_BYTES);
        workers.insert(address.to_owned(), client.clone());
        Ok(client)
    }

    /// Hands a pending task to the scheduler. When the scheduler is unreachable the task stays
    /// pending; it is enqueued again when the placement stream reconnects.
    pub async fn enqueue(&self, entry: &TaskEntry) {
        let spec = entry.spec();
        let request = EnqueueTaskRequest {
            task_id: entry.id.clone(),
            attempt: entry.attempt(),
            execution_mode: spec.execution_mode,
            needs: Some(claudecluster_proto::v1::TaskNeeds::of_task(&spec)),
            worker_selector: spec.worker_selector,
            priority: spec.priority,
        };
        match self.scheduler.clone().enqueue_task(request).await {
            Ok(response) => entry.set_waiting_reason(response.into_inner().waiting_reason),
            Err(status) => {
                tracing::warn!(task = %entry.id, error = %status.message(), "cannot reach the scheduler; the task waits");
                entry.set_waiting_reason(format!(
                    "waiting for the scheduler at {}",
                    self.scheduler_address
                ));
            }
        }
    }

    pub async fn dequeue(&self, task_id: &str) {
        let request = DequeueTaskRequest {
            task_id: task_id.to_owned(),
        };
        if let Err(status) = self.scheduler.clone().dequeue_task(request).await {
            tracing::warn!(task = task_id, error = %status.message(), "cannot dequeue");
        }
    }

    async fn release(&self, task_id: &str, attempt: u32) {
        let request = ReleaseTaskRequest {
            task_id: task_id.to_owned(),
            attempt,
        };
        if let Err(status) = self.scheduler.clone().release_task(request).await {
            tracing::warn!(task = task_id, error = %status.message(), "cannot release");
        }
    }

    /// Follows the scheduler's placements until `stop`, reconnecting when the stream breaks.
    pub async fn follow_placements(self: Arc<Self>, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        let mut warned = false;
        loop {
            let mut scheduler = self.scheduler.clone();
            let stream = tokio::select! {
                _ = stop.cancelled() => return,
                stream = scheduler.stream_placements(StreamPlacementsRequest {}) => stream,
            };
            match stream {
                Ok(response) => {
                    tracing::info!(scheduler = %self.scheduler_address, "following placements");
                    backoff = Duration::from_millis(100);
                    warned = false;
                    // Whatever the scheduler knew may be gone: it learns every pending task again.
                    for entry in self.store.pending() {
                        self.enqueue(&entry).await;
                    }
                    for session in self.sessions.waiting() {
                        self.enqueue_session(&session).await;
                    }
                    let mut placements = response.into_inner();
                    loop {
                        let placement = tokio::select! {
                            _ = stop.cancelled() => return,
                            placement = placements.message() => placement,
                        };
                        match placement {
                            Ok(Some(placement)) => {
                                tokio::spawn(self.clone().run(placement));
                            }
                            Ok(None) => break,
                            Err(status) => {
                                tracing::warn!(error = %status.message(), "placement stream broke");
                                break;
                            }
                        }
                    }
                }
                Err(status) => {
                    if !warned {
                        tracing::warn!(scheduler = %self.scheduler_address, error = %status.message(), "cannot reach the scheduler; retrying");
                        warned = true;
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Runs one placed task on its worker and records its events until it ends.
    async fn run(self: Arc<Self>, placement: StreamPlacementsResponse) {
        let StreamPlacementsResponse {
            task_id,
            attempt,
            worker_id,
            worker_address,
        } = placement;
        let Some(entry) = self.store.live_entry(&task_id) else {
            match self.sessions.get(&task_id).await {
                Ok(Some(session)) => {
                    self.run_session(session, &worker_id, &worker_address, false)
                        .await
                }
                _ => self.release(&task_id, attempt).await,
            }
            return;
        };
        if !entry.assign(attempt, &worker_id, &worker_address) {
            // Cancelled (or placed twice) meanwhile.
            self.release(&task_id, attempt).await;
            return;
        }
        let span = tracing::info_span!(
            "task.run",
            otel.name = "run task",
            task.id = %task_id,
            task.attempt = attempt,
            worker.id = %worker_id,
        );
        entry
            .trace
            .lock()
            .expect("trace lock poisoned")
            .adopt(&span);
        self.follow_run(entry, attempt, worker_id, worker_address, false)
            .instrument(span)
            .await;
    }

    /// Takes up a task that was on a worker when the driver stopped: attaches to its run there
    /// and records what the driver has not seen yet.
    pub async fn resume(self: Arc<Self>, entry: Arc<TaskEntry>) {
        let attempt = entry.attempt();
        let (worker_id, worker_address, _) = entry.placement();
        tracing::info!(task = %entry.id, worker = %worker_id, attempt, "attaching to the task's run again");
        let span = tracing::info_span!("task.run", otel.name = "attach to task", task.id = %entry.id, task.attempt = attempt, worker.id = %worker_id);
        self.follow_run(entry, attempt, worker_id, worker_address, true)
            .instrument(span)
            .await;
    }

    /// Executes (or attaches to) the task's run on its worker, then decides what its end means.
    async fn follow_run(
        &self,
        entry: Arc<TaskEntry>,
        attempt: u32,
        worker_id: String,
        worker_address: String,
        attach: bool,
    ) {
        let ended = self
            .execute(&entry, attempt, &worker_id, &worker_address, attach)
            .await;
        self.release(&entry.id, attempt).await;
        let ended_here = ended.is_ok() || matches!(ended, Err(RunEnd::Failed(_)));
        match ended {
            Ok(()) => {}
            Err(RunEnd::NotStarted(reason)) => {
                // Not the task's fault: it waits for another placement with the attempt it has.
                tracing::info!(task = %entry.id, worker = %worker_id, %reason, "not taken; queued again");
                if entry.requeue(attempt, format!("{reason}; queued again")) {
                    tokio::time::sleep(REFUSED_PAUSE).await;
                    if entry.status() == TaskStatus::Pending {
                        self.enqueue(&entry).await;
                    }
                }
            }
            Err(RunEnd::GivenBack(reason)) => {
                tracing::info!(task = %entry.id, worker = %worker_id, %reason, "the worker gave the task back");
                if entry.requeue(attempt + 1, format!("{reason}; queued again")) {
                    self.enqueue(&entry).await;
                }
            }
            Err(RunEnd::Failed(reason)) => {
                tracing::warn!(task = %entry.id, worker = %worker_id, %reason, "task failed");
                entry.set_status(attempt, TaskStatus::Failed, reason, &worker_id);
            }
            Err(RunEnd::Lost(reason)) => {
                let max = self.max_attempts;
                if attempt < max
                    && entry.requeue(
                        attempt + 1,
                        format!("{reason}; queued again (attempt {} of {max})", attempt + 1),
                    )
                {
                    tracing::warn!(task = %entry.id, worker = %worker_id, %reason, attempt = attempt + 1, "queued again");
                    self.enqueue(&entry).await;
                } else {
                    entry.set_status(
                        attempt,
                        TaskStatus::Failed,
                        format!("{reason} (attempt {attempt} of {max})"),
                        &worker_id,
                    );
                }
            }
        }
        if ended_here || entry.status().is_terminal() {
            self.task_ended(&entry).await;
        }
    }

    /// Accounts for a task that ended: its cost, its metrics and its notification. Also for
    /// one cancelled before it ran, which cost nothing.
    pub async fn task_ended(&self, entry: &TaskEntry) {
        let task = entry.snapshot();
        if !task.status().is_terminal() {
            return;
        }
        let mode = mode_label(task.spec.as_ref().map_or(0, |spec| spec.execution_mode));
        metrics()
            .tasks_ended
            .get_or_create(&vec![
                ("state", task.status().label().to_owned()),
                ("mode", mode),
            ])
            .inc();
        if let Some(result) = &task.result {
            metrics()
                .agent_turns
                .get_or_create(&vec![("kind", "task".to_owned())])
                .inc_by(u64::from(result.num_turns));
        }
        let ran = !task.worker_id.is_empty() || task.result.is_some();
        if ran {
            self.usage.task_ended(&task).await;
        }
        let result = task.result.clone().unwrap_or_default();
        self.notifier.notify(
            notify::TASK_FINISHED,
            serde_json::json!({
                "taskId": task.task_id,
                "status": task.status().label(),
                "reason": task.status_reason,
                "workerId": task.worker_id,
                "owner": task.owner,
                "costUsd": result.total_cost_usd,
                "meteredCostUsd": task.metered_cost_usd,
                "numTurns": result.num_turns,
                "isError": result.is_error,
            }),
        );
        if ran && self.usage.stops_when_spent() && self.usage.is_spent(&task.owner) {
            Box::pin(self.stop_spent(&task.owner)).await;
        }
    }

    /// Cancels the work a spent budget covers (`driver.budget.whenSpent: stop`).
    async fn stop_spent(&self, owner: &str) {
        // The cluster's budget covers every task; a key's, the key's own.
        let cluster_spent = self.usage.is_spent("");
        let scope = if cluster_spent { None } else { Some(owner) };
        for entry in self.store.live_owned_by(scope) {
            if let CancelAction::Dequeue =
                entry.cancel("a budget is spent (driver.budget.whenSpent: stop)")
            {
                self.dequeue(&entry.id).await;
                self.task_ended(&entry).await;
            }
        }
    }

    /// Sees what each event of a task tells beyond its log: the agent's identity (for the
    /// trees of the tasks it spawns), its first event's latency, tool calls and denials.
    fn observe_task_event(&self, entry: &TaskEntry, kind: &Kind) {
        match kind {
            Kind::Init(init) => {
                let task = entry.snapshot();
                self.usage.agent_started(&task, &init.agent_session_id);
                if let Some(created) = task.create_time
                    && let Ok(created) = SystemTime::try_from(created)
                    && let Ok(waited) = SystemTime::now().duration_since(created)
                {
                    metrics().first_event_latency.observe(waited.as_secs_f64());
                }
            }
            Kind::ToolUse(tool) => {
                metrics()
                    .tool_calls
                    .get_or_create(&vec![("tool", tool.name.clone())])
                    .inc();
            }
            Kind::PermissionDenied(denied) => {
                self.notifier.notify(
                    notify::PERMISSION_DENIED,
                    serde_json::json!({
                        "taskId": entry.id,
                        "tool": denied.tool_name,
                        "toolUseId": denied.tool_use_id,
                        "message": denied.message,
                    }),
                );
            }
            _ => {}
        }
    }

    /// `Err` when the task did not end on the worker (refused, unreachable, or lost while
    /// running), with the reason; such a task may be tried elsewhere. Otherwise it has ended.
    async fn execute(
        &self,
        entry: &Arc<TaskEntry>,
        attempt: u32,
        worker_id: &str,
        worker_address: &str,
        attach: bool,
    ) -> Result<(), RunEnd> {
        let worker = self.worker(worker_address).map_err(|err| {
            RunEnd::Lost(format!(
                "bad address {worker_address} of worker {worker_id}: {err}"
            ))
        })?;
        let open = |attach: bool| {
            let mut worker = worker.clone();
            let (_, _, after_run_sequence) = entry.placement();
            let request = ExecuteTaskRequest {
                task_id: entry.id.clone(),
                attempt,
                spec: Some(entry.spec()),
                attach,
                after_run_sequence: if attach { after_run_sequence } else { 0 },
            };
            async move { worker.execute_task(request).await }
        };
        let cancel = entry.cancel_requested().clone();
        let response = tokio::select! {
            response = open(attach) => response,
            _ = cancel.cancelled(), if !attach => {
                entry.set_status(attempt, TaskStatus::Cancelled, entry.cancel_reason(), worker_id);
                return Ok(());
            }
        };
        let response = match response {
            // The worker already runs this attempt (the driver restarted before it recorded
            // the placement): collect it rather than start another.
            Err(status) if !attach && status.code() == tonic::Code::AlreadyExists => {
                open(true).await
            }
            other => other,
        };
        let mut events = match response {
            Ok(response) => response.into_inner(),
            // Refused before it ran, for want of room or because the worker cannot run tasks
            // just now (Docker away, shutting down, unreachable): the task waits for another
            // placement with the attempt it has.
            Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                return Err(RunEnd::NotStarted(format!(
                    "worker {worker_id} is full: {}",
                    status.message()
                )));
            }
            Err(status) if !attach && status.code() == tonic::Code::Unavailable => {
                return Err(RunEnd::NotStarted(format!(
                    "worker {worker_id} could not take the task: {}",
                    status.message()
                )));
            }
            Err(status) if !attach && status.code() == tonic::Code::InvalidArgument => {
                return Err(RunEnd::Failed(format!(
                    "worker {worker_id} refused the task: {}",
                    status.message()
                )));
            }
            Err(status) if attach && status.code() == tonic::Code::NotFound => {
                return Err(RunEnd::Lost(format!(
                    "worker {worker_id} no longer holds the run: {}",
                    status.message()
                )));
            }
            Err(status) => {
                return Err(RunEnd::Lost(format!(
                    "worker {worker_id} did not start the task: {}",
                    status.message()
                )));
            }
        };
        let mut cancel_deadline = None;
        // Whether the stream was opened again since the last event: a second break without
        // progress means the worker is gone.
        let mut reattached = false;
        loop {
            tokio::select! {
                message = events.message() => match message {
                    Ok(Some(response)) => {
                        reattached = false;
                        let run_sequence = response.run_sequence;
                        let Some(kind) = response.event.and_then(|event| event.kind) else { continue };
                        // A worker that shuts down gives back what it could not finish.
                        if let Kind::StatusChange(change) = &kind
                            && change.status() == TaskStatus::Pending
                        {
                            return Err(RunEnd::GivenBack(change.reason.clone()));
                        }
                        let terminal = matches!(&kind, Kind::StatusChange(change) if change.status().is_terminal());
                        self.observe_task_event(entry, &kind);
                        entry.append_from_worker(attempt, kind, run_sequence);
                        if terminal {
                            return Ok(());
                        }
                    }
                    // The stream broke mid-task. The run may go on on the worker (a connection
                    // lost for a moment): attach to it again, once. A worker that does not
                    // answer, or holds the run no more, is lost: the task may run again
                    // elsewhere, unless it was being cancelled anyway.
                    Err(status) if is_oversized(&status) => {
                        return Err(RunEnd::Failed(format!(
                            "an event from worker {worker_id} was larger than a message may be ({} bytes): {}",
                            claudecluster_proto::MAX_MESSAGE_BYTES,
                            status.message()
                        )));
                    }
                    Ok(None) | Err(_) if cancel_deadline.is_none() => {
                        let broke = match message {
                            Err(status) => format!("lost worker {worker_id}: {}", status.message()),
                            _ => format!("worker {worker_id} ended the task's stream without an outcome"),
                        };
                        if reattached {
                            return Err(RunEnd::Lost(broke));
                        }
                        match tokio::time::timeout(REATTACH_PATIENCE, open(true)).await {
                            Ok(Ok(again)) => {
                                tracing::info!(task = %entry.id, worker = %worker_id, %broke, "attached to the run again");
                                reattached = true;
                                events = again.into_inner();
                            }
                            _ => return Err(RunEnd::Lost(broke)),
                        }
                    }
                    Ok(None) | Err(_) => {
                        entry.set_status(attempt, TaskStatus::Cancelled, entry.cancel_reason(), worker_id);
                        return Ok(());
                    }
                },
                _ = cancel.cancelled(), if cancel_deadline.is_none() => {
                    cancel_deadline = Some(tokio::time::Instant::now() + CANCEL_DEADLINE);
                    let request = CancelExecutionRequest { task_id: entry.id.clone(), reason: entry.cancel_reason() };
                    if let Err(status) = worker.clone().cancel_execution(request).await {
                        tracing::warn!(task = %entry.id, error = %status.message(), "cannot ask the worker to cancel");
                    }
                }
                _ = tokio::time::sleep_until(cancel_deadline.unwrap_or_else(tokio::time::Instant::now)), if cancel_deadline.is_some() => {
                    entry.set_status(attempt, TaskStatus::Cancelled, entry.cancel_reason(), worker_id);
                    return Ok(());
                }
            }
        }
    }

    /// Hands a new task to the scheduler, or, when it depends on others, waits for them
    /// first: it runs once all completed, and is cancelled when one did not.
    pub async fn start(self: &Arc<Self>, entry: Arc<TaskEntry>, dependencies: Vec<Arc<TaskEntry>>) {
        *entry.trace.lock().expect("trace lock poisoned") = TraceParent::current();
        if dependencies.is_empty() {
            self.enqueue(&entry).await;
            return;
        }
        let this = self.clone();
        let waiting = tracing::info_span!("task.dependencies", otel.name = "wait for dependencies", task.id = %entry.id);
        tokio::spawn(
            async move {
                for dependency in dependencies {
                    dependency.ended().await;
                    let done = dependency.snapshot();
                    if done.status() != TaskStatus::Completed {
                        let reason = format!(
                            "dependency {} {}: {}",
                            done.task_id,
                            done.status().label(),
                            done.status_reason
                        );
                        if let CancelAction::Dequeue = entry.cancel(&reason) {
                            this.task_ended(&entry).await;
                        }
                        return;
                    }
                }
                entry.unblock();
                if entry.status() == TaskStatus::Pending {
                    this.enqueue(&entry).await;
                }
            }
            .instrument(waiting),
        );
    }

    /// Hands a session to the scheduler: it holds a slot of a container worker while it lives.
    pub async fn enqueue_session(&self, session: &SessionEntry) {
        let spec = session.spec();
        let request = EnqueueTaskRequest {
            task_id: session.id.clone(),
            attempt: 1,
            execution_mode: ExecutionMode::ContainerAgentic as i32,
            needs: Some(claudecluster_proto::v1::TaskNeeds::of_session(&spec)),
            worker_selector: spec.worker_selector,
            priority: Priority::Normal as i32,
        };
        match self.scheduler.clone().enqueue_task(request).await {
            Ok(response) => {
                let reason = response.into_inner().waiting_reason;
                if !reason.is_empty() {
                    session.set_state(SessionState::Creating, reason, "", 0);
                }
            }
            Err(status) => {
                tracing::warn!(session = %session.id, error = %status.message(), "cannot reach the scheduler; the session waits");
            }
        }
    }

    /// Runs a placed session on its worker (or attaches to it again after a restart) over one
    /// stream: records everything the worker streams about it and sends it its messages one at
    /// a time, until the session ends.
    pub async fn run_session(
        &self,
        session: Arc<SessionEntry>,
        worker_id: &str,
        worker_address: &str,
        attach: bool,
    ) {
        let span = tracing::info_span!(
            "session.run",
            otel.name = "run session",
            session.id = %session.id,
            worker.id = %worker_id,
        );
        session
            .trace
            .lock()
            .expect("trace lock poisoned")
            .adopt(&span);
        self.follow_session(session, worker_id, worker_address, attach)
            .instrument(span)
            .await
    }

    async fn follow_session(
        &self,
        session: Arc<SessionEntry>,
        worker_id: &str,
        worker_address: &str,
        attach: bool,
    ) {
        if !attach && !session.assign(worker_id, worker_address) {
            self.release(&session.id, 0).await;
            return;
        }
        let mut worker = match self.worker(worker_address) {
            Ok(worker) => worker,
            Err(err) => {
                session.set_state(
                    SessionState::Failed,
                    format!("bad address {worker_address} of worker {worker_id}: {err}"),
                    worker_id,
                    0,
                );
                self.release(&session.id, 0).await;
                return;
            }
        };
        let link = self.link_session(&session.id);
        let (input, mut events) = match open_session_stream(&mut worker, &session, attach).await {
            Ok(opened) => opened,
            Err(status) => {
                let (state, reason) = if attach {
                    (
                        SessionState::Lost,
                        format!(
                            "worker {worker_id} no longer holds the session: {}",
                            status.message()
                        ),
                    )
                } else {
                    (
                        SessionState::Failed,
                        format!(
                            "worker {worker_id} did not start the session: {}",
                            status.message()
                        ),
                    )
                };
                link.finish();
                session.set_state(state, reason, worker_id, 0);
                self.release(&session.id, 0).await;
                return;
            }
        };
        // After a restart, a message the driver sent may not have reached the worker: it is sent
        // again, and the worker answers each turn once.
        let mut input = link.connect(&session, input, attach);
        // Whether the stream was opened again since the last event: a second break without
        // progress means the worker is gone.
        let mut reattached = false;
        // The turn being answered, as a span of the session's trace.
        let mut turn_span: Option<tracing::Span> = None;
        let lost = loop {
            let broke = tokio::select! {
                message = events.message() => match message {
                    Ok(Some(response)) => {
                        reattached = false;
                        if let Some(event) = response.event {
                            if matches!(event.kind, Some(Kind::Result(_))) {
                                // The turn's span ends with its answer.
                                turn_span.take();
                            }
                            let answered = match &event.kind {
                                Some(Kind::Result(result)) => Some((
                                    event.turn,
                                    result.clone(),
                                    session.snapshot().total_cost_usd,
                                )),
                                Some(Kind::ToolUse(tool)) => {
                                    metrics().tool_calls.get_or_create(&vec![("tool", tool.name.clone())]).inc();
                                    None
                                }
                                _ => None,
                            };
                            session.append_from_worker(event, response.run_sequence);
                            if let Some((turn, result, cost_before)) = answered {
                                self.session_replied(&session, turn, &result, cost_before).await;
                            }
                        }
                        if session.state().is_final() {
                            break String::new();
                        }
                        continue;
                    }
                    Ok(None) => format!("worker {worker_id} ended the session's stream"),
                    Err(status) => format!("lost worker {worker_id}: {}", status.message()),
                },
                // One message at a time, once the previous one is answered. One that does not
                // get onto a broken stream is the one in flight: it goes on the next.
                Some((turn, text)) = session.next_message() => {
                    let span = tracing::info_span!("session.turn", otel.name = "session turn", session.turn = turn);
                    let _ = input.send(turn_message(turn, text)).instrument(span.clone()).await;
                    turn_span.replace(span);
                    continue;
                }
            };
            if reattached {
                break broke;
            }
            // The session may go on on the worker (a connection lost for a moment): attach to
            // it again, once, before counting the worker as lost.
            let opened = tokio::time::timeout(
                REATTACH_PATIENCE,
                open_session_stream(&mut worker, &session, true),
            )
            .await;
            match opened {
                Ok(Ok((again_input, again))) => {
                    reattached = true;
                    events = again;
                    input = link.connect(&session, again_input, true);
                }
                _ => break broke,
            }
        };
        link.finish();
        self.unlink_session(&session.id, &link);
        // A stream that ends before the session did means the worker is gone.
        session.set_state(SessionState::Lost, lost, worker_id, 0);
        self.release(&session.id, 0).await;
    }

    /// Accounts for a session's answer: its cost, its metrics and its notification.
    async fn session_replied(
        &self,
        session: &SessionEntry,
        turn: u32,
        result: &claudecluster_proto::v1::AgentResult,
        cost_before: f64,
    ) {
        let snapshot = session.snapshot();
        metrics()
            .agent_turns
            .get_or_create(&vec![("kind", "session".to_owned())])
            .inc_by(u64::from(result.num_turns));
        self.usage
            .session_replied(&snapshot, turn, result, cost_before)
            .await;
        if self.usage.stops_when_spent() && self.usage.is_spent(&snapshot.owner) {
            self.stop_spent(&snapshot.owner).await;
        }
        self.notifier.notify(
            notify::SESSION_REPLIED,
            serde_json::json!({
                "sessionId": snapshot.session_id,
                "turn": turn,
                "text": result.text.chars().take(4096).collect::<String>(),
                "isError": result.is_error,
                "costUsd": (result.total_cost_usd - cost_before).max(0.0),
                "owner": snapshot.owner,
            }),
        );
    }

    /// Tells the webhooks of workers that turn unhealthy, as the scheduler sees them, until
    /// `stop`.
    pub async fn watch_workers(self: Arc<Self>, stop: CancellationToken) {
        let mut healthy: HashMap<String, bool> = HashMap::new();
        let mut ticker = tokio::time::interval(WORKER_WATCH_INTERVAL);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let Ok(workers) = self
                .scheduler
                .clone()
                .list_workers(claudecluster_proto::v1::ListWorkersRequest {})
                .await
            else {
                continue;
            };
            for worker in workers.into_inner().workers {
                let was = healthy.insert(worker.worker_id.clone(), worker.healthy);
                if !worker.healthy && was == Some(true) {
                    self.notifier.notify(
                        notify::WORKER_UNHEALTHY,
                        serde_json::json!({
                            "workerId": worker.worker_id,
                            "address": worker.address,
                            "reason": worker.health_reason,
                        }),
                    );
                }
            }
        }
    }

    /// Registers the stream about to be opened to a session, for [`Dispatcher::close_session`].
    fn link_session(&self, session_id: &str) -> Arc<SessionLink> {
        let link = Arc::new(SessionLink::default());
        self.session_links
            .lock()
            .expect("session link lock poisoned")
            .insert(session_id.to_owned(), link.clone());
        link
    }

    fn unlink_session(&self, session_id: &str, link: &Arc<SessionLink>) {
        let mut links = self
            .session_links
            .lock()
            .expect("session link lock poisoned");
        if links
            .get(session_id)
            .is_some_and(|held| Arc::ptr_eq(held, link))
        {
            links.remove(session_id);
        }
    }

    fn session_link(&self, session_id: &str) -> Option<Arc<SessionLink>> {
        self.session_links
            .lock()
            .expect("session link lock poisoned")
            .get(session_id)
            .cloned()
    }

    /// Closes a session: on its worker when it has one (container and volumes go), otherwise
    /// here. Waits a bounded time for the worker to confirm.
    pub async fn close_session(&self, session: &SessionEntry) {
        let Some(address) = session.worker_address() else {
            self.dequeue(&session.id).await;
            session.set_state(SessionState::Closed, "closed by a client", "", 0);
            return;
        };
        if let Some(link) = self.session_link(&session.id)
            && link.close()
        {
            // The worker takes the close once its agent started and the message being
            // answered is answered, as it takes messages; the session's stream then ends with
            // its Closed state.
            session.settled().await;
            let _ = tokio::time::timeout(CANCEL_DEADLINE, session.ended()).await;
        }
        if session.state() != SessionState::Closed {
            // No stream of the driver's reached the session (it failed or was lost here, or
            // the driver has not attached to it again since it started), yet the worker may
            // hold it still.
            self.close_on_a_stream_of_its_own(session, &address).await;
        }
        session.set_state(SessionState::Closed, "closed by a client", "", 0);
    }

    /// Attaches to a session only to close it, recording what its worker streams until the
    /// Closed state; gives up after a bounded time, or when the worker does not hold it.
    async fn close_on_a_stream_of_its_own(&self, session: &SessionEntry, address: &str) {
        let Ok(mut worker) = self.worker(address) else {
            return;
        };
        let closing = async {
            let (input, mut events) = open_session_stream(&mut worker, session, true).await?;
            let _ = input
                .send(session_message(SessionMessage::Close(SessionClose {})))
                .await;
            while let Some(response) = events.message().await? {
                let Some(event) = response.event else {
                    continue;
                };
                let closed = matches!(&event.kind, Some(Kind::SessionState(change)) if change.state() == SessionState::Closed);
                session.append_from_worker(event, response.run_sequence);
                if closed {
                    break;
                }
            }
            Ok::<_, tonic::Status>(())
        };
        match tokio::time::timeout(CANCEL_DEADLINE, closing).await {
            Ok(Ok(())) => {}
            Ok(Err(status)) => {
                tracing::info!(session = %session.id, error = %status.message(), "the worker did not close the session")
            }
            Err(_) => {
                tracing::warn!(session = %session.id, "the worker did not confirm the close in time")
            }
        }
    }
}

/// The driver's end of a session's stream to its worker, kept across the streams one
/// `run_session` opens: a close asked for while a broken stream is opened again is not lost.
#[derive(Default)]
struct SessionLink {
    state: Mutex<LinkState>,
}

#[derive(Default)]
struct LinkState {
    /// The input of the stream open now.
    input: Option<mpsc::Sender<RunSessionRequest>>,
    /// A client asked to close the session: every stream opened from now on says so.
    closing: bool,
    /// `run_session` stopped following the session: nothing reads this link any more.
    finished: bool,
}

impl SessionLink {
    /// Takes `input`, a stream just opened, as the session's from now on. With `resend`, the
    /// message sent on a stream before it and not answered goes on it first.
    fn connect(
        &self,
        session: &SessionEntry,
        input: mpsc::Sender<RunSessionRequest>,
        resend: bool,
    ) -> mpsc::Sender<RunSessionRequest> {
        // Room for both: the stream holds only its first message yet.
        if resend && let Some((turn, text)) = session.unanswered() {
            let _ = input.try_send(turn_message(turn, text));
        }
        let mut state = self.state.lock().expect("session link lock poisoned");
        if state.closing {
            let _ = input.try_send(session_message(SessionMessage::Close(SessionClose {})));
        }
        state.input = Some(input.clone());
        input
    }

    /// Sends a close on the stream; false when no stream of this link reaches the session.
    fn close(&self) -> bool {
        let mut state = self.state.lock().expect("session link lock poisoned");
        if state.finished {
            return false;
        }
        state.closing = true;
        // A full or broken stream is opened again, and says so then.
        if let Some(input) = &state.input {
            let _ = input.try_send(session_message(SessionMessage::Close(SessionClose {})));
        }
        true
    }

    fn finish(&self) {
        let mut state = self.state.lock().expect("session link lock poisoned");
        state.finished = true;
        state.input = None;
    }
}

fn session_message(message: SessionMessage) -> RunSessionRequest {
    RunSessionRequest {
        message: Some(message),
    }
}

/// Opens a stream to a session on its worker: starts the session there, or attaches to it after
/// the events the driver has. Returns the stream's input and the session's events.
async fn open_session_stream(
    worker: &mut WorkerServiceClient<Channel>,
    session: &SessionEntry,
    attach: bool,
) -> Result<
    (
        mpsc::Sender<RunSessionRequest>,
        Streaming<RunSessionResponse>,
    ),
    tonic::Status,
> {
    let (input, requests) = mpsc::channel(SESSION_INPUT_BUFFER);
    let (_, after_run_sequence) = session.placement();
    let open = SessionOpen {
        session_id: session.id.clone(),
        spec: Some(session.spec()),
        attach,
        after_run_sequence: if attach { after_run_sequence } else { 0 },
    };
    input
        .try_send(session_message(SessionMessage::Open(open)))
        .expect("a new stream has room for its first message");
    let events = worker
        .run_session(ReceiverStream::new(requests))
        .await?
        .into_inner();
    Ok((input, events))
}

fn turn_message(turn: u32, text: String) -> RunSessionRequest {
    session_message(SessionMessage::Turn(SessionTurn { turn, text }))
}
