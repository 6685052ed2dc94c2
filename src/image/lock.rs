//! Advisory file locks (flock) that order the store's writers across processes; the kernel drops
//! them when a process dies, so a `kill -9` never leaves the store locked.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

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

impl Mode {
    /// flock's argument for this mode, waiting for the lock or not.
    fn arg(self, wait: bool) -> FlockArg {
        match (self, wait) {
            (Mode::Shared, true) => FlockArg::LockShared,
            (Mode::Exclusive, true) => FlockArg::LockExclusive,
            (Mode::Shared, false) => FlockArg::LockSharedNonblock,
            (Mode::Exclusive, false) => FlockArg::LockExclusiveNonblock,
        }
    }
}

/// Opens (creating) `path` and waits for the lock.
pub(crate) fn lock(path: &Path, mode: Mode) -> Result<FileLock, Error> {
    let mut file = open(path)?;
    loop {
        match Flock::lock(file, mode.arg(true)) {
            Ok(l) => return Ok(FileLock(l)),
            Err((f, Errno::EINTR)) => file = f,
            Err((_, e)) => return Err(Error::io(format!("locking {}", path.display()), e.into())),
        }
    }
}

/// [`lock`], but gives up after `max_wait` with an error that says a holder seems stuck: a
/// holder that dies releases the lock at once, one that hangs (stopped, say) must not block
/// every later run forever.
pub(crate) fn lock_within(path: &Path, mode: Mode, max_wait: Duration) -> Result<FileLock, Error> {
    let deadline = Instant::now() + max_wait;
    let mut file = open(path)?;
    loop {
        match Flock::lock(file, mode.arg(false)) {
            Ok(l) => return Ok(FileLock(l)),
            Err((f, Errno::EWOULDBLOCK | Errno::EINTR)) if Instant::now() < deadline => {
                file = f;
                std::thread::sleep(POLL);
            }
            Err((_, Errno::EWOULDBLOCK | Errno::EINTR)) => {
                return Err(Error::io(
                    format!(
                        "waiting {} s for {}: another microvm process holds it and seems stuck \
                         (find it with `fuser {}`)",
                        max_wait.as_secs(),
                        path.display(),
                        path.display()
                    ),
                    io::ErrorKind::TimedOut.into(),
                ))
            }
            Err((_, e)) => return Err(Error::io(format!("locking {}", path.display()), e.into())),
        }
    }
}

/// How often [`lock_within`] tries again.
const POLL: Duration = Duration::from_millis(20);

/// Takes the lock on an already open file without waiting; `None` when someone else holds it.
pub(crate) fn try_lock(file: File, mode: Mode, path: &Path) -> Result<Option<FileLock>, Error> {
    match Flock::lock(file, mode.arg(false)) {
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

    #[test]
    fn a_bounded_wait_gives_up_on_a_stuck_holder_and_wins_a_released_lock() {
        let dir = std::env::temp_dir().join(format!("microvm-lock-wait-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x.lock");
        let held = lock(&p, Mode::Exclusive).unwrap();
        let started = Instant::now();
        let e = lock_within(&p, Mode::Exclusive, Duration::from_millis(200)).unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(e.to_string().contains("seems stuck"), "{e}");
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(held);
        });
        lock_within(&p, Mode::Shared, Duration::from_secs(10)).unwrap();
        releaser.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
