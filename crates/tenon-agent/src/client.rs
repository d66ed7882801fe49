//! The agent's HTTP client for the device API (blocking: the agent is a small sequential loop).

use crate::transport::Transport;
use serde::de::DeserializeOwned;
use std::io::Read;
use std::time::Duration;
use tenon_core::api::{DeviceReport, EnrollRequest, EnrollResponse, Problem, TrustBundle};
use tenon_core::policy::escrow::{EscrowReceipt, EscrowRetired, EscrowUpload, SignedEscrowKey};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("server {url} is unreachable: {detail}")]
    Unreachable { url: String, detail: String },
    #[error("{0}")]
    Decommissioned(String),
    #[error("server refused the device credential: {0}")]
    Unauthorized(String),
    /// 429: the server asks the device to wait; the agent does not retry before `retry_after`.
    #[error("the server is rate limiting this device (retry after {}s): {detail}", retry_after.as_secs())]
    RateLimited { retry_after: Duration, detail: String },
    /// 503 with `Retry-After` (the server is starting): retried after that, not counted as a failure.
    #[error("the server is not ready yet (retry after {}s): {detail}", retry_after.as_secs())]
    Unavailable { retry_after: Duration, detail: String },
    #[error("server answered {status}: {detail}")]
    Server { status: u16, detail: String },
    #[error("server sent an unexpected answer: {0}")]
    Protocol(String),
    /// A URL the device's transport refuses (plain HTTP to another machine).
    #[error("{0}")]
    Insecure(String),
    #[error("TLS: {0}")]
    Tls(String),
}

/// A download that failed: on the way (the server, the network) or writing to disk.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error(transparent)]
    Client(ClientError),
    #[error("cannot write the download: {0}")]
    Write(std::io::Error),
}

impl ClientError {
    /// The message without what changes from one attempt to the next (the seconds to wait), for
    /// text that goes into a report: the agent reports only when its report changed, so a wait
    /// time in it would make every sync report.
    pub fn stable_text(&self) -> String {
        match self {
            ClientError::RateLimited { detail, .. } => format!("the server is rate limiting this device: {detail}"),
            ClientError::Unavailable { detail, .. } => format!("the server is not ready yet: {detail}"),
            other => other.to_string(),
        }
    }
}

/// What a check-in returned.
pub enum Fetch {
    NotModified,
    Envelope(String),
}

pub struct ServerClient {
    base: String,
    http: ureq::Agent,
    /// For package content: no limit on the whole transfer, a minute on each read.
    downloads: ureq::Agent,
}

impl ServerClient {
    /// A client for `base` that trusts what `transport` says (see [`crate::transport`]).
    pub fn new(base: &str, transport: &Transport) -> Result<Self, ClientError> {
        transport.check_url(base)?;
        let builder = || {
            ureq::AgentBuilder::new()
                .timeout_connect(Duration::from_secs(10))
                .user_agent(concat!("tenon-agent/", env!("CARGO_PKG_VERSION")))
        };
        let mut http = builder().timeout(Duration::from_secs(60));
        let mut downloads = builder().timeout_read(Duration::from_secs(60)).timeout_write(Duration::from_secs(60));
        if base.trim().starts_with("https://") {
            let tls = transport.client_config()?;
            http = http.tls_config(tls.clone());
            downloads = downloads.tls_config(tls);
        }
        Ok(Self { base: base.trim_end_matches('/').to_string(), http: http.build(), downloads: downloads.build() })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn map_err(&self, e: ureq::Error) -> ClientError {
        match e {
            ureq::Error::Status(status, resp) => {
                let resp_had_retry_after = resp.header("Retry-After").is_some();
                let retry_after = retry_after(resp.header("Retry-After"));
                let body = resp.into_string().unwrap_or_default();
                let detail = serde_json::from_str::<Problem>(&body).map(|p| p.detail).unwrap_or_else(|_| {
                    let mut b = body;
                    b.truncate(300);
                    b
                });
                match status {
                    410 => ClientError::Decommissioned(detail),
                    401 | 403 => ClientError::Unauthorized(detail),
                    429 => ClientError::RateLimited { retry_after, detail },
                    503 if resp_had_retry_after => ClientError::Unavailable { retry_after, detail },
                    _ => ClientError::Server { status, detail },
                }
            }
            ureq::Error::Transport(t) => {
                ClientError::Unreachable { url: self.base.clone(), detail: tenon_core::api::error_chain(&t) }
            }
        }
    }

    fn json<T: DeserializeOwned>(&self, resp: ureq::Response) -> Result<T, ClientError> {
        resp.into_json().map_err(|e| ClientError::Protocol(e.to_string()))
    }

    pub fn enroll(&self, req: &EnrollRequest) -> Result<EnrollResponse, ClientError> {
        let resp = self.http.post(&self.url("/api/v1/enroll")).send_json(req).map_err(|e| self.map_err(e))?;
        self.json(resp)
    }

    /// The check-in: `If-None-Match` with the held ETag; 304 means nothing changed.
    pub fn fetch_config(&self, credential: &str, etag: Option<&str>) -> Result<Fetch, ClientError> {
        let mut req =
            self.http.get(&self.url("/api/v1/device/config")).set("Authorization", &format!("Bearer {credential}"));
        if let Some(etag) = etag {
            req = req.set("If-None-Match", etag);
        }
        let resp = req.call().map_err(|e| self.map_err(e))?;
        match resp.status() {
            304 => Ok(Fetch::NotModified),
            200 => resp.into_string().map(Fetch::Envelope).map_err(|e| ClientError::Protocol(e.to_string())),
            s => Err(ClientError::Protocol(format!("unexpected status {s} for the configuration"))),
        }
    }

    /// Downloads package content from byte `offset` on (a `Range` request when `offset` > 0) into
    /// `out`. Returns the offset the bytes written start at: `offset` when the server resumed,
    /// 0 when it sent the whole content instead (the caller then starts over). A stall of more
    /// than a minute between reads fails; there is no limit on the whole download.
    pub fn download(
        &self,
        credential: &str,
        sha256: &str,
        offset: u64,
        out: &mut dyn std::io::Write,
    ) -> Result<u64, DownloadError> {
        let mut req = self
            .downloads
            .get(&self.url(&format!("/api/v1/device/packages/{sha256}")))
            .set("Authorization", &format!("Bearer {credential}"));
        if offset > 0 {
            req = req.set("Range", &format!("bytes={offset}-"));
        }
        let resp = match req.call() {
            Ok(r) => r,
            // Everything there is already: the range starts at the end.
            Err(ureq::Error::Status(416, _)) => return Ok(offset),
            Err(e) => return Err(DownloadError::Client(self.map_err(e))),
        };
        let start = match resp.status() {
            206 => offset,
            200 => 0,
            s => {
                return Err(DownloadError::Client(ClientError::Protocol(format!(
                    "unexpected status {s} for package content"
                ))))
            }
        };
        let mut reader = resp.into_reader();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => return Ok(start),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(DownloadError::Client(ClientError::Unreachable {
                        url: self.base.clone(),
                        detail: format!("the download stopped: {e}"),
                    }))
                }
            };
            out.write_all(&buf[..n]).map_err(DownloadError::Write)?;
        }
    }

    /// The server's root key and key lists, asked before enrolling (no credential needed).
    pub fn public_trust(&self) -> Result<TrustBundle, ClientError> {
        let resp = self.http.get(&self.url("/api/v1/trust")).call().map_err(|e| self.map_err(e))?;
        self.json(resp)
    }

    /// Shows the server the envelope this device holds, after the server sent an older one; the
    /// answer is the ETag to fetch next.
    pub fn prove_held(&self, credential: &str, envelope: &str) -> Result<Option<String>, ClientError> {
        let resp = self
            .http
            .post(&self.url("/api/v1/device/config/held"))
            .set("Authorization", &format!("Bearer {credential}"))
            .set("Content-Type", "application/json")
            .send_string(envelope)
            .map_err(|e| self.map_err(e))?;
        let v: serde_json::Value = self.json(resp)?;
        Ok(v.get("etag").and_then(|e| e.as_str()).map(str::to_string))
    }

    pub fn trust(&self, credential: &str) -> Result<TrustBundle, ClientError> {
        let resp = self
            .http
            .get(&self.url("/api/v1/device/trust"))
            .set("Authorization", &format!("Bearer {credential}"))
            .call()
            .map_err(|e| self.map_err(e))?;
        self.json(resp)
    }

    /// Sends a report; returns the ETag the server wants the device to hold.
    pub fn report(&self, credential: &str, report: &DeviceReport) -> Result<Option<String>, ClientError> {
        let resp = self
            .http
            .post(&self.url("/api/v1/device/report"))
            .set("Authorization", &format!("Bearer {credential}"))
            .send_json(report)
            .map_err(|e| self.map_err(e))?;
        let v: serde_json::Value = self.json(resp)?;
        Ok(v.get("etag").and_then(|e| e.as_str()).map(str::to_string))
    }

    /// Escrows a sealed recovery key; `Ok` only with the server's receipt, which it sends after
    /// committing the key.
    pub fn escrow_upload(&self, credential: &str, upload: &EscrowUpload) -> Result<EscrowReceipt, ClientError> {
        let resp = self
            .http
            .post(&self.url("/api/v1/device/escrow"))
            .set("Authorization", &format!("Bearer {credential}"))
            .send_json(upload)
            .map_err(|e| self.map_err(e))?;
        if resp.status() != 201 {
            return Err(ClientError::Protocol(format!("unexpected status {} for an escrow upload", resp.status())));
        }
        self.json(resp)
    }

    /// Reports a retired recovery protector (gone from the volume); the server completes the
    /// rotation of it only now.
    pub fn escrow_retired(&self, credential: &str, retired: &EscrowRetired) -> Result<(), ClientError> {
        self.http
            .post(&self.url("/api/v1/device/escrow/retired"))
            .set("Authorization", &format!("Bearer {credential}"))
            .send_json(retired)
            .map_err(|e| self.map_err(e))?;
        Ok(())
    }

    /// Protector ids whose recovery keys the server asks this device to rotate, and the server's
    /// current escrow key as it signed it (older servers send none).
    pub fn escrow_rotations(&self, credential: &str) -> Result<EscrowInfo, ClientError> {
        let resp = self
            .http
            .get(&self.url("/api/v1/device/escrow/rotations"))
            .set("Authorization", &format!("Bearer {credential}"))
            .call()
            .map_err(|e| self.map_err(e))?;
        self.json(resp)
    }
}

/// How long a 429 asks to wait: `Retry-After` in seconds (an HTTP date or a missing header means
/// a minute), bounded to a day so a hostile answer cannot silence the agent for longer.
fn retry_after(header: Option<&str>) -> Duration {
    let secs = header.and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(60);
    Duration::from_secs(secs.clamp(1, 24 * 3600))
}

/// The answer of `GET /api/v1/device/escrow/rotations`.
#[derive(Debug, Default, serde::Deserialize)]
pub struct EscrowInfo {
    pub rotations: Vec<String>,
    #[serde(default)]
    pub escrow_key: Option<SignedEscrowKey>,
    /// Protectors for which the server holds more than one different recovery password.
    #[serde(default)]
    pub conflicts: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_bounded() {
        let cases = [(Some("30"), 30), (Some(" 5 "), 5), (Some("0"), 1), (Some("99999999"), 86400), (None, 60)];
        for (header, secs) in cases {
            assert_eq!(retry_after(header), Duration::from_secs(secs), "{header:?}");
        }
        assert_eq!(retry_after(Some("Wed, 21 Oct 2015 07:28:00 GMT")), Duration::from_secs(60));
    }

    #[test]
    fn stable_text_leaves_out_the_wait() {
        let e = |secs| ClientError::RateLimited { retry_after: Duration::from_secs(secs), detail: "slow down".into() };
        assert!(e(30).to_string().contains("30s"), "the log keeps the wait");
        assert_eq!(e(30).stable_text(), e(31).stable_text());
        assert!(e(30).stable_text().contains("slow down"));
        let u = |secs| ClientError::Unavailable { retry_after: Duration::from_secs(secs), detail: "starting".into() };
        assert_eq!(u(1).stable_text(), u(2).stable_text());
        let s = ClientError::Server { status: 500, detail: "x".into() };
        assert_eq!(s.stable_text(), s.to_string());
    }
}
