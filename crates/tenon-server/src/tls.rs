//! TLS termination (rustls with the `ring` provider): the organisation's certificate from files,
//! or a CA of the server's own (`--tls-self-signed`).
//!
//! - **Files** (`--tls-cert`, `--tls-key`): a PEM chain and its key. Checked at start (PEM, key
//!   matches, not expired) and re-read on SIGHUP or when either file changes (polled every
//!   [`RELOAD_POLL`]); a reload that fails keeps the certificate being served and logs why. Open
//!   connections keep their session; new handshakes get the new certificate.
//! - **Self-signed**: `DATA_DIR/tls/ca.key` (0600; refused when group or others may read it) and
//!   `ca.pem` are created once and never change; `server.pem`/`server.key` are issued by that CA for
//!   the names given (default `localhost`, `127.0.0.1`, the host name), valid [`LEAF_DAYS`] days,
//!   and re-issued when fewer than [`RENEW_DAYS`] days are left (checked at start and twice a day)
//!   or the names changed.
//!
//! Enrollment tokens carry the trust an agent needs ([`Tls::token_trust`], a
//! `tenon_core::api::TlsTrust`): the self-signed CA's SHA-256 fingerprint, or system roots for an
//! organisation's certificate, or the fingerprint of the top certificate of its chain when the
//! administrator asks for pinning.

use anyhow::{anyhow, bail, Context};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};
use tenon_core::api::TlsTrust;

/// How long a self-signed server certificate is valid.
pub const LEAF_DAYS: i64 = 90;
/// A self-signed server certificate with fewer days left is re-issued.
pub const RENEW_DAYS: i64 = 30;
/// How often the certificate files are checked for changes.
pub const RELOAD_POLL: Duration = Duration::from_secs(5);
const CA_YEARS: i64 = 10;

/// Where the served certificate comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum TlsSource {
    Files { cert: PathBuf, key: PathBuf },
    SelfSigned { names: Vec<String> },
}

/// The TLS state of a serving server.
pub struct Tls {
    source: TlsSource,
    resolver: Arc<Resolver>,
    /// The server's own CA, loaded once at start (`--tls-self-signed`); renewals issue from it and
    /// never create another.
    ca: Option<SelfSignedCa>,
}

impl Tls {
    /// Loads or creates the certificate; every failure is one line that says what to do.
    pub fn open(source: TlsSource, data_dir: &Path, now: i64) -> anyhow::Result<Self> {
        let (served, ca) = match &source {
            TlsSource::Files { cert, key } => (load_files(cert, key, now)?, None),
            TlsSource::SelfSigned { names } => {
                let ca = SelfSignedCa::load_or_create(&data_dir.join("tls"), now)?;
                (ca.server_certificate(names, now)?, Some(ca))
            }
        };
        Ok(Self { source, resolver: Arc::new(Resolver { current: RwLock::new(Arc::new(served.key)) }), ca })
    }

    /// The rustls configuration for the listener (HTTP/1.1 only, TLS 1.2 and 1.3).
    pub fn server_config(&self) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("the TLS provider has no protocol versions")?
            .with_no_client_auth()
            .with_cert_resolver(self.resolver.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// `DATA_DIR/tls/ca.pem` when the server runs its own CA.
    pub fn ca_file(&self) -> Option<PathBuf> {
        self.ca.as_ref().map(|ca| ca.dir.join("ca.pem"))
    }

    pub fn ca_fingerprint(&self) -> Option<&str> {
        self.ca.as_ref().map(|ca| ca.fingerprint.as_str())
    }

    /// What an enrollment token tells agents to trust: the own CA; for an organisation's
    /// certificate the system roots, or with `pin_ca` the top certificate of the served chain (the
    /// issuing CA the administrator put in the chain file).
    pub fn token_trust(&self, pin_ca: bool) -> Result<TlsTrust, String> {
        if let Some(ca) = &self.ca {
            return Ok(TlsTrust::PinnedCa(ca.fingerprint.clone()));
        }
        if !pin_ca {
            return Ok(TlsTrust::SystemRoots);
        }
        match self.resolver.current().cert.as_slice() {
            [_, .., top] => Ok(TlsTrust::PinnedCa(fingerprint(top))),
            _ => Err("the certificate file holds no CA certificate to pin (only the server's own); \
                      append the issuing CA's certificate to --tls-cert, or create the token without --pin-ca"
                .into()),
        }
    }

    /// Keeps the served certificate current: reloads the files on SIGHUP or change, renews the
    /// self-signed certificate before it expires. Runs until the process stops.
    /// `hangup` is registered by the caller before this task is spawned, so that an early SIGHUP
    /// never ends the process.
    pub async fn maintain(self: Arc<Self>, clock: crate::state::Clock, mut hangup: Hangups) {
        match self.source.clone() {
            TlsSource::Files { cert, key } => {
                let mut stamp = file_stamps(&cert, &key);
                let mut poll = tokio::time::interval(RELOAD_POLL);
                loop {
                    let why = tokio::select! {
                        _ = hangup.next() => "SIGHUP",
                        _ = poll.tick() => {
                            let now_stamp = file_stamps(&cert, &key);
                            if now_stamp == stamp { continue; }
                            stamp = now_stamp;
                            "the files changed"
                        }
                    };
                    match load_files(&cert, &key, clock()) {
                        Ok(served) => {
                            tracing::info!(reason = why, subject = %served.subject, not_after = %served.not_after, "reloaded the TLS certificate");
                            self.resolver.set(served.key);
                        }
                        Err(e) => tracing::error!(
                            reason = why,
                            error = format!("{e:#}"),
                            "cannot reload the TLS certificate; still serving the previous one"
                        ),
                    }
                }
            }
            TlsSource::SelfSigned { names } => {
                let mut check = tokio::time::interval(Duration::from_secs(12 * 3600));
                check.tick().await;
                loop {
                    tokio::select! {
                        _ = hangup.next() => {}
                        _ = check.tick() => {}
                    }
                    let Some(ca) = &self.ca else { return };
                    match ca.server_certificate(&names, clock()) {
                        Ok(served) => self.resolver.set(served.key),
                        Err(e) => tracing::error!(error = format!("{e:#}"), "cannot renew the TLS certificate"),
                    }
                }
            }
        }
    }
}

/// SIGHUP, which `systemctl reload` sends. Listening for it also keeps it from ending the process.
pub struct Hangups {
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
}

impl Hangups {
    pub fn new() -> Self {
        #[cfg(unix)]
        {
            Self { signal: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok() }
        }
        #[cfg(not(unix))]
        Self {}
    }

    pub async fn next(&mut self) {
        #[cfg(unix)]
        if let Some(s) = self.signal.as_mut() {
            s.recv().await;
            return;
        }
        std::future::pending::<()>().await
    }
}

impl Default for Hangups {
    fn default() -> Self {
        Self::new()
    }
}

/// The certificate every new handshake gets; swapped in place on reload.
#[derive(Debug)]
struct Resolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl Resolver {
    fn current(&self) -> Arc<CertifiedKey> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, key: CertifiedKey) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(key);
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Hex SHA-256 of a certificate's DER: what tokens and the agent compare.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    hex::encode(Sha256::digest(cert.as_ref()))
}

/// A certificate ready to serve, with what the log says of it.
struct Served {
    key: CertifiedKey,
    subject: String,
    not_after: String,
}

fn file_stamps(cert: &Path, key: &Path) -> [Option<(SystemTime, u64)>; 2] {
    let stamp = |p: &Path| std::fs::metadata(p).ok().and_then(|m| Some((m.modified().ok()?, m.len())));
    [stamp(cert), stamp(key)]
}

/// Reads and checks a PEM chain and its key.
fn load_files(cert: &Path, key: &Path, now: i64) -> anyhow::Result<Served> {
    let cert_pem = std::fs::read(cert)
        .with_context(|| format!("cannot read the certificate file {}; check --tls-cert", cert.display()))?;
    let key_pem =
        std::fs::read(key).with_context(|| format!("cannot read the key file {}; check --tls-key", key.display()))?;
    let chain = parse_chain(&cert_pem).with_context(|| format!("--tls-cert {}", cert.display()))?;
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| {
        anyhow!(
            "--tls-key {} is not a PEM private key (expected a -----BEGIN PRIVATE KEY----- block); give the key file of the certificate",
            key.display()
        )
    })?;
    certified(chain, private, now, &format!("--tls-cert {}", cert.display()), &format!("--tls-key {}", key.display()))
}

fn parse_chain(pem: &[u8]) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(pem).collect::<Result<_, _>>().map_err(|_| {
            anyhow!("is not a PEM certificate chain (it cannot be read as -----BEGIN CERTIFICATE----- blocks)")
        })?;
    if chain.is_empty() {
        bail!("is not a PEM certificate chain (no -----BEGIN CERTIFICATE----- block); give the PEM file your CA issued, server certificate first");
    }
    Ok(chain)
}

fn certified(
    chain: Vec<CertificateDer<'static>>,
    private: PrivateKeyDer<'static>,
    now: i64,
    cert_name: &str,
    key_name: &str,
) -> anyhow::Result<Served> {
    let (_, leaf) = x509_parser::parse_x509_certificate(chain[0].as_ref())
        .map_err(|_| anyhow!("{cert_name}: the first certificate is not a valid X.509 certificate"))?;
    let validity = leaf.validity();
    let subject = leaf.subject().to_string();
    let not_after = validity.not_after.to_datetime();
    if validity.not_after.timestamp() <= now {
        bail!(
            "{cert_name}: the certificate ({subject}) expired on {}; renew it with your CA and start again",
            rfc3339(not_after)
        );
    }
    if validity.not_before.timestamp() > now {
        bail!(
            "{cert_name}: the certificate ({subject}) is not valid before {}; check this machine's clock",
            rfc3339(validity.not_before.to_datetime())
        );
    }
    let provider = provider();
    let signing = provider
        .key_provider
        .load_private_key(private)
        .map_err(|e| anyhow!("{key_name}: the key cannot be used ({e}); give an RSA, ECDSA or Ed25519 key in PEM"))?;
    let key = CertifiedKey::new(chain, signing);
    key.keys_match().map_err(|_| {
        anyhow!(
            "{key_name} does not match the certificate in {cert_name}; give the key this certificate was issued for"
        )
    })?;
    Ok(Served { key, subject, not_after: rfc3339(not_after) })
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| t.to_string())
}

/// The server's own CA, in `DATA_DIR/tls`.
struct SelfSignedCa {
    dir: PathBuf,
    key: rcgen::KeyPair,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    fingerprint: String,
}

impl SelfSignedCa {
    fn load_or_create(dir: &Path, now: i64) -> anyhow::Result<Self> {
        let key_file = dir.join("ca.key");
        let cert_file = dir.join("ca.pem");
        if key_file.exists() {
            check_owner_only(&key_file)?;
            let key_pem =
                std::fs::read_to_string(&key_file).with_context(|| format!("cannot read {}", key_file.display()))?;
            let key = rcgen::KeyPair::from_pem(&key_pem).map_err(|e| {
                anyhow!("{} is not a usable CA key ({e}); restore it from a backup", key_file.display())
            })?;
            let cert_pem = std::fs::read_to_string(&cert_file).with_context(|| {
                format!(
                    "cannot read {} (the CA key is there but its certificate is not); restore it from a backup",
                    cert_file.display()
                )
            })?;
            let chain = parse_chain(cert_pem.as_bytes()).with_context(|| cert_file.display().to_string())?;
            let cert_der = chain.into_iter().next().expect("parse_chain returns at least one");
            let fingerprint = fingerprint(&cert_der);
            return Ok(Self { dir: dir.to_path_buf(), key, cert_pem, cert_der, fingerprint });
        }
        if cert_file.exists() {
            bail!(
                "{} exists without its key {}; restore the key from a backup, or move both away to create a new CA \
                 (every agent enrolled with the old CA must then be re-enrolled)",
                cert_file.display(),
                key_file.display()
            );
        }
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        crate::datadir::restrict_dir(dir)?;
        let key = rcgen::KeyPair::generate().context("cannot generate the CA key")?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(rcgen::DnType::CommonName, format!("Tenon server CA ({})", host_name()));
        params.distinguished_name.push(rcgen::DnType::OrganizationName, "Tenon");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        params.not_before = at(now - 3600);
        params.not_after = at(now + CA_YEARS * 365 * 86_400);
        let cert = params.self_signed(&key).context("cannot create the CA certificate")?;
        crate::datadir::write_secret_file(&key_file, key.serialize_pem().as_bytes())?;
        crate::datadir::write_secret_file(&cert_file, cert.pem().as_bytes())?;
        let cert_der = cert.der().clone();
        let fingerprint = fingerprint(&cert_der);
        tracing::info!(ca = %cert_file.display(), sha256 = %fingerprint, "created the server's own TLS CA");
        Ok(Self { dir: dir.to_path_buf(), key, cert_pem: cert.pem(), cert_der, fingerprint })
    }

    /// The current server certificate, re-issued when it is missing, not from this CA, has other
    /// names or has fewer than [`RENEW_DAYS`] left.
    fn server_certificate(&self, names: &[String], now: i64) -> anyhow::Result<Served> {
        let cert_file = self.dir.join("server.pem");
        let key_file = self.dir.join("server.key");
        if let Some(served) = self.existing(&cert_file, &key_file, names, now) {
            return Ok(served);
        }
        let key = rcgen::KeyPair::generate().context("cannot generate the server key")?;
        let mut params = rcgen::CertificateParams::new(names.to_vec())
            .map_err(|e| anyhow!("--tls-names {}: {e}; give host names or IP addresses", names.join(",")))?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(rcgen::DnType::CommonName, names.first().cloned().unwrap_or_default());
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = at(now - 3600);
        params.not_after = at(now + LEAF_DAYS * 86_400);
        let issuer = rcgen::Issuer::from_ca_cert_der(&self.cert_der, &self.key)
            .map_err(|e| anyhow!("the CA certificate in {} cannot issue ({e})", self.dir.display()))?;
        let cert = params.signed_by(&key, &issuer).context("cannot issue the server certificate")?;
        crate::datadir::write_secret_file(&key_file, key.serialize_pem().as_bytes())?;
        crate::datadir::write_secret_file(&cert_file, format!("{}{}", cert.pem(), self.cert_pem).as_bytes())?;
        tracing::info!(names = %names.join(","), days = LEAF_DAYS, "issued the TLS server certificate");
        self.existing(&cert_file, &key_file, names, now)
            .ok_or_else(|| anyhow!("the server certificate just written to {} does not load", cert_file.display()))
    }

    fn existing(&self, cert_file: &Path, key_file: &Path, names: &[String], now: i64) -> Option<Served> {
        let chain = parse_chain(&std::fs::read(cert_file).ok()?).ok()?;
        if chain.len() != 2 || chain[1] != self.cert_der {
            return None;
        }
        let (_, leaf) = x509_parser::parse_x509_certificate(chain[0].as_ref()).ok()?;
        if leaf.validity().not_after.timestamp() - now < RENEW_DAYS * 86_400 {
            return None;
        }
        let mut have: Vec<String> = leaf
            .subject_alternative_name()
            .ok()??
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                x509_parser::extensions::GeneralName::IPAddress(ip) => ip_text(ip),
                _ => None,
            })
            .collect();
        let mut want: Vec<String> = names.to_vec();
        have.sort();
        want.sort();
        if have != want {
            return None;
        }
        let private = PrivateKeyDer::from_pem_slice(&std::fs::read(key_file).ok()?).ok()?;
        certified(chain, private, now, &cert_file.display().to_string(), &key_file.display().to_string()).ok()
    }
}

fn ip_text(raw: &[u8]) -> Option<String> {
    match raw.len() {
        4 => Some(std::net::Ipv4Addr::from(<[u8; 4]>::try_from(raw).ok()?).to_string()),
        16 => Some(std::net::Ipv6Addr::from(<[u8; 16]>::try_from(raw).ok()?).to_string()),
        _ => None,
    }
}

fn at(unix: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(unix).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// The default names of a self-signed server certificate.
pub fn default_names() -> Vec<String> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let host = host_name();
    if !host.is_empty() && !names.contains(&host) {
        names.push(host);
    }
    names
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_ascii_lowercase())
        .unwrap_or_default()
}

/// A CA key that others may read is refused: anyone who reads it can impersonate this server to
/// every agent.
fn check_owner_only(path: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode =
            std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?.permissions().mode();
        if mode & 0o077 != 0 {
            bail!(
                "{} may be read by other users (mode {:o}); whoever reads it can impersonate this server: run `chmod 600 {}`, \
                 consider the CA compromised if others had access, and start again",
                path.display(),
                mode & 0o777,
                path.display()
            );
        }
    }
    let _ = path;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf_of(served: &Served) -> Vec<u8> {
        served.key.cert[0].as_ref().to_vec()
    }

    #[test]
    fn the_server_certificate_is_renewed_before_expiry_and_the_ca_is_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("tls");
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let t0 = 1_800_000_000;
        let ca = SelfSignedCa::load_or_create(&dir, t0).unwrap();
        let first = ca.server_certificate(&names, t0).unwrap();
        // Far from expiry: kept.
        let day = 86_400;
        let kept = SelfSignedCa::load_or_create(&dir, t0 + day).unwrap().server_certificate(&names, t0 + day).unwrap();
        assert_eq!(leaf_of(&kept), leaf_of(&first));
        // Fewer than RENEW_DAYS left: re-issued by the same CA.
        let late = t0 + (LEAF_DAYS - RENEW_DAYS + 1) * day;
        let again = SelfSignedCa::load_or_create(&dir, late).unwrap();
        assert_eq!(again.fingerprint, ca.fingerprint, "the CA never changes");
        let renewed = again.server_certificate(&names, late).unwrap();
        assert_ne!(leaf_of(&renewed), leaf_of(&first));
        assert_eq!(renewed.key.cert[1], ca.cert_der, "the chain ends in the same CA");
        let der = leaf_of(&renewed);
        let (_, leaf) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(leaf.validity().not_after.timestamp() >= late + (LEAF_DAYS - 1) * day);
    }
}
