//! The host side of the hybrid design's handshake: a host process connects to the Unix socket and
//! writes `CONNECT <port>\n` to reach guest port `<port>`; once the guest accepts it reads
//! `OK <host port>\n`. Pure parsing: bytes in, a port or an error out.

use thiserror::Error;

/// Longest line we wait for; `CONNECT 4294967295\n` is 19 bytes.
pub const MAX_LINE: usize = 32;

/// Why a host connection was closed during the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HandshakeError {
    /// No newline within [`MAX_LINE`] bytes.
    #[error("the handshake line is longer than {MAX_LINE} bytes")]
    TooLong,
    /// Not `CONNECT <port>`.
    #[error("expected `CONNECT <port>`, got {0:?}")]
    Garbage(String),
    /// The port is not a decimal number that fits 32 bits.
    #[error("bad port number {0:?}")]
    BadPort(String),
}

/// Collects one handshake line, a byte at a time (so nothing after the newline is consumed:
/// it is stream data for the guest).
#[derive(Debug, Default)]
pub struct LineReader {
    line: Vec<u8>,
}

impl LineReader {
    /// Adds one byte; returns the requested guest port once the line is complete.
    pub fn push(&mut self, byte: u8) -> Result<Option<u32>, HandshakeError> {
        if byte == b'\n' {
            return parse_connect(&self.line).map(Some);
        }
        if self.line.len() + 1 >= MAX_LINE {
            return Err(HandshakeError::TooLong);
        }
        self.line.push(byte);
        Ok(None)
    }
}

/// Parses `CONNECT <port>` (without the newline): one space, decimal digits only.
pub fn parse_connect(line: &[u8]) -> Result<u32, HandshakeError> {
    let shown = || String::from_utf8_lossy(line).into_owned();
    let digits = line
        .strip_prefix(b"CONNECT ")
        .ok_or_else(|| HandshakeError::Garbage(shown()))?;
    // `str::parse` would also take "+5"; only plain digits are a port.
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(HandshakeError::BadPort(shown()));
    }
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .ok_or_else(|| HandshakeError::BadPort(shown()))
}

/// The reply once the guest accepted: the host-side port of the new connection.
pub fn ok_line(host_port: u32) -> String {
    format!("OK {host_port}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(bytes: &[u8]) -> Result<Option<u32>, HandshakeError> {
        let mut r = LineReader::default();
        for &b in bytes {
            if let Some(port) = r.push(b)? {
                return Ok(Some(port));
            }
        }
        Ok(None)
    }

    #[test]
    fn good_lines() {
        assert_eq!(feed(b"CONNECT 5678\n"), Ok(Some(5678)));
        assert_eq!(feed(b"CONNECT 0\n"), Ok(Some(0)));
        assert_eq!(feed(b"CONNECT 4294967295\n"), Ok(Some(u32::MAX)));
        assert_eq!(feed(b"CONNECT 12"), Ok(None), "incomplete");
        assert_eq!(ok_line(1 << 30), "OK 1073741824\n");
    }

    #[test]
    fn garbage_is_refused() {
        for line in [
            &b"connect 5\n"[..],
            b"CONNECT5\n",
            b"\n",
            b"HELLO\n",
            b"\x00\xff\n",
        ] {
            assert!(
                matches!(feed(line), Err(HandshakeError::Garbage(_))),
                "{line:?}"
            );
        }
    }

    #[test]
    fn bad_ports_are_refused() {
        for line in [
            &b"CONNECT \n"[..],
            b"CONNECT -1\n",
            b"CONNECT +5\n",
            b"CONNECT 4294967296\n",
            b"CONNECT 99999999999\n",
            b"CONNECT 12 \n",
            b"CONNECT  12\n",
            b"CONNECT 12\r\n",
            b"CONNECT 0x10\n",
        ] {
            assert!(
                matches!(feed(line), Err(HandshakeError::BadPort(_))),
                "{line:?}"
            );
        }
    }

    #[test]
    fn endless_lines_are_cut_off() {
        let long = vec![b'7'; 100];
        let mut line = b"CONNECT ".to_vec();
        line.extend_from_slice(&long);
        assert_eq!(feed(&line), Err(HandshakeError::TooLong));
        assert_eq!(feed(&[b'x'; MAX_LINE]), Err(HandshakeError::TooLong));
    }
}
