//! What the decisions read from a pod: the [`PodFacts`] trait, and [`PodView`], a
//! read-only view of the parts of a Pod the admission path looks at.
//!
//! Deserialized straight from the request bytes, borrowing strings where the JSON has no
//! escapes, and skipping every field we do not need: this is what keeps a decision in
//! single-digit microseconds. Every field is optional, so a pod with fields we do not
//! know still parses; the decision then says what it could not understand.

use std::borrow::{Borrow, Cow};
use std::fmt;
use std::ops::Deref;

use k8s_openapi::api::core::v1::{Container, Pod};
use serde::Deserialize;

/// A string borrowed from the input when possible (no JSON escapes), owned otherwise.
/// (serde only borrows a bare `Cow<str>` field; this also borrows inside `Option`, `Vec`
/// and map keys.)
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Str<'a>(pub Cow<'a, str>);

impl Deref for Str<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for Str<'_> {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Str<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Str<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Str<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Str(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// A JSON object of strings (labels, annotations), kept as a list: one allocation, and a
/// linear lookup over a dozen entries is faster than building a tree.
#[derive(Debug, Default)]
pub struct StrMap<'a>(pub Vec<(Str<'a>, Str<'a>)>);

impl StrMap<'_> {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| &**k == key).map(|(_, v)| &**v)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for StrMap<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = StrMap<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of strings")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(StrMap(entries))
            }
        }
        d.deserialize_map(V)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodView<'a> {
    #[serde(borrow)]
    pub api_version: Option<Str<'a>>,
    #[serde(borrow)]
    pub kind: Option<Str<'a>>,
    #[serde(borrow)]
    pub metadata: Option<MetaView<'a>>,
    #[serde(borrow)]
    pub spec: Option<PodSpecView<'a>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MetaView<'a> {
    #[serde(borrow)]
    pub name: Option<Str<'a>>,
    #[serde(borrow)]
    pub generate_name: Option<Str<'a>>,
    #[serde(borrow)]
    pub namespace: Option<Str<'a>>,
    #[serde(borrow)]
    pub labels: Option<StrMap<'a>>,
    #[serde(borrow)]
    pub annotations: Option<StrMap<'a>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpecView<'a> {
    #[serde(borrow)]
    pub containers: Option<Vec<ContainerView<'a>>>,
    #[serde(borrow)]
    pub init_containers: Option<Vec<ContainerView<'a>>>,
    #[serde(borrow)]
    pub volumes: Option<Vec<VolumeView<'a>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerView<'a> {
    #[serde(borrow)]
    pub name: Option<Str<'a>>,
    #[serde(borrow)]
    pub volume_mounts: Option<Vec<MountView<'a>>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MountView<'a> {
    #[serde(borrow)]
    pub name: Str<'a>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeView<'a> {
    #[serde(borrow)]
    pub name: Str<'a>,
    #[serde(borrow)]
    pub persistent_volume_claim: Option<PvcSourceView<'a>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PvcSourceView<'a> {
    #[serde(borrow)]
    pub claim_name: Str<'a>,
}

/// What the decisions read from a pod, whichever shape it arrives in: the borrowed
/// [`PodView`] of an admission request, or a full `k8s_openapi` [`Pod`] from a watch (the
/// reconciler's backfill). One set of rules, two sources.
pub trait PodFacts {
    fn label(&self, key: &str) -> Option<&str>;
    fn annotation(&self, key: &str) -> Option<&str>;
    /// Whether `metadata.annotations` exists as a map (absent and `null` are the same: a
    /// JSON patch must then add the whole map).
    fn has_annotations_map(&self) -> bool;
    /// `(volume name, claim name if the volume is a persistentVolumeClaim)`, in
    /// `spec.volumes` order.
    fn volumes(&self) -> impl Iterator<Item = (&str, Option<&str>)>;
    /// Whether a regular container (not an init container) mounts `volume`.
    fn mounted_by_container(&self, volume: &str) -> bool;
    /// Whether an init container mounts `volume`.
    fn mounted_by_init_container(&self, volume: &str) -> bool;
}

impl<'a> PodView<'a> {
    /// `namespace/name` (or `generateName…`) for logs and explanations.
    pub fn display_name(&self) -> String {
        let m = self.metadata.as_ref();
        let ns = m.and_then(|m| m.namespace.as_deref()).unwrap_or("");
        match (
            m.and_then(|m| m.name.as_deref()),
            m.and_then(|m| m.generate_name.as_deref()),
        ) {
            (Some(n), _) if !n.is_empty() => format!("{ns}/{n}"),
            (_, Some(g)) => format!("{ns}/{g}…"),
            _ => format!("{ns}/<unnamed>"),
        }
    }

    fn spec_list<'s, T>(&'s self, f: impl Fn(&'s PodSpecView<'a>) -> Option<&'s [T]>) -> &'s [T] {
        self.spec.as_ref().and_then(f).unwrap_or_default()
    }
}

impl PodFacts for PodView<'_> {
    fn label(&self, key: &str) -> Option<&str> {
        self.metadata.as_ref()?.labels.as_ref()?.get(key)
    }

    fn annotation(&self, key: &str) -> Option<&str> {
        self.metadata.as_ref()?.annotations.as_ref()?.get(key)
    }

    fn has_annotations_map(&self) -> bool {
        self.metadata
            .as_ref()
            .is_some_and(|m| m.annotations.is_some())
    }

    fn volumes(&self) -> impl Iterator<Item = (&str, Option<&str>)> {
        self.spec_list(|s| s.volumes.as_deref()).iter().map(|v| {
            (
                &*v.name,
                v.persistent_volume_claim.as_ref().map(|c| &*c.claim_name),
            )
        })
    }

    fn mounted_by_container(&self, volume: &str) -> bool {
        let containers = self.spec_list(|s| s.containers.as_deref());
        containers.iter().any(|c| c.mounts(volume))
    }

    fn mounted_by_init_container(&self, volume: &str) -> bool {
        let containers = self.spec_list(|s| s.init_containers.as_deref());
        containers.iter().any(|c| c.mounts(volume))
    }
}

impl ContainerView<'_> {
    fn mounts(&self, volume: &str) -> bool {
        self.volume_mounts
            .as_deref()
            .unwrap_or_default()
            .iter()
            .any(|m| &*m.name == volume)
    }
}

impl PodFacts for Pod {
    fn label(&self, key: &str) -> Option<&str> {
        self.metadata.labels.as_ref()?.get(key).map(String::as_str)
    }

    fn annotation(&self, key: &str) -> Option<&str> {
        self.metadata
            .annotations
            .as_ref()?
            .get(key)
            .map(String::as_str)
    }

    fn has_annotations_map(&self) -> bool {
        self.metadata.annotations.is_some()
    }

    fn volumes(&self) -> impl Iterator<Item = (&str, Option<&str>)> {
        let volumes = self.spec.as_ref().and_then(|s| s.volumes.as_deref());
        volumes.unwrap_or_default().iter().map(|v| {
            let claim = v.persistent_volume_claim.as_ref();
            (v.name.as_str(), claim.map(|c| c.claim_name.as_str()))
        })
    }

    fn mounted_by_container(&self, volume: &str) -> bool {
        let containers = self.spec.as_ref().map(|s| s.containers.as_slice());
        k8s_mounts(containers.unwrap_or_default(), volume)
    }

    fn mounted_by_init_container(&self, volume: &str) -> bool {
        let containers = self
            .spec
            .as_ref()
            .and_then(|s| s.init_containers.as_deref());
        k8s_mounts(containers.unwrap_or_default(), volume)
    }
}

fn k8s_mounts(containers: &[Container], volume: &str) -> bool {
    containers.iter().any(|c| {
        let mounts = c.volume_mounts.as_deref().unwrap_or_default();
        mounts.iter().any(|m| m.name == volume)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn borrows_plain_strings_and_owns_escaped_ones() {
        let json = r#"{"metadata":{"name":"jupyter-alice","annotations":{"a":"x\u0026y"}}}"#;
        let pod: PodView = serde_json::from_str(json).unwrap();
        let meta = pod.metadata.as_ref().unwrap();
        assert!(matches!(
            meta.name.as_ref().unwrap().0,
            Cow::Borrowed("jupyter-alice")
        ));
        assert_eq!(pod.annotation("a"), Some("x&y"));
    }

    #[test]
    fn nulls_and_missing_fields_are_empty() {
        let json = r#"{"metadata":{"annotations":null,"labels":null},"spec":{"volumes":null,"containers":[{"name":"c","volumeMounts":null}]}}"#;
        let pod: PodView = serde_json::from_str(json).unwrap();
        assert!(!pod.has_annotations_map());
        assert_eq!(pod.volumes().count(), 0);
        assert!(!pod.mounted_by_container("x"));
        let empty: PodView = serde_json::from_str("{}").unwrap();
        assert_eq!(empty.display_name(), "/<unnamed>");
    }
}
