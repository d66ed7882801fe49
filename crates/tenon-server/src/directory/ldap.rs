//! Active Directory over LDAP: one read of a domain's users and groups, whole or what changed since
//! a uSN high-water mark, as a `tenon_core::dirsync::SourceBatch`.
//!
//! How a read goes: connect (`ldaps://`, or `ldap://` with StartTLS when the DC offers it), simple
//! bind, read the rootDSE (`highestCommittedUSN`, which DC this is), then users and groups with the
//! Simple Paged Results control. Group members come with the extended DN control
//! (1.2.840.113556.1.4.529), so every member value carries its `objectGUID` and no DN has to be
//! looked up; groups larger than the DC's MaxValRange come in `member;range=lo-hi` slices, fetched
//! until the last (`hi` = `*`). A delta read asks for `uSNChanged` above the cursor's mark and, with
//! the show-deleted control, for tombstones whose last parent was under the base DN.
//!
//! Bounds, since the DC's answers are outside input: at most [`MAX_ENTRIES`] entries and
//! [`MAX_MEMBER_VALUES`] member values per read (past them the read fails, never returns a partial
//! directory that would read as deletions); a value longer than [`MAX_VALUE_BYTES`] is dropped (the
//! field is absent, counted and logged) rather than truncated, since a cut name or phone number
//! looks right and is wrong. ldap3 panics on some malformed BER; a read runs under `catch_unwind`
//! and reports that as `Malformed`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use ldap3::controls::{Control, ControlType, PagedResults, RawControl};
use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, LdapError, LdapResult, Scope, SearchEntry};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tenon_core::dirsync::{
    MemberChange, Members, SourceBatch, SourceError, SourceErrorKind, SourceGroup, SourceUser, SyncProgress,
};

/// Where and how to read one Active Directory domain (`tenonctl directory add ldap`).
#[derive(Clone, PartialEq, Eq)]
pub struct LdapConfig {
    /// `ldaps://host[:port]` (636 by default) or `ldap://host[:port]` (389).
    pub url: String,
    /// The account to bind as; `None` binds anonymously (AD then lets one read the rootDSE only).
    pub bind_dn: Option<String>,
    /// Where users and groups are read from (subtree).
    pub base_dn: String,
    /// PEM certificates trusted beside the system roots (`--ca-file`): a domain's own CA.
    pub ca_pem: Option<Vec<u8>>,
    /// Allow `ldap://`, which is plain LDAP unless the DC accepts StartTLS (`--allow-plain-ldap`).
    pub allow_plain_ldap: bool,
}

impl fmt::Debug for LdapConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LdapConfig")
            .field("url", &self.url)
            .field("bind_dn", &self.bind_dn)
            .field("base_dn", &self.base_dn)
            .field("ca_pem", &self.ca_pem.as_ref().map(|pem| format!("{} bytes", pem.len())))
            .field("allow_plain_ldap", &self.allow_plain_ldap)
            .finish()
    }
}

/// Entries per page. AD answers at most MaxPageSize (1,000 by default) whatever is asked.
const PAGE_SIZE: i32 = 500;
/// For connecting, for each operation, and between two entries of a search.
const TIMEOUT: Duration = Duration::from_secs(15);
/// A longer attribute value is dropped: no directory field Tenon uses is anywhere near this.
pub const MAX_VALUE_BYTES: usize = 4096;
/// Users, groups and tombstones in one read.
pub const MAX_ENTRIES: usize = 2_000_000;
/// Member values over all groups of one read.
pub const MAX_MEMBER_VALUES: usize = 10_000_000;
/// Pages in a row without an entry before a search is given up.
const MAX_EMPTY_PAGES: u32 = 10_000;
/// GUIDs per lookup filter when a delta read classifies members it did not read.
const GUID_LOOKUP_CHUNK: usize = 100;

const USER_FILTER: &str = "(&(objectCategory=person)(objectClass=user))";
const GROUP_FILTER: &str = "(objectClass=group)";
const EXTENDED_DN_OID: &str = "1.2.840.113556.1.4.529";
const SHOW_DELETED_OID: &str = "1.2.840.113556.1.4.417";

/// AD attribute -> Graph field, for the single-valued strings copied as they are.
const USER_FIELDS: &[(&str, &str)] = &[
    ("displayName", "displayName"),
    ("givenName", "givenName"),
    ("sn", "surname"),
    ("title", "jobTitle"),
    ("department", "department"),
    ("company", "companyName"),
    ("mail", "mail"),
    ("mobile", "mobilePhone"),
    ("facsimileTelephoneNumber", "faxNumber"),
    ("physicalDeliveryOfficeName", "officeLocation"),
    ("streetAddress", "streetAddress"),
    ("l", "city"),
    ("postalCode", "postalCode"),
    ("st", "state"),
    ("co", "country"),
];
const PASSWORD_EXPIRY: &str = "msDS-UserPasswordExpiryTimeComputed";

fn user_attributes() -> Vec<String> {
    let mut attrs: Vec<String> = USER_FIELDS.iter().map(|(ad, _)| ad.to_string()).collect();
    attrs.extend(
        ["userPrincipalName", "objectGUID", "telephoneNumber", "userAccountControl", "uSNChanged"].map(String::from),
    );
    // Constructed: AD computes it only when it is asked for by name.
    attrs.push(PASSWORD_EXPIRY.to_string());
    attrs.extend((1..=15).map(|i| format!("extensionAttribute{i}")));
    attrs
}

/// The parts of `LdapConfig::url` a connection needs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    tls: bool,
    /// As written, IPv6 addresses with their brackets.
    host: String,
    port: u16,
}

impl Target {
    fn parse(url: &str) -> Result<Target, SourceError> {
        let bad = |why: &str| {
            SourceError::new(
                SourceErrorKind::Other,
                format!(
                    "--url {url:?} {why}: give ldaps://HOST[:PORT] (or ldap://HOST[:PORT] with --allow-plain-ldap)"
                ),
            )
        };
        let (tls, rest) = if let Some(rest) = strip_prefix_ci(url, "ldaps://") {
            (true, rest)
        } else if let Some(rest) = strip_prefix_ci(url, "ldap://") {
            (false, rest)
        } else {
            return Err(bad("is not an LDAP URL"));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '@', '#']) || rest.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("must name only a host and a port"));
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (addr, after) = v6.split_once(']').ok_or_else(|| bad("has an unclosed '['"))?;
            if addr.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(bad("has an invalid IPv6 address"));
            }
            match after {
                "" => (format!("[{addr}]"), None),
                p => (format!("[{addr}]"), Some(p.strip_prefix(':').ok_or_else(|| bad("has text after ']'"))?)),
            }
        } else {
            match rest.split_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (rest.to_string(), None),
            }
        };
        let host_ok = host.starts_with('[')
            || (!host.is_empty()
                && host.len() <= 253
                && host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')));
        if !host_ok {
            return Err(bad("has no valid host name"));
        }
        let port = match port {
            None => {
                if tls {
                    636
                } else {
                    389
                }
            }
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p > 0 => p,
                _ => return Err(bad("has an invalid port")),
            },
        };
        Ok(Target { tls, host, port })
    }

    fn url(&self) -> String {
        format!("{}://{}:{}", if self.tls { "ldaps" } else { "ldap" }, self.host, self.port)
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &s[prefix.len()..])
}

/// A syntax check of a DN (RFC 4514): `attr=value` parts separated by unescaped commas. The DC is
/// the judge of whether it exists; this catches a path or a UPN given by mistake.
fn check_dn(dn: &str, flag: &str) -> Result<(), SourceError> {
    let bad = |why: &str| {
        SourceError::new(SourceErrorKind::Other, format!("{flag} {dn:?} {why}: give a DN such as DC=example,DC=com"))
    };
    if dn.trim().is_empty() {
        return Err(bad("is empty"));
    }
    if dn.len() > MAX_VALUE_BYTES || dn.chars().any(|c| c.is_control()) {
        return Err(bad("is too long or holds control characters"));
    }
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut chars = dn.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                current.push(c);
                match chars.next() {
                    Some(n) => current.push(n),
                    None => return Err(bad("ends with a lone backslash")),
                }
            }
            ',' | '+' => parts.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    parts.push(current);
    for part in parts {
        let Some((attr, value)) = part.split_once('=') else {
            return Err(bad("has a part without '='"));
        };
        let attr = attr.trim();
        if attr.is_empty() || !attr.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.')) {
            return Err(bad("has a part with no attribute name"));
        }
        if value.trim().is_empty() {
            return Err(bad("has a part with an empty value"));
        }
    }
    Ok(())
}

impl LdapConfig {
    /// Checks what can be checked without the DC: the URL, the DNs, the CA file, and that plain
    /// `ldap://` was allowed explicitly.
    pub fn check(&self) -> Result<(), SourceError> {
        let target = Target::parse(&self.url)?;
        if !target.tls && !self.allow_plain_ldap {
            // StartTLS is used when the DC offers it, but a man in the middle can strip the offer,
            // so an ldap:// URL cannot promise that the bind password stays private.
            return Err(SourceError::new(
                SourceErrorKind::Other,
                format!(
                    "--url {} is plain LDAP: the bind password could cross the network in clear. Use ldaps://{}:636 \
                     (with --ca-file if the DC's certificate comes from your own CA), or pass --allow-plain-ldap to \
                     allow ldap:// (StartTLS is still used when the DC offers it)",
                    self.url, target.host
                ),
            ));
        }
        check_dn(&self.base_dn, "--base-dn")?;
        if let Some(dn) = &self.bind_dn {
            check_dn(dn, "--bind-dn")?;
        }
        if let Some(pem) = &self.ca_pem {
            extra_roots(pem)?;
        }
        Ok(())
    }
}

fn extra_roots(pem: &[u8]) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, SourceError> {
    use rustls_pki_types::pem::PemObject;
    let certs: Result<Vec<_>, _> = rustls_pki_types::CertificateDer::pem_slice_iter(pem).collect();
    match certs {
        Ok(certs) if !certs.is_empty() => Ok(certs),
        Ok(_) => Err(SourceError::new(SourceErrorKind::Other, "--ca-file holds no PEM certificate")),
        Err(e) => Err(SourceError::new(SourceErrorKind::Other, format!("--ca-file is not valid PEM: {e}"))),
    }
}

/// Where the next read starts: the DC's `highestCommittedUSN` when the last read started, and which
/// DC that was (uSNs are per DC: another DC, or this one restored from a backup, which gets a new
/// invocationId, numbers its changes differently).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Cursor {
    v: u32,
    usn: u64,
    invocation_id: String,
    dc: String,
}

/// The rootDSE facts a read needs.
struct DcIdentity {
    usn: u64,
    invocation_id: String,
    dc: String,
    default_nc: Option<String>,
}

/// One read. `cursor` `None`: a [`SourceBatch::Full`]; `Some`: a [`SourceBatch::Delta`] of what
/// changed since it (or `CursorExpired` when it belongs to another DC or cannot be used).
pub async fn read(
    config: &LdapConfig,
    password: Option<&str>,
    cursor: Option<&str>,
    progress: super::Progress<'_>,
) -> Result<SourceBatch, SourceError> {
    config.check()?;
    let url = config.url.clone();
    match std::panic::AssertUnwindSafe(read_checked(config, password, cursor, progress)).catch_unwind().await {
        Ok(result) => result,
        Err(_) => Err(SourceError::new(
            SourceErrorKind::Malformed,
            format!("the domain controller at {url} sent an answer that is not valid LDAP; the read was stopped"),
        )),
    }
}

async fn read_checked(
    config: &LdapConfig,
    password: Option<&str>,
    cursor: Option<&str>,
    progress: super::Progress<'_>,
) -> Result<SourceBatch, SourceError> {
    let since = match cursor {
        None => None,
        Some(text) => Some(parse_cursor(text)?),
    };
    let mut session = Session::open(config, password).await?;
    let identity = session.identity().await?;
    if let Some(since) = &since {
        if since.invocation_id != identity.invocation_id || !since.dc.eq_ignore_ascii_case(&identity.dc) {
            return Err(SourceError::new(
                SourceErrorKind::CursorExpired,
                format!(
                    "{} now answers as another domain controller (or one restored from a backup): a full read follows",
                    config.url
                ),
            ));
        }
        if identity.usn < since.usn {
            return Err(SourceError::new(
                SourceErrorKind::CursorExpired,
                format!(
                    "the domain controller at {} has gone back in its update numbers: a full read follows",
                    config.url
                ),
            ));
        }
    }
    let next =
        Cursor { v: 1, usn: identity.usn, invocation_id: identity.invocation_id.clone(), dc: identity.dc.clone() };
    let next = serde_json::to_string(&next).ok();
    let mut reader = Reader::new(session, config, progress);
    let changed_filter = |filter: &str| match &since {
        Some(c) => format!("(&{filter}(uSNChanged>={}))", c.usn.saturating_add(1)),
        None => filter.to_string(),
    };
    let users = reader.users(&changed_filter(USER_FILTER)).await?;
    let groups = reader.groups(&changed_filter(GROUP_FILTER)).await?;
    let result = match since {
        None => {
            if users.is_empty() && groups.is_empty() {
                reader.check_base_visible().await?;
            }
            let groups = reader.resolve_members(&users, groups, false).await?;
            SourceBatch::Full { users, groups, cursor: next, password_validity_days: BTreeMap::new() }
        }
        Some(since) => {
            let groups = reader.resolve_members(&users, groups, true).await?;
            let (users_removed, groups_removed) = reader.deleted_since(since.usn, identity.default_nc.as_deref()).await;
            SourceBatch::Delta {
                users_changed: users,
                users_removed,
                groups_changed: groups,
                groups_removed,
                cursor: next,
                password_validity_days: BTreeMap::new(),
            }
        }
    };
    reader.finish().await;
    Ok(result)
}

fn parse_cursor(text: &str) -> Result<Cursor, SourceError> {
    match serde_json::from_str::<Cursor>(text) {
        Ok(c) if c.v == 1 => Ok(c),
        _ => Err(SourceError::new(
            SourceErrorKind::CursorExpired,
            "the stored LDAP cursor is not one this version reads: a full read follows",
        )),
    }
}

/// A connected, bound connection to one DC.
struct Session {
    ldap: Ldap,
    url: String,
}

impl Session {
    async fn open(config: &LdapConfig, password: Option<&str>) -> Result<Session, SourceError> {
        let target = Target::parse(&config.url)?;
        let url = config.url.clone();
        let tls = tls_config(config.ca_pem.as_deref())?;
        let settings = || LdapConnSettings::new().set_conn_timeout(TIMEOUT).set_config(tls.clone());
        let connected = if target.tls {
            LdapConnAsync::with_settings(settings(), &target.url()).await
        } else {
            match LdapConnAsync::with_settings(settings().set_starttls(true), &target.url()).await {
                // The DC answered the StartTLS request with an error: it does not offer TLS here.
                // Only then is plain LDAP used (check() made sure it was allowed); a failed TLS
                // handshake after an accepted StartTLS is an error, never a reason to go plain.
                Err(LdapError::LdapResult { result }) => {
                    tracing::warn!(
                        url = %url,
                        rc = result.rc,
                        "the domain controller does not offer StartTLS: reading over plain LDAP, the bind password crosses the network in clear"
                    );
                    LdapConnAsync::with_settings(settings().set_starttls(false), &target.url()).await
                }
                other => other,
            }
        };
        let (conn, mut ldap) = connected.map_err(|e| connect_error(&url, e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.drive().await {
                tracing::debug!(error = %e, "LDAP connection ended");
            }
        });
        match (&config.bind_dn, password) {
            (None, _) => {}
            (Some(dn), None) | (Some(dn), Some("")) => {
                // An empty password makes a simple bind "unauthenticated", which some DCs accept as
                // anonymous: refuse it rather than read less than the administrator meant to.
                return Err(SourceError::new(
                    SourceErrorKind::Credentials,
                    format!("no password for {dn}: give it with --password-file"),
                ));
            }
            (Some(dn), Some(pw)) => {
                let res = ldap.with_timeout(TIMEOUT).simple_bind(dn, pw).await.map_err(|e| op_error(&url, e))?;
                if res.rc != 0 {
                    return Err(bind_error(dn, &res));
                }
            }
        }
        Ok(Session { ldap, url })
    }

    async fn identity(&mut self) -> Result<DcIdentity, SourceError> {
        let attrs = ["highestCommittedUSN", "dsServiceName", "defaultNamingContext"];
        let entries = self.base_search("", &attrs, Vec::new()).await?;
        let root = entries.into_iter().next().ok_or_else(|| {
            SourceError::new(
                SourceErrorKind::Malformed,
                format!("the domain controller at {} has no rootDSE", self.url),
            )
        })?;
        let usn = root.text("highestCommittedUSN").and_then(|s| s.parse::<u64>().ok()).ok_or_else(|| {
            SourceError::new(
                SourceErrorKind::Malformed,
                format!(
                    "{} gave no highestCommittedUSN in its rootDSE: is it an Active Directory domain controller?",
                    self.url
                ),
            )
        })?;
        let dc = root.text("dsServiceName").unwrap_or_default();
        // invocationId changes when the DC's database is restored; readable by any bound account,
        // and when it is not the DC's name has to do.
        let invocation_id = if dc.is_empty() {
            String::new()
        } else {
            match self.base_search(&dc, &["invocationId"], Vec::new()).await {
                Ok(found) => found.first().and_then(|e| e.guid("invocationId")).unwrap_or_default(),
                Err(_) => String::new(),
            }
        };
        Ok(DcIdentity { usn, invocation_id, dc, default_nc: root.text("defaultNamingContext") })
    }

    /// A base-scope search: one entry, or none when it is not visible. Read as a stream and cut
    /// off after a few, since a DC could otherwise send any number.
    async fn base_search(
        &mut self,
        base: &str,
        attrs: &[&str],
        controls: Vec<RawControl>,
    ) -> Result<Vec<Entry>, SourceError> {
        const MAX_BASE_ENTRIES: usize = 4;
        let url = self.url.clone();
        let mut stream = self
            .ldap
            .with_controls(controls)
            .with_timeout(TIMEOUT)
            .streaming_search(base, Scope::Base, "(objectClass=*)", attrs.to_vec())
            .await
            .map_err(|e| op_error(&url, e))?;
        let mut entries = Vec::new();
        while let Some(re) = stream.next().await.map_err(|e| op_error(&url, e))? {
            if re.is_ref() || re.is_intermediate() {
                continue;
            }
            if entries.len() == MAX_BASE_ENTRIES {
                return Err(SourceError::new(
                    SourceErrorKind::Malformed,
                    format!("{url} answered a search for the one entry {base:?} with more than {MAX_BASE_ENTRIES}"),
                ));
            }
            entries.push(Entry::from(re));
        }
        let result = stream.finish().await;
        if result.rc != 0 {
            return Err(search_error(&url, base, &result));
        }
        Ok(entries)
    }
}

fn tls_config(ca_pem: Option<&[u8]>) -> Result<Arc<rustls::ClientConfig>, SourceError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    if let Some(pem) = ca_pem {
        for cert in extra_roots(pem)? {
            roots.add(cert).map_err(|e| {
                SourceError::new(SourceErrorKind::Other, format!("--ca-file holds an unusable certificate: {e}"))
            })?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| SourceError::new(SourceErrorKind::Other, format!("TLS set-up failed: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The rustls error inside an I/O error, where tokio-rustls put one.
fn tls_cause(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

fn tls_error(url: &str, e: &dyn fmt::Display) -> SourceError {
    SourceError::new(
        SourceErrorKind::Unreachable,
        format!(
            "TLS with the domain controller at {url} failed: {e}. If its certificate is issued by your own CA (AD CS, \
             or a self-signed one), give that CA's PEM file with --ca-file; the certificate must also name the host in --url"
        ),
    )
}

fn unreachable(url: &str, why: &dyn fmt::Display) -> SourceError {
    SourceError::new(
        SourceErrorKind::Unreachable,
        format!("cannot reach the domain controller at {url}: {why}; check --url and that port 636/389 is open"),
    )
}

/// ldap3's connection task ended under an operation: the DC closed the connection, or sent bytes
/// ldap3 could not decode (it panics in that task, which only ends it).
fn connection_ended(url: &str) -> SourceError {
    SourceError::new(
        SourceErrorKind::Unreachable,
        format!(
            "the connection to the domain controller at {url} ended: it closed it or answered something that is not \
             LDAP; check that --url names an LDAP port (636 for ldaps://, 389 for ldap://)"
        ),
    )
}

fn connect_error(url: &str, e: LdapError) -> SourceError {
    match &e {
        LdapError::ResultRecv { .. } | LdapError::OpSend { .. } | LdapError::EndOfStream => connection_ended(url),
        LdapError::Io { source } => match tls_cause(source) {
            Some(tls) => tls_error(url, tls),
            None => unreachable(url, source),
        },
        LdapError::Rustls { source } => tls_error(url, source),
        LdapError::DNSName { source } => tls_error(url, source),
        LdapError::Timeout { .. } => unreachable(url, &format!("no answer within {} s", TIMEOUT.as_secs())),
        LdapError::LdapResult { result } => SourceError::new(
            SourceErrorKind::Unreachable,
            format!("the domain controller at {url} refused the connection: {}", dc_text(result)),
        ),
        _ => unreachable(url, &e),
    }
}

/// An operation that did not get an LDAP result at all.
fn op_error(url: &str, e: LdapError) -> SourceError {
    match &e {
        LdapError::Timeout { .. } => SourceError::new(
            SourceErrorKind::Unreachable,
            format!("the domain controller at {url} did not answer within {} s", TIMEOUT.as_secs()),
        ),
        LdapError::Io { source } => match tls_cause(source) {
            Some(tls) => tls_error(url, tls),
            None => unreachable(url, source),
        },
        LdapError::LdapResult { result } => SourceError::new(
            SourceErrorKind::Other,
            format!("the domain controller at {url} refused an operation: {}", dc_text(result)),
        ),
        LdapError::ResultRecv { .. } | LdapError::OpSend { .. } | LdapError::EndOfStream => connection_ended(url),
        _ => SourceError::new(SourceErrorKind::Other, format!("an LDAP operation on {url} failed: {e}")),
    }
}

/// The DC's diagnostic text, bounded and without control characters (it is shown to people).
fn dc_text(result: &LdapResult) -> String {
    let text: String = result.text.chars().filter(|c| !c.is_control()).take(300).collect();
    format!("result {} ({})", result.rc, text.trim())
}

/// AD's sub-code in a bind failure: `... comment: AcceptSecurityContext error, data 52e, v4563`.
fn ad_data_code(text: &str) -> Option<String> {
    let at = text.find("data ")?;
    let code: String = text[at + 5..].chars().take_while(|c| c.is_ascii_hexdigit()).collect();
    (!code.is_empty()).then(|| code.to_ascii_lowercase())
}

fn bind_error(dn: &str, result: &LdapResult) -> SourceError {
    use SourceErrorKind::{Credentials, Other};
    let (kind, message) = match (result.rc, ad_data_code(&result.text).as_deref()) {
        (49, Some("52e")) | (49, Some("525")) => (
            Credentials,
            format!("wrong password for {dn} (AD: invalid credentials, data 52e): check --bind-dn and --password-file"),
        ),
        (49, Some("773")) => (
            Credentials,
            format!(
                "the bind account's password must be changed before it can bind ({dn}, AD: data 773): change it in AD \
                 and update --password-file"
            ),
        ),
        (49, Some("532")) => (
            Credentials,
            format!("the bind account's password has expired ({dn}, AD: data 532): set a new one in AD and update --password-file"),
        ),
        (49, Some("533")) => (Credentials, format!("the bind account {dn} is disabled in AD (data 533): enable it")),
        (49, Some("701")) => (Credentials, format!("the bind account {dn} has expired in AD (data 701): extend it")),
        (49, Some("775")) => (
            Credentials,
            format!(
                "the bind account {dn} is locked out in AD (data 775): unlock it, and check --password-file, since \
                 repeated wrong passwords lock it"
            ),
        ),
        (49, Some(code @ ("530" | "531"))) => (
            Credentials,
            format!("the bind account {dn} may not sign in at this time or from this host (AD: data {code})"),
        ),
        (49, _) => (Credentials, format!("the domain controller refused the credentials for {dn}: {}", dc_text(result))),
        (8 | 13, _) => (
            Other,
            format!(
                "the domain controller requires a protected connection for simple binds ({}): use ldaps://",
                dc_text(result)
            ),
        ),
        _ => (Other, format!("bind as {dn} failed: {}", dc_text(result))),
    };
    SourceError::new(kind, message)
}

fn search_error(url: &str, base: &str, result: &LdapResult) -> SourceError {
    use SourceErrorKind::{Other, Permissions, Throttled};
    let (kind, message) = match result.rc {
        50 => (Permissions, format!("the bind account may not read {base:?} on {url}: {}", dc_text(result))),
        // A search before a bind: AD says "000004DC: ... a successful bind must be completed on the
        // connection", Samba "00002020: Operation unavailable without authentication".
        1 if ["000004DC", "00002020", "successful bind", "without authentication"]
            .iter()
            .any(|t| result.text.contains(t)) =>
        {
            (Permissions, format!("{url} does not let an anonymous client search: give --bind-dn and --password-file"))
        }
        32 => (
            Other,
            format!(
                "{base:?} does not exist on {url} (or the bind account cannot see it): check --base-dn ({})",
                dc_text(result)
            ),
        ),
        3 | 11 | 51 => (Throttled, format!("{url} stopped the search ({}): try again later", dc_text(result))),
        _ => (Other, format!("searching {base:?} on {url} failed: {}", dc_text(result))),
    };
    SourceError::new(kind, message)
}

/// One search result entry: its DN and attribute values by lower-case name, as bytes (ldap3 splits
/// values into UTF-8 text and binary; an objectGUID whose 16 bytes happen to be valid UTF-8 lands
/// in the text half).
struct Entry {
    dn: String,
    attrs: HashMap<String, Vec<Vec<u8>>>,
}

impl From<ldap3::ResultEntry> for Entry {
    fn from(re: ldap3::ResultEntry) -> Entry {
        let entry = SearchEntry::construct(re);
        let mut attrs: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
        for (name, values) in entry.attrs {
            attrs.entry(name.to_ascii_lowercase()).or_default().extend(values.into_iter().map(String::into_bytes));
        }
        for (name, values) in entry.bin_attrs {
            attrs.entry(name.to_ascii_lowercase()).or_default().extend(values);
        }
        Entry { dn: entry.dn, attrs }
    }
}

impl Entry {
    fn values(&self, name: &str) -> &[Vec<u8>] {
        self.attrs.get(&name.to_ascii_lowercase()).map(Vec::as_slice).unwrap_or_default()
    }

    /// The first value as text, if it is UTF-8 and within [`MAX_VALUE_BYTES`].
    fn text(&self, name: &str) -> Option<String> {
        let value = self.values(name).first()?;
        if value.len() > MAX_VALUE_BYTES {
            return None;
        }
        String::from_utf8(value.clone()).ok()
    }

    /// Whether the first value was dropped for its size (for the count a read logs).
    fn oversized(&self, name: &str) -> bool {
        self.values(name).first().is_some_and(|v| v.len() > MAX_VALUE_BYTES)
    }

    fn guid(&self, name: &str) -> Option<String> {
        guid_string(self.values(name).first()?)
    }
}

/// A GUID's 16 bytes as AD displays them: the first three fields little-endian, lower case.
fn guid_string(b: &[u8]) -> Option<String> {
    let b: &[u8; 16] = b.try_into().ok()?;
    Some(format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]
    ))
}

/// The inverse of [`guid_string`], for filters on objectGUID.
fn guid_bytes(s: &str) -> Option<[u8; 16]> {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 || s.len() != 36 {
        return None;
    }
    let mut raw = [0u8; 16];
    for (i, byte) in raw.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    let order = [3, 2, 1, 0, 5, 4, 7, 6, 8, 9, 10, 11, 12, 13, 14, 15];
    let mut out = [0u8; 16];
    for (i, &from) in order.iter().enumerate() {
        out[i] = raw[from];
    }
    Some(out)
}

/// The GUID of a value in the extended DN form (`<GUID=...>;<SID=...>;CN=...`): AD's default hex
/// form (the 16 bytes as stored) or the string form some DCs give.
fn extended_dn_guid(value: &str) -> Option<String> {
    let rest = value.strip_prefix("<GUID=")?;
    let (guid, _) = rest.split_once('>')?;
    match guid.len() {
        32 => {
            let mut raw = [0u8; 16];
            for (i, byte) in raw.iter_mut().enumerate() {
                *byte = u8::from_str_radix(guid.get(2 * i..2 * i + 2)?, 16).ok()?;
            }
            guid_string(&raw)
        }
        36 => guid_bytes(&guid.to_ascii_lowercase()).and_then(|b| guid_string(&b)),
        _ => None,
    }
}

/// The plain DN of an extended DN value (what follows the `<...>;` parts).
fn plain_dn(value: &str) -> &str {
    let mut rest = value;
    while rest.starts_with('<') {
        match rest.find(">;") {
            Some(at) => rest = &rest[at + 2..],
            None => break,
        }
    }
    rest
}

fn guid_filter_value(guid: &str) -> Option<String> {
    Some(guid_bytes(guid)?.iter().map(|b| format!("\\{b:02x}")).collect())
}

/// A group as read, before its member GUIDs are sorted into users and groups.
struct RawGroup {
    external_id: String,
    name: Option<String>,
    member_ids: Vec<String>,
}

struct Reader<'a> {
    session: Session,
    config: &'a LdapConfig,
    progress: super::Progress<'a>,
    counts: SyncProgress,
    entries: usize,
    member_values: usize,
    dropped_values: u64,
    skipped_members: u64,
}

impl<'a> Reader<'a> {
    fn new(session: Session, config: &'a LdapConfig, progress: super::Progress<'a>) -> Self {
        Reader {
            session,
            config,
            progress,
            counts: SyncProgress::default(),
            entries: 0,
            member_values: 0,
            dropped_values: 0,
            skipped_members: 0,
        }
    }

    fn page_done(&mut self) {
        self.counts.pages += 1;
        (self.progress)(self.counts);
    }

    fn count_entry(&mut self) -> Result<(), SourceError> {
        self.entries += 1;
        if self.entries > MAX_ENTRIES {
            return Err(SourceError::new(
                SourceErrorKind::Other,
                format!(
                    "more than {MAX_ENTRIES} users and groups under {}: Tenon reads at most that many from one source; \
                     narrow --base-dn",
                    self.config.base_dn
                ),
            ));
        }
        Ok(())
    }

    fn count_members(&mut self, n: usize) -> Result<(), SourceError> {
        self.member_values += n;
        if self.member_values > MAX_MEMBER_VALUES {
            return Err(SourceError::new(
                SourceErrorKind::Other,
                format!(
                    "the groups under {} hold more than {MAX_MEMBER_VALUES} memberships: Tenon reads at most that many \
                     from one source; narrow --base-dn",
                    self.config.base_dn
                ),
            ));
        }
        Ok(())
    }

    /// One paged subtree search under `base`; every entry goes through `each`.
    async fn paged(
        &mut self,
        base: &str,
        filter: &str,
        attrs: &[String],
        controls: &[RawControl],
        each: &mut (dyn FnMut(&mut Self, Entry) -> Result<(), SourceError> + Send),
    ) -> Result<(), SourceError> {
        let mut cookie: Vec<u8> = Vec::new();
        // AD may answer a page with no entries while it scans (a filter on an unindexed
        // attribute), but not forever: a DC that keeps handing back cookies alone is cut off.
        let mut empty_pages = 0u32;
        loop {
            let mut ctrls = controls.to_vec();
            ctrls.push(PagedResults { size: PAGE_SIZE, cookie: std::mem::take(&mut cookie) }.into());
            let url = self.session.url.clone();
            let mut stream = self
                .session
                .ldap
                .with_controls(ctrls)
                .with_timeout(TIMEOUT)
                .streaming_search(base, Scope::Subtree, filter, attrs.to_vec())
                .await
                .map_err(|e| op_error(&url, e))?;
            let entries_before = self.entries;
            loop {
                let next = stream.next().await.map_err(|e| op_error(&url, e))?;
                let Some(re) = next else { break };
                // Continuation references (other partitions, DomainDnsZones) are not followed:
                // the base DN's own naming context is the source.
                if re.is_ref() || re.is_intermediate() {
                    continue;
                }
                self.count_entry()?;
                each(self, Entry::from(re))?;
            }
            let result = stream.finish().await;
            if result.rc != 0 {
                return Err(search_error(&url, base, &result));
            }
            self.page_done();
            cookie = result
                .ctrls
                .iter()
                .find_map(|Control(kind, raw)| match kind {
                    Some(ControlType::PagedResults) if raw.val.is_some() => Some(raw.parse::<PagedResults>().cookie),
                    _ => None,
                })
                .unwrap_or_default();
            if cookie.is_empty() {
                return Ok(());
            }
            empty_pages = if self.entries == entries_before { empty_pages + 1 } else { 0 };
            if empty_pages > MAX_EMPTY_PAGES {
                return Err(SourceError::new(
                    SourceErrorKind::Malformed,
                    format!("{url} answered {MAX_EMPTY_PAGES} pages in a row with no entries; the read was stopped"),
                ));
            }
        }
    }

    async fn users(&mut self, filter: &str) -> Result<Vec<SourceUser>, SourceError> {
        let mut users = Vec::new();
        let attrs = user_attributes();
        let base = self.config.base_dn.clone();
        self.paged(&base, filter, &attrs, &[], &mut |reader, entry| {
            let user = reader.user(&entry)?;
            reader.counts.users += 1;
            users.push(user);
            Ok(())
        })
        .await?;
        Ok(users)
    }

    fn user(&mut self, entry: &Entry) -> Result<SourceUser, SourceError> {
        let external_id = entry.guid("objectGUID").ok_or_else(|| self.no_guid(&entry.dn))?;
        let mut record = Map::new();
        let text = |reader: &mut Self, name: &str| {
            if entry.oversized(name) {
                reader.dropped_values += 1;
            }
            entry.text(name)
        };
        for (ad, graph) in USER_FIELDS {
            if let Some(v) = text(self, ad) {
                record.insert(graph.to_string(), Value::String(v));
            }
        }
        if let Some(phone) = text(self, "telephoneNumber") {
            record.insert("businessPhones".into(), Value::Array(vec![Value::String(phone)]));
        }
        let mut extensions = Map::new();
        for i in 1..=15 {
            let name = format!("extensionAttribute{i}");
            if let Some(v) = text(self, &name) {
                extensions.insert(name, Value::String(v));
            }
        }
        if !extensions.is_empty() {
            record.insert("onPremisesExtensionAttributes".into(), Value::Object(extensions));
        }
        // A FILETIME as AD gives it (0: must change now, i64::MAX: never); re-printed from the
        // parsed number so only digits reach the server.
        if let Some(expiry) = text(self, PASSWORD_EXPIRY).and_then(|s| s.trim().parse::<i64>().ok()) {
            record.insert(PASSWORD_EXPIRY.into(), Value::String(expiry.to_string()));
        }
        let upn = text(self, "userPrincipalName").filter(|u| !u.trim().is_empty());
        // userAccountControl is a 32-bit flag set that some tools print signed.
        let uac = text(self, "userAccountControl").and_then(|s| s.trim().parse::<i64>().ok());
        Ok(SourceUser { external_id, upn, record, account_enabled: uac.map(|f| f & 2 == 0), partial: false })
    }

    fn no_guid(&self, dn: &str) -> SourceError {
        SourceError::new(
            SourceErrorKind::Permissions,
            format!("the bind account cannot read objectGUID of {dn:?}: give it read access to users and groups under --base-dn"),
        )
    }

    async fn groups(&mut self, filter: &str) -> Result<Vec<RawGroup>, SourceError> {
        let mut groups = Vec::new();
        // (group index, DN, next range start) of groups whose members came in slices.
        let mut ranged: Vec<(usize, String, u64)> = Vec::new();
        let attrs: Vec<String> = ["cn", "objectGUID", "member", "uSNChanged"].map(String::from).to_vec();
        let extended_dn = [RawControl { ctype: EXTENDED_DN_OID.into(), crit: true, val: None }];
        let base = self.config.base_dn.clone();
        self.paged(&base, filter, &attrs, &extended_dn, &mut |reader, entry| {
            let external_id = entry.guid("objectGUID").ok_or_else(|| reader.no_guid(plain_dn(&entry.dn)))?;
            let mut member_ids = Vec::new();
            let mut next_range = None;
            for (name, values) in &entry.attrs {
                let range = match name.as_str() {
                    "member" => None,
                    n => match n.strip_prefix("member;range=") {
                        Some(range) => Some(range),
                        None => continue,
                    },
                };
                reader.add_members(&mut member_ids, values)?;
                if let Some(range) = range {
                    next_range = parse_range(range, &entry.dn)?;
                }
            }
            if entry.oversized("cn") {
                reader.dropped_values += 1;
            }
            if let Some(start) = next_range {
                ranged.push((groups.len(), plain_dn(&entry.dn).to_string(), start));
            }
            groups.push(RawGroup { external_id, name: entry.text("cn"), member_ids });
            reader.counts.groups += 1;
            Ok(())
        })
        .await?;
        for (index, dn, start) in ranged {
            let more = self.member_ranges(&dn, start, None).await?;
            if let Some(group) = groups.get_mut(index) {
                group.member_ids.extend(more);
            }
        }
        Ok(groups)
    }

    fn add_members(&mut self, into: &mut Vec<String>, values: &[Vec<u8>]) -> Result<(), SourceError> {
        self.count_members(values.len())?;
        for value in values {
            let guid = (value.len() <= 2 * MAX_VALUE_BYTES)
                .then(|| std::str::from_utf8(value).ok())
                .flatten()
                .and_then(extended_dn_guid);
            match guid {
                Some(g) => into.push(g),
                None => self.skipped_members += 1,
            }
        }
        Ok(())
    }

    /// The rest of a group's members from `start` on, slice by slice (`member;range=start-*`), as
    /// AD hands out groups larger than its MaxValRange (1,500). `step` asks for slices of that size
    /// (for tests against a DC that sends whole groups).
    async fn member_ranges(&mut self, dn: &str, mut start: u64, step: Option<u64>) -> Result<Vec<String>, SourceError> {
        let mut ids = Vec::new();
        loop {
            let attr = match step {
                Some(step) => format!("member;range={start}-{}", start.saturating_add(step.max(1) - 1)),
                None => format!("member;range={start}-*"),
            };
            let extended_dn = vec![RawControl { ctype: EXTENDED_DN_OID.into(), crit: true, val: None }];
            let entries = self.session.base_search(dn, &[attr.as_str()], extended_dn).await?;
            self.page_done();
            let Some(entry) = entries.into_iter().next() else { return Ok(ids) };
            let mut next = None;
            let mut seen = false;
            for (name, values) in &entry.attrs {
                if let Some(range) = name.strip_prefix("member;range=") {
                    seen = true;
                    self.add_members(&mut ids, values)?;
                    next = parse_range(range, dn)?;
                }
            }
            match next {
                // Each slice must move on, or a hostile DC could keep the read here forever.
                Some(n) if seen && n > start => start = n,
                Some(_) => {
                    return Err(SourceError::new(
                        SourceErrorKind::Malformed,
                        format!("{} answered the same member range of {dn:?} twice", self.session.url),
                    ))
                }
                None => return Ok(ids),
            }
        }
    }

    /// Sorts each group's member GUIDs into users and groups of this source; members that are
    /// neither (computers, contacts, foreign principals, objects outside the base DN) are left out.
    /// A delta read saw only what changed, so it looks the unknown GUIDs up under the base DN.
    async fn resolve_members(
        &mut self,
        users: &[SourceUser],
        groups: Vec<RawGroup>,
        look_up: bool,
    ) -> Result<Vec<SourceGroup>, SourceError> {
        let mut user_ids: HashSet<String> = users.iter().map(|u| u.external_id.clone()).collect();
        let mut group_ids: HashSet<String> = groups.iter().map(|g| g.external_id.clone()).collect();
        if look_up {
            let unknown: BTreeSet<String> = groups
                .iter()
                .flat_map(|g| g.member_ids.iter())
                .filter(|id| !user_ids.contains(*id) && !group_ids.contains(*id))
                .cloned()
                .collect();
            let unknown: Vec<String> = unknown.into_iter().collect();
            for chunk in unknown.chunks(GUID_LOOKUP_CHUNK) {
                let ors: String =
                    chunk.iter().filter_map(|g| guid_filter_value(g)).map(|v| format!("(objectGUID={v})")).collect();
                let filter = format!("(&(|{ors})(|{USER_FILTER}{GROUP_FILTER}))");
                let attrs: Vec<String> = vec!["objectGUID".into(), "objectClass".into()];
                let mut found = Vec::new();
                let base = self.config.base_dn.clone();
                self.paged(&base, &filter, &attrs, &[], &mut |_, entry| {
                    if let Some(id) = entry.guid("objectGUID") {
                        let is_group = entry.values("objectClass").iter().any(|c| c.eq_ignore_ascii_case(b"group"));
                        found.push((id, is_group));
                    }
                    Ok(())
                })
                .await?;
                for (id, is_group) in found {
                    if is_group {
                        group_ids.insert(id);
                    } else {
                        user_ids.insert(id);
                    }
                }
            }
        }
        let mut out = Vec::with_capacity(groups.len());
        for g in groups {
            let mut members = Members::default();
            for id in g.member_ids {
                if user_ids.contains(&id) {
                    members.users.insert(id);
                } else if group_ids.contains(&id) {
                    members.groups.insert(id);
                }
            }
            out.push(SourceGroup { external_id: g.external_id, name: g.name, members: MemberChange::Whole(members) });
        }
        Ok(out)
    }

    /// Users and groups deleted since `usn` whose last parent was under the base DN, from the
    /// tombstones (show-deleted control). Best effort: reading tombstones needs rights a read-only
    /// account may lack, and the periodic full read catches any deletion missed here.
    async fn deleted_since(&mut self, usn: u64, default_nc: Option<&str>) -> (Vec<String>, Vec<String>) {
        let base = normalize_dn(&self.config.base_dn);
        let Some(nc) = default_nc else { return (Vec::new(), Vec::new()) };
        if !base.ends_with(&normalize_dn(nc)) {
            return (Vec::new(), Vec::new());
        }
        let filter = format!(
            "(&(isDeleted=TRUE)(uSNChanged>={})(|(objectClass=user)(objectClass=group)))",
            usn.saturating_add(1)
        );
        let attrs: Vec<String> = vec!["objectGUID".into(), "objectClass".into(), "lastKnownParent".into()];
        let show_deleted = [RawControl { ctype: SHOW_DELETED_OID.into(), crit: true, val: None }];
        let (mut users, mut groups) = (Vec::new(), Vec::new());
        // Tombstones live in the naming context's Deleted Objects container, not under the base DN.
        let result = self
            .paged(nc, &filter, &attrs, &show_deleted, &mut |_, entry| {
                let parent = entry.text("lastKnownParent").map(|p| normalize_dn(&p)).unwrap_or_default();
                let in_scope = parent == base || parent.ends_with(&format!(",{base}"));
                let classes = entry.values("objectClass");
                let has = |c: &[u8]| classes.iter().any(|v| v.eq_ignore_ascii_case(c));
                if let (true, Some(id)) = (in_scope, entry.guid("objectGUID")) {
                    if has(b"group") {
                        groups.push(id);
                    } else if has(b"person") && !has(b"computer") {
                        users.push(id);
                    }
                }
                Ok(())
            })
            .await;
        if let Err(e) = result {
            tracing::debug!(error = %e, "deleted users and groups not read (the next full read finds them)");
            return (Vec::new(), Vec::new());
        }
        (users, groups)
    }

    /// AD answers a search the bind account may not see into with no entries rather than an error;
    /// an empty full read is believed only when the base DN itself is visible.
    async fn check_base_visible(&mut self) -> Result<(), SourceError> {
        let base = self.config.base_dn.clone();
        if self.session.base_search(&base, &["objectClass"], Vec::new()).await?.is_empty() {
            return Err(SourceError::new(
                SourceErrorKind::Permissions,
                format!(
                    "the bind account sees nothing under {base:?} on {}: give it read access there (or check --base-dn)",
                    self.config.url
                ),
            ));
        }
        Ok(())
    }

    async fn finish(mut self) {
        if self.dropped_values > 0 {
            tracing::warn!(
                url = %self.config.url,
                values = self.dropped_values,
                "attribute values over {MAX_VALUE_BYTES} bytes were left out"
            );
        }
        if self.skipped_members > 0 {
            tracing::warn!(url = %self.config.url, values = self.skipped_members, "member values without a GUID were left out");
        }
        let _ = self.session.ldap.unbind().await;
    }
}

/// The members of one group read in slices of `step` (`member;range=0-(step-1)`, ...), the way AD
/// hands out large groups: for testing that path against a DC that sends small groups whole.
#[doc(hidden)]
pub async fn group_members_in_slices(
    config: &LdapConfig,
    password: Option<&str>,
    group_dn: &str,
    step: u64,
) -> Result<Vec<String>, SourceError> {
    config.check()?;
    let session = Session::open(config, password).await?;
    let progress = |_: SyncProgress| {};
    let mut reader = Reader::new(session, config, &progress);
    let ids = reader.member_ranges(group_dn, 0, Some(step)).await;
    reader.finish().await;
    ids
}

/// `lo-hi` of a `member;range=lo-hi` attribute: the next start, or `None` when `hi` is `*` (the last
/// slice).
fn parse_range(range: &str, dn: &str) -> Result<Option<u64>, SourceError> {
    let bad = || SourceError::new(SourceErrorKind::Malformed, format!("member range {range:?} of {dn:?} is not lo-hi"));
    let (lo, hi) = range.split_once('-').ok_or_else(bad)?;
    let lo: u64 = lo.parse().map_err(|_| bad())?;
    if hi == "*" {
        return Ok(None);
    }
    let hi: u64 = hi.parse().map_err(|_| bad())?;
    if hi < lo {
        return Err(bad());
    }
    hi.checked_add(1).map(Some).ok_or_else(bad)
}

/// A DN compared loosely: lower case, no spaces around separators.
fn normalize_dn(dn: &str) -> String {
    dn.split(',')
        .map(|part| match part.split_once('=') {
            Some((a, v)) => format!("{}={}", a.trim(), v.trim()),
            None => part.trim().to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
        .to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = |url: &str| Target::parse(url).map(|t| (t.tls, t.host, t.port)).ok();
        type Want = Option<(bool, &'static str, u16)>;
        let cases: &[(&str, Want)] = &[
            ("ldaps://dc1.example.com", Some((true, "dc1.example.com", 636))),
            ("LDAPS://dc1.example.com:3269/", Some((true, "dc1.example.com", 3269))),
            ("ldap://10.0.0.5", Some((false, "10.0.0.5", 389))),
            ("ldaps://[2001:db8::1]:636", Some((true, "[2001:db8::1]", 636))),
            ("ldaps://[2001:db8::1]", Some((true, "[2001:db8::1]", 636))),
            ("https://dc1", None),
            ("ldaps://", None),
            ("ldaps://dc1:0", None),
            ("ldaps://dc1:99999", None),
            ("ldaps://user@dc1", None),
            ("ldaps://dc1/DC=x", None),
            ("ldaps://dc 1", None),
            ("ldaps://[nothex]:636", None),
        ];
        for (url, want) in cases {
            assert_eq!(t(url), want.map(|(a, b, c)| (a, b.to_string(), c)), "{url}");
        }
    }

    #[test]
    fn dns() {
        for (dn, ok) in [
            ("DC=example,DC=com", true),
            ("OU=Staff, DC=example, DC=com", true),
            ("CN=Smith\\, John,OU=x,DC=y", true),
            ("CN=a+UID=b,DC=y", true),
            ("", false),
            ("example.com", false),
            ("/etc/passwd", false),
            ("DC=,DC=com", false),
            ("=x,DC=com", false),
            ("CN=x\\", false),
        ] {
            assert_eq!(check_dn(dn, "--base-dn").is_ok(), ok, "{dn}");
        }
    }

    #[test]
    fn plain_ldap_needs_the_flag() {
        let mut c = LdapConfig {
            url: "ldap://dc1.example.com".into(),
            bind_dn: None,
            base_dn: "DC=example,DC=com".into(),
            ca_pem: None,
            allow_plain_ldap: false,
        };
        let e = c.check().unwrap_err();
        assert_eq!(e.kind, SourceErrorKind::Other);
        assert!(e.message.contains("ldaps://dc1.example.com:636") && e.message.contains("--allow-plain-ldap"), "{e}");
        c.allow_plain_ldap = true;
        assert!(c.check().is_ok());
        c.ca_pem = Some(b"not pem".to_vec());
        assert!(c.check().unwrap_err().message.contains("--ca-file"));
    }

    #[test]
    fn guids() {
        // objectGUID bytes of a Samba Administrator and the GUID AD shows for them.
        let raw = [0xe6, 0x83, 0x66, 0x5d, 0x85, 0xb5, 0x2d, 0x43, 0xac, 0x3a, 0x77, 0xc2, 0x36, 0x98, 0xf7, 0xb8];
        let s = "5d6683e6-b585-432d-ac3a-77c23698f7b8";
        assert_eq!(guid_string(&raw).as_deref(), Some(s));
        assert_eq!(guid_bytes(s), Some(raw));
        assert_eq!(guid_string(&raw[..15]), None);
        assert_eq!(
            extended_dn_guid("<GUID=e683665d85b52d43ac3a77c23698f7b8>;<SID=0105>;CN=Administrator,CN=Users,DC=t")
                .as_deref(),
            Some(s)
        );
        assert_eq!(extended_dn_guid("<GUID=5D6683E6-B585-432D-AC3A-77C23698F7B8>;CN=x").as_deref(), Some(s));
        assert_eq!(extended_dn_guid("CN=x,DC=y"), None);
        assert_eq!(extended_dn_guid("<GUID=zz>;CN=x"), None);
        assert_eq!(plain_dn("<GUID=ab>;<SID=cd>;CN=x,DC=y"), "CN=x,DC=y");
        assert_eq!(plain_dn("CN=x,DC=y"), "CN=x,DC=y");
        assert_eq!(
            guid_filter_value(s).as_deref(),
            Some("\\e6\\83\\66\\5d\\85\\b5\\2d\\43\\ac\\3a\\77\\c2\\36\\98\\f7\\b8")
        );
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("0-1499", "g").unwrap(), Some(1500));
        assert_eq!(parse_range("1500-*", "g").unwrap(), None);
        assert!(parse_range("10-2", "g").is_err());
        assert!(parse_range("x-*", "g").is_err());
        assert!(parse_range(&format!("0-{}", u64::MAX), "g").is_err());
    }

    #[test]
    fn bind_errors() {
        let r = |rc: u32, text: &str| LdapResult {
            rc,
            matched: String::new(),
            text: text.into(),
            refs: Vec::new(),
            ctrls: Vec::new(),
        };
        let dn = "CN=svc,DC=x";
        let cases = [
            (
                "80090308: LdapErr: DSID-0C09042A, comment: AcceptSecurityContext error, data 52e, v3839",
                "wrong password for CN=svc",
            ),
            (
                "80090308: LdapErr: DSID-0C09042A, comment: AcceptSecurityContext error, data 773, v3839",
                "must be changed",
            ),
            ("... data 532, v893", "expired"),
            ("... data 533, v893", "disabled"),
            ("... data 775, v893", "locked out"),
        ];
        for (text, want) in cases {
            let e = bind_error(dn, &r(49, text));
            assert_eq!(e.kind, SourceErrorKind::Credentials);
            assert!(e.message.contains(want), "{text}: {e}");
        }
        assert_eq!(bind_error(dn, &r(8, "")).kind, SourceErrorKind::Other);
    }

    #[test]
    fn a_read_can_run_on_a_spawned_task() {
        fn send<T: Send>(_: &T) {}
        let config = LdapConfig {
            url: "ldaps://dc1.example.com".into(),
            bind_dn: None,
            base_dn: "DC=example,DC=com".into(),
            ca_pem: None,
            allow_plain_ldap: false,
        };
        let progress = |_: SyncProgress| {};
        send(&read(&config, None, None, &progress));
    }

    /// A "DC" that answers every request with bytes that are not LDAP: the read ends with an
    /// error, never a panic or a hang.
    #[tokio::test]
    async fn garbage_from_the_dc_is_an_error() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for answer in [&b"\x30\x03\x02\x01\x01"[..], b"\x30\x84\xff\xff\xff\xff", b"HTTP/1.1 400 Bad Request\r\n\r\n"] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let server = tokio::spawn(async move {
                if let Ok((mut s, _)) = listener.accept().await {
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                    let _ = s.write_all(answer).await;
                    let _ = s.shutdown().await;
                }
            });
            let config = LdapConfig {
                url: format!("ldap://127.0.0.1:{port}"),
                bind_dn: Some("CN=svc,DC=example,DC=com".into()),
                base_dn: "DC=example,DC=com".into(),
                ca_pem: None,
                allow_plain_ldap: true,
            };
            let progress = |_: SyncProgress| {};
            let read = read(&config, Some("secret-password"), None, &progress);
            let e = tokio::time::timeout(Duration::from_secs(30), read).await.expect("no hang").unwrap_err();
            assert!(matches!(e.kind, SourceErrorKind::Unreachable | SourceErrorKind::Malformed), "{e:?}");
            assert!(!e.message.contains("secret-password"));
            server.abort();
        }
    }

    /// A DC that refuses StartTLS (an ExtendedResponse with protocolError): with
    /// --allow-plain-ldap the reader reconnects and binds in plain LDAP. This fake DC stops after
    /// the bind; what matters is the second connection and what arrives on it.
    #[tokio::test]
    async fn starttls_refused_falls_back_to_plain_when_allowed() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        /// The request's message ID as its INTEGER TLV (short-form lengths: these requests are small).
        fn message_id(request: &[u8]) -> Vec<u8> {
            let at = if request[1] & 0x80 == 0 { 2 } else { 2 + usize::from(request[1] & 0x7f) };
            request[at..at + 2 + usize::from(request[at + 1])].to_vec()
        }
        fn response(id: &[u8], op: u8) -> Vec<u8> {
            // resultCode, matchedDN "", diagnosticMessage "".
            let result_code = if op == 0x78 { 2 } else { 0 };
            let body = [0x0a, 0x01, result_code, 0x04, 0x00, 0x04, 0x00];
            let mut inner = id.to_vec();
            inner.extend([op, body.len() as u8]);
            inner.extend(body);
            let mut out = vec![0x30, inner.len() as u8];
            out.extend(inner);
            out
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let mut first_ops = Vec::new();
            for _ in 0..2 {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap();
                let id = message_id(&buf[..n]);
                let op = buf[2 + id.len()];
                first_ops.push(op);
                // 0x77: ExtendedRequest (StartTLS) -> 0x78 refused; 0x60: BindRequest -> 0x61 success.
                let reply = if op == 0x77 { 0x78 } else { 0x61 };
                s.write_all(&response(&id, reply)).await.unwrap();
                if op == 0x60 {
                    let _ = s.read(&mut buf).await;
                }
            }
            first_ops
        });
        let config = LdapConfig {
            url: format!("ldap://127.0.0.1:{port}"),
            bind_dn: Some("CN=svc,DC=example,DC=com".into()),
            base_dn: "DC=example,DC=com".into(),
            ca_pem: None,
            allow_plain_ldap: true,
        };
        let progress = |_: SyncProgress| {};
        let read = read(&config, Some("secret-password"), None, &progress);
        let e = tokio::time::timeout(Duration::from_secs(30), read).await.expect("no hang").unwrap_err();
        assert_eq!(e.kind, SourceErrorKind::Unreachable, "{e}");
        let first_ops = tokio::time::timeout(Duration::from_secs(5), server).await.unwrap().unwrap();
        assert_eq!(first_ops, vec![0x77, 0x60], "StartTLS first, then a plain connection that binds");
    }

    #[test]
    fn dn_normalization() {
        assert_eq!(normalize_dn("OU=Staff, DC=Example,DC=COM"), "ou=staff,dc=example,dc=com");
    }
}
