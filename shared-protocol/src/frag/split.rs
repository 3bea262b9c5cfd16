//! Cutting an IP packet into fragments that fit a link's MTU: what a
//! sending host does with a datagram larger than its path allows.
//!
//! - IPv4 (RFC 791 3.2): the header is repeated in every fragment; the
//!   options whose copied flag is set go into every fragment, the others
//!   into the first only. A packet with DF set is refused: clearing it is
//!   the sender's decision, not this function's. A packet that is itself a
//!   fragment is cut further, its offset and more-fragments flag carried.
//! - IPv6 (RFC 8200 4.5): a fragment header goes after the unfragmentable
//!   part (the fixed header, a hop-by-hop header, and a routing header
//!   with the destination options that precede it). A packet that already
//!   has a fragment header is refused.
//!
//! Every fragment but the last carries a multiple of 8 payload bytes, and
//! none is longer than the MTU.

use thiserror::Error;

use crate::wire::{self, ip_proto, ipv4, ipv6};

/// Why a packet could not be cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum SplitError {
    #[error("packet does not parse: {0}")]
    Malformed(#[from] wire::Error),
    #[error("IPv4 packet has don't-fragment set")]
    DontFragment,
    #[error("IPv6 packet already has a fragment header")]
    AlreadyFragmented,
    #[error("MTU {0} leaves no room for 8 payload bytes a fragment")]
    MtuTooSmall(usize),
}

/// Cuts the IP packet at `packet[link..]` into fragments of at most `mtu`
/// IP bytes and hands each to `emit` with `packet[..link]` (a link-layer
/// header) in front, built in `scratch`. A packet that fits is handed on
/// as it is. `ident` is the IPv6 fragment identification (IPv4 keeps the
/// packet's own). Returns the number of pieces handed on; on error none
/// was.
pub fn fragment(
    packet: &[u8],
    link: usize,
    mtu: usize,
    ident: u32,
    scratch: &mut Vec<u8>,
    emit: &mut dyn FnMut(&[u8]),
) -> Result<usize, SplitError> {
    let (head, ip) = packet.split_at(link.min(packet.len()));
    match ip.first().map(|b| b >> 4) {
        Some(4) => split_v4(head, ip, mtu, scratch, emit),
        Some(6) => split_v6(head, ip, mtu, ident, scratch, emit),
        _ => Err(wire::Error::Malformed("ip version").into()),
    }
}

/// The options of `opts` that go into every fragment (copied flag set),
/// padded with end-of-options to a multiple of 4.
fn copied_options(opts: &[u8]) -> Result<Vec<u8>, SplitError> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < opts.len() {
        let kind = opts[i];
        match kind {
            ipv4::option::END => break,
            ipv4::option::NOP => i += 1,
            _ => {
                let len = usize::from(
                    *opts
                        .get(i + 1)
                        .ok_or(wire::Error::Truncated("ipv4 option"))?,
                );
                if len < 2 || i + len > opts.len() {
                    return Err(wire::Error::Malformed("ipv4 option length").into());
                }
                if kind & 0x80 != 0 {
                    out.extend_from_slice(&opts[i..i + len]);
                }
                i += len;
            }
        }
    }
    while out.len() % 4 != 0 {
        out.push(ipv4::option::END);
    }
    Ok(out)
}

fn split_v4(
    head: &[u8],
    ip: &[u8],
    mtu: usize,
    scratch: &mut Vec<u8>,
    emit: &mut dyn FnMut(&[u8]),
) -> Result<usize, SplitError> {
    let p = ipv4::Packet::new_checked(ip)?;
    let (hl, total) = (p.header_len(), p.total_len());
    if total <= mtu {
        scratch.clear();
        scratch.extend_from_slice(head);
        scratch.extend_from_slice(&ip[..total]);
        emit(scratch);
        return Ok(1);
    }
    if p.dont_frag() {
        return Err(SplitError::DontFragment);
    }
    let later_opts = copied_options(p.options())?;
    let later_hl = ipv4::HEADER_LEN + later_opts.len();
    let first_room = mtu.saturating_sub(hl) & !7;
    let later_room = mtu.saturating_sub(later_hl) & !7;
    if first_room == 0 || later_room == 0 {
        return Err(SplitError::MtuTooSmall(mtu));
    }
    let (base, last_more) = (p.frag_offset(), p.more_frags());
    let data = p.payload();
    if base + data.len() > 0xffff {
        return Err(wire::Error::Malformed("ipv4 fragment offset").into());
    }
    let mut at = 0;
    let mut n = 0;
    while at < data.len() {
        let first = at == 0;
        let room = if first { first_room } else { later_room };
        let end = (at + room).min(data.len());
        let more = end < data.len() || last_more;
        scratch.clear();
        scratch.extend_from_slice(head);
        let h = scratch.len();
        if first {
            scratch.extend_from_slice(&ip[..hl]);
        } else {
            scratch.extend_from_slice(&ip[..ipv4::HEADER_LEN]);
            scratch.extend_from_slice(&later_opts);
        }
        scratch.extend_from_slice(&data[at..end]);
        let len = scratch.len() - h;
        let mut f = ipv4::Packet::new_unchecked(&mut scratch[h..]);
        f.set_header_len(if first { hl } else { later_hl });
        f.set_total_len(len as u16);
        f.set_frag(false, more, base + at);
        f.fill_checksum();
        emit(scratch);
        n += 1;
        at = end;
    }
    Ok(n)
}

/// The length of the unfragmentable part and the offset of the next-header
/// byte that names the first fragmentable header.
fn unfragmentable_v6(ip: &[u8]) -> Result<(usize, usize), SplitError> {
    let mut len = ipv6::HEADER_LEN;
    let mut field = ipv6::NEXT_HEADER_OFFSET;
    let mut nh = ip[field];
    // Destination options count as unfragmentable only before a routing
    // header, so look one header ahead.
    for i in 0..ipv6::MAX_EXT_HEADERS {
        let take = match nh {
            ip_proto::HOP_BY_HOP => i == 0,
            ip_proto::ROUTING => true,
            ip_proto::DST_OPTS => {
                let h = ipv6::ExtHeader::new_checked(ip.get(len..).unwrap_or(&[]))?;
                h.next_header() == ip_proto::ROUTING
            }
            ip_proto::FRAGMENT => return Err(SplitError::AlreadyFragmented),
            _ => false,
        };
        if !take {
            return Ok((len, field));
        }
        let h = ipv6::ExtHeader::new_checked(ip.get(len..).unwrap_or(&[]))?;
        field = len;
        nh = h.next_header();
        len += h.header_len();
    }
    Err(wire::Error::Malformed("ipv6 extension headers").into())
}

fn split_v6(
    head: &[u8],
    ip: &[u8],
    mtu: usize,
    ident: u32,
    scratch: &mut Vec<u8>,
    emit: &mut dyn FnMut(&[u8]),
) -> Result<usize, SplitError> {
    let p = ipv6::Packet::new_checked(ip)?;
    let total = ipv6::HEADER_LEN + p.payload_len();
    if total <= mtu {
        scratch.clear();
        scratch.extend_from_slice(head);
        scratch.extend_from_slice(&ip[..total]);
        emit(scratch);
        return Ok(1);
    }
    let (unfrag, field) = unfragmentable_v6(&ip[..total])?;
    let next = ip[field];
    let room = mtu.saturating_sub(unfrag + ipv6::FRAG_HEADER_LEN) & !7;
    if room == 0 {
        return Err(SplitError::MtuTooSmall(mtu));
    }
    let data = &ip[unfrag..total];
    if data.is_empty() {
        return Err(wire::Error::Malformed("ipv6 nothing to fragment").into());
    }
    let mut at = 0;
    let mut n = 0;
    while at < data.len() {
        let end = (at + room).min(data.len());
        scratch.clear();
        scratch.extend_from_slice(head);
        let h = scratch.len();
        scratch.extend_from_slice(&ip[..unfrag]);
        scratch[h + field] = ip_proto::FRAGMENT;
        let fh = scratch.len();
        scratch.resize(fh + ipv6::FRAG_HEADER_LEN, 0);
        ipv6::FragmentRepr {
            next_header: next,
            offset: at,
            more: end < data.len(),
            ident,
        }
        .emit(&mut scratch[fh..])?;
        scratch.extend_from_slice(&data[at..end]);
        let payload = scratch.len() - h - ipv6::HEADER_LEN;
        ipv6::Packet::new_unchecked(&mut scratch[h..]).set_payload_len(payload as u16);
        emit(scratch);
        n += 1;
        at = end;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use core::net::{Ipv4Addr, Ipv6Addr};

    use super::*;
    use crate::frag::{Outcome, Reassembler};

    fn v4(payload: usize, opts: &[u8], df: bool) -> Vec<u8> {
        let hl = ipv4::HEADER_LEN + opts.len();
        let mut b = vec![0u8; hl + payload];
        let mut p = ipv4::Packet::new_unchecked(&mut b[..]);
        p.set_header_len(hl);
        p.set_total_len((hl + payload) as u16);
        p.set_ident(0x1234);
        p.set_frag(df, false, 0);
        p.set_ttl(64);
        p.set_protocol(ip_proto::UDP);
        p.set_src_addr(Ipv4Addr::new(192, 0, 2, 1));
        p.set_dst_addr(Ipv4Addr::new(192, 0, 2, 2));
        p.options_mut().copy_from_slice(opts);
        for (i, x) in p.payload_mut().iter_mut().enumerate() {
            *x = (i * 7 + i / 251) as u8;
        }
        p.fill_checksum();
        b
    }

    fn v6(payload: usize, ext: &[u8], first_nh: u8) -> Vec<u8> {
        let mut b = vec![0u8; ipv6::HEADER_LEN];
        let mut p = ipv6::Packet::new_unchecked(&mut b[..]);
        p.set_version_tc_flow(0, 0);
        p.set_payload_len((ext.len() + payload) as u16);
        p.set_next_header(first_nh);
        p.set_hop_limit(64);
        p.set_src_addr(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));
        p.set_dst_addr(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2));
        b.extend_from_slice(ext);
        b.extend((0..payload).map(|i| (i * 13 + 5) as u8));
        b
    }

    fn cut(packet: &[u8], link: usize, mtu: usize) -> Result<Vec<Vec<u8>>, SplitError> {
        let mut out = Vec::new();
        let mut scratch = Vec::new();
        let n = fragment(packet, link, mtu, 0xabcd_0001, &mut scratch, &mut |f| {
            out.push(f.to_vec())
        })?;
        assert_eq!(n, out.len());
        Ok(out)
    }

    /// Feeds `frags` (IP packets) to a reassembler in the given order and
    /// returns the datagram it completes with.
    fn join(frags: &[Vec<u8>], order: &[usize]) -> Vec<u8> {
        let mut r = Reassembler::default();
        let mut done = None;
        for &i in order {
            match r.push(0, &frags[i]).expect("fragment taken") {
                Outcome::Complete(d) => done = Some(d.to_vec()),
                Outcome::Held => {}
                Outcome::NotFragment => panic!("fragment {i} not seen as one"),
            }
        }
        done.expect("datagram completed")
    }

    fn orders(n: usize) -> [Vec<usize>; 3] {
        let fwd: Vec<usize> = (0..n).collect();
        let back: Vec<usize> = (0..n).rev().collect();
        let odd_even: Vec<usize> = (1..n).step_by(2).chain((0..n).step_by(2)).collect();
        [fwd, back, odd_even]
    }

    #[test]
    fn ipv4_round_trips_through_the_reassembler() {
        for (payload, mtu) in [
            (8000, 1500),
            (65_515, 1500),
            (1481, 1500),
            (100, 68),
            (3000, 576),
        ] {
            let pkt = v4(payload, &[], false);
            let frags = cut(&pkt, 0, mtu).unwrap();
            assert_eq!(
                frags.len(),
                payload.div_ceil((mtu - 20) & !7),
                "{payload}/{mtu}"
            );
            for (i, f) in frags.iter().enumerate() {
                let p = ipv4::Packet::new_checked(&f[..]).unwrap();
                assert!(f.len() <= mtu);
                assert!(p.verify_checksum());
                assert!(!p.dont_frag());
                assert_eq!(p.more_frags(), i + 1 < frags.len());
                assert_eq!(p.ident(), 0x1234);
                if i + 1 < frags.len() {
                    assert_eq!(p.payload().len() % 8, 0);
                }
            }
            for o in orders(frags.len()) {
                assert_eq!(join(&frags, &o), pkt, "{payload}/{mtu} order {o:?}");
            }
        }
    }

    #[test]
    fn ipv4_copies_only_options_with_the_copied_flag() {
        // A copied option (security-like kind 0x82, 4 bytes) and a record
        // route (not copied, 7 bytes) plus padding.
        let opts = [0x82, 4, 0xaa, 0xbb, 7, 7, 4, 0, 0, 0, 0, 0];
        let pkt = v4(2000, &opts, false);
        let frags = cut(&pkt, 0, 1000).unwrap();
        let first = ipv4::Packet::new_checked(&frags[0][..]).unwrap();
        assert_eq!(first.options(), &opts[..]);
        for f in &frags[1..] {
            let p = ipv4::Packet::new_checked(&f[..]).unwrap();
            assert_eq!(p.options(), &[0x82, 4, 0xaa, 0xbb][..]);
        }
        assert_eq!(join(&frags, &[2, 0, 1]), pkt);
    }

    #[test]
    fn ipv4_refragments_a_fragment() {
        let pkt = v4(6000, &[], false);
        let big = cut(&pkt, 0, 4000).unwrap();
        let mut small = Vec::new();
        for f in &big {
            small.extend(cut(f, 0, 1000).unwrap());
        }
        assert!(small.len() > big.len());
        let n = small.len();
        assert_eq!(join(&small, &(0..n).rev().collect::<Vec<_>>()), pkt);
    }

    #[test]
    fn link_header_goes_in_front_of_every_piece() {
        let mut pkt = vec![0xee; 14];
        pkt.extend(v4(3000, &[], false));
        let frags = cut(&pkt, 14, 1500).unwrap();
        assert_eq!(frags.len(), 3);
        for f in &frags {
            assert_eq!(&f[..14], &[0xee; 14]);
            assert!(f.len() <= 14 + 1500);
        }
        let ip: Vec<Vec<u8>> = frags.iter().map(|f| f[14..].to_vec()).collect();
        assert_eq!(join(&ip, &[1, 2, 0]), pkt[14..]);
    }

    #[test]
    fn a_packet_that_fits_goes_as_it_is() {
        let mut pkt = v4(1000, &[], true);
        pkt.extend_from_slice(&[0; 6]); // link padding past the total length
        let frags = cut(&pkt, 0, 1500).unwrap();
        assert_eq!(frags, vec![pkt[..1020].to_vec()]);
    }

    #[test]
    fn refusals() {
        assert_eq!(
            cut(&v4(3000, &[], true), 0, 1500),
            Err(SplitError::DontFragment)
        );
        assert_eq!(
            cut(&v4(3000, &[], false), 0, 27),
            Err(SplitError::MtuTooSmall(27))
        );
        assert!(matches!(
            cut(&[0x55; 40], 0, 1500),
            Err(SplitError::Malformed(_))
        ));
        let frag_hdr = [ip_proto::UDP, 0, 0, 1, 0, 0, 0, 9];
        assert_eq!(
            cut(&v6(3000, &frag_hdr, ip_proto::FRAGMENT), 0, 1280),
            Err(SplitError::AlreadyFragmented)
        );
        assert_eq!(
            cut(&v6(3000, &[], ip_proto::UDP), 0, 40),
            Err(SplitError::MtuTooSmall(40))
        );
    }

    #[test]
    fn ipv6_round_trips_through_the_reassembler() {
        for (payload, mtu) in [(8000, 1500), (65_527, 1500), (1461, 1500), (3000, 1280)] {
            let pkt = v6(payload, &[], ip_proto::UDP);
            let frags = cut(&pkt, 0, mtu).unwrap();
            assert_eq!(
                frags.len(),
                payload.div_ceil((mtu - 48) & !7),
                "{payload}/{mtu}"
            );
            for (i, f) in frags.iter().enumerate() {
                assert!(f.len() <= mtu);
                let p = ipv6::Packet::new_checked(&f[..]).unwrap();
                let w = ipv6::walk(&p).unwrap();
                let fi = w.fragment.expect("fragment header");
                assert_eq!(fi.header_offset, ipv6::HEADER_LEN);
                assert_eq!(fi.repr.ident, 0xabcd_0001);
                assert_eq!(fi.repr.next_header, ip_proto::UDP);
                assert_eq!(fi.repr.more, i + 1 < frags.len());
            }
            for o in orders(frags.len()) {
                assert_eq!(join(&frags, &o), pkt, "{payload}/{mtu} order {o:?}");
            }
        }
    }

    #[test]
    fn ipv6_keeps_hop_by_hop_and_routing_in_every_fragment() {
        // Hop-by-hop (8 bytes, PadN), destination options before a routing
        // header, the routing header, then destination options after it
        // (fragmentable) and UDP.
        let hbh = [ip_proto::DST_OPTS, 0, 1, 4, 0, 0, 0, 0];
        let dst1 = [ip_proto::ROUTING, 0, 1, 4, 0, 0, 0, 0];
        let rh = [ip_proto::DST_OPTS, 0, 0, 0, 0, 0, 0, 0];
        let dst2 = [ip_proto::UDP, 0, 1, 4, 0, 0, 0, 0];
        let ext: Vec<u8> = [hbh, dst1, rh, dst2].concat();
        let pkt = v6(4000, &ext, ip_proto::HOP_BY_HOP);
        let frags = cut(&pkt, 0, 1280).unwrap();
        for f in &frags {
            assert_eq!(&f[40..56], &ext[..16], "unfragmentable part repeated");
            assert_eq!(&f[57..64], &ext[17..24]);
            let fi = ipv6::walk_bytes(f)
                .unwrap()
                .fragment
                .expect("fragment header");
            assert_eq!(fi.header_offset, 64);
            assert_eq!(fi.repr.next_header, ip_proto::DST_OPTS);
            assert_eq!(f[40 + 16], ip_proto::FRAGMENT, "routing header names it");
        }
        assert_eq!(join(&frags, &[3, 1, 0, 2]), pkt);
    }
}
