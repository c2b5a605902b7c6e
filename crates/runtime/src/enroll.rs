//! A host's side of its certificate. Enrolling (`agent enroll`, `remote-provider enroll`): a key
//! made here and never sent anywhere, a request signed with it, and the certificate the
//! provider's CA signs for it (for a join token, or once an administrator approved), written
//! where the program finds it by default ([`Paths::enrolled`]). Renewing ([`renew_loop`]): after
//! two thirds of the certificate's life, over the host's own mutual-TLS connection, the new
//! certificate (and the CA bundle that came with it) checked and put in force without a
//! restart.
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use updraft_proto::v1::enrollment_client::EnrollmentClient;
use updraft_proto::v1::{EnrollRequest, RenewRequest};

use crate::TracedChannel;
use crate::tls::{Credentials, Paths, Role, Tls, TlsError, file_err, pki};

/// What a host asks for when it enrolls.
#[derive(Debug, Clone)]
pub struct Enrollment {
    /// The provider (or site) URL, `https://…`.
    pub provider: String,
    /// The CA certificate the provider's must be signed by (from the administrator).
    pub ca: PathBuf,
    /// A join token (`admin-cli pki token`); none: wait for `admin-cli pki approve NAME`.
    pub token: Option<String>,
    pub name: String,
    pub role: Role,
    /// Host names and addresses a site is reached at.
    pub sans: Vec<String>,
    /// Where the credentials go ([`Paths::enrolled`]).
    pub dir: PathBuf,
    /// How long to wait for an administrator's approval.
    pub wait: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("{0}: {1}")]
    Refused(String, String),
    #[error(
        "no approval yet: the request for {0:?} waits at the provider (`admin-cli pki approve {0}`); run this again to collect the certificate"
    )]
    Pending(String),
}

/// Enrolls (see the module's header). Returns where the credentials are.
pub async fn enroll(e: &Enrollment, on_waiting: impl Fn()) -> Result<Paths, EnrollError> {
    let paths = Paths::enrolled(&e.dir);
    if paths.cert.exists() {
        return Err(file_err(
            &paths.cert,
            "exists: this host is enrolled already (remove the directory to enroll again)",
        )
        .into());
    }
    // A key from an earlier attempt (one that waited for approval) is the one asked for.
    let key_pem = match std::fs::read(&paths.key) {
        Ok(k) => k,
        Err(_) => {
            let (_, key) = pki::request(&e.name)?;
            pki::write_new_key(&paths.key, &key)?;
            key.into_bytes()
        }
    };
    let csr_pem = pki::request_with_key(&key_pem, &e.name)?;
    let ca_pem = std::fs::read(&e.ca).map_err(|err| file_err(&e.ca, err))?;
    let endpoint = Endpoint::from_shared(e.provider.clone())
        .map_err(|err| TlsError::Config(format!("provider URL {:?}: {err}", e.provider)))?;
    if endpoint.uri().scheme_str() != Some("https") {
        return Err(
            TlsError::Config(format!("{}: enrollment is over TLS; the URL starts with https://", e.provider)).into()
        );
    }
    let endpoint = endpoint
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca_pem)))
        .map_err(|err| TlsError::Config(err.to_string()))?
        .timeout(Duration::from_secs(60));
    let refused = |s: tonic::Status| EnrollError::Refused(e.provider.clone(), s.message().to_string());
    let channel = crate::tls::connect_within(endpoint, Duration::from_secs(10))
        .await
        .map_err(|err| EnrollError::Refused(e.provider.clone(), err))?;
    let mut client = EnrollmentClient::new(channel);
    let request = EnrollRequest {
        token: e.token.clone().unwrap_or_default(),
        csr_pem,
        name: e.name.clone(),
        role: e.role.as_str().into(),
        sans: e.sans.clone(),
    };
    let started = std::time::Instant::now();
    let reply = loop {
        let reply = client.enroll(request.clone()).await.map_err(refused)?.into_inner();
        if !reply.pending {
            break reply;
        }
        if started.elapsed() >= e.wait {
            return Err(EnrollError::Pending(e.name.clone()));
        }
        on_waiting();
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    // Checked before anything is written: ours, for our key, from a CA in the bundle.
    Credentials::check(reply.ca_bundle_pem.as_bytes(), reply.certificate_pem.as_bytes(), &key_pem, &paths)?;
    crate::tls::write_file(&paths.ca, reply.ca_bundle_pem.as_bytes())?;
    crate::tls::write_file(&paths.cert, reply.certificate_pem.as_bytes())?;
    Ok(paths)
}

/// Enrolls as the `enroll` commands do: says once that the request waits for an administrator,
/// and prints what was issued (a line, or a JSON object).
pub async fn enroll_command(e: &Enrollment, json: bool) -> Result<(), EnrollError> {
    let waiting = std::sync::Once::new();
    let paths =
        enroll(e, || waiting.call_once(|| eprintln!("waiting for an administrator: admin-cli pki approve {}", e.name)))
            .await?;
    let c = Tls::load(paths.clone())?.current();
    let until = crate::utc_text(c.not_after * 1000);
    if json {
        let v = serde_json::json!({"name": c.me.name, "serial": c.serial, "not_after": until,
            "certificate": paths.cert, "key": paths.key, "ca": paths.ca});
        println!("{v}");
    } else {
        println!(
            "enrolled as {} (certificate {}, valid until {until}); key {}",
            c.me.name,
            c.serial,
            paths.key.display()
        );
    }
    Ok(())
}

/// When a certificate is renewed: two thirds into its life.
pub fn renewal_due(c: &Credentials) -> SystemTime {
    let life = (c.not_after - c.not_before).max(0) as u64;
    UNIX_EPOCH + Duration::from_secs(c.not_before.max(0) as u64) + Duration::from_millis(life * 2000 / 3)
}

/// Renews the certificate in `tls` whenever it is due, for as long as `stop` is not cancelled:
/// a request with our key over a channel `connect` opens (to any provider of ours), the answer
/// checked and put in force ([`Tls::install_renewal`]). A failed attempt is retried soon (an
/// eighth of the time left, between 1 s and 5 min), and counted in
/// `updraft.tls.renewals{outcome}`. With `bundle_keys` (an agent's pinned catalog keys), a new
/// CA bundle is taken only with a signature by one of them; otherwise the bundle in use stays,
/// and the new certificate must verify against it.
pub async fn renew_loop<F, Fut>(
    tls: Arc<Tls>,
    sans: Vec<String>,
    bundle_keys: Vec<updraft_core::keys::PublicKey>,
    connect: F,
    stop: CancellationToken,
) where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<TracedChannel, String>>,
{
    let renewals = crate::metrics::meter()
        .u64_counter("updraft.tls.renewals")
        .with_description("Certificate renewals, by outcome (renewed, failed)")
        .build();
    register_renewal_metric(&tls);
    let mut retry_at: Option<SystemTime> = None;
    loop {
        let c = tls.current();
        let due = retry_at.unwrap_or_else(|| renewal_due(&c)).max(SystemTime::now());
        // Wake at least every minute: a reload (SIGHUP) may have brought another certificate.
        let wait = due.duration_since(SystemTime::now()).unwrap_or_default().min(Duration::from_secs(60));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        if SystemTime::now() < due || tls.current().serial != c.serial {
            continue;
        }
        match renew_once(&tls, &c, &sans, &bundle_keys, &connect).await {
            Ok(serial) => {
                tracing::info!(%serial, "certificate renewed");
                renewals.add(1, &[opentelemetry::KeyValue::new("outcome", "renewed")]);
                retry_at = None;
            }
            Err(e) => {
                renewals.add(1, &[opentelemetry::KeyValue::new("outcome", "failed")]);
                let left = (c.not_after - now_secs()).max(0) as u64;
                let again = Duration::from_secs(left / 8).clamp(Duration::from_secs(1), Duration::from_secs(300));
                tracing::warn!(error = %e, retry_in = ?again, expires_in_secs = left, "certificate renewal failed");
                retry_at = Some(SystemTime::now() + again);
            }
        }
    }
}

/// Seconds until our certificate's renewal is due, negative once overdue, as the gauge
/// `updraft.tls.certificate.renewal_due` (labelled like `updraft.tls.certificate.expiry`'s
/// `own`): exported by programs that renew, so an alert on a near expiry can leave out those
/// whose renewal is on time.
pub fn register_renewal_metric(tls: &Arc<Tls>) {
    let tls = Arc::downgrade(tls);
    crate::metrics::meter()
        .i64_observable_gauge("updraft.tls.certificate.renewal_due")
        .with_unit("s")
        .with_description("Seconds until the certificate's renewal is due (negative once overdue)")
        .with_callback(move |o| {
            let Some(tls) = tls.upgrade() else { return };
            let c = tls.current();
            let due = renewal_due(&c).duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
            o.observe(
                due - now_secs(),
                &[
                    opentelemetry::KeyValue::new("certificate", "own"),
                    opentelemetry::KeyValue::new("name", c.me.name.clone()),
                    opentelemetry::KeyValue::new("role", c.me.role.as_str()),
                ],
            );
        })
        .build();
}

fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

async fn renew_once<F, Fut>(
    tls: &Tls,
    c: &Credentials,
    sans: &[String],
    bundle_keys: &[updraft_core::keys::PublicKey],
    connect: &F,
) -> Result<String, String>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<TracedChannel, String>>,
{
    let csr_pem = pki::request_with_key(c.identity_pem().1, &c.me.name).map_err(|e| e.to_string())?;
    let channel = connect().await?;
    let reply = EnrollmentClient::new(channel)
        .renew(RenewRequest { csr_pem, on_behalf_of: vec![], sans: sans.to_vec() })
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    let bundle = match vouched_bundle(bundle_keys, reply.ca_bundle_pem.as_bytes(), &reply.ca_bundle_signature) {
        Ok(()) => reply.ca_bundle_pem.as_bytes(),
        Err(why) => {
            if reply.ca_bundle_pem.as_bytes() != c.ca_pem() {
                tracing::warn!(%why, "the CA bundle that came with the certificate is not taken; the one in use stays");
            }
            c.ca_pem()
        }
    };
    tls.install_renewal(bundle, reply.certificate_pem.as_bytes()).map_err(|e| e.to_string())?;
    Ok(reply.serial)
}

/// Whether a CA bundle may be taken: no keys pinned (nothing to check it with), or a signature
/// by one of them.
fn vouched_bundle(keys: &[updraft_core::keys::PublicKey], bundle: &[u8], signature: &[u8]) -> Result<(), String> {
    if keys.is_empty() {
        return Ok(());
    }
    let mut why = "no signature by the centre's catalog key".to_string();
    for k in keys {
        match k.verify_ca_bundle(bundle, signature) {
            Ok(()) => return Ok(()),
            Err(e) if !signature.is_empty() => why = e.to_string(),
            Err(_) => {}
        }
    }
    Err(why)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_bundle_is_taken_only_with_the_centres_signature_when_keys_are_pinned() {
        let centre = updraft_core::keys::ReleaseKey::generate().unwrap();
        let other = updraft_core::keys::ReleaseKey::generate().unwrap();
        let bundle = b"-----BEGIN CERTIFICATE-----\n...\n-----END CERTIFICATE-----\n";
        let signed = centre.sign_ca_bundle(bundle);
        assert!(vouched_bundle(&[], bundle, &[]).is_ok(), "nothing pinned: nothing to check with");
        assert!(vouched_bundle(&[centre.public()], bundle, &signed).is_ok());
        assert!(vouched_bundle(&[centre.public()], bundle, &[]).is_err(), "unsigned");
        assert!(vouched_bundle(&[centre.public()], bundle, &other.sign_ca_bundle(bundle)).is_err(), "another key");
        assert!(vouched_bundle(&[centre.public()], b"another bundle", &signed).is_err(), "changed on the way");
        // A manifest or statement signature is not a bundle signature (domain separation).
        assert!(vouched_bundle(&[centre.public()], bundle, &centre.sign_statement(bundle)).is_err());
    }
}
