//! Arbitrary bytes as an AdmissionReview, decided as the restore path decides it with
//! every claim it names absent (a Restore that made them: the conversion runs). The
//! decision must never panic, and must answer with a well-formed AdmissionReview: a pod
//! a restore re-creates is converted (with a patch that decodes), refused with a reason,
//! or left alone.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use velero_jupyterhub::admission::{self, Scope};
use velero_jupyterhub::policy::ClaimGlobs;
use velero_jupyterhub::policy::helper::HelperOptions;
use velero_jupyterhub::policy::restore::ClaimNow;

fuzz_target!(|data: &[u8]| {
    let Ok(claims) = ClaimGlobs::parse("claim-*") else {
        return;
    };
    let scope = |_: &str| Scope {
        claims: Arc::new(claims.clone()),
        helper: Arc::new(HelperOptions::with_image("pause")),
        restoring: Vec::new(),
        // Named claims absent: nothing there to write over, so the conversion runs.
        claims_now: Vec::<(String, ClaimNow)>::new(),
    };
    let Ok(reviewed) = admission::review(data, scope, true) else {
        return; // a clear error (400 at the edge)
    };
    let v: serde_json_check::Value =
        serde_json_check::from_slice(&reviewed.body).expect("the answer is JSON");
    assert_eq!(v["apiVersion"], "admission.k8s.io/v1");
    match v["response"]["allowed"].as_bool() {
        Some(true) => {
            admission::decode_patch(&reviewed.body).expect("a patch that decodes");
        }
        Some(false) => {
            assert!(
                v["response"]["status"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()),
                "a refusal says why: {v}"
            );
        }
        None => panic!("no allowed in {v}"),
    }
});
