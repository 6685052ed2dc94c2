//! `microvm pull`, `push`, `login` and `logout`.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use clap::Args;

use super::image::open_store;
use super::{error_line, EXIT_MICROVM_ERROR};
use crate::registry::{self, auth::Credentials, Options};

/// How to reach a registry: podman's flags.
#[derive(Debug, Args, Clone, Default)]
pub struct RegistryArgs {
    /// Require HTTPS with a verified certificate (`--tls-verify=false` allows plain HTTP or
    /// unverified TLS) [default: true, except for localhost and 127.0.0.1].
    #[arg(
        long,
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true"
    )]
    pub tls_verify: Option<bool>,
    /// A directory with the registry's CA certificates (*.crt) and client certificate
    /// (NAME.cert + NAME.key) [default: /etc/containers/certs.d/HOST:PORT and
    /// /etc/docker/certs.d/HOST:PORT].
    #[arg(long, value_name = "DIR")]
    pub cert_dir: Option<PathBuf>,
}

impl RegistryArgs {
    /// As the registry client's options.
    pub fn options(&self) -> Options {
        Options {
            tls_verify: self.tls_verify,
            cert_dir: self.cert_dir.clone(),
        }
    }
}

/// Flags of `microvm pull`.
#[derive(Debug, Args)]
pub struct PullArgs {
    /// No progress bars.
    #[arg(short, long)]
    pub quiet: bool,
    /// How to reach the registry.
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// The image: NAME[:TAG|@DIGEST] in docker's grammar (busybox is
    /// docker.io/library/busybox:latest), or docker://NAME.
    #[arg(value_name = "REF")]
    pub reference: String,
}

/// Flags of `microvm push`.
#[derive(Debug, Args)]
pub struct PushArgs {
    /// How to reach the registry.
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// A stored image (name or ID).
    #[arg(value_name = "IMAGE")]
    pub image: String,
    /// Where to push it: REGISTRY/REPOSITORY[:TAG] or docker://... [default: the image's name].
    #[arg(value_name = "DESTINATION")]
    pub destination: Option<String>,
}

/// Flags of `microvm login`.
#[derive(Debug, Args)]
pub struct LoginArgs {
    /// User name (asked for on a terminal when not given).
    #[arg(short, long)]
    pub username: Option<String>,
    /// Password (visible to other users of this host: prefer --password-stdin).
    #[arg(short, long)]
    pub password: Option<String>,
    /// Read the password from standard input.
    #[arg(long)]
    pub password_stdin: bool,
    /// How to reach the registry.
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// The registry: HOST[:PORT] [default: docker.io].
    #[arg(value_name = "REGISTRY", default_value = "docker.io")]
    pub server: String,
}

/// Flags of `microvm logout`.
#[derive(Debug, Args)]
pub struct LogoutArgs {
    /// Forget the credentials of every registry (in the file `login` writes).
    #[arg(short, long)]
    pub all: bool,
    /// The registry: HOST[:PORT] [default: docker.io].
    #[arg(value_name = "REGISTRY", conflicts_with = "all")]
    pub server: Option<String>,
}

fn fail(e: impl std::fmt::Display) -> i32 {
    error_line(e);
    EXIT_MICROVM_ERROR
}

/// Runs `microvm pull`: prints the stored image's name.
pub fn pull(args: PullArgs) -> i32 {
    let store = match open_store() {
        Ok(s) => s,
        Err(code) => return code,
    };
    let progress = !args.quiet && std::io::stderr().is_terminal();
    match registry::pull(&store, &args.reference, &args.registry.options(), progress) {
        Ok(image) => {
            println!("{}", image.name);
            0
        }
        Err(e) => fail(e),
    }
}

/// Runs `microvm push`: prints docker's `TAG: digest: DIGEST size: N` line.
pub fn push(args: PushArgs) -> i32 {
    let store = match open_store() {
        Ok(s) => s,
        Err(code) => return code,
    };
    let dest = args.destination.as_deref();
    match registry::push(&store, &args.image, dest, &args.registry.options()) {
        Ok(p) => {
            let tag = p.reference.tag.as_deref().unwrap_or("latest");
            println!("{tag}: digest: {} size: {}", p.digest, p.size);
            0
        }
        Err(e) => fail(e),
    }
}

/// Runs `microvm login`.
pub fn login(args: LoginArgs) -> i32 {
    // The registry's name first: no password is asked for a name that cannot be one.
    if let Err(e) = registry::reference::registry_host(&args.server) {
        return fail(e);
    }
    let creds = match credentials(&args) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    match registry::login(&args.server, creds, &args.registry.options()) {
        Ok((_, path)) => {
            tracing::debug!(file = %path.display(), "credentials stored");
            println!("Login Succeeded");
            0
        }
        Err(e) => fail(e),
    }
}

/// Runs `microvm logout`.
pub fn logout(args: LogoutArgs) -> i32 {
    if args.all {
        return match registry::auth::remove_all() {
            Ok(_) => {
                println!("Removed login credentials for all registries");
                0
            }
            Err(e) => fail(e),
        };
    }
    let server = args.server.as_deref().unwrap_or("docker.io");
    match registry::logout(server) {
        Ok(files) if files.is_empty() => {
            println!("Not logged in to {server}");
            0
        }
        Ok(_) => {
            println!("Removing login credentials for {server}");
            0
        }
        Err(e) => fail(e),
    }
}

/// The user name and password from the flags, standard input or the terminal.
fn credentials(args: &LoginArgs) -> Result<Credentials, String> {
    if args.password.is_some() && args.password_stdin {
        return Err("--password and --password-stdin are mutually exclusive".into());
    }
    let tty = std::io::stdin().is_terminal();
    let username = match &args.username {
        Some(u) => u.clone(),
        None if tty && !args.password_stdin => prompt("Username: ", true)?,
        None => return Err("give the user name with --username".into()),
    };
    if username.is_empty() || username.contains(':') {
        return Err("the user name must be non-empty and hold no ':'".into());
    }
    let password = if let Some(p) = &args.password {
        eprintln!("WARNING! Using --password via the CLI is insecure. Use --password-stdin.");
        p.clone()
    } else if args.password_stdin {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .take_line(&mut line)
            .map_err(|e| format!("reading the password from standard input: {e}"))?;
        line
    } else if tty {
        prompt("Password: ", false)?
    } else {
        return Err("no password: use --password-stdin, or run on a terminal".into());
    };
    if password.is_empty() {
        return Err("the password is empty".into());
    }
    Ok(Credentials { username, password })
}

/// Reads one line (at most 64 KiB), without its line ending.
trait TakeLine {
    fn take_line(&mut self, out: &mut String) -> std::io::Result<()>;
}

impl<R: BufRead> TakeLine for R {
    fn take_line(&mut self, out: &mut String) -> std::io::Result<()> {
        use std::io::Read;
        self.take(64 << 10).read_line(out)?;
        let trimmed = out.trim_end_matches(['\n', '\r']).len();
        out.truncate(trimmed);
        Ok(())
    }
}

/// Asks on the terminal; the answer is not echoed unless `echo`.
fn prompt(question: &str, echo: bool) -> Result<String, String> {
    use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
    eprint!("{question}");
    let _ = std::io::stderr().flush();
    let stdin = std::io::stdin();
    let saved = if echo {
        None
    } else {
        let saved = tcgetattr(&stdin).map_err(|e| format!("reading the terminal: {e}"))?;
        let mut quiet = saved.clone();
        quiet.local_flags.remove(LocalFlags::ECHO);
        tcsetattr(&stdin, SetArg::TCSANOW, &quiet)
            .map_err(|e| format!("setting up the terminal: {e}"))?;
        Some(saved)
    };
    let mut line = String::new();
    let read = stdin.lock().take_line(&mut line);
    if let Some(saved) = saved {
        let _ = tcsetattr(&stdin, SetArg::TCSANOW, &saved);
        eprintln!();
    }
    read.map_err(|e| format!("reading the terminal: {e}"))?;
    Ok(line)
}
