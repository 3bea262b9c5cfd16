//! Invariant: whatever a driver writes into a packed ring and the memory
//! around it (any flags, wrap bits, lists that never end or stop being
//! available, indirect tables of any length, nested ones, rewrites
//! between steps), the device's packed ring
//! - pops only lists that start where the last one ended, take 1 to
//!   size ring entries, and keep its positions inside the ring;
//! - walks no more descriptors than the list or its table holds, none
//!   of them indirect, under 4 GiB in all;
//! - writes guest memory only in the descriptor ring and its own device
//!   area, and there only when asked (used descriptors, the kick flag);
//! - and does not panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vnic_backend::vhost::packed::{PackedRing, Position, F_INDIRECT, F_NEXT};
use vnic_fuzz::Input;

const MEM: usize = 0x4000;
const RING: u64 = 0x1000;
const TABLES: u64 = 0x2000;

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let (Some(size), Some(base), Some(nops)) = (input.byte(), input.u16(), input.byte()) else {
        return;
    };
    // The steps first, so that a short input still takes some; then the
    // ring's bytes and a page of indirect tables.
    let mut ops = Input(input.take(4 * usize::from(nops)));
    let size = u16::from(size % 64) + 1;
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]) else {
        return;
    };
    let ring_end = RING + 16 * u64::from(size);
    let ring_bytes = input.take(16 * usize::from(size) + 8);
    let _ = mem.write_slice(ring_bytes, GuestAddress(RING));
    let tables = input.take(0x400);
    let _ = mem.write_slice(tables, GuestAddress(TABLES));
    let (desc, driver, device) = (
        GuestAddress(RING),
        GuestAddress(ring_end),
        GuestAddress(ring_end + 4),
    );
    let pos = Position::from_base(base, size).unwrap_or(Position::START);
    let Some(mut ring) = PackedRing::new(&mem, desc, driver, device, size, pos) else {
        panic!("a valid ring of {size} was refused");
    };
    let snapshot = |mem: &GuestMemoryMmap| {
        let mut v = vec![0u8; MEM];
        let _ = mem.read_slice(&mut v, GuestAddress(0));
        v
    };
    let mut popped = Vec::new();
    for _ in 0..256 {
        let Some(op) = ops.byte() else {
            break;
        };
        let before = snapshot(&mem);
        let mut device_written = false;
        match op % 8 {
            0..=2 => {
                let at = ring.position();
                match ring.pop() {
                    Ok(Some(a)) => {
                        assert_eq!((a.start, true), (at.avail, a.count >= 1));
                        assert!(a.count <= size, "{a:?} in {size}");
                        let mut n = 0u32;
                        let mut total = 0u64;
                        for d in ring.chain(&a, &mem) {
                            assert_eq!(d.flags() & (F_NEXT | F_INDIRECT), 0);
                            n += 1;
                            total += u64::from(d.len());
                        }
                        assert!(n <= u32::from(size.max(a.count)), "{n} from {a:?}");
                        assert!(total < 1 << 32);
                        popped.push(a);
                    }
                    Ok(None) => assert_eq!(ring.position(), at),
                    Err(_) => assert_eq!(ring.position(), at),
                }
            }
            3 => {
                let len = u32::from(ops.u16().unwrap_or(0));
                match popped.first().copied() {
                    Some(a) => {
                        popped.remove(0);
                        let _ = ring.put_used(a.id, len, a.count);
                    }
                    None => {
                        let _ = ring.put_used(0, len, 1);
                    }
                }
            }
            4 => {
                let _ = ring.publish();
            }
            5 => {
                let _ = ring.needs_notification(op & 0x80 != 0);
            }
            6 => {
                let _ = ring.set_kicks(op & 0x80 != 0);
                device_written = true;
            }
            _ => {
                // The driver rewrites a few bytes anywhere.
                let (Some(at), Some(b)) = (ops.u16(), ops.byte()) else {
                    break;
                };
                let _ = mem.write_obj(b, GuestAddress(u64::from(at) % MEM as u64));
                continue;
            }
        }
        let p = ring.position();
        assert!(p.avail < size && p.used < size, "{p:?} in {size}");
        let after = snapshot(&mem);
        let (r, e) = (RING as usize, ring_end as usize);
        assert!(before[..r] == after[..r], "written below the ring");
        assert!(before[e..e + 4] == after[e..e + 4], "driver area written");
        assert!(
            device_written || before[e + 4..e + 8] == after[e + 4..e + 8],
            "device area written unasked"
        );
        assert!(before[e + 8..] == after[e + 8..], "written past the ring");
    }
    let _ = ring.publish();
});
