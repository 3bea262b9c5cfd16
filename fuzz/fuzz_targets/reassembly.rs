//! Invariant: the reassembler only emits a datagram once its fragments
//! cover it exactly, with a length field equal to its length and never
//! over 65535 nor `max_datagram` (counting the first fragment's options or
//! extension headers, whatever order the fragments come in), never built
//! from overlapping fragments, and byte-equal to what the fragments
//! carried; an overlap discards the datagram for good (until timeout), and
//! so does a copy of a fragment's range with another more-fragments flag
//! or other bytes, while an exact copy is a duplicate dropped alone; and
//! a datagram whose non-overlapping fragments cover it, and that fits the
//! limits, is always emitted. After every call the memory charged is what
//! the reassembler holds and within `max_memory` (`check_invariants`).
//!
//! Input: byte 0 picks IPv4 or IPv6 (bit 0), a longer unfragmentable part
//! on fragments at offset 0 (bit 1: IPv4 options, IPv6 destination
//! options, of a length the high nibble picks), a small `max_datagram`
//! (bit 2) and a small `max_memory` (bit 3, the high nibble picks it);
//! then 4-byte operations on one datagram: offset (13 bits, in
//! 8-byte units), length (8-byte units, plus a 0-7 byte tail on a final
//! fragment), more-fragments flag, fill pattern; or, with the high flag
//! bit, a 30 s pause that times the datagram out.

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
    /// A fragment holds exactly this range.
    fn same_range(&self, off: usize, end: usize) -> bool {
        self.frags
            .iter()
            .any(|(o, d, _)| *o == off && o + d.len() == end)
    }
    /// A fragment holds exactly this range and flag, but other bytes.
    fn other_bytes(&self, off: usize, more: bool, payload: &[u8]) -> bool {
        self.frags
            .iter()
            .any(|(o, d, m)| *o == off && *m == more && d.len() == payload.len() && d != payload)
    }
    /// A fragment holds exactly this range, flag and bytes.
    fn duplicate(&self, off: usize, more: bool, payload: &[u8]) -> bool {
        self.frags
            .iter()
            .any(|(o, d, m)| *o == off && *m == more && d == payload)
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
    fn has_first(&self) -> bool {
        self.frags.iter().any(|f| f.0 == 0)
    }
    /// Highest payload end held.
    fn top(&self) -> usize {
        self.frags
            .iter()
            .map(|(o, d, _)| o + d.len())
            .max()
            .unwrap_or(0)
    }
}

/// The length field of a datagram with `hdr` bytes of headers (IPv6: the
/// fixed header included) and `end` bytes of payload.
fn length_field(is_v6: bool, hdr: usize, end: usize) -> usize {
    if is_v6 {
        hdr - 40 + end
    } else {
        hdr + end
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, ops)) = data.split_first() else {
        return;
    };
    let is_v6 = mode & 1 != 0;
    let base = if is_v6 { 40 } else { 20 };
    // Extra unfragmentable bytes on fragments at offset 0.
    let extra = match (mode & 2 != 0, is_v6) {
        (false, _) => 0,
        (true, false) => 4 * (1 + usize::from(mode >> 4) % 10),
        (true, true) => 8 * (1 + usize::from(mode >> 4)),
    };
    // Headers of the datagram as built: the first fragment's.
    let hdr = base + extra;
    let limits = Limits {
        max_memory: if mode & 8 != 0 {
            2048 + 4096 * usize::from(mode >> 4)
        } else {
            64 << 20
        },
        max_datagram: if mode & 4 != 0 { 2000 } else { 65535 },
        ..Default::default()
    };
    let limit = limits.max_datagram.min(65535);
    let mut r = Reassembler::new(limits);
    let mut m = Model::default();
    let mut now = 0u64;
    let check = |r: &Reassembler| {
        if let Err(e) = r.check_invariants() {
            panic!("invariant broken: {e}");
        }
        assert!(r.memory() <= limits.max_memory);
    };
    let mut evictions = 0;
    for op in ops.chunks_exact(4) {
        check(&r);
        if r.stats().evictions != evictions {
            // Only an atomic fragment's entry can push the datagram out.
            evictions = r.stats().evictions;
            m = Model::default();
        }
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
        let own_extra = if offset == 0 { extra } else { 0 };
        let pkt = if is_v6 {
            build::ipv6_fragment_with_dst_opts(42, offset, more, own_extra, &payload)
        } else {
            build::ipv4_fragment_with_options(42, offset, more, &[1; 40][..own_extra], &payload)
        };
        let Ok(pkt) = pkt else { continue };
        let end = offset + len;
        match r.push(now, &pkt) {
            Ok(Outcome::Complete(out)) => {
                // The length field says the real length, within the limits.
                let field = if is_v6 {
                    assert_eq!(
                        usize::from(u16::from_be_bytes([out[4], out[5]])),
                        out.len() - 40
                    );
                    out.len() - 40
                } else {
                    assert_eq!(usize::from(u16::from_be_bytes([out[2], out[3]])), out.len());
                    out.len()
                };
                assert!(field <= limit, "datagram over the limit: {field}");
                assert!(out.len() >= hdr);
                let body = &out[hdr..];
                if offset == 0 && !more {
                    assert!(is_v6);
                    // An atomic fragment stands alone.
                    assert_eq!(body, &payload[..]);
                    continue;
                }
                assert!(!m.dead, "output from a discarded datagram");
                assert!(!m.overlaps(offset, end), "output built over an overlap");
                assert!(!m.same_range(offset, end), "output built over a copy");
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
                assert!(!m.same_range(offset, end), "a copy of a fragment held");
                m.frags.push((offset, payload, more));
                assert!(m.assembled().is_none(), "complete datagram was held back");
            }
            Ok(Outcome::NotFragment) => {
                // Offset 0 without MF is a whole IPv4 packet; IPv6 marks
                // even that as a (atomic) fragment.
                assert!(!is_v6 && offset == 0 && !more);
            }
            Err(FragError::Overlap) => {
                // A true overlap, or a copy of a range with other bytes.
                assert!(m.overlaps(offset, end) || m.other_bytes(offset, more, &payload));
                m.dead = true;
            }
            Err(FragError::Duplicate) => {
                assert!(!m.dead);
                assert!(m.duplicate(offset, more, &payload));
            }
            Err(FragError::Discarded) => assert!(m.dead),
            Err(FragError::Inconsistent | FragError::TooManyFragments) => m.dead = true,
            Err(FragError::TooLarge) => {
                if offset == 0 && !more {
                    // An atomic fragment, too large on its own.
                    assert!(length_field(is_v6, hdr, end) > limit);
                    continue;
                }
                // Too far even with the shortest header: dropped alone.
                let alone = length_field(is_v6, base, end) > limit;
                // Too large as built with the first fragment's headers,
                // once those are known: the datagram is discarded.
                let known = m.has_first() || offset == 0;
                let whole = known && length_field(is_v6, hdr, m.top().max(end)) > limit;
                assert!(alone || whole, "TooLarge at {offset}+{len}");
                if !alone {
                    m.dead = true;
                }
            }
            Err(FragError::Empty | FragError::Misaligned) => {
                assert!(len == 0 || (more && len % 8 != 0));
            }
            Err(FragError::NoMemory) => {
                assert!(mode & 8 != 0, "out of memory with room to spare");
                // The datagram went (an atomic fragment evicts it only if
                // it has to: see the eviction count above).
                if !(offset == 0 && !more) {
                    m = Model::default();
                }
            }
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    check(&r);
});
