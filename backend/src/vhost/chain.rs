//! Descriptor chains to and from frames: gathering a TX chain, and writing
//! a received frame into one RX chain or, with MRG_RXBUF, several.

use std::{
    io,
    ops::Deref,
    sync::{
        atomic::{AtomicU32, Ordering},
        RwLockWriteGuard,
    },
};

use vhost_user_backend::{VringRwLock, VringState, VringT};
use virtio_queue::{desc::split::Descriptor, DescriptorChain, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap, VolatileMemory,
};
use vnic_protocol::{
    rss::Steering,
    virtio::{
        hdr::{HDR_LEN, HDR_LEN_HASH},
        HdrFlags, VirtioNetHdr,
    },
};

use super::{
    packed::{Avail, PackedRing, Position},
    split::{alone, Chain, Heads, Kept, Regions, Rings, BATCH},
};
use crate::{
    nic::{
        switch::{View, NO_HASH},
        DropReason, Nic, QueueStats, UplinkRoute, ETH_AND_TAG, MAX_FRAME,
    },
    uplink::{tap::VNET_HDR_LEN, PieceMut, MAX_PIECES},
};

/// The next available chain of `q` whose head is a descriptor of the
/// queue. The available ring may name any 16-bit value; a head past the
/// queue's end has no descriptor and cannot be handed back through the
/// used ring, so it is counted (`bad_ring`) and passed over.
pub(super) fn pop_valid<M>(
    q: &mut virtio_queue::Queue,
    mem: M,
    stats: &QueueStats,
) -> Option<DescriptorChain<M>>
where
    M: Clone + Deref,
    M::Target: GuestMemory,
{
    loop {
        let chain = q.pop_descriptor_chain(mem.clone())?;
        if chain.head_index() < q.size() {
            return Some(chain);
        }
        stats.drop(DropReason::BadRing);
    }
}

/// Puts a frame's buffers `used` (head, bytes written) into `q`'s used
/// ring and publishes them with one store of the used index, so that a
/// driver polling the ring never sees a frame's first buffers without the
/// rest (virtio-queue's `add_used` publishes each element as it writes
/// it: a Linux driver that reads `num_buffers` buffers and finds fewer
/// counts a length error and drops the frame).
///
/// Through resolved `rings` the entries are written but the index is not
/// stored: the writer publishes a batch of frames at once
/// ([`RxWriter::publish`]), so that the driver, which polls the used ring
/// from another core, does not pull its cache line over for every frame.
pub(super) fn add_used_frame(
    q: &mut virtio_queue::Queue,
    mem: &GuestMemoryMmap,
    rings: Option<&Rings<'_>>,
    used: &[(u16, u32)],
) -> Result<(), DropReason> {
    let size = q.size();
    if size == 0 {
        return Err(DropReason::BadRing);
    }
    let start = q.next_used();
    let mut next = std::num::Wrapping(start);
    for &(head, len) in used {
        if head >= size {
            return Err(DropReason::BadRing);
        }
        if let Some(r) = rings {
            r.put_used(next.0, head, len).ok_or(DropReason::BadRing)?;
        } else {
            let at = q
                .used_ring()
                .checked_add(4 + 8 * u64::from(next.0 % size))
                .ok_or(DropReason::BadRing)?;
            let mut elem = [0u8; 8];
            elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
            elem[4..].copy_from_slice(&len.to_le_bytes());
            mem.write_slice(&elem, GuestAddress(at))
                .map_err(|_| DropReason::BadRing)?;
        }
        next += 1;
    }
    if rings.is_none() {
        let idx = q.used_ring().checked_add(2).ok_or(DropReason::BadRing)?;
        mem.store(next.0.to_le(), GuestAddress(idx), Ordering::Release)
            .map_err(|_| DropReason::BadRing)?;
    }
    q.set_next_used(next.0);
    Ok(())
}

/// Most RX buffers one frame may be spread over with MRG_RXBUF.
const MAX_RX_BUFFERS: usize = 64;

/// Bytes of each TX frame copied out of guest memory: enough for every
/// header the device inspects (Ethernet, two tags, IPv6 with extension
/// headers or IPv4 with options, TCP with options).
pub(super) const TX_PREFIX: usize = 256;

/// Gathers a TX chain without copying its payload: the driver's header
/// and the first [`TX_PREFIX`] frame bytes are copied into `head`, the
/// rest is left in guest memory as regions in `rest`. Once a chain has
/// more pieces than a vectored write takes, the descriptors past that
/// point are copied, in order, into `tail`, which follows `rest`.
///
/// Returns how many bytes of `head` the chain filled. `head` is kept at
/// its full size from one chain to the next (zeroed once), so a chain's
/// bytes are copied into it without clearing it first.
pub(super) fn gather_tx(
    mem: &mut Regions<'_>,
    chain: impl IntoIterator<Item = Descriptor>,
    hdr_len: usize,
    head: &mut Vec<u8>,
    rest: &mut Vec<(GuestAddress, usize)>,
    tail: &mut Vec<u8>,
) -> Result<usize, DropReason> {
    let want = gather_start(hdr_len, head, rest, tail);
    let mut filled = 0;
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
        // Room for the device's header, the copied prefix and the tail.
        if !tail.is_empty() || rest.len() + 3 >= MAX_PIECES {
            let at = tail.len();
            tail.resize(at + len, 0);
            mem.read(&mut tail[at..], desc.addr())
                .ok_or(DropReason::BadDescriptor)?;
            last = Some(desc);
            continue;
        }
        let copy = if rest.is_empty() {
            len.min(want - filled)
        } else {
            0
        };
        if copy > 0 {
            let to = head
                .get_mut(filled..filled + copy)
                .ok_or(DropReason::BadDescriptor)?;
            mem.read(to, desc.addr()).ok_or(DropReason::BadDescriptor)?;
            filled += copy;
        }
        if copy < len {
            leave_rest(mem, &desc, copy, rest)?;
        }
        last = Some(desc);
    }
    match last {
        Some(d) if d.has_next() => Err(DropReason::ChainTooLong),
        Some(_) => Ok(filled),
        // Not even the head came out: an indirect table that is not in
        // guest memory or not a whole number of descriptors.
        None => Err(DropReason::BadDescriptor),
    }
}

/// Empties `rest` and `tail` for a chain and sizes `head` for its
/// header and prefix; how many bytes of it the chain may fill.
#[inline(always)]
fn gather_start(
    hdr_len: usize,
    head: &mut Vec<u8>,
    rest: &mut Vec<(GuestAddress, usize)>,
    tail: &mut Vec<u8>,
) -> usize {
    rest.clear();
    tail.clear();
    let want = hdr_len + TX_PREFIX;
    if head.len() < want {
        head.resize(want, 0);
    }
    want
}

/// Leaves what of descriptor `d` lies past its first `copy` bytes in
/// guest memory, as a piece of `rest`, once it is checked to be guest
/// memory.
#[inline(always)]
fn leave_rest(
    mem: &mut Regions<'_>,
    d: &Descriptor,
    copy: usize,
    rest: &mut Vec<(GuestAddress, usize)>,
) -> Result<(), DropReason> {
    let len = d.len() as usize;
    let addr = d
        .addr()
        .checked_add(copy as u64)
        .ok_or(DropReason::BadDescriptor)?;
    mem.slice(addr, len - copy)
        .ok_or(DropReason::BadDescriptor)?;
    rest.push((addr, len - copy));
    Ok(())
}

/// [`gather_tx`] for a chain of one descriptor `d` (most small frames),
/// without the walk's bookkeeping: the same checks, the same result.
#[inline(always)]
pub(super) fn gather_one(
    mem: &mut Regions<'_>,
    d: Descriptor,
    hdr_len: usize,
    head: &mut Vec<u8>,
    rest: &mut Vec<(GuestAddress, usize)>,
    tail: &mut Vec<u8>,
) -> Result<usize, DropReason> {
    let want = gather_start(hdr_len, head, rest, tail);
    if d.is_write_only() {
        return Err(DropReason::BadChainLayout);
    }
    let len = d.len() as usize;
    if len > HDR_LEN_HASH + MAX_FRAME {
        return Err(DropReason::Oversized);
    }
    let copy = len.min(want);
    if copy > 0 {
        let to = head.get_mut(..copy).ok_or(DropReason::BadDescriptor)?;
        mem.read(to, d.addr()).ok_or(DropReason::BadDescriptor)?;
    }
    if copy < len {
        leave_rest(mem, &d, copy, rest)?;
    }
    if d.has_next() {
        return Err(DropReason::ChainTooLong);
    }
    Ok(copy)
}

/// Device-readable bytes a control command may have (the largest, an RSS
/// configuration with a 128-entry table and a 255-byte key, is under 600).
pub(super) const CTRL_MAX_READABLE: usize = 64 * 1024;
/// Device-writable bytes a control chain may offer. The device writes the
/// ack and at most an 8-byte answer; a driver that offers more than this
/// is broken or hostile.
pub(super) const CTRL_MAX_WRITABLE: usize = 64 * 1024;

/// Splits a control chain: its device-readable bytes into `readable`, its
/// device-writable buffers into `writable` (readable ones must come first).
/// Every writable buffer must lie in guest memory, and all of them
/// together within [`CTRL_MAX_WRITABLE`].
pub(super) fn split_chain(
    mem: &GuestMemoryMmap,
    chain: impl Iterator<Item = Descriptor>,
    readable: &mut Vec<u8>,
    writable: &mut Vec<(GuestAddress, usize)>,
) -> Result<(), DropReason> {
    readable.clear();
    writable.clear();
    let mut room = 0usize;
    let mut last: Option<Descriptor> = None;
    for desc in chain {
        let len = desc.len() as usize;
        if desc.is_write_only() {
            room = room
                .checked_add(len)
                .filter(|&r| r <= CTRL_MAX_WRITABLE)
                .ok_or(DropReason::BadControl)?;
            if !GuestMemoryBackend::check_range(mem, desc.addr(), len) {
                return Err(DropReason::BadDescriptor);
            }
            writable.push((desc.addr(), len));
        } else {
            if !writable.is_empty() {
                return Err(DropReason::BadChainLayout);
            }
            let start = readable.len();
            let end = start
                .checked_add(len)
                .filter(|&e| e <= CTRL_MAX_READABLE)
                .ok_or(DropReason::Oversized)?;
            readable.resize(end, 0);
            mem.read_slice(&mut readable[start..], desc.addr())
                .map_err(|_| DropReason::BadDescriptor)?;
        }
        last = Some(desc);
    }
    match last {
        Some(d) if d.has_next() => Err(DropReason::ChainTooLong),
        Some(_) => Ok(()),
        // Not even the head came out: an indirect table that is not in
        // guest memory or not a whole number of descriptors.
        None => Err(DropReason::BadDescriptor),
    }
}

/// Writes received frames into a queue's RX chains.
pub(super) struct RxWriter<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub vring: &'a VringRwLock,
    pub stats: &'a QueueStats,
    pub mergeable: bool,
    pub hash_report: bool,
    /// The driver accepted RSC_EXT.
    pub rsc_ext: bool,
    /// Frames put in the used ring (delivered, or their buffers handed
    /// back empty), for notification coalescing.
    pub used: u32,
    /// The chains popped for the frame at hand; kept between frames so
    /// that its tables are not cleared for each (only its counts are).
    /// Made at the first direct read: a writer for one delivery (another
    /// port's worker) never needs it.
    bufs: Option<Box<RxBufs>>,
    /// The vring's lock, taken by the first frame and held for the ones
    /// after it until [`RxWriter::release`] (or the writer's end): a lock
    /// is a full barrier, and one a frame waited for every store before
    /// it into the driver's memory.
    held: Option<RwLockWriteGuard<'a, VringState>>,
    /// The queue's rings in host memory, resolved when the lock was taken
    /// (None: virtio-queue's path, for rings it cannot resolve).
    rings: Option<Rings<'a>>,
    /// The driver's available index as last read (chains up to it are
    /// popped without reading it again), and how far ahead buffers were
    /// prefetched.
    cursor: Cursor,
    regions: Regions<'a>,
    /// Buffers in the used ring whose index store is still to come.
    unpublished: u16,
    /// [`Nic::blind_route`] for the view of this generation, asked once
    /// per view rather than per frame.
    blind: Option<(u64, Option<Steering>)>,
    /// The driver negotiated the packed ring: frames go through
    /// [`RxWriter::write`] into `packed`, resolved while the lock is held.
    is_packed: bool,
    packed: Option<PackedRing<'a>>,
    /// Where a packed ring last had no buffer for a frame (index, wrap
    /// counter): once the driver makes that descriptor available it has
    /// posted more.
    edge: Option<(u16, bool)>,
    /// Where a packed ring's used entries are counted for the queue's
    /// notification decision.
    moved_sink: Option<&'a AtomicU32>,
    /// Frames and bytes delivered in the current call of
    /// [`RxWriter::receive_direct`] before the one it returns.
    burst: (usize, u64),
}

impl<'a> RxWriter<'a> {
    /// A writer for RX queue `vring` of a driver that accepted `acked`.
    pub fn new(
        mem: &'a GuestMemoryMmap,
        vring: &'a VringRwLock,
        stats: &'a QueueStats,
        acked: vnic_protocol::virtio::Features,
    ) -> RxWriter<'a> {
        use vnic_protocol::virtio::Features;
        RxWriter {
            mem,
            vring,
            stats,
            mergeable: acked.contains(Features::MRG_RXBUF),
            hash_report: acked.contains(Features::HASH_REPORT),
            rsc_ext: acked.contains(Features::RSC_EXT),
            is_packed: acked.contains(Features::RING_PACKED),
            packed: None,
            edge: None,
            moved_sink: None,
            used: 0,
            held: None,
            rings: None,
            cursor: Cursor::default(),
            unpublished: 0,
            blind: None,
            burst: (0, 0),
            regions: Regions::new(mem),
            bufs: None,
        }
    }
}

impl<'a> RxWriter<'a> {
    /// Counts the ring entries a packed ring's frames use in `sink` (the
    /// queue's count for its next notification decision).
    pub fn counting(mut self, sink: Option<&'a AtomicU32>) -> RxWriter<'a> {
        self.moved_sink = sink;
        self
    }
}

impl Drop for RxWriter<'_> {
    fn drop(&mut self) {
        self.release();
    }
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
    /// For other ports (too): copied into `out` for the switch, the
    /// buffers returned to the ring unused.
    Switched,
    /// Dropped for this reason.
    Dropped(DropReason),
    /// The uplink failed (counted as `uplink_error`); nothing was read.
    Failed,
}

// The uplink's header is the driver's without the hash.
const _: () = assert!(VNET_HDR_LEN == HDR_LEN);

/// [`Nic::blind_route`] in `view`, kept in `cache` while the view is the
/// same.
fn blind_route(
    cache: &mut Option<(u64, Option<Steering>)>,
    nic: &Nic,
    view: &View,
) -> Option<Steering> {
    match *cache {
        Some((gen, s)) if gen == view.gen => s,
        _ => {
            let s = nic.blind_route(view);
            *cache = Some((view.gen, s));
            s
        }
    }
}

/// Pieces of a read into one or two RX buffers (header, buffers, spill).
const SHORT_PIECES: usize = 4;

/// Reads one frame from uplink queue `uq`: its TAP header into `vnet`,
/// the frame into the RX buffers `descs` (the first `hdr_len` bytes of
/// the first left for the device's header), and what does not fit into
/// `overflow`. None when a buffer is not in guest memory (nothing read).
/// A frame in one or two buffers (the common case) needs a short list of
/// pieces; only a long chain pays for the long one.
fn recv_into(
    nic: &Nic,
    uq: usize,
    vnet: &mut [u8],
    descs: &[(GuestAddress, usize)],
    hdr_len: usize,
    mem: &mut Regions<'_>,
    overflow: &mut [u8],
) -> Option<io::Result<usize>> {
    if descs.len() + 2 <= SHORT_PIECES {
        recv_pieces::<SHORT_PIECES>(nic, uq, vnet, descs, hdr_len, mem, overflow)
    } else {
        recv_pieces::<MAX_PIECES>(nic, uq, vnet, descs, hdr_len, mem, overflow)
    }
}

/// [`recv_into`] with a list of `N` pieces.
fn recv_pieces<const N: usize>(
    nic: &Nic,
    uq: usize,
    vnet: &mut [u8],
    descs: &[(GuestAddress, usize)],
    hdr_len: usize,
    mem: &mut Regions<'_>,
    overflow: &mut [u8],
) -> Option<io::Result<usize>> {
    let mut pieces: [PieceMut<'_>; N] = core::array::from_fn(|_| PieceMut::Local(&mut []));
    pieces[0] = PieceMut::Local(vnet);
    for (k, &(addr, len)) in descs.iter().enumerate().take(N.saturating_sub(2)) {
        let skip = if k == 0 { hdr_len } else { 0 };
        let slice = addr
            .checked_add(skip as u64)
            .and_then(|a| mem.slice(a, len.checked_sub(skip)?))?;
        pieces[k + 1] = PieceMut::Guest(slice);
    }
    let mut np = descs.len().min(N.saturating_sub(2)) + 1;
    if np < N {
        pieces[np] = PieceMut::Local(overflow);
        np += 1;
    }
    Some(nic.uplink().recv(uq, &mut pieces[..np]))
}

/// Writes a device header at `at`: its first eight bytes `front`, the
/// next four `mid` (the rest of the uplink's header and `num_buffers`),
/// and with a hash report the eight after them (`hash`: the value, the
/// report type, the padding), all little-endian. Each part is one store
/// from a register: a header put together in memory and copied out is
/// read back before the stores of its parts have landed, and waits for
/// them.
#[inline(always)]
fn write_rx_header(
    regions: &mut Regions<'_>,
    at: GuestAddress,
    front: u64,
    mid: u32,
    hash: Option<u64>,
) -> Option<()> {
    let len = if hash.is_some() {
        HDR_LEN_HASH
    } else {
        HDR_LEN
    };
    if let Some(s) = regions.slice(at, len) {
        s.get_ref::<u64>(0).ok()?.store(front.to_le());
        s.get_ref::<u32>(8).ok()?.store(mid.to_le());
        if let Some(t) = hash {
            s.get_ref::<u64>(12).ok()?.store(t.to_le());
        }
        return Some(());
    }
    // Across regions: as bytes.
    let mut hb = [0u8; HDR_LEN_HASH];
    hb[..8].copy_from_slice(&front.to_le_bytes());
    hb[8..12].copy_from_slice(&mid.to_le_bytes());
    hb[12..].copy_from_slice(&hash.unwrap_or(0).to_le_bytes());
    regions.mem.write_slice(&hb[..len], at).ok()
}

/// Most RX descriptors one read may fill.
const MAX_RX_DESCS: usize = MAX_PIECES - 2;
/// Frame bytes read back from guest memory to steer and filter on.
const RX_PEEK: usize = 256;

/// Writes bytes `[off, off + n)` of `hdr ++ payload` at guest address `at`.
fn write_part(
    mem: &mut Regions<'_>,
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
        mem.write(&src[rel..rel + take], addr)
            .ok_or(DropReason::BadDescriptor)?;
        done += take;
    }
    Ok(())
}

/// Where bytes `[off, off + len)` of the logical stream that `descs`
/// (guest address, length) form lie: each piece's guest address and its
/// range within those `len` bytes, in order. Falls short when the
/// descriptors end first.
fn spans(
    descs: &[(GuestAddress, usize)],
    mut off: usize,
    len: usize,
) -> impl Iterator<Item = Result<(GuestAddress, std::ops::Range<usize>), DropReason>> + '_ {
    let mut done = 0;
    descs.iter().filter_map(move |&(addr, dlen)| {
        if done == len {
            return None;
        }
        if off >= dlen {
            off -= dlen;
            return None;
        }
        let n = (dlen - off).min(len - done);
        let at = addr
            .checked_add(off as u64)
            .ok_or(DropReason::BadDescriptor);
        let range = done..done + n;
        done += n;
        off = 0;
        Some(at.map(|a| (a, range)))
    })
}

/// Copies bytes `[off, off + out.len())` of the stream `descs` form out
/// of guest memory.
fn read_span(
    mem: &mut Regions<'_>,
    descs: &[(GuestAddress, usize)],
    off: usize,
    out: &mut [u8],
) -> Result<(), DropReason> {
    let mut got = 0;
    for s in spans(descs, off, out.len()) {
        let (at, r) = s?;
        got = r.end;
        mem.read(&mut out[r], at).ok_or(DropReason::BadDescriptor)?;
    }
    if got == out.len() {
        Ok(())
    } else {
        Err(DropReason::RxMalformed)
    }
}

/// Writes `bytes` at offset `off` of the stream `descs` form in guest
/// memory.
pub(super) fn write_span(
    mem: &mut Regions<'_>,
    descs: &[(GuestAddress, usize)],
    off: usize,
    bytes: &[u8],
) -> Result<(), DropReason> {
    let mut put = 0;
    for s in spans(descs, off, bytes.len()) {
        let (at, r) = s?;
        put = r.end;
        mem.write(&bytes[r], at).ok_or(DropReason::BadDescriptor)?;
    }
    if put == bytes.len() {
        Ok(())
    } else {
        Err(DropReason::RxChainTooSmall)
    }
}

/// Buffers written into an RX ring before their used index is stored (a
/// driver's burst of small frames); the rest at the end of the round.
const PUBLISH_EVERY: u16 = 32;

/// A chain walked by [`Chain`] over resolved rings, or by virtio-queue.
enum Walk<'r, 'm, M: Deref<Target = GuestMemoryMmap>> {
    Fast(Chain<'r, 'm>),
    Queue(DescriptorChain<M>),
}

/// Where the device stands in an RX ring beyond `Queue::next_avail`: the
/// driver's index as last read, and how far the buffers after the
/// device's position have been prefetched.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Cursor {
    seen: u16,
    ahead: u16,
    /// The heads of the batch at hand.
    heads: Heads,
    /// The head descriptors of the chains prefetched.
    kept: Kept,
}

impl Cursor {
    fn at(pos: u16) -> Cursor {
        Cursor {
            seen: pos,
            ahead: pos,
            ..Cursor::default()
        }
    }

    /// The head at available position `pos` (known available): the one
    /// its prefetch read, else out of the batch's heads.
    #[inline(always)]
    fn head(&mut self, rings: &Rings<'_>, pos: u16) -> Option<u16> {
        if let Some(h) = self.kept.head(pos).or_else(|| self.heads.get(pos)) {
            return Some(h);
        }
        let n = self.seen.wrapping_sub(pos).min(BATCH);
        self.heads.fill(rings, pos, n);
        self.heads.get(pos)
    }
}

/// The next available head of `q` below the queue's size, read through
/// `rings`; the driver's index is read again only once the chains up to
/// the cursor's last reading are taken. The buffers of the chains ahead
/// are prefetched [`BATCH`] at a time, a batch before they are
/// reached. A head past the queue's end is counted (`bad_ring`) and
/// passed over, as [`pop_valid`] does; an index more than a queue ahead
/// takes nothing. Inlined: called per RX buffer, its call (the walk's
/// state saved and reloaded around it) was the receive path's hottest
/// spot.
#[inline(always)]
fn pop_head<'m>(
    q: &mut virtio_queue::Queue,
    rings: &Rings<'m>,
    cur: &mut Cursor,
    regions: &mut Regions<'m>,
    stats: &QueueStats,
) -> Option<u16> {
    let size = rings.size();
    loop {
        let pos = q.next_avail();
        // Chains known available: none, or a reading from before a pop
        // that went past it (virtio-queue's path).
        let known = cur.seen.wrapping_sub(pos);
        if known == 0 || known > size {
            let idx = rings.avail_idx()?;
            let n = idx.wrapping_sub(pos);
            if n == 0 || n > size {
                return None;
            }
            cur.seen = idx;
        }
        // Prefetched up to `ahead`: behind the position (or stale), start
        // from it; under half a batch ahead, issue the next batch.
        let ahead = cur.ahead.wrapping_sub(pos);
        if ahead > size {
            cur.ahead = pos;
        }
        if cur.ahead.wrapping_sub(pos) < BATCH / 2 {
            let n = cur.seen.wrapping_sub(cur.ahead).min(BATCH);
            if n > 0 && n <= size {
                rings.prefetch(cur.ahead, n, regions, true, &mut cur.kept);
                // Their used entries go where the used index is that far
                // ahead (one entry per chain, taken in order).
                let used = q.next_used().wrapping_add(cur.ahead.wrapping_sub(pos));
                rings.prefetch_used(used, n);
                cur.ahead = cur.ahead.wrapping_add(n);
                // And the descriptors of the batch after it, for its turn.
                let m = cur.seen.wrapping_sub(cur.ahead).min(BATCH);
                if m <= size {
                    rings.prefetch_descs(cur.ahead, m);
                }
            }
        }
        let head = cur.head(rings, pos)?;
        q.set_next_avail(pos.wrapping_add(1));
        if head < size {
            return Some(head);
        }
        stats.drop(DropReason::BadRing);
    }
}

/// The next RX chain of `q`: its head and a walk over its descriptors,
/// through `rings` when they are resolved (see [`pop_head`]), else
/// through virtio-queue. Inlined, so that the walk is built where it is
/// used rather than returned through the stack (per RX buffer).
#[inline(always)]
fn pop_walk<'r, 'm>(
    q: &mut virtio_queue::Queue,
    rings: Option<&'r Rings<'m>>,
    cur: &mut Cursor,
    regions: &mut Regions<'m>,
    mem: &'m GuestMemoryMmap,
    stats: &QueueStats,
) -> Option<(u16, Walk<'r, 'm, &'m GuestMemoryMmap>)> {
    match rings {
        Some(r) => {
            let head = pop_head(q, r, cur, regions, stats)?;
            Some((head, Walk::Fast(r.chain(head, mem))))
        }
        // A queue that is not ready (stopped meanwhile) has nothing.
        None if !q.ready() => None,
        None => {
            let chain = pop_valid(q, mem, stats)?;
            Some((chain.head_index(), Walk::Queue(chain)))
        }
    }
}

impl<M: Deref<Target = GuestMemoryMmap>> Walk<'_, '_, M> {
    fn descs(&mut self) -> &mut dyn Iterator<Item = Descriptor> {
        match self {
            Walk::Fast(c) => c,
            Walk::Queue(c) => c,
        }
    }
}

/// RX chains popped for one frame: heads with their descriptor counts,
/// and the writable descriptors in order.
struct RxBufs {
    chains: [(u16, usize); MAX_RX_BUFFERS],
    /// The available-ring position each chain was popped from, so that
    /// chains can be put back even past heads `pop_valid` skipped (for a
    /// packed ring, the position's vring base).
    pos: [u16; MAX_RX_BUFFERS],
    /// A packed ring's chains: the ring entries each took.
    counts: [u16; MAX_RX_BUFFERS],
    /// Where a packed ring had no more lists to pop (index, wrap
    /// counter), if it ran dry for the frame at hand.
    dry: Option<(u16, bool)>,
    descs: [(GuestAddress, usize); MAX_RX_DESCS],
    /// The used entries of the frame at hand (head, bytes written).
    used: [(u16, u32); MAX_RX_BUFFERS],
    /// The frame's first bytes, read back to route it (kept, so that it
    /// is not zeroed per frame).
    peek: [u8; RX_PEEK],
    nchains: usize,
    ndescs: usize,
    cap: usize,
}

impl RxBufs {
    /// Made once per writer that reads the uplink directly: kept out of
    /// line, so that the per-frame check for it stays small.
    #[cold]
    #[inline(never)]
    fn boxed() -> Box<RxBufs> {
        Box::new(RxBufs::new())
    }

    fn new() -> RxBufs {
        RxBufs {
            chains: [(0u16, 0usize); MAX_RX_BUFFERS],
            pos: [0u16; MAX_RX_BUFFERS],
            counts: [0u16; MAX_RX_BUFFERS],
            dry: None,
            descs: [(GuestAddress(0), 0usize); MAX_RX_DESCS],
            used: [(0u16, 0u32); MAX_RX_BUFFERS],
            peek: [0u8; RX_PEEK],
            nchains: 0,
            ndescs: 0,
            cap: 0,
        }
    }

    /// Pops chains until they hold `need` bytes or the ring (or our
    /// limits) run out. A malformed chain hands every popped chain back
    /// empty and is reported as `Ok(Err(reason))`.
    #[allow(clippy::too_many_arguments)]
    fn pop_until<'m>(
        &mut self,
        q: &mut virtio_queue::Queue,
        ring: &mut (Option<&Rings<'m>>, &mut Cursor, &mut Regions<'m>),
        mem: &'m GuestMemoryMmap,
        need: usize,
        hdr_len: usize,
        mergeable: bool,
        stats: &QueueStats,
        mut packed: Option<&mut PackedRing<'m>>,
    ) -> io::Result<Result<(), DropReason>> {
        while self.cap < need && self.nchains < MAX_RX_BUFFERS && (self.nchains == 0 || mergeable) {
            if let Some(p) = packed.as_deref_mut() {
                p.prefetch_ahead(ring.2, true);
                let before = p.position().base();
                let a = match pop_packed(p, stats) {
                    Ok(Some(a)) => a,
                    Ok(None) => {
                        let at = p.position();
                        self.dry = Some((at.avail, at.avail_wrap));
                        break;
                    }
                    Err(()) => break,
                };
                let first = self.ndescs;
                let bad = match a.single() {
                    Some(d) => self.take_chain([d].into_iter(), hdr_len),
                    None => {
                        let mut c = p.chain(&a, mem);
                        let bad = self.take_chain(&mut c, hdr_len);
                        bad.or(c.cut().then_some(DropReason::BadChainLayout))
                    }
                };
                if let Some(why) = bad {
                    self.give_back_empty(q, mem, Some(&mut *p))?;
                    p.put_used(a.id, 0, a.count)
                        .ok_or_else(|| io::Error::other("packed ring not writable"))?;
                    return Ok(Err(why));
                }
                self.chains[self.nchains] = (a.id, self.ndescs - first);
                self.counts[self.nchains] = a.count;
                self.pos[self.nchains] = before;
                self.nchains += 1;
                continue;
            }
            let Some((head, mut walk)) = pop_walk(q, ring.0, ring.1, ring.2, mem, stats) else {
                break;
            };
            let first = self.ndescs;
            // Each kind of walk compiled in, not called through a vtable
            // per descriptor.
            // (A buffer of one descriptor, as most drivers post, needs
            // no walk.)
            let bad = match &mut walk {
                Walk::Fast(c) => match ring.0.and_then(|r| r.single(head)) {
                    Some(d) => self.take_chain([d].into_iter(), hdr_len),
                    None => self.take_chain(c, hdr_len),
                },
                Walk::Queue(c) => self.take_chain(c, hdr_len),
            };
            if let Some(why) = bad {
                self.give_back_empty(q, mem, None)?;
                q.add_used(mem, head, 0).map_err(io::Error::other)?;
                return Ok(Err(why));
            }
            self.chains[self.nchains] = (head, self.ndescs - first);
            self.pos[self.nchains] = q.next_avail().wrapping_sub(1);
            self.nchains += 1;
        }
        Ok(Ok(()))
    }

    /// Pops the next chain through resolved `rings` when it is one
    /// writable descriptor of at least `need` bytes (a driver's usual
    /// buffer, enough for the frame): no walk, no loop. Otherwise leaves
    /// the ring where that chain starts (heads passed over before it stay
    /// counted and taken) and returns false, for [`RxBufs::pop_until`].
    /// Called with nothing popped yet.
    #[inline(always)]
    fn pop_single<'m>(
        &mut self,
        q: &mut virtio_queue::Queue,
        rings: &Rings<'m>,
        cur: &mut Cursor,
        regions: &mut Regions<'m>,
        need: usize,
        stats: &QueueStats,
    ) -> bool {
        let Some(head) = pop_head(q, rings, cur, regions, stats) else {
            return false;
        };
        let pos = q.next_avail().wrapping_sub(1);
        let d = match cur.kept.get(pos, head) {
            Some(d) => Some(d).filter(alone),
            None => rings.single(head),
        };
        match d {
            Some(d) if d.is_write_only() && d.len() as usize >= need => {
                let len = d.len() as usize;
                self.chains[0] = (head, 1);
                self.pos[0] = pos;
                self.descs[0] = (d.addr(), len);
                self.nchains = 1;
                self.ndescs = 1;
                self.cap = len;
                true
            }
            _ => {
                q.set_next_avail(pos);
                false
            }
        }
    }

    /// Adds the writable descriptors of one popped chain to `descs`;
    /// why the chain cannot be used, if it cannot.
    #[inline(always)]
    fn take_chain(
        &mut self,
        chain: impl Iterator<Item = Descriptor>,
        hdr_len: usize,
    ) -> Option<DropReason> {
        let mut last_next = false;
        for desc in chain {
            last_next = desc.has_next();
            let len = desc.len() as usize;
            if !desc.is_write_only() {
                return Some(DropReason::BadChainLayout);
            } else if len == 0 {
                // Holds nothing; skipped.
                continue;
            } else if self.ndescs == MAX_RX_DESCS {
                return Some(DropReason::ChainTooLong);
            } else if self.ndescs == 0 && len < hdr_len {
                return Some(DropReason::RxChainTooSmall);
            }
            self.descs[self.ndescs] = (desc.addr(), len);
            self.ndescs += 1;
            self.cap += len;
        }
        // The walk stopped on a descriptor that names a next one.
        last_next.then_some(DropReason::ChainTooLong)
    }

    /// Returns the last `n` popped chains to the ring, unused: the next
    /// pop starts at the first of them again.
    fn unpop(&self, q: &mut virtio_queue::Queue, n: usize, packed: Option<&mut PackedRing<'_>>) {
        if n == 0 {
            return;
        }
        let Some(&p) = self.nchains.checked_sub(n).and_then(|k| self.pos.get(k)) else {
            return;
        };
        match packed {
            Some(r) => {
                if let Some(at) = Position::from_base(p, r.size()) {
                    r.unpop(at);
                }
            }
            None => q.set_next_avail(p),
        }
    }

    /// Hands every popped chain back used and empty (the driver reposts).
    fn give_back_empty(
        &mut self,
        q: &mut virtio_queue::Queue,
        mem: &GuestMemoryMmap,
        packed: Option<&mut PackedRing<'_>>,
    ) -> io::Result<()> {
        let n = std::mem::take(&mut self.nchains);
        match packed {
            Some(r) => {
                for (&(id, _), &count) in self.chains[..n].iter().zip(&self.counts[..n]) {
                    r.put_used(id, 0, count)
                        .ok_or_else(|| io::Error::other("packed ring not writable"))?;
                }
            }
            None => {
                for &(h, _) in &self.chains[..n] {
                    q.add_used(mem, h, 0).map_err(io::Error::other)?;
                }
            }
        }
        Ok(())
    }
}

/// Writes the rest of a frame (its header `hb`, then `payload`; the
/// first `written` bytes of the two are in earlier chains) into the
/// writable descriptors `descs` of one RX chain, in order. Returns the
/// bytes this chain took and whether its last descriptor names a next
/// one, or why the chain is refused: a readable descriptor, a first
/// buffer shorter than the header, a write outside guest memory.
/// `first_hdr` is set to the buffer the header went into.
fn fill_chain(
    descs: impl Iterator<Item = Descriptor>,
    regions: &mut Regions<'_>,
    hb: &[u8],
    payload: &[u8],
    written: &mut usize,
    first_hdr: &mut Option<GuestAddress>,
) -> Result<(usize, bool), DropReason> {
    let total = hb.len() + payload.len();
    let (mut in_chain, mut last_next) = (0, false);
    for desc in descs {
        last_next = desc.has_next();
        if !desc.is_write_only() {
            return Err(DropReason::BadChainLayout);
        }
        let len = desc.len() as usize;
        if *written >= total || len == 0 {
            continue;
        }
        if first_hdr.is_none() {
            if len < hb.len() {
                return Err(DropReason::RxChainTooSmall);
            }
            *first_hdr = Some(desc.addr());
        }
        let n = len.min(total - *written);
        write_part(regions, hb, payload, *written, n, desc.addr())?;
        *written += n;
        in_chain += n;
    }
    Ok((in_chain, last_next))
}

/// The next list of packed ring `ring`. A broken ring (a list that never
/// ends, or only partly available) is counted (`bad_ring`) and is an
/// error: where the next list starts is unknown, so the queue takes
/// nothing more until the driver resets it.
#[inline]
pub(super) fn pop_packed(
    ring: &mut PackedRing<'_>,
    stats: &QueueStats,
) -> Result<Option<Avail>, ()> {
    ring.pop().map_err(|_| stats.drop(DropReason::BadRing))
}

impl RxWriter<'_> {
    /// Lets go of the vring's lock, before anything else of this thread
    /// may take it (notifications, other ports' deliveries, the end of a
    /// round).
    pub fn release(&mut self) {
        self.publish();
        if let (Some(g), Some(ring)) = (self.held.as_mut(), self.packed.take()) {
            // Counted under the vring's lock, as the decision reads it.
            if let Some(sink) = self.moved_sink {
                sink.fetch_add(ring.used_moved(), Ordering::AcqRel);
            }
            // Every chain taken was used or given back: used stands at
            // available, which is what the queue keeps.
            if ring.finish(g.get_queue_mut()).is_none() {
                self.stats.drop(DropReason::BadRing);
            }
        }
        self.held = None;
        self.rings = None;
    }

    /// Stores the used index for the frames written through the resolved
    /// rings since the last time (their entries are in place).
    pub fn publish(&mut self) {
        if let Some(ring) = self.packed.as_mut() {
            if ring.publish().is_none() {
                self.stats.drop(DropReason::BadRing);
            }
            return;
        }
        if self.unpublished == 0 {
            return;
        }
        if let (Some(g), Some(r)) = (&self.held, &self.rings) {
            if r.publish(g.get_queue().next_used()).is_none() {
                self.stats.drop(DropReason::BadRing);
            }
        }
        self.unpublished = 0;
    }

    /// A frame of `buffers` buffers went into the used ring through the
    /// resolved rings (without them it was published already): published
    /// once [`PUBLISH_EVERY`] buffers wait, so that a driver refilling
    /// big frames' buffers is not kept waiting for many frames.
    fn published_later(&mut self, buffers: usize) {
        if let Some(ring) = &self.packed {
            if ring.unpublished() >= usize::from(PUBLISH_EVERY) {
                self.publish();
            }
            return;
        }
        if self.rings.is_none() {
            return;
        }
        self.unpublished = self
            .unpublished
            .saturating_add(u16::try_from(buffers).unwrap_or(u16::MAX));
        if self.unpublished >= PUBLISH_EVERY {
            self.publish();
        }
    }

    /// Takes the vring's lock, unless held already, and resolves the
    /// queue's rings.
    fn hold(&mut self) {
        if self.held.is_none() {
            let g = self.vring.get_mut();
            if self.is_packed {
                self.packed = PackedRing::from_queue(g.get_queue(), self.mem);
            } else {
                self.rings = Rings::new(g.get_queue(), self.mem);
                self.cursor = Cursor::at(g.get_queue().next_avail());
            }
            self.held = Some(g);
        }
    }

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

        self.hold();
        if self.is_packed {
            return self.write_packed(hb, payload, total);
        }
        let Some(state) = self.held.as_mut() else {
            return Err(DropReason::BadRing);
        };
        let q = state.get_queue_mut();
        let (mem, rings) = (self.mem, self.rings);
        let (cur, regions) = (&mut self.cursor, &mut self.regions);
        let mut used = [(0u16, 0u32); MAX_RX_BUFFERS];
        let mut count = 0;
        let mut written = 0;
        let mut first_hdr: Option<GuestAddress> = None;
        let mut first_pos: Option<u16> = None;
        let mut failure = None;
        while written < total {
            if count == MAX_RX_BUFFERS || (count == 1 && !self.mergeable) {
                failure = Some(DropReason::RxChainTooSmall);
                break;
            }
            let Some((head, mut walk)) = pop_walk(q, rings.as_ref(), cur, regions, mem, self.stats)
            else {
                // Put back what was popped for this frame (from its first
                // position: heads skipped in between are seen again).
                if let Some(p) = first_pos {
                    q.set_next_avail(p);
                }
                return Err(DropReason::RxNoBuffers);
            };
            first_pos.get_or_insert(q.next_avail().wrapping_sub(1));
            let mut in_chain = 0usize;
            match fill_chain(
                walk.descs(),
                regions,
                hb,
                payload,
                &mut written,
                &mut first_hdr,
            ) {
                Ok((n, last_next)) => {
                    in_chain = n;
                    if last_next && written < total {
                        failure = Some(DropReason::ChainTooLong);
                    }
                }
                Err(why) => failure = Some(why),
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
            self.used += 1;
            return Err(why);
        }
        if self.mergeable && count > 1 {
            if let Some(at) = first_hdr {
                let nb = (count as u16).to_le_bytes();
                let at = at.checked_add(10).ok_or(DropReason::BadDescriptor)?;
                regions.write(&nb, at).ok_or(DropReason::BadDescriptor)?;
            }
        }
        add_used_frame(q, mem, rings.as_ref(), &used[..count])?;
        self.used += 1;
        self.published_later(count);
        Ok(())
    }

    /// [`RxWriter::write`] into a packed ring: the frame's header `hb`
    /// and `payload` (`total` bytes) into as many lists as it takes (one
    /// without MRG_RXBUF), their used descriptors put together.
    fn write_packed(&mut self, hb: &[u8], payload: &[u8], total: usize) -> Result<(), DropReason> {
        let (mem, stats, mergeable) = (self.mem, self.stats, self.mergeable);
        let regions = &mut self.regions;
        let Some(ring) = self.packed.as_mut() else {
            // A queue the frontend stopped has no buffers (the frame
            // waits); a ready one that cannot be resolved is a bad ring.
            let ready = self.held.as_ref().is_some_and(|g| g.get_queue().ready());
            return Err(if ready {
                DropReason::BadRing
            } else {
                DropReason::RxNoBuffers
            });
        };
        let start = ring.position();
        let mut used = [(0u16, 0u32, 0u16); MAX_RX_BUFFERS];
        let mut count = 0;
        let mut written = 0;
        let mut first_hdr: Option<GuestAddress> = None;
        let mut failure = None;
        while written < total {
            if count == MAX_RX_BUFFERS || (count == 1 && !mergeable) {
                failure = Some(DropReason::RxChainTooSmall);
                break;
            }
            let a = match pop_packed(ring, stats) {
                Ok(Some(a)) => a,
                Ok(None) => {
                    // Too few buffers: the frame waits, its lists go back.
                    let p = ring.position();
                    self.edge = Some((p.avail, p.avail_wrap));
                    ring.unpop(start);
                    return Err(DropReason::RxNoBuffers);
                }
                Err(()) => {
                    ring.unpop(start);
                    return Err(DropReason::RxNoBuffers);
                }
            };
            let mut in_chain = 0usize;
            let mut walk = ring.chain(&a, mem);
            match fill_chain(
                &mut walk,
                regions,
                hb,
                payload,
                &mut written,
                &mut first_hdr,
            ) {
                Ok((n, _)) => {
                    in_chain = n;
                    if walk.cut() {
                        failure = Some(DropReason::BadChainLayout);
                    }
                }
                Err(why) => failure = Some(why),
            }
            used[count] = (a.id, in_chain as u32, a.count);
            count += 1;
            if failure.is_some() {
                break;
            }
        }
        if let Some(why) = failure {
            // Every list back empty: the driver reclaims them.
            for u in &mut used[..count] {
                u.1 = 0;
            }
            ring.put_used_frame(&used[..count])
                .ok_or(DropReason::BadRing)?;
            self.used += 1;
            return Err(why);
        }
        if mergeable && count > 1 {
            if let Some(at) = first_hdr {
                let nb = (count as u16).to_le_bytes();
                let at = at.checked_add(10).ok_or(DropReason::BadDescriptor)?;
                regions.write(&nb, at).ok_or(DropReason::BadDescriptor)?;
            }
        }
        ring.put_used_frame(&used[..count])
            .ok_or(DropReason::BadRing)?;
        self.used += 1;
        self.published_later(count);
        Ok(())
    }

    /// Reads frames from uplink queue `uq` straight into this queue's RX
    /// buffers. Buffers for `expect` frame bytes are popped first; a
    /// longer frame spills into `overflow`, and is then moved into further
    /// buffers (with MRG_RXBUF), so a caller that expects small frames
    /// pops one buffer per frame, and one that expects 64 KiB frames pops
    /// enough for them. A frame RSS sends to another queue, or that the
    /// filters drop, leaves the buffers unused.
    ///
    /// While frames of at most `expect` bytes keep landing whole in one
    /// buffer each, up to `max` are taken in one call: those before the
    /// last are counted in [`RxWriter::take_burst`], and what became of
    /// the last is returned.
    #[allow(clippy::too_many_arguments)]
    pub fn receive_direct(
        &mut self,
        nic: &Nic,
        view: &View,
        uq: usize,
        own: usize,
        expect: usize,
        overflow: &mut [u8],
        out: &mut Vec<u8>,
        max: usize,
    ) -> io::Result<Direct> {
        loop {
            let (d, whole) = self.receive_one(nic, view, uq, own, expect, overflow, out)?;
            match d {
                Direct::Delivered(n) if whole && n <= expect && self.burst.0 + 1 < max => {
                    self.burst.0 += 1;
                    self.burst.1 += n as u64;
                }
                d => return Ok(d),
            }
        }
    }

    /// Where a packed ring last had no buffer for a frame, if it had
    /// none since the last call.
    pub fn take_edge(&mut self) -> Option<(u16, bool)> {
        self.edge.take()
    }

    /// The frames [`RxWriter::receive_direct`] delivered before the one
    /// it returned, and their bytes; zeroed for the next call.
    pub fn take_burst(&mut self) -> (usize, u64) {
        std::mem::take(&mut self.burst)
    }

    /// One frame of [`RxWriter::receive_direct`], and whether it went
    /// whole into one buffer (then the next may follow in the same call).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn receive_one(
        &mut self,
        nic: &Nic,
        view: &View,
        uq: usize,
        own: usize,
        expect: usize,
        overflow: &mut [u8],
        out: &mut Vec<u8>,
    ) -> io::Result<(Direct, bool)> {
        let hdr_len = if self.hash_report {
            HDR_LEN_HASH
        } else {
            HDR_LEN
        };
        let mem = self.mem;
        let mergeable = self.mergeable;
        self.hold();
        let Some(state) = self.held.as_mut() else {
            return Ok((Direct::Dropped(DropReason::BadRing), false));
        };
        let q = state.get_queue_mut();
        let rings = self.rings.as_ref();
        let cur = &mut self.cursor;
        let regions = &mut self.regions;
        let rx = &mut **self.bufs.get_or_insert_with(RxBufs::boxed);
        // A packed ring's chains come from it instead (the split queue
        // then only holds its positions). One that could not be resolved
        // has no other way (virtio-queue would read it as split): the
        // frame waits in the backlog, where `write` counts it.
        if self.is_packed && self.packed.is_none() {
            return Ok((Direct::NoBuffers, false));
        }
        let mut packed = self.packed.as_mut();
        rx.nchains = 0;
        rx.ndescs = 0;
        rx.cap = 0;
        rx.dry = None;
        let single = match rings {
            Some(r) => rx.pop_single(q, r, cur, regions, hdr_len + expect, self.stats),
            None => false,
        };
        if single {
            // One buffer holds it.
        } else if let Err(why) = rx.pop_until(
            q,
            &mut (rings, &mut *cur, &mut *regions),
            mem,
            hdr_len + expect,
            hdr_len,
            mergeable,
            self.stats,
            packed.as_deref_mut(),
        )? {
            return Ok((Direct::Dropped(why), false));
        }
        if rx.cap < hdr_len + expect {
            rx.unpop(q, rx.nchains, packed.as_deref_mut());
            // Where the driver's next buffer will show (packed).
            self.edge = rx.dry.or(self.edge);
            return Ok((Direct::NoBuffers, false));
        }
        let guest_room = rx.cap - hdr_len;
        let mut vnet = [0u8; VNET_HDR_LEN];
        let got = recv_into(
            nic,
            uq,
            &mut vnet,
            &rx.descs[..rx.ndescs],
            hdr_len,
            regions,
            overflow,
        );
        let Some(n) = got else {
            rx.give_back_empty(q, mem, packed.as_deref_mut())?;
            return Ok((Direct::Dropped(DropReason::BadDescriptor), false));
        };
        let n = match n {
            Ok(n) => n,
            Err(e) => {
                rx.unpop(q, rx.nchains, packed.as_deref_mut());
                let d = match e.kind() {
                    io::ErrorKind::WouldBlock => Direct::Empty,
                    io::ErrorKind::InvalidData => Direct::Dropped(DropReason::RxChainTooSmall),
                    _ => {
                        log::debug!("uplink queue {uq}: {e}");
                        Direct::Failed
                    }
                };
                return Ok((d, false));
            }
        };
        if n <= VNET_HDR_LEN {
            rx.unpop(q, rx.nchains, packed.as_deref_mut());
            return Ok((Direct::Dropped(DropReason::RxMalformed), false));
        }
        let frame_len = n - VNET_HDR_LEN;
        let in_guest = frame_len.min(guest_room);
        let spill = &overflow[..frame_len - in_guest];
        // Where it goes: known without reading it back when the PF takes
        // every frame, else from its first bytes (only as many as the
        // route reads).
        let blind = if frame_len >= ETH_AND_TAG {
            blind_route(&mut self.blind, nic, view)
        } else {
            None
        };
        let route = match blind {
            Some(s) => UplinkRoute::Pf(s),
            None => {
                let peek = &mut rx.peek;
                let plen = frame_len.min(nic.route_peek(view, RX_PEEK));
                let from_guest = plen.min(in_guest);
                if let Err(why) = read_span(
                    regions,
                    &rx.descs[..rx.ndescs],
                    hdr_len,
                    &mut peek[..from_guest],
                ) {
                    rx.unpop(q, rx.nchains, packed.as_deref_mut());
                    return Ok((Direct::Dropped(why), false));
                }
                peek[from_guest..plen].copy_from_slice(&spill[..plen - from_guest]);
                nic.uplink_route(view, &peek[..plen], frame_len)
            }
        };
        let (steering, target) = match route {
            UplinkRoute::Pf(s) => (s, Some(nic.pf().rx_queue(usize::from(s.queue), own))),
            UplinkRoute::Switch => (NO_HASH, None),
            UplinkRoute::Drop(why) => {
                rx.unpop(q, rx.nchains, packed.as_deref_mut());
                return Ok((Direct::Dropped(why), false));
            }
        };
        let total = hdr_len + frame_len;
        let mut fits = target == Some(own);
        if fits && !spill.is_empty() {
            // Move the spilled part into more buffers, if the driver has them.
            let before = rx.cap;
            let got = rx.pop_until(
                q,
                &mut (rings, &mut *cur, &mut *regions),
                mem,
                total,
                hdr_len,
                mergeable,
                self.stats,
                packed.as_deref_mut(),
            )?;
            if let Err(why) = got {
                return Ok((Direct::Dropped(why), false));
            }
            fits = rx.cap >= total
                && write_span(regions, &rx.descs[..rx.ndescs], before, spill).is_ok();
        }
        if !fits {
            out.clear();
            out.extend_from_slice(&vnet);
            out.resize(VNET_HDR_LEN + frame_len, 0);
            let r = read_span(
                regions,
                &rx.descs[..rx.ndescs],
                hdr_len,
                &mut out[VNET_HDR_LEN..VNET_HDR_LEN + in_guest],
            );
            out[VNET_HDR_LEN + in_guest..].copy_from_slice(spill);
            rx.unpop(q, rx.nchains, packed.as_deref_mut());
            self.edge = rx.dry.or(self.edge);
            let d = match (r, target) {
                (Ok(()), Some(t)) => Direct::Elsewhere(t),
                (Ok(()), None) => Direct::Switched,
                (Err(why), _) => Direct::Dropped(why),
            };
            return Ok((d, false));
        }
        // Ours: keep the buffers the frame filled, return the rest (one
        // buffer that held it all is kept as it is).
        let mut k = rx.nchains;
        if k > 1 {
            let (mut seen, mut d) = (0, 0);
            k = 0;
            while seen < total && k < rx.nchains {
                let (_, nd) = rx.chains[k];
                seen += rx.descs[d..d + nd].iter().map(|x| x.1).sum::<usize>();
                d += nd;
                k += 1;
            }
            rx.unpop(q, rx.nchains - k, packed.as_deref_mut());
            rx.nchains = k;
        }
        // The uplink's header as the driver reads it (flags it does not
        // know are refused), with the number of buffers and the hash
        // filled in.
        if HdrFlags::from_bits(vnet[0]).is_none() {
            rx.unpop(q, k, packed.as_deref_mut());
            return Ok((Direct::Dropped(DropReason::RxMalformed), false));
        }
        let [a, b, c, d, e, f, g, h, i, j, _, _] = vnet;
        let nb = (k as u16).to_le_bytes();
        let front = u64::from_le_bytes([a, b, c, d, e, f, g, h]);
        let mid = u32::from_le_bytes([i, j, nb[0], nb[1]]);
        let hash = self
            .hash_report
            .then(|| u64::from(steering.hash) | (u64::from(steering.report as u16) << 32));
        let written = write_rx_header(regions, rx.descs[0].0, front, mid, hash);
        if written.is_none() {
            rx.unpop(q, k, packed.as_deref_mut());
            return Ok((Direct::Dropped(DropReason::BadDescriptor), false));
        }
        if let Some(p) = packed {
            // A packed ring: each list's used descriptor, the frame's
            // together.
            let (mut left, mut d) = (total, 0);
            let mut used = [(0u16, 0u32, 0u16); MAX_RX_BUFFERS];
            for (j, u) in used.iter_mut().enumerate().take(k) {
                let (id, nd) = rx.chains[j];
                let c: usize = rx.descs[d..d + nd].iter().map(|x| x.1).sum();
                d += nd;
                let n = c.min(left);
                left -= n;
                *u = (id, n as u32, rx.counts[j]);
            }
            if p.put_used_frame(&used[..k]).is_none() {
                return Ok((Direct::Dropped(DropReason::BadRing), false));
            }
        } else if let (1, Some(r)) = (k, rings) {
            // One buffer through the resolved rings (its head below the
            // queue's size, as every popped head is): its entry alone.
            let at = q.next_used();
            if r.put_used(at, rx.chains[0].0, total as u32).is_none() {
                return Ok((Direct::Dropped(DropReason::BadRing), false));
            }
            q.set_next_used(at.wrapping_add(1));
        } else {
            let (mut left, mut d) = (total, 0);
            let used = &mut rx.used;
            for (u, &(h, nd)) in used.iter_mut().zip(&rx.chains[..k]) {
                let c: usize = rx.descs[d..d + nd].iter().map(|x| x.1).sum();
                d += nd;
                let n = c.min(left);
                left -= n;
                *u = (h, n as u32);
            }
            if let Err(why) = add_used_frame(q, mem, rings, &used[..k]) {
                return Ok((Direct::Dropped(why), false));
            }
        }
        self.used += 1;
        self.published_later(k);
        Ok((Direct::Delivered(frame_len), k == 1 && spill.is_empty()))
    }
}
