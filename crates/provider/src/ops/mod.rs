//! The admin operations: one layer behind every way an administrator reaches a provider (the
//! gRPC Admin service in `admin.rs`, the web console in `web/`). Each operation takes plain
//! values and returns typed results or a [`ProviderError`]; none knows which transport called
//! it. Every rule, validation and guard lives here once:
//!
//! - [`Op`] is the table of operations with the access each needs (read or change), the one
//!   place that decides what a viewer may do;
//! - [`check_user`] decides whether a named user may perform an access, for every transport;
//! - the operations themselves validate all their input before changing anything, publish their
//!   change through the store's logged writes, and record it with who made it.
//!
//! The halves: `catalog` (updates, caps, watched folders), `fleet` (machines, groups,
//! deployments, the report), `servers` (the pair, provider servers, discovery), `access`
//! (users, passwords, the audit and activity logs).
use std::sync::Arc;

use crate::Shared;
use crate::error::{ProviderError, Result};
use crate::scanner::ScanConfig;

pub mod access;
pub mod catalog;
pub mod fleet;
pub mod servers;

/// What an operation needs of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Viewers and admins.
    Read,
    /// Admins only; the outcome goes to the audit log.
    Write,
}

macro_rules! operations {
    ($($op:ident => $access:ident),* $(,)?) => {
        /// Every admin operation, named as its gRPC method is.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Op { $($op),* }

        impl Op {
            pub const ALL: &'static [Op] = &[$(Op::$op),*];

            /// The gRPC method's name (`SetUpdateState`).
            pub fn name(self) -> &'static str {
                match self { $(Op::$op => stringify!($op)),* }
            }

            pub fn access(self) -> Access {
                match self { $(Op::$op => Access::$access),* }
            }
        }
    };
}

operations! {
    AddUpdate => Write,
    ListUpdates => Read,
    GetUpdate => Read,
    SetUpdateState => Write,
    SetPriority => Write,
    Prestage => Write,
    DeleteUpdates => Write,
    SetRelatedInstalls => Write,
    SetCap => Write,
    ListCaps => Read,
    AddWatch => Write,
    RemoveWatch => Write,
    ListWatches => Read,
    ListPending => Read,
    ImportPending => Write,
    ListMachines => Read,
    GetMachine => Read,
    ListActivity => Read,
    ClearActivity => Write,
    PutGroup => Write,
    RemoveGroup => Write,
    ListGroups => Read,
    GetGroup => Read,
    Assign => Write,
    Pin => Write,
    Report => Read,
    Deploy => Write,
    ListDeployments => Read,
    SetRole => Write,
    ForgetMachine => Write,
    GetPair => Read,
    PutPeer => Write,
    RemovePeer => Write,
    ListPeers => Read,
    SetDiscovery => Write,
    GetDiscovery => Read,
    PutUser => Write,
    RemoveUser => Write,
    ListUsers => Read,
    ListAudit => Read,
    SetPassword => Write,
    CreateJoinToken => Write,
    ListCertificates => Read,
    ApproveEnrollment => Write,
    RevokeCertificate => Write,
    PreviewRollout => Read,
    StartRollout => Write,
    GetRollout => Read,
    ListRollouts => Read,
    ResumeRollout => Write,
    RevertRollout => Write,
}

impl Op {
    /// The operation a gRPC method name stands for.
    pub fn from_name(method: &str) -> Option<Op> {
        Op::ALL.iter().copied().find(|op| op.name() == method)
    }

    /// The action written to the audit log: the gRPC path, whichever transport was used, so
    /// one action reads the same in the log wherever it came from.
    pub fn action(self) -> String {
        format!("/{}/{}", crate::health::ADMIN, self.name())
    }
}

/// Whether the authorized user `name` may perform `access` on this provider: they must be in
/// the store's users, and only admins change anything. A provider cut off from its database
/// can check neither the user nor do the work.
pub fn check_user(shared: &Shared, name: &str, access: Access) -> Result<()> {
    shared.database_reachable()?;
    match shared.store.get_user(name)? {
        None if shared.store.list_users()?.is_empty() => {
            Err(ProviderError::Denied("no authorized users yet: start the provider with --bootstrap-admin NAME".into()))
        }
        None => Err(ProviderError::Denied(format!(
            "{name} is not an authorized user (an admin can run `admin-cli user add {name} --role viewer|admin`)"
        ))),
        Some(u) if access == Access::Write && u.role != "admin" => {
            Err(ProviderError::Denied(format!("{} is a {}: it may look, not change", u.name, u.role)))
        }
        Some(_) => Ok(()),
    }
}

/// The operations of one provider, over its store.
pub struct Ops {
    pub(crate) shared: Arc<Shared>,
    pub(crate) scan: ScanConfig,
}

impl Ops {
    pub fn new(shared: Arc<Shared>, scan: ScanConfig) -> Self {
        Self { shared, scan }
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// [`check_user`] for `op`.
    pub fn authorize(&self, user: &str, op: Op) -> Result<()> {
        check_user(&self.shared, user, op.access())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_admin_method_has_one_operation() {
        use prost::Message;
        let set = prost_types::FileDescriptorSet::decode(updraft_proto::FILE_DESCRIPTOR_SET).unwrap();
        let methods: Vec<String> = set
            .file
            .iter()
            .flat_map(|f| f.service.iter())
            .filter(|s| s.name() == "Admin")
            .flat_map(|s| s.method.iter().map(|m| m.name().to_string()))
            .collect();
        assert!(methods.len() > 30, "{methods:?}");
        for m in &methods {
            assert!(Op::from_name(m).is_some(), "the Admin method {m} has no entry in the operations table");
        }
        for op in Op::ALL {
            assert!(methods.iter().any(|m| m == op.name()), "{op:?} is not an Admin method");
        }
    }

    #[test]
    fn viewers_read_and_admins_change() {
        assert_eq!(Op::ListUpdates.access(), Access::Read);
        assert_eq!(Op::Report.access(), Access::Read);
        assert_eq!(Op::SetUpdateState.access(), Access::Write);
        assert_eq!(Op::SetPassword.access(), Access::Write);
        assert_eq!(Op::SetUpdateState.action(), "/updraft.v1.Admin/SetUpdateState");
    }
}
