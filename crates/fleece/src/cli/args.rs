//! The command line as `fleece --help` shows it.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::error::ErrorKind;
use clap::{Args, CommandFactory, Parser, Subcommand};

/// Where client commands find the daemon when neither `--control` nor
/// [`CONTROL_ENV`] says: where a plain `fleece serve` puts it.
pub const DEFAULT_CONTROL: &str = "fleece-state/control.sock";
/// Environment variable naming the control socket for client commands.
pub const CONTROL_ENV: &str = "FLEECE_CONTROL";

const EXAMPLES: &str = "\
Client commands find the daemon through --control PATH, else FLEECE_CONTROL,
else fleece-state/control.sock (where a plain `fleece serve` puts it).
--control and --json go before or after the subcommand.

Examples:
  fleece serve --disk vm1=/images/vm1.raw     # no --disk: serves a 1 GiB demo disk
  fleece snapshot create vm1 --name backup1   # vm1 as of now, exported as vm1@backup1
  nbdcopy 'nbd+unix:///vm1@backup1?socket=fleece-state/nbd.sock' backup1.raw
  fleece snapshot delete vm1@backup1          # frees its store
  fleece --control /run/fleece/control.sock disk list --json";

const SERVE_DEFAULTS: &str = "\
Defaults: state dir ./fleece-state; NBD on unix:STATE_DIR/nbd.sock; control
socket STATE_DIR/control.sock (serve does not read FLEECE_CONTROL); 16 I/O
threads. With no disk from --disk or --config, it serves a sparse 1 GiB
STATE_DIR/demo.raw (created if missing, kept otherwise) as export `demo`.
Flags win over --config, except disks, which add up.
--json is refused: the daemon prints logs, not JSON.";

/// fleece: serve live disks over NBD and take point-in-time snapshots of them.
#[derive(Parser, Debug)]
#[command(name = "fleece", version, about, after_help = EXAMPLES)]
pub struct Cli {
    /// The daemon's control socket [env: FLEECE_CONTROL, client commands
    /// only] [default: fleece-state/control.sock; for serve:
    /// STATE_DIR/control.sock]
    #[arg(long, global = true, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Print the daemon's JSON instead of tables (client commands; serve
    /// refuses it).
    #[arg(long, global = true)]
    pub json: bool,
    /// Log level (error, warn, info, debug, trace) or a RUST_LOG-style filter.
    #[arg(long, global = true, env = "RUST_LOG")]
    pub log_level: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Parses the command line and settles what clap cannot: the control
    /// socket of client commands (flag, environment, default) and `--json`
    /// on `serve`. Exits on errors, as clap does (status 2).
    pub fn parse_checked() -> Cli {
        Cli::parse()
            .checked(std::env::var_os(CONTROL_ENV))
            .unwrap_or_else(|e| e.exit())
    }

    /// [`Cli::parse_checked`] after parsing, with the environment's value
    /// of [`CONTROL_ENV`]: afterwards `control` is set for client commands.
    pub fn checked(mut self, env: Option<OsString>) -> Result<Cli, clap::Error> {
        if matches!(self.command, Command::Serve(_)) {
            // The daemon's control socket comes from its own settings
            // (flag, config, state dir), never from a client's environment.
            if self.json {
                return Err(Cli::command().error(
                    ErrorKind::ArgumentConflict,
                    "--json is for client commands; `fleece serve` prints logs, not JSON",
                ));
            }
            return Ok(self);
        }
        if self.control.is_none() {
            self.control = Some(match env {
                Some(v) if v.is_empty() => {
                    return Err(Cli::command().error(
                        ErrorKind::InvalidValue,
                        format!(
                        "{CONTROL_ENV} is set but empty: set it to the daemon's control socket, or unset it"
                    ),
                    ))
                }
                Some(v) => PathBuf::from(v),
                None => PathBuf::from(DEFAULT_CONTROL),
            });
        }
        Ok(self)
    }
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon.
    #[command(after_help = SERVE_DEFAULTS)]
    Serve(ServeArgs),
    /// Show the daemon's status.
    Status,
    /// List, add or remove disks.
    Disk {
        #[command(subcommand)]
        action: DiskCommand,
    },
    /// Take, list, show or delete point-in-time snapshots.
    Snapshot {
        #[command(subcommand)]
        action: SnapshotCommand,
    },
    /// Manage dirty bitmaps (what changed since a point, for incremental backups).
    Bitmap {
        #[command(subcommand)]
        action: BitmapCommand,
    },
    /// Push backups: copy a snapshot of disks to files or NBD servers, in
    /// the daemon, full or incremental.
    Backup {
        #[command(subcommand)]
        action: BackupCommand,
    },
    /// Apply several bitmap and snapshot actions at one instant, all or none,
    /// from a JSON file (`{"actions": [...]}`, see docs/openapi.json) or `-`.
    Transaction {
        /// JSON file, or - for standard input.
        file: PathBuf,
    },
    /// Print daemon events as they happen (until interrupted).
    Events,
    /// Make images (no daemon needed).
    Image {
        #[command(subcommand)]
        action: ImageCommand,
    },
}

/// `fleece backup ...`
#[derive(Subcommand, Debug)]
pub enum BackupCommand {
    /// Snapshot DISKs at one instant and push each to its --target; the
    /// snapshot goes when the job ends. Prints the job's name.
    Start(Box<StartArgs>),
    /// List jobs (finished ones stay until dismissed or a restart).
    List,
    /// Show one job.
    Show {
        /// Job name.
        job: String,
    },
    /// Pause a job between requests.
    Pause {
        /// Job name.
        job: String,
    },
    /// Resume a paused job (also one paused by --on-target-error stop).
    Resume {
        /// Job name.
        job: String,
    },
    /// Cancel a job (its bitmaps are kept as on a failure).
    Cancel {
        /// Job name.
        job: String,
    },
    /// Change a job's speed limit (bytes/s, e.g. 50M; 0: none).
    SetSpeed {
        /// Job name.
        job: String,
        /// Bytes per second.
        rate: String,
    },
    /// Follow a job until it ends: a progress bar on a terminal, a line
    /// every 10% otherwise; exits non-zero unless it completed.
    Watch {
        /// Job name.
        job: String,
    },
    /// Forget a finished job.
    Dismiss {
        /// Job name.
        job: String,
    },
}

/// `fleece backup start` flags.
#[derive(Args, Debug)]
pub struct StartArgs {
    /// Disks to back up at one instant (or none, with --snapshot).
    pub disks: Vec<String>,
    /// Where each disk goes, in order: file:PATH (raw, created sparse if
    /// missing), qcow2:PATH (a new image; ,backing=PREV for an incremental
    /// one), nbd://HOST:PORT/EXPORT (port optional) or
    /// nbd+unix:///EXPORT?socket=PATH; over TLS nbds://... or nbds+unix://...
    /// with ?tls-certificates=DIR (ca-cert.pem, client-cert.pem, client-key.pem).
    #[arg(long = "target", value_name = "TARGET", required = true)]
    pub targets: Vec<String>,
    /// Job name [default: backup-N].
    #[arg(long)]
    pub name: Option<String>,
    /// Push this existing snapshot (DISK@NAME) instead; it stays afterwards.
    #[arg(long = "snapshot", value_name = "DISK@NAME")]
    pub snapshots: Vec<String>,
    /// full or incremental (copies what --bitmap recorded).
    #[arg(long, default_value = "full")]
    pub sync: String,
    /// Dirty bitmap: what an incremental backup copies; after the job it
    /// holds the writes since the instant (a full backup creates it).
    #[arg(long)]
    pub bitmap: Option<String>,
    /// on-success, never or always [default: on-success].
    #[arg(long, value_name = "MODE")]
    pub bitmap_mode: Option<String>,
    /// Smallest copy unit [default: 64K, or the target's cluster if larger].
    #[arg(long, value_name = "SIZE")]
    pub min_cluster_size: Option<String>,
    /// Where the snapshot keeps old data: file:PATH, qcow2:PATH or ram:SIZE
    /// [default: a file in the state dir].
    #[arg(long)]
    pub store: Option<String>,
    /// Most bytes the store may hold.
    #[arg(long, value_name = "SIZE")]
    pub store_limit: Option<String>,
    /// break-guest-write (default) or break-snapshot.
    #[arg(long, value_name = "POLICY")]
    pub on_cbw_error: Option<String>,
    /// Seconds a copy-before-write may take before it counts as failed.
    #[arg(long, value_name = "SECS")]
    pub cbw_timeout: Option<f64>,
    /// hinted (saves the guest the most copies) or offset (ascending).
    #[arg(long, default_value = "hinted")]
    pub order: String,
    /// Requests in flight per disk [default: 8 to an NBD target, 4 to a file].
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// Bytes per write request [default: 1M].
    #[arg(long, value_name = "SIZE")]
    pub chunk_size: Option<String>,
    /// Speed limit in bytes/s for the whole job, e.g. 50M [default: none].
    #[arg(long, value_name = "RATE")]
    pub speed: Option<String>,
    /// report, stop (pause until resumed) or retry [default: retry for NBD
    /// targets, report for files].
    #[arg(long, value_name = "POLICY")]
    pub on_target_error: Option<String>,
    /// report or stop [default: report].
    #[arg(long, value_name = "POLICY")]
    pub on_source_error: Option<String>,
    /// How long retry reconnects and resends, in seconds [default: 600].
    #[arg(long, value_name = "SECS")]
    pub retry_for: Option<f64>,
    /// Read the target back after the copy and compare.
    #[arg(long)]
    pub verify: bool,
    /// Wait for the job to end, showing progress; exit non-zero unless it
    /// completed.
    #[arg(long)]
    pub wait: bool,
}

/// `fleece image ...`
#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Create an image file (refuses an existing PATH), with the code the
    /// daemon uses for its qcow2 stores.
    Create {
        /// Where to create it.
        path: PathBuf,
        /// Disk size, e.g. 20G; with --backing, defaults to the backing
        /// file's size.
        #[arg(long)]
        size: Option<String>,
        /// raw or qcow2.
        #[arg(long, default_value = "qcow2")]
        format: String,
        /// qcow2 cluster size, a power of two from 512 to 2M [default: 64K].
        #[arg(long, value_name = "SIZE")]
        cluster_size: Option<String>,
        /// qcow2 backing file (raw or qcow2, detected), only ever read;
        /// a relative name is relative to PATH's directory, as in qcow2.
        #[arg(long, value_name = "FILE")]
        backing: Option<String>,
    },
}

/// `fleece serve` flags.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// An image to serve read-write, as NAME=PATH (raw or qcow2, detected)
    /// or NAME=PATH,format=raw|qcow2 (repeatable). None here or in
    /// --config: a 1 GiB demo disk, STATE_DIR/demo.raw.
    #[arg(long = "disk", value_name = "NAME=PATH[,format=F]")]
    pub disks: Vec<String>,
    /// TOML file with the same settings (flags win).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Where to listen for NBD clients: unix:PATH or tcp:HOST:PORT
    /// (repeatable) [default: unix:STATE_DIR/nbd.sock]
    #[arg(long = "nbd", value_name = "ADDR")]
    pub nbd: Vec<String>,
    /// Directory for sockets, the demo disk and snapshot stores [default:
    /// fleece-state]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// I/O threads shared by all connections, 1 to 1024 [default: 16]
    #[arg(long, value_name = "N")]
    pub io_threads: Option<usize>,
    /// A client that has not finished negotiating (TLS included) this many
    /// seconds after it connected is disconnected, 1 to 3600 [default: 10]
    #[arg(long, value_name = "SECS")]
    pub handshake_timeout: Option<u64>,
    /// Connections still negotiating, at most; more are closed at once
    /// [default: 64]
    #[arg(long, value_name = "N")]
    pub max_handshakes: Option<usize>,
    /// NBD over TLS: the server's certificate chain (PEM)
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM)
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM): every client must present a certificate
    /// signed by one (mutual TLS)
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// require: clients must start TLS before anything else; allow: they
    /// may [default: require]
    #[arg(long, value_name = "MODE")]
    pub tls: Option<String>,
    /// Serve plaintext NBD on TCP addresses that are not loopback
    #[arg(long)]
    pub insecure_tcp: bool,
}

/// `fleece disk ...`
#[derive(Subcommand, Debug)]
pub enum DiskCommand {
    /// List disks.
    List,
    /// Serve another image (raw or qcow2) as NAME.
    Add {
        /// Export name.
        name: String,
        /// Path of an existing image.
        path: PathBuf,
        /// raw or qcow2 [default: detected: qcow2 by its magic, raw otherwise]
        #[arg(long)]
        format: Option<String>,
    },
    /// Grow or shrink a disk (its image and its export). Refused while the
    /// disk has snapshots; clients connected before keep the old size.
    Resize {
        /// Disk name.
        name: String,
        /// New size, e.g. 20G (a multiple of 512 bytes).
        size: String,
        /// Allow a smaller size, which discards the data past it.
        #[arg(long)]
        shrink: bool,
    },
    /// Stop serving a disk.
    Remove {
        /// Disk name.
        name: String,
        /// Close open client connections instead of refusing.
        #[arg(long)]
        force: bool,
    },
}

/// `fleece snapshot ...`
#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Snapshot one or more disks at one instant; serves DISK@NAME read-only.
    Create(CreateArgs),
    /// List snapshots (of one disk, or all).
    List {
        /// Only this disk's.
        disk: Option<String>,
    },
    /// Show one snapshot.
    Show {
        /// DISK@NAME
        id: String,
    },
    /// Delete a snapshot and free its store. Refused while clients are
    /// connected to its view (a backup may be reading it) unless --force.
    Delete {
        /// DISK@NAME
        id: String,
        /// Close the view's connections instead of refusing.
        #[arg(long)]
        force: bool,
    },
}

/// `fleece snapshot create` flags.
#[derive(Args, Debug)]
pub struct CreateArgs {
    /// Disks that share the instant.
    #[arg(required = true)]
    pub disks: Vec<String>,
    /// Snapshot name.
    #[arg(long)]
    pub name: String,
    /// Copy unit, e.g. 64K (rounded up to the store's granularity).
    #[arg(long, value_name = "SIZE")]
    pub cluster_size: Option<String>,
    /// file:PATH (default: a sparse file in the state dir), qcow2:PATH (a
    /// new qcow2 image) or ram:SIZE (memory, spilling to a file beyond SIZE).
    #[arg(long, value_name = "STORE")]
    pub store: Option<String>,
    /// Most bytes the store may hold, e.g. 10G.
    #[arg(long, value_name = "SIZE")]
    pub store_limit: Option<String>,
    /// Limit the snapshot to the clusters set in this dirty bitmap (as of
    /// the instant): an incremental snapshot.
    #[arg(long, value_name = "NAME")]
    pub bitmap: Option<String>,
    /// At the same instant, start bitmap NAME afresh (created if missing)
    /// and stop the --bitmap one: the checkpoint pattern of backup tools.
    #[arg(long, value_name = "NAME")]
    pub rotate: Option<String>,
    /// Each read of the view discards the whole clusters it returned.
    #[arg(long)]
    pub read_once: bool,
    /// What a failed copy breaks: the user's write or the snapshot.
    #[arg(long, value_name = "POLICY", value_parser = ["break-guest-write", "break-snapshot"])]
    pub on_cbw_error: Option<String>,
    /// A copy slower than this many seconds counts as failed (0: never).
    #[arg(long, value_name = "SECS")]
    pub cbw_timeout: Option<f64>,
}

/// `fleece bitmap ...`
#[derive(Subcommand, Debug)]
pub enum BitmapCommand {
    /// Create a bitmap that records every change to the disk from now on.
    Add {
        /// Disk.
        disk: String,
        /// Bitmap name.
        name: String,
        /// Bytes per bit, e.g. 64K.
        #[arg(long, value_name = "SIZE")]
        granularity: Option<String>,
        /// Create it without recording.
        #[arg(long)]
        disabled: bool,
        /// Keep it in memory only (lost on restart).
        #[arg(long)]
        transient: bool,
    },
    /// Delete a bitmap.
    Remove(BitmapArgs),
    /// Clear every bit.
    Clear(BitmapArgs),
    /// Start recording changes.
    Enable(BitmapArgs),
    /// Stop recording changes.
    Disable(BitmapArgs),
    /// Add the bits of SOURCE bitmaps to TARGET.
    Merge {
        /// Disk.
        disk: String,
        /// Bitmap that receives the bits.
        target: String,
        /// Bitmaps whose bits are added.
        #[arg(required = true)]
        sources: Vec<String>,
    },
    /// List a disk's bitmaps.
    List {
        /// Disk.
        disk: String,
    },
}

/// A bitmap by disk and name.
#[derive(Args, Debug)]
pub struct BitmapArgs {
    /// Disk.
    pub disk: String,
    /// Bitmap name.
    pub name: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str], env: Option<&str>) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(args)?.checked(env.map(OsString::from))
    }

    #[test]
    fn the_definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_go_before_or_after_the_subcommand() {
        for args in [
            &["fleece", "--control", "/x.sock", "--json", "disk", "list"][..],
            &["fleece", "disk", "list", "--control", "/x.sock", "--json"],
            &["fleece", "disk", "--json", "list", "--control=/x.sock"],
            &[
                "fleece",
                "--json",
                "snapshot",
                "show",
                "vm@s",
                "--control",
                "/x.sock",
            ],
        ] {
            let cli = parse(args, Some("/env.sock")).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            assert_eq!(cli.control, Some(PathBuf::from("/x.sock")), "{args:?}");
            assert!(cli.json, "{args:?}");
        }
        let cli = parse(&["fleece", "status"], None).unwrap();
        assert!(!cli.json);
    }

    #[test]
    fn the_control_socket_comes_from_the_flag_then_the_environment_then_the_default() {
        let control = |args: &[&str], env| parse(args, env).unwrap().control.unwrap();
        assert_eq!(
            control(&["fleece", "status"], None),
            PathBuf::from(DEFAULT_CONTROL)
        );
        assert_eq!(
            control(&["fleece", "status"], Some("/env.sock")),
            PathBuf::from("/env.sock")
        );
        assert_eq!(
            control(
                &["fleece", "status", "--control", "/flag.sock"],
                Some("/env.sock")
            ),
            PathBuf::from("/flag.sock")
        );
        let e = parse(&["fleece", "status"], Some("")).unwrap_err();
        assert!(e.to_string().contains("FLEECE_CONTROL"), "{e}");
    }

    #[test]
    fn serve_takes_control_from_its_own_settings_and_refuses_json() {
        let cli = parse(&["fleece", "serve"], Some("/env.sock")).unwrap();
        assert_eq!(
            cli.control, None,
            "serve must fall back to STATE_DIR/control.sock"
        );
        let cli = parse(
            &["fleece", "--control", "/c.sock", "serve", "--state-dir", "d"],
            None,
        )
        .unwrap();
        assert_eq!(cli.control, Some(PathBuf::from("/c.sock")));
        let cli = parse(&["fleece", "serve", "--control", "/c.sock"], None).unwrap();
        assert_eq!(cli.control, Some(PathBuf::from("/c.sock")));
        for args in [&["fleece", "serve", "--json"][..], &["fleece", "--json", "serve"]] {
            let e = parse(args, None).unwrap_err();
            assert_eq!(e.exit_code(), 2);
            assert!(e.to_string().contains("--json"), "{e}");
        }
    }

    #[test]
    fn help_names_the_environment_and_every_serve_default() {
        let top = Cli::command().render_long_help().to_string();
        for want in [
            "FLEECE_CONTROL",
            "fleece serve",
            "snapshot create",
            "nbdcopy",
            "snapshot delete",
        ] {
            assert!(top.contains(want), "fleece --help lacks {want:?}:\n{top}");
        }
        let mut cmd = Cli::command();
        let serve = cmd
            .find_subcommand_mut("serve")
            .unwrap()
            .render_long_help()
            .to_string();
        for want in [
            "fleece-state",
            "unix:STATE_DIR/nbd.sock",
            "STATE_DIR/control.sock",
            "[default: 16]",
            "demo.raw",
            "--json is refused",
        ] {
            assert!(
                serve.contains(want),
                "fleece serve --help lacks {want:?}:\n{serve}"
            );
        }
    }
}
