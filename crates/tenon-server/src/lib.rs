//! tenon-server: compiles each device's configuration from tenant, group and user settings,
//! signs it, and serves it cheaply; records reports; keeps the audit log.
//!
//! Path of a check-in: `api::device::config` -> `api::extract::authenticate_device` ->
//! `index::CheckinIndex` (memory only) -> 304 or the stored envelope bytes.

pub mod api;
pub mod auth_failures;
pub mod backup;
pub mod client_policy;
pub mod datadir;
pub mod device_health;
pub mod device_key;
pub mod devices;
pub mod directory;
pub mod error;
pub mod escrow;
pub mod follow;
pub mod index;
pub mod jobs;
pub mod lifecycle;
pub mod listener;
pub mod metrics;
pub mod packages;
pub mod portal;
pub mod ratelimit;
pub mod report_history;
pub mod resign;
pub mod secrets;
pub mod settings;
pub mod signatures;
pub mod state;
pub mod store;
pub mod tls;
pub mod tokens;
pub mod writer;

use anyhow::{bail, Context};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Options of `tenon-server serve`.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub database: Option<String>,
    /// Package content (`None`: `DATA_DIR/packages`).
    pub package_dir: Option<PathBuf>,
    /// Lifetime of a signed envelope, in seconds.
    pub envelope_ttl: i64,
    /// Connection cap and timeouts (slow and greedy clients).
    pub connections: listener::ConnectionLimits,
    /// Report and enrollment rates.
    pub rates: ratelimit::ClientRates,
    pub report_history: report_history::ReportHistory,
    /// How often failed authentications are logged (in aggregate).
    pub auth_failure_log_interval: Duration,
    /// Where to serve `GET /metrics` (Prometheus text); `None`: no metrics at all.
    pub metrics_listen: Option<SocketAddr>,
    /// Where the TLS certificate comes from; `None`: plain HTTP.
    pub tls: Option<tls::TlsSource>,
    /// Plain HTTP on a non-loopback address (`--insecure-http`).
    pub insecure_http: bool,
    /// The web portal's session expiry and sign-in rate (`--portal-*`).
    pub portal: portal::PortalOptions,
}

impl ServeOptions {
    /// The production defaults for everything but where to listen and store.
    pub fn new(listen: SocketAddr, data_dir: PathBuf) -> Self {
        Self {
            listen,
            data_dir,
            database: None,
            package_dir: None,
            envelope_ttl: 7 * 24 * 3600,
            connections: Default::default(),
            rates: Default::default(),
            report_history: Default::default(),
            auth_failure_log_interval: Duration::from_secs(60),
            metrics_listen: None,
            tls: None,
            insecure_http: false,
            portal: Default::default(),
        }
    }

    /// Plain HTTP is for loopback only: tokens and device credentials cross the network in it.
    fn check_transport(&self) -> anyhow::Result<()> {
        if self.tls.is_none() && !self.listen.ip().is_loopback() {
            if !self.insecure_http {
                bail!(
                    "--listen {} is not a loopback address and TLS is off: enrollment tokens and device credentials \
                     would cross the network readable. Pass --tls-cert FILE --tls-key FILE (your organisation's \
                     certificate) or --tls-self-signed (a CA of the server's own), or --insecure-http to accept the risk",
                    self.listen
                );
            }
            let warning = format!(
                "serving plain HTTP on {} (--insecure-http): enrollment tokens and device credentials cross the network readable",
                self.listen
            );
            eprintln!("WARNING: {warning}");
            tracing::warn!("{warning}");
        }
        Ok(())
    }
}

/// Returns freed heap pages to the operating system after a large operation (a directory import
/// frees as much as it allocated). The server allocates with mimalloc (`main.rs`), which purges
/// freed pages lazily, on later allocator activity: an idle server after an import kept them.
/// `mi_collect(true)` purges them now; glibc's `malloc_trim` does the same for what SQLite
/// allocated with the system allocator. Runs off the async threads.
pub fn release_free_memory() {
    tokio::task::spawn_blocking(|| {
        // SAFETY: mi_collect only walks mimalloc's own heaps; no memory of ours is touched.
        unsafe { libmimalloc_sys::mi_collect(true) };
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only walks and trims glibc's own arenas; no memory of ours is touched.
        unsafe {
            libc::malloc_trim(0);
        }
    });
}

/// Runs the server until SIGINT/SIGTERM.
pub async fn serve(opts: ServeOptions) -> anyhow::Result<()> {
    opts.check_transport()?;
    // Bind first: a taken port must fail before anything is written (a fresh data dir, keys, the
    // admin token).
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("cannot listen on {}; is another server using it? pass --listen ADDR", opts.listen))?;
    let data_dir = datadir::DataDir::open(&opts.data_dir)?;
    let clock = state::system_clock();
    let tls = match opts.tls.clone() {
        Some(source) => Some(Arc::new(tls::Tls::open(source, &data_dir.path, clock())?)),
        None => None,
    };
    let tls_config = match &tls {
        Some(t) => Some(t.server_config()?),
        None => None,
    };
    // The port answers from here on: 503 "starting" until the fleet is loaded, so a restart never
    // refuses connections (agents retry after the Retry-After second).
    let local = listener.local_addr()?;
    let app = listener::App::starting(api::starting_router());
    let serving =
        tokio::spawn(listener::serve(listener, app.clone(), opts.connections.clone(), tls_config, shutdown_signal()));
    let keys = data_dir.load_or_create_keys(clock())?;
    let location = store::Location::parse(opts.database.as_deref(), data_dir.db_path())?;
    let db = store::open(&location, store::Checkpoints::Background).await?;
    store::identity::check_or_record(&db, &keys).await?;
    tokio::spawn(store::checkpoint_wal(db.clone()));
    let client = client_policy::ClientPolicy::new(&opts.rates, opts.report_history);
    let state = Arc::new(
        state::AppState::load(db, keys, clock.clone(), opts.envelope_ttl)
            .await?
            .with_client_policy(client)
            .with_tls(tls.clone())
            .with_content(packages::content::ContentStore::open(
                &opts.package_dir.clone().unwrap_or_else(|| data_dir.path.join("packages")),
            )?),
    );
    // Loading read every row at once; those buffers are free now.
    release_free_memory();
    tokio::spawn(state.clone().run_resigner());
    tokio::spawn(state.clone().run_writer());
    state.log_undeclared_settings().await;
    if let Some(token) = state.bootstrap_admin_token().await? {
        let path = data_dir.write_admin_token(&token)?;
        println!("bootstrap admin token written to {} (readable by this user only)", path.display());
    }
    match &tls {
        Some(t) => {
            if let (Some(ca), Some(fpr)) = (t.ca_file(), t.ca_fingerprint()) {
                println!(
                    "TLS: the server's own CA is {} (sha256 {fpr}); `tenonctl --ca-file {}` trusts it",
                    ca.display(),
                    ca.display()
                );
            }
            tokio::spawn(t.clone().maintain(clock.clone(), tls::Hangups::new()));
        }
        None => {
            // `systemctl reload` sends SIGHUP; without TLS there is nothing to reload, and it must
            // not end the process.
            // Registered before the task is spawned: a SIGHUP that arrives before the task first
            // runs must not end the process (the default action).
            let mut hangup = tls::Hangups::new();
            tokio::spawn(async move {
                loop {
                    hangup.next().await;
                    tracing::info!("SIGHUP: nothing to reload (no TLS certificate files)");
                }
            });
        }
    }

    let background = tokio::spawn(state.clone().run_jobs(opts.auth_failure_log_interval));
    tokio::spawn(state.clone().probe_database());
    tokio::spawn(state.clone().run_directory_sync());
    if let store::Location::Postgres(url) = &location {
        tokio::spawn(state.clone().run_follower(url.clone()));
    }

    // The portal's pages sit beside the API on the same listener (`/` and `/api/v1`).
    let mut router = api::router(state.clone()).merge(portal::router(state.clone(), opts.portal.clone()));
    if let Some(addr) = opts.metrics_listen {
        let handle = metrics::install()?;
        let metrics_listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} for metrics; pass another --metrics-listen ADDR"))?;
        println!("metrics on http://{}/metrics", metrics_listener.local_addr()?);
        let scrape = axum::Router::new()
            .route("/metrics", axum::routing::get(metrics::render))
            .with_state((state.clone(), handle));
        tokio::spawn(async move {
            if let Err(e) = axum::serve(metrics_listener, scrape).await {
                tracing::error!(error = %e, "the metrics listener stopped");
            }
        });
        // Only with metrics on does every request pass through the timing middleware.
        let http = Arc::new(metrics::HttpMetrics::default());
        router = router.layer(axum::middleware::from_fn_with_state(http, metrics::track));
    }
    app.ready(router);
    // Anything changed since the stored envelopes were signed (or a crash between a write and its
    // re-sign) is re-issued in the background; until then the stored envelopes are served.
    state.converge().await;
    // Printed once requests are served: scripts wait for this line, then use the server.
    let scheme = if tls.is_some() { "https" } else { "http" };
    println!("tenon-server listening on {scheme}://{local} (data dir {})", data_dir.path.display());
    tracing::info!(%local, devices = state.index.len(), "listening");
    serving.await.context("the listener task failed")??;
    background.abort();
    state.client.auth_failures.log(opts.auth_failure_log_interval);
    state.flush_last_seen().await?;
    // Another server takes the jobs over at once instead of after the lease runs out.
    let _ = store::leases::release(&state.db, jobs::LEASE, &state.origin).await;
    tracing::info!("stopped");
    Ok(())
}

/// `tenon-server rotate-escrow-key`: offline; takes the data-dir lock, so a running server must be
/// stopped first. Prints what it did.
pub async fn rotate_escrow_key(data_dir: &std::path::Path, database: Option<&str>) -> anyhow::Result<()> {
    let data_dir = datadir::DataDir::open(data_dir)?;
    let clock = state::system_clock();
    // Creates the keys on a fresh data dir, and checks the key files are readable.
    data_dir.load_or_create_keys(clock())?;
    let location = store::Location::parse(database, data_dir.db_path())?;
    let db = store::open(&location, store::Checkpoints::OnCommit).await?;
    store::identity::check_or_record(&db, &data_dir.load_or_create_keys(clock())?).await?;
    let summary = escrow::rotate_escrow_key(&data_dir, &db, clock()).await?;
    // The database is served with the new key from now on.
    store::identity::check_or_record(&db, &data_dir.load_or_create_keys(clock())?).await?;
    db.close().await;
    println!(
        "escrow key rotated: {} stored recovery keys re-sealed to key {}; the previous key is kept in {}: \
         devices move to the new key at their next escrow (the server signs it for them) and uploads \
         sealed to the old one are re-sealed on receipt, so delete it only once every device has escrowed since",
        summary.resealed,
        summary.new_key_id,
        summary.old_key_file.display()
    );
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

#[cfg(test)]
mod migration_tests {
    use sqlx::Row;

    /// A database written before migration 0007 (envelopes and last-seen times in the devices
    /// row) keeps every device's envelope, version, hash, expiry and last-seen time.
    #[tokio::test]
    async fn migration_0007_moves_envelopes_and_last_seen_without_losing_any() {
        sqlx::any::install_default_drivers();
        let pool = sqlx::any::AnyPoolOptions::new().max_connections(1).connect("sqlite::memory:").await.unwrap();
        let all = sqlx::migrate!("./migrations/sqlite");
        // The migrations before 0007 (the fields are public for the macro; a test may filter them).
        let mut before = sqlx::migrate!("./migrations/sqlite");
        before.migrations = std::borrow::Cow::Owned(all.migrations.iter().filter(|m| m.version < 7).cloned().collect());
        before.run(&pool).await.unwrap();
        for (id, seen) in [("dev-a", Some(1_700_000_000_i64)), ("dev-b", None)] {
            sqlx::query(
                "INSERT INTO devices (id, hostname, credential_sha256, enrolled_at, last_seen, config_version,
                                      config_sha256, envelope, envelope_expires_at)
                 VALUES ($1, 'PC', 'cred', 1, $2, 7, 'sha-' || $3, '{\"envelope\":\"' || $4 || '\"}', 99)",
            )
            .bind(id)
            .bind(seen)
            .bind(id)
            .bind(id)
            .execute(&pool)
            .await
            .unwrap();
        }
        all.run(&pool).await.unwrap();
        let rows = sqlx::query(
            "SELECT d.id, e.config_version, e.config_sha256, e.envelope, e.envelope_expires_at, s.last_seen
             FROM devices d JOIN device_envelopes e ON e.device_id = d.id
             LEFT JOIN device_last_seen s ON s.device_id = d.id ORDER BY d.id",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        let got: Vec<(String, i64, String, String, i64, Option<i64>)> =
            rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5))).collect();
        assert_eq!(
            got,
            vec![
                ("dev-a".into(), 7, "sha-dev-a".into(), "{\"envelope\":\"dev-a\"}".into(), 99, Some(1_700_000_000)),
                ("dev-b".into(), 7, "sha-dev-b".into(), "{\"envelope\":\"dev-b\"}".into(), 99, None),
            ]
        );
        let old_columns: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pragma_table_info('devices') WHERE name IN ('envelope', 'last_seen', 'config_version')",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(old_columns, 0, "the moved columns are gone from devices");
    }
}
