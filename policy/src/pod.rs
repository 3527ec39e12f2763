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
    pub containers: Option<Capped<ContainerView<'a>, { PodLimits::CONTAINERS }>>,
    #[serde(borrow)]
    pub init_containers: Option<Capped<ContainerView<'a>, { PodLimits::CONTAINERS }>>,
    #[serde(borrow)]
    pub volumes: Option<Capped<VolumeView<'a>, { PodLimits::VOLUMES }>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerView<'a> {
    #[serde(borrow)]
    pub name: Option<Str<'a>>,
    #[serde(borrow)]
    pub volume_mounts: Option<Capped<MountView<'a>, { PodLimits::MOUNTS }>>,
}

/// The most a pod may hold for the webhook to decide on it. Kubernetes sets no count
/// (only the size: an object is at most 1.5 MiB in etcd, a request 3 MiB), and real pods
/// are far below these: a z2jh user server has a handful of volumes and one or two
/// containers; pods with sidecar meshes and many mounts have tens. The limits are there
/// so that a crafted review cannot make a decision, or the restore path's full read of a
/// pod, cost more than a bounded amount of time and memory.
pub struct PodLimits;

impl PodLimits {
    /// `spec.volumes`.
    pub const VOLUMES: usize = 1024;
    /// JSON values (objects, arrays, strings, numbers…) in the request of a pod a Velero
    /// restore re-creates, which the restore path reads whole: a z2jh user server has
    /// about 300.
    pub const RESTORED_POD_VALUES: usize = 20_000;
    /// `spec.containers` and `spec.initContainers` together.
    pub const CONTAINERS: usize = 256;
    /// `volumeMounts` of every container and init container together.
    pub const MOUNTS: usize = 4096;
}

/// A JSON array of which at most `N` items are kept; the rest are read past (not built)
/// and only counted, so a crafted array costs time linear in its bytes and no memory.
#[derive(Debug)]
pub struct Capped<T, const N: usize> {
    items: Vec<T>,
    /// How many items the array had.
    len: usize,
}

impl<T, const N: usize> Capped<T, N> {
    /// How many items the JSON array had (kept or not).
    pub fn json_len(&self) -> usize {
        self.len
    }
}

impl<T, const N: usize> Default for Capped<T, N> {
    fn default() -> Self {
        Self {
            items: Vec::new(),
            len: 0,
        }
    }
}

impl<T, const N: usize> Deref for Capped<T, N> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.items
    }
}

impl<'de, T: Deserialize<'de>, const N: usize> Deserialize<'de> for Capped<T, N> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T, const N: usize>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>, const N: usize> serde::de::Visitor<'de> for V<T, N> {
            type Value = Capped<T, N>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(4).min(N));
                let mut len = 0;
                loop {
                    if items.len() < N {
                        match seq.next_element()? {
                            Some(item) => items.push(item),
                            None => break,
                        }
                    } else if seq.next_element::<serde::de::IgnoredAny>()?.is_none() {
                        break;
                    }
                    len += 1;
                }
                Ok(Capped { items, len })
            }
        }
        d.deserialize_seq(V::<T, N>(std::marker::PhantomData))
    }
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
    /// The names of the volumes regular containers (not init containers) mount, with
    /// repeats.
    fn container_mounts(&self) -> impl Iterator<Item = &str>;
    /// The names of the volumes init containers mount, with repeats.
    fn init_container_mounts(&self) -> impl Iterator<Item = &str>;

    /// Whether a regular container mounts `volume` (one look; a decision over every
    /// volume builds a [`NameSet`] of [`Self::container_mounts`] instead).
    fn mounted_by_container(&self, volume: &str) -> bool {
        self.container_mounts().any(|m| m == volume)
    }
    /// Whether an init container mounts `volume`.
    fn mounted_by_init_container(&self, volume: &str) -> bool {
        self.init_container_mounts().any(|m| m == volume)
    }
}

/// Names to look up many times: sorted once, each look-up a binary search, so that a
/// decision over every volume of a pod stays O(n log n) however many there are.
#[derive(Debug, Default)]
pub struct NameSet<'a>(Vec<&'a str>);

impl<'a> NameSet<'a> {
    pub fn contains(&self, name: &str) -> bool {
        self.0.binary_search(&name).is_ok()
    }
}

impl<'a> FromIterator<&'a str> for NameSet<'a> {
    fn from_iter<I: IntoIterator<Item = &'a str>>(iter: I) -> Self {
        let mut names: Vec<&str> = iter.into_iter().collect();
        names.sort_unstable();
        names.dedup();
        Self(names)
    }
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

    /// Why the pod is beyond [`PodLimits`], if it is: no decision is made on it.
    pub fn over_limits(&self) -> Option<String> {
        let Some(spec) = &self.spec else {
            return None;
        };
        let len = |list: &Option<Capped<ContainerView, { PodLimits::CONTAINERS }>>| {
            list.as_ref().map_or(0, Capped::json_len)
        };
        let volumes = spec.volumes.as_ref().map_or(0, Capped::json_len);
        let containers = len(&spec.containers) + len(&spec.init_containers);
        let all = spec.containers.iter().chain(&spec.init_containers);
        // Containers past the cap were not kept: their mounts are not counted, but then
        // the container count alone is over.
        let mounts: usize = all
            .flat_map(|list| list.iter())
            .map(|c| c.volume_mounts.as_ref().map_or(0, Capped::json_len))
            .sum();
        let over = [
            (volumes, PodLimits::VOLUMES, "volumes"),
            (
                containers,
                PodLimits::CONTAINERS,
                "containers and init containers",
            ),
            (mounts, PodLimits::MOUNTS, "volume mounts"),
        ];
        let why: Vec<String> = over
            .iter()
            .filter(|(n, limit, _)| n > limit)
            .map(|(n, limit, what)| format!("{n} {what} (the limit is {limit})"))
            .collect();
        (!why.is_empty()).then(|| why.join(", "))
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

    fn container_mounts(&self) -> impl Iterator<Item = &str> {
        view_mounts(self.spec_list(|s| s.containers.as_deref()))
    }

    fn init_container_mounts(&self) -> impl Iterator<Item = &str> {
        view_mounts(self.spec_list(|s| s.init_containers.as_deref()))
    }
}

fn view_mounts<'s>(containers: &'s [ContainerView<'_>]) -> impl Iterator<Item = &'s str> {
    containers
        .iter()
        .flat_map(|c| c.volume_mounts.as_deref().unwrap_or_default())
        .map(|m| &*m.name)
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

    fn container_mounts(&self) -> impl Iterator<Item = &str> {
        let containers = self.spec.as_ref().map(|s| s.containers.as_slice());
        k8s_mounts(containers.unwrap_or_default())
    }

    fn init_container_mounts(&self) -> impl Iterator<Item = &str> {
        let containers = self
            .spec
            .as_ref()
            .and_then(|s| s.init_containers.as_deref());
        k8s_mounts(containers.unwrap_or_default())
    }
}

fn k8s_mounts(containers: &[Container]) -> impl Iterator<Item = &str> {
    containers
        .iter()
        .flat_map(|c| c.volume_mounts.as_deref().unwrap_or_default())
        .map(|m| m.name.as_str())
}

/// Counts the JSON values in `json` (each object, array, string, number, bool and null),
/// reading past them without building anything, and stops with an error once there are
/// more than `limit`. Linear in the bytes; nesting is bounded by serde_json's own limit.
pub fn count_json_values(json: &str, limit: usize) -> Result<usize, String> {
    use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};

    struct Count<'c> {
        seen: &'c mut usize,
        limit: usize,
    }
    impl Count<'_> {
        fn one<E: serde::de::Error>(&mut self) -> Result<(), E> {
            *self.seen += 1;
            match *self.seen > self.limit {
                true => Err(E::custom(format!(
                    "more than {} JSON values (the limit for a pod read whole)",
                    self.limit
                ))),
                false => Ok(()),
            }
        }
        fn again(&mut self) -> Count<'_> {
            Count {
                seen: self.seen,
                limit: self.limit,
            }
        }
    }
    impl<'de> DeserializeSeed<'de> for Count<'_> {
        type Value = ();
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }
    impl<'de> Visitor<'de> for Count<'_> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_bool<E: serde::de::Error>(mut self, _: bool) -> Result<(), E> {
            self.one()
        }
        fn visit_i64<E: serde::de::Error>(mut self, _: i64) -> Result<(), E> {
            self.one()
        }
        fn visit_u64<E: serde::de::Error>(mut self, _: u64) -> Result<(), E> {
            self.one()
        }
        fn visit_f64<E: serde::de::Error>(mut self, _: f64) -> Result<(), E> {
            self.one()
        }
        fn visit_str<E: serde::de::Error>(mut self, _: &str) -> Result<(), E> {
            self.one()
        }
        fn visit_unit<E: serde::de::Error>(mut self) -> Result<(), E> {
            self.one()
        }
        fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
            self.one()?;
            while seq.next_element_seed(self.again())?.is_some() {}
            Ok(())
        }
        fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
            self.one()?;
            while map.next_key::<serde::de::IgnoredAny>()?.is_some() {
                map.next_value_seed(self.again())?;
            }
            Ok(())
        }
    }
    let mut seen = 0;
    let mut de = serde_json::Deserializer::from_str(json);
    Count {
        seen: &mut seen,
        limit,
    }
    .deserialize(&mut de)
    .and_then(|()| de.end())
    .map_err(|e| e.to_string())?;
    Ok(seen)
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
