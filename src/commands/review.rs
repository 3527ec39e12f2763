//! `review`: one AdmissionReview (or, with `--pod`, a bare pod) from stdin or a file,
//! answered exactly as `serve` would, with `--explain` saying why per volume.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::Arc;

use anyhow::Context;

use crate::admission;
use crate::cli::ReviewArgs;
use crate::policy::ClaimGlobs;
use crate::policy::helper::HelperOptions;

/// Answers one AdmissionReview from a file or stdin, as `serve` would; exit 2 on bad input.
pub fn run(args: ReviewArgs) -> anyhow::Result<i32> {
    let mut body = Vec::new();
    match args.file.as_deref() {
        Some(path) if path.as_os_str() != "-" => {
            body = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        }
        _ => {
            std::io::stdin()
                .read_to_end(&mut body)
                .context("reading stdin")?;
        }
    }
    if args.pod {
        body = match admission::pod_create_review(&body) {
            Ok(review) => review,
            Err(e) => {
                eprintln!("velero-jupyterhub review --pod: {e}");
                return Ok(2);
            }
        };
    }
    // As `serve` sees them: a namespace's annotation, else the default.
    let default = Arc::new(args.claims);
    let overrides: HashMap<String, Arc<ClaimGlobs>> = args
        .namespace_claims
        .into_iter()
        .map(|(ns, g)| (ns, Arc::new(g)))
        .collect();
    let helper = Arc::new(HelperOptions::with_image(&args.helper_image));
    let scope_for = |ns: &str| admission::Scope {
        claims: overrides.get(ns).unwrap_or(&default).clone(),
        helper,
        restoring: args.restoring,
        claims_now: args.claim_exists,
    };
    let reviewed = match admission::review(&body, scope_for, args.explain) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("velero-jupyterhub review: {e}");
            return Ok(2);
        }
    };
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(&reviewed.body)?;
    stdout.write_all(b"\n")?;
    if args.explain {
        eprint!("{}", explain_text(&reviewed));
    }
    Ok(0)
}

/// The `--explain` report: the verdict, then one line per volume.
pub fn explain_text(r: &admission::Reviewed) -> String {
    let mut out = format!(
        "{} {}: {}\n",
        r.object.as_deref().unwrap_or("(not a pod)"),
        r.uid,
        r.outcome.as_str()
    );
    if let Some(detail) = &r.detail {
        out.push_str(&format!("  {detail}\n"));
    }
    for note in &r.notes {
        out.push_str(&format!("  {note}\n"));
    }
    for v in &r.explanation {
        let claim = v
            .claim
            .as_deref()
            .map(|c| format!(" (claim {c})"))
            .unwrap_or_default();
        out.push_str(&format!("  {}{}: {}\n", v.volume, claim, v.reason));
    }
    if let Ok(Some(patch)) = admission::decode_patch(&r.body) {
        out.push_str(&format!(
            "  patch: {}\n",
            serde_json::to_string(&patch).unwrap_or_default()
        ));
    }
    out
}
