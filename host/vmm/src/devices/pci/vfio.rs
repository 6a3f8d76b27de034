//! A host PCI function passed to the guest with VFIO.
//!
//! The VMM places the function's memory BARs in the guest's PCI windows itself, as firmware
//! would, and the guest keeps them there: BAR registers are emulated (the guest's sizing probes
//! are answered, a write that would move a BAR is refused and counted), the expansion ROM's
//! register too (its content read through VFIO, never mapped), and every other register goes
//! to the device's configuration space through VFIO, whose kernel driver guards what the guest
//! may change there. A BAR the kernel lets us map is mapped into the guest as memory (accesses
//! never leave the guest); the others, and those holding the MSI-X table, are trapped and
//! forwarded. I/O BARs are hidden. Guest RAM is mapped for the device's DMA at its guest
//! physical addresses. Interrupts: INTx through a KVM irqfd with resampling, one MSI vector
//! through a route of the VM's GSI table once the guest enables MSI, or MSI-X (see
//! [`super::msix`]).

use std::os::fd::AsRawFd;
use std::sync::Arc;

use std::sync::Mutex;

use kvm_ioctls::VmFd;
use vfio_bindings::bindings::vfio::{
    VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_INTX_IRQ_INDEX,
    VFIO_PCI_MSI_IRQ_INDEX, VFIO_PCI_ROM_REGION_INDEX, VFIO_REGION_INFO_FLAG_CAPS,
    VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_ioctls::VfioDevice;
use vmm_sys_util::eventfd::EventFd;

use super::intx::{IntxLine, intx_on};
use super::msi::{MsiCapability, MsiMessage, MsiRoutes};
use super::msix::{MSIX_ENABLE, MSIX_FUNCTION_MASK, Msix};
use super::{PciFunction, PciMetrics, merge};
use crate::devices::bus::BusDevice;

/// The smallest BAR mapped into the guest: KVM's memory slots are whole pages.
const PAGE_SIZE: u64 = 4096;
/// Six BARs, registers 4 to 9; the expansion ROM's at register 12.
const BARS: usize = 6;
const FIRST_BAR_REG: usize = 4;
const ROM_REG: usize = 12;
/// Register 3 holds the header type; bit 7 of it says "multi-function", which ours is not.
const HEADER_REG: usize = 3;
const MULTI_FUNCTION: u32 = 0x0080_0000;
/// BAR low bits: I/O space, 64-bit memory, prefetchable.
const BAR_IO: u32 = 0x1;
const BAR_MEM64: u32 = 0x4;
const BAR_PREFETCH: u32 = 0x8;
const BAR_TYPE_MASK: u32 = 0x6;

#[derive(Debug, thiserror::Error)]
pub enum VfioPciError {
    #[error("BAR {index} is {size:#x} bytes, not a power of two of at least 16")]
    BarSize { index: usize, size: u64 },
    #[error(
        "no room for BAR {index} ({size:#x} bytes) in the guest's PCI window (128 GiB for 64-bit BARs, 256 MiB for 32-bit ones)"
    )]
    NoRoom { index: usize, size: u64 },
    #[error("cannot map BAR {index} of the device")]
    Map {
        index: usize,
        #[source]
        source: std::io::Error,
    },
}

/// One memory BAR as the guest sees it.
#[derive(Clone, Copy, Debug)]
pub struct Bar {
    /// The VFIO region (the BAR's number).
    pub index: u32,
    pub guest_addr: u64,
    pub size: u64,
    /// The type bits the guest reads in the low register (64-bit, prefetchable).
    flags: u32,
    /// The region may be mapped (and holds no MSI-X table the kernel keeps to itself).
    pub mappable: bool,
}

/// Hands out guest addresses for BARs, each naturally aligned, from a window.
pub struct BarAllocator {
    next: u64,
    end: u64,
}

impl BarAllocator {
    pub fn new(start: u64, end: u64) -> Self {
        Self { next: start, end }
    }

    fn take(&mut self, size: u64) -> Option<u64> {
        let at = self.next.checked_next_multiple_of(size)?;
        let end = at.checked_add(size).filter(|&e| e <= self.end)?;
        self.next = end;
        Some(at)
    }
}

/// The expansion ROM's register: where the VMM placed the ROM, whether the guest is sizing it
/// or has turned its decoding on. The ROM is read through VFIO, never mapped.
struct RomRegister {
    bar: Bar,
    probing: bool,
    enabled: bool,
}

/// ROM register bits: the address, and decoding on.
const ROM_ADDRESS_MASK: u32 = 0xffff_f800;
const ROM_ENABLE: u32 = 1;
/// The smallest ROM the register can describe.
const MIN_ROM_SIZE: u64 = 2048;

impl RomRegister {
    fn read(&self) -> u32 {
        let address = if self.probing {
            !(self.bar.size as u32 - 1)
        } else {
            self.bar.guest_addr as u32
        };
        address & ROM_ADDRESS_MASK | if self.enabled { ROM_ENABLE } else { 0 }
    }

    fn write(&mut self, offset: usize, data: &[u8], metrics: &PciMetrics) {
        let value = merge(self.read(), offset, data);
        self.enabled = value & ROM_ENABLE != 0;
        if value & ROM_ADDRESS_MASK == ROM_ADDRESS_MASK {
            self.probing = true;
            return;
        }
        self.probing = false;
        if value & ROM_ADDRESS_MASK != self.bar.guest_addr as u32 & ROM_ADDRESS_MASK {
            PciMetrics::count(&metrics.bar_moves_refused);
            tracing::warn!("the guest tried to move the expansion ROM; it stays");
        }
    }
}

/// The function's configuration space as the guest sees it.
pub struct VfioPci {
    device: Arc<VfioDevice>,
    bars: BarRegisters,
    rom: Option<RomRegister>,
    /// The wired INTx line, while MSI and MSI-X are off.
    pub intx: Option<IntxLine>,
    msi: Option<Msi>,
    msix: Option<Arc<Mutex<Msix>>>,
}

/// A function's MSI: its capability, its one vector's eventfd and GSI, and whether it is on.
pub struct Msi {
    cap: MsiCapability,
    routes: Arc<Mutex<MsiRoutes>>,
    vm: Arc<VmFd>,
    event: EventFd,
    gsi: u32,
    irqfd: bool,
    on: Option<MsiMessage>,
}

impl Msi {
    /// The MSI of `device`, if it has the capability and VFIO offers the interrupt.
    pub fn of(
        device: &VfioDevice,
        routes: &Arc<Mutex<MsiRoutes>>,
        vm: Arc<VmFd>,
    ) -> std::io::Result<Option<Self>> {
        let config = standard_config(device);
        let vectors = device
            .get_irq_info(VFIO_PCI_MSI_IRQ_INDEX)
            .map_or(0, |irq| irq.count);
        let Some(cap) = MsiCapability::find(&config).filter(|_| vectors > 0) else {
            return Ok(None);
        };
        let Some(gsi) = routes.lock().unwrap_or_else(|e| e.into_inner()).allocate() else {
            return Ok(None);
        };
        Ok(Some(Self {
            cap,
            routes: routes.clone(),
            vm,
            event: EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)?,
            gsi,
            irqfd: false,
            on: None,
        }))
    }
}

/// The six BAR registers as the guest sees them: the addresses the VMM gave, sizing probes
/// answered, moves refused.
struct BarRegisters {
    /// By register: the BAR whose low (or, for a 64-bit BAR, high) half it holds.
    bars: [Option<(Bar, bool)>; BARS],
    /// Registers whose next read answers a sizing probe.
    probing: [bool; BARS],
    metrics: Arc<PciMetrics>,
}

/// The windows BARs are placed in: 32-bit BARs below 4 GiB, 64-bit ones above it.
pub struct BarWindows {
    pub low: BarAllocator,
    pub high: BarAllocator,
}

impl BarWindows {
    /// A place for a BAR of `size` bytes, in the window its width calls for.
    fn take(&mut self, size: u64, is64: bool) -> Option<u64> {
        if is64 {
            self.high.take(size)
        } else {
            self.low.take(size)
        }
    }
}

impl VfioPci {
    /// Reads the function's BARs and places its memory BARs in `windows`.
    pub fn new(
        device: Arc<VfioDevice>,
        windows: &mut BarWindows,
        metrics: Arc<PciMetrics>,
    ) -> Result<Self, VfioPciError> {
        let mut bars = [None; BARS];
        let mut index = 0;
        while index < BARS {
            let region = VFIO_PCI_BAR0_REGION_INDEX + index as u32;
            let size = device.get_region_size(region);
            let raw = config_dword(&device, FIRST_BAR_REG + index);
            let is64 = raw & BAR_IO == 0 && raw & BAR_TYPE_MASK == BAR_MEM64;
            if size == 0 || raw & BAR_IO != 0 {
                if size != 0 {
                    tracing::warn!(index, "I/O BAR hidden from the guest");
                }
                index += 1;
                continue;
            }
            if !size.is_power_of_two() || size < 16 {
                return Err(VfioPciError::BarSize { index, size });
            }
            let flags = device.get_region_flags(region);
            let guest_addr = windows
                .take(size, is64)
                .ok_or(VfioPciError::NoRoom { index, size })?;
            let bar = Bar {
                index: region,
                guest_addr,
                size,
                flags: raw & (BAR_MEM64 | BAR_PREFETCH),
                // KVM maps whole pages: a BAR smaller than one is trapped.
                mappable: flags & VFIO_REGION_INFO_FLAG_MMAP != 0
                    && flags & VFIO_REGION_INFO_FLAG_CAPS == 0
                    && size >= PAGE_SIZE,
            };
            bars[index] = Some((bar, false));
            if is64 && index + 1 < BARS {
                bars[index + 1] = Some((bar, true));
                index += 1;
            }
            index += 1;
        }
        let rom = place_rom(&device, windows)?;
        Ok(Self {
            device,
            rom,
            bars: BarRegisters {
                bars,
                probing: [false; BARS],
                metrics,
            },
            intx: None,
            msi: None,
            msix: None,
        })
    }

    /// Gives the function its MSI (see [`Msi::of`]).
    pub fn set_msi(&mut self, msi: Option<Msi>) {
        self.msi = msi;
    }

    /// Gives the function its MSI-X (see [`Msix::of`]), shared with the trapped BAR that
    /// holds its table.
    pub fn set_msix(&mut self, msix: Option<Arc<Mutex<Msix>>>) {
        self.msix = msix;
    }

    /// Follows a guest write into the MSI-X capability's message control (the rest of the
    /// capability is read-only).
    fn msix_write(&mut self, at: usize, data: &[u8]) {
        let Some(msix) = &self.msix else {
            return;
        };
        let mut msix = msix.lock().unwrap_or_else(|e| e.into_inner());
        let reg = msix.cap.offset / 4;
        let Some(offset) = at.checked_sub(reg * 4).filter(|o| o + data.len() <= 4) else {
            return;
        };
        let bits = u32::from(MSIX_ENABLE | MSIX_FUNCTION_MASK) << 16;
        let now = config_dword(&self.device, reg) & !bits | u32::from(msix.control_bits()) << 16;
        let dword = merge(now, offset, data);
        msix.control_written((dword >> 16) as u16, self.intx.as_ref());
    }

    /// Follows a guest write into the MSI capability: on enable, the device's vector is routed
    /// to the guest's message (INTx off, since VFIO serves one kind at a time); on a new message,
    /// the route follows; on disable, INTx comes back. Failures are counted and logged: the
    /// guest then gets no interrupts from the device.
    fn msi_write(&mut self, at: usize, data: &[u8]) {
        let Some(msi) = &mut self.msi else {
            return;
        };
        let start = msi.cap.offset;
        let end = start + msi.cap.span();
        if at + data.len() <= start || at >= end {
            return;
        }
        // The capability as it will be once the write lands (VFIO keeps what the guest wrote).
        let first_reg = start / 4;
        let mut cap = Vec::with_capacity(end.div_ceil(4) * 4 - first_reg * 4);
        for reg in first_reg..end.div_ceil(4) {
            cap.extend_from_slice(&config_dword(&self.device, reg).to_le_bytes());
        }
        for (i, byte) in data.iter().enumerate() {
            if let Some(b) = (at + i)
                .checked_sub(first_reg * 4)
                .and_then(|j| cap.get_mut(j))
            {
                *b = *byte;
            }
        }
        let Some((enable, message)) = msi.cap.decode(&cap[start - first_reg * 4..]) else {
            return;
        };
        let result = match (enable, msi.on) {
            (true, None) => enable_msi(&self.device, msi, message, self.intx.as_ref()),
            (true, Some(old)) if old != message => msi
                .routes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .set(msi.gsi, Some(message))
                .map(|()| msi.on = Some(message))
                .map_err(|e| e.to_string()),
            (false, Some(_)) => disable_msi(&self.device, msi, self.intx.as_ref()),
            _ => Ok(()),
        };
        if let Err(why) = result {
            PciMetrics::count(&self.bars.metrics.interrupt_failures);
            tracing::warn!(%why, "cannot follow the guest's MSI set-up");
        }
    }
}

fn enable_msi(
    device: &VfioDevice,
    msi: &mut Msi,
    message: MsiMessage,
    intx: Option<&IntxLine>,
) -> Result<(), String> {
    msi.routes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .set(msi.gsi, Some(message))
        .map_err(|e| format!("route: {e}"))?;
    if !msi.irqfd {
        msi.vm
            .register_irqfd(&msi.event, msi.gsi)
            .map_err(|e| format!("irqfd: {e}"))?;
        msi.irqfd = true;
    }
    if intx.is_some() {
        device
            .disable_irq(VFIO_PCI_INTX_IRQ_INDEX)
            .map_err(|e| format!("INTx off: {e}"))?;
    }
    device
        .enable_msi(vec![&msi.event])
        .map_err(|e| format!("MSI on: {e}"))?;
    msi.on = Some(message);
    Ok(())
}

fn disable_msi(device: &VfioDevice, msi: &mut Msi, intx: Option<&IntxLine>) -> Result<(), String> {
    msi.on = None;
    device.disable_msi().map_err(|e| format!("MSI off: {e}"))?;
    msi.routes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .set(msi.gsi, None)
        .map_err(|e| format!("route: {e}"))?;
    if let Some(line) = intx {
        intx_on(device, line)?;
    }
    Ok(())
}

impl VfioPci {
    /// The memory BARs, each once.
    pub fn bars(&self) -> Vec<Bar> {
        self.bars
            .bars
            .iter()
            .flatten()
            .filter(|(_, high)| !high)
            .map(|(bar, _)| *bar)
            .collect()
    }

    /// The expansion ROM, if the device has one: always trapped, read through VFIO.
    pub fn rom(&self) -> Option<Bar> {
        self.rom.as_ref().map(|r| r.bar)
    }
}

/// Places the device's expansion ROM, if it has one, in the window below 4 GiB.
fn place_rom(
    device: &VfioDevice,
    windows: &mut BarWindows,
) -> Result<Option<RomRegister>, VfioPciError> {
    let size = device.get_region_size(VFIO_PCI_ROM_REGION_INDEX);
    if size == 0 {
        return Ok(None);
    }
    let index = VFIO_PCI_ROM_REGION_INDEX as usize;
    if !size.is_power_of_two() || !(MIN_ROM_SIZE..=1 << 31).contains(&size) {
        return Err(VfioPciError::BarSize { index, size });
    }
    let guest_addr = windows
        .take(size, false)
        .ok_or(VfioPciError::NoRoom { index, size })?;
    Ok(Some(RomRegister {
        bar: Bar {
            index: VFIO_PCI_ROM_REGION_INDEX,
            guest_addr,
            size,
            flags: 0,
            mappable: false,
        },
        probing: false,
        enabled: false,
    }))
}

impl BarRegisters {
    fn read(&self, slot: usize) -> u32 {
        let Some((bar, high)) = self.bars[slot] else {
            return 0;
        };
        let value = if self.probing[slot] {
            // All the address bits a BAR of this size decodes.
            !(bar.size - 1)
        } else {
            bar.guest_addr
        };
        if high {
            (value >> 32) as u32
        } else {
            (value as u32 & !0xf) | bar.flags
        }
    }

    fn write(&mut self, slot: usize, offset: usize, data: &[u8]) {
        let Some((bar, high)) = self.bars[slot] else {
            return;
        };
        let value = merge(self.read(slot), offset, data);
        let address_bits = if high { u32::MAX } else { !0xf };
        if value & address_bits == address_bits {
            self.probing[slot] = true;
            return;
        }
        self.probing[slot] = false;
        // Anything but the address it has (or the half of it this register holds) would move
        // the BAR. It stays, so that the mapping into the guest stays right.
        let current = if high {
            (bar.guest_addr >> 32) as u32
        } else {
            bar.guest_addr as u32 & !0xf
        };
        if value & address_bits != current {
            PciMetrics::count(&self.metrics.bar_moves_refused);
            tracing::warn!(bar = bar.index, "the guest tried to move a BAR; it stays");
        }
    }
}

impl PciFunction for VfioPci {
    fn read_config(&mut self, reg: usize) -> u32 {
        match reg {
            r if (FIRST_BAR_REG..FIRST_BAR_REG + BARS).contains(&r) => {
                self.bars.read(r - FIRST_BAR_REG)
            }
            ROM_REG => self.rom.as_ref().map_or(0, RomRegister::read),
            HEADER_REG => config_dword(&self.device, reg) & !MULTI_FUNCTION,
            _ => {
                let value = config_dword(&self.device, reg);
                match &self.msix {
                    // MSI-X's enable and function mask are the VMM's to keep.
                    Some(msix) => {
                        let msix = msix.lock().unwrap_or_else(|e| e.into_inner());
                        if reg == msix.cap.offset / 4 {
                            let bits = u32::from(MSIX_ENABLE | MSIX_FUNCTION_MASK) << 16;
                            value & !bits | u32::from(msix.control_bits()) << 16
                        } else {
                            value
                        }
                    }
                    None => value,
                }
            }
        }
    }

    fn write_config(&mut self, reg: usize, offset: usize, data: &[u8]) {
        match reg {
            r if (FIRST_BAR_REG..FIRST_BAR_REG + BARS).contains(&r) => {
                self.bars.write(r - FIRST_BAR_REG, offset, data)
            }
            ROM_REG => {
                if let Some(rom) = &mut self.rom {
                    rom.write(offset, data, &self.bars.metrics);
                }
            }
            _ => {
                // The interrupt set-up first: VFIO keeps MSI off in the capability until it
                // has been set up.
                self.msi_write(reg * 4 + offset, data);
                self.msix_write(reg * 4 + offset, data);
                self.device.region_write(
                    VFIO_PCI_CONFIG_REGION_INDEX,
                    data,
                    (reg * 4 + offset) as u64,
                )
            }
        }
    }
}

/// The first 256 bytes of the device's configuration space, where capabilities are listed.
pub fn standard_config(device: &VfioDevice) -> Vec<u8> {
    let mut config = vec![0u8; 256];
    for (reg, chunk) in config.chunks_mut(4).enumerate() {
        chunk.copy_from_slice(&config_dword(device, reg).to_le_bytes());
    }
    config
}

/// A dword of the device's configuration space (all ones when VFIO cannot read it).
fn config_dword(device: &VfioDevice, reg: usize) -> u32 {
    let mut bytes = [0xff; 4];
    device.region_read(VFIO_PCI_CONFIG_REGION_INDEX, &mut bytes, (reg * 4) as u64);
    u32::from_le_bytes(bytes)
}

/// A BAR that is not mapped into the guest: every access is forwarded to the device, but for
/// those of the MSI-X table it holds, if it holds it, which the VMM emulates.
pub struct TrappedBar {
    pub device: Arc<VfioDevice>,
    pub bar: Bar,
    pub metrics: Arc<PciMetrics>,
    /// The function's MSI-X, when this BAR holds its table.
    pub msix: Option<MsixTableBar>,
}

/// A function's MSI-X and the bytes of the BAR its table takes: start, length.
pub struct MsixTableBar {
    pub msix: Arc<Mutex<Msix>>,
    pub span: (u64, u64),
}

impl TrappedBar {
    /// The function's MSI-X, and `offset` within its table, if the access is the table's.
    fn table_access(&self, offset: u64) -> Option<(&Mutex<Msix>, u64)> {
        let table = self.msix.as_ref()?;
        let (start, len) = table.span;
        let within = offset.checked_sub(start).filter(|o| *o < len)?;
        Some((&table.msix, within))
    }
}

impl BusDevice for TrappedBar {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        PciMetrics::count(&self.metrics.trapped_bar_accesses);
        if let Some((msix, at)) = self.table_access(offset) {
            msix.lock()
                .unwrap_or_else(|e| e.into_inner())
                .read_table(at, data);
            return;
        }
        data.fill(0xff);
        if offset
            .checked_add(data.len() as u64)
            .is_some_and(|end| end <= self.bar.size)
        {
            self.device.region_read(self.bar.index, data, offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        PciMetrics::count(&self.metrics.trapped_bar_accesses);
        if self.bar.index == VFIO_PCI_ROM_REGION_INDEX {
            return;
        }
        if let Some((msix, at)) = self.table_access(offset) {
            msix.lock()
                .unwrap_or_else(|e| e.into_inner())
                .write_table(at, data);
            return;
        }
        if offset
            .checked_add(data.len() as u64)
            .is_some_and(|end| end <= self.bar.size)
        {
            self.device.region_write(self.bar.index, data, offset);
        }
    }
}

/// Maps `bar` of `device` into this process, shared with the device: what the guest gets as
/// memory at the BAR's address. The mapping lives as long as the VMM.
pub fn map_bar(device: &VfioDevice, bar: &Bar) -> Result<*mut u8, VfioPciError> {
    let flags = device.get_region_flags(bar.index);
    let mut prot = 0;
    if flags & VFIO_REGION_INFO_FLAG_READ != 0 {
        prot |= libc::PROT_READ;
    }
    if flags & VFIO_REGION_INFO_FLAG_WRITE != 0 {
        prot |= libc::PROT_WRITE;
    }
    let len = usize::try_from(bar.size).map_err(|_| VfioPciError::Map {
        index: bar.index as usize,
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })?;
    let offset = libc::off_t::try_from(device.get_region_offset(bar.index)).map_err(|_| {
        VfioPciError::Map {
            index: bar.index as usize,
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        }
    })?;
    // SAFETY: a new shared mapping of the device's region, at an address the kernel picks;
    // nothing else is touched. The result is checked before use.
    let host = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            prot,
            libc::MAP_SHARED,
            device.as_raw_fd(),
            offset,
        )
    };
    if host == libc::MAP_FAILED {
        return Err(VfioPciError::Map {
            index: bar.index as usize,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(host.cast())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    fn registers() -> BarRegisters {
        let bar = |index, guest_addr, size, flags| Bar {
            index,
            guest_addr,
            size,
            flags,
            mappable: true,
        };
        let small = bar(0, 0xc010_0000, 0x10_0000, 0);
        let wide = bar(2, 0x80_0000_0000, 0x4_0000_0000, BAR_MEM64 | BAR_PREFETCH);
        BarRegisters {
            bars: [
                Some((small, false)),
                None,
                Some((wide, false)),
                Some((wide, true)),
                None,
                None,
            ],
            probing: [false; BARS],
            metrics: Arc::new(PciMetrics::default()),
        }
    }

    #[test]
    fn bar_registers_answer_sizing_probes_and_keep_their_addresses() {
        let mut regs = registers();
        assert_eq!(regs.read(0), 0xc010_0000);
        assert_eq!(regs.read(2), BAR_MEM64 | BAR_PREFETCH);
        assert_eq!(regs.read(3), 0x80);
        assert_eq!(regs.read(1), 0, "an absent BAR reads zero");
        // Linux sizes a BAR: all ones, read, the old value back.
        regs.write(0, 0, &u32::MAX.to_le_bytes());
        assert_eq!(regs.read(0), 0xfff0_0000);
        regs.write(0, 0, &0xc010_0000u32.to_le_bytes());
        assert_eq!(regs.read(0), 0xc010_0000);
        regs.write(3, 0, &u32::MAX.to_le_bytes());
        regs.write(2, 0, &u32::MAX.to_le_bytes());
        assert_eq!(
            (regs.read(3), regs.read(2)),
            (0xffff_fffc, BAR_MEM64 | BAR_PREFETCH)
        );
        regs.write(2, 0, &0u32.to_le_bytes());
        regs.write(3, 0, &0x80u32.to_le_bytes());
        assert_eq!(regs.metrics.bar_moves_refused.load(Ordering::Relaxed), 0);
        // A move is refused and counted; a byte write that keeps the address is not a move.
        regs.write(0, 0, &0xd000_0000u32.to_le_bytes());
        regs.write(0, 0, &[0x00]);
        assert_eq!(regs.read(0), 0xc010_0000);
        assert_eq!(regs.metrics.bar_moves_refused.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn the_rom_register_answers_sizing_keeps_its_address_and_turns_decoding_on() {
        let metrics = PciMetrics::default();
        let mut rom = RomRegister {
            bar: Bar {
                index: VFIO_PCI_ROM_REGION_INDEX,
                guest_addr: 0xc004_0000,
                size: 0x1_0000,
                flags: 0,
                mappable: false,
            },
            probing: false,
            enabled: false,
        };
        assert_eq!(rom.read(), 0xc004_0000);
        // Linux sizes it with the enable bit off, then puts the address back and enables it.
        rom.write(0, &0xffff_f800u32.to_le_bytes(), &metrics);
        assert_eq!(rom.read(), 0xffff_0000);
        rom.write(0, &0xc004_0001u32.to_le_bytes(), &metrics);
        assert_eq!(rom.read(), 0xc004_0001);
        assert!(rom.enabled);
        rom.write(0, &0xc008_0000u32.to_le_bytes(), &metrics);
        assert_eq!(rom.read(), 0xc004_0000, "it stays, decoding off");
        assert_eq!(metrics.bar_moves_refused.load(Ordering::Relaxed), 1);
        // A byte write of the low byte only toggles decoding.
        rom.write(0, &[1], &metrics);
        assert_eq!(rom.read(), 0xc004_0001);
        assert_eq!(metrics.bar_moves_refused.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn bars_are_placed_naturally_aligned_within_the_window() {
        let mut alloc = BarAllocator::new(0xc000_1000, 0xd000_0000);
        assert_eq!(alloc.take(0x10_0000), Some(0xc010_0000));
        assert_eq!(alloc.take(0x1000), Some(0xc020_0000));
        assert_eq!(alloc.take(0x800_0000), Some(0xc800_0000));
        assert_eq!(alloc.take(0x800_0000), None, "past the window");
        assert_eq!(BarAllocator::new(u64::MAX - 4, u64::MAX).take(16), None);
    }

    #[test]
    fn wide_bars_go_above_4_gib_and_may_be_as_large_as_a_gpus() {
        use crate::arch::x86_64::layout::{
            PCI_MMIO32_END, PCI_MMIO32_START, PCI_MMIO64_END, PCI_MMIO64_START,
        };
        let mut windows = BarWindows {
            low: BarAllocator::new(PCI_MMIO32_START, PCI_MMIO32_END),
            high: BarAllocator::new(PCI_MMIO64_START, PCI_MMIO64_END),
        };
        const GIB: u64 = 1 << 30;
        assert_eq!(windows.take(16 * GIB, true), Some(128 * GIB));
        assert_eq!(windows.take(1 << 20, false), Some(PCI_MMIO32_START));
        assert_eq!(
            windows.take(512 << 20, false),
            None,
            "a 32-bit BAR past its window"
        );
        assert_eq!(windows.take(512 << 20, true), Some(144 * GIB));
        assert_eq!(windows.take(64 * GIB, true), Some(192 * GIB));
        assert_eq!(windows.take(64 * GIB, true), None, "past 256 GiB");
    }
}
