//! One keep-alive HTTP/1.1 connection (hyper's client connection, over TCP or rustls), owned by one
//! task that sends its requests back to back. A connection the server closed while idle is
//! reopened before the next request without counting an error.

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{header, Method, Request};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// A server to send to: `http://HOST:PORT` or `https://HOST:PORT`.
pub struct Target {
    pub url: String,
    authority: String,
    addr: String,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
}

/// `--server URL[,URL...]`: each URL with its TLS settings (`--ca-file`, else the system roots).
pub fn targets(urls: &[String], ca_file: Option<&Path>) -> anyhow::Result<Vec<Arc<Target>>> {
    let mut tls_config = None;
    let mut out = Vec::new();
    for url in urls.iter().map(|u| u.trim()).filter(|u| !u.is_empty()) {
        let (https, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            bail!("--server {url}: give http://HOST:PORT or https://HOST:PORT");
        };
        let authority = rest.split('/').next().unwrap_or_default().to_string();
        if authority.is_empty() {
            bail!("--server {url}: no host");
        }
        let (host, port) = split_host_port(&authority, if https { 443 } else { 80 })
            .with_context(|| format!("--server {url}: the port is not a number"))?;
        let tls = if https {
            if tls_config.is_none() {
                tls_config = Some(client_tls(ca_file)?);
            }
            let name = ServerName::try_from(host.clone())
                .with_context(|| format!("--server {url}: {host} is not a host name or address"))?;
            Some((tokio_rustls::TlsConnector::from(tls_config.clone().expect("set above")), name))
        } else {
            None
        };
        let addr = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
        out.push(Arc::new(Target { url: url.trim_end_matches('/').to_string(), authority, addr, tls }));
    }
    if out.is_empty() {
        bail!("--server: give at least one URL");
    }
    Ok(out)
}

/// `host:port`, `[v6]:port` or a bare host (the default port).
fn split_host_port(authority: &str, default_port: u16) -> anyhow::Result<(String, u16)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']').context("unclosed [")?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse()?,
            None => default_port,
        };
        return Ok((host.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => Ok((h.to_string(), p.parse()?)),
        None => Ok((authority.to_string(), default_port)),
    }
}

fn client_tls(ca_file: Option<&Path>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(f) => {
            let pem = std::fs::read(f).with_context(|| format!("cannot read --ca-file {}", f.display()))?;
            let certs: Vec<_> = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<_, _>>()
                .map_err(|_| anyhow::anyhow!("--ca-file {} is not a PEM certificate file", f.display()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                bail!("--ca-file {} holds no CA certificate", f.display());
            }
        }
        None => {
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("the TLS provider has no protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Why a request got no answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The TCP connection or the TLS handshake failed.
    Connect,
    /// No complete answer within the timeout.
    Timeout,
    /// The connection broke during the request.
    Io,
}

impl Failure {
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Connect => "connect",
            Failure::Timeout => "timeout",
            Failure::Io => "io",
        }
    }
}

/// A request, built once and sent again as it is when retried.
pub struct Req {
    pub method: Method,
    pub path: &'static str,
    pub bearer: Option<Arc<str>>,
    pub if_none_match: Option<String>,
    pub json: Option<Bytes>,
}

/// An answer: its status, the headers fleetsim reads, and the body.
pub struct Answer {
    pub status: u16,
    pub etag: Option<String>,
    pub retry_after: Option<Duration>,
    pub body: Bytes,
}

pub struct Conn {
    target: Arc<Target>,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Conn {
    pub fn new(target: Arc<Target>) -> Self {
        Self { target, sender: None }
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, Failure> {
        let tcp = TcpStream::connect(&self.target.addr).await.map_err(|_| Failure::Connect)?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = match &self.target.tls {
            Some((connector, name)) => {
                Box::new(connector.connect(name.clone(), tcp).await.map_err(|_| Failure::Connect)?)
            }
            None => Box::new(tcp),
        };
        let (sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(io)).await.map_err(|_| Failure::Connect)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// Opens the connection ahead of the first request (a failure is left for that request).
    pub async fn warm(&mut self, timeout: Duration) {
        if self.sender.is_none() {
            if let Ok(Ok(s)) = tokio::time::timeout(timeout, self.connect()).await {
                self.sender = Some(s);
            }
        }
    }

    /// Sends `req` and reads the whole answer, within `timeout` (connecting included). After a
    /// failure the connection is dropped and the next request opens a new one.
    pub async fn send(&mut self, req: &Req, timeout: Duration) -> Result<Answer, Failure> {
        match tokio::time::timeout(timeout, self.send_inner(req)).await {
            Ok(Ok(a)) => Ok(a),
            Ok(Err(f)) => {
                self.sender = None;
                Err(f)
            }
            Err(_) => {
                self.sender = None;
                Err(Failure::Timeout)
            }
        }
    }

    async fn send_inner(&mut self, req: &Req) -> Result<Answer, Failure> {
        // An idle connection the server closed is reopened quietly: that is no failure.
        let reusable = match &mut self.sender {
            Some(s) if !s.is_closed() => s.ready().await.is_ok(),
            _ => false,
        };
        if !reusable {
            self.sender = Some(self.connect().await?);
        }
        let sender = self.sender.as_mut().expect("connected above");
        let mut b = Request::builder()
            .method(req.method.clone())
            .uri(req.path)
            .header(header::HOST, self.target.authority.as_str());
        if let Some(bearer) = &req.bearer {
            b = b.header(header::AUTHORIZATION, format!("Bearer {bearer}"));
        }
        if let Some(etag) = &req.if_none_match {
            b = b.header(header::IF_NONE_MATCH, etag.as_str());
        }
        let body = match &req.json {
            Some(j) => {
                b = b.header(header::CONTENT_TYPE, "application/json");
                Full::new(j.clone())
            }
            None => Full::new(Bytes::new()),
        };
        let request = b.body(body).map_err(|_| Failure::Io)?;
        let response = sender.send_request(request).await.map_err(|_| Failure::Io)?;
        let (parts, body) = response.into_parts();
        let text = |name: header::HeaderName| parts.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let etag = text(header::ETAG);
        let retry_after = text(header::RETRY_AFTER).and_then(|s| s.trim().parse::<u64>().ok()).map(Duration::from_secs);
        let body = body.collect().await.map_err(|_| Failure::Io)?.to_bytes();
        Ok(Answer { status: parts.status.as_u16(), etag, retry_after, body })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls() {
        let t = targets(&["http://127.0.0.1:8440/".into(), "http://localhost".into()], None).unwrap();
        assert_eq!(
            (t[0].addr.as_str(), t[0].authority.as_str(), t[0].url.as_str()),
            ("127.0.0.1:8440", "127.0.0.1:8440", "http://127.0.0.1:8440")
        );
        assert_eq!(t[1].addr, "localhost:80");
        assert_eq!(split_host_port("[::1]:9000", 80).unwrap(), ("::1".to_string(), 9000));
        assert!(targets(&["ftp://x".into()], None).is_err());
        assert!(targets(&["http://h:port".into()], None).is_err());
    }
}
