//! Out-of-order receive data: segments above RCV.NXT held until the gap
//! fills, within a byte limit, and the SACK blocks that describe them.

use super::seq;

/// Out-of-order segments, sorted, non-overlapping, all above `rcv_nxt`.
#[derive(Debug, Clone, Default)]
pub struct Assembler {
    /// (first sequence number, bytes), sorted by sequence number.
    segs: Vec<(u32, Vec<u8>)>,
    bytes: usize,
    limit: usize,
    /// Start of the most recently received segment (reported first).
    last: Option<u32>,
}

/// Most segments the assembler keeps; beyond this a segment is dropped
/// like one over the byte limit.
const MAX_SEGMENTS: usize = 512;

impl Assembler {
    pub fn new(limit: usize) -> Assembler {
        Assembler {
            limit,
            ..Assembler::default()
        }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.segs.is_empty()
    }

    pub fn segments(&self) -> usize {
        self.segs.len()
    }

    /// Stores `data` starting at `start` (above `rcv_nxt`), keeping bytes
    /// already held where they overlap. Returns false when it did not fit
    /// the limit (the segment is dropped whole).
    pub fn insert(&mut self, rcv_nxt: u32, start: u32, data: &[u8]) -> bool {
        if data.is_empty() {
            return true;
        }
        let off = |s: u32| seq::dist(rcv_nxt, s);
        let end = off(start) + data.len();
        // Pieces of [start, end) not yet covered.
        let mut pieces: Vec<(usize, usize)> = Vec::new();
        let mut cur = off(start);
        for (s, d) in &self.segs {
            let (a, b) = (off(*s), off(*s) + d.len());
            if b <= cur {
                continue;
            }
            if a >= end {
                break;
            }
            if a > cur {
                pieces.push((cur, a));
            }
            cur = cur.max(b);
            if cur >= end {
                break;
            }
        }
        if cur < end {
            pieces.push((cur, end));
        }
        let new: usize = pieces.iter().map(|(a, b)| b - a).sum();
        if self.bytes + new > self.limit || self.segs.len() + pieces.len() > MAX_SEGMENTS {
            return false;
        }
        let base = off(start);
        for (a, b) in pieces {
            let s = rcv_nxt.wrapping_add(a as u32);
            let at = self.segs.partition_point(|(x, _)| off(*x) < a);
            self.segs.insert(at, (s, data[a - base..b - base].to_vec()));
        }
        self.bytes += new;
        self.last = Some(start);
        true
    }

    /// The sequence number just past the highest byte held.
    pub fn end(&self) -> Option<u32> {
        self.segs
            .last()
            .map(|(s, d)| s.wrapping_add(d.len() as u32))
    }

    /// Drops what lies at or past `end` (at or above `rcv_nxt`): the
    /// peer's FIN is there, and bytes past it are no part of the stream.
    pub fn truncate(&mut self, rcv_nxt: u32, end: u32) {
        let cut = seq::dist(rcv_nxt, end);
        self.segs.retain_mut(|(s, d)| {
            let at = seq::dist(rcv_nxt, *s);
            d.truncate(cut.saturating_sub(at));
            !d.is_empty()
        });
        self.bytes = self.segs.iter().map(|(_, d)| d.len()).sum();
        if self.last.is_some_and(|l| seq::dist(rcv_nxt, l) >= cut) {
            self.last = None;
        }
    }

    /// Hands contiguous data starting at `rcv_nxt` to `out`; drops what
    /// now lies below `rcv_nxt`. Returns the bytes handed over.
    pub fn pop_ready(&mut self, mut rcv_nxt: u32, out: &mut dyn FnMut(&[u8])) -> usize {
        let mut n = 0;
        while let Some((s, d)) = self.segs.first() {
            let (s, len) = (*s, d.len());
            let end = s.wrapping_add(len as u32);
            if seq::gt(s, rcv_nxt) {
                break;
            }
            let (s, d) = self.segs.remove(0);
            self.bytes -= d.len();
            if seq::gt(end, rcv_nxt) {
                let skip = seq::dist(s, rcv_nxt);
                out(&d[skip..]);
                n += d.len() - skip;
                rcv_nxt = end;
            }
        }
        n
    }

    /// Up to `max` SACK blocks (RFC 2018, 4): the block holding the most
    /// recent segment first, then the others from the highest down.
    pub fn sack_blocks(&self, max: usize) -> Vec<(u32, u32)> {
        let mut ranges: Vec<(u32, u32)> = Vec::new();
        for (s, d) in &self.segs {
            let e = s.wrapping_add(d.len() as u32);
            match ranges.last_mut() {
                Some(last) if last.1 == *s => last.1 = e,
                _ => ranges.push((*s, e)),
            }
        }
        let first = self.last.and_then(|l| {
            ranges
                .iter()
                .position(|&(a, b)| seq::le(a, l) && seq::lt(l, b))
        });
        let mut out = Vec::with_capacity(max);
        if let Some(i) = first {
            out.push(ranges[i]);
        }
        for (i, r) in ranges.iter().enumerate().rev() {
            if Some(i) != first && out.len() < max {
                out.push(*r);
            }
        }
        out.truncate(max);
        out
    }

    pub fn clear(&mut self) {
        self.segs.clear();
        self.bytes = 0;
        self.last = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(a: &mut Assembler, nxt: u32) -> Vec<u8> {
        let mut v = Vec::new();
        a.pop_ready(nxt, &mut |d| v.extend_from_slice(d));
        v
    }

    #[test]
    fn overlaps_keep_first_copy_and_fill_gaps() {
        let mut a = Assembler::new(1000);
        assert!(a.insert(100, 110, &[1; 10]));
        assert!(a.insert(100, 130, &[3; 10]));
        // Overlaps both: only the gap 120..130 is new.
        assert!(a.insert(100, 105, &[9; 40]));
        assert_eq!(a.bytes(), 40);
        assert_eq!(a.sack_blocks(4), vec![(105, 145)]);
        let got = drain(&mut a, 105);
        let mut want = vec![9u8; 5];
        want.extend([1; 10]);
        want.extend([9; 10]);
        want.extend([3; 10]);
        want.extend([9; 5]);
        assert_eq!(got, want);
        assert!(a.is_empty());
    }

    #[test]
    fn limit_drops_whole_segment() {
        let mut a = Assembler::new(20);
        assert!(a.insert(0, 10, &[0; 15]));
        assert!(!a.insert(0, 40, &[0; 10]));
        assert_eq!(a.bytes(), 15);
    }

    #[test]
    fn sack_blocks_most_recent_first() {
        let mut a = Assembler::new(1000);
        a.insert(0, 10, &[0; 5]);
        a.insert(0, 30, &[0; 5]);
        a.insert(0, 50, &[0; 5]);
        a.insert(0, 20, &[0; 5]);
        assert_eq!(a.sack_blocks(3), vec![(20, 25), (50, 55), (30, 35)]);
    }

    #[test]
    fn wraps_around_zero() {
        let mut a = Assembler::new(100);
        let nxt = u32::MAX - 4;
        a.insert(nxt, nxt.wrapping_add(3), &[7; 6]);
        assert_eq!(drain(&mut a, nxt), Vec::<u8>::new());
        assert_eq!(drain(&mut a, nxt.wrapping_add(3)), vec![7; 6]);
    }
}
