//! A Microsoft Graph-shaped test server on loopback: Entra's token endpoint, `users/delta` and
//! `groups/delta` (paged through `@odata.nextLink`, ending in an `@odata.deltaLink`, later rounds
//! reporting only what changed, `@removed` included) and `/domains`, in Graph's documented
//! response shapes, over a directory that tests generate and change between syncs. Faults
//! (throttling, 403, 410, a malformed page) are injected per endpoint and page; every request is
//! counted.
//!
//! Used by `tests/directory_graph.rs`, other tests through `common::graph_fake`, and the
//! `graph_fake_server` example (benchmarks). Serves plain HTTP on 127.0.0.1 only.
//!
//! Like Graph, deleting a user drops it from its groups without a `members@delta` entry: a
//! reader learns it from the user's `@removed`.
#![allow(dead_code)]

use axum::body::Bytes;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use tenon_server::directory::graph::{GraphConfig, GraphReader};

pub const TENANT_ID: &str = "9c4e8a51-7f3b-4d2a-8e6c-1b0d5f7a3e92";
pub const CLIENT_ID: &str = "3f2a1b0c-5d4e-4f6a-9b8c-7d6e5f4a3b2c";
pub const CLIENT_SECRET: &str = "Fk8Q~fake.secret_value-0123456789abcdefGHIJ";
pub const SCOPE: &str = "https://graph.microsoft.com/.default";
pub const DOMAIN: &str = "contoso.example";

/// The user properties the fake holds (and returns on a full round), as Graph names them.
pub const USER_FIELDS: &[&str] = &[
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
    "userPrincipalName",
    "onPremisesExtensionAttributes",
    "accountEnabled",
    "lastPasswordChangeDateTime",
    "passwordPolicies",
    "onPremisesSyncEnabled",
];

/// Which endpoint a fault or a count is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    Token,
    Users,
    Groups,
    Domains,
    /// Anything else (counted only).
    Other,
}

/// What an injected fault answers instead of the real page.
#[derive(Clone, Debug)]
pub enum Fault {
    /// 429 Too Many Requests with `Retry-After: secs` and Graph's throttling body.
    Throttle { retry_after: u64 },
    /// 503 Service Unavailable with `Retry-After: secs`.
    Unavailable { retry_after: u64 },
    /// Any status with a JSON body (e.g. 403 `Authorization_RequestDenied`).
    Status { status: u16, body: Value },
    /// 200 with a body that is not JSON (cut off half-way).
    Malformed,
    /// 200 with this raw body.
    Raw { body: String },
    /// A page whose next link points at another host.
    ForeignNextLink,
}

struct FaultRule {
    target: Target,
    /// 1-based page of a round; `None`: any request to the target.
    page: Option<u32>,
    times: u32,
    fault: Fault,
}

#[derive(Clone, Debug)]
struct FakeGroup {
    name: String,
    users: BTreeSet<String>,
    groups: BTreeSet<String>,
}

#[derive(Clone, Debug)]
enum Change {
    /// `fields` empty with `created`: everything.
    User {
        id: String,
        fields: BTreeSet<String>,
        created: bool,
    },
    UserRemoved(String),
    Group {
        id: String,
        renamed: bool,
        added: Vec<(bool, String)>,
        removed: Vec<(bool, String)>,
    },
    GroupRemoved(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretState {
    Valid,
    /// Entra answers AADSTS7000222 (the secret expired).
    Expired,
}

struct Inner {
    base: String,
    users: BTreeMap<String, Map<String, Value>>,
    groups: BTreeMap<String, FakeGroup>,
    domains: Vec<Value>,
    next_user: u64,
    next_group: u64,
    /// Every change, with the sequence number it made.
    log: Vec<(u64, Change)>,
    seq: u64,
    /// Delta tokens below this answer 410 Gone.
    expired_before: u64,
    tokens: BTreeSet<String>,
    tokens_issued: u64,
    token_lifetime: u64,
    secret_state: SecretState,
    users_page: usize,
    groups_page: usize,
    member_chunk: usize,
    faults: Vec<FaultRule>,
    counts: BTreeMap<Target, u64>,
    queries: BTreeMap<Target, Vec<String>>,
}

/// The running fake. Dropping it stops the server.
pub struct GraphFake {
    inner: Arc<Mutex<Inner>>,
    url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for GraphFake {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn user_id(i: u64) -> String {
    format!("00000000-0000-4000-8000-{i:012x}")
}

pub fn group_id(j: u64) -> String {
    format!("00000000-0000-4000-9000-{j:012x}")
}

pub fn upn(i: u64) -> String {
    format!("user{i}@{DOMAIN}")
}

/// The record the fake gives generated user `i`: every field Graph returns, `null` where unset.
pub fn generated_user(i: u64) -> Map<String, Value> {
    let mut ext = Map::new();
    for n in 1..=15 {
        ext.insert(format!("extensionAttribute{n}"), Value::Null);
    }
    ext.insert("extensionAttribute1".into(), json!(format!("cost-center-{}", i % 7)));
    let v = json!({
        "id": user_id(i),
        "userPrincipalName": upn(i),
        "displayName": format!("User {i}"),
        "givenName": "User",
        "surname": format!("Number{i}"),
        "jobTitle": if i.is_multiple_of(3) { json!("Engineer") } else { Value::Null },
        "department": format!("Dept {}", i % 10),
        "companyName": "Contoso",
        "mail": upn(i),
        "businessPhones": [format!("+1 555 01{:04}", i % 10_000)],
        "mobilePhone": null,
        "faxNumber": null,
        "officeLocation": format!("Building {}", i % 4),
        "streetAddress": "1 Main Street",
        "city": "Springfield",
        "postalCode": "12345",
        "state": null,
        "country": "US",
        "onPremisesExtensionAttributes": ext,
        "accountEnabled": i % 50 != 49,
        "lastPasswordChangeDateTime": "2026-11-01T08:00:00Z",
        "passwordPolicies": if i % 20 == 19 { json!("DisablePasswordExpiration") } else { Value::Null },
        "onPremisesSyncEnabled": null,
    });
    match v {
        Value::Object(m) => m,
        _ => unreachable!(),
    }
}

impl GraphFake {
    /// An empty tenant (one verified domain) on 127.0.0.1, an ephemeral port.
    pub async fn start() -> GraphFake {
        Self::start_on("127.0.0.1:0", 0, 0).await
    }

    /// `users` generated users in `groups` groups: user `i` is in group `i % groups`, group 0 also
    /// holds group 1 (a nested group).
    pub async fn generate(users: u64, groups: u64) -> GraphFake {
        Self::start_on("127.0.0.1:0", users, groups).await
    }

    /// As `generate`, listening on `listen` (loopback only).
    pub async fn start_on(listen: &str, users: u64, groups: u64) -> GraphFake {
        let listener = tokio::net::TcpListener::bind(listen).await.expect("bind the Graph fake");
        let addr = listener.local_addr().expect("local address");
        assert!(addr.ip().is_loopback(), "the Graph fake serves loopback only");
        let url = format!("http://{addr}");
        let mut inner = Inner {
            base: url.clone(),
            users: BTreeMap::new(),
            groups: BTreeMap::new(),
            domains: vec![
                json!({"id": DOMAIN, "isVerified": true, "isDefault": true, "passwordValidityPeriodInDays": 90, "authenticationType": "Managed"}),
                json!({"id": "Contoso.onmicrosoft.example", "isVerified": true, "isDefault": false, "passwordValidityPeriodInDays": 2147483647, "authenticationType": "Managed"}),
                json!({"id": "unverified.example", "isVerified": false, "isDefault": false, "passwordValidityPeriodInDays": 30, "authenticationType": "Managed"}),
            ],
            next_user: users,
            next_group: groups,
            log: Vec::new(),
            seq: 1,
            expired_before: 0,
            tokens: BTreeSet::new(),
            tokens_issued: 0,
            token_lifetime: 3599,
            secret_state: SecretState::Valid,
            users_page: 100,
            groups_page: 100,
            member_chunk: 20,
            faults: Vec::new(),
            counts: BTreeMap::new(),
            queries: BTreeMap::new(),
        };
        for i in 0..users {
            inner.users.insert(user_id(i), generated_user(i));
        }
        for j in 0..groups {
            inner.groups.insert(
                group_id(j),
                FakeGroup { name: format!("Group {j}"), users: BTreeSet::new(), groups: BTreeSet::new() },
            );
        }
        if groups > 0 {
            for i in 0..users {
                if let Some(g) = inner.groups.get_mut(&group_id(i % groups)) {
                    g.users.insert(user_id(i));
                }
            }
        }
        if groups > 1 {
            if let Some(g) = inner.groups.get_mut(&group_id(0)) {
                g.groups.insert(group_id(1));
            }
        }
        let inner = Arc::new(Mutex::new(inner));
        let app = axum::Router::new().fallback(handle).with_state(inner.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        GraphFake { inner, url, task }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `http://127.0.0.1:PORT`: both the authority and the Graph URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A configuration pointing at this fake.
    pub fn config(&self) -> GraphConfig {
        GraphConfig {
            tenant_id: TENANT_ID.into(),
            client_id: CLIENT_ID.into(),
            authority: self.url.clone(),
            graph_url: self.url.clone(),
        }
    }

    /// A reader of this fake with the right secret, waiting at most 10 s on throttling.
    pub fn reader(&self) -> GraphReader {
        GraphReader::new(self.config(), CLIENT_SECRET.into())
            .expect("a loopback config is valid")
            .with_max_retry_wait(std::time::Duration::from_secs(10))
    }

    /// Objects per page: users, group entries, and members per group entry (a group with more
    /// members appears again on the following entries, as Graph does).
    pub fn set_page_sizes(&self, users: usize, groups: usize, member_chunk: usize) {
        let mut s = self.lock();
        s.users_page = users.max(1);
        s.groups_page = groups.max(1);
        s.member_chunk = member_chunk.max(1);
    }

    // ---- faults and counts ----

    /// Answers the `page`th page (1-based, of any round; `None`: every request) of `target` with
    /// `fault`, `times` times.
    pub fn inject(&self, target: Target, page: Option<u32>, times: u32, fault: Fault) {
        self.lock().faults.push(FaultRule { target, page, times, fault });
    }

    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    pub fn requests(&self, target: Target) -> u64 {
        self.lock().counts.get(&target).copied().unwrap_or(0)
    }

    pub fn total_requests(&self) -> u64 {
        self.lock().counts.values().sum()
    }

    /// The raw query strings (percent-decoded) of every request to `target`, in order.
    pub fn queries(&self, target: Target) -> Vec<String> {
        self.lock().queries.get(&target).cloned().unwrap_or_default()
    }

    pub fn set_secret_state(&self, state: SecretState) {
        self.lock().secret_state = state;
    }

    /// Tokens issued from now on say they live this long.
    pub fn set_token_lifetime(&self, secs: u64) {
        self.lock().token_lifetime = secs;
    }

    /// Every token issued so far is refused from now on (401 `InvalidAuthenticationToken`).
    pub fn revoke_tokens(&self) {
        self.lock().tokens.clear();
    }

    /// Every delta link issued so far answers 410 Gone from now on.
    pub fn expire_delta_links(&self) {
        let mut s = self.lock();
        s.expired_before = s.seq + 1;
        s.seq += 1;
    }

    // ---- the directory ----

    pub fn user_count(&self) -> usize {
        self.lock().users.len()
    }

    pub fn user(&self, id: &str) -> Option<Map<String, Value>> {
        self.lock().users.get(id).cloned()
    }

    /// Sets one property of a user (`Value::Null` clears it).
    pub fn set_user_field(&self, id: &str, field: &str, value: Value) {
        let mut s = self.lock();
        let user = s.users.get_mut(id).unwrap_or_else(|| panic!("no user {id}"));
        user.insert(field.to_string(), value);
        s.change(Change::User { id: id.into(), fields: [field.to_string()].into(), created: false });
    }

    /// A new user with generated values and this UPN; returns its id.
    pub fn add_user(&self, upn: &str) -> String {
        let mut s = self.lock();
        let i = s.next_user;
        s.next_user += 1;
        let mut record = generated_user(i);
        record.insert("userPrincipalName".into(), json!(upn));
        record.insert("mail".into(), json!(upn));
        let id = user_id(i);
        s.users.insert(id.clone(), record);
        s.change(Change::User { id: id.clone(), fields: BTreeSet::new(), created: true });
        id
    }

    /// Deletes a user (Graph: `@removed` `changed`, the user is in the recycle bin). Its group
    /// memberships go with it, silently, as in Graph.
    pub fn remove_user(&self, id: &str) {
        let mut s = self.lock();
        assert!(s.users.remove(id).is_some(), "no user {id}");
        for g in s.groups.values_mut() {
            g.users.remove(id);
        }
        s.change(Change::UserRemoved(id.into()));
    }

    pub fn add_group(&self, name: &str) -> String {
        let mut s = self.lock();
        let j = s.next_group;
        s.next_group += 1;
        let id = group_id(j);
        s.groups.insert(id.clone(), FakeGroup { name: name.into(), users: BTreeSet::new(), groups: BTreeSet::new() });
        s.change(Change::Group { id: id.clone(), renamed: true, added: vec![], removed: vec![] });
        id
    }

    pub fn rename_group(&self, id: &str, name: &str) {
        let mut s = self.lock();
        s.groups.get_mut(id).unwrap_or_else(|| panic!("no group {id}")).name = name.into();
        s.change(Change::Group { id: id.into(), renamed: true, added: vec![], removed: vec![] });
    }

    pub fn remove_group(&self, id: &str) {
        let mut s = self.lock();
        assert!(s.groups.remove(id).is_some(), "no group {id}");
        for g in s.groups.values_mut() {
            g.groups.remove(id);
        }
        s.change(Change::GroupRemoved(id.into()));
    }

    /// Adds a user or a group (by id) to a group.
    pub fn add_member(&self, group: &str, member: &str) {
        let mut s = self.lock();
        let is_group = s.groups.contains_key(member);
        let g = s.groups.get_mut(group).unwrap_or_else(|| panic!("no group {group}"));
        if is_group { &mut g.groups } else { &mut g.users }.insert(member.into());
        s.change(Change::Group {
            id: group.into(),
            renamed: false,
            added: vec![(is_group, member.into())],
            removed: vec![],
        });
    }

    pub fn remove_member(&self, group: &str, member: &str) {
        let mut s = self.lock();
        let g = s.groups.get_mut(group).unwrap_or_else(|| panic!("no group {group}"));
        let is_group = g.groups.remove(member);
        if !is_group {
            g.users.remove(member);
        }
        s.change(Change::Group {
            id: group.into(),
            renamed: false,
            added: vec![],
            removed: vec![(is_group, member.into())],
        });
    }

    /// Direct members of a group: (users, groups).
    pub fn members(&self, group: &str) -> (BTreeSet<String>, BTreeSet<String>) {
        let s = self.lock();
        let g = &s.groups[group];
        (g.users.clone(), g.groups.clone())
    }
}

impl Inner {
    fn change(&mut self, c: Change) {
        self.seq += 1;
        self.log.push((self.seq, c));
    }

    /// The first matching fault, used up once.
    fn take_fault(&mut self, target: Target, page: u32) -> Option<Fault> {
        let i =
            self.faults.iter().position(|f| f.target == target && f.page.is_none_or(|p| p == page) && f.times > 0)?;
        self.faults[i].times -= 1;
        let fault = self.faults[i].fault.clone();
        if self.faults[i].times == 0 {
            self.faults.remove(i);
        }
        Some(fault)
    }

    fn link(&self, path: &str, param: &str, token: &str) -> String {
        format!("{}/v1.0/{path}?{param}={token}", self.base)
    }

    fn user_view(&self, id: &str, fields: Option<&BTreeSet<String>>) -> Value {
        let Some(record) = self.users.get(id) else { return json!({"id": id, "@removed": {"reason": "changed"}}) };
        let mut out = Map::new();
        out.insert("@odata.type".into(), json!("#microsoft.graph.user"));
        out.insert("id".into(), json!(id));
        for &f in USER_FIELDS {
            if fields.is_none_or(|fs| fs.contains(f)) {
                out.insert(f.into(), record.get(f).cloned().unwrap_or(Value::Null));
            }
        }
        Value::Object(out)
    }

    /// Users changed after `from`, merged per user, in id order.
    fn user_changes(&self, from: u64, to: u64) -> Vec<Value> {
        // None: the whole record (created), Some(fields): only those.
        let mut changed: BTreeMap<&str, Option<BTreeSet<String>>> = BTreeMap::new();
        let mut removed: BTreeSet<&str> = BTreeSet::new();
        for (seq, c) in &self.log {
            if *seq <= from || *seq > to {
                continue;
            }
            match c {
                Change::User { id, fields, created } => {
                    removed.remove(id.as_str());
                    let entry = changed.entry(id).or_insert_with(|| Some(BTreeSet::new()));
                    match (entry.as_mut(), created) {
                        (_, true) => *entry = None,
                        (Some(set), false) => set.extend(fields.iter().cloned()),
                        (None, false) => {}
                    }
                }
                Change::UserRemoved(id) => {
                    changed.remove(id.as_str());
                    removed.insert(id);
                }
                _ => {}
            }
        }
        let mut ids: BTreeSet<&str> = changed.keys().copied().collect();
        ids.extend(removed.iter().copied());
        ids.into_iter()
            .map(|id| match changed.get(id) {
                Some(fields) if self.users.contains_key(id) => self.user_view(id, fields.as_ref()),
                _ => json!({"id": id, "@removed": {"reason": "changed"}}),
            })
            .collect()
    }

    fn member_ref(is_group: bool, id: &str, removed: bool) -> Value {
        let kind = if is_group { "#microsoft.graph.group" } else { "#microsoft.graph.user" };
        if removed {
            json!({"@odata.type": kind, "id": id, "@removed": {"reason": "deleted"}})
        } else {
            json!({"@odata.type": kind, "id": id})
        }
    }

    /// Groups changed after `from`, merged per group, in id order.
    fn group_changes(&self, from: u64, to: u64) -> Vec<Value> {
        struct G {
            renamed: bool,
            members: BTreeMap<(bool, String), bool>,
        }
        let mut changed: BTreeMap<&str, G> = BTreeMap::new();
        let mut removed: BTreeSet<&str> = BTreeSet::new();
        for (seq, c) in &self.log {
            if *seq <= from || *seq > to {
                continue;
            }
            match c {
                Change::Group { id, renamed, added, removed: gone } => {
                    removed.remove(id.as_str());
                    let g = changed.entry(id).or_insert_with(|| G { renamed: false, members: BTreeMap::new() });
                    g.renamed |= renamed;
                    for m in added {
                        g.members.insert(m.clone(), true);
                    }
                    for m in gone {
                        g.members.insert(m.clone(), false);
                    }
                }
                Change::GroupRemoved(id) => {
                    changed.remove(id.as_str());
                    removed.insert(id);
                }
                _ => {}
            }
        }
        let mut ids: BTreeSet<&str> = changed.keys().copied().collect();
        ids.extend(removed.iter().copied());
        ids.into_iter()
            .map(|id| match (changed.get(id), self.groups.get(id)) {
                (Some(g), Some(now)) => {
                    let mut out = json!({"id": id});
                    if g.renamed {
                        out["displayName"] = json!(now.name);
                    }
                    if !g.members.is_empty() {
                        let refs: Vec<Value> = g
                            .members
                            .iter()
                            .map(|((is_group, m), added)| Self::member_ref(*is_group, m, !added))
                            .collect();
                        out["members@delta"] = Value::Array(refs);
                    }
                    out
                }
                _ => json!({"id": id, "@removed": {"reason": "deleted"}}),
            })
            .collect()
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response()
}

fn graph_error(status: StatusCode, code: &str, message: &str) -> Response {
    json_response(
        status,
        &json!({"error": {"code": code, "message": message, "innerError": {"date": "2026-12-07T10:00:00", "request-id": "00000000-0000-0000-0000-000000000001", "client-request-id": "00000000-0000-0000-0000-000000000002"}}}),
    )
}

fn aad_error(status: StatusCode, error: &str, code: u64, text: &str) -> Response {
    json_response(
        status,
        &json!({
            "error": error,
            "error_description": format!("AADSTS{code}: {text}\r\nTrace ID: 0b4b7e4c-0000-0000-0000-000000000000\r\nCorrelation ID: 6c1e0000-0000-0000-0000-000000000000\r\nTimestamp: 2026-12-07 10:00:00Z"),
            "error_codes": [code],
            "timestamp": "2026-12-07 10:00:00Z",
            "trace_id": "0b4b7e4c-0000-0000-0000-000000000000",
            "correlation_id": "6c1e0000-0000-0000-0000-000000000000",
            "error_uri": format!("https://login.microsoftonline.com/error?code={code}"),
        }),
    )
}

fn query_params(uri: &Uri) -> BTreeMap<String, String> {
    url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()).into_owned().collect()
}

/// The round state in a skip token: `kind~a~b~c~page`.
fn split_token(t: &str) -> Vec<String> {
    t.split('~').map(String::from).collect()
}

async fn handle(
    axum::extract::State(inner): axum::extract::State<Arc<Mutex<Inner>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut s = inner.lock().unwrap_or_else(|e| e.into_inner());
    let path = uri.path().to_string();
    let target = match (&method, path.as_str()) {
        (&Method::POST, p) if p.ends_with("/oauth2/v2.0/token") => Target::Token,
        (&Method::GET, "/v1.0/users/delta") => Target::Users,
        (&Method::GET, "/v1.0/groups/delta") => Target::Groups,
        (&Method::GET, "/v1.0/domains") => Target::Domains,
        _ => Target::Other,
    };
    *s.counts.entry(target).or_default() += 1;
    let params = query_params(&uri);
    let raw_query = url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    s.queries.entry(target).or_default().push(raw_query);
    let skip = params.get("$skiptoken").map(|t| split_token(t));
    let page: u32 = skip.as_ref().and_then(|t| t.last()).and_then(|p| p.parse().ok()).unwrap_or(1);

    if let Some(fault) = s.take_fault(target, page) {
        return match fault {
            Fault::Throttle { retry_after } => {
                let mut r = graph_error(StatusCode::TOO_MANY_REQUESTS, "TooManyRequests", "Too many requests.");
                r.headers_mut().insert(header::RETRY_AFTER, retry_after.into());
                r
            }
            Fault::Unavailable { retry_after } => {
                let mut r = graph_error(StatusCode::SERVICE_UNAVAILABLE, "serviceNotAvailable", "Service unavailable.");
                r.headers_mut().insert(header::RETRY_AFTER, retry_after.into());
                r
            }
            Fault::Status { status, body } => {
                json_response(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), &body)
            }
            Fault::Malformed => (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                r#"{"@odata.context":"x","value":[{"id":"00000000-0000-4000-8000-000000000001","displayName":"Us"#,
            )
                .into_response(),
            Fault::Raw { body } => (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body).into_response(),
            Fault::ForeignNextLink => json_response(
                StatusCode::OK,
                &json!({"@odata.nextLink": "https://evil.example/v1.0/users/delta?$skiptoken=steal", "value": []}),
            ),
        };
    }

    if target == Target::Token {
        return token(&mut s, &path, &body);
    }
    if target == Target::Other {
        return graph_error(StatusCode::NOT_FOUND, "Request_ResourceNotFound", "Unknown path in the Graph fake.");
    }
    let bearer =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if !bearer.is_some_and(|t| s.tokens.contains(t)) {
        return graph_error(
            StatusCode::UNAUTHORIZED,
            "InvalidAuthenticationToken",
            "Access token has expired or is not yet valid.",
        );
    }
    match target {
        Target::Users => users(&s, &params, skip, page),
        Target::Groups => groups(&s, &params, skip, page),
        Target::Domains => json_response(
            StatusCode::OK,
            &json!({"@odata.context": format!("{}/v1.0/$metadata#domains", s.base), "value": s.domains}),
        ),
        _ => unreachable!(),
    }
}

fn token(s: &mut Inner, path: &str, body: &[u8]) -> Response {
    let form: BTreeMap<String, String> = url::form_urlencoded::parse(body).into_owned().collect();
    let field = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
    if path != format!("/{TENANT_ID}/oauth2/v2.0/token") {
        return aad_error(StatusCode::BAD_REQUEST, "invalid_request", 90002, "Tenant not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud.");
    }
    if field("grant_type") != "client_credentials" {
        return aad_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            70003,
            "The app requested an unsupported grant type.",
        );
    }
    if field("client_id") != CLIENT_ID {
        return aad_error(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            700016,
            "Application with identifier was not found in the directory.",
        );
    }
    if field("scope") != SCOPE {
        return aad_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            1002012,
            "The provided value for scope is not valid.",
        );
    }
    if field("client_secret") != CLIENT_SECRET {
        return aad_error(StatusCode::UNAUTHORIZED, "invalid_client", 7000215, "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID.");
    }
    if s.secret_state == SecretState::Expired {
        return aad_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000222,
            "The provided client secret keys for app are expired.",
        );
    }
    s.tokens_issued += 1;
    let token = format!("eyJ0eXAiOiJKV1QifQ.fake-{}.sig", s.tokens_issued);
    s.tokens.insert(token.clone());
    json_response(
        StatusCode::OK,
        &json!({"token_type": "Bearer", "expires_in": s.token_lifetime, "ext_expires_in": s.token_lifetime, "access_token": token}),
    )
}

fn page_response(
    s: &Inner,
    path: &str,
    context: &str,
    value: Vec<Value>,
    next: Option<String>,
    delta: u64,
) -> Response {
    let mut body = json!({"@odata.context": format!("{}/v1.0/$metadata#{context}", s.base)});
    match next {
        Some(skip) => body["@odata.nextLink"] = json!(s.link(path, "$skiptoken", &skip)),
        None => body["@odata.deltaLink"] = json!(s.link(path, "$deltatoken", &delta.to_string())),
    }
    body["value"] = Value::Array(value);
    json_response(StatusCode::OK, &body)
}

/// Checks a delta token; `Err` is the 410 Graph answers for one it no longer knows.
fn delta_from(s: &Inner, params: &BTreeMap<String, String>) -> Result<Option<u64>, Box<Response>> {
    let Some(t) = params.get("$deltatoken") else { return Ok(None) };
    match t.parse::<u64>() {
        Ok(t) if t >= s.expired_before && t <= s.seq => Ok(Some(t)),
        _ => Err(Box::new(graph_error(
            StatusCode::GONE,
            "resyncRequired",
            "Resync required. Replace any local cached copies of the directory objects with the ones returned by a new delta query.",
        ))),
    }
}

fn users(s: &Inner, params: &BTreeMap<String, String>, skip: Option<Vec<String>>, page: u32) -> Response {
    let context = "users(displayName,userPrincipalName)";
    let skip = skip.unwrap_or_default();
    let from = match delta_from(s, params) {
        Ok(f) => f,
        Err(r) => return *r,
    };
    match (from, skip.first().map(String::as_str)) {
        // A delta round: the changes between `from` and the round's start, `offset` on.
        (Some(_), _) | (None, Some("d")) => {
            let (from, to, offset) = match from {
                Some(f) => (f, s.seq, 0),
                None => {
                    (skip[1].parse().unwrap_or(0), skip[2].parse().unwrap_or(0), skip[3].parse::<usize>().unwrap_or(0))
                }
            };
            let all = s.user_changes(from, to);
            let value: Vec<Value> = all.iter().skip(offset).take(s.users_page).cloned().collect();
            let next = (offset + s.users_page < all.len())
                .then(|| format!("d~{from}~{to}~{}~{}", offset + s.users_page, page + 1));
            page_response(s, "users/delta", context, value, next, to)
        }
        // A full round: every user after `after`, in id order.
        _ => {
            let (seq, after) = match skip.first().map(String::as_str) {
                Some("f") => (skip[1].parse().unwrap_or(s.seq), skip[2].clone()),
                _ => (s.seq, String::new()),
            };
            let mut value = Vec::new();
            let mut last = None;
            for id in s
                .users
                .range::<String, _>((std::ops::Bound::Excluded(&after), std::ops::Bound::Unbounded))
                .map(|(k, _)| k)
            {
                if value.len() == s.users_page {
                    break;
                }
                value.push(s.user_view(id, None));
                last = Some(id.clone());
            }
            let more = last.as_ref().is_some_and(|l| {
                s.users.range::<String, _>((std::ops::Bound::Excluded(l), std::ops::Bound::Unbounded)).next().is_some()
            });
            let next = more.then(|| format!("f~{seq}~{}~{}", last.unwrap_or_default(), page + 1));
            page_response(s, "users/delta", context, value, next, seq)
        }
    }
}

fn groups(s: &Inner, params: &BTreeMap<String, String>, skip: Option<Vec<String>>, page: u32) -> Response {
    let context = "groups(displayName,members)";
    let skip = skip.unwrap_or_default();
    let from = match delta_from(s, params) {
        Ok(f) => f,
        Err(r) => return *r,
    };
    match (from, skip.first().map(String::as_str)) {
        (Some(_), _) | (None, Some("d")) => {
            let (from, to, offset) = match from {
                Some(f) => (f, s.seq, 0),
                None => {
                    (skip[1].parse().unwrap_or(0), skip[2].parse().unwrap_or(0), skip[3].parse::<usize>().unwrap_or(0))
                }
            };
            let all = s.group_changes(from, to);
            let value: Vec<Value> = all.iter().skip(offset).take(s.groups_page).cloned().collect();
            let next = (offset + s.groups_page < all.len())
                .then(|| format!("d~{from}~{to}~{}~{}", offset + s.groups_page, page + 1));
            page_response(s, "groups/delta", context, value, next, to)
        }
        // A full round: entries (group, chunk of its members) from (`gid`, `chunk`) on; a group
        // with many members is repeated with the next chunk, the name only on its first entry.
        _ => {
            let (seq, start, mut chunk) = match skip.first().map(String::as_str) {
                Some("f") => (skip[1].parse().unwrap_or(s.seq), skip[2].clone(), skip[3].parse::<usize>().unwrap_or(0)),
                _ => (s.seq, String::new(), 0),
            };
            let mut value = Vec::new();
            let mut next = None;
            'groups: for (gid, g) in s.groups.range::<String, _>(start.clone()..) {
                let members: Vec<(bool, &String)> =
                    g.users.iter().map(|u| (false, u)).chain(g.groups.iter().map(|x| (true, x))).collect();
                let chunks = members.len().div_ceil(s.member_chunk).max(1);
                while chunk < chunks {
                    if value.len() == s.groups_page {
                        next = Some(format!("f~{seq}~{gid}~{chunk}~{}", page + 1));
                        break 'groups;
                    }
                    let part: Vec<Value> = members
                        .iter()
                        .skip(chunk * s.member_chunk)
                        .take(s.member_chunk)
                        .map(|(is_group, m)| Inner::member_ref(*is_group, m, false))
                        .collect();
                    let mut entry = json!({"id": gid, "members@delta": part});
                    if chunk == 0 {
                        entry["displayName"] = json!(g.name);
                    }
                    value.push(entry);
                    chunk += 1;
                }
                chunk = 0;
            }
            page_response(s, "groups/delta", context, value, next, seq)
        }
    }
}
