//! kiln-server: `kiln serve`, an HTTP server on one port that the unmodified e2b SDKs drive
//! (`E2B_API_URL` and `E2B_SANDBOX_URL` pointing at it). It speaks the E2B control plane
//! ([`control`]) and the in-sandbox envd API ([`envd`], Connect-RPC JSON over [`connect`]),
//! routes envd calls by the `E2b-Sandbox-Id` header, and serves every command and file call
//! through the Kiln agent with the `kiln` library ([`backend`]). The guest runs no HTTP
//! server. [`state`] holds the live sandboxes and their processes, [`config`] the settings.
//! docs/SERVER.md describes routes, errors and limits.

pub mod backend;
pub mod config;
pub mod connect;
pub mod control;
pub mod envd;
pub mod kiln_v1;
pub mod metrics;
pub mod state;
pub mod watch;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{delete, get, post, put};
use axum::Router;

pub use backend::{KilnLauncher, Launcher};
pub use config::{ServerConfig, TemplateConfig, DEFAULT_LISTEN};
pub use state::AppState;

/// Errors running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The runtime could not start.
    #[error("starting the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// The listener could not bind.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The server failed.
    #[error("serving: {0}")]
    Serve(#[source] std::io::Error),
}

/// How often the reaper looks for expired or dead sandboxes.
const REAP_INTERVAL: Duration = Duration::from_millis(500);

async fn not_found() -> Response {
    connect::json_response(
        StatusCode::NOT_FOUND,
        &serde_json::json!({"code": 404, "message": "no such route"}),
    )
}

/// The router over `state` (every route of docs/SERVER.md).
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.config.max_upload_bytes;
    Router::new()
        .route("/v2/sandboxes", post(control::create).get(control::list))
        .route("/sandboxes", get(control::list))
        .route(
            "/sandboxes/{id}",
            get(control::get_info).delete(control::kill),
        )
        .route("/sandboxes/{id}/timeout", post(control::set_timeout))
        .route("/v2/sandboxes/{id}/connect", post(control::connect))
        .route("/health", get(envd::health))
        .route("/files", get(envd::files_get).post(envd::files_post))
        .route("/process.Process/{method}", post(envd::process_rpc))
        .route(
            "/filesystem.Filesystem/{method}",
            post(envd::filesystem_rpc),
        )
        // Kiln's own API (kiln_v1) and the metrics.
        .route("/kiln/v1/openapi.json", get(kiln_v1::openapi))
        .route("/kiln/v1/sandboxes/{id}/snapshots", post(kiln_v1::snapshot))
        .route("/kiln/v1/sandboxes/{id}/fork", post(kiln_v1::fork))
        .route("/kiln/v1/sandboxes/{id}/egress", get(kiln_v1::egress))
        .route("/kiln/v1/snapshots", get(kiln_v1::list_snapshots))
        .route("/kiln/v1/snapshots/{id}", delete(kiln_v1::delete_snapshot))
        .route("/kiln/v1/snapshots/{id}/restore", post(kiln_v1::restore))
        .route("/kiln/v1/pools", get(kiln_v1::list_pools))
        .route("/kiln/v1/pools/{template}", put(kiln_v1::set_pool))
        .route("/kiln/v1/images", get(kiln_v1::images))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn(log_request))
        .with_state(state)
}

/// Structured request log: one `tracing` event per request when its response head is ready
/// (method, path, status, sandbox, latency). Streams continue after it.
async fn log_request(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let sandbox = req
        .headers()
        .get("e2b-sandbox-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let t0 = std::time::Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    let ms = t0.elapsed().as_secs_f64() * 1000.0;
    if status >= 500 {
        tracing::warn!(%method, %path, status, sandbox = ?sandbox, ms, "request");
    } else {
        tracing::info!(%method, %path, status, sandbox = ?sandbox, ms, "request");
    }
    resp
}

/// `GET /metrics`: Prometheus text.
async fn metrics_text(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
) -> Response {
    let live = state::lock(&state.sandboxes).len();
    let text = state
        .kiln
        .metrics
        .render(live, state.kiln.pools.ready_total());
    let mut r = Response::new(axum::body::Body::from(text));
    r.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

/// Runs the reaper until the state is dropped elsewhere.
pub fn spawn_reaper(state: &Arc<AppState>) {
    let weak = Arc::downgrade(state);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(REAP_INTERVAL);
        loop {
            tick.tick().await;
            let Some(s) = weak.upgrade() else { break };
            let _ = tokio::task::spawn_blocking(move || {
                s.reap();
                kiln_v1::Pools::refill(&s);
            })
            .await;
        }
    });
}

/// Serves on `listener` until ctrl-c / SIGTERM; kills every sandbox on the way out.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
) -> Result<(), ServeError> {
    spawn_reaper(&state);
    let app = router(Arc::clone(&state));
    let r = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(ServeError::Serve);
    let s = Arc::clone(&state);
    let _ = tokio::task::spawn_blocking(move || s.shutdown()).await;
    r
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// `kiln serve`: binds `config.listen` and serves real Kiln sandboxes (blocks).
pub fn serve(config: ServerConfig) -> Result<(), ServeError> {
    config.validate()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(512)
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)?;
    rt.block_on(async move {
        let addr = config.listen.clone();
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|source| ServeError::Bind {
                addr: addr.clone(),
                source,
            })?;
        let local = listener.local_addr().map_err(ServeError::Serve)?;
        // The tests and scripts wait for this exact line.
        eprintln!("kiln serve: listening on http://{local}");
        let state = AppState::new(config, Arc::new(KilnLauncher));
        serve_on(listener, state).await
    })
}

#[cfg(test)]
mod tests;
