//! Test data: deterministic byte patterns that are cheap to make at any
//! offset, and a streaming content hash to compare files without holding
//! them in memory.

use std::hash::Hasher;
use std::io::Read;
use std::path::Path;

/// A deterministic, position-dependent byte stream: the byte at offset `o`
/// depends only on the seed and `o`, so any range can be made (or checked)
/// on its own, and shifted or truncated copies do not match by accident.
#[derive(Clone, Copy, Debug)]
pub struct Pattern {
    seed: u64,
}

impl Pattern {
    /// The pattern of `seed`.
    pub fn new(seed: u64) -> Pattern {
        Pattern { seed }
    }

    /// Fill `buf` with the bytes at `offset..offset + buf.len()`.
    pub fn fill(&self, offset: u64, buf: &mut [u8]) {
        let mut pos = offset;
        let mut i = 0;
        while i < buf.len() {
            let word = pos / 8;
            let v = mix(self.seed ^ word.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let bytes = v.to_le_bytes();
            let start = (pos % 8) as usize;
            let n = (8 - start).min(buf.len() - i);
            buf[i..i + n].copy_from_slice(&bytes[start..start + n]);
            i += n;
            pos += n as u64;
        }
    }

    /// The bytes at `offset..offset + len`.
    pub fn bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.fill(offset, &mut v);
        v
    }
}

impl Pattern {
    /// The first `len` bytes of the pattern as a reader.
    pub fn reader(&self, len: u64) -> PatternReader {
        PatternReader {
            pat: *self,
            off: 0,
            len,
        }
    }
}

/// A [`Pattern`] prefix as a reader, to hash or copy it without holding it.
pub struct PatternReader {
    pat: Pattern,
    off: u64,
    len: u64,
}

impl Read for PatternReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (self.len - self.off).min(buf.len() as u64) as usize;
        self.pat.fill(self.off, &mut buf[..n]);
        self.off += n as u64;
        Ok(n)
    }
}

/// splitmix64's finaliser.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Length and hash of everything `r` yields, read in 1 MiB chunks.
pub fn hash_reader(mut r: impl Read) -> std::io::Result<(u64, u64)> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.write(&buf[..n]);
        len += n as u64;
    }
    Ok((len, h.finish()))
}

/// Length and hash of the file at `path`.
pub fn hash_file(path: &Path) -> std::io::Result<(u64, u64)> {
    hash_reader(std::fs::File::open(path)?)
}

/// Hash of a byte slice, the same as [`hash_reader`] gives for it.
pub fn hash_bytes(bytes: &[u8]) -> (u64, u64) {
    hash_reader(bytes).expect("reading a slice cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_ranges_agree() {
        let p = Pattern::new(7);
        let whole = p.bytes(0, 100);
        assert_eq!(p.bytes(13, 50), whole[13..63].to_vec());
        assert_ne!(Pattern::new(8).bytes(0, 100), whole);
    }

    #[test]
    fn hash_is_chunking_independent() {
        let data = Pattern::new(1).bytes(0, 3 << 20);
        assert_eq!(hash_bytes(&data), hash_reader(&data[..]).expect("hash"));
        assert_eq!(hash_bytes(&data).0, 3 << 20);
    }
}
