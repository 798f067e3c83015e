//! Interval arithmetic for the flat (nftables) form: address sets as disjoint ranges,
//! and a box set — (address interval × protocol × port interval) → value — whose
//! output is disjoint and canonical, since nftables refuses overlapping elements in a
//! concatenated interval set.
//!
//! [`BoxSet`] inserts "first writer wins": a point already covered keeps the value of
//! the box that covered it first. For NetworkPolicy every value is "allowed" and
//! the insertion order does not matter (a union); a tier of ordered decisions
//! (ClusterNetworkPolicy's Accept/Deny/Pass, issue 13) inserts its rules in priority
//! order and reads the boxes back as a verdict map with decided values.
//!
//! Canonical means: the output depends only on which value each point has, never on
//! the order or the shape of the insertions. Per protocol, ports are cut into the
//! widest slabs over which the address picture does not change; within a slab,
//! adjacent address ranges with the same value are merged.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::dataplane::{AddrRange, PortRange};
use crate::model::Protocol;

/// Address ranges painted with values, first writer wins: start → (end, value),
/// disjoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Painter<V> {
    ranges: BTreeMap<u32, (u32, V)>,
}

impl<V> Default for Painter<V> {
    fn default() -> Self {
        Painter {
            ranges: BTreeMap::new(),
        }
    }
}

impl<V: Clone + Eq> Painter<V> {
    /// Paints the parts of `[start, end]` not painted yet with `value`.
    pub fn paint(&mut self, start: u32, end: u32, value: &V) {
        if start > end {
            return;
        }
        let mut gaps = Vec::new();
        let mut cur = u64::from(start);
        if let Some((_, (pe, _))) = self.ranges.range(..=start).next_back()
            && *pe >= start
        {
            cur = u64::from(*pe) + 1;
        }
        if cur <= u64::from(end) {
            for (&ps, &(pe, _)) in self.ranges.range(cur as u32..=end) {
                if u64::from(ps) > cur {
                    gaps.push((cur as u32, ps - 1));
                }
                cur = u64::from(pe) + 1;
                if cur > u64::from(end) {
                    break;
                }
            }
            if cur <= u64::from(end) {
                gaps.push((cur as u32, end));
            }
        }
        for (s, e) in gaps {
            self.ranges.insert(s, (e, value.clone()));
        }
    }

    /// The painted ranges in address order, adjacent ranges of one value merged.
    pub fn merged(&self) -> Vec<(u32, u32, V)> {
        let mut out: Vec<(u32, u32, V)> = Vec::new();
        for (&s, (e, v)) in &self.ranges {
            if let Some(last) = out.last_mut()
                && u64::from(last.1) + 1 == u64::from(s)
                && last.2 == *v
            {
                last.1 = *e;
                continue;
            }
            out.push((s, *e, v.clone()));
        }
        out
    }
}

/// A set of IPv4 addresses as disjoint, merged ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddrSet {
    /// start → end, disjoint and never adjacent.
    ranges: BTreeMap<u32, u32>,
}

pub fn net_bounds(net: Ipv4Net) -> (u32, u32) {
    let net = net.trunc();
    (u32::from(net.network()), u32::from(net.broadcast()))
}

impl AddrSet {
    pub fn all() -> Self {
        let mut s = AddrSet::default();
        s.insert(0, u32::MAX);
        s
    }

    pub fn of_net(net: Ipv4Net) -> Self {
        let (a, b) = net_bounds(net);
        let mut s = AddrSet::default();
        s.insert(a, b);
        s
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let ip = u32::from(ip);
        self.ranges
            .range(..=ip)
            .next_back()
            .is_some_and(|(_, e)| *e >= ip)
    }

    /// Adds `[start, end]`, merging with overlapping or adjacent ranges.
    pub fn insert(&mut self, start: u32, end: u32) {
        if start > end {
            return;
        }
        let (mut s, mut e) = (start, end);
        let lo = self
            .ranges
            .range(..=start)
            .next_back()
            .filter(|(_, pe)| u64::from(**pe) + 1 >= u64::from(start))
            .map(|(ps, _)| *ps)
            .unwrap_or(start);
        let hi = end.saturating_add(1);
        let touched: Vec<(u32, u32)> = self.ranges.range(lo..=hi).map(|(a, b)| (*a, *b)).collect();
        for (a, b) in touched {
            if u64::from(a) <= u64::from(end) + 1 {
                s = s.min(a);
                e = e.max(b);
                self.ranges.remove(&a);
            }
        }
        self.ranges.insert(s, e);
    }

    pub fn insert_set(&mut self, other: &AddrSet) {
        for (a, b) in other.bounds() {
            self.insert(a, b);
        }
    }

    /// Removes `[start, end]`.
    pub fn subtract(&mut self, start: u32, end: u32) {
        if start > end {
            return;
        }
        let lo = self
            .ranges
            .range(..=start)
            .next_back()
            .map(|(ps, _)| *ps)
            .unwrap_or(start);
        let touched: Vec<(u32, u32)> = self
            .ranges
            .range(lo..=end)
            .map(|(a, b)| (*a, *b))
            .filter(|(_, b)| *b >= start)
            .collect();
        for (a, b) in touched {
            self.ranges.remove(&a);
            if a < start {
                self.ranges.insert(a, start - 1);
            }
            if b > end {
                self.ranges.insert(end + 1, b);
            }
        }
    }

    pub fn bounds(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.ranges.iter().map(|(a, b)| (*a, *b))
    }

    pub fn ranges(&self) -> impl Iterator<Item = AddrRange> + '_ {
        self.bounds().map(|(a, b)| AddrRange {
            start: Ipv4Addr::from(a),
            end: Ipv4Addr::from(b),
        })
    }
}

/// One box of a [`BoxSet`]: every address of `addrs`, protocol `protocol`, every port
/// of `ports`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Box3 {
    pub addrs: AddrRange,
    pub protocol: Protocol,
    pub ports: PortRange,
}

/// One insertion: (address bounds, protocol, port bounds, value).
type Entry<V> = ((u32, u32), Protocol, (u16, u16), V);

/// One port slab: its bounds and the address picture over it.
type Slab<V> = (u32, u32, Vec<(u32, u32, V)>);

/// (address × protocol × port) → value, first writer wins; read back disjoint and
/// canonical with [`BoxSet::boxes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoxSet<V> {
    /// In insertion order: (address bounds, protocol, port bounds, value).
    entries: Vec<Entry<V>>,
}

impl<V> Default for BoxSet<V> {
    fn default() -> Self {
        BoxSet {
            entries: Vec::new(),
        }
    }
}

impl<V: Clone + Eq + Ord> BoxSet<V> {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Gives every point of `addrs × protocol × [port_start, port_end]` not decided
    /// yet the value `value`.
    pub fn insert(
        &mut self,
        addrs: &AddrSet,
        protocol: Protocol,
        port_start: u16,
        port_end: u16,
        value: V,
    ) {
        if port_start > port_end {
            return;
        }
        for bounds in addrs.bounds() {
            self.entries
                .push((bounds, protocol, (port_start, port_end), value.clone()));
        }
    }

    /// Every box of `other`, after this set's own (which therefore win).
    pub fn union(&mut self, other: &BoxSet<V>) {
        self.entries.extend(other.entries.iter().cloned());
    }

    /// The value of one point, as the kernel's lookup would find it.
    pub fn get(&self, ip: Ipv4Addr, protocol: Protocol, port: u16) -> Option<&V> {
        let ip = u32::from(ip);
        self.entries
            .iter()
            .find(|(a, p, r, _)| {
                *p == protocol && a.0 <= ip && ip <= a.1 && r.0 <= port && port <= r.1
            })
            .map(|(_, _, _, v)| v)
    }

    /// Disjoint boxes covering exactly the decided points, each with its value, in a
    /// canonical order and shape (see the module doc).
    pub fn boxes(&self) -> Vec<(Box3, V)> {
        let protocols: BTreeSet<Protocol> = self.entries.iter().map(|e| e.1).collect();
        let mut out = Vec::new();
        for protocol in protocols {
            let entries: Vec<&Entry<V>> = self.entries.iter().filter(|e| e.1 == protocol).collect();
            // Slab boundaries: every port where some box starts or ends.
            let mut cuts: BTreeSet<u32> = BTreeSet::new();
            for e in &entries {
                cuts.insert(u32::from(e.2.0));
                cuts.insert(u32::from(e.2.1) + 1);
            }
            let cuts: Vec<u32> = cuts.into_iter().collect();
            let mut slabs: Vec<Slab<V>> = Vec::new();
            for w in cuts.windows(2) {
                let (lo, hi) = (w[0], w[1] - 1);
                let mut painter = Painter::default();
                for e in &entries {
                    if u32::from(e.2.0) <= lo && hi <= u32::from(e.2.1) {
                        painter.paint(e.0.0, e.0.1, &e.3);
                    }
                }
                let picture = painter.merged();
                match slabs.last_mut() {
                    Some(last) if last.1 + 1 == lo && last.2 == picture => last.1 = hi,
                    _ => slabs.push((lo, hi, picture)),
                }
            }
            for (lo, hi, picture) in slabs {
                for (a, b, v) in picture {
                    out.push((
                        Box3 {
                            addrs: AddrRange {
                                start: Ipv4Addr::from(a),
                                end: Ipv4Addr::from(b),
                            },
                            protocol,
                            ports: PortRange {
                                start: lo as u16,
                                end: hi as u16,
                            },
                        },
                        v,
                    ));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(s: &str) -> u32 {
        u32::from(s.parse::<Ipv4Addr>().unwrap())
    }

    #[test]
    fn an_except_is_cut_out_of_its_block_and_adjacent_addresses_merge() {
        let mut s = AddrSet::of_net("172.16.0.0/16".parse().unwrap());
        s.subtract(ip("172.16.8.0"), ip("172.16.8.255"));
        s.insert(ip("172.17.0.0"), ip("172.17.0.0"));
        let got: Vec<(u32, u32)> = s.bounds().collect();
        assert_eq!(
            got,
            [
                (ip("172.16.0.0"), ip("172.16.7.255")),
                (ip("172.16.9.0"), ip("172.17.0.0"))
            ]
        );
    }

    #[test]
    fn the_whole_address_space_is_one_range_and_can_be_emptied() {
        let mut s = AddrSet::all();
        assert_eq!(s.bounds().collect::<Vec<_>>(), [(0, u32::MAX)]);
        s.subtract(0, u32::MAX);
        assert!(s.is_empty());
    }

    #[test]
    fn overlapping_boxes_come_out_disjoint_and_the_first_writer_keeps_its_points() {
        let mut b = BoxSet::default();
        b.insert(
            &AddrSet::of_net("10.0.0.0/24".parse().unwrap()),
            Protocol::Tcp,
            80,
            90,
            1,
        );
        b.insert(&AddrSet::all(), Protocol::Tcp, 85, 100, 2);
        let boxes = b.boxes();
        for (i, (x, _)) in boxes.iter().enumerate() {
            for (y, _) in &boxes[i + 1..] {
                let overlap = x.protocol == y.protocol
                    && x.addrs.start <= y.addrs.end
                    && y.addrs.start <= x.addrs.end
                    && x.ports.start <= y.ports.end
                    && y.ports.start <= x.ports.end;
                assert!(!overlap, "{x:?} overlaps {y:?}");
            }
        }
        let at = |a: &str, p: u16| {
            boxes
                .iter()
                .find(|(x, _)| x.addrs.contains(a.parse().unwrap()) && x.ports.contains(p))
                .map(|(_, v)| *v)
        };
        assert_eq!(at("10.0.0.1", 86), Some(1));
        assert_eq!(at("10.0.1.1", 86), Some(2));
        assert_eq!(at("10.0.0.1", 95), Some(2));
        assert_eq!(at("10.0.0.1", 79), None);
    }

    proptest! {
        #[test]
        fn addr_sets_agree_with_a_plain_set_of_addresses(
            ops in prop::collection::vec((any::<bool>(), 0u32..48, 0u32..48), 0..16),
        ) {
            let mut s = AddrSet::default();
            let mut plain = std::collections::BTreeSet::new();
            for (add, a, b) in ops {
                let (a, b) = (a.min(b), a.max(b));
                if add {
                    s.insert(a, b);
                    plain.extend(a..=b);
                } else {
                    s.subtract(a, b);
                    for x in a..=b {
                        plain.remove(&x);
                    }
                }
            }
            for x in 0..50u32 {
                prop_assert_eq!(s.contains(Ipv4Addr::from(x)), plain.contains(&x));
            }
            // Disjoint and never adjacent: merged.
            let bounds: Vec<(u32, u32)> = s.bounds().collect();
            for w in bounds.windows(2) {
                prop_assert!(w[0].1 + 1 < w[1].0, "{:?}", bounds);
            }
        }

        #[test]
        fn boxes_are_disjoint_canonical_and_agree_with_the_insertions(
            inserts in prop::collection::vec(
                (0u32..64, 0u32..64, 0usize..3, 0u16..20, 0u16..20, 0u8..3),
                0..12,
            ),
            probes in prop::collection::vec((0u32..70, 0usize..3, 0u16..22), 40),
        ) {
            let protos = Protocol::ALL;
            let mut b = BoxSet::default();
            for (a0, a1, p, r0, r1, v) in &inserts {
                let mut s = AddrSet::default();
                s.insert((*a0).min(*a1), (*a0).max(*a1));
                b.insert(&s, protos[*p], (*r0).min(*r1), (*r0).max(*r1), *v);
            }
            let boxes = b.boxes();
            for (a, p, port) in probes {
                let hits: Vec<u8> = boxes
                    .iter()
                    .filter(|(x, _)| x.protocol == protos[p]
                        && x.addrs.contains(Ipv4Addr::from(a))
                        && x.ports.contains(port))
                    .map(|(_, v)| *v)
                    .collect();
                prop_assert!(hits.len() <= 1);
                prop_assert_eq!(hits.first(), b.get(Ipv4Addr::from(a), protos[p], port));
            }
            // Same points, same boxes: the union read back and re-inserted is a
            // fixed point.
            let mut again = BoxSet::default();
            for (x, v) in &boxes {
                let mut s = AddrSet::default();
                s.insert(u32::from(x.addrs.start), u32::from(x.addrs.end));
                again.insert(&s, x.protocol, x.ports.start, x.ports.end, *v);
            }
            prop_assert_eq!(again.boxes(), boxes);
        }
    }
}
