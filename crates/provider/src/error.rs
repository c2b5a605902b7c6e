//! Provider errors, and the one mapping from them to gRPC status codes.
use tonic::{Code, Status};
use updraft_core::CoreError;

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("no update with id {0:?}")]
    UnknownUpdate(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{product} {version} is already in the catalog as {id}")]
    Duplicate { product: String, version: String, id: String },
    #[error("content {0} is not available on this provider")]
    BlobMissing(String),
    #[error("{0}")]
    LimitReached(String),
    /// The caller may not do this (its certificate is genuine, the request is not its to make).
    #[error("{0}")]
    Denied(String),
    #[error("{0}")]
    NotFound(String),
    /// This provider cannot do it as it is set up (one that holds no CA asked to sign).
    #[error("{0}")]
    Precondition(String),
    #[error("upstream provider unavailable: {0}")]
    Upstream(String),
    #[error("not ready: {0}")]
    NotReady(String),
    #[error("store error: {0}")]
    Store(String),
    /// The store's database server cannot be reached from this provider.
    #[error("store error: {0}")]
    StoreUnreachable(String),
    #[error("{0}")]
    StoreInUse(String),
    #[error(
        "this provider was superseded: it took over the store at epoch {mine}, the store is at epoch {current}; \
         another provider is active"
    )]
    Fenced { mine: u64, current: u64 },
    #[error("{0}")]
    Io(String),
    #[error(transparent)]
    Core(#[from] CoreError),
}

impl From<crate::db::Error> for ProviderError {
    fn from(e: crate::db::Error) -> Self {
        match e {
            crate::db::Error::InUse(what) => ProviderError::StoreInUse(what),
            e @ crate::db::Error::Engine { .. } => ProviderError::Store(e.to_string()),
            e @ crate::db::Error::Unreachable { .. } => ProviderError::StoreUnreachable(e.to_string()),
        }
    }
}

impl ProviderError {
    /// The HTTP status the web console answers with: the counterpart of the gRPC code below.
    pub fn http_status(&self) -> tonic::codegen::http::StatusCode {
        use tonic::codegen::http::StatusCode;
        match Code::from(self) {
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::InvalidArgument => StatusCode::BAD_REQUEST,
            Code::AlreadyExists => StatusCode::CONFLICT,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::FailedPrecondition => StatusCode::CONFLICT,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<&ProviderError> for Code {
    fn from(e: &ProviderError) -> Self {
        match e {
            ProviderError::UnknownUpdate(_) | ProviderError::BlobMissing(_) | ProviderError::NotFound(_) => {
                Code::NotFound
            }
            ProviderError::Precondition(_) => Code::FailedPrecondition,
            ProviderError::InvalidArgument(_) => Code::InvalidArgument,
            ProviderError::Duplicate { .. } => Code::AlreadyExists,
            ProviderError::LimitReached(_) => Code::ResourceExhausted,
            ProviderError::Denied(_) => Code::PermissionDenied,
            ProviderError::Upstream(_)
            | ProviderError::NotReady(_)
            | ProviderError::StoreInUse(_)
            | ProviderError::StoreUnreachable(_)
            | ProviderError::Fenced { .. } => Code::Unavailable,
            ProviderError::Store(_) | ProviderError::Io(_) => Code::Internal,
            ProviderError::Core(c) => match c {
                CoreError::Io { .. } => Code::Internal,
                _ => Code::InvalidArgument,
            },
        }
    }
}

impl From<ProviderError> for Status {
    fn from(e: ProviderError) -> Self {
        Status::new(Code::from(&e), e.to_string())
    }
}

pub type Result<T, E = ProviderError> = std::result::Result<T, E>;
