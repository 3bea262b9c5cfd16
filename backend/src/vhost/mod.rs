//! vhost-user plumbing: the `VhostUserBackend` of one vnic port. It moves
//! bytes between descriptor chains in guest memory and the device model in
//! `nic/`; it makes no switching or offload decisions of its own.
//!
//! Queue layout: RX i is virtqueue 2i, TX i is 2i+1, and the control
//! queue is 2N. Worker thread i owns queue pair i, its uplink queue and its
//! RX backlog; inside the worker the pair's vrings are events 0 (RX) and 1
//! (TX). Thread N serves the control queue, when the frontend hands it
//! over (a VMM that keeps the control queue never sets up virtqueue 2N).

mod chain;
pub mod packed;
pub mod relay;
mod split;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;
#[cfg(test)]
mod tests;
mod toe;

use std::{
    io,
    os::fd::{AsRawFd, RawFd},
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering},
        Arc, Mutex, OnceLock, PoisonError, RwLock,
    },
    time::{Duration, Instant},
};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::{
    epoll::EventSet,
    event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier},
    eventfd::{EventFd, EFD_NONBLOCK},
    timerfd::TimerFd,
};
use vnic_protocol::virtio::{
    config::{VirtioNetConfig, DUPLEX_FULL, STATUS_ANNOUNCE, STATUS_LINK_UP},
    ctrl::{CtrlCommand, ACK_ERR, ACK_OK},
    hdr::HDR_LEN_HASH,
    Features,
};

use self::{
    chain::{
        gather_one, gather_tx, pop_packed, pop_valid, split_chain, write_span, Direct, RxWriter,
    },
    packed::{PackedRing, Position},
    split::{Regions, SplitRing, BATCH},
};
use crate::{
    nic::{
        coalesce::Verdict,
        ctrl::{RSS_MAX_KEY, RSS_MAX_TABLE, SUPPORTED_HASH_TYPES},
        rsc::{RscFlush, RscQueue},
        switch::View,
        DropReason, Nic, Port, QueueStats, RxPath, TxScratch, UplinkRoute, MAX_FRAME,
    },
    uplink::{
        tap::{MAX_TAP_FRAME, VNET_HDR_LEN},
        Piece, PieceMut, MAX_PIECES,
    },
};

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

/// VRING_AVAIL_F_NO_INTERRUPT: the driver does not want used-buffer
/// notifications (without EVENT_IDX).
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Frames a worker moves per wake-up before it yields to other events.
const BUDGET: usize = 256;
/// Control commands answered per wake-up.
const CTRL_BUDGET: usize = 64;
/// The longest answer a control command has (VQ_GET's
/// `virtio_net_ctrl_coal`).
const CTRL_MAX_ANSWER: usize = 8;

/// The backend's own events, numbered above the queues and the exit
/// event. Every worker thread has its own epoll; a thread that serves
/// several pairs has a set of ids per pair ([`VnicBackend::slot_event`]).
#[derive(Debug, Clone, Copy)]
enum Ev {
    /// The worker's uplink queue has frames.
    Uplink = 1,
    /// Frames wait in the worker's RX backlog (or RX ran out of budget).
    Backlog = 2,
    /// TX (or, on the control thread, the control queue) ran out of
    /// budget with chains left.
    Resume = 3,
    /// The port's transmit rate allows the next frame.
    Timer = 4,
    /// A held used-buffer notification of the worker's queues is due.
    Coalesce = 5,
}

/// Ids of [`Ev`] per pair.
const EVENTS: usize = 5;

/// What an event asks of a pair's worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Work {
    /// A kick of its RX queue.
    Rx,
    /// A kick of its TX queue.
    Tx,
    Resume,
    Timer,
    Coalesce,
    Uplink,
    Backlog,
}

/// Worker threads for `pairs` queue pairs: `asked`, or with 0 one per
/// pair up to the CPUs this process may run on (more threads than cores
/// only add switches between them), at least one and at most `pairs`.
pub fn worker_threads(pairs: usize, asked: usize) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let n = if asked == 0 { cpus } else { asked };
    n.clamp(1, pairs.max(1))
}

/// A worker's coalescing timer and the deadline it is armed for.
#[derive(Debug)]
struct CoalTimer {
    fd: TimerFd,
    /// NIC-clock ns the timer fires at, if armed.
    armed: Option<u64>,
}

/// Features the device offers (the control queue ones come with it).
pub fn offered_features() -> Features {
    Features::VERSION_1
        | Features::MRG_RXBUF
        | Features::EVENT_IDX
        | Features::INDIRECT_DESC
        | Features::MAC
        | Features::MTU
        | Features::STATUS
        | Features::MQ
        | Features::CSUM
        | Features::GUEST_CSUM
        | Features::HOST_TSO4
        | Features::HOST_TSO6
        | Features::HOST_ECN
        | Features::HOST_USO
        | Features::GUEST_TSO4
        | Features::GUEST_TSO6
        | Features::GUEST_ECN
        | Features::GUEST_USO4
        | Features::GUEST_USO6
        | Features::HASH_REPORT
        | Features::CTRL_VQ
        | Features::CTRL_RX
        | Features::CTRL_RX_EXTRA
        | Features::CTRL_VLAN
        | Features::CTRL_MAC_ADDR
        | Features::CTRL_GUEST_OFFLOADS
        | Features::RSS
        | Features::NOTF_COAL
        | Features::VQ_NOTF_COAL
        | Features::RSC_EXT
        | Features::IN_ORDER
        | Features::RING_PACKED
        | Features::VNIC_TOE
        | Features::VHOST_USER_PROTOCOL_FEATURES
}

#[derive(Debug)]
struct Worker {
    /// A TX frame's header and first bytes.
    tx: Vec<u8>,
    /// The rest of a TX frame, left in guest memory.
    rest: Vec<(GuestAddress, usize)>,
    /// Pieces past what a vectored write takes, copied.
    tail: Vec<u8>,
    rx: Vec<u8>,
    /// A received frame on its way to another queue.
    rx_out: Vec<u8>,
    /// The last frame received was larger than the MTU (a GSO frame).
    rx_big: bool,
    scratch: TxScratch,
    /// The switch's view, refreshed per batch.
    view: Arc<View>,
    /// The RX queue's receive segment coalescing.
    rsc: RscQueue,
}

impl Worker {
    fn new(view: Arc<View>) -> Worker {
        Worker {
            tx: Vec::with_capacity(HDR_LEN_HASH + MAX_FRAME),
            rest: Vec::with_capacity(MAX_PIECES),
            tail: Vec::new(),
            rx: vec![0u8; VNET_HDR_LEN + MAX_FRAME],
            rx_out: Vec::with_capacity(VNET_HDR_LEN + MAX_FRAME),
            rx_big: false,
            scratch: TxScratch::default(),
            view,
            rsc: RscQueue::default(),
        }
    }
}

/// The next available chain of `vring` with a valid head, if any.
fn pop_chain<M>(
    vring: &VringRwLock,
    mem: &M,
    stats: &QueueStats,
) -> Option<virtio_queue::DescriptorChain<M>>
where
    M: Clone + std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    pop_valid(vring.get_mut().get_queue_mut(), mem.clone(), stats)
}

/// [`VnicBackend::left`]: transmit stopped at its budget.
const LEFT_TX: u8 = 1;
/// [`VnicBackend::left`]: receive stopped at its budget.
const LEFT_RX: u8 = 2;

/// Whether a TX or control loop must stop although the driver's avail
/// index says chains wait (`enable_notification` was true): after a round
/// that took nothing (`empty_round`) for the second time in a row, or at
/// once when the index ran more than a queue's worth ahead. virtio-queue
/// then pops nothing (so do a queue that is not ready, an avail ring at
/// address 0, an entry that cannot be read), and going round again would
/// spin forever; the queue stays stuck until the driver resets it. One
/// empty round is the driver publishing just as notifications were
/// re-enabled, and the next round takes its chains.
fn stuck<M>(vring: &VringRwLock, mem: &M, empty_round: bool, empties: &mut u32) -> bool
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    if !empty_round {
        *empties = 0;
        return false;
    }
    *empties += 1;
    let st = vring.get_ref();
    let q = st.get_queue();
    let overrun = q.avail_idx(&**mem, Ordering::Acquire).map_or(true, |idx| {
        (idx - std::num::Wrapping(q.next_avail())).0 > q.size()
    });
    *empties > 1 || overrun || !q.ready()
}

/// Checks of the ring between two readings of the clock while a worker
/// polls it.
const POLL_CHECKS: u32 = 64;

/// Whether the driver makes chains available in `vring` within `poll`,
/// looked for until then with its notifications still off (zero: not
/// looked for), and how long it looked.
fn poll_for_more(
    vring: &VringRwLock,
    mem: &GuestMemoryMmap,
    packed: bool,
    poll: Duration,
) -> (bool, Duration) {
    if poll.is_zero() {
        return (false, Duration::ZERO);
    }
    let start = Instant::now();
    let end = start + poll;
    loop {
        for _ in 0..POLL_CHECKS {
            if has_avail(vring, mem, packed) {
                return (true, start.elapsed());
            }
            std::hint::spin_loop();
        }
        let now = Instant::now();
        if now >= end {
            return (false, now - start);
        }
    }
}

/// Whether the driver has made chains available past the device's
/// position (for a split ring: its index moved, whatever the entries
/// are; the round that takes them checks them).
fn has_avail(vring: &VringRwLock, mem: &GuestMemoryMmap, packed: bool) -> bool {
    let st = vring.get_ref();
    let q = st.get_queue();
    if packed {
        PackedRing::from_queue(q, mem).is_some_and(|r| r.has_avail())
    } else {
        q.avail_idx(mem, Ordering::Acquire)
            .is_ok_and(|idx| idx.0 != q.next_avail())
    }
}

/// Whether the frontend has the queue enabled and ready.
fn live(vring: &VringRwLock) -> bool {
    let st = vring.get_ref();
    st.is_enabled() && st.get_queue().ready()
}

/// The driver's available index (0 if the ring cannot be read).
fn avail_idx<M>(vring: &VringRwLock, mem: &M) -> u16
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    vring
        .get_ref()
        .get_queue()
        .avail_idx(&**mem, Ordering::Acquire)
        .map_or(0, |w| w.0)
}

/// Turns the driver's available-buffer notifications for `vring` on or
/// off: a split ring's through virtio-queue (VRING_USED_F_NO_NOTIFY, or
/// avail_event with EVENT_IDX), a packed ring's through its device area.
/// Turned on, whether chains wait already (the caller goes on, as a kick
/// would have it).
fn kicks(vring: &VringRwLock, mem: &GuestMemoryMmap, packed: bool, on: bool) -> io::Result<bool> {
    if !packed {
        if on {
            return vring.enable_notification().map_err(io::Error::other);
        }
        vring.disable_notification().map_err(io::Error::other)?;
        return Ok(false);
    }
    let st = vring.get_ref();
    let Some(ring) = PackedRing::from_queue(st.get_queue(), mem) else {
        // Not ready, or not a ring: nothing to take.
        return Ok(false);
    };
    ring.set_kicks(on)
        .ok_or_else(|| io::Error::other("device area not writable"))?;
    Ok(on && ring.has_avail())
}

/// The bytes a request chain holds for the device and the buffers it
/// has for the answer, or why it cannot be served.
type Request<'r> = Result<(&'r [u8], &'r [(GuestAddress, usize)]), DropReason>;

/// Serves the request lists of packed ring `vring` (control, TOE) one at
/// a time, with its lock held: up to `budget`, each list's readable bytes
/// and writable buffers (or why it is bad) go to `serve`, which returns
/// the bytes it wrote, or None to leave that list in the ring and stop.
/// Kicks are off while it works and on again once the ring is empty. A
/// ring that cannot be resolved or breaks the format is counted
/// (`BadRing`) and left. Returns how many lists were used and whether it
/// stopped at the budget.
fn serve_packed(
    vring: &VringRwLock,
    mem: &GuestMemoryMmap,
    stats: &QueueStats,
    moved_sink: Option<&AtomicU32>,
    budget: usize,
    mut serve: impl FnMut(Request<'_>) -> Option<u32>,
) -> io::Result<(usize, bool)> {
    let unwritable = || io::Error::other("packed ring not writable");
    let mut g = vring.get_mut();
    let Some(mut ring) = PackedRing::from_queue(g.get_queue(), mem) else {
        if g.get_queue().ready() {
            stats.drop(DropReason::BadRing);
        }
        return Ok((0, false));
    };
    let (mut readable, mut writable) = (Vec::new(), Vec::new());
    let mut moved = 0;
    let mut stop = false;
    loop {
        ring.set_kicks(false).ok_or_else(unwritable)?;
        while moved < budget && !stop {
            let before = ring.position();
            let a = match pop_packed(&mut ring, stats) {
                Ok(Some(a)) => a,
                Ok(None) => break,
                Err(()) => {
                    stop = true;
                    break;
                }
            };
            let request = split_chain(mem, ring.chain(&a, mem), &mut readable, &mut writable)
                .map(|()| (readable.as_slice(), writable.as_slice()));
            let Some(len) = serve(request) else {
                ring.unpop(before);
                stop = true;
                break;
            };
            ring.put_used(a.id, len, a.count).ok_or_else(unwritable)?;
            ring.publish().ok_or_else(unwritable)?;
            moved += 1;
        }
        if stop || moved >= budget {
            break;
        }
        ring.set_kicks(true).ok_or_else(unwritable)?;
        if !ring.has_avail() {
            break;
        }
    }
    if let Some(sink) = moved_sink {
        sink.fetch_add(ring.used_moved(), Ordering::AcqRel);
    }
    ring.finish(g.get_queue_mut()).ok_or_else(unwritable)?;
    Ok((moved, moved >= budget))
}

/// Asks the driver of an RX queue that ran out of buffers to notify the
/// device when it posts more than the `seen` it had posted; returns
/// whether it posted more meanwhile (then the caller goes on at once).
///
/// Without EVENT_IDX that is clearing VRING_USED_F_NO_NOTIFY. With it,
/// `avail_event` must be `seen`, not the device's position as
/// virtio-queue writes it: a device that put unused buffers back
/// (`go_to_previous_position`) sits behind the index the driver last
/// checked, and a driver only kicks when its index passes `avail_event`
/// (virtio 1.3, 2.7.10): it would never kick again.
fn want_buffers<M>(vring: &VringRwLock, mem: &M, seen: u16) -> io::Result<bool>
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    vring.enable_notification().map_err(io::Error::other)?;
    {
        let st = vring.get_ref();
        let q = st.get_queue();
        if q.event_idx_enabled() {
            let at = q
                .used_ring()
                .checked_add(4 + 8 * u64::from(q.size()))
                .ok_or_else(|| io::Error::other("used ring at the top of the address space"))?;
            mem.store(seen.to_le(), GuestAddress(at), Ordering::Release)
                .map_err(io::Error::other)?;
        }
    }
    std::sync::atomic::fence(Ordering::SeqCst);
    Ok(avail_idx(vring, mem) != seen)
}

/// Frames delivered straight into an RX queue's buffers, added to its
/// counters once, when the round ends (however it ends), rather than
/// with three atomic adds a frame.
struct Tally<'a> {
    stats: &'a QueueStats,
    packets: u64,
    bytes: u64,
}

impl<'a> Tally<'a> {
    fn new(stats: &'a QueueStats) -> Tally<'a> {
        Tally {
            stats,
            packets: 0,
            bytes: 0,
        }
    }

    fn add(&mut self, bytes: usize) {
        self.packets += 1;
        self.bytes += bytes as u64;
    }

    fn add_many(&mut self, frames: usize, bytes: u64) {
        self.packets += frames as u64;
        self.bytes += bytes;
    }
}

impl Drop for Tally<'_> {
    fn drop(&mut self) {
        if self.packets > 0 {
            self.stats.packets(self.packets, self.bytes);
            self.stats
                .direct
                .fetch_add(self.packets, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Writes one frame the device holds (the TAP's header first) into the
/// RX queue `writer` fills, with the hash `me`'s RSS gives it when the
/// driver wants it reported. False when the driver has no buffers for it
/// (nothing changed); true when it was written, or dropped and counted.
fn put_frame(
    writer: &mut RxWriter<'_>,
    me: &crate::nic::switch::PortView,
    f: &[u8],
    stats: &QueueStats,
) -> bool {
    let frame = f.get(VNET_HDR_LEN..).unwrap_or(&[]);
    let steering = if writer.hash_report {
        me.steer(&frame[..frame.len().min(256)], frame.len())
    } else {
        crate::nic::switch::NO_HASH
    };
    match writer.write(f, &steering) {
        Ok(()) => {
            stats.packet(frame.len());
            true
        }
        Err(DropReason::RxNoBuffers) => false,
        Err(why) => {
            stats.drop(why);
            true
        }
    }
}

/// Pieces of a frame whose payload lies in at most three guest buffers.
const SHORT_PIECES: usize = 4;

/// Calls `f` with the guest regions `rest` (then `tail`, when there is
/// one and room) as pieces of a vectored write, or with None when a region
/// is not in guest memory.
fn with_pieces<'m: 'p, 't: 'p, 'p, const N: usize>(
    mem: &mut Regions<'m>,
    rest: &[(GuestAddress, usize)],
    tail: &'t [u8],
    f: impl FnOnce(Option<&[Piece<'p>]>),
) {
    if rest.is_empty() && tail.is_empty() {
        // A frame all in the prefix (most small ones): no list to build.
        return f(Some(&[]));
    }
    let mut pieces = [Piece::Local(&[]); N];
    for (p, &(addr, len)) in pieces.iter_mut().zip(rest.iter()) {
        match mem.slice(addr, len) {
            Some(v) => *p = Piece::Guest(v),
            None => return f(None),
        }
    }
    let mut n = rest.len().min(N);
    if !tail.is_empty() && n < N {
        pieces[n] = Piece::Local(tail);
        n += 1;
    }
    f(Some(&pieces[..n]));
}

/// How an RX queue's driver stands for buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Room {
    Plenty,
    /// Under a quarter of the ring left.
    Low,
    /// None left with frames waiting.
    None,
}

/// How many buffers the driver of RX queue `vring` has left posted.
fn rx_room(vring: &VringRwLock, mem: &GuestMemoryMmap, packed: bool) -> Room {
    let st = vring.get_ref();
    let q = st.get_queue();
    if packed {
        // A packed ring tells only whether the next buffer is there.
        return match PackedRing::from_queue(q, mem) {
            Some(r) if r.has_avail() => Room::Plenty,
            _ => Room::Low,
        };
    }
    let idx = q.avail_idx(mem, Ordering::Acquire).map_or(0, |w| w.0);
    let left = idx.wrapping_sub(q.next_avail());
    if left < q.size() / 4 {
        Room::Low
    } else {
        Room::Plenty
    }
}

/// A timerfd whose reads never block (a reset between the wake-up and
/// the read leaves it unexpired).
fn nonblocking_timer() -> io::Result<TimerFd> {
    let t = TimerFd::new()?;
    let fd = t.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on a descriptor this function owns; no
    // memory is passed.
    let ok = unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        fl >= 0 && libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) == 0
    };
    if ok {
        Ok(t)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// What reading the uplink gave.
enum Uplinked {
    /// Nothing there (or the uplink failed, logged).
    Empty,
    /// A frame that was dropped and counted, or passed to the switch.
    Dropped,
    /// A frame of `len` bytes (TAP header included) for the PF, which RSS
    /// sends to `steered`.
    Frame { len: usize, steered: usize },
}

/// One vnic port as a vhost-user backend.
pub struct VnicBackend {
    nic: Arc<Nic>,
    /// Which of the NIC's ports this is.
    port: usize,
    mem: RwLock<Mem>,
    acked: AtomicU64,
    /// Errors from rings the guest broke, for rate-limited logging.
    ring_errors: AtomicU64,
    /// The consumer ends of the exit events handed to vhost-user-backend;
    /// see [`VnicBackend::close_exit_fds`].
    exit_fds: Mutex<Vec<RawFd>>,
    workers: Vec<Mutex<Worker>>,
    /// Each pair's RX vring, recorded at its worker's first event, so
    /// that steering can see which queues the frontend enabled.
    rx_vrings: Vec<OnceLock<VringRwLock>>,
    /// Per worker, then the control thread: work left over when a budget
    /// ran out (see [`VnicBackend::resume_event`]).
    resume: Vec<EventFd>,
    /// Whether each of `resume` was written and not read since: written
    /// only then, so a worker whose every round ends at its budget
    /// leaves it readable rather than writing and reading it per round.
    resume_set: Vec<AtomicBool>,
    /// Per worker: which of its directions stopped at a budget and waits
    /// for the resume event ([`LEFT_TX`], [`LEFT_RX`]); only its own
    /// thread touches it.
    left: Vec<AtomicU8>,
    /// Per worker: fires when the port's rate limit lets TX go on.
    timers: Vec<Mutex<TimerFd>>,
    /// Per worker: fires when a notification its queues hold is due.
    coal_timers: Vec<Mutex<CoalTimer>>,
    /// Per virtqueue: the used index at the last notification decision
    /// ([`NOT_YET`] before the first), for EVENT_IDX.
    signalled: Vec<AtomicU32>,
    /// Per virtqueue, with a packed ring: the ring entries used since its
    /// last notification decision (added under the vring's lock).
    packed_moved: Vec<AtomicU32>,
    /// Worker threads for the queue pairs: pair `p` is served by thread
    /// `p % threads` (its slot there is `p / threads`); the control queue
    /// and the TOE's queues have the thread after them.
    threads: usize,
    /// The port's TOE engines, one per RX queue (vhost/toe.rs).
    toe: toe::ToeSet,
    /// Fires at the TOE engines' next deadline, on the control thread.
    toe_timer: Mutex<TimerFd>,
}

/// No notification decision made yet on a virtqueue.
const NOT_YET: u32 = u32::MAX;

impl std::fmt::Debug for VnicBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VnicBackend")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl VnicBackend {
    /// The backend of port `port` of `nic`.
    pub fn new(nic: Arc<Nic>, port: usize, mem: Mem) -> io::Result<VnicBackend> {
        let p = nic
            .ports
            .get(port)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no such port"))?;
        let pairs = usize::from(p.config.pairs);
        let threads = worker_threads(pairs, usize::from(p.config.workers));
        let resume = (0..=pairs)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<_>>()?;
        let timers = (0..pairs)
            .map(|_| nonblocking_timer().map(Mutex::new))
            .collect::<io::Result<_>>()?;
        let coal_timers = (0..pairs)
            .map(|_| nonblocking_timer().map(|fd| Mutex::new(CoalTimer { fd, armed: None })))
            .collect::<io::Result<_>>()?;
        let view = nic.switch.view();
        let toe = crate::nic::toe::ToeConfig {
            mac: p.ctrl_state().mac,
            mtu: usize::from(p.config.mtu),
            max_conns: p.config.toe_conns,
            offload: true,
            tcp: vnic_protocol::tcp::Config::default(),
            // 1 MiB for TCP datagrams that come in fragments, per port,
            // shared out among its engines (one per RX queue).
            reassembly: vnic_protocol::frag::Limits {
                max_memory: (1 << 20) / pairs.max(1),
                max_datagrams: 64 / pairs.max(1),
                ..vnic_protocol::frag::Limits::default()
            },
        };
        Ok(VnicBackend {
            toe: toe::ToeSet::new(toe, pairs),
            toe_timer: Mutex::new(nonblocking_timer()?),
            resume_set: (0..=pairs).map(|_| AtomicBool::new(false)).collect(),
            left: (0..pairs).map(|_| AtomicU8::new(0)).collect(),
            resume,
            timers,
            coal_timers,
            signalled: (0..2 * pairs + 3)
                .map(|_| AtomicU32::new(NOT_YET))
                .collect(),
            packed_moved: (0..2 * pairs + 3).map(|_| AtomicU32::new(0)).collect(),
            workers: (0..pairs)
                .map(|_| Mutex::new(Worker::new(view.clone())))
                .collect(),
            rx_vrings: (0..pairs).map(|_| OnceLock::new()).collect(),
            nic,
            port,
            mem: RwLock::new(mem),
            acked: AtomicU64::new(0),
            ring_errors: AtomicU64::new(0),
            exit_fds: Mutex::new(Vec::new()),
            threads,
        })
    }

    /// The guest memory as the frontend last described it.
    fn memory(&self) -> vm_memory::GuestMemoryLoadGuard<GuestMemoryMmap> {
        self.mem
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .memory()
    }

    /// The port this backend serves.
    fn dev(&self) -> &Port {
        &self.nic.ports[self.port]
    }

    fn pairs(&self) -> usize {
        usize::from(self.dev().config.pairs)
    }

    /// The id of one of the backend's own events (above every queue id
    /// and the exit event, which takes id `num_queues`).
    /// Event `e`'s id for the first pair of a thread (the control
    /// thread's too).
    fn event_id(&self, e: Ev) -> u16 {
        self.slot_event(0, e)
    }

    /// Event `e`'s id for the pair in `slot` of its thread: ids run above
    /// the queues and the exit event, [`EVENTS`] per slot.
    fn slot_event(&self, slot: usize, e: Ev) -> u16 {
        (self.queues() + slot * EVENTS + e as usize) as u16
    }

    /// Virtqueues: the pairs, the control queue, the TOE's command and
    /// event queues.
    fn queues(&self) -> usize {
        2 * self.pairs() + 3
    }

    /// The slot and event an id names, if it is one of the backend's own.
    fn decode_event(&self, id: u16) -> Option<(usize, u16)> {
        let d = usize::from(id).checked_sub(self.queues() + 1)?;
        Some((d / EVENTS, (d % EVENTS + 1) as u16))
    }

    /// The pair in `slot` of worker thread `t`, if there is one.
    fn pair_of(&self, t: usize, slot: usize) -> Option<usize> {
        let p = slot * self.threads + t;
        (t < self.threads && p < self.pairs()).then_some(p)
    }

    /// The event that resumes a worker's (or the control thread's) work
    /// left over when it ran out of budget.
    pub fn resume_event(&self) -> u16 {
        self.event_id(Ev::Resume)
    }

    /// Closes the exit events' consumer ends. vhost-user-backend 0.24
    /// registers each with its worker's epoll through `into_raw_fd()` and
    /// never closes it (event_loop.rs, `VringEpollHandler::new`): one
    /// descriptor per worker thread per frontend connection, for good.
    /// Call it once the daemon and every epoll handler of this backend are
    /// gone (the backend's `Arc` is the caller's alone).
    pub fn close_exit_fds(&self) {
        for fd in self
            .exit_fds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            // SAFETY: `fd` is an eventfd this backend created in
            // `exit_event` and gave up with `into_raw_fd()` inside
            // vhost-user-backend, which never closes it; the handler whose
            // epoll held it is gone, so nothing uses or closes it else.
            unsafe { libc::close(fd) };
        }
    }

    /// The event of a worker's coalescing timer.
    pub fn coalesce_event(&self) -> u16 {
        self.event_id(Ev::Coalesce)
    }

    /// The event that tells a worker frames wait in its RX backlog.
    pub fn backlog_event(&self) -> u16 {
        self.event_id(Ev::Backlog)
    }

    /// Whether thread `i` (a worker, or `pairs` for the control queue)
    /// has work left over for its resume event; reading clears it.
    pub fn take_resume(&self, i: usize) -> bool {
        if let Some(set) = self.resume_set.get(i) {
            set.store(false, Ordering::Relaxed);
        }
        self.resume.get(i).is_some_and(|e| e.read().is_ok())
    }

    /// Marks direction `what` ([`LEFT_TX`], [`LEFT_RX`]) of worker `i` as
    /// stopped at its budget, and asks the worker to come back for it.
    fn left_over(&self, i: usize, what: u8) {
        if let Some(l) = self.left.get(i) {
            l.fetch_or(what, Ordering::Relaxed);
        }
        self.resume_later(i);
    }

    /// Asks thread `i` to come back after its other events (its resume
    /// event is written unless it is readable already).
    fn resume_later(&self, i: usize) {
        if let (Some(e), Some(set)) = (self.resume.get(i), self.resume_set.get(i)) {
            if !set.swap(true, Ordering::Relaxed) {
                let _ = e.write(1);
            }
        }
    }

    fn acked(&self) -> Features {
        Features::from_bits_retain(self.acked.load(Ordering::Acquire))
    }

    /// Registers each worker's uplink queue and backlog with its epoll
    /// loop. Called once per daemon, before it starts serving.
    pub fn register_listeners(
        &self,
        handlers: &[Arc<VringEpollHandler<Arc<VnicBackend>>>],
    ) -> io::Result<()> {
        for (t, h) in handlers.iter().enumerate() {
            if t >= self.threads {
                // The control thread: its resume event and the TOE's timer.
                if let Some(e) = self.resume.get(self.pairs()) {
                    h.register_listener(
                        e.as_raw_fd(),
                        EventSet::IN,
                        u64::from(self.event_id(Ev::Resume)),
                    )?;
                }
                let fd = self
                    .toe_timer
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .as_raw_fd();
                h.register_listener(fd, EventSet::IN, u64::from(self.event_id(Ev::Timer)))?;
                continue;
            }
            let mut slot = 0;
            while let Some(i) = self.pair_of(t, slot) {
                let id = |e: Ev| u64::from(self.slot_event(slot, e));
                if let Some(e) = self.resume.get(i) {
                    h.register_listener(e.as_raw_fd(), EventSet::IN, id(Ev::Resume))?;
                }
                if let Some(t) = self.timers.get(i) {
                    let fd = t.lock().unwrap_or_else(PoisonError::into_inner).as_raw_fd();
                    h.register_listener(fd, EventSet::IN, id(Ev::Timer))?;
                }
                if let Some(t) = self.coal_timers.get(i) {
                    let fd = t
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .fd
                        .as_raw_fd();
                    h.register_listener(fd, EventSet::IN, id(Ev::Coalesce))?;
                }
                // The PF's workers read the uplink; frames for other ports
                // go through the switch into their backlogs.
                let uplink_fd = (self.port == 0)
                    .then(|| self.nic.uplink().rx_fd(i))
                    .flatten();
                if let Some(fd) = uplink_fd {
                    h.register_listener(
                        fd,
                        EventSet::IN | EventSet::EDGE_TRIGGERED,
                        id(Ev::Uplink),
                    )?;
                }
                if let Some(b) = self.dev().backlogs.get(i) {
                    h.register_listener(b.event.as_raw_fd(), EventSet::IN, id(Ev::Backlog))?;
                    // Wake every pair once, before any frontend connects,
                    // so that each records its vrings: steering then
                    // always sees which RX queues the frontend has enabled.
                    b.event.write(1)?;
                }
                slot += 1;
            }
        }
        Ok(())
    }

    fn config(&self) -> VirtioNetConfig {
        let view = self.nic.switch.view();
        let up = view
            .ports
            .get(self.port)
            .is_some_and(|pv| pv.link_up(view.uplink_up));
        let st = self.dev().ctrl_state();
        let mut status = if up { STATUS_LINK_UP } else { 0 };
        if st.announce {
            status |= STATUS_ANNOUNCE;
        }
        VirtioNetConfig {
            mac: st.mac,
            status,
            max_virtqueue_pairs: self.dev().config.pairs,
            mtu: self.dev().config.mtu,
            speed: 100_000,
            duplex: DUPLEX_FULL,
            rss_max_key_size: RSS_MAX_KEY,
            rss_max_indirection_table_length: RSS_MAX_TABLE,
            supported_hash_types: SUPPORTED_HASH_TYPES.bits(),
        }
    }

    /// Answers the commands on the control queue, at most
    /// [`CTRL_BUDGET`] per call; with more waiting, the thread's resume
    /// event brings it back after its other events.
    fn process_ctrl(&self, vring: &VringRwLock) -> io::Result<()> {
        let mem = self.memory();
        let acked = self.acked();
        self.serve_requests(2 * self.pairs(), vring, &mem, CTRL_BUDGET, |r, w| {
            self.answer_ctrl(&mem, acked, r, w)
        })
    }

    /// Serves a queue of requests (the control queue, the TOE's command
    /// queue), at most `budget` per call, then the control thread's resume
    /// event brings it back: each chain's device-readable bytes and
    /// writable buffers go to `answer`, which returns the bytes it wrote;
    /// a bad chain is counted and returned empty; a stuck ring is counted
    /// and left. Notifies the driver when anything was used.
    fn serve_requests(
        &self,
        vq: usize,
        vring: &VringRwLock,
        mem: &vm_memory::GuestMemoryLoadGuard<GuestMemoryMmap>,
        budget: usize,
        mut answer: impl FnMut(&[u8], &[(GuestAddress, usize)]) -> u32,
    ) -> io::Result<()> {
        let stats = &self.dev().stats.ctrl;
        if self.acked().contains(Features::RING_PACKED) {
            let sink = self.packed_moved.get(vq);
            let (moved, full) = serve_packed(vring, mem, stats, sink, budget, |r| {
                Some(match r {
                    Ok((readable, writable)) => answer(readable, writable),
                    Err(why) => {
                        stats.drop(why);
                        0
                    }
                })
            })?;
            if full {
                self.resume_later(self.pairs());
            }
            if moved > 0 {
                self.notify(vq, vring, mem, stats)?;
            }
            return Ok(());
        }
        let mut readable = Vec::new();
        let mut writable = Vec::new();
        let mut moved = 0;
        let mut empty = 0;
        loop {
            let round = moved;
            vring.disable_notification().map_err(io::Error::other)?;
            while moved < budget {
                let Some(chain) = pop_chain(vring, mem, stats) else {
                    break;
                };
                let head = chain.head_index();
                moved += 1;
                let used = match split_chain(mem, chain, &mut readable, &mut writable) {
                    Ok(()) => answer(&readable, &writable),
                    Err(why) => {
                        stats.drop(why);
                        0
                    }
                };
                vring.add_used(head, used).map_err(io::Error::other)?;
            }
            if moved >= budget {
                self.resume_later(self.pairs());
                break;
            }
            if !vring.enable_notification().map_err(io::Error::other)? {
                break;
            }
            if stuck(vring, mem, moved == round, &mut empty) {
                stats.drop(DropReason::BadRing);
                break;
            }
        }
        if moved > 0 {
            self.notify(vq, vring, mem, stats)?;
        }
        Ok(())
    }

    /// Applies one command and writes the ack, then the answer, into the
    /// chain's writable buffers (virtio 1.3, 5.1.6.5: `u8 ack;` comes
    /// before `command-specific-result`). Returns the bytes written.
    fn answer_ctrl(
        &self,
        mem: &GuestMemoryMmap,
        acked: Features,
        readable: &[u8],
        writable: &[(GuestAddress, usize)],
    ) -> u32 {
        let stats = &self.dev().stats.ctrl;
        let room: usize = writable.iter().map(|w| w.1).sum();
        if room == 0 {
            // Nowhere to put the ack: the command is not even looked at.
            stats.drop(DropReason::BadControl);
            return 0;
        }
        let mut out = [0u8; 1 + CTRL_MAX_ANSWER];
        let mut n = 1;
        out[0] = match CtrlCommand::parse_message(readable) {
            Ok(cmd) => match self.nic.control(self.port, &cmd, acked).inspect(|_| {
                if matches!(
                    cmd,
                    CtrlCommand::CoalTxSet(_)
                        | CtrlCommand::CoalRxSet(_)
                        | CtrlCommand::CoalVqSet { .. }
                ) {
                    // What is held may be due under the new values.
                    self.recheck_coalescing();
                }
            }) {
                Ok(answer) if answer.len() <= CTRL_MAX_ANSWER && answer.len() < room => {
                    out[1..1 + answer.len()].copy_from_slice(&answer);
                    n += answer.len();
                    ACK_OK
                }
                Ok(answer) => {
                    log::info!(
                        "control command {cmd:?}: no room for its {}-byte answer",
                        answer.len()
                    );
                    stats.drop(DropReason::BadControl);
                    ACK_ERR
                }
                Err(why) => {
                    log::info!("control command {cmd:?} refused: {}", why.0);
                    ACK_ERR
                }
            },
            Err(e) => {
                log::info!("control command does not parse: {e}");
                stats.drop(DropReason::BadControl);
                ACK_ERR
            }
        };
        match write_span(&mut Regions::new(mem), writable, 0, &out[..n]) {
            Ok(()) => {
                stats.packet(readable.len());
                n as u32
            }
            Err(why) => {
                stats.drop(why);
                0
            }
        }
    }

    /// Sends the frames on TX queue `i`, at most [`BUDGET`] per call; with
    /// more waiting, the worker's resume event brings it back after its
    /// other events (RX, the uplink), so a guest that keeps its TX ring
    /// full cannot starve its own receive path. While it works, the
    /// driver is asked not to notify (VRING_USED_F_NO_NOTIFY, or a stale
    /// avail_event with EVENT_IDX); notifications are re-armed only when
    /// the ring is empty.
    fn process_tx(&self, i: usize, vring: &VringRwLock) -> io::Result<()> {
        let mem = self.memory();
        let mut w = self.workers[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Worker {
            tx,
            rest,
            tail,
            scratch,
            view,
            ..
        } = &mut *w;
        self.nic.switch.refresh(view);
        let view: &View = view;
        let stats = &self.dev().stats.tx[i];
        // The driver's header on transmit has the negotiated size: 20
        // bytes with HASH_REPORT, 12 otherwise.
        let hdr_len = self.acked().hdr_len();
        // Whether a rate limit or link share may hold the port's frames
        // back: asked per chain only then (it changes with the view).
        let paced = self.nic.paced(self.port, view);
        // A port alone on the switch sends the frames the uplink takes as
        // they are straight to it.
        let lone = self.nic.lone(self.port, i, view);
        let packed = self.acked().contains(Features::RING_PACKED);
        let poll = Duration::from_micros(u64::from(self.dev().config.poll_us));
        let mut moved = 0;
        let mut empty = 0;
        let mut limited = false;
        let mut broken = false;
        loop {
            let round = moved;
            kicks(vring, &mem, packed, false)?;
            // The vring's lock, once for the batch rather than twice a
            // chain; guest memory as a plain reference, not a guard to
            // clone per chain.
            let mut guard = vring.get_mut();
            let q = guard.get_queue_mut();
            let gm: &GuestMemoryMmap = &mem;
            let mut regions = Regions::new(gm);
            // One chain: gathered, checked and sent (or counted).
            // (Gathered where the chain is walked, so that each kind of
            // walk is compiled into `gather_tx`, not called through a
            // vtable per descriptor.)
            let send_chain = |regions: &mut Regions<'_>,
                              scratch: &mut TxScratch,
                              gathered: Result<usize, DropReason>,
                              tx: &[u8],
                              rest: &[(GuestAddress, usize)],
                              tail: &[u8]| {
                match gathered {
                    Ok(n) if n < hdr_len => stats.drop(DropReason::ZeroLength),
                    Ok(n) => {
                        let send = |pieces: Option<&[Piece<'_>]>| match pieces {
                            Some(p) => {
                                let (h, prefix) = (&tx[..hdr_len], &tx[hdr_len..n]);
                                // (A frame without pieces was offered to the
                                // lone way where it was gathered.)
                                let done = lone.as_ref().filter(|_| !p.is_empty()).and_then(|l| {
                                    self.nic
                                        .transmit_lone(l, &tx[..n], hdr_len, p, scratch, stats)
                                });
                                if done.is_some() {
                                    return;
                                }
                                let _ = self
                                    .nic
                                    .transmit_pieces(self.port, i, h, prefix, p, scratch, view);
                            }
                            None => stats.drop(DropReason::BadDescriptor),
                        };
                        // A short frame has its bytes in the prefix and
                        // needs a short list of pieces; only a long chain
                        // pays for the long one.
                        if rest.len() < SHORT_PIECES {
                            with_pieces::<SHORT_PIECES>(regions, rest, tail, send);
                        } else {
                            with_pieces::<MAX_PIECES>(regions, rest, tail, send);
                        }
                    }
                    Err(why) => stats.drop(why),
                }
                if scratch.wakes.due() {
                    self.nic.wake(&mut scratch.wakes);
                }
            };
            // A lone port's frame all in the prefix (most small ones) goes
            // straight to the uplink where it was gathered, past
            // `send_chain`; true when it went.
            let offer_lone = |scratch: &mut TxScratch,
                              gathered: &Result<usize, DropReason>,
                              tx: &[u8],
                              rest: &[(GuestAddress, usize)],
                              tail: &[u8]| {
                match (gathered, lone.as_ref()) {
                    (Ok(n), Some(l)) if *n >= hdr_len && rest.is_empty() && tail.is_empty() => self
                        .nic
                        .transmit_lone(l, &tx[..*n], hdr_len, &[], scratch, stats)
                        .is_some(),
                    _ => false,
                }
            };
            // Rings resolved to host memory are taken a batch at a time:
            // the available index read once per BATCH chains (again
            // only when those are used up), their buffers prefetched, one
            // used index store at the end. Rings that cannot be resolved
            // (misaligned, or across guest regions) go through
            // virtio-queue's own walk, with the same checks.
            let mut fast = if packed { None } else { SplitRing::new(q, gm) };
            // A packed ring has no other way: one that cannot be resolved
            // (misaligned, outside guest memory) is counted and left.
            let mut pring = if packed && q.ready() {
                let r = PackedRing::from_queue(q, gm);
                if r.is_none() {
                    stats.drop(DropReason::BadRing);
                    broken = true;
                }
                r
            } else {
                None
            };
            let mut left = 0;
            let mut unwritable = false;
            while moved < BUDGET {
                if let Some(ring) = fast.as_mut().filter(|_| left == 0) {
                    // The batch before is handed back first, so that the
                    // driver can refill its ring while this one is taken
                    // (holding a whole ring's worth until the end had the
                    // two sides take turns waiting for each other).
                    if ring.publish().is_none() {
                        unwritable = true;
                        break;
                    }
                    // None: the index ran more than a queue ahead; nothing
                    // is taken, and `stuck` counts it.
                    left = ring.pending().unwrap_or(0).min(BATCH);
                    if left == 0 {
                        break;
                    }
                    ring.prefetch(left, &mut regions);
                }
                if let Some(wait) = paced.then(|| self.nic.tx_wait(self.port, view)).flatten() {
                    // Over the port's rate: the chains wait in the ring
                    // and the timer brings the worker back.
                    self.arm_timer(i, wait);
                    limited = true;
                    break;
                }
                if let Some(ring) = pring.as_mut() {
                    ring.prefetch_ahead(&mut regions, false);
                    let a = match pop_packed(ring, stats) {
                        Ok(Some(a)) => a,
                        Ok(None) => break,
                        Err(()) => {
                            broken = true;
                            break;
                        }
                    };
                    let g = match a.single() {
                        Some(d) => gather_one(&mut regions, d, hdr_len, tx, rest, tail),
                        None => {
                            gather_tx(&mut regions, ring.chain(&a, gm), hdr_len, tx, rest, tail)
                        }
                    };
                    if !offer_lone(scratch, &g, tx, rest, tail) {
                        send_chain(&mut regions, scratch, g, tx, rest, tail);
                    }
                    // Handed back a batch at a time, as the split ring's.
                    let published = moved % usize::from(BATCH) != usize::from(BATCH) - 1
                        || ring.publish().is_some();
                    if ring.put_used(a.id, 0, a.count).is_none() || !published {
                        unwritable = true;
                        break;
                    }
                    moved += 1;
                    continue;
                }
                let used = match fast.as_mut() {
                    Some(ring) => {
                        left -= 1;
                        let Some(head) = ring.pop() else {
                            break;
                        };
                        if head >= ring.size() {
                            // No such descriptor, and no used entry for it.
                            stats.drop(DropReason::BadRing);
                            continue;
                        }
                        // A chain of one descriptor (most small frames)
                        // needs no walk.
                        let g = match ring.single(head) {
                            Some(d) => gather_one(&mut regions, d, hdr_len, tx, rest, tail),
                            None => gather_tx(
                                &mut regions,
                                ring.chain(head, gm),
                                hdr_len,
                                tx,
                                rest,
                                tail,
                            ),
                        };
                        if !offer_lone(scratch, &g, tx, rest, tail) {
                            send_chain(&mut regions, scratch, g, tx, rest, tail);
                        }
                        ring.put_used(head, 0).is_some()
                    }
                    // (A packed ring that could not be resolved has no
                    // other way: virtio-queue would read it as split.)
                    None if !q.ready() || packed => break,
                    None => {
                        let Some(mut chain) = pop_valid(q, gm, stats) else {
                            break;
                        };
                        let head = chain.head_index();
                        let g = gather_tx(&mut regions, &mut chain, hdr_len, tx, rest, tail);
                        if !offer_lone(scratch, &g, tx, rest, tail) {
                            send_chain(&mut regions, scratch, g, tx, rest, tail);
                        }
                        q.add_used(gm, head, 0).is_ok()
                    }
                };
                if !used {
                    unwritable = true;
                    break;
                }
                moved += 1;
            }
            let finished = match (fast, pring) {
                (Some(ring), _) => ring.finish(q),
                (None, Some(ring)) => {
                    // Counted under the vring's lock, as the notification
                    // decision reads it.
                    self.packed_used(2 * i + 1, ring.used_moved());
                    ring.finish(q)
                }
                (None, None) => Some(()),
            };
            if unwritable || finished.is_none() {
                return Err(io::Error::other("used ring not writable"));
            }
            drop(guard);
            if limited || broken {
                break;
            }
            if moved >= BUDGET {
                self.left_over(i, LEFT_TX);
                break;
            }
            // A round that took chains looks for more a while (`--poll-us`)
            // before the driver is asked to kick again: a sender that
            // keeps the ring busy then costs neither side a kick and a
            // wake-up per burst.
            if moved > round {
                let (found, spent) = poll_for_more(vring, &mem, packed, poll);
                if !spent.is_zero() {
                    let ns = u64::try_from(spent.as_nanos()).unwrap_or(u64::MAX);
                    stats.poll_ns.fetch_add(ns, Ordering::Relaxed);
                }
                if found {
                    stats.polled.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            }
            if !kicks(vring, &mem, packed, true)? {
                break;
            }
            // (A packed ring says what waits by the flags pop reads: it
            // cannot run ahead of what is taken.)
            if !packed && stuck(vring, &mem, moved == round, &mut empty) {
                stats.drop(DropReason::BadRing);
                break;
            }
        }
        // Other ports' workers learn of their frames once per batch, and
        // the queue's counters of what it sent.
        self.nic.wake(&mut scratch.wakes);
        scratch.settle(stats);
        if moved > 0 {
            self.signal(2 * i + 1, moved as u32, vring, &mem, stats, Room::Plenty)?;
        }
        Ok(())
    }

    /// Goes on with the directions `left` of pair `i` that stopped at
    /// their budget (an RX queue the frontend turned off meanwhile has its
    /// frames passed on, as its backlog event would).
    fn resume_pair(
        &self,
        i: usize,
        left: u8,
        rx: &VringRwLock,
        tx: &VringRwLock,
    ) -> io::Result<()> {
        if left & LEFT_TX != 0 && live(tx) {
            self.process_tx(i, tx)?;
        }
        if left & LEFT_RX != 0 {
            if live(rx) {
                self.process_rx(i, rx)?;
            } else {
                self.forward_uplink(i);
            }
        }
        Ok(())
    }

    /// Brings worker `i` back in `ns` nanoseconds (its TX rate limit).
    fn arm_timer(&self, i: usize, ns: u64) {
        if let Some(t) = self.timers.get(i) {
            let mut t = t.lock().unwrap_or_else(PoisonError::into_inner);
            if let Err(e) = t.reset(std::time::Duration::from_nanos(ns.max(1000)), None) {
                log::warn!("worker {i}: rate timer: {e}");
                self.left_over(i, LEFT_TX);
            }
        }
    }

    /// `n` more buffers of virtqueue `vq` are in its used ring: signals the
    /// driver now, or holds the notification as the queue's coalescing
    /// says and arms the worker's timer for it. `room`: how the driver's
    /// RX buffers stand; out of them, the device cannot go on until the
    /// driver posts more, so nothing is held, and an adaptive queue holds
    /// nothing once fewer than a quarter of the ring is left (the
    /// occupancy half of its choice, as VMware's vIC weighs it).
    fn signal(
        &self,
        vq: usize,
        n: u32,
        vring: &VringRwLock,
        mem: &GuestMemoryMmap,
        stats: &QueueStats,
        room: Room,
    ) -> io::Result<()> {
        let Some(mut c) = self.dev().coalescer(vq) else {
            return self.notify(vq, vring, mem, stats);
        };
        let now = self.nic.now();
        let urgent = match room {
            Room::Plenty => false,
            Room::Low => c.adaptive,
            Room::None => true,
        };
        let verdict = match c.used(n, now) {
            Verdict::Hold { .. } if urgent => Verdict::Notify,
            v => v,
        };
        match verdict {
            Verdict::Idle => Ok(()),
            Verdict::Notify => {
                let why = c.reason(now);
                let max_ns = u64::from(c.in_force().max_usecs) * 1000;
                stats.flushed(why, c.notified(now), max_ns);
                // Under the queue's lock, so that a buffer used meanwhile
                // by another thread is either in this notification or
                // held for the next.
                self.notify(vq, vring, mem, stats)
            }
            Verdict::Hold { deadline } => {
                drop(c);
                if n > 0 {
                    stats.held.fetch_add(1, Ordering::Relaxed);
                }
                self.arm_coalescing(vq / 2, deadline, now);
                Ok(())
            }
        }
    }

    /// Brings worker `i` back at `deadline` (NIC clock) to send a held
    /// notification, unless it is due back sooner already.
    fn arm_coalescing(&self, i: usize, deadline: u64, now: u64) {
        let Some(t) = self.coal_timers.get(i) else {
            return;
        };
        let mut t = t.lock().unwrap_or_else(PoisonError::into_inner);
        if t.armed.is_some_and(|a| a <= deadline) {
            return;
        }
        let wait = deadline.saturating_sub(now).max(1000);
        match t.fd.reset(std::time::Duration::from_nanos(wait), None) {
            Ok(()) => t.armed = Some(deadline),
            Err(e) => {
                log::warn!("worker {i}: coalescing timer: {e}");
                t.armed = None;
            }
        }
    }

    /// Has every worker look at its held notifications now: coalescing
    /// parameters changed, and what is held may be due.
    fn recheck_coalescing(&self) {
        let now = self.nic.now();
        for i in 0..self.coal_timers.len() {
            self.arm_coalescing(i, now, now);
        }
    }

    /// Worker `i`'s coalescing timer fired: sends what is due of its RX
    /// and TX queues' held notifications, and arms the timer again for
    /// what is not.
    fn coalescing_due(&self, i: usize, rx: &VringRwLock, tx: &VringRwLock) -> io::Result<()> {
        if let Some(t) = self.coal_timers.get(i) {
            let mut t = t.lock().unwrap_or_else(PoisonError::into_inner);
            t.armed = None;
            // Expired: reading clears it (it may already be; the fd does
            // not block).
            let _ = t.fd.wait();
        }
        let mem = self.memory();
        let stats = &self.dev().stats;
        if live(rx) && !self.rsc_idle(i) {
            // Segment coalescing holds flows: their time may be up.
            self.process_rx(i, rx)?;
        }
        for (k, vring, s) in [(0, rx, &stats.rx[i]), (1, tx, &stats.tx[i])] {
            if live(vring) {
                self.signal(2 * i + k, 0, vring, &mem, s, Room::Plenty)?;
            }
        }
        Ok(())
    }

    /// Signals the driver of used buffers unless it asked not to be: with
    /// EVENT_IDX through `used_event` (virtio-queue checks it), without it
    /// through VRING_AVAIL_F_NO_INTERRUPT in the available ring's flags,
    /// which virtio-queue does not look at; for a packed ring through its
    /// driver area ([`VnicBackend::packed_wants`]).
    fn notify(
        &self,
        vq: usize,
        vring: &VringRwLock,
        mem: &GuestMemoryMmap,
        stats: &QueueStats,
    ) -> io::Result<()> {
        let wanted = if self.acked().contains(Features::RING_PACKED) {
            self.packed_wants(vq, vring, mem)
        } else {
            let st = vring.get_ref();
            let q = st.get_queue();
            let suppressed = !q.event_idx_enabled()
                && mem
                    .load::<u16>(GuestAddress(q.avail_ring()), Ordering::Acquire)
                    .is_ok_and(|f| u16::from_le(f) & AVAIL_F_NO_INTERRUPT != 0);
            drop(st);
            self.event_idx_wants(vq, vring, mem) && !suppressed
        };
        if wanted {
            vring.signal_used_queue()?;
        }
        stats.notified(wanted);
        Ok(())
    }

    /// Whether the driver of packed virtqueue `vq` wants a notification:
    /// its driver area decides (`packed::driver_wants`), over the entries
    /// used since the last decision, from where used stood then (between
    /// rounds, at the queue's base).
    fn packed_wants(&self, vq: usize, vring: &VringRwLock, mem: &GuestMemoryMmap) -> bool {
        // Under the vring's lock: a round adds what it used under it too,
        // so the count and the position agree.
        let st = vring.get_ref();
        let q = st.get_queue();
        let size = q.size();
        let base = q.next_avail();
        let old = self
            .signalled
            .get(vq)
            .map_or(NOT_YET, |s| s.swap(u32::from(base), Ordering::AcqRel));
        let moved = self
            .packed_moved
            .get(vq)
            .map_or(u32::MAX, |m| m.swap(0, Ordering::AcqRel));
        let at = |b: u16| Position::from_base(b, size).map(|p| (p.used, p.used_wrap));
        // No decision before (or a ring set up anew): what the driver area
        // says, as if every descriptor was passed.
        let (old, moved) = u16::try_from(old)
            .ok()
            .and_then(at)
            .map_or((Position::START_USED, u32::MAX), |o| (o, moved));
        match vm_memory::GuestMemoryBackend::get_slice(mem, GuestAddress(q.avail_ring()), 4) {
            Ok(driver) => packed::driver_wants(&driver, size, old, moved, q.event_idx_enabled()),
            Err(_) => true,
        }
    }

    /// Adds `n` ring entries used on packed virtqueue `vq`, for its next
    /// notification decision ([`VnicBackend::packed_wants`]).
    pub(super) fn packed_used(&self, vq: usize, n: u32) {
        if let Some(m) = self.packed_moved.get(vq) {
            m.fetch_add(n, Ordering::AcqRel);
        }
    }

    /// Whether, with EVENT_IDX, the driver's `used_event` lies among the
    /// used entries added since the last decision on virtqueue `vq`
    /// (virtio 1.3, 2.7.10; the device's own bookkeeping, since receive
    /// publishes a frame's buffers with one index store rather than
    /// through virtio-queue's `add_used`). Without EVENT_IDX, true. When
    /// the ring cannot be read, or its index moved by more than half its
    /// range (set up anew), true: a notification too many, never one too
    /// few.
    fn event_idx_wants(&self, vq: usize, vring: &VringRwLock, mem: &GuestMemoryMmap) -> bool {
        let st = vring.get_ref();
        let q = st.get_queue();
        if !q.event_idx_enabled() {
            return true;
        }
        // The used entries before the driver's used_event.
        std::sync::atomic::fence(Ordering::SeqCst);
        let used = q.next_used();
        let old = self
            .signalled
            .get(vq)
            .map_or(NOT_YET, |s| s.swap(u32::from(used), Ordering::AcqRel));
        let event = q
            .avail_ring()
            .checked_add(4 + 2 * u64::from(q.size()))
            .and_then(|a| mem.load::<u16>(GuestAddress(a), Ordering::Acquire).ok())
            .map(u16::from_le);
        let (Some(event), Ok(old)) = (event, u16::try_from(old)) else {
            return true;
        };
        // More than half the index space apart: not a count of entries
        // added (the ring was set up anew).
        let since = used.wrapping_sub(old);
        since >= 0x8000 || used.wrapping_sub(event).wrapping_sub(1) < since
    }

    /// The largest frame the uplink may hand over, given what the driver
    /// accepted: 64 KiB GSO frames with receive offloads, else the MTU.
    fn max_rx_frame(&self, acked: Features) -> usize {
        let gso = Features::GUEST_TSO4
            | Features::GUEST_TSO6
            | Features::GUEST_USO4
            | Features::GUEST_USO6
            | Features::GUEST_UFO;
        if acked.contains(Features::GUEST_CSUM) && acked.intersects(gso) {
            MAX_TAP_FRAME
        } else {
            usize::from(self.dev().config.mtu) + 14 + 8
        }
    }

    /// Moves frames from the backlog and (on the PF) the uplink into RX
    /// queue `i`.
    ///
    /// Frames are read from the uplink straight into the guest's buffers;
    /// one that RSS sends to another queue is copied into that queue's
    /// backlog, and one for another port goes through the switch. When
    /// too few buffers are posted, frames are read into vnicd's own
    /// buffer and wait in the backlog.
    fn process_rx(&self, i: usize, vring: &VringRwLock) -> io::Result<()> {
        let mem = self.memory();
        let acked = self.acked();
        let stats = &self.dev().stats.rx[i];
        let mut writer =
            RxWriter::new(&mem, vring, stats, acked).counting(self.packed_moved.get(2 * i));
        self.enabled_queues();
        let max_frame = self.max_rx_frame(acked);
        let small = usize::from(self.dev().config.mtu) + 14 + 8;
        let packed = acked.contains(Features::RING_PACKED);
        let mut moved = 0;
        let mut starved;
        loop {
            // While frames move, the driver need not kick when it posts
            // buffers: the uplink wakes the worker.
            kicks(vring, &mem, packed, false)?;
            let seen = if packed { 0 } else { avail_idx(vring, &mem) };
            let round = if self.dev().rsc_active() || !self.rsc_idle(i) {
                self.rx_round_rsc(i, &mut writer, &mut moved)
            } else {
                self.rx_round(i, &mut writer, max_frame, small, &mut moved)
            };
            // The vring's lock is let go of before anything else takes it.
            writer.release();
            starved = round?;
            if moved >= BUDGET {
                // More may be waiting; come back after other events.
                self.left_over(i, LEFT_RX);
                break;
            }
            // Out of buffers with frames waiting: ask the driver to kick
            // when it posts more, unless it already did meanwhile.
            if !starved {
                break;
            }
            let more = if packed {
                // Kicks on, then whether the driver posted past where a
                // frame found no buffer (a broken ring has no such place:
                // it waits for a kick).
                let edge = writer.take_edge();
                kicks(vring, &mem, true, true)?;
                let st = vring.get_ref();
                match (edge, PackedRing::from_queue(st.get_queue(), &mem)) {
                    (Some(e), Some(r)) => r.avail_at(e),
                    _ => false,
                }
            } else {
                want_buffers(vring, &mem, seen)?
            };
            if !more {
                break;
            }
        }
        // What the TOE took in this batch: its ACKs, one event per
        // connection and one notification for them all.
        self.toe_settle_batch();
        let used = writer.used;
        if moved > 0 || used > 0 {
            let room = if starved {
                Room::None
            } else {
                rx_room(vring, &mem, packed)
            };
            self.signal(2 * i, used, vring, &mem, stats, room)?;
        }
        Ok(())
    }

    /// One round of [`VnicBackend::process_rx`]: the backlog first, then
    /// the uplink, up to the budget. Returns whether it stopped because
    /// the driver had too few buffers posted.
    fn rx_round(
        &self,
        i: usize,
        writer: &mut RxWriter<'_>,
        max_frame: usize,
        small: usize,
        moved: &mut usize,
    ) -> io::Result<bool> {
        let mut w = self.workers[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.nic.switch.refresh(&mut w.view);
        let r = self.rx_round_locked(i, &mut w, writer, max_frame, small, moved);
        writer.release();
        // Ports the uplink's frames went to learn of them once per round.
        self.nic.wake(&mut w.scratch.wakes);
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn rx_round_locked(
        &self,
        i: usize,
        w: &mut Worker,
        writer: &mut RxWriter<'_>,
        max_frame: usize,
        small: usize,
        moved: &mut usize,
    ) -> io::Result<bool> {
        let stats = &self.dev().stats.rx[i];
        let backlog = &self.dev().backlogs[i];
        let view = w.view.clone();
        let Some(me) = view.ports.get(self.port) else {
            return Ok(false);
        };
        let mut starved = false;
        let toe = self.toe_on();
        // Frames already waiting here go first, in order (through the
        // queue's TOE engine first while the driver runs the TOE).
        while *moved < BUDGET {
            // The TOE is offered the frame with the backlog's lock let go
            // of: an engine's lock is held by threads that push into
            // backlogs (its frames to other ports).
            let took = if toe {
                backlog.deliver_front_unlocked(&mut w.rx, |f| {
                    self.toe_then(i, f, stats, |f| put_frame(writer, me, f, stats))
                })
            } else {
                backlog.deliver_front(|f| put_frame(writer, me, f, stats))
            };
            match took {
                Some(true) => *moved += 1,
                Some(false) => {
                    starved = true;
                    break;
                }
                None => break,
            }
        }
        // Only the PF's workers read the uplink. A PF without buffers
        // waits for its driver, but with VFs behind the switch it goes on
        // reading, so their frames keep flowing; its own frames wait in
        // its backlog, or are dropped and counted when that is full.
        let multi = view.ports.len() > 1;
        if self.port != 0 || (starved && !multi) {
            return Ok(starved);
        }
        // Frames delivered, counted once for the round.
        let mut tally = Tally::new(stats);
        while *moved < BUDGET {
            if w.scratch.wakes.due() {
                writer.release();
                self.nic.wake(&mut w.scratch.wakes);
            }
            if starved {
                writer.release();
                if self.read_into_backlog(i, w).is_none() {
                    return Ok(true);
                }
                *moved += 1;
                continue;
            }
            if toe {
                // The TOE sees each uplink frame first, so frames are read
                // into the worker's buffer rather than the driver's. A
                // frame RSS sends to another queue is that queue's
                // engine's to see.
                writer.release();
                let Worker {
                    rx, view, scratch, ..
                } = &mut *w;
                match self.read_uplink(i, rx, view, scratch, true) {
                    Uplinked::Empty => return Ok(false),
                    Uplinked::Dropped => {}
                    Uplinked::Frame { len, steered } => {
                        let port = self.dev();
                        let target = port.rx_queue(steered, i);
                        if target != i {
                            port.hand_over(target, &w.rx[..len]);
                        } else if !put_frame(writer, me, &w.rx[..len], stats) {
                            // No buffers: it waits in the backlog.
                            writer.release();
                            port.hand_over(i, &w.rx[..len]);
                            *moved += 1;
                            if !multi {
                                return Ok(true);
                            }
                            starved = true;
                            continue;
                        }
                    }
                }
                *moved += 1;
                continue;
            }
            // Provision for 64 KiB only while big frames are coming.
            let expect = if w.rx_big {
                max_frame
            } else {
                max_frame.min(small)
            };
            let Worker {
                rx, rx_out, view, ..
            } = &mut *w;
            let direct =
                writer.receive_direct(&self.nic, view, i, i, expect, rx, rx_out, BUDGET - *moved);
            // Frames it delivered before the one it reports on.
            let (more, bytes) = writer.take_burst();
            tally.add_many(more, bytes);
            *moved += more;
            let direct = direct?;
            if !matches!(direct, Direct::Delivered(_) | Direct::Dropped(_)) {
                // The switch, a hand-over or a read into the backlog may
                // come to this very ring (its own port's frames).
                writer.release();
            }
            match direct {
                Direct::Delivered(n) => {
                    w.rx_big = n > small;
                    tally.add(n);
                }
                Direct::Empty => return Ok(false),
                Direct::Failed => {
                    stats.drop(DropReason::UplinkError);
                    return Ok(false);
                }
                Direct::Dropped(why) => {
                    // Its buffers may have gone back empty: the driver is
                    // owed a notification for them.
                    writer.used += 1;
                    stats.drop(why);
                }
                Direct::Switched => {
                    w.rx_big = w.rx_out.len() > small + VNET_HDR_LEN;
                    let Worker {
                        rx_out,
                        view,
                        scratch,
                        ..
                    } = &mut *w;
                    self.nic.from_uplink(rx_out, view, stats, scratch);
                }
                Direct::Elsewhere(target) => {
                    w.rx_big = w.rx_out.len() > small + VNET_HDR_LEN;
                    self.dev().hand_over(target, &w.rx_out);
                    if target == i {
                        // Too few buffers for it: wait for the driver.
                        *moved += 1;
                        if !multi {
                            return Ok(true);
                        }
                        starved = true;
                        continue;
                    }
                }
                Direct::NoBuffers => {
                    // Read into our own buffer so the frame is not lost,
                    // and keep it until the driver posts buffers.
                    match self.read_into_backlog(i, w) {
                        None => return Ok(false),
                        Some(Some(target)) if target == i => {
                            *moved += 1;
                            if !multi {
                                return Ok(true);
                            }
                            starved = true;
                            continue;
                        }
                        Some(_) => {}
                    }
                }
            }
            *moved += 1;
        }
        Ok(starved)
    }

    /// Whether worker `i`'s segment coalescing holds nothing.
    fn rsc_idle(&self, i: usize) -> bool {
        self.workers.get(i).is_none_or(|w| {
            w.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .rsc
                .is_idle()
        })
    }

    /// One round of [`VnicBackend::process_rx`] with receive segment
    /// coalescing: frames from the backlog, then (on the PF) the uplink,
    /// go through the queue's GRO, and what leaves it is copied into the
    /// driver's buffers. Held flows leave at the end of the round, or,
    /// when the queue's coalescing has a time, once that time has passed
    /// since the oldest held segment (the worker's coalescing timer brings
    /// it back). Returns whether it stopped for want of buffers.
    fn rx_round_rsc(
        &self,
        i: usize,
        writer: &mut RxWriter<'_>,
        moved: &mut usize,
    ) -> io::Result<bool> {
        let port = self.dev();
        let stats = &port.stats.rx[i];
        let backlog = &port.backlogs[i];
        let active = port.rsc_active();
        let usecs = port.coalescer(2 * i).map_or(0, |c| c.in_force().max_usecs);
        let mut w = self.workers[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.nic.switch.refresh(&mut w.view);
        let ext = writer.rsc_ext;
        if w.rsc.is_idle() && w.rsc.ext() != ext {
            w.rsc = RscQueue::new(ext);
        }
        let view = w.view.clone();
        let Some(me) = view.ports.get(self.port) else {
            return Ok(false);
        };
        let multi = view.ports.len() > 1;
        let mut starved = false;
        while *moved < BUDGET {
            // What left GRO goes up first, in order.
            if let Some(f) = w.rsc.front() {
                if !put_frame(writer, me, f, stats) {
                    starved = true;
                    break;
                }
                w.rsc.pop();
                *moved += 1;
                continue;
            }
            let now = self.nic.now();
            if !active {
                // Turned off (or the driver took GSO away): what is held
                // goes up as it is, and frames take the usual path again.
                if w.rsc.held() == 0 {
                    break;
                }
                w.rsc.flush(RscFlush::Batch, stats);
                continue;
            }
            let Worker {
                rsc,
                rx,
                view,
                scratch,
                ..
            } = &mut *w;
            let took = if self.toe_on() {
                // As in `rx_round_locked`: the TOE without the backlog's
                // lock.
                backlog.deliver_front_unlocked(rx, |f| {
                    self.toe_then(i, f, stats, |f| {
                        rsc.receive(f, now, stats);
                        true
                    })
                })
            } else {
                backlog.deliver_front(|f| {
                    rsc.receive(f, now, stats);
                    true
                })
            };
            if took.is_some() {
                continue;
            }
            if self.port == 0 {
                writer.release();
                match self.read_uplink(i, rx, view, scratch, true) {
                    Uplinked::Frame { len, steered } => {
                        let target = port.rx_queue(steered, i);
                        if target == i {
                            rsc.receive(&rx[..len], now, stats);
                        } else {
                            port.hand_over(target, &rx[..len]);
                        }
                        continue;
                    }
                    Uplinked::Dropped => continue,
                    Uplinked::Empty => {}
                }
            }
            // Nothing more came in: held flows leave now, or when their
            // time is up.
            match rsc.deadline(usecs) {
                Some(_) if usecs == 0 => rsc.flush(RscFlush::Batch, stats),
                Some(d) if d <= now => rsc.flush(RscFlush::Timer, stats),
                Some(d) => {
                    self.arm_coalescing(i, d, now);
                    break;
                }
                None => break,
            }
        }
        writer.release();
        if starved && multi && self.port == 0 {
            // Keep the VFs' frames flowing while the PF has no buffers;
            // the PF's own wait in its backlog.
            while *moved < BUDGET && self.read_into_backlog(i, &mut w).is_some() {
                *moved += 1;
            }
        }
        self.nic.wake(&mut w.scratch.wakes);
        Ok(starved)
    }

    /// Reads one frame from uplink queue `i` into the worker's own buffer
    /// and queues it for the PF's RX queue RSS picks: None when the uplink
    /// had nothing, `Some(Some(queue))` when queued there, `Some(None)`
    /// when it went through the switch or was dropped.
    fn read_into_backlog(&self, i: usize, w: &mut Worker) -> Option<Option<usize>> {
        let Worker {
            rx, view, scratch, ..
        } = w;
        // A frame for this queue's TOE engine is taken at once rather than
        // wait behind the driver's in the backlog.
        match self.read_uplink(i, rx, view, scratch, true) {
            Uplinked::Empty => None,
            Uplinked::Dropped => Some(None),
            Uplinked::Frame { len, steered } => {
                let port = self.dev();
                let target = port.rx_queue(steered, i);
                port.hand_over(target, &rx[..len]);
                Some(Some(target))
            }
        }
    }

    /// Reads one frame from uplink queue `i` into `buf` (TAP header
    /// first); a frame for the PF alone is returned with its RSS queue,
    /// any other goes through the switch. With `offer`, one RSS steers to
    /// queue `i` is first offered to its TOE engine (while the driver
    /// runs the TOE); without, the TOE sees it where it is queued.
    fn read_uplink(
        &self,
        i: usize,
        buf: &mut [u8],
        view: &View,
        scratch: &mut TxScratch,
        offer: bool,
    ) -> Uplinked {
        let stats = &self.dev().stats.rx[i];
        let n = match self.nic.uplink().recv(i, &mut [PieceMut::Local(buf)]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Uplinked::Empty,
            Err(e) => {
                log::debug!("uplink queue {i}: {e}");
                stats.drop(DropReason::UplinkError);
                return Uplinked::Empty;
            }
        };
        let Some(frame) = buf.get(VNET_HDR_LEN..n).filter(|f| !f.is_empty()) else {
            stats.drop(DropReason::RxMalformed);
            return Uplinked::Dropped;
        };
        match self
            .nic
            .uplink_route(view, &frame[..frame.len().min(256)], frame.len())
        {
            UplinkRoute::Pf(steering) => {
                let steered = usize::from(steering.queue);
                if !offer || !self.toe_on() || self.dev().rx_queue(steered, i) != i {
                    return Uplinked::Frame { len: n, steered };
                }
                match self.toe_input(i, &buf[..n]) {
                    toe::ToeVerdict::Pass => Uplinked::Frame { len: n, steered },
                    toe::ToeVerdict::Taken => Uplinked::Dropped,
                    toe::ToeVerdict::Whole(w) => {
                        let len = VNET_HDR_LEN + w.len();
                        let Some(out) = buf.get_mut(..len) else {
                            stats.drop(DropReason::Oversized);
                            return Uplinked::Dropped;
                        };
                        out[..VNET_HDR_LEN].fill(0);
                        out[VNET_HDR_LEN..].copy_from_slice(&w);
                        Uplinked::Frame { len, steered }
                    }
                }
            }
            UplinkRoute::Switch => {
                self.nic.from_uplink(&buf[..n], view, stats, scratch);
                Uplinked::Dropped
            }
            UplinkRoute::Drop(why) => {
                stats.drop(why);
                Uplinked::Dropped
            }
        }
    }

    /// Reads uplink queue `i` for a worker whose own RX queue is off and
    /// hands every frame to an enabled queue; with none enabled, frames
    /// are dropped and counted. Frames waiting in this queue's backlog
    /// move the same way.
    fn forward_uplink(&self, i: usize) {
        self.enabled_queues();
        let port = self.dev();
        port.redirect_backlog(i, BUDGET);
        if self.port != 0 {
            return;
        }
        let stats = &port.stats.rx[i];
        let mut w = self.workers[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.nic.switch.refresh(&mut w.view);
        for moved in 0..=BUDGET {
            if moved == BUDGET {
                let _ = port.backlogs[i].event.write(1);
                break;
            }
            let Worker {
                rx, view, scratch, ..
            } = &mut *w;
            let (len, steered) = match self.read_uplink(i, rx, view, scratch, false) {
                Uplinked::Empty => break,
                Uplinked::Dropped => continue,
                Uplinked::Frame { len, steered } => (len, steered),
            };
            match port.rx_queue(steered, usize::MAX) {
                usize::MAX => {
                    log::debug!("worker {i}: no RX queue enabled, frame dropped");
                    stats.drop(DropReason::RxNoBuffers)
                }
                target => port.hand_over(target, &w.rx[..len]),
            }
        }
        self.nic.wake(&mut w.scratch.wakes);
    }

    /// Tells the port which RX vrings the frontend has enabled; the port
    /// decides which queues frames may go to.
    fn enabled_queues(&self) {
        let mut vrings = 0u32;
        for (j, v) in self.rx_vrings.iter().enumerate().take(32) {
            if v.get().is_some_and(|v| v.get_ref().is_enabled()) {
                vrings |= 1 << j;
            }
        }
        self.dev().set_enabled_rx(vrings);
    }
}

impl RxPath for VnicBackend {
    fn deliver(&self, q: usize, frames: &[crate::nic::Pending]) -> usize {
        if self.dev().rsc_active() || self.toe_on() {
            // The queue's worker coalesces, or offers each frame to its
            // TOE engine first: the frames wait in its backlog.
            return 0;
        }
        let Some(vring) = self.rx_vrings.get(q).and_then(OnceLock::get) else {
            return 0;
        };
        if !live(vring) {
            return 0;
        }
        let mem = self.memory();
        let stats = &self.dev().stats.rx[q];
        // One writer for them all: the ring's lock taken once, the
        // driver's index read once per batch of its buffers, the used
        // index stored at the end.
        let mut writer =
            RxWriter::new(&mem, vring, stats, self.acked()).counting(self.packed_moved.get(2 * q));
        let (mut n, mut delivered, mut bytes) = (0, 0u64, 0u64);
        for p in frames {
            match writer.write(&p.frame, &p.steering) {
                Ok(()) => {
                    delivered += 1;
                    bytes += p.frame.len().saturating_sub(VNET_HDR_LEN) as u64;
                }
                Err(DropReason::RxNoBuffers) => break,
                Err(why) => stats.drop(why),
            }
            n += 1;
        }
        if delivered > 0 {
            stats.packets(delivered, bytes);
        }
        n
    }

    fn flush(&self, q: usize, frames: u32) {
        let Some(vring) = self.rx_vrings.get(q).and_then(OnceLock::get) else {
            return;
        };
        let mem = self.memory();
        let stats = &self.dev().stats.rx[q];
        let packed = self.acked().contains(Features::RING_PACKED);
        let room = rx_room(vring, &mem, packed);
        if let Err(e) = self.signal(2 * q, frames, vring, &mem, stats, room) {
            log::debug!("rx{q}: notify: {e}");
        }
    }

    fn coalescing_changed(&self) {
        self.recheck_coalescing();
    }
}

impl VhostUserBackend for VnicBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.queues()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.dev().config.queue_size)
    }

    fn features(&self) -> u64 {
        let mut f = offered_features();
        // Every port has a TOE of its own (the PF's sees what its workers
        // read from the uplink, a VF's what the switch puts in its
        // backlogs).
        if self.dev().config.toe_conns == 0 {
            f.remove(Features::VNIC_TOE);
        }
        f.bits()
    }

    fn acked_features(&self, features: u64) {
        self.acked.store(features, Ordering::Release);
        let f = Features::from_bits_retain(features);
        if let Err(e) = self.nic.set_guest_features(self.port, f) {
            log::warn!("setting uplink offloads: {e}");
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn reset_device(&self) {
        if let Err(e) = self.nic.reset(self.port) {
            log::warn!("device reset: {e}");
        }
        for s in &self.signalled {
            s.store(NOT_YET, Ordering::Release);
        }
        for m in &self.packed_moved {
            m.store(0, Ordering::Release);
        }
        for w in &self.workers {
            w.lock().unwrap_or_else(PoisonError::into_inner).rsc.clear();
        }
        self.toe_reset();
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The vrings know (vhost-user-backend sets it on each queue), and
        // virtio-queue's notification calls follow it.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config()
            .read(offset as usize, size as usize)
            .unwrap_or_default()
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(PoisonError::into_inner) = mem;
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        let mut t = vec![0u64; self.threads];
        for p in 0..self.pairs() {
            t[p % self.threads] |= 0b11u64 << (2 * p);
        }
        t.push(0b111u64 << (2 * self.pairs()));
        t
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let pair =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()?;
        self.exit_fds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(pair.0.as_raw_fd());
        Some(pair)
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        // An error here would end the worker thread, and with it its
        // queues, for the rest of the connection. Whatever the guest did
        // (a ring outside its memory), the error is counted and logged and
        // the worker goes on with its other queues and events.
        if let Err(e) = self.dispatch(device_event, vrings, thread_id) {
            let stats = &self.dev().stats;
            let q = match self.event_of(device_event, vrings.len(), thread_id) {
                None => &stats.ctrl,
                Some((i, Work::Tx)) => &stats.tx[i],
                Some((i, _)) => &stats.rx[i],
            };
            q.drop(DropReason::BadRing);
            if self.ring_errors.fetch_add(1, Ordering::Relaxed) < 10 {
                log::warn!("worker {thread_id}: event {device_event}: {e}");
            } else {
                log::debug!("worker {thread_id}: event {device_event}: {e}");
            }
        }
        Ok(())
    }
}

impl VnicBackend {
    /// Handles one event of thread `thread_id`.
    /// What an event of worker thread `thread_id` is about: the pair and
    /// the work, or None for the control thread (or an id of no pair).
    /// Kicks carry the vring's place among the thread's `nvrings` (RX and
    /// TX of each of its pairs in turn), the backend's own events their
    /// pair's slot.
    fn event_of(
        &self,
        device_event: u16,
        nvrings: usize,
        thread_id: usize,
    ) -> Option<(usize, Work)> {
        if thread_id >= self.threads {
            return None;
        }
        let ev = usize::from(device_event);
        let (slot, work) = if ev < nvrings {
            (ev / 2, if ev % 2 == 0 { Work::Rx } else { Work::Tx })
        } else {
            let (slot, e) = self.decode_event(device_event)?;
            let work = match e {
                e if e == Ev::Resume as u16 => Work::Resume,
                e if e == Ev::Timer as u16 => Work::Timer,
                e if e == Ev::Coalesce as u16 => Work::Coalesce,
                e if e == Ev::Uplink as u16 => Work::Uplink,
                e if e == Ev::Backlog as u16 => Work::Backlog,
                _ => return None,
            };
            (slot, work)
        };
        Some((self.pair_of(thread_id, slot)?, work))
    }

    fn dispatch(
        &self,
        device_event: u16,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        log::trace!("thread {thread_id}: event {device_event}");
        if thread_id == self.threads {
            // Its vrings: the control queue, the TOE's command queue, the
            // TOE's event queue.
            let Some(v) = vrings.first() else {
                return Ok(());
            };
            let toe = vrings.get(1).zip(vrings.get(2));
            return match device_event {
                0 => self.process_ctrl(v),
                1 | 2 => match toe {
                    Some((cmd, evt)) if device_event == 1 => self.process_toe(cmd, evt),
                    Some((cmd, evt)) => self.process_toe_events(cmd, evt),
                    None => Ok(()),
                },
                e if e == self.event_id(Ev::Timer) => {
                    self.toe_timer_fired();
                    Ok(())
                }
                e if e == self.event_id(Ev::Resume) => {
                    let _ = self.take_resume(self.pairs());
                    if live(v) {
                        self.process_ctrl(v)?;
                    }
                    match toe {
                        Some((cmd, evt)) if live(cmd) => self.process_toe(cmd, evt),
                        _ => Ok(()),
                    }
                }
                _ => Ok(()),
            };
        }
        let Some((i, work)) = self.event_of(device_event, vrings.len(), thread_id) else {
            log::warn!("thread {thread_id}: unknown event {device_event}");
            return Ok(());
        };
        // The pair's vrings among the thread's: RX and TX of each of its
        // pairs in turn.
        let slot = i / self.threads;
        let (Some(rx), Some(tx)) = (vrings.get(2 * slot), vrings.get(2 * slot + 1)) else {
            return Ok(());
        };
        self.rx_vrings[i].get_or_init(|| rx.clone());
        match work {
            Work::Rx => self.process_rx(i, rx),
            Work::Tx => self.process_tx(i, tx),
            Work::Resume => {
                // What stopped at its budget goes on. The frontend may
                // have stopped a queue meanwhile (GET_VRING_BASE): kicks
                // are checked by vhost-user-backend, our own resume event
                // is not. The event is read (cleared) only once neither
                // direction has anything left: while rounds end at their
                // budget it stays readable, and epoll brings the worker
                // back after its other events without a write and a read
                // per round.
                let left = self
                    .left
                    .get(i)
                    .map_or(LEFT_TX, |l| l.swap(0, Ordering::Relaxed));
                let r = self.resume_pair(i, left, rx, tx);
                if r.is_err()
                    || self
                        .left
                        .get(i)
                        .is_none_or(|l| l.load(Ordering::Relaxed) == 0)
                {
                    self.take_resume(i);
                }
                r
            }
            Work::Timer => {
                if let Some(t) = self.timers.get(i) {
                    let mut t = t.lock().unwrap_or_else(PoisonError::into_inner);
                    // Expired: reading clears it (it may already be; the
                    // fd does not block).
                    let _ = t.wait();
                }
                if live(tx) {
                    self.process_tx(i, tx)
                } else {
                    Ok(())
                }
            }
            Work::Coalesce => self.coalescing_due(i, rx, tx),
            Work::Uplink | Work::Backlog => {
                if matches!(work, Work::Backlog) {
                    let _ = self.dev().backlogs[i].event.read();
                }
                if live(rx) {
                    self.process_rx(i, rx)
                } else {
                    // This pair's RX queue is off: pass what arrives on its
                    // uplink queue to the queues that are on.
                    self.forward_uplink(i);
                    Ok(())
                }
            }
        }
    }
}
