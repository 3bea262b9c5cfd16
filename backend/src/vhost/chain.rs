//! Descriptor chains to and from frames: gathering a TX chain, and writing
//! a received frame into one RX chain or, with MRG_RXBUF, several.

use std::ops::Deref;

use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{desc::split::Descriptor, DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap};
use vnic_protocol::virtio::{
    hdr::{HDR_LEN, HDR_LEN_HASH},
    VirtioNetHdr,
};

use crate::{
    nic::{Device, DropReason, MAX_FRAME},
    uplink::{tap::VNET_HDR_LEN, MAX_PIECES},
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
    pub fn write(&mut self, tap_frame: &[u8], dev: &Device) -> Result<(), DropReason> {
        if tap_frame.len() <= VNET_HDR_LEN {
            return Err(DropReason::RxMalformed);
        }
        let mut hdr = VirtioNetHdr::parse(&tap_frame[..VNET_HDR_LEN], false)
            .map_err(|_| DropReason::RxMalformed)?;
        let payload = &tap_frame[VNET_HDR_LEN..];
        if self.hash_report {
            let s = dev.steer(payload);
            hdr.hash_value = s.hash;
            hdr.hash_report = s.report as u16;
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
}
