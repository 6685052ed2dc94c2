//! Docker's `--user` resolved in the guest root's own /etc/passwd and /etc/group (a static
//! binary has no working NSS, and the image's files are the truth anyway).

/// A resolved identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups (the user's memberships in /etc/group).
    pub groups: Vec<u32>,
    /// Home directory, for `HOME` when the environment lacks it.
    pub home: String,
}

/// Resolves `spec` (`""`, `user`, `uid`, `user:group`, `uid:gid`, ...) against the contents of
/// /etc/passwd and /etc/group.
pub fn resolve(spec: &str, passwd: &str, group: &str) -> Result<Identity, String> {
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let user = if user.is_empty() { "0" } else { user };
    let entry = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 7)
        .find(|f| f[0] == user || (user.parse::<u32>().is_ok() && f[2] == user));
    let (uid, mut gid, name, home) = match (&entry, user.parse::<u32>()) {
        (Some(f), _) => (
            f[2].parse()
                .map_err(|_| format!("bad uid for {} in /etc/passwd", f[0]))?,
            f[3].parse()
                .map_err(|_| format!("bad gid for {} in /etc/passwd", f[0]))?,
            Some(f[0].to_string()),
            f[5].to_string(),
        ),
        (None, Ok(uid)) => (uid, 0, None, "/".to_string()),
        (None, Err(_)) => {
            return Err(format!(
                "unable to find user {user}: no matching entries in passwd file"
            ))
        }
    };
    let groups_table: Vec<Vec<&str>> = group
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 4)
        .collect();
    if let Some(g) = grp {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => groups_table
                .iter()
                .find(|f| f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| {
                    format!("unable to find group {g}: no matching entries in group file")
                })?,
        };
    }
    let mut groups = vec![gid];
    if let Some(name) = &name {
        for f in &groups_table {
            if f[3].split(',').any(|m| m == name) {
                if let Ok(id) = f[2].parse::<u32>() {
                    if !groups.contains(&id) {
                        groups.push(id);
                    }
                }
            }
        }
    }
    Ok(Identity {
        uid,
        gid,
        groups,
        home,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nwww-data:x:33:33:www:/var/www:/usr/sbin/nologin\nbob:x:1000:1000::/home/bob:/bin/sh\nbroken\n";
    const GROUP: &str = "root:x:0:\nwww-data:x:33:bob\nstaff:x:50:bob,alice\nbob:x:1000:\n";

    #[test]
    fn names_ids_and_groups() {
        assert_eq!(
            resolve("", PASSWD, GROUP).unwrap(),
            Identity {
                uid: 0,
                gid: 0,
                groups: vec![0],
                home: "/root".into()
            }
        );
        let bob = resolve("bob", PASSWD, GROUP).unwrap();
        assert_eq!(
            (bob.uid, bob.gid, bob.groups),
            (1000, 1000, vec![1000, 33, 50])
        );
        assert_eq!(resolve("33", PASSWD, GROUP).unwrap().home, "/var/www");
        assert_eq!(resolve("bob:staff", PASSWD, GROUP).unwrap().gid, 50);
        let anon = resolve("4242:77", PASSWD, GROUP).unwrap();
        assert_eq!((anon.uid, anon.gid, anon.groups), (4242, 77, vec![77]));
    }

    #[test]
    fn unknown_names_are_errors() {
        assert!(resolve("nobody", PASSWD, GROUP)
            .unwrap_err()
            .contains("unable to find user nobody"));
        assert!(resolve("bob:nogroup", PASSWD, GROUP)
            .unwrap_err()
            .contains("unable to find group"));
    }
}
