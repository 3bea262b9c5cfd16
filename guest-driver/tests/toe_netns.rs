//! TCP on vnicd's TOE: the vnic-guest stack opens and accepts
//! connections that the device terminates, against the Linux kernel's
//! TCP in a namespace behind vnicd's TAP.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{
    io::{Read, Write},
    net::SocketAddr,
    process::Command,
    time::Duration,
};

use vnic_guest::stack::{Stack, TcpListener, TcpStream};
use vnic_tests::{pattern, require_netns, Proc};

mod common;
use common::{
    agree, bytes, client_vs_kernel, guest_echo_client, guest_echo_server, in_flight_bound, in_ns,
    iperf, kernel_echo_client, kernel_echo_server, kernel_vs_server, net_args, setup, stack_args,
};

fn toe_stack(s: &vnic_tests::PortInNs, conns: u16, ring_kib: u32) -> Stack {
    let mut a = stack_args(&s.vnicd.socket, false, None);
    a.toe = true;
    a.toe_conns = conns;
    a.toe_ring_kib = ring_kib;
    a.start().expect("stack with the TOE")
}

/// The guest connects (IPv4 and IPv6) to a kernel server that echoes;
/// then the kernel connects to a guest listener that echoes. Every
/// connection runs on the TOE and its bytes come back whole.
#[test]
fn toe_connections_carry_bytes_both_ways() {
    if !require_netns() {
        return;
    }
    let s = setup();
    let stack = toe_stack(&s, 16, 256);
    const BYTES: usize = 3 << 20;
    let server = s.ns.enter(|| {
        let l4 = std::net::TcpListener::bind("192.0.2.1:7400")?;
        let l6 = std::net::TcpListener::bind("[2001:db8::1]:7400")?;
        for l in [l4, l6] {
            let (mut c, _) = l.accept()?;
            c.set_read_timeout(Some(Duration::from_secs(30)))?;
            let mut buf = vec![0u8; BYTES];
            c.read_exact(&mut buf)?;
            c.write_all(&buf)?;
        }
        Ok(())
    });
    std::thread::sleep(Duration::from_millis(300));
    for (i, to) in ["192.0.2.1:7400", "[2001:db8::1]:7400"]
        .into_iter()
        .enumerate()
    {
        let to: SocketAddr = to.parse().unwrap();
        let mut c = TcpStream::connect(&stack, to, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("connect {to}: {e}"));
        assert!(c.on_toe(), "{to}: not on the TOE");
        assert_eq!(c.peer_addr().unwrap(), to);
        c.set_timeout(Some(Duration::from_secs(30)));
        // The kernel reads everything before it echoes.
        let data = pattern(BYTES, i as u64);
        c.write_all(&data).expect("send");
        let mut back = vec![0u8; BYTES];
        c.read_exact(&mut back).expect("echo");
        assert!(back == data, "{to}: the echo differs");
    }
    server.join().unwrap().expect("kernel server");

    let l = TcpListener::bind(&stack, 7401).expect("listen on the TOE");
    let client = s.ns.enter(|| {
        let data = pattern(BYTES, 9);
        let mut c = std::net::TcpStream::connect("192.0.2.2:7401")?;
        c.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut w = c.try_clone()?;
        let d = data.clone();
        let t = std::thread::spawn(move || w.write_all(&d));
        let mut back = vec![0u8; BYTES];
        c.read_exact(&mut back)?;
        t.join().map_err(|_| std::io::Error::other("writer"))??;
        if back != data {
            return Err(std::io::Error::other("the echo differs"));
        }
        Ok(())
    });
    let mut c = l.accept(Some(Duration::from_secs(10))).expect("accept");
    assert!(c.on_toe());
    c.set_timeout(Some(Duration::from_secs(30)));
    let mut buf = vec![0u8; 64 << 10];
    let mut n = 0;
    while n < BYTES {
        let k = c.read(&mut buf).expect("read");
        assert!(k > 0, "end of stream after {n} bytes");
        c.write_all(&buf[..k]).expect("echo");
        n += k;
    }
    client.join().unwrap().expect("kernel client");
    let st = stack.stats();
    assert_eq!((st.toe_connects, st.toe_accepts), (2, 1));
    assert_eq!((st.toe_fallbacks, st.toe_refused), (0, 0));
    stack.shutdown();
}

/// vnicd's TOE counter `name`.
fn toe_counter(s: &vnic_tests::PortInNs, name: &str) -> u64 {
    s.vnicd.stats().expect("vnicd stats")[&format!("toe.{name}")]
}

/// `vnic-iperf --toe` as client and as server against the kernel's
/// iperf3, both directions: the byte counts of both ends agree, and the
/// connections were the device's.
#[test]
fn vnic_iperf_on_the_toe_against_iperf3_both_ways() {
    if !require_netns() {
        return;
    }
    let s = setup();
    for rev in [false, true] {
        let extra: &[&str] = if rev {
            &["-R", "-P", "2"]
        } else {
            &["-P", "2"]
        };
        let before = toe_counter(&s, "connects");
        let (c, srv) = client_vs_kernel(&s, &["--toe"], extra);
        let (sent, recv) = (bytes(&c, "sum_sent"), bytes(&c, "sum_received"));
        let (ksent, krecv) = (bytes(&srv, "sum_sent"), bytes(&srv, "sum_received"));
        eprintln!(
            "vnic-iperf --toe -c {extra:?}: sent {sent} received {recv}; iperf3 -s: sent {ksent} received {krecv}"
        );
        // A control connection and two streams.
        assert_eq!(toe_counter(&s, "connects") - before, 3);
        agree(sent, recv, in_flight_bound(&s, 2, rev), "client view");
        if rev {
            assert_eq!(ksent, sent);
        } else {
            assert_eq!(krecv, recv);
        }
    }
    for rev in [false, true] {
        let extra: &[&str] = if rev { &["-R"] } else { &[] };
        let before = toe_counter(&s, "accepts");
        let (c, srv) = kernel_vs_server(&s, &["--toe"], extra);
        let (ksent, krecv) = (bytes(&c, "sum_sent"), bytes(&c, "sum_received"));
        let (vsent, vrecv) = (bytes(&srv, "sum_sent"), bytes(&srv, "sum_received"));
        eprintln!(
            "iperf3 -c {extra:?}: sent {ksent} received {krecv}; vnic-iperf --toe -s: sent {vsent} received {vrecv}"
        );
        assert_eq!(toe_counter(&s, "accepts") - before, 2);
        agree(
            ksent,
            krecv,
            in_flight_bound(&s, 1, !rev),
            "iperf3 client view",
        );
        assert_eq!((ksent, krecv), (vsent, vrecv));
    }
    assert_eq!(toe_counter(&s, "ring_faults"), 0);
    assert_eq!(toe_counter(&s, "segments_bad"), 0);
}

/// A guest that goes away mid-transfer (vnic-iperf --toe killed while it
/// sends): vnicd resets its TOE connections, the kernel peer counts a
/// reset of an established connection, and none is left established.
#[test]
fn a_guest_that_goes_away_mid_transfer_leaves_resets() {
    if !require_netns() {
        return;
    }
    let s = setup();
    let server = Proc::spawn(&mut in_ns(&s, "iperf3", &["-s", "-1", "-B", "192.0.2.1"]));
    std::thread::sleep(Duration::from_millis(500));
    let resets = || s.ns.tcp_counter("EstabResets").expect("EstabResets");
    let before = resets();
    let mut a = net_args(&s);
    a.extend(["--toe", "-c", "192.0.2.1", "-t", "30"].map(String::from));
    let client = Proc::spawn(Command::new(iperf()).args(&a));
    // Until the stream is moving (on the TX queue of the engine RSS put
    // it on).
    let moving = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        let st = s.vnicd.stats().expect("stats");
        st["tx0.bytes"] + st["tx1.bytes"] > 20 << 20
    });
    assert!(moving, "no transfer started");
    let open = toe_counter(&s, "connections");
    assert_eq!(open, 2, "a control connection and a stream on the TOE");
    drop(client);
    // Without the device's resets both connections would stay
    // established at the kernel: it would not know the guest went. With
    // them, the first reset it takes ends iperf3 (which then closes the
    // other itself), so at least one is counted and none is left.
    let left = || {
        s.ns.exec("ss", &["-tanH", "state", "established"])
            .unwrap_or_default()
            .lines()
            .count()
    };
    let ended = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        resets() > before && left() == 0
    });
    assert!(
        ended,
        "the kernel saw {} resets of established connections, {} are left",
        resets() - before,
        left()
    );
    assert_eq!(toe_counter(&s, "connections"), 0);
    let (_, out, err) = server.finish(Duration::from_secs(10));
    eprintln!("iperf3 -s after the guest went: {out} {err}");
}

/// 1000 connections open on the TOE at once, each carrying its own
/// bytes both ways; vnicd counts them open, then none once they close.
#[test]
fn a_thousand_concurrent_toe_connections() {
    if !require_netns() {
        return;
    }
    let s = setup();
    const N: usize = 1000;
    let stack = toe_stack(&s, N as u16, 4);
    let server = s.ns.enter(|| {
        let l = std::net::TcpListener::bind("192.0.2.1:7500")?;
        let mut conns = Vec::with_capacity(N);
        for _ in 0..N {
            let (c, _) = l.accept()?;
            c.set_read_timeout(Some(Duration::from_secs(30)))?;
            conns.push(c);
        }
        // Every connection is open now; each echoes its 8 bytes.
        for c in &mut conns {
            let mut b = [0u8; 8];
            c.read_exact(&mut b)?;
            c.write_all(&b)?;
        }
        Ok(())
    });
    std::thread::sleep(Duration::from_millis(300));
    let to: SocketAddr = "192.0.2.1:7500".parse().unwrap();
    let mut conns = Vec::with_capacity(N);
    for i in 0..N {
        let mut c = TcpStream::connect(&stack, to, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert!(c.on_toe(), "connection {i} is not on the TOE");
        c.set_timeout(Some(Duration::from_secs(30)));
        conns.push(c);
    }
    let st = s.vnicd.stats().expect("stats");
    assert_eq!(st["toe.connections"], N as u64, "open on the device");
    for (i, c) in conns.iter_mut().enumerate() {
        c.write_all(&(i as u64).to_be_bytes()).expect("send");
    }
    for (i, c) in conns.iter_mut().enumerate() {
        let mut b = [0u8; 8];
        c.read_exact(&mut b).expect("echo");
        assert_eq!(u64::from_be_bytes(b), i as u64);
    }
    server.join().unwrap().expect("kernel server");
    drop(conns);
    let gone = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        toe_counter(&s, "connections") == 0
    });
    assert!(
        gone,
        "{} TOE connections left",
        toe_counter(&s, "connections")
    );
    stack.shutdown();
}

/// vnicd runs one TOE engine per RX queue, and a connection lives in the
/// engine of the queue RSS steers it to. With 4 queue pairs, 16
/// connections each way spread over the engines; each engine took
/// segments only if it holds connections, and no segment ever had to go
/// to an engine other than its queue's (`toe.foreign`).
#[test]
fn rss_keeps_each_toe_connection_on_one_engine() {
    if !require_netns() {
        return;
    }
    const PAIRS: usize = 4;
    let s = vnic_tests::PortInNs::start(&common::vnicd(), &["--queues", "4"], "192.0.2.1/24", &[])
        .expect("vnicd");
    let mut a = stack_args(&s.vnicd.socket, false, None);
    a.addr6 = None;
    a.queues = PAIRS as u16;
    a.toe = true;
    a.toe_conns = 64;
    a.toe_ring_kib = 64;
    let stack = a.start().expect("stack with the TOE on 4 queue pairs");
    const N: usize = 16;
    const BYTES: usize = 256 << 10;
    let server = kernel_echo_server(&s.ns, "192.0.2.1:7700", N, BYTES);
    std::thread::sleep(Duration::from_millis(300));
    let to: SocketAddr = "192.0.2.1:7700".parse().unwrap();
    let conns = guest_echo_client(&stack, to, N, BYTES, 0);
    server.join().unwrap().expect("kernel server");
    assert!(
        conns.iter().all(|c| c.on_toe()),
        "every connection on the TOE"
    );
    let l = TcpListener::bind(&stack, 7701).expect("listen");
    let client = kernel_echo_client(&s.ns, "192.0.2.2:7701", N, BYTES, 0);
    let accepted = guest_echo_server(&l, N, BYTES);
    client.join().unwrap().expect("kernel client");
    assert!(
        accepted.iter().all(|c| c.on_toe()),
        "every one accepted on the TOE"
    );
    // Closed, so that no segment is counted while the counters are read.
    drop((conns, accepted));
    let closed = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        toe_counter(&s, "connections") == 0
    });
    assert!(closed, "the connections did not close");

    let st = s.vnicd.stats().expect("vnicd stats");
    let engine = |k: usize, what: &str| st[&format!("toe.engine{k}.{what}")];
    let opened: Vec<u64> = (0..PAIRS).map(|k| engine(k, "opened")).collect();
    let segments: Vec<u64> = (0..PAIRS).map(|k| engine(k, "segments_in")).collect();
    eprintln!("connections opened per engine {opened:?}, segments taken {segments:?}");
    assert_eq!(opened.iter().sum::<u64>(), 2 * N as u64);
    assert_eq!(
        (st["toe.connects"], st["toe.accepts"]),
        (N as u64, N as u64)
    );
    assert!(
        opened.iter().filter(|&&n| n > 0).count() >= 2,
        "RSS spread the connections over the engines: {opened:?}"
    );
    for k in 0..PAIRS {
        assert_eq!(
            opened[k] > 0,
            segments[k] > 0,
            "engine {k}: segments only with connections ({opened:?}, {segments:?})"
        );
    }
    assert_eq!(
        st["toe.foreign"], 0,
        "a segment went to another queue's engine"
    );
    assert_eq!(st["toe.segments_in"], segments.iter().sum::<u64>());
    stack.shutdown();
}

/// More connections than vnicd's table (--toe-conns 8), both ways: the
/// ones past it run on the guest stack's own TCP, counted; every one
/// carries its bytes.
#[test]
fn a_flood_past_the_table_falls_back_and_is_counted() {
    if !require_netns() {
        return;
    }
    let s = vnic_tests::PortInNs::start(
        &common::vnicd(),
        &["--queues", "2", "--toe-conns", "8"],
        "192.0.2.1/24",
        &[],
    )
    .expect("vnicd");
    let stack = toe_stack(&s, 32, 16);
    const N: usize = 20;
    const BYTES: usize = 64 << 10;
    // The guest opens N connections.
    let server = kernel_echo_server(&s.ns, "192.0.2.1:7600", N, BYTES);
    std::thread::sleep(Duration::from_millis(300));
    let to: SocketAddr = "192.0.2.1:7600".parse().unwrap();
    let conns = guest_echo_client(&stack, to, N, BYTES, 0);
    server.join().unwrap().expect("kernel server");
    let on_toe = conns.iter().filter(|c| c.on_toe()).count();
    assert_eq!(
        on_toe, 8,
        "the table's worth on the TOE, the rest on the stack"
    );
    let st = stack.stats();
    assert_eq!(st.toe_fallbacks, (N - 8) as u64);
    drop(conns);
    let free = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        toe_counter(&s, "connections") == 0
    });
    assert!(free, "the table did not empty");

    // The kernel opens N connections to a guest listener.
    let l = TcpListener::bind(&stack, 7601).expect("listen");
    let full_before = toe_counter(&s, "table_full");
    let client = kernel_echo_client(&s.ns, "192.0.2.2:7601", N, BYTES, 50);
    let accepted = guest_echo_server(&l, N, BYTES);
    client.join().unwrap().expect("kernel client");
    let on_toe = accepted.iter().filter(|c| c.on_toe()).count();
    assert_eq!(on_toe, 8, "accepted on the TOE");
    assert!(
        toe_counter(&s, "table_full") - full_before >= (N - 8) as u64,
        "SYNs past the table counted"
    );
    stack.shutdown();
}

/// TOE connections across the bridge that drops 1% of TCP frames and
/// holds 2% back, each way, over IPv4 and IPv6: 4 MiB each way arrive
/// whole, and the bridge did lose and reorder.
#[test]
fn toe_transfers_survive_loss_and_reordering() {
    if !require_netns() {
        return;
    }
    let s = vnic_tests::BridgedPort::start(
        &common::vnicd(),
        &["--queues", "2"],
        &["192.0.2.1/24", "2001:db8::1/64"],
    )
    .expect("vnicd bridged to a peer namespace");
    s.peer
        .exec(
            "ethtool",
            &[
                "-K",
                vnic_tests::BridgedPort::PEER_DEV,
                "tso",
                "off",
                "gso",
                "off",
            ],
        )
        .expect("ethtool -K");
    s.impair(10, 20).expect("impair the bridge");
    let mut a = stack_args(&s.vnicd.socket, false, None);
    a.toe = true;
    a.toe_conns = 8;
    let stack = a.start().expect("stack with the TOE");
    const N: usize = 4 << 20;
    for (k, peer) in ["192.0.2.1", "2001:db8::1"].into_iter().enumerate() {
        let peer: std::net::IpAddr = peer.parse().unwrap();
        let up = pattern(N, 17 + k as u64);
        let down = pattern(N, 71 + k as u64);
        let port = 7700 + k as u16;
        let bind = SocketAddr::new(peer, port);
        let (dropped0, held0) = s.impaired().expect("nft counters");
        let down2 = down.clone();
        let kernel = s.peer.enter(move || {
            let l = std::net::TcpListener::bind(bind)?;
            let (mut c, _) = l.accept()?;
            c.set_read_timeout(Some(Duration::from_secs(60)))?;
            let mut got = vec![0u8; N];
            c.read_exact(&mut got)?;
            c.write_all(&down2)?;
            c.shutdown(std::net::Shutdown::Write)?;
            Ok(got)
        });
        std::thread::sleep(Duration::from_millis(300));
        // The bridge drops a tenth of TCP frames each way, SYNs and
        // SYN-ACKs too: a few lost in a row put the handshake at the
        // engine's SYN retransmits, 1, 2, 4 and 8 s apart. 30 s covers
        // five tries.
        let mut c = TcpStream::connect(&stack, bind, Duration::from_secs(30)).expect("connect");
        assert!(c.on_toe());
        c.set_timeout(Some(Duration::from_secs(60)));
        c.write_all(&up).expect("guest -> kernel");
        let mut got = vec![0u8; N];
        c.read_exact(&mut got).expect("kernel -> guest");
        let mut tail = [0u8; 1];
        assert_eq!(c.read(&mut tail).expect("end of stream"), 0);
        let kgot = kernel.join().unwrap().expect("kernel side");
        let (dropped, held) = s.impaired().expect("nft counters");
        eprintln!(
            "{peer}: bridge dropped {} held {}",
            dropped - dropped0,
            held - held0
        );
        assert!(kgot == up, "{peer}: guest -> kernel bytes differ");
        assert!(got == down, "{peer}: kernel -> guest bytes differ");
        assert!(dropped > dropped0 && held > held0, "the bridge did nothing");
    }
    stack.shutdown();
}
