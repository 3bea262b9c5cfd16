//! The vhost layer over real guest memory (no root, no sockets): control,
//! transmit and receive chains as a driver or an attacker writes them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use vnic_protocol::virtio::{
    ctrl::{Coal, CtrlCommand, RxMode, ACK_ERR, ACK_OK},
    Features,
};

use super::testing::{Desc, Harness};
use crate::{nic::DropReason, uplink::Offloads};

fn all() -> Features {
    super::offered_features()
}

fn harness(seed: u64) -> Harness {
    Harness::new(all(), 256, Offloads::ALL, seed)
}

/// Posts a control command whose writable part is `writable` (lengths,
/// each its own buffer), kicks the control queue and returns the used
/// entry and the writable buffers' addresses.
fn ctrl(
    h: &mut Harness,
    cmd: &[u8],
    writable: &[usize],
) -> ((u32, u32), Vec<vm_memory::GuestAddress>) {
    let mut descs = vec![Desc::ro(h.buffer(cmd, cmd.len()), cmd.len())];
    let mut outs = Vec::new();
    for &n in writable {
        let at = h.buffer(&vec![0xee; n], n);
        outs.push(at);
        descs.push(Desc::wo(at, n));
    }
    let head = h.ctrl.push_chain(&h.mem, &descs).unwrap();
    h.ctrl_event(0).unwrap();
    let used = h.ctrl.used(&h.mem);
    assert_eq!(used.len(), 1, "one command, one used entry");
    assert_eq!(used[0].0, u32::from(head));
    (used[0], outs)
}

fn bytes(cmd: &CtrlCommand) -> Vec<u8> {
    cmd.to_bytes().unwrap()
}

#[test]
fn control_ack_comes_first_then_the_answer() {
    let mut h = harness(1);
    let set = bytes(&CtrlCommand::CoalVqSet {
        vq_index: 0,
        coal: Coal {
            max_packets: 7,
            max_usecs: 9,
        },
    });
    let ((_, len), outs) = ctrl(&mut h, &set, &[1]);
    assert_eq!(len, 1);
    assert_eq!(h.read(outs[0], 1), [ACK_OK]);
    // As Linux lays out VQ_GET: the status byte, then the answer, each in
    // its own buffer.
    let get = bytes(&CtrlCommand::CoalVqGet { vq_index: 0 });
    let ((_, len), outs) = ctrl(&mut h, &get, &[1, 8]);
    assert_eq!(len, 9);
    assert_eq!(h.read(outs[0], 1), [ACK_OK]);
    assert_eq!(h.read(outs[1], 8), [7, 0, 0, 0, 9, 0, 0, 0]);
    // One buffer for both works the same.
    let ((_, len), outs) = ctrl(&mut h, &get, &[9]);
    assert_eq!(len, 9);
    assert_eq!(h.read(outs[0], 9), [ACK_OK, 7, 0, 0, 0, 9, 0, 0, 0]);
    assert_eq!(
        h.dev
            .stats
            .ctrl
            .packets
            .load(std::sync::atomic::Ordering::Relaxed),
        3
    );
    assert_eq!(h.dev.stats.ctrl.total_drops(), 0);
}

#[test]
fn control_answer_without_room_is_err_and_counted() {
    let mut h = harness(2);
    let get = bytes(&CtrlCommand::CoalVqGet { vq_index: 0 });
    let ((_, len), outs) = ctrl(&mut h, &get, &[1]);
    assert_eq!(len, 1);
    assert_eq!(h.read(outs[0], 1), [ACK_ERR]);
    assert_eq!(h.dev.stats.ctrl.drops(DropReason::BadControl), 1);
    // Nothing writable at all: nothing written, a counted drop.
    let ((_, len), _) = ctrl(&mut h, &get, &[]);
    assert_eq!(len, 0);
    assert_eq!(h.dev.stats.ctrl.drops(DropReason::BadControl), 2);
}

#[test]
fn control_chain_with_an_absurd_writable_part_is_refused_without_writing() {
    let mut h = harness(3);
    let promisc = bytes(&CtrlCommand::Rx {
        mode: RxMode::Promisc,
        on: true,
    });
    // One writable descriptor at a real guest address, as long as a chain
    // may be (2^32 - 1 bytes in all).
    let cmd = h.buffer(&promisc, promisc.len());
    let at = h.buffer(&[0xee; 64], 64);
    let head = h
        .ctrl
        .push_chain(
            &h.mem,
            &[
                Desc::ro(cmd, promisc.len()),
                Desc {
                    addr: at.0,
                    len: u32::MAX - promisc.len() as u32,
                    flags: super::testing::F_WRITE,
                    next: 0,
                },
            ],
        )
        .unwrap();
    h.ctrl_event(0).unwrap();
    let used = h.ctrl.used(&h.mem);
    assert_eq!(used, vec![(u32::from(head), 0)]);
    assert_eq!(h.read(at, 64), vec![0xee; 64], "nothing written");
    assert_eq!(h.dev.stats.ctrl.drops(DropReason::BadControl), 1);
    // Writable buffers that are each fine but together far larger than
    // any answer: refused the same way.
    let big = 40 * 1024;
    let ((_, len), outs) = ctrl(&mut h, &promisc, &[big, big]);
    assert_eq!(len, 0);
    assert_eq!(h.read(outs[0], 4), [0xee; 4]);
    assert_eq!(h.dev.stats.ctrl.drops(DropReason::BadControl), 2);
    assert!(
        !h.dev.ctrl_state().filter.promisc,
        "the command was not applied"
    );
}

/// A UDP frame from the uplink (TAP header first).
fn uplink_frame(payload_len: usize) -> Vec<u8> {
    use vnic_protocol::wire::build::{udp_frame, Flow, IpFields};
    let flow = Flow {
        dst_mac: vnic_protocol::wire::ethernet::Address([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
        ..Flow::v4()
    };
    let f = udp_frame(&flow, &IpFields::default(), &vec![0x5a; payload_len]).unwrap();
    let mut out = vec![0u8; crate::uplink::tap::VNET_HDR_LEN];
    out.extend_from_slice(&f);
    out
}

/// A UDP frame as the driver transmits it (12-byte header first).
fn tx_frame(payload_len: usize) -> Vec<u8> {
    uplink_frame(payload_len)
}

#[test]
fn a_guest_address_at_the_top_of_the_address_space_is_a_counted_drop() {
    let mut h = harness(4);
    h.up.push_rx(uplink_frame(100));
    // An RX buffer whose address wraps past 2^64 once the header is added.
    h.rx.push_chain(
        &h.mem,
        &[Desc {
            addr: u64::MAX - 5,
            len: 2048,
            flags: super::testing::F_WRITE,
            next: 0,
        }],
    )
    .unwrap();
    h.worker_event(0).unwrap();
    assert_eq!(h.rx.used(&h.mem).len(), 1, "the buffer comes back");
    assert_eq!(h.dev.stats.rx[0].drops(DropReason::BadDescriptor), 1);
    // A TX chain likewise.
    h.tx.push_chain(
        &h.mem,
        &[Desc {
            addr: u64::MAX - 5,
            len: 100,
            flags: 0,
            next: 0,
        }],
    )
    .unwrap();
    h.worker_event(1).unwrap();
    assert_eq!(h.tx.used(&h.mem).len(), 1);
    assert_eq!(h.dev.stats.tx[0].drops(DropReason::BadDescriptor), 1);
}

/// Posts `n` TX frames of `payload_len` bytes.
fn post_tx(h: &mut Harness, n: usize, payload_len: usize) {
    let f = tx_frame(payload_len);
    for _ in 0..n {
        let at = h.buffer(&f, f.len());
        h.tx.push_chain(&h.mem, &[Desc::ro(at, f.len())]).unwrap();
    }
}

#[test]
fn transmit_stops_at_its_budget_and_resumes_after_other_work() {
    for event_idx in [false, true] {
        let features = if event_idx {
            all()
        } else {
            all() - Features::EVENT_IDX
        };
        let mut h = Harness::new(features, 512, Offloads::ALL, 5);
        post_tx(&mut h, 300, 60);
        h.worker_event(1).unwrap();
        assert_eq!(h.tx.used(&h.mem).len(), super::BUDGET);
        assert_eq!(h.up.lock().sent_count, super::BUDGET as u64);
        assert!(h.backend.take_resume(0), "the worker is asked to come back");
        // While work is left the driver is asked not to kick.
        if event_idx {
            assert_ne!(h.tx.avail_event(&h.mem), h.tx.avail_idx());
        } else {
            assert_eq!(h.tx.used_flags(&h.mem), 1, "VRING_USED_F_NO_NOTIFY");
        }
        // Receive runs in between.
        h.up.push_rx(uplink_frame(100));
        let buf = h.arena.alloc(2048).unwrap();
        h.rx.push_chain(&h.mem, &[Desc::wo(buf, 2048)]).unwrap();
        h.worker_event(0).unwrap();
        assert_eq!(h.rx.used(&h.mem).len(), 1);
        h.worker_event(h.backend.resume_event()).unwrap();
        assert_eq!(h.tx.used(&h.mem).len(), 300 - super::BUDGET);
        assert!(!h.backend.take_resume(0));
        // Done: notifications are on again.
        if event_idx {
            assert_eq!(h.tx.avail_event(&h.mem), h.tx.avail_idx());
        } else {
            assert_eq!(h.tx.used_flags(&h.mem), 0);
        }
        assert_eq!(
            h.dev.stats.tx[0]
                .packets
                .load(std::sync::atomic::Ordering::Relaxed),
            300
        );
    }
}

#[test]
fn control_queue_stops_at_its_budget() {
    let mut h = harness(6);
    let cmd = bytes(&CtrlCommand::Rx {
        mode: RxMode::Promisc,
        on: true,
    });
    for _ in 0..100 {
        let c = h.buffer(&cmd, cmd.len());
        let a = h.buffer(&[0xee], 1);
        h.ctrl
            .push_chain(&h.mem, &[Desc::ro(c, cmd.len()), Desc::wo(a, 1)])
            .unwrap();
    }
    h.ctrl_event(0).unwrap();
    assert_eq!(h.ctrl.used(&h.mem).len(), super::CTRL_BUDGET);
    assert!(h.backend.take_resume(1));
    h.ctrl_event(h.backend.resume_event()).unwrap();
    assert_eq!(h.ctrl.used(&h.mem).len(), 100 - super::CTRL_BUDGET);
}
