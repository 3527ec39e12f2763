//! AdmissionReview bytes in, AdmissionReview bytes out: the one code path shared by the
//! HTTPS server and the `review` command. No I/O; serde only.
//!
//! Bad input gets a [`ReviewError`] with a short reason (the server answers 400); a pod we
//! do not understand is allowed unchanged, because the webhook must never stop a user's
//! server from starting.

use std::borrow::Cow;
use std::sync::Arc;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use k8s_openapi::api::core::v1::Pod;

use crate::names;
use crate::policy::helper::HelperOptions;
use crate::policy::pod::{PodLimits, Str, count_json_values};
use crate::policy::restore::{self, ClaimNow, RestoringClaim};
use crate::policy::{
    ClaimGlobs, LiveDecision, LiveVerdict, PodFacts, PodView, VolumeReport, decide_live,
};

pub const ADMISSION_API_VERSION: &str = "admission.k8s.io/v1";

/// Why a request could not be reviewed. Every variant is the client's fault (HTTP 400).
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("malformed AdmissionReview: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("malformed AdmissionReview: not UTF-8 ({0})")]
    NotUtf8(std::str::Utf8Error),
    #[error("apiVersion must be {ADMISSION_API_VERSION:?}, got {got:?}")]
    WrongApiVersion { got: String, uid: Option<String> },
    #[error("kind must be \"AdmissionReview\", got {got:?}")]
    WrongKind { got: String, uid: Option<String> },
    #[error("the AdmissionReview has no request")]
    MissingRequest,
    #[error("request.uid is empty")]
    EmptyUid,
    #[error("request {uid}: a Pod {operation} must carry request.object")]
    MissingObject { uid: String, operation: String },
    #[error("request {uid}: request.object is not a Pod: {reason}")]
    NotAPod { uid: String, reason: String },
    #[error(
        "request {uid}: namespace {namespace:?} is not a valid namespace name (a DNS-1123 label)"
    )]
    InvalidNamespace { uid: String, namespace: String },
    /// Beyond [`PodLimits`]: answered with an error, so the entry's `failurePolicy`
    /// decides (the live entry's `Ignore` creates the pod unchanged; the restore entries'
    /// `Fail` refuses it).
    #[error("request {uid}: pod {pod} is beyond what velero-jupyterhub reviews: {why}")]
    OverLimits {
        uid: String,
        pod: String,
        why: String,
    },
}

impl ReviewError {
    /// The request's uid, where the input got that far (for the log line).
    pub fn uid(&self) -> Option<&str> {
        match self {
            Self::MissingObject { uid, .. }
            | Self::NotAPod { uid, .. }
            | Self::InvalidNamespace { uid, .. }
            | Self::OverLimits { uid, .. } => Some(uid),
            Self::WrongApiVersion { uid, .. } | Self::WrongKind { uid, .. } => uid.as_deref(),
            _ => None,
        }
    }

    /// The `outcome` metric label.
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::OverLimits { .. } => "over_limits",
            _ => "bad_request",
        }
    }
}

/// What the decision for a pod needs besides the pod: its namespace's claim globs, the
/// restore helpers' image, and the claims restore helpers in the namespace mount.
#[derive(Clone, Debug)]
pub struct Scope {
    pub claims: Arc<ClaimGlobs>,
    pub helper: Arc<HelperOptions>,
    pub restoring: Vec<RestoringClaim>,
    /// For a pod a Velero restore re-creates: the claims it restores into
    /// ([`PodCreate::restored_claims`]) as they are now. One missing here counts as absent
    /// (the `review` command has no cluster; the server looks up every one).
    pub claims_now: Vec<(String, ClaimNow)>,
}

impl From<Arc<ClaimGlobs>> for Scope {
    /// Just the claim globs: the default helper image, and no restore under way.
    fn from(claims: Arc<ClaimGlobs>) -> Self {
        Self {
            claims,
            helper: Arc::new(HelperOptions::with_image(
                crate::policy::helper::DEFAULT_IMAGE,
            )),
            restoring: Vec::new(),
            claims_now: Vec::new(),
        }
    }
}

/// What the restore path did with a pod a Velero restore re-creates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestoreVerdict {
    /// Patched into a restore helper.
    Converted,
    /// Already a restore helper (reinvocation, or the other entry got there first).
    AlreadyConverted,
    /// Not readable as a Pod: refused, so no stale notebook server starts instead.
    Unreadable,
    /// Its restore would write over a claim that existed before the Restore (or one that
    /// could not be checked): refused, so nothing is written.
    WouldOverwrite,
}

/// What happened to one request, for logs and the `outcome` metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A live-session decision was made (patched or not).
    Live(LiveVerdict),
    /// A pod re-created by a Velero restore went through the restore path.
    Restore(RestoreVerdict),
    /// A user server that mounts a claim being restored: refused (the restore guard).
    Guarded,
    /// A claim a Velero restore re-creates.
    RestoredClaim(ClaimVerdict),
    /// Not a Pod CREATE (other kinds, UPDATE/DELETE/CONNECT, subresources).
    NotPodCreate,
    /// A Pod whose fields we could not read; allowed unchanged.
    NotUnderstood,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Live(v) => v.as_str(),
            Self::Restore(RestoreVerdict::Converted) => "restore_converted",
            Self::Restore(RestoreVerdict::AlreadyConverted) => "restore_already_converted",
            Self::Restore(RestoreVerdict::Unreadable) => "restore_unreadable",
            Self::Restore(RestoreVerdict::WouldOverwrite) => "restore_refused_existing",
            Self::Guarded => "restore_guard_denied",
            Self::RestoredClaim(ClaimVerdict::Allowed) => "restore_claim_allowed",
            Self::RestoredClaim(ClaimVerdict::HomeInAWave) => "restore_claim_home_in_a_wave",
            Self::RestoredClaim(ClaimVerdict::Unchecked) => "restore_claim_unchecked",
            Self::NotPodCreate => "not_pod_create",
            Self::NotUnderstood => "not_understood",
        }
    }

    pub fn patched(self) -> bool {
        matches!(
            self,
            Self::Live(LiveVerdict::Annotate) | Self::Restore(RestoreVerdict::Converted)
        )
    }

    /// Whether the request was refused.
    pub fn denied(self) -> bool {
        matches!(
            self,
            Self::Guarded
                | Self::Restore(RestoreVerdict::Unreadable | RestoreVerdict::WouldOverwrite)
                | Self::RestoredClaim(ClaimVerdict::HomeInAWave | ClaimVerdict::Unchecked)
        )
    }
}

/// The answer to one AdmissionReview.
#[derive(Debug)]
pub struct Reviewed {
    /// The response AdmissionReview, serialized.
    pub body: Vec<u8>,
    pub uid: String,
    pub outcome: Outcome,
    /// `namespace/name` of the object, when it is a pod.
    pub object: Option<String>,
    /// Per-volume reasons; filled only when asked for (`review --explain`).
    pub explanation: Vec<ExplainedVolume>,
    /// Why the pod was not understood, or refused.
    pub detail: Option<String>,
    /// What a restore conversion did, one line each; filled only when asked for.
    pub notes: Vec<String>,
    /// Claims a refused restore would have written over (an Event goes on each).
    pub claims_refused: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExplainedVolume {
    pub volume: String,
    pub claim: Option<String>,
    pub listed: bool,
    pub reason: String,
}

impl From<&VolumeReport<'_>> for ExplainedVolume {
    fn from(r: &VolumeReport<'_>) -> Self {
        Self {
            volume: r.volume.to_owned(),
            claim: r.claim.map(str::to_owned),
            listed: r.reason.is_listed(),
            reason: r.reason.to_string(),
        }
    }
}

/// An AdmissionReview as we read it, with `request.object` as `O`: a [`PodView`] on the
/// one pass every well-formed request takes, raw JSON when that pass failed and we only
/// need to tell why (see [`parse`]).
#[derive(Deserialize)]
#[serde(
    rename_all = "camelCase",
    expecting = "an AdmissionReview object",
    bound(deserialize = "'de: 'a, O: Deserialize<'de>")
)]
struct ReviewIn<'a, O> {
    #[serde(borrow)]
    api_version: Option<Str<'a>>,
    #[serde(borrow)]
    kind: Option<Str<'a>>,
    #[serde(borrow)]
    request: Option<RequestIn<'a, O>>,
}

#[derive(Deserialize)]
#[serde(
    rename_all = "camelCase",
    expecting = "an AdmissionRequest object",
    bound(deserialize = "'de: 'a, O: Deserialize<'de>")
)]
struct RequestIn<'a, O> {
    #[serde(borrow)]
    uid: Str<'a>,
    #[serde(borrow)]
    kind: GroupVersionKindIn<'a>,
    #[serde(borrow)]
    operation: Str<'a>,
    #[serde(borrow)]
    namespace: Option<Str<'a>>,
    #[serde(borrow)]
    sub_resource: Option<Str<'a>>,
    object: Option<O>,
}

/// `request.object`, as far as we could read it.
// Short-lived, on the stack: boxing the pod would cost an allocation per review.
#[allow(clippy::large_enum_variant)]
enum ObjectIn<'a> {
    Pod(PodView<'a>),
    /// Not readable as a pod: `error` says why (from the one-pass read).
    Odd {
        is_object: bool,
        error: String,
        /// Its labels say a Velero restore re-creates it (read leniently).
        restore_candidate: bool,
    },
}

#[derive(Deserialize)]
#[serde(expecting = "a {group, version, kind} object")]
struct GroupVersionKindIn<'a> {
    #[serde(borrow, default)]
    group: Option<Str<'a>>,
    #[serde(borrow)]
    version: Str<'a>,
    #[serde(borrow)]
    kind: Str<'a>,
}

/// A request read and checked, before the decision.
pub enum Parsed<'a> {
    /// Answered without a decision: not a Pod CREATE, or a pod we cannot read.
    Answered(Reviewed),
    /// A Pod CREATE: the decision needs its namespace's scope.
    PodCreate(PodCreate<'a>),
    /// A claim a Velero restore re-creates: the decision needs the wave Backups of its
    /// Backup's tick.
    ClaimCreate(ClaimCreate),
}

/// A PersistentVolumeClaim CREATE by a Velero restore (labelled `velero.io/restore-name`
/// and `velero.io/backup-name`).
#[derive(Clone, Debug)]
pub struct ClaimCreate {
    uid: String,
    pub namespace: String,
    pub name: String,
    /// The label forms Velero wrote (`velero.io/backup-name`, `velero.io/restore-name`).
    pub backup: String,
    pub restore: String,
}

/// What the claim entry did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimVerdict {
    /// Not one whose home is elsewhere: created as Velero sends it.
    Allowed,
    /// Its home is in a wave Backup the Restore does not restore: refused, so that it
    /// does not come back empty under a Restore that says Completed.
    HomeInAWave,
    /// Whether its home is in a wave Backup could not be checked (or the claim not
    /// read): refused, so that a wave user's claim never comes back empty unnoticed.
    Unchecked,
}

impl ClaimCreate {
    /// Refused when a wave Backup of the same tick holds its home (`waves`: those
    /// labelled `velero-jupyterhub.io/wave-of` with its Backup; `source_namespace`: its
    /// namespace in the Backup, before the Restore's mapping).
    pub fn decide(&self, waves: &[restore::WaveOf<'_>], source_namespace: &str) -> Reviewed {
        let mut reviewed = match restore::home_in_a_wave(source_namespace, &self.name, waves) {
            None => allow(
                &self.uid,
                Outcome::RestoredClaim(ClaimVerdict::Allowed),
                None,
                None,
            ),
            Some(wave) => deny(
                &self.uid,
                Outcome::RestoredClaim(ClaimVerdict::HomeInAWave),
                restore::wave_home_message(&self.namespace, &self.name, &self.backup, wave),
            ),
        };
        reviewed.object = Some(format!("{}/{}", self.namespace, self.name));
        reviewed
    }
}

impl ClaimCreate {
    /// Refused: whether its home is in a wave Backup could not be checked (`why`).
    pub fn unchecked(&self, why: &str) -> Reviewed {
        let message = format!(
            "velero-jupyterhub: claim {}/{} not re-created from Backup {}: whether a wave Backup of the same night holds its home could not be checked ({why}); run the restore again",
            self.namespace, self.name, self.backup
        );
        let mut reviewed = deny(
            &self.uid,
            Outcome::RestoredClaim(ClaimVerdict::Unchecked),
            message,
        );
        reviewed.object = Some(format!("{}/{}", self.namespace, self.name));
        reviewed
    }
}

/// A claim CREATE: read its labels; one a restore did not make is allowed at once.
fn claim_create(
    uid: &str,
    namespace: Option<&str>,
    object: Option<ObjectIn<'_>>,
) -> Parsed<'static> {
    let answered = |outcome| Parsed::Answered(allow(uid, outcome, None, None));
    let Some(ObjectIn::Pod(view)) = object else {
        // The claim entry sends only claims a restore re-creates: one we cannot read is
        // refused (the restore says so; running it again with a fixed webhook fixes it).
        let message = "velero-jupyterhub could not read this claim, re-created by a Velero restore, to check whether a wave Backup holds its home; refused".to_owned();
        return Parsed::Answered(deny(
            uid,
            Outcome::RestoredClaim(ClaimVerdict::Unchecked),
            message,
        ));
    };
    let label = |key: &str| view.label(key).map(str::to_owned);
    let name = view
        .metadata
        .as_ref()
        .and_then(|m| m.name.as_deref())
        .unwrap_or("")
        .to_owned();
    let namespace = namespace
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .or_else(|| {
            view.metadata
                .as_ref()
                .and_then(|m| m.namespace.as_deref())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    match (
        label(names::VELERO_BACKUP_NAME),
        label(names::VELERO_RESTORE_NAME),
    ) {
        (Some(backup), Some(restore))
            if names::is_dns1123_label(&namespace) && names::is_dns1123_subdomain(&name) =>
        {
            Parsed::ClaimCreate(ClaimCreate {
                uid: uid.to_owned(),
                namespace,
                name,
                backup,
                restore,
            })
        }
        _ => answered(Outcome::RestoredClaim(ClaimVerdict::Allowed)),
    }
}

/// A Pod CREATE, read from the request, borrowing from its bytes.
pub struct PodCreate<'a> {
    uid: Str<'a>,
    namespace: Str<'a>,
    pod: PodView<'a>,
    /// The whole request, read again in full for a restore conversion (rare).
    body: &'a str,
}

impl PodCreate<'_> {
    /// The pod's namespace: the request's (authoritative; the object's may be empty at
    /// CREATE), else the object's. Always a valid DNS-1123 label ([`parse`] checks).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Whether a Velero restore re-creates the pod: the restore path, [`Self::restore`].
    pub fn is_restore_candidate(&self) -> bool {
        restore::is_restore_candidate(&self.pod)
    }

    /// Decides from the pod itself, whichever webhook entry asked: a pod a Velero restore
    /// re-creates becomes a restore helper; a user server on a claim being restored is
    /// refused; any other user server gets its backup annotation. Being called for this
    /// pod means the webhook registration's namespaceSelector matched: the namespace is
    /// opted in.
    pub fn decide(&self, scope: &Scope, explain: bool) -> Reviewed {
        if self.is_restore_candidate() {
            return match self.restore() {
                Ok(restore) => restore.decide(scope, explain),
                Err(refused) => *refused,
            };
        }
        let is_user_server = self.pod.label(names::VELERO_RESTORE_NAME).is_none()
            && self.pod.label(names::JUPYTERHUB_COMPONENT) == Some(names::SINGLEUSER_SERVER);
        if let Some(restoring) = is_user_server
            .then(|| restore::guard(&self.pod, &scope.restoring))
            .flatten()
        {
            let mut reviewed = deny(
                &self.uid,
                Outcome::Guarded,
                restore::guard_message(restoring),
            );
            reviewed.object = Some(self.pod.display_name());
            return reviewed;
        }
        let decision = decide_live(&self.pod, &scope.claims);
        let patch = render_patch(&decision);
        let mut reviewed = allow(
            &self.uid,
            Outcome::Live(decision.verdict),
            patch.as_deref(),
            None,
        );
        // Named only where it is shown: the info log of an annotated pod, and --explain.
        if explain || decision.verdict == LiveVerdict::Annotate {
            reviewed.object = Some(self.pod.display_name());
        }
        if explain {
            reviewed.explanation = decision.volumes.iter().map(ExplainedVolume::from).collect();
        }
        reviewed
    }

    /// A pod a Velero restore re-creates, read in full (the conversion needs the whole
    /// pod; a restore re-creates a pod once per user), owned so that the server can do
    /// this CPU work off its request threads. Refused when it cannot be read.
    pub fn restore(&self) -> Result<RestoreCreate, Box<Reviewed>> {
        let object = self.pod.display_name();
        let refuse = |why: &str| {
            let outcome = Outcome::Restore(RestoreVerdict::Unreadable);
            let mut reviewed = deny(&self.uid, outcome, unreadable_restore(why));
            reviewed.object = Some(object.clone());
            Box::new(reviewed)
        };
        // The whole pod is built only when it is small enough to build (a crafted one of
        // tiny values would take ~100 times its size).
        count_json_values(self.body, PodLimits::RESTORED_POD_VALUES).map_err(|e| refuse(&e))?;
        let pod = match serde_json::from_str::<ReviewIn<Pod>>(self.body) {
            Ok(ReviewIn {
                request:
                    Some(RequestIn {
                        object: Some(pod), ..
                    }),
                ..
            }) => Box::new(pod),
            other => {
                let why = other
                    .err()
                    .map_or("no object".to_owned(), |e| e.to_string());
                return Err(refuse(&why));
            }
        };
        Ok(RestoreCreate {
            uid: self.uid.to_string(),
            restore: self
                .pod
                .label(names::VELERO_RESTORE_NAME)
                .unwrap_or("")
                .to_owned(),
            object,
            pod,
        })
    }
}

/// A pod a Velero restore re-creates, read whole and owned (see [`PodCreate::restore`]).
pub struct RestoreCreate {
    uid: String,
    /// Its `velero.io/restore-name`.
    restore: String,
    /// `namespace/name`, for logs and messages.
    object: String,
    pod: Box<Pod>,
}

impl RestoreCreate {
    /// The claims its restore writes into, to be looked up before [`Self::decide`]
    /// (`Scope::claims_now`).
    pub fn restored_claims(&self) -> Vec<String> {
        restore::restored_claims(&self.pod)
            .into_iter()
            .map(|(_, claim)| claim.to_owned())
            .collect()
    }

    /// The pod becomes a restore helper, unless its restore would write over a
    /// claim that existed before the Restore (`policy::restore::overwrites`).
    pub fn decide(&self, scope: &Scope, explain: bool) -> Reviewed {
        let pod = &self.pod;
        let refused = restore::overwrites(pod, &scope.claims_now);
        if !refused.is_empty() {
            let message = restore::overwrite_message(&self.restore, &self.object, &refused);
            let outcome = Outcome::Restore(RestoreVerdict::WouldOverwrite);
            let mut reviewed = deny(&self.uid, outcome, message);
            reviewed.object = Some(self.object.clone());
            reviewed.claims_refused = refused.iter().map(|o| o.claim().to_owned()).collect();
            return reviewed;
        }
        let mut reviewed = if restore::is_converted(pod, &scope.helper) {
            allow(
                &self.uid,
                Outcome::Restore(RestoreVerdict::AlreadyConverted),
                None,
                None,
            )
        } else {
            let helper = restore::restore_helper(pod, &scope.helper);
            let mut reviewed = converted(&self.uid, render_restore_patch(&helper));
            if explain && reviewed.outcome.patched() {
                reviewed.notes = restore::explain(pod, &helper);
            }
            reviewed
        };
        reviewed.object = Some(self.object.clone());
        reviewed
    }
}

/// Why a pod a Velero restore re-creates is refused when it cannot be read.
fn unreadable_restore(why: &str) -> String {
    format!(
        "velero-jupyterhub could not read this pod, re-created by a Velero restore, to make \
         it a restore helper ({why}); refused so that no stale notebook server starts in its \
         place"
    )
}

/// The answer for a pod made a restore helper by `patch`. With no patch (it could not be
/// rendered) the pod is refused: allowed unchanged, it would start the notebook server.
fn converted(uid: &str, patch: Option<Vec<u8>>) -> Reviewed {
    match patch {
        Some(patch) => allow(
            uid,
            Outcome::Restore(RestoreVerdict::Converted),
            Some(&patch),
            None,
        ),
        None => deny(
            uid,
            Outcome::Restore(RestoreVerdict::Unreadable),
            unreadable_restore("its restore-helper patch could not be written"),
        ),
    }
}

/// The labels of an object that could not be read as a pod that tell whether a Velero
/// restore re-creates it, read leniently: string values of those few keys kept, anything
/// else read past without being built. `None` when not even that can be read.
fn lenient_labels(object: &str) -> Option<PodView<'_>> {
    #[derive(Deserialize)]
    struct Object<'a> {
        #[serde(borrow)]
        metadata: Option<Meta<'a>>,
    }
    #[derive(Deserialize)]
    struct Meta<'a> {
        #[serde(borrow)]
        labels: Option<Labels<'a>>,
    }
    struct Labels<'a>(Vec<(Str<'a>, Str<'a>)>);
    impl<'de: 'a, 'a> Deserialize<'de> for Labels<'a> {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Labels<'de>;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("a map")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> Result<Self::Value, A::Error> {
                    let mut kept = Vec::new();
                    while let Some(key) = map.next_key::<Str<'de>>()? {
                        let value = map.next_value::<Lenient<'de>>()?;
                        if let (true, Some(value)) =
                            (restore::CANDIDATE_LABELS.contains(&&*key), value.0)
                        {
                            kept.push((key, value));
                        }
                    }
                    Ok(Labels(kept))
                }
            }
            d.deserialize_map(V)
        }
    }
    /// A string, or anything else read past (`None`).
    struct Lenient<'a>(Option<Str<'a>>);
    impl<'de: 'a, 'a> Deserialize<'de> for Lenient<'a> {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Lenient<'de>;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("any value")
                }
                fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                    Ok(Lenient(Some(Str(Cow::Borrowed(v)))))
                }
                fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                    Ok(Lenient(Some(Str(Cow::Owned(v.to_owned())))))
                }
                fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                    Ok(Lenient(None))
                }
                fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                    Ok(Lenient(None))
                }
                fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                    Ok(Lenient(None))
                }
                fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                    Ok(Lenient(None))
                }
                fn visit_unit<E>(self) -> Result<Self::Value, E> {
                    Ok(Lenient(None))
                }
                fn visit_seq<A: serde::de::SeqAccess<'de>>(
                    self,
                    mut a: A,
                ) -> Result<Self::Value, A::Error> {
                    while a.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                    Ok(Lenient(None))
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut a: A,
                ) -> Result<Self::Value, A::Error> {
                    while a
                        .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                        .is_some()
                    {}
                    Ok(Lenient(None))
                }
            }
            d.deserialize_any(V)
        }
    }
    let object: Object = serde_json::from_str(object).ok()?;
    let labels = object.metadata?.labels?;
    Some(PodView {
        metadata: Some(crate::policy::pod::MetaView {
            labels: Some(crate::policy::pod::StrMap(labels.0)),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// The JSON patch that carries a decision out, serialized.
///
/// Invariant: every patch we send uses only `add`, and only where its parent exists in
/// the object we were sent: `add` on a member that exists replaces it (RFC 6902 §4.1),
/// and with no annotations map we add the whole map. Such a patch cannot fail to apply.
/// (A patch that fails makes the API server answer the create with a 500, which
/// `failurePolicy: Ignore` does not cover: the user's server would not start.)
fn render_patch(decision: &LiveDecision<'_>) -> Option<Vec<u8>> {
    let value = decision.new_value.as_deref()?;
    if decision.had_annotations_map {
        add(BACKUP_VOLUMES_POINTER, value)
    } else {
        let map: std::collections::BTreeMap<_, _> = [(names::VELERO_BACKUP_VOLUMES, value)].into();
        add(ANNOTATIONS_POINTER, map)
    }
}

/// The restore conversion as a patch: labels, annotations and spec, each replaced whole
/// by an `add` (labels exist: Velero set its own; metadata and spec always exist).
fn render_restore_patch(helper: &Pod) -> Option<Vec<u8>> {
    let empty = Default::default();
    let labels = helper.metadata.labels.as_ref().unwrap_or(&empty);
    let annotations = helper.metadata.annotations.as_ref().unwrap_or(&empty);
    let spec = serde_json::to_value(&helper.spec).ok()?;
    let ops = [
        Add::new(LABELS_POINTER, serde_json::to_value(labels).ok()?),
        Add::new(ANNOTATIONS_POINTER, serde_json::to_value(annotations).ok()?),
        Add::new(SPEC_POINTER, spec),
    ];
    serde_json::to_vec(&ops).ok()
}

#[derive(Serialize)]
struct Add<'a, V> {
    op: &'static str,
    path: &'a str,
    value: V,
}

impl<'a, V> Add<'a, V> {
    fn new(path: &'a str, value: V) -> Self {
        Self {
            op: "add",
            path,
            value,
        }
    }
}

/// A one-operation JSON patch: `[{"op":"add","path":…,"value":…}]`.
fn add<V: Serialize>(path: &str, value: V) -> Option<Vec<u8>> {
    let mut patch = Vec::with_capacity(128);
    // Serializing strings into a Vec cannot fail.
    serde_json::to_writer(&mut patch, &[Add::new(path, value)])
        .ok()
        .map(|()| patch)
}

/// JSON pointers (RFC 6901) of what we patch: `/` in a key is written `~1`.
const ANNOTATIONS_POINTER: &str = "/metadata/annotations";
const LABELS_POINTER: &str = "/metadata/labels";
const SPEC_POINTER: &str = "/spec";
const BACKUP_VOLUMES_POINTER: &str = "/metadata/annotations/backup.velero.io~1backup-volumes";

/// Reads and checks one AdmissionReview (the request body).
///
/// Every well-formed request is read in one pass, straight into a [`PodView`] (skipping
/// what we do not need). Only when that fails is the body read again, with the object as
/// raw JSON, to tell a bad request (400) from a pod whose fields merely have shapes we do
/// not expect (allowed unchanged: never stop a user's server from starting).
pub fn parse(body: &[u8]) -> Result<Parsed<'_>, ReviewError> {
    // UTF-8 is checked once for the whole body (JSON must be UTF-8), not string by string.
    let body = std::str::from_utf8(body).map_err(ReviewError::NotUtf8)?;
    match serde_json::from_str::<ReviewIn<PodView>>(body) {
        Ok(review) => check(review, body, ObjectIn::Pod),
        Err(error) => {
            let review: ReviewIn<&RawValue> = serde_json::from_str(body)?;
            check(review, body, |raw| ObjectIn::Odd {
                is_object: raw.get().starts_with('{'),
                error: error.to_string(),
                restore_candidate: lenient_labels(raw.get())
                    .is_some_and(|pod| restore::is_restore_candidate(&pod)),
            })
        }
    }
}

/// The restore path's whole read of a request [`parse`] found to be a pod a Velero restore
/// re-creates ([`PodCreate::restore`]); `None` for any other request.
pub fn read_restore(body: &[u8]) -> Option<Result<RestoreCreate, Box<Reviewed>>> {
    match parse(body) {
        Ok(Parsed::PodCreate(create)) if create.is_restore_candidate() => Some(create.restore()),
        _ => None,
    }
}

/// Reviews one AdmissionReview and returns the response to send: [`parse`], then decide
/// with the [`Scope`] (or just the claim globs) `scope_for` gives the pod's namespace
/// (the `review` command, benchmarks and fuzzing; the server looks namespaces up
/// asynchronously).
pub fn review<S: Into<Scope>>(
    body: &[u8],
    scope_for: impl FnOnce(&str) -> S,
    explain: bool,
) -> Result<Reviewed, ReviewError> {
    Ok(match parse(body)? {
        Parsed::Answered(reviewed) => reviewed,
        Parsed::PodCreate(create) => create.decide(&scope_for(create.namespace()).into(), explain),
        // No cluster here: no wave Backups to look in.
        Parsed::ClaimCreate(claim) => claim.decide(&[], &claim.namespace),
    })
}

fn check<'a, O>(
    review: ReviewIn<'a, O>,
    body: &'a str,
    read_object: impl FnOnce(O) -> ObjectIn<'a>,
) -> Result<Parsed<'a>, ReviewError> {
    match review.api_version.as_deref() {
        Some(ADMISSION_API_VERSION) => {}
        other => {
            let got = other.unwrap_or("").to_owned();
            return Err(ReviewError::WrongApiVersion {
                got,
                uid: request_uid(&review),
            });
        }
    }
    match review.kind.as_deref() {
        Some("AdmissionReview") => {}
        other => {
            let got = other.unwrap_or("").to_owned();
            return Err(ReviewError::WrongKind {
                got,
                uid: request_uid(&review),
            });
        }
    }
    let request = review.request.ok_or(ReviewError::MissingRequest)?;
    let uid: &str = &request.uid;
    if uid.is_empty() {
        return Err(ReviewError::EmptyUid);
    }

    let is_pod = request.kind.group.as_deref().unwrap_or("").is_empty()
        && &*request.kind.version == "v1"
        && &*request.kind.kind == "Pod";
    let is_create = &*request.operation == "CREATE";
    let is_subresource = request
        .sub_resource
        .as_deref()
        .is_some_and(|s| !s.is_empty());
    let is_claim = request.kind.group.as_deref().unwrap_or("").is_empty()
        && &*request.kind.version == "v1"
        && &*request.kind.kind == "PersistentVolumeClaim";
    if is_claim && is_create && !is_subresource {
        return Ok(claim_create(
            &request.uid,
            request.namespace.as_deref(),
            request.object.map(read_object),
        ));
    }
    if !(is_pod && is_create && !is_subresource) {
        return Ok(Parsed::Answered(allow(
            uid,
            Outcome::NotPodCreate,
            None,
            None,
        )));
    }

    let object = request.object.ok_or_else(|| ReviewError::MissingObject {
        uid: uid.to_owned(),
        operation: request.operation.to_string(),
    })?;
    let pod = match read_object(object) {
        ObjectIn::Pod(pod) => pod,
        // A pod a Velero restore re-creates must become a restore helper or not start:
        // one we cannot read is refused (the restore entries' failurePolicy is Fail).
        ObjectIn::Odd {
            is_object: true,
            error,
            restore_candidate: true,
        } => {
            let answered = deny(
                uid,
                Outcome::Restore(RestoreVerdict::Unreadable),
                unreadable_restore(&error),
            );
            return Ok(Parsed::Answered(answered));
        }
        // Any other JSON object whose fields merely have shapes we do not expect is
        // still a pod the API server wants to create: allow it. Anything else is not a
        // Pod.
        ObjectIn::Odd {
            is_object: true,
            error,
            restore_candidate: false,
        } => {
            let answered = allow(uid, Outcome::NotUnderstood, None, Some(error));
            return Ok(Parsed::Answered(answered));
        }
        ObjectIn::Odd {
            is_object: false, ..
        } => {
            let reason = "not a JSON object".into();
            return Err(ReviewError::NotAPod {
                uid: uid.to_owned(),
                reason,
            });
        }
    };
    if let Some(kind) = pod.kind.as_deref().filter(|k| *k != "Pod") {
        return Err(ReviewError::NotAPod {
            uid: uid.to_owned(),
            reason: format!("kind is {kind:?}"),
        });
    }
    if let Some(v) = pod.api_version.as_deref().filter(|v| *v != "v1") {
        return Err(ReviewError::NotAPod {
            uid: uid.to_owned(),
            reason: format!("apiVersion is {v:?}"),
        });
    }

    // The namespace reaches an API URL (the namespace lookup): it must be a name, not a
    // path. The request's is authoritative; the object's may be empty at CREATE.
    let object_namespace = pod.metadata.as_ref().and_then(|m| m.namespace.clone());
    let namespace = request
        .namespace
        .filter(|n| !n.is_empty())
        .or(object_namespace)
        .unwrap_or_default();
    if !names::is_dns1123_label(&namespace) {
        return Err(ReviewError::InvalidNamespace {
            uid: uid.to_owned(),
            namespace: namespace.to_string(),
        });
    }
    if let Some(why) = pod.over_limits() {
        return Err(ReviewError::OverLimits {
            uid: uid.to_owned(),
            pod: pod.display_name(),
            why,
        });
    }

    Ok(Parsed::PodCreate(PodCreate {
        uid: request.uid,
        namespace,
        pod,
        body,
    }))
}

fn request_uid<O>(review: &ReviewIn<'_, O>) -> Option<String> {
    review.request.as_ref().map(|r| r.uid.to_string())
}

/// An allowing response, with the patch if there is one. Written directly: only the uid
/// needs JSON escaping (base64 never does), and this is on every request's path. The
/// golden-fixture test holds it to the API server's expected shape.
fn allow(uid: &str, outcome: Outcome, patch: Option<&[u8]>, detail: Option<String>) -> Reviewed {
    let b64 = base64::engine::general_purpose::STANDARD;
    let patch_len = patch.map_or(0, |p| p.len().div_ceil(3) * 4);
    let mut body = Vec::with_capacity(160 + uid.len() + patch_len);
    body.extend_from_slice(br#"{"apiVersion":""#);
    body.extend_from_slice(ADMISSION_API_VERSION.as_bytes());
    body.extend_from_slice(br#"","kind":"AdmissionReview","response":{"uid":"#);
    // Writing a string into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut body, uid);
    body.extend_from_slice(br#","allowed":true"#);
    if let Some(patch) = patch {
        body.extend_from_slice(br#","patchType":"JSONPatch","patch":""#);
        let start = body.len();
        body.resize(start + patch_len, 0);
        // The buffer was sized for the encoding above.
        let written = b64.encode_slice(patch, &mut body[start..]).unwrap_or(0);
        body.truncate(start + written);
        body.push(b'"');
    }
    body.extend_from_slice(b"}}");
    Reviewed {
        body,
        uid: uid.to_owned(),
        outcome,
        object: None,
        explanation: Vec::new(),
        detail,
        notes: Vec::new(),
        claims_refused: Vec::new(),
    }
}

/// A refusing response (403, with `message` shown to whoever made the request).
fn deny(uid: &str, outcome: Outcome, message: String) -> Reviewed {
    let response = serde_json::json!({
        "apiVersion": ADMISSION_API_VERSION,
        "kind": "AdmissionReview",
        "response": {
            "uid": uid,
            "allowed": false,
            "status": {"code": 403, "reason": "Forbidden", "message": message},
        },
    });
    Reviewed {
        // Serializing a Value cannot fail.
        body: serde_json::to_vec(&response).unwrap_or_default(),
        uid: uid.to_owned(),
        outcome,
        object: None,
        explanation: Vec::new(),
        detail: Some(message),
        notes: Vec::new(),
        claims_refused: Vec::new(),
    }
}

/// Wraps a Pod (JSON) in the AdmissionReview the API server would send to create it, with
/// server-set fields removed (for `review --pod` on `kubectl get pod -o json` output).
pub fn pod_create_review(pod_json: &[u8]) -> Result<Vec<u8>, String> {
    let mut pod: serde_json::Value =
        serde_json::from_slice(pod_json).map_err(|e| format!("not JSON: {e}"))?;
    if pod.get("kind").and_then(|k| k.as_str()) != Some("Pod") {
        return Err("expected a Pod object (kind: Pod)".into());
    }
    let metadata = pod
        .get_mut("metadata")
        .and_then(|m| m.as_object_mut())
        .ok_or("the Pod has no metadata")?;
    for server_set in [
        "uid",
        "resourceVersion",
        "creationTimestamp",
        "managedFields",
        "generation",
    ] {
        metadata.remove(server_set);
    }
    let namespace = metadata
        .get("namespace")
        .cloned()
        .unwrap_or_else(|| "default".into());
    let name = metadata.get("name").cloned().unwrap_or_default();
    if let Some(p) = pod.as_object_mut() {
        p.remove("status");
    }
    let review = serde_json::json!({
        "apiVersion": ADMISSION_API_VERSION,
        "kind": "AdmissionReview",
        "request": {
            "uid": "00000000-0000-0000-0000-000000000000",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "operation": "CREATE",
            "namespace": namespace,
            "name": name,
            "object": pod,
        }
    });
    serde_json::to_vec(&review).map_err(|e| e.to_string())
}

/// The JSON patch carried by a response body, decoded (for tests and `review --explain`).
pub fn decode_patch(response_body: &[u8]) -> Result<Option<serde_json::Value>, String> {
    #[derive(Deserialize)]
    struct Out<'a> {
        #[serde(borrow)]
        response: Resp<'a>,
    }
    #[derive(Deserialize)]
    struct Resp<'a> {
        #[serde(borrow)]
        patch: Option<Cow<'a, str>>,
    }
    let out: Out = serde_json::from_slice(response_body).map_err(|e| e.to_string())?;
    let Some(b64) = out.response.patch else {
        return Ok(None);
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.as_bytes())
        .map_err(|e| e.to_string())?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointers_escape_the_key_as_rfc_6901_says() {
        let escaped = names::VELERO_BACKUP_VOLUMES
            .replace('~', "~0")
            .replace('/', "~1");
        assert_eq!(
            BACKUP_VOLUMES_POINTER,
            format!("{ANNOTATIONS_POINTER}/{escaped}")
        );
    }

    #[test]
    fn errors_carry_the_uid_for_the_log_line_when_there_is_one() {
        let req = r#""request":{"uid":"u1","kind":{"group":"","version":"v1","kind":"Pod"},"operation":"CREATE"}"#;
        let cases = [
            (
                format!(
                    r#"{{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview",{req}}}"#
                ),
                Some("u1"),
            ),
            (
                format!(r#"{{"apiVersion":"admission.k8s.io/v1","kind":"Nope",{req}}}"#),
                Some("u1"),
            ),
            (
                format!(r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview",{req}}}"#),
                Some("u1"),
            ),
            (
                r#"{"apiVersion":"admission.k8s.io/v1beta1"}"#.to_owned(),
                None,
            ),
            ("{".to_owned(), None),
        ];
        for (body, uid) in cases {
            let err = parse(body.as_bytes()).err().expect("an error");
            assert_eq!(err.uid(), uid, "{err}");
        }
    }

    #[test]
    fn a_restore_helper_patch_that_cannot_be_written_refuses_the_pod() {
        // Security review, Low: it allowed the pod unchanged and counted it converted.
        let refused = converted("u1", None);
        assert_eq!(
            refused.outcome,
            Outcome::Restore(RestoreVerdict::Unreadable)
        );
        assert!(refused.outcome.denied() && !refused.outcome.patched());
        let body: serde_json::Value = serde_json::from_slice(&refused.body).unwrap();
        assert_eq!(body["response"]["allowed"], false);
        let patched = converted("u2", Some(b"[]".to_vec()));
        assert_eq!(patched.outcome, Outcome::Restore(RestoreVerdict::Converted));
        assert!(decode_patch(&patched.body).unwrap().is_some());
    }
}
