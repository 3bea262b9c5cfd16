//! One vnicd, 100 frontends one after another: each connects (control
//! queue and EVENT_IDX included), receives and sends frames, answers a
//! control command and hangs up. After cycle 100 vnicd holds no more file
//! descriptors and no more threads than after cycle 10, and its resident
//! memory is within 4 MiB of what it was then (allocator caches; a leak
//! of one connection's guest mapping alone would be over 16 MiB here).
//! No root needed: the uplink is `source`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use vnic_guest::net::{NetOptions, VirtioNet};
use vnic_protocol::{
    virtio::{
        ctrl::{CtrlCommand, RxMode, ACK_OK},
        Features, VirtioNetHdr,
    },
    wire::build::{udp_frame, Flow, IpFields},
};
use vnic_tests::Vnicd;

const VNICD: &str = env!("CARGO_BIN_EXE_vnicd");

/// (open fds, threads, resident KiB) of process `pid`.
fn usage(pid: u32) -> (usize, usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap()
    };
    (fds, field("Threads:") as usize, field("VmRSS:"))
}

/// Waits until vnicd is back to `threads` threads (the last connection's
/// workers and relay have ended) and its open descriptors have stopped
/// changing for 200 ms (the connection's backend is dropped just after
/// its threads end), then reads its usage.
fn settled(pid: u32, threads: usize) -> (usize, usize, u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut u = usage(pid);
    while u.1 > threads && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        u = usage(pid);
    }
    let mut same = 0;
    while same < 20 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        let now = usage(pid);
        same = if now.0 == u.0 { same + 1 } else { 0 };
        u = now;
    }
    u
}

fn cycle(v: &Vnicd, n: usize) {
    let mut g = VirtioNet::connect(
        &v.socket,
        NetOptions {
            pairs: 2,
            features: NetOptions::DEFAULT_FEATURES
                | Features::CTRL_VQ
                | Features::MQ
                | Features::CTRL_RX
                | Features::EVENT_IDX,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("cycle {n}: connect: {e}"));
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    // RSS puts the source's one flow on either queue.
    while got < 50 && Instant::now() < deadline {
        for q in 0..2 {
            if g.recv_timeout(q, Duration::from_millis(5))
                .unwrap()
                .is_some()
            {
                got += 1;
            }
        }
    }
    if got < 50 {
        let st = v.stats().unwrap();
        let nz: Vec<_> = st.iter().filter(|(_, v)| **v != 0).collect();
        panic!("cycle {n}: {got} frames received; vnicd: {nz:?}");
    }
    let f = udp_frame(&Flow::v4(), &IpFields::default(), &[n as u8; 100]).unwrap();
    for _ in 0..50 {
        g.send(0, &VirtioNetHdr::default(), &f).unwrap();
    }
    let (ack, _) = g
        .ctrl(&CtrlCommand::Rx {
            mode: RxMode::Promisc,
            on: n % 2 == 0,
        })
        .unwrap();
    assert_eq!(ack, ACK_OK, "cycle {n}: control command");
}

#[test]
fn a_hundred_frontends_leave_no_fds_threads_or_memory_behind() {
    let v = Vnicd::start(VNICD, &["--uplink", "source:1500", "--queues", "2"]).unwrap();
    let pid = v.pid();
    let idle = usage(pid);
    let mut at10 = None;
    for n in 1..=100 {
        cycle(&v, n);
        let u = settled(pid, idle.1);
        if n == 10 {
            at10 = Some(u);
        }
    }
    let at10 = at10.unwrap();
    let at100 = settled(pid, idle.1);
    eprintln!(
        "idle {idle:?}, after cycle 10 {at10:?}, after cycle 100 {at100:?} (fds, threads, RSS KiB)"
    );
    assert_eq!(at100.0, at10.0, "open fds");
    assert_eq!(at100.1, at10.1, "threads");
    assert!(
        at100.2 <= at10.2 + 4096,
        "resident memory grew from {} KiB to {} KiB",
        at10.2,
        at100.2
    );
    let st = v.stats().unwrap();
    assert!(st["rx0.packets"] + st["rx1.packets"] >= 5000);
    assert!(st["tx0.packets"] >= 5000);
    assert_eq!(st["ctrl0.packets"], 100);
}
