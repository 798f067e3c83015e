//! `sluicectl policy`: `check` answers NetworkPolicy questions with the reference
//! evaluator; `render` prints what a node's dataplane would be programmed with.

use std::process::ExitCode;

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
