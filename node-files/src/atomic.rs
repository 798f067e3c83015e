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
//! old, empty or torn, and the caller must be ready for that.

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
pub fn write_atomic_locked(
    path: &Path,
    bytes: &[u8],
    mode: Option<u32>,
    survives: Survives,
) -> std::io::Result<()> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = parent_dir(path).join(format!(".{name}.tmp"));
    write_via(path, &tmp, bytes, mode, survives)
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
