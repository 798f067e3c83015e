//! The node's block lifecycle in a cluster: claim another block before the node's
//! blocks run out (the IPAM plugin only reads the published node-blocks file and
//! answers "try again later" when it is full), publish the node's blocks, and release
//! the blocks of nodes that have been gone for a grace period.
//!
//! The deciding parts ([`OrphanTracker`]) are pure; the doing parts take the ipam
//! crate's [`BlockStore`] trait, so they are tested against a real `DirStore`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use sluice_ipam::blocks::{ClaimError, Pool, blocks_of, claim_block};
use sluice_ipam::node_blocks::{self, NodeBlocks};
use sluice_ipam::store::{BlockClaim, BlockStore, ClaimOutcome};

use super::DatastoreError;
use crate::metrics::Metrics;

/// Default free-address count below which another block is claimed: a /24 holds
/// 253 pods, so 16 leaves room for a burst of pods while the claim is in flight.
pub const DEFAULT_LOW_WATER: u32 = 16;
/// Default time a node must be absent before its blocks are released.
pub const DEFAULT_ORPHAN_GRACE: Duration = Duration::from_secs(600);

/// How the agent manages this node's blocks (flags of `sluice-agent run`).
#[derive(Debug, Clone)]
pub struct BlockSettings {
    /// The IPAM plugin's state directory, read to count free addresses.
    pub state_dir: PathBuf,
    /// Claim another block when fewer addresses than this are free.
    pub low_water: u32,
    /// Release a node's blocks once it has been absent this long; `None` disables it.
    pub orphan_grace: Option<Duration>,
    /// Held while the node's blocks are read from the store and published, by the
    /// datastore's block poll and by [`claim_requested`]: a poll that read the store
    /// before a claim must not publish after it and drop the claimed block.
    pub publish_lock: Arc<tokio::sync::Mutex<()>>,
}

impl BlockSettings {
    pub fn new(state_dir: PathBuf) -> BlockSettings {
        BlockSettings {
            state_dir,
            low_water: DEFAULT_LOW_WATER,
            orphan_grace: Some(DEFAULT_ORPHAN_GRACE),
            publish_lock: Arc::default(),
        }
    }
}

/// What [`claim_requested`] did with the block of a requested address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestedClaim {
    /// The block is the node's (claimed now, or held already) and published.
    Claimed(Ipv4Net),
    /// Another node holds the block.
    Taken { block: Ipv4Net, owner: String },
    /// The address is not in the pool (the plugin checks this first; an agent with
    /// another pool configuration would disagree).
    OutsidePool,
}

/// The node-local API's `claim-block`: the CNI plugin asks for the block holding
/// `address`, a pod's requested address (issue 12). Claim it for `node` unless it is
/// held, then publish the node's blocks before answering, so the plugin finds it in
/// the node-blocks file.
pub async fn claim_requested<S: BlockStore>(
    store: &S,
    pool: &Pool,
    node: &str,
    file: &Path,
    settings: &BlockSettings,
    address: std::net::Ipv4Addr,
    metrics: Option<&Metrics>,
) -> Result<RequestedClaim, DatastoreError> {
    let Some(block) = pool.block_of(address) else {
        return Ok(RequestedClaim::OutsidePool);
    };
    let _publishing = settings.publish_lock.lock().await;
    if !blocks_of(store, pool, node).await?.contains(&block) {
        // The store's claim is atomic across nodes: Taken names whoever won.
        if store.claim(block, node).await? == ClaimOutcome::Taken {
            let owner = store
                .list()
                .await?
                .into_iter()
                .find(|c| c.cidr == block)
                .map(|c| c.node);
            match owner {
                Some(owner) if owner != node => {
                    return Ok(RequestedClaim::Taken { block, owner });
                }
                _ => {}
            }
        } else {
            tracing::info!(%block, %address, node, "claimed block for a requested address");
            if let Some(m) = metrics {
                m.blocks_claimed.inc();
            }
        }
    }
    let own = blocks_of(store, pool, node).await?;
    publish(file, node, &own)?;
    Ok(RequestedClaim::Claimed(block))
}

/// Make sure `node` holds a block and, when its blocks are (nearly) full, one more.
/// Returns the node's blocks after the check, ascending.
///
/// A node that already holds blocks keeps them when the extra claim fails (pool
/// exhausted, store outage): the failure is logged and retried on the next check,
/// since pods can still be placed in whatever room is left.
pub async fn ensure_capacity<S: BlockStore>(
    store: &S,
    pool: &Pool,
    node: &str,
    settings: &BlockSettings,
    metrics: Option<&Metrics>,
) -> Result<Vec<Ipv4Net>, DatastoreError> {
    let mut own = blocks_of(store, pool, node).await?;
    let wanted = if own.is_empty() {
        true
    } else {
        needs_more(&settings.state_dir, &own, settings.low_water)
    };
    if !wanted {
        return Ok(own);
    }
    match claim_block(store, pool, node).await {
        Ok(block) => {
            tracing::info!(%block, node, held = own.len(), "claimed block");
            if let Some(m) = metrics {
                m.blocks_claimed.inc();
            }
            own.push(block);
            own.sort();
            Ok(own)
        }
        Err(source) if own.is_empty() => Err(DatastoreError::Claim {
            node: node.to_string(),
            source,
        }),
        Err(e) => {
            if let Some(m) = metrics {
                m.block_claim_failures.inc();
            }
            match e {
                ClaimError::PoolExhausted { .. } => {
                    tracing::error!(error = %e, node, "node's blocks are nearly full and no block is free")
                }
                ClaimError::Store(_) => {
                    tracing::warn!(error = %e, node, "claiming another block failed; retrying later")
                }
            }
            Ok(own)
        }
    }
}

/// Whether the IPAM state says the node's blocks are below the low-water mark. An
/// unreadable state is logged and answered "no": a corrupt state file is the IPAM
/// plugin's error to report, and claiming blocks on every poll would drain the pool.
pub fn needs_more(state_dir: &Path, own: &[Ipv4Net], low_water: u32) -> bool {
    match sluice_ipam::needs_another_block(state_dir, own, low_water) {
        Ok(more) => more,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the IPAM state to count free addresses");
            false
        }
    }
}

/// Write the node-blocks file the IPAM plugin reads, unless it already says `own`.
/// Returns whether it was written.
pub fn publish(file: &Path, node: &str, own: &[Ipv4Net]) -> Result<bool, DatastoreError> {
    let published = node_blocks::read(file)?;
    if published
        .as_ref()
        .is_some_and(|p| p.node == node && p.blocks == own)
    {
        return Ok(false);
    }
    node_blocks::write(
        file,
        &NodeBlocks {
            node: node.to_string(),
            blocks: own.to_vec(),
            updated_unix: crate::status::unix_now(),
        },
    )?;
    tracing::info!(file = %file.display(), blocks = ?own, "published node blocks");
    Ok(true)
}

/// Remembers since when each block owner has been missing from the Node list, so a
/// node is declared gone only after it stayed absent for the whole grace period:
/// a transient list (a relist, a node re-registering) never releases anything.
#[derive(Debug, Default)]
pub struct OrphanTracker {
    absent_since: BTreeMap<String, Instant>,
}

impl OrphanTracker {
    /// Update with the current live nodes and block owners; return the owners absent
    /// for at least `grace` as of `now`.
    pub fn expired(
        &mut self,
        now: Instant,
        live: &BTreeSet<String>,
        owners: &BTreeSet<String>,
        grace: Duration,
    ) -> BTreeSet<String> {
        // Forget nodes that came back and owners whose blocks are gone.
        self.absent_since
            .retain(|n, _| owners.contains(n) && !live.contains(n));
        for owner in owners.difference(live) {
            self.absent_since.entry(owner.clone()).or_insert(now);
        }
        self.absent_since
            .iter()
            .filter(|(_, since)| now.saturating_duration_since(**since) >= grace)
            .map(|(n, _)| n.clone())
            .collect()
    }
}

/// Release the blocks of nodes absent from `live` for the grace period. `live` must
/// come from a synced Node list that contains `self_node` (an empty or partial list
/// is not evidence that nodes are gone: nothing is released then).
///
/// Each release is the store's own guarded delete (the owner is re-checked and the
/// delete carries the object's uid and resourceVersion), so several agents doing
/// this at once release each block once and never a block re-claimed meanwhile. We
/// release claim by claim rather than with `release_orphan_blocks`, which takes the
/// live set: a node that registered after our list would look orphaned to it.
pub async fn release_orphans<S: BlockStore>(
    store: &S,
    tracker: &mut OrphanTracker,
    now: Instant,
    self_node: &str,
    live: &BTreeSet<String>,
    grace: Duration,
    metrics: Option<&Metrics>,
) -> Result<Vec<BlockClaim>, DatastoreError> {
    if !live.contains(self_node) {
        tracing::debug!("own node not in the node list; not releasing any block");
        return Ok(Vec::new());
    }
    let claims = store.list().await?;
    let owners: BTreeSet<String> = claims.iter().map(|c| c.node.clone()).collect();
    let gone = tracker.expired(now, live, &owners, grace);
    let mut released = Vec::new();
    let mut first_err = None;
    for claim in claims.into_iter().filter(|c| gone.contains(&c.node)) {
        match store.release(claim.cidr, &claim.node).await {
            Ok(true) => {
                tracing::info!(block = %claim.cidr, node = %claim.node, "released block of a node that no longer exists");
                if let Some(m) = metrics {
                    m.blocks_released.inc();
                }
                released.push(claim);
            }
            // Another agent released it first, or it changed hands: nothing to do.
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(block = %claim.cidr, node = %claim.node, error = %e, "releasing orphan block failed");
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) => Err(e.into()),
        None => Ok(released),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn an_absent_owner_expires_only_after_the_grace_period() {
        let mut t = OrphanTracker::default();
        let t0 = Instant::now();
        let grace = Duration::from_secs(600);
        let owners = set(&["a", "b"]);
        assert!(t.expired(t0, &set(&["a"]), &owners, grace).is_empty());
        let almost = t0 + Duration::from_secs(599);
        assert!(t.expired(almost, &set(&["a"]), &owners, grace).is_empty());
        let later = t0 + grace;
        assert_eq!(t.expired(later, &set(&["a"]), &owners, grace), set(&["b"]));
    }

    #[test]
    fn a_node_that_comes_back_restarts_its_grace_period() {
        let mut t = OrphanTracker::default();
        let t0 = Instant::now();
        let grace = Duration::from_secs(10);
        let owners = set(&["a", "b"]);
        t.expired(t0, &set(&["a"]), &owners, grace);
        // b reappears (a transient list ended), then goes again.
        t.expired(
            t0 + Duration::from_secs(5),
            &set(&["a", "b"]),
            &owners,
            grace,
        );
        let t2 = t0 + Duration::from_secs(12);
        assert!(t.expired(t2, &set(&["a"]), &owners, grace).is_empty());
        let t3 = t2 + grace;
        assert_eq!(t.expired(t3, &set(&["a"]), &owners, grace), set(&["b"]));
    }

    #[test]
    fn a_live_node_never_expires() {
        let mut t = OrphanTracker::default();
        let t0 = Instant::now();
        let owners = set(&["a"]);
        for h in 0..100 {
            let now = t0 + Duration::from_secs(3600 * h);
            assert!(
                t.expired(now, &set(&["a"]), &owners, Duration::ZERO)
                    .is_empty()
            );
        }
    }
}
