//! What the services need to know of the clients connected to exports,
//! without knowing the protocol they speak (the NBD server implements it).

/// The clients of exports, by export name.
pub trait Clients: Send + Sync {
    /// Connections to these exports whose clients have not hung up. A
    /// client that closed its socket (its process may have exited) is on its
    /// way out and does not count: [`close_and_wait`](Self::close_and_wait)
    /// waits for it.
    fn active(&self, exports: &[String]) -> usize;

    /// Active connections to any export.
    fn active_total(&self) -> usize;

    /// Closes the connections to these exports after their in-flight
    /// requests and waits until they are gone (bounded). False if some were
    /// still there when it gave up.
    fn close_and_wait(&self, exports: &[String]) -> bool;
}
