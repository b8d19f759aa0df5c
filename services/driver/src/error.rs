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
}

impl DriverError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        DriverError::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl From<DriverError> for Status {
    fn from(error: DriverError) -> Status {
        let message = error.to_string();
        match error {
            DriverError::InvalidArgument { .. } => Status::invalid_argument(message),
            DriverError::TaskNotFound(_) => Status::not_found(message),
            DriverError::SchedulerUnavailable { .. } => Status::unavailable(message),
        }
    }
}
