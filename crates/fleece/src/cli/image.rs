//! `fleece image ...`: client-side image work, no daemon needed. Images
//! are made by the block crate's image factory, the code the daemon uses.

use fleece_block::image::{self, CreateOptions};
use serde_json::json;

use super::args::ImageCommand;
use super::Ctx;
use crate::config::check_format;
use crate::error::{Error, Result};
use crate::units::{human, parse_size};

/// Runs a `fleece image` subcommand.
pub fn run(ctx: &Ctx, action: ImageCommand) -> Result<()> {
    match action {
        ImageCommand::Create {
            path,
            size,
            format,
            cluster_size,
            backing,
        } => {
            let opts = CreateOptions {
                format: check_format(&format)?,
                size: size.as_deref().map(parse_size).transpose()?,
                cluster_size: cluster_size.as_deref().map(parse_size).transpose()?,
                backing: backing.clone(),
            };
            if opts.size.is_none() && opts.backing.is_none() {
                return Err(Error::invalid(
                    "--size is needed (or --backing, whose size it takes)",
                ));
            }
            image::create(&path, &opts).map_err(|e| Error::invalid(e.to_string()))?;
            let img = image::open(
                &path,
                &fleece_block::ImageOptions {
                    read_only: true,
                    format: Some(opts.format),
                },
            )
            .map_err(|e| Error::invalid(e.to_string()))?;
            let size = img.size();
            let cluster = img.device().capabilities().preferred_io;
            let mut line = format!(
                "created {} image {} ({})",
                opts.format,
                path.display(),
                human(size)
            );
            if opts.format == fleece_block::Format::Qcow2 {
                line.push_str(&format!(", {} clusters", human(cluster as u64)));
            }
            if let Some(b) = &backing {
                line.push_str(&format!(", backing file {b}"));
            }
            ctx.out.done(
                json!({
                    "path": path,
                    "format": opts.format.name(),
                    "size": size,
                    "cluster_size": (opts.format == fleece_block::Format::Qcow2).then_some(cluster),
                    "backing": backing,
                }),
                line,
            )
        }
    }
}
