//! Builders for whole, well-formed frames (Ethernet + IPv4/IPv6 + TCP/UDP)
//! with every length and checksum filled in. Used by tests, fuzz targets,
//! benchmarks and traffic generators on both sides of the device.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{
    ethernet::{self, ethertype, Address},
    ip_proto, ipv4, ipv6, tcp, udp, Error, Result,
};
use crate::checksum;

/// Addresses and ports of one flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    pub src_mac: Address,
    pub dst_mac: Address,
    pub src_ip: IpAddr,
    pub dst_ip: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
}

impl Flow {
    /// 192.0.2.1:40000 -> 192.0.2.2:5201.
    pub fn v4() -> Flow {
        Flow {
            src_mac: Address([2, 0, 0, 0, 0, 1]),
            dst_mac: Address([2, 0, 0, 0, 0, 2]),
            src_ip: IpAddr::from([192, 0, 2, 1]),
            dst_ip: IpAddr::from([192, 0, 2, 2]),
            src_port: 40000,
            dst_port: 5201,
        }
    }
    /// [2001:db8::1]:40000 -> [2001:db8::2]:5201.
    pub fn v6() -> Flow {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        a[15] = 1;
        let mut b = a;
        b[15] = 2;
        Flow {
            src_ip: IpAddr::from(a),
            dst_ip: IpAddr::from(b),
            ..Flow::v4()
        }
    }
}

/// Per-frame IP fields the builders let a caller choose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpFields {
    pub ident: u16,
    pub ttl: u8,
    /// DSCP/ECN (IPv4) or traffic class (IPv6).
    pub tos: u8,
    pub dont_frag: bool,
}

impl Default for IpFields {
    fn default() -> Self {
        IpFields {
            ident: 1,
            ttl: 64,
            tos: 0,
            dont_frag: true,
        }
    }
}

/// Writes Ethernet + IP headers for an L4 segment of `l4_len` bytes;
/// returns the frame (L4 area zeroed) and the L4 offset.
fn ip_frame(flow: &Flow, proto: u8, l4_len: usize, ip: &IpFields) -> Result<(Vec<u8>, usize)> {
    match (flow.src_ip, flow.dst_ip) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let r = ipv4::Repr {
                src_addr: s,
                dst_addr: d,
                protocol: proto,
                payload_len: l4_len,
                ttl: ip.ttl,
                dscp_ecn: ip.tos,
                ident: ip.ident,
                dont_frag: ip.dont_frag,
                more_frags: false,
                frag_offset: 0,
                options: ipv4::Options::default(),
            };
            let mut f = vec![0u8; ethernet::HEADER_LEN + r.buffer_len()];
            eth(flow, ethertype::IPV4, &mut f)?;
            r.emit(&mut ipv4::Packet::new_unchecked(
                &mut f[ethernet::HEADER_LEN..],
            ))?;
            Ok((f, ethernet::HEADER_LEN + r.header_len()))
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let r = ipv6::Repr {
                src_addr: s,
                dst_addr: d,
                next_header: proto,
                payload_len: l4_len,
                hop_limit: ip.ttl,
                traffic_class: ip.tos,
                flow_label: 0,
            };
            let mut f = vec![0u8; ethernet::HEADER_LEN + r.buffer_len()];
            eth(flow, ethertype::IPV6, &mut f)?;
            r.emit(&mut ipv6::Packet::new_unchecked(
                &mut f[ethernet::HEADER_LEN..],
            ))?;
            Ok((f, ethernet::HEADER_LEN + ipv6::HEADER_LEN))
        }
        _ => Err(Error::Malformed("mixed address families")),
    }
}

fn eth(flow: &Flow, et: u16, f: &mut [u8]) -> Result<()> {
    ethernet::Repr {
        src: flow.src_mac,
        dst: flow.dst_mac,
        ethertype: et,
    }
    .emit(&mut ethernet::Frame::new_unchecked(f))
}

/// The pseudo-header sum of a flow for an L4 segment of `len` bytes.
pub fn pseudo_header(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u16 {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => checksum::pseudo_header_v4(s, d, proto, len as u32),
        (IpAddr::V6(s), IpAddr::V6(d)) => checksum::pseudo_header_v6(s, d, proto, len as u32),
        _ => 0,
    }
}

/// A TCP frame carrying `payload`; `repr.payload_len` is overwritten.
pub fn tcp_frame(
    flow: &Flow,
    mut repr: tcp::Repr,
    ip: &IpFields,
    payload: &[u8],
) -> Result<Vec<u8>> {
    repr.src_port = flow.src_port;
    repr.dst_port = flow.dst_port;
    repr.payload_len = payload.len();
    let (mut f, l4) = ip_frame(flow, ip_proto::TCP, repr.buffer_len(), ip)?;
    f[l4 + repr.header_len()..].copy_from_slice(payload);
    let ps = pseudo_header(flow.src_ip, flow.dst_ip, ip_proto::TCP, repr.buffer_len());
    repr.emit(&mut tcp::Packet::new_unchecked(&mut f[l4..]), Some(ps))?;
    Ok(f)
}

/// A UDP frame carrying `payload`.
pub fn udp_frame(flow: &Flow, ip: &IpFields, payload: &[u8]) -> Result<Vec<u8>> {
    let r = udp::Repr {
        src_port: flow.src_port,
        dst_port: flow.dst_port,
        payload_len: payload.len(),
    };
    let (mut f, l4) = ip_frame(flow, ip_proto::UDP, r.buffer_len(), ip)?;
    f[l4 + udp::HEADER_LEN..].copy_from_slice(payload);
    let ps = pseudo_header(flow.src_ip, flow.dst_ip, ip_proto::UDP, r.buffer_len());
    r.emit(&mut udp::Packet::new_unchecked(&mut f[l4..]), Some(ps))?;
    Ok(f)
}

/// A plain data segment header: ACK set, timestamps on, as Linux sends.
pub fn data_segment(seq: u32, ack: u32, flags: tcp::Flags) -> tcp::Repr {
    tcp::Repr {
        src_port: 0,
        dst_port: 0,
        seq_number: seq,
        ack_number: ack,
        flags,
        window_len: 502,
        urgent_at: 0,
        mss: None,
        window_scale: None,
        sack_permitted: false,
        sack_ranges: [None; tcp::MAX_SACK_BLOCKS],
        timestamp: Some((1000, 2000)),
        payload_len: 0,
    }
}

/// One IPv4 fragment (IP packet, no Ethernet header) of a UDP datagram
/// 192.0.2.1 -> 192.0.2.2 with identification `ident`, carrying
/// `payload` at byte `offset`.
pub fn ipv4_fragment(ident: u16, offset: usize, more: bool, payload: &[u8]) -> Result<Vec<u8>> {
    ipv4_fragment_with_options(ident, offset, more, &[], payload)
}

/// [`ipv4_fragment`] with `options` (well formed, a multiple of 4 bytes,
/// at most 40) in its header.
pub fn ipv4_fragment_with_options(
    ident: u16,
    offset: usize,
    more: bool,
    options: &[u8],
    payload: &[u8],
) -> Result<Vec<u8>> {
    let r = ipv4::Repr {
        src_addr: Ipv4Addr::new(192, 0, 2, 1),
        dst_addr: Ipv4Addr::new(192, 0, 2, 2),
        protocol: ip_proto::UDP,
        payload_len: payload.len(),
        ttl: 64,
        dscp_ecn: 0,
        ident,
        dont_frag: false,
        more_frags: more,
        frag_offset: offset,
        options: ipv4::Options::new(options)?,
    };
    let mut b = vec![0u8; r.buffer_len()];
    r.emit(&mut ipv4::Packet::new_unchecked(&mut b[..]))?;
    b[r.header_len()..].copy_from_slice(payload);
    Ok(b)
}

/// One IPv6 fragment (fixed header, fragment header, payload) of a UDP
/// datagram 2001:db8::1 -> 2001:db8::2 with identification `ident`.
pub fn ipv6_fragment(ident: u32, offset: usize, more: bool, payload: &[u8]) -> Result<Vec<u8>> {
    ipv6_fragment_with_dst_opts(ident, offset, more, 0, payload)
}

/// Option type of the padding [`ipv6_fragment_with_dst_opts`] puts in its
/// destination-options header: RFC 4727's experiment value, skipped by a
/// receiver that does not know it.
pub const EXPERIMENT_OPTION: u8 = 0x1e;

/// [`ipv6_fragment`] with a destination-options header of `dst_opts_len`
/// bytes (0 for none, else a multiple of 8 up to 2048) before the
/// fragment header, in the unfragmentable part.
pub fn ipv6_fragment_with_dst_opts(
    ident: u32,
    offset: usize,
    more: bool,
    dst_opts_len: usize,
    payload: &[u8],
) -> Result<Vec<u8>> {
    if dst_opts_len % 8 != 0 || dst_opts_len > 2048 {
        return Err(Error::Malformed("ipv6 options header length"));
    }
    let r = ipv6::Repr {
        src_addr: Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1),
        dst_addr: Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2),
        next_header: if dst_opts_len == 0 {
            ip_proto::FRAGMENT
        } else {
            ip_proto::DST_OPTS
        },
        payload_len: dst_opts_len + ipv6::FRAG_HEADER_LEN + payload.len(),
        hop_limit: 64,
        traffic_class: 0,
        flow_label: 0,
    };
    let mut b = vec![0u8; r.buffer_len()];
    r.emit(&mut ipv6::Packet::new_unchecked(&mut b[..]))?;
    let mut at = ipv6::HEADER_LEN;
    if dst_opts_len > 0 {
        // Options of up to 255 data bytes fill the header; a last lone
        // byte is a Pad1.
        let mut area = vec![0u8; dst_opts_len - 2];
        let mut i = 0;
        while area.len() - i >= 2 {
            let n = (area.len() - i - 2).min(255);
            area[i] = EXPERIMENT_OPTION;
            area[i + 1] = n as u8;
            i += 2 + n;
        }
        ipv6::OptionsRepr {
            next_header: ip_proto::FRAGMENT,
            options: &area,
        }
        .emit(&mut b[at..at + dst_opts_len])?;
        at += dst_opts_len;
    }
    ipv6::FragmentRepr {
        next_header: ip_proto::UDP,
        offset,
        more,
        ident,
    }
    .emit(&mut b[at..at + ipv6::FRAG_HEADER_LEN])?;
    b[at + ipv6::FRAG_HEADER_LEN..].copy_from_slice(payload);
    Ok(b)
}
