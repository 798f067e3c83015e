//! `sluice-agent`: parse, set up logging, dispatch.

use anyhow::Context;
use clap::Parser;
use sluice_agent::config::{Cli, Command, LogFormat};

fn init_logging(format: LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only for a person at a terminal: container logs and pipes get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(cfg) => {
            init_logging(cfg.log_format, &cfg.log);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the tokio runtime")?;
            rt.block_on(sluice_agent::run::run(*cfg))
                .context("sluice-agent run")?;
        }
        Command::InstallCni(cfg) => {
            init_logging(LogFormat::Text, "info");
            let report =
                sluice_agent::install_cni::install(&cfg).context("sluice-agent install-cni")?;
            for p in &report.written {
                tracing::info!(path = %p.display(), "installed");
            }
            for p in &report.unchanged {
                tracing::info!(path = %p.display(), "unchanged");
            }
        }
    }
    Ok(())
}
