//! A real Linux guest (Debian's 6.12 kernel, its own virtio_net driver)
//! under QEMU on vnicd, with vnicd's TAP in a namespace where the kernel
//! and real iperf3 are the peers. Each test boots its own guest.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use vnic_tests::{
    qemu::{between, iperf_number, Guest, GuestOpts, IperfServer},
    require_netns, PortInNs,
};

const VNICD: &str = env!("CARGO_BIN_EXE_vnicd");
const GUEST_MAC: &str = "52:54:00:12:34:56";
/// Generous: TCG boots in about 7 s and iperf3 runs are 10 s each.
const GUEST_TIMEOUT: Duration = Duration::from_secs(180);

fn port(queues: u16) -> PortInNs {
    let q = queues.to_string();
    PortInNs::start(
        VNICD,
        &["--queues", &q],
        "192.0.2.1/24",
        &[("192.0.2.2", GUEST_MAC)],
    )
    .expect("vnicd with its TAP in a namespace")
}

fn guest(p: &PortInNs, queues: u16, script: &str) -> Guest {
    guest_with(p, queues, false, script)
}

fn guest_with(p: &PortInNs, queues: u16, packed: bool, script: &str) -> Guest {
    Guest::boot(&GuestOpts {
        packed,
        socket: Some(p.vnicd.socket.clone()),
        queues,
        smp: 2,
        mac: GUEST_MAC.into(),
        script: format!(
            "ip link set eth0 up\nip addr add 192.0.2.2/24 dev eth0\n\
             ip neigh replace 192.0.2.1 lladdr {} dev eth0\n{script}",
            mac_text(p.host_mac)
        ),
        ..GuestOpts::default()
    })
    .expect("qemu starts")
}

/// Asserts that the iperf3 reports between TX-JSON/TX-END and
/// RX-JSON/RX-END in a guest's output have no error and a nonzero rate,
/// and prints the rates.
fn tcp_both_ways(out: &str, what: &str) {
    for (name, a, b) in [
        ("guest->host", "TX-JSON", "TX-END"),
        ("host->guest", "RX-JSON", "RX-END"),
    ] {
        let j = between(out, a, b);
        assert!(!j.contains("\"error\""), "{what}{name}: {j}");
        let bps = iperf_number(&j, "\"sum_received\"", "bits_per_second").unwrap_or(0.0);
        assert!(bps > 0.0, "{what}{name}: {j}");
        eprintln!("{what}{name}: {:.2} Gbit/s", bps / 1e9);
    }
}

fn mac_text(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[test]
fn link_comes_up_and_ping_works_both_ways() {
    if !require_netns() {
        return;
    }
    let p = port(1);
    let mut g = guest(
        &p,
        1,
        "ping -c 3 -W 5 192.0.2.1\necho PING-OUT-RC=$?\necho READY-FOR-PING\nsleep 8",
    );
    g.wait_for("READY-FOR-PING", GUEST_TIMEOUT).unwrap();
    let back = p.ns.exec("ping", &["-c", "3", "-W", "5", "192.0.2.2"]);
    let out = g.wait_done(GUEST_TIMEOUT).unwrap();
    assert!(
        out.output.contains("PING-OUT-RC=0"),
        "guest -> host:\n{}",
        out.output
    );
    assert!(out.output.contains("3 packets received"), "{}", out.output);
    let back = back.expect("host -> guest ping");
    assert!(back.contains("3 received"), "{back}");
}

#[test]
fn iperf3_tcp_both_ways_with_multiqueue_rss_and_udp() {
    if !require_netns() {
        return;
    }
    let p = port(2);
    let _srv = IperfServer::start(&p.ns.name, "192.0.2.1").expect("iperf3 -s");
    let script = "ethtool -L eth0 combined 2\n\
        echo CHANNELS; ethtool -l eth0 | tail -n 4\n\
        echo OFFLOADS; ethtool -k eth0 | grep tcp-segmentation-offload\n\
        echo TX-JSON; iperf3 -c 192.0.2.1 -P 4 -t 10 -J; echo TX-END\n\
        echo RX-JSON; iperf3 -c 192.0.2.1 -P 4 -t 10 -R -J; echo RX-END\n\
        echo UDP-JSON; iperf3 -c 192.0.2.1 -u -b 10M -t 5 -J; echo UDP-END\n\
        echo QUEUES; ethtool -S eth0 | grep -E 'rx[0-9]+_kicks'";
    let mut g = guest(&p, 2, script);
    let out = g.wait_done(GUEST_TIMEOUT).unwrap().output;
    let section = |a: &str, b: &str| between(&out, a, b);
    // Channels and offloads as the guest sees them.
    assert!(
        section("CHANNELS", "OFFLOADS").contains("Combined:\t2"),
        "{out}"
    );
    assert!(
        section("OFFLOADS", "TX-JSON").contains("tcp-segmentation-offload: on"),
        "{out}"
    );
    // TCP both ways: nonzero, no errors.
    tcp_both_ways(&out, "");
    // UDP at 10 Mbit/s: under 1% lost.
    let u = section("UDP-JSON", "UDP-END");
    let lost = iperf_number(&u, "\"sum\"", "lost_percent").expect("udp loss in the report");
    assert!(lost < 1.0, "udp loss {lost}%: {u}");
    // Device RSS spread the 4-stream receive over both queues, and the
    // guest's driver took frames from each: vnicd wrote more frames into
    // each RX queue than the 256 buffers it holds, which it can only do
    // once the driver has taken frames and reposted their buffers. (Linux
    // 6.12's virtio_net keeps no per-queue packet counts of its own
    // without DEVICE_STATS, and vnicd turns the driver's refill kicks off
    // while it has buffers, so those no longer count traffic per queue:
    // the driver kicked each queue at least once, to post its buffers.)
    let st = p.vnicd.stats().unwrap();
    assert!(
        st["rx0.packets"] > 2 * 256 && st["rx1.packets"] > 2 * 256,
        "{st:?}"
    );
    let queues = section("QUEUES", "VNIC-OUT-END");
    let kicks: Vec<u64> = queues
        .lines()
        .filter_map(|l| l.split(':').nth(1)?.trim().parse().ok())
        .collect();
    assert!(
        kicks.len() == 2 && kicks.iter().all(|&n| n >= 1),
        "{queues}"
    );
}

/// QEMU's `packed=on`: the guest's virtio_net negotiates the packed ring
/// (feature bit 34 in sysfs) and runs two queue pairs and the control
/// queue on it: ping and TCP both ways, and frames on both RX queues.
#[test]
fn a_packed_ring_carries_ping_and_tcp_both_ways() {
    if !require_netns() {
        return;
    }
    let p = port(2);
    let _srv = IperfServer::start(&p.ns.name, "192.0.2.1").expect("iperf3 -s");
    let script = "echo FEATURES; cat /sys/class/net/eth0/device/features; echo FEATURES-END\n\
        ethtool -L eth0 combined 2\n\
        ping -c 3 -W 5 192.0.2.1; echo PING-RC=$?\n\
        echo TX-JSON; iperf3 -c 192.0.2.1 -P 4 -t 5 -J; echo TX-END\n\
        echo RX-JSON; iperf3 -c 192.0.2.1 -P 4 -t 5 -R -J; echo RX-END";
    let mut g = guest_with(&p, 2, true, script);
    let out = g.wait_done(GUEST_TIMEOUT).unwrap().output;
    let section = |a: &str, b: &str| between(&out, a, b);
    let bits = section("FEATURES", "FEATURES-END");
    let bits = bits.trim();
    assert_eq!(bits.as_bytes().get(34), Some(&b'1'), "RING_PACKED: {out}");
    assert!(out.contains("PING-RC=0"), "{out}");
    tcp_both_ways(&out, "packed ");
    let st = p.vnicd.stats().unwrap();
    assert!(st["rx0.packets"] > 256 && st["rx1.packets"] > 256, "{st:?}");
    let bad: Vec<_> = st
        .iter()
        .filter(|(k, n)| k.contains("bad_ring") && **n > 0)
        .collect();
    assert!(bad.is_empty(), "{bad:?}");
}

#[test]
fn link_works_again_after_the_driver_is_rebound() {
    if !require_netns() {
        return;
    }
    let p = port(1);
    let script = "ping -c 2 -W 5 192.0.2.1 >/dev/null && echo FIRST-OK\n\
        dev=$(basename $(readlink /sys/class/net/eth0/device))\n\
        echo $dev > /sys/bus/virtio/drivers/virtio_net/unbind\n\
        sleep 1\n\
        echo $dev > /sys/bus/virtio/drivers/virtio_net/bind\n\
        sleep 1\n\
        ip link set eth0 up\nip addr add 192.0.2.2/24 dev eth0\n\
        ping -c 3 -W 5 192.0.2.1 && echo SECOND-OK";
    let mut g = guest(&p, 1, script);
    let out = g.wait_done(GUEST_TIMEOUT).unwrap().output;
    assert!(out.contains("FIRST-OK"), "{out}");
    assert!(out.contains("SECOND-OK"), "{out}");
    let mut v = p.vnicd;
    assert!(v.alive(), "the same vnicd served both");
}

/// Two guests on two vnicd instances reach each other through a bridge
/// in the namespace.
#[test]
fn two_guests_on_two_vnicds_meet_through_a_bridge() {
    use vnic_tests::{unique, NetNs, Vnicd};
    if !require_netns() {
        return;
    }
    let taps = [unique("vnt"), unique("vnt")];
    let vnicds: Vec<Vnicd> = taps
        .iter()
        .map(|t| Vnicd::start(VNICD, &["--uplink", &format!("tap:{t}")]).expect("vnicd"))
        .collect();
    let ns = NetNs::new().unwrap();
    ns.ip(&["link", "add", "br0", "type", "bridge"]).unwrap();
    for t in &taps {
        vnic_tests::run("ip", &["link", "set", t, "netns", &ns.name]).unwrap();
        ns.ip(&["link", "set", t, "master", "br0"]).unwrap();
        ns.ip(&["link", "set", t, "up"]).unwrap();
    }
    ns.ip(&["addr", "add", "192.0.2.1/24", "dev", "br0"])
        .unwrap();
    ns.ip(&["link", "set", "br0", "up"]).unwrap();
    let boot = |v: &Vnicd, mac: &str, ip: &str, script: &str| {
        Guest::boot(&GuestOpts {
            socket: Some(v.socket.clone()),
            mac: mac.into(),
            script: format!("ip link set eth0 up\nip addr add {ip}/24 dev eth0\n{script}"),
            ..GuestOpts::default()
        })
        .expect("qemu starts")
    };
    let mut b = boot(
        &vnicds[1],
        "52:54:00:12:34:57",
        "192.0.2.3",
        "echo B-READY\nsleep 40",
    );
    b.wait_for("B-READY", GUEST_TIMEOUT).unwrap();
    let mut a = boot(
        &vnicds[0],
        GUEST_MAC,
        "192.0.2.2",
        "ping -c 3 -W 5 192.0.2.3 && echo A-REACHED-B",
    );
    let out = a.wait_done(GUEST_TIMEOUT).unwrap().output;
    assert!(out.contains("A-REACHED-B"), "{out}");
    assert!(out.contains("3 packets received"), "{out}");
}
