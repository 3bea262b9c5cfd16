//! The driver side of a split virtqueue (virtio 1.3, 2.7).

use std::sync::atomic::{fence, Ordering};

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use crate::{mem::DmaMemory, Error, Result};

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawDesc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

pub const F_NEXT: u16 = DESC_F_NEXT;
pub const F_WRITE: u16 = DESC_F_WRITE;

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
        if !size.is_power_of_two() {
            return Err(Error::Queue("size must be a power of two"));
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

    /// Makes a chain of `bufs` available; returns its head.
    pub fn add(&mut self, mem: &GuestMemoryMmap, bufs: &[Buf]) -> Result<u16> {
        if bufs.is_empty() || bufs.len() > self.free.len() {
            return Err(Error::Queue("no free descriptors"));
        }
        let ids: Vec<u16> = (0..bufs.len()).filter_map(|_| self.free.pop()).collect();
        for (k, (b, &id)) in bufs.iter().zip(&ids).enumerate() {
            let mut flags = if b.writable { DESC_F_WRITE } else { 0 };
            let next = ids.get(k + 1).copied().unwrap_or(0);
            if k + 1 < ids.len() {
                flags |= DESC_F_NEXT;
            }
            let at = Self::off(self.desc, 16 * usize::from(id));
            mem.write_obj(b.addr.raw_value().to_le(), at)?;
            mem.write_obj(b.len.to_le(), Self::off(at, 8))?;
            mem.write_obj(flags.to_le(), Self::off(at, 12))?;
            mem.write_obj(next.to_le(), Self::off(at, 14))?;
        }
        self.publish(mem, ids)
    }

    /// Publishes a chain written exactly as given, for testing a device
    /// against bad input: `next` of each entry is an index into `descs`
    /// (so chains may loop), and the flags are used as they are.
    pub fn add_raw(&mut self, mem: &GuestMemoryMmap, descs: &[RawDesc]) -> Result<u16> {
        if descs.is_empty() || descs.len() > self.free.len() {
            return Err(Error::Queue("no free descriptors"));
        }
        let ids: Vec<u16> = (0..descs.len()).filter_map(|_| self.free.pop()).collect();
        for (d, &id) in descs.iter().zip(&ids) {
            let next = ids.get(usize::from(d.next)).copied().unwrap_or(d.next);
            let at = Self::off(self.desc, 16 * usize::from(id));
            mem.write_obj(d.addr.to_le(), at)?;
            mem.write_obj(d.len.to_le(), Self::off(at, 8))?;
            mem.write_obj(d.flags.to_le(), Self::off(at, 12))?;
            mem.write_obj(next.to_le(), Self::off(at, 14))?;
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
            .ok_or(Error::Queue("device returned a bad descriptor id"))?;
        let ids = std::mem::take(&mut self.chains[usize::from(head)]);
        if ids.is_empty() {
            return Err(Error::Queue(
                "device returned a chain that was not in flight",
            ));
        }
        self.free.extend(ids.into_iter().rev());
        Ok(Some((head, len)))
    }
}
