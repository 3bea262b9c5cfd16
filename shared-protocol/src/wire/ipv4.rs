//! IPv4 (RFC 791), options included.

use core::net::Ipv4Addr;

use super::{be16, need, put16, Error, Field, Result};
use crate::checksum;

mod field {
    use super::Field;
    pub const VER_IHL: usize = 0;
    pub const DSCP_ECN: usize = 1;
    pub const LENGTH: Field = 2..4;
    pub const IDENT: Field = 4..6;
    pub const FLG_OFF: Field = 6..8;
    pub const TTL: usize = 8;
    pub const PROTOCOL: usize = 9;
    pub const CHECKSUM: Field = 10..12;
    pub const SRC: Field = 12..16;
    pub const DST: Field = 16..20;
}

/// Length of an IPv4 header without options.
pub const HEADER_LEN: usize = field::DST.end;
/// Longest options area (IHL 15).
pub const MAX_OPTIONS_LEN: usize = 40;
/// Offset of the checksum field, for code that patches headers in place.
pub const CHECKSUM_OFFSET: usize = field::CHECKSUM.start;

/// A view of an IPv4 packet.
///
/// `new_checked` guarantees version 4, IHL >= 5, header length <= total
/// length <= buffer length. Bytes past the total length (Ethernet padding)
/// are not part of [`Packet::payload`].
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
        need(b, HEADER_LEN, "ipv4 header")?;
        if b[field::VER_IHL] >> 4 != 4 {
            return Err(Error::Malformed("ipv4 version"));
        }
        let hl = usize::from(b[field::VER_IHL] & 0x0f) * 4;
        if hl < HEADER_LEN {
            return Err(Error::Malformed("ipv4 header length"));
        }
        let total = usize::from(be16(b, field::LENGTH.start));
        if total < hl {
            return Err(Error::Malformed("ipv4 total length"));
        }
        need(b, total, "ipv4 packet")
    }
    pub fn into_inner(self) -> T {
        self.buffer
    }
    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VER_IHL] >> 4
    }
    pub fn header_len(&self) -> usize {
        usize::from(self.buffer.as_ref()[field::VER_IHL] & 0x0f) * 4
    }
    pub fn dscp_ecn(&self) -> u8 {
        self.buffer.as_ref()[field::DSCP_ECN]
    }
    pub fn ecn(&self) -> u8 {
        self.dscp_ecn() & 3
    }
    pub fn total_len(&self) -> usize {
        usize::from(be16(self.buffer.as_ref(), field::LENGTH.start))
    }
    pub fn ident(&self) -> u16 {
        be16(self.buffer.as_ref(), field::IDENT.start)
    }
    fn flg_off(&self) -> u16 {
        be16(self.buffer.as_ref(), field::FLG_OFF.start)
    }
    pub fn dont_frag(&self) -> bool {
        self.flg_off() & 0x4000 != 0
    }
    pub fn more_frags(&self) -> bool {
        self.flg_off() & 0x2000 != 0
    }
    /// The evil bit (RFC 3514): reserved, must be zero.
    pub fn reserved_flag(&self) -> bool {
        self.flg_off() & 0x8000 != 0
    }
    /// Fragment offset in bytes.
    pub fn frag_offset(&self) -> usize {
        usize::from(self.flg_off() & 0x1fff) * 8
    }
    /// True for any fragment of a larger datagram.
    pub fn is_fragment(&self) -> bool {
        self.more_frags() || self.frag_offset() != 0
    }
    pub fn ttl(&self) -> u8 {
        self.buffer.as_ref()[field::TTL]
    }
    pub fn protocol(&self) -> u8 {
        self.buffer.as_ref()[field::PROTOCOL]
    }
    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), field::CHECKSUM.start)
    }
    pub fn src_addr(&self) -> Ipv4Addr {
        let b = &self.buffer.as_ref()[field::SRC];
        Ipv4Addr::new(b[0], b[1], b[2], b[3])
    }
    pub fn dst_addr(&self) -> Ipv4Addr {
        let b = &self.buffer.as_ref()[field::DST];
        Ipv4Addr::new(b[0], b[1], b[2], b[3])
    }
    pub fn header(&self) -> &[u8] {
        &self.buffer.as_ref()[..self.header_len()]
    }
    pub fn options(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..self.header_len()]
    }
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[self.header_len()..self.total_len()]
    }
    pub fn verify_checksum(&self) -> bool {
        if cfg!(fuzzing) {
            return true;
        }
        checksum::verify(self.header())
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    pub fn set_header_len(&mut self, len: usize) {
        self.buffer.as_mut()[field::VER_IHL] = 0x40 | ((len / 4) as u8 & 0x0f);
    }
    pub fn set_dscp_ecn(&mut self, v: u8) {
        self.buffer.as_mut()[field::DSCP_ECN] = v;
    }
    pub fn set_total_len(&mut self, len: u16) {
        put16(self.buffer.as_mut(), field::LENGTH.start, len);
    }
    pub fn set_ident(&mut self, id: u16) {
        put16(self.buffer.as_mut(), field::IDENT.start, id);
    }
    /// Sets DF, MF and the offset (in bytes, a multiple of 8).
    pub fn set_frag(&mut self, dont_frag: bool, more_frags: bool, offset: usize) {
        let v = (u16::from(dont_frag) << 14)
            | (u16::from(more_frags) << 13)
            | (((offset / 8) as u16) & 0x1fff);
        put16(self.buffer.as_mut(), field::FLG_OFF.start, v);
    }
    pub fn set_ttl(&mut self, v: u8) {
        self.buffer.as_mut()[field::TTL] = v;
    }
    pub fn set_protocol(&mut self, v: u8) {
        self.buffer.as_mut()[field::PROTOCOL] = v;
    }
    pub fn set_checksum(&mut self, v: u16) {
        put16(self.buffer.as_mut(), field::CHECKSUM.start, v);
    }
    pub fn set_src_addr(&mut self, a: Ipv4Addr) {
        self.buffer.as_mut()[field::SRC].copy_from_slice(&a.octets());
    }
    pub fn set_dst_addr(&mut self, a: Ipv4Addr) {
        self.buffer.as_mut()[field::DST].copy_from_slice(&a.octets());
    }
    /// Recomputes the header checksum.
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let hl = self.header_len();
        let c = checksum::checksum(&self.buffer.as_ref()[..hl]);
        self.set_checksum(c);
    }
    pub fn options_mut(&mut self) -> &mut [u8] {
        let hl = self.header_len();
        &mut self.buffer.as_mut()[HEADER_LEN..hl]
    }
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let (hl, tl) = (self.header_len(), self.total_len());
        &mut self.buffer.as_mut()[hl..tl]
    }
}

/// Option kinds named by RFC 791.
pub mod option {
    pub const END: u8 = 0;
    pub const NOP: u8 = 1;
    pub const RECORD_ROUTE: u8 = 7;
    pub const TIMESTAMP: u8 = 68;
    pub const ROUTER_ALERT: u8 = 148;
}

/// One IPv4 option: its kind and its data (without kind and length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpOption<'a> {
    pub kind: u8,
    pub data: &'a [u8],
}

/// Walks an options area. `END` stops the walk; a bad length is an error.
#[derive(Debug, Clone)]
pub struct OptionIter<'a> {
    rest: &'a [u8],
}

impl<'a> OptionIter<'a> {
    pub fn new(options: &'a [u8]) -> OptionIter<'a> {
        OptionIter { rest: options }
    }
}

impl<'a> Iterator for OptionIter<'a> {
    type Item = Result<IpOption<'a>>;
    fn next(&mut self) -> Option<Self::Item> {
        let (&kind, after) = self.rest.split_first()?;
        match kind {
            option::END => {
                self.rest = &[];
                None
            }
            option::NOP => {
                self.rest = after;
                Some(Ok(IpOption { kind, data: &[] }))
            }
            _ => {
                let len = match after.first() {
                    Some(&l) => usize::from(l),
                    None => {
                        self.rest = &[];
                        return Some(Err(Error::Truncated("ipv4 option")));
                    }
                };
                if len < 2 || len > self.rest.len() {
                    self.rest = &[];
                    return Some(Err(Error::Malformed("ipv4 option length")));
                }
                let data = &self.rest[2..len];
                self.rest = &self.rest[len..];
                Some(Ok(IpOption { kind, data }))
            }
        }
    }
}

/// The options area of a header, kept as bytes (at most 40).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Options {
    buf: [u8; MAX_OPTIONS_LEN],
    len: u8,
}

impl core::fmt::Debug for Options {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_list()
            .entries(OptionIter::new(self.as_bytes()))
            .finish()
    }
}

impl Default for Options {
    fn default() -> Options {
        Options {
            buf: [0; MAX_OPTIONS_LEN],
            len: 0,
        }
    }
}

impl Options {
    /// Takes an options area; its length must be a multiple of 4, at most 40,
    /// and every option in it well formed.
    pub fn new(bytes: &[u8]) -> Result<Options> {
        if bytes.len() > MAX_OPTIONS_LEN || bytes.len() % 4 != 0 {
            return Err(Error::Malformed("ipv4 options length"));
        }
        for o in OptionIter::new(bytes) {
            o?;
        }
        let mut buf = [0u8; MAX_OPTIONS_LEN];
        buf[..bytes.len()].copy_from_slice(bytes);
        Ok(Options {
            buf,
            len: bytes.len() as u8,
        })
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn iter(&self) -> OptionIter<'_> {
        OptionIter::new(self.as_bytes())
    }
}

/// The fields of an IPv4 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    pub src_addr: Ipv4Addr,
    pub dst_addr: Ipv4Addr,
    pub protocol: u8,
    /// Length of what follows the header (total length minus header length).
    pub payload_len: usize,
    pub ttl: u8,
    pub dscp_ecn: u8,
    pub ident: u16,
    pub dont_frag: bool,
    pub more_frags: bool,
    /// Fragment offset in bytes.
    pub frag_offset: usize,
    pub options: Options,
}

impl Repr {
    /// Parses and verifies a header. A bad checksum is an error.
    pub fn parse<T: AsRef<[u8]>>(p: &Packet<T>) -> Result<Repr> {
        p.check_len()?;
        if !p.verify_checksum() {
            return Err(Error::Checksum("ipv4 header"));
        }
        if p.reserved_flag() {
            return Err(Error::Malformed("ipv4 reserved flag"));
        }
        Ok(Repr {
            src_addr: p.src_addr(),
            dst_addr: p.dst_addr(),
            protocol: p.protocol(),
            payload_len: p.total_len() - p.header_len(),
            ttl: p.ttl(),
            dscp_ecn: p.dscp_ecn(),
            ident: p.ident(),
            dont_frag: p.dont_frag(),
            more_frags: p.more_frags(),
            frag_offset: p.frag_offset(),
            options: Options::new(p.options())?,
        })
    }
    pub fn header_len(&self) -> usize {
        HEADER_LEN + self.options.as_bytes().len()
    }
    pub fn buffer_len(&self) -> usize {
        self.header_len() + self.payload_len
    }
    /// Writes the header with its checksum. The buffer must hold the header;
    /// the payload is the caller's.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, p: &mut Packet<T>) -> Result<()> {
        let hl = self.header_len();
        let total =
            u16::try_from(hl + self.payload_len).map_err(|_| Error::Malformed("ipv4 length"))?;
        if self.frag_offset % 8 != 0 || self.frag_offset > 0xffff {
            return Err(Error::Malformed("ipv4 fragment offset"));
        }
        need(p.buffer.as_ref(), hl, "ipv4 header")?;
        p.set_header_len(hl);
        p.set_dscp_ecn(self.dscp_ecn);
        p.set_total_len(total);
        p.set_ident(self.ident);
        p.set_frag(self.dont_frag, self.more_frags, self.frag_offset);
        p.set_ttl(self.ttl);
        p.set_protocol(self.protocol);
        p.set_src_addr(self.src_addr);
        p.set_dst_addr(self.dst_addr);
        p.buffer.as_mut()[HEADER_LEN..hl].copy_from_slice(self.options.as_bytes());
        p.set_checksum(0);
        let c = checksum::checksum(&p.buffer.as_ref()[..hl]);
        p.set_checksum(c);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 192.0.2.1 -> 192.0.2.2, UDP, 4 bytes payload, with a router-alert
    // option, checksum filled.
    fn packet() -> Vec<u8> {
        let mut b = vec![
            0x46, 0x00, 0x00, 0x1c, 0x12, 0x34, 0x40, 0x00, 64, 17, 0, 0, 192, 0, 2, 1, 192, 0, 2,
            2, 148, 4, 0, 0, 1, 2, 3, 4,
        ];
        let c = checksum::checksum(&b[..24]);
        b[10..12].copy_from_slice(&c.to_be_bytes());
        b
    }

    #[test]
    fn parse_options_and_round_trip() {
        let b = packet();
        let p = Packet::new_checked(&b[..]).unwrap();
        let r = Repr::parse(&p).unwrap();
        assert_eq!(r.protocol, 17);
        assert_eq!(r.payload_len, 4);
        assert!(r.dont_frag && !r.more_frags);
        let opts: Vec<_> = r.options.iter().collect::<Result<_>>().unwrap();
        assert_eq!(
            opts,
            vec![IpOption {
                kind: option::ROUTER_ALERT,
                data: &[0, 0]
            }]
        );
        let mut out = vec![0u8; r.buffer_len()];
        r.emit(&mut Packet::new_unchecked(&mut out[..])).unwrap();
        out[24..].copy_from_slice(p.payload());
        assert_eq!(out, b);
    }

    #[test]
    fn bad_headers() {
        let mut b = packet();
        b[8] = 1; // TTL change breaks the checksum
        assert_eq!(
            Repr::parse(&Packet::new_checked(&b[..]).unwrap()),
            Err(Error::Checksum("ipv4 header"))
        );
        let mut b = packet();
        b[0] = 0x44;
        assert!(Packet::new_checked(&b[..]).is_err());
        let mut b = packet();
        b[3] = 0x40; // total length past the buffer
        assert!(Packet::new_checked(&b[..]).is_err());
        let mut b = packet();
        b[21] = 9; // option length past the area
        let c = {
            b[10] = 0;
            b[11] = 0;
            checksum::checksum(&b[..24])
        };
        b[10..12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(
            Repr::parse(&Packet::new_checked(&b[..]).unwrap()),
            Err(Error::Malformed("ipv4 option length"))
        );
    }

    #[test]
    fn trailing_padding_is_not_payload() {
        let mut b = packet();
        b.extend_from_slice(&[0; 18]);
        let p = Packet::new_checked(&b[..]).unwrap();
        assert_eq!(p.payload(), &[1, 2, 3, 4]);
    }
}
