//! Kiln's own API under `/kiln/v1` (beside the E2B planes): snapshots of a live sandbox and
//! restores from them, live forks (`kiln::Sandbox::fork_live`), the per-template warm pools
//! (size and stats; [`Pools`] also serves E2B creates), a sandbox's egress policy and
//! connection log, and the image store. The OpenAPI 3.1 document is generated from these
//! handlers and types with `utoipa` and served at `/kiln/v1/openapi.json`. Every route needs
//! `X-API-KEY` like the control plane; errors are `{"code": <int>, "message"}`.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{OpenApi, ToSchema};

use crate::backend::{FailKind, Guest};
use crate::config::TemplateConfig;
use crate::connect::json_response;
use crate::control::{check_api_key, ApiError, ENVD_VERSION};
use crate::metrics::Metrics;
use crate::state::{lock, random_hex, rfc3339, AppState, SandboxEntry};

/// Most children one fork request makes.
pub const MAX_FORK: u32 = 8;
/// Largest pool size `PUT /kiln/v1/pools/{template}` accepts.
pub const MAX_POOL: u32 = 16;

/// An error body.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The HTTP status.
    pub code: u16,
    /// What went wrong.
    pub message: String,
}

/// A sandbox made by restore or fork: what a client needs to reach it (the same fields as
/// the E2B create response).
#[derive(Debug, Serialize, ToSchema)]
pub struct SandboxRef {
    /// Sandbox id (use it as `E2b-Sandbox-Id`, or with `Sandbox.connect`).
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    /// Its template.
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// Token for the envd routes (`X-Access-Token`).
    #[serde(rename = "envdAccessToken")]
    pub envd_access_token: String,
    /// The envd version reported.
    #[serde(rename = "envdVersion")]
    pub envd_version: String,
}

impl SandboxRef {
    fn of(e: &SandboxEntry) -> Self {
        Self {
            sandbox_id: e.id.clone(),
            template_id: e.template_id.clone(),
            envd_access_token: e.access_token.clone(),
            envd_version: ENVD_VERSION.into(),
        }
    }
}

/// A saved snapshot.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SnapshotJson {
    /// Snapshot id.
    #[serde(rename = "snapshotID")]
    pub snapshot_id: String,
    /// The sandbox it was taken of.
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    /// Its template (restores get it too).
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// When it was taken (RFC 3339).
    #[serde(rename = "createdAt")]
    pub created_at: String,
    /// Guest RAM size, bytes.
    #[serde(rename = "guestBytes")]
    pub guest_bytes: u64,
    /// Bytes of RAM actually written to the memory file.
    #[serde(rename = "writtenBytes")]
    pub written_bytes: u64,
    /// How long the sandbox was paused, ms.
    #[serde(rename = "pausedMs")]
    pub paused_ms: u64,
}

/// Body of a restore.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreBody {
    /// Deadline in seconds from now (default: the server's default timeout).
    #[serde(default)]
    pub timeout: Option<u64>,
    /// Metadata of the new sandbox (default: the snapshotted sandbox's).
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
}

/// Body of a fork.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForkBody {
    /// How many children (1..=8).
    #[schema(minimum = 1, maximum = 8)]
    pub count: u32,
    /// Deadline of each child in seconds from now (default: the server's default timeout).
    #[serde(default)]
    pub timeout: Option<u64>,
}

/// The children of a fork.
#[derive(Debug, Serialize, ToSchema)]
pub struct ForkResult {
    /// One per child, each a running sandbox.
    pub sandboxes: Vec<SandboxRef>,
}

/// One template's pool.
#[derive(Debug, Serialize, ToSchema)]
pub struct PoolJson {
    /// Template name.
    pub template: String,
    /// Target number of warm sandboxes.
    pub size: u32,
    /// Warm sandboxes waiting now.
    pub ready: u32,
    /// Boots in flight to refill it.
    pub booting: u32,
    /// Creates served from it.
    pub hits: u64,
    /// Creates that found it empty.
    pub misses: u64,
}

/// Body of a pool resize.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PoolBody {
    /// Target number of warm sandboxes (0..=16; 0 empties it).
    #[schema(minimum = 0, maximum = 16)]
    pub size: u32,
}

/// One connection in a sandbox's egress log.
#[derive(Debug, Serialize, ToSchema)]
pub struct EgressLogJson {
    /// When it started (RFC 3339).
    pub time: String,
    /// How it reached the proxy (`http`, `connect`, `tls`, ...).
    pub kind: String,
    /// The destination name the guest gave.
    pub name: String,
    /// The address connected to, if any.
    pub addr: Option<String>,
    /// Destination port.
    pub port: u16,
    /// Bytes guest to upstream.
    #[serde(rename = "bytesUp")]
    pub bytes_up: u64,
    /// Bytes upstream to guest.
    #[serde(rename = "bytesDown")]
    pub bytes_down: u64,
    /// `allowed` or `denied`.
    pub verdict: String,
    /// The rule that decided.
    pub rule: String,
}

/// A sandbox's egress policy and log.
#[derive(Debug, Serialize, ToSchema)]
pub struct EgressJson {
    /// Whether the sandbox has network at all (through the egress proxy).
    pub enabled: bool,
    /// Allow rules.
    pub allow: Vec<String>,
    /// Deny rules (checked first).
    pub deny: Vec<String>,
    /// Connections so far, oldest first.
    pub log: Vec<EgressLogJson>,
}

/// One image of the store.
#[derive(Debug, Serialize, ToSchema)]
pub struct ImageJson {
    /// Store name (a template's `image`).
    pub name: String,
    /// Content key.
    pub key: String,
    /// Image file size, bytes.
    #[serde(rename = "sizeBytes")]
    pub size_bytes: Option<u64>,
    /// Why it cannot be used, if damaged.
    pub problem: Option<String>,
}

/// The templates' warm pools: ready guests per template, refilled by the reaper's tick.
#[derive(Default)]
pub struct Pools {
    pools: Mutex<HashMap<String, Arc<Pool>>>,
}

/// One template's pool.
#[derive(Default)]
pub struct Pool {
    size: AtomicUsize,
    booting: AtomicUsize,
    ready: Mutex<Vec<Arc<dyn Guest>>>,
    hits: AtomicU64,
    misses: AtomicU64,
    /// After a failed warm boot, no new one before this.
    retry_at: Mutex<Option<Instant>>,
}

/// The pause after a failed warm boot before the pool tries again.
const POOL_RETRY: Duration = Duration::from_secs(10);

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("size", &self.size)
            .field("booting", &self.booting)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Pools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pools").finish_non_exhaustive()
    }
}

impl Pools {
    /// Pools sized from the templates' `pool_size`.
    pub fn from_templates(templates: &BTreeMap<String, TemplateConfig>) -> Self {
        let p = Self::default();
        for (name, t) in templates {
            p.pool(name).size.store(t.pool_size, Ordering::Relaxed);
        }
        p
    }

    fn pool(&self, template: &str) -> Arc<Pool> {
        Arc::clone(lock(&self.pools).entry(template.to_string()).or_default())
    }

    /// A warm guest of `template` (a hit), or `None` (a miss when the pool is sized).
    pub fn take(&self, template: &str, metrics: &Metrics) -> Option<Arc<dyn Guest>> {
        let p = self.pool(template);
        let mut ready = lock(&p.ready);
        while let Some(g) = ready.pop() {
            if g.is_running() {
                p.hits.fetch_add(1, Ordering::Relaxed);
                Metrics::inc(&metrics.pool_hits);
                return Some(g);
            }
            // A pooled VM that died: drop it and look further.
            std::thread::spawn(move || g.kill());
        }
        if p.size.load(Ordering::Relaxed) > 0 {
            p.misses.fetch_add(1, Ordering::Relaxed);
            Metrics::inc(&metrics.pool_misses);
        }
        None
    }

    /// Warm guests waiting in every pool.
    pub fn ready_total(&self) -> usize {
        lock(&self.pools)
            .values()
            .map(|p| lock(&p.ready).len())
            .sum()
    }

    /// Starts the boots that bring every pool up to its size; trims pools over it.
    pub fn refill(state: &Arc<AppState>) {
        let pools: Vec<(String, Arc<Pool>)> = lock(&state.kiln.pools.pools)
            .iter()
            .map(|(k, v)| (k.clone(), Arc::clone(v)))
            .collect();
        for (template_id, p) in pools {
            let Some(template) = state.config.templates.get(&template_id).cloned() else {
                continue;
            };
            let size = p.size.load(Ordering::Relaxed);
            let excess: Vec<_> = {
                let mut ready = lock(&p.ready);
                let keep = size.min(ready.len());
                ready.drain(keep..).collect()
            };
            for g in excess {
                std::thread::spawn(move || g.kill());
            }
            if lock(&p.retry_at).is_some_and(|t| Instant::now() < t) {
                continue;
            }
            let have = lock(&p.ready).len() + p.booting.load(Ordering::Relaxed);
            for _ in have..size {
                p.booting.fetch_add(1, Ordering::Relaxed);
                let (state, p, t) = (Arc::clone(state), Arc::clone(&p), template.clone());
                let undo = Arc::clone(&p);
                let name = format!("pool-{}-{}", template_id, random_hex(4));
                let spawned = std::thread::Builder::new()
                    .name("kiln-serve-pool".into())
                    .spawn(move || {
                        let t0 = Instant::now();
                        let r = state.launcher.launch(&name, &t);
                        p.booting.fetch_sub(1, Ordering::Relaxed);
                        match r {
                            Ok(g) => {
                                state.kiln.metrics.boot.observe(t0.elapsed());
                                lock(&p.ready).push(g);
                            }
                            Err(e) => {
                                *lock(&p.retry_at) = Some(Instant::now() + POOL_RETRY);
                                Metrics::inc(&state.kiln.metrics.create_failures);
                                tracing::warn!(error = %e, "warming a pool sandbox failed");
                            }
                        }
                    });
                if spawned.is_err() {
                    undo.booting.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Stops every pooled guest (server shutdown).
    pub fn shutdown(&self) {
        let all: Vec<Arc<Pool>> = lock(&self.pools).values().cloned().collect();
        for p in all {
            p.size.store(0, Ordering::Relaxed);
            for g in lock(&p.ready).drain(..) {
                g.kill();
            }
        }
    }
}

/// A snapshot kept by the server.
#[derive(Debug, Clone)]
struct SnapshotRecord {
    json: SnapshotJson,
    dir: PathBuf,
    template: TemplateConfig,
    metadata: BTreeMap<String, String>,
    env_vars: BTreeMap<String, String>,
}

/// State of the Kiln API: pools, snapshots, metrics.
#[derive(Debug)]
pub struct KilnState {
    /// Warm pools.
    pub pools: Pools,
    /// The metrics.
    pub metrics: Metrics,
    /// Directory watchers of envd's filesystem service.
    pub watchers: crate::watch::Watchers,
    snapshots: Mutex<HashMap<String, SnapshotRecord>>,
    /// Creates in flight per API-key hash (the per-key quota).
    quota: Mutex<HashMap<String, usize>>,
    snapshot_root: PathBuf,
    /// Whether `snapshot_root` is the server's own temporary directory (removed at exit).
    snapshot_root_owned: bool,
}

impl KilnState {
    /// State for `templates`; snapshots go under `snapshot_dir` (a fresh temporary directory,
    /// removed at shutdown, when `None`).
    pub fn new(
        templates: &BTreeMap<String, TemplateConfig>,
        snapshot_dir: Option<PathBuf>,
    ) -> Self {
        let (snapshot_root, snapshot_root_owned) = match snapshot_dir {
            Some(d) => (d, false),
            None => (
                std::env::temp_dir().join(format!(
                    "kiln-serve-{}-{}",
                    std::process::id(),
                    random_hex(4)
                )),
                true,
            ),
        };
        Self {
            pools: Pools::from_templates(templates),
            metrics: Metrics::default(),
            watchers: crate::watch::Watchers::default(),
            snapshots: Mutex::new(HashMap::new()),
            quota: Mutex::new(HashMap::new()),
            snapshot_root,
            snapshot_root_owned,
        }
    }

    /// Creates in flight per key (tests).
    pub fn quota_in_flight(&self) -> &Mutex<HashMap<String, usize>> {
        &self.quota
    }

    /// Stops pooled guests and removes the server's own snapshot directory.
    pub fn shutdown(&self) {
        self.pools.shutdown();
        if self.snapshot_root_owned {
            let _ = std::fs::remove_dir_all(&self.snapshot_root);
        }
    }
}

fn api_fail(f: &crate::backend::Fail) -> ApiError {
    let status = match f.kind {
        FailKind::NotFound => StatusCode::NOT_FOUND,
        FailKind::InvalidArgument | FailKind::AlreadyExists => StatusCode::BAD_REQUEST,
        FailKind::PermissionDenied => StatusCode::FORBIDDEN,
        FailKind::Dead => StatusCode::CONFLICT,
        FailKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
        FailKind::Unsupported => StatusCode::NOT_IMPLEMENTED,
        FailKind::Other => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError::new(status, f.message.clone())
}

fn parse<T: for<'de> Deserialize<'de> + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    parse_required(body)
}

fn parse_required<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid request body: {e}"),
        )
    })
}

fn ok<T: Serialize>(status: StatusCode, v: &T) -> Response {
    json_response(status, &serde_json::to_value(v).unwrap_or_default())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::backend::Fail> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|f| api_fail(&f))
}

fn live(state: &AppState, id: &str) -> Result<Arc<SandboxEntry>, ApiError> {
    state
        .get(id)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("sandbox \"{id}\" not found")))
}

/// Reserves `n` sandbox slots against `max_sandboxes`.
fn reserve(state: &AppState, n: usize) -> Result<Reserved<'_>, ApiError> {
    let live = lock(&state.sandboxes).len();
    let mut creating = lock(&state.creating);
    if live + *creating + n > state.config.max_sandboxes {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "the server runs at most {} sandboxes",
                state.config.max_sandboxes
            ),
        ));
    }
    *creating += n;
    Ok(Reserved(&state.creating, n))
}

struct Reserved<'a>(&'a Mutex<usize>, usize);

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        let mut c = lock(self.0);
        *c = c.saturating_sub(self.1);
    }
}

/// Reserves `n` sandboxes of the key with hash `owner` against `max_sandboxes_per_key`
/// (its live sandboxes plus its creates in flight); 429 beyond it.
pub fn reserve_quota<'a>(
    state: &'a AppState,
    owner: &str,
    n: usize,
) -> Result<QuotaSlot<'a>, ApiError> {
    let Some(max) = state.config.max_sandboxes_per_key else {
        return Ok(QuotaSlot(&state.kiln.quota, String::new(), 0));
    };
    let live = lock(&state.sandboxes)
        .values()
        .filter(|e| e.owner == owner)
        .count();
    let mut flight = lock(&state.kiln.quota);
    let pending = flight.entry(owner.to_string()).or_default();
    if live + *pending + n > max {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!("this API key may run at most {max} sandboxes"),
        ));
    }
    *pending += n;
    Ok(QuotaSlot(&state.kiln.quota, owner.to_string(), n))
}

/// A key's creates in flight; released on drop.
#[derive(Debug)]
pub struct QuotaSlot<'a>(&'a Mutex<HashMap<String, usize>>, String, usize);

impl Drop for QuotaSlot<'_> {
    fn drop(&mut self) {
        if self.2 == 0 {
            return;
        }
        let mut m = lock(self.0);
        if let Some(v) = m.get_mut(&self.1) {
            *v = v.saturating_sub(self.2);
            if *v == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// Registers a new live sandbox.
#[allow(clippy::too_many_arguments)]
fn register(
    state: &AppState,
    owner: &str,
    template_id: &str,
    template: &TemplateConfig,
    metadata: BTreeMap<String, String>,
    env_vars: BTreeMap<String, String>,
    timeout: Option<u64>,
    guest: Arc<dyn Guest>,
) -> Arc<SandboxEntry> {
    let secs = timeout
        .unwrap_or(state.config.default_timeout_secs)
        .min(state.config.max_timeout_secs);
    let id = format!("kiln{}", random_hex(8));
    let entry = Arc::new(SandboxEntry {
        id: id.clone(),
        template_id: template_id.to_string(),
        template: template.clone(),
        metadata,
        env_vars,
        access_token: random_hex(16),
        owner: owner.to_string(),
        started_at: SystemTime::now(),
        end_at: Mutex::new(SystemTime::now() + Duration::from_secs(secs)),
        guest,
        procs: Mutex::new(Default::default()),
    });
    lock(&state.sandboxes).insert(id, Arc::clone(&entry));
    Metrics::inc(&state.kiln.metrics.creates);
    entry
}

/// `GET /kiln/v1/openapi.json`: this API's OpenAPI document.
pub async fn openapi() -> Response {
    json_response(
        StatusCode::OK,
        &serde_json::to_value(ApiDoc::openapi()).unwrap_or_default(),
    )
}

/// Snapshots a live sandbox (it keeps running).
#[utoipa::path(post, path = "/kiln/v1/sandboxes/{sandboxID}/snapshots",
    params(("sandboxID" = String, Path, description = "Sandbox id")),
    responses(
        (status = 201, description = "Saved", body = SnapshotJson),
        (status = 401, description = "Bad API key", body = ErrorBody),
        (status = 404, description = "No such sandbox", body = ErrorBody),
        (status = 409, description = "The sandbox's VM is gone", body = ErrorBody),
        (status = 501, description = "The backend cannot snapshot", body = ErrorBody),
    ))]
pub async fn snapshot(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    check_api_key(&state, &headers)?;
    let e = live(&state, &id)?;
    let snapshot_id = format!("snap{}", random_hex(8));
    let dir = state.kiln.snapshot_root.join(&snapshot_id);
    let guest = Arc::clone(&e.guest);
    let d = dir.clone();
    let meta = blocking(move || guest.snapshot(&d))
        .await
        .inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&dir);
        })?;
    let json = SnapshotJson {
        snapshot_id: snapshot_id.clone(),
        sandbox_id: e.id.clone(),
        template_id: e.template_id.clone(),
        created_at: rfc3339(SystemTime::now()),
        guest_bytes: meta.guest_bytes,
        written_bytes: meta.written_bytes,
        paused_ms: u64::try_from(meta.paused.as_millis()).unwrap_or(u64::MAX),
    };
    lock(&state.kiln.snapshots).insert(
        snapshot_id,
        SnapshotRecord {
            json: json.clone(),
            dir,
            template: e.template.clone(),
            metadata: e.metadata.clone(),
            env_vars: e.env_vars.clone(),
        },
    );
    Ok(ok(StatusCode::CREATED, &json))
}

/// Lists the snapshots, oldest first.
#[utoipa::path(get, path = "/kiln/v1/snapshots",
    responses(
        (status = 200, description = "The snapshots", body = Vec<SnapshotJson>),
        (status = 401, description = "Bad API key", body = ErrorBody),
    ))]
pub async fn list_snapshots(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_api_key(&state, &headers)?;
    let mut v: Vec<SnapshotJson> = lock(&state.kiln.snapshots)
        .values()
        .map(|r| r.json.clone())
        .collect();
    v.sort_by(|a, b| a.created_at.cmp(&b.created_at));
    Ok(ok(StatusCode::OK, &v))
}

/// Deletes a snapshot (sandboxes restored from it keep running).
#[utoipa::path(delete, path = "/kiln/v1/snapshots/{snapshotID}",
    params(("snapshotID" = String, Path, description = "Snapshot id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "Bad API key", body = ErrorBody),
        (status = 404, description = "No such snapshot", body = ErrorBody),
    ))]
pub async fn delete_snapshot(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    check_api_key(&state, &headers)?;
    let rec = lock(&state.kiln.snapshots).remove(&id).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("snapshot \"{id}\" not found"),
        )
    })?;
    let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(rec.dir)).await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Restores a new sandbox from a snapshot.
#[utoipa::path(post, path = "/kiln/v1/snapshots/{snapshotID}/restore",
    params(("snapshotID" = String, Path, description = "Snapshot id")),
    request_body(content = RestoreBody, description = "Optional", content_type = "application/json"),
    responses(
        (status = 201, description = "A running sandbox", body = SandboxRef),
        (status = 400, description = "Bad body", body = ErrorBody),
        (status = 401, description = "Bad API key", body = ErrorBody),
        (status = 404, description = "No such snapshot", body = ErrorBody),
        (status = 429, description = "Too many sandboxes", body = ErrorBody),
        (status = 500, description = "The restore failed", body = ErrorBody),
        (status = 501, description = "The backend cannot restore", body = ErrorBody),
    ))]
pub async fn restore(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    check_api_key(&state, &headers)?;
    let req: RestoreBody = parse(&body)?;
    let rec = lock(&state.kiln.snapshots)
        .get(&id)
        .cloned()
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("snapshot \"{id}\" not found"),
            )
        })?;
    let slot = reserve(&state, 1)?;
    let owner = crate::config::sha256_hex(crate::control::api_key(&headers).as_bytes());
    let quota = reserve_quota(&state, &owner, 1)?;
    let launcher = Arc::clone(&state.launcher);
    let (dir, t) = (rec.dir.clone(), rec.template.clone());
    let name = format!("restore-{}", random_hex(4));
    let t0 = Instant::now();
    let guest = blocking(move || launcher.restore(&name, &dir, &t))
        .await
        .inspect_err(|_| Metrics::inc(&state.kiln.metrics.create_failures))?;
    state.kiln.metrics.restore.observe(t0.elapsed());
    let entry = register(
        &state,
        &owner,
        &rec.json.template_id,
        &rec.template,
        req.metadata.unwrap_or(rec.metadata),
        rec.env_vars,
        req.timeout,
        guest,
    );
    drop((slot, quota));
    tracing::info!(sandbox = %entry.id, snapshot = %id, ms = t0.elapsed().as_millis() as u64, "sandbox restored");
    Ok(ok(StatusCode::CREATED, &SandboxRef::of(&entry)))
}

/// Forks a live sandbox into `count` children, each running from the parent's state now.
#[utoipa::path(post, path = "/kiln/v1/sandboxes/{sandboxID}/fork",
    params(("sandboxID" = String, Path, description = "Sandbox id")),
    request_body(content = ForkBody, content_type = "application/json"),
    responses(
        (status = 201, description = "The children, all running", body = ForkResult),
        (status = 400, description = "Bad body or count", body = ErrorBody),
        (status = 401, description = "Bad API key", body = ErrorBody),
        (status = 404, description = "No such sandbox", body = ErrorBody),
        (status = 409, description = "The sandbox's VM is gone", body = ErrorBody),
        (status = 429, description = "Too many sandboxes", body = ErrorBody),
        (status = 500, description = "The fork failed", body = ErrorBody),
        (status = 501, description = "The backend cannot fork", body = ErrorBody),
    ))]
pub async fn fork(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    check_api_key(&state, &headers)?;
    let req: ForkBody = parse_required(&body)?;
    if req.count == 0 || req.count > MAX_FORK {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("count must be in 1..={MAX_FORK}"),
        ));
    }
    let parent = live(&state, &id)?;
    let slot = reserve(&state, req.count as usize)?;
    let owner = crate::config::sha256_hex(crate::control::api_key(&headers).as_bytes());
    let quota = reserve_quota(&state, &owner, req.count as usize)?;
    let guest = Arc::clone(&parent.guest);
    let n = req.count as usize;
    let t0 = Instant::now();
    let children = blocking(move || guest.fork(n))
        .await
        .inspect_err(|_| Metrics::inc(&state.kiln.metrics.create_failures))?;
    let per = t0.elapsed() / u32::try_from(children.len().max(1)).unwrap_or(1);
    let mut out = Vec::with_capacity(children.len());
    for g in children {
        state.kiln.metrics.restore.observe(per);
        let e = register(
            &state,
            &owner,
            &parent.template_id,
            &parent.template,
            parent.metadata.clone(),
            parent.env_vars.clone(),
            req.timeout,
            g,
        );
        out.push(SandboxRef::of(&e));
    }
    drop((slot, quota));
    tracing::info!(sandbox = %id, children = out.len(), ms = t0.elapsed().as_millis() as u64, "sandbox forked");
    Ok(ok(StatusCode::CREATED, &ForkResult { sandboxes: out }))
}

fn pool_json(name: &str, p: &Pool) -> PoolJson {
    let c = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
    PoolJson {
        template: name.to_string(),
        size: c(p.size.load(Ordering::Relaxed)),
        ready: c(lock(&p.ready).len()),
        booting: c(p.booting.load(Ordering::Relaxed)),
        hits: p.hits.load(Ordering::Relaxed),
        misses: p.misses.load(Ordering::Relaxed),
    }
}

/// Every template's pool: size and stats.
#[utoipa::path(get, path = "/kiln/v1/pools",
    responses(
        (status = 200, description = "One per template", body = Vec<PoolJson>),
        (status = 401, description = "Bad API key", body = ErrorBody),
    ))]
pub async fn list_pools(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_api_key(&state, &headers)?;
    let v: Vec<PoolJson> = state
        .config
        .templates
        .keys()
        .map(|t| pool_json(t, &state.kiln.pools.pool(t)))
        .collect();
    Ok(ok(StatusCode::OK, &v))
}

/// Sets a template's pool size (warm sandboxes boot in the background).
#[utoipa::path(put, path = "/kiln/v1/pools/{template}",
    params(("template" = String, Path, description = "Template name")),
    request_body(content = PoolBody, content_type = "application/json"),
    responses(
        (status = 200, description = "The pool", body = PoolJson),
        (status = 400, description = "Bad body or size", body = ErrorBody),
        (status = 401, description = "Bad API key", body = ErrorBody),
        (status = 404, description = "No such template", body = ErrorBody),
    ))]
pub async fn set_pool(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(template): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    check_api_key(&state, &headers)?;
    let req: PoolBody = parse_required(&body)?;
    if !state.config.templates.contains_key(&template) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("template \"{template}\" not found"),
        ));
    }
    if req.size > MAX_POOL {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("size must be in 0..={MAX_POOL}"),
        ));
    }
    let p = state.kiln.pools.pool(&template);
    p.size.store(req.size as usize, Ordering::Relaxed);
    let s = Arc::clone(&state);
    let _ = tokio::task::spawn_blocking(move || Pools::refill(&s)).await;
    Ok(ok(StatusCode::OK, &pool_json(&template, &p)))
}

/// A sandbox's egress policy (its template's) and connection log.
#[utoipa::path(get, path = "/kiln/v1/sandboxes/{sandboxID}/egress",
    params(("sandboxID" = String, Path, description = "Sandbox id")),
    responses(
        (status = 200, description = "Policy and log", body = EgressJson),
        (status = 401, description = "Bad API key", body = ErrorBody),
        (status = 404, description = "No such sandbox", body = ErrorBody),
    ))]
pub async fn egress(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    check_api_key(&state, &headers)?;
    let e = live(&state, &id)?;
    let guest = Arc::clone(&e.guest);
    let log = blocking(move || Ok(guest.egress_log())).await?;
    let t = &e.template;
    Ok(ok(
        StatusCode::OK,
        &EgressJson {
            enabled: t.egress_allow.is_some(),
            allow: t.egress_allow.clone().unwrap_or_default(),
            deny: t.egress_deny.clone(),
            log,
        },
    ))
}

/// The images of the Kiln image store (templates name them).
#[utoipa::path(get, path = "/kiln/v1/images",
    responses(
        (status = 200, description = "Sorted by name", body = Vec<ImageJson>),
        (status = 401, description = "Bad API key", body = ErrorBody),
        (status = 500, description = "The store cannot be read", body = ErrorBody),
    ))]
pub async fn images(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_api_key(&state, &headers)?;
    let launcher = Arc::clone(&state.launcher);
    let v = blocking(move || launcher.images()).await?;
    Ok(ok(StatusCode::OK, &v))
}

/// The OpenAPI document of `/kiln/v1`.
#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "Kiln API",
        description = "Kiln's own API of `kiln serve` (docs/SERVER.md). Every route needs the `X-API-KEY` header."
    ),
    paths(
        snapshot,
        list_snapshots,
        delete_snapshot,
        restore,
        fork,
        list_pools,
        set_pool,
        egress,
        images
    ),
    components(schemas(
        ErrorBody,
        SandboxRef,
        SnapshotJson,
        RestoreBody,
        ForkBody,
        ForkResult,
        PoolJson,
        PoolBody,
        EgressJson,
        EgressLogJson,
        ImageJson
    ))
)]
pub struct ApiDoc;
