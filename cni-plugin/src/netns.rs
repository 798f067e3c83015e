//! Network namespaces by path (`/run/netns/x`, `/var/run/netns/x`,
//! `/proc/<pid>/ns/net`), and running a closure inside one on this thread.
//!
//! `setns` affects the calling thread only; the plugin is single-threaded, so
//! entering and leaving around a short closure is safe. A guard returns to the
//! original namespace even when the closure panics.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sched::{CloneFlags, setns};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("network namespace {0} does not exist")]
    Missing(PathBuf),
    #[error("cannot open network namespace {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot enter network namespace {path}: {source}")]
    Enter { path: PathBuf, source: nix::Error },
    #[error("cannot return to the host network namespace: {0}")]
    Return(nix::Error),
}

/// An open handle on a network namespace.
pub struct Netns {
    file: File,
    path: PathBuf,
}

impl Netns {
    /// Open the namespace at `path`. A path that does not exist is
    /// [`NetnsError::Missing`] (the runtime's sandbox is gone).
    pub fn open(path: &Path) -> Result<Netns, NetnsError> {
        match File::open(path) {
            Ok(file) => Ok(Netns {
                file,
                path: path.to_owned(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(NetnsError::Missing(path.to_owned()))
            }
            // /proc/<pid>/ns/net of a process that exited: ESRCH or ENOENT.
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                Err(NetnsError::Missing(path.to_owned()))
            }
            Err(source) => Err(NetnsError::Open {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// The calling thread's current namespace.
    pub fn current() -> Result<Netns, NetnsError> {
        Netns::open(Path::new("/proc/thread-self/ns/net"))
    }

    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Run `f` with this thread inside the namespace, then return to where it was.
    /// Fails if the path is not a network namespace (setns: EINVAL).
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> Result<T, NetnsError> {
        let home = Netns::current()?;
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
            path: self.path.clone(),
            source,
        })?;
        let guard = Return { home: &home };
        let out = f();
        guard.back()?;
        Ok(out)
    }
}

/// Returns the thread to its namespace on drop (a panic in the closure), or
/// explicitly with an error to report.
struct Return<'a> {
    home: &'a Netns,
}

impl Return<'_> {
    fn back(self) -> Result<(), NetnsError> {
        let r = setns(self.home.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(NetnsError::Return);
        std::mem::forget(self);
        r
    }
}

impl Drop for Return<'_> {
    fn drop(&mut self) {
        // Staying in the pod's namespace would make every later host operation
        // act on the pod: abort rather than risk that.
        if setns(self.home.file.as_fd(), CloneFlags::CLONE_NEWNET).is_err() {
            std::process::abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own_ns() -> PathBuf {
        std::fs::read_link("/proc/thread-self/ns/net").unwrap()
    }

    #[test]
    fn a_missing_path_is_missing() {
        assert!(matches!(
            Netns::open(Path::new("/run/netns/sluice-does-not-exist")),
            Err(NetnsError::Missing(_))
        ));
    }

    #[test]
    fn run_enters_and_returns() {
        if !sluice_testkit::require_root("netns_run_enters_and_returns") {
            return;
        }
        let holder = sluice_testkit::NetnsHolder::new();
        let ns = Netns::open(holder.path()).unwrap();
        let before = own_ns();
        let inside = ns.run(own_ns).unwrap();
        assert_ne!(inside, before);
        assert_eq!(inside, std::fs::read_link(holder.path()).unwrap());
        assert_eq!(own_ns(), before);
    }

    #[test]
    fn a_file_that_is_not_a_namespace_cannot_be_entered() {
        if !sluice_testkit::require_root("netns_not_a_namespace") {
            return;
        }
        let ns = Netns::open(Path::new("/proc/self/status")).unwrap();
        assert!(matches!(ns.run(|| ()), Err(NetnsError::Enter { .. })));
    }
}
