//! Initial register state of a vCPU for the two boot protocols the VMM speaks: the Linux 64-bit
//! boot protocol (bzImage) and PVH (32-bit protected mode, used by the tiny test guest).

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
    ZERO_PAGE_START,
};
use crate::vstate::memory::GuestMemory;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Bit 1 of RFLAGS is reserved and always set.
const RFLAGS_RESERVED: u64 = 1 << 1;
const FPU_CONTROL_WORD: u16 = 0x37f;
const MXCSR_DEFAULT: u32 = 0x1f80;

/// Present + writable; with `PAGE_SIZE_2M` a page-directory entry maps 2 MiB directly.
const PTE_PRESENT_RW: u64 = 0x3;
const PTE_PAGE_SIZE_2M: u64 = 0x80;
/// The boot page tables identity-map the whole 32-bit space, so early code can reach MMIO too.
const IDENTITY_MAPPED_GIB: u64 = 4;

/// How the first vCPU enters the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootEntry {
    /// 64-bit Linux boot protocol: long mode, paging on, `rsi` = zero page.
    Linux64 { entry: GuestAddress },
    /// PVH: 32-bit protected mode, paging off, `ebx` = `hvm_start_info`.
    Pvh32 {
        entry: GuestAddress,
        start_info: GuestAddress,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("cannot write the boot GDT, IDT or page tables to guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
    #[error("KVM refused the {0} registers")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
}

/// A GDT entry, in the packed hardware format.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The segment register KVM expects for GDT entry `entry` at index `index`.
fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let granular = ((entry >> 55) & 1) as u8;
    let limit = if granular == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit,
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granular,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// The boot GDT: null, code (64-bit or 32-bit), data, TSS.
fn boot_gdt(long_mode: bool) -> [u64; 4] {
    let code = if long_mode {
        gdt_entry(0xa09b, 0, 0xfffff)
    } else {
        gdt_entry(0xc09b, 0, 0xfffff)
    };
    [
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

/// Identity-maps the first [`IDENTITY_MAPPED_GIB`] GiB with 2 MiB pages.
fn write_page_tables(mem: &GuestMemory) -> Result<(), RegsError> {
    let write = |value: u64, addr: u64| {
        mem.write_obj(value, GuestAddress(addr))
            .map_err(RegsError::GuestMemory)
    };
    write(PDPTE_START | PTE_PRESENT_RW, PML4_START)?;
    for gib in 0..IDENTITY_MAPPED_GIB {
        let pd = PDE_START + gib * 0x1000;
        write(pd | PTE_PRESENT_RW, PDPTE_START + gib * 8)?;
        for i in 0..512u64 {
            let frame = (gib << 30) | (i << 21);
            write(frame | PTE_PRESENT_RW | PTE_PAGE_SIZE_2M, pd + i * 8)?;
        }
    }
    Ok(())
}

/// Writes the boot-time tables to guest memory. Called once per VM, before any vCPU setup.
pub fn write_boot_tables(mem: &GuestMemory, entry: BootEntry) -> Result<(), RegsError> {
    let long_mode = matches!(entry, BootEntry::Linux64 { .. });
    for (i, gdt_entry) in boot_gdt(long_mode).iter().enumerate() {
        mem.write_obj(*gdt_entry, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(RegsError::GuestMemory)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(RegsError::GuestMemory)?;
    if long_mode {
        write_page_tables(mem)?;
    }
    Ok(())
}

/// Sets the general, segment and FPU registers of a vCPU for `entry`. Application processors get
/// the same state; KVM replaces it when the boot processor wakes them with INIT/SIPI.
pub fn setup_boot_registers(vcpu: &VcpuFd, entry: BootEntry) -> Result<(), RegsError> {
    let long_mode = matches!(entry, BootEntry::Linux64 { .. });
    let gdt = boot_gdt(long_mode);

    let regs = match entry {
        BootEntry::Linux64 { entry } => kvm_regs {
            rflags: RFLAGS_RESERVED,
            rip: entry.0,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        },
        BootEntry::Pvh32 { entry, start_info } => kvm_regs {
            rflags: RFLAGS_RESERVED,
            rip: entry.0,
            rbx: start_info.0,
            ..Default::default()
        },
    };
    vcpu.set_regs(&regs)
        .map_err(|e| RegsError::Kvm("general", e))?;

    let mut sregs = vcpu.get_sregs().map_err(|e| RegsError::Kvm("segment", e))?;
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    set_control_registers(&mut sregs, long_mode);
    vcpu.set_sregs(&sregs)
        .map_err(|e| RegsError::Kvm("segment", e))?;

    let fpu = kvm_fpu {
        fcw: FPU_CONTROL_WORD,
        mxcsr: MXCSR_DEFAULT,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(|e| RegsError::Kvm("FPU", e))
}

fn set_control_registers(sregs: &mut kvm_sregs, long_mode: bool) {
    if long_mode {
        sregs.cr3 = PML4_START;
        sregs.cr4 |= X86_CR4_PAE;
        sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
        sregs.efer |= EFER_LME | EFER_LMA;
    } else {
        sregs.cr0 = (sregs.cr0 | X86_CR0_PE | X86_CR0_ET) & !X86_CR0_PG;
        sregs.cr4 = 0;
        sregs.efer = 0;
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;
    use crate::vstate::memory::create_guest_memory;

    #[test]
    fn flat_code_segment_decodes() {
        let seg = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!((seg.base, seg.limit, seg.selector), (0, 0xffff_ffff, 8));
        assert_eq!(
            (seg.type_, seg.present, seg.l, seg.db, seg.g),
            (0xb, 1, 1, 0, 1)
        );
        assert_eq!(seg.unusable, 0);
        let seg32 = segment_from_gdt(gdt_entry(0xc09b, 0, 0xfffff), 1);
        assert_eq!((seg32.l, seg32.db), (0, 1));
    }

    #[test]
    fn page_tables_identity_map_four_gib() {
        let mem = create_guest_memory(1).unwrap();
        write_page_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        let pdpte3: u64 = mem.read_obj(GuestAddress(PDPTE_START + 24)).unwrap();
        assert_eq!(pdpte3, (PDE_START + 3 * 0x1000) | 3);
        // The last 2 MiB page of the fourth GiB maps 0xffe0_0000.
        let last: u64 = mem
            .read_obj(GuestAddress(PDE_START + 3 * 0x1000 + 511 * 8))
            .unwrap();
        assert_eq!(last, 0xffe0_0000 | 0x83);
    }
}
