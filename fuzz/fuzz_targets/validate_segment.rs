//! Invariant: `validate_prefix` over the first 128 bytes agrees with
//! `validate` over the whole frame unless a header lies past the prefix;
//! and a driver header that `validate` accepts as GSO segments into
//! frames that each re-parse, carry valid IPv4 and transport checksums,
//! carry at most `gso_size` payload bytes (exactly that for all but the
//! last), and whose payloads concatenate to the super-frame's payload.
//!
//! Input: 12 bytes of virtio_net_hdr then the frame (raw mode), or, when
//! the first byte is 0xff, parameters for a well-formed super-frame whose
//! header fields the fuzzer still perturbs (structured mode).

#![no_main]

use libfuzzer_sys::fuzz_target;
use vnic_protocol::{
    checksum,
    offload::{l4_checksum_ok, Segmenter},
    virtio::{hdr::GsoType, validate, validate_prefix, HdrFlags, ValidateError, VirtioNetHdr},
    wire::{
        self,
        build::{data_segment, tcp_frame, udp_frame, Flow, IpFields},
        parse_frame,
        tcp::Flags,
    },
};

fn check(hdr: &VirtioNetHdr, frame: &[u8]) {
    let whole = validate(hdr, frame);
    let k = frame.len().min(128);
    match (&whole, validate_prefix(hdr, &frame[..k], frame.len())) {
        (_, Err(ValidateError::Frame(wire::Error::Truncated(_)))) => {}
        (Ok(a), Ok(b)) => {
            assert_eq!((a.gso, a.ecn, a.segments), (b.gso, b.ecn, b.segments));
            if b.info.is_some() {
                assert_eq!(a.info, b.info);
            }
        }
        (a, b) => assert_eq!(a, &b),
    }
    let Ok(v) = whole else {
        return;
    };
    if v.gso == GsoType::None {
        return;
    }
    let info = v.info.expect("gso frames are parsed");
    let l4 = info.l4.expect("gso frames have a transport header");
    let end = info.l3_end(frame.len());
    let payload = &frame[l4.offset + l4.header_len..end];
    let mss = usize::from(hdr.gso_size);
    let mut got = Vec::with_capacity(payload.len());
    let mut sizes = Vec::new();
    let n = Segmenter::new()
        .segment(frame, &v, hdr.gso_size, &mut |h, p| {
            let mut f = h.to_vec();
            f.extend_from_slice(p);
            let i = parse_frame(&f).expect("segment re-parses");
            assert!(l4_checksum_ok(&f, &i), "segment transport checksum");
            if f[i.l3_offset] >> 4 == 4 {
                let hl = usize::from(f[i.l3_offset] & 0xf) * 4;
                assert!(checksum::verify(&f[i.l3_offset..i.l3_offset + hl]));
            }
            assert_eq!(
                i.l3_end(f.len()),
                f.len(),
                "ip length covers the segment exactly"
            );
            sizes.push(p.len());
            got.extend_from_slice(p);
        })
        .expect("validated frames segment");
    assert_eq!(n, v.segments);
    assert_eq!(got, payload);
    for (k, s) in sizes.iter().enumerate() {
        assert!(*s <= mss);
        if k + 1 < sizes.len() {
            assert_eq!(*s, mss);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.first() == Some(&0xff) && data.len() >= 8 {
        let v6 = data[1] & 1 != 0;
        let udp = data[1] & 2 != 0;
        let flags = Flags::from_bits_retain(data[2]) | Flags::ACK;
        let mss = u16::from_le_bytes([data[3], data[4]]).max(1);
        let len = usize::from(u16::from_le_bytes([data[5], data[6]])) % 65000;
        let payload: Vec<u8> = (0..len).map(|i| data[7 + i % (data.len() - 7)]).collect();
        let flow = if v6 { Flow::v6() } else { Flow::v4() };
        let ip = IpFields {
            ident: u16::from(data[1]) << 8,
            ..Default::default()
        };
        let frame = if udp {
            udp_frame(&flow, &ip, &payload)
        } else {
            tcp_frame(
                &flow,
                data_segment(u32::from(data[3]) << 24, 1, flags),
                &ip,
                &payload,
            )
        };
        let Ok(frame) = frame else { return };
        let gso = match (udp, v6) {
            (true, _) => GsoType::UdpL4,
            (false, false) => GsoType::TcpV4,
            (false, true) => GsoType::TcpV6,
        };
        let info = parse_frame(&frame).expect("built frames parse");
        let l4 = info.l4.expect("built frames have l4");
        let hdr = VirtioNetHdr {
            flags: HdrFlags::NEEDS_CSUM,
            gso_type: gso as u8 | (data[2] & 0x80 & if udp { 0 } else { 0xff }),
            hdr_len: (l4.offset + l4.header_len) as u16,
            gso_size: mss,
            csum_start: l4.offset as u16,
            csum_offset: if udp { 6 } else { 16 },
            ..Default::default()
        };
        check(&hdr, &frame);
        return;
    }
    if data.len() < 12 {
        return;
    }
    let Ok(hdr) = VirtioNetHdr::parse(&data[..12], false) else {
        return;
    };
    check(&hdr, &data[12..]);
});
