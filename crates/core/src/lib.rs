//! Pure domain of Updraft: versions, update states, release keys, the signed package format
//! and the applicability plan. No networking and no store here; every other crate builds on it.

pub mod audit;
pub mod decisions;
pub mod error;
pub mod freshness;
pub mod fuzzing;
pub mod hash;
pub mod keys;
pub mod model;
pub mod package;
pub mod plan;
pub mod policy;
pub mod rollout;
pub mod version;
pub mod when;

pub use error::CoreError;
pub use version::Version;
