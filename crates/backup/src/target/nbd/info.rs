//! What a caller asks for when connecting, and what it got.

use std::time::Duration;

use fleece_nbd::consts::*;
use fleece_nbd::{BlockSizes, ClientNegotiated, ReplyMode};

/// How to connect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectOptions {
    /// Connections to open when the server allows several
    /// (`CAN_MULTI_CONN`); one otherwise.
    pub connections: usize,
    /// Requests in flight per connection.
    pub window: usize,
    /// Try extended headers (64-bit lengths) before structured replies.
    pub extended_headers: bool,
    /// Try structured replies (sparse reads, error messages, block status).
    pub structured_replies: bool,
    /// Ask for `base:allocation`, so [`NbdTarget::block_status`](super::NbdTarget::block_status) works.
    pub block_status: bool,
    /// Limit for connecting and for each handshake; `None` waits forever.
    pub handshake_timeout: Option<Duration>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            connections: 4,
            window: 16,
            extended_headers: true,
            structured_replies: true,
            block_status: true,
            handshake_timeout: Some(Duration::from_secs(30)),
        }
    }
}

/// What was negotiated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetInfo {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags (`TF_*` in `fleece_nbd::consts`).
    pub flags: u16,
    /// The server's size constraints, or the spec's defaults if it sent none.
    pub block_sizes: BlockSizes,
    /// The headers in use.
    pub mode: ReplyMode,
    /// Connections open.
    pub connections: usize,
    /// `base:allocation` was selected: block status works.
    pub block_status: bool,
    /// The server knew no `NBD_OPT_GO` and the export was chosen the old way.
    pub used_export_name: bool,
}

impl TargetInfo {
    pub(crate) fn new(neg: &ClientNegotiated, connections: usize) -> TargetInfo {
        TargetInfo {
            size: neg.size,
            flags: neg.flags,
            block_sizes: neg.block_sizes_or_default(),
            mode: neg.mode,
            connections,
            block_status: neg.context_id(BASE_ALLOCATION).is_some(),
            used_export_name: neg.used_export_name,
        }
    }

    fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
    /// The export takes no writes.
    pub fn read_only(&self) -> bool {
        self.has(TF_READ_ONLY)
    }
    /// `NBD_CMD_TRIM` is offered.
    pub fn can_trim(&self) -> bool {
        self.has(TF_SEND_TRIM)
    }
    /// `NBD_CMD_WRITE_ZEROES` is offered (else zeroes are written as data).
    pub fn can_write_zeroes(&self) -> bool {
        self.has(TF_SEND_WRITE_ZEROES)
    }
    /// `NBD_CMD_FLAG_FAST_ZERO` is offered.
    pub fn can_fast_zero(&self) -> bool {
        self.has(TF_SEND_WRITE_ZEROES) && self.has(TF_SEND_FAST_ZERO)
    }
    /// `NBD_CMD_FLUSH` is offered.
    pub fn can_flush(&self) -> bool {
        self.has(TF_SEND_FLUSH)
    }
    /// Several connections see one another's writes, and a flush on one
    /// covers all.
    pub fn can_multi_conn(&self) -> bool {
        self.has(TF_CAN_MULTI_CONN)
    }
}
