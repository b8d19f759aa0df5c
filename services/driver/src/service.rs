use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use claudecluster_proto::v1::driver_service_server::DriverService as DriverApi;
use claudecluster_proto::v1::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::admission::Admission;
use crate::auth::{Auth, Caller, Scope};
use crate::batch;
use crate::dispatch::Dispatcher;
use crate::error::DriverError;
use crate::journal::Reader;
use crate::listing;
use crate::results;
use crate::sessions::{SessionEntry, SessionStore};
use crate::store::{CancelAction, TaskEntry, TaskStore};
use claudecluster_proto::validate;

const DEFAULT_PAGE_SIZE: usize = 100;
const MAX_PAGE_SIZE: usize = 1000;
/// How long CancelTask waits for a running task to end before answering.
const CANCEL_WAIT: Duration = Duration::from_secs(15);

/// What the driver takes from one request (see [`claudecluster_config::DriverConfig`]).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Messages a session holds while it answers another.
    pub session_queue: usize,
    /// Tasks one `SubmitTasks` may hold.
    pub batch_size: usize,
    /// The largest prompt or session message.
    pub prompt_bytes: usize,
}

/// The DriverService: thin RPC methods over the [`TaskStore`] and the [`Dispatcher`].
pub struct DriverService {
    store: Arc<TaskStore>,
    sessions: Arc<SessionStore>,
    dispatcher: Arc<Dispatcher>,
    admission: Admission,
    auth: Arc<Auth>,
    limits: Limits,
    usage: Arc<crate::usage::Usage>,
    /// Cancelled when the driver shuts down: open streams end with UNAVAILABLE so that clients
    /// reconnect (to this driver once it is back, or another).
    stopping: CancellationToken,
}

impl DriverService {
    pub fn new(
        store: Arc<TaskStore>,
        sessions: Arc<SessionStore>,
        dispatcher: Arc<Dispatcher>,
        auth: Arc<Auth>,
        limits: Limits,
        usage: Arc<crate::usage::Usage>,
        stopping: CancellationToken,
    ) -> Self {
        DriverService {
            store,
            sessions,
            auth,
            admission: Admission::new(dispatcher.scheduler()),
            dispatcher,
            limits,
            usage,
            stopping,
        }
    }

    /// Refuses what no registered worker admits, naming the field (prefixed with `prefix`,
    /// as `tasks[3].`).
    async fn check_admitted(&self, needs: &TaskNeeds, prefix: &str) -> Result<(), DriverError> {
        self.admission.check(needs).await.map_err(|refused| {
            DriverError::invalid(format!("{prefix}{}", refused.field), refused.message)
        })
    }

    /// The session `session_id`, if `caller` may see it; another key's is not found, as
    /// if it did not exist.
    async fn session(
        &self,
        session_id: &str,
        caller: &Caller,
    ) -> Result<Arc<SessionEntry>, DriverError> {
        validate::id("session_id", session_id)?;
        self.sessions
            .get(session_id)
            .await?
            .filter(|session| caller.may_see(&session.owner()))
            .ok_or_else(|| DriverError::SessionNotFound(session_id.to_owned()))
    }

    /// The worker holding the workspace a files request names by `task_id` or `session_id`
    /// (exactly one), if the caller may see it, and the request. A session's workspace is read
    /// with the `sessions` scope, a task's with `tasks:read`.
    async fn located<T: results::WorkspaceQuery>(
        &self,
        request: Request<T>,
    ) -> Result<(results::Located, T), DriverError> {
        let (task_id, session_id) = request.get_ref().whose();
        let scope = if session_id.is_empty() {
            Scope::TasksRead
        } else {
            Scope::Sessions
        };
        let caller = self.auth.caller(&request, scope).await?;
        let located = match (task_id.is_empty(), session_id.is_empty()) {
            (false, true) => {
                let entry = self.task(task_id, &caller).await?;
                results::of_task(&self.dispatcher, &entry).await?
            }
            (true, false) => {
                let session = self.session(session_id, &caller).await?;
                results::of_session(&self.dispatcher, &session).await?
            }
            _ => {
                return Err(DriverError::invalid(
                    "task_id",
                    "name a task (`task_id`) or a session (`session_id`), one of them",
                ));
            }
        };
        Ok((located, request.into_inner()))
    }

    /// What followers read with: the store, and the driver's shutdown, which ends their
    /// streams with UNAVAILABLE naming where to resume.
    fn reader(&self) -> Reader {
        Reader {
            db: self.store.db().clone(),
            stop: self.stopping.clone(),
        }
    }

    /// A response stream fed by `follow`.
    fn event_stream<T, F, Fut>(
        &self,
        kind: &'static str,
        follow: F,
        wrap: fn(Event) -> T,
    ) -> Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>
    where
        T: Send + 'static,
        F: FnOnce(mpsc::Sender<Result<Event, Status>>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let (events, followed) = mpsc::channel(128);
        tokio::spawn(follow(events));
        // Counted as a subscriber for as long as the client holds the stream.
        let subscriber = crate::metrics::Subscriber::new(kind);
        Box::pin(ReceiverStream::new(followed).map(move |event| {
            let _counted = &subscriber;
            event.map(wrap)
        }))
    }

    /// Whether any registered worker runs container mode; sessions need one.
    async fn has_container_worker(&self) -> Result<bool, DriverError> {
        let workers = self
            .dispatcher
            .scheduler()
            .list_workers(ListWorkersRequest {})
            .await
            .map_err(|status| self.scheduler_unavailable(status))?
            .into_inner()
            .workers;
        Ok(workers.iter().any(|worker| {
            worker
                .execution_modes()
                .any(|mode| mode == ExecutionMode::ContainerAgentic)
        }))
    }

    /// The task `task_id`, if `caller` may see it; another key's is not found, as if it did
    /// not exist.
    async fn task(&self, task_id: &str, caller: &Caller) -> Result<Arc<TaskEntry>, DriverError> {
        validate::id("task_id", task_id)?;
        self.visible_task(task_id, caller)
            .await?
            .ok_or_else(|| DriverError::TaskNotFound(task_id.to_owned()))
    }

    async fn visible_task(
        &self,
        task_id: &str,
        caller: &Caller,
    ) -> Result<Option<Arc<TaskEntry>>, DriverError> {
        Ok(self
            .store
            .get(task_id)
            .await?
            .filter(|entry| caller.may_see(&entry.owner())))
    }

    /// The tasks `ids` names, each of which must exist and be the caller's.
    async fn dependencies(
        &self,
        ids: &[String],
        caller: &Caller,
    ) -> Result<Vec<Arc<TaskEntry>>, DriverError> {
        let mut found = Vec::with_capacity(ids.len());
        for id in ids {
            found.push(self.visible_task(id, caller).await?.ok_or_else(|| {
                DriverError::invalid("spec.depends_on", format!("task {id} not found"))
            })?);
        }
        Ok(found)
    }

    /// Refuses new work when a budget that covers `caller` is spent.
    fn check_budget(&self, caller: &Caller) -> Result<(), DriverError> {
        self.usage
            .check(&caller.key_id, caller.quotas.as_ref())
            .map_err(DriverError::QuotaExceeded)
    }

    /// Refuses a submission that would take `caller` past its `runningTasks` quota.
    fn check_running_quota(&self, caller: &Caller, adding: usize) -> Result<(), DriverError> {
        let Some(quotas) = caller.quotas else {
            return Ok(());
        };
        let running = self.store.running_owned_by(&caller.key_id);
        if running + adding > quotas.running_tasks as usize {
            return Err(DriverError::QuotaExceeded(format!(
                "key `{}` has {running} tasks not yet ended and may have {} (runningTasks); submit again once some end",
                caller.key_id, quotas.running_tasks
            )));
        }
        Ok(())
    }

    fn scheduler_unavailable(&self, status: Status) -> DriverError {
        DriverError::SchedulerUnavailable {
            address: self.dispatcher.scheduler_address.clone(),
            message: status.message().to_owned(),
        }
    }
}

/// The page a list request asks for: after which position and how many (default 100, at most
/// 1000).
fn page(token: &str, size: u32) -> Result<(i64, usize), DriverError> {
    let start = if token.is_empty() {
        Some(0)
    } else {
        token.parse().ok().filter(|start: &i64| *start >= 0)
    }
    .ok_or_else(|| DriverError::invalid("page_token", "is not a token this server returned"))?;
    let limit = match size as usize {
        0 => DEFAULT_PAGE_SIZE,
        size => size.min(MAX_PAGE_SIZE),
    };
    Ok((start, limit))
}

/// The enum values a list request filters by; an unknown or unspecified one names the field.
fn filter_values<E>(values: &[i32], field: &str, what: &str) -> Result<Vec<E>, DriverError>
where
    E: TryFrom<i32> + Default + PartialEq,
{
    values
        .iter()
        .map(|value| match E::try_from(*value) {
            Ok(known) if known != E::default() => Ok(known),
            _ => Err(DriverError::invalid(
                field,
                format!("{value} is not a {what}"),
            )),
        })
        .collect()
}

type EventStream = Pin<Box<dyn Stream<Item = Result<StreamTaskEventsResponse, Status>> + Send>>;

fn task_event(event: Event) -> StreamTaskEventsResponse {
    StreamTaskEventsResponse { event: Some(event) }
}

fn session_event(event: Event) -> StreamSessionEventsResponse {
    StreamSessionEventsResponse { event: Some(event) }
}

fn reply_event(event: Event) -> SendSessionMessageResponse {
    SendSessionMessageResponse { event: Some(event) }
}

#[tonic::async_trait]
impl DriverApi for DriverService {
    async fn submit_task(
        &self,
        request: Request<SubmitTaskRequest>,
    ) -> Result<Response<SubmitTaskResponse>, Status> {
        let caller = self.auth.caller(&request, Scope::TasksWrite).await?;
        let spec = request
            .into_inner()
            .spec
            .ok_or_else(|| DriverError::invalid("spec", "is required"))?;
        validate::task_spec(&spec, self.limits.prompt_bytes).map_err(DriverError::from)?;
        let needs = TaskNeeds::of_task(&spec);
        if needs.is_unrestricted() {
            self.auth.require(&caller, Scope::Unrestricted)?;
        }
        self.check_admitted(&needs, "").await?;
        self.check_running_quota(&caller, 1)?;
        self.check_budget(&caller)?;
        let dependencies = self.dependencies(&spec.depends_on, &caller).await?;
        let (entry, created) = self.store.insert(spec, &caller.key_id).await?;
        // The answer is the task as accepted; it may be placed before this call returns.
        let task = entry.public();
        if created {
            tracing::info!(task = %entry.id, "task submitted");
            self.auth.audit(&caller, "task.submit", &entry.id, "");
            self.dispatcher.start(entry, dependencies).await;
        }
        Ok(Response::new(SubmitTaskResponse { task: Some(task) }))
    }

    async fn submit_tasks(
        &self,
        request: Request<SubmitTasksRequest>,
    ) -> Result<Response<SubmitTasksResponse>, Status> {
        let caller = self.auth.caller(&request, Scope::TasksWrite).await?;
        let tasks = request.into_inner().tasks;
        // Ids a batch names that are not its own keys must be existing tasks of the caller.
        let mut existing = std::collections::HashSet::new();
        let keys: std::collections::HashSet<&str> =
            tasks.iter().map(|task| task.key.as_str()).collect();
        for task in &tasks {
            for dependency in task.spec.iter().flat_map(|spec| &spec.depends_on) {
                if !keys.contains(dependency.as_str())
                    && !existing.contains(dependency)
                    && self.visible_task(dependency, &caller).await?.is_some()
                {
                    existing.insert(dependency.clone());
                }
            }
        }
        let planned = batch::plan(tasks, self.limits, |id| existing.contains(id))?;
        for (index, (_, spec)) in planned.iter().enumerate() {
            let needs = TaskNeeds::of_task(spec);
            if needs.is_unrestricted() {
                self.auth.require(&caller, Scope::Unrestricted)?;
            }
            self.check_admitted(&needs, &format!("tasks[{index}]."))
                .await?;
        }
        self.check_running_quota(&caller, planned.len())?;
        self.check_budget(&caller)?;
        let entries = self.store.insert_all(planned, &caller.key_id).await?;
        for entry in &entries {
            self.auth
                .audit(&caller, "task.submit", &entry.id, "in a batch");
        }
        // As a list shows them, so that the answer fits whatever the batch held.
        let tasks = entries
            .iter()
            .map(|entry| listing::listed_task(entry.public()))
            .collect();
        for entry in entries {
            let dependencies = self.dependencies(&entry.spec().depends_on, &caller).await?;
            self.dispatcher.start(entry, dependencies).await;
        }
        Ok(Response::new(SubmitTasksResponse { tasks }))
    }

    async fn get_task(
        &self,
        request: Request<GetTaskRequest>,
    ) -> Result<Response<GetTaskResponse>, Status> {
        let caller = self.auth.caller(&request, Scope::TasksRead).await?;
        let entry = self.task(&request.into_inner().task_id, &caller).await?;
        Ok(Response::new(GetTaskResponse {
            task: Some(entry.public()),
        }))
    }

    async fn list_tasks(
        &self,
        request: Request<ListTasksRequest>,
    ) -> Result<Response<ListTasksResponse>, Status> {
        let caller = self.auth.caller(&request, Scope::TasksRead).await?;
        let request = request.into_inner();
        let statuses: Vec<TaskStatus> =
            filter_values(&request.statuses, "statuses", "task status")?;
        let (start, limit) = page(&request.page_token, request.page_size)?;
        let selector = request.label_selector;
        let statuses: Vec<i32> = statuses.into_iter().map(|status| status as i32).collect();
        let (tasks, next) = self
            .store
            .page(start, limit, &statuses, |task| {
                let labels = task.spec.as_ref().map(|spec| &spec.labels);
                caller.may_see(&task.owner)
                    && selector
                        .iter()
                        .all(|(key, value)| labels.and_then(|l| l.get(key)) == Some(value))
            })
            .await?;
        Ok(Response::new(ListTasksResponse {
            tasks,
            next_page_token: next.map(|order| order.to_string()).unwrap_or_default(),
        }))
    }

    async fn cancel_task(
        &self,
        request: Request<CancelTaskRequest>,
    ) -> Result<Response<CancelTaskResponse>, Status> {
        let caller = self.auth.caller(&request, Scope::TasksWrite).await?;
        let request = request.into_inner();
        let entry = self.task(&request.task_id, &caller).await?;
        let reason = if request.reason.trim().is_empty() {
            "cancelled by a client".to_owned()
        } else {
            request.reason
        };
        match entry.cancel(&reason) {
            CancelAction::AlreadyEnded => {}
            CancelAction::Dequeue => {
                self.dispatcher.dequeue(&entry.id).await;
                self.dispatcher.task_ended(&entry).await;
            }
            CancelAction::StopOnWorker => {
                // The answer is more useful once the task has actually stopped.
                let _ = tokio::time::timeout(CANCEL_WAIT, entry.ended()).await;
            }
        }
        tracing::info!(task = %entry.id, %reason, "cancel requested");
        self.auth.audit(&caller, "task.cancel", &entry.id, &reason);
        Ok(Response::new(CancelTaskResponse {
            task: Some(entry.public()),
        }))
    }

    type StreamTaskEventsStream = EventStream;

    async fn stream_task_events(
        &self,
        request: Request<StreamTaskEventsRequest>,
    ) -> Result<Response<Self::StreamTaskEventsStream>, Status> {
        let caller = self.auth.caller(&request, Scope::TasksRead).await?;
        let request = request.into_inner();
        let entry = self.task(&request.task_id, &caller).await?;
        let reader = self.reader();
        let after = request.after_sequence;
        Ok(Response::new(self.event_stream(
            "task",
            move |out| entry.follow(reader, after, out),
            task_event,
        )))
    }

    async fn get_cluster_status(
        &self,
        request: Request<GetClusterStatusRequest>,
    ) -> Result<Response<GetClusterStatusResponse>, Status> {
        self.auth.caller(&request, Scope::TasksRead).await?;
        let mut scheduler = self.dispatcher.scheduler();
        let workers = scheduler
            .list_workers(ListWorkersRequest {})
            .await
            .map_err(|status| self.scheduler_unavailable(status))?
            .into_inner()
            .workers;
        let queue = scheduler
            .get_queue_stats(GetQueueStatsRequest {})
            .await
            .map_err(|status| self.scheduler_unavailable(status))?
            .into_inner();
        Ok(Response::new(GetClusterStatusResponse {
            workers,
            tasks_by_status: self.store.count_by_status().await?,
            queued_tasks: queue.queued_tasks,
            queued_by_priority: queue.queued_by_priority,
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }))
    }

    async fn delete_task(
        &self,
        request: Request<DeleteTaskRequest>,
    ) -> Result<Response<DeleteTaskResponse>, Status> {
        let caller = self.auth.caller(&request, Scope::TasksWrite).await?;
        let entry = self.task(&request.into_inner().task_id, &caller).await?;
        let status = entry.status();
        if !status.is_terminal() {
            return Err(DriverError::TaskNotEnded {
                task_id: entry.id.clone(),
                status: status.label(),
            }
            .into());
        }
        let task = entry.public();
        // The workspace goes first: a record deleted while its worker is away would leave its
        // workspace to retention, which removes it later anyway.
        let workspace_removed = match results::of_task(&self.dispatcher, &entry).await {
            Ok(located) => {
                let removing = located
                    .worker
                    .clone()
                    .remove_workspace(RemoveWorkspaceRequest {
                        workspace: Some(located.workspace.clone()),
                    })
                    .await;
                match removing {
                    Ok(answer) => answer.into_inner().found,
                    Err(status) => {
                        tracing::warn!(task = %entry.id, worker = %located.worker_id, error = %status.message(), "cannot remove the task's workspace; retention will");
                        false
                    }
                }
            }
            Err(_) => false,
        };
        if !self.store.delete(&entry).await? {
            return Err(DriverError::TaskNotFound(entry.id.clone()).into());
        }
        tracing::info!(task = %entry.id, workspace_removed, "task deleted");
        self.auth.audit(&caller, "task.delete", &entry.id, "");
        Ok(Response::new(DeleteTaskResponse {
            task: Some(task),
            workspace_removed,
        }))
    }

    async fn list_task_files(
        &self,
        request: Request<ListTaskFilesRequest>,
    ) -> Result<Response<ListTaskFilesResponse>, Status> {
        let (located, query) = self.located(request).await?;
        let answer = located
            .worker
            .clone()
            .list_workspace_files(ListWorkspaceFilesRequest {
                workspace: Some(located.workspace.clone()),
                query: Some(query),
            })
            .await
            .map_err(|status| located.error(status))?;
        Ok(Response::new(
            answer.into_inner().answer.unwrap_or_default(),
        ))
    }

    type DownloadTaskFilesStream =
        Pin<Box<dyn Stream<Item = Result<DownloadTaskFilesResponse, Status>> + Send>>;

    async fn download_task_files(
        &self,
        request: Request<DownloadTaskFilesRequest>,
    ) -> Result<Response<Self::DownloadTaskFilesStream>, Status> {
        let (located, query) = self.located(request).await?;
        let chunks = located
            .worker
            .clone()
            .download_workspace(DownloadWorkspaceRequest {
                workspace: Some(located.workspace.clone()),
                query: Some(query),
            })
            .await
            .map_err(|status| located.error(status))?
            .into_inner();
        let stream = chunks.map(move |chunk| match chunk {
            Ok(chunk) => Ok(chunk.answer.unwrap_or_default()),
            Err(status) => Err(Status::from(located.error(status))),
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_task_diff(
        &self,
        request: Request<GetTaskDiffRequest>,
    ) -> Result<Response<GetTaskDiffResponse>, Status> {
        let (located, query) = self.located(request).await?;
        let answer = located
            .worker
            .clone()
            .get_workspace_diff(GetWorkspaceDiffRequest {
                workspace: Some(located.workspace.clone()),
                query: Some(query),
            })
            .await
            .map_err(|status| located.error(status))?;
        Ok(Response::new(
            answer.into_inner().answer.unwrap_or_default(),
        ))
    }

    async fn create_session(
        &self,
        request: Request<CreateSessionRequest>,
    ) -> Result<Response<CreateSessionResponse>, Status> {
        let caller = self.auth.caller(&request, Scope::Sessions).await?;
        let spec = request.into_inner().spec.unwrap_or_default();
        validate::session_spec(&spec).map_err(DriverError::from)?;
        let needs = TaskNeeds::of_session(&spec);
        if needs.is_unrestricted() {
            self.auth.require(&caller, Scope::Unrestricted)?;
        }
        self.check_admitted(&needs, "").await?;
        if let Some(quotas) = caller.quotas {
            let open = self.sessions.open_owned_by(&caller.key_id);
            if open >= quotas.open_sessions as usize {
                return Err(DriverError::QuotaExceeded(format!(
                    "key `{}` has {open} sessions open and may have {} (openSessions); close one first",
                    caller.key_id, quotas.open_sessions
                ))
                .into());
            }
        }
        if !self.has_container_worker().await? {
            return Err(DriverError::NoContainerWorker.into());
        }
        let session = self.sessions.insert(spec, &caller.key_id).await?;
        tracing::info!(session = %session.id, "session created");
        self.auth.audit(&caller, "session.create", &session.id, "");
        let snapshot = session.snapshot();
        *session.trace.lock().expect("trace lock poisoned") =
            claudecluster_telemetry::propagation::TraceParent::current();
        self.dispatcher.enqueue_session(&session).await;
        Ok(Response::new(CreateSessionResponse {
            session: Some(snapshot),
        }))
    }

    async fn get_session(
        &self,
        request: Request<GetSessionRequest>,
    ) -> Result<Response<GetSessionResponse>, Status> {
        let caller = self.auth.caller(&request, Scope::Sessions).await?;
        let session = self
            .session(&request.into_inner().session_id, &caller)
            .await?;
        Ok(Response::new(GetSessionResponse {
            session: Some(session.snapshot()),
        }))
    }

    async fn list_sessions(
        &self,
        request: Request<ListSessionsRequest>,
    ) -> Result<Response<ListSessionsResponse>, Status> {
        let caller = self.auth.caller(&request, Scope::Sessions).await?;
        let request = request.into_inner();
        let states: Vec<SessionState> = filter_values(&request.states, "states", "session state")?;
        let (start, limit) = page(&request.page_token, request.page_size)?;
        let states: Vec<i32> = states.into_iter().map(|state| state as i32).collect();
        let (sessions, next) = self
            .sessions
            .page(start, limit, &states, |session| {
                caller.may_see(&session.owner)
            })
            .await?;
        Ok(Response::new(ListSessionsResponse {
            sessions,
            next_page_token: next.map(|order| order.to_string()).unwrap_or_default(),
        }))
    }

    type SendSessionMessageStream =
        Pin<Box<dyn Stream<Item = Result<SendSessionMessageResponse, Status>> + Send>>;

    async fn send_session_message(
        &self,
        request: Request<SendSessionMessageRequest>,
    ) -> Result<Response<Self::SendSessionMessageStream>, Status> {
        let caller = self.auth.caller(&request, Scope::Sessions).await?;
        let request = request.into_inner();
        let session = self.session(&request.session_id, &caller).await?;
        validate::prompt("text", &request.text, self.limits.prompt_bytes)
            .map_err(DriverError::from)?;
        self.check_budget(&caller)?;
        let (turn, after) = session
            .queue_message(request.text, self.limits.session_queue)
            .await?;
        let reader = self.reader();
        Ok(Response::new(self.event_stream(
            "session",
            move |out| session.follow_turn(reader, turn, after, out),
            reply_event,
        )))
    }

    type StreamSessionEventsStream =
        Pin<Box<dyn Stream<Item = Result<StreamSessionEventsResponse, Status>> + Send>>;

    async fn stream_session_events(
        &self,
        request: Request<StreamSessionEventsRequest>,
    ) -> Result<Response<Self::StreamSessionEventsStream>, Status> {
        let caller = self.auth.caller(&request, Scope::Sessions).await?;
        let request = request.into_inner();
        let session = self.session(&request.session_id, &caller).await?;
        let reader = self.reader();
        let after = request.after_sequence;
        Ok(Response::new(self.event_stream(
            "session",
            move |out| session.follow(reader, after, out),
            session_event,
        )))
    }

    async fn close_session(
        &self,
        request: Request<CloseSessionRequest>,
    ) -> Result<Response<CloseSessionResponse>, Status> {
        let caller = self.auth.caller(&request, Scope::Sessions).await?;
        let session = self
            .session(&request.into_inner().session_id, &caller)
            .await?;
        if session.state() != SessionState::Closed {
            self.dispatcher.close_session(&session).await;
            tracing::info!(session = %session.id, "session closed");
            self.auth.audit(&caller, "session.close", &session.id, "");
        }
        Ok(Response::new(CloseSessionResponse {
            session: Some(session.snapshot()),
        }))
    }

    async fn create_api_key(
        &self,
        request: Request<CreateApiKeyRequest>,
    ) -> Result<Response<CreateApiKeyResponse>, Status> {
        let caller = self.auth.caller(&request, Scope::Admin).await?;
        let request = request.into_inner();
        let (key, secret) = self
            .auth
            .create(
                &caller,
                &request.key_id,
                request.scopes,
                request.quotas.unwrap_or_default(),
            )
            .await?;
        Ok(Response::new(CreateApiKeyResponse {
            key: Some(key),
            secret,
        }))
    }

    async fn list_api_keys(
        &self,
        request: Request<ListApiKeysRequest>,
    ) -> Result<Response<ListApiKeysResponse>, Status> {
        self.auth.caller(&request, Scope::Admin).await?;
        Ok(Response::new(ListApiKeysResponse {
            keys: self.auth.list().await?,
        }))
    }

    async fn revoke_api_key(
        &self,
        request: Request<RevokeApiKeyRequest>,
    ) -> Result<Response<RevokeApiKeyResponse>, Status> {
        let caller = self.auth.caller(&request, Scope::Admin).await?;
        let key = self
            .auth
            .revoke(&caller, &request.into_inner().key_id)
            .await?;
        Ok(Response::new(RevokeApiKeyResponse { key: Some(key) }))
    }

    async fn get_usage(
        &self,
        request: Request<GetUsageRequest>,
    ) -> Result<Response<GetUsageResponse>, Status> {
        let caller = self.auth.caller(&request, Scope::TasksRead).await?;
        let request = request.into_inner();
        let millis = |field: &'static str, time: Option<claudecluster_proto::Timestamp>| {
            time.map(|time| {
                std::time::SystemTime::try_from(time)
                    .ok()
                    .and_then(|time| time.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|since| since.as_millis() as i64)
                    .ok_or_else(|| DriverError::invalid(field, "is not a time after 1970"))
            })
            .transpose()
        };
        let from = millis("start_time", request.start_time)?.unwrap_or(0);
        let to = millis("end_time", request.end_time)?.unwrap_or(i64::MAX);
        if from > to {
            return Err(DriverError::invalid("start_time", "is after end_time").into());
        }
        // A key sees its own work; an admin (or anyone, on a driver without keys) all of it.
        let owner = (!caller.is_admin()).then_some(caller.key_id.as_str());
        let usage = self
            .usage
            .report(from, to, owner)
            .await
            .map_err(DriverError::from)?;
        Ok(Response::new(usage))
    }

    async fn list_audit_records(
        &self,
        request: Request<ListAuditRecordsRequest>,
    ) -> Result<Response<ListAuditRecordsResponse>, Status> {
        self.auth.caller(&request, Scope::Admin).await?;
        let request = request.into_inner();
        let (after, limit) = page(&request.page_token, request.page_size)?;
        let rows = self
            .store
            .db()
            .audit_page(after, limit)
            .await
            .map_err(DriverError::from)?;
        let next_page_token = if rows.len() == limit {
            rows.last()
                .map(|row| row.seq.to_string())
                .unwrap_or_default()
        } else {
            String::new()
        };
        let records = rows
            .into_iter()
            .map(|row| AuditRecord {
                sequence: row.seq as u64,
                time: Some(crate::auth::timestamp(row.time_ms)),
                key_id: row.key_id,
                action: row.action,
                subject: row.subject,
                detail: row.detail,
            })
            .collect();
        Ok(Response::new(ListAuditRecordsResponse {
            records,
            next_page_token,
        }))
    }
}
