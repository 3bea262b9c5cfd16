//! No lost wake-ups, with and without EVENT_IDX: vnic-guest drives vnicd
//! (uplink `sink` or `source`, no root needed) as a driver does.
//! Transmit goes in bursts with one kick each when the device asks for it,
//! and with the ring full the driver sleeps on the TX interrupt until the
//! device hands chains back. Receive is a NAPI poll that refills its
//! buffers (kicking when the device asks) and sleeps on the RX interrupt
//! when the ring is dry. Every assertion is a count: frames on both sides,
//! waits that timed out (a lost kick or a lost used-buffer notification
//! shows up there), kicks and notifications per frame.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use vnic_guest::net::{NetOptions, VirtioNet};
use vnic_protocol::{
    virtio::{hdr::GsoType, Features, VirtioNetHdr},
    wire::{
        build::{data_segment, tcp_frame, udp_frame, Flow, IpFields},
        tcp::Flags,
    },
};
use vnic_tests::Vnicd;

const VNICD: &str = env!("CARGO_BIN_EXE_vnicd");

struct Run {
    completed: u64,
    posted: u64,
    kicks: u64,
    waits: u64,
    stalls: u64,
    device_packets: u64,
    device_notifications: u64,
}

/// A vnicd with `uplink` and 256-entry queues, and vnic-guest connected
/// to it with or without EVENT_IDX.
fn connect(uplink: &str, event_idx: bool) -> (Vnicd, VirtioNet) {
    let v = Vnicd::start(VNICD, &["--uplink", uplink, "--queue-size", "256"]).unwrap();
    let mut features = NetOptions::DEFAULT_FEATURES;
    if event_idx {
        features |= Features::EVENT_IDX;
    }
    let g = VirtioNet::connect(
        &v.socket,
        NetOptions {
            queue_size: 256,
            features,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(g.features.contains(Features::EVENT_IDX), event_idx);
    (v, g)
}

fn run(event_idx: bool, hdr: VirtioNetHdr, frame: &[u8], frames: u64, burst: usize) -> Run {
    let (v, mut g) = connect("sink", event_idx);
    let tx = g.tx(0).unwrap();
    while tx.posted < frames {
        let want = burst.min((frames - tx.posted) as usize);
        if tx.post_burst(&hdr, frame, want).unwrap() == 0 {
            // A lost notification would leave this wait to time out.
            tx.wait_for_room(Duration::from_secs(1)).unwrap();
        }
    }
    while tx.completed < frames && tx.stalls < 10 {
        tx.wait_for_room(Duration::from_secs(1)).unwrap();
        tx.reclaim().unwrap();
    }
    let st = v.stats().unwrap();
    Run {
        completed: tx.completed,
        posted: tx.posted,
        kicks: tx.kicks,
        waits: tx.waits,
        stalls: tx.stalls,
        device_packets: st["tx0.packets"],
        device_notifications: st["tx0.notifications"],
    }
}

fn check(what: &str, r: &Run, frames: u64, burst: u64, event_idx: bool) {
    eprintln!(
        "{what}: {} completed, {} kicks, {} waits, {} stalls, vnicd {} packets {} notifications",
        r.completed, r.kicks, r.waits, r.stalls, r.device_packets, r.device_notifications
    );
    assert_eq!(r.posted, frames, "{what}");
    assert_eq!(r.completed, frames, "{what}: every frame handed back");
    assert_eq!(r.device_packets, frames, "{what}: every frame sent");
    assert_eq!(r.stalls, 0, "{what}: no wait ended without a notification");
    // At most one kick per burst; the device asks for fewer while it works.
    assert!(
        r.kicks <= frames.div_ceil(burst),
        "{what}: {} kicks",
        r.kicks
    );
    // The device notifies only while the driver waits with the interrupt
    // armed (the event index, or NO_INTERRUPT clear). With EVENT_IDX a
    // driver that never waits leaves `used_event` where it was, and the
    // used index passes it once per 65536 buffers: virtio asks for a
    // notification each time (the first batch, then every wrap).
    let stale = if event_idx {
        frames.div_ceil(65_536) + 1
    } else {
        0
    };
    assert!(
        r.device_notifications <= notification_bound(r.waits, false) + stale,
        "{what}: {} notifications for {} waits",
        r.device_notifications,
        r.waits
    );
}

fn small() -> (VirtioNetHdr, Vec<u8>) {
    let f = udp_frame(&Flow::v4(), &IpFields::default(), &[0x5a; 22]).unwrap();
    (VirtioNetHdr::default(), f)
}

fn tso() -> (VirtioNetHdr, Vec<u8>) {
    let f = tcp_frame(
        &Flow::v4(),
        data_segment(1, 1, Flags::ACK),
        &IpFields::default(),
        &vec![0x5a; 65_000 - 54],
    )
    .unwrap();
    (VirtioNetHdr::tcp_tso(GsoType::TcpV4, 34, 54, 1448), f)
}

#[test]
fn small_frames_complete_without_lost_wakeups() {
    let (h, f) = small();
    for event_idx in [true, false] {
        let r = run(event_idx, h, &f, 200_000, 32);
        check(
            &format!("64 B, event_idx {event_idx}"),
            &r,
            200_000,
            32,
            event_idx,
        );
    }
}

#[test]
fn tso_frames_complete_without_lost_wakeups() {
    let (h, f) = tso();
    for event_idx in [true, false] {
        let r = run(event_idx, h, &f, 5_000, 32);
        check(
            &format!("TSO 65000 B, event_idx {event_idx}"),
            &r,
            5_000,
            32,
            event_idx,
        );
    }
}

struct RxRun {
    received: u64,
    polls: u64,
    kicks: u64,
    waits: u64,
    stalls: u64,
    device_packets: u64,
    device_notifications: u64,
}

fn run_rx(event_idx: bool, size: usize, frames: u64) -> RxRun {
    let (v, mut g) = connect(&format!("source:{size}"), event_idx);
    let mut qps = g.take_pairs();
    let rx = &mut qps[0].rx;
    let (mut received, mut polls, mut waits, mut stalls) = (0u64, 0u64, 0u64, 0u64);
    while received < frames && stalls < 5 {
        let mut bad = 0;
        let n = rx
            .napi_poll(64, true, &mut |_, f| {
                received += 1;
                if f.len() != size {
                    bad += 1;
                }
            })
            .unwrap();
        assert_eq!(bad, 0, "frames arrive whole");
        polls += 1;
        if n < 64 {
            // Dry: interrupts are armed; sleep until the device signals.
            let mut pfd = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(rx.call()),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            let r = unsafe { libc::poll(&mut pfd, 1, 1000) };
            let _ = rx.call().read();
            if r > 0 {
                waits += 1;
            } else if !rx.has_used().unwrap() {
                stalls += 1;
            }
        }
    }
    let st = v.stats().unwrap();
    RxRun {
        received,
        polls,
        kicks: rx.kicks,
        waits,
        stalls,
        device_packets: st["rx0.packets"],
        device_notifications: st["rx0.notifications"],
    }
}

fn check_rx(what: &str, r: &RxRun, frames: u64, event_idx: bool) {
    eprintln!(
        "{what}: {} received in {} polls, {} kicks, {} waits, {} stalls, vnicd {} packets {} notifications",
        r.received, r.polls, r.kicks, r.waits, r.stalls, r.device_packets, r.device_notifications
    );
    assert!(r.received >= frames, "{what}: {} frames", r.received);
    assert_eq!(r.stalls, 0, "{what}: no wait timed out");
    assert!(r.device_packets >= r.received, "{what}");
    // A refill kicks only when the device asks, and it asks only when it
    // ran out of buffers: for MTU-sized frames not more than once per 16
    // frames; a 64 KiB frame takes 33 buffers of 2 KiB, so there the
    // device may ask about once per frame.
    let max_kicks = if frames > 10_000 {
        r.received.div_ceil(16)
    } else {
        2 * r.received
    };
    assert!(r.kicks <= max_kicks, "{what}: {} kicks", r.kicks);
    assert!(
        r.device_notifications <= notification_bound(r.waits, !event_idx),
        "{what}: {} notifications for {} waits",
        r.device_notifications,
        r.waits
    );
}

/// Most used-buffer notifications a device that honours the driver's
/// suppression sends for `waits` waits that ended with one: about one
/// each (a device that ignores VRING_AVAIL_F_NO_INTERRUPT sends one per
/// TX batch, 1.9 times the waits here). A receiving driver without
/// EVENT_IDX leaves NO_INTERRUPT clear from the end of one poll until it
/// runs again, and every batch the device completes meanwhile signals
/// (the eventfd sums them into one wake-up): up to twice the waits there.
fn notification_bound(waits: u64, loose: bool) -> u64 {
    if loose {
        2 * waits + 2
    } else {
        waits + waits / 10 + 2
    }
}

#[test]
fn receive_refills_and_interrupts_without_lost_wakeups() {
    for event_idx in [true, false] {
        for (size, frames) in [(64, 100_000), (1500, 50_000), (65_000, 2_000)] {
            let r = run_rx(event_idx, size, frames);
            check_rx(
                &format!("RX {size} B, event_idx {event_idx}"),
                &r,
                frames,
                event_idx,
            );
        }
    }
}
