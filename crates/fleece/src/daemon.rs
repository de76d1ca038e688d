//! `fleece serve`: glue that opens disks, starts listeners and the control
//! API, and shuts everything down cleanly on SIGINT/SIGTERM.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::api::{self, Daemon};
use crate::clients::Clients;
use crate::config::{self, DiskConfig, FileConfig};
use crate::disks::Disks;
use crate::error::{Error, Kind, Result};
use crate::events::Events;
use crate::jobs::Jobs;
use crate::nbd::access::{AccessList, AccessRule};
use crate::nbd::door::{self, FrontDoor};
use crate::nbd::tls::{Tls, TlsFiles};
use crate::nbd::{Connections, ListenAddr, Listener, Pool};
use crate::registry::Registry;
use crate::snapshots::Snapshots;
use crate::state::StateDir;
use crate::txn::Txn;
use crate::units::human;

/// Size of the demo disk created when nothing is configured.
const DEMO_SIZE: u64 = 1 << 30;
/// How long shutdown waits for clients to finish in-flight requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Settings of `fleece serve` after flags and config are merged.
pub struct ServeOptions {
    /// `--disk NAME=PATH` values.
    pub disks: Vec<String>,
    /// `--config FILE`.
    pub config: Option<PathBuf>,
    /// `--nbd` values.
    pub nbd: Vec<String>,
    /// `--control`.
    pub control: Option<PathBuf>,
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// `--io-threads`.
    pub io_threads: Option<usize>,
    /// `--handshake-timeout` (seconds).
    pub handshake_timeout: Option<u64>,
    /// `--max-handshakes`.
    pub max_handshakes: Option<usize>,
    /// `--tls-cert`, `--tls-key`, `--tls-ca`, `--tls`.
    pub tls: TlsFiles,
    /// `--insecure-tcp`.
    pub insecure_tcp: bool,
}

/// Runs the daemon until a signal arrives.
pub fn serve(opts: ServeOptions) -> Result<()> {
    // Everything a user gave is checked before anything is touched.
    let file = match &opts.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let threads = config::check_io_threads(opts.io_threads.or(file.io_threads).unwrap_or(16))?;
    let door = FrontDoor::new(
        door::check_handshake_timeout(
            opts.handshake_timeout
                .or(file.handshake_timeout)
                .unwrap_or(door::DEFAULT_HANDSHAKE_TIMEOUT),
        )?,
        door::check_max_handshakes(
            opts.max_handshakes
                .or(file.max_handshakes)
                .unwrap_or(door::DEFAULT_MAX_HANDSHAKES),
        )?,
    );
    let (tls, access) = security(&opts.tls, file.tls.unwrap_or_default(), file.access)?;
    let insecure_tcp = opts.insecure_tcp || file.insecure_tcp.unwrap_or(false);
    let tls_required = tls
        .as_ref()
        .is_some_and(|t| t.mode == fleece_nbd::TlsMode::Required);
    let door = Arc::new(door.with_security(tls, access));
    let flag_disks = opts
        .disks
        .iter()
        .map(|s| config::parse_disk_arg(s))
        .collect::<Result<Vec<_>>>()?;
    let mut disks = config::merge_disks(file.disk, flag_disks)?;
    for d in &disks {
        crate::registry::check_name("disk", &d.name)?;
    }
    let mut nbd = opts.nbd;
    if nbd.is_empty() {
        nbd = file.nbd;
    }
    let mut listen = config::parse_listen(&nbd)?;
    crate::nbd::check_exposure(&listen, tls_required, insecure_tcp)?;
    if tls_required {
        crate::nbd::use_tls_uris();
    }

    let state_dir = opts
        .state_dir
        .or(file.state_dir)
        .unwrap_or_else(|| PathBuf::from("fleece-state"));
    create_state_dir(&state_dir)?;
    let state_dir = state_dir.canonicalize().unwrap_or(state_dir);
    // Before anything in the directory is read or removed: a second daemon
    // must not delete the stores of a running one.
    let state = Arc::new(StateDir::lock(&state_dir)?);
    let control = opts
        .control
        .or(file.control)
        .unwrap_or_else(|| state_dir.join("control.sock"));
    if listen.is_empty() {
        listen.push(ListenAddr::Unix(state_dir.join("nbd.sock")));
    }
    state.remove_stale_stores();
    let events = Events::default();
    let registry = Arc::new(Registry::new());
    let conns = Connections::new();
    let clients: Arc<dyn Clients> = conns.clone();
    let disk_service = Arc::new(Disks::new(registry.clone(), clients.clone(), events.clone()));
    let snapshots = Arc::new(Snapshots::new(
        registry.clone(),
        clients.clone(),
        state.clone(),
        events.clone(),
    ));
    let txn = Arc::new(Txn::new(registry.clone(), snapshots.clone(), events.clone()));
    let jobs = Arc::new(Jobs::new(
        registry.clone(),
        txn.clone(),
        snapshots.clone(),
        events.clone(),
    ));
    if disks.is_empty() {
        let path = state_dir.join("demo.raw");
        if !path.exists() {
            fleece_block::RawFile::create(&path, DEMO_SIZE)?;
        }
        disks.push(DiskConfig {
            name: "demo".into(),
            path,
            format: Some("raw".into()),
        });
    }
    for d in &disks {
        disk_service
            .add(&d.name, &d.path, d.format.as_deref())
            .map_err(|e| Error::new(e.kind, format!("disk '{}': {}", d.name, e.message)))?;
    }

    let pool = Pool::new(threads)?;
    let mut listeners = Vec::new();
    for addr in &listen {
        listeners.push(Listener::start(
            addr,
            registry.clone(),
            conns.clone(),
            pool.clone(),
            door.clone(),
        )?);
    }
    let listen: Vec<ListenAddr> = listeners.iter().map(|l| l.addr.clone()).collect();
    let (watch_stop, watch_rx) = std::sync::mpsc::channel::<()>();
    let watcher = {
        let registry = registry.clone();
        std::thread::Builder::new()
            .name("image-watch".into())
            .spawn(move || watch_image_sizes(&registry, &watch_rx))
            .map_err(|e| Error::new(Kind::Internal, format!("cannot start thread: {e}")))?
    };

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::new(Kind::Internal, format!("cannot start runtime: {e}")))?;
    let daemon = Arc::new(Daemon {
        registry: registry.clone(),
        disks: disk_service.clone(),
        snapshots,
        txn,
        jobs: jobs.clone(),
        clients,
        events,
        started: Instant::now(),
        state_dir: state_dir.clone(),
        control: control.clone(),
        listen,
    });
    rt.block_on(async {
        let control_listener = bind_control(&control)?;
        banner(&daemon);
        let (stop_tx, stop_rx) = watch::channel(false);
        let api = tokio::spawn(api::run(control_listener, daemon.clone(), stop_rx));
        let mut term =
            signal(SignalKind::terminate()).map_err(|e| Error::new(Kind::Internal, e.to_string()))?;
        let mut int =
            signal(SignalKind::interrupt()).map_err(|e| Error::new(Kind::Internal, e.to_string()))?;
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        let _ = stop_tx.send(true);
        let _ = api.await;
        Ok::<(), Error>(())
    })?;
    drop(rt);

    // Running jobs end as failed-by-cancel: their bitmaps are settled as on
    // a failure, their snapshots deleted.
    jobs.shutdown(DRAIN_TIMEOUT);
    drop(watch_stop);
    let _ = watcher.join();
    for l in &mut listeners {
        l.stop();
    }
    conns.close_all();
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while conns.count() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    pool.stop();
    disk_service.flush_all();
    let _ = std::fs::remove_file(&control);
    tracing::info!("stopped");
    Ok(())
}

/// TLS (flags win over the `[tls]` table, key by key) and the access list.
fn security(
    flags: &TlsFiles,
    file: TlsFiles,
    rules: Vec<AccessRule>,
) -> Result<(Option<Tls>, Option<AccessList>)> {
    let files = TlsFiles {
        cert: flags.cert.clone().or(file.cert),
        key: flags.key.clone().or(file.key),
        ca: flags.ca.clone().or(file.ca),
        mode: flags.mode.clone().or(file.mode),
    };
    let tls = if files == TlsFiles::default() {
        None
    } else {
        Some(Tls::load(&files)?)
    };
    let access = if rules.is_empty() {
        None
    } else {
        Some(AccessList::new(rules)?)
    };
    Ok((tls, access))
}

/// How often served images are checked for a size change.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// Notices images that another program truncated, extended, deleted or
/// replaced while they are served, and says so once per change: a disk
/// keeps the file and size it was opened with (reads past a truncated end
/// fail with EIO), and `fleece disk resize` is the way to change its size.
fn watch_image_sizes(registry: &Registry, stop: &std::sync::mpsc::Receiver<()>) {
    let mut reported: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    let mut gone: std::collections::HashSet<String> = std::collections::HashSet::new();
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(WATCH_INTERVAL) {
        let disks = registry.disks();
        reported.retain(|name, _| disks.iter().any(|d| &d.name == name));
        gone.retain(|name| disks.iter().any(|d| &d.name == name));
        for d in disks {
            // Deleted or replaced (renamed over): writes go on to the file
            // fleece opened, which is no longer the one at the path.
            let now_id = std::fs::metadata(d.image.path()).map(|m| {
                use std::os::unix::fs::MetadataExt;
                (m.dev(), m.ino())
            });
            let replaced = now_id.as_ref().map_or(true, |id| *id != d.image.id());
            if replaced != gone.contains(&d.name) {
                if replaced {
                    tracing::error!(
                        disk = %d.name,
                        image = %d.image.path().display(),
                        "image file was deleted or replaced underneath: fleece keeps serving the file it opened, \
                         which is no longer at that path"
                    );
                    gone.insert(d.name.clone());
                } else {
                    gone.remove(&d.name);
                }
            }
            // A qcow2 file's length is not its disk's size (it grows as
            // clusters are allocated).
            if d.image.format() != fleece_block::Format::Raw {
                continue;
            }
            let served = d.image.size();
            let Ok(now) = d.image.file_len() else { continue };
            let last = reported.get(&d.name).copied().unwrap_or(served);
            if now == last {
                continue;
            }
            if now < served {
                tracing::error!(
                    disk = %d.name,
                    image = %d.image.path().display(),
                    file_size = now,
                    disk_size = served,
                    "image file size changed underneath: it was truncated by another program; \
                     reads past its end fail with EIO"
                );
            } else if now > served {
                tracing::warn!(
                    disk = %d.name,
                    image = %d.image.path().display(),
                    file_size = now,
                    disk_size = served,
                    "image file size changed underneath: another program extended it; the disk keeps \
                     its size (use `fleece disk resize` to change it)"
                );
            } else {
                tracing::info!(disk = %d.name, image = %d.image.path().display(), "image file size is back to the disk's size");
            }
            reported.insert(d.name.clone(), now);
        }
    }
}

/// Creates the state dir owner-only (0700): it holds the control socket,
/// snapshot stores (copies of disk data) and bitmaps. One that exists is
/// left as it is (it may be a directory the admin shares on purpose, or
/// `/tmp`), with a warning if others may enter it.
fn create_state_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    match std::fs::metadata(dir) {
        Ok(m) if m.permissions().mode() & 0o077 != 0 => tracing::warn!(
            state_dir = %dir.display(),
            mode = format!("{:o}", m.permissions().mode() & 0o777),
            "the state dir is open to other users (fleece makes it 0700); its stores hold copies of disk data"
        ),
        Ok(_) => {}
        Err(_) => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| Error::invalid(format!("cannot create state dir {}: {e}", dir.display())))?,
    }
    Ok(())
}

/// Binds the control socket owner-only (0600): whoever can connect to it
/// can add, remove and snapshot every disk.
fn bind_control(path: &Path) -> Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(Error::new(
            Kind::Busy,
            format!("another daemon is already listening on {}", path.display()),
        ));
    }
    let _ = std::fs::remove_file(path);
    // The socket file takes its mode from the umask at bind; a chmod after
    // it would leave a moment in which others could connect. Nothing else
    // creates files while this runs (the API is not up yet).
    // SAFETY: umask only swaps the process's file mode mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = tokio::net::UnixListener::bind(path);
    // SAFETY: as above, putting the previous mask back.
    unsafe { libc::umask(old) };
    let l = bound
        .map_err(|e| Error::invalid(format!("cannot listen on control socket {}: {e}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|e| {
        Error::invalid(format!(
            "cannot make control socket {} owner-only: {e}",
            path.display()
        ))
    })?;
    Ok(l)
}

/// Prints where to connect. Write errors are ignored: a daemon whose
/// stdout was closed (`fleece serve | head`) keeps serving.
fn banner(d: &Daemon) {
    use std::io::Write;
    let disks = d.registry.disks();
    let mut text = format!(
        "fleece {} is serving {} disk{}:\n",
        env!("CARGO_PKG_VERSION"),
        disks.len(),
        if disks.len() == 1 { "" } else { "s" }
    );
    for disk in &disks {
        let size = disk.image.size();
        text += &format!("  {:<12} {:>9}  {}\n", disk.name, human(size), d.uri(&disk.name));
        for l in d.listen.iter().skip(1) {
            text += &format!("  {:<12} {:>9}  {}\n", "", "", l.uri(&disk.name));
        }
    }
    text += &format!("control socket: {}\n", d.control.display());
    if let Some(first) = disks.first() {
        let uri = d.uri(&first.name);
        text += "try:\n";
        text += &format!("  qemu-io -f raw -c 'write -P 0xab 0 64k' -c 'read -P 0xab 0 64k' '{uri}'\n");
        text += &format!("  nbdinfo --map '{uri}'\n");
        text += &format!("  fleece status --control {}\n", d.control.display());
    }
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|_| out.flush());
}
