//! Every label and annotation name the project reads or writes, in one place.
//!
//! Velero's and KubeSpawner's names are facts about those projects (SPEC §1); the
//! `velero-jupyterhub.io/*` names are ours (SPEC §2).

// --- Velero -------------------------------------------------------------------------

/// Opt-in list of pod volumes for Velero's file-system backup: `a,b`, split on `,`
/// with no trimming and no wildcards.
pub const VELERO_BACKUP_VOLUMES: &str = "backup.velero.io/backup-volumes";
/// Opt-out list of pod volumes; a volume named here is never added by us.
pub const VELERO_BACKUP_VOLUMES_EXCLUDES: &str = "backup.velero.io/backup-volumes-excludes";
/// Set by Velero on every object it re-creates in a restore, before the create call.
pub const VELERO_RESTORE_NAME: &str = "velero.io/restore-name";

// --- KubeSpawner / zero-to-jupyterhub -------------------------------------------------

/// KubeSpawner's component label (all versions) and its value for user servers.
pub const JUPYTERHUB_COMPONENT: &str = "component";
pub const SINGLEUSER_SERVER: &str = "singleuser-server";

// --- velero-jupyterhub ----------------------------------------------------------------

/// Namespace label that opts a namespace in. Nothing happens elsewhere.
pub const NAMESPACE_ENABLED: &str = "velero-jupyterhub.io/enabled";
/// Namespace annotation: comma-separated globs of the PVC names that are user data.
pub const NAMESPACE_CLAIMS: &str = "velero-jupyterhub.io/claims";
/// Pod annotation: `true` leaves the pod alone.
pub const POD_SKIP: &str = "velero-jupyterhub.io/skip";
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

#[cfg(test)]
mod tests {
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
