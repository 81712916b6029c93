//! The one place where error kinds become gRPC status codes (containerd's errgrpc).

use isula_store::{ErrorKind, StoreError};
use isula_transport::TransportError;
use tonic::{Code, Status};

pub fn status(kind: ErrorKind, message: String) -> Status {
    let code = match kind {
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::ResourceExhausted => Code::ResourceExhausted,
        ErrorKind::DataLoss => Code::DataLoss,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::Internal => Code::Internal,
    };
    Status::new(code, message)
}

pub fn store(e: StoreError) -> Status {
    status(e.kind(), e.to_string())
}

pub fn transport(e: TransportError) -> Status {
    status(e.kind(), e.to_string())
}

pub fn invalid(message: impl Into<String>) -> Status {
    Status::invalid_argument(message)
}

pub fn internal(message: impl Into<String>) -> Status {
    Status::internal(message)
}
