//! The uncompressed ELF kernel (`vmlinux`) inside a bzImage, for VMMs that only boot ELF kernels
//! (Firecracker on x86_64) and to compare an ELF boot with a bzImage boot.
//!
//! A bzImage is the real-mode setup sectors followed by the protected-mode part, which holds the
//! compressed kernel at `payload_offset` for `payload_length` bytes (boot protocol 2.08+). Debian's
//! kernels compress it with LZ4 in its legacy framing: a magic number, then blocks of at most
//! 8 MiB, each preceded by its compressed length (the magic may recur between blocks); the
//! kernel's build appends the uncompressed size as a last 32-bit word, which is checked, so a
//! truncated payload is an error rather than a short kernel. Other compressions are named in the
//! error.

use std::fs;
use std::path::Path;

use super::elf::{MAGIC as ELF_MAGIC, read_u16, read_u32};

/// Offsets in the setup header (Documentation/arch/x86/boot.rst).
const SETUP_SECTS: usize = 0x1f1;
const HEADER_MAGIC_AT: usize = 0x202;
const HEADER_MAGIC: &[u8; 4] = b"HdrS";
const VERSION_AT: usize = 0x206;
const PAYLOAD_OFFSET_AT: usize = 0x248;
const PAYLOAD_LENGTH_AT: usize = 0x24c;
/// The first boot protocol with `payload_offset` and `payload_length`.
const MIN_VERSION: u16 = 0x0208;
const SECTOR: usize = 512;

const LZ4_LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
const LZ4_LEGACY_MAGIC_WORD: u32 = u32::from_le_bytes(LZ4_LEGACY_MAGIC);
const LZ4_LEGACY_BLOCK: usize = 8 << 20;
/// No kernel comes near this; it bounds what a corrupt file can make us allocate.
const MAX_VMLINUX: usize = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum VmlinuxError {
    #[error("cannot read the kernel {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the unpacked kernel {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("not a bzImage of boot protocol 2.08 or later: {0}")]
    NotBzImage(&'static str),
    #[error(
        "the bzImage's kernel is compressed with {0}, which cannot be unpacked here (only LZ4)"
    )]
    Compression(&'static str),
    #[error("the bzImage's LZ4 payload is corrupt: {0}")]
    Corrupt(&'static str),
    #[error("the bzImage's payload did not unpack to an ELF kernel")]
    NotElf,
}

/// Writes the ELF kernel inside the bzImage at `bzimage` to `out`.
pub fn unpack_file(bzimage: &Path, out: &Path) -> Result<(), VmlinuxError> {
    let bytes = fs::read(bzimage).map_err(|source| VmlinuxError::Read {
        path: bzimage.display().to_string(),
        source,
    })?;
    let elf = unpack(&bytes)?;
    fs::write(out, elf).map_err(|source| VmlinuxError::Write {
        path: out.display().to_string(),
        source,
    })
}

/// The ELF kernel inside a bzImage.
pub fn unpack(bzimage: &[u8]) -> Result<Vec<u8>, VmlinuxError> {
    let payload = payload(bzimage)?;
    let elf = match payload {
        [0x02, 0x21, 0x4c, 0x18, ..] => lz4_legacy(&payload[LZ4_LEGACY_MAGIC.len()..])?,
        [0x1f, 0x8b, ..] => return Err(VmlinuxError::Compression("gzip")),
        [0xfd, b'7', b'z', b'X', b'Z', ..] => return Err(VmlinuxError::Compression("xz")),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => return Err(VmlinuxError::Compression("zstd")),
        [b'B', b'Z', b'h', ..] => return Err(VmlinuxError::Compression("bzip2")),
        [0x89, b'L', b'Z', b'O', ..] => return Err(VmlinuxError::Compression("LZO")),
        _ => return Err(VmlinuxError::Compression("an unknown format")),
    };
    if !elf.starts_with(ELF_MAGIC) {
        return Err(VmlinuxError::NotElf);
    }
    Ok(elf)
}

/// The compressed kernel within the bzImage.
fn payload(b: &[u8]) -> Result<&[u8], VmlinuxError> {
    if b.get(HEADER_MAGIC_AT..HEADER_MAGIC_AT + 4) != Some(HEADER_MAGIC) {
        return Err(VmlinuxError::NotBzImage("no HdrS setup header"));
    }
    let version = read_u16(b, VERSION_AT).ok_or(VmlinuxError::NotBzImage("short header"))?;
    if version < MIN_VERSION {
        return Err(VmlinuxError::NotBzImage("boot protocol too old"));
    }
    // A setup_sects of 0 means 4, for old kernels' sake.
    let setup_sects = match b.get(SETUP_SECTS) {
        Some(0) => 4,
        Some(&n) => usize::from(n),
        None => return Err(VmlinuxError::NotBzImage("short header")),
    };
    let offset = read_u32(b, PAYLOAD_OFFSET_AT).ok_or(VmlinuxError::NotBzImage("short header"))?;
    let length = read_u32(b, PAYLOAD_LENGTH_AT).ok_or(VmlinuxError::NotBzImage("short header"))?;
    let start = (setup_sects + 1) * SECTOR + offset as usize;
    start
        .checked_add(length as usize)
        .and_then(|end| b.get(start..end))
        .ok_or(VmlinuxError::NotBzImage("payload outside the file"))
}

/// Decodes LZ4 legacy blocks up to the kernel's trailing size word, which must be all that is
/// left and must match what was decoded.
fn lz4_legacy(mut rest: &[u8]) -> Result<Vec<u8>, VmlinuxError> {
    let mut out = Vec::new();
    let mut block = vec![0u8; LZ4_LEGACY_BLOCK];
    loop {
        let word = read_u32(rest, 0).ok_or(VmlinuxError::Corrupt("it has no size trailer"))?;
        if rest.len() == 4 {
            if word as usize != out.len() || out.is_empty() {
                return Err(VmlinuxError::Corrupt("it is truncated"));
            }
            return Ok(out);
        }
        if word == LZ4_LEGACY_MAGIC_WORD {
            rest = &rest[4..];
            continue;
        }
        let compressed = rest
            .get(4..4 + word as usize)
            .filter(|c| !c.is_empty())
            .ok_or(VmlinuxError::Corrupt(
                "a block is empty or runs past its end",
            ))?;
        let n = lz4_flex::block::decompress_into(compressed, &mut block)
            .map_err(|_| VmlinuxError::Corrupt("a block does not decode"))?;
        if out.len() + n > MAX_VMLINUX {
            return Err(VmlinuxError::Corrupt("it unpacks to more than 1 GiB"));
        }
        out.extend_from_slice(&block[..n]);
        rest = &rest[4 + compressed.len()..];
    }
}

#[cfg(test)]
pub fn test_bzimage(elf: &[u8]) -> Vec<u8> {
    tests::bzimage(&tests::lz4_payload(&[elf], elf.len() as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bzImage-shaped file: one setup sector plus the boot sector, then `payload`.
    pub fn bzimage(payload: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 2 * SECTOR];
        b[SETUP_SECTS] = 1;
        b[HEADER_MAGIC_AT..HEADER_MAGIC_AT + 4].copy_from_slice(HEADER_MAGIC);
        b[VERSION_AT..VERSION_AT + 2].copy_from_slice(&0x020fu16.to_le_bytes());
        b[PAYLOAD_OFFSET_AT..PAYLOAD_OFFSET_AT + 4].copy_from_slice(&16u32.to_le_bytes());
        b[PAYLOAD_LENGTH_AT..PAYLOAD_LENGTH_AT + 4]
            .copy_from_slice(&(payload.len() as u32).to_le_bytes());
        b.extend_from_slice(&[0u8; 16]);
        b.extend_from_slice(payload);
        b
    }

    pub fn lz4_payload(blocks: &[&[u8]], trailer: u32) -> Vec<u8> {
        let mut p = LZ4_LEGACY_MAGIC.to_vec();
        for block in blocks {
            let c = lz4_flex::block::compress(block);
            p.extend_from_slice(&(c.len() as u32).to_le_bytes());
            p.extend_from_slice(&c);
        }
        p.extend_from_slice(&trailer.to_le_bytes());
        p
    }

    #[test]
    fn unpacks_lz4_legacy_blocks_up_to_a_matching_size_trailer() {
        let first: Vec<u8> = ELF_MAGIC
            .iter()
            .copied()
            .chain((0..5000u32).map(|i| i as u8))
            .collect();
        let second = vec![7u8; 3000];
        let total = (first.len() + second.len()) as u32;
        let image = bzimage(&lz4_payload(&[&first, &second], total));
        let elf = unpack(&image).unwrap();
        assert_eq!(elf, [first.clone(), second.clone()].concat());
        // The magic may recur between blocks, as when streams are concatenated.
        let mut payload = lz4_payload(&[&first], 0);
        payload.truncate(payload.len() - 4);
        payload.extend_from_slice(&lz4_payload(&[&second], total));
        assert_eq!(
            unpack(&bzimage(&payload)).unwrap(),
            [first, second].concat()
        );
    }

    #[test]
    fn refuses_what_it_cannot_unpack() {
        let zstd = bzimage(&[0x28, 0xb5, 0x2f, 0xfd, 0, 0]);
        assert!(matches!(
            unpack(&zstd),
            Err(VmlinuxError::Compression("zstd"))
        ));
        let not_elf = bzimage(&lz4_payload(&[b"plain text, not a kernel"], 24));
        assert!(matches!(unpack(&not_elf), Err(VmlinuxError::NotElf)));
        let mut no_header = bzimage(b"");
        no_header[HEADER_MAGIC_AT] = 0;
        assert!(matches!(
            unpack(&no_header),
            Err(VmlinuxError::NotBzImage(_))
        ));
        let mut beyond = bzimage(&lz4_payload(&[b"\x7fELF"], 4));
        beyond[PAYLOAD_LENGTH_AT..PAYLOAD_LENGTH_AT + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(unpack(&beyond), Err(VmlinuxError::NotBzImage(_))));
        let mut garbage = LZ4_LEGACY_MAGIC.to_vec();
        garbage.extend_from_slice(&4u32.to_le_bytes());
        garbage.extend_from_slice(&[0xff; 4]);
        assert!(matches!(
            unpack(&bzimage(&garbage)),
            Err(VmlinuxError::Corrupt(_))
        ));
    }
}
