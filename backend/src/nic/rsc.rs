//! Receive segment coalescing (LRO/RSC) for one RX queue: TCP segments
//! the device receives (from the uplink or the switch) are merged by
//! vnic_protocol's GRO, with Linux's tcp_gro_receive rules (timestamped
//! segments merge when their options match, as Linux's do), and go up as
//! one GSO frame to a driver that accepted GUEST_TSO4 and GUEST_TSO6.
//!
//! Frames come and go with the TAP's 12-byte virtio-net header in front:
//! a frame whose checksum the sender left to the device (NEEDS_CSUM) has it
//! completed first, so that GRO can verify it. Frames GRO merged or
//! verified go up with DATA_VALID; with RSC_EXT, a coalesced frame also
//! carries RSC_INFO, its segment count in `csum_start` and the duplicate
//! ACKs it absorbed in `csum_offset` (virtio 1.3, 5.1.6.4).
//!
//! What leaves waits in a small queue of its own until the driver has
//! buffers for it; the caller takes no new frame while that queue is not
//! empty, so it holds at most what one frame makes leave (the held flows
//! and the frame itself).

use std::collections::VecDeque;

use vnic_protocol::{
    offload::{complete_checksum, Gro, GroConfig, GroFlush, GroPacket},
    virtio::{
        hdr::{GsoType, HDR_LEN},
        HdrFlags, VirtioNetHdr,
    },
};

use super::stats::QueueStats;
use std::sync::atomic::Ordering::Relaxed;

/// Flows one queue holds at once.
pub const RSC_FLOWS: usize = 8;

/// Why held flows are flushed by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RscFlush {
    /// The end of a receive batch (no coalescing time set).
    Batch,
    /// The coalescing time since the oldest held segment passed.
    Timer,
}

/// One RX queue's segment coalescing.
#[derive(Debug)]
pub struct RscQueue {
    gro: Gro,
    /// Frames (header first) ready for the driver, oldest first.
    ready: VecDeque<Vec<u8>>,
    /// Buffers for `ready`, kept for reuse.
    spare: Vec<Vec<u8>>,
    /// A frame whose checksum is being completed.
    scratch: Vec<u8>,
    /// When the oldest segment still held came in (NIC clock, ns).
    since: Option<u64>,
    /// Report coalescing in the header (RSC_EXT).
    ext: bool,
}

impl Default for RscQueue {
    fn default() -> Self {
        RscQueue::new(false)
    }
}

impl RscQueue {
    /// A queue's coalescing; `ext`: the driver accepted RSC_EXT.
    pub fn new(ext: bool) -> RscQueue {
        RscQueue {
            gro: Gro::new(GroConfig {
                max_flows: RSC_FLOWS,
                absorb_dup_acks: ext,
                ..GroConfig::default()
            }),
            ready: VecDeque::new(),
            spare: Vec::new(),
            scratch: Vec::new(),
            since: None,
            ext,
        }
    }

    /// Whether coalescing is reported in the header (RSC_EXT).
    pub fn ext(&self) -> bool {
        self.ext
    }

    /// Whether anything is held or waiting.
    pub fn is_idle(&self) -> bool {
        self.ready.is_empty() && self.gro.held() == 0
    }

    /// Flows held.
    pub fn held(&self) -> usize {
        self.gro.held()
    }

    /// When the held flows are due, for a coalescing time of `usecs`.
    pub fn deadline(&self, usecs: u32) -> Option<u64> {
        self.since
            .map(|s| s.saturating_add(u64::from(usecs) * 1000))
    }

    /// The oldest frame ready for the driver (header first).
    pub fn front(&self) -> Option<&[u8]> {
        self.ready.front().map(Vec::as_slice)
    }

    /// The driver took (or the device dropped) the oldest ready frame.
    pub fn pop(&mut self) {
        if let Some(b) = self.ready.pop_front() {
            self.spare.push(b);
        }
    }

    /// Takes one received frame (the TAP's header, then the frame) at
    /// `now`; what leaves is queued for [`RscQueue::front`].
    pub fn receive(&mut self, tap_frame: &[u8], now: u64, stats: &QueueStats) {
        let Some((hb, frame)) = tap_frame.split_at_checked(HDR_LEN) else {
            self.push_raw(tap_frame);
            return;
        };
        let hdr = match VirtioNetHdr::parse(hb, false) {
            Ok(h) if h.gso_type == GsoType::None as u8 => h,
            // Already a GSO frame, or a header GRO cannot read: up as it
            // came, after whatever is held (which it may belong to).
            _ => {
                self.flush(RscFlush::Batch, stats);
                self.push_raw(tap_frame);
                return;
            }
        };
        let frame = if hdr.flags.contains(HdrFlags::NEEDS_CSUM) {
            self.scratch.clear();
            self.scratch.extend_from_slice(frame);
            if complete_checksum(
                &mut self.scratch,
                usize::from(hdr.csum_start),
                usize::from(hdr.csum_offset),
            )
            .is_err()
            {
                self.flush(RscFlush::Batch, stats);
                self.push_raw(tap_frame);
                return;
            }
            std::mem::take(&mut self.scratch)
        } else {
            Vec::new()
        };
        let input: &[u8] = if frame.is_empty() {
            &tap_frame[HDR_LEN..]
        } else {
            &frame
        };
        let (ready, spare, ext) = (&mut self.ready, &mut self.spare, self.ext);
        self.gro.receive(input, &mut |p| {
            emit(ready, spare, ext, &hdr, &p, stats);
        });
        if !frame.is_empty() {
            self.scratch = frame;
        }
        if self.gro.held() == 0 {
            self.since = None;
        } else {
            self.since.get_or_insert(now);
        }
    }

    /// Sends every held flow on its way.
    pub fn flush(&mut self, why: RscFlush, stats: &QueueStats) {
        if self.gro.held() == 0 {
            return;
        }
        let (ready, spare, ext) = (&mut self.ready, &mut self.spare, self.ext);
        let hdr = VirtioNetHdr::default();
        self.gro.flush(&mut |p| {
            emit(ready, spare, ext, &hdr, &p, stats);
        });
        self.since = None;
        match why {
            RscFlush::Batch => &stats.rsc_flush_batch,
            RscFlush::Timer => &stats.rsc_flush_timer,
        }
        .fetch_add(1, Relaxed);
    }

    /// Drops what is held and waiting (the driver reset the device).
    pub fn clear(&mut self) {
        let mut sink = |_: GroPacket<'_>| {};
        self.gro.flush(&mut sink);
        while !self.ready.is_empty() {
            self.pop();
        }
        self.since = None;
    }

    fn push_raw(&mut self, tap_frame: &[u8]) {
        let mut b = self.spare.pop().unwrap_or_default();
        b.clear();
        b.extend_from_slice(tap_frame);
        self.ready.push_back(b);
    }
}

/// Queues what left GRO, with the header that describes it.
fn emit(
    ready: &mut VecDeque<Vec<u8>>,
    spare: &mut Vec<Vec<u8>>,
    ext: bool,
    orig: &VirtioNetHdr,
    p: &GroPacket<'_>,
    stats: &QueueStats,
) {
    let coalesced = p.segments > 1 || p.dup_acks > 0;
    let hdr = if coalesced {
        let mut h = VirtioNetHdr {
            flags: HdrFlags::DATA_VALID,
            gso_type: if p.segments > 1 {
                p.gso_type as u8
            } else {
                GsoType::None as u8
            },
            gso_size: if p.segments > 1 { p.gso_size } else { 0 },
            hdr_len: header_len(p.frame),
            ..VirtioNetHdr::default()
        };
        if ext {
            h.flags |= HdrFlags::RSC_INFO;
            h.csum_start = p.segments;
            h.csum_offset = p.dup_acks;
        }
        stats.rsc_frames.fetch_add(1, Relaxed);
        stats.rsc_merged.fetch_add(u64::from(p.segments), Relaxed);
        stats.rsc_dup_acks.fetch_add(u64::from(p.dup_acks), Relaxed);
        h
    } else if p.csum_verified {
        VirtioNetHdr {
            flags: HdrFlags::DATA_VALID,
            ..VirtioNetHdr::default()
        }
    } else {
        // Passed through unverified: the frame as it came (its checksum
        // completed if the sender left it to the device).
        VirtioNetHdr {
            flags: orig.flags - HdrFlags::NEEDS_CSUM,
            ..VirtioNetHdr::default()
        }
    };
    if p.segments > 1 {
        match p.reason {
            GroFlush::Rule => Some(&stats.rsc_flush_rule),
            GroFlush::Full => Some(&stats.rsc_flush_full),
            GroFlush::Evicted => Some(&stats.rsc_flush_evicted),
            GroFlush::Passed | GroFlush::Caller => None,
        }
        .map(|c| c.fetch_add(1, Relaxed));
    }
    let mut b = spare.pop().unwrap_or_default();
    b.clear();
    b.resize(HDR_LEN, 0);
    // A 12-byte header always fits its 12 bytes.
    let _ = hdr.emit(&mut b[..HDR_LEN], false);
    b.extend_from_slice(p.frame);
    ready.push_back(b);
}

/// The length of a TCP frame's headers (Ethernet, IP, TCP), or 0.
fn header_len(frame: &[u8]) -> u16 {
    vnic_protocol::wire::parse_frame(frame)
        .ok()
        .and_then(|i| i.l4)
        .map_or(0, |l4| (l4.offset + l4.header_len) as u16)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use vnic_protocol::{
        offload::Segmenter,
        wire::{
            build::{data_segment, pseudo_header, tcp_frame, Flow, IpFields},
            parse_frame,
            tcp::{self, Flags},
        },
    };

    use super::*;

    /// `payload` as MSS-sized segments of one flow, each with a TAP
    /// header: complete checksums, or left to the device (NEEDS_CSUM).
    fn segments(payload: &[u8], mss: u16, partial: bool) -> (Vec<u8>, Vec<Vec<u8>>) {
        let flow = Flow::v4();
        let sup = tcp_frame(
            &flow,
            data_segment(1000, 5, Flags::ACK),
            &IpFields::default(),
            payload,
        )
        .unwrap();
        let info = parse_frame(&sup).unwrap();
        let mut out = Vec::new();
        Segmenter::new()
            .segment_parsed(&sup, &info, mss, &mut |h, p| {
                let mut f = vec![0u8; HDR_LEN];
                f.extend_from_slice(h);
                f.extend_from_slice(p);
                if partial {
                    // What a local sender hands the TAP: the pseudo-header
                    // sum in the checksum field, the rest for the device.
                    let l4 = HDR_LEN + 34;
                    let ps = pseudo_header(flow.src_ip, flow.dst_ip, 6, f.len() - l4);
                    let c = vnic_protocol::checksum::add(ps, 0);
                    f[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
                    let h = VirtioNetHdr {
                        flags: HdrFlags::NEEDS_CSUM,
                        csum_start: 34,
                        csum_offset: 16,
                        ..VirtioNetHdr::default()
                    };
                    h.emit(&mut f[..HDR_LEN], false).unwrap();
                }
                out.push(f);
            })
            .unwrap();
        (sup, out)
    }

    fn drain(r: &mut RscQueue) -> Vec<(VirtioNetHdr, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some(f) = r.front() {
            out.push((
                VirtioNetHdr::parse(&f[..HDR_LEN], false).unwrap(),
                f[HDR_LEN..].to_vec(),
            ));
            r.pop();
        }
        out
    }

    #[test]
    fn segments_left_to_the_device_are_completed_and_merged() {
        for (partial, ext) in [(false, false), (true, false), (true, true)] {
            let payload: Vec<u8> = (0..1448 * 5).map(|i| (i % 253) as u8).collect();
            let (sup, segs) = segments(&payload, 1448, partial);
            let stats = QueueStats::default();
            let mut r = RscQueue::new(ext);
            for (k, s) in segs.iter().enumerate() {
                r.receive(s, 1000 * k as u64, &stats);
            }
            assert!(r.front().is_none(), "all five held");
            assert_eq!(r.deadline(200), Some(200_000));
            r.flush(RscFlush::Timer, &stats);
            let out = drain(&mut r);
            assert_eq!(out.len(), 1);
            let (h, frame) = &out[0];
            assert_eq!(frame, &sup, "the merged frame is the original");
            assert_eq!(h.gso_type, GsoType::TcpV4 as u8);
            assert_eq!(h.gso_size, 1448);
            assert_eq!(h.hdr_len, 14 + 20 + 32);
            assert!(h.flags.contains(HdrFlags::DATA_VALID));
            assert_eq!(h.flags.contains(HdrFlags::RSC_INFO), ext);
            assert_eq!(h.csum_start, if ext { 5 } else { 0 });
            assert_eq!(stats.rsc_merged.load(Relaxed), 5);
            assert_eq!(stats.rsc_frames.load(Relaxed), 1);
            assert_eq!(stats.rsc_flush_timer.load(Relaxed), 1);
            assert!(r.is_idle());
        }
    }

    #[test]
    fn other_frames_pass_in_order_with_their_flow_flushed_first() {
        let stats = QueueStats::default();
        let mut r = RscQueue::new(false);
        let (_, segs) = segments(&[7u8; 1448 * 2], 1448, false);
        r.receive(&segs[0], 0, &stats);
        r.receive(&segs[1], 0, &stats);
        // A GSO frame from the TAP: the held flow goes first, then it, as
        // it came.
        let mut gso = vec![0u8; HDR_LEN];
        VirtioNetHdr::tcp_tso(GsoType::TcpV4, 34, 66, 1448)
            .emit(&mut gso[..HDR_LEN], false)
            .unwrap();
        gso.extend_from_slice(&[1u8; 200]);
        r.receive(&gso, 0, &stats);
        let out = drain(&mut r);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].0.gso_size, 1448);
        assert_eq!(out[1].1, gso[HDR_LEN..]);
        assert_eq!(out[1].0.gso_type, GsoType::TcpV4 as u8);
        // An ARP frame goes up alone, unverified, as it came.
        let arp = [&[0u8; HDR_LEN][..], &[0xffu8; 60][..]].concat();
        r.receive(&arp, 0, &stats);
        let out = drain(&mut r);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0.flags, HdrFlags::empty());
        assert_eq!(stats.rsc_flush_batch.load(Relaxed), 1);
        // A corrupted segment is not merged, and is not marked valid.
        let mut bad = segs[0].clone();
        let l4 = HDR_LEN + 34;
        let mut t = tcp::Packet::new_unchecked(&mut bad[l4..]);
        t.set_window_len(t.window_len() ^ 1);
        r.receive(&bad, 0, &stats);
        let out = drain(&mut r);
        assert_eq!(out.len(), 1);
        assert!(!out[0].0.flags.contains(HdrFlags::DATA_VALID));
        assert!(r.is_idle());
    }
}
