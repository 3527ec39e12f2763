//! Pod creation through the real kube-apiserver: with no webhook, with a stand-in webhook
//! that does no work (answers every review with the same one-annotation patch, served by
//! the same TLS stack), and with ours, in one run on one server. The stand-in shows what
//! the API server itself spends on any mutating webhook; the difference to ours is what
//! our decision costs. Goal: ≤ 1 ms added by our webhook at the median.
//!
//! On Kubernetes >= 1.28 a fourth mode weighs `matchConditions` (CEL): ours registered
//! with a condition that evaluates a realistic expression over the pod's volumes and
//! excludes the measured pods, so the API server evaluates CEL and makes no call. Against
//! "no webhook" it shows the cost of the expression; against ours, what a call excluded
//! this way would save.
//! Needs the test API server: `scripts/bench.sh` starts it.
//!
//! Blocks of creates alternate between the modes so drift on a shared machine affects all
//! alike; every created pod is checked to be in the mode its block claims.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::routing::post;
use base64::Engine as _;
use kube::api::PostParams;
use testkit::cluster::{self, Webhook, backup_volumes, user_pod};
use tokio_util::sync::CancellationToken;
use velero_jupyterhub::metrics::sample;
use velero_jupyterhub::tls::{self, CertStore};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    None,
    StandIn,
    Ours,
    /// Ours behind a `matchConditions` expression that excludes the measured pods.
    Conditioned,
}

/// Calls for pods that mount a claim, except pods named `jupyter-u…` (the measured ones).
const CONDITION: &str = "object.spec.volumes.exists(v, has(v.persistentVolumeClaim)) && !object.metadata.name.startsWith('jupyter-u')";

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// A webhook that reads only the uid and returns a fixed patch.
async fn stand_in() -> (String, String, CancellationToken) {
    #[derive(serde::Deserialize)]
    struct Review {
        request: Request,
    }
    #[derive(serde::Deserialize)]
    struct Request {
        uid: String,
    }
    let patch = base64::engine::general_purpose::STANDARD
        .encode(r#"[{"op":"add","path":"/metadata/annotations/backup.velero.io~1backup-volumes","value":"volume-stand-in"}]"#);
    // Every entry's path (the registration keeps the manifest's).
    let app = Router::new().fallback(
        post(move |body: Bytes| {
            let patch = patch.clone();
            async move {
                let uid = serde_json::from_slice::<Review>(&body).map(|r| r.request.uid).unwrap_or_default();
                let out = serde_json::json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                    "response": {"uid": uid, "allowed": true, "patchType": "JSONPatch", "patch": patch}});
                ([("content-type", "application/json")], out.to_string())
            }
        }),
    );
    let (pair, ca) = tls::self_signed(&[]).expect("cert");
    let certs = Arc::new(CertStore::default());
    certs.set(pair.certified_key().expect("key"));
    let config = tls::server_config(certs).expect("tls");
    let (addr, stop) = testkit::baseline::serve_plain_tls(app, config).await;
    (format!("https://{addr}"), ca, stop)
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    if quick {
        println!(
            "smoke run (cargo test): the bench works end to end; its figures mean nothing here. Measure with scripts/bench.sh."
        );
    }
    let (blocks, per_block) = if quick { (1, 5) } else { (4, 150) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let client = cluster::client().await;
        let webhook = Webhook::start(&client).await;
        let (stand_in_url, stand_in_ca, stand_in_stop) = stand_in().await;
        let ns = webhook.namespace(true).await;
        let pods = ns.pods();
        let mut samples: Vec<(Mode, Vec<f64>)> = vec![(Mode::None, vec![]), (Mode::StandIn, vec![]), (Mode::Ours, vec![])];
        if cluster::server_minor(&client).await >= 28 {
            samples.push((Mode::Conditioned, vec![]));
        }
        let mut n = 0;
        for _ in 0..blocks {
            for (mode, times) in samples.iter_mut() {
                match mode {
                    Mode::None => webhook.unregister().await,
                    Mode::StandIn => webhook.register_at(&stand_in_url, &stand_in_ca).await,
                    Mode::Ours => webhook.register().await,
                    Mode::Conditioned => {
                        let conditions = serde_json::json!([{"name": "bench", "expression": CONDITION}]);
                        webhook.register_edited(&webhook.url(), webhook.ca_pem(), |hook| hook["matchConditions"] = conditions.clone()).await
                    }
                }
                let expect = match mode {
                    Mode::None | Mode::Conditioned => None,
                    Mode::StandIn => Some("volume-stand-in"),
                    Mode::Ours => Some("ours"),
                };
                let in_mode = |created: &k8s_openapi::api::core::v1::Pod| match (expect, backup_volumes(created)) {
                    (None, None) => true,
                    (Some("ours"), Some(v)) => v != "volume-stand-in",
                    (Some(want), Some(got)) => want == got,
                    _ => false,
                };
                // Wait until the API server's view of webhooks has caught up. The
                // conditioned mode follows ours: its probes are named like the measured
                // pods, so they are created unannotated once the condition is in effect.
                let prefix = if *mode == Mode::Conditioned { "u-probe" } else { "probe" };
                let mut probe = 0;
                cluster::eventually(Duration::from_secs(10), || {
                    probe += 1;
                    let pod = user_pod(&format!("{prefix}-{n}-{probe}"));
                    let pods = pods.clone();
                    async move { pods.create(&PostParams::default(), &pod).await.ok().filter(in_mode).map(|_| ()) }
                })
                .await
                .unwrap_or_else(|| panic!("webhook registration ({mode:?}) took effect"));
                for _ in 0..per_block {
                    n += 1;
                    let pod = user_pod(&format!("u{n}"));
                    let t = Instant::now();
                    let created = pods.create(&PostParams::default(), &pod).await.expect("create");
                    times.push(t.elapsed().as_secs_f64() * 1000.0);
                    assert!(in_mode(&created), "pod created in the wrong mode ({mode:?})");
                }
            }
        }
        let version = client.apiserver_version().await.map(|v| v.git_version).unwrap_or_default();
        println!("\nPod create through kube-apiserver {version} on loopback ({} creates per mode, alternating blocks)", blocks * per_block);
        println!("{:<44} {:>9} {:>9}", "", "p50 ms", "p99 ms");
        let mut p50 = Vec::new();
        for (mode, times) in samples.iter_mut() {
            let label = match mode {
                Mode::None => "no webhook",
                Mode::StandIn => "stand-in webhook (fixed patch, no decision)",
                Mode::Ours => "velero-jupyterhub",
                Mode::Conditioned => "velero-jupyterhub, excluded by matchConditions",
            };
            let (a, b) = (pct(times, 0.5), pct(times, 0.99));
            p50.push(a);
            println!("{label:<44} {a:>9.3} {b:>9.3}");
        }
        println!(
            "added at the median: {:.3} ms by velero-jupyterhub (goal <= 1 ms), {:.3} ms by the stand-in; ours vs stand-in: {:+.3} ms",
            p50[2] - p50[0],
            p50[1] - p50[0],
            p50[2] - p50[1]
        );
        if let Some(conditioned) = p50.get(3) {
            println!(
                "matchConditions: {:+.3} ms vs no webhook (the expression's cost); {:+.3} ms vs calling ours (what an excluded call saves)",
                conditioned - p50[0],
                conditioned - p50[2]
            );
        }
        let m = webhook.server.metrics.encode();
        let accepted = r#"velero_jupyterhub_connections_total{listener="webhook",result="accepted"}"#;
        let annotated = r#"velero_jupyterhub_admission_requests_total{webhook="live",outcome="annotated"}"#;
        println!(
            "velero-jupyterhub: {} TLS connection(s) accepted for {} admission requests",
            sample(&m, accepted).unwrap_or(0.0),
            sample(&m, annotated).unwrap_or(0.0)
        );
        stand_in_stop.cancel();
        ns.delete().await;
        webhook.finish().await;
    });
}
