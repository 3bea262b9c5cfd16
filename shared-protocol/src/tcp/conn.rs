//! One TCP connection: the state machine, sender and receiver.

use std::collections::VecDeque;

use super::{assembler::Assembler, rtt::RttEstimator, seq, Config, Event, Instant, State, Stats};
use crate::wire::tcp::{Flags, Repr, HEADER_LEN, MAX_SACK_BLOCKS};

/// A segment to put on the wire: the header and up to two payload slices
/// (the send buffer is a ring). Ports and options are filled in.
#[derive(Debug, Clone, Copy)]
pub struct Segment<'a> {
    pub repr: Repr,
    pub payload: [&'a [u8]; 2],
    /// Payload bytes per wire segment with this header: a payload longer
    /// than this is a super-segment for the NIC's TSO (or the stack) to
    /// cut at this size.
    pub mss: usize,
}

impl Segment<'_> {
    pub fn payload_len(&self) -> usize {
        self.payload[0].len() + self.payload[1].len()
    }
}

/// Largest window a header can carry before scaling.
const MAX_WINDOW: usize = 65535;
/// Largest shift (RFC 7323, 2.3).
const MAX_WSCALE: u8 = 14;
/// Most events kept for the application before older ones are merged.
const MAX_EVENTS: usize = 32;

/// The reply to a segment that matches no connection (RFC 9293, 3.10.7.1):
/// a RST, or nothing for a RST.
pub fn reply_to_stray(seg: &Repr, payload_len: usize) -> Option<Repr> {
    if seg.flags.contains(Flags::RST) {
        return None;
    }
    let mut r = bare(seg.dst_port, seg.src_port);
    if seg.flags.contains(Flags::ACK) {
        r.seq_number = seg.ack_number;
        r.flags = Flags::RST;
    } else {
        let len = payload_len
            + usize::from(seg.flags.contains(Flags::SYN))
            + usize::from(seg.flags.contains(Flags::FIN));
        r.ack_number = seg.seq_number.wrapping_add(len as u32);
        r.flags = Flags::RST | Flags::ACK;
    }
    Some(r)
}

fn bare(src_port: u16, dst_port: u16) -> Repr {
    Repr {
        src_port,
        dst_port,
        seq_number: 0,
        ack_number: 0,
        flags: Flags::empty(),
        window_len: 0,
        urgent_at: 0,
        mss: None,
        window_scale: None,
        sack_permitted: false,
        sack_ranges: [None; MAX_SACK_BLOCKS],
        timestamp: None,
        payload_len: 0,
    }
}

/// A TCP connection.
#[derive(Debug)]
pub struct Connection {
    cfg: Config,
    state: State,
    local_port: u16,
    remote_port: u16,
    passive: bool,

    // Send side (RFC 9293 names).
    iss: u32,
    snd_una: u32,
    snd_nxt: u32,
    /// Highest sequence number sent so far (plus one).
    snd_max: u32,
    snd_wnd: usize,
    max_snd_wnd: usize,
    snd_wl1: u32,
    snd_wl2: u32,
    /// Shift applied to the peer's window field.
    snd_wscale: u8,
    /// Peer's MSS (payload without options).
    peer_mss: usize,
    /// Data from `tx_seq` on: unacknowledged, then unsent.
    tx: VecDeque<u8>,
    tx_seq: u32,
    fin_queued: bool,
    /// The SYN (or SYN-ACK) is due on the wire.
    syn_due: bool,

    // Receive side.
    irs: u32,
    rcv_nxt: u32,
    rcv_wscale: u8,
    /// Both sides sent a window-scale option.
    ws_enabled: bool,
    /// Right edge of the window last advertised.
    rcv_adv: u32,
    last_ack_sent: u32,
    rx: VecDeque<u8>,
    asm: Assembler,
    fin_received: bool,
    /// Sequence number of the peer's FIN once known, in order or not. The
    /// first one known holds: nothing at or past it is taken, and a FIN
    /// elsewhere is ignored.
    rcv_fin: Option<u32>,

    // Options.
    ts_enabled: bool,
    ts_recent: u32,
    ts_offset: u32,
    /// The last TSval sent: the next is never older, whatever clock the
    /// caller passes (threads that read the time before waiting for the
    /// connection hand it times out of order, and the peer's PAWS drops
    /// a segment whose TSval went back).
    ts_sent: u32,
    sack_enabled: bool,
    /// Ranges above `snd_una` the peer holds (sorted, merged).
    sacked: Vec<(u32, u32)>,

    // Timers.
    rtx_deadline: Option<Instant>,
    backoff: u32,
    retries: u32,
    ack_deadline: Option<Instant>,
    ack_now: bool,
    unacked_segs: usize,
    persist_deadline: Option<Instant>,
    keepalive_deadline: Option<Instant>,
    keepalive_sent: u32,
    probe_due: bool,
    /// The persist timer expired with a small window open.
    sws_override: bool,
    last_rx: Instant,
    tw_deadline: Option<Instant>,

    // Congestion control (NewReno).
    cwnd: usize,
    ssthresh: usize,
    ca_acked: usize,
    dupacks: u32,
    in_recovery: bool,
    recover: u32,
    /// Next sequence number to retransmit before any new data.
    retx_next: Option<u32>,
    /// Highest sequence number retransmitted in this recovery.
    high_rxt: u32,
    rtt: RttEstimator,
    rtt_probe: Option<(u32, Instant)>,

    chal_start: Instant,
    chal_count: u32,
    rst_due: Option<Repr>,
    events: VecDeque<Event>,
    stats: Stats,
}

impl Connection {
    fn new(cfg: Config, now: Instant, local_port: u16, remote_port: u16, iss: u32) -> Connection {
        let rcv_wscale = if cfg.window_scaling {
            let mut s = 0u8;
            while s < MAX_WSCALE && (MAX_WINDOW << s) < cfg.recv_buffer {
                s += 1;
            }
            s
        } else {
            0
        };
        let mss = usize::from(cfg.mss.max(64));
        Connection {
            cfg,
            state: State::SynSent,
            local_port,
            remote_port,
            passive: false,
            iss,
            snd_una: iss,
            snd_nxt: iss,
            snd_max: iss,
            snd_wnd: 0,
            max_snd_wnd: 0,
            snd_wl1: 0,
            snd_wl2: 0,
            snd_wscale: 0,
            peer_mss: usize::from(cfg.default_peer_mss.max(64)),
            tx: VecDeque::new(),
            tx_seq: iss.wrapping_add(1),
            fin_queued: false,
            syn_due: true,
            irs: 0,
            rcv_nxt: 0,
            rcv_wscale,
            ws_enabled: false,
            rcv_adv: 0,
            last_ack_sent: 0,
            rx: VecDeque::new(),
            asm: Assembler::new(cfg.ooo_limit),
            fin_received: false,
            rcv_fin: None,
            ts_enabled: false,
            ts_recent: 0,
            ts_offset: iss.rotate_left(13),
            ts_sent: iss.rotate_left(13),
            sack_enabled: false,
            sacked: Vec::new(),
            rtx_deadline: None,
            backoff: 1,
            retries: 0,
            ack_deadline: None,
            ack_now: false,
            unacked_segs: 0,
            persist_deadline: None,
            keepalive_deadline: None,
            keepalive_sent: 0,
            probe_due: false,
            sws_override: false,
            last_rx: now,
            tw_deadline: None,
            cwnd: mss * cfg.initial_window.max(1) as usize,
            ssthresh: usize::MAX / 2,
            ca_acked: 0,
            dupacks: 0,
            in_recovery: false,
            recover: iss,
            retx_next: None,
            high_rxt: iss,
            rtt: RttEstimator::new(cfg.rto_initial, cfg.rto_min, cfg.rto_max, 1000),
            rtt_probe: None,
            chal_start: now,
            chal_count: 0,
            rst_due: None,
            events: VecDeque::new(),
            stats: Stats::default(),
        }
    }

    /// An active open: the SYN is the first segment [`poll_transmit`]
    /// returns. `iss` should be unpredictable (RFC 6528).
    ///
    /// [`poll_transmit`]: Connection::poll_transmit
    pub fn connect(
        cfg: Config,
        now: Instant,
        local_port: u16,
        remote_port: u16,
        iss: u32,
    ) -> Connection {
        Connection::new(cfg, now, local_port, remote_port, iss)
    }

    /// A passive open: a listener got `syn`. None when `syn` is not a
    /// plain SYN (the caller answers it with [`reply_to_stray`]).
    pub fn accept(cfg: Config, now: Instant, syn: &Repr, iss: u32) -> Option<Connection> {
        if syn.flags & (Flags::SYN | Flags::ACK | Flags::RST) != Flags::SYN {
            return None;
        }
        let mut c = Connection::new(cfg, now, syn.dst_port, syn.src_port, iss);
        c.passive = true;
        c.take_syn_options(syn);
        c.irs = syn.seq_number;
        c.rcv_nxt = syn.seq_number.wrapping_add(1);
        c.snd_wnd = usize::from(syn.window_len);
        c.max_snd_wnd = c.snd_wnd;
        c.snd_wl1 = syn.seq_number;
        c.state = State::SynReceived;
        c.arm_rtx(now);
        Some(c)
    }

    fn take_syn_options(&mut self, syn: &Repr) {
        if let Some(m) = syn.mss {
            self.peer_mss = usize::from(m.clamp(64, self.cfg.mss.max(64)));
        } else {
            self.peer_mss = self.peer_mss.min(usize::from(self.cfg.mss.max(64)));
        }
        match (self.cfg.window_scaling, syn.window_scale) {
            (true, Some(s)) => {
                self.snd_wscale = s.min(MAX_WSCALE);
                self.ws_enabled = true;
            }
            _ => {
                self.snd_wscale = 0;
                self.rcv_wscale = 0;
                self.ws_enabled = false;
            }
        }
        self.ts_enabled = self.cfg.timestamps && syn.timestamp.is_some();
        if let Some((tsval, _)) = syn.timestamp {
            self.ts_recent = tsval;
        }
        self.sack_enabled = self.cfg.sack && syn.sack_permitted;
    }

    // ----- Accessors -----

    pub fn state(&self) -> State {
        self.state
    }
    pub fn local_port(&self) -> u16 {
        self.local_port
    }
    pub fn remote_port(&self) -> u16 {
        self.remote_port
    }
    pub fn stats(&self) -> &Stats {
        &self.stats
    }
    pub fn cwnd(&self) -> usize {
        self.cwnd
    }
    pub fn ssthresh(&self) -> usize {
        self.ssthresh
    }
    pub fn rto(&self) -> u64 {
        self.rtt.rto()
    }
    pub fn srtt(&self) -> Option<u64> {
        self.rtt.srtt()
    }
    /// The peer's window in bytes, scaled.
    pub fn send_window(&self) -> usize {
        self.snd_wnd
    }
    /// Payload bytes per segment with the options every segment carries.
    pub fn send_mss(&self) -> usize {
        let opts = if self.ts_enabled { 12 } else { 0 };
        self.peer_mss.saturating_sub(opts).max(1)
    }
    pub fn timestamps(&self) -> bool {
        self.ts_enabled
    }
    pub fn sack(&self) -> bool {
        self.sack_enabled
    }
    pub fn window_shifts(&self) -> (u8, u8) {
        (self.snd_wscale, self.rcv_wscale)
    }
    pub fn in_recovery(&self) -> bool {
        self.in_recovery
    }
    /// Bytes sent and not yet acknowledged.
    pub fn bytes_in_flight(&self) -> usize {
        seq::dist(self.snd_una, self.snd_max)
    }
    /// Bytes the application may still queue.
    pub fn send_space(&self) -> usize {
        if self.may_send() {
            self.cfg.send_buffer.saturating_sub(self.tx.len())
        } else {
            0
        }
    }
    /// Bytes queued and not yet acknowledged.
    pub fn send_queued(&self) -> usize {
        self.tx.len()
    }
    pub fn recv_available(&self) -> usize {
        self.rx.len()
    }
    /// No more data will arrive (FIN seen, or the connection is gone) and
    /// the receive buffer is empty.
    pub fn recv_finished(&self) -> bool {
        self.rx.is_empty() && (self.fin_received || self.state == State::Closed)
    }
    /// The peer's FIN arrived.
    pub fn fin_received(&self) -> bool {
        self.fin_received
    }
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }
    /// The application may queue data.
    pub fn may_send(&self) -> bool {
        !self.fin_queued
            && matches!(
                self.state,
                State::SynSent | State::SynReceived | State::Established | State::CloseWait
            )
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn event(&mut self, e: Event) {
        if self.events.back() == Some(&e) {
            return;
        }
        if self.events.len() >= MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(e);
    }

    // ----- Application side -----

    /// Queues data; returns how much fit.
    pub fn send(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.send_space());
        self.tx.extend(&data[..n]);
        n
    }

    /// Moves received in-order data into `buf`.
    pub fn recv(&mut self, buf: &mut [u8]) -> usize {
        let n = buf.len().min(self.rx.len());
        let (a, b) = self.rx.as_slices();
        let na = n.min(a.len());
        buf[..na].copy_from_slice(&a[..na]);
        buf[na..n].copy_from_slice(&b[..n - na]);
        self.rx.drain(..n);
        self.after_read();
        n
    }

    /// Drops up to `n` received bytes without copying them.
    pub fn consume(&mut self, n: usize) -> usize {
        let n = n.min(self.rx.len());
        self.rx.drain(..n);
        self.after_read();
        n
    }

    /// Sends a window update when reading opened the window by at least
    /// two segments (RFC 9293, 3.8.6.2.2).
    fn after_read(&mut self) {
        if !self.state.is_synchronized() || self.fin_received {
            return;
        }
        let edge = self.rcv_nxt.wrapping_add(self.rcv_window() as u32);
        if seq::gt(edge, self.rcv_adv)
            && seq::dist(self.rcv_adv, edge) >= 2 * usize::from(self.cfg.mss)
        {
            let adv_left = seq::dist(self.rcv_nxt, self.rcv_adv);
            if adv_left < self.cfg.recv_buffer / 2 {
                self.ack_now = true;
            }
        }
    }

    /// Closes our direction: a FIN follows the queued data.
    pub fn close(&mut self) {
        match self.state {
            State::SynSent => self.enter_closed(None),
            State::SynReceived | State::Established => {
                self.fin_queued = true;
                self.state = State::FinWait1;
            }
            State::CloseWait => {
                self.fin_queued = true;
                self.state = State::LastAck;
            }
            _ => {}
        }
    }

    /// Resets the connection: a RST goes out and the state is CLOSED.
    /// Its sequence number is the highest sent: after a retransmission
    /// timeout SND.NXT is back at SND.UNA while the peer may hold more,
    /// and a RST left of the peer's window is dropped without a word
    /// (RFC 5961, 3.2 takes only RCV.NXT exactly).
    pub fn abort(&mut self) {
        if self.state.is_synchronized() || self.state == State::SynReceived {
            self.reset_with_seq(seq::max(self.snd_nxt, self.snd_max));
        }
        self.enter_closed(None);
    }

    /// Queues a bare RST with sequence number `seq`.
    fn reset_with_seq(&mut self, seq: u32) {
        let mut r = bare(self.local_port, self.remote_port);
        r.seq_number = seq;
        r.flags = Flags::RST;
        self.rst_due = Some(r);
    }

    fn enter_closed(&mut self, e: Option<Event>) {
        self.state = State::Closed;
        self.rtx_deadline = None;
        self.ack_deadline = None;
        self.persist_deadline = None;
        self.keepalive_deadline = None;
        self.tw_deadline = None;
        self.ack_now = false;
        self.probe_due = false;
        self.syn_due = false;
        self.retx_next = None;
        if let Some(e) = e {
            self.event(e);
        }
    }

    // ----- Helpers -----

    fn ts_now(&self, now: Instant) -> u32 {
        ((now.0 / 1000) as u32).wrapping_add(self.ts_offset)
    }

    /// The TSval for a segment sent at `now`: the clock, or the last one
    /// sent if that is later.
    fn ts_val(&mut self, now: Instant) -> u32 {
        self.ts_sent = seq::max(self.ts_sent, self.ts_now(now));
        self.ts_sent
    }

    fn rcv_window(&self) -> usize {
        self.cfg.recv_buffer.saturating_sub(self.rx.len())
    }

    /// Where the FIN sits (or will) in sequence space.
    fn fin_seq(&self) -> u32 {
        self.tx_seq.wrapping_add(self.tx.len() as u32)
    }

    fn fin_sent(&self) -> bool {
        self.fin_queued && seq::gt(self.snd_max, self.fin_seq())
    }

    fn arm_rtx(&mut self, now: Instant) {
        let rto = self
            .rtt
            .rto()
            .saturating_mul(u64::from(self.backoff))
            .min(self.cfg.rto_max);
        self.rtx_deadline = Some(now.add_micros(rto));
    }

    fn challenge_ack(&mut self, now: Instant) {
        if now.micros_since(self.chal_start) >= 1_000_000 {
            self.chal_start = now;
            self.chal_count = 0;
        }
        if self.chal_count < self.cfg.challenge_ack_limit {
            self.chal_count += 1;
            self.stats.challenge_acks += 1;
            self.ack_now = true;
        }
    }

    /// Bytes in [snd_una, snd_nxt) the peer has not SACKed.
    fn pipe(&self) -> usize {
        let flight = seq::dist(self.snd_una, self.snd_nxt);
        let sacked: usize = self
            .sacked
            .iter()
            .filter(|(a, _)| seq::lt(*a, self.snd_nxt))
            .map(|&(a, b)| {
                seq::dist(
                    a,
                    if seq::lt(b, self.snd_nxt) {
                        b
                    } else {
                        self.snd_nxt
                    },
                )
            })
            .sum();
        flight.saturating_sub(sacked)
    }

    fn mss(&self) -> usize {
        self.send_mss()
    }

    // ----- Input -----

    /// Processes one segment addressed to this connection. `payload` is
    /// the segment's data (`seg.payload_len` is not used).
    pub fn on_segment(&mut self, now: Instant, seg: &Repr, payload: &[u8]) {
        self.stats.segs_in += 1;
        match self.state {
            State::Closed => {}
            State::SynSent => self.on_syn_sent(now, seg, payload),
            _ => self.on_synchronized(now, seg, payload),
        }
        self.update_timers(now);
    }

    fn on_syn_sent(&mut self, now: Instant, seg: &Repr, payload: &[u8]) {
        let f = seg.flags;
        if f.contains(Flags::ACK)
            && (seq::le(seg.ack_number, self.iss) || seq::gt(seg.ack_number, self.snd_max))
        {
            if !f.contains(Flags::RST) {
                self.reset_with_seq(seg.ack_number);
            }
            self.stats.dropped += 1;
            return;
        }
        if f.contains(Flags::RST) {
            // Only with an acceptable ACK (RFC 5961, 3.2 keeps this rule).
            if f.contains(Flags::ACK) {
                self.enter_closed(Some(Event::Reset));
            } else {
                self.stats.dropped += 1;
            }
            return;
        }
        if !f.contains(Flags::SYN) {
            self.stats.dropped += 1;
            return;
        }
        self.take_syn_options(seg);
        self.irs = seg.seq_number;
        self.rcv_nxt = seg.seq_number.wrapping_add(1);
        self.last_rx = now;
        if f.contains(Flags::ACK) {
            self.snd_una = seg.ack_number;
            self.snd_nxt = seq::max(self.snd_nxt, self.snd_una);
            self.syn_due = false;
            self.snd_wnd = usize::from(seg.window_len) << self.snd_wscale;
            self.max_snd_wnd = self.snd_wnd;
            self.snd_wl1 = seg.seq_number;
            self.snd_wl2 = seg.ack_number;
            self.syn_rtt(now, seg);
            self.state = State::Established;
            self.rtx_deadline = None;
            self.retries = 0;
            self.backoff = 1;
            self.ack_now = true;
            self.event(Event::Connected);
            if !payload.is_empty() || f.contains(Flags::FIN) {
                // Data on a SYN-ACK: accepted like any other segment.
                let mut rest = *seg;
                rest.seq_number = self.rcv_nxt;
                rest.flags -= Flags::SYN;
                self.receive_text(now, &rest, payload);
            }
        } else {
            // Simultaneous open (RFC 9293, figure 8).
            self.snd_wnd = usize::from(seg.window_len);
            self.max_snd_wnd = self.snd_wnd;
            self.snd_wl1 = seg.seq_number;
            self.state = State::SynReceived;
            self.syn_due = true;
            self.snd_nxt = self.iss;
        }
    }

    fn syn_rtt(&mut self, now: Instant, seg: &Repr) {
        if self.retries > 0 {
            return;
        }
        if let (true, Some((_, ecr))) = (self.ts_enabled, seg.timestamp) {
            let ms = self.ts_now(now).wrapping_sub(ecr);
            if ms < 60_000 {
                self.rtt.sample(u64::from(ms) * 1000 + 500);
                return;
            }
        }
        if let Some((_, t)) = self.rtt_probe.take() {
            self.rtt.sample(now.micros_since(t));
        }
    }

    fn on_synchronized(&mut self, now: Instant, seg: &Repr, payload: &[u8]) {
        let mut seg = *seg;
        let s = seg.seq_number;
        if self.state == State::SynReceived && seg.flags.contains(Flags::SYN) && s == self.irs {
            if seg.flags.contains(Flags::ACK) {
                // Simultaneous open: the peer's SYN-ACK; its SYN is known.
                seg.flags -= Flags::SYN;
                seg.seq_number = self.rcv_nxt;
            } else {
                // Our SYN-ACK was lost: send it again.
                self.syn_due = true;
                self.snd_nxt = self.iss;
                return;
            }
        }
        let f = seg.flags;
        let s = seg.seq_number;
        let len = payload.len()
            + usize::from(f.contains(Flags::SYN))
            + usize::from(f.contains(Flags::FIN));
        let wnd = self.rcv_window();

        // PAWS (RFC 7323, 5.3).
        if self.ts_enabled && !f.contains(Flags::RST) {
            if let Some((tsval, _)) = seg.timestamp {
                if seq::lt(tsval, self.ts_recent) {
                    self.stats.dropped += 1;
                    self.ack_now = true;
                    return;
                }
            }
        }

        // Sequence check (RFC 9293, 3.10.7.4, first).
        let in_wnd =
            |x: u32| seq::le(self.rcv_nxt, x) && seq::lt(x, self.rcv_nxt.wrapping_add(wnd as u32));
        let acceptable = match (len, wnd) {
            (0, 0) => s == self.rcv_nxt,
            (0, _) => in_wnd(s),
            (_, 0) => false,
            (l, _) => in_wnd(s) || in_wnd(s.wrapping_add(l as u32 - 1)),
        };
        let mut data = payload;
        if !acceptable {
            if f.contains(Flags::RST) {
                self.stats.dropped += 1;
                return;
            }
            // A zero window still takes ACKs and RSTs at RCV.NXT.
            if wnd == 0 && s == self.rcv_nxt {
                data = &[];
                seg.flags -= Flags::FIN | Flags::SYN;
                self.ack_now = true;
            } else {
                self.stats.dropped += 1;
                self.ack_now = true;
                // A retransmitted FIN in TIME-WAIT restarts the timer.
                if self.state == State::TimeWait && f.contains(Flags::FIN) {
                    self.tw_deadline = Some(now.add_micros(2 * self.cfg.msl));
                }
                return;
            }
        }

        // RST (RFC 5961, 3.2).
        if f.contains(Flags::RST) {
            if s == self.rcv_nxt {
                if self.state == State::SynReceived && self.passive {
                    self.enter_closed(None);
                } else if matches!(
                    self.state,
                    State::Closing | State::LastAck | State::TimeWait
                ) {
                    self.enter_closed(Some(Event::Closed));
                } else {
                    self.enter_closed(Some(Event::Reset));
                }
            } else {
                self.challenge_ack(now);
            }
            return;
        }

        // SYN in a synchronized state (RFC 5961, 4.2).
        if f.contains(Flags::SYN) {
            self.challenge_ack(now);
            return;
        }

        if !f.contains(Flags::ACK) {
            self.stats.dropped += 1;
            return;
        }

        self.last_rx = now;
        self.keepalive_sent = 0;

        // Timestamps: remember the peer's clock (RFC 7323, 4.3).
        if let (true, Some((tsval, _))) = (self.ts_enabled, seg.timestamp) {
            if seq::le(s, self.last_ack_sent) {
                self.ts_recent = tsval;
            }
        }

        if self.state == State::SynReceived {
            if seq::lt(self.snd_una, seg.ack_number) && seq::le(seg.ack_number, self.snd_max) {
                self.state = State::Established;
                self.snd_wnd = usize::from(seg.window_len) << self.snd_wscale;
                self.max_snd_wnd = self.snd_wnd;
                self.snd_wl1 = s;
                self.snd_wl2 = seg.ack_number;
                self.syn_rtt(now, &seg);
                self.syn_due = false;
                self.retries = 0;
                self.backoff = 1;
                self.event(Event::Connected);
            } else {
                self.reset_with_seq(seg.ack_number);
                self.stats.dropped += 1;
                return;
            }
        }

        if !self.on_ack(now, &seg, data.is_empty() && !f.contains(Flags::FIN)) {
            return;
        }

        match self.state {
            State::FinWait1 if self.fin_sent() && self.snd_una == self.snd_max => {
                self.state = State::FinWait2;
            }
            State::Closing if self.fin_sent() && self.snd_una == self.snd_max => {
                self.enter_time_wait(now);
            }
            State::LastAck if self.fin_sent() && self.snd_una == self.snd_max => {
                self.enter_closed(Some(Event::Closed));
                return;
            }
            State::TimeWait => {
                if f.contains(Flags::FIN) {
                    self.ack_now = true;
                    self.tw_deadline = Some(now.add_micros(2 * self.cfg.msl));
                }
                return;
            }
            _ => {}
        }

        if matches!(
            self.state,
            State::Established | State::FinWait1 | State::FinWait2
        ) {
            self.receive_text(now, &seg, data);
        } else if !data.is_empty() {
            // Data after the peer's FIN: nothing to do with it.
            self.stats.dropped += 1;
            self.ack_now = true;
        }
    }

    /// ACK processing; false when the segment is to be dropped.
    fn on_ack(&mut self, now: Instant, seg: &Repr, pure: bool) -> bool {
        let ack = seg.ack_number;
        // RFC 5961, 5.2: SND.UNA - MAX.SND.WND <= SEG.ACK <= SND.NXT.
        let floor = self.snd_una.wrapping_sub(self.max_snd_wnd as u32);
        if seq::gt(ack, self.snd_max) || seq::lt(ack, floor) {
            self.stats.dropped += 1;
            self.challenge_ack(now);
            return false;
        }
        let new_wnd = usize::from(seg.window_len) << self.snd_wscale;
        if self.sack_enabled {
            self.take_sack(seg);
        }
        if seq::gt(ack, self.snd_una) {
            self.ack_advanced(now, seg, ack);
        } else if ack == self.snd_una
            && pure
            && new_wnd == self.snd_wnd
            && self.snd_una != self.snd_max
        {
            self.dup_ack();
        }
        // Window update (RFC 9293, 3.10.7.4, fifth).
        if seq::lt(self.snd_wl1, seg.seq_number)
            || (self.snd_wl1 == seg.seq_number && seq::le(self.snd_wl2, ack))
        {
            if new_wnd > self.snd_wnd {
                self.persist_deadline = None;
            }
            self.snd_wnd = new_wnd;
            self.max_snd_wnd = self.max_snd_wnd.max(new_wnd);
            self.snd_wl1 = seg.seq_number;
            self.snd_wl2 = ack;
        }
        true
    }

    fn take_sack(&mut self, seg: &Repr) {
        for &(l, r) in seg.sack_ranges.iter().flatten() {
            if !seq::lt(l, r) || !seq::gt(r, self.snd_una) || seq::gt(r, self.snd_max) {
                continue;
            }
            let l = seq::max(l, self.snd_una);
            self.sacked.push((l, r));
        }
        self.sacked.sort_by(|a, b| {
            let (x, y) = (seq::dist(self.snd_una, a.0), seq::dist(self.snd_una, b.0));
            x.cmp(&y)
        });
        let mut merged: Vec<(u32, u32)> = Vec::with_capacity(self.sacked.len());
        for &(a, b) in &self.sacked {
            match merged.last_mut() {
                Some(m) if seq::le(a, m.1) => m.1 = seq::max(m.1, b),
                _ => merged.push((a, b)),
            }
        }
        merged.truncate(64);
        self.sacked = merged;
    }

    fn ack_advanced(&mut self, now: Instant, seg: &Repr, ack: u32) {
        let acked = seq::dist(self.snd_una, ack);
        // Drop acknowledged data (the SYN and FIN take no buffer space).
        let data_acked = if seq::gt(ack, self.tx_seq) {
            seq::dist(self.tx_seq, ack).min(self.tx.len())
        } else {
            0
        };
        if data_acked > 0 {
            self.tx.drain(..data_acked);
            self.tx_seq = self.tx_seq.wrapping_add(data_acked as u32);
            self.event(Event::Writable);
        }
        self.snd_una = ack;
        if seq::lt(self.snd_nxt, ack) {
            self.snd_nxt = ack;
        }
        self.sacked.retain(|&(_, b)| seq::gt(b, ack));
        if let Some((a, _)) = self.sacked.first_mut() {
            if seq::lt(*a, ack) {
                *a = ack;
            }
        }
        if let Some(r) = self.retx_next {
            if seq::lt(r, ack) {
                self.retx_next = None;
            }
        }

        // RTT (RFC 7323 4.1 with timestamps; else one timed segment, Karn).
        let mut sampled = false;
        if let (true, Some((_, ecr))) = (self.ts_enabled, seg.timestamp) {
            if ecr != 0 {
                let ms = self.ts_now(now).wrapping_sub(ecr);
                if ms < 60_000 {
                    self.rtt.sample(u64::from(ms) * 1000 + 500);
                    sampled = true;
                }
            }
        }
        if !sampled {
            if let Some((s, t)) = self.rtt_probe {
                if seq::ge(ack, s) {
                    self.rtt.sample(now.micros_since(t));
                    self.rtt_probe = None;
                    sampled = true;
                }
            }
        }
        if sampled {
            self.backoff = 1;
        }
        self.retries = 0;

        // Congestion control.
        let mss = self.mss();
        if self.in_recovery {
            if seq::ge(ack, self.recover) {
                // Full acknowledgment (RFC 6582, 3.2 step 3).
                self.cwnd = self.ssthresh.min(self.pipe().max(mss) + mss);
                self.in_recovery = false;
                self.dupacks = 0;
            } else {
                // Partial acknowledgment: the next hole goes out now,
                // unless SACK already had it sent again.
                if seq::ge(ack, self.high_rxt) {
                    self.retx_next = Some(ack);
                } else {
                    self.next_hole();
                }
                self.cwnd = self.cwnd.saturating_sub(acked) + mss;
                self.cwnd = self.cwnd.max(mss);
                self.arm_rtx(now);
            }
        } else {
            self.dupacks = 0;
            if self.cwnd < self.ssthresh {
                self.cwnd += acked;
            } else {
                self.ca_acked += acked;
                if self.ca_acked >= self.cwnd {
                    self.ca_acked -= self.cwnd;
                    self.cwnd += mss;
                }
            }
            self.cwnd = self.cwnd.min(1 << 30);
        }

        if self.snd_una == self.snd_max {
            self.rtx_deadline = None;
        } else {
            self.arm_rtx(now);
        }
    }

    fn dup_ack(&mut self) {
        self.stats.dup_acks += 1;
        self.dupacks += 1;
        let mss = self.mss();
        if self.in_recovery {
            self.cwnd += mss;
            self.next_hole();
        } else if self.dupacks == 3 && seq::ge(self.snd_una, self.recover) {
            // Fast retransmit (RFC 6582, 3.2 step 2).
            let flight = seq::dist(self.snd_una, self.snd_max);
            self.ssthresh = (flight / 2).max(2 * mss);
            self.cwnd = self.ssthresh + 3 * mss;
            self.recover = self.snd_max;
            self.in_recovery = true;
            self.high_rxt = self.snd_una;
            self.retx_next = Some(self.snd_una);
            self.stats.fast_retransmits += 1;
        }
    }

    /// With SACK, the next unSACKed range below the highest SACKed byte
    /// goes out while the congestion window allows.
    fn next_hole(&mut self) {
        if self.retx_next.is_some() || self.sacked.is_empty() || self.pipe() >= self.cwnd {
            return;
        }
        let mut s = seq::max(self.high_rxt, self.snd_una);
        for &(a, b) in &self.sacked {
            if seq::lt(s, a) {
                self.retx_next = Some(s);
                return;
            }
            s = seq::max(s, b);
        }
    }

    fn receive_text(&mut self, now: Instant, seg: &Repr, data: &[u8]) {
        let mut s = seg.seq_number;
        let mut data = data;
        let mut fin = seg.flags.contains(Flags::FIN);
        // Trim what we already have.
        if seq::lt(s, self.rcv_nxt) {
            let skip = seq::dist(s, self.rcv_nxt);
            if skip > data.len() {
                // Everything, FIN included, is a duplicate.
                fin = false;
                data = &[];
                s = self.rcv_nxt;
            } else {
                data = &data[skip..];
                s = self.rcv_nxt;
            }
        }
        // Trim to the window.
        let wnd = self.rcv_window();
        let room = wnd.saturating_sub(seq::dist(self.rcv_nxt, s));
        if data.len() > room {
            data = &data[..room];
            fin = false;
        }
        if self.fin_received {
            if fin || !data.is_empty() {
                self.ack_now = true;
            }
            return;
        }
        let end = s.wrapping_add(data.len() as u32);
        if let Some(f) = self.rcv_fin {
            // The stream ends at the FIN already known: a FIN elsewhere
            // is ignored, bytes at or past it are no part of the stream.
            if fin && end != f {
                fin = false;
            }
            if seq::gt(end, f) {
                let keep = if seq::gt(f, s) { seq::dist(s, f) } else { 0 };
                data = &data[..keep];
                self.stats.dropped += 1;
                self.ack_now = true;
            }
        } else if fin && s == self.rcv_nxt {
            self.learn_fin(end);
        }
        if s == self.rcv_nxt {
            let gap_filled = !self.asm.is_empty();
            if !data.is_empty() {
                self.rx.extend(data);
                self.rcv_nxt = self.rcv_nxt.wrapping_add(data.len() as u32);
                let rx = &mut self.rx;
                let n = self.asm.pop_ready(self.rcv_nxt, &mut |d| rx.extend(d));
                self.rcv_nxt = self.rcv_nxt.wrapping_add(n as u32);
                self.stats.bytes_in += (data.len() + n) as u64;
                self.event(Event::Readable);
            }
            if self.rcv_fin == Some(self.rcv_nxt) {
                self.receive_fin(now);
                return;
            }
            if gap_filled {
                self.ack_now = true;
            } else if !data.is_empty() {
                self.unacked_segs += data.len().div_ceil(usize::from(self.cfg.mss).max(1));
                if self.unacked_segs >= 2 {
                    self.ack_now = true;
                } else if self.ack_deadline.is_none() {
                    self.ack_deadline = Some(now.add_micros(self.cfg.delayed_ack));
                }
            }
        } else if !data.is_empty() || fin {
            // Out of order: hold it and say so at once (RFC 5681, 4.2).
            self.stats.ooo_segments += 1;
            if !self.asm.insert(self.rcv_nxt, s, data) {
                self.stats.ooo_dropped += 1;
            } else if fin && self.rcv_fin.is_none() {
                self.learn_fin(end);
            }
            self.ack_now = true;
        }
    }

    /// Records where the peer's FIN sits (above RCV.NXT or at the end of
    /// the segment being taken); out-of-order data held past it is no
    /// part of the stream.
    fn learn_fin(&mut self, at: u32) {
        self.rcv_fin = Some(at);
        self.asm.truncate(self.rcv_nxt, at);
    }

    fn receive_fin(&mut self, now: Instant) {
        self.rcv_nxt = self.rcv_nxt.wrapping_add(1);
        self.fin_received = true;
        self.asm.clear();
        self.ack_now = true;
        self.event(Event::PeerClosed);
        match self.state {
            State::SynReceived | State::Established => self.state = State::CloseWait,
            State::FinWait1 => {
                if self.fin_sent() && self.snd_una == self.snd_max {
                    self.enter_time_wait(now);
                } else {
                    self.state = State::Closing;
                }
            }
            State::FinWait2 => self.enter_time_wait(now),
            _ => {}
        }
    }

    fn enter_time_wait(&mut self, now: Instant) {
        self.state = State::TimeWait;
        self.rtx_deadline = None;
        self.persist_deadline = None;
        self.keepalive_deadline = None;
        self.tw_deadline = Some(now.add_micros(2 * self.cfg.msl));
    }

    // ----- Timers -----

    /// The earliest deadline at which [`Connection::on_timer`] has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        [
            self.rtx_deadline,
            self.ack_deadline,
            self.persist_deadline,
            self.keepalive_deadline,
            self.tw_deadline,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Runs every timer that expired at `now`.
    pub fn on_timer(&mut self, now: Instant) {
        let due = |d: Option<Instant>| d.is_some_and(|d| d <= now);
        if due(self.tw_deadline) {
            self.enter_closed(Some(Event::Closed));
            return;
        }
        if due(self.ack_deadline) {
            self.ack_deadline = None;
            self.ack_now = true;
        }
        if due(self.rtx_deadline) {
            self.on_rto(now);
        }
        if due(self.persist_deadline) {
            self.persist_deadline = None;
            if self.snd_wnd == 0 {
                self.probe_due = true;
                self.stats.window_probes += 1;
                self.backoff = (self.backoff * 2).min(64);
            } else {
                // A small window held data back: send what fits.
                self.sws_override = true;
            }
        }
        if due(self.keepalive_deadline) {
            self.keepalive_deadline = None;
            if let Some(k) = self.cfg.keepalive {
                let idle_end = self.last_rx.add_micros(k.idle);
                if self.keepalive_sent == 0 && idle_end > now {
                    // Heard from the peer since the timer was set.
                    self.keepalive_deadline = Some(idle_end);
                } else if self.keepalive_sent >= k.probes {
                    self.enter_closed(Some(Event::TimedOut));
                    return;
                } else {
                    self.keepalive_sent += 1;
                    self.probe_due = true;
                    self.stats.keepalive_probes += 1;
                }
            }
        }
        self.update_timers(now);
    }

    fn on_rto(&mut self, now: Instant) {
        self.rtx_deadline = None;
        self.retries += 1;
        let limit = if self.state.is_synchronized() {
            self.cfg.max_retries
        } else {
            self.cfg.max_syn_retries
        };
        if self.retries > limit {
            self.enter_closed(Some(Event::TimedOut));
            return;
        }
        self.stats.timeouts += 1;
        self.backoff = (self.backoff * 2).min(64);
        self.rtt_probe = None;
        if !self.state.is_synchronized() {
            self.syn_due = true;
            self.snd_nxt = self.iss;
        } else {
            // RFC 5681 (4) and go-back-N from SND.UNA.
            let mss = self.mss();
            let flight = seq::dist(self.snd_una, self.snd_max);
            self.ssthresh = (flight / 2).max(2 * mss);
            self.cwnd = mss;
            self.ca_acked = 0;
            self.snd_nxt = self.snd_una;
            self.sacked.clear();
            self.in_recovery = false;
            self.dupacks = 0;
            self.recover = self.snd_max;
            self.retx_next = None;
        }
        self.arm_rtx(now);
    }

    /// Arms or stops the persist and keepalive timers after a change.
    fn update_timers(&mut self, now: Instant) {
        if !self.state.is_synchronized() || self.state == State::TimeWait {
            self.persist_deadline = None;
            self.keepalive_deadline = None;
            return;
        }
        let unsent = seq::lt(self.snd_nxt, self.fin_seq());
        if unsent && self.snd_una == self.snd_max {
            // Nothing in flight yet data waits: the window is closed or
            // too small to use (RFC 9293 3.8.6.1 and 3.8.6.2.1).
            if self.persist_deadline.is_none() && self.rtx_deadline.is_none() {
                let t = self
                    .rtt
                    .rto()
                    .saturating_mul(u64::from(self.backoff))
                    .min(self.cfg.rto_max);
                self.persist_deadline = Some(now.add_micros(t));
            }
        } else {
            self.persist_deadline = None;
        }
        if let Some(k) = self.cfg.keepalive {
            if self.state == State::Established && self.keepalive_deadline.is_none() {
                let at = if self.keepalive_sent == 0 {
                    self.last_rx.add_micros(k.idle)
                } else {
                    now.add_micros(k.interval)
                };
                self.keepalive_deadline = Some(at.max(now));
            }
        }
    }

    // ----- Output -----

    /// The next segment to send, if any. `max_payload` bounds its data:
    /// the MSS without TSO, up to 64 KiB minus headers with it.
    pub fn poll_transmit(&mut self, now: Instant, max_payload: usize) -> Option<Segment<'_>> {
        if let Some(r) = self.rst_due.take() {
            self.stats.segs_out += 1;
            return Some(Segment {
                repr: r,
                payload: [&[], &[]],
                mss: self.send_mss(),
            });
        }
        match self.state {
            State::Closed => return None,
            State::SynSent | State::SynReceived if self.syn_due => return Some(self.emit_syn(now)),
            State::SynSent => return None,
            _ => {}
        }
        if self.state == State::SynReceived {
            // Nothing else goes out before the handshake completes.
            return None;
        }
        let (r, off, len) = if let Some(plan) = self.data_segment(now, max_payload) {
            plan
        } else if self.probe_due {
            self.probe_due = false;
            let mut r = self.header(now);
            r.seq_number = self.snd_una.wrapping_sub(1);
            (r, 0, 0)
        } else if self.ack_now {
            (self.header(now), 0, 0)
        } else {
            return None;
        };
        Some(self.finish(r, off, len))
    }

    fn emit_syn(&mut self, now: Instant) -> Segment<'_> {
        self.syn_due = false;
        let mut r = bare(self.local_port, self.remote_port);
        r.seq_number = self.iss;
        r.flags = Flags::SYN;
        r.window_len = self.rcv_window().min(MAX_WINDOW) as u16;
        r.mss = Some(self.cfg.mss);
        let answering = self.state == State::SynReceived;
        if self.cfg.window_scaling && (!answering || self.ws_enabled) {
            r.window_scale = Some(self.rcv_wscale);
        }
        if self.cfg.sack && (!answering || self.sack_enabled) {
            r.sack_permitted = true;
        }
        if self.cfg.timestamps && (!answering || self.ts_enabled) {
            r.timestamp = Some((self.ts_val(now), if answering { self.ts_recent } else { 0 }));
        }
        if answering {
            r.flags |= Flags::ACK;
            r.ack_number = self.rcv_nxt;
            self.last_ack_sent = self.rcv_nxt;
            self.rcv_adv = self.rcv_nxt.wrapping_add(u32::from(r.window_len));
        }
        if self.snd_max == self.iss {
            self.rtt_probe = Some((self.iss.wrapping_add(1), now));
        } else {
            self.stats.retransmits += 1;
        }
        self.snd_nxt = self.iss.wrapping_add(1);
        self.snd_max = seq::max(self.snd_max, self.snd_nxt);
        if self.rtx_deadline.is_none() {
            self.arm_rtx(now);
        }
        self.stats.segs_out += 1;
        Segment {
            repr: r,
            payload: [&[], &[]],
            mss: self.send_mss(),
        }
    }

    /// A header with ACK, window and options; seq = SND.NXT.
    fn header(&mut self, now: Instant) -> Repr {
        let mut r = bare(self.local_port, self.remote_port);
        r.seq_number = self.snd_nxt;
        r.ack_number = self.rcv_nxt;
        r.flags = Flags::ACK;
        let wnd = self.rcv_window();
        let field = (wnd >> self.rcv_wscale).min(MAX_WINDOW);
        r.window_len = field as u16;
        if self.ts_enabled {
            r.timestamp = Some((self.ts_val(now), self.ts_recent));
        }
        if self.sack_enabled && !self.asm.is_empty() {
            let max = if self.ts_enabled { 3 } else { MAX_SACK_BLOCKS };
            for (slot, b) in r.sack_ranges.iter_mut().zip(self.asm.sack_blocks(max)) {
                *slot = Some(b);
            }
        }
        r
    }

    /// Records that `r` with `len` data bytes from offset `off` of the
    /// send buffer goes out, and returns it.
    fn finish(&mut self, mut r: Repr, off: usize, len: usize) -> Segment<'_> {
        r.payload_len = len;
        self.ack_now = false;
        self.ack_deadline = None;
        self.unacked_segs = 0;
        self.last_ack_sent = self.rcv_nxt;
        let edge = self
            .rcv_nxt
            .wrapping_add((usize::from(r.window_len) << self.rcv_wscale) as u32);
        if seq::gt(edge, self.rcv_adv) || self.rcv_adv == 0 {
            self.rcv_adv = edge;
        }
        self.stats.segs_out += 1;
        self.stats.bytes_out += len as u64;
        let mss = (self.peer_mss + HEADER_LEN)
            .saturating_sub(r.header_len())
            .max(1);
        let (a, b) = self.tx.as_slices();
        let p0 = slice_at(a, off, len);
        let rest = len - p0.len();
        let off_b = off.saturating_sub(a.len());
        let p1 = slice_at(b, off_b, rest);
        Segment {
            repr: r,
            payload: [p0, p1],
            mss,
        }
    }

    fn data_segment(&mut self, now: Instant, max_payload: usize) -> Option<(Repr, usize, usize)> {
        if !matches!(
            self.state,
            State::Established
                | State::CloseWait
                | State::FinWait1
                | State::Closing
                | State::LastAck
        ) {
            return None;
        }
        let fin_seq = self.fin_seq();
        let mut r = self.header(now);
        let mss = (self.peer_mss + HEADER_LEN)
            .saturating_sub(r.header_len())
            .max(1);
        let max_payload = max_payload.max(1);

        // Retransmission of a hole first.
        if let Some(mut s) = self.retx_next.take() {
            for &(a, b) in &self.sacked {
                if seq::le(a, s) && seq::lt(s, b) {
                    s = b;
                }
            }
            if seq::lt(s, self.snd_max) && seq::ge(s, self.snd_una) {
                let mut end = self.snd_max;
                for &(a, _) in &self.sacked {
                    if seq::gt(a, s) {
                        end = if seq::lt(a, end) { a } else { end };
                        break;
                    }
                }
                let data_end = if seq::lt(fin_seq, end) { fin_seq } else { end };
                let len = seq::dist(s, data_end).min(mss).min(max_payload);
                let fin = self.fin_sent() && s.wrapping_add(len as u32) == fin_seq;
                if len > 0 || fin {
                    r.seq_number = s;
                    if fin {
                        r.flags |= Flags::FIN;
                    }
                    self.high_rxt = seq::max(self.high_rxt, s.wrapping_add(len as u32));
                    self.stats.retransmits += 1;
                    self.rtt_probe = None;
                    let off = seq::dist(self.tx_seq, s);
                    if self.rtx_deadline.is_none() {
                        self.arm_rtx(now);
                    }
                    return Some((r, off, len));
                }
            }
        }

        // New data (or go-back-N after a timeout) from SND.NXT.
        let off = if seq::ge(self.snd_nxt, self.tx_seq) {
            seq::dist(self.tx_seq, self.snd_nxt)
        } else {
            0
        };
        let unsent = self.tx.len().saturating_sub(off);
        let fin_pending = self.fin_queued && !seq::gt(self.snd_nxt, fin_seq);
        if unsent == 0 && !fin_pending {
            return None;
        }
        let wnd_end = self.snd_una.wrapping_add(self.snd_wnd as u32);
        let wnd_room = if seq::gt(wnd_end, self.snd_nxt) {
            seq::dist(self.snd_nxt, wnd_end)
        } else {
            0
        };
        let cwnd_room = self.cwnd.saturating_sub(self.pipe());
        let mut len = unsent.min(wnd_room).min(cwnd_room).min(max_payload);
        if len < unsent {
            // Sender-side silly window avoidance (RFC 9293, 3.8.6.2.1).
            let flight = seq::dist(self.snd_una, self.snd_nxt);
            let small_ok =
                len >= mss || (flight == 0 && (len >= self.max_snd_wnd / 2 || self.sws_override));
            if !small_ok {
                len = 0;
            }
            if len > mss && len < unsent {
                // Whole segments only when more data follows.
                len -= len % mss;
            }
        }
        let fin = fin_pending
            && len == unsent
            && (len > 0 || cwnd_room > 0 || self.snd_una == self.snd_nxt);
        if len == 0 && !fin {
            return None;
        }
        r.seq_number = self.snd_nxt;
        if fin {
            r.flags |= Flags::FIN;
        }
        if seq::lt(self.snd_nxt, self.snd_max) {
            self.stats.retransmits += len.div_ceil(mss).max(1) as u64;
        } else if self.rtt_probe.is_none() && !self.ts_enabled && len > 0 {
            self.rtt_probe = Some((self.snd_nxt.wrapping_add(len as u32), now));
        }
        self.snd_nxt = self.snd_nxt.wrapping_add(len as u32 + u32::from(fin));
        self.snd_max = seq::max(self.snd_max, self.snd_nxt);
        if self.rtx_deadline.is_none() {
            self.arm_rtx(now);
        }
        self.persist_deadline = None;
        self.sws_override = false;
        Some((r, off, len))
    }

    /// Checks the engine's own bookkeeping; used by tests and the fuzzer.
    pub fn check_invariants(&self) -> Result<(), &'static str> {
        if seq::gt(self.snd_una, self.snd_nxt) {
            return Err("snd_una after snd_nxt");
        }
        if seq::gt(self.snd_nxt, self.snd_max) {
            return Err("snd_nxt after snd_max");
        }
        if self.tx.len() > self.cfg.send_buffer {
            return Err("send buffer over its size");
        }
        if self.rx.len() > self.cfg.recv_buffer {
            return Err("receive buffer over its size");
        }
        if self.asm.bytes() > self.cfg.ooo_limit {
            return Err("out-of-order data over its limit");
        }
        if self.fin_received && !self.asm.is_empty() {
            return Err("out-of-order data held after the FIN");
        }
        if let (false, Some(f)) = (self.fin_received, self.rcv_fin) {
            if !seq::lt(self.rcv_nxt, f) {
                return Err("received up to the FIN without taking it");
            }
            if self.asm.end().is_some_and(|e| seq::gt(e, f)) {
                return Err("out-of-order data held past the FIN");
            }
        }
        if self.state.is_synchronized() && seq::gt(self.snd_una, self.fin_seq().wrapping_add(1)) {
            return Err("acknowledged beyond what was sent");
        }
        if self.cwnd == 0 {
            return Err("zero congestion window");
        }
        Ok(())
    }
}

/// `len` bytes of `s` from `off`, clipped to what is there.
fn slice_at(s: &[u8], off: usize, len: usize) -> &[u8] {
    let start = off.min(s.len());
    let end = start.saturating_add(len).min(s.len());
    &s[start..end]
}
