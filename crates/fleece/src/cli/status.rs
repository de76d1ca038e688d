//! `fleece status`, `fleece events` and `fleece transaction`: the commands
//! about the daemon as a whole.

use std::io::{BufRead, Write};
use std::os::unix::io::AsRawFd;
use std::path::Path;

use serde_json::Value;

use super::Ctx;
use crate::api::types::{Status, TransactionResult};
use crate::error::{Error, Kind, Result};

/// `fleece status`
pub fn status(ctx: &Ctx) -> Result<()> {
    let answer: Value = ctx.client.get("/v1/status")?;
    ctx.out.show(answer, |s: Status| {
        println!("version      {}", s.version);
        println!("uptime       {} s", s.uptime_secs);
        println!("state dir    {}", s.state_dir.display());
        println!("control      {}", s.control.display());
        for l in &s.nbd {
            println!("nbd          {l}");
        }
        println!("disks        {}", s.disks);
        println!("connections  {}", s.connections);
    })
}

/// `fleece transaction FILE|-`: the file goes to the daemon as written, so
/// its errors are the daemon's, the same as for any API client.
pub fn transaction(ctx: &Ctx, file: &Path) -> Result<()> {
    let text = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())
    } else {
        std::fs::read_to_string(file)
    }
    .map_err(|e| Error::invalid(format!("cannot read {}: {e}", file.display())))?;
    let body: Value = serde_json::from_str(&text)
        .map_err(|e| Error::invalid(format!("{} is not JSON: {e}", file.display())))?;
    let answer: Value = ctx.client.post("/v1/transactions", &body)?;
    ctx.out.show(answer, |t: TransactionResult| {
        println!("transaction applied");
        for s in &t.snapshots {
            println!("created snapshot {}: {}", s.export, s.uri);
        }
    })
}

/// `fleece events`: prints events until interrupted, or until whoever reads
/// its output goes away.
pub fn events(ctx: &Ctx) -> Result<()> {
    let mut reader = ctx.client.stream("/v1/events")?;
    // On stderr, so that stdout stays the events alone.
    eprintln!(
        "fleece: connected to {}; waiting for events (Ctrl-C to stop)",
        ctx.client.control().display()
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
            .map_err(|e| Error::new(Kind::Unavailable, e.to_string()))?;
        if n == 0 {
            return Err(Error::new(
                Kind::Unavailable,
                "the daemon closed the event stream (it is shutting down)",
            ));
        }
        let line = line.trim_end_matches(['\r', '\n']);
        let mut out = stdout.lock();
        if let Some(k) = line.strip_prefix("event: ") {
            kind = k.to_string();
        } else if let Some(d) = line.strip_prefix("data: ") {
            let written = if ctx.out.json {
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
