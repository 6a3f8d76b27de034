//! PCI, for devices passed to the guest with VFIO (virtio devices stay on virtio-mmio): one root
//! bus, bus 0, behind a host bridge at 00:00.0. The guest reaches its configuration space
//! through ECAM (a memory window the MCFG table describes, 4 KiB per function) and through the
//! legacy 0xCF8/0xCFC ports; the DSDT describes the root with its windows.
//!
//! Every guest access is hostile input: an address off the bus, a multi-function number, an
//! access that is not 1, 2 or 4 bytes or crosses a register reads all ones and writes nothing,
//! and is counted.

pub mod intx;
pub mod msi;
pub mod msix;
pub mod passthrough;
pub mod vfio;

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::devices::bus::BusDevice;

/// Devices on the root bus (the host bridge takes the first).
pub const MAX_SLOTS: usize = 32;
/// Dword registers of one function's configuration space (4 KiB).
pub const CONFIG_REGISTERS: usize = 1024;
/// ECAM: 1 MiB per bus (32 devices × 8 functions × 4 KiB); the VM has bus 0 only.
pub const ECAM_BUS_SIZE: u64 = 1 << 20;
/// The legacy configuration ports: an address register at 0xCF8, data at 0xCFC-0xCFF.
pub const CONFIG_IO_PORT: u16 = 0xcf8;
pub const CONFIG_IO_LEN: u16 = 8;

/// What a read of a missing device or a refused access returns.
const ALL_ONES: u32 = 0xffff_ffff;
/// The host bridge's ids: Red Hat's "QEMU PCIe host bridge" would tell the guest it runs on
/// QEMU; an Intel id for a generic virtual host bridge, as other VMMs use.
const HOST_BRIDGE_VENDOR: u32 = 0x8086;
const HOST_BRIDGE_DEVICE: u32 = 0x0d57;
/// Class code register: bridge (0x06), host bridge (0x00), revision 0.
const HOST_BRIDGE_CLASS: u32 = 0x0600_0000;

/// A PCI function's address on the host, as sysfs names it: `0000:00:03.0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PciAddress {
    pub domain: u16,
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a PCI address; give one as sysfs names it, like 0000:01:00.0")]
pub struct BadPciAddress(pub String);

impl FromStr for PciAddress {
    type Err = BadPciAddress;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || BadPciAddress(text.to_owned());
        let b = text.as_bytes();
        if b.len() != 12 || b[4] != b':' || b[7] != b':' || b[10] != b'.' {
            return Err(bad());
        }
        let hex = |r: std::ops::Range<usize>| {
            let part = &text[r];
            if part.bytes().all(|c| c.is_ascii_hexdigit()) {
                u32::from_str_radix(part, 16).map_err(|_| bad())
            } else {
                Err(bad())
            }
        };
        let (domain, bus, device, function) = (hex(0..4)?, hex(5..7)?, hex(8..10)?, hex(11..12)?);
        if device >= MAX_SLOTS as u32 || function > 7 {
            return Err(bad());
        }
        Ok(Self {
            domain: domain as u16,
            bus: bus as u8,
            device: device as u8,
            function: function as u8,
        })
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

/// A host PCI function to pass to the guest, and how: `ADDRESS`, or `ADDRESS,mmap=off` to trap
/// every access to its BARs instead of mapping them into the guest (slower, for a device that
/// misbehaves when mapped, and to measure what mapping saves).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PassedDevice {
    pub address: PciAddress,
    pub map_bars: bool,
}

/// The option that traps a passed device's BARs.
const NO_MMAP: &str = "mmap=off";

#[derive(Debug, thiserror::Error)]
pub enum BadPassedDevice {
    #[error("{0:?}: give a device as vfio:ADDRESS, like vfio:0000:01:00.0")]
    Kind(String),
    #[error(transparent)]
    Address(#[from] BadPciAddress),
    #[error("{0:?}: unknown device option; the one there is, mmap=off, traps the device's BARs")]
    Option(String),
}

impl FromStr for PassedDevice {
    type Err = BadPassedDevice;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (address, option) = match text.split_once(',') {
            Some((address, option)) => (address, Some(option)),
            None => (text, None),
        };
        let map_bars = match option {
            None => true,
            Some(NO_MMAP) => false,
            Some(other) => return Err(BadPassedDevice::Option(other.to_owned())),
        };
        Ok(Self {
            address: address.parse()?,
            map_bars,
        })
    }
}

impl PassedDevice {
    /// A device as users give it: `vfio:ADDRESS[,mmap=off]`, the one kind there is.
    pub fn from_spec(text: &str) -> Result<Self, BadPassedDevice> {
        text.strip_prefix("vfio:")
            .ok_or_else(|| BadPassedDevice::Kind(text.to_owned()))?
            .parse()
    }
}

impl fmt::Display for PassedDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.address)?;
        if !self.map_bars {
            write!(f, ",{NO_MMAP}")?;
        }
        Ok(())
    }
}

/// A function on the guest's bus: its configuration space, one dword register at a time.
pub trait PciFunction: Send {
    /// The dword register `reg` (`reg` < [`CONFIG_REGISTERS`]).
    fn read_config(&mut self, reg: usize) -> u32;
    /// Writes `data` (1, 2 or 4 bytes, within the register) at byte `offset` of register `reg`.
    fn write_config(&mut self, reg: usize, offset: usize, data: &[u8]);
}

/// Counts of the guest's PCI accesses that were refused, and of those the VMM served itself.
#[derive(Debug, Default)]
pub struct PciMetrics {
    /// Accesses of a width other than 1, 2 or 4 bytes, or across a register.
    pub bad_accesses: AtomicU64,
    /// Accesses to another bus or a function other than 0.
    pub absent_functions: AtomicU64,
    /// BAR writes that would have moved a BAR (BARs stay where the VMM placed them).
    pub bar_moves_refused: AtomicU64,
    /// Interrupt set-ups the guest asked for (MSI on, off, a new message) that failed.
    pub interrupt_failures: AtomicU64,
    /// Guest accesses to trapped BARs, forwarded to the device by the VMM (a mapped BAR's
    /// accesses never leave the guest).
    pub trapped_bar_accesses: AtomicU64,
}

impl PciMetrics {
    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> PciMetricsSnapshot {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PciMetricsSnapshot {
            bad_accesses: load(&self.bad_accesses),
            absent_functions: load(&self.absent_functions),
            bar_moves_refused: load(&self.bar_moves_refused),
            interrupt_failures: load(&self.interrupt_failures),
            trapped_bar_accesses: load(&self.trapped_bar_accesses),
        }
    }
}

/// [`PciMetrics`] at one moment, for reports.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PciMetricsSnapshot {
    pub bad_accesses: u64,
    pub absent_functions: u64,
    pub bar_moves_refused: u64,
    pub interrupt_failures: u64,
    pub trapped_bar_accesses: u64,
}

/// The root bus: slot 0 holds the host bridge, devices take the next free slots.
pub struct PciBus {
    slots: Vec<Option<Arc<Mutex<dyn PciFunction>>>>,
    metrics: Arc<PciMetrics>,
}

impl PciBus {
    pub fn new(metrics: Arc<PciMetrics>) -> Self {
        let mut slots: Vec<Option<Arc<Mutex<dyn PciFunction>>>> = vec![None; MAX_SLOTS];
        slots[0] = Some(Arc::new(Mutex::new(HostBridge)));
        Self { slots, metrics }
    }

    /// Puts `device` in the first free slot and returns the slot's number; none when full.
    pub fn add(&mut self, device: Arc<Mutex<dyn PciFunction>>) -> Option<u8> {
        let slot = self.slots.iter().position(Option::is_none)?;
        self.slots[slot] = Some(device);
        Some(slot as u8)
    }

    fn function(
        &self,
        bus: u32,
        device: u32,
        function: u32,
    ) -> Option<&Arc<Mutex<dyn PciFunction>>> {
        if bus != 0 || function != 0 {
            PciMetrics::count(&self.metrics.absent_functions);
            return None;
        }
        self.slots.get(device as usize)?.as_ref()
    }

    /// Reads `data.len()` bytes at byte `offset` of register `reg` of a function.
    fn read(
        &self,
        (bus, device, function): (u32, u32, u32),
        reg: usize,
        offset: usize,
        data: &mut [u8],
    ) {
        let value = match (
            self.function(bus, device, function),
            access_ok(offset, data.len()),
        ) {
            (Some(f), true) if reg < CONFIG_REGISTERS => {
                f.lock().unwrap_or_else(|e| e.into_inner()).read_config(reg)
            }
            (_, false) => {
                PciMetrics::count(&self.metrics.bad_accesses);
                ALL_ONES
            }
            _ => ALL_ONES,
        };
        let bytes = value.to_le_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = bytes.get(offset + i).copied().unwrap_or(0xff);
        }
    }

    fn write(
        &self,
        (bus, device, function): (u32, u32, u32),
        reg: usize,
        offset: usize,
        data: &[u8],
    ) {
        if !access_ok(offset, data.len()) {
            PciMetrics::count(&self.metrics.bad_accesses);
            return;
        }
        if let Some(f) = self.function(bus, device, function)
            && reg < CONFIG_REGISTERS
        {
            f.lock()
                .unwrap_or_else(|e| e.into_inner())
                .write_config(reg, offset, data);
        }
    }
}

/// An access of 1, 2 or 4 bytes that stays within one dword register.
fn access_ok(offset: usize, len: usize) -> bool {
    matches!(len, 1 | 2 | 4) && offset.is_multiple_of(len) && offset + len <= 4
}

/// Merges `data` written at byte `offset` into the dword `old`.
pub fn merge(old: u32, offset: usize, data: &[u8]) -> u32 {
    let mut bytes = old.to_le_bytes();
    for (i, byte) in data.iter().enumerate() {
        if let Some(b) = bytes.get_mut(offset + i) {
            *b = *byte;
        }
    }
    u32::from_le_bytes(bytes)
}

/// The host bridge at 00:00.0: ids and class, nothing writable.
struct HostBridge;

impl PciFunction for HostBridge {
    fn read_config(&mut self, reg: usize) -> u32 {
        match reg {
            0 => HOST_BRIDGE_DEVICE << 16 | HOST_BRIDGE_VENDOR,
            2 => HOST_BRIDGE_CLASS,
            _ => 0,
        }
    }

    fn write_config(&mut self, _reg: usize, _offset: usize, _data: &[u8]) {}
}

/// ECAM: the configuration space of bus 0 as memory, at the base the MCFG table gives.
pub struct EcamWindow(pub Arc<PciBus>);

impl EcamWindow {
    /// Device, function, register and byte within it, of an offset into the window.
    fn decode(offset: u64) -> ((u32, u32, u32), usize, usize) {
        let offset = offset as u32;
        let bus = offset >> 20;
        let device = (offset >> 15) & 0x1f;
        let function = (offset >> 12) & 0x7;
        let reg = ((offset & 0xfff) >> 2) as usize;
        ((bus, device, function), reg, (offset & 3) as usize)
    }
}

impl BusDevice for EcamWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (func, reg, byte) = Self::decode(offset);
        self.0.read(func, reg, byte, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (func, reg, byte) = Self::decode(offset);
        self.0.write(func, reg, byte, data);
    }
}

/// The legacy configuration mechanism: a dword address register at 0xCF8 (bit 31 enables,
/// then bus, device, function, register), data at 0xCFC-0xCFF. Linux probes it by writing
/// 0x80000000 and reading it back, and uses it for the first 256 bytes of each function.
pub struct ConfigPorts {
    bus: Arc<PciBus>,
    address: u32,
}

impl ConfigPorts {
    pub fn new(bus: Arc<PciBus>) -> Self {
        Self { bus, address: 0 }
    }

    fn target(&self) -> Option<((u32, u32, u32), usize)> {
        let a = self.address;
        (a & 0x8000_0000 != 0).then_some((
            ((a >> 16) & 0xff, (a >> 11) & 0x1f, (a >> 8) & 0x7),
            ((a >> 2) & 0x3f) as usize,
        ))
    }
}

impl BusDevice for ConfigPorts {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, data.len()) {
            (0, 4) => data.copy_from_slice(&self.address.to_le_bytes()),
            (4..=7, _) => match self.target() {
                Some((func, reg)) => self.bus.read(func, reg, (offset - 4) as usize, data),
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.len()) {
            // Only a whole-dword write sets the address (byte writes to 0xCF9 are the
            // chipset's reset control on real machines, and not ours).
            (0, 4) => {
                let mut bytes = [0u8; 4];
                bytes.copy_from_slice(data);
                self.address = u32::from_le_bytes(bytes) & 0x80ff_fffc;
            }
            (4..=7, _) => {
                if let Some((func, reg)) = self.target() {
                    self.bus.write(func, reg, (offset - 4) as usize, data);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(u32, Vec<(usize, usize, Vec<u8>)>);

    impl PciFunction for Fixed {
        fn read_config(&mut self, reg: usize) -> u32 {
            self.0.wrapping_add(reg as u32)
        }
        fn write_config(&mut self, reg: usize, offset: usize, data: &[u8]) {
            self.1.push((reg, offset, data.to_vec()));
        }
    }

    fn bus_with_device() -> (Arc<PciBus>, Arc<Mutex<Fixed>>, Arc<PciMetrics>) {
        let metrics = Arc::new(PciMetrics::default());
        let mut bus = PciBus::new(metrics.clone());
        let dev = Arc::new(Mutex::new(Fixed(0x1122_3340, Vec::new())));
        assert_eq!(bus.add(dev.clone()), Some(1));
        (Arc::new(bus), dev, metrics)
    }

    #[test]
    fn addresses_parse_as_sysfs_names_them() {
        let a: PciAddress = "0000:00:1f.7".parse().unwrap();
        assert_eq!((a.domain, a.bus, a.device, a.function), (0, 0, 0x1f, 7));
        assert_eq!(a.to_string(), "0000:00:1f.7");
        for bad in [
            "0000:00:20.0",
            "0000:00:03.8",
            "0000:00:03",
            "../../x/y/z.0",
            "0000:0g:03.0",
            "+000:00:03.0",
        ] {
            assert!(bad.parse::<PciAddress>().is_err(), "{bad}");
        }
    }

    #[test]
    fn passed_devices_map_their_bars_unless_told_not_to() {
        let mapped: PassedDevice = "0000:00:01.0".parse().unwrap();
        assert!(mapped.map_bars);
        assert_eq!(mapped.to_string(), "0000:00:01.0");
        let trapped: PassedDevice = "0000:00:01.0,mmap=off".parse().unwrap();
        assert!(!trapped.map_bars);
        assert_eq!(trapped.address, mapped.address);
        assert_eq!(trapped.to_string(), "0000:00:01.0,mmap=off");
        for bad in [
            "0000:00:01.0,mmap=on",
            "0000:00:01.0,",
            "0000:00:01.0,mmap=off,x",
            "x,mmap=off",
        ] {
            assert!(bad.parse::<PassedDevice>().is_err(), "{bad}");
        }
    }

    #[test]
    fn ecam_reaches_each_slot_and_refuses_the_rest() {
        let (bus, dev, metrics) = bus_with_device();
        let mut ecam = EcamWindow(bus);
        let mut data = [0u8; 4];
        ecam.read(0, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0x0d57_8086, "host bridge ids");
        // Device 1, register 2, its upper half.
        let mut half = [0u8; 2];
        ecam.read(1 << 15 | 8 | 2, &mut half);
        assert_eq!(u16::from_le_bytes(half), 0x1122);
        ecam.write(1 << 15 | 0x10, &[1, 2, 3, 4]);
        assert_eq!(dev.lock().unwrap().1, vec![(4, 0, vec![1, 2, 3, 4])]);
        // An empty slot, function 1, bus 1, a crossing or odd-sized access: all ones, no write.
        for (offset, len) in [
            (2 << 15, 4),
            (1 << 15 | 1 << 12, 4),
            (1 << 20 | 1 << 15, 4),
            (1 << 15 | 3, 2),
            (1 << 15, 3),
        ] {
            let mut data = vec![0u8; len];
            ecam.read(offset, &mut data);
            assert!(data.iter().all(|&b| b == 0xff), "{offset:#x}+{len}");
            ecam.write(offset, &data);
        }
        assert_eq!(dev.lock().unwrap().1.len(), 1);
        assert_eq!(metrics.bad_accesses.load(Ordering::Relaxed), 4);
        assert_eq!(metrics.absent_functions.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn the_legacy_ports_latch_an_address_and_move_data() {
        let (bus, dev, _) = bus_with_device();
        let mut ports = ConfigPorts::new(bus);
        ports.write(0, &0x8000_0000u32.to_le_bytes());
        let mut data = [0u8; 4];
        ports.read(0, &mut data);
        assert_eq!(
            u32::from_le_bytes(data),
            0x8000_0000,
            "Linux's probe reads it back"
        );
        ports.write(0, &(0x8000_0000u32 | 1 << 11 | 0x10).to_le_bytes());
        ports.read(4, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0x1122_3344);
        ports.write(6, &[9, 9]);
        assert_eq!(dev.lock().unwrap().1, vec![(4, 2, vec![9, 9])]);
        // Disabled: nothing reaches the device.
        ports.write(0, &0x0000_0810u32.to_le_bytes());
        ports.read(4, &mut data);
        assert_eq!(data, [0xff; 4]);
    }

    #[test]
    fn merge_puts_bytes_in_place() {
        assert_eq!(merge(0x1122_3344, 2, &[0xaa]), 0x11aa_3344);
        assert_eq!(merge(0x1122_3344, 0, &[1, 2, 3, 4]), 0x0403_0201);
    }
}
