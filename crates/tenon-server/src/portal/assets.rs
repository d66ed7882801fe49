//! The portal's static files, embedded in the binary and served under names that carry the
//! first 12 hex digits of their SHA-256 (`portal.1a2b3c4d5e6f.css`): a new build's file has a new
//! name, so browsers may cache each one for a year without ever serving a stale copy.

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use std::sync::OnceLock;

struct Asset {
    /// `stem.HASH.ext`, the only name it is served under.
    name: String,
    content_type: &'static str,
    body: &'static [u8],
    etag: HeaderValue,
}

struct Assets {
    css: Asset,
    htmx: Asset,
}

fn asset(stem: &str, ext: &str, content_type: &'static str, body: &'static [u8]) -> Asset {
    let hash = hex::encode(Sha256::digest(body));
    let etag = HeaderValue::from_str(&format!("\"{}\"", &hash[..32])).unwrap_or(HeaderValue::from_static("\"0\""));
    Asset { name: format!("{stem}.{}.{ext}", &hash[..12]), content_type, body, etag }
}

fn assets() -> &'static Assets {
    static ASSETS: OnceLock<Assets> = OnceLock::new();
    ASSETS.get_or_init(|| Assets {
        css: asset("portal", "css", "text/css; charset=utf-8", include_bytes!("../../assets/portal/portal.css")),
        htmx: asset("htmx", "js", "text/javascript; charset=utf-8", include_bytes!("../../assets/portal/htmx.min.js")),
    })
}

/// The URLs the templates link to.
pub struct AssetUrls {
    pub css: String,
    pub htmx: String,
}

pub fn urls() -> AssetUrls {
    let a = assets();
    AssetUrls { css: format!("/assets/{}", a.css.name), htmx: format!("/assets/{}", a.htmx.name) }
}

/// `GET /assets/{file}`: only the current names (an old name is a 404, never a stale body under
/// a year-long cache header).
pub async fn serve(Path(file): Path<String>, headers: HeaderMap) -> Response {
    let a = assets();
    let Some(asset) = [&a.css, &a.htmx].into_iter().find(|x| x.name == file) else {
        return (StatusCode::NOT_FOUND, "no such asset").into_response();
    };
    let cache = HeaderValue::from_static("public, max-age=31536000, immutable");
    if headers.get(header::IF_NONE_MATCH).is_some_and(|v| v.as_bytes() == asset.etag.as_bytes()) {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, asset.etag.clone()), (header::CACHE_CONTROL, cache)])
            .into_response();
    }
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type)),
            (header::ETAG, asset.etag.clone()),
            (header::CACHE_CONTROL, cache),
        ],
        asset.body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// htmx, vendored from the npm package `htmx.org` (see `assets/portal/README.md`).
    const HTMX_VERSION: &str = "2.0.11";
    const HTMX_SHA256: &str = "d6fdc75f204e6bdefa99b69bf1e6d4ac69b8a364f77929f45c13476b4000f717";

    /// The vendored htmx is byte for byte the file of the pinned npm package.
    #[test]
    fn vendored_htmx_is_the_pinned_release() {
        let body = include_bytes!("../../assets/portal/htmx.min.js");
        assert_eq!(hex::encode(Sha256::digest(body)), HTMX_SHA256, "htmx.min.js is not htmx.org@{HTMX_VERSION}");
        let readme = include_str!("../../assets/portal/README.md");
        assert!(readme.contains(HTMX_SHA256) && readme.contains(&format!("htmx.org@{HTMX_VERSION}")));
    }

    #[test]
    fn asset_names_carry_their_hash() {
        let u = urls();
        assert!(u.css.starts_with("/assets/portal.") && u.css.ends_with(".css"), "{}", u.css);
        assert!(u.htmx.starts_with(&format!("/assets/htmx.{}", &HTMX_SHA256[..12])), "{}", u.htmx);
    }
}
