//! vnicd against DPDK's own vhost-user backend, side by side in one run,
//! with DPDK's testpmd as the frontend in both: its virtio-user PMD (one
//! queue pair, 256-entry rings, `in_order=0`, bursts of 32) on core 0
//! sends (`txonly`) or receives (`rxonly`) as fast as it can; the backend
//! runs on core 1: vnicd (`--uplink sink` or `source:SIZE`) or testpmd's
//! `net_vhost0` in `rxonly` / `txonly` mode.
//!
//! Reported per direction and frame size: the frames per second the
//! backend moved, and the backend's busy TSC cycles per frame (vnicd: the
//! CPU time of all its threads over the window less the time its
//! transmit workers spent polling emptied rings, `tx<i>.poll_ns`, and
//! beside it all of that CPU time; DPDK: testpmd's
//! `--record-core-cycles`, cycles of polls that moved frames, at most a
//! whole core's cycles at its rate).
//!
//! `cargo bench -p vnic-backend --bench dpdk_vhost` (needs root and
//! `dpdk-testpmd` from Debian's dpdk-dev; `tools/dpdk_bench.sh` installs
//! it). VNIC_DPDK_SECONDS sets each measurement window (default 4),
//! VNIC_DPDK_ROUNDS how many times each case runs, the two backends
//! back to back in each round (default 1; the tables show medians, the
//! ratios are the median of each round's own, and the best rounds of the
//! two are compared too; the queue-pair table takes at most three
//! rounds); VNIC_DPDK_PACKED=1
//! runs every case on packed rings (both backends); VNIC_DPDK_POLL_US
//! sets vnicd's `--poll-us` (default 50). The table goes to
//! stdout, CSV to `target/dpdk_vhost.csv` (`dpdk_vhost_packed.csv`).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{
    fmt::Write as _,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use vnic_tests::{cpu_ns, dpdk::Testpmd, unique, Vnicd};

const VNICD: &str = env!("CARGO_BIN_EXE_vnicd");

#[derive(Debug, Clone, Copy, PartialEq)]
enum Dir {
    /// The frontend sends, the backend takes (guest -> device).
    ToDevice,
    /// The backend sends, the frontend takes (device -> guest).
    ToGuest,
}

#[derive(Debug, Clone, Copy)]
struct Run {
    pps: f64,
    /// Busy cycles: vnicd's CPU time without its polls of emptied rings
    /// (`tx<i>.poll_ns`), as testpmd's count leaves out its polls that
    /// found nothing.
    cycles_per_frame: f64,
    /// vnicd: all its CPU time, polls included (DPDK: the busy cycles).
    all_cycles_per_frame: f64,
}

/// How long vnicd's transmit workers poll an emptied ring before they
/// sleep (VNIC_DPDK_POLL_US, default 50; `--poll-us`).
fn poll_us() -> String {
    std::env::var("VNIC_DPDK_POLL_US").unwrap_or_else(|_| "50".to_owned())
}

/// Whether the run is on packed rings (VNIC_DPDK_PACKED=1).
fn packed() -> bool {
    std::env::var("VNIC_DPDK_PACKED").is_ok_and(|v| v == "1")
}

/// The generator: virtio-user on `socket`, forwarding on core 0.
fn generator(socket: &Path, dir: Dir, size: usize, pairs: u16) -> Testpmd {
    let mode = match dir {
        Dir::ToDevice => "txonly",
        Dir::ToGuest => "rxonly",
    };
    Testpmd::virtio_user(socket, mode, size, false, packed(), pairs).expect("testpmd runs")
}

/// The TSC's rate as DPDK reports it, else the kernel's.
fn tsc_mhz(dpdk_out: &str) -> f64 {
    let from_dpdk = dpdk_out
        .split(" MHz Clock")
        .next()
        .filter(|s| s.len() < dpdk_out.len())
        .and_then(|s| s.rsplit(' ').next()?.parse::<f64>().ok());
    from_dpdk.unwrap_or_else(vnic_tests::cpu_mhz)
}

fn vnicd_run(dir: Dir, size: usize, secs: u64, mhz: f64, pairs: u16) -> (Run, f64) {
    let uplink = match dir {
        Dir::ToDevice => "sink".to_owned(),
        Dir::ToGuest => format!("source:{size}"),
    };
    let q = pairs.to_string();
    let v = Vnicd::start_wrapped(
        &["taskset", "-c", "1"],
        VNICD,
        &["--uplink", &uplink, "--queues", &q, "--poll-us", &poll_us()],
    )
    .expect("vnicd on core 1");
    let gen = generator(&v.socket, dir, size, pairs);
    let dir_key = match dir {
        Dir::ToDevice => "tx",
        Dir::ToGuest => "rx",
    };
    // The pairs' sum of a counter.
    let sum = |s: &std::collections::BTreeMap<String, u64>, dir: &str, key: &str| -> u64 {
        (0..pairs)
            .map(|i| s.get(&format!("{dir}{i}.{key}")).copied().unwrap_or(0))
            .sum()
    };
    thread::sleep(Duration::from_secs(2));
    let take = || {
        let (frames, polling) = v.stats().ok().map_or((0, 0), |s| {
            (sum(&s, dir_key, "packets"), sum(&s, "tx", "poll_ns"))
        });
        (Instant::now(), cpu_ns(v.pid()), frames, polling)
    };
    let a = take();
    thread::sleep(Duration::from_secs(secs));
    let b = take();
    let gen_out = gen.stop();
    let frames = (b.2 - a.2) as f64;
    let wall = (b.0 - a.0).as_secs_f64();
    let all = (b.1 - a.1) as f64 / 1e9;
    let polling = (b.3 - a.3) as f64 / 1e9;
    if frames == 0.0 {
        eprintln!("vnicd {dir:?} {size}: no frames; the generator said:\n{gen_out}");
    }
    (
        Run {
            pps: frames / wall,
            cycles_per_frame: (all - polling).max(0.0) * mhz * 1e6 / frames,
            all_cycles_per_frame: all * mhz * 1e6 / frames,
        },
        all / wall,
    )
}

/// The median of testpmd's per-second `key` (Rx-pps, Tx-pps) readings
/// once frames flow: the zeros before the generator connected and the
/// first reading after them (warm-up) are left out.
fn pps(out: &str, key: &str) -> f64 {
    let v: Vec<f64> = out
        .split(key)
        .skip(1)
        .filter_map(|s| s.split_whitespace().next()?.parse().ok())
        .skip_while(|&r: &f64| r == 0.0)
        .collect();
    let warm = usize::from(v.len() > 2);
    vnic_tests::median(v[warm..].to_vec())
}

fn dpdk_run(dir: Dir, size: usize, secs: u64, pairs: u16) -> (Run, f64) {
    let dirpath = std::env::temp_dir().join(unique("dpdkvh"));
    std::fs::create_dir_all(&dirpath).expect("socket dir");
    let socket = dirpath.join("vhost.sock");
    let vdev = format!("net_vhost0,iface={},queues={pairs}", socket.display());
    let txpkts = format!("--txpkts={size}");
    let q = [format!("--rxq={pairs}"), format!("--txq={pairs}")];
    let (mode, mut extra): (&str, Vec<&str>) = match dir {
        Dir::ToDevice => ("rxonly", vec!["--record-core-cycles"]),
        Dir::ToGuest => ("txonly", vec!["--record-core-cycles", &txpkts]),
    };
    extra.extend([q[0].as_str(), q[1].as_str()]);
    let backend = Testpmd::start(1, &vdev, &[], mode, &extra).expect("testpmd runs");
    let end = Instant::now() + Duration::from_secs(20);
    while !socket.exists() && Instant::now() < end {
        thread::sleep(Duration::from_millis(50));
    }
    let gen = generator(&socket, dir, size, pairs);
    thread::sleep(Duration::from_secs(2 + secs));
    let gen_out = gen.stop();
    let out = backend.stop();
    let _ = std::fs::remove_dir_all(&dirpath);
    let key = match dir {
        Dir::ToDevice => "Rx-pps:",
        Dir::ToGuest => "Tx-pps:",
    };
    let cycles = out
        .split("CPU cycles/packet=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    let rate = pps(&out, key);
    let mhz = tsc_mhz(&out);
    // testpmd's cycles per packet and its rate come from different counts
    // (busy cycles over every packet of the run; the rate of its last
    // one-second report). Where their product is more than a core has,
    // a core's cycles at that rate are the most it can have spent, and
    // that is the figure compared.
    let busy = cycles.min(mhz * 1e6 / rate);
    let r = Run {
        pps: rate,
        cycles_per_frame: busy,
        all_cycles_per_frame: busy,
    };
    if r.pps.is_nan() || r.pps == 0.0 {
        eprintln!("DPDK vhost {dir:?} {size}: no rate; backend:\n{out}\ngenerator:\n{gen_out}");
    }
    (r, mhz)
}

/// The median rate and the median cycles of `runs`.
fn median_run(runs: &[Run]) -> Run {
    Run {
        pps: vnic_tests::median(runs.iter().map(|r| r.pps).collect()),
        cycles_per_frame: vnic_tests::median(runs.iter().map(|r| r.cycles_per_frame).collect()),
        all_cycles_per_frame: vnic_tests::median(
            runs.iter().map(|r| r.all_cycles_per_frame).collect(),
        ),
    }
}

/// The best round of `runs`: the highest rate and the fewest cycles (each
/// may come from a different round). This machine's slow phases only
/// ever add cycles, so the best rounds are the least disturbed ones.
fn best_run(runs: &[Run]) -> Run {
    Run {
        pps: runs.iter().map(|r| r.pps).fold(f64::NAN, f64::max),
        cycles_per_frame: runs
            .iter()
            .map(|r| r.cycles_per_frame)
            .fold(f64::NAN, f64::min),
        all_cycles_per_frame: runs
            .iter()
            .map(|r| r.all_cycles_per_frame)
            .fold(f64::NAN, f64::min),
    }
}

/// vnicd's figures over DPDK's.
struct Ratios {
    /// The median of the rounds' own ratios (each round runs the two back
    /// to back, so a slow phase of the machine tends to hit both of a
    /// pair): rate, busy cycles, all of vnicd's CPU against DPDK's busy
    /// cycles.
    rate: f64,
    cycles: f64,
    all_cycles: f64,
    /// The best round of each: rate, busy cycles.
    best_rate: f64,
    best_cycles: f64,
}

fn ratios(vs: &[Run], ds: &[Run]) -> Ratios {
    let paired = |f: fn(&Run) -> f64| {
        vnic_tests::median(vs.iter().zip(ds).map(|(v, d)| f(v) / f(d)).collect())
    };
    let (bv, bd) = (best_run(vs), best_run(ds));
    Ratios {
        rate: paired(|r| r.pps),
        cycles: paired(|r| r.cycles_per_frame),
        all_cycles: vnic_tests::median(
            vs.iter()
                .zip(ds)
                .map(|(v, d)| v.all_cycles_per_frame / d.cycles_per_frame)
                .collect(),
        ),
        best_rate: bv.pps / bd.pps,
        best_cycles: bv.cycles_per_frame / bd.cycles_per_frame,
    }
}

fn main() {
    let secs: u64 = std::env::var("VNIC_DPDK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let cases = [
        (Dir::ToDevice, 64),
        (Dir::ToDevice, 1500),
        (Dir::ToGuest, 64),
        (Dir::ToGuest, 1500),
    ];
    let rounds: usize = std::env::var("VNIC_DPDK_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
        .max(1);
    let mut rows = Vec::new();
    for (dir, size) in cases {
        // Rounds alternate the two backends; each figure is the median.
        let (mut vs, mut loads, mut ds, mut mhz) = (Vec::new(), Vec::new(), Vec::new(), f64::NAN);
        for _ in 0..rounds {
            let (dpdk, m) = dpdk_run(dir, size, secs, 1);
            let (vnicd, load) = vnicd_run(dir, size, secs, m, 1);
            eprintln!("{dir:?} {size} B: vnicd {vnicd:?} at {load:.2} of a core, DPDK {dpdk:?}");
            vs.push(vnicd);
            loads.push(load);
            ds.push(dpdk);
            mhz = m;
        }
        let load = vnic_tests::median(loads);
        rows.push((dir, size, vs, load, ds, mhz));
    }
    let ring = if packed() { "packed" } else { "split" };
    println!(
        "testpmd virtio-user (core 0, txonly/rxonly, burst 32, in_order=0, 256-entry {ring} rings) \
         against each backend on core 1 (vnicd with --poll-us {}); {secs} s windows, {rounds} round(s); \
         figures are medians, ratios the median of each round's own, best: the best round of each; \
         vnicd's busy cycles leave out its polls of emptied rings (tx<i>.poll_ns) as DPDK's count leaves out \
         its empty polls, all: every cycle of its CPU time",
        poll_us()
    );
    println!(
        "| direction, frame | vnicd Mpps | vnicd busy cycles/frame (all; cores used) | DPDK vhost Mpps | DPDK busy cycles/frame | rate vnicd/DPDK | busy cycles vnicd/DPDK | all cycles vnicd/DPDK | best rate vnicd/DPDK | best busy cycles vnicd/DPDK |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut csv = String::from(
        "direction,size,vnicd_mpps,vnicd_cycles,vnicd_cores,dpdk_mpps,dpdk_cycles,tsc_mhz,\
         vnicd_all_cycles,rate_ratio,cycles_ratio,all_cycles_ratio,best_rate_ratio,best_cycles_ratio\n",
    );
    for (dir, size, vs, load, ds, mhz) in &rows {
        let name = match dir {
            Dir::ToDevice => "guest->device",
            Dir::ToGuest => "device->guest",
        };
        let (v, d) = (median_run(vs), median_run(ds));
        let r = ratios(vs, ds);
        println!(
            "| {name}, {size} B | {:.2} | {:.0} ({:.0}; {load:.2}) | {:.2} | {:.0} | {:.2}x | {:.2}x | {:.2}x | {:.2}x | {:.2}x |",
            v.pps / 1e6,
            v.cycles_per_frame,
            v.all_cycles_per_frame,
            d.pps / 1e6,
            d.cycles_per_frame,
            r.rate,
            r.cycles,
            r.all_cycles,
            r.best_rate,
            r.best_cycles,
        );
        let _ = writeln!(
            csv,
            "{name},{size},{:.4},{:.1},{load:.3},{:.4},{:.1},{mhz:.0},{:.1},{:.3},{:.3},{:.3},{:.3},{:.3}",
            v.pps / 1e6,
            v.cycles_per_frame,
            d.pps / 1e6,
            d.cycles_per_frame,
            v.all_cycles_per_frame,
            r.rate,
            r.cycles,
            r.all_cycles,
            r.best_rate,
            r.best_cycles,
        );
    }
    let name = if packed() {
        "../target/dpdk_vhost_packed.csv"
    } else {
        "../target/dpdk_vhost.csv"
    };
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(name);
    if let Err(e) = std::fs::write(&path, csv) {
        eprintln!("{}: {e}", path.display());
    }

    // Queue pairs: the generator spreads 64 B frames over all of them from
    // one core; each backend serves them from the other (vnicd, pinned to
    // core 1, from one worker thread). DPDK's virtio-user takes at most 8
    // pairs.
    let mhz = rows.first().map_or(f64::NAN, |r| r.5);
    // At most three rounds each: this table is about scaling, not the
    // last few percent.
    let pair_rounds = rounds.min(3);
    println!();
    println!("guest->device, 64 B, by queue pairs (all on one backend core)");
    println!(
        "| pairs | vnicd Mpps | vnicd busy cycles/frame | DPDK vhost Mpps | DPDK busy cycles/frame |"
    );
    println!("|---|---|---|---|---|");
    for pairs in [1u16, 2, 4, 8] {
        let (mut vs, mut ds) = (Vec::new(), Vec::new());
        for _ in 0..pair_rounds {
            ds.push(dpdk_run(Dir::ToDevice, 64, secs, pairs).0);
            vs.push(vnicd_run(Dir::ToDevice, 64, secs, mhz, pairs).0);
        }
        let (v, d) = (median_run(&vs), median_run(&ds));
        println!(
            "| {pairs} | {:.2} | {:.0} | {:.2} | {:.0} |",
            v.pps / 1e6,
            v.cycles_per_frame,
            d.pps / 1e6,
            d.cycles_per_frame
        );
    }
}
