//! `admin-cli pki`: the private CA for mutual TLS (made and used on this disk: `init`,
//! `issue`), and the certificates the provider holding the CA signs for enrolling hosts
//! (`token`, `list`, `approve`, `revoke`).
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use serde::Serialize;
use updraft_proto::v1::{
    ApproveEnrollmentRequest, CreateJoinTokenRequest, ListCertificatesRequest, ListCertificatesResponse,
    RevokeCertificateRequest,
};

use crate::cli::PkiCmd;
use crate::ctx::Ctx;
use crate::render::{age, dash, table};

#[derive(Serialize)]
struct Ca {
    ca: PathBuf,
}

#[derive(Serialize)]
struct Issued {
    cert: PathBuf,
    key: PathBuf,
    role: &'static str,
    name: String,
}

#[derive(Serialize)]
struct Step {
    done: String,
}

#[derive(Serialize)]
struct Token {
    token: String,
    id: String,
    role: String,
    name: String,
    group: String,
    uses: u32,
    expires: String,
}

#[derive(Serialize)]
struct CertView {
    name: String,
    role: String,
    serial: String,
    not_after: String,
    expires_in_secs: i64,
    issued: String,
    how: String,
    last_used: String,
    revoked: String,
    ca: String,
}

#[derive(Serialize)]
struct PendingView {
    name: String,
    role: String,
    address: String,
    key_sha256: String,
    requested: String,
    approved_by: String,
}

#[derive(Serialize)]
struct TokenView {
    id: String,
    role: String,
    name: String,
    group: String,
    uses_left: u32,
    expires: String,
    created_by: String,
}

#[derive(Serialize)]
struct Listing {
    certificates: Vec<CertView>,
    pending: Vec<PendingView>,
    tokens: Vec<TokenView>,
}

fn when(ms: i64) -> String {
    if ms <= 0 { String::new() } else { updraft_runtime::utc_text(ms) }
}

fn listing(r: ListCertificatesResponse) -> Listing {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    Listing {
        certificates: r
            .certificates
            .into_iter()
            .map(|c| CertView {
                expires_in_secs: (c.not_after_unix_ms - now) / 1000,
                not_after: when(c.not_after_unix_ms),
                issued: when(c.issued_unix_ms),
                last_used: if c.last_used_unix_ms > 0 { age(c.last_used_unix_ms) } else { String::new() },
                revoked: if c.revoked_unix_ms > 0 {
                    format!("{} by {}", when(c.revoked_unix_ms), c.revoked_by)
                } else {
                    String::new()
                },
                name: c.name,
                role: c.role,
                serial: c.serial,
                how: c.how,
                ca: c.ca,
            })
            .collect(),
        pending: r
            .pending
            .into_iter()
            .map(|p| PendingView {
                requested: when(p.requested_unix_ms),
                name: p.name,
                role: p.role,
                address: p.address,
                key_sha256: p.key_sha256,
                approved_by: p.approved_by,
            })
            .collect(),
        tokens: r
            .tokens
            .into_iter()
            .map(|t| TokenView {
                expires: when(t.expires_unix_ms),
                id: t.id,
                role: t.role,
                name: t.name,
                group: t.group,
                uses_left: t.uses_left,
                created_by: t.created_by,
            })
            .collect(),
    }
}

fn show_listing(ctx: &Ctx, l: &Listing) {
    ctx.show(l, |l| {
        let rows: Vec<Vec<String>> = l
            .certificates
            .iter()
            .map(|c| {
                let state = if !c.revoked.is_empty() {
                    "revoked".to_string()
                } else if c.expires_in_secs <= 0 {
                    "expired".to_string()
                } else if c.expires_in_secs < 14 * 86_400 {
                    format!("expires in {}", span(c.expires_in_secs))
                } else {
                    "valid".to_string()
                };
                vec![
                    c.name.clone(),
                    c.role.clone(),
                    c.serial.chars().take(16).collect(),
                    c.not_after.clone(),
                    state,
                    dash(&c.last_used),
                    c.how.clone(),
                ]
            })
            .collect();
        table(&["NAME", "ROLE", "SERIAL", "NOT AFTER", "STATE", "LAST USED", "ISSUED FOR"], &rows);
        if !l.pending.is_empty() {
            println!("\nwaiting for approval (admin-cli pki approve NAME):");
            let rows: Vec<Vec<String>> = l
                .pending
                .iter()
                .map(|p| {
                    vec![
                        p.name.clone(),
                        p.role.clone(),
                        dash(&p.address),
                        p.key_sha256.chars().take(16).collect(),
                        p.requested.clone(),
                        if p.approved_by.is_empty() { "-".into() } else { format!("approved by {}", p.approved_by) },
                    ]
                })
                .collect();
            table(&["NAME", "ROLE", "FROM", "KEY SHA-256", "ASKED", "STATE"], &rows);
        }
        if !l.tokens.is_empty() {
            println!("\njoin tokens:");
            let rows: Vec<Vec<String>> = l
                .tokens
                .iter()
                .map(|t| {
                    vec![
                        t.id.clone(),
                        t.role.clone(),
                        dash(&t.name),
                        dash(&t.group),
                        t.uses_left.to_string(),
                        t.expires.clone(),
                        t.created_by.clone(),
                    ]
                })
                .collect();
            table(&["ID", "ROLE", "NAME", "GROUP", "USES LEFT", "EXPIRES", "BY"], &rows);
        }
    });
}

/// Shows the listing a call answered with, or says why it failed.
fn show_reply(
    ctx: &Ctx,
    reply: Result<tonic::Response<ListCertificatesResponse>, tonic::Status>,
) -> anyhow::Result<()> {
    show_listing(ctx, &listing(reply.map_err(ctx.failed())?.into_inner()));
    Ok(())
}

fn span(secs: i64) -> String {
    match secs {
        ..=0 => "0s".into(),
        1..=3599 => format!("{}m", secs / 60),
        3600..=86_399 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

pub async fn run(ctx: &Ctx, cmd: PkiCmd) -> anyhow::Result<()> {
    match cmd {
        PkiCmd::Init { dir, name } => {
            let ca = Ca { ca: updraft_runtime::tls::pki::init(&dir, &name)? };
            ctx.show(&ca, |c| {
                println!("created CA {} (its key, {}, stays with you)", c.ca.display(), dir.join("ca.key").display())
            });
        }
        PkiCmd::Issue { name, role, dir, san, days, lifetime } => {
            let role: updraft_runtime::tls::Role = role.parse()?;
            if !(1..=3650).contains(&days) {
                bail!("--days must be 1-3650, got {days}");
            }
            let valid = lifetime.unwrap_or(Duration::from_secs(u64::from(days) * 86_400));
            if valid < Duration::from_secs(2) || valid > Duration::from_secs(3650 * 86_400) {
                bail!("--lifetime must be 2 s to 10 years");
            }
            // Valid from a little before now (clocks behind ours), at most half the lifetime.
            let skew = (valid / 2).min(Duration::from_secs(300));
            let now = time::OffsetDateTime::now_utc() - time::Duration::seconds(skew.as_secs() as i64);
            let valid = valid + skew;
            let (cert, key) = updraft_runtime::tls::pki::issue(&dir, role, &name, &san, now, valid, &dir.join(&name))?;
            let issued = Issued { cert, key, role: role.as_str(), name };
            ctx.show(&issued, |i| {
                println!("issued {} and {} ({} {})", i.cert.display(), i.key.display(), i.role, i.name)
            });
        }
        PkiCmd::Rotate { dir, introduce, promote, retire: _, name } => {
            use updraft_runtime::tls::pki::Rotation;
            let step = match (introduce, promote) {
                (true, _) => Rotation::Introduce,
                (_, true) => Rotation::Promote,
                _ => Rotation::Retire,
            };
            let done = Step { done: updraft_runtime::tls::pki::rotate(&dir, step, &name)? };
            ctx.show(&done, |d| println!("{}", d.done));
        }
        PkiCmd::Token { role, name, group, uses, expires } => {
            let t = ctx
                .admin()
                .await?
                .create_join_token(CreateJoinTokenRequest {
                    role,
                    name: name.unwrap_or_default(),
                    group: group.unwrap_or_default(),
                    uses,
                    expires_in_secs: expires.as_secs(),
                })
                .await
                .map_err(ctx.failed())?
                .into_inner();
            let token = Token {
                token: t.token,
                id: t.id,
                role: t.role,
                name: t.name,
                group: t.group,
                uses: t.uses_left,
                expires: when(t.expires_unix_ms),
            };
            ctx.show(&token, |t| {
                println!("{}", t.token);
                eprintln!(
                    "join token {} for the {} role{}, {} use(s), valid until {}: shown once, keep it secret",
                    t.id,
                    t.role,
                    if t.name.is_empty() { String::new() } else { format!(" as {}", t.name) },
                    t.uses,
                    t.expires
                );
            });
        }
        // Each answers with the listing as it is afterwards.
        PkiCmd::List { expired } => {
            let r = ctx.admin().await?.list_certificates(ListCertificatesRequest { include_expired: expired }).await;
            show_reply(ctx, r)?;
        }
        PkiCmd::Approve { name } => {
            show_reply(ctx, ctx.admin().await?.approve_enrollment(ApproveEnrollmentRequest { name }).await)?;
        }
        PkiCmd::Revoke { name_or_serial } => {
            let r = ctx.admin().await?.revoke_certificate(RevokeCertificateRequest { name_or_serial }).await;
            show_reply(ctx, r)?;
        }
    }
    Ok(())
}
