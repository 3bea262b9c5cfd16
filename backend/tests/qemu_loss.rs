//! Host->guest losses accounted for: under iperf3 -R (4 streams, 2 queue
//! pairs) against a Linux guest, every frame the kernel handed vnicd's TAP
//! either reached the guest or was dropped and counted, by vnicd with a
//! reason or by the TAP, and the guest's driver dropped none. (The
//! sender's retransmits that remain are not losses: the guest reports
//! them as duplicates received, DSACKs, after segments of a flow that
//! changed TAP queue arrived out of order.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use vnic_tests::{
    qemu::{between, Guest, GuestOpts, IperfServer},
    require_netns, PortInNs,
};

const VNICD: &str = env!("CARGO_BIN_EXE_vnicd");
const GUEST_MAC: &str = "52:54:00:12:34:56";

#[test]
fn host_to_guest_losses_are_all_counted() {
    if !require_netns() {
        return;
    }
    let p = PortInNs::start(
        VNICD,
        &["--queues", "2"],
        "192.0.2.1/24",
        &[("192.0.2.2", GUEST_MAC)],
    )
    .expect("vnicd with its TAP in a namespace");
    let _srv = IperfServer::start(&p.ns.name, "192.0.2.1").expect("iperf3 -s");
    let mac: Vec<String> = p.host_mac.iter().map(|b| format!("{b:02x}")).collect();
    let script = format!(
        "ip link set eth0 up\nip addr add 192.0.2.2/24 dev eth0\n\
         ip neigh replace 192.0.2.1 lladdr {} dev eth0\n\
         ethtool -L eth0 combined 2; iperf3 -c 192.0.2.1 -R -t 10 -P 4 -J > /tmp/j; echo RETRANSMITS\n\
         grep -A 12 '\"sum_sent\"' /tmp/j | grep retransmits | tail -n 1\n\
         echo RX-BEGIN; grep eth0 /proc/net/dev; echo RX-END; grep TcpExt /proc/net/netstat",
        mac.join(":")
    );
    let mut g = Guest::boot(&GuestOpts {
        socket: Some(p.vnicd.socket.clone()),
        queues: 2,
        mac: GUEST_MAC.into(),
        script,
        ..GuestOpts::default()
    })
    .expect("qemu starts");
    let out = g.wait_done(Duration::from_secs(240)).unwrap().output;
    let dev = between(&out, "RX-BEGIN", "RX-END");
    // /proc/net/dev: bytes packets errs drop fifo frame ...
    let fields: Vec<u64> = dev
        .split(':')
        .nth(1)
        .unwrap_or_else(|| panic!("no eth0 in {dev}"))
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect();
    let (guest_rx, guest_errs, guest_drop, guest_frame) =
        (fields[1], fields[2], fields[3], fields[5]);
    let retransmits = between(&out, "RETRANSMITS", "RX-BEGIN");
    let tap = |what: &str| -> u64 {
        let path = format!("/sys/class/net/{}/statistics/{what}", p.tap);
        p.ns.exec("cat", &[&path]).unwrap().trim().parse().unwrap()
    };
    let (tap_tx, tap_drop) = (tap("tx_packets"), tap("tx_dropped"));
    let st = p.vnicd.stats().unwrap();
    let delivered = st["rx0.packets"] + st["rx1.packets"];
    let drops: u64 = st
        .iter()
        .filter(|(k, _)| k.starts_with("rx0.drop.") || k.starts_with("rx1.drop."))
        .map(|(_, v)| v)
        .sum();
    eprintln!(
        "TAP sent {tap_tx}, dropped {tap_drop}; vnicd delivered {delivered}, dropped {drops}; \
         the guest got {guest_rx} (errors {guest_errs}, dropped {guest_drop}, frame errors \
         {guest_frame}); the sender's {}",
        retransmits.trim()
    );
    // The guest took every frame vnicd put in its ring, whole: none
    // short, none missing buffers (a frame's buffers are published at
    // once).
    assert_eq!(
        (guest_errs, guest_drop, guest_frame),
        (0, 0, 0),
        "the guest's driver dropped frames:\n{out}"
    );
    // Every frame the TAP handed over was delivered or counted; what the
    // guest has not seen yet arrived after its count was read (the last
    // ACKs and FINs).
    assert_eq!(tap_tx, delivered + drops, "TAP frames vs vnicd's counts");
    assert!(
        guest_rx <= delivered && delivered - guest_rx <= 16,
        "vnicd delivered {delivered}, the guest counted {guest_rx}"
    );
}
