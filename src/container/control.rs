//! The supervisor's control socket (`control.sock` in the container's directory): commands such
//! as `stop` and `kill` send one JSON request per connection and read one JSON reply. The socket
//! sits in the container's directory (mode 0700), so only its owner reaches it; its path is
//! reached through `/proc/self/fd/N/`, since a deep data directory would pass the 108 bytes a
//! socket path may have.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::Error;
use super::store::Container;

const SOCKET: &str = "control.sock";
/// Largest request or reply line.
const MAX_LINE: u64 = 64 << 10;
/// How long a client waits for the supervisor's reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// What a command asks of the supervisor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// Send the stop signal, then SIGKILL after `timeout` seconds, then power the VM off.
    Stop {
        /// Grace period in seconds.
        timeout: f64,
    },
    /// Deliver `signal` to the process.
    Kill {
        /// Signal number.
        signal: i32,
    },
    /// Deliver `signal` to every process in the VM (an OCI runtime's `kill --all`).
    KillAll {
        /// Signal number.
        signal: i32,
    },
    /// Run the created process (an OCI runtime's `start`).
    Start,
    /// Stop the VM's vCPUs.
    Pause,
    /// Let them run again.
    Unpause,
}

/// The supervisor's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// Done (or under way: `stop` returns at once; wait for the supervisor to end).
    Ok,
    /// Refused, with a reason for the user.
    Error(String),
}

/// Runs `f` with a short path to `name` in `dir` (see the module comment).
fn with_short_path<T>(dir: &Path, name: &str, f: impl FnOnce(&Path) -> T) -> std::io::Result<T> {
    let fd: OwnedFd = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(dir)?
        .into();
    let path = PathBuf::from(format!("/proc/self/fd/{}/{name}", fd.as_raw_fd()));
    let out = f(&path);
    drop(fd);
    Ok(out)
}

/// The listening side, owned by the supervisor.
pub struct Server {
    listener: UnixListener,
    path: PathBuf,
}

impl Server {
    /// Binds the container's control socket (a stale one left by a killed supervisor is
    /// replaced: only a supervisor, holding the supervisor lock, binds it).
    pub fn bind(c: &Container) -> Result<Server, Error> {
        let path = c.dir().join(SOCKET);
        let _ = std::fs::remove_file(&path);
        let listener = with_short_path(c.dir(), SOCKET, |p| UnixListener::bind(p))
            .and_then(|r| r)
            .map_err(Error::io("cannot listen on", &path))?;
        Ok(Server { listener, path })
    }

    /// Serves requests on a thread of its own until the process ends, answering each with
    /// `handle`. A malformed or oversized request gets an error reply and changes nothing.
    pub fn serve(&self, handle: impl Fn(Request) -> Reply + Send + 'static) -> Result<(), Error> {
        let listener = self
            .listener
            .try_clone()
            .map_err(Error::io("cannot listen on", &self.path))?;
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let mut line = String::new();
                let read = BufReader::new((&conn).take(MAX_LINE)).read_line(&mut line);
                let reply = match read
                    .map_err(|e| e.to_string())
                    .and_then(|_| serde_json::from_str::<Request>(&line).map_err(|e| e.to_string()))
                {
                    Ok(req) => handle(req),
                    Err(e) => Reply::Error(format!("malformed request: {e}")),
                };
                if let Ok(mut bytes) = serde_json::to_vec(&reply) {
                    bytes.push(b'\n');
                    let _ = conn.write_all(&bytes);
                }
            }
        });
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Removes the control socket of a supervisor that is gone (a killed one leaves it).
pub fn remove_stale(c: &Container) {
    let _ = std::fs::remove_file(c.dir().join(SOCKET));
}

/// Sends `req` to `c`'s supervisor and returns its reply.
pub fn request(c: &Container, req: &Request) -> Result<(), Error> {
    let name = c.config.name.clone();
    let broken = |why: String| Error::Supervisor {
        name: name.clone(),
        why,
    };
    let mut conn = with_short_path(c.dir(), SOCKET, |p| UnixStream::connect(p))
        .and_then(|r| r)
        .map_err(|e| broken(format!("cannot be reached: {e}")))?;
    conn.set_read_timeout(Some(REPLY_TIMEOUT))
        .map_err(|e| broken(e.to_string()))?;
    let mut bytes = serde_json::to_vec(req).map_err(|e| broken(e.to_string()))?;
    bytes.push(b'\n');
    conn.write_all(&bytes)
        .map_err(|e| broken(format!("did not take the request: {e}")))?;
    let mut line = String::new();
    BufReader::new((&conn).take(MAX_LINE))
        .read_line(&mut line)
        .map_err(|e| broken(format!("did not answer: {e}")))?;
    match serde_json::from_str::<Reply>(&line) {
        Ok(Reply::Ok) => Ok(()),
        Ok(Reply::Error(why)) => Err(Error::Other(why)),
        Err(_) if line.is_empty() => Err(broken("hung up without an answer".into())),
        Err(e) => Err(broken(format!("answered nonsense: {e}"))),
    }
}
