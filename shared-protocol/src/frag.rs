//! IPv4 and IPv6 fragment reassembly with hard limits.
//!
//! - Any overlap between fragments discards the whole datagram (RFC 5722;
//!   Linux does the same for IPv4 since the CVE-2018-5391 fixes), and later
//!   fragments of it are dropped until it times out. An exact duplicate is
//!   dropped alone.
//! - A datagram's length field (IPv4 total length, IPv6 payload length) may
//!   not exceed 65535 nor `max_datagram`, counted as the datagram is built:
//!   the first fragment's unfragmentable part (IPv4 header with its
//!   options; IPv6 header and the extension headers before the fragment
//!   header) plus the highest payload end, whatever order the fragments
//!   come in. A datagram found too large is discarded. Nor may it hold
//!   more than `max_fragments` fragments.
//! - All held datagrams together stay within `max_memory` bytes, counting
//!   the buffers actually allocated; the oldest datagram is evicted to make
//!   room. Datagrams older than `timeout_ms` are dropped (no ICMP is sent,
//!   RFC 8200 4.5).
//!
//! The reassembler is sans-IO: callers pass the time in.

use core::net::{Ipv4Addr, Ipv6Addr};

use thiserror::Error;

use crate::wire::{self, ipv4, ipv6};

/// Limits of a [`Reassembler`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest reassembled datagram, as its length field says it: the IPv4
    /// total length or the IPv6 payload length (at most 65535 either way).
    pub max_datagram: usize,
    pub max_fragments: usize,
    /// Bytes of buffers held across all datagrams.
    pub max_memory: usize,
    pub timeout_ms: u64,
    /// Datagrams in progress at once.
    pub max_datagrams: usize,
}

impl Default for Limits {
    /// Linux's defaults: 4 MiB, 30 s; at most 64 fragments a datagram.
    fn default() -> Self {
        Limits {
            max_datagram: 65535,
            max_fragments: 64,
            max_memory: 4 << 20,
            timeout_ms: 30_000,
            max_datagrams: 1024,
        }
    }
}

/// Bytes charged per fragment and per datagram on top of their buffers.
pub const FRAGMENT_OVERHEAD: usize = 64;
pub const DATAGRAM_OVERHEAD: usize = 256;

/// Why a fragment was dropped. Each is counted in [`Stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum FragError {
    #[error("packet does not parse: {0}")]
    Malformed(#[from] wire::Error),
    #[error("fragment with no payload")]
    Empty,
    #[error("non-final fragment length is not a multiple of 8")]
    Misaligned,
    #[error("datagram over the largest length field: fragment dropped, or datagram discarded")]
    TooLarge,
    #[error("fragment overlaps another: datagram discarded")]
    Overlap,
    #[error("exact duplicate fragment")]
    Duplicate,
    #[error("fragments disagree on the datagram length: datagram discarded")]
    Inconsistent,
    #[error("too many fragments: datagram discarded")]
    TooManyFragments,
    #[error("fragment of a discarded datagram")]
    Discarded,
    #[error("no memory for the fragment within the limit")]
    NoMemory,
}

/// What became of a packet.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome<'a> {
    /// Not a fragment: the caller uses the packet as it is.
    NotFragment,
    /// Held until the other fragments arrive.
    Held,
    /// The whole datagram, as an unfragmented IP packet.
    Complete(&'a [u8]),
}

/// Counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    pub fragments: u64,
    pub completed: u64,
    pub malformed: u64,
    pub too_large: u64,
    pub overlaps: u64,
    pub duplicates: u64,
    pub inconsistent: u64,
    pub too_many_fragments: u64,
    pub discarded: u64,
    pub timeouts: u64,
    pub evictions: u64,
    pub no_memory: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    V4 {
        src: Ipv4Addr,
        dst: Ipv4Addr,
        proto: u8,
        id: u16,
    },
    V6 {
        src: Ipv6Addr,
        dst: Ipv6Addr,
        id: u32,
    },
}

#[derive(Debug)]
struct Entry {
    key: Key,
    created_ms: u64,
    /// The unfragmentable part of the first fragment (IPv4 header; IPv6
    /// header and extension headers before the fragment header).
    header: Vec<u8>,
    /// For IPv6: offset in `header` of the next-header byte to rewrite,
    /// and the upper-layer protocol from the first fragment.
    v6_next: Option<(usize, u8)>,
    data: Vec<u8>,
    /// Received fragments' byte ranges, sorted by offset, never
    /// overlapping; one per fragment, so exact duplicates are recognised.
    ranges: Vec<(usize, usize)>,
    /// Bytes received: the sum of the ranges.
    received: usize,
    total: Option<usize>,
    /// Discarded; later fragments are dropped until timeout.
    dead: bool,
    mem: usize,
}

enum Step {
    NotFragment,
    Held,
    Complete(usize),
}

/// A fragment, parsed.
struct Frag<'a> {
    key: Key,
    offset: usize,
    more: bool,
    payload: &'a [u8],
    /// Unfragmentable part, and (IPv6) the next-header field and value.
    header: &'a [u8],
    v6_next: Option<(usize, u8)>,
}

/// Reassembles the fragments of many datagrams.
#[derive(Debug)]
pub struct Reassembler {
    limits: Limits,
    entries: Vec<Entry>,
    free: Vec<Vec<u8>>,
    mem: usize,
    out: Vec<u8>,
    stats: Stats,
}

const FREE_BUFFERS: usize = 16;

impl Default for Reassembler {
    fn default() -> Self {
        Reassembler::new(Limits::default())
    }
}

fn parse(packet: &[u8]) -> Result<Option<Frag<'_>>, FragError> {
    match packet.first().map(|b| b >> 4) {
        Some(4) => {
            let p = ipv4::Packet::new_checked(packet)?;
            if !p.verify_checksum() {
                return Err(wire::Error::Checksum("ipv4 header").into());
            }
            if !p.is_fragment() {
                return Ok(None);
            }
            Ok(Some(Frag {
                key: Key::V4 {
                    src: p.src_addr(),
                    dst: p.dst_addr(),
                    proto: p.protocol(),
                    id: p.ident(),
                },
                offset: p.frag_offset(),
                more: p.more_frags(),
                payload: &packet[p.header_len()..p.total_len()],
                header: &packet[..p.header_len()],
                v6_next: None,
            }))
        }
        Some(6) => {
            let p = ipv6::Packet::new_checked(packet)?;
            let w = ipv6::walk(&p)?;
            let Some(f) = w.fragment else {
                return Ok(None);
            };
            let start = f.header_offset + ipv6::FRAG_HEADER_LEN;
            let end = ipv6::HEADER_LEN + p.payload_len();
            Ok(Some(Frag {
                key: Key::V6 {
                    src: p.src_addr(),
                    dst: p.dst_addr(),
                    id: f.repr.ident,
                },
                offset: f.repr.offset,
                more: f.repr.more,
                payload: packet
                    .get(start..end)
                    .ok_or(wire::Error::Truncated("ipv6 fragment"))?,
                header: &packet[..f.header_offset],
                v6_next: Some((w.next_header_field, f.repr.next_header)),
            }))
        }
        _ => Err(wire::Error::Malformed("ip version").into()),
    }
}

/// The length field of a datagram built with an unfragmentable part of
/// `header_len` bytes and `end` bytes of payload: IPv4 total length, IPv6
/// payload length (the fragment header removed). None if it overflows.
fn length_field(key: &Key, header_len: usize, end: usize) -> Option<usize> {
    match key {
        Key::V4 { .. } => header_len.checked_add(end),
        Key::V6 { .. } => header_len.checked_sub(ipv6::HEADER_LEN)?.checked_add(end),
    }
}

/// The shortest unfragmentable part a datagram of this kind can have.
fn min_header_len(key: &Key) -> usize {
    match key {
        Key::V4 { .. } => ipv4::HEADER_LEN,
        Key::V6 { .. } => ipv6::HEADER_LEN,
    }
}

impl Reassembler {
    pub fn new(limits: Limits) -> Reassembler {
        Reassembler {
            limits,
            entries: Vec::new(),
            free: Vec::new(),
            mem: 0,
            out: Vec::new(),
            stats: Stats::default(),
        }
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }
    /// Bytes currently charged against `max_memory`.
    pub fn memory(&self) -> usize {
        self.mem
    }
    /// Datagrams in progress (discarded ones awaiting timeout included).
    pub fn pending(&self) -> usize {
        self.entries.len()
    }

    /// Drops datagrams older than the timeout.
    pub fn expire(&mut self, now_ms: u64) {
        let timeout = self.limits.timeout_ms;
        let mut i = 0;
        while i < self.entries.len() {
            if now_ms.saturating_sub(self.entries[i].created_ms) >= timeout {
                if !self.entries[i].dead {
                    self.stats.timeouts += 1;
                }
                self.remove(i);
            } else {
                i += 1;
            }
        }
    }

    /// Takes one IP packet (starting at its IPv4 or IPv6 header).
    pub fn push(&mut self, now_ms: u64, packet: &[u8]) -> Result<Outcome<'_>, FragError> {
        self.expire(now_ms);
        let r = self.push_inner(now_ms, packet);
        if let Err(e) = r {
            self.count(e);
        }
        match r? {
            Step::Complete(i) => {
                let built = self.assemble(i);
                self.remove(i);
                if let Err(e) = built {
                    self.count(e);
                    return Err(e);
                }
                self.stats.completed += 1;
                Ok(Outcome::Complete(&self.out))
            }
            Step::NotFragment => Ok(Outcome::NotFragment),
            Step::Held => Ok(Outcome::Held),
        }
    }

    fn count(&mut self, e: FragError) {
        let s = &mut self.stats;
        match e {
            FragError::Malformed(_) | FragError::Empty | FragError::Misaligned => s.malformed += 1,
            FragError::TooLarge => s.too_large += 1,
            FragError::Overlap => s.overlaps += 1,
            FragError::Duplicate => s.duplicates += 1,
            FragError::Inconsistent => s.inconsistent += 1,
            FragError::TooManyFragments => s.too_many_fragments += 1,
            FragError::Discarded => s.discarded += 1,
            FragError::NoMemory => s.no_memory += 1,
        }
    }

    fn push_inner(&mut self, now_ms: u64, packet: &[u8]) -> Result<Step, FragError> {
        let Some(f) = parse(packet)? else {
            return Ok(Step::NotFragment);
        };
        self.stats.fragments += 1;
        let limit = self.limits.max_datagram.min(65535);
        let end = f
            .offset
            .checked_add(f.payload.len())
            .ok_or(FragError::TooLarge)?;
        if f.offset == 0 && !f.more {
            // An atomic fragment (RFC 6946) stands on its own; it shares no
            // state with fragments of the same identification.
            if length_field(&f.key, f.header.len(), end).is_none_or(|n| n > limit) {
                return Err(FragError::TooLarge);
            }
            self.insert(f.key, now_ms);
            let i = self.entries.len() - 1;
            let i = self.store(i, &f)?;
            return Ok(Step::Complete(i));
        }
        if f.payload.is_empty() {
            return Err(FragError::Empty);
        }
        if f.more && f.payload.len() % 8 != 0 {
            return Err(FragError::Misaligned);
        }
        // Even with the shortest header the datagram could have, this
        // fragment reaches too far: it is dropped alone.
        if length_field(&f.key, min_header_len(&f.key), end).is_none_or(|n| n > limit) {
            return Err(FragError::TooLarge);
        }
        let i = match self.entries.iter().position(|e| e.key == f.key) {
            Some(i) => i,
            None => self.insert(f.key, now_ms),
        };
        if self.entries[i].dead {
            return Err(FragError::Discarded);
        }
        let e = &self.entries[i];
        for &(s, en) in &e.ranges {
            if f.offset < en && s < end {
                if s == f.offset && en == end {
                    return Err(FragError::Duplicate);
                }
                self.kill(i);
                return Err(FragError::Overlap);
            }
        }
        let e = &self.entries[i];
        let inconsistent = match (f.more, e.total) {
            (false, Some(t)) => t != end,
            (false, None) => e.ranges.last().is_some_and(|&(_, en)| en > end),
            (true, Some(t)) => end > t,
            (true, None) => false,
        };
        if inconsistent {
            self.kill(i);
            return Err(FragError::Inconsistent);
        }
        // The datagram is built with the first fragment's unfragmentable
        // part, whichever fragment brings the most payload: once that part
        // is known, header and highest payload end must fit the limit.
        let header_len = if f.offset == 0 {
            Some(f.header.len())
        } else {
            (!e.header.is_empty()).then_some(e.header.len())
        };
        if let Some(h) = header_len {
            let top = e.ranges.last().map_or(end, |&(_, en)| en.max(end));
            if length_field(&f.key, h, top).is_none_or(|n| n > limit) {
                self.kill(i);
                return Err(FragError::TooLarge);
            }
        }
        if e.ranges.len() + 1 > self.limits.max_fragments {
            self.kill(i);
            return Err(FragError::TooManyFragments);
        }
        let i = self.store(i, &f)?;
        let e = &mut self.entries[i];
        if !f.more {
            e.total = Some(end);
        }
        // Ranges never overlap and all lie below the total, so they cover
        // it exactly when their lengths add up to it.
        let done = !e.header.is_empty() && e.total == Some(e.received);
        Ok(if done { Step::Complete(i) } else { Step::Held })
    }

    /// Copies a fragment into entry `i`, evicting the oldest other
    /// datagrams while the memory limit would be passed. Returns the
    /// entry's index, which evictions may have moved.
    fn store(&mut self, mut i: usize, f: &Frag<'_>) -> Result<usize, FragError> {
        let end = f.offset + f.payload.len();
        let grow = end.saturating_sub(self.entries[i].data.capacity());
        let hdr = if f.offset == 0 { f.header.len() } else { 0 };
        let cost = grow + hdr + FRAGMENT_OVERHEAD;
        while self.mem + cost > self.limits.max_memory {
            let victim = self
                .entries
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .min_by_key(|(_, e)| e.created_ms)
                .map(|(j, _)| j);
            let Some(j) = victim else {
                self.remove(i);
                return Err(FragError::NoMemory);
            };
            self.remove(j);
            self.stats.evictions += 1;
            // `swap_remove` moved the last entry into slot `j`.
            if i == self.entries.len() {
                i = j;
            }
        }
        let e = &mut self.entries[i];
        let before = e.data.capacity() + e.header.capacity();
        if e.data.len() < end {
            e.data.resize(end, 0);
        }
        e.data[f.offset..end].copy_from_slice(f.payload);
        if f.offset == 0 {
            e.header.clear();
            e.header.extend_from_slice(f.header);
            e.v6_next = f.v6_next;
        }
        let after = e.data.capacity() + e.header.capacity();
        let charge = after.saturating_sub(before) + FRAGMENT_OVERHEAD;
        e.mem += charge;
        self.mem += charge;
        e.received += f.payload.len();
        let pos = e.ranges.partition_point(|&(s, _)| s < f.offset);
        e.ranges.insert(pos, (f.offset, end));
        Ok(i)
    }

    /// Adds an entry at the end of the list and returns its index.
    fn insert(&mut self, key: Key, now_ms: u64) -> usize {
        if self.entries.len() >= self.limits.max_datagrams {
            if let Some(j) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.created_ms)
                .map(|(j, _)| j)
            {
                self.remove(j);
                self.stats.evictions += 1;
            }
        }
        let data = self.free.pop().unwrap_or_default();
        let mem = DATAGRAM_OVERHEAD + data.capacity();
        self.mem += mem;
        self.entries.push(Entry {
            key,
            created_ms: now_ms,
            header: Vec::new(),
            v6_next: None,
            data,
            ranges: Vec::new(),
            received: 0,
            total: None,
            dead: false,
            mem,
        });
        self.entries.len() - 1
    }

    /// Frees a datagram's buffers but keeps it, dead, until it times out.
    fn kill(&mut self, i: usize) {
        let e = &mut self.entries[i];
        e.dead = true;
        let data = core::mem::take(&mut e.data);
        e.header = Vec::new();
        e.ranges = Vec::new();
        self.mem -= e.mem - DATAGRAM_OVERHEAD;
        e.mem = DATAGRAM_OVERHEAD;
        self.recycle(data);
    }

    fn remove(&mut self, i: usize) {
        let e = self.entries.swap_remove(i);
        self.mem -= e.mem;
        self.recycle(e.data);
    }

    fn recycle(&mut self, mut data: Vec<u8>) {
        if self.free.len() < FREE_BUFFERS && data.capacity() > 0 {
            data.clear();
            self.free.push(data);
        }
    }

    /// Builds entry `i`'s datagram in `out`. The limits were checked as
    /// its fragments arrived; a length field that still does not fit is
    /// refused rather than cut.
    fn assemble(&mut self, i: usize) -> Result<(), FragError> {
        let e = &self.entries[i];
        let total = e.total.unwrap_or(e.data.len());
        let payload = e.data.get(..total).ok_or(FragError::Inconsistent)?;
        let field = length_field(&e.key, e.header.len(), total)
            .filter(|&n| n <= self.limits.max_datagram)
            .and_then(|n| u16::try_from(n).ok())
            .ok_or(FragError::TooLarge)?;
        self.out.clear();
        self.out.extend_from_slice(&e.header);
        self.out.extend_from_slice(payload);
        match e.v6_next {
            None => {
                let mut p = ipv4::Packet::new_unchecked(&mut self.out[..]);
                let df = p.dont_frag();
                p.set_total_len(field);
                p.set_frag(df, false, 0);
                p.fill_checksum();
            }
            Some((at, next)) => {
                if let Some(b) = self.out.get_mut(at) {
                    *b = next;
                }
                let mut p = ipv6::Packet::new_unchecked(&mut self.out[..]);
                p.set_payload_len(field);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{build, ip_proto};

    fn v4_frag(id: u16, offset: usize, more: bool, payload: &[u8]) -> Vec<u8> {
        build::ipv4_fragment(id, offset, more, payload).unwrap()
    }

    fn v6_frag(id: u32, offset: usize, more: bool, payload: &[u8]) -> Vec<u8> {
        build::ipv6_fragment(id, offset, more, payload).unwrap()
    }

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 + 7) as u8).collect()
    }

    #[test]
    fn v4_out_of_order_reassembly() {
        let d = data(3000);
        let mut r = Reassembler::default();
        assert_eq!(
            r.push(0, &v4_frag(9, 2000, false, &d[2000..])),
            Ok(Outcome::Held)
        );
        assert_eq!(
            r.push(1, &v4_frag(9, 0, true, &d[..1000])),
            Ok(Outcome::Held)
        );
        let out = match r.push(2, &v4_frag(9, 1000, true, &d[1000..2000])).unwrap() {
            Outcome::Complete(p) => p.to_vec(),
            o => panic!("{o:?}"),
        };
        let p = ipv4::Packet::new_checked(&out[..]).unwrap();
        assert!(p.verify_checksum());
        assert!(!p.is_fragment());
        assert_eq!(p.total_len(), 3020);
        assert_eq!(p.payload(), &d[..]);
        assert_eq!(r.pending(), 0);
        assert_eq!(r.memory(), 0);
        assert_eq!(r.stats().completed, 1);
    }

    #[test]
    fn v6_reassembly_removes_fragment_header() {
        let d = data(2500);
        let mut r = Reassembler::default();
        assert_eq!(
            r.push(0, &v6_frag(5, 1232, false, &d[1232..])),
            Ok(Outcome::Held)
        );
        let out = match r.push(0, &v6_frag(5, 0, true, &d[..1232])).unwrap() {
            Outcome::Complete(p) => p.to_vec(),
            o => panic!("{o:?}"),
        };
        let p = ipv6::Packet::new_checked(&out[..]).unwrap();
        assert_eq!(p.next_header(), ip_proto::UDP);
        assert_eq!(p.payload(), &d[..]);
    }

    #[test]
    fn not_a_fragment() {
        let mut r = Reassembler::default();
        let mut whole = v4_frag(1, 0, false, &data(100));
        assert_eq!(r.push(0, &whole), Ok(Outcome::NotFragment));
        whole[8] = 0; // breaks the header checksum
        assert!(matches!(r.push(0, &whole), Err(FragError::Malformed(_))));
    }

    #[test]
    fn teardrop_discards_the_datagram() {
        // CVE-1999-0015: the second fragment lies inside the first.
        let d = data(64);
        let mut r = Reassembler::default();
        assert_eq!(r.push(0, &v4_frag(7, 0, true, &d[..48])), Ok(Outcome::Held));
        assert_eq!(
            r.push(0, &v4_frag(7, 8, false, &d[8..20])),
            Err(FragError::Overlap)
        );
        // Filling the rest never completes it.
        assert_eq!(
            r.push(0, &v4_frag(7, 48, false, &d[48..])),
            Err(FragError::Discarded)
        );
        assert_eq!(r.stats().overlaps, 1);
        assert_eq!(r.stats().completed, 0);
        r.expire(30_000);
        assert_eq!(r.pending(), 0);
        assert_eq!(r.memory(), 0);
    }

    #[test]
    fn duplicates_and_inconsistent_lengths() {
        let d = data(48);
        let mut r = Reassembler::default();
        r.push(0, &v4_frag(1, 0, true, &d[..16])).unwrap();
        assert_eq!(
            r.push(0, &v4_frag(1, 0, true, &d[..16])),
            Err(FragError::Duplicate)
        );
        assert_eq!(
            r.push(0, &v4_frag(1, 32, false, &d[32..])),
            Ok(Outcome::Held)
        );
        assert_eq!(
            r.push(0, &v4_frag(1, 16, false, &d[16..32])),
            Err(FragError::Inconsistent)
        );
        // Misaligned, empty and oversized fragments.
        assert_eq!(
            r.push(0, &v4_frag(2, 0, true, &d[..15])),
            Err(FragError::Misaligned)
        );
        assert_eq!(r.push(0, &v4_frag(2, 8, true, &[])), Err(FragError::Empty));
        // Ping of death: offset 65528 + 16 bytes.
        assert_eq!(
            r.push(0, &v4_frag(3, 65528, false, &d[..16])),
            Err(FragError::TooLarge)
        );
    }

    #[test]
    fn resent_fragment_is_a_duplicate_and_the_datagram_still_completes() {
        let d = data(40);
        let mut r = Reassembler::default();
        r.push(0, &v4_frag(4, 0, true, &d[..16])).unwrap();
        r.push(0, &v4_frag(4, 16, true, &d[16..32])).unwrap();
        assert_eq!(
            r.push(0, &v4_frag(4, 0, true, &d[..16])),
            Err(FragError::Duplicate)
        );
        match r.push(0, &v4_frag(4, 32, false, &d[32..])).unwrap() {
            Outcome::Complete(p) => assert_eq!(&p[20..], &d[..]),
            o => panic!("{o:?}"),
        }
        assert_eq!(r.stats().duplicates, 1);
    }

    #[test]
    fn timeout() {
        let d = data(32);
        let mut r = Reassembler::default();
        r.push(0, &v4_frag(1, 0, true, &d[..16])).unwrap();
        r.push(29_999, &v4_frag(2, 0, true, &d[..16])).unwrap();
        assert_eq!(r.pending(), 2);
        // At 30 s the first times out; its last fragment starts anew.
        assert_eq!(
            r.push(30_000, &v4_frag(1, 16, false, &d[16..])),
            Ok(Outcome::Held)
        );
        assert_eq!(r.stats().timeouts, 1);
    }

    #[test]
    fn tiny_fragment_flood_stays_within_memory() {
        let limits = Limits {
            max_memory: 256 * 1024,
            ..Default::default()
        };
        let mut r = Reassembler::new(limits);
        let mut peak = 0;
        // 20000 datagrams of 8-byte first fragments, and far fragments that
        // force 64 KiB buffers.
        for i in 0..20_000u32 {
            let id = (i % 65536) as u16;
            let _ = r.push(u64::from(i), &v4_frag(id, 0, true, &[1; 8]));
            let _ = r.push(u64::from(i), &v4_frag(id, 65000, true, &[2; 8]));
            peak = peak.max(r.memory());
            assert!(r.memory() <= limits.max_memory, "at {i}: {}", r.memory());
        }
        assert!(peak > limits.max_memory / 2);
        assert!(r.stats().evictions > 0);
        // Memory accounting returns to zero once everything times out.
        r.expire(1_000_000);
        assert_eq!(r.memory(), 0);
    }

    /// 40 bytes of IPv4 options: the longest header, 60 bytes.
    const OPTIONS: [u8; 40] = [ipv4::option::NOP; 40];

    fn v4_first(id: u16, more: bool, payload: &[u8]) -> Vec<u8> {
        build::ipv4_fragment_with_options(id, 0, more, &OPTIONS, payload).unwrap()
    }

    fn complete(r: Result<Outcome<'_>, FragError>) -> Vec<u8> {
        match r {
            Ok(Outcome::Complete(p)) => p.to_vec(),
            o => panic!("{:?}", got(o)),
        }
    }

    /// An outcome, a completed datagram reduced to its length.
    #[derive(Debug, PartialEq, Eq)]
    enum Got {
        NotFragment,
        Held,
        Complete(usize),
    }

    fn got(r: Result<Outcome<'_>, FragError>) -> Result<Got, FragError> {
        r.map(|o| match o {
            Outcome::NotFragment => Got::NotFragment,
            Outcome::Held => Got::Held,
            Outcome::Complete(p) => Got::Complete(p.len()),
        })
    }

    /// The first fragment's options make the datagram longer than the
    /// other fragments' headers say: 60 + 65515 > 65535 in either order.
    #[test]
    fn v4_options_of_the_first_fragment_count_toward_65535() {
        let d = data(65515);
        let mut r = Reassembler::default();
        assert_eq!(
            got(r.push(0, &v4_first(1, true, &d[..32000]))),
            Ok(Got::Held)
        );
        assert_eq!(
            got(r.push(0, &v4_frag(1, 32000, false, &d[32000..]))),
            Err(FragError::TooLarge)
        );
        // The first fragment arrives last.
        assert_eq!(
            got(r.push(0, &v4_frag(2, 32000, false, &d[32000..]))),
            Ok(Got::Held)
        );
        assert_eq!(
            got(r.push(0, &v4_first(2, true, &d[..32000]))),
            Err(FragError::TooLarge)
        );
        assert_eq!(r.stats().too_large, 2);
        assert_eq!(r.stats().completed, 0);
        // The datagrams stay discarded.
        assert_eq!(
            got(r.push(0, &v4_frag(1, 32000, false, &d[32000..]))),
            Err(FragError::Discarded)
        );

        // 60 + 65475 = 65535 exactly fits, in either order.
        let d = data(65475);
        for (id, first_last) in [(3, false), (4, true)] {
            let first = v4_first(id, true, &d[..32000]);
            let last = v4_frag(id, 32000, false, &d[32000..]);
            let (a, b) = if first_last {
                (last, first)
            } else {
                (first, last)
            };
            assert_eq!(got(r.push(0, &a)), Ok(Got::Held));
            let out = complete(r.push(0, &b));
            let p = ipv4::Packet::new_checked(&out[..]).unwrap();
            assert_eq!(out.len(), 65535);
            assert_eq!(p.total_len(), out.len());
            assert_eq!(p.header_len(), 60);
            assert_eq!(p.options(), &OPTIONS[..]);
            assert!(p.verify_checksum());
            assert!(!p.is_fragment());
            assert_eq!(p.payload(), &d[..]);
        }
        assert_eq!(r.stats().completed, 2);
    }

    #[test]
    fn v4_options_of_the_first_fragment_count_toward_max_datagram() {
        let mut r = Reassembler::new(Limits {
            max_datagram: 1500,
            ..Default::default()
        });
        // 20 + 1480 passes on the last fragment's header; 60 + 1480 does
        // not.
        let d = data(1480);
        assert_eq!(
            got(r.push(0, &v4_first(1, true, &d[..1440]))),
            Ok(Got::Held)
        );
        assert_eq!(
            got(r.push(0, &v4_frag(1, 1440, false, &d[1440..]))),
            Err(FragError::TooLarge)
        );
        assert_eq!(
            got(r.push(0, &v4_frag(2, 1440, false, &d[1440..]))),
            Ok(Got::Held)
        );
        assert_eq!(
            got(r.push(0, &v4_first(2, true, &d[..1440]))),
            Err(FragError::TooLarge)
        );
        assert_eq!(r.stats().too_large, 2);
        // 60 + 1440 = 1500.
        let d = data(1440);
        assert_eq!(
            got(r.push(0, &v4_frag(3, 1432, false, &d[1432..]))),
            Ok(Got::Held)
        );
        let out = complete(r.push(0, &v4_first(3, true, &d[..1432])));
        let p = ipv4::Packet::new_checked(&out[..]).unwrap();
        assert_eq!(out.len(), 1500);
        assert_eq!(p.total_len(), 1500);
        assert_eq!(p.payload(), &d[..]);
    }

    /// A 1024-byte destination-options header before the fragment header
    /// of the first fragment only.
    #[test]
    fn v6_extension_headers_of_the_first_fragment_count_toward_65535() {
        let first = |id: u32, d: &[u8]| {
            build::ipv6_fragment_with_dst_opts(id, 0, true, 1024, &d[..32000]).unwrap()
        };
        let d = data(65535);
        let mut r = Reassembler::default();
        assert_eq!(got(r.push(0, &first(1, &d))), Ok(Got::Held));
        assert_eq!(
            got(r.push(0, &v6_frag(1, 32000, false, &d[32000..]))),
            Err(FragError::TooLarge)
        );
        assert_eq!(
            got(r.push(0, &v6_frag(2, 32000, false, &d[32000..]))),
            Ok(Got::Held)
        );
        assert_eq!(got(r.push(0, &first(2, &d))), Err(FragError::TooLarge));
        assert_eq!(r.stats().too_large, 2);
        assert_eq!(r.stats().completed, 0);

        // 1024 + 64511 = 65535 of payload length fits, in either order.
        let d = data(65535 - 1024);
        for (id, first_last) in [(3, false), (4, true)] {
            let a = first(id, &d);
            let b = v6_frag(id, 32000, false, &d[32000..]);
            let (a, b) = if first_last { (b, a) } else { (a, b) };
            assert_eq!(got(r.push(0, &a)), Ok(Got::Held));
            let out = complete(r.push(0, &b));
            let p = ipv6::Packet::new_checked(&out[..]).unwrap();
            assert_eq!(out.len(), 40 + 65535);
            assert_eq!(p.payload_len(), out.len() - 40);
            assert_eq!(p.next_header(), ip_proto::DST_OPTS);
            // The destination options now name UDP, and the payload follows.
            assert_eq!(out[40], ip_proto::UDP);
            assert_eq!(&out[40 + 1024..], &d[..]);
            let w = ipv6::walk(&p).unwrap();
            assert_eq!(w.fragment, None);
            assert_eq!(w.upper_proto, ip_proto::UDP);
            assert_eq!(w.upper_offset, 40 + 1024);
        }
    }

    #[test]
    fn too_many_fragments() {
        let mut r = Reassembler::new(Limits {
            max_fragments: 4,
            ..Default::default()
        });
        for k in 0..4 {
            r.push(0, &v4_frag(1, k * 8, true, &[0; 8])).unwrap();
        }
        assert_eq!(
            r.push(0, &v4_frag(1, 32, true, &[0; 8])),
            Err(FragError::TooManyFragments)
        );
    }
}
