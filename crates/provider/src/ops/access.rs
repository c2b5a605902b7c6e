//! The access half of the admin operations: authorized users and their roles, their web
//! console passwords, reading the audit and activity logs, and the certificates hosts hold
//! (join tokens, approvals, revocations: the rules are `certs`').
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use updraft_proto::v1::{
    ApproveEnrollmentRequest, CreateJoinTokenRequest, JoinToken, ListCertificatesRequest, ListCertificatesResponse,
    RevokeCertificateRequest,
};
use updraft_proto::v1::{
    ListActivityRequest, ListActivityResponse, ListAuditRequest, ListAuditResponse, ListUsersResponse,
    RemoveUserRequest, SetPasswordRequest, SetPasswordResponse, User,
};

use super::Ops;
use crate::error::{ProviderError, Result};
use crate::import::record_catalog_activity;

/// Roles of the admin API's users.
pub const USER_ROLES: [&str; 2] = ["admin", "viewer"];

/// Shortest and longest password accepted (longer ones only cost hashing time).
pub const PASSWORD_LEN: std::ops::RangeInclusive<usize> = 10..=1024;

impl Ops {
    pub async fn create_join_token(&self, who: &str, req: CreateJoinTokenRequest) -> Result<JoinToken> {
        crate::certs::create_token(&self.shared, who, req).await
    }

    pub async fn list_certificates(&self, req: ListCertificatesRequest) -> Result<ListCertificatesResponse> {
        crate::certs::list(&self.shared, req.include_expired).await
    }

    pub async fn approve_enrollment(
        &self,
        who: &str,
        req: ApproveEnrollmentRequest,
    ) -> Result<ListCertificatesResponse> {
        crate::certs::approve(&self.shared, who, &req.name).await
    }

    pub async fn revoke_certificate(
        &self,
        who: &str,
        req: RevokeCertificateRequest,
    ) -> Result<ListCertificatesResponse> {
        crate::certs::revoke(&self.shared, who, req.name_or_serial.trim()).await
    }

    /// Refuses a change that would leave no admin (no one could manage users any more short
    /// of restarting the provider with --bootstrap-admin).
    fn guard_last_admin(&self, name: &str, new_role: &str) -> Result<()> {
        let users = self.shared.store.list_users()?;
        let admins: Vec<&User> = users.iter().filter(|u| u.role == "admin").collect();
        if new_role != "admin" && admins.len() == 1 && admins[0].name == name {
            return Err(ProviderError::InvalidArgument(format!("{name} is the last admin; add another admin first")));
        }
        Ok(())
    }

    pub async fn put_user(&self, who: &str, req: User) -> Result<ListUsersResponse> {
        let u = req;
        let plain = !u.name.is_empty()
            && u.name.len() <= 64
            && u.name.chars().all(|c| c.is_ascii_alphanumeric() || "._-@".contains(c));
        if !plain {
            return Err(ProviderError::InvalidArgument(format!(
                "user name {:?} must be 1-64 of A-Z a-z 0-9 . _ - @ (the name in their admin certificate)",
                u.name
            )));
        }
        if !USER_ROLES.contains(&u.role.as_str()) {
            return Err(ProviderError::InvalidArgument(format!("role {:?} must be admin or viewer", u.role)));
        }
        self.guard_last_admin(&u.name, &u.role)?;
        self.shared.store.put_user(&u).await?;
        record_catalog_activity(&self.shared, who, None, format!("user {} is {}", u.name, u.role)).await?;
        Ok(ListUsersResponse { users: self.shared.store.list_users()? })
    }

    pub async fn remove_user(&self, who: &str, req: RemoveUserRequest) -> Result<ListUsersResponse> {
        let name = req.name;
        if self.shared.store.get_user(&name)?.is_none() {
            return Err(ProviderError::InvalidArgument(format!("no user {name:?}")));
        }
        self.guard_last_admin(&name, "")?;
        self.shared.store.remove_user(&name).await?;
        record_catalog_activity(&self.shared, who, None, format!("user {name} removed")).await?;
        Ok(ListUsersResponse { users: self.shared.store.list_users()? })
    }

    pub async fn list_users(&self) -> Result<ListUsersResponse> {
        Ok(ListUsersResponse { users: self.shared.store.list_users()? })
    }

    pub async fn list_audit(&self, req: ListAuditRequest) -> Result<ListAuditResponse> {
        let r = req;
        Ok(ListAuditResponse { entries: self.shared.store.list_audit(r.after_seq, r.limit as usize)? })
    }

    pub async fn list_activity(&self, req: ListActivityRequest) -> Result<ListActivityResponse> {
        let limit = if req.limit == 0 { 100 } else { req.limit.min(10_000) } as usize;
        let activities = self.shared.store.list_activity(&req.machine, &req.update_id, req.since_unix_ms, limit)?;
        Ok(ListActivityResponse { activities })
    }

    /// Sets the password `name` signs in to the web console with (an empty one clears it: that
    /// user can then use admin-cli only). Stored as an Argon2id hash with a fresh salt.
    pub async fn set_password(&self, who: &str, req: SetPasswordRequest) -> Result<SetPasswordResponse> {
        if self.shared.store.get_user(&req.name)?.is_none() {
            return Err(ProviderError::InvalidArgument(format!(
                "no user {:?} (add one first: `admin-cli user add NAME --role viewer|admin`)",
                req.name
            )));
        }
        if req.password.is_empty() {
            self.shared.store.set_password(&req.name, None).await?;
            record_catalog_activity(&self.shared, who, None, format!("password of {} cleared", req.name)).await?;
            return Ok(SetPasswordResponse {});
        }
        let len = req.password.chars().count();
        if !PASSWORD_LEN.contains(&len) {
            return Err(ProviderError::InvalidArgument(format!(
                "a password must be {} to {} characters long; this one has {len}",
                PASSWORD_LEN.start(),
                PASSWORD_LEN.end()
            )));
        }
        let password = req.password;
        let phc = tokio::task::spawn_blocking(move || hash_password(&password))
            .await
            .map_err(|e| ProviderError::Io(format!("hashing the password: {e}")))??;
        self.shared.store.set_password(&req.name, Some(&phc)).await?;
        record_catalog_activity(&self.shared, who, None, format!("password of {} set", req.name)).await?;
        Ok(SetPasswordResponse {})
    }

    /// Whether `password` is `name`'s: false for an unknown user or one without a password
    /// (a hash is computed either way, so the answer takes as long for a name that does not
    /// exist). The caller rate-limits attempts.
    pub async fn check_password(&self, name: &str, password: &str) -> Result<bool> {
        let stored = match self.shared.store.get_user(name)? {
            Some(_) => self.shared.store.password_of(name)?.map(|p| p.phc),
            None => None,
        };
        let password = password.to_string();
        tokio::task::spawn_blocking(move || match stored {
            Some(phc) => verify_password(&phc, &password),
            None => {
                let _ = hash_password(&password);
                false
            }
        })
        .await
        .map_err(|e| ProviderError::Io(format!("checking a password: {e}")))
    }
}

fn hash_password(password: &str) -> Result<String> {
    // A fresh random salt each time (from the OS).
    let hash: PasswordHash = argon2::Argon2::default()
        .hash_password(password.as_bytes())
        .map_err(|e| ProviderError::Io(format!("hashing the password: {e}")))?;
    Ok(hash.to_string())
}

fn verify_password(phc: &str, password: &str) -> bool {
    PasswordHash::new(phc).is_ok_and(|h| argon2::Argon2::default().verify_password(password.as_bytes(), &h).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_stored_as_argon2_and_checked() {
        let phc = hash_password("correct horse battery").unwrap();
        assert!(phc.starts_with("$argon2id$"), "{phc}");
        assert!(!phc.contains("correct horse"));
        assert!(verify_password(&phc, "correct horse battery"));
        assert!(!verify_password(&phc, "correct horse battery "));
        assert!(!verify_password("not a hash", "x"));
        assert_ne!(hash_password("correct horse battery").unwrap(), phc, "a fresh salt each time");
    }
}
