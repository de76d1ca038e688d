//! Client side of the handshake, for pushing to a remote server.
//!
//! The client sends one option at a time and decides the next one from the
//! answer, in this order: `NBD_OPT_STARTTLS` (only when asked),
//! `NBD_OPT_EXTENDED_HEADERS` (when allowed), `NBD_OPT_STRUCTURED_REPLY` (when
//! extended headers were not had), `NBD_OPT_SET_META_CONTEXT` (when contexts
//! were asked for and the replies can carry them), then `NBD_OPT_GO`, or
//! `NBD_OPT_EXPORT_NAME` for a server too old for GO. One at a time costs a
//! round trip per option, once per connection, and is what lets every
//! refusal be handled by the option it refuses.

use super::{option_name, put_option, put_string, OPTION_REPLY_HEADER_LEN};
use crate::consts::*;
use crate::wire::{get_u16, get_u32, get_u64, put_u16, put_u32};
use crate::{ProtocolError, Refusal, ReplyMode, MAX_OPTION_LEN};

/// Second word of an oldstyle greeting, where newstyle has `IHAVEOPT`.
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// `NBDMAGIC`, `IHAVEOPT`, handshake flags.
const GREETING_LEN: usize = 18;

/// What the client asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientOptions {
    /// Export to attach to (`""` is the server's default export).
    pub export: String,
    /// Try `NBD_OPT_EXTENDED_HEADERS` first (64-bit lengths, 32-byte headers).
    pub extended_headers: bool,
    /// Try `NBD_OPT_STRUCTURED_REPLY` when extended headers were not had.
    pub structured_replies: bool,
    /// Metadata contexts to select with `NBD_OPT_SET_META_CONTEXT`, such as
    /// [`BASE_ALLOCATION`]; the ones the server does not know are left out of
    /// [`ClientNegotiated::contexts`].
    pub meta_contexts: Vec<String>,
    /// Start with `NBD_OPT_STARTTLS` and stop at [`ClientStep::StartTls`] when
    /// the server agrees, so the caller can wrap the stream in TLS.
    pub starttls: bool,
}

impl ClientOptions {
    /// Everything this client can use, for `export`: extended headers, then
    /// structured replies, and `base:allocation`; no TLS.
    pub fn new(export: &str) -> Self {
        ClientOptions {
            export: export.to_string(),
            extended_headers: true,
            structured_replies: true,
            meta_contexts: vec![BASE_ALLOCATION.to_string()],
            starttls: false,
        }
    }
}

/// `NBD_INFO_BLOCK_SIZE`: the server's size constraints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSizes {
    /// Every offset and length must be a multiple of this (a power of two).
    pub minimum: u32,
    /// Requests aligned to this avoid read-modify-write on the server.
    pub preferred: u32,
    /// Largest payload of one request.
    pub maximum: u32,
}

impl BlockSizes {
    /// What the spec lets a client assume of a server that sent none.
    pub const DEFAULT: BlockSizes = BlockSizes {
        minimum: 1,
        preferred: 4096,
        maximum: 32 << 20,
    };
}

/// The result of a successful negotiation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientNegotiated {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags (`TF_*`), as sent by the server.
    pub flags: u16,
    /// Size constraints, if the server sent them.
    pub block_sizes: Option<BlockSizes>,
    /// Which headers the transmission phase uses.
    pub mode: ReplyMode,
    /// Selected metadata contexts as (id, name): the ids to expect in
    /// block-status replies.
    pub contexts: Vec<(u32, String)>,
    /// The server did not know `NBD_OPT_GO`, so the export was chosen with
    /// `NBD_OPT_EXPORT_NAME` (no block sizes then).
    pub used_export_name: bool,
}

impl ClientNegotiated {
    /// Whether the server set transmission flag `flag` (`TF_*`).
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    /// The id of context `name`, if it was selected.
    pub fn context_id(&self, name: &str) -> Option<u32> {
        self.contexts.iter().find(|(_, n)| n == name).map(|(id, _)| *id)
    }

    /// The server's constraints, or the spec's defaults if it sent none.
    pub fn block_sizes_or_default(&self) -> BlockSizes {
        self.block_sizes.unwrap_or(BlockSizes::DEFAULT)
    }
}

/// Outcome of [`ClientHandshake::process`].
#[derive(Debug)]
pub enum ClientStep {
    /// Send `out`, then wait for more input.
    NeedMore,
    /// The server agreed to `NBD_OPT_STARTTLS`: run the TLS handshake on the
    /// stream, then call [`process`](ClientHandshake::process) again with what
    /// comes out of TLS (an empty slice to start).
    StartTls,
    /// Send `out`; the transmission phase starts with the next byte.
    Ready(Box<ClientNegotiated>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Greeting,
    /// Waiting for the replies to this option.
    Awaiting(u32),
    /// STARTTLS acknowledged; the next option goes out once TLS is up.
    TlsPending,
    /// Waiting for the size and flags that answer `NBD_OPT_EXPORT_NAME`.
    ExportName,
    Finished,
}

/// Client side of the handshake. Create it with [`new`](Self::new), then
/// feed it what the server sends with [`process`](Self::process); it sends
/// nothing before the server's greeting.
#[derive(Debug)]
pub struct ClientHandshake {
    options: ClientOptions,
    state: State,
    fixed: bool,
    no_zeroes: bool,
    extended: bool,
    structured: bool,
    contexts: Vec<(u32, String)>,
    export: Option<(u64, u16)>,
    block_sizes: Option<BlockSizes>,
}

impl ClientHandshake {
    /// A handshake asking for `options`. Fails if a name is longer than the
    /// protocol allows.
    pub fn new(options: ClientOptions) -> Result<Self, ProtocolError> {
        for s in std::iter::once(&options.export).chain(&options.meta_contexts) {
            if s.len() > MAX_STRING {
                return Err(ProtocolError::StringTooLong(s.len()));
            }
        }
        Ok(ClientHandshake {
            options,
            state: State::Greeting,
            fixed: false,
            no_zeroes: false,
            extended: false,
            structured: false,
            contexts: Vec::new(),
            export: None,
            block_sizes: None,
        })
    }

    /// Consumes as much of `input` as forms complete messages, appends what
    /// to send to `out`, and returns how many bytes were consumed with what
    /// to do next. Bytes after a `Ready` or `StartTls` are not consumed.
    pub fn process(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(usize, ClientStep), ProtocolError> {
        let mut used = 0;
        loop {
            let rest = &input[used..];
            match self.state {
                State::Finished => return Err(ProtocolError::HandshakeFinished),
                State::Greeting => {
                    if rest.len() < GREETING_LEN {
                        return Ok((used, ClientStep::NeedMore));
                    }
                    used += GREETING_LEN;
                    self.greeting(rest, out)?;
                }
                State::TlsPending => self.send_next(OPT_STARTTLS, out),
                State::ExportName => {
                    let need = if self.no_zeroes { 10 } else { 10 + 124 };
                    if rest.len() < need {
                        return Ok((used, ClientStep::NeedMore));
                    }
                    used += need;
                    self.export = Some((get_u64(rest), get_u16(&rest[8..])));
                    return Ok((used, self.ready(true)));
                }
                State::Awaiting(option) => {
                    if rest.len() < OPTION_REPLY_HEADER_LEN {
                        return Ok((used, ClientStep::NeedMore));
                    }
                    if get_u64(rest) != OPT_REPLY_MAGIC {
                        return Err(ProtocolError::BadMagic);
                    }
                    let echoed = get_u32(&rest[8..]);
                    let kind = get_u32(&rest[12..]);
                    let len = get_u32(&rest[16..]);
                    if echoed != option {
                        return Err(bad(format!(
                            "a reply to option {echoed} while {} was pending",
                            option_name(option)
                        )));
                    }
                    if len > MAX_OPTION_LEN {
                        return Err(ProtocolError::ReplyTooLarge {
                            length: len as u64,
                            limit: MAX_OPTION_LEN as u64,
                        });
                    }
                    let total = OPTION_REPLY_HEADER_LEN + len as usize;
                    if rest.len() < total {
                        return Ok((used, ClientStep::NeedMore));
                    }
                    used += total;
                    let payload = &rest[OPTION_REPLY_HEADER_LEN..total];
                    match self.reply(option, kind, payload, out)? {
                        ClientStep::NeedMore => {}
                        step => return Ok((used, step)),
                    }
                }
            }
        }
    }

    /// The error to report when the server closes the connection now.
    pub fn closed(&self) -> ProtocolError {
        match self.state {
            State::ExportName => ProtocolError::ExportNameRefused(self.options.export.clone()),
            State::Greeting => ProtocolError::ServerClosed("the greeting"),
            State::Awaiting(option) => ProtocolError::ServerClosed(option_name(option)),
            State::TlsPending => ProtocolError::ServerClosed("NBD_OPT_STARTTLS"),
            State::Finished => ProtocolError::ServerClosed("the transmission phase"),
        }
    }

    fn greeting(&mut self, g: &[u8], out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        if get_u64(g) != NBDMAGIC {
            return Err(ProtocolError::BadMagic);
        }
        match get_u64(&g[8..]) {
            IHAVEOPT => {}
            OLDSTYLE_MAGIC => return Err(ProtocolError::OldstyleServer),
            _ => return Err(ProtocolError::BadMagic),
        }
        let flags = get_u16(&g[16..]);
        self.fixed = flags & FLAG_FIXED_NEWSTYLE != 0;
        self.no_zeroes = flags & FLAG_NO_ZEROES != 0;
        if self.options.starttls && !self.fixed {
            // Plain newstyle goes straight to EXPORT_NAME: in clear text.
            self.state = State::Finished;
            return Err(ProtocolError::NoTlsWithoutFixedNewstyle);
        }
        let mut client = 0;
        if self.fixed {
            client |= CLIENT_FIXED_NEWSTYLE;
        }
        if self.no_zeroes {
            client |= CLIENT_NO_ZEROES;
        }
        put_u32(out, client);
        if self.fixed {
            self.send_next(0, out);
        } else {
            // Plain newstyle knows no option but EXPORT_NAME.
            self.export_name(out);
        }
        Ok(())
    }

    /// Sends the first option after `after` (0: before all) that is wanted.
    fn send_next(&mut self, after: u32, out: &mut Vec<u8>) {
        const ORDER: [u32; 5] = [
            OPT_STARTTLS,
            OPT_EXTENDED_HEADERS,
            OPT_STRUCTURED_REPLY,
            OPT_SET_META_CONTEXT,
            OPT_GO,
        ];
        let start = ORDER.iter().position(|&o| o == after).map_or(0, |i| i + 1);
        let o = &self.options;
        let next = ORDER[start..].iter().copied().find(|&opt| match opt {
            OPT_STARTTLS => o.starttls,
            OPT_EXTENDED_HEADERS => o.extended_headers,
            OPT_STRUCTURED_REPLY => o.structured_replies && !self.extended,
            OPT_SET_META_CONTEXT => !o.meta_contexts.is_empty() && (self.extended || self.structured),
            _ => true,
        });
        let option = next.unwrap_or(OPT_GO);
        let mut data = Vec::new();
        match option {
            OPT_SET_META_CONTEXT => {
                put_string(&mut data, &o.export);
                put_u32(&mut data, o.meta_contexts.len() as u32);
                for c in &o.meta_contexts {
                    put_string(&mut data, c);
                }
            }
            OPT_GO => {
                put_string(&mut data, &o.export);
                // Asking for block sizes promises to honour them (proto.md,
                // "Size constraints"), which a server may insist on.
                put_u16(&mut data, 1);
                put_u16(&mut data, INFO_BLOCK_SIZE);
            }
            _ => {}
        }
        put_option(out, option, &data);
        self.state = State::Awaiting(option);
    }

    fn export_name(&mut self, out: &mut Vec<u8>) {
        put_option(out, OPT_EXPORT_NAME, self.options.export.as_bytes());
        self.state = State::ExportName;
    }

    fn reply(
        &mut self,
        option: u32,
        kind: u32,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<ClientStep, ProtocolError> {
        if kind & (1 << 31) != 0 {
            return self.refused(option, kind, payload, out);
        }
        match (option, kind) {
            (OPT_STARTTLS, REP_ACK) => {
                // Nothing more goes out in clear text: the next option waits
                // until the caller has TLS up and calls `process` again.
                self.state = State::TlsPending;
                return Ok(ClientStep::StartTls);
            }
            (OPT_EXTENDED_HEADERS, REP_ACK) => self.extended = true,
            (OPT_STRUCTURED_REPLY, REP_ACK) => self.structured = true,
            (OPT_SET_META_CONTEXT, REP_META_CONTEXT) => {
                if payload.len() < 4 {
                    return Err(bad("NBD_REP_META_CONTEXT shorter than its id".into()));
                }
                let name = std::str::from_utf8(&payload[4..])
                    .map_err(|_| bad("a metadata context name that is not UTF-8".into()))?;
                self.contexts.push((get_u32(payload), name.to_string()));
                return Ok(ClientStep::NeedMore);
            }
            (OPT_SET_META_CONTEXT, REP_ACK) => {}
            (OPT_GO, REP_INFO) => {
                self.info(payload)?;
                return Ok(ClientStep::NeedMore);
            }
            (OPT_GO, REP_ACK) => {
                if self.export.is_none() {
                    return Err(bad("NBD_OPT_GO succeeded without NBD_INFO_EXPORT".into()));
                }
                return Ok(self.ready(false));
            }
            _ => return Err(bad(format!("reply type {kind} to {}", option_name(option)))),
        }
        self.send_next(option, out);
        Ok(ClientStep::NeedMore)
    }

    /// An error reply: the options that only add something fall back to
    /// going without it; the others end the negotiation.
    fn refused(
        &mut self,
        option: u32,
        kind: u32,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<ClientStep, ProtocolError> {
        let optional = matches!(
            option,
            OPT_EXTENDED_HEADERS | OPT_STRUCTURED_REPLY | OPT_SET_META_CONTEXT
        );
        // A server that demands TLS or is going away says so to every
        // option; going on would only hide the reason.
        let fatal = matches!(kind, REP_ERR_TLS_REQD | REP_ERR_SHUTDOWN);
        if optional && !fatal {
            if option == OPT_SET_META_CONTEXT {
                // The spec: disregard contexts sent before an error.
                self.contexts.clear();
            }
            self.send_next(option, out);
            return Ok(ClientStep::NeedMore);
        }
        // Old servers know no GO; EXPORT_NAME is the spec's fallback, but
        // not after extended headers, which forbid it.
        if option == OPT_GO && kind == REP_ERR_UNSUP && !self.extended {
            self.block_sizes = None;
            self.export = None;
            self.export_name(out);
            return Ok(ClientStep::NeedMore);
        }
        self.state = State::Finished;
        Err(ProtocolError::Refused(Box::new(Refusal {
            option,
            reply: kind,
            export: self.options.export.clone(),
            message: String::from_utf8_lossy(payload).into_owned(),
        })))
    }

    fn info(&mut self, payload: &[u8]) -> Result<(), ProtocolError> {
        if payload.len() < 2 {
            return Err(bad("NBD_REP_INFO without a type".into()));
        }
        match get_u16(payload) {
            INFO_EXPORT => {
                if payload.len() != 12 {
                    return Err(bad(format!("NBD_INFO_EXPORT of {} bytes", payload.len())));
                }
                self.export = Some((get_u64(&payload[2..]), get_u16(&payload[10..])));
            }
            INFO_BLOCK_SIZE => {
                if payload.len() != 14 {
                    return Err(bad(format!("NBD_INFO_BLOCK_SIZE of {} bytes", payload.len())));
                }
                let sizes = BlockSizes {
                    minimum: get_u32(&payload[2..]),
                    preferred: get_u32(&payload[6..]),
                    maximum: get_u32(&payload[10..]),
                };
                // Only what this client relies on is checked: alignment to a
                // power of two, and a maximum it can meet.
                let valid = sizes.minimum.is_power_of_two()
                    && sizes.minimum <= 64 * 1024
                    && sizes.preferred >= sizes.minimum
                    && sizes.maximum >= sizes.minimum;
                if !valid {
                    return Err(bad(format!("block sizes {sizes:?}")));
                }
                self.block_sizes = Some(sizes);
            }
            // The spec: ignore information types not understood.
            _ => {}
        }
        Ok(())
    }

    fn ready(&mut self, used_export_name: bool) -> ClientStep {
        self.state = State::Finished;
        let (size, flags) = self.export.unwrap_or_default();
        let mode = if self.extended {
            ReplyMode::Extended
        } else if self.structured {
            ReplyMode::Structured
        } else {
            ReplyMode::Simple
        };
        ClientStep::Ready(Box::new(ClientNegotiated {
            size,
            flags,
            block_sizes: self.block_sizes,
            mode,
            contexts: std::mem::take(&mut self.contexts),
            used_export_name,
        }))
    }
}

fn bad(what: String) -> ProtocolError {
    ProtocolError::BadReply(what)
}
