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
use crate::state::{LockedState, StateDir};
use crate::store::dir::DirStore;
use crate::store::{BlockStore, ClaimOutcome};

/// An address handed to an attachment, and the block it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assigned {
    pub ip: Ipv4Addr,
    pub block: Ipv4Net,
}

/// What a cluster node's block owner (the agent) answers when asked to claim the
/// block holding a requested address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimAnswer {
    /// The block is this node's now and the node-blocks file lists it.
    Claimed,
    /// Another node owns the block.
    Taken { owner: String },
}

/// Who claims a block for this node in a cluster, where only the agent writes the
/// block store: asked when a requested address lies in a block the node-blocks file
/// does not list. `Err` says why nobody could claim it (agent down, store outage).
pub trait BlockClaimer: Send + Sync {
    fn claim(&self, ip: Ipv4Addr, block: Ipv4Net) -> Result<ClaimAnswer, String>;
}

/// One node's IPAM, as configured.
pub struct NodeIpam {
    settings: IpamSettings,
    state: StateDir,
    claimer: Option<Box<dyn BlockClaimer>>,
}

impl NodeIpam {
    pub fn new(settings: IpamSettings) -> NodeIpam {
        let state = StateDir::new(&settings.state_dir);
        NodeIpam {
            settings,
            state,
            claimer: None,
        }
    }

    /// In a cluster, ask `claimer` (the agent) for the block of a requested address
    /// the node does not hold, instead of refusing the request.
    pub fn with_claimer(mut self, claimer: Box<dyn BlockClaimer>) -> NodeIpam {
        self.claimer = Some(claimer);
        self
    }

    pub fn settings(&self) -> &IpamSettings {
        &self.settings
    }

    /// ADD: the attachment's address, allocating one (for `network`, the config's
    /// `name`) if it has none: `requested` when the runtime asked for one (see
    /// [`NodeIpam::add_requested`]), else the next free one.
    pub fn add(
        &self,
        key: &AttachmentKey,
        network: &str,
        requested: Option<Ipv4Addr>,
    ) -> Result<Assigned, IpamError> {
        let mut locked = self.state.lock()?;
        if let Some(ip) = requested {
            return self.add_requested(locked, key, network, ip);
        }
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

    /// ADD of a requested address: it must be a pod address of the pool, not held by
    /// another attachment, in a block this node owns, or in a free block, which a
    /// standalone node then claims (a cluster node asks its claimer, the agent). Everything is checked before the claim, so a
    /// refused request changes nothing; only an allocation that succeeds commits.
    fn add_requested(
        &self,
        locked: LockedState,
        key: &AttachmentKey,
        network: &str,
        ip: Ipv4Addr,
    ) -> Result<Assigned, IpamError> {
        let pool = &self.settings.pool;
        let block = pool.block_of(ip).ok_or(IpamError::RequestedOutsidePool {
            ip,
            pool: pool.cidr(),
        })?;
        // The allocator's own checks (pod address, held, this attachment's other
        // address) on a copy, before anything is claimed.
        let mut trial = locked.allocator.clone();
        trial
            .allocate_requested(key, network, ip, block, 0)
            .map_err(|source| IpamError::Requested { source })?;
        let owned = self.owned_blocks()?;
        if !owned.contains(&block) {
            match &self.settings.source {
                BlockSource::DirStore(dir) => {
                    let store = DirStore::new(dir);
                    // Our node's claims are serialized by the state lock we hold, so
                    // Taken means another node's.
                    if block_on(store.claim(block, &self.settings.node))? == ClaimOutcome::Taken {
                        let owner = block_on(store.list())?
                            .into_iter()
                            .find(|c| c.cidr == block)
                            .map_or_else(|| "another node".to_owned(), |c| c.node);
                        return Err(IpamError::RequestedBlockOfAnotherNode { ip, block, owner });
                    }
                }
                BlockSource::NodeBlocksFile(_) => {
                    let Some(claimer) = &self.claimer else {
                        return Err(IpamError::RequestedBlockNotPublished {
                            ip,
                            block,
                            node: self.settings.node.clone(),
                            published: join(&owned),
                        });
                    };
                    // The agent writes the block store, then the node-blocks file, and
                    // may read the IPAM state meanwhile: never hold the state lock
                    // across the call. Everything the request could fail on here was
                    // checked above; a concurrent ADD taking the address while the lock
                    // is released is caught by the second pass, which leaves the block
                    // claimed for the node (as a low-water claim would) and nothing
                    // allocated.
                    drop(locked);
                    match claimer.claim(ip, block) {
                        Ok(ClaimAnswer::Claimed) => {}
                        Ok(ClaimAnswer::Taken { owner }) => {
                            return Err(IpamError::RequestedBlockOfAnotherNode {
                                ip,
                                block,
                                owner,
                            });
                        }
                        Err(why) => {
                            return Err(IpamError::RequestedBlockClaimFailed { ip, block, why });
                        }
                    }
                    let locked = self.state.lock()?;
                    if !self.owned_blocks()?.contains(&block) {
                        return Err(IpamError::RequestedBlockClaimFailed {
                            ip,
                            block,
                            why: "the agent answered that it claimed the block, but the \
                                  node-blocks file does not list it"
                                .into(),
                        });
                    }
                    return self.allocate_requested(locked, key, network, ip, block);
                }
            }
        }
        self.allocate_requested(locked, key, network, ip, block)
    }

    fn allocate_requested(
        &self,
        mut locked: LockedState,
        key: &AttachmentKey,
        network: &str,
        ip: Ipv4Addr,
        block: Ipv4Net,
    ) -> Result<Assigned, IpamError> {
        let (ip, block) = locked
            .allocator
            .allocate_requested(key, network, ip, block, now_unix())
            .map_err(|source| IpamError::Requested { source })?;
        locked.commit()?;
        Ok(Assigned { ip, block })
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
    use crate::blocks::Pool;
    use sluice_cni_protocol::ErrorCode;

    fn standalone(dir: &Path, node: &str) -> NodeIpam {
        NodeIpam::new(IpamSettings {
            node: node.into(),
            pool: Pool::new("10.50.0.0/22".parse().unwrap(), 24).unwrap(),
            state_dir: dir.join(format!("state-{node}")),
            source: BlockSource::DirStore(dir.join("blocks")),
            routes: vec![],
        })
    }

    fn ip(s: &str) -> Option<Ipv4Addr> {
        Some(s.parse().unwrap())
    }

    fn k(c: &str) -> AttachmentKey {
        AttachmentKey::new(c, "eth0")
    }

    fn claims(dir: &Path) -> Vec<(String, String)> {
        block_on(DirStore::new(dir.join("blocks")).list())
            .unwrap()
            .into_iter()
            .map(|c| (c.cidr.to_string(), c.node))
            .collect()
    }

    #[test]
    fn a_requested_address_in_a_free_block_claims_that_block_for_the_node() {
        let d = tempfile::tempdir().unwrap();
        let a = standalone(d.path(), "a");
        let got = a.add(&k("c1"), "net", ip("10.50.2.77")).unwrap();
        assert_eq!(got.ip.to_string(), "10.50.2.77");
        assert_eq!(claims(d.path()), [("10.50.2.0/24".into(), "a".into())]);
        let snap = a.snapshot().unwrap();
        assert!(snap.lookup(&k("c1")).unwrap().0.requested);
        // The next unrequested pod comes from the same (now owned) block.
        let next = a.add(&k("c2"), "net", None).unwrap();
        assert_eq!(next.block.to_string(), "10.50.2.0/24");
        // A repeated ADD of the same attachment and address is the same answer.
        assert_eq!(a.add(&k("c1"), "net", ip("10.50.2.77")).unwrap(), got);
    }

    #[test]
    fn each_bad_request_fails_with_its_code_and_changes_nothing() {
        let d = tempfile::tempdir().unwrap();
        let a = standalone(d.path(), "a");
        let b = standalone(d.path(), "b");
        b.add(&k("b1"), "net", ip("10.50.1.9")).unwrap();
        a.add(&k("a1"), "net", ip("10.50.2.9")).unwrap();
        let before_claims = claims(d.path());
        let before_state = std::fs::read(d.path().join("state-a/allocations.json")).unwrap();
        let cases = [
            (
                "10.60.0.5",
                ErrorCode::RequestedAddressInvalid,
                "outside the pool",
            ),
            ("10.50.3.1", ErrorCode::RequestedAddressInvalid, "tunnel"),
            (
                "10.50.3.255",
                ErrorCode::RequestedAddressInvalid,
                "broadcast",
            ),
            (
                "10.50.1.20",
                ErrorCode::RequestedAddressUnavailable,
                "node b owns",
            ),
            (
                "10.50.2.9",
                ErrorCode::RequestedAddressUnavailable,
                "held by container a1",
            ),
        ];
        for (req, code, says) in cases {
            let e = a.add(&k("new"), "net", ip(req)).unwrap_err();
            assert_eq!(e.cni_code(), code, "{req}: {e}");
            assert!(e.to_string().contains(says), "{req}: {e}");
            assert!(a.snapshot().unwrap().lookup(&k("new")).is_none());
        }
        assert_eq!(claims(d.path()), before_claims, "no block claimed");
        assert_eq!(
            std::fs::read(d.path().join("state-a/allocations.json")).unwrap(),
            before_state,
            "state untouched"
        );
    }

    /// A cluster node's published blocks: node a holds 10.50.0.0/24.
    fn published(dir: &Path) -> std::path::PathBuf {
        let file = dir.join("node-blocks.json");
        node_blocks::write(
            &file,
            &node_blocks::NodeBlocks {
                node: "a".into(),
                blocks: vec!["10.50.0.0/24".parse().unwrap()],
                updated_unix: 0,
            },
        )
        .unwrap();
        file
    }

    #[test]
    fn in_a_cluster_a_requested_address_outside_the_published_blocks_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let file = published(d.path());
        let a = NodeIpam::new(IpamSettings {
            node: "a".into(),
            pool: Pool::new("10.50.0.0/22".parse().unwrap(), 24).unwrap(),
            state_dir: d.path().join("state"),
            source: BlockSource::NodeBlocksFile(file),
            routes: vec![],
        });
        assert_eq!(
            a.add(&k("c"), "net", ip("10.50.0.40"))
                .unwrap()
                .ip
                .to_string(),
            "10.50.0.40"
        );
        let e = a.add(&k("d"), "net", ip("10.50.1.40")).unwrap_err();
        assert_eq!(e.cni_code(), ErrorCode::RequestedAddressUnavailable);
        assert!(e.to_string().contains("not published"), "{e}");
    }

    /// Plays the agent: publishes the block in the node-blocks file when it is free,
    /// answers Taken for node b's block, and fails for anything else.
    struct FakeAgent {
        file: std::path::PathBuf,
        asked: std::sync::Arc<std::sync::Mutex<Vec<Ipv4Net>>>,
    }

    impl BlockClaimer for FakeAgent {
        fn claim(&self, _ip: Ipv4Addr, block: Ipv4Net) -> Result<ClaimAnswer, String> {
            self.asked.lock().unwrap().push(block);
            match block.to_string().as_str() {
                "10.50.1.0/24" => {
                    let mut nb = node_blocks::read(&self.file).unwrap().unwrap();
                    nb.blocks.push(block);
                    node_blocks::write(&self.file, &nb).unwrap();
                    Ok(ClaimAnswer::Claimed)
                }
                "10.50.2.0/24" => Ok(ClaimAnswer::Taken { owner: "b".into() }),
                _ => Err("connection refused".into()),
            }
        }
    }

    #[test]
    fn in_a_cluster_the_agent_claims_the_block_of_a_requested_address() {
        let d = tempfile::tempdir().unwrap();
        let file = published(d.path());
        let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let a = NodeIpam::new(IpamSettings {
            node: "a".into(),
            pool: Pool::new("10.50.0.0/22".parse().unwrap(), 24).unwrap(),
            state_dir: d.path().join("state"),
            source: BlockSource::NodeBlocksFile(file.clone()),
            routes: vec![],
        })
        .with_claimer(Box::new(FakeAgent {
            file: file.clone(),
            asked: asked.clone(),
        }));
        // In a held block: the agent is not asked.
        a.add(&k("c"), "net", ip("10.50.0.40")).unwrap();
        assert!(asked.lock().unwrap().is_empty());
        // In a free block: claimed through the agent, then allocated.
        let got = a.add(&k("d"), "net", ip("10.50.1.40")).unwrap();
        assert_eq!(got.block.to_string(), "10.50.1.0/24");
        assert!(a.snapshot().unwrap().lookup(&k("d")).unwrap().0.requested);
        // Another node's block, and an agent that cannot claim: refused, nothing held.
        let before = std::fs::read(d.path().join("state/allocations.json")).unwrap();
        let e = a.add(&k("e"), "net", ip("10.50.2.40")).unwrap_err();
        assert_eq!(e.cni_code(), ErrorCode::RequestedAddressUnavailable);
        assert!(e.to_string().contains("node b owns"), "{e}");
        let e = a.add(&k("f"), "net", ip("10.50.3.40")).unwrap_err();
        assert_eq!(e.cni_code(), ErrorCode::TryAgainLater);
        assert!(e.to_string().contains("connection refused"), "{e}");
        // An address the pool forbids is refused before the agent is asked.
        let e = a.add(&k("g"), "net", ip("10.50.3.255")).unwrap_err();
        assert_eq!(e.cni_code(), ErrorCode::RequestedAddressInvalid);
        assert_eq!(
            std::fs::read(d.path().join("state/allocations.json")).unwrap(),
            before
        );
        assert_eq!(asked.lock().unwrap().len(), 3);
    }

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
