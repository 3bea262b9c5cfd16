//! vnic-iperf: the iperf3 protocol (control connection, cookie, JSON
//! parameter and result exchange, TCP and UDP streams) over the
//! vnic-guest stack, so that it runs against a real `iperf3` either way.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr},
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use clap::Parser;
use serde_json::{json, Value};
use vnic_guest::{
    cli::NetArgs,
    stack::{Stack, TcpListener, TcpStream, UdpSocket},
};

const TEST_START: u8 = 1;
const TEST_RUNNING: u8 = 2;
const TEST_END: u8 = 4;
const PARAM_EXCHANGE: u8 = 9;
const CREATE_STREAMS: u8 = 10;
const SERVER_TERMINATE: u8 = 11;
const CLIENT_TERMINATE: u8 = 12;
const EXCHANGE_RESULTS: u8 = 13;
const DISPLAY_RESULTS: u8 = 14;
const IPERF_DONE: u8 = 16;
const ACCESS_DENIED: u8 = 0xff;
const SERVER_ERROR: u8 = 0xfe;
const COOKIE_LEN: usize = 37;
/// What the client's UDP stream sends first and the server answers
/// (iperf3 writes both as host-order integers).
const UDP_CONNECT_MSG: [u8; 4] = 0x3637_3839u32.to_le_bytes();
const UDP_CONNECT_REPLY: [u8; 4] = 0x3938_3736u32.to_le_bytes();

#[derive(Debug, Parser)]
#[command(
    name = "vnic-iperf",
    about = "iperf3-compatible client and server on the vnic-guest stack"
)]
struct Cli {
    #[command(flatten)]
    net: NetArgs,
    /// Run as server.
    #[arg(short = 's', long, conflicts_with = "client")]
    server: bool,
    /// Run as client to this server.
    #[arg(short = 'c', long)]
    client: Option<IpAddr>,
    #[arg(short = 'p', long, default_value_t = 5201)]
    port: u16,
    /// UDP instead of TCP.
    #[arg(short = 'u', long)]
    udp: bool,
    /// Target bit rate for UDP (k, M, G suffixes).
    #[arg(short = 'b', long, default_value = "1M")]
    bitrate: String,
    /// Parallel streams.
    #[arg(short = 'P', long, default_value_t = 1)]
    parallel: u32,
    /// Server sends, client receives.
    #[arg(short = 'R', long)]
    reverse: bool,
    /// Seconds to transmit.
    #[arg(short = 't', long, default_value_t = 10.0)]
    time: f64,
    /// Block length (default 128 KiB for TCP, 1448 for UDP).
    #[arg(short = 'l', long)]
    len: Option<usize>,
    /// JSON output.
    #[arg(short = 'J', long)]
    json: bool,
    /// Server: handle one client, then exit.
    #[arg(short = '1', long)]
    one_off: bool,
    /// Server: give up after this many seconds without a client.
    #[arg(long, default_value_t = 60.0)]
    idle_timeout: f64,
}

type Res<T> = Result<T, String>;

fn e<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> String {
    move |x| format!("{what}: {x}")
}

fn parse_rate(s: &str) -> Res<u64> {
    let (n, m) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1_000),
        Some('m' | 'M') => (&s[..s.len() - 1], 1_000_000),
        Some('g' | 'G') => (&s[..s.len() - 1], 1_000_000_000),
        _ => (s, 1),
    };
    let v: f64 = n.parse().map_err(e("bit rate"))?;
    Ok((v * f64::from(m)) as u64)
}

fn cookie() -> [u8; COOKIE_LEN] {
    let mut c = [0u8; COOKIE_LEN];
    let mut x = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        ^ u64::from(std::process::id()) << 32;
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
    for b in c.iter_mut().take(COOKIE_LEN - 1) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = CHARS[(x % 32) as usize];
    }
    c
}

fn write_json(s: &mut TcpStream, v: &Value) -> Res<()> {
    let txt = v.to_string();
    s.write_all(&(txt.len() as u32).to_be_bytes())
        .map_err(e("control write"))?;
    s.write_all(txt.as_bytes()).map_err(e("control write"))
}

fn read_json(s: &mut TcpStream) -> Res<Value> {
    let mut n = [0u8; 4];
    s.read_exact(&mut n).map_err(e("control read"))?;
    let len = u32::from_be_bytes(n) as usize;
    if len > 1 << 20 {
        return Err("peer sent an oversized JSON message".into());
    }
    let mut b = vec![0u8; len];
    s.read_exact(&mut b).map_err(e("control read"))?;
    serde_json::from_slice(&b).map_err(e("peer JSON"))
}

fn state(s: &mut TcpStream, st: u8) -> Res<()> {
    s.write_all(&[st]).map_err(e("control write"))
}

fn read_state(s: &mut TcpStream) -> Res<u8> {
    let mut b = [0u8; 1];
    s.read_exact(&mut b).map_err(e("control read"))?;
    Ok(b[0])
}

/// What one stream counted.
#[derive(Debug, Default)]
struct Counter {
    bytes: AtomicU64,
    packets: AtomicU64,
    errors: AtomicU64,
    /// Jitter in nanoseconds (RFC 3550 estimator).
    jitter_ns: AtomicU64,
    retransmits: AtomicU64,
}

/// One test's streams, whichever side.
struct Test {
    udp: bool,
    sender: bool,
    len: usize,
    rate: u64,
    time: f64,
    tcp: Vec<Arc<Mutex<TcpStream>>>,
    udp_socks: Vec<(Arc<UdpSocket>, SocketAddr)>,
    counters: Vec<Arc<Counter>>,
    stop: Arc<AtomicBool>,
    start: Instant,
    elapsed: f64,
}

/// iperf3's stream ids: 1, then 3, 4, 5, ...
fn stream_id(i: usize) -> usize {
    if i == 0 {
        1
    } else {
        i + 2
    }
}

impl Test {
    /// A test with no streams yet; `sender` says which way data flows
    /// for this side.
    fn new(udp: bool, sender: bool, len: usize, rate: u64, time: f64) -> Test {
        Test {
            udp,
            sender,
            len,
            rate,
            time,
            tcp: Vec::new(),
            udp_socks: Vec::new(),
            counters: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            start: Instant::now(),
            elapsed: 0.0,
        }
    }

    fn run_streams(&mut self) -> Vec<thread::JoinHandle<()>> {
        self.start = Instant::now();
        let mut hs = Vec::new();
        for i in 0..self.counters.len() {
            let c = self.counters[i].clone();
            let stop = self.stop.clone();
            let (len, rate, sender, n) = (self.len, self.rate, self.sender, self.counters.len());
            if self.udp {
                let (sock, peer) = self.udp_socks[i].clone();
                hs.push(thread::spawn(move || {
                    if sender {
                        udp_send(&sock, peer, len, rate / n as u64, &c, &stop);
                    } else {
                        udp_recv(&sock, &c, &stop);
                    }
                }));
            } else {
                let s = self.tcp[i].clone();
                hs.push(thread::spawn(move || {
                    if sender {
                        tcp_send(&s, len, &c, &stop);
                    } else {
                        tcp_recv(&s, &c, &stop);
                    }
                }));
            }
        }
        hs
    }

    fn results(&self) -> Value {
        let streams: Vec<Value> = self
            .counters
            .iter()
            .enumerate()
            .map(|(i, c)| {
                json!({
                    "id": stream_id(i),
                    "bytes": c.bytes.load(Ordering::Relaxed),
                    "retransmits": if self.sender && !self.udp { c.retransmits.load(Ordering::Relaxed) as i64 } else { -1 },
                    "jitter": c.jitter_ns.load(Ordering::Relaxed) as f64 / 1e9,
                    "errors": c.errors.load(Ordering::Relaxed),
                    "packets": c.packets.load(Ordering::Relaxed),
                    "start_time": 0,
                    "end_time": self.elapsed,
                })
            })
            .collect();
        json!({
            "cpu_util_total": 0.0,
            "cpu_util_user": 0.0,
            "cpu_util_system": 0.0,
            "sender_has_retransmits": if self.sender && !self.udp { 1 } else { 0 },
            "congestion_used": "newreno",
            "streams": streams,
        })
    }

    fn collect_retransmits(&self) {
        for (i, s) in self.tcp.iter().enumerate() {
            if let Ok(st) = s
                .lock()
                .map_err(|_| ())
                .and_then(|s| s.tcp_stats().map_err(|_| ()))
            {
                self.counters[i]
                    .retransmits
                    .store(st.retransmits, Ordering::Relaxed);
            }
        }
    }

    /// The -J document: our numbers and the peer's, iperf3's shape.
    fn report(&self, peer: &Value, role: &str) -> Value {
        let ours: Vec<(u64, u64, u64, u64, f64)> = self
            .counters
            .iter()
            .map(|c| {
                (
                    c.bytes.load(Ordering::Relaxed),
                    c.retransmits.load(Ordering::Relaxed),
                    c.packets.load(Ordering::Relaxed),
                    c.errors.load(Ordering::Relaxed),
                    c.jitter_ns.load(Ordering::Relaxed) as f64 / 1e9,
                )
            })
            .collect();
        let theirs: Vec<(u64, i64, u64, u64, f64)> = peer["streams"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|s| {
                        (
                            s["bytes"].as_u64().unwrap_or(0),
                            s["retransmits"].as_i64().unwrap_or(-1),
                            s["packets"].as_u64().unwrap_or(0),
                            s["errors"].as_u64().unwrap_or(0),
                            s["jitter"].as_f64().unwrap_or(0.0),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let t = self.elapsed.max(1e-9);
        let sum = |v: &mut dyn Iterator<Item = u64>| v.sum::<u64>();
        let (sent, recv, retr) = if self.sender {
            (
                sum(&mut ours.iter().map(|o| o.0)),
                sum(&mut theirs.iter().map(|o| o.0)),
                sum(&mut ours.iter().map(|o| o.1)),
            )
        } else {
            (
                sum(&mut theirs.iter().map(|o| o.0)),
                sum(&mut ours.iter().map(|o| o.0)),
                theirs.iter().map(|o| o.1.max(0) as u64).sum(),
            )
        };
        let block = |bytes: u64, sender: bool| {
            json!({"start": 0, "end": t, "seconds": t, "bytes": bytes,
                   "bits_per_second": bytes as f64 * 8.0 / t, "retransmits": retr, "sender": sender})
        };
        let mut end = json!({
            "sum_sent": block(sent, true),
            "sum_received": block(recv, false),
        });
        if self.udp {
            let (pk, lost, jit) = if self.sender {
                (
                    sum(&mut ours.iter().map(|o| o.2)),
                    sum(&mut theirs.iter().map(|o| o.3)),
                    theirs.iter().map(|o| o.4).fold(0.0, f64::max),
                )
            } else {
                (
                    sum(&mut theirs.iter().map(|o| o.2)),
                    sum(&mut ours.iter().map(|o| o.3)),
                    ours.iter().map(|o| o.4).fold(0.0, f64::max),
                )
            };
            end["sum"] = json!({"start": 0, "end": t, "seconds": t, "bytes": sent,
                "bits_per_second": sent as f64 * 8.0 / t, "packets": pk, "lost_packets": lost,
                "lost_percent": if pk > 0 { 100.0 * lost as f64 / pk as f64 } else { 0.0 },
                "jitter_ms": jit * 1000.0});
        }
        json!({
            "start": {"test_start": {"protocol": if self.udp { "UDP" } else { "TCP" },
                "num_streams": self.counters.len(), "blksize": self.len, "duration": self.time,
                "reverse": i32::from(self.sender == (role == "server"))}, "role": role},
            "intervals": [],
            "end": end,
        })
    }
}

/// Sends whole blocks until `stop`: a block once begun is finished, as
/// iperf3 does, because an iperf3 receiver reads block by block and
/// waits for the rest of a partial one.
fn tcp_send(s: &Mutex<TcpStream>, len: usize, c: &Counter, stop: &AtomicBool) {
    let block: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
    let Ok(mut g) = s.lock() else { return };
    g.set_timeout(Some(Duration::from_millis(50)));
    let mut off = 0;
    while off > 0 || !stop.load(Ordering::Relaxed) {
        match g.write(&block[off..]) {
            Ok(n) => {
                c.bytes.fetch_add(n as u64, Ordering::Relaxed);
                off = (off + n) % len.max(1);
            }
            Err(x) if x.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return,
        }
    }
}

fn tcp_recv(s: &Mutex<TcpStream>, c: &Counter, stop: &AtomicBool) {
    let mut buf = vec![0u8; 256 << 10];
    let Ok(mut g) = s.lock() else { return };
    g.set_timeout(Some(Duration::from_millis(50)));
    while !stop.load(Ordering::Relaxed) {
        match g.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                c.bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(x) if x.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return,
        }
    }
}

fn udp_send(
    sock: &UdpSocket,
    peer: SocketAddr,
    len: usize,
    rate: u64,
    c: &Counter,
    stop: &AtomicBool,
) {
    let start = Instant::now();
    let mut pkt = vec![0u8; len.max(12)];
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let due = (start.elapsed().as_secs_f64() * rate as f64 / 8.0 / pkt.len() as f64) as u64;
        if n >= due {
            thread::sleep(Duration::from_micros(500));
            continue;
        }
        n += 1;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        pkt[0..4].copy_from_slice(&(now.as_secs() as u32).to_be_bytes());
        pkt[4..8].copy_from_slice(&now.subsec_micros().to_be_bytes());
        pkt[8..12].copy_from_slice(&(n as u32).to_be_bytes());
        if sock.send_to(&pkt, peer).is_ok() {
            c.bytes.fetch_add(pkt.len() as u64, Ordering::Relaxed);
            c.packets.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn udp_recv(sock: &UdpSocket, c: &Counter, stop: &AtomicBool) {
    let mut buf = vec![0u8; 65536];
    let (mut max_seq, mut got, mut prev_transit, mut jitter) = (0u64, 0u64, None::<f64>, 0.0f64);
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, _)) = sock.recv_from(&mut buf, Some(Duration::from_millis(50))) else {
            continue;
        };
        if n < 12 {
            continue;
        }
        let sec = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        let usec = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
        let seq = u64::from(u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]));
        got += 1;
        max_seq = max_seq.max(seq);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let transit = now - (f64::from(sec) + f64::from(usec) / 1e6);
        if let Some(p) = prev_transit {
            jitter += ((transit - p).abs() - jitter) / 16.0;
        }
        prev_transit = Some(transit);
        c.bytes.fetch_add(n as u64, Ordering::Relaxed);
        c.packets.store(max_seq, Ordering::Relaxed);
        c.errors
            .store(max_seq.saturating_sub(got), Ordering::Relaxed);
        c.jitter_ns.store((jitter * 1e9) as u64, Ordering::Relaxed);
    }
}

fn print_summary(doc: &Value, json_out: bool) {
    if json_out {
        println!("{}", serde_json::to_string_pretty(doc).unwrap_or_default());
        return;
    }
    let end = &doc["end"];
    for (k, label) in [("sum_sent", "sender"), ("sum_received", "receiver")] {
        let s = &end[k];
        println!(
            "[SUM] 0.00-{:.2} sec {:>12} bytes {:>10.2} Mbits/sec {} retr {label}",
            s["seconds"].as_f64().unwrap_or(0.0),
            s["bytes"].as_u64().unwrap_or(0),
            s["bits_per_second"].as_f64().unwrap_or(0.0) / 1e6,
            s["retransmits"].as_u64().unwrap_or(0),
        );
    }
    if let Some(u) = end.get("sum") {
        println!(
            "[SUM] udp: {} packets, {} lost, jitter {:.3} ms",
            u["packets"],
            u["lost_packets"],
            u["jitter_ms"].as_f64().unwrap_or(0.0)
        );
    }
}

fn client(stack: &Stack, cli: &Cli, server: IpAddr) -> Res<Value> {
    let addr = SocketAddr::new(server, cli.port);
    let mut ctrl =
        TcpStream::connect(stack, addr, Duration::from_secs(10)).map_err(e("connect"))?;
    ctrl.set_timeout(Some(Duration::from_secs_f64(cli.time + 30.0)));
    let ck = cookie();
    ctrl.write_all(&ck).map_err(e("cookie"))?;
    let len = cli.len.unwrap_or(if cli.udp { 1448 } else { 128 << 10 });
    let rate = if cli.udp {
        parse_rate(&cli.bitrate)?
    } else {
        0
    };
    let mut test = Test::new(cli.udp, !cli.reverse, len, rate, cli.time);
    let mut handles = Vec::new();
    loop {
        match read_state(&mut ctrl)? {
            PARAM_EXCHANGE => {
                let mut p = json!({"omit": 0, "time": cli.time as u64, "num": 0, "blockcount": 0,
                    "parallel": cli.parallel, "len": len, "pacing_timer": 1000, "client_version": "3.12"});
                p[if cli.udp { "udp" } else { "tcp" }] = json!(true);
                if cli.reverse {
                    p["reverse"] = json!(true);
                }
                if cli.udp {
                    p["bandwidth"] = json!(test.rate);
                }
                write_json(&mut ctrl, &p)?;
            }
            CREATE_STREAMS => {
                for _ in 0..cli.parallel {
                    if cli.udp {
                        let s = UdpSocket::bind(stack, 0).map_err(e("udp bind"))?;
                        let mut ok = false;
                        for _ in 0..10 {
                            s.send_to(&UDP_CONNECT_MSG, addr)
                                .map_err(e("udp connect"))?;
                            let mut b = [0u8; 64];
                            if let Ok((4, _)) =
                                s.recv_from(&mut b, Some(Duration::from_millis(500)))
                            {
                                ok = true;
                                break;
                            }
                        }
                        if !ok {
                            return Err("server did not answer the UDP stream".into());
                        }
                        test.udp_socks.push((Arc::new(s), addr));
                    } else {
                        let mut s = TcpStream::connect(stack, addr, Duration::from_secs(10))
                            .map_err(e("stream connect"))?;
                        s.write_all(&ck).map_err(e("stream cookie"))?;
                        test.tcp.push(Arc::new(Mutex::new(s)));
                    }
                    test.counters.push(Arc::new(Counter::default()));
                }
            }
            TEST_START => {}
            TEST_RUNNING => {
                handles = test.run_streams();
                thread::sleep(Duration::from_secs_f64(cli.time));
                if test.sender {
                    test.stop.store(true, Ordering::Relaxed);
                    for h in handles.drain(..) {
                        let _ = h.join();
                    }
                    // Everything written reaches the peer before TEST_END.
                    for s in &test.tcp {
                        if let Ok(g) = s.lock() {
                            let _ = g.flush_acked(Duration::from_secs(10));
                        }
                    }
                }
                test.elapsed = test.start.elapsed().as_secs_f64();
                state(&mut ctrl, TEST_END)?;
            }
            EXCHANGE_RESULTS => {
                test.stop.store(true, Ordering::Relaxed);
                for h in handles.drain(..) {
                    let _ = h.join();
                }
                test.collect_retransmits();
                write_json(&mut ctrl, &test.results())?;
                let peer = read_json(&mut ctrl)?;
                let doc = test.report(&peer, "client");
                let _ = read_state(&mut ctrl).map(|s| {
                    if s == DISPLAY_RESULTS {
                        let _ = state(&mut ctrl, IPERF_DONE);
                    }
                });
                let _ = ctrl.shutdown_write();
                let _ = ctrl.flush_acked(Duration::from_secs(2));
                return Ok(doc);
            }
            ACCESS_DENIED => return Err("the server is busy".into()),
            SERVER_ERROR => return Err("the server reported an error".into()),
            SERVER_TERMINATE => return Err("the server terminated the test".into()),
            other => return Err(format!("unexpected control state {other}")),
        }
    }
}

fn server_once(stack: &Stack, cli: &Cli, listener: &TcpListener) -> Res<Value> {
    let mut ctrl = listener
        .accept(Some(Duration::from_secs_f64(cli.idle_timeout)))
        .map_err(e("waiting for a client"))?;
    ctrl.set_timeout(Some(Duration::from_secs(120)));
    let mut ck = [0u8; COOKIE_LEN];
    ctrl.read_exact(&mut ck).map_err(e("cookie"))?;
    state(&mut ctrl, PARAM_EXCHANGE)?;
    let p = read_json(&mut ctrl)?;
    let udp = p["udp"].as_bool().unwrap_or(false);
    let parallel = p["parallel"].as_u64().unwrap_or(1).clamp(1, 128) as usize;
    let reverse = p["reverse"].as_bool().unwrap_or(false);
    let time = p["time"].as_f64().unwrap_or(10.0);
    let len = p["len"]
        .as_u64()
        .unwrap_or(if udp { 1448 } else { 128 << 10 }) as usize;
    let rate = p["bandwidth"].as_u64().unwrap_or(1_000_000);
    let mut test = Test::new(udp, reverse, len.clamp(16, 1 << 20), rate, time);
    let usock = if udp {
        Some(Arc::new(
            UdpSocket::bind(stack, cli.port).map_err(e("udp bind"))?,
        ))
    } else {
        None
    };
    state(&mut ctrl, CREATE_STREAMS)?;
    while test.counters.len() < parallel {
        if let Some(u) = &usock {
            let mut b = [0u8; 64];
            let (n, from) = u
                .recv_from(&mut b, Some(Duration::from_secs(10)))
                .map_err(e("udp stream"))?;
            if n == 4 && !test.udp_socks.iter().any(|(_, a)| *a == from) {
                u.send_to(&UDP_CONNECT_REPLY, from)
                    .map_err(e("udp reply"))?;
                test.udp_socks.push((u.clone(), from));
                test.counters.push(Arc::new(Counter::default()));
            }
        } else {
            let mut s = listener
                .accept(Some(Duration::from_secs(10)))
                .map_err(e("stream accept"))?;
            s.set_timeout(Some(Duration::from_secs(10)));
            let mut c2 = [0u8; COOKIE_LEN];
            s.read_exact(&mut c2).map_err(e("stream cookie"))?;
            if c2 != ck {
                continue;
            }
            test.tcp.push(Arc::new(Mutex::new(s)));
            test.counters.push(Arc::new(Counter::default()));
        }
    }
    state(&mut ctrl, TEST_START)?;
    state(&mut ctrl, TEST_RUNNING)?;
    let handles = test.run_streams();
    let end = read_state(&mut ctrl)?;
    test.elapsed = test.start.elapsed().as_secs_f64();
    if end != TEST_END {
        test.stop.store(true, Ordering::Relaxed);
        return Err(format!("client sent state {end} instead of TEST_END"));
    }
    // A receiver drains what already arrived before counting.
    if !test.sender {
        thread::sleep(Duration::from_millis(100));
    }
    test.stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
    test.collect_retransmits();
    // iperf3's server closes the streams at TEST_END: a client still
    // reading one (reverse mode) sees its end and turns to the control
    // connection.
    for st in &test.tcp {
        if let Ok(g) = st.lock() {
            let _ = g.shutdown_write();
        }
    }
    state(&mut ctrl, EXCHANGE_RESULTS)?;
    let peer = read_json(&mut ctrl)?;
    write_json(&mut ctrl, &test.results())?;
    state(&mut ctrl, DISPLAY_RESULTS)?;
    match read_state(&mut ctrl) {
        Ok(IPERF_DONE) | Err(_) => {}
        Ok(CLIENT_TERMINATE) => return Err("client terminated".into()),
        Ok(_) => {}
    }
    Ok(test.report(&peer, "server"))
}

fn main() -> ExitCode {
    env_logger::init();
    let cli = Cli::parse();
    if !cli.server && cli.client.is_none() {
        eprintln!("vnic-iperf: give -s or -c HOST");
        return ExitCode::from(2);
    }
    let stack = match cli.net.start() {
        Ok(s) => s,
        Err(x) => {
            eprintln!("vnic-iperf: {x}");
            return ExitCode::from(2);
        }
    };
    let code = if let Some(server) = cli.client {
        match client(&stack, &cli, server) {
            Ok(doc) => {
                print_summary(&doc, cli.json);
                ExitCode::SUCCESS
            }
            Err(x) => {
                eprintln!("vnic-iperf: {x}");
                ExitCode::from(1)
            }
        }
    } else {
        match TcpListener::bind(&stack, cli.port) {
            Err(x) => {
                eprintln!("vnic-iperf: listen: {x}");
                ExitCode::from(2)
            }
            Ok(l) => {
                if !cli.json {
                    println!("Server listening on {}", cli.port);
                }
                let mut code = ExitCode::SUCCESS;
                loop {
                    match server_once(&stack, &cli, &l) {
                        Ok(doc) => print_summary(&doc, cli.json),
                        Err(x) => {
                            eprintln!("vnic-iperf: {x}");
                            code = ExitCode::from(1);
                        }
                    }
                    let _ = std::io::stdout().flush();
                    if cli.one_off {
                        break;
                    }
                }
                code
            }
        }
    };
    let s = stack.stats();
    log::info!("stack: {s:?}");
    stack.shutdown();
    code
}
