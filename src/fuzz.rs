//! Entry points for fuzzing every parser a guest or an image reaches, one function per target:
//! `fuzz/` runs them under libFuzzer (`scripts/fuzz`, nightly), and `tests/fuzz_corpus.rs`
//! replays the kept corpus through them on stable, so CI catches a regression without a fuzzer.
//! Each takes arbitrary bytes and must return (any error is fine) without a panic, a hang or
//! unbounded memory.

use std::io::{self, Read};

use microvm_agent_protocol as proto;

/// One fuzz target: its name (a directory of `fuzz/corpus/`) and its entry point.
pub type Target = (&'static str, fn(&[u8]));

/// The targets.
pub const TARGETS: &[Target] = &[
    ("layer_tar", layer_tar),
    ("agent_host", agent_host),
    ("image_documents", image_documents),
    ("mount_flags", mount_flags),
    ("vsock_guest_packets", vsock_guest_packets),
    ("registry_text", registry_text),
];

/// A layer tar as the conversion reads it (decompressed), rewritten for tar2sqfs; with a
/// small data cap so that a claimed size cannot make a run slow.
pub fn layer_tar(data: &[u8]) {
    let _ = crate::image::fuzz_layer_rewrite(data, 1 << 20);
}

/// What the host reads from an agent: control messages one after another, a stream
/// connection's hello, then a stream's data frames; each part takes its share of `data`.
pub fn agent_host(data: &[u8]) {
    let mut control = data;
    for _ in 0..64 {
        if proto::recv(&mut control).is_err() {
            break;
        }
    }
    let _ = proto::recv_stream_hello(&mut &data[..]);
    let _ = proto::pump_from_frames(&mut &data[..], &mut io::sink());
    // A frame reader handed a slow reader (one byte at a time) sees the same.
    let _ = proto::recv(&mut OneByte(data));
}

/// Image documents: OCI manifests, indexes and configs, docker-archive manifest.json, and the
/// digests and names inside them.
pub fn image_documents(data: &[u8]) {
    use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};
    let _ = ImageManifest::from_reader(data);
    let _ = ImageIndex::from_reader(data);
    let _ = ImageConfiguration::from_reader(data);
    crate::image::fuzz_documents(data);
}

/// `-v` and `--mount` flags: `data` split at NUL bytes, the first half `-v` values, the rest
/// `--mount` values.
pub fn mount_flags(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let parts: Vec<String> = text.split('\0').map(str::to_owned).collect();
    let (v, m) = parts.split_at(parts.len() / 2);
    let _ = crate::volumes::parse_all(v, m);
}

/// vsock packet headers as the guest sends them, and the hybrid socket's CONNECT lines.
pub fn vsock_guest_packets(data: &[u8]) {
    use crate::devices::virtio::vsock::{handshake, packet};
    for chunk in data.chunks_exact(packet::HDR_SIZE) {
        let Ok(bytes) = <&[u8; packet::HDR_SIZE]>::try_from(chunk) else {
            continue;
        };
        let hdr = packet::Header::from_bytes(bytes);
        let _ = packet::check_guest_header(&hdr, 3);
        let _ = hdr.op();
        let _ = hdr.reset_reply();
    }
    let _ = handshake::parse_connect(data);
    let mut line = handshake::LineReader::default();
    for &b in data {
        if !matches!(line.push(b), Ok(None)) {
            break;
        }
    }
}

/// What a registry (or a user) hands over as text: references, WWW-Authenticate challenges.
pub fn registry_text(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = crate::registry::auth::parse_challenge(&text);
    let _ = crate::image::reference::normalize_name(&text);
    let _ = crate::image::reference::parse_transport(&text);
    let _ = crate::registry::reference::Reference::parse(&text);
}

/// A reader that hands out one byte per read.
struct OneByte<'a>(&'a [u8]);

impl Read for OneByte<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match (self.0.split_first(), buf.first_mut()) {
            (Some((&b, rest)), Some(slot)) => {
                *slot = b;
                self.0 = rest;
                Ok(1)
            }
            _ => Ok(0),
        }
    }
}
