//! Registries: `pull`, `push`, `login`, `logout` and `run`'s pull, against Debian's
//! docker-registry started on a loopback address (plain, and with TLS from a CA made here plus
//! htpasswd auth) and against tests/common/registry.rs's fake registry for what a real one
//! does not do on demand: bearer tokens, lying digests, dropped connections, 429s, redirects
//! to another host, manifest lists and bad manifests. Nothing here reaches the internet.

mod common;

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::registry::{FakeRegistry, Faults, Request};
use common::{kernel_or_skip, microvm, skip, temp_dir, test_images, TempDir};

fn images() -> &'static (PathBuf, PathBuf) {
    test_images("registry")
}

fn demo_layout() -> PathBuf {
    images().0.join("demo")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `microvm ARGS` with its own store at `root` and credentials file beside it.
fn mv(root: &Path, args: &[&str]) -> Output {
    mv_cmd(root, args).output().unwrap()
}

fn mv_cmd(root: &Path, args: &[&str]) -> Command {
    let mut c = microvm();
    c.args(args)
        .env("MICROVM_ROOT", root.join("store"))
        .env("REGISTRY_AUTH_FILE", root.join("auth.json"))
        .env_remove("XDG_RUNTIME_DIR")
        .stdin(Stdio::null());
    c
}

/// `microvm login -u USER --password-stdin FLAGS... REGISTRY` with `password` on stdin.
fn login(root: &Path, flags: &[&str], user: &str, registry: &str, password: &str) -> Output {
    let mut args = vec!["login", "-u", user, "--password-stdin"];
    args.extend(flags);
    args.push(registry);
    mv_stdin(root, &args, &format!("{password}\n"))
}

/// Runs `args` with `input` on stdin.
fn mv_stdin(root: &Path, args: &[&str], input: &str) -> Output {
    use std::io::Write;
    let mut child = mv_cmd(root, args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn ok(o: &Output, what: &str) -> String {
    assert_eq!(o.status.code(), Some(0), "{what}: {}", text(&o.stderr));
    text(&o.stdout)
}

/// Exit 125 with one `microvm:` line containing every one of `words`.
fn fails(o: &Output, what: &str, words: &[&str]) -> String {
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(125), "{what}: {err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("microvm: "))
        .unwrap_or_else(|| panic!("{what}: no error line in {err}"));
    for w in words {
        assert!(line.contains(w), "{what}: {w:?} not in {line}");
    }
    assert!(!err.contains("panicked"), "{what}: {err}");
    err
}

fn free_port(ip: &str) -> u16 {
    TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Debian's docker-registry on `ip`, killed when dropped.
struct DockerRegistry {
    child: Child,
    address: String,
}

impl Drop for DockerRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn registry_binary(test: &str) -> Option<PathBuf> {
    let p = PathBuf::from("/usr/bin/docker-registry");
    if p.is_file() {
        Some(p)
    } else {
        skip(
            test,
            "docker-registry is not installed (scripts/setup-host installs it)",
        );
        None
    }
}

/// Starts docker-registry storing under `dir`, listening on `ip`, with `extra` YAML in its
/// `http:` section (TLS) and top level (auth).
fn start_registry(
    bin: &Path,
    dir: &Path,
    ip: &str,
    http_extra: &str,
    top_extra: &str,
) -> DockerRegistry {
    let port = free_port(ip);
    let config = dir.join("config.yml");
    fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {ip}:{port}\n{http_extra}{top_extra}",
            dir.join("data").display()
        ),
    )
    .unwrap();
    let log = fs::File::create(dir.join("registry.log")).unwrap();
    let child = Command::new(bin)
        .arg("serve")
        .arg(&config)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let address = format!("{ip}:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(&address).is_err() {
        assert!(
            Instant::now() < deadline,
            "docker-registry did not start: {}",
            fs::read_to_string(dir.join("registry.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    DockerRegistry { child, address }
}

/// The store's converted layer images and leftover temporary files.
fn store_files(root: &Path) -> (Vec<String>, Vec<String>) {
    let mut layers = Vec::new();
    let mut tmp = Vec::new();
    for dir in ["store/layers", "store/blobs/sha256"] {
        for e in fs::read_dir(root.join(dir)).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".tmp-") {
                tmp.push(name);
            } else if name.ends_with(".sqfs") {
                layers.push(name);
            }
        }
    }
    (layers, tmp)
}

/// The demo layout's manifest descriptor (digest, size, media type) and its layers' digests.
fn demo_manifest() -> (String, u64, String, Vec<String>) {
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(demo_layout().join("index.json")).unwrap()).unwrap();
    let m = &index["manifests"][0];
    let digest = m["digest"].as_str().unwrap().to_string();
    let blob = demo_layout().join("blobs/sha256").join(&digest[7..]);
    let manifest: serde_json::Value = serde_json::from_slice(&fs::read(blob).unwrap()).unwrap();
    let layers = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect();
    (
        digest,
        m["size"].as_u64().unwrap(),
        m["mediaType"].as_str().unwrap().to_string(),
        layers,
    )
}

fn blob_gets<'a>(reqs: &'a [Request], digest: &str) -> Vec<&'a Request> {
    reqs.iter()
        .filter(|r| r.method == "GET" && r.url.contains("/blobs/") && r.url.contains(digest))
        .collect()
}

#[test]
fn committed_images_go_through_docker_registry_and_run_again() {
    let test = "committed_images_go_through_docker_registry_and_run_again";
    let (Some(bin), Some(kernel)) = (registry_binary(test), kernel_or_skip(test)) else {
        return;
    };
    let k = kernel.to_str().unwrap();
    let dir = temp_dir("registry-roundtrip");
    let reg = start_registry(&bin, &dir.0, "127.0.0.1", "", "");
    let (a, b, c) = (dir.0.join("a"), dir.0.join("b"), dir.0.join("c"));
    let demo = format!("oci:{}", demo_layout().display());
    let run = [
        "--hypervisor",
        "qemu",
        "--network",
        "none",
        "--timeout",
        "120",
        "--kernel",
        k,
    ];

    // A committed image, pushed by its own name (no TLS flag: 127.0.0.1 is docker's insecure).
    let mut args = vec!["run", "--name", "tocommit", "-u", "0"];
    args.extend(run);
    args.extend([demo.as_str(), "echo pushed > /etc/pushed"]);
    ok(&mv(&a, &args), "run to commit");
    let name = format!("{}/team/app:v1", reg.address);
    ok(&mv(&a, &["commit", "tocommit", &name]), "commit");
    let out = ok(&mv(&a, &["push", &name]), "push");
    let digest = out
        .trim()
        .strip_prefix("v1: digest: ")
        .and_then(|r| r.split(' ').next())
        .unwrap_or_else(|| panic!("push printed {out:?}"))
        .to_string();
    // Pushing again uploads nothing new and names the same manifest.
    let again = ok(&mv(&a, &["push", &name]), "push again");
    assert!(again.contains(&digest), "{again}");
    // And another image under a name given on the command line.
    ok(&mv(&a, &["load", &demo]), "load");
    let other = format!("docker://{}/team/demo:latest", reg.address);
    ok(&mv(&a, &["push", "demo", &other]), "push demo");

    // An empty store pulls by tag and by digest; the layers arrive converted.
    let by_tag = ok(&mv(&b, &["pull", &name]), "pull by tag");
    assert_eq!(by_tag.trim(), name);
    let pinned = format!("{}/team/app@{digest}", reg.address);
    let by_digest = ok(&mv(&b, &["pull", &pinned]), "pull by digest");
    assert_eq!(by_digest.trim(), pinned);
    let list = ok(&mv(&b, &["images", "--format", "json"]), "images");
    assert_eq!(list.lines().count(), 2, "{list}");
    assert!(list.lines().all(|l| l.contains(&digest)), "{list}");
    assert!(
        list.contains(r#""Tag":"<none>""#),
        "pinned, untagged: {list}"
    );
    let (layers, tmp) = store_files(&b);
    assert_eq!(
        layers.len(),
        3,
        "demo's two layers and the commit's: {layers:?}"
    );
    assert!(tmp.is_empty(), "{tmp:?}");
    // Other spellings of the same references find the stored images without pulling.
    for spelling in [format!("docker://{name}"), format!("{name}@{digest}")] {
        let o = mv(
            &b,
            &[
                "create",
                "--pull",
                "never",
                "--hypervisor",
                "qemu",
                &spelling,
                "true",
            ],
        );
        ok(&o, &spelling);
    }
    let mut args = vec!["run", "--rm", "--pull", "never"];
    args.extend(run);
    args.extend([pinned.as_str(), "cat /etc/pushed; cat /etc/app/new"]);
    assert_eq!(ok(&mv(&b, &args), "run pinned"), "pushed\nnew\n");

    // `run` pulls what is missing, saying so as docker does.
    let mut args = vec!["run", "--rm"];
    args.extend(run);
    args.extend([name.as_str(), "cat /etc/pushed"]);
    let o = mv(&c, &args);
    assert_eq!(ok(&o, "run pulls"), "pushed\n");
    assert!(
        text(&o.stderr).contains(&format!("Unable to find image '{name}' locally")),
        "{}",
        text(&o.stderr)
    );
    // --pull never does not, and a tag the registry lacks is its error.
    let missing = format!("{}/team/app:nope", reg.address);
    let o = mv(
        &c,
        &[
            "run",
            "--pull",
            "never",
            "--hypervisor",
            "qemu",
            &missing,
            "true",
        ],
    );
    fails(&o, "--pull never", &["no image named"]);
    let o = mv(&c, &["pull", &missing]);
    fails(&o, "unknown tag", &["MANIFEST_UNKNOWN", "team/app:nope"]);
    let o = mv(&c, &["push", &name, &pinned]);
    fails(&o, "push a digest", &["not a digest"]);
}

/// A CA, and a certificate for 127.0.0.2 signed by it, made with openssl in `dir`.
fn make_certs(dir: &Path) {
    let sh = |script: &str| {
        let o = Command::new("sh")
            .arg("-ec")
            .arg(script)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(o.status.success(), "{script}: {}", text(&o.stderr));
    };
    sh("openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=microvm-test-ca 2>/dev/null");
    sh("openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=127.0.0.2 2>/dev/null");
    sh("printf 'subjectAltName=IP:127.0.0.2\\nbasicConstraints=CA:FALSE\\n' > ext.cnf && openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 2 -extfile ext.cnf 2>/dev/null");
    fs::create_dir_all(dir.join("certs.d")).unwrap();
    fs::copy(dir.join("ca.crt"), dir.join("certs.d/ca.crt")).unwrap();
}

#[test]
fn tls_and_basic_auth_go_through_login() {
    let test = "tls_and_basic_auth_go_through_login";
    let Some(bin) = registry_binary(test) else {
        return;
    };
    if Command::new("htpasswd").arg("-h").output().is_err() {
        skip(
            test,
            "htpasswd is not installed (apache2-utils; scripts/setup-host installs it)",
        );
        return;
    }
    let dir = temp_dir("registry-tls");
    make_certs(&dir.0);
    let o = Command::new("htpasswd")
        .args(["-Bbn", "alice", "s3cret-pw"])
        .output()
        .unwrap();
    fs::write(dir.0.join("htpasswd"), &o.stdout).unwrap();
    let http = format!(
        "  tls:\n    certificate: {}\n    key: {}\n",
        dir.0.join("server.crt").display(),
        dir.0.join("server.key").display()
    );
    let auth = format!(
        "auth:\n  htpasswd:\n    realm: test-realm\n    path: {}\n",
        dir.0.join("htpasswd").display()
    );
    let reg = start_registry(&bin, &dir.0, "127.0.0.2", &http, &auth);
    let certs = dir.0.join("certs.d");
    let certs = certs.to_str().unwrap();
    let (a, b) = (dir.0.join("a"), dir.0.join("b"));
    let demo = format!("oci:{}", demo_layout().display());
    ok(&mv(&a, &["load", &demo]), "load");
    let target = format!("{}/team/demo:1", reg.address);

    // Without our CA the certificate is unknown, and the message says where a CA goes.
    let o = login(&a, &[], "alice", &reg.address, "s3cret-pw");
    fails(&o, "login without the CA", &["--cert-dir"]);
    // Without credentials, and with wrong ones, the registry refuses.
    let o = mv(&a, &["push", "--cert-dir", certs, "demo", &target]);
    fails(
        &o,
        "push without login",
        &["authentication failed", "microvm login"],
    );
    let o = login(&a, &["--cert-dir", certs], "alice", &reg.address, "wrong");
    fails(&o, "wrong password", &["refused the credentials"]);
    assert!(
        !a.join("auth.json").exists(),
        "a refused login stores nothing"
    );

    let o = login(
        &a,
        &["--cert-dir", certs],
        "alice",
        &reg.address,
        "s3cret-pw",
    );
    assert_eq!(ok(&o, "login"), "Login Succeeded\n");
    let auth_file = a.join("auth.json");
    let meta = fs::metadata(&auth_file).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let stored: serde_json::Value = serde_json::from_slice(&fs::read(&auth_file).unwrap()).unwrap();
    assert!(
        stored["auths"][&reg.address]["auth"].is_string(),
        "{stored}"
    );
    assert!(!fs::read_to_string(&auth_file)
        .unwrap()
        .contains("s3cret-pw"));

    ok(
        &mv(&a, &["push", "--cert-dir", certs, "demo", &target]),
        "push with login",
    );
    // The same credentials file serves another store; the layers arrive converted.
    fs::create_dir_all(&b).unwrap();
    fs::copy(&auth_file, b.join("auth.json")).unwrap();
    let pulled = ok(&mv(&b, &["pull", "--cert-dir", certs, &target]), "pull");
    assert_eq!(pulled.trim(), target);
    assert_eq!(store_files(&b).0.len(), 2);
    // --tls-verify=false reaches it without the CA.
    let o = mv(&b, &["pull", "--tls-verify=false", &target]);
    ok(&o, "pull without verification");

    let o = mv(&b, &["logout", &reg.address]);
    assert!(ok(&o, "logout").contains("Removing login credentials"));
    let o = mv(&b, &["logout", &reg.address]);
    assert!(ok(&o, "logout again").contains("Not logged in"));
    let o = mv(&b, &["pull", "--cert-dir", certs, &target]);
    fails(&o, "pull after logout", &["authentication failed"]);
}

/// A store dir, and the fake registry serving the demo layout with `faults`.
fn fake(name: &str, faults: Faults) -> (TempDir, FakeRegistry) {
    let dir = temp_dir(name);
    let reg = FakeRegistry::start(&demo_layout(), faults);
    (dir, reg)
}

#[test]
fn bearer_tokens_are_asked_for_the_scope_and_never_sent_to_blob_storage() {
    let faults = Faults {
        bearer: Some(("bob".into(), "hunter22".into())),
        redirect_blobs: true,
        ..Faults::default()
    };
    let (dir, reg) = fake("registry-bearer", faults);
    let image = format!("{}/team/app:latest", reg.address());
    let o = mv(&dir.0, &["pull", &image]);
    fails(
        &o,
        "anonymous",
        &["authentication failed", "refused anonymous access"],
    );
    let o = login(&dir.0, &[], "bob", &reg.address(), "nope");
    fails(&o, "wrong password", &["refused the credentials"]);
    let o = login(&dir.0, &[], "bob", &reg.address(), "hunter22");
    ok(&o, "login");
    ok(&mv(&dir.0, &["pull", &image]), "pull");
    assert_eq!(store_files(&dir.0).0.len(), 2);

    let reqs = reg.requests();
    let tokens: Vec<&Request> = reqs
        .iter()
        .filter(|r| r.url.starts_with("/token"))
        .collect();
    assert!(
        tokens
            .iter()
            .any(|r| r.url.contains("scope=repository%3Ateam%2Fapp%3Apull")
                && r.status == 200
                && r.authorization
                    .as_deref()
                    .is_some_and(|a| a.starts_with("Basic "))),
        "{tokens:#?}"
    );
    let blobs_on_storage: Vec<&Request> = reqs.iter().filter(|r| r.server == "blobs").collect();
    assert!(
        blobs_on_storage.len() >= 3,
        "config and two layers: {blobs_on_storage:#?}"
    );
    assert!(
        blobs_on_storage.iter().all(|r| r.authorization.is_none()),
        "credentials leaked to another host: {blobs_on_storage:#?}"
    );
    assert!(
        reqs.iter()
            .filter(|r| r.server == "registry" && r.url.contains("/manifests/") && r.status == 200)
            .all(|r| r
                .authorization
                .as_deref()
                .is_some_and(|a| a.starts_with("Bearer "))),
        "{reqs:#?}"
    );

    // Tokens that expire after two requests: each expiry is answered with a fresh token.
    let faults = Faults {
        bearer: Some(("bob".into(), "hunter22".into())),
        token_uses: 2,
        ..Faults::default()
    };
    let reg = FakeRegistry::start(&demo_layout(), faults);
    let image = format!("{}/team/app:latest", reg.address());
    let o = login(&dir.0, &[], "bob", &reg.address(), "hunter22");
    ok(&o, "login");
    let _ = fs::remove_dir_all(dir.0.join("store"));
    ok(&mv(&dir.0, &["pull", &image]), "pull with expiring tokens");
    let reqs = reg.requests();
    let tokens = reqs
        .iter()
        .filter(|r| r.url.starts_with("/token") && r.status == 200)
        .count();
    assert!(
        tokens >= 3,
        "{tokens} tokens for 4 requests of 2 each: {reqs:#?}"
    );
    assert_eq!(store_files(&dir.0).0.len(), 2);
}

#[test]
fn a_blob_that_lies_about_its_digest_is_refused_and_nothing_is_kept() {
    let (_, _, _, layers) = demo_manifest();
    let faults = Faults {
        corrupt_blob: Some(layers[1].clone()),
        ..Faults::default()
    };
    let (dir, reg) = fake("registry-corrupt", faults);
    let o = mv(&dir.0, &["pull", &format!("{}/x:latest", reg.address())]);
    fails(&o, "corrupt layer", &["corrupt", &layers[1]]);
    let (converted, tmp) = store_files(&dir.0);
    assert!(
        !converted
            .iter()
            .any(|l| layers[1].ends_with(l.trim_end_matches(".sqfs"))),
        "{converted:?}"
    );
    assert!(tmp.is_empty(), "temporary files left: {tmp:?}");
    assert!(!dir
        .0
        .join("store/blobs/sha256")
        .join(&layers[1][7..])
        .exists());
    let list = ok(&mv(&dir.0, &["images"]), "images");
    assert_eq!(list.lines().count(), 1, "nothing named: {list}");
}

#[test]
fn a_dropped_download_resumes_with_a_range_request() {
    let (_, _, _, layers) = demo_manifest();
    let layer = layers[0].clone();
    let size = fs::metadata(demo_layout().join("blobs/sha256").join(&layer[7..]))
        .unwrap()
        .len();
    let cut = size / 3;
    let faults = Faults {
        drop_blob: Some((layer.clone(), cut, 1)),
        ..Faults::default()
    };
    let (dir, reg) = fake("registry-resume", faults);
    ok(
        &mv(&dir.0, &["pull", &format!("{}/x:latest", reg.address())]),
        "pull",
    );
    let reqs = reg.requests();
    let gets = blob_gets(&reqs, &layer);
    assert_eq!(gets.len(), 2, "{gets:#?}");
    assert_eq!((gets[0].range.as_deref(), gets[0].body_bytes), (None, cut));
    assert_eq!(
        gets[1].range.as_deref(),
        Some(format!("bytes={cut}-").as_str())
    );
    assert_eq!(
        gets[1].body_bytes,
        size - cut,
        "only the rest is sent again"
    );
    assert_eq!(store_files(&dir.0).0.len(), 2);

    // A registry that keeps dropping it: a bounded number of resumes, then a clear error.
    let faults = Faults {
        drop_blob: Some((layer.clone(), 1000, usize::MAX)),
        ..Faults::default()
    };
    let (dir, reg) = fake("registry-drops", faults);
    let o = mv(&dir.0, &["pull", &format!("{}/x:latest", reg.address())]);
    fails(&o, "always dropped", &["broke off 6 times"]);
    let gets = blob_gets(&reg.requests(), &layer).len();
    assert_eq!(gets, 6, "the first try and five resumes");
    let (converted, tmp) = store_files(&dir.0);
    assert!(tmp.is_empty(), "{tmp:?}");
    assert!(!converted
        .iter()
        .any(|l| layer.contains(l.trim_end_matches(".sqfs"))));
    assert_eq!(ok(&mv(&dir.0, &["images"]), "images").lines().count(), 1);
}

#[test]
fn busy_answers_are_retried_after_a_pause() {
    let faults = Faults {
        too_many: 2,
        ..Faults::default()
    };
    let (dir, reg) = fake("registry-429", faults);
    ok(
        &mv(&dir.0, &["pull", &format!("{}/x:latest", reg.address())]),
        "pull",
    );
    let statuses: Vec<u16> = reg
        .requests()
        .iter()
        .filter(|r| r.url.contains("/blobs/"))
        .map(|r| r.status)
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        2,
        "{statuses:?}"
    );
    assert_eq!(store_files(&dir.0).0.len(), 2);

    // A registry that stays busy: five tries, then its answer as the error.
    let faults = Faults {
        too_many: usize::MAX,
        ..Faults::default()
    };
    let (dir, reg) = fake("registry-429-always", faults);
    let o = mv(&dir.0, &["pull", &format!("{}/x:latest", reg.address())]);
    fails(&o, "always busy", &["HTTP 429", "TOOMANYREQUESTS"]);
    let config_tries = reg
        .requests()
        .iter()
        .filter(|r| r.url.contains("/blobs/"))
        .count();
    assert_eq!(
        config_tries, 5,
        "the config's five tries, no layer asked for"
    );
}

/// An index of `entries` ((os, arch, digest, size, media type)).
fn index(entries: &[(&str, &str, &str, u64, &str)]) -> Vec<u8> {
    let manifests: Vec<serde_json::Value> = entries
        .iter()
        .map(|(os, arch, digest, size, mt)| {
            serde_json::json!({"mediaType": mt, "digest": digest, "size": size,
                               "platform": {"os": os, "architecture": arch}})
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    }))
    .unwrap()
}

#[test]
fn a_manifest_list_resolves_to_linux_amd64() {
    let (digest, size, mt, _) = demo_manifest();
    let arm = format!("sha256:{}", "a".repeat(64));
    let list = index(&[
        ("linux", "arm64", &arm, 500, &mt),
        ("linux", "amd64", &digest, size, &mt),
        ("windows", "amd64", &arm, 500, &mt),
    ]);
    let faults = Faults {
        manifest_override: Some((list, "application/vnd.oci.image.index.v1+json".into())),
        ..Faults::default()
    };
    let (dir, reg) = fake("registry-index", faults);
    ok(
        &mv(
            &dir.0,
            &["pull", &format!("{}/multi:latest", reg.address())],
        ),
        "pull",
    );
    let reqs = reg.requests();
    assert!(reqs
        .iter()
        .any(|r| r.url.ends_with(&format!("/manifests/{digest}"))));
    assert!(!reqs.iter().any(|r| r.url.contains(&arm)), "{reqs:#?}");

    let list = index(&[
        ("linux", "arm64", &arm, 500, &mt),
        ("linux", "s390x", &arm, 500, &mt),
    ]);
    let faults = Faults {
        manifest_override: Some((list, "application/vnd.oci.image.index.v1+json".into())),
        ..Faults::default()
    };
    let (dir, reg) = fake("registry-noamd64", faults);
    let o = mv(
        &dir.0,
        &["pull", &format!("{}/multi:latest", reg.address())],
    );
    fails(
        &o,
        "no amd64",
        &["linux/amd64", "linux/arm64", "linux/s390x"],
    );
}

#[test]
fn bad_manifests_are_one_line_errors_before_any_layer_is_fetched() {
    let (digest, _, _, layers) = demo_manifest();
    let manifest: serde_json::Value = serde_json::from_slice(
        &fs::read(demo_layout().join("blobs/sha256").join(&digest[7..])).unwrap(),
    )
    .unwrap();
    let mut weird = manifest.clone();
    weird["layers"][0]["mediaType"] = "application/vnd.example.weird".into();
    let schema1 = serde_json::json!({"schemaVersion": 1, "name": "x", "tag": "latest",
                                     "fsLayers": [], "history": []});
    let cases: Vec<(Vec<u8>, &str, Vec<&str>)> = vec![
        (
            b"{not json".to_vec(),
            "application/vnd.oci.image.manifest.v1+json",
            vec!["not JSON"],
        ),
        (
            serde_json::to_vec(&schema1).unwrap(),
            "application/vnd.docker.distribution.manifest.v1+prettyjws",
            vec!["schema 1"],
        ),
        (
            serde_json::to_vec(&weird).unwrap(),
            "application/vnd.oci.image.manifest.v1+json",
            vec!["application/vnd.example.weird"],
        ),
        (
            br#"{"schemaVersion":2,"mediaType":"application/vnd.example.thing+json"}"#.to_vec(),
            "application/vnd.example.thing+json",
            vec!["application/vnd.example.thing+json"],
        ),
    ];
    for (body, mt, words) in cases {
        let faults = Faults {
            manifest_override: Some((body, mt.into())),
            ..Faults::default()
        };
        let (dir, reg) = fake("registry-badmanifest", faults);
        let o = mv(&dir.0, &["pull", &format!("{}/x:latest", reg.address())]);
        fails(&o, mt, &words);
        let reqs = reg.requests();
        for l in &layers {
            assert!(
                blob_gets(&reqs, l).is_empty(),
                "{mt}: layer fetched: {reqs:#?}"
            );
        }
        assert_eq!(store_files(&dir.0), (vec![], vec![]));
    }
    // References that are not references.
    let dir = temp_dir("registry-badref");
    for bad in ["UPPER/case", "x@sha256:123", "a//b"] {
        fails(&mv(&dir.0, &["pull", bad]), bad, &["invalid reference"]);
    }
    fails(
        &mv(&dir.0, &["login", "a/b"]),
        "login a/b",
        &["HOST[:PORT]"],
    );
}

#[test]
fn a_full_disk_during_pull_is_an_error_and_leaves_nothing_behind() {
    let test = "a_full_disk_during_pull_is_an_error_and_leaves_nothing_behind";
    let (dir, reg) = fake("registry-full", Faults::default());
    let store = dir.0.join("store");
    fs::create_dir_all(&store).unwrap();
    // A store smaller than the image's biggest layer (busybox, about 1 MB compressed).
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=600k", "microvm-test-full"])
        .arg(&store)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        skip(test, "cannot mount a small tmpfs here (needs root)");
        return;
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&store);
    let o = mv(&dir.0, &["pull", &format!("{}/x:latest", reg.address())]);
    fails(&o, "full disk", &["No space left on device"]);
    let (_, tmp) = store_files(&dir.0);
    assert!(tmp.is_empty(), "temporary files left: {tmp:?}");
    let list = ok(&mv(&dir.0, &["images"]), "images");
    assert_eq!(list.lines().count(), 1, "nothing named: {list}");
}
