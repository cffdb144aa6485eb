//! fhe-server: the stateless HTTP service that applies frozen linear layers to encrypted
//! blocks. It holds the server part of an artifact and nothing else: no key, no client state.
//! docs/PROTOCOL.md describes the endpoints.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use fhe_backend_rlwe::wire::PROTOCOL_VERSION;
use fhe_backend_rlwe::{LinearServer, RlweError, PARAMETER_SET, PARAMETER_SET_ID};
use fhe_exec::artifact::ServerArtifact;
use fhe_ir::{Direction, LayerId};
use serde::Serialize;
use tokio::sync::Semaphore;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Artifact(#[from] fhe_exec::ExecError),
    #[error("cannot listen on {addr}: {error}")]
    Bind { addr: SocketAddr, error: std::io::Error },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("server stopped: {0}")]
    Io(#[from] std::io::Error),
}

/// How the service runs.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub artifact: PathBuf,
    pub listen: SocketAddr,
    /// Largest accepted request body, in bytes.
    pub max_body: usize,
    /// Requests computed at once; more get 503 with Retry-After.
    pub max_concurrent: usize,
    /// Required bearer token, if any.
    pub token: Option<String>,
    /// PEM certificate chain and private key, for HTTPS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Longest a request may compute before the client gets 504.
    pub request_timeout: Duration,
}

#[derive(Clone, Serialize)]
struct LayerInfo {
    id: u32,
    name: String,
    in_features: usize,
    out_features: usize,
}

/// `GET /v1/info`.
#[derive(Clone, Serialize)]
struct Info {
    protocol_version: u16,
    parameter_set: &'static str,
    parameter_set_id: u16,
    settings: [&'static str; 2],
    model_sha256: String,
    layers: Vec<LayerInfo>,
}

struct AppState {
    server: LinearServer,
    info: Info,
    permits: Arc<Semaphore>,
    max_concurrent: usize,
    max_body: usize,
    token: Option<String>,
    request_timeout: Duration,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

fn authorized(state: &AppState, headers: &HeaderMap) -> Result<(), Response> {
    let Some(token) = &state.token else { return Ok(()) };
    let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if constant_time_eq(g.as_bytes(), token.as_bytes()) => Ok(()),
        Some(_) => Err(unauthorized("the bearer token is wrong")),
        None => Err(unauthorized("this server requires `Authorization: Bearer <token>`")),
    }
}

fn unauthorized(message: &str) -> Response {
    let mut response = error(StatusCode::UNAUTHORIZED, message);
    response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// Compares without an early exit, so timing does not reveal how much of a token matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn healthz() -> &'static str {
    "ok"
}

async fn get_info(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(denied) = authorized(&state, &headers) {
        return denied;
    }
    Json(state.info.clone()).into_response()
}

async fn linear(
    State(state): State<Arc<AppState>>,
    Path((layer, direction)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    if let Err(denied) = authorized(&state, &headers) {
        return denied;
    }
    let direction = match direction.as_str() {
        "forward" => Direction::Forward,
        "backward" => Direction::Backward,
        other => return error(StatusCode::NOT_FOUND, format!("unknown direction `{other}`; use `forward` or `backward`")),
    };
    let Ok(layer) = layer.parse::<u32>().map(LayerId) else {
        return error(StatusCode::NOT_FOUND, format!("layer `{layer}` is not a layer number; GET /v1/info lists the layers"));
    };
    let body = match body {
        Ok(body) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return error(StatusCode::PAYLOAD_TOO_LARGE, format!("the request body is larger than this server accepts ({} bytes, --max-body)", state.max_body));
        }
        Err(rejection) => return error(rejection.status(), rejection.body_text()),
    };
    let Ok(permit) = state.permits.clone().try_acquire_owned() else {
        let mut busy = error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the server is busy ({} requests at once, --max-concurrent); retry shortly", state.max_concurrent),
        );
        busy.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return busy;
    };
    let bytes_in = body.len();
    let work_state = state.clone();
    let work = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let computing = Instant::now();
        work_state.server.handle(layer, direction, &body).map(|out| (out, computing.elapsed()))
    });
    let response = match tokio::time::timeout(state.request_timeout, work).await {
        Err(_) => error(StatusCode::GATEWAY_TIMEOUT, format!("the computation took longer than {:?}", state.request_timeout)),
        Ok(Err(join)) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("the computation failed: {join}")),
        Ok(Ok(Err(e))) => {
            let status = match e {
                RlweError::UnknownLayer(..) => StatusCode::NOT_FOUND,
                RlweError::Shape(_) => StatusCode::UNPROCESSABLE_ENTITY,
                RlweError::Wire(_) => StatusCode::BAD_REQUEST,
                RlweError::Key { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            };
            error(status, e.to_string())
        }
        // Server-Timing lets clients split a call's time into compute and transfer.
        Ok(Ok(Ok((out, compute)))) => (
            [
                (header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream")),
                (HeaderName::from_static("server-timing"), HeaderValue::from_str(&format!("compute;dur={:.3}", compute.as_secs_f64() * 1e3)).expect("ASCII")),
            ],
            out,
        )
            .into_response(),
    };
    // Never the payload: only what a log reader needs.
    tracing::info!(
        layer = layer.0,
        %direction,
        status = response.status().as_u16(),
        bytes_in,
        ms = started.elapsed().as_millis() as u64,
        "linear"
    );
    response
}

/// Loads the server part and builds the router.
pub fn router(config: &ServerConfig) -> Result<Router, ServeError> {
    let artifact = ServerArtifact::load(&config.artifact)?;
    let mut layers: Vec<LayerInfo> = artifact
        .manifest
        .layers
        .iter()
        .map(|l| LayerInfo { id: l.id.0, name: l.name.clone(), in_features: l.in_features, out_features: l.out_features })
        .collect();
    layers.sort_by_key(|l| l.id);
    let info = Info {
        protocol_version: PROTOCOL_VERSION,
        parameter_set: PARAMETER_SET,
        parameter_set_id: PARAMETER_SET_ID,
        settings: ["exact", "compact"],
        model_sha256: artifact.manifest.model_sha256.clone(),
        layers,
    };
    let state = Arc::new(AppState {
        server: LinearServer::new(&artifact),
        info,
        permits: Arc::new(Semaphore::new(config.max_concurrent.max(1))),
        max_concurrent: config.max_concurrent.max(1),
        max_body: config.max_body,
        token: config.token.clone(),
        request_timeout: config.request_timeout,
    });
    Ok(Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/info", get(get_info))
        .route("/v1/linear/{layer}/{direction}", post(linear))
        .layer(DefaultBodyLimit::max(config.max_body))
        .with_state(state))
}

/// Serves until `shutdown` resolves, then finishes the requests in flight. Calls `ready`
/// with the bound address (port 0 picks a free one).
pub async fn serve(config: ServerConfig, ready: impl FnOnce(SocketAddr, bool), shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> Result<(), ServeError> {
    let app = router(&config)?;
    let listener = std::net::TcpListener::bind(config.listen).map_err(|error| ServeError::Bind { addr: config.listen, error })?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    match &config.tls {
        Some((cert, key)) => {
            let tls = axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key)
                .await
                .map_err(|e| ServeError::Tls(format!("cannot use {} / {}: {e}", cert.display(), key.display())))?;
            let handle = axum_server::Handle::new();
            let stopper = handle.clone();
            tokio::spawn(async move {
                shutdown.await;
                stopper.graceful_shutdown(Some(Duration::from_secs(30)));
            });
            ready(addr, true);
            axum_server::from_tcp_rustls(listener, tls)?.handle(handle).serve(app.into_make_service()).await?;
        }
        None => {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            ready(addr, false);
            axum::serve(listener, app).with_graceful_shutdown(shutdown).await?;
        }
    }
    Ok(())
}
