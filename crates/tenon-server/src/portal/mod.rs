//! The administrator's web portal (issue 17): server-rendered pages on the API's own listener,
//! at `/` beside `/api/v1`.
//!
//! - `sessions.rs`: sign-in with an admin token, server-side sessions (`portal_sessions`), the
//!   `SignedIn` extractor that every page but sign-in takes.
//! - `security.rs`: the security headers on every response, the same-origin check on every
//!   POST, and the per-session CSRF token.
//! - `pages.rs`: the handlers; they gather data and hand it to a template (`templates/portal/`).
//! - `device_list.rs`: searching, filtering, sorting and paging the fleet from memory.
//! - `device_actions.rs`: decommission, installing a package on request, report history,
//!   revealing recovery keys.
//! - `fleet_pages.rs`: the audit log, networks and packages pages.
//! - `directory_pages.rs`: users and groups, a user's effective configuration and its origins.
//! - `settings_page.rs`: settings per scope, previewed (devices reached) before saving.
//! - `signatures_page.rs`: Outlook signature templates, uploaded, previewed for a user, removed.
//! - `assets.rs`: the stylesheet and htmx, embedded, under content-hashed names.
//!
//! Every page works without JavaScript; htmx only updates the device table while searching.

mod assets;
mod device_actions;
mod device_list;
mod directory_pages;
mod fleet_pages;
mod pages;
mod security;
mod sessions;
mod settings_page;
mod signatures_page;

use crate::ratelimit::{KeyedLimiter, Rate};
use crate::state::AppState;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Forms are small: a token, a user name, a CSRF token.
const FORM_LIMIT: usize = 64 * 1024;
/// A signature upload carries a template's HTML and text (the domain limits the template to
/// `signatures::MAX_TEMPLATE_BYTES`; urlencoding may triple it).
const SIGNATURE_FORM_LIMIT: usize = 4 * crate::signatures::MAX_TEMPLATE_BYTES;

/// How sessions expire and how often an address may try to sign in (`serve --portal-*`).
#[derive(Clone, Debug)]
pub struct PortalOptions {
    /// A session not used for this long ends.
    pub session_idle: Duration,
    /// A session ends this long after sign-in, however much it is used.
    pub session_max: Duration,
    /// Sign-in attempts per source address (`None`: unlimited).
    pub signin_rate: Option<Rate>,
}

impl Default for PortalOptions {
    fn default() -> Self {
        Self {
            session_idle: Duration::from_secs(30 * 60),
            session_max: Duration::from_secs(12 * 3600),
            signin_rate: Some(Rate { burst: 10, per: Duration::from_secs(60) }),
        }
    }
}

/// What the portal's handlers share: the server's state and the portal's own.
pub(crate) struct Portal {
    app: Arc<AppState>,
    opts: PortalOptions,
    signin_limiter: KeyedLimiter<IpAddr>,
    /// The limiter's clock (any monotonic nanoseconds).
    epoch: Instant,
    /// The directory's display names for the device search, kept until the directory changes.
    names: std::sync::Mutex<Option<Arc<device_list::NameIndex>>>,
}

impl Portal {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Under TLS the cookie is `Secure` and `__Host-` prefixed (the browser then refuses it from
    /// plain HTTP and from any other host or path).
    fn tls(&self) -> bool {
        self.app.tls.is_some()
    }

    /// The display-name index of `world`'s directory: the one kept, or built anew (once per
    /// directory change, under this lock, so concurrent searches do not each build one).
    fn names(&self, world: &crate::state::World) -> Arc<device_list::NameIndex> {
        let mut kept = self.names.lock().unwrap_or_else(|p| p.into_inner());
        match kept.as_ref() {
            Some(n) if n.is_for(world) => n.clone(),
            _ => kept.insert(Arc::new(device_list::NameIndex::build(world))).clone(),
        }
    }
}

/// The portal's routes, ready to merge beside the API's (`api::router`).
pub fn router(app: Arc<AppState>, opts: PortalOptions) -> Router {
    let portal = Arc::new(Portal {
        signin_limiter: KeyedLimiter::new(opts.signin_rate, crate::ratelimit::MAX_KEYS),
        app,
        opts,
        epoch: Instant::now(),
        names: Default::default(),
    });
    Router::new()
        .route("/", get(pages::overview))
        .route("/signin", get(pages::signin_form).post(pages::signin))
        .route("/signout", post(pages::signout))
        .route("/devices", get(pages::devices))
        .route("/devices/{id}", get(pages::device))
        .route("/devices/{id}/primary", post(pages::reassign_primary))
        .route("/devices/{id}/decommission", post(device_actions::decommission))
        .route("/devices/{id}/packages/install", post(device_actions::install))
        .route("/devices/{id}/reports", get(device_actions::reports))
        .route("/devices/{id}/recovery-keys", post(device_actions::reveal))
        .route("/audit", get(fleet_pages::audit))
        .route("/networks", get(fleet_pages::networks))
        .route("/packages", get(fleet_pages::packages))
        .route("/packages/{name}", get(fleet_pages::package))
        .route("/users", get(directory_pages::users))
        .route("/users/{upn}", get(directory_pages::user))
        .route("/groups", get(directory_pages::groups))
        .route("/groups/{name}", get(directory_pages::group))
        .route("/settings", get(settings_page::settings).post(settings_page::settings_post))
        .route(
            "/signatures",
            get(signatures_page::signatures)
                .post(signatures_page::upload)
                .layer(DefaultBodyLimit::max(SIGNATURE_FORM_LIMIT)),
        )
        .route("/signatures/{name}", get(signatures_page::signature))
        .route("/signatures/{name}/preview.html", get(signatures_page::preview_html))
        .route("/signatures/{name}/remove", post(signatures_page::remove))
        // Like the API's: a browser that navigates away must not cancel a write half-way.
        .route_layer(axum::middleware::from_fn(crate::api::run_to_completion))
        .route("/assets/{file}", get(assets::serve))
        .layer(axum::middleware::from_fn(security::same_origin_writes))
        .layer(axum::middleware::from_fn(security::headers))
        .layer(DefaultBodyLimit::max(FORM_LIMIT))
        .with_state(portal)
}
