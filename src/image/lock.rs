//! Advisory file locks (flock) that order the store's writers across processes; the kernel drops
//! them when a process dies, so a `kill -9` never leaves the store locked.

use std::fs::{File, OpenOptions};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use super::error::{Error, IoContext};

/// A held lock; released on drop.
#[derive(Debug)]
pub(crate) struct FileLock(#[allow(dead_code)] Flock<File>);

/// How to take a lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Many holders at once.
    Shared,
    /// One holder.
    Exclusive,
}

/// Opens (creating) `path` and waits for the lock.
pub(crate) fn lock(path: &Path, mode: Mode) -> Result<FileLock, Error> {
    let file = open(path)?;
    let arg = match mode {
        Mode::Shared => FlockArg::LockShared,
        Mode::Exclusive => FlockArg::LockExclusive,
    };
    let mut file = file;
    loop {
        match Flock::lock(file, arg) {
            Ok(l) => return Ok(FileLock(l)),
            Err((f, Errno::EINTR)) => file = f,
            Err((_, e)) => return Err(Error::io(format!("locking {}", path.display()), e.into())),
        }
    }
}

/// Takes the lock on an already open file without waiting; `None` when someone else holds it.
pub(crate) fn try_lock(file: File, mode: Mode, path: &Path) -> Result<Option<FileLock>, Error> {
    let arg = match mode {
        Mode::Shared => FlockArg::LockSharedNonblock,
        Mode::Exclusive => FlockArg::LockExclusiveNonblock,
    };
    match Flock::lock(file, arg) {
        Ok(l) => Ok(Some(FileLock(l))),
        Err((_, Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(Error::io(format!("locking {}", path.display()), e.into())),
    }
}

fn open(path: &Path) -> Result<File, Error> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .ctx(|| format!("opening lock file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_excludes_and_releases_on_drop() {
        let dir = std::env::temp_dir().join(format!("microvm-lock-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x.lock");
        let held = lock(&p, Mode::Exclusive).unwrap();
        let f = File::open(&p).unwrap();
        assert!(try_lock(f, Mode::Shared, &p).unwrap().is_none());
        drop(held);
        let f = File::open(&p).unwrap();
        assert!(try_lock(f, Mode::Exclusive, &p).unwrap().is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
