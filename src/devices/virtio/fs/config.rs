//! The virtio-fs configuration space (virtio 1.2, 5.11.4): the mount tag the guest finds the
//! share by, and how many request queues there are. We serve it ourselves rather than asking the
//! backend, so it is ready before the guest looks and cannot change under it.

use super::Error;

/// Bytes of the `tag` field.
pub const TAG_BYTES: usize = 36;
/// Request queues we use (virtiofsd serves one); the hiprio queue comes on top.
pub const NUM_REQUEST_QUEUES: u32 = 1;
/// `tag` followed by `num_request_queues` (u32 LE).
pub const CONFIG_SIZE: usize = TAG_BYTES + 4;

/// Checks `tag` for the guest: non-empty, at most [`TAG_BYTES`] bytes, and no NUL (which would
/// end it early for the guest, since the field is NUL padded).
pub fn check_tag(tag: &str) -> Result<(), Error> {
    if tag.is_empty() {
        return Err(Error::TagEmpty);
    }
    if tag.len() > TAG_BYTES {
        return Err(Error::TagTooLong {
            tag: tag.to_owned(),
            len: tag.len(),
        });
    }
    if tag.contains('\0') {
        return Err(Error::TagNul(tag.to_owned()));
    }
    Ok(())
}

/// The configuration space for a checked `tag`.
pub fn config_bytes(tag: &str) -> Result<[u8; CONFIG_SIZE], Error> {
    check_tag(tag)?;
    let mut c = [0u8; CONFIG_SIZE];
    c[..tag.len()].copy_from_slice(tag.as_bytes());
    c[TAG_BYTES..].copy_from_slice(&NUM_REQUEST_QUEUES.to_le_bytes());
    Ok(c)
}
