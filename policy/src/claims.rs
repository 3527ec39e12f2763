//! Which PersistentVolumeClaims hold user data: a list of shell-style globs.
//!
//! The same set drives live annotation, idle helpers and status, so they
//! always agree on what a user claim is.

use std::fmt;

/// Globs such as `claim-*,home-*`, matched against a claim's name.
#[derive(Clone, Debug)]
pub struct ClaimGlobs {
    patterns: Vec<glob::Pattern>,
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClaimGlobsError {
    #[error("no claim globs given (expected e.g. `claim-*` or `claim-*,home-*`)")]
    Empty,
    #[error("claim glob {glob:?} is invalid: {reason}")]
    Invalid { glob: String, reason: String },
}

impl ClaimGlobs {
    /// Parses a comma-separated list; blanks around entries are ignored, empty entries
    /// are skipped. Any invalid glob is an error: a typo must not silently widen or
    /// narrow what is backed up.
    pub fn parse(list: &str) -> Result<Self, ClaimGlobsError> {
        let mut patterns = Vec::new();
        for glob in list.split(',').map(str::trim).filter(|g| !g.is_empty()) {
            let pattern = glob::Pattern::new(glob).map_err(|e| ClaimGlobsError::Invalid {
                glob: glob.to_owned(),
                reason: e.msg.to_owned(),
            })?;
            patterns.push(pattern);
        }
        if patterns.is_empty() {
            return Err(ClaimGlobsError::Empty);
        }
        Ok(Self { patterns })
    }

    /// For a namespace's annotation, where refusing would leave the namespace with no
    /// policy at all: keeps the valid globs and returns the invalid ones as errors.
    /// `None` when no valid glob remains (the caller falls back to its default).
    pub fn parse_lenient(list: &str) -> (Option<Self>, Vec<ClaimGlobsError>) {
        let mut patterns = Vec::new();
        let mut errors = Vec::new();
        for glob in list.split(',').map(str::trim).filter(|g| !g.is_empty()) {
            match Self::parse(glob) {
                Ok(mut one) => patterns.append(&mut one.patterns),
                Err(e) => errors.push(e),
            }
        }
        let globs = (!patterns.is_empty()).then_some(Self { patterns });
        (globs, errors)
    }

    pub fn matches(&self, claim_name: &str) -> bool {
        self.patterns.iter().any(|p| p.matches(claim_name))
    }
}

impl fmt::Display for ClaimGlobs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.patterns.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(p.as_str())?;
        }
        Ok(())
    }
}

impl std::str::FromStr for ClaimGlobs {
    type Err = ClaimGlobsError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_table() {
        let cases: &[(&str, &str, bool)] = &[
            ("claim-*", "claim-alice-smith", true),
            ("claim-*", "claim-alice-2dsmith", true),
            ("claim-*", "claim-", true),
            ("claim-*", "home-alice", false),
            ("claim-*", "xclaim-alice", false),
            ("claim-*,home-*", "home-alice", true),
            (" claim-* , home-* ", "home-alice", true),
            ("claim-?", "claim-a", true),
            ("claim-?", "claim-ab", false),
            ("claim-[ab]*", "claim-bob", true),
            ("claim-[ab]*", "claim-carol", false),
            ("shared-home", "shared-home", true),
            ("shared-home", "shared-home-2", false),
        ];
        for (globs, claim, want) in cases {
            let g = ClaimGlobs::parse(globs).unwrap();
            assert_eq!(g.matches(claim), *want, "{globs} vs {claim}");
        }
    }

    #[test]
    fn parse_errors_are_specific() {
        assert_eq!(ClaimGlobs::parse("").unwrap_err(), ClaimGlobsError::Empty);
        assert_eq!(
            ClaimGlobs::parse(" , ,").unwrap_err(),
            ClaimGlobsError::Empty
        );
        let err = ClaimGlobs::parse("claim-*,claim-[").unwrap_err();
        assert!(
            matches!(err, ClaimGlobsError::Invalid { ref glob, .. } if glob == "claim-["),
            "{err}"
        );
        assert!(err.to_string().contains("claim-["));
    }

    #[test]
    fn lenient_parse_keeps_the_valid_globs() {
        let (globs, errors) = ClaimGlobs::parse_lenient("home-*, claim-[ ,");
        assert_eq!(globs.unwrap().to_string(), "home-*");
        assert_eq!(errors.len(), 1);
        let (globs, errors) = ClaimGlobs::parse_lenient("[");
        assert!(globs.is_none());
        assert_eq!(errors.len(), 1);
        let (globs, errors) = ClaimGlobs::parse_lenient("  ");
        assert!(globs.is_none() && errors.is_empty());
    }

    #[test]
    fn displays_normalised_list() {
        assert_eq!(
            ClaimGlobs::parse(" claim-* ,, home-*").unwrap().to_string(),
            "claim-*,home-*"
        );
    }
}
