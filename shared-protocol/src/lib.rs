//! Everything the vnic device (`vnicd`) and its driver (`vnic-guest`) must
//! agree on, as pure functions over byte buffers.
//!
//! No I/O, no threads, no `unsafe`. Every function that takes bytes from the
//! other side of a virtqueue or from the wire returns a typed error on bad
//! input and never panics; the fuzz targets in `fuzz/` hold it to that.

#![forbid(unsafe_code)]

pub mod checksum;
pub mod frag;
pub mod offload;
pub mod rss;
pub mod tcp;
pub mod toe;
pub mod virtio;
pub mod wire;
