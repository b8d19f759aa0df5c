use tonic::Status;

/// Everything the driver refuses, mapped to a gRPC status in one place.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("{field}: {message}")]
    InvalidArgument { field: String, message: String },
    #[error("task {0} not found")]
    TaskNotFound(String),
    #[error("the scheduler at {address} is unreachable: {message}")]
    SchedulerUnavailable { address: String, message: String },
    #[error("session {0} not found")]
    SessionNotFound(String),
    #[error("session {session_id} is {state}: {reason}")]
    SessionEnded {
        session_id: String,
        state: &'static str,
        reason: String,
    },
    #[error(
        "session {session_id} already has {limit} messages waiting (`driver.sessionQueueLimit`)"
    )]
    SessionQueueFull { session_id: String, limit: usize },
    #[error(
        "sessions need a container_agentic worker and the cluster has none; start a worker with `executionMode: container_agentic`"
    )]
    NoContainerWorker,
    #[error("{0}")]
    Store(#[from] crate::db::DbError),
    #[error("the store did not confirm the write in time: {0}")]
    NotDurable(String),
    #[error("the driver is shutting down; reconnect to resume after sequence {after}")]
    ShuttingDown { after: u64 },
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    QuotaExceeded(String),
    #[error("an API key `{0}` exists already")]
    KeyExists(String),
    #[error("API key `{0}` not found")]
    KeyNotFound(String),
    #[error("task {task_id} is {status}; cancel it first, or wait for it to end")]
    TaskNotEnded {
        task_id: String,
        status: &'static str,
    },
    #[error("{0} has no workspace yet: it has not started on a worker")]
    NoWorkspace(String),
    #[error("worker {worker_id}, which holds the workspace, cannot be reached: {message}")]
    WorkerUnreachable { worker_id: String, message: String },
    /// What the worker holding a workspace refused, passed on as it said it.
    #[error("{}", .0.message())]
    Worker(Status),
}

impl DriverError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        DriverError::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl From<claudecluster_proto::validate::Invalid> for DriverError {
    fn from(invalid: claudecluster_proto::validate::Invalid) -> Self {
        DriverError::invalid(invalid.field, invalid.message)
    }
}

impl From<DriverError> for Status {
    fn from(error: DriverError) -> Status {
        let message = claudecluster_proto::validate::status_message(error.to_string());
        match error {
            DriverError::InvalidArgument { .. } => Status::invalid_argument(message),
            DriverError::TaskNotFound(_)
            | DriverError::SessionNotFound(_)
            | DriverError::KeyNotFound(_) => Status::not_found(message),
            DriverError::Unauthenticated(_) => Status::unauthenticated(message),
            DriverError::PermissionDenied(_) => Status::permission_denied(message),
            DriverError::QuotaExceeded(_) => Status::resource_exhausted(message),
            DriverError::KeyExists(_) => Status::already_exists(message),
            DriverError::SessionEnded { .. } | DriverError::NoContainerWorker => {
                Status::failed_precondition(message)
            }
            DriverError::SessionQueueFull { .. } => Status::resource_exhausted(message),
            DriverError::SchedulerUnavailable { .. }
            | DriverError::NotDurable(_)
            | DriverError::ShuttingDown { .. } => Status::unavailable(message),
            DriverError::Store(crate::db::DbError::Corrupt(_)) => Status::data_loss(message),
            DriverError::Store(_) => Status::unavailable(message),
            DriverError::TaskNotEnded { .. } => Status::failed_precondition(message),
            DriverError::NoWorkspace(_) => Status::failed_precondition(message),
            DriverError::WorkerUnreachable { .. } => Status::unavailable(message),
            DriverError::Worker(status) => Status::new(status.code(), message),
        }
    }
}
