//! vnic-iperf over vnicd against the kernel's iperf3 in a namespace, by
//! offload, side by side in one run: TCP on the device's TOE, TSO and
//! checksum offload, checksum only, none. For each direction: the rate,
//! the guest's CPU time per GB moved (vnic-iperf's, the driver and stack
//! included) and vnicd's. `cargo bench -p vnic-guest --bench
//! stack_offloads` (root; build vnicd first with `cargo build --release
//! -p vnic-backend`). VNIC_BENCH_SECS sets each run's length (5),
//! VNIC_BENCH_ROUNDS how many rounds of every case run, one case after
//! the other in each (3; medians are shown, and a TOE row's ratios to TSO
//! are the median of each round's: this machine's speed swings from one
//! minute to the next).
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use vnic_tests::{require_netns, PortInNs};

/// CPU time of process `pid` so far, its exited threads included, in
/// seconds (vnicd's workers end with each frontend connection).
fn process_cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis: utime and stime
    // are the 12th and 13th there.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    // SAFETY: sysconf reads a constant of the system.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    f.iter().sum::<f64>() / hz
}

/// CPU time of the children waited for so far, in seconds.
fn children_cpu() -> f64 {
    // SAFETY: getrusage fills the zeroed struct it is given and nothing
    // else.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru);
        ru
    };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// One run: (Gbit/s, GB moved, guest CPU s, vnicd CPU s, retransmits).
fn run(
    iperf: &str,
    s: &PortInNs,
    flags: &[&str],
    rev: bool,
    secs: &str,
) -> (f64, f64, f64, f64, u64) {
    let mut server = Command::new("ip")
        .args(["netns", "exec", &s.ns.name])
        .args(["iperf3", "-s", "-1", "-B", "192.0.2.1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 -s");
    std::thread::sleep(Duration::from_millis(500));
    let sock = s.vnicd.socket.display().to_string();
    let mut a = vec!["--socket", &sock, "--addr", "192.0.2.2/24"];
    a.extend_from_slice(flags);
    a.extend_from_slice(&["-c", "192.0.2.1", "-t", secs, "-J"]);
    if rev {
        a.push("-R");
    }
    let (cpu0, dev0) = (children_cpu(), process_cpu(s.vnicd.pid()));
    let out = Command::new(iperf).args(&a).output().expect("vnic-iperf");
    let (cpu1, dev1) = (children_cpu(), process_cpu(s.vnicd.pid()));
    let _ = server.wait();
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "vnic-iperf {a:?}: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let r = &doc["end"]["sum_received"];
    let bps = r["bits_per_second"].as_f64().unwrap_or(0.0);
    let gb = r["bytes"].as_f64().unwrap_or(0.0) / 1e9;
    let retr = doc["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
    (bps / 1e9, gb, cpu1 - cpu0, dev1 - dev0, retr)
}

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
    let rounds: usize = std::env::var("VNIC_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
        .max(1);
    let cases: [(&str, &[&str]); 5] = [
        ("TSO + checksum", &[]),
        ("TOE (--toe, 2 MiB rings)", &["--toe"]),
        (
            "TOE (--toe --toe-ring-kib 1024)",
            &["--toe", "--toe-ring-kib", "1024"],
        ),
        ("checksum only (--no-tso)", &["--no-tso"]),
        ("none (--no-csum)", &["--no-csum"]),
    ];
    // Per case and direction, per round: (Gbit/s, guest s/GB, vnicd
    // s/GB); and the sender's retransmits.
    let mut got = vec![[Vec::new(), Vec::new()]; cases.len()];
    let mut retr = vec![0u64; cases.len()];
    for _ in 0..rounds {
        for (c, (_, flags)) in cases.iter().enumerate() {
            let s = PortInNs::start(&vnicd.display().to_string(), &[], "192.0.2.1/24", &[])
                .expect("vnicd");
            for (i, rev) in [false, true].into_iter().enumerate() {
                let (gbps, gb, guest, dev, r) = run(iperf, &s, flags, rev, &secs);
                if !rev {
                    retr[c] += r;
                }
                let per = |cpu: f64| if gb > 0.0 { cpu / gb } else { f64::NAN };
                got[c][i].push((gbps, per(guest), per(dev)));
            }
        }
    }
    let median = |v: &[(f64, f64, f64)], f: fn(&(f64, f64, f64)) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        x.sort_by(f64::total_cmp);
        x[x.len() / 2]
    };
    println!(
        "| offloads | guest -> kernel Gbit/s | guest CPU s/GB | vnicd CPU s/GB | kernel -> guest Gbit/s | guest CPU s/GB | vnicd CPU s/GB | guest retransmits |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    // A TOE row's ratios to TSO are taken round by round (the two ran
    // within a minute of each other), then the median of those: the
    // machine's speed drifts between rounds.
    let ratio = |c: usize, i: usize, f: fn(&(f64, f64, f64)) -> f64| {
        let mut r: Vec<f64> = got[c][i]
            .iter()
            .zip(&got[0][i])
            .map(|(a, t)| f(a) / f(t).max(1e-9))
            .collect();
        r.sort_by(f64::total_cmp);
        r[r.len() / 2]
    };
    for (c, (name, flags)) in cases.iter().enumerate() {
        let mut cells = Vec::new();
        for (i, runs) in got[c].iter().enumerate() {
            let (gbps, guest, dev) = (
                median(runs, |r| r.0),
                median(runs, |r| r.1),
                median(runs, |r| r.2),
            );
            let vs = if flags.first() == Some(&"--toe") {
                (
                    format!(" ({:.2}x TSO)", ratio(c, i, |r| r.0)),
                    format!(" ({:.2}x TSO)", ratio(c, i, |r| r.1)),
                )
            } else {
                (String::new(), String::new())
            };
            cells.push(format!("{gbps:.2}{} | {guest:.3}{} | {dev:.3}", vs.0, vs.1));
        }
        println!("| {name} | {} | {} | {} |", cells[0], cells[1], retr[c]);
    }
    eprintln!("every round (Gbit/s, guest s/GB, vnicd s/GB), out then in:");
    for (c, (name, _)) in cases.iter().enumerate() {
        eprintln!("{name}: {:.2?} {:.2?}", got[c][0], got[c][1]);
    }
}
