//! `sluicectl policy`: `check` answers NetworkPolicy questions with the reference
//! evaluator; `render` prints what a node's dataplane would be programmed with.
//! Both read the same inputs (`-f PATH`), loaded here.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use sluice_policy::Cluster;

mod check;
mod render;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Would this connection be allowed? (no kernel needed)
    Check(check::Args),
    /// Print the iptables-restore and ipset restore text a node would get.
    Render(render::Args),
}

pub fn exec(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        Command::Check(a) => check::exec(a),
        Command::Render(a) => render::exec(a),
    }
}

/// The cluster described by `paths` (files, or directories searched recursively for
/// .yaml/.yml/.json, in name order), and the reader's warnings: unknown kinds, and
/// objects that do not convert, by file, kind and name. Read leniently, as the
/// agent reads the same files: a malformed NetworkPolicy lands in
/// `Cluster::rejected_policies` (the pods it selects are held), any other malformed
/// object is left out. Only a document that is not YAML/JSON at all is an error.
/// A later object with the same key replaces an earlier one.
pub(crate) fn load_cluster(paths: &[PathBuf]) -> anyhow::Result<(Cluster, Vec<String>)> {
    let mut files = Vec::new();
    for path in paths {
        let meta = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
        if meta.is_dir() {
            manifest_files(path, &mut files)?;
        } else {
            // A file named explicitly is read whatever its extension.
            files.push(path.clone());
        }
    }
    let mut cluster = Cluster::default();
    let mut warnings = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let parsed = sluice_policy::read_documents(&file.display().to_string(), &text)?;
        parsed.add_to(&mut cluster);
        warnings.extend(parsed.warnings);
        warnings.extend(parsed.rejected.iter().map(|e| {
            if e.holds_pods() {
                format!("{e}; the pods it selects are held fail-closed (denied both ways)")
            } else {
                format!("{e}; left out")
            }
        }));
    }
    Ok((cluster, warnings))
}

fn manifest_files(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let mut entries = std::fs::read_dir(dir)
        .with_context(|| format!("reading directory {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading directory {}", dir.display()))?;
    entries.sort();
    for path in entries {
        if path.is_dir() {
            manifest_files(&path, out)?;
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            out.push(path);
        }
    }
    Ok(())
}
