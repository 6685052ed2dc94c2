//! The disk serial the guest reads with VIRTIO_BLK_T_GET_ID: up to 20 bytes, NUL-padded when
//! shorter (and then NUL-terminated, which is how the guest finds its end).

use super::Error;

/// Size of the id field (VIRTIO_BLK_ID_BYTES).
pub const SERIAL_BYTES: usize = virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES as usize;

/// `serial` as the guest sees it; refused if it cannot be read back unchanged.
pub fn serial_id(serial: &str) -> Result<[u8; SERIAL_BYTES], Error> {
    let bytes = serial.as_bytes();
    if bytes.len() > SERIAL_BYTES {
        return Err(Error::SerialTooLong {
            serial: serial.to_owned(),
            len: bytes.len(),
        });
    }
    if bytes.contains(&0) {
        return Err(Error::SerialNul(serial.to_owned()));
    }
    let mut id = [0u8; SERIAL_BYTES];
    id[..bytes.len()].copy_from_slice(bytes);
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_nul_padded_and_checked() {
        assert_eq!(&serial_id("root").unwrap()[..6], b"root\0\0");
        assert_eq!(serial_id("").unwrap(), [0; SERIAL_BYTES]);
        let full = "a".repeat(SERIAL_BYTES);
        assert_eq!(&serial_id(&full).unwrap()[..], full.as_bytes());
        let e = serial_id(&"é".repeat(11)).unwrap_err();
        assert!(e.to_string().contains("is 22 bytes"), "{e}");
        assert!(e.to_string().contains("at most 20 bytes"), "{e}");
        let e = serial_id("a\0b").unwrap_err();
        assert!(e.to_string().contains("NUL"), "{e}");
    }
}
