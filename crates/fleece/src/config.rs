//! `fleece serve` settings from flags and an optional TOML file.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
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
    /// Raw image path.
    pub path: PathBuf,
}

impl FileConfig {
    /// Reads and parses a TOML file.
    pub fn load(path: &Path) -> Result<FileConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::invalid(format!("cannot read config {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| Error::invalid(format!("config {}: {e}", path.display())))
    }
}

/// Parses `NAME=PATH`.
pub fn parse_disk_arg(s: &str) -> Result<DiskConfig> {
    let (name, path) = s.split_once('=').ok_or_else(|| {
        Error::invalid(format!(
            "--disk '{s}' must be NAME=PATH, as in --disk vm1=/images/vm1.raw"
        ))
    })?;
    Ok(DiskConfig {
        name: name.to_string(),
        path: PathBuf::from(path),
    })
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
    fn disk_argument_needs_name_and_path() {
        assert!(parse_disk_arg("novalue").is_err());
        assert_eq!(parse_disk_arg("a=/x=y").unwrap().path, PathBuf::from("/x=y"));
    }
}
