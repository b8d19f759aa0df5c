use tonic::Status;

/// Everything the worker refuses, mapped to a gRPC status in one place.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("{field}: {message}")]
    InvalidArgument {
        field: &'static str,
        message: String,
    },
    #[error("task {0} is already running on this worker")]
    AlreadyRunning(String),
    #[error(
        "attempt {attempt} of task {task_id} already ran on this worker; attach to collect its events"
    )]
    AlreadyRan { task_id: String, attempt: u32 },
    #[error(
        "attempt {attempt} of task {task_id} is older than attempt {seen}, which this worker has seen"
    )]
    StaleAttempt {
        task_id: String,
        attempt: u32,
        seen: u32,
    },
    #[error("attempt {attempt} of task {task_id} was stopped on this worker: {reason}")]
    AttemptStopped {
        task_id: String,
        attempt: u32,
        reason: String,
    },
    #[error("this worker holds no run of task {task_id} attempt {attempt}")]
    RunNotHere { task_id: String, attempt: u32 },
    #[error("the events of {run} are lost: {reason}")]
    RunLogLost { run: String, reason: String },
    #[error("worker {worker_id} is at capacity ({capacity} tasks running)")]
    AtCapacity { worker_id: String, capacity: u32 },
    #[error("worker {worker_id} cannot run tasks now: {reason}")]
    Unavailable { worker_id: String, reason: String },
    #[error("worker {0} is shutting down")]
    ShuttingDown(String),
    #[error("worker {0} is already switching its execution mode")]
    Switching(String),
    #[error("session {0} is not open on this worker")]
    SessionNotHere(String),
    #[error("worker {worker_id} does not run {mode} tasks")]
    ModeNotRun {
        worker_id: String,
        mode: &'static str,
    },
    #[error(
        "worker {worker_id} holds no workspace of {workspace}: it was removed (after `worker.workspaceRetention`, by a delete, or with its closed session), or its agent kept it in a pod of its own"
    )]
    WorkspaceNotHere {
        worker_id: String,
        workspace: String,
    },
    #[error("paths: no file or directory `{0}` in the workspace")]
    NoSuchPath(String),
    #[error(
        "the files asked for hold {} in {files} files, more than the {} a download may carry (`max_bytes`, `worker.results.maxDownloadBytes`); name fewer paths",
        claudecluster_proto::human_bytes(*bytes),
        claudecluster_proto::human_bytes(*limit)
    )]
    DownloadTooLarge {
        bytes: u64,
        files: usize,
        limit: u64,
    },
    #[error("{0}")]
    Workspace(String),
}

impl From<claudecluster_proto::validate::Invalid> for WorkerError {
    fn from(invalid: claudecluster_proto::validate::Invalid) -> Self {
        WorkerError::InvalidArgument {
            field: invalid.field,
            message: invalid.message,
        }
    }
}

impl From<claudecluster_proto::admission::Refusal> for WorkerError {
    fn from(refusal: claudecluster_proto::admission::Refusal) -> Self {
        WorkerError::InvalidArgument {
            field: refusal.field,
            message: refusal.message,
        }
    }
}

impl From<WorkerError> for Status {
    fn from(error: WorkerError) -> Status {
        let message = claudecluster_proto::validate::status_message(error.to_string());
        match error {
            WorkerError::InvalidArgument { .. } => Status::invalid_argument(message),
            WorkerError::AlreadyRunning(_) | WorkerError::AlreadyRan { .. } => {
                Status::already_exists(message)
            }
            WorkerError::StaleAttempt { .. } | WorkerError::AttemptStopped { .. } => {
                Status::failed_precondition(message)
            }
            WorkerError::RunNotHere { .. } => Status::not_found(message),
            WorkerError::RunLogLost { .. } => Status::data_loss(message),
            WorkerError::ModeNotRun { .. } => Status::failed_precondition(message),
            WorkerError::SessionNotHere(_) => Status::not_found(message),
            WorkerError::Switching(_) => Status::failed_precondition(message),
            WorkerError::AtCapacity { .. } => Status::resource_exhausted(message),
            WorkerError::Unavailable { .. } | WorkerError::ShuttingDown(_) => {
                Status::unavailable(message)
            }
            WorkerError::WorkspaceNotHere { .. } | WorkerError::NoSuchPath(_) => {
                Status::not_found(message)
            }
            WorkerError::DownloadTooLarge { .. } => Status::resource_exhausted(message),
            WorkerError::Workspace(_) => Status::internal(message),
        }
    }
}
