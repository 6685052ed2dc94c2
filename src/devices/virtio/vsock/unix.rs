//! Host Unix sockets of the hybrid vsock: the listening socket host processes connect to, and
//! non-blocking connects to `<uds_path>_<port>` for connections the guest opens.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Errors setting up the listening socket; each names the path and what to do about it.
#[derive(Debug, Error)]
pub enum ListenError {
    /// Something that is not a socket sits at the path.
    #[error("{0} exists and is not a socket; refusing to replace it: pick another --vsock-uds")]
    NotASocket(PathBuf),
    /// A live process already listens there.
    #[error("another process is listening on {0}: pick another --vsock-uds")]
    InUse(PathBuf),
    /// The path cannot be inspected or the stale socket removed.
    #[error("cannot replace the stale socket {path}: {source}")]
    Stale {
        /// The path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// bind or listen failed (missing directory, permissions, path over 107 bytes...).
    #[error("cannot listen on {path}: {source}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// The listening socket, and the identity of the file we created, so we remove only our own.
pub struct Listener {
    /// Non-blocking listening socket.
    pub socket: UnixListener,
    path: PathBuf,
    inode: Option<(u64, u64)>,
}

impl Listener {
    /// Binds `path` (non-blocking), first removing a socket file nobody listens on any more.
    pub fn bind(path: &Path) -> Result<Self, ListenError> {
        remove_stale(path)?;
        let bind_err = |source| ListenError::Bind {
            path: path.to_owned(),
            source,
        };
        let socket = UnixListener::bind(path).map_err(bind_err)?;
        socket.set_nonblocking(true).map_err(bind_err)?;
        let inode = std::fs::symlink_metadata(path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        Ok(Listener {
            socket,
            path: path.to_owned(),
            inode,
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // Only if the file is still the socket we created: someone may have replaced it.
        let ours = std::fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if ours.is_some() && ours == self.inode {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn remove_stale(path: &Path) -> Result<(), ListenError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ListenError::Stale {
                path: path.to_owned(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ListenError::NotASocket(path.to_owned()));
    }
    match connect(path) {
        // A full backlog (EAGAIN) also means someone is there.
        Ok(_) => return Err(ListenError::InUse(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            return Err(ListenError::InUse(path.to_owned()))
        }
        Err(_) => {}
    }
    std::fs::remove_file(path).map_err(|source| ListenError::Stale {
        path: path.to_owned(),
        source,
    })
}

/// `<uds_path>_<port>`: where the host listens for guest connections to `port`.
pub fn port_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut p = OsString::from(uds_path.as_os_str());
    p.push(format!("_{port}"));
    p.into()
}

/// Connects a non-blocking stream socket to `path`. Unix-domain connects finish at once or fail
/// (EAGAIN when the listener's backlog is full), so this never waits; std's connect could block
/// the device loop on a full backlog.
pub fn connect(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    let mut addr = libc::sockaddr_un {
        sun_family: libc::AF_UNIX as libc::sa_family_t,
        sun_path: [0; 108],
    };
    // One byte stays NUL: the kernel wants the path terminated or the length exact.
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long or has a NUL byte",
        ));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: socket() takes no pointers; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket() and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` is an initialised sockaddr_un that outlives the call and `len` is its size;
    // the kernel only reads it.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast::<libc::sockaddr>(),
            len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("microvm-unix-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn stale_sockets_are_replaced_live_ones_and_files_are_not() {
        let d = scratch_dir("stale");
        let path = d.join("v.sock");
        drop(UnixListener::bind(&path).unwrap()); // leaves a dead socket file
        let l = Listener::bind(&path).unwrap();
        assert!(matches!(Listener::bind(&path), Err(ListenError::InUse(_))));
        drop(l);
        assert!(!path.exists(), "our socket is removed when we are done");
        std::fs::write(&path, b"data").unwrap();
        assert!(matches!(
            Listener::bind(&path),
            Err(ListenError::NotASocket(_))
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn connects_without_blocking_and_fails_cleanly() {
        let d = scratch_dir("connect");
        let base = d.join("v.sock");
        let target = port_path(&base, 1234);
        assert!(target.to_str().unwrap().ends_with("v.sock_1234"));
        assert!(connect(&target).is_err(), "nobody listens yet");
        let l = UnixListener::bind(&target).unwrap();
        let s = connect(&target).unwrap();
        let (peer, _) = l.accept().unwrap();
        drop(peer);
        drop(s);
        let long = PathBuf::from("/".repeat(200));
        assert_eq!(
            connect(&long).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        let _ = std::fs::remove_dir_all(&d);
    }
}
