//! A read-only userspace virtio-blk device (device type 2) over a host file.
//!
//! What agents have in common (a runtime, models) sits in one file on the host that many VMs
//! read: the device never writes, so one page-cache copy serves them all. Requests are served
//! on the VMM's event loop thread, a queue's worth per wake; the guest's header, buffers and
//! sector ranges are checked first, and every refusal is counted.

pub mod metrics;
pub mod request;

use std::fs::File;
use std::io::Write;
use std::os::fd::RawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use self::metrics::BlockMetrics;
use self::request::{
    ID_BYTES, Request, RequestError, S_IOERR, S_OK, S_UNSUPP, SECTOR_SIZE, T_FLUSH, T_GET_ID, T_IN,
    T_OUT, read_offset,
};
use super::events::Polled;
use super::single_queue::{Refusals, SingleQueue};
use super::{
    ActivateError, Activation, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VirtioDevice,
    VirtioInterrupt, count_refusal, read_config_bytes,
};

pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Feature bits: the driver may put at most `seg_max` data buffers in one request; the disk
/// is read-only.
const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
const VIRTIO_BLK_F_RO: u32 = 5;
const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 1] = [QUEUE_SIZE];
/// Data buffers per request: the queue's size less the header and the status.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// The largest read one request may ask for. Linux asks for at most 1.25 MiB (its default
/// limit of 2,560 sectors); the bound keeps one request from holding the event loop long.
pub const MAX_REQUEST_BYTES: usize = 4 << 20;
/// Bytes copied from the file per step of a read (the bounce buffer's size).
const CHUNK_BYTES: usize = 128 << 10;
/// Requests served per wake of the event loop: a full ring.
pub const REQUESTS_PER_WAKE: usize = QUEUE_SIZE as usize;
/// Disks a VM may have.
pub const MAX_DISKS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot use the disk file")]
    File(#[source] std::io::Error),
    #[error("the disk file is not a regular file")]
    NotAFile,
    #[error("the disk file is empty")]
    Empty,
    #[error("the disk file's size, {0} bytes, is not a whole number of 512-byte sectors")]
    NotSectors(u64),
    #[error("the disk's id {0:?} is longer than {ID_BYTES} bytes")]
    IdTooLong(String),
    #[error("cannot create the block queue eventfd")]
    EventFd(#[source] std::io::Error),
}

/// The disk behind the device, and what serving a request needs.
struct Disk {
    file: File,
    /// The disk's size in bytes, a whole number of sectors.
    capacity: u64,
    id: [u8; ID_BYTES],
    /// The bounce buffer reads go through.
    chunk: Vec<u8>,
}

pub struct Block {
    disk: Disk,
    queue: SingleQueue,
    interrupt: Arc<VirtioInterrupt>,
    metrics: Arc<BlockMetrics>,
}

impl Block {
    /// A device over `file`, whose size must be a whole, non-zero number of sectors; `id` is
    /// what the guest reads as the disk's serial number (`/sys/block/vdX/serial`).
    pub fn new(
        file: File,
        id: &str,
        interrupt: Arc<VirtioInterrupt>,
        metrics: Arc<BlockMetrics>,
    ) -> Result<Self, BlockError> {
        let capacity = disk_size(&file)?;
        if id.len() > ID_BYTES {
            return Err(BlockError::IdTooLong(id.to_owned()));
        }
        let mut id_bytes = [0; ID_BYTES];
        id_bytes[..id.len()].copy_from_slice(id.as_bytes());
        Ok(Self {
            disk: Disk {
                file,
                capacity,
                id: id_bytes,
                chunk: vec![0; CHUNK_BYTES],
            },
            queue: SingleQueue::new().map_err(BlockError::EventFd)?,
            interrupt,
            metrics,
        })
    }

    /// Serves the requests the guest queued, up to [`REQUESTS_PER_WAKE`]; past that the device
    /// wakes itself again, so that the event loop serves everything else first.
    pub fn process(&mut self) {
        let (disk, metrics) = (&mut self.disk, &self.metrics);
        let refusals = Refusals {
            device: "block",
            bad_chains: &metrics.bad_chains,
            indirect_chains: Some(&metrics.indirect_chains),
        };
        let budget_spent = self.queue.serve(
            &self.interrupt,
            REQUESTS_PER_WAKE,
            &refusals,
            |mem, chain| match Request::parse(mem, chain) {
                Ok(request) => disk.serve(metrics, request),
                Err(e) => {
                    count(&metrics.bad_chains, &e.to_string());
                    0
                }
            },
        );
        if budget_spent {
            BlockMetrics::inc(&self.metrics.budget_spent);
        }
    }
}

/// The size in bytes of the disk `file` holds: a regular file, not empty, a whole number of
/// sectors.
pub fn disk_size(file: &File) -> Result<u64, BlockError> {
    let meta = file.metadata().map_err(BlockError::File)?;
    if !meta.is_file() {
        return Err(BlockError::NotAFile);
    }
    let size = meta.len();
    if size == 0 {
        return Err(BlockError::Empty);
    }
    if !size.is_multiple_of(SECTOR_SIZE) {
        return Err(BlockError::NotSectors(size));
    }
    Ok(size)
}

enum ReadError {
    Range(request::RangeError),
    File(std::io::Error),
    Guest,
}

impl Disk {
    /// Serves one parsed request and writes its status; returns the bytes written into the
    /// guest's buffers (the used length).
    fn serve(&mut self, metrics: &BlockMetrics, mut request: Request<'_>) -> u32 {
        let (status, data_written) = match request.type_ {
            T_IN => match self.read(&mut request) {
                Ok(n) => {
                    BlockMetrics::inc(&metrics.reads);
                    BlockMetrics::add(&metrics.read_bytes, n as u64);
                    (S_OK, n)
                }
                Err(ReadError::Range(e)) => {
                    count(&metrics.bad_ranges, &e.to_string());
                    (S_IOERR, 0)
                }
                Err(ReadError::File(e)) => {
                    count(
                        &metrics.io_errors,
                        &format!("cannot read the disk file: {e}"),
                    );
                    (S_IOERR, 0)
                }
                Err(ReadError::Guest) => {
                    count(&metrics.bad_chains, &RequestError::BadChain.to_string());
                    (S_IOERR, 0)
                }
            },
            T_GET_ID => {
                let n = request.data.available_bytes().min(ID_BYTES);
                match request.data.write_all(&self.id[..n]) {
                    Ok(()) => {
                        BlockMetrics::inc(&metrics.get_ids);
                        (S_OK, n)
                    }
                    Err(_) => {
                        count(&metrics.bad_chains, &RequestError::BadChain.to_string());
                        (S_IOERR, 0)
                    }
                }
            }
            // Nothing is ever written, so there is nothing to flush.
            T_FLUSH => {
                BlockMetrics::inc(&metrics.flushes);
                (S_OK, 0)
            }
            T_OUT => {
                count(&metrics.writes_refused, "write to a read-only disk");
                (S_IOERR, 0)
            }
            other => {
                count(
                    &metrics.unsupported,
                    &format!("request type {other} is not served"),
                );
                (S_UNSUPP, 0)
            }
        };
        if request.status.write_all(&[status]).is_err() {
            count(&metrics.bad_chains, &RequestError::NoStatus.to_string());
            return data_written as u32;
        }
        // Both are bounded: data by MAX_REQUEST_BYTES or ID_BYTES, the status by one byte.
        (data_written + 1) as u32
    }

    /// Copies the sectors the request asks for from the file into its buffers, a chunk at a time.
    fn read(&mut self, request: &mut Request<'_>) -> Result<usize, ReadError> {
        let len = request.data.available_bytes();
        let mut offset = read_offset(request.sector, len, self.capacity, MAX_REQUEST_BYTES)
            .map_err(ReadError::Range)?;
        let mut left = len;
        while left > 0 {
            let step = left.min(self.chunk.len());
            self.file
                .read_exact_at(&mut self.chunk[..step], offset)
                .map_err(ReadError::File)?;
            request
                .data
                .write_all(&self.chunk[..step])
                .map_err(|_| ReadError::Guest)?;
            left -= step;
            offset += step as u64;
        }
        Ok(len)
    }
}

fn count(counter: &AtomicU64, what: &str) {
    count_refusal("block", counter, what);
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_RO)
    }

    /// The configuration space: capacity in sectors at 0, `size_max` at 8 (not offered, zero),
    /// `seg_max` at 12; the rest reads as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 16];
        config[..8].copy_from_slice(&(self.disk.capacity / SECTOR_SIZE).to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
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

impl Polled for Block {
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
