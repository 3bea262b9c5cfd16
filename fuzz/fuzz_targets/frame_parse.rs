//! Invariant: for any bytes, `parse_frame` either fails with an error or
//! reports offsets that lie inside the frame, and every header it accepted
//! survives parse -> emit -> parse unchanged at the `Repr` level; and
//! `parse_frame_prefix` over any prefix either agrees with it or reports a
//! header that lies past the prefix.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vnic_protocol::{
    checksum,
    wire::{
        arp, ethernet, icmpv4, icmpv6, ip_proto, ipv4, ipv6, parse_frame, parse_frame_prefix, tcp,
        udp, L3Info,
    },
};

fn round_trip_l4(proto: u8, seg: &[u8], v6: Option<(core::net::Ipv6Addr, core::net::Ipv6Addr)>) {
    match proto {
        ip_proto::TCP => {
            let p = tcp::Packet::new_checked(seg).expect("parse_frame accepted it");
            if let Ok(r) = tcp::Repr::parse(&p, None) {
                let mut b = vec![0u8; r.buffer_len()];
                if r.emit(&mut tcp::Packet::new_unchecked(&mut b[..]), Some(0))
                    .is_ok()
                {
                    let again = tcp::Repr::parse(&tcp::Packet::new_checked(&b[..]).unwrap(), None)
                        .expect("emitted tcp header parses");
                    assert_eq!(again, r);
                }
            }
        }
        ip_proto::UDP => {
            let p = udp::Packet::new_checked(seg).expect("parse_frame accepted it");
            if let Ok(r) = udp::Repr::parse(&p, None) {
                let mut b = vec![0u8; r.buffer_len()];
                r.emit(&mut udp::Packet::new_unchecked(&mut b[..]), Some(0))
                    .expect("udp emit into its own buffer_len");
                let again = udp::Repr::parse(&udp::Packet::new_checked(&b[..]).unwrap(), Some(0))
                    .expect("emitted udp datagram parses and verifies");
                assert_eq!(again, r);
            }
        }
        ip_proto::ICMP => {
            let p = icmpv4::Packet::new_checked(seg).expect("parse_frame accepted it");
            if let Ok(r) = icmpv4::Repr::parse(&p) {
                let mut b = vec![0u8; r.buffer_len()];
                r.emit(&mut icmpv4::Packet::new_unchecked(&mut b[..]))
                    .unwrap();
                assert!(checksum::verify(&b));
                let q = icmpv4::Packet::new_checked(&b[..]).unwrap();
                assert_eq!(icmpv4::Repr::parse(&q).unwrap(), r);
            }
        }
        ip_proto::ICMPV6 => {
            let p = icmpv6::Packet::new_checked(seg).expect("parse_frame accepted it");
            let (s, d) = v6.unwrap_or((
                core::net::Ipv6Addr::UNSPECIFIED,
                core::net::Ipv6Addr::UNSPECIFIED,
            ));
            if let Ok(r) = icmpv6::Repr::parse(&p, 0) {
                let mut b = vec![0u8; r.buffer_len()];
                let ps = checksum::pseudo_header_v6(s, d, 58, b.len() as u32);
                r.emit(&mut icmpv6::Packet::new_unchecked(&mut b[..]), ps)
                    .unwrap();
                let q = icmpv6::Packet::new_checked(&b[..]).unwrap();
                assert_eq!(icmpv6::Repr::parse(&q, ps).unwrap(), r);
            }
        }
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let whole = parse_frame(data);
    for k in [14, 40, 64, 128] {
        if let Ok(p) = parse_frame_prefix(&data[..k.min(data.len())], data.len()) {
            assert_eq!(whole, Ok(p), "prefix {k}");
        }
    }
    let Ok(info) = whole else {
        return;
    };
    assert!(info.l3_offset <= data.len());
    let end = info.l3_end(data.len());
    assert!(end <= data.len());
    if let Some(l4) = info.l4 {
        assert!(l4.offset + l4.header_len <= end);
    }

    let eth = ethernet::Repr::parse(&ethernet::Frame::new_checked(data).unwrap()).unwrap();
    let mut b = [0u8; 14];
    eth.emit(&mut ethernet::Frame::new_unchecked(&mut b[..]))
        .unwrap();
    assert_eq!(&b[..], &data[..14]);

    let l3 = &data[info.l3_offset..];
    match info.l3 {
        L3Info::Ipv4 {
            header_len,
            fragment,
            protocol,
            ..
        } => {
            let p = ipv4::Packet::new_checked(l3).expect("parse_frame accepted it");
            if let Ok(r) = ipv4::Repr::parse(&p) {
                let mut b = vec![0u8; r.header_len()];
                r.emit(&mut ipv4::Packet::new_unchecked(&mut b[..]))
                    .unwrap();
                assert!(checksum::verify(&b));
                // The header re-parses (its payload is not in `b`, so check
                // the fields through a buffer of the right length).
                let mut full = b.clone();
                full.resize(r.buffer_len(), 0);
                let again =
                    ipv4::Repr::parse(&ipv4::Packet::new_checked(&full[..]).unwrap()).unwrap();
                assert_eq!(again, r);
            }
            if !fragment {
                round_trip_l4(protocol, &p.payload(), None);
            }
            assert!(header_len >= 20);
        }
        L3Info::Ipv6 { ext, src, dst, .. } => {
            let p = ipv6::Packet::new_checked(l3).unwrap();
            let r = ipv6::Repr::parse(&p).unwrap();
            let mut b = vec![0u8; ipv6::HEADER_LEN];
            r.emit(&mut ipv6::Packet::new_unchecked(&mut b[..]))
                .unwrap();
            assert_eq!(&b[..], &l3[..ipv6::HEADER_LEN]);
            if ext.fragment.is_none() {
                round_trip_l4(
                    ext.upper_proto,
                    &p.packet()[ext.upper_offset..],
                    Some((src, dst)),
                );
            }
        }
        L3Info::Arp => {
            let p = arp::Packet::new_checked(l3).unwrap();
            if let Ok(r) = arp::Repr::parse(&p) {
                let mut b = [0u8; arp::PACKET_LEN];
                r.emit(&mut arp::Packet::new_unchecked(&mut b[..])).unwrap();
                assert_eq!(&b[..], &l3[..arp::PACKET_LEN]);
            }
        }
        L3Info::Other => {}
    }
});
