//! Model-specific registers set before a vCPU first runs.

use kvm_bindings::{Msrs, kvm_msr_entry};
use kvm_ioctls::{Kvm, VcpuFd};

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

#[derive(Debug, thiserror::Error)]
pub enum MsrError {
    #[error("cannot read the MSR list KVM supports")]
    List(#[source] kvm_ioctls::Error),
    #[error("cannot build the MSR list")]
    Build(#[source] vmm_sys_util::fam::Error),
    #[error("KVM refused the boot MSRs")]
    Set(#[source] kvm_ioctls::Error),
    #[error("KVM set {set} of {wanted} boot MSRs")]
    Partial { set: usize, wanted: usize },
}

/// MSRs KVM emulates for every guest without listing them in `KVM_GET_MSR_INDEX_LIST`. Left at
/// zero, the MTRRs are off: the guest kernel then finds "all blank" MTRRs, skips PAT set-up, and
/// architecturally all of its memory is uncached.
const EMULATED: &[(u32, u64)] = &[(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK)];

/// The MSRs a snapshot saves and restores: every one KVM lists, and those it emulates without
/// listing.
pub fn saved_msr_indices(kvm: &Kvm) -> Result<Vec<u32>, kvm_ioctls::Error> {
    let mut indices = kvm.get_msr_index_list()?.as_slice().to_vec();
    for &(index, _) in EMULATED {
        if !indices.contains(&index) {
            indices.push(index);
        }
    }
    // In ascending order the TSC (0x10) is restored before the TSC deadline (0x6e0), which KVM
    // reads relative to it.
    indices.sort_unstable();
    indices.dedup();
    Ok(indices)
}

/// The MSRs and values a vCPU boots with, among those KVM supports here.
pub fn boot_msrs(kvm: &Kvm) -> Result<Msrs, MsrError> {
    let supported = kvm.get_msr_index_list().map_err(MsrError::List)?;
    let wanted = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    ];
    let entries: Vec<kvm_msr_entry> = wanted
        .iter()
        .filter(|(index, _)| supported.as_slice().contains(index))
        .chain(EMULATED)
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries).map_err(MsrError::Build)
}

pub fn set_boot_msrs(vcpu: &VcpuFd, msrs: &Msrs) -> Result<(), MsrError> {
    let set = vcpu.set_msrs(msrs).map_err(MsrError::Set)?;
    let wanted = msrs.as_slice().len();
    if set != wanted {
        return Err(MsrError::Partial { set, wanted });
    }
    Ok(())
}
