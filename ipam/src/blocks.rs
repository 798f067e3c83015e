//! The cluster pool cut into blocks, block names, and the claiming policy: which
//! block a node tries next, and how orphaned blocks are released. The store that makes
//! a claim atomic is behind [`BlockStore`].

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::allocator::{MAX_BLOCK_PREFIX, MIN_BLOCK_PREFIX};
use crate::store::{BlockClaim, BlockStore, ClaimOutcome, StoreError};

/// The default cluster pool.
pub const DEFAULT_POOL: &str = "10.244.0.0/16";
/// The default block prefix length.
pub const DEFAULT_BLOCK_PREFIX: u8 = 24;

/// A cluster pool and the size of the blocks it is cut into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    cidr: Ipv4Net,
    block_prefix: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error("pool {cidr} is not a network address (did you mean {}?)", cidr.trunc())]
    NotANetwork { cidr: Ipv4Net },
    #[error(
        "blockSize {block_prefix} does not fit pool {cidr}: it must lie between {} (the pool's prefix length, and at least {MIN_BLOCK_PREFIX}) and {MAX_BLOCK_PREFIX}",
        cidr.prefix_len().max(MIN_BLOCK_PREFIX)
    )]
    BadBlockSize { cidr: Ipv4Net, block_prefix: u8 },
}

impl Pool {
    pub fn new(cidr: Ipv4Net, block_prefix: u8) -> Result<Pool, PoolError> {
        if cidr.trunc() != cidr {
            return Err(PoolError::NotANetwork { cidr });
        }
        if block_prefix < cidr.prefix_len().max(MIN_BLOCK_PREFIX) || block_prefix > MAX_BLOCK_PREFIX
        {
            return Err(PoolError::BadBlockSize { cidr, block_prefix });
        }
        Ok(Pool { cidr, block_prefix })
    }

    pub fn cidr(&self) -> Ipv4Net {
        self.cidr
    }

    pub fn block_prefix(&self) -> u8 {
        self.block_prefix
    }

    pub fn block_count(&self) -> u32 {
        1u32 << (self.block_prefix - self.cidr.prefix_len())
    }

    /// The `i`-th block of the pool (`i < block_count()`).
    pub fn block(&self, i: u32) -> Ipv4Net {
        let step = 1u32 << (32 - u32::from(self.block_prefix));
        let base = u32::from(self.cidr.network()) + i * step;
        Ipv4Net::new(Ipv4Addr::from(base), self.block_prefix).expect("prefix checked in new")
    }

    /// The block of this pool holding `ip`, if the pool holds it.
    pub fn block_of(&self, ip: Ipv4Addr) -> Option<Ipv4Net> {
        self.cidr.contains(&ip).then(|| {
            Ipv4Net::new(ip, self.block_prefix)
                .expect("prefix checked in new")
                .trunc()
        })
    }

    /// Whether `block` is one of this pool's blocks.
    pub fn has_block(&self, block: Ipv4Net) -> bool {
        block.prefix_len() == self.block_prefix
            && block.trunc() == block
            && self.cidr.contains(&block)
    }

    /// Every block, in the order `node` tries them: starting at a place derived from
    /// the node's name, so nodes claiming at the same moment mostly try different
    /// blocks first instead of all racing for block 0, and a node that loses its
    /// state tends to come back to the same block.
    pub fn candidates(&self, node: &str) -> impl Iterator<Item = Ipv4Net> + '_ {
        let n = self.block_count();
        let start = fnv1a(node.as_bytes()) % n;
        (0..n).map(move |i| self.block((start + i) % n))
    }
}

fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

/// The name of a block's store object or file: `10.244.3.0/24` → `10-244-3-0-24`
/// (a valid Kubernetes object name and file name).
pub fn block_name(block: Ipv4Net) -> String {
    let o = block.network().octets();
    format!("{}-{}-{}-{}-{}", o[0], o[1], o[2], o[3], block.prefix_len())
}

/// The inverse of [`block_name`]; `None` for anything else.
pub fn parse_block_name(name: &str) -> Option<Ipv4Net> {
    let parts: Vec<&str> = name.split('-').collect();
    let [a, b, c, d, p] = parts.as_slice() else {
        return None;
    };
    let nums: Vec<u8> = [a, b, c, d, p]
        .iter()
        .map(|s| s.parse::<u8>().ok())
        .collect::<Option<_>>()?;
    let net = Ipv4Net::new(Ipv4Addr::new(nums[0], nums[1], nums[2], nums[3]), nums[4]).ok()?;
    (net.trunc() == net && block_name(net) == name).then_some(net)
}

#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error(
        "IP pool {pool} is exhausted: all {blocks} blocks of /{prefix} are claimed by nodes; \
         release the blocks of nodes that no longer exist, or configure a larger pool"
    )]
    PoolExhausted {
        pool: Ipv4Net,
        blocks: u32,
        prefix: u8,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The blocks of the pool that `node` owns according to the store, ascending.
pub async fn blocks_of<S: BlockStore>(
    store: &S,
    pool: &Pool,
    node: &str,
) -> Result<Vec<Ipv4Net>, StoreError> {
    let mut owned: Vec<Ipv4Net> = store
        .list()
        .await?
        .into_iter()
        .filter(|c| c.node == node && pool.has_block(c.cidr))
        .map(|c| c.cidr)
        .collect();
    owned.sort();
    Ok(owned)
}

/// Claim one more block of `pool` for `node`. The store's claim is atomic, so of
/// several nodes racing for one block exactly one wins and the others move on.
pub async fn claim_block<S: BlockStore>(
    store: &S,
    pool: &Pool,
    node: &str,
) -> Result<Ipv4Net, ClaimError> {
    let taken: BTreeSet<Ipv4Net> = store.list().await?.into_iter().map(|c| c.cidr).collect();
    for cidr in pool.candidates(node).filter(|c| !taken.contains(c)) {
        match store.claim(cidr, node).await? {
            ClaimOutcome::Claimed => return Ok(cidr),
            ClaimOutcome::Taken => continue,
        }
    }
    Err(ClaimError::PoolExhausted {
        pool: pool.cidr(),
        blocks: pool.block_count(),
        prefix: pool.block_prefix(),
    })
}

/// Release every block claimed by a node that is not in `live_nodes` (the node agent
/// calls this with the cluster's current nodes). Returns the claims released. Keeps
/// going past a failing release and reports the first error at the end, so one bad
/// block does not pin all the others.
pub async fn release_orphan_blocks<S: BlockStore>(
    store: &S,
    live_nodes: &BTreeSet<String>,
) -> Result<Vec<BlockClaim>, StoreError> {
    let mut released = Vec::new();
    let mut first_err = None;
    for claim in store.list().await? {
        if live_nodes.contains(&claim.node) {
            continue;
        }
        match store.release(claim.cidr, &claim.node).await {
            Ok(true) => released.push(claim),
            Ok(false) => {}
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(released),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn default_pool_has_256_blocks_of_24() {
        let p = Pool::new(net(DEFAULT_POOL), DEFAULT_BLOCK_PREFIX).unwrap();
        assert_eq!(p.block_count(), 256);
        assert_eq!(p.block(0), net("10.244.0.0/24"));
        assert_eq!(p.block(255), net("10.244.255.0/24"));
    }

    #[test]
    fn candidates_cover_every_block_once() {
        let p = Pool::new(net("10.244.0.0/20"), 26).unwrap();
        let all: BTreeSet<_> = p.candidates("node-7").collect();
        assert_eq!(all.len(), 64);
        assert!(all.iter().all(|b| p.has_block(*b)));
    }

    #[test]
    fn bad_pools_are_refused_with_a_reason() {
        assert!(matches!(
            Pool::new(net("10.244.1.0/16"), 24),
            Err(PoolError::NotANetwork { .. })
        ));
        assert!(Pool::new(net("10.244.0.0/16"), 31).is_err());
        assert!(Pool::new(net("10.244.0.0/16"), 15).is_err());
        // A /0 block's size does not fit in u32 (found by the binary fuzzer: a panic).
        assert!(Pool::new(net("0.0.0.0/0"), 0).is_err());
        assert!(Pool::new(net("0.0.0.0/0"), 1).is_ok());
    }

    #[test]
    fn block_names_round_trip() {
        let b = net("10.244.3.0/24");
        assert_eq!(block_name(b), "10-244-3-0-24");
        assert_eq!(parse_block_name("10-244-3-0-24"), Some(b));
        for bad in [
            "10-244-3-1-24",
            "10-244-3-0",
            "10-244-03-0-24",
            "x",
            "10-244-3-0-24-1",
        ] {
            assert_eq!(parse_block_name(bad), None, "{bad}");
        }
    }
}
