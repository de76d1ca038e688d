//! `fleece serve`: glue that opens disks, starts listeners and the control
//! API, and shuts everything down cleanly on SIGINT/SIGTERM.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::api::{self, Daemon};
use crate::config::{self, DiskConfig, FileConfig};
use crate::error::{Error, Kind, Result};
use crate::events::Events;
use crate::nbd::{ListenAddr, Listener, Pool};
use crate::registry::Registry;
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
}

/// Runs the daemon until a signal arrives.
pub fn serve(opts: ServeOptions) -> Result<()> {
    let file = match &opts.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let state_dir = opts
        .state_dir
        .or(file.state_dir)
        .unwrap_or_else(|| PathBuf::from("fleece-state"));
    std::fs::create_dir_all(&state_dir)
        .map_err(|e| Error::invalid(format!("cannot create state dir {}: {e}", state_dir.display())))?;
    let state_dir = state_dir.canonicalize().unwrap_or(state_dir);
    let control = opts
        .control
        .or(file.control)
        .unwrap_or_else(|| state_dir.join("control.sock"));
    let mut nbd = opts.nbd;
    if nbd.is_empty() {
        nbd = file.nbd;
    }
    let mut listen = config::parse_listen(&nbd)?;
    if listen.is_empty() {
        listen.push(ListenAddr::Unix(state_dir.join("nbd.sock")));
    }
    let mut disks: Vec<DiskConfig> = opts
        .disks
        .iter()
        .map(|s| config::parse_disk_arg(s))
        .collect::<Result<_>>()?;
    if disks.is_empty() {
        disks = file.disk;
    }
    remove_stale_stores(&state_dir.join("snapshots"));
    let events = Events::default();
    let registry = Arc::new(Registry::new(state_dir.clone(), events.clone()));
    if disks.is_empty() {
        let path = state_dir.join("demo.raw");
        if !path.exists() {
            fleece_block::RawFile::create(&path, DEMO_SIZE)?;
        }
        disks.push(DiskConfig {
            name: "demo".into(),
            path,
        });
    }
    for d in &disks {
        registry
            .add_disk(&d.name, &d.path)
            .map_err(|e| Error::new(e.kind, format!("disk '{}': {}", d.name, e.message)))?;
    }

    let threads = opts.io_threads.or(file.io_threads).unwrap_or(16);
    let pool = Pool::new(threads);
    let mut listeners = Vec::new();
    for addr in &listen {
        listeners.push(Listener::start(addr, registry.clone(), pool.clone())?);
    }
    let listen: Vec<ListenAddr> = listeners.iter().map(|l| l.addr.clone()).collect();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::new(Kind::Internal, format!("cannot start runtime: {e}")))?;
    let daemon = Arc::new(Daemon {
        registry: registry.clone(),
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

    for l in &mut listeners {
        l.stop();
    }
    registry.close_all_connections();
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while registry.connection_count() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    pool.stop();
    registry.flush_all();
    let _ = std::fs::remove_file(&control);
    tracing::info!("stopped");
    Ok(())
}

/// Snapshots do not survive a restart; stores a killed daemon left behind
/// would only hold disk space.
fn remove_stale_stores(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".store") || name.ends_with(".spill") {
            match std::fs::remove_file(e.path()) {
                Ok(()) => {
                    tracing::info!(file = %e.path().display(), "removed the store of a snapshot lost in a restart")
                }
                Err(err) => {
                    tracing::warn!(file = %e.path().display(), error = %err, "cannot remove stale store")
                }
            }
        }
    }
}

fn bind_control(path: &Path) -> Result<tokio::net::UnixListener> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(Error::new(
            Kind::Busy,
            format!("another daemon is already listening on {}", path.display()),
        ));
    }
    let _ = std::fs::remove_file(path);
    tokio::net::UnixListener::bind(path)
        .map_err(|e| Error::invalid(format!("cannot listen on control socket {}: {e}", path.display())))
}

fn banner(d: &Daemon) {
    let disks = d.registry.disks();
    println!(
        "fleece {} is serving {} disk{}:",
        env!("CARGO_PKG_VERSION"),
        disks.len(),
        if disks.len() == 1 { "" } else { "s" }
    );
    for disk in &disks {
        let size = fleece_block::BlockDev::size(&*disk.file);
        println!("  {:<12} {:>9}  {}", disk.name, human(size), d.uri(&disk.name));
        for l in d.listen.iter().skip(1) {
            println!("  {:<12} {:>9}  {}", "", "", l.uri(&disk.name));
        }
    }
    println!("control socket: {}", d.control.display());
    if let Some(first) = disks.first() {
        let uri = d.uri(&first.name);
        println!("try:");
        println!("  qemu-io -f raw -c 'write -P 0xab 0 64k' -c 'read -P 0xab 0 64k' '{uri}'");
        println!("  nbdinfo --map '{uri}'");
        println!("  fleece status --control {}", d.control.display());
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
}
