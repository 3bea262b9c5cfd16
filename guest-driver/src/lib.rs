//! vnic-guest: the driver side of the vnic NIC.
//!
//! Today: driver-owned shared memory, the split virtqueue, the vhost-user
//! transport and `VirtioNet` (negotiation, RX posting, frames both ways).

pub mod cli;
pub mod mem;
pub mod net;
pub mod stack;
pub mod transport;
pub mod virtqueue;

use thiserror::Error;

/// Driver errors.
#[derive(Debug, Error)]
pub enum Error {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("vhost-user: {0}")]
    Vhost(#[from] vhost::Error),
    #[error("vhost-user protocol: {0}")]
    VhostUser(#[from] vhost::vhost_user::Error),
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("guest memory access: {0}")]
    Access(#[from] vm_memory::GuestMemoryError),
    #[error("virtqueue: {0}")]
    Queue(&'static str),
    #[error("feature negotiation: {0}")]
    Negotiation(String),
}

pub type Result<T> = std::result::Result<T, Error>;
