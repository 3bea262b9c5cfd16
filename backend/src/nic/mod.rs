//! The device model, free of vhost: the NIC's ports (the PF and its VFs),
//! the embedded switch between them and the uplink, transmit decisions
//! (pass GSO through, segment or checksum in software), RSS steering, the
//! per-queue backlogs that carry frames between workers and ports, and the
//! counters.

pub mod coalesce;
pub mod ctrl;
pub mod port;
pub mod rsc;
pub mod stats;
pub mod switch;
pub mod toe;
pub mod vf;

use std::{
    collections::VecDeque,
    io,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard, PoisonError, Weak,
    },
    time::Instant,
};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vnic_protocol::{
    offload::{complete_checksum, Segmenter},
    rss::{HashTypes, IndirectionTable, Rss, RssError, Steering},
    virtio::{
        hdr::{GsoType, HDR_LEN},
        validate::{MAX_FRAME_LEN, MIN_FRAME_LEN},
        validate_prefix, Features, HdrFlags, Validated, VirtioNetHdr,
    },
    wire::ethernet::{is_vlan_tpid, Address},
};

use self::{
    ctrl::CtrlState,
    switch::{
        insert_tag, strip_tag, PortSet, PortView, Route, Switch, View, L2, MAX_LEARNED, NO_HASH,
    },
    vf::{LinkShares, SettingError, TokenBucket, VfSettings},
};
pub use self::{
    port::Port,
    stats::{DropReason, QueueStats, Stats},
};
use crate::uplink::{tap::VNET_HDR_LEN, Offloads, Piece, PieceMut, Uplink, MAX_PIECES};

/// Largest frame the device moves (a 64 KiB GSO frame and its headers).
pub const MAX_FRAME: usize = vnic_protocol::virtio::validate::MAX_FRAME_LEN;

/// RSS settings of the operator (or the defaults Linux would choose).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RssSettings {
    pub key: Vec<u8>,
    /// Empty: spread over all queues, 128 entries, as Linux does.
    pub table: Vec<u16>,
    pub hash_types: HashTypes,
}

impl Default for RssSettings {
    fn default() -> Self {
        RssSettings {
            key: vnic_protocol::rss::DEFAULT_KEY.to_vec(),
            table: Vec::new(),
            hash_types: HashTypes::LINUX_DEFAULT,
        }
    }
}

/// What the device is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    pub pairs: u16,
    pub queue_size: u16,
    pub mac: Address,
    pub mtu: u16,
    pub rss: RssSettings,
    /// Notification coalescing until the driver sets its own.
    pub coalesce: coalesce::CoalConfig,
    /// Receive segment coalescing (ethtool's rx-gro-hw) at start.
    pub rx_gro_hw: bool,
    /// Worker threads for the queue pairs; 0: one per pair, up to the
    /// CPUs available (`vhost::worker_threads`).
    pub workers: u16,
    /// TOE connections (and listeners) a driver may have; 0: the TOE is
    /// not offered.
    pub toe_conns: u32,
    /// The transmit capacity the ports share, in Mbit/s (what VFs'
    /// `min_tx_rate` guarantees are shares of); 0: no limit.
    pub link_speed: u32,
    /// How long, in microseconds, a transmit worker that emptied a ring
    /// keeps looking at it before it turns the driver's kicks back on
    /// and sleeps; 0: it sleeps at once.
    pub poll_us: u32,
}

impl DeviceConfig {
    /// A device of `pairs` queue pairs at `mac` with every other setting
    /// as vnicd's command line has it by default: 256-entry queues, MTU
    /// 1500, RSS over every queue, no coalescing, no RSC, a worker per
    /// pair, 1024 TOE connections, no shared link, no polling.
    pub fn new(pairs: u16, mac: Address) -> DeviceConfig {
        DeviceConfig {
            pairs,
            queue_size: 256,
            mac,
            mtu: 1500,
            rss: RssSettings::default(),
            coalesce: coalesce::CoalConfig::default(),
            rx_gro_hw: false,
            workers: 0,
            toe_conns: 1024,
            link_speed: 0,
            poll_us: 0,
        }
    }

    pub fn build_rss(&self) -> Result<Rss, RssError> {
        let table = if self.rss.table.is_empty() {
            IndirectionTable::spread(128, self.pairs)?
        } else {
            IndirectionTable::new(self.rss.table.clone(), self.pairs)?
        };
        Rss::new(&self.rss.key, self.rss.hash_types, table, 0)
    }
}

/// Frames waiting for an RX queue: steered there by RSS from another
/// worker, or read while the queue had no buffers. Bounded in frames and
/// in bytes: every buffer it holds, queued or kept for reuse, is charged
/// by its capacity. Buffers are recycled so the steady state does not
/// allocate.
#[derive(Debug)]
pub struct Backlog {
    inner: Mutex<BacklogInner>,
    /// Frames queued, readable without the lock (a hint: exact under it).
    queued: AtomicUsize,
    /// Signalled when frames are added; the owning worker listens on it.
    pub event: EventFd,
    max_frames: usize,
    max_bytes: usize,
}

#[derive(Debug, Default)]
struct BacklogInner {
    frames: VecDeque<Vec<u8>>,
    /// Buffers of delivered frames, kept for the next ones.
    free: Vec<Vec<u8>>,
    /// Capacity of every buffer in `frames` and `free`.
    held: usize,
}

/// Recycled buffers kept per backlog.
const BACKLOG_FREE: usize = 64;

impl Backlog {
    pub fn new(max_frames: usize, max_bytes: usize) -> io::Result<Backlog> {
        Ok(Backlog {
            queued: AtomicUsize::new(0),
            inner: Mutex::new(BacklogInner {
                frames: VecDeque::with_capacity(max_frames),
                ..Default::default()
            }),
            event: EventFd::new(EFD_NONBLOCK)?,
            max_frames,
            max_bytes,
        })
    }

    fn lock(&self) -> MutexGuard<'_, BacklogInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a copy of `frame`; false (and nothing queued) when that
    /// would pass either bound.
    pub fn push(&self, frame: &[u8]) -> bool {
        self.push_from(frame.len(), |b| b.extend_from_slice(frame))
            .is_some()
    }

    /// Queues a frame of `len` bytes that `fill` appends to an empty
    /// buffer, so a frame in pieces is copied once. None (and nothing
    /// queued) when that would pass either bound; otherwise whether the
    /// backlog was empty, so that the caller wakes the consumer only
    /// then (it drains until empty, or wakes itself when it stops short).
    pub fn push_from(&self, len: usize, fill: impl FnOnce(&mut Vec<u8>)) -> Option<bool> {
        let mut g = self.lock();
        if g.frames.len() >= self.max_frames || len > self.max_bytes {
            return None;
        }
        // A recycled buffer, unless it is far larger than needed (a 64 KiB
        // buffer must not hold a 60-byte frame against the byte bound).
        let mut buf = match g.free.pop() {
            Some(b) if b.capacity() <= 4 * len.max(2048) => b,
            Some(b) => {
                g.held -= b.capacity();
                drop(b);
                Vec::new()
            }
            None => Vec::new(),
        };
        g.held -= buf.capacity();
        let need = buf.capacity().max(len);
        // Make room by giving recycled buffers back first.
        while g.held + need > self.max_bytes {
            let Some(b) = g.free.pop() else { break };
            g.held -= b.capacity();
        }
        if g.held + need > self.max_bytes {
            if g.held + buf.capacity() <= self.max_bytes && buf.capacity() > 0 {
                g.held += buf.capacity();
                g.free.push(buf);
            }
            return None;
        }
        buf.clear();
        buf.reserve_exact(len);
        fill(&mut buf);
        buf.truncate(len);
        g.held += buf.capacity();
        let was_empty = g.frames.is_empty();
        g.frames.push_back(buf);
        self.queued.store(g.frames.len(), Ordering::Release);
        Some(was_empty)
    }

    /// [`Backlog::push_from`], then signals the event if the backlog was
    /// empty; false when the frame did not fit.
    pub fn push_and_wake(&self, len: usize, fill: impl FnOnce(&mut Vec<u8>)) -> bool {
        match self.push_from(len, fill) {
            Some(true) => {
                let _ = self.event.write(1);
                true
            }
            Some(false) => true,
            None => false,
        }
    }

    /// Hands the oldest frame to `f`; it stays queued when `f` returns
    /// false (no room yet). Returns None when empty.
    pub fn deliver_front(&self, f: impl FnOnce(&[u8]) -> bool) -> Option<bool> {
        let mut g = self.lock();
        let front = g.frames.front()?;
        if !f(front) {
            return Some(false);
        }
        self.pop_front(&mut g);
        Some(true)
    }

    /// Takes the oldest frame off, keeping its buffer for reuse.
    fn pop_front(&self, g: &mut BacklogInner) {
        if let Some(buf) = g.frames.pop_front() {
            self.queued.store(g.frames.len(), Ordering::Release);
            if g.free.len() < BACKLOG_FREE {
                g.free.push(buf);
            } else {
                g.held -= buf.capacity();
            }
        }
    }

    /// [`Backlog::deliver_front`] with the backlog's lock let go of while
    /// `f` runs: the oldest frame is copied into `buf` (grown if need
    /// be) and taken off only when `f` says so. For an `f` that takes
    /// other locks (the TOE's), which another thread may hold while it
    /// pushes here. Only the backlog's consumer takes frames off, so the
    /// front is the same when `f` returns (unless a reset cleared it).
    pub fn deliver_front_unlocked(
        &self,
        buf: &mut Vec<u8>,
        f: impl FnOnce(&[u8]) -> bool,
    ) -> Option<bool> {
        let (len, id) = {
            let g = self.lock();
            let front = g.frames.front()?;
            if buf.len() < front.len() {
                buf.resize(front.len(), 0);
            }
            buf[..front.len()].copy_from_slice(front);
            (front.len(), front.as_ptr() as usize)
        };
        if !f(&buf[..len]) {
            return Some(false);
        }
        let mut g = self.lock();
        if g.frames.front().is_some_and(|b| b.as_ptr() as usize == id) {
            self.pop_front(&mut g);
        }
        Some(true)
    }

    pub fn len(&self) -> usize {
        self.lock().frames.len()
    }

    /// Whether frames wait, without taking the lock (they may be taken or
    /// added meanwhile).
    pub fn looks_empty(&self) -> bool {
        self.queued.load(Ordering::Acquire) == 0
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of buffers held, queued or kept for reuse.
    pub fn held_bytes(&self) -> usize {
        self.lock().held
    }

    /// Drops everything queued and every recycled buffer (device reset).
    pub fn clear(&self) {
        let mut g = self.lock();
        g.frames.clear();
        g.free.clear();
        g.held = 0;
        self.queued.store(0, Ordering::Release);
    }
}

/// A set of RX queues frames may be steered to: the pairs the driver
/// enabled (SET_VRING_ENABLE from a VMM, VQ_PAIRS_SET on our control
/// queue).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSet(pub u32);

impl QueueSet {
    /// The queue for a frame RSS sent to `q`: `q` itself when enabled,
    /// else an enabled queue chosen by `q` (so one flow stays on one
    /// queue); `fallback` when none is enabled.
    pub fn pick(self, q: usize, fallback: usize) -> usize {
        if q < 32 && self.0 & (1 << q) != 0 {
            return q;
        }
        let n = self.0.count_ones() as usize;
        if n == 0 {
            return fallback;
        }
        let mut k = q % n;
        let mut bits = self.0;
        loop {
            let i = bits.trailing_zeros() as usize;
            if k == 0 {
                return i;
            }
            k -= 1;
            bits &= bits - 1;
        }
    }
}

/// Scratch space of one worker: segmentation, and the copies a frame
/// needs on its way to other ports.
#[derive(Debug, Default)]
pub struct TxScratch {
    seg: Segmenter,
    /// A frame in one piece for software offloads.
    frame: Vec<u8>,
    /// A frame with its 12-byte header, as it enters the switch.
    copy: Vec<u8>,
    /// The same frame as one receiving port gets it.
    port: Vec<u8>,
    /// A segment on its way into a port's backlog.
    piece: Vec<u8>,
    /// Backlogs that went from empty to not empty in this batch.
    pub wakes: Wakes,
    /// Frames sent and their bytes, not yet in the queue's counters:
    /// added once per batch ([`TxScratch::settle`]) rather than with two
    /// atomic adds a frame.
    sent: (u64, u64),
}

impl TxScratch {
    /// Adds the frames sent since the last call to `stats`.
    pub fn settle(&mut self, stats: &QueueStats) {
        let (n, bytes) = std::mem::take(&mut self.sent);
        if n > 0 {
            stats.packets(n, bytes);
        }
    }
}

/// An Ethernet header and one VLAN tag: all of a frame the switch reads
/// to route it.
pub const ETH_AND_TAG: usize = 18;

/// A port alone on the switch, as [`Nic::lone`] found it for one burst.
pub struct Lone<'a> {
    /// The port's own address, and without spoof checking the addresses
    /// learned from its frames: a frame from another goes the whole way
    /// (it may be spoofed, or an address to learn).
    mac: Address,
    learned: &'a [Address],
    /// The longest untagged frame its MTU lets through.
    max_len: usize,
    /// The offloads the uplink does itself.
    caps: Offloads,
    out: &'a dyn Uplink,
    /// The uplink queue the TX queue's frames go to.
    uq: usize,
}

impl std::fmt::Debug for Lone<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lone")
            .field("mac", &self.mac)
            .field("max_len", &self.max_len)
            .field("uq", &self.uq)
            .finish_non_exhaustive()
    }
}

/// A frame switched to another port's RX queue, waiting to be written
/// into its buffers with the others of the batch (12-byte header first).
#[derive(Debug)]
pub struct Pending {
    pub frame: Vec<u8>,
    pub steering: Steering,
}

/// Frames for one RX queue of another port, to be written straight into
/// its buffers.
struct Direct {
    port: usize,
    q: usize,
    rx: Arc<dyn RxPath>,
    frames: Vec<Pending>,
}

/// Buffers of delivered frames a worker keeps for the next ones.
const SPARE_BUFFERS: usize = 64;

/// What a worker's batch owes other ports: frames to write straight into
/// their RX buffers, and backlogs whose consumers are to be woken. Both
/// are settled ([`Nic::wake`]) once per [`WAKE_FRAMES`] frames or
/// [`WAKE_BYTES`] bytes, or at the end of the batch, rather than per
/// frame (small frames: one lock of the receiving ring, one reading of
/// its index and one notification for up to 32), yet without holding a
/// big frame back for a whole batch (TCP's ACK clock).
#[derive(Default)]
pub struct Wakes {
    to: Vec<(usize, usize)>,
    /// Frames for other ports' RX queues, per queue in the order they
    /// came.
    direct: Vec<Direct>,
    frames: usize,
    bytes: usize,
    /// Recycled frame buffers.
    spare: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Wakes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wakes")
            .field("to", &self.to)
            .field("direct", &self.direct.len())
            .finish_non_exhaustive()
    }
}

/// Frames queued to other workers before they are woken.
pub const WAKE_FRAMES: usize = 32;
/// Bytes queued to other workers before they are woken.
pub const WAKE_BYTES: usize = 64 << 10;

impl Wakes {
    fn add(&mut self, port: usize, q: usize, len: usize) {
        if !self.to.contains(&(port, q)) {
            self.to.push((port, q));
        }
        self.held(len);
    }

    fn held(&mut self, len: usize) {
        self.frames += 1;
        self.bytes += len;
    }

    /// Whether enough waits for the consumers to be woken now.
    pub fn due(&self) -> bool {
        (!self.to.is_empty() || !self.direct.is_empty())
            && (self.frames >= WAKE_FRAMES || self.bytes >= WAKE_BYTES)
    }

    /// Whether frames for RX queue `q` of port `port` wait here.
    fn has_direct(&self, port: usize, q: usize) -> bool {
        self.direct.iter().any(|d| d.port == port && d.q == q)
    }

    /// Keeps a frame of `len` bytes that `fill` writes for RX queue `q` of
    /// port `port`, to be written straight into its buffers.
    fn stage(
        &mut self,
        port: usize,
        q: usize,
        rx: Arc<dyn RxPath>,
        steering: Steering,
        len: usize,
        fill: impl FnOnce(&mut Vec<u8>),
    ) {
        let mut frame = self.spare.pop().unwrap_or_default();
        frame.clear();
        fill(&mut frame);
        frame.truncate(len);
        let p = Pending { frame, steering };
        match self.direct.iter_mut().find(|d| d.port == port && d.q == q) {
            Some(d) => d.frames.push(p),
            None => self.direct.push(Direct {
                port,
                q,
                rx,
                frames: vec![p],
            }),
        }
        self.held(len);
    }
}

/// The receive side of a port's frontend, which the switch writes into
/// directly: the frame is copied once more, into the receiving guest's
/// buffers, by the worker that switched it, with no hand-over to the
/// receiving port's worker. The port's vhost backend implements it.
pub trait RxPath: Send + Sync {
    /// Writes `frames` in order into RX queue `q`, each with its hash,
    /// until the queue cannot take the next now (no buffers, not
    /// running): how many it took. A frame the queue's buffers cannot
    /// hold is dropped and counted, and taken.
    fn deliver(&self, q: usize, frames: &[Pending]) -> usize;
    /// Tells RX queue `q` that `frames` were delivered: its driver is
    /// signalled, if it wants, now or when the queue's coalescing says.
    fn flush(&self, q: usize, frames: u32);
    /// The port's coalescing parameters changed: held notifications that
    /// are now due go out.
    fn coalescing_changed(&self) {}
}

/// A port's [`RxPath`] as the switch's view holds it: weakly, so a
/// frontend that goes away is not kept by a stale view.
#[derive(Clone)]
pub struct RxHandle(pub Weak<dyn RxPath>);

impl std::fmt::Debug for RxHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RxHandle")
    }
}

/// Where a frame read from the uplink goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UplinkRoute {
    /// To the PF alone, unchanged: it may stay in the buffers it was read
    /// into. RSS sends it to this queue.
    Pf(Steering),
    /// Anywhere else too: through [`Nic::from_uplink`].
    Switch,
    /// Nowhere.
    Drop(DropReason),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// VFs' `min_tx_rate` guarantees (Mbit/s, 0 for none) are shares of the
/// link: they need `--link-speed`, and may not add up to more than it.
fn check_guarantees(link_speed: u32, mins: impl Iterator<Item = u32>) -> Result<(), SettingError> {
    let (mut sum, mut any) = (0u64, 0u32);
    for m in mins {
        sum += u64::from(m);
        any = any.max(m);
    }
    if any > 0 && link_speed == 0 {
        return Err(SettingError::new(
            "min_tx_rate",
            &any.to_string(),
            "a guarantee is a share of the link: start vnicd with --link-speed",
        ));
    }
    if sum > u64::from(link_speed) && any > 0 {
        return Err(SettingError::new(
            "min_tx_rate",
            &any.to_string(),
            &format!("the VFs' guarantees would add up to {sum} Mbit/s, more than --link-speed {link_speed}"),
        ));
    }
    Ok(())
}

/// The NIC: its ports (the PF, then the VFs), the switch between them and
/// the uplink they share.
pub struct Nic {
    pub ports: Vec<Port>,
    pub switch: Switch,
    uplink: Box<dyn Uplink>,
    /// Switchdev mode: VF n's representor is entry n.
    representors: Vec<Box<dyn Uplink>>,
    /// Serialises changes to learned addresses.
    learning: Mutex<()>,
    /// Serialises administrative changes (`set_vf`).
    admin: Mutex<()>,
    /// The time base of rate limiting.
    epoch: Instant,
    /// `--link-speed`: the ports' shares of it (`min_tx_rate`).
    link: Option<Mutex<LinkShares>>,
}

impl std::fmt::Debug for Nic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nic")
            .field("ports", &self.ports.len())
            .finish_non_exhaustive()
    }
}

/// Backlog frames per RX queue.
pub const BACKLOG_FRAMES: usize = 1024;
/// Backlog bytes per RX queue: 128 GSO frames of 64 KiB, or all 1024
/// frames at 1514 bytes.
pub const BACKLOG_BYTES: usize = 8 << 20;
/// Most VFs one vnicd serves.
pub const MAX_VFS: usize = 64;

/// The MAC of VF `n` when none is given: the PF's first four octets, then
/// 0xf0 | n >> 8 and n & 0xff.
pub fn default_vf_mac(pf: Address, n: usize) -> Address {
    let mut m = pf.0;
    m[4] = 0xf0 | ((n >> 8) as u8 & 0x0f);
    m[5] = n as u8;
    Address(m)
}

impl Nic {
    /// A NIC with a PF of `config` and one VF per entry of `vfs`; every
    /// port has the PF's queues, MTU and RSS settings. With
    /// `representors` (one per VF) the switch is in switchdev mode.
    pub fn new(
        config: DeviceConfig,
        vfs: Vec<VfSettings>,
        uplink: Box<dyn Uplink>,
        representors: Vec<Box<dyn Uplink>>,
    ) -> io::Result<Nic> {
        let switchdev = !representors.is_empty();
        if switchdev && representors.len() != vfs.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "switchdev mode needs one representor per VF",
            ));
        }
        if vfs.len() > MAX_VFS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} VFs, at most {MAX_VFS}", vfs.len()),
            ));
        }
        check_guarantees(config.link_speed, vfs.iter().map(|s| s.min_tx_rate))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let mut link =
            (config.link_speed > 0).then(|| LinkShares::new(config.link_speed, 1 + vfs.len(), 0));
        let mut ports = vec![Port::new(0, config.clone(), VfSettings::pf(config.mac))?];
        for (n, s) in vfs.into_iter().enumerate() {
            if ports.iter().any(|p| p.settings().mac == s.mac) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("VF {n}: MAC {} is another port's", s.mac),
                ));
            }
            if let Some(l) = link.as_mut() {
                l.set_min(1 + n, s.min_tx_rate, 0);
            }
            ports.push(Port::new(1 + n, config.clone(), s)?);
        }
        let nic = Nic {
            switch: Switch::new(View {
                gen: 0,
                ports: Vec::new(),
                uplink_up: true,
                switchdev,
            }),
            ports,
            uplink,
            representors,
            learning: Mutex::new(()),
            admin: Mutex::new(()),
            epoch: Instant::now(),
            link: link.map(Mutex::new),
        };
        for p in 0..nic.ports.len() {
            nic.publish(p);
        }
        Ok(nic)
    }

    /// A NIC with a PF only.
    pub fn single(config: DeviceConfig, uplink: Box<dyn Uplink>) -> io::Result<Nic> {
        Nic::new(config, Vec::new(), uplink, Vec::new())
    }

    pub fn pf(&self) -> &Port {
        &self.ports[0]
    }

    pub fn uplink(&self) -> &dyn Uplink {
        self.uplink.as_ref()
    }

    /// Nanoseconds since the NIC was made (the rate limiters' clock).
    pub fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Replaces port `p`'s entry in the switch's view with its state now.
    /// Lock order: the port's control state, then its settings, then the
    /// view.
    pub fn publish(&self, p: usize) {
        let Some(port) = self.ports.get(p) else {
            return;
        };
        let caps = port.rx_caps();
        let st = port.ctrl_state();
        let settings = port.settings().clone();
        let attached = port.is_attached();
        let rx = port.rx_path();
        let hash_report = port.acked().contains(Features::HASH_REPORT);
        self.switch.update(|v| {
            let learned = v
                .ports
                .get(p)
                .map(|old| old.learned.clone())
                .unwrap_or_default();
            let pv = Arc::new(PortView {
                mac: st.mac,
                filter: st.filter.clone(),
                rss: st.rss.clone(),
                settings,
                caps,
                attached,
                learned,
                is_vf: p > 0,
                rx,
                hash_report,
            });
            if p < v.ports.len() {
                v.ports[p] = pv;
            } else {
                v.ports.push(pv);
            }
        });
    }

    /// Lets the switch write into port `p`'s RX queues directly (its
    /// frontend's backend), or stops it.
    pub fn set_rx_path(&self, p: usize, rx: Option<Weak<dyn RxPath>>) {
        if let Some(port) = self.ports.get(p) {
            port.set_rx_path(rx.map(RxHandle));
            self.publish(p);
        }
    }

    /// Records that a frontend came or went on port `p`.
    pub fn attach(&self, p: usize, on: bool) {
        if let Some(port) = self.ports.get(p) {
            port.set_attached(on);
            self.publish(p);
        }
    }

    /// Applies the receive offloads the driver of port `p` accepted; the
    /// PF's also go to the uplink.
    pub fn set_guest_features(&self, p: usize, acked: Features) -> io::Result<()> {
        let Some(port) = self.ports.get(p) else {
            return Ok(());
        };
        port.set_acked(acked);
        self.publish(p);
        if p == 0 {
            self.uplink.set_rx_offloads(port::rx_offloads(acked))?;
        }
        Ok(())
    }

    /// Sets one of port `p`'s offloads by `ethtool -K`'s name; only
    /// `rx-gro-hw` (receive segment coalescing) is the device's to switch.
    pub fn set_offload(&self, p: usize, key: &str, value: &str) -> Result<(), String> {
        let port = self.ports.get(p).ok_or_else(|| format!("no port {p}"))?;
        let on = match value {
            "on" => true,
            "off" => false,
            _ => return Err(format!("{key}: `{value}` is neither on nor off")),
        };
        match key {
            "rx-gro-hw" => port.set_rsc(on),
            _ => return Err(format!("unknown offload `{key}` (rx-gro-hw)")),
        }
        Ok(())
    }

    /// Changes the receive offloads in force (GUEST_OFFLOADS_SET).
    fn set_rx_features(&self, p: usize, f: Features) -> io::Result<()> {
        let Some(port) = self.ports.get(p) else {
            return Ok(());
        };
        port.set_rx_features(f);
        if p == 0 {
            self.uplink.set_rx_offloads(port::rx_offloads(f))?;
        }
        Ok(())
    }

    /// Applies `key value` settings to port `p` (see
    /// [`VfSettings::with`]): all of them, or none when one is bad.
    pub fn set_vf(&self, p: usize, pairs: &[(&str, &str)]) -> Result<(), SettingError> {
        let port = self
            .ports
            .get(p)
            .filter(|_| p > 0)
            .ok_or_else(|| SettingError {
                key: "vf".into(),
                value: p.saturating_sub(1).to_string(),
                why: format!("this vnicd has {} VFs", self.ports.len() - 1),
            })?;
        // One change at a time; no port's lock is held while another's is
        // taken.
        let _admin = self.admin.lock().unwrap_or_else(PoisonError::into_inner);
        let cur = port.settings().clone();
        let new = cur.with(pairs.iter().copied())?;
        if new.min_tx_rate != cur.min_tx_rate {
            let others = self
                .ports
                .iter()
                .filter(|o| o.id != p)
                .map(|o| o.settings().min_tx_rate);
            check_guarantees(self.link_speed(), others.chain([new.min_tx_rate]))?;
        }
        if new.mac != cur.mac {
            let taken = self
                .ports
                .iter()
                .filter(|o| o.id != p)
                .any(|o| o.ctrl_state().mac == new.mac);
            if taken {
                return Err(SettingError {
                    key: "mac".into(),
                    value: new.mac.to_string(),
                    why: "another port has it".into(),
                });
            }
        }
        {
            let mut st = port.ctrl_state();
            let mut s = port.settings();
            if new.mac != cur.mac {
                st.mac = new.mac;
            }
            if new.max_tx_rate != cur.max_tx_rate {
                *port.bucket() =
                    (new.max_tx_rate > 0).then(|| TokenBucket::new(new.max_tx_rate, self.now()));
            }
            if new.min_tx_rate != cur.min_tx_rate {
                if let Some(l) = &self.link {
                    lock(l).set_min(p, new.min_tx_rate, self.now());
                }
            }
            *s = new;
        }
        self.publish(p);
        Ok(())
    }

    /// Back to the state of a freshly created port (new frontend, or the
    /// driver reset it): configured RSS, no filters, no coalescing, the
    /// settings' MAC.
    pub fn reset(&self, p: usize) -> io::Result<()> {
        let Some(port) = self.ports.get(p) else {
            return Ok(());
        };
        let rss = port
            .config
            .build_rss()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        {
            let mut st = port.ctrl_state();
            let mac = port.settings().mac;
            *st = CtrlState::new(mac, &port.config, rss);
            port.reset_coalescing(&st.coal);
        }
        // Until the new driver negotiates, the port takes no offloads.
        port.set_acked(Features::empty());
        for b in &port.backlogs {
            b.clear();
        }
        self.switch.update(|v| {
            if let Some(pv) = v.ports.get_mut(p) {
                let mut n = (**pv).clone();
                n.learned.clear();
                *pv = Arc::new(n);
            }
        });
        self.publish(p);
        Ok(())
    }

    /// Whether port `p`'s receive filters and VLAN take `frame`.
    pub fn rx_accepts(&self, p: usize, frame: &[u8]) -> bool {
        let view = self.switch.view();
        let (Some(pv), Some(l2)) = (view.ports.get(p), L2::parse(frame)) else {
            return false;
        };
        pv.accepts(&l2)
    }

    /// Where port `p`'s RSS sends a received frame.
    pub fn steer(&self, p: usize, frame: &[u8]) -> Steering {
        let view = self.switch.view();
        match view.ports.get(p) {
            Some(pv) => pv.steer(frame, frame.len()),
            None => NO_HASH,
        }
    }

    /// Whether port `p`'s sending may be held back at all (a
    /// `max_tx_rate`, or `--link-speed`): when not, [`Nic::tx_wait`] is
    /// always None.
    pub fn paced(&self, p: usize, view: &View) -> bool {
        self.link.is_some() || capped(view, p)
    }

    /// How long port `p` must wait before it sends again (its
    /// `max_tx_rate`, and its share of `--link-speed`), in nanoseconds;
    /// None when it may send now.
    pub fn tx_wait(&self, p: usize, view: &View) -> Option<u64> {
        let capped = view.ports.get(p)?.settings.max_tx_rate > 0;
        if !capped && self.link.is_none() {
            return None;
        }
        let now = self.now();
        let cap = if capped {
            self.ports
                .get(p)?
                .bucket()
                .as_mut()
                .and_then(|b| b.wait(now))
        } else {
            None
        };
        let share = self.link.as_ref().and_then(|l| lock(l).wait(p, now));
        cap.max(share)
    }

    /// `--link-speed` in Mbit/s; 0: none.
    pub fn link_speed(&self) -> u32 {
        self.ports[0].config.link_speed
    }

    /// Sends one frame port `p`'s driver put on TX queue `q`: `hdr` is the
    /// driver's virtio-net header (12 or 20 bytes; the first 12 travel
    /// on) and `frame` the whole frame.
    pub fn transmit(
        &self,
        p: usize,
        q: usize,
        hdr: &[u8],
        frame: &[u8],
        scratch: &mut TxScratch,
    ) -> Result<(), DropReason> {
        self.transmit_vectored(p, q, hdr, frame, &[], scratch)
    }

    /// [`Nic::transmit`] for a frame in pieces of vnicd's own memory:
    /// `head` (all its headers), then `rest` (at most two pieces more are
    /// taken), written to the uplink in one vectored write without being
    /// put together when it takes the frame as it is.
    pub fn transmit_vectored(
        &self,
        p: usize,
        q: usize,
        hdr: &[u8],
        head: &[u8],
        rest: &[&[u8]],
        scratch: &mut TxScratch,
    ) -> Result<(), DropReason> {
        let view = self.switch.view();
        let mut pieces = [Piece::Local(&[]), Piece::Local(&[])];
        let mut n = 0;
        for r in rest.iter().filter(|r| !r.is_empty()).take(pieces.len()) {
            pieces[n] = Piece::Local(r);
            n += 1;
        }
        let r = self.transmit_pieces(p, q, hdr, head, &pieces[..n], scratch, &view);
        if let Some(stats) = self.ports.get(p).and_then(|port| port.stats.tx.get(q)) {
            scratch.settle(stats);
        }
        self.wake(&mut scratch.wakes);
        r
    }

    /// What port `p` needs, in `view`, to send a frame from TX queue `q`
    /// straight to the uplink ([`Nic::transmit_lone`]): the port is
    /// alone on the switch (no VFs, so every frame it sends goes to the
    /// wire), has no port VLAN, its link is up and nothing paces it. None
    /// otherwise. Decided once per burst, as `view` only changes with
    /// control commands.
    pub fn lone<'a>(&'a self, p: usize, q: usize, view: &'a View) -> Option<Lone<'a>> {
        if view.ports.len() != 1 || self.paced(p, view) {
            return None;
        }
        let pv = view.ports.get(p)?;
        if pv.is_vf || pv.settings.vlan.is_some() || !pv.link_up(view.uplink_up) {
            return None;
        }
        let out = self.uplink.as_ref();
        let mtu = usize::from(self.ports.get(p)?.config.mtu);
        Some(Lone {
            caps: out.tx_offloads(),
            mac: pv.mac,
            learned: if pv.settings.spoofchk {
                &[]
            } else {
                &pv.learned
            },
            max_len: (mtu + 14 + 8).min(MAX_FRAME_LEN),
            out,
            uq: q % out.queues().max(1),
        })
    }

    /// Sends a frame of a [`Nic::lone`] port that the uplink takes as it
    /// is: an untagged Ethernet frame from the port's own address (or one
    /// it learned) whose 12-byte header asks for nothing, or for a
    /// checksum or segmentation the uplink does itself. Such a frame
    /// takes the same way through [`Nic::transmit_pieces`] (the switch
    /// sends it to the wire as it is); here it skips the route and, when
    /// it asks for nothing, the parsing too. None: not such a frame,
    /// nothing done; the caller sends it through
    /// [`Nic::transmit_pieces`]. Counted as there: sent in `scratch`, a
    /// failed write and GSO frames in `stats`.
    ///
    /// `framed` is the driver's header (`hdr_len` bytes) followed by the
    /// frame's copied prefix; `rest` the frame's remaining pieces. A
    /// 12-byte header whose `num_buffers` is zero, as the uplink gets it,
    /// goes out together with the prefix as one piece.
    #[inline]
    pub fn transmit_lone(
        &self,
        lone: &Lone<'_>,
        framed: &[u8],
        hdr_len: usize,
        rest: &[Piece<'_>],
        scratch: &mut TxScratch,
        stats: &QueueStats,
    ) -> Option<()> {
        let prefix = framed.get(hdr_len..)?;
        let h: [u8; HDR_LEN] = framed.get(..HDR_LEN)?.try_into().ok()?;
        let len = prefix.len() + rest.iter().map(Piece::len).sum::<usize>();
        if rest.len() + 2 > MAX_PIECES {
            return None;
        }
        let gso = if h[0] == 0 && h[1] == 0 {
            // Asks for nothing: only its header length and its own to
            // check.
            let hdr_len = usize::from(u16::from_le_bytes([h[2], h[3]]));
            if hdr_len > len || !(MIN_FRAME_LEN..=lone.max_len).contains(&len) {
                return None;
            }
            false
        } else {
            self.lone_offloads(lone, &h, prefix, len)?
        };
        let eth: &[u8; 14] = prefix.get(..14)?.try_into().ok()?;
        if is_vlan_tpid(u16::from_be_bytes([eth[12], eth[13]])) {
            return None;
        }
        if eth[6..12] != lone.mac.0 && !lone.learned.iter().any(|a| eth[6..12] == a.0) {
            return None;
        }
        if gso {
            stats.gso_packets.fetch_add(1, Ordering::Relaxed);
        }
        // The uplink's header: the driver's first 12 bytes with
        // `num_buffers` zero.
        let vhdr;
        let (whole, parts);
        let front: &[Piece<'_>] = if hdr_len == HDR_LEN && h[10] == 0 && h[11] == 0 {
            whole = [Piece::Local(framed)];
            &whole
        } else {
            let mut v = h;
            v[10] = 0;
            v[11] = 0;
            vhdr = v;
            parts = [Piece::Local(&vhdr), Piece::Local(prefix)];
            &parts
        };
        match sent(lone.out.send_parts(lone.uq, front, rest), lone.uq) {
            Ok(()) => {
                scratch.sent.0 += 1;
                scratch.sent.1 += len as u64;
            }
            Err(why) => stats.drop(why),
        }
        Some(())
    }

    /// For [`Nic::transmit_lone`], a frame whose header asks for an
    /// offload: checked as [`Nic::transmit_pieces`] checks it, and taken
    /// when the uplink does the offload itself. Some(whether it is a GSO
    /// frame); None: not taken.
    #[inline(never)]
    fn lone_offloads(
        &self,
        lone: &Lone<'_>,
        h: &[u8; HDR_LEN],
        prefix: &[u8],
        len: usize,
    ) -> Option<bool> {
        if h[0] & !HdrFlags::NEEDS_CSUM.bits() != 0 {
            return None;
        }
        let hdr = VirtioNetHdr::parse(h, false).ok()?;
        let v = validate_prefix(&hdr, prefix, len).ok()?;
        let needs_csum = hdr.flags.contains(HdrFlags::NEEDS_CSUM);
        if !takes_gso(lone.caps, v.gso, v.ecn) || (needs_csum && !lone.caps.csum) {
            return None;
        }
        if v.gso == GsoType::None && len > lone.max_len {
            return None;
        }
        Some(v.gso != GsoType::None)
    }

    /// [`Nic::transmit`] for a frame whose first bytes, `prefix` (all its
    /// headers), were copied out of guest memory and whose rest stays
    /// there as `rest`. When the uplink takes the frame as it is, the
    /// validated prefix and the guest's payload are written in one
    /// vectored write, without copying the payload. The frame is counted
    /// as sent in `scratch` until [`TxScratch::settle`]; a drop is
    /// counted at once.
    #[allow(clippy::too_many_arguments)]
    pub fn transmit_pieces(
        &self,
        p: usize,
        q: usize,
        hdr: &[u8],
        prefix: &[u8],
        rest: &[Piece<'_>],
        scratch: &mut TxScratch,
        view: &View,
    ) -> Result<(), DropReason> {
        let stats = self
            .ports
            .get(p)
            .and_then(|port| port.stats.tx.get(q))
            .ok_or(DropReason::UplinkError)?;
        let len = prefix.len() + rest.iter().map(Piece::len).sum::<usize>();
        let r = self.transmit_inner(p, q, hdr, prefix, rest, len, scratch, stats, view);
        match r {
            Ok(()) => {
                scratch.sent.0 += 1;
                scratch.sent.1 += len as u64;
                if self.paced(p, view) {
                    let now = self.now();
                    if capped(view, p) {
                        if let Some(b) = self.ports[p].bucket().as_mut() {
                            b.take(now, len);
                        }
                    }
                    if let Some(l) = &self.link {
                        lock(l).take(p, now, len);
                    }
                }
            }
            Err(why) => stats.drop(why),
        }
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn transmit_inner(
        &self,
        p: usize,
        q: usize,
        hdr_bytes: &[u8],
        prefix: &[u8],
        rest: &[Piece<'_>],
        len: usize,
        scratch: &mut TxScratch,
        stats: &QueueStats,
        view: &View,
    ) -> Result<(), DropReason> {
        if len == 0 {
            return Err(DropReason::ZeroLength);
        }
        let hdr = VirtioNetHdr::parse(hdr_bytes, false).map_err(|_| DropReason::BadHeader)?;
        let v = validate_prefix(&hdr, prefix, len).map_err(|e| {
            log::debug!("port {p} tx{q}: bad header: {e}");
            DropReason::BadHeader
        })?;
        if v.gso == GsoType::None && len > usize::from(self.ports[p].config.mtu) + 14 + 8 {
            return Err(DropReason::Oversized);
        }
        let pv = view.ports.get(p).ok_or(DropReason::UplinkError)?;
        if !pv.link_up(view.uplink_up) {
            return Err(DropReason::LinkDown);
        }
        let l2 = L2::parse(prefix).ok_or(DropReason::BadHeader)?;
        if pv.settings.vlan.is_some() && l2.tag.is_some() {
            // A port VLAN is the guest's whole world: it cannot tag (its
            // own tags inside an 802.1ad port VLAN are not carried yet).
            return Err(DropReason::VlanViolation);
        }
        if pv.is_vf && pv.settings.spoofchk && l2.vid() != 0 && pv.egress(l2.vid()).is_none() {
            // VLAN anti-spoofing: a VF tags only with VLANs its driver
            // added to its filter (CTRL_VLAN).
            return Err(DropReason::VlanViolation);
        }
        // The source address read from the frame's bytes, not from `l2`:
        // it was just stored there in pieces, and loading it whole from
        // the stack waits for those stores (a store-forwarding stall per
        // frame).
        let src = prefix
            .get(6..12)
            .and_then(|s| <[u8; 6]>::try_from(s).ok())
            .map_or(l2.src, Address);
        if src != pv.mac {
            if pv.settings.spoofchk {
                return Err(DropReason::Spoofed);
            }
            if src.is_unicast() && !pv.learned.contains(&src) {
                self.learn(p, src);
            }
        }
        let route = if view.ports.len() == 1 && pv.settings.vlan.is_none() {
            Route {
                ports: PortSet::default(),
                uplink: true,
                vid: l2.vid(),
                tpid: None,
                tag: None,
            }
        } else {
            let mut r = view.route(Some(p), &l2);
            if view.switchdev && r.uplink && p > 0 {
                // Switchdev: what no entry matches, floods included, goes
                // to the VF's representor alone; the host switches it.
                r.ports = PortSet::default();
            }
            r
        };
        let single = route
            .ports
            .iter()
            .next()
            .filter(|_| !route.uplink && route.ports.0.count_ones() == 1);
        if let Some(t) = single {
            let tv = &view.ports[t];
            if self.takes_as_is(tv, &route, l2.tag.is_some(), &hdr, view) {
                // One port takes the frame as it is: copied once out of
                // the guest's buffers, then into the receiver's RX buffers
                // (or its backlog when it has none posted).
                if v.gso != GsoType::None {
                    self.ports[t].stats.rx[0]
                        .gso_packets
                        .fetch_add(1, Ordering::Relaxed);
                }
                let peek = &prefix[..prefix.len().min(256)];
                self.push_rx_from(
                    t,
                    tv,
                    peek,
                    HDR_LEN + len,
                    |b| frame_with_hdr(b, hdr_bytes, prefix, rest),
                    &mut scratch.wakes,
                );
                return Ok(());
            }
        }
        if !route.ports.is_empty() {
            // One copy of the frame enters the switch; each port gets its
            // own rewrite of it.
            let TxScratch {
                copy,
                seg,
                port,
                piece,
                wakes,
                ..
            } = scratch;
            copy.clear();
            frame_with_hdr(copy, hdr_bytes, prefix, rest);
            for t in route.ports.iter() {
                self.to_port(t, copy, &route, view, seg, port, piece, wakes);
            }
        }
        if !route.uplink {
            return Ok(());
        }
        // Switchdev: what a VF sends that no entry matched goes to its
        // representor, not the wire; the host decides where it goes.
        let out: &dyn Uplink = match p.checked_sub(1).and_then(|n| self.representors.get(n)) {
            Some(r) => r.as_ref(),
            None => self.uplink.as_ref(),
        };
        match route.tag {
            None => self.to_uplink(out, q, hdr_bytes, &hdr, &v, prefix, rest, scratch, stats),
            Some(tag) => {
                // The port VLAN's tag goes on at the wire: the frame is
                // copied once with it, and checked again.
                let TxScratch { copy, port, .. } = scratch;
                if route.ports.is_empty() {
                    copy.clear();
                    frame_with_hdr(copy, hdr_bytes, prefix, rest);
                }
                port.clear();
                port.extend_from_slice(copy);
                insert_tag(port, HDR_LEN, tag);
                let tagged = std::mem::take(port);
                let r = self.uplink_tagged(out, q, &tagged, scratch, stats);
                scratch.port = tagged;
                r
            }
        }
    }

    /// [`Nic::to_uplink`] for a frame in one piece after its header.
    fn uplink_tagged(
        &self,
        out: &dyn Uplink,
        q: usize,
        buf: &[u8],
        scratch: &mut TxScratch,
        stats: &QueueStats,
    ) -> Result<(), DropReason> {
        let (h, frame) = buf.split_at(HDR_LEN);
        let hdr = VirtioNetHdr::parse(h, false).map_err(|_| DropReason::BadHeader)?;
        let v = validate_prefix(&hdr, frame, frame.len()).map_err(|_| DropReason::BadHeader)?;
        self.to_uplink(out, q, h, &hdr, &v, frame, &[], scratch, stats)
    }

    /// Sends a checked frame to queue `q` of `out` (the uplink or a
    /// representor): as it is when `out` takes its offloads, else
    /// segmented or checksummed here.
    #[allow(clippy::too_many_arguments)]
    fn to_uplink(
        &self,
        out: &dyn Uplink,
        q: usize,
        hdr_bytes: &[u8],
        hdr: &VirtioNetHdr,
        v: &Validated,
        prefix: &[u8],
        rest: &[Piece<'_>],
        scratch: &mut TxScratch,
        stats: &QueueStats,
    ) -> Result<(), DropReason> {
        let caps = out.tx_offloads();
        let needs_csum = hdr.flags.contains(HdrFlags::NEEDS_CSUM);
        // (A division only for a queue past the uplink's: a divide per
        // frame is tens of cycles.)
        let n = out.queues().max(1);
        let uq = if q < n { q } else { q % n };
        if takes_gso(caps, v.gso, v.ecn) && (!needs_csum || caps.csum) {
            if v.gso != GsoType::None {
                stats.gso_packets.fetch_add(1, Ordering::Relaxed);
            }
            let mut vhdr = [0u8; HDR_LEN];
            vhdr.copy_from_slice(&hdr_bytes[..HDR_LEN]);
            vhdr[10] = 0;
            vhdr[11] = 0;
            if rest.len() + 2 > MAX_PIECES {
                return Err(DropReason::ChainTooLong);
            }
            return sent(
                out.send_parts(uq, &[Piece::Local(&vhdr), Piece::Local(prefix)], rest),
                uq,
            );
        }
        stats.sw_offloads.fetch_add(1, Ordering::Relaxed);
        // Software offloads need the frame in one piece.
        scratch.frame.clear();
        scratch.frame.extend_from_slice(prefix);
        for p in rest {
            p.copy_to(&mut scratch.frame);
        }
        let plain = [0u8; HDR_LEN];
        if v.gso != GsoType::None {
            let mut result = Ok(());
            let TxScratch { seg, frame, .. } = scratch;
            seg.segment(frame, v, hdr.gso_size, &mut |h, p| {
                let r = send(
                    out,
                    uq,
                    &[Piece::Local(&plain), Piece::Local(h), Piece::Local(p)],
                );
                if result.is_ok() {
                    result = r;
                }
            })
            .map_err(|_| DropReason::OffloadFailed)?;
            return result;
        }
        complete_checksum(
            &mut scratch.frame,
            usize::from(hdr.csum_start),
            usize::from(hdr.csum_offset),
        )
        .map_err(|_| DropReason::OffloadFailed)?;
        send(
            out,
            uq,
            &[Piece::Local(&plain), Piece::Local(&scratch.frame)],
        )
    }

    /// Publishes the uplink's link state if it changed (ports in `state
    /// auto` follow it).
    pub fn follow_uplink_link(&self) {
        let Some(up) = self.uplink.link_up() else {
            return;
        };
        if self.switch.view().uplink_up != up {
            log::info!("uplink link {}", if up { "up" } else { "down" });
            self.switch.update(|v| v.uplink_up = up);
        }
    }

    /// Delivers a frame the host wrote to VF `n`'s representor (12-byte
    /// header first) to VF `n`, whatever its address.
    pub fn from_representor(
        &self,
        n: usize,
        buf: &[u8],
        view: &View,
        stats: &QueueStats,
        scratch: &mut TxScratch,
    ) {
        let p = n + 1;
        let Some(l2) = buf.get(HDR_LEN..).and_then(L2::parse) else {
            stats.drop(DropReason::RxMalformed);
            return;
        };
        // As the VF would get it from the wire: a tag it does not take
        // keeps the frame out; its port VLAN's own tag comes off.
        let vid = l2.vid();
        let tpid = l2.tag.map(|(t, _)| t);
        let takes = view.ports.get(p).is_some_and(|pv| {
            (vid == 0 && pv.settings.vlan.is_none()) || pv.egress_tpid(vid, tpid).is_some()
        });
        if !takes {
            stats.drop(DropReason::Filtered);
            return;
        }
        let route = Route {
            ports: PortSet::default().with(p),
            uplink: false,
            vid,
            tpid,
            tag: None,
        };
        self.to_ports(buf, &route, view, scratch);
    }

    /// [`Nic::to_port`] for every port of `route`.
    fn to_ports(&self, buf: &[u8], route: &Route, view: &View, scratch: &mut TxScratch) {
        let TxScratch {
            seg,
            port,
            piece,
            wakes,
            ..
        } = scratch;
        for t in route.ports.iter() {
            self.to_port(t, buf, route, view, seg, port, piece, wakes);
        }
    }

    /// Remembers that port `p` sends from `mac` (it has no spoof
    /// checking), so frames to `mac` reach it; another port that had
    /// `mac` loses it.
    fn learn(&self, p: usize, mac: Address) {
        let _g = self.learning.lock().unwrap_or_else(PoisonError::into_inner);
        if self
            .switch
            .view()
            .ports
            .get(p)
            .is_none_or(|pv| pv.learned.contains(&mac))
        {
            return;
        }
        self.switch.update(|v| {
            for (i, pv) in v.ports.iter_mut().enumerate() {
                let has = pv.learned.contains(&mac);
                if i == p || has {
                    let mut n = (**pv).clone();
                    n.learned.retain(|m| *m != mac);
                    if i == p {
                        if n.learned.len() >= MAX_LEARNED {
                            n.learned.remove(0);
                        }
                        n.learned.push(mac);
                    }
                    *pv = Arc::new(n);
                }
            }
        });
    }

    /// An address seen as a source on the wire is not behind a port any
    /// more: a port that learned it forgets it.
    fn unlearn_if_learned(&self, view: &View, src: Address) {
        if !view.ports.iter().any(|pv| pv.learned.contains(&src)) {
            return;
        }
        let _g = self.learning.lock().unwrap_or_else(PoisonError::into_inner);
        self.switch.update(|v| {
            for pv in v.ports.iter_mut() {
                if pv.learned.contains(&src) {
                    let mut n = (**pv).clone();
                    n.learned.retain(|m| *m != src);
                    *pv = Arc::new(n);
                }
            }
        });
    }

    /// How many of a frame's first bytes [`Nic::uplink_route`] reads in
    /// `view` (at most `most`): only the Ethernet header and one tag when
    /// the PF is alone and RSS steers it blind
    /// ([`PortView::steers_blind`]), else `most`.
    pub fn route_peek(&self, view: &View, most: usize) -> usize {
        match view.ports.as_slice() {
            [pf] if pf.steers_blind().is_some() => most.min(ETH_AND_TAG),
            _ => most,
        }
    }

    /// Where [`Nic::uplink_route`] sends any frame of at least
    /// [`ETH_AND_TAG`] bytes in `view`, known without reading it: to the
    /// PF on one queue, when the PF is alone, takes every frame
    /// ([`PortView::takes_all`]) and RSS steers it blind. None: the route
    /// reads the frame.
    pub fn blind_route(&self, view: &View) -> Option<Steering> {
        match view.ports.as_slice() {
            [pf] if pf.takes_all() => pf.steers_blind().map(|queue| Steering { queue, ..NO_HASH }),
            _ => None,
        }
    }

    /// How a frame read from the uplink is to go, from its first bytes.
    pub fn uplink_route(&self, view: &View, peek: &[u8], len: usize) -> UplinkRoute {
        let Some(l2) = L2::parse(peek) else {
            return UplinkRoute::Drop(DropReason::RxMalformed);
        };
        let Some(pf) = view.ports.first() else {
            return UplinkRoute::Drop(DropReason::PortDown);
        };
        if view.ports.len() == 1 {
            return if pf.accepts(&l2) {
                UplinkRoute::Pf(pf.steer(peek, len))
            } else {
                UplinkRoute::Drop(DropReason::Filtered)
            };
        }
        self.unlearn_if_learned(view, l2.src);
        let route = view.route(None, &l2);
        if route.ports == PortSet::default().with(0) {
            UplinkRoute::Pf(pf.steer(peek, len))
        } else if route.ports.is_empty() {
            UplinkRoute::Drop(DropReason::Filtered)
        } else {
            UplinkRoute::Switch
        }
    }

    /// Switches a frame read from the uplink (12-byte header first) to
    /// the ports it is for. Drops are counted in `stats` (the reading
    /// queue's) or on the receiving port.
    pub fn from_uplink(
        &self,
        buf: &[u8],
        view: &View,
        stats: &QueueStats,
        scratch: &mut TxScratch,
    ) {
        let Some(l2) = buf.get(HDR_LEN..).and_then(L2::parse) else {
            stats.drop(DropReason::RxMalformed);
            return;
        };
        self.unlearn_if_learned(view, l2.src);
        let route = view.route(None, &l2);
        if route.ports.is_empty() {
            stats.drop(DropReason::Filtered);
            return;
        }
        self.to_ports(buf, &route, view, scratch);
    }

    /// Delivers a frame (12-byte header first) to port `t`: with the VLAN
    /// tag that port sees it with, and within the receive offloads its
    /// driver accepted (segmented or checksummed here otherwise). Drops
    /// are counted on the port.
    #[allow(clippy::too_many_arguments)]
    fn to_port(
        &self,
        t: usize,
        buf: &[u8],
        route: &Route,
        view: &View,
        seg: &mut Segmenter,
        out: &mut Vec<u8>,
        piece: &mut Vec<u8>,
        wakes: &mut Wakes,
    ) {
        let (Some(port), Some(tv)) = (self.ports.get(t), view.ports.get(t)) else {
            return;
        };
        let stats = &port.stats.rx[0];
        if !tv.attached {
            stats.drop(DropReason::PortDown);
            return;
        }
        if !tv.link_up(view.uplink_up) {
            stats.drop(DropReason::LinkDown);
            return;
        }
        let Some(frame) = buf.get(HDR_LEN..) else {
            stats.drop(DropReason::RxMalformed);
            return;
        };
        let has_tag = L2::parse(frame).is_some_and(|l| l.tag.is_some());
        let as_is = VirtioNetHdr::parse(&buf[..HDR_LEN], false)
            .is_ok_and(|h| self.takes_as_is(tv, route, has_tag, &h, view));
        if as_is {
            if VirtioNetHdr::parse(&buf[..HDR_LEN], false)
                .is_ok_and(|h| h.gso().is_ok_and(|(g, _)| g != GsoType::None))
            {
                stats.gso_packets.fetch_add(1, Ordering::Relaxed);
            }
            self.push_rx(t, buf, tv, wakes);
            return;
        }
        let want_tag = tv.egress(route.vid).unwrap_or(false) && route.vid != 0;
        out.clear();
        out.extend_from_slice(buf);
        match (has_tag, want_tag, route.tag) {
            (true, false, _) => strip_tag(out, HDR_LEN),
            (false, true, Some(tag)) => insert_tag(out, HDR_LEN, tag),
            _ => {}
        }
        let Ok(hdr) = VirtioNetHdr::parse(&out[..HDR_LEN], false) else {
            stats.drop(DropReason::RxMalformed);
            return;
        };
        let Ok((gso, ecn)) = hdr.gso() else {
            stats.drop(DropReason::RxMalformed);
            return;
        };
        let caps = tv.caps;
        let needs_csum = hdr.flags.contains(HdrFlags::NEEDS_CSUM);
        if takes_gso(caps, gso, ecn) && (!needs_csum || caps.csum) {
            if gso != GsoType::None {
                stats.gso_packets.fetch_add(1, Ordering::Relaxed);
            }
            self.push_rx(t, out, tv, wakes);
            return;
        }
        stats.sw_offloads.fetch_add(1, Ordering::Relaxed);
        let frame_len = out.len() - HDR_LEN;
        let Ok(v) = validate_prefix(&hdr, &out[HDR_LEN..], frame_len) else {
            stats.drop(DropReason::OffloadFailed);
            return;
        };
        if gso != GsoType::None {
            let plain = [0u8; HDR_LEN];
            let r = seg.segment(&out[HDR_LEN..], &v, hdr.gso_size, &mut |h, p| {
                piece.clear();
                piece.extend_from_slice(&plain);
                piece.extend_from_slice(h);
                piece.extend_from_slice(p);
                self.push_rx(t, piece, tv, wakes);
            });
            if r.is_err() {
                stats.drop(DropReason::OffloadFailed);
            }
            return;
        }
        let (start, off) = (usize::from(hdr.csum_start), usize::from(hdr.csum_offset));
        if complete_checksum(&mut out[HDR_LEN..], start, off).is_err() {
            stats.drop(DropReason::OffloadFailed);
            return;
        }
        out[..HDR_LEN].fill(0);
        self.push_rx(t, out, tv, wakes);
    }

    /// Queues a frame (header first) for the RX queue port `t`'s RSS
    /// picks among those enabled.
    fn push_rx(&self, t: usize, buf: &[u8], tv: &PortView, wakes: &mut Wakes) {
        let frame = buf.get(HDR_LEN..).unwrap_or(&[]);
        let peek = &frame[..frame.len().min(256)];
        self.push_rx_from(t, tv, peek, buf.len(), |b| b.extend_from_slice(buf), wakes);
    }

    /// [`Nic::push_rx`] for a frame of `len` bytes (header included) that
    /// `fill` writes, whose first frame bytes are `peek`.
    fn push_rx_from(
        &self,
        t: usize,
        tv: &PortView,
        peek: &[u8],
        len: usize,
        fill: impl FnOnce(&mut Vec<u8>),
        wakes: &mut Wakes,
    ) {
        let port = &self.ports[t];
        let active = QueueSet(port.enabled_rx.load(Ordering::Relaxed));
        // The hash matters with more than one queue to choose from, or
        // when the driver wants it reported.
        let steering = if active.0.count_ones() > 1 || tv.hash_report {
            tv.steer(peek, len.saturating_sub(HDR_LEN))
        } else {
            NO_HASH
        };
        let q = active
            .pick(usize::from(steering.queue), 0)
            .min(port.backlogs.len().saturating_sub(1));
        let Some(b) = port.backlogs.get(q) else {
            return;
        };
        // Straight into the guest's buffers (with the batch's other frames
        // for it), unless frames already wait in its backlog: they go
        // first. Once some wait in the batch, the queue's later frames
        // join them, so that they stay in order.
        if let Some(rx) = tv.rx.as_ref().and_then(|h| h.0.upgrade()) {
            if wakes.has_direct(t, q) || b.looks_empty() {
                wakes.stage(t, q, rx, steering, len, fill);
                return;
            }
        }
        match b.push_from(len, fill) {
            Some(true) => wakes.add(t, q, len),
            Some(false) => wakes.held(len),
            None => port.stats.rx[q].drop(DropReason::RxNoBuffers),
        }
    }

    /// Wakes the consumers of the backlogs `wakes` names (the end of a
    /// batch).
    pub fn wake(&self, wakes: &mut Wakes) {
        wakes.frames = 0;
        wakes.bytes = 0;
        let mut direct = std::mem::take(&mut wakes.direct);
        for d in direct.drain(..) {
            let n = d.rx.deliver(d.q, &d.frames).min(d.frames.len());
            if n > 0 {
                d.rx.flush(d.q, u32::try_from(n).unwrap_or(u32::MAX));
            }
            // What the ring had no buffers for waits in the backlog, in
            // order; the port's own worker takes it from there.
            let port = &self.ports[d.port];
            for (k, p) in d.frames.into_iter().enumerate() {
                if k >= n {
                    match port
                        .backlogs
                        .get(d.q)
                        .map(|b| b.push_from(p.frame.len(), |v| v.extend_from_slice(&p.frame)))
                    {
                        Some(Some(true)) => {
                            if !wakes.to.contains(&(d.port, d.q)) {
                                wakes.to.push((d.port, d.q));
                            }
                        }
                        Some(Some(false)) => {}
                        _ => port.stats.rx[d.q].drop(DropReason::RxNoBuffers),
                    }
                }
                if wakes.spare.len() < SPARE_BUFFERS {
                    wakes.spare.push(p.frame);
                }
            }
        }
        wakes.direct = direct;
        for (p, q) in wakes.to.drain(..) {
            if let Some(b) = self.ports.get(p).and_then(|port| port.backlogs.get(q)) {
                let _ = b.event.write(1);
            }
        }
    }

    /// Whether port `t` takes a frame of `route` (with a tag in its bytes
    /// or not, and this header) exactly as it is: attached, link up, the
    /// same tagging, and offloads its driver accepted.
    fn takes_as_is(
        &self,
        tv: &PortView,
        route: &Route,
        has_tag: bool,
        hdr: &VirtioNetHdr,
        view: &View,
    ) -> bool {
        let want_tag = tv.egress(route.vid).unwrap_or(false) && route.vid != 0;
        let Ok((gso, ecn)) = hdr.gso() else {
            return false;
        };
        tv.attached
            && tv.link_up(view.uplink_up)
            && has_tag == want_tag
            && takes_gso(tv.caps, gso, ecn)
            && (!hdr.flags.contains(HdrFlags::NEEDS_CSUM) || tv.caps.csum)
    }

    /// Reads the uplink while the PF has no frontend (its workers read it
    /// otherwise) and switches what arrives to the VFs, and reads the VFs'
    /// representors (switchdev mode) into their VFs; returns when `stop`
    /// is set. Frames for the PF are dropped as `port_down` meanwhile.
    pub fn pump_uplink(&self, stop: &AtomicBool) {
        let queues = self.uplink.queues();
        // (source, queue): None is the uplink, Some(n) VF n's representor.
        let mut sources: Vec<(Option<usize>, usize, libc::pollfd)> = Vec::new();
        for q in 0..queues {
            if let Some(fd) = self.uplink.rx_fd(q) {
                sources.push((None, q, pollin(fd)));
            }
        }
        for (n, r) in self.representors.iter().enumerate() {
            if let Some(fd) = r.rx_fd(0) {
                sources.push((Some(n), 0, pollin(fd)));
            }
        }
        let mut buf = vec![0u8; VNET_HDR_LEN + MAX_FRAME];
        let mut scratch = TxScratch::default();
        let mut view = self.switch.view();
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(sources.len());
        let mut checked = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            // `state auto` follows the uplink: look at it ten times a second.
            if checked.elapsed() >= std::time::Duration::from_millis(100) {
                checked = Instant::now();
                self.follow_uplink_link();
            }
            // The PF's workers read the uplink while it has a frontend.
            let uplink_here = !self.pf().is_attached() && self.ports.len() > 1;
            fds.clear();
            fds.extend(
                sources
                    .iter()
                    .filter(|(src, _, _)| src.is_some() || uplink_here)
                    .map(|s| s.2),
            );
            if fds.is_empty() {
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            }
            // SAFETY: `fds` is a live, writable array of `fds.len()`
            // pollfd entries for the duration of the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 50) };
            if n <= 0 {
                continue;
            }
            self.switch.refresh(&mut view);
            for &(src, q, _) in &sources {
                if src.is_none() && !uplink_here {
                    continue;
                }
                let (input, stats) = match src {
                    None => (
                        self.uplink.as_ref(),
                        &self.pf().stats.rx[q.min(self.pf().stats.rx.len() - 1)],
                    ),
                    Some(n) => (
                        self.representors[n].as_ref(),
                        &self.ports[n + 1].stats.rx[0],
                    ),
                };
                for _ in 0..256 {
                    match input.recv(q, &mut [PieceMut::Local(&mut buf)]) {
                        Ok(len) => match src {
                            None => self.from_uplink(&buf[..len], &view, stats, &mut scratch),
                            Some(n) => {
                                self.from_representor(n, &buf[..len], &view, stats, &mut scratch)
                            }
                        },
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            log::debug!("uplink queue {q}: {e}");
                            stats.drop(DropReason::UplinkError);
                            break;
                        }
                    }
                }
                self.wake(&mut scratch.wakes);
            }
        }
    }
}

fn pollin(fd: std::os::fd::RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Appends a frame to `b` as it travels inside the switch: the driver's
/// 12-byte header (its `num_buffers` cleared), then the headers copied
/// out of guest memory and the rest.
fn frame_with_hdr(b: &mut Vec<u8>, hdr_bytes: &[u8], prefix: &[u8], rest: &[Piece<'_>]) {
    let at = b.len();
    b.extend_from_slice(&hdr_bytes[..HDR_LEN]);
    b[at + 10] = 0;
    b[at + 11] = 0;
    b.extend_from_slice(prefix);
    for r in rest {
        r.copy_to(b);
    }
}

/// Whether port `p` has a `max_tx_rate` in `view`.
fn capped(view: &View, p: usize) -> bool {
    view.ports
        .get(p)
        .is_some_and(|v| v.settings.max_tx_rate > 0)
}

/// Writes one frame to queue `q` of `out`.
fn send(out: &dyn Uplink, q: usize, pieces: &[Piece<'_>]) -> Result<(), DropReason> {
    sent(out.send(q, pieces), q)
}

/// What an uplink's send on queue `q` came to, as a drop reason.
#[inline]
fn sent(r: io::Result<usize>, q: usize) -> Result<(), DropReason> {
    match r {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Err(DropReason::NoUplink),
        Err(e) => {
            log::debug!("uplink queue {q}: {e}");
            Err(DropReason::UplinkError)
        }
    }
}

/// Whether an uplink (or port) with offloads `caps` takes a frame of
/// this GSO kind as it is.
fn takes_gso(caps: Offloads, gso: GsoType, ecn: bool) -> bool {
    match gso {
        GsoType::None => true,
        GsoType::TcpV4 => caps.tso4 && (!ecn || caps.tso_ecn),
        GsoType::TcpV6 => caps.tso6 && (!ecn || caps.tso_ecn),
        GsoType::UdpL4 => caps.uso,
        GsoType::Udp => false,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use vnic_protocol::{
        offload::l4_checksum_ok,
        wire::{
            build::{data_segment, tcp_frame, Flow, IpFields},
            parse_frame,
            tcp::Flags,
        },
    };

    use super::*;

    pub(crate) use crate::uplink::fake::FakeUplink;

    pub(crate) fn config(pairs: u16) -> DeviceConfig {
        DeviceConfig::new(pairs, Address([2, 0, 0, 0, 0, 1]))
    }

    fn tso_hdr(gso_size: u16) -> [u8; 12] {
        let h = VirtioNetHdr::tcp_tso(GsoType::TcpV4, 34, 66, gso_size);
        let mut b = [0u8; 12];
        h.emit(&mut b, false).unwrap();
        b
    }

    #[test]
    fn gso_passes_through_when_the_uplink_takes_it() {
        let up = FakeUplink::with_offloads(Offloads::ALL);
        let dev = Nic::single(config(1), Box::new(up.clone())).unwrap();
        let f = tcp_frame(
            &Flow::v4(),
            data_segment(1, 1, Flags::ACK),
            &IpFields::default(),
            &[9; 5000],
        )
        .unwrap();
        dev.transmit(0, 0, &tso_hdr(1448), &f, &mut TxScratch::default())
            .unwrap();
        let sent = up.sent();
        assert_eq!(sent.len(), 1);
        assert_eq!(&sent[0][..10], &tso_hdr(1448)[..10]);
        assert_eq!(&sent[0][12..], &f[..]);
        assert_eq!(
            dev.pf().stats.tx[0]
                .gso_packets
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn payload_in_guest_memory_is_passed_through_not_copied() {
        use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
        let up = FakeUplink::with_offloads(Offloads::ALL);
        let dev = Nic::single(config(1), Box::new(up.clone())).unwrap();
        let f = tcp_frame(
            &Flow::v4(),
            data_segment(1, 1, Flags::ACK),
            &IpFields::default(),
            &[5; 9000],
        )
        .unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x1000), 0x10000)]).unwrap();
        mem.write_slice(&f, GuestAddress(0x1000)).unwrap();
        let rest = mem
            .get_slice(GuestAddress(0x1000 + 256), f.len() - 256)
            .unwrap();
        dev.transmit_pieces(
            0,
            0,
            &tso_hdr(1448),
            &f[..256],
            &[Piece::Guest(rest)],
            &mut TxScratch::default(),
            &dev.switch.view(),
        )
        .unwrap();
        assert_eq!(&up.sent()[0][12..], &f[..]);
        assert_eq!(up.lock().kinds[0], vec![false, false, true]);
    }

    #[test]
    fn gso_is_segmented_in_software_otherwise() {
        let up = FakeUplink::default();
        let dev = Nic::single(config(1), Box::new(up.clone())).unwrap();
        let payload: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let f = tcp_frame(
            &Flow::v4(),
            data_segment(1, 1, Flags::ACK),
            &IpFields::default(),
            &payload,
        )
        .unwrap();
        dev.transmit(0, 0, &tso_hdr(1448), &f, &mut TxScratch::default())
            .unwrap();
        let sent = up.sent();
        assert_eq!(sent.len(), 4);
        let mut got = Vec::new();
        for s in sent.iter() {
            assert_eq!(&s[..12], &[0; 12]);
            let fr = &s[12..];
            let info = parse_frame(fr).unwrap();
            assert!(l4_checksum_ok(fr, &info));
            got.extend_from_slice(&fr[66..]);
        }
        assert_eq!(got, payload);
    }

    #[test]
    fn bad_headers_are_counted_drops() {
        let up = FakeUplink::default();
        let dev = Nic::single(config(1), Box::new(up.clone())).unwrap();
        let f = tcp_frame(
            &Flow::v4(),
            data_segment(1, 1, Flags::ACK),
            &IpFields::default(),
            &[1; 100],
        )
        .unwrap();
        let mut s = TxScratch::default();
        assert_eq!(
            dev.transmit(0, 0, &tso_hdr(0), &f, &mut s),
            Err(DropReason::BadHeader)
        );
        assert_eq!(
            dev.transmit(0, 0, &[0; 12], &[], &mut s),
            Err(DropReason::ZeroLength)
        );
        let big = vec![0u8; 3000];
        assert_eq!(
            dev.transmit(0, 0, &[0; 12], &big, &mut s),
            Err(DropReason::Oversized)
        );
        assert_eq!(dev.pf().stats.tx[0].drops(DropReason::BadHeader), 1);
        assert_eq!(dev.pf().stats.tx[0].total_drops(), 3);
        assert!(up.sent().is_empty());
    }

    /// The lone port's way to the uplink takes exactly the frames the
    /// uplink takes as they are, from the port's address or one it
    /// learned, and they come out as the switch would send them, with the
    /// same counts; the others are left to `transmit_pieces`.
    #[test]
    fn a_lone_port_sends_what_the_uplink_takes_as_the_switch_would() {
        let own = config(1).mac;
        let plain = |src: Address, len: usize| {
            let mut f = vec![0u8; len.max(14)];
            f[..6].copy_from_slice(&[2, 0, 0, 0, 0, 9]);
            f[6..12].copy_from_slice(&src.0);
            f[12..14].copy_from_slice(&[0x08, 0x00]);
            for (i, b) in f.iter_mut().enumerate().skip(14) {
                *b = i as u8;
            }
            f.truncate(len);
            f
        };
        // From the port's own address (Flow::v4's source).
        let tcp = |n: usize| {
            tcp_frame(
                &Flow::v4(),
                data_segment(1, 1, Flags::ACK),
                &IpFields::default(),
                &vec![7; n],
            )
            .unwrap()
        };
        assert_eq!(&tcp(1)[6..12], &own.0);
        let mut tagged = plain(own, 64);
        tagged[12..14].copy_from_slice(&[0x81, 0x00]);
        let mut hdr_len_past = [0u8; 12];
        hdr_len_past[2] = 65;
        let csum_at = |start: u16, off: u16| {
            let mut h = [0u8; 12];
            h[0] = 1;
            h[6..8].copy_from_slice(&start.to_le_bytes());
            h[8..10].copy_from_slice(&off.to_le_bytes());
            h
        };
        let mut valid = [0u8; 12];
        valid[0] = 2;
        let mut with_buffers = [0u8; 12];
        with_buffers[10] = 7;
        // (header, frame, taken with an uplink of no offloads, with all)
        let cases: Vec<([u8; 12], Vec<u8>, bool, bool)> = vec![
            ([0; 12], plain(own, 64), true, true),
            ([0; 12], plain(own, 1522), true, true),
            (with_buffers, plain(own, 60), true, true),
            ([0; 12], plain(own, 14), true, true),
            ([0; 12], plain(own, 1523), false, false),
            ([0; 12], plain(own, 13), false, false),
            (
                [0; 12],
                plain(Address([2, 0, 0, 0, 0, 7]), 64),
                false,
                false,
            ),
            (
                [0; 12],
                plain(Address([0x33, 0, 0, 0, 0, 7]), 64),
                false,
                false,
            ),
            ([0; 12], tagged, false, false),
            (hdr_len_past, plain(own, 64), false, false),
            (valid, plain(own, 64), false, false),
            (csum_at(34, 16), tcp(1000), false, true),
            (csum_at(34, 16), tcp(1500), false, false),
            (csum_at(1100, 16), tcp(1000), false, false),
            (tso_hdr(1448), tcp(5000), false, true),
            (tso_hdr(1448), plain(own, 64), false, false),
        ];
        for all in [false, true] {
            let make = || {
                if all {
                    FakeUplink::with_offloads(Offloads::ALL)
                } else {
                    FakeUplink::default()
                }
            };
            let (lone_up, full_up) = (make(), make());
            let lone_dev = Nic::single(config(1), Box::new(lone_up.clone())).unwrap();
            let full_dev = Nic::single(config(1), Box::new(full_up.clone())).unwrap();
            let view = lone_dev.switch.view();
            let lone = lone_dev.lone(0, 0, &view).expect("a single port is lone");
            let (mut s1, mut s2) = (TxScratch::default(), TxScratch::default());
            let stats = &lone_dev.pf().stats.tx[0];
            for (k, (h, f, no_off, all_off)) in cases.iter().enumerate() {
                // The frame's tail stays in "guest memory" past its
                // headers.
                let (prefix, rest) = f.split_at(f.len().min(80));
                let rest = [Piece::Local(rest)];
                let rest = if rest[0].is_empty() { &[] } else { &rest[..] };
                let framed = [&h[..], prefix].concat();
                let took = lone_dev
                    .transmit_lone(&lone, &framed, h.len(), rest, &mut s1, stats)
                    .is_some();
                assert_eq!(
                    took,
                    if all { *all_off } else { *no_off },
                    "case {k}, {all}"
                );
                if !took {
                    let _ = lone_dev.transmit_pieces(0, 0, h, prefix, rest, &mut s1, &view);
                }
                let full_view = full_dev.switch.view();
                let _ = full_dev.transmit_pieces(0, 0, h, prefix, rest, &mut s2, &full_view);
                assert_eq!(lone_up.sent(), full_up.sent(), "case {k}, {all}");
            }
            // Learned from the frame above (for the next burst's view), a
            // second address is taken too.
            let view = lone_dev.switch.view();
            let lone = lone_dev.lone(0, 0, &view).expect("lone");
            let f = plain(Address([2, 0, 0, 0, 0, 7]), 64);
            let framed = [&[0u8; 12][..], &f].concat();
            assert!(lone_dev
                .transmit_lone(&lone, &framed, 12, &[], &mut s1, stats)
                .is_some());
            let full_view = full_dev.switch.view();
            let _ = full_dev.transmit_pieces(0, 0, &[0; 12], &f, &[], &mut s2, &full_view);
            assert_eq!(lone_up.sent(), full_up.sent());
            // A header with `num_buffers` set goes out with it cleared, as
            // the whole way sends it.
            let mut h = [0u8; 12];
            h[10] = 3;
            let framed = [&h[..], &f].concat();
            assert!(lone_dev
                .transmit_lone(&lone, &framed, 12, &[], &mut s1, stats)
                .is_some());
            let _ = full_dev.transmit_pieces(0, 0, &h, &f, &[], &mut s2, &full_view);
            assert_eq!(lone_up.sent(), full_up.sent());
            assert_eq!(lone_up.sent().last().map(|x| x[10]), Some(0));
            assert_eq!(s1.sent, s2.sent);
            assert!(s1.sent.0 >= 9);
            let (a, b) = (&lone_dev.pf().stats.tx[0], &full_dev.pf().stats.tx[0]);
            assert_eq!(a.total_drops(), b.total_drops());
            assert_eq!(a.drops(DropReason::Oversized), 2);
            assert_eq!(
                a.drops(DropReason::BadHeader),
                b.drops(DropReason::BadHeader)
            );
            let gso = |s: &QueueStats| s.gso_packets.load(Ordering::Relaxed);
            assert_eq!(gso(a), gso(b));
            assert_eq!(gso(a), u64::from(all));
            // The frames it took went out with num_buffers cleared.
            assert_eq!(&lone_up.sent()[2][..12], &[0; 12]);
        }
    }

    /// Frames of every kind for the route: TCP, tagged TCP, short ones,
    /// and bytes that are no Ethernet type at all.
    fn frames_to_route() -> Vec<Vec<u8>> {
        let tcp = tcp_frame(
            &Flow::v4(),
            data_segment(1, 1, Flags::ACK),
            &IpFields::default(),
            &[3; 300],
        )
        .unwrap();
        let mut tagged = tcp.clone();
        // VLAN 5.
        tagged.splice(12..12, [0x81, 0x00, 0x00, 0x05]);
        vec![
            tcp,
            tagged,
            vec![0xff; 17],
            vec![0xff; 13],
            vec![0xff; 18],
            vec![0x01; 64],
            vec![0x81; 18],
            vec![0x88; 40],
        ]
    }

    /// Where RSS steers blind, the route reads no further than an
    /// Ethernet header and a tag, and comes out the same from those bytes
    /// as from the whole frame; elsewhere it reads all it is offered.
    #[test]
    fn the_route_reads_only_what_it_needs() {
        let frames = frames_to_route();
        let one = Nic::single(config(1), Box::new(FakeUplink::default())).unwrap();
        let view = one.switch.view();
        assert_eq!(one.route_peek(&view, 256), 18);
        assert_eq!(one.route_peek(&view, 10), 10);
        for f in &frames {
            let n = f.len().min(one.route_peek(&view, 256));
            assert_eq!(
                one.uplink_route(&view, &f[..n], f.len()),
                one.uplink_route(&view, &f[..f.len().min(256)], f.len())
            );
        }
        assert!(matches!(
            one.uplink_route(&view, &frames[1][..18], frames[1].len()),
            UplinkRoute::Pf(_)
        ));
        // Spread over queues, or with the hash wanted, RSS parses.
        let four = Nic::single(config(4), Box::new(FakeUplink::default())).unwrap();
        assert_eq!(four.route_peek(&four.switch.view(), 256), 256);
        let hashed = Nic::single(config(1), Box::new(FakeUplink::default())).unwrap();
        hashed
            .set_guest_features(0, crate::vhost::offered_features())
            .unwrap();
        assert_eq!(hashed.route_peek(&hashed.switch.view(), 256), 256);
        // With VFs the switch reads the frame itself.
        let up = FakeUplink::default();
        let vfs = nic_with_vfs(1, &up);
        assert_eq!(vfs.route_peek(&vfs.switch.view(), 256), 256);
    }

    /// A frame long enough for any Ethernet header goes where the route
    /// would send it, without being read, while the PF takes every frame;
    /// once its driver sets a filter, or with VFs, the route reads it.
    #[test]
    fn a_blind_route_agrees_with_the_route() {
        use vnic_protocol::virtio::ctrl::{CtrlCommand, RxMode};
        let frames: Vec<Vec<u8>> = frames_to_route()
            .into_iter()
            .filter(|f| f.len() >= ETH_AND_TAG)
            .collect();
        let nic = Nic::single(config(1), Box::new(FakeUplink::default())).unwrap();
        let view = nic.switch.view();
        let blind = nic.blind_route(&view).expect("blind");
        assert_eq!(blind.queue, 0);
        for f in &frames {
            assert_eq!(
                nic.uplink_route(&view, f, f.len()),
                UplinkRoute::Pf(blind),
                "{f:?}"
            );
        }
        // A filter set: frames to other addresses are the route's to drop.
        let all = crate::vhost::offered_features();
        let promisc_off = CtrlCommand::Rx {
            mode: RxMode::Promisc,
            on: false,
        };
        nic.control(0, &promisc_off, all).unwrap();
        let view = nic.switch.view();
        assert!(nic.blind_route(&view).is_none());
        let to_a_group = vec![0x01; 64];
        assert_eq!(
            nic.uplink_route(&view, &to_a_group, to_a_group.len()),
            UplinkRoute::Drop(DropReason::Filtered)
        );
        let four = Nic::single(config(4), Box::new(FakeUplink::default())).unwrap();
        assert!(four.blind_route(&four.switch.view()).is_none());
        let up = FakeUplink::default();
        let vfs = nic_with_vfs(1, &up);
        assert!(vfs.blind_route(&vfs.switch.view()).is_none());
    }

    /// Which ports may take the lone way: none beside VFs, with the
    /// uplink's link down, or paced by `--link-speed`.
    #[test]
    fn only_an_unpaced_port_alone_and_up_is_lone() {
        let up = FakeUplink::default();
        let dev = Nic::single(config(2), Box::new(up.clone())).unwrap();
        let view = dev.switch.view();
        let lone = dev.lone(0, 3, &view).expect("lone");
        assert_eq!(lone.uq, 3 % up.queues().max(1));
        assert_eq!(lone.max_len, 1500 + 14 + 8);
        dev.switch.update(|v| v.uplink_up = false);
        assert!(dev.lone(0, 0, &dev.switch.view()).is_none());
        let with_vf = nic_with_vfs(1, &up);
        let view = with_vf.switch.view();
        assert!(with_vf.lone(0, 0, &view).is_none());
        assert!(with_vf.lone(1, 0, &view).is_none());
        let mut c = config(1);
        c.link_speed = 1000;
        let paced = Nic::single(c, Box::new(up)).unwrap();
        assert!(paced.lone(0, 0, &paced.switch.view()).is_none());
    }

    /// A NIC with `n` VFs on `up`, every port attached with every
    /// offload accepted.
    fn nic_with_vfs(n: usize, up: &FakeUplink) -> Nic {
        let pf = config(1).mac;
        let vfs = (0..n)
            .map(|i| VfSettings::new(default_vf_mac(pf, i)))
            .collect();
        let nic = Nic::new(config(1), vfs, Box::new(up.clone()), Vec::new()).unwrap();
        for p in 0..=n {
            nic.attach(p, true);
            nic.set_guest_features(p, crate::vhost::offered_features())
                .unwrap();
        }
        nic
    }

    fn vf_mac(n: usize) -> Address {
        default_vf_mac(config(1).mac, n)
    }

    fn frame(src: Address, dst: Address, payload: usize) -> Vec<u8> {
        let flow = Flow {
            src_mac: src,
            dst_mac: dst,
            ..Flow::v4()
        };
        let body: Vec<u8> = (0..payload).map(|i| i as u8).collect();
        tcp_frame(
            &flow,
            data_segment(1, 1, Flags::ACK),
            &IpFields::default(),
            &body,
        )
        .unwrap()
    }

    /// Every frame waiting in port `p`'s backlogs, header first.
    fn received(nic: &Nic, p: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for b in &nic.ports[p].backlogs {
            while b
                .deliver_front(|f| {
                    out.push(f.to_vec());
                    true
                })
                .is_some()
            {}
        }
        out
    }

    fn send(nic: &Nic, p: usize, hdr: &[u8], f: &[u8]) -> Result<(), DropReason> {
        nic.transmit(p, 0, hdr, f, &mut TxScratch::default())
    }

    #[test]
    fn vf_to_vf_frames_stay_in_the_switch_and_the_rest_reach_the_wire() {
        let up = FakeUplink::with_offloads(Offloads::ALL);
        let nic = nic_with_vfs(2, &up);
        let f = frame(vf_mac(0), vf_mac(1), 100);
        send(&nic, 1, &[0; 12], &f).unwrap();
        let got = received(&nic, 2);
        assert_eq!(got.len(), 1);
        assert_eq!(&got[0][12..], &f[..]);
        assert!(up.sent().is_empty(), "a VF-to-VF frame touched the uplink");
        assert!(received(&nic, 0).is_empty());
        assert_eq!(nic.ports[1].stats.tx[0].packets.load(Ordering::Relaxed), 1);
        // To the PF.
        let f = frame(vf_mac(0), config(1).mac, 10);
        send(&nic, 1, &[0; 12], &f).unwrap();
        assert_eq!(received(&nic, 0).len(), 1);
        assert!(up.sent().is_empty());
        // To a host beyond the uplink: the wire, and the PF (whose driver
        // set no filter, so it takes everything), not the other VF.
        let away = Address([2, 0, 0, 0, 9, 9]);
        send(&nic, 1, &[0; 12], &frame(vf_mac(0), away, 10)).unwrap();
        assert_eq!(up.sent().len(), 1);
        assert_eq!(received(&nic, 0).len(), 1);
        assert!(received(&nic, 2).is_empty());
        // Broadcast: every other port and the wire, once each.
        let b = frame(vf_mac(1), Address::BROADCAST, 10);
        send(&nic, 2, &[0; 12], &b).unwrap();
        assert_eq!(up.sent().len(), 2);
        assert_eq!(received(&nic, 0).len(), 1);
        assert_eq!(received(&nic, 1).len(), 1);
        assert!(received(&nic, 2).is_empty());
        // From the wire to VF1: VF1 alone.
        let from_wire = [&[0u8; 12][..], &frame(away, vf_mac(1), 10)].concat();
        let view = nic.switch.view();
        assert_eq!(
            nic.uplink_route(&view, &from_wire[12..], from_wire.len() - 12),
            UplinkRoute::Switch
        );
        nic.from_uplink(
            &from_wire,
            &view,
            &nic.pf().stats.rx[0],
            &mut TxScratch::default(),
        );
        assert_eq!(received(&nic, 2), vec![from_wire.clone()]);
        assert!(received(&nic, 0).is_empty() && received(&nic, 1).is_empty());
        // To the PF only: it stays on the PF's direct path.
        let to_pf = frame(away, config(1).mac, 10);
        assert!(matches!(
            nic.uplink_route(&view, &to_pf, to_pf.len()),
            UplinkRoute::Pf(_)
        ));
    }

    #[test]
    fn gso_between_vfs_passes_whole_or_is_segmented_for_the_receiver() {
        let up = FakeUplink::with_offloads(Offloads::ALL);
        let nic = nic_with_vfs(2, &up);
        let f = frame(vf_mac(0), vf_mac(1), 5000);
        // VF1 takes TSO: one frame, its header intact.
        send(&nic, 1, &tso_hdr(1448), &f).unwrap();
        let got = received(&nic, 2);
        assert_eq!(got.len(), 1);
        assert_eq!(&got[0][..10], &tso_hdr(1448)[..10]);
        assert_eq!(&got[0][12..], &f[..]);
        // VF1 without receive offloads: MSS-sized frames, checksums done.
        nic.set_guest_features(2, Features::VERSION_1).unwrap();
        send(&nic, 1, &tso_hdr(1448), &f).unwrap();
        let got = received(&nic, 2);
        assert_eq!(got.len(), 4);
        let mut payload = Vec::new();
        for s in &got {
            assert_eq!(&s[..12], &[0; 12]);
            let fr = &s[12..];
            assert!(l4_checksum_ok(fr, &parse_frame(fr).unwrap()));
            payload.extend_from_slice(&fr[66..]);
        }
        assert_eq!(payload, f[66..]);
        assert_eq!(
            nic.ports[2].stats.rx[0].sw_offloads.load(Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn spoof_checking_drops_foreign_sources_and_learning_follows_them_when_off() {
        let up = FakeUplink::with_offloads(Offloads::ALL);
        let nic = nic_with_vfs(2, &up);
        let new_mac = Address([2, 0, 0, 0, 7, 7]);
        let f = frame(new_mac, Address::BROADCAST, 10);
        assert_eq!(send(&nic, 1, &[0; 12], &f), Err(DropReason::Spoofed));
        assert_eq!(nic.ports[1].stats.tx[0].drops(DropReason::Spoofed), 1);
        assert!(up.sent().is_empty() && received(&nic, 2).is_empty());
        nic.set_vf(1, &[("spoofchk", "off")]).unwrap();
        send(&nic, 1, &[0; 12], &f).unwrap();
        assert_eq!(up.sent().len(), 1);
        assert_eq!(received(&nic, 2).len(), 1);
        // The switch learned the address: frames to it reach VF0.
        let back = frame(vf_mac(1), new_mac, 10);
        send(&nic, 2, &[0; 12], &back).unwrap();
        assert_eq!(received(&nic, 1).len(), 1);
        assert_eq!(up.sent().len(), 1, "not flooded to the wire");
    }

    #[test]
    fn a_port_vlan_is_tagged_on_the_wire_untagged_to_the_guest_and_cannot_be_left() {
        let up = FakeUplink::with_offloads(Offloads::ALL);
        let nic = nic_with_vfs(2, &up);
        nic.set_vf(1, &[("vlan", "100"), ("qos", "2")]).unwrap();
        let away = Address([2, 0, 0, 0, 9, 9]);
        let f = frame(vf_mac(0), away, 10);
        send(&nic, 1, &[0; 12], &f).unwrap();
        let sent = up.sent();
        assert_eq!(sent.len(), 1);
        let wire = &sent[0][12..];
        assert_eq!(&wire[..12], &f[..12]);
        assert_eq!(&wire[12..16], &[0x81, 0x00, 0x40, 100]);
        assert_eq!(&wire[16..], &f[12..]);
        // Not to VF1, which is not in VLAN 100; the PF (a trunk) sees the
        // frame tagged.
        assert!(received(&nic, 2).is_empty());
        let pf = received(&nic, 0);
        assert_eq!(&pf[0][12 + 12..12 + 16], &[0x81, 0x00, 0x40, 100]);
        // A tagged frame from the guest is refused.
        let mut tagged = f.clone();
        tagged.splice(12..12, [0x81, 0, 0, 200]);
        assert_eq!(
            send(&nic, 1, &[0; 12], &tagged),
            Err(DropReason::VlanViolation)
        );
        // From the wire: tagged 100 reaches VF0 untagged; untagged does
        // not reach it.
        let mut from_wire = vec![0u8; 12];
        from_wire.extend_from_slice(&frame(away, vf_mac(0), 10));
        let plain = from_wire.clone();
        from_wire.splice(24..24, [0x81, 0, 0, 100]);
        let view = nic.switch.view();
        let st = &nic.pf().stats.rx[0];
        nic.from_uplink(&from_wire, &view, st, &mut TxScratch::default());
        assert_eq!(received(&nic, 1), vec![plain.clone()]);
        nic.from_uplink(&plain, &view, st, &mut TxScratch::default());
        assert!(received(&nic, 1).is_empty());
    }

    #[test]
    fn link_state_and_missing_frontends_drop_and_count() {
        let up = FakeUplink::with_offloads(Offloads::ALL);
        let nic = nic_with_vfs(2, &up);
        nic.set_vf(1, &[("state", "disable")]).unwrap();
        let f = frame(vf_mac(0), vf_mac(1), 10);
        assert_eq!(send(&nic, 1, &[0; 12], &f), Err(DropReason::LinkDown));
        send(&nic, 2, &[0; 12], &frame(vf_mac(1), vf_mac(0), 10)).unwrap();
        assert_eq!(nic.ports[1].stats.rx[0].drops(DropReason::LinkDown), 1);
        assert!(received(&nic, 1).is_empty());
        nic.set_vf(1, &[("state", "enable")]).unwrap();
        send(&nic, 1, &[0; 12], &f).unwrap();
        assert_eq!(received(&nic, 2).len(), 1);
        // A port whose frontend is gone.
        nic.attach(2, false);
        send(&nic, 1, &[0; 12], &f).unwrap();
        assert_eq!(nic.ports[2].stats.rx[0].drops(DropReason::PortDown), 1);
        assert!(received(&nic, 2).is_empty());
    }

    #[test]
    fn an_untrusted_vf_cannot_go_promiscuous_or_change_its_mac() {
        use vnic_protocol::virtio::ctrl::{CtrlCommand, RxMode};
        let up = FakeUplink::default();
        let nic = nic_with_vfs(1, &up);
        let all = crate::vhost::offered_features();
        let promisc = CtrlCommand::Rx {
            mode: RxMode::Promisc,
            on: true,
        };
        let mac = CtrlCommand::MacAddrSet(Address([2, 0, 0, 0, 5, 5]));
        assert!(nic.control(1, &promisc, all).is_err());
        assert!(nic.control(1, &mac, all).is_err());
        assert!(!nic.switch.view().ports[1].filter.promisc);
        nic.set_vf(1, &[("trust", "on")]).unwrap();
        assert!(nic.control(1, &promisc, all).is_ok());
        assert!(nic.control(1, &mac, all).is_ok());
        assert_eq!(nic.switch.view().ports[1].mac, Address([2, 0, 0, 0, 5, 5]));
        // A bad setting changes nothing, whatever came before it.
        assert!(nic
            .set_vf(1, &[("trust", "off"), ("vlan", "5000")])
            .is_err());
        assert!(nic.ports[1].settings().trust);
        // Another port's MAC is refused.
        assert!(nic.set_vf(1, &[("mac", "02:00:00:00:00:01")]).is_err());
    }

    #[test]
    fn a_rate_given_at_start_holds_from_the_first_frame() {
        let up = FakeUplink::with_offloads(Offloads::ALL);
        let mut vf = VfSettings::new(vf_mac(0));
        vf.max_tx_rate = 10;
        let nic = Nic::new(config(1), vec![vf], Box::new(up.clone()), Vec::new()).unwrap();
        nic.attach(1, true);
        let view = nic.switch.view();
        assert_eq!(nic.tx_wait(1, &view), None);
        let away = Address([2, 0, 0, 0, 9, 9]);
        let f = frame(vf_mac(0), away, 60_000);
        send(&nic, 1, &tso_hdr(1448), &f).unwrap();
        send(&nic, 1, &tso_hdr(1448), &f).unwrap();
        // 120 kB over a 64 KiB burst at 1.25 MB/s: about 45 ms to wait.
        let w = nic.tx_wait(1, &view).expect("over the rate");
        assert!((30_000_000..60_000_000).contains(&w), "{w} ns");
        // The PF has no limit.
        assert_eq!(nic.tx_wait(0, &view), None);
    }

    #[test]
    fn switchdev_sends_what_matches_no_entry_to_the_representor() {
        let up = FakeUplink::with_offloads(Offloads::ALL);
        let reps = [
            FakeUplink::with_offloads(Offloads::ALL),
            FakeUplink::default(),
        ];
        let vfs = (0..2).map(|i| VfSettings::new(vf_mac(i))).collect();
        let boxed = reps
            .iter()
            .map(|r| Box::new(r.clone()) as Box<dyn Uplink>)
            .collect();
        let nic = Nic::new(config(1), vfs, Box::new(up.clone()), boxed).unwrap();
        for p in 0..3 {
            nic.attach(p, true);
            nic.set_guest_features(p, crate::vhost::offered_features())
                .unwrap();
        }
        let away = Address([2, 0, 0, 0, 9, 9]);
        // Unknown unicast from VF1: its representor, not the wire. A GSO
        // frame is segmented for a representor that takes no TSO.
        let f = frame(vf_mac(1), away, 3000);
        send(&nic, 2, &tso_hdr(1448), &f).unwrap();
        assert!(up.sent().is_empty());
        assert!(reps[0].sent().is_empty());
        assert_eq!(reps[1].sent().len(), 3);
        // A broadcast goes to the representor alone (the host floods it).
        send(&nic, 2, &[0; 12], &frame(vf_mac(1), Address::BROADCAST, 10)).unwrap();
        assert_eq!(reps[1].sent().len(), 4);
        assert!(received(&nic, 0).is_empty() && received(&nic, 1).is_empty());
        // VF to VF is still switched in the device.
        send(&nic, 1, &[0; 12], &frame(vf_mac(0), vf_mac(1), 10)).unwrap();
        assert_eq!(received(&nic, 2).len(), 1);
        assert!(reps[0].sent().is_empty());
        // What the host writes to representor 0 goes to VF0.
        let buf = [
            &[0u8; 12][..],
            &frame(away, Address([2, 0, 0, 0, 8, 8]), 10),
        ]
        .concat();
        nic.from_representor(
            0,
            &buf,
            &nic.switch.view(),
            &nic.ports[1].stats.rx[0],
            &mut TxScratch::default(),
        );
        assert_eq!(received(&nic, 1), vec![buf.clone()]);
        // A tag VF0 did not add keeps the frame out.
        let mut tagged = buf.clone();
        // VLAN 300.
        tagged.splice(24..24, [0x81, 0x00, 0x01, 0x2c]);
        nic.from_representor(
            0,
            &tagged,
            &nic.switch.view(),
            &nic.ports[1].stats.rx[0],
            &mut TxScratch::default(),
        );
        assert!(received(&nic, 1).is_empty());
        assert_eq!(nic.ports[1].stats.rx[0].drops(DropReason::Filtered), 1);
        // The PF's frames still go to the wire.
        send(&nic, 0, &[0; 12], &frame(config(1).mac, away, 10)).unwrap();
        assert_eq!(up.sent().len(), 1);
    }

    #[test]
    fn a_vf_cannot_claim_another_address_or_vlan() {
        use vnic_protocol::virtio::ctrl::CtrlCommand;
        let up = FakeUplink::with_offloads(Offloads::ALL);
        let nic = nic_with_vfs(2, &up);
        let all = crate::vhost::offered_features();
        let gateway = Address([2, 0, 0, 0, 9, 9]);
        // An untrusted VF lists the gateway's MAC in its unicast filter:
        // frames to the gateway still reach the wire, and the VF gets a
        // flooded copy only because its filter asked for it.
        nic.control(
            1,
            &CtrlCommand::MacTableSet {
                unicast: vec![gateway],
                multicast: vec![],
            },
            all,
        )
        .unwrap();
        send(&nic, 2, &[0; 12], &frame(vf_mac(1), gateway, 10)).unwrap();
        assert_eq!(up.sent().len(), 1, "the gateway's frame reached the wire");
        assert_eq!(received(&nic, 1).len(), 1);
        // VLAN anti-spoofing: a tagged frame for a VLAN the VF did not add.
        let mut tagged = frame(vf_mac(0), gateway, 10);
        tagged.splice(12..12, [0x81, 0, 0, 7]);
        assert_eq!(
            send(&nic, 1, &[0; 12], &tagged),
            Err(DropReason::VlanViolation)
        );
        nic.control(1, &CtrlCommand::VlanAdd(7), all).unwrap();
        send(&nic, 1, &[0; 12], &tagged).unwrap();
        // A learned address that shows up on the wire is forgotten.
        nic.set_vf(1, &[("spoofchk", "off")]).unwrap();
        let moved = Address([2, 0, 0, 0, 7, 7]);
        send(&nic, 1, &[0; 12], &frame(moved, Address::BROADCAST, 10)).unwrap();
        assert!(nic.switch.view().ports[1].learned.contains(&moved));
        let from_wire = [&[0u8; 12][..], &frame(moved, vf_mac(1), 10)].concat();
        nic.from_uplink(
            &from_wire,
            &nic.switch.view(),
            &nic.pf().stats.rx[0],
            &mut TxScratch::default(),
        );
        assert!(!nic.switch.view().ports[1].learned.contains(&moved));
        // set_vf never touches the PF.
        assert!(nic.set_vf(0, &[("trust", "off")]).is_err());
    }

    #[test]
    fn steering_only_to_enabled_queues() {
        let all = QueueSet(0b1111);
        assert_eq!(
            (0..4).map(|q| all.pick(q, 9)).collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
        let two = QueueSet(0b0101);
        assert_eq!(
            (0..4).map(|q| two.pick(q, 9)).collect::<Vec<_>>(),
            [0, 2, 2, 2]
        );
        assert_eq!(QueueSet(0b1000).pick(1, 9), 3);
        assert_eq!(QueueSet(0).pick(1, 9), 9);
    }

    #[test]
    fn a_backlog_frame_is_taken_off_only_when_its_consumer_says_so() {
        let b = Backlog::new(4, 1 << 20).unwrap();
        assert!(b.push(b"one") && b.push(b"two"));
        let mut buf = Vec::new();
        assert_eq!(
            b.deliver_front_unlocked(&mut buf, |f| {
                assert_eq!(f, b"one");
                false
            }),
            Some(false)
        );
        // Meanwhile another thread pushes: the lock is free while f runs.
        assert_eq!(
            b.deliver_front_unlocked(&mut buf, |f| {
                assert!(b.push(b"three"));
                f == b"one"
            }),
            Some(true)
        );
        assert_eq!(
            b.deliver_front_unlocked(&mut buf, |f| f == b"two"),
            Some(true)
        );
        assert_eq!(
            b.deliver_front_unlocked(&mut buf, |f| f == b"three"),
            Some(true)
        );
        assert_eq!(b.deliver_front_unlocked(&mut buf, |_| true), None);
    }

    #[test]
    fn backlog_is_bounded_and_ordered() {
        let b = Backlog::new(2, 1 << 20).unwrap();
        assert!(b.push(b"one"));
        assert!(b.push(b"two"));
        assert!(!b.push(b"three"));
        assert_eq!(b.deliver_front(|f| f == b"one"), Some(true));
        assert_eq!(b.deliver_front(|_| false), Some(false));
        assert_eq!(b.deliver_front(|f| f == b"two"), Some(true));
        assert_eq!(b.deliver_front(|_| true), None);
    }

    #[test]
    fn backlog_is_bounded_in_bytes_whatever_the_frame_sizes() {
        let max = 1 << 20;
        let b = Backlog::new(1024, max).unwrap();
        let big = vec![1u8; 65_000];
        let small = vec![2u8; 60];
        // 64 KiB frames: only as many as fit in the bytes.
        let mut queued = 0;
        while b.push(&big) {
            queued += 1;
            assert!(b.held_bytes() <= max);
        }
        assert_eq!(queued, max / big.len());
        assert_eq!(b.len(), queued);
        // Delivered buffers are recycled, and still charged.
        for _ in 0..queued {
            assert_eq!(b.deliver_front(|f| f.len() == big.len()), Some(true));
        }
        assert!(b.held_bytes() > 0 && b.held_bytes() <= max);
        // Small frames reuse nothing oversized: the old buffers are given
        // back, and small frames fill up to the frame bound.
        let mut n = 0;
        while b.push(&small) {
            n += 1;
            assert!(b.held_bytes() <= max);
        }
        assert_eq!(
            n, 1024,
            "the frame bound, not the byte bound, stops small frames"
        );
        assert!(b.held_bytes() <= 1024 * 60 + 64 * 65_000);
        // Mixed sizes in any order never pass the bound.
        b.clear();
        assert_eq!(b.held_bytes(), 0);
        for k in 0..5000usize {
            let f = if k % 7 == 0 {
                &big[..]
            } else {
                &big[..40 + k % 1400]
            };
            let _ = b.push(f);
            if k % 3 == 0 {
                let _ = b.deliver_front(|_| true);
            }
            assert!(b.held_bytes() <= max, "{} bytes held", b.held_bytes());
        }
    }
}
