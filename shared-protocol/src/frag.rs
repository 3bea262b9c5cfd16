//! IPv4 and IPv6 fragment reassembly with hard limits.
//!
//! - Any overlap between fragments discards the whole datagram (RFC 5722;
//!   Linux does the same for IPv4 since the CVE-2018-5391 fixes), and later
//!   fragments of it are dropped until it times out. An exact duplicate
//!   (same range, same more-fragments flag, same bytes) is dropped alone;
//!   a copy of a held fragment's range with the other flag discards the
//!   datagram as inconsistent, one with other bytes as an overlap.
//! - A datagram's length field (IPv4 total length, IPv6 payload length) may
//!   not exceed 65535 nor `max_datagram`, counted as the datagram is built:
//!   the first fragment's unfragmentable part (IPv4 header with its
//!   options; IPv6 header and the extension headers before the fragment
//!   header) plus the highest payload end, whatever order the fragments
//!   come in. A datagram found too large is discarded. Nor may it hold
//!   more than `max_fragments` fragments.
//! - Everything the reassembler holds stays within `max_memory` bytes:
//!   every datagram's buffers by capacity and its bookkeeping, the buffers
//!   kept for reuse and the output buffer. Buffers grow by exactly what is
//!   needed; to make room, buffers kept for reuse go first, then the output
//!   buffer, then the oldest datagrams.
//! - Datagrams older than `timeout_ms` are dropped (no ICMP is sent, RFC
//!   8200 4.5).
//!
//! The reassembler is sans-IO: callers pass the time in. [`fragment`] is
//! the other direction: it cuts a packet to fit an MTU.

use core::net::{Ipv4Addr, Ipv6Addr};

use thiserror::Error;

use crate::wire::{self, ipv4, ipv6};

mod split;
pub use split::{fragment, SplitError};

/// Limits of a [`Reassembler`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest reassembled datagram, as its length field says it: the IPv4
    /// total length or the IPv6 payload length (at most 65535 either way).
    pub max_datagram: usize,
    pub max_fragments: usize,
    /// Bytes held at most: see [`Reassembler::memory`].
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

/// Bytes charged per slot of a datagram's fragment list and per datagram
/// on top of their buffers.
pub const FRAGMENT_OVERHEAD: usize = 64;
pub const DATAGRAM_OVERHEAD: usize = 256;

// The overheads cover the bookkeeping they stand for.
const _: () = assert!(core::mem::size_of::<Piece>() <= FRAGMENT_OVERHEAD);
const _: () = assert!(core::mem::size_of::<Entry>() <= DATAGRAM_OVERHEAD);

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

impl core::ops::AddAssign for Stats {
    fn add_assign(&mut self, o: Stats) {
        self.fragments += o.fragments;
        self.completed += o.completed;
        self.malformed += o.malformed;
        self.too_large += o.too_large;
        self.overlaps += o.overlaps;
        self.duplicates += o.duplicates;
        self.inconsistent += o.inconsistent;
        self.too_many_fragments += o.too_many_fragments;
        self.discarded += o.discarded;
        self.timeouts += o.timeouts;
        self.evictions += o.evictions;
        self.no_memory += o.no_memory;
    }
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
    /// Grown one slot at a time.
    ranges: Vec<Piece>,
    /// Bytes received: the sum of the ranges.
    received: usize,
    total: Option<usize>,
    /// Discarded; later fragments are dropped until timeout.
    dead: bool,
}

/// The byte range one fragment brought, and its more-fragments flag.
#[derive(Debug, Clone, Copy)]
struct Piece {
    start: usize,
    end: usize,
    more: bool,
}

impl Entry {
    /// Bytes charged for the datagram: its buffers by capacity and its
    /// bookkeeping.
    fn cost(&self) -> usize {
        DATAGRAM_OVERHEAD
            .saturating_add(self.data.capacity())
            .saturating_add(self.header.capacity())
            .saturating_add(self.ranges.capacity().saturating_mul(FRAGMENT_OVERHEAD))
    }
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
    /// Data buffers kept for reuse.
    free: Vec<Vec<u8>>,
    /// Bytes charged: the entries' costs, `free` and `out` by capacity.
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
    /// Bytes currently charged against `max_memory`: for each datagram in
    /// progress [`DATAGRAM_OVERHEAD`], the capacity of its data and header
    /// buffers and [`FRAGMENT_OVERHEAD`] per slot of its fragment list; the
    /// capacity of the buffers kept for reuse and of the output buffer.
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
                self.remove(i, true);
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
                if let Err(e) = self.finish(i) {
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
            let i = self.insert(f.key, now_ms)?;
            let i = self.store(i, &f, end)?;
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
            None => self.insert(f.key, now_ms)?,
        };
        if self.entries[i].dead {
            return Err(FragError::Discarded);
        }
        let e = &self.entries[i];
        for p in &e.ranges {
            if f.offset < p.end && p.start < end {
                if p.start == f.offset && p.end == end {
                    // The same range: a duplicate only if it says the
                    // same. A copy that disagrees on where the datagram
                    // ends, or on its bytes, discards it (as Linux does).
                    if p.more != f.more {
                        self.kill(i);
                        return Err(FragError::Inconsistent);
                    }
                    if e.data.get(p.start..p.end) != Some(f.payload) {
                        self.kill(i);
                        return Err(FragError::Overlap);
                    }
                    return Err(FragError::Duplicate);
                }
                self.kill(i);
                return Err(FragError::Overlap);
            }
        }
        let e = &self.entries[i];
        let inconsistent = match (f.more, e.total) {
            (false, Some(t)) => t != end,
            (false, None) => e.ranges.last().is_some_and(|p| p.end > end),
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
            let top = e.ranges.last().map_or(end, |p| p.end.max(end));
            if length_field(&f.key, h, top).is_none_or(|n| n > limit) {
                self.kill(i);
                return Err(FragError::TooLarge);
            }
        }
        if e.ranges.len() + 1 > self.limits.max_fragments {
            self.kill(i);
            return Err(FragError::TooManyFragments);
        }
        let i = self.store(i, &f, end)?;
        let e = &mut self.entries[i];
        if !f.more {
            e.total = Some(end);
        }
        // Ranges never overlap and all lie below the total, so they cover
        // it exactly when their lengths add up to it.
        let done = !e.header.is_empty() && e.total == Some(e.received);
        Ok(if done { Step::Complete(i) } else { Step::Held })
    }

    /// Copies a fragment ending at `end` into entry `i`, making room for
    /// what its buffers grow by. Returns the entry's index, which
    /// evictions may have moved.
    fn store(&mut self, i: usize, f: &Frag<'_>, end: usize) -> Result<usize, FragError> {
        let e = &self.entries[i];
        // Buffers grow by exactly this (see the `reserve_exact` below).
        let data_grow = end.saturating_sub(e.data.capacity());
        let header_grow = if f.offset == 0 {
            f.header.len().saturating_sub(e.header.capacity())
        } else {
            0
        };
        let list_grow = if e.ranges.len() == e.ranges.capacity() {
            FRAGMENT_OVERHEAD
        } else {
            0
        };
        let grow = data_grow
            .saturating_add(header_grow)
            .saturating_add(list_grow);
        let i = self.make_room(grow, Some(i))?.unwrap_or(i);
        let e = &mut self.entries[i];
        let before = e.cost();
        if e.data.len() < end {
            e.data.reserve_exact(end - e.data.len());
            e.data.resize(end, 0);
        }
        if let Some(d) = e.data.get_mut(f.offset..end) {
            d.copy_from_slice(f.payload);
        }
        if f.offset == 0 {
            e.header.clear();
            e.header.reserve_exact(f.header.len());
            e.header.extend_from_slice(f.header);
            e.v6_next = f.v6_next;
        }
        if e.ranges.len() == e.ranges.capacity() {
            e.ranges.reserve_exact(1);
        }
        e.received += f.payload.len();
        let pos = e.ranges.partition_point(|p| p.start < f.offset);
        e.ranges.insert(
            pos,
            Piece {
                start: f.offset,
                end,
                more: f.more,
            },
        );
        let after = e.cost();
        self.mem = self.mem.saturating_sub(before).saturating_add(after);
        // Had an allocation come out larger than asked, the capacities
        // charged would say so: make room for it too.
        Ok(self.make_room(0, Some(i))?.unwrap_or(i))
    }

    /// Frees memory until `need` more bytes fit the limit: buffers kept for
    /// reuse first, then the output buffer, then the oldest datagrams
    /// other than `keep`. Returns `keep`'s index, which evictions may move;
    /// when even that is not enough, `keep` goes too and the answer is
    /// `NoMemory`.
    fn make_room(
        &mut self,
        need: usize,
        mut keep: Option<usize>,
    ) -> Result<Option<usize>, FragError> {
        while self.mem.saturating_add(need) > self.limits.max_memory {
            if let Some(b) = self.free.pop() {
                self.mem = self.mem.saturating_sub(b.capacity());
            } else if self.out.capacity() > 0 {
                self.mem = self.mem.saturating_sub(self.out.capacity());
                self.out = Vec::new();
            } else if let Some(j) = self.oldest(keep) {
                self.remove(j, false);
                self.stats.evictions += 1;
                // `swap_remove` moved the last entry into slot `j`.
                if keep == Some(self.entries.len()) {
                    keep = Some(j);
                }
            } else {
                if let Some(i) = keep {
                    self.remove(i, false);
                }
                return Err(FragError::NoMemory);
            }
        }
        Ok(keep)
    }

    /// The oldest entry other than `skip`.
    fn oldest(&self, skip: Option<usize>) -> Option<usize> {
        self.entries
            .iter()
            .enumerate()
            .filter(|&(j, _)| Some(j) != skip)
            .min_by_key(|(_, e)| e.created_ms)
            .map(|(j, _)| j)
    }

    /// Adds an entry at the end of the list and returns its index.
    fn insert(&mut self, key: Key, now_ms: u64) -> Result<usize, FragError> {
        if self.entries.len() >= self.limits.max_datagrams {
            if let Some(j) = self.oldest(None) {
                self.remove(j, true);
                self.stats.evictions += 1;
            }
        }
        self.make_room(DATAGRAM_OVERHEAD, None)?;
        // A buffer kept for reuse is charged already.
        let data = self.free.pop().unwrap_or_default();
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
        });
        self.mem = self.mem.saturating_add(DATAGRAM_OVERHEAD);
        Ok(self.entries.len() - 1)
    }

    /// Frees a datagram's buffers but keeps it, dead, until it times out.
    fn kill(&mut self, i: usize) {
        let e = &mut self.entries[i];
        let before = e.cost();
        e.dead = true;
        let data = core::mem::take(&mut e.data);
        e.header = Vec::new();
        e.ranges = Vec::new();
        e.received = 0;
        e.total = None;
        let after = e.cost();
        self.mem = self.mem.saturating_sub(before).saturating_add(after);
        self.recycle(data);
    }

    /// Drops entry `i`; its data buffer is kept for reuse if `recycle` and
    /// it fits the limit.
    fn remove(&mut self, i: usize, recycle: bool) {
        let e = self.entries.swap_remove(i);
        self.mem = self.mem.saturating_sub(e.cost());
        if recycle {
            self.recycle(e.data);
        }
    }

    fn recycle(&mut self, mut data: Vec<u8>) {
        let cap = data.capacity();
        if self.free.len() < FREE_BUFFERS
            && cap > 0
            && self.mem.saturating_add(cap) <= self.limits.max_memory
        {
            data.clear();
            self.mem += cap;
            self.free.push(data);
        }
    }

    /// Takes entry `i` out and builds its datagram in `out`.
    fn finish(&mut self, i: usize) -> Result<(), FragError> {
        let e = self.entries.swap_remove(i);
        self.mem = self.mem.saturating_sub(e.cost());
        let built = self.assemble(&e);
        self.recycle(e.data);
        built
    }

    /// Builds the datagram of `e`, taken out of the list, in `out`. The
    /// limits were checked as its fragments arrived; a length field that
    /// still does not fit is refused rather than cut.
    ///
    /// `out` grows to exactly the datagram's length, which is less than
    /// what `e` was charged: the memory limit holds.
    fn assemble(&mut self, e: &Entry) -> Result<(), FragError> {
        let total = e.total.unwrap_or(e.data.len());
        let payload = e.data.get(..total).ok_or(FragError::Inconsistent)?;
        let field = length_field(&e.key, e.header.len(), total)
            .filter(|&n| n <= self.limits.max_datagram)
            .and_then(|n| u16::try_from(n).ok())
            .ok_or(FragError::TooLarge)?;
        let old = self.out.capacity();
        self.out.clear();
        self.out.reserve_exact(e.header.len() + payload.len());
        self.mem = self
            .mem
            .saturating_sub(old)
            .saturating_add(self.out.capacity());
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

    /// What [`Reassembler::memory`] should say, from the capacities.
    fn held(&self) -> usize {
        let entries = self
            .entries
            .iter()
            .fold(0usize, |n, e| n.saturating_add(e.cost()));
        self.free
            .iter()
            .fold(entries, |n, b| n.saturating_add(b.capacity()))
            .saturating_add(self.out.capacity())
    }

    /// Checks the reassembler's own bookkeeping; used by tests and the
    /// fuzzer.
    pub fn check_invariants(&self) -> Result<(), &'static str> {
        if self.mem != self.held() {
            return Err("memory count differs from the buffers held");
        }
        if self.mem > self.limits.max_memory {
            return Err("memory over its limit");
        }
        if self.free.len() > FREE_BUFFERS {
            return Err("too many buffers kept for reuse");
        }
        let limit = self.limits.max_datagram.min(65535);
        for e in &self.entries {
            let mut at = 0;
            let mut sum = 0usize;
            for p in &e.ranges {
                if p.start < at || p.end <= p.start {
                    return Err("fragment ranges overlap or are out of order");
                }
                at = p.end;
                sum += p.end - p.start;
            }
            if sum != e.received {
                return Err("received bytes differ from the ranges");
            }
            if e.total.is_some_and(|t| at > t) || e.data.len() < at {
                return Err("fragment past the datagram's end");
            }
            if e.dead && (e.data.capacity() > 0 || !e.ranges.is_empty()) {
                return Err("discarded datagram holds buffers");
            }
            if !e.header.is_empty()
                && length_field(&e.key, e.header.len(), at).is_none_or(|n| n > limit)
            {
                return Err("datagram over the largest length field");
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
        // Held now: the output buffer (3020) and the data buffer kept for
        // reuse (3000).
        assert_eq!(r.memory(), 6020);
        assert_eq!(r.memory(), held(&r));
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
        // Only the discarded datagram's buffer, kept for reuse, remains.
        assert_eq!(r.memory(), 48);
        assert_eq!(r.memory(), held(&r));
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

    /// A copy of a held fragment that says otherwise about the end of the
    /// datagram, or carries other bytes, is no duplicate: the datagram is
    /// discarded, as Linux does.
    #[test]
    fn same_range_with_other_flag_or_bytes_discards_the_datagram() {
        let d = data(40);
        let mut r = Reassembler::default();
        // More-fragments cleared on a copy of a middle fragment.
        r.push(0, &v4_frag(1, 0, true, &d[..16])).unwrap();
        r.push(0, &v4_frag(1, 16, true, &d[16..32])).unwrap();
        assert_eq!(
            got(r.push(0, &v4_frag(1, 16, false, &d[16..32]))),
            Err(FragError::Inconsistent)
        );
        assert_eq!(
            got(r.push(0, &v4_frag(1, 32, false, &d[32..]))),
            Err(FragError::Discarded)
        );
        // More-fragments set on a copy of the last fragment (IPv6).
        r.push(0, &v6_frag(2, 32, false, &d[32..])).unwrap();
        r.push(0, &v6_frag(2, 0, true, &d[..16])).unwrap();
        assert_eq!(
            got(r.push(0, &v6_frag(2, 32, true, &d[32..]))),
            Err(FragError::Inconsistent)
        );
        assert_eq!(
            got(r.push(0, &v6_frag(2, 16, true, &d[16..32]))),
            Err(FragError::Discarded)
        );
        // Same range and flag, other bytes.
        let mut other = d[16..32].to_vec();
        other[3] ^= 0xff;
        r.push(0, &v4_frag(3, 0, true, &d[..16])).unwrap();
        r.push(0, &v4_frag(3, 16, true, &d[16..32])).unwrap();
        assert_eq!(
            got(r.push(0, &v4_frag(3, 16, true, &other))),
            Err(FragError::Overlap)
        );
        assert_eq!(
            got(r.push(0, &v4_frag(3, 32, false, &d[32..]))),
            Err(FragError::Discarded)
        );
        let s = r.stats();
        assert_eq!((s.inconsistent, s.overlaps, s.discarded), (2, 1, 3));
        assert_eq!((s.duplicates, s.completed), (0, 0));
        // Same range, flag and bytes: a duplicate, and the datagram
        // completes with the bytes sent.
        r.push(0, &v4_frag(4, 16, true, &d[16..32])).unwrap();
        assert_eq!(
            got(r.push(0, &v4_frag(4, 16, true, &d[16..32]))),
            Err(FragError::Duplicate)
        );
        r.push(0, &v4_frag(4, 32, false, &d[32..])).unwrap();
        let out = complete(r.push(0, &v4_frag(4, 0, true, &d[..16])));
        assert_eq!(&out[20..], &d[..]);
        assert_eq!(r.stats().duplicates, 1);
        r.check_invariants().unwrap();
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
        // Once everything times out, only buffers kept for reuse remain.
        r.expire(1_000_000);
        assert_eq!(r.pending(), 0);
        assert_eq!(r.memory(), r.free.iter().map(Vec::capacity).sum::<usize>());
        assert_eq!(r.memory(), held(&r));
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

    /// What the reassembler holds, from the capacities of its buffers:
    /// each datagram's overhead, data, header and fragment list, the
    /// recycled buffers and the output buffer.
    fn held(r: &Reassembler) -> usize {
        let entries: usize = r
            .entries
            .iter()
            .map(|e| {
                DATAGRAM_OVERHEAD
                    + e.data.capacity()
                    + e.header.capacity()
                    + e.ranges.capacity() * FRAGMENT_OVERHEAD
            })
            .sum();
        let free: usize = r.free.iter().map(Vec::capacity).sum();
        entries + free + r.out.capacity()
    }

    /// Many datagrams of varied sizes, cut into fragments of varied sizes
    /// sent in shuffled order and interleaved; some never complete, some
    /// time out, buffers are evicted and recycled. After every call the
    /// reported memory is what is held and within the limit.
    #[test]
    fn memory_is_what_is_held_and_within_the_limit() {
        let limits = Limits {
            max_memory: 128 * 1024,
            timeout_ms: 150,
            ..Default::default()
        };
        let mut r = Reassembler::new(limits);
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: usize| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % n as u64) as usize
        };
        // Datagrams being sent: their fragments still to go.
        let mut live: Vec<Vec<Vec<u8>>> = Vec::new();
        let mut id = 0u16;
        let mut completed = 0;
        for now in 0..6000u64 {
            if live.len() < 8 {
                id += 1;
                let v6 = next(2) == 1;
                let size = 1 + next(16_000);
                let d = data(size);
                let mut frags = Vec::new();
                let mut off = 0;
                while off < size {
                    let len = ((1 + next(300)) * 8).min(size - off);
                    let more = off + len < size;
                    let p = &d[off..off + len];
                    frags.push(if v6 {
                        v6_frag(u32::from(id), off, more, p)
                    } else {
                        v4_frag(id, off, more, p)
                    });
                    off += len;
                }
                for k in (1..frags.len()).rev() {
                    frags.swap(k, next(k + 1));
                }
                if frags.len() > 1 && next(4) == 0 {
                    // One fragment is lost: it waits until timeout.
                    frags.pop();
                }
                live.push(frags);
            }
            let k = next(live.len());
            let Some(f) = live[k].pop() else {
                live.swap_remove(k);
                continue;
            };
            if live[k].is_empty() {
                live.swap_remove(k);
            }
            if let Ok(Outcome::Complete(_)) = r.push(now, &f) {
                completed += 1;
            }
            assert!(
                r.memory() <= limits.max_memory,
                "at {now}: memory {} over {}",
                r.memory(),
                limits.max_memory
            );
            assert_eq!(r.memory(), held(&r), "at {now}");
            r.check_invariants().unwrap();
        }
        let s = r.stats();
        assert!(completed > 100, "{s:?}");
        assert!(s.evictions > 0 && s.timeouts > 0, "{s:?}");
        r.expire(1_000_000);
        assert_eq!(r.pending(), 0);
        assert_eq!(r.memory(), held(&r));
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
