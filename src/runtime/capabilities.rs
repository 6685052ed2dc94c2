//! Capability and resource-limit names of a bundle, as the numbers the guest's kernel uses.

/// Capability names in kernel order (`CAP_CHOWN` is 0), as of Linux 6.1.
const CAPABILITIES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// Resource-limit names in kernel order (`RLIMIT_CPU` is 0).
const RLIMITS: [&str; 16] = [
    "RLIMIT_CPU",
    "RLIMIT_FSIZE",
    "RLIMIT_DATA",
    "RLIMIT_STACK",
    "RLIMIT_CORE",
    "RLIMIT_RSS",
    "RLIMIT_NPROC",
    "RLIMIT_NOFILE",
    "RLIMIT_MEMLOCK",
    "RLIMIT_AS",
    "RLIMIT_LOCKS",
    "RLIMIT_SIGPENDING",
    "RLIMIT_MSGQUEUE",
    "RLIMIT_NICE",
    "RLIMIT_RTPRIO",
    "RLIMIT_RTTIME",
];

/// Every capability the guest kernel knows.
pub fn all() -> impl Iterator<Item = &'static str> {
    CAPABILITIES.iter().copied()
}

/// The number of capability `name` (`CAP_CHOWN` or `CHOWN`, any case).
pub fn capability(name: &str) -> Option<u32> {
    let upper = name.to_ascii_uppercase();
    let full = if upper.starts_with("CAP_") {
        upper
    } else {
        format!("CAP_{upper}")
    };
    CAPABILITIES
        .iter()
        .position(|c| *c == full)
        .map(|i| i as u32)
}

/// A set of capability names as a bit mask; unknown names are returned apart (runc warns
/// about them and goes on).
pub fn mask<'a>(names: impl IntoIterator<Item = &'a str>) -> (u64, Vec<String>) {
    let mut mask = 0u64;
    let mut unknown = Vec::new();
    for n in names {
        match capability(n) {
            Some(bit) => mask |= 1 << bit,
            None => unknown.push(n.to_string()),
        }
    }
    (mask, unknown)
}

/// The number of resource limit `name` (`RLIMIT_NOFILE`).
pub fn rlimit(name: &str) -> Option<u32> {
    RLIMITS.iter().position(|r| *r == name).map(|i| i as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_kernel_numbers() {
        assert_eq!(capability("CAP_CHOWN"), Some(0));
        assert_eq!(capability("net_bind_service"), Some(10));
        assert_eq!(capability("CAP_SYS_ADMIN"), Some(21));
        assert_eq!(capability("CAP_CHECKPOINT_RESTORE"), Some(40));
        assert_eq!(capability("CAP_NOPE"), None);
        assert_eq!(
            mask(["CAP_KILL", "CAP_SETUID", "CAP_BOGUS"]),
            ((1 << 5) | (1 << 7), vec!["CAP_BOGUS".to_string()])
        );
        // libc agrees on the limits we name.
        assert_eq!(rlimit("RLIMIT_NOFILE"), Some(libc::RLIMIT_NOFILE));
        assert_eq!(rlimit("RLIMIT_NPROC"), Some(libc::RLIMIT_NPROC));
        assert_eq!(rlimit("RLIMIT_RTTIME"), Some(libc::RLIMIT_RTTIME));
        assert_eq!(rlimit("RLIMIT_BOGUS"), None);
    }
}
