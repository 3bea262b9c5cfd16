//! Building the frames an endpoint sends: Ethernet, IPv4/IPv6 headers,
//! checksums and the virtio-net header that asks a device for checksum
//! and TSO; TCP segments from the engine, ARP requests and neighbour
//! solicitations. The guest stack and the device's TOE both send with
//! these.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::{
    checksum,
    tcp::Segment,
    virtio::{hdr::GsoType, HdrFlags, VirtioNetHdr},
    wire::{
        arp,
        ethernet::{ethertype, Address},
        icmpv4, icmpv6, ip_proto, tcp as wtcp,
    },
};

pub const ETH_LEN: usize = 14;

/// Starts a frame in `buf`: Ethernet header with a destination filled in
/// later (zero now) unless given.
pub fn eth(buf: &mut Vec<u8>, dst: Option<Address>, src: Address, ethertype: u16) {
    buf.clear();
    buf.extend_from_slice(&dst.map_or([0u8; 6], |d| d.0));
    buf.extend_from_slice(src.as_bytes());
    buf.extend_from_slice(&ethertype.to_be_bytes());
}

pub fn ethertype_of(ip: IpAddr) -> u16 {
    match ip {
        IpAddr::V4(_) => 0x0800,
        IpAddr::V6(_) => 0x86dd,
    }
}

/// Appends an IP header for `l4_len` bytes of `proto`; returns its length.
pub fn ip(
    buf: &mut Vec<u8>,
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    l4_len: usize,
    ident: u16,
    hop: u8,
) -> usize {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let at = buf.len();
            let total = (20 + l4_len).min(65535) as u16;
            buf.extend_from_slice(&[0x45, 0]);
            buf.extend_from_slice(&total.to_be_bytes());
            buf.extend_from_slice(&ident.to_be_bytes());
            buf.extend_from_slice(&[0x40, 0, hop, proto, 0, 0]);
            buf.extend_from_slice(&s.octets());
            buf.extend_from_slice(&d.octets());
            let c = checksum::checksum(&buf[at..at + 20]);
            buf[at + 10..at + 12].copy_from_slice(&c.to_be_bytes());
            20
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            buf.extend_from_slice(&[0x60, 0, 0, 0]);
            buf.extend_from_slice(&(l4_len.min(65535) as u16).to_be_bytes());
            buf.extend_from_slice(&[proto, hop]);
            buf.extend_from_slice(&s.octets());
            buf.extend_from_slice(&d.octets());
            40
        }
        _ => 0,
    }
}

pub fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u16 {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => checksum::pseudo_header_v4(s, d, proto, len as u32),
        (IpAddr::V6(s), IpAddr::V6(d)) => checksum::pseudo_header_v6(s, d, proto, len as u32),
        _ => 0,
    }
}

/// Fills the L4 checksum at `l4 + csum_off`: with `offload` only the
/// pseudo-header sum and a NEEDS_CSUM header for the device, else the
/// whole checksum. UDP's zero becomes 0xffff.
pub fn l4_checksum(
    buf: &mut [u8],
    l4: usize,
    csum_off: usize,
    ps: u16,
    offload: bool,
) -> VirtioNetHdr {
    let at = l4 + csum_off;
    if offload {
        buf[at..at + 2].copy_from_slice(&ps.to_be_bytes());
        VirtioNetHdr {
            flags: HdrFlags::NEEDS_CSUM,
            csum_start: l4 as u16,
            csum_offset: csum_off as u16,
            ..VirtioNetHdr::default()
        }
    } else {
        buf[at..at + 2].copy_from_slice(&[0, 0]);
        let mut c = !checksum::add(ps, checksum::sum(&buf[l4..]));
        if c == 0 && csum_off == 6 {
            c = 0xffff;
        }
        buf[at..at + 2].copy_from_slice(&c.to_be_bytes());
        VirtioNetHdr::default()
    }
}

/// Marks `hdr` for TSO of a TCP super-frame.
pub fn tso(hdr: &mut VirtioNetHdr, v6: bool, hdr_len: usize, mss: usize) {
    hdr.gso_type = if v6 { GsoType::TcpV6 } else { GsoType::TcpV4 } as u8;
    hdr.gso_size = mss as u16;
    hdr.hdr_len = hdr_len as u16;
}

/// The Ethernet multicast address of an IPv6 multicast address.
pub fn ipv6_multicast_mac(a: Ipv6Addr) -> Address {
    let o = a.octets();
    Address([0x33, 0x33, o[12], o[13], o[14], o[15]])
}

pub const TCP: u8 = ip_proto::TCP;
pub const UDP: u8 = ip_proto::UDP;

/// Largest TCP payload in one super-segment handed to a device's TSO:
/// what fits a 64 KiB IP packet with the longest headers.
pub const TSO_MAX_PAYLOAD: usize = 65535 - ETH_LEN - 40 - 60;

/// Builds in `buf` the frame of TCP segment `seg` from `local` to
/// `remote` (destination MAC zero, to be filled in once the next hop is
/// known). With `offload` the checksum is left to the device, and a
/// payload longer than the segment's MSS is marked for TSO; without it
/// the checksum is complete and the payload must fit one MSS. None when
/// the header cannot be written.
pub fn tcp_segment(
    buf: &mut Vec<u8>,
    mac: Address,
    local: SocketAddr,
    remote: SocketAddr,
    seg: &Segment<'_>,
    ident: u16,
    offload: bool,
) -> Option<VirtioNetHdr> {
    tcp_frame(buf, mac, local, remote, seg, ident, offload, true)
}

/// [`tcp_segment`] with the checksum left to the device, but only the
/// headers: the segment's payload (`seg.payload`, in that order) is to
/// follow them as it is, so that a sender writing both in one vectored
/// write never copies it.
pub fn tcp_headers(
    buf: &mut Vec<u8>,
    mac: Address,
    local: SocketAddr,
    remote: SocketAddr,
    seg: &Segment<'_>,
    ident: u16,
) -> Option<VirtioNetHdr> {
    tcp_frame(buf, mac, local, remote, seg, ident, true, false)
}

#[allow(clippy::too_many_arguments)]
fn tcp_frame(
    buf: &mut Vec<u8>,
    mac: Address,
    local: SocketAddr,
    remote: SocketAddr,
    seg: &Segment<'_>,
    ident: u16,
    offload: bool,
    payload: bool,
) -> Option<VirtioNetHdr> {
    eth(buf, None, mac, ethertype_of(remote.ip()));
    let hl = seg.repr.header_len();
    let l4_len = hl + seg.payload_len();
    let iphl = ip(buf, local.ip(), remote.ip(), TCP, l4_len, ident, 64);
    let l4 = buf.len();
    buf.resize(l4 + hl, 0);
    let mut repr = seg.repr;
    repr.payload_len = 0;
    repr.emit(&mut wtcp::Packet::new_unchecked(&mut buf[l4..]), None)
        .ok()?;
    if payload {
        buf.extend_from_slice(seg.payload[0]);
        buf.extend_from_slice(seg.payload[1]);
    }
    let ps = pseudo(local.ip(), remote.ip(), TCP, l4_len);
    // With the checksum left to the device only the pseudo-header's sum
    // is written: the payload is not read.
    let mut hdr = l4_checksum(buf, l4, wtcp::CHECKSUM_OFFSET, ps, offload);
    if offload && seg.payload_len() > seg.mss {
        tso(&mut hdr, remote.is_ipv6(), ETH_LEN + iphl + hl, seg.mss);
    }
    Some(hdr)
}

/// Builds in `buf` a broadcast ARP request from `mac`/`me` for `target`.
pub fn arp_request(buf: &mut Vec<u8>, mac: Address, me: Ipv4Addr, target: Ipv4Addr) {
    eth(buf, Some(Address::BROADCAST), mac, ethertype::ARP);
    let r = arp::Repr {
        operation: arp::OP_REQUEST,
        source_hardware_addr: mac,
        source_protocol_addr: me,
        target_hardware_addr: Address([0; 6]),
        target_protocol_addr: target,
    };
    arp_append(buf, &r);
}

/// Appends ARP message `r` to `buf`.
pub fn arp_append(buf: &mut Vec<u8>, r: &arp::Repr) {
    let at = buf.len();
    buf.resize(at + r.buffer_len(), 0);
    let _ = r.emit(&mut arp::Packet::new_unchecked(&mut buf[at..]));
}

/// Builds in `buf` a neighbour solicitation from `mac`/`me` for
/// `target`, to its solicited-node group.
pub fn neighbor_solicit(buf: &mut Vec<u8>, mac: Address, me: Ipv6Addr, target: Ipv6Addr) {
    let group = icmpv6::solicited_node(target);
    eth(buf, Some(ipv6_multicast_mac(group)), mac, ethertype::IPV6);
    let m = icmpv6::Repr::NeighborSolicit {
        target,
        source_lladdr: Some(mac),
    };
    icmpv6_append(buf, me, group, &m, 255);
}

/// Appends an IPv4 header (identification `ident`) and the ICMP message
/// `r` with its checksum.
pub fn icmpv4_append(
    buf: &mut Vec<u8>,
    s: Ipv4Addr,
    d: Ipv4Addr,
    r: &icmpv4::Repr<'_>,
    ident: u16,
) {
    let len = r.buffer_len();
    ip(
        buf,
        IpAddr::V4(s),
        IpAddr::V4(d),
        ip_proto::ICMP,
        len,
        ident,
        64,
    );
    let at = buf.len();
    buf.resize(at + len, 0);
    let _ = r.emit(&mut icmpv4::Packet::new_unchecked(&mut buf[at..]));
}

/// Appends an IPv6 header and the ICMPv6 message `m` with its checksum
/// (neighbour discovery needs hop limit 255).
pub fn icmpv6_append(
    buf: &mut Vec<u8>,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    m: &icmpv6::Repr<'_>,
    hop: u8,
) {
    let len = m.buffer_len();
    ip(
        buf,
        IpAddr::V6(src),
        IpAddr::V6(dst),
        ip_proto::ICMPV6,
        len,
        0,
        hop,
    );
    let at = buf.len();
    buf.resize(at + len, 0);
    let ps = pseudo(IpAddr::V6(src), IpAddr::V6(dst), ip_proto::ICMPV6, len);
    let _ = m.emit(&mut icmpv6::Packet::new_unchecked(&mut buf[at..]), ps);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        tcp::{Config, Connection, Instant},
        wire::{ipv4, ipv6},
    };

    const MAC: Address = Address([2, 0, 0, 0, 0, 1]);

    /// A SYN and then a data segment, built and read back: addresses,
    /// ports, flags, payload and a checksum that verifies (or the
    /// pseudo-header sum and NEEDS_CSUM when offloaded).
    #[test]
    fn tcp_segments_read_back() {
        for (local, remote) in [
            ("192.0.2.2:50000", "192.0.2.1:5201"),
            ("[2001:db8::2]:50000", "[2001:db8::1]:5201"),
        ] {
            let (local, remote): (SocketAddr, SocketAddr) =
                (local.parse().unwrap(), remote.parse().unwrap());
            let mut c = Connection::connect(Config::default(), Instant(0), 50000, 5201, 7);
            let seg = c.poll_transmit(Instant(0), 1460).unwrap();
            let mut buf = Vec::new();
            let hdr = tcp_segment(&mut buf, MAC, local, remote, &seg, 9, false).unwrap();
            assert_eq!(hdr, VirtioNetHdr::default());
            assert_eq!(&buf[6..12], MAC.as_bytes());
            let l4 = match remote {
                SocketAddr::V4(_) => {
                    let p = ipv4::Packet::new_checked(&buf[ETH_LEN..]).unwrap();
                    let r = ipv4::Repr::parse(&p).unwrap();
                    assert_eq!(IpAddr::V4(r.dst_addr), remote.ip());
                    assert_eq!(p.ident(), 9);
                    ETH_LEN + 20
                }
                SocketAddr::V6(_) => {
                    let p = ipv6::Packet::new_checked(&buf[ETH_LEN..]).unwrap();
                    let r = ipv6::Repr::parse(&p).unwrap();
                    assert_eq!(IpAddr::V6(r.src_addr), local.ip());
                    ETH_LEN + 40
                }
            };
            let ps = pseudo(local.ip(), remote.ip(), TCP, buf.len() - l4);
            let p = wtcp::Packet::new_checked(&buf[l4..]).unwrap();
            let r = wtcp::Repr::parse(&p, Some(ps)).unwrap();
            assert_eq!((r.src_port, r.dst_port), (50000, 5201));
            assert_eq!(r.flags, wtcp::Flags::SYN);

            // Offloaded: the pseudo-header sum in place, NEEDS_CSUM at the
            // TCP header.
            let hdr = tcp_segment(&mut buf, MAC, local, remote, &seg, 9, true).unwrap();
            assert!(hdr.flags.contains(HdrFlags::NEEDS_CSUM));
            assert_eq!(usize::from(hdr.csum_start), l4);
            let at = l4 + wtcp::CHECKSUM_OFFSET;
            assert_eq!(u16::from_be_bytes([buf[at], buf[at + 1]]), ps);
            assert_eq!(hdr.gso_type, GsoType::None as u8);
        }
    }

    /// Headers alone, then the payload after them, are the offloaded
    /// frame byte for byte, TSO marking included.
    #[test]
    fn tcp_headers_then_payload_are_the_frame() {
        let (local, remote): (SocketAddr, SocketAddr) = (
            "192.0.2.2:50000".parse().unwrap(),
            "192.0.2.1:5201".parse().unwrap(),
        );
        let data: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let mut repr = crate::wire::build::data_segment(1000, 1, wtcp::Flags::ACK);
        repr.payload_len = data.len();
        let seg = Segment {
            repr,
            payload: [&data[..3000], &data[3000..]],
            mss: 1448,
        };
        let mut whole = Vec::new();
        let h1 = tcp_segment(&mut whole, MAC, local, remote, &seg, 9, true).unwrap();
        let mut head = Vec::new();
        let h2 = tcp_headers(&mut head, MAC, local, remote, &seg, 9).unwrap();
        assert_eq!(h1, h2);
        assert_eq!(h2.gso_type, GsoType::TcpV4 as u8);
        assert_eq!(usize::from(h2.hdr_len), head.len());
        head.extend_from_slice(&data);
        assert_eq!(head, whole);
    }

    #[test]
    fn solicitations_read_back() {
        let mut buf = Vec::new();
        let (me, target) = (Ipv4Addr::new(192, 0, 2, 2), Ipv4Addr::new(192, 0, 2, 1));
        arp_request(&mut buf, MAC, me, target);
        assert_eq!(&buf[..6], &[0xff; 6]);
        let r = arp::Repr::parse(&arp::Packet::new_checked(&buf[ETH_LEN..]).unwrap()).unwrap();
        assert_eq!(r.operation, arp::OP_REQUEST);
        assert_eq!(
            (r.source_protocol_addr, r.target_protocol_addr),
            (me, target)
        );
        assert_eq!(r.source_hardware_addr, MAC);

        let (me, target): (Ipv6Addr, Ipv6Addr) = (
            "2001:db8::2".parse().unwrap(),
            "2001:db8::1:7".parse().unwrap(),
        );
        neighbor_solicit(&mut buf, MAC, me, target);
        assert_eq!(&buf[..6], &[0x33, 0x33, 0xff, 0x01, 0, 7]);
        let p = ipv6::Packet::new_checked(&buf[ETH_LEN..]).unwrap();
        let ip = ipv6::Repr::parse(&p).unwrap();
        assert_eq!(ip.hop_limit, 255);
        assert_eq!(ip.dst_addr, icmpv6::solicited_node(target));
        let ps = pseudo(
            IpAddr::V6(me),
            IpAddr::V6(ip.dst_addr),
            ip_proto::ICMPV6,
            p.payload().len(),
        );
        let ic = icmpv6::Packet::new_checked(p.payload()).unwrap();
        let m = icmpv6::Repr::parse(&ic, ps).unwrap();
        assert_eq!(
            m,
            icmpv6::Repr::NeighborSolicit {
                target,
                source_lladdr: Some(MAC)
            }
        );
    }
}
