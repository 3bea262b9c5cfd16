//! A packed virtqueue (virtio 1.3, 2.8) from the device's side.
//!
//! One ring of 16-byte descriptors carries both directions: the driver
//! marks a descriptor available by setting its AVAIL flag to its wrap
//! counter and USED to the inverse; the device hands a buffer back by
//! writing one used descriptor (the buffer ID, the length written, AVAIL
//! and USED both set to its own wrap counter) over the first descriptor
//! of the chains it has finished, and skips as many ring entries as the
//! chain had. Both sides poll one place only, the next descriptor in
//! ring order, so the device reads a chain in the same lines the driver
//! just wrote, and there is no index and no separate available ring to
//! fetch across cores.
//!
//! [`PackedRing`] resolves the ring and the two event-suppression areas
//! to host memory once, pops whole chains ([`PackedRing::pop`]: their
//! extent and buffer ID) and walks them ([`PackedChain`]) with the rules
//! the split ring's walk keeps: a list is at most the queue's size in
//! descriptors, an indirect table is a whole number of descriptors and
//! holds no indirect one, a chain is under 4 GiB. A used descriptor's
//! ID and length are stored as it is put; their flags, which make them
//! the driver's, are stored at [`PackedRing::publish`], the first one
//! last, so that the driver sees a batch (and every buffer of a
//! multi-buffer frame) at once.
//!
//! Positions travel as vhost-user's vring base does for a packed ring:
//! bits 0-14 the index, bit 15 the wrap counter ([`Position::base`]).

use std::sync::atomic::{fence, Ordering};

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

use super::split::{has_prefetchw, prefetch_buffer, read_raw, Regions, BATCH, DESC};

/// Flags of a packed descriptor.
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;
pub const F_AVAIL: u16 = 1 << 7;
pub const F_USED: u16 = 1 << 15;

/// Event-suppression flags (virtio 1.3, 2.8.10).
pub const EVENT_ENABLE: u16 = 0;
pub const EVENT_DISABLE: u16 = 1;
pub const EVENT_DESC: u16 = 2;

/// The largest packed queue (virtio 1.3, 2.8: up to 2^15 entries).
pub const MAX_SIZE: u16 = 1 << 15;

/// Used descriptors whose flags wait for [`PackedRing::publish`]: more
/// than one received frame's buffers (64), so that a frame put with
/// [`PackedRing::put_used_frame`] is published whole.
const PENDING: usize = 128;

/// Where the device stands in a packed ring: the next descriptor it
/// reads and the wrap counter it expects there, and the same for the
/// next used descriptor it writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub avail: u16,
    pub avail_wrap: bool,
    pub used: u16,
    pub used_wrap: bool,
}

impl Position {
    /// A ring's start: both counters at 1 (virtio 1.3, 2.8.1).
    pub const START: Position = Position {
        avail: 0,
        avail_wrap: true,
        used: 0,
        used_wrap: true,
    };

    /// Used's half of [`Position::START`].
    pub const START_USED: (u16, bool) = (0, true);

    /// From a vhost-user vring base: bits 0-14 the next available
    /// descriptor, bit 15 its wrap counter. The device starts with every
    /// buffer before it used, so used stands there too. None for an index
    /// outside a ring of `size`.
    pub fn from_base(base: u16, size: u16) -> Option<Position> {
        let avail = base & 0x7fff;
        let wrap = base & 0x8000 != 0;
        (avail < size).then_some(Position {
            avail,
            avail_wrap: wrap,
            used: avail,
            used_wrap: wrap,
        })
    }

    /// The vring base vhost-user's GET_VRING_BASE returns: the next
    /// available descriptor and its wrap counter.
    pub fn base(&self) -> u16 {
        self.avail | (u16::from(self.avail_wrap) << 15)
    }
}

/// Steps `(i, wrap)` on by `n` entries of a ring of `size`, flipping the
/// wrap counter each time it passes the end.
#[inline(always)]
fn step(i: u16, wrap: bool, n: u16, size: u16) -> (u16, bool) {
    let j = u32::from(i) + u32::from(n);
    let size = u32::from(size);
    if j >= size {
        ((j - size) as u16, !wrap)
    } else {
        (j as u16, wrap)
    }
}

/// Whether descriptor flags `f` mark an available descriptor for a
/// device expecting wrap counter `wrap`: AVAIL equal to it, USED not.
#[inline(always)]
fn is_avail(f: u16, wrap: bool) -> bool {
    (f & F_AVAIL != 0) == wrap && (f & F_USED != 0) != wrap
}

/// A chain the driver made available, popped: where it starts in the
/// ring, how many ring entries it takes, and the buffer ID its last one
/// carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Avail {
    pub id: u16,
    pub start: u16,
    pub count: u16,
    /// A list of one descriptor that names no indirect table: that
    /// descriptor (address, length, WRITE flag), read with the flags.
    pub single: Option<(u64, u32, u16)>,
}

impl Avail {
    /// [`Avail::single`] as the walk would yield it.
    #[inline(always)]
    pub fn single(&self) -> Option<Descriptor> {
        self.single
            .map(|(addr, len, flags)| Descriptor::new(addr, len, flags, 0))
    }
}

/// Why a ring cannot go on: the driver broke the format, and where the
/// next chain starts is unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broken {
    /// A list that runs past the queue's size in descriptors.
    TooLong,
    /// A descriptor after a list's first that is not available: the
    /// driver makes the first available last (virtio 1.3, 2.8.6).
    Partial,
    /// The ring could not be read.
    Unreadable,
}

/// A packed ring resolved to host memory, with the device's positions.
#[derive(Debug)]
pub struct PackedRing<'m> {
    size: u16,
    desc: VolatileSlice<'m>,
    /// Driver Event Suppression: read by the device.
    driver: VolatileSlice<'m>,
    /// Device Event Suppression: written by the device.
    device: VolatileSlice<'m>,
    pos: Position,
    /// Used descriptors put but not yet written: ring index, flags,
    /// buffer ID, length.
    pending: [(u16, u16, u16, u32); PENDING],
    npending: usize,
    /// Where used stood at the last notification decision, and `moved`
    /// then.
    signalled: (u16, bool),
    signalled_moved: u32,
    /// Entries past the next available one whose buffers were prefetched.
    ahead: u16,
    /// Entries used since the ring was resolved.
    moved: u32,
}

impl<'m> PackedRing<'m> {
    /// The ring of `size` descriptors at `desc` with its driver and
    /// device areas, when each is aligned as virtio asks (16, 4 and 4
    /// bytes, in guest and host memory) and lies in one region of `mem`;
    /// None otherwise.
    pub fn new(
        mem: &'m GuestMemoryMmap,
        desc: GuestAddress,
        driver: GuestAddress,
        device: GuestAddress,
        size: u16,
        pos: Position,
    ) -> Option<PackedRing<'m>> {
        if size == 0 || size > MAX_SIZE || pos.avail >= size || pos.used >= size {
            return None;
        }
        if desc.0 % 16 != 0 || driver.0 % 4 != 0 || device.0 % 4 != 0 {
            return None;
        }
        let ring = PackedRing {
            size,
            desc: mem.get_slice(desc, DESC * usize::from(size)).ok()?,
            driver: mem.get_slice(driver, 4).ok()?,
            device: mem.get_slice(device, 4).ok()?,
            pos,
            pending: [(0, 0, 0, 0); PENDING],
            npending: 0,
            signalled: (pos.used, pos.used_wrap),
            signalled_moved: 0,
            ahead: 0,
            moved: 0,
        };
        let at = |s: &VolatileSlice<'_>| s.ptr_guard().as_ptr() as usize;
        if at(&ring.desc) % 16 != 0 || at(&ring.driver) % 4 != 0 || at(&ring.device) % 4 != 0 {
            return None;
        }
        Some(ring)
    }

    /// The packed ring a vhost-user frontend set up in `q`: the three
    /// addresses of SET_VRING_ADDR are the descriptor ring, the driver
    /// area and the device area, and the base of SET_VRING_BASE, kept as
    /// the queue's next available index, is the position. Between rounds
    /// every chain taken has been used, so used stands there too. None
    /// when the queue is not ready or its ring is not valid.
    pub fn from_queue(q: &virtio_queue::Queue, mem: &'m GuestMemoryMmap) -> Option<PackedRing<'m>> {
        use virtio_queue::QueueT;
        if !q.ready() {
            return None;
        }
        let size = q.size();
        PackedRing::new(
            mem,
            GuestAddress(q.desc_table()),
            GuestAddress(q.avail_ring()),
            GuestAddress(q.used_ring()),
            size,
            Position::from_base(q.next_avail(), size)?,
        )
    }

    /// Publishes what is left and keeps the position in `q` for the next
    /// round ([`PackedRing::from_queue`]): where used stands. Chains taken
    /// and not used (the caller gives them back with [`PackedRing::unpop`]
    /// first; one left behind is a bug) are taken again next round, and
    /// None says there were some. Also None when the ring could not be
    /// written.
    pub fn finish(mut self, q: &mut virtio_queue::Queue) -> Option<()> {
        use virtio_queue::QueueT;
        let published = self.publish();
        let p = self.pos;
        let at = Position {
            avail: p.used,
            avail_wrap: p.used_wrap,
            ..p
        };
        q.set_next_avail(at.base());
        published?;
        ((p.used, p.used_wrap) == (p.avail, p.avail_wrap)).then_some(())
    }

    /// Ring entries used (put) since the ring was resolved.
    pub fn used_moved(&self) -> u32 {
        self.moved
    }

    /// The queue's size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// The device's positions (after [`PackedRing::publish`], what to
    /// keep for the next round).
    pub fn position(&self) -> Position {
        self.pos
    }

    /// The flags of ring entry `i`, read with acquire ordering: what the
    /// driver wrote into the entry before them is visible once they are.
    #[inline(always)]
    fn flags(&self, i: u16) -> Option<u16> {
        let off = DESC * usize::from(i) + 14;
        self.desc
            .load::<u16>(off, Ordering::Acquire)
            .ok()
            .map(u16::from_le)
    }

    /// Whether the descriptor at `(index, wrap counter)` is available:
    /// with an index where the device once found nothing, whether the
    /// driver has made more available since.
    pub fn avail_at(&self, (i, wrap): (u16, bool)) -> bool {
        i < self.size && self.flags(i).is_some_and(|f| is_avail(f, wrap))
    }

    /// Whether the next chain is available.
    #[inline]
    pub fn has_avail(&self) -> bool {
        self.flags(self.pos.avail)
            .is_some_and(|f| is_avail(f, self.pos.avail_wrap))
    }

    /// The second half of ring entry `i` (length, buffer ID and flags),
    /// with acquire ordering after it: what the driver wrote before the
    /// flags is visible once they say the entry is available.
    #[inline(always)]
    // (The alignment the cast needs is checked: see the SAFETY note.)
    #[allow(clippy::cast_ptr_alignment)]
    fn entry_hi(&self, i: u16) -> Option<u64> {
        let off = DESC * usize::from(i) + 8;
        if off + 8 > self.desc.len() {
            return None;
        }
        let p = self.desc.ptr_guard().as_ptr().wrapping_add(off);
        // SAFETY: the eight bytes at `p` lie within the ring's slice
        // (checked above), which stays mapped while the borrow of guest
        // memory it came from lives; `p` is 8-aligned (the ring's host
        // address is 16-aligned, `PackedRing::new`). The driver may write
        // them at any time: the load is volatile and one aligned access,
        // so length, ID and flags come from one instant, and what they
        // say is checked by every user.
        let hi = u64::from_le(unsafe { std::ptr::read_volatile(p.cast::<u64>()) });
        fence(Ordering::Acquire);
        Some(hi)
    }

    /// The address in ring entry `i` (read after its flags).
    #[inline(always)]
    // (The alignment the cast needs is checked: see the SAFETY note.)
    #[allow(clippy::cast_ptr_alignment)]
    fn entry_addr(&self, i: u16) -> Option<u64> {
        let off = DESC * usize::from(i);
        if off + 8 > self.desc.len() {
            return None;
        }
        let p = self.desc.ptr_guard().as_ptr().wrapping_add(off);
        // SAFETY: as in `entry_hi`: within the ring's slice, 16-aligned,
        // one volatile load of what the driver may rewrite at any time.
        Some(u64::from_le(unsafe {
            std::ptr::read_volatile(p.cast::<u64>())
        }))
    }

    /// Takes the next available chain: None when there is none. Its
    /// descriptors are read through [`PackedRing::chain`] (or, for one
    /// alone, are in [`Avail::single`]), before any used descriptor is
    /// put over them.
    #[inline]
    pub fn pop(&mut self) -> Result<Option<Avail>, Broken> {
        let (start, wrap) = (self.pos.avail, self.pos.avail_wrap);
        let hi = self.entry_hi(start).ok_or(Broken::Unreadable)?;
        let f = (hi >> 48) as u16;
        if !is_avail(f, wrap) {
            return Ok(None);
        }
        if f & F_NEXT == 0 {
            // One descriptor: the whole list is at hand.
            let single = if f & F_INDIRECT == 0 {
                let addr = self.entry_addr(start).ok_or(Broken::Unreadable)?;
                Some((addr, hi as u32, f & F_WRITE))
            } else {
                None
            };
            (self.pos.avail, self.pos.avail_wrap) = step(start, wrap, 1, self.size);
            self.ahead = self.ahead.saturating_sub(1);
            return Ok(Some(Avail {
                id: (hi >> 32) as u16,
                start,
                count: 1,
                single,
            }));
        }
        self.pop_list(start, wrap)
    }

    /// [`PackedRing::pop`] of a list of more than one descriptor.
    #[cold]
    fn pop_list(&mut self, start: u16, wrap: bool) -> Result<Option<Avail>, Broken> {
        let (mut i, mut w) = step(start, wrap, 1, self.size);
        let mut count: u16 = 1;
        loop {
            if count == self.size {
                return Err(Broken::TooLong);
            }
            let hi = self.entry_hi(i).ok_or(Broken::Unreadable)?;
            let f = (hi >> 48) as u16;
            if !is_avail(f, w) {
                return Err(Broken::Partial);
            }
            count += 1;
            let next = step(i, w, 1, self.size);
            if f & F_NEXT == 0 {
                (self.pos.avail, self.pos.avail_wrap) = next;
                self.ahead = self.ahead.saturating_sub(count);
                return Ok(Some(Avail {
                    id: (hi >> 32) as u16,
                    start,
                    count,
                    single: None,
                }));
            }
            (i, w) = next;
        }
    }

    /// Asks the CPU to bring in the buffers (and indirect tables) of the
    /// available entries ahead, [`BATCH`] at a time once fewer than half
    /// a batch are left prefetched, while the device works on the ones
    /// before: the driver wrote them on another core. `write`: to be
    /// written (receive). Nothing is popped.
    #[inline]
    pub(super) fn prefetch_ahead(&mut self, regions: &mut Regions<'m>, write: bool) {
        if self.ahead >= BATCH / 2 {
            return;
        }
        self.prefetch_batch(regions, write);
    }

    #[cold]
    fn prefetch_batch(&mut self, regions: &mut Regions<'m>, write: bool) {
        let ahead = self.ahead.min(self.size - 1);
        let (mut i, mut w) = step(self.pos.avail, self.pos.avail_wrap, ahead, self.size);
        let write = write && has_prefetchw();
        for _ in 0..BATCH.min(self.size - ahead) {
            let Some(hi) = self.entry_hi(i) else {
                return;
            };
            if !is_avail((hi >> 48) as u16, w) {
                return;
            }
            let Some(addr) = self.entry_addr(i) else {
                return;
            };
            prefetch_buffer(&Descriptor::new(addr, hi as u32, 0, 0), regions, write);
            self.ahead += 1;
            (i, w) = step(i, w, 1, self.size);
        }
    }

    /// Gives back the chains popped since `at` (an earlier
    /// [`PackedRing::position`]'s available half): they are taken again.
    pub fn unpop(&mut self, at: Position) {
        self.pos.avail = at.avail;
        self.pos.avail_wrap = at.avail_wrap;
        // (What was prefetched past it is still ahead; counting none is
        // only a prefetch too many.)
        self.ahead = 0;
    }

    /// The descriptors of popped chain `a`, in order. A list that breaks
    /// a rule ends where it does (see the module's notes).
    pub fn chain<'r>(&'r self, a: &Avail, mem: &'m GuestMemoryMmap) -> PackedChain<'r, 'm> {
        PackedChain {
            ring: &self.desc,
            mem,
            size: self.size,
            at: a.start,
            left: a.count.min(self.size),
            whole: a.count,
            table: None,
            yielded: 0,
            cut: false,
        }
    }

    /// Puts a used descriptor for buffer `id`, `len` bytes written into
    /// it, over the next used entry, and skips the `count` entries its
    /// chain took. It is written, and the driver sees it, at
    /// [`PackedRing::publish`].
    #[inline]
    pub fn put_used(&mut self, id: u16, len: u32, count: u16) -> Option<()> {
        if count == 0 || count > self.size {
            return None;
        }
        if self.npending == PENDING {
            self.publish()?;
        }
        let i = self.pos.used;
        let mut f = if self.pos.used_wrap {
            F_AVAIL | F_USED
        } else {
            0
        };
        if len > 0 {
            f |= F_WRITE;
        }
        self.pending[self.npending] = (i, f, id, len);
        self.npending += 1;
        self.moved = self.moved.wrapping_add(u32::from(count));
        (self.pos.used, self.pos.used_wrap) = step(i, self.pos.used_wrap, count, self.size);
        Some(())
    }

    /// Puts the used descriptors of one frame's buffers `(id, len,
    /// count)`, after publishing what waits if they would not all fit in
    /// the batch: the driver sees a frame's buffers all at once (virtio
    /// 1.3, 2.8.8), the first one last.
    pub fn put_used_frame(&mut self, used: &[(u16, u32, u16)]) -> Option<()> {
        if self.npending + used.len() > PENDING {
            self.publish()?;
        }
        for &(id, len, count) in used {
            self.put_used(id, len, count)?;
        }
        Some(())
    }

    /// Used descriptors put and not yet published.
    pub fn unpublished(&self) -> usize {
        self.npending
    }

    /// Makes the used descriptors put so far the driver's, each line of
    /// the ring written in one go: every one after the first whole (the
    /// driver reads them only once it has seen the first), then the
    /// first's length and ID, and after a release fence its flags.
    // (The alignment the cast needs is checked: see the SAFETY note.)
    #[allow(clippy::cast_ptr_alignment)]
    pub fn publish(&mut self) -> Option<()> {
        let n = std::mem::take(&mut self.npending);
        let Some((&(i0, f0, id0, len0), rest)) = self.pending[..n].split_first() else {
            return Some(());
        };
        let base = self.desc.ptr_guard_mut().as_ptr();
        let hi = |i: u16| -> Option<*mut u8> {
            let off = DESC * usize::from(i) + 8;
            (off + 8 <= self.desc.len()).then(|| base.wrapping_add(off))
        };
        for &(i, f, id, len) in rest {
            let p = hi(i)?;
            let v = u64::from(len) | (u64::from(id) << 32) | (u64::from(f) << 48);
            // SAFETY: the eight bytes at `p` lie within the ring's slice
            // (checked by `hi`), mapped writable while the borrow of
            // guest memory lives; `p` is 8-aligned (the ring's host
            // address is 16-aligned, `PackedRing::new`). The entry is the
            // device's (made available, not yet used), and the driver
            // reads it only after the batch's first, stored last.
            unsafe { std::ptr::write_volatile(p.cast::<u64>(), v.to_le()) };
        }
        let p = hi(i0)?;
        // SAFETY: as above; length and ID first, the flags that hand
        // the entry over after the fence.
        unsafe {
            std::ptr::write_volatile(p.cast::<u32>(), len0.to_le());
            std::ptr::write_volatile(p.add(4).cast::<u16>(), id0.to_le());
        }
        fence(Ordering::Release);
        let off = DESC * usize::from(i0) + 14;
        self.desc.store(f0.to_le(), off, Ordering::Release).ok()
    }

    /// Asks the driver for available-buffer notifications (`on`) or not,
    /// through the device area. After turning them on, the caller looks
    /// at [`PackedRing::has_avail`] once more: a chain made available
    /// before the driver saw the flag brings no notification.
    pub fn set_kicks(&self, on: bool) -> Option<()> {
        let v = if on { EVENT_ENABLE } else { EVENT_DISABLE };
        self.device.store(v.to_le(), 2, Ordering::Relaxed).ok()?;
        fence(Ordering::SeqCst);
        Some(())
    }

    /// Whether the driver asked for a used-buffer notification for what
    /// was published since the last time this was asked
    /// ([`driver_wants`]).
    pub fn needs_notification(&mut self, event_idx: bool) -> bool {
        let old = self.signalled;
        let moved = self.moved.wrapping_sub(self.signalled_moved);
        self.signalled = (self.pos.used, self.pos.used_wrap);
        self.signalled_moved = self.moved;
        driver_wants(&self.driver, self.size, old, moved, event_idx)
    }
}

/// Whether the driver area `driver` of a ring of `size` asks for a
/// used-buffer notification now that used moved on by `moved` entries
/// from `old` (index, wrap counter) (virtio 1.3, 2.8.10): always with
/// its flags at ENABLE, never at DISABLE, and with EVENT_IDX at DESC
/// only once used has passed the descriptor (offset and wrap counter) it
/// names. Nothing moved: no. Two laps or more: every descriptor was
/// passed. An area that cannot be read, or names an offset past the
/// ring: yes (a notification too many, never one too few).
pub fn driver_wants(
    driver: &VolatileSlice<'_>,
    size: u16,
    old: (u16, bool),
    moved: u32,
    event_idx: bool,
) -> bool {
    fence(Ordering::SeqCst);
    if moved == 0 {
        return false;
    }
    let Ok(flags) = driver.load::<u16>(2, Ordering::Relaxed) else {
        return true;
    };
    match u16::from_le(flags) & 3 {
        EVENT_DISABLE => false,
        EVENT_DESC if event_idx => {
            let Ok(ev) = driver.load::<u16>(0, Ordering::Relaxed) else {
                return true;
            };
            let ev = u16::from_le(ev);
            let (off, wrap) = (ev & 0x7fff, ev & 0x8000 != 0);
            let m = 2 * u32::from(size);
            if off >= size || moved >= m {
                return true;
            }
            let lap =
                |(i, w): (u16, bool)| -> u32 { u32::from(i) + if w { 0 } else { u32::from(size) } };
            (lap((off, wrap)) + m - lap(old)) % m < moved
        }
        _ => true,
    }
}

/// The descriptors of one packed chain, as the split ring's walk yields
/// them: address, length and the WRITE flag (no NEXT, no INDIRECT).
#[derive(Debug)]
pub struct PackedChain<'r, 'm> {
    ring: &'r VolatileSlice<'m>,
    mem: &'m GuestMemoryMmap,
    size: u16,
    /// The next ring entry, or table entry once in a table.
    at: u16,
    /// Entries left in the list or table.
    left: u16,
    /// Ring entries in the chain.
    whole: u16,
    /// The indirect table being walked.
    table: Option<GuestAddress>,
    yielded: u32,
    /// The walk ended on a rule the list broke, before its end.
    cut: bool,
}

impl PackedChain<'_, '_> {
    /// Whether the walk ended before the list's end, on a rule it broke
    /// (an indirect table that may not be followed, a descriptor that
    /// cannot be read, 4 GiB passed).
    pub fn cut(&self) -> bool {
        self.cut
    }

    /// Moves the walk into the indirect table `(addr, len)`; false when
    /// it may not be followed: the ring entry is part of a longer list,
    /// or the table is not a whole number of descriptors, is empty, or
    /// longer than the queue.
    #[cold]
    fn enter_table(&mut self, addr: u64, len: u32) -> bool {
        if self.whole != 1 || len == 0 || len % DESC as u32 != 0 {
            return false;
        }
        let n = len / DESC as u32;
        if n > u32::from(self.size) {
            return false;
        }
        self.table = Some(GuestAddress(addr));
        self.at = 0;
        self.left = n as u16;
        true
    }

    #[inline(always)]
    fn read(&self) -> Option<(u64, u64)> {
        match self.table {
            None => read_raw(self.ring, self.at),
            Some(t) => {
                let a = t.checked_add(DESC as u64 * u64::from(self.at))?;
                let lo = self.mem.read_obj::<u64>(a).ok()?;
                let hi = self.mem.read_obj::<u64>(a.checked_add(8)?).ok()?;
                Some((u64::from_le(lo), u64::from_le(hi)))
            }
        }
    }
}

impl Iterator for PackedChain<'_, '_> {
    type Item = Descriptor;

    #[inline]
    fn next(&mut self) -> Option<Descriptor> {
        loop {
            if self.left == 0 {
                return None;
            }
            let Some((addr, hi)) = self.read() else {
                return self.stop();
            };
            let len = hi as u32;
            let flags = (hi >> 48) as u16;
            self.left -= 1;
            self.at = match self.table {
                None => step(self.at, false, 1, self.size).0,
                Some(_) => self.at + 1,
            };
            if flags & F_INDIRECT != 0 {
                if self.table.is_some() || !self.enter_table(addr, len) {
                    return self.stop();
                }
                continue;
            }
            // A chain is under 4 GiB (virtio 1.3, 2.7.5.2, kept here too).
            let Some(y) = self.yielded.checked_add(len) else {
                return self.stop();
            };
            self.yielded = y;
            return Some(Descriptor::new(addr, len, flags & F_WRITE, 0));
        }
    }
}

impl PackedChain<'_, '_> {
    #[cold]
    fn stop(&mut self) -> Option<Descriptor> {
        self.left = 0;
        self.cut = true;
        None
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::vhost::testing::PackedDriver;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_000)]).unwrap()
    }

    const RING: GuestAddress = GuestAddress(0x1000);

    fn ring<'m>(mem: &'m GuestMemoryMmap, d: &PackedDriver, pos: Position) -> PackedRing<'m> {
        let (desc, driver, device) = d.areas();
        PackedRing::new(mem, desc, driver, device, d.size(), pos).unwrap()
    }

    fn descs(r: &PackedRing<'_>, a: &Avail, mem: &GuestMemoryMmap) -> Vec<(u64, u32, bool)> {
        r.chain(a, mem)
            .map(|d| (d.addr().0, d.len(), d.is_write_only()))
            .collect()
    }

    /// Chains of one, two and three descriptors go round a ring of 8
    /// several times: each pops with its extent and ID, walks to its
    /// descriptors, and its used descriptor reaches the driver with the
    /// length written, across every wrap of both counters.
    #[test]
    fn chains_go_round_the_ring_and_come_back_used() {
        let mem = memory();
        let mut d = PackedDriver::new(&mem, RING, 8);
        let mut pos = Position::START;
        let mut id = 0u16;
        for round in 0..12u64 {
            let n = (round % 3 + 1) as usize;
            let bufs: Vec<(u64, u32, bool)> = (0..n)
                .map(|k| {
                    (
                        0x10_000 + 0x100 * (round * 4 + k as u64),
                        64 + k as u32,
                        k > 0,
                    )
                })
                .collect();
            d.push(&mem, &bufs, id).unwrap();
            let mut r = ring(&mem, &d, pos);
            let a = r.pop().unwrap().unwrap();
            assert_eq!((a.id, a.count), (id, n as u16), "round {round}");
            assert_eq!(descs(&r, &a, &mem), bufs, "round {round}");
            assert_eq!(r.pop().unwrap(), None);
            r.put_used(a.id, 100 + round as u32, a.count).unwrap();
            assert!(d.used(&mem).is_empty(), "seen before it was published");
            r.publish().unwrap();
            assert_eq!(
                d.used(&mem),
                vec![(id, 100 + round as u32)],
                "round {round}"
            );
            pos = r.position();
            assert_eq!(Position::from_base(pos.base(), 8), Some(pos));
            id = (id + 1) % 8;
        }
    }

    /// A batch of used descriptors is the driver's only once published,
    /// and arrives whole and in order; nothing is available after it.
    #[test]
    fn a_batch_is_published_at_once() {
        let mem = memory();
        let mut d = PackedDriver::new(&mem, RING, 16);
        for id in 0..6u16 {
            d.push(&mem, &[(0x20_000 + 0x800 * u64::from(id), 1500, true)], id)
                .unwrap();
        }
        let mut r = ring(&mem, &d, Position::START);
        let mut got = Vec::new();
        while let Some(a) = r.pop().unwrap() {
            got.push(a);
        }
        assert_eq!(got.len(), 6);
        for a in &got {
            r.put_used(a.id, 60 + u32::from(a.id), a.count).unwrap();
        }
        assert!(d.used(&mem).is_empty());
        r.publish().unwrap();
        let want: Vec<(u16, u32)> = (0..6).map(|i| (i, 60 + u32::from(i))).collect();
        assert_eq!(d.used(&mem), want);
        assert!(!r.has_avail());
    }

    /// An indirect table is walked when it is the chain's only ring
    /// entry and a whole number of descriptors; otherwise, and for a
    /// table inside a table, the walk ends there.
    #[test]
    fn indirect_tables_follow_the_rules() {
        let mem = memory();
        let mut d = PackedDriver::new(&mem, RING, 8);
        let table = GuestAddress(0x30_000);
        let inner = [(0x21_000, 14, false), (0x22_000, 1500, true)];
        PackedDriver::write_table(&mem, table, &inner);
        d.push_flags(&mem, &[(table.0, 32, F_INDIRECT)], 3).unwrap();
        d.push_flags(&mem, &[(table.0, 24, F_INDIRECT)], 4).unwrap();
        d.push_flags(&mem, &[(0x23_000, 10, 0), (table.0, 32, F_INDIRECT)], 5)
            .unwrap();
        let nested = GuestAddress(0x31_000);
        PackedDriver::write_table_flags(&mem, nested, &[(table.0, 32, F_INDIRECT)]);
        d.push_flags(&mem, &[(nested.0, 16, F_INDIRECT)], 6)
            .unwrap();
        let mut r = ring(&mem, &d, Position::START);
        let a = r.pop().unwrap().unwrap();
        assert_eq!(a.id, 3);
        assert_eq!(descs(&r, &a, &mem), inner.to_vec());
        let a = r.pop().unwrap().unwrap();
        assert!(descs(&r, &a, &mem).is_empty(), "24 bytes is no table");
        let a = r.pop().unwrap().unwrap();
        assert_eq!(a.count, 2);
        assert_eq!(descs(&r, &a, &mem), vec![(0x23_000, 10, false)]);
        let a = r.pop().unwrap().unwrap();
        assert!(descs(&r, &a, &mem).is_empty(), "a table in a table");
    }

    /// A list whose later descriptors are not available, or that never
    /// ends, breaks the ring; nothing is popped.
    #[test]
    fn a_broken_list_is_reported_and_nothing_is_taken() {
        let mem = memory();
        let mut d = PackedDriver::new(&mem, RING, 4);
        d.push_flags(&mem, &[(0x20_000, 8, F_NEXT); 4], 0).unwrap();
        let mut r = ring(&mem, &d, Position::START);
        assert_eq!(r.pop(), Err(Broken::TooLong));
        assert_eq!(r.position(), Position::START);

        let mut d = PackedDriver::new(&mem, RING, 4);
        d.push(&mem, &[(0x20_000, 8, false), (0x20_100, 8, false)], 1)
            .unwrap();
        // The second descriptor's flags taken back: a partial list.
        mem.write_obj(0u16, RING.unchecked_add(16 + 14)).unwrap();
        let mut r = ring(&mem, &d, Position::START);
        assert_eq!(r.pop(), Err(Broken::Partial));
    }

    /// Chains given back are popped again, the same ones.
    #[test]
    fn unpopped_chains_come_again() {
        let mem = memory();
        let mut d = PackedDriver::new(&mem, RING, 8);
        d.push(&mem, &[(0x20_000, 64, true)], 1).unwrap();
        d.push(&mem, &[(0x20_100, 64, true), (0x20_200, 64, true)], 2)
            .unwrap();
        let mut r = ring(&mem, &d, Position::START);
        let at = r.position();
        let a = r.pop().unwrap().unwrap();
        let b = r.pop().unwrap().unwrap();
        r.unpop(at);
        assert_eq!(r.pop().unwrap(), Some(a));
        assert_eq!(r.pop().unwrap(), Some(b));
        assert_eq!(r.pop().unwrap(), None);
    }

    /// The driver's event suppression decides notifications: ENABLE
    /// asks for one per publish with something new, DISABLE for none,
    /// DESC (with EVENT_IDX) only once used passes the named descriptor,
    /// across the wrap.
    #[test]
    fn notifications_follow_the_drivers_event_suppression() {
        let mem = memory();
        let mut d = PackedDriver::new(&mem, RING, 8);
        let mut pos = Position::START;
        let mut cycle = |d: &mut PackedDriver, flags: u16, off_wrap: u16, n: u16| {
            d.set_driver_event(&mem, flags, off_wrap);
            for k in 0..n {
                d.push(&mem, &[(0x20_000, 64, true)], k).unwrap();
            }
            let mut r = ring(&mem, d, pos);
            while let Some(a) = r.pop().unwrap() {
                r.put_used(a.id, 1, a.count).unwrap();
            }
            r.publish().unwrap();
            let wants = r.needs_notification(true);
            assert!(!r.needs_notification(true), "nothing new");
            d.used(&mem);
            pos = r.position();
            wants
        };
        assert!(cycle(&mut d, EVENT_ENABLE, 0, 2));
        assert!(!cycle(&mut d, EVENT_DISABLE, 0, 2));
        // Used at 4 (wrap 1); the event at 6 (wrap 1) is passed by 3.
        assert!(!cycle(&mut d, EVENT_DESC, 0x8000 | 6, 2));
        assert!(cycle(&mut d, EVENT_DESC, 0x8000 | 6, 1));
        // Used at 7 (wrap 1): two more go past the end to 1 (wrap 0).
        assert!(cycle(&mut d, EVENT_DESC, 0, 2));
        assert!(!cycle(&mut d, EVENT_DESC, 0x8000 | 2, 2));
        // Without EVENT_IDX, DESC counts as ENABLE.
        d.set_driver_event(&mem, EVENT_DESC, 0x7fff);
        d.push(&mem, &[(0x20_000, 64, true)], 0).unwrap();
        let mut r = ring(&mem, &d, pos);
        let a = r.pop().unwrap().unwrap();
        r.put_used(a.id, 1, a.count).unwrap();
        r.publish().unwrap();
        assert!(r.needs_notification(false));
    }

    /// A notification decision over two laps or more of used entries
    /// cannot tell from positions what was passed: every descriptor was,
    /// so DESC asks for one as ENABLE does; DISABLE still asks for none.
    #[test]
    fn two_laps_of_used_entries_pass_every_event() {
        let mem = memory();
        let d = PackedDriver::new(&mem, RING, 8);
        let (_, driver, _) = d.areas();
        let area = mem.get_slice(driver, 4).unwrap();
        let old = (3, true);
        for (flags, ev, moved, want) in [
            (EVENT_DESC, 0x8000 | 2, 16, true),
            (EVENT_DESC, 0x8000 | 2, 40, true),
            (EVENT_DESC, 0x8000 | 2, 15, false),
            (EVENT_DESC, 0x2, 8, true),
            (EVENT_DESC, 0x2, 7, false),
            (EVENT_DESC, 0x8000 | 4, 1, false),
            (EVENT_DESC, 0x8000 | 3, 1, true),
            (EVENT_ENABLE, 0, 16, true),
            (EVENT_DISABLE, 0, 16, false),
            (EVENT_ENABLE, 0, 0, false),
        ] {
            d.set_driver_event(&mem, flags, ev);
            assert_eq!(
                driver_wants(&area, 8, old, moved, true),
                want,
                "flags {flags} event {ev:#x} moved {moved}"
            );
        }
    }

    /// The device area says whether the device wants kicks.
    #[test]
    fn the_device_area_carries_the_kick_flag() {
        let mem = memory();
        let d = PackedDriver::new(&mem, RING, 8);
        let r = ring(&mem, &d, Position::START);
        r.set_kicks(false).unwrap();
        assert_eq!(d.device_event_flags(&mem), EVENT_DISABLE);
        r.set_kicks(true).unwrap();
        assert_eq!(d.device_event_flags(&mem), EVENT_ENABLE);
    }

    /// The ring a frontend set up in a vhost-user queue (its three
    /// addresses and base) is the one resolved, and the position taken
    /// at the end of a round is where the next one starts; a round that
    /// leaves a chain taken and unused has it taken again.
    #[test]
    fn a_ring_comes_from_its_queue_and_goes_back_to_it() {
        use virtio_queue::{Queue, QueueT};
        let mem = memory();
        let mut d = PackedDriver::new(&mem, RING, 8);
        let (desc, driver, device) = d.areas();
        let mut q = Queue::new(8).unwrap();
        q.set_size(8);
        q.set_desc_table_address(Some(desc.0 as u32), Some((desc.0 >> 32) as u32));
        q.set_avail_ring_address(Some(driver.0 as u32), Some((driver.0 >> 32) as u32));
        q.set_used_ring_address(Some(device.0 as u32), Some((device.0 >> 32) as u32));
        assert!(PackedRing::from_queue(&q, &mem).is_none(), "not ready");
        q.set_ready(true);
        q.set_next_avail(0x8000 | 6);
        // The driver is at 6 too: its next lists start there.
        let mut pos = Position::START;
        for _ in 0..6 {
            d.push(&mem, &[(0x20_000, 8, true)], 0).unwrap();
            let mut r = ring(&mem, &d, pos);
            let a = r.pop().unwrap().unwrap();
            r.put_used(a.id, 0, a.count).unwrap();
            r.publish().unwrap();
            pos = r.position();
            d.used(&mem);
        }
        for id in 0..3 {
            d.push(&mem, &[(0x20_000, 8, true)], id).unwrap();
        }
        let mut r = PackedRing::from_queue(&q, &mem).unwrap();
        assert_eq!(r.position(), Position::from_base(0x8006, 8).unwrap());
        for _ in 0..3 {
            let a = r.pop().unwrap().unwrap();
            r.put_used(a.id, 8, a.count).unwrap();
        }
        r.finish(&mut q).unwrap();
        assert_eq!(q.next_avail(), 1, "past the end: index 1, wrap 0");
        assert_eq!(d.used(&mem), vec![(0, 8), (1, 8), (2, 8)]);
        d.push(&mem, &[(0x20_000, 8, true)], 3).unwrap();
        let mut r = PackedRing::from_queue(&q, &mem).unwrap();
        assert_eq!(r.pop().unwrap().map(|a| a.id), Some(3));
        assert!(r.finish(&mut q).is_none());
        assert_eq!(q.next_avail(), 1);
    }

    /// Rings that virtio does not allow are refused: misaligned parts, a
    /// size of 0 or over 2^15, a position past the end, a ring outside
    /// memory. Sizes need not be powers of two.
    #[test]
    fn only_valid_rings_are_resolved() {
        let mem = memory();
        let ok = |desc: u64, drv: u64, dev: u64, size: u16, pos: Position| {
            PackedRing::new(
                &mem,
                GuestAddress(desc),
                GuestAddress(drv),
                GuestAddress(dev),
                size,
                pos,
            )
            .is_some()
        };
        let p = Position::START;
        assert!(ok(0x1000, 0x2000, 0x2004, 5, p));
        assert!(!ok(0x1008, 0x2000, 0x2004, 8, p));
        assert!(!ok(0x1000, 0x2002, 0x2004, 8, p));
        assert!(!ok(0x1000, 0x2000, 0x2006, 8, p));
        assert!(!ok(0x1000, 0x2000, 0x2004, 0, p));
        assert!(!ok(0x1000, 0x2000, 0x2004, 0x8001, p));
        assert!(!ok(0x3f_ff0, 0x2000, 0x2004, 2, p));
        assert!(!ok(0x1000, 0x2000, 0x2004, 8, Position { avail: 8, ..p }));
        assert_eq!(Position::from_base(0x8000, 8), Some(p));
        assert_eq!(Position::from_base(0x8008, 8), None);
        let q = Position::from_base(5, 8).unwrap();
        assert_eq!((q.used, q.used_wrap, q.base()), (5, false, 5));
    }
}
