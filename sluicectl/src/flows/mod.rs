//! `sluicectl flows`: a node's denied-connection records (docs/flows.md).
//!
//! ```text
//! sluicectl flows [--node NODE] [--follow] [--denied] [--namespace NS]
//!                 [--since RFC3339] [--limit N] [-o text|json]
//! ```
//! On the node itself the records come from the agent over the node-local API
//! ([`local`]); `--node` naming another node reads them through the cluster
//! ([`remote`]): the sluice agent pod on that node, reached through the API server's
//! pod proxy, from anywhere kubectl works (`--kubeconfig`, `--context`). `-o json`
//! prints each record as one JSON object per line, the fields of [`FlowRecord`]
//! exactly; `-o text` one line per record for people.
//!
//! Where the records come from is a [`Source`]; printing and filtering stay here.

pub mod local;
mod remote;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use sluice_node_files::flows::{FlowQuery, FlowRecord};
use sluice_node_files::paths;

use crate::apiserver::KubeArgs;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// The filters every way of reading records shares (`flows` and `lab flows`).
#[derive(clap::Args, Debug, Clone)]
pub struct QueryArgs {
    /// Keep printing new records as the agent makes them.
    #[arg(long)]
    pub follow: bool,
    /// Only denied connections.
    #[arg(long)]
    pub denied: bool,
    /// Only connections from or to a pod in this namespace.
    #[arg(long)]
    pub namespace: Option<String>,
    /// Only records at or after this RFC 3339 time.
    #[arg(long)]
    pub since: Option<String>,
    /// At most the last N matching records (before following).
    #[arg(long)]
    pub limit: Option<usize>,
}

impl QueryArgs {
    pub fn query(&self) -> anyhow::Result<FlowQuery> {
        if let Some(s) = &self.since
            && sluice_node_files::flows::parse_rfc3339(s).is_none()
        {
            anyhow::bail!("--since {s:?} is not an RFC 3339 time (e.g. 2026-12-06T07:00:00Z)");
        }
        Ok(FlowQuery {
            since: self.since.clone(),
            denied: self.denied,
            namespace: self.namespace.clone(),
            limit: self.limit,
            follow: self.follow,
        })
    }
}

#[derive(clap::Args)]
pub struct Args {
    /// The node whose records to read (default: this node). Another node is read
    /// through the cluster's API server (the sluice agent pod on that node; needs
    /// `get` on `pods/proxy` in kube-system).
    #[arg(long)]
    pub node: Option<String>,
    #[command(flatten)]
    pub query: QueryArgs,
    /// The agent's node-local API socket (on this node).
    #[arg(long, default_value = paths::AGENT_SOCKET)]
    pub agent_socket: PathBuf,
    /// The agent's status file, which names this node.
    #[arg(long, default_value = paths::AGENT_STATUS_FILE, hide = true)]
    pub status_file: PathBuf,
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Text)]
    pub output: Output,
    #[command(flatten)]
    pub kube: KubeArgs,
}

/// Where records are read from.
pub enum Source {
    /// This node's agent, over its socket.
    Local(PathBuf),
    /// Another node's agent, through the cluster's API server.
    Remote { node: String, kube: KubeArgs },
}

#[derive(Debug, thiserror::Error)]
pub enum FlowsError {
    #[error(transparent)]
    Agent(#[from] sluice_node_files::local_api::CallError),
    #[error(transparent)]
    Remote(#[from] remote::RemoteError),
}

/// The node the agent on this host serves, from its status file.
fn this_node(status_file: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(status_file).ok()?;
    serde_json::from_str::<sluice_node_files::status::AgentStatus>(&text)
        .ok()
        .map(|s| s.node)
}

/// This node's agent when `--node` is absent or names this node; else the cluster
/// path to that node's agent.
pub fn source(args: &Args) -> Source {
    match &args.node {
        Some(wanted) if this_node(&args.status_file).as_deref() != Some(wanted.as_str()) => {
            Source::Remote {
                node: wanted.clone(),
                kube: args.kube.clone(),
            }
        }
        _ => Source::Local(args.agent_socket.clone()),
    }
}

/// Reads records from `source`, handing each to `each` (false stops).
pub fn read(
    source: &Source,
    query: &FlowQuery,
    each: impl FnMut(FlowRecord) -> bool,
) -> Result<(), FlowsError> {
    match source {
        Source::Local(socket) => local::read(socket, query, each),
        Source::Remote { node, kube } => {
            let mut each = each;
            // `each` saying stop (stdout gone) ends the stream like a closed pipe.
            let stop = std::io::ErrorKind::BrokenPipe;
            let r = remote::read(kube, node, query, |record| {
                if each(record) {
                    Ok(())
                } else {
                    Err(stop.into())
                }
            });
            match r {
                Err(remote::RemoteError::Output(e)) if e.kind() == stop => Ok(()),
                r => Ok(r?),
            }
        }
    }
}

/// One record as `-o` asks.
pub fn line(record: &FlowRecord, output: Output) -> String {
    match output {
        Output::Json => serde_json::to_string(record).expect("records serialize"),
        Output::Text => record.text(),
    }
}

/// Prints records as they come; stops quietly when stdout goes (a pager quit).
pub fn print_each(output: Output) -> impl FnMut(FlowRecord) -> bool {
    move |r| {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", line(&r, output)).is_ok() && out.flush().is_ok()
    }
}

pub fn exec(args: Args) -> anyhow::Result<ExitCode> {
    let query = args.query.query()?;
    let source = source(&args);
    read(&source, &query, print_each(args.output))?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_carry_exactly_the_record_fields() {
        let r = FlowRecord {
            time: "2026-12-06T07:00:00.000Z".into(),
            node: "node-2".into(),
            verdict: "deny".into(),
            direction: "ingress".into(),
            src: "default/client".into(),
            dst: "ip:10.0.0.9".into(),
            protocol: "TCP".into(),
            port: 80,
            reason: "isolated".into(),
            policies: vec!["prod/deny-all".into()],
        };
        assert_eq!(
            line(&r, Output::Json),
            r#"{"time":"2026-12-06T07:00:00.000Z","node":"node-2","verdict":"deny","direction":"ingress","src":"default/client","dst":"ip:10.0.0.9","protocol":"TCP","port":80,"reason":"isolated","policies":["prod/deny-all"]}"#
        );
        assert_eq!(
            line(&r, Output::Text),
            "2026-12-06T07:00:00.000Z node-2 deny ingress default/client -> ip:10.0.0.9 TCP/80 isolated prod/deny-all"
        );
    }

    #[test]
    fn another_node_is_read_through_the_cluster_and_this_one_over_the_socket() {
        let dir = std::env::temp_dir().join(format!("sluicectl-flows-{}", std::process::id()));
        let args = |node: Option<&str>| Args {
            node: node.map(str::to_string),
            query: QueryArgs {
                follow: false,
                denied: false,
                namespace: None,
                since: None,
                limit: None,
            },
            agent_socket: dir.join("agent.sock"),
            status_file: dir.join("missing.json"),
            output: Output::Text,
            kube: KubeArgs::default(),
        };
        assert!(
            matches!(source(&args(Some("node-9"))), Source::Remote { node, .. } if node == "node-9")
        );
        assert!(matches!(source(&args(None)), Source::Local(_)));
    }
}
