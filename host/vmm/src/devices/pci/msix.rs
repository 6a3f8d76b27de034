//! MSI-X of passed-through devices. The guest programs each vector's message in a table the VMM
//! emulates (the device's own table is VFIO's to program) and turns the capability on; every
//! vector it unmasks then gets a GSI of the VM's routing table, routed to its message, and a
//! KVM irqfd over the eventfd VFIO signals for it, so no VMM thread carries the interrupts. A
//! masked vector loses its irqfd: its interrupts wait in the eventfd and reach the guest when it
//! is unmasked (KVM injects an eventfd that is already signalled when the irqfd is registered),
//! as a masked vector's pending bit would.
//!
//! The table is hostile input: accesses other than an aligned dword or qword are refused and
//! counted; vectors past [`MAX_MSIX_VECTORS`] are never served (counted once enabled).

use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use vfio_bindings::bindings::vfio::{VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX};
use vfio_ioctls::VfioDevice;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::PciMetrics;
use super::intx::{IntxLine, intx_on};
use super::msi::{MsiMessage, MsiRoutes, capability};

/// The capability's id in the standard list.
const MSIX_CAP_ID: u8 = 0x11;
/// Message control: table size (minus one), function mask, enable.
const TABLE_SIZE_MASK: u16 = 0x7ff;
pub const MSIX_FUNCTION_MASK: u16 = 1 << 14;
pub const MSIX_ENABLE: u16 = 1 << 15;
/// Table and PBA registers: the BAR in the low three bits, the offset in the rest.
const BIR_MASK: u32 = 0x7;
/// One table entry: address (low, high), data, vector control (bit 0: masked).
const ENTRY_BYTES: u64 = 16;
const ENTRY_MASKED: u32 = 1;
/// Vectors of one function the VMM serves: drivers ask for few, and each served vector holds a
/// route of the VM's GSI table and an eventfd.
pub const MAX_MSIX_VECTORS: usize = 64;

/// Where a function's MSI-X capability, table and pending-bit array are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixCapability {
    /// Byte offset of the capability (its id byte), dword-aligned.
    pub offset: usize,
    /// Entries in the table (1 to 2048).
    pub vectors: u16,
    /// The BAR number and byte offset of the table, and of the pending-bit array.
    pub table: (u32, u64),
    pub pba: (u32, u64),
}

impl MsixCapability {
    /// Finds the MSI-X capability in `config` (the first 256 bytes).
    pub fn find(config: &[u8]) -> Option<Self> {
        let at = capability(config, MSIX_CAP_ID)?;
        let dword = |i: usize| -> Option<u32> {
            Some(u32::from_le_bytes(config.get(i..i + 4)?.try_into().ok()?))
        };
        let control = u16::from_le_bytes([*config.get(at + 2)?, *config.get(at + 3)?]);
        let (table, pba) = (dword(at + 4)?, dword(at + 8)?);
        let place = |reg: u32| (reg & BIR_MASK, u64::from(reg & !BIR_MASK));
        Some(Self {
            offset: at,
            vectors: (control & TABLE_SIZE_MASK) + 1,
            table: place(table),
            pba: place(pba),
        })
    }

    /// The table's bytes in its BAR: start and length.
    pub fn table_span(&self) -> (u64, u64) {
        (self.table.1, u64::from(self.vectors) * ENTRY_BYTES)
    }

    /// The pending-bit array's bytes in its BAR: one bit per vector, in qwords.
    pub fn pba_span(&self) -> (u64, u64) {
        (self.pba.1, u64::from(self.vectors).div_ceil(64) * 8)
    }

    /// Whether BAR `index` holds the table or the pending-bit array (so it must be trapped).
    pub fn in_bar(&self, index: u32) -> bool {
        self.table.0 == index || self.pba.0 == index
    }
}

/// A table entry as the guest wrote it; masked at reset, as the specification says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    address: u64,
    data: u32,
    control: u32,
}

impl Default for Entry {
    fn default() -> Self {
        Self {
            address: 0,
            data: 0,
            control: ENTRY_MASKED,
        }
    }
}

/// The emulated table: what the guest wrote, entry by entry.
struct Table {
    entries: Vec<Entry>,
}

impl Table {
    fn new(vectors: u16) -> Self {
        Self {
            entries: vec![Entry::default(); usize::from(vectors)],
        }
    }

    fn read(&self, offset: u64, data: &mut [u8], metrics: &PciMetrics) {
        data.fill(0xff);
        let Some(fields) = self.fields(offset, data.len(), metrics) else {
            return;
        };
        for (i, (entry, field)) in fields.into_iter().enumerate() {
            let e = &self.entries[entry];
            let value = match field {
                0 => e.address as u32,
                1 => (e.address >> 32) as u32,
                2 => e.data,
                _ => e.control,
            };
            data[i * 4..i * 4 + 4].copy_from_slice(&value.to_le_bytes());
        }
    }

    /// Writes and returns the entries written.
    fn write(&mut self, offset: u64, data: &[u8], metrics: &PciMetrics) -> Vec<usize> {
        let Some(fields) = self.fields(offset, data.len(), metrics) else {
            return Vec::new();
        };
        let mut written = Vec::new();
        for (i, (entry, field)) in fields.into_iter().enumerate() {
            let mut bytes = [0u8; 4];
            bytes.copy_from_slice(&data[i * 4..i * 4 + 4]);
            let value = u32::from_le_bytes(bytes);
            let e = &mut self.entries[entry];
            match field {
                0 => e.address = (e.address & !0xffff_ffff) | u64::from(value),
                1 => e.address = (e.address & 0xffff_ffff) | (u64::from(value) << 32),
                2 => e.data = value,
                _ => e.control = value,
            }
            if written.last() != Some(&entry) {
                written.push(entry);
            }
        }
        written
    }

    /// The (entry, field) pairs an access of `len` bytes at `offset` covers: an aligned dword
    /// or qword within the table; anything else is refused and counted.
    fn fields(&self, offset: u64, len: usize, metrics: &PciMetrics) -> Option<Vec<(usize, u64)>> {
        let table_len = self.entries.len() as u64 * ENTRY_BYTES;
        let fits = offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= table_len);
        if !fits || !matches!(len, 4 | 8) || !offset.is_multiple_of(len as u64) {
            PciMetrics::count(&metrics.bad_accesses);
            return None;
        }
        Some(
            (0..len as u64 / 4)
                .map(|i| {
                    let at = offset + i * 4;
                    ((at / ENTRY_BYTES) as usize, (at % ENTRY_BYTES) / 4)
                })
                .collect(),
        )
    }
}

/// A served vector: the eventfd VFIO signals, its GSI while it has one, whether KVM listens.
struct Vector {
    event: EventFd,
    gsi: Option<u32>,
    irqfd: bool,
}

/// A function's MSI-X: its emulated table and the vectors served while it is enabled.
pub struct Msix {
    pub cap: MsixCapability,
    table: Table,
    enabled: bool,
    masked_all: bool,
    vectors: Vec<Vector>,
    device: Arc<VfioDevice>,
    routes: Arc<Mutex<MsiRoutes>>,
    vm: Arc<VmFd>,
    metrics: Arc<PciMetrics>,
}

impl Msix {
    /// The MSI-X of `device` (its first 256 bytes of configuration space in `config`), if it
    /// has the capability and VFIO offers the interrupts.
    pub fn of(
        device: Arc<VfioDevice>,
        config: &[u8],
        routes: Arc<Mutex<MsiRoutes>>,
        vm: Arc<VmFd>,
        metrics: Arc<PciMetrics>,
    ) -> Option<Self> {
        let cap = MsixCapability::find(config)?;
        let offered = device
            .get_irq_info(VFIO_PCI_MSIX_IRQ_INDEX)
            .map_or(0, |irq| irq.count);
        if offered == 0 {
            return None;
        }
        let served = usize::from(cap.vectors)
            .min(MAX_MSIX_VECTORS)
            .min(usize::try_from(offered).unwrap_or(usize::MAX));
        if served < usize::from(cap.vectors) {
            tracing::warn!(
                vectors = cap.vectors,
                served,
                "the device has more MSI-X vectors than are served"
            );
        }
        // Made now: the vCPU threads that enable MSI-X may not make file descriptors.
        let mut vectors = Vec::with_capacity(served);
        for _ in 0..served {
            match EventFd::new(EFD_NONBLOCK) {
                Ok(event) => vectors.push(Vector {
                    event,
                    gsi: None,
                    irqfd: false,
                }),
                Err(e) => {
                    tracing::warn!(error = %e, "no eventfd for an MSI-X vector");
                    break;
                }
            }
        }
        Some(Self {
            cap,
            table: Table::new(cap.vectors),
            enabled: false,
            masked_all: false,
            vectors,
            device,
            routes,
            vm,
            metrics,
        })
    }

    /// The enable and function-mask bits as the guest last wrote them.
    pub fn control_bits(&self) -> u16 {
        (if self.enabled { MSIX_ENABLE } else { 0 })
            | (if self.masked_all {
                MSIX_FUNCTION_MASK
            } else {
                0
            })
    }

    /// Reads `data` at byte `offset` of the table.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        self.table.read(offset, data, &self.metrics);
    }

    /// Writes `data` at byte `offset` of the table; a served vector follows its entry.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        for entry in self.table.write(offset, data, &self.metrics) {
            if self.enabled {
                self.follow(entry);
            }
        }
    }

    /// Follows a guest write of the capability's message control: on enable, VFIO signals one
    /// eventfd per vector (INTx off, as VFIO serves one kind at a time) and the unmasked
    /// vectors are routed; a function mask removes the irqfds; on disable, INTx comes back.
    pub fn control_written(&mut self, control: u16, intx: Option<&IntxLine>) {
        let (enable, mask) = (
            control & MSIX_ENABLE != 0,
            control & MSIX_FUNCTION_MASK != 0,
        );
        let result = match (enable, self.enabled) {
            (true, false) => self.enable(mask, intx),
            (false, true) => self.disable(intx),
            (true, true) if mask != self.masked_all => {
                self.masked_all = mask;
                (0..self.vectors.len()).for_each(|i| self.follow(i));
                Ok(())
            }
            _ => {
                self.masked_all = mask;
                Ok(())
            }
        };
        if let Err(why) = result {
            PciMetrics::count(&self.metrics.interrupt_failures);
            tracing::warn!(%why, "cannot follow the guest's MSI-X set-up");
        }
    }

    fn enable(&mut self, mask: bool, intx: Option<&IntxLine>) -> Result<(), String> {
        if intx.is_some() {
            self.device
                .disable_irq(VFIO_PCI_INTX_IRQ_INDEX)
                .map_err(|e| format!("INTx off: {e}"))?;
        }
        self.device
            .enable_msix(self.vectors.iter().map(|v| &v.event).collect())
            .map_err(|e| format!("MSI-X on: {e}"))?;
        self.enabled = true;
        self.masked_all = mask;
        (0..self.vectors.len()).for_each(|i| self.follow(i));
        Ok(())
    }

    fn disable(&mut self, intx: Option<&IntxLine>) -> Result<(), String> {
        self.enabled = false;
        for i in 0..self.vectors.len() {
            self.follow(i);
        }
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        for vector in &mut self.vectors {
            if let Some(gsi) = vector.gsi.take() {
                routes.release(gsi).map_err(|e| format!("route: {e}"))?;
            }
        }
        drop(routes);
        self.device
            .disable_msix()
            .map_err(|e| format!("MSI-X off: {e}"))?;
        if let Some(line) = intx {
            intx_on(&self.device, line)?;
        }
        Ok(())
    }

    /// Brings served vector `i` in line with its entry: routed and listened to when enabled
    /// and unmasked, not listened to otherwise. Failures are counted and logged.
    fn follow(&mut self, i: usize) {
        let Some(entry) = self.table.entries.get(i).copied() else {
            return;
        };
        let live = self.enabled && !self.masked_all && entry.control & ENTRY_MASKED == 0;
        let Some(vector) = self.vectors.get_mut(i) else {
            if live {
                PciMetrics::count(&self.metrics.interrupt_failures);
            }
            return;
        };
        let result = if live {
            route(vector, &self.routes, &self.vm, entry)
        } else if vector.irqfd {
            vector.irqfd = false;
            match vector.gsi {
                Some(gsi) => self
                    .vm
                    .unregister_irqfd(&vector.event, gsi)
                    .map_err(|e| format!("irqfd off: {e}")),
                None => Ok(()),
            }
        } else {
            Ok(())
        };
        if let Err(why) = result {
            PciMetrics::count(&self.metrics.interrupt_failures);
            tracing::warn!(%why, vector = i, "cannot follow an MSI-X vector");
        }
    }
}

/// Routes `vector` to `entry`'s message, with a GSI of its own, and has KVM listen to it.
fn route(
    vector: &mut Vector,
    routes: &Mutex<MsiRoutes>,
    vm: &VmFd,
    entry: Entry,
) -> Result<(), String> {
    let mut routes = routes.lock().unwrap_or_else(|e| e.into_inner());
    let gsi = match vector.gsi {
        Some(gsi) => gsi,
        None => {
            let gsi = routes.allocate().ok_or("no GSI left for the vector")?;
            vector.gsi = Some(gsi);
            gsi
        }
    };
    routes
        .set(
            gsi,
            Some(MsiMessage {
                address: entry.address,
                data: entry.data,
            }),
        )
        .map_err(|e| format!("route: {e}"))?;
    drop(routes);
    if !vector.irqfd {
        vm.register_irqfd(&vector.event, gsi)
            .map_err(|e| format!("irqfd: {e}"))?;
        vector.irqfd = true;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Configuration space with an MSI-X capability at 0x70 after a power management one.
    fn config(control: u16, table: u32, pba: u32) -> Vec<u8> {
        let mut config = vec![0u8; 256];
        config[0x34] = 0x40;
        config[0x40] = 0x01;
        config[0x41] = 0x70;
        config[0x70] = MSIX_CAP_ID;
        config[0x72..0x74].copy_from_slice(&control.to_le_bytes());
        config[0x74..0x78].copy_from_slice(&table.to_le_bytes());
        config[0x78..0x7c].copy_from_slice(&pba.to_le_bytes());
        config
    }

    #[test]
    fn the_capability_says_where_the_table_and_pending_bits_are() {
        // igb's: 10 vectors, table at 0 of BAR 3, pending bits at 0x2000 of BAR 3.
        let cap = MsixCapability::find(&config(9, 3, 0x2003)).unwrap();
        assert_eq!(cap.offset, 0x70);
        assert_eq!(cap.vectors, 10);
        assert_eq!(cap.table, (3, 0));
        assert_eq!(cap.pba, (3, 0x2000));
        assert_eq!(cap.table_span(), (0, 160));
        assert_eq!(cap.pba_span(), (0x2000, 8));
        assert!(cap.in_bar(3) && !cap.in_bar(0));
        let big = MsixCapability::find(&config(0x7ff | MSIX_ENABLE, 0x1000, 0x9004)).unwrap();
        assert_eq!(big.vectors, 2048);
        assert_eq!(big.table, (0, 0x1000));
        assert_eq!(big.pba, (4, 0x9000));
        assert_eq!(big.pba_span(), (0x9000, 256));
        let mut none = config(9, 3, 0x2003);
        none[0x70] = 0x05;
        assert_eq!(MsixCapability::find(&none), None);
    }

    #[test]
    fn the_table_keeps_what_the_guest_writes_and_refuses_odd_accesses() {
        let metrics = PciMetrics::default();
        let mut table = Table::new(2);
        let mut word = [0u8; 4];
        table.read(12, &mut word, &metrics);
        assert_eq!(u32::from_le_bytes(word), ENTRY_MASKED, "masked at reset");
        // Entry 1: address in two dwords, then data and control in one qword.
        assert_eq!(
            table.write(16, &0xfee0_0000u32.to_le_bytes(), &metrics),
            [1]
        );
        assert_eq!(table.write(20, &0u32.to_le_bytes(), &metrics), [1]);
        let data_and_control = 0x0000_0000_0000_00e1u64;
        assert_eq!(
            table.write(24, &data_and_control.to_le_bytes(), &metrics),
            [1]
        );
        assert_eq!(
            table.entries[1],
            Entry {
                address: 0xfee0_0000,
                data: 0xe1,
                control: 0
            }
        );
        let mut qword = [0u8; 8];
        table.read(16, &mut qword, &metrics);
        assert_eq!(u64::from_le_bytes(qword), 0xfee0_0000);
        assert_eq!(
            metrics
                .bad_accesses
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
        // Past the table, unaligned, or neither a dword nor a qword: refused, counted.
        assert!(table.write(32, &[0; 4], &metrics).is_empty());
        assert!(table.write(18, &[0; 4], &metrics).is_empty());
        assert!(table.write(20, &[0; 8], &metrics).is_empty());
        assert!(table.write(16, &[0; 2], &metrics).is_empty());
        assert!(table.write(u64::MAX - 2, &[0; 4], &metrics).is_empty());
        table.read(40, &mut word, &metrics);
        assert_eq!(word, [0xff; 4]);
        assert_eq!(
            metrics
                .bad_accesses
                .load(std::sync::atomic::Ordering::Relaxed),
            6
        );
        assert_eq!(table.entries[0], Entry::default());
    }
}
