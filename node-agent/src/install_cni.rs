//! `sluice-agent install-cni`: what the DaemonSet's init container does. Copies the
//! CNI binaries into the node's CNI bin dir and writes the conflist, each through a
//! temp file and a rename in the destination directory, so kubelet or a running ADD
//! never sees a half-written binary or config. Idempotent: unchanged files are not
//! rewritten.

use std::path::{Path, PathBuf};

use sluice_node_files::conflist::{BlockSource, NodeConflist, TemplateError};
use sluice_node_files::paths::NodePaths;

use crate::config::InstallCniConfig;
use crate::status::{StatusError, write_atomic};

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Write(#[from] StatusError),
    #[error(transparent)]
    BadConflist(#[from] TemplateError),
}

/// What an install did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstallReport {
    pub written: Vec<PathBuf>,
    pub unchanged: Vec<PathBuf>,
}

/// The conflist of docs/node-files.md for this node: the files the agent keeps, and
/// the node-blocks file the agent publishes.
pub fn node_conflist(cfg: &InstallCniConfig) -> NodeConflist {
    NodeConflist {
        node_name: cfg.node_name.clone(),
        pool: cfg.pool.to_string(),
        block_size: cfg.block_size,
        mtu: cfg.mtu,
        require_agent: true,
        paths: NodePaths {
            mtu_file: cfg.files.mtu_file.clone(),
            agent_status_file: cfg.files.status_file.clone(),
            agent_socket: cfg.files.agent_socket.clone(),
            ipam_state_dir: cfg.files.ipam_state_dir.clone(),
            node_blocks_file: cfg.files.node_blocks_file.clone(),
            cni_bin_dir: cfg.cni_bin_dir.clone(),
            cni_conf_dir: cfg.cni_conf_dir.clone(),
            ..NodePaths::default()
        },
        blocks: BlockSource::NodeBlocksFile,
    }
}

/// The conflist text: `template` (an operator's, with placeholders) filled in, or
/// the built-in one. Pure.
pub fn render_conflist(
    template: Option<&str>,
    cfg: &InstallCniConfig,
) -> Result<String, InstallError> {
    let conflist = node_conflist(cfg);
    Ok(match template {
        Some(t) => conflist.fill_template(t)?,
        None => conflist.to_text(),
    })
}

fn install_file(
    dest: &Path,
    contents: &[u8],
    mode: u32,
    report: &mut InstallReport,
) -> Result<(), InstallError> {
    use std::os::unix::fs::PermissionsExt;
    let same = std::fs::read(dest).is_ok_and(|old| old == contents)
        && std::fs::metadata(dest).is_ok_and(|m| m.permissions().mode() & 0o777 == mode);
    if same {
        report.unchanged.push(dest.to_path_buf());
        return Ok(());
    }
    write_atomic(dest, contents, mode)?;
    report.written.push(dest.to_path_buf());
    Ok(())
}

pub fn install(cfg: &InstallCniConfig) -> Result<InstallReport, InstallError> {
    let mut report = InstallReport::default();
    for bin in &cfg.binaries {
        let src = cfg.source_bin_dir.join(bin);
        let bytes = std::fs::read(&src).map_err(|source| InstallError::Read {
            path: src.clone(),
            source,
        })?;
        install_file(&cfg.cni_bin_dir.join(bin), &bytes, 0o755, &mut report)?;
    }
    let template = match &cfg.template {
        Some(p) => Some(
            std::fs::read_to_string(p).map_err(|source| InstallError::Read {
                path: p.clone(),
                source,
            })?,
        ),
        None => None,
    };
    let conflist = render_conflist(template.as_deref(), cfg)?;
    install_file(
        &cfg.cni_conf_dir.join(&cfg.conflist_name),
        conflist.as_bytes(),
        0o644,
        &mut report,
    )?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Cli, Command};
    use clap::Parser;

    fn cfg(root: &Path) -> InstallCniConfig {
        let cli = Cli::parse_from([
            "sluice-agent".to_string(),
            "install-cni".into(),
            "--node-name".into(),
            "node-\"7\"".into(),
            "--source-bin-dir".into(),
            root.join("image").display().to_string(),
            "--cni-bin-dir".into(),
            root.join("opt/cni/bin").display().to_string(),
            "--cni-conf-dir".into(),
            root.join("etc/cni/net.d").display().to_string(),
            "--mtu".into(),
            "1430".into(),
        ]);
        match cli.command {
            Command::InstallCni(c) => c,
            _ => unreachable!(),
        }
    }

    #[test]
    fn installs_binaries_and_conflist_then_is_idempotent() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("image")).unwrap();
        std::fs::write(root.path().join("image/sluice"), b"plugin v1").unwrap();
        std::fs::write(root.path().join("image/sluice-ipam"), b"ipam v1").unwrap();
        let c = cfg(root.path());

        let first = install(&c).unwrap();
        assert_eq!(first.written.len(), 3);
        let conf = root.path().join("etc/cni/net.d/10-sluice.conflist");
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&conf).unwrap()).unwrap();
        assert_eq!(v["plugins"][0]["mtu"], 1430);
        assert_eq!(v["plugins"][0]["ipam"]["nodeName"], "node-\"7\"");
        assert_eq!(v["plugins"][0]["ipam"]["pool"], "10.244.0.0/16");
        assert_eq!(v["plugins"][0]["ipam"]["blockSize"], 24);
        assert_eq!(
            v["plugins"][0]["agentStatusFile"],
            "/run/sluice/agent-status.json"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(root.path().join("opt/cni/bin/sluice"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);

        let second = install(&c).unwrap();
        assert!(second.written.is_empty(), "{second:?}");
        assert_eq!(second.unchanged.len(), 3);

        // A new image replaces the binary; no temp file stays behind.
        std::fs::write(root.path().join("image/sluice"), b"plugin v2").unwrap();
        let third = install(&c).unwrap();
        assert_eq!(third.written, vec![root.path().join("opt/cni/bin/sluice")]);
        assert_eq!(
            std::fs::read(root.path().join("opt/cni/bin/sluice")).unwrap(),
            b"plugin v2"
        );
        let names: Vec<_> = std::fs::read_dir(root.path().join("opt/cni/bin"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn missing_binary_is_a_clear_error() {
        let root = tempfile::tempdir().unwrap();
        let err = install(&cfg(root.path())).unwrap_err();
        assert!(err.to_string().contains("image/sluice"), "{err}");
    }
}
