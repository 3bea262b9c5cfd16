//! Uplinks for measuring the device alone: `sink` takes every frame (and
//! copies what of it is still in guest memory, once), `source` always has
//! a frame ready. With them a benchmark sees vnicd's cost, not the kernel's.

use std::{
    cell::RefCell,
    io,
    os::fd::{AsRawFd, RawFd},
};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vnic_protocol::{
    virtio::{hdr::GsoType, HdrFlags, VirtioNetHdr},
    wire::{
        build::{data_segment, pseudo_header, tcp_frame, udp_frame, Flow, IpFields},
        ethernet::Address,
        ip_proto,
        tcp::Flags,
    },
};

use super::{tap::VNET_HDR_LEN, Offloads, Piece, PieceMut, Uplink};

/// Takes every frame. What of it is still in guest memory is copied
/// into a buffer of the sending thread's own (no lock is taken), as
/// DPDK's vhost copies a frame out of guest memory into an mbuf: every
/// byte of a frame leaves guest memory exactly once on either. Pieces
/// vnicd holds in its own memory already (a header it copied out to
/// check, a small frame whole) are where a NIC would read them from and
/// are only counted.
#[derive(Debug)]
pub struct Sink {
    queues: usize,
}

impl Sink {
    pub fn new(queues: usize) -> Sink {
        Sink {
            queues: queues.max(1),
        }
    }

    /// Copies the guest pieces of `front` then `rest` into the thread's
    /// buffer, each where it lies in the frame; the frame's length.
    fn take(pieces: [&[Piece<'_>]; 2]) -> io::Result<usize> {
        let mut len = 0;
        let mut guest = false;
        for part in pieces {
            for p in part {
                match p {
                    Piece::Local(b) => len += b.len(),
                    Piece::Guest(v) => {
                        len += v.len();
                        guest = true;
                    }
                }
            }
        }
        if len > SUNK_LEN {
            return Err(too_big());
        }
        // All vnicd's own: only counted.
        if !guest {
            return Ok(len);
        }
        SUNK.with_borrow_mut(|b| {
            if b.len() < SUNK_LEN {
                b.resize(SUNK_LEN, 0);
            }
            let mut at = 0;
            for p in pieces.iter().flat_map(|part| part.iter()) {
                if let Piece::Guest(_) = p {
                    let to = b.get_mut(at..at + p.len()).ok_or_else(too_big)?;
                    p.copy_into(to);
                }
                at += p.len();
            }
            Ok(len)
        })
    }

    /// The bytes the calling thread's last frame left in its buffer.
    #[cfg(test)]
    fn sunk(len: usize) -> Vec<u8> {
        SUNK.with_borrow(|b| b[..len.min(b.len())].to_vec())
    }
}

/// The most a sunk frame holds: the largest GSO frame and its header.
const SUNK_LEN: usize = 70_000;

thread_local! {
    /// Where [`Sink`] copies the frames a thread sends: kept at its full
    /// size (zeroed once, at the first frame), so a frame is copied in
    /// without clearing first.
    static SUNK: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

fn too_big() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        "frame longer than the sink takes",
    )
}

impl Uplink for Sink {
    fn queues(&self) -> usize {
        self.queues
    }
    fn tx_offloads(&self) -> Offloads {
        Offloads::ALL
    }
    fn set_rx_offloads(&self, _o: Offloads) -> io::Result<()> {
        Ok(())
    }
    fn send(&self, _q: usize, pieces: &[Piece<'_>]) -> io::Result<usize> {
        Sink::take([pieces, &[]])
    }
    fn send_parts(&self, _q: usize, front: &[Piece<'_>], rest: &[Piece<'_>]) -> io::Result<usize> {
        // A small frame is all vnicd's own, and is only counted.
        if let ([Piece::Local(b)], []) = (front, rest) {
            if b.len() <= SUNK_LEN {
                return Ok(b.len());
            }
        }
        Sink::take([front, rest])
    }
    fn recv(&self, _q: usize, _pieces: &mut [PieceMut<'_>]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }
    fn rx_fd(&self, _q: usize) -> Option<RawFd> {
        None
    }
}

/// Always has a frame: a UDP frame of the given size (Ethernet header
/// included), or above 1514 bytes a TCP GSO frame with MSS 1448.
#[derive(Debug)]
pub struct Source {
    /// TAP header then frame.
    frame: Vec<u8>,
    ready: Vec<EventFd>,
}

impl Source {
    pub fn new(queues: usize, size: usize, dst: Address) -> io::Result<Source> {
        let flow = Flow {
            dst_mac: dst,
            ..Flow::v4()
        };
        let ip = IpFields::default();
        let mut hdr = VirtioNetHdr::default();
        let frame = if size <= 1514 {
            let payload = vec![0x5au8; size.saturating_sub(42).max(18)];
            udp_frame(&flow, &ip, &payload)
        } else {
            let payload = vec![0x5au8; size.min(65_000) - 66];
            let f = tcp_frame(&flow, data_segment(1, 1, Flags::ACK), &ip, &payload);
            // As a TAP with TSO offloads delivers it: partial checksum.
            hdr.flags = HdrFlags::NEEDS_CSUM;
            hdr.gso_type = GsoType::TcpV4 as u8;
            hdr.gso_size = 1448;
            hdr.hdr_len = 66;
            hdr.csum_start = 34;
            hdr.csum_offset = 16;
            f.map(|mut f| {
                let ps = pseudo_header(flow.src_ip, flow.dst_ip, ip_proto::TCP, f.len() - 34);
                f[50..52].copy_from_slice(&ps.to_be_bytes());
                f
            })
        }
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mut out = vec![0u8; VNET_HDR_LEN];
        hdr.emit(&mut out, false)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        out.extend_from_slice(&frame);
        let ready = (0..queues.max(1))
            .map(|_| {
                let e = EventFd::new(EFD_NONBLOCK)?;
                e.write(1)?;
                Ok(e)
            })
            .collect::<io::Result<_>>()?;
        Ok(Source { frame: out, ready })
    }
}

impl Uplink for Source {
    fn queues(&self) -> usize {
        self.ready.len()
    }
    fn tx_offloads(&self) -> Offloads {
        Offloads::ALL
    }
    fn set_rx_offloads(&self, _o: Offloads) -> io::Result<()> {
        Ok(())
    }
    fn send(&self, _q: usize, pieces: &[Piece<'_>]) -> io::Result<usize> {
        Ok(pieces.iter().map(Piece::len).sum())
    }
    fn recv(&self, _q: usize, pieces: &mut [PieceMut<'_>]) -> io::Result<usize> {
        let mut done = 0;
        let mut skip = 0;
        // The usual first piece, the header alone, copied as the 12 bytes
        // it is: two plain stores, which the reader's loads right after
        // can take their bytes from (a general copy's overlapping stores
        // made those loads wait).
        if let (Some(PieceMut::Local(h)), Some(src)) =
            (pieces.first_mut(), self.frame.first_chunk::<VNET_HDR_LEN>())
        {
            if let Ok(h) = <&mut [u8; VNET_HDR_LEN]>::try_from(&mut **h) {
                *h = *src;
                done = VNET_HDR_LEN;
                skip = 1;
            }
        }
        for p in pieces.iter_mut().skip(skip) {
            if done == self.frame.len() {
                break;
            }
            let src = &self.frame[done..];
            let n = match p {
                PieceMut::Local(b) => {
                    let n = b.len().min(src.len());
                    b[..n].copy_from_slice(&src[..n]);
                    n
                }
                PieceMut::Guest(v) => {
                    let n = v.len().min(src.len());
                    v.copy_from(&src[..n]);
                    n
                }
            };
            done += n;
        }
        if done < self.frame.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "frame did not fit",
            ));
        }
        Ok(done)
    }
    fn rx_fd(&self, q: usize) -> Option<RawFd> {
        self.ready.get(q).map(AsRawFd::as_raw_fd)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    use super::*;

    /// The sink counts every byte of a frame and copies those still in
    /// guest memory, each to its place in the frame; a frame over its
    /// buffer is refused.
    #[test]
    fn the_sink_copies_what_is_in_guest_memory_once() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let guest: Vec<u8> = (0..100u8).collect();
        mem.write_slice(&guest, GuestAddress(0x100)).unwrap();
        let slice = mem.get_slice(GuestAddress(0x100), 100).unwrap();
        let head = [0xeeu8; 12];
        let front = [Piece::Local(&head)];
        let rest = [Piece::Guest(slice)];
        assert_eq!(Sink::take([&front, &rest]).unwrap(), 112);
        assert_eq!(Sink::sunk(112)[12..], guest[..]);
        let small = [0x11u8; 64];
        assert_eq!(Sink::take([&[Piece::Local(&small)], &[]]).unwrap(), 64);
        let big = vec![0u8; SUNK_LEN + 1];
        let e = Sink::take([&[Piece::Local(&big)], &[]]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    /// The source hands over the same header and frame however the
    /// pieces are cut (the header alone first, or not), and refuses
    /// pieces too short for it.
    #[test]
    fn the_source_fills_any_cut_of_pieces_alike() {
        let src = Source::new(1, 64, Address([2, 0, 0, 0, 0, 1])).unwrap();
        let whole = src.frame.clone();
        assert_eq!(whole.len(), VNET_HDR_LEN + 64);
        for cut in [VNET_HDR_LEN, 5, 0, 20, whole.len()] {
            let (mut a, mut b) = (vec![0u8; cut], vec![0u8; 200]);
            let mut pieces = [PieceMut::Local(&mut a), PieceMut::Local(&mut b)];
            let n = src.recv(0, &mut pieces).unwrap();
            assert_eq!(n, whole.len(), "cut {cut}");
            let got: Vec<u8> = a.iter().chain(&b[..n - cut]).copied().collect();
            assert_eq!(got, whole, "cut {cut}");
        }
        let (mut a, mut b) = (vec![0u8; VNET_HDR_LEN], vec![0u8; 10]);
        let mut pieces = [PieceMut::Local(&mut a), PieceMut::Local(&mut b)];
        let e = src.recv(0, &mut pieces).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}
