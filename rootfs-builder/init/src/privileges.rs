//! What a process may do besides its uid and gids, applied in the forked child before exec as
//! runc applies a bundle's `process`: resource limits, umask, the capability bounding set
//! (before setuid, while CAP_SETPCAP is still effective), the capability sets kept across
//! setuid, ambient capabilities, and no_new_privs. Everything is computed before the fork; the
//! child makes raw syscalls only.

use std::io;

use microvm_agent_protocol::{Capabilities, ProcessOptions, Rlimit};

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit capability sets in two 32-bit words.
const CAP_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The privileges of one process, ready to apply.
pub struct Plan {
    umask: Option<u32>,
    rlimits: Vec<Rlimit>,
    capabilities: Option<Capabilities>,
    no_new_privileges: bool,
    /// The highest capability number the guest kernel knows.
    last_cap: u32,
}

impl Plan {
    /// Prepares `options` (reads the kernel's last capability number now, not in the child).
    pub fn new(options: &ProcessOptions) -> Plan {
        let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(40)
            .min(63);
        Plan {
            umask: options.umask,
            rlimits: options.rlimits.clone(),
            capabilities: options.capabilities,
            no_new_privileges: options.no_new_privileges,
            last_cap,
        }
    }

    /// Limits, umask, the bounding set and keep-caps; in the child, while still root.
    pub fn apply_before_setuid(&self) -> io::Result<()> {
        for r in &self.rlimits {
            let lim = libc::rlimit {
                rlim_cur: r.soft,
                rlim_max: r.hard,
            };
            // SAFETY: setrlimit reads one rlimit from a valid pointer.
            check(unsafe { libc::setrlimit(r.resource as _, &lim) })?;
        }
        if let Some(mask) = self.umask {
            // SAFETY: umask cannot fail.
            unsafe { libc::umask(mask & 0o777) };
        }
        if let Some(caps) = &self.capabilities {
            for cap in 0..=self.last_cap {
                if caps.bounding & (1 << cap) == 0 {
                    // SAFETY: a plain prctl on this process.
                    check(unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong) })?;
                }
            }
            // Keep the permitted set across setuid to a non-root user.
            // SAFETY: a plain prctl on this process.
            check(unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1 as libc::c_ulong) })?;
        }
        Ok(())
    }

    /// The capability sets, ambient capabilities and no_new_privs; in the child, after setuid.
    pub fn apply_after_setuid(&self) -> io::Result<()> {
        if let Some(caps) = &self.capabilities {
            let mut header = CapHeader {
                version: CAP_VERSION_3,
                pid: 0,
            };
            let word = |set: u64, i: usize| (set >> (32 * i)) as u32;
            let mut data = [CapData {
                effective: 0,
                permitted: 0,
                inheritable: 0,
            }; 2];
            for (i, d) in data.iter_mut().enumerate() {
                d.effective = word(caps.effective, i);
                d.permitted = word(caps.permitted, i);
                d.inheritable = word(caps.inheritable, i);
            }
            // SAFETY: capset reads a version-3 header and two data words from valid pointers.
            check(unsafe {
                libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) as libc::c_int
            })?;
            for cap in 0..=self.last_cap {
                if caps.ambient & (1 << cap) != 0 {
                    // SAFETY: a plain prctl on this process.
                    check(unsafe {
                        libc::prctl(
                            libc::PR_CAP_AMBIENT,
                            libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                            cap as libc::c_ulong,
                            0 as libc::c_ulong,
                            0 as libc::c_ulong,
                        )
                    })?;
                }
            }
        }
        if self.no_new_privileges {
            // SAFETY: a plain prctl on this process.
            check(unsafe {
                libc::prctl(
                    libc::PR_SET_NO_NEW_PRIVS,
                    1 as libc::c_ulong,
                    0 as libc::c_ulong,
                    0 as libc::c_ulong,
                    0 as libc::c_ulong,
                )
            })?;
        }
        Ok(())
    }
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
