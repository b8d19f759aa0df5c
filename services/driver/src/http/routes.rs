//! The REST handlers: each turns its request into the DriverService's, calls it, and answers
//! in the original's shapes.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, body::Bytes};
use claudecluster_proto::v1::driver_service_server::DriverService as DriverApi;
use claudecluster_proto::v1::*;
use serde::Deserialize;
use tokio_stream::{Stream, StreamExt};
use utoipa::IntoParams;

use super::shapes::{self, *};
use super::{ApiError, HttpFace, JsonBody, Key, Query};

type Face = State<Arc<HttpFace>>;

/// How long a handler reads an event log it does not follow: the stored part comes at once.
const READ_LOG: Duration = Duration::from_secs(10);

pub(super) fn router(face: Arc<HttpFace>) -> Router {
    Router::new()
        .route("/", get(super::console::index))
        .route("/console.js", get(super::console::script))
        .route("/console.css", get(super::console::style))
        .route("/openapi.json", get(super::openapi::document))
        .route("/health", get(health))
        .route("/health/ready", get(ready))
        .route("/health/live", get(live))
        .route("/stats", get(stats))
        .route("/tasks", post(submit).get(list))
        .route("/tasks/batch", post(submit_batch))
        .route("/tasks/{task_id}", get(task).delete(remove))
        .route("/tasks/{task_id}/result", get(result))
        .route("/tasks/{task_id}/progress", get(progress))
        .route("/tasks/{task_id}/events", get(events))
        .route("/tasks/{task_id}/cancel", post(cancel))
        .route("/workers", get(workers))
        .route("/workers/{worker_id}", get(worker))
        .route("/workers/{worker_id}/health", get(worker_health))
        .route("/sessions", get(sessions))
        .route("/sessions/{session_id}", get(session))
        .route(
            "/ws/tasks/{task_id}/progress",
            get(super::ws::task_progress),
        )
        .route("/ws/stats", get(super::ws::stats))
        .fallback(|| async { ApiError::not_found("no such route") })
        // As large as a gRPC message may be: a batch takes what SubmitTasks takes.
        .layer(axum::extract::DefaultBodyLimit::max(
            claudecluster_proto::MAX_MESSAGE_BYTES,
        ))
        .layer(axum::middleware::from_fn_with_state(
            face.clone(),
            super::same_origin,
        ))
        .with_state(face)
}

/// The task a path names: by the driver's id, or else by the id its client gave it.
pub(super) async fn resolve(face: &HttpFace, key: &Key, id: &str) -> Result<Task, ApiError> {
    let asked = face.request(
        key,
        GetTaskRequest {
            task_id: id.to_owned(),
        },
    )?;
    let not_found = match face.api.get_task(asked).await {
        Ok(answer) => return Ok(answer.into_inner().task.unwrap_or_default()),
        Err(status) if status.code() == tonic::Code::NotFound => status,
        Err(status) => return Err(status.into()),
    };
    let by_client_id = face.request(
        key,
        ListTasksRequest {
            page_size: 1,
            label_selector: [(shapes::ID_LABEL.to_owned(), id.to_owned())].into(),
            ..ListTasksRequest::default()
        },
    )?;
    let listed = face.api.list_tasks(by_client_id).await?.into_inner();
    let Some(found) = listed.tasks.into_iter().next() else {
        return Err(not_found.into());
    };
    // A list shortens long fields; the task itself is whole.
    let whole = face.request(
        key,
        GetTaskRequest {
            task_id: found.task_id,
        },
    )?;
    Ok(face
        .api
        .get_task(whole)
        .await?
        .into_inner()
        .task
        .unwrap_or_default())
}

/// The events of a log from `after` up to `last`, without waiting for more.
pub(super) async fn read_log<S, T>(
    stream: S,
    last: u64,
    event: fn(T) -> Option<Event>,
) -> Result<Vec<Event>, ApiError>
where
    S: Stream<Item = Result<T, tonic::Status>> + Unpin,
{
    let mut stream = stream;
    let mut events = Vec::new();
    let reading = async {
        while let Some(item) = stream.next().await {
            let Some(next) = event(item?) else { continue };
            let sequence = next.sequence;
            events.push(next);
            if sequence >= last {
                break;
            }
        }
        Ok::<_, tonic::Status>(())
    };
    if last > 0 {
        match tokio::time::timeout(READ_LOG, reading).await {
            Ok(read) => read?,
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the event log could not be read in time",
                ));
            }
        }
    }
    Ok(events)
}

fn uptime(face: &HttpFace) -> u64 {
    face.started.elapsed().as_millis() as u64
}

/// The workers as the scheduler reports them, for the probes (which take no key).
async fn probe(face: &HttpFace) -> Result<Vec<WorkerInfo>, String> {
    if !face.leading.load(Ordering::Acquire) {
        return Err("this driver is a standby".to_owned());
    }
    face.dispatcher
        .scheduler()
        .list_workers(ListWorkersRequest {})
        .await
        .map(|answer| answer.into_inner().workers)
        .map_err(|status| format!("the scheduler is unreachable: {}", status.message()))
}

#[utoipa::path(get, path = "/health", tag = "health",
    responses((status = 200, body = HealthJson), (status = 503, body = HealthJson)))]
pub(super) async fn health(State(face): Face) -> Response {
    let probed = probe(&face).await;
    let workers = probed.as_deref().unwrap_or_default();
    let healthy = workers.iter().filter(|w| w.healthy).count() as u64;
    let body = HealthJson {
        status: if probed.is_ok() {
            "healthy"
        } else {
            "unhealthy"
        }
        .to_owned(),
        timestamp: shapes::now(),
        uptime: uptime(&face),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        driver: DriverHealthJson {
            id: "driver".to_owned(),
            status: if face.leading.load(Ordering::Acquire) {
                "running"
            } else {
                "standby"
            }
            .to_owned(),
        },
        workers: WorkerCounts {
            total: workers.len() as u64,
            active: workers.iter().filter(|w| w.healthy && !w.draining).count() as u64,
            healthy,
        },
        reason: probed.as_ref().err().cloned(),
    };
    let status = if probed.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

#[utoipa::path(get, path = "/health/ready", tag = "health",
    responses((status = 200, body = ReadyJson), (status = 503, body = ReadyJson)))]
pub(super) async fn ready(State(face): Face) -> Response {
    let probed = probe(&face).await;
    let body = ReadyJson {
        ready: probed.is_ok(),
        workers: probed
            .as_deref()
            .unwrap_or_default()
            .iter()
            .filter(|w| w.healthy)
            .count() as u64,
        timestamp: shapes::now(),
    };
    let status = if body.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

#[utoipa::path(get, path = "/health/live", tag = "health", responses((status = 200, body = LiveJson)))]
pub(super) async fn live(State(face): Face) -> Json<LiveJson> {
    Json(LiveJson {
        alive: true,
        timestamp: shapes::now(),
        uptime: uptime(&face),
    })
}

pub(super) async fn cluster_stats(face: &HttpFace, key: &Key) -> Result<StatsJson, ApiError> {
    let request = face.request(key, GetClusterStatusRequest {})?;
    let status = face.api.get_cluster_status(request).await?.into_inner();
    Ok(shapes::stats_json(&status, uptime(face)))
}

#[utoipa::path(get, path = "/stats", tag = "cluster",
    responses((status = 200, body = StatsJson), (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(super) async fn stats(State(face): Face, key: Key) -> Result<Json<StatsJson>, ApiError> {
    Ok(Json(cluster_stats(&face, &key).await?))
}

/// The driver's ids of `dependencies`, each named by the driver's id or its client's;
/// `batch_keys` stand for themselves.
async fn dependency_ids(
    face: &HttpFace,
    key: &Key,
    dependencies: &[String],
    batch_keys: &HashSet<String>,
) -> Result<Vec<String>, ApiError> {
    let mut ids = Vec::with_capacity(dependencies.len());
    for dependency in dependencies {
        if batch_keys.contains(dependency) {
            ids.push(dependency.clone());
            continue;
        }
        match resolve(face, key, dependency).await {
            Ok(task) => ids.push(task.task_id),
            // The service names the dependency it cannot find.
            Err(err) if err.status == StatusCode::NOT_FOUND => ids.push(dependency.clone()),
            Err(err) => return Err(err),
        }
    }
    Ok(ids)
}

#[utoipa::path(post, path = "/tasks", tag = "tasks", request_body = SubmitBody,
    responses((status = 202, body = Submitted), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub(super) async fn submit(
    State(face): Face,
    key: Key,
    JsonBody(body): JsonBody<SubmitBody>,
) -> Result<Response, ApiError> {
    let (mut spec, client_id) = shapes::task_spec("task", &body.task, &body)?;
    spec.depends_on = dependency_ids(&face, &key, &spec.depends_on, &HashSet::new()).await?;
    let request = face.request(&key, SubmitTaskRequest { spec: Some(spec) })?;
    let task = face
        .api
        .submit_task(request)
        .await?
        .into_inner()
        .task
        .unwrap_or_default();
    let answer = Submitted {
        message: "Task submitted successfully".to_owned(),
        task_id: client_id.unwrap_or_else(|| task.task_id.clone()),
        status: "pending".to_owned(),
        task: shapes::task_json(&task),
    };
    Ok((StatusCode::ACCEPTED, Json(answer)).into_response())
}

#[utoipa::path(post, path = "/tasks/batch", tag = "tasks", request_body = BatchBody,
    responses((status = 202, body = BatchSubmitted), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub(super) async fn submit_batch(
    State(face): Face,
    key: Key,
    JsonBody(body): JsonBody<BatchBody>,
) -> Result<Response, ApiError> {
    let defaults = SubmitBody {
        priority: body.priority.clone(),
        ..SubmitBody::default()
    };
    let mut planned = Vec::with_capacity(body.tasks.len());
    for (index, input) in body.tasks.iter().enumerate() {
        let (spec, client_id) = shapes::task_spec(&format!("tasks[{index}]"), input, &defaults)?;
        // Tasks without an id of their own are named by their place in the batch.
        let batch_key = client_id.clone().unwrap_or_else(|| format!("task-{index}"));
        planned.push((batch_key, spec, client_id));
    }
    let keys: HashSet<String> = planned.iter().map(|(key, ..)| key.clone()).collect();
    if keys.len() != planned.len() {
        return Err(ApiError::bad_request(
            "tasks: two tasks of the batch have the same id",
        ));
    }
    let mut tasks = Vec::with_capacity(planned.len());
    let mut previous: Option<String> = None;
    for (batch_key, mut spec, _) in planned.iter().cloned() {
        spec.depends_on = dependency_ids(&face, &key, &spec.depends_on, &keys).await?;
        if body.parallel == Some(false)
            && let Some(previous) = previous.replace(batch_key.clone())
            && !spec.depends_on.contains(&previous)
        {
            spec.depends_on.push(previous);
        }
        tasks.push(BatchTask {
            key: batch_key,
            spec: Some(spec),
        });
    }
    let request = face.request(&key, SubmitTasksRequest { tasks })?;
    let accepted = face.api.submit_tasks(request).await?.into_inner().tasks;
    let results = accepted
        .iter()
        .zip(&planned)
        .map(|(task, (_, _, client_id))| BatchResult {
            task_id: client_id.clone().unwrap_or_else(|| task.task_id.clone()),
            status: "pending".to_owned(),
        })
        .collect();
    let answer = BatchSubmitted {
        message: "Batch task submission completed".to_owned(),
        results,
        tasks: accepted.iter().map(shapes::task_json).collect(),
    };
    Ok((StatusCode::ACCEPTED, Json(answer)).into_response())
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub(super) struct ListQuery {
    /// Only tasks of this status (original names).
    status: Option<String>,
    /// At most this many tasks (default 100, at most 1000).
    limit: Option<u32>,
    /// `nextPageToken` of the previous page.
    page_token: Option<String>,
}

#[utoipa::path(get, path = "/tasks", tag = "tasks", params(ListQuery),
    responses((status = 200, body = TaskList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub(super) async fn list(
    State(face): Face,
    key: Key,
    Query(query): Query<ListQuery>,
) -> Result<Json<TaskList>, ApiError> {
    let statuses = match &query.status {
        Some(name) => shapes::statuses_named(name)?,
        None => Vec::new(),
    };
    let request = face.request(
        &key,
        ListTasksRequest {
            statuses: statuses.iter().map(|status| *status as i32).collect(),
            page_size: query.limit.unwrap_or(0),
            page_token: query.page_token.clone().unwrap_or_default(),
            ..ListTasksRequest::default()
        },
    )?;
    let page = face.api.list_tasks(request).await?.into_inner();
    // The counts are the cluster's; without a scheduler (or past the key's rate) they are
    // counted over this page. One HTTP request takes as few of the key's requests as it can.
    let counts = match face.request(&key, GetClusterStatusRequest {}) {
        Ok(request) => face
            .api
            .get_cluster_status(request)
            .await
            .map(|status| status.into_inner().tasks_by_status)
            .ok(),
        Err(_) => None,
    };
    let counts = counts.unwrap_or_else(|| {
        let mut counted = HashMap::new();
        for task in &page.tasks {
            *counted.entry(task.status().label().to_owned()).or_insert(0) += 1;
        }
        counted
    });
    let count = |name: &str| counts.get(name).copied().unwrap_or(0);
    let summary = TaskSummary {
        total: counts.values().sum(),
        running: count("running"),
        completed: count("completed"),
        failed: count("failed"),
        cancelled: count("cancelled"),
        queued: count("pending") + count("assigned"),
    };
    Ok(Json(TaskList {
        summary,
        running_tasks: page
            .tasks
            .iter()
            .filter(|task| task.status() == TaskStatus::Running)
            .map(|task| RunningTask {
                task_id: shapes::public_id(task),
                worker_id: task.worker_id.clone(),
                status: shapes::status_name(task.status()).to_owned(),
                progress: 0,
                start_time: shapes::time(task.start_time.as_ref()),
            })
            .collect(),
        tasks: page.tasks.iter().map(shapes::task_json).collect(),
        next_page_token: page.next_page_token,
    }))
}

#[utoipa::path(get, path = "/tasks/{taskId}", tag = "tasks",
    params(("taskId" = String, Path, description = "the driver's id of the task, or the id its client gave it")),
    responses((status = 200, body = TaskStatusJson), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub(super) async fn task(
    State(face): Face,
    key: Key,
    Path(task_id): Path<String>,
) -> Result<Json<TaskStatusJson>, ApiError> {
    let task = resolve(&face, &key, &task_id).await?;
    let mut step = shapes::current_step(&task, None);
    if task.status() == TaskStatus::Running && !task.last_tool.is_empty() {
        step = format!("running (last tool: {})", task.last_tool);
    }
    Ok(Json(TaskStatusJson {
        task_id: shapes::public_id(&task),
        progress: if task.status().is_terminal() { 100 } else { 0 },
        start_time: shapes::time(task.start_time.as_ref()),
        current_step: step,
        task: shapes::task_json(&task),
    }))
}

#[utoipa::path(get, path = "/tasks/{taskId}/result", tag = "tasks",
    params(("taskId" = String, Path, description = "the task's id")),
    responses((status = 200, body = TaskResultJson),
        (status = 404, body = ErrorBody, description = "no such task, or it has not ended yet")))]
pub(super) async fn result(
    State(face): Face,
    key: Key,
    Path(task_id): Path<String>,
) -> Result<Json<TaskResultJson>, ApiError> {
    let task = resolve(&face, &key, &task_id).await?;
    shapes::task_result(&task).map(Json).ok_or_else(|| {
        ApiError::not_found(format!(
            "task {task_id} has no result yet: it is {}",
            shapes::status_name(task.status())
        ))
    })
}

type TaskEvents = <crate::service::DriverService as DriverApi>::StreamTaskEventsStream;

async fn stream_events(
    face: &HttpFace,
    key: &Key,
    task_id: &str,
    after: u64,
) -> Result<TaskEvents, ApiError> {
    let request = face.request(
        key,
        StreamTaskEventsRequest {
            task_id: task_id.to_owned(),
            after_sequence: after,
        },
    )?;
    Ok(face.api.stream_task_events(request).await?.into_inner())
}

fn task_event(answer: StreamTaskEventsResponse) -> Option<Event> {
    answer.event
}

#[utoipa::path(get, path = "/tasks/{taskId}/progress", tag = "tasks",
    params(("taskId" = String, Path, description = "the task's id")),
    responses((status = 200, body = ProgressJson), (status = 404, body = ErrorBody)))]
pub(super) async fn progress(
    State(face): Face,
    key: Key,
    Path(task_id): Path<String>,
) -> Result<Json<ProgressJson>, ApiError> {
    let task = resolve(&face, &key, &task_id).await?;
    let last = if task.last_sequence > 0 {
        let stream = stream_events(&face, &key, &task.task_id, task.last_sequence - 1).await?;
        read_log(stream, task.last_sequence, task_event)
            .await?
            .last()
            .map(shapes::event_json)
    } else {
        None
    };
    Ok(Json(ProgressJson {
        task_id: shapes::public_id(&task),
        status: shapes::status_name(task.status()).to_owned(),
        progress: if task.status().is_terminal() { 100 } else { 0 },
        start_time: shapes::time(task.start_time.as_ref()),
        current_step: shapes::current_step(&task, last.as_ref()),
        events: task.last_sequence,
        cost_usd: task.result.as_ref().map_or(0.0, |r| r.total_cost_usd),
        last_event: last,
    }))
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct AfterQuery {
    /// Only events after this sequence number.
    after: Option<u64>,
}

#[utoipa::path(get, path = "/tasks/{taskId}/events", tag = "tasks",
    params(("taskId" = String, Path, description = "the task's id"), AfterQuery),
    responses((status = 200, body = EventList), (status = 404, body = ErrorBody)))]
pub(super) async fn events(
    State(face): Face,
    key: Key,
    Path(task_id): Path<String>,
    Query(query): Query<AfterQuery>,
) -> Result<Json<EventList>, ApiError> {
    let task = resolve(&face, &key, &task_id).await?;
    let after = query.after.unwrap_or(0);
    let events = if after < task.last_sequence {
        let stream = stream_events(&face, &key, &task.task_id, after).await?;
        read_log(stream, task.last_sequence, task_event).await?
    } else {
        Vec::new()
    };
    Ok(Json(EventList {
        events: events.iter().map(shapes::event_json).collect(),
    }))
}

async fn cancel_task(
    face: &HttpFace,
    key: &Key,
    task: &Task,
    reason: String,
) -> Result<Json<Removed>, ApiError> {
    let request = face.request(
        key,
        CancelTaskRequest {
            task_id: task.task_id.clone(),
            reason,
        },
    )?;
    let task = face
        .api
        .cancel_task(request)
        .await?
        .into_inner()
        .task
        .unwrap_or_default();
    Ok(Json(Removed {
        message: "Task cancelled successfully".to_owned(),
        task_id: shapes::public_id(&task),
        task: shapes::task_json(&task),
        deleted: false,
        workspace_removed: false,
    }))
}

#[utoipa::path(delete, path = "/tasks/{taskId}", tag = "tasks",
    description = "Cancels a task that has not ended, as the original did; removes one that has ended (its record, events and workspace).",
    params(("taskId" = String, Path, description = "the task's id")),
    responses((status = 200, body = Removed), (status = 404, body = ErrorBody)))]
pub(super) async fn remove(
    State(face): Face,
    key: Key,
    Path(task_id): Path<String>,
) -> Result<Json<Removed>, ApiError> {
    let task = resolve(&face, &key, &task_id).await?;
    if !task.status().is_terminal() {
        return cancel_task(&face, &key, &task, String::new()).await;
    }
    let request = face.request(
        &key,
        DeleteTaskRequest {
            task_id: task.task_id.clone(),
        },
    )?;
    let deleted = face.api.delete_task(request).await?.into_inner();
    let task = deleted.task.unwrap_or_default();
    Ok(Json(Removed {
        message: "Task deleted successfully".to_owned(),
        task_id: shapes::public_id(&task),
        task: shapes::task_json(&task),
        deleted: true,
        workspace_removed: deleted.workspace_removed,
    }))
}

#[utoipa::path(post, path = "/tasks/{taskId}/cancel", tag = "tasks",
    params(("taskId" = String, Path, description = "the task's id")),
    request_body(content = CancelBody, description = "optional"),
    responses((status = 200, body = Removed), (status = 404, body = ErrorBody)))]
pub(super) async fn cancel(
    State(face): Face,
    key: Key,
    Path(task_id): Path<String>,
    body: Bytes,
) -> Result<Json<Removed>, ApiError> {
    let body: CancelBody = if body.iter().all(u8::is_ascii_whitespace) {
        CancelBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|err| {
            ApiError::bad_request(format!("the body is not valid JSON here: {err}"))
        })?
    };
    let task = resolve(&face, &key, &task_id).await?;
    cancel_task(&face, &key, &task, body.reason.unwrap_or_default()).await
}

async fn worker_list(face: &HttpFace, key: &Key) -> Result<Vec<WorkerInfo>, ApiError> {
    let request = face.request(key, GetClusterStatusRequest {})?;
    Ok(face
        .api
        .get_cluster_status(request)
        .await?
        .into_inner()
        .workers)
}

async fn find_worker(face: &HttpFace, key: &Key, worker_id: &str) -> Result<WorkerInfo, ApiError> {
    worker_list(face, key)
        .await?
        .into_iter()
        .find(|worker| worker.worker_id == worker_id)
        .ok_or_else(|| ApiError::not_found(format!("worker {worker_id} not found")))
}

#[utoipa::path(get, path = "/workers", tag = "cluster",
    responses((status = 200, body = WorkerList), (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(super) async fn workers(State(face): Face, key: Key) -> Result<Json<WorkerList>, ApiError> {
    let workers = worker_list(&face, &key).await?;
    Ok(Json(WorkerList {
        workers: workers.iter().map(shapes::worker_json).collect(),
    }))
}

#[utoipa::path(get, path = "/workers/{workerId}", tag = "cluster",
    params(("workerId" = String, Path, description = "the worker's id")),
    responses((status = 200, body = WorkerJson), (status = 404, body = ErrorBody)))]
pub(super) async fn worker(
    State(face): Face,
    key: Key,
    Path(worker_id): Path<String>,
) -> Result<Json<WorkerJson>, ApiError> {
    Ok(Json(shapes::worker_json(
        &find_worker(&face, &key, &worker_id).await?,
    )))
}

#[utoipa::path(get, path = "/workers/{workerId}/health", tag = "cluster",
    params(("workerId" = String, Path, description = "the worker's id")),
    responses((status = 200, body = WorkerHealthAnswer), (status = 404, body = ErrorBody)))]
pub(super) async fn worker_health(
    State(face): Face,
    key: Key,
    Path(worker_id): Path<String>,
) -> Result<Json<WorkerHealthAnswer>, ApiError> {
    let worker = shapes::worker_json(&find_worker(&face, &key, &worker_id).await?);
    Ok(Json(WorkerHealthAnswer {
        worker_id: worker.id,
        last_seen: worker.last_seen,
        status: worker.status,
        health: worker.health,
    }))
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub(super) struct SessionQuery {
    /// Only sessions in this state.
    state: Option<String>,
    limit: Option<u32>,
    page_token: Option<String>,
}

#[utoipa::path(get, path = "/sessions", tag = "sessions", params(SessionQuery),
    responses((status = 200, body = SessionList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub(super) async fn sessions(
    State(face): Face,
    key: Key,
    Query(query): Query<SessionQuery>,
) -> Result<Json<SessionList>, ApiError> {
    let states = match query.state.as_deref() {
        Some(name) => {
            let state = SessionState::from_label(name).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "state: `{}` is not a session state",
                    name.chars().take(64).collect::<String>()
                ))
            })?;
            vec![state as i32]
        }
        None => Vec::new(),
    };
    let request = face.request(
        &key,
        ListSessionsRequest {
            states,
            page_size: query.limit.unwrap_or(0),
            page_token: query.page_token.unwrap_or_default(),
        },
    )?;
    let page = face.api.list_sessions(request).await?.into_inner();
    Ok(Json(SessionList {
        sessions: page.sessions.iter().map(shapes::session_json).collect(),
        next_page_token: page.next_page_token,
    }))
}

#[utoipa::path(get, path = "/sessions/{sessionId}", tag = "sessions",
    params(("sessionId" = String, Path, description = "the session's id")),
    responses((status = 200, body = SessionDetail), (status = 404, body = ErrorBody)))]
pub(super) async fn session(
    State(face): Face,
    key: Key,
    Path(session_id): Path<String>,
) -> Result<Json<SessionDetail>, ApiError> {
    let request = face.request(
        &key,
        GetSessionRequest {
            session_id: session_id.clone(),
        },
    )?;
    let session = face
        .api
        .get_session(request)
        .await?
        .into_inner()
        .session
        .unwrap_or_default();
    let events = if session.last_sequence > 0 {
        let request = face.request(
            &key,
            StreamSessionEventsRequest {
                session_id,
                after_sequence: 0,
            },
        )?;
        let stream = face.api.stream_session_events(request).await?.into_inner();
        read_log(stream, session.last_sequence, |answer| answer.event).await?
    } else {
        Vec::new()
    };
    Ok(Json(SessionDetail {
        session: shapes::session_json(&session),
        events: events.iter().map(shapes::event_json).collect(),
    }))
}
