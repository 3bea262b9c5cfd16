//! The device model, free of vhost: transmit decisions (pass GSO through,
//! segment or checksum in software), RSS steering, the per-queue backlog
//! that carries frames between workers, and the counters.

pub mod ctrl;
pub mod stats;

use std::{
    collections::VecDeque,
    io,
    sync::{atomic::Ordering, Mutex, MutexGuard, PoisonError, RwLock},
};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vnic_protocol::{
    offload::{complete_checksum, Segmenter},
    rss::{HashTypes, IndirectionTable, Rss, RssError, Steering},
    virtio::{
        hdr::{GsoType, HDR_LEN},
        validate_prefix, Features, HdrFlags, VirtioNetHdr,
    },
    wire::{ethernet::Address, parse_frame_prefix},
};

use self::ctrl::CtrlState;
pub use self::stats::{DropReason, QueueStats, Stats};
use crate::uplink::{Offloads, Piece, Uplink, MAX_PIECES};

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
}

impl DeviceConfig {
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
        let mut g = self.lock();
        if g.frames.len() >= self.max_frames || frame.len() > self.max_bytes {
            return false;
        }
        // A recycled buffer, unless it is far larger than needed (a 64 KiB
        // buffer must not hold a 60-byte frame against the byte bound).
        let mut buf = match g.free.pop() {
            Some(b) if b.capacity() <= 4 * frame.len().max(2048) => b,
            Some(b) => {
                g.held -= b.capacity();
                drop(b);
                Vec::new()
            }
            None => Vec::new(),
        };
        g.held -= buf.capacity();
        let need = buf.capacity().max(frame.len());
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
            return false;
        }
        buf.clear();
        buf.reserve_exact(frame.len());
        buf.extend_from_slice(frame);
        g.held += buf.capacity();
        g.frames.push_back(buf);
        true
    }

    /// Hands the oldest frame to `f`; it stays queued when `f` returns
    /// false (no room yet). Returns None when empty.
    pub fn deliver_front(&self, f: impl FnOnce(&[u8]) -> bool) -> Option<bool> {
        let mut g = self.lock();
        let front = g.frames.front()?;
        if !f(front) {
            return Some(false);
        }
        if let Some(buf) = g.frames.pop_front() {
            if g.free.len() < BACKLOG_FREE {
                g.free.push(buf);
            } else {
                g.held -= buf.capacity();
            }
        }
        Some(true)
    }

    pub fn len(&self) -> usize {
        self.lock().frames.len()
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

/// Scratch space of one transmit worker.
#[derive(Debug, Default)]
pub struct TxScratch {
    seg: Segmenter,
    frame: Vec<u8>,
}

/// The device: configuration, uplink, RSS state, backlogs, counters.
pub struct Device {
    pub config: DeviceConfig,
    pub stats: Stats,
    uplink: Box<dyn Uplink>,
    rss: RwLock<Rss>,
    ctrl: Mutex<CtrlState>,
    pub backlogs: Vec<Backlog>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Backlog frames per RX queue.
pub const BACKLOG_FRAMES: usize = 1024;
/// Backlog bytes per RX queue: 128 GSO frames of 64 KiB, or all 1024
/// frames at 1514 bytes.
pub const BACKLOG_BYTES: usize = 8 << 20;

impl Device {
    pub fn new(config: DeviceConfig, uplink: Box<dyn Uplink>) -> io::Result<Device> {
        let rss = config
            .build_rss()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let pairs = usize::from(config.pairs);
        let backlogs = (0..pairs)
            .map(|_| Backlog::new(BACKLOG_FRAMES, BACKLOG_BYTES))
            .collect::<io::Result<_>>()?;
        Ok(Device {
            stats: Stats::new(pairs),
            uplink,
            rss: RwLock::new(rss),
            ctrl: Mutex::new(CtrlState::new(config.mac, config.pairs)),
            backlogs,
            config,
        })
    }

    pub fn uplink(&self) -> &dyn Uplink {
        self.uplink.as_ref()
    }

    /// Applies the receive offloads the driver accepted to the uplink.
    pub fn set_guest_features(&self, acked: Features) -> io::Result<()> {
        let csum = acked.contains(Features::GUEST_CSUM);
        self.uplink.set_rx_offloads(Offloads {
            csum,
            tso4: csum && acked.contains(Features::GUEST_TSO4),
            tso6: csum && acked.contains(Features::GUEST_TSO6),
            tso_ecn: csum && acked.contains(Features::GUEST_ECN),
            uso: csum && acked.contains(Features::GUEST_USO4 | Features::GUEST_USO6),
        })
    }

    /// Where RSS sends a received frame.
    pub fn steer(&self, frame: &[u8]) -> Steering {
        self.steer_prefix(frame, frame.len())
    }

    /// [`Device::steer`] from the first bytes of a frame of `len` bytes.
    pub fn steer_prefix(&self, prefix: &[u8], len: usize) -> Steering {
        let rss = self.rss.read().unwrap_or_else(PoisonError::into_inner);
        match parse_frame_prefix(prefix, len) {
            Ok(info) => rss.steer(&info),
            Err(_) => Steering {
                queue: rss.unclassified_queue,
                hash: 0,
                report: vnic_protocol::rss::HashReport::None,
            },
        }
    }

    /// The state the control queue changes.
    pub fn ctrl_state(&self) -> MutexGuard<'_, CtrlState> {
        self.ctrl.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Back to the state of a freshly created device (new frontend, or
    /// the driver reset it): configured RSS, no filters, no coalescing.
    pub fn reset(&self) -> io::Result<()> {
        *self.ctrl_state() = CtrlState::new(self.config.mac, self.config.pairs);
        let rss = self
            .config
            .build_rss()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        self.set_rss(rss);
        for b in &self.backlogs {
            b.clear();
        }
        Ok(())
    }

    /// A copy of the RSS configuration in force.
    pub fn current_rss(&self) -> Rss {
        self.rss
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the RSS configuration.
    pub fn set_rss(&self, rss: Rss) {
        *self.rss.write().unwrap_or_else(PoisonError::into_inner) = rss;
    }

    /// Sends one frame the driver put on TX queue `q`: `hdr` is the
    /// driver's virtio-net header (12 or 20 bytes; the uplink gets the
    /// first 12) and `frame` the whole frame.
    pub fn transmit(
        &self,
        q: usize,
        hdr: &[u8],
        frame: &[u8],
        scratch: &mut TxScratch,
    ) -> Result<(), DropReason> {
        self.transmit_pieces(q, hdr, frame, &[], scratch)
    }

    /// [`Device::transmit`] for a frame whose first bytes, `prefix` (all
    /// its headers), were copied out of guest memory and whose rest stays
    /// there as `rest`. When the uplink takes the frame as it is, the
    /// validated prefix and the guest's payload are written in one
    /// vectored write, without copying the payload.
    pub fn transmit_pieces(
        &self,
        q: usize,
        hdr: &[u8],
        prefix: &[u8],
        rest: &[Piece<'_>],
        scratch: &mut TxScratch,
    ) -> Result<(), DropReason> {
        let stats = self.stats.tx.get(q).ok_or(DropReason::UplinkError)?;
        let len = prefix.len() + rest.iter().map(Piece::len).sum::<usize>();
        let r = self.transmit_inner(q, hdr, prefix, rest, len, scratch, stats);
        match r {
            Ok(()) => stats.packet(len),
            Err(why) => stats.drop(why),
        }
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn transmit_inner(
        &self,
        q: usize,
        hdr_bytes: &[u8],
        prefix: &[u8],
        rest: &[Piece<'_>],
        len: usize,
        scratch: &mut TxScratch,
        stats: &QueueStats,
    ) -> Result<(), DropReason> {
        if len == 0 {
            return Err(DropReason::ZeroLength);
        }
        let hdr = VirtioNetHdr::parse(hdr_bytes, false).map_err(|_| DropReason::BadHeader)?;
        let v = validate_prefix(&hdr, prefix, len).map_err(|e| {
            log::debug!("tx{q}: bad header: {e}");
            DropReason::BadHeader
        })?;
        if v.gso == GsoType::None && len > usize::from(self.config.mtu) + 14 + 8 {
            return Err(DropReason::Oversized);
        }
        let caps = self.uplink.tx_offloads();
        let gso_ok = match v.gso {
            GsoType::None => true,
            GsoType::TcpV4 => caps.tso4 && (!v.ecn || caps.tso_ecn),
            GsoType::TcpV6 => caps.tso6 && (!v.ecn || caps.tso_ecn),
            GsoType::UdpL4 => caps.uso,
            GsoType::Udp => false,
        };
        let needs_csum = hdr.flags.contains(HdrFlags::NEEDS_CSUM);
        let uq = q % self.uplink.queues().max(1);
        if gso_ok && (!needs_csum || caps.csum) {
            if v.gso != GsoType::None {
                stats.gso_packets.fetch_add(1, Ordering::Relaxed);
            }
            let mut out = [0u8; HDR_LEN];
            out.copy_from_slice(&hdr_bytes[..HDR_LEN]);
            out[10] = 0;
            out[11] = 0;
            if rest.len() + 2 > MAX_PIECES {
                return Err(DropReason::ChainTooLong);
            }
            let mut pieces = [Piece::Local(&[]); MAX_PIECES];
            pieces[0] = Piece::Local(&out);
            pieces[1] = Piece::Local(prefix);
            pieces[2..2 + rest.len()].copy_from_slice(rest);
            return self.send(uq, &pieces[..2 + rest.len()]);
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
            let TxScratch { seg, frame } = scratch;
            seg.segment(frame, &v, hdr.gso_size, &mut |h, p| {
                let r = self.send(
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
        self.send(uq, &[Piece::Local(&plain), Piece::Local(&scratch.frame)])
    }

    fn send(&self, q: usize, pieces: &[Piece<'_>]) -> Result<(), DropReason> {
        match self.uplink.send(q, pieces) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Err(DropReason::NoUplink),
            Err(e) => {
                log::debug!("uplink queue {q}: {e}");
                Err(DropReason::UplinkError)
            }
        }
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
        DeviceConfig {
            pairs,
            queue_size: 256,
            mac: Address([2, 0, 0, 0, 0, 1]),
            mtu: 1500,
            rss: RssSettings::default(),
        }
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
        let dev = Device::new(config(1), Box::new(up.clone())).unwrap();
        let f = tcp_frame(
            &Flow::v4(),
            data_segment(1, 1, Flags::ACK),
            &IpFields::default(),
            &[9; 5000],
        )
        .unwrap();
        dev.transmit(0, &tso_hdr(1448), &f, &mut TxScratch::default())
            .unwrap();
        let sent = up.sent();
        assert_eq!(sent.len(), 1);
        assert_eq!(&sent[0][..10], &tso_hdr(1448)[..10]);
        assert_eq!(&sent[0][12..], &f[..]);
        assert_eq!(
            dev.stats.tx[0]
                .gso_packets
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn payload_in_guest_memory_is_passed_through_not_copied() {
        use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
        let up = FakeUplink::with_offloads(Offloads::ALL);
        let dev = Device::new(config(1), Box::new(up.clone())).unwrap();
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
            &tso_hdr(1448),
            &f[..256],
            &[Piece::Guest(rest)],
            &mut TxScratch::default(),
        )
        .unwrap();
        assert_eq!(&up.sent()[0][12..], &f[..]);
        assert_eq!(up.lock().kinds[0], vec![false, false, true]);
    }

    #[test]
    fn gso_is_segmented_in_software_otherwise() {
        let up = FakeUplink::default();
        let dev = Device::new(config(1), Box::new(up.clone())).unwrap();
        let payload: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let f = tcp_frame(
            &Flow::v4(),
            data_segment(1, 1, Flags::ACK),
            &IpFields::default(),
            &payload,
        )
        .unwrap();
        dev.transmit(0, &tso_hdr(1448), &f, &mut TxScratch::default())
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
        let dev = Device::new(config(1), Box::new(up.clone())).unwrap();
        let f = tcp_frame(
            &Flow::v4(),
            data_segment(1, 1, Flags::ACK),
            &IpFields::default(),
            &[1; 100],
        )
        .unwrap();
        let mut s = TxScratch::default();
        assert_eq!(
            dev.transmit(0, &tso_hdr(0), &f, &mut s),
            Err(DropReason::BadHeader)
        );
        assert_eq!(
            dev.transmit(0, &[0; 12], &[], &mut s),
            Err(DropReason::ZeroLength)
        );
        let big = vec![0u8; 3000];
        assert_eq!(
            dev.transmit(0, &[0; 12], &big, &mut s),
            Err(DropReason::Oversized)
        );
        assert_eq!(dev.stats.tx[0].drops(DropReason::BadHeader), 1);
        assert_eq!(dev.stats.tx[0].total_drops(), 3);
        assert!(up.sent().is_empty());
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
