//! Replays fuzz seeds, fuzz findings (fuzz/regressions) and hand-made hostile inputs
//! through the real admission Router: every one must get 200 or a 4xx, never a panic/500.

use std::sync::Arc;

use axum::body::Body;
use http_body_util::BodyExt;
use hyper::StatusCode;
use tower::ServiceExt;
use velero_jupyterhub::cluster::NamespaceCache;
use velero_jupyterhub::metrics::Metrics;
use velero_jupyterhub::policy::ClaimGlobs;
use velero_jupyterhub::webhook::serve::ServeOptions;
use velero_jupyterhub::webhook::{WebhookState, admission_router};

async fn answer(body: Vec<u8>) -> (StatusCode, Vec<u8>) {
    let metrics = Arc::new(Metrics::new());
    let globs = ClaimGlobs::parse("claim-*").unwrap();
    let namespaces = Arc::new(NamespaceCache::new(None, globs, metrics.clone()));
    let app = admission_router(Arc::new(WebhookState::new(
        namespaces,
        velero_jupyterhub::cluster::RestoreClaims::new(None, "velero"),
        velero_jupyterhub::policy::helper::HelperOptions::with_image("pause"),
        metrics,
        &ServeOptions::default(),
        Default::default(),
    )));
    let req = hyper::Request::post("/mutate")
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap();
    let resp = app.oneshot(req).await.unwrap();
    let status = resp.status();
    (
        status,
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
}

fn files(dir: &str) -> Vec<(String, Vec<u8>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            continue;
        }
        out.push((path.display().to_string(), std::fs::read(&path).unwrap()));
    }
    out
}

#[tokio::test]
async fn seeds_regressions_and_hostile_inputs() {
    let seeds = files("fuzz/seeds");
    assert!(!seeds.is_empty(), "fuzz/seeds is empty");
    let mut inputs = seeds;
    inputs.extend(files("fuzz/regressions"));
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let deep_object = format!(
        r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{{"uid":"u","kind":{{"group":"","version":"v1","kind":"Pod"}},"operation":"CREATE","object":{}}}}}"#,
        "{\"a\":".repeat(10_000) + "1" + &"}".repeat(10_000)
    );
    for (name, body) in [
        ("deeply nested arrays", deep.into_bytes()),
        ("deeply nested object", deep_object.into_bytes()),
        ("invalid UTF-8", b"{\"apiVersion\":\"\xff\xfe\"}".to_vec()),
        ("NUL bytes", vec![0u8; 64]),
        ("huge number", format!("{{\"apiVersion\":{}}}", "9".repeat(10_000)).into_bytes()),
        ("lone surrogate", br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"\ud800","kind":{"group":"","version":"v1","kind":"Pod"},"operation":"CREATE","object":{}}}"#.to_vec()),
    ] {
        inputs.push((name.to_owned(), body));
    }
    for (name, body) in inputs {
        let (status, out) = answer(body).await;
        assert!(
            status == StatusCode::OK || status.is_client_error(),
            "{name}: {status} {}",
            String::from_utf8_lossy(&out)
        );
        assert!(!out.is_empty(), "{name}: empty answer");
    }
}
