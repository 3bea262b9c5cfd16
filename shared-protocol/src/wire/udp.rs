//! UDP datagrams (RFC 768).

use super::{be16, need, put16, Error, Field, Result};
use crate::checksum;

mod field {
    use super::Field;
    pub const SRC_PORT: Field = 0..2;
    pub const DST_PORT: Field = 2..4;
    pub const LENGTH: Field = 4..6;
    pub const CHECKSUM: Field = 6..8;
}

/// Length of a UDP header.
pub const HEADER_LEN: usize = field::CHECKSUM.end;
/// Offset of the checksum field in the UDP header.
pub const CHECKSUM_OFFSET: usize = field::CHECKSUM.start;

/// A view of a UDP datagram. `new_checked` guarantees
/// 8 <= length field <= buffer length.
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
        need(b, HEADER_LEN, "udp header")?;
        let len = self.len();
        if len < HEADER_LEN {
            return Err(Error::Malformed("udp length"));
        }
        need(b, len, "udp datagram")
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
    /// The length field: header plus payload.
    pub fn len(&self) -> usize {
        usize::from(be16(self.buffer.as_ref(), field::LENGTH.start))
    }
    pub fn is_empty(&self) -> bool {
        self.len() <= HEADER_LEN
    }
    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), field::CHECKSUM.start)
    }
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..self.len()]
    }
    /// Verifies the checksum given the pseudo-header sum. A zero checksum
    /// means "none" and passes (it is invalid over IPv6: the caller checks).
    pub fn verify_checksum(&self, pseudo: u16) -> bool {
        if cfg!(fuzzing) || self.checksum() == 0 {
            return true;
        }
        checksum::add(pseudo, checksum::sum(&self.buffer.as_ref()[..self.len()])) == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    pub fn set_src_port(&mut self, v: u16) {
        put16(self.buffer.as_mut(), field::SRC_PORT.start, v);
    }
    pub fn set_dst_port(&mut self, v: u16) {
        put16(self.buffer.as_mut(), field::DST_PORT.start, v);
    }
    pub fn set_len(&mut self, v: u16) {
        put16(self.buffer.as_mut(), field::LENGTH.start, v);
    }
    pub fn set_checksum(&mut self, v: u16) {
        put16(self.buffer.as_mut(), field::CHECKSUM.start, v);
    }
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let len = self.len();
        &mut self.buffer.as_mut()[HEADER_LEN..len]
    }
    /// Computes and stores the checksum; a result of zero is sent as 0xffff.
    pub fn fill_checksum(&mut self, pseudo: u16) {
        self.set_checksum(0);
        let len = self.len();
        let c = !checksum::add(pseudo, checksum::sum(&self.buffer.as_ref()[..len]));
        self.set_checksum(if c == 0 { 0xffff } else { c });
    }
}

/// The fields of a UDP header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    pub src_port: u16,
    pub dst_port: u16,
    pub payload_len: usize,
}

impl Repr {
    /// Parses a datagram; with `pseudo` the checksum is verified.
    pub fn parse<T: AsRef<[u8]>>(p: &Packet<T>, pseudo: Option<u16>) -> Result<Repr> {
        p.check_len()?;
        if let Some(ps) = pseudo {
            if !p.verify_checksum(ps) {
                return Err(Error::Checksum("udp datagram"));
            }
        }
        if p.dst_port() == 0 {
            return Err(Error::Malformed("udp destination port zero"));
        }
        Ok(Repr {
            src_port: p.src_port(),
            dst_port: p.dst_port(),
            payload_len: p.len() - HEADER_LEN,
        })
    }
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN + self.payload_len
    }
    /// Writes the header; with `pseudo`, also the checksum over the payload
    /// the caller has already placed after it.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(
        &self,
        p: &mut Packet<T>,
        pseudo: Option<u16>,
    ) -> Result<()> {
        let len = u16::try_from(self.buffer_len()).map_err(|_| Error::Malformed("udp length"))?;
        need(p.buffer.as_ref(), self.buffer_len(), "udp datagram")?;
        p.set_src_port(self.src_port);
        p.set_dst_port(self.dst_port);
        p.set_len(len);
        match pseudo {
            Some(ps) => p.fill_checksum(ps),
            None => p.set_checksum(0),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use core::net::Ipv6Addr;

    use super::*;

    #[test]
    fn round_trip_v6() {
        let s: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let d: Ipv6Addr = "2001:db8::2".parse().unwrap();
        let ps = checksum::pseudo_header_v6(s, d, 17, 12);
        let r = Repr {
            src_port: 5353,
            dst_port: 5201,
            payload_len: 4,
        };
        let mut b = [0u8; 12];
        b[8..].copy_from_slice(&[1, 2, 3, 4]);
        r.emit(&mut Packet::new_unchecked(&mut b[..]), Some(ps))
            .unwrap();
        let p = Packet::new_checked(&b[..]).unwrap();
        assert_eq!(Repr::parse(&p, Some(ps)).unwrap(), r);
        assert_eq!(p.payload(), &[1, 2, 3, 4]);
        let mut bad = b;
        bad[9] ^= 0x40;
        assert_eq!(
            Repr::parse(&Packet::new_checked(&bad[..]).unwrap(), Some(ps)),
            Err(Error::Checksum("udp datagram"))
        );
    }

    #[test]
    fn length_field_checked() {
        let b = [0, 1, 0, 2, 0, 7, 0, 0];
        assert_eq!(
            Packet::new_checked(&b[..]).unwrap_err(),
            Error::Malformed("udp length")
        );
        let b = [0, 1, 0, 2, 0, 9, 0, 0];
        assert!(Packet::new_checked(&b[..]).is_err());
    }
}
