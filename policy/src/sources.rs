//! The cluster made from many sources (the files of a manifests directory), kept up
//! to date one source at a time: replacing a source re-applies only the objects whose
//! keys it held before or holds now, instead of converting and adding every object
//! of every source again (10,000 pods for one new pod).
//!
//! The result is the cluster [`Parsed::add_to`] would build from every source's
//! objects in source order: each object touches only its own key's entries
//! ([`Object::add_to`]), so a key's final state depends only on the objects with that
//! key, replayed in order.

use std::collections::{BTreeMap, BTreeSet};

use crate::manifest::{Object, Parsed};
use crate::model::{Cluster, NamespacedName};

/// The identity an object replaces another by.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    Namespace(String),
    Pod(NamespacedName),
    /// A Node and its labels.
    Node(String),
    /// A NetworkPolicy, good or rejected.
    Policy(NamespacedName),
    /// A ClusterNetworkPolicy, good or rejected.
    ClusterPolicy(String),
}

fn key(o: &Object) -> Key {
    match o {
        Object::Namespace(n) => Key::Namespace(n.name.clone()),
        Object::Pod(p) => Key::Pod(p.key()),
        Object::Node(n) => Key::Node(n.name.clone()),
        Object::NodeLabels(n, _) => Key::Node(n.clone()),
        Object::NetworkPolicy(p) => Key::Policy(p.key()),
        Object::RejectedPolicy(k, _) if k.is_cluster_scoped() => Key::ClusterPolicy(k.name.clone()),
        Object::RejectedPolicy(k, _) => Key::Policy(k.clone()),
        Object::ClusterNetworkPolicy(p) => Key::ClusterPolicy(p.name.clone()),
    }
}

/// Removes everything `key` put in the cluster.
fn remove(cluster: &mut Cluster, key: &Key) {
    match key {
        Key::Namespace(n) => {
            cluster.namespaces.remove(n);
        }
        Key::Pod(k) => {
            cluster.pods.remove(k);
        }
        Key::Node(n) => {
            cluster.nodes.remove(n);
            cluster.node_labels.remove(n);
        }
        Key::Policy(k) => {
            cluster.policies.remove(k);
            cluster.rejected_policies.remove(k);
        }
        Key::ClusterPolicy(n) => {
            cluster.cluster_policies.remove(n);
            cluster
                .rejected_policies
                .remove(&NamespacedName::cluster_scoped(n));
        }
    }
}

/// Sources' converted objects and the cluster they make (see the module doc). `S`
/// names a source and orders them (a file path).
#[derive(Debug, Clone)]
pub struct Sources<S> {
    sources: BTreeMap<S, Parsed>,
    /// Which sources hold an object of each key.
    holders: BTreeMap<Key, BTreeSet<S>>,
    cluster: Cluster,
}

impl<S> Default for Sources<S> {
    fn default() -> Self {
        Sources {
            sources: BTreeMap::new(),
            holders: BTreeMap::new(),
            cluster: Cluster::default(),
        }
    }
}

impl<S: Ord + Clone> Sources<S> {
    /// The cluster every source's objects make, in source order.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// The converted objects of one source.
    pub fn get(&self, source: &S) -> Option<&Parsed> {
        self.sources.get(source)
    }

    /// Every source, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&S, &Parsed)> {
        self.sources.iter()
    }

    /// Sets what `source` holds (a new or changed file); returns whether the
    /// cluster changed.
    pub fn set(&mut self, source: S, parsed: Parsed) -> bool {
        let mut touched = self.forget(&source);
        for o in &parsed.objects {
            let k = key(o);
            self.holders
                .entry(k.clone())
                .or_default()
                .insert(source.clone());
            touched.insert(k);
        }
        self.sources.insert(source, parsed);
        self.replay(touched)
    }

    /// Drops `source` (a deleted file); returns whether the cluster changed.
    pub fn remove(&mut self, source: &S) -> bool {
        let touched = self.forget(source);
        self.sources.remove(source);
        self.replay(touched)
    }

    /// Unlists `source` as a holder of its keys; returns those keys.
    fn forget(&mut self, source: &S) -> BTreeSet<Key> {
        let mut touched = BTreeSet::new();
        for o in self
            .sources
            .get(source)
            .map(|p| &p.objects[..])
            .unwrap_or_default()
        {
            let k = key(o);
            if let Some(h) = self.holders.get_mut(&k) {
                h.remove(source);
                if h.is_empty() {
                    self.holders.remove(&k);
                }
            }
            touched.insert(k);
        }
        touched
    }

    /// Rebuilds each touched key from its holders' objects, in source order.
    fn replay(&mut self, touched: BTreeSet<Key>) -> bool {
        let mut changed = false;
        for k in touched {
            let before = self.snapshot_of(&k);
            remove(&mut self.cluster, &k);
            for s in self.holders.get(&k).into_iter().flatten() {
                for o in self.sources[s].objects.iter().filter(|o| key(o) == k) {
                    o.add_to(&mut self.cluster);
                }
            }
            changed |= before != self.snapshot_of(&k);
        }
        changed
    }

    /// What the cluster holds for `key`, to tell whether a replay changed it.
    fn snapshot_of(&self, key: &Key) -> Cluster {
        let mut out = Cluster::default();
        let c = &self.cluster;
        match key {
            Key::Namespace(n) => {
                if let Some(v) = c.namespaces.get(n) {
                    out.namespaces.insert(n.clone(), v.clone());
                }
            }
            Key::Pod(k) => {
                if let Some(v) = c.pods.get(k) {
                    out.pods.insert(k.clone(), v.clone());
                }
            }
            Key::Node(n) => {
                if let Some(v) = c.nodes.get(n) {
                    out.nodes.insert(n.clone(), v.clone());
                }
                if let Some(v) = c.node_labels.get(n) {
                    out.node_labels.insert(n.clone(), v.clone());
                }
            }
            Key::Policy(k) => {
                if let Some(v) = c.policies.get(k) {
                    out.policies.insert(k.clone(), v.clone());
                }
                if let Some(v) = c.rejected_policies.get(k) {
                    out.rejected_policies.insert(k.clone(), v.clone());
                }
            }
            Key::ClusterPolicy(n) => {
                if let Some(v) = c.cluster_policies.get(n) {
                    out.cluster_policies.insert(n.clone(), v.clone());
                }
                let k = NamespacedName::cluster_scoped(n);
                if let Some(v) = c.rejected_policies.get(&k) {
                    out.rejected_policies.insert(k, v.clone());
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{convert_objects, split_documents};
    use proptest::prelude::*;

    /// Tiny sources over a few keys, so keys repeat across sources and within one.
    fn arb_source() -> impl Strategy<Value = String> {
        let doc = prop_oneof![
            (0..3u8, 0..3u8, 0..3u8).prop_map(|(n, ns, app)| format!(
                "{{\"apiVersion\":\"v1\",\"kind\":\"Pod\",\"metadata\":{{\"name\":\"p{n}\",\"namespace\":\"ns{ns}\",\"labels\":{{\"app\":\"a{app}\"}}}},\"status\":{{\"podIP\":\"10.0.0.{app}\"}}}}"
            )),
            (0..2u8, 0..3u8).prop_map(|(ns, t)| format!(
                "{{\"apiVersion\":\"v1\",\"kind\":\"Namespace\",\"metadata\":{{\"name\":\"ns{ns}\",\"labels\":{{\"t\":\"{t}\"}}}}}}"
            )),
            (0..2u8, any::<bool>()).prop_map(|(n, bad)| format!(
                "{{\"apiVersion\":\"networking.k8s.io/v1\",\"kind\":\"NetworkPolicy\",\"metadata\":{{\"name\":\"np{n}\",\"namespace\":\"ns0\"}},\"spec\":{{\"podSelector\":{{}}{}}}}}",
                if bad { ",\"ingress\":[{\"from\":[{}]}]" } else { "" }
            )),
            (0..2u8, any::<bool>()).prop_map(|(n, labelled)| format!(
                "{{\"apiVersion\":\"v1\",\"kind\":\"Node\",\"metadata\":{{\"name\":\"n{n}\"{}}}}}",
                if labelled { ",\"labels\":{\"z\":\"a\"}" } else { "" }
            )),
        ];
        prop::collection::vec(doc, 0..4).prop_map(|docs| docs.join("\n"))
    }

    fn parsed(name: &str, text: &str) -> Parsed {
        convert_objects(&split_documents(name, text).unwrap())
    }

    proptest! {
        #[test]
        fn replacing_sources_one_at_a_time_builds_what_converting_all_of_them_builds(
            steps in prop::collection::vec((0..4usize, prop::option::of(arb_source())), 1..16),
        ) {
            let mut incremental: Sources<usize> = Sources::default();
            let mut texts: BTreeMap<usize, String> = BTreeMap::new();
            for (source, text) in steps {
                let before = incremental.cluster().clone();
                let changed = match &text {
                    Some(t) => {
                        texts.insert(source, t.clone());
                        incremental.set(source, parsed("s", t))
                    }
                    None => {
                        texts.remove(&source);
                        incremental.remove(&source)
                    }
                };
                let mut full = Cluster::default();
                for t in texts.values() {
                    parsed("s", t).add_to(&mut full);
                }
                prop_assert_eq!(incremental.cluster(), &full);
                prop_assert_eq!(changed, &before != incremental.cluster());
            }
        }
    }
}
