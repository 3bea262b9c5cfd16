//! Per-queue counters. Every dropped frame is counted under a reason.

use super::coalesce::Flush;
use std::{
    fmt::Write as _,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

/// Why the device dropped a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// A descriptor points outside guest memory.
    BadDescriptor,
    /// The chain loops or is longer than the queue.
    ChainTooLong,
    /// A TX chain with no frame bytes, or an RX chain with no writable bytes.
    ZeroLength,
    /// A TX frame longer than the device accepts.
    Oversized,
    /// The driver's virtio-net header failed validation.
    BadHeader,
    /// A TX chain whose descriptors are in the wrong order (writable first)
    /// or an RX chain with device-readable descriptors.
    BadChainLayout,
    /// No RX buffers were posted in time (backlog full).
    RxNoBuffers,
    /// An RX chain too small for the frame without MRG_RXBUF.
    RxChainTooSmall,
    /// The uplink refused the frame.
    UplinkError,
    /// The device has no uplink.
    NoUplink,
    /// A frame from the uplink that did not parse far enough to use.
    RxMalformed,
    /// Software segmentation or checksum completion failed.
    OffloadFailed,
    /// The receive filters (MAC table, RX modes, VLANs) rejected it.
    Filtered,
    /// A malformed control command, or one on a chain without room for
    /// the ack.
    BadControl,
    /// The available ring named a descriptor past the queue's end (it
    /// cannot be given back), or a ring is not in guest memory.
    BadRing,
    /// The port's link is down (`state disable`, or auto with the uplink
    /// down).
    LinkDown,
    /// A frame from a port with spoof checking whose source MAC is not the
    /// port's.
    Spoofed,
    /// A tagged frame from a port that has a port VLAN.
    VlanViolation,
    /// The receiving port has no frontend.
    PortDown,
}

impl DropReason {
    pub const ALL: [DropReason; 19] = [
        DropReason::BadDescriptor,
        DropReason::ChainTooLong,
        DropReason::ZeroLength,
        DropReason::Oversized,
        DropReason::BadHeader,
        DropReason::BadChainLayout,
        DropReason::RxNoBuffers,
        DropReason::RxChainTooSmall,
        DropReason::UplinkError,
        DropReason::NoUplink,
        DropReason::RxMalformed,
        DropReason::OffloadFailed,
        DropReason::Filtered,
        DropReason::BadControl,
        DropReason::BadRing,
        DropReason::LinkDown,
        DropReason::Spoofed,
        DropReason::VlanViolation,
        DropReason::PortDown,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DropReason::BadDescriptor => "bad_descriptor",
            DropReason::ChainTooLong => "chain_too_long",
            DropReason::ZeroLength => "zero_length",
            DropReason::Oversized => "oversized",
            DropReason::BadHeader => "bad_header",
            DropReason::BadChainLayout => "bad_chain_layout",
            DropReason::RxNoBuffers => "rx_no_buffers",
            DropReason::RxChainTooSmall => "rx_chain_too_small",
            DropReason::UplinkError => "uplink_error",
            DropReason::NoUplink => "no_uplink",
            DropReason::RxMalformed => "rx_malformed",
            DropReason::OffloadFailed => "offload_failed",
            DropReason::Filtered => "filtered",
            DropReason::BadControl => "bad_control",
            DropReason::BadRing => "bad_ring",
            DropReason::LinkDown => "link_down",
            DropReason::Spoofed => "spoofed",
            DropReason::VlanViolation => "vlan_violation",
            DropReason::PortDown => "port_down",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Counters of one virtqueue.
#[derive(Debug, Default)]
pub struct QueueStats {
    pub packets: AtomicU64,
    pub bytes: AtomicU64,
    /// Frames that reached the guest or the wire as GSO frames.
    pub gso_packets: AtomicU64,
    /// Frames segmented or checksummed in software.
    pub sw_offloads: AtomicU64,
    /// RX frames read from the uplink straight into guest buffers.
    pub direct: AtomicU64,
    /// TX: times a worker polling an emptied ring (`--poll-us`) found
    /// more chains, without a kick or a wake-up.
    pub polled: AtomicU64,
    /// TX: nanoseconds spent polling emptied rings (`--poll-us`), found
    /// or not: time the worker looked at a ring with nothing new in it.
    pub poll_ns: AtomicU64,
    pub notifications: AtomicU64,
    pub notifications_suppressed: AtomicU64,
    /// Batches of used buffers whose notification coalescing held back.
    pub held: AtomicU64,
    /// Held notifications sent because `max_packets` were used.
    pub flush_packets: AtomicU64,
    /// Held notifications sent because `max_usecs` passed.
    pub flush_timer: AtomicU64,
    /// Held notifications sent because the device ran out of buffers.
    pub flush_starved: AtomicU64,
    /// The longest a used buffer waited for its notification, in ns.
    pub hold_max_ns: AtomicU64,
    /// Held notifications by how far past `max_usecs` they went out: up to
    /// 100 µs, 1 ms, 10 ms, and beyond (the worker's timer slack and
    /// scheduling).
    pub late: [AtomicU64; 4],
    /// Frames receive segment coalescing made (or that carry absorbed
    /// duplicate ACKs).
    pub rsc_frames: AtomicU64,
    /// Segments that went into those frames.
    pub rsc_merged: AtomicU64,
    /// Duplicate ACKs absorbed (with RSC_EXT).
    pub rsc_dup_acks: AtomicU64,
    /// Coalesced frames sent on because the rules ended the flow.
    pub rsc_flush_rule: AtomicU64,
    /// ... because the frame reached 64 KiB.
    pub rsc_flush_full: AtomicU64,
    /// ... because the flow table was full.
    pub rsc_flush_evicted: AtomicU64,
    /// Held flows sent on at the end of a receive batch.
    pub rsc_flush_batch: AtomicU64,
    /// Held flows sent on when the coalescing time passed.
    pub rsc_flush_timer: AtomicU64,
    drops: [AtomicU64; DropReason::ALL.len()],
}

impl QueueStats {
    pub fn packet(&self, bytes: usize) {
        self.packets(1, bytes as u64);
    }
    /// `n` frames of `bytes` bytes in all.
    pub fn packets(&self, n: u64, bytes: u64) {
        self.packets.fetch_add(n, Relaxed);
        self.bytes.fetch_add(bytes, Relaxed);
    }
    pub fn drop(&self, why: DropReason) {
        self.drops[why.index()].fetch_add(1, Relaxed);
    }
    pub fn drops(&self, why: DropReason) -> u64 {
        self.drops[why.index()].load(Relaxed)
    }
    pub fn total_drops(&self) -> u64 {
        self.drops.iter().map(|d| d.load(Relaxed)).sum()
    }
    /// A held notification went out (or the driver did not want it) after
    /// its oldest buffer waited `held_ns`, for `why`, on a queue that may
    /// hold `max_ns`.
    pub fn flushed(&self, why: Flush, held_ns: u64, max_ns: u64) {
        let c = match why {
            Flush::Packets => &self.flush_packets,
            Flush::Timer => &self.flush_timer,
            Flush::Starved => &self.flush_starved,
        };
        if held_ns > 0 {
            c.fetch_add(1, Relaxed);
            self.hold_max_ns.fetch_max(held_ns, Relaxed);
            let late = held_ns.saturating_sub(max_ns);
            let bucket = match late {
                0..=100_000 => 0,
                100_001..=1_000_000 => 1,
                1_000_001..=10_000_000 => 2,
                _ => 3,
            };
            self.late[bucket].fetch_add(1, Relaxed);
        }
    }

    pub fn notified(&self, sent: bool) {
        if sent {
            self.notifications.fetch_add(1, Relaxed);
        } else {
            self.notifications_suppressed.fetch_add(1, Relaxed);
        }
    }
}

/// The TOE's counters over every frontend connection of a port, in the
/// order of `ToeStats::fields`, and the connections open now.
#[derive(Debug, Default)]
pub struct ToeCounters {
    counts: [AtomicU64; 14],
    pub connections: AtomicU64,
    /// TCP segments an engine took that came to another engine's queue
    /// (RSS moved the flow, or a datagram put together from fragments).
    pub foreign: AtomicU64,
    /// Per engine (one per RX queue).
    pub engines: Vec<EngineCounters>,
}

/// One TOE engine's share of the port's counters.
#[derive(Debug, Default)]
pub struct EngineCounters {
    pub segments_in: AtomicU64,
    /// Connections made (CONNECT) or accepted here.
    pub opened: AtomicU64,
    /// Connections open or waiting for ACCEPT here now.
    pub connections: AtomicU64,
}

impl ToeCounters {
    /// Adds what an engine counted since it was last asked.
    pub fn add(&self, s: &crate::nic::toe::ToeStats) {
        for (c, (_, v)) in self.counts.iter().zip(s.fields()) {
            if v > 0 {
                c.fetch_add(v, Relaxed);
            }
        }
    }

    fn render(&self, s: &mut String) {
        let names = crate::nic::toe::ToeStats::default().fields();
        for (c, (name, _)) in self.counts.iter().zip(names) {
            let _ = writeln!(s, "toe.{name} {}", c.load(Relaxed));
        }
        let _ = writeln!(s, "toe.connections {}", self.connections.load(Relaxed));
        let _ = writeln!(s, "toe.foreign {}", self.foreign.load(Relaxed));
        for (k, e) in self.engines.iter().enumerate() {
            let _ = writeln!(
                s,
                "toe.engine{k}.segments_in {}",
                e.segments_in.load(Relaxed)
            );
            let _ = writeln!(s, "toe.engine{k}.opened {}", e.opened.load(Relaxed));
            let _ = writeln!(
                s,
                "toe.engine{k}.connections {}",
                e.connections.load(Relaxed)
            );
        }
    }
}

/// Counters of the whole device: one entry per RX and per TX queue.
#[derive(Debug)]
pub struct Stats {
    pub rx: Vec<QueueStats>,
    pub tx: Vec<QueueStats>,
    /// The control queue: packets are commands answered.
    pub ctrl: QueueStats,
    pub toe: ToeCounters,
}

impl Stats {
    pub fn new(pairs: usize) -> Stats {
        Stats {
            rx: (0..pairs).map(|_| QueueStats::default()).collect(),
            tx: (0..pairs).map(|_| QueueStats::default()).collect(),
            ctrl: QueueStats::default(),
            toe: ToeCounters {
                engines: (0..pairs).map(|_| EngineCounters::default()).collect(),
                ..ToeCounters::default()
            },
        }
    }

    /// `name value` lines, one counter each, e.g. `rx0.packets 12`.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let ctrl = std::slice::from_ref(&self.ctrl);
        for (dir, queues) in [("rx", &self.rx[..]), ("tx", &self.tx[..]), ("ctrl", ctrl)] {
            for (i, q) in queues.iter().enumerate() {
                let _ = writeln!(s, "{dir}{i}.packets {}", q.packets.load(Relaxed));
                let _ = writeln!(s, "{dir}{i}.bytes {}", q.bytes.load(Relaxed));
                let _ = writeln!(s, "{dir}{i}.gso_packets {}", q.gso_packets.load(Relaxed));
                let _ = writeln!(s, "{dir}{i}.sw_offloads {}", q.sw_offloads.load(Relaxed));
                let _ = writeln!(s, "{dir}{i}.direct {}", q.direct.load(Relaxed));
                let _ = writeln!(s, "{dir}{i}.polled {}", q.polled.load(Relaxed));
                let _ = writeln!(s, "{dir}{i}.poll_ns {}", q.poll_ns.load(Relaxed));
                let _ = writeln!(
                    s,
                    "{dir}{i}.notifications {}",
                    q.notifications.load(Relaxed)
                );
                let _ = writeln!(
                    s,
                    "{dir}{i}.notifications_suppressed {}",
                    q.notifications_suppressed.load(Relaxed)
                );
                for (name, c) in [
                    ("held", &q.held),
                    ("flush.packets", &q.flush_packets),
                    ("flush.timer", &q.flush_timer),
                    ("flush.starved", &q.flush_starved),
                    ("hold_max_ns", &q.hold_max_ns),
                    ("late_100us", &q.late[0]),
                    ("late_1ms", &q.late[1]),
                    ("late_10ms", &q.late[2]),
                    ("late_more", &q.late[3]),
                ] {
                    let _ = writeln!(s, "{dir}{i}.coalesce.{name} {}", c.load(Relaxed));
                }
                if dir == "rx" {
                    for (name, c) in [
                        ("frames", &q.rsc_frames),
                        ("merged", &q.rsc_merged),
                        ("dup_acks", &q.rsc_dup_acks),
                        ("flush.rule", &q.rsc_flush_rule),
                        ("flush.full", &q.rsc_flush_full),
                        ("flush.evicted", &q.rsc_flush_evicted),
                        ("flush.batch", &q.rsc_flush_batch),
                        ("flush.timer", &q.rsc_flush_timer),
                    ] {
                        let _ = writeln!(s, "{dir}{i}.rsc.{name} {}", c.load(Relaxed));
                    }
                }
                for why in DropReason::ALL {
                    let _ = writeln!(s, "{dir}{i}.drop.{} {}", why.name(), q.drops(why));
                }
            }
        }
        self.toe.render(&mut s);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_renders() {
        let s = Stats::new(2);
        s.tx[1].packet(60);
        s.tx[1].drop(DropReason::BadHeader);
        s.tx[1].drop(DropReason::BadHeader);
        s.rx[0].notified(false);
        let text = s.render();
        assert!(text.contains("tx1.packets 1\n"));
        assert!(text.contains("tx1.bytes 60\n"));
        assert!(text.contains("tx1.drop.bad_header 2\n"));
        assert!(text.contains("rx0.notifications_suppressed 1\n"));
        assert_eq!(s.tx[1].total_drops(), 2);
        for (i, why) in DropReason::ALL.iter().enumerate() {
            assert_eq!(why.index(), i);
        }
    }
}
