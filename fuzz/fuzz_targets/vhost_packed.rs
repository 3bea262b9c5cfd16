//! Invariant: with the packed ring negotiated, whatever a driver writes
//! into its three packed rings (RX, TX, control), their indirect tables
//! and their buffers (descriptors with any flags, wrap bits and IDs,
//! lists that never end, event areas with any values, buffers rewritten
//! between kicks) and whatever frames the uplink delivers, vnicd's real
//! TX, RX and control paths over a small two-region guest memory with a
//! fake uplink
//! - never hand the uplink a piece of memory outside guest memory;
//! - write guest memory only inside buffers some descriptor marks
//!   device-writable and the rings' own descriptors and device areas;
//! - and neither fail an event nor panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vnic_backend::{
    uplink::Offloads,
    vhost::{
        packed::{F_INDIRECT, F_WRITE},
        testing::{Harness, PackedDriver},
    },
};
use vnic_fuzz::{check_writes, snapshot, Input};
use vnic_protocol::virtio::Features;

const SIZE: u16 = 16;
const A: (u64, usize) = (0x1_0000, 64 * 1024);
const B: (u64, usize) = (0x4_0000, 16 * 1024);
/// The three rings, where the harness's split rings would be.
const RINGS: [u64; 3] = [A.0, A.0 + 0x400, A.0 + 0x800];
/// Buffers go after the rings (the harness's arena).
const DATA: u64 = A.0 + 3 * 4096;

fn desc_at(h: &Harness, at: u64) -> Option<(u64, u32, u16)> {
    let mut b = [0u8; 16];
    h.mem.read_slice(&mut b, GuestAddress(at)).ok()?;
    Some((
        u64::from_le_bytes(b[..8].try_into().ok()?),
        u32::from_le_bytes(b[8..12].try_into().ok()?),
        u16::from_le_bytes([b[14], b[15]]),
    ))
}

/// Guest ranges the device may write: the rings' descriptors and device
/// areas, and every buffer a descriptor (in a ring, or in an indirect
/// table one points at) marks writable.
fn writable(h: &Harness) -> Vec<(u64, u64)> {
    let ring_len = 16 * u64::from(SIZE);
    let mut out: Vec<(u64, u64)> = RINGS.iter().map(|&r| (r, r + ring_len)).collect();
    out.extend(RINGS.iter().map(|&r| (r + ring_len + 4, r + ring_len + 8)));
    for &r in &RINGS {
        for k in 0..u64::from(SIZE) {
            let Some((addr, len, flags)) = desc_at(h, r + 16 * k) else {
                continue;
            };
            if flags & F_WRITE != 0 {
                out.push((addr, addr.saturating_add(u64::from(len))));
            }
            if flags & F_INDIRECT != 0 {
                for j in 0..u64::from(len / 16).min(u64::from(SIZE)) {
                    if let Some((a, l, f)) = desc_at(h, addr.wrapping_add(16 * j)) {
                        if f & F_WRITE != 0 {
                            out.push((a, a.saturating_add(u64::from(l))));
                        }
                    }
                }
            }
        }
    }
    out
}

/// An address mostly aimed at the buffer area or region B.
fn aim(raw: u64, how: u8) -> u64 {
    match how & 3 {
        0 | 1 => DATA + raw % (A.0 + A.1 as u64 + 64 - DATA),
        2 => B.0 + raw % (B.1 as u64 + 64),
        _ => raw,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let Some(cfg) = input.byte() else { return };
    let mut features = Features::VERSION_1
        | Features::RING_PACKED
        | Features::CTRL_VQ
        | Features::CTRL_RX
        | Features::MQ
        | Features::NOTF_COAL
        | Features::CSUM
        | Features::HOST_TSO4;
    for (bit, f) in [
        (0, Features::MRG_RXBUF),
        (1, Features::HASH_REPORT),
        (2, Features::EVENT_IDX),
        (3, Features::INDIRECT_DESC),
    ] {
        if cfg & (1 << bit) != 0 {
            features |= f;
        }
    }
    let mut h = Harness::with_regions(features, SIZE, Offloads::ALL, 1, &[A, B]);
    h.up.lock().discard = true;
    let event_idx = features.contains(Features::EVENT_IDX);
    let mut drivers: Vec<PackedDriver> = RINGS
        .iter()
        .map(|&r| PackedDriver::new(&h.mem, GuestAddress(r), SIZE))
        .collect();
    h.pair[0] = drivers[0].vring(&h.atomic, event_idx);
    h.pair[1] = drivers[1].vring(&h.atomic, event_idx);
    h.ctrl_vring[0] = drivers[2].vring(&h.atomic, event_idx);
    let mut id = 0u16;
    for _ in 0..512 {
        let Some(op) = input.byte() else { break };
        let q = usize::from(op >> 6) % 3;
        match op % 8 {
            // A raw descriptor, any flags and ID.
            0 => {
                let (Some(slot), raw) = (input.byte(), input.take(16)) else {
                    break;
                };
                if raw.len() < 16 {
                    break;
                }
                let addr = aim(
                    u64::from_le_bytes(raw[..8].try_into().unwrap_or_default()),
                    slot >> 4,
                );
                let at = RINGS[q] + 16 * u64::from(u16::from(slot) % SIZE);
                let _ = h.mem.write_obj(addr, GuestAddress(at));
                let _ = h.mem.write_slice(&raw[8..], GuestAddress(at + 8));
            }
            // A well-formed buffer: readable bytes (TX, control: a header
            // and a frame or command) or writable room (RX).
            1 => {
                let Some(n) = input.u16() else { break };
                let n = usize::from(n) % 1600 + 1;
                let body = input.take(n).to_vec();
                let Some(at) = h.arena.alloc(n.max(body.len())) else {
                    continue;
                };
                let _ = h.mem.write_slice(&body, at);
                let elems = [(at.0, n as u32, q == 0)];
                if drivers[q].push(&h.mem, &elems, id).is_some() {
                    id = id.wrapping_add(1) % (4 * SIZE);
                }
            }
            // Kick the queue and let the worker finish what it left over.
            2 => {
                let allowed = writable(&h);
                let before = snapshot(&h.mem);
                let r = match q {
                    0 => h.worker_event(0),
                    1 => h.worker_event(1),
                    _ => h.ctrl_event(0),
                };
                assert!(r.is_ok(), "handle_event fails only on a backend bug: {r:?}");
                assert!(h.settle().is_ok());
                check_writes(&before, &snapshot(&h.mem), &allowed);
                for d in &mut drivers {
                    d.used(&h.mem);
                }
                assert_eq!(h.up.lock().stray_pieces, 0, "a piece outside guest memory");
            }
            // A frame from the uplink (TAP header first).
            3 => {
                let Some(n) = input.u16() else { break };
                let f = input.take(usize::from(n) % 2048).to_vec();
                if h.up.lock().to_receive.len() < 64 {
                    h.up.push_rx(f);
                }
            }
            // Rewrite bytes of the buffer area.
            4 => {
                let (Some(off), Some(n)) = (input.u16(), input.byte()) else {
                    break;
                };
                let bytes = input.take(usize::from(n)).to_vec();
                let at = DATA + u64::from(off) % (A.0 + A.1 as u64 - DATA);
                let _ = h.mem.write_slice(&bytes, GuestAddress(at));
            }
            // The driver's event area.
            5 => {
                let (Some(flags), Some(off)) = (input.byte(), input.u16()) else {
                    break;
                };
                drivers[q].set_driver_event(&h.mem, u16::from(flags) % 4, off);
            }
            // An indirect table in the buffer area, made available.
            _ => {
                let Some(k) = input.byte() else { break };
                let raw = input.take(16 * usize::from(k % 8)).to_vec();
                let Some(at) = h.arena.alloc(raw.len().max(16)) else {
                    continue;
                };
                let _ = h.mem.write_slice(&raw, at);
                let len = raw.len() as u32;
                if drivers[q]
                    .push_flags(&h.mem, &[(at.0, len, F_INDIRECT)], id)
                    .is_some()
                {
                    id = id.wrapping_add(1) % (4 * SIZE);
                }
            }
        }
    }
});
