//! vnic-iperf over vnicd against the kernel's iperf3 in a namespace, with
//! TSO and checksum offload, without TSO, and without either, side by
//! side in one run. `cargo bench -p vnic-guest --bench stack_offloads`
//! (root; builds vnicd with the workspace).
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use vnic_tests::{require_netns, PortInNs};

fn main() {
    if !require_netns() {
        return;
    }
    let iperf = env!("CARGO_BIN_EXE_vnic-iperf");
    let vnicd = Path::new(iperf).with_file_name("vnicd");
    assert!(
        vnicd.exists(),
        "build vnicd first: cargo build --release -p vnic-backend"
    );
    let secs = std::env::var("VNIC_BENCH_SECS").unwrap_or_else(|_| "5".into());
    println!("| offloads | guest -> kernel Gbit/s | kernel -> guest Gbit/s | guest retransmits |");
    println!("|---|---|---|---|");
    for (name, flags) in [
        ("TSO + checksum", &[][..]),
        ("checksum only (--no-tso)", &["--no-tso"][..]),
        ("none (--no-csum)", &["--no-csum"][..]),
    ] {
        let s =
            PortInNs::start(&vnicd.display().to_string(), &[], "192.0.2.1/24", &[]).expect("vnicd");
        let mut row = Vec::new();
        let mut retr = 0;
        for rev in [false, true] {
            let mut server = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &s.ns.name,
                    "iperf3",
                    "-s",
                    "-1",
                    "-B",
                    "192.0.2.1",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("iperf3 -s");
            std::thread::sleep(Duration::from_millis(500));
            let sock = s.vnicd.socket.display().to_string();
            let mut a = vec![
                "--socket",
                &sock,
                "--addr",
                "192.0.2.2/24",
                "-c",
                "192.0.2.1",
                "-t",
                &secs,
                "-J",
            ];
            a.extend_from_slice(flags);
            if rev {
                a.push("-R");
            }
            let out = Command::new(iperf).args(&a).output().expect("vnic-iperf");
            let _ = server.wait();
            let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
                panic!(
                    "vnic-iperf {a:?}: {e}: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            });
            let bps = doc["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .unwrap_or(0.0);
            if !rev {
                retr = doc["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
            }
            row.push(format!("{:.2}", bps / 1e9));
        }
        println!("| {name} | {} | {} | {retr} |", row[0], row[1]);
    }
}
