//! admin-cli's access commands: authorized users, and the audit log with its independent
//! verification.
use anyhow::bail;
use serde_json::{Value, json};
use updraft_proto::v1::{AuditEntry, ListAuditRequest, ListUsersRequest, RemoveUserRequest, SetPasswordRequest, User};

use crate::cli::{AuditCmd, UserCmd};
use crate::commands::{connect, rpc};
use crate::output::{age, json as print_json, table};

/// Audit entries fetched per call when verifying.
const AUDIT_PAGE: u32 = 2_000;

pub async fn user(url: &str, cmd: UserCmd, as_json: bool) -> anyhow::Result<()> {
    let mut c = connect(url).await?;
    if let UserCmd::Passwd { name, clear, .. } = cmd {
        let password = if clear { String::new() } else { read_password()? };
        c.set_password(SetPasswordRequest { name: name.clone(), password }).await.map_err(rpc(url))?;
        if as_json {
            print_json(&json!({"name": name, "password": if clear { "cleared" } else { "set" }}));
        } else {
            println!("password of {name} {}", if clear { "cleared" } else { "set" });
        }
        return Ok(());
    }
    let users = match cmd {
        UserCmd::Add { name, role } => c.put_user(User { name, role }).await,
        UserCmd::Remove { name } => c.remove_user(RemoveUserRequest { name }).await,
        UserCmd::List => c.list_users(ListUsersRequest {}).await,
        UserCmd::Passwd { .. } => unreachable!("handled above"),
    }
    .map_err(rpc(url))?
    .into_inner()
    .users;
    if as_json {
        print_json(&Value::Array(users.iter().map(|u| json!({"name": u.name, "role": u.role})).collect()));
    } else {
        table(&["USER", "ROLE"], &users.iter().map(|u| vec![u.name.clone(), u.role.clone()]).collect::<Vec<_>>());
    }
    Ok(())
}

/// The first line of standard input, without its line ending.
fn read_password() -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let password = line.trim_end_matches(['\n', '\r']).to_string();
    if password.is_empty() {
        bail!("no password on standard input (to clear one, use --clear)");
    }
    Ok(password)
}

fn entry_json(e: &AuditEntry) -> Value {
    json!({
        "seq": e.seq, "at_unix_ms": e.at_unix_ms, "who": e.who, "role": e.role, "action": e.action,
        "outcome": e.outcome, "prev_hash": e.prev_hash, "hash": e.hash,
    })
}

fn fields(e: &AuditEntry) -> updraft_core::audit::Fields<'_> {
    updraft_core::audit::Fields {
        seq: e.seq,
        at_unix_ms: e.at_unix_ms,
        who: &e.who,
        role: &e.role,
        action: &e.action,
        outcome: &e.outcome,
        prev_hash: &e.prev_hash,
    }
}

pub async fn audit(url: &str, cmd: AuditCmd, as_json: bool) -> anyhow::Result<()> {
    let mut c = connect(url).await?;
    match cmd {
        AuditCmd::List { after, limit } => {
            let entries = c
                .list_audit(ListAuditRequest { after_seq: after, limit })
                .await
                .map_err(rpc(url))?
                .into_inner()
                .entries;
            if as_json {
                print_json(&Value::Array(entries.iter().map(entry_json).collect()));
            } else {
                let rows: Vec<Vec<String>> = entries
                    .iter()
                    .map(|e| {
                        let action = e.action.rsplit('/').next().unwrap_or(&e.action).to_string();
                        vec![
                            e.seq.to_string(),
                            age(e.at_unix_ms),
                            format!("{} ({})", e.who, e.role),
                            action,
                            e.outcome.clone(),
                        ]
                    })
                    .collect();
                table(&["SEQ", "WHEN", "WHO", "ACTION", "OUTCOME"], &rows);
            }
        }
        AuditCmd::Verify => {
            // Page by page, so a log of any length can be verified.
            let mut v = updraft_core::audit::Verifier::default();
            let mut after_seq = 0;
            loop {
                let page = c
                    .list_audit(ListAuditRequest { after_seq, limit: AUDIT_PAGE })
                    .await
                    .map_err(rpc(url))?
                    .into_inner()
                    .entries;
                let Some(last) = page.last() else { break };
                after_seq = last.seq;
                for e in &page {
                    if let Err((seq, why)) = v.push(&fields(e), &e.hash) {
                        bail!("audit log broken at entry {seq}: {why}");
                    }
                }
            }
            let (n, head) = (v.count(), v.head());
            if as_json {
                print_json(&json!({"ok": true, "entries": n, "head": head}));
            } else {
                println!("audit log intact: {n} entries, head {head}");
            }
        }
    }
    Ok(())
}
