//! `struct virtio_net_hdr` (virtio 1.3, 5.1.6), with and without the hash
//! report fields. All multi-byte fields are little-endian (VERSION_1).

use thiserror::Error;

/// Header length without hash report: flags, gso_type, hdr_len, gso_size,
/// csum_start, csum_offset, num_buffers.
pub const HDR_LEN: usize = 12;
/// Header length with hash_value, hash_report and padding.
pub const HDR_LEN_HASH: usize = 20;

bitflags::bitflags! {
    /// `flags` of the header.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct HdrFlags: u8 {
        const NEEDS_CSUM = 1;
        const DATA_VALID = 2;
        const RSC_INFO = 4;
    }
}

/// `gso_type` without its ECN bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum GsoType {
    None = 0,
    TcpV4 = 1,
    /// UFO: IP fragmentation of a UDP datagram (legacy).
    Udp = 3,
    TcpV6 = 4,
    /// USO: UDP segmentation.
    UdpL4 = 5,
}

/// The ECN bit of `gso_type`.
pub const GSO_ECN: u8 = 0x80;

/// A header field holds a value the specification does not define.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum HdrError {
    #[error("header shorter than {0} bytes")]
    Truncated(usize),
    #[error("unknown gso_type {0:#04x}")]
    GsoType(u8),
    #[error("unknown flags {0:#04x}")]
    Flags(u8),
}

impl GsoType {
    pub fn from_raw(raw: u8) -> Result<(GsoType, bool), HdrError> {
        let t = match raw & !GSO_ECN {
            0 => GsoType::None,
            1 => GsoType::TcpV4,
            3 => GsoType::Udp,
            4 => GsoType::TcpV6,
            5 => GsoType::UdpL4,
            _ => return Err(HdrError::GsoType(raw)),
        };
        Ok((t, raw & GSO_ECN != 0))
    }
}

/// The per-packet header, both directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VirtioNetHdr {
    pub flags: HdrFlags,
    /// Raw `gso_type` (see [`VirtioNetHdr::gso`]).
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
    pub hash_value: u32,
    pub hash_report: u16,
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// Offset of the checksum field in a TCP header (`csum_offset`).
pub const TCP_CSUM_OFFSET: u16 = 16;

impl VirtioNetHdr {
    /// The header a driver puts on a TCP super-frame for the device to
    /// segment: a partial checksum from the TCP header at `csum_start`,
    /// `hdr_len` bytes of headers before the payload, `gso_size`-byte
    /// segments.
    pub fn tcp_tso(gso: GsoType, csum_start: u16, hdr_len: u16, gso_size: u16) -> VirtioNetHdr {
        VirtioNetHdr {
            flags: HdrFlags::NEEDS_CSUM,
            gso_type: gso as u8,
            hdr_len,
            gso_size,
            csum_start,
            csum_offset: TCP_CSUM_OFFSET,
            ..Default::default()
        }
    }

    /// Reads a header of [`HDR_LEN`] bytes, or [`HDR_LEN_HASH`] with
    /// `with_hash`. Unknown flag bits are an error; the gso type is
    /// checked by [`VirtioNetHdr::gso`].
    #[inline]
    pub fn parse(b: &[u8], with_hash: bool) -> Result<VirtioNetHdr, HdrError> {
        let len = if with_hash { HDR_LEN_HASH } else { HDR_LEN };
        if b.len() < len {
            return Err(HdrError::Truncated(len));
        }
        let flags = HdrFlags::from_bits(b[0]).ok_or(HdrError::Flags(b[0]))?;
        let mut h = VirtioNetHdr {
            flags,
            gso_type: b[1],
            hdr_len: le16(b, 2),
            gso_size: le16(b, 4),
            csum_start: le16(b, 6),
            csum_offset: le16(b, 8),
            num_buffers: le16(b, 10),
            hash_value: 0,
            hash_report: 0,
        };
        if with_hash {
            h.hash_value = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
            h.hash_report = le16(b, 16);
        }
        Ok(h)
    }

    /// Writes the header into the front of `b`; returns the length written.
    pub fn emit(&self, b: &mut [u8], with_hash: bool) -> Result<usize, HdrError> {
        let len = if with_hash { HDR_LEN_HASH } else { HDR_LEN };
        let out = b.get_mut(..len).ok_or(HdrError::Truncated(len))?;
        out[0] = self.flags.bits();
        out[1] = self.gso_type;
        out[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        out[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        out[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        out[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        out[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        if with_hash {
            out[12..16].copy_from_slice(&self.hash_value.to_le_bytes());
            out[16..18].copy_from_slice(&self.hash_report.to_le_bytes());
            out[18..20].fill(0);
        }
        Ok(len)
    }

    /// The gso type and whether its ECN bit is set.
    pub fn gso(&self) -> Result<(GsoType, bool), HdrError> {
        GsoType::from_raw(self.gso_type)
    }

    /// With RSC_EXT on receive: coalesced segment count.
    pub fn rsc_segments(&self) -> u16 {
        self.csum_start
    }
    /// With RSC_EXT on receive: duplicate ACKs seen while coalescing.
    pub fn rsc_dup_acks(&self) -> u16 {
        self.csum_offset
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_both_sizes() {
        let h = VirtioNetHdr {
            flags: HdrFlags::NEEDS_CSUM,
            gso_type: GsoType::TcpV6 as u8 | GSO_ECN,
            hdr_len: 74,
            gso_size: 1428,
            csum_start: 54,
            csum_offset: 16,
            num_buffers: 3,
            hash_value: 0xdeadbeef,
            hash_report: 5,
        };
        let mut b = [0u8; 20];
        assert_eq!(h.emit(&mut b, true).unwrap(), 20);
        assert_eq!(
            b,
            [1, 0x84, 74, 0, 0x94, 5, 54, 0, 16, 0, 3, 0, 0xef, 0xbe, 0xad, 0xde, 5, 0, 0, 0]
        );
        assert_eq!(VirtioNetHdr::parse(&b, true).unwrap(), h);
        assert_eq!(h.gso().unwrap(), (GsoType::TcpV6, true));
        let short = VirtioNetHdr::parse(&b, false).unwrap();
        assert_eq!(short.hash_value, 0);
        assert_eq!(short.emit(&mut b, false).unwrap(), 12);
        assert_eq!(
            VirtioNetHdr::parse(&b[..11], false),
            Err(HdrError::Truncated(12))
        );
    }

    #[test]
    fn bad_fields() {
        let mut b = [0u8; 12];
        b[0] = 0x08;
        assert_eq!(VirtioNetHdr::parse(&b, false), Err(HdrError::Flags(8)));
        b[0] = 0;
        b[1] = 2;
        let h = VirtioNetHdr::parse(&b, false).unwrap();
        assert_eq!(h.gso(), Err(HdrError::GsoType(2)));
    }
}
