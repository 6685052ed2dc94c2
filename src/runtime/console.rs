//! The container's terminal for an engine (`--console-socket`): a pseudo-terminal whose master
//! goes to the engine over the socket (SCM_RIGHTS, with the slave's name, as runc sends it)
//! and whose slave becomes the supervisor's stdio. The supervisor keeps the slave raw and
//! relays bytes to the terminal in the guest, where the line discipline runs once; a resize of
//! the master reaches the supervisor as SIGWINCH and the guest as a resize.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

/// Checks that a console socket comes exactly with a terminal, in runc's words.
pub fn check(tty: bool, socket: Option<&Path>) -> Result<(), String> {
    match (tty, socket) {
        (true, None) => {
            Err("cannot allocate tty if runc will detach without setting console socket".into())
        }
        (false, Some(_)) => {
            Err("cannot use console socket if runc will not detach or allocate tty".into())
        }
        _ => Ok(()),
    }
}

/// A terminal whose master went to the engine.
pub struct Console {
    /// The slave side, for the supervisor's stdio.
    pub slave: OwnedFd,
}

/// Opens a pseudo-terminal of `size` (rows, columns) and sends its master to the engine
/// listening on `socket`.
pub fn hand_over(socket: &Path, size: Option<(u16, u16)>) -> Result<Console, String> {
    let winsize = size.map(|(rows, cols)| nix::pty::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    });
    let pty = nix::pty::openpty(winsize.as_ref(), None)
        .map_err(|e| format!("cannot allocate a terminal: {e}"))?;
    let name = nix::unistd::ttyname(&pty.slave)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "/dev/ptmx".into());
    let conn = UnixStream::connect(socket)
        .map_err(|e| format!("console socket {}: {e}", socket.display()))?;
    let fds = [pty.master.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let iov = [IoSlice::new(name.as_bytes())];
    sendmsg::<()>(conn.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
        .map_err(|e| format!("cannot send the terminal over {}: {e}", socket.display()))?;
    // The engine holds the master now; ours closes.
    drop(pty.master);
    Ok(Console { slave: pty.slave })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::IoSliceMut;
    use std::os::fd::FromRawFd;
    use std::os::unix::net::UnixListener;

    #[test]
    fn the_master_arrives_over_the_socket_and_carries_bytes() {
        use std::io::{Read, Write};
        let path =
            std::env::temp_dir().join(format!("microvm-console-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let console = hand_over(&path, Some((30, 100))).unwrap();
        let (conn, _) = listener.accept().unwrap();
        let mut buf = [0u8; 128];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = nix::sys::socket::recvmsg::<()>(
            conn.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::empty(),
        )
        .unwrap();
        let fd = msg
            .cmsgs()
            .unwrap()
            .find_map(|c| match c {
                nix::sys::socket::ControlMessageOwned::ScmRights(fds) => fds.first().copied(),
                _ => None,
            })
            .expect("a descriptor");
        let len = msg.bytes;
        let name = String::from_utf8_lossy(&buf[..len]).to_string();
        assert!(name.starts_with("/dev/pts/"), "{name}");
        // SAFETY: the descriptor just arrived over SCM_RIGHTS and is ours alone.
        let mut master = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut slave = std::fs::File::from(console.slave);
        let mut raw = nix::sys::termios::tcgetattr(&slave).unwrap();
        nix::sys::termios::cfmakeraw(&mut raw);
        nix::sys::termios::tcsetattr(&slave, nix::sys::termios::SetArg::TCSANOW, &raw).unwrap();
        slave.write_all(b"hello").unwrap();
        let mut got = [0u8; 5];
        master.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        let _ = std::fs::remove_file(&path);
    }
}
