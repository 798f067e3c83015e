//! Per-pod address allocation for one node: a plain value with no I/O, so every rule
//! about which address a pod gets is tested without a disk (and property-tested).
//!
//! Rules:
//! - An allocation is keyed by (container id, interface name); allocating an existing
//!   key returns the address it already holds, from any block.
//! - In every block the network address, the first host address (the node's tunnel
//!   device, see [`tunnel_address`]) and the broadcast address are never handed out.
//! - Never-used addresses go first (lowest first); released addresses are reused last,
//!   oldest-released first, so a just-freed address does not go straight to a new pod
//!   while something (a stale conntrack entry, a slow peer) may still point at it.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// The longest block prefix that leaves at least one address for a pod
/// (/30: network, tunnel, one pod, broadcast).
pub const MAX_BLOCK_PREFIX: u8 = 30;

/// The shortest block prefix: a /0 block's 2^32 addresses do not fit the `u32`
/// arithmetic of offsets and capacities.
pub const MIN_BLOCK_PREFIX: u8 = 1;

/// The address of the node's tunnel device in a block: its first host address.
pub fn tunnel_address(block: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(block.network()) + 1)
}

/// How many pod addresses a block holds: its size minus network, tunnel and broadcast.
pub fn block_capacity(block: Ipv4Net) -> u32 {
    block_size(block) - 3
}

fn block_size(block: Ipv4Net) -> u32 {
    1u32 << (32 - u32::from(block.prefix_len()))
}

/// First host offset a pod may get (0 is the network, 1 the tunnel).
const FIRST_POD_OFFSET: u32 = 2;

/// Which attachment an address belongs to (CNI's container id and interface name).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttachmentKey {
    pub container_id: String,
    pub ifname: String,
}

impl AttachmentKey {
    pub fn new(container_id: impl Into<String>, ifname: impl Into<String>) -> AttachmentKey {
        AttachmentKey {
            container_id: container_id.into(),
            ifname: ifname.into(),
        }
    }
}

/// One address held by one attachment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Allocation {
    pub ip: Ipv4Addr,
    #[serde(flatten)]
    pub key: AttachmentKey,
    /// The CNI network (the config's `name`) it was allocated for: a GC of one
    /// network must leave another network's attachments alone when both use the
    /// same state directory.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub network: String,
    /// Seconds since the epoch when it was first allocated (operator information).
    pub allocated_unix: u64,
    /// The runtime asked for this very address (CNI `ips` capability, `IP=` in
    /// CNI_ARGS, or an annotation). Absent in state files written before it existed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub requested: bool,
}

/// An address that was released, with its place in the node-wide release order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Released {
    pub ip: Ipv4Addr,
    pub seq: u64,
}

/// Allocation state of one block on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BlockAllocations {
    pub cidr: Ipv4Net,
    /// Host offset of the lowest address never handed out yet.
    next_fresh: u32,
    /// Held addresses, ascending.
    allocations: Vec<Allocation>,
    /// Released addresses, oldest release first.
    released: Vec<Released>,
}

impl BlockAllocations {
    fn new(cidr: Ipv4Net) -> BlockAllocations {
        BlockAllocations {
            cidr,
            next_fresh: FIRST_POD_OFFSET,
            allocations: Vec::new(),
            released: Vec::new(),
        }
    }

    pub fn allocations(&self) -> &[Allocation] {
        &self.allocations
    }

    pub fn capacity(&self) -> u32 {
        block_capacity(self.cidr)
    }

    /// Addresses a new pod could still get from this block.
    pub fn free(&self) -> u32 {
        self.capacity() - self.allocations.len() as u32
    }

    fn last_pod_offset(&self) -> u32 {
        block_size(self.cidr) - 2
    }

    fn take_fresh(&mut self) -> Option<Ipv4Addr> {
        if self.next_fresh > self.last_pod_offset() {
            return None;
        }
        let ip = Ipv4Addr::from(u32::from(self.cidr.network()) + self.next_fresh);
        self.next_fresh += 1;
        Some(ip)
    }

    fn insert(&mut self, allocation: Allocation) {
        let at = self.allocations.partition_point(|a| a.ip < allocation.ip);
        self.allocations.insert(at, allocation);
    }
}

/// Why an allocation could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// Every address of every block the node owns is held.
    #[error("all {capacity} pod addresses of this node's blocks ({blocks}) are in use")]
    BlocksFull { blocks: String, capacity: u32 },
}

/// Why a requested address cannot be given to an attachment. The caller has already
/// checked that it lies in a block this node owns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("{ip} is the network, tunnel or broadcast address of block {block}, not a pod address")]
    NotAPodAddress { ip: Ipv4Addr, block: Ipv4Net },
    #[error("{ip} is held by container {} interface {}", .holder.container_id, .holder.ifname)]
    Held { ip: Ipv4Addr, holder: AttachmentKey },
    #[error("this attachment already holds {held}, not the requested {ip}")]
    HoldsAnother { ip: Ipv4Addr, held: Ipv4Addr },
}

/// Why a stored allocator value is not one this code could have written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidState(String);

/// All allocations of one node, across the blocks it owns or owned.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Allocator {
    /// Ascending by CIDR.
    blocks: Vec<BlockAllocations>,
    /// Sequence number the next release gets.
    next_release_seq: u64,
}

impl Allocator {
    pub fn new() -> Allocator {
        Allocator::default()
    }

    pub fn blocks(&self) -> &[BlockAllocations] {
        &self.blocks
    }

    /// Every held allocation, in address order.
    pub fn allocations(&self) -> impl Iterator<Item = &Allocation> {
        self.blocks.iter().flat_map(|b| b.allocations.iter())
    }

    pub fn len(&self) -> usize {
        self.blocks.iter().map(|b| b.allocations.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The allocation of `key`, if it holds one, and the block it is in.
    pub fn lookup(&self, key: &AttachmentKey) -> Option<(&Allocation, Ipv4Net)> {
        self.blocks.iter().find_map(|b| {
            b.allocations
                .iter()
                .find(|a| &a.key == key)
                .map(|a| (a, b.cidr))
        })
    }

    /// Addresses still free in the given (owned) blocks.
    pub fn free_in(&self, owned: &[Ipv4Net]) -> u32 {
        owned
            .iter()
            .map(|cidr| match self.blocks.iter().find(|b| b.cidr == *cidr) {
                Some(b) => b.free(),
                None => block_capacity(*cidr),
            })
            .sum()
    }

    /// [`Allocator::allocate_for_network`] without a network name.
    pub fn allocate(
        &mut self,
        key: &AttachmentKey,
        owned: &[Ipv4Net],
        now_unix: u64,
    ) -> Result<(Ipv4Addr, Ipv4Net), AllocError> {
        self.allocate_for_network(key, "", owned, now_unix)
    }

    /// The address for `key`: the one it holds already, else a new one from the
    /// blocks in `owned` (tried in order), recorded as `network`'s. Blocks that are
    /// no longer owned keep their existing allocations but give out no new ones.
    pub fn allocate_for_network(
        &mut self,
        key: &AttachmentKey,
        network: &str,
        owned: &[Ipv4Net],
        now_unix: u64,
    ) -> Result<(Ipv4Addr, Ipv4Net), AllocError> {
        if let Some((a, cidr)) = self.lookup(key) {
            return Ok((a.ip, cidr));
        }
        self.forget_unowned_empty_blocks(owned);
        for cidr in owned {
            self.ensure_block(*cidr);
        }
        let owned_set: BTreeSet<Ipv4Net> = owned.iter().copied().collect();

        // Never-used addresses first, in the caller's block order.
        let mut chosen = None;
        for cidr in owned {
            let block = self.block_mut(*cidr).expect("ensured above");
            if let Some(ip) = block.take_fresh() {
                chosen = Some((ip, *cidr));
                break;
            }
        }
        // Then the address released longest ago, across the owned blocks.
        if chosen.is_none() {
            let oldest = self
                .blocks
                .iter()
                .filter(|b| owned_set.contains(&b.cidr))
                .filter_map(|b| b.released.first().map(|r| (r.seq, b.cidr)))
                .min();
            if let Some((_, cidr)) = oldest {
                let block = self.block_mut(cidr).expect("found above");
                let r = block.released.remove(0);
                chosen = Some((r.ip, cidr));
            }
        }
        let Some((ip, cidr)) = chosen else {
            return Err(AllocError::BlocksFull {
                blocks: owned
                    .iter()
                    .map(|b| b.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                capacity: owned.iter().map(|b| block_capacity(*b)).sum(),
            });
        };
        self.block_mut(cidr)
            .expect("chosen from it")
            .insert(Allocation {
                ip,
                key: key.clone(),
                network: network.to_string(),
                allocated_unix: now_unix,
                requested: false,
            });
        Ok((ip, cidr))
    }

    /// Give `key` exactly `ip` from `block` (which the caller owns and which holds
    /// `ip`). Idempotent: an attachment holding `ip` already gets it again.
    ///
    /// An address above the block's fresh cursor moves the cursor past it; the
    /// never-used addresses it skips are recorded as released (in address order), so
    /// every address below the cursor stays either held or released and all of them
    /// are still handed out, only after the block's fresh ones.
    pub fn allocate_requested(
        &mut self,
        key: &AttachmentKey,
        network: &str,
        ip: Ipv4Addr,
        block: Ipv4Net,
        now_unix: u64,
    ) -> Result<(Ipv4Addr, Ipv4Net), RequestError> {
        debug_assert!(block.contains(&ip));
        if let Some((a, cidr)) = self.lookup(key) {
            return if a.ip == ip {
                Ok((ip, cidr))
            } else {
                Err(RequestError::HoldsAnother { ip, held: a.ip })
            };
        }
        let offset = u32::from(ip) - u32::from(block.network());
        let last = block_size(block) - 2;
        if !(FIRST_POD_OFFSET..=last).contains(&offset) {
            return Err(RequestError::NotAPodAddress { ip, block });
        }
        if let Some(holder) = self.allocations().find(|a| a.ip == ip) {
            return Err(RequestError::Held {
                ip,
                holder: holder.key.clone(),
            });
        }
        self.ensure_block(block);
        let b = self.block_mut(block).expect("ensured above");
        if offset >= b.next_fresh {
            let skipped: Vec<Ipv4Addr> = (b.next_fresh..offset)
                .map(|o| Ipv4Addr::from(u32::from(block.network()) + o))
                .collect();
            b.next_fresh = offset + 1;
            for s in skipped {
                let seq = self.take_release_seq();
                self.block_mut(block)
                    .expect("ensured above")
                    .released
                    .push(Released { ip: s, seq });
            }
        } else {
            b.released.retain(|r| r.ip != ip);
        }
        self.block_mut(block)
            .expect("ensured above")
            .insert(Allocation {
                ip,
                key: key.clone(),
                network: network.to_string(),
                allocated_unix: now_unix,
                requested: true,
            });
        Ok((ip, block))
    }

    /// Release what `key` holds. Releasing an unknown key is not an error (CNI DEL of
    /// something never added, or deleted twice, must succeed): it returns `None`.
    pub fn release(&mut self, key: &AttachmentKey) -> Option<Allocation> {
        let (b, i) = self.blocks.iter().enumerate().find_map(|(b, block)| {
            let i = block.allocations.iter().position(|a| &a.key == key)?;
            Some((b, i))
        })?;
        let seq = self.take_release_seq();
        let block = &mut self.blocks[b];
        let a = block.allocations.remove(i);
        block.released.push(Released { ip: a.ip, seq });
        Some(a)
    }

    /// The next release's sequence number. Only the order of releases matters, so a
    /// counter at its end (reachable only from an edited state file; the fuzzer found
    /// it) renumbers the released addresses from 0, keeping their order.
    fn take_release_seq(&mut self) -> u64 {
        if self.next_release_seq == u64::MAX {
            let mut order: Vec<(u64, usize, usize)> = self
                .blocks
                .iter()
                .enumerate()
                .flat_map(|(b, block)| {
                    block
                        .released
                        .iter()
                        .enumerate()
                        .map(move |(i, r)| (r.seq, b, i))
                })
                .collect();
            order.sort_unstable();
            for (n, (_, b, i)) in order.iter().enumerate() {
                self.blocks[*b].released[*i].seq = n as u64;
            }
            self.next_release_seq = order.len() as u64;
        }
        let seq = self.next_release_seq;
        self.next_release_seq += 1;
        seq
    }

    /// Release every allocation `keep` rejects (CNI GC); returns them.
    pub fn retain(&mut self, mut keep: impl FnMut(&Allocation) -> bool) -> Vec<Allocation> {
        let stale: Vec<AttachmentKey> = self
            .allocations()
            .filter(|a| !keep(a))
            .map(|a| a.key.clone())
            .collect();
        stale.iter().filter_map(|k| self.release(k)).collect()
    }

    fn ensure_block(&mut self, cidr: Ipv4Net) {
        if let Err(at) = self.blocks.binary_search_by(|b| b.cidr.cmp(&cidr)) {
            self.blocks.insert(at, BlockAllocations::new(cidr));
        }
    }

    fn block_mut(&mut self, cidr: Ipv4Net) -> Option<&mut BlockAllocations> {
        self.blocks.iter_mut().find(|b| b.cidr == cidr)
    }

    /// A block the node gave up (or lost) is forgotten once nothing in it is held.
    fn forget_unowned_empty_blocks(&mut self, owned: &[Ipv4Net]) {
        self.blocks
            .retain(|b| owned.contains(&b.cidr) || !b.allocations.is_empty());
    }

    /// Check that a value read from disk is one this code could have produced, so a
    /// hand-edited or damaged state file is refused instead of handing out an address
    /// twice.
    pub fn validate(&self) -> Result<(), InvalidState> {
        let bad = |m: String| Err(InvalidState(m));
        let mut seen_ips = BTreeSet::new();
        let mut seen_keys = BTreeSet::new();
        let mut seen_seqs = BTreeSet::new();
        let mut prev: Option<Ipv4Net> = None;
        for b in &self.blocks {
            let cidr = b.cidr;
            if !(MIN_BLOCK_PREFIX..=MAX_BLOCK_PREFIX).contains(&cidr.prefix_len())
                || cidr.trunc() != cidr
            {
                return bad(format!("block {cidr} is not a valid block"));
            }
            if let Some(p) = prev
                && (p >= cidr || p.contains(&cidr) || cidr.contains(&p))
            {
                return bad(format!("blocks {p} and {cidr} overlap or are out of order"));
            }
            prev = Some(cidr);
            if b.next_fresh < FIRST_POD_OFFSET || b.next_fresh > b.last_pod_offset() + 1 {
                return bad(format!(
                    "block {cidr}: next free offset {} out of range",
                    b.next_fresh
                ));
            }
            let fresh_start = u32::from(cidr.network()) + b.next_fresh;
            let mut check_ip = |ip: Ipv4Addr, what: &str| -> Result<(), InvalidState> {
                let n = u32::from(ip);
                let first = u32::from(cidr.network()) + FIRST_POD_OFFSET;
                let last = u32::from(cidr.network()) + b.last_pod_offset();
                if n < first || n > last {
                    return Err(InvalidState(format!(
                        "{what} address {ip} is not a pod address of block {cidr}"
                    )));
                }
                if n >= fresh_start {
                    return Err(InvalidState(format!(
                        "{what} address {ip} lies in the never-used part of block {cidr}"
                    )));
                }
                if !seen_ips.insert(ip) {
                    return Err(InvalidState(format!("address {ip} appears twice")));
                }
                Ok(())
            };
            for a in &b.allocations {
                check_ip(a.ip, "held")?;
                if !seen_keys.insert(a.key.clone()) {
                    return bad(format!(
                        "attachment {}/{} holds two addresses",
                        a.key.container_id, a.key.ifname
                    ));
                }
            }
            if !b.allocations.windows(2).all(|w| w[0].ip < w[1].ip) {
                return bad(format!("block {cidr}: allocations out of order"));
            }
            for r in &b.released {
                check_ip(r.ip, "released")?;
                if r.seq >= self.next_release_seq || !seen_seqs.insert(r.seq) {
                    return bad(format!(
                        "released address {} has a bad sequence number",
                        r.ip
                    ));
                }
            }
            if !b.released.windows(2).all(|w| w[0].seq < w[1].seq) {
                return bad(format!("block {cidr}: released addresses out of order"));
            }
            // Every address below the fresh cursor is either held or released: the
            // allocator never loses one.
            let used = b.next_fresh - FIRST_POD_OFFSET;
            if used as usize != b.allocations.len() + b.released.len() {
                return bad(format!(
                    "block {cidr}: {used} addresses were handed out but {} are held and {} released",
                    b.allocations.len(),
                    b.released.len()
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn key(i: u32) -> AttachmentKey {
        AttachmentKey::new(format!("c{i}"), "eth0")
    }

    #[test]
    fn first_pod_gets_the_third_address_of_the_block() {
        let mut a = Allocator::new();
        let (ip, block) = a.allocate(&key(1), &[net("10.244.3.0/24")], 0).unwrap();
        assert_eq!(ip, "10.244.3.2".parse::<Ipv4Addr>().unwrap());
        assert_eq!(block, net("10.244.3.0/24"));
        assert_eq!(
            tunnel_address(block),
            "10.244.3.1".parse::<Ipv4Addr>().unwrap()
        );
    }

    #[test]
    fn repeated_add_returns_the_same_address() {
        let mut a = Allocator::new();
        let owned = [net("10.244.3.0/24")];
        let first = a.allocate(&key(1), &owned, 0).unwrap();
        a.allocate(&key(2), &owned, 0).unwrap();
        assert_eq!(a.allocate(&key(1), &owned, 0).unwrap(), first);
        assert_eq!(a.len(), 2);
    }

    #[test]
    fn same_container_different_interface_is_a_different_attachment() {
        let mut a = Allocator::new();
        let owned = [net("10.244.3.0/24")];
        let (x, _) = a
            .allocate(&AttachmentKey::new("c", "eth0"), &owned, 0)
            .unwrap();
        let (y, _) = a
            .allocate(&AttachmentKey::new("c", "net1"), &owned, 0)
            .unwrap();
        assert_ne!(x, y);
    }

    #[test]
    fn a_requested_address_is_given_once_and_skipped_addresses_stay_handed_out_later() {
        let mut a = Allocator::new();
        let b = net("10.0.0.0/29"); // pods: .2 .3 .4 .5 .6
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        a.allocate(&key(0), &[b], 0).unwrap(); // .2
        assert_eq!(
            a.allocate_requested(&key(1), "n", ip("10.0.0.5"), b, 0),
            Ok((ip("10.0.0.5"), b))
        );
        a.validate().unwrap();
        assert!(a.lookup(&key(1)).unwrap().0.requested);
        // Idempotent for the same attachment; refused for anyone else.
        assert!(
            a.allocate_requested(&key(1), "n", ip("10.0.0.5"), b, 0)
                .is_ok()
        );
        assert!(matches!(
            a.allocate_requested(&key(2), "n", ip("10.0.0.5"), b, 0),
            Err(RequestError::Held { .. })
        ));
        assert!(matches!(
            a.allocate_requested(&key(1), "n", ip("10.0.0.6"), b, 0),
            Err(RequestError::HoldsAnother { .. })
        ));
        for bad in ["10.0.0.0", "10.0.0.1", "10.0.0.7"] {
            assert!(matches!(
                a.allocate_requested(&key(3), "n", ip(bad), b, 0),
                Err(RequestError::NotAPodAddress { .. })
            ));
        }
        // .6 is fresh, then the skipped .3 and .4; a released one can be requested.
        let next = |a: &mut Allocator, i| a.allocate(&key(i), &[b], 0).unwrap().0.to_string();
        assert_eq!(next(&mut a, 10), "10.0.0.6");
        a.release(&key(0));
        assert_eq!(
            a.allocate_requested(&key(4), "n", ip("10.0.0.2"), b, 0),
            Ok((ip("10.0.0.2"), b))
        );
        assert_eq!(next(&mut a, 11), "10.0.0.3");
        assert_eq!(next(&mut a, 12), "10.0.0.4");
        assert!(a.allocate(&key(13), &[b], 0).is_err());
        a.validate().unwrap();
    }

    #[test]
    fn a_state_written_before_requested_addresses_reads_as_not_requested() {
        let old = serde_json::json!({"ip": "10.0.0.2", "containerId": "c", "ifname": "eth0",
            "allocatedUnix": 1});
        let a: Allocation = serde_json::from_value(old).unwrap();
        assert!(!a.requested);
        assert!(serde_json::to_value(&a).unwrap().get("requested").is_none());
    }

    #[test]
    fn release_of_unknown_key_is_none() {
        let mut a = Allocator::new();
        assert_eq!(a.release(&key(9)), None);
    }

    #[test]
    fn released_addresses_are_reused_last_and_oldest_first() {
        let mut a = Allocator::new();
        let owned = [net("10.0.0.0/29")]; // pods: .2 .3 .4 .5 .6
        for i in 0..3 {
            a.allocate(&key(i), &owned, 0).unwrap(); // .2 .3 .4
        }
        a.release(&key(1)); // .3 first
        a.release(&key(0)); // then .2
        let next = |a: &mut Allocator, i| a.allocate(&key(i), &owned, 0).unwrap().0.to_string();
        assert_eq!(next(&mut a, 10), "10.0.0.5"); // fresh before reuse
        assert_eq!(next(&mut a, 11), "10.0.0.6");
        assert_eq!(next(&mut a, 12), "10.0.0.3"); // released longest ago
        assert_eq!(next(&mut a, 13), "10.0.0.2");
        assert!(matches!(
            a.allocate(&key(14), &owned, 0),
            Err(AllocError::BlocksFull { capacity: 5, .. })
        ));
    }

    #[test]
    fn a_second_block_is_used_when_the_first_is_full() {
        let mut a = Allocator::new();
        let one = [net("10.0.0.0/30")];
        a.allocate(&key(0), &one, 0).unwrap();
        assert!(a.allocate(&key(1), &one, 0).is_err());
        let two = [net("10.0.0.0/30"), net("10.0.0.4/30")];
        let (ip, block) = a.allocate(&key(1), &two, 0).unwrap();
        assert_eq!((ip.to_string(), block), ("10.0.0.6".to_string(), two[1]));
    }

    #[test]
    fn allocations_in_a_block_no_longer_owned_are_kept_but_it_gives_no_more() {
        let mut a = Allocator::new();
        let old = net("10.0.0.0/24");
        let new = net("10.0.1.0/24");
        let (ip, _) = a.allocate(&key(0), &[old], 0).unwrap();
        let (ip2, b2) = a.allocate(&key(1), &[new], 0).unwrap();
        assert_eq!(b2, new);
        assert_ne!(ip, ip2);
        assert_eq!(a.lookup(&key(0)).unwrap().0.ip, ip);
        a.release(&key(0));
        a.allocate(&key(2), &[new], 0).unwrap();
        assert_eq!(a.blocks().len(), 1, "the empty unowned block is forgotten");
        a.validate().unwrap();
    }

    #[test]
    fn retain_releases_exactly_what_is_not_live() {
        let mut a = Allocator::new();
        let owned = [net("10.0.0.0/24")];
        for i in 0..10 {
            a.allocate(&key(i), &owned, 0).unwrap();
        }
        let gone = a.retain(|x| x.key.container_id.ends_with(['1', '3', '5']));
        assert_eq!(gone.len(), 7);
        let left: Vec<_> = a
            .allocations()
            .map(|x| x.key.container_id.clone())
            .collect();
        assert_eq!(left, ["c1", "c3", "c5"]);
        a.validate().unwrap();
    }

    #[test]
    fn validate_refuses_an_address_held_twice() {
        let mut a = Allocator::new();
        let owned = [net("10.0.0.0/24")];
        a.allocate(&key(0), &owned, 0).unwrap();
        a.allocate(&key(1), &owned, 0).unwrap();
        let mut json = serde_json::to_value(&a).unwrap();
        json["blocks"][0]["allocations"][1]["ip"] = "10.0.0.2".into();
        let bad: Allocator = serde_json::from_value(json).unwrap();
        assert!(bad.validate().unwrap_err().to_string().contains("10.0.0.2"));
    }

    #[test]
    fn validate_refuses_a_lost_address() {
        let mut a = Allocator::new();
        a.allocate(&key(0), &[net("10.0.0.0/24")], 0).unwrap();
        let mut json = serde_json::to_value(&a).unwrap();
        json["blocks"][0]["allocations"] = serde_json::json!([]);
        let bad: Allocator = serde_json::from_value(json).unwrap();
        assert!(bad.validate().is_err());
    }

    // Both found by ipam/tests/fuzz_state.rs (corpus: block-slash-zero.json,
    // release-seq-at-max.json); each used to panic on overflow.
    #[test]
    fn validate_refuses_a_slash_zero_block() {
        let json = serde_json::json!({"blocks": [{"cidr": "0.0.0.0/0", "nextFresh": 2,
            "allocations": [], "released": []}], "nextReleaseSeq": 0});
        let bad: Allocator = serde_json::from_value(json).unwrap();
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("0.0.0.0/0")
        );
    }

    #[test]
    fn a_release_counter_at_its_end_renumbers_and_keeps_the_order() {
        let owned = [net("10.0.0.0/24")];
        let mut a = Allocator::new();
        for i in 0..3 {
            a.allocate(&key(i), &owned, 0).unwrap();
        }
        a.release(&key(2));
        a.release(&key(0));
        let mut json = serde_json::to_value(&a).unwrap();
        json["nextReleaseSeq"] = u64::MAX.into();
        json["blocks"][0]["released"][0]["seq"] = (u64::MAX - 7).into();
        json["blocks"][0]["released"][1]["seq"] = (u64::MAX - 2).into();
        let mut a: Allocator = serde_json::from_value(json).unwrap();
        a.validate().unwrap();
        a.release(&key(1));
        a.validate().unwrap();
        let order: Vec<(Ipv4Addr, u64)> = a.blocks()[0]
            .released
            .iter()
            .map(|r| (r.ip, r.seq))
            .collect();
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(
            order,
            [
                (ip("10.0.0.4"), 0),
                (ip("10.0.0.2"), 1),
                (ip("10.0.0.3"), 2)
            ]
        );
    }
}
