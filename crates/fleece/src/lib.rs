//! fleece: a block-storage daemon that serves live disks over NBD and takes
//! point-in-time snapshots of them while they keep taking writes.
//!
//! This library is the whole program: the `fleece` binary (`main.rs`) only
//! calls [`main`]. It is a library so that the fuzz targets (`fuzz/` at the
//! top of the repository) can reach the parsers that read what clients
//! send, through [`parsers`]; nothing here is an interface for other crates.

mod api;
mod bitmaps;
mod cli;
mod clients;
mod config;
mod daemon;
mod disks;
mod error;
mod events;
mod jobs;
mod nbd;
mod registry;
mod snapshots;
mod state;
mod txn;
mod units;

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// The `fleece` command: parses the command line, sets up logging, runs
/// the command and exits with status 1 on an error.
pub fn main() {
    let cli = cli::Cli::parse_checked();
    if !matches!(cli.command, cli::Command::Serve(_)) {
        // A client command whose stdout is closed (`fleece disk list | head
        // -1`) ends quietly, as other Unix tools do: Rust ignores SIGPIPE,
        // which would turn the write into a panic. The daemon keeps ignoring
        // it (a client hanging up must not kill it).
        // SAFETY: restoring a default signal disposition before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let filter = match cli.log_level.as_deref().filter(|l| !l.trim().is_empty()) {
        None => EnvFilter::new("info"),
        Some(l) => match EnvFilter::try_new(l) {
            Ok(f) => f,
            Err(e) => {
                eprintln!(
                    "fleece: error: log level {l:?} (from --log-level or RUST_LOG) is not valid: {e}; \
                     use error, warn, info, debug or trace"
                );
                std::process::exit(1);
            }
        },
    };
    // Colour codes only where someone reads them: not in log files.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
    if let Err(e) = cli::run(cli) {
        eprintln!("fleece: error: {e}");
        std::process::exit(1);
    }
}

/// The parsers of what clients send, for the fuzz targets: the control
/// API's request decoding (the route table, percent-escapes, query strings
/// and the JSON request bodies) and the NBD server's request framing.
pub mod parsers {
    pub use crate::api::routes::{parse_query, percent_decode, route, Route, Routed};
    pub use crate::api::types::{
        Action, AddBitmap, AddDisk, CreateSnapshot, MergeSources, ResizeDisk, SetSpeed, StartBackup,
        Transaction,
    };
    pub use crate::api::MAX_BODY;
    pub use crate::nbd::exports::MAX_PAYLOAD;
    pub use crate::nbd::frame::{Frame, Input};
}
