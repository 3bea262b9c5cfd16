//! Invariant: whatever segments, timer expiries and application calls
//! reach a connection in any state, the engine never panics, its own
//! bookkeeping stays consistent (`check_invariants`, which also holds that
//! no out-of-order byte past a known FIN is kept and that RCV.NXT never
//! passes it untaken), every segment it emits is well-formed: a header
//! that fits 60 bytes and a payload no longer than the caller allowed,
//! matching the header's length; and once the peer's FIN is taken, no
//! byte is delivered to the application any more and every ACK it sends
//! acknowledges the same sequence number.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vnic_protocol::{
    tcp::{Config, Connection, Instant, Keepalive},
    wire::tcp::{Flags, Packet, Repr},
};

fn cfg() -> Config {
    Config {
        recv_buffer: 16 << 10,
        send_buffer: 16 << 10,
        ooo_limit: 8 << 10,
        msl: 2_000_000,
        keepalive: Some(Keepalive {
            idle: 5_000_000,
            interval: 1_000_000,
            probes: 3,
        }),
        ..Config::default()
    }
}

fn drain(c: &mut Connection, now: Instant, max: usize) -> Vec<(Repr, Vec<u8>)> {
    let mut out = Vec::new();
    for _ in 0..64 {
        let Some(s) = c.poll_transmit(now, max) else {
            break;
        };
        let mut d = s.payload[0].to_vec();
        d.extend_from_slice(s.payload[1]);
        assert_eq!(s.repr.payload_len, d.len());
        assert!(d.len() <= max);
        assert!(s.repr.header_len() <= 60);
        let mut buf = vec![0u8; s.repr.header_len()];
        s.repr
            .emit(&mut Packet::new_unchecked(&mut buf[..]), None)
            .unwrap_or_else(|e| panic!("emit: {e}"));
        out.push((s.repr, d));
    }
    out
}

fn deliver(to: &mut Connection, now: Instant, segs: &[(Repr, Vec<u8>)]) {
    for (r, d) in segs {
        to.on_segment(now, r, d);
    }
}

/// Both sides exchange until quiet.
fn settle(a: &mut Connection, b: &mut Connection, now: Instant) {
    for _ in 0..8 {
        let x = drain(a, now, 1448);
        let y = drain(b, now, 1448);
        if x.is_empty() && y.is_empty() {
            break;
        }
        deliver(b, now, &x);
        deliver(a, now, &y);
    }
}

/// Connection `a` in the state `which` names, and its peer.
fn setup(which: u8, now: Instant) -> (Connection, Connection) {
    let mut a = Connection::connect(cfg(), now, 1000, 80, 7);
    let syn = drain(&mut a, now, 1448);
    let Some(first) = syn.first() else {
        return (a, Connection::connect(cfg(), now, 80, 1000, 9));
    };
    let Some(mut b) = Connection::accept(cfg(), now, &first.0, 0xffff_fff0) else {
        return (a, Connection::connect(cfg(), now, 80, 1000, 9));
    };
    match which % 9 {
        0 => return (a, b),
        1 => return (b, a),
        _ => {}
    }
    settle(&mut a, &mut b, now);
    match which % 9 {
        3 => {
            a.send(b"tail");
            a.close();
            drain(&mut a, now, 1448);
        }
        4 => {
            a.close();
            settle(&mut a, &mut b, now);
        }
        5 => {
            b.close();
            settle(&mut a, &mut b, now);
        }
        6 => {
            a.close();
            b.close();
            let x = drain(&mut a, now, 1448);
            let y = drain(&mut b, now, 1448);
            deliver(&mut a, now, &y);
            let _ = x;
        }
        7 => {
            b.close();
            settle(&mut a, &mut b, now);
            a.close();
            drain(&mut a, now, 1448);
        }
        8 => {
            a.close();
            settle(&mut a, &mut b, now);
            b.close();
            settle(&mut a, &mut b, now);
        }
        _ => {}
    }
    (a, b)
}

fn u16_at(d: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([
        d.get(i).copied().unwrap_or(0),
        d.get(i + 1).copied().unwrap_or(0),
    ])
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, mut rest)) = data.split_first() else {
        return;
    };
    let mut now = Instant(1_000_000);
    let (mut a, mut b) = setup(which, now);
    // Sequence bases: what the peer would send next and what it acked.
    let peer = drain(&mut b, now, 1448);
    let mut base_seq = peer.last().map_or(0, |(r, _)| r.seq_number);
    let mut base_ack = peer.last().map_or(0, |(r, _)| r.ack_number);
    let mut payload = vec![0u8; 2048];
    // Bytes the application read, and (delivered bytes, ACK number) once
    // the FIN was taken.
    let mut read = 0usize;
    let mut at_fin: Option<(usize, Option<u32>)> = None;
    while rest.len() >= 12 {
        let (op, tail) = rest.split_at(12);
        rest = tail;
        match op[0] % 5 {
            0 | 1 => {
                let flags = Flags::from_bits_truncate(op[1]);
                let dseq = i32::from(u16_at(op, 2) as i16) * i32::from(op[8] % 64 + 1);
                let dack = i32::from(u16_at(op, 4) as i16);
                let len = usize::from(op[9]) * 8 % payload.len();
                let mut r = Repr {
                    src_port: 80,
                    dst_port: 1000,
                    seq_number: base_seq.wrapping_add(dseq as u32),
                    ack_number: base_ack.wrapping_add(dack as u32),
                    flags,
                    window_len: u16_at(op, 6),
                    urgent_at: 0,
                    mss: (op[10] & 1 != 0).then_some(u16_at(op, 6)),
                    window_scale: (op[10] & 2 != 0).then_some(op[11]),
                    sack_permitted: op[10] & 4 != 0,
                    sack_ranges: [None; 4],
                    timestamp: (op[10] & 8 != 0)
                        .then_some((u32::from(u16_at(op, 2)), u32::from(u16_at(op, 4)))),
                    payload_len: len,
                };
                if op[10] & 16 != 0 {
                    let l = r.ack_number.wrapping_add(u32::from(op[11]) * 100);
                    r.sack_ranges[0] = Some((l, l.wrapping_add(u32::from(u16_at(op, 6)))));
                }
                payload.iter_mut().take(len).for_each(|x| *x = op[11]);
                a.on_segment(now, &r, &payload[..len]);
                if op[0] % 5 == 1 {
                    base_seq = base_seq.wrapping_add(len as u32);
                }
            }
            2 => {
                now = now.add_micros(u64::from(u16_at(op, 1)) * 1000);
                a.on_timer(now);
            }
            3 => match op[1] % 5 {
                0 => {
                    let n = usize::from(u16_at(op, 2)) % 4096;
                    a.send(&vec![op[4]; n]);
                }
                1 => {
                    let mut buf = vec![0u8; usize::from(u16_at(op, 2))];
                    read += a.recv(&mut buf);
                }
                2 => a.close(),
                3 => a.abort(),
                _ => {
                    if let Some(t) = a.poll_timeout() {
                        now = now.max(t);
                        a.on_timer(now);
                    }
                }
            },
            _ => {
                let max = if op[1] & 1 == 0 { 1448 } else { 65000 };
                let out = drain(&mut a, now, max);
                if let Some((r, _)) = out.last() {
                    base_ack = r.seq_number;
                }
                if let Some((_, ack)) = &mut at_fin {
                    for (r, _) in out.iter().filter(|(r, _)| r.flags.contains(Flags::ACK)) {
                        let want = *ack.get_or_insert(r.ack_number);
                        assert_eq!(r.ack_number, want, "ACK moved after the FIN");
                    }
                }
                // The real peer sees them too and answers.
                deliver(&mut b, now, &out);
                let back = drain(&mut b, now, 1448);
                deliver(&mut a, now, &back);
                if let Some((r, d)) = back.last() {
                    base_seq = r.seq_number.wrapping_add(d.len() as u32);
                }
            }
        }
        if let Err(e) = a.check_invariants() {
            panic!("invariant broken: {e}");
        }
        let delivered = read + a.recv_available();
        if a.fin_received() {
            let (d, _) = *at_fin.get_or_insert((delivered, None));
            assert_eq!(delivered, d, "bytes delivered after the FIN");
        }
        if let Err(e) = b.check_invariants() {
            panic!("peer invariant broken: {e}");
        }
    }
});
