//! Arbitrary bytes as the body of `POST /mutate/live`, through the same Router the server
//! serves (body limit, timeout and panic layers included). The handler must answer every
//! input with 200 (a well-formed AdmissionReview carrying a uid) or 400, and never panic.
#![no_main]

use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;
use velero_jupyterhub::metrics::Metrics;
use velero_jupyterhub::cluster::NamespaceCache;
use velero_jupyterhub::policy::ClaimGlobs;
use velero_jupyterhub::webhook::serve::ServeOptions;
use velero_jupyterhub::webhook::{WebhookState, admission_router};

struct Harness {
    rt: tokio::runtime::Runtime,
    app: axum::Router,
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let metrics = Arc::new(Metrics::new());
        let globs = ClaimGlobs::parse("claim-*").expect("globs");
        let namespaces = Arc::new(NamespaceCache::new(None, globs, metrics.clone()));
        let app = admission_router(Arc::new(WebhookState::new(namespaces, velero_jupyterhub::cluster::RestoreClaims::new(None, "velero"), velero_jupyterhub::policy::helper::HelperOptions::with_image("pause"), metrics, &ServeOptions::default(), Default::default())));
        Harness { rt, app }
    })
}

fuzz_target!(|data: &[u8]| {
    let h = harness();
    let req = Request::post("/mutate/live")
        .header("content-type", "application/json")
        .body(Body::from(data.to_vec()))
        .expect("request");
    let (status, body) = h.rt.block_on(async {
        let resp = h.app.clone().oneshot(req).await.expect("infallible");
        let status = resp.status();
        (status, resp.into_body().collect().await.expect("body").to_bytes())
    });
    match status {
        StatusCode::OK => {
            let v: serde_json_check::Value = serde_json_check::from_slice(&body).expect("200 carries JSON");
            assert_eq!(v["apiVersion"], "admission.k8s.io/v1");
            assert!(v["response"]["uid"].as_str().is_some_and(|u| !u.is_empty()));
            // Allowed, or refused with a reason: only a pod a restore re-creates can be
            // refused here (no cluster: its claims cannot be checked), or one the guard holds.
            match v["response"]["allowed"].as_bool() {
                Some(true) => {}
                Some(false) => {
                    assert_eq!(v["response"]["status"]["code"], 403);
                    assert!(v["response"]["status"]["message"].as_str().is_some_and(|m| !m.is_empty()));
                }
                None => panic!("no allowed in {v}"),
            }
        }
        StatusCode::BAD_REQUEST => assert!(!body.is_empty(), "400 without a reason"),
        other => panic!("unexpected status {other}"),
    }
});
