//! Checksum offload: completing a driver's NEEDS_CSUM frame, and checking a
//! received frame's transport checksum to decide on DATA_VALID.

use super::OffloadError;
use crate::{
    checksum,
    wire::{build::pseudo_header, ip_proto, FrameInfo},
};

/// Completes a partial checksum as a device does for NEEDS_CSUM: the field
/// at `csum_start + csum_offset` holds the pseudo-header sum the driver put
/// there; the ones'-complement sum from `csum_start` to the end of the
/// frame is folded, complemented and stored. A result of zero is stored as
/// 0xffff, which is the same value and the only one UDP may carry.
pub fn complete_checksum(
    frame: &mut [u8],
    csum_start: usize,
    csum_offset: usize,
) -> Result<(), OffloadError> {
    let len = frame.len();
    let field = csum_start
        .checked_add(csum_offset)
        .filter(|f| f + 2 <= len)
        .ok_or(OffloadError::CsumOutOfFrame {
            start: csum_start,
            offset: csum_offset,
            len,
        })?;
    let c = !checksum::sum(&frame[csum_start..]);
    let c = if c == 0 { 0xffff } else { c };
    frame[field..field + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

/// True when the frame is TCP or UDP over IPv4/IPv6 (unfragmented) and its
/// transport checksum verifies. A UDP-over-IPv4 checksum of zero ("none")
/// does not count as verified.
pub fn l4_checksum_ok(frame: &[u8], info: &FrameInfo) -> bool {
    let Some(l4) = info.l4 else {
        return false;
    };
    if l4.protocol != ip_proto::TCP && l4.protocol != ip_proto::UDP {
        return false;
    }
    let Some((src, dst)) = info.l3.addrs() else {
        return false;
    };
    let end = info.l3_end(frame.len());
    let Some(seg) = frame.get(l4.offset..end) else {
        return false;
    };
    if l4.protocol == ip_proto::UDP && seg.get(6..8) == Some(&[0, 0]) {
        return false;
    }
    let ps = pseudo_header(src, dst, l4.protocol, seg.len());
    checksum::add(ps, checksum::sum(seg)) == 0xffff
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{
        build::{data_segment, tcp_frame, udp_frame, Flow, IpFields},
        parse_frame,
        tcp::Flags,
    };

    #[test]
    fn completes_like_a_linux_driver_asks() {
        for (frame, field) in [
            (
                tcp_frame(
                    &Flow::v4(),
                    data_segment(9, 9, Flags::ACK),
                    &IpFields::default(),
                    &[5; 333],
                )
                .unwrap(),
                16,
            ),
            (
                udp_frame(&Flow::v6(), &IpFields::default(), &[6; 77]).unwrap(),
                6,
            ),
        ] {
            let info = parse_frame(&frame).unwrap();
            assert!(l4_checksum_ok(&frame, &info));
            let l4 = info.l4.unwrap();
            // What a driver hands over: the pseudo-header sum in the field.
            let mut partial = frame.clone();
            let (s, d) = info.l3.addrs().unwrap();
            let ps = pseudo_header(s, d, l4.protocol, frame.len() - l4.offset);
            partial[l4.offset + field..l4.offset + field + 2].copy_from_slice(&ps.to_be_bytes());
            assert!(!l4_checksum_ok(&partial, &info));
            complete_checksum(&mut partial, l4.offset, field).unwrap();
            assert_eq!(partial, frame);
        }
    }

    #[test]
    fn out_of_frame() {
        let mut f = [0u8; 20];
        assert_eq!(
            complete_checksum(&mut f, 10, 9),
            Err(OffloadError::CsumOutOfFrame {
                start: 10,
                offset: 9,
                len: 20
            })
        );
        assert!(complete_checksum(&mut f, usize::MAX, 2).is_err());
        assert!(complete_checksum(&mut f, 10, 8).is_ok());
    }
}
