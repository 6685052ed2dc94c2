//! `microvm save -o FILE [--format docker-archive|oci-archive] IMAGE...`: stored images as one
//! archive for `docker load`, `podman load`, `skopeo` or `microvm load` on another host. The
//! archive is written beside FILE and renamed into place whole, so a failure (a full disk)
//! leaves no half archive under that name.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use clap::Args;

use super::{error_line, EXIT_MICROVM_ERROR};
use crate::image::{SaveFormat, Store};

/// Flags of `microvm save`.
#[derive(Debug, Args)]
pub struct SaveArgs {
    /// Write to this file (default: standard output, when it is not a terminal).
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Archive format.
    #[arg(long, value_enum, default_value = "docker-archive")]
    pub format: SaveFormat,
    /// Images (names or IDs).
    #[arg(value_name = "IMAGE", required = true)]
    pub images: Vec<String>,
}

/// Runs `microvm save`.
pub fn save(args: SaveArgs) -> i32 {
    match run(args) {
        Ok(()) => 0,
        Err(e) => {
            error_line(e);
            EXIT_MICROVM_ERROR
        }
    }
}

fn run(args: SaveArgs) -> Result<(), String> {
    let store = Store::open(&crate::host::data_dir()).map_err(|e| e.to_string())?;
    let images = args
        .images
        .iter()
        .map(|n| store.resolve(n))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let Some(path) = args.output else {
        let stdout = std::io::stdout();
        if stdout.is_terminal() {
            return Err(
                "refusing to write an archive to a terminal: use -o FILE or redirect".into(),
            );
        }
        return store
            .save(&images, args.format, std::io::BufWriter::new(stdout.lock()))
            .map_err(|e| e.to_string());
    };
    let name = path
        .file_name()
        .ok_or_else(|| format!("-o {}: not a file name", path.display()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = (|| {
        let file = std::fs::File::create(&tmp)
            .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
        let mut w = std::io::BufWriter::new(file);
        store
            .save(&images, args.format, &mut w)
            .map_err(|e| e.to_string())?;
        let file = w
            .into_inner()
            .map_err(|e| format!("writing {}: {}", tmp.display(), e.error()))?;
        file.sync_all()
            .map_err(|e| format!("writing {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &path).map_err(|e| format!("cannot write {}: {e}", path.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    let _ = std::io::stdout().flush();
    result
}
