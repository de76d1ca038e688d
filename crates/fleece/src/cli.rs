//! Command line: `fleece serve` and thin clients of the control API.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};

use crate::client;
use crate::daemon::{self, ServeOptions};
use crate::error::{Error, Result};
use crate::units::{human, parse_size};

/// fleece: serve live disks over NBD and take point-in-time snapshots of them.
#[derive(Parser, Debug)]
#[command(name = "fleece", version, about)]
pub struct Cli {
    /// Log level (error, warn, info, debug, trace) or a RUST_LOG-style filter.
    #[arg(long, global = true, env = "RUST_LOG")]
    pub log_level: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon.
    Serve(ServeArgs),
    /// Show the daemon's status.
    Status(ClientArgs),
    /// List, add or remove disks.
    Disk {
        #[command(subcommand)]
        action: DiskCommand,
    },
    /// Take, list, show or delete point-in-time snapshots.
    Snapshot {
        #[command(subcommand)]
        action: SnapshotCommand,
    },
    /// Manage dirty bitmaps (what changed since a point, for incremental backups).
    Bitmap {
        #[command(subcommand)]
        action: BitmapCommand,
    },
    /// Apply several bitmap and snapshot actions at one instant, all or none,
    /// from a JSON file (`{"actions": [...]}`, see docs/openapi.json) or `-`.
    Transaction {
        /// JSON file, or - for standard input.
        file: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print daemon events as they happen (until interrupted).
    Events(ClientArgs),
}

/// `fleece bitmap ...`
#[derive(Subcommand, Debug)]
pub enum BitmapCommand {
    /// Create a bitmap that records every change to the disk from now on.
    Add {
        /// Disk.
        disk: String,
        /// Bitmap name.
        name: String,
        /// Bytes per bit, e.g. 64K.
        #[arg(long, value_name = "SIZE")]
        granularity: Option<String>,
        /// Create it without recording.
        #[arg(long)]
        disabled: bool,
        /// Keep it in memory only (lost on restart).
        #[arg(long)]
        transient: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete a bitmap.
    Remove(BitmapArgs),
    /// Clear every bit.
    Clear(BitmapArgs),
    /// Start recording changes.
    Enable(BitmapArgs),
    /// Stop recording changes.
    Disable(BitmapArgs),
    /// Add the bits of SOURCE bitmaps to TARGET.
    Merge {
        /// Disk.
        disk: String,
        /// Bitmap that receives the bits.
        target: String,
        /// Bitmaps whose bits are added.
        #[arg(required = true)]
        sources: Vec<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List a disk's bitmaps.
    List {
        /// Disk.
        disk: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// A bitmap by disk and name.
#[derive(Args, Debug)]
pub struct BitmapArgs {
    /// Disk.
    pub disk: String,
    /// Bitmap name.
    pub name: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `fleece snapshot ...`
#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Snapshot one or more disks at one instant; serves DISK@NAME read-only.
    Create {
        /// Disks that share the instant.
        #[arg(required = true)]
        disks: Vec<String>,
        /// Snapshot name.
        #[arg(long)]
        name: String,
        /// Copy unit, e.g. 64K (rounded up to the store's granularity).
        #[arg(long, value_name = "SIZE")]
        cluster_size: Option<String>,
        /// file:PATH (default: a sparse file in the state dir) or ram:SIZE
        /// (memory, spilling to a file beyond SIZE).
        #[arg(long, value_name = "STORE")]
        store: Option<String>,
        /// Most bytes the store may hold, e.g. 10G.
        #[arg(long, value_name = "SIZE")]
        store_limit: Option<String>,
        /// Limit the snapshot to the clusters set in this dirty bitmap (as of
        /// the instant): an incremental snapshot.
        #[arg(long, value_name = "NAME")]
        bitmap: Option<String>,
        /// At the same instant, start bitmap NAME afresh (created if missing)
        /// and stop the --bitmap one: the checkpoint pattern of backup tools.
        #[arg(long, value_name = "NAME")]
        rotate: Option<String>,
        /// Each read of the view discards the whole clusters it returned.
        #[arg(long)]
        read_once: bool,
        /// What a failed copy breaks: the user's write or the snapshot.
        #[arg(long, value_name = "POLICY", value_parser = ["break-guest-write", "break-snapshot"])]
        on_cbw_error: Option<String>,
        /// A copy slower than this many seconds counts as failed (0: never).
        #[arg(long, value_name = "SECS")]
        cbw_timeout: Option<f64>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List snapshots (of one disk, or all).
    List {
        /// Only this disk's.
        disk: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show one snapshot.
    Show {
        /// DISK@NAME
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete a snapshot and free its store. Refused while clients are
    /// connected to its view (a backup may be reading it) unless --force.
    Delete {
        /// DISK@NAME
        id: String,
        /// Close the view's connections instead of refusing.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// `fleece serve` flags.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// A raw image to serve read-write, as NAME=PATH (repeatable).
    #[arg(long = "disk", value_name = "NAME=PATH")]
    pub disks: Vec<String>,
    /// TOML file with the same settings (flags win).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Where to listen for NBD clients: unix:PATH or tcp:HOST:PORT (repeatable).
    /// Default: unix:STATE_DIR/nbd.sock.
    #[arg(long = "nbd", value_name = "ADDR")]
    pub nbd: Vec<String>,
    /// Control socket. Default: STATE_DIR/control.sock.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Directory for sockets, the demo disk and snapshot stores.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// I/O threads shared by all connections, 1 to 1024 [default: 16].
    #[arg(long, value_name = "N")]
    pub io_threads: Option<usize>,
}

/// Flags every client subcommand takes.
#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// The daemon's control socket.
    #[arg(
        long,
        env = "FLEECE_CONTROL",
        default_value = "fleece-state/control.sock",
        value_name = "PATH"
    )]
    pub control: PathBuf,
    /// Print JSON for scripts instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// `fleece disk ...`
#[derive(Subcommand, Debug)]
pub enum DiskCommand {
    /// List disks.
    List(ClientArgs),
    /// Serve another raw image as NAME.
    Add {
        /// Export name.
        name: String,
        /// Path of an existing raw image.
        path: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Grow or shrink a disk (its image and its export). Refused while the
    /// disk has snapshots; clients connected before keep the old size.
    Resize {
        /// Disk name.
        name: String,
        /// New size, e.g. 20G (a multiple of 512 bytes).
        size: String,
        /// Allow a smaller size, which discards the data past it.
        #[arg(long)]
        shrink: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Stop serving a disk.
    Remove {
        /// Disk name.
        name: String,
        /// Close open client connections instead of refusing.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve(a) => daemon::serve(ServeOptions {
            disks: a.disks,
            config: a.config,
            nbd: a.nbd,
            control: a.control,
            state_dir: a.state_dir,
            io_threads: a.io_threads,
        }),
        Command::Status(c) => {
            let v = client::request(&c.control, "GET", "/v1/status", None)?;
            if c.json {
                return print_json(&v);
            }
            println!("version      {}", v["version"].as_str().unwrap_or("?"));
            println!("uptime       {} s", v["uptime_secs"]);
            println!("state dir    {}", v["state_dir"].as_str().unwrap_or("?"));
            println!("control      {}", v["control"].as_str().unwrap_or("?"));
            for l in v["nbd"].as_array().into_iter().flatten() {
                println!("nbd          {}", l.as_str().unwrap_or("?"));
            }
            println!("disks        {}", v["disks"]);
            println!("connections  {}", v["connections"]);
            Ok(())
        }
        Command::Disk { action } => disk(action),
        Command::Snapshot { action } => snapshot(action),
        Command::Bitmap { action } => bitmap(action),
        Command::Transaction { file, client: c } => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())
            } else {
                std::fs::read_to_string(&file)
            }
            .map_err(|e| Error::invalid(format!("cannot read {}: {e}", file.display())))?;
            let body: Value = serde_json::from_str(&text)
                .map_err(|e| Error::invalid(format!("{} is not JSON: {e}", file.display())))?;
            let v = client::request(&c.control, "POST", "/v1/transactions", Some(&body))?;
            if c.json {
                return print_json(&v);
            }
            println!("transaction applied");
            for snap in v["snapshots"].as_array().into_iter().flatten() {
                println!("created snapshot {}: {}", s(&snap["export"]), s(&snap["uri"]));
            }
            Ok(())
        }
        Command::Events(c) => events(&c),
    }
}

fn disk(action: DiskCommand) -> Result<()> {
    match action {
        DiskCommand::List(c) => {
            let v = client::request(&c.control, "GET", "/v1/disks", None)?;
            if c.json {
                return print_json(&v);
            }
            let rows: Vec<Vec<String>> = v
                .as_array()
                .into_iter()
                .flatten()
                .map(|d| {
                    vec![
                        s(&d["name"]),
                        human(d["size"].as_u64().unwrap_or(0)),
                        d["connections"].to_string(),
                        s(&d["path"]),
                        s(&d["uri"]),
                    ]
                })
                .collect();
            table(&["NAME", "SIZE", "CONNS", "PATH", "URI"], &rows);
            Ok(())
        }
        DiskCommand::Add {
            name,
            path,
            client: c,
        } => {
            // The daemon may run elsewhere in the tree: send an absolute path.
            let abs = std::path::absolute(&path).unwrap_or(path);
            let v = client::request(
                &c.control,
                "POST",
                "/v1/disks",
                Some(&json!({ "name": name, "path": abs })),
            )?;
            if c.json {
                return print_json(&v);
            }
            println!(
                "added disk {} ({}): {}",
                s(&v["name"]),
                human(v["size"].as_u64().unwrap_or(0)),
                s(&v["uri"])
            );
            Ok(())
        }
        DiskCommand::Resize {
            name,
            size,
            shrink,
            client: c,
        } => {
            let bytes = parse_size(&size)?;
            let v = client::request(
                &c.control,
                "POST",
                &format!("/v1/disks/{}/resize", enc(&name)),
                Some(&json!({ "size": bytes, "shrink": shrink })),
            )?;
            if c.json {
                return print_json(&v);
            }
            println!(
                "disk {name} is now {}",
                human(v["size"].as_u64().unwrap_or(bytes))
            );
            Ok(())
        }
        DiskCommand::Remove {
            name,
            force,
            client: c,
        } => {
            let path = format!(
                "/v1/disks/{}{}",
                enc(&name),
                if force { "?force=true" } else { "" }
            );
            client::request(&c.control, "DELETE", &path, None)?;
            if c.json {
                return print_json(&json!({ "removed": name }));
            }
            println!("removed disk {name}");
            Ok(())
        }
    }
}

fn bitmap(action: BitmapCommand) -> Result<()> {
    let (c, method, path, body, done) = match action {
        BitmapCommand::Add {
            disk,
            name,
            granularity,
            disabled,
            transient,
            client,
        } => {
            let g = granularity.as_deref().map(parse_size).transpose()?;
            let body =
                json!({ "name": name, "granularity": g, "disabled": disabled, "persistent": !transient });
            (
                client,
                "POST",
                format!("/v1/disks/{}/bitmaps", enc(&disk)),
                Some(body),
                format!("added bitmap {name} to {disk}"),
            )
        }
        BitmapCommand::Remove(a) => {
            let p = format!("/v1/disks/{}/bitmaps/{}", enc(&a.disk), enc(&a.name));
            (a.client, "DELETE", p, None, format!("removed bitmap {}", a.name))
        }
        BitmapCommand::Clear(a) => op(a, "clear", "cleared"),
        BitmapCommand::Enable(a) => op(a, "enable", "enabled"),
        BitmapCommand::Disable(a) => op(a, "disable", "disabled"),
        BitmapCommand::Merge {
            disk,
            target,
            sources,
            client,
        } => {
            let p = format!("/v1/disks/{}/bitmaps/{}/merge", enc(&disk), enc(&target));
            let done = format!("merged {} into {target}", sources.join(", "));
            (client, "POST", p, Some(json!({ "sources": sources })), done)
        }
        BitmapCommand::List { disk, client: c } => {
            let v = client::request(
                &c.control,
                "GET",
                &format!("/v1/disks/{}/bitmaps", enc(&disk)),
                None,
            )?;
            if c.json {
                return print_json(&v);
            }
            let rows: Vec<Vec<String>> = v
                .as_array()
                .into_iter()
                .flatten()
                .map(|b| {
                    vec![
                        s(&b["name"]),
                        human(b["granularity"].as_u64().unwrap_or(0)),
                        human(b["dirty_bytes"].as_u64().unwrap_or(0)),
                        b["recording"].to_string(),
                        b["persistent"].to_string(),
                        b["exact"].to_string(),
                    ]
                })
                .collect();
            table(
                &["NAME", "GRANULARITY", "DIRTY", "RECORDING", "PERSISTENT", "EXACT"],
                &rows,
            );
            return Ok(());
        }
    };
    let v = client::request(&c.control, method, &path, body.as_ref())?;
    if c.json {
        return print_json(if v.is_null() { &Value::Bool(true) } else { &v });
    }
    println!("{done}");
    Ok(())
}

type Call = (ClientArgs, &'static str, String, Option<Value>, String);

fn op(a: BitmapArgs, verb: &str, done: &str) -> Call {
    let p = format!("/v1/disks/{}/bitmaps/{}/{verb}", enc(&a.disk), enc(&a.name));
    (a.client, "POST", p, None, format!("{done} bitmap {}", a.name))
}

fn snapshot(action: SnapshotCommand) -> Result<()> {
    match action {
        SnapshotCommand::Create {
            disks,
            name,
            cluster_size,
            store,
            store_limit,
            bitmap,
            rotate,
            read_once,
            on_cbw_error,
            cbw_timeout,
            client: c,
        } => {
            // Validate here so a typo never reaches the daemon. JSON has no
            // NaN or infinity (they would arrive as null: no timeout).
            if let Some(t) = cbw_timeout.filter(|t| !t.is_finite()) {
                return Err(Error::invalid(format!(
                    "--cbw-timeout {t} is not a number of seconds (0 for no timeout)"
                )));
            }
            let cluster_size = cluster_size.as_deref().map(parse_size).transpose()?;
            let store_limit = store_limit.as_deref().map(parse_size).transpose()?;
            let store = store.map(|s| match s.strip_prefix("file:") {
                Some(p) => format!(
                    "file:{}",
                    std::path::absolute(p)
                        .map(|p| p.display().to_string())
                        .unwrap_or(p.into())
                ),
                None => s,
            });
            let body = json!({
                "disks": disks, "name": name, "cluster_size": cluster_size, "store": store,
                "store_limit": store_limit, "bitmap": bitmap, "read_once": read_once,
                "on_cbw_error": on_cbw_error, "cbw_timeout_secs": cbw_timeout, "rotate": rotate,
            });
            let v = client::request(&c.control, "POST", "/v1/snapshots", Some(&body))?;
            if c.json {
                return print_json(&v);
            }
            for snap in v.as_array().into_iter().flatten() {
                println!("created snapshot {}: {}", s(&snap["export"]), s(&snap["uri"]));
            }
            Ok(())
        }
        SnapshotCommand::List { disk, client: c } => {
            let path = match &disk {
                Some(d) => format!("/v1/snapshots?disk={}", enc(d)),
                None => "/v1/snapshots".to_string(),
            };
            let v = client::request(&c.control, "GET", &path, None)?;
            if c.json {
                return print_json(&v);
            }
            let rows: Vec<Vec<String>> = v
                .as_array()
                .into_iter()
                .flatten()
                .map(|x| {
                    vec![
                        s(&x["export"]),
                        s(&x["state"]),
                        human(x["store"]["used_bytes"].as_u64().unwrap_or(0)),
                        x["store"]["limit_bytes"]
                            .as_u64()
                            .map(human)
                            .unwrap_or_else(|| "-".into()),
                        x["copied_clusters"].to_string(),
                        s(&x["uri"]),
                    ]
                })
                .collect();
            table(
                &["SNAPSHOT", "STATE", "STORE USED", "LIMIT", "COPIED", "URI"],
                &rows,
            );
            Ok(())
        }
        SnapshotCommand::Show { id, client: c } => {
            let v = client::request(&c.control, "GET", &format!("/v1/snapshots/{}", enc(&id)), None)?;
            if c.json {
                return print_json(&v);
            }
            println!("snapshot        {}", s(&v["export"]));
            println!("created         {}", utc(v["created"].as_u64().unwrap_or(0)));
            println!("state           {}", s(&v["state"]));
            if !v["error"].is_null() {
                println!("error           {}", s(&v["error"]));
            }
            println!("uri             {}", s(&v["uri"]));
            println!("size            {}", human(v["size"].as_u64().unwrap_or(0)));
            println!(
                "cluster size    {}",
                human(v["cluster_size"].as_u64().unwrap_or(0))
            );
            let st = &v["store"];
            let path = if st["path"].is_null() {
                String::new()
            } else {
                format!(" ({})", s(&st["path"]))
            };
            println!("store           {}{}", s(&st["kind"]), path);
            if let Some(m) = st["memory_limit_bytes"].as_u64() {
                println!("store memory    up to {} (the rest spills to a file)", human(m));
            }
            let limit = st["limit_bytes"].as_u64();
            let used = st["used_bytes"].as_u64().unwrap_or(0);
            match limit {
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
                v["copied_clusters"], v["hole_clusters"]
            );
            println!("discarded       {} clusters", v["discarded_clusters"]);
            match v["bitmap"].as_str() {
                Some(b) => println!("bitmap          {b} (incremental: only its dirty clusters can be read)"),
                None => println!("bitmap          - (full: every cluster can be read)"),
            }
            println!("on cbw error    {}", s(&v["on_cbw_error"]));
            println!("read once       {}", v["read_once"]);
            println!("connections     {}", v["connections"]);
            Ok(())
        }
        SnapshotCommand::Delete { id, force, client: c } => {
            let path = format!(
                "/v1/snapshots/{}{}",
                enc(&id),
                if force { "?force=true" } else { "" }
            );
            client::request(&c.control, "DELETE", &path, None)?;
            if c.json {
                return print_json(&json!({ "deleted": id }));
            }
            println!("deleted snapshot {id}");
            Ok(())
        }
    }
}

fn events(c: &ClientArgs) -> Result<()> {
    use std::os::unix::io::AsRawFd;
    let mut reader = client::stream(&c.control, "/v1/events")?;
    // On stderr, so that stdout stays the events alone.
    eprintln!(
        "fleece: connected to {}; waiting for events (Ctrl-C to stop)",
        c.control.display()
    );
    let mut kind = String::new();
    let stdout = std::io::stdout();
    let sock = reader.get_ref().as_raw_fd();
    let mut line = String::new();
    loop {
        // Wait for the next event, but notice a reader of our output that
        // went away (`fleece events | head -1`) without one: no write would
        // ever fail otherwise.
        if reader.buffer().is_empty() && !wait_readable(sock) {
            return Ok(());
        }
        line.clear();
        let n = reader
            .read_line(&mut line)
            .map_err(|e| Error::new(crate::error::Kind::Unavailable, e.to_string()))?;
        if n == 0 {
            return Err(Error::new(
                crate::error::Kind::Unavailable,
                "the daemon closed the event stream (it is shutting down)",
            ));
        }
        let line = line.trim_end_matches(['\r', '\n']);
        let mut out = stdout.lock();
        if let Some(k) = line.strip_prefix("event: ") {
            kind = k.to_string();
        } else if let Some(d) = line.strip_prefix("data: ") {
            let written = if c.json {
                writeln!(out, "{{\"event\":\"{kind}\",\"data\":{d}}}")
            } else {
                writeln!(out, "{kind:<18} {d}")
            }
            .and_then(|_| out.flush());
            if written.is_err() {
                return Ok(());
            }
        }
    }
}

/// Waits until `sock` has input; false if standard output was closed by
/// its reader first.
fn wait_readable(sock: i32) -> bool {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: sock,
                events: libc::POLLIN,
                revents: 0,
            },
            // No events asked: only an error or hang-up is reported, which
            // for the write end of a pipe means the reader is gone.
            libc::pollfd {
                fd: libc::STDOUT_FILENO,
                events: 0,
                revents: 0,
            },
        ];
        // SAFETY: the array outlives the call and its length is passed.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return true; // let the read report it
        }
        if fds[1].revents & (libc::POLLERR | libc::POLLHUP) != 0 {
            return false;
        }
        if fds[0].revents != 0 {
            return true;
        }
    }
}

/// Percent-encodes one path segment or query value: names may hold
/// characters that mean something in a URL.
fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Seconds since the epoch as `YYYY-MM-DD HH:MM:SS UTC`.
fn utc(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn print_json(v: &Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    Ok(())
}

/// Prints rows under headers with columns padded to the widest cell.
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        println!("{}", out.trim_end());
    };
    line(headers.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}
