//! Building frames: Ethernet, IPv4/IPv6 headers, checksums and the
//! virtio-net header that asks the device for checksum and TSO.

use std::net::{IpAddr, Ipv6Addr};

use vnic_protocol::{
    checksum,
    virtio::{hdr::GsoType, HdrFlags, VirtioNetHdr},
    wire::{ethernet::Address, ip_proto},
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
