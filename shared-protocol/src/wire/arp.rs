//! ARP for IPv4 over Ethernet (RFC 826).

use core::net::Ipv4Addr;

use super::{be16, ethernet::Address, need, put16, Error, Field, Result};

mod field {
    use super::Field;
    pub const HTYPE: Field = 0..2;
    pub const PTYPE: Field = 2..4;
    pub const HLEN: usize = 4;
    pub const PLEN: usize = 5;
    pub const OPER: Field = 6..8;
    pub const SHA: Field = 8..14;
    pub const SPA: Field = 14..18;
    pub const THA: Field = 18..24;
    pub const TPA: Field = 24..28;
}

/// Length of an Ethernet/IPv4 ARP packet.
pub const PACKET_LEN: usize = field::TPA.end;

pub const OP_REQUEST: u16 = 1;
pub const OP_REPLY: u16 = 2;

/// A view of an ARP packet. `new_checked` accepts only the Ethernet/IPv4
/// shape (hardware length 6, protocol length 4), the only one a NIC meets.
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
        need(self.buffer.as_ref(), PACKET_LEN, "arp packet")
    }
    pub fn hardware_type(&self) -> u16 {
        be16(self.buffer.as_ref(), field::HTYPE.start)
    }
    pub fn protocol_type(&self) -> u16 {
        be16(self.buffer.as_ref(), field::PTYPE.start)
    }
    pub fn hardware_len(&self) -> u8 {
        self.buffer.as_ref()[field::HLEN]
    }
    pub fn protocol_len(&self) -> u8 {
        self.buffer.as_ref()[field::PLEN]
    }
    pub fn operation(&self) -> u16 {
        be16(self.buffer.as_ref(), field::OPER.start)
    }
    fn mac(&self, f: Field) -> Address {
        let b = &self.buffer.as_ref()[f];
        Address([b[0], b[1], b[2], b[3], b[4], b[5]])
    }
    fn ip(&self, f: Field) -> Ipv4Addr {
        let b = &self.buffer.as_ref()[f];
        Ipv4Addr::new(b[0], b[1], b[2], b[3])
    }
    pub fn sender_hardware_addr(&self) -> Address {
        self.mac(field::SHA)
    }
    pub fn sender_protocol_addr(&self) -> Ipv4Addr {
        self.ip(field::SPA)
    }
    pub fn target_hardware_addr(&self) -> Address {
        self.mac(field::THA)
    }
    pub fn target_protocol_addr(&self) -> Ipv4Addr {
        self.ip(field::TPA)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    fn set_header(&mut self, oper: u16) {
        let b = self.buffer.as_mut();
        put16(b, field::HTYPE.start, 1);
        put16(b, field::PTYPE.start, 0x0800);
        b[field::HLEN] = 6;
        b[field::PLEN] = 4;
        put16(b, field::OPER.start, oper);
    }
    fn set(&mut self, f: Field, v: &[u8]) {
        self.buffer.as_mut()[f].copy_from_slice(v);
    }
}

/// An Ethernet/IPv4 ARP request or reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    pub operation: u16,
    pub source_hardware_addr: Address,
    pub source_protocol_addr: Ipv4Addr,
    pub target_hardware_addr: Address,
    pub target_protocol_addr: Ipv4Addr,
}

impl Repr {
    pub fn parse<T: AsRef<[u8]>>(p: &Packet<T>) -> Result<Repr> {
        p.check_len()?;
        if p.hardware_type() != 1 || p.protocol_type() != 0x0800 {
            return Err(Error::Unsupported("arp hardware/protocol type"));
        }
        if p.hardware_len() != 6 || p.protocol_len() != 4 {
            return Err(Error::Malformed("arp address lengths"));
        }
        match p.operation() {
            OP_REQUEST | OP_REPLY => {}
            _ => return Err(Error::Unsupported("arp operation")),
        }
        Ok(Repr {
            operation: p.operation(),
            source_hardware_addr: p.sender_hardware_addr(),
            source_protocol_addr: p.sender_protocol_addr(),
            target_hardware_addr: p.target_hardware_addr(),
            target_protocol_addr: p.target_protocol_addr(),
        })
    }
    pub const fn buffer_len(&self) -> usize {
        PACKET_LEN
    }
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, p: &mut Packet<T>) -> Result<()> {
        p.check_len()?;
        p.set_header(self.operation);
        p.set(field::SHA, &self.source_hardware_addr.0);
        p.set(field::SPA, &self.source_protocol_addr.octets());
        p.set(field::THA, &self.target_hardware_addr.0);
        p.set(field::TPA, &self.target_protocol_addr.octets());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static REQUEST: [u8; 28] = [
        0, 1, 8, 0, 6, 4, 0, 1, // eth/ipv4 request
        2, 0, 0, 0, 0, 1, 192, 0, 2, 1, // sender
        0, 0, 0, 0, 0, 0, 192, 0, 2, 2, // target
    ];

    #[test]
    fn round_trip() {
        let p = Packet::new_checked(&REQUEST[..]).unwrap();
        let r = Repr::parse(&p).unwrap();
        assert_eq!(r.operation, OP_REQUEST);
        assert_eq!(r.source_protocol_addr, Ipv4Addr::new(192, 0, 2, 1));
        assert_eq!(r.target_protocol_addr, Ipv4Addr::new(192, 0, 2, 2));
        let mut out = [0u8; 28];
        r.emit(&mut Packet::new_unchecked(&mut out[..])).unwrap();
        assert_eq!(out, REQUEST);
    }

    #[test]
    fn rejects_other_shapes() {
        let mut b = REQUEST;
        b[4] = 8;
        assert!(Repr::parse(&Packet::new_checked(&b[..]).unwrap()).is_err());
        assert!(Packet::new_checked(&REQUEST[..27]).is_err());
    }
}
