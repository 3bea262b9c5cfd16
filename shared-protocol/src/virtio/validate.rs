//! What a device checks in a driver's `virtio_net_hdr` before it acts on
//! it: every rule is one [`ValidateError`] variant so that drops can be
//! counted by reason.

use thiserror::Error;

use super::hdr::{GsoType, HdrError, HdrFlags, VirtioNetHdr};
use crate::wire::{self, ip_proto, parse_frame_prefix, FrameInfo, L3Info};

/// Longest frame a driver may hand over: a 64 KiB IP packet behind an
/// Ethernet header and two VLAN tags.
pub const MAX_FRAME_LEN: usize = 65535 + 14 + 8;
/// Smallest frame: an Ethernet header.
pub const MIN_FRAME_LEN: usize = 14;
/// Most segments one GSO frame may expand to. Linux never sends more than
/// 64 KiB / 88 bytes; the bound stops a tiny `gso_size` from turning one
/// descriptor into tens of thousands of frames.
pub const MAX_GSO_SEGMENTS: usize = 1024;
/// Checksum field offset within a TCP header.
pub const TCP_CSUM_OFFSET: u16 = 16;
/// Checksum field offset within a UDP header.
pub const UDP_CSUM_OFFSET: u16 = 6;

/// Why a driver's header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ValidateError {
    #[error("frame of {0} bytes is shorter than an Ethernet header")]
    FrameTooShort(usize),
    #[error("frame of {0} bytes is longer than {MAX_FRAME_LEN}")]
    FrameTooLong(usize),
    #[error(transparent)]
    Header(#[from] HdrError),
    #[error("gso frame does not parse: {0}")]
    Frame(#[from] wire::Error),
    #[error("gso type {0:?} is not offered")]
    UnsupportedGso(GsoType),
    #[error("gso type {0:?} does not match the frame's protocols")]
    GsoProtocolMismatch(GsoType),
    #[error("gso frame is an IP fragment")]
    GsoFragment,
    #[error("gso_size is zero")]
    ZeroGsoSize,
    #[error("gso frame has no payload")]
    EmptyGsoPayload,
    #[error("ECN bit on a non-TCP gso type")]
    EcnWithoutTcp,
    #[error("gso frame would make {0} segments, more than {MAX_GSO_SEGMENTS}")]
    TooManySegments(usize),
    #[error("checksum start {start} + offset {offset} + 2 past frame end {len}")]
    CsumOutOfFrame { start: u16, offset: u16, len: usize },
    #[error("checksum offset {got} in a {proto} header, expected {expected}")]
    CsumOffset {
        proto: &'static str,
        expected: u16,
        got: u16,
    },
    #[error("gso frame's checksum start {got} is not its transport header at {expected}")]
    CsumStart { expected: usize, got: u16 },
    #[error("hdr_len {0} past the frame end")]
    HdrLenOutOfFrame(u16),
}

/// What [`validate`] learned, for the stage that acts on the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validated {
    pub gso: GsoType,
    pub ecn: bool,
    /// Set for GSO frames (always parsed) and for checksum-offload frames
    /// that parsed; `None` for plain frames.
    pub info: Option<FrameInfo>,
    /// Segments a GSO frame expands to (1 otherwise).
    pub segments: usize,
}

/// The checksum offset must be the TCP or UDP header's checksum field.
fn check_csum_offset(proto: u8, got: u16) -> Result<(), ValidateError> {
    let (proto, expected) = match proto {
        ip_proto::TCP => ("tcp", TCP_CSUM_OFFSET),
        ip_proto::UDP => ("udp", UDP_CSUM_OFFSET),
        _ => return Ok(()),
    };
    if got == expected {
        Ok(())
    } else {
        Err(ValidateError::CsumOffset {
            proto,
            expected,
            got,
        })
    }
}

/// Applies the device-side checks of a driver-supplied header to its frame.
pub fn validate(hdr: &VirtioNetHdr, frame: &[u8]) -> Result<Validated, ValidateError> {
    validate_prefix(hdr, frame, frame.len())
}

/// [`validate`] for a frame of `len` bytes of which the caller copied out
/// the first ones, `prefix` (the rest may stay in guest memory). Headers
/// must lie within `prefix`; every check against the frame's length uses
/// `len`. With the whole frame as prefix it is [`validate`].
#[inline]
pub fn validate_prefix(
    hdr: &VirtioNetHdr,
    prefix: &[u8],
    len: usize,
) -> Result<Validated, ValidateError> {
    if len < MIN_FRAME_LEN {
        return Err(ValidateError::FrameTooShort(len));
    }
    if len > MAX_FRAME_LEN {
        return Err(ValidateError::FrameTooLong(len));
    }
    let (gso, ecn) = hdr.gso()?;
    if usize::from(hdr.hdr_len) > len {
        return Err(ValidateError::HdrLenOutOfFrame(hdr.hdr_len));
    }
    if gso == GsoType::None && !ecn && !hdr.flags.contains(HdrFlags::NEEDS_CSUM) {
        // A plain frame: nothing more to check. (Inlined, this path builds
        // its answer where the caller keeps it.)
        return Ok(Validated {
            gso,
            ecn,
            info: None,
            segments: 1,
        });
    }
    validate_offloads(hdr, prefix, len, gso, ecn)
}

/// The rest of [`validate_prefix`], for a frame that asks for an offload.
#[inline(never)]
fn validate_offloads(
    hdr: &VirtioNetHdr,
    prefix: &[u8],
    len: usize,
    gso: GsoType,
    ecn: bool,
) -> Result<Validated, ValidateError> {
    let mut out = Validated {
        gso,
        ecn,
        info: None,
        segments: 1,
    };
    let needs_csum = hdr.flags.contains(HdrFlags::NEEDS_CSUM);
    if needs_csum {
        let end = usize::from(hdr.csum_start) + usize::from(hdr.csum_offset) + 2;
        if end > len {
            return Err(ValidateError::CsumOutOfFrame {
                start: hdr.csum_start,
                offset: hdr.csum_offset,
                len,
            });
        }
    }
    if gso == GsoType::None {
        if ecn {
            return Err(ValidateError::EcnWithoutTcp);
        }
        if needs_csum {
            // A plain checksum request may cover any protocol; when the
            // frame parses and csum_start names its TCP or UDP header, the
            // offset must be that header's checksum field.
            if let Ok(info) = parse_frame_prefix(prefix, len) {
                if let Some(l4) = info.l4 {
                    if l4.offset == usize::from(hdr.csum_start) {
                        check_csum_offset(l4.protocol, hdr.csum_offset)?;
                    }
                }
                out.info = Some(info);
            }
        }
        return Ok(out);
    }

    if gso == GsoType::Udp {
        return Err(ValidateError::UnsupportedGso(gso));
    }
    if hdr.gso_size == 0 {
        return Err(ValidateError::ZeroGsoSize);
    }
    let info = parse_frame_prefix(prefix, len)?;
    if info.l3.is_fragment() {
        return Err(ValidateError::GsoFragment);
    }
    let l4 = info.l4.ok_or(ValidateError::GsoProtocolMismatch(gso))?;
    let matches = match (gso, &info.l3) {
        (GsoType::TcpV4, L3Info::Ipv4 { .. }) | (GsoType::TcpV6, L3Info::Ipv6 { .. }) => {
            l4.protocol == ip_proto::TCP
        }
        (GsoType::UdpL4, L3Info::Ipv4 { .. } | L3Info::Ipv6 { .. }) => l4.protocol == ip_proto::UDP,
        _ => false,
    };
    if !matches {
        return Err(ValidateError::GsoProtocolMismatch(gso));
    }
    if ecn && gso == GsoType::UdpL4 {
        return Err(ValidateError::EcnWithoutTcp);
    }
    if needs_csum {
        if usize::from(hdr.csum_start) != l4.offset {
            return Err(ValidateError::CsumStart {
                expected: l4.offset,
                got: hdr.csum_start,
            });
        }
        check_csum_offset(l4.protocol, hdr.csum_offset)?;
    }
    let payload = info.l3_end(len).saturating_sub(l4.offset + l4.header_len);
    if payload == 0 {
        return Err(ValidateError::EmptyGsoPayload);
    }
    let segments = payload.div_ceil(usize::from(hdr.gso_size));
    if segments > MAX_GSO_SEGMENTS {
        return Err(ValidateError::TooManySegments(segments));
    }
    out.segments = segments;
    out.info = Some(info);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{frame::tests::tcp4_frame, tcp::Flags};

    fn tso(gso_size: u16) -> VirtioNetHdr {
        VirtioNetHdr::tcp_tso(GsoType::TcpV4, 34, 66, gso_size)
    }

    #[test]
    fn accepts_a_linux_tso_frame() {
        let f = tcp4_frame(&[7u8; 4000], 1, Flags::ACK | Flags::PSH);
        let v = validate(&tso(1448), &f).unwrap();
        assert_eq!(v.segments, 3);
        assert_eq!(v.gso, GsoType::TcpV4);
    }

    #[test]
    fn each_rule_has_its_error() {
        let f = tcp4_frame(&[7u8; 4000], 1, Flags::ACK);
        assert_eq!(validate(&tso(0), &f), Err(ValidateError::ZeroGsoSize));
        assert_eq!(
            validate(&tso(3), &f),
            Err(ValidateError::TooManySegments(1334))
        );
        let mut h = tso(1448);
        h.gso_type = GsoType::TcpV6 as u8;
        assert_eq!(
            validate(&h, &f),
            Err(ValidateError::GsoProtocolMismatch(GsoType::TcpV6))
        );
        h.gso_type = GsoType::UdpL4 as u8;
        assert_eq!(
            validate(&h, &f),
            Err(ValidateError::GsoProtocolMismatch(GsoType::UdpL4))
        );
        h.gso_type = GsoType::Udp as u8;
        assert_eq!(
            validate(&h, &f),
            Err(ValidateError::UnsupportedGso(GsoType::Udp))
        );
        h.gso_type = 2;
        assert_eq!(
            validate(&h, &f),
            Err(ValidateError::Header(HdrError::GsoType(2)))
        );
        let mut h = tso(1448);
        h.csum_offset = 6;
        assert!(matches!(
            validate(&h, &f),
            Err(ValidateError::CsumOffset { .. })
        ));
        h.csum_offset = 16;
        h.csum_start = 14;
        assert!(matches!(
            validate(&h, &f),
            Err(ValidateError::CsumStart { .. })
        ));
        h.csum_start = u16::MAX;
        assert!(matches!(
            validate(&h, &f),
            Err(ValidateError::CsumOutOfFrame { .. })
        ));
        let mut h = tso(1448);
        h.hdr_len = 5000;
        assert_eq!(validate(&h, &f), Err(ValidateError::HdrLenOutOfFrame(5000)));
        assert_eq!(
            validate(&tso(1448), &f[..10]),
            Err(ValidateError::FrameTooShort(10))
        );
        let empty = tcp4_frame(&[], 1, Flags::ACK);
        assert_eq!(
            validate(&tso(1448), &empty),
            Err(ValidateError::EmptyGsoPayload)
        );
        // Truncated frame: the IP length claims more than is there.
        assert!(matches!(
            validate(&tso(1448), &f[..100]),
            Err(ValidateError::Frame(_))
        ));
    }

    #[test]
    fn a_header_prefix_validates_like_the_whole_frame() {
        let f = tcp4_frame(&[7u8; 9000], 1, Flags::ACK);
        for (h, len) in [(tso(1448), f.len()), (tso(0), f.len()), (tso(1448), 100)] {
            let whole = validate(&h, &f[..len]);
            let pre = validate_prefix(&h, &f[..len.min(128)], len);
            assert_eq!(whole, pre);
        }
        // Headers must lie in the prefix.
        assert!(matches!(
            validate_prefix(&tso(1448), &f[..40], f.len()),
            Err(ValidateError::Frame(_))
        ));
        assert!(validate_prefix(&tso(1448), &f[..66], f.len()).is_ok());
    }

    #[test]
    fn plain_checksum_requests() {
        let f = tcp4_frame(b"hello", 1, Flags::ACK);
        let mut h = VirtioNetHdr {
            flags: HdrFlags::NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 16,
            ..Default::default()
        };
        assert!(validate(&h, &f).is_ok());
        h.csum_offset = 6;
        assert!(matches!(
            validate(&h, &f),
            Err(ValidateError::CsumOffset { .. })
        ));
        // Generic checksum elsewhere in the frame is allowed.
        h.csum_start = 40;
        assert!(validate(&h, &f).is_ok());
        assert!(validate(&VirtioNetHdr::default(), &f).is_ok());
        let big = vec![0u8; MAX_FRAME_LEN + 1];
        assert_eq!(
            validate(&VirtioNetHdr::default(), &big),
            Err(ValidateError::FrameTooLong(MAX_FRAME_LEN + 1))
        );
    }
}
