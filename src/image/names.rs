//! The images index, `images.json`: image name -> manifest digest. Readers take the file as it
//! is (it is only ever replaced whole, by rename); writers read-modify-write it under an
//! exclusive lock on `images.lock`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::error::{Error, IoContext};
use super::lock::{self, Mode};
use super::store::{sync_dir, unique};

const FILE: &str = "images.json";
const LOCK: &str = "images.lock";

/// One named image.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Record {
    /// Its manifest's digest.
    pub manifest: String,
    /// When it was loaded (seconds since the epoch).
    pub loaded: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct NamesFile {
    version: u32,
    images: BTreeMap<String, Record>,
}

/// All named images.
pub(crate) fn read(root: &Path) -> Result<BTreeMap<String, Record>, Error> {
    let path = root.join(FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
    };
    let file: NamesFile = serde_json::from_slice(&bytes).map_err(|source| Error::Json {
        what: path.display().to_string(),
        source,
    })?;
    Ok(file.images)
}

/// Changes the index under its lock and writes it back atomically.
pub(crate) fn update<T>(
    root: &Path,
    change: impl FnOnce(&mut BTreeMap<String, Record>) -> Result<T, Error>,
) -> Result<T, Error> {
    let _lock = lock::lock(&root.join(LOCK), Mode::Exclusive)?;
    let mut images = read(root)?;
    let out = change(&mut images)?;
    let path = root.join(FILE);
    let tmp = root.join(format!(".tmp-images-{}.json", unique()));
    let write = || -> io::Result<()> {
        let mut f = File::options().write(true).create_new(true).open(&tmp)?;
        let bytes = serde_json::to_vec_pretty(&NamesFile { version: 1, images })?;
        f.write_all(&bytes)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(format!("writing {}", path.display()), e));
    }
    sync_dir(root).ctx(|| format!("syncing {}", root.display()))?;
    Ok(out)
}
