//! kiln-mcp: `kiln mcp`, a Model Context Protocol server (rmcp) whose tools create Kiln
//! sandboxes, run commands and Python code in them, read, write and list their files and
//! kill them ([`tools`]). The sandboxes are in-process `kiln::Sandbox`es the server owns
//! ([`state`]): bounded in number, killed at their deadline and when the server ends.
//! Transports: stdio ([`serve_stdio`]; stdout carries only the protocol) and streamable HTTP
//! at `/mcp` ([`serve_http`]). Failures are tool errors ([`error`]). docs/MCP.md.

pub mod error;
pub mod state;
pub mod tools;

use std::sync::Arc;
use std::time::Duration;

use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::ServiceExt;

pub use error::ToolError;
pub use state::{McpConfig, Sandboxes};
pub use tools::KilnMcp;

/// The path of the streamable HTTP endpoint.
pub const HTTP_PATH: &str = "/mcp";

/// How often the reaper kills expired sandboxes.
const REAP_INTERVAL: Duration = Duration::from_secs(1);

/// Errors running the server.
#[derive(Debug, thiserror::Error)]
pub enum McpError {
    /// The async runtime could not start.
    #[error("starting the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// The HTTP listener could not bind.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The MCP session over stdio could not start (no `initialize` from the client).
    #[error("starting the MCP session on stdio: {0}")]
    Session(String),
    /// The HTTP server failed.
    #[error("serving HTTP: {0}")]
    Serve(#[source] std::io::Error),
}

fn runtime() -> Result<tokio::runtime::Runtime, McpError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(McpError::Runtime)
}

/// Kills expired sandboxes until the registry is dropped elsewhere.
fn spawn_reaper(sandboxes: &Arc<Sandboxes>) {
    let weak = Arc::downgrade(sandboxes);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(REAP_INTERVAL);
        loop {
            tick.tick().await;
            let Some(s) = weak.upgrade() else { break };
            let _ = tokio::task::spawn_blocking(move || s.reap()).await;
        }
    });
}

/// Resolves on ctrl-c or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
}

async fn kill_all(sandboxes: &Arc<Sandboxes>) {
    let s = Arc::clone(sandboxes);
    let n = s.list().len();
    let _ = tokio::task::spawn_blocking(move || s.kill_all()).await;
    tracing::info!(killed = n, "kiln mcp: stopped; every sandbox killed");
}

/// Serves MCP on stdin/stdout until the client closes stdin or a signal arrives; kills every
/// sandbox on the way out (blocks).
pub fn serve_stdio(config: McpConfig) -> Result<(), McpError> {
    let rt = runtime()?;
    rt.block_on(async move {
        let sandboxes = Arc::new(Sandboxes::new(config));
        spawn_reaper(&sandboxes);
        let handler = KilnMcp::new(Arc::clone(&sandboxes));
        let r = tokio::select! {
            r = handler.serve(rmcp::transport::stdio()) => match r {
                Ok(running) => {
                    tokio::select! {
                        _ = running.waiting() => {}
                        _ = shutdown_signal() => {}
                    }
                    Ok(())
                }
                Err(e) => Err(McpError::Session(e.to_string())),
            },
            _ = shutdown_signal() => Ok(()),
        };
        kill_all(&sandboxes).await;
        r
    })
}

/// The streamable HTTP settings: rmcp's defaults, with `Host` headers of loopback names and
/// of `listen_host` allowed (DNS-rebinding protection).
pub fn http_config(listen_host: &str) -> StreamableHttpServerConfig {
    let mut hosts = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    if !listen_host.is_empty() && !hosts.iter().any(|x| x == listen_host) {
        hosts.push(listen_host.to_string());
    }
    StreamableHttpServerConfig::default().with_allowed_hosts(hosts)
}

/// The streamable HTTP service over `sandboxes` (shared by every session).
pub fn http_service(
    sandboxes: Arc<Sandboxes>,
    config: StreamableHttpServerConfig,
) -> StreamableHttpService<KilnMcp, LocalSessionManager> {
    StreamableHttpService::new(
        move || Ok(KilnMcp::new(Arc::clone(&sandboxes))),
        Arc::new(LocalSessionManager::default()),
        config,
    )
}

/// The host part of `ADDR` (`127.0.0.1:8080` → `127.0.0.1`, `[::1]:80` → `::1`).
pub fn host_of(addr: &str) -> &str {
    match addr.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
        None => addr,
    }
}

/// Serves MCP over streamable HTTP at `http://ADDR/mcp` until a signal arrives; kills every
/// sandbox on the way out (blocks). Prints `kiln mcp: listening on http://ADDR/mcp` on
/// stderr once bound.
pub fn serve_http(config: McpConfig, addr: &str) -> Result<(), McpError> {
    let rt = runtime()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| McpError::Bind {
                addr: addr.to_string(),
                source,
            })?;
        let local = listener.local_addr().map_err(McpError::Serve)?;
        let sandboxes = Arc::new(Sandboxes::new(config));
        spawn_reaper(&sandboxes);
        let config = http_config(host_of(addr));
        // Cancelling it ends the open SSE streams, so the graceful shutdown can finish.
        let sessions = config.cancellation_token.clone();
        let service = http_service(Arc::clone(&sandboxes), config);
        let app = axum::Router::new().nest_service(HTTP_PATH, service);
        eprintln!("kiln mcp: listening on http://{local}{HTTP_PATH}");
        tracing::info!(%local, "kiln mcp: listening");
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                shutdown_signal().await;
                sessions.cancel();
            })
            .await
            .map_err(McpError::Serve);
        kill_all(&sandboxes).await;
        r
    })
}

#[cfg(test)]
mod tests;
