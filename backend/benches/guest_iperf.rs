//! vnic's main job, measured: a Linux guest under QEMU runs iperf3 against
//! the kernel in a namespace, both ways, once on vnicd (vhost-user, 2 queue
//! pairs, device RSS) and once on QEMU's own virtio-net with a TAP netdev
//! (what a user would run instead), on the same guest image, side by side.
//!
//! `cargo bench -p vnic-backend --bench guest_iperf` (VNIC_IPERF_SECONDS
//! sets the run length, default 10).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use vnic_tests::{
    qemu::{accel, between, iperf_number, Guest, GuestOpts, IperfServer},
    unique, NetNs, PortInNs,
};

const VNICD: &str = env!("CARGO_BIN_EXE_vnicd");
const MAC: &str = "52:54:00:12:34:56";

fn script(secs: u64) -> String {
    format!(
        "ip link set eth0 up\nip addr add 192.0.2.2/24 dev eth0\n\
         ethtool -L eth0 combined 2 2>/dev/null\n\
         i=0; while ! ping -c 1 -W 1 192.0.2.1 >/dev/null; do i=$((i+1)); [ $i -gt 30 ] && break; done\n\
         echo TX-JSON; iperf3 -c 192.0.2.1 -P 4 -t {secs} -J; echo TX-END\n\
         echo RX-JSON; iperf3 -c 192.0.2.1 -P 4 -t {secs} -R -J; echo RX-END"
    )
}

struct Row {
    gbps: f64,
    retransmits: f64,
}

fn results(out: &str) -> [Row; 2] {
    let sect = |a: &str, b: &str| between(out, a, b);
    let number = |j: &str, s: &str, k: &str| iperf_number(j, s, k).unwrap_or(0.0);
    let tx = sect("TX-JSON", "TX-END");
    let rx = sect("RX-JSON", "RX-END");
    [
        Row {
            gbps: number(&tx, "\"sum_received\"", "bits_per_second") / 1e9,
            retransmits: number(&tx, "\"sum_sent\"", "retransmits"),
        },
        Row {
            gbps: number(&rx, "\"sum_received\"", "bits_per_second") / 1e9,
            retransmits: number(&rx, "\"sum_sent\"", "retransmits"),
        },
    ]
}

fn main() {
    let secs: u64 = std::env::var("VNIC_IPERF_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let timeout = Duration::from_secs(120 + 4 * secs);

    // vnicd, 2 queue pairs, TAP in a namespace.
    let p = PortInNs::start(
        VNICD,
        &["--queues", "2"],
        "192.0.2.1/24",
        &[("192.0.2.2", MAC)],
    )
    .expect("vnicd with its TAP in a namespace");
    let srv = IperfServer::start(&p.ns.name, "192.0.2.1").expect("iperf3 -s");
    let mut g = Guest::boot(&GuestOpts {
        socket: Some(p.vnicd.socket.clone()),
        queues: 2,
        mac: MAC.into(),
        script: script(secs),
        ..GuestOpts::default()
    })
    .expect("qemu");
    let out = g.wait_done(timeout).expect("guest run").output;
    let vnicd = results(&out);
    let st = p.vnicd.stats().unwrap_or_default();
    let per_queue = format!(
        "{} / {}",
        st.get("rx0.packets").copied().unwrap_or(0),
        st.get("rx1.packets").copied().unwrap_or(0)
    );
    drop((g, srv, p));

    // QEMU's own virtio-net on a TAP, QEMU running in the namespace.
    let ns = NetNs::new().expect("netns");
    let tap = unique("qtap");
    let mut g = Guest::boot(&GuestOpts {
        tap: Some(tap.clone()),
        queues: 2,
        mac: MAC.into(),
        script: script(secs),
        netns: Some(ns.name.clone()),
        ..GuestOpts::default()
    })
    .expect("qemu");
    let t0 = Instant::now();
    while ns.ip(&["link", "show", &tap]).is_err() && t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
    }
    ns.ip(&["addr", "add", "192.0.2.1/24", "dev", &tap])
        .expect("tap address");
    ns.ip(&["link", "set", &tap, "up"]).expect("tap up");
    // The server binds to the TAP's address, which exists only now.
    let srv = IperfServer::start(&ns.name, "192.0.2.1").expect("iperf3 -s");
    let out = g.wait_done(timeout).expect("guest run").output;
    let qemu = results(&out);
    if qemu[0].gbps == 0.0 {
        eprintln!("QEMU virtio-net run:\n{out}");
    }
    drop((g, srv, ns));

    println!(
        "guest: Debian 6.12 cloud kernel, 2 vCPUs, 2 queue pairs, QEMU {:?}; iperf3 -P 4 -t {secs}",
        accel()
    );
    println!("| NIC | direction | Gbit/s | retransmits | RX packets per queue (vnicd) |");
    println!("|---|---|---|---|---|");
    for (name, rows, q) in [
        ("vnicd (vhost-user)", &vnicd, per_queue.as_str()),
        ("QEMU virtio-net + TAP", &qemu, "n/a"),
    ] {
        for (dir, r) in ["guest -> host", "host -> guest"].iter().zip(rows.iter()) {
            println!(
                "| {name} | {dir} | {:.2} | {:.0} | {q} |",
                r.gbps, r.retransmits
            );
        }
    }
}
