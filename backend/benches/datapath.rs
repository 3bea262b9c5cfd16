//! vnicd's data path, measured over the vhost-user transport on this
//! machine: vnic-guest in this process drives a vnicd process whose
//! uplink is a `sink` (transmit) or a `source` (receive), so the numbers
//! are the device's and not a kernel's. Each case runs beside a baseline
//! in the same run: a plain memcpy of the same frame bytes, the least a
//! device that moves them could cost.
//!
//! Instructions per packet come from valgrind's callgrind (this machine
//! has no hardware counters): vnicd runs twice under it with different
//! packet counts, and the difference is divided by the packet difference.
//!
//! `cargo bench -p vnic-backend --bench datapath` (VNIC_BENCH_SECONDS sets
//! the time per case, default 3; VNIC_BENCH_NO_CALLGRIND=1 skips the
//! instruction counts; VNIC_BENCH_ONLY=TEXT runs the cases whose name and
//! size contain TEXT; VNIC_BENCH_KEEP=PATH keeps callgrind's output).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{
    hint::black_box,
    path::Path,
    time::{Duration, Instant},
};

use vnic_guest::net::{NetOptions, VirtioNet};
use vnic_protocol::{
    virtio::{hdr::GsoType, HdrFlags, VirtioNetHdr},
    wire::{
        build::{data_segment, tcp_frame, udp_frame, Flow, IpFields},
        tcp::Flags,
    },
};
use vnic_tests::Vnicd;

const VNICD: &str = env!("CARGO_BIN_EXE_vnicd");

#[derive(Clone, Copy)]
enum Dir {
    /// guest -> vnicd -> sink
    Tx,
    /// source -> vnicd -> guest
    Rx,
}

struct Case {
    name: &'static str,
    dir: Dir,
    size: usize,
}

fn frame(size: usize) -> (VirtioNetHdr, Vec<u8>) {
    let ip = IpFields::default();
    if size <= 1514 {
        let f = udp_frame(
            &Flow::v4(),
            &ip,
            &vec![0x5a; size.saturating_sub(42).max(18)],
        )
        .unwrap();
        (VirtioNetHdr::default(), f)
    } else {
        let f = tcp_frame(
            &Flow::v4(),
            data_segment(1, 1, Flags::ACK),
            &ip,
            &vec![0x5a; size - 66],
        )
        .unwrap();
        let h = VirtioNetHdr {
            flags: HdrFlags::NEEDS_CSUM,
            gso_type: GsoType::TcpV4 as u8,
            hdr_len: 66,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            ..Default::default()
        };
        (h, f)
    }
}

fn opts() -> NetOptions {
    NetOptions {
        queue_size: 1024,
        ..Default::default()
    }
}

fn start(case: &Case, wrapper: &[&str], once: bool) -> Vnicd {
    let uplink = match case.dir {
        Dir::Tx => "sink".to_owned(),
        Dir::Rx => format!("source:{}", case.size),
    };
    let mut args = vec!["--uplink", uplink.as_str(), "--queue-size", "1024"];
    if once {
        args.push("--once");
    }
    Vnicd::start_wrapped(wrapper, VNICD, &args).expect("vnicd starts")
}

/// Moves packets for `dur` or until `limit` packets; returns (packets,
/// frame bytes, seconds).
fn drive(socket: &Path, case: &Case, dur: Duration, limit: u64) -> (u64, u64, f64) {
    let mut g = VirtioNet::connect(socket, opts()).expect("guest connects");
    let (hdr, f) = frame(case.size);
    let t0 = Instant::now();
    let (mut pkts, mut bytes) = (0u64, 0u64);
    match case.dir {
        Dir::Tx => {
            let mut posted = 0u64;
            while t0.elapsed() < dur && pkts < limit {
                while posted < limit && g.post_tx(0, &hdr, &f).unwrap() {
                    posted += 1;
                }
                g.kick_tx(0).unwrap();
                let n = g.reclaim_tx(0).unwrap() as u64;
                pkts += n;
                bytes += n * f.len() as u64;
                if n == 0 {
                    std::thread::yield_now();
                }
            }
        }
        Dir::Rx => {
            while t0.elapsed() < dur && pkts < limit {
                let budget = (limit - pkts).min(256) as usize;
                let n = g
                    .recv_batch(0, budget, &mut |r| bytes += r.frame.len() as u64)
                    .unwrap();
                pkts += n as u64;
                if n == 0 {
                    std::thread::yield_now();
                }
            }
        }
    }
    if std::env::var("VNIC_BENCH_STATS").is_ok() {
        eprintln!(
            "guest: {pkts} packets, {} rx length errors",
            g.rx_length_errors
        );
    }
    (pkts, bytes, t0.elapsed().as_secs_f64())
}

/// Packets per second of memcpy'ing the same frame into a buffer.
fn baseline(size: usize, dur: Duration) -> f64 {
    let (_, f) = frame(size);
    let mut dst = vec![0u8; f.len()];
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed() < dur {
        for _ in 0..1000 {
            dst.copy_from_slice(black_box(&f));
            black_box(&dst);
        }
        n += 1000;
    }
    n as f64 / t0.elapsed().as_secs_f64()
}

/// Total instructions callgrind counted for a vnicd run of `limit` packets.
fn callgrind_total(case: &Case, limit: u64) -> Option<u64> {
    let dir = std::env::temp_dir().join(format!("vnic-cg-{}-{limit}", std::process::id()));
    std::fs::create_dir_all(&dir).ok()?;
    let out = dir.join("callgrind.out");
    let arg = format!("--callgrind-out-file={}", out.display());
    let v = start(case, &["valgrind", "--tool=callgrind", "-q", &arg], true);
    let (n, _, _) = drive(&v.socket, case, Duration::from_secs(600), limit);
    if n < limit {
        return None;
    }
    // The guest hung up: vnicd (--once) exits and callgrind writes out.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut v = v;
    while v.alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = std::fs::read_to_string(&out).ok()?;
    if let Ok(keep) = std::env::var("VNIC_BENCH_KEEP") {
        let _ = std::fs::copy(&out, format!("{keep}.{limit}"));
    }
    let _ = std::fs::remove_dir_all(&dir);
    text.lines()
        .find_map(|l| {
            l.strip_prefix("summary:")
                .or_else(|| l.strip_prefix("totals:"))
        })
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

fn instructions_per_packet(case: &Case) -> Option<f64> {
    let (a, b) = (5_000, 25_000);
    let lo = callgrind_total(case, a)?;
    let hi = callgrind_total(case, b)?;
    Some((hi.saturating_sub(lo)) as f64 / (b - a) as f64)
}

fn main() {
    // `cargo bench` passes --bench; nothing else is taken.
    let secs: u64 = std::env::var("VNIC_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let dur = Duration::from_secs(secs);
    let callgrind = std::env::var("VNIC_BENCH_NO_CALLGRIND").as_deref() != Ok("1")
        && std::process::Command::new("valgrind")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    let cases = [
        Case {
            name: "guest->vnicd->sink",
            dir: Dir::Tx,
            size: 64,
        },
        Case {
            name: "guest->vnicd->sink",
            dir: Dir::Tx,
            size: 1500,
        },
        Case {
            name: "guest->vnicd->sink (TSO)",
            dir: Dir::Tx,
            size: 65000,
        },
        Case {
            name: "source->vnicd->guest",
            dir: Dir::Rx,
            size: 64,
        },
        Case {
            name: "source->vnicd->guest",
            dir: Dir::Rx,
            size: 1500,
        },
        Case {
            name: "source->vnicd->guest (GSO)",
            dir: Dir::Rx,
            size: 65000,
        },
    ];
    println!("| path | frame | packets/s | Gbit/s | memcpy baseline packets/s | vs baseline | instructions/packet |");
    println!("|---|---|---|---|---|---|---|");
    let only = std::env::var("VNIC_BENCH_ONLY").unwrap_or_default();
    for c in cases
        .iter()
        .filter(|c| format!("{} {}", c.name, c.size).contains(&only))
    {
        let v = start(c, &[], false);
        let (n, bytes, s) = drive(&v.socket, c, dur, u64::MAX);
        if std::env::var("VNIC_BENCH_STATS").is_ok() {
            let st = v.stats().unwrap();
            let nz: Vec<_> = st.iter().filter(|(_, v)| **v != 0).collect();
            eprintln!("{}: {nz:?}", c.name);
        }
        drop(v);
        let pps = n as f64 / s;
        let gbps = bytes as f64 * 8.0 / s / 1e9;
        let base = baseline(c.size, Duration::from_secs(1));
        let ipp = if callgrind {
            instructions_per_packet(c).map_or("n/a".to_owned(), |v| format!("{v:.0}"))
        } else {
            "skipped".to_owned()
        };
        println!(
            "| {} | {} B | {:.0} | {:.2} | {:.0} | {:.3}x | {} |",
            c.name,
            c.size,
            pps,
            gbps,
            base,
            pps / base,
            ipp
        );
    }
}
