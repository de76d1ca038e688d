//! Transactions: several bitmap and snapshot actions checked and prepared
//! first, then applied at one instant (every disk involved frozen), all or
//! none. Every change to bitmaps and every snapshot creation goes through
//! here; single commands are one-action transactions.

use std::sync::Arc;

use fleece_block::NamedBitmap;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::bitmaps::{granularity, new_bitmap, DEFAULT_GRANULARITY};
use crate::error::{Error, Kind, Result};
use crate::events::Events;
use crate::registry::{check_name, is_hidden, Disk, Registry, SnapshotEntry};
use crate::snapshots::{CreateSnapshot, PreparedSnapshot, Snapshots};
use crate::units::Size;

/// One operation of a transaction, as sent in JSON with an `action` field
/// (`{"action": "bitmap-add", "disk": ..., ...}`); re-exported as
/// `api::types::Action` for the CLI and the control API.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(
    tag = "action",
    rename_all = "kebab-case",
    expecting = "an action object {\"action\": \"bitmap-add\", ...}"
)]
pub enum Action {
    /// Create a bitmap.
    BitmapAdd(BitmapAdd),
    /// Delete a bitmap (and its file).
    BitmapRemove(BitmapRef),
    /// Clear every bit.
    BitmapClear(BitmapRef),
    /// Start recording.
    BitmapEnable(BitmapRef),
    /// Stop recording.
    BitmapDisable(BitmapRef),
    /// target |= sources.
    BitmapMerge(BitmapMerge),
    /// Take a snapshot.
    SnapshotCreate(Box<CreateSnapshot>),
}

/// Arguments of `bitmap-add`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BitmapAdd {
    /// Disk.
    pub disk: String,
    /// Bitmap name.
    pub name: String,
    /// Bytes per bit (power of two, at least 512).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub granularity: Option<Size>,
    /// Create it not recording.
    #[serde(default)]
    pub disabled: bool,
    /// Keep it in a sidecar file (default true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub persistent: Option<bool>,
}

/// A bitmap by disk and name.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BitmapRef {
    /// Disk.
    pub disk: String,
    /// Bitmap name.
    pub name: String,
}

/// Arguments of `bitmap-merge`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BitmapMerge {
    /// Disk.
    pub disk: String,
    /// Bitmap that receives the bits.
    pub target: String,
    /// Bitmaps whose bits are added.
    pub sources: Vec<String>,
}

impl Action {
    /// What the action is about, for error messages.
    fn describe(&self) -> String {
        match self {
            Action::BitmapAdd(a) => format!("bitmap-add {} on {}", a.name, a.disk),
            Action::BitmapRemove(r) => format!("bitmap-remove {} on {}", r.name, r.disk),
            Action::BitmapClear(r) => format!("bitmap-clear {} on {}", r.name, r.disk),
            Action::BitmapEnable(r) => format!("bitmap-enable {} on {}", r.name, r.disk),
            Action::BitmapDisable(r) => format!("bitmap-disable {} on {}", r.name, r.disk),
            Action::BitmapMerge(m) => format!("bitmap-merge into {} on {}", m.target, m.disk),
            Action::SnapshotCreate(s) => format!("snapshot-create {} of {}", s.name, s.disks.join(", ")),
        }
    }

    fn disks(&self) -> Vec<String> {
        match self {
            Action::BitmapAdd(a) => vec![a.disk.clone()],
            Action::BitmapRemove(r)
            | Action::BitmapClear(r)
            | Action::BitmapEnable(r)
            | Action::BitmapDisable(r) => {
                vec![r.disk.clone()]
            }
            Action::BitmapMerge(m) => vec![m.disk.clone()],
            Action::SnapshotCreate(s) => s.disks.clone(),
        }
    }
}

/// The error if an action that reads a bitmap's bits (a snapshot's scope,
/// merge sources) would read an inexact one.
fn inexact_at_instant(rs: &[Ready]) -> Option<Error> {
    let inexact = |b: &NamedBitmap| {
        (!b.is_consistent()).then(|| {
            Error::invalid(format!(
                "dirty bitmap '{}' became inconsistent ({}): it may have missed writes; nothing was applied",
                b.name(),
                b.inconsistent_reason().unwrap_or_default()
            ))
        })
    };
    rs.iter().find_map(|r| match r {
        Ready::Snapshot(p, _) => p.req.bitmap.as_ref().and_then(|name| {
            p.disks
                .iter()
                .filter_map(|d| d.live.bitmap(name))
                .find_map(|b| inexact(&b))
        }),
        Ready::Merge(_, sources) => sources.iter().find_map(|b| inexact(b)),
        _ => None,
    })
}

/// An action checked and ready to apply at the instant.
enum Ready {
    Add(Arc<Disk>, Arc<NamedBitmap>),
    Remove(Arc<Disk>, String),
    Clear(Arc<NamedBitmap>),
    Enable(Arc<NamedBitmap>, bool),
    Merge(Arc<NamedBitmap>, Vec<Arc<NamedBitmap>>),
    Snapshot(Box<PreparedSnapshot>, Option<(Arc<Disk>, String)>),
}

/// Tracks bitmaps that earlier actions of the same transaction add or
/// remove, so later actions are checked against the state they will see.
#[derive(Default)]
struct Planned {
    added: Vec<(String, String, Arc<NamedBitmap>)>,
    removed: Vec<(String, String)>,
    /// Snapshots `(disk, name)` made by earlier actions, with the action's number.
    snapshots: Vec<(String, String, usize)>,
}

impl Planned {
    fn find(&self, d: &Disk, name: &str) -> Option<Arc<NamedBitmap>> {
        if self.removed.iter().any(|(dd, n)| dd == &d.name && n == name) {
            return None;
        }
        if let Some((_, _, b)) = self
            .added
            .iter()
            .rev()
            .find(|(dd, n, _)| dd == &d.name && n == name)
        {
            return Some(b.clone());
        }
        d.live.bitmap(name).filter(|b| !is_hidden(b.name()))
    }

    fn get(&self, d: &Disk, name: &str) -> Result<Arc<NamedBitmap>> {
        self.find(d, name).ok_or_else(|| {
            Error::not_found(format!(
                "dirty bitmap '{name}' does not exist on disk '{}'",
                d.name
            ))
        })
    }
}

/// The transaction engine.
pub struct Txn {
    registry: Arc<Registry>,
    snapshots: Arc<Snapshots>,
    events: Events,
}

impl Txn {
    /// Transactions over `registry`, taking snapshots with `snapshots`.
    pub fn new(registry: Arc<Registry>, snapshots: Arc<Snapshots>, events: Events) -> Self {
        Txn {
            registry,
            snapshots,
            events,
        }
    }

    /// Applies actions at one instant: everything is checked and prepared
    /// first (files created, stores made), then every involved disk is
    /// frozen and all changes are made together. Returns the snapshots made,
    /// per snapshot action. Errors of a transaction of several actions say
    /// which action failed (`action 2 (bitmap-clear b0 on vm1): ...`).
    pub fn apply(&self, actions: Vec<Action>) -> Result<Vec<Vec<Arc<SnapshotEntry>>>> {
        self.apply_with(actions, |_| {})
    }

    /// Like [`apply`](Self::apply), and runs `at_instant` with the
    /// snapshots made, while every disk is still frozen, if everything
    /// applied: what a backup job attaches to the instant (its successor
    /// bitmaps) cannot then miss a write or catch one too early.
    pub fn apply_with(
        &self,
        actions: Vec<Action>,
        at_instant: impl FnOnce(&[Vec<Arc<SnapshotEntry>>]),
    ) -> Result<Vec<Vec<Arc<SnapshotEntry>>>> {
        if actions.is_empty() {
            return Err(Error::invalid("a transaction needs at least one action"));
        }
        let many = actions.len() > 1;
        let named = |i: usize, e: Error| {
            if many {
                Error::new(
                    e.kind,
                    format!("action {} ({}): {}", i + 1, actions[i].describe(), e.message),
                )
            } else {
                e
            }
        };
        // Checks, preparation and the instant under one hold: what was
        // checked free (a snapshot or bitmap name) stays free until applied.
        let _change = self.registry.change();
        let mut plan = Planned::default();
        let mut ready = Vec::new();
        for (i, a) in actions.iter().enumerate() {
            match self.prepare(i, a, &mut plan) {
                Ok(r) => ready.push((i, r)),
                Err(e) => {
                    // Nothing is applied: drop the files made for new bitmaps
                    // (stores go with `ready`).
                    for (_, _, b) in &plan.added {
                        let _ = b.remove_file();
                    }
                    return Err(named(i, e));
                }
            }
        }
        let mut names: Vec<String> = actions.iter().flat_map(|a| a.disks()).collect();
        names.sort();
        names.dedup();
        let disks = names
            .iter()
            .map(|n| self.registry.disk(n))
            .collect::<Result<Vec<_>>>()?;

        // The instant. The registry lock is not held while disks freeze
        // (which waits for writes in flight): NBD clients keep connecting.
        let guards: Vec<_> = disks.iter().map(|d| d.live.freeze()).collect();
        // A bitmap checked exact above may have lost a mark since (a failed
        // sync), and writes to clean granules would then have gone
        // unrecorded until the freeze: check again, now that none can run.
        if let Some((i, e)) = ready
            .iter()
            .find_map(|(i, rs)| inexact_at_instant(rs).map(|e| (*i, e)))
        {
            drop(guards);
            for (_, _, b) in &plan.added {
                let _ = b.remove_file();
            }
            return Err(named(i, e));
        }
        let mut made = Vec::new();
        let mut failure = None;
        for (i, r) in ready
            .into_iter()
            .flat_map(|(i, rs)| rs.into_iter().map(move |r| (i, r)))
        {
            if failure.is_some() {
                // Not applied after a failure: a bitmap made for it goes.
                if let Ready::Add(_, b) = r {
                    let _ = b.remove_file();
                }
                continue;
            }
            let res = match r {
                Ready::Add(d, b) => {
                    d.live.add_bitmap(b);
                    Ok(())
                }
                Ready::Remove(d, name) => match d.live.remove_bitmap(&name) {
                    Some(b) => b
                        .remove_file()
                        .map_err(|e| Error::new(Kind::Internal, e.to_string())),
                    None => Ok(()),
                },
                Ready::Clear(b) => b.clear().map_err(|e| Error::new(Kind::Internal, e.to_string())),
                Ready::Enable(b, on) => b
                    .set_enabled(on)
                    .map_err(|e| Error::new(Kind::Internal, e.to_string())),
                Ready::Merge(t, sources) => sources
                    .iter()
                    .try_for_each(|s| t.merge(s.bits()))
                    .map_err(|e| Error::new(Kind::Internal, e.to_string())),
                Ready::Snapshot(p, rotate) => {
                    let scope = p.req.bitmap.clone();
                    let disks = p.disks.clone();
                    made.push(self.snapshots.commit(*p));
                    // Checkpoint pattern, only when asked for with rotate:
                    // the rotated bitmap starts afresh and the scoping one
                    // stops, both at this instant. A snapshot scoped to a
                    // bitmap without rotate leaves the bitmap alone (its
                    // scope is a copy).
                    let mut r = Ok(());
                    if let Some((d, name)) = rotate {
                        if let Some(b) = d.live.bitmap(&name) {
                            r = b.clear().and_then(|_| b.set_enabled(true));
                        }
                        if let Some(s) = scope {
                            for d in &disks {
                                if let Some(b) = d.live.bitmap(&s) {
                                    r = r.and_then(|_| b.set_enabled(false));
                                }
                            }
                        }
                    }
                    r.map_err(|e| Error::new(Kind::Internal, e.to_string()))
                }
            };
            if let Err(e) = res {
                failure = Some(named(i, e));
            }
        }
        if failure.is_none() {
            at_instant(&made);
        }
        drop(guards);
        for e in made.iter().flatten() {
            self.events
                .emit("snapshot_created", json!({ "snapshot": e.export.name }));
        }
        match failure {
            // Only I/O errors on bitmap files get here: every check passed.
            Some(e) => Err(Error::new(
                e.kind,
                format!(
                    "transaction partly applied (the actions before this one were, the rest were not): {}",
                    e.message
                ),
            )),
            None => Ok(made),
        }
    }

    fn prepare(&self, index: usize, a: &Action, plan: &mut Planned) -> Result<Vec<Ready>> {
        Ok(vec![match a {
            Action::BitmapAdd(a) => {
                check_name("bitmap", &a.name)?;
                let d = self.registry.disk(&a.disk)?;
                if plan.find(&d, &a.name).is_some() {
                    return Err(Error::new(
                        Kind::Exists,
                        format!("dirty bitmap '{}' already exists on disk '{}'", a.name, a.disk),
                    ));
                }
                let g = granularity(a.granularity)?;
                let b = Arc::new(new_bitmap(
                    &d,
                    &a.name,
                    g,
                    !a.disabled,
                    a.persistent.unwrap_or(true),
                )?);
                plan.added.push((d.name.clone(), a.name.clone(), b.clone()));
                Ready::Add(d, b)
            }
            Action::BitmapRemove(r) => {
                let d = self.registry.disk(&r.disk)?;
                plan.get(&d, &r.name)?;
                plan.removed.push((d.name.clone(), r.name.clone()));
                Ready::Remove(d, r.name.clone())
            }
            Action::BitmapClear(r) => Ready::Clear(plan.get(&*self.registry.disk(&r.disk)?, &r.name)?),
            Action::BitmapEnable(r) => {
                Ready::Enable(plan.get(&*self.registry.disk(&r.disk)?, &r.name)?, true)
            }
            Action::BitmapDisable(r) => {
                Ready::Enable(plan.get(&*self.registry.disk(&r.disk)?, &r.name)?, false)
            }
            Action::BitmapMerge(m) => {
                let d = self.registry.disk(&m.disk)?;
                let t = plan.get(&d, &m.target)?;
                let sources = m
                    .sources
                    .iter()
                    .map(|s| plan.get(&d, s))
                    .collect::<Result<Vec<_>>>()?;
                if sources.is_empty() {
                    return Err(Error::invalid("bitmap merge needs at least one source"));
                }
                for s in &sources {
                    if !s.is_consistent() {
                        return Err(Error::invalid(format!(
                            "cannot merge '{}': it is inconsistent ({}), so its bits may miss writes",
                            s.name(),
                            s.inconsistent_reason().unwrap_or_default()
                        )));
                    }
                    if s.bits().granularity() != t.bits().granularity() {
                        return Err(Error::invalid(format!(
                            "cannot merge '{}' (granularity {}) into '{}' (granularity {})",
                            s.name(),
                            s.bits().granularity(),
                            t.name(),
                            t.bits().granularity()
                        )));
                    }
                }
                Ready::Merge(t, sources)
            }
            Action::SnapshotCreate(req) => {
                for d in &req.disks {
                    if let Some((_, _, first)) = plan
                        .snapshots
                        .iter()
                        .find(|(pd, pn, _)| pd == d && *pn == req.name)
                    {
                        return Err(Error::new(
                            Kind::Exists,
                            format!(
                                "snapshot '{d}@{}' is created twice in this transaction (actions {} and {})",
                                req.name,
                                first + 1,
                                index + 1
                            ),
                        ));
                    }
                }
                for d in &req.disks {
                    plan.snapshots.push((d.clone(), req.name.clone(), index));
                }
                let p = self.snapshots.prepare(req)?;
                if let Some(b) = &req.bitmap {
                    for d in &p.disks {
                        plan.get(d, b)?;
                    }
                }
                let mut rotate = None;
                if let Some(r) = &req.rotate {
                    check_name("bitmap", r)?;
                    if req.disks.len() != 1 {
                        return Err(Error::invalid("--rotate works with one disk at a time"));
                    }
                    if req.bitmap.as_deref() == Some(r.as_str()) {
                        return Err(Error::invalid("--rotate must name another bitmap than --bitmap"));
                    }
                    let d = self.registry.disk(&req.disks[0])?;
                    if plan.find(&d, r).is_none() {
                        let g = req
                            .bitmap
                            .as_ref()
                            .and_then(|b| plan.find(&d, b))
                            .map(|b| b.bits().granularity())
                            .unwrap_or(DEFAULT_GRANULARITY);
                        // Made now, not recording; it starts at the instant.
                        let b = Arc::new(new_bitmap(&d, r, g, false, true)?);
                        plan.added.push((d.name.clone(), r.clone(), b.clone()));
                        return Ok(vec![
                            Ready::Add(d.clone(), b),
                            Ready::Snapshot(Box::new(p), Some((d, r.clone()))),
                        ]);
                    }
                    rotate = Some((d, r.clone()));
                }
                Ready::Snapshot(Box::new(p), rotate)
            }
        }])
    }
}
