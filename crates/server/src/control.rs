//! The E2B control plane (REST + JSON): create, get, list with paging, kill, set timeout,
//! connect. Errors are always `{"code": <int>, "message": ...}` (the SDK parses every error
//! body) and a gone sandbox is a 404 here, never a 502 (which the SDK retries).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::connect::json_response;
use crate::state::{lock, random_hex, rfc3339, AppState, SandboxEntry};

/// The envd version reported: it opens close_stdin, octet-stream uploads and the default
/// user, without promising xattr metadata (docs/SERVER.md).
pub const ENVD_VERSION: &str = "0.5.8";

/// A control-plane error response.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Message.
    pub message: String,
}

impl ApiError {
    /// A new error.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn not_found(id: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, format!("sandbox \"{id}\" not found"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json_response(
            self.status,
            &json!({"code": self.status.as_u16(), "message": self.message}),
        )
    }
}

/// The request's `X-API-KEY` ("" when none).
pub fn api_key(headers: &HeaderMap) -> &str {
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Checks `X-API-KEY`.
pub fn check_api_key(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let key = api_key(headers);
    if state.config.api_key_ok(key) {
        Ok(())
    } else {
        Err(ApiError::new(StatusCode::UNAUTHORIZED, "invalid API key"))
    }
}

/// Parses a JSON body (empty = `{}`), as a 400 on failure.
fn parse_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    let body: &[u8] = if body.iter().all(|b| b.is_ascii_whitespace()) {
        b"{}"
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid request body: {e}"),
        )
    })
}

/// Body of `POST /v2/sandboxes`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateBody {
    #[serde(rename = "templateID", default)]
    template_id: Option<String>,
    #[serde(default)]
    timeout: Option<u64>,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
    #[serde(default)]
    env_vars: Option<BTreeMap<String, String>>,
}

/// Body of timeout / connect.
#[derive(Debug, Deserialize)]
struct TimeoutBody {
    #[serde(default)]
    timeout: Option<u64>,
}

fn sandbox_json(e: &SandboxEntry) -> Value {
    json!({
        "templateID": e.template_id,
        "sandboxID": e.id,
        "clientID": "kiln",
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": e.access_token,
        "domain": null,
    })
}

fn detail_json(e: &SandboxEntry) -> Value {
    json!({
        "templateID": e.template_id,
        "sandboxID": e.id,
        "clientID": "kiln",
        "startedAt": rfc3339(e.started_at),
        "endAt": rfc3339(e.end_at()),
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": e.access_token,
        "cpuCount": e.template.vcpus,
        "memoryMB": e.template.memory_mib,
        "diskSizeMB": e.template.disk_mb,
        "state": "running",
        "metadata": e.metadata,
        "domain": null,
    })
}

fn clamp_timeout(state: &AppState, t: Option<u64>) -> u64 {
    t.unwrap_or(state.config.default_timeout_secs)
        .min(state.config.max_timeout_secs)
}

/// Frees a create slot on drop.
struct Slot<'a>(&'a Mutex<usize>);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut n = lock(self.0);
        *n = n.saturating_sub(1);
    }
}

/// `POST /v2/sandboxes`.
pub async fn create(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    check_api_key(&state, &headers)?;
    let req: CreateBody = parse_body(&body)?;
    let template_id = req.template_id.unwrap_or_else(|| "base".into());
    let Some(template) = state.config.templates.get(&template_id).cloned() else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("template \"{template_id}\" not found"),
        ));
    };
    let timeout = clamp_timeout(&state, req.timeout);
    {
        let live = lock(&state.sandboxes).len();
        let mut creating = lock(&state.creating);
        if live + *creating >= state.config.max_sandboxes {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "the server runs at most {} sandboxes",
                    state.config.max_sandboxes
                ),
            ));
        }
        *creating += 1;
    }
    let slot = Slot(&state.creating);
    let owner = crate::config::sha256_hex(api_key(&headers).as_bytes());
    let _quota = crate::kiln_v1::reserve_quota(&state, &owner, 1)?;
    let id = format!("kiln{}", random_hex(8));
    let launcher = Arc::clone(&state.launcher);
    let (name, t) = (id.clone(), template.clone());
    let started = std::time::Instant::now();
    let pooled = state.kiln.pools.take(&template_id, &state.kiln.metrics);
    let hit = pooled.is_some();
    let guest = match pooled {
        Some(g) => Ok(g),
        None => tokio::task::spawn_blocking(move || launcher.launch(&name, &t))
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?,
    };
    let metrics = &state.kiln.metrics;
    if !hit && guest.is_ok() {
        metrics.boot.observe(started.elapsed());
    }
    let guest = guest
        .inspect_err(|_| crate::metrics::Metrics::inc(&metrics.create_failures))
        .map_err(|e| {
            tracing::warn!(template = %template_id, error = %e, "create failed");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("creating the sandbox: {e}"),
            )
        })?;
    let entry = Arc::new(SandboxEntry {
        id: id.clone(),
        template_id,
        template,
        metadata: req.metadata.unwrap_or_default(),
        env_vars: req.env_vars.unwrap_or_default(),
        access_token: random_hex(16),
        owner,
        started_at: SystemTime::now(),
        end_at: Mutex::new(SystemTime::now() + Duration::from_secs(timeout)),
        guest,
        procs: Mutex::new(Default::default()),
    });
    lock(&state.sandboxes).insert(id.clone(), Arc::clone(&entry));
    crate::metrics::Metrics::inc(&state.kiln.metrics.creates);
    drop(slot);
    tracing::info!(sandbox = %id, pool_hit = hit, boot_ms = started.elapsed().as_millis() as u64, "sandbox created");
    Ok(json_response(StatusCode::CREATED, &sandbox_json(&entry)))
}

/// `GET /sandboxes/{id}`.
pub async fn get_info(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    check_api_key(&state, &headers)?;
    let e = state.get(&id).ok_or_else(|| ApiError::not_found(&id))?;
    Ok(json_response(StatusCode::OK, &detail_json(&e)))
}

/// `DELETE /sandboxes/{id}`.
pub async fn kill(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    check_api_key(&state, &headers)?;
    if state.remove(&id) {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::not_found(&id))
    }
}

/// `POST /sandboxes/{id}/timeout`.
pub async fn set_timeout(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    check_api_key(&state, &headers)?;
    let req: TimeoutBody = parse_body(&body)?;
    let Some(t) = req.timeout else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "timeout is required",
        ));
    };
    let e = state.get(&id).ok_or_else(|| ApiError::not_found(&id))?;
    e.set_timeout(t.min(state.config.max_timeout_secs));
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /v2/sandboxes/{id}/connect`: a running sandbox's deadline is only ever extended.
pub async fn connect(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    check_api_key(&state, &headers)?;
    let req: TimeoutBody = parse_body(&body)?;
    let e = state.get(&id).ok_or_else(|| ApiError::not_found(&id))?;
    if let Some(t) = req.timeout {
        let want = SystemTime::now() + Duration::from_secs(t.min(state.config.max_timeout_secs));
        let mut end = lock(&e.end_at);
        if want > *end {
            *end = want;
        }
    }
    Ok(json_response(StatusCode::OK, &sandbox_json(&e)))
}

/// Query of `GET /v2/sandboxes`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListQuery {
    metadata: Option<String>,
    state: Option<String>,
    limit: Option<usize>,
    next_token: Option<String>,
    order: Option<String>,
    template: Option<String>,
}

/// Parses `k=v&k2=v2` (each URL-encoded).
fn parse_metadata_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// Minimal `%XX` / `+` decoding.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let h = std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match h {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `GET /v2/sandboxes` (and `GET /sandboxes`): filtered, ordered, paged by `x-next-token`.
pub async fn list(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    check_api_key(&state, &headers)?;
    if let Some(s) = &q.state {
        if !s.split(',').any(|s| s.trim() == "running") {
            return Ok(json_response(StatusCode::OK, &json!([])));
        }
    }
    let want = q
        .metadata
        .as_deref()
        .map(parse_metadata_query)
        .unwrap_or_default();
    let mut all: Vec<_> = state
        .list()
        .into_iter()
        .filter(|e| e.guest.is_running())
        .filter(|e| want.iter().all(|(k, v)| e.metadata.get(k) == Some(v)))
        .filter(|e| q.template.as_ref().is_none_or(|t| &e.template_id == t))
        .collect();
    if q.order.as_deref() == Some("desc") {
        all.reverse();
    }
    let start = match &q.next_token {
        Some(t) if !t.is_empty() => t
            .parse::<usize>()
            .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "invalid nextToken"))?,
        _ => 0,
    };
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let page: Vec<Value> = all
        .iter()
        .skip(start)
        .take(limit)
        .map(|e| {
            let mut v = detail_json(e);
            if let Some(o) = v.as_object_mut() {
                o.remove("envdAccessToken");
                o.remove("domain");
            }
            v
        })
        .collect();
    let mut r = json_response(StatusCode::OK, &page);
    if start + limit < all.len() {
        if let Ok(v) = HeaderValue::from_str(&(start + limit).to_string()) {
            r.headers_mut().insert("x-next-token", v);
        }
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_query_is_decoded() {
        assert_eq!(
            parse_metadata_query("suite%3Da=x%20y&b=2"),
            vec![
                ("suite=a".to_string(), "x y".to_string()),
                ("b".to_string(), "2".to_string())
            ]
        );
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
