//! Command line: `fleece serve` and thin clients of the control API.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};

use crate::client;
use crate::daemon::{self, ServeOptions};
use crate::error::{Error, Result};
use crate::units::human;

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
    /// Print daemon events as they happen (until interrupted).
    Events(ClientArgs),
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
    /// I/O threads shared by all connections.
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
        DiskCommand::Remove {
            name,
            force,
            client: c,
        } => {
            let path = format!("/v1/disks/{name}{}", if force { "?force=true" } else { "" });
            client::request(&c.control, "DELETE", &path, None)?;
            if c.json {
                return print_json(&json!({ "removed": name }));
            }
            println!("removed disk {name}");
            Ok(())
        }
    }
}

fn events(c: &ClientArgs) -> Result<()> {
    let reader = client::stream(&c.control, "/v1/events")?;
    let mut kind = String::new();
    let stdout = std::io::stdout();
    for line in reader.lines() {
        let line = line.map_err(|e| Error::new(crate::error::Kind::Unavailable, e.to_string()))?;
        let mut out = stdout.lock();
        if let Some(k) = line.strip_prefix("event: ") {
            kind = k.to_string();
        } else if let Some(d) = line.strip_prefix("data: ") {
            let _ = if c.json {
                writeln!(out, "{{\"event\":\"{kind}\",\"data\":{d}}}")
            } else {
                writeln!(out, "{kind:<18} {d}")
            };
            let _ = out.flush();
        }
    }
    Ok(())
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
