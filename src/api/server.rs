//! HTTP for the submit half: routes `POST /` and `POST /rpc` to the JSON-RPC
//! handler, checks the bearer token and the body's type (`application/json`
//! only: a page on another site can send `text/plain` without asking
//! first) before any JSON is read, limits body size, and answers
//! `GET /healthz`.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

use crate::api::rpc::Rpc;
use crate::events::metrics::Metrics;
use crate::worker::health::SickFlag;

/// What the HTTP handlers share.
#[derive(Debug, Clone)]
struct AppState {
    rpc: Rpc,
    /// When set, every JSON-RPC request must carry `Authorization: Bearer` it.
    token: Option<Arc<str>>,
}

/// The router; tests drive it directly. `/metrics` is open, like
/// `/healthz`.
pub fn app(
    rpc: Rpc,
    metrics: Option<Arc<Metrics>>,
    token: Option<String>,
    max_body_bytes: usize,
) -> Router {
    let state = AppState {
        rpc,
        token: token.map(Arc::from),
    };
    let rpc_routes = Router::new()
        .route("/", post(handle_rpc).get(about))
        .route("/rpc", post(handle_rpc))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .route_layer(middleware::from_fn(require_json))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    let router = Router::new()
        .merge(rpc_routes)
        .route("/healthz", get(health))
        .with_state(state);
    match metrics {
        Some(metrics) => router.merge(metrics_routes(metrics)),
        None => router,
    }
}

/// `/metrics` and `/healthz`, for a worker without an endpoint: 503
/// with the reason once the worker is sick.
pub fn metrics_app(metrics: Arc<Metrics>, sick: SickFlag) -> Router {
    metrics_routes(metrics).route(
        "/healthz",
        get(move || {
            let sick = sick.clone();
            async move {
                match sick.reason() {
                    None => (StatusCode::OK, "ok".to_owned()),
                    Some(reason) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("unhealthy: {reason}"),
                    ),
                }
            }
        }),
    )
}

/// `GET /`: what this endpoint is, for someone who opens it in a browser.
async fn about() -> Response {
    let body = serde_json::json!({
        "service": "renderq",
        "version": crate::VERSION,
        "protocol": "JSON-RPC 2.0: POST / or /rpc with Content-Type: application/json",
        "methods": [
            "queue_manager_submit_job",
            "queue_manager_list_commands",
            "queue_manager_queue_stats",
            "queue_manager_job_status",
            "queue_manager_redrive"
        ],
        "health": "/healthz",
        "metrics": "/metrics"
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn health() -> &'static str {
    "ok"
}

/// `/metrics`, in Prometheus text format.
fn metrics_routes(metrics: Arc<Metrics>) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    metrics.encode(),
                )
            }
        }),
    )
}

/// Serves `app` until `shutdown` is cancelled, then lets open requests
/// finish. Handlers may read the client's address (`ConnectInfo`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown.cancelled_owned())
    .await
}

async fn require_token(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if let Some(expected) = &state.token {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "missing or wrong bearer token\n",
            )
                .into_response();
        }
    }
    next.run(request).await
}

/// Lets a POST through only with a JSON body (`application/json`,
/// parameters such as `charset` allowed); otherwise 415.
async fn require_json(request: Request, next: Next) -> Response {
    if request.method() != Method::POST {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let json = given
        .as_deref()
        .and_then(|v| v.parse::<mime::Mime>().ok())
        .is_some_and(|m| {
            m.type_() == mime::APPLICATION && m.subtype() == mime::JSON && m.suffix().is_none()
        });
    if !json {
        let given = given.as_deref().unwrap_or("none");
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            [(header::ACCEPT, "application/json")],
            format!("JSON-RPC needs Content-Type: application/json (this request's: {given})\n"),
        )
            .into_response();
    }
    next.run(request).await
}

async fn handle_rpc(State(state): State<AppState>, body: Bytes) -> Response {
    match state.rpc.handle(&body).await {
        Some(reply) => ([(header::CONTENT_TYPE, "application/json")], reply).into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use tower::ServiceExt;

    use super::*;

    const LIST: &str = r#"{"jsonrpc":"2.0","method":"queue_manager_queue_stats","id":1}"#;
    const SUBMIT: &str = r#"{"jsonrpc":"2.0","method":"queue_manager_submit_job","params":{"command":"get_version"},"id":1}"#;

    async fn post(router: &Router, content_type: Option<&str>, body: &str) -> StatusCode {
        let mut request = Request::post("/rpc");
        if let Some(content_type) = content_type {
            request = request.header(header::CONTENT_TYPE, content_type);
        }
        let request = request.body(Body::from(body.to_owned())).unwrap();
        router.clone().oneshot(request).await.unwrap().status()
    }

    #[tokio::test]
    async fn only_a_json_body_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let (rpc, queues) = crate::api::rpc::tests::rpc(&dir).await;
        let router = app(rpc, None, None, 4096);
        for content_type in [
            None,
            Some("text/plain"),
            Some("application/x-www-form-urlencoded"),
            Some("multipart/form-data; boundary=x"),
            Some("application/json-patch+json"),
            Some("application/jsonx"),
        ] {
            assert_eq!(
                post(&router, content_type, SUBMIT).await,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "{content_type:?}"
            );
        }
        let queue = queues.get("q").unwrap();
        assert_eq!(queue.stats().await.unwrap().visible, 0, "nothing was sent");
        for content_type in ["application/json", "Application/JSON; charset=utf-8"] {
            assert_eq!(
                post(&router, Some(content_type), LIST).await,
                StatusCode::OK,
                "{content_type}"
            );
        }
        // The token is asked for first, and the type before the size.
        let router = app(
            crate::api::rpc::tests::rpc(&dir).await.0,
            None,
            Some("s3cret".into()),
            16,
        );
        assert_eq!(
            post(&router, Some("text/plain"), SUBMIT).await,
            StatusCode::UNAUTHORIZED
        );
    }
}
