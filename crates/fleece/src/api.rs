//! Control API: HTTP/1.1 + JSON on a Unix socket. It only changes daemon
//! state; it is never on the data path.

use std::convert::Infallible;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::UnixListener;
use tokio::sync::{broadcast, mpsc, watch};

use crate::bitmaps::{bitmap_json, Action};
use crate::error::{Error, Result};
use crate::events::Events;
use crate::nbd::ListenAddr;
use crate::registry::Registry;
use crate::snapshots::{split_id, CreateSnapshot, SnapshotEntry};

/// Every route the server answers, as (method, OpenAPI path template). A
/// test checks `docs/openapi.json` against this list.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/status"),
    ("GET", "/v1/disks"),
    ("POST", "/v1/disks"),
    ("GET", "/v1/disks/{name}"),
    ("DELETE", "/v1/disks/{name}"),
    ("POST", "/v1/disks/{name}/resize"),
    ("POST", "/v1/snapshots"),
    ("GET", "/v1/snapshots"),
    ("GET", "/v1/snapshots/{id}"),
    ("DELETE", "/v1/snapshots/{id}"),
    ("GET", "/v1/disks/{name}/bitmaps"),
    ("POST", "/v1/disks/{name}/bitmaps"),
    ("DELETE", "/v1/disks/{name}/bitmaps/{bitmap}"),
    ("POST", "/v1/disks/{name}/bitmaps/{bitmap}/clear"),
    ("POST", "/v1/disks/{name}/bitmaps/{bitmap}/enable"),
    ("POST", "/v1/disks/{name}/bitmaps/{bitmap}/disable"),
    ("POST", "/v1/disks/{name}/bitmaps/{bitmap}/merge"),
    ("POST", "/v1/transactions"),
    ("GET", "/v1/events"),
];

/// Request bodies are small JSON documents.
const MAX_BODY: usize = 1 << 20;

/// Daemon state shared by the control API and the shutdown path.
pub struct Daemon {
    /// Disks and exports.
    pub registry: Arc<Registry>,
    /// Event fan-out.
    pub events: Events,
    /// When the daemon started.
    pub started: Instant,
    /// State directory.
    pub state_dir: PathBuf,
    /// Control socket path.
    pub control: PathBuf,
    /// NBD listen addresses (TCP with the real port).
    pub listen: Vec<ListenAddr>,
}

impl Daemon {
    /// NBD URI of an export on the first listener.
    pub fn uri(&self, export: &str) -> String {
        self.listen.first().map(|l| l.uri(export)).unwrap_or_default()
    }

    fn disk_json(&self, d: &crate::registry::Disk) -> Value {
        self.registry.disk_json(d, &|e| self.uri(e))
    }

    fn snapshot_json(&self, e: &SnapshotEntry) -> Value {
        self.registry.snapshot_json(e, &|x| self.uri(x))
    }
}

type ApiBody = BoxBody<Bytes, Infallible>;

/// Serves the control API until `stop` turns true.
pub async fn run(listener: UnixListener, daemon: Arc<Daemon>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let d = daemon.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let (d, stop) = (d.clone(), stop.clone());
                        async move { Ok::<_, Infallible>(handle(&d, req, stop).await) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc);
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "control connection ended");
                    }
                });
            }
            _ = stop.changed() => break,
        }
    }
}

async fn handle(d: &Arc<Daemon>, req: Request<Incoming>, stop: watch::Receiver<bool>) -> Response<ApiBody> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    tracing::debug!(%method, %path, "control request");
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return error(Error::invalid("request body is too large or unreadable")),
    };
    // Names travel percent-encoded (`vm1%40snap` is `vm1@snap`): decode
    // each segment after splitting, so an encoded '/' stays inside its name.
    let segs: Vec<String> = match path.trim_matches('/').split('/').map(percent_decode).collect() {
        Ok(s) => s,
        Err(e) => return error(e),
    };
    let query = match parse_query(&query) {
        Ok(q) => q,
        Err(e) => return error(e),
    };
    let flag = |k: &str| query.iter().any(|(qk, v)| qk == k && (v == "true" || v == "1"));
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let result = match (&method, segs.as_slice()) {
        (&Method::GET, ["v1", "status"]) => Ok(ok(StatusCode::OK, status(d))),
        (&Method::GET, ["v1", "disks"]) => {
            let list: Vec<Value> = d.registry.disks().iter().map(|x| d.disk_json(x)).collect();
            Ok(ok(StatusCode::OK, Value::Array(list)))
        }
        (&Method::POST, ["v1", "disks"]) => add_disk(d, body).await,
        (&Method::GET, ["v1", "disks", name]) => {
            d.registry.disk(name).map(|x| ok(StatusCode::OK, d.disk_json(&x)))
        }
        (&Method::DELETE, ["v1", "disks", name]) => {
            let (name, force) = (name.to_string(), flag("force"));
            blocking(d, move |d| d.registry.remove_disk(&name, force).map(|_| name))
                .await
                .map(|name| {
                    d.events.emit("disk_removed", json!({ "name": name }));
                    empty(StatusCode::NO_CONTENT)
                })
        }
        (&Method::POST, ["v1", "disks", name, "resize"]) => resize_disk(d, name, &body).await,
        (&Method::POST, ["v1", "snapshots"]) => create_snapshots(d, body).await,
        (&Method::GET, ["v1", "snapshots"]) => {
            let disk = query.iter().find(|(k, _)| k == "disk").map(|(_, v)| v.as_str());
            // Asking for a disk that does not exist is an error, as everywhere.
            match disk.map(|x| d.registry.disk(x)).transpose() {
                Err(e) => Err(e),
                Ok(_) => {
                    let list: Vec<Value> = d
                        .registry
                        .snapshots(disk)
                        .iter()
                        .map(|e| d.snapshot_json(e))
                        .collect();
                    Ok(ok(StatusCode::OK, Value::Array(list)))
                }
            }
        }
        (&Method::GET, ["v1", "snapshots", id]) => d
            .registry
            .snapshot(id)
            .map(|e| ok(StatusCode::OK, d.snapshot_json(&e))),
        (&Method::DELETE, ["v1", "snapshots", id]) => {
            let (id, force) = (id.to_string(), flag("force"));
            blocking(d, move |d| {
                let (disk, name) = split_id(&id)?;
                d.registry.delete_snapshot(disk, name, force)
            })
            .await
            .map(|_| empty(StatusCode::NO_CONTENT))
        }
        (&Method::GET, ["v1", "disks", disk, "bitmaps"]) => {
            d.registry.bitmaps_json(disk).map(|v| ok(StatusCode::OK, v))
        }
        (&Method::POST, ["v1", "disks", disk, "bitmaps"]) => {
            let mut v: Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => return error(Error::invalid(format!("bad request body: {e}"))),
            };
            if !v.is_object() {
                return error(Error::invalid("request body must be a JSON object"));
            }
            v["action"] = json!("bitmap-add");
            v["disk"] = json!(disk);
            let name = v["name"].as_str().unwrap_or_default().to_string();
            let disk = disk.to_string();
            match run_actions(d, vec![v]).await {
                Ok(_) => d.registry.disk(&disk).and_then(|x| {
                    x.live
                        .bitmap(&name)
                        .map(|b| ok(StatusCode::CREATED, bitmap_json(&b)))
                        .ok_or_else(|| Error::not_found("bitmap vanished"))
                }),
                Err(e) => Err(e),
            }
        }
        (&Method::DELETE, ["v1", "disks", disk, "bitmaps", name]) => {
            let a = json!({ "action": "bitmap-remove", "disk": disk, "name": name });
            run_actions(d, vec![a])
                .await
                .map(|_| empty(StatusCode::NO_CONTENT))
        }
        (&Method::POST, ["v1", "disks", disk, "bitmaps", name, op @ ("clear" | "enable" | "disable")]) => {
            let a = json!({ "action": format!("bitmap-{op}"), "disk": disk, "name": name });
            run_actions(d, vec![a])
                .await
                .map(|_| empty(StatusCode::NO_CONTENT))
        }
        (&Method::POST, ["v1", "disks", disk, "bitmaps", name, "merge"]) => {
            let v: Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => return error(Error::invalid(format!("bad request body: {e}"))),
            };
            let a =
                json!({ "action": "bitmap-merge", "disk": disk, "target": name, "sources": v["sources"] });
            run_actions(d, vec![a])
                .await
                .map(|_| empty(StatusCode::NO_CONTENT))
        }
        (&Method::POST, ["v1", "transactions"]) => {
            let v: Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => return error(Error::invalid(format!("bad request body: {e}"))),
            };
            match v["actions"].as_array() {
                Some(list) => run_actions(d, list.clone()).await.map(|made| {
                    let snaps: Vec<Value> = made.iter().flatten().map(|e| d.snapshot_json(e)).collect();
                    ok(StatusCode::OK, json!({ "snapshots": snaps }))
                }),
                None => Err(Error::invalid("body must be {\"actions\": [...]}")),
            }
        }
        (&Method::GET, ["v1", "events"]) => Ok(sse(&d.events, stop)),
        _ => {
            let known = ROUTES.iter().any(|(_, p)| template_matches(p, &segs));
            if known {
                Ok(error_with(
                    StatusCode::METHOD_NOT_ALLOWED,
                    Error::invalid(format!("method {method} is not allowed on {path}")),
                ))
            } else {
                Err(Error::not_found(format!(
                    "no such API path: {method} {path} (see docs/openapi.json)"
                )))
            }
        }
    };
    result.unwrap_or_else(error)
}

/// Decodes `%XX` escapes of one path segment or query value.
fn percent_decode(s: &str) -> Result<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| Error::invalid(format!("bad percent-encoding in '{s}'")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| Error::invalid(format!("'{s}' does not decode to UTF-8")))
}

/// `a=1&b=x%40y` as decoded pairs (`+` is a space, as in forms).
fn parse_query(q: &str) -> Result<Vec<(String, String)>> {
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            Ok((
                percent_decode(&k.replace('+', " "))?,
                percent_decode(&v.replace('+', " "))?,
            ))
        })
        .collect()
}

/// Runs a registry change off the runtime: changes wait for each other
/// and for the instant of a transaction, which waits for writes in flight.
async fn blocking<T: Send + 'static>(
    d: &Arc<Daemon>,
    f: impl FnOnce(&Daemon) -> Result<T> + Send + 'static,
) -> Result<T> {
    let d2 = d.clone();
    tokio::task::spawn_blocking(move || f(&d2))
        .await
        .map_err(|e| Error::new(crate::error::Kind::Internal, format!("control task failed: {e}")))?
}

fn template_matches(template: &str, segs: &[&str]) -> bool {
    let t: Vec<&str> = template.trim_matches('/').split('/').collect();
    t.len() == segs.len() && t.iter().zip(segs).all(|(a, b)| a.starts_with('{') || a == b)
}

fn status(d: &Daemon) -> Value {
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": d.started.elapsed().as_secs(),
        "state_dir": d.state_dir,
        "control": d.control,
        "nbd": d.listen.iter().map(|l| l.to_string()).collect::<Vec<_>>(),
        "disks": d.registry.disks().len(),
        "connections": d.registry.active_connection_count(),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddDisk {
    name: String,
    path: PathBuf,
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| Error::invalid(format!("bad request body: {e}")))
}

async fn add_disk(d: &Arc<Daemon>, body: Bytes) -> Result<Response<ApiBody>> {
    let req: AddDisk = parse(&body)?;
    let disk = blocking(d, move |d| d.registry.add_disk(&req.name, &req.path)).await?;
    let v = d.disk_json(&disk);
    d.events.emit("disk_added", v.clone());
    Ok(ok(StatusCode::CREATED, v))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Resize {
    size: Value,
    #[serde(default)]
    shrink: bool,
}

async fn resize_disk(d: &Arc<Daemon>, name: &str, body: &[u8]) -> Result<Response<ApiBody>> {
    let req: Resize = parse(body)?;
    let size = match &req.size {
        Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| Error::invalid("size must be a whole number of bytes"))?,
        Value::String(s) => crate::units::parse_size(s)?,
        _ => {
            return Err(Error::invalid(
                "size must be a number of bytes or a size like \"10G\"",
            ))
        }
    };
    let name = name.to_string();
    let disk = blocking(d, move |d| d.registry.resize_disk(&name, size, req.shrink)).await?;
    Ok(ok(StatusCode::OK, d.disk_json(&disk)))
}

/// Parses and applies actions as one transaction, off the runtime (taking
/// the instant waits for in-flight writes).
async fn run_actions(d: &Arc<Daemon>, actions: Vec<Value>) -> Result<Vec<Vec<Arc<SnapshotEntry>>>> {
    let actions = actions
        .into_iter()
        .map(Action::from_json)
        .collect::<Result<Vec<_>>>()?;
    let d2 = d.clone();
    tokio::task::spawn_blocking(move || d2.registry.transaction(actions))
        .await
        .map_err(|e| {
            Error::new(
                crate::error::Kind::Internal,
                format!("transaction task failed: {e}"),
            )
        })?
}

async fn create_snapshots(d: &Arc<Daemon>, body: Bytes) -> Result<Response<ApiBody>> {
    let req: CreateSnapshot = parse(&body)?;
    let d2 = d.clone();
    // Taking the instant waits for in-flight writes: keep it off the runtime.
    let made = tokio::task::spawn_blocking(move || d2.registry.create_snapshots(&req))
        .await
        .map_err(|e| Error::new(crate::error::Kind::Internal, format!("snapshot task failed: {e}")))??;
    let list: Vec<Value> = made.iter().map(|e| d.snapshot_json(e)).collect();
    Ok(ok(StatusCode::CREATED, Value::Array(list)))
}

fn ok(status: StatusCode, v: Value) -> Response<ApiBody> {
    let mut body = serde_json::to_vec_pretty(&v).unwrap_or_default();
    body.push(b'\n');
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

fn empty(status: StatusCode) -> Response<ApiBody> {
    let mut r = Response::new(Full::new(Bytes::new()).boxed());
    *r.status_mut() = status;
    r
}

fn error(e: Error) -> Response<ApiBody> {
    error_with(e.kind.status(), e)
}

fn error_with(status: StatusCode, e: Error) -> Response<ApiBody> {
    ok(
        status,
        json!({ "error": { "code": e.kind.code(), "message": e.message } }),
    )
}

/// Server-sent events: each daemon event becomes `event:` and `data:` lines.
fn sse(events: &Events, mut stop: watch::Receiver<bool>) -> Response<ApiBody> {
    let mut rx = events.subscribe();
    let (tx, body_rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        // A comment line first, so clients see the stream is open.
        if tx.send(Bytes::from_static(b": fleece events\n\n")).await.is_err() {
            return;
        }
        loop {
            let msg = tokio::select! {
                m = rx.recv() => m,
                _ = stop.changed() => return,
            };
            let text = match msg {
                Ok(ev) => format!("event: {}\ndata: {}\n\n", ev.kind, ev.data),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    format!("event: lagged\ndata: {{\"missed\":{n}}}\n\n")
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if tx.send(Bytes::from(text)).await.is_err() {
                return;
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(ChannelBody(body_rx).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|m| m.map(|b| Ok(Frame::data(b))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openapi_document_lists_exactly_the_served_routes() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json");
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let mut documented: Vec<(String, String)> = Vec::new();
        for (p, ops) in doc["paths"].as_object().unwrap() {
            for m in ops.as_object().unwrap().keys() {
                if ["get", "post", "put", "delete", "patch"].contains(&m.as_str()) {
                    documented.push((m.to_uppercase(), p.clone()));
                }
            }
        }
        let mut served: Vec<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        documented.sort();
        served.sort();
        assert_eq!(documented, served, "docs/openapi.json and api::ROUTES differ");
    }

    #[test]
    fn percent_encoded_names_decode_and_bad_escapes_are_refused() {
        assert_eq!(percent_decode("vm1%40live2").unwrap(), "vm1@live2");
        assert_eq!(percent_decode("v%6d").unwrap(), "vm");
        assert!(percent_decode("%zz").is_err());
        assert!(percent_decode("%4").is_err());
        assert!(percent_decode("%ff").is_err());
        assert_eq!(
            parse_query("disk=vm%31&force=true").unwrap(),
            vec![
                ("disk".to_string(), "vm1".to_string()),
                ("force".to_string(), "true".to_string())
            ]
        );
    }

    #[test]
    fn path_templates_match_segments() {
        assert!(template_matches("/v1/disks/{name}", &["v1", "disks", "x"]));
        assert!(!template_matches("/v1/disks/{name}", &["v1", "disks"]));
    }
}
