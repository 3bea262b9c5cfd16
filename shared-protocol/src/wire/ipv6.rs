//! IPv6 (RFC 8200) and its extension headers: hop-by-hop options, routing,
//! fragment and destination options, walked to the upper-layer header.

use core::net::Ipv6Addr;

use super::{be16, be32, ip_proto, need, put16, put32, Error, Field, Result};

mod field {
    use super::Field;
    pub const VER_TC_FLOW: Field = 0..4;
    pub const LENGTH: Field = 4..6;
    pub const NXT_HDR: usize = 6;
    pub const HOP_LIMIT: usize = 7;
    pub const SRC: Field = 8..24;
    pub const DST: Field = 24..40;
}

/// Length of the fixed IPv6 header.
pub const HEADER_LEN: usize = field::DST.end;
/// Offset of the next-header field in the fixed header.
pub const NEXT_HEADER_OFFSET: usize = field::NXT_HDR;
/// Length of a fragment header.
pub const FRAG_HEADER_LEN: usize = 8;
/// Most extension headers [`walk`] follows before giving up.
pub const MAX_EXT_HEADERS: usize = 8;

fn addr(b: &[u8]) -> Ipv6Addr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[..16]);
    Ipv6Addr::from(a)
}

/// A view of an IPv6 packet.
///
/// `new_checked` guarantees version 6 and 40 + payload length <= buffer
/// length. A payload length of zero (jumbogram) is not supported.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    pub const fn new_unchecked(buffer: T) -> Packet<T> {
        Packet { buffer }
    }
    pub fn new_checked(buffer: T) -> Result<Packet<T>> {
        let p = Packet::new_unchecked(buffer);
        p.check_len()?;
        Ok(p)
    }
    pub fn check_len(&self) -> Result<()> {
        let b = self.buffer.as_ref();
        need(b, HEADER_LEN, "ipv6 header")?;
        if b[0] >> 4 != 6 {
            return Err(Error::Malformed("ipv6 version"));
        }
        need(b, HEADER_LEN + self.payload_len(), "ipv6 packet")
    }
    pub fn into_inner(self) -> T {
        self.buffer
    }
    pub fn traffic_class(&self) -> u8 {
        (be16(self.buffer.as_ref(), 0) >> 4) as u8
    }
    pub fn flow_label(&self) -> u32 {
        be32(self.buffer.as_ref(), field::VER_TC_FLOW.start) & 0x000f_ffff
    }
    pub fn payload_len(&self) -> usize {
        usize::from(be16(self.buffer.as_ref(), field::LENGTH.start))
    }
    pub fn next_header(&self) -> u8 {
        self.buffer.as_ref()[field::NXT_HDR]
    }
    pub fn hop_limit(&self) -> u8 {
        self.buffer.as_ref()[field::HOP_LIMIT]
    }
    pub fn src_addr(&self) -> Ipv6Addr {
        addr(&self.buffer.as_ref()[field::SRC])
    }
    pub fn dst_addr(&self) -> Ipv6Addr {
        addr(&self.buffer.as_ref()[field::DST])
    }
    /// Everything after the fixed header, up to the payload length.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..HEADER_LEN + self.payload_len()]
    }
    /// The packet without link-layer padding.
    pub fn packet(&self) -> &[u8] {
        &self.buffer.as_ref()[..HEADER_LEN + self.payload_len()]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    pub fn set_version_tc_flow(&mut self, traffic_class: u8, flow_label: u32) {
        let v = (6u32 << 28) | (u32::from(traffic_class) << 20) | (flow_label & 0x000f_ffff);
        put32(self.buffer.as_mut(), 0, v);
    }
    pub fn set_payload_len(&mut self, len: u16) {
        put16(self.buffer.as_mut(), field::LENGTH.start, len);
    }
    pub fn set_next_header(&mut self, nh: u8) {
        self.buffer.as_mut()[field::NXT_HDR] = nh;
    }
    pub fn set_hop_limit(&mut self, v: u8) {
        self.buffer.as_mut()[field::HOP_LIMIT] = v;
    }
    pub fn set_src_addr(&mut self, a: Ipv6Addr) {
        self.buffer.as_mut()[field::SRC].copy_from_slice(&a.octets());
    }
    pub fn set_dst_addr(&mut self, a: Ipv6Addr) {
        self.buffer.as_mut()[field::DST].copy_from_slice(&a.octets());
    }
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let end = HEADER_LEN + self.payload_len();
        &mut self.buffer.as_mut()[HEADER_LEN..end]
    }
}

/// The fields of the fixed IPv6 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    pub src_addr: Ipv6Addr,
    pub dst_addr: Ipv6Addr,
    pub next_header: u8,
    /// Everything after the fixed header, extension headers included.
    pub payload_len: usize,
    pub hop_limit: u8,
    pub traffic_class: u8,
    pub flow_label: u32,
}

impl Repr {
    pub fn parse<T: AsRef<[u8]>>(p: &Packet<T>) -> Result<Repr> {
        p.check_len()?;
        Ok(Repr {
            src_addr: p.src_addr(),
            dst_addr: p.dst_addr(),
            next_header: p.next_header(),
            payload_len: p.payload_len(),
            hop_limit: p.hop_limit(),
            traffic_class: p.traffic_class(),
            flow_label: p.flow_label(),
        })
    }
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN + self.payload_len
    }
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, p: &mut Packet<T>) -> Result<()> {
        need(p.buffer.as_ref(), HEADER_LEN, "ipv6 header")?;
        let len =
            u16::try_from(self.payload_len).map_err(|_| Error::Malformed("ipv6 payload length"))?;
        if self.flow_label > 0x000f_ffff {
            return Err(Error::Malformed("ipv6 flow label"));
        }
        p.set_version_tc_flow(self.traffic_class, self.flow_label);
        p.set_payload_len(len);
        p.set_next_header(self.next_header);
        p.set_hop_limit(self.hop_limit);
        p.set_src_addr(self.src_addr);
        p.set_dst_addr(self.dst_addr);
        Ok(())
    }
}

/// True for the extension headers [`walk`] steps over.
pub fn is_extension_header(nh: u8) -> bool {
    matches!(
        nh,
        ip_proto::HOP_BY_HOP | ip_proto::ROUTING | ip_proto::FRAGMENT | ip_proto::DST_OPTS
    )
}

/// A view of a hop-by-hop, routing or destination-options header: next
/// header, length in 8-octet units beyond the first, then data.
#[derive(Debug, Clone)]
pub struct ExtHeader<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> ExtHeader<T> {
    pub const fn new_unchecked(buffer: T) -> ExtHeader<T> {
        ExtHeader { buffer }
    }
    pub fn new_checked(buffer: T) -> Result<ExtHeader<T>> {
        let h = ExtHeader::new_unchecked(buffer);
        h.check_len()?;
        Ok(h)
    }
    pub fn check_len(&self) -> Result<()> {
        let b = self.buffer.as_ref();
        need(b, 8, "ipv6 extension header")?;
        need(b, self.header_len(), "ipv6 extension header")
    }
    pub fn next_header(&self) -> u8 {
        self.buffer.as_ref()[0]
    }
    pub fn header_len(&self) -> usize {
        (usize::from(self.buffer.as_ref()[1]) + 1) * 8
    }
    /// The bytes after next header and length.
    pub fn data(&self) -> &[u8] {
        &self.buffer.as_ref()[2..self.header_len()]
    }
}

/// Option types of hop-by-hop and destination-options headers.
pub mod opt {
    pub const PAD1: u8 = 0;
    pub const PADN: u8 = 1;
    pub const ROUTER_ALERT: u8 = 5;
    pub const HOME_ADDRESS: u8 = 201;
}

/// One TLV option of a hop-by-hop or destination-options header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6Option<'a> {
    pub kind: u8,
    pub data: &'a [u8],
}

/// Walks the options of a hop-by-hop or destination-options header.
#[derive(Debug, Clone)]
pub struct OptionIter<'a> {
    rest: &'a [u8],
}

impl<'a> OptionIter<'a> {
    pub fn new(data: &'a [u8]) -> OptionIter<'a> {
        OptionIter { rest: data }
    }
}

impl<'a> Iterator for OptionIter<'a> {
    type Item = Result<Ipv6Option<'a>>;
    fn next(&mut self) -> Option<Self::Item> {
        let (&kind, after) = self.rest.split_first()?;
        if kind == opt::PAD1 {
            self.rest = after;
            return Some(Ok(Ipv6Option { kind, data: &[] }));
        }
        let Some((&len, after)) = after.split_first() else {
            self.rest = &[];
            return Some(Err(Error::Truncated("ipv6 option")));
        };
        let len = usize::from(len);
        if len > after.len() {
            self.rest = &[];
            return Some(Err(Error::Malformed("ipv6 option length")));
        }
        let (data, rest) = after.split_at(len);
        self.rest = rest;
        Some(Ok(Ipv6Option { kind, data }))
    }
}

/// A hop-by-hop or destination-options header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionsRepr<'a> {
    pub next_header: u8,
    /// The TLV area; 2 + its length is a multiple of 8.
    pub options: &'a [u8],
}

impl<'a> OptionsRepr<'a> {
    pub fn parse<T: AsRef<[u8]> + ?Sized>(h: &'a ExtHeader<&'a T>) -> Result<OptionsRepr<'a>> {
        h.check_len()?;
        let options = h.data();
        for o in OptionIter::new(options) {
            o?;
        }
        Ok(OptionsRepr {
            next_header: h.next_header(),
            options,
        })
    }
    pub fn buffer_len(&self) -> usize {
        2 + self.options.len()
    }
    pub fn emit(&self, buf: &mut [u8]) -> Result<()> {
        let len = self.buffer_len();
        if len % 8 != 0 || len / 8 > 256 {
            return Err(Error::Malformed("ipv6 options header length"));
        }
        need(buf, len, "ipv6 options header")?;
        buf[0] = self.next_header;
        buf[1] = (len / 8 - 1) as u8;
        buf[2..len].copy_from_slice(self.options);
        Ok(())
    }
}

/// A routing header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoutingRepr<'a> {
    pub next_header: u8,
    pub routing_type: u8,
    pub segments_left: u8,
    /// Type-specific data after the first four bytes.
    pub data: &'a [u8],
}

impl<'a> RoutingRepr<'a> {
    pub fn parse<T: AsRef<[u8]> + ?Sized>(h: &'a ExtHeader<&'a T>) -> Result<RoutingRepr<'a>> {
        h.check_len()?;
        let d = h.data();
        Ok(RoutingRepr {
            next_header: h.next_header(),
            routing_type: d[0],
            segments_left: d[1],
            data: &d[2..],
        })
    }
    /// The home address of a type 2 routing header (RFC 6275 6.4).
    pub fn type2_address(&self) -> Option<Ipv6Addr> {
        if self.routing_type == 2 && self.data.len() >= 20 {
            Some(addr(&self.data[4..20]))
        } else {
            None
        }
    }
    pub fn buffer_len(&self) -> usize {
        4 + self.data.len()
    }
    pub fn emit(&self, buf: &mut [u8]) -> Result<()> {
        let len = self.buffer_len();
        if len % 8 != 0 || len / 8 > 256 {
            return Err(Error::Malformed("ipv6 routing header length"));
        }
        need(buf, len, "ipv6 routing header")?;
        buf[0] = self.next_header;
        buf[1] = (len / 8 - 1) as u8;
        buf[2] = self.routing_type;
        buf[3] = self.segments_left;
        buf[4..len].copy_from_slice(self.data);
        Ok(())
    }
}

/// A fragment header (RFC 8200 4.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FragmentRepr {
    pub next_header: u8,
    /// Offset in bytes (a multiple of 8).
    pub offset: usize,
    pub more: bool,
    pub ident: u32,
}

impl FragmentRepr {
    pub fn parse(b: &[u8]) -> Result<FragmentRepr> {
        need(b, FRAG_HEADER_LEN, "ipv6 fragment header")?;
        let off = be16(b, 2);
        Ok(FragmentRepr {
            next_header: b[0],
            offset: usize::from(off & 0xfff8),
            more: off & 1 != 0,
            ident: be32(b, 4),
        })
    }
    pub const fn buffer_len(&self) -> usize {
        FRAG_HEADER_LEN
    }
    pub fn emit(&self, b: &mut [u8]) -> Result<()> {
        need(b, FRAG_HEADER_LEN, "ipv6 fragment header")?;
        if self.offset % 8 != 0 || self.offset > 0xfff8 {
            return Err(Error::Malformed("ipv6 fragment offset"));
        }
        b[0] = self.next_header;
        b[1] = 0;
        put16(b, 2, self.offset as u16 | u16::from(self.more));
        put32(b, 4, self.ident);
        Ok(())
    }
}

/// Where a fragment header sits and what it says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FragmentInfo {
    /// Offset of the fragment header from the start of the IPv6 header.
    pub header_offset: usize,
    pub repr: FragmentRepr,
}

/// The result of walking the extension-header chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtWalk {
    /// The upper-layer protocol (or the last next-header value seen).
    pub upper_proto: u8,
    /// Offset of the upper-layer header from the start of the IPv6 header.
    pub upper_offset: usize,
    /// Offset of the next-header byte that names the fragment header, or
    /// the upper layer when there is none.
    pub next_header_field: usize,
    pub fragment: Option<FragmentInfo>,
    /// Home address option (destination options, RFC 6275).
    pub home_address: Option<Ipv6Addr>,
    /// Address of a type 2 routing header.
    pub routing_address: Option<Ipv6Addr>,
}

/// Walks the extension headers of `p` to the upper-layer header.
///
/// Hop-by-hop options must come first. After a fragment header with a
/// nonzero offset the walk stops: the rest belongs to another fragment.
/// More than [`MAX_EXT_HEADERS`] headers is an error.
pub fn walk<T: AsRef<[u8]>>(p: &Packet<T>) -> Result<ExtWalk> {
    walk_bytes(p.packet())
}

/// [`walk`] over the first bytes of an IPv6 packet (fixed header
/// included): extension headers must lie within `pkt`, which may stop
/// short of the packet's end.
pub fn walk_bytes(pkt: &[u8]) -> Result<ExtWalk> {
    need(pkt, HEADER_LEN, "ipv6 header")?;
    let mut w = ExtWalk {
        upper_proto: pkt[NEXT_HEADER_OFFSET],
        upper_offset: HEADER_LEN,
        next_header_field: NEXT_HEADER_OFFSET,
        fragment: None,
        home_address: None,
        routing_address: None,
    };
    for i in 0..=MAX_EXT_HEADERS {
        if !is_extension_header(w.upper_proto) {
            return Ok(w);
        }
        if i == MAX_EXT_HEADERS {
            break;
        }
        let at = w.upper_offset;
        let rest = pkt.get(at..).unwrap_or(&[]);
        match w.upper_proto {
            ip_proto::FRAGMENT => {
                let f = FragmentRepr::parse(rest)?;
                if w.fragment.is_some() {
                    return Err(Error::Malformed("ipv6 second fragment header"));
                }
                w.fragment = Some(FragmentInfo {
                    header_offset: at,
                    repr: f,
                });
                w.upper_proto = f.next_header;
                w.upper_offset = at + FRAG_HEADER_LEN;
                if f.offset != 0 {
                    return Ok(w);
                }
            }
            nh => {
                if nh == ip_proto::HOP_BY_HOP && i != 0 {
                    return Err(Error::Malformed("ipv6 hop-by-hop not first"));
                }
                let h = ExtHeader::new_checked(rest)?;
                match nh {
                    ip_proto::ROUTING => {
                        let r = RoutingRepr::parse(&h)?;
                        if let Some(a) = r.type2_address() {
                            w.routing_address = Some(a);
                        }
                    }
                    _ => {
                        for o in OptionIter::new(h.data()) {
                            let o = o?;
                            if nh == ip_proto::DST_OPTS
                                && o.kind == opt::HOME_ADDRESS
                                && o.data.len() == 16
                            {
                                w.home_address = Some(addr(o.data));
                            }
                        }
                    }
                }
                if w.fragment.is_none() {
                    w.next_header_field = at;
                }
                w.upper_proto = h.next_header();
                w.upper_offset = at + h.header_len();
            }
        }
    }
    Err(Error::Unsupported("ipv6 extension header chain too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(next: u8, payload: &[u8]) -> Vec<u8> {
        let r = Repr {
            src_addr: "2001:db8::1".parse().unwrap(),
            dst_addr: "2001:db8::2".parse().unwrap(),
            next_header: next,
            payload_len: payload.len(),
            hop_limit: 64,
            traffic_class: 0xb8,
            flow_label: 0x12345,
        };
        let mut b = vec![0u8; r.buffer_len()];
        r.emit(&mut Packet::new_unchecked(&mut b[..])).unwrap();
        b[HEADER_LEN..].copy_from_slice(payload);
        b
    }

    #[test]
    fn fixed_header_round_trip() {
        let b = base(ip_proto::UDP, &[1, 2, 3, 4]);
        let p = Packet::new_checked(&b[..]).unwrap();
        let r = Repr::parse(&p).unwrap();
        assert_eq!(r.traffic_class, 0xb8);
        assert_eq!(r.flow_label, 0x12345);
        assert_eq!(p.payload(), &[1, 2, 3, 4]);
        let mut out = vec![0u8; b.len()];
        r.emit(&mut Packet::new_unchecked(&mut out[..])).unwrap();
        out[HEADER_LEN..].copy_from_slice(p.payload());
        assert_eq!(out, b);
    }

    #[test]
    fn walks_hbh_dstopts_routing_fragment() {
        let mut ext = Vec::new();
        // hop-by-hop: router alert + PadN to 8 bytes.
        ext.extend_from_slice(&[ip_proto::DST_OPTS, 0, opt::ROUTER_ALERT, 2, 0, 0, 1, 0]);
        // destination options with a home address option (2+2+16=20, pad to 24).
        let home: Ipv6Addr = "2001:db8::99".parse().unwrap();
        ext.extend_from_slice(&[ip_proto::ROUTING, 2, opt::HOME_ADDRESS, 16]);
        ext.extend_from_slice(&home.octets());
        ext.extend_from_slice(&[opt::PADN, 2, 0, 0]);
        // routing type 2 with one address.
        let rt: Ipv6Addr = "2001:db8::77".parse().unwrap();
        ext.extend_from_slice(&[ip_proto::FRAGMENT, 2, 2, 1, 0, 0, 0, 0]);
        ext.extend_from_slice(&rt.octets());
        // fragment header: first fragment, more follow, ident 7.
        ext.extend_from_slice(&[ip_proto::TCP, 0, 0, 1, 0, 0, 0, 7]);
        ext.extend_from_slice(&[0xaa; 20]);
        let b = base(ip_proto::HOP_BY_HOP, &ext);
        let p = Packet::new_checked(&b[..]).unwrap();
        let w = walk(&p).unwrap();
        assert_eq!(w.upper_proto, ip_proto::TCP);
        assert_eq!(w.upper_offset, HEADER_LEN + 8 + 24 + 24 + 8);
        assert_eq!(w.home_address, Some(home));
        assert_eq!(w.routing_address, Some(rt));
        let f = w.fragment.unwrap();
        assert_eq!(f.header_offset, HEADER_LEN + 56);
        assert_eq!(w.next_header_field, HEADER_LEN + 32);
        assert_eq!(
            f.repr,
            FragmentRepr {
                next_header: ip_proto::TCP,
                offset: 0,
                more: true,
                ident: 7
            }
        );
        let mut fb = [0u8; 8];
        f.repr.emit(&mut fb).unwrap();
        assert_eq!(fb, [ip_proto::TCP, 0, 0, 1, 0, 0, 0, 7]);
    }

    #[test]
    fn hop_by_hop_must_be_first_and_chain_is_bounded() {
        let mut ext = vec![ip_proto::HOP_BY_HOP, 0, 1, 4, 0, 0, 0, 0];
        ext.extend_from_slice(&[ip_proto::UDP, 0, 1, 4, 0, 0, 0, 0]);
        let b = base(ip_proto::DST_OPTS, &ext);
        assert_eq!(
            walk(&Packet::new_checked(&b[..]).unwrap()),
            Err(Error::Malformed("ipv6 hop-by-hop not first"))
        );
        let mut ext = Vec::new();
        for _ in 0..MAX_EXT_HEADERS + 1 {
            ext.extend_from_slice(&[ip_proto::DST_OPTS, 0, 1, 4, 0, 0, 0, 0]);
        }
        let b = base(ip_proto::DST_OPTS, &ext);
        assert!(walk(&Packet::new_checked(&b[..]).unwrap()).is_err());
    }

    #[test]
    fn truncated_extension_header() {
        let b = base(ip_proto::DST_OPTS, &[ip_proto::UDP, 1, 1, 4, 0, 0, 0, 0]);
        assert!(walk(&Packet::new_checked(&b[..]).unwrap()).is_err());
    }

    #[test]
    fn options_and_routing_reprs_round_trip() {
        let raw = [ip_proto::UDP, 0, opt::PADN, 4, 0, 0, 0, 0];
        let h = ExtHeader::new_checked(&raw[..]).unwrap();
        let r = OptionsRepr::parse(&h).unwrap();
        let mut out = [0u8; 8];
        r.emit(&mut out).unwrap();
        assert_eq!(out, raw);
        let raw = [ip_proto::TCP, 0, 4, 0, 0, 0, 0, 0];
        let h = ExtHeader::new_checked(&raw[..]).unwrap();
        let r = RoutingRepr::parse(&h).unwrap();
        assert_eq!((r.routing_type, r.segments_left), (4, 0));
        r.emit(&mut out).unwrap();
        assert_eq!(out, raw);
    }
}
