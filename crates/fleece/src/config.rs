//! `fleece serve` settings from flags and an optional TOML file.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::nbd::access::AccessRule;
use crate::nbd::tls::TlsFiles;
use crate::nbd::ListenAddr;

/// Contents of `--config FILE`; every field is optional and flags win.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// State directory.
    pub state_dir: Option<PathBuf>,
    /// Control socket path.
    pub control: Option<PathBuf>,
    /// NBD listen addresses (`unix:PATH`, `tcp:HOST:PORT`).
    #[serde(default)]
    pub nbd: Vec<String>,
    /// I/O threads shared by all connections.
    pub io_threads: Option<usize>,
    /// Seconds a client may take to negotiate, TLS included.
    pub handshake_timeout: Option<u64>,
    /// Connections still negotiating, at most.
    pub max_handshakes: Option<usize>,
    /// `[tls]`: cert, key, ca, mode.
    pub tls: Option<TlsFiles>,
    /// Allow plaintext NBD on a TCP address that is not loopback.
    pub insecure_tcp: Option<bool>,
    /// `[[access]]`: who may open which export, and how.
    #[serde(default)]
    pub access: Vec<AccessRule>,
    /// Disks to serve.
    #[serde(default)]
    pub disk: Vec<DiskConfig>,
}

/// One `[[disk]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Export name.
    pub name: String,
    /// Image path (raw or qcow2).
    pub path: PathBuf,
    /// The image's format (`raw` or `qcow2`); detected when absent.
    #[serde(default)]
    pub format: Option<String>,
}

impl FileConfig {
    /// Reads and parses a TOML file. Relative paths in it (state dir,
    /// control socket, `unix:` listeners, disk images) are taken relative to
    /// the file's own directory, so a config works from any working
    /// directory.
    pub fn load(path: &Path) -> Result<FileConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::invalid(format!("cannot read config {}: {e}", path.display())))?;
        let mut c: FileConfig = toml::from_str(&text).map_err(|e| {
            // One line, as every error is (toml's own display spans several).
            let line = e.span().map_or(0, |s| text[..s.start].lines().count().max(1));
            Error::invalid(format!(
                "config {} line {line}: {}",
                path.display(),
                e.message().trim()
            ))
        })?;
        let base = std::path::absolute(path)
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_default();
        c.resolve(&base);
        Ok(c)
    }

    fn resolve(&mut self, base: &Path) {
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(p) = self.state_dir.as_mut() {
            abs(p);
        }
        if let Some(p) = self.control.as_mut() {
            abs(p);
        }
        for d in &mut self.disk {
            abs(&mut d.path);
        }
        if let Some(t) = self.tls.as_mut() {
            for p in [&mut t.cert, &mut t.key, &mut t.ca].into_iter().flatten() {
                abs(p);
            }
        }
        for l in &mut self.nbd {
            if let Some(p) = l.strip_prefix("unix:") {
                let mut p = PathBuf::from(p);
                abs(&mut p);
                *l = format!("unix:{}", p.display());
            }
        }
    }
}

/// Most I/O threads one daemon may run.
pub const MAX_IO_THREADS: usize = 1024;

/// Checks `--io-threads` / `io_threads`.
pub fn check_io_threads(n: usize) -> Result<usize> {
    if (1..=MAX_IO_THREADS).contains(&n) {
        Ok(n)
    } else {
        Err(Error::invalid(format!(
            "io-threads {n} is out of range: use 1 to {MAX_IO_THREADS} (default 16)"
        )))
    }
}

/// The disks to serve: those of the config file, then those of `--disk`
/// flags; a name given twice is an error.
pub fn merge_disks(file: Vec<DiskConfig>, flags: Vec<DiskConfig>) -> Result<Vec<DiskConfig>> {
    let mut out: Vec<DiskConfig> = Vec::new();
    for d in file.into_iter().chain(flags) {
        if out.iter().any(|o| o.name == d.name) {
            return Err(Error::invalid(format!(
                "disk '{}' is given twice (in the config file and/or by --disk)",
                d.name
            )));
        }
        out.push(d);
    }
    Ok(out)
}

/// Parses `NAME=PATH` or `NAME=PATH,format=raw|qcow2` (without it the
/// format is detected).
pub fn parse_disk_arg(s: &str) -> Result<DiskConfig> {
    let (name, rest) = s.split_once('=').ok_or_else(|| {
        Error::invalid(format!(
            "--disk '{s}' must be NAME=PATH or NAME=PATH,format=raw|qcow2, as in --disk vm1=/images/vm1.qcow2"
        ))
    })?;
    let (path, format) = match rest.rsplit_once(",format=") {
        Some((p, f)) => {
            check_format(f)?;
            (p, Some(f.to_string()))
        }
        None => (rest, None),
    };
    Ok(DiskConfig {
        name: name.to_string(),
        path: PathBuf::from(path),
        format,
    })
}

/// Checks a format name (`raw` or `qcow2`).
pub fn check_format(f: &str) -> Result<fleece_block::Format> {
    f.parse()
        .map_err(|e: fleece_block::Error| Error::invalid(e.to_string()))
}

/// Parses listen addresses.
pub fn parse_listen(list: &[String]) -> Result<Vec<ListenAddr>> {
    list.iter().map(|s| s.parse()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_lists_disks_and_listeners() {
        let c: FileConfig = toml::from_str(
            "state_dir = \"/tmp/s\"\nnbd = [\"tcp:127.0.0.1:10809\"]\n[[disk]]\nname = \"a\"\npath = \"/a.raw\"\n",
        )
        .unwrap();
        assert_eq!(c.disk[0].name, "a");
        assert_eq!(
            parse_listen(&c.nbd).unwrap()[0],
            ListenAddr::Tcp("127.0.0.1:10809".into())
        );
    }

    #[test]
    fn unknown_config_keys_are_rejected() {
        assert!(toml::from_str::<FileConfig>("disks = 3").is_err());
    }

    #[test]
    fn relative_paths_in_a_config_file_are_relative_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fleece.toml");
        std::fs::write(
            &p,
            "state_dir = \"state\"\nnbd = [\"unix:nbd.sock\", \"tcp:127.0.0.1:0\"]\n\
             [[disk]]\nname = \"a\"\npath = \"images/a.raw\"\n[[disk]]\nname = \"b\"\npath = \"/abs/b.raw\"\n",
        )
        .unwrap();
        let c = FileConfig::load(&p).unwrap();
        let base = std::path::absolute(dir.path()).unwrap();
        assert_eq!(c.state_dir.unwrap(), base.join("state"));
        assert_eq!(c.disk[0].path, base.join("images/a.raw"));
        assert_eq!(c.disk[1].path, PathBuf::from("/abs/b.raw"));
        assert_eq!(c.nbd[0], format!("unix:{}", base.join("nbd.sock").display()));
        assert_eq!(c.nbd[1], "tcp:127.0.0.1:0");
    }

    #[test]
    fn flag_disks_add_to_config_disks_and_a_name_may_not_repeat() {
        let d = |n: &str| DiskConfig {
            name: n.into(),
            path: PathBuf::from(format!("/{n}")),
            format: None,
        };
        let m = merge_disks(vec![d("a")], vec![d("b")]).unwrap();
        assert_eq!(m.iter().map(|x| x.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert!(merge_disks(vec![d("a")], vec![d("a")]).is_err());
    }

    #[test]
    fn io_threads_must_be_sane() {
        assert!(check_io_threads(0).is_err());
        assert!(check_io_threads(100_000).is_err());
        assert_eq!(check_io_threads(16).unwrap(), 16);
    }

    #[test]
    fn disk_argument_needs_name_and_path() {
        assert!(parse_disk_arg("novalue").is_err());
        assert_eq!(parse_disk_arg("a=/x=y").unwrap().path, PathBuf::from("/x=y"));
        assert_eq!(parse_disk_arg("a=/x,y").unwrap().path, PathBuf::from("/x,y"));
    }

    #[test]
    fn disk_argument_may_say_the_format() {
        let d = parse_disk_arg("vm=/i/vm.img,format=qcow2").unwrap();
        assert_eq!(
            (d.path, d.format.as_deref()),
            (PathBuf::from("/i/vm.img"), Some("qcow2"))
        );
        assert_eq!(
            parse_disk_arg("vm=/i/vm.img,format=raw")
                .unwrap()
                .format
                .as_deref(),
            Some("raw")
        );
        let e = parse_disk_arg("vm=/i/vm.img,format=vmdk")
            .unwrap_err()
            .to_string();
        assert!(e.contains("raw or qcow2"), "{e}");
        let c: FileConfig =
            toml::from_str("[[disk]]\nname = \"a\"\npath = \"/a\"\nformat = \"qcow2\"\n").unwrap();
        assert_eq!(c.disk[0].format.as_deref(), Some("qcow2"));
    }
}
