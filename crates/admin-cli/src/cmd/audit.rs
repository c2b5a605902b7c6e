//! `admin-cli audit`: the hash-chained log of admin changes and refusals, and its independent
//! verification.
use anyhow::bail;
use serde::Serialize;
use updraft_proto::v1::{AuditEntry, ListAuditRequest};

use crate::cli::AuditCmd;
use crate::ctx::Ctx;
use crate::render::{age, table};

/// Audit entries fetched per call when verifying.
const AUDIT_PAGE: u32 = 2_000;

#[derive(Serialize)]
struct Entry {
    seq: u64,
    at_unix_ms: i64,
    who: String,
    role: String,
    action: String,
    outcome: String,
    prev_hash: String,
    hash: String,
}

#[derive(Serialize)]
struct Verified {
    ok: bool,
    entries: usize,
    head: String,
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

pub async fn run(ctx: &Ctx, cmd: AuditCmd) -> anyhow::Result<()> {
    let mut c = ctx.admin().await?;
    match cmd {
        AuditCmd::List { after, limit } => {
            let req = ListAuditRequest { after_seq: after, limit };
            let entries = c.list_audit(req).await.map_err(ctx.failed())?.into_inner().entries;
            let entries: Vec<Entry> = entries
                .into_iter()
                .map(|e| Entry {
                    seq: e.seq,
                    at_unix_ms: e.at_unix_ms,
                    who: e.who,
                    role: e.role,
                    action: e.action,
                    outcome: e.outcome,
                    prev_hash: e.prev_hash,
                    hash: e.hash,
                })
                .collect();
            ctx.show(&entries, |es| {
                let rows: Vec<Vec<String>> = es
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
            });
        }
        AuditCmd::Verify => {
            // Page by page, so a log of any length can be verified.
            let mut v = updraft_core::audit::Verifier::default();
            let mut after_seq = 0;
            loop {
                let req = ListAuditRequest { after_seq, limit: AUDIT_PAGE };
                let page = c.list_audit(req).await.map_err(ctx.failed())?.into_inner().entries;
                let Some(last) = page.last() else { break };
                after_seq = last.seq;
                for e in &page {
                    if let Err((seq, why)) = v.push(&fields(e), &e.hash) {
                        bail!("audit log broken at entry {seq}: {why}");
                    }
                }
            }
            let verified = Verified { ok: true, entries: v.count(), head: v.head().to_string() };
            ctx.show(&verified, |v| println!("audit log intact: {} entries, head {}", v.entries, v.head));
        }
    }
    Ok(())
}
