use tonic::Status;

/// Everything the scheduler refuses, mapped to a gRPC status in one place.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("{field}: {message}")]
    InvalidArgument {
        field: &'static str,
        message: String,
    },
    #[error("the first message on a worker link must register the worker")]
    NotRegistered,
    #[error("worker {0} not found")]
    WorkerNotFound(String),
}

impl From<SchedulerError> for Status {
    fn from(error: SchedulerError) -> Status {
        match error {
            SchedulerError::InvalidArgument { .. } => Status::invalid_argument(error.to_string()),
            SchedulerError::NotRegistered => Status::failed_precondition(error.to_string()),
            SchedulerError::WorkerNotFound(_) => Status::not_found(error.to_string()),
        }
    }
}
