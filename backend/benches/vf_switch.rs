//! Guest to guest through vnicd's embedded switch (VF0 to VF1 of one
//! vnicd), beside the same traffic between two vnicd instances whose TAP
//! uplinks meet on a Linux bridge, in the same run: TCP throughput of one
//! vnic-guest stream, and the rate of 64-byte frames from a bare driver
//! sending bursts of 32. Both ends are vnic-guest frontends in this
//! process; the figure is what the receiving end got.
//!
//! Each case runs in rounds, the switch and the bridge one after the
//! other in every round, and the medians are reported: this 2-core
//! machine's speed swings from one second to the next.
//!
//! `cargo bench -p vnic-backend --bench vf_switch` (VNIC_BENCH_SECONDS
//! sets the time per run, default 3; VNIC_BENCH_ROUNDS the rounds,
//! default 3; VNIC_BENCH_STATS=1 prints vnicd's counters and both TCP
//! ends' after each TCP run; VNIC_BENCH_ONLY=TCP or =64 runs one case).
//! Needs root (TAP devices, network namespaces) for the bridge.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{
    io::{Read, Write},
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use vnic_guest::{
    cli::NetArgs,
    net::{NetOptions, VirtioNet},
    stack::{Stack, TcpListener, TcpStream},
};
use vnic_protocol::{
    virtio::{Features, VirtioNetHdr},
    wire::{
        build::{udp_frame, Flow, IpFields},
        ethernet::Address,
    },
};
use vnic_tests::{run, unique, NetNs, Vnicd};

const VNICD: &str = env!("CARGO_BIN_EXE_vnicd");

/// Two guest-facing sockets and the MACs their devices have.
struct Pair {
    sockets: [PathBuf; 2],
    macs: [Address; 2],
    /// What keeps the pair alive.
    _keep: Vec<Vnicd>,
    _ns: Option<NetNs>,
}

fn switch_pair() -> Pair {
    let v = Vnicd::start(VNICD, &["--vfs", "2", "--queue-size", "1024"]).expect("vnicd");
    let end = Instant::now() + Duration::from_secs(20);
    while !v.vf_socket(1).exists() {
        assert!(Instant::now() < end, "VF sockets never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    let j: serde_json::Value = serde_json::from_str(&v.ctl("link show --json").unwrap()).unwrap();
    let mac = |n: usize| -> Address {
        j[0]["vfinfo_list"][n]["address"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    Pair {
        sockets: [v.vf_socket(0), v.vf_socket(1)],
        macs: [mac(0), mac(1)],
        _keep: vec![v],
        _ns: None,
    }
}

fn bridge_pair() -> Pair {
    let macs = ["02:00:00:00:00:0a", "02:00:00:00:00:0b"];
    let taps = [unique("vnb"), unique("vnb")];
    let vnicds: Vec<Vnicd> = taps
        .iter()
        .zip(macs)
        .map(|(t, m)| {
            Vnicd::start(
                VNICD,
                &[
                    "--uplink",
                    &format!("tap:{t}"),
                    "--mac",
                    m,
                    "--queue-size",
                    "1024",
                ],
            )
            .expect("vnicd")
        })
        .collect();
    let ns = NetNs::new().expect("namespace");
    ns.ip(&["link", "add", "br0", "type", "bridge"]).unwrap();
    for (t, m) in taps.iter().zip(macs) {
        run("ip", &["link", "set", t, "netns", &ns.name]).unwrap();
        ns.exec(
            "sysctl",
            &["-qw", &format!("net.ipv6.conf.{t}.disable_ipv6=1")],
        )
        .unwrap();
        ns.ip(&["link", "set", t, "master", "br0"]).unwrap();
        ns.ip(&["link", "set", t, "up"]).unwrap();
        // The bridge knows where each guest is from the start, as the
        // switch does.
        ns.exec(
            "bridge",
            &["fdb", "replace", m, "dev", t, "master", "static"],
        )
        .unwrap();
    }
    ns.ip(&["link", "set", "br0", "up"]).unwrap();
    Pair {
        sockets: [vnicds[0].socket.clone(), vnicds[1].socket.clone()],
        macs: [macs[0].parse().unwrap(), macs[1].parse().unwrap()],
        _keep: vnicds,
        _ns: Some(ns),
    }
}

fn driver(socket: &std::path::Path) -> VirtioNet {
    VirtioNet::connect(
        socket,
        NetOptions {
            queue_size: 1024,
            features: NetOptions::DEFAULT_FEATURES | Features::EVENT_IDX,
            ..Default::default()
        },
    )
    .expect("driver connects")
}

/// 64-byte frames from end 0 to end 1 for `dur`: frames per second
/// received.
/// CPU seconds (user and system) the pair's vnicd processes have used.
fn vnicd_cpu(p: &Pair) -> f64 {
    // SAFETY: sysconf has no memory effects.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    p._keep
        .iter()
        .map(|v| {
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", v.pid())).unwrap();
            // Fields after the command name (which ends with ')'): utime
            // and stime are the 12th and 13th.
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / tick
        })
        .sum()
}

/// CPU seconds (user and system) this process has used: the two
/// vnic-guest ends and their application threads.
fn own_cpu() -> f64 {
    // SAFETY: getrusage writes into the struct it is given and nothing
    // else.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `ru` is a valid, writable rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// One run: the rate the receiver saw, vnicd's CPU per unit moved, and
/// the guests' (both ends in this process).
struct Run {
    rate: f64,
    cpu_per_unit: f64,
    guest_cpu_per_unit: f64,
}

fn small_frames(p: &Pair, dur: Duration) -> Run {
    let got = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut rxdev = driver(&p.sockets[1]);
    let mut pairs = rxdev.take_pairs();
    let receiver = {
        let (got, stop) = (got.clone(), stop.clone());
        std::thread::spawn(move || {
            let rx = &mut pairs[0].rx;
            rx.fill().unwrap();
            // NAPI, as a driver does: poll with interrupts off, and sleep
            // on the RX interrupt once the ring runs dry.
            while !stop.load(Ordering::Relaxed) {
                let n = rx.napi_poll(256, true, &mut |_, _| {}).unwrap();
                got.fetch_add(n as u64, Ordering::Relaxed);
                if n < 256 {
                    rx.wait(None, Duration::from_millis(20));
                }
            }
            drop(rxdev);
        })
    };
    let mut tx = driver(&p.sockets[0]);
    let flow = Flow {
        src_mac: p.macs[0],
        dst_mac: p.macs[1],
        ..Flow::v4()
    };
    let f = udp_frame(&flow, &IpFields::default(), &[0x5a; 18]).unwrap();
    let hdr = VirtioNetHdr::default();
    let q = tx.tx(0).unwrap();
    let (cpu0, own0) = (vnicd_cpu(p), own_cpu());
    // Warm up, then count.
    let warm = Instant::now() + Duration::from_millis(300);
    let mut t0 = None;
    let mut n0 = 0;
    let end = Instant::now() + Duration::from_millis(300) + dur;
    while Instant::now() < end {
        if t0.is_none() && Instant::now() >= warm {
            t0 = Some(Instant::now());
            n0 = got.load(Ordering::Relaxed);
        }
        if q.post_burst(&hdr, &f, 32).unwrap() == 0 {
            q.wait_for_room(Duration::from_secs(1)).unwrap();
        }
    }
    let n1 = got.load(Ordering::Relaxed);
    let secs = t0.map_or(1.0, |t| t.elapsed().as_secs_f64());
    let cpu = vnicd_cpu(p) - cpu0;
    let own = own_cpu() - own0;
    stop.store(true, Ordering::Relaxed);
    receiver.join().unwrap();
    Run {
        rate: (n1 - n0) as f64 / secs,
        // Nanoseconds per frame over the whole run.
        cpu_per_unit: cpu * 1e9 / n1.max(1) as f64,
        guest_cpu_per_unit: own * 1e9 / n1.max(1) as f64,
    }
}

fn stack(socket: &std::path::Path, addr: &str) -> Stack {
    NetArgs {
        socket: Some(socket.to_path_buf()),
        pci: None,
        addr: Some(addr.into()),
        addr6: None,
        queues: 1,
        queue_size: 1024,
        no_tso: false,
        no_csum: false,
        busy_poll_us: None,
        reassembly_kib: 4096,
        toe: false,
        toe_conns: 0,
        toe_ring_kib: 256,
    }
    .start()
    .expect("stack")
}

/// One TCP stream from end 0 to end 1 for `dur`: bits per second the
/// receiver read.
fn tcp_stream(p: &Pair, dur: Duration) -> Run {
    let a = stack(&p.sockets[0], "192.0.2.10/24");
    let b = stack(&p.sockets[1], "192.0.2.11/24");
    let l = TcpListener::bind(&b, 5201).unwrap();
    let to: SocketAddr = "192.0.2.11:5201".parse().unwrap();
    let mut c = TcpStream::connect(&a, to, Duration::from_secs(10)).expect("connect");
    c.set_timeout(Some(Duration::from_secs(10)));
    let mut s = l.accept(Some(Duration::from_secs(10))).expect("accept");
    s.set_timeout(Some(Duration::from_secs(10)));
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 << 10];
        let mut got = 0u64;
        let mut t0 = None;
        let mut at0 = 0;
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Err(e) => {
                    eprintln!("reader: {e} after {got} bytes");
                    break;
                }
                Ok(n) => got += n as u64,
            }
            // Count from the first 4 MB on (past slow start).
            if t0.is_none() && got >= 4 << 20 {
                t0 = Some(Instant::now());
                at0 = got;
            }
        }
        let secs = t0.map_or(1.0, |t| t.elapsed().as_secs_f64());
        ((got - at0) as f64 * 8.0 / secs, got, s.tcp_stats())
    });
    let (cpu0, own0) = (vnicd_cpu(p), own_cpu());
    let block = vec![0x42u8; 128 << 10];
    let end = Instant::now() + dur + Duration::from_millis(300);
    while Instant::now() < end {
        c.write_all(&block).expect("send");
    }
    c.shutdown_write().unwrap();
    let (bps, bytes, rstats) = reader.join().unwrap();
    let cpu = vnicd_cpu(p) - cpu0;
    let own = own_cpu() - own0;
    if std::env::var("VNIC_BENCH_STATS").is_ok() {
        for v in &p._keep {
            let st = v.stats().unwrap();
            let nz: Vec<_> = st
                .iter()
                .filter(|(k, v)| **v != 0 && (k.contains("drop") || k.contains("packets")))
                .collect();
            eprintln!("{:.2} Gbit/s: {nz:?}", bps / 1e9);
        }
        eprintln!("sender: {:?}", c.tcp_stats());
        eprintln!("receiver: {rstats:?}");
        eprintln!("sending stack: {:?}", a.stats());
        eprintln!("receiving stack: {:?}", b.stats());
    }
    drop(c);
    a.shutdown();
    b.shutdown();
    let gb = bytes.max(1) as f64 / 1e9;
    Run {
        rate: bps,
        // Milliseconds per GB over the whole run.
        cpu_per_unit: cpu * 1e3 / gb,
        guest_cpu_per_unit: own * 1e3 / gb,
    }
}

fn main() {
    if !vnic_tests::require_netns() {
        eprintln!("the bridge needs root, /dev/net/tun and ip netns");
        std::process::exit(1);
    }
    let secs: u64 = std::env::var("VNIC_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let rounds: usize = std::env::var("VNIC_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
        .max(1);
    let dur = Duration::from_secs(secs);
    // VNIC_BENCH_ONLY=TCP or =64 runs one case.
    let only = std::env::var("VNIC_BENCH_ONLY").ok();
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut rows = Vec::new();
    type Case = fn(&Pair, Duration) -> Run;
    let mut bounds = Vec::new();
    for (what, cost, guests, f, scale) in [
        (
            "TCP, one vnic-guest stream (Gbit/s)",
            "vnicd CPU ms per GB",
            "both vnic-guest ends' CPU ms per GB",
            tcp_stream as Case,
            1e9,
        ),
        (
            "64 B frames, bursts of 32 (Mpps)",
            "vnicd CPU ns per frame",
            "both vnic-guest ends' CPU ns per frame",
            small_frames as Case,
            1e6,
        ),
    ] {
        if !only.as_deref().is_none_or(|o| what.starts_with(o)) {
            continue;
        }
        let (mut sw, mut br, mut swc, mut brc) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut swg, mut brg) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let r = f(&switch_pair(), dur);
            sw.push(r.rate / scale);
            swc.push(r.cpu_per_unit);
            swg.push(r.guest_cpu_per_unit);
            let r = f(&bridge_pair(), dur);
            br.push(r.rate / scale);
            brc.push(r.cpu_per_unit);
            brg.push(r.guest_cpu_per_unit);
        }
        eprintln!("{what}: switch {sw:.2?}, bridge {br:.2?}");
        eprintln!("{cost}: switch {swc:.0?}, bridge {brc:.0?}");
        eprintln!("{guests}: switch {swg:.0?}, bridge {brg:.0?}");
        let (g, b) = (median(swg.clone()), median(brc.clone()));
        // While the machine's cores are what limits both, the rates go
        // as one over the CPU a unit costs everyone: with a switch that
        // cost nothing, the switch would be at most (G + B) / G times
        // the bridge (G: the guests' cost, B: vnicd's and the kernel's on
        // the bridge path).
        bounds.push((what, (g + b) / g.max(1e-9)));
        rows.push((what, median(sw), median(br), true));
        rows.push((cost, median(swc), median(brc), false));
        rows.push((guests, median(swg), median(brg), false));
    }
    println!("| measure | VF to VF (embedded switch) | two vnicd TAPs on a Linux bridge | switch vs bridge |");
    println!("|---|---|---|---|");
    for (what, s, b, higher_better) in rows {
        let ratio = if higher_better {
            s / b.max(1e-9)
        } else {
            b / s.max(1e-9)
        };
        println!("| {what} | {s:.2} | {b:.2} | {ratio:.2}x |");
    }
    for (what, bound) in bounds {
        println!(
            "\n{what}: with a switch that cost no CPU, at most {bound:.2}x the bridge while the cores are the limit"
        );
    }
}
