//! Control API: HTTP/1.1 + JSON on a Unix socket. It only changes daemon
//! state; it is never on the data path.
//!
//! `routes` holds the table that dispatches requests (and that a test
//! checks against `docs/openapi.json`) with the handlers, `types` what
//! travels (shared with the CLI), `events` the event stream. This file is
//! the server loop, the daemon state the handlers see, and how registry
//! objects look on the wire.

mod events;
pub mod routes;
pub mod types;

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use fleece_block::{NamedBitmap, OnCbwError};
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::UnixListener;
use tokio::sync::watch;

use crate::clients::Clients;
use crate::disks::Disks;
use crate::error::{Error, Kind, Result};
use crate::events::Events;
use crate::jobs::Jobs;
use crate::nbd::ListenAddr;
use crate::registry::{self, Registry, SnapshotEntry};
use crate::snapshots::Snapshots;
use crate::txn::Txn;

/// Largest request body the daemon reads; request bodies are small JSON
/// documents. The CLI checks its requests against it.
pub const MAX_BODY: usize = 1 << 20;

/// Daemon state shared by the control API and the shutdown path.
pub struct Daemon {
    /// Disks, snapshots and exports.
    pub registry: Arc<Registry>,
    /// Adds, removes and resizes disks.
    pub disks: Arc<Disks>,
    /// Deletes snapshots (they are taken by transactions).
    pub snapshots: Arc<Snapshots>,
    /// Applies bitmap and snapshot actions at one instant.
    pub txn: Arc<Txn>,
    /// Push-backup jobs.
    pub jobs: Arc<Jobs>,
    /// Who is connected to which export.
    pub clients: Arc<dyn Clients>,
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

    fn status(&self) -> types::Status {
        types::Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_secs: self.started.elapsed().as_secs(),
            state_dir: self.state_dir.clone(),
            control: self.control.clone(),
            nbd: self.listen.iter().map(|l| l.to_string()).collect(),
            disks: self.registry.disks().len(),
            connections: self.clients.active_total(),
        }
    }

    fn disk(&self, d: &registry::Disk) -> types::Disk {
        types::Disk {
            name: d.name.clone(),
            path: d.image.path().to_path_buf(),
            format: d.image.format().name().to_string(),
            size: d.image.size(),
            export: d.export.name.clone(),
            uri: self.uri(&d.export.name),
            connections: self.clients.active(std::slice::from_ref(&d.export.name)),
            snapshots: self.registry.snapshot_names(&d.name),
        }
    }

    fn snapshot(&self, e: &SnapshotEntry) -> types::Snapshot {
        let stats = e.snap.stats();
        let (kind, path) = e.snap.store_description();
        let opts = e.snap.options();
        types::Snapshot {
            disk: e.disk.clone(),
            name: e.name.clone(),
            export: e.export.name.clone(),
            uri: self.uri(&e.export.name),
            created: e.created,
            size: e.snap.size(),
            cluster_size: e.snap.cluster_size(),
            store: types::Store {
                kind: kind.to_string(),
                path,
                used_bytes: stats.used_bytes,
                limit_bytes: opts.store_limit,
                memory_limit_bytes: e.memory_limit,
            },
            state: match stats.broken {
                Some(_) => types::SnapshotState::Broken,
                None => types::SnapshotState::Active,
            },
            error: stats.broken,
            copied_clusters: stats.copied_clusters,
            hole_clusters: stats.hole_clusters,
            discarded_clusters: stats.discarded_clusters,
            on_cbw_error: match opts.on_cbw_error {
                OnCbwError::BreakGuestWrite => "break-guest-write",
                OnCbwError::BreakSnapshot => "break-snapshot",
            }
            .to_string(),
            cbw_timeout_secs: opts.cbw_timeout.map(|t| t.as_secs_f64()),
            read_once: opts.read_once,
            bitmap: e.bitmap.clone(),
            connections: self.clients.active(std::slice::from_ref(&e.export.name)),
        }
    }
}

/// True for bitmaps users see: not a job's hidden successor.
fn visible(b: &NamedBitmap) -> bool {
    !registry::is_hidden(b.name())
}

fn bitmap(b: &NamedBitmap) -> types::Bitmap {
    types::Bitmap {
        name: b.name().to_string(),
        granularity: b.bits().granularity(),
        dirty_bytes: b.bits().dirty_bytes(),
        recording: b.is_enabled(),
        persistent: b.is_persistent(),
        exact: b.is_consistent(),
        inconsistent_reason: b.inconsistent_reason(),
        path: b.path().map(PathBuf::from),
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
                        async move { Ok::<_, Infallible>(handle(d, req, stop).await) }
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

async fn handle(d: Arc<Daemon>, req: Request<Incoming>, stop: watch::Receiver<bool>) -> Response<ApiBody> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    tracing::debug!(%method, %path, "control request");
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return error(Error::invalid("request body is too large or unreadable")),
    };
    routes::dispatch(d, &method, &path, &query, body, stop).await
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
        .map_err(|e| Error::new(Kind::Internal, format!("control task failed: {e}")))?
}

/// A JSON answer. It goes through `serde_json::Value`, whose objects keep
/// their keys sorted, so answers read as they always did (keys in
/// alphabetical order, not in field order).
fn json<T: Serialize>(status: StatusCode, v: &T) -> Response<ApiBody> {
    let mut body = serde_json::to_value(v)
        .and_then(|v| serde_json::to_vec_pretty(&v))
        .unwrap_or_default();
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
    let body = types::ErrorBody {
        error: types::ErrorDetail {
            code: e.kind.code().to_string(),
            message: e.message,
        },
    };
    json(status, &body)
}
