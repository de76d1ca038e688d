//! `fleece backup ...`: push-backup jobs.

use std::io::IsTerminal;
use std::time::Duration;

use serde_json::{json, Value};

use super::args::{BackupCommand, StartArgs};
use super::output::{enc, or_dash, table, utc};
use super::Ctx;
use crate::api::types::{JobInfo, SetSpeed, Size, StartBackup};
use crate::error::{Error, Kind, Result};
use crate::units::human;

/// How often `watch` asks the daemon.
const POLL: Duration = Duration::from_millis(100);

/// Runs a `fleece backup` subcommand.
pub fn run(ctx: &Ctx, action: BackupCommand) -> Result<()> {
    match action {
        BackupCommand::Start(a) => {
            let wait = a.wait;
            let answer: Value = ctx.client.post("/v1/jobs", &request(*a)?)?;
            let job: JobInfo = serde_json::from_value(answer.clone())
                .map_err(|e| Error::new(Kind::Internal, format!("unexpected answer: {e}")))?;
            if wait {
                if !ctx.out.json {
                    eprintln!("started backup job {}", job.name);
                }
                return watch(ctx, &job.name);
            }
            ctx.out.show(answer, |j: JobInfo| println!("{}", j.name))
        }
        BackupCommand::List => {
            let answer: Value = ctx.client.get("/v1/jobs")?;
            ctx.out.show(answer, |list: Vec<JobInfo>| {
                let rows: Vec<Vec<String>> = list
                    .into_iter()
                    .map(|j| {
                        vec![
                            j.name.clone(),
                            j.state.clone(),
                            j.disks
                                .iter()
                                .map(|d| d.disk.clone())
                                .collect::<Vec<_>>()
                                .join(","),
                            j.sync.clone(),
                            format!("{:.1}%", j.percent),
                            format!("{}/{}", human(j.done_bytes), human(j.total_bytes)),
                            rate(&j),
                        ]
                    })
                    .collect();
                table(&["JOB", "STATE", "DISKS", "SYNC", "DONE", "BYTES", "RATE"], &rows);
            })
        }
        BackupCommand::Show { job } => {
            let answer: Value = ctx.client.get(&format!("/v1/jobs/{}", enc(&job)))?;
            ctx.out.show(answer, show)
        }
        BackupCommand::Pause { job } => simple(ctx, &job, "pause", "paused"),
        BackupCommand::Resume { job } => simple(ctx, &job, "resume", "resumed"),
        BackupCommand::Cancel { job } => simple(ctx, &job, "cancel", "cancelling"),
        BackupCommand::SetSpeed { job, rate } => {
            let speed: Size = rate.parse()?;
            let answer: Value = ctx
                .client
                .post(&format!("/v1/jobs/{}/speed", enc(&job)), &SetSpeed { speed })?;
            ctx.out.show(answer, |j: JobInfo| {
                if j.speed == 0 {
                    println!("job {}: no speed limit", j.name);
                } else {
                    println!("job {}: at most {}/s", j.name, human(j.speed));
                }
            })
        }
        BackupCommand::Watch { job } => watch(ctx, &job),
        BackupCommand::Dismiss { job } => {
            ctx.client.delete::<()>(&format!("/v1/jobs/{}", enc(&job)))?;
            ctx.out
                .done(json!({ "dismissed": job }), format!("dismissed job {job}"))
        }
    }
}

fn simple(ctx: &Ctx, job: &str, verb: &str, said: &str) -> Result<()> {
    let answer: Value = ctx.client.post_empty(&format!("/v1/jobs/{}/{verb}", enc(job)))?;
    ctx.out
        .show(answer, |j: JobInfo| println!("job {} {said}", j.name))
}

/// The request of `backup start`, checked here so a typo never reaches the
/// daemon.
fn request(a: StartArgs) -> Result<StartBackup> {
    for (what, v) in [("--cbw-timeout", a.cbw_timeout), ("--retry-for", a.retry_for)] {
        if let Some(t) = v.filter(|t| !t.is_finite()) {
            return Err(Error::invalid(format!("{what} {t} is not a number of seconds")));
        }
    }
    let size = |s: Option<String>| s.as_deref().map(str::parse::<Size>).transpose();
    // The daemon may run elsewhere in the tree: send absolute paths.
    let absolute = |s: String, prefix: &str| match s.strip_prefix(prefix) {
        Some(p) if !p.is_empty() => format!(
            "{prefix}{}",
            std::path::absolute(p)
                .map(|p| p.display().to_string())
                .unwrap_or(p.into())
        ),
        _ => s,
    };
    Ok(StartBackup {
        disks: a.disks,
        snapshots: a.snapshots,
        targets: a
            .targets
            .into_iter()
            .map(|t| {
                if t.starts_with("qcow2:") {
                    absolute(t, "qcow2:")
                } else {
                    absolute(t, "file:")
                }
            })
            .collect(),
        name: a.name,
        sync: Some(a.sync),
        bitmap: a.bitmap,
        bitmap_mode: a.bitmap_mode,
        min_cluster_size: size(a.min_cluster_size)?,
        store: a.store.map(|s| absolute(s, "file:")),
        store_limit: size(a.store_limit)?,
        on_cbw_error: a.on_cbw_error,
        cbw_timeout_secs: a.cbw_timeout,
        order: Some(a.order),
        workers: a.workers,
        chunk_size: size(a.chunk_size)?,
        speed: size(a.speed)?,
        on_target_error: a.on_target_error,
        on_source_error: a.on_source_error,
        retry_for_secs: a.retry_for,
        verify: a.verify,
    })
}

fn rate(j: &JobInfo) -> String {
    if j.rate == 0 {
        "-".into()
    } else {
        format!("{}/s", human(j.rate))
    }
}

fn ended(state: &str) -> bool {
    matches!(state, "completed" | "failed" | "cancelled")
}

/// Follows a job to its end; `Err` unless it completed.
fn watch(ctx: &Ctx, name: &str) -> Result<()> {
    let path = format!("/v1/jobs/{}", enc(name));
    let tty = std::io::stderr().is_terminal() && !ctx.out.json;
    let bar = tty.then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b.set_prefix(name.to_string());
        b
    });
    let mut next_tenth = 1u64;
    let (last, raw) = loop {
        let raw: Value = ctx.client.get(&path)?;
        let j: JobInfo = serde_json::from_value(raw.clone())
            .map_err(|e| Error::new(Kind::Internal, format!("unexpected answer: {e}")))?;
        if let Some(b) = &bar {
            b.set_length(j.total_bytes);
            b.set_position(j.done_bytes);
            b.set_message(match j.state.as_str() {
                "running" => String::new(),
                s => s.to_string(),
            });
        } else if !ctx.out.json {
            // A line every 10% for logs.
            let tenth = (j.percent / 10.0).floor() as u64;
            if tenth >= next_tenth && !ended(&j.state) {
                println!(
                    "{}: {:.0}% ({} of {}, {})",
                    j.name,
                    j.percent,
                    human(j.done_bytes),
                    human(j.total_bytes),
                    rate(&j)
                );
                next_tenth = tenth + 1;
            }
        }
        if ended(&j.state) {
            break (j, raw);
        }
        std::thread::sleep(POLL);
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if ctx.out.json {
        super::output::print_json(&raw);
    } else if last.state == "completed" {
        println!("{}: completed, {} written", last.name, human(last.done_bytes));
    }
    match last.state.as_str() {
        "completed" => Ok(()),
        s => Err(Error::new(
            Kind::Internal,
            format!(
                "backup job {} {s}{}",
                last.name,
                last.error.map(|e| format!(": {e}")).unwrap_or_default()
            ),
        )),
    }
}

fn show(j: JobInfo) {
    println!("job             {}", j.name);
    println!("state           {}", j.state);
    if let Some(e) = &j.error {
        println!("error           {e}");
    }
    if let Some(r) = &j.retrying {
        println!("retrying        {r}");
    }
    println!("sync            {}", j.sync);
    if let Some(b) = &j.bitmap {
        println!("bitmap          {b} (mode {})", j.bitmap_mode);
    }
    println!("order           {}", j.order);
    println!(
        "progress        {:.1}% ({} of {})",
        j.percent,
        human(j.done_bytes),
        human(j.total_bytes)
    );
    println!("rate            {}", rate(&j));
    println!(
        "eta             {}",
        or_dash(j.eta_secs.map(|s| format!("{s} s")))
    );
    println!(
        "speed limit     {}",
        if j.speed == 0 {
            "none".into()
        } else {
            format!("{}/s", human(j.speed))
        }
    );
    println!("started         {}", utc(j.started));
    if let Some(f) = j.finished {
        println!("finished        {}", utc(f));
    }
    for d in &j.disks {
        println!(
            "disk {:<10} -> {}  {} [{}]: {} copied, {} zeroed, {} skipped clusters of {}; store {}",
            d.disk,
            d.target,
            d.snapshot,
            d.phase,
            d.copied_clusters,
            d.zeroed_clusters,
            d.skipped_clusters,
            human(d.cluster_size),
            human(d.store_used_bytes)
        );
    }
}
