//! What makes the portal safe to expose: security headers on every response, a same-origin
//! check on every write, and the per-session CSRF token that every form carries.

use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// No inline script or style anywhere (htmx is configured not to inject its indicator style);
/// forms post only to the portal; no page may frame it.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The signature page's policy: the portal's, and it may frame the portal's own preview document.
pub const SIGNATURES_PAGE_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-src 'self'; frame-ancestors 'none'; base-uri 'none'";

/// A signature preview document (`signatures_page::preview_html`): the template's inline style
/// and `data:` images, nothing else; framed only by the portal.
pub const PREVIEW_CSP: &str = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; \
     form-action 'none'; frame-ancestors 'self'; base-uri 'none'; sandbox";

/// The form field and the htmx header that carry the CSRF token.
pub const CSRF_FIELD: &str = "csrf";
pub const CSRF_HEADER: &str = "x-csrf-token";

/// Adds the security headers to every portal response. Pages are `no-store` (they show fleet
/// data to a signed-in administrator; a shared computer's cache must not keep them); assets set
/// their own long-lived `Cache-Control` first and keep it.
pub async fn headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    // A handler may choose one of the two known variants (the signature page and its preview),
    // no other policy; everything else gets the portal's.
    let own = h.get(header::CONTENT_SECURITY_POLICY).map(HeaderValue::as_bytes);
    let preview = own == Some(PREVIEW_CSP.as_bytes());
    if !preview && own != Some(SIGNATURES_PAGE_CSP.as_bytes()) {
        h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    }
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static(if preview { "SAMEORIGIN" } else { "DENY" }));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert("cross-origin-opener-policy", HeaderValue::from_static("same-origin"));
    h.insert("cross-origin-resource-policy", HeaderValue::from_static("same-origin"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

/// Refuses a write that a browser says comes from another site (`Sec-Fetch-Site`) or whose
/// `Origin` names another host than the one asked. Defence in depth under the CSRF token: it also
/// covers the sign-in form, which has no session (and so no token) yet. A client that sends
/// neither header (curl, the tests) passes; the CSRF token still applies to it.
pub async fn same_origin_writes(req: Request, next: Next) -> Response {
    if req.method() != Method::GET && req.method() != Method::HEAD && !same_origin(req.headers()) {
        return super::pages::refused_cross_site();
    }
    next.run(req).await
}

fn same_origin(h: &HeaderMap) -> bool {
    if let Some(site) = h.get("sec-fetch-site") {
        if !matches!(site.as_bytes(), b"same-origin" | b"none") {
            return false;
        }
    }
    match (h.get(header::ORIGIN), h.get(header::HOST)) {
        (None, _) => true,
        // Our `Referrer-Policy: no-referrer` makes browsers send `Origin: null` on every form
        // POST, also to the same origin (found by scripts/test-portal in Chromium). Such a
        // browser also sends `Sec-Fetch-Site` (a header pages cannot set), checked above.
        (Some(origin), _) if origin.as_bytes() == b"null" && h.contains_key("sec-fetch-site") => true,
        (Some(origin), Some(host)) => origin_host(origin.as_bytes()) == Some(host.as_bytes()),
        (Some(_), None) => false,
    }
}

/// `https://host:port` -> `host:port`; `null` and anything else unparsable -> None.
fn origin_host(origin: &[u8]) -> Option<&[u8]> {
    let s = std::str::from_utf8(origin).ok()?;
    let rest = s.strip_prefix("https://").or_else(|| s.strip_prefix("http://"))?;
    (!rest.is_empty() && !rest.contains('/')).then_some(rest.as_bytes())
}

/// The session's CSRF token: derived from the session id (which only the cookie holds), so it
/// needs no storage, differs for every session, and reveals nothing about the id (SHA-256 under
/// a label of its own; the database stores the id's plain SHA-256, never this).
pub fn csrf_token(session_id: &[u8; 32]) -> String {
    let mut h = Sha256::new();
    h.update(b"tenon portal csrf v1\0");
    h.update(session_id);
    hex::encode(h.finalize())
}

/// Whether a presented token is the session's, in constant time.
pub fn csrf_matches(session_id: &[u8; 32], presented: Option<&str>) -> bool {
    let Some(presented) = presented else { return false };
    let expected = csrf_token(session_id);
    // Lengths are public (always 64); only the content is compared in constant time.
    presented.len() == expected.len() && bool::from(presented.as_bytes().ct_eq(expected.as_bytes()))
}

/// The token a request presents: the form field, else the htmx header.
pub fn presented_csrf<'a>(form: &'a super::pages::Form, headers: &'a HeaderMap) -> Option<&'a str> {
    form.get(CSRF_FIELD).or_else(|| headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok()))
}

/// A response with `Vary: HX-Request`: the same URL answers a whole page or the fragment htmx
/// asked for, and a cache must keep them apart.
pub fn vary_hx(resp: impl IntoResponse) -> Response {
    let mut resp = resp.into_response();
    resp.headers_mut().append(header::VARY, HeaderValue::from_static("HX-Request"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_origin_table() {
        let check = |pairs: &[(&'static str, &str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, HeaderValue::from_str(v).unwrap());
            }
            same_origin(&h)
        };
        assert!(check(&[("host", "a:1")]));
        assert!(check(&[("host", "a:1"), ("origin", "http://a:1")]));
        assert!(check(&[("host", "a:1"), ("origin", "https://a:1"), ("sec-fetch-site", "same-origin")]));
        assert!(!check(&[("host", "a:1"), ("origin", "http://evil:1")]));
        assert!(!check(&[("host", "a:1"), ("origin", "null")]));
        assert!(check(&[("host", "a:1"), ("origin", "null"), ("sec-fetch-site", "same-origin")]));
        assert!(!check(&[("host", "a:1"), ("origin", "null"), ("sec-fetch-site", "cross-site")]));
        assert!(!check(&[("host", "a:1"), ("sec-fetch-site", "cross-site")]));
        assert!(!check(&[("host", "a:1"), ("sec-fetch-site", "same-site")]));
        assert!(!check(&[("origin", "http://a:1")]));
    }

    #[test]
    fn csrf_tokens_are_per_session_and_compared_whole() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let ta = csrf_token(&a);
        assert_eq!(ta.len(), 64);
        assert_ne!(ta, csrf_token(&b));
        assert!(csrf_matches(&a, Some(&ta)));
        assert!(!csrf_matches(&b, Some(&ta)));
        assert!(!csrf_matches(&a, Some(&ta[..63])));
        assert!(!csrf_matches(&a, Some("")));
        assert!(!csrf_matches(&a, None));
        // Not the stored session hash: the page's token says nothing about the stored value.
        assert_ne!(ta, hex::encode(Sha256::digest(a)));
    }
}
