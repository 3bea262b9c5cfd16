//! Split and packed virtqueues built in guest memory from the driver's
//! side, for the
//! unit tests and fuzz targets of the device's guest-memory layer: chains
//! of buffers with random gaps between them, indirect tables, loops,
//! addresses outside guest memory and zero lengths, exactly as a driver
//! (or an attacker) could write them.

use std::collections::HashMap;

use vhost_user_backend::{VringRwLock, VringT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion,
};

/// Descriptor flags.
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

/// A small deterministic generator (xorshift64*), so a failing case can
/// be replayed from its seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (`0` when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}

/// A descriptor as the driver writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl Desc {
    /// A device-readable buffer.
    pub fn ro(addr: GuestAddress, len: usize) -> Desc {
        Desc {
            addr: addr.raw_value(),
            len: len as u32,
            flags: 0,
            next: 0,
        }
    }

    /// A device-writable buffer.
    pub fn wo(addr: GuestAddress, len: usize) -> Desc {
        Desc {
            flags: F_WRITE,
            ..Desc::ro(addr, len)
        }
    }

    fn write(&self, mem: &GuestMemoryMmap, at: GuestAddress) {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        // Test set-up: the rings were placed inside guest memory.
        let _ = mem.write_slice(&b, at);
    }
}

/// Hands out guest buffers one after another with random gaps and
/// alignments, so nothing can rely on buffers being contiguous.
#[derive(Debug)]
pub struct Arena {
    next: u64,
    end: u64,
    rng: Rng,
}

impl Arena {
    pub fn new(start: GuestAddress, len: u64, seed: u64) -> Arena {
        Arena {
            next: start.raw_value(),
            end: start.raw_value() + len,
            rng: Rng::new(seed),
        }
    }

    /// `len` bytes after a gap of 0 to 64 bytes; `None` when the arena is
    /// used up.
    pub fn alloc(&mut self, len: usize) -> Option<GuestAddress> {
        let at = self.next + 1 + self.rng.below(64);
        let end = at.checked_add(len as u64)?;
        if end > self.end {
            return None;
        }
        self.next = end;
        Some(GuestAddress(at))
    }

    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }
}

/// The host address ranges of every region of `mem`, for
/// [`crate::uplink::fake::FakeState::guest_ranges`].
pub fn host_ranges(mem: &GuestMemoryMmap) -> Vec<(usize, usize)> {
    mem.iter()
        .filter_map(|r| {
            let p = r.get_host_address(vm_memory::MemoryRegionAddress(0)).ok()?;
            Some((p as usize, r.len() as usize))
        })
        .collect()
}

/// A split virtqueue in guest memory, seen from the driver.
#[derive(Debug)]
pub struct DriverRing {
    pub size: u16,
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
    avail_idx: u16,
    used_seen: u16,
    free: Vec<u16>,
    /// Descriptor slots of each chain in flight, by head.
    chains: HashMap<u16, Vec<u16>>,
    rng: Rng,
}

impl DriverRing {
    /// Guest bytes a ring of `size` entries takes.
    pub fn footprint(size: u16) -> u64 {
        let n = u64::from(size);
        (16 * n).next_multiple_of(64) + (6 + 2 * n).next_multiple_of(64) + 6 + 8 * n
    }

    /// Lays out a zeroed ring of `size` entries at `at` (16-byte aligned).
    pub fn new(mem: &GuestMemoryMmap, at: GuestAddress, size: u16, seed: u64) -> DriverRing {
        let n = u64::from(size);
        let desc = at;
        let avail = desc.unchecked_add((16 * n).next_multiple_of(64));
        let used = avail.unchecked_add((6 + 2 * n).next_multiple_of(64));
        let zero = vec![0u8; Self::footprint(size) as usize];
        let _ = mem.write_slice(&zero, at);
        DriverRing {
            size,
            desc,
            avail,
            used,
            avail_idx: 0,
            used_seen: 0,
            free: (0..size).collect(),
            chains: HashMap::new(),
            rng: Rng::new(seed),
        }
    }

    /// The device's view: a vring set up, ready and enabled, as the
    /// vhost-user frontend leaves it.
    pub fn vring(&self, mem: &GuestMemoryAtomic<GuestMemoryMmap>, event_idx: bool) -> VringRwLock {
        // Test set-up with valid parameters.
        #[allow(clippy::expect_used)]
        let v = VringRwLock::new(mem.clone(), self.size).expect("vring");
        v.set_queue_size(self.size);
        #[allow(clippy::expect_used)]
        v.set_queue_info(
            self.desc.raw_value(),
            self.avail.raw_value(),
            self.used.raw_value(),
        )
        .expect("ring addresses");
        v.set_queue_event_idx(event_idx);
        v.set_queue_ready(true);
        v.set_enabled(true);
        v
    }

    /// Free descriptor slots.
    pub fn free(&self) -> usize {
        self.free.len()
    }

    /// Writes descriptor `slot` as given (raw: flags and `next` unchanged).
    pub fn write_desc(&self, mem: &GuestMemoryMmap, slot: u16, d: Desc) {
        d.write(mem, self.desc.unchecked_add(16 * u64::from(slot)));
    }

    fn take_slot(&mut self) -> Option<u16> {
        if self.free.is_empty() {
            return None;
        }
        let k = self.rng.below(self.free.len() as u64) as usize;
        Some(self.free.swap_remove(k))
    }

    /// Writes `descs` as one chain in randomly chosen slots (linked with
    /// NEXT; the flags given are kept otherwise) and makes it available.
    /// `None` when too few slots are free.
    pub fn push_chain(&mut self, mem: &GuestMemoryMmap, descs: &[Desc]) -> Option<u16> {
        if descs.is_empty() || descs.len() > self.free.len() {
            return None;
        }
        let slots: Vec<u16> = (0..descs.len()).filter_map(|_| self.take_slot()).collect();
        for (k, d) in descs.iter().enumerate() {
            let mut d = *d;
            match slots.get(k + 1) {
                Some(&n) => {
                    d.flags |= F_NEXT;
                    d.next = n;
                }
                None => d.flags &= !F_NEXT,
            }
            self.write_desc(mem, slots[k], d);
        }
        let head = slots[0];
        self.chains.insert(head, slots);
        self.publish(mem, head);
        Some(head)
    }

    /// Writes `descs` as an indirect table at `table` and makes available
    /// one descriptor pointing at it.
    pub fn push_indirect(
        &mut self,
        mem: &GuestMemoryMmap,
        table: GuestAddress,
        descs: &[Desc],
    ) -> Option<u16> {
        for (k, d) in descs.iter().enumerate() {
            let mut d = *d;
            if k + 1 < descs.len() {
                d.flags |= F_NEXT;
                d.next = (k + 1) as u16;
            } else {
                d.flags &= !F_NEXT;
            }
            d.write(mem, table.unchecked_add(16 * k as u64));
        }
        let slot = self.take_slot()?;
        self.write_desc(
            mem,
            slot,
            Desc {
                addr: table.raw_value(),
                len: (16 * descs.len()) as u32,
                flags: F_INDIRECT,
                next: 0,
            },
        );
        self.chains.insert(slot, vec![slot]);
        self.publish(mem, slot);
        Some(slot)
    }

    /// Writes descriptors exactly as given into slots `0..descs.len()` of
    /// the table (no linking) and makes `head` available. For chains that
    /// loop or point anywhere.
    pub fn push_raw(&mut self, mem: &GuestMemoryMmap, descs: &[Desc], head: u16) {
        for (k, d) in descs.iter().enumerate() {
            self.write_desc(mem, k as u16, *d);
        }
        self.publish(mem, head);
    }

    /// Puts `head` on the available ring and moves the index.
    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        let _ = mem.write_obj(head.to_le(), self.avail.unchecked_add(4 + 2 * slot));
        self.avail_idx = self.avail_idx.wrapping_add(1);
        let _ = mem.write_obj(self.avail_idx.to_le(), self.avail.unchecked_add(2));
    }

    /// The entries the device added to the used ring since the last call:
    /// (id, length). Slots of chains this ring built are freed.
    pub fn used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u32, u32)> {
        let idx: u16 = mem
            .read_obj::<u16>(self.used.unchecked_add(2))
            .map(u16::from_le)
            .unwrap_or(self.used_seen);
        let mut out = Vec::new();
        while self.used_seen != idx {
            let slot = u64::from(self.used_seen % self.size);
            let at = self.used.unchecked_add(4 + 8 * slot);
            let id = mem
                .read_obj::<u32>(at)
                .map(u32::from_le)
                .unwrap_or(u32::MAX);
            let len = mem
                .read_obj::<u32>(at.unchecked_add(4))
                .map(u32::from_le)
                .unwrap_or(u32::MAX);
            if let Some(slots) = u16::try_from(id).ok().and_then(|h| self.chains.remove(&h)) {
                self.free.extend(slots);
            }
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// The ring's `used_event` (the driver asks for a notification when
    /// the used index passes it).
    pub fn set_used_event(&self, mem: &GuestMemoryMmap, v: u16) {
        let at = self.avail.unchecked_add(4 + 2 * u64::from(self.size));
        let _ = mem.write_obj(v.to_le(), at);
    }

    /// The device's `avail_event`.
    pub fn avail_event(&self, mem: &GuestMemoryMmap) -> u16 {
        let at = self.used.unchecked_add(4 + 8 * u64::from(self.size));
        mem.read_obj::<u16>(at).map(u16::from_le).unwrap_or(0)
    }

    /// The device's used-ring flags (VRING_USED_F_NO_NOTIFY is 1).
    pub fn used_flags(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj::<u16>(self.used)
            .map(u16::from_le)
            .unwrap_or(0)
    }

    /// The available index the driver has published.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }
}

/// One vnic port over guest memory with a fake uplink: the device's real
/// vhost layer driven by hand, one queue pair and a control queue.
#[allow(missing_debug_implementations)]
pub struct Harness {
    pub mem: GuestMemoryMmap,
    pub atomic: GuestMemoryAtomic<GuestMemoryMmap>,
    pub up: crate::uplink::fake::FakeUplink,
    pub nic: std::sync::Arc<crate::nic::Nic>,
    pub backend: super::VnicBackend,
    pub rx: DriverRing,
    pub tx: DriverRing,
    pub ctrl: DriverRing,
    /// RX and TX vrings of pair 0, as the worker sees them.
    pub pair: Vec<VringRwLock>,
    pub ctrl_vring: Vec<VringRwLock>,
    /// Buffers with random gaps, after the rings.
    pub arena: Arena,
}

/// The harness device's MAC address.
pub const DEVICE_MAC: vnic_protocol::wire::ethernet::Address =
    vnic_protocol::wire::ethernet::Address([0x52, 0x54, 0, 0x12, 0x34, 0x56]);

/// Where the harness puts guest memory: two regions with a hole between.
pub const REGION_A: (u64, usize) = (0x1_0000, 4 << 20);
pub const REGION_B: (u64, usize) = (0x100_0000, 1 << 20);

impl Harness {
    /// A device with `features` acked, queues of `size` entries and the
    /// given uplink offloads; `seed` drives every random choice.
    pub fn new(
        features: vnic_protocol::virtio::Features,
        size: u16,
        offloads: crate::uplink::Offloads,
        seed: u64,
    ) -> Harness {
        Harness::with_regions(features, size, offloads, seed, &[REGION_A, REGION_B])
    }

    /// [`Harness::new`] over guest memory of the given regions (address,
    /// length); the rings and the arena go into the first, which must
    /// hold three rings of `size` entries.
    pub fn with_regions(
        features: vnic_protocol::virtio::Features,
        size: u16,
        offloads: crate::uplink::Offloads,
        seed: u64,
        regions: &[(u64, usize)],
    ) -> Harness {
        use vhost_user_backend::VhostUserBackend;
        let ranges: Vec<(GuestAddress, usize)> =
            regions.iter().map(|&(a, n)| (GuestAddress(a), n)).collect();
        #[allow(clippy::expect_used)]
        let mem = GuestMemoryMmap::<()>::from_ranges(&ranges).expect("guest memory");
        let first = regions.first().copied().unwrap_or(REGION_A);
        let atomic = GuestMemoryAtomic::new(mem.clone());
        let up = crate::uplink::fake::FakeUplink::with_offloads(offloads);
        up.lock().guest_ranges = host_ranges(&mem);
        let cfg = crate::nic::DeviceConfig {
            queue_size: size,
            ..crate::nic::DeviceConfig::new(1, DEVICE_MAC)
        };
        #[allow(clippy::expect_used)]
        let nic = std::sync::Arc::new(
            crate::nic::Nic::single(cfg, Box::new(up.clone())).expect("device"),
        );
        nic.attach(0, true);
        #[allow(clippy::expect_used)]
        let backend = super::VnicBackend::new(nic.clone(), 0, atomic.clone()).expect("backend");
        backend.acked_features(features.bits());
        let event_idx = features.contains(vnic_protocol::virtio::Features::EVENT_IDX);
        backend.set_event_idx(event_idx);
        let fp = DriverRing::footprint(size).next_multiple_of(4096);
        let base = GuestAddress(first.0);
        let rx = DriverRing::new(&mem, base, size, seed ^ 1);
        let tx = DriverRing::new(&mem, base.unchecked_add(fp), size, seed ^ 2);
        let ctrl = DriverRing::new(&mem, base.unchecked_add(2 * fp), size, seed ^ 3);
        let pair = vec![rx.vring(&atomic, event_idx), tx.vring(&atomic, event_idx)];
        let ctrl_vring = vec![ctrl.vring(&atomic, event_idx)];
        let start = 3 * fp;
        let arena = Arena::new(
            base.unchecked_add(start),
            (first.1 as u64).saturating_sub(start),
            seed ^ 4,
        );
        Harness {
            mem,
            atomic,
            up,
            nic,
            backend,
            rx,
            tx,
            ctrl,
            pair,
            ctrl_vring,
            arena,
        }
    }

    /// Delivers event `ev` to worker 0 (0 RX kick, 1 TX kick, or one of
    /// the backend's own event ids).
    pub fn worker_event(&self, ev: u16) -> std::io::Result<()> {
        use vhost_user_backend::VhostUserBackend;
        self.backend
            .handle_event(ev, vmm_sys_util::epoll::EventSet::IN, &self.pair, 0)
    }

    /// Delivers event `ev` to the control-queue thread (0 is its kick).
    pub fn ctrl_event(&self, ev: u16) -> std::io::Result<()> {
        use vhost_user_backend::VhostUserBackend;
        self.backend
            .handle_event(ev, vmm_sys_util::epoll::EventSet::IN, &self.ctrl_vring, 1)
    }

    /// Delivers the worker's own pending events (work resumed after a
    /// budget, frames waiting in the backlog) until none is left, as its
    /// epoll loop would.
    pub fn settle(&self) -> std::io::Result<()> {
        for _ in 0..10_000 {
            if self.backend.take_resume(0) {
                self.worker_event(self.backend.resume_event())?;
            } else if self.pf().backlogs[0].event.read().is_ok() {
                self.worker_event(self.backend.backlog_event())?;
            } else {
                return Ok(());
            }
        }
        Err(std::io::Error::other("the worker never settles"))
    }

    /// The port the harness drives.
    pub fn pf(&self) -> &crate::nic::Port {
        self.nic.pf()
    }

    /// A buffer of `len` bytes holding `bytes` (zero-padded), with a
    /// random gap before it.
    pub fn buffer(&mut self, bytes: &[u8], len: usize) -> GuestAddress {
        #[allow(clippy::expect_used)]
        let at = self.arena.alloc(len.max(bytes.len())).expect("arena space");
        let _ = self.mem.write_slice(bytes, at);
        at
    }

    /// Reads `len` bytes of guest memory.
    pub fn read(&self, at: GuestAddress, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        let _ = self.mem.read_slice(&mut v, at);
        v
    }
}

/// Elements `(addr, len, device-writable)` with the WRITE flag for the
/// writable ones.
fn flagged(elems: &[(u64, u32, bool)]) -> Vec<(u64, u32, u16)> {
    elems
        .iter()
        .map(|&(a, l, w)| (a, l, if w { F_WRITE } else { 0 }))
        .collect()
}

/// A packed ring written from the driver's side (virtio 1.3, 2.8.13):
/// lists made available first descriptor last, used descriptors taken
/// back in ring order by buffer ID. The ring is followed by its driver
/// area and then its device area.
#[derive(Debug, Clone)]
pub struct PackedDriver {
    size: u16,
    desc: GuestAddress,
    next: u16,
    wrap: bool,
    used: u16,
    used_wrap: bool,
    in_flight: u16,
    /// Ring entries of each buffer ID in flight.
    sgs: HashMap<u16, u16>,
}

impl PackedDriver {
    /// Lays out a zeroed ring of `size` entries at `at` (16-byte aligned)
    /// with both event areas after it.
    pub fn new(mem: &GuestMemoryMmap, at: GuestAddress, size: u16) -> PackedDriver {
        let _ = mem.write_slice(&vec![0u8; 16 * usize::from(size) + 8], at);
        PackedDriver {
            size,
            desc: at,
            next: 0,
            wrap: true,
            used: 0,
            used_wrap: true,
            in_flight: 0,
            sgs: HashMap::new(),
        }
    }

    /// The ring's size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// The device's view: a vring set up as a vhost-user frontend leaves
    /// a packed one (the three areas as SET_VRING_ADDR gives them, the
    /// base at index 0 with wrap counter 1), ready and enabled.
    pub fn vring(&self, mem: &GuestMemoryAtomic<GuestMemoryMmap>, event_idx: bool) -> VringRwLock {
        let (desc, driver, device) = self.areas();
        // Test set-up with valid parameters.
        #[allow(clippy::expect_used)]
        let v = VringRwLock::new(mem.clone(), self.size).expect("vring");
        v.set_queue_size(self.size);
        #[allow(clippy::expect_used)]
        v.set_queue_info(desc.raw_value(), driver.raw_value(), device.raw_value())
            .expect("ring addresses");
        v.set_queue_next_avail(0x8000);
        v.set_queue_event_idx(event_idx);
        v.set_queue_ready(true);
        v.set_enabled(true);
        v
    }

    /// The descriptor ring, the driver area and the device area.
    pub fn areas(&self) -> (GuestAddress, GuestAddress, GuestAddress) {
        let driver = self.desc.unchecked_add(16 * u64::from(self.size));
        (self.desc, driver, driver.unchecked_add(4))
    }

    /// Makes a buffer of elements `(addr, len, device-writable)`
    /// available as buffer `id`; None when the ring has no room for it.
    pub fn push(
        &mut self,
        mem: &GuestMemoryMmap,
        elems: &[(u64, u32, bool)],
        id: u16,
    ) -> Option<()> {
        self.push_flags(mem, &flagged(elems), id)
    }

    /// [`PackedDriver::push`] with each element's flags as given (NEXT is
    /// added on all but the last, and the wrap bits on all).
    pub fn push_flags(
        &mut self,
        mem: &GuestMemoryMmap,
        elems: &[(u64, u32, u16)],
        id: u16,
    ) -> Option<()> {
        let n = u16::try_from(elems.len()).ok()?;
        if n == 0 || self.in_flight + n > self.size || self.sgs.contains_key(&id) {
            return None;
        }
        let wrap_bits = |w: bool| if w { 1u16 << 7 } else { 1u16 << 15 };
        let mut first = None;
        for (k, &(addr, len, flags)) in elems.iter().enumerate() {
            let mut f = flags | wrap_bits(self.wrap);
            if k + 1 < elems.len() {
                f |= F_NEXT;
            }
            let at = self.desc.unchecked_add(16 * u64::from(self.next));
            let _ = mem.write_obj(addr.to_le(), at);
            let _ = mem.write_obj(len.to_le(), at.unchecked_add(8));
            let _ = mem.write_obj(id.to_le(), at.unchecked_add(12));
            if k == 0 {
                first = Some((at, f));
            } else {
                let _ = mem.write_obj(f.to_le(), at.unchecked_add(14));
            }
            self.next += 1;
            if self.next == self.size {
                self.next = 0;
                self.wrap = !self.wrap;
            }
        }
        let (at, f) = first?;
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        let _ = mem.write_obj(f.to_le(), at.unchecked_add(14));
        self.in_flight += n;
        self.sgs.insert(id, n);
        Some(())
    }

    /// Writes an indirect table of elements `(addr, len, device-writable)`
    /// at `at`.
    pub fn write_table(mem: &GuestMemoryMmap, at: GuestAddress, elems: &[(u64, u32, bool)]) {
        Self::write_table_flags(mem, at, &flagged(elems));
    }

    /// Writes an indirect table with each element's flags as given.
    pub fn write_table_flags(mem: &GuestMemoryMmap, at: GuestAddress, elems: &[(u64, u32, u16)]) {
        for (k, &(addr, len, flags)) in elems.iter().enumerate() {
            let e = at.unchecked_add(16 * k as u64);
            let _ = mem.write_obj(addr.to_le(), e);
            let _ = mem.write_obj(len.to_le(), e.unchecked_add(8));
            let _ = mem.write_obj(0u16, e.unchecked_add(12));
            let _ = mem.write_obj(flags.to_le(), e.unchecked_add(14));
        }
    }

    /// The used descriptors the device has published since the last
    /// call, as (buffer ID, length), in ring order; stops at an ID not in
    /// flight.
    pub fn used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u16, u32)> {
        let mut out = Vec::new();
        loop {
            let at = self.desc.unchecked_add(16 * u64::from(self.used));
            let f = u16::from_le(mem.read_obj::<u16>(at.unchecked_add(14)).unwrap_or(0));
            let bit = |b: u16| f & b != 0;
            if bit(1 << 15) != self.used_wrap || bit(1 << 7) != self.used_wrap {
                return out;
            }
            std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
            let id = u16::from_le(mem.read_obj::<u16>(at.unchecked_add(12)).unwrap_or(0));
            let len = u32::from_le(mem.read_obj::<u32>(at.unchecked_add(8)).unwrap_or(0));
            let Some(n) = self.sgs.remove(&id) else {
                return out;
            };
            out.push((id, len));
            self.in_flight -= n;
            let j = self.used + n;
            if j >= self.size {
                self.used = j - self.size;
                self.used_wrap = !self.used_wrap;
            } else {
                self.used = j;
            }
        }
    }

    /// Sets the driver area: its flags and its offset-and-wrap word.
    pub fn set_driver_event(&self, mem: &GuestMemoryMmap, flags: u16, off_wrap: u16) {
        let (_, driver, _) = self.areas();
        let _ = mem.write_obj(off_wrap.to_le(), driver);
        let _ = mem.write_obj(flags.to_le(), driver.unchecked_add(2));
    }

    /// The flags the device last wrote into its area.
    pub fn device_event_flags(&self, mem: &GuestMemoryMmap) -> u16 {
        let (_, _, device) = self.areas();
        u16::from_le(mem.read_obj::<u16>(device.unchecked_add(2)).unwrap_or(0))
    }
}
