//! `fleece snapshot ...`

use serde_json::{json, Value};

use super::args::{CreateArgs, SnapshotCommand};
use super::output::{enc, or_dash, table, utc};
use super::Ctx;
use crate::api::types::{CreateSnapshot, Size, Snapshot};
use crate::error::{Error, Result};
use crate::units::human;

/// Runs a `fleece snapshot` subcommand.
pub fn run(ctx: &Ctx, action: SnapshotCommand) -> Result<()> {
    match action {
        SnapshotCommand::Create(a) => {
            let answer: Value = ctx.client.post("/v1/snapshots", &request(a)?)?;
            ctx.out.show(answer, |made: Vec<Snapshot>| {
                for s in &made {
                    println!("created snapshot {}: {}", s.export, s.uri);
                }
            })
        }
        SnapshotCommand::List { disk } => {
            let path = match &disk {
                Some(d) => format!("/v1/snapshots?disk={}", enc(d)),
                None => "/v1/snapshots".to_string(),
            };
            let answer: Value = ctx.client.get(&path)?;
            ctx.out.show(answer, |list: Vec<Snapshot>| {
                let rows: Vec<Vec<String>> = list
                    .into_iter()
                    .map(|s| {
                        vec![
                            s.export,
                            s.state.as_str().to_string(),
                            human(s.store.used_bytes),
                            or_dash(s.store.limit_bytes.map(human)),
                            s.copied_clusters.to_string(),
                            s.uri,
                        ]
                    })
                    .collect();
                table(
                    &["SNAPSHOT", "STATE", "STORE USED", "LIMIT", "COPIED", "URI"],
                    &rows,
                );
            })
        }
        SnapshotCommand::Show { id } => {
            let answer: Value = ctx.client.get(&format!("/v1/snapshots/{}", enc(&id)))?;
            ctx.out.show(answer, show)
        }
        SnapshotCommand::Delete { id, force } => {
            let force = if force { "?force=true" } else { "" };
            ctx.client
                .delete::<()>(&format!("/v1/snapshots/{}{force}", enc(&id)))?;
            ctx.out
                .done(json!({ "deleted": id }), format!("deleted snapshot {id}"))
        }
    }
}

/// The request of `snapshot create`, checked here so a typo never reaches
/// the daemon.
fn request(a: CreateArgs) -> Result<CreateSnapshot> {
    // JSON has no NaN or infinity (they would arrive as null: no timeout).
    if let Some(t) = a.cbw_timeout.filter(|t| !t.is_finite()) {
        return Err(Error::invalid(format!(
            "--cbw-timeout {t} is not a number of seconds (0 for no timeout)"
        )));
    }
    let size = |s: Option<String>| s.as_deref().map(str::parse::<Size>).transpose();
    // The daemon may run elsewhere in the tree: send an absolute path.
    let store = a.store.map(|s| match s.strip_prefix("file:") {
        Some(p) => format!(
            "file:{}",
            std::path::absolute(p)
                .map(|p| p.display().to_string())
                .unwrap_or(p.into())
        ),
        None => s,
    });
    Ok(CreateSnapshot {
        disks: a.disks,
        name: a.name,
        cluster_size: size(a.cluster_size)?,
        store,
        store_limit: size(a.store_limit)?,
        bitmap: a.bitmap,
        read_once: a.read_once,
        on_cbw_error: a.on_cbw_error,
        cbw_timeout_secs: a.cbw_timeout,
        rotate: a.rotate,
    })
}

fn show(s: Snapshot) {
    println!("snapshot        {}", s.export);
    println!("created         {}", utc(s.created));
    println!("state           {}", s.state.as_str());
    if let Some(e) = &s.error {
        println!("error           {e}");
    }
    println!("uri             {}", s.uri);
    println!("size            {}", human(s.size));
    println!("cluster size    {}", human(s.cluster_size));
    let path = match &s.store.path {
        Some(p) => format!(" ({})", p.display()),
        None => String::new(),
    };
    println!("store           {}{}", s.store.kind, path);
    if let Some(m) = s.store.memory_limit_bytes {
        println!("store memory    up to {} (the rest spills to a file)", human(m));
    }
    let used = s.store.used_bytes;
    match s.store.limit_bytes {
        Some(l) if l > 0 => println!(
            "store used      {} of {} ({}%)",
            human(used),
            human(l),
            used * 100 / l
        ),
        _ => println!("store used      {}", human(used)),
    }
    println!(
        "copied          {} clusters ({} of them holes, kept without store space)",
        s.copied_clusters, s.hole_clusters
    );
    println!("discarded       {} clusters", s.discarded_clusters);
    match &s.bitmap {
        Some(b) => println!("bitmap          {b} (incremental: only its dirty clusters can be read)"),
        None => println!("bitmap          - (full: every cluster can be read)"),
    }
    println!("on cbw error    {}", s.on_cbw_error);
    println!("read once       {}", s.read_once);
    println!("connections     {}", s.connections);
}
