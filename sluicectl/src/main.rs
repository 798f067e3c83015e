//! sluicectl: the operator's and developer's tool. `main` only parses and dispatches;
//! each subcommand lives in its own module with an `exec` entry.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

// The live cluster's API server (policy without -f, flows --node).
mod apiserver;
mod flows;
mod ipam;
mod lab;
mod policy;

#[derive(Parser)]
#[command(
    name = "sluicectl",
    version,
    about = "Inspect and exercise a sluice network"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Answer NetworkPolicy questions without a kernel; render a node's rules.
    Policy(policy::Args),
    /// Show IPAM blocks and allocations.
    Ipam(ipam::Args),
    /// A node's denied-connection records: what was dropped, and which policy did it.
    Flows(flows::Args),
    /// A multi-node cluster on one host in network namespaces.
    Lab(lab::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Policy(args) => policy::exec(args),
        Command::Ipam(args) => ipam::exec(args),
        Command::Flows(args) => flows::exec(args),
        Command::Lab(args) => lab::exec(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("sluicectl: {err:#}");
            ExitCode::FAILURE
        }
    }
}
