//! vnicd's data path, measured over the vhost-user transport on this
//! machine: vnic-guest in this process drives a vnicd process whose
//! uplink is a `sink` (transmit) or a `source` (receive), so the numbers
//! are the device's and not a kernel's. Each case runs beside a baseline
//! in the same run: a plain memcpy of the same frame bytes, the least a
//! device that moves them could cost.
//!
//! Instructions per packet, on request, come from valgrind's callgrind
//! (this machine has no hardware counters): vnicd runs twice under it with
//! different packet counts, and the difference is divided by the packet
//! difference.
//!
//! `cargo bench -p vnic-backend --bench datapath` (VNIC_BENCH_SECONDS sets
//! the time per case, default 3; VNIC_BENCH_CALLGRIND=1 adds the
//! instruction counts, which take minutes; VNIC_BENCH_ONLY=TEXT runs the
//! cases whose name and size contain TEXT, `pairs` only the run by queue
//! pairs; VNIC_BENCH_KEEP=PATH keeps callgrind's output).
//!
//! Last, guest->device 64 B frames over 1 to 16 queue pairs, vnicd's
//! workers all on one core: the aggregate rate and vnicd's cycles per
//! frame.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{
    hint::black_box,
    path::Path,
    time::{Duration, Instant},
};

use vnic_guest::net::{NetOptions, VirtioNet};
use vnic_protocol::{
    virtio::{hdr::GsoType, Features, VirtioNetHdr},
    wire::{
        build::{data_segment, tcp_frame, udp_frame, Flow, IpFields},
        ethernet::Address,
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

/// vnicd's default MAC address.
const VNICD_MAC: Address = Address([0x52, 0x54, 0, 0x12, 0x34, 0x56]);

/// A frame of `size` bytes, from the device's own address as a guest
/// sends it.
fn frame(size: usize) -> (VirtioNetHdr, Vec<u8>) {
    let ip = IpFields::default();
    let flow = Flow {
        src_mac: VNICD_MAC,
        ..Flow::v4()
    };
    if size <= 1514 {
        let f = udp_frame(&flow, &ip, &vec![0x5a; size.saturating_sub(42).max(18)]).unwrap();
        (VirtioNetHdr::default(), f)
    } else {
        let f = tcp_frame(
            &flow,
            data_segment(1, 1, Flags::ACK),
            &ip,
            &vec![0x5a; size - 66],
        )
        .unwrap();
        (VirtioNetHdr::tcp_tso(GsoType::TcpV4, 34, 66, 1448), f)
    }
}

fn opts() -> NetOptions {
    NetOptions {
        queue_size: 1024,
        // As the stack and a Linux guest drive it.
        features: NetOptions::DEFAULT_FEATURES | Features::EVENT_IDX,
        ..Default::default()
    }
}

/// Frames a driver posts before it kicks (testpmd's default burst).
const BURST: usize = 32;

fn start(case: &Case, wrapper: &[&str], once: bool) -> Vnicd {
    let uplink = match case.dir {
        Dir::Tx => "sink".to_owned(),
        Dir::Rx => format!("source:{}", case.size),
    };
    // One pair, as the guest drives one: a `source` uplink queue whose RX
    // queue is off would have its endless frames forwarded to the pair
    // that is on, and dropped there, on the same worker's time.
    let mut args = vec![
        "--uplink",
        uplink.as_str(),
        "--queue-size",
        "1024",
        "--queues",
        "1",
    ];
    if once {
        args.push("--once");
    }
    Vnicd::start_wrapped(wrapper, VNICD, &args).expect("vnicd starts")
}

/// What one run moved.
struct Moved {
    packets: u64,
    bytes: u64,
    secs: f64,
    /// Guest notifications to the device (TX kicks, or RX refill kicks).
    kicks: u64,
    /// TX waits for room that timed out (a lost wake-up).
    stalls: u64,
}

/// Moves packets for `dur` or until `limit` packets. Transmit is a
/// driver's: bursts of [`BURST`] with one kick each if the device asks,
/// and a sleep on the TX interrupt when the ring is full; the packets
/// counted are those the device handed back.
fn drive(socket: &Path, case: &Case, dur: Duration, limit: u64) -> Moved {
    let mut g = VirtioNet::connect(socket, opts()).expect("guest connects");
    let (hdr, f) = frame(case.size);
    let t0 = Instant::now();
    let (mut pkts, mut bytes, mut kicks, mut stalls) = (0u64, 0u64, 0u64, 0u64);
    match case.dir {
        Dir::Tx => {
            let tx = g.tx(0).unwrap();
            while t0.elapsed() < dur && tx.completed < limit {
                let want = (BURST as u64).min(limit - tx.posted) as usize;
                if want == 0 || tx.post_burst(&hdr, &f, want).unwrap() == 0 {
                    tx.wait_for_room(Duration::from_secs(1)).unwrap();
                }
            }
            pkts = tx.completed;
            bytes = pkts * f.len() as u64;
            kicks = tx.kicks;
            stalls = tx.stalls;
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
    Moved {
        packets: pkts,
        bytes,
        secs: t0.elapsed().as_secs_f64(),
        kicks,
        stalls,
    }
}

/// Guest->device 64 B frames over `pairs` queue pairs of 256 entries:
/// this thread posts a burst to every TX queue in turn (as testpmd's one
/// forwarding core does), vnicd runs a worker per pair, all pinned to
/// core 1. Returns frames per second (all queues) and vnicd's CPU cycles
/// per frame (every thread's CPU time at `mhz`).
fn by_pairs(pairs: u16, dur: Duration, mhz: f64) -> (f64, f64) {
    let q = pairs.to_string();
    let v = Vnicd::start_wrapped(
        &["taskset", "-c", "1"],
        VNICD,
        &["--uplink", "sink", "--queue-size", "256", "--queues", &q],
    )
    .expect("vnicd on core 1");
    let mut g = VirtioNet::connect(
        &v.socket,
        NetOptions {
            pairs,
            queue_size: 256,
            ..opts()
        },
    )
    .expect("guest connects");
    let (hdr, f) = frame(64);
    let queues = usize::from(pairs);
    let send_until = |g: &mut VirtioNet, end: Instant| {
        while Instant::now() < end {
            let mut posted = 0;
            for i in 0..queues {
                posted += g.tx(i).unwrap().post_burst(&hdr, &f, BURST).unwrap();
            }
            if posted == 0 {
                // Every ring full: sleep on one queue's completions.
                g.tx(0)
                    .unwrap()
                    .wait_for_room(Duration::from_millis(10))
                    .unwrap();
            }
        }
    };
    let completed =
        |g: &mut VirtioNet| -> u64 { (0..queues).map(|i| g.tx(i).unwrap().completed).sum() };
    send_until(&mut g, Instant::now() + Duration::from_millis(500));
    let (t0, c0, n0) = (
        Instant::now(),
        vnic_tests::cpu_ns(v.pid()),
        completed(&mut g),
    );
    send_until(&mut g, t0 + dur);
    let (t1, c1, n1) = (
        Instant::now(),
        vnic_tests::cpu_ns(v.pid()),
        completed(&mut g),
    );
    let frames = n1.saturating_sub(n0) as f64;
    let busy = c1.saturating_sub(c0) as f64 / 1e9;
    (frames / (t1 - t0).as_secs_f64(), busy * mhz * 1e6 / frames)
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
    let n = drive(&v.socket, case, Duration::from_secs(600), limit).packets;
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
    let callgrind = std::env::var("VNIC_BENCH_CALLGRIND").as_deref() == Ok("1");
    if callgrind
        && !std::process::Command::new("valgrind")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    {
        eprintln!("VNIC_BENCH_CALLGRIND=1 needs valgrind");
        std::process::exit(1);
    }
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
    println!("| path | frame | packets/s | Gbit/s | memcpy baseline packets/s | vs baseline | guest kicks/packet | vnicd notifications/packet | instructions/packet |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let only = std::env::var("VNIC_BENCH_ONLY").unwrap_or_default();
    for c in cases
        .iter()
        .filter(|c| format!("{} {}", c.name, c.size).contains(&only))
    {
        let v = start(c, &[], false);
        let m = drive(&v.socket, c, dur, u64::MAX);
        let st = v.stats().unwrap();
        if std::env::var("VNIC_BENCH_STATS").is_ok() {
            let nz: Vec<_> = st.iter().filter(|(_, v)| **v != 0).collect();
            eprintln!("{}: {nz:?}", c.name);
        }
        drop(v);
        assert_eq!(m.stalls, 0, "{}: a transmit wait timed out", c.name);
        let q = match c.dir {
            Dir::Tx => "tx0",
            Dir::Rx => "rx0",
        };
        let notes = st.get(&format!("{q}.notifications")).copied().unwrap_or(0);
        let pps = m.packets as f64 / m.secs;
        let gbps = m.bytes as f64 * 8.0 / m.secs / 1e9;
        let base = baseline(c.size, Duration::from_secs(1));
        let per = |x: u64| {
            if m.packets == 0 {
                "n/a".to_owned()
            } else {
                format!("{:.4}", x as f64 / m.packets as f64)
            }
        };
        let kicks = match c.dir {
            Dir::Tx => per(m.kicks),
            Dir::Rx => "-".to_owned(),
        };
        let ipp = if callgrind {
            instructions_per_packet(c).map_or("n/a".to_owned(), |v| format!("{v:.0}"))
        } else {
            "-".to_owned()
        };
        println!(
            "| {} | {} B | {:.0} | {:.2} | {:.0} | {:.3}x | {} | {} | {} |",
            c.name,
            c.size,
            pps,
            gbps,
            base,
            pps / base,
            kicks,
            per(notes),
            ipp
        );
    }
    if !only.is_empty() && !"pairs".contains(&only) {
        return;
    }
    // More worker threads than cores: the aggregate should hold.
    let mhz = vnic_tests::cpu_mhz();
    println!();
    println!("guest->vnicd->sink, 64 B, by queue pairs (vnicd's workers all on core 1)");
    println!("| pairs | packets/s | vnicd cycles/packet |");
    println!("|---|---|---|");
    for pairs in [1u16, 2, 4, 8, 16] {
        let (pps, cycles) = by_pairs(pairs, dur, mhz);
        println!("| {pairs} | {pps:.0} | {cycles:.0} |");
    }
}
