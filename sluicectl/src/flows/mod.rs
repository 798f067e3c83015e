//! `sluicectl flows`: a node's policy verdict records (node-files' `FlowRecord`),
//! printed as text lines or, with `-o json`, as JSON lines.
//!
//! `--node NODE` reads them through the cluster ([`remote`]): the sluice agent pod on
//! that node, reached through the API server's pod proxy, from anywhere kubectl works.

use std::io::Write;
use std::process::ExitCode;

use sluice_node_files::flows::FlowRecord;

use crate::apiserver::KubeArgs;

mod remote;

#[derive(clap::Args)]
pub struct Args {
    /// The node whose records to read, through the cluster's API server (the sluice
    /// agent pod on that node; needs `get` on `pods/proxy` in kube-system).
    #[arg(long, value_name = "NODE")]
    node: Option<String>,
    /// Keep printing records as they arrive.
    #[arg(long)]
    follow: bool,
    /// Only denied connections.
    #[arg(long)]
    denied: bool,
    /// Only records whose source or destination pod is in this namespace.
    #[arg(long, value_name = "NAMESPACE")]
    namespace: Option<String>,
    /// Output format: text lines, or JSON lines (one object per record).
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Text)]
    output: Output,
    #[command(flatten)]
    kube: KubeArgs,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Text,
    Json,
}

pub fn exec(args: Args) -> anyhow::Result<ExitCode> {
    let Some(node) = &args.node else {
        anyhow::bail!(
            "--node NODE is required (reading the records of the node this runs on is not built here)"
        );
    };
    let filter = remote::Filter {
        since: None,
        denied: args.denied,
        namespace: args.namespace.clone(),
        limit: None,
        follow: args.follow,
    };
    let mut out = std::io::stdout().lock();
    let result = remote::read(&args.kube, node, &filter, |record| {
        writeln!(out, "{}", line(&record, args.output))
    });
    match result {
        // A reader that stopped early (`| head`) is not a failure.
        Err(remote::RemoteError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            Ok(ExitCode::SUCCESS)
        }
        r => r.map(|()| ExitCode::SUCCESS).map_err(Into::into),
    }
}

fn line(record: &FlowRecord, output: Output) -> String {
    match output {
        Output::Text => record.text(),
        Output::Json => serde_json::to_string(record).expect("a FlowRecord serializes"),
    }
}
