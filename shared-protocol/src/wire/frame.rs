//! One pass over a whole Ethernet frame: tags, network header, extension
//! headers and transport header, with the offsets later stages need.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{
    ethernet::{self, ethertype, Address, VlanRepr, VlanTag},
    ip_proto, ipv4, ipv6, need, tcp, udp, Error, Result,
};

/// Most VLAN tags [`parse_frame`] steps over (an 802.1ad S-tag and an
/// 802.1Q C-tag). A frame with more is parsed as an unknown EtherType.
pub const MAX_VLAN_TAGS: usize = 2;

/// The network layer of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L3Info {
    Ipv4 {
        src: Ipv4Addr,
        dst: Ipv4Addr,
        protocol: u8,
        header_len: usize,
        total_len: usize,
        /// Any fragment, first or not.
        fragment: bool,
    },
    Ipv6 {
        src: Ipv6Addr,
        dst: Ipv6Addr,
        /// Fixed header plus payload length.
        total_len: usize,
        ext: ipv6::ExtWalk,
    },
    Arp,
    /// An EtherType this parser does not look into.
    Other,
}

impl L3Info {
    /// The upper-layer protocol of an IP packet.
    pub fn protocol(&self) -> Option<u8> {
        match self {
            L3Info::Ipv4 { protocol, .. } => Some(*protocol),
            L3Info::Ipv6 { ext, .. } => Some(ext.upper_proto),
            _ => None,
        }
    }
    pub fn is_fragment(&self) -> bool {
        match self {
            L3Info::Ipv4 { fragment, .. } => *fragment,
            L3Info::Ipv6 { ext, .. } => ext.fragment.is_some(),
            _ => false,
        }
    }
    pub fn addrs(&self) -> Option<(IpAddr, IpAddr)> {
        match *self {
            L3Info::Ipv4 { src, dst, .. } => Some((src.into(), dst.into())),
            L3Info::Ipv6 { src, dst, .. } => Some((src.into(), dst.into())),
            _ => None,
        }
    }
}

/// The transport layer of an unfragmented IP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L4Info {
    pub protocol: u8,
    /// Offset of the transport header from the start of the frame.
    pub offset: usize,
    /// Length of the transport header (TCP with options, UDP 8, ICMP 8).
    pub header_len: usize,
    /// Ports for TCP and UDP, zero otherwise.
    pub src_port: u16,
    pub dst_port: u16,
}

/// Everything [`parse_frame`] learned about a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameInfo {
    pub src: Address,
    pub dst: Address,
    pub vlans: [Option<VlanRepr>; MAX_VLAN_TAGS],
    /// The EtherType after the tags.
    pub ethertype: u16,
    /// Offset of the network header from the start of the frame.
    pub l3_offset: usize,
    pub l3: L3Info,
    pub l4: Option<L4Info>,
}

impl FrameInfo {
    /// End of the IP packet within the frame (past it is link padding);
    /// the frame length for anything else.
    pub fn l3_end(&self, frame_len: usize) -> usize {
        match self.l3 {
            L3Info::Ipv4 { total_len, .. } | L3Info::Ipv6 { total_len, .. } => {
                self.l3_offset + total_len
            }
            _ => frame_len,
        }
    }
    /// Offset of the transport payload, when there is a transport header.
    pub fn payload_offset(&self) -> Option<usize> {
        self.l4.map(|l| l.offset + l.header_len)
    }
}

/// The transport header at `offset` (from the frame start), given the
/// bytes at hand and where the IP packet ends within the frame.
fn l4_info(protocol: u8, prefix: &[u8], offset: usize, l3_end: usize) -> Result<Option<L4Info>> {
    let seg = prefix.get(offset..).unwrap_or(&[]);
    let seg_len = l3_end.saturating_sub(offset);
    let (header_len, src_port, dst_port) = match protocol {
        ip_proto::TCP => {
            need(seg, tcp::HEADER_LEN, "tcp header")?;
            let t = tcp::Packet::new_unchecked(seg);
            let hl = t.header_len();
            if hl < tcp::HEADER_LEN {
                return Err(Error::Malformed("tcp data offset"));
            }
            if hl > seg_len {
                return Err(Error::Truncated("tcp options"));
            }
            need(seg, hl, "tcp options")?;
            (hl, t.src_port(), t.dst_port())
        }
        ip_proto::UDP => {
            need(seg, udp::HEADER_LEN, "udp header")?;
            let u = udp::Packet::new_unchecked(seg);
            if u.len() < udp::HEADER_LEN {
                return Err(Error::Malformed("udp length"));
            }
            if u.len() != seg_len {
                return Err(Error::Malformed("udp length differs from ip length"));
            }
            (udp::HEADER_LEN, u.src_port(), u.dst_port())
        }
        ip_proto::ICMP | ip_proto::ICMPV6 => {
            if seg_len < 8 {
                return Err(Error::Truncated("icmp header"));
            }
            (8, 0, 0)
        }
        _ => return Ok(None),
    };
    Ok(Some(L4Info {
        protocol,
        offset,
        header_len,
        src_port,
        dst_port,
    }))
}

/// Parses a frame from the Ethernet header down to the transport header.
///
/// Checks every length on the way; checksums are not verified (the caller
/// decides whether it trusts them). Fragments carry no [`L4Info`].
pub fn parse_frame(frame: &[u8]) -> Result<FrameInfo> {
    parse_frame_prefix(frame, frame.len())
}

/// [`parse_frame`] for a frame of `frame_len` bytes of which only the first
/// ones, `prefix`, are at hand (a device that copies the headers out of
/// guest memory and leaves the payload there). Every header must lie in
/// `prefix`; lengths are checked against `frame_len`.
pub fn parse_frame_prefix(prefix: &[u8], frame_len: usize) -> Result<FrameInfo> {
    if prefix.len() > frame_len {
        return Err(Error::Malformed("prefix longer than the frame"));
    }
    let eth = ethernet::Frame::new_checked(prefix)?;
    let mut info = FrameInfo {
        src: eth.src_addr(),
        dst: eth.dst_addr(),
        vlans: [None; MAX_VLAN_TAGS],
        ethertype: eth.ethertype(),
        l3_offset: ethernet::HEADER_LEN,
        l3: L3Info::Other,
        l4: None,
    };
    for slot in info.vlans.iter_mut() {
        if !ethernet::is_vlan_tpid(info.ethertype) {
            break;
        }
        let tag = VlanTag::new_checked(&prefix[info.l3_offset..])?;
        let v = VlanRepr::parse(info.ethertype, &tag)?;
        *slot = Some(v);
        info.ethertype = v.inner;
        info.l3_offset += ethernet::VLAN_TAG_LEN;
    }
    let l3 = &prefix[info.l3_offset..];
    let l3_room = frame_len - info.l3_offset;
    match info.ethertype {
        ethertype::IPV4 => {
            need(l3, ipv4::HEADER_LEN, "ipv4 header")?;
            let p = ipv4::Packet::new_unchecked(l3);
            if p.version() != 4 {
                return Err(Error::Malformed("ipv4 version"));
            }
            let hl = p.header_len();
            if hl < ipv4::HEADER_LEN {
                return Err(Error::Malformed("ipv4 header length"));
            }
            need(l3, hl, "ipv4 header")?;
            let total = p.total_len();
            if total < hl {
                return Err(Error::Malformed("ipv4 total length"));
            }
            if total > l3_room {
                return Err(Error::Truncated("ipv4 packet"));
            }
            let fragment = p.is_fragment();
            info.l3 = L3Info::Ipv4 {
                src: p.src_addr(),
                dst: p.dst_addr(),
                protocol: p.protocol(),
                header_len: hl,
                total_len: total,
                fragment,
            };
            if !fragment {
                let off = info.l3_offset + hl;
                info.l4 = l4_info(p.protocol(), prefix, off, info.l3_offset + total)?;
            }
        }
        ethertype::IPV6 => {
            need(l3, ipv6::HEADER_LEN, "ipv6 header")?;
            let p = ipv6::Packet::new_unchecked(l3);
            if l3[0] >> 4 != 6 {
                return Err(Error::Malformed("ipv6 version"));
            }
            let total = ipv6::HEADER_LEN + p.payload_len();
            if total > l3_room {
                return Err(Error::Truncated("ipv6 packet"));
            }
            let ext = ipv6::walk_bytes(&l3[..total.min(l3.len())])?;
            info.l3 = L3Info::Ipv6 {
                src: p.src_addr(),
                dst: p.dst_addr(),
                total_len: total,
                ext,
            };
            if ext.fragment.is_none() {
                if ext.upper_offset > total {
                    return Err(Error::Truncated("ipv6 upper layer"));
                }
                let off = info.l3_offset + ext.upper_offset;
                info.l4 = l4_info(ext.upper_proto, prefix, off, info.l3_offset + total)?;
            }
        }
        ethertype::ARP => {
            super::arp::Packet::new_checked(l3)?;
            info.l3 = L3Info::Arp;
        }
        _ => {}
    }
    Ok(info)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::wire::{
        build::{data_segment, tcp_frame, Flow, IpFields},
        tcp::Flags,
    };

    /// An Ethernet + IPv4 + TCP frame with valid checksums.
    pub(crate) fn tcp4_frame(payload: &[u8], seq: u32, flags: Flags) -> Vec<u8> {
        let ip = IpFields {
            ident: 100,
            ..Default::default()
        };
        tcp_frame(&Flow::v4(), data_segment(seq, 1, flags), &ip, payload).unwrap()
    }
    #[test]
    fn tcp4_layers() {
        let f = tcp4_frame(b"0123456789", 7, Flags::ACK);
        let i = parse_frame(&f).unwrap();
        assert_eq!(i.l3_offset, 14);
        assert_eq!(i.l3.protocol(), Some(ip_proto::TCP));
        let l4 = i.l4.unwrap();
        assert_eq!((l4.offset, l4.header_len), (34, 32));
        assert_eq!((l4.src_port, l4.dst_port), (40000, 5201));
        assert_eq!(&f[i.payload_offset().unwrap()..], b"0123456789");
    }

    #[test]
    fn qinq_tagged_frame() {
        let inner = tcp4_frame(b"x", 1, Flags::ACK);
        let mut f = inner[..12].to_vec();
        f.extend_from_slice(&[0x88, 0xa8, 0x00, 0x0a, 0x81, 0x00, 0x20, 0x14]);
        f.extend_from_slice(&inner[12..]);
        let i = parse_frame(&f).unwrap();
        assert_eq!(i.vlans[0].unwrap().vid, 10);
        assert_eq!(i.vlans[0].unwrap().tpid, ethertype::QINQ);
        assert_eq!(i.vlans[1].unwrap().vid, 20);
        assert_eq!(i.vlans[1].unwrap().pcp, 1);
        assert_eq!(i.ethertype, ethertype::IPV4);
        assert_eq!(i.l3_offset, 22);
        assert_eq!(i.l4.unwrap().src_port, 40000);
    }

    #[test]
    fn truncated_transport_is_an_error() {
        let f = tcp4_frame(b"", 1, Flags::ACK);
        // Shrink the IPv4 total length so the TCP options no longer fit.
        let mut g = f.clone();
        g[16..18].copy_from_slice(&(20u16 + 24).to_be_bytes());
        assert!(parse_frame(&g).is_err());
        assert!(parse_frame(&f[..40]).is_err());
    }
}
