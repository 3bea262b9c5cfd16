//! Zero-copy views and `Repr` types for the headers a NIC meets.
//!
//! Each header has a `Packet<T: AsRef<[u8]>>`-style view whose `new_checked`
//! checks the length once; after that no accessor panics. `Repr` types
//! `parse` a view into owned values and `emit` them back. [`parse_frame`]
//! walks a whole Ethernet frame down to its transport header.

pub mod arp;
pub mod build;
pub mod emit;
pub mod ethernet;
pub mod icmpv4;
pub mod icmpv6;
pub mod ipv4;
pub mod ipv6;
pub mod tcp;
pub mod udp;

pub(crate) mod frame;

pub use frame::{parse_frame, parse_frame_prefix, FrameInfo, L3Info, L4Info, MAX_VLAN_TAGS};

/// Why a header could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The buffer ends before the header (or its stated length) does.
    #[error("truncated {0}")]
    Truncated(&'static str),
    /// A field holds a value the format forbids.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// Well formed, but a kind this code does not handle.
    #[error("unsupported {0}")]
    Unsupported(&'static str),
    /// The checksum does not verify.
    #[error("bad checksum in {0}")]
    Checksum(&'static str),
}

/// `Result` with the wire [`enum@Error`].
pub type Result<T> = core::result::Result<T, Error>;

/// A byte range of a header field.
pub(crate) type Field = core::ops::Range<usize>;

/// IP protocol numbers (IPv4 protocol / IPv6 next header) used here.
pub mod ip_proto {
    pub const HOP_BY_HOP: u8 = 0;
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ROUTING: u8 = 43;
    pub const FRAGMENT: u8 = 44;
    pub const ESP: u8 = 50;
    pub const AH: u8 = 51;
    pub const ICMPV6: u8 = 58;
    pub const NO_NEXT: u8 = 59;
    pub const DST_OPTS: u8 = 60;
}

#[inline]
pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

#[inline]
pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[inline]
pub(crate) fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

#[inline]
pub(crate) fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

#[inline]
pub(crate) fn need(buf: &[u8], len: usize, what: &'static str) -> Result<()> {
    if buf.len() < len {
        Err(Error::Truncated(what))
    } else {
        Ok(())
    }
}
