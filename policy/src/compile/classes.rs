//! Address classes for the flat form: the node's IPv4 addresses partitioned by what
//! its policies can tell apart, so a group's sets name classes instead of addresses.
//!
//! Every peer of a NetworkPolicy group names a *region* of addresses (the pods a pod
//! selector picks, an ipBlock minus its excepts, the pods declaring a named port with
//! one number). Two addresses in exactly the same regions are treated alike by every
//! group of the node, so one *class* stands for both: the partition of IPv4 that the
//! regions generate, minus the part in no region at all, which is class 0. A group's
//! tuple set then holds (class . protocol . port) elements, a few per peer, where the
//! address form held one per peer address, and one node-wide map sends each address
//! to its class. At the realistic node of `node-agent/BENCH.md` that is ~1,000 peer
//! pod addresses crossed with ports *per group* against one element per address once.
//!
//! A class's id is a hash of the keys of the regions it lies in (probing past ids
//! taken by an earlier class in key order), not a counter: a pod that founds a new
//! class, or a class that disappears, leaves every other id alone, so the change is a
//! handful of elements, and the same cluster always gets the same ids, which the
//! incremental compile (`incremental == full`) needs. Ids live in the mark bits of
//! [`MARK_CLASS_MASK`]; a node with more classes than ids falls back to the address
//! form ([`TooManyClasses`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::intervals::AddrSet;
use crate::dataplane::MARK_CLASS_MASK;
use crate::names;

/// The largest class id: what the mark's class bits hold.
pub const MAX_CLASS: u32 = MARK_CLASS_MASK;

/// The node's regions generate more classes than `capacity` ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{classes} address classes do not fit {capacity} class ids")]
pub struct TooManyClasses {
    pub classes: usize,
    pub capacity: u32,
}

/// A partition of IPv4 into classes (see the module doc).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Classes {
    /// Disjoint address ranges of every class but 0, in address order: (start, end,
    /// class); adjacent ranges of one class merged.
    pub ranges: Vec<(u32, u32, u32)>,
    /// Each region's classes (by the region's key): the region is their union.
    pub of_region: BTreeMap<String, BTreeSet<u32>>,
}

impl Classes {
    /// The ids in use, class 0 excluded.
    pub fn ids(&self) -> BTreeSet<u32> {
        self.ranges.iter().map(|r| r.2).collect()
    }

    /// The classes of the region `key` (none for an unknown or empty region).
    pub fn of(&self, key: &str) -> BTreeSet<u32> {
        self.of_region.get(key).cloned().unwrap_or_default()
    }
}

/// Which addresses a class-level region holds, in terms of [`partition`]'s address
/// regions: the union of the terms, each the intersection of the regions it names.
pub type Union = Vec<Vec<String>>;

/// The classes that tell apart exactly what `unions` tell apart: two addresses are in
/// one class when every union holds both or neither. `regions` (key → addresses) are
/// what the unions are written in (a pod peer, an ipBlock, the pods declaring a
/// named port with one number); ids in `1..=capacity`, each union's classes under
/// its key in [`Classes::of_region`].
///
/// Two steps: the partition of IPv4 the address regions generate (one sweep over
/// their boundaries), then its parts merged by the unions holding them, so ten
/// adjacent ipBlocks every group allows together are one class, not ten.
pub fn partition<R: std::borrow::Borrow<AddrSet>>(
    regions: &BTreeMap<String, R>,
    unions: &BTreeMap<String, Union>,
    capacity: u32,
) -> Result<Classes, TooManyClasses> {
    let (segments, parts_of_region, parts) = parts(regions);
    // Each part's signature: the unions holding it.
    let mut signature: Vec<BTreeSet<&str>> = vec![BTreeSet::new(); parts];
    for (key, union) in unions {
        for term in union {
            let mut held: Option<BTreeSet<usize>> = None;
            for region in term {
                let of = parts_of_region.get(region).cloned().unwrap_or_default();
                held = Some(match held {
                    None => of,
                    Some(h) => h.intersection(&of).copied().collect(),
                });
            }
            for part in held.unwrap_or_default() {
                signature[part].insert(key.as_str());
            }
        }
    }
    let mut distinct: BTreeSet<&BTreeSet<&str>> = signature.iter().collect();
    distinct.remove(&BTreeSet::new());
    if distinct.len() > capacity as usize {
        return Err(TooManyClasses {
            classes: distinct.len(),
            capacity,
        });
    }
    // Ids: a hash of the union keys, in key order, probing past taken ids.
    let mut taken: BTreeSet<u32> = BTreeSet::new();
    let mut id_of: BTreeMap<&BTreeSet<&str>, u32> = BTreeMap::new();
    for sig in distinct {
        let joined: Vec<&str> = sig.iter().copied().collect();
        let hash = names::hash16(joined.join("\n").as_bytes());
        let h = u64::from_str_radix(&hash, 16).expect("hash16 is hex");
        let mut id = 1 + (h % u64::from(capacity)) as u32;
        while !taken.insert(id) {
            id = id % capacity + 1;
        }
        id_of.insert(sig, id);
    }
    let class_of: Vec<u32> = signature
        .iter()
        .map(|sig| id_of.get(sig).copied().unwrap_or(0))
        .collect();
    let mut of_region: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
    for (part, sig) in signature.iter().enumerate() {
        for key in sig {
            of_region
                .entry(key.to_string())
                .or_default()
                .insert(class_of[part]);
        }
    }
    let mut ranges: Vec<(u32, u32, u32)> = Vec::new();
    for (a, b, part) in segments {
        let class = class_of[part];
        if class == 0 {
            continue;
        }
        match ranges.last_mut() {
            Some(last) if u64::from(last.1) + 1 == u64::from(a) && last.2 == class => last.1 = b,
            _ => ranges.push((a, b, class)),
        }
    }
    Ok(Classes { ranges, of_region })
}

/// Address segments by part, where a part is the set of addresses lying in exactly
/// the same regions (none: no segment): (segments (start, end, part), each region's
/// parts, the number of parts).
type Parts = (
    Vec<(u32, u32, usize)>,
    BTreeMap<String, BTreeSet<usize>>,
    usize,
);

fn parts<R: std::borrow::Borrow<AddrSet>>(regions: &BTreeMap<String, R>) -> Parts {
    let keys: Vec<&String> = regions.keys().collect();
    // Boundaries: where a region's range starts (+) or ends (-, one past its end).
    let mut events: Vec<(u64, usize, bool)> = Vec::new();
    for (i, set) in regions.values().enumerate() {
        for (a, b) in set.borrow().bounds() {
            events.push((u64::from(a), i, true));
            events.push((u64::from(b) + 1, i, false));
        }
    }
    events.sort_unstable();
    let mut ids: HashMap<Vec<usize>, usize> = HashMap::new();
    let mut segments: Vec<(u32, u32, usize)> = Vec::new();
    let mut active: BTreeSet<usize> = BTreeSet::new();
    let mut i = 0;
    while i < events.len() {
        let at = events[i].0;
        while i < events.len() && events[i].0 == at {
            let (_, region, start) = events[i];
            if start {
                active.insert(region);
            } else {
                active.remove(&region);
            }
            i += 1;
        }
        if active.is_empty() {
            continue;
        }
        // Every range has an end boundary after its start, so one follows here.
        let end = events.get(i).map_or(u64::from(u32::MAX) + 1, |e| e.0) - 1;
        let signature: Vec<usize> = active.iter().copied().collect();
        let next = ids.len();
        let part = *ids.entry(signature).or_insert(next);
        segments.push((at as u32, end as u32, part));
    }
    let mut of_region: BTreeMap<String, BTreeSet<usize>> = BTreeMap::new();
    for (sig, part) in &ids {
        for r in sig {
            of_region.entry(keys[*r].clone()).or_default().insert(*part);
        }
    }
    (segments, of_region, ids.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(ranges: &[(u32, u32)]) -> AddrSet {
        let mut s = AddrSet::default();
        for (a, b) in ranges {
            s.insert(*a, *b);
        }
        s
    }

    fn regions(list: &[(&str, &[(u32, u32)])]) -> BTreeMap<String, AddrSet> {
        list.iter().map(|(k, r)| (k.to_string(), set(r))).collect()
    }

    /// Every region a union of its own.
    fn each(regions: &BTreeMap<String, AddrSet>) -> BTreeMap<String, Union> {
        regions
            .keys()
            .map(|k| (k.clone(), vec![vec![k.clone()]]))
            .collect()
    }

    fn class_at(c: &Classes, x: u32) -> u32 {
        c.ranges
            .iter()
            .find(|r| r.0 <= x && x <= r.1)
            .map_or(0, |r| r.2)
    }

    #[test]
    fn addresses_in_the_same_regions_share_a_class_and_the_rest_is_class_zero() {
        let r = regions(&[
            ("block", &[(100, 199)]),
            ("pods", &[(120, 120), (140, 140), (300, 300)]),
        ]);
        let c = partition(&r, &each(&r), MAX_CLASS).unwrap();
        assert_eq!(class_at(&c, 120), class_at(&c, 140));
        assert_ne!(class_at(&c, 120), class_at(&c, 300));
        assert_ne!(class_at(&c, 100), class_at(&c, 120));
        assert_eq!(class_at(&c, 100), class_at(&c, 199));
        assert_eq!(class_at(&c, 99), 0);
        assert_eq!(class_at(&c, 200), 0);
        assert_eq!(c.ids().len(), 3);
        assert_eq!(c.of("pods"), [class_at(&c, 120), class_at(&c, 300)].into());
    }

    #[test]
    fn regions_only_ever_allowed_together_are_one_class() {
        let r = regions(&[("a", &[(10, 19)]), ("b", &[(20, 29)]), ("c", &[(25, 40)])]);
        // One group allows a, b and c alike: one class, one range.
        let together: BTreeMap<String, Union> = [(
            "g".to_string(),
            vec![vec!["a".into()], vec!["b".into()], vec!["c".into()]],
        )]
        .into();
        let c = partition(&r, &together, MAX_CLASS).unwrap();
        assert_eq!(c.ranges.len(), 1);
        assert_eq!((c.ranges[0].0, c.ranges[0].1), (10, 40));
        // A term intersects: only the part of b inside c.
        let inside: BTreeMap<String, Union> =
            [("g".to_string(), vec![vec!["b".into(), "c".into()]])].into();
        let c = partition(&r, &inside, MAX_CLASS).unwrap();
        assert_eq!(c.ranges.len(), 1);
        assert_eq!((c.ranges[0].0, c.ranges[0].1), (25, 29));
    }

    #[test]
    fn a_new_class_leaves_the_ids_of_the_others_alone() {
        let mut r = regions(&[("a", &[(10, 20)]), ("b", &[(15, 30)])]);
        let before = partition(&r, &each(&r), MAX_CLASS).unwrap();
        r.insert("c".to_string(), set(&[(1000, 1000)]));
        let after = partition(&r, &each(&r), MAX_CLASS).unwrap();
        for x in [10, 15, 25] {
            assert_eq!(class_at(&before, x), class_at(&after, x));
        }
        assert!(class_at(&after, 1000) != 0);
    }

    #[test]
    fn more_classes_than_ids_is_an_error() {
        let r: BTreeMap<String, AddrSet> = (0..5u32)
            .map(|i| (format!("r{i}"), set(&[(i * 10, i * 10)])))
            .collect();
        assert_eq!(
            partition(&r, &each(&r), 4),
            Err(TooManyClasses {
                classes: 5,
                capacity: 4
            })
        );
        assert_eq!(partition(&r, &each(&r), 5).unwrap().ids().len(), 5);
    }

    proptest! {
        #[test]
        fn a_union_is_exactly_the_union_of_its_classes(
            raw in prop::collection::vec(
                prop::collection::vec((0u32..60, 0u32..60), 0..4), 1..6),
            raw_unions in prop::collection::vec(
                prop::collection::vec(prop::collection::vec(0usize..6, 1..3), 0..3), 0..4),
            probes in prop::collection::vec(0u32..64, 30),
        ) {
            let r: BTreeMap<String, AddrSet> = raw
                .iter()
                .enumerate()
                .map(|(i, rs)| {
                    let rs: Vec<(u32, u32)> =
                        rs.iter().map(|(a, b)| ((*a).min(*b), (*a).max(*b))).collect();
                    (format!("r{i}"), set(&rs))
                })
                .collect();
            let n = r.len();
            let unions: BTreeMap<String, Union> = raw_unions
                .iter()
                .enumerate()
                .map(|(i, terms)| {
                    let terms = terms
                        .iter()
                        .map(|t| t.iter().map(|x| format!("r{}", x % n)).collect())
                        .collect();
                    (format!("u{i}"), terms)
                })
                .collect();
            let c = partition(&r, &unions, 7)
                .unwrap_or_else(|_| partition(&r, &unions, MAX_CLASS).unwrap());
            for x in probes {
                let class = class_at(&c, x);
                let holds = |union: &Union| union.iter().any(|term| {
                    term.iter().all(|k| r[k].contains(x.into()))
                });
                let held: Vec<bool> = unions.values().map(holds).collect();
                prop_assert_eq!(class == 0, !held.iter().any(|h| *h));
                for (k, union) in &unions {
                    prop_assert_eq!(holds(union), class != 0 && c.of(k).contains(&class));
                }
            }
        }
    }
}
