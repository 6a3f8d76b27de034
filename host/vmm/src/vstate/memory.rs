//! Guest RAM: anonymous host mappings at 2 MiB-aligned addresses, split around the 32-bit MMIO
//! gap.

use std::fs::File;
use std::os::unix::fs::FileExt;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use crate::arch::x86_64::layout::{
    MMIO_GAP_START, PMEM_REGION_ALIGN, PMEM_START_ALIGN, RAM_64BIT_START,
};

/// Guest memory as the VMM uses it everywhere.
pub type GuestMemory = GuestMemoryMmap<()>;

const MIB: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory of {0} MiB is outside the supported range (1 MiB to 1 TiB)")]
    BadSize(u64),
    #[error("cannot map guest memory")]
    Map(#[source] std::io::Error),
    #[error("cannot map guest memory")]
    Region(#[source] vm_memory::mmap::MmapRegionError),
    #[error("cannot map guest memory from its file")]
    MapFile(#[source] vm_memory::mmap::MmapRegionError),
    #[error("cannot lay out guest memory")]
    Regions(#[source] vm_memory::GuestRegionCollectionError),
    #[error("cannot write guest memory to its file")]
    Write(#[source] std::io::Error),
    #[error("pmem regions of {0} bytes in all do not fit in the guest's address space")]
    PmemPlacement(u64),
    #[error("the memory file holds {found} bytes, not the {expected} of the snapshot's guest")]
    FileSize { found: u64, expected: u64 },
}

/// Pages compared with zero when memory is saved: an all-zero page is left as a hole.
const SAVE_PAGE: usize = 4096;

/// The guest-physical RAM ranges for `size_mib` of memory: one below the MMIO gap and, for large
/// guests, the remainder above 4 GiB.
pub fn ram_ranges(size_mib: u64) -> Result<Vec<(GuestAddress, usize)>, MemoryError> {
    if !(1..=(1 << 20)).contains(&size_mib) {
        return Err(MemoryError::BadSize(size_mib));
    }
    let size = size_mib * MIB;
    let low = size.min(MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if size > low {
        ranges.push((GuestAddress(RAM_64BIT_START), (size - low) as usize));
    }
    Ok(ranges)
}

/// The highest guest-physical address a pmem region may reach (46 bits, within what any x86-64
/// host with KVM translates).
const PMEM_LIMIT: u64 = 1 << 46;

/// Where pmem regions of `sizes` bytes go in a guest of `size_mib` of RAM: above RAM and 4 GiB,
/// from a GiB boundary, each at a memory-section boundary, in order.
pub fn pmem_addresses(size_mib: u64, sizes: &[u64]) -> Result<Vec<GuestAddress>, MemoryError> {
    let ram_end = ram_ranges(size_mib)?
        .iter()
        .map(|(start, len)| start.0 + *len as u64)
        .max()
        .unwrap_or(0);
    let total = sizes.iter().fold(0u64, |a, b| a.saturating_add(*b));
    let placement = || MemoryError::PmemPlacement(total);
    let mut cursor = ram_end
        .max(RAM_64BIT_START)
        .checked_next_multiple_of(PMEM_START_ALIGN)
        .ok_or_else(placement)?;
    let mut addresses = Vec::with_capacity(sizes.len());
    for &size in sizes {
        let start = cursor
            .checked_next_multiple_of(PMEM_REGION_ALIGN)
            .ok_or_else(placement)?;
        cursor = start.checked_add(size).ok_or_else(placement)?;
        if cursor > PMEM_LIMIT {
            return Err(placement());
        }
        addresses.push(GuestAddress(start));
    }
    Ok(addresses)
}

/// Host alignment of guest RAM: its guest addresses are 2 MiB-aligned, and so are its host
/// addresses, so that the host can back it with transparent huge pages and KVM can map each into
/// the guest whole (one fault per 2 MiB instead of 512; KVM maps a huge page only where the guest
/// and host addresses agree modulo its size).
const RAM_HOST_ALIGN: usize = 2 << 20;

/// Maps `size_mib` of guest RAM (anonymous, private, not reserved up front), each range at a
/// 2 MiB-aligned host address. The mappings last as long as the process: a VMM process runs
/// one VM, whose memory devices and vCPUs use until it ends.
pub fn create_guest_memory(size_mib: u64) -> Result<GuestMemory, MemoryError> {
    let mut regions = Vec::new();
    for (start, len) in ram_ranges(size_mib)? {
        let host = map_aligned(len)?;
        // SAFETY: `host` starts a live private anonymous mapping of `len` bytes made just above,
        // which nothing else uses and which is never unmapped.
        let mapping = unsafe { MmapRegionBuilder::new(len).with_raw_mmap_pointer(host) }
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
            .build()
            .map_err(MemoryError::Region)?;
        regions.push(GuestRegionMmap::new(mapping, start).ok_or(MemoryError::BadSize(size_mib))?);
    }
    GuestMemory::from_regions(regions).map_err(MemoryError::Regions)
}

/// A private anonymous mapping of `len` bytes at a [`RAM_HOST_ALIGN`]-aligned address: one
/// alignment more is mapped, and what lies before and after the aligned part is given back.
fn map_aligned(len: usize) -> Result<*mut u8, MemoryError> {
    let reserve = len.checked_add(RAM_HOST_ALIGN).ok_or(MemoryError::Map(
        std::io::Error::from_raw_os_error(libc::ENOMEM),
    ))?;
    // SAFETY: a new mapping at an address of the kernel's choosing; no pointer is passed in.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            reserve,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(MemoryError::Map(std::io::Error::last_os_error()));
    }
    let start = ptr as usize;
    let aligned = start.next_multiple_of(RAM_HOST_ALIGN);
    let head = aligned - start;
    let tail = reserve - head - len;
    // SAFETY: the head and the tail are the parts of the mapping just made that lie outside
    // `aligned..aligned + len`; nothing refers to them. Failing to give them back leaves an
    // unused mapping, no more.
    unsafe {
        if head > 0 {
            libc::munmap(ptr, head);
        }
        if tail > 0 {
            libc::munmap((aligned + len) as *mut libc::c_void, tail);
        }
    }
    Ok(aligned as *mut u8)
}

/// Writes every region of `mem`, end to end, to `file`, leaving holes where pages are zero (a
/// guest uses a fraction of its RAM), and sizes the file to the whole of it. The guest must not
/// be running.
pub fn save_memory(mem: &GuestMemory, file: &File) -> Result<u64, MemoryError> {
    let mut offset = 0u64;
    for region in mem.iter() {
        let len = region.len() as usize;
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|_| MemoryError::Write(std::io::Error::from_raw_os_error(libc::EFAULT)))?;
        // SAFETY: `host` is the start of a live mapping of `len` bytes owned by `mem`, which
        // outlives this borrow; no vCPU runs and no device works while the VM is saved, so
        // nothing writes it meanwhile.
        let bytes = unsafe { std::slice::from_raw_parts(host.cast_const(), len) };
        let mut page_start = 0;
        while page_start < len {
            // Runs of non-zero pages are written in one call.
            let is_zero = |p: usize| bytes[p..(p + SAVE_PAGE).min(len)].iter().all(|&b| b == 0);
            if is_zero(page_start) {
                page_start += SAVE_PAGE;
                continue;
            }
            let mut end = page_start + SAVE_PAGE;
            while end < len && !is_zero(end) {
                end += SAVE_PAGE;
            }
            let end = end.min(len);
            file.write_all_at(&bytes[page_start..end], offset + page_start as u64)
                .map_err(MemoryError::Write)?;
            page_start = end;
        }
        offset += len as u64;
    }
    file.set_len(offset).map_err(MemoryError::Write)?;
    file.sync_data().map_err(MemoryError::Write)?;
    Ok(offset)
}

/// Maps `size_mib` of guest RAM from `file` (written by [`save_memory`]), private to this VM:
/// pages are read from the file (the host's page cache, shared by every VM restored from it)
/// and copied only when the guest writes them.
pub fn map_guest_memory(size_mib: u64, file: &File) -> Result<GuestMemory, MemoryError> {
    let ranges = ram_ranges(size_mib)?;
    let expected = size_mib * MIB;
    let found = file.metadata().map_err(MemoryError::Write)?.len();
    if found != expected {
        return Err(MemoryError::FileSize { found, expected });
    }
    let mut offset = 0u64;
    let mut regions = Vec::with_capacity(ranges.len());
    for (start, len) in ranges {
        let file = file.try_clone().map_err(MemoryError::Write)?;
        let mapping = MmapRegionBuilder::new(len)
            .with_file_offset(FileOffset::new(file, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(MemoryError::MapFile)?;
        regions.push(GuestRegionMmap::new(mapping, start).ok_or(MemoryError::BadSize(size_mib))?);
        offset += len as u64;
    }
    GuestMemory::from_regions(regions).map_err(MemoryError::Regions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_ram_sits_at_2_mib_aligned_host_addresses() {
        for size_mib in [1, 129, 256, 4096] {
            let mem = create_guest_memory(size_mib).unwrap();
            for region in mem.iter() {
                let host = mem.get_host_address(region.start_addr()).unwrap() as usize;
                assert_eq!(host % RAM_HOST_ALIGN, 0, "{size_mib} MiB: {host:#x}");
                assert_eq!(region.start_addr().0 % RAM_HOST_ALIGN as u64, 0);
            }
            assert_eq!(mem.iter().map(|r| r.len()).sum::<u64>(), size_mib << 20);
        }
    }

    #[test]
    fn small_guests_have_one_range() {
        assert_eq!(ram_ranges(256).unwrap(), vec![(GuestAddress(0), 256 << 20)]);
    }

    #[test]
    fn large_guests_skip_the_mmio_gap() {
        let ranges = ram_ranges(4096).unwrap();
        assert_eq!(ranges[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(ranges[1].0, GuestAddress(RAM_64BIT_START));
        assert_eq!(ranges[0].1 + ranges[1].1, 4096 << 20);
    }

    #[test]
    fn rejects_zero_and_absurd_sizes() {
        assert!(ram_ranges(0).is_err());
        assert!(ram_ranges(u64::MAX / MIB).is_err());
    }

    #[test]
    fn saved_memory_maps_back_privately_with_holes_for_zero_pages() {
        use vm_memory::Bytes;
        let mem = create_guest_memory(4).unwrap();
        mem.write_slice(b"first page", GuestAddress(0)).unwrap();
        mem.write_slice(b"last page", GuestAddress((4 << 20) - 16))
            .unwrap();
        let path = std::env::temp_dir().join(format!("agentos-mem-test-{}", std::process::id()));
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        assert_eq!(save_memory(&mem, &file).unwrap(), 4 << 20);
        {
            use std::os::unix::fs::MetadataExt;
            // Two pages hold data; the rest are holes.
            assert!(file.metadata().unwrap().blocks() * 512 <= 64 * 1024);
        }
        let restored = map_guest_memory(4, &file).unwrap();
        let mut buf = [0u8; 10];
        restored.read_slice(&mut buf, GuestAddress(0)).unwrap();
        assert_eq!(&buf, b"first page");
        // A write to the restored guest stays out of the file.
        restored
            .write_slice(b"changed!!!", GuestAddress(0))
            .unwrap();
        let mut on_disk = [0u8; 10];
        file.read_exact_at(&mut on_disk, 0).unwrap();
        assert_eq!(&on_disk, b"first page");
        let wrong = map_guest_memory(8, &file).unwrap_err();
        assert!(matches!(wrong, MemoryError::FileSize { .. }), "{wrong}");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn pmem_regions_go_above_ram_at_section_boundaries() {
        let two = 2 << 20;
        assert_eq!(
            pmem_addresses(256, &[two, 3 * two]).unwrap(),
            vec![GuestAddress(1 << 32), GuestAddress((1 << 32) + (128 << 20))]
        );
        // 8 GiB of RAM ends at 9 GiB (3 GiB below the gap, 5 above 4 GiB).
        assert_eq!(
            pmem_addresses(8192, &[two]).unwrap(),
            vec![GuestAddress(9 << 30)]
        );
        assert!(pmem_addresses(256, &[u64::MAX]).is_err());
        assert!(pmem_addresses(256, &[1 << 46]).is_err());
        assert!(pmem_addresses(256, &[]).unwrap().is_empty());
    }

    #[test]
    fn mapped_memory_matches_the_ranges() {
        let mem = create_guest_memory(8).unwrap();
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(mem.iter().map(|r| r.len()).sum::<u64>(), 8 * MIB);
    }
}
