//! vnic-guest inside a real VM: a QEMU guest (Debian's kernel) on vnicd,
//! its virtio-net-pci function driven from user space by vnic-ping and
//! vnic-iperf over the PCI transport (uio_pci_generic, hugepages, the ISR
//! polled),
//! against the host's kernel and real iperf3 in vnicd's namespace; then
//! the function back with the guest kernel's virtio_net, measured beside
//! it. The guest's side is `tests/guest/pci-test.sh`.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{path::PathBuf, process::Command, time::Duration};

use serde_json::Value;
use vnic_tests::{
    qemu::{accel, between, Guest, GuestOpts, IperfServer},
    require_netns, PortInNs,
};

mod common;
use common::{bytes, json, vnicd};

const IPERF: &str = env!("CARGO_BIN_EXE_vnic-iperf");
const PING: &str = env!("CARGO_BIN_EXE_vnic-ping");

fn mbits(v: &Value, k: &str) -> f64 {
    v["end"][k]["bits_per_second"].as_f64().unwrap_or(0.0) / 1e6
}

/// A sender's count runs ahead of its receiver's by what was in flight
/// when the test stopped: at most a few socket buffers.
fn agree(sent: u64, received: u64, what: &str) {
    assert!(received > 0, "{what}: nothing received");
    assert!(
        received <= sent && sent - received <= 8 << 20,
        "{what}: sent {sent}, received {received}"
    );
}

#[test]
fn vnic_guest_over_pci_inside_a_qemu_guest() {
    if !require_netns() {
        return;
    }
    let p = PortInNs::start(&vnicd(), &["--queues", "2"], "192.0.2.1/24", &[])
        .expect("vnicd with its TAP in a namespace");
    let _server = IperfServer::start(&p.ns.name, "192.0.2.1").expect("iperf3 -s");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/guest/pci-test.sh");
    let mut g = Guest::boot(&GuestOpts {
        socket: Some(p.vnicd.socket.clone()),
        queues: 2,
        script: "sh /bin/pci-test".into(),
        files: vec![
            (IPERF.into(), "/bin/vnic-iperf".into()),
            (PING.into(), "/bin/vnic-ping".into()),
            (script, "/bin/pci-test".into()),
        ],
        ..GuestOpts::default()
    })
    .expect("boot the guest");
    let ns = |cmd: &str, args: &[&str]| {
        let out = Command::new("ip")
            .args(["netns", "exec", &p.ns.name, cmd])
            .args(args)
            .output()
            .expect("run in the namespace");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    g.wait_for("PING-LINGER", Duration::from_secs(300))
        .expect("vnic-ping over PCI");
    let host_ping = ns("ping", &["-c", "3", "-i", "0.3", "-W", "3", "192.0.2.2"]);
    g.wait_for("SERVER-READY", Duration::from_secs(300))
        .expect("vnic-iperf -s over PCI");
    let host_client = ns("iperf3", &["-c", "192.0.2.2", "-t", "3", "-J"]);
    g.wait_for("VNIC-DONE", Duration::from_secs(120))
        .expect("the PCI runs end");
    let stats = p.vnicd.stats().expect("vnicd stats");
    let out = g.wait_done(Duration::from_secs(300)).expect("guest done");
    let qemu = g.qemu_stderr();
    if !qemu.is_empty() {
        eprintln!("QEMU said:\n{qemu}");
    }
    let o = &out.output;
    // The whole report, for a failure whose message shows only a part.
    let keep = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("qemu_pci-guest.txt");
    let _ = std::fs::write(&keep, format!("{o}\n--- console ---\n{}", out.console));
    eprintln!("guest output in {}", keep.display());

    assert!(o.contains("BDF=0000:"), "{o}");
    // Each thing missing is one clear line, and nothing is taken.
    for (what, rc) in [
        ("uio_pci_generic is not loaded", "NOUIO-RC=2"),
        ("is in use: its interface", "INUSE-RC=2"),
        ("not a virtio-net function", "WRONG-RC=2"),
        ("no hugetlbfs of 2 MiB pages mounted", "NOMOUNT-RC=2"),
        ("hugepages of 2 MiB", "NOPAGES-RC=2"),
    ] {
        assert!(o.contains(what) && o.contains(rc), "{what}: {o}");
    }
    assert!(o.contains("STILL DRIVER=virtio-pci"), "{o}");
    // Ping both ways.
    assert!(o.contains("PING-RC=0"), "{o}");
    assert!(o.contains("3 packets transmitted, 3 received"), "{o}");
    assert!(o.contains("echo requests answered: 3"), "{o}");
    assert!(host_ping.contains("3 received"), "{host_ping}");

    // vnic-iperf as client, both directions: both ends' byte counts.
    assert!(o.contains("C-RC=0"), "{o}");
    let c = json(&between(o, "C-BEGIN", "C-END"));
    agree(bytes(&c, "sum_sent"), bytes(&c, "sum_received"), "client");
    assert!(o.contains("R-RC=0"), "{o}");
    let r = json(&between(o, "R-BEGIN", "R-END"));
    agree(
        bytes(&r, "sum_sent"),
        bytes(&r, "sum_received"),
        "client -R",
    );
    // vnic-iperf as server for the host's iperf3.
    assert!(o.contains("S-RC=0"), "{o}");
    let h = json(&host_client);
    agree(bytes(&h, "sum_sent"), bytes(&h, "sum_received"), "server");

    // Both queue pairs carried traffic: the two streams of the first run
    // go out from two shards, one TX queue each. What comes back lands
    // on the RX queue the host's TAP queue maps to (QEMU's virtio-net-pci
    // offers no RSS here), so both RX queues see some, not necessarily
    // much.
    let n = |q: &str| stats[&format!("{q}.packets")];
    eprintln!(
        "vnicd packets per queue during the PCI runs: rx0 {} rx1 {} tx0 {} tx1 {}",
        n("rx0"),
        n("rx1"),
        n("tx0"),
        n("tx1")
    );
    assert!(n("tx0") > 100 && n("tx1") > 100, "{stats:?}");
    assert!(
        n("rx0") > 0 && n("rx1") > 0 && n("rx0") + n("rx1") > 100,
        "{stats:?}"
    );

    // Interrupted, the tool gave the function back too.
    assert!(o.contains("SIG-RC=130 SIG-DRIVER=virtio-pci"), "{o}");

    // The function went back to virtio_net and works there.
    assert!(o.contains("AFTER DRIVER=virtio-pci NIC=eth"), "{o}");
    assert!(o.contains("K-RC=0"), "{o}");
    let k = json(&between(o, "K-BEGIN", "K-END"));
    assert!(bytes(&k, "sum_received") > 0, "{k}");
    assert!(o.contains("KR-RC=0"), "{o}");
    let kr = json(&between(o, "KR-BEGIN", "KR-END"));
    assert!(bytes(&kr, "sum_received") > 0, "{kr}");

    let retr = |v: &Value| v["end"]["sum_sent"]["retransmits"].as_i64().unwrap_or(-1);
    eprintln!(
        "accel {:?}: guest to host, 2 streams: vnic-iperf over PCI {:.0} Mbit/s \
         ({} retransmits), the guest kernel's virtio_net with iperf3 {:.0} Mbit/s \
         ({} retransmits); host to guest, 1 stream: vnic-iperf -R {:.0} Mbit/s, \
         iperf3 -R {:.0} Mbit/s; host to vnic-iperf -s {:.0} Mbit/s ({} retransmits; \
         vnicd dropped {} frames on receive during the PCI runs)",
        accel(),
        mbits(&c, "sum_received"),
        retr(&c),
        mbits(&k, "sum_received"),
        retr(&k),
        mbits(&r, "sum_received"),
        mbits(&kr, "sum_received"),
        mbits(&h, "sum_received"),
        retr(&h),
        stats
            .iter()
            .filter(|(k, _)| k.starts_with("rx") && k.contains(".drop."))
            .map(|(_, v)| v)
            .sum::<u64>(),
    );
}
