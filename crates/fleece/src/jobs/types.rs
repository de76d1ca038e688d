//! What a job's control API requests and answers carry (re-exported as
//! `api::types`; the CLI sends and reads them).

use serde::{Deserialize, Serialize};

use crate::units::Size;

/// Body of `POST /v1/jobs` (and what `fleece backup start` sends).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a backup request object {\"disks\": [...], \"targets\": [...], ...}"
)]
pub struct StartBackup {
    /// Disks backed up at one instant (or empty with `snapshots`).
    #[serde(default)]
    pub disks: Vec<String>,
    /// Existing snapshots `DISK@NAME` to push instead (left in place).
    #[serde(default)]
    pub snapshots: Vec<String>,
    /// One target per disk (or snapshot), in order.
    pub targets: Vec<String>,
    /// Job name (default: generated).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `full` (default) or `incremental`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync: Option<String>,
    /// Dirty bitmap: what an incremental job copies; kept up to date.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmap: Option<String>,
    /// `on-success` (default), `never` or `always`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmap_mode: Option<String>,
    /// Smallest copy unit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_cluster_size: Option<Size>,
    /// The snapshot's store (`file:PATH`, `qcow2:PATH`, `ram:SIZE`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// Most bytes the store may hold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_limit: Option<Size>,
    /// `break-guest-write` (default) or `break-snapshot`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_cbw_error: Option<String>,
    /// Copy-before-write timeout in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cbw_timeout_secs: Option<f64>,
    /// `hinted` (default) or `offset`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order: Option<String>,
    /// Requests in flight per disk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
    /// Bytes per write request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunk_size: Option<Size>,
    /// Bytes per second, all disks together (0 or absent: no limit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speed: Option<Size>,
    /// `report`, `stop` or `retry` (default: retry for NBD targets, else report).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_target_error: Option<String>,
    /// `report` (default) or `stop`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_source_error: Option<String>,
    /// How long `retry` tries, in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_for_secs: Option<f64>,
    /// Read the target back and compare.
    #[serde(default)]
    pub verify: bool,
}

/// Body of `POST /v1/jobs/{name}/speed`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SetSpeed {
    /// Bytes per second; 0: no limit.
    pub speed: Size,
}

/// A job as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobInfo {
    /// Name.
    pub name: String,
    /// `running`, `paused`, `retrying`, `completed`, `failed`, `cancelled`.
    pub state: String,
    /// `full` or `incremental`.
    pub sync: String,
    /// Bitmap, if any.
    pub bitmap: Option<String>,
    /// `on-success`, `never` or `always`.
    pub bitmap_mode: String,
    /// `hinted` or `offset`.
    pub order: String,
    /// Verify after the copy.
    pub verify: bool,
    /// One entry per disk.
    pub disks: Vec<JobDiskInfo>,
    /// Bytes to write, all disks.
    pub total_bytes: u64,
    /// Bytes the targets acknowledged.
    pub done_bytes: u64,
    /// `done_bytes` of `total_bytes`, 0 to 100.
    pub percent: f64,
    /// Bytes per second lately.
    pub rate: u64,
    /// Seconds to go at that rate.
    pub eta_secs: Option<u64>,
    /// Speed limit in bytes per second (0: none).
    pub speed: u64,
    /// Why it failed, or was paused by a failure.
    pub error: Option<String>,
    /// Retrying: why.
    pub retrying: Option<String>,
    /// Seconds since the epoch at the start.
    pub started: u64,
    /// Seconds it has run (until it ended), to the millisecond.
    pub elapsed_secs: f64,
    /// Seconds since the epoch at the end.
    pub finished: Option<u64>,
}

/// One disk of a job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobDiskInfo {
    /// Disk.
    pub disk: String,
    /// Target as given.
    pub target: String,
    /// Snapshot pushed (`DISK@NAME`).
    pub snapshot: String,
    /// Copy unit.
    pub cluster_size: u64,
    /// What the copy is doing: planning, copying, flushing, verifying, done.
    pub phase: String,
    /// Bytes to write.
    pub total_bytes: u64,
    /// Bytes acknowledged.
    pub done_bytes: u64,
    /// Clusters of data copied.
    pub copied_clusters: u64,
    /// Clusters written as zeroes.
    pub zeroed_clusters: u64,
    /// Clusters not written (zeroes on an empty target; unchanged).
    pub skipped_clusters: u64,
    /// Bytes the snapshot's store holds now.
    pub store_used_bytes: u64,
}
