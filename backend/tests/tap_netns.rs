//! Whole-system tests: vnic-guest drives vnicd over vhost-user; vnicd's TAP
//! sits in a network namespace where the Linux kernel's own TCP/IP is the
//! peer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::Read,
    net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket},
    time::Duration,
};

use vnic_guest::net::{NetOptions, Received, VirtioNet};
use vnic_protocol::{
    virtio::{hdr::GsoType, HdrFlags, VirtioNetHdr},
    wire::{
        build::{data_segment, tcp_frame, udp_frame, Flow, IpFields},
        ethernet::Address,
        ip_proto, parse_frame, tcp,
        tcp::Flags,
    },
};
use vnic_tests::{require_netns, unique, NetNs};

const VNICD: &str = env!("CARGO_BIN_EXE_vnicd");
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
const HOST_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);

type Setup = vnic_tests::PortInNs;

/// vnicd with a TAP uplink moved into a fresh namespace as 192.0.2.1/24,
/// with a static neighbour entry for the guest.
fn setup(extra: &[&str]) -> Setup {
    vnic_tests::PortInNs::start(
        VNICD,
        extra,
        "192.0.2.1/24",
        &[("192.0.2.2", "52:54:00:12:34:56")],
    )
    .expect("vnicd with its TAP in a namespace")
}

fn flow(s: &Setup, sport: u16, dport: u16) -> Flow {
    Flow {
        src_mac: Address(GUEST_MAC),
        dst_mac: Address(s.host_mac),
        src_ip: GUEST_IP.into(),
        dst_ip: HOST_IP.into(),
        src_port: sport,
        dst_port: dport,
    }
}

/// Waits for a frame matching `want` on RX queue `q`, skipping others.
fn recv_matching(
    g: &mut VirtioNet,
    q: usize,
    want: impl Fn(&Received) -> bool,
) -> Option<Received> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        if let Some(r) = g.recv_timeout(q, Duration::from_millis(100)).unwrap() {
            if want(&r) {
                return Some(r);
            }
        }
    }
    None
}

#[test]
fn udp_frames_both_ways_byte_exact() {
    if !require_netns() {
        return;
    }
    let s = setup(&[]);
    let mut g = VirtioNet::connect(&s.vnicd.socket, NetOptions::default()).expect("guest connects");
    let cfg = g.config().expect("config space");
    assert_eq!(cfg.mac.0, GUEST_MAC);
    assert_eq!(cfg.mtu, 1500);

    // Host side: a UDP socket in the namespace.
    let sock = s.ns.enter(|| {
        let u = UdpSocket::bind((HOST_IP, 5555))?;
        u.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut buf = [0u8; 2048];
        let (n, from) = u.recv_from(&mut buf)?;
        // Answer to the sender's port + 1.
        let reply: Vec<u8> = buf[..n].iter().rev().copied().collect();
        let to = SocketAddr::new(from.ip(), from.port() + 1);
        u.send_to(&reply, to)?;
        Ok((buf[..n].to_vec(), from))
    });
    std::thread::sleep(Duration::from_millis(200));

    let payload: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
    let frame = udp_frame(&flow(&s, 40000, 5555), &IpFields::default(), &payload).unwrap();
    g.send(0, &VirtioNetHdr::default(), &frame).expect("send");
    let host = sock.join().unwrap();
    let (got, from) = host.unwrap_or_else(|e| {
        panic!(
            "host receives: {e}; {:?} {:?} {:?}",
            s.vnicd.stats(),
            s.ns.ip(&["-s", "link", "show", &s.tap]),
            s.ns.exec("nstat", &["-az"])
        )
    });
    assert_eq!(got, payload, "payload reached the kernel byte for byte");
    assert_eq!(from, SocketAddr::new(GUEST_IP.into(), 40000));

    let r = recv_matching(&mut g, 0, |r| {
        parse_frame(&r.frame)
            .ok()
            .and_then(|i| i.l4)
            .is_some_and(|l| l.protocol == ip_proto::UDP && l.dst_port == 40001)
    })
    .expect("guest receives the reply");
    let info = parse_frame(&r.frame).unwrap();
    let off = info.payload_offset().unwrap();
    let reversed: Vec<u8> = payload.iter().rev().copied().collect();
    assert_eq!(&r.frame[off..info.l3_end(r.frame.len())], &reversed[..]);
    assert_eq!(&r.frame[..6], &GUEST_MAC);
    assert_eq!(&r.frame[6..12], &s.host_mac);

    let st = s.vnicd.stats().unwrap();
    assert!(st["tx0.packets"] >= 1);
    assert!(st["rx0.packets"] >= 1);
    assert_eq!(st["tx0.drop.bad_header"], 0);
    drop(g);
    let _ = &s.tap;
}

/// A minimal TCP client on the guest side: handshake, one TSO frame,
/// then the kernel's ACK.
#[test]
fn tso_frame_reaches_a_kernel_tcp_socket_as_a_stream() {
    if !require_netns() {
        return;
    }
    let s = setup(&[]);
    let mut g = VirtioNet::connect(&s.vnicd.socket, NetOptions::default()).expect("guest connects");
    let payload: Vec<u8> = (0..60_000u32).map(|i| (i % 251) as u8).collect();
    let expect = payload.clone();
    let server = s.ns.enter(move || {
        let l = TcpListener::bind((HOST_IP, 5201))?;
        let (mut c, _) = l.accept()?;
        c.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut got = vec![0u8; expect.len()];
        c.read_exact(&mut got)?;
        Ok(got)
    });
    std::thread::sleep(Duration::from_millis(200));

    let f = flow(&s, 41000, 5201);
    let ip = IpFields::default();
    let isn = 0x1000_0000u32;
    let mut syn = data_segment(isn, 0, Flags::SYN);
    syn.mss = Some(1460);
    syn.timestamp = None;
    syn.window_len = 65535;
    g.send(
        0,
        &VirtioNetHdr::default(),
        &tcp_frame(&f, syn, &ip, &[]).unwrap(),
    )
    .unwrap();
    let is_ours = |r: &Received| {
        parse_frame(&r.frame)
            .ok()
            .and_then(|i| i.l4)
            .is_some_and(|l| l.protocol == ip_proto::TCP && l.dst_port == 41000)
    };
    let synack = recv_matching(&mut g, 0, is_ours).expect("SYN-ACK");
    let info = parse_frame(&synack.frame).unwrap();
    let t = tcp::Packet::new_checked(&synack.frame[info.l4.unwrap().offset..]).unwrap();
    assert_eq!(
        t.flags() & (Flags::SYN | Flags::ACK),
        Flags::SYN | Flags::ACK
    );
    assert_eq!(t.ack_number(), isn + 1);
    let peer_isn = t.seq_number();
    let window = usize::from(t.window_len());
    assert!(window >= 32_000, "kernel offers a usable window ({window})");

    let mut ack = data_segment(isn + 1, peer_isn + 1, Flags::ACK);
    ack.timestamp = None;
    ack.window_len = 65535;
    g.send(
        0,
        &VirtioNetHdr::default(),
        &tcp_frame(&f, ack, &ip, &[]).unwrap(),
    )
    .unwrap();

    // One super-frame, as a Linux guest hands it over: NEEDS_CSUM with the
    // pseudo-header sum in the checksum field, GSO TCPv4, MSS 1448.
    let chunk = &payload[..payload.len().min(window)];
    let mut data = data_segment(isn + 1, peer_isn + 1, Flags::ACK | Flags::PSH);
    data.timestamp = None;
    data.window_len = 65535;
    let mut sup = tcp_frame(&f, data, &ip, chunk).unwrap();
    let l4 = 34;
    let ps = vnic_protocol::wire::build::pseudo_header(
        GUEST_IP.into(),
        HOST_IP.into(),
        ip_proto::TCP,
        sup.len() - l4,
    );
    sup[l4 + 16..l4 + 18].copy_from_slice(&ps.to_be_bytes());
    let hdr = VirtioNetHdr::tcp_tso(GsoType::TcpV4, l4 as u16, 54, 1448);
    g.send(0, &hdr, &sup).unwrap();
    let mut sent = chunk.len();
    // The rest, if the window was smaller, after the kernel's ACK.
    let want_ack = isn + 1 + sent as u32;
    let acked = recv_matching(&mut g, 0, |r| {
        is_ours(r) && {
            let i = parse_frame(&r.frame).unwrap();
            let t = tcp::Packet::new_checked(&r.frame[i.l4.unwrap().offset..]).unwrap();
            t.ack_number() == want_ack
        }
    });
    assert!(acked.is_some(), "kernel acknowledged the whole super-frame");
    if sent < payload.len() {
        let mut rest = data_segment(isn + 1 + sent as u32, peer_isn + 1, Flags::ACK | Flags::PSH);
        rest.timestamp = None;
        let fr = tcp_frame(&f, rest, &ip, &payload[sent..]).unwrap();
        g.send(0, &VirtioNetHdr::default(), &fr).unwrap();
        sent = payload.len();
    }
    let got = server
        .join()
        .unwrap()
        .expect("kernel socket reads the stream");
    assert_eq!(got.len(), sent);
    assert_eq!(got, payload, "the stream arrived intact and in order");
    let st = s.vnicd.stats().unwrap();
    assert!(st["tx0.gso_packets"] >= 1, "{st:?}");
}

/// Every frame lands on the RX queue the indirection table names for its
/// Toeplitz hash, and the header reports that hash and its type. The
/// expected hash comes from the bit-at-a-time definition, not the table
/// the device uses. (The Microsoft vectors themselves are checked on
/// whole frames in vnic-protocol; their public addresses are not used
/// on this machine's namespaces.)
#[test]
fn rss_steers_flows_to_the_queues_the_table_names() {
    use vnic_protocol::rss::{toeplitz_bitwise, HashReport, DEFAULT_KEY};
    if !require_netns() {
        return;
    }
    let table = "3,1,2,0,0,2,1,3";
    let s = setup(&["--queues", "4", "--rss-table", table]);
    let opts = NetOptions {
        pairs: 4,
        ..Default::default()
    };
    let mut g = VirtioNet::connect(&s.vnicd.socket, opts).expect("guest connects");
    let table: Vec<usize> = table.split(',').map(|q| q.parse().unwrap()).collect();
    let ports: Vec<u16> = (6000..6040).collect();
    let sender = s.ns.enter({
        let ports = ports.clone();
        move || {
            for p in ports {
                let u = UdpSocket::bind((HOST_IP, p))?;
                u.send_to(&p.to_be_bytes(), (GUEST_IP, 7000))?;
            }
            Ok(())
        }
    });
    sender.join().unwrap().expect("host sends");
    let mut seen = std::collections::BTreeMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while seen.len() < ports.len() && std::time::Instant::now() < deadline {
        for q in 0..4 {
            while let Some(r) = g.recv(q).unwrap() {
                let Ok(info) = parse_frame(&r.frame) else {
                    continue;
                };
                let Some(l4) = info.l4.filter(|l| l.dst_port == 7000) else {
                    continue;
                };
                let mut input = Vec::new();
                input.extend_from_slice(&HOST_IP.octets());
                input.extend_from_slice(&GUEST_IP.octets());
                input.extend_from_slice(&l4.src_port.to_be_bytes());
                input.extend_from_slice(&7000u16.to_be_bytes());
                let hash = toeplitz_bitwise(&DEFAULT_KEY, &input);
                assert_eq!(r.hdr.hash_value, hash, "port {}", l4.src_port);
                assert_eq!(r.hdr.hash_report, HashReport::Udpv4 as u16);
                assert_eq!(
                    q,
                    table[hash as usize % table.len()],
                    "port {}",
                    l4.src_port
                );
                seen.insert(l4.src_port, q);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(seen.len(), ports.len(), "every flow arrived: {seen:?}");
    let queues: std::collections::BTreeSet<usize> = seen.values().copied().collect();
    assert_eq!(queues.len(), 4, "40 flows spread over all four queues");
}

fn wait_for(s: &Setup, what: &str, n: u64) -> std::collections::BTreeMap<String, u64> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let st = s.vnicd.stats().unwrap();
        if st.get(what).copied().unwrap_or(0) >= n || std::time::Instant::now() > deadline {
            return st;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends one UDP datagram from the guest on TX queue `q` and checks the
/// kernel in the namespace receives it.
fn udp_reaches_host(s: &Setup, g: &mut VirtioNet, q: usize, port: u16) {
    let rx = s.ns.enter(move || {
        let u = UdpSocket::bind((HOST_IP, port))?;
        u.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut b = [0u8; 64];
        let (n, _) = u.recv_from(&mut b)?;
        Ok(b[..n].to_vec())
    });
    std::thread::sleep(Duration::from_millis(100));
    let f = udp_frame(&flow(s, 40000, port), &IpFields::default(), b"still here").unwrap();
    g.send(q, &VirtioNetHdr::default(), &f).unwrap();
    assert_eq!(rx.join().unwrap().expect("host receives"), b"still here");
}

#[test]
fn bad_transmit_chains_are_counted_and_survived() {
    use vnic_guest::virtqueue::{RawDesc, F_NEXT, F_WRITE};
    if !require_netns() {
        return;
    }
    let s = setup(&["--queues", "2"]);
    let opts = NetOptions {
        pairs: 2,
        ..Default::default()
    };
    let mut g = VirtioNet::connect(&s.vnicd.socket, opts).expect("guest connects");
    let a = g.scratch(4096).unwrap().0;
    let big = g.scratch(80_000).unwrap().0;
    let d = |addr: u64, len: u32, flags: u16, next: u16| RawDesc {
        addr,
        len,
        flags,
        next,
    };
    // Outside guest memory.
    g.send_raw_chain(1, &[d(0x7fff_0000_0000, 100, 0, 0)])
        .unwrap();
    // A loop: 0 -> 1 -> 0 -> ...
    g.send_raw_chain(1, &[d(a, 64, F_NEXT, 1), d(a, 64, F_NEXT, 0)])
        .unwrap();
    // No bytes at all.
    g.send_raw_chain(1, &[d(a, 0, 0, 0)]).unwrap();
    // 80000 bytes: more than any frame.
    g.send_raw_chain(
        1,
        &[d(big, 40_000, F_NEXT, 1), d(big + 40_000, 40_000, 0, 0)],
    )
    .unwrap();
    // A device-writable buffer in a transmit chain.
    g.send_raw_chain(1, &[d(a, 64, F_NEXT | F_WRITE, 1), d(a, 64, 0, 0)])
        .unwrap();
    // A header that fails validation: TSO with gso_size 0.
    let f = tcp_frame(
        &flow(&s, 1, 2),
        data_segment(1, 1, Flags::ACK),
        &IpFields::default(),
        &[1; 3000],
    )
    .unwrap();
    let bad = VirtioNetHdr {
        gso_type: GsoType::TcpV4 as u8,
        gso_size: 0,
        ..Default::default()
    };
    g.send(0, &bad, &f).unwrap();

    // The bad header went last: once it is counted, all are.
    let st = wait_for(&s, "tx0.drop.bad_header", 1);
    assert_eq!(st["tx0.drop.bad_descriptor"], 1, "{st:?}");
    assert_eq!(st["tx0.drop.chain_too_long"], 1);
    assert_eq!(st["tx0.drop.zero_length"], 1);
    assert_eq!(st["tx0.drop.oversized"], 1);
    assert_eq!(st["tx0.drop.bad_chain_layout"], 1);
    assert_eq!(st["tx0.drop.bad_header"], 1);
    assert_eq!(st["tx0.packets"], 0);

    // The device kept every queue working.
    udp_reaches_host(&s, &mut g, 0, 5600);
    udp_reaches_host(&s, &mut g, 1, 5601);
    let mut v = s.vnicd;
    assert!(v.alive());
}

#[test]
fn rx_chains_too_small_are_counted() {
    use vnic_protocol::virtio::Features;
    if !require_netns() {
        return;
    }
    let s = setup(&[]);
    let opts = NetOptions {
        features: NetOptions::DEFAULT_FEATURES - Features::MRG_RXBUF,
        rx_buf_len: 256,
        ..Default::default()
    };
    let mut g = VirtioNet::connect(&s.vnicd.socket, opts).expect("guest connects");
    let tx = s.ns.enter(|| {
        let u = UdpSocket::bind((HOST_IP, 0))?;
        u.send_to(&[7u8; 1000], (GUEST_IP, 7001))?;
        u.send_to(&[8u8; 100], (GUEST_IP, 7002))?;
        Ok(())
    });
    tx.join().unwrap().unwrap();
    let small = recv_matching(&mut g, 0, |r| {
        parse_frame(&r.frame)
            .ok()
            .and_then(|i| i.l4)
            .is_some_and(|l| l.dst_port == 7002)
    })
    .expect("a frame that fits arrives");
    assert_eq!(&small.frame[small.frame.len() - 100..], &[8u8; 100]);
    let st = wait_for(&s, "rx0.drop.rx_chain_too_small", 1);
    assert_eq!(st["rx0.drop.rx_chain_too_small"], 1, "{st:?}");
    assert_eq!(
        g.rx_length_errors, 1,
        "the driver saw the buffer come back empty"
    );
}

#[test]
fn survives_twenty_reconnects_with_traffic_after_each() {
    if !require_netns() {
        return;
    }
    let s = setup(&[]);
    let rx = s.ns.enter(|| {
        let u = UdpSocket::bind((HOST_IP, 5700))?;
        u.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut got = Vec::new();
        let mut b = [0u8; 64];
        while got.len() < 20 {
            let (n, _) = u.recv_from(&mut b)?;
            got.push(b[..n].to_vec());
        }
        Ok(got)
    });
    std::thread::sleep(Duration::from_millis(100));
    for i in 0..20u8 {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut g = loop {
            match VirtioNet::connect(&s.vnicd.socket, NetOptions::default()) {
                Ok(g) => break g,
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("reconnect {i}: {e}"),
            }
        };
        let f = udp_frame(&flow(&s, 40000, 5700), &IpFields::default(), &[i; 8]).unwrap();
        g.send(0, &VirtioNetHdr::default(), &f).unwrap();
        // Let the device consume it before hanging up.
        let t = std::time::Instant::now();
        while g.tx_in_flight(0) > 0 && t.elapsed() < Duration::from_secs(5) {
            g.reclaim_tx(0).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
        drop(g);
    }
    let got = rx
        .join()
        .unwrap()
        .expect("host receives one datagram per connection");
    let want: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; 8]).collect();
    assert_eq!(got, want);
    let mut v = s.vnicd;
    assert!(v.alive());
}

/// The whole device (a frontend that hands over the control queue): the
/// guest configures RSS, coalescing, queue pairs and filters itself.
#[test]
fn control_queue_commands_are_applied() {
    use vnic_protocol::{
        rss::{toeplitz_bitwise, HashTypes},
        virtio::{
            ctrl::CtrlCommand as C,
            ctrl::{Coal, RssConfig, ACK_ERR, ACK_OK},
            Features,
        },
    };
    if !require_netns() {
        return;
    }
    let s = setup(&["--queues", "4"]);
    let opts = NetOptions {
        pairs: 4,
        features: NetOptions::DEFAULT_FEATURES
            | Features::CTRL_VQ
            | Features::CTRL_RX
            | Features::CTRL_VLAN
            | Features::CTRL_MAC_ADDR
            | Features::CTRL_GUEST_OFFLOADS
            | Features::MQ
            | Features::RSS
            | Features::NOTF_COAL
            | Features::VQ_NOTF_COAL,
        ..Default::default()
    };
    let mut g = VirtioNet::connect(&s.vnicd.socket, opts).expect("guest connects");
    assert!(g
        .features
        .contains(Features::CTRL_VQ | Features::RSS | Features::VQ_NOTF_COAL));
    let cfg = g.config().unwrap();
    assert_eq!(cfg.max_virtqueue_pairs, 4);
    assert_eq!(cfg.rss_max_key_size, 40);
    assert_eq!(cfg.rss_max_indirection_table_length, 128);
    assert_eq!(cfg.supported_hash_types, HashTypes::all().bits());

    assert_eq!(g.ctrl(&C::VqPairsSet(4)).unwrap().0, ACK_OK);
    assert_eq!(g.ctrl(&C::VqPairsSet(5)).unwrap().0, ACK_ERR);

    // RSS: a new key, every flow to queue 2.
    let key: Vec<u8> = (0..40u8).map(|i| i.wrapping_mul(37) ^ 0x5a).collect();
    let rss = C::RssConfig(RssConfig {
        hash_types: (HashTypes::IPV4 | HashTypes::UDPV4).bits(),
        indirection_table: vec![2; 8],
        unclassified_queue: 0,
        max_tx_vq: 4,
        key: key.clone(),
    });
    assert_eq!(g.ctrl(&rss).unwrap().0, ACK_OK);
    let sender = s.ns.enter(|| {
        for p in 6100..6110u16 {
            UdpSocket::bind((HOST_IP, p))?.send_to(b"rss", (GUEST_IP, 7100))?;
        }
        Ok(())
    });
    sender.join().unwrap().unwrap();
    let mut got = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while got < 10 && std::time::Instant::now() < deadline {
        for q in 0..4 {
            while let Some(r) = g.recv(q).unwrap() {
                let Ok(info) = parse_frame(&r.frame) else {
                    continue;
                };
                let Some(l4) = info.l4.filter(|l| l.dst_port == 7100) else {
                    continue;
                };
                assert_eq!(q, 2, "RSS_CONFIG sends every flow to queue 2");
                let mut input = HOST_IP.octets().to_vec();
                input.extend_from_slice(&GUEST_IP.octets());
                input.extend_from_slice(&l4.src_port.to_be_bytes());
                input.extend_from_slice(&7100u16.to_be_bytes());
                assert_eq!(r.hdr.hash_value, toeplitz_bitwise(&key, &input));
                got += 1;
            }
        }
    }
    assert_eq!(got, 10);

    // Coalescing: set, read back, the last command wins, disabled queue ERR.
    let c = Coal {
        max_packets: 16,
        max_usecs: 50,
    };
    assert_eq!(
        g.ctrl(&C::CoalVqSet {
            vq_index: 3,
            coal: c
        })
        .unwrap()
        .0,
        ACK_OK
    );
    let (ack, answer) = g.ctrl(&C::CoalVqGet { vq_index: 3 }).unwrap();
    assert_eq!((ack, Coal::from_bytes(&answer)), (ACK_OK, Some(c)));
    assert_eq!(g.ctrl(&C::CoalTxSet(Coal::default())).unwrap().0, ACK_OK);
    let (_, answer) = g.ctrl(&C::CoalVqGet { vq_index: 3 }).unwrap();
    assert_eq!(Coal::from_bytes(&answer), Some(Coal::default()));
    assert_eq!(g.ctrl(&C::CoalVqGet { vq_index: 8 }).unwrap().0, ACK_ERR);

    // A new MAC address: frames to the old one are filtered and counted.
    let new_mac = Address([0x52, 0x54, 0, 0xab, 0xcd, 0xef]);
    assert_eq!(
        g.ctrl(&C::MacTableSet {
            unicast: vec![],
            multicast: vec![]
        })
        .unwrap()
        .0,
        ACK_OK
    );
    assert_eq!(g.ctrl(&C::MacAddrSet(new_mac)).unwrap().0, ACK_OK);
    assert_eq!(g.config().unwrap().mac, new_mac);
    s.ns.enter(|| {
        UdpSocket::bind((HOST_IP, 0))?.send_to(b"to the old mac", (GUEST_IP, 7101))?;
        Ok(())
    })
    .join()
    .unwrap()
    .unwrap();
    let filtered = || {
        let st = s.vnicd.stats().unwrap();
        (0..4)
            .map(|q| st[&format!("rx{q}.drop.filtered")])
            .sum::<u64>()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while filtered() == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(filtered(), 1);

    // Nonsense commands get ERR, and are counted.
    assert_eq!(g.ctrl_raw(&[9, 0], 0).unwrap().0, ACK_ERR);
    assert_eq!(g.ctrl_raw(&[4, 0, 1], 0).unwrap().0, ACK_ERR);
    let st = s.vnicd.stats().unwrap();
    assert_eq!(st["ctrl0.drop.bad_control"], 2);
}

/// The kernel sends a TCP stream to the guest: with GUEST_TSO the TAP
/// hands over GSO frames, which reach the guest as they are (gso_type,
/// gso_size, NEEDS_CSUM), read straight into its buffers and spread over
/// several with MRG_RXBUF. The test's own minimal receiver acks in order.
#[test]
fn kernel_stream_reaches_the_guest_as_gso_frames() {
    use std::io::Write;
    if !require_netns() {
        return;
    }
    let s = setup(&[]);
    let mut g = VirtioNet::connect(&s.vnicd.socket, NetOptions::default()).expect("guest connects");
    let total = 300_000usize;
    let data: Vec<u8> = (0..total as u32).map(|i| (i * 13 % 256) as u8).collect();
    let send = data.clone();
    let server = s.ns.enter(move || {
        let l = TcpListener::bind((HOST_IP, 5202))?;
        let (mut c, _) = l.accept()?;
        c.write_all(&send)?;
        Ok(())
    });
    std::thread::sleep(Duration::from_millis(200));
    let f = flow(&s, 42000, 5202);
    let ip = IpFields::default();
    let isn = 77u32;
    let seg = |seq: u32, ack: u32, flags: Flags| {
        let mut r = data_segment(seq, ack, flags);
        r.timestamp = None;
        r.window_len = 65535;
        r
    };
    let mut syn = seg(isn, 0, Flags::SYN);
    syn.mss = Some(1460);
    g.send(
        0,
        &VirtioNetHdr::default(),
        &tcp_frame(&f, syn, &ip, &[]).unwrap(),
    )
    .unwrap();
    let mine = |r: &Received| {
        parse_frame(&r.frame)
            .ok()
            .and_then(|i| i.l4)
            .is_some_and(|l| l.protocol == ip_proto::TCP && l.dst_port == 42000)
    };
    let synack = recv_matching(&mut g, 0, mine).expect("SYN-ACK");
    let info = parse_frame(&synack.frame).unwrap();
    let t = tcp::Packet::new_checked(&synack.frame[info.l4.unwrap().offset..]).unwrap();
    let mut next = t.seq_number().wrapping_add(1);
    let start = next;
    g.send(
        0,
        &VirtioNetHdr::default(),
        &tcp_frame(&f, seg(isn + 1, next, Flags::ACK), &ip, &[]).unwrap(),
    )
    .unwrap();
    let mut got = Vec::with_capacity(total);
    let (mut gso_frames, mut merged, mut max_size) = (0, 0, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while got.len() < total && std::time::Instant::now() < deadline {
        let Some(r) = g.recv_timeout(0, Duration::from_millis(200)).unwrap() else {
            // Nudge the sender with a duplicate ACK.
            let a = tcp_frame(&f, seg(isn + 1, next, Flags::ACK), &ip, &[]).unwrap();
            g.send(0, &VirtioNetHdr::default(), &a).unwrap();
            continue;
        };
        if !mine(&r) {
            continue;
        }
        let info = parse_frame(&r.frame).unwrap();
        let l4 = info.l4.unwrap();
        let t = tcp::Packet::new_checked(&r.frame[l4.offset..info.l3_end(r.frame.len())]).unwrap();
        let payload = t.payload();
        if payload.is_empty() {
            continue;
        }
        if r.hdr.gso_type == GsoType::TcpV4 as u8 {
            gso_frames += 1;
            assert!(r.hdr.gso_size > 0 && r.hdr.flags.contains(HdrFlags::NEEDS_CSUM));
        }
        if r.buffers > 1 {
            merged += 1;
        }
        max_size = max_size.max(payload.len());
        if t.seq_number() == next {
            got.extend_from_slice(payload);
            next = next.wrapping_add(payload.len() as u32);
        }
        let a = tcp_frame(&f, seg(isn + 1, next, Flags::ACK), &ip, &[]).unwrap();
        g.send(0, &VirtioNetHdr::default(), &a).unwrap();
    }
    server.join().unwrap().expect("kernel wrote the stream");
    assert_eq!(next.wrapping_sub(start) as usize, total);
    assert_eq!(got, data, "the stream arrived intact");
    assert!(
        gso_frames > 0,
        "GSO frames passed through (largest payload {max_size})"
    );
    assert!(
        merged > 0,
        "large frames spread over several mergeable buffers"
    );
    let st = s.vnicd.stats().unwrap();
    assert!(st["rx0.direct"] > 0, "{st:?}");
}

/// `vnicd --client` connects to a frontend that listens (a VMM started
/// with `server=on`), and connects again after the frontend goes away.
#[test]
fn client_mode_connects_to_a_listening_frontend() {
    use std::os::unix::net::UnixListener;
    if !require_netns() {
        return;
    }
    let dir = std::env::temp_dir().join(unique("vnicfe"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("fe.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let tap = unique("vnt");
    let uplink = format!("tap:{tap}");
    let vnicd = vnic_tests::Vnicd::start_client(VNICD, &path, &["--uplink", &uplink]).unwrap();
    let ns = NetNs::new().unwrap();
    ns.adopt(&tap, "192.0.2.1/24").unwrap();
    ns.ip(&[
        "neigh",
        "replace",
        "192.0.2.2",
        "lladdr",
        "52:54:00:12:34:56",
        "dev",
        &tap,
    ])
    .unwrap();
    let host_mac = ns.mac(&tap).unwrap();
    let s = vnic_tests::PortInNs {
        ns,
        vnicd,
        tap,
        host_mac,
    };
    for round in 0..2u16 {
        // Never wait forever: vnicd must connect within 10 s.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        listener.set_nonblocking(true).unwrap();
        loop {
            let mut pfd = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&listener),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            if unsafe { libc::poll(&mut pfd, 1, 100) } > 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "vnicd did not connect (round {round})"
            );
        }
        listener.set_nonblocking(false).unwrap();
        let mut g = VirtioNet::accept(&listener, NetOptions::default()).expect("vnicd connects");
        udp_reaches_host(&s, &mut g, 0, 5800 + round);
    }
    let mut v = s.vnicd;
    assert!(v.alive(), "vnicd survives the frontend going away");
    let _ = std::fs::remove_dir_all(&dir);
}

/// With pairs set up but only some enabled (a QEMU guest with fewer vCPUs
/// than queues), every frame goes to an enabled queue and none is lost.
#[test]
fn rss_uses_only_the_queues_the_frontend_enabled() {
    if !require_netns() {
        return;
    }
    let s = setup(&["--queues", "4"]);
    let opts = NetOptions {
        pairs: 4,
        enabled_pairs: Some(2),
        ..Default::default()
    };
    let mut g = VirtioNet::connect(&s.vnicd.socket, opts).expect("guest connects");
    s.ns.enter(|| {
        for p in 6200..6240u16 {
            UdpSocket::bind((HOST_IP, p))?.send_to(b"x", (GUEST_IP, 7200))?;
        }
        Ok(())
    })
    .join()
    .unwrap()
    .unwrap();
    let mut per_queue = [0usize; 2];
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while per_queue.iter().sum::<usize>() < 40 && std::time::Instant::now() < deadline {
        for (q, n) in per_queue.iter_mut().enumerate() {
            while let Some(r) = g.recv(q).unwrap() {
                if parse_frame(&r.frame)
                    .ok()
                    .and_then(|i| i.l4)
                    .is_some_and(|l| l.dst_port == 7200)
                {
                    *n += 1;
                }
            }
        }
    }
    assert_eq!(
        per_queue.iter().sum::<usize>(),
        40,
        "{per_queue:?} {:?}",
        s.vnicd
            .stats()
            .map(|m| m.into_iter().filter(|(_, v)| *v != 0).collect::<Vec<_>>())
    );
    assert!(
        per_queue.iter().all(|&n| n > 0),
        "both enabled queues used: {per_queue:?}"
    );
    let st = s.vnicd.stats().unwrap();
    assert_eq!(st["rx2.packets"] + st["rx3.packets"], 0);
}
