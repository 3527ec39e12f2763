//! The HTTP edge: the admission `Router` (served over TLS by [`serve`]) and the plain
//! health/metrics `Router`. Handlers only move bytes between HTTP and [`crate::admission`].

pub mod serve;

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio::sync::Semaphore;
use tower_http::catch_panic::{CatchPanicLayer, ResponseForPanic};
use tracing::{debug, error, info, warn};

use crate::admission::{self, Outcome, Parsed, ReviewError};
use crate::cluster::NamespaceCache;
use crate::metrics::{self, Metrics};
use crate::policy::{NamespaceDirectory, NamespaceScope, StaticNamespaces};
use crate::tls::CertStore;
use serve::ServeOptions;

/// Largest AdmissionReview we read (the API server's own request limit is 3 MiB).
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;

/// Where the admission path gets a namespace's scope.
pub enum Namespaces {
    /// Every namespace opted in with fixed globs (`--no-cluster`).
    Static(StaticNamespaces),
    /// The live namespace cache (fetches a namespace the watch has not delivered yet).
    Cluster(Arc<NamespaceCache>),
}

impl Namespaces {
    async fn scope(&self, namespace: &str) -> NamespaceScope {
        match self {
            Self::Static(s) => s.scope(namespace),
            Self::Cluster(cache) => cache.resolve(namespace).await,
        }
    }
}

/// What the admission handlers need.
pub struct WebhookState {
    pub namespaces: Namespaces,
    pub metrics: Arc<Metrics>,
    /// One request, body included, must arrive within this time (slow clients get 408).
    pub request_timeout: Duration,
    /// Bodies being read or reviewed at once; more wait. Bounds memory: each may be up to
    /// [`MAX_BODY_BYTES`].
    pub in_flight: Semaphore,
    /// Set on shutdown: responses then carry `Connection: close`, so the API server moves
    /// to a replica that stays instead of racing our close of its idle connection.
    pub shutting_down: Arc<AtomicBool>,
}

impl WebhookState {
    /// `shutting_down` is shared with readiness (`Default::default()` when nothing else
    /// needs it).
    pub fn new(
        namespaces: Namespaces,
        metrics: Arc<Metrics>,
        opts: &ServeOptions,
        shutting_down: Arc<AtomicBool>,
    ) -> Self {
        Self {
            namespaces,
            metrics,
            request_timeout: opts.request_timeout,
            in_flight: Semaphore::new(opts.max_concurrent_reviews),
            shutting_down,
        }
    }
}

/// The admission router: `POST /mutate`, with panic catching.
pub fn admission_router(state: Arc<WebhookState>) -> Router {
    let metrics = state.metrics.clone();
    let routes = Router::new()
        .route("/mutate", post(mutate))
        .with_state(state);
    with_admission_layers(routes, metrics)
}

/// The layers every admission route gets. Public so tests can prove the panic handling
/// on a route that panics on purpose.
pub fn with_admission_layers(routes: Router, metrics: Arc<Metrics>) -> Router {
    routes.layer(CatchPanicLayer::custom(PanicResponder { metrics }))
}

#[derive(Clone)]
struct PanicResponder {
    metrics: Arc<Metrics>,
}

impl ResponseForPanic for PanicResponder {
    type ResponseBody = axum::body::Body;

    fn response_for_panic(
        &mut self,
        err: Box<dyn Any + Send + 'static>,
    ) -> axum::http::Response<Self::ResponseBody> {
        let detail = err
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| err.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        error!(panic = %detail, "admission handler panicked; answered 500");
        self.metrics.admission("live", "panic", 0.0);
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error while reviewing the request\n",
        )
            .into_response()
    }
}

async fn mutate(State(state): State<Arc<WebhookState>>, request: Request) -> Response {
    let started = Instant::now();
    let (mut response, outcome) =
        match tokio::time::timeout(state.request_timeout, answer(&state, request)).await {
            Ok(answered) => answered,
            Err(_) => {
                warn!(timeout = ?state.request_timeout, "request not received in time");
                let msg = "the request was not received in time\n";
                (
                    (StatusCode::REQUEST_TIMEOUT, msg).into_response(),
                    "timeout",
                )
            }
        };
    if state.shutting_down.load(Ordering::Acquire) {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    state
        .metrics
        .admission("live", outcome, started.elapsed().as_secs_f64());
    response
}

async fn answer(state: &WebhookState, request: Request) -> (Response, &'static str) {
    let (parts, body) = request.into_parts();
    if !is_json(parts.headers.get(header::CONTENT_TYPE)) {
        let msg = "Content-Type must be application/json\n";
        return (
            (StatusCode::UNSUPPORTED_MEDIA_TYPE, msg).into_response(),
            "unsupported_media_type",
        );
    }
    if content_length(&parts.headers).is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return too_large();
    }
    // The semaphore is never closed; if it were, answering is still better than failing.
    let _permit = state.in_flight.acquire().await.ok();
    let body = match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => return too_large(),
        Err(e) => {
            warn!(error = %e, "could not read the request body");
            let msg = format!("could not read the request body: {e}\n");
            return (
                (StatusCode::BAD_REQUEST, msg).into_response(),
                "bad_request",
            );
        }
    };
    let reviewed = match admission::parse(&body) {
        Ok(Parsed::Answered(reviewed)) => Ok(reviewed),
        Ok(Parsed::PodCreate(create)) => {
            let scope = state.namespaces.scope(create.namespace()).await;
            Ok(create.decide(&scope, false))
        }
        Err(e) => Err(e),
    };
    match reviewed {
        Ok(reviewed) => {
            log_reviewed(&reviewed);
            let mut response = reviewed.body.into_response();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            (response, reviewed.outcome.as_str())
        }
        Err(e) => (bad_request(&e), "bad_request"),
    }
}

fn too_large() -> (Response, &'static str) {
    let msg = format!("the request body is over the limit of {MAX_BODY_BYTES} bytes\n");
    warn!(limit = MAX_BODY_BYTES, "request body too large");
    (
        (StatusCode::PAYLOAD_TOO_LARGE, msg).into_response(),
        "payload_too_large",
    )
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

fn bad_request(e: &ReviewError) -> Response {
    warn!(uid = e.uid().unwrap_or(""), error = %e, "rejected AdmissionReview");
    (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response()
}

fn log_reviewed(r: &admission::Reviewed) {
    let object = r.object.as_deref().unwrap_or("");
    match r.outcome {
        o if o.patched() => {
            info!(uid = %r.uid, pod = object, outcome = o.as_str(), "annotated user pod for Velero")
        }
        Outcome::NotUnderstood => warn!(
            uid = %r.uid,
            detail = r.detail.as_deref().unwrap_or(""),
            "pod not understood; allowed unchanged"
        ),
        o => debug!(uid = %r.uid, pod = object, outcome = o.as_str(), "allowed unchanged"),
    }
}

fn is_json(content_type: Option<&HeaderValue>) -> bool {
    let Some(value) = content_type.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
}

/// What `/readyz` checks.
#[derive(Clone)]
pub struct Readiness {
    pub certs: Arc<CertStore>,
    /// Set once the namespace cache has synced (None: no cluster configured).
    pub namespaces_synced: Option<Arc<AtomicBool>>,
    /// Set on shutdown, so the endpoint is taken out of rotation while draining.
    pub shutting_down: Arc<AtomicBool>,
}

impl Readiness {
    /// Why the server is not ready (empty when it is).
    pub fn problems(&self) -> Vec<&'static str> {
        let mut problems = Vec::new();
        if !self.certs.is_loaded() {
            problems.push("no serving certificate loaded yet");
        }
        if self
            .namespaces_synced
            .as_ref()
            .is_some_and(|s| !s.load(Ordering::Acquire))
        {
            problems.push("namespace cache has not synced yet");
        }
        if self.shutting_down.load(Ordering::Acquire) {
            problems.push("shutting down");
        }
        problems
    }
}

struct OpsState {
    readiness: Readiness,
    metrics: Arc<Metrics>,
}

/// The plain-HTTP operations router: `/healthz`, `/readyz`, `/metrics`.
pub fn ops_router(readiness: Readiness, metrics: Arc<Metrics>) -> Router {
    let state = Arc::new(OpsState { readiness, metrics });
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(state)
}

async fn readyz(State(state): State<Arc<OpsState>>) -> Response {
    let problems = state.readiness.problems();
    if problems.is_empty() {
        "ready\n".into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", problems.join("; ")),
        )
            .into_response()
    }
}

async fn metrics_text(State(state): State<Arc<OpsState>>) -> Response {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        state.metrics.encode(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types() {
        let ok = [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON",
        ];
        for v in ok {
            assert!(is_json(Some(&HeaderValue::from_static(v))), "{v}");
        }
        for v in ["text/plain", "application/jsonx", "application/yaml", ""] {
            assert!(!is_json(Some(&HeaderValue::from_static(v))), "{v}");
        }
        assert!(!is_json(None));
    }
}
