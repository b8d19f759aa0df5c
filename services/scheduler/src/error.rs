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
        let message = claudecluster_proto::validate::status_message(error.to_string());
        match error {
            SchedulerError::InvalidArgument { .. } => Status::invalid_argument(message),
            SchedulerError::NotRegistered => Status::failed_precondition(message),
            SchedulerError::WorkerNotFound(_) => Status::not_found(message),
        }
    }
}
