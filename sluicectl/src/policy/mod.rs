//! `sluicectl policy`: `check` answers NetworkPolicy questions with the reference
//! evaluator; `render` prints what a node's dataplane would be programmed with.
//! Both read the same inputs, loaded here: files (`-f PATH`), or without `-f` the
//! live cluster's objects from its API server, each collection's JSON handed to the
//! same manifest reader as a file's text, so the two give the same answer.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use sluice_policy::Cluster;

use crate::apiserver::{ApiServer, KubeArgs};

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

/// Where `check` and `render` read the cluster from.
#[derive(clap::Args)]
pub(crate) struct Source {
    /// Manifests: YAML or JSON files, or directories of them (recursively),
    /// multi-document, as `kubectl get -o yaml` writes them. Without -f, the live
    /// cluster is read from its API server (kubeconfig found as kubectl finds it).
    #[arg(short = 'f', long = "filename", value_name = "PATH")]
    files: Vec<PathBuf>,
    #[command(flatten)]
    kube: KubeArgs,
}

/// The collections the live cluster is read from, as `(path, optional)`: an optional
/// one the API server does not serve (404: the CRD is not installed) holds nothing.
const COLLECTIONS: [(&str, bool); 5] = [
    ("/api/v1/namespaces", false),
    ("/api/v1/nodes", false),
    ("/api/v1/pods", false),
    ("/apis/networking.k8s.io/v1/networkpolicies", false),
    (
        "/apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies",
        true,
    ),
];

/// A text to read, and where it came from for messages: a file's path, or
/// `Kubernetes API PATH` for a collection.
struct Input {
    origin: String,
    text: String,
}

/// The texts to read: each file's (see [`load_cluster`]), or each collection's JSON
/// from the API server; and notes for stderr.
fn texts(source: &Source) -> anyhow::Result<(Vec<Input>, Vec<String>)> {
    if !source.files.is_empty() {
        if source.kube.given() {
            anyhow::bail!(
                "--kubeconfig and --context choose a live cluster, -f reads files: give one or the other"
            );
        }
        return Ok((file_texts(&source.files)?, Vec::new()));
    }
    let api = ApiServer::connect(&source.kube)?;
    let mut texts = Vec::new();
    let mut notes = Vec::new();
    for (path, optional) in COLLECTIONS {
        match api.get_text(path)? {
            Some(text) => texts.push(Input {
                origin: format!("Kubernetes API {path}"),
                text,
            }),
            None if optional => notes.push(format!(
                "the API server does not serve {path} (the ClusterNetworkPolicy CRD is not installed): no ClusterNetworkPolicies read"
            )),
            None => anyhow::bail!("Kubernetes API server: GET {path}: 404 Not Found"),
        }
    }
    Ok((texts, notes))
}

/// Every file named in `paths` (directories searched recursively for
/// .yaml/.yml/.json, in name order) and its text.
fn file_texts(paths: &[PathBuf]) -> anyhow::Result<Vec<Input>> {
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
    files
        .into_iter()
        .map(|file| {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            Ok(Input {
                origin: file.display().to_string(),
                text,
            })
        })
        .collect()
}

/// The cluster described by `source`, and the reader's warnings: unknown kinds, and
/// objects that do not convert, by file (or collection), kind and name. Read
/// leniently, as the agent reads the same objects: a malformed NetworkPolicy lands in
/// `Cluster::rejected_policies` (the pods it selects are held), any other malformed
/// object is left out. Only a document that is not YAML/JSON at all is an error.
/// A later object with the same key replaces an earlier one.
pub(crate) fn load_cluster(source: &Source) -> anyhow::Result<(Cluster, Vec<String>)> {
    let (texts, mut warnings) = texts(source)?;
    let mut cluster = Cluster::default();
    for Input { origin, text } in texts {
        let parsed = sluice_policy::read_documents(&origin, &text)?;
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
