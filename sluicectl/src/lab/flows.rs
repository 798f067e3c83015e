//! `sluicectl lab flows`: each lab node's denied-connection records, read from its
//! agent's node-local API socket under the node's root (what `sluicectl flows` does
//! on a real node). Nodes in order, each node's records oldest first.

use std::process::ExitCode;

use crate::flows::{self, Output, QueryArgs, Source};

use super::state;

#[derive(clap::Args)]
pub struct FlowsArgs {
    #[arg(long)]
    pub name: String,
    /// Only this node's records (default: every node's).
    #[arg(long)]
    pub node: Option<String>,
    #[command(flatten)]
    pub query: QueryArgs,
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

pub fn exec(args: FlowsArgs) -> anyhow::Result<ExitCode> {
    let st = state::load(&args.name)?;
    let query = args.query.query()?;
    let nodes: Vec<_> = st
        .nodes
        .iter()
        .filter(|n| args.node.as_ref().is_none_or(|w| &n.name == w))
        .collect();
    if nodes.is_empty() {
        anyhow::bail!(
            "lab {} has no node {:?}",
            args.name,
            args.node.as_deref().unwrap_or("")
        );
    }
    if query.follow && nodes.len() > 1 {
        anyhow::bail!("--follow reads one node: add --node");
    }
    for n in nodes {
        let socket = sluice_node_files::paths::NodePaths::under(&n.root).agent_socket;
        flows::read(
            &Source::Local(socket),
            &query,
            flows::print_each(args.output),
        )?;
    }
    Ok(ExitCode::SUCCESS)
}
