//! The webhook over real HTTPS on loopback, with a client that verifies the CA: the
//! fixtures, every bad-input case, health/ready/metrics, timeouts, certificate swaps and
//! graceful shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use hyper::StatusCode;
use rustls::pki_types::pem::PemObject;
use serde_json::{Value, json};
use testkit::fixtures;
use testkit::https::{self, HttpsClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use velero_jupyterhub::metrics::sample;
use velero_jupyterhub::server::TlsSource;
use velero_jupyterhub::tls::{Ca, PemFiles};
use velero_jupyterhub::webhook::serve::ServeOptions;

fn body_text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test]
async fn golden_fixture_and_variants_over_one_keep_alive_connection() {
    let (server, client) = https::start_self_signed(ServeOptions::default()).await;
    let mut conn = client.connect().await.unwrap();

    let (request, expected) = fixtures::golden_review();
    let (status, body) = conn
        .post("/mutate", Some("application/json"), request)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap(), expected);

    // Every variant, on both paths: byte for byte what the decision gives in-process
    // (tests/live_decision.rs holds that to the expected annotations).
    for (i, pod) in fixtures::variants().iter().enumerate() {
        let request = fixtures::pod_create_review(pod, &format!("uid-{i}"));
        // A server without a cluster cannot tell whether the claims a restored pod writes
        // into exist: it refuses such a pod, as the decision does with them unknown.
        let restored = match velero_jupyterhub::admission::read_restore(&request) {
            Some(Ok(restore)) => restore.restored_claims(),
            _ => Vec::new(),
        };
        let scope = |_: &str| {
            let mut scope: velero_jupyterhub::admission::Scope = fixtures::globs("claim-*").into();
            scope.claims_now = restored
                .iter()
                .map(|c| {
                    let unknown = "no cluster to look it up in".to_owned();
                    (
                        c.clone(),
                        velero_jupyterhub::policy::restore::ClaimNow::Unknown(unknown),
                    )
                })
                .collect();
            scope
        };
        let want = velero_jupyterhub::admission::review(&request, scope, false)
            .unwrap()
            .body;
        for path in ["/mutate/live", "/mutate"] {
            let (status, body) = conn
                .post(path, Some("application/json"), request.clone())
                .await
                .unwrap();
            assert_eq!(status, StatusCode::OK);
            assert_eq!(body_text(&body), body_text(&want), "{path}, variant {i}");
        }
    }
    server.shutdown();
    server.stopped().await;
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx() {
    let (server, client) = https::start_self_signed(ServeOptions::default()).await;
    let pod = fixtures::z2jh_pod();
    let good: Value = serde_json::from_slice(&fixtures::pod_create_review(&pod, "u1")).unwrap();
    let with = |f: &dyn Fn(&mut Value)| {
        let mut v = good.clone();
        f(&mut v);
        serde_json::to_vec(&v).unwrap()
    };
    let ct = Some("application/json");
    // (name, content type, body, status, reason contains)
    type Case<'a> = (&'a str, Option<&'a str>, Vec<u8>, StatusCode, &'a str);
    let cases: Vec<Case> = vec![
        (
            "not JSON",
            ct,
            b"{not json".to_vec(),
            StatusCode::BAD_REQUEST,
            "malformed AdmissionReview",
        ),
        (
            "empty body",
            ct,
            Vec::new(),
            StatusCode::BAD_REQUEST,
            "malformed AdmissionReview",
        ),
        (
            "JSON array",
            ct,
            b"[]".to_vec(),
            StatusCode::BAD_REQUEST,
            "expected an AdmissionReview object",
        ),
        (
            "no request",
            ct,
            with(&|v| {
                v.as_object_mut().unwrap().remove("request");
            }),
            StatusCode::BAD_REQUEST,
            "has no request",
        ),
        (
            "null request",
            ct,
            with(&|v| v["request"] = Value::Null),
            StatusCode::BAD_REQUEST,
            "has no request",
        ),
        (
            "wrong apiVersion",
            ct,
            with(&|v| v["apiVersion"] = json!("admission.k8s.io/v1beta1")),
            StatusCode::BAD_REQUEST,
            "apiVersion must be",
        ),
        (
            "no apiVersion",
            ct,
            with(&|v| {
                v.as_object_mut().unwrap().remove("apiVersion");
            }),
            StatusCode::BAD_REQUEST,
            "apiVersion must be",
        ),
        (
            "wrong kind",
            ct,
            with(&|v| v["kind"] = json!("ConversionReview")),
            StatusCode::BAD_REQUEST,
            "kind must be",
        ),
        (
            "no uid",
            ct,
            with(&|v| {
                v["request"].as_object_mut().unwrap().remove("uid");
            }),
            StatusCode::BAD_REQUEST,
            "missing field `uid`",
        ),
        (
            "empty uid",
            ct,
            with(&|v| v["request"]["uid"] = json!("")),
            StatusCode::BAD_REQUEST,
            "request.uid is empty",
        ),
        (
            "no object",
            ct,
            with(&|v| {
                v["request"].as_object_mut().unwrap().remove("object");
            }),
            StatusCode::BAD_REQUEST,
            "must carry request.object",
        ),
        (
            "object is a Service",
            ct,
            with(&|v| v["request"]["object"]["kind"] = json!("Service")),
            StatusCode::BAD_REQUEST,
            "not a Pod: kind is \"Service\"",
        ),
        (
            "object is apps/v1",
            ct,
            with(&|v| v["request"]["object"]["apiVersion"] = json!("apps/v1")),
            StatusCode::BAD_REQUEST,
            "not a Pod: apiVersion",
        ),
        (
            "object is a string",
            ct,
            with(&|v| v["request"]["object"] = json!("pod")),
            StatusCode::BAD_REQUEST,
            "not a Pod: not a JSON object",
        ),
        (
            "namespace is a path, not a name",
            ct,
            with(&|v| v["request"]["namespace"] = json!("?watch=true")),
            StatusCode::BAD_REQUEST,
            "is not a valid namespace name",
        ),
        (
            "text/plain",
            Some("text/plain"),
            fixtures::pod_create_review(&pod, "u"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "application/json",
        ),
        (
            "no content type",
            None,
            fixtures::pod_create_review(&pod, "u"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "application/json",
        ),
        (
            "over 3 MiB",
            ct,
            vec![b' '; 3 * 1024 * 1024 + 1],
            StatusCode::PAYLOAD_TOO_LARGE,
            "over the limit of 3145728 bytes",
        ),
    ];
    for (name, content_type, body, want_status, want_reason) in cases {
        let (status, body) = client
            .post("/mutate", content_type, body)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(status, want_status, "{name}: {}", body_text(&body));
        assert!(
            body_text(&body).contains(want_reason),
            "{name}: {:?} lacks {want_reason:?}",
            body_text(&body)
        );
    }

    // A pod whose fields have shapes we do not know is allowed unchanged, not refused.
    let odd = with(&|v| v["request"]["object"]["spec"]["volumes"] = json!("not-a-list"));
    let (status, body) = client.post("/mutate", ct, odd).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["response"]["allowed"], true);
    assert!(v["response"].get("patch").is_none());

    // Wrong method and path.
    let (status, _) = client
        .connect()
        .await
        .unwrap()
        .send(
            hyper::Request::get("/mutate")
                .header("host", "x")
                .body(Default::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let (status, _) = client.post("/validate", ct, b"{}".to_vec()).await.unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (_, metrics) = https::http_get(server.ops_addr, "/metrics").await;
    let metrics = body_text(&metrics);
    for (outcome, n) in [
        ("bad_request", 15.0),
        ("unsupported_media_type", 2.0),
        ("payload_too_large", 1.0),
        ("not_understood", 1.0),
    ] {
        let series = format!(
            "velero_jupyterhub_admission_requests_total{{webhook=\"mutate\",outcome=\"{outcome}\"}}"
        );
        assert_eq!(sample(&metrics, &series), Some(n), "{series} in\n{metrics}");
    }
    server.shutdown();
    server.stopped().await;
}

#[tokio::test]
async fn operations_endpoints() {
    let (server, client) = https::start_self_signed(ServeOptions::default()).await;
    let (status, body) = https::http_get(server.ops_addr, "/healthz").await;
    assert_eq!(
        (status, body_text(&body).as_str()),
        (StatusCode::OK, "ok\n")
    );
    let (status, body) = https::http_get(server.ops_addr, "/readyz").await;
    assert_eq!(
        (status, body_text(&body).as_str()),
        (StatusCode::OK, "ready\n")
    );

    let (request, _) = fixtures::golden_review();
    client.mutate(request).await.unwrap();
    let (status, body) = https::http_get(server.ops_addr, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    let text = body_text(&body);
    let annotated =
        r#"velero_jupyterhub_admission_requests_total{webhook="live",outcome="annotated"}"#;
    assert_eq!(sample(&text, annotated), Some(1.0), "{text}");
    let count = "velero_jupyterhub_admission_duration_seconds_count";
    assert_eq!(sample(&text, count), Some(1.0), "{text}");
    // The self-signed certificate's expiry is published.
    let expiry = "velero_jupyterhub_tls_certificate_expiry_timestamp_seconds";
    assert!(sample(&text, expiry).is_some_and(|t| t > 1.7e9), "{text}");
    assert!(
        text.contains(&format!(
            "velero_jupyterhub_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "{text}"
    );
    assert!(text.ends_with("# EOF\n"));

    // A background task that died: neither live nor ready, and both say why.
    let why = Arc::new("the namespace watch stopped".to_owned());
    server.health.failed.store(Some(why));
    for path in ["/healthz", "/readyz"] {
        let (status, body) = https::http_get(server.ops_addr, path).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{path}");
        assert!(
            body_text(&body).contains("the namespace watch stopped"),
            "{path}"
        );
    }
    server.health.failed.store(None);

    // Not ready while shutting down.
    server.health.shutting_down.store(true, Ordering::Release);
    let (status, body) = https::http_get(server.ops_addr, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body_text(&body).contains("shutting down"));
    server.shutdown();
    server.stopped().await;
}

#[tokio::test]
async fn plaintext_http_is_not_served_on_the_tls_port_and_tls12_and_13_work() {
    let (server, client) = https::start_self_signed(ServeOptions::default()).await;
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(b"POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        .await
        .unwrap();
    let mut buf = Vec::new();
    // The server closes the connection (a failed handshake), it does not hang.
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the connection was not closed");
    assert!(
        !body_text(&buf).contains("HTTP/1.1"),
        "answered plaintext: {:?}",
        body_text(&buf)
    );
    let (_, metrics) = https::http_get(server.ops_addr, "/metrics").await;
    let failed =
        r#"velero_jupyterhub_connections_total{listener="webhook",result="handshake_failed"}"#;
    assert_eq!(sample(&body_text(&metrics), failed), Some(1.0));

    let ca = server.ca_pem.clone().unwrap();
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let c = HttpsClient::with_versions(server.addr, &ca, &[version]);
        let (status, _) = c.mutate(fixtures::golden_review().0).await.unwrap();
        assert_eq!(status, StatusCode::OK, "{version:?}");
    }
    // A client that does not trust our CA fails the handshake.
    let other = Ca::generate("someone else").unwrap();
    let stranger = HttpsClient::new(server.addr, &other.cert_pem());
    assert!(stranger.mutate(fixtures::golden_review().0).await.is_err());
    drop(client);
    server.shutdown();
    server.stopped().await;
}

#[tokio::test]
async fn idle_and_slow_clients_are_timed_out() {
    // Distinct timeouts, so each close below has exactly one cause.
    let opts = ServeOptions {
        handshake_timeout: Duration::from_millis(200),
        request_timeout: Duration::from_millis(400),
        idle_timeout: Duration::from_millis(600),
        ..Default::default()
    };
    let (server, client) = https::start_self_signed(opts).await;

    // Connects (TLS) and never sends a request: closed.
    let mut tls = client.tls_stream().await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf))
        .await
        .expect("closed within the timeout");
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "idle connection was not closed"
    );

    // Connects (TCP) and never starts the handshake: closed.
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
        .await
        .expect("closed within the timeout");
    assert!(matches!(n, Ok(0) | Err(_)));

    // Sends the head and part of the body, then stalls: 408.
    let mut tls = client.tls_stream().await.unwrap();
    tls.write_all(b"POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"api").await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
    assert!(
        body_text(&out).starts_with("HTTP/1.1 408"),
        "{:?}",
        body_text(&out)
    );

    let (_, metrics) = https::http_get(server.ops_addr, "/metrics").await;
    let metrics = body_text(&metrics);
    let timeouts =
        r#"velero_jupyterhub_admission_requests_total{webhook="mutate",outcome="timeout"}"#;
    assert_eq!(sample(&metrics, timeouts), Some(1.0), "{metrics}");
    let handshakes =
        r#"velero_jupyterhub_connections_total{listener="webhook",result="handshake_timeout"}"#;
    assert_eq!(sample(&metrics, handshakes), Some(1.0), "{metrics}");
    // The idle connection was closed by the idle timeout (the sweeper), counted as such.
    let idle = r#"velero_jupyterhub_connections_total{listener="webhook",result="idle_timeout"}"#;
    assert_eq!(sample(&metrics, idle), Some(1.0), "{metrics}");

    // A normal request still works.
    assert_eq!(
        client.mutate(fixtures::golden_review().0).await.unwrap().0,
        StatusCode::OK
    );
    server.shutdown();
    server.stopped().await;
}

#[tokio::test]
async fn a_panic_in_a_handler_is_a_counted_500() {
    use tower::ServiceExt;
    let metrics = Arc::new(velero_jupyterhub::metrics::Metrics::new());
    let panics = axum::routing::post(|| async {
        if true {
            panic!("boom");
        }
        ""
    });
    let route = velero_jupyterhub::webhook::entry("live", panics, &metrics);
    let app = axum::Router::new().route("/mutate/live", route);
    let req = hyper::Request::post("/mutate/live")
        .header("content-type", "application/json")
        .body(axum::body::Body::from("{}"))
        .unwrap();
    let resp = app.oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let panics = r#"velero_jupyterhub_admission_requests_total{webhook="live",outcome="panic"}"#;
    assert_eq!(sample(&metrics.encode(), panics), Some(1.0));
}

/// Writes a Kubernetes-Secret-volume-shaped directory: `tls.crt -> ..data/tls.crt`,
/// `..data -> ..<version>/`, and swaps `..data` atomically like the kubelet does.
struct SecretVolume {
    dir: tempfile::TempDir,
    version: usize,
}

impl SecretVolume {
    fn new(pair: &velero_jupyterhub::tls::PemPair) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut me = Self { dir, version: 0 };
        me.swap(pair);
        for f in ["tls.crt", "tls.key"] {
            std::os::unix::fs::symlink(format!("..data/{f}"), me.dir.path().join(f)).unwrap();
        }
        me
    }

    fn swap(&mut self, pair: &velero_jupyterhub::tls::PemPair) {
        self.version += 1;
        let name = format!("..2026_11_24_00_00_{:02}.{}", self.version, self.version);
        let d = self.dir.path().join(&name);
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("tls.crt"), &pair.cert_pem).unwrap();
        std::fs::write(d.join("tls.key"), &pair.key_pem).unwrap();
        let tmp = self.dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(&name, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.path().join("..data")).unwrap();
    }

    fn files(&self) -> PemFiles {
        PemFiles {
            cert: self.dir.path().join("tls.crt"),
            key: self.dir.path().join("tls.key"),
        }
    }
}

#[tokio::test]
async fn certificate_swap_during_a_stream_of_requests_drops_nothing() {
    let ca = Ca::generate("swap test").unwrap();
    let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    let first = ca.issue_serving(&names).unwrap();
    let mut volume = SecretVolume::new(&first);
    let server = https::start(
        TlsSource::Files {
            files: volume.files(),
            reload_interval: Duration::from_millis(50),
        },
        ServeOptions::default(),
    )
    .await;
    let client = HttpsClient::new(server.addr, &ca.cert_pem());
    let before = client.served_certificate().await;

    // Four workers: two on fresh connections (new handshakes), two on keep-alive ones.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let request = fixtures::golden_review().0;
    let mut workers = Vec::new();
    for w in 0..4 {
        let (client, stop, ok, failed, request) = (
            client.clone(),
            stop.clone(),
            ok.clone(),
            failed.clone(),
            request.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut conn = client.connect().await.unwrap();
            while !stop.load(Ordering::Relaxed) {
                let result = if w % 2 == 0 {
                    client.mutate(request.clone()).await
                } else {
                    conn.post("/mutate", Some("application/json"), request.clone())
                        .await
                };
                match result {
                    Ok((StatusCode::OK, _)) => ok.fetch_add(1, Ordering::Relaxed),
                    other => {
                        eprintln!("request failed: {other:?}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }

    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = ca.issue_serving(&names).unwrap();
    volume.swap(&second);
    let mut swapped = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if client.served_certificate().await != before {
            swapped = true;
            break;
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let (_, m) = https::http_get(server.ops_addr, "/metrics").await;
    assert!(
        swapped,
        "the new certificate was never served; {}",
        body_text(&m)
    );
    let expected_new =
        rustls::pki_types::CertificateDer::from_pem_slice(second.cert_pem.as_bytes()).unwrap();
    assert_eq!(client.served_certificate().await, expected_new.as_ref());
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during the swap"
    );
    assert!(
        ok.load(Ordering::Relaxed) > 20,
        "too few requests to mean anything: {}",
        ok.load(Ordering::Relaxed)
    );
    let (_, metrics) = https::http_get(server.ops_addr, "/metrics").await;
    let reloads = r#"velero_jupyterhub_tls_reloads_total{result="success"}"#;
    assert_eq!(sample(&body_text(&metrics), reloads), Some(2.0));
    server.shutdown();
    server.stopped().await;
}

#[tokio::test]
async fn not_ready_until_a_certificate_appears() {
    let dir = tempfile::tempdir().unwrap();
    let files = PemFiles {
        cert: dir.path().join("tls.crt"),
        key: dir.path().join("tls.key"),
    };
    let server = https::start(
        TlsSource::Files {
            files: files.clone(),
            reload_interval: Duration::from_millis(50),
        },
        ServeOptions::default(),
    )
    .await;
    let (status, body) = https::http_get(server.ops_addr, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        body_text(&body).contains("no serving certificate"),
        "{}",
        body_text(&body)
    );

    let ca = Ca::generate("late").unwrap();
    let pair = ca.issue_serving(&["localhost".to_owned()]).unwrap();
    std::fs::write(&files.key, &pair.key_pem).unwrap();
    std::fs::write(&files.cert, &pair.cert_pem).unwrap();
    let mut ready = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if https::http_get(server.ops_addr, "/readyz").await.0 == StatusCode::OK {
            ready = true;
            break;
        }
    }
    assert!(ready);
    let client = HttpsClient::new(server.addr, &ca.cert_pem());
    assert_eq!(
        client.mutate(fixtures::golden_review().0).await.unwrap().0,
        StatusCode::OK
    );
    server.shutdown();
    server.stopped().await;
}

#[tokio::test]
async fn shutdown_finishes_in_flight_requests() {
    let (server, client) = https::start_self_signed(ServeOptions::default()).await;
    let request = fixtures::golden_review().0;
    let (head, tail) = request.split_at(request.len() / 2);

    // A request whose body is half sent when the shutdown starts.
    let mut tls = client.tls_stream().await.unwrap();
    let header = format!(
        "POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        request.len()
    );
    tls.write_all(header.as_bytes()).await.unwrap();
    tls.write_all(head).await.unwrap();
    tls.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let addr = server.addr;
    let ops_addr = server.ops_addr;
    server.shutdown();
    let stopped = tokio::spawn(server.stopped());
    tokio::time::sleep(Duration::from_millis(200)).await;
    // No new connections once draining has begun.
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still accepting after shutdown"
    );
    // The operations port stays up until the admission server has drained.
    assert_eq!(
        https::http_get(ops_addr, "/readyz").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );

    tls.write_all(tail).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out))
        .await
        .expect("answered")
        .unwrap();
    let text = body_text(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("705ab4f5-6393-11e8-b7cc-42010a800002"));
    tokio::time::timeout(Duration::from_secs(5), stopped)
        .await
        .expect("stops after draining")
        .unwrap();
}

/// Sends a raw HTTP/1.1 request over TLS and returns everything the server sent back
/// until it closed the connection (or 5 s passed).
async fn raw_exchange(client: &HttpsClient, request: &[u8]) -> String {
    let mut tls = client.tls_stream().await.unwrap();
    tls.write_all(request).await.unwrap();
    tls.flush().await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
    body_text(&out)
}

#[tokio::test]
async fn a_body_without_content_length_gets_411_and_is_not_read() {
    let (server, client) = https::start_self_signed(ServeOptions::default()).await;
    // Chunked, no Content-Length: the API server never sends that; we cannot budget it.
    let body = fixtures::golden_review().0;
    let mut request = b"POST /mutate/live HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    request.extend_from_slice(format!("{:x}\r\n", body.len()).as_bytes());
    request.extend_from_slice(&body);
    request.extend_from_slice(b"\r\n0\r\n\r\n");
    let answer = raw_exchange(&client, &request).await;
    assert!(answer.starts_with("HTTP/1.1 411"), "{answer:?}");
    assert!(answer.contains("Content-Length is required"), "{answer:?}");
    server.shutdown();
    server.stopped().await;
}

#[tokio::test]
async fn while_shutting_down_responses_ask_the_client_to_reconnect_elsewhere() {
    let (server, client) = https::start_self_signed(ServeOptions::default()).await;
    let body = fixtures::golden_review().0;
    let head = format!(
        "POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let request = [head.as_bytes(), &body].concat();
    // Normally the connection stays open (keep-alive): the read times out with no close.
    let answer = raw_exchange(&client, &request).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        !answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    server.health.shutting_down.store(true, Ordering::Release);
    let answer = raw_exchange(&client, &request).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    server.shutdown();
    server.stopped().await;
}

/// A real review padded with an annotation to about `bytes`.
fn review_of_size(bytes: usize) -> Vec<u8> {
    let mut pod = fixtures::z2jh_pod();
    pod["metadata"]["annotations"]["example.com/padding"] = "x".repeat(bytes).into();
    fixtures::pod_create_review(&pod, "padded")
}

#[tokio::test]
async fn large_bodies_wait_for_the_budget_and_small_ones_do_not() {
    // The smallest budget: one maximal body. A 2 MiB body that trickles holds 2 MiB of it.
    let opts = ServeOptions {
        large_body_budget: 3 * 1024 * 1024,
        ..Default::default()
    };
    let (server, client) = https::start_self_signed(opts).await;
    let large = review_of_size(2 * 1024 * 1024);
    let (first_half, second_half) = large.split_at(large.len() / 2);
    let mut slow = client.tls_stream().await.unwrap();
    let head = format!(
        "POST /mutate/live HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        large.len()
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    slow.write_all(first_half).await.unwrap();
    slow.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Another large body waits for room; a small one is answered at once.
    let waiting = tokio::spawn({
        let client = client.clone();
        let large = large.clone();
        async move { client.mutate(large).await }
    });
    let started = std::time::Instant::now();
    let (status, _) = client.mutate(fixtures::golden_review().0).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "the second large body did not wait for the budget"
    );

    slow.write_all(second_half).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(
        body_text(&buf[..n]).starts_with("HTTP/1.1 200"),
        "{}",
        body_text(&buf[..n])
    );
    let (status, _) = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    server.shutdown();
    server.stopped().await;
}

#[tokio::test]
async fn a_request_head_over_64_kib_is_refused_not_buffered() {
    let (server, client) = https::start_self_signed(ServeOptions::default()).await;
    // 300 KB of head: hyper's default buffer would hold ~400 KiB of it per connection.
    let head = format!(
        "POST /mutate/live HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(300_000)
    );
    let tls = client.tls_stream().await.unwrap();
    let (mut rd, mut wr) = tokio::io::split(tls);
    // The server may answer and close before taking every byte.
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(head.as_bytes()).await;
        let _ = wr.flush().await;
        wr
    });
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), rd.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "the connection was not closed");
    let answer = body_text(&out);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
    drop(writer.await);
    server.shutdown();
    server.stopped().await;
}
