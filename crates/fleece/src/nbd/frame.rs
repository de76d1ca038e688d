//! Framing of the transmission phase: requests out of a non-blocking
//! socket, with their payloads, into buffers that suit the kernel's copies.
//!
//! The kernel copies socket and file data with `rep movsb`, which on some
//! CPUs is several times slower when the destination sits a few bytes past
//! the source's page offset (see [`AlignedBuf`]). So the input buffer is
//! page-aligned and, whenever it runs empty, the next read starts one
//! header short of a page boundary: a write's payload then lands on the
//! boundary, and goes to the page cache from there without another copy.
//! Payloads of [`DIRECT_INPUT`] bytes or more are read straight into a
//! buffer of their own.

use std::io::{self, Read};
use std::sync::Mutex;

use fleece_block::AlignedBuf;
use fleece_nbd::{decode_request, ReplyMode, Request};

use super::exports::MAX_PAYLOAD;

/// Payloads of at least this many bytes are read into their own buffer.
pub const DIRECT_INPUT: usize = 64 << 10;
/// Size of the input buffer.
const INPUT: usize = 256 << 10;
/// Room before the first page boundary of the input buffer: a header
/// placed right before it puts its payload on the boundary.
const PORCH: usize = 4096;

/// Large buffers kept for reuse (payloads and read replies), and the most
/// bytes they may hold: a fresh buffer costs page faults on every request
/// (measured: 1 MiB writes at a third of the speed).
static SPARE: Mutex<Vec<AlignedBuf>> = Mutex::new(Vec::new());
const SPARE_BYTES: usize = 16 << 20;

/// A page-aligned buffer of at least `len` bytes, reused if one is spare.
pub fn take_buf(len: usize) -> AlignedBuf {
    let mut spare = SPARE.lock().unwrap_or_else(|p| p.into_inner());
    match spare.iter().position(|b| b.len() >= len && b.len() <= 2 * len) {
        Some(i) => spare.swap_remove(i),
        None => {
            drop(spare);
            AlignedBuf::zeroed(len.next_power_of_two())
        }
    }
}

/// Gives a buffer from [`take_buf`] back for reuse.
pub fn give_buf(b: AlignedBuf) {
    if b.is_empty() {
        return;
    }
    let mut spare = SPARE.lock().unwrap_or_else(|p| p.into_inner());
    if spare.iter().map(|s| s.len()).sum::<usize>() + b.len() <= SPARE_BYTES {
        spare.push(b);
    }
}

/// A write's data, owned (to hand it to a worker thread).
pub enum Payload {
    /// Small: a plain vector.
    Small(Vec<u8>),
    /// Large: an aligned, reused buffer and the bytes used of it.
    Large(AlignedBuf, usize),
}

impl Payload {
    /// An owned copy of `data`.
    pub fn copy_of(data: &[u8]) -> Payload {
        if data.len() < DIRECT_INPUT {
            return Payload::Small(data.to_vec());
        }
        let mut b = take_buf(data.len());
        b[..data.len()].copy_from_slice(data);
        Payload::Large(b, data.len())
    }
}

impl std::ops::Deref for Payload {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Payload::Small(v) => v,
            Payload::Large(b, len) => &b[..*len],
        }
    }
}

impl Drop for Payload {
    fn drop(&mut self) {
        if let Payload::Large(b, _) = self {
            give_buf(std::mem::replace(b, AlignedBuf::zeroed(0)));
        }
    }
}

/// What [`Input::next`] found.
pub enum Frame<'a> {
    /// A whole request; its payload still in the input buffer.
    Buffered(Request, &'a [u8]),
    /// A whole request whose large payload was read into its own buffer.
    Owned(Request, Payload),
    /// Nothing whole yet: the socket has no more for now.
    WouldBlock,
}

/// A large payload being read into its own buffer.
struct Partial {
    req: Request,
    buf: AlignedBuf,
    len: usize,
    filled: usize,
}

/// The request reader of one connection.
pub struct Input {
    buf: AlignedBuf,
    pos: usize,
    filled: usize,
    /// Request header size in this connection's mode.
    hlen: usize,
    mode: ReplyMode,
    partial: Option<Partial>,
}

impl Input {
    /// An empty reader for a connection in `mode`, starting with whatever
    /// the handshake read past its end.
    pub fn new(mode: ReplyMode, leftover: &[u8]) -> Input {
        let hlen = if mode == ReplyMode::Extended {
            fleece_nbd::consts::EXTENDED_REQUEST_LEN
        } else {
            fleece_nbd::consts::REQUEST_LEN
        };
        let mut buf = AlignedBuf::zeroed(PORCH + INPUT);
        let start = PORCH - hlen;
        let n = leftover.len().min(buf.len() - start);
        buf[start..start + n].copy_from_slice(&leftover[..n]);
        Input {
            buf,
            pos: start,
            filled: start + n,
            hlen,
            mode,
            partial: None,
        }
    }

    fn buffered(&self) -> usize {
        self.filled - self.pos
    }

    /// True if a whole request may be waiting in the buffer (no syscall
    /// needed to get it).
    pub fn has_buffered_request(&self) -> bool {
        self.partial.is_none() && self.buffered() >= self.hlen
    }

    /// The next request, reading from `sock` (non-blocking) as needed.
    /// Errors end the connection: end of input, a broken socket, or a
    /// request that breaks the protocol.
    pub fn next<R: Read>(&mut self, sock: &mut R) -> Result<Frame<'_>, String> {
        if self.partial.is_some() {
            return self.fill_partial(sock);
        }
        loop {
            if self.buffered() >= self.hlen {
                let hdr = &self.buf[self.pos..self.pos + self.hlen];
                let req = match decode_request(hdr, self.mode) {
                    Ok(Some((req, _))) => req,
                    Ok(None) => return Err("short header".into()),
                    Err(e) => return Err(e.to_string()),
                };
                if req.payload_len > MAX_PAYLOAD as u64 {
                    return Err(format!(
                        "payload of {} bytes exceeds the maximum",
                        req.payload_len
                    ));
                }
                let plen = req.payload_len as usize;
                let start = self.pos + self.hlen;
                if self.filled - start >= plen {
                    self.pos = start + plen;
                    let payload = &self.buf[start..start + plen];
                    return Ok(Frame::Buffered(req, payload));
                }
                if plen >= DIRECT_INPUT {
                    let mut buf = take_buf(plen);
                    let have = self.filled - start;
                    buf[..have].copy_from_slice(&self.buf[start..self.filled]);
                    self.reset();
                    self.partial = Some(Partial {
                        req,
                        buf,
                        len: plen,
                        filled: have,
                    });
                    return self.fill_partial(sock);
                }
                // A small payload not all here yet: make room for it.
                if self.buf.len() - self.pos < self.hlen + plen {
                    self.compact();
                }
            } else if self.pos == self.filled {
                self.reset();
            } else if self.buf.len() - self.filled < self.hlen {
                self.compact();
            }
            match read_some(sock, &mut self.buf[self.filled..])? {
                Some(n) => self.filled += n,
                None => return Ok(Frame::WouldBlock),
            }
        }
    }

    fn fill_partial<R: Read>(&mut self, sock: &mut R) -> Result<Frame<'_>, String> {
        let Some(p) = self.partial.as_mut() else {
            return Ok(Frame::WouldBlock);
        };
        while p.filled < p.len {
            match read_some(sock, &mut p.buf[p.filled..p.len])? {
                Some(n) => p.filled += n,
                None => return Ok(Frame::WouldBlock),
            }
        }
        let Some(p) = self.partial.take() else {
            return Ok(Frame::WouldBlock);
        };
        Ok(Frame::Owned(p.req, Payload::Large(p.buf, p.len)))
    }

    /// Empty: the next read puts a header right before a page boundary.
    fn reset(&mut self) {
        self.pos = PORCH - self.hlen;
        self.filled = self.pos;
    }

    /// Moves what is buffered back to where a header ends on a page
    /// boundary, making room behind it.
    fn compact(&mut self) {
        let n = self.buffered();
        let to = PORCH - self.hlen;
        self.buf.copy_within(self.pos..self.filled, to);
        self.pos = to;
        self.filled = to + n;
    }
}

/// One read: `Some(n)` bytes, `None` for "nothing now", an error at the end
/// of input or on a broken socket.
fn read_some<R: Read>(sock: &mut R, dst: &mut [u8]) -> Result<Option<usize>, String> {
    loop {
        match sock.read(dst) {
            Ok(0) => return Err("read: end of input".into()),
            Ok(n) => return Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleece_nbd::consts::REQUEST_LEN;

    /// Hands out the stream in chunks of the given sizes (cycled), with a
    /// "would block" between chunks.
    struct Chunked {
        data: Vec<u8>,
        at: usize,
        sizes: Vec<usize>,
        turn: usize,
        blocked: bool,
    }

    impl Read for Chunked {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.at == self.data.len() {
                return Ok(0);
            }
            self.blocked = !self.blocked;
            if self.blocked {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = self.sizes[self.turn % self.sizes.len()]
                .min(self.data.len() - self.at)
                .min(buf.len());
            self.turn += 1;
            buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    fn header(cookie: u64, payload: u32) -> Vec<u8> {
        let mut v = fleece_nbd::consts::REQUEST_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&0u16.to_be_bytes());
        v.extend_from_slice(&fleece_nbd::consts::CMD_WRITE.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&0u64.to_be_bytes());
        v.extend_from_slice(&payload.to_be_bytes());
        v
    }

    #[test]
    fn requests_and_payloads_come_out_whole_however_the_stream_is_cut() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let lens = [
            0usize,
            1,
            511,
            4096,
            DIRECT_INPUT - 1,
            DIRECT_INPUT,
            300 << 10,
            1 << 20,
        ];
        let records: Vec<(u64, Vec<u8>)> = (0..100)
            .map(|i| {
                let len = lens[rand() as usize % lens.len()];
                (i, (0..len).map(|_| rand() as u8).collect())
            })
            .collect();
        let stream: Vec<u8> = records
            .iter()
            .flat_map(|(c, p)| header(*c, p.len() as u32).into_iter().chain(p.iter().copied()))
            .collect();
        for sizes in [
            vec![1],
            vec![3, 7000, 5],
            vec![REQUEST_LEN],
            vec![REQUEST_LEN + 4096],
            vec![1 << 30],
        ] {
            let mut sock = Chunked {
                data: stream.clone(),
                at: 0,
                sizes: sizes.clone(),
                turn: 0,
                blocked: false,
            };
            let mut input = Input::new(ReplyMode::Simple, &[]);
            for (i, (cookie, p)) in records.iter().enumerate() {
                let (req, payload) = loop {
                    match input.next(&mut sock).unwrap() {
                        Frame::WouldBlock => continue,
                        Frame::Buffered(r, data) => break (r, data.to_vec()),
                        Frame::Owned(r, data) => break (r, data.to_vec()),
                    }
                };
                assert_eq!(req.cookie, *cookie, "request {i}, chunks {sizes:?}");
                assert!(payload == *p, "payload {i} ({} bytes), chunks {sizes:?}", p.len());
            }
            let end = loop {
                match input.next(&mut sock) {
                    Ok(Frame::WouldBlock) => continue,
                    Ok(_) => panic!("a request after the last"),
                    Err(e) => break e,
                }
            };
            assert!(end.contains("end of input"), "{end}");
        }
    }

    #[test]
    fn a_lone_small_write_payload_lands_on_a_page_boundary() {
        let mut data = header(1, 4096);
        data.extend_from_slice(&[7u8; 4096]);
        let mut sock = Chunked {
            data,
            at: 0,
            sizes: vec![1 << 20],
            turn: 0,
            blocked: true,
        };
        let mut input = Input::new(ReplyMode::Simple, &[]);
        match input.next(&mut sock).unwrap() {
            Frame::Buffered(_, p) => assert_eq!(p.as_ptr() as usize % 4096, 0),
            _ => panic!("no request"),
        }
    }
}
