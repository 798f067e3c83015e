//! Incremental compile: set contents kept between compiles, so a pod coming, going
//! or changing labels recomputes only the sets it can be in.
//!
//! Nearly all of a compile's work is filling sets: every pod peer's addresses
//! (10,000 pods scanned per peer), every named port's (address, port) pairs, and
//! on the flat form the interval arithmetic merging them per group. The chains,
//! the dispatch rules and the verdict maps are a walk over the local pods and the
//! policies, a small fraction of it. So a [`SetCache`] keeps each set's members
//! keyed by what they are computed from (its *recipe*: the pod peer and the
//! policy's namespace, the named port, or the flat form's list of (peer, ports)
//! pairs), not by the set's name, and the compilers take a set from it instead of
//! computing it. The structure is recomputed every time, by the same code as a
//! full compile, so it cannot drift from it.
//!
//! Between two compiles, [`SetCache::advance`] compares the previous cluster with
//! the next one and drops exactly the entries whose contents may differ:
//!
//! - a pod added, removed or changed (labels, addresses, ports, node,
//!   hostNetwork): every entry with a pod peer that selects the pod before or after
//!   the change, and every entry with a named port the pod declares before or after;
//! - a namespace added, removed or relabelled: everything (namespace selectors see
//!   every namespace's labels; a rare change);
//! - policies, nodes and ClusterNetworkPolicies: nothing. A recipe *is* the part of
//!   a policy its set is computed from, so a policy change finds the sets its new
//!   peers need under new recipes, and entries no compile asked for are dropped
//!   afterwards ([`SetCache::finish`]). ClusterNetworkPolicy tier sets are never
//!   cached: they are computed per chain each time.
//!
//! The result equals a full compile exactly (`tests/compile_incremental.rs` checks
//! it over random sequences of changes, on both compiled forms).

use std::collections::{BTreeSet, HashMap};

use crate::dataplane::SetMember;
use crate::model::{Cluster, Pod, PodPeer, Protocol};

/// What a set's contents are computed from, besides the pods.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Recipe {
    /// The addresses of the pods `peer` (written in a policy of `namespace`) selects.
    PodPeer { namespace: String, peer: PodPeer },
    /// Every pod's (address, port) for a named port.
    NamedPort { name: String, protocol: Protocol },
    /// A flat-form set: the canonical text of its (peer, ports) pairs, and whether it
    /// is the address set (pairs on every port) or the tuple set.
    Flat { any: bool, pairs: String },
}

/// What makes a cached entry stale: a pod this pod peer selects, or a pod declaring
/// this named port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Dependency {
    PodPeer { namespace: String, peer: PodPeer },
    NamedPort { name: String, protocol: Protocol },
}

impl Dependency {
    fn touched_by(&self, cluster: &Cluster, pod: &Pod) -> bool {
        match self {
            Dependency::PodPeer { namespace, peer } => {
                cluster.pod_peer_matches(namespace, peer, pod)
            }
            Dependency::NamedPort { name, protocol } => {
                !pod.host_network && !pod.resolve_named_port(name, *protocol).is_empty()
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    depends_on: Vec<Dependency>,
    members: BTreeSet<SetMember>,
    /// The compile that last asked for it.
    used: u64,
}

/// How the last compile went: whether the cache was empty (a full compile), and how
/// many sets it took from the cache or computed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub full: bool,
    pub reused: usize,
    pub computed: usize,
    /// Entries [`SetCache::advance`] dropped before this compile.
    pub invalidated: usize,
}

/// Set contents kept between compiles of one node (see the module doc). Start with
/// `SetCache::default()` (the first compile is a full one); call
/// [`SetCache::advance`] with the previous and the next cluster before each compile.
#[derive(Debug, Clone, Default)]
pub struct SetCache {
    entries: HashMap<Recipe, Entry>,
    generation: u64,
    stats: CacheStats,
}

impl SetCache {
    /// Forgets everything: the next compile is a full one.
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// Whether the next compile starts from nothing.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How the last compile went.
    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Drops the entries that `next` may fill differently from `prev` (the cluster
    /// the cache was last filled from). Call before compiling `next`.
    pub fn advance(&mut self, prev: &Cluster, next: &Cluster) {
        let before = self.entries.len();
        if prev.namespaces != next.namespaces {
            self.entries.clear();
        } else if prev.pods != next.pods {
            let changed = changed_pods(prev, next);
            self.entries.retain(|_, e| {
                !e.depends_on.iter().any(|d| {
                    changed.iter().any(|(old, new)| {
                        old.is_some_and(|p| d.touched_by(prev, p))
                            || new.is_some_and(|p| d.touched_by(next, p))
                    })
                })
            });
        }
        self.stats.invalidated = before - self.entries.len();
    }

    /// Begins one compile.
    pub(crate) fn start(&mut self) {
        self.generation += 1;
        let invalidated = self.stats.invalidated;
        self.stats = CacheStats {
            full: self.entries.is_empty(),
            invalidated,
            ..CacheStats::default()
        };
    }

    /// Ends one compile: entries it did not ask for (their policy is gone, or no
    /// local pod needs them any more) are dropped, so the cache holds what the
    /// ruleset holds.
    pub(crate) fn finish(&mut self) {
        let g = self.generation;
        self.entries.retain(|_, e| e.used == g);
    }

    /// The members of the set made by `recipe`: the cached ones, or `compute`'s,
    /// remembered with what they depend on.
    pub(crate) fn members(
        &mut self,
        recipe: Recipe,
        depends_on: impl FnOnce() -> Vec<Dependency>,
        compute: impl FnOnce() -> BTreeSet<SetMember>,
    ) -> BTreeSet<SetMember> {
        let g = self.generation;
        if let Some(e) = self.entries.get_mut(&recipe) {
            e.used = g;
            self.stats.reused += 1;
            return e.members.clone();
        }
        self.stats.computed += 1;
        let members = compute();
        self.entries.insert(
            recipe,
            Entry {
                depends_on: depends_on(),
                members: members.clone(),
                used: g,
            },
        );
        members
    }
}

/// `members` through the cache when there is one (an incremental compile), else
/// computed (a plain full compile, which keeps nothing).
pub(crate) fn through(
    cache: &mut Option<&mut SetCache>,
    recipe: impl FnOnce() -> (Recipe, Vec<Dependency>),
    compute: impl FnOnce() -> BTreeSet<SetMember>,
) -> BTreeSet<SetMember> {
    match cache {
        Some(c) => {
            let (recipe, depends_on) = recipe();
            c.members(recipe, || depends_on, compute)
        }
        None => compute(),
    }
}

/// The pods that differ between two clusters, as (before, after); `None` where the
/// pod does not exist. One merge walk over both key-ordered maps.
fn changed_pods<'a>(
    prev: &'a Cluster,
    next: &'a Cluster,
) -> Vec<(Option<&'a Pod>, Option<&'a Pod>)> {
    let mut out = Vec::new();
    let mut a = prev.pods.iter().peekable();
    let mut b = next.pods.iter().peekable();
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some((_, p)), None) => {
                out.push((Some(*p), None));
                a.next();
            }
            (None, Some((_, q))) => {
                out.push((None, Some(*q)));
                b.next();
            }
            (Some((ka, p)), Some((kb, q))) => match ka.cmp(kb) {
                std::cmp::Ordering::Less => {
                    out.push((Some(*p), None));
                    a.next();
                }
                std::cmp::Ordering::Greater => {
                    out.push((None, Some(*q)));
                    b.next();
                }
                std::cmp::Ordering::Equal => {
                    if p != q {
                        out.push((Some(*p), Some(*q)));
                    }
                    a.next();
                    b.next();
                }
            },
        }
    }
    out
}
