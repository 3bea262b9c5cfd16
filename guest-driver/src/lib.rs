//! vnic-guest: the driver side of the vnic NIC.
//!
//! Today: driver-owned shared memory, the split virtqueue, the vhost-user
//! transport and `VirtioNet` (negotiation, RX posting, frames both ways).

pub mod cli;
pub mod mem;
pub mod net;
pub mod stack;
pub mod toe;
pub mod transport;
pub mod virtqueue;

use std::net::IpAddr;

use thiserror::Error;
use vnic_protocol::virtio::{ctrl::CtrlError, hdr::HdrError, Features};

/// Driver errors. Each keeps the error it came from, where there is one.
#[derive(Debug, Error)]
pub enum Error {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("vhost-user: {0}")]
    Vhost(#[from] vhost::Error),
    #[error("vhost-user protocol: {0}")]
    VhostUser(#[from] vhost::vhost_user::Error),
    #[error("mapping shared memory: {0}")]
    Map(#[from] vm_memory::mmap::FromRangesError),
    #[error("out of shared memory: {wanted} bytes wanted, {left} left")]
    OutOfMemory { wanted: usize, left: usize },
    #[error("guest memory access: {0}")]
    Access(#[from] vm_memory::GuestMemoryError),
    #[error("virtqueue: {0}")]
    Queue(#[from] QueueError),
    #[error("virtio-net header: {0}")]
    Header(#[from] HdrError),
    #[error("control command: {0}")]
    Ctrl(#[from] CtrlError),
    #[error("RSS: {0}")]
    Rss(#[from] vnic_protocol::rss::RssError),
    #[error("feature negotiation: {0}")]
    Negotiation(String),
    #[error("the device did not accept features {0:?} (FEATURES_OK not kept)")]
    FeaturesRefused(Features),
    #[error("{0}: lock poisoned")]
    Poisoned(&'static str),
    #[error("no local address of the family of {0}")]
    NoAddress(IpAddr),
    #[error("bad argument: {0}")]
    Argument(String),
    #[error("PCI: {0}")]
    Pci(String),
}

/// What went wrong with a virtqueue, its buffers or the device's use of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum QueueError {
    #[error("queue size {0} is not a power of two up to 32768")]
    Size(u16),
    #[error("queue {index} is {size} entries, over the device's {max}")]
    TooBig { index: usize, size: u16, max: u16 },
    #[error("no free descriptors")]
    NoDescriptors,
    #[error("no free buffers")]
    NoBuffers,
    #[error("an indirect table of {0} entries (1 to the queue size)")]
    IndirectLen(usize),
    #[error("the device returned descriptor id {0}, outside the queue")]
    BadId(u32),
    #[error("the device returned chain {0}, which was not in flight")]
    NotInFlight(u16),
    #[error("virtqueue {0} is not set up")]
    NotSetUp(usize),
    #[error("the device has no virtqueue {0}")]
    Missing(usize),
    #[error("no queue pair {0} (or the pairs were taken)")]
    NoSuchPair(usize),
    #[error("frame of {0} bytes is longer than the device takes")]
    FrameTooLong(usize),
    #[error("the device did not complete a merged frame")]
    IncompleteFrame,
    #[error("no control queue")]
    NoControlQueue,
    #[error("control command of {0} bytes does not fit its buffer")]
    CtrlTooLong(usize),
    #[error("control queue busy")]
    CtrlBusy,
    #[error("the device did not answer the control command")]
    CtrlTimeout,
    #[error("config space shorter than {0} bytes")]
    ShortConfig(usize),
}

pub type Result<T> = std::result::Result<T, Error>;
