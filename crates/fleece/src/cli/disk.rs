//! `fleece disk ...`

use serde_json::{json, Value};

use super::args::DiskCommand;
use super::output::{enc, table};
use super::Ctx;
use crate::api::types::{AddDisk, Disk, ResizeDisk, Size};
use crate::error::Result;
use crate::units::human;

/// Runs a `fleece disk` subcommand.
pub fn run(ctx: &Ctx, action: DiskCommand) -> Result<()> {
    match action {
        DiskCommand::List => {
            let answer: Value = ctx.client.get("/v1/disks")?;
            ctx.out.show(answer, |disks: Vec<Disk>| {
                let rows: Vec<Vec<String>> = disks
                    .into_iter()
                    .map(|d| {
                        vec![
                            d.name,
                            d.format,
                            human(d.size),
                            d.connections.to_string(),
                            d.path.display().to_string(),
                            d.uri,
                        ]
                    })
                    .collect();
                table(&["NAME", "FORMAT", "SIZE", "CONNS", "PATH", "URI"], &rows);
            })
        }
        DiskCommand::Add { name, path, format } => {
            // The daemon may run elsewhere in the tree: send an absolute path.
            let path = std::path::absolute(&path).unwrap_or(path);
            let answer: Value = ctx.client.post("/v1/disks", &AddDisk { name, path, format })?;
            ctx.out.show(answer, |d: Disk| {
                println!(
                    "added disk {} ({}, {}): {}",
                    d.name,
                    d.format,
                    human(d.size),
                    d.uri
                );
            })
        }
        DiskCommand::Resize { name, size, shrink } => {
            let size: Size = size.parse()?;
            let path = format!("/v1/disks/{}/resize", enc(&name));
            let answer: Value = ctx.client.post(&path, &ResizeDisk { size, shrink })?;
            ctx.out.show(answer, |d: Disk| {
                println!("disk {name} is now {}", human(d.size));
            })
        }
        DiskCommand::Remove { name, force } => {
            let force = if force { "?force=true" } else { "" };
            ctx.client
                .delete::<()>(&format!("/v1/disks/{}{force}", enc(&name)))?;
            ctx.out
                .done(json!({ "removed": name }), format!("removed disk {name}"))
        }
    }
}
