//! The Microsoft Graph (Entra ID) directory reader: users, groups and their direct members through
//! Graph's delta queries, and each domain's password validity, as one `SourceBatch` per read.
//!
//! One read: a token by OAuth 2.0 client credentials (cached until 5 minutes before it expires),
//! then `users/delta` and `groups/delta` followed page by page through `@odata.nextLink` to the
//! final `@odata.deltaLink` (kept in the cursor for the next read), then `/domains`. Without a
//! cursor the read is full (`SourceBatch::Full`, whole records); with one it starts from the stored
//! delta links (`SourceBatch::Delta`, partial records).
//!
//! The directory is hostile input: every body is bounded, every page parsed whole before anything
//! of it is used, every link followed only when it points at the configured Graph host (a cursor
//! comes back from the database; a page's links come from the network), and a read that fails
//! anywhere returns an error and nothing else. HTTP is blocking `ureq` on tokio's blocking pool;
//! waits (throttling) are async sleeps.
//!
//! Limits, and what happens past them:
//! - a page body over 32 MiB, a token answer over 1 MiB: the read fails (Malformed);
//! - more than 100,000 pages in one read (Graph's default page size is 100-200 objects, so 5
//!   million users need up to 50,000 pages), more than 5,000,000 users or groups, more than
//!   50,000,000 member references: the read fails (Other), nothing is applied;
//! - an object id over 256 bytes, a UPN over 1 KiB, a link over 32 KiB: refused (Malformed),
//!   since they identify things and a shortened one would name something else;
//! - any other string field over 4 KiB is truncated at a character boundary (Graph itself caps
//!   them far lower: a longer value is noise, and refusing it would stop every sync over one
//!   field); `businessPhones` keeps at most 64 numbers.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tenon_core::dirsync::{
    MemberChange, Members, SourceBatch, SourceError, SourceErrorKind, SourceGroup, SourceUser, SyncProgress,
};
use zeroize::Zeroizing;

use super::Progress;

pub const DEFAULT_AUTHORITY: &str = "https://login.microsoftonline.com";
pub const DEFAULT_GRAPH_URL: &str = "https://graph.microsoft.com";
/// The token scope for the global Graph service (and for a loopback test server).
const DEFAULT_SCOPE: &str = "https://graph.microsoft.com/.default";

/// The user properties a read asks for (`$select`), as Graph names them. `id`,
/// `userPrincipalName` and `accountEnabled` become `SourceUser`'s own fields; the rest go into
/// `record` under these names.
pub const USER_SELECT: &[&str] = &[
    "displayName",
    "givenName",
    "surname",
    "jobTitle",
    "department",
    "companyName",
    "mail",
    "businessPhones",
    "mobilePhone",
    "faxNumber",
    "officeLocation",
    "streetAddress",
    "city",
    "postalCode",
    "state",
    "country",
    "id",
    "userPrincipalName",
    "onPremisesExtensionAttributes",
    "accountEnabled",
    "lastPasswordChangeDateTime",
    "passwordPolicies",
    "onPremisesSyncEnabled",
];
const GROUP_SELECT: &str = "displayName,members";
const DOMAIN_SELECT: &str = "id,isVerified,passwordValidityPeriodInDays";

const MAX_PAGE_BYTES: u64 = 32 << 20;
const MAX_TOKEN_BYTES: u64 = 1 << 20;
const MAX_ERROR_BODY_BYTES: u64 = 64 << 10;
const MAX_PAGES: u64 = 100_000;
const MAX_USERS: usize = 5_000_000;
const MAX_GROUPS: usize = 5_000_000;
const MAX_MEMBER_REFS: u64 = 50_000_000;
const MAX_DOMAINS: usize = 10_000;
pub const MAX_FIELD_BYTES: usize = 4096;
const MAX_ID_BYTES: usize = 256;
const MAX_UPN_BYTES: usize = 1024;
const MAX_LINK_BYTES: usize = 32 << 10;
const MAX_PHONES: usize = 64;
/// How much of a remote error text goes into a message.
const MAX_REMOTE_TEXT: usize = 300;
/// A token is used until this long before Entra says it expires.
const TOKEN_MARGIN: Duration = Duration::from_secs(300);
/// Total time one read waits on throttling by default.
pub const DEFAULT_MAX_RETRY_WAIT: Duration = Duration::from_secs(300);
/// Throttling answers one read accepts whatever they ask (a server answering `Retry-After: 0`
/// forever must not keep a read alive forever).
const MAX_RETRIES: u32 = 100;
/// A `Retry-After` longer than this is taken as this (it is then over any sensible cap anyway).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
const IO_TIMEOUT: Duration = Duration::from_secs(120);
/// The whole request including a 32 MiB body on a slow line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

/// Where a Graph source is: the tenant, the app registration, and the two services (other national
/// clouds, or a test server on loopback).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphConfig {
    pub tenant_id: String,
    pub client_id: String,
    #[serde(default = "default_authority")]
    pub authority: String,
    #[serde(default = "default_graph_url")]
    pub graph_url: String,
}

fn default_authority() -> String {
    DEFAULT_AUTHORITY.to_string()
}

fn default_graph_url() -> String {
    DEFAULT_GRAPH_URL.to_string()
}

impl GraphConfig {
    /// A source in the global Microsoft cloud.
    pub fn new(tenant_id: impl Into<String>, client_id: impl Into<String>) -> Self {
        Self {
            tenant_id: tenant_id.into(),
            client_id: client_id.into(),
            authority: default_authority(),
            graph_url: default_graph_url(),
        }
    }
}

struct CachedToken {
    value: Zeroizing<String>,
    use_until: Instant,
}

/// Reads one Entra tenant through Microsoft Graph. Holds the client secret (wiped on drop, never
/// printed) and the current access token.
pub struct GraphReader {
    config: GraphConfig,
    secret: Zeroizing<String>,
    token_url: String,
    scope: String,
    /// `graph_url` without a trailing slash, to append `/v1.0/...` to.
    graph_base: String,
    graph_origin: url::Origin,
    graph_host: String,
    authority_host: String,
    agent: ureq::Agent,
    token: Mutex<Option<CachedToken>>,
    max_retry_wait: Duration,
}

impl std::fmt::Debug for GraphReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GraphReader")
            .field("config", &self.config)
            .field("client_secret", &"<redacted>")
            .field("max_retry_wait", &self.max_retry_wait)
            .finish_non_exhaustive()
    }
}

fn err(kind: SourceErrorKind, message: impl Into<String>) -> SourceError {
    SourceError::new(kind, message)
}

/// Checks a configured service URL: https, or plain http only to this machine (a test server or a
/// local relay); no credentials, query or fragment. Returns the URL without a trailing slash.
pub fn check_service_url(what: &str, raw: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(raw.trim()).map_err(|e| format!("{what} `{}` is not a URL: {e}", clean(raw, 200)))?;
    let host = url.host().ok_or_else(|| format!("{what} `{url}` has no host"))?;
    match url.scheme() {
        "https" => {}
        "http" if is_loopback(&host) => {}
        "http" => return Err(format!("{what} `{url}` uses plain http off this machine: use https")),
        other => return Err(format!("{what} `{url}` must be https, not {other}")),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!("{what} must not carry credentials"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("{what} `{url}` must not have a query or fragment"));
    }
    Ok(url)
}

fn is_loopback(host: &url::Host<&str>) -> bool {
    match host {
        url::Host::Domain(d) => d.eq_ignore_ascii_case("localhost"),
        url::Host::Ipv4(ip) => ip.is_loopback(),
        url::Host::Ipv6(ip) => ip.is_loopback(),
    }
}

/// A tenant id goes into the token URL's path: a GUID or a domain name, nothing that could
/// change the path.
fn check_tenant_id(t: &str) -> Result<(), String> {
    let ok = !t.is_empty() && t.len() <= 256 && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "tenant id `{}` is not a tenant id (the directory (tenant) ID GUID or a verified domain)",
            clean(t, 100)
        ))
    }
}

fn check_client_id(c: &str) -> Result<(), String> {
    let ok = !c.is_empty() && c.len() <= 256 && c.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(format!("client id `{}` is not an application (client) ID", clean(c, 100)))
    }
}

impl GraphReader {
    /// Checks the configuration; makes no request. The secret is trimmed of surrounding
    /// whitespace (Entra secrets have none; a secret file usually ends in a newline).
    pub fn new(config: GraphConfig, client_secret: String) -> Result<Self, SourceError> {
        let client_secret = Zeroizing::new(client_secret);
        let other = |m: String| err(SourceErrorKind::Other, m);
        check_tenant_id(&config.tenant_id).map_err(other)?;
        check_client_id(&config.client_id).map_err(other)?;
        let secret = Zeroizing::new(client_secret.trim().to_string());
        if secret.is_empty() || secret.len() > 4096 {
            return Err(err(SourceErrorKind::Credentials, "the client secret is empty or longer than 4 KiB"));
        }
        let authority = check_service_url("authority", &config.authority).map_err(other)?;
        let graph = check_service_url("Graph URL", &config.graph_url).map_err(other)?;
        let authority_base = authority.as_str().trim_end_matches('/').to_string();
        let graph_base = graph.as_str().trim_end_matches('/').to_string();
        // The scope names the Graph service the token is for: a national cloud's own
        // (`https://graph.microsoft.us/.default`); a loopback test server stands in for the global one.
        let scope =
            if graph.scheme() == "https" { format!("{graph_base}/.default") } else { DEFAULT_SCOPE.to_string() };
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(CONNECT_TIMEOUT)
            .timeout_read(IO_TIMEOUT)
            .timeout_write(IO_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            // Never follow a redirect: every URL fetched is one checked against the configured hosts.
            .redirects(0)
            .user_agent(concat!("tenon-server/", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(Self {
            token_url: format!("{authority_base}/{}/oauth2/v2.0/token", config.tenant_id),
            scope,
            graph_origin: graph.origin(),
            graph_host: host_of(&graph),
            authority_host: host_of(&authority),
            graph_base,
            config,
            secret,
            agent,
            token: Mutex::new(None),
            max_retry_wait: DEFAULT_MAX_RETRY_WAIT,
        })
    }

    /// The longest one read waits in total on throttling (429/503 with `Retry-After`) before it
    /// gives up with `Throttled`. Default 5 minutes.
    pub fn with_max_retry_wait(mut self, wait: Duration) -> Self {
        self.max_retry_wait = wait;
        self
    }

    pub fn config(&self) -> &GraphConfig {
        &self.config
    }

    /// One read. `cursor` `None`: a full read, `SourceBatch::Full`. `Some`: the changes since the
    /// delta links in it, `SourceBatch::Delta`; a cursor this reader cannot use (unparseable, off
    /// the Graph host, answered 410 Gone, or 400 `syncStateNotFound` as Graph answers delta links
    /// older than 7 days) fails with `CursorExpired`, and the caller reads again with `None`.
    /// Partway failures return the error and nothing else; `progress` is called after every page.
    pub async fn read(&self, cursor: Option<&str>, progress: Progress<'_>) -> Result<SourceBatch, SourceError> {
        let mut run = Run { progress, totals: SyncProgress::default(), waited: Duration::ZERO, retries: 0 };
        let mode = if cursor.is_some() { Mode::Delta } else { Mode::Full };
        let (users_start, groups_start) = match cursor {
            None => (
                format!("{}/v1.0/users/delta?$select={}", self.graph_base, USER_SELECT.join(",")),
                format!("{}/v1.0/groups/delta?$select={GROUP_SELECT}", self.graph_base),
            ),
            Some(c) => {
                let c = parse_cursor(c, &self.graph_origin).map_err(|m| err(SourceErrorKind::CursorExpired, m))?;
                (c.users, c.groups)
            }
        };

        let mut users = UserAcc::default();
        let users_link = self
            .collect(&mut run, users_start, Endpoint::Users, mode, parse_users_page, |items, run| {
                users.add(items, mode)?;
                run.totals.users = users.count() as u64;
                Ok(())
            })
            .await?;
        let mut groups = GroupAcc::default();
        let groups_link = self
            .collect(&mut run, groups_start, Endpoint::Groups, mode, parse_groups_page, |items, run| {
                groups.add(items, mode)?;
                run.totals.groups = groups.count() as u64;
                Ok(())
            })
            .await?;
        let mut password_validity_days = BTreeMap::new();
        let domains_start = format!("{}/v1.0/domains?$select={DOMAIN_SELECT}", self.graph_base);
        self.collect(&mut run, domains_start, Endpoint::Domains, mode, parse_domains_page, |items, _| {
            for (domain, days) in items {
                password_validity_days.insert(domain, days);
            }
            if password_validity_days.len() > MAX_DOMAINS {
                return Err(err(SourceErrorKind::Other, format!("Graph listed more than {MAX_DOMAINS} domains")));
            }
            Ok(())
        })
        .await?;

        let (Some(users_link), Some(groups_link)) = (users_link, groups_link) else {
            // `collect` returns a delta link for both delta endpoints or fails.
            return Err(err(SourceErrorKind::Malformed, "Graph ended a delta round without an @odata.deltaLink"));
        };
        let cursor = Some(write_cursor(&users_link, &groups_link));
        let (users_changed, users_removed) = users.finish();
        let (groups_changed, groups_removed) = groups.finish(mode)?;
        Ok(match mode {
            Mode::Full => {
                SourceBatch::Full { users: users_changed, groups: groups_changed, cursor, password_validity_days }
            }
            Mode::Delta => SourceBatch::Delta {
                users_changed,
                users_removed,
                groups_changed,
                groups_removed,
                cursor,
                password_validity_days,
            },
        })
    }

    /// Follows one collection from `start` through its next links; hands each page's items to
    /// `sink`. Returns the final delta link (`None` for `/domains`, which has none).
    async fn collect<T: Send + 'static>(
        &self,
        run: &mut Run<'_>,
        start: String,
        endpoint: Endpoint,
        mode: Mode,
        parse: fn(&[u8], Mode) -> Result<Page<T>, String>,
        mut sink: impl FnMut(Vec<T>, &mut Run<'_>) -> Result<(), SourceError>,
    ) -> Result<Option<String>, SourceError> {
        let mut url = start;
        let mut page_no: u64 = 0;
        loop {
            page_no += 1;
            run.totals.pages += 1;
            if run.totals.pages > MAX_PAGES {
                return Err(err(
                    SourceErrorKind::Other,
                    format!("Graph sent more than {MAX_PAGES} pages in one read; nothing was applied"),
                ));
            }
            // `/domains` is read whole every time: its answers say nothing about the cursor.
            let cursor_mode = if endpoint == Endpoint::Domains { Mode::Full } else { mode };
            let body = self.graph_get(run, &url, endpoint, cursor_mode).await?;
            let page = tokio::task::spawn_blocking(move || parse(&body, mode))
                .await
                .map_err(|_| err(SourceErrorKind::Other, "parsing a Graph page failed unexpectedly"))?
                .map_err(|detail| {
                    err(
                        SourceErrorKind::Malformed,
                        format!(
                            "Graph's {} page {page_no} is malformed: {detail}; nothing was applied",
                            endpoint.name()
                        ),
                    )
                })?;
            sink(page.items, run)?;
            (run.progress)(run.totals);
            let malformed_link =
                |m: String| err(SourceErrorKind::Malformed, format!("Graph's {} page {page_no}: {m}", endpoint.name()));
            match (page.next, page.delta) {
                (Some(next), _) => url = check_link(&next, &self.graph_origin).map_err(malformed_link)?,
                (None, Some(delta)) if endpoint != Endpoint::Domains => {
                    return Ok(Some(check_link(&delta, &self.graph_origin).map_err(malformed_link)?));
                }
                (None, _) if endpoint == Endpoint::Domains => return Ok(None),
                (None, _) => {
                    return Err(malformed_link("neither an @odata.nextLink nor an @odata.deltaLink".to_string()));
                }
            }
        }
    }

    /// One GET to Graph, answered 200 (the body is returned): throttling waited out, an expired
    /// token renewed once, everything else turned into an error an administrator can act on.
    async fn graph_get(
        &self,
        run: &mut Run<'_>,
        url: &str,
        endpoint: Endpoint,
        mode: Mode,
    ) -> Result<Vec<u8>, SourceError> {
        let mut renewed = false;
        loop {
            let token = self.token(run).await?;
            let bearer = Zeroizing::new(format!("Bearer {}", token.as_str()));
            let request = Request::Get { url: url.to_string(), bearer };
            let reply = self.send(request, MAX_PAGE_BYTES, &self.graph_host).await?;
            match reply.status {
                200 if reply.truncated => {
                    return Err(err(
                        SourceErrorKind::Malformed,
                        format!(
                            "a Graph {} page is larger than {} MiB; nothing was applied",
                            endpoint.name(),
                            MAX_PAGE_BYTES >> 20
                        ),
                    ));
                }
                200 => return Ok(reply.body),
                401 if !renewed => {
                    // The token expired early or was revoked: one new token, one more try.
                    renewed = true;
                    self.forget_token();
                }
                401 => {
                    let (code, message) = self.graph_error_text(&reply.body, &token);
                    return Err(err(
                        SourceErrorKind::Credentials,
                        format!("Graph at {} refused a fresh token (401 {code}: {message})", self.graph_host),
                    ));
                }
                403 => {
                    let (code, message) = self.graph_error_text(&reply.body, &token);
                    return Err(err(
                        SourceErrorKind::Permissions,
                        format!(
                            "Graph refused to list {} (403 {code}: {message}): the app registration needs the \
                             Microsoft Graph application permission {} and an administrator must grant admin consent \
                             for it (a sync needs User.Read.All, GroupMember.Read.All and Domain.Read.All)",
                            endpoint.name(),
                            endpoint.permission()
                        ),
                    ));
                }
                410 => {
                    let kind =
                        if mode == Mode::Delta { SourceErrorKind::CursorExpired } else { SourceErrorKind::Other };
                    return Err(err(
                        kind,
                        format!(
                            "Graph answered 410 Gone for the {} delta link: its sync state expired, a full read is needed",
                            endpoint.name()
                        ),
                    ));
                }
                // Identity delta links live 7 days; an older one is answered 400 `syncStateNotFound`
                // ("the delta token is expired and data must be synchronized again").
                400 if mode == Mode::Delta && sync_state_lost(&reply.body) => {
                    return Err(err(
                        SourceErrorKind::CursorExpired,
                        format!(
                            "Graph no longer knows the {} delta link (syncStateNotFound: delta links expire after \
                             7 days): a full read is needed",
                            endpoint.name()
                        ),
                    ));
                }
                429 | 503 | 504 => self.wait_throttled(run, reply.retry_after, reply.status, &self.graph_host).await?,
                status => {
                    let (code, message) = self.graph_error_text(&reply.body, &token);
                    return Err(err(
                        SourceErrorKind::Other,
                        format!(
                            "Graph at {} answered {status} listing {} ({code}: {message})",
                            self.graph_host,
                            endpoint.name()
                        ),
                    ));
                }
            }
        }
    }

    /// Waits out one throttling answer, unless that would take the read over its total wait.
    async fn wait_throttled(
        &self,
        run: &mut Run<'_>,
        retry_after: Option<Duration>,
        status: u16,
        host: &str,
    ) -> Result<(), SourceError> {
        run.retries += 1;
        // Without Retry-After, back off exponentially from 1 s (Graph's guidance), at most a minute.
        let wait = retry_after.unwrap_or_else(|| Duration::from_secs(1u64 << run.retries.saturating_sub(1).min(6)));
        if run.retries > MAX_RETRIES || run.waited + wait > self.max_retry_wait {
            return Err(err(
                SourceErrorKind::Throttled,
                format!(
                    "{host} is throttling (HTTP {status}, asked to wait {} s more after {} s already waited in this \
                     read); the sync gives up after {} s and the next one tries again",
                    wait.as_secs(),
                    run.waited.as_secs(),
                    self.max_retry_wait.as_secs()
                ),
            ));
        }
        tracing::info!(host, status, wait_secs = wait.as_secs_f64(), "Graph directory read throttled, waiting");
        run.waited += wait;
        tokio::time::sleep(wait).await;
        Ok(())
    }

    fn forget_token(&self) {
        *self.token.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The cached access token, or a new one from Entra.
    async fn token(&self, run: &mut Run<'_>) -> Result<Zeroizing<String>, SourceError> {
        {
            let cached = self.token.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(t) = cached.as_ref().filter(|t| Instant::now() < t.use_until) {
                return Ok(t.value.clone());
            }
        }
        loop {
            let request = Request::PostForm {
                url: self.token_url.clone(),
                fields: vec![
                    ("client_id", Zeroizing::new(self.config.client_id.clone())),
                    ("client_secret", self.secret.clone()),
                    ("scope", Zeroizing::new(self.scope.clone())),
                    ("grant_type", Zeroizing::new("client_credentials".to_string())),
                ],
            };
            let asked = Instant::now();
            let reply = self.send(request, MAX_TOKEN_BYTES, &self.authority_host).await?;
            match reply.status {
                200 => {
                    let answer = parse_token_answer(&reply.body, reply.truncated).map_err(|m| {
                        err(
                            SourceErrorKind::Malformed,
                            format!("Entra's token answer from {} {m}", self.authority_host),
                        )
                    })?;
                    let lifetime = Duration::from_secs(answer.expires_in);
                    let use_until = asked + lifetime.saturating_sub(TOKEN_MARGIN);
                    let value = answer.access_token;
                    *self.token.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(CachedToken { value: value.clone(), use_until });
                    return Ok(value);
                }
                429 | 503 | 504 => {
                    self.wait_throttled(run, reply.retry_after, reply.status, &self.authority_host).await?
                }
                status => {
                    let e = classify_token_error(status, &reply.body, &self.config, &self.authority_host);
                    return Err(SourceError { message: redact(&e.message, &[self.secret.as_str()]), ..e });
                }
            }
        }
    }

    /// Graph's `error.code` and `error.message`, bounded and cleaned, with no token in them.
    fn graph_error_text(&self, body: &[u8], token: &str) -> (String, String) {
        let (code, message) = graph_error(body);
        let secrets = [self.secret.as_str(), token];
        (redact(&code, &secrets), redact(&message, &secrets))
    }

    async fn send(&self, request: Request, limit: u64, host: &str) -> Result<Reply, SourceError> {
        let agent = self.agent.clone();
        let outcome = tokio::task::spawn_blocking(move || request.run(&agent, limit))
            .await
            .map_err(|_| err(SourceErrorKind::Other, "an HTTP request to the directory failed unexpectedly"))?;
        outcome.map_err(|why| {
            err(SourceErrorKind::Unreachable, format!("cannot reach {host}: {}", redact(&why, &[self.secret.as_str()])))
        })
    }
}

/// Totals and the throttling budget of one read.
struct Run<'a> {
    progress: Progress<'a>,
    totals: SyncProgress,
    waited: Duration,
    retries: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Full,
    Delta,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Endpoint {
    Users,
    Groups,
    Domains,
}

impl Endpoint {
    fn name(self) -> &'static str {
        match self {
            Endpoint::Users => "users",
            Endpoint::Groups => "groups",
            Endpoint::Domains => "domains",
        }
    }

    fn permission(self) -> &'static str {
        match self {
            Endpoint::Users => "User.Read.All",
            Endpoint::Groups => "GroupMember.Read.All",
            Endpoint::Domains => "Domain.Read.All",
        }
    }
}

fn host_of(url: &url::Url) -> String {
    match url.port() {
        Some(p) => format!("{}:{p}", url.host_str().unwrap_or("?")),
        None => url.host_str().unwrap_or("?").to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP, on the blocking pool.

enum Request {
    Get { url: String, bearer: Zeroizing<String> },
    PostForm { url: String, fields: Vec<(&'static str, Zeroizing<String>)> },
}

struct Reply {
    status: u16,
    retry_after: Option<Duration>,
    body: Vec<u8>,
    /// The body was longer than the limit (only the limit was read).
    truncated: bool,
}

impl Request {
    /// Sends the request and reads at most `limit` bytes of the answer (any status). `Err` is a
    /// transport failure in words, without the URL (which may hold long tokens).
    fn run(self, agent: &ureq::Agent, limit: u64) -> Result<Reply, String> {
        let result = match &self {
            Request::Get { url, bearer } => {
                agent.get(url).set("Authorization", bearer).set("Accept", "application/json").call()
            }
            Request::PostForm { url, fields } => {
                let form: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
                agent.post(url).set("Accept", "application/json").send_form(&form)
            }
        };
        let response = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(ureq::Error::Transport(t)) => return Err(describe_transport(&t)),
        };
        let status = response.status();
        let retry_after = response.header("Retry-After").and_then(parse_retry_after);
        let limit = if status == 200 { limit } else { limit.min(MAX_ERROR_BODY_BYTES) };
        let mut body = Vec::new();
        response
            .into_reader()
            .take(limit + 1)
            .read_to_end(&mut body)
            .map_err(|e| format!("the connection failed while reading the answer ({})", clean(&e.to_string(), 200)))?;
        let truncated = body.len() as u64 > limit;
        body.truncate(limit as usize);
        Ok(Reply { status, retry_after, body, truncated })
    }
}

fn describe_transport(t: &ureq::Transport) -> String {
    let mut why = t.kind().to_string();
    if let Some(m) = t.message() {
        why.push_str(": ");
        why.push_str(m);
    }
    if let Some(source) = std::error::Error::source(t) {
        why.push_str(": ");
        why.push_str(&source.to_string());
    }
    clean(&why, MAX_REMOTE_TEXT)
}

/// `Retry-After` in seconds (Graph sends seconds); an HTTP date or garbage counts as absent.
fn parse_retry_after(v: &str) -> Option<Duration> {
    let secs: u64 = v.trim().parse().ok()?;
    Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER))
}

// ---------------------------------------------------------------------------------------------
// Tokens.

struct TokenAnswer {
    access_token: Zeroizing<String>,
    expires_in: u64,
}

/// Entra's token answer: `access_token` (printable ASCII: it goes into a header) and `expires_in`
/// (a number, or a string of one as older endpoints send it).
fn parse_token_answer(body: &[u8], truncated: bool) -> Result<TokenAnswer, String> {
    if truncated {
        return Err(format!("is larger than {} KiB", MAX_TOKEN_BYTES >> 10));
    }
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("is not JSON ({e})"))?;
    let token = v.get("access_token").and_then(Value::as_str).ok_or("has no access_token")?;
    if token.is_empty() || token.len() > 64 << 10 || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("has an access_token that cannot be sent in a header".to_string());
    }
    let expires_in = match v.get("expires_in") {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    }
    .ok_or("has no expires_in in seconds")?;
    Ok(TokenAnswer { access_token: Zeroizing::new(token.to_string()), expires_in })
}

/// What an Entra token error means for the administrator. Entra answers `{"error",
/// "error_description": "AADSTS7000215: Invalid client secret provided. ...", "error_codes":
/// [7000215], ...}`.
fn classify_token_error(status: u16, body: &[u8], config: &GraphConfig, host: &str) -> SourceError {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let error = v.get("error").and_then(Value::as_str).map(|s| clean(s, 100)).unwrap_or_default();
    let description = v.get("error_description").and_then(Value::as_str).unwrap_or("");
    // The first line of the description is the message; the rest is trace and correlation ids.
    let first_line = clean(description.lines().next().unwrap_or(""), MAX_REMOTE_TEXT);
    let code = v
        .get("error_codes")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(Value::as_u64)
        .or_else(|| aadsts_code(description));
    let tenant = clean(&config.tenant_id, 100);
    let client = clean(&config.client_id, 100);
    let rerun = "create a new secret and run `tenonctl directory add graph ... --client-secret-file FILE --replace`";
    match code {
        Some(7000215) => {
            err(SourceErrorKind::Credentials, format!("client secret rejected by Entra (AADSTS7000215): {rerun}"))
        }
        Some(7000222) => err(SourceErrorKind::Credentials, format!("client secret expired (AADSTS7000222): {rerun}")),
        Some(700016) => err(
            SourceErrorKind::Credentials,
            format!(
                "application {client} not found in tenant {tenant} (AADSTS700016): check --client-id (the app \
                 registration's Application (client) ID) and that the app is registered in, or consented to by, \
                 this tenant"
            ),
        ),
        Some(90002) => err(
            SourceErrorKind::Other,
            format!(
                "tenant {tenant} not found (AADSTS90002): check --tenant-id (the Directory (tenant) ID or a verified \
                 domain) and --authority (national clouds have their own)"
            ),
        ),
        code => {
            let kind = if matches!(error.as_str(), "invalid_client" | "unauthorized_client") || status == 401 {
                SourceErrorKind::Credentials
            } else {
                SourceErrorKind::Other
            };
            let code = code.map(|c| format!(" AADSTS{c}")).unwrap_or_default();
            let error = if error.is_empty() { String::new() } else { format!(" {error}") };
            err(kind, format!("Entra at {host} refused the token request ({status}{error}{code}): {first_line}"))
        }
    }
}

/// The number in `AADSTS<digits>:` at the start of a description.
fn aadsts_code(description: &str) -> Option<u64> {
    let rest = description.trim_start().strip_prefix("AADSTS")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).take(12).collect();
    digits.parse().ok()
}

/// Graph's `{"error": {"code", "message"}}`, cleaned and bounded; placeholders when absent.
fn graph_error(body: &[u8]) -> (String, String) {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let e = v.get("error");
    let code = e.and_then(|e| e.get("code")).and_then(Value::as_str).map(|s| clean(s, 100));
    let message = e.and_then(|e| e.get("message")).and_then(Value::as_str).map(|s| clean(s, MAX_REMOTE_TEXT));
    (code.unwrap_or_else(|| "no error code".to_string()), message.unwrap_or_else(|| "no message".to_string()))
}

/// Graph's way of saying a delta token expired or its state is gone.
fn sync_state_lost(body: &[u8]) -> bool {
    let (code, _) = graph_error(body);
    code.eq_ignore_ascii_case("syncStateNotFound") || code.eq_ignore_ascii_case("resyncRequired")
}

/// Remote text made safe for a message: control characters become spaces, at most `max` chars.
fn clean(s: &str, max: usize) -> String {
    let mut out: String = s.chars().take(max).map(|c| if c.is_control() { ' ' } else { c }).collect();
    if s.chars().nth(max).is_some() {
        out.push('…');
    }
    out
}

/// Belt and braces: no secret ever leaves in a message, whatever a remote end echoed.
fn redact(s: &str, secrets: &[&str]) -> String {
    let mut out = s.to_string();
    for secret in secrets.iter().filter(|x| x.len() >= 4) {
        out = out.replace(secret, "[redacted]");
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Cursor and links.

#[derive(Serialize, Deserialize)]
struct Cursor {
    v: u32,
    users: String,
    groups: String,
}

fn write_cursor(users: &str, groups: &str) -> String {
    serde_json::json!({"v": 1, "users": users, "groups": groups}).to_string()
}

/// The stored cursor's delta links, each checked to point at the configured Graph host.
fn parse_cursor(raw: &str, origin: &url::Origin) -> Result<Cursor, String> {
    let c: Cursor = serde_json::from_str(raw).map_err(|_| "the stored Graph cursor is unreadable".to_string())?;
    if c.v != 1 {
        return Err(format!("the stored Graph cursor has version {}, this server reads 1", c.v));
    }
    let users = check_link(&c.users, origin).map_err(|m| format!("the stored users delta link: {m}"))?;
    let groups = check_link(&c.groups, origin).map_err(|m| format!("the stored groups delta link: {m}"))?;
    Ok(Cursor { v: 1, users, groups })
}

/// A next or delta link is followed only to the configured Graph host (scheme, host and port):
/// it came from the network or the database, and the request carries the token.
fn check_link(link: &str, origin: &url::Origin) -> Result<String, String> {
    if link.len() > MAX_LINK_BYTES {
        return Err(format!("a link longer than {} KiB", MAX_LINK_BYTES >> 10));
    }
    let url = url::Url::parse(link).map_err(|_| "a link that is not a URL".to_string())?;
    if &url.origin() != origin || !url.username().is_empty() || url.password().is_some() {
        return Err(format!("a link to {}, not to the configured Graph host", clean(&host_of(&url), 100)));
    }
    Ok(url.to_string())
}

// ---------------------------------------------------------------------------------------------
// Pages: pure parsing, run on the blocking pool.

struct Page<T> {
    next: Option<String>,
    delta: Option<String>,
    items: Vec<T>,
}

#[derive(Deserialize)]
struct RawPage {
    #[serde(rename = "@odata.nextLink", default)]
    next: Option<String>,
    #[serde(rename = "@odata.deltaLink", default)]
    delta: Option<String>,
    value: Vec<Map<String, Value>>,
}

fn parse_page<T>(body: &[u8], item: impl Fn(Map<String, Value>) -> Result<T, String>) -> Result<Page<T>, String> {
    let raw: RawPage = serde_json::from_slice(body).map_err(|e| format!("not a Graph collection ({e})"))?;
    let items = raw.value.into_iter().map(item).collect::<Result<Vec<_>, _>>()?;
    Ok(Page { next: raw.next, delta: raw.delta, items })
}

#[derive(Debug, PartialEq)]
enum UserItem {
    Upsert(SourceUser),
    Removed(String),
}

fn parse_users_page(body: &[u8], mode: Mode) -> Result<Page<UserItem>, String> {
    parse_page(body, |o| parse_user(o, mode == Mode::Delta))
}

/// The object's `id`: present, a string, short, printable.
fn object_id(o: &Map<String, Value>) -> Result<String, String> {
    let id = o.get("id").and_then(Value::as_str).ok_or("an object without an id")?;
    if id.is_empty() || id.len() > MAX_ID_BYTES || id.chars().any(char::is_control) {
        return Err(format!("an object id `{}` that is empty, too long or not printable", clean(id, 60)));
    }
    Ok(id.to_string())
}

/// One user of a `users/delta` page. In a whole record (`partial` false) absent, null and empty
/// values are all left out; in a partial one null (and an empty list) clears the field, absent
/// leaves it unchanged.
fn parse_user(o: Map<String, Value>, partial: bool) -> Result<UserItem, String> {
    let id = object_id(&o)?;
    if o.contains_key("@removed") {
        return Ok(UserItem::Removed(id));
    }
    let bad = |field: &str, expected: &str| format!("user {id}: {field} is not {expected}");
    let upn = match o.get("userPrincipalName") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_UPN_BYTES && !s.chars().any(char::is_control) => {
            Some(s.clone())
        }
        Some(_) => return Err(bad("userPrincipalName", "a UPN")),
    };
    let account_enabled = match o.get("accountEnabled") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(false)) => Some(false),
        // A whole record says "enabled" by leaving it out (see `SourceUser::account_enabled`).
        Some(Value::Bool(true)) => partial.then_some(true),
        Some(_) => return Err(bad("accountEnabled", "true or false")),
    };
    let mut record = Map::new();
    for &field in USER_SELECT {
        if matches!(field, "id" | "userPrincipalName" | "accountEnabled") {
            continue;
        }
        let Some(value) = o.get(field) else { continue };
        let value = match (field, value) {
            (_, Value::Null) => Value::Null,
            ("businessPhones", Value::Array(phones)) => {
                let phones = phones
                    .iter()
                    .take(MAX_PHONES)
                    .map(|p| p.as_str().map(|s| Value::String(truncate(s))))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| bad(field, "a list of strings"))?;
                if phones.is_empty() {
                    Value::Null
                } else {
                    Value::Array(phones)
                }
            }
            ("onPremisesExtensionAttributes", Value::Object(attrs)) => {
                let mut kept = Map::new();
                for (k, v) in attrs {
                    if !is_extension_attribute(k) {
                        continue;
                    }
                    match v {
                        Value::String(s) => {
                            kept.insert(k.clone(), Value::String(truncate(s)));
                        }
                        Value::Null if partial => {
                            kept.insert(k.clone(), Value::Null);
                        }
                        Value::Null => {}
                        _ => return Err(bad(field, "an object of strings")),
                    }
                }
                if kept.is_empty() {
                    Value::Null
                } else {
                    Value::Object(kept)
                }
            }
            ("onPremisesSyncEnabled", Value::Bool(b)) => Value::Bool(*b),
            ("onPremisesSyncEnabled", _) => return Err(bad(field, "true, false or null")),
            ("businessPhones", _) => return Err(bad(field, "a list of strings")),
            ("onPremisesExtensionAttributes", _) => return Err(bad(field, "an object")),
            (_, Value::String(s)) => Value::String(truncate(s)),
            (_, _) => return Err(bad(field, "a string")),
        };
        if value.is_null() && !partial {
            continue;
        }
        record.insert(field.to_string(), value);
    }
    Ok(UserItem::Upsert(SourceUser { external_id: id, upn, record, account_enabled, partial }))
}

fn is_extension_attribute(k: &str) -> bool {
    k.strip_prefix("extensionAttribute").and_then(|n| n.parse::<u8>().ok()).is_some_and(|n| (1..=15).contains(&n))
}

/// At most `MAX_FIELD_BYTES`, cut at a character boundary.
fn truncate(s: &str) -> String {
    if s.len() <= MAX_FIELD_BYTES {
        return s.to_string();
    }
    let mut end = MAX_FIELD_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

#[derive(Debug, PartialEq)]
enum GroupItem {
    Upsert { id: String, name: Option<String>, members: Vec<MemberRef> },
    Removed(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct MemberRef {
    group: bool,
    id: String,
    removed: bool,
}

fn parse_groups_page(body: &[u8], _mode: Mode) -> Result<Page<GroupItem>, String> {
    parse_page(body, parse_group)
}

/// One group of a `groups/delta` page: `displayName` and `members@delta` (users and groups;
/// other member types, devices, service principals and contacts, are not Tenon's business).
fn parse_group(o: Map<String, Value>) -> Result<GroupItem, String> {
    let id = object_id(&o)?;
    if o.contains_key("@removed") {
        return Ok(GroupItem::Removed(id));
    }
    let name = match o.get("displayName") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(truncate(s)),
        Some(_) => return Err(format!("group {id}: displayName is not a string")),
    };
    let mut members = Vec::new();
    match o.get("members@delta") {
        None | Some(Value::Null) => {}
        Some(Value::Array(list)) => {
            for m in list {
                let m = m.as_object().ok_or_else(|| format!("group {id}: a member is not an object"))?;
                let kind = m.get("@odata.type").and_then(Value::as_str);
                let group = match kind {
                    Some("#microsoft.graph.user") => false,
                    Some("#microsoft.graph.group") => true,
                    Some(_) => continue,
                    None => return Err(format!("group {id}: a member without @odata.type")),
                };
                let member_id = object_id(m).map_err(|e| format!("group {id}: {e}"))?;
                members.push(MemberRef { group, id: member_id, removed: m.contains_key("@removed") });
            }
        }
        Some(_) => return Err(format!("group {id}: members@delta is not a list")),
    }
    Ok(GroupItem::Upsert { id, name, members })
}

/// `/domains`: `passwordValidityPeriodInDays` of each verified domain, by lower-case name.
fn parse_domains_page(body: &[u8], _mode: Mode) -> Result<Page<(String, u32)>, String> {
    let page = parse_page(body, parse_domain)?;
    Ok(Page { next: page.next, delta: page.delta, items: page.items.into_iter().flatten().collect() })
}

fn parse_domain(o: Map<String, Value>) -> Result<Option<(String, u32)>, String> {
    let id = object_id(&o)?.to_ascii_lowercase();
    if o.get("isVerified").and_then(Value::as_bool) == Some(false) {
        return Ok(None);
    }
    match o.get("passwordValidityPeriodInDays") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            let days = v
                .as_u64()
                .and_then(|d| u32::try_from(d).ok())
                .ok_or_else(|| format!("domain {id}: passwordValidityPeriodInDays is not a number of days"))?;
            Ok(Some((id, days)))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Accumulating a read's pages.

/// Users in the order first seen; a user repeated across pages is merged (later values win),
/// one removed is left out (full) or listed as removed (delta).
#[derive(Default)]
struct UserAcc {
    users: Vec<Option<SourceUser>>,
    index: HashMap<String, usize>,
    removed: BTreeSet<String>,
    live: usize,
}

impl UserAcc {
    fn count(&self) -> usize {
        self.live + self.removed.len()
    }

    fn add(&mut self, items: Vec<UserItem>, mode: Mode) -> Result<(), SourceError> {
        for item in items {
            match item {
                UserItem::Upsert(user) => {
                    self.removed.remove(&user.external_id);
                    match self.index.get(&user.external_id).map(|&i| &mut self.users[i]) {
                        Some(Some(held)) => {
                            held.record.extend(user.record);
                            held.upn = user.upn.or(held.upn.take());
                            held.account_enabled = user.account_enabled.or(held.account_enabled);
                        }
                        Some(slot) => {
                            *slot = Some(user);
                            self.live += 1;
                        }
                        None => {
                            self.index.insert(user.external_id.clone(), self.users.len());
                            self.users.push(Some(user));
                            self.live += 1;
                        }
                    }
                }
                UserItem::Removed(id) => {
                    if let Some(slot) = self.index.get(&id).map(|&i| &mut self.users[i]) {
                        if slot.take().is_some() {
                            self.live -= 1;
                        }
                    }
                    // A full read lists what exists; a removal in it (Graph sends recently
                    // deleted objects in an initial round too) only means "not there".
                    if mode == Mode::Delta {
                        self.removed.insert(id);
                    }
                }
            }
            if self.count() > MAX_USERS {
                return Err(err(
                    SourceErrorKind::Other,
                    format!("Graph listed more than {MAX_USERS} users in one read; nothing was applied"),
                ));
            }
        }
        Ok(())
    }

    fn finish(self) -> (Vec<SourceUser>, Vec<String>) {
        (self.users.into_iter().flatten().collect(), self.removed.into_iter().collect())
    }
}

struct GroupState {
    id: String,
    name: Option<String>,
    added: Members,
    removed: Members,
}

#[derive(Default)]
struct GroupAcc {
    groups: Vec<Option<GroupState>>,
    index: HashMap<String, usize>,
    removed: BTreeSet<String>,
    live: usize,
    member_refs: u64,
}

impl GroupAcc {
    fn count(&self) -> usize {
        self.live + self.removed.len()
    }

    fn add(&mut self, items: Vec<GroupItem>, mode: Mode) -> Result<(), SourceError> {
        for item in items {
            match item {
                GroupItem::Upsert { id, name, members } => {
                    self.removed.remove(&id);
                    let i = match self.index.get(&id) {
                        Some(&i) => i,
                        None => {
                            self.index.insert(id.clone(), self.groups.len());
                            self.groups.push(None);
                            self.groups.len() - 1
                        }
                    };
                    let slot = &mut self.groups[i];
                    if slot.is_none() {
                        self.live += 1;
                    }
                    let state = slot.get_or_insert_with(|| GroupState {
                        id,
                        name: None,
                        added: Members::default(),
                        removed: Members::default(),
                    });
                    if name.is_some() {
                        state.name = name;
                    }
                    self.member_refs += members.len() as u64;
                    // In page order: a member added then removed (or the reverse) ends as the last said.
                    for m in members {
                        let (add, remove) = if m.removed {
                            (&mut state.removed, &mut state.added)
                        } else {
                            (&mut state.added, &mut state.removed)
                        };
                        let (into, from) = if m.group {
                            (&mut add.groups, &mut remove.groups)
                        } else {
                            (&mut add.users, &mut remove.users)
                        };
                        from.remove(&m.id);
                        // A whole list has no removals: a removed member is simply not a member.
                        if mode == Mode::Delta || !m.removed {
                            into.insert(m.id);
                        }
                    }
                }
                GroupItem::Removed(id) => {
                    if let Some(slot) = self.index.get(&id).map(|&i| &mut self.groups[i]) {
                        if slot.take().is_some() {
                            self.live -= 1;
                        }
                    }
                    if mode == Mode::Delta {
                        self.removed.insert(id);
                    }
                }
            }
            if self.count() > MAX_GROUPS {
                return Err(err(
                    SourceErrorKind::Other,
                    format!("Graph listed more than {MAX_GROUPS} groups in one read; nothing was applied"),
                ));
            }
            if self.member_refs > MAX_MEMBER_REFS {
                return Err(err(
                    SourceErrorKind::Other,
                    format!("Graph listed more than {MAX_MEMBER_REFS} group members in one read; nothing was applied"),
                ));
            }
        }
        Ok(())
    }

    fn finish(self, mode: Mode) -> Result<(Vec<SourceGroup>, Vec<String>), SourceError> {
        let mut groups = Vec::with_capacity(self.live);
        for g in self.groups.into_iter().flatten() {
            if mode == Mode::Full && g.name.is_none() {
                // Entra requires a displayName; Tenon names groups by it.
                return Err(err(
                    SourceErrorKind::Malformed,
                    format!("Graph listed group {} without a displayName; nothing was applied", g.id),
                ));
            }
            let members = match mode {
                Mode::Full => MemberChange::Whole(g.added),
                Mode::Delta => MemberChange::Changed { added: g.added, removed: g.removed },
            };
            groups.push(SourceGroup { external_id: g.id, name: g.name, members });
        }
        Ok((groups, self.removed.into_iter().collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A case's outcome: the value, or words the error must contain.
    type Expected<T> = Result<T, &'static str>;
    type DomainCase = (Value, Expected<Option<(&'static str, u32)>>);
    /// A body, and its next link, delta link and item count.
    type PageCase = (&'static str, Expected<(Option<&'static str>, Option<&'static str>, usize)>);

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    fn user(id: &str, upn: Option<&str>, record: Value, enabled: Option<bool>, partial: bool) -> UserItem {
        UserItem::Upsert(SourceUser {
            external_id: id.into(),
            upn: upn.map(Into::into),
            record: obj(record),
            account_enabled: enabled,
            partial,
        })
    }

    #[test]
    fn users_parse() {
        let long = "x".repeat(MAX_FIELD_BYTES + 10);
        let cut = "x".repeat(MAX_FIELD_BYTES);
        #[rustfmt::skip]
        let cases: Vec<(Value, bool, Result<UserItem, &str>)> = vec![
            (json!({"id": "u1", "userPrincipalName": "a@x", "displayName": "A", "accountEnabled": true}), false, Ok(user("u1", Some("a@x"), json!({"displayName": "A"}), None, false))),
            (json!({"id": "u1", "accountEnabled": true}), true, Ok(user("u1", None, json!({}), Some(true), true))),
            (json!({"id": "u1", "accountEnabled": false}), false, Ok(user("u1", None, json!({}), Some(false), false))),
            (json!({"id": "u1", "mail": null, "city": "Graz"}), false, Ok(user("u1", None, json!({"city": "Graz"}), None, false))),
            (json!({"id": "u1", "mail": null, "city": "Graz"}), true, Ok(user("u1", None, json!({"mail": null, "city": "Graz"}), None, true))),
            (json!({"id": "u1", "businessPhones": []}), false, Ok(user("u1", None, json!({}), None, false))),
            (json!({"id": "u1", "businessPhones": []}), true, Ok(user("u1", None, json!({"businessPhones": null}), None, true))),
            (json!({"id": "u1", "businessPhones": ["+43 1"]}), false, Ok(user("u1", None, json!({"businessPhones": ["+43 1"]}), None, false))),
            (json!({"id": "u1", "onPremisesExtensionAttributes": {"extensionAttribute1": "a", "extensionAttribute2": null, "other": "z"}}), false, Ok(user("u1", None, json!({"onPremisesExtensionAttributes": {"extensionAttribute1": "a"}}), None, false))),
            (json!({"id": "u1", "onPremisesExtensionAttributes": {"extensionAttribute1": "a", "extensionAttribute2": null}}), true, Ok(user("u1", None, json!({"onPremisesExtensionAttributes": {"extensionAttribute1": "a", "extensionAttribute2": null}}), None, true))),
            (json!({"id": "u1", "onPremisesExtensionAttributes": {"extensionAttribute16": "a"}}), false, Ok(user("u1", None, json!({}), None, false))),
            (json!({"id": "u1", "onPremisesSyncEnabled": true, "passwordPolicies": "DisablePasswordExpiration"}), false, Ok(user("u1", None, json!({"onPremisesSyncEnabled": true, "passwordPolicies": "DisablePasswordExpiration"}), None, false))),
            (json!({"id": "u1", "@odata.type": "#microsoft.graph.user", "unknown": 1, "jobTitle": long}), false, Ok(user("u1", None, json!({"jobTitle": cut}), None, false))),
            (json!({"id": "u1", "@removed": {"reason": "changed"}}), true, Ok(UserItem::Removed("u1".into()))),
            (json!({"id": "u1", "@removed": {"reason": "deleted"}}), false, Ok(UserItem::Removed("u1".into()))),
            (json!({"displayName": "no id"}), false, Err("without an id")),
            (json!({"id": ""}), false, Err("empty")),
            (json!({"id": 7}), false, Err("without an id")),
            (json!({"id": "x".repeat(300)}), false, Err("too long")),
            (json!({"id": "u1", "userPrincipalName": 5}), false, Err("userPrincipalName")),
            (json!({"id": "u1", "userPrincipalName": "a\n@x"}), false, Err("userPrincipalName")),
            (json!({"id": "u1", "accountEnabled": "yes"}), false, Err("accountEnabled")),
            (json!({"id": "u1", "city": 5}), false, Err("city is not a string")),
            (json!({"id": "u1", "businessPhones": "123"}), false, Err("businessPhones")),
            (json!({"id": "u1", "businessPhones": [1]}), false, Err("businessPhones")),
            (json!({"id": "u1", "onPremisesExtensionAttributes": {"extensionAttribute1": 1}}), false, Err("onPremisesExtensionAttributes")),
            (json!({"id": "u1", "onPremisesSyncEnabled": "true"}), false, Err("onPremisesSyncEnabled")),
        ];
        for (input, partial, expected) in cases {
            let got = parse_user(obj(input.clone()), partial);
            match (&got, &expected) {
                (Ok(g), Ok(e)) => assert_eq!(g, e, "{input}"),
                (Err(g), Err(e)) => assert!(g.contains(e), "{input}: {g} should say {e}"),
                _ => panic!("{input}: got {got:?}, expected {expected:?}"),
            }
        }
    }

    fn m(group: bool, id: &str, removed: bool) -> MemberRef {
        MemberRef { group, id: id.into(), removed }
    }

    #[test]
    fn groups_parse() {
        #[rustfmt::skip]
        let cases: Vec<(Value, Result<GroupItem, &str>)> = vec![
            (json!({"id": "g1", "displayName": "Sales"}), Ok(GroupItem::Upsert { id: "g1".into(), name: Some("Sales".into()), members: vec![] })),
            (json!({"id": "g1", "members@delta": [{"@odata.type": "#microsoft.graph.user", "id": "u1"}, {"@odata.type": "#microsoft.graph.group", "id": "g2", "@removed": {"reason": "deleted"}}]}), Ok(GroupItem::Upsert { id: "g1".into(), name: None, members: vec![m(false, "u1", false), m(true, "g2", true)] })),
            (json!({"id": "g1", "members@delta": [{"@odata.type": "#microsoft.graph.device", "id": "d1"}, {"@odata.type": "#microsoft.graph.servicePrincipal", "id": "s1"}]}), Ok(GroupItem::Upsert { id: "g1".into(), name: None, members: vec![] })),
            (json!({"id": "g1", "@removed": {"reason": "deleted"}}), Ok(GroupItem::Removed("g1".into()))),
            (json!({"id": "g1", "displayName": 3}), Err("displayName")),
            (json!({"id": "g1", "members@delta": {}}), Err("not a list")),
            (json!({"id": "g1", "members@delta": ["u1"]}), Err("not an object")),
            (json!({"id": "g1", "members@delta": [{"id": "u1"}]}), Err("@odata.type")),
            (json!({"id": "g1", "members@delta": [{"@odata.type": "#microsoft.graph.user"}]}), Err("without an id")),
        ];
        for (input, expected) in cases {
            let got = parse_group(obj(input.clone()));
            match (&got, &expected) {
                (Ok(g), Ok(e)) => assert_eq!(g, e, "{input}"),
                (Err(g), Err(e)) => assert!(g.contains(e), "{input}: {g} should say {e}"),
                _ => panic!("{input}: got {got:?}, expected {expected:?}"),
            }
        }
    }

    #[test]
    fn domains_parse() {
        #[rustfmt::skip]
        let cases: Vec<DomainCase> = vec![
            (json!({"id": "Contoso.COM", "isVerified": true, "passwordValidityPeriodInDays": 90}), Ok(Some(("contoso.com", 90)))),
            (json!({"id": "contoso.com", "passwordValidityPeriodInDays": 2147483647}), Ok(Some(("contoso.com", 2147483647)))),
            (json!({"id": "unverified.com", "isVerified": false, "passwordValidityPeriodInDays": 90}), Ok(None)),
            (json!({"id": "contoso.com", "passwordValidityPeriodInDays": null}), Ok(None)),
            (json!({"id": "contoso.com", "passwordValidityPeriodInDays": -1}), Err("not a number of days")),
            (json!({"id": "contoso.com", "passwordValidityPeriodInDays": "90"}), Err("not a number of days")),
            (json!({"id": "contoso.com", "passwordValidityPeriodInDays": 5000000000u64}), Err("not a number of days")),
        ];
        for (input, expected) in cases {
            let got = parse_domain(obj(input.clone()));
            match (&got, &expected) {
                (Ok(g), Ok(e)) => assert_eq!(g, &e.map(|(d, n)| (d.to_string(), n)), "{input}"),
                (Err(g), Err(e)) => assert!(g.contains(e), "{input}: {g} should say {e}"),
                _ => panic!("{input}: got {got:?}, expected {expected:?}"),
            }
        }
    }

    #[test]
    fn pages_parse() {
        #[rustfmt::skip]
        let cases: Vec<PageCase> = vec![
            (r#"{"@odata.nextLink": "https://g/n", "value": [{"id": "u1"}]}"#, Ok((Some("https://g/n"), None, 1))),
            (r#"{"@odata.deltaLink": "https://g/d", "value": []}"#, Ok((None, Some("https://g/d"), 0))),
            (r#"{"@odata.context": "x", "value": [{"id": "u1"}, {"id": "u2", "@removed": {}}]}"#, Ok((None, None, 2))),
            (r#"{"value": [{"id": "u1"}"#, Err("not a Graph collection")),
            (r#"{"value": {}}"#, Err("not a Graph collection")),
            (r#"{"@odata.nextLink": 5, "value": []}"#, Err("not a Graph collection")),
            (r#"[]"#, Err("not a Graph collection")),
            (r#"{"value": [1]}"#, Err("not a Graph collection")),
            (r#"{"value": [{"id": "u1", "city": []}]}"#, Err("city")),
        ];
        for (body, expected) in cases {
            let got = parse_users_page(body.as_bytes(), Mode::Full);
            match (&got, &expected) {
                (Ok(p), Ok((next, delta, n))) => {
                    assert_eq!((p.next.as_deref(), p.delta.as_deref(), p.items.len()), (*next, *delta, *n), "{body}")
                }
                (Err(g), Err(e)) => assert!(g.contains(e), "{body}: {g} should say {e}"),
                (Ok(_), Err(e)) => panic!("{body}: parsed, expected {e}"),
                (Err(g), Ok(_)) => panic!("{body}: {g}"),
            }
        }
    }

    #[test]
    fn service_urls() {
        #[rustfmt::skip]
        let cases: Vec<(&str, bool)> = vec![
            ("https://graph.microsoft.com", true),
            ("https://graph.microsoft.com/", true),
            ("https://login.microsoftonline.us", true),
            ("http://127.0.0.1:8080", true),
            ("http://127.8.9.10", true),
            ("http://[::1]:99", true),
            ("http://localhost:99", true),
            ("http://LOCALHOST", true),
            ("http://graph.microsoft.com", false),
            ("http://10.0.0.1", false),
            ("http://localhost.evil.com", false),
            ("http://[::2]", false),
            ("ftp://graph.microsoft.com", false),
            ("https://user:pw@graph.microsoft.com", false),
            ("https://graph.microsoft.com/?x=1", false),
            ("https://graph.microsoft.com/#f", false),
            ("graph.microsoft.com", false),
            ("", false),
        ];
        for (url, ok) in cases {
            assert_eq!(check_service_url("Graph URL", url).is_ok(), ok, "{url}");
        }
    }

    #[test]
    fn links() {
        let origin = url::Url::parse("https://graph.microsoft.com").unwrap().origin();
        #[rustfmt::skip]
        let cases: Vec<(String, bool)> = vec![
            ("https://graph.microsoft.com/v1.0/users/delta?$deltatoken=abc".into(), true),
            ("https://graph.microsoft.com:443/v1.0/users/delta?$skiptoken=abc".into(), true),
            ("https://GRAPH.microsoft.com/v1.0/x".into(), true),
            ("http://graph.microsoft.com/v1.0/x".into(), false),
            ("https://graph.microsoft.com:8443/v1.0/x".into(), false),
            ("https://graph.microsoft.com.evil.com/v1.0/x".into(), false),
            ("https://evil.com/v1.0/x".into(), false),
            ("https://graph.microsoft.com@evil.com/".into(), false),
            ("https://user@graph.microsoft.com/".into(), false),
            ("/v1.0/users/delta".into(), false),
            (format!("https://graph.microsoft.com/{}", "a".repeat(MAX_LINK_BYTES)), false),
        ];
        for (link, ok) in cases {
            assert_eq!(check_link(&link, &origin).is_ok(), ok, "{link}");
        }
    }

    #[test]
    fn cursors() {
        let origin = url::Url::parse("https://graph.microsoft.com").unwrap().origin();
        let good = write_cursor(
            "https://graph.microsoft.com/v1.0/users/delta?$deltatoken=u",
            "https://graph.microsoft.com/v1.0/groups/delta?$deltatoken=g",
        );
        #[rustfmt::skip]
        let cases: Vec<(String, bool)> = vec![
            (good, true),
            (r#"{"v":2,"users":"https://graph.microsoft.com/u","groups":"https://graph.microsoft.com/g"}"#.into(), false),
            (r#"{"v":1,"users":"https://evil.com/u","groups":"https://graph.microsoft.com/g"}"#.into(), false),
            (r#"{"v":1,"users":"https://graph.microsoft.com/u"}"#.into(), false),
            ("12345".into(), false),
            ("".into(), false),
        ];
        for (cursor, ok) in cases {
            assert_eq!(parse_cursor(&cursor, &origin).is_ok(), ok, "{cursor}");
        }
    }

    #[test]
    fn token_errors() {
        let config = GraphConfig::new("contoso.onmicrosoft.com", "11111111-2222-3333-4444-555555555555");
        use SourceErrorKind::*;
        #[rustfmt::skip]
        let cases: Vec<(u16, &str, SourceErrorKind, &str)> = vec![
            (401, r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided.\r\nTrace ID: x","error_codes":[7000215]}"#, Credentials, "client secret rejected by Entra (AADSTS7000215): create a new secret and run `tenonctl directory add graph ... --client-secret-file FILE --replace`"),
            (401, r#"{"error":"invalid_client","error_description":"AADSTS7000222: The provided client secret keys are expired."}"#, Credentials, "client secret expired (AADSTS7000222)"),
            (400, r#"{"error":"unauthorized_client","error_description":"AADSTS700016: Application not found","error_codes":[700016]}"#, Credentials, "AADSTS700016"),
            (400, r#"{"error":"invalid_request","error_description":"AADSTS90002: Tenant not found","error_codes":[90002]}"#, Other, "check --tenant-id"),
            (400, r#"{"error":"invalid_client","error_description":"AADSTS7000218: no secret\u0007","error_codes":[7000218]}"#, Credentials, "(400 invalid_client AADSTS7000218): AADSTS7000218: no secret "),
            (400, r#"{"error":"invalid_scope","error_description":"AADSTS1002012: bad scope"}"#, Other, "AADSTS1002012"),
            (500, "<html>", Other, "(500)"),
        ];
        for (status, body, kind, text) in cases {
            let e = classify_token_error(status, body.as_bytes(), &config, "login.microsoftonline.com");
            assert_eq!(e.kind, kind, "{body}");
            assert!(e.message.contains(text), "{body}: {}", e.message);
        }
    }

    #[test]
    fn small_helpers() {
        #[rustfmt::skip]
        let retry: Vec<(&str, Option<u64>)> = vec![("1", Some(1)), (" 30 ", Some(30)), ("0", Some(0)), ("99999", Some(3600)), ("-1", None), ("Wed, 21 Oct 2015 07:28:00 GMT", None), ("", None)];
        for (v, secs) in retry {
            assert_eq!(parse_retry_after(v), secs.map(Duration::from_secs), "{v}");
        }
        #[rustfmt::skip]
        let cleaned: Vec<(&str, usize, &str)> = vec![("ok", 10, "ok"), ("a\nb\u{1b}[31m", 10, "a b [31m"), ("abcdef", 3, "abc…"), ("äöü", 2, "äö…")];
        for (input, max, out) in cleaned {
            assert_eq!(clean(input, max), out, "{input}");
        }
        assert_eq!(redact("token abcd1234 echoed", &["abcd1234"]), "token [redacted] echoed");
        let s = format!("{}é", "x".repeat(MAX_FIELD_BYTES - 1));
        assert_eq!(truncate(&s).len(), MAX_FIELD_BYTES - 1);
        #[rustfmt::skip]
        let tenants: Vec<(&str, bool)> = vec![("contoso.onmicrosoft.com", true), ("11111111-2222-3333-4444-555555555555", true), ("a/b", false), ("a?b", false), ("", false), ("common#", false)];
        for (t, ok) in tenants {
            assert_eq!(check_tenant_id(t).is_ok(), ok, "{t}");
        }
    }

    #[test]
    fn secret_never_in_debug() {
        let reader = GraphReader::new(GraphConfig::new("contoso.com", "client"), "s3cr3t-value\n".into()).unwrap();
        let shown = format!("{reader:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("redacted"));
        let e = GraphReader::new(
            GraphConfig { graph_url: "http://graph.example.com".into(), ..GraphConfig::new("contoso.com", "client") },
            "s3cr3t".into(),
        )
        .unwrap_err();
        assert_eq!(e.kind, SourceErrorKind::Other);
        assert!(e.message.contains("plain http"), "{}", e.message);
    }

    #[test]
    fn merging_pages() {
        // Full: a group repeated across pages keeps every member; a removed member is no member.
        let mut acc = GroupAcc::default();
        let up = |id: &str, name: Option<&str>, members: Vec<MemberRef>| GroupItem::Upsert {
            id: id.into(),
            name: name.map(Into::into),
            members,
        };
        acc.add(vec![up("g1", Some("Sales"), vec![m(false, "u1", false), m(false, "u2", false)])], Mode::Full).unwrap();
        acc.add(
            vec![up("g1", Some("Sales"), vec![m(false, "u3", false), m(true, "g2", false), m(false, "u2", true)])],
            Mode::Full,
        )
        .unwrap();
        let (groups, removed) = acc.finish(Mode::Full).unwrap();
        let whole = Members { users: ["u1", "u3"].map(String::from).into(), groups: ["g2".to_string()].into() };
        assert_eq!(
            groups,
            vec![SourceGroup {
                external_id: "g1".into(),
                name: Some("Sales".into()),
                members: MemberChange::Whole(whole)
            }]
        );
        assert!(removed.is_empty());

        // Delta: the last word on a member wins; a removed group is listed, a restored one is not.
        let mut acc = GroupAcc::default();
        acc.add(
            vec![up("g1", None, vec![m(false, "u1", false), m(false, "u2", true)]), GroupItem::Removed("g9".into())],
            Mode::Delta,
        )
        .unwrap();
        acc.add(
            vec![
                up("g1", None, vec![m(false, "u1", true)]),
                GroupItem::Removed("g8".into()),
                up("g9", Some("Back"), vec![]),
            ],
            Mode::Delta,
        )
        .unwrap();
        let (groups, removed) = acc.finish(Mode::Delta).unwrap();
        assert_eq!(removed, vec!["g8".to_string()]);
        assert_eq!(
            groups[0].members,
            MemberChange::Changed {
                added: Members::default(),
                removed: Members { users: ["u1", "u2"].map(String::from).into(), groups: BTreeSet::new() },
            }
        );
        assert_eq!(groups[1].name.as_deref(), Some("Back"));

        // Users: repeated ones merge, removed ones leave (full) or are listed (delta).
        let mut acc = UserAcc::default();
        let u = |id: &str, rec: Value| user(id, None, rec, None, true);
        acc.add(vec![u("u1", json!({"city": "A"})), u("u2", json!({}))], Mode::Delta).unwrap();
        acc.add(vec![u("u1", json!({"mail": "m"})), UserItem::Removed("u2".into())], Mode::Delta).unwrap();
        let (users, removed) = acc.finish();
        assert_eq!(users.len(), 1);
        assert_eq!(users[0].record, obj(json!({"city": "A", "mail": "m"})));
        assert_eq!(removed, vec!["u2".to_string()]);
    }

    /// The framework runs reads on spawned tasks and shares readers between them.
    #[test]
    fn reader_and_read_are_send() {
        fn send_sync<T: Send + Sync>(_: &T) {}
        fn send<T: Send>(_: &T) {}
        let reader = GraphReader::new(GraphConfig::new("contoso.com", "client"), "secret".into()).unwrap();
        send_sync(&reader);
        let progress = |_: SyncProgress| {};
        send(&reader.read(None, &progress));
    }

    #[test]
    fn full_group_without_name_is_malformed() {
        let mut acc = GroupAcc::default();
        acc.add(vec![GroupItem::Upsert { id: "g1".into(), name: None, members: vec![] }], Mode::Full).unwrap();
        assert_eq!(acc.finish(Mode::Full).unwrap_err().kind, SourceErrorKind::Malformed);
    }
}
