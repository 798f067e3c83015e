//! Executing a delegated plugin (the IPAM plugin), per the spec's delegation rules:
//! find the binary named by `type` in `CNI_PATH`, run it with the same environment
//! and the same network config the delegating plugin received (only `CNI_COMMAND`
//! may differ, e.g. DEL to roll back a failed ADD), let its stderr through to ours,
//! and read its stdout as a result or a CNI error.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};

use serde_json::Value;

use crate::protocol::{CniError, CniResult, Command, ErrorCode, Version};

#[derive(Debug, thiserror::Error)]
pub enum DelegateError {
    #[error("plugin name {0:?} must be a bare file name")]
    BadName(String),
    #[error("plugin {plugin:?} not found in CNI_PATH ({searched})")]
    NotFound { plugin: String, searched: String },
    #[error("cannot run plugin {path}: {source}")]
    Spawn {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("plugin {plugin} failed: {error}")]
    Plugin { plugin: String, error: CniError },
    #[error("plugin {plugin} exited with {status} and no CNI error on stdout")]
    Exit { plugin: String, status: String },
    #[error("plugin {plugin} printed an undecodable result: {detail}")]
    BadOutput { plugin: String, detail: String },
}

impl From<DelegateError> for CniError {
    fn from(e: DelegateError) -> CniError {
        match e {
            DelegateError::BadName(_) => {
                CniError::new(ErrorCode::InvalidNetworkConfig, e.to_string())
            }
            DelegateError::NotFound { ref plugin, .. } => CniError::new(
                ErrorCode::IpamPluginNotFound,
                format!(
                    "IPAM plugin {plugin:?} is not installed: put the binary in one of the CNI_PATH directories or fix ipam.type"
                ),
            )
            .with_details(e.to_string()),
            // A delegate's own error keeps its code (11 stays "try again later"):
            // sluice-ipam prints codes of the same registry as ours, so each number
            // still means one thing. A third-party IPAM plugin's codes pass through
            // as well (host-local's 999 stays 999); the message names the plugin.
            DelegateError::Plugin { plugin, error } => CniError {
                code: error.code,
                msg: format!("{plugin}: {}", error.msg),
                details: error.details,
            },
            other => CniError::new(ErrorCode::IpamPluginFailed, other.to_string()),
        }
    }
}

/// Find `plugin` in the `CNI_PATH` directories, first match wins.
pub fn find_in_path(plugin: &str, cni_path: &[PathBuf]) -> Result<PathBuf, DelegateError> {
    if plugin.is_empty() || plugin.contains('/') || plugin == "." || plugin == ".." {
        return Err(DelegateError::BadName(plugin.to_owned()));
    }
    cni_path
        .iter()
        .map(|d| d.join(plugin))
        .find(|p| p.is_file())
        .ok_or_else(|| DelegateError::NotFound {
            plugin: plugin.to_owned(),
            searched: cni_path
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(":"),
        })
}

/// Run a plugin binary with `CNI_COMMAND=command`, the rest of the environment
/// inherited, and `stdin` as its config. Returns its stdout on success (possibly
/// empty); a CNI error it printed becomes [`DelegateError::Plugin`].
pub fn exec(path: &Path, command: Command, stdin: &[u8]) -> Result<Vec<u8>, DelegateError> {
    let plugin = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let spawn_err = |source| DelegateError::Spawn {
        path: path.to_owned(),
        source,
    };
    let spawn = || {
        Process::new(path)
            .env("CNI_COMMAND", command.as_str())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            // The spec: the delegate's stderr goes to the delegating plugin's stderr.
            .stderr(Stdio::inherit())
            .spawn()
    };
    // ETXTBSY: the binary is open for writing somewhere, usually for an instant (an
    // installer copying it into CNI_PATH, or a process that forked while another
    // thread had it open and has not exec'd yet, which is how a test's fresh script
    // meets it). A short retry rides that out; a binary held open longer still fails.
    let mut attempt = 0;
    let mut child = loop {
        match spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempt < 20 => {
                attempt += 1;
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            other => break other.map_err(spawn_err)?,
        }
    };
    // A plugin that exits without reading all of stdin makes this write fail with
    // EPIPE; its exit status and stdout are what count, so ignore that here.
    if let Some(mut sin) = child.stdin.take() {
        let _ = sin.write_all(stdin);
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if out.status.success() {
        return Ok(out.stdout);
    }
    match CniError::from_plugin_output(&out.stdout) {
        Some(error) => Err(DelegateError::Plugin { plugin, error }),
        None => Err(DelegateError::Exit {
            plugin,
            status: out.status.to_string(),
        }),
    }
}

/// ADD through the IPAM plugin: its result, read in whatever version it printed.
pub fn ipam_add(path: &Path, conf: &[u8]) -> Result<CniResult, DelegateError> {
    let stdout = exec(path, Command::Add, conf)?;
    let bad = |detail: String| DelegateError::BadOutput {
        plugin: path.display().to_string(),
        detail,
    };
    let v: Value = serde_json::from_slice(&stdout).map_err(|e| bad(e.to_string()))?;
    CniResult::parse(&v).map_err(|e| bad(format!("{e}")))
}

/// DEL (or CHECK) through the IPAM plugin; success prints nothing.
pub fn ipam_verb(path: &Path, command: Command, conf: &[u8]) -> Result<(), DelegateError> {
    exec(path, command, conf).map(drop)
}

/// The versions a plugin supports, from its VERSION output.
pub fn supported_versions(path: &Path) -> Result<Vec<String>, DelegateError> {
    let req = serde_json::json!({ "cniVersion": Version::LATEST.as_str() }).to_string();
    let stdout = exec(path, Command::Version, req.as_bytes())?;
    let v: Value = serde_json::from_slice(&stdout).map_err(|e| DelegateError::BadOutput {
        plugin: path.display().to_string(),
        detail: e.to_string(),
    })?;
    Ok(v.get("supportedVersions")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default())
}

/// The config to hand the plugin at `path`: the runtime's bytes unchanged, except
/// that a 1.1.0 config given to a plugin that does not speak 1.1.0 (the reference
/// `host-local` 1.1.1 stops at 1.0.0) is relabelled with the newest version both
/// speak. ADD/DEL/CHECK are unchanged between 1.0.0 and 1.1.0, so this only
/// spares a 1.1.0 runtime a needless "incompatible CNI versions". Costs one VERSION
/// exec, and only for 1.1.0 configs.
pub fn config_for(path: &Path, conf: &crate::protocol::NetConf) -> Result<Vec<u8>, DelegateError> {
    if conf.cni_version < Version::V1_1_0 {
        return Ok(conf.bytes.clone());
    }
    let theirs = supported_versions(path)?;
    if theirs.iter().any(|v| v == conf.cni_version.as_str()) {
        return Ok(conf.bytes.clone());
    }
    let Some(best) = crate::protocol::SUPPORTED_VERSIONS
        .into_iter()
        .rev()
        .find(|v| theirs.iter().any(|t| t == v.as_str()))
    else {
        // Nothing in common: let the plugin say so itself.
        return Ok(conf.bytes.clone());
    };
    let mut raw = conf.raw.clone();
    raw["cniVersion"] = best.as_str().into();
    Ok(raw.to_string().into_bytes())
}

/// STATUS or GC through the IPAM plugin, only when it speaks 1.1.0 (the verbs do
/// not exist before; the reference `host-local` 1.1.1 predates them and would fail
/// with "unknown CNI_COMMAND"). Returns whether the delegate was called.
pub fn ipam_status_or_gc(
    path: &Path,
    command: Command,
    conf: &[u8],
) -> Result<bool, DelegateError> {
    debug_assert!(matches!(command, Command::Status | Command::Gc));
    if !supported_versions(path)?
        .iter()
        .any(|v| v == Version::V1_1_0.as_str())
    {
        return Ok(false);
    }
    exec(path, command, conf).map(|_| true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sluice-delegate-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn first_cni_path_directory_wins_and_bad_names_are_refused() {
        let a = tempdir("find-a");
        let b = tempdir("find-b");
        script(&b, "ipam", "true");
        let p = find_in_path("ipam", &[a.clone(), b.clone()]).unwrap();
        assert_eq!(p, b.join("ipam"));
        script(&a, "ipam", "true");
        assert_eq!(
            find_in_path("ipam", &[a.clone(), b.clone()]).unwrap(),
            a.join("ipam")
        );
        assert!(matches!(
            find_in_path("../ipam", std::slice::from_ref(&a)),
            Err(DelegateError::BadName(_))
        ));
        let e: CniError = find_in_path("nope", &[a.clone(), b.clone()])
            .unwrap_err()
            .into();
        assert_eq!(e.code, ErrorCode::IpamPluginNotFound.code());
        let _ = std::fs::remove_dir_all(a);
        let _ = std::fs::remove_dir_all(b);
    }

    #[test]
    fn the_delegate_sees_the_command_and_our_stdin() {
        let d = tempdir("exec");
        let p = script(
            &d,
            "echo-ipam",
            r#"read -r conf; echo "{\"cniVersion\":\"1.0.0\",\"ips\":[{\"address\":\"10.0.0.2/32\"}],\"dns\":{\"domain\":\"$CNI_COMMAND\"}}""#,
        );
        let r = ipam_add(&p, b"{\"cniVersion\":\"1.0.0\"}\n").unwrap();
        assert_eq!(r.ips[0].address.to_string(), "10.0.0.2/32");
        assert_eq!(r.dns.domain.as_deref(), Some("ADD"));
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn a_delegate_error_keeps_its_code_and_a_silent_failure_is_ours() {
        let d = tempdir("err");
        let p = script(
            &d,
            "busy",
            r#"echo '{"cniVersion":"1.0.0","code":11,"msg":"locked"}'; exit 1"#,
        );
        let e: CniError = ipam_verb(&p, Command::Del, b"{}").unwrap_err().into();
        assert_eq!((e.code, e.msg.as_str()), (11, "busy: locked"));
        // sluice-ipam's codes are the registry's and pass through.
        let p = script(
            &d,
            "sluice-ipam",
            r#"echo '{"cniVersion":"1.0.0","code":111,"msg":"ours"}'; exit 1"#,
        );
        let e: CniError = ipam_verb(&p, Command::Add, b"{}").unwrap_err().into();
        assert_eq!(e.code, ErrorCode::StateNotWritable.code());
        let p = script(&d, "crash", "exit 3");
        let e: CniError = ipam_verb(&p, Command::Del, b"{}").unwrap_err().into();
        assert_eq!(e.code, ErrorCode::IpamPluginFailed.code());
        let p = script(&d, "garbage", "echo not-json");
        let e: CniError = ipam_add(&p, b"{}").unwrap_err().into();
        assert_eq!(e.code, ErrorCode::IpamPluginFailed.code());
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn a_1_1_0_config_is_relabelled_for_a_1_0_0_delegate_and_kept_otherwise() {
        let d = tempdir("relabel");
        let old = script(
            &d,
            "old",
            r#"echo '{"cniVersion":"1.0.0","supportedVersions":["0.3.1","0.4.0","1.0.0"]}'"#,
        );
        let conf = crate::protocol::NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"n","type":"sluice","ipam":{"type":"old"},"x":1}"#,
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&config_for(&old, &conf).unwrap()).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["x"], 1);
        let new = script(
            &d,
            "new",
            r#"echo '{"cniVersion":"1.1.0","supportedVersions":["1.0.0","1.1.0"]}'"#,
        );
        assert_eq!(config_for(&new, &conf).unwrap(), conf.bytes);
        let c100 = crate::protocol::NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"n","type":"sluice"}"#,
        )
        .unwrap();
        // No VERSION call at all below 1.1.0: a missing binary is not touched.
        assert_eq!(
            config_for(Path::new("/nonexistent"), &c100).unwrap(),
            c100.bytes
        );
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn status_and_gc_skip_a_delegate_without_1_1_0() {
        let d = tempdir("status");
        let old = script(
            &d,
            "old",
            r#"[ "$CNI_COMMAND" = VERSION ] && echo '{"cniVersion":"1.0.0","supportedVersions":["0.4.0","1.0.0"]}' && exit 0; exit 9"#,
        );
        assert!(!ipam_status_or_gc(&old, Command::Status, b"{}").unwrap());
        let new = script(
            &d,
            "new",
            r#"[ "$CNI_COMMAND" = VERSION ] && echo '{"cniVersion":"1.1.0","supportedVersions":["1.0.0","1.1.0"]}' && exit 0
[ "$CNI_COMMAND" = STATUS ] && echo '{"cniVersion":"1.1.0","code":50,"msg":"no block"}' && exit 1; exit 0"#,
        );
        assert!(ipam_status_or_gc(&new, Command::Gc, b"{}").unwrap());
        let e: CniError = ipam_status_or_gc(&new, Command::Status, b"{}")
            .unwrap_err()
            .into();
        assert_eq!(e.code, 50);
        let _ = std::fs::remove_dir_all(d);
    }
}
