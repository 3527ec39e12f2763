//! Every label and annotation name the project reads or writes, in one place.
//!
//! Velero's and KubeSpawner's names are facts about those projects; the
//! `velero-jupyterhub.io/*` names are ours.

// --- Velero -------------------------------------------------------------------------

/// Opt-in list of pod volumes for Velero's file-system backup: `a,b`, split on `,`
/// with no trimming and no wildcards.
pub const VELERO_BACKUP_VOLUMES: &str = "backup.velero.io/backup-volumes";
/// Opt-out list of pod volumes; a volume named here is never added by us.
pub const VELERO_BACKUP_VOLUMES_EXCLUDES: &str = "backup.velero.io/backup-volumes-excludes";
/// Set by Velero on every object it re-creates in a restore, before the create call.
pub const VELERO_RESTORE_NAME: &str = "velero.io/restore-name";
/// On a Backup a Schedule created (pkg/builder/backup_builder.go `FromSchedule`).
pub const VELERO_SCHEDULE_NAME: &str = "velero.io/schedule-name";
/// On a PodVolumeBackup: the Backup it belongs to.
pub const VELERO_BACKUP_NAME: &str = "velero.io/backup-name";
/// Label on a PodVolumeRestore: the uid of the pod whose volume it fills.
pub const VELERO_POD_UID: &str = "velero.io/pod-uid";
/// Annotation on a PodVolumeBackup: the claim of the volume it copies.
pub const VELERO_PVC_NAME: &str = "velero.io/pvc-name";
/// Label on a PodVolumeBackup: the uid of that claim.
pub const VELERO_PVC_UID: &str = "velero.io/pvc-uid";

// --- KubeSpawner / zero-to-jupyterhub -------------------------------------------------

/// KubeSpawner's component label (all versions) and its value for user servers.
pub const JUPYTERHUB_COMPONENT: &str = "component";
pub const SINGLEUSER_SERVER: &str = "singleuser-server";
/// KubeSpawner's username label, on user pods and their claims.
pub const JUPYTERHUB_USERNAME: &str = "hub.jupyter.org/username";

// --- velero-jupyterhub ----------------------------------------------------------------

/// Namespace label that opts a namespace in. Nothing happens elsewhere.
pub const NAMESPACE_ENABLED: &str = "velero-jupyterhub.io/enabled";
/// Namespace annotation: comma-separated globs of the PVC names that are user data.
pub const NAMESPACE_CLAIMS: &str = "velero-jupyterhub.io/claims";
/// Namespace annotation: a backup window is open until this time (RFC 3339), set by
/// `velero-jupyterhub backup` or by hand.
pub const NAMESPACE_WINDOW_UNTIL: &str = "velero-jupyterhub.io/backup-window-until";
/// Namespace annotation: the Backup of that window; it closes when the Backup is terminal.
pub const NAMESPACE_WINDOW_BACKUP: &str = "velero-jupyterhub.io/backup-window-backup";
/// Namespace annotation: the claims being restored there, comma-separated (the controller
/// keeps it; `restore` adds its claims before creating its Restore). A
/// ValidatingAdmissionPolicy refuses other pods that mount them (manifests/restore-guard.yaml).
pub const NAMESPACE_RESTORING_CLAIMS: &str = "velero-jupyterhub.io/restoring-claims";
/// Namespace annotation: when `restore` last listed claims in the one above (RFC 3339).
pub const NAMESPACE_RESTORING_SINCE: &str = "velero-jupyterhub.io/restoring-since";
/// Namespace annotation: the Restores `restore` listed those claims for, comma-separated.
pub const NAMESPACE_RESTORING_RESTORES: &str = "velero-jupyterhub.io/restoring-restores";
/// Pod annotation: `true` leaves the pod alone.
pub const POD_SKIP: &str = "velero-jupyterhub.io/skip";
/// Pods we create or convert: `app.kubernetes.io/managed-by=velero-jupyterhub`, and
/// `app.kubernetes.io/component` says which kind.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_US: &str = "velero-jupyterhub";
pub const COMPONENT: &str = "app.kubernetes.io/component";
pub const BACKUP_HELPER: &str = "backup-helper";
pub const RESTORE_HELPER: &str = "restore-helper";
/// Annotation on a backup helper: the claim it mounts (claim names can be longer than a
/// label value may be).
pub const HELPER_CLAIM: &str = "velero-jupyterhub.io/claim";
/// On wave Backups and the helpers of their wave: which Schedule's run, which tick (Unix
/// seconds) and which wave of it. Not `velero.io/schedule-name`: see `waves::wave_backup`.
pub const WAVE_SCHEDULE: &str = "velero-jupyterhub.io/wave-schedule";
pub const WAVE_TICK: &str = "velero-jupyterhub.io/wave-tick";
pub const WAVE_NUMBER: &str = "velero-jupyterhub.io/wave";
/// A wave Backup's label: the Schedule's own Backup of the same tick (its label form).
pub const WAVE_OF: &str = "velero-jupyterhub.io/wave-of";
/// On a wave Backup: the claims of the helpers it was made for, and those given up (not
/// Running in time), as comma-separated `namespace/claim`; a run reads them back to
/// know whom it tried.
pub const WAVE_CLAIMS: &str = "velero-jupyterhub.io/wave-claims";
pub const WAVE_GIVEN_UP: &str = "velero-jupyterhub.io/wave-given-up";
/// Default for `--claims`: KubeSpawner's `claim-{user_server}`.
pub const DEFAULT_CLAIM_GLOBS: &str = "claim-*";

// --- Kubernetes ------------------------------------------------------------------------

/// A DNS-1123 label (namespace names): 1–63 characters of `a-z`, `0-9` and `-`,
/// starting and ending with a letter or digit. Anything else from a request is refused
/// before it can reach an API URL.
pub fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    let inner = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-';
    let edge = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    (1..=63).contains(&b.len())
        && b.iter().all(inner)
        && b.first().is_some_and(edge)
        && b.last().is_some_and(edge)
}

/// The longest object name Kubernetes allows (a DNS-1123 subdomain).
pub const MAX_NAME_LEN: usize = 253;

/// A DNS-1123 subdomain (most object names): dot-separated labels, ≤ 253 characters.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= MAX_NAME_LEN && s.split('.').all(is_dns1123_label)
}

/// A label value: empty, or up to 63 characters of `A-Za-z0-9-_.` that start and end
/// with a letter or digit.
pub fn is_label_value(s: &str) -> bool {
    let b = s.as_bytes();
    let inner = |c: &u8| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.');
    b.is_empty()
        || (b.len() <= 63
            && b.iter().all(inner)
            && b.first().is_some_and(u8::is_ascii_alphanumeric)
            && b.last().is_some_and(u8::is_ascii_alphanumeric))
}

/// A label key: an optional DNS-subdomain prefix (≤ 253) and `/`, then a name that is a
/// non-empty label value.
pub fn is_label_key(s: &str) -> bool {
    let (prefix, name) = match s.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    !name.is_empty()
        && is_label_value(name)
        && prefix.is_none_or(|p| p.len() <= 253 && p.split('.').all(is_dns1123_label))
}

#[cfg(test)]
mod tests {
    #[test]
    fn label_keys_and_values() {
        for ok in ["", "a", "A.b_c-1", &"x".repeat(63)] {
            assert!(super::is_label_value(ok), "{ok:?}");
        }
        for bad in ["-a", "a-", "a b", "a/b", "ä", &"x".repeat(64)] {
            assert!(!super::is_label_value(bad), "{bad:?}");
        }
        for ok in [
            "app",
            "app.kubernetes.io/component",
            "hub.jupyter.org/username",
            "a/B_c",
        ] {
            assert!(super::is_label_key(ok), "{ok:?}");
        }
        for bad in ["", "/a", "a/", "a/b/c", "Hub.org/x", "-x", "a..b/c"] {
            assert!(!super::is_label_key(bad), "{bad:?}");
        }
    }

    #[test]
    fn dns1123_labels() {
        let long = "a".repeat(63);
        for ok in ["jhub", "a", "0", "user-ns-1", long.as_str()] {
            assert!(super::is_dns1123_label(ok), "{ok:?}");
        }
        let too_long = "a".repeat(64);
        for bad in [
            "",
            "?",
            "-a",
            "a-",
            "Jhub",
            "a.b",
            "a/b",
            "..",
            "a b",
            "jhub?watch=1",
            too_long.as_str(),
            "ä",
        ] {
            assert!(!super::is_dns1123_label(bad), "{bad:?}");
        }
    }
}
