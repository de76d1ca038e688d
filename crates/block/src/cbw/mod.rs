//! Copy-before-write and snapshot views.
//!
//! A [`LiveDisk`] sits in front of the image its users write. Each attached
//! [`Snapshot`] keeps, per cluster, where the contents as of its instant
//! live: still on the live disk (not yet copied), in flight to the store, in
//! the store, or no longer needed. The ordering rules (ARCHITECTURE.md,
//! "Copy-before-write"), which follow seed 003:
//!
//! 1. View reads never block: an untouched or in-flight cluster is read from
//!    the live disk, a saved one from the store.
//! 2. Store writes never wait for view reads.
//! 3. A live write to a cluster waits only while a view read of that cluster
//!    *from the live disk* is in flight, and (once) for its copy.
//!
//! Rule 3 is enforced with one "live readers" bit in each cluster's state
//! byte, set while a view read of the cluster from the live disk is in
//! flight. A cluster whose state is saved-or-not-needed with that bit clear
//! can be overwritten with no lock at all: no new live read of it can start,
//! because readers only go to the live disk for clusters not yet saved.
//!
//! The modules, in reading order (each uses only those before it):
//!
//! - `state`: the per-cluster state bytes and the `READERS` bit.
//! - `wait`: the condition variables live writes wait on.
//! - `pool`: the copier threads that run copies with a timeout.
//! - `events`: what a snapshot reports ([`SnapshotEvent`]) and its
//!   subscribers.
//! - `snapshot`: the [`Snapshot`] type, its options and counters.
//! - `pin`: the guard that pins clusters a view reads from the live disk.
//! - `copy`: what a live write does first: copies, store accounting and
//!   limit, timeouts, the failure policy.
//! - `view`: view reads, discards and [`SnapshotView`].
//! - `status`: block status of a view.
//! - `live`: [`LiveDisk`].

mod copy;
mod events;
mod live;
mod pin;
mod pool;
mod snapshot;
mod state;
mod status;
mod view;
mod wait;

pub use events::{SnapshotEvent, Subscription};
pub use live::LiveDisk;
pub use snapshot::{ClusterState, OnCbwError, Snapshot, SnapshotOptions, SnapshotStats};
pub use view::SnapshotView;
