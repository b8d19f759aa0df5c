//! What agents left in their workspaces, fetched from the workers that hold them: file lists,
//! archives and diffs, for clients that cannot reach a worker's disk.

use claudecluster_grpc::ClusterChannel as Channel;
use claudecluster_proto::v1::worker_service_client::WorkerServiceClient;
use claudecluster_proto::v1::{
    DownloadTaskFilesRequest, GetTaskDiffRequest, ListTaskFilesRequest, ListWorkersRequest,
    WorkspaceRef,
};
use tonic::Code;

use crate::dispatch::Dispatcher;
use crate::error::DriverError;
use crate::sessions::SessionEntry;
use crate::store::TaskEntry;

/// A request naming a workspace: a task's or a session's.
pub trait WorkspaceQuery {
    /// The task's id and the session's, one of them empty.
    fn whose(&self) -> (&str, &str);
}

macro_rules! workspace_query {
    ($($request:ty),*) => {$(
        impl WorkspaceQuery for $request {
            fn whose(&self) -> (&str, &str) {
                (&self.task_id, &self.session_id)
            }
        }
    )*};
}

workspace_query!(
    ListTaskFilesRequest,
    DownloadTaskFilesRequest,
    GetTaskDiffRequest
);

/// A workspace and the worker holding it.
pub struct Located {
    pub worker: WorkerServiceClient<Channel>,
    pub workspace: WorkspaceRef,
    pub worker_id: String,
}

impl Located {
    /// What the worker's refusal means to the client: its own words, or that it is out of
    /// reach.
    pub fn error(&self, status: tonic::Status) -> DriverError {
        match status.code() {
            Code::Unavailable | Code::Unknown | Code::DeadlineExceeded | Code::Cancelled => {
                DriverError::WorkerUnreachable {
                    worker_id: self.worker_id.clone(),
                    message: status.message().to_owned(),
                }
            }
            _ => DriverError::Worker(status),
        }
    }
}

/// The worker holding `entry`'s workspace (of its latest attempt).
pub async fn of_task(dispatcher: &Dispatcher, entry: &TaskEntry) -> Result<Located, DriverError> {
    let task = entry.snapshot();
    let (worker_id, address, _) = entry.placement();
    if worker_id.is_empty() || task.workspace.is_empty() {
        return Err(DriverError::NoWorkspace(format!("task {}", entry.id)));
    }
    let workspace = WorkspaceRef {
        task_id: entry.id.clone(),
        attempt: task.attempt,
        ..WorkspaceRef::default()
    };
    locate(dispatcher, worker_id, &address, workspace).await
}

/// The worker holding `session`'s workspace.
pub async fn of_session(
    dispatcher: &Dispatcher,
    session: &SessionEntry,
) -> Result<Located, DriverError> {
    let (worker_id, _) = session.placement();
    let address = session.worker_address().unwrap_or_default();
    if worker_id.is_empty() {
        return Err(DriverError::NoWorkspace(format!("session {}", session.id)));
    }
    let workspace = WorkspaceRef {
        session_id: session.id.clone(),
        ..WorkspaceRef::default()
    };
    locate(dispatcher, worker_id, &address, workspace).await
}

/// A worker's address as the scheduler knows it now (it may have come back elsewhere), else
/// as recorded when the work was placed.
async fn locate(
    dispatcher: &Dispatcher,
    worker_id: String,
    recorded: &str,
    workspace: WorkspaceRef,
) -> Result<Located, DriverError> {
    let listed = dispatcher
        .scheduler()
        .list_workers(ListWorkersRequest {})
        .await
        .ok()
        .and_then(|answer| {
            answer
                .into_inner()
                .workers
                .into_iter()
                .find(|worker| worker.worker_id == worker_id)
                .map(|worker| worker.address)
        });
    let address = listed
        .or_else(|| Some(recorded.to_owned()).filter(|address| !address.is_empty()))
        .ok_or_else(|| DriverError::WorkerUnreachable {
            worker_id: worker_id.clone(),
            message: "it is not registered, and its address was not recorded".into(),
        })?;
    let worker = dispatcher
        .worker(&address)
        .map_err(|err| DriverError::WorkerUnreachable {
            worker_id: worker_id.clone(),
            message: err.to_string(),
        })?;
    Ok(Located {
        worker,
        workspace,
        worker_id,
    })
}
