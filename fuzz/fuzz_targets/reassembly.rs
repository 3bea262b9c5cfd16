//! Invariant: the reassembler only emits a datagram once its fragments
//! cover it exactly, never longer than 65535 bytes of length field, never
//! built from overlapping fragments, and byte-equal to what the fragments
//! carried; an overlap discards the datagram for good (until timeout); and
//! a datagram whose non-overlapping fragments cover it is always emitted.
//!
//! Input: byte 0 picks IPv4 or IPv6; then 4-byte operations on one
//! datagram: offset (13 bits, in 8-byte units), length (8-byte units, plus
//! a 0-7 byte tail on a final fragment), more-fragments flag, fill pattern;
//! or, with the high flag bit, a 30 s pause that times the datagram out.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vnic_protocol::{
    frag::{FragError, Limits, Outcome, Reassembler},
    wire::build,
};

#[derive(Default)]
struct Model {
    frags: Vec<(usize, Vec<u8>, bool)>,
    dead: bool,
}

impl Model {
    fn overlaps(&self, off: usize, end: usize) -> bool {
        self.frags
            .iter()
            .any(|(o, d, _)| off < o + d.len() && *o < end && !(*o == off && o + d.len() == end))
    }
    fn duplicate(&self, off: usize, end: usize) -> bool {
        self.frags
            .iter()
            .any(|(o, d, _)| *o == off && o + d.len() == end)
    }
    /// The datagram when the fragments cover [0, total) exactly.
    fn assembled(&self) -> Option<Vec<u8>> {
        let total = self
            .frags
            .iter()
            .find(|f| !f.2)
            .map(|(o, d, _)| o + d.len())?;
        let mut out = vec![0u8; total];
        let mut covered = 0;
        for (o, d, _) in &self.frags {
            if o + d.len() > total {
                return None;
            }
            out[*o..o + d.len()].copy_from_slice(d);
            covered += d.len();
        }
        (covered == total && self.frags.iter().any(|f| f.0 == 0)).then_some(out)
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, ops)) = data.split_first() else {
        return;
    };
    let is_v6 = mode & 1 != 0;
    let hdr = if is_v6 { 40 } else { 20 };
    let mut r = Reassembler::new(Limits {
        max_memory: 64 << 20,
        ..Default::default()
    });
    let mut m = Model::default();
    let mut now = 0u64;
    for op in ops.chunks_exact(4) {
        let flags = op[3];
        if flags & 0x80 != 0 {
            now += 30_000;
            r.expire(now);
            m = Model::default();
            continue;
        }
        let offset = usize::from(u16::from_le_bytes([op[0], op[1]]) & 0x1fff) * 8;
        let more = flags & 1 != 0;
        let tail = if more {
            0
        } else {
            usize::from((flags >> 1) & 7)
        };
        let len = usize::from(op[2]) * 8 + tail;
        let fill = flags >> 4;
        let payload: Vec<u8> = (0..len)
            .map(|i| ((offset + i) as u8) ^ (fill * 17))
            .collect();
        let pkt = if is_v6 {
            build::ipv6_fragment(42, offset, more, &payload)
        } else {
            build::ipv4_fragment(42, offset, more, &payload)
        };
        let Ok(pkt) = pkt else { continue };
        let end = offset + len;
        match r.push(now, &pkt) {
            Ok(Outcome::Complete(out)) => {
                assert!(out.len() - if is_v6 { 40 } else { 0 } <= 65535);
                let body = &out[hdr..];
                if offset == 0 && !more {
                    assert!(is_v6);
                    // An atomic fragment stands alone.
                    assert_eq!(body, &payload[..]);
                    continue;
                }
                assert!(!m.dead, "output from a discarded datagram");
                assert!(!m.overlaps(offset, end), "output built over an overlap");
                m.frags.push((offset, payload, more));
                let want = m
                    .assembled()
                    .expect("output only when fragments cover the datagram");
                assert_eq!(body, &want[..]);
                m = Model::default();
            }
            Ok(Outcome::Held) => {
                assert!(!m.dead);
                assert!(!m.overlaps(offset, end));
                m.frags.push((offset, payload, more));
                assert!(m.assembled().is_none(), "complete datagram was held back");
            }
            Ok(Outcome::NotFragment) => {
                // Offset 0 without MF is a whole IPv4 packet; IPv6 marks
                // even that as a (atomic) fragment.
                assert!(!is_v6 && offset == 0 && !more);
            }
            Err(FragError::Overlap) => {
                assert!(m.overlaps(offset, end));
                m.dead = true;
            }
            Err(FragError::Duplicate) => assert!(m.duplicate(offset, end)),
            Err(FragError::Discarded) => assert!(m.dead),
            Err(FragError::Inconsistent | FragError::TooManyFragments) => m.dead = true,
            Err(FragError::TooLarge) => assert!(end + if is_v6 { 0 } else { 20 } > 65535),
            Err(FragError::Empty | FragError::Misaligned) => {
                assert!(len == 0 || (more && len % 8 != 0));
            }
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
});
