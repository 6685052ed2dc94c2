//! Docker's rules for turning an image's config and the user's flags into the process to run.

/// What the image says (its OCI config).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageDefaults {
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    pub cmd: Vec<String>,
    /// `Env`, `KEY=VALUE`.
    pub env: Vec<String>,
    /// `WorkingDir`.
    pub working_dir: String,
    /// `User`.
    pub user: String,
}

/// What the user said on the command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--entrypoint` (an empty string clears the image's).
    pub entrypoint: Option<String>,
    /// The command after the image name.
    pub cmd: Vec<String>,
    /// `-e` and `--env-file` values, `KEY=VALUE`, in order.
    pub env: Vec<String>,
    /// `-w`.
    pub workdir: Option<String>,
    /// `-u`.
    pub user: Option<String>,
}

/// The process as docker would start it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Environment, `KEY=VALUE`, later entries of the same key replacing earlier ones.
    pub env: Vec<String>,
    /// Working directory.
    pub cwd: String,
    /// User spec, resolved in the guest.
    pub user: String,
}

/// PATH when neither the image nor the user sets one, as docker gives it.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Applies docker's rules: `--entrypoint` replaces the image's entrypoint and drops its Cmd; a
/// command given replaces Cmd; the environment is the image's overridden key by key.
pub fn process(image: &ImageDefaults, user: &Overrides) -> Result<Process, String> {
    let (entrypoint, cmd) = match &user.entrypoint {
        Some(e) if e.is_empty() => (Vec::new(), user.cmd.clone()),
        Some(e) => (vec![e.clone()], user.cmd.clone()),
        None if user.cmd.is_empty() => (image.entrypoint.clone(), image.cmd.clone()),
        None => (image.entrypoint.clone(), user.cmd.clone()),
    };
    let argv: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if argv.is_empty() {
        return Err("no command specified: the image has no Entrypoint or Cmd; give one after the image name".into());
    }
    let mut env: Vec<String> = Vec::new();
    for kv in image.env.iter().chain(&user.env) {
        let key = kv.split_once('=').map_or(kv.as_str(), |(k, _)| k);
        env.retain(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k) != key);
        env.push(kv.clone());
    }
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, DEFAULT_PATH.to_string());
    }
    let cwd = match (&user.workdir, image.working_dir.as_str()) {
        (Some(w), _) => w.clone(),
        (None, "") => "/".to_string(),
        (None, w) => w.to_string(),
    };
    let user = user.user.clone().unwrap_or_else(|| image.user.clone());
    Ok(Process {
        argv,
        env,
        cwd,
        user,
    })
}

/// Reads a docker `--env-file`: `KEY=VALUE` lines, `KEY` alone taking this process's value (or
/// nothing if unset), blank lines and `#` comments skipped.
pub fn parse_env_file(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Vec<String> {
    text.lines()
        .map(str::trim_start)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| match l.split_once('=') {
            Some(_) => Some(l.to_string()),
            None => lookup(l.trim_end()).map(|v| format!("{}={v}", l.trim_end())),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn image() -> ImageDefaults {
        ImageDefaults {
            entrypoint: v(&["/entry.sh"]),
            cmd: v(&["serve", "--port", "80"]),
            env: v(&["PATH=/opt/bin:/bin", "MODE=prod"]),
            working_dir: "/app".into(),
            user: "1000".into(),
        }
    }

    #[test]
    fn image_defaults_apply() {
        let p = process(&image(), &Overrides::default()).unwrap();
        assert_eq!(p.argv, v(&["/entry.sh", "serve", "--port", "80"]));
        assert_eq!(p.env, v(&["PATH=/opt/bin:/bin", "MODE=prod"]));
        assert_eq!((p.cwd.as_str(), p.user.as_str()), ("/app", "1000"));
    }

    #[test]
    fn a_command_replaces_cmd_but_keeps_the_entrypoint() {
        let p = process(
            &image(),
            &Overrides {
                cmd: v(&["debug"]),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(p.argv, v(&["/entry.sh", "debug"]));
    }

    #[test]
    fn entrypoint_override_drops_the_image_cmd() {
        let o = Overrides {
            entrypoint: Some("sh".into()),
            ..Default::default()
        };
        assert_eq!(process(&image(), &o).unwrap().argv, v(&["sh"]));
        let o = Overrides {
            entrypoint: Some("".into()),
            cmd: v(&["ls", "-l"]),
            ..Default::default()
        };
        assert_eq!(process(&image(), &o).unwrap().argv, v(&["ls", "-l"]));
        let o = Overrides {
            entrypoint: Some("".into()),
            ..Default::default()
        };
        assert!(process(&image(), &o)
            .unwrap_err()
            .contains("no command specified"));
    }

    #[test]
    fn env_overrides_by_key_and_path_defaults() {
        let o = Overrides {
            env: v(&["MODE=dev", "EXTRA=1"]),
            workdir: Some("/w".into()),
            user: Some("0".into()),
            ..Default::default()
        };
        let p = process(&image(), &o).unwrap();
        assert_eq!(p.env, v(&["PATH=/opt/bin:/bin", "MODE=dev", "EXTRA=1"]));
        assert_eq!((p.cwd.as_str(), p.user.as_str()), ("/w", "0"));
        let bare = ImageDefaults {
            cmd: v(&["true"]),
            ..Default::default()
        };
        let p = process(&bare, &Overrides::default()).unwrap();
        assert_eq!(p.env, v(&[DEFAULT_PATH]));
        assert_eq!((p.cwd.as_str(), p.user.as_str()), ("/", ""));
    }

    #[test]
    fn env_files_follow_docker() {
        let text = "# comment\n\nA=1\n  B=two words\nHOMEVAR\nUNSET\n";
        let lookup = |k: &str| (k == "HOMEVAR").then(|| "/home/x".to_string());
        assert_eq!(
            parse_env_file(text, lookup),
            v(&["A=1", "B=two words", "HOMEVAR=/home/x"])
        );
    }
}
