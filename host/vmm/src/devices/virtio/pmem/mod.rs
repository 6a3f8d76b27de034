//! A read-only virtio-pmem device (device type 27): a host file the guest maps as memory.
//!
//! The file is mapped shared and read-only into the VMM and given to KVM as a read-only memory
//! slot, so the guest's loads reach the host's page cache directly: every VM given the same
//! file shares one copy of what it reads, and with a file system mounted `dax` the guest keeps
//! no copy of its own. The guest's writes to the region exit to the VMM, which drops them (and
//! counts them as unhandled MMIO). The one queue carries flush requests; nothing is ever
//! written, so a flush has nothing to do and is answered at once.

pub mod metrics;

use std::fs::File;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use virtio_queue::{Queue, Reader, Writer};
use vm_memory::{ByteValued, GuestAddress, Le32};
use vmm_sys_util::eventfd::EventFd;

use self::metrics::PmemMetrics;
use super::events::Polled;
use super::single_queue::{Refusals, SingleQueue};
use super::{
    ActivateError, Activation, VIRTIO_F_VERSION_1, VirtioDevice, VirtioInterrupt, count_refusal,
    read_config_bytes,
};
use crate::vstate::memory::GuestMemory;

pub const VIRTIO_ID_PMEM: u32 = 27;
const QUEUE_SIZE: u16 = 64;
const QUEUE_SIZES: [u16; 1] = [QUEUE_SIZE];
/// Requests served per wake of the event loop: a full ring.
const REQUESTS_PER_WAKE: usize = QUEUE_SIZE as usize;
/// The only request type.
const REQ_FLUSH: u32 = 0;
/// Answers: done, or failed.
const RESP_OK: u32 = 0;
const RESP_EIO: u32 = 1;
/// A region's start and size are whole multiples of this: Linux maps device memory in 2 MiB
/// subsections and refuses a region that is not aligned to them.
pub const PMEM_ALIGN: u64 = 2 << 20;
/// Regions a VM may have.
pub const MAX_PMEM: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum PmemError {
    #[error("cannot use the pmem file")]
    File(#[source] std::io::Error),
    #[error("the pmem file is not a regular file")]
    NotAFile,
    #[error("the pmem file's size, {0} bytes, is not a non-zero multiple of 2 MiB")]
    BadSize(u64),
    #[error("cannot map the pmem file")]
    Map(#[source] vm_memory::mmap::MmapRegionError),
    #[error("cannot create the pmem queue eventfd")]
    EventFd(#[source] std::io::Error),
}

/// A request or an answer: one little-endian word.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Word(Le32);

// SAFETY: one little-endian integer: every bit pattern is valid and it has no padding.
unsafe impl ByteValued for Word {}

/// The size in bytes of the region `file` holds: a regular file whose size is a non-zero
/// multiple of [`PMEM_ALIGN`].
pub fn region_size(file: &File) -> Result<u64, PmemError> {
    let meta = file.metadata().map_err(PmemError::File)?;
    if !meta.is_file() {
        return Err(PmemError::NotAFile);
    }
    let size = meta.len();
    if size == 0 || !size.is_multiple_of(PMEM_ALIGN) {
        return Err(PmemError::BadSize(size));
    }
    Ok(size)
}

/// Maps `file` (whose size [`region_size`] checked) shared and read-only: the pages are the
/// host's page cache.
pub fn map_region(file: &File, size: u64) -> Result<vm_memory::mmap::MmapRegion, PmemError> {
    let file = file.try_clone().map_err(PmemError::File)?;
    let len = usize::try_from(size).map_err(|_| PmemError::BadSize(size))?;
    vm_memory::mmap::MmapRegionBuilder::new(len)
        .with_file_offset(vm_memory::FileOffset::new(file, 0))
        .with_mmap_prot(libc::PROT_READ)
        .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
        .build()
        .map_err(PmemError::Map)
}

pub struct Pmem {
    /// Where the guest finds the region, and its size (the configuration space).
    start: GuestAddress,
    size: u64,
    queue: SingleQueue,
    interrupt: Arc<VirtioInterrupt>,
    metrics: Arc<PmemMetrics>,
}

impl Pmem {
    /// The device of a region of `size` bytes the VMM put at `start` in guest memory.
    pub fn new(
        start: GuestAddress,
        size: u64,
        interrupt: Arc<VirtioInterrupt>,
        metrics: Arc<PmemMetrics>,
    ) -> Result<Self, PmemError> {
        Ok(Self {
            start,
            size,
            queue: SingleQueue::new().map_err(PmemError::EventFd)?,
            interrupt,
            metrics,
        })
    }

    /// Answers the requests the guest queued, up to a ring's worth per wake.
    pub fn process(&mut self) {
        let metrics = &self.metrics;
        let refusals = Refusals {
            device: "pmem",
            bad_chains: &metrics.bad_chains,
            indirect_chains: None,
        };
        self.queue.serve(
            &self.interrupt,
            REQUESTS_PER_WAKE,
            &refusals,
            |mem, chain| serve(mem, chain, metrics),
        );
    }
}

/// Reads one request (a word from the chain's readable part) and writes its answer (a word in
/// its writable part); returns the bytes written.
fn serve(mem: &GuestMemory, chain: super::Chain<'_>, metrics: &PmemMetrics) -> u32 {
    let parsed = Reader::new(mem, chain.clone())
        .ok()
        .and_then(|mut r| r.read_obj::<Word>().ok())
        .zip(Writer::new(mem, chain).ok())
        .filter(|(_, answer)| answer.available_bytes() >= std::mem::size_of::<Word>());
    let Some((request, mut answer)) = parsed else {
        count(
            &metrics.bad_chains,
            "chain without a readable request and room for the answer",
        );
        return 0;
    };
    let ret = match u32::from(request.0) {
        REQ_FLUSH => {
            PmemMetrics::inc(&metrics.flushes);
            RESP_OK
        }
        other => {
            count(
                &metrics.unsupported,
                &format!("request type {other} is not served"),
            );
            RESP_EIO
        }
    };
    match answer.write_obj(Word(Le32::from(ret))) {
        Ok(()) => std::mem::size_of::<Word>() as u32,
        Err(_) => {
            count(&metrics.bad_chains, "cannot write the answer");
            0
        }
    }
}

fn count(counter: &AtomicU64, what: &str) {
    count_refusal("pmem", counter, what);
}

impl VirtioDevice for Pmem {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_PMEM
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    /// The configuration space: the region's guest-physical start at 0, its size at 8.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 16];
        config[..8].copy_from_slice(&self.start.0.to_le_bytes());
        config[8..].copy_from_slice(&self.size.to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.queue.activate(activation)
    }

    fn active_queues(&self) -> Option<&[Queue]> {
        self.queue.queues()
    }

    fn reset(&mut self) {
        self.queue.reset();
    }
}

impl Polled for Pmem {
    fn queue_events(&self) -> &[EventFd] {
        self.queue.events()
    }

    fn poll_fd(&self) -> RawFd {
        self.queue.poll_fd()
    }

    fn on_ready(&mut self) {
        self.process();
    }
}

#[cfg(test)]
mod tests;
