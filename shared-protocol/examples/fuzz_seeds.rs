//! Writes the checked-in seed corpus of the fuzz targets.
//!
//! `cargo run -p vnic-protocol --example fuzz_seeds -- fuzz/corpus`

use std::{fs, io, net::Ipv6Addr, path::Path};

use vnic_protocol::{
    toe::{self, Command, Completion, Event, RingSpec},
    virtio::{
        ctrl::{Coal, CtrlCommand, HashConfig, RssConfig, RxMode},
        hdr::GsoType,
        HdrFlags, VirtioNetHdr,
    },
    wire::{
        arp,
        build::{data_segment, pseudo_header, tcp_frame, udp_frame, Flow, IpFields},
        emit,
        ethernet::{self, Address},
        icmpv4, icmpv6, ip_proto, ipv6, parse_frame,
        tcp::Flags,
    },
};

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) -> io::Result<()> {
    let d = dir.join(target);
    fs::create_dir_all(&d)?;
    fs::write(d.join(format!("seed-{name}")), bytes)
}

fn eth(flow: &Flow, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 14];
    f[..6].copy_from_slice(&flow.dst_mac.0);
    f[6..12].copy_from_slice(&flow.src_mac.0);
    f[12..14].copy_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn ipv6_packet(next: u8, payload: &[u8]) -> Vec<u8> {
    let r = ipv6::Repr {
        src_addr: "2001:db8::1".parse().unwrap_or(Ipv6Addr::LOCALHOST),
        dst_addr: "2001:db8::2".parse().unwrap_or(Ipv6Addr::LOCALHOST),
        next_header: next,
        payload_len: payload.len(),
        hop_limit: 64,
        traffic_class: 0,
        flow_label: 7,
    };
    let mut b = vec![0u8; r.buffer_len()];
    let _ = r.emit(&mut ipv6::Packet::new_unchecked(&mut b[..]));
    b[40..].copy_from_slice(payload);
    b
}

fn tso_hdr(frame: &[u8], gso: GsoType, size: u16) -> Vec<u8> {
    let info = parse_frame(frame).ok();
    let l4 = info.and_then(|i| i.l4);
    let (start, hl) = l4.map_or((0, 0), |l| (l.offset, l.offset + l.header_len));
    let h = VirtioNetHdr {
        flags: HdrFlags::NEEDS_CSUM,
        gso_type: gso as u8,
        hdr_len: hl as u16,
        gso_size: size,
        csum_start: start as u16,
        csum_offset: if gso == GsoType::UdpL4 { 6 } else { 16 },
        ..Default::default()
    };
    let mut b = vec![0u8; 12];
    let _ = h.emit(&mut b, false);
    b.extend_from_slice(frame);
    b
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "fuzz/corpus".into());
    let dir = Path::new(&dir);
    let ip = IpFields::default();
    let (v4, v6) = (Flow::v4(), Flow::v6());
    let payload: Vec<u8> = (0..3000u32).map(|i| (i % 253) as u8).collect();

    // frame_parse
    let tcp4 = tcp_frame(
        &v4,
        data_segment(1, 2, Flags::ACK | Flags::PSH),
        &ip,
        b"hello",
    )?;
    let tcp6 = tcp_frame(&v6, data_segment(1, 2, Flags::ACK), &ip, b"hello")?;
    write(dir, "frame_parse", "tcp4", &tcp4)?;
    write(dir, "frame_parse", "tcp6", &tcp6)?;
    write(dir, "frame_parse", "udp4", &udp_frame(&v4, &ip, b"dns?")?)?;
    write(dir, "frame_parse", "udp6", &udp_frame(&v6, &ip, b"dns?")?)?;
    let mut qinq = tcp4[..12].to_vec();
    qinq.extend_from_slice(&[0x88, 0xa8, 0, 10, 0x81, 0, 0, 20]);
    qinq.extend_from_slice(&tcp4[12..]);
    write(dir, "frame_parse", "qinq", &qinq)?;
    let mut a = [0u8; arp::PACKET_LEN];
    arp::Repr {
        operation: arp::OP_REQUEST,
        source_hardware_addr: v4.src_mac,
        source_protocol_addr: [192, 0, 2, 1].into(),
        target_hardware_addr: Address::default(),
        target_protocol_addr: [192, 0, 2, 2].into(),
    }
    .emit(&mut arp::Packet::new_unchecked(&mut a[..]))?;
    write(
        dir,
        "frame_parse",
        "arp",
        &eth(&v4, ethernet::ethertype::ARP, &a),
    )?;
    let echo = icmpv4::Repr::EchoRequest {
        ident: 1,
        seq_no: 1,
        data: b"ping",
    };
    let mut e = vec![0u8; echo.buffer_len()];
    echo.emit(&mut icmpv4::Packet::new_unchecked(&mut e[..]))?;
    let mut ip4 = vec![0x45, 0, 0, (20 + e.len()) as u8, 0, 1, 0x40, 0, 64, 1, 0, 0];
    ip4.extend_from_slice(&[192, 0, 2, 1, 192, 0, 2, 2]);
    let c = vnic_protocol::checksum::checksum(&ip4);
    ip4[10..12].copy_from_slice(&c.to_be_bytes());
    ip4.extend_from_slice(&e);
    write(
        dir,
        "frame_parse",
        "icmp4",
        &eth(&v4, ethernet::ethertype::IPV4, &ip4),
    )?;
    let ns = icmpv6::Repr::NeighborSolicit {
        target: "2001:db8::2".parse()?,
        source_lladdr: Some(v6.src_mac),
    };
    let mut n = vec![0u8; ns.buffer_len()];
    let ps = pseudo_header(v6.src_ip, v6.dst_ip, ip_proto::ICMPV6, n.len());
    ns.emit(&mut icmpv6::Packet::new_unchecked(&mut n[..]), ps)?;
    let p6 = ipv6_packet(ip_proto::ICMPV6, &n);
    write(
        dir,
        "frame_parse",
        "ndp",
        &eth(&v6, ethernet::ethertype::IPV6, &p6),
    )?;
    let mut ext = vec![ip_proto::DST_OPTS, 0, 1, 4, 0, 0, 0, 0];
    ext.extend_from_slice(&[ip_proto::FRAGMENT, 0, 1, 4, 0, 0, 0, 0]);
    ext.extend_from_slice(&[ip_proto::UDP, 0, 0, 1, 0, 0, 0, 9]);
    ext.extend_from_slice(&[0; 16]);
    let p6 = ipv6_packet(ip_proto::HOP_BY_HOP, &ext);
    write(
        dir,
        "frame_parse",
        "v6ext",
        &eth(&v6, ethernet::ethertype::IPV6, &p6),
    )?;

    // validate_segment
    let big4 = tcp_frame(
        &v4,
        data_segment(1, 2, Flags::ACK | Flags::PSH),
        &ip,
        &payload,
    )?;
    let big6 = tcp_frame(&v6, data_segment(1, 2, Flags::ACK), &ip, &payload)?;
    let bigu = udp_frame(&v4, &ip, &payload)?;
    write(
        dir,
        "validate_segment",
        "tso4",
        &tso_hdr(&big4, GsoType::TcpV4, 1448),
    )?;
    write(
        dir,
        "validate_segment",
        "tso6",
        &tso_hdr(&big6, GsoType::TcpV6, 1428),
    )?;
    write(
        dir,
        "validate_segment",
        "uso",
        &tso_hdr(&bigu, GsoType::UdpL4, 1200),
    )?;
    write(
        dir,
        "validate_segment",
        "csum",
        &tso_hdr(&tcp4, GsoType::None, 0),
    )?;
    write(
        dir,
        "validate_segment",
        "structured",
        &[
            0xff, 0, 0x19, 0xa8, 0x05, 0x10, 0x27, 1, 2, 3, 4, 5, 6, 7, 8,
        ],
    )?;

    // ctrl_command
    let cmds = [
        CtrlCommand::Rx {
            mode: RxMode::Promisc,
            on: true,
        },
        CtrlCommand::MacTableSet {
            unicast: vec![v4.src_mac],
            multicast: vec![Address([0x33, 0x33, 0, 0, 0, 1])],
        },
        CtrlCommand::MacAddrSet(v4.dst_mac),
        CtrlCommand::VlanAdd(100),
        CtrlCommand::AnnounceAck,
        CtrlCommand::VqPairsSet(4),
        CtrlCommand::RssConfig(RssConfig {
            hash_types: 0x3f,
            indirection_table: (0..128).map(|i| i % 4).collect(),
            unclassified_queue: 0,
            max_tx_vq: 4,
            key: vnic_protocol::rss::DEFAULT_KEY.to_vec(),
        }),
        CtrlCommand::HashConfig(HashConfig {
            hash_types: 0x12,
            key: vec![1; 40],
        }),
        CtrlCommand::GuestOffloadsSet(0x183),
        CtrlCommand::CoalRxSet(Coal {
            max_packets: 32,
            max_usecs: 64,
        }),
        CtrlCommand::CoalVqSet {
            vq_index: 2,
            coal: Coal {
                max_packets: 8,
                max_usecs: 16,
            },
        },
        CtrlCommand::CoalVqGet { vq_index: 1 },
    ];
    for (i, c) in cmds.iter().enumerate() {
        write(dir, "ctrl_command", &format!("cmd{i:02}"), &c.to_bytes()?)?;
    }

    // reassembly: mode byte, then (offset lo, offset hi, 8-byte units, flags).
    write(
        dir,
        "reassembly",
        "v4-in-order",
        &[0, 0, 0, 4, 0x01, 4, 0, 4, 0x01, 8, 0, 2, 0x06],
    )?;
    write(
        dir,
        "reassembly",
        "v6-reverse",
        &[1, 8, 0, 2, 0x00, 4, 0, 4, 0x01, 0, 0, 4, 0x01],
    )?;
    write(
        dir,
        "reassembly",
        "overlap-timeout",
        &[
            0, 0, 0, 6, 0x01, 2, 0, 2, 0x10, 0, 0, 0, 0x80, 0, 0, 1, 0x00,
        ],
    )?;

    // gro: v6 bit, mss/8-64, payload length, flows, then segment picks.
    write(
        dir,
        "gro",
        "in-order-v4",
        &[0, 173, 0x88, 0x13, 7, 0, 1, 2, 3],
    )?;
    write(
        dir,
        "gro",
        "reorder-v6",
        &[1, 100, 0x10, 0x27, 3, 0, 2, 1, 3, 4, 0x85, 5],
    )?;
    write(
        dir,
        "gro",
        "junk",
        &[0, 20, 0, 4, 1, 0, 0xc0, 1, 2, 3, 4, 5, 6, 7],
    )?;

    // fragment: MTU (little endian), link-header length, order, packet.
    let big = vec![0x5a; 3000];
    let frame = udp_frame(&v4, &ip, &big)?;
    let mut seed = vec![0xdc, 0x05, 14, 0];
    seed.extend_from_slice(&frame);
    write(dir, "fragment", "v4-udp-1500", &seed)?;
    let mut seed = vec![0x40, 0x02, 0, 3];
    let mut opts = frame[14..34].to_vec();
    opts[0] = 0x47; // IHL 7: a copied option and a record route follow
    opts.extend_from_slice(&[0x82, 4, 1, 2, 7, 3, 4, 0]);
    opts.extend_from_slice(&frame[34..]);
    seed.extend_from_slice(&opts);
    write(dir, "fragment", "v4-options-576", &seed)?;
    let mut ext = vec![ip_proto::UDP, 0, 1, 4, 0, 0, 0, 0];
    ext.extend_from_slice(&big);
    let mut seed = vec![0x00, 0x05, 0, 1];
    seed.extend_from_slice(&ipv6_packet(ip_proto::HOP_BY_HOP, &ext));
    write(dir, "fragment", "v6-hbh-1280", &seed)?;

    // toe_command: a command, an event and a completion of each kind.
    let ring = |addr| RingSpec {
        addr,
        size: 1 << 16,
    };
    let toe_cmds = [
        Command::Hello {
            version: toe::VERSION,
            conns: 1024,
        },
        Command::IfConfig {
            addr: "2001:db8::2".parse()?,
            prefix: 64,
            gateway: Some("2001:db8::1".parse()?),
        },
        Command::Connect {
            conn: 1,
            remote: "192.0.2.1:5201".parse()?,
            local_port: 0,
            rx: ring(0x10_0000),
            tx: ring(0x20_0000),
        },
        Command::Listen {
            id: 2,
            port: 5201,
            family: toe::Family::Both,
            backlog: 64,
        },
        Command::Accept {
            conn: 3,
            handle: 9,
            rx: ring(0x30_0000),
            tx: ring(0x40_0000),
        },
        Command::Send {
            conn: 1,
            tail: 4096,
        },
        Command::SetOpt {
            conn: 1,
            opt: toe::SockOpt::NoDelay,
            value: 1,
        },
    ];
    for (i, c) in toe_cmds.iter().enumerate() {
        write(dir, "toe_command", &format!("cmd{i:02}"), &c.to_bytes())?;
    }
    let toe_events = [
        Event::Incoming {
            listener: 2,
            handle: 9,
            remote: "[2001:db8::7]:40000".parse()?,
        },
        Event::Closed {
            conn: 1,
            reason: toe::CloseReason::Reset,
        },
    ];
    for (i, e) in toe_events.iter().enumerate() {
        write(dir, "toe_command", &format!("event{i:02}"), &e.to_bytes())?;
    }
    let done = Completion::ok(49152).to_bytes();
    write(dir, "toe_command", "completion", &done)?;

    // toe_engine: a flag byte, then operations (0 command, 1 frame with a
    // little-endian length, 2 timers, 3 transmit, 4 take the events).
    let mut seed = vec![1u8];
    let op_cmd = |seed: &mut Vec<u8>, c: Command| {
        seed.push(0);
        seed.extend_from_slice(&c.to_bytes());
    };
    op_cmd(
        &mut seed,
        Command::Hello {
            version: 1,
            conns: 8,
        },
    );
    op_cmd(
        &mut seed,
        Command::IfConfig {
            addr: "192.0.2.2".parse()?,
            prefix: 24,
            gateway: None,
        },
    );
    op_cmd(
        &mut seed,
        Command::Listen {
            id: 0,
            port: 80,
            family: toe::Family::Both,
            backlog: 4,
        },
    );
    let dev = Address([2, 0, 0, 0, 0, 1]);
    let peer = Address([2, 0, 0, 0, 0, 2]);
    let mut syn_conn = vnic_protocol::tcp::Connection::connect(
        vnic_protocol::tcp::Config::default(),
        vnic_protocol::tcp::Instant(0),
        1000,
        80,
        7,
    );
    if let Some(seg) = syn_conn.poll_transmit(vnic_protocol::tcp::Instant(0), 1460) {
        let mut f = Vec::new();
        let (l, r) = ("192.0.2.1:1000".parse()?, "192.0.2.2:80".parse()?);
        if emit::tcp_segment(&mut f, peer, l, r, &seg, 1, false).is_some() {
            f[..6].copy_from_slice(dev.as_bytes());
            seed.push(1);
            seed.extend_from_slice(&(f.len() as u16).to_le_bytes());
            seed.extend_from_slice(&f);
        }
    }
    let mut arp = Vec::new();
    emit::arp_request(&mut arp, peer, "192.0.2.1".parse()?, "192.0.2.2".parse()?);
    seed.push(1);
    seed.extend_from_slice(&(arp.len() as u16).to_le_bytes());
    seed.extend_from_slice(&arp);
    seed.extend_from_slice(&[3, 4]);
    op_cmd(
        &mut seed,
        Command::Connect {
            conn: 1,
            remote: "192.0.2.1:5201".parse()?,
            local_port: 0,
            rx: RingSpec {
                addr: 0x1_0000,
                size: 4096,
            },
            tx: RingSpec {
                addr: 0x1_1000,
                size: 4096,
            },
        },
    );
    seed.extend_from_slice(&[3, 2, 4]);
    write(dir, "toe_engine", "listen-syn-connect", &seed)?;
    Ok(())
}
