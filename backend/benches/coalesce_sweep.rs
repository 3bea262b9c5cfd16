//! Interrupt and receive segment coalescing, swept: one Linux guest under
//! QEMU on vnicd receives TCP from the kernel in a namespace (iperf3 -R;
//! the kernel sends with TSO and GSO off, so frames are MSS-sized and
//! there is something to coalesce), and pings it, once per setting. The
//! settings are (rx-usecs, rx-frames) pairs and adaptive mode, each with
//! receive segment coalescing off and on; coalescing off is the baseline
//! of the same run. Reported per setting: the guest's interrupts per
//! second (its /proc/interrupts, all virtio queues: TCG runs with INTx),
//! the throughput, the ping round trip (median), vnicd's notifications
//! per queue and its merged segments per coalesced frame.
//!
//! `cargo bench -p vnic-backend --bench coalesce_sweep` prints a table and
//! writes it as CSV to `target/coalesce_sweep.csv` (`tools/sweep.sh` makes
//! the plot). VNIC_SWEEP_SECONDS sets each iperf3 run (default 3).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{fmt::Write as _, time::Duration};

use vnic_tests::{
    qemu::{accel, between, iperf_number, Guest, GuestOpts, IperfServer},
    PortInNs,
};

const VNICD: &str = env!("CARGO_BIN_EXE_vnicd");
const MAC: &str = "52:54:00:12:34:56";

/// One setting of the sweep.
struct Setting {
    label: &'static str,
    /// `vnicd ctl coalesce` words.
    coalesce: &'static str,
    rsc: bool,
}

/// TX stays off but where named: the guest's interrupts for a TCP
/// receive are mostly its ACKs' completions, which TX coalescing holds.
const COALESCE: [(&str, &str); 7] = [
    ("off", "rx-usecs 0 rx-frames 0 tx-usecs 0 tx-frames 0"),
    ("25us/8", "rx-usecs 25 rx-frames 8 tx-usecs 0 tx-frames 0"),
    ("50us/16", "rx-usecs 50 rx-frames 16 tx-usecs 0 tx-frames 0"),
    (
        "100us/32",
        "rx-usecs 100 rx-frames 32 tx-usecs 0 tx-frames 0",
    ),
    (
        "200us/64",
        "rx-usecs 200 rx-frames 64 tx-usecs 0 tx-frames 0",
    ),
    (
        "200us/64 rx+tx",
        "rx-usecs 200 rx-frames 64 tx-usecs 200 tx-frames 64",
    ),
    (
        "adaptive rx+tx",
        "rx-usecs 0 rx-frames 0 tx-usecs 0 tx-frames 0 adaptive-rx on adaptive-tx on",
    ),
];

fn settings() -> Vec<Setting> {
    [false, true]
        .into_iter()
        .flat_map(|rsc| {
            COALESCE.iter().map(move |&(label, coalesce)| Setting {
                label,
                coalesce,
                rsc,
            })
        })
        .collect()
}

fn script(n: usize, secs: u64) -> String {
    format!(
        r#"ip link set eth0 up
ip addr add 192.0.2.2/24 dev eth0
irqs() {{ awk '/virtio/ {{ for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i }} END {{ print s + 0 }}' /proc/interrupts; }}
up() {{ cut -d' ' -f1 /proc/uptime; }}
i=0; while ! ping -c 1 -W 1 192.0.2.1 >/dev/null; do i=$((i+1)); [ $i -gt 30 ] && break; done
k=0
while [ $k -lt {n} ]; do
  echo READY-$k; sleep 2
  a=$(irqs); t0=$(up)
  iperf3 -c 192.0.2.1 -R -t {secs} -J > /tmp/j
  b=$(irqs); t1=$(up)
  echo "RES-$k irq=$((b - a)) t0=$t0 t1=$t1"
  grep -A 12 '"sum_received"' /tmp/j
  ping -c 30 -i 0.1 -W 1 192.0.2.1 | grep time=
  echo END-$k
  k=$((k + 1))
done
"#
    )
}

fn field(s: &str, key: &str) -> f64 {
    s.split(key)
        .nth(1)
        .and_then(|x| x.split_whitespace().next())
        .and_then(|x| x.parse().ok())
        .unwrap_or(f64::NAN)
}

fn main() {
    let secs: u64 = std::env::var("VNIC_SWEEP_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let all = settings();
    let p = PortInNs::start(VNICD, &[], "192.0.2.1/24", &[("192.0.2.2", MAC)])
        .expect("vnicd with its TAP in a namespace");
    let _srv = IperfServer::start(&p.ns.name, "192.0.2.1").expect("iperf3 -s");
    let mut g = Guest::boot(&GuestOpts {
        socket: Some(p.vnicd.socket.clone()),
        mac: MAC.into(),
        script: script(all.len(), secs),
        ..GuestOpts::default()
    })
    .expect("qemu");
    let timeout = Duration::from_secs(120 + 2 * secs);
    let mut rows = Vec::new();
    for (k, s) in all.iter().enumerate() {
        g.wait_for(&format!("READY-{k}"), timeout)
            .expect("the guest's next run");
        if k == 0 {
            // Once the guest's driver has negotiated (vnicd then set the
            // TAP's offloads to what it takes): MSS-sized frames.
            p.ns.exec("ethtool", &["-K", &p.tap, "tso", "off", "gso", "off"])
                .expect("TSO and GSO off on the kernel's side");
        }
        p.vnicd
            .ctl(&format!(
                "coalesce adaptive-rx off adaptive-tx off {}",
                s.coalesce
            ))
            .expect("coalesce");
        let rsc = if s.rsc { "on" } else { "off" };
        p.vnicd
            .ctl(&format!("offload rx-gro-hw {rsc}"))
            .expect("rx-gro-hw");
        let before = p.vnicd.stats().expect("stats");
        g.wait_for(&format!("END-{k}"), timeout)
            .expect("the guest's run");
        let after = p.vnicd.stats().expect("stats");
        let d = |key: &str| after[key] - before.get(key).copied().unwrap_or(0);
        let out = g.console();
        let run = between(&out, &format!("RES-{k} "), &format!("END-{k}"));
        let irq = field(&run, "irq=");
        let elapsed = field(&run, "t1=") - field(&run, "t0=");
        let gbps = iperf_number(&run, "\"sum_received\"", "bits_per_second").unwrap_or(0.0) / 1e9;
        let merged = d("rx0.rsc.merged");
        let frames = d("rx0.rsc.frames");
        rows.push((
            s,
            irq / elapsed,
            gbps,
            vnic_tests::median(vnic_tests::ping_times_us(&run)),
            d("rx0.notifications"),
            d("tx0.notifications"),
            if frames > 0 {
                merged as f64 / frames as f64
            } else {
                0.0
            },
        ));
        eprintln!("{} rsc {rsc}: done", s.label);
    }
    drop(g);
    let mut csv = String::from(
        "setting,rsc,irq_per_s,gbps,rtt_us,rx_notifications,tx_notifications,segs_per_frame\n",
    );
    println!(
        "guest: Debian 6.12 cloud kernel, 2 vCPUs, 1 queue pair, QEMU {:?}; iperf3 -R -t {secs} \
         from the kernel with TSO/GSO off; ping -c 30 -i 0.1",
        accel()
    );
    println!(
        "| coalescing | RSC | guest interrupts/s | Gbit/s | ping median µs | vnicd RX / TX notifications | segments per RSC frame |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (s, irq_s, gbps, rtt, rx_notes, tx_notes, segs) in &rows {
        let rsc = if s.rsc { "on" } else { "off" };
        println!(
            "| {} | {rsc} | {irq_s:.0} | {gbps:.2} | {rtt:.0} | {rx_notes} / {tx_notes} | {segs:.1} |",
            s.label
        );
        let _ = writeln!(
            csv,
            "{},{rsc},{irq_s:.1},{gbps:.3},{rtt:.1},{rx_notes},{tx_notes},{segs:.2}",
            s.label
        );
    }
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/coalesce_sweep.csv");
    if let Err(e) = std::fs::write(&path, csv) {
        eprintln!("{}: {e}", path.display());
    }
}
