//! Where frames go when they leave the device towards the host: a TAP
//! device, or nothing. Frames cross this boundary with a 12-byte
//! `virtio_net_hdr` in front, as TAP's IFF_VNET_HDR carries them.

pub mod bench;
#[cfg(any(test, feature = "test-util"))]
pub mod fake;
pub mod tap;

use std::{io, os::fd::RawFd};

use vm_memory::VolatileSlice;

/// Most pieces one frame may be written from or read into (a Linux driver
/// uses at most 19 descriptors for a frame; longer TX chains are copied).
pub const MAX_PIECES: usize = 64;

/// A piece of a frame for a vectored write: bytes of vnicd's own, or a
/// slice of guest memory, which is never turned into a Rust reference
/// (the guest may change it at any time).
#[derive(Debug, Clone, Copy)]
pub enum Piece<'a> {
    Local(&'a [u8]),
    Guest(VolatileSlice<'a>),
}

impl Piece<'_> {
    pub fn len(&self) -> usize {
        match self {
            Piece::Local(b) => b.len(),
            Piece::Guest(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The piece as an iovec for a vectored write. Without vm-memory's
    /// xen feature a guest slice's guard only carries its address: the
    /// mapping lives as long as the slice.
    pub fn iovec(&self) -> libc::iovec {
        match self {
            Piece::Local(b) => libc::iovec {
                iov_base: b.as_ptr().cast_mut().cast(),
                iov_len: b.len(),
            },
            Piece::Guest(s) => libc::iovec {
                iov_base: s.ptr_guard().as_ptr().cast_mut().cast(),
                iov_len: s.len(),
            },
        }
    }

    /// Copies the bytes to the start of `out`; how many were copied (all
    /// of them, unless `out` is shorter).
    pub fn copy_into(&self, out: &mut [u8]) -> usize {
        match self {
            Piece::Local(b) => {
                let n = b.len().min(out.len());
                out[..n].copy_from_slice(&b[..n]);
                n
            }
            Piece::Guest(v) => v.copy_to(out),
        }
    }

    /// Appends the bytes to `out`.
    pub fn copy_to(&self, out: &mut Vec<u8>) {
        match self {
            Piece::Local(b) => out.extend_from_slice(b),
            Piece::Guest(v) => {
                let at = out.len();
                out.resize(at + v.len(), 0);
                v.copy_to(&mut out[at..]);
            }
        }
    }
}

/// The error for a frame in more than [`MAX_PIECES`] pieces.
pub fn too_many_pieces() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "too many pieces")
}

/// Pieces in a list this short are most frames' (a header, a prefix and
/// a buffer or two).
const FEW_PIECES: usize = 6;

/// Calls `f` with `front` followed by `rest` as one list of pieces, built
/// on the stack in an array only as long as it needs to be: filling all
/// of [`MAX_PIECES`] costs more than a small frame's copy. None when there
/// are more than [`MAX_PIECES`].
pub fn joined<'a, R>(
    front: &[Piece<'a>],
    rest: &[Piece<'a>],
    f: impl FnOnce(&[Piece<'a>]) -> R,
) -> Option<R> {
    fn into<'a, R, const N: usize>(
        front: &[Piece<'a>],
        rest: &[Piece<'a>],
        f: impl FnOnce(&[Piece<'a>]) -> R,
    ) -> R {
        let mut all = [Piece::Local(&[]); N];
        let n = front.len() + rest.len();
        all[..front.len()].copy_from_slice(front);
        all[front.len()..n].copy_from_slice(rest);
        f(&all[..n])
    }
    match front.len() + rest.len() {
        n if n <= FEW_PIECES => Some(into::<R, FEW_PIECES>(front, rest, f)),
        n if n <= MAX_PIECES => Some(into::<R, MAX_PIECES>(front, rest, f)),
        _ => None,
    }
}

/// A piece of memory a vectored read fills.
#[derive(Debug)]
pub enum PieceMut<'a> {
    Local(&'a mut [u8]),
    Guest(VolatileSlice<'a>),
}

impl PieceMut<'_> {
    /// The piece as an iovec for a vectored read.
    pub fn iovec(&mut self) -> libc::iovec {
        match self {
            PieceMut::Local(b) => libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            },
            PieceMut::Guest(s) => libc::iovec {
                iov_base: s.ptr_guard_mut().as_ptr().cast(),
                iov_len: s.len(),
            },
        }
    }
}

/// What an uplink accepts in the headers it is given, and what it is
/// allowed to hand back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Offloads {
    /// Partial checksums (NEEDS_CSUM).
    pub csum: bool,
    pub tso4: bool,
    pub tso6: bool,
    pub tso_ecn: bool,
    pub uso: bool,
}

impl Offloads {
    pub const ALL: Offloads = Offloads {
        csum: true,
        tso4: true,
        tso6: true,
        tso_ecn: true,
        uso: true,
    };
}

/// One side of the device facing the host.
pub trait Uplink: Send + Sync {
    /// Number of queues (one per device queue pair).
    fn queues(&self) -> usize;
    /// What the uplink takes on transmit.
    fn tx_offloads(&self) -> Offloads;
    /// Tells the uplink which offloads the receiver (the guest) accepts, so
    /// that it only hands back frames the guest can take.
    fn set_rx_offloads(&self, offloads: Offloads) -> io::Result<()>;
    /// Writes one frame (header first) on queue `q` from `pieces`.
    fn send(&self, q: usize, pieces: &[Piece<'_>]) -> io::Result<usize>;
    /// [`Uplink::send`] of `front` followed by `rest`, for a caller whose
    /// frame is in two lists (its own header and prefix, the guest's
    /// buffers); an uplink that can take them as they are saves building
    /// one list per frame.
    fn send_parts(&self, q: usize, front: &[Piece<'_>], rest: &[Piece<'_>]) -> io::Result<usize> {
        joined(front, rest, |p| self.send(q, p)).unwrap_or_else(|| Err(too_many_pieces()))
    }
    /// Reads one frame (header first) from queue `q` into `pieces`;
    /// `WouldBlock` when there is none. A frame longer than the pieces is
    /// an error, not a truncation.
    fn recv(&self, q: usize, pieces: &mut [PieceMut<'_>]) -> io::Result<usize>;
    /// A file descriptor that becomes readable when queue `q` has frames.
    fn rx_fd(&self, q: usize) -> Option<RawFd>;
    /// Whether the link is up, when the uplink knows (a TAP: its device is
    /// up and running on the host); None when it cannot tell.
    fn link_up(&self) -> Option<bool> {
        None
    }
}

/// An uplink that is not there: every transmitted frame is dropped (and
/// counted by the caller), nothing is ever received.
#[derive(Debug, Clone, Copy)]
pub struct NoUplink {
    pub queues: usize,
}

impl Uplink for NoUplink {
    fn queues(&self) -> usize {
        self.queues
    }
    fn tx_offloads(&self) -> Offloads {
        Offloads::ALL
    }
    fn set_rx_offloads(&self, _offloads: Offloads) -> io::Result<()> {
        Ok(())
    }
    fn send(&self, _q: usize, _pieces: &[Piece<'_>]) -> io::Result<usize> {
        Err(io::Error::new(io::ErrorKind::NotConnected, "no uplink"))
    }
    fn recv(&self, _q: usize, _pieces: &mut [PieceMut<'_>]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }
    fn rx_fd(&self, _q: usize) -> Option<RawFd> {
        None
    }
}
