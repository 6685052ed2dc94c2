//! sha256 content digests: parsing (the only gate between a manifest's strings and a store path)
//! and hashing while data streams past.

use std::fmt;
use std::io::{self, Read, Write};

use sha2::{Digest as _, Sha256};

use super::Error;

/// A validated `sha256:<64 lower-case hex>` digest; its hex part is safe to use as a file name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    /// Parses `sha256:<hex>`; anything else (other algorithms, upper case, `..`) is refused.
    pub fn parse(s: &str) -> Result<Digest, Error> {
        match s.strip_prefix("sha256:") {
            Some(hex) if is_sha256_hex(hex) => Ok(Digest(s.to_string())),
            _ => Err(Error::BadDigest(s.chars().take(100).collect())),
        }
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(format!("sha256:{:x}", Sha256::digest(bytes)))
    }

    /// The 64 hex digits.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    /// The whole `sha256:<hex>` string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// True for exactly 64 lower-case hex digits.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Checks `bytes` against an expected digest and size.
pub(crate) fn verify_bytes(bytes: &[u8], digest: &Digest, size: Option<u64>) -> Result<(), Error> {
    if let Some(expected) = size {
        if bytes.len() as u64 != expected {
            return Err(Error::SizeMismatch {
                digest: digest.to_string(),
                expected,
                actual: bytes.len() as u64,
            });
        }
    }
    let actual = Digest::of(bytes);
    if &actual != digest {
        return Err(Error::DigestMismatch {
            digest: digest.to_string(),
            actual: actual.to_string(),
        });
    }
    Ok(())
}

/// A writer that hashes and counts everything written through it.
pub(crate) struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W: Write> HashingWriter<W> {
    /// Wraps `inner`.
    pub(crate) fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            len: 0,
        }
    }

    /// The digest and length of what was written, and the inner writer.
    pub(crate) fn finish(self) -> (Digest, u64, W) {
        let d = Digest(format!("sha256:{:x}", self.hasher.finalize()));
        (d, self.len, self.inner)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that hashes and counts everything read through it.
pub(crate) struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    len: u64,
}

impl<R: Read> HashingReader<R> {
    /// Wraps `inner`.
    pub(crate) fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            len: 0,
        }
    }

    /// Reads whatever is left (so the digest covers the whole input), then returns the digest
    /// and total length.
    pub(crate) fn drain_and_finish(mut self) -> io::Result<(Digest, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((
            Digest(format!("sha256:{:x}", self.hasher.finalize())),
            self.len,
        ))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_only_sha256_lower_hex() {
        let hex = "a".repeat(64);
        assert_eq!(Digest::parse(&format!("sha256:{hex}")).unwrap().hex(), hex);
        for bad in [
            format!("sha256:{}", "A".repeat(64)),
            format!("sha512:{hex}"),
            format!("sha256:{}", "a".repeat(63)),
            "sha256:../../../../etc/passwd".to_string(),
            format!("sha256:{}/x", "a".repeat(62)),
            hex.clone(),
            String::new(),
        ] {
            assert!(Digest::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hashing_reader_and_writer_agree_with_of() {
        let data = b"hello world".repeat(1000);
        let d = Digest::of(&data);
        let mut w = HashingWriter::new(Vec::new());
        w.write_all(&data).unwrap();
        let (dw, len, out) = w.finish();
        assert_eq!(
            (dw, len, out.len()),
            (d.clone(), data.len() as u64, data.len())
        );
        let r = HashingReader::new(&data[..]);
        assert_eq!(
            r.drain_and_finish().unwrap(),
            (d.clone(), data.len() as u64)
        );
        assert!(verify_bytes(&data, &d, Some(data.len() as u64)).is_ok());
        assert!(matches!(
            verify_bytes(&data[1..], &d, None),
            Err(Error::DigestMismatch { .. })
        ));
    }
}
