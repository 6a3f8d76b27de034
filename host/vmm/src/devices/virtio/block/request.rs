//! virtio-blk requests: the 16-byte header the guest writes, the buffer for the data and the
//! status byte at the chain's end. Everything here comes from the guest and is checked before
//! the disk is touched.

use virtio_queue::{Reader, Writer};
use vm_memory::{ByteValued, Le32, Le64};

use crate::devices::virtio::Chain;
use crate::vstate::memory::GuestMemory;

pub const SECTOR_SIZE: u64 = 512;
/// Bytes of a disk identity (`VIRTIO_BLK_T_GET_ID`): a serial number, NUL-padded.
pub const ID_BYTES: usize = 20;

/// Request types.
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;

/// Status values written to the chain's last byte.
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

/// The request header, little-endian on the wire.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestHeader {
    pub type_: Le32,
    pub reserved: Le32,
    pub sector: Le64,
}

// SAFETY: a packed struct of little-endian integers: every bit pattern is valid and it has no
// padding.
unsafe impl ByteValued for RequestHeader {}

pub const HEADER_SIZE: usize = std::mem::size_of::<RequestHeader>();

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("descriptor chain is malformed or points outside guest memory")]
    BadChain,
    #[error("chain too short for a request header")]
    ShortHeader,
    #[error("chain has no writable status byte")]
    NoStatus,
}

/// A request as the guest laid it out: what it asks for, where the answer goes and where its
/// status goes.
pub struct Request<'a> {
    pub type_: u32,
    pub sector: u64,
    /// The device-writable bytes before the status byte: the data of a read, the identity.
    pub data: Writer<'a>,
    pub status: Writer<'a>,
}

impl<'a> Request<'a> {
    /// Parses a chain: the header from its readable part, the status from the last writable
    /// byte, the data from the writable bytes before it.
    pub fn parse(mem: &'a GuestMemory, chain: Chain<'_>) -> Result<Self, RequestError> {
        let mut reader = Reader::new(mem, chain.clone()).map_err(|_| RequestError::BadChain)?;
        if reader.available_bytes() < HEADER_SIZE {
            return Err(RequestError::ShortHeader);
        }
        let header: RequestHeader = reader.read_obj().map_err(|_| RequestError::BadChain)?;
        let mut data = Writer::new(mem, chain).map_err(|_| RequestError::BadChain)?;
        let data_len = data
            .available_bytes()
            .checked_sub(1)
            .ok_or(RequestError::NoStatus)?;
        let status = data
            .split_at(data_len)
            .map_err(|_| RequestError::BadChain)?;
        Ok(Self {
            type_: header.type_.into(),
            sector: header.sector.into(),
            data,
            status,
        })
    }
}

/// Why a read was refused before the disk was touched.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum RangeError {
    #[error("read of {0} bytes is not a whole number of sectors")]
    NotSectors(usize),
    #[error("read of {0} bytes is larger than one request may be")]
    TooLarge(usize),
    #[error("read of sectors {sector}+{len} bytes ends past the disk's {capacity} bytes")]
    PastEnd {
        sector: u64,
        len: usize,
        capacity: u64,
    },
}

/// The byte offset a read of `len` bytes at `sector` starts at, when it lies within a disk of
/// `capacity` bytes and `len` is a whole number of sectors of at most `max_len`.
pub fn read_offset(
    sector: u64,
    len: usize,
    capacity: u64,
    max_len: usize,
) -> Result<u64, RangeError> {
    if !(len as u64).is_multiple_of(SECTOR_SIZE) {
        return Err(RangeError::NotSectors(len));
    }
    if len > max_len {
        return Err(RangeError::TooLarge(len));
    }
    let past_end = RangeError::PastEnd {
        sector,
        len,
        capacity,
    };
    let offset = sector.checked_mul(SECTOR_SIZE).ok_or(past_end.clone())?;
    let end = offset.checked_add(len as u64).ok_or(past_end.clone())?;
    if end > capacity {
        return Err(past_end);
    }
    Ok(offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn reads_inside_the_disk_start_at_their_sector() {
        assert_eq!(read_offset(0, 512, MIB, 4096), Ok(0));
        assert_eq!(read_offset(2, 1024, MIB, 4096), Ok(1024));
        assert_eq!(read_offset(MIB / 512 - 1, 512, MIB, 4096), Ok(MIB - 512));
        // An empty read at the end is within the disk.
        assert_eq!(read_offset(MIB / 512, 0, MIB, 4096), Ok(MIB));
    }

    #[test]
    fn reads_past_the_end_partial_sectors_and_huge_sectors_are_refused() {
        assert!(matches!(
            read_offset(MIB / 512, 512, MIB, 4096),
            Err(RangeError::PastEnd { .. })
        ));
        assert_eq!(
            read_offset(0, 100, MIB, 4096),
            Err(RangeError::NotSectors(100))
        );
        assert_eq!(
            read_offset(0, 8192, MIB, 4096),
            Err(RangeError::TooLarge(8192))
        );
        // Sector numbers whose byte offset overflows, or whose end does.
        assert!(matches!(
            read_offset(u64::MAX, 512, MIB, 4096),
            Err(RangeError::PastEnd { .. })
        ));
        assert!(matches!(
            read_offset(u64::MAX / 512, 512, u64::MAX, 4096),
            Err(RangeError::PastEnd { .. })
        ));
    }
}
