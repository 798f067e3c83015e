//! Crash-safe file replacement, the one implementation every sluice process uses:
//! write a temporary file beside the target, fsync it, rename it over the target,
//! fsync the directory. A reader (or a process restarted after a crash at any
//! point) sees either the old content or the new, never a mix, and once this
//! returns the new content survives a power loss.
//!
//! [`write_atomic_locked`] can skip the two fsyncs ([`Survives::ProcessCrash`]) for
//! state that a reboot makes worthless anyway: the rename alone already gives
//! old-or-new to every process, and to a writer restarted after kill -9, because
//! the page cache outlives the process; only a power loss can then leave the file
//! old, empty or torn, and the caller must be ready for that. It then also keeps
//! its temporary file between writes and swaps it with the target
//! (`renameat2(RENAME_EXCHANGE)`) instead of renaming over it: no inode is created
//! or freed per write. On ext4 that is most of a small write's cost: a rename over
//! a file flushes the new file's data (`auto_da_alloc`) and frees the old one's
//! blocks, with a synchronous discard when the file system is mounted `discard`
//! (0.4-2 ms a write here against 0.06 ms for the swap; cni-plugin/BENCH.md).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Atomically replace `path` with `bytes`, creating its directory if needed. `mode`
/// sets the file's permission bits; `None` leaves them to the umask.
///
/// The temporary file is `.<name>.<pid>.tmp` in the same directory: unique per
/// process, and a dot file ending in `.tmp`, which no directory reader of sluice
/// (manifests, block store) picks up.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: Option<u32>) -> std::io::Result<()> {
    write_via(path, &temp_path(path), bytes, mode, Survives::PowerLoss)
}

/// What a replacement must survive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Survives {
    /// The writer's crash (kill -9) at any point: rename-atomic, no fsync.
    ProcessCrash,
    /// A power loss or kernel crash too: file and directory fsynced.
    PowerLoss,
}

/// [`write_atomic`] for a writer that holds an exclusive lock over `path` (IPAM's
/// state under its lock file): the temporary file is always `.<name>.tmp`, so a
/// writer killed between create and rename leaves at most one stray file, which
/// the next write replaces, instead of one per killed process.
///
/// With [`Survives::ProcessCrash`] that file is kept: each write overwrites it in
/// place and swaps it with `path`, so after a write it holds the previous content.
/// That is safe only because every reader and writer of `path` holds the lock (a
/// reader without it could still be reading the inode the next write overwrites).
pub fn write_atomic_locked(
    path: &Path,
    bytes: &[u8],
    mode: Option<u32>,
    survives: Survives,
) -> std::io::Result<()> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = parent_dir(path).join(format!(".{name}.tmp"));
    match survives {
        Survives::ProcessCrash => write_by_exchange(path, &tmp, bytes, mode),
        Survives::PowerLoss => write_via(path, &tmp, bytes, mode, survives),
    }
}

/// Overwrite `tmp` in place (created if missing), then swap it with `path`. Neither
/// truncates to zero (ext4 would flush on close) nor creates or frees an inode once
/// both files exist. A crash before the swap leaves `path` as it was; the swap is
/// atomic. When `path` does not exist yet, or the file system cannot swap, a plain
/// rename does the same job.
fn write_by_exchange(
    path: &Path,
    tmp: &Path,
    bytes: &[u8],
    mode: Option<u32>,
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    std::fs::create_dir_all(parent_dir(path))?;
    let result = (|| {
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(tmp)?;
        f.write_all_at(bytes, 0)?;
        f.set_len(bytes.len() as u64)?;
        if let Some(mode) = mode {
            f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        }
        match exchange(tmp, path) {
            Ok(()) => Ok(()),
            // No target yet (the first write), or no RENAME_EXCHANGE here (a file
            // system without it: EINVAL; a kernel before 3.15: ENOSYS).
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOENT | libc::EINVAL | libc::ENOSYS)
                ) =>
            {
                std::fs::rename(tmp, path)
            }
            Err(e) => Err(e),
        }
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result
}

/// `renameat2(a, b, RENAME_EXCHANGE)`, through the raw syscall: musl's wrapper is
/// newer than the kernel call.
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: both are NUL-terminated paths that outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn write_via(
    path: &Path,
    tmp: &Path,
    bytes: &[u8],
    mode: Option<u32>,
    survives: Survives,
) -> std::io::Result<()> {
    let dir = parent_dir(path);
    std::fs::create_dir_all(dir)?;
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(tmp)?;
        f.write_all(bytes)?;
        if let Some(mode) = mode {
            f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        }
        if survives == Survives::PowerLoss {
            f.sync_all()?;
        }
        std::fs::rename(tmp, path)?;
        if survives == Survives::PowerLoss {
            sync_dir(dir)?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result
}

/// The temporary file [`write_atomic`] writes before the rename.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    parent_dir(path).join(format!(".{name}.{}.tmp", std::process::id()))
}

/// fsync a directory, making a rename, link or unlink in it durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The directory holding `path` (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn replaces_content_and_leaves_no_temporary_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state.json");
        write_atomic(&p, b"one", None).unwrap();
        write_atomic(&p, b"two", None).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(names(d.path()), ["state.json"]);
    }

    #[test]
    fn a_failed_write_keeps_the_old_content() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state.json");
        write_atomic(&p, b"one", None).unwrap();
        // A directory where the temporary file should go makes the write fail.
        std::fs::create_dir(temp_path(&p)).unwrap();
        assert!(write_atomic(&p, b"two", None).is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
    }

    #[test]
    fn creates_the_directory_and_sets_the_mode() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("run/sluice/bin");
        write_atomic(&p, b"#!", Some(0o755)).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(names(p.parent().unwrap()), ["bin"]);
    }

    #[test]
    fn a_locked_write_that_survives_only_a_crash_swaps_and_keeps_one_temporary_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state.json");
        let w = |b: &[u8]| write_atomic_locked(&p, b, None, Survives::ProcessCrash).unwrap();
        w(b"first, the longest");
        assert_eq!(std::fs::read(&p).unwrap(), b"first, the longest");
        assert_eq!(names(d.path()), ["state.json"]);
        w(b"second");
        w(b"third!");
        w(b"4");
        assert_eq!(std::fs::read(&p).unwrap(), b"4");
        // The kept temporary file holds the previous content, cut to its length.
        assert_eq!(
            std::fs::read(d.path().join(".state.json.tmp")).unwrap(),
            b"third!"
        );
        assert_eq!(names(d.path()), [".state.json.tmp", "state.json"]);
        // A durable write still leaves no temporary file.
        write_atomic_locked(&p, b"five", None, Survives::PowerLoss).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"five");
        assert_eq!(names(d.path()), ["state.json"]);
    }

    #[test]
    fn the_temporary_file_is_a_dot_file_ending_in_tmp() {
        let t = temp_path(Path::new("/m/pod.yaml"));
        let name = t.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with(".pod.yaml.") && name.ends_with(".tmp"),
            "{name}"
        );
        assert_eq!(t.parent(), Some(Path::new("/m")));
    }
}
