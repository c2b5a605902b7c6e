//! Certificates at the centre. The provider that holds the CA (`--pki-dir DIR`, made by
//! `admin-cli pki init`) signs hosts' own requests — for a join token, after an administrator's
//! approval, or to renew a certificate still in use — so no private key leaves the host that
//! uses it; records every certificate it issued (`admin-cli pki list`); and keeps the trust
//! record every tier enforces: the CA bundle and the CA's signed revocation list, a logged
//! change that sites receive in the catalog stream (see [`apply_trust`]).
//!
//! A site never signs: it passes its agents' requests on (`SiteTier`), and a renewal it passes
//! on carries the agent's current certificate, which the centre checks it issued, to that name,
//! unrevoked, for a machine the site may speak for.
use std::path::PathBuf;
use std::time::Duration;

use sha2::Digest;
use updraft_proto::v1::{
    CertificateReply, CreateJoinTokenRequest, EnrollRequest, IssuedCertificate, JoinToken, ListCertificatesResponse,
    PendingEnrollment, RenewRequest, Trust,
};
use updraft_runtime::tls::pki::{Ca, CertInfo, Request, Signed};
use updraft_runtime::tls::{Role, Transport};

use crate::auth::Caller;
use crate::error::{ProviderError, Result};
use crate::{Shared, now_ms};

/// Where the CA is and how long what it signs lasts.
#[derive(Debug, Clone)]
pub struct PkiConfig {
    /// Holds `ca.crt` and `ca.key`, and optionally `trusted.crt`: more CAs every tier trusts
    /// (one being introduced or retired).
    pub dir: PathBuf,
    /// Validity of an agent's or site's certificate (default 30 days).
    pub lifetime: Duration,
}

use updraft_runtime::tls::pki::EXTRA_TRUST;

/// How often the centre looks at its CA directory (a rotation step taken there is in force
/// within this) and at its own certificate.
pub const TRUST_REFRESH: Duration = Duration::from_secs(5);
/// A join token's default life, and the longest.
pub const TOKEN_LIFE: Duration = Duration::from_secs(24 * 3600);
pub const MAX_TOKEN_LIFE: Duration = Duration::from_secs(365 * 24 * 3600);
/// Enrollment requests waiting from one address at most (the total is bounded by the store).
pub const PENDING_PER_ADDRESS: usize = 20;
/// How long the record of an expired certificate is kept.
const KEEP_EXPIRED: Duration = Duration::from_secs(30 * 24 * 3600);

fn config(shared: &Shared) -> Result<&PkiConfig> {
    shared.config.pki.as_ref().ok_or_else(|| {
        ProviderError::Precondition(
            "this provider issues no certificates: start it with --pki-dir DIR (the CA from `admin-cli pki init`)"
                .into(),
        )
    })
}

fn ca(shared: &Shared) -> Result<Ca> {
    // Read at each use: a CA rotated on disk takes effect without a restart.
    Ca::load(&config(shared)?.dir).map_err(|e| ProviderError::Precondition(format!("the CA: {e}")))
}

fn bad(e: impl std::fmt::Display) -> ProviderError {
    ProviderError::InvalidArgument(e.to_string())
}

/// The CA bundle every tier trusts: the issuing CA, then the extra ones (a rotation's), each
/// once.
fn bundle(shared: &Shared, ca: &Ca) -> Result<String> {
    let extra = config(shared)?.dir.join(EXTRA_TRUST);
    let more = match std::fs::read_to_string(&extra) {
        Ok(more) => more,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(ProviderError::Precondition(format!("{}: {e}", extra.display()))),
    };
    let mut seen = Vec::new();
    let mut pem = String::new();
    for (i, block) in updraft_runtime::tls::pem_blocks(&format!("{}\n{more}", ca.cert_pem())).into_iter().enumerate() {
        let Some(der) = updraft_runtime::tls::pem_der(block.as_bytes()) else { continue };
        if i > 0 {
            CertInfo::of_der(&der).map_err(|e| ProviderError::Precondition(format!("{}: {e}", extra.display())))?;
        }
        if !seen.contains(&der) {
            pem.push_str(&block);
            seen.push(der);
        }
    }
    Ok(pem)
}

/// A new join token (`admin-cli pki token`): its secret is in the reply only.
pub async fn create_token(shared: &Shared, who: &str, mut req: CreateJoinTokenRequest) -> Result<JoinToken> {
    config(shared)?;
    let role = enrollable_role(&req.role)?;
    if !req.name.is_empty() {
        check_name(&req.name)?;
    }
    if !req.group.is_empty() && role != Role::Agent {
        return Err(bad("--group is for agents' tokens"));
    }
    if req.group == crate::store::DEFAULT_GROUP {
        req.group.clear(); // where every machine is unless assigned elsewhere
    }
    if !req.group.is_empty() && shared.store.get_group(&req.group)?.is_none() {
        return Err(ProviderError::NotFound(format!("no group {:?}", req.group)));
    }
    let life = match req.expires_in_secs {
        0 => TOKEN_LIFE,
        s => Duration::from_secs(s),
    };
    if life > MAX_TOKEN_LIFE {
        return Err(bad(format!("a join token lives at most {} days", MAX_TOKEN_LIFE.as_secs() / 86_400)));
    }
    if !req.name.is_empty() && req.uses > 1 {
        return Err(bad("a token for one name is used once"));
    }
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| ProviderError::Io(format!("no randomness for a token: {e}")))?;
    let token = hex::encode(secret);
    let hash = sha2::Sha256::digest(token.as_bytes()).to_vec();
    let stored = JoinToken {
        token: String::new(),
        id: hex::encode(&hash[..6]),
        role: role.as_str().into(),
        name: req.name,
        group: req.group,
        uses_left: req.uses.max(1),
        expires_unix_ms: now_ms().saturating_add(life.as_millis() as i64),
        created_by: who.to_string(),
        secret_sha256: hash,
    };
    shared.store.put_token(&stored).await?;
    Ok(JoinToken { token, secret_sha256: vec![], ..stored })
}

fn check_name(name: &str) -> Result<()> {
    updraft_runtime::tls::pki::check_name(name).map_err(bad)
}

/// Enrollment gives agents and sites their certificates; providers and administrators get
/// theirs from `admin-cli pki issue`.
fn enrollable_role(role: &str) -> Result<Role> {
    match role.parse::<Role>() {
        Ok(r @ (Role::Agent | Role::RemoteProvider)) => Ok(r),
        _ => Err(bad(format!("role {role:?}: enrollment is for agent or remote-provider"))),
    }
}

/// Puts the bundle of `ca` (the one a certificate is about to come from, as read from disk
/// now) in force on this provider's own servers before anyone holds such a certificate. The
/// trust loop follows a rotation step only every [`TRUST_REFRESH`]: without this, a machine
/// renewed by the new CA just after the step was refused here until the loop caught up.
/// Fails, issuing nothing, while this provider's own certificate is not from a CA of that
/// bundle (the loop re-issues it within one refresh). Returns that bundle, which the reply
/// carries.
fn trusted_here(shared: &Shared, ca: &Ca) -> Result<String> {
    let pem = bundle(shared, ca)?;
    let Transport::Tls(tls) = &shared.config.transport else { return Ok(pem) };
    if tls
        .install_bundle(pem.as_bytes())
        .map_err(|e| ProviderError::NotReady(format!("the CA bundle to issue from: {e}")))?
    {
        tracing::info!("the CA bundle changed: now in force (before issuing from it)");
    }
    Ok(pem)
}

/// Signs `request` for `name` and records the certificate.
async fn issue(
    shared: &Shared,
    ca: &Ca,
    request: &Request,
    role: Role,
    name: &str,
    sans: &[String],
    how: String,
) -> Result<Signed> {
    let life = config(shared)?.lifetime;
    // Allowance for clocks a little behind ours: a minute, or half the life of a short one.
    let skew = Duration::from_secs(60).min(life / 2);
    let from = time::OffsetDateTime::now_utc() - time::Duration::seconds(skew.as_secs() as i64);
    let sans: &[String] = if role.serves() { sans } else { &[] };
    let signed = ca.sign(request, role, name, sans, from, life + skew).map_err(bad)?;
    shared
        .store
        .put_certificate(&IssuedCertificate {
            serial: signed.serial.clone(),
            name: name.into(),
            role: role.as_str().into(),
            not_before_unix_ms: signed.not_before * 1000,
            not_after_unix_ms: signed.not_after * 1000,
            issued_unix_ms: now_ms(),
            how: how.clone(),
            ca: ca.fingerprint().into(),
            ..Default::default()
        })
        .await?;
    tracing::info!(%name, %role, serial = %signed.serial, %how, "certificate issued");
    Ok(signed)
}

/// The answer to an enrollment or renewal: the certificate and the CA `bundle` it was issued
/// under (see [`trusted_here`]).
fn reply(shared: &Shared, bundle: String, signed: Signed) -> Result<CertificateReply> {
    // Signed with the catalog key agents pin, so no site between can add a CA to their trust.
    let ca_bundle_signature =
        shared.config.catalog_key.as_ref().map(|k| k.sign_ca_bundle(bundle.as_bytes()).to_vec()).unwrap_or_default();
    Ok(CertificateReply {
        pending: false,
        certificate_pem: signed.pem,
        ca_bundle_pem: bundle,
        not_after_unix_ms: signed.not_after * 1000,
        serial: signed.serial,
        ca_bundle_signature,
    })
}

/// A first certificate: for a join token at once, or once an administrator approved it.
pub async fn enroll(
    shared: &Shared,
    req: EnrollRequest,
    from: Option<std::net::SocketAddr>,
) -> Result<CertificateReply> {
    let ca = ca(shared)?;
    let request = Request::parse(&req.csr_pem).map_err(bad)?;
    if req.sans.len() > 32 {
        return Err(bad("at most 32 host names and addresses"));
    }
    if !req.token.is_empty() {
        let hash = sha2::Sha256::digest(req.token.trim().as_bytes()).to_vec();
        let id = hex::encode(&hash[..6]);
        let token = shared.store.take_token(&id, &hash, now_ms()).await?;
        let role = enrollable_role(&token.role)?;
        if !req.role.is_empty() && req.role != token.role {
            return Err(ProviderError::Denied(format!(
                "the join token is for the {} role, not {}",
                token.role, req.role
            )));
        }
        let name = if token.name.is_empty() { req.name.clone() } else { token.name.clone() };
        check_name(&name)?;
        let bundle = trusted_here(shared, &ca)?;
        let signed = issue(shared, &ca, &request, role, &name, &req.sans, format!("token {}", token.id)).await?;
        if !token.group.is_empty() {
            let a = updraft_proto::v1::Assignment { machine: name.clone(), group: token.group.clone() };
            shared.store.assign(&a).await?;
        }
        return reply(shared, bundle, signed);
    }
    // Without a token: the request waits for an administrator.
    let role = enrollable_role(&req.role)?;
    check_name(&req.name)?;
    if let Some(p) = shared.store.enrollment(&req.name)? {
        if p.key_sha256 != request.key_sha256 {
            return Err(ProviderError::Denied(format!(
                "another key's enrollment request for {:?} is waiting; an administrator decides (`admin-cli pki list`)",
                req.name
            )));
        }
        if p.certificate_pem.is_empty() {
            return Ok(CertificateReply { pending: true, ..Default::default() });
        }
        shared.store.remove_enrollment(&req.name).await?;
        let info = CertInfo::of_pem(p.certificate_pem.as_bytes()).map_err(bad)?;
        return reply(
            shared,
            bundle(shared, &ca)?,
            Signed {
                pem: p.certificate_pem,
                serial: info.serial,
                not_before: info.not_before,
                not_after: info.not_after,
            },
        );
    }
    let address = from.map(|a| a.ip().to_string()).unwrap_or_default();
    let from_there = shared.store.enrollments()?.iter().filter(|p| p.address == address).count();
    if from_there >= PENDING_PER_ADDRESS {
        return Err(ProviderError::LimitReached(format!(
            "{from_there} enrollment requests from {address} wait already; an administrator decides first"
        )));
    }
    shared
        .store
        .put_enrollment(&PendingEnrollment {
            name: req.name.clone(),
            role: role.as_str().into(),
            csr_pem: req.csr_pem,
            requested_unix_ms: now_ms(),
            address,
            key_sha256: request.key_sha256,
            sans: req.sans,
            ..Default::default()
        })
        .await?;
    tracing::info!(name = %req.name, %role, "enrollment request waiting for approval");
    Ok(CertificateReply { pending: true, ..Default::default() })
}

/// Signs a waiting request (`admin-cli pki approve NAME`); the host collects the certificate
/// with its next request.
pub async fn approve(shared: &Shared, who: &str, name: &str) -> Result<ListCertificatesResponse> {
    let ca = ca(shared)?;
    let Some(mut p) = shared.store.enrollment(name)? else {
        return Err(ProviderError::NotFound(format!("no enrollment request from {name:?} is waiting")));
    };
    if !p.certificate_pem.is_empty() {
        return Err(bad(format!("{name:?} was approved already (by {})", p.approved_by)));
    }
    let request = Request::parse(&p.csr_pem).map_err(bad)?;
    let role = enrollable_role(&p.role)?;
    trusted_here(shared, &ca)?;
    let signed = issue(shared, &ca, &request, role, name, &p.sans, format!("approved by {who}")).await?;
    p.certificate_pem = signed.pem;
    p.approved_by = who.into();
    shared.store.put_enrollment(&p).await?;
    list(shared, false).await
}

/// A new certificate for the caller's own name and role (or, from a site, for one of its
/// agents: see the module's header).
pub async fn renew(shared: &Shared, caller: &Caller, req: RenewRequest) -> Result<CertificateReply> {
    let ca = ca(shared)?;
    let request = Request::parse(&req.csr_pem).map_err(bad)?;
    let denied = |m: String| ProviderError::Denied(m);
    let (name, role, how) = if !req.on_behalf_of.is_empty() {
        if caller.role != Some(Role::RemoteProvider) {
            return Err(denied(format!("{} may not renew for another holder", caller.describe())));
        }
        let info = CertInfo::of_der(&req.on_behalf_of).map_err(bad)?;
        let known = shared.store.certificate(&info.serial)?;
        let ok = known.as_ref().is_some_and(|c| {
            c.name == info.name
                && c.role == Role::Agent.as_str()
                && c.revoked_unix_ms == 0
                && c.not_after_unix_ms > now_ms()
        });
        if !ok || info.role != Some(Role::Agent) {
            return Err(denied(format!(
                "site {}: the certificate it renews for {:?} is not a current agent certificate this provider issued",
                caller.name, info.name
            )));
        }
        let machine = shared.store.get_machine(&info.name)?;
        if !crate::replication::site_may_report(machine.as_ref(), &caller.name, &shared.silence()) {
            return Err(denied(format!("site {} may not speak for machine {:?}", caller.name, info.name)));
        }
        (info.name, Role::Agent, format!("renewal via {}", caller.name))
    } else {
        match caller.role {
            Some(r @ (Role::Agent | Role::RemoteProvider | Role::Admin)) => {
                (caller.name.clone(), r, "renewal".to_string())
            }
            // A provider renewing itself (a pair's standby), not one forwarding for another.
            Some(Role::Provider) if caller.via.is_none() => {
                (caller.name.clone(), Role::Provider, "renewal".to_string())
            }
            _ => return Err(denied(format!("{} renews no certificate here", caller.describe()))),
        }
    };
    let bundle = trusted_here(shared, &ca)?;
    let signed = issue(shared, &ca, &request, role, &name, &req.sans, how).await?;
    reply(shared, bundle, signed)
}

/// Revokes the certificate with serial `what`, or every unexpired one of the name `what`; the
/// trust record (and so every tier) follows at once.
pub async fn revoke(shared: &Shared, who: &str, what: &str) -> Result<ListCertificatesResponse> {
    config(shared)?;
    let now = now_ms();
    let certs = shared.store.all_certificates()?;
    let hit: Vec<IssuedCertificate> = certs
        .into_iter()
        .filter(|c| c.not_after_unix_ms > now)
        .filter(|c| c.revoked_unix_ms == 0 && (c.serial == what.to_lowercase() || c.name == what))
        .collect();
    if hit.is_empty() {
        return Err(ProviderError::NotFound(format!(
            "no unrevoked, unexpired certificate is named or numbered {what:?}"
        )));
    }
    for mut c in hit {
        c.revoked_unix_ms = now;
        c.revoked_by = who.into();
        shared.store.put_certificate(&c).await?;
        tracing::warn!(name = %c.name, serial = %c.serial, by = %who, "certificate revoked");
    }
    refresh_trust(shared).await?;
    list(shared, false).await
}

/// Each name's newest certificate the centre issued (none without a CA: nothing is known).
pub fn newest_by_name(shared: &Shared) -> Result<std::collections::HashMap<String, IssuedCertificate>> {
    let mut out: std::collections::HashMap<String, IssuedCertificate> = Default::default();
    if shared.config.pki.is_none() {
        return Ok(out);
    }
    for c in shared.store.all_certificates()? {
        match out.get(&c.name) {
            Some(have) if have.not_after_unix_ms >= c.not_after_unix_ms => {}
            _ => {
                out.insert(c.name.clone(), c);
            }
        }
    }
    Ok(out)
}

/// Flags a machine whose newest certificate expires within 14 days, failed to renew, expired or
/// was revoked (`updraft_core::policy::certificate_health`): a note, and its status at least as
/// bad as that says.
pub fn flag(m: &mut updraft_proto::v1::Machine, newest: Option<&IssuedCertificate>, now_ms: i64) {
    use updraft_core::policy::Health;
    let Some(c) = newest else { return };
    let Some((health, note)) =
        updraft_core::policy::certificate_health(now_ms, c.not_before_unix_ms, c.not_after_unix_ms, c.revoked_unix_ms)
    else {
        return;
    };
    let current = match m.status.as_str() {
        "error" => Health::Error,
        "needs-attention" => Health::NeedsAttention,
        _ => Health::UpToDate,
    };
    m.status = current.min(health).as_str().into();
    m.notes.push(note);
}

/// What `admin-cli pki list` shows.
pub async fn list(shared: &Shared, include_expired: bool) -> Result<ListCertificatesResponse> {
    config(shared)?;
    let now = now_ms();
    let keep_after = now - KEEP_EXPIRED.as_millis() as i64;
    let mut certificates = shared.store.certificates(keep_after).await?;
    if !include_expired {
        certificates.retain(|c| c.not_after_unix_ms > now);
    }
    {
        let last = shared.cert_uses.lock().expect("certificate uses");
        for c in &mut certificates {
            if let Some(at) = last.get(&c.serial) {
                c.last_used_unix_ms = c.last_used_unix_ms.max(*at);
            }
        }
    }
    certificates.sort_by(|a, b| a.name.cmp(&b.name).then(a.not_after_unix_ms.cmp(&b.not_after_unix_ms)));
    let mut pending = shared.store.enrollments()?;
    for p in &mut pending {
        p.csr_pem.clear();
        p.certificate_pem.clear();
    }
    let tokens =
        shared.store.tokens(now).await?.into_iter().map(|t| JoinToken { secret_sha256: vec![], ..t }).collect();
    Ok(ListCertificatesResponse { certificates, pending, tokens })
}

/// Makes the trust record current (the CA bundle, and the revocation list of every
/// unexpired revoked certificate), stores it when it changed (sites receive it), and puts it in
/// force here. Run when the centre starts and after every revocation.
pub async fn refresh_trust(shared: &Shared) -> Result<()> {
    let ca = ca(shared)?;
    let now = now_ms();
    // Revoked and not expired: an expired certificate is refused anyway.
    let revoked: Vec<(String, i64)> = shared
        .store
        .all_certificates()?
        .into_iter()
        .filter(|c| c.revoked_unix_ms != 0 && c.not_after_unix_ms > now)
        .map(|c| (c.serial, c.revoked_unix_ms))
        .collect();
    let bundle = bundle(shared, &ca)?;
    let previous = Ca::load_previous(&config(shared)?.dir).map_err(|e| ProviderError::Precondition(e.to_string()))?;
    let stored = shared.store.trust()?;
    let same_revocations = stored.as_ref().is_some_and(|t| {
        let mut listed: Vec<String> =
            t.crls_der.iter().flat_map(|c| updraft_runtime::tls::revoked_serials(c)).collect();
        let mut want: Vec<String> = revoked.iter().map(|(s, _)| s.clone()).collect();
        listed.sort();
        listed.dedup();
        want.sort();
        listed == want && t.crls_der.len() == 1 + usize::from(previous.is_some())
    });
    let trust = match stored {
        Some(t) if same_revocations && t.ca_bundle_pem == bundle => t,
        _ => {
            // One list per CA whose certificates may still be in use, each signed by its CA
            // (a list only speaks for the certificates its signer issued).
            let mut crls_der = vec![ca.revocation_list(&revoked, now as u64).map_err(bad)?];
            if let Some(p) = &previous {
                crls_der.push(p.revocation_list(&revoked, now as u64).map_err(bad)?);
            }
            let t = Trust { ca_bundle_pem: bundle, crls_der };
            shared.store.set_trust(&t).await?;
            t
        }
    };
    apply_trust(&shared.config.transport, &trust);
    Ok(())
}

/// The centre's watch over its CA directory and its own certificate, every [`TRUST_REFRESH`]:
/// the trust record follows a rotation step taken on disk, and the provider's own certificate
/// is renewed by its own CA — after two thirds of its life, or at once when another CA issues
/// now (a rotation's promotion).
pub async fn trust_loop(shared: std::sync::Arc<Shared>, stop: tokio_util::sync::CancellationToken) {
    if let Transport::Tls(tls) = &shared.config.transport {
        updraft_runtime::enroll::register_renewal_metric(tls);
    }
    loop {
        if let Err(e) = refresh_trust(&shared).await {
            tracing::error!(error = %e, "the trust record was not refreshed");
        }
        if let Err(e) = renew_own(&shared).await {
            tracing::error!(error = %e, "this provider's certificate was not renewed");
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(TRUST_REFRESH) => {}
        }
    }
}

/// Renews the provider's own certificate when due (see [`trust_loop`]).
async fn renew_own(shared: &Shared) -> Result<()> {
    let Transport::Tls(tls) = &shared.config.transport else { return Ok(()) };
    let ca = ca(shared)?;
    let current = tls.current();
    let leaf = updraft_runtime::tls::pem_der(current.identity_pem().0)
        .ok_or_else(|| ProviderError::Precondition("this provider's certificate is not PEM".into()))?;
    let due = std::time::SystemTime::now() >= updraft_runtime::enroll::renewal_due(&current);
    if !due && ca.issued(&leaf) {
        return Ok(());
    }
    let info = CertInfo::of_der(&leaf).map_err(bad)?;
    let csr = updraft_runtime::tls::pki::request_with_key(current.identity_pem().1, &current.me.name).map_err(bad)?;
    let request = Request::parse(&csr).map_err(bad)?;
    let how = if due { "renewal of its own" } else { "re-issued by the new CA" };
    let signed = issue(shared, &ca, &request, current.me.role, &current.me.name, &info.sans, how.into()).await?;
    tls.install_renewal(bundle(shared, &ca)?.as_bytes(), signed.pem.as_bytes()).map_err(bad)?;
    Ok(())
}

/// Puts a trust record in force in this process: the CA bundle (written to its CA file) and
/// the revocation lists (a revoked holder's connections close). A record that does not fit
/// (a bundle our own certificate does not verify against, a list no trusted CA signed) is
/// logged and left out; what is in force stays.
pub fn apply_trust(transport: &Transport, trust: &Trust) {
    let Transport::Tls(tls) = transport else { return };
    if !trust.ca_bundle_pem.is_empty() {
        match tls.install_bundle(trust.ca_bundle_pem.as_bytes()) {
            Ok(true) => tracing::info!("the CA bundle changed: now in force"),
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "the CA bundle received is not put in force"),
        }
    }
    match tls.set_crls(trust.crls_der.clone()) {
        Ok(closed) if closed > 0 => tracing::warn!(closed, "revocation list in force: connections closed"),
        Ok(_) => {}
        Err(e) => tracing::error!(error = %e, "the revocation list received is not put in force"),
    }
}
