//! GSO in software: one TCP or UDP super-frame into MSS-sized frames.
//!
//! TCP follows the rules of Linux's tcp_gso_segment: every segment but the
//! last carries exactly `gso_size` bytes, the sequence number advances by
//! the bytes before it, FIN and PSH stay on the last segment only, CWR on
//! the first only, the IPv4 identification increments per segment, and
//! every length and checksum is recomputed. UDP (USO) gives each segment
//! its own UDP header, length and checksum.

use super::OffloadError;
use crate::{
    checksum,
    virtio::{hdr::GsoType, Validated},
    wire::{build::pseudo_header, ip_proto, ipv4, ipv6, tcp, tcp::Flags, udp, FrameInfo, L3Info},
};

/// Splits GSO frames. Holds one header scratch buffer, reused for every
/// segment, so steady-state segmentation does not allocate.
#[derive(Debug, Default)]
pub struct Segmenter {
    hdr: Vec<u8>,
}

impl Segmenter {
    pub fn new() -> Segmenter {
        Segmenter {
            hdr: Vec::with_capacity(256),
        }
    }

    /// Segments a frame that [`crate::virtio::validate`] accepted as GSO.
    /// For each segment `emit(headers, payload)` is called: `headers` are
    /// the rewritten Ethernet/IP/L4 headers, `payload` a slice of `frame`,
    /// so the payload is never copied here. Returns the segment count.
    pub fn segment(
        &mut self,
        frame: &[u8],
        v: &Validated,
        gso_size: u16,
        emit: &mut dyn FnMut(&[u8], &[u8]),
    ) -> Result<usize, OffloadError> {
        let info = v.info.ok_or(OffloadError::NotGso)?;
        match v.gso {
            GsoType::TcpV4 | GsoType::TcpV6 | GsoType::UdpL4 => {}
            _ => return Err(OffloadError::NotGso),
        }
        self.segment_parsed(frame, &info, gso_size, emit)
    }

    /// As [`Segmenter::segment`], for a frame already parsed by the caller.
    pub fn segment_parsed(
        &mut self,
        frame: &[u8],
        info: &FrameInfo,
        gso_size: u16,
        emit: &mut dyn FnMut(&[u8], &[u8]),
    ) -> Result<usize, OffloadError> {
        let mss = usize::from(gso_size);
        if mss == 0 {
            return Err(OffloadError::ZeroGsoSize);
        }
        let l4 = info.l4.ok_or(OffloadError::NotGso)?;
        let (src, dst) = info.l3.addrs().ok_or(OffloadError::NotGso)?;
        let hdr_end = l4.offset + l4.header_len;
        let end = info.l3_end(frame.len());
        let payload = frame.get(hdr_end..end).ok_or(OffloadError::NotGso)?;
        if payload.is_empty() {
            return Err(OffloadError::NotGso);
        }
        let is_tcp = match l4.protocol {
            ip_proto::TCP => true,
            ip_proto::UDP => false,
            _ => return Err(OffloadError::NotGso),
        };
        self.hdr.clear();
        self.hdr.extend_from_slice(&frame[..hdr_end]);
        let l3 = info.l3_offset;
        let (base_id, base_seq, base_flags) = {
            let id = match info.l3 {
                L3Info::Ipv4 { .. } => ipv4::Packet::new_checked(&frame[l3..])?.ident(),
                _ => 0,
            };
            if is_tcp {
                let t = tcp::Packet::new_checked(&frame[l4.offset..hdr_end])?;
                (id, t.seq_number(), t.flags())
            } else {
                (id, 0, Flags::empty())
            }
        };
        let count = payload.len().div_ceil(mss);
        for (i, chunk) in payload.chunks(mss).enumerate() {
            let l4_len = l4.header_len + chunk.len();
            let h = &mut self.hdr[..];
            match info.l3 {
                L3Info::Ipv4 { header_len, .. } => {
                    let mut ip = ipv4::Packet::new_unchecked(&mut h[l3..]);
                    ip.set_total_len((header_len + l4_len) as u16);
                    ip.set_ident(base_id.wrapping_add(i as u16));
                    ip.fill_checksum();
                }
                _ => {
                    let plen = l4.offset - l3 - ipv6::HEADER_LEN + l4_len;
                    ipv6::Packet::new_unchecked(&mut h[l3..]).set_payload_len(plen as u16);
                }
            }
            let ps = pseudo_header(src, dst, l4.protocol, l4_len);
            if is_tcp {
                let mut t = tcp::Packet::new_unchecked(&mut h[l4.offset..]);
                t.set_seq_number(base_seq.wrapping_add((i * mss) as u32));
                let mut f = base_flags;
                if i + 1 != count {
                    f.remove(Flags::FIN | Flags::PSH);
                }
                if i != 0 {
                    f.remove(Flags::CWR);
                }
                t.set_flags(f);
                t.set_checksum(0);
            } else {
                let mut u = udp::Packet::new_unchecked(&mut h[l4.offset..]);
                u.set_len(l4_len as u16);
                u.set_checksum(0);
            }
            // Every header length here is even, so the payload's sum adds
            // on word boundaries.
            let sum =
                checksum::combine(&[ps, checksum::sum(&h[l4.offset..]), checksum::sum(chunk)]);
            let mut c = !sum;
            let off = l4.offset
                + if is_tcp {
                    tcp::CHECKSUM_OFFSET
                } else {
                    if c == 0 {
                        c = 0xffff;
                    }
                    udp::CHECKSUM_OFFSET
                };
            h[off..off + 2].copy_from_slice(&c.to_be_bytes());
            emit(h, chunk);
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        virtio::{hdr::HdrFlags, validate, VirtioNetHdr},
        wire::{
            build::{data_segment, tcp_frame, udp_frame, Flow, IpFields},
            parse_frame,
        },
    };

    fn gso_hdr(gso: GsoType, size: u16) -> VirtioNetHdr {
        VirtioNetHdr {
            flags: HdrFlags::empty(),
            gso_type: gso as u8,
            gso_size: size,
            ..Default::default()
        }
    }

    fn run(frame: &[u8], gso: GsoType, size: u16) -> Vec<Vec<u8>> {
        let v = validate(&gso_hdr(gso, size), frame).unwrap();
        let mut out = Vec::new();
        let n = Segmenter::new()
            .segment(frame, &v, size, &mut |h, p| {
                let mut f = h.to_vec();
                f.extend_from_slice(p);
                out.push(f);
            })
            .unwrap();
        assert_eq!(n, out.len());
        out
    }

    #[test]
    fn tso_64k_v4_follows_linux_rules() {
        let payload: Vec<u8> = (0..65000u32).map(|i| (i * 7) as u8).collect();
        let ip = IpFields {
            ident: 0xfffe,
            ..Default::default()
        };
        let seg = data_segment(
            0xffff_0000,
            77,
            Flags::ACK | Flags::PSH | Flags::FIN | Flags::CWR,
        );
        let f = tcp_frame(&Flow::v4(), seg, &ip, &payload).unwrap();
        let out = run(&f, GsoType::TcpV4, 1448);
        assert_eq!(out.len(), 65000usize.div_ceil(1448));
        let mut got = Vec::new();
        for (i, s) in out.iter().enumerate() {
            let info = parse_frame(s).unwrap();
            assert!(super::super::l4_checksum_ok(s, &info), "segment {i}");
            let ipp = ipv4::Packet::new_checked(&s[14..]).unwrap();
            assert!(ipp.verify_checksum());
            assert_eq!(ipp.ident(), 0xfffeu16.wrapping_add(i as u16));
            assert_eq!(ipp.total_len(), s.len() - 14);
            let t = tcp::Packet::new_checked(&s[34..]).unwrap();
            assert_eq!(t.seq_number(), 0xffff_0000u32.wrapping_add(i as u32 * 1448));
            let last = i + 1 == out.len();
            assert_eq!(t.flags().contains(Flags::FIN), last);
            assert_eq!(t.flags().contains(Flags::PSH), last);
            assert_eq!(t.flags().contains(Flags::CWR), i == 0);
            assert!(t.flags().contains(Flags::ACK));
            assert_eq!(t.ack_number(), 77);
            if !last {
                assert_eq!(t.payload().len(), 1448);
            }
            got.extend_from_slice(t.payload());
        }
        assert_eq!(got, payload);
    }

    #[test]
    fn tso_v6_and_uso() {
        let payload = vec![0xabu8; 9000];
        let f = tcp_frame(
            &Flow::v6(),
            data_segment(1, 2, Flags::ACK),
            &IpFields::default(),
            &payload,
        )
        .unwrap();
        let out = run(&f, GsoType::TcpV6, 1428);
        assert_eq!(out.len(), 7);
        for s in &out {
            let info = parse_frame(s).unwrap();
            assert!(super::super::l4_checksum_ok(s, &info));
            let p6 = ipv6::Packet::new_checked(&s[14..]).unwrap();
            assert_eq!(p6.payload_len(), s.len() - 54);
        }
        let u = udp_frame(&Flow::v4(), &IpFields::default(), &payload).unwrap();
        let out = run(&u, GsoType::UdpL4, 1472);
        assert_eq!(out.len(), 7);
        let mut got = Vec::new();
        for (i, s) in out.iter().enumerate() {
            let info = parse_frame(s).unwrap();
            assert!(super::super::l4_checksum_ok(s, &info));
            let d = udp::Packet::new_checked(&s[34..]).unwrap();
            assert_eq!(d.len(), s.len() - 34);
            assert_eq!(
                ipv4::Packet::new_checked(&s[14..]).unwrap().ident(),
                1 + i as u16
            );
            got.extend_from_slice(d.payload());
        }
        assert_eq!(got, payload);
    }

    #[test]
    fn refuses_unvalidated_frames() {
        let f = tcp_frame(
            &Flow::v4(),
            data_segment(1, 2, Flags::ACK),
            &IpFields::default(),
            b"abc",
        )
        .unwrap();
        let v = validate(&VirtioNetHdr::default(), &f).unwrap();
        assert_eq!(
            Segmenter::new().segment(&f, &v, 1, &mut |_, _| {}),
            Err(OffloadError::NotGso)
        );
        let info = parse_frame(&f).unwrap();
        assert_eq!(
            Segmenter::new().segment_parsed(&f, &info, 0, &mut |_, _| {}),
            Err(OffloadError::ZeroGsoSize)
        );
    }
}
