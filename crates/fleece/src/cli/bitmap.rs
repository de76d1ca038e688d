//! `fleece bitmap ...`

use serde_json::Value;

use super::args::{BitmapArgs, BitmapCommand};
use super::output::{enc, table};
use super::Ctx;
use crate::api::types::{AddBitmap, Bitmap, MergeSources, Size};
use crate::error::Result;
use crate::units::human;

/// Runs a `fleece bitmap` subcommand.
pub fn run(ctx: &Ctx, action: BitmapCommand) -> Result<()> {
    let c = &ctx.client;
    let (answer, done): (Value, String) = match action {
        BitmapCommand::Add {
            disk,
            name,
            granularity,
            disabled,
            transient,
        } => {
            let body = AddBitmap {
                granularity: granularity.as_deref().map(str::parse::<Size>).transpose()?,
                name,
                disabled,
                persistent: Some(!transient),
            };
            let done = format!("added bitmap {} to {disk}", body.name);
            (c.post(&format!("/v1/disks/{}/bitmaps", enc(&disk)), &body)?, done)
        }
        BitmapCommand::Remove(a) => {
            let done = format!("removed bitmap {}", a.name);
            (c.delete(&bitmap_path(&a))?, done)
        }
        BitmapCommand::Clear(a) => op(ctx, a, "clear", "cleared")?,
        BitmapCommand::Enable(a) => op(ctx, a, "enable", "enabled")?,
        BitmapCommand::Disable(a) => op(ctx, a, "disable", "disabled")?,
        BitmapCommand::Merge {
            disk,
            target,
            sources,
        } => {
            let done = format!("merged {} into {target}", sources.join(", "));
            let path = format!("/v1/disks/{}/bitmaps/{}/merge", enc(&disk), enc(&target));
            (c.post(&path, &MergeSources { sources })?, done)
        }
        BitmapCommand::List { disk } => {
            let answer: Value = c.get(&format!("/v1/disks/{}/bitmaps", enc(&disk)))?;
            return ctx.out.show(answer, |list: Vec<Bitmap>| {
                let rows: Vec<Vec<String>> = list
                    .into_iter()
                    .map(|b| {
                        vec![
                            b.name,
                            human(b.granularity),
                            human(b.dirty_bytes),
                            b.recording.to_string(),
                            b.persistent.to_string(),
                            b.exact.to_string(),
                        ]
                    })
                    .collect();
                table(
                    &["NAME", "GRANULARITY", "DIRTY", "RECORDING", "PERSISTENT", "EXACT"],
                    &rows,
                );
            });
        }
    };
    // Most bitmap commands have no answer (204): `true` says it is done.
    let json = if answer.is_null() {
        Value::Bool(true)
    } else {
        answer
    };
    ctx.out.done(json, done)
}

fn bitmap_path(a: &BitmapArgs) -> String {
    format!("/v1/disks/{}/bitmaps/{}", enc(&a.disk), enc(&a.name))
}

fn op(ctx: &Ctx, a: BitmapArgs, verb: &str, done: &str) -> Result<(Value, String)> {
    let answer = ctx.client.post_empty(&format!("{}/{verb}", bitmap_path(&a)))?;
    Ok((answer, format!("{done} bitmap {}", a.name)))
}
