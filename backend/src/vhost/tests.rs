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
