//! Hooks for deterministic race tests of copy-before-write, for any device
//! and any store (feature `testing`).
//!
//! A [`HookDev`] wraps a device and a [`HookStore`] wraps a store; their
//! calls first pass through [`Trap`]s, which a test arms to hold chosen calls
//! (by offset and length) until it releases them. Pausing one side of a race
//! at a known point and asserting what the other side may or may not do
//! meanwhile reproduces interleavings that timing alone hits by luck. The
//! race suite of this crate (`tests/cbw_race.rs`) runs on them; a new
//! device or store can run the same suite by being wrapped.
//!
//! Every positive wait here has a generous deadline and panics when it
//! passes, so a broken engine fails a test instead of hanging it.

mod dev;
mod store;
mod trap;

pub use dev::HookDev;
pub use store::HookStore;
pub use trap::Trap;
