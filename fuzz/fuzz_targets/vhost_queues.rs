//! Invariant: whatever a driver writes into its descriptor tables and
//! available rings (any addresses, lengths, flags, chains that loop,
//! indirect tables, heads past the queue, buffers rewritten between kicks)
//! and whatever frames the uplink delivers, vnicd's real TX, RX and
//! control paths over a small two-region guest memory with a fake uplink
//! - never hand the uplink a piece of memory outside guest memory;
//! - write guest memory only inside buffers the driver marked
//!   device-writable and the used rings;
//! - put on the used ring only heads below the queue size that the driver
//!   made available (each at most as often as it was);
//! - report used lengths within the largest frame (RX), zero (TX) and the
//!   ack plus the largest answer (control);
//! - allocate no single block over 1 MiB and stay within 16 MiB over the
//!   run; and do not panic.

#![no_main]

use std::{
    alloc::{GlobalAlloc, Layout, System},
    collections::HashMap,
    sync::atomic::{AtomicUsize, Ordering::Relaxed},
};

use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vnic_backend::{
    uplink::Offloads,
    vhost::testing::{Desc, DriverRing, Harness, F_INDIRECT, F_WRITE},
};
use vnic_fuzz::{check_writes, snapshot, Input};
use vnic_protocol::virtio::Features;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static BIGGEST: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let live = LIVE.fetch_add(n, Relaxed) + n;
    PEAK.fetch_max(live, Relaxed);
    BIGGEST.fetch_max(n, Relaxed);
}

// SAFETY: every call is passed to the system allocator unchanged; only
// counters are kept beside it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        grew(l.size());
        // SAFETY: the caller's contract for `alloc`, passed on.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        grew(l.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_sub(l.size(), Relaxed);
        grew(new);
        // SAFETY: as above.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const SIZE: u16 = 16;
const A: (u64, usize) = (0x1_0000, 64 * 1024);
const B: (u64, usize) = (0x4_0000, 16 * 1024);
/// The largest frame and header the device writes into RX buffers.
const MAX_RX_USED: u32 = 65_535 + 14 + 8 + 20;

fn ring(h: &Harness, q: usize) -> &DriverRing {
    match q {
        0 => &h.rx,
        1 => &h.tx,
        _ => &h.ctrl,
    }
}

fn ring_mut(h: &mut Harness, q: usize) -> &mut DriverRing {
    match q {
        0 => &mut h.rx,
        1 => &mut h.tx,
        _ => &mut h.ctrl,
    }
}

fn read_desc(h: &Harness, at: GuestAddress) -> Option<Desc> {
    let mut b = [0u8; 16];
    h.mem.read_slice(&mut b, at).ok()?;
    Some(Desc {
        addr: u64::from_le_bytes(b[..8].try_into().ok()?),
        len: u32::from_le_bytes(b[8..12].try_into().ok()?),
        flags: u16::from_le_bytes([b[12], b[13]]),
        next: u16::from_le_bytes([b[14], b[15]]),
    })
}

/// Guest ranges the device may write: every writable buffer named by a
/// descriptor (in the tables, or in an indirect table they point at), and
/// the used rings.
fn writable(h: &Harness) -> Vec<(u64, u64)> {
    // The used rings first (three entries), then the buffers.
    let mut out: Vec<(u64, u64)> = (0..3)
        .map(|q| {
            let r = ring(h, q);
            (r.used.0, r.used.0 + 6 + 8 * u64::from(SIZE))
        })
        .collect();
    for q in 0..3 {
        let r = ring(h, q);
        for slot in 0..u64::from(SIZE) {
            let Some(d) = read_desc(h, GuestAddress(r.desc.0 + 16 * slot)) else {
                continue;
            };
            if d.flags & F_WRITE != 0 {
                out.push((d.addr, d.addr.saturating_add(u64::from(d.len))));
            }
            if d.flags & F_INDIRECT != 0 {
                for k in 0..u64::from(d.len / 16).min(64) {
                    if let Some(i) = read_desc(h, GuestAddress(d.addr.wrapping_add(16 * k))) {
                        if i.flags & F_WRITE != 0 {
                            out.push((i.addr, i.addr.saturating_add(u64::from(i.len))));
                        }
                    }
                }
            }
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let Some(cfg) = input.byte() else { return };
    let mut features = Features::VERSION_1
        | Features::CTRL_VQ
        | Features::CTRL_RX
        | Features::CTRL_VLAN
        | Features::CTRL_MAC_ADDR
        | Features::MQ
        | Features::RSS
        | Features::NOTF_COAL
        | Features::VQ_NOTF_COAL
        | Features::CSUM
        | Features::HOST_TSO4
        | Features::HOST_TSO6
        | Features::HOST_USO;
    for (bit, f) in [
        (0, Features::MRG_RXBUF),
        (1, Features::HASH_REPORT),
        (2, Features::EVENT_IDX),
        (
            3,
            Features::GUEST_CSUM | Features::GUEST_TSO4 | Features::GUEST_TSO6,
        ),
        (4, Features::INDIRECT_DESC),
    ] {
        if cfg & (1 << bit) != 0 {
            features |= f;
        }
    }
    let offloads = if cfg & 0x20 != 0 {
        Offloads::ALL
    } else {
        Offloads::default()
    };
    let mut h = Harness::with_regions(features, SIZE, offloads, 1, &[A, B]);
    h.up.lock().discard = true;
    let base_live = LIVE.load(Relaxed);
    PEAK.store(base_live, Relaxed);
    BIGGEST.store(0, Relaxed);
    // Heads made available per queue, and how many times.
    let mut published: [HashMap<u16, u32>; 3] = Default::default();
    let data_start = A.0 + 3 * 4096;
    while let Some(op) = input.byte() {
        let q = usize::from(op >> 6) % 3;
        match op % 8 {
            // Write a descriptor, its address mostly aimed at guest memory.
            0 => {
                let Some(slot) = input.byte() else { break };
                let raw = input.take(16);
                if raw.len() < 16 {
                    break;
                }
                let mut addr = u64::from_le_bytes(raw[..8].try_into().unwrap_or_default());
                if slot & 0x80 == 0 {
                    // Into the buffer area (or just past region A): buffers
                    // over the driver's own rings would make the used
                    // entries the device writes unreadable to the check.
                    addr = data_start + addr % (A.0 + A.1 as u64 + 64 - data_start);
                } else if slot & 0x40 == 0 {
                    addr = B.0 + addr % (B.1 as u64 + 64);
                }
                let len = u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default());
                let len = if slot & 0x20 == 0 { len % 4096 } else { len };
                let d = Desc {
                    addr,
                    len,
                    flags: u16::from_le_bytes([raw[12], raw[13]]) & 0x7,
                    next: u16::from_le_bytes([raw[14], raw[15]]) % (SIZE + 2),
                };
                let r = ring(&h, q);
                r.write_desc(&h.mem, u16::from(slot) % SIZE, d);
            }
            // Make a head available.
            1 => {
                let Some(head) = input.u16() else { break };
                let head = if head & 0x8000 == 0 {
                    head % SIZE
                } else {
                    head
                };
                let mem = h.mem.clone();
                ring_mut(&mut h, q).publish(&mem, head);
                *published[q].entry(head).or_default() += 1;
            }
            // Kick the queue, and let the worker finish what it left over.
            2 => {
                let allowed = writable(&h);
                // Writable buffers over the rings themselves (raw
                // addresses can land there): the device then writes frame
                // bytes over used entries, and those are not checked.
                let rings_hit = allowed[3..].iter().any(|&(s, e)| s < data_start && e > A.0);
                let before = snapshot(&h.mem);
                let r = match q {
                    0 => h.worker_event(0),
                    1 => h.worker_event(1),
                    _ => h.ctrl_event(0),
                };
                assert!(r.is_ok(), "handle_event fails only on a backend bug");
                assert!(h.settle().is_ok());
                while h.backend.take_resume(1) {
                    let _ = h.ctrl_event(h.backend.resume_event());
                }
                check_writes(&before, &snapshot(&h.mem), &allowed);
                for q in 0..3 {
                    let mem = h.mem.clone();
                    for (id, len) in ring_mut(&mut h, q).used(&mem) {
                        if rings_hit {
                            continue;
                        }
                        let head = u16::try_from(id).expect("a 16-bit head");
                        assert!(head < SIZE, "used head {head} past the queue");
                        let n = published[q]
                            .get_mut(&head)
                            .expect("a head never made available");
                        assert!(*n > 0, "head {head} used more often than made available");
                        *n -= 1;
                        match q {
                            0 => assert!(len <= MAX_RX_USED),
                            1 => assert_eq!(len, 0),
                            _ => assert!(len <= 9),
                        }
                    }
                }
                assert_eq!(h.up.lock().stray_pieces, 0, "a piece outside guest memory");
            }
            // A frame from the uplink (TAP header first).
            3 => {
                let Some(n) = input.u16() else { break };
                let mut f = input.take(usize::from(n) % 2048).to_vec();
                if op & 0x20 != 0 {
                    f.resize(usize::from(n) % 70_000, 0x5a);
                }
                if h.up.lock().to_receive.len() < 64 {
                    h.up.push_rx(f);
                }
            }
            // Rewrite bytes of the buffer area (between kicks, or of a
            // chain already made available).
            4 => {
                let Some(off) = input.u16() else { break };
                let Some(n) = input.byte() else { break };
                let bytes = input.take(usize::from(n)).to_vec();
                let at = data_start + u64::from(off) % (A.0 + A.1 as u64 - data_start);
                let _ = h.mem.write_slice(&bytes, GuestAddress(at));
            }
            // The driver's used_event.
            5 => {
                let Some(v) = input.u16() else { break };
                ring(&h, q).set_used_event(&h.mem, v);
            }
            // An indirect table in the buffer area.
            6 => {
                let Some(k) = input.byte() else { break };
                let raw = input.take(16 * usize::from(k % 8)).to_vec();
                let Some(at) = h.arena.alloc(raw.len().max(16)) else {
                    continue;
                };
                let _ = h.mem.write_slice(&raw, at);
                let d = Desc {
                    addr: at.0,
                    len: raw.len() as u32,
                    flags: F_INDIRECT,
                    next: 0,
                };
                ring(&h, q).write_desc(&h.mem, u16::from(k) % SIZE, d);
            }
            // A frame for the TX or control queue, well formed, so that
            // the fuzzer reaches the paths past validation.
            _ => {
                let Some(n) = input.u16() else { break };
                let mut bytes = vec![
                    0u8;
                    if features.contains(Features::HASH_REPORT) {
                        20
                    } else {
                        12
                    }
                ];
                bytes.extend_from_slice(input.take(usize::from(n) % 1600));
                let Some(at) = h.arena.alloc(bytes.len()) else {
                    continue;
                };
                let _ = h.mem.write_slice(&bytes, at);
                let mem = h.mem.clone();
                let r = ring_mut(&mut h, q);
                if let Some(head) = r.push_chain(&mem, &[Desc::ro(at, bytes.len())]) {
                    *published[q].entry(head).or_default() += 1;
                }
            }
        }
    }
    assert!(
        BIGGEST.load(Relaxed) <= 1 << 20,
        "a single allocation of {} bytes",
        BIGGEST.load(Relaxed)
    );
    assert!(
        PEAK.load(Relaxed).saturating_sub(base_live) <= 16 << 20,
        "{} bytes allocated at the peak",
        PEAK.load(Relaxed) - base_live
    );
});
