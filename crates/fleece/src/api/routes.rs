//! The route table, which dispatches every request (and which a test
//! checks against `docs/openapi.json`), and the handlers, which call the
//! registry.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use hyper::{Method, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::sync::watch;

use super::types::{
    Action, AddBitmap, AddDisk, BitmapMerge, BitmapRef, CreateSnapshot, MergeSources, ResizeDisk, SetSpeed,
    StartBackup, Transaction, TransactionResult,
};
use super::{bitmap, blocking, empty, error, error_with, events, json, visible, ApiBody, Daemon};
use crate::error::{Error, Result};
use crate::registry::{split_id, SnapshotEntry};

/// A request as its handler sees it.
pub struct Call {
    /// The path's `{...}` segments by name, percent-decoded.
    params: Vec<(&'static str, String)>,
    /// Query pairs, percent-decoded.
    query: Vec<(String, String)>,
    body: Bytes,
    /// Turns true when the daemon stops (ends event streams).
    stop: watch::Receiver<bool>,
}

impl Call {
    fn param(&self, name: &str) -> &str {
        self.params
            .iter()
            .find(|(n, _)| *n == name)
            .map_or("", |(_, v)| v.as_str())
    }

    /// `?NAME=true` or `?NAME=1`.
    fn flag(&self, name: &str) -> bool {
        self.query
            .iter()
            .any(|(k, v)| k == name && (v == "true" || v == "1"))
    }

    fn body<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.body).map_err(|e| Error::invalid(format!("bad request body: {e}")))
    }
}

type Reply = Result<Response<ApiBody>>;
type Handler = fn(Arc<Daemon>, Call) -> Pin<Box<dyn Future<Output = Reply> + Send>>;

/// One route: a method and an OpenAPI path template (`{x}` matches one
/// segment) and what answers it.
#[derive(Debug)]
pub struct Route {
    /// `GET`, `POST`, `DELETE`.
    pub method: &'static str,
    /// As in `docs/openapi.json`.
    pub path: &'static str,
    handler: Handler,
}

macro_rules! route {
    ($method:literal, $path:literal, $handler:ident) => {
        Route {
            method: $method,
            path: $path,
            handler: |d, c| Box::pin($handler(d, c)),
        }
    };
}

/// Every route the server answers.
pub static ROUTES: &[Route] = &[
    route!("GET", "/v1/status", status),
    route!("GET", "/v1/disks", list_disks),
    route!("POST", "/v1/disks", add_disk),
    route!("GET", "/v1/disks/{name}", get_disk),
    route!("DELETE", "/v1/disks/{name}", remove_disk),
    route!("POST", "/v1/disks/{name}/resize", resize_disk),
    route!("POST", "/v1/snapshots", create_snapshots),
    route!("GET", "/v1/snapshots", list_snapshots),
    route!("GET", "/v1/snapshots/{id}", get_snapshot),
    route!("DELETE", "/v1/snapshots/{id}", delete_snapshot),
    route!("GET", "/v1/disks/{name}/bitmaps", list_bitmaps),
    route!("POST", "/v1/disks/{name}/bitmaps", add_bitmap),
    route!("DELETE", "/v1/disks/{name}/bitmaps/{bitmap}", remove_bitmap),
    route!("POST", "/v1/disks/{name}/bitmaps/{bitmap}/clear", clear_bitmap),
    route!("POST", "/v1/disks/{name}/bitmaps/{bitmap}/enable", enable_bitmap),
    route!(
        "POST",
        "/v1/disks/{name}/bitmaps/{bitmap}/disable",
        disable_bitmap
    ),
    route!("POST", "/v1/disks/{name}/bitmaps/{bitmap}/merge", merge_bitmaps),
    route!("POST", "/v1/transactions", transaction),
    route!("GET", "/v1/jobs", list_jobs),
    route!("POST", "/v1/jobs", start_job),
    route!("GET", "/v1/jobs/{name}", get_job),
    route!("DELETE", "/v1/jobs/{name}", dismiss_job),
    route!("POST", "/v1/jobs/{name}/pause", pause_job),
    route!("POST", "/v1/jobs/{name}/resume", resume_job),
    route!("POST", "/v1/jobs/{name}/cancel", cancel_job),
    route!("POST", "/v1/jobs/{name}/speed", set_job_speed),
    route!("GET", "/v1/events", events),
];

impl Route {
    /// The named `{...}` segments if `segs` fits the template.
    fn matches(&self, segs: &[String]) -> Option<Vec<(&'static str, String)>> {
        let t: Vec<&'static str> = self.path.trim_matches('/').split('/').collect();
        if t.len() != segs.len() {
            return None;
        }
        let mut params = Vec::new();
        for (t, s) in t.iter().zip(segs) {
            match t.strip_prefix('{').and_then(|t| t.strip_suffix('}')) {
                Some(name) => params.push((name, s.clone())),
                None if t == s => {}
                None => return None,
            }
        }
        Some(params)
    }
}

/// What the route table makes of a request's method, path and query.
#[derive(Debug)]
pub enum Routed {
    /// The route that answers it.
    Found {
        /// The route.
        route: &'static Route,
        /// The path's `{...}` segments by name, percent-decoded.
        params: Vec<(&'static str, String)>,
        /// Query pairs, percent-decoded.
        query: Vec<(String, String)>,
    },
    /// A known path, but not with this method (405).
    WrongMethod,
    /// No route has this path (404).
    Unknown,
}

/// Decodes a request's target: the route that answers `method` on `path`,
/// with its parameters and `query` decoded. Errors are bad escapes. Kept
/// apart from `dispatch` so that a fuzz target can run it without a
/// daemon.
pub fn route(method: &str, path: &str, query: &str) -> Result<Routed> {
    // Names travel percent-encoded (`vm1%40snap` is `vm1@snap`): decode
    // each segment after splitting, so an encoded '/' stays inside its name.
    let segs: Vec<String> = path
        .trim_matches('/')
        .split('/')
        .map(percent_decode)
        .collect::<Result<_>>()?;
    let query = parse_query(query)?;
    let mut known = false;
    for route in ROUTES {
        let Some(params) = route.matches(&segs) else {
            continue;
        };
        if route.method != method {
            known = true;
            continue;
        }
        return Ok(Routed::Found { route, params, query });
    }
    Ok(if known {
        Routed::WrongMethod
    } else {
        Routed::Unknown
    })
}

/// Answers one request: 405 for a known path with another method, 404 for
/// an unknown path.
pub async fn dispatch(
    d: Arc<Daemon>,
    method: &Method,
    path: &str,
    query: &str,
    body: Bytes,
    stop: watch::Receiver<bool>,
) -> Response<ApiBody> {
    match route(method.as_str(), path, query) {
        Err(e) => error(e),
        Ok(Routed::Found { route, params, query }) => {
            let call = Call {
                params,
                query,
                body,
                stop,
            };
            (route.handler)(d, call).await.unwrap_or_else(error)
        }
        Ok(Routed::WrongMethod) => error_with(
            StatusCode::METHOD_NOT_ALLOWED,
            Error::invalid(format!("method {method} is not allowed on {path}")),
        ),
        Ok(Routed::Unknown) => error(Error::not_found(format!(
            "no such API path: {method} {path} (see docs/openapi.json)"
        ))),
    }
}

/// Decodes `%XX` escapes of one path segment or query value.
pub fn percent_decode(s: &str) -> Result<String> {
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
pub fn parse_query(q: &str) -> Result<Vec<(String, String)>> {
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

// ---- handlers ----

async fn status(d: Arc<Daemon>, _: Call) -> Reply {
    Ok(json(StatusCode::OK, &d.status()))
}

async fn list_disks(d: Arc<Daemon>, _: Call) -> Reply {
    let list: Vec<_> = d.registry.disks().iter().map(|x| d.disk(x)).collect();
    Ok(json(StatusCode::OK, &list))
}

async fn add_disk(d: Arc<Daemon>, c: Call) -> Reply {
    let req: AddDisk = c.body()?;
    let disk = blocking(&d, move |d| {
        d.disks.add(&req.name, &req.path, req.format.as_deref())
    })
    .await?;
    let disk = d.disk(&disk);
    d.events
        .emit("disk_added", serde_json::to_value(&disk).unwrap_or_default());
    Ok(json(StatusCode::CREATED, &disk))
}

async fn get_disk(d: Arc<Daemon>, c: Call) -> Reply {
    let disk = d.registry.disk(c.param("name"))?;
    Ok(json(StatusCode::OK, &d.disk(&disk)))
}

async fn remove_disk(d: Arc<Daemon>, c: Call) -> Reply {
    let (name, force) = (c.param("name").to_string(), c.flag("force"));
    let name = blocking(&d, move |d| d.disks.remove(&name, force).map(|_| name)).await?;
    d.events.emit("disk_removed", json!({ "name": name }));
    Ok(empty(StatusCode::NO_CONTENT))
}

async fn resize_disk(d: Arc<Daemon>, c: Call) -> Reply {
    let req: ResizeDisk = c.body()?;
    let name = c.param("name").to_string();
    let disk = blocking(&d, move |d| d.disks.resize(&name, req.size.bytes(), req.shrink)).await?;
    Ok(json(StatusCode::OK, &d.disk(&disk)))
}

async fn create_snapshots(d: Arc<Daemon>, c: Call) -> Reply {
    let req: CreateSnapshot = c.body()?;
    let made = run_actions(&d, vec![Action::SnapshotCreate(Box::new(req))])
        .await?
        .pop()
        .unwrap_or_default();
    Ok(json(StatusCode::CREATED, &snapshots(&d, &made)))
}

async fn list_snapshots(d: Arc<Daemon>, c: Call) -> Reply {
    let disk = c.query.iter().find(|(k, _)| k == "disk").map(|(_, v)| v.as_str());
    // Asking for a disk that does not exist is an error, as everywhere.
    if let Some(disk) = disk {
        d.registry.disk(disk)?;
    }
    Ok(json(StatusCode::OK, &snapshots(&d, &d.registry.snapshots(disk))))
}

async fn get_snapshot(d: Arc<Daemon>, c: Call) -> Reply {
    let e = d.registry.snapshot(c.param("id"))?;
    Ok(json(StatusCode::OK, &d.snapshot(&e)))
}

async fn delete_snapshot(d: Arc<Daemon>, c: Call) -> Reply {
    let (id, force) = (c.param("id").to_string(), c.flag("force"));
    blocking(&d, move |d| {
        let (disk, name) = split_id(&id)?;
        d.snapshots.delete(disk, name, force)
    })
    .await?;
    Ok(empty(StatusCode::NO_CONTENT))
}

async fn list_bitmaps(d: Arc<Daemon>, c: Call) -> Reply {
    let disk = d.registry.disk(c.param("name"))?;
    let list: Vec<_> = disk
        .live
        .bitmaps()
        .iter()
        .filter(|b| visible(b))
        .map(|b| bitmap(b))
        .collect();
    Ok(json(StatusCode::OK, &list))
}

async fn add_bitmap(d: Arc<Daemon>, c: Call) -> Reply {
    let req: AddBitmap = c.body()?;
    let (disk, name) = (c.param("name").to_string(), req.name.clone());
    run_actions(&d, vec![req.on(&disk)]).await?;
    let b = d
        .registry
        .disk(&disk)?
        .live
        .bitmap(&name)
        .ok_or_else(|| Error::not_found("bitmap vanished"))?;
    Ok(json(StatusCode::CREATED, &bitmap(&b)))
}

async fn remove_bitmap(d: Arc<Daemon>, c: Call) -> Reply {
    bitmap_op(d, c, Action::BitmapRemove).await
}

async fn clear_bitmap(d: Arc<Daemon>, c: Call) -> Reply {
    bitmap_op(d, c, Action::BitmapClear).await
}

async fn enable_bitmap(d: Arc<Daemon>, c: Call) -> Reply {
    bitmap_op(d, c, Action::BitmapEnable).await
}

async fn disable_bitmap(d: Arc<Daemon>, c: Call) -> Reply {
    bitmap_op(d, c, Action::BitmapDisable).await
}

/// A one-action transaction on the bitmap the path names.
async fn bitmap_op(d: Arc<Daemon>, c: Call, action: fn(BitmapRef) -> Action) -> Reply {
    let b = BitmapRef {
        disk: c.param("name").to_string(),
        name: c.param("bitmap").to_string(),
    };
    run_actions(&d, vec![action(b)]).await?;
    Ok(empty(StatusCode::NO_CONTENT))
}

async fn merge_bitmaps(d: Arc<Daemon>, c: Call) -> Reply {
    let req: MergeSources = c.body()?;
    let merge = BitmapMerge {
        disk: c.param("name").to_string(),
        target: c.param("bitmap").to_string(),
        sources: req.sources,
    };
    run_actions(&d, vec![Action::BitmapMerge(merge)]).await?;
    Ok(empty(StatusCode::NO_CONTENT))
}

async fn transaction(d: Arc<Daemon>, c: Call) -> Reply {
    let req: Transaction = c.body()?;
    let made = run_actions(&d, req.actions).await?;
    let made: Vec<_> = made.into_iter().flatten().collect();
    let snapshots = snapshots(&d, &made);
    Ok(json(StatusCode::OK, &TransactionResult { snapshots }))
}

async fn list_jobs(d: Arc<Daemon>, _: Call) -> Reply {
    let list: Vec<_> = d.jobs.list().iter().map(|j| j.info()).collect();
    Ok(json(StatusCode::OK, &list))
}

async fn start_job(d: Arc<Daemon>, c: Call) -> Reply {
    let req: StartBackup = c.body()?;
    // Connecting to a target and taking the instant both block.
    let job = blocking(&d, move |d| d.jobs.start(req)).await?;
    Ok(json(StatusCode::CREATED, &job.info()))
}

async fn get_job(d: Arc<Daemon>, c: Call) -> Reply {
    Ok(json(StatusCode::OK, &d.jobs.get(c.param("name"))?.info()))
}

async fn dismiss_job(d: Arc<Daemon>, c: Call) -> Reply {
    d.jobs.dismiss(c.param("name"))?;
    Ok(empty(StatusCode::NO_CONTENT))
}

async fn pause_job(d: Arc<Daemon>, c: Call) -> Reply {
    Ok(json(StatusCode::OK, &d.jobs.pause(c.param("name"))?.info()))
}

async fn resume_job(d: Arc<Daemon>, c: Call) -> Reply {
    Ok(json(StatusCode::OK, &d.jobs.resume(c.param("name"))?.info()))
}

async fn cancel_job(d: Arc<Daemon>, c: Call) -> Reply {
    Ok(json(StatusCode::OK, &d.jobs.cancel(c.param("name"))?.info()))
}

async fn set_job_speed(d: Arc<Daemon>, c: Call) -> Reply {
    let req: SetSpeed = c.body()?;
    Ok(json(
        StatusCode::OK,
        &d.jobs.set_speed(c.param("name"), req.speed.bytes())?.info(),
    ))
}

async fn events(d: Arc<Daemon>, c: Call) -> Reply {
    Ok(events::stream(&d.events, c.stop))
}

/// Applies actions as one transaction, off the runtime (taking the instant
/// waits for in-flight writes).
async fn run_actions(d: &Arc<Daemon>, actions: Vec<Action>) -> Result<Vec<Vec<Arc<SnapshotEntry>>>> {
    blocking(d, move |d| d.txn.apply(actions)).await
}

fn snapshots(d: &Daemon, entries: &[Arc<SnapshotEntry>]) -> Vec<super::types::Snapshot> {
    entries.iter().map(|e| d.snapshot(e)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

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
            .map(|r| (r.method.to_string(), r.path.to_string()))
            .collect();
        documented.sort();
        served.sort();
        assert_eq!(
            documented, served,
            "docs/openapi.json and api::routes::ROUTES differ"
        );
    }

    #[test]
    fn no_two_routes_answer_the_same_request() {
        let segs = |r: &Route| r.path.trim_matches('/').split('/').collect::<Vec<_>>();
        let param = |s: &str| s.starts_with('{');
        for (i, a) in ROUTES.iter().enumerate() {
            for b in &ROUTES[i + 1..] {
                let (sa, sb) = (segs(a), segs(b));
                let overlap = a.method == b.method
                    && sa.len() == sb.len()
                    && sa.iter().zip(&sb).all(|(x, y)| param(x) || param(y) || x == y);
                assert!(
                    !overlap,
                    "{} {} and {} {} overlap",
                    a.method, a.path, b.method, b.path
                );
            }
        }
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
    fn path_templates_match_segments_and_name_them() {
        let r = ROUTES
            .iter()
            .find(|r| r.path == "/v1/disks/{name}/bitmaps/{bitmap}/merge")
            .unwrap();
        let segs = |p: &str| p.split('/').map(String::from).collect::<Vec<_>>();
        assert_eq!(
            r.matches(&segs("v1/disks/vm/bitmaps/b0/merge")),
            Some(vec![("name", "vm".to_string()), ("bitmap", "b0".to_string())])
        );
        assert_eq!(r.matches(&segs("v1/disks/vm/bitmaps/b0")), None);
        assert_eq!(r.matches(&segs("v1/disks/vm/bitmaps/b0/clear")), None);
    }
}
