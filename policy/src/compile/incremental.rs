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
//!   the change, and every entry with a named port the pod declares before or after.
//!   A pod peer's or a named port's own entry that the change only adds to (the pod
//!   joins it: a new pod, the usual ADD) is patched instead, its new members
//!   inserted under a new serial; one a pod leaves or changes in is dropped;
//! - a namespace added, removed or relabelled: everything (namespace selectors see
//!   every namespace's labels; a rare change);
//! - policies, nodes and ClusterNetworkPolicies: nothing. A recipe *is* the part of
//!   a policy its set is computed from, so a policy change finds the sets its new
//!   peers need under new recipes, and entries no compile asked for are dropped
//!   afterwards ([`SetCache::finish`]). ClusterNetworkPolicy tier sets are never
//!   cached: they are computed per chain each time.
//!
//! The cache also remembers which policies select each local pod ([`selected`]):
//! 1,000 selector checks per pod otherwise. A pod's entry is dropped when the pod
//! changes; every entry when a NetworkPolicy, a rejected policy, a
//! ClusterNetworkPolicy or a namespace changes. (The compiled cluster's fail-closed
//! stand-ins for rejected policies also depend on which namespaces hold pods, but
//! only in namespaces a pod is added to or removed from: a pod that did not change
//! keeps its namespace populated.)
//!
//! The result equals a full compile exactly (`tests/compile_incremental.rs` checks
//! it over random sequences of changes, on both compiled forms).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use super::intervals::AddrSet;
use crate::dataplane::{Chain, MapVerdict, SetMember};
use crate::model::{
    Cluster, ClusterNetworkPolicy, IpBlock, NamespacedName, NetworkPolicy, Pod, PodPeer, Protocol,
    Tier,
};
use crate::names::Direction;

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

/// How a set a policy chain looks up is filled (the per-policy form): what the
/// compiler needs to add it to a ruleset that lacks it.
#[derive(Debug, Clone)]
pub(crate) enum SetSpec {
    /// The pods `peer` of a policy of `namespace` selects.
    Pods { namespace: String, peer: PodPeer },
    /// A named port's (address, port) pairs.
    NamedPort { name: String, protocol: Protocol },
    /// An IPv4 ipBlock.
    Block(IpBlock),
}

/// A policy's chain of one direction (the per-policy form), as the last compile
/// built it: it is a function of the policy alone (its sets are named after the
/// policy's peers and ports, not filled from pods), so it stands while the policy
/// is unchanged; the sets' members come from the entries as ever.
#[derive(Debug, Clone)]
struct PolicyChain {
    policy: Arc<NetworkPolicy>,
    chain: Chain,
    sets: Vec<(String, SetSpec)>,
    /// The compile that last asked for it.
    used: u64,
}

#[derive(Debug, Clone)]
struct Entry {
    depends_on: Vec<Dependency>,
    members: BTreeSet<SetMember>,
    /// The compile that last asked for it.
    used: u64,
    /// Unique to this computation of the members: what [`ClassMemo`] checks its
    /// regions by.
    serial: u64,
}

/// The flat form's class partition and what it filled, as the last compile that
/// partitioned left it (`flat::Flat::fill_class_sets`). It is a function of the
/// declared class sets (their names, each the hash of its (peer, ports) pairs) and
/// of the regions their pod peers and named ports name: when both are what they
/// were (the same sets, and every region the same cache entry, by serial), the
/// partition is the same, and a new pod no peer selects costs no partition at all.
#[derive(Debug, Clone)]
pub(crate) struct ClassMemo {
    /// The declared sets, in declaration order, and the class capacity.
    pub key: (Vec<String>, u32),
    /// The serials of the region entries it was computed from, in the order the
    /// fill asked for them.
    pub serials: Vec<u64>,
    /// Each declared set's members.
    pub members: Vec<(String, BTreeSet<SetMember>)>,
    /// The class map and the class ids (one chain each).
    pub map: crate::dataplane::VerdictMap,
    pub ids: Vec<u32>,
}

/// An entry's members as the class partition reads them: a pod peer's addresses,
/// or a named port's addresses per port number.
#[derive(Debug, Clone)]
pub(crate) enum Region {
    Addrs(Arc<AddrSet>),
    Numbered(Arc<std::collections::BTreeMap<u16, Arc<AddrSet>>>),
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
    /// Entries [`SetCache::advance`] brought up to date in place before this
    /// compile: a pod peer's or a named port's set that a pod only joined.
    pub patched: usize,
    /// Policy chains (the per-policy form) taken from the previous compile because
    /// their policy did not change.
    pub chains_reused: usize,
    /// Whether the flat form took its class partition and class sets from the
    /// previous compile (no region and no declared set changed).
    pub classes_reused: bool,
}

/// Set contents kept between compiles of one node (see the module doc). Start with
/// `SetCache::default()` (the first compile is a full one); call
/// [`SetCache::advance`] with the previous and the next cluster before each compile.
#[derive(Debug, Clone, Default)]
pub struct SetCache {
    entries: HashMap<Recipe, Entry>,
    /// Which policies select each local pod, by the pod's key.
    selections: HashMap<NamespacedName, SelectedKeys>,
    /// Policy chains by the policy's namespace and name, ingress then egress
    /// (nested so a lookup borrows the policy's strings instead of building a key).
    policy_chains: HashMap<String, HashMap<String, [Option<PolicyChain>; 2]>>,
    /// The flat form's last class partition ([`ClassMemo`]).
    classes: Option<ClassMemo>,
    /// What the flat form's class partition reads an entry's members as, by the
    /// entry's serial ([`Region`]): rebuilding every region from cloned members
    /// was most of a partition that a new pod made again. Kept as long as the entry.
    regions: HashMap<u64, Region>,
    generation: u64,
    /// The next entry's serial.
    serial: u64,
    stats: CacheStats,
}

/// [`Selected`] by keys, as remembered between compiles.
#[derive(Debug, Clone)]
struct SelectedKeys {
    policies: Vec<NamespacedName>,
    admin: Vec<String>,
    baseline: Vec<String>,
    /// The flat form's map verdict of the pod, ingress then egress, once a compile
    /// made it: a function of the pod, the policies selecting it, the
    /// ClusterNetworkPolicies and its namespace's annotations, which is what drops
    /// this entry ([`SetCache::advance`]). Naming a group hashes every (peer, ports)
    /// pair of the pod's policies: a third of a flat compile, for 110 pods.
    verdicts: [Option<MapVerdict>; 2],
    /// The compile that last asked for it.
    used: u64,
}

/// The policies that select one pod, every direction: NetworkPolicies in key order,
/// each tier's ClusterNetworkPolicies in evaluation order (priority, then name).
pub(crate) struct Selected<'c> {
    policies: Vec<&'c NetworkPolicy>,
    admin: Vec<&'c ClusterNetworkPolicy>,
    baseline: Vec<&'c ClusterNetworkPolicy>,
}

impl<'c> Selected<'c> {
    fn compute(cluster: &'c Cluster, pod: &Pod) -> Self {
        Selected {
            policies: cluster
                .policies
                .values()
                .map(|p| &**p)
                .filter(|p| p.selects(pod))
                .collect(),
            admin: cluster.cluster_policies_selecting(Tier::Admin, pod),
            baseline: cluster.cluster_policies_selecting(Tier::Baseline, pod),
        }
    }

    fn keys(&self) -> SelectedKeys {
        let names = |l: &[&ClusterNetworkPolicy]| l.iter().map(|p| p.name.clone()).collect();
        SelectedKeys {
            policies: self.policies.iter().map(|p| p.key()).collect(),
            admin: names(&self.admin),
            baseline: names(&self.baseline),
            verdicts: [None, None],
            used: 0,
        }
    }

    /// `None` when a remembered policy is gone, which a correct invalidation never
    /// leaves; then the caller computes afresh.
    fn resolve(cluster: &'c Cluster, keys: &SelectedKeys) -> Option<Self> {
        let cnps = |names: &[String]| -> Option<Vec<&'c ClusterNetworkPolicy>> {
            names
                .iter()
                .map(|n| cluster.cluster_policies.get(n))
                .collect()
        };
        Some(Selected {
            policies: keys
                .policies
                .iter()
                .map(|k| cluster.policies.get(k).map(|p| &**p))
                .collect::<Option<_>>()?,
            admin: cnps(&keys.admin)?,
            baseline: cnps(&keys.baseline)?,
        })
    }

    /// [`Cluster::logs_allowed`] for the pod these are the policies of, read from
    /// them instead of checking every policy's selector again (1,000 per pod and
    /// direction at the realistic scale: most of an incremental compile's time).
    pub(crate) fn logs_allowed(&self, cluster: &Cluster, pod: &Pod, direction: Direction) -> bool {
        let ingress = direction == Direction::Ingress;
        cluster
            .namespace_log_allowed(&pod.namespace)
            .covers(ingress)
            || self
                .policies(direction)
                .iter()
                .any(|p| p.log_allowed.covers(ingress))
            || self.admin.iter().chain(&self.baseline).any(|p| {
                p.log_allowed.covers(ingress)
                    && !if ingress { &p.ingress } else { &p.egress }.is_empty()
            })
    }

    /// The NetworkPolicies that isolate the pod in `direction`.
    pub(crate) fn policies(&self, direction: Direction) -> Vec<&'c NetworkPolicy> {
        self.policies
            .iter()
            .copied()
            .filter(|p| match direction {
                Direction::Ingress => p.policy_types.ingress,
                Direction::Egress => p.policy_types.egress,
            })
            .collect()
    }

    /// The ClusterNetworkPolicies of `tier` with rules of `direction`, in order.
    pub(crate) fn tier(&self, tier: Tier, direction: Direction) -> Vec<&'c ClusterNetworkPolicy> {
        let list = match tier {
            Tier::Admin => &self.admin,
            Tier::Baseline => &self.baseline,
        };
        list.iter()
            .copied()
            .filter(|p| match direction {
                Direction::Ingress => !p.ingress.is_empty(),
                Direction::Egress => !p.egress.is_empty(),
            })
            .collect()
    }
}

/// The policies selecting `pod` (a pod of `cluster`): remembered by the cache when
/// there is one, else computed.
pub(crate) fn selected<'c>(
    cache: &mut Option<&mut SetCache>,
    cluster: &'c Cluster,
    pod: &Pod,
) -> Selected<'c> {
    let Some(cache) = cache else {
        return Selected::compute(cluster, pod);
    };
    let key = pod.key();
    let g = cache.generation;
    if let Some(keys) = cache.selections.get_mut(&key)
        && let Some(s) = Selected::resolve(cluster, keys)
    {
        keys.used = g;
        return s;
    }
    let s = Selected::compute(cluster, pod);
    let mut keys = s.keys();
    keys.used = g;
    cache.selections.insert(key, keys);
    s
}

impl SetCache {
    /// Forgets everything: the next compile is a full one.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.selections.clear();
        self.policy_chains.clear();
        self.classes = None;
        self.regions.clear();
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
        self.stats.patched = 0;
        if prev.namespaces != next.namespaces
            || prev.policies != next.policies
            || prev.rejected_policies != next.rejected_policies
            || prev.cluster_policies != next.cluster_policies
        {
            self.selections.clear();
        }
        if prev.namespaces != next.namespaces {
            self.entries.clear();
        } else if prev.pods != next.pods {
            let changed = changed_pods(prev, next);
            for (old, new) in &changed {
                for p in old.iter().chain(new) {
                    self.selections.remove(&p.key());
                }
            }
            let mut serial = self.serial;
            let mut patched = 0;
            let regions = &mut self.regions;
            self.entries.retain(|recipe, e| {
                let touched = e.depends_on.iter().any(|d| {
                    changed.iter().any(|(old, new)| {
                        old.is_some_and(|p| d.touched_by(prev, p))
                            || new.is_some_and(|p| d.touched_by(next, p))
                    })
                });
                if !touched {
                    return true;
                }
                let Some(added) = additions(recipe, e, prev, next, &changed) else {
                    return false;
                };
                let new: Vec<SetMember> = added
                    .into_iter()
                    .filter(|m| !e.members.contains(m))
                    .collect();
                if new.is_empty() {
                    return true;
                }
                patched += 1;
                let region = regions.remove(&e.serial).map(|r| patch_region(r, &new));
                e.members.extend(new);
                serial += 1;
                e.serial = serial;
                if let Some(region) = region {
                    regions.insert(serial, region);
                }
                true
            });
            self.serial = serial;
            self.stats.patched = patched;
        }
        self.stats.invalidated = before - self.entries.len();
    }

    /// Begins one compile.
    pub(crate) fn start(&mut self) {
        self.generation += 1;
        let (invalidated, patched) = (self.stats.invalidated, self.stats.patched);
        self.stats = CacheStats {
            full: self.entries.is_empty(),
            invalidated,
            patched,
            ..CacheStats::default()
        };
    }

    /// Ends one compile: entries it did not ask for (their policy is gone, or no
    /// local pod needs them any more) are dropped, so the cache holds what the
    /// ruleset holds.
    pub(crate) fn finish(&mut self) {
        let g = self.generation;
        self.entries.retain(|_, e| e.used == g);
        let live: std::collections::HashSet<u64> =
            self.entries.values().map(|e| e.serial).collect();
        self.regions.retain(|serial, _| live.contains(serial));
        self.selections.retain(|_, s| s.used == g);
        for by_name in self.policy_chains.values_mut() {
            for pair in by_name.values_mut() {
                for slot in pair.iter_mut() {
                    if slot.as_ref().is_some_and(|c| c.used != g) {
                        *slot = None;
                    }
                }
            }
            by_name.retain(|_, pair| pair.iter().any(Option::is_some));
        }
        self.policy_chains.retain(|_, by_name| !by_name.is_empty());
    }

    /// The chain `policy` had in `direction` at a previous compile, with the sets it
    /// looks up, when the policy is the same now (the same shared value, or equal).
    pub(crate) fn policy_chain(
        &mut self,
        policy: &NetworkPolicy,
        direction: Direction,
    ) -> Option<(&Chain, &[(String, SetSpec)])> {
        let g = self.generation;
        let slot = self
            .policy_chains
            .get_mut(policy.namespace.as_str())?
            .get_mut(policy.name.as_str())?[direction_slot(direction)]
        .as_mut()?;
        if !std::ptr::eq(Arc::as_ptr(&slot.policy), policy) && *slot.policy != *policy {
            return None;
        }
        slot.used = g;
        Some((&slot.chain, &slot.sets))
    }

    /// Counts a policy chain taken from the cache.
    pub(crate) fn chain_reused(&mut self) {
        self.stats.chains_reused += 1;
    }

    /// Remembers the chain just built for `policy` (`shared`: the cluster's value of
    /// it) in `direction`.
    pub(crate) fn keep_policy_chain(
        &mut self,
        shared: Arc<NetworkPolicy>,
        direction: Direction,
        chain: Chain,
        sets: Vec<(String, SetSpec)>,
    ) {
        let by_name = self
            .policy_chains
            .entry(shared.namespace.clone())
            .or_default();
        let pair = by_name.entry(shared.name.clone()).or_default();
        pair[direction_slot(direction)] = Some(PolicyChain {
            policy: shared,
            chain,
            sets,
            used: self.generation,
        });
    }

    /// The members of the set made by `recipe`: the cached ones, or `compute`'s,
    /// remembered with what they depend on.
    pub(crate) fn members(
        &mut self,
        recipe: Recipe,
        depends_on: impl FnOnce() -> Vec<Dependency>,
        compute: impl FnOnce() -> BTreeSet<SetMember>,
    ) -> BTreeSet<SetMember> {
        self.members_serial(recipe, depends_on, compute).0
    }

    /// [`SetCache::members`], with the entry's serial.
    pub(crate) fn members_serial(
        &mut self,
        recipe: Recipe,
        depends_on: impl FnOnce() -> Vec<Dependency>,
        compute: impl FnOnce() -> BTreeSet<SetMember>,
    ) -> (BTreeSet<SetMember>, u64) {
        let g = self.generation;
        if let Some(e) = self.entries.get_mut(&recipe) {
            e.used = g;
            self.stats.reused += 1;
            return (e.members.clone(), e.serial);
        }
        self.stats.computed += 1;
        let members = compute();
        self.serial += 1;
        self.entries.insert(
            recipe,
            Entry {
                depends_on: depends_on(),
                members: members.clone(),
                used: g,
                serial: self.serial,
            },
        );
        (members, self.serial)
    }

    /// The serial of the entry made by `recipe`, marked as asked for by this
    /// compile; `None` when there is none (it must be computed).
    pub(crate) fn serial(&mut self, recipe: &Recipe) -> Option<u64> {
        let g = self.generation;
        let e = self.entries.get_mut(recipe)?;
        e.used = g;
        Some(e.serial)
    }

    /// The flat form's map verdict of the pod `key` in `direction`, as an earlier
    /// compile made it, when nothing it depends on changed since (see
    /// [`SelectedKeys::verdicts`]); marks the pod's entry as asked for.
    pub(crate) fn group_verdict(
        &mut self,
        key: &NamespacedName,
        direction: Direction,
    ) -> Option<MapVerdict> {
        let g = self.generation;
        let keys = self.selections.get_mut(key)?;
        let verdict = keys.verdicts[direction_slot(direction)].clone()?;
        keys.used = g;
        Some(verdict)
    }

    /// Remembers the pod `key`'s map verdict in `direction` (the pod's selections
    /// entry must be there: the verdict was made from it).
    pub(crate) fn keep_group_verdict(
        &mut self,
        key: &NamespacedName,
        direction: Direction,
        verdict: MapVerdict,
    ) {
        if let Some(keys) = self.selections.get_mut(key) {
            keys.verdicts[direction_slot(direction)] = Some(verdict);
        }
    }

    /// The region kept for the entry made by `recipe`, with its serial, counted as
    /// reused and marked as asked for; `None` when the entry or its region is not
    /// there (then the caller takes the members and keeps the region it builds).
    pub(crate) fn region(&mut self, recipe: &Recipe) -> Option<(Region, u64)> {
        let g = self.generation;
        let e = self.entries.get_mut(recipe)?;
        let region = self.regions.get(&e.serial)?.clone();
        e.used = g;
        self.stats.reused += 1;
        Some((region, e.serial))
    }

    /// Keeps the region built from the members of the entry with `serial`.
    pub(crate) fn keep_region(&mut self, serial: u64, region: Region) {
        self.regions.insert(serial, region);
    }

    /// The last class partition, when it was made from the declared sets `key`.
    pub(crate) fn class_memo(&self, key: &(Vec<String>, u32)) -> Option<&ClassMemo> {
        self.classes.as_ref().filter(|m| m.key == *key)
    }

    /// Counts the class partition taken from the memo, with its `regions` entries.
    pub(crate) fn class_memo_reused(&mut self, regions: usize) {
        self.stats.classes_reused = true;
        self.stats.reused += regions;
    }

    /// Remembers the class partition just made.
    pub(crate) fn keep_class_memo(&mut self, memo: ClassMemo) {
        self.classes = Some(memo);
    }
}

fn direction_slot(direction: Direction) -> usize {
    match direction {
        Direction::Ingress => 0,
        Direction::Egress => 1,
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

/// [`through`], with the serial of the cache entry (`None` without a cache).
pub(crate) fn through_serial(
    cache: &mut Option<&mut SetCache>,
    recipe: impl FnOnce() -> (Recipe, Vec<Dependency>),
    compute: impl FnOnce() -> BTreeSet<SetMember>,
) -> (BTreeSet<SetMember>, Option<u64>) {
    match cache {
        Some(c) => {
            let (recipe, depends_on) = recipe();
            let (members, serial) = c.members_serial(recipe, || depends_on, compute);
            (members, Some(serial))
        }
        None => (compute(), None),
    }
}

/// The members a pod peer's or a named port's entry gains from `changed`, when
/// that is all that happens to it: every changed pod either joins the set (it did
/// not count before and does now) or counts the same before and after. `None` when a
/// pod leaves or changes what it adds (the entry must be computed again), and for
/// every other kind of entry. The full compile computes the same members: the
/// pods the peer selects (or that declare the port), each with its addresses.
fn additions(
    recipe: &Recipe,
    entry: &Entry,
    prev: &Cluster,
    next: &Cluster,
    changed: &[(Option<&Pod>, Option<&Pod>)],
) -> Option<Vec<SetMember>> {
    if entry.depends_on.len() != 1 {
        return None;
    }
    if matches!(recipe, Recipe::Flat { .. }) {
        return None;
    }
    let of = |c: &Cluster, p: &Pod| contributed(recipe, c, p);
    let mut added = Vec::new();
    for (old, new) in changed {
        let before = old.map(|p| of(prev, p)).unwrap_or_default();
        let after = new.map(|p| of(next, p)).unwrap_or_default();
        if before == after {
            continue;
        }
        if !before.is_empty() {
            return None;
        }
        added.extend(after);
    }
    Some(added)
}

/// What `pod` puts in the set of a pod peer's or a named port's `recipe` (nothing
/// for a flat-form recipe): what the full compile's walk takes from it.
fn contributed(recipe: &Recipe, cluster: &Cluster, pod: &Pod) -> BTreeSet<SetMember> {
    let v4 = || pod.ips.iter().filter_map(super::members::v4);
    match recipe {
        Recipe::PodPeer { namespace, peer } if cluster.pod_peer_matches(namespace, peer, pod) => {
            v4().map(SetMember::Ip).collect()
        }
        Recipe::NamedPort { name, protocol } if !pod.host_network => pod
            .resolve_named_port(name, *protocol)
            .into_iter()
            .flat_map(|port| {
                v4().map(move |ip| SetMember::IpPort {
                    ip,
                    protocol: *protocol,
                    port,
                })
            })
            .collect(),
        _ => BTreeSet::new(),
    }
}

/// `region` with the members `added` (addresses, or (address, port) pairs).
fn patch_region(region: Region, added: &[SetMember]) -> Region {
    match region {
        Region::Addrs(addrs) => {
            let mut addrs = Arc::unwrap_or_clone(addrs);
            for m in added {
                if let SetMember::Ip(ip) = m {
                    addrs.insert(u32::from(*ip), u32::from(*ip));
                }
            }
            Region::Addrs(Arc::new(addrs))
        }
        Region::Numbered(numbers) => {
            let mut numbers = Arc::unwrap_or_clone(numbers);
            for m in added {
                if let SetMember::IpPort { ip, port, .. } = m {
                    let set = numbers.entry(*port).or_default();
                    Arc::make_mut(set).insert(u32::from(*ip), u32::from(*ip));
                }
            }
            Region::Numbered(Arc::new(numbers))
        }
    }
}

/// The pods that differ between two clusters, as (before, after); `None` where the
/// pod does not exist. One merge walk over both key-ordered maps.
pub fn changed_pods<'a>(
    prev: &'a Cluster,
    next: &'a Cluster,
) -> Vec<(Option<&'a Pod>, Option<&'a Pod>)> {
    let mut out = Vec::new();
    let mut a = prev.pods.iter().map(|(k, p)| (k, &**p)).peekable();
    let mut b = next.pods.iter().map(|(k, p)| (k, &**p)).peekable();
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
                    // Two snapshots share the pods that did not change.
                    if !std::ptr::eq(*p, *q) && p != q {
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
