//! The local control channel between `agent status|check` and the running daemon: one JSON
//! request line, one JSON response line, over `STATE_DIR/agent.sock` (mode 0600, so only the
//! agent's own user can drive it).
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::error::{AgentError, Result};

/// Longest request or response line accepted.
pub const MAX_LINE: u64 = 1 << 20;

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("agent.sock")
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
    /// Check now; `later` leaves high-priority updates for the next install window.
    Check {
        #[serde(default)]
        later: bool,
    },
    /// Install waiting updates now (only these ids, when given).
    Apply {
        #[serde(default)]
        select: Vec<String>,
    },
    /// The providers the agent knows, and where each came from.
    Providers,
    /// Stop the running check's downloads and the tasks it has not begun.
    Cancel,
    /// Go back to an earlier version kept on the machine (the newest, unless named).
    Restore {
        product: String,
        #[serde(default)]
        version: Option<String>,
    },
    /// Try one provider now (by name or URL).
    TestProvider {
        target: String,
    },
    /// Declare a product installed by other means (see `agent adopt`).
    Adopt {
        product: String,
        version: String,
        #[serde(default)]
        upgrade_code: String,
    },
    /// A default-group machine's own settings; unset fields are left alone.
    Config {
        mode: Option<String>,
        install_day: Option<i32>,
        install_hour: Option<i32>,
        #[serde(default)]
        reset: bool,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Response {
    Status(StatusReport),
    Check(CheckReport),
    Config(ConfigReport),
    // A struct variant: an internally tagged enum cannot carry a bare list.
    Providers { providers: Vec<ProviderView> },
    Tested(TestReport),
    Done { message: String },
    Error { message: String },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProviderView {
    #[serde(flatten)]
    pub known: crate::client::Known,
    /// The one the agent uses now.
    pub current: bool,
    /// Seconds it is still skipped after failing, and why it failed.
    pub backoff_secs: Option<f64>,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TestReport {
    pub name: String,
    pub url: String,
    pub served_by: String,
    pub catalog_seq: u64,
    pub offers: usize,
    pub millis: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConfigReport {
    pub group: String,
    pub mode: String,
    pub install_day: String,
    pub install_hour: String,
    pub local: crate::state::LocalSettings,
    /// Set when the change waited for a check or install that was running (settings never
    /// change while one runs).
    #[serde(default)]
    pub waited: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InstalledView {
    pub product: String,
    pub version: String,
    pub update_id: String,
    pub previous_version: Option<String>,
    /// Versions kept to go back to (`agent restore`), newest first: `P_old`, then backups.
    #[serde(default)]
    pub kept: Vec<String>,
    #[serde(default)]
    pub upgrade_code: String,
    #[serde(default)]
    pub adopted: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatusReport {
    pub name: String,
    pub group: Option<String>,
    pub mode: Option<String>,
    pub managed: bool,
    pub waiting: Vec<crate::state::WaitingRec>,
    pub problems: Vec<String>,
    pub restart_needed: bool,
    /// False when read from the state file because no daemon answered.
    pub daemon_running: bool,
    pub providers: Vec<String>,
    pub last_provider: Option<String>,
    pub last_check_unix: i64,
    pub last_error: Option<String>,
    pub catalog_seq: u64,
    pub pending_reports: usize,
    pub installed: Vec<InstalledView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct CheckReport {
    pub provider: String,
    pub catalog_seq: u64,
    pub done: Vec<String>,
    pub errors: Vec<String>,
    /// Updates the policy holds back, and why.
    pub waiting: Vec<String>,
}

/// Whether a daemon holds `state_dir` (it takes `agent.lock` before anything else, so one that is
/// still starting counts).
pub fn daemon_holds(state_dir: &Path) -> bool {
    let Ok(f) = std::fs::File::open(state_dir.join("agent.lock")) else { return false };
    matches!(f.try_lock(), Err(std::fs::TryLockError::WouldBlock))
}

/// Sends one request to the daemon. A daemon that holds the state directory but is not
/// listening yet (it is starting: recovering an interrupted install, say) is waited for, up to
/// 30 s; with no daemon at all this fails at once.
pub async fn call(state_dir: &Path, req: &Request) -> Result<Response> {
    let path = socket_path(state_dir);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let stream = loop {
        match tokio::net::UnixStream::connect(&path).await {
            Ok(s) => break s,
            Err(_) if daemon_holds(state_dir) && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await
            }
            Err(e) => return Err(AgentError::io(&path, e)),
        }
    };
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(req).expect("request serialises");
    line.push(b'\n');
    w.write_all(&line).await.map_err(|e| AgentError::io(&path, e))?;
    let mut resp = String::new();
    BufReader::new(r.take(MAX_LINE)).read_line(&mut resp).await.map_err(|e| AgentError::io(&path, e))?;
    serde_json::from_str(&resp).map_err(|e| AgentError::Config(format!("daemon answered something unreadable: {e}")))
}

/// Reads one request line from a connection.
pub async fn read_request(r: impl tokio::io::AsyncRead + Unpin) -> std::result::Result<Request, String> {
    let mut line = String::new();
    BufReader::new(r.take(MAX_LINE)).read_line(&mut line).await.map_err(|e| e.to_string())?;
    serde_json::from_str(&line).map_err(|e| format!("bad request: {e}"))
}

pub async fn write_response(mut w: impl tokio::io::AsyncWrite + Unpin, resp: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(resp).expect("response serialises");
    line.push(b'\n');
    w.write_all(&line).await
}
