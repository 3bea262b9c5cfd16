//! An in-process virtio-net device behind a [`Transport`], for tests that
//! need no vnicd, no socket and no root.
//!
//! The device side of each queue is virtio-queue's `Queue` over the same
//! memory the driver writes, so the driver's rings are read by an
//! implementation that is not its own. Nothing runs by itself: a test
//! drives the device through [`FakeDevice`] (take what the driver
//! transmitted, hand it frames, answer control commands), and the device
//! interrupts the driver through the queue's eventfd whenever the driver's
//! suppression (event index or NO_INTERRUPT) allows.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc, Mutex, MutexGuard,
};

use virtio_queue::{desc::split::Descriptor, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vnic_protocol::virtio::{
    config::{VirtioNetConfig, CONFIG_LEN},
    DeviceStatus, Features, VirtioNetHdr,
};

use super::{Doorbell, Transport};
use crate::{mem::DmaMemory, virtqueue::SplitQueue, Error, QueueError, Result};

/// What the fake device is.
#[derive(Debug, Clone, Copy)]
pub struct FakeConfig {
    pub features: Features,
    /// Features the device will not work with: when the driver accepts
    /// any of them, FEATURES_OK does not stick.
    pub refuses: Features,
    pub max_queue_size: u16,
    /// Virtqueues the device has.
    pub queues: usize,
    pub config: VirtioNetConfig,
}

impl Default for FakeConfig {
    fn default() -> Self {
        FakeConfig {
            features: Features::VERSION_1
                | Features::MAC
                | Features::MTU
                | Features::STATUS
                | Features::MRG_RXBUF
                | Features::CSUM
                | Features::GUEST_CSUM
                | Features::EVENT_IDX
                | Features::INDIRECT_DESC
                | Features::CTRL_VQ
                | Features::MQ,
            refuses: Features::empty(),
            max_queue_size: 256,
            queues: 5,
            config: VirtioNetConfig {
                mac: vnic_protocol::wire::ethernet::Address([0x52, 0x54, 0, 0xfa, 0xce, 1]),
                status: 1,
                max_virtqueue_pairs: 2,
                mtu: 1500,
                speed: 10_000,
                duplex: 1,
                rss_max_key_size: 0,
                rss_max_indirection_table_length: 0,
                supported_hash_types: 0,
            },
        }
    }
}

struct FakeQueue {
    q: Queue,
    call: EventFd,
    kicks: Arc<AtomicU64>,
    interrupts: u64,
    enabled: bool,
}

struct Model {
    cfg: FakeConfig,
    status: DeviceStatus,
    /// Every status the driver wrote, in order.
    status_log: Vec<DeviceStatus>,
    driver_features: Features,
    mem: GuestMemoryMmap,
    queues: Vec<Option<FakeQueue>>,
}

/// The driver's side of the fake: what [`crate::net::VirtioNet`] owns.
#[derive(Debug)]
pub struct FakeTransport {
    dma: DmaMemory,
    dev: Arc<Mutex<Model>>,
}

/// The test's side of the fake: the device's actions.
#[derive(Clone)]
pub struct FakeDevice {
    dev: Arc<Mutex<Model>>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("status", &self.status)
            .field("driver_features", &self.driver_features)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for FakeDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FakeDevice")
    }
}

impl FakeTransport {
    /// A fake device with `mem_size` bytes of driver memory.
    pub fn new(cfg: FakeConfig, mem_size: usize) -> Result<(FakeTransport, FakeDevice)> {
        let dma = DmaMemory::new(mem_size)?;
        let dev = Arc::new(Mutex::new(Model {
            cfg,
            status: DeviceStatus::empty(),
            status_log: Vec::new(),
            driver_features: Features::empty(),
            mem: dma.mem.clone(),
            queues: (0..cfg.queues).map(|_| None).collect(),
        }));
        let handle = FakeDevice { dev: dev.clone() };
        Ok((FakeTransport { dma, dev }, handle))
    }

    fn model(&self) -> Result<MutexGuard<'_, Model>> {
        self.dev.lock().map_err(|_| Error::Poisoned("fake device"))
    }
}

impl Transport for FakeTransport {
    fn set_status(&mut self, status: DeviceStatus) -> Result<()> {
        let mut m = self.model()?;
        m.status_log.push(status);
        let mut s = status;
        if status.is_empty() {
            m.queues.iter_mut().for_each(|q| *q = None);
            m.driver_features = Features::empty();
        }
        if s.contains(DeviceStatus::FEATURES_OK) && m.driver_features.intersects(m.cfg.refuses) {
            s -= DeviceStatus::FEATURES_OK;
        }
        m.status = s;
        Ok(())
    }

    fn status(&mut self) -> Result<DeviceStatus> {
        Ok(self.model()?.status)
    }

    fn device_features(&mut self) -> Result<Features> {
        Ok(self.model()?.cfg.features)
    }

    fn set_driver_features(&mut self, features: Features) -> Result<()> {
        self.model()?.driver_features = features;
        Ok(())
    }

    fn max_queue_size(&mut self, index: usize) -> Result<u16> {
        let m = self.model()?;
        Ok(if index < m.cfg.queues {
            m.cfg.max_queue_size
        } else {
            0
        })
    }

    fn dma(&mut self) -> &mut DmaMemory {
        &mut self.dma
    }

    fn setup_queue(&mut self, index: usize, sq: &SplitQueue, enable: bool) -> Result<()> {
        let mut m = self.model()?;
        let event_idx = m.driver_features.contains(Features::EVENT_IDX);
        let mut q = Queue::new(m.cfg.max_queue_size).map_err(|_| QueueError::Missing(index))?;
        let bad = |_| QueueError::Size(sq.size);
        q.try_set_size(sq.size).map_err(bad)?;
        q.try_set_desc_table_address(sq.desc).map_err(bad)?;
        q.try_set_avail_ring_address(sq.avail).map_err(bad)?;
        q.try_set_used_ring_address(sq.used).map_err(bad)?;
        q.set_event_idx(event_idx);
        q.set_ready(true);
        let slot = m.queues.get_mut(index).ok_or(QueueError::Missing(index))?;
        *slot = Some(FakeQueue {
            q,
            call: EventFd::new(EFD_NONBLOCK)?,
            kicks: Arc::new(AtomicU64::new(0)),
            interrupts: 0,
            enabled: enable,
        });
        Ok(())
    }

    fn doorbell(&self, index: usize) -> Result<Doorbell> {
        let kicks = self.model()?.queue(index)?.kicks.clone();
        Ok(Doorbell::new(move || {
            kicks.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }))
    }

    fn interrupt(&self, index: usize) -> Result<EventFd> {
        Ok(self.model()?.queue(index)?.call.try_clone()?)
    }

    fn read_config(&mut self, offset: usize, len: usize) -> Result<Vec<u8>> {
        let m = self.model()?;
        let all: [u8; CONFIG_LEN] = m.cfg.config.to_bytes();
        Ok(all
            .get(offset..)
            .map(|b| b[..len.min(b.len())].to_vec())
            .unwrap_or_default())
    }
}

/// One descriptor of a chain as the device walked it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeenDesc {
    pub addr: GuestAddress,
    pub len: u32,
    pub writable: bool,
}

impl FakeDevice {
    fn model(&self) -> MutexGuard<'_, Model> {
        // A test's own device: a poisoned lock means a test already
        // panicked holding it.
        match self.dev.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// The statuses the driver wrote, in order.
    pub fn status_log(&self) -> Vec<DeviceStatus> {
        self.model().status_log.clone()
    }

    pub fn status(&self) -> DeviceStatus {
        self.model().status
    }

    pub fn driver_features(&self) -> Features {
        self.model().driver_features
    }

    /// Times the driver rang queue `index`'s doorbell.
    pub fn kicks(&self, index: usize) -> u64 {
        self.model()
            .queue(index)
            .map_or(0, |q| q.kicks.load(Ordering::Relaxed))
    }

    /// Interrupts the device sent for queue `index`.
    pub fn interrupts(&self, index: usize) -> u64 {
        self.model().queue(index).map_or(0, |q| q.interrupts)
    }

    pub fn enabled(&self, index: usize) -> bool {
        self.model().queue(index).is_ok_and(|q| q.enabled)
    }

    /// Asks the driver for a doorbell on its next buffers (the device's
    /// side of notification suppression: `avail_event` with the event
    /// index, else the used ring's NO_NOTIFY flag cleared).
    pub fn want_kicks(&self, index: usize, on: bool) -> Result<()> {
        let mut m = self.model();
        let mem = m.mem.clone();
        let fq = queue(&mut m, index)?;
        let r = if on {
            fq.q.enable_notification(&mem).map(|_| ())
        } else {
            fq.q.disable_notification(&mem)
        };
        r.map_err(|_| QueueError::NotSetUp(index).into())
    }

    /// Takes every chain the driver made available on queue `index` and
    /// returns its descriptors as walked (indirect tables followed),
    /// without using them.
    pub fn pop_chains(&self, index: usize) -> Result<Vec<(u16, Vec<SeenDesc>)>> {
        let mut m = self.model();
        let mem = m.mem.clone();
        let fq = queue(&mut m, index)?;
        let mut out = Vec::new();
        while let Some(c) = fq.q.pop_descriptor_chain(&mem) {
            let head = c.head_index();
            let descs = c.map(|d: Descriptor| SeenDesc {
                addr: d.addr(),
                len: d.len(),
                writable: d.is_write_only(),
            });
            out.push((head, descs.collect()));
        }
        Ok(out)
    }

    /// Puts chain `head` on queue `index`'s used ring with `len` bytes
    /// written, and interrupts the driver if it wants to know.
    pub fn complete(&self, index: usize, used: &[(u16, u32)]) -> Result<bool> {
        let mut m = self.model();
        let mem = m.mem.clone();
        let fq = queue(&mut m, index)?;
        for &(head, len) in used {
            fq.q.add_used(&mem, head, len)
                .map_err(|_| QueueError::BadId(u32::from(head)))?;
        }
        interrupt(fq, &mem)
    }

    /// What the driver transmitted on TX queue `index`: each chain's
    /// readable bytes (header and frame), its chains then used.
    pub fn transmitted(&self, index: usize) -> Result<Vec<Vec<u8>>> {
        let chains = self.pop_chains(index)?;
        let mem = self.model().mem.clone();
        let mut frames = Vec::new();
        let mut used = Vec::new();
        for (head, descs) in chains {
            frames.push(readable(&mem, &descs)?);
            used.push((head, 0));
        }
        self.complete(index, &used)?;
        Ok(frames)
    }

    /// Delivers a frame on RX queue `index` with `hdr` in front, as
    /// `hdr_len` header bytes: across as many buffers as it needs when
    /// the driver took MRG_RXBUF (their count in `num_buffers`), else in
    /// one. False when the driver has not posted room for it.
    pub fn receive(
        &self,
        index: usize,
        hdr: &VirtioNetHdr,
        hdr_len: usize,
        frame: &[u8],
    ) -> Result<bool> {
        let mut m = self.model();
        let mem = m.mem.clone();
        let mergeable = m.driver_features.contains(Features::MRG_RXBUF);
        let fq = queue(&mut m, index)?;
        let mut bytes = vec![0u8; hdr_len];
        let mut chains = Vec::new();
        let mut room = 0usize;
        let total = hdr_len + frame.len();
        while room < total {
            let Some(c) = fq.q.pop_descriptor_chain(&mem) else {
                // Not enough buffers: give back what was taken.
                for _ in &chains {
                    fq.q.go_to_previous_position();
                }
                return Ok(false);
            };
            let head = c.head_index();
            let descs: Vec<Descriptor> = c.filter(|d: &Descriptor| d.is_write_only()).collect();
            room += descs.iter().map(|d| d.len() as usize).sum::<usize>();
            chains.push((head, descs));
            if !mergeable && room < total {
                fq.q.go_to_previous_position();
                return Ok(false);
            }
        }
        let mut h = *hdr;
        h.num_buffers = chains.len() as u16;
        h.emit(&mut bytes, hdr_len > 12)?;
        bytes.extend_from_slice(frame);
        let mut at = 0;
        let mut used = Vec::new();
        for (head, descs) in chains {
            let mut n = 0u32;
            for d in descs {
                let k = (d.len() as usize).min(bytes.len() - at);
                mem.write_slice(&bytes[at..at + k], d.addr())?;
                at += k;
                n += k as u32;
            }
            used.push((head, n));
        }
        for (head, n) in used {
            fq.q.add_used(&mem, head, n)
                .map_err(|_| QueueError::BadId(u32::from(head)))?;
        }
        interrupt(fq, &mem)?;
        Ok(true)
    }

    /// Answers every control command waiting on queue `index` with
    /// `ack`, and returns the commands' bytes (class, command, data).
    pub fn serve_ctrl(&self, index: usize, ack: u8) -> Result<Vec<Vec<u8>>> {
        let chains = self.pop_chains(index)?;
        let mem = self.model().mem.clone();
        let mut cmds = Vec::new();
        let mut used = Vec::new();
        for (head, descs) in chains {
            let c = readable(&mem, &descs)?;
            let ack_at = descs.iter().find(|d| d.writable).map(|d| d.addr);
            if let Some(a) = ack_at {
                mem.write_obj(ack, a)?;
            }
            cmds.push(c);
            used.push((head, u32::from(ack_at.is_some())));
        }
        self.complete(index, &used)?;
        Ok(cmds)
    }
}

/// The bytes of a chain's device-readable buffers, in order.
fn readable(mem: &GuestMemoryMmap, descs: &[SeenDesc]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for d in descs.iter().filter(|d| !d.writable) {
        let at = out.len();
        out.resize(at + d.len as usize, 0);
        mem.read_slice(&mut out[at..], d.addr)?;
    }
    Ok(out)
}

impl Model {
    fn queue(&self, index: usize) -> Result<&FakeQueue> {
        self.queues
            .get(index)
            .and_then(Option::as_ref)
            .ok_or_else(|| QueueError::NotSetUp(index).into())
    }
}

fn queue(m: &mut Model, index: usize) -> Result<&mut FakeQueue> {
    m.queues
        .get_mut(index)
        .and_then(Option::as_mut)
        .ok_or_else(|| QueueError::NotSetUp(index).into())
}

/// Interrupts the driver for `fq` if it asked to be: the event index, or
/// without it the available ring's NO_INTERRUPT flag (which virtio-queue
/// does not look at).
fn interrupt(fq: &mut FakeQueue, mem: &GuestMemoryMmap) -> Result<bool> {
    let wanted =
        fq.q.needs_notification(mem)
            .map_err(|_| QueueError::NotSetUp(0))?;
    let wanted = if fq.q.event_idx_enabled() {
        wanted
    } else {
        let flags: u16 = mem.read_obj(GuestAddress(fq.q.avail_ring()))?;
        u16::from_le(flags) & 1 == 0
    };
    if wanted {
        fq.call.write(1)?;
        fq.interrupts += 1;
    }
    Ok(wanted)
}
