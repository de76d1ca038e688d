//! Accept loops for Unix and TCP listeners.

use std::fmt;
use std::net::TcpListener;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use super::door::FrontDoor;
use super::{connection, Connections, Pool, Stream};
use crate::error::{Error, Result};
use crate::registry::Registry;

/// Where to listen for NBD clients.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    /// `unix:PATH`
    Unix(PathBuf),
    /// `tcp:HOST:PORT`
    Tcp(String),
}

impl std::str::FromStr for ListenAddr {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(Error::invalid(
                    "unix: needs a socket path, as in unix:/run/fleece/nbd.sock",
                ));
            }
            Ok(ListenAddr::Unix(PathBuf::from(p)))
        } else if let Some(a) = s.strip_prefix("tcp:") {
            if !a.contains(':') {
                return Err(Error::invalid(format!(
                    "tcp:{a} needs HOST:PORT, as in tcp:127.0.0.1:10809"
                )));
            }
            Ok(ListenAddr::Tcp(a.to_string()))
        } else {
            Err(Error::invalid(format!(
                "'{s}' is not a listen address: use unix:PATH or tcp:HOST:PORT"
            )))
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// Every listener of this daemon requires TLS: URIs are `nbds`. One
/// daemon per process, so a process-wide fact; set once at start.
static TLS_URIS: AtomicBool = AtomicBool::new(false);

/// Makes [`ListenAddr::uri`] give `nbds://` and `nbds+unix://` URIs.
pub fn use_tls_uris() {
    TLS_URIS.store(true, Ordering::Relaxed);
}

impl ListenAddr {
    /// NBD URI of `export` on this address (`nbds` when TLS is required).
    pub fn uri(&self, export: &str) -> String {
        let s = if TLS_URIS.load(Ordering::Relaxed) { "s" } else { "" };
        match self {
            ListenAddr::Unix(p) => format!("nbd{s}+unix:///{export}?socket={}", p.display()),
            ListenAddr::Tcp(a) => format!("nbd{s}://{a}/{export}"),
        }
    }

    /// True for a TCP address that only this machine can reach (every
    /// address the host resolves to is loopback), and for Unix sockets.
    pub fn is_local(&self) -> bool {
        use std::net::ToSocketAddrs;
        match self {
            ListenAddr::Unix(_) => true,
            ListenAddr::Tcp(a) => a
                .to_socket_addrs()
                .map(|mut it| it.all(|s| s.ip().is_loopback()))
                .unwrap_or(false),
        }
    }
}

/// Refuses plaintext NBD on a TCP address others can reach: anyone there
/// could read and write every disk. `tls_required` is true when every
/// client must start TLS.
pub fn check_exposure(listen: &[ListenAddr], tls_required: bool, insecure_tcp: bool) -> Result<()> {
    if tls_required || insecure_tcp {
        return Ok(());
    }
    match listen.iter().find(|l| !l.is_local()) {
        Some(l) => Err(Error::invalid(format!(
            "{l} is not a loopback address: without TLS anyone who can reach it can read and write every \
             disk; use --tls-cert FILE --tls-key FILE (with --tls require), or --insecure-tcp to allow it anyway"
        ))),
        None => Ok(()),
    }
}

enum Sock {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// A bound listener with its accept thread.
pub struct Listener {
    /// What it listens on (with the real port for `tcp:HOST:0`).
    pub addr: ListenAddr,
    stop_w: RawFd,
    thread: Option<thread::JoinHandle<()>>,
}

impl Listener {
    /// Binds `addr` and starts accepting clients.
    pub fn start(
        addr: &ListenAddr,
        registry: Arc<Registry>,
        conns: Arc<Connections>,
        pool: Arc<Pool>,
        door: Arc<FrontDoor>,
    ) -> Result<Listener> {
        let (sock, addr) = match addr {
            ListenAddr::Unix(p) => {
                // A stale socket file from a killed daemon would make bind fail.
                if std::os::unix::net::UnixStream::connect(p).is_err() {
                    let _ = std::fs::remove_file(p);
                }
                let l = UnixListener::bind(p)
                    .map_err(|e| Error::invalid(format!("cannot listen on {}: {e}", p.display())))?;
                (Sock::Unix(l), addr.clone())
            }
            ListenAddr::Tcp(a) => {
                let l = TcpListener::bind(a)
                    .map_err(|e| Error::invalid(format!("cannot listen on tcp:{a}: {e}")))?;
                let real = l
                    .local_addr()
                    .map(|s| s.to_string())
                    .unwrap_or_else(|_| a.clone());
                (Sock::Tcp(l), ListenAddr::Tcp(real))
            }
        };
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two descriptors into the array we pass.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(Error::new(crate::error::Kind::Internal, "cannot create a pipe"));
        }
        let (stop_r, stop_w) = (fds[0], fds[1]);
        let name = addr.to_string();
        let thread = thread::Builder::new()
            .name("accept".into())
            .spawn(move || accept_loop(sock, stop_r, registry, conns, pool, door, name))
            .map_err(|e| Error::new(crate::error::Kind::Internal, format!("cannot start thread: {e}")))?;
        Ok(Listener {
            addr,
            stop_w,
            thread: Some(thread),
        })
    }

    /// Stops accepting (open connections are not touched) and removes a
    /// Unix socket file.
    pub fn stop(&mut self) {
        // SAFETY: writing one byte from a local to a pipe we own.
        unsafe {
            libc::write(self.stop_w, [1u8].as_ptr().cast(), 1);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // SAFETY: closing our own descriptor once.
        unsafe {
            libc::close(self.stop_w);
        }
        if let ListenAddr::Unix(p) = &self.addr {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Room for several large read replies in the socket, so a reader thread
/// rarely blocks half way through one (the default is about 200 KiB, less
/// than one 256 KiB nbdcopy read). Capped by net.core.wmem_max.
fn set_send_buffer(s: &Stream) {
    let fd = s.as_raw_fd();
    let size: libc::c_int = SEND_BUFFER;
    // SAFETY: setsockopt reads one c_int from a local that outlives the call.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

const SEND_BUFFER: libc::c_int = 2 << 20;

fn accept_loop(
    sock: Sock,
    stop_r: RawFd,
    registry: Arc<Registry>,
    conns: Arc<Connections>,
    pool: Arc<Pool>,
    door: Arc<FrontDoor>,
    name: String,
) {
    let lfd = match &sock {
        Sock::Unix(l) => l.as_raw_fd(),
        Sock::Tcp(l) => l.as_raw_fd(),
    };
    loop {
        let mut fds = [
            libc::pollfd {
                fd: lfd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop_r,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: the array outlives the call and its length is passed.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            continue;
        }
        if fds[1].revents != 0 {
            break;
        }
        let stream = match &sock {
            Sock::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
            Sock::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }),
        };
        match stream {
            Ok(s) => {
                // Beyond the cap, closed before it costs a thread.
                let Some(ticket) = door.enter(&name) else {
                    drop(s);
                    continue;
                };
                set_send_buffer(&s);
                let (reg, conns, pool, door) = (registry.clone(), conns.clone(), pool.clone(), door.clone());
                let spawned = thread::Builder::new()
                    .name("nbd-conn".into())
                    .spawn(move || connection::serve(s, ticket, door, reg, conns, pool));
                if let Err(e) = spawned {
                    tracing::error!(error = %e, "cannot start a connection thread");
                }
            }
            Err(e) => {
                tracing::warn!(listener = %name, error = %e, "accept failed");
                // Out of descriptors and similar: do not spin.
                thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }
    // SAFETY: closing our own descriptor once.
    unsafe {
        libc::close(stop_r);
    }
}
