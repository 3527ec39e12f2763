//! Velero's comma-separated volume lists (`backup.velero.io/backup-volumes` and
//! `…-excludes`): split on `,` with no trimming and no wildcards, exactly as Velero reads
//! them, so that what we consider listed is what Velero will back up.

/// The entries of a list as Velero sees them (empty entries carry no name).
pub fn entries(list: &str) -> impl Iterator<Item = &str> {
    list.split(',').filter(|e| !e.is_empty())
}

pub fn contains(list: &str, name: &str) -> bool {
    entries(list).any(|e| e == name)
}

/// Appends `additions` to an existing list, keeping the existing text as it is (entries,
/// order and spelling). Trailing commas are dropped so the result is `a,b`, never `a,,b`.
pub fn append(existing: Option<&str>, additions: &[&str]) -> String {
    let base = existing.unwrap_or("").trim_end_matches(',');
    let mut out =
        String::with_capacity(base.len() + additions.iter().map(|a| a.len() + 1).sum::<usize>());
    out.push_str(base);
    for a in additions {
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(a);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let cases: &[(Option<&str>, &[&str], &str)] = &[
            (None, &["a"], "a"),
            (None, &["a", "b"], "a,b"),
            (Some(""), &["a"], "a"),
            (Some("x"), &["a"], "x,a"),
            (Some("x,"), &["a"], "x,a"),
            (Some("x, y"), &["y"], "x, y,y"),
            (Some("x"), &[], "x"),
        ];
        for (existing, add, want) in cases {
            assert_eq!(append(*existing, add), *want, "{existing:?} + {add:?}");
        }
    }

    #[test]
    fn no_trimming_like_velero() {
        assert!(contains("a,b", "b"));
        assert!(
            !contains("a, b", "b"),
            "Velero would look for a volume named ' b'"
        );
        assert!(!contains("", ""));
        assert!(!contains("a*", "ab"), "no wildcards");
    }
}
