//! The Updraft agent: finds its provider, checks on a jittered schedule or when pushed,
//! downloads resumably, verifies against the pinned release key, installs by atomic exchange,
//! and reports. `daemon` runs it; `control` is the local socket `agent status|check` use.
pub mod answer;
pub mod cancel;
pub mod client;
pub mod config;
pub mod control;
pub mod daemon;
pub mod error;
pub mod failpoint;
pub mod fuzzing;
pub mod install;
pub mod installer;
pub mod journal;
pub mod lifecycle;
pub mod localtime;
pub mod schedule;
pub mod selfupdate;
pub mod state;

pub use daemon::{AgentConfig, run};
