//! The IPAM operations of one node (what CNI ADD, DEL, CHECK, GC and STATUS do),
//! independent of how the CNI protocol reaches them.
//!
//! Every change happens under the state directory's exclusive lock: read the state,
//! decide with the pure [`Allocator`], write the state atomically, unlock. A process
//! killed anywhere in between leaves either the old state or the new one.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use ipnet::Ipv4Net;

use crate::allocator::{AllocError, Allocation, Allocator, AttachmentKey};
use crate::block_on::block_on;
use crate::blocks::{blocks_of, claim_block};
use crate::config::{BlockSource, IpamSettings};
use crate::error::IpamError;
use crate::node_blocks::{self, NodeBlocksError};
use crate::state::StateDir;
use crate::store::dir::DirStore;

/// An address handed to an attachment, and the block it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assigned {
    pub ip: Ipv4Addr,
    pub block: Ipv4Net,
}

/// One node's IPAM, as configured.
pub struct NodeIpam {
    settings: IpamSettings,
    state: StateDir,
}

impl NodeIpam {
    pub fn new(settings: IpamSettings) -> NodeIpam {
        let state = StateDir::new(&settings.state_dir);
        NodeIpam { settings, state }
    }

    pub fn settings(&self) -> &IpamSettings {
        &self.settings
    }

    /// ADD: the attachment's address, allocating one (for `network`, the config's
    /// `name`) if it has none.
    pub fn add(&self, key: &AttachmentKey, network: &str) -> Result<Assigned, IpamError> {
        let mut locked = self.state.lock()?;
        if let Some((a, block)) = locked.allocator.lookup(key) {
            return Ok(Assigned { ip: a.ip, block });
        }
        let mut owned = self.owned_blocks()?;
        let now = now_unix();
        let assigned = match locked
            .allocator
            .allocate_for_network(key, network, &owned, now)
        {
            Ok((ip, block)) => Assigned { ip, block },
            Err(full) => {
                // Standalone: claim another block ourselves (the claim is atomic across
                // nodes; our own node is serialized by the state lock we hold).
                // Cluster: the agent claims blocks; all we can say is "retry".
                let BlockSource::DirStore(dir) = &self.settings.source else {
                    return Err(self.full_error(full));
                };
                let store = DirStore::new(dir);
                let block = block_on(claim_block(
                    &store,
                    &self.settings.pool,
                    &self.settings.node,
                ))?;
                owned.push(block);
                let (ip, block) = locked
                    .allocator
                    .allocate_for_network(key, network, &owned, now)
                    .map_err(|e| self.full_error(e))?;
                Assigned { ip, block }
            }
        };
        locked.commit()?;
        Ok(assigned)
    }

    /// DEL: release the attachment's address. Unknown attachments are not an error.
    pub fn del(&self, key: &AttachmentKey) -> Result<Option<Allocation>, IpamError> {
        let Some(mut locked) = self.state.lock_existing()? else {
            return Ok(None);
        };
        let released = locked.allocator.release(key);
        if released.is_some() {
            locked.commit()?;
        }
        Ok(released)
    }

    /// CHECK: the attachment must hold an address (and `expected`, when given).
    pub fn check(
        &self,
        key: &AttachmentKey,
        expected: Option<Ipv4Addr>,
    ) -> Result<Assigned, IpamError> {
        let snapshot = self.state.snapshot()?;
        let Some((a, block)) = snapshot.lookup(key) else {
            return Err(IpamError::NotAllocated {
                container_id: key.container_id.clone(),
                ifname: key.ifname.clone(),
            });
        };
        if let Some(exp) = expected.filter(|e| *e != a.ip) {
            return Err(IpamError::AddressMismatch {
                container_id: key.container_id.clone(),
                ifname: key.ifname.clone(),
                held: a.ip.to_string(),
                expected: exp.to_string(),
            });
        }
        Ok(Assigned { ip: a.ip, block })
    }

    /// GC of `network`: release every allocation of that network whose attachment is
    /// not in `valid`. Returns what was released.
    pub fn gc(
        &self,
        network: &str,
        valid: &BTreeSet<AttachmentKey>,
    ) -> Result<Vec<Allocation>, IpamError> {
        let Some(mut locked) = self.state.lock_existing()? else {
            return Ok(Vec::new());
        };
        let released = locked
            .allocator
            .retain(|a| a.network != network || valid.contains(&a.key));
        if !released.is_empty() {
            locked.commit()?;
        }
        Ok(released)
    }

    /// STATUS: can this node hand out an address right now?
    pub fn status(&self) -> Result<(), IpamError> {
        let snapshot = self.state.snapshot()?;
        let owned = self.owned_blocks()?;
        if snapshot.free_in(&owned) > 0 {
            return Ok(());
        }
        match &self.settings.source {
            // A standalone node can still claim a block if the pool has one.
            BlockSource::DirStore(dir) => {
                let store = DirStore::new(dir);
                let taken = block_on(crate::store::BlockStore::list(&store))?.len() as u32;
                if taken < self.settings.pool.block_count() {
                    return Ok(());
                }
                Err(IpamError::PoolExhausted {
                    source: crate::blocks::ClaimError::PoolExhausted {
                        pool: self.settings.pool.cidr(),
                        blocks: self.settings.pool.block_count(),
                        prefix: self.settings.pool.block_prefix(),
                    },
                })
            }
            BlockSource::NodeBlocksFile(_) => Err(self.full_error(AllocError::BlocksFull {
                blocks: join(&owned),
                capacity: owned
                    .iter()
                    .map(|b| crate::allocator::block_capacity(*b))
                    .sum(),
            })),
        }
    }

    /// The blocks this node may allocate from, in the order to use them.
    fn owned_blocks(&self) -> Result<Vec<Ipv4Net>, IpamError> {
        match &self.settings.source {
            BlockSource::DirStore(dir) => Ok(block_on(blocks_of(
                &DirStore::new(dir),
                &self.settings.pool,
                &self.settings.node,
            ))?),
            BlockSource::NodeBlocksFile(path) => self.published_blocks(path),
        }
    }

    fn published_blocks(&self, path: &Path) -> Result<Vec<Ipv4Net>, IpamError> {
        let node = &self.settings.node;
        let missing = |why: String| IpamError::NoBlockPublished {
            node: node.clone(),
            path: path.to_path_buf(),
            why,
        };
        let published = match node_blocks::read(path) {
            Ok(Some(p)) => p,
            Ok(None) => return Err(missing("the file does not exist".into())),
            Err(NodeBlocksError::Io { source, .. }) => return Err(missing(source.to_string())),
            Err(NodeBlocksError::Malformed { reason, .. }) => {
                return Err(missing(format!("it does not parse: {reason}")));
            }
        };
        if &published.node != node {
            return Err(missing(format!(
                "it is for node {:?}; ipam.nodeName and the agent's node name must agree",
                published.node
            )));
        }
        if published.blocks.is_empty() {
            return Err(missing("it lists no blocks yet".into()));
        }
        Ok(published.blocks)
    }

    fn full_error(&self, source: AllocError) -> IpamError {
        IpamError::NodeBlocksFull { source }
    }

    /// A snapshot of this node's allocations (for operators and the agent).
    pub fn snapshot(&self) -> Result<Allocator, IpamError> {
        Ok(self.state.snapshot()?)
    }
}

/// For the node agent in a cluster: should it claim another block for this node?
/// True when the node's `owned` blocks have fewer than `low_water` free addresses
/// left (ADD fails with code 11, "retry", once none is left, until the agent has
/// published another block).
pub fn needs_another_block(
    state_dir: &Path,
    owned: &[Ipv4Net],
    low_water: u32,
) -> Result<bool, crate::state::StateError> {
    let snapshot = StateDir::new(state_dir).snapshot()?;
    Ok(snapshot.free_in(owned) < low_water)
}

fn join(blocks: &[Ipv4Net]) -> String {
    blocks
        .iter()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_is_asked_for_another_block_below_the_low_water_mark() {
        let d = tempfile::tempdir().unwrap();
        let owned: Vec<Ipv4Net> = vec!["10.0.0.0/29".parse().unwrap()]; // 5 pod addresses
        assert!(!needs_another_block(d.path(), &owned, 2).unwrap());
        let state = StateDir::new(d.path());
        let mut l = state.lock().unwrap();
        for i in 0..4 {
            l.allocator
                .allocate(&AttachmentKey::new(format!("c{i}"), "eth0"), &owned, 0)
                .unwrap();
        }
        l.commit().unwrap();
        drop(l);
        assert!(needs_another_block(d.path(), &owned, 2).unwrap());
        assert!(!needs_another_block(d.path(), &owned, 1).unwrap());
    }
}
