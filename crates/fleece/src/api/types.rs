//! What travels over the control API, shared by the daemon (which sends
//! answers and reads requests) and the CLI (which does the opposite), so
//! both read the same field names. `docs/openapi.json` documents them; a
//! test below checks that each documented schema and its type have the
//! same fields.
//!
//! Every field is sent, `null` when absent, as the daemon always did:
//! scripts may test `x.bitmap == null`. Request bodies refuse fields they
//! do not know, so a typo is an error and not a silently ignored option.
//!
//! The transaction [`Action`] and [`CreateSnapshot`] are defined next to
//! the code that applies them (`bitmaps.rs`, `snapshots.rs`) and [`Size`]
//! in `units.rs`: the registry takes them as they are, and defining them
//! here would make the registry depend on the API module that depends on
//! it. They are re-exported here so that API users find every type in one
//! place.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use crate::jobs::{JobInfo, SetSpeed, StartBackup};
pub use crate::snapshots::CreateSnapshot;
pub use crate::txn::{Action, BitmapAdd, BitmapMerge, BitmapRef};
pub use crate::units::Size;

/// `GET /v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// Daemon version.
    pub version: String,
    /// Seconds since the daemon started.
    pub uptime_secs: u64,
    /// State directory (absolute).
    pub state_dir: PathBuf,
    /// Control socket.
    pub control: PathBuf,
    /// NBD listen addresses (`unix:PATH`, `tcp:HOST:PORT`).
    pub nbd: Vec<String>,
    /// Number of disks.
    pub disks: usize,
    /// Connections whose clients have not hung up.
    pub connections: usize,
}

/// A disk (`GET /v1/disks/{name}`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Disk {
    /// Name, also its export name.
    pub name: String,
    /// Image path as given.
    pub path: PathBuf,
    /// Image format: `raw` or `qcow2`.
    pub format: String,
    /// Bytes.
    pub size: u64,
    /// NBD export name.
    pub export: String,
    /// NBD URI of the export on the first listener.
    pub uri: String,
    /// Connections whose clients have not hung up.
    pub connections: usize,
    /// Names of its snapshots.
    pub snapshots: Vec<String>,
}

/// A snapshot of one disk (`GET /v1/snapshots/{disk}@{name}`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    /// Disk.
    pub disk: String,
    /// Snapshot name.
    pub name: String,
    /// NBD export name, `DISK@NAME`.
    pub export: String,
    /// NBD URI of the view.
    pub uri: String,
    /// Seconds since the Unix epoch at the instant.
    pub created: u64,
    /// Bytes.
    pub size: u64,
    /// Copy unit in bytes.
    pub cluster_size: u64,
    /// Where copies go.
    pub store: Store,
    /// Whether the view can still be read.
    pub state: SnapshotState,
    /// Why it broke.
    pub error: Option<String>,
    /// Clusters whose contents at the instant are saved.
    pub copied_clusters: u64,
    /// Of those, the ones kept as holes (no store space).
    pub hole_clusters: u64,
    /// Clusters discarded from the view.
    pub discarded_clusters: u64,
    /// `break-guest-write` or `break-snapshot`.
    pub on_cbw_error: String,
    /// Copy timeout, if any.
    pub cbw_timeout_secs: Option<f64>,
    /// Whether each read discards what it returned.
    pub read_once: bool,
    /// Bitmap that scopes it (an incremental snapshot).
    pub bitmap: Option<String>,
    /// Connections to the view whose clients have not hung up.
    pub connections: usize,
}

/// A snapshot's store.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Store {
    /// `file`, `qcow2` or `ram`.
    pub kind: String,
    /// Its file, if it has one.
    pub path: Option<PathBuf>,
    /// Bytes it holds.
    pub used_bytes: u64,
    /// Most bytes it may hold.
    pub limit_bytes: Option<u64>,
    /// RAM stores: most bytes kept in memory (the rest spills to a file).
    pub memory_limit_bytes: Option<u64>,
}

/// [`Snapshot::state`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotState {
    /// Readable.
    Active,
    /// A failed copy broke it (`break-snapshot`); reads fail.
    Broken,
}

impl SnapshotState {
    /// The wire name, for tables.
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotState::Active => "active",
            SnapshotState::Broken => "broken",
        }
    }
}

/// A dirty bitmap (`GET /v1/disks/{name}/bitmaps`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bitmap {
    /// Name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// Bytes marked changed.
    pub dirty_bytes: u64,
    /// Whether writes are being recorded.
    pub recording: bool,
    /// Whether it is kept in a sidecar file.
    pub persistent: bool,
    /// False once the bitmap may have missed a write (its sidecar could not
    /// be made durable, or the disk changed size while fleece was not
    /// serving it): the next backup from it must be a full one.
    pub exact: bool,
    /// Why `exact` is false.
    pub inconsistent_reason: Option<String>,
    /// Its sidecar file.
    pub path: Option<PathBuf>,
}

/// Body of `POST /v1/disks`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object {\"name\", \"path\"}")]
pub struct AddDisk {
    /// Export name.
    pub name: String,
    /// Path of an existing image (absolute: the daemon may run elsewhere).
    pub path: PathBuf,
    /// Its format, `raw` or `qcow2`; detected when absent (qcow2 by its
    /// magic, raw otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
}

/// Body of `POST /v1/disks/{name}/resize`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object {\"size\", \"shrink\"?}")]
pub struct ResizeDisk {
    /// New size.
    pub size: Size,
    /// Allow a smaller size, which discards the data past it.
    #[serde(default)]
    pub shrink: bool,
}

/// Body of `POST /v1/disks/{name}/bitmaps`: a `bitmap-add` action without
/// the disk, which the path names.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an object {\"name\", \"granularity\"?, \"disabled\"?, \"persistent\"?}"
)]
pub struct AddBitmap {
    /// Bitmap name.
    pub name: String,
    /// Bytes per bit (default 64 KiB).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub granularity: Option<Size>,
    /// Create it without recording.
    #[serde(default)]
    pub disabled: bool,
    /// Keep it in a sidecar file (default true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub persistent: Option<bool>,
}

impl AddBitmap {
    /// The transaction action that makes it on `disk`.
    pub fn on(self, disk: &str) -> Action {
        Action::BitmapAdd(BitmapAdd {
            disk: disk.to_string(),
            name: self.name,
            granularity: self.granularity,
            disabled: self.disabled,
            persistent: self.persistent,
        })
    }
}

/// Body of `POST /v1/disks/{name}/bitmaps/{bitmap}/merge`. Other fields
/// are ignored, as they always were (the schema does not close it).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(expecting = "an object {\"sources\": [...]}")]
pub struct MergeSources {
    /// Bitmaps whose bits are added to the one in the path.
    pub sources: Vec<String>,
}

/// Body of `POST /v1/transactions`. Other fields are ignored, as they
/// always were (the schema does not close it).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(expecting = "an object {\"actions\": [...]}")]
pub struct Transaction {
    /// Applied in order at one instant, all or none.
    pub actions: Vec<Action>,
}

/// Answer of `POST /v1/transactions`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TransactionResult {
    /// The snapshots the transaction made.
    pub snapshots: Vec<Snapshot>,
}

/// Body of every error answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// [`ErrorBody::error`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// `invalid_argument`, `not_found`, `exists`, `busy`, `unavailable` or
    /// `internal` (`error::Kind::code`).
    pub code: String,
    /// For people.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::DeserializeOwned;
    use serde_json::{json, Value};

    fn openapi() -> Value {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    /// A value with every property the schema documents (the first choice
    /// of each `oneOf` and `enum`).
    fn sample(doc: &Value, schema: &Value) -> Value {
        if let Some(r) = schema["$ref"].as_str() {
            return sample(doc, doc.pointer(r.trim_start_matches('#')).unwrap());
        }
        if let Some(first) = schema["oneOf"].get(0) {
            return sample(doc, first);
        }
        if let Some(first) = schema["enum"].get(0) {
            return first.clone();
        }
        match schema["type"].as_str() {
            Some("object") => Value::Object(
                schema["properties"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), sample(doc, v)))
                    .collect(),
            ),
            Some("array") => json!([sample(doc, &schema["items"])]),
            Some("string") => json!("x"),
            Some("integer") => json!(4096),
            Some("number") => json!(1.5),
            Some("boolean") => json!(true),
            other => panic!("schema type {other:?} in {schema}"),
        }
    }

    /// Reads the documented sample as `T` and writes it back: equal only
    /// if `T` has exactly the documented fields, nested ones included.
    fn check<T: DeserializeOwned + Serialize>(doc: &Value, what: &str, schema: &Value) {
        let want = sample(doc, schema);
        let typed: T = serde_json::from_value(want.clone())
            .unwrap_or_else(|e| panic!("{what}: the documented fields do not parse: {e}\n{want:#}"));
        let got = serde_json::to_value(typed).unwrap();
        assert_eq!(got, want, "{what}: the type and docs/openapi.json differ");
    }

    #[test]
    fn every_documented_schema_has_a_type_with_the_same_fields() {
        let doc = openapi();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        let s = |name: &str| {
            schemas
                .get(name)
                .unwrap_or_else(|| panic!("schema {name} is not documented"))
        };
        check::<ErrorBody>(&doc, "Error", s("Error"));
        check::<Status>(&doc, "Status", s("Status"));
        check::<AddDisk>(&doc, "AddDisk", s("AddDisk"));
        check::<Disk>(&doc, "Disk", s("Disk"));
        check::<ResizeDisk>(&doc, "ResizeDisk", s("ResizeDisk"));
        check::<CreateSnapshot>(&doc, "CreateSnapshot", s("CreateSnapshot"));
        check::<Snapshot>(&doc, "Snapshot", s("Snapshot"));
        check::<AddBitmap>(&doc, "AddBitmap", s("AddBitmap"));
        check::<Bitmap>(&doc, "Bitmap", s("Bitmap"));
        check::<StartBackup>(&doc, "StartBackup", s("StartBackup"));
        check::<JobInfo>(&doc, "Job", s("Job"));
        let body =
            |path: &str| &doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"];
        check::<MergeSources>(
            &doc,
            "merge body",
            body("/v1/disks/{name}/bitmaps/{bitmap}/merge"),
        );
        let applied = &doc["paths"]["/v1/transactions"]["post"]["responses"]["200"]["content"]
            ["application/json"]["schema"];
        check::<TransactionResult>(&doc, "transaction answer", applied);
        check::<SetSpeed>(&doc, "speed body", body("/v1/jobs/{name}/speed"));
        // Action is a loose schema (its fields depend on `action`): the
        // tests below check each kind.
        let mut documented: Vec<&str> = schemas.keys().map(String::as_str).collect();
        documented.sort();
        let mut checked = vec![
            "Action",
            "AddBitmap",
            "AddDisk",
            "Bitmap",
            "CreateSnapshot",
            "Disk",
            "Error",
            "Job",
            "JobDisk",
            "ResizeDisk",
            "StartBackup",
            "Snapshot",
            "Status",
        ];
        checked.sort();
        assert_eq!(documented, checked, "a documented schema without a check here");
    }

    #[test]
    fn actions_round_trip_with_their_kebab_case_tags() {
        for a in [
            json!({"action": "bitmap-add", "disk": "vm", "name": "b0", "granularity": 65536, "disabled": true, "persistent": false}),
            json!({"action": "bitmap-add", "disk": "vm", "name": "b0", "disabled": false}),
            json!({"action": "bitmap-remove", "disk": "vm", "name": "b0"}),
            json!({"action": "bitmap-clear", "disk": "vm", "name": "b0"}),
            json!({"action": "bitmap-enable", "disk": "vm", "name": "b0"}),
            json!({"action": "bitmap-disable", "disk": "vm", "name": "b0"}),
            json!({"action": "bitmap-merge", "disk": "vm", "target": "b0", "sources": ["b1", "b2"]}),
            json!({"action": "snapshot-create", "disks": ["vm", "db"], "name": "s1", "read_once": false}),
            json!({"action": "snapshot-create", "disks": ["vm"], "name": "s2", "cluster_size": 131072,
                   "store": "ram:1G", "store_limit": 1048576, "bitmap": "b0", "read_once": true,
                   "on_cbw_error": "break-snapshot", "cbw_timeout_secs": 2.5, "rotate": "b1"}),
        ] {
            let parsed: Action = serde_json::from_value(a.clone()).unwrap_or_else(|e| panic!("{a}: {e}"));
            assert_eq!(serde_json::to_value(&parsed).unwrap(), a);
        }
    }

    #[test]
    fn actions_take_sizes_as_strings_and_send_them_as_numbers() {
        let a: Action = serde_json::from_value(
            json!({"action": "bitmap-add", "disk": "vm", "name": "b", "granularity": "128K"}),
        )
        .unwrap();
        assert_eq!(serde_json::to_value(&a).unwrap()["granularity"], 131072);
        let t: Transaction = serde_json::from_str(r#"{"actions": [{"action": "snapshot-create", "disks": ["vm"], "name": "s", "cluster_size": "1M"}]}"#).unwrap();
        assert!(matches!(&t.actions[0], Action::SnapshotCreate(c) if c.cluster_size == Some(Size(1 << 20))));
    }

    #[test]
    fn bad_actions_are_refused_with_what_is_wrong() {
        let err = |v: Value| serde_json::from_value::<Action>(v).unwrap_err().to_string();
        let e = err(json!({"action": "bitmap-frob", "disk": "vm", "name": "b"}));
        assert!(
            e.contains("bitmap-frob") && e.contains("bitmap-add") && e.contains("snapshot-create"),
            "{e}"
        );
        let e = err(json!({"disk": "vm", "name": "b"}));
        assert!(e.contains("missing field `action`"), "{e}");
        let e = err(json!({"action": "bitmap-clear", "disk": "vm", "name": "b", "force": true}));
        assert!(e.contains("unknown field `force`"), "{e}");
        let e = err(json!({"action": "snapshot-create", "disks": ["vm"], "name": "s", "cluster": 1}));
        assert!(
            e.contains("unknown field `cluster`") && e.contains("cluster_size"),
            "{e}"
        );
        let e = err(json!({"action": "bitmap-add", "disk": "vm", "name": "b", "granularity": -4096}));
        assert!(e.contains("-4096") && e.contains("whole number of bytes"), "{e}");
        let e = err(json!("bitmap-clear"));
        assert!(e.contains("an action object"), "{e}");
    }

    #[test]
    fn request_bodies_refuse_unknown_fields() {
        let e = serde_json::from_str::<AddDisk>(r#"{"name": "a", "path": "/x", "size": 1}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `size`"), "{e}");
        let e = serde_json::from_str::<ResizeDisk>(r#"{"size": "1G", "force": true}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `force`"), "{e}");
        let e = serde_json::from_str::<AddBitmap>(r#"{"name": "b", "disk": "vm"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `disk`"), "{e}");
        let e = serde_json::from_str::<AddBitmap>("[]").unwrap_err();
        assert!(e.to_string().contains("expected an object"), "{e}");
    }
}
