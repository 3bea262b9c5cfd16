//! ICMPv6 (RFC 4443) with the neighbour discovery messages a host needs
//! (RFC 4861 neighbour solicitation and advertisement).

use core::net::Ipv6Addr;

pub use super::icmpv4::Packet;
use super::{ethernet::Address, icmpv4::echo_rest, icmpv4::HEADER_LEN, need, Error, Result};

pub const DST_UNREACHABLE: u8 = 1;
pub const PACKET_TOO_BIG: u8 = 2;
pub const TIME_EXCEEDED: u8 = 3;
pub const PARAM_PROBLEM: u8 = 4;
pub const ECHO_REQUEST: u8 = 128;
pub const ECHO_REPLY: u8 = 129;
pub const ROUTER_SOLICIT: u8 = 133;
pub const ROUTER_ADVERT: u8 = 134;
pub const NEIGHBOR_SOLICIT: u8 = 135;
pub const NEIGHBOR_ADVERT: u8 = 136;

/// NDP option types.
const OPT_SOURCE_LLADDR: u8 = 1;
const OPT_TARGET_LLADDR: u8 = 2;

/// Neighbour advertisement flags (first byte of the rest of header).
pub const NA_ROUTER: u8 = 0x80;
pub const NA_SOLICITED: u8 = 0x40;
pub const NA_OVERRIDE: u8 = 0x20;

/// An ICMPv6 message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repr<'a> {
    EchoRequest {
        ident: u16,
        seq_no: u16,
        data: &'a [u8],
    },
    EchoReply {
        ident: u16,
        seq_no: u16,
        data: &'a [u8],
    },
    NeighborSolicit {
        target: Ipv6Addr,
        source_lladdr: Option<Address>,
    },
    NeighborAdvert {
        /// `NA_ROUTER | NA_SOLICITED | NA_OVERRIDE` bits.
        flags: u8,
        target: Ipv6Addr,
        target_lladdr: Option<Address>,
    },
    Other {
        msg_type: u8,
        code: u8,
        rest: [u8; 4],
        data: &'a [u8],
    },
}

/// Finds a link-layer address option of `kind` in an NDP options area.
fn find_lladdr(mut opts: &[u8], kind: u8) -> Result<Option<Address>> {
    let mut found = None;
    while !opts.is_empty() {
        need(opts, 2, "ndp option")?;
        let len = usize::from(opts[1]) * 8;
        if len == 0 || len > opts.len() {
            return Err(Error::Malformed("ndp option length"));
        }
        if opts[0] == kind && len == 8 {
            found = Address::from_bytes(&opts[2..8]);
        }
        opts = &opts[len..];
    }
    Ok(found)
}

fn target(data: &[u8]) -> Result<Ipv6Addr> {
    need(data, 16, "ndp target")?;
    let mut a = [0u8; 16];
    a.copy_from_slice(&data[..16]);
    Ok(Ipv6Addr::from(a))
}

impl<'a> Repr<'a> {
    /// Parses a message; `pseudo` is the IPv6 pseudo-header sum used to
    /// verify the checksum.
    pub fn parse<T: AsRef<[u8]> + ?Sized>(p: &'a Packet<&'a T>, pseudo: u16) -> Result<Repr<'a>> {
        p.check_len()?;
        if !p.verify_checksum(pseudo) {
            return Err(Error::Checksum("icmpv6 message"));
        }
        let (ident, seq_no, data) = (p.echo_ident(), p.echo_seq_no(), p.data());
        Ok(match (p.msg_type(), p.msg_code()) {
            (ECHO_REQUEST, 0) => Repr::EchoRequest {
                ident,
                seq_no,
                data,
            },
            (ECHO_REPLY, 0) => Repr::EchoReply {
                ident,
                seq_no,
                data,
            },
            (NEIGHBOR_SOLICIT, 0) => Repr::NeighborSolicit {
                target: target(data)?,
                source_lladdr: find_lladdr(&data[16..], OPT_SOURCE_LLADDR)?,
            },
            (NEIGHBOR_ADVERT, 0) => Repr::NeighborAdvert {
                flags: p.rest_of_header()[0] & (NA_ROUTER | NA_SOLICITED | NA_OVERRIDE),
                target: target(data)?,
                target_lladdr: find_lladdr(&data[16..], OPT_TARGET_LLADDR)?,
            },
            (ECHO_REQUEST | ECHO_REPLY | NEIGHBOR_SOLICIT | NEIGHBOR_ADVERT, _) => {
                return Err(Error::Malformed("icmpv6 code"))
            }
            (msg_type, code) => Repr::Other {
                msg_type,
                code,
                rest: p.rest_of_header(),
                data,
            },
        })
    }

    pub fn buffer_len(&self) -> usize {
        HEADER_LEN
            + match self {
                Repr::EchoRequest { data, .. }
                | Repr::EchoReply { data, .. }
                | Repr::Other { data, .. } => data.len(),
                Repr::NeighborSolicit {
                    source_lladdr: l, ..
                }
                | Repr::NeighborAdvert {
                    target_lladdr: l, ..
                } => 16 + if l.is_some() { 8 } else { 0 },
            }
    }

    /// Writes the message with its checksum (`pseudo`: the IPv6
    /// pseudo-header sum for this message's length).
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, p: &mut Packet<T>, pseudo: u16) -> Result<()> {
        need(p.message(), self.buffer_len(), "icmpv6 message")?;
        let nd =
            |p: &mut Packet<T>, t: u8, rest: [u8; 4], tgt: &Ipv6Addr, ll: Option<(u8, Address)>| {
                p.set_msg_type(t);
                p.set_msg_code(0);
                p.set_rest_of_header(rest);
                let d = p.data_mut();
                d[..16].copy_from_slice(&tgt.octets());
                if let Some((kind, a)) = ll {
                    d[16] = kind;
                    d[17] = 1;
                    d[18..24].copy_from_slice(&a.0);
                }
            };
        match *self {
            Repr::EchoRequest {
                ident,
                seq_no,
                data,
            }
            | Repr::EchoReply {
                ident,
                seq_no,
                data,
            } => {
                let t = if matches!(self, Repr::EchoRequest { .. }) {
                    ECHO_REQUEST
                } else {
                    ECHO_REPLY
                };
                p.set_msg_type(t);
                p.set_msg_code(0);
                p.set_rest_of_header(echo_rest(ident, seq_no));
                p.data_mut()[..data.len()].copy_from_slice(data);
            }
            Repr::NeighborSolicit {
                target,
                source_lladdr,
            } => nd(
                p,
                NEIGHBOR_SOLICIT,
                [0; 4],
                &target,
                source_lladdr.map(|a| (OPT_SOURCE_LLADDR, a)),
            ),
            Repr::NeighborAdvert {
                flags,
                target,
                target_lladdr,
            } => nd(
                p,
                NEIGHBOR_ADVERT,
                [flags, 0, 0, 0],
                &target,
                target_lladdr.map(|a| (OPT_TARGET_LLADDR, a)),
            ),
            Repr::Other {
                msg_type,
                code,
                rest,
                data,
            } => {
                p.set_msg_type(msg_type);
                p.set_msg_code(code);
                p.set_rest_of_header(rest);
                p.data_mut()[..data.len()].copy_from_slice(data);
            }
        }
        p.fill_checksum(pseudo);
        Ok(())
    }
}

/// The solicited-node multicast address of `addr` (RFC 4291 2.7.1).
pub fn solicited_node(addr: Ipv6Addr) -> Ipv6Addr {
    let o = addr.octets();
    Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(o[13]),
        u16::from_be_bytes([o[14], o[15]]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checksum;

    fn pseudo(len: usize) -> u16 {
        checksum::pseudo_header_v6(
            "fe80::1".parse().unwrap(),
            "ff02::1:ff00:2".parse().unwrap(),
            58,
            len as u32,
        )
    }

    #[test]
    fn neighbor_solicit_round_trip() {
        let r = Repr::NeighborSolicit {
            target: "2001:db8::2".parse().unwrap(),
            source_lladdr: Some(Address([2, 0, 0, 0, 0, 1])),
        };
        let len = r.buffer_len();
        assert_eq!(len, 32);
        let mut b = vec![0u8; len];
        r.emit(&mut Packet::new_unchecked(&mut b[..]), pseudo(len))
            .unwrap();
        let p = Packet::new_checked(&b[..]).unwrap();
        assert_eq!(Repr::parse(&p, pseudo(len)).unwrap(), r);
        assert_eq!(
            Repr::parse(&p, pseudo(len + 1)),
            Err(Error::Checksum("icmpv6 message"))
        );
    }

    #[test]
    fn advert_and_echo_round_trip() {
        for r in [
            Repr::NeighborAdvert {
                flags: NA_SOLICITED | NA_OVERRIDE,
                target: "2001:db8::2".parse().unwrap(),
                target_lladdr: None,
            },
            Repr::EchoReply {
                ident: 1,
                seq_no: 2,
                data: b"ping",
            },
        ] {
            let len = r.buffer_len();
            let mut b = vec![0u8; len];
            r.emit(&mut Packet::new_unchecked(&mut b[..]), pseudo(len))
                .unwrap();
            let p = Packet::new_checked(&b[..]).unwrap();
            assert_eq!(Repr::parse(&p, pseudo(len)).unwrap(), r);
        }
    }

    #[test]
    fn zero_length_ndp_option_is_rejected() {
        let r = Repr::NeighborSolicit {
            target: "2001:db8::2".parse().unwrap(),
            source_lladdr: Some(Address([2, 0, 0, 0, 0, 1])),
        };
        let len = r.buffer_len();
        let mut b = vec![0u8; len];
        let mut p = Packet::new_unchecked(&mut b[..]);
        r.emit(&mut p, pseudo(len)).unwrap();
        p.data_mut()[17] = 0;
        p.fill_checksum(pseudo(len));
        let p = Packet::new_checked(&b[..]).unwrap();
        assert_eq!(
            Repr::parse(&p, pseudo(len)),
            Err(Error::Malformed("ndp option length"))
        );
    }

    #[test]
    fn solicited_node_address() {
        assert_eq!(
            solicited_node("2001:db8::12:3456".parse().unwrap()),
            "ff02::1:ff12:3456".parse::<Ipv6Addr>().unwrap()
        );
    }
}
