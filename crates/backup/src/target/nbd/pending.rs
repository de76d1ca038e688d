//! Requests in flight and their outcomes.
//!
//! Each NBD request has a [`Slot`] that its connection's reader fills
//! exactly once: with the server's answer, or with
//! [`ErrorKind::Disconnected`](crate::ErrorKind::Disconnected) if the
//! connection ends first. A [`Pending`] is what a caller holds for one
//! operation, which may have been split into several requests.

use std::marker::PhantomData;
use std::sync::{Arc, Condvar, Mutex};

use fleece_nbd::Extent;

use crate::error::Result;

/// What a successful request produced. (Public only so that the sealed
/// [`Outcome`] trait can name it; this module is private.)
#[derive(Debug)]
pub enum Output {
    Done,
    Data(Vec<u8>),
    Extents(Vec<Extent>),
}

/// The outcome of one request, set once.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    outcome: Mutex<Option<Result<Output>>>,
    ready: Condvar,
}

impl Slot {
    pub(crate) fn new() -> Arc<Slot> {
        Arc::new(Slot::default())
    }

    /// An operation that needs no request at all.
    fn done(output: Output) -> Arc<Slot> {
        let s = Slot::new();
        s.set(Ok(output));
        s
    }

    /// Sets the outcome unless one is set already (the first one wins, so a
    /// late "disconnected" never overwrites an answer).
    pub(crate) fn set(&self, outcome: Result<Output>) {
        let mut o = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        if o.is_none() {
            *o = Some(outcome);
            self.ready.notify_all();
        }
    }

    pub(crate) fn is_set(&self) -> bool {
        self.outcome.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    fn wait(&self) -> Result<Output> {
        let mut o = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(outcome) = o.take() {
                return outcome;
            }
            o = self.ready.wait(o).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// An operation in flight: write, zeroes, trim, flush, read or block status.
///
/// Every `Pending` resolves, to the server's answer or to an error of kind
/// [`Disconnected`](crate::ErrorKind::Disconnected) if the connection is
/// lost first, even if the [`NbdTarget`](super::NbdTarget) is dropped
/// meanwhile. `Ok` means the server acknowledged all of it.
#[must_use = "an operation's outcome is only known by waiting for it"]
#[derive(Debug)]
pub struct Pending<T: Outcome> {
    parts: Vec<Arc<Slot>>,
    _out: PhantomData<fn() -> T>,
}

impl<T: Outcome> Pending<T> {
    pub(crate) fn new(parts: Vec<Arc<Slot>>) -> Self {
        Pending {
            parts,
            _out: PhantomData,
        }
    }

    /// An operation that needed no request (zero length).
    pub(crate) fn empty() -> Self {
        Self::new(vec![Slot::done(T::EMPTY)])
    }

    /// Whether every request of the operation has its outcome.
    pub fn is_ready(&self) -> bool {
        self.parts.iter().all(|p| p.is_set())
    }

    /// Blocks until every request of the operation is answered; returns the
    /// first error, if any.
    pub fn wait(self) -> Result<T> {
        let mut outputs = Vec::with_capacity(self.parts.len());
        let mut first_error = None;
        for p in &self.parts {
            match p.wait() {
                Ok(o) => outputs.push(o),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(T::from_outputs(outputs)),
        }
    }
}

mod sealed {
    use super::Output;
    use fleece_nbd::Extent;

    /// How the outputs of an operation's requests make its result.
    pub trait Sealed: Sized {
        const EMPTY: Output;
        fn from_outputs(outputs: Vec<Output>) -> Self;
    }

    impl Sealed for () {
        const EMPTY: Output = Output::Done;
        fn from_outputs(_: Vec<Output>) -> Self {}
    }

    impl Sealed for Vec<u8> {
        const EMPTY: Output = Output::Data(Vec::new());
        fn from_outputs(outputs: Vec<Output>) -> Self {
            let mut parts = outputs.into_iter().map(|o| match o {
                Output::Data(d) => d,
                _ => Vec::new(),
            });
            // One part is the common case: no copy.
            let first = parts.next().unwrap_or_default();
            parts.fold(first, |mut all, d| {
                all.extend_from_slice(&d);
                all
            })
        }
    }

    impl Sealed for Vec<Extent> {
        const EMPTY: Output = Output::Extents(Vec::new());
        fn from_outputs(outputs: Vec<Output>) -> Self {
            outputs
                .into_iter()
                .flat_map(|o| match o {
                    Output::Extents(e) => e,
                    _ => Vec::new(),
                })
                .collect()
        }
    }
}

/// What a [`Pending`] gives: `()` for writes, zeroes, trims and flushes,
/// `Vec<u8>` for reads, `Vec<Extent>` for block status.
pub trait Outcome: sealed::Sealed {}
impl Outcome for () {}
impl Outcome for Vec<u8> {}
impl Outcome for Vec<Extent> {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Error, ErrorKind};

    #[test]
    fn the_first_outcome_wins_and_errors_come_first() {
        let a = Slot::new();
        let b = Slot::new();
        let p: Pending<Vec<u8>> = Pending::new(vec![a.clone(), b.clone()]);
        a.set(Ok(Output::Data(vec![1, 2])));
        assert!(!p.is_ready());
        b.set(Ok(Output::Data(vec![3])));
        b.set(Err(Error::new(ErrorKind::Disconnected, "late")));
        assert!(p.is_ready());
        assert_eq!(p.wait().unwrap(), vec![1, 2, 3]);

        let a = Slot::new();
        let p: Pending<()> = Pending::new(vec![a.clone(), Slot::done(Output::Done)]);
        let t = std::thread::spawn(move || p.wait());
        a.set(Err(Error::new(ErrorKind::Disconnected, "gone")));
        assert_eq!(t.join().unwrap().unwrap_err().kind(), ErrorKind::Disconnected);
    }
}
