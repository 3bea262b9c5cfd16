//! The driver side of a split virtqueue (virtio 1.3, 2.7).

use std::sync::atomic::{fence, Ordering};

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use crate::{mem::DmaMemory, QueueError, Result};

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;
const USED_F_NO_NOTIFY: u16 = 1;
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// One buffer of a chain: guest address, length, device-writable or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buf {
    pub addr: GuestAddress,
    pub len: u32,
    pub writable: bool,
}

/// A descriptor as written to the table, for [`SplitQueue::add_raw`].
#[cfg(any(test, feature = "test-util"))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawDesc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

pub const F_NEXT: u16 = DESC_F_NEXT;
pub const F_WRITE: u16 = DESC_F_WRITE;
pub const F_INDIRECT: u16 = DESC_F_INDIRECT;

/// A split virtqueue: descriptor table, available and used rings.
#[derive(Debug)]
pub struct SplitQueue {
    pub size: u16,
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
    free: Vec<u16>,
    /// Descriptors of each chain in flight, by head.
    chains: Vec<Vec<u16>>,
    avail_idx: u16,
    last_used: u16,
    /// VIRTIO_F_EVENT_IDX was negotiated.
    event_idx: bool,
    /// `avail_idx` when the device was last notified.
    kicked_idx: u16,
}

impl SplitQueue {
    /// Lays out a queue of `size` entries in `mem`.
    pub fn new(mem: &mut DmaMemory, size: u16) -> Result<SplitQueue> {
        if !size.is_power_of_two() || size > 32768 {
            return Err(QueueError::Size(size).into());
        }
        let n = usize::from(size);
        let desc = mem.alloc(16 * n, 16)?;
        let avail = mem.alloc(6 + 2 * n, 2)?;
        // Both rings end with the EVENT_IDX field (used_event, avail_event).
        let used = mem.alloc(6 + 8 * n, 4)?;
        Ok(SplitQueue {
            size,
            desc,
            avail,
            used,
            free: (0..size).rev().collect(),
            chains: vec![Vec::new(); n],
            avail_idx: 0,
            last_used: 0,
            event_idx: false,
            kicked_idx: 0,
        })
    }

    /// Free descriptors.
    pub fn free(&self) -> usize {
        self.free.len()
    }

    fn off(a: GuestAddress, by: usize) -> GuestAddress {
        a.unchecked_add(by as u64)
    }

    /// Writes descriptor `at` of a table.
    fn write_desc(
        mem: &GuestMemoryMmap,
        at: GuestAddress,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Result<()> {
        mem.write_obj(addr.to_le(), at)?;
        mem.write_obj(len.to_le(), Self::off(at, 8))?;
        mem.write_obj(flags.to_le(), Self::off(at, 12))?;
        mem.write_obj(next.to_le(), Self::off(at, 14))?;
        Ok(())
    }

    fn flags_of(b: &Buf, more: bool) -> u16 {
        let w = if b.writable { DESC_F_WRITE } else { 0 };
        if more {
            w | DESC_F_NEXT
        } else {
            w
        }
    }

    /// Makes a chain of `bufs` available; returns its head.
    pub fn add(&mut self, mem: &GuestMemoryMmap, bufs: &[Buf]) -> Result<u16> {
        if bufs.is_empty() || bufs.len() > self.free.len() {
            return Err(QueueError::NoDescriptors.into());
        }
        let ids: Vec<u16> = (0..bufs.len()).filter_map(|_| self.free.pop()).collect();
        for (k, (b, &id)) in bufs.iter().zip(&ids).enumerate() {
            let next = ids.get(k + 1).copied().unwrap_or(0);
            let at = Self::off(self.desc, 16 * usize::from(id));
            let flags = Self::flags_of(b, k + 1 < ids.len());
            Self::write_desc(mem, at, b.addr.raw_value(), b.len, flags, next)?;
        }
        self.publish(mem, ids)
    }

    /// Makes `bufs` available as one indirect descriptor (VIRTIO_F_INDIRECT_DESC
    /// negotiated): their table is written at `table`, which must hold
    /// 16 bytes per buffer and stay untouched until the chain comes back.
    /// Takes one ring descriptor whatever the chain's length.
    pub fn add_indirect(
        &mut self,
        mem: &GuestMemoryMmap,
        table: GuestAddress,
        bufs: &[Buf],
    ) -> Result<u16> {
        if bufs.is_empty() || bufs.len() > usize::from(self.size) {
            return Err(QueueError::IndirectLen(bufs.len()).into());
        }
        let id = *self.free.last().ok_or(QueueError::NoDescriptors)?;
        for (k, b) in bufs.iter().enumerate() {
            let at = Self::off(table, 16 * k);
            let flags = Self::flags_of(b, k + 1 < bufs.len());
            Self::write_desc(mem, at, b.addr.raw_value(), b.len, flags, k as u16 + 1)?;
        }
        let at = Self::off(self.desc, 16 * usize::from(id));
        let len = 16 * bufs.len() as u32;
        Self::write_desc(mem, at, table.raw_value(), len, DESC_F_INDIRECT, 0)?;
        self.free.pop();
        self.publish(mem, vec![id])
    }

    /// Publishes a chain written exactly as given, for testing a device
    /// against bad input: `next` of each entry is an index into `descs`
    /// (so chains may loop), and the flags are used as they are.
    #[cfg(any(test, feature = "test-util"))]
    pub fn add_raw(&mut self, mem: &GuestMemoryMmap, descs: &[RawDesc]) -> Result<u16> {
        if descs.is_empty() || descs.len() > self.free.len() {
            return Err(QueueError::NoDescriptors.into());
        }
        let ids: Vec<u16> = (0..descs.len()).filter_map(|_| self.free.pop()).collect();
        for (d, &id) in descs.iter().zip(&ids) {
            let next = ids.get(usize::from(d.next)).copied().unwrap_or(d.next);
            let at = Self::off(self.desc, 16 * usize::from(id));
            Self::write_desc(mem, at, d.addr, d.len, d.flags, next)?;
        }
        self.publish(mem, ids)
    }

    /// Puts a written chain on the available ring.
    fn publish(&mut self, mem: &GuestMemoryMmap, ids: Vec<u16>) -> Result<u16> {
        let head = ids[0];
        let slot = usize::from(self.avail_idx % self.size);
        mem.write_obj(head.to_le(), Self::off(self.avail, 4 + 2 * slot))?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // The descriptors and ring entry must be visible before the index.
        fence(Ordering::Release);
        mem.store(
            self.avail_idx.to_le(),
            Self::off(self.avail, 2),
            Ordering::Release,
        )?;
        self.chains[usize::from(head)] = ids;
        Ok(head)
    }

    /// Uses the event-index fields (VIRTIO_F_EVENT_IDX) instead of flags.
    pub fn set_event_idx(&mut self, on: bool) {
        self.event_idx = on;
    }

    /// Whether the device wants to be notified of the buffers made
    /// available since the last notification: with EVENT_IDX, when the
    /// avail index passed the device's `avail_event` (virtio 1.3, 2.7.10);
    /// else unless it set VRING_USED_F_NO_NOTIFY. Call it once per batch
    /// and notify when it says so.
    pub fn device_wants_kick(&mut self, mem: &GuestMemoryMmap) -> Result<bool> {
        fence(Ordering::SeqCst);
        let old = self.kicked_idx;
        let new = self.avail_idx;
        self.kicked_idx = new;
        if self.event_idx {
            let at = Self::off(self.used, 4 + 8 * usize::from(self.size));
            let event = u16::from_le(mem.load::<u16>(at, Ordering::Acquire)?);
            return Ok(new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old));
        }
        let flags = u16::from_le(mem.load::<u16>(self.used, Ordering::Acquire)?);
        Ok(flags & USED_F_NO_NOTIFY == 0)
    }

    /// Asks the device not to interrupt on used buffers (a NAPI poll is
    /// running). With EVENT_IDX the stale `used_event` already does so.
    pub fn disable_interrupts(&self, mem: &GuestMemoryMmap) -> Result<()> {
        if !self.event_idx {
            mem.store(AVAIL_F_NO_INTERRUPT.to_le(), self.avail, Ordering::Release)?;
        }
        Ok(())
    }

    /// Re-arms interrupts for the next used buffer and returns whether
    /// some arrived meanwhile (then the caller polls again).
    pub fn enable_interrupts(&self, mem: &GuestMemoryMmap) -> Result<bool> {
        if self.event_idx {
            let at = Self::off(self.avail, 4 + 2 * usize::from(self.size));
            mem.store(self.last_used.to_le(), at, Ordering::Release)?;
        } else {
            mem.store(0u16, self.avail, Ordering::Release)?;
        }
        fence(Ordering::SeqCst);
        self.has_used(mem)
    }

    /// Whether the device has returned chains not yet taken.
    pub fn has_used(&self, mem: &GuestMemoryMmap) -> Result<bool> {
        let used_idx = u16::from_le(mem.load::<u16>(Self::off(self.used, 2), Ordering::Acquire)?);
        Ok(used_idx != self.last_used)
    }

    /// Takes the next used chain: (head, bytes written by the device).
    pub fn pop_used(&mut self, mem: &GuestMemoryMmap) -> Result<Option<(u16, u32)>> {
        let used_idx = u16::from_le(mem.load::<u16>(Self::off(self.used, 2), Ordering::Acquire)?);
        if used_idx == self.last_used {
            return Ok(None);
        }
        fence(Ordering::Acquire);
        let slot = usize::from(self.last_used % self.size);
        let at = Self::off(self.used, 4 + 8 * slot);
        let id = u32::from_le(mem.read_obj::<u32>(at)?);
        let len = u32::from_le(mem.read_obj::<u32>(Self::off(at, 4))?);
        self.last_used = self.last_used.wrapping_add(1);
        let head = u16::try_from(id)
            .ok()
            .filter(|&h| h < self.size)
            .ok_or(QueueError::BadId(id))?;
        let ids = std::mem::take(&mut self.chains[usize::from(head)]);
        if ids.is_empty() {
            return Err(QueueError::NotInFlight(head).into());
        }
        self.free.extend(ids.into_iter().rev());
        Ok(Some((head, len)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use vnic_protocol::virtio::{DeviceStatus, Features};

    use super::*;
    use crate::{
        transport::{
            fake::{FakeConfig, FakeDevice, FakeTransport, SeenDesc},
            Transport,
        },
        Error,
    };

    /// A split queue of 8 entries set up as queue 0 of a fake device with
    /// `features` negotiated.
    fn rig(features: Features) -> (FakeTransport, FakeDevice, SplitQueue) {
        let (mut t, dev) = FakeTransport::new(FakeConfig::default(), 1 << 20).unwrap();
        t.set_driver_features(features).unwrap();
        t.set_status(DeviceStatus::FEATURES_OK).unwrap();
        let mut q = SplitQueue::new(t.dma(), 8).unwrap();
        q.set_event_idx(features.contains(Features::EVENT_IDX));
        t.setup_queue(0, &q, true).unwrap();
        (t, dev, q)
    }

    fn bufs(t: &mut FakeTransport, lens: &[(u32, bool)]) -> Vec<Buf> {
        lens.iter()
            .map(|&(len, writable)| Buf {
                addr: t.dma().alloc(len as usize, 8).unwrap(),
                len,
                writable,
            })
            .collect()
    }

    fn seen(b: &[Buf]) -> Vec<SeenDesc> {
        b.iter()
            .map(|b| SeenDesc {
                addr: b.addr,
                len: b.len,
                writable: b.writable,
            })
            .collect()
    }

    #[test]
    fn a_direct_chain_reaches_the_device_as_written_and_comes_back() {
        let (mut t, dev, mut q) = rig(Features::VERSION_1);
        let b = bufs(&mut t, &[(12, false), (1500, false), (64, true)]);
        let mem = t.dma().mem.clone();
        let head = q.add(&mem, &b).unwrap();
        assert_eq!(q.free(), 5);
        let chains = dev.pop_chains(0).unwrap();
        assert_eq!(chains, vec![(head, seen(&b))]);
        assert!(!q.has_used(&mem).unwrap());
        dev.complete(0, &[(head, 40)]).unwrap();
        assert_eq!(q.pop_used(&mem).unwrap(), Some((head, 40)));
        assert_eq!(q.pop_used(&mem).unwrap(), None);
        assert_eq!(q.free(), 8);
    }

    #[test]
    fn an_indirect_chain_takes_one_descriptor_whatever_its_length() {
        let (mut t, dev, mut q) = rig(Features::VERSION_1 | Features::INDIRECT_DESC);
        let b = bufs(
            &mut t,
            &[
                (12, false),
                (100, false),
                (200, false),
                (2048, true),
                (2048, true),
            ],
        );
        let table = t.dma().alloc(16 * b.len(), 16).unwrap();
        let mem = t.dma().mem.clone();
        let head = q.add_indirect(&mem, table, &b).unwrap();
        assert_eq!(q.free(), 7);
        // A direct chain beside it.
        let d = bufs(&mut t, &[(64, true)]);
        let head2 = q.add(&mem, &d).unwrap();
        let chains = dev.pop_chains(0).unwrap();
        assert_eq!(chains, vec![(head, seen(&b)), (head2, seen(&d))]);
        dev.complete(0, &[(head2, 64), (head, 4096)]).unwrap();
        assert_eq!(q.pop_used(&mem).unwrap(), Some((head2, 64)));
        assert_eq!(q.pop_used(&mem).unwrap(), Some((head, 4096)));
        assert_eq!(q.free(), 8);
        assert!(matches!(
            q.add_indirect(&mem, table, &[]),
            Err(Error::Queue(QueueError::IndirectLen(0)))
        ));
    }

    #[test]
    fn the_event_index_suppresses_kicks_and_interrupts() {
        let (mut t, dev, mut q) = rig(Features::VERSION_1 | Features::EVENT_IDX);
        let mem = t.dma().mem.clone();
        let b = bufs(&mut t, &[(64, true)]);
        // The device asks for a kick at the next buffer (avail_event 0).
        dev.want_kicks(0, true).unwrap();
        q.add(&mem, &b).unwrap();
        assert!(q.device_wants_kick(&mem).unwrap());
        // It has not moved avail_event since: the next buffers go quietly.
        q.add(&mem, &b).unwrap();
        q.add(&mem, &b).unwrap();
        assert!(!q.device_wants_kick(&mem).unwrap());
        // The device caught up and asks again.
        let chains = dev.pop_chains(0).unwrap();
        assert_eq!(chains.len(), 3);
        dev.want_kicks(0, true).unwrap();
        q.add(&mem, &b).unwrap();
        assert!(q.device_wants_kick(&mem).unwrap());

        // Interrupts: armed for the next used buffer, then stale.
        assert!(!q.enable_interrupts(&mem).unwrap());
        assert!(dev.complete(0, &[(chains[0].0, 1)]).unwrap());
        assert!(!dev.complete(0, &[(chains[1].0, 1)]).unwrap());
        assert_eq!(dev.interrupts(0), 1);
        // Re-arming finds the used buffers that came meanwhile.
        assert!(q.enable_interrupts(&mem).unwrap());
    }

    #[test]
    fn without_the_event_index_the_flags_do_it() {
        let (mut t, dev, mut q) = rig(Features::VERSION_1);
        let mem = t.dma().mem.clone();
        let b = bufs(&mut t, &[(64, true)]);
        dev.want_kicks(0, false).unwrap();
        q.add(&mem, &b).unwrap();
        assert!(!q.device_wants_kick(&mem).unwrap());
        dev.want_kicks(0, true).unwrap();
        q.add(&mem, &b).unwrap();
        assert!(q.device_wants_kick(&mem).unwrap());
        let chains = dev.pop_chains(0).unwrap();
        q.disable_interrupts(&mem).unwrap();
        assert!(!dev.complete(0, &[(chains[0].0, 0)]).unwrap());
        assert!(q.enable_interrupts(&mem).unwrap());
        assert!(dev.complete(0, &[(chains[1].0, 0)]).unwrap());
    }

    #[test]
    fn a_device_returning_a_bad_id_is_an_error() {
        let (mut t, _dev, mut q) = rig(Features::VERSION_1);
        let mem = t.dma().mem.clone();
        let b = bufs(&mut t, &[(64, true)]);
        let head = q.add(&mem, &b).unwrap();
        let used = q.used;
        let used_elem = |slot: usize, id: u32, idx: u16| {
            let at = SplitQueue::off(used, 4 + 8 * slot);
            mem.write_obj(id.to_le(), at).unwrap();
            mem.write_obj(0u32, SplitQueue::off(at, 4)).unwrap();
            mem.write_obj(idx.to_le(), SplitQueue::off(used, 2))
                .unwrap();
        };
        used_elem(0, 999, 1);
        assert!(matches!(
            q.pop_used(&mem),
            Err(Error::Queue(QueueError::BadId(999)))
        ));
        used_elem(1, u32::from(head) + 1, 2);
        assert!(matches!(
            q.pop_used(&mem),
            Err(Error::Queue(QueueError::NotInFlight(h))) if h == head + 1
        ));
        assert!(matches!(
            SplitQueue::new(t.dma(), 12),
            Err(Error::Queue(QueueError::Size(12)))
        ));
    }
}
