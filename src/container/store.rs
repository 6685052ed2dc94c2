//! Container records under `<data dir>/containers`: one directory per container named by its
//! 64-hex id (config, state, lock files, sandbox layer, log), and `.names/<name>` holding the id
//! that owns a name. A name is claimed by creating its file exclusively, so two `create`s racing
//! for one name cannot both win; a container directory appears by one rename, complete.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

use super::config::ContainerConfig;
use super::error::Error;
use super::names;
use super::state::{State, Status};

const NAMES: &str = ".names";
/// Orders name claims.
const NAMES_LOCK: &str = ".names.lock";
/// A name whose container directory is missing for this long is stale.
const STALE_NAME: Duration = Duration::from_secs(60);
const CONFIG: &str = "config.json";
const STATE: &str = "state.json";
/// Serialises commands on one container.
const LOCK: &str = "lock";
/// Held exclusively by the container's supervisor for as long as it lives: the kernel drops it
/// when the supervisor dies however it dies, so a free lock means no supervisor (no pid test,
/// which a reused pid would fool).
const SUPERVISOR_LOCK: &str = "supervisor.lock";
/// The sandbox layer: the container's writable disk, kept until the container is removed.
pub const SCRATCH: &str = "scratch.img";
/// What a detached supervisor itself prints (not the container's output).
pub const SUPERVISOR_LOG: &str = "supervisor.log";

/// The container records of one data directory.
#[derive(Debug, Clone)]
pub struct Containers {
    dir: PathBuf,
}

/// One container's record.
#[derive(Debug, Clone)]
pub struct Container {
    dir: PathBuf,
    names: PathBuf,
    /// What it was created with.
    pub config: ContainerConfig,
}

impl Containers {
    /// Opens (creating) `<data_dir>/containers`.
    pub fn open(data_dir: &Path) -> Result<Containers, Error> {
        let dir = data_dir.join("containers");
        let names = dir.join(NAMES);
        std::fs::create_dir_all(&names).map_err(Error::io("cannot create", &names))?;
        Ok(Containers { dir })
    }

    /// Creates a container: a fresh id, the name (`name`, else a generated one) claimed, then
    /// `make(id, name)`'s config and a `created` state in a directory that appears whole.
    pub fn create(
        &self,
        name: Option<&str>,
        make: impl FnOnce(String, String) -> ContainerConfig,
    ) -> Result<Container, Error> {
        let id = random_id()?;
        let name = match name {
            Some(n) => {
                let n = names::validate(n)?;
                self.claim(&n, &id)?;
                n
            }
            None => self.claim_generated(&id)?,
        };
        let names_path = self.dir.join(NAMES).join(&name);
        let result = (|| {
            let config = make(id.clone(), name.clone());
            let tmp = self.dir.join(format!(".tmp-{id}"));
            // Only its owner reaches its control socket, log and sandbox layer.
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&tmp)
                .map_err(Error::io("cannot create", &tmp))?;
            write_json(&tmp.join(CONFIG), &config)?;
            write_json(&tmp.join(STATE), &State::created())?;
            let dir = self.dir.join(&id);
            std::fs::rename(&tmp, &dir).map_err(Error::io("cannot create", &dir))?;
            Ok(Container {
                dir,
                names: self.dir.join(NAMES),
                config,
            })
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&names_path);
            let _ = std::fs::remove_dir_all(self.dir.join(format!(".tmp-{id}")));
        }
        result
    }

    /// Creates a container under an id the caller chose (an OCI runtime's: the engine names
    /// it), named after its id, without a name claim: the id itself is the only handle.
    /// `Error::NameInUse` if the id is taken. The caller checked the id is one path component
    /// that does not start with a dot.
    pub fn create_with_id(
        &self,
        id: &str,
        make: impl FnOnce(String, String) -> ContainerConfig,
    ) -> Result<Container, Error> {
        let dir = self.dir.join(id);
        let tmp = self.dir.join(format!(".tmp-{id}"));
        let taken = || Error::NameInUse {
            name: id.to_string(),
            id: id.to_string(),
        };
        if dir.exists() {
            return Err(taken());
        }
        let config = make(id.to_string(), id.to_string());
        // A directory made exclusively is the claim: two creates of one id cannot both pass.
        match std::fs::DirBuilder::new().mode(0o700).create(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(taken()),
            Err(e) => return Err(Error::io("cannot create", &tmp)(e)),
        }
        let result = (|| {
            write_json(&tmp.join(CONFIG), &config)?;
            write_json(&tmp.join(STATE), &State::created())?;
            // rename(2) onto an existing empty directory would succeed: check under the claim.
            if dir.exists() {
                return Err(taken());
            }
            std::fs::rename(&tmp, &dir).map_err(Error::io("cannot create", &dir))
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        Ok(Container {
            dir,
            names: self.dir.join(NAMES),
            config,
        })
    }

    /// The container with exactly this id (no name or prefix lookup).
    pub fn get(&self, id: &str) -> Result<Container, Error> {
        if id.is_empty() || id.starts_with('.') || id.contains('/') {
            return Err(Error::NotFound(id.to_string()));
        }
        self.load(id)
    }

    fn claim(&self, name: &str, id: &str) -> Result<(), Error> {
        // One claimer at a time: a stale name is only ever reclaimed by one of them.
        let _lock = lock_file(&self.dir.join(NAMES_LOCK), FlockArg::LockExclusive)?;
        self.claim_locked(name, id)
    }

    fn claim_locked(&self, name: &str, id: &str) -> Result<(), Error> {
        let path = self.dir.join(NAMES).join(name);
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(mut f) => f
                .write_all(id.as_bytes())
                .map_err(Error::io("cannot write", &path)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let owner = std::fs::read_to_string(&path).unwrap_or_default();
                // A name whose container is gone (a crash mid-`rm` or mid-`create`) is free
                // again; a young one may belong to a `create` still writing its directory.
                let old = std::fs::metadata(&path)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > STALE_NAME);
                let gone = ["", ".tmp-", ".removing-"]
                    .iter()
                    .all(|p| !self.dir.join(format!("{p}{owner}")).exists());
                if is_id(&owner) && gone && old {
                    std::fs::remove_file(&path).map_err(Error::io("cannot remove", &path))?;
                    return self.claim_locked(name, id);
                }
                Err(Error::NameInUse {
                    name: name.to_string(),
                    id: owner.chars().take(12).collect(),
                })
            }
            Err(e) => Err(Error::io("cannot create", path)(e)),
        }
    }

    fn claim_generated(&self, id: &str) -> Result<String, Error> {
        let mut last = None;
        for attempt in 0..64u64 {
            let seed =
                u64::from_str_radix(&id[..16], 16).unwrap_or(0) ^ attempt.wrapping_mul(0x9e37_79b9);
            let mut name = names::generate(seed);
            if attempt >= 32 {
                name = format!("{name}_{attempt}");
            }
            match self.claim(&name, id) {
                Ok(()) => return Ok(name),
                Err(e @ Error::NameInUse { .. }) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::Other("cannot generate a container name".into())))
    }

    /// A container by exact id, exact name, or unique id prefix (docker's order).
    pub fn resolve(&self, s: &str) -> Result<Container, Error> {
        let s = s.strip_prefix('/').unwrap_or(s);
        if s.is_empty() {
            return Err(Error::NotFound(String::new()));
        }
        if is_id(s) && self.dir.join(s).is_dir() {
            return self.load(s);
        }
        if names::validate(s).is_ok() {
            let path = self.dir.join(NAMES).join(s);
            if let Ok(id) = std::fs::read_to_string(&path) {
                if is_id(&id) && self.dir.join(&id).is_dir() {
                    return self.load(&id);
                }
            }
        }
        if s.len() < 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
            let hits: Vec<String> = self
                .ids()?
                .into_iter()
                .filter(|id| id.starts_with(s))
                .collect();
            match hits.as_slice() {
                [one] => return self.load(one),
                [] => {}
                _ => return Err(Error::Ambiguous(s.to_string())),
            }
        }
        Err(Error::NotFound(s.to_string()))
    }

    /// Every container, newest first.
    pub fn list(&self) -> Result<Vec<Container>, Error> {
        self.list_matching(is_id)
    }

    /// Every container of an OCI runtime's store (ids the engines chose), newest first.
    pub fn list_any_id(&self) -> Result<Vec<Container>, Error> {
        self.list_matching(|n| !n.starts_with('.'))
    }

    fn list_matching(&self, keep: impl Fn(&str) -> bool) -> Result<Vec<Container>, Error> {
        let entries = std::fs::read_dir(&self.dir).map_err(Error::io("cannot read", &self.dir))?;
        let ids = entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| keep(n));
        let mut all = Vec::new();
        for id in ids {
            match self.load(&id) {
                Ok(c) => all.push(c),
                // Removed between listing and reading.
                Err(Error::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        all.sort_by(|a, b| b.config.created.total_cmp(&a.config.created));
        Ok(all)
    }

    fn ids(&self) -> Result<Vec<String>, Error> {
        let entries = std::fs::read_dir(&self.dir).map_err(Error::io("cannot read", &self.dir))?;
        Ok(entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| is_id(n))
            .collect())
    }

    fn load(&self, id: &str) -> Result<Container, Error> {
        let dir = self.dir.join(id);
        let path = dir.join(CONFIG);
        let config: ContainerConfig = match read_json(&path) {
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotFound(id.to_string()))
            }
            other => other?,
        };
        Ok(Container {
            dir,
            names: self.dir.join(NAMES),
            config,
        })
    }
}

impl Container {
    /// The container's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The sandbox layer's disk image.
    pub fn scratch(&self) -> PathBuf {
        self.dir.join(SCRATCH)
    }

    /// Takes the container's command lock, waiting for another command to finish with it.
    pub fn lock(&self) -> Result<Flock<File>, Error> {
        lock_file(&self.dir.join(LOCK), FlockArg::LockExclusive)
    }

    /// Takes the supervisor lock for this process, for as long as the returned guard lives.
    pub fn become_supervisor(&self) -> Result<Flock<File>, Error> {
        lock_file(
            &self.dir.join(SUPERVISOR_LOCK),
            FlockArg::LockExclusiveNonblock,
        )
        .map_err(|_| Error::Busy {
            name: self.config.name.clone(),
            state: "running",
            hint: "it already has a supervisor",
        })
    }

    /// Whether a supervisor holds the container.
    pub fn supervisor_alive(&self) -> bool {
        let Ok(file) = File::open(self.dir.join(SUPERVISOR_LOCK)) else {
            return false;
        };
        Flock::lock(file, FlockArg::LockSharedNonblock).is_err()
    }

    /// Waits until no supervisor holds the container; false if `timeout` passed first.
    pub fn wait_supervisor(&self, timeout: Option<Duration>) -> bool {
        let start = Instant::now();
        while self.supervisor_alive() {
            if timeout.is_some_and(|t| start.elapsed() >= t) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// The state as recorded; a run whose supervisor is gone without saying so shows as
    /// exited, with the reason.
    pub fn state(&self) -> Result<State, Error> {
        // Liveness first: a supervisor writes its last state before its lock goes, so a state
        // read after finding the lock free is final.
        let alive = self.supervisor_alive();
        let mut state: State = read_json(&self.dir.join(STATE))?;
        let live_status = matches!(state.status, Status::Running | Status::Paused)
            || (state.status == Status::Created && state.supervisor_pid.is_some());
        if !alive && live_status {
            state.status = Status::Exited;
            state.exit_code = Some(state.exit_code.unwrap_or(137));
            state.error = Some(format!(
                "its supervisor (pid {}) died (killed, or out of memory), and its VM with it",
                state.supervisor_pid.unwrap_or(0)
            ));
        }
        Ok(state)
    }

    /// Records `state` (atomically: readers see the old or the new record, never half).
    pub fn write_state(&self, state: &State) -> Result<(), Error> {
        write_json(&self.dir.join(STATE), state)
    }

    /// Whether its process runs (or its VM is booting): a live supervisor.
    pub fn is_running(&self) -> bool {
        self.supervisor_alive()
    }

    /// Removes the record, its sandbox layer and log, and a run directory a killed supervisor
    /// left. The caller has made sure no supervisor lives.
    pub fn remove(&self) -> Result<(), Error> {
        if let Ok(State {
            run_dir: Some(run_dir),
            ..
        }) = read_json::<State>(&self.dir.join(STATE))
        {
            if run_dir.starts_with(crate::host::runtime_dir()) {
                let _ = std::fs::remove_dir_all(&run_dir);
            }
        }
        // Out of sight first, so that a crash midway leaves no half container in `ps`.
        let parent = self.dir.parent().unwrap_or(Path::new("/"));
        let gone = parent.join(format!(".removing-{}", self.config.id));
        match std::fs::rename(&self.dir, &gone) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io("cannot remove", &self.dir)(e)),
        }
        let name = self.names.join(&self.config.name);
        if std::fs::read_to_string(&name).is_ok_and(|id| id == self.config.id) {
            let _ = std::fs::remove_file(&name);
        }
        std::fs::remove_dir_all(&gone).map_err(Error::io("cannot remove", &gone))
    }
}

/// Opens (creating) the lock file `path` and takes `how` on it.
fn lock_file(path: &Path, how: FlockArg) -> Result<Flock<File>, Error> {
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(Error::io("cannot open", path))?;
    Flock::lock(file, how).map_err(|(_, e)| Error::io("cannot lock", path)(e.into()))
}

fn is_id(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

fn random_id() -> Result<String, Error> {
    let mut bytes = [0u8; 32];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(Error::io("cannot read", "/dev/urandom"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, Error> {
    let bytes = std::fs::read(path).map_err(Error::io("cannot read", path))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Damaged {
        path: path.to_owned(),
        why: e.to_string(),
    })
}

fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), Error> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| Error::Other(e.to_string()))?;
    std::fs::write(&tmp, bytes).map_err(Error::io("cannot write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(Error::io("cannot write", path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::config::{ProcessConfig, RootSource};

    fn config(id: String, name: String) -> ContainerConfig {
        ContainerConfig {
            id,
            name,
            created: super::super::state::now(),
            root: RootSource::Directory("/".into()),
            process: ProcessConfig::default(),
            hostname: String::new(),
            volumes: Vec::new(),
            hypervisor: crate::backend::Hypervisor::Qemu,
            kernel: "/k".into(),
            cpus: 1,
            memory_mib: 256,
            timeout: None,
            stop_signal: 15,
            auto_remove: false,
            guest_mounts: Vec::new(),
            devices: Vec::new(),
            wait_start: false,
            network: Default::default(),
            storage_size: None,
        }
    }

    fn store(tag: &str) -> (PathBuf, Containers) {
        let dir =
            std::env::temp_dir().join(format!("microvm-containers-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let c = Containers::open(&dir).unwrap();
        (dir, c)
    }

    #[test]
    fn names_ids_and_prefixes_resolve_like_docker() {
        let (dir, store) = store("resolve");
        let a = store.create(Some("web"), config).unwrap();
        let b = store.create(None, config).unwrap();
        assert_eq!(a.config.id.len(), 64);
        assert_ne!(a.config.id, b.config.id);
        assert_eq!(store.resolve("web").unwrap().config.id, a.config.id);
        assert_eq!(store.resolve(&a.config.id).unwrap().config.name, "web");
        assert_eq!(
            store.resolve(&b.config.name).unwrap().config.id,
            b.config.id
        );
        assert_eq!(
            store.resolve(&a.config.id[..12]).unwrap().config.id,
            a.config.id
        );
        assert!(matches!(store.resolve("nope"), Err(Error::NotFound(_))));
        // Every id starts with some hex digit: the empty-ish prefix "" is refused, and a
        // one-digit prefix shared by both is ambiguous when they share it.
        if a.config.id[..1] == b.config.id[..1] {
            assert!(matches!(
                store.resolve(&a.config.id[..1]),
                Err(Error::Ambiguous(_))
            ));
        }
        let e = store.create(Some("web"), config).unwrap_err();
        assert!(matches!(e, Error::NameInUse { .. }), "{e}");
        assert!(e.to_string().contains(&a.config.id[..12]), "{e}");
        assert!(store.create(Some("bad name"), config).is_err());
        assert_eq!(store.list().unwrap().len(), 2);
        a.remove().unwrap();
        assert!(matches!(store.resolve("web"), Err(Error::NotFound(_))));
        // The name is free again.
        store.create(Some("web"), config).unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn names_stay_unique_under_concurrent_creates() {
        let (dir, store) = store("race");
        let winners: usize = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| s.spawn(|| store.create(Some("one"), config).is_ok()))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap() as usize).sum()
        });
        assert_eq!(winners, 1);
        assert_eq!(store.list().unwrap().len(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn chosen_ids_are_created_once_under_concurrent_creates() {
        let (dir, store) = store("ids");
        let winners: usize = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| s.spawn(|| store.create_with_id("engine-id", config).is_ok()))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap() as usize).sum()
        });
        assert_eq!(winners, 1);
        let c = store.get("engine-id").unwrap();
        assert_eq!(c.config.name, "engine-id");
        assert_eq!(store.list_any_id().unwrap().len(), 1);
        assert!(matches!(store.get("../x"), Err(Error::NotFound(_))));
        c.remove().unwrap();
        assert!(
            store.create_with_id("engine-id", config).is_ok(),
            "free again"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_dead_supervisor_shows_as_exited_with_its_reason() {
        let (dir, store) = store("dead");
        let c = store.create(Some("x"), config).unwrap();
        let mut s = c.state().unwrap();
        assert_eq!(s.status, Status::Created);
        {
            let _guard = c.become_supervisor().unwrap();
            assert!(c.supervisor_alive());
            assert!(c.become_supervisor().is_err(), "one supervisor at a time");
            s.status = Status::Running;
            s.supervisor_pid = Some(4242);
            c.write_state(&s).unwrap();
            assert_eq!(c.state().unwrap().status, Status::Running);
        }
        let s = c.state().unwrap();
        assert_eq!(s.status, Status::Exited);
        assert!(s.error.unwrap().contains("pid 4242"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
