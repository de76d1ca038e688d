//! Server side of the handshake: answers a client's options from a
//! [`Catalog`] of exports.

use super::{put_option_reply as reply, take_string, truncate, OPTION_HEADER_LEN};
use crate::consts::*;
use crate::wire::{get_u16, get_u32, get_u64, put_u16, put_u32, put_u64};
use crate::{ProtocolError, ReplyMode};

/// Options longer than this are refused with `NBD_REP_ERR_TOO_BIG` as soon
/// as their header arrives, and the connection is closed: waiting for (or
/// skipping) up to 4 GiB that a client announced would let it hold the
/// connection open for as long as it trickles them in, and the stream
/// cannot be resynchronised without them.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

/// What a client can learn about one export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// Canonical name (the default export answers to `""` too).
    pub name: String,
    /// Shown by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags, without `HAS_FLAGS` (added here) and with `SEND_DF`
    /// only if the export can honour it (it is dropped for clients without
    /// structured replies).
    pub flags: u16,
    /// `NBD_INFO_BLOCK_SIZE`: minimum, preferred, maximum payload.
    pub block_sizes: (u32, u32, u32),
    /// Metadata contexts that can be selected on this export, by full name.
    pub contexts: Vec<String>,
}

/// The server's view of its exports during negotiation.
pub trait Catalog {
    /// Every export, for `NBD_OPT_LIST`.
    fn list(&self) -> Vec<ExportInfo>;
    /// One export by the name the client sent (`""` means the default export).
    fn lookup(&self, name: &str) -> Option<ExportInfo>;
    /// Whether this client may open `name`, an export that [`lookup`](Self::lookup)
    /// found: `Err(why)` is answered with `NBD_REP_ERR_POLICY` (and
    /// `NBD_OPT_EXPORT_NAME`, which cannot say no, ends the connection).
    /// Filtering [`list`](Self::list) is the catalog's own business. By
    /// default every client may open every export.
    fn permit(&self, name: &str) -> Result<(), String> {
        let _ = name;
        Ok(())
    }
}

/// The server's TLS policy (proto.md, "TLS support").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// No TLS ("NOTLS"): `NBD_OPT_STARTTLS` is refused as unsupported.
    Off,
    /// TLS at the client's choice, no export TLS-only ("SELECTIVETLS").
    Allowed,
    /// TLS first ("FORCEDTLS"): every option but `NBD_OPT_STARTTLS` and
    /// `NBD_OPT_ABORT` gets `NBD_REP_ERR_TLS_REQD` until TLS is on, and
    /// `NBD_OPT_EXPORT_NAME`, which cannot be refused, ends the connection.
    Required,
}

/// Result of a completed negotiation.
#[derive(Clone, Debug)]
pub struct Negotiated {
    /// The export chosen with `NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`.
    pub export: ExportInfo,
    /// Which reply headers the transmission phase uses.
    pub mode: ReplyMode,
    /// Selected metadata contexts as (id, name); empty unless the last
    /// `NBD_OPT_SET_META_CONTEXT` named the export finally chosen.
    pub contexts: Vec<(u32, String)>,
    /// Transmission flags as sent to the client.
    pub flags: u16,
}

/// Outcome of [`ServerHandshake::process`].
#[derive(Debug)]
pub enum Step {
    /// Send `out`, then wait for more input.
    NeedMore,
    /// Send `out`; the transmission phase starts with the next input byte.
    Ready(Box<Negotiated>),
    /// Send `out`, then close the connection (client aborted, or a refusal
    /// after which the stream cannot go on).
    Close,
    /// Send `out` (the acknowledgement of `NBD_OPT_STARTTLS`) in plaintext,
    /// then run a TLS handshake on the same stream: every byte after the
    /// consumed input is TLS, and further input fed here must be the
    /// plaintext from inside the TLS session. Negotiation starts over (what
    /// was agreed before TLS is forgotten, as an attacker may have chosen it).
    StartTls,
}

#[derive(Debug)]
enum State {
    ClientFlags,
    Options,
    Finished,
}

/// Server side of the handshake. Create it with [`ServerHandshake::new`],
/// send the greeting it writes, then feed it input with [`process`](Self::process).
#[derive(Debug)]
pub struct ServerHandshake {
    state: State,
    fixed: bool,
    no_zeroes: bool,
    structured: bool,
    extended: bool,
    /// Export name and contexts of the last `NBD_OPT_SET_META_CONTEXT`.
    meta: Option<(String, Vec<(u32, String)>)>,
    tls: TlsMode,
    /// `NBD_OPT_STARTTLS` was acknowledged: input now comes from inside TLS.
    tls_on: bool,
}

impl ServerHandshake {
    /// Starts a handshake without TLS and appends the server greeting to `out`.
    pub fn new(out: &mut Vec<u8>) -> Self {
        Self::with_tls(out, TlsMode::Off)
    }

    /// Starts a handshake under a TLS policy and appends the server
    /// greeting to `out`. The greeting is the same in every mode: NBD has
    /// no handshake flag for TLS; a client learns of it from the replies
    /// to its options (`NBD_REP_ERR_TLS_REQD`, or the ACK of STARTTLS).
    pub fn with_tls(out: &mut Vec<u8>, tls: TlsMode) -> Self {
        put_u64(out, NBDMAGIC);
        put_u64(out, IHAVEOPT);
        put_u16(out, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        ServerHandshake {
            state: State::ClientFlags,
            fixed: false,
            no_zeroes: false,
            structured: false,
            extended: false,
            meta: None,
            tls,
            tls_on: false,
        }
    }

    /// True once `NBD_OPT_STARTTLS` was acknowledged.
    pub fn tls_started(&self) -> bool {
        self.tls_on
    }

    /// Consumes as much of `input` as forms complete messages, appends replies
    /// to `out`, and returns how many bytes were consumed with what to do next.
    /// Bytes after a `Ready` belong to the transmission phase.
    pub fn process(
        &mut self,
        input: &[u8],
        catalog: &dyn Catalog,
        out: &mut Vec<u8>,
    ) -> Result<(usize, Step), ProtocolError> {
        let mut used = 0;
        loop {
            let rest = &input[used..];
            match self.state {
                State::Finished => return Err(ProtocolError::HandshakeFinished),
                State::ClientFlags => {
                    if rest.len() < 4 {
                        return Ok((used, Step::NeedMore));
                    }
                    let flags = get_u32(rest);
                    used += 4;
                    if flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
                        return Err(ProtocolError::UnknownClientFlags(flags));
                    }
                    self.fixed = flags & CLIENT_FIXED_NEWSTYLE != 0;
                    self.no_zeroes = flags & CLIENT_NO_ZEROES != 0;
                    self.state = State::Options;
                }
                State::Options => {
                    if rest.len() < OPTION_HEADER_LEN {
                        return Ok((used, Step::NeedMore));
                    }
                    if get_u64(rest) != IHAVEOPT {
                        return Err(ProtocolError::BadMagic);
                    }
                    let option = get_u32(&rest[8..]);
                    let len = get_u32(&rest[12..]);
                    if len > MAX_OPTION_LEN {
                        used += OPTION_HEADER_LEN;
                        let msg =
                            format!("option of {len} bytes is longer than the limit of {MAX_OPTION_LEN}");
                        reply_error(out, option, REP_ERR_TOO_BIG, &msg);
                        self.state = State::Finished;
                        return Ok((used, Step::Close));
                    }
                    let total = OPTION_HEADER_LEN + len as usize;
                    if rest.len() < total {
                        return Ok((used, Step::NeedMore));
                    }
                    let data = &rest[OPTION_HEADER_LEN..total];
                    used += total;
                    match self.option(option, data, catalog, out)? {
                        Step::NeedMore => {}
                        // The bytes after it are TLS records, not options.
                        Step::StartTls => return Ok((used, Step::StartTls)),
                        done => {
                            self.state = State::Finished;
                            return Ok((used, done));
                        }
                    }
                }
            }
        }
    }

    fn option(
        &mut self,
        option: u32,
        data: &[u8],
        catalog: &dyn Catalog,
        out: &mut Vec<u8>,
    ) -> Result<Step, ProtocolError> {
        if self.tls == TlsMode::Required && !self.tls_on && !matches!(option, OPT_STARTTLS | OPT_ABORT) {
            if option == OPT_EXPORT_NAME {
                // It has no error reply: the spec says to end the session.
                return Err(ProtocolError::TlsRequired);
            }
            reply_error(
                out,
                option,
                REP_ERR_TLS_REQD,
                "this server requires TLS: send NBD_OPT_STARTTLS first",
            );
            return Ok(Step::NeedMore);
        }
        match option {
            OPT_EXPORT_NAME => {
                if self.extended {
                    // The client promised not to; there is no error reply for
                    // this option, so the only answer is to hang up.
                    return Err(ProtocolError::ExportNameAfterExtendedHeaders);
                }
                let name = std::str::from_utf8(data).map_err(|_| ProtocolError::BadString)?;
                let export = catalog
                    .lookup(name)
                    .ok_or_else(|| ProtocolError::UnknownExport(name.to_string()))?;
                catalog
                    .permit(&export.name)
                    .map_err(|why| ProtocolError::Denied(export.name.clone(), why))?;
                let flags = self.transmission_flags(&export);
                put_u64(out, export.size);
                put_u16(out, flags);
                if !self.no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                Ok(Step::Ready(Box::new(self.negotiated(export, flags))))
            }
            OPT_ABORT => {
                reply(out, option, REP_ACK, &[]);
                Ok(Step::Close)
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply_error(out, option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
                    return Ok(Step::NeedMore);
                }
                for e in catalog.list() {
                    let mut p = Vec::with_capacity(4 + e.name.len() + e.description.len());
                    put_u32(&mut p, e.name.len() as u32);
                    p.extend_from_slice(e.name.as_bytes());
                    p.extend_from_slice(e.description.as_bytes());
                    reply(out, option, REP_SERVER, &p);
                }
                reply(out, option, REP_ACK, &[]);
                Ok(Step::NeedMore)
            }
            OPT_INFO | OPT_GO => self.info_or_go(option, data, catalog, out),
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply_error(out, option, REP_ERR_INVALID, "option takes no data");
                } else if self.extended {
                    reply_error(
                        out,
                        option,
                        REP_ERR_EXT_HEADER_REQD,
                        "extended headers are already negotiated",
                    );
                } else {
                    self.structured = true;
                    reply(out, option, REP_ACK, &[]);
                }
                Ok(Step::NeedMore)
            }
            OPT_EXTENDED_HEADERS => {
                if !data.is_empty() {
                    reply_error(out, option, REP_ERR_INVALID, "option takes no data");
                } else {
                    self.extended = true;
                    reply(out, option, REP_ACK, &[]);
                }
                Ok(Step::NeedMore)
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_context(option, data, catalog, out);
                Ok(Step::NeedMore)
            }
            OPT_STARTTLS => {
                if self.tls == TlsMode::Off {
                    reply_error(out, option, REP_ERR_UNSUP, "TLS is not configured on this server");
                } else if self.tls_on {
                    reply_error(out, option, REP_ERR_INVALID, "TLS is already on");
                } else if !data.is_empty() {
                    reply_error(out, option, REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data");
                } else {
                    reply(out, option, REP_ACK, &[]);
                    self.tls_on = true;
                    self.structured = false;
                    self.extended = false;
                    self.meta = None;
                    return Ok(Step::StartTls);
                }
                Ok(Step::NeedMore)
            }
            _ if !self.fixed => Err(ProtocolError::UnknownOption(option)),
            _ => {
                reply_error(out, option, REP_ERR_UNSUP, "unknown option");
                Ok(Step::NeedMore)
            }
        }
    }

    fn info_or_go(
        &mut self,
        option: u32,
        data: &[u8],
        catalog: &dyn Catalog,
        out: &mut Vec<u8>,
    ) -> Result<Step, ProtocolError> {
        let Some((name, requests)) = parse_info_request(data) else {
            reply_error(out, option, REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO request");
            return Ok(Step::NeedMore);
        };
        let Some(export) = catalog.lookup(name) else {
            let msg = format!("export '{}' does not exist", truncate(name, 200));
            reply_error(out, option, REP_ERR_UNKNOWN, &msg);
            return Ok(Step::NeedMore);
        };
        if let Err(why) = catalog.permit(&export.name) {
            reply_error(out, option, REP_ERR_POLICY, truncate(&why, 1000));
            return Ok(Step::NeedMore);
        }
        let flags = self.transmission_flags(&export);
        let mut p = Vec::with_capacity(16);
        put_u16(&mut p, INFO_EXPORT);
        put_u64(&mut p, export.size);
        put_u16(&mut p, flags);
        reply(out, option, REP_INFO, &p);
        for req in requests {
            let mut p = Vec::new();
            match req {
                INFO_NAME => {
                    put_u16(&mut p, INFO_NAME);
                    p.extend_from_slice(export.name.as_bytes());
                }
                INFO_DESCRIPTION if !export.description.is_empty() => {
                    put_u16(&mut p, INFO_DESCRIPTION);
                    p.extend_from_slice(export.description.as_bytes());
                }
                _ => continue,
            }
            reply(out, option, REP_INFO, &p);
        }
        // Always sent: clients that did not ask ignore it, and qemu relies on it.
        let (min, pref, max) = export.block_sizes;
        let mut p = Vec::with_capacity(14);
        put_u16(&mut p, INFO_BLOCK_SIZE);
        put_u32(&mut p, min);
        put_u32(&mut p, pref);
        put_u32(&mut p, max);
        reply(out, option, REP_INFO, &p);
        reply(out, option, REP_ACK, &[]);
        if option == OPT_GO {
            Ok(Step::Ready(Box::new(self.negotiated(export, flags))))
        } else {
            Ok(Step::NeedMore)
        }
    }

    fn meta_context(&mut self, option: u32, data: &[u8], catalog: &dyn Catalog, out: &mut Vec<u8>) {
        let set = option == OPT_SET_META_CONTEXT;
        if set {
            // A SET replaces the selection even when it fails.
            self.meta = None;
        }
        if !self.structured && !self.extended {
            reply_error(
                out,
                option,
                REP_ERR_INVALID,
                "negotiate structured replies before metadata contexts",
            );
            return;
        }
        let Some((name, queries)) = parse_meta_request(data) else {
            reply_error(out, option, REP_ERR_INVALID, "malformed metadata context request");
            return;
        };
        let Some(export) = catalog.lookup(name) else {
            let msg = format!("export '{}' does not exist", truncate(name, 200));
            reply_error(out, option, REP_ERR_UNKNOWN, &msg);
            return;
        };
        if let Err(why) = catalog.permit(&export.name) {
            reply_error(out, option, REP_ERR_POLICY, truncate(&why, 1000));
            return;
        }
        let mut chosen: Vec<String> = Vec::new();
        if queries.is_empty() {
            if !set {
                chosen = export.contexts.clone();
            }
        } else {
            for q in &queries {
                if !q.contains(':') {
                    reply_error(out, option, REP_ERR_INVALID, "query lacks a namespace");
                    return;
                }
                for c in &export.contexts {
                    if context_matches(q, c, !set) && !chosen.contains(c) {
                        chosen.push(c.clone());
                    }
                }
            }
        }
        let mut selected = Vec::new();
        for (i, c) in chosen.into_iter().enumerate() {
            // Ids start at 1 so that 0 (what LIST must send) never names a context.
            let id = if set { i as u32 + 1 } else { 0 };
            let mut p = Vec::with_capacity(4 + c.len());
            put_u32(&mut p, id);
            p.extend_from_slice(c.as_bytes());
            reply(out, option, REP_META_CONTEXT, &p);
            selected.push((id, c));
        }
        reply(out, option, REP_ACK, &[]);
        if set {
            self.meta = Some((export.name, selected));
        }
    }

    fn transmission_flags(&self, export: &ExportInfo) -> u16 {
        let mut flags = export.flags | TF_HAS_FLAGS;
        if !self.structured && !self.extended {
            flags &= !TF_SEND_DF;
        }
        flags
    }

    fn negotiated(&mut self, export: ExportInfo, flags: u16) -> Negotiated {
        let mode = if self.extended {
            ReplyMode::Extended
        } else if self.structured {
            ReplyMode::Structured
        } else {
            ReplyMode::Simple
        };
        let contexts = match self.meta.take() {
            Some((name, ctx)) if name == export.name => ctx,
            _ => Vec::new(),
        };
        Negotiated {
            export,
            mode,
            contexts,
            flags,
        }
    }
}

/// In LIST, a query ending in `:` (like `base:` or `qemu:dirty-bitmap:`) is a
/// wildcard over everything below it; SET selects exact names only.
fn context_matches(query: &str, context: &str, list: bool) -> bool {
    query == context || (list && query.ends_with(':') && context.starts_with(query))
}

fn parse_info_request(data: &[u8]) -> Option<(&str, Vec<u16>)> {
    let (name, rest) = take_string(data)?;
    if rest.len() < 2 {
        return None;
    }
    let n = get_u16(rest) as usize;
    let rest = &rest[2..];
    if rest.len() != n * 2 {
        return None;
    }
    Some((name, rest.chunks_exact(2).map(get_u16).collect()))
}

fn parse_meta_request(data: &[u8]) -> Option<(&str, Vec<&str>)> {
    let (name, mut rest) = take_string(data)?;
    if rest.len() < 4 {
        return None;
    }
    let n = get_u32(rest) as usize;
    rest = &rest[4..];
    let mut queries = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        let (q, r) = take_string(rest)?;
        queries.push(q);
        rest = r;
    }
    rest.is_empty().then_some((name, queries))
}

fn reply_error(out: &mut Vec<u8>, option: u32, kind: u32, message: &str) {
    reply(out, option, kind, message.as_bytes());
}
