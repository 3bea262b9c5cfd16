//! `VirtioNet`: negotiation, RX buffer posting, frame transmit and receive
//! over any [`Transport`]: vhost-user, PCI inside a VM, or the
//! in-process fake in tests.
//!
//! Each queue pair is a [`QueuePair`] that can be taken out of the device
//! and driven by its own thread (the stack runs one shard per pair); the
//! control queue and config space stay with [`VirtioNet`]. Without a
//! control queue the driver does not negotiate MQ (it depends on CTRL_VQ)
//! but the vhost-user device serves every queue that is set up.

use std::{
    os::{fd::AsRawFd, unix::net::UnixListener},
    path::Path,
    time::{Duration, Instant},
};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vnic_protocol::{
    toe::{RingSpec, CMD_LEN, COMPLETION_LEN, EVENT_LEN, RING_MIN},
    virtio::{
        config::{VirtioNetConfig, CONFIG_LEN},
        ctrl::CtrlCommand,
        hdr::HDR_LEN_HASH,
        validate::MAX_FRAME_LEN,
        Features, VirtioNetHdr,
    },
};

#[cfg(any(test, feature = "test-util"))]
use crate::virtqueue::RawDesc;
use crate::{
    mem::DmaMemory,
    toe::{ToeOptions, ToeQueues, CMD_QUEUE, EVT_QUEUE},
    transport::{self, vhost_user::VhostUserTransport, Doorbell, Transport},
    virtqueue::{Buf, SplitQueue},
    QueueError, Result,
};

/// What to ask of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetOptions {
    pub pairs: u16,
    pub queue_size: u16,
    pub features: Features,
    /// Size of each RX buffer. Zero without MRG_RXBUF means buffers that
    /// hold a whole 64 KiB frame.
    pub rx_buf_len: usize,
    /// Pairs to enable; the rest are set up but left disabled, as a VMM
    /// does for pairs the guest has not asked for. `None`: all.
    pub enabled_pairs: Option<u16>,
    /// Ask for the TOE (VNIC_TOE), with this much ring memory.
    pub toe: Option<ToeOptions>,
}

impl NetOptions {
    /// The features a Linux guest asks for, minus the control queue ones.
    pub const DEFAULT_FEATURES: Features = Features::VERSION_1
        .union(Features::MRG_RXBUF)
        .union(Features::MAC)
        .union(Features::MTU)
        .union(Features::STATUS)
        .union(Features::CSUM)
        .union(Features::GUEST_CSUM)
        .union(Features::HOST_TSO4)
        .union(Features::HOST_TSO6)
        .union(Features::HOST_ECN)
        .union(Features::GUEST_TSO4)
        .union(Features::GUEST_TSO6)
        .union(Features::GUEST_ECN)
        .union(Features::HASH_REPORT);
}

impl Default for NetOptions {
    fn default() -> Self {
        NetOptions {
            pairs: 1,
            queue_size: 256,
            features: Self::DEFAULT_FEATURES,
            rx_buf_len: 2048,
            enabled_pairs: None,
            toe: None,
        }
    }
}

#[derive(Debug)]
pub(crate) struct Pool {
    pub(crate) q: SplitQueue,
    buf_len: usize,
    pub(crate) free: Vec<GuestAddress>,
    /// Buffer of each chain in flight, by head.
    inflight: Vec<Option<GuestAddress>>,
    /// Chains with the device.
    in_flight: usize,
}

impl Pool {
    fn new(dma: &mut DmaMemory, size: u16, buf_len: usize) -> Result<Pool> {
        let q = SplitQueue::new(dma, size)?;
        let mut free = Vec::with_capacity(usize::from(size));
        for _ in 0..size {
            free.push(dma.alloc(buf_len, 64)?);
        }
        Ok(Pool {
            q,
            buf_len,
            free,
            inflight: vec![None; usize::from(size)],
            in_flight: 0,
        })
    }

    /// Publishes a chain of pieces (address, length, device-writable) of
    /// the last free buffer, which stays in flight with it.
    pub(crate) fn add_chain(
        &mut self,
        mem: &GuestMemoryMmap,
        pieces: &[(GuestAddress, usize, bool)],
    ) -> Result<u16> {
        let bufs: Vec<Buf> = pieces
            .iter()
            .map(|&(addr, len, writable)| Buf {
                addr,
                len: len as u32,
                writable,
            })
            .collect();
        let head = self.q.add(mem, &bufs)?;
        self.inflight[usize::from(head)] = self.free.pop();
        self.in_flight += 1;
        Ok(head)
    }

    pub(crate) fn add(
        &mut self,
        mem: &GuestMemoryMmap,
        len: usize,
        writable: bool,
    ) -> Result<GuestAddress> {
        let addr = self.free.pop().ok_or(QueueError::NoBuffers)?;
        match self.q.add(
            mem,
            &[Buf {
                addr,
                len: len as u32,
                writable,
            }],
        ) {
            Ok(head) => {
                self.inflight[usize::from(head)] = Some(addr);
                self.in_flight += 1;
                Ok(addr)
            }
            Err(e) => {
                self.free.push(addr);
                Err(e)
            }
        }
    }

    /// The next used buffer of this pool; chains published raw (which
    /// carry no pool buffer) are reclaimed and passed over.
    pub(crate) fn used(&mut self, mem: &GuestMemoryMmap) -> Result<Option<(GuestAddress, u32)>> {
        while let Some((head, len)) = self.q.pop_used(mem)? {
            if let Some(addr) = self.inflight[usize::from(head)].take() {
                self.free.push(addr);
                self.in_flight -= 1;
                return Ok(Some((addr, len)));
            }
        }
        Ok(None)
    }
}

/// A received frame and the header the device wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub hdr: VirtioNetHdr,
    pub frame: Vec<u8>,
    /// RX buffers the frame came in.
    pub buffers: u16,
}

/// The receive half of a queue pair.
#[derive(Debug)]
pub struct RxQueue {
    mem: GuestMemoryMmap,
    pool: Pool,
    kick: Doorbell,
    call: EventFd,
    hdr_len: usize,
    mergeable: bool,
    /// The frame being assembled from RX buffers.
    scratch: Vec<u8>,
    /// RX buffers returned shorter than a header.
    pub rx_length_errors: u64,
    /// Notifications sent to the device.
    pub kicks: u64,
}

/// The transmit half of a queue pair.
#[derive(Debug)]
pub struct TxQueue {
    mem: GuestMemoryMmap,
    pool: Pool,
    kick: Doorbell,
    /// The TX interrupt (used-buffer notifications), armed only while the
    /// driver waits for room.
    call: EventFd,
    hdr_len: usize,
    /// Notifications sent to the device.
    pub kicks: u64,
    /// Frames posted since the last notification.
    unkicked: usize,
    /// Frames made available.
    pub posted: u64,
    /// Chains the device handed back (frames completed).
    pub completed: u64,
    /// Waits for room that ended with a notification from the device.
    pub waits: u64,
    /// Waits for room that timed out: the device's notification (or our
    /// kick) was lost.
    pub stalls: u64,
}

/// One RX/TX queue pair: rings, buffers and notification fds. It shares
/// the device's memory and needs nothing else to run, so a thread can own
/// it; the halves are apart so that receive processing can transmit.
#[derive(Debug)]
pub struct QueuePair {
    pub index: usize,
    pub rx: RxQueue,
    pub tx: TxQueue,
}

impl RxQueue {
    /// The RX queue's interrupt (call eventfd), to wait on.
    pub fn call(&self) -> &EventFd {
        &self.call
    }

    /// Posts every free RX buffer and notifies the device if it wants.
    pub fn fill(&mut self) -> Result<()> {
        let mut added = false;
        while !self.pool.free.is_empty() && self.pool.q.free() > 0 {
            let len = self.pool.buf_len;
            self.pool.add(&self.mem, len, true)?;
            added = true;
        }
        if added && self.pool.q.device_wants_kick(&self.mem)? {
            self.kick.ring()?;
            self.kicks += 1;
        }
        Ok(())
    }

    /// Takes one received frame into the queue's scratch buffer and hands
    /// it to `f`; false when the ring is empty. Buffers are not reposted
    /// (see [`RxQueue::fill`]).
    pub fn recv_with(&mut self, f: &mut dyn FnMut(&VirtioNetHdr, &[u8])) -> Result<bool> {
        loop {
            let Some((addr, len)) = self.pool.used(&self.mem)? else {
                return Ok(false);
            };
            let len = len as usize;
            if len < self.hdr_len {
                // The device handed the buffer back unused (a frame it had
                // to drop): count it, as Linux counts rx_length_errors.
                self.rx_length_errors += 1;
                continue;
            }
            let mut hb = [0u8; HDR_LEN_HASH];
            self.mem.read_slice(&mut hb[..self.hdr_len], addr)?;
            let hdr = VirtioNetHdr::parse(&hb[..self.hdr_len], self.hdr_len == HDR_LEN_HASH)?;
            self.scratch.clear();
            self.scratch.resize(len - self.hdr_len, 0);
            self.mem
                .read_slice(&mut self.scratch, addr.unchecked_add_len(self.hdr_len))?;
            let buffers = if self.mergeable {
                hdr.num_buffers.max(1)
            } else {
                1
            };
            let deadline = Instant::now() + Duration::from_secs(1);
            let mut got = 1;
            while got < buffers {
                match self.pool.used(&self.mem)? {
                    Some((a, l)) => {
                        let at = self.scratch.len();
                        self.scratch.resize(at + l as usize, 0);
                        self.mem.read_slice(&mut self.scratch[at..], a)?;
                        got += 1;
                    }
                    None if Instant::now() < deadline => std::hint::spin_loop(),
                    None => return Err(QueueError::IncompleteFrame.into()),
                }
            }
            let mut hdr = hdr;
            hdr.num_buffers = buffers;
            f(&hdr, &self.scratch);
            return Ok(true);
        }
    }

    /// NAPI-style poll: with device interrupts off, takes up to `budget`
    /// frames, reposts the buffers, and when the ring ran dry before the
    /// budget re-arms interrupts (event index) and looks once more for a
    /// frame that raced in; with `rearm` false (a busy poller that will
    /// look again itself) interrupts stay off. Returns the frames handled;
    /// `budget` means "more may be waiting: poll again without sleeping".
    pub fn napi_poll(
        &mut self,
        budget: usize,
        rearm: bool,
        f: &mut dyn FnMut(&VirtioNetHdr, &[u8]),
    ) -> Result<usize> {
        self.pool.q.disable_interrupts(&self.mem)?;
        let mut n = 0;
        loop {
            while n < budget && self.recv_with(f)? {
                n += 1;
            }
            if n > 0 {
                self.fill()?;
            }
            if n >= budget || !rearm {
                return Ok(n);
            }
            if !self.pool.q.enable_interrupts(&self.mem)? {
                return Ok(n);
            }
            self.pool.q.disable_interrupts(&self.mem)?;
        }
    }

    /// Re-arms device interrupts; whether frames arrived meanwhile (then
    /// poll instead of sleeping).
    pub fn rearm(&self) -> Result<bool> {
        self.pool.q.enable_interrupts(&self.mem)
    }

    /// Whether the device returned buffers not yet taken.
    pub fn has_used(&self) -> Result<bool> {
        self.pool.q.has_used(&self.mem)
    }

    /// Waits up to `timeout` for the RX interrupt or `also` to become
    /// readable; drains both.
    pub fn wait(&self, also: Option<&EventFd>, timeout: Duration) {
        wait_any(
            &[Some(&self.call), also],
            timeout.min(Duration::from_secs(1)),
        );
    }
}

/// Sleeps until one of `fds` (at most three) is readable or `timeout`
/// passes, then drains them all. Returns poll(2)'s answer: how many were
/// readable, 0 when the time ran out, negative on an error (EINTR).
pub(crate) fn wait_any(fds: &[Option<&EventFd>], timeout: Duration) -> i32 {
    let mut pfd = [libc::pollfd {
        fd: -1,
        events: libc::POLLIN,
        revents: 0,
    }; 3];
    for (p, e) in pfd.iter_mut().zip(fds) {
        p.fd = e.map_or(-1, AsRawFd::as_raw_fd);
    }
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: `pfd` is an array of three valid pollfds (a negative fd is
    // ignored by poll(2)) for the duration of the call.
    let r = unsafe { libc::poll(pfd.as_mut_ptr(), pfd.len() as libc::nfds_t, ms) };
    for e in fds.iter().flatten() {
        let _ = e.read();
    }
    r
}

impl TxQueue {
    /// Whether a frame can be posted now (after reclaiming).
    pub fn has_room(&mut self) -> Result<bool> {
        if self.pool.free.is_empty() || self.pool.q.free() == 0 {
            self.reclaim()?;
        }
        Ok(!self.pool.free.is_empty() && self.pool.q.free() > 0)
    }

    /// Frames the ring holds at most.
    pub fn capacity(&self) -> usize {
        usize::from(self.pool.q.size)
    }

    /// Frames that can be posted now (completed chains reclaimed first).
    pub fn room(&mut self) -> Result<usize> {
        self.reclaim()?;
        Ok(self.pool.free.len().min(self.pool.q.free()))
    }

    /// Makes a frame available without notifying the device; false when
    /// the queue is full. See [`TxQueue::kick`].
    pub fn post(&mut self, hdr: &VirtioNetHdr, frame: &[u8]) -> Result<bool> {
        if frame.len() > MAX_FRAME_LEN {
            return Err(QueueError::FrameTooLong(frame.len()).into());
        }
        if !self.has_room()? {
            return Ok(false);
        }
        let mut hb = [0u8; HDR_LEN_HASH];
        let hl = hdr.emit(&mut hb, self.hdr_len == HDR_LEN_HASH)?;
        let addr = *self.pool.free.last().ok_or(QueueError::NoBuffers)?;
        self.mem.write_slice(&hb[..hl], addr)?;
        self.mem.write_slice(frame, addr.unchecked_add_len(hl))?;
        self.pool.add(&self.mem, hl + frame.len(), false)?;
        self.unkicked += 1;
        self.posted += 1;
        Ok(true)
    }

    /// Posts up to `max` copies of `frame` (as room allows, reclaiming
    /// completed chains) and notifies the device once for them if it asks
    /// to be. Returns how many were posted; 0 means the ring is full (see
    /// [`TxQueue::wait_for_room`]).
    pub fn post_burst(&mut self, hdr: &VirtioNetHdr, frame: &[u8], max: usize) -> Result<usize> {
        let mut n = 0;
        while n < max && self.post(hdr, frame)? {
            n += 1;
        }
        self.kick()?;
        Ok(n)
    }

    /// Waits up to `timeout` for the device to hand back TX chains when
    /// the ring is full: kicks what is pending, arms the TX interrupt
    /// (the event index, or clears NO_INTERRUPT) and sleeps on it unless
    /// chains came back meanwhile, then turns the interrupt off again.
    /// Returns the chains reclaimed. A wait that times out with nothing
    /// back counts as a stall: with a device that keeps its side of the
    /// notification protocol it never happens. (A wake-up with nothing
    /// back, from a notification that predates the wait, is not one: the
    /// wait goes on.)
    pub fn wait_for_room(&mut self, timeout: Duration) -> Result<usize> {
        self.kick()?;
        let n = self.reclaim()?;
        if n > 0 {
            return Ok(n);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if self.pool.q.enable_interrupts(&self.mem)? {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let r = wait_any(
                &[Some(&self.call)],
                left.clamp(Duration::from_millis(1), Duration::from_secs(60)),
            );
            if r == 0 || Instant::now() >= deadline {
                if !self.pool.q.has_used(&self.mem)? {
                    self.stalls += 1;
                }
                break;
            }
            if r > 0 {
                self.waits += 1;
            }
            if self.pool.q.has_used(&self.mem)? {
                break;
            }
        }
        self.pool.q.disable_interrupts(&self.mem)?;
        self.reclaim()
    }

    /// The TX interrupt's eventfd, for a caller that waits on several.
    pub fn call(&self) -> &EventFd {
        &self.call
    }

    /// Arms the TX interrupt; whether chains came back meanwhile.
    pub fn arm(&mut self) -> Result<bool> {
        self.pool.q.enable_interrupts(&self.mem)
    }

    /// Turns the TX interrupt off (chains are reclaimed when posting).
    pub fn disarm(&mut self) -> Result<()> {
        self.pool.q.disable_interrupts(&self.mem)
    }

    /// Notifies the device of posted frames if it asked to be.
    pub fn kick(&mut self) -> Result<()> {
        if self.unkicked == 0 {
            return Ok(());
        }
        self.unkicked = 0;
        if self.pool.q.device_wants_kick(&self.mem)? {
            self.kick.ring()?;
            self.kicks += 1;
        }
        Ok(())
    }

    /// TX chains the device has consumed.
    pub fn reclaim(&mut self) -> Result<usize> {
        let mut n = 0;
        while self.pool.used(&self.mem)?.is_some() {
            n += 1;
        }
        self.completed += n as u64;
        Ok(n)
    }

    pub fn in_flight(&self) -> usize {
        self.pool.in_flight
    }
}

/// A virtio-net device driven over a [`Transport`].
#[derive(Debug)]
pub struct VirtioNet {
    t: Box<dyn Transport>,
    pub features: Features,
    /// Queue pairs still with the device object (see [`VirtioNet::take_pairs`]).
    qps: Vec<QueuePair>,
    npairs: usize,
    /// The control queue's index: after every pair the device has (with
    /// MQ or RSS), else after the pairs set up.
    ctrl_index: usize,
    /// The control queue, its one command buffer and doorbell, with CTRL_VQ.
    ctrl: Option<(Pool, Doorbell)>,
    /// The TOE's queues, with VNIC_TOE (see [`VirtioNet::take_toe`]).
    toe: Option<ToeQueues>,
    /// RX buffers returned shorter than a header.
    pub rx_length_errors: u64,
}

/// Bytes of a control command buffer (class, command, data, answer, ack).
const CTRL_BUF: usize = 4096;
/// Entries of the control queue.
const CTRL_QUEUE: u16 = 64;

impl VirtioNet {
    /// Connects to vnicd's socket and brings the device up.
    pub fn connect(socket: &Path, opts: NetOptions) -> Result<VirtioNet> {
        Self::start(opts, |max_queues, mem| {
            Ok(Box::new(VhostUserTransport::connect(
                socket, max_queues, mem,
            )?))
        })
    }

    /// Waits on `listener` for a device that connects to us (`vnicd
    /// --client`) and brings it up.
    pub fn accept(listener: &UnixListener, opts: NetOptions) -> Result<VirtioNet> {
        Self::start(opts, |max_queues, mem| {
            Ok(Box::new(VhostUserTransport::accept(
                listener, max_queues, mem,
            )?))
        })
    }

    /// Takes the virtio-net PCI function `bdf` from the kernel (see
    /// [`crate::transport::pci`]) and brings it up; it goes back to its
    /// kernel driver when this is dropped.
    pub fn open_pci(bdf: &str, opts: NetOptions) -> Result<VirtioNet> {
        Self::start(opts, |max_queues, mem| {
            Ok(Box::new(crate::transport::pci::PciTransport::open(
                bdf, max_queues, mem,
            )?))
        })
    }

    /// Brings the device up over the transport `open` makes, given the
    /// number of virtqueues and the bytes of shared memory the driver
    /// needs: the init sequence of virtio 1.3, 3.1.1 (marking the device
    /// FAILED if a step fails), RX buffers posted, DRIVER_OK.
    pub fn start(
        opts: NetOptions,
        open: impl FnOnce(usize, usize) -> Result<Box<dyn Transport>>,
    ) -> Result<VirtioNet> {
        let pairs = usize::from(opts.pairs.max(1));
        let rx_len = Self::rx_buf_len(opts);
        let tx_len = MAX_FRAME_LEN + HDR_LEN_HASH;
        let n = usize::from(opts.queue_size);
        // Sized as if every kind of buffer filled 2 MiB pages of its own:
        // hugepage memory never has an allocation straddle two pages.
        let page = crate::mem::HUGEPAGE;
        let packed = |count: usize, len: usize| {
            let per = (page / len.div_ceil(64).max(1) / 64).max(1);
            count.div_ceil(per) * page
        };
        let toe = opts
            .toe
            .filter(|_| opts.features.contains(Features::VNIC_TOE));
        let toe_mem = toe.map_or(0, |o| {
            packed(2, 32 * usize::from(EVT_QUEUE) + 64)
                + packed(usize::from(CMD_QUEUE), CMD_LEN + COMPLETION_LEN)
                + packed(usize::from(EVT_QUEUE), EVENT_LEN)
                + ToeQueues::ring_memory(o)
                + page
        });
        let mem = pairs * (packed(n, rx_len) + packed(n, tx_len))
            + packed(2 * pairs + 1, 32 * n + 64)
            + packed(usize::from(CTRL_QUEUE), CTRL_BUF)
            + page
            + toe_mem;
        let queues = 2 * pairs + 1 + if toe.is_some() { 2 } else { 0 };
        let mut t = open(queues, mem)?;
        let features = transport::init(&mut *t, opts.features)?;
        match Self::set_up(t, opts, features) {
            Ok(dev) => Ok(dev),
            Err((mut t, e)) => {
                transport::fail(&mut *t);
                Err(e)
            }
        }
    }

    /// Steps 7 and 8: queues, buffers, DRIVER_OK. Gives the transport back
    /// on an error, to be marked FAILED.
    fn set_up(
        t: Box<dyn Transport>,
        opts: NetOptions,
        features: Features,
    ) -> std::result::Result<VirtioNet, (Box<dyn Transport>, crate::Error)> {
        let mut dev = VirtioNet {
            t,
            features,
            qps: Vec::new(),
            npairs: usize::from(opts.pairs.max(1)),
            ctrl_index: 2 * usize::from(opts.pairs.max(1)),
            ctrl: None,
            toe: None,
            rx_length_errors: 0,
        };
        match dev.queues(opts) {
            Ok(()) => Ok(dev),
            Err(e) => Err((dev.t, e)),
        }
    }

    fn queues(&mut self, opts: NetOptions) -> Result<()> {
        let (pairs, features) = (self.npairs, self.features);
        if features.intersects(Features::MQ | Features::RSS) {
            // The control queue comes after all the device's pairs
            // (virtio 1.3, 5.1.2), however many the driver uses.
            let max = usize::from(self.config()?.max_virtqueue_pairs);
            if !(1..=0x8000).contains(&max) {
                return Err(crate::Error::Negotiation(format!(
                    "the device's config says {max} queue pairs (1 to 32768)"
                )));
            }
            if pairs > max {
                return Err(crate::Error::Argument(format!(
                    "{pairs} queue pairs asked for, the device has {max}"
                )));
            }
            self.ctrl_index = 2 * max;
        } else if pairs > 1 && features.contains(Features::CTRL_VQ) {
            // Queue 2 is the control queue then, not a pair's RX.
            return Err(crate::Error::Argument(format!(
                "{pairs} queue pairs asked for, the device did not take MQ"
            )));
        }
        let mergeable = features.contains(Features::MRG_RXBUF);
        let rx_len = Self::rx_buf_len(opts);
        let tx_len = MAX_FRAME_LEN + HDR_LEN_HASH;
        let t = &mut self.t;
        let hdr_len = features.hdr_len();
        let event_idx = features.contains(Features::EVENT_IDX);
        for i in 0..pairs {
            transport::check_queue_size(&mut **t, 2 * i, opts.queue_size)?;
            transport::check_queue_size(&mut **t, 2 * i + 1, opts.queue_size)?;
            let mut r = Pool::new(t.dma(), opts.queue_size, rx_len)?;
            let mut w = Pool::new(t.dma(), opts.queue_size, tx_len)?;
            r.q.set_event_idx(event_idx);
            w.q.set_event_idx(event_idx);
            let on = opts.enabled_pairs.is_none_or(|n| i < usize::from(n));
            t.setup_queue(2 * i, &r.q, on)?;
            t.setup_queue(2 * i + 1, &w.q, on)?;
            let mem = t.dma().mem.clone();
            self.qps.push(QueuePair {
                index: i,
                rx: RxQueue {
                    mem: mem.clone(),
                    pool: r,
                    kick: t.doorbell(2 * i)?,
                    call: t.interrupt(2 * i)?,
                    hdr_len,
                    mergeable,
                    scratch: Vec::with_capacity(MAX_FRAME_LEN),
                    rx_length_errors: 0,
                    kicks: 0,
                },
                tx: TxQueue {
                    mem,
                    pool: w,
                    kick: t.doorbell(2 * i + 1)?,
                    call: t.interrupt(2 * i + 1)?,
                    hdr_len,
                    kicks: 0,
                    unkicked: 0,
                    posted: 0,
                    completed: 0,
                    waits: 0,
                    stalls: 0,
                },
            });
        }
        if features.contains(Features::CTRL_VQ) {
            let vq = self.ctrl_index;
            transport::check_queue_size(&mut **t, vq, CTRL_QUEUE)?;
            let c = Pool::new(t.dma(), CTRL_QUEUE, CTRL_BUF)?;
            t.setup_queue(vq, &c.q, true)?;
            self.ctrl = Some((c, t.doorbell(vq)?));
            match opts.toe {
                Some(o) if features.contains(Features::VNIC_TOE) => {
                    self.toe = Some(Self::toe_queues(&mut **t, vq + 1, o, event_idx)?);
                }
                _ => {}
            }
        }
        // Buffers go in before DRIVER_OK (virtio 1.3, 3.1.1 step 7); the
        // device looks at them once it is live.
        for qp in &mut self.qps {
            qp.rx.fill()?;
            // TX completions are reclaimed when posting; the interrupt is
            // armed only to wait for room (see TxQueue::wait_for_room).
            qp.tx.disarm()?;
        }
        transport::finish(&mut **t)
    }

    /// The TOE's command queue at `vq`, its event queue after it, and the
    /// ring memory.
    fn toe_queues(
        t: &mut dyn Transport,
        vq: usize,
        o: ToeOptions,
        event_idx: bool,
    ) -> Result<ToeQueues> {
        if !o.ring.is_power_of_two() || !(RING_MIN..=2 << 20).contains(&o.ring) {
            return Err(crate::Error::Argument(format!(
                "TOE ring of {} bytes: a power of two from 4 KiB to 2 MiB",
                o.ring
            )));
        }
        transport::check_queue_size(t, vq, CMD_QUEUE)?;
        transport::check_queue_size(t, vq + 1, EVT_QUEUE)?;
        let mut cmd = Pool::new(t.dma(), CMD_QUEUE, CMD_LEN + COMPLETION_LEN)?;
        cmd.q.set_event_idx(event_idx);
        let mut evt = Pool::new(t.dma(), EVT_QUEUE, EVENT_LEN)?;
        evt.q.set_event_idx(event_idx);
        t.setup_queue(vq, &cmd.q, true)?;
        t.setup_queue(vq + 1, &evt.q, true)?;
        let mut rings = Vec::with_capacity(usize::from(o.conns));
        for _ in 0..o.conns {
            // Aligned to its size, a ring never straddles a hugepage.
            let mut ring = || -> Result<RingSpec> {
                let a = t.dma().alloc(o.ring as usize, u64::from(o.ring))?;
                Ok(RingSpec {
                    addr: a.0,
                    size: o.ring,
                })
            };
            rings.push((ring()?, ring()?));
        }
        // Handed out from the front.
        rings.reverse();
        Ok(ToeQueues {
            mem: t.dma().mem.clone(),
            cmd,
            cmd_bell: t.doorbell(vq)?,
            evt,
            evt_bell: t.doorbell(vq + 1)?,
            evt_call: t.interrupt(vq + 1)?,
            rings,
            opts: o,
            failed: 0,
        })
    }

    /// Hands the TOE's queues over (to the stack's TOE thread), when the
    /// device took VNIC_TOE and they were asked for. The event buffers
    /// are posted.
    pub fn take_toe(&mut self) -> Result<Option<ToeQueues>> {
        match self.toe.take() {
            Some(mut q) => {
                q.post_event_buffers()?;
                Ok(Some(q))
            }
            None => Ok(None),
        }
    }

    /// The size of each RX buffer.
    fn rx_buf_len(opts: NetOptions) -> usize {
        let mergeable = opts.features.contains(Features::MRG_RXBUF);
        if mergeable || opts.rx_buf_len > 0 {
            opts.rx_buf_len.max(HDR_LEN_HASH)
        } else {
            MAX_FRAME_LEN + HDR_LEN_HASH
        }
    }

    pub fn pairs(&self) -> usize {
        self.npairs
    }

    /// Hands the queue pairs over (to per-pair threads); the device keeps
    /// the control queue and config space, and its own per-queue methods
    /// fail from then on.
    pub fn take_pairs(&mut self) -> Vec<QueuePair> {
        std::mem::take(&mut self.qps)
    }

    fn qp(&mut self, q: usize) -> Result<&mut QueuePair> {
        self.qps
            .get_mut(q)
            .ok_or_else(|| QueueError::NoSuchPair(q).into())
    }

    /// The device's config space.
    pub fn config(&mut self) -> Result<VirtioNetConfig> {
        let b = self.t.read_config(0, CONFIG_LEN)?;
        let arr: [u8; CONFIG_LEN] = b
            .get(..CONFIG_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(QueueError::ShortConfig(CONFIG_LEN))?;
        Ok(VirtioNetConfig::from_bytes(&arr))
    }

    /// Sends a control command and waits for the device's answer: the ack
    /// (`ACK_OK` or `ACK_ERR`) and the answer bytes after it.
    pub fn ctrl(&mut self, cmd: &CtrlCommand) -> Result<(u8, Vec<u8>)> {
        let bytes = cmd.to_bytes()?;
        self.ctrl_raw(&bytes, cmd.response_len())
    }

    /// Sends raw command bytes (class, command, data) with room for
    /// `response_len` answer bytes and the ack.
    pub fn ctrl_raw(&mut self, bytes: &[u8], response_len: usize) -> Result<(u8, Vec<u8>)> {
        let (pool, bell) = self.ctrl.as_mut().ok_or(QueueError::NoControlQueue)?;
        if bytes.len() + response_len + 1 > CTRL_BUF {
            return Err(QueueError::CtrlTooLong(bytes.len() + response_len + 1).into());
        }
        let out = *pool.free.last().ok_or(QueueError::CtrlBusy)?;
        let mem = &self.t.dma().mem;
        mem.write_slice(bytes, out)?;
        let answer = out.unchecked_add_len(bytes.len());
        let mut fill = vec![0xffu8; response_len + 1];
        mem.write_slice(&fill, answer)?;
        pool.add_chain(
            mem,
            &[(out, bytes.len(), false), (answer, response_len + 1, true)],
        )?;
        bell.ring()?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if pool.used(mem)?.is_some() {
                break;
            }
            if Instant::now() > deadline {
                return Err(QueueError::CtrlTimeout.into());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        // The ack comes first, then the answer (virtio 1.3, 5.1.6.5).
        mem.read_slice(&mut fill, answer)?;
        let ack = fill.first().copied().unwrap_or(0xff);
        Ok((ack, fill.split_off(1)))
    }

    /// Posts every free RX buffer of queue `q` and notifies the device,
    /// unless it asked not to be.
    pub fn fill_rx(&mut self, q: usize) -> Result<()> {
        self.qp(q)?.rx.fill()
    }

    /// Sends one frame with its header on TX queue `q`. The header's
    /// `num_buffers` is ignored by the device.
    pub fn send(&mut self, q: usize, hdr: &VirtioNetHdr, frame: &[u8]) -> Result<()> {
        let tx = &mut self.qp(q)?.tx;
        tx.reclaim()?;
        if !tx.post(hdr, frame)? {
            return Err(QueueError::NoBuffers.into());
        }
        tx.unkicked = 0;
        tx.kick.ring()?;
        Ok(())
    }

    /// Makes a frame available on TX queue `q` without notifying the
    /// device; false when the queue is full. See [`VirtioNet::kick_tx`].
    pub fn post_tx(&mut self, q: usize, hdr: &VirtioNetHdr, frame: &[u8]) -> Result<bool> {
        self.qp(q)?.tx.post(hdr, frame)
    }

    /// Notifies the device of frames posted on TX queue `q`, unless it
    /// asked not to be (VRING_USED_F_NO_NOTIFY, or the event index).
    pub fn kick_tx(&mut self, q: usize) -> Result<()> {
        self.qp(q)?.tx.kick()
    }

    /// The transmit half of pair `q`, while the device still holds it.
    pub fn tx(&mut self, q: usize) -> Result<&mut TxQueue> {
        Ok(&mut self.qp(q)?.tx)
    }

    /// Publishes raw descriptors on virtqueue `vq` (see
    /// [`SplitQueue::add_raw`]) and kicks it.
    #[cfg(any(test, feature = "test-util"))]
    pub fn send_raw_chain(&mut self, vq: usize, descs: &[RawDesc]) -> Result<u16> {
        let qp = self.qp(vq / 2)?;
        let (pool, kick, mem) = if vq % 2 == 0 {
            (&mut qp.rx.pool, &qp.rx.kick, &qp.rx.mem)
        } else {
            (&mut qp.tx.pool, &qp.tx.kick, &qp.tx.mem)
        };
        let head = pool.q.add_raw(mem, descs)?;
        kick.ring()?;
        Ok(head)
    }

    /// A guest address inside the shared memory with `len` bytes the
    /// driver does not otherwise use (for raw chains).
    #[cfg(any(test, feature = "test-util"))]
    pub fn scratch(&mut self, len: usize) -> Result<GuestAddress> {
        self.t.dma().alloc(len, 64)
    }

    /// TX chains the device has consumed on queue `q`.
    pub fn reclaim_tx(&mut self, q: usize) -> Result<usize> {
        self.qp(q)?.tx.reclaim()
    }

    /// Number of TX chains still with the device.
    pub fn tx_in_flight(&self, q: usize) -> usize {
        self.qps.get(q).map_or(0, |p| p.tx.pool.in_flight)
    }

    /// Takes one received frame from RX queue `q`, if there is one, and
    /// posts its buffers again.
    pub fn recv(&mut self, q: usize) -> Result<Option<Received>> {
        let r = self.recv_one(q)?;
        if r.is_some() {
            self.fill_rx(q)?;
        }
        Ok(r)
    }

    /// Takes up to `budget` frames from RX queue `q`, handing each to `f`,
    /// then posts the buffers again with one notification. Returns how
    /// many frames there were.
    pub fn recv_batch(
        &mut self,
        q: usize,
        budget: usize,
        f: &mut dyn FnMut(Received),
    ) -> Result<usize> {
        let mut n = 0;
        while n < budget {
            match self.recv_one(q)? {
                Some(r) => {
                    f(r);
                    n += 1;
                }
                None => break,
            }
        }
        if n > 0 {
            self.fill_rx(q)?;
        }
        Ok(n)
    }

    fn recv_one(&mut self, q: usize) -> Result<Option<Received>> {
        let rx = &mut self.qp(q)?.rx;
        let before = rx.rx_length_errors;
        let mut out = None;
        rx.recv_with(&mut |hdr, frame| {
            out = Some(Received {
                hdr: *hdr,
                frame: frame.to_vec(),
                buffers: hdr.num_buffers,
            });
        })?;
        let errs = rx.rx_length_errors - before;
        self.rx_length_errors += errs;
        Ok(out)
    }

    /// Waits up to `timeout` for a frame on RX queue `q`.
    pub fn recv_timeout(&mut self, q: usize, timeout: Duration) -> Result<Option<Received>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = self.recv(q)? {
                return Ok(Some(r));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let qp = self.qp(q)?;
            qp.rx.wait(
                None,
                (deadline - now).clamp(Duration::from_millis(1), Duration::from_millis(50)),
            );
        }
    }
}

trait AddLen {
    fn unchecked_add_len(self, n: usize) -> GuestAddress;
}

impl AddLen for GuestAddress {
    fn unchecked_add_len(self, n: usize) -> GuestAddress {
        GuestAddress(self.0 + n as u64)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use vnic_protocol::virtio::{ctrl::ACK_OK, DeviceStatus, HdrFlags};

    use super::*;
    use crate::{
        transport::fake::{FakeConfig, FakeDevice, FakeTransport},
        Error,
    };

    fn opts() -> NetOptions {
        NetOptions {
            pairs: 2,
            queue_size: 64,
            features: NetOptions::DEFAULT_FEATURES
                | Features::CTRL_VQ
                | Features::MQ
                | Features::EVENT_IDX,
            ..NetOptions::default()
        }
    }

    /// `VirtioNet` over a fake device; the device handle comes back even
    /// when bringing the driver up failed.
    fn bring_up(cfg: FakeConfig, opts: NetOptions) -> (Result<VirtioNet>, FakeDevice) {
        let mut dev = None;
        let r = VirtioNet::start(opts, |queues, mem| {
            assert_eq!(queues, 2 * usize::from(opts.pairs) + 1);
            let (t, d) = FakeTransport::new(cfg, mem)?;
            dev = Some(d);
            Ok(Box::new(t))
        });
        (r, dev.expect("transport made"))
    }

    #[test]
    fn the_init_sequence_and_the_features_both_sides_have() {
        let (net, dev) = bring_up(FakeConfig::default(), opts());
        let mut net = net.unwrap();
        let s = DeviceStatus::ACKNOWLEDGE;
        let d = s | DeviceStatus::DRIVER;
        let f = d | DeviceStatus::FEATURES_OK;
        assert_eq!(
            dev.status_log(),
            vec![DeviceStatus::empty(), s, d, f, f | DeviceStatus::DRIVER_OK]
        );
        let want = FakeConfig::default().features & opts().features;
        assert_eq!(net.features, want);
        assert_eq!(dev.driver_features(), want);
        // Offered but not asked for, and asked for but not offered.
        assert!(!net.features.contains(Features::INDIRECT_DESC));
        assert!(!net.features.contains(Features::HOST_TSO4));
        assert_eq!(net.config().unwrap(), FakeConfig::default().config);
        assert!((0..5).all(|i| dev.enabled(i)));
        // RX buffers were posted before DRIVER_OK, one kick per RX queue.
        assert_eq!(dev.pop_chains(0).unwrap().len(), 64);
        assert_eq!(dev.kicks(0), 1);
    }

    #[test]
    fn a_device_that_refuses_a_feature_is_marked_failed() {
        let cfg = FakeConfig {
            refuses: Features::GUEST_CSUM,
            ..FakeConfig::default()
        };
        let (net, dev) = bring_up(cfg, opts());
        match net {
            Err(Error::FeaturesRefused(f)) => assert!(f.contains(Features::GUEST_CSUM)),
            other => panic!("expected FeaturesRefused, got {other:?}"),
        }
        let log = dev.status_log();
        assert!(
            log.last().unwrap().contains(DeviceStatus::FAILED),
            "{log:?}"
        );
        assert!(log.iter().all(|s| !s.contains(DeviceStatus::DRIVER_OK)));
        // Without the feature it asks for, the same device comes up.
        let mut o = opts();
        o.features -= Features::GUEST_CSUM;
        let (net, dev) = bring_up(cfg, o);
        assert!(net.is_ok());
        assert!(dev.status().contains(DeviceStatus::DRIVER_OK));
    }

    #[test]
    fn a_device_without_version_1_or_with_small_queues_fails() {
        let cfg = FakeConfig {
            features: FakeConfig::default().features - Features::VERSION_1,
            ..FakeConfig::default()
        };
        let (net, dev) = bring_up(cfg, opts());
        assert!(matches!(net, Err(Error::Negotiation(_))), "{net:?}");
        assert!(dev.status().contains(DeviceStatus::FAILED));

        let cfg = FakeConfig {
            max_queue_size: 32,
            ..FakeConfig::default()
        };
        let (net, dev) = bring_up(cfg, opts());
        assert!(
            matches!(
                net,
                Err(Error::Queue(QueueError::TooBig {
                    index: 0,
                    size: 64,
                    max: 32
                }))
            ),
            "{net:?}"
        );
        assert!(dev.status().contains(DeviceStatus::FAILED));
    }

    #[test]
    fn frames_both_ways_byte_for_byte() {
        let (net, dev) = bring_up(FakeConfig::default(), opts());
        let mut net = net.unwrap();
        let hl = net.features.hdr_len();
        let frames: Vec<Vec<u8>> = [60usize, 1514, 9000]
            .iter()
            .map(|&n| (0..n).map(|i| (i * 7 + n) as u8).collect())
            .collect();
        let csum = VirtioNetHdr {
            flags: HdrFlags::NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 6,
            ..VirtioNetHdr::default()
        };
        for f in &frames {
            net.send(1, &csum, f).unwrap();
        }
        let got = dev.transmitted(3).unwrap();
        assert_eq!(got.len(), 3);
        for (g, f) in got.iter().zip(&frames) {
            let h = VirtioNetHdr::parse(&g[..hl], hl == HDR_LEN_HASH).unwrap();
            assert_eq!(h.flags, HdrFlags::NEEDS_CSUM);
            assert_eq!((h.csum_start, h.csum_offset), (34, 6));
            assert_eq!(&g[hl..], &f[..]);
        }
        assert_eq!(net.reclaim_tx(1).unwrap(), 3);
        assert_eq!(net.tx_in_flight(1), 0);

        // Receive on pair 1: 2048-byte buffers, so 9000 bytes take five.
        let valid = VirtioNetHdr {
            flags: HdrFlags::DATA_VALID,
            ..VirtioNetHdr::default()
        };
        for f in &frames {
            assert!(dev.receive(2, &valid, hl, f).unwrap());
        }
        for (f, bufs) in frames.iter().zip([1u16, 1, 5]) {
            let r = net.recv(1).unwrap().expect("a frame");
            assert_eq!(&r.frame, f);
            assert_eq!(r.buffers, bufs);
            assert_eq!(r.hdr.flags, HdrFlags::DATA_VALID);
        }
        assert!(net.recv(1).unwrap().is_none());
        assert!(dev.interrupts(2) >= 1);
    }

    #[test]
    fn control_commands_reach_the_device_and_its_ack_comes_back() {
        let (net, dev) = bring_up(FakeConfig::default(), opts());
        let mut net = net.unwrap();
        let ctrl = 4;
        let server = {
            let dev = dev.clone();
            std::thread::spawn(move || {
                let mut got = Vec::new();
                let end = Instant::now() + Duration::from_secs(5);
                while got.len() < 2 && Instant::now() < end {
                    let ack = if got.is_empty() { ACK_OK } else { 1 };
                    got.extend(dev.serve_ctrl(ctrl, ack).unwrap());
                    std::thread::sleep(Duration::from_millis(1));
                }
                got
            })
        };
        let cmd = CtrlCommand::VqPairsSet(2);
        let (ack, _) = net.ctrl(&cmd).unwrap();
        assert_eq!(ack, ACK_OK);
        let (ack, _) = net.ctrl(&CtrlCommand::VlanAdd(100)).unwrap();
        assert_eq!(ack, 1);
        let got = server.join().unwrap();
        assert_eq!(got[0], cmd.to_bytes().unwrap());
        assert_eq!(got[1], CtrlCommand::VlanAdd(100).to_bytes().unwrap());
        assert_eq!(dev.kicks(ctrl), 2);
    }

    #[test]
    fn tx_rings_the_doorbell_only_when_the_device_asks() {
        let (net, dev) = bring_up(FakeConfig::default(), opts());
        let mut net = net.unwrap();
        let tx = 1;
        // avail_event starts at 0: the first frame rings, the next nine
        // (the device never moved it) do not.
        for _ in 0..10 {
            assert!(net
                .post_tx(0, &VirtioNetHdr::default(), &[0u8; 60])
                .unwrap());
            net.kick_tx(0).unwrap();
        }
        assert_eq!(dev.kicks(tx), 1);
        assert_eq!(dev.transmitted(tx).unwrap().len(), 10);
        dev.want_kicks(tx, true).unwrap();
        net.post_tx(0, &VirtioNetHdr::default(), &[0u8; 60])
            .unwrap();
        net.kick_tx(0).unwrap();
        assert_eq!(dev.kicks(tx), 2);
    }
}
