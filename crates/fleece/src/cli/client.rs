//! The CLI's side of the control API: one HTTP/1.0 request per call over the
//! control socket. HTTP/1.0 makes the body run to the end of the connection,
//! which also suits the event stream.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::api::types::ErrorBody;
use crate::api::MAX_BODY;
use crate::error::{Error, Kind, Result};

/// A daemon, by its control socket.
pub struct Client {
    control: PathBuf,
}

impl Client {
    /// A client of the daemon listening on `control`.
    pub fn new(control: PathBuf) -> Client {
        Client { control }
    }

    /// The control socket.
    pub fn control(&self) -> &Path {
        &self.control
    }

    /// `GET path`, its answer read as `T` (`Value` keeps it as sent).
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call("GET", path, None)
    }

    /// `POST path` with a JSON body.
    pub fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        let body = serde_json::to_vec(body)
            .map_err(|e| Error::new(Kind::Internal, format!("cannot encode the request: {e}")))?;
        self.call("POST", path, Some(body))
    }

    /// `POST path` without a body (the path says it all).
    pub fn post_empty<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call("POST", path, None)
    }

    /// `DELETE path`.
    pub fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call("DELETE", path, None)
    }

    /// Opens a streaming GET and returns the reader positioned at the body.
    pub fn stream(&self, path: &str) -> Result<BufReader<UnixStream>> {
        let mut reader = self.send("GET", path, None)?;
        let status = self.read_head(&mut reader)?;
        if status != 200 {
            return Err(Error::new(Kind::Internal, format!("daemon answered {status}")));
        }
        Ok(reader)
    }

    /// Sends one request; a 2xx answer is read as `T` (an empty one as
    /// JSON `null`), any other becomes an [`Error`] with the daemon's
    /// message.
    fn call<T: DeserializeOwned>(&self, method: &str, path: &str, body: Option<Vec<u8>>) -> Result<T> {
        let mut reader = self.send(method, path, body)?;
        let status = self.read_head(&mut reader)?;
        let mut text = Vec::new();
        reader
            .read_to_end(&mut text)
            .map_err(|e| self.unavailable(&e.to_string()))?;
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
        if !(200..300).contains(&status) {
            return Err(match serde_json::from_value::<ErrorBody>(value) {
                Ok(b) => Error::new(kind(&b.error.code), b.error.message),
                Err(_) => Error::new(Kind::Internal, "request failed"),
            });
        }
        serde_json::from_value(value).map_err(|e| {
            Error::new(
                Kind::Internal,
                format!("the daemon's answer is not what this fleece expects (another version?): {e}"),
            )
        })
    }

    fn send(&self, method: &str, path: &str, body: Option<Vec<u8>>) -> Result<BufReader<UnixStream>> {
        let payload = body.unwrap_or_default();
        if payload.len() > MAX_BODY {
            return Err(Error::invalid(format!(
                "the request is {} bytes; the daemon takes at most {MAX_BODY}",
                payload.len()
            )));
        }
        let mut s = UnixStream::connect(&self.control).map_err(|e| self.unavailable(&e.to_string()))?;
        let head = format!(
            "{method} {path} HTTP/1.0\r\nHost: fleece\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            payload.len()
        );
        s.write_all(head.as_bytes())
            .and_then(|_| s.write_all(&payload))
            .map_err(|e| self.unavailable(&e.to_string()))?;
        Ok(BufReader::new(s))
    }

    fn read_head(&self, r: &mut BufReader<UnixStream>) -> Result<u16> {
        let mut line = String::new();
        r.read_line(&mut line)
            .map_err(|e| self.unavailable(&e.to_string()))?;
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Error::new(Kind::Internal, format!("daemon sent a bad status line: {line:?}")))?;
        loop {
            line.clear();
            let n = r
                .read_line(&mut line)
                .map_err(|e| self.unavailable(&e.to_string()))?;
            if n == 0 || line == "\r\n" || line == "\n" {
                return Ok(status);
            }
        }
    }

    fn unavailable(&self, why: &str) -> Error {
        Error::new(
            Kind::Unavailable,
            format!(
                "cannot reach the fleece daemon at {}: {why} (is `fleece serve` running? set --control or FLEECE_CONTROL)",
                self.control.display()
            ),
        )
    }
}

/// The kind of an error answer's `code` (`error::Kind::code`).
fn kind(code: &str) -> Kind {
    match code {
        "not_found" => Kind::NotFound,
        "exists" => Kind::Exists,
        "busy" => Kind::Busy,
        "invalid_argument" => Kind::InvalidArgument,
        _ => Kind::Internal,
    }
}
