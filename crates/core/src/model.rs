//! Named domain values shared by every tier: update states and install types, with the
//! spellings operators type and their wire (protobuf enum) numbers.
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::CoreError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpdateState {
    PreApproval,
    Ga,
    Inactive,
    Remove,
}

impl UpdateState {
    pub const ALL: &'static str = "pre-approval, ga, inactive, remove";
    /// Every state, in the order of [`UpdateState::ALL`].
    pub const VALUES: [UpdateState; 4] =
        [UpdateState::PreApproval, UpdateState::Ga, UpdateState::Inactive, UpdateState::Remove];

    pub fn as_str(self) -> &'static str {
        match self {
            UpdateState::PreApproval => "pre-approval",
            UpdateState::Ga => "ga",
            UpdateState::Inactive => "inactive",
            UpdateState::Remove => "remove",
        }
    }

    /// The protobuf enum number (`updraft.v1.UpdateState`).
    pub fn to_wire(self) -> i32 {
        match self {
            UpdateState::PreApproval => 1,
            UpdateState::Ga => 2,
            UpdateState::Inactive => 3,
            UpdateState::Remove => 4,
        }
    }

    pub fn from_wire(n: i32) -> Option<Self> {
        Some(match n {
            1 => UpdateState::PreApproval,
            2 => UpdateState::Ga,
            3 => UpdateState::Inactive,
            4 => UpdateState::Remove,
            _ => return None,
        })
    }
}

impl FromStr for UpdateState {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "pre-approval" | "preapproval" => UpdateState::PreApproval,
            "ga" => UpdateState::Ga,
            "inactive" => UpdateState::Inactive,
            "remove" => UpdateState::Remove,
            _ => {
                return Err(CoreError::UnknownName { what: "update state", input: s.into(), expected: Self::ALL });
            }
        })
    }
}

impl fmt::Display for UpdateState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum InstallType {
    /// A full release.
    #[default]
    Install,
    Patch,
    /// A hotfix ("engineering special") on top of a patch.
    Es,
}

impl InstallType {
    pub const ALL: &'static str = "install, patch, es";

    pub fn as_str(self) -> &'static str {
        match self {
            InstallType::Install => "install",
            InstallType::Patch => "patch",
            InstallType::Es => "es",
        }
    }
    pub fn to_wire(self) -> i32 {
        match self {
            InstallType::Install => 1,
            InstallType::Patch => 2,
            InstallType::Es => 3,
        }
    }
    pub fn from_wire(n: i32) -> Option<Self> {
        Some(match n {
            1 => InstallType::Install,
            2 => InstallType::Patch,
            3 => InstallType::Es,
            _ => return None,
        })
    }
}

impl FromStr for InstallType {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "install" => InstallType::Install,
            "patch" => InstallType::Patch,
            "es" => InstallType::Es,
            _ => return Err(CoreError::UnknownName { what: "install type", input: s.into(), expected: Self::ALL }),
        })
    }
}

impl fmt::Display for InstallType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a machine is in the fleet, for the server version ceiling (seed 001: clients never run
/// ahead of their server; seed 002: off-servers, then the server, then workstations).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    #[default]
    Workstation,
    Server,
    /// The machine of a branch site's remote provider.
    Site,
}

impl Role {
    pub const ALL: &'static str = "workstation, server, site";

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Workstation => "workstation",
            Role::Server => "server",
            Role::Site => "site",
        }
    }

    /// The role a wire string names; empty (not said) is the default, workstation.
    pub fn from_wire(s: &str) -> Result<Self, CoreError> {
        if s.is_empty() { Ok(Role::default()) } else { s.parse() }
    }
}

impl FromStr for Role {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "workstation" => Role::Workstation,
            "server" => Role::Server,
            "site" => Role::Site,
            _ => return Err(CoreError::UnknownName { what: "machine role", input: s.into(), expected: Self::ALL }),
        })
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Checks a product name: it becomes a directory name under the install root, so it must be a
/// single safe path component.
pub fn validate_product(name: &str) -> Result<(), CoreError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !name.ends_with("_old")
        && !name.ends_with("_update_pending");
    if ok {
        Ok(())
    } else {
        Err(CoreError::Invalid {
            what: "product name",
            input: name.chars().take(80).collect(),
            reason: "use 1-64 of A-Z a-z 0-9 . _ -, not starting with '.', not ending in _old or _update_pending"
                .into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip() {
        for s in [UpdateState::PreApproval, UpdateState::Ga, UpdateState::Inactive, UpdateState::Remove] {
            assert_eq!(s.as_str().parse::<UpdateState>().unwrap(), s);
            assert_eq!(UpdateState::from_wire(s.to_wire()), Some(s));
        }
        assert!("approved".parse::<UpdateState>().unwrap_err().to_string().contains("pre-approval, ga"));
        for r in [Role::Workstation, Role::Server, Role::Site] {
            assert_eq!(Role::from_wire(r.as_str()).unwrap(), r);
        }
        assert_eq!(Role::from_wire("").unwrap(), Role::Workstation);
        assert!(Role::from_wire("laptop").unwrap_err().to_string().contains("workstation, server, site"));
    }

    #[test]
    fn product_names() {
        validate_product("editor-pro_2.x").unwrap();
        for bad in ["", ".hidden", "a/b", "..", "x_old", "x_update_pending", "sp ace"] {
            assert!(validate_product(bad).is_err(), "{bad}");
        }
    }
}
