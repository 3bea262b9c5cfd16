//! The vhost layer over real guest memory (no root, no sockets): control,
//! transmit and receive chains as a driver or an attacker writes them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use vnic_protocol::virtio::{
    ctrl::{Coal, CtrlCommand, RxMode, ACK_ERR, ACK_OK},
    Features,
};

use std::collections::VecDeque;

use super::testing::{Desc, Harness};
use crate::{nic::DropReason, uplink::Offloads};

/// Every offered feature but the packed ring: the harness's own rings
/// are split (the packed tests put packed rings in and ack it).
fn all() -> Features {
    super::offered_features() - Features::RING_PACKED
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
        h.pf()
            .stats
            .ctrl
            .packets
            .load(std::sync::atomic::Ordering::Relaxed),
        3
    );
    assert_eq!(h.pf().stats.ctrl.total_drops(), 0);
}

/// The control queue as a packed ring: a command and its answer in one
/// list, then in three, and a list whose readable part comes after a
/// writable one (refused, counted, handed back empty); each gets its
/// used descriptor with the bytes written.
#[test]
fn a_packed_control_queue_answers_each_list() {
    use super::testing::PackedDriver;
    let mut h = Harness::new(
        (all() - Features::EVENT_IDX) | Features::RING_PACKED,
        16,
        Offloads::ALL,
        40,
    );
    let at = h.arena.alloc(16 * 16 + 8 + 16).unwrap();
    let at = GuestAddress(at.0.next_multiple_of(16));
    let mut d = PackedDriver::new(&h.mem, at, 16);
    h.ctrl_vring[0] = d.vring(&h.atomic, false);
    let set = bytes(&CtrlCommand::CoalVqSet {
        vq_index: 0,
        coal: Coal {
            max_packets: 7,
            max_usecs: 9,
        },
    });
    let get = bytes(&CtrlCommand::CoalVqGet { vq_index: 0 });
    let mut post = |h: &mut Harness, cmd: &[u8], outs: &[usize], id: u16| {
        let mut elems = vec![(h.buffer(cmd, cmd.len()).0, cmd.len() as u32, false)];
        let mut addrs = Vec::new();
        for &n in outs {
            let a = h.buffer(&vec![0xee; n], n);
            addrs.push(a);
            elems.push((a.0, n as u32, true));
        }
        d.push(&h.mem, &elems, id).unwrap();
        addrs
    };
    let o1 = post(&mut h, &set, &[1], 1);
    let o2 = post(&mut h, &get, &[1, 8], 2);
    h.ctrl_event(0).unwrap();
    assert_eq!(d.used(&h.mem), vec![(1, 1), (2, 9)]);
    assert_eq!(h.read(o1[0], 1), [ACK_OK]);
    assert_eq!(h.read(o2[0], 1), [ACK_OK]);
    assert_eq!(h.read(o2[1], 8), [7, 0, 0, 0, 9, 0, 0, 0]);
    // Writable before readable: refused.
    let out = h.buffer(&[0xee], 1);
    let cmd = h.buffer(&get, get.len());
    d.push(
        &h.mem,
        &[(out.0, 1, true), (cmd.0, get.len() as u32, false)],
        3,
    )
    .unwrap();
    h.ctrl_event(0).unwrap();
    assert_eq!(d.used(&h.mem), vec![(3, 0)]);
    assert_eq!(h.read(out, 1), [0xee]);
    assert_eq!(h.pf().stats.ctrl.drops(DropReason::BadChainLayout), 1);
    assert_eq!(counter(&h.pf().stats.ctrl.packets), 2);
}

#[test]
fn control_answer_without_room_is_err_and_counted() {
    let mut h = harness(2);
    let get = bytes(&CtrlCommand::CoalVqGet { vq_index: 0 });
    let ((_, len), outs) = ctrl(&mut h, &get, &[1]);
    assert_eq!(len, 1);
    assert_eq!(h.read(outs[0], 1), [ACK_ERR]);
    assert_eq!(h.pf().stats.ctrl.drops(DropReason::BadControl), 1);
    // Nothing writable at all: nothing written, a counted drop.
    let ((_, len), _) = ctrl(&mut h, &get, &[]);
    assert_eq!(len, 0);
    assert_eq!(h.pf().stats.ctrl.drops(DropReason::BadControl), 2);
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
    assert_eq!(h.pf().stats.ctrl.drops(DropReason::BadControl), 1);
    // Writable buffers that are each fine but together far larger than
    // any answer: refused the same way.
    let big = 40 * 1024;
    let ((_, len), outs) = ctrl(&mut h, &promisc, &[big, big]);
    assert_eq!(len, 0);
    assert_eq!(h.read(outs[0], 4), [0xee; 4]);
    assert_eq!(h.pf().stats.ctrl.drops(DropReason::BadControl), 2);
    assert!(
        !h.pf().ctrl_state().filter.promisc,
        "the command was not applied"
    );
}

/// A UDP frame from the uplink (TAP header first).
fn uplink_frame(payload_len: usize) -> Vec<u8> {
    tap(&udp(42 + payload_len, 40000))
}

/// `frame` behind the uplink's 12-byte virtio-net header (all zero).
fn tap(frame: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; crate::uplink::tap::VNET_HDR_LEN];
    out.extend_from_slice(frame);
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
    assert_eq!(h.pf().stats.rx[0].drops(DropReason::BadDescriptor), 1);
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
    assert_eq!(h.pf().stats.tx[0].drops(DropReason::BadDescriptor), 1);
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
            h.pf().stats.tx[0]
                .packets
                .load(std::sync::atomic::Ordering::Relaxed),
            300
        );
    }
}

/// Whether eventfd `e` would be read without blocking (as epoll sees it).
fn readable(e: &vmm_sys_util::eventfd::EventFd) -> bool {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd {
        fd: e.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, a zero timeout; the fd stays open.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n == 1 && p.revents & libc::POLLIN != 0
}

#[test]
fn a_transmit_queue_over_its_budget_keeps_its_resume_event_readable_until_drained() {
    let mut h = Harness::new(all(), 1024, Offloads::ALL, 8);
    let n = 3 * super::BUDGET + 10;
    post_tx(&mut h, n, 60);
    h.worker_event(1).unwrap();
    let mut done = h.tx.used(&h.mem).len();
    assert_eq!(done, super::BUDGET);
    let e = &h.backend.resume[0];
    assert!(readable(e));
    // As epoll delivers it: each round that ends at the budget leaves the
    // event as it is (written once), the last one clears it.
    for round in 2..=4 {
        h.worker_event(h.backend.resume_event()).unwrap();
        done += h.tx.used(&h.mem).len();
        assert_eq!(done, n.min(round * super::BUDGET));
        assert_eq!(readable(e), done < n, "after round {round}");
    }
    assert_eq!(h.up.lock().sent_count, n as u64);
    assert!(!h.backend.take_resume(0));
}

/// Receive and transmit both over their budget share the worker's resume
/// event: each goes on at every resume until it is done, the event stays
/// readable until both are, and nothing is lost or counted twice.
#[test]
fn receive_and_transmit_over_their_budgets_both_resume_until_drained() {
    let features = all() - Features::VNIC_TOE;
    let mut h = Harness::new(features, 1024, Offloads::ALL, 9);
    let (nrx, ntx) = (2 * super::BUDGET + 7, 3 * super::BUDGET + 10);
    for k in 0..nrx {
        h.up.push_rx(tap(&udp(100, 3000 + k as u16)));
    }
    for _ in 0..nrx {
        let buf = h.arena.alloc(2048).unwrap();
        h.rx.push_chain(&h.mem, &[Desc::wo(buf, 2048)]).unwrap();
    }
    post_tx(&mut h, ntx, 60);
    h.worker_event(0).unwrap();
    h.worker_event(1).unwrap();
    let (mut got, mut sent) = (h.rx.used(&h.mem).len(), h.tx.used(&h.mem).len());
    assert_eq!((got, sent), (super::BUDGET, super::BUDGET));
    let e = &h.backend.resume[0];
    for round in 2..=4 {
        assert!(readable(e), "before round {round}");
        h.worker_event(h.backend.resume_event()).unwrap();
        got += h.rx.used(&h.mem).len();
        sent += h.tx.used(&h.mem).len();
        assert_eq!(got, nrx.min(round * super::BUDGET), "round {round}");
        assert_eq!(sent, ntx.min(round * super::BUDGET), "round {round}");
    }
    assert!(!readable(e));
    let rx0 = &h.pf().stats.rx[0];
    assert_eq!(counter(&rx0.packets), nrx as u64);
    assert_eq!(rx0.total_drops(), 0);
    assert_eq!(h.up.lock().sent_count, ntx as u64);
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

// The descriptor-chain layer (chain.rs) over guest memory: frames gathered
// from and written into chains of buffers with random gaps between them,
// direct and indirect, and every malformed chain a driver can write.

use vm_memory::GuestAddress;
use vnic_protocol::{
    virtio::{
        hdr::{GsoType, HDR_LEN, HDR_LEN_HASH},
        HdrFlags, VirtioNetHdr,
    },
    wire::build::{data_segment, tcp_frame, udp_frame, Flow, IpFields},
};

use super::testing::{Rng, F_INDIRECT, F_NEXT, F_WRITE};

use super::testing::DEVICE_MAC as DEV_MAC;

/// A UDP frame of `len` bytes in all, from a source port that varies the
/// flow's hash.
fn udp(len: usize, port: u16) -> Vec<u8> {
    let flow = Flow {
        dst_mac: DEV_MAC,
        src_port: port,
        ..Flow::v4()
    };
    udp_frame(&flow, &IpFields::default(), &vec![0x3c; len.max(60) - 42]).unwrap()
}

/// Splits `len` bytes at up to `max_pieces - 1` random points.
fn cut(rng: &mut Rng, len: usize, max_pieces: usize) -> Vec<usize> {
    let n = 1 + rng.below(max_pieces as u64) as usize;
    let mut points: Vec<usize> = (1..n).map(|_| rng.below(len as u64) as usize).collect();
    points.push(0);
    points.push(len);
    points.sort_unstable();
    points.windows(2).map(|w| w[1] - w[0]).collect()
}

/// Writes `bytes` as a chain of readable buffers split at random points
/// (empty pieces included), direct or through an indirect table.
fn post_readable(h: &mut Harness, bytes: &[u8], indirect: bool) -> u16 {
    let lens = cut(h.arena.rng(), bytes.len(), 6);
    let mut descs = Vec::new();
    let mut at = 0;
    for n in lens {
        let addr = h.buffer(&bytes[at..at + n], n);
        descs.push(Desc::ro(addr, n));
        at += n;
    }
    if indirect {
        let table = h.arena.alloc(16 * descs.len()).unwrap();
        h.tx.push_indirect(&h.mem, table, &descs).unwrap()
    } else {
        h.tx.push_chain(&h.mem, &descs).unwrap()
    }
}

/// `frame` behind the driver's header (20 bytes with `hash`, else 12).
fn with_tx_header(hdr: &VirtioNetHdr, hash: bool, frame: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; HDR_LEN_HASH];
    let n = hdr.emit(&mut b, hash).unwrap();
    b.truncate(n);
    b.extend_from_slice(frame);
    b
}

#[test]
fn transmit_gathers_frames_from_scattered_and_indirect_buffers() {
    for (seed, hash) in [(10, false), (11, true)] {
        let features = if hash {
            all()
        } else {
            all() - Features::HASH_REPORT
        };
        let mut h = Harness::new(features, 256, Offloads::ALL, seed);
        let mut want = Vec::new();
        for k in 0..120u16 {
            // Plain frames up to the MTU, and TSO frames up to 64 KiB.
            let (hdr, frame) = if k % 5 == 4 {
                let len = 2000 + h.arena.rng().below(60_000) as usize;
                let flow = Flow {
                    dst_mac: DEV_MAC,
                    ..Flow::v4()
                };
                let f = tcp_frame(
                    &flow,
                    data_segment(1, 1, vnic_protocol::wire::tcp::Flags::ACK),
                    &IpFields::default(),
                    &vec![k as u8; len],
                )
                .unwrap();
                (VirtioNetHdr::tcp_tso(GsoType::TcpV4, 34, 54, 1448), f)
            } else {
                let len = 60 + h.arena.rng().below(1455) as usize;
                (VirtioNetHdr::default(), udp(len, 1000 + k))
            };
            let bytes = with_tx_header(&hdr, hash, &frame);
            post_readable(&mut h, &bytes, k % 3 == 0);
            want.push(frame);
            if h.tx.free() < 8 {
                h.worker_event(1).unwrap();
                while h.backend.take_resume(0) {
                    h.worker_event(h.backend.resume_event()).unwrap();
                }
                h.tx.used(&h.mem);
            }
        }
        h.worker_event(1).unwrap();
        while h.backend.take_resume(0) {
            h.worker_event(h.backend.resume_event()).unwrap();
        }
        let sent = h.up.sent();
        assert_eq!(sent.len(), want.len(), "{}", h.pf().stats.render());
        for (s, w) in sent.iter().zip(&want) {
            assert_eq!(&s[HDR_LEN..], &w[..], "the frame, byte for byte");
        }
        // Past the copied headers, payload goes from guest memory as it is.
        let kinds = h.up.lock().kinds.clone();
        assert!(kinds
            .iter()
            .zip(&want)
            .filter(|(_, w)| w.len() > super::chain::TX_PREFIX + 64)
            .all(|(k, _)| k.iter().any(|&g| g)));
        assert_eq!(h.up.lock().stray_pieces, 0);
        assert_eq!(h.pf().stats.tx[0].total_drops(), 0);
    }
}

/// A packed transmit ring: frames cut into up to six buffers, some behind
/// an indirect table, go round a 64-entry ring several times and reach
/// the uplink byte for byte; every buffer comes back used, the driver's
/// kicks are asked for again once the ring is empty, and the driver is
/// notified of the used buffers unless its area says not to.
#[test]
fn a_packed_transmit_ring_sends_every_frame_and_hands_each_buffer_back() {
    use super::packed::{EVENT_DISABLE, EVENT_ENABLE};
    use super::testing::PackedDriver;
    let features = (all() - Features::HASH_REPORT - Features::EVENT_IDX) | Features::RING_PACKED;
    let mut h = Harness::new(features, 64, Offloads::ALL, 21);
    let at = h.arena.alloc(64 * 16 + 8 + 16).unwrap();
    let at = GuestAddress(at.0.next_multiple_of(16));
    let mut d = PackedDriver::new(&h.mem, at, 64);
    h.pair[1] = d.vring(&h.atomic, false);
    let notes = |h: &Harness| {
        let s = &h.pf().stats.tx[0];
        (
            counter(&s.notifications),
            counter(&s.notifications_suppressed),
        )
    };
    let (mut want, mut used) = (Vec::new(), Vec::new());
    let mut id = 0u16;
    for k in 0..300u16 {
        let frame = udp(60 + h.arena.rng().below(1455) as usize, 1000 + k);
        let bytes = with_tx_header(&VirtioNetHdr::default(), false, &frame);
        let lens = cut(h.arena.rng(), bytes.len(), 6);
        let mut elems = Vec::new();
        let mut off = 0;
        for n in lens {
            let addr = h.buffer(&bytes[off..off + n], n);
            elems.push((addr.0, n as u32, false));
            off += n;
        }
        let pushed = if k % 4 == 3 {
            let table = h.arena.alloc(16 * elems.len()).unwrap();
            PackedDriver::write_table(&h.mem, table, &elems);
            let len = 16 * elems.len() as u32;
            d.push_flags(&h.mem, &[(table.0, len, super::packed::F_INDIRECT)], id)
        } else {
            d.push(&h.mem, &elems, id)
        };
        if pushed.is_none() {
            // The ring is full: the driver kicks and takes back what was
            // used; the frame goes again.
            h.worker_event(1).unwrap();
            h.settle().unwrap();
            used.extend(d.used(&h.mem));
            let again = if k % 4 == 3 {
                let table = h.arena.alloc(16 * elems.len()).unwrap();
                PackedDriver::write_table(&h.mem, table, &elems);
                let len = 16 * elems.len() as u32;
                d.push_flags(&h.mem, &[(table.0, len, super::packed::F_INDIRECT)], id)
            } else {
                d.push(&h.mem, &elems, id)
            };
            again.unwrap();
        }
        want.push((id, frame));
        id = (id + 1) % 64;
    }
    h.worker_event(1).unwrap();
    h.settle().unwrap();
    used.extend(d.used(&h.mem));
    let sent = h.up.sent();
    assert_eq!(sent.len(), want.len(), "{}", h.pf().stats.render());
    for (s, (_, w)) in sent.iter().zip(&want) {
        assert_eq!(&s[HDR_LEN..], &w[..], "the frame, byte for byte");
    }
    let ids: Vec<u16> = want.iter().map(|&(id, _)| id).collect();
    assert_eq!(used.iter().map(|&(id, _)| id).collect::<Vec<_>>(), ids);
    assert!(used.iter().all(|&(_, len)| len == 0));
    assert_eq!(h.pf().stats.tx[0].total_drops(), 0);
    assert_eq!(
        d.device_event_flags(&h.mem),
        EVENT_ENABLE,
        "kicks asked for again"
    );
    let (sent_notes, _) = notes(&h);
    assert!(sent_notes > 0);
    // With the driver's area at DISABLE, nothing is signalled.
    d.set_driver_event(&h.mem, EVENT_DISABLE, 0);
    let before = notes(&h);
    let bytes = with_tx_header(&VirtioNetHdr::default(), false, &udp(100, 9));
    let addr = h.buffer(&bytes, bytes.len());
    d.push(&h.mem, &[(addr.0, bytes.len() as u32, false)], 0)
        .unwrap();
    h.worker_event(1).unwrap();
    assert_eq!(d.used(&h.mem), vec![(0, 0)]);
    assert_eq!(notes(&h), (before.0, before.1 + 1));
}

/// A packed ring the device cannot resolve (its driver area only 2-byte
/// aligned, which a split ring's available ring may be) is counted and
/// left on both queues: nothing is read from it as a split ring, sent,
/// or written into it.
#[test]
fn an_unresolvable_packed_ring_is_counted_and_left() {
    use super::testing::PackedDriver;
    use vhost_user_backend::VringT;
    let features = (all() - Features::EVENT_IDX - Features::VNIC_TOE) | Features::RING_PACKED;
    let mut h = Harness::new(features, 8, Offloads::ALL, 23);
    let mut rings = Vec::new();
    for q in 0..2 {
        let at = h.arena.alloc(8 * 16 + 8 + 16).unwrap();
        let at = GuestAddress(at.0.next_multiple_of(16));
        let mut d = PackedDriver::new(&h.mem, at, 8);
        let v = d.vring(&h.atomic, false);
        let (desc, driver, device) = d.areas();
        v.set_queue_info(desc.0, driver.0 + 2, device.0).unwrap();
        h.pair[q] = v;
        // Read as a split ring, the device area's first word would be
        // the available index: one chain past the base.
        vm_memory::Bytes::write_obj(&h.mem, 0x8001u16, device).unwrap();
        let bytes = with_tx_header(&VirtioNetHdr::default(), false, &udp(100, 7));
        let addr = h.buffer(&bytes, 2048);
        d.push(&h.mem, &[(addr.0, 2048, q == 0)], 1).unwrap();
        rings.push(d);
    }
    let region = super::testing::REGION_A;
    let before = h.read(GuestAddress(region.0), region.1);
    h.up.push_rx(tap(&udp(100, 8)));
    h.worker_event(1).unwrap();
    h.worker_event(0).unwrap();
    h.settle().unwrap();
    assert!(h.up.sent().is_empty());
    assert_eq!(h.pf().stats.tx[0].drops(DropReason::BadRing), 1);
    assert!(
        h.pf().stats.rx[0].drops(DropReason::BadRing) >= 1,
        "{}",
        h.pf().stats.render()
    );
    assert_eq!(counter(&h.pf().stats.rx[0].packets), 0);
    let after = h.read(GuestAddress(region.0), region.1);
    let written = before.iter().zip(&after).position(|(a, b)| a != b);
    assert_eq!(written, None, "guest memory written at this offset");
    for d in &mut rings {
        assert!(d.used(&h.mem).is_empty());
    }
}

/// A packed ring whose list never ends is counted once per attempt, takes
/// nothing, and does not stop the worker.
#[test]
fn a_broken_packed_transmit_ring_is_counted_and_left() {
    use super::testing::PackedDriver;
    let features = (all() - Features::EVENT_IDX) | Features::RING_PACKED;
    let mut h = Harness::new(features, 8, Offloads::ALL, 22);
    let at = h.arena.alloc(8 * 16 + 8 + 16).unwrap();
    let at = GuestAddress(at.0.next_multiple_of(16));
    let mut d = PackedDriver::new(&h.mem, at, 8);
    h.pair[1] = d.vring(&h.atomic, false);
    let addr = h.buffer(&[0u8; 64], 64);
    d.push_flags(&h.mem, &[(addr.0, 64, super::packed::F_NEXT); 8], 0)
        .unwrap();
    h.worker_event(1).unwrap();
    h.settle().unwrap();
    assert!(h.up.sent().is_empty());
    assert_eq!(h.pf().stats.tx[0].drops(DropReason::BadRing), 1);
    assert!(d.used(&h.mem).is_empty());
}

/// Posts a chain made of `descs` exactly as given in table slots 0.. and
/// runs TX; returns the drop reasons counted.
fn tx_bad(h: &mut Harness, descs: &[Desc], head: u16) -> Vec<(DropReason, u64)> {
    let before: Vec<u64> = DropReason::ALL
        .iter()
        .map(|&r| h.pf().stats.tx[0].drops(r))
        .collect();
    h.tx.push_raw(&h.mem, descs, head);
    h.worker_event(1).unwrap();
    let used = h.tx.used(&h.mem);
    assert_eq!(used, vec![(u32::from(head), 0)], "the chain is given back");
    DropReason::ALL
        .iter()
        .zip(before)
        .map(|(&r, b)| (r, h.pf().stats.tx[0].drops(r) - b))
        .filter(|x| x.1 > 0)
        .collect()
}

#[test]
fn malformed_transmit_chains_are_counted_by_reason() {
    let mut h = Harness::new(all() - Features::HASH_REPORT, 16, Offloads::ALL, 12);
    let ok = with_tx_header(&VirtioNetHdr::default(), false, &udp(100, 7));
    let good = h.buffer(&ok, ok.len());
    let outside = GuestAddress(0x4000_0000);
    let hole = GuestAddress(super::testing::REGION_A.0 + super::testing::REGION_A.1 as u64 + 16);
    let cases: Vec<(&str, Vec<Desc>, DropReason)> = vec![
        (
            "outside guest memory",
            vec![Desc::ro(outside, 100)],
            DropReason::BadDescriptor,
        ),
        (
            "in the hole between regions",
            vec![Desc::ro(hole, 100)],
            DropReason::BadDescriptor,
        ),
        (
            "across the end of a region",
            vec![Desc::ro(
                GuestAddress(super::testing::REGION_A.0 + super::testing::REGION_A.1 as u64 - 50),
                100,
            )],
            DropReason::BadDescriptor,
        ),
        (
            "zero length",
            vec![Desc::ro(good, 0)],
            DropReason::ZeroLength,
        ),
        (
            "a loop",
            vec![
                Desc {
                    addr: good.0,
                    len: 20,
                    flags: F_NEXT,
                    next: 1,
                },
                Desc {
                    addr: good.0,
                    len: 20,
                    flags: F_NEXT,
                    next: 0,
                },
            ],
            DropReason::ChainTooLong,
        ),
        (
            "next past the table",
            vec![Desc {
                addr: good.0,
                len: 20,
                flags: F_NEXT,
                next: 99,
            }],
            DropReason::ChainTooLong,
        ),
        (
            "a writable buffer",
            vec![Desc::wo(good, ok.len())],
            DropReason::BadChainLayout,
        ),
        (
            "an invalid header",
            vec![Desc::ro(h.buffer(&[0xff; 80], 80), 80)],
            DropReason::BadHeader,
        ),
        (
            "an indirect table outside memory",
            vec![Desc {
                addr: outside.0,
                len: 32,
                flags: F_INDIRECT,
                next: 0,
            }],
            DropReason::BadDescriptor,
        ),
    ];
    for (what, descs, why) in cases {
        let got = tx_bad(&mut h, &descs, 0);
        assert_eq!(got, vec![(why, 1)], "{what}");
    }
    // A looping indirect table.
    let table = h.arena.alloc(32).unwrap();
    for (k, next) in [(0u64, 1u16), (1, 0)] {
        let d = Desc {
            addr: good.0,
            len: 20,
            flags: F_NEXT,
            next,
        };
        let _ = vm_memory::Bytes::write_slice(
            &h.mem,
            &[
                d.addr.to_le_bytes().as_slice(),
                &d.len.to_le_bytes(),
                &d.flags.to_le_bytes(),
                &d.next.to_le_bytes(),
            ]
            .concat(),
            GuestAddress(table.0 + 16 * k),
        );
    }
    let got = tx_bad(
        &mut h,
        &[Desc {
            addr: table.0,
            len: 32,
            flags: F_INDIRECT,
            next: 0,
        }],
        0,
    );
    assert_eq!(
        got,
        vec![(DropReason::ChainTooLong, 1)],
        "a looping indirect table"
    );
    // The queue still works.
    h.tx.push_chain(&h.mem, &[Desc::ro(good, ok.len())])
        .unwrap();
    h.worker_event(1).unwrap();
    assert_eq!(
        h.up.sent().last().map(|f| f[HDR_LEN..].to_vec()),
        Some(ok[HDR_LEN..].to_vec())
    );
}

/// RX buffers the test posted, by head: (address, length) of each.
type Posted = std::collections::HashMap<u16, Vec<(GuestAddress, usize)>>;

fn post_rx(h: &mut Harness, posted: &mut Posted, lens: &[usize], indirect: bool) {
    let mut descs = Vec::new();
    for &n in lens {
        let at = h.buffer(&vec![0xaa; n], n);
        descs.push(Desc::wo(at, n));
    }
    let head = if indirect {
        let table = h.arena.alloc(16 * descs.len()).unwrap();
        h.rx.push_indirect(&h.mem, table, &descs).unwrap()
    } else {
        h.rx.push_chain(&h.mem, &descs).unwrap()
    };
    posted.insert(
        head,
        descs
            .iter()
            .map(|d| (GuestAddress(d.addr), d.len as usize))
            .collect(),
    );
}

/// `base` without the TOE, MRG_RXBUF or HASH_REPORT where their flag is
/// off.
fn rx_features(base: Features, toe: bool, mergeable: bool, hash: bool) -> Features {
    let mut f = base;
    for (on, bit) in [
        (toe, Features::VNIC_TOE),
        (mergeable, Features::MRG_RXBUF),
        (hash, Features::HASH_REPORT),
    ] {
        if !on {
            f -= bit;
        }
    }
    f
}

/// The frames in used buffers `used` (head or buffer ID, length), in
/// order: each one's header (20 bytes with `hash`, else 12), whose
/// `num_buffers` with `mergeable` says how many buffers it spans, and
/// the frame after it; `bytes` reads a used buffer.
fn take_frames(
    used: &mut VecDeque<(u32, u32)>,
    hash: bool,
    mergeable: bool,
    bytes: impl Fn(u32, u32) -> Vec<u8>,
) -> Vec<(VirtioNetHdr, Vec<u8>)> {
    let hdr_len = if hash { HDR_LEN_HASH } else { HDR_LEN };
    let mut out = Vec::new();
    while let Some((head, len)) = used.pop_front() {
        let mut b = bytes(head, len);
        let hdr = VirtioNetHdr::parse(&b, hash).unwrap();
        let nb = if mergeable { hdr.num_buffers } else { 1 };
        for _ in 1..nb {
            let (h2, l2) = used.pop_front().expect("the frame's other buffers");
            b.extend_from_slice(&bytes(h2, l2));
        }
        out.push((hdr, b.split_off(hdr_len)));
    }
    out
}

/// The bytes the device wrote into a used chain.
fn used_bytes(h: &Harness, posted: &Posted, head: u32, len: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut left = len as usize;
    for &(at, n) in &posted[&(head as u16)] {
        let k = n.min(left);
        out.extend_from_slice(&h.read(at, k));
        left -= k;
    }
    assert_eq!(left, 0, "used length within the chain");
    out
}

#[test]
fn receive_writes_frames_into_scattered_buffers_with_and_without_mergeable_and_hash() {
    // Without the TOE the uplink's frames are read straight into the
    // driver's buffers (in bursts while each lands whole in one); with
    // it they pass the engine first and are copied in.
    // `whole`: one-descriptor buffers that each hold any frame.
    for (seed, mergeable, hash, toe, whole) in [
        (20, true, true, true, false),
        (21, true, false, true, false),
        (22, false, true, true, false),
        (23, false, false, true, false),
        (120, true, true, false, false),
        (121, true, false, false, false),
        (122, false, true, false, false),
        (123, false, false, false, false),
        (124, true, true, false, true),
        (125, false, false, false, true),
    ] {
        let features = rx_features(all(), toe, mergeable, hash);
        let hdr_len = if hash { HDR_LEN_HASH } else { HDR_LEN };
        let mut h = Harness::new(features, 256, Offloads::ALL, seed);
        let mut posted = Posted::new();
        let mut frames = Vec::new();
        for k in 0..60u16 {
            let len = 60 + h.arena.rng().below(1455) as usize;
            let f = udp(len, 2000 + k);
            h.up.push_rx(tap(&f));
            frames.push(f);
        }
        // Buffers: with MRG_RXBUF many small one-descriptor chains;
        // without, chains of several descriptors that hold a whole frame,
        // some indirect.
        while h.rx.free() > 8 {
            if whole {
                post_rx(&mut h, &mut posted, &[2048], false);
            } else if mergeable {
                let n = 256 + h.arena.rng().below(900) as usize;
                post_rx(&mut h, &mut posted, &[n], false);
            } else {
                let lens = [hdr_len + 10, 700, 900];
                let indirect = h.arena.rng().below(2) == 0;
                post_rx(&mut h, &mut posted, &lens, indirect);
            }
        }
        let mut got = Vec::new();
        let mut used = VecDeque::new();
        for _ in 0..100 {
            h.worker_event(0).unwrap();
            used.extend(h.rx.used(&h.mem));
            got.extend(take_frames(&mut used, hash, mergeable, |head, len| {
                used_bytes(&h, &posted, head, len)
            }));
            if got.len() == frames.len() {
                break;
            }
            while h.rx.free() > 8 {
                post_rx(&mut h, &mut posted, &[2048], false);
            }
        }
        assert_eq!(got.len(), frames.len(), "{}", h.pf().stats.render());
        for ((hdr, f), want) in got.iter().zip(&frames) {
            assert_eq!(f, want, "mergeable {mergeable} hash {hash}");
            if hash {
                let s = h.nic.steer(0, want);
                assert_eq!(hdr.hash_value, s.hash);
                assert_eq!(hdr.hash_report, 3, "UDPv4");
                assert_ne!(hdr.hash_value, 0);
            }
        }
        assert_eq!(h.up.lock().stray_pieces, 0);
        // Every frame counted once, whether it came in a burst of whole
        // frames or alone.
        assert_rx_counted(&h, &frames, toe);
    }
}

/// RX queue 0 counted no drops, every frame of `frames` once with its
/// bytes, and frames read straight into the driver's buffers exactly
/// when the TOE was off.
fn assert_rx_counted(h: &Harness, frames: &[Vec<u8>], toe: bool) {
    let rx0 = &h.pf().stats.rx[0];
    assert_eq!(rx0.total_drops(), 0, "{}", h.pf().stats.render());
    assert_eq!(counter(&rx0.packets), frames.len() as u64);
    let bytes: usize = frames.iter().map(Vec::len).sum();
    assert_eq!(counter(&rx0.bytes), bytes as u64);
    assert_eq!(counter(&rx0.direct) > 0, !toe, "{}", h.pf().stats.render());
}

/// A packed receive ring, with and without MRG_RXBUF, the hash and the
/// TOE: frames from the uplink land byte for byte behind their header in
/// the driver's lists (one buffer per frame, or a frame over several small
/// ones), go round a 64-entry ring several times as the driver reposts,
/// and the counters agree. A frame that finds no buffer waits for one.
#[test]
fn a_packed_receive_ring_delivers_every_frame_whole() {
    use super::testing::PackedDriver;
    // Without the TOE frames are read straight into the driver's lists;
    // with it they pass the engine and are copied in (`write`).
    for (seed, mergeable, hash, toe) in [
        (30, true, true, false),
        (31, true, false, false),
        (32, false, false, false),
        (33, true, true, true),
        (34, false, false, true),
    ] {
        let features = rx_features(
            (all() - Features::EVENT_IDX) | Features::RING_PACKED,
            toe,
            mergeable,
            hash,
        );
        let hdr_len = if hash { HDR_LEN_HASH } else { HDR_LEN };
        let mut h = Harness::new(features, 64, Offloads::ALL, seed);
        let at = h.arena.alloc(64 * 16 + 8 + 16).unwrap();
        let at = GuestAddress(at.0.next_multiple_of(16));
        let mut d = PackedDriver::new(&h.mem, at, 64);
        h.pair[0] = d.vring(&h.atomic, false);
        let mut frames = Vec::new();
        for k in 0..200u16 {
            let len = 60 + h.arena.rng().below(1455) as usize;
            let f = udp(len, 3000 + k);
            h.up.push_rx(tap(&f));
            frames.push(f);
        }
        // Buffers by ID: with MRG_RXBUF small ones, a frame over one to
        // six; without, lists of three that hold a frame, some indirect.
        let mut posted: std::collections::HashMap<u16, Vec<(GuestAddress, usize)>> =
            std::collections::HashMap::new();
        let mut next_id = 0u16;
        let mut post =
            |h: &mut Harness,
             d: &mut PackedDriver,
             posted: &mut std::collections::HashMap<u16, Vec<(GuestAddress, usize)>>| loop {
                let id = next_id;
                let lens: Vec<usize> = if mergeable {
                    vec![256 + h.arena.rng().below(200) as usize]
                } else {
                    vec![hdr_len + 10, 700, 900]
                };
                let bufs: Vec<(GuestAddress, usize)> = lens
                    .iter()
                    .map(|&n| (h.buffer(&vec![0xaa; n], n), n))
                    .collect();
                let elems: Vec<(u64, u32, bool)> =
                    bufs.iter().map(|&(a, n)| (a.0, n as u32, true)).collect();
                let ok = if !mergeable && id % 2 == 1 {
                    let table = h.arena.alloc(16 * elems.len()).unwrap();
                    PackedDriver::write_table(&h.mem, table, &elems);
                    let len = 16 * elems.len() as u32;
                    d.push_flags(&h.mem, &[(table.0, len, super::packed::F_INDIRECT)], id)
                } else {
                    d.push(&h.mem, &elems, id)
                };
                if ok.is_none() {
                    return;
                }
                posted.insert(id, bufs);
                next_id = (next_id + 1) % 64;
            };
        let mut got = Vec::new();
        let mut used = VecDeque::new();
        for _ in 0..200 {
            post(&mut h, &mut d, &mut posted);
            h.worker_event(0).unwrap();
            h.settle().unwrap();
            used.extend(
                d.used(&h.mem)
                    .into_iter()
                    .map(|(id, len)| (u32::from(id), len)),
            );
            got.extend(take_frames(&mut used, hash, mergeable, |id, len| {
                used_bytes(&h, &posted, id, len)
            }));
            if got.len() == frames.len() {
                break;
            }
        }
        assert_eq!(got.len(), frames.len(), "{}", h.pf().stats.render());
        for ((hdr, f), want) in got.iter().zip(&frames) {
            assert_eq!(f, want, "mergeable {mergeable} hash {hash}");
            if hash {
                assert_eq!(hdr.hash_value, h.nic.steer(0, want).hash);
            }
        }
        assert_rx_counted(&h, &frames, toe);
    }
}

#[test]
fn a_gso_frame_spills_into_further_mergeable_buffers() {
    let mut h = harness(24);
    // As a TAP with TSO hands it over: 30000 bytes of TCP.
    let flow = Flow {
        dst_mac: DEV_MAC,
        ..Flow::v4()
    };
    let f = tcp_frame(
        &flow,
        data_segment(1, 1, vnic_protocol::wire::tcp::Flags::ACK),
        &IpFields::default(),
        &(0..30_000u32).map(|i| i as u8).collect::<Vec<_>>(),
    )
    .unwrap();
    let vh = VirtioNetHdr {
        gso_type: GsoType::TcpV4 as u8,
        gso_size: 1448,
        hdr_len: 54,
        ..Default::default()
    };
    let mut tap = vec![0u8; HDR_LEN];
    vh.emit(&mut tap, false).unwrap();
    tap.extend_from_slice(&f);
    h.up.push_rx(tap);
    let mut posted = Posted::new();
    while h.rx.free() > 0 {
        post_rx(&mut h, &mut posted, &[1536], false);
    }
    h.worker_event(0).unwrap();
    let used = h.rx.used(&h.mem);
    let mut b = Vec::new();
    for &(head, len) in &used {
        b.extend_from_slice(&used_bytes(&h, &posted, head, len));
    }
    let hdr = VirtioNetHdr::parse(&b, true).unwrap();
    assert_eq!(usize::from(hdr.num_buffers), used.len());
    assert_eq!(used.len(), (HDR_LEN_HASH + f.len()).div_ceil(1536));
    assert_eq!(hdr.gso_type, GsoType::TcpV4 as u8);
    assert_eq!(&b[HDR_LEN_HASH..], &f[..]);
}

#[test]
fn malformed_receive_chains_are_counted_and_given_back() {
    let mut h = Harness::new(all() - Features::MRG_RXBUF, 16, Offloads::ALL, 25);
    let good = h.arena.alloc(2048).unwrap();
    let outside = GuestAddress(0x4000_0000);
    let cases: Vec<(&str, Vec<Desc>, DropReason)> = vec![
        (
            "a readable buffer",
            vec![Desc::ro(good, 2048)],
            DropReason::BadChainLayout,
        ),
        (
            "outside guest memory",
            vec![Desc::wo(outside, 2048)],
            DropReason::BadDescriptor,
        ),
        (
            "a first buffer shorter than the header",
            vec![Desc::wo(good, 4)],
            DropReason::RxChainTooSmall,
        ),
        (
            "too small for the frame",
            vec![Desc::wo(good, 100)],
            DropReason::RxChainTooSmall,
        ),
        (
            "a loop",
            vec![
                Desc {
                    addr: good.0,
                    len: 20,
                    flags: F_WRITE | F_NEXT,
                    next: 1,
                },
                Desc {
                    addr: good.0 + 20,
                    len: 20,
                    flags: F_WRITE | F_NEXT,
                    next: 0,
                },
            ],
            DropReason::ChainTooLong,
        ),
    ];
    for (what, descs, why) in cases {
        let before = h.pf().stats.rx[0].drops(why);
        h.up.push_rx(tap(&udp(1000, 9)));
        h.rx.push_raw(&h.mem, &descs, 0);
        h.worker_event(0).unwrap();
        h.settle().unwrap();
        let used = h.rx.used(&h.mem);
        assert_eq!(used.len(), 1, "{what}: given back");
        assert_eq!(used[0].1, 0, "{what}: nothing written");
        assert_eq!(
            h.pf().stats.rx[0].drops(why),
            before + 1,
            "{what}: {}",
            h.pf().stats.render()
        );
        // The frame itself waits (in the uplink or the backlog) for
        // buffers that work; dropped here before the next case.
        h.up.lock().to_receive.clear();
        h.pf().backlogs[0].clear();
    }
    // Zero-length buffers are skipped, not written.
    let f = udp(200, 9);
    h.up.push_rx(tap(&f));
    let mut posted = Posted::new();
    post_rx(
        &mut h,
        &mut posted,
        &[0, HDR_LEN_HASH + 100, 0, 2048],
        false,
    );
    h.worker_event(0).unwrap();
    let used = h.rx.used(&h.mem);
    assert_eq!(used.len(), 1);
    let b = used_bytes(&h, &posted, used[0].0, used[0].1);
    assert_eq!(&b[HDR_LEN_HASH..], &f[..]);
}

#[test]
fn malformed_control_chains_are_counted() {
    let mut h = harness(26);
    let cmd = bytes(&CtrlCommand::Rx {
        mode: RxMode::Promisc,
        on: true,
    });
    let c = h.buffer(&cmd, cmd.len());
    let a = h.buffer(&[0xee], 1);
    let outside = GuestAddress(0x4000_0000);
    let cases: Vec<(&str, Vec<Desc>, DropReason)> = vec![
        (
            "readable after writable",
            vec![Desc::wo(a, 1), Desc::ro(c, cmd.len())],
            DropReason::BadChainLayout,
        ),
        (
            "readable outside memory",
            vec![Desc::ro(outside, 2), Desc::wo(a, 1)],
            DropReason::BadDescriptor,
        ),
        (
            "writable outside memory",
            vec![Desc::ro(c, cmd.len()), Desc::wo(outside, 1)],
            DropReason::BadDescriptor,
        ),
        (
            "readable part too large",
            vec![Desc::ro(c, 70_000), Desc::wo(a, 1)],
            DropReason::Oversized,
        ),
    ];
    for (what, descs, why) in cases {
        let before = h.pf().stats.ctrl.drops(why);
        h.ctrl.push_chain(&h.mem, &descs).unwrap();
        h.ctrl_event(0).unwrap();
        let used = h.ctrl.used(&h.mem);
        assert_eq!(used.len(), 1, "{what}");
        assert_eq!(used[0].1, 0, "{what}");
        assert_eq!(h.pf().stats.ctrl.drops(why), before + 1, "{what}");
    }
    assert!(!h.pf().ctrl_state().filter.promisc);
    // Through an indirect table, with the ack in its own buffer: applied.
    let table = h.arena.alloc(32).unwrap();
    h.ctrl
        .push_indirect(&h.mem, table, &[Desc::ro(c, cmd.len()), Desc::wo(a, 1)])
        .unwrap();
    h.ctrl_event(0).unwrap();
    assert_eq!(h.ctrl.used(&h.mem)[0].1, 1);
    assert_eq!(h.read(a, 1), [ACK_OK]);
    assert!(h.pf().ctrl_state().filter.promisc);
}

#[test]
fn a_head_past_the_queue_is_counted_and_passed_over() {
    let mut h = harness(27);
    let ok = with_tx_header(&VirtioNetHdr::default(), true, &udp(100, 7));
    let good = h.buffer(&ok, ok.len());
    // The available ring names descriptor 300 of a 256-entry queue: it
    // has no used entry to give back, so it is passed over and counted.
    h.tx.publish(&h.mem, 300);
    h.tx.push_chain(&h.mem, &[Desc::ro(good, ok.len())])
        .unwrap();
    h.worker_event(1).unwrap();
    let used = h.tx.used(&h.mem);
    assert_eq!(used.len(), 1);
    assert!(used[0].0 < 256);
    assert_eq!(h.pf().stats.tx[0].drops(DropReason::BadRing), 1);
    assert_eq!(h.up.sent().len(), 1);
    // The same on RX and on the control queue.
    h.rx.publish(&h.mem, 0xffff);
    h.up.push_rx(tap(&udp(100, 8)));
    let mut posted = Posted::new();
    post_rx(&mut h, &mut posted, &[2048], false);
    h.worker_event(0).unwrap();
    assert_eq!(h.rx.used(&h.mem).len(), 1);
    assert_eq!(h.pf().stats.rx[0].drops(DropReason::BadRing), 1);
    h.ctrl.publish(&h.mem, 256);
    h.ctrl_event(0).unwrap();
    assert_eq!(h.pf().stats.ctrl.drops(DropReason::BadRing), 1);
}

#[test]
fn a_used_ring_outside_guest_memory_does_not_end_the_worker() {
    use vhost_user_backend::VringT;
    let mut h = harness(28);
    let ok = with_tx_header(&VirtioNetHdr::default(), true, &udp(100, 7));
    let good = h.buffer(&ok, ok.len());
    h.tx.push_chain(&h.mem, &[Desc::ro(good, ok.len())])
        .unwrap();
    // The driver put the TX used ring where there is no memory.
    h.pair[1]
        .set_queue_info(h.tx.desc.0, h.tx.avail.0, 0x4000_0000)
        .unwrap();
    h.worker_event(1).unwrap();
    assert_eq!(h.pf().stats.tx[0].drops(DropReason::BadRing), 1);
    // The worker's other queue still works.
    h.up.push_rx(tap(&udp(100, 8)));
    let mut posted = Posted::new();
    post_rx(&mut h, &mut posted, &[2048], false);
    h.worker_event(0).unwrap();
    assert_eq!(h.rx.used(&h.mem).len(), 1);
}

#[test]
fn an_avail_index_that_runs_ahead_stops_the_queue_without_spinning() {
    for event_idx in [true, false] {
        let features = if event_idx {
            all()
        } else {
            all() - Features::EVENT_IDX
        };
        let mut h = Harness::new(features, 16, Offloads::ALL, 29);
        // 17 heads on a 16-entry ring: the index is a queue ahead of the
        // device, which virtio-queue refuses to walk.
        for _ in 0..17 {
            h.tx.publish(&h.mem, 0);
        }
        // Returns (it used to go round forever) and counts the stuck ring.
        h.worker_event(1).unwrap();
        assert_eq!(h.pf().stats.tx[0].drops(DropReason::BadRing), 1);
        for _ in 0..17 {
            h.ctrl.publish(&h.mem, 0);
        }
        h.ctrl_event(0).unwrap();
        assert_eq!(h.pf().stats.ctrl.drops(DropReason::BadRing), 1);
    }
}

#[test]
fn a_queue_stopped_with_chains_announced_does_not_spin() {
    use vhost_user_backend::VringT;
    let mut h = harness(30);
    let ok = with_tx_header(&VirtioNetHdr::default(), true, &udp(100, 7));
    let good = h.buffer(&ok, ok.len());
    h.tx.push_chain(&h.mem, &[Desc::ro(good, ok.len())])
        .unwrap();
    // The frontend stopped the queue (GET_VRING_BASE) with the chain
    // announced: nothing pops, yet the avail index says one waits.
    h.pair[1].set_queue_ready(false);
    h.worker_event(1).unwrap();
    assert_eq!(h.pf().stats.tx[0].drops(DropReason::BadRing), 1);
    // A resume left over from before is not even looked at.
    h.worker_event(h.backend.resume_event()).unwrap();
    assert_eq!(h.pf().stats.tx[0].drops(DropReason::BadRing), 1);
    assert!(h.up.sent().is_empty());
    h.ctrl.publish(&h.mem, 0);
    h.ctrl_vring[0].set_queue_ready(false);
    h.ctrl_event(0).unwrap();
    assert_eq!(h.pf().stats.ctrl.drops(DropReason::BadRing), 1);
}

#[test]
fn buffers_put_back_past_a_bad_head_are_not_lost() {
    let mut h = harness(31);
    let mut posted = Posted::new();
    // A buffer too small for the frame alone, then a head past the queue.
    post_rx(&mut h, &mut posted, &[600], false);
    let small = *posted.keys().next().unwrap();
    h.rx.publish(&h.mem, 999);
    let f = udp(1400, 3);
    h.up.push_rx(tap(&f));
    h.worker_event(0).unwrap();
    h.settle().unwrap();
    assert!(h.rx.used(&h.mem).is_empty(), "the frame waits for buffers");
    // More buffers: the frame goes into the small one and the next, and
    // the small one is not lost behind the bad head.
    post_rx(&mut h, &mut posted, &[2048], false);
    h.worker_event(0).unwrap();
    h.settle().unwrap();
    let used = h.rx.used(&h.mem);
    assert_eq!(used.len(), 2, "{used:?}");
    assert_eq!(used[0].0, u32::from(small));
    let mut b = used_bytes(&h, &posted, used[0].0, used[0].1);
    b.extend_from_slice(&used_bytes(&h, &posted, used[1].0, used[1].1));
    assert_eq!(&b[HDR_LEN_HASH..], &f[..]);
}

#[test]
fn a_chain_of_more_pieces_than_a_write_takes_is_sent_in_order() {
    let mut h = Harness::new(all() - Features::HASH_REPORT, 256, Offloads::ALL, 32);
    let bytes = with_tx_header(&VirtioNetHdr::default(), false, &udp(1400, 9));
    // 100 pieces: the header and prefix copied, 60 left in guest memory,
    // the rest copied after them.
    let n = 100;
    let per = bytes.len().div_ceil(n);
    let mut descs = Vec::new();
    for c in bytes.chunks(per) {
        descs.push(Desc::ro(h.buffer(c, c.len()), c.len()));
    }
    assert!(descs.len() > crate::uplink::MAX_PIECES);
    h.tx.push_chain(&h.mem, &descs).unwrap();
    h.worker_event(1).unwrap();
    assert_eq!(
        h.pf().stats.tx[0].total_drops(),
        0,
        "{}",
        h.pf().stats.render()
    );
    assert_eq!(&h.up.sent()[0][HDR_LEN..], &bytes[HDR_LEN..]);
}

fn counter(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(std::sync::atomic::Ordering::Relaxed)
}

/// Coalescing on TX: notifications wait for `max_packets` chains or for
/// `max_usecs`, the timer sends what is due, and a command that makes
/// held work due sends it at once.
#[test]
fn transmit_notifications_are_held_as_coalescing_says() {
    for event_idx in [false, true] {
        let features = if event_idx {
            all()
        } else {
            all() - Features::EVENT_IDX
        };
        let mut h = Harness::new(features, 256, Offloads::ALL, 11);
        // Notifications sent, or not wanted by the driver (EVENT_IDX's
        // used_event), and batches held.
        let tx = |h: &Harness| {
            let s = &h.pf().stats.tx[0];
            (
                counter(&s.notifications) + counter(&s.notifications_suppressed),
                counter(&s.held),
            )
        };
        let set = |h: &mut Harness, max_packets, max_usecs| {
            let cmd = bytes(&CtrlCommand::CoalTxSet(Coal {
                max_packets,
                max_usecs,
            }));
            let ((_, n), outs) = ctrl(h, &cmd, &[1]);
            assert_eq!(n, 1);
            assert_eq!(h.read(outs[0], 1), [ACK_OK]);
        };
        // Off: one notification per batch.
        post_tx(&mut h, 3, 60);
        h.worker_event(1).unwrap();
        assert_eq!(tx(&h), (1, 0));
        // Eight chains or a second: five are held, three more send it.
        set(&mut h, 8, 1_000_000);
        post_tx(&mut h, 5, 60);
        h.worker_event(1).unwrap();
        assert_eq!(h.tx.used(&h.mem).len(), 8, "the chains are used at once");
        assert_eq!(tx(&h), (1, 1));
        post_tx(&mut h, 3, 60);
        h.worker_event(1).unwrap();
        assert_eq!(tx(&h), (2, 1));
        let s = &h.pf().stats.tx[0];
        assert_eq!(counter(&s.flush_packets), 1);
        // Then 200 µs: held until the timer fires.
        set(&mut h, 64, 200);
        post_tx(&mut h, 1, 60);
        h.worker_event(1).unwrap();
        assert_eq!(tx(&h), (2, 2));
        h.worker_event(h.backend.coalesce_event()).unwrap();
        assert_eq!(tx(&h), (2, 2), "early: still held");
        std::thread::sleep(std::time::Duration::from_micros(300));
        h.worker_event(h.backend.coalesce_event()).unwrap();
        assert_eq!(tx(&h), (3, 2));
        let s = &h.pf().stats.tx[0];
        assert_eq!(counter(&s.flush_timer), 1);
        assert!(counter(&s.hold_max_ns) >= 200_000);
        // Held, then a VQ_SET that makes it due: it goes at the next
        // timer event, which the command armed to fire at once.
        post_tx(&mut h, 2, 60);
        h.worker_event(1).unwrap();
        assert_eq!(tx(&h), (3, 3));
        let cmd = bytes(&CtrlCommand::CoalVqSet {
            vq_index: 1,
            coal: Coal {
                max_packets: 2,
                max_usecs: 1_000_000,
            },
        });
        ctrl(&mut h, &cmd, &[1]);
        h.worker_event(h.backend.coalesce_event()).unwrap();
        assert_eq!(tx(&h), (4, 3));
    }
}

/// An RX queue out of buffers does not hold its notification: the
/// driver must see what was used to post more.
#[test]
fn a_starved_receive_queue_notifies_at_once() {
    let mut h = harness(12);
    h.nic
        .set_coalescing(0, None, &[("rx-frames", "64"), ("rx-usecs", "100000")])
        .unwrap();
    let rx = |h: &Harness| {
        let s = &h.pf().stats.rx[0];
        counter(&s.notifications) + counter(&s.notifications_suppressed)
    };
    // Two buffers, one frame: held.
    for _ in 0..2 {
        let b = h.arena.alloc(2048).unwrap();
        h.rx.push_chain(&h.mem, &[Desc::wo(b, 2048)]).unwrap();
    }
    h.up.push_rx(uplink_frame(100));
    h.worker_event(h.backend.backlog_event()).unwrap();
    assert_eq!(h.rx.used(&h.mem).len(), 1);
    assert_eq!(rx(&h), 0);
    // Two frames for one buffer: the second waits, and the driver is
    // told of the first at once.
    h.up.push_rx(uplink_frame(100));
    h.up.push_rx(uplink_frame(100));
    h.worker_event(h.backend.backlog_event()).unwrap();
    assert_eq!(h.rx.used(&h.mem).len(), 1);
    assert_eq!(rx(&h), 1);
    assert_eq!(counter(&h.pf().stats.rx[0].flush_starved), 1);
}

/// Receive segment coalescing on the real RX path: MSS-sized segments of
/// one flow from the uplink reach the driver as one GSO frame, with
/// RSC_EXT's segment count, and byte for byte the frame they were cut
/// from; with rx-gro-hw off, or the driver's TSO turned off by
/// GUEST_OFFLOADS_SET, they arrive one by one.
#[test]
fn received_segments_are_coalesced_into_one_gso_frame() {
    use vnic_protocol::offload::Segmenter;
    for (ext, on, guest_tso) in [
        (true, true, true),
        (false, true, true),
        (false, false, true),
        (false, true, false),
    ] {
        let mut features = all();
        if !ext {
            features -= Features::RSC_EXT;
        }
        let mut h = Harness::new(features, 256, Offloads::ALL, 30);
        if on {
            h.nic.set_offload(0, "rx-gro-hw", "on").unwrap();
        }
        if !guest_tso {
            let cmd = bytes(&CtrlCommand::GuestOffloadsSet(Features::GUEST_CSUM.bits()));
            let (_, outs) = ctrl(&mut h, &cmd, &[1]);
            assert_eq!(h.read(outs[0], 1), [ACK_OK]);
        }
        let flow = Flow {
            dst_mac: DEV_MAC,
            ..Flow::v4()
        };
        let payload: Vec<u8> = (0..1448 * 6 + 500).map(|i| (i % 249) as u8).collect();
        let sup = tcp_frame(
            &flow,
            data_segment(7, 9, vnic_protocol::wire::tcp::Flags::ACK),
            &IpFields::default(),
            &payload,
        )
        .unwrap();
        let info = vnic_protocol::wire::parse_frame(&sup).unwrap();
        let mut segs = Vec::new();
        Segmenter::new()
            .segment_parsed(&sup, &info, 1448, &mut |hd, p| {
                segs.push(tap(&[hd, p].concat()));
            })
            .unwrap();
        assert_eq!(segs.len(), 7);
        for s in &segs {
            h.up.push_rx(s.clone());
        }
        let mut posted = Posted::new();
        while h.rx.free() > 0 {
            post_rx(&mut h, &mut posted, &[1536], false);
        }
        h.worker_event(h.backend.backlog_event()).unwrap();
        let mut used: VecDeque<(u32, u32)> = h.rx.used(&h.mem).into();
        let frames = take_frames(&mut used, true, true, |head, len| {
            used_bytes(&h, &posted, head, len)
        });
        let st = &h.pf().stats.rx[0];
        let merged = st.rsc_merged.load(std::sync::atomic::Ordering::Relaxed);
        if on && guest_tso {
            assert_eq!(frames.len(), 1, "ext {ext}");
            let (hdr, f) = &frames[0];
            assert_eq!(f, &sup);
            assert_eq!(hdr.gso_type, GsoType::TcpV4 as u8);
            assert_eq!(hdr.gso_size, 1448);
            assert!(hdr.flags.contains(HdrFlags::DATA_VALID));
            assert_eq!(hdr.flags.contains(HdrFlags::RSC_INFO), ext);
            assert_eq!(hdr.rsc_segments(), if ext { 7 } else { 0 });
            assert_eq!(merged, 7);
            // The short last segment ended the flow.
            assert_eq!(
                st.rsc_flush_rule.load(std::sync::atomic::Ordering::Relaxed),
                1
            );
        } else {
            assert_eq!(frames.len(), 7, "on {on} tso {guest_tso}");
            for ((hdr, f), s) in frames.iter().zip(&segs) {
                assert_eq!(f[..], s[HDR_LEN..]);
                assert_eq!(hdr.gso_type, GsoType::None as u8);
            }
            assert_eq!(merged, 0);
        }
        assert_eq!(st.total_drops(), 0);
    }
}

#[test]
fn pairs_share_worker_threads_round_robin_and_events_find_their_pair() {
    use vhost_user_backend::VhostUserBackend;
    use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

    use super::{worker_threads, Ev, VnicBackend, Work};

    let mut cfg = crate::nic::tests::config(5);
    cfg.workers = 2;
    let up = crate::nic::tests::FakeUplink::with_offloads(Offloads::ALL);
    let nic = std::sync::Arc::new(crate::nic::Nic::single(cfg, Box::new(up)).unwrap());
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    let b = VnicBackend::new(nic, 0, GuestMemoryAtomic::new(mem)).unwrap();
    // Thread 0: pairs 0, 2, 4; thread 1: pairs 1, 3; then the control
    // queue (virtqueue 10) and the TOE's command and event queues (11, 12).
    assert_eq!(
        b.queues_per_thread(),
        vec![0b11_0011_0011, 0b1100_1100, 0b111 << 10]
    );
    // Kicks name a vring among the thread's; the backend's own events a
    // slot, every id above the queues and the exit event (13).
    assert_eq!(b.event_of(3, 6, 0), Some((2, Work::Tx)));
    assert_eq!(b.event_of(0, 4, 1), Some((1, Work::Rx)));
    assert_eq!(
        b.event_of(b.slot_event(2, Ev::Backlog), 6, 0),
        Some((4, Work::Backlog))
    );
    assert_eq!(
        b.event_of(b.slot_event(1, Ev::Timer), 4, 1),
        Some((3, Work::Timer))
    );
    assert_eq!(
        b.event_of(b.slot_event(0, Ev::Coalesce), 4, 1),
        Some((1, Work::Coalesce))
    );
    assert_eq!(
        b.event_of(b.slot_event(2, Ev::Resume), 4, 1),
        None,
        "no pair 5"
    );
    assert_eq!(b.event_of(0, 1, 2), None, "the control thread");
    assert_eq!(b.num_queues(), 13);
    assert!(b.slot_event(0, Ev::Uplink) > 13);
    let mut ids: Vec<u16> = (0..3)
        .flat_map(|slot| {
            [Ev::Uplink, Ev::Backlog, Ev::Resume, Ev::Timer, Ev::Coalesce]
                .map(|e| b.slot_event(slot, e))
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 15, "ids of different slots never meet");
    // One thread per pair up to the CPUs, or as asked, within 1..=pairs.
    assert_eq!(worker_threads(3, 8), 3);
    assert_eq!(worker_threads(16, 2), 2);
    assert!((1..=4).contains(&worker_threads(4, 0)));
    assert_eq!(worker_threads(1, 0), 1);
}

#[test]
fn one_descriptor_is_gathered_as_the_walk_gathers_it() {
    use virtio_queue::desc::split::Descriptor;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::{
        chain::{gather_one, gather_tx, TX_PREFIX},
        split::Regions,
    };

    // One region at 0x1000 of 0x30000 bytes, with a pattern in it.
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x1000), 0x30000)]).unwrap();
    let pattern: Vec<u8> = (0..0x30000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    mem.write_slice(&pattern, GuestAddress(0x1000)).unwrap();
    let max = crate::nic::MAX_FRAME + vnic_protocol::virtio::hdr::HDR_LEN_HASH;
    // (address, length, flags): in memory, short and long, empty, past
    // the region's end, write-only, naming a next one, over the largest
    // frame.
    let cases = [
        (0x1000u64, 76u32, 0u16),
        (0x1040, 12, 0),
        (0x2000, 1514, 0),
        (0x1000, (12 + TX_PREFIX) as u32, 0),
        (0x1000, (13 + TX_PREFIX) as u32, 0),
        (0x1000, 0, 0),
        (0x30f00, 0x200, 0),
        (0x31000, 64, 0),
        (0x1000, 64, 2),
        (0x1000, 64, 1),
        (0x1000, max as u32 + 1, 0),
        (0x1000, 0x20000, 0),
        (u64::MAX - 8, 64, 0),
    ];
    let mut seen = Vec::new();
    for hdr_len in [12, 20] {
        for (addr, len, flags) in cases {
            let d = Descriptor::new(addr, len, flags, 0);
            let (mut h1, mut r1, mut t1) = (Vec::new(), Vec::new(), Vec::new());
            let (mut h2, mut r2, mut t2) = (Vec::new(), Vec::new(), Vec::new());
            let a = gather_tx(
                &mut Regions::new(&mem),
                [d],
                hdr_len,
                &mut h1,
                &mut r1,
                &mut t1,
            );
            let b = gather_one(
                &mut Regions::new(&mem),
                d,
                hdr_len,
                &mut h2,
                &mut r2,
                &mut t2,
            );
            let what = format!("{addr:#x}+{len} flags {flags} header {hdr_len}");
            assert_eq!(a, b, "{what}");
            if let Ok(n) = a {
                assert_eq!(h1[..n], h2[..n], "{what}");
                assert_eq!(r1, r2, "{what}");
                assert_eq!(t1, t2, "{what}");
            }
            seen.push((a, r1.len()));
        }
    }
    // Every way out was taken: whole in the prefix, a rest left in guest
    // memory, and each reason a lone descriptor is dropped for.
    use DropReason::*;
    for want in [
        (Ok(76), 0),
        (Ok(12 + TX_PREFIX), 1),
        (Err(BadChainLayout), 0),
        (Err(ChainTooLong), 0),
        (Err(Oversized), 0),
        (Err(BadDescriptor), 0),
    ] {
        assert!(seen.contains(&want), "{want:?} not among {seen:?}");
    }
}

#[test]
fn a_poll_finds_a_chain_posted_while_it_looks() {
    use std::time::{Duration, Instant};

    use super::poll_for_more;

    let mut h = harness(29);
    let tx = h.pair[1].clone();
    let mem = h.mem.clone();
    // Nothing posted: no poll asked, no time spent; one of 20 ms looks
    // that long and finds nothing.
    let t = Instant::now();
    assert_eq!(
        poll_for_more(&tx, &mem, false, Duration::ZERO),
        (false, Duration::ZERO)
    );
    assert!(t.elapsed() < Duration::from_millis(20));
    let t = Instant::now();
    let (found, spent) = poll_for_more(&tx, &mem, false, Duration::from_millis(20));
    assert!(!found);
    assert!(spent >= Duration::from_millis(20) && spent <= t.elapsed());
    // A chain the driver posts (on another thread) 10 ms into a poll of
    // 10 s is found then, not at the poll's end.
    let at = h.buffer(&[0x11; 76], 76);
    let ring = &mut h.tx;
    let found = std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(10));
            ring.push_chain(&mem, &[Desc::ro(at, 76)]);
        });
        let t = Instant::now();
        let found = poll_for_more(&tx, &mem, false, Duration::from_secs(10));
        (found, t.elapsed())
    });
    let ((found, spent), took) = found;
    assert!(found, "the chain was not found");
    assert!(
        took >= Duration::from_millis(5) && took < Duration::from_secs(5),
        "found after {took:?}"
    );
    // The time it reports is the time it looked.
    assert!(
        spent >= Duration::from_millis(5) && spent <= took,
        "{spent:?}"
    );
}
