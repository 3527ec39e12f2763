//! The HTTP edge: the admission `Router` (served over TLS by [`serve`]) and the plain
//! operations `Router` (probes, metrics). Handlers only move bytes between HTTP and
//! [`crate::admission`], inside the bounds set here and in [`serve`].

pub mod serve;

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use futures::FutureExt as _;
use http_body_util::{BodyExt, Limited};
use tokio::sync::Semaphore;
use tower_http::catch_panic::{CatchPanicLayer, ResponseForPanic};
use tracing::{debug, error, info, warn};

use crate::admission::{self, Outcome, Parsed, ReviewError, Scope};
use crate::cluster::{NamespaceCache, RestoreClaims};
use crate::metrics::{self, Metrics};
use crate::policy::helper::HelperOptions;
use crate::tls::CertStore;
use serve::ServeOptions;

/// Largest AdmissionReview we read (the API server's own request limit is 3 MiB).
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;
/// Bodies up to this size are read without waiting for the shared budget: one per
/// connection at most, so the connection cap bounds them. Real pod reviews are a few KiB.
pub const SMALL_BODY_BYTES: usize = 64 * 1024;

/// Pods of the restore path read whole at once (see `WebhookState::restore_reads`).
const RESTORE_READS: usize = 1;

/// What the admission handlers need.
pub struct WebhookState {
    /// Namespaces: their claim globs, and the claims being restored there (what the
    /// restore guard checks a user server's claims against).
    pub namespaces: Arc<NamespaceCache>,
    /// The claims pods re-created by a restore write into (looked up as they come).
    pub restore_claims: RestoreClaims,
    /// The restore helpers' image (`--helper-image`).
    pub helper: Arc<HelperOptions>,
    pub metrics: Arc<Metrics>,
    /// One request, body included, must arrive and be answered within this time.
    pub request_timeout: Duration,
    /// Bytes of large bodies (over [`SMALL_BODY_BYTES`]) being read or reviewed at once.
    large_bodies: Semaphore,
    /// Pods a Velero restore re-creates, read whole (up to `PodLimits::RESTORED_POD_VALUES`
    /// values, a few MiB each at most) and held while their claims are looked up: this
    /// many at once (one: Velero re-creates a restore's pods one by one).
    restore_reads: Semaphore,
    /// Set on shutdown: responses then carry `Connection: close`, so the API server moves
    /// to a replica that stays instead of racing our close of its idle connection.
    pub shutting_down: Arc<AtomicBool>,
}

impl WebhookState {
    /// `shutting_down` is shared with readiness (`Default::default()` when nothing else
    /// needs it).
    pub fn new(
        namespaces: Arc<NamespaceCache>,
        restore_claims: RestoreClaims,
        helper: HelperOptions,
        metrics: Arc<Metrics>,
        opts: &ServeOptions,
        shutting_down: Arc<AtomicBool>,
    ) -> Self {
        Self {
            namespaces,
            restore_claims,
            helper: Arc::new(helper),
            metrics,
            request_timeout: opts.request_timeout,
            large_bodies: Semaphore::new(opts.large_body_budget.max(MAX_BODY_BYTES)),
            restore_reads: Semaphore::new(RESTORE_READS),
            shutting_down,
        }
    }
}

/// The admission router: `POST /mutate/live` (the live-session entry), `POST
/// /mutate/restore` (pods re-created by a Velero restore) and `POST /mutate` (for
/// configurations installed before the paths were split). Every entry decides from the
/// pod itself, so a pod that matches two entries gets the same answer from both (and
/// nothing left to change from the second); the path only names the entry in metrics
/// and logs. Each entry catches its panics.
pub fn admission_router(state: Arc<WebhookState>) -> Router {
    let metrics = state.metrics.clone();
    let route = |webhook: &'static str| {
        let handler = move |state: State<Arc<WebhookState>>, request: Request| {
            handle(webhook, state, request)
        };
        entry(webhook, post(handler), &metrics)
    };
    Router::new()
        .route("/mutate/live", route("live"))
        .route("/mutate/restore", route("restore"))
        .route("/mutate", route("mutate"))
        .with_state(state)
}

/// A webhook entry's route with its panic handling. Public so tests can prove the panic
/// handling on a route that panics on purpose.
pub fn entry<S: Clone + Send + Sync + 'static>(
    webhook: &'static str,
    route: MethodRouter<S>,
    metrics: &Arc<Metrics>,
) -> MethodRouter<S> {
    let metrics = metrics.clone();
    route.layer(CatchPanicLayer::custom(PanicResponder { webhook, metrics }))
}

#[derive(Clone)]
struct PanicResponder {
    webhook: &'static str,
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
        error!(webhook = self.webhook, panic = %detail, "admission handler panicked; answered 500");
        self.metrics.admission(self.webhook, "panic", 0.0);
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error while reviewing the request\n",
        )
            .into_response()
    }
}

async fn handle(
    webhook: &'static str,
    State(state): State<Arc<WebhookState>>,
    request: Request,
) -> Response {
    let started = Instant::now();
    // A request whose body has already arrived (the usual case: the API server sends it
    // with the head) is answered without arming a timer at all.
    let mut answer = std::pin::pin!(answer(&state, request));
    let answered = match answer.as_mut().now_or_never() {
        Some(answered) => Ok(answered),
        None => tokio::time::timeout(state.request_timeout, answer).await,
    };
    let (mut response, outcome) = match answered {
        Ok(answered) => answered,
        Err(_) => {
            warn!(timeout = ?state.request_timeout, "request not received and answered in time");
            let msg = "the request was not received in time\n";
            let response = (StatusCode::REQUEST_TIMEOUT, msg).into_response();
            (response, "timeout")
        }
    };
    if state.shutting_down.load(Ordering::Acquire) {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    let seconds = started.elapsed().as_secs_f64();
    state.metrics.admission(webhook, outcome, seconds);
    response
}

async fn answer(state: &WebhookState, request: Request) -> (Response, &'static str) {
    let activity = serve::activity(&request);
    let (parts, body) = request.into_parts();
    if !is_json(parts.headers.get(header::CONTENT_TYPE)) {
        let msg = "Content-Type must be application/json\n";
        let response = (StatusCode::UNSUPPORTED_MEDIA_TYPE, msg).into_response();
        return (response, "unsupported_media_type");
    }
    // The API server always sends Content-Length; requiring it lets every body be
    // accounted for before it is read.
    let Some(length) = axum::body::HttpBody::size_hint(&body).exact() else {
        let msg = "a Content-Length is required\n";
        return (
            (StatusCode::LENGTH_REQUIRED, msg).into_response(),
            "length_required",
        );
    };
    let length = usize::try_from(length).unwrap_or(usize::MAX);
    if length > MAX_BODY_BYTES {
        return too_large();
    }
    // Large bodies wait for room in the shared budget; small ones are bounded by the
    // connection cap. The semaphore is never closed; if it were, answering beats failing.
    let _budget = match length > SMALL_BODY_BYTES {
        true => {
            let bytes = u32::try_from(length).unwrap_or(u32::MAX);
            state.large_bodies.acquire_many(bytes).await.ok()
        }
        false => None,
    };
    // hyper delivers exactly Content-Length bytes (Limited holds any other body to it); a
    // body that arrives in one piece, as the API server's usually does, is not copied.
    let body = match Limited::new(body, length).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            warn!(error = %e, "could not read the request body");
            let msg = format!("could not read the request body: {e}\n");
            return (
                (StatusCode::BAD_REQUEST, msg).into_response(),
                "bad_request",
            );
        }
    };
    // From here on the request is ours to finish: its connection is not evicted.
    let _reviewing = activity.map(|a| a.reviewing());
    let reviewed = match admission::parse(&body) {
        Ok(Parsed::Answered(reviewed)) => reviewed,
        Ok(Parsed::PodCreate(create)) if create.is_restore_candidate() => {
            let namespace = create.namespace().to_owned();
            match restore_path(state, &namespace, body.clone()).await {
                Ok(reviewed) => reviewed,
                Err(failed) => return failed,
            }
        }
        Ok(Parsed::PodCreate(create)) => {
            let namespace = create.namespace();
            let scope = Scope {
                claims: state.namespaces.claims_for(namespace).await,
                helper: state.helper.clone(),
                restoring: state.namespaces.restoring_in(namespace),
                claims_now: Vec::new(),
            };
            create.decide(&scope, false)
        }
        Ok(Parsed::ClaimCreate(claim)) => state.restore_claims.review_claim(&claim).await,
        Err(e) => return (bad_request(&e), e.outcome()),
    };
    log_reviewed(&reviewed);
    let outcome = reviewed.outcome.as_str();
    let json = HeaderValue::from_static("application/json");
    let response = ([(header::CONTENT_TYPE, json)], reviewed.body).into_response();
    (response, outcome)
}

/// A pod a Velero restore re-creates: read whole, its claims looked up, decided. The two
/// CPU-heavy steps (up to tens of milliseconds for a pod at the limits) run on the
/// blocking pool, at most [`RESTORE_READS`] at once, so live reviews never wait behind
/// them on the request threads.
async fn restore_path(
    state: &WebhookState,
    namespace: &str,
    body: axum::body::Bytes,
) -> Result<admission::Reviewed, (Response, &'static str)> {
    // The semaphore is never closed; if it were, answering beats failing.
    let _read = state.restore_reads.acquire().await.ok();
    let read = tokio::task::spawn_blocking(move || admission::read_restore(&body)).await;
    let restore = match read {
        Ok(Some(Ok(restore))) => restore,
        Ok(Some(Err(refused))) => return Ok(*refused),
        Ok(None) | Err(_) => return Err(internal_error("reading a restored pod")),
    };
    let restored = restore.restored_claims();
    let claims_now = match restored.is_empty() {
        true => Vec::new(),
        false => state.restore_claims.look_up(namespace, &restored).await,
    };
    let scope = Scope {
        claims: state.namespaces.claims_for(namespace).await,
        helper: state.helper.clone(),
        restoring: Vec::new(),
        claims_now,
    };
    let decided = tokio::task::spawn_blocking(move || restore.decide(&scope, false)).await;
    let reviewed = decided.map_err(|_| internal_error("converting a restored pod"))?;
    if let Some(message) = reviewed
        .detail
        .as_deref()
        .filter(|_| !reviewed.claims_refused.is_empty())
    {
        state
            .restore_claims
            .refused(namespace, &reviewed.claims_refused, message);
    }
    Ok(reviewed)
}

/// A step that cannot fail did (a bug, or a panic caught on the blocking pool): 500.
fn internal_error(doing: &str) -> (Response, &'static str) {
    error!(
        doing,
        "internal error while reviewing the request; answered 500"
    );
    let msg = "internal error while reviewing the request\n";
    (
        (StatusCode::INTERNAL_SERVER_ERROR, msg).into_response(),
        "panic",
    )
}

fn too_large() -> (Response, &'static str) {
    let msg = format!("the request body is over the limit of {MAX_BODY_BYTES} bytes\n");
    warn!(limit = MAX_BODY_BYTES, "request body too large");
    let response = (StatusCode::PAYLOAD_TOO_LARGE, msg).into_response();
    (response, "payload_too_large")
}

fn bad_request(e: &ReviewError) -> Response {
    warn!(uid = e.uid().unwrap_or(""), error = %e, "rejected AdmissionReview");
    (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response()
}

fn log_reviewed(r: &admission::Reviewed) {
    let object = r.object.as_deref().unwrap_or("");
    match r.outcome {
        Outcome::Restore(admission::RestoreVerdict::Converted) => {
            info!(uid = %r.uid, pod = object, "made a pod re-created by a Velero restore a restore helper")
        }
        o if o.patched() => {
            info!(uid = %r.uid, pod = object, outcome = o.as_str(), "annotated user pod for Velero")
        }
        o if o.denied() => warn!(
            uid = %r.uid,
            pod = object,
            outcome = o.as_str(),
            reason = r.detail.as_deref().unwrap_or(""),
            "refused"
        ),
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

/// What `/readyz` and `/healthz` check.
#[derive(Clone)]
pub struct Health {
    /// The serving certificate (the webhook); `None` for the controller, which serves none.
    pub certs: Option<Arc<CertStore>>,
    /// Caches that must have synced before the server is ready (none without a cluster),
    /// each with what it is, for the not-ready message.
    pub synced: Vec<(&'static str, Arc<AtomicBool>)>,
    /// Set on shutdown, so the endpoint is taken out of rotation while draining.
    pub shutting_down: Arc<AtomicBool>,
    /// Set when a task that must run as long as the server (the namespace watch, the
    /// certificate reloader) has stopped: not ready, and not live (restart me).
    pub failed: Arc<ArcSwapOption<String>>,
    /// The controller's loop and watches (`None` for the webhook).
    pub heartbeat: Option<Arc<crate::controller::heartbeat::Heartbeat>>,
}

impl Health {
    pub fn new(
        certs: Option<Arc<CertStore>>,
        synced: Vec<(&'static str, Arc<AtomicBool>)>,
    ) -> Self {
        Self {
            certs,
            synced,
            shutting_down: Arc::default(),
            failed: Arc::default(),
            heartbeat: None,
        }
    }

    /// Why the server is not ready (empty when it is).
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.certs.as_ref().is_some_and(|c| !c.is_loaded()) {
            problems.push("no serving certificate loaded yet".to_owned());
        }
        for (what, synced) in &self.synced {
            if !synced.load(Ordering::Acquire) {
                problems.push(format!("{what} has not synced yet"));
            }
        }
        if self.shutting_down.load(Ordering::Acquire) {
            problems.push("shutting down".to_owned());
        }
        problems.extend(self.heartbeat.as_ref().and_then(|h| h.not_ready()));
        problems.extend(self.failure());
        problems
    }

    /// Why the process should be restarted, if it should.
    pub fn failure(&self) -> Option<String> {
        let failed = self.failed.load_full().map(|f| f.to_string());
        failed.or_else(|| self.heartbeat.as_ref().and_then(|h| h.not_live()))
    }
}

struct OpsState {
    health: Health,
    metrics: Arc<Metrics>,
}

/// The plain-HTTP operations router: `/healthz`, `/readyz`, `/metrics`.
pub fn ops_router(health: Health, metrics: Arc<Metrics>) -> Router {
    let state = Arc::new(OpsState { health, metrics });
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(state)
}

async fn healthz(State(state): State<Arc<OpsState>>) -> Response {
    match state.health.failure() {
        None => "ok\n".into_response(),
        Some(failure) => {
            // In the log too: the kubelet's Event gives only the status code, and
            // `kubectl logs --previous` then says why it was restarted.
            tracing::warn!(%failure, "/healthz: not live");
            let msg = format!("not live: {failure}\n");
            (StatusCode::SERVICE_UNAVAILABLE, msg).into_response()
        }
    }
}

async fn readyz(State(state): State<Arc<OpsState>>) -> Response {
    let problems = state.health.problems();
    if problems.is_empty() {
        return "ready\n".into_response();
    }
    let msg = format!("not ready: {}\n", problems.join("; "));
    (StatusCode::SERVICE_UNAVAILABLE, msg).into_response()
}

async fn metrics_text(State(state): State<Arc<OpsState>>) -> Response {
    let content_type = [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)];
    (content_type, state.metrics.encode()).into_response()
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
