//! Behaviour tests: two engines joined by a simulated link with a delay,
//! and a filter that drops, holds back or lets segments pass.

use super::*;
use crate::wire::tcp::{Flags, Repr, MAX_SACK_BLOCKS};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    A,
    B,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Verdict {
    Pass,
    Drop,
    /// Delivered this much later than the link delay.
    Late(u64),
}

type Filter = Box<dyn FnMut(Side, &Repr, &[u8]) -> Verdict>;

struct Link {
    a: Connection,
    b: Connection,
    now: Instant,
    delay: u64,
    max_payload: usize,
    /// (deliver at, from, header, payload)
    wire: Vec<(Instant, Side, Repr, Vec<u8>)>,
    filter: Filter,
    /// Every segment sent, by sender.
    log: Vec<(Side, Repr)>,
    got_a: Vec<u8>,
    got_b: Vec<u8>,
    read: bool,
}

const T0: Instant = Instant(1_000_000);

fn cfg() -> Config {
    Config {
        msl: 1_000_000,
        ..Config::default()
    }
}

fn syn_of(c: &mut Connection, now: Instant) -> Repr {
    c.poll_transmit(now, 1460)
        .map(|s| s.repr)
        .unwrap_or_else(|| panic!("no SYN"))
}

impl Link {
    fn new(ca: Config, cb: Config) -> Link {
        let a = Connection::connect(ca, T0, 40000, 80, 1000);
        // B is made from A's SYN below; a placeholder until then.
        let b = Connection::connect(cb, T0, 80, 40000, 0);
        let mut l = Link {
            a,
            b,
            now: T0,
            delay: 1000,
            max_payload: 1460,
            wire: Vec::new(),
            filter: Box::new(|_, _, _| Verdict::Pass),
            log: Vec::new(),
            got_a: Vec::new(),
            got_b: Vec::new(),
            read: true,
        };
        let syn = syn_of(&mut l.a, T0);
        l.log.push((Side::A, syn));
        l.b = Connection::accept(cb, T0, &syn, 5_000_000).unwrap_or_else(|| panic!("accept"));
        l
    }

    fn established(ca: Config, cb: Config) -> Link {
        let mut l = Link::new(ca, cb);
        l.run_until(
            |l| l.a.state() == State::Established && l.b.state() == State::Established,
            5_000_000,
        );
        l
    }

    fn conn(&mut self, s: Side) -> &mut Connection {
        match s {
            Side::A => &mut self.a,
            Side::B => &mut self.b,
        }
    }

    /// Moves every segment either side has to the wire.
    fn transmit(&mut self) {
        for side in [Side::A, Side::B] {
            loop {
                let now = self.now;
                let mp = self.max_payload;
                let Some(seg) = self.conn(side).poll_transmit(now, mp) else {
                    break;
                };
                let mut data = seg.payload[0].to_vec();
                data.extend_from_slice(seg.payload[1]);
                assert_eq!(seg.repr.payload_len, data.len());
                assert!(data.len() <= mp, "segment over max_payload");
                let repr = seg.repr;
                self.log.push((side, repr));
                let at = match (self.filter)(side, &repr, &data) {
                    Verdict::Pass => self.now.add_micros(self.delay),
                    Verdict::Drop => continue,
                    Verdict::Late(x) => self.now.add_micros(self.delay + x),
                };
                self.wire.push((at, side, repr, data));
            }
        }
    }

    fn drain_reads(&mut self) {
        if !self.read {
            return;
        }
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = self.a.recv(&mut buf);
            self.got_a.extend_from_slice(&buf[..n]);
            let m = self.b.recv(&mut buf);
            self.got_b.extend_from_slice(&buf[..m]);
            if n == 0 && m == 0 {
                break;
            }
        }
    }

    /// Runs the link until `done` or `limit` microseconds pass.
    fn run_until(&mut self, done: impl Fn(&Link) -> bool, limit: u64) -> bool {
        let end = self.now.add_micros(limit);
        loop {
            self.transmit();
            self.check();
            if done(self) {
                return true;
            }
            let next_wire = self.wire.iter().map(|w| w.0).min();
            let next_timer = [self.a.poll_timeout(), self.b.poll_timeout()]
                .into_iter()
                .flatten()
                .min();
            let Some(next) = [next_wire, next_timer].into_iter().flatten().min() else {
                // Nothing will happen: time passes anyway.
                self.now = end;
                return done(self);
            };
            if next > end {
                self.now = end;
                return done(self);
            }
            self.now = next.max(self.now);
            // Deliver in order of arrival time, stable for equal times.
            let mut due: Vec<_> = Vec::new();
            let mut i = 0;
            while i < self.wire.len() {
                if self.wire[i].0 <= self.now {
                    due.push(self.wire.remove(i));
                } else {
                    i += 1;
                }
            }
            due.sort_by_key(|d| d.0);
            for (_, from, repr, data) in due {
                let now = self.now;
                let to = if from == Side::A { Side::B } else { Side::A };
                self.conn(to).on_segment(now, &repr, &data);
                // Each arrival gets its own answer, as on a real link.
                self.transmit();
            }
            let now = self.now;
            self.a.on_timer(now);
            self.b.on_timer(now);
            self.drain_reads();
        }
    }

    fn check(&self) {
        self.a
            .check_invariants()
            .unwrap_or_else(|e| panic!("A: {e}"));
        self.b
            .check_invariants()
            .unwrap_or_else(|e| panic!("B: {e}"));
    }

    /// Sends `data` from A, feeding the buffer as it drains; true when B
    /// read all of it.
    fn push_a_to_b(&mut self, data: &[u8], limit: u64) -> bool {
        let end = self.now.add_micros(limit);
        let mut off = 0;
        let want = self.got_b.len() + data.len();
        while self.now < end {
            off += self.a.send(&data[off..]);
            let target = off;
            let a_len = self.a.send_queued();
            self.run_until(
                |l| {
                    l.got_b.len() >= want
                        || (target < data.len() && l.a.send_queued() < a_len / 2 + 1)
                },
                end.micros_since(self.now),
            );
            if self.got_b.len() >= want {
                return true;
            }
            if off == data.len() && self.wire.is_empty() && self.a.poll_timeout().is_none() {
                return false;
            }
        }
        false
    }

    fn sent_by(&self, s: Side) -> impl Iterator<Item = &Repr> {
        self.log
            .iter()
            .filter(move |(x, _)| *x == s)
            .map(|(_, r)| r)
    }
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[test]
fn handshake_negotiates_options() {
    let l = Link::established(cfg(), cfg());
    assert!(l.a.timestamps() && l.b.timestamps());
    assert!(l.a.sack() && l.b.sack());
    // 4 MiB buffers need a shift of 7 on both sides.
    assert_eq!(l.a.window_shifts(), (7, 7));
    assert_eq!(l.b.window_shifts(), (7, 7));
    assert_eq!(l.a.send_mss(), 1460 - 12);
    let syn = l
        .sent_by(Side::A)
        .next()
        .copied()
        .unwrap_or_else(|| panic!("no syn"));
    assert_eq!(syn.flags, Flags::SYN);
    assert_eq!(syn.mss, Some(1460));
    let synack = l
        .sent_by(Side::B)
        .next()
        .copied()
        .unwrap_or_else(|| panic!("no syn-ack"));
    assert_eq!(synack.flags, Flags::SYN | Flags::ACK);
    assert_eq!(synack.ack_number, 1001);
}

#[test]
fn mss_is_the_smaller_and_defaults_without_option() {
    let cb = Config { mss: 1000, ..cfg() };
    let l = Link::established(cfg(), cb);
    assert_eq!(l.a.send_mss(), 1000 - 12);
    assert_eq!(l.b.send_mss(), 1000 - 12);

    // A SYN without options: 536 bytes, no scaling, no SACK, no stamps.
    let mut syn = syn_of(&mut Connection::connect(cfg(), T0, 1, 2, 7), T0);
    syn.mss = None;
    syn.window_scale = None;
    syn.sack_permitted = false;
    syn.timestamp = None;
    let mut b = Connection::accept(cfg(), T0, &syn, 99).unwrap_or_else(|| panic!("accept"));
    let synack = b
        .poll_transmit(T0, 1460)
        .map(|s| s.repr)
        .unwrap_or_else(|| panic!("synack"));
    assert_eq!(synack.window_scale, None);
    assert!(!synack.sack_permitted);
    assert_eq!(synack.timestamp, None);
    assert_eq!(b.send_mss(), 536);
}

#[test]
fn bulk_transfer_is_byte_exact_both_ways() {
    let mut l = Link::established(cfg(), cfg());
    let data = pattern(3 << 20);
    assert!(l.push_a_to_b(&data, 60_000_000));
    assert_eq!(l.got_b, data);
    // And back, with TSO-sized segments.
    l.max_payload = 64000;
    let back = pattern(1 << 20);
    let mut off = 0;
    while l.got_a.len() < back.len() {
        off += l.b.send(&back[off..]);
        l.run_until(|l| l.got_a.len() == back.len(), 1_000_000);
    }
    assert_eq!(l.got_a, back);
    assert!(
        l.sent_by(Side::B).any(|r| r.payload_len > 1448),
        "no super-segment went out"
    );
    assert_eq!(l.a.stats().retransmits, 0);
}

#[test]
fn window_scaling_opens_past_64k() {
    let mut l = Link::established(cfg(), cfg());
    l.delay = 20_000;
    let data = pattern(2 << 20);
    let mut peak = 0;
    let mut off = 0;
    let end = l.now.add_micros(30_000_000);
    while l.got_b.len() < data.len() && l.now < end {
        off += l.a.send(&data[off..]);
        l.run_until(|l| l.a.bytes_in_flight() > 0, 1000);
        peak = peak.max(l.a.bytes_in_flight());
        let t = l.now.add_micros(5000);
        l.run_until(|l| l.now >= t, 5000);
    }
    assert_eq!(l.got_b, data);
    assert!(peak > 65535, "flight never exceeded 64 KiB: {peak}");
    assert!(l.b.send_window() > 65535);
}

#[test]
fn simultaneous_open() {
    let mut a = Connection::connect(cfg(), T0, 1111, 2222, 100);
    let mut b = Connection::connect(cfg(), T0, 2222, 1111, 900);
    let sa = syn_of(&mut a, T0);
    let sb = syn_of(&mut b, T0);
    a.on_segment(T0, &sb, &[]);
    b.on_segment(T0, &sa, &[]);
    assert_eq!(a.state(), State::SynReceived);
    assert_eq!(b.state(), State::SynReceived);
    let ra = a
        .poll_transmit(T0, 1460)
        .map(|s| s.repr)
        .unwrap_or_else(|| panic!());
    let rb = b
        .poll_transmit(T0, 1460)
        .map(|s| s.repr)
        .unwrap_or_else(|| panic!());
    assert_eq!(ra.flags, Flags::SYN | Flags::ACK);
    assert_eq!((ra.seq_number, ra.ack_number), (100, 901));
    a.on_segment(T0, &rb, &[]);
    b.on_segment(T0, &ra, &[]);
    assert_eq!(a.state(), State::Established);
    assert_eq!(b.state(), State::Established);
    assert_eq!(a.poll_event(), Some(Event::Connected));
}

#[test]
fn simultaneous_close_goes_through_closing_and_time_wait() {
    let mut l = Link::established(cfg(), cfg());
    l.a.close();
    l.b.close();
    l.transmit();
    assert_eq!(l.a.state(), State::FinWait1);
    // Both FINs cross: each side sees a FIN before its own is acked.
    l.run_until(
        |l| l.a.state() == State::TimeWait && l.b.state() == State::TimeWait,
        100_000,
    );
    assert!(
        l.log
            .iter()
            .filter(|(_, r)| r.flags.contains(Flags::FIN))
            .count()
            >= 2
    );
    let before = l.now;
    l.run_until(|l| l.a.is_closed() && l.b.is_closed(), 10_000_000);
    assert!(l.a.is_closed() && l.b.is_closed());
    // TIME-WAIT lasted 2 MSL.
    assert!(l.now.micros_since(before) >= 2 * cfg().msl - 5000);
}

#[test]
fn orderly_close_and_time_wait_reacks_a_lost_ack() {
    let mut l = Link::established(cfg(), cfg());
    l.a.send(b"last words");
    l.a.close();
    l.run_until(
        |l| l.b.recv_finished() && l.a.state() == State::FinWait2,
        1_000_000,
    );
    assert_eq!(l.got_b, b"last words");
    assert_eq!(l.b.state(), State::CloseWait);
    assert_eq!(l.a.state(), State::FinWait2);
    // A's ACK of B's FIN is lost once: B sends its FIN again and A, in
    // TIME-WAIT, acknowledges it again.
    let mut dropped = false;
    l.filter = Box::new(move |side, r, _| {
        if side == Side::A && !dropped && r.flags == Flags::ACK {
            dropped = true;
            return Verdict::Drop;
        }
        Verdict::Pass
    });
    l.b.close();
    l.run_until(|l| l.b.is_closed(), 5_000_000);
    assert!(l.b.is_closed());
    assert_eq!(l.a.state(), State::TimeWait);
    let b_fins = l
        .sent_by(Side::B)
        .filter(|r| r.flags.contains(Flags::FIN))
        .count();
    assert_eq!(b_fins, 2, "B resent its FIN");
    l.run_until(|l| l.a.is_closed(), 5_000_000);
    let mut evs = Vec::new();
    while let Some(e) = l.a.poll_event() {
        evs.push(e);
    }
    assert!(evs.contains(&Event::Closed));
}

#[test]
fn rto_backs_off_and_gives_up() {
    let c = Config {
        max_retries: 3,
        ..cfg()
    };
    let mut l = Link::established(c, cfg());
    l.filter = Box::new(|side, _, _| {
        if side == Side::A {
            Verdict::Drop
        } else {
            Verdict::Pass
        }
    });
    l.a.send(b"x");
    let start = l.now;
    let mut times = Vec::new();
    let mut last = 0;
    while !l.a.is_closed() && l.now.micros_since(start) < 120_000_000 {
        l.run_until(|l| l.log.len() > last, 120_000_000);
        if l.log.len() > last {
            last = l.log.len();
            times.push(l.now.micros_since(start));
        } else {
            break;
        }
        l.run_until(|l| l.a.is_closed() || l.log.len() > last, 120_000_000);
        if l.a.is_closed() {
            break;
        }
        last = l.log.len() - 1;
    }
    let evs: Vec<_> = std::iter::from_fn(|| l.a.poll_event()).collect();
    assert!(evs.contains(&Event::TimedOut), "{evs:?}");
    assert_eq!(l.a.stats().timeouts, 3);
    assert_eq!(l.a.stats().retransmits, 3);
    // Intervals double (RFC 6298 (5.5)).
    let d: Vec<u64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(d.len() >= 3, "{times:?}");
    for w in d.windows(2) {
        let ratio = w[1] as f64 / w[0] as f64;
        assert!((1.9..2.1).contains(&ratio), "{d:?}");
    }
}

#[test]
fn one_loss_is_repaired_by_fast_retransmit() {
    let mut l = Link::established(cfg(), cfg());
    let mut n = 0;
    l.filter = Box::new(move |side, r, _| {
        if side == Side::A && r.payload_len > 0 {
            n += 1;
            if n == 20 {
                return Verdict::Drop;
            }
        }
        Verdict::Pass
    });
    let data = pattern(400_000);
    assert!(l.push_a_to_b(&data, 10_000_000));
    assert_eq!(l.got_b, data);
    let s = l.a.stats();
    assert_eq!(s.fast_retransmits, 1);
    assert_eq!(s.timeouts, 0);
    assert_eq!(s.retransmits, 1);
    assert!(s.dup_acks >= 3);
    assert!(l.b.stats().ooo_segments > 0);
}

#[test]
fn newreno_partial_acks_repair_several_losses_without_timeout() {
    let c = Config {
        sack: false,
        ..cfg()
    };
    let mut l = Link::established(c, c);
    let mut n = 0;
    l.filter = Box::new(move |side, r, _| {
        if side == Side::A && r.payload_len > 0 {
            n += 1;
            if n == 30 || n == 33 || n == 36 {
                return Verdict::Drop;
            }
        }
        Verdict::Pass
    });
    let data = pattern(400_000);
    assert!(l.push_a_to_b(&data, 10_000_000));
    assert_eq!(l.got_b, data);
    let s = l.a.stats();
    assert_eq!(s.fast_retransmits, 1, "one recovery episode: {s:?}");
    assert_eq!(s.timeouts, 0);
    assert_eq!(s.retransmits, 3);
}

#[test]
fn sack_blocks_are_sent_and_sacked_data_is_not_resent() {
    let mut l = Link::established(cfg(), cfg());
    let mut n = 0;
    l.filter = Box::new(move |side, r, _| {
        if side == Side::A && r.payload_len > 0 {
            n += 1;
            if n == 30 || n == 34 {
                return Verdict::Drop;
            }
        }
        Verdict::Pass
    });
    let data = pattern(400_000);
    assert!(l.push_a_to_b(&data, 10_000_000));
    assert_eq!(l.got_b, data);
    assert!(
        l.sent_by(Side::B).any(|r| r.sack_ranges[0].is_some()),
        "receiver never sent SACK blocks"
    );
    // Exactly the two holes went again.
    assert_eq!(l.a.stats().retransmits, 2);
    assert_eq!(l.a.stats().timeouts, 0);
}

#[test]
fn reordering_is_reassembled() {
    let mut l = Link::established(cfg(), cfg());
    let mut n = 0;
    l.filter = Box::new(move |side, r, _| {
        if side == Side::A && r.payload_len > 0 {
            n += 1;
            if n % 7 == 3 {
                return Verdict::Late(1500);
            }
        }
        Verdict::Pass
    });
    let data = pattern(300_000);
    assert!(l.push_a_to_b(&data, 10_000_000));
    assert_eq!(l.got_b, data);
    assert!(l.b.stats().ooo_segments > 0);
    // Bytes that waited in the reassembly queue count once they are in order.
    assert_eq!(l.b.stats().bytes_in, data.len() as u64);
}

#[test]
fn out_of_order_data_is_held_within_its_limit() {
    let cb = Config {
        ooo_limit: 2500,
        ..cfg()
    };
    let mut l = Link::established(cfg(), cb);
    let mut hdr = l
        .log
        .iter()
        .rev()
        .find(|(s, _)| *s == Side::A)
        .map(|(_, r)| *r)
        .unwrap_or_else(|| panic!());
    hdr.flags = Flags::ACK;
    let base = hdr.seq_number;
    let now = l.now;
    // Three 1000-byte segments after a 1000-byte hole: the third does
    // not fit.
    for (k, fill) in [(1u32, 1u8), (2, 2), (3, 3)] {
        let mut h = hdr;
        h.seq_number = base + 1000 * k;
        h.payload_len = 1000;
        l.b.on_segment(now, &h, &[fill; 1000]);
    }
    assert_eq!(l.b.stats().ooo_segments, 3);
    assert_eq!(l.b.stats().ooo_dropped, 1);
    assert_eq!(l.b.recv_available(), 0);
    let mut h = hdr;
    h.payload_len = 1000;
    l.b.on_segment(now, &h, &[0; 1000]);
    assert_eq!(l.b.recv_available(), 3000);
    let mut buf = vec![0u8; 3000];
    l.b.recv(&mut buf);
    assert!(buf[..1000].iter().all(|&x| x == 0));
    assert!(buf[1000..2000].iter().all(|&x| x == 1));
    assert!(buf[2000..].iter().all(|&x| x == 2));
}

#[test]
fn delayed_ack_waits_for_a_second_segment_or_the_timer() {
    let mut l = Link::established(cfg(), cfg());
    let b_sent = |l: &Link, mark: usize| l.log[mark..].iter().any(|(s, _)| *s == Side::B);
    // One small segment: the ACK waits for the 40 ms timer.
    let mark = l.log.len();
    l.a.send(&[1; 500]);
    l.transmit();
    let t_sent = l.now;
    l.run_until(|l| b_sent(l, mark), 1_000_000);
    let waited = l.now.micros_since(t_sent) - l.delay;
    assert_eq!(waited, cfg().delayed_ack, "ACK after {waited} us");

    // Two full segments: acknowledged as the second arrives.
    let mark = l.log.len();
    l.a.send(&pattern(2 * l.a.send_mss()));
    l.transmit();
    let t_sent = l.now;
    l.run_until(|l| b_sent(l, mark), 1_000_000);
    assert_eq!(l.now.micros_since(t_sent), l.delay);
    let acks = l.log[mark..].iter().filter(|(s, _)| *s == Side::B).count();
    assert_eq!(acks, 1);
}

#[test]
fn keepalive_probes_then_times_out() {
    let c = Config {
        keepalive: Some(Keepalive {
            idle: 2_000_000,
            interval: 500_000,
            probes: 3,
        }),
        ..cfg()
    };
    let mut l = Link::established(c, cfg());
    // B answers probes: the connection stays up.
    let t = l.now.add_micros(5_000_000);
    l.run_until(|l| l.now >= t, 5_000_000);
    assert!(l.a.stats().keepalive_probes >= 2);
    assert_eq!(l.a.state(), State::Established);
    let probe = l
        .sent_by(Side::A)
        .last()
        .copied()
        .unwrap_or_else(|| panic!());
    assert_eq!(probe.payload_len, 0);
    // The probe carries SND.UNA - 1 (RFC 9293, 3.8.4).
    assert_eq!(probe.seq_number, 1000u32.wrapping_add(1).wrapping_sub(1));
    // B goes silent: three probes, then the connection is dropped.
    l.filter = Box::new(|side, _, _| {
        if side == Side::B {
            Verdict::Drop
        } else {
            Verdict::Pass
        }
    });
    let before = l.a.stats().keepalive_probes;
    l.run_until(|l| l.a.is_closed(), 10_000_000);
    assert!(l.a.is_closed());
    assert_eq!(l.a.stats().keepalive_probes - before, 3);
    assert!(std::iter::from_fn(|| l.a.poll_event()).any(|e| e == Event::TimedOut));
}

/// A segment from B to A at A's current receive point.
fn from_b(l: &Link) -> Repr {
    let last_b = l
        .sent_by(Side::B)
        .last()
        .copied()
        .unwrap_or_else(|| panic!());
    let mut r = last_b;
    r.flags = Flags::ACK;
    r.sack_ranges = [None; MAX_SACK_BLOCKS];
    r.payload_len = 0;
    r
}

#[test]
fn rst_must_match_exactly_else_challenge_ack() {
    let mut l = Link::established(cfg(), cfg());
    let base = from_b(&l);
    let now = l.now;
    // In the window but not at RCV.NXT: challenge ACK, still open.
    let mut r = base;
    r.flags = Flags::RST;
    r.seq_number = base.seq_number.wrapping_add(100);
    l.a.on_segment(now, &r, &[]);
    assert_eq!(l.a.state(), State::Established);
    assert_eq!(l.a.stats().challenge_acks, 1);
    let ack =
        l.a.poll_transmit(now, 1460)
            .map(|s| s.repr)
            .unwrap_or_else(|| panic!("no challenge ack"));
    assert_eq!(ack.flags, Flags::ACK);
    assert_eq!(ack.ack_number, base.seq_number);
    // Outside the window: ignored.
    r.seq_number = base.seq_number.wrapping_add(1 << 30);
    l.a.on_segment(now, &r, &[]);
    assert_eq!(l.a.state(), State::Established);
    assert_eq!(l.a.stats().challenge_acks, 1);
    // Exactly RCV.NXT: reset.
    r.seq_number = base.seq_number;
    l.a.on_segment(now, &r, &[]);
    assert!(l.a.is_closed());
    assert!(std::iter::from_fn(|| l.a.poll_event()).any(|e| e == Event::Reset));
}

#[test]
fn syn_in_established_gets_a_challenge_ack() {
    let mut l = Link::established(cfg(), cfg());
    let mut r = from_b(&l);
    r.flags = Flags::SYN;
    r.seq_number = r.seq_number.wrapping_add(5);
    let now = l.now;
    l.a.on_segment(now, &r, &[]);
    assert_eq!(l.a.state(), State::Established);
    assert_eq!(l.a.stats().challenge_acks, 1);
}

#[test]
fn ack_of_unsent_data_is_dropped_with_an_ack() {
    let mut l = Link::established(cfg(), cfg());
    let mut r = from_b(&l);
    r.ack_number = r.ack_number.wrapping_add(10_000);
    let now = l.now;
    let before = l.a.bytes_in_flight();
    l.a.on_segment(now, &r, b"data");
    assert_eq!(l.a.bytes_in_flight(), before);
    assert_eq!(l.a.recv_available(), 0, "data of a bad segment taken");
    assert_eq!(l.a.stats().challenge_acks, 1);
}

#[test]
fn challenge_acks_are_rate_limited() {
    let c = Config {
        challenge_ack_limit: 5,
        ..cfg()
    };
    let mut l = Link::established(c, cfg());
    let mut r = from_b(&l);
    r.flags = Flags::RST;
    r.seq_number = r.seq_number.wrapping_add(10);
    let now = l.now;
    for _ in 0..50 {
        l.a.on_segment(now, &r, &[]);
    }
    assert_eq!(l.a.stats().challenge_acks, 5);
}

#[test]
fn paws_drops_old_timestamps() {
    let mut l = Link::established(cfg(), cfg());
    let mut r = from_b(&l);
    let (tsval, tsecr) = r.timestamp.unwrap_or_else(|| panic!());
    r.timestamp = Some((tsval.wrapping_sub(1000), tsecr));
    r.payload_len = 3;
    let now = l.now;
    l.a.on_segment(now, &r, b"old");
    assert_eq!(l.a.recv_available(), 0);
    assert_eq!(l.a.stats().dropped, 1);
}

#[test]
fn timestamps_never_go_back_when_the_callers_clock_does() {
    // Two threads drive one connection, one with a time it read before
    // it waited for the lock: the segment it sends must not carry an
    // older TSval than the one before, or the peer drops it (PAWS).
    let mut l = Link::established(cfg(), cfg());
    let later = l.now.add_micros(50_000);
    assert_eq!(l.a.send(b"first"), 5);
    let first = l.a.poll_transmit(later, 1460).map(|s| s.repr);
    let first = first.unwrap_or_else(|| panic!("first segment"));
    assert_eq!(l.a.send(b"second"), 6);
    let earlier = l.now.add_micros(10_000);
    let second = l.a.poll_transmit(earlier, 1460).map(|s| s.repr);
    let second = second.unwrap_or_else(|| panic!("second segment"));
    let ts = |r: &Repr| r.timestamp.unwrap_or_else(|| panic!("no timestamp")).0;
    assert!(
        !seq::lt(ts(&second), ts(&first)),
        "{} then {}",
        ts(&first),
        ts(&second)
    );
    l.b.on_segment(later, &first, b"first");
    l.b.on_segment(later, &second, b"second");
    assert_eq!(l.b.stats().dropped, 0);
    let mut got = [0u8; 16];
    let n = l.b.recv(&mut got);
    assert_eq!(&got[..n], b"firstsecond");
}

#[test]
fn zero_window_is_probed_until_it_opens() {
    let cb = Config {
        recv_buffer: 8192,
        ..cfg()
    };
    let mut l = Link::established(cfg(), cb);
    l.read = false;
    let data = pattern(20_000);
    let n = l.a.send(&data);
    assert_eq!(n, data.len());
    l.run_until(|l| l.b.recv_available() == 8192, 1_000_000);
    assert_eq!(l.b.recv_available(), 8192);
    let t = l.now.add_micros(5_000_000);
    l.run_until(|l| l.now >= t, 5_000_000);
    assert!(l.a.stats().window_probes >= 2, "{:?}", l.a.stats());
    assert_eq!(l.a.state(), State::Established);
    // The reader wakes up: the rest flows.
    l.read = true;
    l.drain_reads();
    l.run_until(|l| l.got_b.len() == data.len(), 10_000_000);
    assert_eq!(l.got_b, data);
}

#[test]
fn stray_segments_get_rst() {
    let mut syn = syn_of(&mut Connection::connect(cfg(), T0, 1, 2, 7), T0);
    let r = reply_to_stray(&syn, 0).unwrap_or_else(|| panic!());
    assert_eq!(r.flags, Flags::RST | Flags::ACK);
    assert_eq!(r.ack_number, 8);
    syn.flags = Flags::ACK;
    syn.ack_number = 555;
    let r = reply_to_stray(&syn, 10).unwrap_or_else(|| panic!());
    assert_eq!((r.flags, r.seq_number), (Flags::RST, 555));
    syn.flags = Flags::RST;
    assert!(reply_to_stray(&syn, 0).is_none());
}

#[test]
fn lost_syn_ack_is_resent_on_the_peers_syn() {
    let mut l = Link::new(cfg(), cfg());
    let mut first = true;
    l.filter = Box::new(move |side, r, _| {
        if side == Side::B && r.flags.contains(Flags::SYN) && first {
            first = false;
            return Verdict::Drop;
        }
        Verdict::Pass
    });
    l.run_until(
        |l| l.a.state() == State::Established && l.b.state() == State::Established,
        10_000_000,
    );
    assert_eq!(l.a.state(), State::Established);
    assert!(l.a.stats().retransmits >= 1, "A resent its SYN");
}

/// A's last header, as the template of segments made up from A to B: it
/// carries B's receive point, A's timestamp and the right ACK.
fn a_to_b(l: &Link) -> Repr {
    let mut h = l
        .sent_by(Side::A)
        .last()
        .copied()
        .unwrap_or_else(|| panic!());
    h.flags = Flags::ACK;
    h.sack_ranges = [None; MAX_SACK_BLOCKS];
    h.payload_len = 0;
    h
}

/// B takes `data` at `seq` from A, with a FIN after it if `fin`.
fn to_b(l: &mut Link, hdr: &Repr, seq: u32, data: &[u8], fin: bool) {
    let mut h = *hdr;
    h.seq_number = seq;
    h.payload_len = data.len();
    if fin {
        h.flags |= Flags::FIN;
    }
    let now = l.now;
    l.b.on_segment(now, &h, data);
}

/// Everything B sends now.
fn b_sends(l: &mut Link) -> Vec<Repr> {
    let now = l.now;
    std::iter::from_fn(|| l.b.poll_transmit(now, 1460).map(|s| s.repr)).collect()
}

fn read_all(c: &mut Connection) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = c.recv(&mut buf);
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&buf[..n]);
    }
}

fn events(c: &mut Connection) -> Vec<Event> {
    std::iter::from_fn(|| c.poll_event()).collect()
}

/// The last ACK number and SACK blocks B sent.
fn b_ack(l: &mut Link) -> (u32, Vec<(u32, u32)>) {
    let last = b_sends(l)
        .last()
        .copied()
        .unwrap_or_else(|| panic!("B sent nothing"));
    assert!(last.flags.contains(Flags::ACK));
    let sacks = last.sack_ranges.iter().flatten().copied().collect();
    (last.ack_number, sacks)
}

/// A FIN at X arrives before the data below it; then bytes at and past
/// X, which are not part of the stream; then the gap. The application
/// reads exactly the bytes below X and then end of stream; B acks X + 1.
#[test]
fn out_of_order_fin_ends_the_stream_where_it_says() {
    let mut l = Link::established(cfg(), cfg());
    let hdr = a_to_b(&l);
    let base = hdr.seq_number;
    let x = base.wrapping_add(1000);
    let stream = pattern(1000);
    to_b(&mut l, &hdr, x, &[], true);
    to_b(&mut l, &hdr, x, &[0xee; 500], false);
    let across = [&stream[800..], &[0xee; 300][..]].concat();
    to_b(&mut l, &hdr, x.wrapping_sub(200), &across, false);
    assert_eq!(l.b.recv_available(), 0);
    // Held: only [X - 200, X).
    assert_eq!(b_ack(&mut l), (base, vec![(x.wrapping_sub(200), x)]));

    to_b(&mut l, &hdr, base, &stream[..800], false);
    let got = read_all(&mut l.b);
    assert_eq!(got.len(), stream.len());
    assert_eq!(got, stream);
    assert!(l.b.fin_received());
    assert!(l.b.recv_finished());
    assert_eq!(l.b.state(), State::CloseWait);
    assert!(events(&mut l.b).contains(&Event::PeerClosed));
    assert_eq!(b_ack(&mut l), (x.wrapping_add(1), vec![]));
    // Data past the FIN sent again changes nothing.
    to_b(&mut l, &hdr, x, &[0xee; 500], false);
    assert_eq!(l.b.recv_available(), 0);
    assert_eq!(b_ack(&mut l), (x.wrapping_add(1), vec![]));
}

/// A FIN at X out of order, then data up to X only, the upper part first:
/// once the gap fills the FIN is taken. B had closed first, so it goes
/// from FIN-WAIT-2 to TIME-WAIT.
#[test]
fn out_of_order_fin_is_taken_when_data_up_to_it_fills_the_gap() {
    let mut l = Link::established(cfg(), cfg());
    l.b.close();
    l.run_until(|l| l.b.state() == State::FinWait2, 1_000_000);
    assert_eq!(l.b.state(), State::FinWait2);
    let hdr = a_to_b(&l);
    let base = hdr.seq_number;
    let x = base.wrapping_add(1000);
    let stream = pattern(1000);
    to_b(&mut l, &hdr, x, &[], true);
    to_b(&mut l, &hdr, x.wrapping_sub(400), &stream[600..], false);
    assert_eq!(b_ack(&mut l), (base, vec![(x.wrapping_sub(400), x)]));
    assert_eq!(l.b.state(), State::FinWait2);
    to_b(&mut l, &hdr, base, &stream[..600], false);
    let got = read_all(&mut l.b);
    assert_eq!(got.len(), stream.len());
    assert_eq!(got, stream);
    assert!(l.b.recv_finished());
    assert_eq!(l.b.state(), State::TimeWait);
    assert!(events(&mut l.b).contains(&Event::PeerClosed));
    assert_eq!(b_ack(&mut l), (x.wrapping_add(1), vec![]));
}

/// A FIN at X out of order, then FINs at other places: the first one
/// known holds. A later FIN past X and its bytes past X are ignored; a
/// FIN below X is ignored but its data kept.
#[test]
fn a_second_fin_elsewhere_is_ignored() {
    let mut l = Link::established(cfg(), cfg());
    let hdr = a_to_b(&l);
    let base = hdr.seq_number;
    let x = base.wrapping_add(1000);
    let stream = pattern(1000);
    to_b(&mut l, &hdr, x, &[], true);
    to_b(&mut l, &hdr, x, &[0xee; 100], true);
    assert_eq!(b_ack(&mut l), (base, vec![]));
    to_b(&mut l, &hdr, x.wrapping_sub(500), &stream[500..700], true);
    assert_eq!(
        b_ack(&mut l),
        (base, vec![(x.wrapping_sub(500), x.wrapping_sub(300))])
    );
    // The gap below X - 500 fills: data up to X - 300, and no FIN there.
    to_b(&mut l, &hdr, base, &stream[..500], false);
    let got = read_all(&mut l.b);
    assert_eq!(got.len(), 700);
    assert_eq!(got, &stream[..700]);
    assert!(!l.b.fin_received());
    assert!(!l.b.recv_finished());
    assert_eq!(l.b.state(), State::Established);
    assert_eq!(b_ack(&mut l), (x.wrapping_sub(300), vec![]));
    // The rest up to X, then the FIN at X.
    to_b(&mut l, &hdr, x.wrapping_sub(300), &stream[700..], false);
    let got = read_all(&mut l.b);
    assert_eq!(got.len(), 300);
    assert_eq!(got, &stream[700..]);
    assert!(l.b.recv_finished());
    assert_eq!(l.b.state(), State::CloseWait);
    assert_eq!(b_ack(&mut l), (x.wrapping_add(1), vec![]));
}

/// Data held out of order past a FIN that then arrives in order is not
/// part of the stream.
#[test]
fn in_order_fin_drops_data_held_past_it() {
    let mut l = Link::established(cfg(), cfg());
    let hdr = a_to_b(&l);
    let base = hdr.seq_number;
    let x = base.wrapping_add(1000);
    let stream = pattern(1000);
    to_b(&mut l, &hdr, x, &[0xee; 500], false);
    to_b(&mut l, &hdr, base, &stream, true);
    let got = read_all(&mut l.b);
    assert_eq!(got.len(), stream.len());
    assert_eq!(got, stream);
    assert!(l.b.recv_finished());
    assert_eq!(l.b.state(), State::CloseWait);
    assert_eq!(b_ack(&mut l), (x.wrapping_add(1), vec![]));
}
