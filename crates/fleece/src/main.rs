//! fleece: a block-storage daemon that serves live disks over NBD and takes
//! point-in-time snapshots of them while they keep taking writes.

mod api;
mod bitmaps;
mod cli;
mod client;
mod config;
mod daemon;
mod error;
mod events;
mod nbd;
mod registry;
mod snapshots;
mod units;

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() {
    let cli = cli::Cli::parse();
    let filter = cli
        .log_level
        .as_deref()
        .and_then(|l| EnvFilter::try_new(l).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    if let Err(e) = cli::run(cli) {
        eprintln!("fleece: error: {e}");
        std::process::exit(1);
    }
}
