//! TCP segments (RFC 9293) and their options: MSS, window scale, SACK
//! permitted, SACK blocks (RFC 2018) and timestamps (RFC 7323).

use super::{be16, be32, need, put16, put32, Error, Field, Result};
use crate::checksum;

mod field {
    use super::Field;
    pub const SRC_PORT: Field = 0..2;
    pub const DST_PORT: Field = 2..4;
    pub const SEQ: Field = 4..8;
    pub const ACK: Field = 8..12;
    pub const OFF_FLAGS: Field = 12..14;
    pub const WINDOW: Field = 14..16;
    pub const CHECKSUM: Field = 16..18;
    pub const URGENT: Field = 18..20;
}

/// Length of a TCP header without options.
pub const HEADER_LEN: usize = field::URGENT.end;
/// Longest TCP header (data offset 15).
pub const MAX_HEADER_LEN: usize = 60;
/// Offset of the checksum field in the TCP header.
pub const CHECKSUM_OFFSET: usize = field::CHECKSUM.start;
/// Offset of the flags byte in the TCP header.
pub const FLAGS_OFFSET: usize = 13;

bitflags::bitflags! {
    /// The TCP control bits.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Flags: u8 {
        const FIN = 0x01;
        const SYN = 0x02;
        const RST = 0x04;
        const PSH = 0x08;
        const ACK = 0x10;
        const URG = 0x20;
        const ECE = 0x40;
        const CWR = 0x80;
    }
}

/// A view of a TCP segment.
///
/// `new_checked` guarantees 20 <= data offset <= buffer length.
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
        need(b, HEADER_LEN, "tcp header")?;
        let hl = self.header_len();
        if hl < HEADER_LEN {
            return Err(Error::Malformed("tcp data offset"));
        }
        need(b, hl, "tcp options")
    }
    pub fn into_inner(self) -> T {
        self.buffer
    }
    pub fn src_port(&self) -> u16 {
        be16(self.buffer.as_ref(), field::SRC_PORT.start)
    }
    pub fn dst_port(&self) -> u16 {
        be16(self.buffer.as_ref(), field::DST_PORT.start)
    }
    pub fn seq_number(&self) -> u32 {
        be32(self.buffer.as_ref(), field::SEQ.start)
    }
    pub fn ack_number(&self) -> u32 {
        be32(self.buffer.as_ref(), field::ACK.start)
    }
    pub fn header_len(&self) -> usize {
        usize::from(self.buffer.as_ref()[field::OFF_FLAGS.start] >> 4) * 4
    }
    pub fn flags(&self) -> Flags {
        Flags::from_bits_retain(self.buffer.as_ref()[FLAGS_OFFSET])
    }
    /// The reserved bits and the historic NS bit (low nibble of byte 12).
    pub fn reserved(&self) -> u8 {
        self.buffer.as_ref()[field::OFF_FLAGS.start] & 0x0f
    }
    pub fn window_len(&self) -> u16 {
        be16(self.buffer.as_ref(), field::WINDOW.start)
    }
    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), field::CHECKSUM.start)
    }
    pub fn urgent_at(&self) -> u16 {
        be16(self.buffer.as_ref(), field::URGENT.start)
    }
    pub fn options(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..self.header_len()]
    }
    pub fn header(&self) -> &[u8] {
        &self.buffer.as_ref()[..self.header_len()]
    }
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[self.header_len()..]
    }
    /// Verifies the checksum given the pseudo-header sum.
    pub fn verify_checksum(&self, pseudo: u16) -> bool {
        if cfg!(fuzzing) {
            return true;
        }
        checksum::add(pseudo, checksum::sum(self.buffer.as_ref())) == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    pub fn set_src_port(&mut self, v: u16) {
        put16(self.buffer.as_mut(), field::SRC_PORT.start, v);
    }
    pub fn set_dst_port(&mut self, v: u16) {
        put16(self.buffer.as_mut(), field::DST_PORT.start, v);
    }
    pub fn set_seq_number(&mut self, v: u32) {
        put32(self.buffer.as_mut(), field::SEQ.start, v);
    }
    pub fn set_ack_number(&mut self, v: u32) {
        put32(self.buffer.as_mut(), field::ACK.start, v);
    }
    pub fn set_header_len_and_flags(&mut self, header_len: usize, flags: Flags) {
        let b = self.buffer.as_mut();
        b[field::OFF_FLAGS.start] = ((header_len / 4) as u8) << 4;
        b[FLAGS_OFFSET] = flags.bits();
    }
    pub fn set_flags(&mut self, flags: Flags) {
        self.buffer.as_mut()[FLAGS_OFFSET] = flags.bits();
    }
    pub fn set_window_len(&mut self, v: u16) {
        put16(self.buffer.as_mut(), field::WINDOW.start, v);
    }
    pub fn set_checksum(&mut self, v: u16) {
        put16(self.buffer.as_mut(), field::CHECKSUM.start, v);
    }
    pub fn set_urgent_at(&mut self, v: u16) {
        put16(self.buffer.as_mut(), field::URGENT.start, v);
    }
    pub fn options_mut(&mut self) -> &mut [u8] {
        let hl = self.header_len();
        &mut self.buffer.as_mut()[HEADER_LEN..hl]
    }
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let hl = self.header_len();
        &mut self.buffer.as_mut()[hl..]
    }
    /// Computes the checksum over the whole buffer with `pseudo` (the
    /// pseudo-header sum) and stores it.
    pub fn fill_checksum(&mut self, pseudo: u16) {
        self.set_checksum(0);
        let s = checksum::add(pseudo, checksum::sum(self.buffer.as_ref()));
        self.set_checksum(!s);
    }
}

/// Option kinds.
pub mod kind {
    pub const END: u8 = 0;
    pub const NOP: u8 = 1;
    pub const MSS: u8 = 2;
    pub const WINDOW_SCALE: u8 = 3;
    pub const SACK_PERMITTED: u8 = 4;
    pub const SACK: u8 = 5;
    pub const TIMESTAMP: u8 = 8;
}

/// Most SACK blocks that fit in the option space (with no timestamps).
pub const MAX_SACK_BLOCKS: usize = 4;

/// One TCP option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpOption<'a> {
    End,
    Nop,
    Mss(u16),
    WindowScale(u8),
    SackPermitted,
    /// Left and right edges; unused slots are `None`.
    Sack([Option<(u32, u32)>; MAX_SACK_BLOCKS]),
    Timestamp {
        tsval: u32,
        tsecr: u32,
    },
    Unknown {
        kind: u8,
        data: &'a [u8],
    },
}

impl<'a> TcpOption<'a> {
    /// Parses one option from the front of `b`, returning the rest.
    pub fn parse(b: &'a [u8]) -> Result<(&'a [u8], TcpOption<'a>)> {
        let (&k, after) = b.split_first().ok_or(Error::Truncated("tcp option"))?;
        match k {
            kind::END => return Ok((&[], TcpOption::End)),
            kind::NOP => return Ok((after, TcpOption::Nop)),
            _ => {}
        }
        let len = usize::from(*after.first().ok_or(Error::Truncated("tcp option"))?);
        if len < 2 || len > b.len() {
            return Err(Error::Malformed("tcp option length"));
        }
        let data = &b[2..len];
        let rest = &b[len..];
        let opt = match (k, data.len()) {
            (kind::MSS, 2) => TcpOption::Mss(be16(data, 0)),
            (kind::WINDOW_SCALE, 1) => TcpOption::WindowScale(data[0]),
            (kind::SACK_PERMITTED, 0) => TcpOption::SackPermitted,
            (kind::SACK, n) if n % 8 == 0 && n > 0 && n / 8 <= MAX_SACK_BLOCKS => {
                let mut blocks = [None; MAX_SACK_BLOCKS];
                for (i, c) in data.chunks_exact(8).enumerate() {
                    blocks[i] = Some((be32(c, 0), be32(c, 4)));
                }
                TcpOption::Sack(blocks)
            }
            (kind::TIMESTAMP, 8) => TcpOption::Timestamp {
                tsval: be32(data, 0),
                tsecr: be32(data, 4),
            },
            (kind::MSS | kind::WINDOW_SCALE | kind::SACK_PERMITTED | kind::SACK, _)
            | (kind::TIMESTAMP, _) => return Err(Error::Malformed("tcp option length")),
            _ => TcpOption::Unknown { kind: k, data },
        };
        Ok((rest, opt))
    }

    pub fn buffer_len(&self) -> usize {
        match self {
            TcpOption::End | TcpOption::Nop => 1,
            TcpOption::Mss(_) => 4,
            TcpOption::WindowScale(_) => 3,
            TcpOption::SackPermitted => 2,
            TcpOption::Sack(b) => 2 + 8 * b.iter().flatten().count(),
            TcpOption::Timestamp { .. } => 10,
            TcpOption::Unknown { data, .. } => 2 + data.len(),
        }
    }

    /// Writes the option at the front of `b`, returning the rest.
    pub fn emit<'b>(&self, b: &'b mut [u8]) -> Result<&'b mut [u8]> {
        let len = self.buffer_len();
        if b.len() < len || len > 40 {
            return Err(Error::Truncated("tcp option space"));
        }
        let (out, rest) = b.split_at_mut(len);
        match *self {
            TcpOption::End => out[0] = kind::END,
            TcpOption::Nop => out[0] = kind::NOP,
            TcpOption::Mss(v) => {
                out[..2].copy_from_slice(&[kind::MSS, 4]);
                put16(out, 2, v);
            }
            TcpOption::WindowScale(v) => out.copy_from_slice(&[kind::WINDOW_SCALE, 3, v]),
            TcpOption::SackPermitted => out.copy_from_slice(&[kind::SACK_PERMITTED, 2]),
            TcpOption::Sack(blocks) => {
                out[0] = kind::SACK;
                out[1] = len as u8;
                for (i, (l, r)) in blocks.iter().flatten().enumerate() {
                    put32(out, 2 + 8 * i, *l);
                    put32(out, 6 + 8 * i, *r);
                }
            }
            TcpOption::Timestamp { tsval, tsecr } => {
                out[..2].copy_from_slice(&[kind::TIMESTAMP, 10]);
                put32(out, 2, tsval);
                put32(out, 6, tsecr);
            }
            TcpOption::Unknown { kind, data } => {
                out[0] = kind;
                out[1] = len as u8;
                out[2..].copy_from_slice(data);
            }
        }
        Ok(rest)
    }
}

/// Walks an options area; stops after `End`.
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
    type Item = Result<TcpOption<'a>>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        match TcpOption::parse(self.rest) {
            Ok((rest, o)) => {
                self.rest = rest;
                Some(Ok(o))
            }
            Err(e) => {
                self.rest = &[];
                Some(Err(e))
            }
        }
    }
}

/// The fields of a TCP header, options decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    pub src_port: u16,
    pub dst_port: u16,
    pub seq_number: u32,
    pub ack_number: u32,
    pub flags: Flags,
    pub window_len: u16,
    pub urgent_at: u16,
    pub mss: Option<u16>,
    pub window_scale: Option<u8>,
    pub sack_permitted: bool,
    pub sack_ranges: [Option<(u32, u32)>; MAX_SACK_BLOCKS],
    pub timestamp: Option<(u32, u32)>,
    pub payload_len: usize,
}

impl Repr {
    /// Parses a segment. With `pseudo` (the pseudo-header sum) the checksum
    /// is verified; unknown options are skipped.
    pub fn parse<T: AsRef<[u8]>>(p: &Packet<T>, pseudo: Option<u16>) -> Result<Repr> {
        p.check_len()?;
        if let Some(ps) = pseudo {
            if !p.verify_checksum(ps) {
                return Err(Error::Checksum("tcp segment"));
            }
        }
        if p.src_port() == 0 || p.dst_port() == 0 {
            return Err(Error::Malformed("tcp port zero"));
        }
        let mut r = Repr {
            src_port: p.src_port(),
            dst_port: p.dst_port(),
            seq_number: p.seq_number(),
            ack_number: p.ack_number(),
            flags: p.flags(),
            window_len: p.window_len(),
            urgent_at: p.urgent_at(),
            mss: None,
            window_scale: None,
            sack_permitted: false,
            sack_ranges: [None; MAX_SACK_BLOCKS],
            timestamp: None,
            payload_len: p.payload().len(),
        };
        for o in OptionIter::new(p.options()) {
            match o? {
                TcpOption::Mss(v) => r.mss = Some(v),
                TcpOption::WindowScale(v) => r.window_scale = Some(v.min(14)),
                TcpOption::SackPermitted => r.sack_permitted = true,
                TcpOption::Sack(b) => r.sack_ranges = b,
                TcpOption::Timestamp { tsval, tsecr } => r.timestamp = Some((tsval, tsecr)),
                TcpOption::End | TcpOption::Nop | TcpOption::Unknown { .. } => {}
            }
        }
        Ok(r)
    }

    fn options(&self) -> impl Iterator<Item = TcpOption<'static>> + '_ {
        let sack = self.sack_ranges.iter().any(Option::is_some);
        [
            self.mss.map(TcpOption::Mss),
            self.window_scale.map(TcpOption::WindowScale),
            self.sack_permitted.then_some(TcpOption::SackPermitted),
            self.timestamp
                .map(|(tsval, tsecr)| TcpOption::Timestamp { tsval, tsecr }),
            sack.then_some(TcpOption::Sack(self.sack_ranges)),
        ]
        .into_iter()
        .flatten()
    }

    /// Header length with options, padded to a multiple of 4.
    pub fn header_len(&self) -> usize {
        let opts: usize = self.options().map(|o| o.buffer_len()).sum();
        HEADER_LEN + opts.div_ceil(4) * 4
    }

    pub fn buffer_len(&self) -> usize {
        self.header_len() + self.payload_len
    }

    /// Writes the header (options padded with NOPs and an END) and, given a
    /// pseudo-header sum, the checksum over the header and the payload that
    /// the caller has already placed after it.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(
        &self,
        p: &mut Packet<T>,
        pseudo: Option<u16>,
    ) -> Result<()> {
        let hl = self.header_len();
        if hl > MAX_HEADER_LEN {
            return Err(Error::Malformed("tcp options too long"));
        }
        need(p.buffer.as_ref(), hl, "tcp header")?;
        p.set_src_port(self.src_port);
        p.set_dst_port(self.dst_port);
        p.set_seq_number(self.seq_number);
        p.set_ack_number(self.ack_number);
        p.set_header_len_and_flags(hl, self.flags);
        p.set_window_len(self.window_len);
        p.set_urgent_at(self.urgent_at);
        let mut rest = &mut p.buffer.as_mut()[HEADER_LEN..hl];
        for o in self.options() {
            rest = o.emit(rest)?;
        }
        rest.fill(kind::END);
        if let Some(ps) = pseudo {
            p.fill_checksum(ps);
        } else {
            p.set_checksum(0);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use core::net::Ipv4Addr;

    use super::*;

    // A SYN from 192.0.2.1:40000 to 192.0.2.2:5201 with the options Linux
    // sends: MSS 1460, SACK permitted, timestamps, NOP, window scale 7.
    static SYN: [u8; 40] = [
        0x9c, 0x40, 0x14, 0x51, 0x00, 0x00, 0x10, 0x00, 0, 0, 0, 0, 0xa0, 0x02, 0xfa, 0xf0, 0, 0,
        0, 0, 2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
    ];

    fn pseudo(len: usize) -> u16 {
        checksum::pseudo_header_v4(
            Ipv4Addr::new(192, 0, 2, 1),
            Ipv4Addr::new(192, 0, 2, 2),
            6,
            len as u32,
        )
    }

    #[test]
    fn parse_linux_syn_options() {
        let mut b = SYN;
        Packet::new_unchecked(&mut b[..]).fill_checksum(pseudo(40));
        let p = Packet::new_checked(&b[..]).unwrap();
        let r = Repr::parse(&p, Some(pseudo(40))).unwrap();
        assert_eq!(r.flags, Flags::SYN);
        assert_eq!(r.mss, Some(1460));
        assert!(r.sack_permitted);
        assert_eq!(r.timestamp, Some((1, 0)));
        assert_eq!(r.window_scale, Some(7));
        assert_eq!(r.payload_len, 0);
        let opts: Vec<_> = OptionIter::new(p.options()).collect::<Result<_>>().unwrap();
        assert_eq!(opts.len(), 5);
        b[30] ^= 1;
        assert_eq!(
            Repr::parse(&Packet::new_checked(&b[..]).unwrap(), Some(pseudo(40))),
            Err(Error::Checksum("tcp segment"))
        );
    }

    #[test]
    fn emit_parse_round_trip_with_sack_and_payload() {
        let r = Repr {
            src_port: 5201,
            dst_port: 40000,
            seq_number: 0xfffffff0,
            ack_number: 1234,
            flags: Flags::ACK | Flags::PSH,
            window_len: 501,
            urgent_at: 0,
            mss: None,
            window_scale: None,
            sack_permitted: false,
            sack_ranges: [Some((10, 20)), Some((30, 40)), None, None],
            timestamp: Some((99, 98)),
            payload_len: 5,
        };
        let mut b = vec![0u8; r.buffer_len()];
        let hl = r.header_len();
        assert_eq!(hl, 20 + 10 + 18);
        b[hl..].copy_from_slice(b"hello");
        let ps = pseudo(b.len());
        r.emit(&mut Packet::new_unchecked(&mut b[..]), Some(ps))
            .unwrap();
        let p = Packet::new_checked(&b[..]).unwrap();
        assert_eq!(Repr::parse(&p, Some(pseudo(b.len()))).unwrap(), r);
        assert_eq!(p.payload(), b"hello");
    }

    #[test]
    fn malformed_options() {
        let mut b = SYN;
        b[21] = 3; // MSS with length 3
        assert_eq!(
            Repr::parse(&Packet::new_checked(&b[..]).unwrap(), None),
            Err(Error::Malformed("tcp option length"))
        );
        let mut b = SYN;
        b[21] = 60; // past the option area
        assert!(Repr::parse(&Packet::new_checked(&b[..]).unwrap(), None).is_err());
        let mut b = SYN;
        b[12] = 0x40; // data offset 16 bytes
        assert!(Packet::new_checked(&b[..]).is_err());
        b[12] = 0xf0; // 60 bytes, buffer has 40
        assert!(Packet::new_checked(&b[..]).is_err());
    }
}
