//! Process glue shared by every Updraft binary: telemetry, shutdown on signals, the host name
//! and default data directories. Nothing domain-specific lives here.
pub mod mdns;
pub mod telemetry;
pub mod tls;

use std::path::PathBuf;

use tokio_util::sync::CancellationToken;

pub use telemetry::{Telemetry, TracedChannel, traced, traced_under};

/// A token cancelled on SIGINT or SIGTERM, for graceful shutdown.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => {}
        }
        tracing::info!("shutdown requested");
        t.cancel();
    });
    token
}

/// The kernel's host name, or "localhost" when it cannot be read.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Default data directory for a component: `$XDG_DATA_HOME/updraft/<component>`, else
/// `~/.local/share/updraft/<component>`, else `/var/lib/updraft/<component>`.
pub fn default_data_dir(component: &str) -> PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME")
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").filter(|s| !s.is_empty()).map(|h| PathBuf::from(h).join(".local/share")));
    match base {
        Some(b) => b.join("updraft").join(component),
        None => PathBuf::from("/var/lib/updraft").join(component),
    }
}
