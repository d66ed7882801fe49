//! The portal tests' HTTP client: follows no redirect and carries the cookie by hand, so every
//! `Set-Cookie` and `Location` is asserted as a browser would receive it; with the CSRF and
//! security-header helpers (shared by tests/portal.rs and tests/portal_pages.rs).

use super::Server;
use std::time::Duration;

pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// One answer, whatever its status.
pub struct Resp {
    pub status: u16,
    pub location: Option<String>,
    pub cookies: Vec<String>,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

pub fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().redirects(0).timeout(Duration::from_secs(20)).build()
}

pub fn read(r: Result<ureq::Response, ureq::Error>) -> Resp {
    let r = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("request failed: {e}"),
    };
    let headers = r
        .headers_names()
        .into_iter()
        .flat_map(|n| r.all(&n).into_iter().map(move |v| (n.clone(), v.to_string())))
        .collect::<Vec<_>>();
    Resp {
        status: r.status(),
        location: r.header("location").map(str::to_string),
        cookies: r.all("set-cookie").into_iter().map(str::to_string).collect(),
        headers,
        body: r.into_string().unwrap_or_default(),
    }
}

pub fn get(server: &Server, path: &str, cookie: Option<&str>, extra: &[(&str, &str)]) -> Resp {
    let mut req = agent().get(&format!("{}{path}", server.url));
    if let Some(c) = cookie {
        req = req.set("Cookie", c);
    }
    for (k, v) in extra {
        req = req.set(k, v);
    }
    read(req.call())
}

pub fn post(server: &Server, path: &str, cookie: Option<&str>, fields: &[(&str, &str)]) -> Resp {
    let mut req = agent().post(&format!("{}{path}", server.url));
    if let Some(c) = cookie {
        req = req.set("Cookie", c);
    }
    read(req.send_form(fields))
}

/// Signs in with `token`; returns the `name=value` to send back as `Cookie`.
pub fn sign_in(server: &Server, token: &str) -> String {
    let r = post(server, "/signin", None, &[("token", token)]);
    assert_eq!(r.status, 303, "sign-in: {}", r.body);
    assert_eq!(r.location.as_deref(), Some("/"));
    r.cookies[0].split(';').next().unwrap().to_string()
}

/// The CSRF token a page's forms carry.
pub fn csrf_of(body: &str) -> String {
    let at = body.find("name=\"csrf\" value=\"").expect("the page has a CSRF field") + "name=\"csrf\" value=\"".len();
    body[at..at + 64].to_string()
}

pub fn assert_security_headers(r: &Resp, what: &str) {
    assert_eq!(r.header("content-security-policy"), Some(CSP), "{what}");
    assert_eq!(r.header("x-frame-options"), Some("DENY"), "{what}");
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"), "{what}");
    assert_eq!(r.header("referrer-policy"), Some("no-referrer"), "{what}");
}
