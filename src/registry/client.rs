//! HTTP to one registry, over ureq (rustls): the `/v2/` handshake that finds the scheme and the
//! authentication the registry wants, bearer tokens fetched for a scope (and fetched again when
//! they expire), basic auth, redirects followed by hand so that credentials go only to the
//! registry's own origin, and 429/5xx answers retried with backoff a bounded number of times.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use ureq::http::{self, Method, Response, StatusCode, Uri};
use ureq::{Agent, Body};

use super::auth::{parse_challenge, Challenge, Credentials};
use super::reference::is_loopback;
use super::url::{encode, resolve, same_origin, strip_query};
use super::{tls, Error, Reference};

/// How many times one request is sent when the registry answers 429 or 5xx, or the connection
/// fails after the handshake worked.
const MAX_ATTEMPTS: u32 = 5;
/// Longest wait between attempts, whatever `Retry-After` says.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Fresh tokens asked for within one request before its 401 is final.
const MAX_REAUTHENTICATIONS: u32 = 3;
/// Redirect hops followed for one request.
const MAX_REDIRECTS: usize = 5;
/// Longest wait for one read or write on a connection.
pub(crate) const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a small document (manifest, config, token, error) may take to arrive whole.
const DOCUMENT_DEADLINE: Duration = Duration::from_secs(300);
/// Largest error body or token response read.
const MAX_SMALL_BODY: u64 = 256 << 10;

/// How to reach a registry.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// `Some(false)`: TLS without verification, or plain HTTP (podman's `--tls-verify=false`);
    /// `None`: verified TLS except to localhost and 127.0.0.1 (docker's default).
    pub tls_verify: Option<bool>,
    /// Where the registry's CA certificates and client certificate are (podman's `--cert-dir`).
    pub cert_dir: Option<PathBuf>,
}

/// A request body that can be sent again on a retry.
#[derive(Clone, Copy)]
pub(crate) enum Payload<'a> {
    /// No body.
    Empty,
    /// Bytes in memory.
    Bytes(&'a [u8]),
    /// A whole file, reopened for each attempt.
    File(&'a Path),
}

/// A connection to one registry, shared by the threads of one pull or push.
pub(crate) struct Client {
    /// For the registry's own origin: its TLS settings (certs.d CAs, client certificate,
    /// verification off when allowed).
    agent: Agent,
    /// For every other origin (token realms, blob storage): the system's CAs, verified, unless
    /// the user turned verification off outright.
    elsewhere: Agent,
    /// `--tls-verify=false` was given.
    insecure: bool,
    /// `https://HOST[:PORT]` or `http://...`.
    base: String,
    /// The registry as the user named it, for messages.
    registry: String,
    creds: Option<Credentials>,
    /// The scope tokens are asked for (`repository:NAME:pull`), if any.
    scope: Option<String>,
    /// The `Authorization` value sent to the registry's origin, once known.
    auth: Mutex<Option<String>>,
}

impl Client {
    /// Reaches `registry` (its API at `api_host`) and works out its scheme and authentication.
    /// Plain HTTP is allowed only when TLS is not verified (`loopback` registries by default).
    pub(crate) fn connect(
        registry: &str,
        api_host: &str,
        loopback: bool,
        scope: Option<String>,
        creds: Option<Credentials>,
        opts: &Options,
    ) -> Result<Client, Error> {
        let verify = opts.tls_verify.unwrap_or(!loopback);
        let insecure = opts.tls_verify == Some(false);
        let agent = agent(tls::config(registry, verify, opts.cert_dir.as_deref())?);
        let elsewhere = if insecure {
            agent.clone()
        } else {
            self::agent(tls::system()?)
        };
        let make = |scheme: &str| Client {
            agent: agent.clone(),
            elsewhere: elsewhere.clone(),
            insecure,
            base: format!("{scheme}://{api_host}"),
            registry: registry.to_string(),
            creds: creds.clone(),
            scope: scope.clone(),
            auth: Mutex::new(None),
        };
        if verify {
            let client = make("https");
            client.handshake()?;
            return Ok(client);
        }
        // Unverified TLS first, then plain HTTP when the TLS handshake fails, as docker does
        // for an insecure registry. On loopback the order is reversed: nothing leaves the
        // host, and a plain server there (a test's, say) may never answer a TLS hello, while a
        // TLS one answers plain HTTP at once with a 400 (Go's, nginx's).
        let order = if loopback {
            ["http", "https"]
        } else {
            ["https", "http"]
        };
        let first = make(order[0]);
        let first_failure = match first.handshake() {
            Ok(()) => return Ok(first),
            Err(e @ Error::Unauthorized { .. }) => return Err(e),
            Err(e @ Error::Unreachable { .. }) if order[0] == "https" => return Err(e),
            Err(e) => e,
        };
        let second = make(order[1]);
        match second.handshake() {
            Ok(()) => Ok(second),
            Err(Error::Unreachable { .. } | Error::TlsFailed { .. }) => Err(first_failure),
            Err(e) => Err(e),
        }
    }

    /// Reaches the registry `r` names with the stored credentials for its repository, for
    /// pulling (and pushing, with `push`).
    pub(crate) fn for_reference(
        r: &Reference,
        push: bool,
        opts: &Options,
    ) -> Result<Client, Error> {
        let creds = super::auth::lookup(&r.registry, Some(&r.repository))?;
        let scope = Some(r.scope(push));
        Client::connect(&r.registry, r.api_host(), r.loopback(), scope, creds, opts)
    }

    /// The registry as the user named it.
    pub(crate) fn registry(&self) -> &str {
        &self.registry
    }

    /// `GET /v2/`: anonymous access, or the challenge answered; with credentials, checks them.
    fn handshake(&self) -> Result<(), Error> {
        let url = format!("{}/v2/", self.base);
        let resp = self.send_once(&Method::GET, &url, &[], None, Payload::Empty)?;
        match resp.status().as_u16() {
            200 if self.creds.is_none() => Ok(()),
            200 => {
                // Open to anyone: credentials given are kept for the registry's own checks.
                if let Some(c) = &self.creds {
                    *self.lock_auth() = Some(c.basic());
                }
                Ok(())
            }
            401 => {
                let challenge = challenge_of(&resp);
                self.authenticate(challenge.as_ref())?;
                if self.creds.is_some() {
                    // login: the registry must now accept what we send.
                    let auth = self.lock_auth().clone();
                    let again = self.send_once(&Method::GET, &url, &[], auth, Payload::Empty)?;
                    if again.status() == StatusCode::UNAUTHORIZED {
                        return Err(Error::Unauthorized {
                            registry: self.registry.clone(),
                            detail: "the registry refused the credentials".into(),
                        });
                    }
                }
                Ok(())
            }
            404 => Err(Error::Unreachable {
                registry: self.registry.clone(),
                reason: format!("{url} answered 404"),
                hint: ": it is not a container registry (no /v2/ API)",
            }),
            _ => Err(self.status_error(resp, "the registry's /v2/ check")),
        }
    }

    fn lock_auth(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.auth.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answers a `WWW-Authenticate` challenge: a bearer token for our scope from the realm
    /// (with the credentials, if any), or basic auth.
    fn authenticate(&self, challenge: Option<&Challenge>) -> Result<(), Error> {
        let unauthorized = |detail: &str| Error::Unauthorized {
            registry: self.registry.clone(),
            detail: detail.to_string(),
        };
        let Some(ch) = challenge else {
            return Err(unauthorized(
                "the registry asks for authentication without saying how (no WWW-Authenticate)",
            ));
        };
        match ch.scheme.as_str() {
            "basic" => {
                let c = self
                    .creds
                    .as_ref()
                    .ok_or_else(|| unauthorized("the registry needs a user name and password"))?;
                *self.lock_auth() = Some(c.basic());
                Ok(())
            }
            "bearer" => {
                let token = self.fetch_token(ch)?;
                *self.lock_auth() = Some(format!("Bearer {token}"));
                Ok(())
            }
            other => Err(unauthorized(&format!(
                "the registry asks for {other} authentication, which microvm does not speak"
            ))),
        }
    }

    fn fetch_token(&self, ch: &Challenge) -> Result<String, Error> {
        let realm = ch.params.get("realm").ok_or_else(|| Error::Unauthorized {
            registry: self.registry.clone(),
            detail: "its bearer challenge names no token realm".into(),
        })?;
        let realm_uri: Uri = realm.parse().map_err(|_| Error::Unauthorized {
            registry: self.registry.clone(),
            detail: format!("its token realm {realm:?} is not a URL"),
        })?;
        let realm_loopback = realm_uri.host().is_some_and(is_loopback);
        if self.creds.is_some()
            && realm_uri.scheme_str() != Some("https")
            && !realm_loopback
            && !self.insecure
        {
            return Err(Error::Unauthorized {
                registry: self.registry.clone(),
                detail: format!(
                    "its token realm {realm} is not HTTPS: credentials are not sent there"
                ),
            });
        }
        let mut query = Vec::new();
        if let Some(service) = ch.params.get("service") {
            query.push(format!("service={}", encode(service)));
        }
        if let Some(scope) = self.scope.as_ref().or(ch.params.get("scope")) {
            query.push(format!("scope={}", encode(scope)));
        }
        if let Some(c) = &self.creds {
            query.push(format!("account={}", encode(&c.username)));
        }
        let sep = if realm.contains('?') { '&' } else { '?' };
        let url = if query.is_empty() {
            realm.clone()
        } else {
            format!("{realm}{sep}{}", query.join("&"))
        };
        let auth = self.creds.as_ref().map(Credentials::basic);
        let mut resp = self.send_retrying(&Method::GET, &url, &[], auth, Payload::Empty)?;
        match resp.status().as_u16() {
            200 => {}
            401 | 403 => {
                return Err(Error::Unauthorized {
                    registry: self.registry.clone(),
                    detail: if self.creds.is_some() {
                        "its token service refused the credentials".into()
                    } else {
                        "its token service refused anonymous access".into()
                    },
                })
            }
            _ => return Err(self.status_error(resp, "the token service")),
        }
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_SMALL_BODY)
            .read_to_vec()
            .map_err(|e| self.unreachable(e))?;
        #[derive(serde::Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let t: Token = serde_json::from_slice(&body).map_err(|e| Error::Protocol {
            registry: self.registry.clone(),
            what: "the token service's answer".into(),
            reason: e.to_string(),
        })?;
        t.token
            .or(t.access_token)
            .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic()))
            .ok_or_else(|| Error::Protocol {
                registry: self.registry.clone(),
                what: "the token service's answer".into(),
                reason: "it holds no usable token".into(),
            })
    }

    /// Sends a request to `path` (under the registry's base) or to an absolute URL, with
    /// authentication, retries and redirects; returns whatever final answer came back.
    pub(crate) fn request(
        &self,
        method: &Method,
        path_or_url: &str,
        headers: &[(&str, String)],
        payload: Payload<'_>,
    ) -> Result<Response<Body>, Error> {
        let mut url = self.url(path_or_url)?;
        let mut method = method.clone();
        let mut headers = headers;
        let mut payload = payload;
        // A token may expire (or, under parallel downloads, be replaced) between asking for
        // it and using it: a few fresh ones are asked for before giving up.
        let mut reauthentications = 0;
        let mut hops = 0;
        loop {
            let ours = same_origin(&url, &self.base);
            let auth = if ours { self.lock_auth().clone() } else { None };
            let resp = self.send_retrying(&method, &url, headers, auth, payload)?;
            let status = resp.status().as_u16();
            if status == 401 && ours && reauthentications < MAX_REAUTHENTICATIONS {
                // A token expired, or this scope needs another one.
                reauthentications += 1;
                let challenge = challenge_of(&resp);
                self.authenticate(challenge.as_ref())?;
                continue;
            }
            if status == 401 {
                let why = if self.creds.is_some() {
                    ""
                } else {
                    ": the repository does not exist, or it needs a login"
                };
                return Err(Error::Unauthorized {
                    registry: self.registry.clone(),
                    detail: format!("{method} {} was refused{why}", strip_query(&url)),
                });
            }
            if matches!(status, 301 | 302 | 303 | 307 | 308) {
                let Some(location) = header(&resp, "location") else {
                    return Ok(resp);
                };
                hops += 1;
                if hops > MAX_REDIRECTS {
                    return Err(Error::Protocol {
                        registry: self.registry.clone(),
                        what: format!("{method} {}", strip_query(&url)),
                        reason: format!("more than {MAX_REDIRECTS} redirects"),
                    });
                }
                url = resolve(&url, &location).ok_or_else(|| Error::Protocol {
                    registry: self.registry.clone(),
                    what: format!("{method} {}", strip_query(&url)),
                    reason: format!("redirect to an unusable location {location:?}"),
                })?;
                if status == 303 || (matches!(status, 301 | 302) && method == Method::POST) {
                    // The answer is elsewhere, to be fetched: no body, no body headers.
                    method = Method::GET;
                    payload = Payload::Empty;
                    headers = &[];
                }
                continue;
            }
            return Ok(resp);
        }
    }

    /// `target` as a URL: absolute, or resolved against the registry's base (`/v2/...`).
    pub(crate) fn url(&self, target: &str) -> Result<String, Error> {
        resolve(&format!("{}/", self.base), target).ok_or_else(|| Error::Protocol {
            registry: self.registry.clone(),
            what: "a URL it gave".into(),
            reason: format!("{:?} is not an http(s) URL", strip_query(target)),
        })
    }

    /// `location` (an answer's `Location`) resolved against the URL `from` was sent to.
    pub(crate) fn resolve_from(&self, from: &str, location: &str) -> Result<String, Error> {
        resolve(&self.url(from)?, location).ok_or_else(|| Error::Protocol {
            registry: self.registry.clone(),
            what: "a Location it gave".into(),
            reason: format!("{:?} is not an http(s) URL", strip_query(location)),
        })
    }

    /// One request, sent again (with backoff) on 429, 5xx and broken connections.
    fn send_retrying(
        &self,
        method: &Method,
        url: &str,
        headers: &[(&str, String)],
        auth: Option<String>,
        payload: Payload<'_>,
    ) -> Result<Response<Body>, Error> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let last = attempt >= MAX_ATTEMPTS;
            match self.send_once(method, url, headers, auth.clone(), payload) {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let retry = status == 429 || (500..600).contains(&status) && status != 501;
                    if !retry || last {
                        return Ok(resp);
                    }
                    let wait = header(&resp, "retry-after")
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs)
                        .unwrap_or_else(|| backoff(attempt));
                    tracing::info!(%status, url = strip_query(url), "registry busy: retrying");
                    std::thread::sleep(wait.min(MAX_BACKOFF));
                }
                Err(e @ Error::Unreachable { .. }) if !last => {
                    tracing::info!(error = %e, "retrying");
                    std::thread::sleep(backoff(attempt));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn send_once(
        &self,
        method: &Method,
        url: &str,
        headers: &[(&str, String)],
        auth: Option<String>,
        payload: Payload<'_>,
    ) -> Result<Response<Body>, Error> {
        let mut b = http::Request::builder().method(method.clone()).uri(url);
        for (k, v) in headers {
            b = b.header(*k, v);
        }
        if let Some(a) = auth {
            b = b.header("authorization", a);
        }
        let bad = |e: http::Error| Error::Protocol {
            registry: self.registry.clone(),
            what: format!("{method} {}", strip_query(url)),
            reason: e.to_string(),
        };
        let agent = if same_origin(url, &self.base) {
            &self.agent
        } else {
            &self.elsewhere
        };
        let result = match payload {
            Payload::Empty => agent.run(b.body(()).map_err(bad)?),
            Payload::Bytes(bytes) => agent.run(b.body(bytes).map_err(bad)?),
            Payload::File(path) => {
                let file = std::fs::File::open(path).map_err(|e| Error::Local {
                    what: format!("opening {}", path.display()),
                    source: e,
                })?;
                agent.run(b.body(file).map_err(bad)?)
            }
        };
        result.map_err(|e| self.unreachable(e))
    }

    /// A transport failure as our error, with a hint where one helps.
    pub(crate) fn unreachable(&self, e: ureq::Error) -> Error {
        let text = e.to_string();
        let tls = match &e {
            ureq::Error::Tls(_) | ureq::Error::Rustls(_) => true,
            ureq::Error::Io(io) => {
                io.kind() == std::io::ErrorKind::InvalidData
                    && ["certificate", "peer", "message"]
                        .iter()
                        .any(|w| text.contains(w))
            }
            _ => false,
        };
        if !tls {
            return Error::Unreachable {
                registry: self.registry.clone(),
                reason: text,
                hint: "",
            };
        }
        let hint = if text.contains("certificate") {
            ": if the registry uses its own CA, put its certificate in --cert-dir or /etc/containers/certs.d/HOST:PORT/ca.crt"
        } else {
            ": for a registry without TLS pass --tls-verify=false"
        };
        Error::TlsFailed {
            registry: self.registry.clone(),
            reason: text,
            hint,
        }
    }

    /// The registry's error for an unexpected answer: its `errors[0]` code and message when
    /// the body has them.
    pub(crate) fn status_error(&self, mut resp: Response<Body>, what: &str) -> Error {
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_SMALL_BODY)
            .read_to_vec()
            .unwrap_or_default();
        #[derive(serde::Deserialize)]
        struct Errors {
            errors: Vec<ErrorEntry>,
        }
        #[derive(serde::Deserialize)]
        struct ErrorEntry {
            code: Option<String>,
            message: Option<String>,
        }
        let detail = serde_json::from_slice::<Errors>(&body)
            .ok()
            .and_then(|e| e.errors.into_iter().next())
            .map(|e| {
                let code = e.code.unwrap_or_default();
                let message = e.message.unwrap_or_default();
                // A hostile registry's text must not drive the user's terminal.
                let text: String = format!("{message} ({code})")
                    .chars()
                    .filter(|c| !c.is_control())
                    .take(300)
                    .collect();
                text
            })
            .unwrap_or_else(|| {
                resp.status()
                    .canonical_reason()
                    .unwrap_or("unexpected answer")
                    .to_string()
            });
        Error::Registry {
            registry: self.registry.clone(),
            what: what.to_string(),
            status,
            detail,
        }
    }
}

/// An HTTP agent with `tls`: redirects are ours to follow, statuses ours to judge, and no
/// phase may hang: connecting, sending and each read or write are bounded (a trickling server is
/// caught by the callers' deadlines and throughput checks).
fn agent(tls: ureq::tls::TlsConfig) -> Agent {
    Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .user_agent(concat!("microvm/", env!("CARGO_PKG_VERSION")))
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_send_request(Some(Duration::from_secs(60)))
        .timeout_recv_response(Some(Duration::from_secs(120)))
        .timeout_per_read(Some(IO_TIMEOUT))
        .timeout_per_write(Some(IO_TIMEOUT))
        .tls_config(tls)
        .build()
        .new_agent()
}

/// The first challenge in the answer's `WWW-Authenticate` header.
fn challenge_of(resp: &Response<Body>) -> Option<Challenge> {
    header(resp, "www-authenticate").and_then(|h| parse_challenge(&h))
}

/// A header's value as text.
pub(crate) fn header(resp: &Response<Body>, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// 0.5 s, 1 s, 2 s, ... for attempt 1, 2, 3, ...
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(500u64 << attempt.saturating_sub(1).min(6)).min(MAX_BACKOFF)
}

/// Reads a small body whole, refusing one larger than `limit`.
pub(crate) fn read_limited(
    client: &Client,
    resp: Response<Body>,
    limit: u64,
    what: &str,
) -> Result<Vec<u8>, Error> {
    let mut buf = Vec::new();
    let mut body = resp.into_body().into_reader().take(limit + 1);
    let start = std::time::Instant::now();
    let mut chunk = [0u8; 64 << 10];
    loop {
        let n = match body.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(Error::Unreachable {
                    registry: client.registry.clone(),
                    reason: format!("reading {what}: {e}"),
                    hint: "",
                })
            }
        };
        buf.extend_from_slice(&chunk[..n]);
        if start.elapsed() > DOCUMENT_DEADLINE {
            return Err(Error::Unreachable {
                registry: client.registry.clone(),
                reason: format!("{what} took more than {DOCUMENT_DEADLINE:?} to arrive"),
                hint: "",
            });
        }
    }
    if buf.len() as u64 > limit {
        return Err(Error::Protocol {
            registry: client.registry.clone(),
            what: what.to_string(),
            reason: format!("larger than the {limit} bytes allowed"),
        });
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_a_cap() {
        assert_eq!(backoff(1), Duration::from_millis(500));
        assert_eq!(backoff(3), Duration::from_secs(2));
        assert_eq!(backoff(40), MAX_BACKOFF);
    }
}
