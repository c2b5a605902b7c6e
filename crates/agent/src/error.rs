//! Agent errors. Each names the step that failed, so it can be reported to the provider as is.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("no provider reachable (tried {tried}): {last}")]
    Unreachable { tried: String, last: String },
    #[error("provider {provider} refused {what}: {message}")]
    Rpc { provider: String, what: &'static str, message: String },
    #[error("install of {update} deferred: {reason}")]
    Deferred { update: String, reason: String },
    #[error("download of {update} failed: {reason}")]
    Download { update: String, reason: String },
    #[error("verification of {update} failed: {reason}")]
    Verify { update: String, reason: String },
    #[error("install of {update} failed: {reason}")]
    Install { update: String, reason: String },
    /// The new version was live but not healthy, and the previous one is back.
    #[error("install of {update} failed and was rolled back: {reason}")]
    RolledBack { update: String, reason: String },
    #[error("{path}: {source}")]
    Io { path: std::path::PathBuf, source: std::io::Error },
    #[error("agent state {path}: {reason}")]
    State { path: std::path::PathBuf, reason: String },
    #[error("{0}")]
    Config(String),
    #[error("cancelled by `agent cancel`")]
    Cancelled,
    #[error(transparent)]
    Core(#[from] updraft_core::CoreError),
}

impl AgentError {
    pub fn io(path: impl Into<std::path::PathBuf>, source: std::io::Error) -> Self {
        AgentError::Io { path: path.into(), source }
    }
}

pub type Result<T, E = AgentError> = std::result::Result<T, E>;
