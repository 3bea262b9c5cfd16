//! Invariant: `frag::fragment` never panics on any bytes; what it hands on
//! fits the MTU with the link header in front of every piece; and an IPv4
//! or IPv6 packet it cut comes back byte for byte from the reassembler,
//! whatever order the pieces arrive in.
//!
//! Input: MTU (2 bytes, little endian), link-header length (byte 2, 0-15),
//! order (byte 3: bit 0 reverse, bit 1 odd pieces first), then the
//! packet. For IPv4 the target makes the header consistent first (total
//! length, no flags, checksum) so that the round trip is defined; other
//! inputs go to `fragment` as they are.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vnic_protocol::{
    frag::{fragment, FragError, Limits, Outcome, Reassembler},
    wire::ipv4,
};

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let mtu = usize::from(u16::from_le_bytes([data[0], data[1]]));
    let link = usize::from(data[2] & 0x0f);
    let order = data[3];
    let mut pkt = data[4..].to_vec();
    let consistent = fix_ipv4(&mut pkt, link);
    let mut pieces = Vec::new();
    let mut scratch = Vec::new();
    let r = fragment(&pkt, link, mtu, 7, &mut scratch, &mut |f| {
        pieces.push(f.to_vec())
    });
    let Ok(n) = r else {
        assert!(pieces.is_empty(), "pieces handed on before an error");
        return;
    };
    assert_eq!(n, pieces.len());
    for p in &pieces {
        assert!(p.len() >= link && p[..link] == pkt[..link], "link header");
        if n > 1 {
            assert!(p.len() - link <= mtu, "piece over the MTU");
        }
    }
    if n == 1 || !(consistent || pkt.get(link).is_some_and(|b| b >> 4 == 6)) {
        return;
    }
    let mut idx: Vec<usize> = (0..n).collect();
    if order & 1 != 0 {
        idx.reverse();
    }
    if order & 2 != 0 {
        idx.sort_by_key(|i| i % 2 == 0);
    }
    let mut r = Reassembler::new(Limits {
        max_memory: 1 << 24,
        max_fragments: 1 << 14,
        ..Limits::default()
    });
    let mut whole = None;
    for i in idx {
        match r.push(0, &pieces[i][link..]) {
            Ok(Outcome::Complete(d)) => whole = Some(d.to_vec()),
            Ok(_) => {}
            // The reassembler checks IPv6 extension headers' contents,
            // which the cutter does not need to: no round trip to compare
            // there. Anything else it refuses, the cutter got wrong.
            Err(FragError::Malformed(_)) if pkt[link] >> 4 == 6 => return,
            Err(e) => panic!("piece {i} refused: {e}"),
        }
    }
    let whole = whole.expect("every piece taken but no datagram");
    let ip = &pkt[link..];
    let len = if ip[0] >> 4 == 4 {
        usize::from(u16::from_be_bytes([ip[2], ip[3]]))
    } else {
        40 + usize::from(u16::from_be_bytes([ip[4], ip[5]]))
    };
    assert_eq!(whole, ip[..len], "round trip differs");
});

/// For an IPv4 packet at `pkt[link..]`: a total length within the buffer,
/// no flags or offset, a valid checksum. False when it is not IPv4 or
/// cannot be made whole.
fn fix_ipv4(pkt: &mut [u8], link: usize) -> bool {
    let Some(ip) = pkt.get_mut(link..) else {
        return false;
    };
    if ip.len() < ipv4::HEADER_LEN || ip[0] >> 4 != 4 {
        return false;
    }
    let hl = usize::from(ip[0] & 0x0f) * 4;
    if hl < ipv4::HEADER_LEN || hl > ip.len() {
        return false;
    }
    let total = ip.len().min(65535);
    let mut p = ipv4::Packet::new_unchecked(&mut ip[..]);
    p.set_total_len(total as u16);
    p.set_frag(false, false, 0);
    p.fill_checksum();
    true
}
