//! The CLI's side of the control API: one HTTP/1.0 request per call over the
//! control socket. HTTP/1.0 makes the body run to the end of the connection,
//! which also suits the event stream.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Kind, Result};

/// Sends one request and returns (status, parsed JSON body or Null).
pub fn call(control: &Path, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value)> {
    let mut reader = send(control, method, path, body)?;
    let status = read_head(&mut reader, control)?;
    let mut text = Vec::new();
    reader
        .read_to_end(&mut text)
        .map_err(|e| unavailable(control, &e.to_string()))?;
    let value = if text.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        serde_json::from_slice(&text).map_err(|e| {
            Error::new(
                Kind::Internal,
                format!("daemon sent a body that is not JSON: {e}"),
            )
        })?
    };
    Ok((status, value))
}

/// Like [`call`], but turns an error status into an [`Error`] carrying the
/// daemon's message.
pub fn request(control: &Path, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
    let (status, v) = call(control, method, path, body)?;
    if (200..300).contains(&status) {
        return Ok(v);
    }
    let msg = v["error"]["message"]
        .as_str()
        .unwrap_or("request failed")
        .to_string();
    let kind = match v["error"]["code"].as_str() {
        Some("not_found") => Kind::NotFound,
        Some("exists") => Kind::Exists,
        Some("busy") => Kind::Busy,
        Some("invalid_argument") => Kind::InvalidArgument,
        _ => Kind::Internal,
    };
    Err(Error::new(kind, msg))
}

/// Opens a streaming GET and returns the reader positioned at the body.
pub fn stream(control: &Path, path: &str) -> Result<BufReader<UnixStream>> {
    let mut reader = send(control, "GET", path, None)?;
    let status = read_head(&mut reader, control)?;
    if status != 200 {
        return Err(Error::new(Kind::Internal, format!("daemon answered {status}")));
    }
    Ok(reader)
}

/// Largest request body the daemon reads (`api::MAX_BODY`).
const MAX_BODY: usize = 1 << 20;

fn send(control: &Path, method: &str, path: &str, body: Option<&Value>) -> Result<BufReader<UnixStream>> {
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    if payload.len() > MAX_BODY {
        return Err(Error::invalid(format!(
            "the request is {} bytes; the daemon takes at most {MAX_BODY}",
            payload.len()
        )));
    }
    let mut s = UnixStream::connect(control).map_err(|e| unavailable(control, &e.to_string()))?;
    let head = format!(
        "{method} {path} HTTP/1.0\r\nHost: fleece\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        payload.len()
    );
    s.write_all(head.as_bytes())
        .and_then(|_| s.write_all(payload.as_bytes()))
        .map_err(|e| unavailable(control, &e.to_string()))?;
    Ok(BufReader::new(s))
}

fn read_head(r: &mut BufReader<UnixStream>, control: &Path) -> Result<u16> {
    let mut line = String::new();
    r.read_line(&mut line)
        .map_err(|e| unavailable(control, &e.to_string()))?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::new(Kind::Internal, format!("daemon sent a bad status line: {line:?}")))?;
    loop {
        line.clear();
        let n = r
            .read_line(&mut line)
            .map_err(|e| unavailable(control, &e.to_string()))?;
        if n == 0 || line == "\r\n" || line == "\n" {
            return Ok(status);
        }
    }
}

fn unavailable(control: &Path, why: &str) -> Error {
    Error::new(
        Kind::Unavailable,
        format!(
            "cannot reach the fleece daemon at {}: {why} (is `fleece serve` running? set --control or FLEECE_CONTROL)",
            control.display()
        ),
    )
}
