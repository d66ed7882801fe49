//! How the agent reaches its server: which URLs it accepts and which TLS certificates it trusts.
//!
//! The trust comes from the enrollment token and is kept in the vault:
//! - a pinned CA (the server's own CA, or the organisation's CA when the administrator asked for
//!   pinning): the server's chain must contain a certificate with exactly that SHA-256, and the
//!   chain is verified with that certificate as the only trust anchor (no system roots);
//! - system roots (an organisation's certificate): the operating system's root store;
//! - plain `http://` only to a loopback address, unless enrolled with `--allow-insecure-http`.

use crate::client::ClientError;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use tenon_core::api::TlsTrust;

/// What the agent trusts for one server; stored in the vault at enrollment.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Transport {
    /// From the token; `None` (a token from a plain-HTTP server): system roots for `https://`.
    #[serde(default)]
    pub tls: Option<TlsTrust>,
    /// Enrolled with `--allow-insecure-http`: plain HTTP to a non-loopback address is accepted.
    #[serde(default)]
    pub allow_insecure_http: bool,
}

impl Transport {
    /// Refuses a URL this transport must not use, with what to do instead.
    pub fn check_url(&self, url: &str) -> Result<(), ClientError> {
        let url = url.trim();
        if let Some(rest) = url.strip_prefix("http://") {
            if !self.allow_insecure_http && !is_loopback_host(host_of(rest)) {
                return Err(ClientError::Insecure(format!(
                    "{url} is plain HTTP to a non-loopback address: the device credential would cross the network \
                     readable. Use the server's https:// address, or enroll with --allow-insecure-http to accept the risk"
                )));
            }
            return Ok(());
        }
        if url.starts_with("https://") {
            return Ok(());
        }
        Err(ClientError::Insecure(format!("{url} is not an http:// or https:// URL")))
    }

    /// The rustls configuration for `https://` connections.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, ClientError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        let config = match &self.tls {
            Some(TlsTrust::PinnedCa(pin)) => {
                let pin = decode_pin(pin)?;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(PinnedCa { pin, provider }))
                    .with_no_client_auth()
            }
            Some(TlsTrust::SystemRoots) | None => {
                let roots = system_roots()?;
                builder.with_root_certificates(roots).with_no_client_auth()
            }
        };
        Ok(Arc::new(config))
    }
}

fn decode_pin(pin: &str) -> Result<[u8; 32], ClientError> {
    let bytes =
        hex::decode(pin).map_err(|_| ClientError::Tls(format!("the pinned CA fingerprint {pin:?} is not hex")))?;
    bytes.try_into().map_err(|_| ClientError::Tls(format!("the pinned CA fingerprint {pin:?} is not a SHA-256")))
}

/// The operating system's roots (on Windows the machine's certificate store, where Group Policy
/// puts an organisation's CA; elsewhere the system bundle or `SSL_CERT_FILE`). Read once per
/// process: the service syncs every minute and the store rarely changes (a restart picks it up).
fn system_roots() -> Result<RootCertStore, ClientError> {
    static ROOTS: std::sync::OnceLock<Result<RootCertStore, String>> = std::sync::OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = RootCertStore::empty();
            let (added, _ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found.errors.first().map(|e| format!(" ({e})")).unwrap_or_default();
                return Err(format!(
                    "no system root certificates could be loaded{why}; install the organisation's CA in the \
                     machine's certificate store, or enroll with a token that pins the CA \
                     (`tenonctl enroll-token create --pin-ca`)"
                ));
            }
            Ok(roots)
        })
        .clone()
        .map_err(ClientError::Tls)
}

fn host_of(after_scheme: &str) -> &str {
    let authority = after_scheme.split(['/', '?', '#']).next().unwrap_or("");
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().unwrap_or("");
    }
    authority.split(':').next().unwrap_or("")
}

fn is_loopback_host(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn sha256(cert: &CertificateDer<'_>) -> [u8; 32] {
    Sha256::digest(cert.as_ref()).into()
}

/// Trusts exactly the CA whose certificate has the pinned SHA-256, wherever it is in the chain.
#[derive(Debug)]
struct PinnedCa {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(anchor) = intermediates.iter().find(|c| sha256(c) == self.pin) else {
            let presented: Vec<String> = std::iter::once(end_entity)
                .chain(intermediates)
                .map(|c| hex::encode(sha256(c))[..16].to_string())
                .collect();
            return Err(rustls::Error::General(format!(
                "the server's certificate is not from the CA this device was enrolled with (pinned CA sha256 {}, \
                 the server presented certificates {}); the server's certificate changed or this is not the server: \
                 check --server, or re-enroll with a token from this server",
                hex::encode(self.pin),
                presented.join(", ")
            )));
        };
        let mut roots = RootCertStore::empty();
        roots.add(anchor.clone().into_owned()).map_err(|e| rustls::Error::General(format!("the pinned CA: {e}")))?;
        let rest: Vec<CertificateDer<'_>> = intermediates.iter().filter(|c| sha256(c) != self.pin).cloned().collect();
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(format!("the pinned CA: {e}")))?;
        verifier.verify_server_cert(end_entity, &rest, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_to_loopback_unless_allowed() {
        let t = Transport::default();
        for ok in ["http://127.0.0.1:8440", "http://localhost:1/x", "http://[::1]:8440/", "https://tenon.example.com"] {
            assert!(t.check_url(ok).is_ok(), "{ok}");
        }
        for bad in ["http://10.0.0.5:8440", "http://tenon.example.com", "http://127.0.0.1.evil.com/", "ftp://x"] {
            assert!(t.check_url(bad).is_err(), "{bad}");
        }
        let allowed = Transport { allow_insecure_http: true, ..Default::default() };
        assert!(allowed.check_url("http://10.0.0.5:8440").is_ok());
    }
}
