//! Set-up shared by the vnic-guest tests against the kernel in a namespace.

#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::{path::Path, process::Command, time::Duration};

use serde_json::Value;
use vnic_guest::cli::NetArgs;
use vnic_tests::{PortInNs, Proc};

/// The vnic-iperf binary of this build.
pub fn iperf() -> &'static str {
    env!("CARGO_BIN_EXE_vnic-iperf")
}

/// The workspace's vnicd, built beside the test binaries.
pub fn vnicd() -> String {
    vnic_tests::sibling_binary(env!("CARGO_BIN_EXE_vnic-iperf"), "vnicd")
}

/// vnicd (2 queue pairs) with its TAP in a namespace as 192.0.2.1/24 and
/// 2001:db8::1/64; the guest stack resolves addresses itself.
pub fn setup() -> PortInNs {
    let s = PortInNs::start(&vnicd(), &["--queues", "2"], "192.0.2.1/24", &[])
        .expect("vnicd with its TAP in a namespace");
    s.ns.exec(
        "sysctl",
        &["-qw", &format!("net.ipv6.conf.{}.disable_ipv6=0", s.tap)],
    )
    .expect("enable IPv6");
    s.ns.ip(&["addr", "add", "2001:db8::1/64", "dev", &s.tap, "nodad"])
        .expect("IPv6 address");
    s
}

/// The stack in this process on vnicd's socket, as 192.0.2.2/24 and
/// 2001:db8::2/64 on 2 queue pairs.
pub fn start_stack(
    socket: &Path,
    no_tso: bool,
    busy_poll_us: Option<u64>,
) -> vnic_guest::stack::Stack {
    stack_args(socket, no_tso, busy_poll_us)
        .start()
        .expect("stack")
}

/// [`start_stack`]'s arguments.
pub fn stack_args(socket: &Path, no_tso: bool, busy_poll_us: Option<u64>) -> NetArgs {
    NetArgs {
        socket: Some(socket.to_path_buf()),
        pci: None,
        addr: Some("192.0.2.2/24".into()),
        addr6: Some("2001:db8::2/64".into()),
        queues: 2,
        queue_size: 256,
        no_tso,
        no_csum: false,
        busy_poll_us,
        reassembly_kib: 4096,
        toe: false,
        toe_conns: 0,
        toe_ring_kib: 256,
    }
}

/// One vnicd counter summed over the RX queues (`packets`, `drop.filtered`).
pub fn rx_total(s: &PortInNs, what: &str) -> u64 {
    let st = s.vnicd.stats().expect("vnicd stats");
    (0..2).map(|q| st[&format!("rx{q}.{what}")]).sum()
}

/// The tools' arguments for the stack of [`start_stack`].
pub fn net_args(s: &PortInNs) -> Vec<String> {
    vec![
        "--socket".into(),
        s.vnicd.socket.display().to_string(),
        "--addr".into(),
        "192.0.2.2/24".into(),
        "--addr6".into(),
        "2001:db8::2/64".into(),
        "--queues".into(),
        "2".into(),
    ]
}

/// `cmd args` inside the namespace of `s`.
pub fn in_ns(s: &PortInNs, cmd: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &s.ns.name, cmd]).args(args);
    c
}

pub fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("bad JSON ({e}): {s}"))
}

/// `end.<k>.bytes` of an iperf3 JSON report.
pub fn bytes(v: &Value, k: &str) -> u64 {
    v["end"][k]["bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("no end.{k}.bytes in {v}"))
}

/// vnic-iperf client (with `ours` added to its arguments) against
/// `iperf3 -s`; returns (client doc, server doc).
pub fn client_vs_kernel(s: &PortInNs, ours: &[&str], extra: &[&str]) -> (Value, Value) {
    let server = Proc::spawn(&mut in_ns(
        s,
        "iperf3",
        &["-s", "-1", "-J", "-B", "192.0.2.1"],
    ));
    std::thread::sleep(Duration::from_millis(500));
    let mut a = net_args(s);
    a.extend(ours.iter().map(|x| x.to_string()));
    a.extend(["-c", "192.0.2.1", "-t", "3", "-J"].map(String::from));
    a.extend(extra.iter().map(|x| x.to_string()));
    let (ok, out, err) =
        Proc::spawn(Command::new(iperf()).args(&a)).finish(Duration::from_secs(60));
    assert!(ok, "vnic-iperf {extra:?}: {out} {err}");
    let (sok, sout, serr) = server.finish(Duration::from_secs(20));
    assert!(sok, "iperf3 -s: {sout} {serr}");
    (json(&out), json(&sout))
}

/// `iperf3 -c` against vnic-iperf -s; returns (client doc, server doc).
pub fn kernel_vs_server(s: &PortInNs, ours: &[&str], extra: &[&str]) -> (Value, Value) {
    let mut a = net_args(s);
    a.extend(ours.iter().map(|x| x.to_string()));
    a.extend(["-s", "-1", "-J", "--idle-timeout", "30"].map(String::from));
    let server = Proc::spawn(Command::new(iperf()).args(&a));
    std::thread::sleep(Duration::from_secs(2));
    let mut args = vec!["-c", "192.0.2.2", "-t", "3", "-J"];
    args.extend_from_slice(extra);
    let (ok, out, err) =
        Proc::spawn(&mut in_ns(s, "iperf3", &args)).finish(Duration::from_secs(60));
    let (sok, sout, serr) = server.finish(Duration::from_secs(20));
    assert!(
        ok,
        "iperf3 -c {extra:?}: {out} {err}\nvnic-iperf -s said: {sout} {serr}"
    );
    assert!(sok, "vnic-iperf -s: {sout} {serr}");
    (json(&out), json(&sout))
}

/// The most a sender's count can run ahead of its receiver's when a test
/// stops, per stream: what the sending socket holds (written, not yet
/// acknowledged), what the receiving socket holds (acknowledged, not yet
/// read), and the one block iperf counts as it writes. The kernel's
/// buffers are at most its tcp_wmem/tcp_rmem maximum; the guest's are the
/// engine's defaults.
pub fn in_flight_bound(s: &PortInNs, streams: u64, kernel_sends: bool) -> u64 {
    let kernel_max = |key: &str| -> u64 {
        let v = s.ns.exec("sysctl", &["-n", key]).expect("sysctl");
        v.split_whitespace()
            .nth(2)
            .and_then(|x| x.parse().ok())
            .unwrap_or_else(|| panic!("{key}: {v:?}"))
    };
    let guest = vnic_protocol::tcp::Config::default();
    let per_stream = if kernel_sends {
        kernel_max("net.ipv4.tcp_wmem") + guest.recv_buffer as u64
    } else {
        guest.send_buffer as u64 + kernel_max("net.ipv4.tcp_rmem")
    };
    streams * (per_stream + (128 << 10))
}

/// What the sender said it sent and what the receiver said it got agree:
/// equal, or the receiver short by no more than `bound`.
pub fn agree(sent: u64, received: u64, bound: u64, what: &str) {
    assert!(sent > 1_000_000, "{what}: only {sent} bytes sent");
    assert!(
        received <= sent,
        "{what}: received {received} > sent {sent}"
    );
    assert!(
        sent - received <= bound,
        "{what}: sent {sent}, received {received}, at most {bound} apart"
    );
}

/// In `ns`, a kernel server on `bind` for `n` connections, one after
/// another: each reads `bytes` and echoes them. The connections stay open
/// until the last is done.
pub fn kernel_echo_server(
    ns: &vnic_tests::NetNs,
    bind: &'static str,
    n: usize,
    bytes: usize,
) -> std::thread::JoinHandle<std::io::Result<()>> {
    use std::io::{Read, Write};
    ns.enter(move || {
        let l = std::net::TcpListener::bind(bind)?;
        let mut conns = Vec::with_capacity(n);
        for _ in 0..n {
            let (mut c, _) = l.accept()?;
            c.set_read_timeout(Some(Duration::from_secs(30)))?;
            let mut buf = vec![0u8; bytes];
            c.read_exact(&mut buf)?;
            c.write_all(&buf)?;
            conns.push(c);
        }
        Ok(())
    })
}

/// In `ns`, `n` kernel connections to `to`, one after another: each sends
/// `bytes` of `pattern(bytes, seed + i)` and checks the echo. They stay
/// open until the last is done.
pub fn kernel_echo_client(
    ns: &vnic_tests::NetNs,
    to: &'static str,
    n: usize,
    bytes: usize,
    seed: u64,
) -> std::thread::JoinHandle<std::io::Result<()>> {
    use std::io::{Read, Write};
    ns.enter(move || {
        let mut conns = Vec::with_capacity(n);
        for i in 0..n {
            let data = vnic_tests::pattern(bytes, seed + i as u64);
            let mut c = std::net::TcpStream::connect(to)?;
            c.set_read_timeout(Some(Duration::from_secs(30)))?;
            c.write_all(&data)?;
            let mut back = vec![0u8; bytes];
            c.read_exact(&mut back)?;
            if back != data {
                return Err(std::io::Error::other(format!(
                    "connection {i}: echo differs"
                )));
            }
            conns.push(c);
        }
        Ok(())
    })
}

/// The guest's side of [`kernel_echo_server`]: `n` connections to `to`,
/// each sending `bytes` of `pattern(bytes, seed + i)` and checking the
/// echo; returns them, still open.
pub fn guest_echo_client(
    stack: &vnic_guest::stack::Stack,
    to: std::net::SocketAddr,
    n: usize,
    bytes: usize,
    seed: u64,
) -> Vec<vnic_guest::stack::TcpStream> {
    use std::io::{Read, Write};
    (0..n)
        .map(|i| {
            let mut c = vnic_guest::stack::TcpStream::connect(stack, to, Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("connect {to}: {e}"));
            c.set_timeout(Some(Duration::from_secs(30)));
            let data = vnic_tests::pattern(bytes, seed + i as u64);
            c.write_all(&data).expect("send");
            let mut back = vec![0u8; bytes];
            c.read_exact(&mut back).expect("echo");
            assert!(back == data, "connection {i}: the echo differs");
            c
        })
        .collect()
}

/// The guest's side of [`kernel_echo_client`]: accepts `n` connections
/// on `l`, echoing `bytes` each; returns them, still open.
pub fn guest_echo_server(
    l: &vnic_guest::stack::TcpListener,
    n: usize,
    bytes: usize,
) -> Vec<vnic_guest::stack::TcpStream> {
    use std::io::{Read, Write};
    (0..n)
        .map(|_| {
            let mut c = l.accept(Some(Duration::from_secs(30))).expect("accept");
            c.set_timeout(Some(Duration::from_secs(30)));
            let mut buf = vec![0u8; bytes];
            c.read_exact(&mut buf).expect("read");
            c.write_all(&buf).expect("echo");
            c
        })
        .collect()
}
