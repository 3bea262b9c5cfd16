//! Ethernet II frames and 802.1Q / 802.1ad VLAN tags.

use core::fmt;

use super::{be16, need, put16, Error, Field, Result};

/// A 48-bit MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Address(pub [u8; 6]);

impl Address {
    pub const BROADCAST: Address = Address([0xff; 6]);

    pub fn from_bytes(b: &[u8]) -> Option<Address> {
        let a: [u8; 6] = b.get(..6)?.try_into().ok()?;
        Some(Address(a))
    }
    pub fn as_bytes(&self) -> &[u8; 6] {
        &self.0
    }
    pub fn is_broadcast(&self) -> bool {
        *self == Self::BROADCAST
    }
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 != 0
    }
    pub fn is_unicast(&self) -> bool {
        !self.is_multicast()
    }
    pub fn is_locally_administered(&self) -> bool {
        self.0[0] & 2 != 0
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl core::str::FromStr for Address {
    type Err = Error;
    fn from_str(s: &str) -> Result<Address> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for o in out.iter_mut() {
            let p = parts.next().ok_or(Error::Malformed("mac address"))?;
            if p.len() != 2 {
                return Err(Error::Malformed("mac address"));
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| Error::Malformed("mac address"))?;
        }
        if parts.next().is_some() {
            return Err(Error::Malformed("mac address"));
        }
        Ok(Address(out))
    }
}

/// EtherType values this code knows by name.
pub mod ethertype {
    pub const IPV4: u16 = 0x0800;
    pub const ARP: u16 = 0x0806;
    pub const VLAN: u16 = 0x8100;
    pub const IPV6: u16 = 0x86dd;
    pub const QINQ: u16 = 0x88a8;
}

/// True for the tag protocol identifiers of 802.1Q and 802.1ad.
pub fn is_vlan_tpid(ethertype: u16) -> bool {
    ethertype == ethertype::VLAN || ethertype == ethertype::QINQ
}

mod field {
    use super::Field;
    pub const DST: Field = 0..6;
    pub const SRC: Field = 6..12;
    pub const ETHERTYPE: Field = 12..14;
    pub const PAYLOAD: usize = 14;
}

/// Length of an untagged Ethernet II header.
pub const HEADER_LEN: usize = field::PAYLOAD;

/// A view of an Ethernet II frame.
#[derive(Debug, Clone)]
pub struct Frame<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Frame<T> {
    pub const fn new_unchecked(buffer: T) -> Frame<T> {
        Frame { buffer }
    }
    #[inline]
    pub fn new_checked(buffer: T) -> Result<Frame<T>> {
        let f = Frame::new_unchecked(buffer);
        f.check_len()?;
        Ok(f)
    }
    #[inline]
    pub fn check_len(&self) -> Result<()> {
        need(self.buffer.as_ref(), HEADER_LEN, "ethernet header")
    }
    pub fn into_inner(self) -> T {
        self.buffer
    }
    #[inline]
    pub fn dst_addr(&self) -> Address {
        self.addr(field::DST)
    }
    #[inline]
    pub fn src_addr(&self) -> Address {
        self.addr(field::SRC)
    }
    /// The six bytes of `f` as an address: one bounds check and one copy,
    /// where building the array byte by byte checked each index.
    #[inline]
    fn addr(&self, f: Field) -> Address {
        let mut a = [0u8; 6];
        a.copy_from_slice(&self.buffer.as_ref()[f]);
        Address(a)
    }
    #[inline]
    pub fn ethertype(&self) -> u16 {
        be16(self.buffer.as_ref(), field::ETHERTYPE.start)
    }
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[field::PAYLOAD..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Frame<T> {
    pub fn set_dst_addr(&mut self, a: Address) {
        self.buffer.as_mut()[field::DST].copy_from_slice(&a.0);
    }
    pub fn set_src_addr(&mut self, a: Address) {
        self.buffer.as_mut()[field::SRC].copy_from_slice(&a.0);
    }
    pub fn set_ethertype(&mut self, t: u16) {
        put16(self.buffer.as_mut(), field::ETHERTYPE.start, t);
    }
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[field::PAYLOAD..]
    }
}

/// The fields of an Ethernet II header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    pub src: Address,
    pub dst: Address,
    pub ethertype: u16,
}

impl Repr {
    pub fn parse<T: AsRef<[u8]>>(f: &Frame<T>) -> Result<Repr> {
        f.check_len()?;
        Ok(Repr {
            src: f.src_addr(),
            dst: f.dst_addr(),
            ethertype: f.ethertype(),
        })
    }
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN
    }
    /// Writes the header; the buffer must hold at least [`HEADER_LEN`] bytes.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, f: &mut Frame<T>) -> Result<()> {
        f.check_len()?;
        f.set_src_addr(self.src);
        f.set_dst_addr(self.dst);
        f.set_ethertype(self.ethertype);
        Ok(())
    }
}

mod vlan_field {
    use super::Field;
    pub const TCI: Field = 0..2;
    pub const ETHERTYPE: Field = 2..4;
    pub const PAYLOAD: usize = 4;
}

/// Length of one VLAN tag after its TPID (TCI + inner EtherType).
pub const VLAN_TAG_LEN: usize = vlan_field::PAYLOAD;

/// A view of the four bytes that follow an 802.1Q or 802.1ad TPID.
#[derive(Debug, Clone)]
pub struct VlanTag<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> VlanTag<T> {
    pub const fn new_unchecked(buffer: T) -> VlanTag<T> {
        VlanTag { buffer }
    }
    pub fn new_checked(buffer: T) -> Result<VlanTag<T>> {
        let t = VlanTag::new_unchecked(buffer);
        t.check_len()?;
        Ok(t)
    }
    pub fn check_len(&self) -> Result<()> {
        need(self.buffer.as_ref(), VLAN_TAG_LEN, "vlan tag")
    }
    pub fn tci(&self) -> u16 {
        be16(self.buffer.as_ref(), vlan_field::TCI.start)
    }
    pub fn pcp(&self) -> u8 {
        (self.tci() >> 13) as u8
    }
    pub fn dei(&self) -> bool {
        self.tci() & 0x1000 != 0
    }
    pub fn vid(&self) -> u16 {
        self.tci() & 0x0fff
    }
    pub fn ethertype(&self) -> u16 {
        be16(self.buffer.as_ref(), vlan_field::ETHERTYPE.start)
    }
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[vlan_field::PAYLOAD..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> VlanTag<T> {
    pub fn set_tci(&mut self, tci: u16) {
        put16(self.buffer.as_mut(), vlan_field::TCI.start, tci);
    }
    pub fn set_ethertype(&mut self, t: u16) {
        put16(self.buffer.as_mut(), vlan_field::ETHERTYPE.start, t);
    }
}

/// One VLAN tag: the TPID that introduced it and its TCI fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VlanRepr {
    /// 0x8100 (802.1Q, C-tag) or 0x88a8 (802.1ad, S-tag).
    pub tpid: u16,
    pub pcp: u8,
    pub dei: bool,
    pub vid: u16,
    /// The EtherType after this tag.
    pub inner: u16,
}

impl VlanRepr {
    pub fn parse<T: AsRef<[u8]>>(tpid: u16, t: &VlanTag<T>) -> Result<VlanRepr> {
        t.check_len()?;
        if !is_vlan_tpid(tpid) {
            return Err(Error::Malformed("vlan tpid"));
        }
        Ok(VlanRepr {
            tpid,
            pcp: t.pcp(),
            dei: t.dei(),
            vid: t.vid(),
            inner: t.ethertype(),
        })
    }
    pub fn tci(&self) -> u16 {
        (u16::from(self.pcp & 7) << 13) | (u16::from(self.dei) << 12) | (self.vid & 0x0fff)
    }
    pub const fn buffer_len(&self) -> usize {
        VLAN_TAG_LEN
    }
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, t: &mut VlanTag<T>) -> Result<()> {
        t.check_len()?;
        if self.vid > 0x0fff || self.pcp > 7 {
            return Err(Error::Malformed("vlan tci"));
        }
        t.set_tci(self.tci());
        t.set_ethertype(self.inner);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static FRAME: [u8; 22] = [
        0x02, 0, 0, 0, 0, 2, // dst
        0x02, 0, 0, 0, 0, 1, // src
        0x81, 0x00, // 802.1Q
        0xa0, 0x64, // pcp 5, vid 100
        0x08, 0x00, // IPv4
        0xde, 0xad, 0xbe, 0xef,
    ];

    #[test]
    fn parse_and_emit_round_trip() {
        let f = Frame::new_checked(&FRAME[..]).unwrap();
        let r = Repr::parse(&f).unwrap();
        assert_eq!(r.dst, Address([2, 0, 0, 0, 0, 2]));
        assert_eq!(r.src, Address([2, 0, 0, 0, 0, 1]));
        assert_eq!(r.ethertype, ethertype::VLAN);
        let tag = VlanTag::new_checked(f.payload()).unwrap();
        let v = VlanRepr::parse(r.ethertype, &tag).unwrap();
        assert_eq!(
            (v.pcp, v.dei, v.vid, v.inner),
            (5, false, 100, ethertype::IPV4)
        );
        assert_eq!(tag.payload(), &[0xde, 0xad, 0xbe, 0xef]);

        let mut out = [0u8; 22];
        let mut of = Frame::new_unchecked(&mut out[..]);
        r.emit(&mut of).unwrap();
        let mut ot = VlanTag::new_unchecked(&mut of.payload_mut()[..]);
        v.emit(&mut ot).unwrap();
        out[18..].copy_from_slice(&FRAME[18..]);
        assert_eq!(out, FRAME);
    }

    #[test]
    fn short_buffers_are_errors() {
        assert_eq!(
            Frame::new_checked(&FRAME[..13]).unwrap_err(),
            Error::Truncated("ethernet header")
        );
        assert!(VlanTag::new_checked(&FRAME[14..17]).is_err());
    }

    #[test]
    fn address_text() {
        let a: Address = "02:00:5e:10:00:01".parse().unwrap();
        assert_eq!(a.to_string(), "02:00:5e:10:00:01");
        assert!(a.is_locally_administered() && a.is_unicast());
        assert!("02:00:5e:10:00".parse::<Address>().is_err());
        assert!("02:00:5e:10:00:01:02".parse::<Address>().is_err());
        assert!(Address::BROADCAST.is_multicast());
    }
}
