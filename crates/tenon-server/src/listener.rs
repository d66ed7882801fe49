//! The HTTP accept loop: one function, [`serve`], that owns every connection from `accept` to
//! close, so slow and greedy clients cannot take the server's sockets or memory.
//!
//! What a client may hold, and for how long:
//! - a request head must arrive in full within `header_read_timeout` of the connection opening or
//!   of the last byte of the previous response; this also closes idle keep-alive connections;
//! - a request body must arrive in full within `body_read_timeout` of its head ([`TimedBody`]);
//!   the request then fails with 408 and the connection closes;
//! - a connection on which no byte moves for `idle_timeout` while no request is being handled
//!   (a client that stopped reading its response) is closed;
//!
//!   Both of these are enforced by one sweeper task on a coarse clock (a tenth of the shorter
//!   timeout, at most 1 s), not by a timer per request, so the keep-alive check-in arms and
//!   cancels no timer and reads no clock. A deadline is therefore met up to two sweeper periods
//!   late, never early;
//! - at most `max_connections` are open. At the cap, a new connection closes the *oldest
//!   connection with no request in progress* (a half-sent head, an idle keep-alive) and takes
//!   its place; only when every open connection is inside a request is the new one refused (closed
//!   at once). So a flood of half-sent requests cannot lock out `/healthz` or a check-in: each new
//!   connection evicts the flood's oldest, and the flood itself dies at the header timeout.
//!
//! Graceful shutdown: when `shutdown` resolves the loop stops accepting, asks every connection to
//! finish its current request and close (hyper's graceful shutdown), and waits for them at most
//! [`SHUTDOWN_GRACE`].
//!
//! TLS: with a rustls configuration the handshake runs in the connection's task, under the same
//! header deadline and eviction as a request head (a client that opens a connection and never
//! finishes its handshake is a half-sent head). The byte tracking sits under TLS, on the socket.

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::Request;
use axum::Router;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tower_service::Service;

/// How long open connections may take to finish after the shutdown signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// File descriptors kept free of connections for the database, the data dir and the log.
const RESERVED_FDS: u64 = 256;

/// The bounds on what a client connection may hold. `Default` is the production setting.
#[derive(Clone, Debug)]
pub struct ConnectionLimits {
    /// Open connections at most (further limited by the process's file-descriptor limit).
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub idle_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// The request body did not arrive within the body-read timeout. Extractors find it in the
/// error's source chain and answer 408.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within the body-read timeout")]
pub struct BodyReadTimedOut;

/// What the listener serves: `starting` until [`App::ready`] is given the real router. So the
/// port opens at once at start, and requests get an answer (503, "starting") instead of a refused
/// connection while the fleet loads.
pub struct App {
    ready: std::sync::OnceLock<Router>,
    starting: Router,
}

impl App {
    /// Serves `starting` until [`App::ready`].
    pub fn starting(starting: Router) -> Arc<Self> {
        Arc::new(Self { ready: std::sync::OnceLock::new(), starting })
    }

    /// Serves `app` from now on (a second call is ignored).
    pub fn ready(&self, app: Router) {
        let _ = self.ready.set(app);
    }

    fn current(&self) -> &Router {
        self.ready.get().unwrap_or(&self.starting)
    }
}

/// Serves `app` on `listener` until `shutdown` resolves; see the module doc.
pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    limits: ConnectionLimits,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
    let cap = effective_cap(limits.max_connections);
    tracing::info!(
        max_connections = cap,
        header_read_timeout = ?limits.header_read_timeout,
        body_read_timeout = ?limits.body_read_timeout,
        idle_timeout = ?limits.idle_timeout,
        "connection limits"
    );
    let registry = Arc::new(Registry::new());
    let mut http = hyper::server::conn::http1::Builder::new();
    // No hyper timer: the sweeper enforces the header deadline (see the module doc).
    http.header_read_timeout(None)
        .keep_alive(true)
        // Request heads are small; this bounds what one connection buffers before its head parses.
        .max_buf_size(64 * 1024);
    let http = Arc::new(http);
    let (stop_tx, stop_rx) = watch::channel(false);
    let sweeper = tokio::spawn(sweep(registry.clone(), limits.header_read_timeout, limits.idle_timeout));
    tokio::pin!(shutdown);
    let mut next_id: u64 = 0;
    let mut refused: u64 = 0;
    loop {
        let (stream, remote) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors (EMFILE) or a connection reset before accept: make room
                    // and retry shortly instead of spinning or exiting.
                    tracing::debug!(error = %e, "accept failed");
                    if out_of_descriptors(&e) {
                        registry.evict_oldest_idle();
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    continue;
                }
            },
        };
        if !registry.make_room(cap) {
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!(refused, open = cap, "connection cap reached with every connection busy; refusing");
            }
            drop(stream);
            continue;
        }
        next_id += 1;
        let conn = registry.insert(next_id);
        let _ = stream.set_nodelay(true);
        let slot = ConnectionSlot { id: next_id, conn, registry: registry.clone() };
        let io = TrackedIo { stream, conn: slot.conn.clone(), registry: registry.clone() };
        let (app, http, stop, body_timeout) = (app.clone(), http.clone(), stop_rx.clone(), limits.body_read_timeout);
        match &tls {
            None => {
                tokio::spawn(serve_connection(io, remote, app, http, body_timeout, slot, stop));
            }
            Some(acceptor) => {
                let handshake = acceptor.accept(io);
                tokio::spawn(async move {
                    let io = tokio::select! {
                        done = handshake => match done {
                            Ok(io) => io,
                            Err(e) => {
                                tracing::debug!(error = %e, %remote, "TLS handshake failed");
                                return;
                            }
                        },
                        _ = slot.conn.close.notified() => return,
                    };
                    serve_connection(io, remote, app, http, body_timeout, slot, stop).await
                });
            }
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, registry.wait_empty()).await;
    if drained.is_err() {
        tracing::warn!(open = registry.len(), "connections still open after the shutdown grace period; closing them");
    }
    sweeper.abort();
    Ok(())
}

/// The connection cap the file-descriptor limit allows. On Unix the soft limit is raised to the
/// hard limit first (the default soft limit, often 1024, is what made 1,100 half-sent requests
/// take the server down).
fn effective_cap(max_connections: usize) -> usize {
    #[cfg(unix)]
    {
        use rustix::process::{getrlimit, setrlimit, Resource};
        let mut lim = getrlimit(Resource::Nofile);
        if lim.current != lim.maximum {
            lim.current = lim.maximum;
            if setrlimit(Resource::Nofile, lim).is_err() {
                lim = getrlimit(Resource::Nofile);
            }
        }
        if let Some(fds) = lim.current {
            let room = fds.saturating_sub(RESERVED_FDS).max(16);
            return max_connections.min(usize::try_from(room).unwrap_or(usize::MAX)).max(1);
        }
    }
    max_connections.max(1)
}

/// EMFILE or ENFILE: the process or the system is out of file descriptors.
fn out_of_descriptors(e: &io::Error) -> bool {
    #[cfg(unix)]
    {
        use rustix::io::Errno;
        matches!(Errno::from_io_error(e), Some(Errno::MFILE | Errno::NFILE))
    }
    #[cfg(not(unix))]
    {
        let _ = e;
        false
    }
}

/// One open connection as the accept loop and the sweeper see it.
struct Connection {
    /// Requests whose handler is running (0 or 1 on HTTP/1).
    in_flight: AtomicU32,
    /// Milliseconds since the registry's epoch when a byte last moved.
    last_io_ms: AtomicU64,
    /// Milliseconds since the epoch when the connection opened or last wrote a response byte:
    /// the start of the wait for the next request head.
    head_wait_ms: AtomicU64,
    closing: AtomicBool,
    close: Notify,
}

struct Registry {
    epoch: Instant,
    /// `now_ms` as of the sweeper's last tick: what a read or write stamps, so the hot path reads
    /// no clock.
    coarse_ms: AtomicU64,
    /// By accept order, so the oldest is first.
    open: Mutex<BTreeMap<u64, Arc<Connection>>>,
    closing: AtomicUsize,
    emptied: Notify,
}

impl Registry {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            coarse_ms: AtomicU64::new(0),
            open: Mutex::new(BTreeMap::new()),
            closing: AtomicUsize::new(0),
            emptied: Notify::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Connection>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    fn insert(&self, id: u64) -> Arc<Connection> {
        let now = self.now_ms();
        let conn = Arc::new(Connection {
            in_flight: AtomicU32::new(0),
            last_io_ms: AtomicU64::new(now),
            head_wait_ms: AtomicU64::new(now),
            closing: AtomicBool::new(false),
            close: Notify::new(),
        });
        self.lock().insert(id, conn.clone());
        conn
    }

    fn remove(&self, id: u64) {
        let mut open = self.lock();
        if let Some(c) = open.remove(&id) {
            if c.closing.load(Ordering::Relaxed) {
                self.closing.fetch_sub(1, Ordering::Relaxed);
            }
        }
        if open.is_empty() {
            self.emptied.notify_waiters();
        }
    }

    /// Asks `conn` to close; false when it already was.
    fn close(&self, conn: &Connection) -> bool {
        if conn.closing.swap(true, Ordering::Relaxed) {
            return false;
        }
        self.closing.fetch_add(1, Ordering::Relaxed);
        conn.close.notify_one();
        true
    }

    /// True when a new connection may be served: under the cap, or after closing the oldest
    /// connection with no request in progress.
    fn make_room(&self, cap: usize) -> bool {
        let open = self.lock();
        if open.len().saturating_sub(self.closing.load(Ordering::Relaxed)) < cap {
            return true;
        }
        let victim = open
            .values()
            .find(|c| c.in_flight.load(Ordering::Relaxed) == 0 && !c.closing.load(Ordering::Relaxed))
            .cloned();
        drop(open);
        victim.is_some_and(|v| self.close(&v))
    }

    fn evict_oldest_idle(&self) {
        let victim = self
            .lock()
            .values()
            .find(|c| c.in_flight.load(Ordering::Relaxed) == 0 && !c.closing.load(Ordering::Relaxed))
            .cloned();
        if let Some(v) = victim {
            self.close(&v);
        }
    }

    async fn wait_empty(&self) {
        loop {
            let notified = self.emptied.notified();
            if self.len() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Closes connections with no request in progress whose next request head is later than
/// `header` (counted from the open or the last response byte), or on which nothing moved for
/// `idle`.
async fn sweep(registry: Arc<Registry>, header: Duration, idle: Duration) {
    // A tenth of the shorter timeout, at most a second: a deadline is met at most two periods late.
    let period = (header.min(idle) / 10).clamp(Duration::from_millis(100), Duration::from_secs(1));
    // Stamps are up to one period old (the coarse clock): allow for it, so no connection is
    // closed before its deadline.
    let ms = |d: Duration| u64::try_from((d + period).as_millis()).unwrap_or(u64::MAX);
    let (header_ms, idle_ms) = (ms(header), ms(idle));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = registry.now_ms();
        registry.coarse_ms.store(now, Ordering::Relaxed);
        let stalled: Vec<Arc<Connection>> = registry
            .lock()
            .values()
            .filter(|c| {
                c.in_flight.load(Ordering::Relaxed) == 0
                    && !c.closing.load(Ordering::Relaxed)
                    && (now.saturating_sub(c.head_wait_ms.load(Ordering::Relaxed)) >= header_ms
                        || now.saturating_sub(c.last_io_ms.load(Ordering::Relaxed)) >= idle_ms)
            })
            .cloned()
            .collect();
        for c in &stalled {
            registry.close(c);
        }
        if !stalled.is_empty() {
            tracing::debug!(closed = stalled.len(), "closed connections past the header or idle timeout");
        }
    }
}

/// A connection's place in the registry; removing it on drop keeps the count right whatever way
/// the connection's task ends.
struct ConnectionSlot {
    id: u64,
    conn: Arc<Connection>,
    registry: Arc<Registry>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.registry.remove(self.id);
    }
}

async fn serve_connection<S>(
    io: S,
    remote: SocketAddr,
    app: Arc<App>,
    http: Arc<hyper::server::conn::http1::Builder>,
    body_read_timeout: Duration,
    slot: ConnectionSlot,
    mut stop: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(io);
    let conn = slot.conn.clone();
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let in_flight = InFlight::enter(conn.clone());
        req.extensions_mut().insert(ConnectInfo(remote));
        // A package upload may take many minutes: it must keep arriving (no pause longer than the
        // body timeout) instead of arriving whole within it.
        let rolling =
            (req.method() == hyper::Method::POST && req.uri().path() == UPLOAD_PATH).then_some(body_read_timeout);
        let req = req.map(|body| {
            if hyper::body::Body::is_end_stream(&body) {
                Body::new(body)
            } else {
                Body::new(TimedBody { inner: body, deadline: Instant::now() + body_read_timeout, sleep: None, rolling })
            }
        });
        let response = app.current().clone().call(req);
        async move {
            let response = response.await;
            drop(in_flight);
            response
        }
    });
    let connection = http.serve_connection(io, service);
    tokio::pin!(connection);
    let mut draining = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, %remote, "connection ended with an error");
                }
                break;
            }
            _ = slot.conn.close.notified() => break,
            changed = stop.changed(), if !draining => {
                draining = true;
                // No request in progress (idle, or a head still arriving): close now. Otherwise
                // finish the request and close.
                if slot.conn.in_flight.load(Ordering::Relaxed) == 0 {
                    break;
                }
                if changed.is_ok() {
                    connection.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// Marks a request as in progress for as long as its handler runs.
struct InFlight(Arc<Connection>);

impl InFlight {
    fn enter(conn: Arc<Connection>) -> Self {
        conn.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(conn)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The socket, recording when a byte last moved in either direction (for the idle sweeper).
struct TrackedIo {
    stream: TcpStream,
    conn: Arc<Connection>,
    registry: Arc<Registry>,
}

impl TrackedIo {
    fn read(&self) {
        self.conn.last_io_ms.store(self.registry.coarse_ms.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// A response byte went out: the wait for the next head starts no earlier than now.
    fn wrote(&self) {
        let now = self.registry.coarse_ms.load(Ordering::Relaxed);
        self.conn.last_io_ms.store(now, Ordering::Relaxed);
        self.conn.head_wait_ms.store(now, Ordering::Relaxed);
    }
}

impl AsyncRead for TrackedIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.read();
        }
        r
    }
}

impl AsyncWrite for TrackedIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.stream).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.wrote();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.wrote();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The streamed package upload, whose body deadline rolls with each chunk.
const UPLOAD_PATH: &str = "/api/v1/admin/packages";

/// A request body that fails with [`BodyReadTimedOut`] once its deadline passes. The timer is
/// created only if the body is not already there when first read (most bodies are). With
/// `rolling`, each chunk that arrives moves the deadline that far ahead.
struct TimedBody {
    inner: Incoming,
    deadline: Instant,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    rolling: Option<Duration>,
}

impl hyper::body::Body for TimedBody {
    type Data = hyper::body::Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                if let Some(step) = this.rolling {
                    this.deadline = Instant::now() + step;
                    if let Some(sleep) = this.sleep.as_mut() {
                        sleep.as_mut().reset(this.deadline.into());
                    }
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let deadline = this.deadline;
                let sleep = this.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline.into())));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyReadTimedOut)))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
