//! A split virtqueue (virtio 1.3, 2.7) taken a batch at a time.
//!
//! virtio-queue's `pop_descriptor_chain` reads the driver's available
//! index and looks the guest region up again for every chain, and its
//! `add_used` stores the used index for every buffer. With both sides of
//! the ring on different cores each of those is a cache line moved
//! across. [`SplitRing`] resolves the three rings to host memory once per
//! batch, reads the available index once, and publishes the used entries
//! it wrote with one store of the used index. [`Chain`] walks a chain
//! with virtio-queue's own rules (a chain ends at the queue's size in
//! descriptors, an indirect table is a whole number of descriptors and
//! holds no indirect one, a chain is under 4 GiB), so what either path
//! accepts the other does too. The queue's positions stay in
//! virtio-queue's `Queue`, which takes them back at the end of the batch
//! ([`SplitRing::finish`]).

use std::sync::atomic::Ordering;

use virtio_queue::{desc::split::Descriptor, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    VolatileSlice,
};

/// Bytes of one descriptor.
pub(super) const DESC: usize = 16;

/// Guest memory with the region of the last lookup kept: a driver's
/// buffers mostly lie in one region, and a lookup is a binary search.
pub(super) struct Regions<'m> {
    pub mem: &'m GuestMemoryMmap,
    /// The last region found: its first guest address, and all of it in
    /// host memory.
    last: Option<(u64, VolatileSlice<'m>)>,
}

impl<'m> Regions<'m> {
    pub fn new(mem: &'m GuestMemoryMmap) -> Regions<'m> {
        Regions { mem, last: None }
    }

    /// `len` bytes at `addr`, when they lie in one region of guest memory.
    /// The last region's hit is inlined into each caller; a lookup is not.
    /// A miss only updates the kept region, and the slice is cut from it
    /// after either way: the slice is built once, in registers, rather
    /// than merged from two paths through the stack, where the 16-byte
    /// load of a slice stored as two halves just before had to wait for
    /// the stores.
    #[inline(always)]
    pub fn slice(&mut self, addr: GuestAddress, len: usize) -> Option<VolatileSlice<'m>> {
        let off = match self.offset(addr, len) {
            Some(off) => off,
            None => {
                self.look_up(addr)?;
                self.offset(addr, len)?
            }
        };
        let (_, whole) = self.last?;
        // (`subslice` checks that all `len` bytes are in the region.)
        whole.subslice(off, len).ok()
    }

    /// Where `addr` lies in the kept region, if `len` bytes from it do.
    #[inline(always)]
    fn offset(&self, addr: GuestAddress, len: usize) -> Option<usize> {
        let (start, whole) = self.last?;
        let off = usize::try_from(addr.0.checked_sub(start)?).ok()?;
        (off <= whole.len() && len <= whole.len() - off).then_some(off)
    }

    /// Where guest address `addr` lies in host memory, for a prefetch
    /// hint only: the address is never read or written through.
    #[inline(always)]
    pub fn host(&mut self, addr: GuestAddress) -> Option<*const u8> {
        if let Some((start, whole)) = self.last {
            if let Some(off) = addr.0.checked_sub(start) {
                if off < whole.len() as u64 {
                    return Some(whole.ptr_guard().as_ptr().wrapping_add(off as usize));
                }
            }
        }
        self.slice(addr, 1).map(|s| s.ptr_guard().as_ptr())
    }

    /// Finds the region `addr` lies in and keeps it, for
    /// [`Regions::slice`].
    #[cold]
    #[inline(never)]
    fn look_up(&mut self, addr: GuestAddress) -> Option<()> {
        let r = self.mem.find_region(addr)?;
        let whole = r.as_volatile_slice().ok()?;
        self.last = Some((r.start_addr().0, whole));
        Some(())
    }

    /// Copies `buf` into guest memory at `addr` (across regions if need
    /// be).
    pub fn write(&mut self, buf: &[u8], addr: GuestAddress) -> Option<()> {
        match self.slice(addr, buf.len()) {
            Some(s) => {
                s.copy_from(buf);
                Some(())
            }
            None => self.mem.write_slice(buf, addr).ok(),
        }
    }

    /// Copies `buf.len()` bytes at `addr` out of guest memory (across
    /// regions if need be).
    ///
    /// Within one region the bytes are copied straight from its mapping,
    /// as vm-memory's own copy does past 8 bytes, without its layers.
    #[inline]
    pub fn read(&mut self, buf: &mut [u8], addr: GuestAddress) -> Option<()> {
        match self.slice(addr, buf.len()) {
            Some(s) if s.len() == buf.len() => {
                // SAFETY: `s` covers `buf.len()` bytes of one guest
                // region, mapped while the borrow of guest memory lives;
                // `buf` is vnicd's own and cannot overlap guest memory.
                // The driver may write those bytes meanwhile: they are
                // copied as they are, and only the copy is looked at.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        s.ptr_guard().as_ptr(),
                        buf.as_mut_ptr(),
                        buf.len(),
                    );
                }
                Some(())
            }
            Some(_) => None,
            None => self.mem.read_slice(buf, addr).ok(),
        }
    }
}

/// The three parts of a split ring in host memory. Valid while the
/// vring's lock is held (nothing can move the rings meanwhile) and the
/// memory they were resolved in is.
#[derive(Clone, Copy)]
pub(super) struct Rings<'m> {
    size: u16,
    desc: VolatileSlice<'m>,
    avail: VolatileSlice<'m>,
    used: VolatileSlice<'m>,
}

impl<'m> Rings<'m> {
    /// The rings of `q`, when it is ready and each of its rings is
    /// aligned as virtio asks and lies in one region of `mem`; None
    /// otherwise (virtio-queue's own path then takes the queue).
    pub fn new(q: &virtio_queue::Queue, mem: &'m GuestMemoryMmap) -> Option<Rings<'m>> {
        let size = q.size();
        if !q.ready() || size == 0 || !size.is_power_of_two() || q.avail_ring() == 0 {
            return None;
        }
        let (d, a, u) = (q.desc_table(), q.avail_ring(), q.used_ring());
        if d % 16 != 0 || a % 2 != 0 || u % 4 != 0 {
            return None;
        }
        let n = usize::from(size);
        // Flags, index, the ring, and used_event / avail_event after it.
        let rings = Rings {
            size,
            desc: mem.get_slice(GuestAddress(d), DESC * n).ok()?,
            avail: mem.get_slice(GuestAddress(a), 6 + 2 * n).ok()?,
            used: mem.get_slice(GuestAddress(u), 6 + 8 * n).ok()?,
        };
        // Aligned in host memory too (a region's mapping could start at
        // any offset), so that each field is one aligned access.
        let at = |s: &VolatileSlice<'_>| s.ptr_guard().as_ptr() as usize;
        if at(&rings.desc) % 16 != 0 || at(&rings.avail) % 2 != 0 || at(&rings.used) % 4 != 0 {
            return None;
        }
        Some(rings)
    }

    /// The available ring's 16-bit field at byte `off`.
    #[inline(always)]
    // (The alignment the cast needs is checked: see the SAFETY note.)
    #[allow(clippy::cast_ptr_alignment)]
    fn avail_u16(&self, off: usize) -> Option<u16> {
        if off + 2 > self.avail.len() {
            return None;
        }
        let p = self.avail.ptr_guard().as_ptr().wrapping_add(off);
        // SAFETY: the two bytes at `p` lie within the available ring's
        // slice (checked above), which stays mapped while the borrow of
        // guest memory it came from lives; `p` is 2-aligned (the ring's
        // host address is, `Rings::new`, and every field offset is even).
        // The driver may write the field at any time: the read is
        // volatile and its value is only ever checked, never trusted.
        Some(u16::from_le(unsafe {
            std::ptr::read_volatile(p.cast::<u16>())
        }))
    }

    /// The used ring's 32-bit field at byte `off` set to `v`.
    #[inline(always)]
    // (The alignment the cast needs is checked: see the SAFETY note.)
    #[allow(clippy::cast_ptr_alignment)]
    fn set_used_u32(&self, off: usize, v: u32) -> Option<()> {
        if off + 4 > self.used.len() {
            return None;
        }
        let p = self.used.ptr_guard_mut().as_ptr().wrapping_add(off);
        // SAFETY: the four bytes at `p` lie within the used ring's slice
        // (checked above), mapped writable while the borrow of guest
        // memory lives; `p` is 4-aligned (the ring's host address is,
        // and so is every entry's offset). The driver only reads it.
        unsafe { std::ptr::write_volatile(p.cast::<u32>(), v.to_le()) };
        Some(())
    }

    /// The queue's size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// The ring slot of position `pos`: the size is a power of two
    /// ([`Rings::new`]), so a mask rather than a division.
    #[inline(always)]
    fn slot(&self, pos: u16) -> usize {
        usize::from(pos & (self.size - 1))
    }

    /// The driver's available index.
    pub fn avail_idx(&self) -> Option<u16> {
        Some(u16::from_le(
            self.avail.load::<u16>(2, Ordering::Acquire).ok()?,
        ))
    }

    /// The head the driver put at available position `pos`. The ring may
    /// name any 16-bit value: a head past the queue's end is returned as
    /// it is, for the caller to count and pass over.
    pub fn head(&self, pos: u16) -> Option<u16> {
        self.avail_u16(4 + 2 * self.slot(pos))
    }

    /// Asks the CPU to bring in the first bytes of the buffers of the `n`
    /// chains available from position `from` on (and the descriptor
    /// tables of indirect ones) while the device works on the ones
    /// before: the driver wrote them on another core, and each first
    /// touch is a miss. Nothing is popped.
    ///
    /// Each chain's head descriptor, read for it, is kept in `kept`: a
    /// chain made available is the device's until it is used, so the
    /// descriptor read now is the one the driver offered, and taking the
    /// chain later need not read it again (the driver may meanwhile have
    /// rewritten its neighbours in the same cache line, reposting their
    /// buffers on another core). It is checked where it is used, as a
    /// descriptor read then would be.
    pub fn prefetch(
        &self,
        from: u16,
        n: u16,
        regions: &mut Regions<'m>,
        write: bool,
        kept: &mut Kept,
    ) {
        let write = write && has_prefetchw();
        for j in 0..n.min(self.size) {
            let pos = from.wrapping_add(j);
            let Some(head) = self.head(pos) else {
                return;
            };
            let d = read_desc(&self.desc, head);
            kept.put(pos, head, d);
            if let Some(d) = d {
                prefetch_buffer(&d, regions, write);
            }
        }
    }

    /// [`Rings::prefetch`] for chains whose heads were read already.
    #[inline]
    pub fn prefetch_heads(
        &self,
        heads: impl Iterator<Item = u16>,
        regions: &mut Regions<'m>,
        write: bool,
    ) {
        let write = write && has_prefetchw();
        for head in heads {
            if let Some(d) = read_desc(&self.desc, head) {
                prefetch_buffer(&d, regions, write);
            }
        }
    }

    /// Asks the CPU to bring in, for writing, the used ring's lines that
    /// entries `pos` to `pos + n` fall in: the driver reads them on
    /// another core, so the device's first store into each line waits
    /// for it to come back otherwise. A hint only.
    pub fn prefetch_used(&self, pos: u16, n: u16) {
        let base = self.used.ptr_guard().as_ptr();
        let n = n.min(self.size);
        let mut j = 0;
        while j < n {
            prefetch(
                base.wrapping_add(4 + 8 * self.slot(pos.wrapping_add(j))),
                true,
            );
            j += (CACHE_LINE / 8) as u16;
        }
        if n > 0 {
            let last = pos.wrapping_add(n - 1);
            prefetch(base.wrapping_add(4 + 8 * self.slot(last)), true);
        }
    }

    /// Asks the CPU to bring in the descriptors of the `n` chains
    /// available from position `from` on, without waiting for them (only
    /// the available ring is read), so that a later [`Rings::prefetch`]
    /// of their buffers finds them.
    pub fn prefetch_descs(&self, from: u16, n: u16) {
        let base = self.desc.ptr_guard().as_ptr();
        for j in 0..n.min(self.size) {
            let Some(head) = self.head(from.wrapping_add(j)) else {
                return;
            };
            if head < self.size {
                prefetch(base.wrapping_add(DESC * usize::from(head)), false);
            }
        }
    }

    /// The chain starting at descriptor `head` (below the queue's size).
    pub fn chain<'r>(&'r self, head: u16, mem: &'m GuestMemoryMmap) -> Chain<'r, 'm> {
        Chain {
            ring: &self.desc,
            mem,
            table: None,
            size: self.size,
            next: head,
            ttl: self.size,
            yielded: 0,
        }
    }

    /// Descriptor `head` (below the queue's size) when it is a chain by
    /// itself: it names no next descriptor and no indirect table, so the
    /// walk [`Rings::chain`] makes would yield it alone.
    #[inline(always)]
    pub fn single(&self, head: u16) -> Option<Descriptor> {
        read_desc(&self.desc, head).filter(alone)
    }

    /// Writes the used entry at used position `pos` (not yet visible to
    /// the driver).
    pub fn put_used(&self, pos: u16, head: u16, len: u32) -> Option<()> {
        let at = 4 + 8 * self.slot(pos);
        self.set_used_u32(at, u32::from(head))?;
        self.set_used_u32(at + 4, len)
    }

    /// Makes the used entries before `idx` visible to the driver: one
    /// store of the used index, after them.
    pub fn publish(&self, idx: u16) -> Option<()> {
        self.used.store(idx.to_le(), 2, Ordering::Release).ok()
    }
}

/// A split ring taken a batch at a time, with the device's positions.
pub(super) struct SplitRing<'m> {
    rings: Rings<'m>,
    next_avail: u16,
    next_used: u16,
    /// Used entries written since the last [`SplitRing::publish`].
    unpublished: u16,
    /// The heads of the batch at hand ([`SplitRing::prefetch`]).
    heads: Heads,
}

/// Chains taken off a ring at a time (a driver's burst): their heads
/// copied out together, their buffers prefetched.
pub(super) const BATCH: u16 = 32;

/// Heads copied out of an available ring together: the driver writes the
/// entries next to them (new chains after them, refills just behind)
/// into the same cache line while the device works, so reading one entry
/// per chain would fetch that line again and again.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Heads {
    heads: [u16; BATCH as usize],
    /// The available position of `heads[0]`.
    base: u16,
    len: u16,
}

impl Heads {
    /// The head at available position `pos`, if it was copied.
    pub fn get(&self, pos: u16) -> Option<u16> {
        let k = pos.wrapping_sub(self.base);
        self.heads
            .get(usize::from(k))
            .copied()
            .filter(|_| k < self.len)
    }

    /// The heads copied.
    pub fn filled(&self) -> &[u16] {
        &self.heads[..usize::from(self.len).min(self.heads.len())]
    }

    /// Copies the heads at the `n` positions from `pos` on (at most
    /// [`BATCH`], all known available) out of `rings`.
    pub fn fill(&mut self, rings: &Rings<'_>, pos: u16, n: u16) {
        self.base = pos;
        self.len = 0;
        for (j, h) in self.heads.iter_mut().take(usize::from(n)).enumerate() {
            let Some(head) = rings.head(pos.wrapping_add(j as u16)) else {
                break;
            };
            *h = head;
            self.len += 1;
        }
    }
}

impl<'m> SplitRing<'m> {
    /// See [`Rings::new`].
    pub fn new(q: &virtio_queue::Queue, mem: &'m GuestMemoryMmap) -> Option<SplitRing<'m>> {
        Some(SplitRing {
            rings: Rings::new(q, mem)?,
            next_avail: q.next_avail(),
            next_used: q.next_used(),
            unpublished: 0,
            heads: Heads::default(),
        })
    }

    /// The queue's size.
    pub fn size(&self) -> u16 {
        self.rings.size
    }

    /// How many chains the driver has made available past the device's
    /// position; None when its index is more than a queue's worth ahead
    /// (a broken driver: nothing is taken) or cannot be read.
    pub fn pending(&self) -> Option<u16> {
        let n = self.rings.avail_idx()?.wrapping_sub(self.next_avail);
        (n <= self.rings.size).then_some(n)
    }

    /// Takes the next available head (the caller knows from
    /// [`SplitRing::pending`] that there is one); see [`Rings::head`].
    pub fn pop(&mut self) -> Option<u16> {
        let pos = self.next_avail;
        let head = self.heads.get(pos).or_else(|| self.rings.head(pos))?;
        self.next_avail = pos.wrapping_add(1);
        Some(head)
    }

    /// Copies the heads of the next `n` chains (at most [`BATCH`], known
    /// available) out of the available ring in one go, and
    /// [`Rings::prefetch`]es their buffers.
    pub fn prefetch(&mut self, n: u16, regions: &mut Regions<'m>) {
        let n = n.min(BATCH);
        self.heads.fill(&self.rings, self.next_avail, n);
        let heads = self.heads.filled().iter().copied();
        self.rings.prefetch_heads(heads, regions, false);
    }

    /// The chain starting at descriptor `head` (below the queue's size).
    pub fn chain<'r>(&'r self, head: u16, mem: &'m GuestMemoryMmap) -> Chain<'r, 'm> {
        self.rings.chain(head, mem)
    }

    /// See [`Rings::single`].
    #[inline(always)]
    pub fn single(&self, head: u16) -> Option<Descriptor> {
        self.rings.single(head)
    }

    /// Writes a used entry (not yet visible to the driver).
    pub fn put_used(&mut self, head: u16, len: u32) -> Option<()> {
        self.rings.put_used(self.next_used, head, len)?;
        self.next_used = self.next_used.wrapping_add(1);
        self.unpublished = self.unpublished.wrapping_add(1);
        Some(())
    }

    /// Makes the used entries written so far visible to the driver.
    pub fn publish(&mut self) -> Option<()> {
        if self.unpublished == 0 {
            return Some(());
        }
        self.rings.publish(self.next_used)?;
        self.unpublished = 0;
        Some(())
    }

    /// Publishes what is left and hands the positions back to `q`.
    pub fn finish(mut self, q: &mut virtio_queue::Queue) -> Option<()> {
        let r = self.publish();
        q.set_next_avail(self.next_avail);
        q.set_next_used(self.next_used);
        r
    }
}

const CACHE_LINE: usize = 64;

/// Whether a head descriptor is a whole chain: it names no next one and
/// no indirect table.
pub(super) fn alone(d: &Descriptor) -> bool {
    !d.has_next() && !d.refers_to_indirect_table()
}

/// Prefetches the first bytes of the buffer `d` names (up to two cache
/// lines), `write` as [`prefetch_as`] takes it.
#[inline(always)]
pub(super) fn prefetch_buffer(d: &Descriptor, regions: &mut Regions<'_>, write: bool) {
    let len = (d.len() as usize).clamp(1, 2 * CACHE_LINE);
    if let Some(p) = regions.host(d.addr()) {
        prefetch_as(p, write);
        if (p as usize % CACHE_LINE) + len > CACHE_LINE {
            prefetch_as(p.wrapping_add(CACHE_LINE), write);
        }
    }
}

/// Positions a [`Kept`] covers: the batch at hand and the one prefetched
/// ahead of it.
const KEPT: usize = 2 * BATCH as usize;

/// Heads and their descriptors read by [`Rings::prefetch`], by
/// available position. An available entry is the device's once the
/// driver's index covers it, until the device uses it, so what was read
/// a batch ahead is still what the driver offered. A head whose
/// descriptor lies past the table is kept without one.
#[derive(Debug, Clone, Copy)]
pub(super) struct Kept {
    slots: [Option<(u16, u16, Option<Descriptor>)>; KEPT],
}

impl Default for Kept {
    fn default() -> Kept {
        Kept {
            slots: [None; KEPT],
        }
    }
}

impl Kept {
    fn put(&mut self, pos: u16, head: u16, d: Option<Descriptor>) {
        self.slots[usize::from(pos) % KEPT] = Some((pos, head, d));
    }

    /// The head kept for available position `pos`; None when another
    /// position was kept in its slot since, or none.
    #[inline(always)]
    pub fn head(&self, pos: u16) -> Option<u16> {
        match self.slots[usize::from(pos) % KEPT] {
            Some((p, h, _)) if p == pos => Some(h),
            _ => None,
        }
    }

    /// The descriptor kept for chain `head` at available position `pos`;
    /// None when another was kept there since, or none.
    #[inline(always)]
    pub fn get(&self, pos: u16, head: u16) -> Option<Descriptor> {
        match self.slots[usize::from(pos) % KEPT] {
            Some((p, h, d)) if p == pos && h == head => d,
            _ => None,
        }
    }
}

/// A prefetch hint for the cache line at `p` (any address: a prefetch
/// never faults): to read it, or with `write` to own it (PREFETCHW where
/// the CPU has it), so that the device's stores into a buffer the driver
/// last touched on another core do not each wait for the line.
#[inline(always)]
fn prefetch(p: *const u8, write: bool) {
    prefetch_as(p, write && has_prefetchw());
}

/// [`prefetch`] with `owned` known to be PREFETCHW, on a CPU that has it.
#[inline(always)]
fn prefetch_as(p: *const u8, owned: bool) {
    #[cfg(target_arch = "x86_64")]
    {
        if owned {
            // SAFETY: PREFETCHW only hints the cache: it reads no memory
            // into a register, writes none and never faults, whatever the
            // address; the CPU was seen to have it.
            unsafe {
                std::arch::asm!(
                    "prefetchw [{0}]",
                    in(reg) p,
                    options(nostack, readonly, preserves_flags)
                );
            }
            return;
        }
        // SAFETY: PREFETCHT0 only hints the cache; it neither reads memory
        // into a register nor faults, whatever the address.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, owned);
}

/// Whether the CPU has PREFETCHW (asked once).
#[cfg(target_arch = "x86_64")]
pub(super) fn has_prefetchw() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        use std::arch::x86_64::__cpuid;
        // CPUID 0x8000_0001, ECX bit 8: PREFETCHW (3DNowPrefetch).
        __cpuid(0x8000_0000).eax >= 0x8000_0001 && __cpuid(0x8000_0001).ecx & (1 << 8) != 0
    })
}

/// No PREFETCHW elsewhere.
#[cfg(not(target_arch = "x86_64"))]
pub(super) fn has_prefetchw() -> bool {
    false
}

/// Descriptor `i` of a ring's descriptor table `table` (16-aligned in
/// host memory, [`Rings::new`]): two 8-byte loads.
#[inline(always)]
fn read_desc(table: &VolatileSlice<'_>, i: u16) -> Option<Descriptor> {
    let (addr, hi) = read_raw(table, i)?;
    Some(Descriptor::new(
        addr,
        hi as u32,
        (hi >> 32) as u16,
        (hi >> 48) as u16,
    ))
}

/// The 16 bytes of entry `i` of a descriptor ring or table `table`
/// (16-aligned in host memory), as its two little-endian 8-byte halves:
/// the address, then the length in the low 32 bits and the two 16-bit
/// fields after it (a split ring's flags and next, a packed ring's
/// buffer ID and flags).
#[inline(always)]
// (The alignment the cast needs is checked: see the SAFETY note.)
#[allow(clippy::cast_ptr_alignment)]
pub(super) fn read_raw(table: &VolatileSlice<'_>, i: u16) -> Option<(u64, u64)> {
    let off = DESC * usize::from(i);
    if off + DESC > table.len() {
        return None;
    }
    let p = table.ptr_guard().as_ptr().wrapping_add(off).cast::<u64>();
    // SAFETY: the 16 bytes at `p` lie within the table's slice (checked
    // above), which stays mapped while the borrow of guest memory it came
    // from lives, and `p` is 8-aligned (every caller's table is 16-aligned
    // in host memory, and so is `off`). The driver may write them at any
    // time: the loads are volatile, and what they return is checked by
    // every user.
    let (lo, hi) = unsafe {
        (
            std::ptr::read_volatile(p),
            std::ptr::read_volatile(p.add(1)),
        )
    };
    Some((u64::from_le(lo), u64::from_le(hi)))
}

/// The descriptors of one chain, in order, as virtio-queue's
/// `DescriptorChain` yields them.
pub(super) struct Chain<'r, 'm> {
    ring: &'r VolatileSlice<'m>,
    mem: &'m GuestMemoryMmap,
    /// The indirect table being walked: its address, and the table in host
    /// memory when it lies in one region.
    table: Option<(GuestAddress, Option<VolatileSlice<'m>>)>,
    size: u16,
    next: u16,
    ttl: u16,
    yielded: u32,
}

impl Chain<'_, '_> {
    #[inline(always)]
    fn read(&self, i: u16) -> Option<Descriptor> {
        let off = DESC * usize::from(i);
        match &self.table {
            None => read_desc(self.ring, i),
            Some((_, Some(t))) => t.read_obj::<Descriptor>(off).ok(),
            Some((addr, None)) => self
                .mem
                .read_obj::<Descriptor>(addr.checked_add(off as u64)?)
                .ok(),
        }
    }

    /// Moves the walk into the indirect table `d` names; false when it
    /// may not be followed: inside an indirect table already, or not a
    /// whole number of descriptors (virtio 1.3, 2.7.5.3.1).
    #[cold]
    fn enter_table(&mut self, d: &Descriptor) -> bool {
        if self.table.is_some() || d.len() % DESC as u32 != 0 {
            return false;
        }
        let Ok(n) = u16::try_from(d.len() / DESC as u32) else {
            return false;
        };
        let host = self.mem.get_slice(d.addr(), d.len() as usize).ok();
        self.table = Some((d.addr(), host));
        self.size = n;
        self.next = 0;
        self.ttl = n;
        true
    }
}

impl Iterator for Chain<'_, '_> {
    type Item = Descriptor;

    // Inlined into each walk: a frame's chain is mostly one or two
    // descriptors, and the call cost as much as the walk.
    #[inline(always)]
    fn next(&mut self) -> Option<Descriptor> {
        loop {
            if self.ttl == 0 || self.next >= self.size {
                return None;
            }
            let d = self.read(self.next)?;
            if d.refers_to_indirect_table() {
                if !self.enter_table(&d) {
                    return None;
                }
                continue;
            }
            // A chain is under 4 GiB (virtio 1.3, 2.7.5.2).
            self.yielded = self.yielded.checked_add(d.len())?;
            if d.has_next() {
                self.next = d.next();
                self.ttl -= 1;
            } else {
                self.ttl = 0;
            }
            return Some(d);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use virtio_queue::{desc::RawDescriptor, mock::MockSplitQueue, Queue, QueueOwnedT};
    use vm_memory::GuestMemoryMmap;

    use super::*;

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const F_INDIRECT: u16 = 4;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10_000),
            (GuestAddress(0x20_000), 0x1000),
        ])
        .unwrap()
    }

    /// What virtio-queue's own iterator yields for every head, and what
    /// [`Chain`] does: the same descriptors, or the same early end.
    fn same_as_virtio_queue(mem: &GuestMemoryMmap, q: &mut Queue, heads: u16) {
        let ring = SplitRing::new(q, mem).unwrap();
        assert_eq!(ring.pending(), Some(heads));
        let mut theirs = Vec::new();
        for c in q.iter(mem).unwrap() {
            theirs.push((c.head_index(), c.collect::<Vec<_>>()));
        }
        let mut ring = ring;
        for (head, descs) in theirs {
            assert_eq!(ring.pop(), Some(head));
            // A head that is its own chain, and only such, is `single`,
            // and the same descriptor.
            let at = GuestAddress(q.desc_table() + 16 * u64::from(head));
            let first: Descriptor = mem.read_obj(at).unwrap();
            let alone = descs.len() == 1 && !first.refers_to_indirect_table();
            let single = ring.single(head);
            assert_eq!(single.is_some(), alone, "head {head}");
            if let Some(d) = single {
                assert_eq!(
                    (d.addr(), d.len(), d.flags()),
                    (descs[0].addr(), descs[0].len(), descs[0].flags())
                );
            }
            let ours: Vec<Descriptor> = ring.chain(head, mem).collect();
            assert_eq!(ours.len(), descs.len(), "head {head}");
            for (a, b) in ours.iter().zip(&descs) {
                assert_eq!(
                    (a.addr(), a.len(), a.flags(), a.next()),
                    (b.addr(), b.len(), b.flags(), b.next())
                );
            }
        }
    }

    fn raw(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    #[test]
    fn chains_walk_as_virtio_queue_walks_them() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        // An indirect table of three at 0x8000.
        let table = [
            Descriptor::new(0x9000, 100, F_NEXT, 1),
            Descriptor::new(0x9100, 200, F_NEXT, 2),
            Descriptor::new(0x9200, 300, 0, 0),
        ];
        for (i, d) in table.iter().enumerate() {
            mem.write_obj(*d, GuestAddress(0x8000 + 16 * i as u64))
                .unwrap();
        }
        // Heads 0 (two direct), 2 (indirect), 3 (a table that is not a
        // whole number of descriptors), 4 (a table outside guest memory),
        // 5 and 6 (one descriptor each) and 7 (a loop, ended at the
        // queue's size).
        let descs = [
            raw(0x4000, 12, F_NEXT, 1),
            raw(0x4100, 64, 0, 0),
            raw(0x8000, 48, F_INDIRECT, 0),
            raw(0x8000, 40, F_INDIRECT, 0),
            raw(0x1f_f000, 16, F_INDIRECT, 0),
            raw(0x6000, 64, 0, 0),
            raw(0x6100, 64, F_WRITE, 0),
            raw(0x5000, 10, F_NEXT | F_WRITE, 8),
            raw(0x5100, 10, F_NEXT, 7),
        ];
        vq.build_multiple_desc_chains(&descs).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let heads = vq.avail().idx().load();
        same_as_virtio_queue(&mem, &mut q, heads);
    }

    #[test]
    fn used_entries_are_published_with_one_index_store() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.build_multiple_desc_chains(&[raw(0x4000, 64, 0, 0), raw(0x4100, 64, 0, 0)])
            .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut ring = SplitRing::new(&q, &mem).unwrap();
        assert_eq!(ring.pending(), Some(2));
        let a = ring.pop().unwrap();
        let b = ring.pop().unwrap();
        ring.put_used(a, 0).unwrap();
        ring.put_used(b, 7).unwrap();
        assert_eq!(vq.used().idx().load(), 0, "nothing visible before publish");
        ring.finish(&mut q).unwrap();
        assert_eq!(vq.used().idx().load(), 2);
        assert_eq!((q.next_avail(), q.next_used()), (2, 2));
        let e = vq.used().ring().ref_at(1).unwrap().load();
        assert_eq!((e.id(), e.len()), (u32::from(b), 7));
    }

    #[test]
    fn an_index_more_than_a_queue_ahead_takes_nothing() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let q: Queue = vq.create_queue().unwrap();
        vq.avail().idx().store(17);
        assert_eq!(SplitRing::new(&q, &mem).unwrap().pending(), None);
    }

    #[test]
    fn rings_misaligned_in_host_memory_are_left_to_virtio_queue() {
        // A region that starts 8 bytes past a page in guest memory: its
        // mapping starts on a page, so a 16-aligned guest address is
        // 8 bytes off in host memory.
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0x1008), 0x10_000)]).unwrap();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0x2000), 16);
        let q: Queue = vq.create_queue().unwrap();
        assert_eq!(q.desc_table() % 16, 0);
        assert!(Rings::new(&q, &mem).is_none());
        // Aligned in both, it is taken.
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0x1000), 0x10_000)]).unwrap();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0x2000), 16);
        let q: Queue = vq.create_queue().unwrap();
        assert!(Rings::new(&q, &mem).is_some());
    }

    #[test]
    fn rings_outside_memory_are_left_to_virtio_queue() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(SplitRing::new(&q, &mem).is_some());
        q.set_desc_table_address(Some(0x1f_0000), None);
        assert!(SplitRing::new(&q, &mem).is_none());
    }

    /// A slice comes out of the region it lies in whichever region was
    /// kept before, and none comes out for bytes that cross a region's
    /// end or lie outside guest memory; the host address hint agrees.
    #[test]
    fn regions_cut_slices_from_the_region_they_lie_in() {
        let mem = memory();
        let mut r = Regions::new(&mem);
        let host = |m: &GuestMemoryMmap, a: u64| m.get_host_address(GuestAddress(a)).unwrap();
        for &(addr, len, ok) in &[
            (0x100u64, 64usize, true),
            (0x20_010, 16, true),
            (0xfff0, 16, true),
            (0xfff0, 17, false),
            (0x20_000, 0x1000, true),
            (0x20_fff, 2, false),
            (0x10_000, 1, false),
            (0x0, 1, true),
            (0x21_000, 1, false),
            (u64::MAX, 1, false),
        ] {
            let got = r.slice(GuestAddress(addr), len);
            assert_eq!(got.is_some(), ok, "{addr:#x}+{len}");
            if let Some(s) = got {
                assert_eq!(s.len(), len);
                assert_eq!(s.ptr_guard().as_ptr(), host(&mem, addr));
                assert_eq!(
                    r.host(GuestAddress(addr)),
                    Some(host(&mem, addr).cast_const())
                );
            }
        }
    }

    /// A kept descriptor answers only for its own position and head, and
    /// a later position in the same slot replaces it.
    #[test]
    fn kept_descriptors_answer_for_their_position_and_head_only() {
        let mut k = Kept::default();
        let d = |a: u64| Descriptor::new(a, 64, F_WRITE, 0);
        assert!(k.get(5, 1).is_none());
        assert_eq!(k.head(5), None);
        k.put(5, 1, Some(d(0x100)));
        assert_eq!(k.get(5, 1).map(|x| x.addr().0), Some(0x100));
        assert_eq!(k.head(5), Some(1));
        assert!(k.get(5, 2).is_none());
        assert!(k.get(5 + KEPT as u16, 1).is_none());
        assert_eq!(k.head(5 + KEPT as u16), None);
        k.put(5u16.wrapping_add(KEPT as u16), 1, Some(d(0x200)));
        assert!(k.get(5, 1).is_none());
        assert_eq!(k.head(5), None);
        assert_eq!(k.get(5 + KEPT as u16, 1).map(|x| x.addr().0), Some(0x200));
        k.put(u16::MAX, 9, Some(d(0x300)));
        assert_eq!(k.get(u16::MAX, 9).map(|x| x.addr().0), Some(0x300));
        // A head past the table is kept, with no descriptor.
        k.put(7, 4000, None);
        assert_eq!(k.head(7), Some(4000));
        assert!(k.get(7, 4000).is_none());
        assert!(alone(&d(1)));
        assert!(!alone(&Descriptor::new(1, 64, F_WRITE | F_NEXT, 2)));
        assert!(!alone(&Descriptor::new(1, 64, F_INDIRECT, 0)));
    }

    /// A read within a region copies exactly its bytes; one that runs
    /// past guest memory reads nothing.
    #[test]
    fn regions_read_the_bytes_written() {
        let mem = memory();
        let bytes: Vec<u8> = (0..300u32).map(|i| (i * 7 + 1) as u8).collect();
        mem.write_slice(&bytes, GuestAddress(0x20_010)).unwrap();
        mem.write_slice(&bytes[..16], GuestAddress(0xfff0)).unwrap();
        let mut r = Regions::new(&mem);
        for len in [1usize, 8, 9, 76, 300] {
            let mut out = vec![0u8; len];
            assert_eq!(r.read(&mut out, GuestAddress(0x20_010)), Some(()));
            assert_eq!(out, bytes[..len], "{len}");
        }
        let mut out = [0u8; 16];
        assert_eq!(r.read(&mut out, GuestAddress(0xfff0)), Some(()));
        assert_eq!(out[..], bytes[..16]);
        assert_eq!(r.read(&mut [0u8; 17], GuestAddress(0xfff0)), None);
        assert_eq!(r.read(&mut [0u8; 4], GuestAddress(0x20_ffe)), None);
    }
}
