//! The private CA and the certificates it issues: made on an administrator's disk
//! (`admin-cli pki init`, `pki issue`), or signed from a host's own request by the provider that
//! holds the CA (`provider --pki-dir`), so the host's key never leaves it; the requests hosts
//! make ([`request`]); the CA's signed revocation lists.
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CertificateSigningRequestParams,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber,
};
use sha2::Digest;

use super::{Role, TlsError, file_err};

pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
/// CA certificates trusted besides the issuing one (PEM): during a rotation, the CA being
/// introduced, then the one being retired.
pub const EXTRA_TRUST: &str = "trusted.crt";
/// The CA a rotation introduces (trusted, not yet issuing), and the one it replaced (trusted,
/// no longer issuing; its key signs its revocation list).
pub const NEXT: &str = "next";
pub const PREVIOUS: &str = "previous";

fn write_secret(path: &Path, text: &str) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| file_err(path, e))?;
    f.write_all(text.as_bytes()).and_then(|_| f.sync_all()).map_err(|e| file_err(path, e))
}

fn write_public(path: &Path, text: &str) -> Result<(), TlsError> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(path).map_err(|e| file_err(path, e))?;
    f.write_all(text.as_bytes()).and_then(|_| f.sync_all()).map_err(|e| file_err(path, e))
}

/// Removes `path`; one that is not there is removed already.
fn remove_if_present(path: &Path) -> Result<(), TlsError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(file_err(path, e)),
        _ => Ok(()),
    }
}

fn err(e: rcgen::Error) -> TlsError {
    TlsError::Config(e.to_string())
}

/// Creates a CA in `dir` (ca.crt, and ca.key readable by the owner only). Refuses to
/// replace an existing one.
pub fn init(dir: &Path, name: &str) -> Result<PathBuf, TlsError> {
    std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
    let (crt, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
    if crt.exists() || key_path.exists() {
        return Err(file_err(&crt, "a CA already exists here; it is not replaced"));
    }
    let (cert, key) = new_ca(name)?;
    write_secret(&key_path, &key)?;
    write_public(&crt, &cert)?;
    Ok(crt)
}

/// Which step of a CA rotation (`admin-cli pki rotate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotation {
    /// A new CA next to the current one: trusted everywhere, issuing nothing yet.
    Introduce,
    /// The new CA issues from now on; the old one stays trusted.
    Promote,
    /// The old CA is trusted no more.
    Retire,
}

/// Takes one step of a CA rotation in `dir`; returns what it did. Each step must reach every
/// host (a renewal round: a third of a certificate's life) before the next, so no host ever
/// holds a certificate its peers do not trust: `pki list` shows which CA issued each one.
pub fn rotate(dir: &Path, step: Rotation, name: &str) -> Result<String, TlsError> {
    let path = |stem: &str, ext: &str| dir.join(format!("{stem}.{ext}"));
    let (next_crt, next_key) = (path(NEXT, "crt"), path(NEXT, "key"));
    let (prev_crt, prev_key) = (path(PREVIOUS, "crt"), path(PREVIOUS, "key"));
    let extra = dir.join(EXTRA_TRUST);
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| file_err(p, e));
    match step {
        Rotation::Introduce => {
            Ca::load(dir)?;
            if next_crt.exists() || prev_crt.exists() {
                return Err(file_err(&next_crt, "a rotation is under way already: promote or retire first"));
            }
            // Its own name: certificates are matched to their CA by the issuer's name, so two
            // trusted CAs must not share one.
            let mut tag = [0u8; 4];
            getrandom::fill(&mut tag).map_err(|e| TlsError::Config(format!("no randomness: {e}")))?;
            let (cert, key) = new_ca(&format!("{name} {}", hex::encode(tag)))?;
            write_secret(&next_key, &key)?;
            write_public(&next_crt, &cert)?;
            super::write_file(&extra, cert.as_bytes())?;
            Ok(format!(
                "introduced a new CA ({}): trusted from the next round, issuing nothing yet",
                next_crt.display()
            ))
        }
        Rotation::Promote => {
            if !next_crt.exists() {
                return Err(file_err(&next_crt, "no CA was introduced: `pki rotate --introduce` first"));
            }
            let next = Ca::load_pair(&next_crt, &next_key)?;
            // Each file below is replaced whole, and the step can be taken again from any
            // point it was cut short at (kill -9, a full disk): the old CA is copied aside
            // first (its certificate last, marking the copy whole), and once it is, that copy
            // is the old CA, since ca.key may already hold the new key.
            let old = if prev_crt.exists() {
                Ca::load_pair(&prev_crt, &prev_key)?
            } else {
                let old = Ca::load(dir)?;
                remove_if_present(&prev_key)?;
                write_secret(&prev_key, &read(&dir.join(CA_KEY))?)?;
                write_public(&prev_crt, &old.cert_pem)?;
                old
            };
            // The old CA stays trusted (also in ca.crt, which tools may trust as it is); the
            // new one, first in ca.crt, issues. A provider reading between the key and the
            // certificate finds a pair that does not belong together and reads again later.
            super::write_file(&extra, old.cert_pem.as_bytes())?;
            super::write_file(&dir.join(CA_KEY), read(&next_key)?.as_bytes())?;
            super::write_file(&dir.join(CA_CERT), format!("{}{}", next.cert_pem, old.cert_pem).as_bytes())?;
            for p in [&next_crt, &next_key] {
                std::fs::remove_file(p).map_err(|e| file_err(p, e))?;
            }
            Ok(format!("the new CA ({}) issues from now on; the previous one stays trusted", next.fingerprint))
        }
        Rotation::Retire => {
            if !prev_crt.exists() {
                return Err(file_err(&prev_crt, "no CA to retire: `pki rotate --promote` first"));
            }
            let old = Ca::load_pair(&prev_crt, &prev_key)?;
            let current = Ca::load(dir)?;
            super::write_file(&dir.join(CA_CERT), current.cert_pem.as_bytes())?;
            let (ret_crt, ret_key) = (
                path(&format!("retired-{}", old.fingerprint), "crt"),
                path(&format!("retired-{}", old.fingerprint), "key"),
            );
            std::fs::rename(&prev_key, &ret_key).map_err(|e| file_err(&prev_key, e))?;
            std::fs::rename(&prev_crt, &ret_crt).map_err(|e| file_err(&prev_crt, e))?;
            remove_if_present(&extra)?;
            Ok(format!("retired CA {}: trusted no more from the next round", old.fingerprint))
        }
    }
}

/// A new self-signed CA for ten years: (certificate, key) as PEM.
fn new_ca(name: &str) -> Result<(String, String), TlsError> {
    let key = KeyPair::generate().map_err(err)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationName, "Updraft");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(3650);
    params.serial_number = Some(random_serial()?);
    let cert = params.self_signed(&key).map_err(err)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A positive 16-byte serial number whose first byte is not zero (so its DER form, and the hex
/// every listing shows, is these bytes).
fn random_serial() -> Result<SerialNumber, TlsError> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| TlsError::Config(format!("no randomness for a serial number: {e}")))?;
    b[0] = (b[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from(b.to_vec()))
}

/// The checks every name in a certificate passes.
pub fn check_name(name: &str) -> Result<(), TlsError> {
    if name.is_empty() || name.len() > 64 || name.chars().any(|c| c.is_control() || c == '/') {
        return Err(TlsError::Config(format!("name {name:?} must be 1-64 printable characters, no '/'")));
    }
    Ok(())
}

/// What a certificate for `name` with `role` holds, valid from `valid_from` for `valid_for`.
/// Server roles get `sans` (host names or IP addresses; the name, localhost and 127.0.0.1 when
/// none are given).
fn params_for(
    role: Role,
    name: &str,
    sans: &[String],
    valid_from: time::OffsetDateTime,
    valid_for: Duration,
) -> Result<CertificateParams, TlsError> {
    check_name(name)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationalUnitName, role.as_str());
    dn.push(DnType::OrganizationName, "Updraft");
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    if role.serves() {
        params.extended_key_usages.push(ExtendedKeyUsagePurpose::ServerAuth);
        let defaults = [name.to_string(), "localhost".into(), "127.0.0.1".into()];
        let sans: &[String] = if sans.is_empty() { &defaults } else { sans };
        if sans.len() > 32 {
            return Err(TlsError::Config(format!("{} host names and addresses: at most 32", sans.len())));
        }
        for s in sans {
            params.subject_alt_names.push(match s.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    s.clone().try_into().map_err(|_| TlsError::Config(format!("{s:?} is not a host name")))?,
                ),
            });
        }
    }
    params.not_before = valid_from;
    params.not_after = valid_from + time::Duration::seconds(valid_for.as_secs() as i64);
    params.serial_number = Some(random_serial()?);
    Ok(params)
}

/// A certificate the CA signed: PEM, and what a listing shows of it.
#[derive(Debug, Clone)]
pub struct Signed {
    pub pem: String,
    pub serial: String,
    pub not_before: i64,
    pub not_after: i64,
}

impl Signed {
    fn of(cert: rcgen::Certificate) -> Result<Self, TlsError> {
        let info = CertInfo::of_der(cert.der())?;
        Ok(Signed { pem: cert.pem(), serial: info.serial, not_before: info.not_before, not_after: info.not_after })
    }
}

/// What a certificate says: holder, serial (hex), validity (Unix seconds), the SHA-256 of its
/// public key (hex).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub name: String,
    pub role: Option<Role>,
    pub serial: String,
    pub not_before: i64,
    pub not_after: i64,
    pub key_sha256: String,
    pub issuer: String,
    /// Host names and addresses (a server's).
    pub sans: Vec<String>,
}

impl CertInfo {
    pub fn of_der(der: &[u8]) -> Result<Self, TlsError> {
        let (_, c) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| TlsError::Config(format!("unreadable certificate: {e}")))?;
        let peer = super::peer_of(der).ok();
        let mut sans = Vec::new();
        if let Ok(Some(ext)) = c.subject_alternative_name() {
            for n in &ext.value.general_names {
                match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => sans.push(d.to_string()),
                    x509_parser::extensions::GeneralName::IPAddress(ip) => match ip.len() {
                        4 => {
                            sans.push(std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*ip).expect("4 bytes")).to_string())
                        }
                        16 => sans
                            .push(std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*ip).expect("16 bytes")).to_string()),
                        _ => {}
                    },
                    _ => {}
                }
            }
        }
        Ok(CertInfo {
            sans,
            name: peer.as_ref().map(|p| p.name.clone()).unwrap_or_default(),
            role: peer.map(|p| p.role),
            serial: hex::encode(c.raw_serial()),
            not_before: c.validity().not_before.timestamp(),
            not_after: c.validity().not_after.timestamp(),
            key_sha256: hex::encode(sha2::Sha256::digest(c.public_key().subject_public_key.data.as_ref())),
            issuer: c.issuer().to_string(),
        })
    }

    pub fn of_pem(pem: &[u8]) -> Result<Self, TlsError> {
        Self::of_der(&super::pem_der(pem).ok_or_else(|| TlsError::Config("not a PEM certificate".into()))?)
    }
}

/// A host's request for a certificate: its public key, signed by its private key.
#[derive(Debug, Clone)]
pub struct Request {
    pub(crate) params: CertificateSigningRequestParams,
    /// SHA-256 of the requested public key (hex), to compare with what the host shows.
    pub key_sha256: String,
}

impl Request {
    /// Parses a request (PEM) and checks its signature: whoever sent it holds the key.
    pub fn parse(csr_pem: &str) -> Result<Self, TlsError> {
        if csr_pem.len() > 16 * 1024 {
            return Err(TlsError::Config("the certificate request is larger than 16 KiB".into()));
        }
        let params = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| TlsError::Config(format!("the certificate request is not valid: {e}")))?;
        let key_sha256 = hex::encode(sha2::Sha256::digest(rcgen::PublicKeyData::der_bytes(&params.public_key)));
        Ok(Self { params, key_sha256 })
    }
}

/// A new key (PEM) and a request for a certificate with it (PEM), made on the host that will
/// use it.
pub fn request(name: &str) -> Result<(String, String), TlsError> {
    let key = KeyPair::generate().map_err(err)?;
    Ok((request_for_key(&key, name)?, key.serialize_pem()))
}

/// A request for a new certificate with the key we hold (PEM): a renewal.
pub fn request_with_key(key_pem: &[u8], name: &str) -> Result<String, TlsError> {
    let key = KeyPair::from_pem(&String::from_utf8_lossy(key_pem)).map_err(err)?;
    request_for_key(&key, name)
}

fn request_for_key(key: &KeyPair, name: &str) -> Result<String, TlsError> {
    check_name(name)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.serialize_request(key).map_err(err)?.pem().map_err(err)
}

/// A CA loaded once, to issue many certificates (the provider signing requests, a test
/// harness issuing thousands).
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    fingerprint: String,
}

impl Ca {
    /// The CA in `dir` (ca.crt and ca.key): the one that issues.
    pub fn load(dir: &Path) -> Result<Ca, TlsError> {
        Self::load_pair(&dir.join(CA_CERT), &dir.join(CA_KEY))
    }

    /// The previous CA of a rotation in `dir`, while there is one (its key signs its
    /// revocation list).
    pub fn load_previous(dir: &Path) -> Result<Option<Ca>, TlsError> {
        let crt = dir.join(format!("{PREVIOUS}.crt"));
        if !crt.exists() {
            return Ok(None);
        }
        Self::load_pair(&crt, &dir.join(format!("{PREVIOUS}.key"))).map(Some)
    }

    /// A CA from its certificate and key files, which must belong together.
    pub fn load_pair(crt: &Path, key: &Path) -> Result<Ca, TlsError> {
        let (crt, key) = (crt.to_path_buf(), key.to_path_buf());
        // The first certificate of the file: the CA itself (a bundle may follow it).
        let text = std::fs::read_to_string(&crt).map_err(|e| file_err(&crt, e))?;
        let ca_pem =
            super::pem_blocks(&text).into_iter().next().ok_or_else(|| file_err(&crt, "holds no PEM certificate"))?;
        let ca_key_pem = std::fs::read_to_string(&key).map_err(|e| file_err(&key, e))?;
        let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| file_err(&key, e))?;
        let der = super::pem_der(ca_pem.as_bytes()).ok_or_else(|| file_err(&crt, "not a PEM certificate"))?;
        let fingerprint = hex::encode(&sha2::Sha256::digest(&der)[..8]);
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).map_err(|e| file_err(&crt, e))?;
        if parsed.public_key().subject_public_key.data.as_ref() != ca_key.public_key_raw() {
            return Err(file_err(&key, format!("is not the key of the CA certificate {}", crt.display())));
        }
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|e| file_err(&crt, e))?;
        Ok(Ca { issuer, cert_pem: ca_pem, fingerprint })
    }

    /// The CA's certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Whether this CA signed the certificate `der`.
    pub fn issued(&self, der: &[u8]) -> bool {
        let Some(ca_der) = super::pem_der(self.cert_pem.as_bytes()) else { return false };
        let (Ok((_, ca)), Ok((_, cert))) =
            (x509_parser::parse_x509_certificate(&ca_der), x509_parser::parse_x509_certificate(der))
        else {
            return false;
        };
        cert.verify_signature(Some(ca.public_key())).is_ok()
    }

    /// The first 8 bytes of the SHA-256 of the CA's certificate (hex): how listings name it.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// A new key and a certificate for `name` with `role` (see [`params_for`]), as PEM
    /// (certificate, private key).
    pub fn issue_pem(
        &self,
        role: Role,
        name: &str,
        sans: &[String],
        valid_from: time::OffsetDateTime,
        valid_for: Duration,
    ) -> Result<(String, String), TlsError> {
        let params = params_for(role, name, sans, valid_from, valid_for)?;
        let key = KeyPair::generate().map_err(err)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(err)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A certificate for the key in `request`: the CA decides everything else (name, role,
    /// host names, validity); nothing the request asks for besides its key is used.
    pub fn sign(
        &self,
        request: &Request,
        role: Role,
        name: &str,
        sans: &[String],
        valid_from: time::OffsetDateTime,
        valid_for: Duration,
    ) -> Result<Signed, TlsError> {
        let params = params_for(role, name, sans, valid_from, valid_for)?;
        let csr = CertificateSigningRequestParams { params, public_key: request.params.public_key.clone() };
        Signed::of(csr.signed_by(&self.issuer).map_err(err)?)
    }

    /// The CA's list of revoked certificates (DER), numbered `number` (it only grows):
    /// `revoked` is (serial hex, revoked at, Unix ms).
    pub fn revocation_list(&self, revoked: &[(String, i64)], number: u64) -> Result<Vec<u8>, TlsError> {
        let now = time::OffsetDateTime::now_utc();
        let mut certs = Vec::with_capacity(revoked.len());
        for (serial, at_ms) in revoked {
            let bytes = hex::decode(serial).map_err(|_| TlsError::Config(format!("serial {serial:?} is not hex")))?;
            certs.push(RevokedCertParams {
                serial_number: SerialNumber::from(bytes),
                revocation_time: time::OffsetDateTime::from_unix_timestamp(at_ms / 1000).unwrap_or(now),
                reason_code: None,
                invalidity_date: None,
            });
        }
        let params = CertificateRevocationListParams {
            this_update: now,
            next_update: now + time::Duration::days(3650),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer).map_err(err)?.der().to_vec())
    }
}

/// Issues a certificate for `name` with `role`, signed by the CA in `dir` (see
/// [`Ca::issue_pem`]). Writes `out.crt` and `out.key` (owner-only); refuses to replace them.
pub fn issue(
    dir: &Path,
    role: Role,
    name: &str,
    sans: &[String],
    valid_from: time::OffsetDateTime,
    valid_for: Duration,
    out: &Path,
) -> Result<(PathBuf, PathBuf), TlsError> {
    let (cert, key) = Ca::load(dir)?.issue_pem(role, name, sans, valid_from, valid_for)?;
    let (crt_path, key_path) = (out.with_extension("crt"), out.with_extension("key"));
    write_secret(&key_path, &key)?;
    write_public(&crt_path, &cert)?;
    Ok((crt_path, key_path))
}

/// Writes a new host key (owner-only) where it does not exist yet; the host's first step of
/// enrollment.
pub fn write_new_key(path: &Path, key_pem: &str) -> Result<(), TlsError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
    }
    write_secret(path, key_pem)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA directory with a new CA introduced beside its first one, and the first one's
    /// fingerprint.
    fn introduced() -> (tempfile::TempDir, String) {
        let tmp = tempfile::tempdir().unwrap();
        init(tmp.path(), "test").unwrap();
        let first = Ca::load(tmp.path()).unwrap().fingerprint;
        rotate(tmp.path(), Rotation::Introduce, "test").unwrap();
        (tmp, first)
    }

    /// A promote cut short after the new key replaced ca.key (ca.crt still the old CA's) is
    /// finished by taking the step again, and the rotation goes on to its end.
    #[test]
    fn a_promote_cut_short_is_finished_by_taking_it_again() {
        let (tmp, first) = introduced();
        let dir = tmp.path();
        let next = Ca::load_pair(&dir.join(format!("{NEXT}.crt")), &dir.join(format!("{NEXT}.key"))).unwrap();

        // What a promote killed between its two writes leaves: the old CA copied aside, the
        // new key in ca.key, the old certificate in ca.crt.
        std::fs::copy(dir.join(CA_KEY), dir.join(format!("{PREVIOUS}.key"))).unwrap();
        std::fs::copy(dir.join(CA_CERT), dir.join(format!("{PREVIOUS}.crt"))).unwrap();
        std::fs::copy(dir.join(format!("{NEXT}.key")), dir.join(CA_KEY)).unwrap();
        assert!(Ca::load(dir).is_err(), "a torn pair must not load");

        rotate(dir, Rotation::Promote, "test").unwrap();
        assert_eq!(Ca::load(dir).unwrap().fingerprint, next.fingerprint);
        assert_eq!(Ca::load_previous(dir).unwrap().unwrap().fingerprint, first);
        assert!(!dir.join(format!("{NEXT}.crt")).exists() && !dir.join(format!("{NEXT}.key")).exists());
        rotate(dir, Rotation::Retire, "test").unwrap();
        assert!(Ca::load_previous(dir).unwrap().is_none());
        assert_eq!(Ca::load(dir).unwrap().fingerprint, next.fingerprint);
    }

    /// A promote cut short while copying the old key aside (no copy of its certificate yet)
    /// starts that copy over.
    #[test]
    fn a_promote_cut_short_while_copying_the_old_ca_starts_over() {
        let (tmp, first) = introduced();
        let dir = tmp.path();
        std::fs::write(dir.join(format!("{PREVIOUS}.key")), "half a key").unwrap();
        rotate(dir, Rotation::Promote, "test").unwrap();
        assert_eq!(Ca::load_previous(dir).unwrap().unwrap().fingerprint, first);
    }
}
