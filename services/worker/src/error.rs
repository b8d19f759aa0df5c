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
}

impl From<WorkerError> for Status {
    fn from(error: WorkerError) -> Status {
        let message = error.to_string();
        match error {
            WorkerError::InvalidArgument { .. } => Status::invalid_argument(message),
            WorkerError::AlreadyRunning(_) => Status::already_exists(message),
            WorkerError::ModeNotRun { .. } => Status::failed_precondition(message),
            WorkerError::SessionNotHere(_) => Status::not_found(message),
            WorkerError::Switching(_) => Status::failed_precondition(message),
            WorkerError::AtCapacity { .. } => Status::resource_exhausted(message),
            WorkerError::Unavailable { .. } | WorkerError::ShuttingDown(_) => {
                Status::unavailable(message)
            }
        }
    }
}
