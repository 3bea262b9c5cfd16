//! Offloads done in software: GSO segmentation, checksum completion and
//! verification, and GRO coalescing.

pub mod csum;
pub mod gro;
pub mod gso;

pub use csum::{complete_checksum, l4_checksum_ok};
pub use gro::{Gro, GroConfig, GroFlush, GroPacket};
pub use gso::Segmenter;

use thiserror::Error;

/// Why an offload could not be applied to a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum OffloadError {
    #[error("checksum start {start} + offset {offset} + 2 past frame end {len}")]
    CsumOutOfFrame {
        start: usize,
        offset: usize,
        len: usize,
    },
    #[error("frame was not validated as a gso frame")]
    NotGso,
    #[error("gso_size is zero")]
    ZeroGsoSize,
    #[error("segment header does not parse: {0}")]
    Frame(#[from] crate::wire::Error),
}
