//! DPDK's virtio-user PMD (testpmd) as vnicd's frontend, with and without
//! VIRTIO_F_IN_ORDER, on split and packed rings: the frames testpmd sends
//! reach vnicd's sink, and the
//! frames vnicd's source writes reach testpmd, counted on both sides (the
//! two counts differ by at most what the ring held when testpmd
//! stopped). Needs `dpdk-testpmd` (Debian's dpdk-dev); fails without it
//! unless `VNIC_SKIP_DPDK=1`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{thread, time::Duration};

use vnic_tests::{
    dpdk::{require_testpmd, total, Testpmd},
    Vnicd,
};

const VNICD: &str = env!("CARGO_BIN_EXE_vnicd");

/// Whether testpmd's acked features include IN_ORDER (bit 35) and
/// RING_PACKED (bit 34).
fn negotiated(out: &str) -> Option<(bool, bool)> {
    let f = out
        .split("features after negotiate = ")
        .nth(1)?
        .split_whitespace()
        .next()?;
    let bits = u64::from_str_radix(f.trim_start_matches("0x"), 16).ok()?;
    Some((bits & (1 << 35) != 0, bits & (1 << 34) != 0))
}

/// testpmd's count, vnicd's, what testpmd printed, and vnicd's counters.
fn run(
    in_order: bool,
    packed: bool,
    mode: &str,
    size: usize,
    poll_us: u32,
) -> (u64, u64, String, std::collections::BTreeMap<String, u64>) {
    let uplink = if mode == "txonly" {
        "sink".to_owned()
    } else {
        format!("source:{size}")
    };
    let poll = poll_us.to_string();
    let v = Vnicd::start(VNICD, &["--uplink", &uplink, "--poll-us", &poll]).expect("vnicd");
    let vdev = format!(
        "net_virtio_user0,path={},queues=1,queue_size=256,in_order={},packed_vq={}",
        v.socket.display(),
        u8::from(in_order),
        u8::from(packed)
    );
    let gen = Testpmd::start(
        0,
        &vdev,
        // Its feature negotiation, to check IN_ORDER and RING_PACKED.
        &["--log-level=pmd.net.virtio.init:debug"],
        mode,
        &[&format!("--txpkts={size}")],
    )
    .expect("testpmd");
    // Forwarding starts once testpmd is up (its first statistics).
    let up = std::time::Instant::now();
    while !gen.output().contains("Port statistics") && up.elapsed() < Duration::from_secs(30) {
        thread::sleep(Duration::from_millis(100));
    }
    thread::sleep(Duration::from_secs(3));
    let out = gen.stop();
    // vnicd's count settles once testpmd has stopped and hung up.
    thread::sleep(Duration::from_millis(300));
    let st = v.stats().expect("vnicd stats");
    for (k, n) in st.iter().filter(|(k, n)| k.contains("drop") && **n > 0) {
        eprintln!("  vnicd {k} {n}");
    }
    let (theirs, ours) = if mode == "txonly" {
        (total(&out, "TX-packets:"), st["tx0.packets"])
    } else {
        (total(&out, "RX-packets:"), st["rx0.packets"])
    };
    let theirs = theirs.unwrap_or_else(|| panic!("no totals from testpmd:\n{out}"));
    (theirs, ours, out, st)
}

#[test]
fn testpmd_virtio_user_both_ways_with_and_without_in_order_split_and_packed() {
    if !require_testpmd() {
        return;
    }
    for (in_order, packed) in [(false, false), (true, false), (false, true), (true, true)] {
        for (mode, size) in [
            ("txonly", 64),
            ("txonly", 1500),
            ("rxonly", 64),
            ("rxonly", 1500),
        ] {
            // With IN_ORDER, vnicd's transmit workers poll emptied rings
            // a while (`--poll-us`); without it they sleep at once.
            let poll_us = if in_order { 50 } else { 0 };
            let (theirs, ours, out, st) = run(in_order, packed, mode, size, poll_us);
            let (polled, poll_ns) = (st["tx0.polled"], st["tx0.poll_ns"]);
            eprintln!(
                "in_order={in_order} packed={packed} {mode} {size} B: testpmd {theirs}, vnicd {ours}, polled {polled} in {poll_ns} ns"
            );
            // A poll that found more took some time to look.
            assert!(
                polled == 0 || poll_ns > 0,
                "{polled} polls found more in 0 ns"
            );
            // Without --poll-us, or with nothing sent, no poll is counted.
            // (With it, how often a poll finds more depends on whether
            // vnicd empties the ring at all: a debug build mostly does
            // not, a release build does, as the benchmark shows.)
            if poll_us == 0 || mode == "rxonly" {
                assert_eq!(
                    (polled, poll_ns),
                    (0, 0),
                    "{mode} {size}: polled without --poll-us or sending"
                );
            }
            assert_eq!(
                negotiated(&out),
                Some((in_order, packed)),
                "IN_ORDER and RING_PACKED negotiation:\n{out}"
            );
            assert!(
                theirs > 10_000,
                "{mode} {size}: only {theirs} frames\n{out}"
            );
            if mode == "txonly" {
                // Every frame testpmd counted as sent was taken by vnicd,
                // but for those still in the ring when testpmd stopped the
                // queue (at most a ring's worth; seen 0 and 69).
                assert!(
                    ours <= theirs && theirs - ours <= 256,
                    "in_order={in_order} packed={packed} {mode} {size}: testpmd sent {theirs}, vnicd took {ours}"
                );
            } else {
                // Every frame vnicd wrote into the ring reached testpmd,
                // but for those written after testpmd stopped polling:
                // at most a ring's worth (256). testpmd starts without
                // draining its queues first (`--no-flush-rx`), since what
                // it drains then is in none of its totals.
                assert!(
                    theirs <= ours && ours - theirs <= 256,
                    "in_order={in_order} packed={packed} {mode} {size}: vnicd wrote {ours}, testpmd took {theirs}"
                );
            }
        }
    }
}
