//! A fake, read-only OCI distribution registry for the `microvm pull` tests.
//!
//! [`FakeRegistry::start`] serves the content of one OCI image layout directory (`index.json`,
//! `blobs/sha256/<hex>`) under any repository name on `127.0.0.1`, with the faults of
//! [`Faults`] switched on: bearer auth, corrupt or cut-short blobs, 429s, redirects to a second
//! blob server and a replaced manifest. Every request is recorded ([`FakeRegistry::requests`]).
//! Each request is handled on its own thread, so clients may download in parallel.
//!
//! A dropped connection (see [`Faults::drop_blob`]) is made by sending the announced
//! `Content-Length` with a short body and then shutting the TCP socket down: tiny_http would
//! otherwise keep the connection open for the next request and the client would wait forever.
//! The socket is found in `/proc/self/fd` by its addresses (Linux only).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Cursor, Read, Seek, SeekFrom};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{BorrowedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use sha2::{Digest, Sha256};
use tiny_http::{Header, Response, Server, StatusCode};

/// The media type of an OCI image manifest, the default for manifests without one.
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// The faults a [`FakeRegistry`] injects; `Faults::default()` is a well-behaved registry.
#[derive(Debug, Default, Clone)]
pub struct Faults {
    /// Require bearer tokens: `/v2/...` answers 401 with `WWW-Authenticate: Bearer
    /// realm="http://127.0.0.1:PORT/token",service="fake-registry",scope="repository:NAME:pull"`
    /// (scope only on repository URLs); `GET /token?service=..&scope=..` checks that the HTTP
    /// Basic credentials equal this (user, password) (401 otherwise, also without credentials)
    /// and returns `{"token": T, "expires_in": 300}`; requests with `Authorization: Bearer T`
    /// pass. Tokens never expire unless `token_uses` says otherwise.
    pub bearer: Option<(String, String)>,
    /// With `bearer`: each token authorises this many requests, then is refused with a new
    /// challenge, as an expired token is (0: any number).
    pub token_uses: usize,
    /// Serve this blob (digest `"sha256:..."`) with its middle byte flipped (same length): a
    /// registry lying about a digest. Applies to Range requests covering that byte too.
    pub corrupt_blob: Option<String>,
    /// (digest, bytes, times): the first `times` GETs of this blob (Range GETs too) announce
    /// their full Content-Length, send only `bytes` bytes of the body and then close the
    /// connection. Later GETs are served normally.
    pub drop_blob: Option<(String, u64, usize)>,
    /// The first `n` blob GETs (any blob) are answered 429 Too Many Requests, `Retry-After: 1`.
    pub too_many: usize,
    /// Blob GETs on the registry are answered `307 Temporary Redirect` to
    /// `http://127.0.0.1:<blob_port>/blobs/<digest>?sig=x`, served by a second server (with
    /// Range support, the drop and corrupt faults, no auth, no 429) whose requests are recorded
    /// too. Blob HEADs are answered directly.
    pub redirect_blobs: bool,
    /// (body, media type): served for every tag instead of the layout's manifest (e.g. an index
    /// built by the test, or invalid JSON); a request for its digest gets it too.
    pub manifest_override: Option<(Vec<u8>, String)>,
}

/// One request as the fake registry answered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `"registry"` or `"blobs"` (the redirect target server).
    pub server: &'static str,
    /// `GET`, `HEAD`, ...
    pub method: String,
    /// The path and query, as sent.
    pub url: String,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
    /// The `Range` header, if any.
    pub range: Option<String>,
    /// The status answered.
    pub status: u16,
    /// Body bytes handed to the connection so far (0 for HEAD).
    pub body_bytes: u64,
}

/// A running fake registry; dropping it stops its servers.
pub struct FakeRegistry {
    /// The registry's port on 127.0.0.1.
    pub port: u16,
    /// The redirect target server's port, with [`Faults::redirect_blobs`].
    pub blob_port: Option<u16>,
    state: Arc<State>,
    servers: Vec<Arc<Server>>,
    threads: Vec<JoinHandle<()>>,
}

/// What the request threads share.
struct State {
    blobs: PathBuf,
    /// tag -> (digest, media type), from index.json.
    tags: HashMap<String, (String, String)>,
    faults: Faults,
    override_digest: Option<String>,
    port: u16,
    blob_port: Option<u16>,
    log: Mutex<Vec<(Request, Arc<AtomicU64>)>>,
    /// Issued tokens and how many more requests each may authorise (`usize::MAX`: any).
    tokens: Mutex<HashMap<String, usize>>,
    too_many_left: AtomicUsize,
    drops_left: AtomicUsize,
}

/// An answer before it is sent: status, headers, announced length and body.
struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    len: u64,
    body: Body,
    /// Close the connection once the (short) body is sent.
    close: bool,
}

/// A response body: `inner` yields the bytes from blob offset `pos`; reading stops at `stop`,
/// flips the byte at offset `flip` and counts what it yields into `sent`.
struct Body {
    inner: Box<dyn Read + Send>,
    pos: u64,
    stop: u64,
    flip: Option<u64>,
    sent: Arc<AtomicU64>,
}

impl Read for Body {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let room = (self.stop.saturating_sub(self.pos)).min(buf.len() as u64) as usize;
        if room == 0 {
            return Ok(0); // a short body ends cleanly: tiny_http then flushes what was sent
        }
        let n = self.inner.read(&mut buf[..room])?;
        if let Some(at) = self.flip.map(|f| f.wrapping_sub(self.pos)) {
            if at < n as u64 {
                buf[at as usize] ^= 0xff;
            }
        }
        self.pos += n as u64;
        self.sent.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

impl Body {
    fn new(inner: impl Read + Send + 'static, pos: u64, stop: u64, flip: Option<u64>) -> Body {
        let (inner, sent) = (Box::new(inner), Arc::default());
        Body {
            inner,
            pos,
            stop,
            flip,
            sent,
        }
    }
}

impl Reply {
    fn bytes(status: u16, content_type: &str, data: Vec<u8>) -> Reply {
        let headers = vec![("Content-Type", content_type.into())];
        let len = data.len() as u64;
        let body = Body::new(Cursor::new(data), 0, len, None);
        Reply {
            status,
            headers,
            len,
            body,
            close: false,
        }
    }

    /// A distribution-spec error: `{"errors":[{"code":..,"message":..}]}`.
    fn error(status: u16, code: &str, message: &str) -> Reply {
        let body = serde_json::json!({"errors": [{"code": code, "message": message}]});
        Reply::bytes(status, "application/json", body.to_string().into_bytes())
    }

    fn header(mut self, name: &'static str, value: String) -> Reply {
        self.headers.push((name, value));
        self
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn header(rq: &tiny_http::Request, name: &'static str) -> Option<String> {
    let found = rq.headers().iter().find(|h| h.field.equiv(name));
    found.map(|h| h.value.as_str().to_string())
}

/// The value of `rq`'s Authorization header after `scheme` (`"Bearer "`, `"Basic "`).
fn credentials(rq: &tiny_http::Request, scheme: &str) -> Option<String> {
    let value = header(rq, "Authorization")?;
    Some(value.strip_prefix(scheme)?.trim().to_string())
}

/// Takes one from `counter` if it is not 0 yet.
fn take_one(counter: &AtomicUsize) -> bool {
    let (sub, order) = (|n: usize| n.checked_sub(1), Ordering::SeqCst);
    counter.fetch_update(order, order, sub).is_ok()
}

fn sha256(data: &[u8]) -> String {
    let mut digest = String::from("sha256:");
    for b in Sha256::digest(data) {
        digest.push_str(&format!("{b:02x}"));
    }
    digest
}

/// Parses a `Range` header against a blob of `total` bytes: `Ok(None)` to ignore it (not a
/// single byte range), `Ok(Some((start, end)))` (end exclusive), `Err(())` if unsatisfiable.
fn parse_range(value: &str, total: u64) -> Result<Option<(u64, u64)>, ()> {
    let spec = value.trim().strip_prefix("bytes=");
    let Some((a, b)) = spec.and_then(|s| s.split_once('-')) else {
        return Ok(None);
    };
    let (a, b) = (a.trim(), b.trim());
    let (start, last) = match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(s), _) if b.is_empty() => (s, u64::MAX),
        (Ok(s), Ok(e)) if e >= s => (s, e),
        (Err(_), Ok(n)) if a.is_empty() && n > 0 => (total.saturating_sub(n), u64::MAX),
        _ => return Ok(None),
    };
    if start >= total {
        return Err(());
    }
    Ok(Some((start, last.min(total - 1) + 1)))
}

/// Shuts down this process's TCP socket from local port `port` to `peer`, found by scanning
/// `/proc/self/fd`: the only way to cut a tiny_http connection short.
fn close_connection(port: u16, peer: SocketAddr) {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let fd = name.to_str().and_then(|s| s.parse::<RawFd>().ok());
        let link = std::fs::read_link(entry.path()).unwrap_or_default();
        let (Some(fd), true) = (fd, link.to_string_lossy().starts_with("socket:")) else {
            continue;
        };
        // SAFETY: the fd was open a moment ago and is only duplicated here; should another
        // thread have reused its number, the addresses below do not match.
        let Ok(dup) = unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned() else {
            continue;
        };
        let stream = TcpStream::from(dup);
        let local = stream.local_addr().map(|a| a.port());
        if stream.peer_addr().ok() == Some(peer) && local.ok() == Some(port) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

impl State {
    /// The path of blob `digest`, if it is a well-formed sha256 digest of an existing blob.
    fn blob_path(&self, digest: &str) -> Option<PathBuf> {
        let hex = digest.strip_prefix("sha256:")?;
        let well_formed = hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit());
        let path = self.blobs.join(hex);
        (well_formed && path.is_file()).then_some(path)
    }

    fn authorized(&self, rq: &tiny_http::Request) -> bool {
        if self.faults.bearer.is_none() {
            return true;
        }
        let Some(token) = credentials(rq, "Bearer ") else {
            return false;
        };
        let mut tokens = lock(&self.tokens);
        match tokens.get_mut(&token) {
            Some(0) | None => false,
            Some(left) => {
                if *left != usize::MAX {
                    *left -= 1; // an expiring token: the client must fetch another
                }
                true
            }
        }
    }

    fn token(&self, rq: &tiny_http::Request) -> Reply {
        let Some((user, password)) = &self.faults.bearer else {
            return Reply::error(404, "UNSUPPORTED", "no token service");
        };
        let basic = credentials(rq, "Basic ")
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok());
        if basic != Some(format!("{user}:{password}").into_bytes()) {
            return Reply::error(401, "UNAUTHORIZED", "bad credentials")
                .header("WWW-Authenticate", "Basic realm=\"fake-registry\"".into());
        }
        let mut tokens = lock(&self.tokens);
        let now = SystemTime::now().duration_since(UNIX_EPOCH);
        let nanos = now.unwrap_or_default().as_nanos();
        let token = format!("fake-{}-{nanos:x}", tokens.len());
        let uses = match self.faults.token_uses {
            0 => usize::MAX,
            n => n,
        };
        tokens.insert(token.clone(), uses);
        let body = serde_json::json!({"token": token, "expires_in": 300});
        Reply::bytes(200, "application/json", body.to_string().into_bytes())
    }

    fn route(&self, server: &'static str, rq: &tiny_http::Request) -> Reply {
        let path = rq.url().split('?').next().unwrap_or_default();
        let method = rq.method().as_str();
        if method != "GET" && method != "HEAD" {
            return Reply::error(405, "UNSUPPORTED", "the fake registry is read-only");
        }
        if server == "blobs" {
            return match path.strip_prefix("/blobs/") {
                Some(digest) => self.blob(server, rq, digest),
                None => Reply::error(404, "NOT_FOUND", "no such path"),
            };
        }
        if path == "/token" {
            return self.token(rq);
        }
        let Some(rest) = path.strip_prefix("/v2/").or((path == "/v2").then_some("")) else {
            return Reply::error(404, "NOT_FOUND", "no such path");
        };
        let manifest = rest.rsplit_once("/manifests/").map(|(n, r)| (n, r, true));
        let repo = manifest.or(rest.rsplit_once("/blobs/").map(|(n, r)| (n, r, false)));
        let repo = repo.filter(|(name, reference, _)| !name.is_empty() && !reference.is_empty());
        if !self.authorized(rq) {
            let mut challenge = format!(
                "Bearer realm=\"http://127.0.0.1:{}/token\",service=\"fake-registry\"",
                self.port
            );
            if let Some((name, _, _)) = repo {
                challenge += &format!(",scope=\"repository:{name}:pull\"");
            }
            return Reply::error(401, "UNAUTHORIZED", "authentication required")
                .header("WWW-Authenticate", challenge);
        }
        match repo {
            _ if rest.is_empty() => Reply::bytes(200, "application/json", b"{}".to_vec()),
            Some((_, reference, true)) => self.manifest(reference),
            Some((_, digest, false)) => self.blob(server, rq, digest),
            None => Reply::error(404, "NAME_UNKNOWN", "no such path"),
        }
    }

    fn manifest(&self, reference: &str) -> Reply {
        let read = |digest: &str| std::fs::read(self.blob_path(digest)?).ok();
        let by_digest = reference.starts_with("sha256:");
        let overridden = self.faults.manifest_override.as_ref();
        let overridden =
            overridden.filter(|_| !by_digest || self.override_digest.as_deref() == Some(reference));
        let found = if let Some(overridden) = overridden {
            Some(overridden.clone())
        } else if let Some((digest, media_type)) = self.tags.get(reference) {
            read(digest).map(|data| (data, media_type.clone()))
        } else {
            read(reference).map(|data| {
                let json: serde_json::Value = serde_json::from_slice(&data).unwrap_or_default();
                let media_type = json["mediaType"].as_str().unwrap_or(OCI_MANIFEST);
                (data, media_type.to_string())
            })
        };
        match found {
            Some((data, media_type)) => {
                let digest = sha256(&data);
                Reply::bytes(200, &media_type, data).header("Docker-Content-Digest", digest)
            }
            None => Reply::error(404, "MANIFEST_UNKNOWN", "manifest unknown"),
        }
    }

    fn blob(&self, server: &'static str, rq: &tiny_http::Request, digest: &str) -> Reply {
        let file = self.blob_path(digest).and_then(|p| File::open(p).ok());
        let total = file.as_ref().and_then(|f| Some(f.metadata().ok()?.len()));
        let (Some(mut file), Some(total)) = (file, total) else {
            return Reply::error(404, "BLOB_UNKNOWN", "blob unknown to registry");
        };
        let get = rq.method().as_str() == "GET";
        if server == "registry" && get && take_one(&self.too_many_left) {
            return Reply::error(429, "TOOMANYREQUESTS", "too many requests")
                .header("Retry-After", "1".into());
        }
        if let Some(port) = self.blob_port.filter(|_| server == "registry" && get) {
            let location = format!("http://127.0.0.1:{port}/blobs/{digest}?sig=x");
            return Reply::bytes(307, "text/plain", Vec::new()).header("Location", location);
        }
        let (mut start, mut end, mut status) = (0, total, 200);
        match header(rq, "Range").map(|r| parse_range(&r, total)) {
            Some(Err(())) => {
                return Reply::error(416, "RANGE_INVALID", "range not satisfiable")
                    .header("Content-Range", format!("bytes */{total}"));
            }
            Some(Ok(Some((s, e)))) => (start, end, status) = (s, e, 206),
            _ => (),
        }
        let mut stop = end;
        if let Some((d, bytes, _)) = &self.faults.drop_blob {
            if d == digest && get && take_one(&self.drops_left) {
                stop = start.saturating_add(*bytes).min(end);
            }
        }
        if file.seek(SeekFrom::Start(start)).is_err() {
            return Reply::error(500, "UNKNOWN", "cannot read blob");
        }
        let mut reply = Reply::bytes(status, "application/octet-stream", Vec::new())
            .header("Docker-Content-Digest", digest.to_string());
        if status == 206 {
            let content_range = format!("bytes {start}-{}/{total}", end - 1);
            reply = reply.header("Content-Range", content_range);
        }
        reply.len = end - start;
        reply.close = stop < end;
        let flip = (self.faults.corrupt_blob.as_deref() == Some(digest)).then_some(total / 2);
        reply.body = Body::new(file.take(end - start), start, stop, flip);
        reply
    }

    /// Answers one request, records it and closes the connection if the reply asks for it.
    fn handle(&self, server: &'static str, rq: tiny_http::Request) {
        let mut reply = self.route(server, &rq);
        let record = Request {
            server,
            method: rq.method().as_str().to_string(),
            url: rq.url().to_string(),
            authorization: header(&rq, "Authorization"),
            range: header(&rq, "Range"),
            status: reply.status,
            body_bytes: 0,
        };
        lock(&self.log).push((record, reply.body.sent.clone()));
        if server == "registry" {
            let api = "registry/2.0".to_string();
            reply.headers.push(("Docker-Distribution-API-Version", api));
        }
        let headers = reply.headers.iter();
        let headers =
            headers.filter_map(|(n, v)| Header::from_bytes(n.as_bytes(), v.as_bytes()).ok());
        let (status, len) = (StatusCode(reply.status), usize::try_from(reply.len).ok());
        let response = Response::new(status, headers.collect(), reply.body, len, None)
            // Else tiny_http sends bodies of 32 KiB and more chunked, without Content-Length.
            .with_chunked_threshold(usize::MAX);
        let peer = rq.remote_addr().copied();
        let _ = rq.respond(response);
        let port = [Some(self.port), self.blob_port][usize::from(server == "blobs")];
        if let (true, Some(port), Some(peer)) = (reply.close, port, peer) {
            close_connection(port, peer);
        }
    }
}

/// Serves `server`'s requests, each on a thread of its own, until it is unblocked. The request
/// threads are not joined: one still writing to a client that stopped reading must not hang
/// the test; it ends when the client goes away.
fn serve(server: Arc<Server>, state: Arc<State>, name: &'static str) -> JoinHandle<()> {
    thread::spawn(move || {
        while let Ok(rq) = server.recv() {
            let state = state.clone();
            thread::spawn(move || state.handle(name, rq));
        }
    })
}

impl FakeRegistry {
    /// Serves the OCI image layout at `layout` on a free port of 127.0.0.1 with `faults`.
    /// Panics if the layout's index.json cannot be read or the servers cannot start.
    pub fn start(layout: &Path, faults: Faults) -> FakeRegistry {
        let index = std::fs::read(layout.join("index.json")).expect("read the layout's index.json");
        let index: serde_json::Value = serde_json::from_slice(&index).expect("parse index.json");
        let manifests = index["manifests"].as_array().cloned().unwrap_or_default();
        let mut tags = HashMap::new();
        for m in &manifests {
            let name = m["annotations"]["org.opencontainers.image.ref.name"].as_str();
            let name = name.or((manifests.len() == 1).then_some("latest"));
            if let (Some(name), Some(digest)) = (name, m["digest"].as_str()) {
                let media_type = m["mediaType"].as_str().unwrap_or(OCI_MANIFEST).to_string();
                tags.insert(name.to_string(), (digest.to_string(), media_type));
            }
        }
        let bind = || Arc::new(Server::http("127.0.0.1:0").expect("start a tiny_http server"));
        let port_of = |s: &Server| s.server_addr().to_ip().map_or(0, |a| a.port());
        let mut servers = vec![bind()];
        if faults.redirect_blobs {
            servers.push(bind());
        }
        let port = port_of(&servers[0]);
        let blob_port = servers.get(1).map(|s| port_of(s));
        let state = Arc::new(State {
            blobs: layout.join("blobs/sha256"),
            tags,
            override_digest: faults.manifest_override.as_ref().map(|(d, _)| sha256(d)),
            port,
            blob_port,
            log: Mutex::default(),
            tokens: Mutex::default(),
            too_many_left: AtomicUsize::new(faults.too_many),
            drops_left: AtomicUsize::new(faults.drop_blob.as_ref().map_or(0, |d| d.2)),
            faults,
        });
        let serve_one = |(s, n): (&Arc<Server>, _)| serve(s.clone(), state.clone(), n);
        let names = ["registry", "blobs"];
        let threads = servers.iter().zip(names).map(serve_one).collect();
        FakeRegistry {
            port,
            blob_port,
            state,
            servers,
            threads,
        }
    }

    /// Every request answered so far, in the order they came in.
    pub fn requests(&self) -> Vec<Request> {
        let log = lock(&self.state.log);
        let with_bytes = |(r, sent): &(Request, Arc<AtomicU64>)| Request {
            body_bytes: sent.load(Ordering::Relaxed),
            ..r.clone()
        };
        log.iter().map(with_bytes).collect()
    }

    /// The registry's address, `127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for FakeRegistry {
    fn drop(&mut self) {
        for server in &self.servers {
            server.unblock();
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
