//! The CPUID a vCPU reports: what KVM supports on this host, with the topology made to match the
//! VM (one socket, one thread per core, `vcpus` cores), the hypervisor bit set, no performance
//! monitoring, and the TSC-deadline timer where KVM offers it.

use kvm_bindings::{CpuId, kvm_cpuid_entry2};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_PERF_MONITORING: u32 = 0xa;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_AMD_SIZE_IDS: u32 = 0x8000_0008;
const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;
const LEAF_XSAVE: u32 = 0xd;
/// x87 and SSE state live in the legacy XSAVE area and have no sub-leaf of their own.
const XSAVE_LEGACY_COMPONENTS: u64 = 0b11;

const ECX_PDCM: u32 = 1 << 15;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
/// Level types in leaf 0xb/0x1f ECX[15:8].
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Feature leaves (function, index, register) a snapshot's vCPUs may only use where this host's
/// KVM offers them too.
const FEATURE_REGISTERS: [(u32, u32, &str); 7] = [
    (LEAF_FEATURES, 0, "ecx"),
    (LEAF_FEATURES, 0, "edx"),
    (0x7, 0, "ebx"),
    (0x7, 0, "ecx"),
    (0x7, 0, "edx"),
    (LEAF_XSAVE, 1, "eax"),
    (0x8000_0001, 0, "ecx"),
];

fn register(entry: &kvm_cpuid_entry2, name: &str) -> u32 {
    match name {
        "eax" => entry.eax,
        "ebx" => entry.ebx,
        "ecx" => entry.ecx,
        _ => entry.edx,
    }
}

/// Bits that mirror the guest's control registers (CR4.OSXSAVE, CR4.PKE), which KVM sets in a
/// running vCPU's CPUID and no host offers.
const ECX_OSXSAVE: u32 = 1 << 27;
const LEAF7_ECX_OSPKE: u32 = 1 << 4;

/// The first CPU feature a saved vCPU used that this host's KVM does not offer, as `leaf 0x7
/// ebx bits 0x...`; none when the host has every one. Bits the VMM sets itself (the
/// hypervisor bit, multi-core, the TSC-deadline timer where KVM has it) are not KVM's to offer,
/// nor are those that mirror the guest's own control registers.
pub fn missing_features(
    saved: &[kvm_cpuid_entry2],
    host: &CpuId,
    caps: HostCaps,
) -> Option<String> {
    let find = |entries: &[kvm_cpuid_entry2], function, index| {
        entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .copied()
    };
    for (function, index, name) in FEATURE_REGISTERS {
        let Some(saved_entry) = find(saved, function, index) else {
            continue;
        };
        let offered = find(host.as_slice(), function, index).map_or(0, |e| register(&e, name));
        let mut own = 0;
        if function == 0x7 && name == "ecx" {
            own |= LEAF7_ECX_OSPKE;
        }
        if function == LEAF_FEATURES && name == "ecx" {
            own |= ECX_HYPERVISOR | ECX_OSXSAVE;
            if caps.tsc_deadline {
                own |= ECX_TSC_DEADLINE;
            }
        }
        if function == LEAF_FEATURES && name == "edx" {
            own |= EDX_HTT;
        }
        let missing = register(&saved_entry, name) & !(offered | own);
        if missing != 0 {
            return Some(format!(
                "leaf {function:#x}.{index} {name} bits {missing:#x}"
            ));
        }
    }
    None
}

/// Bits needed to number `count` cores (the APIC-id shift of the core level).
fn core_id_bits(count: u8) -> u32 {
    u32::from(count.max(1)).next_power_of_two().trailing_zeros()
}

/// Keeps, in the XSAVE leaf, only the state components whose sub-leaf describes them (non-zero
/// size), and no supervisor components. Nested and emulated hosts have been seen to report
/// components without sizes; a guest kernel that enables them computes a different XSAVE size
/// than the CPU and complains, or worse.
fn sanitize_xsave(cpuid: &mut CpuId) {
    let described: u64 = cpuid
        .as_slice()
        .iter()
        .filter(|e| e.function == LEAF_XSAVE && (2..64).contains(&e.index) && e.eax != 0)
        .fold(XSAVE_LEGACY_COMPONENTS, |mask, e| mask | (1 << e.index));
    for entry in cpuid.as_mut_slice() {
        if entry.function != LEAF_XSAVE {
            continue;
        }
        match entry.index {
            0 => {
                entry.eax &= described as u32;
                entry.edx &= (described >> 32) as u32;
            }
            1 => {
                // XSAVES/XRSTORS-managed (supervisor) components: none.
                entry.ecx = 0;
                entry.edx = 0;
            }
            i if i < 64 && described & (1 << i) == 0 => {
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            _ => {}
        }
    }
}

/// What the host's KVM can give a vCPU beyond what `KVM_GET_SUPPORTED_CPUID` lists.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostCaps {
    /// `KVM_CAP_TSC_DEADLINE_TIMER`: the local APIC timer can be armed with a TSC deadline,
    /// which spares the guest kernel calibrating its APIC timer against a tick at boot.
    pub tsc_deadline: bool,
    /// The CPU is AMD's (vendor `AuthenticAMD`, or Hygon's `HygonGenuine`): KVM runs guests
    /// with SVM.
    pub amd: bool,
}

/// Whether `cpuid`'s vendor (leaf 0: EBX, EDX, ECX) is AMD's or Hygon's.
pub fn is_amd(cpuid: &CpuId) -> bool {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0)
        .is_some_and(|e| {
            let mut vendor = [0u8; 12];
            vendor[..4].copy_from_slice(&e.ebx.to_le_bytes());
            vendor[4..8].copy_from_slice(&e.edx.to_le_bytes());
            vendor[8..].copy_from_slice(&e.ecx.to_le_bytes());
            &vendor == b"AuthenticAMD" || &vendor == b"HygonGenuine"
        })
}

/// Rewrites `cpuid` (as returned by `KVM_GET_SUPPORTED_CPUID`) for vCPU `index` of `count`.
pub fn adjust_cpuid(cpuid: &mut CpuId, index: u8, count: u8, host: HostCaps) {
    sanitize_xsave(cpuid);
    let apic_id = u32::from(index);
    let count32 = u32::from(count.max(1));
    let shift = core_id_bits(count);
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                entry.ebx = (entry.ebx & 0x0000_ffff) | (apic_id << 24) | (count32 << 16);
                entry.ecx |= ECX_HYPERVISOR;
                // No IA32_PERF_CAPABILITIES: there is no virtual PMU (leaf 0xa below).
                entry.ecx &= !ECX_PDCM;
                if host.tsc_deadline {
                    entry.ecx |= ECX_TSC_DEADLINE;
                }
                if count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                let level = (entry.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count32 - 1 } else { 0 };
                entry.eax = (entry.eax & 0x3fff) | (sharing << 14) | ((count32 - 1) << 26);
            }
            LEAF_PERF_MONITORING => {
                // No virtual PMU: the guest must not program counters KVM may not back.
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
                entry.edx = apic_id;
                match entry.index {
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = (LEVEL_TYPE_SMT << 8) | entry.index;
                    }
                    1 => {
                        entry.eax = shift;
                        entry.ebx = count32;
                        entry.ecx = (LEVEL_TYPE_CORE << 8) | entry.index;
                    }
                    _ => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = entry.index;
                    }
                }
            }
            LEAF_AMD_SIZE_IDS => {
                entry.ecx = (entry.ecx & !0xf0ff) | (shift << 12) | (count32 - 1);
            }
            LEAF_AMD_EXT_APIC_ID => {
                entry.eax = apic_id;
                entry.ebx = (entry.ebx & !0xffff) | apic_id;
                entry.ecx &= !0xff;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use kvm_bindings::kvm_cpuid_entry2;

    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn sets_apic_id_topology_and_hypervisor_bit() {
        let mut cpuid = CpuId::from_entries(&[
            entry(LEAF_FEATURES, 0),
            entry(LEAF_EXT_TOPOLOGY, 0),
            entry(LEAF_EXT_TOPOLOGY, 1),
            entry(LEAF_EXT_TOPOLOGY, 2),
        ])
        .unwrap();
        adjust_cpuid(&mut cpuid, 2, 3, HostCaps::default());
        let e = cpuid.as_slice();
        assert_eq!(e[0].ebx >> 24, 2);
        assert_eq!((e[0].ebx >> 16) & 0xff, 3);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e[0].edx & EDX_HTT, 0);
        assert_eq!((e[1].ebx, e[1].edx), (1, 2));
        assert_eq!((e[2].eax, e[2].ebx, e[2].ecx >> 8), (2, 3, LEVEL_TYPE_CORE));
        assert_eq!((e[3].ebx, e[3].ecx >> 8), (0, 0));
    }

    #[test]
    fn tsc_deadline_follows_the_host_and_pdcm_is_cleared() {
        let mut features = entry(LEAF_FEATURES, 0);
        features.ecx = ECX_PDCM;
        let mut cpuid = CpuId::from_entries(&[features]).unwrap();
        adjust_cpuid(&mut cpuid, 0, 1, HostCaps::default());
        assert_eq!(cpuid.as_slice()[0].ecx & (ECX_PDCM | ECX_TSC_DEADLINE), 0);
        let host = HostCaps {
            tsc_deadline: true,
            amd: false,
        };
        adjust_cpuid(&mut cpuid, 0, 1, host);
        assert_ne!(cpuid.as_slice()[0].ecx & ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn one_vcpu_clears_htt() {
        let mut features = entry(LEAF_FEATURES, 0);
        features.edx = EDX_HTT;
        let mut cpuid = CpuId::from_entries(&[features]).unwrap();
        adjust_cpuid(&mut cpuid, 0, 1, HostCaps::default());
        assert_eq!(cpuid.as_slice()[0].edx & EDX_HTT, 0);
    }

    #[test]
    fn xsave_keeps_only_described_components() {
        let mut leaf0 = entry(LEAF_XSAVE, 0);
        // x87, SSE, AVX, and a component 3 whose sub-leaf says nothing.
        leaf0.eax = 0b1111;
        let mut avx = entry(LEAF_XSAVE, 2);
        avx.eax = 256;
        avx.ebx = 576;
        let mut leaf1 = entry(LEAF_XSAVE, 1);
        leaf1.ecx = 0x100;
        let mut cpuid = CpuId::from_entries(&[leaf0, leaf1, avx, entry(LEAF_XSAVE, 3)]).unwrap();
        adjust_cpuid(&mut cpuid, 0, 1, HostCaps::default());
        let e = cpuid.as_slice();
        assert_eq!(e[0].eax, 0b0111);
        assert_eq!(e[1].ecx, 0);
        assert_eq!((e[2].eax, e[2].ebx), (256, 576));
    }

    #[test]
    fn core_id_bits_round_up() {
        assert_eq!(
            [1, 2, 3, 4, 5, 8, 9].map(core_id_bits),
            [0, 1, 2, 2, 3, 3, 4]
        );
    }
}
