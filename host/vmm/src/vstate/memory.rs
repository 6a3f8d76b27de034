//! Guest RAM: anonymous host mappings, split around the 32-bit MMIO gap.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::layout::{MMIO_GAP_START, RAM_64BIT_START};

/// Guest memory as the VMM uses it everywhere.
pub type GuestMemory = GuestMemoryMmap<()>;

const MIB: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory of {0} MiB is outside the supported range (1 MiB to 1 TiB)")]
    BadSize(u64),
    #[error("cannot map guest memory")]
    Map(#[source] vm_memory::mmap::FromRangesError),
}

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

/// Maps `size_mib` of guest RAM (anonymous, private, not reserved up front).
pub fn create_guest_memory(size_mib: u64) -> Result<GuestMemory, MemoryError> {
    GuestMemory::from_ranges(&ram_ranges(size_mib)?).map_err(MemoryError::Map)
}

#[cfg(test)]
mod tests {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

    use super::*;

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
    fn mapped_memory_matches_the_ranges() {
        let mem = create_guest_memory(8).unwrap();
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(mem.iter().map(|r| r.len()).sum::<u64>(), 8 * MIB);
    }
}
