//! virtio-vsock packets: the 44-byte header and the payload that follows it in a descriptor
//! chain. Guest-written headers and chains are checked here before anything else looks at them.

use std::io::{Read, Write};

use vm_memory::{ByteValued, GuestAddress, Le16, Le32, Le64};

use crate::devices::virtio::uses_indirect;
use crate::vstate::memory::GuestMemory;

pub use crate::devices::virtio::Chain;

pub const HEADER_SIZE: usize = std::mem::size_of::<VsockHeader>();
/// Largest payload of one packet, in either direction (the Linux driver's own limit).
pub const MAX_PAYLOAD: usize = 64 * 1024;

pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// Shutdown flags: the sender will receive no more / send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// The packet header, little-endian on the wire.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VsockHeader {
    pub src_cid: Le64,
    pub dst_cid: Le64,
    pub src_port: Le32,
    pub dst_port: Le32,
    pub len: Le32,
    pub type_: Le16,
    pub op: Le16,
    pub flags: Le32,
    pub buf_alloc: Le32,
    pub fwd_cnt: Le32,
}

// SAFETY: a packed struct of little-endian integers: every bit pattern is valid and it has no
// padding.
unsafe impl ByteValued for VsockHeader {}

/// The fields of a header, in host order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl From<VsockHeader> for Header {
    fn from(h: VsockHeader) -> Self {
        Self {
            src_cid: h.src_cid.into(),
            dst_cid: h.dst_cid.into(),
            src_port: h.src_port.into(),
            dst_port: h.dst_port.into(),
            len: h.len.into(),
            type_: h.type_.into(),
            op: h.op.into(),
            flags: h.flags.into(),
            buf_alloc: h.buf_alloc.into(),
            fwd_cnt: h.fwd_cnt.into(),
        }
    }
}

impl From<Header> for VsockHeader {
    fn from(h: Header) -> Self {
        Self {
            src_cid: h.src_cid.into(),
            dst_cid: h.dst_cid.into(),
            src_port: h.src_port.into(),
            dst_port: h.dst_port.into(),
            len: h.len.into(),
            type_: h.type_.into(),
            op: h.op.into(),
            flags: h.flags.into(),
            buf_alloc: h.buf_alloc.into(),
            fwd_cnt: h.fwd_cnt.into(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    #[error("descriptor chain is malformed or points outside guest memory")]
    BadChain,
    #[error("chain too short for a vsock header")]
    ShortHeader,
    #[error("payload length {0} exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLong(u32),
    #[error("header claims {claimed} payload bytes but the chain holds {available}")]
    Truncated { claimed: u32, available: usize },
    #[error("receive buffer too small for a header")]
    ShortRxBuffer,
    #[error("descriptor chain uses an indirect table, which the device does not offer")]
    Indirect,
}

/// Refuses the chain at `head` of a queue of `queue_size` whose table is at `desc_table` when
/// any of its descriptors is indirect (see [`uses_indirect`]).
pub fn refuse_indirect(
    mem: &GuestMemory,
    desc_table: GuestAddress,
    queue_size: u16,
    head: u16,
) -> Result<(), PacketError> {
    if uses_indirect(mem, desc_table, queue_size, head) {
        return Err(PacketError::Indirect);
    }
    Ok(())
}

/// A packet the guest transmitted, copied out of guest memory.
#[derive(Debug, PartialEq, Eq)]
pub struct TxPacket {
    pub hdr: Header,
    pub payload: Vec<u8>,
}

/// Reads a transmit chain: header from its readable descriptors, then exactly `len` payload bytes.
pub fn read_tx_packet(mem: &GuestMemory, chain: Chain<'_>) -> Result<TxPacket, PacketError> {
    let mut reader = virtio_queue::Reader::new(mem, chain).map_err(|_| PacketError::BadChain)?;
    if reader.available_bytes() < HEADER_SIZE {
        return Err(PacketError::ShortHeader);
    }
    let hdr: Header = reader
        .read_obj::<VsockHeader>()
        .map_err(|_| PacketError::BadChain)?
        .into();
    let len = hdr.len as usize;
    if len > MAX_PAYLOAD {
        return Err(PacketError::TooLong(hdr.len));
    }
    let available = reader.available_bytes();
    if len > available {
        return Err(PacketError::Truncated {
            claimed: hdr.len,
            available,
        });
    }
    let mut payload = vec![0u8; len];
    reader
        .read_exact(&mut payload)
        .map_err(|_| PacketError::BadChain)?;
    Ok(TxPacket { hdr, payload })
}

/// A receive chain opened for writing: the payload capacity is known before a packet is built.
pub struct RxBuffer<'a> {
    writer: virtio_queue::Writer<'a>,
}

impl<'a> RxBuffer<'a> {
    pub fn new(mem: &'a GuestMemory, chain: Chain<'_>) -> Result<Self, PacketError> {
        let writer = virtio_queue::Writer::new(mem, chain).map_err(|_| PacketError::BadChain)?;
        if writer.available_bytes() < HEADER_SIZE {
            return Err(PacketError::ShortRxBuffer);
        }
        Ok(Self { writer })
    }

    /// How many payload bytes fit after the header.
    pub fn payload_capacity(&self) -> usize {
        (self.writer.available_bytes() - HEADER_SIZE).min(MAX_PAYLOAD)
    }

    /// Writes header and payload; returns the bytes written (the used length).
    pub fn write(mut self, mut hdr: Header, payload: &[u8]) -> Result<u32, PacketError> {
        let payload = &payload[..payload.len().min(self.payload_capacity())];
        hdr.len = payload.len() as u32;
        self.writer
            .write_obj(VsockHeader::from(hdr))
            .map_err(|_| PacketError::BadChain)?;
        self.writer
            .write_all(payload)
            .map_err(|_| PacketError::BadChain)?;
        Ok((HEADER_SIZE + payload.len()) as u32)
    }
}
