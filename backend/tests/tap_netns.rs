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
use vnic_tests::{require_netns, unique, NetNs, Vnicd};

const VNICD: &str = env!("CARGO_BIN_EXE_vnicd");
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
const HOST_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);

struct Setup {
    ns: NetNs,
    vnicd: Vnicd,
    tap: String,
    host_mac: [u8; 6],
}

/// vnicd with a TAP uplink moved into a fresh namespace as 192.0.2.1/24,
/// with a static neighbour entry for the guest.
fn setup(extra: &[&str]) -> Setup {
    let tap = unique("vnt");
    let uplink = format!("tap:{tap}");
    let mut args = vec!["--uplink", uplink.as_str()];
    args.extend_from_slice(extra);
    let vnicd = Vnicd::start(VNICD, &args).expect("vnicd starts");
    let ns = NetNs::new().expect("netns");
    ns.adopt(&tap, "192.0.2.1/24").expect("tap into netns");
    ns.ip(&[
        "neigh",
        "replace",
        "192.0.2.2",
        "lladdr",
        "52:54:00:12:34:56",
        "dev",
        &tap,
    ])
    .expect("static neighbour");
    let host_mac = ns.mac(&tap).expect("tap mac");
    Setup {
        ns,
        vnicd,
        tap,
        host_mac,
    }
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
    let hdr = VirtioNetHdr {
        flags: HdrFlags::NEEDS_CSUM,
        gso_type: GsoType::TcpV4 as u8,
        hdr_len: 54,
        gso_size: 1448,
        csum_start: l4 as u16,
        csum_offset: 16,
        ..Default::default()
    };
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
