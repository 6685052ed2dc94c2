//! Deferred teardown: destroying a KVM VM can take tens of milliseconds (on PVM, 20+ ms in the
//! VM fd's final close), which would otherwise delay our exit status. A forked keeper inherits the
//! VM fd, waits until we have exited, and only then drops the last reference, so the kernel tears
//! the VM down after our caller already has the guest's exit status.

use std::os::fd::{AsRawFd, RawFd};

/// Forks the keeper, which holds `vm_fd` until this process exits. Everything else the keeper
/// inherited (standard streams included) is closed at once, so a caller reading our output sees
/// end-of-file when we exit, not when the keeper does.
pub fn defer(vm_fd: RawFd) -> std::io::Result<()> {
    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let (r, w) = (read_end.as_raw_fd(), write_end.as_raw_fd());
    // SAFETY: the child calls only async-signal-safe functions (close_range, read, _exit), as
    // required after fork in a multi-threaded process, and never returns into Rust code.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        // SAFETY: this is the forked child, which the function below never lets return.
        0 => unsafe { keep_until_parent_exits(r, w, vm_fd) },
        _ => {
            // Closed by the kernel when this process exits, releasing the keeper.
            std::mem::forget(write_end);
            Ok(())
        }
    }
}

/// The keeper's whole life: close every descriptor but `r` and `vm_fd` (the write end `w`
/// first, or EOF would never come), wait for EOF on `r`, exit.
///
/// # Safety
/// Call only in a freshly forked child; it uses async-signal-safe calls alone and never returns.
unsafe fn keep_until_parent_exits(r: RawFd, w: RawFd, vm_fd: RawFd) -> ! {
    // SAFETY: these calls only close descriptors of this process, none of which Rust code will
    // touch again (the child never returns from this function), and name the process.
    unsafe {
        libc::close(w);
        libc::prctl(libc::PR_SET_NAME, c"microvm-keeper".as_ptr());
        let (low, high) = (r.min(vm_fd) as u32, r.max(vm_fd) as u32);
        let mut ok = low == 0 || libc::close_range(0, low - 1, 0) == 0;
        ok &= high == low + 1 || libc::close_range(low + 1, high - 1, 0) == 0;
        ok &= libc::close_range(high + 1, u32::MAX, 0) == 0;
        if !ok {
            // No close_range (old kernel, seccomp): close one by one up to the fd limit.
            let mut limit = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
                limit.rlim_cur.min(1 << 20) as i32
            } else {
                1024
            };
            for fd in (0..max).filter(|fd| *fd != r && *fd != vm_fd) {
                libc::close(fd);
            }
        }
    }
    let mut byte = 0u8;
    // read() returns 0 once the parent's write end is gone, that is once the parent has exited.
    loop {
        // SAFETY: `byte` is a valid one-byte buffer that outlives the call.
        let n = unsafe { libc::read(r, (&mut byte as *mut u8).cast(), 1) };
        // SAFETY: errno is thread-local and valid to read right after the failed call.
        if n >= 0 || unsafe { *libc::__errno_location() } != libc::EINTR {
            break;
        }
    }
    // SAFETY: ends the child without running Rust or libc exit handlers, which are not
    // async-signal-safe; the kernel then drops the last VM reference.
    unsafe { libc::_exit(0) }
}
