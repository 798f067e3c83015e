//! The directory block store: one file per claimed block in a directory shared by
//! every claimant (several lab "nodes" on one host, or one standalone host).
//!
//! A claim writes the record to a private temporary file, fsyncs it and hard-links it
//! to the block's name. `link(2)` fails with EEXIST when the name exists, so exactly
//! one claimant wins, and the winner's record is complete the moment the name appears
//! (an exclusive create followed by a write would leave an empty, ownerless file if
//! the claimant died in between).

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use super::{BlockClaim, BlockStore, ClaimOutcome, StoreError};
use crate::blocks::{block_name, parse_block_name};
use sluice_node_files::atomic::sync_dir;

/// The record in a block's file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ClaimRecord {
    cidr: Ipv4Net,
    node: String,
    claimed_unix: u64,
}

/// A directory of block claims.
#[derive(Debug, Clone)]
pub struct DirStore {
    dir: PathBuf,
}

impl DirStore {
    pub fn new(dir: impl Into<PathBuf>) -> DirStore {
        DirStore { dir: dir.into() }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn io(&self, op: &'static str, path: &Path, source: std::io::Error) -> StoreError {
        StoreError::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    }

    fn read_claim(&self, path: &Path, cidr: Ipv4Net) -> Result<Option<BlockClaim>, StoreError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io("read", path, e)),
        };
        let record: ClaimRecord =
            serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        if record.cidr != cidr {
            return Err(StoreError::Corrupt {
                path: path.to_path_buf(),
                reason: format!("file names block {cidr} but records {}", record.cidr),
            });
        }
        Ok(Some(BlockClaim {
            cidr,
            node: record.node,
        }))
    }

    fn list_sync(&self) -> Result<Vec<BlockClaim>, StoreError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io("list", &self.dir, e)),
        };
        let mut claims = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| self.io("list", &self.dir, e))?;
            // Temporary files of in-flight (or crashed) claims start with a dot and
            // never parse as a block name.
            let Some(cidr) = entry.file_name().to_str().and_then(parse_block_name) else {
                remove_if_abandoned(&entry);
                continue;
            };
            if let Some(claim) = self.read_claim(&entry.path(), cidr)? {
                claims.push(claim);
            }
        }
        claims.sort();
        Ok(claims)
    }

    fn claim_sync(&self, cidr: Ipv4Net, node: &str) -> Result<ClaimOutcome, StoreError> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| self.io("create directory", &self.dir, e))?;
        let name = block_name(cidr);
        let target = self.dir.join(&name);
        let tmp = self
            .dir
            .join(format!(".{name}.claim-{}-{}", std::process::id(), unique()));
        let record = ClaimRecord {
            cidr,
            node: node.to_string(),
            claimed_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let bytes = serde_json::to_vec(&record).expect("a claim record serializes");
        let write_tmp = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()
        };
        if let Err(e) = write_tmp() {
            let _ = std::fs::remove_file(&tmp);
            // Name the store, not the temporary file that is gone by now.
            return Err(self.io("write claim", &self.dir, e));
        }
        let linked = std::fs::hard_link(&tmp, &target);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                sync_dir(&self.dir).map_err(|e| self.io("sync", &self.dir, e))?;
                Ok(ClaimOutcome::Claimed)
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(ClaimOutcome::Taken),
            Err(e) => Err(self.io("claim", &target, e)),
        }
    }

    fn release_sync(&self, cidr: Ipv4Net, node: &str) -> Result<bool, StoreError> {
        let path = self.dir.join(block_name(cidr));
        match self.read_claim(&path, cidr)? {
            Some(claim) if claim.node == node => {}
            _ => return Ok(false),
        }
        // Nobody can claim a block whose file exists, so between the read above and
        // the unlink the owner cannot change.
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(self.io("release", &path, e)),
        }
        sync_dir(&self.dir).map_err(|e| self.io("sync", &self.dir, e))?;
        Ok(true)
    }
}

/// How old a claim's temporary file must be before it counts as left behind by a
/// claimant that died between writing it and linking it.
const ABANDONED_AFTER: Duration = Duration::from_secs(600);

/// Remove a claim temporary file that a crashed claimant left behind. Age, not the
/// writer's pid, decides: the agent and the CNI binary may live in different pid
/// namespaces, and a live claim takes milliseconds.
fn remove_if_abandoned(entry: &std::fs::DirEntry) {
    let name = entry.file_name();
    let Some(name) = name.to_str() else { return };
    if !(name.starts_with('.') && name.contains(".claim-")) {
        return;
    }
    let old = entry
        .metadata()
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age > ABANDONED_AFTER);
    if old {
        let _ = std::fs::remove_file(entry.path());
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl BlockStore for DirStore {
    async fn list(&self) -> Result<Vec<BlockClaim>, StoreError> {
        self.list_sync()
    }

    async fn claim(&self, cidr: Ipv4Net, node: &str) -> Result<ClaimOutcome, StoreError> {
        self.claim_sync(cidr, node)
    }

    async fn release(&self, cidr: Ipv4Net, node: &str) -> Result<bool, StoreError> {
        self.release_sync(cidr, node)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::block_on::block_on;
    use crate::blocks::{Pool, claim_block, release_orphan_blocks};

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn second_claim_of_a_block_is_taken() {
        let d = tempfile::tempdir().unwrap();
        let s = DirStore::new(d.path().join("blocks"));
        let b = net("10.244.7.0/24");
        assert_eq!(block_on(s.claim(b, "a")).unwrap(), ClaimOutcome::Claimed);
        assert_eq!(block_on(s.claim(b, "b")).unwrap(), ClaimOutcome::Taken);
        assert_eq!(
            block_on(s.list()).unwrap(),
            [BlockClaim {
                cidr: b,
                node: "a".into()
            }]
        );
    }

    #[test]
    fn release_only_frees_the_owners_block() {
        let d = tempfile::tempdir().unwrap();
        let s = DirStore::new(d.path());
        let b = net("10.244.7.0/24");
        block_on(s.claim(b, "a")).unwrap();
        assert!(!block_on(s.release(b, "b")).unwrap());
        assert!(block_on(s.release(b, "a")).unwrap());
        assert!(block_on(s.list()).unwrap().is_empty());
        assert_eq!(block_on(s.claim(b, "b")).unwrap(), ClaimOutcome::Claimed);
    }

    #[test]
    fn abandoned_claim_files_are_cleaned_up_and_fresh_ones_kept() {
        let d = tempfile::tempdir().unwrap();
        let old = d.path().join(".10-244-7-0-24.claim-1-0");
        let fresh = d.path().join(".10-244-8-0-24.claim-2-0");
        std::fs::write(&old, b"{}").unwrap();
        std::fs::write(&fresh, b"{}").unwrap();
        let past = SystemTime::now() - Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(past)
            .unwrap();
        assert!(block_on(DirStore::new(d.path()).list()).unwrap().is_empty());
        assert!(!old.exists());
        assert!(fresh.exists());
    }

    #[test]
    fn a_damaged_block_file_is_an_error_not_a_free_block() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("10-244-7-0-24"), b"{").unwrap();
        let s = DirStore::new(d.path());
        assert!(matches!(
            block_on(s.list()),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn exhausted_pool_is_reported() {
        let d = tempfile::tempdir().unwrap();
        let s = DirStore::new(d.path());
        let pool = Pool::new(net("10.0.0.0/23"), 24).unwrap();
        block_on(claim_block(&s, &pool, "a")).unwrap();
        block_on(claim_block(&s, &pool, "b")).unwrap();
        let err = block_on(claim_block(&s, &pool, "c")).unwrap_err();
        assert!(err.to_string().contains("exhausted"), "{err}");
    }

    #[test]
    fn orphan_release_frees_blocks_of_nodes_that_are_gone() {
        let d = tempfile::tempdir().unwrap();
        let s = DirStore::new(d.path());
        let pool = Pool::new(net("10.0.0.0/16"), 24).unwrap();
        for n in ["a", "b", "c"] {
            block_on(claim_block(&s, &pool, n)).unwrap();
        }
        let live: BTreeSet<String> = ["b".to_string()].into();
        let gone = block_on(release_orphan_blocks(&s, &live)).unwrap();
        let gone: BTreeSet<_> = gone.into_iter().map(|c| c.node).collect();
        assert_eq!(gone, ["a".to_string(), "c".to_string()].into());
        let left: Vec<_> = block_on(s.list())
            .unwrap()
            .into_iter()
            .map(|c| c.node)
            .collect();
        assert_eq!(left, ["b"]);
    }

    #[test]
    fn eight_concurrent_claimants_get_eight_distinct_blocks() {
        let d = tempfile::tempdir().unwrap();
        let pool = Pool::new(net("10.244.0.0/16"), 24).unwrap();
        // Once over the whole pool, and once over a pool of exactly 8 blocks, where
        // every claimant has to fight over the last free ones.
        let pool_of_8 = Pool::new(net("10.244.0.0/21"), 24).unwrap();
        for p in [pool, pool_of_8] {
            let dir = d.path().join(p.cidr().to_string().replace('/', "_"));
            let got: Vec<Ipv4Net> = std::thread::scope(|sc| {
                let handles: Vec<_> = (0..8)
                    .map(|i| {
                        let s = DirStore::new(&dir);
                        sc.spawn(move || {
                            block_on(claim_block(&s, &p, &format!("node-{i}"))).unwrap()
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let distinct: BTreeSet<_> = got.iter().collect();
            assert_eq!(distinct.len(), 8, "{got:?}");
            let claims = block_on(DirStore::new(&dir).list()).unwrap();
            assert_eq!(claims.len(), 8);
        }
    }
}
