//! The layout of a model disk as a pmem region: a Linux "pfn" info block, then the erofs image.
//!
//! A virtio-pmem region without metadata is a raw namespace to the guest kernel, which reads it
//! through its page cache like any block device. With an info block (`NVDIMM_PFN_INFO`, at 4 KiB
//! into the region, as `drivers/nvdimm/pfn.h` lays it out) the kernel gives the region page
//! structures and file systems on it may map its pages directly (`dax`): the guest then keeps
//! no copy of what it reads, and every VM reads the host's one copy. The page structures are
//! kept in guest RAM ("ram" mode), 64 bytes per 4 KiB page of the region.
//!
//! The same image also serves as a virtio-blk disk: its first sector is a DOS partition table
//! whose one partition is the file system, so the guest finds it at `/dev/vdX1` (a pmem region's
//! device starts at the data offset and never shows the table).
//!
//! ```text
//! 0        partition table (512 bytes): one Linux partition from 2 MiB to the end
//! 4 KiB    info block (4 KiB): signature, data offset, page count, mode, alignment, checksum
//! 2 MiB    the erofs image, then zeros up to the next 2 MiB
//! ```

/// Where the file system starts, and the unit the region's size is a multiple of: Linux maps
/// device memory in 2 MiB subsections and wants the data aligned to its huge page size.
pub const DATA_OFFSET: u64 = 2 << 20;
pub const REGION_ALIGN: u64 = 2 << 20;
/// Where the info block sits in the region.
pub const INFO_OFFSET: u64 = 4096;
pub const INFO_BYTES: usize = 4096;
const SIGNATURE: &[u8; 16] = b"NVDIMM_PFN_INFO\0";
/// Page structures in guest RAM, not in the region (which is read-only).
const MODE_RAM: u32 = 1;
const PAGE: u64 = 4096;
/// Version 1.2: the last fields (page size and page-structure size) take the kernel's defaults.
const VERSION: (u16, u16) = (1, 2);
const CHECKSUM_AT: usize = INFO_BYTES - 8;

/// The size of the region holding a file system of `fs_bytes`.
pub fn region_bytes(fs_bytes: u64) -> u64 {
    (DATA_OFFSET + fs_bytes).next_multiple_of(REGION_ALIGN)
}

/// The info block of a region of `region_bytes` (from [`region_bytes`]), named `uuid`.
pub fn info_block(region_bytes: u64, uuid: [u8; 16]) -> [u8; INFO_BYTES] {
    let mut block = [0u8; INFO_BYTES];
    let mut put = |at: usize, bytes: &[u8]| block[at..at + bytes.len()].copy_from_slice(bytes);
    put(0, SIGNATURE);
    put(16, &uuid);
    // 32: the parent namespace's UUID, all zeros for a region without labels; 48: flags.
    put(52, &VERSION.0.to_le_bytes());
    put(54, &VERSION.1.to_le_bytes());
    put(56, &DATA_OFFSET.to_le_bytes());
    put(64, &((region_bytes - DATA_OFFSET) / PAGE).to_le_bytes());
    put(72, &MODE_RAM.to_le_bytes());
    // 76 and 80: no start padding or end truncation.
    put(84, &(REGION_ALIGN as u32).to_le_bytes());
    let sum = checksum(&block);
    block[CHECKSUM_AT..].copy_from_slice(&sum.to_le_bytes());
    block
}

const SECTOR: u64 = 512;
/// The table's first entry and its signature, in the first sector.
const PARTITION_ENTRY: usize = 446;
const LINUX_PARTITION: u8 = 0x83;

/// The partition table of a region of `region_bytes`: one Linux partition from the data offset
/// to the end, addressed by sector number (its cylinder-head-sector fields say "beyond").
pub fn partition_table(region_bytes: u64) -> [u8; SECTOR as usize] {
    let mut sector = [0u8; SECTOR as usize];
    let entry = &mut sector[PARTITION_ENTRY..PARTITION_ENTRY + 16];
    entry[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]);
    entry[4] = LINUX_PARTITION;
    entry[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
    let first = DATA_OFFSET / SECTOR;
    let count = (region_bytes - DATA_OFFSET) / SECTOR;
    entry[8..12].copy_from_slice(&(first as u32).to_le_bytes());
    entry[12..16].copy_from_slice(&u32::try_from(count).unwrap_or(u32::MAX).to_le_bytes());
    sector[510] = 0x55;
    sector[511] = 0xaa;
    sector
}

/// Whether `block` is an info block this module writes would pass: signature, checksum, data
/// offset and mode.
pub fn is_valid(block: &[u8; INFO_BYTES]) -> bool {
    let u64_at = |at: usize| u64::from_le_bytes(block[at..at + 8].try_into().unwrap_or([0; 8]));
    let u32_at = |at: usize| u32::from_le_bytes(block[at..at + 4].try_into().unwrap_or([0; 4]));
    &block[..16] == SIGNATURE
        && u64_at(CHECKSUM_AT) == checksum(block)
        && u64_at(56) == DATA_OFFSET
        && u32_at(72) == MODE_RAM
}

/// The kernel's Fletcher-64 over the block's little-endian 32-bit words, its checksum field
/// counted as zero.
fn checksum(block: &[u8; INFO_BYTES]) -> u64 {
    let (mut lo, mut hi) = (0u32, 0u64);
    for (i, word) in block.chunks_exact(4).enumerate() {
        let word = if i * 4 >= CHECKSUM_AT {
            0
        } else {
            u32::from_le_bytes([word[0], word[1], word[2], word[3]])
        };
        lo = lo.wrapping_add(word);
        hi = hi.wrapping_add(u64::from(lo));
    }
    (hi << 32) | u64::from(lo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_are_whole_subsections_past_the_data_offset() {
        assert_eq!(region_bytes(1), 4 << 20);
        assert_eq!(region_bytes(2 << 20), 4 << 20);
        assert_eq!(region_bytes((2 << 20) + 1), 6 << 20);
    }

    #[test]
    fn an_info_block_checks_and_a_changed_one_does_not() {
        let block = info_block(64 << 20, [7; 16]);
        assert!(is_valid(&block));
        assert_eq!(
            u64::from_le_bytes(block[64..72].try_into().unwrap()),
            (62 << 20) / 4096
        );
        for at in [0, 20, 60, 72, 2000, CHECKSUM_AT] {
            let mut changed = block;
            changed[at] ^= 1;
            assert!(!is_valid(&changed), "byte {at} changed");
        }
    }

    #[test]
    fn the_partition_is_the_file_system() {
        let table = partition_table(64 << 20);
        assert_eq!(&table[510..], &[0x55, 0xaa]);
        assert_eq!(table[446 + 4], 0x83);
        let u32_at = |at: usize| u32::from_le_bytes(table[at..at + 4].try_into().unwrap());
        assert_eq!(u64::from(u32_at(446 + 8)) * 512, DATA_OFFSET);
        assert_eq!(u64::from(u32_at(446 + 12)) * 512, (64 << 20) - DATA_OFFSET);
        // The other three entries are empty.
        assert!(table[462..510].iter().all(|&b| b == 0));
    }

    #[test]
    fn the_checksum_is_fletcher_64_over_words() {
        // Words 1 and 2, then zeros: lo = 3, hi = 1 + 3 + 3 * (words left).
        let mut block = [0u8; INFO_BYTES];
        block[0] = 1;
        block[4] = 2;
        let words = (INFO_BYTES / 4) as u64;
        assert_eq!(checksum(&block), ((1 + 3 * (words - 1)) << 32) | 3);
    }
}
