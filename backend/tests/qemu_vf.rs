//! Real Linux guests (Debian's 6.12 kernel, its own virtio_net driver)
//! under QEMU on vnicd's virtual functions: VF to VF through the embedded
//! switch, each VF to the kernel on the uplink TAP, spoof checking of a
//! guest that changes its MAC, and a VF's transmit rate.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use vnic_tests::{
    qemu::{between, iperf_number, Guest, GuestOpts, IperfServer},
    require_netns, PortInNs,
};

const VNICD: &str = env!("CARGO_BIN_EXE_vnicd");

/// One test at a time: TCG guests of two tests on two cores slow each
/// other down, and the rate test measures a rate.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
/// Generous: TCG boots in about 7 s; two guests share two cores.
const GUEST_TIMEOUT: Duration = Duration::from_secs(240);

fn setup(args: &[&str]) -> PortInNs {
    let p = PortInNs::start(VNICD, args, "192.0.2.1/24", &[])
        .expect("vnicd with its TAP in a namespace");
    let end = Instant::now() + Duration::from_secs(20);
    while !p.vnicd.vf_socket(0).exists() {
        assert!(Instant::now() < end, "VF sockets never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    p
}

/// VF `n`'s MAC, from `vnicd ctl link show --json`.
fn vf_mac(p: &PortInNs, n: usize) -> String {
    let v: serde_json::Value =
        serde_json::from_str(&p.vnicd.ctl("link show --json").unwrap()).expect("link show JSON");
    v[0]["vfinfo_list"][n]["address"]
        .as_str()
        .expect("a VF address")
        .to_owned()
}

fn boot_on_vf(p: &PortInNs, n: usize, ip: &str, script: &str) -> Guest {
    Guest::boot(&GuestOpts {
        socket: Some(p.vnicd.vf_socket(n)),
        mac: vf_mac(p, n),
        smp: 1,
        script: format!("ip link set eth0 up\nip addr add {ip}/24 dev eth0\n{script}"),
        ..GuestOpts::default()
    })
    .expect("qemu starts")
}

fn tap_bytes(p: &PortInNs) -> u64 {
    let (rx, tx) = p.tap_bytes().expect("TAP counters");
    rx + tx
}

fn vf_total(p: &PortInNs, vf: usize, what: &str) -> u64 {
    let st = p.vnicd.stats().expect("stats");
    let prefix = format!("vf{vf}.tx");
    st.iter()
        .filter(|(k, _)| {
            k.strip_prefix(&prefix)
                .and_then(|r| r.split_once('.'))
                .is_some_and(|(_, w)| w == what)
        })
        .map(|(_, v)| v)
        .sum()
}

/// Guest A on VF0 and guest B on VF1: ping and iperf3 both ways through
/// the switch, with the kernel on the TAP seeing none of it; each guest
/// also reaches the kernel. Then A changes its MAC: with spoof checking
/// its frames stop at the switch, and once it is turned off they pass.
#[test]
fn two_guests_on_two_vfs_meet_through_the_switch() {
    if !require_netns() {
        return;
    }
    let _one = serial();
    let p = setup(&["--vfs", "2"]);
    let mut b = boot_on_vf(
        &p,
        1,
        "192.0.2.11",
        "ping -c 2 -W 5 192.0.2.1 && echo B-REACHED-HOST\niperf3 -s &\nsleep 1\necho B-READY\nsleep 200",
    );
    b.wait_for("B-READY", GUEST_TIMEOUT).unwrap();
    let before = tap_bytes(&p);
    let mut a = boot_on_vf(
        &p,
        0,
        "192.0.2.10",
        "ping -c 3 -W 5 192.0.2.11 && echo A-REACHED-B\n\
         echo FWD; iperf3 -c 192.0.2.11 -t 3 -J; echo FWD-END\n\
         echo REV; iperf3 -c 192.0.2.11 -t 3 -R -J; echo REV-END\n\
         echo SWITCHED\n\
         ping -c 2 -W 5 192.0.2.1 && echo A-REACHED-HOST\n\
         ip link set eth0 address 02:aa:00:00:00:01\n\
         ping -c 2 -W 2 192.0.2.11 || echo A-SPOOF-BLOCKED\n\
         echo A-WAITS\n\
         for i in $(seq 60); do ping -c 1 -W 1 192.0.2.11 >/dev/null && echo A-PASSES && break; done",
    );
    a.wait_for("SWITCHED", GUEST_TIMEOUT).unwrap();
    let switched = tap_bytes(&p) - before;
    a.wait_for("A-WAITS", GUEST_TIMEOUT).unwrap();
    let spoofed = vf_total(&p, 0, "drop.spoofed");
    p.vnicd.ctl("vf 0 spoofchk off").expect("spoofchk off");
    let out = a.wait_done(GUEST_TIMEOUT).unwrap().output;
    let bout = b.console();
    assert!(bout.contains("B-REACHED-HOST"), "{bout}");
    assert!(out.contains("A-REACHED-B"), "{out}");
    for (name, s, e) in [("A->B", "FWD", "FWD-END"), ("B->A", "REV", "REV-END")] {
        let j = between(&out, s, e);
        assert!(!j.contains("\"error\""), "{name}: {j}");
        let sent = iperf_number(&j, "\"sum_sent\"", "bytes").unwrap_or(0.0);
        let got = iperf_number(&j, "\"sum_received\"", "bytes").unwrap_or(0.0);
        assert!(
            got > 1e6 && got <= sent,
            "{name}: sent {sent}, received {got}"
        );
        eprintln!(
            "{name} through the switch: {:.2} Gbit/s",
            iperf_number(&j, "\"sum_received\"", "bits_per_second").unwrap_or(0.0) / 1e9
        );
    }
    // Gigabytes went between the guests; the kernel's TAP saw ARP and
    // the odd broadcast only.
    assert!(switched < 1 << 20, "the TAP carried {switched} bytes");
    assert!(out.contains("A-REACHED-HOST"), "{out}");
    assert!(out.contains("A-SPOOF-BLOCKED"), "{out}");
    assert!(spoofed > 0, "no spoofed frame counted");
    assert!(out.contains("A-PASSES"), "{out}");
}

/// `max_tx_rate 200`: iperf3 from the guest measures 200 Mbit/s within
/// 10%.
#[test]
fn a_guest_on_a_rate_limited_vf_measures_its_rate() {
    if !require_netns() {
        return;
    }
    let _one = serial();
    let p = setup(&["--vfs", "1", "--vf", "0:max_tx_rate=200"]);
    let _srv = IperfServer::start(&p.ns.name, "192.0.2.1").expect("iperf3 -s");
    let mut g = boot_on_vf(
        &p,
        0,
        "192.0.2.10",
        "echo TX; iperf3 -c 192.0.2.1 -t 5 -J; echo TX-END",
    );
    let out = g.wait_done(GUEST_TIMEOUT).unwrap().output;
    let j = between(&out, "TX", "TX-END");
    let bps = iperf_number(&j, "\"sum_received\"", "bits_per_second").unwrap_or(0.0);
    eprintln!(
        "max_tx_rate 200: the guest's iperf3 measured {:.1} Mbit/s",
        bps / 1e6
    );
    assert!(
        (bps - 200e6).abs() <= 20e6,
        "{:.1} Mbit/s is not within 10% of 200: {j}",
        bps / 1e6
    );
}
