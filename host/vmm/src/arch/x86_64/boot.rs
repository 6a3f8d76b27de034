//! Loading a kernel and initrd into guest memory and writing what the boot protocol hands the
//! kernel: the Linux zero page (bzImage) or a PVH `hvm_start_info` (ELF with a PVH note).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability, load_cmdline};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::layout::{CMDLINE_START, EBDA_START, HIMEM_START, MMIO_GAP_START, ZERO_PAGE_START};
use super::regs::BootEntry;
use crate::vstate::memory::GuestMemory;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const PAGE_SIZE: u64 = 0x1000;
/// Values the boot protocol asks a loader to write into the setup header.
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// The 64-bit entry point sits 0x200 bytes into the protected-mode kernel.
const LINUX64_ENTRY_OFFSET: u64 = 0x200;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// `hvm_start_info`, then its module list and its memory map, in the zero page's place.
const PVH_START_INFO: u64 = ZERO_PAGE_START;
const PVH_MODLIST: u64 = ZERO_PAGE_START + 0x80;
const PVH_MEMMAP: u64 = ZERO_PAGE_START + 0x100;
const ELF_MAGIC: [u8; 4] = *b"\x7fELF";

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot read the kernel image")]
    ReadKernel(#[source] std::io::Error),
    #[error("the kernel is neither a bzImage nor an ELF with a PVH entry note")]
    LoadKernel(#[source] linux_loader::loader::Error),
    #[error("the ELF kernel has no PVH entry note; only PVH ELF kernels can be booted")]
    NoPvhEntry,
    #[error("cannot read the initrd")]
    ReadInitrd(#[source] std::io::Error),
    #[error(
        "the initrd ({initrd} bytes) does not fit in guest memory after the kernel; give the VM more memory"
    )]
    InitrdTooLarge { initrd: u64 },
    #[error("the kernel command line is invalid or longer than the boot protocol allows")]
    Cmdline(#[source] linux_loader::loader::Error),
    #[error("cannot write boot data to guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

/// A kernel in guest memory, ready to boot.
#[derive(Debug)]
pub struct LoadedKernel {
    pub entry: BootEntry,
    /// First byte after the kernel image.
    pub end: GuestAddress,
    /// The bzImage setup header, which the zero page must carry.
    setup_header: Option<linux_loader::loader::bootparam::setup_header>,
}

/// Where the initrd landed.
#[derive(Clone, Copy, Debug)]
pub struct LoadedInitrd {
    pub addr: GuestAddress,
    pub size: u64,
}

/// Loads a bzImage, or an ELF kernel with a PVH entry note, into guest memory.
pub fn load_kernel(mem: &GuestMemory, kernel: &mut File) -> Result<LoadedKernel, BootError> {
    let mut magic = [0u8; 4];
    kernel
        .read_exact(&mut magic)
        .and_then(|_| kernel.seek(SeekFrom::Start(0)))
        .map_err(BootError::ReadKernel)?;
    let himem = Some(GuestAddress(HIMEM_START));
    if magic == ELF_MAGIC {
        let loaded = Elf::load(mem, None, kernel, himem).map_err(BootError::LoadKernel)?;
        let PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap else {
            return Err(BootError::NoPvhEntry);
        };
        return Ok(LoadedKernel {
            entry: BootEntry::Pvh32 {
                entry,
                start_info: GuestAddress(PVH_START_INFO),
            },
            end: GuestAddress(loaded.kernel_end),
            setup_header: None,
        });
    }
    let loaded = BzImage::load(mem, None, kernel, himem).map_err(BootError::LoadKernel)?;
    Ok(LoadedKernel {
        entry: BootEntry::Linux64 {
            entry: loaded.kernel_load.unchecked_add(LINUX64_ENTRY_OFFSET),
        },
        end: GuestAddress(loaded.kernel_end),
        setup_header: loaded.setup_header,
    })
}

/// Loads the initrd, made of `parts` laid end to end, at the top of low memory (page aligned),
/// above the kernel.
pub fn load_initrd(
    mem: &GuestMemory,
    kernel: &LoadedKernel,
    parts: &mut [File],
) -> Result<LoadedInitrd, BootError> {
    let mut sizes = Vec::with_capacity(parts.len());
    for part in parts.iter_mut() {
        let size = part
            .seek(SeekFrom::End(0))
            .and_then(|size| part.seek(SeekFrom::Start(0)).map(|_| size))
            .map_err(BootError::ReadInitrd)?;
        sizes.push(size);
    }
    // Each part starts on a 4-byte boundary, as concatenated cpio archives must; the gaps are
    // zeros (fresh guest memory), which the kernel skips between archives.
    let total = sizes
        .iter()
        .try_fold(0u64, |sum, &size| {
            sum.checked_add(size.checked_next_multiple_of(4)?)
        })
        .ok_or(BootError::InitrdTooLarge { initrd: u64::MAX })?;
    let low_end = low_memory_end(mem);
    let too_large = BootError::InitrdTooLarge { initrd: total };
    let addr = low_end
        .checked_sub(total)
        .map(|a| a & !(PAGE_SIZE - 1))
        .filter(|&a| a >= kernel.end.raw_value())
        .ok_or(too_large)?;
    let mut at = addr;
    for (part, &size) in parts.iter_mut().zip(&sizes) {
        let len = usize::try_from(size).map_err(|_| BootError::InitrdTooLarge { initrd: total })?;
        mem.read_exact_volatile_from(GuestAddress(at), part, len)
            .map_err(|e| match e {
                vm_memory::GuestMemoryError::IOError(io) => BootError::ReadInitrd(io),
                other => BootError::GuestMemory(other),
            })?;
        at += size.next_multiple_of(4);
    }
    Ok(LoadedInitrd {
        addr: GuestAddress(addr),
        size: at - addr,
    })
}

/// End of RAM below the MMIO gap.
fn low_memory_end(mem: &GuestMemory) -> u64 {
    mem.iter()
        .map(|r| r.start_addr().raw_value() + r.len())
        .filter(|&end| end <= MMIO_GAP_START)
        .max()
        .unwrap_or(0)
}

/// The RAM map the guest is told about: low memory up to the EBDA, then from 1 MiB on. The hole
/// in between holds the ACPI tables, which the kernel maps on its own.
fn ram_map(mem: &GuestMemory) -> Vec<(u64, u64)> {
    let mut map = vec![(0, EBDA_START)];
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(HIMEM_START);
        let end = region.start_addr().raw_value() + region.len();
        if end > start {
            map.push((start, end - start));
        }
    }
    map
}

/// Writes the command line and the boot protocol's structures, for the kernel loaded with
/// [`load_kernel`]. The memory map holds the guest's RAM and the `reserved` ranges (start,
/// size): the PCI configuration window, which the guest uses only when the map reserves it.
pub fn write_boot_params(
    mem: &GuestMemory,
    kernel: &LoadedKernel,
    cmdline: &Cmdline,
    initrd: Option<LoadedInitrd>,
    rsdp: GuestAddress,
    reserved: &[(u64, u64)],
) -> Result<(), BootError> {
    let map: Vec<(u64, u64, u32)> = ram_map(mem)
        .into_iter()
        .map(|(addr, size)| (addr, size, E820_RAM))
        .chain(
            reserved
                .iter()
                .map(|&(addr, size)| (addr, size, E820_RESERVED)),
        )
        .collect();
    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline).map_err(BootError::Cmdline)?;
    let cmdline_len = cmdline
        .as_cstring()
        .map(|c| c.as_bytes().len())
        .unwrap_or_default();
    match kernel.entry {
        BootEntry::Linux64 { .. } => write_zero_page(mem, kernel, cmdline_len, initrd, rsdp, &map),
        BootEntry::Pvh32 { start_info, .. } => {
            write_pvh_start_info(mem, start_info, initrd, rsdp, &map)
        }
    }
}

fn write_zero_page(
    mem: &GuestMemory,
    kernel: &LoadedKernel,
    cmdline_len: usize,
    initrd: Option<LoadedInitrd>,
    rsdp: GuestAddress,
    map: &[(u64, u64, u32)],
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(header) = kernel.setup_header {
        params.hdr = header;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr.raw_value() as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    params.acpi_rsdp_addr = rsdp.raw_value();
    for (slot, &(addr, size, r#type)) in params.e820_table.iter_mut().zip(map.iter()) {
        *slot = boot_e820_entry { addr, size, r#type };
    }
    params.e820_entries = map.len().min(params.e820_table.len()) as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(BootError::GuestMemory)
}

fn write_pvh_start_info(
    mem: &GuestMemory,
    start_info: GuestAddress,
    initrd: Option<LoadedInitrd>,
    rsdp: GuestAddress,
    map: &[(u64, u64, u32)],
) -> Result<(), BootError> {
    for (i, &(addr, size, type_)) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        };
        let at = GuestAddress(PVH_MEMMAP + (i * std::mem::size_of_val(&entry)) as u64);
        mem.write_obj(entry, at).map_err(BootError::GuestMemory)?;
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp.raw_value(),
        memmap_paddr: PVH_MEMMAP,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    // PVH hands the initrd over as the first module.
    if let Some(initrd) = initrd {
        let module = hvm_modlist_entry {
            paddr: initrd.addr.raw_value(),
            size: initrd.size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(PVH_MODLIST))
            .map_err(BootError::GuestMemory)?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST;
    }
    mem.write_obj(info, start_info)
        .map_err(BootError::GuestMemory)
}
