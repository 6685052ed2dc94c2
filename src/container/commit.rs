//! `commit`: a container's sandbox layer as a new image. The diff is made inside a VM, never by
//! mounting the guest-written disk on the host: the running container's own (its processes
//! stopped meanwhile unless asked not to), or, for a container that is not running, a short VM
//! that mounts the layer read-only. It streams to the host, which checks it like any layer while
//! storing it, and names the image only once the guest said the diff is complete.

use std::io::Read;

use super::config::RootSource;
use super::error::Error;
use super::launch::{Launch, Observer};
use super::state::Status;
use super::store::Container;
use crate::agent::{self, HostIo, Outcome};
use crate::image::{CommitOptions, Image, Store};

/// Largest error text kept from the guest.
const MAX_ERROR: u64 = 4096;

struct Quiet;
impl Observer for Quiet {}

/// Commits `c`'s changes as image `name` on top of its image; `pause` stops its processes while
/// a running container's diff is taken.
pub fn commit(
    c: &Container,
    name: &str,
    opts: &CommitOptions,
    pause: bool,
) -> Result<Image, Error> {
    let RootSource::Image { reference, digest } = &c.config.root else {
        return Err(Error::Other(format!(
            "container {} runs from a --rootfs directory: it has no sandbox layer to commit",
            c.config.name
        )));
    };
    crate::image::check_name(name).map_err(|e| Error::Other(e.to_string()))?;
    let store = Store::open(&crate::host::data_dir()).map_err(|e| Error::Other(e.to_string()))?;
    let base = store.resolve(digest).map_err(|_| {
        Error::Other(format!(
            "the container's image {reference} ({digest}) is no longer in the image store: load it again to commit"
        ))
    })?;
    let _lock = c.lock()?;
    let (reader, writer) = std::io::pipe().map_err(Error::io("cannot make a pipe in", c.dir()))?;
    let (err_reader, err_writer) =
        std::io::pipe().map_err(Error::io("cannot make a pipe in", c.dir()))?;
    let io = HostIo {
        stdin: Box::new(std::io::empty()),
        stdout: Box::new(writer),
        stderr: Box::new(err_writer),
    };
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = err_reader.take(MAX_ERROR).read_to_string(&mut text);
        text
    });
    let name_c = c.config.name.clone();
    let state = c.state()?;
    let guest = if c.is_running() {
        let socket = match (state.status, state.run_dir) {
            (Status::Running, Some(dir)) => dir.join("vsock.sock"),
            (Status::Paused, _) => {
                return Err(Error::Busy {
                    name: name_c,
                    state: "paused",
                    hint: "unpause it first (commit pauses its processes itself)",
                })
            }
            _ => return Err(Error::NotRunning(name_c)),
        };
        std::thread::spawn(move || match agent::exec::diff(&socket, pause, io) {
            Ok(Outcome::Exited(s)) if s.as_shell_code() == 0 => Ok(()),
            Ok(_) => Err(None),
            Err(e) => Err(Some(e.to_string())),
        })
    } else if !c.scratch().exists() {
        return Err(Error::Other(format!(
            "container {name_c} has never run: it has no changes to commit"
        )));
    } else {
        let launch = Launch::diff(c)?;
        std::thread::spawn(move || {
            let ended = launch.execute(io, &Quiet);
            match (ended.process_exited, ended.code) {
                (true, 0) => Ok(()),
                (true, _) => Err(None),
                _ => Err(ended.error),
            }
        })
    };
    // The guest writes the stream: no diff of a sandbox layer is larger than twice its size,
    // and a stream that is cut there fails as a truncated tar.
    let bound = c.config.sandbox_size().saturating_mul(2);
    let stored = store.commit(&base, reader.take(bound), opts);
    let finished = guest
        .join()
        .unwrap_or_else(|_| Err(Some("the diff relay panicked".into())));
    let guest_said = errors.join().unwrap_or_default();
    let manifest = match (stored, finished) {
        (Ok(m), Ok(())) => m,
        // The host's own checks speak first: a hostile or unreadable diff, a full disk.
        (Err(e), _) => return Err(Error::Other(format!("commit of {name_c}: {e}"))),
        (Ok(_), Err(why)) => {
            let why = why
                .or_else(|| (!guest_said.trim().is_empty()).then(|| guest_said.trim().to_string()))
                .unwrap_or_else(|| "the guest did not finish the diff".into());
            return Err(Error::Other(format!("commit of {name_c}: {why}")));
        }
    };
    store
        .name_image(name, &manifest)
        .map_err(|e| Error::Other(e.to_string()))
}
