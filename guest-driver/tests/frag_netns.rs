//! IP fragments between the vnic-guest stack and the Linux kernel, through
//! vnicd's TAP uplink in a namespace: datagrams larger than the MTU both
//! ways over IPv4 and IPv6 (the stack cuts what it sends and reassembles
//! what it gets), and a flood of fragments that never complete, which
//! must stay within the reassembly memory the stack was given.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{
    net::{IpAddr, SocketAddr, UdpSocket as KernelUdp},
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;
use vnic_guest::{
    cli::NetArgs,
    stack::{Stack, UdpSocket},
};
use vnic_protocol::wire::{ip_proto, ipv4};
use vnic_tests::{pattern, require_netns, PortInNs, Proc};

mod common;
use common::{in_ns, json, net_args, setup};

const IPERF: &str = env!("CARGO_BIN_EXE_vnic-iperf");

/// The stack on `s`'s vnicd (2 queue pairs) with `kib` of reassembly memory.
fn stack(s: &PortInNs, kib: usize) -> Stack {
    NetArgs {
        socket: Some(s.vnicd.socket.clone()),
        pci: None,
        addr: Some("192.0.2.2/24".into()),
        addr6: Some("2001:db8::2/64".into()),
        queues: 2,
        queue_size: 256,
        no_tso: false,
        no_csum: false,
        busy_poll_us: None,
        reassembly_kib: kib,
        toe: false,
        toe_conns: 0,
        toe_ring_kib: 256,
    }
    .start()
    .expect("stack")
}

/// Fragments a UDP datagram of `len` bytes takes on a 1500-byte link.
fn pieces(len: usize, v6: bool) -> u64 {
    let per = if v6 { (1500 - 48) & !7 } else { 1500 - 20 };
    (len + 8).div_ceil(per) as u64
}

/// Datagrams of each size from the kernel to the stack, then from the
/// stack to the kernel, compared byte for byte; the stack's counters show
/// it reassembled and fragmented each one.
fn exchange(s: &PortInNs, st: &Stack, kernel: IpAddr, me: IpAddr, sizes: &'static [usize]) {
    let v6 = kernel.is_ipv6();
    let sock = UdpSocket::bind(st, 7400).expect("guest UDP socket");
    let before = st.stats();
    let peer = s.ns.enter(move || {
        let k = KernelUdp::bind(SocketAddr::new(kernel, 7401))?;
        k.set_read_timeout(Some(Duration::from_secs(10)))?;
        let to = SocketAddr::new(me, 7400);
        // The first datagram waits for neighbour resolution; the guest
        // answers each with what it got, so send until it does.
        let mut back = vec![0u8; 65536];
        let mut got = Vec::new();
        for (i, &len) in sizes.iter().enumerate() {
            let d = pattern(len, i as u64);
            let mut answered = false;
            for _ in 0..5 {
                k.send_to(&d, to)?;
                k.set_read_timeout(Some(Duration::from_secs(3)))?;
                if let Ok((n, from)) = k.recv_from(&mut back) {
                    got.push((back[..n].to_vec(), from));
                    answered = true;
                    break;
                }
            }
            if !answered {
                return Err(std::io::Error::other(format!("no answer to {len} bytes")));
            }
        }
        Ok(got)
    });
    let mut received = 0u64;
    for (i, &len) in sizes.iter().enumerate() {
        let want = pattern(len, i as u64);
        let mut buf = vec![0u8; 65536];
        // Retries from the kernel (while it resolved us) may bring copies.
        let (n, from) = loop {
            let (n, from) = sock
                .recv_from(&mut buf, Some(Duration::from_secs(20)))
                .unwrap_or_else(|e| panic!("guest got no {len}-byte datagram: {e}"));
            received += 1;
            if n == len {
                break (n, from);
            }
            assert!(n < len, "a {n}-byte datagram where {len} was due");
        };
        assert_eq!(from, SocketAddr::new(kernel, 7401));
        assert!(buf[..n] == want[..], "{len} bytes from the kernel differ");
        let reply = pattern(len, 1000 + i as u64);
        sock.send_to(&reply, from).expect("guest send");
    }
    let got = peer.join().expect("kernel side").expect("kernel side");
    assert_eq!(got.len(), sizes.len());
    for (i, ((d, from), &len)) in got.iter().zip(sizes).enumerate() {
        assert_eq!(*from, SocketAddr::new(me, 7400));
        assert_eq!(d.len(), len, "kernel got {} of {len} bytes", d.len());
        assert!(
            *d == pattern(len, 1000 + i as u64),
            "{len} bytes from the guest differ"
        );
    }
    let after = st.stats();
    let over: Vec<usize> = sizes
        .iter()
        .copied()
        .filter(|&l| pieces(l, v6) > 1)
        .collect();
    assert_eq!(
        after.tx_fragmented - before.tx_fragmented,
        over.len() as u64,
        "{after:?}"
    );
    assert_eq!(
        after.tx_fragments - before.tx_fragments,
        over.iter().map(|&l| pieces(l, v6)).sum::<u64>(),
        "{after:?}"
    );
    let done = after.reassembly.completed - before.reassembly.completed;
    let big = sizes.iter().filter(|&&l| pieces(l, v6) > 1).count() as u64;
    assert!(
        done >= big && done <= received,
        "{done} reassembled: {after:?}"
    );
    assert_eq!(after.tx_unfragmentable, 0);
}

const SIZES: &[usize] = &[1400, 1473, 8000, 30_000, 65_507];
const SIZES6: &[usize] = &[1400, 1453, 8000, 30_000, 65_527];

#[test]
fn udp_datagrams_larger_than_the_mtu_both_ways_over_ipv4_and_ipv6() {
    if !require_netns() {
        return;
    }
    let s = setup();
    let st = stack(&s, 4096);
    exchange(
        &s,
        &st,
        "192.0.2.1".parse().unwrap(),
        "192.0.2.2".parse().unwrap(),
        SIZES,
    );
    exchange(
        &s,
        &st,
        "2001:db8::1".parse().unwrap(),
        "2001:db8::2".parse().unwrap(),
        SIZES6,
    );
    let r = st.stats().reassembly;
    assert_eq!(
        r.overlaps + r.malformed + r.too_large + r.no_memory,
        0,
        "{r:?}"
    );
}

#[test]
fn pings_of_8000_bytes_both_ways() {
    if !require_netns() {
        return;
    }
    let s = setup();
    let st = stack(&s, 4096);
    for (ver, to) in [("-4", "192.0.2.2"), ("-6", "2001:db8::2")] {
        let out =
            s.ns.exec(
                "ping",
                &[ver, "-c", "3", "-i", "0.3", "-W", "3", "-s", "8000", to],
            )
            .unwrap_or_else(|e| panic!("kernel ping {to}: {e}"));
        assert!(out.contains("3 received"), "{out}");
        assert!(out.contains("8008 bytes from"), "{out}");
    }
    for to in ["192.0.2.1", "2001:db8::1"] {
        let to: IpAddr = to.parse().unwrap();
        for seq in 0..3 {
            let rtt = st
                .ping(to, 77, seq, 8000, Duration::from_secs(3))
                .expect("guest ping");
            assert!(rtt.is_some(), "no reply from {to} to an 8000-byte echo");
        }
    }
    let t = st.stats();
    // Six replies and six requests of ours, six fragments each: 8008 bytes
    // of ICMP at 1480 a piece on v4, 1448 on v6.
    assert_eq!(t.tx_fragmented, 12, "{t:?}");
    assert_eq!(t.tx_fragments, 12 * 6, "{t:?}");
    assert!(t.reassembly.completed >= 12, "{t:?}");
}

/// First fragments of datagrams that never complete, `n` of them with
/// `len` payload bytes each, from the namespace's side.
fn orphans(s: &PortInNs, guest_mac: [u8; 6], n: usize, len: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let mut f = Vec::with_capacity(14 + 20 + len);
            f.extend_from_slice(&guest_mac);
            f.extend_from_slice(&s.host_mac);
            f.extend_from_slice(&0x0800u16.to_be_bytes());
            f.resize(14 + 20 + len, 0xa5);
            let mut p = ipv4::Packet::new_unchecked(&mut f[14..]);
            p.set_header_len(20);
            p.set_total_len((20 + len) as u16);
            p.set_ident(i as u16);
            p.set_frag(false, true, 0);
            p.set_ttl(64);
            p.set_protocol(ip_proto::UDP);
            p.set_src_addr([192, 0, 2, 1].into());
            p.set_dst_addr([192, 0, 2, 2].into());
            p.fill_checksum();
            f
        })
        .collect()
}

#[test]
fn a_fragment_flood_stays_within_the_reassembly_memory() {
    if !require_netns() {
        return;
    }
    let s = setup();
    const KIB: usize = 256;
    let st = stack(&s, KIB);
    let frames = orphans(&s, st.mac().0, 1500, 1000);
    for chunk in frames.chunks(100) {
        s.ns.send_frames(&s.tap, chunk.to_vec())
            .expect("send fragments");
        std::thread::sleep(Duration::from_millis(20));
        let m = st.stats().reassembly_memory;
        assert!(m <= (KIB << 10) as u64, "holding {m} bytes");
    }
    // Wait for the stack to have taken them all (or vnicd to have counted
    // the ones it could not deliver).
    let end = Instant::now() + Duration::from_secs(5);
    let mut t = st.stats();
    while t.reassembly.fragments < 1500 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
        t = st.stats();
    }
    let vnicd = s.vnicd.stats().expect("vnicd stats");
    let dropped: u64 = vnicd
        .iter()
        .filter(|(k, _)| k.starts_with("rx") && k.contains(".drop."))
        .map(|(_, v)| v)
        .sum();
    // What vnicd dropped may include frames other than these (the
    // namespace's own multicast, say), so the sum bounds from one side.
    assert!(t.reassembly.fragments <= 1500, "{t:?}");
    assert!(
        t.reassembly.fragments + dropped >= 1500,
        "{t:?} vnicd {vnicd:?}"
    );
    assert!(t.reassembly.fragments >= 1000, "{t:?}");
    assert!(t.reassembly_memory <= (KIB << 10) as u64, "{t:?}");
    // 1500 datagrams of about 1.4 KiB each cannot all be held in 256 KiB:
    // the oldest made room for the newest.
    assert!(t.reassembly.evictions > 0, "{t:?}");
    assert_eq!(t.reassembly.completed, 0, "{t:?}");
    // Nothing else was disturbed: large datagrams still go both ways.
    exchange(
        &s,
        &st,
        "192.0.2.1".parse().unwrap(),
        "192.0.2.2".parse().unwrap(),
        &[8000, 30_000],
    );
}

/// Real iperf3 over UDP with 8000-byte datagrams, both ways, on both
/// families: what one side sent the other received in whole datagrams.
#[test]
fn iperf3_udp_with_8000_byte_datagrams_both_ways() {
    if !require_netns() {
        return;
    }
    let s = setup();
    for (kernel, me) in [("192.0.2.1", "192.0.2.2"), ("2001:db8::1", "2001:db8::2")] {
        // Kernel client, vnic-iperf server.
        let mut a = net_args(&s);
        a.extend(["-s", "-1", "-J", "--idle-timeout", "30"].map(String::from));
        let server = Proc::spawn(Command::new(IPERF).args(&a));
        std::thread::sleep(Duration::from_secs(2));
        let (ok, out, err) = Proc::spawn(&mut in_ns(
            &s,
            "iperf3",
            &["-c", me, "-u", "-l", "8000", "-b", "20M", "-t", "3", "-J"],
        ))
        .finish(Duration::from_secs(60));
        let (sok, sout, serr) = server.finish(Duration::from_secs(20));
        assert!(
            ok,
            "iperf3 -c {me}: {out} {err}\nvnic-iperf -s: {sout} {serr}"
        );
        assert!(sok, "vnic-iperf -s: {sout} {serr}");
        let (c, srv) = (json(&out), json(&sout));
        whole_datagrams(&c["end"]["sum"], &srv["end"]["sum_received"], &c);

        // vnic-iperf client, kernel server.
        let server = Proc::spawn(&mut in_ns(&s, "iperf3", &["-s", "-1", "-J", "-B", kernel]));
        std::thread::sleep(Duration::from_millis(500));
        let mut a = net_args(&s);
        a.extend(
            [
                "-c", kernel, "-u", "-l", "8000", "-b", "20M", "-t", "3", "-J",
            ]
            .map(String::from),
        );
        let (ok, out, err) =
            Proc::spawn(Command::new(IPERF).args(&a)).finish(Duration::from_secs(60));
        assert!(ok, "vnic-iperf -c {kernel}: {out} {err}");
        let (sok, sout, serr) = server.finish(Duration::from_secs(20));
        assert!(sok, "iperf3 -s: {sout} {serr}");
        let (c, srv) = (json(&out), json(&sout));
        whole_datagrams(&c["end"]["sum_sent"], &srv["end"]["sum_received"], &srv);
    }
}

/// The receiver's bytes are whole 8000-byte datagrams, at most what the
/// sender sent and at least 95% of it.
fn whole_datagrams(sent: &Value, received: &Value, doc: &Value) {
    let s = sent["bytes"].as_u64().unwrap_or(0);
    let r = received["bytes"].as_u64().unwrap_or(0);
    assert!(s > 3_000_000, "sent {s}: {doc}");
    assert_eq!(
        r % 8000,
        0,
        "received {r} bytes, not whole datagrams: {doc}"
    );
    assert!(r <= s && r * 100 >= s * 95, "sent {s}, received {r}: {doc}");
}
