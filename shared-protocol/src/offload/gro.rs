//! GRO/LRO: coalescing in-order TCP segments of one flow into one large
//! frame, with the rules Linux applies in tcp_gro_receive and
//! inet_gro_receive / ipv6_gro_receive:
//!
//! - only TCP over IPv4 without options or IPv6 without extension headers,
//!   unfragmented, with verified IPv4 header and TCP checksums;
//! - a segment joins a flow only in order (seq = next expected), with the
//!   same ACK number, the same TCP option bytes (timestamps included), the
//!   same TTL/hop limit, TOS/traffic class (ECN included), DF and flow label,
//!   an IPv4 identification that increments (or, with DF, stays fixed),
//!   and no more payload than the flow's first segment (its MSS);
//! - flags other than ACK and PSH (FIN, SYN, RST, URG, ECE, CWR) flush the
//!   flow and pass the segment through alone; PSH is ORed in and ends the
//!   flow, as does a segment shorter than the MSS;
//! - a flow ends before it would exceed 64 KiB of IP packet or
//!   `max_segments` segments.
//!
//! Frames GRO does not take are passed through in order: a segment that
//! belongs to a held flow flushes that flow first.
//!
//! With [`GroConfig::absorb_dup_acks`] (receive segment coalescing as
//! virtio's RSC_EXT and Windows' RSC report it), a pure duplicate ACK of a
//! held flow (no payload, ACK alone, the flow's next sequence number, ACK
//! number, window and options) is counted in the flow rather than passed
//! on, and the count leaves with the flow.

use core::net::IpAddr;

use crate::{
    checksum,
    virtio::hdr::GsoType,
    wire::{build::pseudo_header, ip_proto, ipv4, ipv6, parse_frame, tcp, tcp::Flags, L3Info},
};

/// Limits of a [`Gro`] engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroConfig {
    /// Flows held at once; the oldest is flushed to make room.
    pub max_flows: usize,
    /// Segments merged into one frame at most.
    pub max_segments: u16,
    /// Largest IP packet (total length) a merged frame may reach.
    pub max_ip_len: usize,
    /// Count pure duplicate ACKs of a held flow instead of passing them.
    pub absorb_dup_acks: bool,
}

impl Default for GroConfig {
    fn default() -> Self {
        GroConfig {
            max_flows: 8,
            max_segments: 64,
            max_ip_len: 65535,
            absorb_dup_acks: false,
        }
    }
}

/// Why a frame left GRO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroFlush {
    /// Never held: not a segment GRO merges (not TCP, no payload, a flag
    /// other than ACK/PSH, a bad checksum, IP options...).
    Passed,
    /// The rules ended the flow: PSH, a segment shorter than the MSS, or
    /// a segment of the flow that could not join it.
    Rule,
    /// It reached 64 KiB (`max_ip_len`) or `max_segments`.
    Full,
    /// The flow table was full and this was the oldest flow.
    Evicted,
    /// [`Gro::flush`]: the caller's batch or timer ended.
    Caller,
}

/// A frame coming out of GRO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroPacket<'a> {
    pub frame: &'a [u8],
    /// Segments merged into this frame (1 for a frame passed through).
    pub segments: u16,
    /// GSO type and size to report to the driver when `segments > 1`.
    pub gso_type: GsoType,
    pub gso_size: u16,
    /// The transport checksum was verified (report DATA_VALID).
    pub csum_verified: bool,
    /// Pure duplicate ACKs absorbed into this flow.
    pub dup_acks: u16,
    pub reason: GroFlush,
}

impl<'a> GroPacket<'a> {
    fn single(frame: &'a [u8], csum_verified: bool) -> GroPacket<'a> {
        GroPacket {
            frame,
            segments: 1,
            gso_type: GsoType::None,
            gso_size: 0,
            csum_verified,
            dup_acks: 0,
            reason: GroFlush::Passed,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FlowKey {
    src: IpAddr,
    dst: IpAddr,
    src_port: u16,
    dst_port: u16,
}

#[derive(Debug, Default)]
struct Flow {
    active: bool,
    key: Option<FlowKey>,
    buf: Vec<u8>,
    l3_offset: usize,
    l4_offset: usize,
    hdr_end: usize,
    v6: bool,
    next_seq: u32,
    mss: usize,
    segments: u16,
    last_id: u16,
    dup_acks: u16,
    age: u64,
}

/// Per-segment facts GRO compares.
struct Seg<'a> {
    key: FlowKey,
    frame: &'a [u8],
    l3_offset: usize,
    l4_offset: usize,
    hdr_end: usize,
    v6: bool,
    seq: u32,
    flags: Flags,
    payload_len: usize,
    ip_id: u16,
    dont_frag: bool,
}

/// A GRO engine for one receive queue. Buffers are kept between flows, so
/// the steady state does not allocate.
#[derive(Debug)]
pub struct Gro {
    config: GroConfig,
    flows: Vec<Flow>,
    clock: u64,
}

impl Default for Gro {
    fn default() -> Self {
        Gro::new(GroConfig::default())
    }
}

/// A segment GRO can consider, or `None` with whether its checksum was
/// verified (false when it was not a TCP segment GRO looks at).
fn classify(frame: &[u8]) -> Result<Seg<'_>, (Option<FlowKey>, bool)> {
    let Ok(info) = parse_frame(frame) else {
        return Err((None, false));
    };
    let Some(l4) = info.l4.filter(|l| l.protocol == ip_proto::TCP) else {
        return Err((None, false));
    };
    let Some((src, dst)) = info.l3.addrs() else {
        return Err((None, false));
    };
    let key = FlowKey {
        src,
        dst,
        src_port: l4.src_port,
        dst_port: l4.dst_port,
    };
    let end = info.l3_end(frame.len());
    let seg = &frame[l4.offset..end];
    let ps = pseudo_header(src, dst, ip_proto::TCP, seg.len());
    if checksum::add(ps, checksum::sum(seg)) != 0xffff {
        return Err((Some(key), false));
    }
    let (v6, ip_id, dont_frag) = match info.l3 {
        L3Info::Ipv4 { header_len, .. } => {
            if header_len != ipv4::HEADER_LEN {
                return Err((Some(key), true));
            }
            let p = ipv4::Packet::new_unchecked(&frame[info.l3_offset..]);
            if !checksum::verify(p.header()) {
                return Err((Some(key), false));
            }
            (false, p.ident(), p.dont_frag())
        }
        L3Info::Ipv6 { ext, .. } => {
            if ext.upper_offset != ipv6::HEADER_LEN {
                return Err((Some(key), true));
            }
            (true, 0, true)
        }
        _ => return Err((Some(key), true)),
    };
    let t = tcp::Packet::new_unchecked(seg);
    let hdr_end = l4.offset + l4.header_len;
    Ok(Seg {
        key,
        frame: &frame[..end],
        l3_offset: info.l3_offset,
        l4_offset: l4.offset,
        hdr_end,
        v6,
        seq: t.seq_number(),
        flags: t.flags(),
        payload_len: end - hdr_end,
        ip_id,
        dont_frag,
    })
}

impl Gro {
    pub fn new(config: GroConfig) -> Gro {
        let flows = (0..config.max_flows.max(1))
            .map(|_| Flow::default())
            .collect();
        Gro {
            config,
            flows,
            clock: 0,
        }
    }

    /// Flows currently held.
    pub fn held(&self) -> usize {
        self.flows.iter().filter(|f| f.active).count()
    }

    /// Takes one received frame. Frames that leave GRO (merged flows,
    /// frames passed through) go to `deliver`, in order.
    pub fn receive(&mut self, frame: &[u8], deliver: &mut dyn FnMut(GroPacket<'_>)) {
        self.clock += 1;
        let seg = match classify(frame) {
            Ok(s) => s,
            Err((key, verified)) => {
                if let Some(k) = key {
                    self.flush_key(&k, deliver);
                }
                deliver(GroPacket::single(frame, verified));
                return;
            }
        };
        let extra = seg.flags - (Flags::ACK | Flags::PSH);
        if self.config.absorb_dup_acks && seg.payload_len == 0 && seg.flags == Flags::ACK {
            if let Some(i) = self.find(&seg.key).filter(|&i| self.is_dup_ack(i, &seg)) {
                let f = &mut self.flows[i];
                f.dup_acks = f.dup_acks.saturating_add(1);
                return;
            }
        }
        if seg.payload_len == 0 || !extra.is_empty() || !seg.flags.contains(Flags::ACK) {
            self.flush_key(&seg.key, deliver);
            deliver(GroPacket::single(frame, true));
            return;
        }
        if let Some(i) = self.find(&seg.key) {
            if self.can_merge(i, &seg) {
                self.merge(i, &seg);
                let f = &self.flows[i];
                if f.segments >= self.config.max_segments {
                    self.flush_index(i, GroFlush::Full, deliver);
                } else if seg.payload_len < f.mss || seg.flags.contains(Flags::PSH) {
                    self.flush_index(i, GroFlush::Rule, deliver);
                }
                return;
            }
            let full = self.flows[i].buf.len() - self.flows[i].l3_offset + seg.payload_len
                > self.config.max_ip_len;
            let why = if full { GroFlush::Full } else { GroFlush::Rule };
            self.flush_index(i, why, deliver);
        }
        self.start(&seg, deliver);
    }

    /// Delivers every held flow (end of a receive batch).
    pub fn flush(&mut self, deliver: &mut dyn FnMut(GroPacket<'_>)) {
        // Oldest first; the table is small, so a selection pass per flow
        // beats sorting into an allocated list.
        while let Some(i) = self
            .flows
            .iter()
            .enumerate()
            .filter(|(_, f)| f.active)
            .min_by_key(|(_, f)| f.age)
            .map(|(i, _)| i)
        {
            self.flush_index(i, GroFlush::Caller, deliver);
        }
    }

    /// Whether a pure ACK is a duplicate of held flow `i`'s: the next
    /// sequence number, and the same ACK number, window and options.
    fn is_dup_ack(&self, i: usize, s: &Seg<'_>) -> bool {
        let f = &self.flows[i];
        if s.seq != f.next_seq || f.hdr_end != s.hdr_end || f.l4_offset != s.l4_offset {
            return false;
        }
        let ft = tcp::Packet::new_unchecked(&f.buf[f.l4_offset..f.hdr_end]);
        let st = tcp::Packet::new_unchecked(&s.frame[s.l4_offset..s.hdr_end]);
        ft.ack_number() == st.ack_number()
            && ft.window_len() == st.window_len()
            && ft.options() == st.options()
    }

    fn find(&self, key: &FlowKey) -> Option<usize> {
        self.flows
            .iter()
            .position(|f| f.active && f.key.as_ref() == Some(key))
    }

    fn flush_key(&mut self, key: &FlowKey, deliver: &mut dyn FnMut(GroPacket<'_>)) {
        if let Some(i) = self.find(key) {
            self.flush_index(i, GroFlush::Rule, deliver);
        }
    }

    fn can_merge(&self, i: usize, s: &Seg<'_>) -> bool {
        let f = &self.flows[i];
        let h = &f.buf[..f.hdr_end];
        // Same L2 header, same L4 header length.
        if f.l4_offset != s.l4_offset || f.hdr_end != s.hdr_end || f.v6 != s.v6 {
            return false;
        }
        if h[..f.l3_offset] != s.frame[..s.l3_offset] {
            return false;
        }
        if s.seq != f.next_seq || s.payload_len > f.mss {
            return false;
        }
        let ip_len = f.buf.len() - f.l3_offset + s.payload_len;
        if ip_len > self.config.max_ip_len {
            return false;
        }
        let (fh, sh) = (&h[f.l3_offset..], &s.frame[s.l3_offset..s.hdr_end]);
        if f.v6 {
            // Version/traffic class/flow label, next header, hop limit.
            if fh[0..4] != sh[0..4] || fh[6..8] != sh[6..8] {
                return false;
            }
        } else {
            let fp = ipv4::Packet::new_unchecked(fh);
            // TOS (ECN included) and TTL, protocol.
            if fh[1] != sh[1] || fh[8..10] != sh[8..10] {
                return false;
            }
            let id_ok =
                s.ip_id == f.last_id.wrapping_add(1) || (s.dont_frag && s.ip_id == f.last_id);
            if fp.dont_frag() != s.dont_frag || !id_ok {
                return false;
            }
        }
        let ft = tcp::Packet::new_unchecked(&h[f.l4_offset..]);
        let st = tcp::Packet::new_unchecked(&s.frame[s.l4_offset..s.hdr_end]);
        ft.ack_number() == st.ack_number() && ft.options() == st.options()
    }

    fn merge(&mut self, i: usize, s: &Seg<'_>) {
        let f = &mut self.flows[i];
        f.buf.extend_from_slice(&s.frame[s.hdr_end..]);
        f.next_seq = f.next_seq.wrapping_add(s.payload_len as u32);
        f.segments += 1;
        f.last_id = s.ip_id;
        let l4 = f.l4_offset;
        let st = tcp::Packet::new_unchecked(&s.frame[s.l4_offset..s.hdr_end]);
        let mut t = tcp::Packet::new_unchecked(&mut f.buf[l4..]);
        t.set_window_len(st.window_len());
        let fl = t.flags() | (s.flags & Flags::PSH);
        t.set_flags(fl);
    }

    fn start(&mut self, s: &Seg<'_>, deliver: &mut dyn FnMut(GroPacket<'_>)) {
        let slot = match self.flows.iter().position(|f| !f.active) {
            Some(i) => i,
            None => {
                let oldest = self
                    .flows
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, f)| f.age)
                    .map_or(0, |(i, _)| i);
                self.flush_index(oldest, GroFlush::Evicted, deliver);
                oldest
            }
        };
        let f = &mut self.flows[slot];
        f.active = true;
        f.key = Some(s.key);
        f.buf.clear();
        f.buf.extend_from_slice(s.frame);
        f.l3_offset = s.l3_offset;
        f.l4_offset = s.l4_offset;
        f.hdr_end = s.hdr_end;
        f.v6 = s.v6;
        f.next_seq = s.seq.wrapping_add(s.payload_len as u32);
        f.mss = s.payload_len;
        f.segments = 1;
        f.last_id = s.ip_id;
        f.dup_acks = 0;
        f.age = self.clock;
        if s.flags.contains(Flags::PSH) {
            self.flush_index(slot, GroFlush::Rule, deliver);
        } else if self.config.max_segments <= 1 {
            self.flush_index(slot, GroFlush::Full, deliver);
        }
    }

    fn flush_index(&mut self, i: usize, reason: GroFlush, deliver: &mut dyn FnMut(GroPacket<'_>)) {
        let f = &mut self.flows[i];
        if !f.active {
            return;
        }
        f.active = false;
        if f.segments == 1 {
            deliver(GroPacket {
                dup_acks: f.dup_acks,
                reason,
                ..GroPacket::single(&f.buf, true)
            });
            return;
        }
        let ip_len = f.buf.len() - f.l3_offset;
        let l4_len = f.buf.len() - f.l4_offset;
        let Some(key) = f.key else {
            return;
        };
        if f.v6 {
            let plen = (ip_len - ipv6::HEADER_LEN) as u16;
            ipv6::Packet::new_unchecked(&mut f.buf[f.l3_offset..]).set_payload_len(plen);
        } else {
            let mut p = ipv4::Packet::new_unchecked(&mut f.buf[f.l3_offset..]);
            p.set_total_len(ip_len as u16);
            p.fill_checksum();
        }
        let ps = pseudo_header(key.src, key.dst, ip_proto::TCP, l4_len);
        tcp::Packet::new_unchecked(&mut f.buf[f.l4_offset..]).fill_checksum(ps);
        deliver(GroPacket {
            frame: &f.buf,
            segments: f.segments,
            gso_type: if f.v6 { GsoType::TcpV6 } else { GsoType::TcpV4 },
            gso_size: f.mss as u16,
            csum_verified: true,
            dup_acks: f.dup_acks,
            reason,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        offload::gso::Segmenter,
        wire::build::{data_segment, tcp_frame, Flow, IpFields},
    };

    fn segments(flow: &Flow, payload: &[u8], mss: u16, flags: Flags) -> (Vec<u8>, Vec<Vec<u8>>) {
        let sup = tcp_frame(
            flow,
            data_segment(1000, 5, flags),
            &IpFields::default(),
            payload,
        )
        .unwrap();
        let info = parse_frame(&sup).unwrap();
        let mut out = Vec::new();
        Segmenter::new()
            .segment_parsed(&sup, &info, mss, &mut |h, p| {
                let mut f = h.to_vec();
                f.extend_from_slice(p);
                out.push(f);
            })
            .unwrap();
        (sup, out)
    }

    fn run(gro: &mut Gro, frames: &[Vec<u8>]) -> Vec<(Vec<u8>, u16, GsoType, u16)> {
        let mut out = Vec::new();
        let mut d =
            |p: GroPacket<'_>| out.push((p.frame.to_vec(), p.segments, p.gso_type, p.gso_size));
        for f in frames {
            gro.receive(f, &mut d);
        }
        gro.flush(&mut d);
        out
    }

    #[test]
    fn segment_then_coalesce_is_the_identity() {
        for flow in [Flow::v4(), Flow::v6()] {
            let payload: Vec<u8> = (0..20000u32).map(|i| (i % 251) as u8).collect();
            let (sup, segs) = segments(&flow, &payload, 1448, Flags::ACK | Flags::PSH);
            let out = run(&mut Gro::default(), &segs);
            assert_eq!(out.len(), 1);
            assert_eq!(out[0].1 as usize, segs.len());
            assert_eq!(out[0].3, 1448);
            assert_eq!(out[0].0, sup, "merged frame differs from the original");
        }
    }

    #[test]
    fn out_of_order_and_flag_rules() {
        let (_, segs) = segments(&Flow::v4(), &[1u8; 1448 * 4], 1448, Flags::ACK);
        // 0,1 merge; 3 is out of order: flush, start new; 2 out of order too.
        let out = run(
            &mut Gro::default(),
            &[
                segs[0].clone(),
                segs[1].clone(),
                segs[3].clone(),
                segs[2].clone(),
            ],
        );
        let counts: Vec<u16> = out.iter().map(|o| o.1).collect();
        assert_eq!(counts, vec![2, 1, 1]);
        // A FIN flushes the held flow and goes alone.
        let (_, fin) = segments(&Flow::v4(), &[2u8; 100], 1448, Flags::ACK | Flags::FIN);
        let mut fin = fin[0].clone();
        // Renumber FIN so it follows segment 1.
        let mut t = tcp::Packet::new_unchecked(&mut fin[34..]);
        t.set_seq_number(1000 + 2 * 1448);
        let ps = pseudo_header(Flow::v4().src_ip, Flow::v4().dst_ip, 6, fin.len() - 34);
        tcp::Packet::new_unchecked(&mut fin[34..]).fill_checksum(ps);
        let out = run(
            &mut Gro::default(),
            &[segs[0].clone(), segs[1].clone(), fin.clone()],
        );
        assert_eq!(out.iter().map(|o| o.1).collect::<Vec<_>>(), vec![2, 1]);
        assert_eq!(out[1].0, fin);
    }

    #[test]
    fn differing_options_ack_ttl_and_bad_checksum_do_not_merge() {
        let (_, segs) = segments(&Flow::v4(), &[1u8; 1448 * 2], 1448, Flags::ACK);
        let fix = |f: &mut Vec<u8>| {
            let mut ip = ipv4::Packet::new_unchecked(&mut f[14..]);
            ip.fill_checksum();
            let ps = pseudo_header(Flow::v4().src_ip, Flow::v4().dst_ip, 6, f.len() - 34);
            tcp::Packet::new_unchecked(&mut f[34..]).fill_checksum(ps);
        };
        // Timestamp value differs.
        let mut b = segs[1].clone();
        b[34 + 20 + 4] ^= 1;
        fix(&mut b);
        assert_eq!(run(&mut Gro::default(), &[segs[0].clone(), b]).len(), 2);
        // ACK number differs.
        let mut b = segs[1].clone();
        tcp::Packet::new_unchecked(&mut b[34..]).set_ack_number(6);
        fix(&mut b);
        assert_eq!(run(&mut Gro::default(), &[segs[0].clone(), b]).len(), 2);
        // TTL differs.
        let mut b = segs[1].clone();
        b[14 + 8] = 1;
        fix(&mut b);
        assert_eq!(run(&mut Gro::default(), &[segs[0].clone(), b]).len(), 2);
        // ECN bits differ.
        let mut b = segs[1].clone();
        b[15] = 1;
        fix(&mut b);
        assert_eq!(run(&mut Gro::default(), &[segs[0].clone(), b]).len(), 2);
        // Bad checksum: passed through unverified, flow flushed before it.
        let mut b = segs[1].clone();
        b[60] ^= 0xff;
        let mut gro = Gro::default();
        let mut verified = Vec::new();
        gro.receive(&segs[0], &mut |p| verified.push(p.csum_verified));
        gro.receive(&b, &mut |p| verified.push(p.csum_verified));
        assert_eq!(verified, vec![true, false]);
        assert_eq!(gro.held(), 0);
    }

    #[test]
    fn flush_reasons_and_duplicate_acks() {
        let (_, segs) = segments(&Flow::v4(), &[5u8; 1448 * 3 + 100], 1448, Flags::ACK);
        let reasons = |gro: &mut Gro, frames: &[Vec<u8>]| {
            let mut out = Vec::new();
            for f in frames {
                gro.receive(f, &mut |p| out.push((p.segments, p.reason, p.dup_acks)));
            }
            gro.flush(&mut |p| out.push((p.segments, p.reason, p.dup_acks)));
            out
        };
        // The short last segment ends the flow by the rules.
        assert_eq!(
            reasons(&mut Gro::default(), &segs),
            [(4, GroFlush::Rule, 0)]
        );
        // Held at the end of the batch: the caller flushes it.
        assert_eq!(
            reasons(&mut Gro::default(), &segs[..2]),
            [(2, GroFlush::Caller, 0)]
        );
        // At max_segments: full.
        let mut two = Gro::new(GroConfig {
            max_segments: 2,
            ..GroConfig::default()
        });
        assert_eq!(
            reasons(&mut two, &segs[..3]),
            [(2, GroFlush::Full, 0), (1, GroFlush::Caller, 0)]
        );
        // A pure ACK that repeats the flow's ACK: passed through (and it
        // ends the flow) unless duplicate ACKs are absorbed.
        let mut ack = segs[0].clone();
        ack.truncate(34 + 32);
        {
            let mut ip = ipv4::Packet::new_unchecked(&mut ack[14..]);
            ip.set_total_len(52);
            ip.set_ident(ip.ident().wrapping_add(2));
            ip.fill_checksum();
            let mut t = tcp::Packet::new_unchecked(&mut ack[34..]);
            t.set_seq_number(1000 + 2 * 1448);
        }
        let ps = pseudo_header(Flow::v4().src_ip, Flow::v4().dst_ip, 6, 32);
        tcp::Packet::new_unchecked(&mut ack[34..]).fill_checksum(ps);
        let input = [segs[0].clone(), segs[1].clone(), ack.clone(), ack.clone()];
        assert_eq!(
            reasons(&mut Gro::default(), &input),
            [
                (2, GroFlush::Rule, 0),
                (1, GroFlush::Passed, 0),
                (1, GroFlush::Passed, 0)
            ]
        );
        let mut absorb = Gro::new(GroConfig {
            absorb_dup_acks: true,
            ..GroConfig::default()
        });
        assert_eq!(reasons(&mut absorb, &input), [(2, GroFlush::Caller, 2)]);
        // The flow goes on after them.
        let mut absorb = Gro::new(GroConfig {
            absorb_dup_acks: true,
            ..GroConfig::default()
        });
        let input = [segs[0].clone(), segs[1].clone(), ack, segs[2].clone()];
        assert_eq!(reasons(&mut absorb, &input), [(3, GroFlush::Caller, 1)]);
    }

    #[test]
    fn bounded_flows_and_size() {
        let mut gro = Gro::new(GroConfig {
            max_flows: 2,
            ..Default::default()
        });
        let mut flows = Vec::new();
        for p in 0..3u16 {
            let mut fl = Flow::v4();
            fl.src_port = 1000 + p;
            flows.push(segments(&fl, &[3u8; 2000], 1000, Flags::ACK).1);
        }
        let mut n = 0;
        for f in &flows {
            gro.receive(&f[0], &mut |_| n += 1);
        }
        assert_eq!(gro.held(), 2);
        assert_eq!(n, 1, "oldest flow flushed to make room");
        // A flow stops before it would pass max_ip_len.
        let (_, segs) = segments(&Flow::v4(), &vec![4u8; 60_000], 1448, Flags::ACK);
        let mut small = Gro::new(GroConfig {
            max_ip_len: 10_000,
            ..Default::default()
        });
        let out = run(&mut small, &segs);
        assert!(out.iter().all(|o| o.0.len() - 14 <= 10_000));
        let total: usize = out.iter().map(|o| o.1 as usize).sum();
        assert_eq!(total, segs.len());
        assert!(out.len() >= 2);
    }
}
