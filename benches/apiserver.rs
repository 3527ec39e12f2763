//! Pod creation through the real kube-apiserver with and without the webhook registered,
//! same run, same server: what the webhook adds to a user's server start. Goal: ≤ 1 ms
//! added at the median. Needs the test API server: `scripts/bench.sh` starts it.
//!
//! Blocks of creates alternate between "registered" and "not registered" so drift on a
//! shared machine affects both alike; each created pod is checked to be in the mode its
//! block claims (annotated or not).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use kube::api::PostParams;
use support::cluster::{self, Webhook, backup_volumes, user_pod};

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let (blocks, per_block) = if quick { (1, 5) } else { (4, 150) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let client = cluster::client().await;
        let webhook = Webhook::start(&client).await;
        let ns = webhook.namespace(true).await;
        let pods = ns.pods();
        let (mut with, mut without) = (Vec::new(), Vec::new());
        let mut n = 0;
        for _ in 0..blocks {
            for registered in [true, false] {
                if registered {
                    webhook.register().await;
                } else {
                    webhook.unregister().await;
                }
                // Wait until the API server's view of webhooks has caught up.
                let mut probe = 0;
                cluster::eventually(Duration::from_secs(10), || {
                    probe += 1;
                    let pod = user_pod(&format!("probe-{registered}-{n}-{probe}"));
                    let pods = pods.clone();
                    async move {
                        let created = pods.create(&PostParams::default(), &pod).await.ok()?;
                        (backup_volumes(&created).is_some() == registered).then_some(())
                    }
                })
                .await
                .expect("webhook registration took effect");
                for _ in 0..per_block {
                    n += 1;
                    let pod = user_pod(&format!("u{n}"));
                    let t = Instant::now();
                    let created = pods.create(&PostParams::default(), &pod).await.expect("create");
                    let ms = t.elapsed().as_secs_f64() * 1000.0;
                    assert_eq!(backup_volumes(&created).is_some(), registered, "pod created in the wrong mode");
                    if registered { with.push(ms) } else { without.push(ms) }
                }
            }
        }
        let (w50, w99, o50, o99) = (pct(&mut with, 0.5), pct(&mut with, 0.99), pct(&mut without, 0.5), pct(&mut without, 0.99));
        println!("\nPod create through kube-apiserver v1.20 on loopback ({} creates each, alternating blocks)", with.len());
        println!("{:<28} {:>9} {:>9}", "", "p50 ms", "p99 ms");
        println!("{:<28} {:>9.3} {:>9.3}", "without the webhook", o50, o99);
        println!("{:<28} {:>9.3} {:>9.3}", "with the webhook", w50, w99);
        println!("added by the webhook: {:.3} ms at the median, {:.3} ms at p99 (goal: <= 1 ms at the median)", w50 - o50, w99 - o99);
        let m = &webhook.server.metrics;
        println!(
            "webhook: {} TLS connections accepted for {} admission requests",
            m.connection_count("accepted"),
            m.admission_count("live", "annotated")
        );
        ns.delete().await;
        webhook.finish().await;
    });
}
