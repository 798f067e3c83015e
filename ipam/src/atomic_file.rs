//! Crash-safe file replacement: write a temporary file beside the target, fsync it,
//! rename it over the target, fsync the directory. A reader (or a process restarted
//! after a crash at any point) sees either the old content or the new, never a mix,
//! and once this returns the new content survives a power loss.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

/// Atomically replace `path` with `bytes`. `tmp_suffix` names the temporary file
/// (`<path>.<tmp_suffix>`); callers that hold a lock can use a fixed suffix, others
/// should make it unique (the process id).
pub fn write_atomic(path: &Path, bytes: &[u8], tmp_suffix: &str) -> std::io::Result<()> {
    let dir = parent_dir(path);
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".{tmp_suffix}"));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// fsync a directory, making a rename, link or unlink in it durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

pub(crate) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_content_and_leaves_no_temporary_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state.json");
        write_atomic(&p, b"one", "tmp").unwrap();
        write_atomic(&p, b"two", "tmp").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["state.json"]);
    }

    #[test]
    fn a_failed_write_keeps_the_old_content() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state.json");
        write_atomic(&p, b"one", "tmp").unwrap();
        // A directory where the temporary file should go makes the write fail.
        std::fs::create_dir(d.path().join("state.json.tmp")).unwrap();
        assert!(write_atomic(&p, b"two", "tmp").is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
    }
}
