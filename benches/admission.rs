//! The admission decision end to end, from request bytes to response bytes: parse the
//! AdmissionReview, decide, build the JSON patch, encode the response. Goal: ≤ 10 µs median
//! for the z2jh fixture. The restore path (a pod re-created by Velero: read again in full,
//! converted) is rare (once per user per restore) and has no goal; it is measured so a
//! regression shows.

use testkit::fixtures;

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::Value;
use std::sync::Arc;
use velero_jupyterhub::admission;

use velero_jupyterhub::policy::ClaimGlobs;

fn bench(c: &mut Criterion) {
    let globs = Arc::new(ClaimGlobs::parse("claim-*").expect("globs"));
    let claims = |_: &str| globs.clone();
    let request = fixtures::golden_review().0;
    let mut annotated: Value = serde_json::from_slice(&request).expect("json");
    annotated["request"]["object"]["metadata"]["annotations"]["backup.velero.io/backup-volumes"] =
        "volume-alice-smith".into();
    let reinvocation = serde_json::to_vec(&annotated).expect("encode");

    let mut group = c.benchmark_group("admission");
    group.bench_function("z2jh_pod_create_patch", |b| {
        b.iter(|| admission::review(black_box(&request), claims, false).expect("review"))
    });
    group.bench_function("z2jh_pod_reinvocation_no_patch", |b| {
        b.iter(|| admission::review(black_box(&reinvocation), claims, false).expect("review"))
    });
    let volume = "volume-alice-smith";
    let restored = fixtures::pod_create_review(&fixtures::restored_z2jh(&[volume]), "r");
    group.bench_function("z2jh_restored_pod_conversion", |b| {
        b.iter(|| admission::review(black_box(&restored), claims, false).expect("review"))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
