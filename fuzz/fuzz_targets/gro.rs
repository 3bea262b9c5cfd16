//! Invariant: GRO loses, duplicates and reorders no payload byte of a flow.
//! Segments of one super-frame, fed in a fuzzer-chosen order with
//! fuzzer-chosen drops and corruptions, come out with their payloads in
//! the order they went in; every merged frame carries valid checksums and
//! re-segments (with the gso_size GRO reported) into its parts. Arbitrary
//! frames mixed in never make GRO panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vnic_protocol::{
    checksum,
    offload::{l4_checksum_ok, Gro, GroConfig, GroPacket, Segmenter},
    virtio::hdr::GsoType,
    wire::{
        build::{data_segment, tcp_frame, Flow, IpFields},
        parse_frame,
        tcp::Flags,
    },
};

fn payload_of(frame: &[u8]) -> Option<Vec<u8>> {
    let i = parse_frame(frame).ok()?;
    let off = i.payload_offset()?;
    Some(frame[off..i.l3_end(frame.len())].to_vec())
}

/// Payload of a frame GRO must treat as a good segment of `flow`: TCP on
/// the flow's addresses and ports with valid IPv4 header and TCP checksums.
fn good_payload(frame: &[u8], flow: &Flow) -> Option<Vec<u8>> {
    let i = parse_frame(frame).ok()?;
    let l4 = i.l4?;
    if l4.protocol != 6
        || (l4.src_port, l4.dst_port) != (flow.src_port, flow.dst_port)
        || i.l3.addrs()? != (flow.src_ip, flow.dst_ip)
        || !l4_checksum_ok(frame, &i)
    {
        return None;
    }
    if frame[i.l3_offset] >> 4 == 4 {
        let hl = usize::from(frame[i.l3_offset] & 0xf) * 4;
        if !checksum::verify(&frame[i.l3_offset..i.l3_offset + hl]) {
            return None;
        }
    }
    payload_of(frame)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 6 {
        return;
    }
    let v6 = data[0] & 1 != 0;
    let mss = 64 + usize::from(data[1]) * 8;
    let len = (usize::from(u16::from_le_bytes([data[2], data[3]])) % 40000).max(1);
    let max_flows = 1 + usize::from(data[4] % 8);
    // The high bit: count pure duplicate ACKs instead of passing them.
    let absorb_dup_acks = data[4] & 0x80 != 0;
    let ops = &data[5..];
    let flow = if v6 { Flow::v6() } else { Flow::v4() };
    let payload: Vec<u8> = (0..len).map(|i| (i * 13 + 5) as u8).collect();
    let sup = tcp_frame(
        &flow,
        data_segment(7, 9, Flags::ACK | Flags::PSH),
        &IpFields::default(),
        &payload,
    )
    .expect("builds");
    let info = parse_frame(&sup).expect("parses");
    let mut segs = Vec::new();
    Segmenter::new()
        .segment_parsed(&sup, &info, mss as u16, &mut |h, p| {
            let mut f = h.to_vec();
            f.extend_from_slice(p);
            segs.push(f);
        })
        .expect("segments");

    // Build the input sequence: each op byte picks a segment to send
    // (possibly again, possibly out of order), or injects junk.
    let mut input: Vec<Vec<u8>> = Vec::new();
    for (k, &op) in ops.iter().enumerate() {
        match op >> 6 {
            0 | 1 => input.push(segs[usize::from(op) % segs.len()].clone()),
            2 => {
                let mut s = segs[usize::from(op & 0x3f) % segs.len()].clone();
                let at = k % s.len();
                s[at] ^= op | 1;
                input.push(s);
            }
            _ => input.push(ops[k..].iter().copied().take(80).collect()),
        }
    }
    if input.is_empty() {
        input = segs.clone();
    }

    let mut gro = Gro::new(GroConfig {
        max_flows,
        absorb_dup_acks,
        ..Default::default()
    });
    let mut out_payload = Vec::new();
    let mut check = |p: GroPacket<'_>| {
        if p.segments > 1 {
            assert!(p.csum_verified);
            let i = parse_frame(p.frame).expect("merged frame parses");
            assert!(l4_checksum_ok(p.frame, &i), "merged frame checksum");
            assert_eq!(p.gso_type, if v6 { GsoType::TcpV6 } else { GsoType::TcpV4 });
            let mut parts = 0;
            let mut again = Vec::new();
            Segmenter::new()
                .segment_parsed(p.frame, &i, p.gso_size, &mut |_, q| {
                    parts += 1;
                    again.extend_from_slice(q);
                })
                .expect("merged frame re-segments");
            assert_eq!(parts, usize::from(p.segments));
            assert_eq!(Some(again), payload_of(p.frame));
        }
        if p.csum_verified {
            if let Some(pl) = good_payload(p.frame, &flow) {
                out_payload.extend_from_slice(&pl);
            }
        }
    };
    let mut in_payload = Vec::new();
    for f in &input {
        if let Some(pl) = good_payload(f, &flow) {
            in_payload.extend_from_slice(&pl);
        }
        gro.receive(f, &mut check);
    }
    gro.flush(&mut check);
    assert_eq!(gro.held(), 0);
    // The flow's good payload in equals its payload out, in order. (Junk
    // that happens to be a good segment of the flow counts on both sides.)
    assert_eq!(out_payload, in_payload);
});
