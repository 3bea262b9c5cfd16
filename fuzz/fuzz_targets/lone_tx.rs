//! Invariant: a port alone on the switch sends every frame as the whole
//! way through the switch would. Each frame goes to two NICs alike: to one
//! through `Nic::transmit_lone` (and `transmit_pieces` when it refuses),
//! to the other through `transmit_pieces` only. The bytes each uplink
//! gets, the frames and bytes counted as sent, every drop reason and the
//! GSO count come out the same; and a frame the lone way took was one
//! the uplink takes as it is (its header asks for nothing it lacks).

#![no_main]

use std::sync::atomic::Ordering;

use libfuzzer_sys::fuzz_target;
use vnic_backend::{
    nic::{DeviceConfig, DropReason, Nic, QueueStats, TxScratch},
    uplink::{fake::FakeUplink, Offloads, Piece},
};
use vnic_fuzz::Input;
use vnic_protocol::wire::ethernet::Address;

const PF: Address = Address([0x52, 0x54, 0, 0x12, 0x34, 0x56]);

fn nic(up: &FakeUplink) -> Nic {
    Nic::single(DeviceConfig::new(1, PF), Box::new(up.clone())).expect("a NIC")
}

fn counts(s: &QueueStats) -> Vec<u64> {
    let mut v = vec![
        s.packets.load(Ordering::Relaxed),
        s.bytes.load(Ordering::Relaxed),
        s.gso_packets.load(Ordering::Relaxed),
        s.sw_offloads.load(Ordering::Relaxed),
    ];
    v.extend(DropReason::ALL.iter().map(|&r| s.drops(r)));
    v
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let offloads = if inp.byte().unwrap_or(0) & 1 == 1 {
        Offloads::ALL
    } else {
        Offloads::default()
    };
    let (up_a, up_b) = (
        FakeUplink::with_offloads(offloads),
        FakeUplink::with_offloads(offloads),
    );
    let (a, b) = (nic(&up_a), nic(&up_b));
    let (mut sa, mut sb) = (TxScratch::default(), TxScratch::default());
    while let Some(sel) = inp.byte() {
        let mut h = [0u8; 12];
        let hb = inp.take(12);
        h[..hb.len()].copy_from_slice(hb);
        let len = usize::from(inp.u16().unwrap_or(60)) % 9100;
        let mut f = inp.take(len).to_vec();
        // Mostly from the port's own address, so that the lone way is
        // reached.
        if f.len() >= 12 && sel & 1 == 0 {
            f[6..12].copy_from_slice(&PF.0);
        }
        let cut = (usize::from(sel >> 1) * 3).min(f.len());
        let (prefix, rest) = f.split_at(cut);
        let pieces = [Piece::Local(rest)];
        let rest: &[Piece<'_>] = if rest.is_empty() { &[] } else { &pieces };
        let (va, vb) = (a.switch.view(), b.switch.view());
        let stats_a = &a.pf().stats.tx[0];
        let framed = [&h[..], prefix].concat();
        let took = a
            .lone(0, 0, &va)
            .and_then(|l| a.transmit_lone(&l, &framed, h.len(), rest, &mut sa, stats_a));
        if took.is_some() {
            // Only what the uplink takes as it is.
            assert!(h[0] & !1 == 0);
            assert!(h[0] == 0 || offloads.csum);
            assert!(h[1] == 0 || offloads.tso4 || offloads.tso6 || offloads.uso);
        } else {
            let _ = a.transmit_pieces(0, 0, &h, prefix, rest, &mut sa, &va);
        }
        let _ = b.transmit_pieces(0, 0, &h, prefix, rest, &mut sb, &vb);
        sa.settle(stats_a);
        sb.settle(&b.pf().stats.tx[0]);
        assert_eq!(up_a.sent(), up_b.sent());
        assert_eq!(counts(stats_a), counts(&b.pf().stats.tx[0]));
    }
});
