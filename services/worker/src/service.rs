use std::pin::Pin;
use std::sync::Arc;
use tracing::Instrument;

use claudecluster_proto::v1::run_session_request::Message as SessionMessage;
use claudecluster_proto::v1::worker_service_server::WorkerService as WorkerApi;
use claudecluster_proto::v1::*;
use futures_util::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::error::WorkerError;
use crate::runtime::{Execution, Runtime};
use crate::session::{Input, Inputs};

/// The WorkerService: thin RPC methods over the [`Runtime`].
pub struct WorkerService {
    runtime: Arc<Runtime>,
    address: String,
}

impl WorkerService {
    pub fn new(runtime: Arc<Runtime>, address: String) -> Self {
        WorkerService { runtime, address }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<ExecuteTaskResponse, Status>> + Send>>;
pub(crate) type SessionEventStream =
    Pin<Box<dyn Stream<Item = Result<RunSessionResponse, Status>> + Send>>;

impl WorkerService {
    /// Serves one session call: its first message opens the session or attaches to it, the
    /// rest are the session's input, and the session's events go back.
    pub(crate) async fn hold_session(
        &self,
        mut requests: impl Stream<Item = Result<RunSessionRequest, Status>> + Send + Unpin + 'static,
    ) -> Result<SessionEventStream, Status> {
        let open = match requests.next().await {
            Some(Ok(RunSessionRequest {
                message: Some(SessionMessage::Open(open)),
            })) => open,
            Some(Err(status)) => return Err(status),
            _ => {
                return Err(WorkerError::InvalidArgument {
                    field: "open",
                    message: "the first message of a session's stream must open the session or attach to it".into(),
                }
                .into());
            }
        };
        let inputs = session_inputs(open.session_id.clone(), requests);
        let (log, after) = if open.attach {
            let log =
                self.runtime
                    .attach_session(&open.session_id, open.after_run_sequence, inputs)?;
            (log, open.after_run_sequence)
        } else {
            let spec = open.spec.unwrap_or_default();
            let log = self
                .runtime
                .open_session(open.session_id, spec, inputs)
                .await?;
            (log, 0)
        };
        let stream = log.follow(after).map(|item| {
            let (run_sequence, event) = item?;
            Ok(RunSessionResponse {
                event: Some(event),
                run_sequence,
            })
        });
        Ok(Box::pin(stream))
    }
}

/// The messages after a session call's first, as the session's input. A call that breaks ends
/// the input like one the driver ended: the session goes on without it.
fn session_inputs(
    session_id: String,
    requests: impl Stream<Item = Result<RunSessionRequest, Status>> + Send + 'static,
) -> Inputs {
    requests
        .take_while(|request| std::future::ready(request.is_ok()))
        .filter_map(move |request| {
            let input = match request.ok().and_then(|request| request.message) {
                Some(SessionMessage::Turn(turn)) => Some(Input::Turn {
                    turn: turn.turn,
                    text: turn.text,
                }),
                Some(SessionMessage::Close(_)) => Some(Input::Close),
                Some(SessionMessage::Open(_)) | None => {
                    tracing::warn!(session = %session_id, "ignoring a session message that is neither a turn nor a close");
                    None
                }
            };
            std::future::ready(input)
        })
        .boxed()
}

#[tonic::async_trait]
impl WorkerApi for WorkerService {
    type ExecuteTaskStream = EventStream;

    async fn execute_task(
        &self,
        request: Request<ExecuteTaskRequest>,
    ) -> Result<Response<Self::ExecuteTaskStream>, Status> {
        let request = request.into_inner();
        let attempt = request.attempt.max(1);
        let events = if request.attach {
            let log =
                self.runtime
                    .attach_task(&request.task_id, attempt, request.after_run_sequence)?;
            log.follow(request.after_run_sequence).left_stream()
        } else {
            let span = tracing::info_span!(
                "task.execute",
                otel.name = "execute task",
                task.id = %request.task_id,
                task.attempt = attempt,
            );
            let execution = Execution {
                task_id: request.task_id,
                attempt,
                spec: request.spec.unwrap_or_default(),
            };
            let admission = self.runtime.admit(execution).await?;
            // Following before the run starts: the caller is attached from its first event.
            let events = admission.follow();
            tokio::spawn(admission.run().instrument(span));
            events.right_stream()
        };
        let stream = events.map(|item| {
            let (run_sequence, event) = item?;
            Ok(ExecuteTaskResponse {
                event: Some(event),
                run_sequence,
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn cancel_execution(
        &self,
        request: Request<CancelExecutionRequest>,
    ) -> Result<Response<CancelExecutionResponse>, Status> {
        let request = request.into_inner();
        let reason = if request.reason.is_empty() {
            "cancelled".to_owned()
        } else {
            request.reason
        };
        let found = self.runtime.cancel(&request.task_id, &reason);
        Ok(Response::new(CancelExecutionResponse { found }))
    }

    async fn get_worker_status(
        &self,
        _request: Request<GetWorkerStatusRequest>,
    ) -> Result<Response<GetWorkerStatusResponse>, Status> {
        let runtime = &self.runtime;
        let running = runtime.running_work();
        let running_task_ids = runtime.running_task_ids();
        let health = runtime.health().await;
        let (healthy, health_reason) = match health {
            crate::execution::ProviderHealth::Ready => (true, String::new()),
            crate::execution::ProviderHealth::Unavailable(reason) => (false, reason),
        };
        Ok(Response::new(GetWorkerStatusResponse {
            worker: Some(WorkerInfo {
                worker_id: runtime.worker_id.clone(),
                address: self.address.clone(),
                execution_mode: runtime.mode() as i32,
                capacity: runtime.capacity(),
                load: running.len() as u32,
                labels: runtime.config().labels.clone().into_iter().collect(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                healthy,
                health_reason,
                last_heartbeat_time: None,
                execution_modes: runtime
                    .modes()
                    .into_iter()
                    .map(|mode| mode as i32)
                    .collect(),
                idle_warm_agents: runtime.idle_warm_agents(),
                draining: runtime.is_draining(),
                drained: runtime.is_drained(),
                admits: Some(runtime.admits()),
                workspace_bytes: runtime.results().workspace_bytes(),
                disk_free_bytes: runtime.results().disk_free_bytes(),
            }),
            running_task_ids,
            running,
        }))
    }

    type RunSessionStream = SessionEventStream;

    async fn run_session(
        &self,
        request: Request<Streaming<RunSessionRequest>>,
    ) -> Result<Response<Self::RunSessionStream>, Status> {
        let events = self.hold_session(request.into_inner()).await?;
        Ok(Response::new(events))
    }

    async fn list_workspace_files(
        &self,
        request: Request<ListWorkspaceFilesRequest>,
    ) -> Result<Response<ListWorkspaceFilesResponse>, Status> {
        let request = request.into_inner();
        let answer = self
            .runtime
            .results()
            .list(
                &request.workspace.unwrap_or_default(),
                &request.query.unwrap_or_default(),
            )
            .await?;
        Ok(Response::new(ListWorkspaceFilesResponse {
            answer: Some(answer),
        }))
    }

    type DownloadWorkspaceStream =
        Pin<Box<dyn Stream<Item = Result<DownloadWorkspaceResponse, Status>> + Send>>;

    async fn download_workspace(
        &self,
        request: Request<DownloadWorkspaceRequest>,
    ) -> Result<Response<Self::DownloadWorkspaceStream>, Status> {
        let request = request.into_inner();
        let chunks = self
            .runtime
            .results()
            .download(
                &request.workspace.unwrap_or_default(),
                &request.query.unwrap_or_default(),
            )
            .await?;
        let stream = tokio_stream::wrappers::ReceiverStream::new(chunks).map(|chunk| {
            chunk
                .map(|answer| DownloadWorkspaceResponse {
                    answer: Some(answer),
                })
                .map_err(Status::from)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_workspace_diff(
        &self,
        request: Request<GetWorkspaceDiffRequest>,
    ) -> Result<Response<GetWorkspaceDiffResponse>, Status> {
        let request = request.into_inner();
        let answer = self
            .runtime
            .results()
            .diff(
                &request.workspace.unwrap_or_default(),
                &request.query.unwrap_or_default(),
            )
            .await?;
        Ok(Response::new(GetWorkspaceDiffResponse {
            answer: Some(answer),
        }))
    }

    async fn remove_workspace(
        &self,
        request: Request<RemoveWorkspaceRequest>,
    ) -> Result<Response<RemoveWorkspaceResponse>, Status> {
        let workspace = request.into_inner().workspace.unwrap_or_default();
        if !workspace.session_id.is_empty() {
            return Err(WorkerError::InvalidArgument {
                field: "workspace.session_id",
                message: "a session's workspace is removed when the session is closed".into(),
            }
            .into());
        }
        if self
            .runtime
            .running_work()
            .iter()
            .any(|work| work.id == workspace.task_id && work.attempt == workspace.attempt.max(1))
        {
            return Err(WorkerError::AlreadyRunning(workspace.task_id).into());
        }
        let found = self
            .runtime
            .results()
            .remove_task(&workspace.task_id, workspace.attempt)
            .await?;
        Ok(Response::new(RemoveWorkspaceResponse { found }))
    }

    async fn switch_execution_mode(
        &self,
        request: Request<SwitchExecutionModeRequest>,
    ) -> Result<Response<SwitchExecutionModeResponse>, Status> {
        let mode = request.into_inner().execution_mode();
        let (modes, drain, switched) = self.runtime.switch_mode(mode).await?;
        Ok(Response::new(SwitchExecutionModeResponse {
            execution_modes: modes.into_iter().map(|mode| mode as i32).collect(),
            drain_millis: drain.as_millis() as u64,
            switch_millis: switched.as_millis() as u64,
        }))
    }
}
