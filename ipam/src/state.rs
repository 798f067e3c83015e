//! The node's allocation state on disk: `<stateDir>/allocations.json`, changed only
//! under an exclusive lock on `<stateDir>/lock` (std `File::lock`, an flock that the
//! kernel drops when the holder dies, so a killed ADD never wedges the node) and
//! replaced atomically (see `sluice_node_files::atomic`).
//!
//! A state file that does not parse or breaks an allocator invariant is reported,
//! never reset: starting over would hand out addresses that running pods still hold.
//!
//! Durability: the state is replaced without fsync, by swapping it with a kept
//! temporary file (`sluice_node_files::atomic::write_atomic_locked`; every reader
//! takes the lock, which that needs). The swap alone survives kill -9 of the writer
//! at any point; only a power loss (or kernel crash)
//! can lose or tear an unsynced write, and that also kills every pod of the node,
//! so no running pod can hold an address from the lost state. What must not happen
//! is that a torn file from before the reboot wedges the node. `<stateDir>/boot-id`
//! records, durably (fsynced once per boot, before the boot's first unsynced state
//! write), the boot that last wrote the state: a state file that does not parse
//! while the marker names an earlier boot was torn by that boot's end, and is moved
//! aside (`allocations.json.torn-<unix time>`) instead of refused. A damaged file
//! written in the current boot is still refused, as above. docs/architecture.md
//! has the table of every IPAM write and what it protects against.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::allocator::Allocator;
use sluice_node_files::atomic::{Survives, write_atomic_locked};

pub const STATE_FILE: &str = "allocations.json";
pub const LOCK_FILE: &str = "lock";
/// The boot that last wrote the state (see the module docs).
pub const BOOT_FILE: &str = "boot-id";
/// The kernel's id of the current boot, new at every boot.
const KERNEL_BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";
const FORMAT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "IPAM state directory {dir} is not writable ({source}); make it writable by the \
         CNI plugin (root) or point ipam.stateDir at a writable directory"
    )]
    NotWritable {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// ENOSPC or EDQUOT: the new state could not be written, and the old one stands.
    #[error(
        "IPAM state directory {dir} is full ({source}); the previous state is intact. Free \
         space on its file system (or raise the quota), then retry"
    )]
    Full {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "IPAM state file {path} is corrupt: {reason}. sluice-ipam will not reset it, because \
         that could give running pods' addresses to new pods. Repair it by hand, or move it \
         aside and then delete and recreate every pod on this node"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error("IPAM state {path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The on-disk form: the allocator with a format version.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StateFile {
    version: u32,
    #[serde(flatten)]
    allocator: Allocator,
}

/// A node's IPAM state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    pub fn new(dir: impl Into<PathBuf>) -> StateDir {
        StateDir { dir: dir.into() }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn state_path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// Lock the state exclusively (creating the directory when missing) and load it.
    /// Blocks while another process holds the lock.
    pub fn lock(&self) -> Result<LockedState, StateError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| self.write_error("create", &self.dir, e))?;
        let lock_path = self.dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| self.write_error("open lock", &lock_path, e))?;
        lock.lock().map_err(|e| StateError::Io {
            path: lock_path,
            op: "lock",
            source: e,
        })?;
        let (allocator, survives) = self.load_in_this_boot(kernel_boot_id().as_deref())?;
        Ok(LockedState {
            _lock: lock,
            dir: self.clone(),
            allocator,
            survives,
        })
    }

    /// Load under the exclusive lock, and make sure the boot marker names `boot`
    /// before anything is written unsynced. Returns how commits must be written:
    /// without a boot id (no /proc) there is no marker and every commit is fsynced.
    fn load_in_this_boot(&self, boot: Option<&str>) -> Result<(Allocator, Survives), StateError> {
        let Some(boot) = boot else {
            return Ok((self.load()?, Survives::PowerLoss));
        };
        let marker_path = self.dir.join(BOOT_FILE);
        let marker = std::fs::read_to_string(&marker_path).ok();
        if marker.as_deref().map(str::trim) == Some(boot) {
            return Ok((self.load()?, Survives::ProcessCrash));
        }
        let allocator = match self.load() {
            Ok(a) => a,
            // Written unsynced by an earlier boot (the marker says so) and torn by
            // its end: none of its pods survived that, so nothing holds its addresses.
            Err(StateError::Corrupt { path, reason }) if marker.is_some() => {
                let aside = self.dir.join(format!("{STATE_FILE}.torn-{}", now_unix()));
                std::fs::rename(&path, &aside)
                    .map_err(|e| self.write_error("move aside", &path, e))?;
                eprintln!(
                    "sluice-ipam: {} from an earlier boot was damaged ({reason}); moved to {} and started empty",
                    path.display(),
                    aside.display()
                );
                Allocator::new()
            }
            Err(e) => return Err(e),
        };
        write_atomic_locked(&marker_path, boot.as_bytes(), None, Survives::PowerLoss)
            .map_err(|e| self.write_error("write", &marker_path, e))?;
        Ok((allocator, Survives::ProcessCrash))
    }

    /// Lock exclusively only if the state directory exists (DEL and GC on a node that
    /// never allocated have nothing to do and must not create it).
    pub fn lock_existing(&self) -> Result<Option<LockedState>, StateError> {
        if !self.dir.exists() {
            return Ok(None);
        }
        self.lock().map(Some)
    }

    /// A consistent snapshot for readers (`sluicectl ipam show`, the agent), taken
    /// under a shared lock so it never sees a half-finished change.
    pub fn snapshot(&self) -> Result<Allocator, StateError> {
        let lock_path = self.dir.join(LOCK_FILE);
        let lock = match File::open(&lock_path) {
            Ok(f) => Some(f),
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => {
                return Err(StateError::Io {
                    path: lock_path,
                    op: "open lock",
                    source: e,
                });
            }
        };
        if let Some(l) = &lock {
            l.lock_shared().map_err(|e| StateError::Io {
                path: lock_path.clone(),
                op: "lock",
                source: e,
            })?;
        }
        self.load()
    }

    fn load(&self) -> Result<Allocator, StateError> {
        let path = self.state_path();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Allocator::new()),
            Err(e) => {
                return Err(StateError::Io {
                    path,
                    op: "read",
                    source: e,
                });
            }
        };
        let corrupt = |reason: String| StateError::Corrupt {
            path: path.clone(),
            reason,
        };
        let file: StateFile = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        if file.version != FORMAT_VERSION {
            return Err(corrupt(format!(
                "format version {} (this sluice-ipam reads version {FORMAT_VERSION})",
                file.version
            )));
        }
        file.allocator
            .validate()
            .map_err(|e| corrupt(e.to_string()))?;
        Ok(file.allocator)
    }

    fn write_error(&self, op: &'static str, path: &Path, e: std::io::Error) -> StateError {
        match e.kind() {
            ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem => {
                StateError::NotWritable {
                    dir: self.dir.clone(),
                    source: e,
                }
            }
            ErrorKind::StorageFull | ErrorKind::QuotaExceeded => StateError::Full {
                dir: self.dir.clone(),
                source: e,
            },
            _ => StateError::Io {
                path: path.to_path_buf(),
                op,
                source: e,
            },
        }
    }
}

/// The state, loaded under the exclusive lock; the lock is held until this is dropped.
pub struct LockedState {
    _lock: File,
    dir: StateDir,
    pub allocator: Allocator,
    survives: Survives,
}

impl LockedState {
    /// Write the allocator back atomically. Until this returns nothing is changed on
    /// disk; a crash before the rename leaves the previous state intact. Not fsynced
    /// (see the module docs): a power loss may undo it, along with every pod.
    pub fn commit(&self) -> Result<(), StateError> {
        let file = StateFile {
            version: FORMAT_VERSION,
            allocator: self.allocator.clone(),
        };
        let bytes = serde_json::to_vec(&file).expect("state serializes");
        let path = self.dir.state_path();
        // Under the state lock: one writer at a time.
        write_atomic_locked(&path, &bytes, None, self.survives)
            .map_err(|e| self.dir.write_error("write", &path, e))
    }
}

fn kernel_boot_id() -> Option<String> {
    std::fs::read_to_string(KERNEL_BOOT_ID)
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allocator::AttachmentKey;

    #[test]
    fn a_torn_state_from_an_earlier_boot_is_moved_aside_and_one_from_this_boot_refused() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::new(d.path());
        let path = d.path().join(STATE_FILE);
        // Boot "a" writes the marker; its state is then torn.
        s.load_in_this_boot(Some("a")).unwrap();
        assert_eq!(
            std::fs::read_to_string(d.path().join(BOOT_FILE)).unwrap(),
            "a"
        );
        std::fs::write(&path, b"").unwrap();
        // Still boot "a": real damage, refused and left alone.
        assert!(matches!(
            s.load_in_this_boot(Some("a")),
            Err(StateError::Corrupt { .. })
        ));
        assert!(path.exists());
        // Boot "b": the torn file is the earlier boot's; moved aside, empty state.
        let (a, survives) = s.load_in_this_boot(Some("b")).unwrap();
        assert!(a.is_empty());
        assert_eq!(survives, Survives::ProcessCrash);
        assert!(!path.exists());
        assert_eq!(
            std::fs::read_to_string(d.path().join(BOOT_FILE)).unwrap(),
            "b"
        );
        let aside = std::fs::read_dir(d.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("allocations.json.torn-")
            })
            .count();
        assert_eq!(aside, 1);
    }

    #[test]
    fn a_damaged_state_without_a_boot_marker_is_refused_as_it_was_written_durably() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::new(d.path());
        std::fs::write(d.path().join(STATE_FILE), b"{").unwrap();
        assert!(matches!(
            s.load_in_this_boot(Some("b")),
            Err(StateError::Corrupt { .. })
        ));
        // Without a boot id every commit is fsynced.
        std::fs::remove_file(d.path().join(STATE_FILE)).unwrap();
        assert_eq!(s.load_in_this_boot(None).unwrap().1, Survives::PowerLoss);
    }

    fn owned() -> Vec<ipnet::Ipv4Net> {
        vec!["10.244.1.0/24".parse().unwrap()]
    }

    #[test]
    fn committed_state_is_read_back() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::new(d.path().join("ipam"));
        let mut l = s.lock().unwrap();
        l.allocator
            .allocate(&AttachmentKey::new("c", "eth0"), &owned(), 7)
            .unwrap();
        l.commit().unwrap();
        drop(l);
        let snap = s.snapshot().unwrap();
        assert_eq!(snap.len(), 1);
        assert_eq!(snap.allocations().next().unwrap().allocated_unix, 7);
    }

    #[test]
    fn uncommitted_changes_are_not_persisted() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::new(d.path());
        let mut l = s.lock().unwrap();
        l.allocator
            .allocate(&AttachmentKey::new("c", "eth0"), &owned(), 0)
            .unwrap();
        drop(l);
        assert!(s.snapshot().unwrap().is_empty());
    }

    #[test]
    fn corrupt_state_is_reported_and_left_alone() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::new(d.path());
        let path = d.path().join(STATE_FILE);
        std::fs::write(&path, b"{\"version\":1,\"blocks\":[").unwrap();
        let Err(err) = s.lock() else {
            panic!("corrupt state accepted")
        };
        assert!(matches!(err, StateError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("will not reset"), "{err}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"{\"version\":1,\"blocks\":["
        );
    }

    #[test]
    fn missing_state_dir_is_not_created_by_lock_existing() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::new(d.path().join("absent"));
        assert!(s.lock_existing().unwrap().is_none());
        assert!(!d.path().join("absent").exists());
        assert!(s.snapshot().unwrap().is_empty());
    }

    #[test]
    fn exclusive_lock_serializes_two_holders() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::new(d.path());
        let l = s.lock().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let s2 = s.clone();
        let t = std::thread::spawn(move || {
            let _l2 = s2.lock().unwrap();
            tx.send(()).unwrap();
        });
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(200))
                .is_err(),
            "second lock got in"
        );
        drop(l);
        rx.recv_timeout(std::time::Duration::from_secs(5))
            .expect("second lock after release");
        t.join().unwrap();
    }
}
