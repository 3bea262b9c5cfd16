//! Descriptor chains to and from frames: gathering a TX chain, and writing
//! a received frame into one RX chain or, with MRG_RXBUF, several.

use std::{io, ops::Deref};

use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{desc::split::Descriptor, DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap};
use vnic_protocol::{
    rss::Steering,
    virtio::{
        hdr::{HDR_LEN, HDR_LEN_HASH},
        VirtioNetHdr,
    },
};

use crate::{
    nic::{Device, DropReason, MAX_FRAME},
    uplink::{tap::VNET_HDR_LEN, PieceMut, MAX_PIECES},
};

/// Most RX buffers one frame may be spread over with MRG_RXBUF.
const MAX_RX_BUFFERS: usize = 64;

/// Bytes of each TX frame copied out of guest memory: enough for every
/// header the device inspects (Ethernet, two tags, IPv6 with extension
/// headers or IPv4 with options, TCP with options).
pub(super) const TX_PREFIX: usize = 256;

/// Gathers a TX chain without copying its payload: the driver's header
/// and the first [`TX_PREFIX`] frame bytes are copied into `head`, the
/// rest is left in guest memory as regions in `rest`. Chains with more
/// pieces than a vectored write takes are copied whole into `head`.
pub(super) fn gather_tx<M>(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<M>,
    hdr_len: usize,
    head: &mut Vec<u8>,
    rest: &mut Vec<(GuestAddress, usize)>,
) -> Result<(), DropReason>
where
    M: Deref,
    M::Target: GuestMemory,
{
    head.clear();
    rest.clear();
    let want = hdr_len + TX_PREFIX;
    let mut total = 0usize;
    let mut last: Option<Descriptor> = None;
    for desc in chain {
        if desc.is_write_only() {
            return Err(DropReason::BadChainLayout);
        }
        let len = desc.len() as usize;
        total += len;
        if total > HDR_LEN_HASH + MAX_FRAME {
            return Err(DropReason::Oversized);
        }
        let copy = if rest.is_empty() {
            len.min(want.saturating_sub(head.len()))
        } else {
            0
        };
        let room_for_pieces = rest.len() + 3 < MAX_PIECES;
        let copy = if room_for_pieces { copy } else { len };
        if copy > 0 {
            let at = head.len();
            head.resize(at + copy, 0);
            mem.read_slice(&mut head[at..], desc.addr())
                .map_err(|_| DropReason::BadDescriptor)?;
        }
        if copy < len {
            let addr = desc
                .addr()
                .checked_add(copy as u64)
                .ok_or(DropReason::BadDescriptor)?;
            // Check now that the region is guest memory.
            mem.get_slice(addr, len - copy)
                .map_err(|_| DropReason::BadDescriptor)?;
            rest.push((addr, len - copy));
        }
        last = Some(desc);
    }
    match last {
        Some(d) if d.has_next() => Err(DropReason::ChainTooLong),
        Some(_) => Ok(()),
        None => Err(DropReason::ZeroLength),
    }
}

/// Splits a control chain: its device-readable bytes into `readable`, its
/// device-writable buffers into `writable` (readable ones must come first).
pub(super) fn split_chain<M>(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<M>,
    readable: &mut Vec<u8>,
    writable: &mut Vec<(GuestAddress, usize)>,
) -> Result<(), DropReason>
where
    M: Deref,
    M::Target: GuestMemory,
{
    readable.clear();
    writable.clear();
    let mut last: Option<Descriptor> = None;
    for desc in chain {
        let len = desc.len() as usize;
        if desc.is_write_only() {
            writable.push((desc.addr(), len));
        } else {
            if !writable.is_empty() {
                return Err(DropReason::BadChainLayout);
            }
            let start = readable.len();
            if start + len > 64 * 1024 {
                return Err(DropReason::Oversized);
            }
            readable.resize(start + len, 0);
            mem.read_slice(&mut readable[start..], desc.addr())
                .map_err(|_| DropReason::BadDescriptor)?;
        }
        last = Some(desc);
    }
    match last {
        Some(d) if d.has_next() => Err(DropReason::ChainTooLong),
        Some(_) => Ok(()),
        None => Err(DropReason::ZeroLength),
    }
}

/// Writes `bytes` across `bufs` (guest address, length) in order; returns
/// how many were written.
pub(super) fn write_bufs(
    mem: &GuestMemoryMmap,
    bufs: &[(GuestAddress, usize)],
    bytes: &[u8],
) -> Result<usize, DropReason> {
    let mut done = 0;
    for &(addr, len) in bufs {
        if done == bytes.len() {
            break;
        }
        let n = len.min(bytes.len() - done);
        mem.write_slice(&bytes[done..done + n], addr)
            .map_err(|_| DropReason::BadDescriptor)?;
        done += n;
    }
    Ok(done)
}

/// Writes received frames into a queue's RX chains.
pub(super) struct RxWriter<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub vring: &'a VringRwLock,
    pub mergeable: bool,
    pub hash_report: bool,
}

/// What became of a frame read from the uplink straight into RX buffers.
#[derive(Debug)]
pub(super) enum Direct {
    /// In the guest's buffers, this many frame bytes.
    Delivered(usize),
    /// The uplink had nothing.
    Empty,
    /// Too few RX buffers posted for the largest frame the uplink may hand
    /// over; nothing was read.
    NoBuffers,
    /// RSS sends it to `queue`: copied into `out` (TAP header and frame),
    /// the buffers returned to the ring unused.
    Elsewhere(usize),
    /// Dropped for this reason.
    Dropped(DropReason),
}

/// Most RX descriptors one read may fill.
const MAX_RX_DESCS: usize = MAX_PIECES - 1;
/// Frame bytes read back from guest memory to steer and filter on.
const RX_PEEK: usize = 256;

/// Copies bytes `[off, off + out.len())` of the logical stream that
/// `descs` form out of guest memory.
fn read_span(
    mem: &GuestMemoryMmap,
    descs: &[(GuestAddress, usize)],
    mut off: usize,
    out: &mut [u8],
) -> Result<(), DropReason> {
    let mut done = 0;
    for &(addr, len) in descs {
        if done == out.len() {
            break;
        }
        if off >= len {
            off -= len;
            continue;
        }
        let n = (len - off).min(out.len() - done);
        let at = addr
            .checked_add(off as u64)
            .ok_or(DropReason::BadDescriptor)?;
        mem.read_slice(&mut out[done..done + n], at)
            .map_err(|_| DropReason::BadDescriptor)?;
        done += n;
        off = 0;
    }
    if done == out.len() {
        Ok(())
    } else {
        Err(DropReason::RxMalformed)
    }
}

/// Writes bytes `[off, off + n)` of `hdr ++ payload` at guest address `at`.
fn write_part(
    mem: &GuestMemoryMmap,
    hdr: &[u8],
    payload: &[u8],
    off: usize,
    n: usize,
    at: GuestAddress,
) -> Result<(), DropReason> {
    let mut done = 0;
    while done < n {
        let pos = off + done;
        let (src, rel) = if pos < hdr.len() {
            (hdr, pos)
        } else {
            (payload, pos - hdr.len())
        };
        let take = (src.len() - rel).min(n - done);
        let addr = at
            .checked_add(done as u64)
            .ok_or(DropReason::BadDescriptor)?;
        mem.write_slice(&src[rel..rel + take], addr)
            .map_err(|_| DropReason::BadDescriptor)?;
        done += take;
    }
    Ok(())
}

impl RxWriter<'_> {
    /// Writes one frame as the uplink delivered it (12-byte header, then
    /// the frame). `Err(RxNoBuffers)` leaves the queue as it was, so the
    /// frame can be retried once the driver posts buffers.
    pub fn write(&mut self, tap_frame: &[u8], steering: &Steering) -> Result<(), DropReason> {
        if tap_frame.len() <= VNET_HDR_LEN {
            return Err(DropReason::RxMalformed);
        }
        let mut hdr = VirtioNetHdr::parse(&tap_frame[..VNET_HDR_LEN], false)
            .map_err(|_| DropReason::RxMalformed)?;
        let payload = &tap_frame[VNET_HDR_LEN..];
        if self.hash_report {
            hdr.hash_value = steering.hash;
            hdr.hash_report = steering.report as u16;
        }
        hdr.num_buffers = 1;
        let hdr_len = if self.hash_report {
            HDR_LEN_HASH
        } else {
            HDR_LEN
        };
        let mut hb = [0u8; HDR_LEN_HASH];
        hdr.emit(&mut hb, self.hash_report)
            .map_err(|_| DropReason::RxMalformed)?;
        let hb = &hb[..hdr_len];
        let total = hdr_len + payload.len();

        let mut state = self.vring.get_mut();
        let q = state.get_queue_mut();
        let mut used = [(0u16, 0u32); MAX_RX_BUFFERS];
        let mut count = 0;
        let mut written = 0;
        let mut first_hdr: Option<GuestAddress> = None;
        let mut failure = None;
        while written < total {
            if count == MAX_RX_BUFFERS || (count == 1 && !self.mergeable) {
                failure = Some(DropReason::RxChainTooSmall);
                break;
            }
            let Some(chain) = q.pop_descriptor_chain(self.mem) else {
                for _ in 0..count {
                    q.go_to_previous_position();
                }
                return Err(DropReason::RxNoBuffers);
            };
            let head = chain.head_index();
            let mut in_chain = 0usize;
            let mut last_next = false;
            for desc in chain {
                last_next = desc.has_next();
                if !desc.is_write_only() {
                    failure = Some(DropReason::BadChainLayout);
                    break;
                }
                if written >= total {
                    continue;
                }
                let len = desc.len() as usize;
                if first_hdr.is_none() {
                    if len < hdr_len {
                        failure = Some(DropReason::RxChainTooSmall);
                        break;
                    }
                    first_hdr = Some(desc.addr());
                }
                let n = len.min(total - written);
                if let Err(e) = write_part(self.mem, hb, payload, written, n, desc.addr()) {
                    failure = Some(e);
                    break;
                }
                written += n;
                in_chain += n;
            }
            if failure.is_none() && last_next && written < total {
                failure = Some(DropReason::ChainTooLong);
            }
            used[count] = (head, in_chain as u32);
            count += 1;
            if failure.is_some() {
                break;
            }
        }
        if let Some(why) = failure {
            // Hand every buffer back empty: the driver reclaims them.
            for &(head, _) in &used[..count] {
                let _ = q.add_used(self.mem, head, 0);
            }
            return Err(why);
        }
        if self.mergeable && count > 1 {
            if let Some(at) = first_hdr {
                let nb = (count as u16).to_le_bytes();
                let at = at.checked_add(10).ok_or(DropReason::BadDescriptor)?;
                self.mem
                    .write_slice(&nb, at)
                    .map_err(|_| DropReason::BadDescriptor)?;
            }
        }
        for &(head, len) in &used[..count] {
            q.add_used(self.mem, head, len)
                .map_err(|_| DropReason::BadDescriptor)?;
        }
        Ok(())
    }

    /// Reads one frame from uplink queue `uq` straight into this queue's
    /// RX buffers, enough of them popped for `max_frame` bytes. A frame
    /// RSS sends to another queue, or that the filters drop, leaves the
    /// buffers unused.
    pub fn receive_direct(
        &mut self,
        dev: &Device,
        uq: usize,
        own: usize,
        active: usize,
        max_frame: usize,
        out: &mut Vec<u8>,
    ) -> io::Result<Direct> {
        let hdr_len = if self.hash_report {
            HDR_LEN_HASH
        } else {
            HDR_LEN
        };
        let need = hdr_len + max_frame;
        let mem = self.mem;
        let mut state = self.vring.get_mut();
        let q = state.get_queue_mut();
        let mut chains = [(0u16, 0usize); MAX_RX_BUFFERS];
        let mut descs = [(GuestAddress(0), 0usize); MAX_RX_DESCS];
        let (mut nchains, mut ndescs, mut cap) = (0usize, 0usize, 0usize);
        // Returns every popped chain to the ring unused.
        let unpop = |q: &mut virtio_queue::Queue, n: usize| {
            for _ in 0..n {
                q.go_to_previous_position();
            }
        };
        while cap < need && nchains < MAX_RX_BUFFERS && (nchains == 0 || self.mergeable) {
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let first = ndescs;
            let mut bad = None;
            let mut last_next = false;
            for desc in chain {
                last_next = desc.has_next();
                let len = desc.len() as usize;
                if !desc.is_write_only() {
                    bad = Some(DropReason::BadChainLayout);
                } else if ndescs == MAX_RX_DESCS {
                    bad = Some(DropReason::ChainTooLong);
                } else if ndescs == 0 && len < hdr_len {
                    bad = Some(DropReason::RxChainTooSmall);
                } else if len > 0 {
                    descs[ndescs] = (desc.addr(), len);
                    ndescs += 1;
                    cap += len;
                    continue;
                }
                break;
            }
            if bad.is_none() && last_next {
                bad = Some(DropReason::ChainTooLong);
            }
            if let Some(why) = bad {
                // Hand back everything popped, empty: the driver reposts.
                for &(h, _) in &chains[..nchains] {
                    q.add_used(mem, h, 0).map_err(io::Error::other)?;
                }
                q.add_used(mem, head, 0).map_err(io::Error::other)?;
                return Ok(Direct::Dropped(why));
            }
            chains[nchains] = (head, ndescs - first);
            nchains += 1;
        }
        if cap < need {
            unpop(q, nchains);
            return Ok(Direct::NoBuffers);
        }
        let mut vnet = [0u8; VNET_HDR_LEN];
        let n = {
            let mut pieces: [PieceMut<'_>; MAX_PIECES] =
                core::array::from_fn(|_| PieceMut::Local(&mut []));
            pieces[0] = PieceMut::Local(&mut vnet);
            for (k, &(addr, len)) in descs[..ndescs].iter().enumerate() {
                let (addr, len) = if k == 0 {
                    (addr.unchecked_add(hdr_len as u64), len - hdr_len)
                } else {
                    (addr, len)
                };
                match mem.get_slice(addr, len) {
                    Ok(v) => pieces[k + 1] = PieceMut::Guest(v),
                    Err(_) => {
                        for &(h, _) in &chains[..nchains] {
                            q.add_used(mem, h, 0).map_err(io::Error::other)?;
                        }
                        return Ok(Direct::Dropped(DropReason::BadDescriptor));
                    }
                }
            }
            dev.uplink().recv(uq, &mut pieces[..ndescs + 1])
        };
        let n = match n {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                unpop(q, nchains);
                return Ok(Direct::Empty);
            }
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                unpop(q, nchains);
                return Ok(Direct::Dropped(DropReason::RxChainTooSmall));
            }
            Err(e) => {
                unpop(q, nchains);
                return Err(e);
            }
        };
        if n <= VNET_HDR_LEN {
            unpop(q, nchains);
            return Ok(Direct::Dropped(DropReason::RxMalformed));
        }
        let frame_len = n - VNET_HDR_LEN;
        let descs = &descs[..ndescs];
        let mut peek = [0u8; RX_PEEK];
        let plen = frame_len.min(RX_PEEK);
        if let Err(why) = read_span(mem, descs, hdr_len, &mut peek[..plen]) {
            unpop(q, nchains);
            return Ok(Direct::Dropped(why));
        }
        let peek = &peek[..plen];
        if !dev.rx_accepts(peek) {
            unpop(q, nchains);
            return Ok(Direct::Dropped(DropReason::Filtered));
        }
        let steering = dev.steer_prefix(peek, frame_len);
        let mut target = usize::from(steering.queue);
        if target >= active {
            target %= active.max(1);
        }
        if target != own {
            out.clear();
            out.extend_from_slice(&vnet);
            out.resize(VNET_HDR_LEN + frame_len, 0);
            let r = read_span(mem, descs, hdr_len, &mut out[VNET_HDR_LEN..]);
            unpop(q, nchains);
            return Ok(match r {
                Ok(()) => Direct::Elsewhere(target),
                Err(why) => Direct::Dropped(why),
            });
        }
        // Ours: keep the buffers the frame filled, return the rest.
        let total = hdr_len + frame_len;
        let (mut k, mut seen, mut d) = (0, 0, 0);
        while seen < total && k < nchains {
            let (_, nd) = chains[k];
            seen += descs[d..d + nd].iter().map(|x| x.1).sum::<usize>();
            d += nd;
            k += 1;
        }
        unpop(q, nchains - k);
        let Ok(mut hdr) = VirtioNetHdr::parse(&vnet, false) else {
            unpop(q, k);
            return Ok(Direct::Dropped(DropReason::RxMalformed));
        };
        hdr.num_buffers = k as u16;
        if self.hash_report {
            hdr.hash_value = steering.hash;
            hdr.hash_report = steering.report as u16;
        }
        let mut hb = [0u8; HDR_LEN_HASH];
        let _ = hdr.emit(&mut hb, self.hash_report);
        if mem.write_slice(&hb[..hdr_len], descs[0].0).is_err() {
            unpop(q, k);
            return Ok(Direct::Dropped(DropReason::BadDescriptor));
        }
        let (mut left, mut d) = (total, 0);
        for &(h, nd) in &chains[..k] {
            let c: usize = descs[d..d + nd].iter().map(|x| x.1).sum();
            d += nd;
            let used = c.min(left);
            left -= used;
            q.add_used(mem, h, used as u32).map_err(io::Error::other)?;
        }
        Ok(Direct::Delivered(frame_len))
    }
}
