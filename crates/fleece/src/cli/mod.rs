//! Command line: `fleece serve`, and client commands that are thin
//! wrappers over the control API (one file per resource), reading its
//! answers as `api::types`.

mod args;
mod backup;
mod bitmap;
mod client;
mod disk;
mod image;
mod output;
mod snapshot;
mod status;

pub use args::{Cli, Command};

use crate::daemon::{self, ServeOptions};
use crate::error::Result;
use client::Client;
use output::Output;

/// What every client command works with.
pub struct Ctx {
    /// The daemon.
    pub client: Client,
    /// Where answers go.
    pub out: Output,
}

/// Runs a command parsed by [`Cli::parse_checked`].
pub fn run(cli: Cli) -> Result<()> {
    let ctx = Ctx {
        client: Client::new(cli.control.clone().unwrap_or_default()),
        out: Output { json: cli.json },
    };
    match cli.command {
        Command::Serve(a) => daemon::serve(ServeOptions {
            disks: a.disks,
            config: a.config,
            nbd: a.nbd,
            control: cli.control,
            state_dir: a.state_dir,
            io_threads: a.io_threads,
            handshake_timeout: a.handshake_timeout,
            max_handshakes: a.max_handshakes,
            tls: crate::nbd::tls::TlsFiles {
                cert: a.tls_cert,
                key: a.tls_key,
                ca: a.tls_ca,
                mode: a.tls,
            },
            insecure_tcp: a.insecure_tcp,
        }),
        Command::Status => status::status(&ctx),
        Command::Disk { action } => disk::run(&ctx, action),
        Command::Snapshot { action } => snapshot::run(&ctx, action),
        Command::Bitmap { action } => bitmap::run(&ctx, action),
        Command::Backup { action } => backup::run(&ctx, action),
        Command::Transaction { file } => status::transaction(&ctx, &file),
        Command::Events => status::events(&ctx),
        Command::Image { action } => image::run(&ctx, action),
    }
}
